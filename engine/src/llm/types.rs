//! The engine's configuration and the shapes of what goes in and comes out:
//! requests, their events, and the engine's counters.
use super::guided::Constraint;
use super::kv_cache::KvDtype;
use super::sampling::SamplingParams;

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Requests that may wait for admission; more are refused with [`LlmError::QueueFull`].
    pub max_waiting: usize,
    /// Longest prompt + output served; capped by the model's own context and
    /// by the KV pool.
    pub max_model_len: usize,
    /// Tokens per KV block.
    pub block_size: usize,
    pub kv_cache: KvCacheSize,
    /// How keys and values are stored (f16 halves the pool's memory and the
    /// traffic of attention; f32 keeps them exact).
    pub kv_cache_dtype: KvDtype,
    /// Reuse the KV blocks of a prompt prefix seen before.
    pub enable_prefix_caching: bool,
    /// Serve `/v1/embeddings` from this model (mean-pooled final hidden
    /// states); off unless configured.
    pub embeddings: bool,
}

/// The KV pool's default share of the memory available at start.
pub const DEFAULT_KV_CACHE_FRACTION: f64 = 0.25;

/// How much memory the KV pool takes, fixed when the engine starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvCacheSize {
    Bytes(u64),
    /// A share of the memory available when the engine starts.
    FractionOfFree(f64),
}

impl KvCacheSize {
    pub(crate) fn bytes(self) -> u64 {
        match self {
            Self::Bytes(b) => b,
            Self::FractionOfFree(f) => (available_memory() as f64 * f) as u64,
        }
    }
}

/// `MemAvailable` from `/proc/meminfo`, or 4 GiB where there is none.
fn available_memory() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(4 << 30, |kb| kb * 1024)
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 16,
            max_num_batched_tokens: 256,
            max_waiting: 64,
            max_model_len: 8192,
            block_size: 16,
            kv_cache: KvCacheSize::FractionOfFree(DEFAULT_KV_CACHE_FRACTION),
            kv_cache_dtype: KvDtype::default(),
            enable_prefix_caching: true,
            embeddings: false,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// EOS and stop strings are ignored until this many tokens exist.
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Parallel samples of the prompt; they share its KV blocks.
    pub n: usize,
    /// Structured output: every sample stays inside this grammar.
    pub constraint: Option<Constraint>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token's id in the model's vocabulary.
    pub id: u32,
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Text released by one generated token of sample `index` (may be empty
    /// while held back).
    Delta {
        index: usize,
        text: String,
        logprob: Option<TokenLogprob>,
    },
    /// Sample `index` is complete; the request is once all `n` are.
    Finished {
        index: usize,
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
        /// Prompt tokens found in the prefix cache when it was first
        /// scheduled (OpenAI's `usage.prompt_tokens_details.cached_tokens`).
        cached_tokens: usize,
    },
    Failed(String),
}

/// A snapshot of an engine's KV pool and scheduler counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    pub total_blocks: usize,
    pub free_blocks: usize,
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache, and found there.
    pub prefix_queried: u64,
    pub prefix_hit: u64,
}
