//! `POST /v1/embeddings`, served by the sentence encoders of the Triton
//! plane (a repository model, or a registry DNN route with its canary and
//! shadows): the request becomes a KServe `infer` call through the same
//! dispatch as `/v2/models/{name}/infer`, so both fronts give the same
//! vectors.
use super::parse;
use crate::api::error::{ApiError, OpenAiBody};
use crate::api::kserve;
use crate::api::openai_types::refuse_fields_outside;
use crate::api::AppState;
use crate::dispatch;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use engine::dnn::encoder::TOKEN_COUNT;
use engine::dnn::tensor::{encode_bytes, DataType, Tensor};
use engine::dnn::{DnnError, ErrorKind, InferRequest};
use serde::Deserialize;
use serde_json::{json, Value};

const FIELDS: &[&str] = &["model", "input", "encoding_format", "dimensions", "user"];

/// The most texts one request may embed.
const MAX_INPUTS: usize = 2048;

#[derive(Deserialize)]
struct EmbeddingsRequest {
    model: String,
    input: Value,
    encoding_format: Option<String>,
    dimensions: Option<Value>,
}

/// The texts of `input`: a string or a list of strings.
fn texts(input: &Value) -> Result<Vec<String>, ApiError> {
    let invalid = |m: &str| Err(ApiError::invalid("input", m.to_string()));
    let texts: Vec<String> = match input {
        Value::String(s) => vec![s.clone()],
        Value::Array(v) if !v.is_empty() && v.iter().all(Value::is_string) => v
            .iter()
            .map(|s| s.as_str().unwrap_or_default().to_string())
            .collect(),
        Value::Array(v) if !v.is_empty() && v.iter().all(|t| t.is_number() || t.is_array()) => {
            return invalid(
                "token-id input is not supported: the encoder models take text with their own tokenizer; send strings",
            )
        }
        _ => return invalid("`input` must be a string or a non-empty list of strings"),
    };
    if texts.iter().any(String::is_empty) {
        return invalid("`input` strings must not be empty");
    }
    if texts.len() > MAX_INPUTS {
        return Err(ApiError::invalid(
            "input",
            format!(
                "`input` takes at most {MAX_INPUTS} strings, got {}",
                texts.len()
            ),
        ));
    }
    Ok(texts)
}

/// A KServe error in OpenAI's shape.
fn api_error(e: DnnError, model: &str) -> ApiError {
    match e.kind {
        ErrorKind::InvalidArg => ApiError::invalid("input", e.message),
        ErrorKind::NotFound => ApiError::model_not_found(model),
        ErrorKind::Unavailable => ApiError::unavailable(e.message),
        _ => ApiError::internal(e.message),
    }
}

/// What the encoder's config says: its input, its vector output and its
/// width, whether it counts tokens, and its largest batch (0: none).
struct Encoder {
    input: String,
    input_dims: Vec<i64>,
    output: String,
    width: usize,
    counts: bool,
    max_batch: usize,
}

async fn encoder(state: &AppState, model: &str) -> Result<Encoder, ApiError> {
    if state.routes().snapshot().deployment(model).is_some() {
        return Err(ApiError::invalid(
            "model",
            format!(
                "`{model}` is a generative model; /v1/embeddings is served by the sentence encoders \
                 of the model repository"
            ),
        ));
    }
    let config = kserve::model_config(state, model, None)
        .await
        .map_err(|e| api_error(e, model))?;
    let not_encoder = || {
        ApiError::invalid(
            "model",
            format!(
                "`{model}` is not a sentence encoder (one TYPE_STRING input, one TYPE_FP32 vector output)"
            ),
        )
    };
    let [input] = config.input.as_slice() else {
        return Err(not_encoder());
    };
    if DataType::from_config(input.data_type) != Some(DataType::Bytes) {
        return Err(not_encoder());
    }
    let vectors: Vec<_> = config
        .output
        .iter()
        .filter(|o| o.name != TOKEN_COUNT)
        .collect();
    let [output] = vectors.as_slice() else {
        return Err(not_encoder());
    };
    let width = match output.dims.as_slice() {
        [w] if *w > 0 && DataType::from_config(output.data_type) == Some(DataType::Fp32) => {
            *w as usize
        }
        _ => return Err(not_encoder()),
    };
    Ok(Encoder {
        input: input.name.clone(),
        input_dims: input.dims.clone(),
        output: output.name.clone(),
        width,
        counts: config.output.iter().any(|o| o.name == TOKEN_COUNT),
        max_batch: config.max_batch_size.max(0) as usize,
    })
}

async fn embed(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Value, Option<dispatch::Served>), ApiError> {
    let req: EmbeddingsRequest = parse(body)?;
    refuse_fields_outside(body, &[FIELDS])?;
    let texts = texts(&req.input)?;
    let base64 = match req.encoding_format.as_deref() {
        None | Some("float") => false,
        Some("base64") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "encoding_format",
                format!("`encoding_format` must be float or base64, got `{other}`"),
            ))
        }
    };
    let enc = encoder(state, &req.model).await?;
    if req.dimensions.is_some() {
        return Err(ApiError::invalid(
            "dimensions",
            format!(
                "`{}` gives vectors of {} values and cannot shorten them; leave `dimensions` out",
                req.model, enc.width
            ),
        ));
    }
    let chunk = if enc.max_batch == 0 { 1 } else { enc.max_batch };
    let (mut data, mut tokens, mut served) = (Vec::with_capacity(texts.len()), 0i64, None);
    for (c, batch) in texts.chunks(chunk).enumerate() {
        let mut shape = vec![batch.len() as i64];
        if enc.max_batch > 0 {
            shape.extend(&enc.input_dims);
        }
        let input = Tensor::new(
            enc.input.clone(),
            DataType::Bytes,
            shape,
            encode_bytes(batch.iter().map(|t| t.as_bytes())),
        );
        let call = InferRequest {
            model: req.model.clone(),
            version: None,
            id: String::new(),
            inputs: vec![input],
            outputs: vec![],
            timeout: None,
        };
        let (resp, s) = kserve::infer(state, call, headers)
            .await
            .map_err(|e| api_error(e, &req.model))?;
        served = served.or(s);
        let vectors = resp
            .outputs
            .iter()
            .find(|t| t.name == enc.output)
            .ok_or_else(|| ApiError::internal(format!("the encoder gave no `{}`", enc.output)))?;
        let values = vectors.data.chunks_exact(4 * enc.width);
        for (i, row) in values.enumerate() {
            let embedding = match base64 {
                true => json!(base64::engine::general_purpose::STANDARD.encode(row)),
                false => json!(row
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect::<Vec<_>>()),
            };
            data.push(
                json!({"object": "embedding", "index": c * chunk + i, "embedding": embedding}),
            );
        }
        if let Some(t) = resp
            .outputs
            .iter()
            .find(|t| t.name == TOKEN_COUNT && enc.counts)
        {
            tokens += t
                .data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")))
                .sum::<i64>();
        }
    }
    if data.len() != texts.len() {
        return Err(ApiError::internal(format!(
            "the encoder gave {} vectors for {} inputs",
            data.len(),
            texts.len()
        )));
    }
    let body = json!({"object": "list", "data": data, "model": req.model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
    Ok((body, served))
}

pub async fn embeddings(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBody(body): OpenAiBody,
) -> Response {
    match embed(&state, &headers, &body).await {
        Ok((body, served)) => {
            let mut resp = Json(body).into_response();
            if let Some(s) = served {
                let id = dispatch::request_id(&headers, "embd");
                dispatch::headers(resp.headers_mut(), &s, &id);
            }
            resp
        }
        Err(e) => e.into_response(),
    }
}
