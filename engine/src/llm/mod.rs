//! The LLM engine: model loading (GGUF, safetensors), tokenizer and chat template,
//! the flattened-batch llama forward pass, sampling, and the engine loop.
pub mod block_manager;
pub mod chat_template;
pub mod config;
pub mod detokenize;
pub mod engine;
pub mod error;
pub mod eval;
pub mod export;
pub mod guided;
pub mod kv_cache;
pub mod loader;
pub mod model;
pub mod quant;
pub mod sampling;
pub mod scheduler;
pub mod speculative;
pub mod tokenizer;
pub mod types;

pub use chat_template::{ChatMessage, ChatTemplate};
pub use config::LlamaConfig;
pub use engine::LlmEngine;
pub use error::LlmError;
pub use guided::Constraint;
pub use loader::{load_model, LoadedWeights};
pub use sampling::SamplingParams;
pub use tokenizer::Tokenizer;
pub use types::{
    EngineConfig, EngineStats, FinishReason, GenerationEvent, GenerationRequest, KvCacheSize,
    SpeculativeConfig, TokenLogprob, DEFAULT_KV_CACHE_FRACTION,
};
