//! A Triton model repository served as a plane: models loaded per control
//! mode (none, poll, explicit), requests checked against each config, the
//! dynamic batcher per version, and the index, statistics and load/unload.
use super::backend;
use super::batcher::Batcher;
use super::cache::ResponseCache;
use super::error::{DnnError, Result};
use super::model::{BackendKind, EnsembleStep, ModelDefinition};
use super::stats::{StatsSnapshot, VersionStats};
use super::tensor::{bytes_elements, encode_bytes, Tensor};
use proto::inference::ModelConfig;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

/// Triton's `--model-control-mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ControlMode {
    /// Load everything at start; no load/unload API.
    None,
    /// Like `None`, and rescan the repository for changes periodically.
    Poll,
    /// Load only what start-up or the API asks for.
    Explicit,
}

impl std::str::FromStr for ControlMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "poll" => Ok(Self::Poll),
            "explicit" => Ok(Self::Explicit),
            other => Err(format!(
                "model control mode '{other}' is not one of none, poll, explicit"
            )),
        }
    }
}

/// A loaded version: its scheduler (none for an ensemble, whose steps run
/// on their own models' schedulers) and statistics.
pub struct LoadedVersion {
    pub version: i64,
    scheduler: Option<Batcher>,
    pub stats: Arc<VersionStats>,
}

/// A loaded model: the completed config, its versions and output labels.
pub struct LoadedModel {
    pub spec: ModelDefinition,
    pub versions: BTreeMap<i64, Arc<LoadedVersion>>,
    labels: HashMap<String, Vec<String>>,
    stamp: Stamp,
}

impl LoadedModel {
    /// One of the model's loaded versions.
    pub fn version(&self, v: i64) -> Result<&Arc<LoadedVersion>> {
        self.versions.get(&v).ok_or_else(|| {
            DnnError::not_found(format!(
                "Request for unknown model: '{}' version {v} is not found",
                self.spec.name
            ))
        })
    }
}

/// What a model directory looked like when loaded; a change means reload.
type Stamp = Vec<(PathBuf, SystemTime)>;

/// A row of the repository index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub name: String,
    pub version: String,
    pub state: String,
    pub reason: String,
}

/// An output the client asked for; `classification` = top-k classes.
#[derive(Debug, Clone)]
pub struct RequestedOutput {
    pub name: String,
    pub classification: Option<usize>,
}

#[derive(Debug, Clone)]
pub struct InferRequest {
    pub model: String,
    pub version: Option<i64>,
    pub id: String,
    pub inputs: Vec<Tensor>,
    /// Empty = every output.
    pub outputs: Vec<RequestedOutput>,
    pub timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct InferResponse {
    pub model_name: String,
    pub model_version: String,
    pub id: String,
    pub outputs: Vec<Tensor>,
}

/// The most instances a model may ask for, and the queue bound of models
/// whose config sets none.
pub const DEFAULT_MAX_INSTANCES: usize = 16;
pub const DEFAULT_MAX_QUEUE_SIZE: usize = 1024;

/// What the repository refuses to start, whatever a config asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RepositoryBounds {
    /// `instance_group.count` summed over a model's groups.
    pub max_instances: usize,
    /// The dynamic batcher's queue when the config sets no `max_queue_size`.
    pub default_max_queue_size: usize,
    /// The response cache's size in bytes (Triton's `--cache-config
    /// local,size=N`); 0 = no cache, and models that ask for one are refused.
    pub cache_bytes: usize,
}

impl Default for RepositoryBounds {
    fn default() -> Self {
        Self {
            max_instances: DEFAULT_MAX_INSTANCES,
            default_max_queue_size: DEFAULT_MAX_QUEUE_SIZE,
            cache_bytes: 0,
        }
    }
}

pub struct ModelRepository {
    root: PathBuf,
    pub mode: ControlMode,
    bounds: RepositoryBounds,
    models: RwLock<BTreeMap<String, Arc<LoadedModel>>>,
    /// Models that failed to load, with the reason.
    failed: RwLock<BTreeMap<String, String>>,
    /// Serializes loads and unloads.
    loading: Mutex<()>,
    cache: Option<ResponseCache>,
}

fn is_version_dir(name: &str) -> Option<i64> {
    if name.is_empty() || (name.len() > 1 && name.starts_with('0')) {
        return None;
    }
    name.parse().ok().filter(|v| *v > 0 || name == "0")
}

fn stamp(dir: &Path) -> Stamp {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path.clone());
            }
            if let Ok(m) = e.metadata().and_then(|m| m.modified()) {
                out.push((path, m));
            }
        }
    }
    out.sort();
    out
}

impl ModelRepository {
    /// Opens `root` and loads per `mode`: every model for `none`/`poll`, the
    /// names in `startup` (`*` = all) for `explicit`. A model that fails to
    /// load is logged and listed as UNAVAILABLE; the others serve.
    pub fn open(
        root: &Path,
        mode: ControlMode,
        startup: &[String],
        bounds: RepositoryBounds,
    ) -> std::result::Result<Arc<Self>, String> {
        if !root.is_dir() {
            return Err(format!(
                "model repository {} is not a directory",
                root.display()
            ));
        }
        if mode != ControlMode::Explicit && !startup.is_empty() {
            return Err("--load-model needs --model-control-mode explicit".into());
        }
        let repo = Arc::new(Self {
            root: root.to_path_buf(),
            mode,
            bounds,
            models: RwLock::new(BTreeMap::new()),
            failed: RwLock::new(BTreeMap::new()),
            loading: Mutex::new(()),
            cache: (bounds.cache_bytes > 0).then(|| ResponseCache::new(bounds.cache_bytes)),
        });
        let names = if mode != ControlMode::Explicit || startup.iter().any(|s| s == "*") {
            repo.model_dirs()
        } else {
            startup.to_vec()
        };
        for name in names {
            // An ensemble loads the models its steps name first.
            if repo.models.read().expect("models lock").contains_key(&name)
                || repo.failed.read().expect("failed lock").contains_key(&name)
            {
                continue;
            }
            if let Err(e) = repo.load_inner(&name, None) {
                tracing::error!(model = %name, "failed to load: {e}");
            }
        }
        Ok(repo)
    }

    /// Model directories in the repository, sorted.
    fn model_dirs(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.flatten()
                    .filter(|e| e.path().is_dir())
                    .filter_map(|e| e.file_name().into_string().ok())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }

    fn read_config(&self, name: &str) -> std::result::Result<ModelConfig, String> {
        let path = self.root.join(name).join("config.pbtxt");
        let text =
            std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        proto::model_config::parse_text(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Loads (or reloads) a model, and first the models an ensemble's steps
    /// name that are not loaded yet; on failure the previous load keeps serving.
    fn load_inner(
        &self,
        name: &str,
        config: Option<ModelConfig>,
    ) -> std::result::Result<(), String> {
        self.load_visiting(name, config, &mut Vec::new())
    }

    fn load_visiting(
        &self,
        name: &str,
        config: Option<ModelConfig>,
        visiting: &mut Vec<String>,
    ) -> std::result::Result<(), String> {
        // Read once here; a config that does not read is left for `build`
        // to report.
        let config = config.or_else(|| self.read_config(name).ok());
        let steps = match config.as_ref().and_then(|c| c.scheduling_choice.as_ref()) {
            Some(proto::inference::model_config::SchedulingChoice::EnsembleScheduling(e)) => {
                e.step.clone()
            }
            _ => Vec::new(),
        };
        visiting.push(name.to_string());
        for (i, step) in steps.iter().enumerate() {
            let composing = &step.model_name;
            if visiting.contains(composing) {
                let e = format!(
                    "{}: ensemble_scheduling.step[{i}].model_name: '{composing}' leads back to \
                     '{name}' (ensembles in a cycle: {} -> {composing})",
                    self.root.join(name).join("config.pbtxt").display(),
                    visiting.join(" -> ")
                );
                self.failed
                    .write()
                    .expect("failed lock")
                    .insert(name.to_string(), e.clone());
                visiting.pop();
                return Err(e);
            }
            let loaded = self
                .models
                .read()
                .expect("models lock")
                .contains_key(composing);
            if !loaded {
                // Its own failure is recorded under its name; the ensemble's
                // load then says the step's model is not loaded, and why.
                let _ = self.load_visiting(composing, None, visiting);
            }
        }
        visiting.pop();
        let _guard = self.loading.lock().expect("load lock");
        let result = self.build(name, config);
        match result {
            Ok(model) => {
                tracing::info!(model = %name, versions = ?model.versions.keys().collect::<Vec<_>>(), "model ready");
                self.models
                    .write()
                    .expect("models lock")
                    .insert(name.to_string(), Arc::new(model));
                self.failed.write().expect("failed lock").remove(name);
                Ok(())
            }
            Err(e) => {
                self.failed
                    .write()
                    .expect("failed lock")
                    .insert(name.to_string(), e.clone());
                Err(e)
            }
        }
    }

    fn build(
        &self,
        name: &str,
        config: Option<ModelConfig>,
    ) -> std::result::Result<LoadedModel, String> {
        if name.is_empty() || name.contains(['/', '\\']) || name.starts_with('.') {
            return Err(format!("'{name}' is not a model name"));
        }
        let dir = self.root.join(name);
        if !dir.is_dir() {
            return Err(format!(
                "no model directory {} in the repository",
                dir.display()
            ));
        }
        let stamp = stamp(&dir);
        let config = match config {
            Some(c) => c,
            None => self.read_config(name)?,
        };
        let config_file = dir.join("config.pbtxt");
        let mut spec = ModelDefinition::from_config(name, config)
            .map_err(|e| format!("{}: {e}", config_file.display()))?;
        if spec.instances > self.bounds.max_instances {
            return Err(format!(
                "{}: instance_group: {} instances asked for; at most {} \
                 (model_repository.max_instances)",
                config_file.display(),
                spec.instances,
                self.bounds.max_instances
            ));
        }
        if spec.response_cache && self.cache.is_none() {
            return Err(format!(
                "{}: response_cache.enable: the server has no response cache; start it with \
                 --cache-config local,size=BYTES (model_repository.cache_size)",
                config_file.display()
            ));
        }
        let warmup = super::warmup::samples(&spec, &dir)
            .map_err(|e| format!("{}: {e}", config_file.display()))?;
        let mut available: Vec<i64> = std::fs::read_dir(&dir)
            .map_err(|e| format!("{}: {e}", dir.display()))?
            .flatten()
            .filter(|e| e.path().is_dir())
            .filter_map(|e| e.file_name().to_str().and_then(is_version_dir))
            .collect();
        available.sort_unstable();
        let served = spec.served_versions(&available);
        if served.is_empty() {
            return Err(format!(
                "{}: no version directory to serve (found {available:?}, version_policy {:?})",
                dir.display(),
                spec.config
                    .version_policy
                    .as_ref()
                    .and_then(|p| p.policy_choice.as_ref())
            ));
        }
        let mut labels = HashMap::new();
        for out in &spec.outputs {
            if let Some(file) = &out.label_filename {
                let field = format!("output '{}'.label_filename", out.name);
                let path = backend::confined(&dir, file, &field)?;
                let text = std::fs::read_to_string(&path).map_err(|e| {
                    format!(
                        "output '{}'.label_filename: {}: {e}",
                        out.name,
                        path.display()
                    )
                })?;
                labels.insert(out.name.clone(), text.lines().map(str::to_string).collect());
            }
        }
        let mut versions = BTreeMap::new();
        if let BackendKind::Ensemble(steps) = &spec.backend {
            self.check_steps(&spec, steps)
                .map_err(|e| format!("{}: {e}", config_file.display()))?;
            for v in served {
                let stats = Arc::new(VersionStats::new(name, v));
                versions.insert(
                    v,
                    Arc::new(LoadedVersion {
                        version: v,
                        scheduler: None,
                        stats,
                    }),
                );
            }
            return Ok(LoadedModel {
                spec,
                versions,
                labels,
                stamp,
            });
        }
        for v in served {
            let vdir = dir.join(v.to_string());
            tracing::info!(model = %name, version = v, "loading {}", vdir.join(&spec.model_filename).display());
            let (backend, executor) = backend::load(&spec.model_view(), &vdir)
                .map_err(|e| format!("version {v}: {e}"))?;
            tracing::info!(model = %name, version = v, executor, "loaded");
            spec.config.parameters.insert(
                "executor".into(),
                proto::inference::ModelParameter {
                    string_value: executor.into(),
                },
            );
            let stats = Arc::new(VersionStats::new(name, v));
            for sample in &warmup {
                run_warmup(&spec, backend.as_ref(), &stats, sample)
                    .map_err(|e| format!("version {v}: model_warmup '{}': {e}", sample.name))?;
            }
            let scheduler = Batcher::start(
                &spec,
                backend,
                stats.clone(),
                self.bounds.default_max_queue_size,
            )
            .map_err(|e| format!("version {v}: {e}"))?;
            versions.insert(
                v,
                Arc::new(LoadedVersion {
                    version: v,
                    scheduler: Some(scheduler),
                    stats,
                }),
            );
        }
        Ok(LoadedModel {
            spec,
            versions,
            labels,
            stamp,
        })
    }

    /// An ensemble's steps against the models they name: loaded (in the
    /// version asked for), every input of the step's model fed, only its own
    /// tensor names mapped, datatypes agreeing with the ensemble's tensors.
    fn check_steps(
        &self,
        spec: &ModelDefinition,
        steps: &[EnsembleStep],
    ) -> std::result::Result<(), String> {
        for step in steps {
            let at = format!("ensemble_scheduling.step[{}]", step.index);
            let model = match self.model(&step.model_name) {
                Ok(m) => m,
                Err(e) => {
                    return Err(format!(
                        "{at}.model_name: '{}' cannot serve: {}",
                        step.model_name, e.message
                    ))
                }
            };
            if let Some(v) = step.model_version {
                model
                    .version(v)
                    .map_err(|e| format!("{at}.model_version: {}", e.message))?;
            }
            let m = &model.spec;
            check_map(
                &at,
                "input_map",
                step,
                &step.input_map,
                &m.inputs,
                &spec.inputs,
            )?;
            if let Some(t) = m
                .inputs
                .iter()
                .find(|t| !step.input_map.iter().any(|(i, _)| i == &t.name))
            {
                return Err(format!(
                    "{at}.input_map: '{}' needs its input '{}' mapped",
                    step.model_name, t.name
                ));
            }
            check_map(
                &at,
                "output_map",
                step,
                &step.output_map,
                &m.outputs,
                &spec.outputs,
            )?;
        }
        Ok(())
    }

    /// Runs an ensemble's steps in order, each on its own model (and that
    /// model's batcher), tensors handed from step to step in memory.
    async fn run_ensemble(
        &self,
        spec: &ModelDefinition,
        steps: &[EnsembleStep],
        id: &str,
        inputs: Vec<Tensor>,
        timeout: Option<Duration>,
    ) -> Result<Vec<Tensor>> {
        let mut tensors: HashMap<String, Tensor> =
            inputs.into_iter().map(|t| (t.name.clone(), t)).collect();
        for step in steps {
            let inputs = step
                .input_map
                .iter()
                .map(|(input, tensor)| {
                    let mut t = tensors[tensor].clone();
                    t.name = input.clone();
                    t
                })
                .collect();
            let response = self
                .infer_boxed(InferRequest {
                    model: step.model_name.clone(),
                    version: step.model_version,
                    id: id.to_string(),
                    inputs,
                    outputs: Vec::new(),
                    timeout,
                })
                .await
                .map_err(|e| DnnError {
                    message: format!(
                        "ensemble '{}' step {} ('{}'): {}",
                        spec.name, step.index, step.model_name, e.message
                    ),
                    ..e
                })?;
            for (output, tensor) in &step.output_map {
                let mut t = response
                    .outputs
                    .iter()
                    .find(|t| &t.name == output)
                    .cloned()
                    .ok_or_else(|| {
                        DnnError::internal(format!(
                            "'{}' gave no output '{output}'",
                            step.model_name
                        ))
                    })?;
                t.name = tensor.clone();
                tensors.insert(tensor.clone(), t);
            }
        }
        spec.outputs
            .iter()
            .map(|o| {
                tensors.remove(&o.name).ok_or_else(|| {
                    DnnError::internal(format!("no step produced output '{}'", o.name))
                })
            })
            .collect()
    }

    fn infer_boxed(
        &self,
        req: InferRequest,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<InferResponse>> + Send + '_>>
    {
        Box::pin(self.infer(req))
    }

    /// Load and unload belong to `explicit` mode, as in Triton.
    fn explicit_only(&self) -> Result<()> {
        if self.mode == ControlMode::Explicit {
            return Ok(());
        }
        Err(DnnError::unsupported(format!(
            "explicit model load / unload is not allowed if model control mode is {:?}; \
             start with --model-control-mode explicit",
            self.mode
        )))
    }

    /// The model control API: load (or reload) `name`, with an optional config override.
    pub fn load(&self, name: &str, config: Option<ModelConfig>) -> Result<()> {
        self.explicit_only()?;
        self.load_inner(name, config)
            .map_err(|e| DnnError::invalid(format!("failed to load '{name}': {e}")))
    }

    /// Unloads `name`; queued requests still finish.
    pub fn unload(&self, name: &str) -> Result<()> {
        self.explicit_only()?;
        let _guard = self.loading.lock().expect("load lock");
        self.failed.write().expect("failed lock").remove(name);
        match self.models.write().expect("models lock").remove(name) {
            Some(_) => {
                tracing::info!(model = %name, "unloaded");
                Ok(())
            }
            None => Err(DnnError::invalid(format!(
                "failed to unload '{name}', no version is available"
            ))),
        }
    }

    /// One pass of POLL mode: reload changed models, load new ones, unload removed ones.
    pub fn poll(&self) {
        let dirs = self.model_dirs();
        let loaded: Vec<(String, Stamp)> = self
            .models
            .read()
            .expect("models lock")
            .iter()
            .map(|(n, m)| (n.clone(), m.stamp.clone()))
            .collect();
        for (name, old) in &loaded {
            if !dirs.contains(name) {
                self.models.write().expect("models lock").remove(name);
                tracing::info!(model = %name, "removed from the repository; unloaded");
            } else if &stamp(&self.root.join(name)) != old {
                if let Err(e) = self.load_inner(name, None) {
                    tracing::error!(model = %name, "reload failed, the loaded version keeps serving: {e}");
                }
            }
        }
        for name in dirs {
            if loaded.iter().any(|(n, _)| n == &name) {
                continue;
            }
            let failed_before = self.failed.read().expect("failed lock").contains_key(&name);
            if let Err(e) = self.load_inner(&name, None) {
                if !failed_before {
                    tracing::error!(model = %name, "failed to load: {e}");
                }
            }
        }
    }

    pub fn model(&self, name: &str) -> Result<Arc<LoadedModel>> {
        if let Some(m) = self.models.read().expect("models lock").get(name) {
            return Ok(m.clone());
        }
        match self.failed.read().expect("failed lock").get(name) {
            Some(reason) => Err(DnnError::unavailable(format!(
                "model '{name}' is not ready: {reason}"
            ))),
            None => Err(DnnError::not_found(format!(
                "Request for unknown model: '{name}' is not found"
            ))),
        }
    }

    /// A model and one of its versions (`None` = the highest loaded).
    pub fn version(
        &self,
        name: &str,
        version: Option<i64>,
    ) -> Result<(Arc<LoadedModel>, Arc<LoadedVersion>)> {
        let model = self.model(name)?;
        let v = match version {
            Some(v) => model.version(v)?.clone(),
            None => model
                .versions
                .values()
                .next_back()
                .cloned()
                .expect("a loaded model has versions"),
        };
        Ok((model, v))
    }

    /// Every model in the repository (and every loaded version), with its state.
    pub fn index(&self, ready_only: bool) -> Vec<IndexEntry> {
        let dirs = self.model_dirs();
        let models = self.models.read().expect("models lock");
        let failed = self.failed.read().expect("failed lock");
        let mut out = Vec::new();
        for name in dirs {
            if let Some(m) = models.get(&name) {
                out.extend(m.versions.keys().map(|v| IndexEntry {
                    name: name.clone(),
                    version: v.to_string(),
                    state: "READY".into(),
                    reason: String::new(),
                }));
            } else if !ready_only {
                out.push(IndexEntry {
                    name: name.clone(),
                    version: String::new(),
                    state: "UNAVAILABLE".into(),
                    reason: failed
                        .get(&name)
                        .cloned()
                        .unwrap_or_else(|| "unloaded".into()),
                });
            }
        }
        out
    }

    /// Statistics of every loaded version, or of one model (and version).
    pub fn stats(
        &self,
        name: Option<&str>,
        version: Option<i64>,
    ) -> Result<Vec<(String, i64, StatsSnapshot)>> {
        let models: Vec<(String, Arc<LoadedModel>)> = match name {
            Some(n) => vec![(n.to_string(), self.model(n)?)],
            None => self
                .models
                .read()
                .expect("models lock")
                .iter()
                .map(|(n, m)| (n.clone(), m.clone()))
                .collect(),
        };
        let mut out = Vec::new();
        for (n, m) in models {
            if let Some(v) = version {
                out.push((n.clone(), v, m.version(v)?.stats.snapshot()));
            } else {
                out.extend(
                    m.versions
                        .iter()
                        .map(|(v, lv)| (n.clone(), *v, lv.stats.snapshot())),
                );
            }
        }
        Ok(out)
    }

    /// Checks `req` against the model's config and runs it through the batcher.
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse> {
        let (model, version) = self.version(&req.model, req.version)?;
        let spec = &model.spec;
        let (inputs, rows) = check_inputs(spec, req.inputs)?;
        for o in &req.outputs {
            if !spec.outputs.iter().any(|t| t.name == o.name) {
                return Err(DnnError::invalid(format!(
                    "unexpected inference output '{}' for model '{}'",
                    o.name, spec.name
                )));
            }
        }
        let cache = self.cache.as_ref().filter(|_| spec.response_cache);
        let lookup = std::time::Instant::now();
        let key = cache.map(|_| super::cache::key(&spec.name, version.version, &inputs));
        let cached = cache.zip(key.as_ref()).and_then(|(c, k)| c.get(k));
        let outputs = match cached {
            Some(outputs) => {
                version.stats.cache(true, lookup.elapsed());
                outputs
            }
            None => {
                let looked_up = lookup.elapsed();
                let outputs = match (&version.scheduler, &spec.backend) {
                    (Some(scheduler), _) => {
                        let rx = scheduler.submit(to_model(spec, inputs)?, rows, req.timeout)?;
                        let outputs: Vec<Tensor> = rx.await.map_err(|_| {
                            DnnError::internal("the model was unloaded before answering")
                        })??;
                        let batching = spec.max_batch_size > 0;
                        outputs
                            .into_iter()
                            .zip(&spec.outputs)
                            .map(|(t, s)| {
                                reshaped(t, s.reshape.is_some().then_some(&s.dims[..]), batching)
                            })
                            .collect::<Result<Vec<_>>>()?
                    }
                    (None, BackendKind::Ensemble(steps)) => {
                        let start = std::time::Instant::now();
                        let run = self
                            .run_ensemble(spec, steps, &req.id, inputs, req.timeout)
                            .await;
                        version.stats.ensemble(rows, start.elapsed(), run.is_ok());
                        run?
                    }
                    (None, _) => unreachable!("only ensembles load without a scheduler"),
                };
                if let (Some(c), Some(k)) = (cache, key) {
                    let insert = std::time::Instant::now();
                    c.insert(k, outputs.clone());
                    version.stats.cache(false, looked_up + insert.elapsed());
                }
                outputs
            }
        };
        let outputs = if req.outputs.is_empty() {
            outputs
        } else {
            req.outputs
                .iter()
                .map(|o| {
                    let t = outputs.iter().find(|t| t.name == o.name).ok_or_else(|| {
                        DnnError::internal(format!("the backend produced no '{}'", o.name))
                    })?;
                    match o.classification {
                        Some(k) => {
                            classify(t, k, model.labels.get(&o.name), spec.max_batch_size > 0)
                        }
                        None => Ok(t.clone()),
                    }
                })
                .collect::<Result<_>>()?
        };
        Ok(InferResponse {
            model_name: spec.name.clone(),
            model_version: version.version.to_string(),
            id: req.id,
            outputs,
        })
    }
}

/// One of a step's maps (its model's tensor → an ensemble tensor): every
/// name the step model's, and datatypes agreeing with the ensemble's own
/// inputs or outputs of that name.
fn check_map(
    at: &str,
    field: &str,
    step: &EnsembleStep,
    map: &[(String, String)],
    model: &[super::model::TensorDefinition],
    ensemble: &[super::model::TensorDefinition],
) -> std::result::Result<(), String> {
    let kind = &field[..field.len() - "_map".len()];
    for (own, tensor) in map {
        let t = model.iter().find(|t| &t.name == own).ok_or_else(|| {
            format!(
                "{at}.{field}: '{own}' is not an {kind} of '{}'",
                step.model_name
            )
        })?;
        if let Some(outer) = ensemble.iter().find(|o| &o.name == tensor) {
            if outer.dtype != t.dtype {
                return Err(format!(
                    "{at}.{field}: ensemble {kind} '{tensor}' is {}, but '{}' has '{own}' as {}",
                    outer.dtype.wire(),
                    step.model_name,
                    t.dtype.wire()
                ));
            }
        }
    }
    Ok(())
}

/// Runs a warmup sample `count` times on the backend directly (the model is
/// not serving yet), as the request path would: checked, reshaped, and
/// counted in the version's statistics.
fn run_warmup(
    spec: &ModelDefinition,
    backend: &dyn backend::Backend,
    stats: &VersionStats,
    sample: &super::warmup::Sample,
) -> std::result::Result<(), String> {
    let (inputs, rows) = check_inputs(spec, sample.inputs.clone()).map_err(|e| e.message)?;
    let inputs = to_model(spec, inputs).map_err(|e| e.message)?;
    for _ in 0..sample.count {
        let start = std::time::Instant::now();
        backend.execute(&inputs).map_err(|e| e.message)?;
        let took = start.elapsed();
        stats.execution(&super::stats::Execution {
            requests: 1,
            rows: rows as u64,
            compute_input: Duration::ZERO,
            compute_infer: took,
            compute_output: Duration::ZERO,
        });
        stats.success(Duration::ZERO, took);
    }
    tracing::info!(model = %spec.name, sample = %sample.name, runs = sample.count, "warmup ran");
    Ok(())
}

/// Inputs as the model takes them: each `reshape.shape` applied.
fn to_model(spec: &ModelDefinition, inputs: Vec<Tensor>) -> Result<Vec<Tensor>> {
    let batching = spec.max_batch_size > 0;
    inputs
        .into_iter()
        .zip(&spec.inputs)
        .map(|(t, s)| reshaped(t, s.reshape.as_deref(), batching))
        .collect()
}

/// Puts inputs in config order after checking names, datatypes, shapes,
/// batch size and data length; returns them with the batch size.
fn check_inputs(spec: &ModelDefinition, mut given: Vec<Tensor>) -> Result<(Vec<Tensor>, usize)> {
    let name = &spec.name;
    for (i, t) in given.iter().enumerate() {
        if !spec.inputs.iter().any(|s| s.name == t.name) {
            return Err(DnnError::invalid(format!(
                "unexpected inference input '{}' for model '{name}'",
                t.name
            )));
        }
        if given[..i].iter().any(|o| o.name == t.name) {
            return Err(DnnError::invalid(format!(
                "input '{}' is given twice",
                t.name
            )));
        }
    }
    let missing: Vec<&str> = spec
        .inputs
        .iter()
        .filter(|s| !given.iter().any(|t| t.name == s.name))
        .map(|s| s.name.as_str())
        .collect();
    if !missing.is_empty() {
        return Err(DnnError::invalid(format!(
            "expected {} inputs but got {} inputs for model '{name}'; missing: {}",
            spec.inputs.len(),
            given.len(),
            missing.join(", ")
        )));
    }
    let batching = spec.max_batch_size > 0;
    let mut rows = None;
    let mut ordered = Vec::with_capacity(spec.inputs.len());
    for s in &spec.inputs {
        let pos = given
            .iter()
            .position(|t| t.name == s.name)
            .expect("checked above");
        let t = given.swap_remove(pos);
        if t.dtype != s.dtype {
            return Err(DnnError::invalid(format!(
                "inference input '{}' data-type is '{}', but model '{name}' expects '{}'",
                t.name,
                t.dtype.wire(),
                s.dtype.wire()
            )));
        }
        let inner = if batching {
            t.shape.get(1..)
        } else {
            Some(t.shape.as_slice())
        };
        let ok = inner.is_some_and(|inner| {
            inner.len() == s.dims.len()
                && inner.iter().zip(&s.dims).all(|(&g, &w)| w == -1 || g == w)
        });
        if !ok {
            let want = spec.metadata_shape(s);
            return Err(DnnError::invalid(format!(
                "unexpected shape for input '{}' for model '{name}'. Expected {want:?}, got {:?}",
                t.name, t.shape
            )));
        }
        let r = if batching { t.shape[0] } else { 1 };
        if batching && (r < 1 || r as usize > spec.max_batch_size) {
            return Err(DnnError::invalid(format!(
                "inference request batch-size must be <= {} for '{name}' (got {r})",
                spec.max_batch_size
            )));
        }
        if rows.is_some_and(|rows| rows != r) {
            return Err(DnnError::invalid(format!(
                "input '{}' has batch size {r}, but other inputs have {}",
                t.name,
                rows.unwrap_or_default()
            )));
        }
        rows = Some(r);
        t.check_size()?;
        ordered.push(t);
    }
    Ok((ordered, rows.unwrap_or(1) as usize))
}

/// `t` with `target` (without the batch dimension) as its shape, its
/// variable dimension resolved from the element count: `reshape` applied to
/// an input, or undone on an output. `None` leaves it as it is.
fn reshaped(mut t: Tensor, target: Option<&[i64]>, batching: bool) -> Result<Tensor> {
    let Some(target) = target else { return Ok(t) };
    let rows = if batching {
        t.shape.first().copied()
    } else {
        None
    };
    let elements = t.element_count()?;
    let per_row = match rows {
        Some(r) if r > 0 => elements / r as usize,
        _ => elements,
    };
    let shape = super::model::resolve_shape(target, per_row).ok_or_else(|| {
        DnnError::invalid(format!(
            "'{}' has shape {:?}, which cannot be reshaped to {target:?}",
            t.name, t.shape
        ))
    })?;
    t.shape = rows.into_iter().chain(shape).collect();
    Ok(t)
}

/// Triton's classification extension: the top `k` entries of each row as
/// BYTES `"value:index[:label]"`, highest first.
fn classify(t: &Tensor, k: usize, labels: Option<&Vec<String>>, batching: bool) -> Result<Tensor> {
    let values = t.to_f32()?;
    let classes = *t.shape.last().unwrap_or(&1) as usize;
    if classes == 0 || k == 0 {
        return Err(DnnError::invalid(format!(
            "output '{}': classification needs a count of 1 or more",
            t.name
        )));
    }
    let k = k.min(classes);
    let mut elements: Vec<Vec<u8>> = Vec::new();
    for row in values.chunks(classes) {
        let mut idx: Vec<usize> = (0..row.len()).collect();
        idx.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        for &i in &idx[..k] {
            let label = labels
                .and_then(|l| l.get(i))
                .map(|l| format!(":{l}"))
                .unwrap_or_default();
            elements.push(format!("{:.6}:{i}{label}", row[i]).into_bytes());
        }
    }
    let rows = values.len() / classes;
    let shape = if batching {
        vec![rows as i64, k as i64]
    } else {
        vec![k as i64]
    };
    let data = encode_bytes(elements.iter().map(|e| e.as_slice()));
    debug_assert_eq!(bytes_elements(&data).map(|e| e.len()).ok(), Some(rows * k));
    Ok(Tensor::new(
        t.name.clone(),
        super::tensor::DataType::Bytes,
        shape,
        data,
    ))
}
