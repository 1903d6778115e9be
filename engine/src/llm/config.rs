//! Architecture hyper-parameters of a decoder of the llama family (Llama,
//! SmolLM2, Mistral, Qwen2 / Qwen3, Gemma 2 / 3, Phi-3), read from GGUF
//! metadata or a Hugging Face `config.json`: the shapes, and the few ways the
//! families differ from Llama (QK norm, sandwich norms, GeGLU, scaled
//! embeddings, soft-capping, sliding windows, rotary scaling).
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
    /// Each head of q and k is RMS-normalized before the rotary embedding
    /// (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Attention's and the MLP's outputs are normalized too before they join
    /// the residual (Gemma 2 / 3).
    pub sandwich_norms: bool,
    pub activation: Activation,
    /// Token embeddings are multiplied by √hidden_size (Gemma).
    pub scale_embeddings: bool,
    /// Multiplies `q · k`: `1/√head_dim` unless the model says otherwise.
    pub attn_scale: f32,
    /// Attention scores become `cap · tanh(score / cap)` (Gemma 2).
    pub attn_softcap: Option<f32>,
    /// Final logits become `cap · tanh(logit / cap)` (Gemma 2).
    pub final_softcap: Option<f32>,
    /// Sliding-window attention: a token sees itself and the `window - 1`
    /// tokens before it.
    pub sliding_window: Option<usize>,
    /// Which layers slide when there is a window (Gemma 2 alternates,
    /// Gemma 3 has one global layer in six); empty: all of them (Mistral).
    pub sliding_layers: Vec<bool>,
    /// The rotary base of sliding layers, where it differs (Gemma 3); their
    /// frequencies are not scaled.
    pub rope_local_theta: Option<f32>,
    pub rope_scaling: Option<RopeScaling>,
    /// Added to every norm weight of a Hugging Face checkpoint: Gemma stores
    /// `w - 1` there (its GGUF files have the 1 added back already).
    pub norm_weight_offset: f32,
}

/// The MLP's gate activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// SwiGLU: `silu(gate) · up`.
    Silu,
    /// GeGLU with GELU's tanh approximation (Gemma).
    GeluTanh,
}

/// How rotary frequencies are stretched past the trained context.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor` (every frequency over `factor`).
    Linear { factor: f32 },
    /// NTK-aware base scaling, fixed for the longest context
    /// (`max_position_embeddings · factor`), as vLLM computes it.
    Dynamic { factor: f32 },
    /// Llama 3.1's: low frequencies over `factor`, high ones kept, a smooth
    /// ramp between.
    Llama3 {
        factor: f32,
        low_freq_factor: f32,
        high_freq_factor: f32,
        original_max_position_embeddings: usize,
    },
    /// YaRN: interpolation at low frequencies, extrapolation at high ones,
    /// and cos/sin scaled by `attention_factor`.
    Yarn {
        factor: f32,
        original_max_position_embeddings: usize,
        beta_fast: f32,
        beta_slow: f32,
        attention_factor: f32,
    },
    /// A divisor per frequency, as llama.cpp stores Llama 3.1's scaling in
    /// a GGUF file (`rope_freqs.weight`).
    Divisors(Vec<f32>),
}

impl RopeScaling {
    /// Reads a `rope_scaling` object of `config.json` (`rope_type`, or the
    /// older `type`); `default` and null are no scaling.
    pub fn from_hf(v: &serde_json::Value, max_positions: usize) -> Result<Option<Self>> {
        if v.is_null() {
            return Ok(None);
        }
        let kind = v
            .get("rope_type")
            .or_else(|| v.get("type"))
            .and_then(|t| t.as_str())
            .unwrap_or("default");
        let num = |key: &str| v.get(key).and_then(|x| x.as_f64()).map(|x| x as f32);
        let factor = || {
            num("factor").filter(|f| *f > 0.0).ok_or_else(|| {
                LlmError::Unsupported(format!(
                    "config.json rope_scaling {kind} needs a positive `factor`"
                ))
            })
        };
        let original = v
            .get("original_max_position_embeddings")
            .and_then(|x| x.as_u64())
            .map_or(max_positions, |x| x as usize);
        Ok(Some(match kind {
            "default" => return Ok(None),
            "linear" => Self::Linear { factor: factor()? },
            "dynamic" => Self::Dynamic { factor: factor()? },
            "llama3" => Self::Llama3 {
                factor: factor()?,
                low_freq_factor: num("low_freq_factor").unwrap_or(1.0),
                high_freq_factor: num("high_freq_factor").unwrap_or(4.0),
                original_max_position_embeddings: original,
            },
            "yarn" => {
                let factor = factor()?;
                let mscale = |m: f32| {
                    if factor <= 1.0 {
                        1.0
                    } else {
                        0.1 * m * factor.ln() + 1.0
                    }
                };
                let attention_factor = match (
                    num("attention_factor"),
                    num("mscale"),
                    num("mscale_all_dim"),
                ) {
                    (Some(a), _, _) => a,
                    (None, Some(m), Some(all)) if m != 0.0 && all != 0.0 => mscale(m) / mscale(all),
                    _ => mscale(1.0),
                };
                Self::Yarn {
                    factor,
                    original_max_position_embeddings: original,
                    beta_fast: num("beta_fast").unwrap_or(32.0),
                    beta_slow: num("beta_slow").unwrap_or(1.0),
                    attention_factor,
                }
            }
            other => {
                return Err(LlmError::Unsupported(format!(
                    "config.json rope_scaling type `{other}` is not supported: \
                     supported are linear, dynamic, llama3 and yarn"
                )))
            }
        }))
    }

    /// The positions a model with this scaling (or none) serves, given the
    /// `max_position_embeddings` its config states.
    pub fn positions(scaling: Option<&Self>, max_positions: usize) -> usize {
        match scaling {
            Some(&Self::Dynamic { factor }) => (max_positions as f32 * factor) as usize,
            Some(&Self::Yarn {
                factor,
                original_max_position_embeddings: o,
                ..
            }) => max_positions.max((o as f32 * factor) as usize),
            _ => max_positions,
        }
    }
}

impl LlamaConfig {
    /// The inverse rotary frequencies of a layer (`head_dim / 2` of them)
    /// with base `theta`, scaled as the model says, and the factor cos and
    /// sin are multiplied by.
    pub fn rope_frequencies(&self, theta: f32) -> (Vec<f32>, f32) {
        self.frequencies(theta, self.rope_scaling.as_ref())
    }

    /// The rotary tables' frequencies and factor of layer `i`.
    pub fn layer_rope(&self, layer: usize) -> (Vec<f32>, f32) {
        match self.rope_local_theta {
            Some(local) if self.slides(layer) => self.frequencies(local, None),
            _ => self.rope_frequencies(self.rope_theta),
        }
    }

    fn frequencies(&self, theta: f32, scaling: Option<&RopeScaling>) -> (Vec<f32>, f32) {
        let d = self.head_dim;
        let base = |theta: f32| -> Vec<f32> {
            (0..d / 2)
                .map(|i| 1.0 / theta.powf(2.0 * i as f32 / d as f32))
                .collect()
        };
        let Some(scaling) = scaling else {
            return (base(theta), 1.0);
        };
        match *scaling {
            RopeScaling::Divisors(ref divisors) => (
                base(theta)
                    .iter()
                    .zip(divisors)
                    .map(|(f, d)| f / d)
                    .collect(),
                1.0,
            ),
            RopeScaling::Linear { factor } => {
                (base(theta).into_iter().map(|f| f / factor).collect(), 1.0)
            }
            RopeScaling::Dynamic { factor } => {
                let theta =
                    theta * (factor * factor - factor + 1.0).powf(d as f32 / (d as f32 - 2.0));
                (base(theta), 1.0)
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor: low,
                high_freq_factor: high,
                original_max_position_embeddings: o,
            } => {
                let o = o as f32;
                let (low_wavelen, high_wavelen) = (o / low, o / high);
                let freqs = base(theta)
                    .into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f32::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (o / wavelen - low) / (high - low);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect();
                (freqs, 1.0)
            }
            RopeScaling::Yarn {
                factor,
                original_max_position_embeddings: o,
                beta_fast,
                beta_slow,
                attention_factor,
            } => {
                let dim = d as f32;
                let correction = |rotations: f32| {
                    dim * (o as f32 / (rotations * 2.0 * std::f32::consts::PI)).ln()
                        / (2.0 * theta.ln())
                };
                let low = correction(beta_fast).floor().max(0.0);
                let mut high = correction(beta_slow).ceil().min(dim - 1.0);
                if low == high {
                    high += 0.001;
                }
                let freqs = base(theta)
                    .into_iter()
                    .enumerate()
                    .map(|(i, f)| {
                        let ramp = ((i as f32 - low) / (high - low)).clamp(0.0, 1.0);
                        let extrapolate = 1.0 - ramp;
                        f / factor * (1.0 - extrapolate) + f * extrapolate
                    })
                    .collect();
                (freqs, attention_factor)
            }
        }
    }

    /// Whether layer `i` attends through the sliding window.
    pub fn slides(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(layer).is_none_or(|s| *s)
    }

    /// Layers `0..n` where every `period`th one is global (Gemma's pattern).
    pub fn periodic(n: usize, period: usize) -> Vec<bool> {
        (0..n).map(|i| !(i + 1).is_multiple_of(period)).collect()
    }
}

/// The subset of a Hugging Face `config.json` that the supported families use.
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
    #[serde(default)]
    rope_scaling: serde_json::Value,
    sliding_window: Option<usize>,
    use_sliding_window: Option<bool>,
    sliding_window_pattern: Option<usize>,
    layer_types: Option<Vec<String>>,
    rope_local_base_freq: Option<f32>,
    query_pre_attn_scalar: Option<f32>,
    attn_logit_softcapping: Option<f32>,
    final_logit_softcapping: Option<f32>,
    hidden_activation: Option<String>,
    hidden_act: Option<String>,
    partial_rotary_factor: Option<f32>,
}

/// The `model_type`s that load, as `config.json` names them.
pub const HF_MODEL_TYPES: [&str; 8] = [
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma2",
    "gemma3",
    "gemma3_text",
    "phi3",
];

impl LlamaConfig {
    /// Parses `config.json`; rejects architectures and options we do not run,
    /// naming them.
    pub fn from_hf_json(text: &str) -> Result<Self> {
        let c: HfConfig = serde_json::from_str(text)
            .map_err(|e| LlmError::Unsupported(format!("config.json: {e}")))?;
        let model_type = c.model_type.clone().unwrap_or_else(|| "llama".into());
        let unsupported = |m: String| Err(LlmError::Unsupported(format!("config.json {m}")));
        if !HF_MODEL_TYPES.contains(&model_type.as_str()) {
            return unsupported(format!(
                "model_type `{model_type}`: supported are {}",
                HF_MODEL_TYPES.join(", ")
            ));
        }
        let gemma = model_type.starts_with("gemma");
        let activation = match c.hidden_activation.as_deref().or(c.hidden_act.as_deref()) {
            None if gemma => Activation::GeluTanh,
            None | Some("silu") => Activation::Silu,
            Some("gelu_pytorch_tanh") => Activation::GeluTanh,
            Some(other) => {
                return unsupported(format!(
                    "hidden activation `{other}`: supported are silu and gelu_pytorch_tanh"
                ))
            }
        };
        if c.partial_rotary_factor.is_some_and(|f| f != 1.0) {
            return unsupported("partial_rotary_factor below 1 is not supported".into());
        }
        let max_positions = c.max_position_embeddings.unwrap_or(2048);
        let rope_scaling = RopeScaling::from_hf(&c.rope_scaling, max_positions)?;
        let head_dim = c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads);
        let qwen = model_type.starts_with("qwen");
        let sliding_window = match (qwen, c.use_sliding_window) {
            // Qwen's configs name a window they do not use unless asked.
            (true, Some(true)) => {
                return unsupported(
                    "use_sliding_window: true (Qwen's per-layer windows) is not supported".into(),
                )
            }
            (true, _) => None,
            _ => c.sliding_window,
        };
        let sliding_layers = match (&c.layer_types, model_type.as_str()) {
            (Some(types), _) => types
                .iter()
                .map(|t| match t.as_str() {
                    "sliding_attention" => Ok(true),
                    "full_attention" => Ok(false),
                    other => Err(LlmError::Unsupported(format!(
                        "config.json layer_types: `{other}` is not one of \
                         sliding_attention, full_attention"
                    ))),
                })
                .collect::<Result<_>>()?,
            (None, "gemma2") => Self::periodic(c.num_hidden_layers, 2),
            (None, "gemma3" | "gemma3_text") => {
                Self::periodic(c.num_hidden_layers, c.sliding_window_pattern.unwrap_or(6))
            }
            _ => Vec::new(),
        };
        let config = Self {
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim,
            vocab_size: c.vocab_size,
            rms_norm_eps: c.rms_norm_eps,
            rope_theta: c.rope_theta.unwrap_or(10_000.0),
            max_position_embeddings: RopeScaling::positions(rope_scaling.as_ref(), max_positions),
            tie_word_embeddings: c.tie_word_embeddings.unwrap_or(gemma),
            attention_bias: c.attention_bias.unwrap_or(model_type == "qwen2"),
            rope_interleaved: false,
            qk_norm: model_type == "qwen3" || model_type.starts_with("gemma3"),
            sandwich_norms: gemma,
            activation,
            scale_embeddings: gemma,
            attn_scale: 1.0 / c.query_pre_attn_scalar.unwrap_or(head_dim as f32).sqrt(),
            attn_softcap: c.attn_logit_softcapping,
            final_softcap: c.final_logit_softcapping,
            sliding_window,
            sliding_layers,
            rope_local_theta: c.rope_local_base_freq.filter(|_| gemma),
            rope_scaling,
            norm_weight_offset: if gemma { 1.0 } else { 0.0 },
        };
        config.validate()?;
        Ok(config)
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
        if self.sliding_window == Some(0) {
            return bad("sliding_window must be positive");
        }
        if !self.sliding_layers.is_empty() && self.sliding_layers.len() != self.num_hidden_layers {
            return bad("layer_types must name one type per layer");
        }
        if let Some(RopeScaling::Divisors(d)) = &self.rope_scaling {
            if d.len() != self.head_dim / 2 {
                return bad("rope_freqs must hold one divisor per rotary frequency");
            }
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

    fn tiny(extra: &str) -> std::result::Result<LlamaConfig, LlmError> {
        LlamaConfig::from_hf_json(&format!(
            r#"{{"hidden_size":64,"intermediate_size":128,"num_hidden_layers":6,
            "num_attention_heads":4,"vocab_size":100,"rms_norm_eps":1e-6,
            "max_position_embeddings":1024{extra}}}"#
        ))
    }

    fn freqs(extra: &str) -> Vec<f32> {
        tiny(extra).unwrap().rope_frequencies(10_000.0).0
    }

    #[test]
    fn linear_scaling_divides_every_frequency() {
        let plain = freqs("");
        let scaled = freqs(r#","rope_scaling":{"type":"linear","factor":4.0}"#);
        for (p, s) in plain.iter().zip(&scaled) {
            assert!((p / 4.0 - s).abs() < 1e-9);
        }
    }

    #[test]
    fn dynamic_scaling_raises_the_base_and_the_context() {
        let c = tiny(r#","rope_scaling":{"rope_type":"dynamic","factor":2.0}"#).unwrap();
        assert_eq!(c.max_position_embeddings, 2048);
        // vLLM's base for the longest context: θ·(f² − f + 1)^(d/(d−2)).
        let theta = 10_000f32 * 3f32.powf(16.0 / 14.0);
        let want = 1.0 / theta.powf(2.0 / 16.0);
        let got = c.rope_frequencies(10_000.0).0[1];
        assert!((got - want).abs() / want < 1e-5, "{got} vs {want}");
    }

    #[test]
    fn yarn_keeps_high_frequencies_and_interpolates_low_ones() {
        let c = tiny(
            r#","rope_scaling":{"rope_type":"yarn","factor":4.0,"original_max_position_embeddings":256}"#,
        )
        .unwrap();
        assert_eq!(c.max_position_embeddings, 1024);
        let plain = freqs("");
        let (scaled, factor) = c.rope_frequencies(10_000.0);
        assert!(
            (scaled[0] - plain[0]).abs() < 1e-9,
            "fastest rotation extrapolates"
        );
        let last = plain.len() - 1;
        assert!(
            (scaled[last] - plain[last] / 4.0).abs() < 1e-9,
            "slowest interpolates"
        );
        assert!((factor - (0.1 * 4f32.ln() + 1.0)).abs() < 1e-6);
    }

    #[test]
    fn unsupported_choices_are_named() {
        for (extra, named) in [
            (
                r#","rope_scaling":{"rope_type":"longrope","factor":4.0}"#,
                "longrope",
            ),
            (r#","rope_scaling":{"rope_type":"linear"}"#, "factor"),
            (
                r#","model_type":"qwen3","use_sliding_window":true"#,
                "use_sliding_window",
            ),
            (r#","hidden_act":"relu""#, "relu"),
            (r#","partial_rotary_factor":0.5"#, "partial_rotary_factor"),
            (r#","sliding_window":0"#, "sliding_window"),
            (
                r#","layer_types":["full_attention","chunked_attention"]"#,
                "chunked_attention",
            ),
        ] {
            let e = tiny(extra).unwrap_err().to_string();
            assert!(e.contains(named), "{extra}: {e}");
        }
    }

    #[test]
    fn gemma3_layers_alternate_and_norms_shift() {
        let c = tiny(
            r#","model_type":"gemma3_text","sliding_window":512,"rope_local_base_freq":10000.0,
            "rope_theta":1000000.0,"query_pre_attn_scalar":256"#,
        )
        .unwrap();
        let sliding: Vec<bool> = (0..6).map(|l| c.slides(l)).collect();
        assert_eq!(sliding, [true, true, true, true, true, false]);
        assert!(c.qk_norm && c.sandwich_norms && c.scale_embeddings && c.tie_word_embeddings);
        assert_eq!(c.activation, Activation::GeluTanh);
        assert_eq!(c.norm_weight_offset, 1.0);
        assert_eq!(c.attn_scale, 1.0 / 16.0);
        // Local layers rotate on their own base, unscaled.
        assert_eq!(c.layer_rope(0).0[1], 1.0 / 10_000f32.powf(2.0 / 16.0));
        assert_eq!(c.layer_rope(5).0[1], 1.0 / 1_000_000f32.powf(2.0 / 16.0));
    }
}
