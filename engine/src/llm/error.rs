//! Typed errors of the LLM engine; the gateway maps them to protocol errors.
use thiserror::Error;

#[derive(Debug, Error)]
pub enum LlmError {
    #[error("model file {path}: {reason}")]
    Load { path: String, reason: String },
    #[error("unsupported model: {0}")]
    Unsupported(String),
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("chat template: {0}")]
    Template(String),
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The request's structured-output constraint does not compile.
    #[error("{0}")]
    Constraint(String),
    #[error(
        "prompt ({prompt}) + max_tokens ({max_tokens}) exceeds the model's context of {max} tokens"
    )]
    ContextLength {
        max: usize,
        prompt: usize,
        max_tokens: usize,
    },
    #[error("the request queue is full ({capacity} requests waiting)")]
    QueueFull { capacity: usize },
    #[error("the engine has stopped")]
    EngineStopped,
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, LlmError>;
