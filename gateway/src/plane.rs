//! The registry's repository plane: each live tree or DNN version is laid
//! out as the Triton model directory `{model}@{version}` under the plane's
//! root (in `server.data_dir`), with the config.pbtxt the artifact brings or
//! one derived from the version's declared contract, checked against that
//! contract, and loaded into a repository of its own (explicit control, so
//! only the controller loads and unloads it). The directory-based repository
//! a server may also serve is a different one and is never touched.
use crate::registry::records::{Contract, TensorSpec};
use crate::registry::Version;
use engine::dnn::{ControlMode, DataType, ModelRepository, RepositoryBounds};
use proto::inference::model_config::SchedulingChoice;
use proto::inference::{
    ModelConfig, ModelDynamicBatching, ModelInput, ModelOutput, ModelParameter,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub struct Plane {
    pub repo: Arc<ModelRepository>,
    root: PathBuf,
}

/// The plane's name of a version.
pub fn plane_name(model: &str, version: u32) -> String {
    format!("{model}@{version}")
}

impl Plane {
    pub fn open(root: &Path, bounds: RepositoryBounds) -> Result<Self, String> {
        std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let repo = ModelRepository::open(root, ControlMode::Explicit, &[], bounds)?;
        Ok(Self {
            repo,
            root: root.to_path_buf(),
        })
    }

    /// Lays out and loads `v` from its verified artifact (a Triton model
    /// folder, or one model file with a contract); returns its plane name.
    /// A contract the artifact does not match fails the load, naming the field.
    pub fn load(&self, v: &Version, artifact: &Path) -> Result<String, String> {
        let name = plane_name(&v.model, v.number);
        let dir = self.root.join(&name);
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        }
        let vdir = dir.join(v.number.to_string());
        std::fs::create_dir_all(&vdir).map_err(|e| format!("{}: {e}", vdir.display()))?;
        let contract = &v.spec.contract;
        let folder = if artifact.is_dir() {
            Some(artifact.to_path_buf())
        } else if v.spec.artifact.format == "triton" {
            Some(unpack(
                artifact,
                &self.root.join(".unpacked").join(&name),
                "config.pbtxt",
            )?)
        } else {
            None
        };
        let mut config = match &folder {
            Some(folder) => {
                let config = from_folder(folder, &dir, &vdir)?;
                check_contract(contract, &config)?;
                config
            }
            None => derived(v, artifact, &vdir)?,
        };
        config.name = name.clone();
        let derived = folder.is_none();
        self.repo.load(&name, Some(config)).map_err(|e| {
            if derived {
                // The config was written from the contract: name that.
                format!(
                    "the artifact does not match the version's contract: {}",
                    e.message.replace("config.pbtxt", "the contract")
                )
            } else {
                e.message
            }
        })?;
        Ok(name)
    }

    pub fn unload(&self, name: &str) {
        if let Err(e) = self.repo.unload(name) {
            tracing::warn!(model = %name, "unloading: {}", e.message);
        }
        let _ = std::fs::remove_dir_all(self.root.join(name));
        let _ = std::fs::remove_dir_all(self.root.join(".unpacked").join(name));
    }
}

/// Most bytes a model archive may unpack to.
const MAX_UNPACKED_BYTES: u64 = 16 << 30;

/// Unpacks a `.tar.gz` model folder (Triton's, or a Hugging Face folder)
/// into `to` (files and folders only, nothing outside `to`, at most
/// `MAX_UNPACKED_BYTES`); returns the folder that holds `marker`
/// (`to`, or its one top-level folder).
pub fn unpack(archive: &Path, to: &Path, marker: &str) -> Result<PathBuf, String> {
    let at = |e: std::io::Error| format!("unpacking {}: {e}", archive.display());
    let _ = std::fs::remove_dir_all(to);
    std::fs::create_dir_all(to).map_err(at)?;
    let file = std::fs::File::open(archive).map_err(at)?;
    let mut tar = tar::Archive::new(flate2::read::GzDecoder::new(file));
    let mut total = 0u64;
    for entry in tar.entries().map_err(at)? {
        let mut entry = entry.map_err(at)?;
        let path = entry.path().map_err(at)?.display().to_string();
        let kind = entry.header().entry_type();
        if !(kind.is_file() || kind.is_dir()) {
            return Err(format!(
                "unpacking {}: `{path}` is neither a file nor a folder; a model archive holds only those",
                archive.display()
            ));
        }
        total = total.saturating_add(entry.size());
        if total > MAX_UNPACKED_BYTES {
            return Err(format!(
                "unpacking {}: more than {MAX_UNPACKED_BYTES} bytes",
                archive.display()
            ));
        }
        if !entry.unpack_in(to).map_err(at)? {
            return Err(format!(
                "unpacking {}: `{path}` would land outside the model folder",
                archive.display()
            ));
        }
    }
    if to.join(marker).is_file() {
        return Ok(to.to_path_buf());
    }
    let top: Vec<PathBuf> = std::fs::read_dir(to)
        .map_err(at)?
        .flatten()
        .map(|e| e.path())
        .collect();
    match top.as_slice() {
        [one] if one.join(marker).is_file() => Ok(one.clone()),
        _ => Err(format!(
            "{}: the archive holds no {marker} at its top or in its one top-level folder",
            archive.display()
        )),
    }
}

fn copy(from: &Path, to: &Path) -> Result<(), String> {
    std::fs::copy(from, to)
        .map(|_| ())
        .map_err(|e| format!("copying {}: {e}", from.display()))
}

/// A Triton model folder: its config.pbtxt, its top-level files (labels),
/// and its highest numbered version folder as the registry's version.
fn from_folder(artifact: &Path, dir: &Path, vdir: &Path) -> Result<ModelConfig, String> {
    let config_file = artifact.join("config.pbtxt");
    let text = std::fs::read_to_string(&config_file).map_err(|e| {
        format!(
            "the artifact folder has no readable config.pbtxt ({}: {e})",
            config_file.display()
        )
    })?;
    let mut config = proto::model_config::parse_text(&text)
        .map_err(|e| format!("{}: {e}", config_file.display()))?;
    let mut highest: Option<(u64, PathBuf)> = None;
    for e in std::fs::read_dir(artifact)
        .map_err(|e| format!("{}: {e}", artifact.display()))?
        .flatten()
    {
        let path = e.path();
        let file_name = e.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if let Ok(n) = file_name.parse::<u64>() {
                if highest.as_ref().is_none_or(|(h, _)| n > *h) {
                    highest = Some((n, path));
                }
            }
        } else if path.is_file() && file_name != "config.pbtxt" {
            copy(&path, &dir.join(&file_name))?;
        }
    }
    let (_, version) = highest.ok_or("the artifact folder has no numbered version folder")?;
    for e in std::fs::read_dir(&version)
        .map_err(|e| format!("{}: {e}", version.display()))?
        .flatten()
    {
        if e.path().is_file() {
            copy(&e.path(), &vdir.join(e.file_name()))?;
        }
    }
    // The plane serves exactly the one version folder it laid out.
    config.version_policy = None;
    Ok(config)
}

/// The backend, file name and parameters an artifact format is served with.
fn backend_of(
    format: &str,
) -> Result<
    (
        &'static str,
        &'static str,
        &'static str,
        Option<&'static str>,
    ),
    String,
> {
    // (platform, backend, file, fil model_type)
    match format {
        "onnx" => Ok(("onnxruntime_onnx", "", "model.onnx", None)),
        "xgboost" | "xgboost_json" => Ok(("", "fil", "xgboost.json", Some("xgboost_json"))),
        "lightgbm" => Ok(("", "fil", "model.txt", Some("lightgbm"))),
        other => Err(format!(
            "artifact.format: `{other}` is not served by the repository plane as one file \
             (onnx, xgboost, lightgbm; or `triton` for a Triton model folder or its .tar.gz)"
        )),
    }
}

fn config_type(at: &str, datatype: &str) -> Result<i32, String> {
    let dt = DataType::from_wire(datatype)
        .ok_or_else(|| format!("{at}.datatype: `{datatype}` is not a KServe datatype"))?;
    (0..=16)
        .find(|&v| DataType::from_config(v) == Some(dt))
        .ok_or_else(|| format!("{at}.datatype: `{datatype}` has no config.pbtxt type"))
}

/// The dims config.pbtxt declares for a contract shape: without the leading
/// batch dimension (which must be -1) when the model batches.
fn config_dims(at: &str, t: &TensorSpec, batching: bool) -> Result<Vec<i64>, String> {
    if !batching {
        return Ok(t.shape.clone());
    }
    match t.shape.split_first() {
        Some((-1, rest)) => Ok(rest.to_vec()),
        _ => Err(format!(
            "{at}.shape: {:?} must start with -1, the batch dimension, since \
             requirements.max_batch_size is set",
            t.shape
        )),
    }
}

/// A config.pbtxt from the version's contract and requirements, with the
/// artifact copied where the format's backend reads it.
fn derived(v: &Version, artifact: &Path, vdir: &Path) -> Result<ModelConfig, String> {
    let contract = &v.spec.contract;
    if contract.inputs.is_empty() || contract.outputs.is_empty() {
        return Err(
            "a tree or DNN artifact without config.pbtxt needs contract.inputs and \
                    contract.outputs (names, datatypes, shapes)"
                .into(),
        );
    }
    let (platform, backend, file, model_type) = backend_of(&v.spec.artifact.format)?;
    copy(artifact, &vdir.join(file))?;
    let max_batch_size = v.spec.requirements.max_batch_size.unwrap_or(0);
    let batching = max_batch_size > 0;
    let mut config = ModelConfig {
        platform: platform.into(),
        backend: backend.into(),
        max_batch_size: i32::try_from(max_batch_size)
            .map_err(|_| "requirements.max_batch_size: too large".to_string())?,
        scheduling_choice: batching
            .then(|| SchedulingChoice::DynamicBatching(ModelDynamicBatching::default())),
        ..Default::default()
    };
    for (i, t) in contract.inputs.iter().enumerate() {
        let at = format!("contract.inputs[{i}]");
        config.input.push(ModelInput {
            name: t.name.clone(),
            data_type: config_type(&at, &t.datatype)?,
            dims: config_dims(&at, t, batching)?,
            ..Default::default()
        });
    }
    for (i, t) in contract.outputs.iter().enumerate() {
        let at = format!("contract.outputs[{i}]");
        config.output.push(ModelOutput {
            name: t.name.clone(),
            data_type: config_type(&at, &t.datatype)?,
            dims: config_dims(&at, t, batching)?,
            ..Default::default()
        });
    }
    if let Some(m) = model_type {
        config.parameters.insert(
            "model_type".into(),
            ModelParameter {
                string_value: m.into(),
            },
        );
    }
    Ok(config)
}

/// Compares a declared contract with an artifact's own config.pbtxt: every
/// declared tensor must be there with its datatype and shape, and the
/// artifact may take no input the contract leaves out.
pub fn check_contract(contract: &Contract, config: &ModelConfig) -> Result<(), String> {
    let batching = config.max_batch_size > 0;
    let shape = |dims: &[i64]| -> Vec<i64> {
        let mut s = if batching { vec![-1] } else { vec![] };
        s.extend_from_slice(dims);
        s
    };
    let have_inputs: Vec<(&str, i32, Vec<i64>)> = config
        .input
        .iter()
        .map(|t| (t.name.as_str(), t.data_type, shape(&t.dims)))
        .collect();
    let have_outputs: Vec<(&str, i32, Vec<i64>)> = config
        .output
        .iter()
        .map(|t| (t.name.as_str(), t.data_type, shape(&t.dims)))
        .collect();
    for (kind, declared, have) in [
        ("inputs", &contract.inputs, &have_inputs),
        ("outputs", &contract.outputs, &have_outputs),
    ] {
        for (i, t) in declared.iter().enumerate() {
            let at = format!("contract.{kind}[{i}]");
            let Some((_, dtype, dims)) = have.iter().find(|(n, _, _)| *n == t.name) else {
                let names: Vec<&str> = have.iter().map(|(n, _, _)| *n).collect();
                return Err(format!(
                    "{at}.name: the artifact has no {kind} `{}` (it has {names:?})",
                    t.name
                ));
            };
            let wire = DataType::from_config(*dtype).map_or("?", |d| d.wire());
            if wire != t.datatype {
                return Err(format!(
                    "{at}.datatype: `{}` is declared for `{}`; the artifact's is `{wire}`",
                    t.datatype, t.name
                ));
            }
            if *dims != t.shape {
                return Err(format!(
                    "{at}.shape: {:?} is declared for `{}`; the artifact's is {dims:?}",
                    t.shape, t.name
                ));
            }
        }
    }
    if !contract.inputs.is_empty() {
        if let Some((n, _, _)) = have_inputs
            .iter()
            .find(|(n, _, _)| !contract.inputs.iter().any(|t| t.name == *n))
        {
            return Err(format!(
                "contract.inputs: the artifact also takes `{n}`, which the contract does not declare"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, datatype: &str, shape: Vec<i64>) -> TensorSpec {
        TensorSpec {
            name: name.into(),
            datatype: datatype.into(),
            shape,
        }
    }

    fn config() -> ModelConfig {
        proto::model_config::parse_text(
            r#"backend: "fil" max_batch_size: 8
               input [ { name: "input__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
               output [ { name: "output__0" data_type: TYPE_FP32 dims: [ 1 ] } ]"#,
        )
        .unwrap()
    }

    #[test]
    fn a_contract_is_compared_field_by_field() {
        let ok = Contract {
            inputs: vec![spec("input__0", "FP32", vec![-1, 4])],
            outputs: vec![spec("output__0", "FP32", vec![-1, 1])],
            ..Default::default()
        };
        check_contract(&ok, &config()).unwrap();
        check_contract(&Contract::default(), &config()).unwrap();
        for (bad, field) in [
            (spec("x", "FP32", vec![-1, 4]), "contract.inputs[0].name"),
            (
                spec("input__0", "FP64", vec![-1, 4]),
                "contract.inputs[0].datatype",
            ),
            (
                spec("input__0", "FP32", vec![-1, 5]),
                "contract.inputs[0].shape",
            ),
        ] {
            let c = Contract {
                inputs: vec![bad],
                ..ok.clone()
            };
            let e = check_contract(&c, &config()).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
        let missing = Contract {
            inputs: vec![],
            outputs: vec![spec("output__0", "FP32", vec![-1, 2])],
            ..Default::default()
        };
        let e = check_contract(&missing, &config()).unwrap_err();
        assert!(e.starts_with("contract.outputs[0].shape"), "{e}");
    }

    #[test]
    fn batched_contract_shapes_lead_with_the_batch_dimension() {
        let t = spec("x", "FP32", vec![4]);
        let e = config_dims("contract.inputs[0]", &t, true).unwrap_err();
        assert!(e.starts_with("contract.inputs[0].shape"), "{e}");
        assert_eq!(
            config_dims("c", &spec("x", "FP32", vec![-1, 4]), true).unwrap(),
            [4]
        );
        assert_eq!(
            config_type("c", "FP32").unwrap(),
            proto::inference::DataType::TypeFp32 as i32
        );
        assert!(config_type("c", "FLOAT")
            .unwrap_err()
            .contains("c.datatype"));
    }

    /// A `.tar.gz` with `entries` (path, symlink target or file content).
    fn archive(path: &Path, entries: &[(&str, Result<&str, &str>)]) {
        let gz = flate2::write::GzEncoder::new(
            std::fs::File::create(path).unwrap(),
            flate2::Compression::fast(),
        );
        let mut b = tar::Builder::new(gz);
        for (name, what) in entries {
            let mut h = tar::Header::new_gnu();
            match what {
                Ok(content) => {
                    h.set_size(content.len() as u64);
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(0o644);
                    b.append_data(&mut h, name, content.as_bytes()).unwrap();
                }
                Err(target) => {
                    h.set_size(0);
                    h.set_entry_type(tar::EntryType::Symlink);
                    b.append_link(&mut h, name, target).unwrap();
                }
            }
        }
        b.into_inner().unwrap().finish().unwrap();
    }

    #[test]
    fn an_archive_unpacks_its_model_folder_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.tar.gz");
        archive(
            &good,
            &[
                ("m/config.pbtxt", Ok("backend: \"fil\"")),
                ("m/1/xgboost.json", Ok("{}")),
            ],
        );
        let folder = unpack(&good, &dir.path().join("out"), "config.pbtxt").unwrap();
        assert!(folder.join("1/xgboost.json").is_file());
        let linked = dir.path().join("linked.tar.gz");
        archive(
            &linked,
            &[
                ("m/config.pbtxt", Ok("")),
                ("m/1/model.onnx", Err("/etc/passwd")),
            ],
        );
        let e = unpack(&linked, &dir.path().join("out2"), "config.pbtxt").unwrap_err();
        assert!(e.contains("neither a file nor a folder"), "{e}");
        let bare = dir.path().join("bare.tar.gz");
        archive(
            &bare,
            &[("a/1/model.onnx", Ok("x")), ("b/config.pbtxt", Ok(""))],
        );
        let e = unpack(&bare, &dir.path().join("out3"), "config.pbtxt").unwrap_err();
        assert!(e.contains("no config.pbtxt"), "{e}");
    }
}
