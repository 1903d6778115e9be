//! KServe v2 / Triton protocol over HTTP (`http`) and gRPC (`grpc`): both
//! answer from the same model repository with the same messages, built here.
pub mod codec;
pub mod grpc;
pub mod http;
pub mod llm;
pub mod shadow;

use crate::api::AppState;
use crate::dispatch::tensor::{resolve_tensor, TensorTarget};
use crate::dispatch::Served;
pub use crate::kserve_client::encode;
use axum::http::HeaderMap;
use engine::dnn::{
    DnnError, ErrorKind, InferRequest, InferResponse, ModelRepository, StatsSnapshot,
};
use proto::inference::{
    model_metadata_response::TensorMetadata, repository_index_response::ModelIndex,
    InferBatchStatistics, InferStatistics, ModelConfig, ModelMetadataResponse, ModelStatistics,
    ModelStatisticsResponse, RepositoryIndexResponse, ServerMetadataResponse, StatisticDuration,
};
use std::sync::Arc;

/// Protocol extensions this server implements, as `GET /v2` lists them.
pub const EXTENSIONS: &[&str] = &[
    "classification",
    "model_repository",
    "schedule_policy",
    "model_configuration",
    "binary_tensor_data",
    "parameters",
    "statistics",
];

pub fn server_metadata() -> ServerMetadataResponse {
    ServerMetadataResponse {
        name: "switchyard".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        extensions: EXTENSIONS.iter().map(|e| e.to_string()).collect(),
    }
}

/// An LLM served under `name` (a route or `model@version`) that is not a
/// repository model, with the version the protocol reports.
pub fn llm_target(state: &AppState, name: &str) -> Option<(engine::llm::LlmEngine, String)> {
    if state.dnn.as_ref().is_some_and(|r| r.model(name).is_ok()) {
        return None;
    }
    let (engine, version) = state.deployment(name)?;
    Some((engine, version.unwrap_or(1).to_string()))
}

/// A model served by remote KServe nodes.
pub fn kserve_upstream<'a>(
    state: &'a AppState,
    name: &str,
) -> Option<&'a crate::upstream::Upstream> {
    state.upstream(name, crate::upstream::Protocol::Kserve)
}

/// A registry tree or DNN model's plane model serving `name` as primary
/// (or the pinned `name@version`), with every version its route serves.
pub fn tensor_model(state: &AppState, name: &str) -> Option<(String, Vec<String>)> {
    state.plane.as_ref()?;
    if state.dnn.as_ref().is_some_and(|r| r.model(name).is_ok()) {
        return None;
    }
    let table = state.routes().snapshot();
    let (route_name, pinned) = match name.rsplit_once('@') {
        Some((m, v)) => (m, Some(v.parse::<u32>().ok()?)),
        None => (name, None),
    };
    let route = table.tensor_routes.get(route_name)?;
    let model = match pinned {
        Some(v) => route.deployments().find(|d| d.version == v)?.model.clone(),
        None => route.primary.model.clone(),
    };
    let mut versions: Vec<u32> = std::iter::once(route.primary.version)
        .chain(route.candidate.iter().map(|c| c.deployment.version))
        .collect();
    versions.sort_unstable();
    Some((model, versions.iter().map(u32::to_string).collect()))
}

/// Whether `name` (at `version`) answers requests: an LLM route, a model of
/// a remote upstream with a replica up, a registry model, or a loaded
/// repository model.
pub fn model_is_ready(state: &AppState, name: &str, version: Option<i64>) -> bool {
    if let Some(u) = kserve_upstream(state, name) {
        return u.is_available();
    }
    if tensor_model(state, name).is_some() {
        return true;
    }
    llm_target(state, name).is_some()
        || state
            .dnn
            .as_ref()
            .is_some_and(|r| r.version(name, version).is_ok())
}

/// The repository, or the error every model call gets without one.
pub fn repository(repo: &Option<Arc<ModelRepository>>) -> Result<&Arc<ModelRepository>, DnnError> {
    repo.as_ref().ok_or_else(|| {
        DnnError::not_found("no model repository is served (start with --model-repository PATH)")
    })
}

/// A version as the protocol sends it: empty = the default (highest) version.
pub fn parse_version(v: &str) -> Result<Option<i64>, DnnError> {
    if v.is_empty() {
        return Ok(None);
    }
    v.parse::<i64>()
        .map(Some)
        .map_err(|_| DnnError::invalid(format!("model version '{v}' is not a number")))
}

/// Metadata of an LLM route, a remote upstream's model or a repository model.
pub async fn model_metadata(
    state: &AppState,
    name: &str,
    version: Option<i64>,
) -> Result<ModelMetadataResponse, DnnError> {
    if let Some(u) = kserve_upstream(state, name) {
        return u.metadata().await;
    }
    if let Some((_, v)) = llm_target(state, name) {
        return Ok(llm::metadata(name, &v));
    }
    if let Some((model, versions)) = tensor_model(state, name) {
        let plane = state.plane.as_deref().expect("a tensor model has a plane");
        let mut m = repository_metadata(plane, &model, None).await?;
        m.name = name.to_string();
        m.versions = versions;
        return Ok(m);
    }
    repository_metadata(repository(&state.dnn)?, name, version).await
}

/// A repository model's metadata.
async fn repository_metadata(
    repo: &ModelRepository,
    name: &str,
    version: Option<i64>,
) -> Result<ModelMetadataResponse, DnnError> {
    let (model, v) = repo.version(name, version)?;
    let spec = &model.spec;
    let tensors = |list: &[engine::dnn::model::TensorDefinition]| {
        list.iter()
            .map(|t| TensorMetadata {
                name: t.name.clone(),
                datatype: t.dtype.wire().into(),
                shape: spec.metadata_shape(t),
            })
            .collect()
    };
    let versions = match version {
        Some(_) => vec![v.version.to_string()],
        None => model.versions.keys().map(|k| k.to_string()).collect(),
    };
    Ok(ModelMetadataResponse {
        name: spec.name.clone(),
        versions,
        platform: if spec.config.platform.is_empty() {
            spec.config.backend.clone()
        } else {
            spec.config.platform.clone()
        },
        inputs: tensors(&spec.inputs),
        outputs: tensors(&spec.outputs),
    })
}

/// The config of an LLM route, a remote upstream's model or a repository model.
pub async fn model_config(
    state: &AppState,
    name: &str,
    version: Option<i64>,
) -> Result<ModelConfig, DnnError> {
    if let Some(u) = kserve_upstream(state, name) {
        return u.model_config().await;
    }
    if llm_target(state, name).is_some() {
        return Ok(llm::config(name));
    }
    if let Some((model, _)) = tensor_model(state, name) {
        let plane = state.plane.as_deref().expect("a tensor model has a plane");
        let mut config = plane.version(&model, None)?.0.spec.config.clone();
        config.name = name.to_string();
        return Ok(config);
    }
    let (model, _) = repository(&state.dnn)?.version(name, version)?;
    Ok(model.spec.config.clone())
}

/// Runs a request on the remote upstream, LLM route or repository model it
/// names, with what served it when the dispatch layer chose (an LLM's
/// version and arm); a repository model's shadows get their copies once it
/// is dispatched.
pub async fn infer(
    state: &AppState,
    req: InferRequest,
    headers: &HeaderMap,
) -> Result<(InferResponse, Option<Served>), DnnError> {
    if let Some(u) = kserve_upstream(state, &req.model) {
        return Ok((u.infer(req).await?, None));
    }
    let request_id = llm::request_id(&req.id, headers);
    if let Some(target) = llm::route(state, &req.model, headers, &request_id)? {
        let (call, _) = llm::call_from_tensors(&req.inputs)?;
        let resp = llm::answer(state, &target, req, &call, request_id).await?;
        return Ok((resp, Some(target.served())));
    }
    if let Some(t) = tensor_target(state, &req.model, headers, &request_id) {
        return infer_tensor(state, t, req, &request_id).await;
    }
    let repo = repository(&state.dnn)?;
    let shadows = state.kserve_shadows.of(&req.model);
    let done = shadow::mirror(shadows, &req.model, repo, &state.shadows, &req, &request_id);
    Ok((mirrored(repo, req, done).await?, None))
}

/// Runs `req` on `repo` and publishes its outcome to the shadows that got
/// a copy (`done`), so they can compare.
async fn mirrored(
    repo: &ModelRepository,
    req: InferRequest,
    done: Option<tokio::sync::watch::Sender<Option<shadow::PrimaryOutcome>>>,
) -> Result<InferResponse, DnnError> {
    let started = std::time::Instant::now();
    let out = repo.infer(req).await;
    if let Some(done) = done {
        let outcome = out
            .as_ref()
            .ok()
            .map(|r| (Arc::new(r.outputs.clone()), started.elapsed().as_secs_f64()));
        let _ = done.send(Some(outcome));
    }
    out
}

/// The registry tree or DNN model version that serves `name`, unless the
/// configured repository has a model of that name. The rollout unit is the
/// `x-switchyard-unit` header, else the request id.
fn tensor_target(
    state: &AppState,
    name: &str,
    headers: &HeaderMap,
    request_id: &str,
) -> Option<TensorTarget> {
    if state.plane.is_none() || state.dnn.as_ref().is_some_and(|r| r.model(name).is_ok()) {
        return None;
    }
    let table = state.routes().snapshot();
    let unit = crate::dispatch::unit(&table, name, headers, None)
        .unwrap_or_else(|| request_id.to_string());
    resolve_tensor(&table, name, &unit)
}

/// Names, datatypes and shapes of tensors, as the request log keeps them.
fn tensor_shapes(tensors: &[engine::dnn::Tensor]) -> Vec<serde_json::Value> {
    tensors
        .iter()
        .map(|t| serde_json::json!({"name": t.name, "datatype": t.dtype.wire(), "shape": t.shape}))
        .collect()
}

/// Runs a request on the plane version it resolved to, mirrors it to the
/// route's shadow versions and records the outcome for rollout policies.
/// A request the model refuses as invalid says nothing about the version.
async fn infer_tensor(
    state: &AppState,
    t: TensorTarget,
    mut req: InferRequest,
    request_id: &str,
) -> Result<(InferResponse, Option<Served>), DnnError> {
    let plane = state
        .plane
        .as_ref()
        .ok_or_else(|| DnnError::internal("the repository plane is not running"))?;
    let public = std::mem::replace(&mut req.model, t.deployment.model.clone());
    req.version = None;
    let shadows: Vec<shadow::Shadow> = t
        .shadows
        .iter()
        .map(|(label, model, policy)| shadow::Shadow::local(label.clone(), model.clone(), *policy))
        .collect();
    let done = shadow::mirror(&shadows, &t.route, plane, &state.shadows, &req, request_id);
    let inputs = tensor_shapes(&req.inputs);
    let out = mirrored(plane, req, done).await;
    let seconds = t.started.elapsed().as_secs_f64();
    if !matches!(&out, Err(e) if e.kind == ErrorKind::InvalidArg) {
        state
            .versions
            .record(&t.route, t.deployment.version, out.is_ok(), seconds);
    }
    if let Some(log) = state.recorders().logged(&t.route, request_id) {
        log.write(
            &t.route,
            serde_json::json!({"request_id": request_id, "role": "primary", "route": t.route,
                "version": t.deployment.version, "arm": t.arm.as_str(), "ok": out.is_ok(),
                "latency_ms": seconds * 1e3, "inputs": inputs,
                "outputs": out.as_ref().map(|r| tensor_shapes(&r.outputs)).unwrap_or_default(),
                "error": out.as_ref().err().map(|e| e.message.clone())}),
        );
    }
    let mut resp = out?;
    resp.model_name = public;
    resp.model_version = t.deployment.version.to_string();
    Ok((resp, Some(t.served())))
}

/// The model control API as both protocols carry it: `file:` overrides are
/// refused, `config` is ModelConfig JSON, and loading runs off the runtime.
pub async fn load(
    state: &AppState,
    name: String,
    has_file_params: bool,
    config_json: Option<String>,
) -> Result<(), DnnError> {
    if has_file_params {
        return Err(DnnError::unsupported(
            "load with file: parameters is not supported; put the files in the repository",
        ));
    }
    let config = config_json
        .map(|c| proto::model_config::from_json(&c))
        .transpose()
        .map_err(|e| DnnError::invalid(format!("parameters.config: {e}")))?;
    let repo = state.dnn.clone();
    tokio::task::spawn_blocking(move || repository(&repo)?.load(&name, config))
        .await
        .map_err(|e| DnnError::internal(e.to_string()))?
}

/// The refusal for a `config` parameter that is not a string.
pub fn config_not_a_string() -> DnnError {
    DnnError::invalid("parameters.config must be a string of ModelConfig JSON")
}

fn duration(t: engine::dnn::stats::Timed) -> Option<StatisticDuration> {
    Some(StatisticDuration {
        count: t.count,
        ns: t.ns,
    })
}

fn statistics_of(name: String, version: i64, s: StatsSnapshot) -> ModelStatistics {
    ModelStatistics {
        name,
        version: version.to_string(),
        last_inference: s.last_inference_ms,
        inference_count: s.inference_count,
        execution_count: s.execution_count,
        inference_stats: Some(InferStatistics {
            success: duration(s.success),
            fail: duration(s.fail),
            queue: duration(s.queue),
            compute_input: duration(s.compute_input),
            compute_infer: duration(s.compute_infer),
            compute_output: duration(s.compute_output),
            cache_hit: duration(s.cache_hit),
            cache_miss: duration(s.cache_miss),
        }),
        batch_stats: s
            .batches
            .into_iter()
            .map(|(size, b)| InferBatchStatistics {
                batch_size: size,
                compute_input: duration(b.compute_input),
                compute_infer: duration(b.compute_infer),
                compute_output: duration(b.compute_output),
            })
            .collect(),
        memory_usage: vec![],
        response_stats: Default::default(),
    }
}

/// Statistics of a configured repository model, of a registry tree or DNN
/// model (each of its serving versions, under its public name), or of all.
pub fn statistics(
    state: &AppState,
    name: Option<&str>,
    version: Option<i64>,
) -> Result<ModelStatisticsResponse, DnnError> {
    let public = |plane_name: String| match plane_name.rsplit_once('@') {
        Some((model, _)) => model.to_string(),
        None => plane_name,
    };
    let mut out = Vec::new();
    if let Some((n, (_, served))) = name.and_then(|n| Some((n, llm_target(state, n)?))) {
        let served: i64 = served.parse().unwrap_or(1);
        let v = version.unwrap_or(served);
        if v != served {
            return Err(DnnError::not_found(format!(
                "Request for unknown model: '{n}' version {v} is not found (it serves version {served})"
            )));
        }
        for (m, ver, st) in state.llm_stats.snapshot(n, &[v]) {
            out.push(statistics_of(m, ver, st));
        }
        return Ok(ModelStatisticsResponse { model_stats: out });
    }
    let registry_model = name.and_then(|n| tensor_model(state, n));
    match (name, state.plane.as_deref(), registry_model) {
        (Some(n), Some(plane), Some((_, versions))) => {
            let route = n.rsplit_once('@').map_or(n, |(m, _)| m);
            for v in versions
                .iter()
                .filter(|v| version.is_none_or(|want| want.to_string() == **v))
            {
                for (m, ver, st) in plane.stats(Some(&format!("{route}@{v}")), None)? {
                    out.push(statistics_of(public(m), ver, st));
                }
            }
        }
        (Some(n), _, _) => {
            for (m, ver, st) in repository(&state.dnn)?.stats(Some(n), version)? {
                out.push(statistics_of(m, ver, st));
            }
        }
        (None, plane, _) => {
            for (m, ver, st) in state.llm_stats.all() {
                out.push(statistics_of(m, ver, st));
            }
            for (m, ver, st) in state
                .dnn
                .as_deref()
                .map(|r| r.stats(None, None))
                .transpose()?
                .unwrap_or_default()
            {
                out.push(statistics_of(m, ver, st));
            }
            for (m, ver, st) in plane
                .map(|r| r.stats(None, None))
                .transpose()?
                .unwrap_or_default()
            {
                out.push(statistics_of(public(m), ver, st));
            }
        }
    }
    Ok(ModelStatisticsResponse { model_stats: out })
}

pub fn index(repo: &ModelRepository, ready: bool) -> RepositoryIndexResponse {
    RepositoryIndexResponse {
        models: repo
            .index(ready)
            .into_iter()
            .map(|e| ModelIndex {
                name: e.name,
                version: e.version,
                state: e.state,
                reason: e.reason,
            })
            .collect(),
    }
}
