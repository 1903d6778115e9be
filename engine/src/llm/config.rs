//! Architecture hyper-parameters of a llama-family model (Llama, SmolLM2, Qwen2,
//! Mistral), read from GGUF metadata or a Hugging Face `config.json`.
use super::error::{LlmError, Result};
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub vocab_size: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f32,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    /// q/k/v projections carry a bias (Qwen2).
    pub attention_bias: bool,
    /// Rotary embedding on interleaved pairs: llama.cpp permutes llama q/k weights
    /// in GGUF files so that pairs are adjacent; Hugging Face keeps halves.
    pub rope_interleaved: bool,
}

/// The subset of a Hugging Face `config.json` that llama-family models use.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: Option<String>,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    num_key_value_heads: Option<usize>,
    head_dim: Option<usize>,
    vocab_size: usize,
    rms_norm_eps: f64,
    rope_theta: Option<f32>,
    max_position_embeddings: Option<usize>,
    tie_word_embeddings: Option<bool>,
    attention_bias: Option<bool>,
    rope_scaling: Option<serde_json::Value>,
}

impl LlamaConfig {
    /// Parses `config.json`; rejects architectures and rope scalings we do not run.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text)
            .map_err(|e| LlmError::Unsupported(format!("config.json: {e}")))?;
        let model_type = c.model_type.unwrap_or_else(|| "llama".into());
        if !matches!(model_type.as_str(), "llama" | "mistral" | "qwen2") {
            return Err(LlmError::Unsupported(format!(
                "config.json model_type `{model_type}`: supported are llama, mistral, qwen2"
            )));
        }
        if let Some(s) = c.rope_scaling.filter(|v| !v.is_null()) {
            return Err(LlmError::Unsupported(format!(
                "config.json rope_scaling {s} is not supported yet"
            )));
        }
        Ok(Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: c.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
            attention_bias: c.attention_bias.unwrap_or(model_type == "qwen2"),
            rope_interleaved: false,
        })
    }

    /// Checks the shapes fit together so a bad file fails at load, not mid-request.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(LlmError::Unsupported(m.to_string()));
        if self.num_attention_heads == 0 || self.num_key_value_heads == 0 {
            return bad("head counts must be positive");
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad("attention heads must be a multiple of key/value heads");
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad("head_dim must be even for rotary embeddings");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen2_gets_bias_and_defaults() {
        let c = LlamaConfig::from_hf_json(
            r#"{"model_type":"qwen2","hidden_size":64,"intermediate_size":128,
            "num_hidden_layers":2,"num_attention_heads":4,"num_key_value_heads":2,
            "vocab_size":100,"rms_norm_eps":1e-6}"#,
        )
        .unwrap();
        assert!(c.attention_bias);
        assert_eq!(c.head_dim, 16);
        assert_eq!(c.rope_theta, 10_000.0);
    }

    #[test]
    fn unknown_architecture_is_named() {
        let e = LlamaConfig::from_hf_json(
            r#"{"model_type":"gpt2","hidden_size":1,"intermediate_size":1,
            "num_hidden_layers":1,"num_attention_heads":1,"vocab_size":1,"rms_norm_eps":1e-6}"#,
        )
        .unwrap_err();
        assert!(e.to_string().contains("gpt2"), "{e}");
    }
}
