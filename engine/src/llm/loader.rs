//! Loads a model from disk into our runtime: a GGUF file (candle's quantized
//! tensors, tokenizer and template from its metadata) or a Hugging Face folder
//! (`config.json`, `*.safetensors`, `tokenizer.json`, `tokenizer_config.json`).
use super::chat_template::{self, ChatTemplate};
use super::config::{Activation, LlamaConfig, RopeScaling};
use super::error::{LlmError, Result};
use super::model::{Embedding, Layer, Linear, LlamaModel, RmsNorm, Weights};
use super::quant::awq_format::AwqConfig;
use super::quant::{int8_matrix, Int4, Quantization};
use super::tokenizer::Tokenizer;
use candle_core::quantized::{gguf_file, GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use kernels::quant::{QuantMatrix, QuantType, QK};
use std::path::{Path, PathBuf};

/// Everything the engine needs to serve one model.
pub struct LoadedWeights {
    pub model: LlamaModel,
    pub tokenizer: Tokenizer,
    pub template: Option<ChatTemplate>,
}

/// Loads a `.gguf` file or a folder with `config.json` and safetensors
/// (dense, or AutoAWQ's 4-bit groups), quantizing dense projections at load
/// when `quantization` asks for it.
pub fn load_model(
    path: &Path,
    device: &Device,
    quantization: Quantization,
) -> Result<LoadedWeights> {
    if path.is_dir() {
        load_hf_dir(path, device, quantization)
    } else if quantization != Quantization::None {
        Err(LlmError::Unsupported(format!(
            "quantization {quantization:?} applies to Hugging Face folders of f32, f16 or bf16 \
             safetensors; {} is a GGUF file, whose weights are quantized already",
            path.display()
        )))
    } else {
        load_gguf(path, device)
    }
}

pub(crate) fn load_err(path: &Path, reason: impl std::fmt::Display) -> LlmError {
    LlmError::Load {
        path: path.display().to_string(),
        reason: reason.to_string(),
    }
}

/// A GGUF file being read: its metadata and the open file for tensor data.
struct GgufReader<'a> {
    path: &'a Path,
    file: std::fs::File,
    content: gguf_file::Content,
    device: &'a Device,
}

impl GgufReader<'_> {
    fn qtensor(&mut self, name: &str) -> Result<QTensor> {
        self.content
            .tensor(&mut self.file, name, self.device)
            .map_err(|e| load_err(self.path, format!("tensor {name}: {e}")))
    }

    fn dense(&mut self, name: &str) -> Result<Vec<f32>> {
        Ok(self
            .qtensor(name)?
            .dequantize(self.device)?
            .flatten_all()?
            .to_vec1()?)
    }

    fn norm(&mut self, name: &str, eps: f64) -> Result<RmsNorm> {
        Ok(RmsNorm::new(self.dense(name)?, eps))
    }

    fn linear(&mut self, prefix: &str, bias: bool) -> Result<Linear> {
        let q = self.qtensor(&format!("{prefix}.weight"))?;
        let bias = if bias {
            Some(self.dense(&format!("{prefix}.bias"))?)
        } else {
            None
        };
        quantized_linear(q, bias, self.device)
    }
}

/// A projection over GGUF blocks: our kernel on the CPU for Q4_0, Q4_1 and
/// Q8_0, candle's `QMatMul` for the rest. The choice follows
/// `benches/quant_matmul` (docs/BENCHMARKS.md): at the default model's shapes
/// ours is 1.5–8× candle's speed on Q4_0 and Q8_0 and 15–50× on Q4_1, while
/// candle's tuned Q4_K and Q6_K kernels beat ours at 16 rows.
fn quantized_linear(q: QTensor, bias: Option<Vec<f32>>, device: &Device) -> Result<Linear> {
    let (out, inp) = q.shape().dims2()?;
    let ty = match q.dtype() {
        GgmlDType::Q4_0 => Some(QuantType::Q4_0),
        GgmlDType::Q4_1 => Some(QuantType::Q4_1),
        GgmlDType::Q8_0 | GgmlDType::Q5_0 => Some(QuantType::Q8_0),
        _ => None,
    };
    match ty {
        Some(ty) if device.is_cpu() => {
            let blocks = q.data()?;
            let blocks = match q.dtype() {
                GgmlDType::Q5_0 => q5_0_as_q8_0(&blocks),
                _ => blocks.into_owned(),
            };
            Ok(Linear::quant(QuantMatrix::new(ty, &blocks, out, inp), bias))
        }
        _ => Ok(Linear::candle(QMatMul::from_qtensor(q)?, out, bias, device)),
    }
}

/// Q5_0 blocks (an f16 scale `d`, 32 five-bit values `q − 16`) as Q8_0
/// blocks holding the same values exactly: `4·(q − 16)` in [−64, 60] over
/// the scale `d / 4` (a power of two, so exact in f16). Our Q8_0 kernel then
/// serves them; candle multiplies Q5_0 on a scalar path (docs/BENCHMARKS.md,
/// Gemma 3 270M).
fn q5_0_as_q8_0(src: &[u8]) -> Vec<u8> {
    const Q5: usize = 2 + 4 + 16;
    let mut out = Vec::with_capacity(src.len() / Q5 * (2 + QK));
    for b in src.chunks_exact(Q5) {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32() / 4.0;
        out.extend_from_slice(&half::f16::from_f32(d).to_le_bytes());
        let qh = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let qs = &b[6..];
        let value = |nibble: u8, high: u32| (((nibble as u32) | (high & 1) << 4) as i32 - 16) * 4;
        let low = (0..16).map(|j| value(qs[j] & 0x0f, qh >> j));
        let high = (0..16).map(|j| value(qs[j] >> 4, qh >> (j + 16)));
        out.extend(low.chain(high).map(|v| v as i8 as u8));
    }
    out
}

/// Opens a GGUF file and reads its metadata.
pub fn open_gguf(path: &Path) -> Result<(std::fs::File, gguf_file::Content)> {
    let mut file = std::fs::File::open(path).map_err(|e| load_err(path, e))?;
    let content = gguf_file::Content::read(&mut file)
        .map_err(|e| load_err(path, format!("not a GGUF file: {e}")))?;
    Ok((file, content))
}

/// The GGUF architectures that load, as `general.architecture` names them.
pub const GGUF_ARCHITECTURES: [&str; 7] = [
    "llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3",
];

/// The architecture name and hyper-parameters a GGUF file's metadata gives.
pub fn gguf_config(path: &Path, content: &gguf_file::Content) -> Result<(String, LlamaConfig)> {
    let md = &content.metadata;
    let arch = md
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .cloned()
        .ok_or_else(|| load_err(path, "no general.architecture in metadata"))?;
    if !GGUF_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(LlmError::Unsupported(format!(
            "GGUF architecture `{arch}`: supported are {}",
            GGUF_ARCHITECTURES.join(", ")
        )));
    }
    let gemma = arch.starts_with("gemma");
    let opt_u = |k: &str| {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_u32().ok())
            .map(|v| v as usize)
    };
    let get_u = |k: &str| -> Result<usize> {
        opt_u(k).ok_or_else(|| load_err(path, format!("metadata {arch}.{k} is missing")))
    };
    let get_f = |k: &str| md.get(&format!("{arch}.{k}")).and_then(|v| v.to_f32().ok());
    let get_s = |k: &str| {
        md.get(&format!("{arch}.{k}"))
            .and_then(|v| v.to_string().ok())
            .cloned()
    };
    let hidden = get_u("embedding_length")?;
    let heads = get_u("attention.head_count")?;
    let n_layers = get_u("block_count")?;
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .map(|t| t.shape.dims()[0])
        .ok_or_else(|| load_err(path, "tensor token_embd.weight is missing"))?;
    let head_dim = opt_u("attention.key_length")
        .or_else(|| opt_u("rope.dimension_count"))
        .unwrap_or(hidden / heads);
    let max_positions = opt_u("context_length").unwrap_or(4096);
    let rope_scaling = match get_s("rope.scaling.type").as_deref() {
        None | Some("none") => None,
        Some(kind) => {
            let mut v = serde_json::json!({ "rope_type": kind });
            if let Some(f) = get_f("rope.scaling.factor") {
                v["factor"] = f.into();
            }
            if let Some(o) = opt_u("rope.scaling.original_context_length") {
                v["original_max_position_embeddings"] = o.into();
            }
            RopeScaling::from_hf(&v, max_positions)?
        }
    };
    // llama.cpp's scale for the 27B Gemmas (46 and 62 layers) is over
    // hidden / heads; the others use the key length.
    let query_scalar = match (arch.as_str(), n_layers) {
        ("gemma2", 46) | ("gemma3", 62) => hidden / heads,
        _ => head_dim,
    };
    let sliding_window = opt_u("attention.sliding_window");
    let config = LlamaConfig {
        hidden_size: hidden,
        intermediate_size: get_u("feed_forward_length")?,
        num_hidden_layers: n_layers,
        num_attention_heads: heads,
        num_key_value_heads: get_u("attention.head_count_kv").unwrap_or(heads),
        head_dim,
        vocab_size: vocab,
        rms_norm_eps: get_f("attention.layer_norm_rms_epsilon").unwrap_or(1e-5) as f64,
        rope_theta: get_f("rope.freq_base").unwrap_or(10_000.0),
        max_position_embeddings: RopeScaling::positions(rope_scaling.as_ref(), max_positions),
        tie_word_embeddings: !content.tensor_infos.contains_key("output.weight"),
        attention_bias: arch == "qwen2",
        // llama.cpp permutes q and k of llama and mistral files only.
        rope_interleaved: matches!(arch.as_str(), "llama" | "mistral"),
        qk_norm: matches!(arch.as_str(), "qwen3" | "gemma3"),
        sandwich_norms: gemma,
        activation: if gemma {
            Activation::GeluTanh
        } else {
            Activation::Silu
        },
        scale_embeddings: gemma,
        attn_scale: 1.0 / (query_scalar as f32).sqrt(),
        attn_softcap: get_f("attn_logit_softcapping"),
        final_softcap: get_f("final_logit_softcapping"),
        sliding_window,
        sliding_layers: match arch.as_str() {
            "gemma2" => LlamaConfig::periodic(n_layers, 2),
            "gemma3" => LlamaConfig::periodic(
                n_layers,
                opt_u("attention.sliding_window_type").unwrap_or(6),
            ),
            _ => Vec::new(),
        },
        rope_local_theta: (arch == "gemma3")
            .then(|| get_f("rope.local_freq_base").unwrap_or(10_000.0)),
        rope_scaling,
        norm_weight_offset: 0.0,
    };
    config.validate()?;
    Ok((arch, config))
}

fn load_gguf(path: &Path, device: &Device) -> Result<LoadedWeights> {
    let (file, content) = open_gguf(path)?;
    let (arch, mut config) = gguf_config(path, &content)?;
    let n_layers = config.num_hidden_layers;
    let md = &content.metadata;
    let tokenizer = Tokenizer::from_gguf(md).map_err(|e| load_err(path, e))?;
    let source = match md
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
    {
        Some(t) => Some(t.as_str()),
        None if arch.starts_with("gemma") => {
            tracing::info!("{} has no chat template; using Gemma's", path.display());
            Some(chat_template::GEMMA)
        }
        None => None,
    };
    let template = source
        .map(|t| ChatTemplate::new(t, tokenizer.bos_token(), tokenizer.eos_token()))
        .transpose()?;
    let mut r = GgufReader {
        path,
        file,
        content,
        device,
    };
    let eps = config.rms_norm_eps;
    if r.content.tensor_infos.contains_key("rope_freqs.weight") {
        let divisors = r.dense("rope_freqs.weight")?;
        config.rope_scaling = Some(RopeScaling::Divisors(divisors));
        config.validate()?;
    }
    let mut layers = Vec::with_capacity(n_layers);
    for i in 0..n_layers {
        let p = format!("blk.{i}");
        let b = config.attention_bias;
        let has = |r: &GgufReader, name: &str| {
            r.content
                .tensor_infos
                .contains_key(&format!("{p}.{name}.weight"))
        };
        // Phi-3 stores q, k and v as one tensor, and gate and up as one.
        let qkv = if has(&r, "attn_qkv") {
            r.linear(&format!("{p}.attn_qkv"), b)?
        } else {
            Linear::concat(vec![
                r.linear(&format!("{p}.attn_q"), b)?,
                r.linear(&format!("{p}.attn_k"), b)?,
                r.linear(&format!("{p}.attn_v"), b)?,
            ])
        };
        let gate_up = if has(&r, "ffn_gate") {
            Linear::concat(vec![
                r.linear(&format!("{p}.ffn_gate"), false)?,
                r.linear(&format!("{p}.ffn_up"), false)?,
            ])
        } else {
            r.linear(&format!("{p}.ffn_up"), false)?
        };
        let mut pair = |a: &str, b: &str| -> Result<_> {
            Ok((
                r.norm(&format!("{p}.{a}.weight"), eps)?,
                r.norm(&format!("{p}.{b}.weight"), eps)?,
            ))
        };
        let qk_norm = config
            .qk_norm
            .then(|| pair("attn_q_norm", "attn_k_norm"))
            .transpose()?;
        let post_norms = config
            .sandwich_norms
            .then(|| pair("post_attention_norm", "post_ffw_norm"))
            .transpose()?;
        layers.push(Layer {
            qkv,
            qk_norm,
            o: r.linear(&format!("{p}.attn_output"), false)?,
            post_norms,
            gate_up,
            down: r.linear(&format!("{p}.ffn_down"), false)?,
            attn_norm: r.norm(&format!("{p}.attn_norm.weight"), eps)?,
            ffn_norm: r.norm(&format!("{p}.ffn_norm.weight"), eps)?,
        });
        if (i + 1) % 10 == 0 || i + 1 == n_layers {
            tracing::info!(layers = i + 1, of = n_layers, "loading {}", path.display());
        }
    }
    let embed_q = r.qtensor("token_embd.weight")?;
    let embed = Embedding::from_qtensor(&embed_q)?;
    let lm_head = if config.tie_word_embeddings {
        quantized_linear(embed_q, None, device)?
    } else {
        r.linear("output", false)?
    };
    let norm = r.norm("output_norm.weight", eps)?;
    let weights = Weights {
        embed,
        layers,
        norm,
        lm_head,
    };
    Ok(LoadedWeights {
        model: LlamaModel::new(config, weights, device)?,
        tokenizer,
        template,
    })
}

fn load_hf_dir(dir: &Path, device: &Device, quantization: Quantization) -> Result<LoadedWeights> {
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name)).map_err(|e| load_err(&dir.join(name), e))
    };
    let text = read("config.json")?;
    let config = LlamaConfig::from_hf_json(&text)?;
    config.validate()?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| load_err(&dir.join("config.json"), e))?;
    let projections = match (AwqConfig::from_config_json(&json)?, quantization) {
        (None, Quantization::None) => Projections::Dense,
        (None, Quantization::Int8) => Projections::Int8,
        (Some(awq), q) => Projections::Awq {
            group: awq.group_size,
            int8_head: q == Quantization::Int8,
        },
    };
    let files = safetensors_files(dir)?;
    tracing::info!(
        files = files.len(),
        "loading safetensors from {}",
        dir.display()
    );
    // Safety: the files are memory-mapped read-only and not modified while loaded.
    let vb = unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, device)? };
    let weights = weights_from_varbuilder(&config, vb, projections)?;
    let tokenizer = Tokenizer::from_file(
        &dir.join("tokenizer.json"),
        &dir.join("tokenizer_config.json"),
    )?;
    let template = match std::fs::read_to_string(dir.join("tokenizer_config.json")) {
        Ok(text) => ChatTemplate::from_tokenizer_config(
            &text,
            tokenizer.bos_token(),
            tokenizer.eos_token(),
        )?,
        Err(_) => None,
    };
    Ok(LoadedWeights {
        model: LlamaModel::new(config, weights, device)?,
        tokenizer,
        template,
    })
}

/// How the projections of a Hugging Face checkpoint are stored and served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projections {
    /// Dense weights, multiplied in f32.
    Dense,
    /// Dense weights quantized at load to INT8 per output channel (the LM
    /// head included).
    Int8,
    /// AutoAWQ's 4-bit groups of this size; the LM head, which AWQ leaves
    /// dense, stays so or is quantized to INT8 at load.
    Awq { group: usize, int8_head: bool },
}

impl Projections {
    fn load(self, vb: &VarBuilder, i: usize, o: usize) -> Result<Linear> {
        let device = vb.device();
        let dense = |vb: &VarBuilder| vb.get((o, i), "weight");
        match self {
            Self::Dense => Ok(Linear::candle(QMatMul::Tensor(dense(vb)?), o, None, device)),
            Self::Int8 => int8_linear(&dense(vb)?, &vb.prefix()),
            Self::Awq { group, .. } => {
                let prefix = vb.prefix();
                // `vb` prefixes names with the projection's path already.
                let get = |name: &str, dtype| {
                    let short = name.strip_prefix(&prefix).unwrap_or(name);
                    vb.get_unchecked_dtype(short.trim_start_matches('.'), dtype)
                };
                let q = Int4::from_awq(&get, &prefix, o, i, group)?;
                Ok(Linear::quant(q.matrix(), None))
            }
        }
    }

    /// The LM head: its own tensor, or the embedding `[vocab, h]` when tied;
    /// dense for AWQ checkpoints unless INT8 was asked for.
    fn head(self, c: &LlamaConfig, embed: &Tensor, vb: &VarBuilder) -> Result<Linear> {
        let (h, vocab) = (c.hidden_size, c.vocab_size);
        let head = match self {
            Self::Awq { int8_head, .. } if int8_head => Self::Int8,
            Self::Awq { .. } => Self::Dense,
            other => other,
        };
        match head {
            Self::Int8 if c.tie_word_embeddings => int8_linear(embed, "the tied LM head"),
            _ if c.tie_word_embeddings => Ok(Linear::candle(
                QMatMul::Tensor(embed.clone()),
                vocab,
                None,
                vb.device(),
            )),
            other => other.load(&vb.pp("lm_head"), h, vocab),
        }
    }
}

/// A dense `[out, in]` weight quantized to INT8 at load; `what` names it
/// when its rows are not whole 32-value blocks.
fn int8_linear(w: &Tensor, what: &str) -> Result<Linear> {
    let (o, i) = w.dims2()?;
    if !i.is_multiple_of(QK) {
        return Err(LlmError::Unsupported(format!(
            "quantization int8: {what} has {i} inputs, not a multiple of {QK}"
        )));
    }
    let w: Vec<f32> = w.flatten_all()?.to_vec1()?;
    Ok(Linear::quant(int8_matrix(&w, o, i), None))
}

/// The `*.safetensors` files of a folder, sorted; none is an error.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| load_err(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    files.sort();
    if files.is_empty() {
        return Err(load_err(dir, "no *.safetensors file in the folder"));
    }
    Ok(files)
}

/// Builds [`Weights`] from tensors named as Hugging Face's llama layout names
/// them, with projections stored as `projections` says.
pub fn weights_from_varbuilder(
    c: &LlamaConfig,
    vb: VarBuilder,
    projections: Projections,
) -> Result<Weights> {
    let (h, kvd) = (c.hidden_size, c.num_key_value_heads * c.head_dim);
    let linear = |vb: VarBuilder, i: usize, o: usize, bias: bool| -> Result<Linear> {
        let mut l = projections.load(&vb, i, o)?;
        if bias {
            l.set_bias(vb.get(o, "bias")?.to_vec1()?);
        }
        Ok(l)
    };
    let sized_norm = |vb: VarBuilder, dim: usize| -> Result<RmsNorm> {
        let w: Vec<f32> = vb.get(dim, "weight")?.to_vec1()?;
        let w = w.into_iter().map(|w| w + c.norm_weight_offset).collect();
        Ok(RmsNorm::new(w, c.rms_norm_eps))
    };
    let norm = |vb: VarBuilder| sized_norm(vb, h);
    let m = vb.pp("model");
    let mut layers = Vec::with_capacity(c.num_hidden_layers);
    for i in 0..c.num_hidden_layers {
        if projections == Projections::Int8 && ((i + 1) % 10 == 0 || i + 1 == c.num_hidden_layers) {
            tracing::info!(
                layers = i + 1,
                of = c.num_hidden_layers,
                "quantizing to int8"
            );
        }
        let l = m.pp(format!("layers.{i}"));
        let (a, mlp) = (l.pp("self_attn"), l.pp("mlp"));
        let (qd, inter) = (c.num_attention_heads * c.head_dim, c.intermediate_size);
        // Phi-3 stores q, k and v as one projection, and gate and up as one.
        let qkv = if a.contains_tensor("qkv_proj.weight") {
            linear(a.pp("qkv_proj"), h, qd + 2 * kvd, c.attention_bias)?
        } else {
            Linear::concat(vec![
                linear(a.pp("q_proj"), h, qd, c.attention_bias)?,
                linear(a.pp("k_proj"), h, kvd, c.attention_bias)?,
                linear(a.pp("v_proj"), h, kvd, c.attention_bias)?,
            ])
        };
        let gate_up = if mlp.contains_tensor("gate_up_proj.weight") {
            linear(mlp.pp("gate_up_proj"), h, 2 * inter, false)?
        } else {
            Linear::concat(vec![
                linear(mlp.pp("gate_proj"), h, inter, false)?,
                linear(mlp.pp("up_proj"), h, inter, false)?,
            ])
        };
        let qk_norm = c
            .qk_norm
            .then(|| -> Result<_> {
                Ok((
                    sized_norm(a.pp("q_norm"), c.head_dim)?,
                    sized_norm(a.pp("k_norm"), c.head_dim)?,
                ))
            })
            .transpose()?;
        // Gemma's post_attention_layernorm normalizes attention's output and
        // pre_feedforward_layernorm the MLP's input; Llama's
        // post_attention_layernorm is the MLP's input norm.
        let (ffn_norm, post_norms) = if c.sandwich_norms {
            (
                norm(l.pp("pre_feedforward_layernorm"))?,
                Some((
                    norm(l.pp("post_attention_layernorm"))?,
                    norm(l.pp("post_feedforward_layernorm"))?,
                )),
            )
        } else {
            (norm(l.pp("post_attention_layernorm"))?, None)
        };
        layers.push(Layer {
            attn_norm: norm(l.pp("input_layernorm"))?,
            qkv,
            qk_norm,
            o: linear(a.pp("o_proj"), qd, h, false)?,
            post_norms,
            ffn_norm,
            gate_up,
            down: linear(mlp.pp("down_proj"), inter, h, false)?,
        });
    }
    let embed = m.pp("embed_tokens").get((c.vocab_size, h), "weight")?;
    let lm_head = projections.head(c, &embed, &vb)?;
    Ok(Weights {
        embed: Embedding::Dense {
            rows: embed.flatten_all()?.to_vec1()?,
            width: h,
        },
        layers,
        norm: norm(m.pp("norm"))?,
        lm_head,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(q: &QTensor) -> Vec<f32> {
        let cpu = Device::Cpu;
        q.dequantize(&cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    /// Converted Q5_0 blocks dequantize to exactly what candle dequantizes
    /// the originals to.
    #[test]
    fn q5_0_blocks_become_q8_0_blocks_of_the_same_values() {
        let cpu = Device::Cpu;
        let w: Vec<f32> = (0..4 * 96)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
            .collect();
        let t = Tensor::from_vec(w, (4, 96), &cpu).unwrap();
        let q5 = QTensor::quantize(&t, GgmlDType::Q5_0).unwrap();
        let blocks = q5_0_as_q8_0(&q5.data().unwrap());
        let q8 = candle_core::quantized::ggml_file::qtensor_from_ggml(
            GgmlDType::Q8_0,
            &blocks,
            vec![4, 96],
            &cpu,
        )
        .unwrap();
        assert_eq!(values(&q8), values(&q5));
    }
}
