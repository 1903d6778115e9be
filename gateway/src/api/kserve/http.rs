//! KServe v2 over HTTP with Triton's extensions: health, metadata, config,
//! statistics, repository control, and infer with JSON or binary tensors
//! (`Inference-Header-Content-Length`), gzip/deflate bodies both ways.
use super::codec::{encode_response, infer_body, parse_infer, HEADER_LENGTH};
use super::{
    config_not_a_string, kserve_upstream, llm, llm_target, model_config, model_is_ready,
    model_metadata, parse_version, repository, server_metadata, statistics,
};
use crate::api::AppState;
use crate::auth::{self, AuthError, Permission};
use crate::limits::BodyError;
use crate::params::SamplingFields;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use engine::dnn::{DnnError, ErrorKind};
use serde_json::{json, Map, Value};
use std::collections::HashMap;

/// A protocol error: `{"error": "..."}` with Triton's status for its kind
/// (and `Retry-After` on a 503).
pub struct KsError {
    status: StatusCode,
    message: String,
}

impl From<DnnError> for KsError {
    fn from(e: DnnError) -> Self {
        let status = match e.kind {
            ErrorKind::InvalidArg => StatusCode::BAD_REQUEST,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Unsupported => StatusCode::NOT_IMPLEMENTED,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        };
        Self {
            status,
            message: e.message,
        }
    }
}

impl From<AuthError> for KsError {
    fn from(e: AuthError) -> Self {
        Self {
            status: e.http_status(),
            message: e.message(),
        }
    }
}

impl From<BodyError> for KsError {
    fn from(e: BodyError) -> Self {
        Self {
            status: e.http_status(),
            message: e.message(),
        }
    }
}

impl IntoResponse for KsError {
    fn into_response(self) -> Response {
        let mut resp = (self.status, Json(json!({ "error": self.message }))).into_response();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

type KsResult<T> = Result<T, KsError>;

pub fn routes(state: &AppState) -> Router<AppState> {
    let model = |suffix: &str, r: axum::routing::MethodRouter<AppState>| {
        Router::new()
            .route(&format!("/v2/models/{{model}}{suffix}"), r.clone())
            .route(
                &format!("/v2/models/{{model}}/versions/{{version}}{suffix}"),
                r,
            )
    };
    Router::new()
        .route(
            "/v2",
            get(|| async {
                Json(proto::json::to_json(
                    &server_metadata(),
                    "inference.ServerMetadataResponse",
                ))
            }),
        )
        .route("/v2/health/live", get(|| async { StatusCode::OK }))
        .route("/v2/health/ready", get(server_ready))
        .route("/v2/models/stats", get(all_stats))
        .route("/v2/repository/index", post(repo_index))
        .route("/v2/repository/models/{model}/load", post(load))
        .route("/v2/repository/models/{model}/unload", post(unload))
        .merge(model("", get(metadata)))
        .merge(model("/ready", get(model_ready)))
        .merge(model("/config", get(config)))
        .merge(model("/stats", get(stats)))
        .merge(
            Router::new()
                .merge(model("/infer", post(infer)))
                .merge(model("/generate", post(generate)))
                .merge(model("/generate_stream", post(generate_stream)))
                .route_layer(axum::middleware::from_fn_with_state(
                    state.clone(),
                    super::super::inference_key::<KsError>,
                )),
        )
}

async fn read(req: Request, s: &AppState, limit: usize) -> KsResult<(HeaderMap, Bytes)> {
    Ok(crate::api::read_body(req, s, limit).await?)
}

/// A JSON body (control, `generate`) under `server.limits.max_body_bytes`.
struct JsonBody(HeaderMap, Bytes);

impl FromRequest<AppState> for JsonBody {
    type Rejection = KsError;

    async fn from_request(req: Request, s: &AppState) -> KsResult<Self> {
        let (h, b) = read(req, s, s.limits.max_body_bytes).await?;
        Ok(Self(h, b))
    }
}

/// An `infer` body under `server.limits.max_tensor_body_bytes`.
struct TensorBody(HeaderMap, Bytes);

impl FromRequest<AppState> for TensorBody {
    type Rejection = KsError;

    async fn from_request(req: Request, s: &AppState) -> KsResult<Self> {
        let (h, b) = read(req, s, s.limits.max_tensor_body_bytes).await?;
        Ok(Self(h, b))
    }
}

/// The model and version named in the path.
fn target(p: &HashMap<String, String>) -> Result<(String, Option<i64>), DnnError> {
    let model = p.get("model").cloned().unwrap_or_default();
    let version = parse_version(p.get("version").map(String::as_str).unwrap_or(""))?;
    Ok((model, version))
}

/// Triton's readiness answer: 200, or 400, with no body.
fn readiness(ready: bool) -> StatusCode {
    if ready {
        StatusCode::OK
    } else {
        StatusCode::BAD_REQUEST
    }
}

async fn server_ready(State(s): State<AppState>) -> StatusCode {
    readiness(s.is_ready())
}

async fn model_ready(
    State(s): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
) -> StatusCode {
    readiness(target(&p).is_ok_and(|(m, v)| model_is_ready(&s, &m, v)))
}

async fn metadata(
    State(s): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
) -> KsResult<Json<Value>> {
    let (m, v) = target(&p)?;
    let md = model_metadata(&s, &m, v).await?;
    Ok(Json(proto::json::to_json(
        &md,
        "inference.ModelMetadataResponse",
    )))
}

async fn config(
    State(s): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
) -> KsResult<Json<Value>> {
    let (m, v) = target(&p)?;
    Ok(Json(proto::model_config::to_json(
        &model_config(&s, &m, v).await?,
    )))
}

async fn stats(
    State(s): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
) -> KsResult<Json<Value>> {
    let (m, v) = target(&p)?;
    let st = statistics(&s, Some(&m), v)?;
    Ok(Json(proto::json::to_json(
        &st,
        "inference.ModelStatisticsResponse",
    )))
}

async fn all_stats(State(s): State<AppState>) -> KsResult<Json<Value>> {
    let st = statistics(&s, None, None)?;
    Ok(Json(proto::json::to_json(
        &st,
        "inference.ModelStatisticsResponse",
    )))
}

/// An optional JSON body (clients post nothing, `{}` or parameters).
fn optional_json(body: &[u8]) -> Result<Value, DnnError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| DnnError::invalid(format!("failed to parse the request JSON buffer: {e}")))
}

async fn repo_index(
    State(s): State<AppState>,
    JsonBody(_, body): JsonBody,
) -> KsResult<Json<Value>> {
    let req = optional_json(&body)?;
    let ready = req["ready"].as_bool().unwrap_or(false);
    let rows: Vec<Value> = repository(&s.dnn)?
        .index(ready)
        .into_iter()
        .map(|m| {
            let mut row = json!({"name": m.name, "state": m.state});
            if !m.version.is_empty() {
                row["version"] = m.version.into();
            }
            if !m.reason.is_empty() {
                row["reason"] = m.reason.into();
            }
            row
        })
        .collect();
    Ok(Json(Value::Array(rows)))
}

async fn load(
    State(s): State<AppState>,
    Path(model): Path<String>,
    JsonBody(headers, body): JsonBody,
) -> KsResult<StatusCode> {
    s.authorize(auth::from_headers(&headers), Permission::Control)?;
    let req = optional_json(&body)?;
    let params = req["parameters"].as_object().cloned().unwrap_or_default();
    let config = match params.get("config") {
        None => None,
        Some(Value::String(c)) => Some(c.clone()),
        Some(_) => return Err(config_not_a_string().into()),
    };
    let has_files = params.keys().any(|k| k.starts_with("file:"));
    super::load(&s, model, has_files, config).await?;
    Ok(StatusCode::OK)
}

async fn unload(
    State(s): State<AppState>,
    Path(model): Path<String>,
    JsonBody(headers, body): JsonBody,
) -> KsResult<StatusCode> {
    s.authorize(auth::from_headers(&headers), Permission::Control)?;
    optional_json(&body)?;
    repository(&s.dnn)?.unload(&model)?;
    Ok(StatusCode::OK)
}

async fn infer(
    State(s): State<AppState>,
    Path(p): Path<HashMap<String, String>>,
    TensorBody(headers, body): TensorBody,
) -> KsResult<Response> {
    let (model, version) = target(&p)?;
    // A remote upstream's model is checked there.
    let remote = kserve_upstream(&s, &model).is_some();
    let registry_model = super::tensor_model(&s, &model).is_some();
    if !remote && !registry_model && llm_target(&s, &model).is_none() {
        repository(&s.dnn)?.version(&model, version)?;
    }
    let repo = if remote || registry_model {
        None
    } else {
        s.dnn.clone()
    };
    let head = headers.clone();
    let (req, format) = s
        .offload
        .run(body.len(), move || {
            parse_infer(model, version, &head, &body, repo.as_deref())
        })
        .await?;
    let request_id = llm::request_id(&req.id, &headers);
    let (resp, served) = super::infer(&s, req, &headers).await?;
    let (body, header_len) = infer_body(resp, &format);
    let (encoding, body) = encode_response(&headers, body);
    let mut response = Response::new(axum::body::Body::from(body));
    let h = response.headers_mut();
    match header_len {
        Some(n) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            h.insert(HEADER_LENGTH, HeaderValue::from(n));
        }
        None => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
        }
    }
    if let Some(e) = encoding {
        h.insert(header::CONTENT_ENCODING, HeaderValue::from_static(e));
    }
    if let Some(served) = served {
        crate::dispatch::headers(h, &served, &request_id);
    }
    Ok(response)
}

/// Triton's generate extension: a JSON object of the model's inputs by name
/// (`text_input` as a string or a one-element list, `sampling_parameters` as
/// an object or its JSON text, `exclude_input_in_output`, `stream`) plus
/// `parameters`; sampling keys (`max_tokens`, `temperature`, ...) are taken
/// at the top level too, as for Triton's LLM backends. Any other key is refused.
/// Also returns whether the body asks to stream (`"stream": true`).
fn generate_call(
    p: &HashMap<String, String>,
    body: &[u8],
) -> Result<(String, llm::LlmCall, bool), DnnError> {
    let (model, _) = target(p)?;
    let req = optional_json(body)?;
    let obj = req
        .as_object()
        .ok_or_else(|| DnnError::invalid("the request must be a JSON object"))?;
    let mut prompt = None;
    let mut sampling = Map::new();
    let mut exclude_input = false;
    let mut stream = false;
    for (key, value) in obj {
        match key.as_str() {
            "text_input" => {
                prompt = Some(match value {
                    Value::String(t) => t.clone(),
                    Value::Array(a) if a.len() == 1 && a[0].is_string() => {
                        a[0].as_str().unwrap_or_default().to_string()
                    }
                    _ => {
                        return Err(DnnError::invalid(
                            "'text_input' must be a string or a list of one string",
                        ))
                    }
                })
            }
            "parameters" => match value {
                Value::Object(m) => sampling.extend(m.clone()),
                _ => return Err(DnnError::invalid("'parameters' must be a JSON object")),
            },
            "sampling_parameters" => match value {
                Value::Object(m) => sampling.extend(m.clone()),
                Value::String(t) => match serde_json::from_str(t) {
                    Ok(Value::Object(m)) => sampling.extend(m),
                    _ => {
                        return Err(DnnError::invalid(
                            "'sampling_parameters' must be a JSON object",
                        ))
                    }
                },
                _ => {
                    return Err(DnnError::invalid(
                        "'sampling_parameters' must be a JSON object",
                    ))
                }
            },
            "exclude_input_in_output" => {
                exclude_input = value.as_bool().ok_or_else(|| {
                    DnnError::invalid("'exclude_input_in_output' must be true or false")
                })?
            }
            // Over `generate` too, as genai-perf sends it: the answer is then
            // the server-sent events `generate_stream` gives.
            "stream" => {
                stream = value
                    .as_bool()
                    .ok_or_else(|| DnnError::invalid("'stream' must be true or false"))?;
            }
            k if crate::params::is_sampling_key(k) => {
                sampling.insert(key.clone(), value.clone());
            }
            other => {
                return Err(DnnError::invalid(format!(
                    "unexpected key '{other}' in the generate request (it takes text_input, \
                     parameters, sampling_parameters, exclude_input_in_output, stream and \
                     sampling keys such as max_tokens)"
                )))
            }
        }
    }
    let prompt = prompt.ok_or_else(|| DnnError::invalid("the request has no 'text_input'"))?;
    Ok((
        model,
        llm::LlmCall {
            prompt,
            fields: SamplingFields::from_json(&sampling)?,
            exclude_input,
        },
        stream,
    ))
}

/// A generate request, read, checked and dispatched before the handler runs.
struct Generate {
    model: String,
    call: llm::LlmCall,
    target: crate::dispatch::llm::LlmTarget,
    request_id: String,
    /// The engine's events.
    events: crate::dispatch::llm::Events,
    /// Answer with server-sent events (`generate_stream`, or `"stream": true`).
    stream: bool,
}

impl FromRequest<AppState> for Generate {
    type Rejection = KsError;

    async fn from_request(req: Request, state: &AppState) -> KsResult<Self> {
        use axum::extract::FromRequestParts;
        let (mut parts, body) = req.into_parts();
        let Path(p) = Path::<HashMap<String, String>>::from_request_parts(&mut parts, state)
            .await
            .map_err(|e| DnnError::invalid(e.to_string()))?;
        let req = Request::from_parts(parts, body);
        let streaming = req.uri().path().ends_with("/generate_stream");
        let JsonBody(headers, body) = JsonBody::from_request(req, state).await?;
        let (model, call, stream) = generate_call(&p, &body)?;
        let request_id = llm::request_id("", &headers);
        let target = llm::route(state, &model, &headers, &request_id)?.ok_or_else(|| {
            DnnError::not_found(format!(
                "Request for unknown model: '{model}' is not a generative model"
            ))
        })?;
        let events = llm::start(state, &target, &call, request_id.clone()).await?;
        Ok(Self {
            model,
            call,
            target,
            request_id,
            events,
            stream: streaming || stream,
        })
    }
}

async fn generate(State(s): State<AppState>, g: Generate) -> KsResult<Response> {
    if g.stream {
        return generate_stream(State(s), g).await;
    }
    let Generate {
        model,
        call,
        target,
        request_id,
        events,
        ..
    } = g;
    let text = tokio::select! {
        t = llm::complete(&call, events) => t?,
        _ = s.shutdown.ended() => return Err(shutting_down().into()),
    };
    let version = llm::version_of(&target);
    let mut r = Json(json!({"model_name": model, "model_version": version, "text_output": text}))
        .into_response();
    crate::dispatch::headers(r.headers_mut(), &target.served(), &request_id);
    Ok(r)
}

/// What a request still running at the end of the shutdown grace period gets.
fn shutting_down() -> DnnError {
    DnnError::unavailable("the server is shutting down; send the request again")
}

async fn generate_stream(State(s): State<AppState>, g: Generate) -> KsResult<Response> {
    use futures::StreamExt;
    let Generate {
        model,
        target,
        request_id,
        events,
        ..
    } = g;
    let version = llm::version_of(&target);
    let pieces = llm::pieces(events);
    let events = pieces.map(move |piece| match piece {
        Ok(text) => json!({"model_name": model, "model_version": version, "text_output": text}),
        Err(e) => json!({"error": e.message}),
    });
    let events = crate::api::until_shutdown(events, s.shutdown.clone(), || {
        vec![json!({"error": shutting_down().message})]
    })
    .map(|event| {
        Ok::<_, std::convert::Infallible>(
            axum::response::sse::Event::default().data(event.to_string()),
        )
    });
    let mut r = axum::response::sse::Sse::new(events).into_response();
    crate::dispatch::headers(r.headers_mut(), &target.served(), &request_id);
    Ok(r)
}
