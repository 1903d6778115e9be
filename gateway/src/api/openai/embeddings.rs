//! `POST /v1/embeddings`, served by the sentence encoders of the Triton
//! plane (a repository model, or a registry DNN route with its canary and
//! shadows): the request becomes a KServe `infer` call through the same
//! dispatch as `/v2/models/{name}/infer`, so both fronts give the same
//! vectors. An LLM configured with `engine: { embeddings: true }` serves
//! them too, as its mean-pooled final hidden states, and takes token ids.
use super::parse;
use crate::api::error::{ApiError, OpenAiBody};
use crate::api::kserve;
use crate::api::openai_types::{prompt_forms, refuse_fields_outside, PromptIn};
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
use engine::llm::LlmEngine;
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

/// `input` ([`prompt_forms`]), its strings not empty.
fn inputs(input: &Value) -> Result<Vec<PromptIn>, ApiError> {
    let inputs = prompt_forms(input, "input", MAX_INPUTS)?;
    if inputs.contains(&PromptIn::Text(String::new())) {
        return Err(ApiError::invalid(
            "input",
            "`input` strings must not be empty",
        ));
    }
    Ok(inputs)
}

/// One vector as the response carries it: a list of floats, or base64 of
/// their little-endian bytes.
fn encode(values: &[f32], base64: bool) -> Value {
    match base64 {
        true => {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            json!(base64::engine::general_purpose::STANDARD.encode(bytes))
        }
        false => json!(values),
    }
}

/// Embeddings from an LLM configured for them: each input's tokens (text
/// through the model's tokenizer), one pass each on the engine thread.
async fn llm_embeddings(
    engine: &LlmEngine,
    model: &str,
    inputs: Vec<PromptIn>,
    base64: bool,
) -> Result<(Vec<Value>, i64), ApiError> {
    if !engine.serves_embeddings() {
        return Err(ApiError::invalid(
            "model",
            format!(
                "`{model}` is a generative model not configured for embeddings: set \
                 `engine: {{ embeddings: true }}` on it, or name a sentence encoder of the model repository"
            ),
        ));
    }
    let token_lists: Vec<Vec<u32>> = inputs
        .into_iter()
        .map(|i| match i {
            PromptIn::Ids(ids) => Ok(ids),
            PromptIn::Text(t) => engine.tokenizer().encode(&t),
        })
        .collect::<Result<_, _>>()
        .map_err(|e| ApiError::invalid("input", e.to_string()))?;
    let (mut data, mut tokens) = (Vec::with_capacity(token_lists.len()), 0i64);
    for (i, ids) in token_lists.into_iter().enumerate() {
        tokens += ids.len() as i64;
        let vector = engine
            .embed(ids)
            .map_err(|e| ApiError::invalid("input", e.to_string()))?
            .await
            .map_err(|_| ApiError::internal("the engine stopped"))?
            .map_err(ApiError::internal)?;
        data.push(json!({"object": "embedding", "index": i, "embedding": encode(&vector, base64)}));
    }
    Ok((data, tokens))
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
    let inputs = inputs(&req.input)?;
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
    if req.dimensions.is_some() {
        return Err(ApiError::invalid(
            "dimensions",
            format!(
                "`{}` gives vectors of one fixed size and cannot shorten them; leave `dimensions` out",
                req.model
            ),
        ));
    }
    let llm = state.routes().snapshot().deployment(&req.model);
    let (data, tokens, served) = match llm {
        Some((engine, _)) => {
            let (data, tokens) = llm_embeddings(&engine, &req.model, inputs, base64).await?;
            (data, tokens, None)
        }
        None => {
            let texts: Option<Vec<String>> = inputs
                .into_iter()
                .map(|i| match i {
                    PromptIn::Text(t) => Some(t),
                    PromptIn::Ids(_) => None,
                })
                .collect();
            let texts = texts.ok_or_else(|| {
                ApiError::invalid(
                    "input",
                    "token-id input is not supported by sentence encoders: they take text with \
                     their own tokenizer; send strings",
                )
            })?;
            encoder_embeddings(state, headers, &req.model, &texts, base64).await?
        }
    };
    let body = json!({"object": "list", "data": data, "model": req.model,
                      "usage": {"prompt_tokens": tokens, "total_tokens": tokens}});
    Ok((body, served))
}

/// Embeddings from a sentence encoder of the plane, through KServe `infer`
/// in batches the model takes.
async fn encoder_embeddings(
    state: &AppState,
    headers: &HeaderMap,
    model: &str,
    texts: &[String],
    base64: bool,
) -> Result<(Vec<Value>, i64, Option<dispatch::Served>), ApiError> {
    let enc = encoder(state, model).await?;
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
            model: model.to_string(),
            version: None,
            id: String::new(),
            inputs: vec![input],
            outputs: vec![],
            timeout: None,
        };
        let (resp, s) = kserve::infer(state, call, headers)
            .await
            .map_err(|e| api_error(e, model))?;
        served = served.or(s);
        let vectors = resp
            .outputs
            .iter()
            .find(|t| t.name == enc.output)
            .ok_or_else(|| ApiError::internal(format!("the encoder gave no `{}`", enc.output)))?;
        for (i, row) in vectors.data.chunks_exact(4 * enc.width).enumerate() {
            let values: Vec<f32> = row
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            data.push(json!({"object": "embedding", "index": c * chunk + i,
                             "embedding": encode(&values, base64)}));
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
    Ok((data, tokens, served))
}

pub async fn embeddings(
    State(state): State<AppState>,
    OpenAiBody(headers, body): OpenAiBody,
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
