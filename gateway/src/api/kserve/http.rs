//! KServe v2 over HTTP with Triton's extensions: health, metadata, config,
//! statistics, repository control, and infer with JSON or binary tensors
//! (`Inference-Header-Content-Length`), gzip/deflate bodies both ways.
use super::{
    config_not_a_string, encode, kserve_upstream, llm, llm_target, model_config, model_is_ready,
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
use engine::dnn::tensor::{bytes_elements, element_count, encode_bytes};
use engine::dnn::{
    DataType, DnnError, ErrorKind, InferRequest, InferResponse, RequestedOutput, Tensor,
};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

const HEADER_LENGTH: &str = "inference-header-content-length";

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

pub fn routes() -> Router<AppState> {
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
        .merge(model("/infer", post(infer)))
        .merge(model("/generate", post(generate)))
        .merge(model("/generate_stream", post(generate_stream)))
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
    let st = statistics(repository(&s.dnn)?, Some(&m), v)?;
    Ok(Json(proto::json::to_json(
        &st,
        "inference.ModelStatisticsResponse",
    )))
}

async fn all_stats(State(s): State<AppState>) -> KsResult<Json<Value>> {
    let st = statistics(repository(&s.dnn)?, None, None)?;
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

/// How the client wants each output: binary (the extension) or JSON data.
pub(crate) struct OutputFormat {
    default_binary: bool,
    binary: HashMap<String, bool>,
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// JSON `data` (flat or nested) as the tensor's binary encoding.
fn json_data(
    name: &str,
    dtype: DataType,
    shape: &[i64],
    data: &Value,
) -> Result<Vec<u8>, DnnError> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let want = element_count(shape)?;
    if flat.len() != want {
        return Err(DnnError::invalid(format!(
            "input '{name}': {} values in 'data', but shape {shape:?} holds {want}",
            flat.len()
        )));
    }
    let bad = |v: &Value| {
        DnnError::invalid(format!(
            "input '{name}': {v} is not a valid {} value",
            dtype.wire()
        ))
    };
    let float = |v: &Value| match v.as_str() {
        Some("NaN") => Some(f64::NAN),
        Some("Infinity") => Some(f64::INFINITY),
        Some("-Infinity") => Some(f64::NEG_INFINITY),
        _ => v.as_f64(),
    };
    let flat = flat.into_iter();
    match dtype {
        DataType::Bytes => {
            let strings = flat
                .map(|v| v.as_str().map(str::as_bytes).ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(encode_bytes(strings))
        }
        DataType::Bool => encode(name, dtype, flat, Value::as_bool, |b| [b as u8]),
        DataType::Uint8 => encode(name, dtype, flat, int::<u8>, u8::to_le_bytes),
        DataType::Int8 => encode(name, dtype, flat, int::<i8>, i8::to_le_bytes),
        DataType::Uint16 => encode(name, dtype, flat, int::<u16>, u16::to_le_bytes),
        DataType::Int16 => encode(name, dtype, flat, int::<i16>, i16::to_le_bytes),
        DataType::Uint32 => encode(name, dtype, flat, int::<u32>, u32::to_le_bytes),
        DataType::Int32 => encode(name, dtype, flat, int::<i32>, i32::to_le_bytes),
        DataType::Uint64 => encode(name, dtype, flat, int::<u64>, u64::to_le_bytes),
        DataType::Int64 => encode(name, dtype, flat, int::<i64>, i64::to_le_bytes),
        DataType::Fp16 => encode(name, dtype, flat, float, |f| {
            half::f16::from_f64(f).to_le_bytes()
        }),
        DataType::Bf16 => encode(name, dtype, flat, float, |f| {
            half::bf16::from_f64(f).to_le_bytes()
        }),
        DataType::Fp32 => encode(name, dtype, flat, float, |f| (f as f32).to_le_bytes()),
        DataType::Fp64 => encode(name, dtype, flat, float, f64::to_le_bytes),
    }
}

/// A JSON integer, if it fits `T`.
fn int<T: TryFrom<i128>>(v: &Value) -> Option<T> {
    let n = v
        .as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))?;
    T::try_from(n).ok()
}

/// A tensor's elements as flat JSON (BYTES as strings).
pub fn tensor_json(t: &Tensor) -> Value {
    fn each<const N: usize>(d: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        d.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N")))
            .collect()
    }
    let d = &t.data;
    Value::Array(match t.dtype {
        DataType::Bool => d.iter().map(|&b| Value::Bool(b != 0)).collect(),
        DataType::Uint8 => d.iter().map(|&b| b.into()).collect(),
        DataType::Int8 => d.iter().map(|&b| (b as i8).into()).collect(),
        DataType::Uint16 => each(d, |b| u16::from_le_bytes(b).into()),
        DataType::Int16 => each(d, |b| i16::from_le_bytes(b).into()),
        DataType::Uint32 => each(d, |b| u32::from_le_bytes(b).into()),
        DataType::Int32 => each(d, |b| i32::from_le_bytes(b).into()),
        DataType::Uint64 => each(d, |b| u64::from_le_bytes(b).into()),
        DataType::Int64 => each(d, |b| i64::from_le_bytes(b).into()),
        DataType::Fp16 => each(d, |b| half::f16::from_le_bytes(b).to_f64().into()),
        DataType::Bf16 => each(d, |b| half::bf16::from_le_bytes(b).to_f64().into()),
        DataType::Fp32 => each(d, |b| (f32::from_le_bytes(b) as f64).into()),
        DataType::Fp64 => each(d, |b| f64::from_le_bytes(b).into()),
        DataType::Bytes => bytes_elements(d)
            .unwrap_or_default()
            .into_iter()
            .map(|e| String::from_utf8_lossy(e).into_owned().into())
            .collect(),
    })
}

fn shape_of(name: &str, v: &Value) -> Result<Vec<i64>, DnnError> {
    v.as_array()
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_i64().filter(|d| *d >= 0))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            DnnError::invalid(format!(
                "input '{name}': 'shape' must be a list of non-negative integers"
            ))
        })
}

/// Python's `json` (and so tritonclient) writes NaN and infinities as bare
/// `NaN` / `Infinity` / `-Infinity`, which JSON does not have; this quotes
/// them outside strings so they parse, and float inputs accept the strings.
fn quote_non_finite(head: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let has = |t: &[u8]| head.windows(t.len()).any(|w| w == t);
    if !has(b"NaN") && !has(b"Infinity") {
        return std::borrow::Cow::Borrowed(head);
    }
    let mut out = Vec::with_capacity(head.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut i = 0;
    while i < head.len() {
        let c = head[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
        } else if let Some(token) = [b"NaN".as_slice(), b"Infinity", b"-Infinity"]
            .into_iter()
            .find(|t| head[i..].starts_with(t))
        {
            out.push(b'"');
            out.extend_from_slice(token);
            out.push(b'"');
            i += token.len();
            continue;
        }
        out.push(c);
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// Parses an infer request: JSON alone, or a JSON header followed by the
/// binary tensors, or (header length 0) one raw input tensor.
pub(crate) fn parse_infer(
    model: String,
    version: Option<i64>,
    headers: &HeaderMap,
    body: &[u8],
    repo: Option<&engine::dnn::ModelRepository>,
) -> Result<(InferRequest, OutputFormat), DnnError> {
    let header_len = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    DnnError::invalid("Inference-Header-Content-Length is not a number")
                })?,
        ),
    };
    if let Some(n) = header_len.filter(|&n| n > body.len()) {
        return Err(DnnError::invalid(format!(
            "Inference-Header-Content-Length ({n}) is larger than the body ({} bytes)",
            body.len()
        )));
    }
    if header_len == Some(0) {
        let repo =
            repo.ok_or_else(|| DnnError::invalid("a raw binary request needs a repository model"))?;
        return raw_request(model, version, body, repo);
    }
    let (head, mut binary) = body.split_at(header_len.unwrap_or(body.len()));
    let head = quote_non_finite(head);
    let req: Value = serde_json::from_slice(&head)
        .map_err(|e| DnnError::invalid(format!("failed to parse the request JSON buffer: {e}")))?;
    let obj = req
        .as_object()
        .ok_or_else(|| DnnError::invalid("the request must be a JSON object"))?;
    let empty = Map::new();
    let params = obj
        .get("parameters")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let inputs_json = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| DnnError::invalid("the request has no 'inputs' list"))?;
    let mut inputs = Vec::with_capacity(inputs_json.len());
    for (i, input) in inputs_json.iter().enumerate() {
        let name = input["name"]
            .as_str()
            .ok_or_else(|| DnnError::invalid(format!("inputs[{i}] has no 'name'")))?
            .to_string();
        let dt_name = input["datatype"].as_str().unwrap_or("");
        let dtype = DataType::from_wire(dt_name).ok_or_else(|| {
            DnnError::invalid(format!("input '{name}': invalid datatype '{dt_name}'"))
        })?;
        let shape = shape_of(&name, &input["shape"])?;
        let data = match input["parameters"]["binary_data_size"].as_u64() {
            Some(size) => {
                let size = size as usize;
                if size > binary.len() {
                    return Err(DnnError::invalid(format!(
                        "input '{name}': binary_data_size is {size} bytes, but only {} bytes of binary data remain",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                mine.to_vec()
            }
            None => match input.get("data") {
                Some(data) => json_data(&name, dtype, &shape, data)?,
                None => {
                    return Err(DnnError::invalid(format!(
                        "input '{name}' has neither 'data' nor binary_data_size"
                    )))
                }
            },
        };
        inputs.push(Tensor::new(name, dtype, shape, data));
    }
    if !binary.is_empty() {
        return Err(DnnError::invalid(format!(
            "{} bytes of binary data follow the inputs that no binary_data_size claims",
            binary.len()
        )));
    }
    let mut format = OutputFormat {
        default_binary: params
            .get("binary_data_output")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        binary: HashMap::new(),
    };
    let mut outputs = Vec::new();
    for (i, o) in obj
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let name = o["name"]
            .as_str()
            .ok_or_else(|| DnnError::invalid(format!("outputs[{i}] has no 'name'")))?
            .to_string();
        if let Some(b) = o["parameters"]["binary_data"].as_bool() {
            format.binary.insert(name.clone(), b);
        }
        let classification = match &o["parameters"]["classification"] {
            Value::Null => None,
            v => Some(v.as_u64().filter(|&k| k > 0).ok_or_else(|| {
                DnnError::invalid(format!(
                    "output '{name}': classification must be a positive integer"
                ))
            })? as usize),
        };
        outputs.push(RequestedOutput {
            name,
            classification,
        });
    }
    let timeout = params
        .get("timeout")
        .and_then(Value::as_u64)
        .map(Duration::from_micros);
    Ok((
        InferRequest {
            model,
            version,
            id: obj
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            inputs,
            outputs,
            timeout,
        },
        format,
    ))
}

/// `Inference-Header-Content-Length: 0`: the body is the model's single input, batch 1.
fn raw_request(
    model: String,
    version: Option<i64>,
    body: &[u8],
    repo: &engine::dnn::ModelRepository,
) -> Result<(InferRequest, OutputFormat), DnnError> {
    let (m, _) = repo.version(&model, version)?;
    let spec = &m.spec;
    let [input] = spec.inputs.as_slice() else {
        return Err(DnnError::invalid(format!(
            "a raw binary request needs a model with one input; '{model}' has {}",
            spec.inputs.len()
        )));
    };
    let mut shape = if spec.max_batch_size > 0 {
        vec![1]
    } else {
        vec![]
    };
    shape.extend(&input.dims);
    if shape.iter().any(|&d| d < 0) {
        return Err(DnnError::invalid(format!(
            "a raw binary request needs fixed dims; input '{}' has {:?}",
            input.name, input.dims
        )));
    }
    let tensor = Tensor::new(input.name.clone(), input.dtype, shape, body.to_vec());
    Ok((
        InferRequest {
            model,
            version,
            id: String::new(),
            inputs: vec![tensor],
            outputs: vec![],
            timeout: None,
        },
        OutputFormat {
            default_binary: true,
            binary: HashMap::new(),
        },
    ))
}

fn infer_body(resp: InferResponse, format: &OutputFormat) -> (Vec<u8>, Option<usize>) {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut binary: Vec<&[u8]> = Vec::new();
    for t in &resp.outputs {
        let mut o = json!({"name": t.name, "datatype": t.dtype.wire(), "shape": t.shape});
        if *format.binary.get(&t.name).unwrap_or(&format.default_binary) {
            o["parameters"] = json!({"binary_data_size": t.data.len()});
            binary.push(&t.data);
        } else {
            o["data"] = tensor_json(t);
        }
        outputs.push(o);
    }
    let mut head = json!({"model_name": resp.model_name, "model_version": resp.model_version, "outputs": outputs});
    if !resp.id.is_empty() {
        head["id"] = resp.id.as_str().into();
    }
    let mut body = serde_json::to_vec(&head).expect("JSON serializes");
    if binary.is_empty() {
        return (body, None);
    }
    let header_len = body.len();
    binary.iter().for_each(|b| body.extend_from_slice(b));
    (body, Some(header_len))
}

/// Compresses the response as `Accept-Encoding` asks (gzip or deflate).
fn encode_response(headers: &HeaderMap, body: Vec<u8>) -> (Option<&'static str>, Vec<u8>) {
    let accept = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let wants = |name: &str| {
        accept
            .split(',')
            .any(|e| e.split(';').next().unwrap_or("").trim() == name)
    };
    let compressed = if wants("gzip") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&body)
            .and_then(|_| enc.finish())
            .ok()
            .map(|b| ("gzip", b))
    } else if wants("deflate") {
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&body)
            .and_then(|_| enc.finish())
            .ok()
            .map(|b| ("deflate", b))
    } else {
        None
    };
    match compressed {
        Some((name, b)) => (Some(name), b),
        None => (None, body),
    }
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
fn generate_call(
    p: &HashMap<String, String>,
    body: &[u8],
    streaming: bool,
) -> Result<(String, llm::LlmCall), DnnError> {
    let (model, _) = target(p)?;
    let req = optional_json(body)?;
    let obj = req
        .as_object()
        .ok_or_else(|| DnnError::invalid("the request must be a JSON object"))?;
    let mut prompt = None;
    let mut sampling = Map::new();
    let mut exclude_input = false;
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
            "stream" => {
                let on = value
                    .as_bool()
                    .ok_or_else(|| DnnError::invalid("'stream' must be true or false"))?;
                if on && !streaming {
                    return Err(DnnError::invalid(
                        "'stream': true needs the generate_stream endpoint",
                    ));
                }
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
    ))
}

/// A generate request, read, checked and dispatched before the handler runs.
struct Generate {
    model: String,
    call: llm::LlmCall,
    target: crate::dispatch::llm::LlmTarget,
    request_id: String,
    /// The engine's events.
    events: tokio::sync::mpsc::UnboundedReceiver<engine::llm::GenerationEvent>,
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
        let (model, call) = generate_call(&p, &body, streaming)?;
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
        })
    }
}

async fn generate(State(s): State<AppState>, g: Generate) -> KsResult<Response> {
    let Generate {
        model,
        call,
        target,
        request_id,
        events,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_data_accepts_nested_lists_and_checks_types() {
        let d = json_data("x", DataType::Int8, &[2, 2], &json!([[1, -2], [3, 127]])).unwrap();
        assert_eq!(d, vec![1, 0xfe, 3, 127]);
        let e = json_data("x", DataType::Int8, &[1], &json!([128])).unwrap_err();
        assert!(
            e.message.contains("128 is not a valid INT8"),
            "{}",
            e.message
        );
        let e = json_data("x", DataType::Fp32, &[3], &json!([1.0, 2.0])).unwrap_err();
        assert!(e.message.contains("2 values"), "{}", e.message);
        let nan = json_data("x", DataType::Fp32, &[2], &json!(["NaN", "-Infinity"])).unwrap();
        assert!(f32::from_le_bytes(nan[..4].try_into().unwrap()).is_nan());
        let q = quote_non_finite(br#"{"a": [NaN, -Infinity, "NaN x"]}"#);
        assert_eq!(&*q, br#"{"a": ["NaN", "-Infinity", "NaN x"]}"#.as_slice());
        let s = json_data("s", DataType::Bytes, &[2], &json!(["hi", ""])).unwrap();
        assert_eq!(s, encode_bytes([b"hi".as_slice(), b""]));
        let t = Tensor::new("s", DataType::Bytes, vec![2], s);
        assert_eq!(tensor_json(&t), json!(["hi", ""]));
    }
}
