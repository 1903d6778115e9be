//! `switchyard export`: a quantized model written out as a dense Hugging
//! Face folder (`config.json`, `model.safetensors` in f32 or f16,
//! `tokenizer.json`, `tokenizer_config.json` with the chat template): a GGUF
//! file with its blocks dequantized, or an AWQ checkpoint with its groups
//! dequantized. Llama GGUF files store q and k with rows permuted for
//! interleaved rotary pairs; the export undoes that, so the folder is what
//! Transformers expects.
use super::config::LlamaConfig;
use super::error::{LlmError, Result};
use super::loader::{gguf_config, load_err, open_gguf, safetensors_files};
use super::quant::awq_format::AwqConfig;
use super::quant::Int4;
use super::tokenizer::Tokenizer;
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::Path;

/// The HF name of a GGUF tensor of layer blocks (`blk.N.<this>`).
const LAYER_NAMES: [(&str, &str); 9] = [
    ("attn_q", "self_attn.q_proj"),
    ("attn_k", "self_attn.k_proj"),
    ("attn_v", "self_attn.v_proj"),
    ("attn_output", "self_attn.o_proj"),
    ("ffn_gate", "mlp.gate_proj"),
    ("ffn_up", "mlp.up_proj"),
    ("ffn_down", "mlp.down_proj"),
    ("attn_norm", "input_layernorm"),
    ("ffn_norm", "post_attention_layernorm"),
];

/// Undoes llama.cpp's permutation of q/k rows: within each head of `d`
/// rows, GGUF row `2i + j` is Hugging Face row `j·d/2 + i`.
fn unpermute(w: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let d = w.len() / row_len / heads;
    let mut out = vec![0f32; w.len()];
    for h in 0..heads {
        for i in 0..d / 2 {
            for j in 0..2 {
                let (src, dst) = (h * d + 2 * i + j, h * d + j * d / 2 + i);
                out[dst * row_len..][..row_len].copy_from_slice(&w[src * row_len..][..row_len]);
            }
        }
    }
    out
}

fn hf_config(arch: &str, c: &LlamaConfig, dtype: DType, tok: &Tokenizer) -> serde_json::Value {
    let class = match arch {
        "qwen2" => "Qwen2ForCausalLM",
        "mistral" => "MistralForCausalLM",
        _ => "LlamaForCausalLM",
    };
    let id = |t: Option<String>| t.and_then(|t| tok.token_id(&t));
    serde_json::json!({
        "architectures": [class],
        "model_type": arch,
        "hidden_act": "silu",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_hidden_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "vocab_size": c.vocab_size,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "max_position_embeddings": c.max_position_embeddings,
        "tie_word_embeddings": c.tie_word_embeddings,
        "attention_bias": c.attention_bias,
        "bos_token_id": id(tok.bos_token()),
        "eos_token_id": id(tok.eos_token()),
        "torch_dtype": dtype_name(dtype),
    })
}

/// Writes the model at `src` (a GGUF file or an AWQ folder) into `out` as a
/// dense Hugging Face folder with weights of `dtype` (F32 or F16);
/// `progress(done, total)` follows the tensors.
pub fn export(src: &Path, out: &Path, dtype: DType, progress: &dyn Fn(usize, usize)) -> Result<()> {
    if !matches!(dtype, DType::F32 | DType::F16) {
        return Err(LlmError::Unsupported(format!(
            "export dtype {dtype:?}: f32 or f16"
        )));
    }
    if src.is_dir() {
        export_awq(src, out, dtype, progress)
    } else {
        export_gguf(src, out, dtype, progress)
    }
}

fn export_gguf(
    gguf: &Path,
    out: &Path,
    dtype: DType,
    progress: &dyn Fn(usize, usize),
) -> Result<()> {
    let (mut file, content) = open_gguf(gguf)?;
    let (arch, config) = gguf_config(gguf, &content)?;
    if !matches!(arch.as_str(), "llama" | "mistral" | "qwen2") {
        return Err(LlmError::Unsupported(format!(
            "export of `{arch}` GGUF files is not supported yet: llama, mistral and qwen2 are"
        )));
    }
    let tokenizer = Tokenizer::from_gguf(&content.metadata)?;
    let template = content
        .metadata
        .get("tokenizer.chat_template")
        .and_then(|v| v.to_string().ok())
        .cloned();
    let cpu = Device::Cpu;
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let mut tensors = HashMap::new();
    for (done, name) in names.iter().enumerate() {
        let t = content.tensor(&mut file, name, &cpu)?.dequantize(&cpu)?;
        let (hf, heads) = hf_name(name, &config).ok_or_else(|| {
            LlmError::Unsupported(format!(
                "GGUF tensor `{name}` has no Hugging Face name here"
            ))
        })?;
        let t = match heads {
            Some(heads) if config.rope_interleaved => {
                let dims = t.dims().to_vec();
                let row = dims.get(1).copied().unwrap_or(1);
                let w: Vec<f32> = t.flatten_all()?.to_vec1()?;
                Tensor::from_vec(unpermute(&w, heads, row), dims, &cpu)?
            }
            _ => t,
        };
        tensors.insert(hf, t.to_dtype(dtype)?);
        progress(done + 1, names.len());
    }
    std::fs::create_dir_all(out).map_err(|e| load_err(out, e))?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    let config_json = hf_config(&arch, &config, dtype, &tokenizer);
    let text = serde_json::to_string_pretty(&config_json).expect("a JSON value");
    std::fs::write(out.join("config.json"), text).map_err(|e| load_err(out, e))?;
    tokenizer.save_hf(out, template.as_deref())
}

fn export_awq(dir: &Path, out: &Path, dtype: DType, progress: &dyn Fn(usize, usize)) -> Result<()> {
    let config_path = dir.join("config.json");
    let text = std::fs::read_to_string(&config_path).map_err(|e| load_err(&config_path, e))?;
    let mut json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| load_err(&config_path, e))?;
    let group = AwqConfig::from_config_json(&json)?
        .ok_or_else(|| {
            LlmError::Unsupported(format!(
                "{}: export reads a GGUF file or an AWQ folder; this folder has no quantization_config",
                dir.display()
            ))
        })?
        .group_size;
    let mut all = HashMap::new();
    for path in safetensors_files(dir)? {
        all.extend(candle_core::safetensors::load(&path, &Device::Cpu)?);
    }
    let get = |name: &str, dtype: DType| -> candle_core::Result<Tensor> {
        match all.get(name) {
            Some(t) => t.to_dtype(dtype),
            None => candle_core::bail!("missing from the checkpoint"),
        }
    };
    let prefixes: Vec<String> = all
        .keys()
        .filter_map(|n| n.strip_suffix(".qweight").map(String::from))
        .collect();
    let mut tensors = HashMap::new();
    for (done, prefix) in prefixes.iter().enumerate() {
        let dims = all[&format!("{prefix}.qweight")].dims().to_vec();
        let (k, n) = (dims[0], dims.get(1).copied().unwrap_or(0) * 8);
        let q = Int4::from_awq(&get, prefix, n, k, group)?;
        let w = Tensor::from_vec(q.dequantize(), (n, k), &Device::Cpu)?.to_dtype(dtype)?;
        tensors.insert(format!("{prefix}.weight"), w);
        progress(done + 1, prefixes.len());
    }
    let packed = |name: &str| {
        ["qweight", "qzeros", "scales"].iter().any(|part| {
            name.strip_suffix(part)
                .and_then(|p| p.strip_suffix('.'))
                .is_some_and(|p| prefixes.iter().any(|q| q == p))
        })
    };
    for (name, t) in &all {
        if !packed(name) {
            tensors.insert(name.clone(), t.to_dtype(dtype)?);
        }
    }
    std::fs::create_dir_all(out).map_err(|e| load_err(out, e))?;
    candle_core::safetensors::save(&tensors, out.join("model.safetensors"))?;
    if let Some(o) = json.as_object_mut() {
        o.remove("quantization_config");
        o.insert("torch_dtype".into(), dtype_name(dtype).into());
    }
    let text = serde_json::to_string_pretty(&json).expect("a JSON value");
    std::fs::write(out.join("config.json"), text).map_err(|e| load_err(out, e))?;
    copy_side_files(dir, out)
}

fn dtype_name(dtype: DType) -> &'static str {
    if dtype == DType::F16 {
        "float16"
    } else {
        "float32"
    }
}

/// Copies the tokenizer and generation files of a Hugging Face folder.
pub(crate) fn copy_side_files(src: &Path, out: &Path) -> Result<()> {
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
    ] {
        if src.join(name).exists() {
            std::fs::copy(src.join(name), out.join(name))
                .map_err(|e| load_err(&src.join(name), e))?;
        }
    }
    Ok(())
}

/// The Hugging Face name of GGUF tensor `name`, and for q and k (whose rows
/// llama.cpp permutes) the number of heads their rows hold.
fn hf_name(name: &str, c: &LlamaConfig) -> Option<(String, Option<usize>)> {
    match name {
        "token_embd.weight" => return Some(("model.embed_tokens.weight".into(), None)),
        "output_norm.weight" => return Some(("model.norm.weight".into(), None)),
        "output.weight" => return Some(("lm_head.weight".into(), None)),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (part, kind) = rest.rsplit_once('.')?;
    let hf = LAYER_NAMES.iter().find(|(g, _)| *g == part)?.1;
    let heads = match part {
        "attn_q" => Some(c.num_attention_heads),
        "attn_k" => Some(c.num_key_value_heads),
        _ => None,
    };
    Some((format!("model.layers.{layer}.{hf}.{kind}"), heads))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unpermute_inverts_llama_cpp_permutation() {
        // llama.cpp: reshape(heads, 2, d/2, row).swapaxes(1, 2): HF row
        // j·d/2 + i of a head goes to GGUF row 2i + j.
        let (heads, d, row) = (2, 4, 3);
        let hf: Vec<f32> = (0..heads * d * row).map(|v| v as f32).collect();
        let mut gguf = vec![0f32; hf.len()];
        for h in 0..heads {
            for j in 0..2 {
                for i in 0..d / 2 {
                    let (src, dst) = (h * d + j * d / 2 + i, h * d + 2 * i + j);
                    gguf[dst * row..][..row].copy_from_slice(&hf[src * row..][..row]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute(&gguf, heads, row), hf);
    }
}
