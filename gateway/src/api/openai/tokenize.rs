//! vLLM's `POST /tokenize`, `POST /detokenize` and `GET /tokenizer_info`:
//! a served model's tokenizer (and chat template) over HTTP, so that
//! clients count and inspect tokens exactly as the engine will see them
//! (lm-evaluation-harness tokenizes through them). `model` may be left out
//! when the server serves one LLM.
use super::{parse, render_chat};
use crate::api::error::{ApiError, OpenAiBody};
use crate::api::openai_types::{chat_messages, MessageIn};
use crate::api::AppState;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::llm::LlmEngine;
use serde::Deserialize;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenizeRequest {
    model: Option<String>,
    /// Text, tokenized as `/v1/completions` does.
    prompt: Option<String>,
    /// With `prompt`: false leaves out the BOS token the model adds.
    add_special_tokens: Option<bool>,
    /// Or a conversation, rendered with the chat template as
    /// `/v1/chat/completions` does (the assistant's turn opened).
    messages: Option<Vec<MessageIn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: Option<String>,
    tokens: Vec<u32>,
}

/// The primary engine of the route `model` names (or of `model@version`);
/// without a name, the one LLM route the server has.
fn engine(state: &AppState, model: Option<&str>) -> Result<LlmEngine, ApiError> {
    let table = state.routes().snapshot();
    let model = match model {
        Some(m) => m,
        None => {
            let mut names: Vec<&str> = table.routes.keys().map(String::as_str).collect();
            names.sort();
            match names.as_slice() {
                [one] => *one,
                _ => {
                    return Err(ApiError::invalid(
                        "model",
                        format!(
                            "name the `model`: this server serves {} LLMs ({})",
                            names.len(),
                            names.join(", ")
                        ),
                    ))
                }
            }
        }
    };
    table
        .deployment(model)
        .map(|(engine, _)| engine)
        .ok_or_else(|| ApiError::model_not_found(model))
}

fn tokenize_body(state: &AppState, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let req: TokenizeRequest = parse(body)?;
    let engine = engine(state, req.model.as_deref())?;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(text), None) => {
            let tok = engine.tokenizer();
            match req.add_special_tokens {
                Some(false) => tok.encode_plain(text),
                _ => tok.encode(text),
            }
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
        }
        (None, Some(messages)) => render_chat(&engine, chat_messages(messages)?, None, None)?,
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of `prompt` and `messages`",
            ))
        }
    };
    Ok(serde_json::json!({
        "count": tokens.len(),
        "max_model_len": engine.max_model_len(),
        "tokens": tokens,
    }))
}

fn detokenize_body(state: &AppState, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let req: DetokenizeRequest = parse(body)?;
    let engine = engine(state, req.model.as_deref())?;
    let vocab = engine.vocab_size();
    if let Some(t) = req.tokens.iter().find(|&&t| t as usize >= vocab) {
        return Err(ApiError::invalid(
            "tokens",
            format!("token {t} is outside this model's vocabulary of {vocab}"),
        ));
    }
    let text = engine
        .tokenizer()
        .decode(&req.tokens)
        .map_err(|e| ApiError::invalid("tokens", e.to_string()))?;
    Ok(serde_json::json!({ "prompt": text }))
}

fn answer(r: Result<serde_json::Value, ApiError>) -> Response {
    match r {
        Ok(v) => Json(v).into_response(),
        Err(e) => e.into_response(),
    }
}

pub async fn tokenize(State(state): State<AppState>, OpenAiBody(_, body): OpenAiBody) -> Response {
    let s = state.clone();
    answer(
        state
            .offload
            .run(body.len(), move || tokenize_body(&s, &body))
            .await,
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfoQuery {
    model: Option<String>,
}

/// `GET /tokenizer_info[?model=NAME]`: the special tokens, the chat
/// template and the context, as vLLM describes its tokenizer.
pub async fn tokenizer_info(
    State(state): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<InfoQuery>,
) -> Response {
    answer(engine(&state, q.model.as_deref()).map(|e| {
        let tok = e.tokenizer();
        serde_json::json!({
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": tok.bos_token(),
            "eos_token": tok.eos_token(),
            "pad_token": null,
            "chat_template": e.template().map(|t| t.source()),
            "model_max_length": e.max_model_len(),
            "vocab_size": e.vocab_size(),
        })
    }))
}

pub async fn detokenize(
    State(state): State<AppState>,
    OpenAiBody(_, body): OpenAiBody,
) -> Response {
    answer(detokenize_body(&state, &body))
}
