//! vLLM's `POST /tokenize` and `POST /detokenize`: a served model's
//! tokenizer (and chat template) over HTTP, so that clients count and
//! inspect tokens exactly as the engine will see them.
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
    model: String,
    /// Text, tokenized as `/v1/completions` does.
    prompt: Option<String>,
    /// Or a conversation, rendered with the chat template as
    /// `/v1/chat/completions` does (the assistant's turn opened).
    messages: Option<Vec<MessageIn>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetokenizeRequest {
    model: String,
    tokens: Vec<u32>,
}

/// The primary engine of the route `model` names (or of `model@version`).
fn engine(state: &AppState, model: &str) -> Result<LlmEngine, ApiError> {
    state
        .routes()
        .snapshot()
        .deployment(model)
        .map(|(engine, _)| engine)
        .ok_or_else(|| ApiError::model_not_found(model))
}

fn tokenize_body(state: &AppState, body: &[u8]) -> Result<serde_json::Value, ApiError> {
    let req: TokenizeRequest = parse(body)?;
    let engine = engine(state, &req.model)?;
    let tokens = match (&req.prompt, &req.messages) {
        (Some(text), None) => engine
            .tokenizer()
            .encode(text)
            .map_err(|e| ApiError::invalid("prompt", e.to_string()))?,
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
    let engine = engine(state, &req.model)?;
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

pub async fn tokenize(State(state): State<AppState>, OpenAiBody(body): OpenAiBody) -> Response {
    let s = state.clone();
    answer(
        state
            .offload
            .run(body.len(), move || tokenize_body(&s, &body))
            .await,
    )
}

pub async fn detokenize(State(state): State<AppState>, OpenAiBody(body): OpenAiBody) -> Response {
    answer(detokenize_body(&state, &body))
}
