//! `switchyard eval perplexity`: a model's perplexity on a text, scored with
//! a sliding window as Hugging Face's perplexity guide does it: windows of
//! `context` tokens every `stride`, each token scored once, with at least
//! `context − stride` tokens of context after the first window.
use super::error::{LlmError, Result};
use super::kv_cache::KvDtype;
use super::model::LlamaModel;

/// The window `switchyard eval perplexity` and the benchmarks use unless told.
pub const DEFAULT_CONTEXT: usize = 512;
pub const DEFAULT_STRIDE: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Perplexity {
    /// Tokens scored (every token of the text but the first).
    pub tokens: usize,
    /// Mean negative log-likelihood per token, in nats.
    pub mean_nll: f64,
}

impl Perplexity {
    pub fn perplexity(&self) -> f64 {
        self.mean_nll.exp()
    }
}

/// Scores `tokens`; `progress(done, total)` follows the scored tokens.
pub fn perplexity(
    model: &LlamaModel,
    tokens: &[u32],
    context: usize,
    stride: usize,
    progress: &dyn Fn(usize, usize),
) -> Result<Perplexity> {
    if stride == 0 || stride > context || context < 2 {
        return Err(LlmError::InvalidRequest(format!(
            "context {context} and stride {stride}: need 2 <= context and 0 < stride <= context"
        )));
    }
    if context > model.config.max_position_embeddings {
        return Err(LlmError::InvalidRequest(format!(
            "context {context} exceeds the model's {} positions",
            model.config.max_position_embeddings
        )));
    }
    if tokens.len() < 2 {
        return Err(LlmError::InvalidRequest(
            "the text has fewer than 2 tokens".into(),
        ));
    }
    let total = tokens.len() - 1;
    let (mut nll, mut scored, mut prev_end) = (0f64, 0usize, 0usize);
    let mut begin = 0;
    loop {
        let end = (begin + context).min(tokens.len());
        // Score only what earlier windows left (at least from the second token).
        let from = (prev_end.max(1)).saturating_sub(begin).max(1);
        let lp = model.score(&tokens[begin..end], from, KvDtype::F32)?;
        nll -= lp.iter().map(|&v| v as f64).sum::<f64>();
        scored += lp.len();
        progress(scored, total);
        prev_end = end;
        if end == tokens.len() {
            break;
        }
        begin += stride;
    }
    Ok(Perplexity {
        tokens: scored,
        mean_nll: nll / scored as f64,
    })
}
