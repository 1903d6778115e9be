//! A model's configuration as the plane runs it: config.pbtxt validated and
//! completed the way Triton completes it, each error naming file and field.
use super::tensor::DataType;
use proto::inference::{
    model_config::SchedulingChoice, model_instance_group::Kind, model_version_policy, ModelConfig,
    ModelInstanceGroup, ModelVersionPolicy,
};
use std::time::Duration;

/// One input or output as the config declares it (`dims` without the batch dimension).
#[derive(Debug, Clone)]
pub struct TensorDefinition {
    pub name: String,
    pub dtype: DataType,
    pub dims: Vec<i64>,
    /// `reshape.shape`: the shape the model itself takes or gives (without
    /// the batch dimension) where it differs from what clients see.
    pub reshape: Option<Vec<i64>>,
    pub label_filename: Option<String>,
}

impl TensorDefinition {
    /// The shape the model sees, without the batch dimension.
    pub fn model_dims(&self) -> &[i64] {
        self.reshape.as_deref().unwrap_or(&self.dims)
    }
}

/// `target` with its one variable dimension (if any) resolved so that it
/// holds `elements` elements; `None` when it cannot.
pub fn resolve_shape(target: &[i64], elements: usize) -> Option<Vec<i64>> {
    let known: i64 = target.iter().filter(|&&d| d >= 0).product();
    match target.iter().filter(|&&d| d < 0).count() {
        0 => (known as usize == elements).then(|| target.to_vec()),
        1 if known > 0 && elements.is_multiple_of(known as usize) => Some(
            target
                .iter()
                .map(|&d| if d < 0 { elements as i64 / known } else { d })
                .collect(),
        ),
        _ => None,
    }
}

/// Checks `reshape.shape` against `dims` as Triton does: the same element
/// count, or a variable dimension on both sides (one, in the reshape).
fn reshape_spec(
    field: &str,
    name: &str,
    dims: &[i64],
    reshape: Option<&proto::inference::ModelTensorReshape>,
) -> Result<Option<Vec<i64>>, String> {
    let Some(r) = reshape else { return Ok(None) };
    let shape = &r.shape;
    if let Some(d) = shape.iter().find(|&&d| d < -1 || d == 0) {
        return Err(format!(
            "{field} ('{name}').reshape.shape: {d} is not a size (use -1 for a variable dimension)"
        ));
    }
    let variable = |s: &[i64]| s.iter().filter(|&&d| d < 0).count();
    let count = |s: &[i64]| s.iter().product::<i64>();
    let ok = match (variable(dims), variable(shape)) {
        (0, 0) => count(dims) == count(shape),
        (v, 1) if v > 0 => true,
        _ => false,
    };
    if !ok {
        return Err(format!(
            "{field} ('{name}').reshape.shape {shape:?} must hold as many elements as dims              {dims:?} (a variable dimension in dims needs exactly one in the reshape)"
        ));
    }
    Ok(Some(shape.clone()))
}

/// Which executor runs the model.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendKind {
    /// An ONNX graph, on the executor `parameters["executor"]` names.
    Onnx(OnnxExecutor),
    /// A tree ensemble, declared as Triton's FIL backend declares it.
    Fil(FilParams),
    /// A candle sentence encoder (BERT family, mean pooling, L2 normalized).
    SentenceEncoder,
    /// A graph of other models (`platform: ensemble`), its steps in an order
    /// that runs every producer before its consumers.
    Ensemble(Vec<EnsembleStep>),
}

/// One step of an ensemble: a model, and which ensemble tensors feed its
/// inputs (`input_map`: its input → tensor) and take its outputs
/// (`output_map`: its output → tensor).
#[derive(Debug, Clone, PartialEq)]
pub struct EnsembleStep {
    /// Its index in `ensemble_scheduling.step`, for errors.
    pub index: usize,
    pub model_name: String,
    /// `None` = the model's latest (`model_version: -1`).
    pub model_version: Option<i64>,
    pub input_map: Vec<(String, String)>,
    pub output_map: Vec<(String, String)>,
}

/// Checks an ensemble's tensor graph and orders its steps: every tensor a
/// step reads is an ensemble input or another step's output, each tensor
/// has one producer, every output is produced, and the steps form no cycle.
fn ensemble_steps(
    e: &proto::inference::ModelEnsembling,
    inputs: &[TensorDefinition],
    outputs: &[TensorDefinition],
) -> Result<Vec<EnsembleStep>, String> {
    if e.step.is_empty() {
        return Err("ensemble_scheduling.step: an ensemble needs at least one step".into());
    }
    let sorted = |m: &std::collections::HashMap<String, String>| {
        let mut v: Vec<(String, String)> = m.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        v.sort();
        v
    };
    let mut steps = Vec::new();
    let mut producer: std::collections::HashMap<&str, usize> = std::collections::HashMap::new();
    for t in inputs {
        producer.insert(&t.name, usize::MAX);
    }
    for (i, s) in e.step.iter().enumerate() {
        let at = format!("ensemble_scheduling.step[{i}]");
        if s.model_name.is_empty() {
            return Err(format!("{at}.model_name must be set"));
        }
        if s.model_version < -1 {
            return Err(format!(
                "{at}.model_version: {} is not a version (-1 = latest)",
                s.model_version
            ));
        }
        if s.input_map.is_empty() || s.output_map.is_empty() {
            return Err(format!(
                "{at}: input_map and output_map must each map at least one tensor"
            ));
        }
        for tensor in s.output_map.values() {
            if let Some(&other) = producer.get(tensor.as_str()) {
                let by = if other == usize::MAX {
                    "an ensemble input".to_string()
                } else {
                    format!("step[{other}]")
                };
                return Err(format!(
                    "{at}.output_map: tensor '{tensor}' is already produced by {by}"
                ));
            }
            producer.insert(tensor, i);
        }
        steps.push(EnsembleStep {
            index: i,
            model_name: s.model_name.clone(),
            model_version: (s.model_version >= 0).then_some(s.model_version),
            input_map: sorted(&s.input_map),
            output_map: sorted(&s.output_map),
        });
    }
    for s in &steps {
        for (_, tensor) in &s.input_map {
            if !producer.contains_key(tensor.as_str()) {
                return Err(format!(
                    "ensemble_scheduling.step[{}].input_map: tensor '{tensor}' is neither an \
                     ensemble input nor any step's output",
                    s.index
                ));
            }
        }
    }
    for t in outputs {
        if !producer.contains_key(t.name.as_str()) {
            return Err(format!(
                "output '{}': no step of ensemble_scheduling produces it",
                t.name
            ));
        }
    }
    // Kahn's order over steps; what is left over lies on a cycle.
    let mut ready: Vec<&str> = inputs.iter().map(|t| t.name.as_str()).collect();
    let mut ordered = Vec::new();
    let mut left: Vec<&EnsembleStep> = steps.iter().collect();
    while !left.is_empty() {
        let Some(pos) = left
            .iter()
            .position(|s| s.input_map.iter().all(|(_, t)| ready.contains(&t.as_str())))
        else {
            let names: Vec<String> = left.iter().map(|s| format!("step[{}]", s.index)).collect();
            return Err(format!(
                "ensemble_scheduling: {} read each other's outputs in a cycle",
                names.join(", ")
            ));
        };
        let s = left.remove(pos);
        ready.extend(s.output_map.iter().map(|(_, t)| t.as_str()));
        ordered.push(s.clone());
    }
    Ok(ordered)
}

/// Which runtime runs an ONNX model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnnxExecutor {
    /// tract where it can run the graph, onnxruntime where it refuses it
    /// (onnxruntime alone in a build without the `tract` feature).
    Auto,
    /// tract, a pure-Rust runtime in the binary.
    #[cfg(feature = "tract")]
    Tract,
    /// onnxruntime, loaded from the library the server names.
    OnnxRuntime,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FilParams {
    pub model_type: String,
    pub is_classifier: bool,
    pub predict_proba: bool,
    pub threshold: f32,
}

/// Triton's dynamic batcher settings.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchingPolicy {
    pub preferred_batch_sizes: Vec<usize>,
    pub max_queue_delay: Duration,
    /// 0 = unbounded.
    pub max_queue_size: usize,
    pub default_timeout: Option<Duration>,
    pub allow_timeout_override: bool,
}

#[derive(Debug, Clone)]
pub struct ModelDefinition {
    pub name: String,
    /// The completed config, as `GET /v2/models/{m}/config` returns it.
    pub config: ModelConfig,
    pub max_batch_size: usize,
    pub inputs: Vec<TensorDefinition>,
    pub outputs: Vec<TensorDefinition>,
    pub dynamic_batching: Option<BatchingPolicy>,
    pub instances: usize,
    pub backend: BackendKind,
    pub model_filename: String,
    /// `response_cache.enable`.
    pub response_cache: bool,
}

fn tensor_spec(
    field: &str,
    name: &str,
    data_type: i32,
    dims: &[i64],
    batching: bool,
) -> Result<TensorDefinition, String> {
    if name.is_empty() {
        return Err(format!("{field}.name must be set"));
    }
    let dtype = DataType::from_config(data_type)
        .ok_or_else(|| format!("{field} ('{name}').data_type must be set to a TYPE_*"))?;
    if dims.is_empty() && !batching {
        return Err(format!(
            "{field} ('{name}').dims must be set (max_batch_size is 0, so dims is the full shape)"
        ));
    }
    if let Some(d) = dims.iter().find(|&&d| d < -1 || d == 0) {
        return Err(format!(
            "{field} ('{name}').dims: {d} is not a size (use -1 for a variable dimension)"
        ));
    }
    Ok(TensorDefinition {
        name: name.to_string(),
        dtype,
        dims: dims.to_vec(),
        reshape: None,
        label_filename: None,
    })
}

fn parameter<'a>(config: &'a ModelConfig, key: &str) -> Option<&'a str> {
    config.parameters.get(key).map(|p| p.string_value.as_str())
}

fn bool_parameter(config: &ModelConfig, key: &str, default: bool) -> Result<bool, String> {
    match parameter(config, key) {
        None => Ok(default),
        Some(v) => match v.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" => Ok(true),
            "false" | "0" | "no" => Ok(false),
            _ => Err(format!(
                "parameters[\"{key}\"]: '{v}' is not a boolean (true or false)"
            )),
        },
    }
}

fn backend_kind(config: &ModelConfig) -> Result<(BackendKind, &'static str), String> {
    match (config.platform.as_str(), config.backend.as_str()) {
        ("onnxruntime_onnx", "" | "onnxruntime") | ("", "onnxruntime") => {
            let executor = match parameter(config, "executor").unwrap_or("auto") {
                "auto" => OnnxExecutor::Auto,
                #[cfg(feature = "tract")]
                "tract" => OnnxExecutor::Tract,
                #[cfg(not(feature = "tract"))]
                "tract" => {
                    return Err("parameters[\"executor\"]: 'tract' is not in this build \
                        (it was built without the `tract` feature); use auto or onnxruntime, \
                        or build with the default features"
                        .into())
                }
                "onnxruntime" => OnnxExecutor::OnnxRuntime,
                other => {
                    return Err(format!(
                        "parameters[\"executor\"]: '{other}' is not one of auto, tract, onnxruntime"
                    ))
                }
            };
            Ok((BackendKind::Onnx(executor), "model.onnx"))
        }
        ("", "fil") => {
            let model_type = parameter(config, "model_type").unwrap_or("xgboost_json");
            let file = match model_type {
                "xgboost_json" => "xgboost.json",
                "xgboost_ubj" => "xgboost.ubj",
                "lightgbm" => "model.txt",
                other => {
                    return Err(format!(
                        "parameters[\"model_type\"]: '{other}' is not supported \
                         (supported: xgboost_json, xgboost_ubj, lightgbm)"
                    ))
                }
            };
            let threshold = match parameter(config, "threshold") {
                None => 0.5,
                Some(t) => t
                    .parse()
                    .map_err(|_| format!("parameters[\"threshold\"]: '{t}' is not a number"))?,
            };
            let is_classifier = bool_parameter(config, "is_classifier", false)?
                || bool_parameter(config, "output_class", false)?;
            Ok((
                BackendKind::Fil(FilParams {
                    model_type: model_type.to_string(),
                    is_classifier,
                    predict_proba: bool_parameter(config, "predict_proba", false)?,
                    threshold,
                }),
                file,
            ))
        }
        ("ensemble", "") => match &config.scheduling_choice {
            // The steps are checked against the declared tensors by the caller.
            Some(SchedulingChoice::EnsembleScheduling(_)) => {
                Ok((BackendKind::Ensemble(Vec::new()), ""))
            }
            _ => Err("ensemble_scheduling: platform ensemble needs its steps".into()),
        },
        ("", "candle") => match parameter(config, "model_type") {
            Some("sentence_encoder") => Ok((BackendKind::SentenceEncoder, "model.safetensors")),
            other => Err(format!(
                "parameters[\"model_type\"]: {other:?} is not a candle model type \
                 (supported: sentence_encoder)"
            )),
        },
        (platform, backend) => Err(format!(
            "platform '{platform}' / backend '{backend}' is not supported \
             (supported: platform onnxruntime_onnx or backend onnxruntime, platform ensemble, \
             backend fil, backend candle)"
        )),
    }
}

/// Settings of Triton's config that this plane does not apply, each refused
/// by name rather than ignored.
fn refuse_unapplied(config: &ModelConfig, backend: &BackendKind) -> Result<(), String> {
    for (i, t) in config.input.iter().enumerate() {
        let at = format!("input[{i}] ('{}')", t.name);
        if t.optional {
            return Err(format!(
                "{at}.optional: optional inputs are not supported; every input is required"
            ));
        }
        if t.is_shape_tensor || t.allow_ragged_batch || t.is_non_linear_format_io {
            return Err(format!(
                "{at}: shape tensors, ragged batches and non-linear formats are not supported"
            ));
        }
    }
    let o = config.optimization.clone().unwrap_or_default();
    let accelerators = o.execution_accelerators.unwrap_or_default();
    let cuda = o.cuda.unwrap_or_default();
    let checks = [
        (
            config
                .output
                .iter()
                .any(|t| t.is_shape_tensor || t.is_non_linear_format_io),
            "output",
            "shape tensors and non-linear formats are not supported",
        ),
        (
            !config.batch_input.is_empty() || !config.batch_output.is_empty(),
            "batch_input / batch_output",
            "not supported",
        ),
        (
            !config.runtime.is_empty(),
            "runtime",
            "backends run in the server; no other runtime is loaded",
        ),
        (
            !config.cc_model_filenames.is_empty(),
            "cc_model_filenames",
            "there is no GPU to pick a file for; use default_model_filename",
        ),
        (
            config
                .model_operations
                .as_ref()
                .is_some_and(|o| !o.op_library_filename.is_empty()),
            "model_operations.op_library_filename",
            "custom operator libraries are not loaded",
        ),
        (
            config
                .model_repository_agents
                .as_ref()
                .is_some_and(|a| !a.agents.is_empty()),
            "model_repository_agents",
            "repository agents are not supported",
        ),
        (
            config
                .model_transaction_policy
                .as_ref()
                .is_some_and(|p| p.decoupled),
            "model_transaction_policy.decoupled",
            "repository models answer each request once",
        ),
        (
            o.graph.is_some_and(|g| g.level != 0) && !matches!(backend, BackendKind::Onnx(_)),
            "optimization.graph.level",
            "applies to ONNX models (on onnxruntime) only",
        ),
        (
            !accelerators.gpu_execution_accelerator.is_empty()
                || !accelerators.cpu_execution_accelerator.is_empty(),
            "optimization.execution_accelerators",
            "no execution accelerator is available",
        ),
        (
            cuda.graphs || cuda.busy_wait_events || cuda.output_copy_stream,
            "optimization.cuda",
            "there is no GPU",
        ),
        (
            o.priority != 0 || o.eager_batching,
            "optimization.priority / eager_batching",
            "not supported",
        ),
    ];
    match checks.iter().find(|(refused, _, _)| *refused) {
        Some((_, field, why)) => Err(format!("{field}: {why}")),
        None => Ok(()),
    }
}

impl ModelDefinition {
    /// Validates and completes `config` for the model in directory `dir_name`.
    /// Errors name the field; the caller prefixes the file.
    pub fn from_config(dir_name: &str, mut config: ModelConfig) -> Result<Self, String> {
        if config.name.is_empty() {
            config.name = dir_name.to_string();
        } else if config.name != dir_name {
            return Err(format!(
                "name: '{}' must match the model's directory name '{dir_name}'",
                config.name
            ));
        }
        if config.max_batch_size < 0 {
            return Err(format!(
                "max_batch_size: {} must be 0 (no batching) or more",
                config.max_batch_size
            ));
        }
        let max_batch_size = config.max_batch_size as usize;
        let batching = max_batch_size > 0;
        let (mut backend, default_file) = backend_kind(&config)?;
        refuse_unapplied(&config, &backend)?;
        if matches!(backend, BackendKind::Onnx(_)) {
            config.platform = "onnxruntime_onnx".into();
            config.backend = "onnxruntime".into();
        }
        if config.input.is_empty() {
            return Err("input: the model declares no inputs".into());
        }
        if config.output.is_empty() {
            return Err("output: the model declares no outputs".into());
        }
        let inputs = config
            .input
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let field = format!("input[{i}]");
                let mut spec = tensor_spec(&field, &t.name, t.data_type, &t.dims, batching)?;
                spec.reshape = reshape_spec(&field, &t.name, &t.dims, t.reshape.as_ref())?;
                Ok(spec)
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut outputs = Vec::new();
        for (i, t) in config.output.iter().enumerate() {
            let field = format!("output[{i}]");
            let mut spec = tensor_spec(&field, &t.name, t.data_type, &t.dims, batching)?;
            spec.reshape = reshape_spec(&field, &t.name, &t.dims, t.reshape.as_ref())?;
            spec.label_filename = (!t.label_filename.is_empty()).then(|| t.label_filename.clone());
            outputs.push(spec);
        }
        for (what, names) in [("input", &inputs), ("output", &outputs)] {
            for (i, t) in names.iter().enumerate() {
                if names[..i].iter().any(|o| o.name == t.name) {
                    return Err(format!("{what}: '{}' is declared twice", t.name));
                }
            }
        }
        let dynamic_batching = match &config.scheduling_choice {
            None => None,
            Some(SchedulingChoice::SequenceBatching(_)) => {
                return Err("sequence_batching: not supported (stateless models only)".into())
            }
            Some(SchedulingChoice::EnsembleScheduling(e)) => {
                if !matches!(backend, BackendKind::Ensemble(_)) {
                    return Err(
                        "ensemble_scheduling: only a model with platform \"ensemble\" has steps"
                            .into(),
                    );
                }
                if !config.model_warmup.is_empty() {
                    return Err("model_warmup: an ensemble runs no model of its own; \
                                warm its steps' models up in their configs"
                        .into());
                }
                backend = BackendKind::Ensemble(ensemble_steps(e, &inputs, &outputs)?);
                None
            }
            Some(SchedulingChoice::DynamicBatching(_))
                if matches!(backend, BackendKind::Ensemble(_)) =>
            {
                return Err(
                    "dynamic_batching: an ensemble has no scheduler of its own; each step's \
                     model batches by its own config"
                        .into(),
                )
            }
            Some(SchedulingChoice::DynamicBatching(db)) => {
                if !batching {
                    return Err("dynamic_batching: needs max_batch_size of 1 or more".into());
                }
                if let Some(p) = db
                    .preferred_batch_size
                    .iter()
                    .find(|&&p| p < 1 || p as usize > max_batch_size)
                {
                    return Err(format!(
                        "dynamic_batching.preferred_batch_size: {p} must be between 1 and \
                         max_batch_size ({max_batch_size})"
                    ));
                }
                if db.priority_levels > 1 {
                    return Err(
                        "dynamic_batching.priority_levels: priority queues are not supported"
                            .into(),
                    );
                }
                let policy = db.default_queue_policy.unwrap_or_default();
                if policy.timeout_action != 0 {
                    return Err(
                        "dynamic_batching.default_queue_policy.timeout_action: only REJECT is supported"
                            .into(),
                    );
                }
                let mut preferred: Vec<usize> = db
                    .preferred_batch_size
                    .iter()
                    .map(|&p| p as usize)
                    .collect();
                preferred.sort_unstable();
                Some(BatchingPolicy {
                    preferred_batch_sizes: preferred,
                    max_queue_delay: Duration::from_micros(db.max_queue_delay_microseconds),
                    max_queue_size: policy.max_queue_size as usize,
                    default_timeout: (policy.default_timeout_microseconds > 0)
                        .then(|| Duration::from_micros(policy.default_timeout_microseconds)),
                    allow_timeout_override: policy.allow_timeout_override,
                })
            }
        };
        if config.instance_group.is_empty() {
            config.instance_group.push(ModelInstanceGroup {
                count: 1,
                ..Default::default()
            });
        }
        let mut instances: usize = 0;
        for (i, g) in config.instance_group.iter_mut().enumerate() {
            if g.kind == Kind::Gpu as i32 {
                return Err(format!(
                    "instance_group[{i}].kind: KIND_GPU is not available; use KIND_CPU"
                ));
            }
            if g.count < 0 {
                return Err(format!(
                    "instance_group[{i}].count: {} is negative",
                    g.count
                ));
            }
            g.count = g.count.max(1);
            g.kind = Kind::Cpu as i32;
            if g.name.is_empty() {
                g.name = format!("{}_{i}", config.name);
            }
            instances = instances.saturating_add(g.count as usize);
        }
        if config.version_policy.is_none() {
            config.version_policy = Some(ModelVersionPolicy {
                policy_choice: Some(model_version_policy::PolicyChoice::Latest(
                    model_version_policy::Latest { num_versions: 1 },
                )),
            });
        }
        let model_filename = if config.default_model_filename.is_empty() {
            config.default_model_filename = default_file.to_string();
            default_file.to_string()
        } else {
            config.default_model_filename.clone()
        };
        let response_cache = config.response_cache.is_some_and(|c| c.enable);
        Ok(Self {
            name: config.name.clone(),
            config,
            max_batch_size,
            inputs,
            outputs,
            dynamic_batching,
            instances,
            backend,
            model_filename,
            response_cache,
        })
    }

    /// The shape metadata shows: `[-1] + dims` when the model batches.
    pub fn metadata_shape(&self, t: &TensorDefinition) -> Vec<i64> {
        if self.max_batch_size > 0 {
            std::iter::once(-1).chain(t.dims.iter().copied()).collect()
        } else {
            t.dims.clone()
        }
    }

    /// The definition as the model itself sees it: every `reshape.shape` in
    /// place of `dims`. Backends are loaded and run with this view.
    pub fn model_view(&self) -> Self {
        let view = |ts: &[TensorDefinition]| -> Vec<TensorDefinition> {
            ts.iter()
                .map(|t| TensorDefinition {
                    dims: t.model_dims().to_vec(),
                    reshape: None,
                    ..t.clone()
                })
                .collect()
        };
        Self {
            inputs: view(&self.inputs),
            outputs: view(&self.outputs),
            ..self.clone()
        }
    }

    /// Which of `available` versions the version policy serves.
    pub fn served_versions(&self, available: &[i64]) -> Vec<i64> {
        let mut sorted = available.to_vec();
        sorted.sort_unstable();
        match self
            .config
            .version_policy
            .as_ref()
            .and_then(|p| p.policy_choice.as_ref())
        {
            Some(model_version_policy::PolicyChoice::All(_)) => sorted,
            Some(model_version_policy::PolicyChoice::Specific(s)) => sorted
                .into_iter()
                .filter(|v| s.versions.contains(v))
                .collect(),
            Some(model_version_policy::PolicyChoice::Latest(l)) => {
                let n = (l.num_versions.max(1) as usize).min(sorted.len());
                sorted.split_off(sorted.len() - n)
            }
            None => sorted.split_off(sorted.len().saturating_sub(1)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<ModelDefinition, String> {
        ModelDefinition::from_config("m", proto::model_config::parse_text(text).unwrap())
    }

    const ONNX: &str = r#"platform: "onnxruntime_onnx" max_batch_size: 8
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]
        output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]"#;

    #[test]
    fn completes_name_instances_policy_and_filename() {
        let s = spec(ONNX).unwrap();
        assert_eq!(s.config.name, "m");
        assert_eq!(s.instances, 1);
        assert_eq!(s.config.instance_group[0].name, "m_0");
        assert_eq!(s.model_filename, "model.onnx");
        assert_eq!(s.metadata_shape(&s.inputs[0]), vec![-1, 4]);
        assert_eq!(s.served_versions(&[3, 1, 2]), vec![3]);
        assert!(s.dynamic_batching.is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let e = spec(&ONNX.replace("TYPE_FP32 dims: [ 4 ]", "TYPE_FP32 dims: [ 0 ]")).unwrap_err();
        assert!(e.starts_with("input[0] ('x').dims"), "{e}");
        let e = spec(&format!(
            "{ONNX} dynamic_batching {{ preferred_batch_size: [ 16 ] }}"
        ))
        .unwrap_err();
        assert!(
            e.starts_with("dynamic_batching.preferred_batch_size"),
            "{e}"
        );
        for (extra, field) in [
            ("optimization { execution_accelerators { cpu_execution_accelerator [ { name: \"openvino\" } ] } }", "optimization.execution_accelerators"),
            ("model_transaction_policy { decoupled: true }", "model_transaction_policy.decoupled"),
            ("batch_input [ { kind: BATCH_ELEMENT_COUNT target_name: \"n\" data_type: TYPE_FP32 } ]", "batch_input"),
        ] {
            let e = spec(&format!("{ONNX} {extra}")).unwrap_err();
            assert!(e.starts_with(field), "{e}");
        }
        let e = spec(&ONNX.replace("dims: [ 4 ] }", "dims: [ 4 ] optional: true }")).unwrap_err();
        assert!(e.starts_with("input[0] ('x').optional"), "{e}");
        let e = spec(&ONNX.replace("onnxruntime_onnx", "tensorrt_plan")).unwrap_err();
        assert!(e.contains("tensorrt_plan"), "{e}");
        let e = ModelDefinition::from_config(
            "other",
            proto::model_config::parse_text(&format!("name: \"m\" {ONNX}")).unwrap(),
        )
        .unwrap_err();
        assert!(e.starts_with("name:"), "{e}");
    }

    #[test]
    fn the_onnx_executor_is_chosen_by_name_and_tract_only_where_it_is_built() {
        let with = |name: &str| {
            spec(&format!(
                r#"{ONNX} parameters [ {{ key: "executor" value: {{ string_value: "{name}" }} }} ]"#
            ))
            .map(|s| s.backend)
        };
        assert_eq!(
            spec(ONNX).unwrap().backend,
            BackendKind::Onnx(OnnxExecutor::Auto)
        );
        assert_eq!(
            with("onnxruntime").unwrap(),
            BackendKind::Onnx(OnnxExecutor::OnnxRuntime)
        );
        let e = with("openvino").unwrap_err();
        assert!(e.starts_with("parameters[\"executor\"]: 'openvino'"), "{e}");
        #[cfg(feature = "tract")]
        assert_eq!(
            with("tract").unwrap(),
            BackendKind::Onnx(OnnxExecutor::Tract)
        );
        #[cfg(not(feature = "tract"))]
        {
            let e = with("tract").unwrap_err();
            assert!(e.contains("without the `tract` feature"), "{e}");
        }
    }

    #[test]
    fn reshape_is_checked_and_is_what_the_model_sees() {
        let s = spec(&ONNX.replace(
            "dims: [ 3 ] }",
            "dims: [ 3, 1 ] reshape: { shape: [ 3 ] } }",
        ))
        .unwrap();
        assert_eq!(s.metadata_shape(&s.outputs[0]), vec![-1, 3, 1]);
        let view = s.model_view();
        assert_eq!(view.outputs[0].dims, vec![3]);
        assert!(view.outputs[0].reshape.is_none());
        let e = spec(&ONNX.replace("dims: [ 4 ] }", "dims: [ 4 ] reshape: { shape: [ 3 ] } }"))
            .unwrap_err();
        assert!(e.starts_with("input[0] ('x').reshape.shape [3]"), "{e}");
        let e = spec(&ONNX.replace("dims: [ 4 ] }", "dims: [ -1 ] reshape: { shape: [ 2 ] } }"))
            .unwrap_err();
        assert!(e.contains("variable dimension"), "{e}");
        assert!(spec(&ONNX.replace(
            "dims: [ 4 ] }",
            "dims: [ -1 ] reshape: { shape: [ -1, 2 ] } }"
        ))
        .is_ok());
        assert_eq!(resolve_shape(&[-1, 2], 8), Some(vec![4, 2]));
        assert_eq!(resolve_shape(&[-1, 3], 8), None);
        assert_eq!(resolve_shape(&[], 1), Some(vec![]));
        assert_eq!(resolve_shape(&[2, 2], 5), None);
    }

    #[test]
    fn ensemble_steps_are_ordered_and_their_graph_checked() {
        let ens = |steps: &str| {
            spec(&format!(
                r#"platform: "ensemble" max_batch_size: 8
                input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
                output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 3 ] }} ]
                ensemble_scheduling {{ step [ {steps} ] }}"#
            ))
        };
        let step = |m: &str, i: &str, o: &str| {
            format!(
                r#"{{ model_name: "{m}" model_version: -1 input_map {{ key: "in" value: "{i}" }}
                   output_map {{ key: "out" value: "{o}" }} }}"#
            )
        };
        // Listed consumer first: run producer first.
        let s = ens(&format!("{}, {}", step("b", "t", "y"), step("a", "x", "t"))).unwrap();
        let BackendKind::Ensemble(steps) = &s.backend else {
            panic!("{:?}", s.backend)
        };
        let order: Vec<(&str, usize)> = steps
            .iter()
            .map(|s| (s.model_name.as_str(), s.index))
            .collect();
        assert_eq!(order, vec![("a", 1), ("b", 0)]);
        assert_eq!(steps[0].model_version, None);
        let e = ens(&format!(
            "{}, {}, {}",
            step("a", "x", "y"),
            step("b", "u", "v"),
            step("c", "v", "u")
        ))
        .unwrap_err();
        assert!(
            e.contains("cycle") && e.contains("step[1]") && e.contains("step[2]"),
            "{e}"
        );
        let e = ens(&format!(
            "{}, {}",
            step("a", "x", "t"),
            step("b", "ghost", "y")
        ))
        .unwrap_err();
        assert!(
            e.starts_with("ensemble_scheduling.step[1].input_map: tensor 'ghost'"),
            "{e}"
        );
        let e = ens(&format!("{}, {}", step("a", "x", "y"), step("b", "x", "y"))).unwrap_err();
        assert!(
            e.starts_with(
                "ensemble_scheduling.step[1].output_map: tensor 'y' is already produced by step[0]"
            ),
            "{e}"
        );
        let e = ens(&step("a", "x", "t")).unwrap_err();
        assert!(e.starts_with("output 'y': no step"), "{e}");
        let e = spec(&format!(
            r#"platform: "ensemble" max_batch_size: 8
            input [ {{ name: "x" data_type: TYPE_FP32 dims: [ 4 ] }} ]
            output [ {{ name: "y" data_type: TYPE_FP32 dims: [ 3 ] }} ]
            model_warmup [ {{ name: "w" inputs {{ key: "x" value: {{ data_type: TYPE_FP32 dims: [ 4 ] zero_data: true }} }} }} ]
            ensemble_scheduling {{ step [ {} ] }}"#,
            step("a", "x", "y")
        ))
        .unwrap_err();
        assert!(e.starts_with("model_warmup: an ensemble"), "{e}");
    }

    #[test]
    fn version_policies() {
        let all = spec(&format!("{ONNX} version_policy: {{ all {{ }} }}")).unwrap();
        assert_eq!(all.served_versions(&[2, 1]), vec![1, 2]);
        let two = spec(&format!(
            "{ONNX} version_policy: {{ latest {{ num_versions: 2 }} }}"
        ))
        .unwrap();
        assert_eq!(two.served_versions(&[1, 5, 3]), vec![3, 5]);
        let some = spec(&format!(
            "{ONNX} version_policy: {{ specific {{ versions: [1, 3] }} }}"
        ))
        .unwrap();
        assert_eq!(some.served_versions(&[1, 2, 3]), vec![1, 3]);
    }
}
