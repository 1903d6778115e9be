//! The model families past Llama, each as a tiny random-weight checkpoint in
//! its Hugging Face layout, run through our forward pass and through
//! candle-transformers' implementation of the family on the same
//! safetensors: Qwen3 (QK norm), Gemma 2 (GeGLU, sandwich norms,
//! soft-capping, alternating sliding layers), Gemma 3 (QK norm, one global
//! layer in six with its own rotary base), Mistral (sliding window), Phi-3
//! (fused projections) and Llama 3.1's rotary scaling.
//!
//! candle's masks admit `window + 1` keys (a key `j` is hidden from query `i`
//! when `j + window < i`) where Transformers and llama.cpp admit `window`; the
//! reference is built with one less than ours so both see the same keys.
//! candle applies the window within a prefill only, so each prompt length is
//! a fresh prefill there; our decode path is held to our prefill separately.
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use engine::llm::kv_cache::SeqId;
use engine::llm::loader::{weights_from_varbuilder, Projections};
use engine::llm::model::{ForwardBatch, LlamaModel};
use engine::llm::LlamaConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;
use std::path::Path;
mod common;
use common::max_abs_diff;

const VOCAB: usize = 101;

/// A tiny config of `model_type` with the family's own keys spliced in.
fn config(model_type: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "model_type": model_type, "vocab_size": VOCAB, "hidden_size": 64,
        "intermediate_size": 96, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0, "max_position_embeddings": 512,
        "tie_word_embeddings": false, "attention_bias": false, "hidden_act": "silu",
    });
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    c
}

fn gaussian(rng: &mut StdRng) -> f32 {
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Writes seeded random weights named as the family names them.
fn checkpoint(dir: &Path, json: &serde_json::Value) -> LlamaConfig {
    let text = json.to_string();
    std::fs::write(dir.join("config.json"), &text).unwrap();
    let c = LlamaConfig::from_hf_json(&text).unwrap();
    let fused = json["model_type"] == "phi3";
    let (h, inter, d) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kvd) = (c.num_attention_heads * d, c.num_key_value_heads * d);
    let dev = Device::Cpu;
    let mut rng = StdRng::seed_from_u64(0xfa11);
    let mut t: HashMap<String, Tensor> = HashMap::new();
    let mut put = |name: String, shape: &[usize], std: f32, mean: f32| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| mean + gaussian(&mut rng) * std).collect();
        t.insert(name, Tensor::from_vec(v, shape, &dev).unwrap());
    };
    // Gemma stores norm weights less one.
    let norm_mean = 1.0 - c.norm_weight_offset;
    put("model.embed_tokens.weight".into(), &[VOCAB, h], 1.0, 0.0);
    if !c.tie_word_embeddings {
        put("lm_head.weight".into(), &[VOCAB, h], 0.2, 0.0);
    }
    put("model.norm.weight".into(), &[h], 0.1, norm_mean);
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        let mut projections = vec![("self_attn.o_proj", [h, qd]), ("mlp.down_proj", [h, inter])];
        if fused {
            projections.push(("self_attn.qkv_proj", [qd + 2 * kvd, h]));
            projections.push(("mlp.gate_up_proj", [2 * inter, h]));
        } else {
            projections.extend([
                ("self_attn.q_proj", [qd, h]),
                ("self_attn.k_proj", [kvd, h]),
                ("self_attn.v_proj", [kvd, h]),
                ("mlp.gate_proj", [inter, h]),
                ("mlp.up_proj", [inter, h]),
            ]);
        }
        for (name, shape) in projections {
            put(format!("{p}.{name}.weight"), &shape, 0.15, 0.0);
        }
        let mut norms = vec!["input_layernorm", "post_attention_layernorm"];
        if c.sandwich_norms {
            norms.extend(["pre_feedforward_layernorm", "post_feedforward_layernorm"]);
        }
        for n in norms {
            put(format!("{p}.{n}.weight"), &[h], 0.1, norm_mean);
        }
        if c.qk_norm {
            for n in ["q_norm", "k_norm"] {
                put(format!("{p}.self_attn.{n}.weight"), &[d], 0.1, norm_mean);
            }
        }
    }
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    c
}

fn var_builder(dir: &Path) -> VarBuilder<'static> {
    let files = [dir.join("model.safetensors")];
    // Safety: the file is written above and not modified while mapped.
    unsafe { VarBuilder::from_mmaped_safetensors(&files, DType::F32, &Device::Cpu) }.unwrap()
}

fn ours(dir: &Path, c: &LlamaConfig) -> LlamaModel {
    let weights = weights_from_varbuilder(c, var_builder(dir), Projections::Dense).unwrap();
    LlamaModel::new(c.clone(), weights, &Device::Cpu).unwrap()
}

/// Our logits for the last token of `tokens`, prefilled at once.
fn prefill(model: &LlamaModel, tokens: &[u32]) -> Tensor {
    let mut cache = common::kv_cache(model);
    cache.allocate(SeqId(0), tokens.len()).unwrap();
    let mut batch = ForwardBatch::default();
    batch.push(SeqId(0), tokens, 0);
    model.forward(&batch, &mut cache).unwrap()
}

/// A forward pass of some reference family: logits of the last token.
type Reference = Box<dyn FnMut(&Tensor) -> Tensor>;

const PROMPT: [u32; 14] = [3, 17, 42, 8, 96, 0, 55, 23, 11, 70, 4, 4, 88, 31];

/// For every prefix of the prompt, a fresh prefill in both gives logits
/// within 1e-4.
fn agrees(model_type: &str, ours_extra: serde_json::Value, reference: impl Fn(&Path) -> Reference) {
    let dir = tempfile::tempdir().unwrap();
    let c = checkpoint(dir.path(), &config(model_type, ours_extra));
    let model = ours(dir.path(), &c);
    let mut reference = reference(dir.path());
    for len in 1..=PROMPT.len() {
        let tokens = &PROMPT[..len];
        let a = prefill(&model, tokens);
        let input = Tensor::new(tokens, &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let b = reference(&input)
            .flatten_all()
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(
            diff < 1e-4,
            "{model_type}, {len} tokens: max |Δlogit| = {diff}"
        );
    }
}

/// The reference config: ours with candle's window one shorter.
fn reference_json(dir: &Path) -> serde_json::Value {
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    if let Some(w) = json["sliding_window"].as_u64() {
        json["sliding_window"] = (w - 1).into();
    }
    json
}

fn reference_config<T: serde::de::DeserializeOwned>(dir: &Path) -> T {
    serde_json::from_value(reference_json(dir)).unwrap()
}

/// A reference model that prefills each prompt into an emptied cache.
fn fresh<M: 'static>(
    mut m: M,
    clear: fn(&mut M),
    forward: fn(&mut M, &Tensor, usize) -> candle_core::Result<Tensor>,
) -> Reference {
    Box::new(move |x| {
        clear(&mut m);
        forward(&mut m, x, 0).unwrap()
    })
}

#[test]
fn qwen3_matches_candle() {
    use candle_transformers::models::qwen3 as r;
    agrees(
        "qwen3",
        serde_json::json!({"max_window_layers": 4, "use_sliding_window": false, "sliding_window": null}),
        |dir| {
            let m = r::ModelForCausalLM::new(&reference_config(dir), var_builder(dir)).unwrap();
            fresh(
                m,
                r::ModelForCausalLM::clear_kv_cache,
                r::ModelForCausalLM::forward,
            )
        },
    );
}

#[test]
fn gemma3_matches_candle() {
    use candle_transformers::models::gemma3 as r;
    agrees(
        "gemma3_text",
        serde_json::json!({
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
            "query_pre_attn_scalar": 16, "sliding_window": 5, "sliding_window_pattern": 2,
            "rope_theta": 1000000.0, "rope_local_base_freq": 10000.0,
            "final_logit_softcapping": null, "attn_logit_softcapping": null,
        }),
        |dir| {
            // candle's Gemma 3 prefills only through its sliding layers (its
            // full cache takes no transposed chunk), so it is fed one token
            // at a time: then its rotating cache holds the last `window`
            // keys, as ours sees them.
            let mut json = reference_json(dir);
            json["sliding_window"] = 5.into();
            let cfg: r::Config = serde_json::from_value(json).unwrap();
            let mut m = r::Model::new(false, &cfg, var_builder(dir)).unwrap();
            Box::new(move |x| {
                m.clear_kv_cache();
                let n = x.dim(1).unwrap();
                let mut last = None;
                for i in 0..n {
                    last = Some(m.forward(&x.narrow(1, i, 1).unwrap(), i).unwrap());
                }
                last.unwrap()
            })
        },
    );
}

#[test]
fn gemma2_matches_candle() {
    use candle_transformers::models::gemma2 as r;
    agrees(
        "gemma2",
        serde_json::json!({
            "hidden_activation": "gelu_pytorch_tanh", "tie_word_embeddings": true,
            // candle's Gemma 2 slides every layer and scales by the head
            // size: so do these.
            "query_pre_attn_scalar": 16, "sliding_window": 6,
            "layer_types": ["sliding_attention", "sliding_attention", "sliding_attention", "sliding_attention"],
            "final_logit_softcapping": 3.0, "attn_logit_softcapping": 5.0,
        }),
        |dir| {
            let m = r::Model::new(false, &reference_config(dir), var_builder(dir)).unwrap();
            fresh(m, r::Model::clear_kv_cache, r::Model::forward)
        },
    );
}

#[test]
fn mistral_sliding_window_matches_candle() {
    use candle_transformers::models::mistral as r;
    agrees("mistral", serde_json::json!({"sliding_window": 4}), |dir| {
        let m = r::Model::new(&reference_config(dir), var_builder(dir)).unwrap();
        fresh(m, r::Model::clear_kv_cache, r::Model::forward)
    });
}

#[test]
fn phi3_matches_candle() {
    use candle_transformers::models::phi3 as r;
    agrees("phi3", serde_json::json!({"rope_scaling": null}), |dir| {
        let m = r::Model::new(&reference_config(dir), var_builder(dir)).unwrap();
        fresh(m, r::Model::clear_kv_cache, r::Model::forward)
    });
}

#[test]
fn llama3_rope_scaling_matches_candle() {
    use candle_transformers::models::llama as r;
    // An original context of 8 positions puts the prompt past it, and
    // frequencies on both sides of the ramp and inside it.
    let scaling = serde_json::json!({"rope_scaling": {"rope_type": "llama3", "factor": 4.0,
        "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8}});
    agrees("llama", scaling, |dir| {
        let cfg: r::LlamaConfig = serde_json::from_value(reference_json(dir)).unwrap();
        let cfg = cfg.into_config(false);
        let m = r::Llama::load(var_builder(dir), &cfg).unwrap();
        Box::new(move |x| {
            let mut cache = r::Cache::new(true, DType::F32, &cfg, &Device::Cpu).unwrap();
            m.forward(x, 0, &mut cache).unwrap()
        })
    });
}

/// A model whose layers slide (Gemma 3's pattern): decoding token by token,
/// and prefilling in chunks, give the logits a one-shot prefill gives, past
/// the window.
#[test]
fn sliding_layers_decode_as_they_prefill() {
    let dir = tempfile::tempdir().unwrap();
    let json = config(
        "gemma3_text",
        serde_json::json!({"hidden_activation": "gelu_pytorch_tanh", "sliding_window": 3,
            "sliding_window_pattern": 2, "rope_local_base_freq": 10000.0, "query_pre_attn_scalar": 16}),
    );
    let c = checkpoint(dir.path(), &json);
    let model = ours(dir.path(), &c);
    let mut cache = common::kv_cache(&model);
    cache.allocate(SeqId(0), PROMPT.len()).unwrap();
    let mut pos = 0;
    for chunk in [
        &PROMPT[..5],
        &PROMPT[5..6],
        &PROMPT[6..11],
        &PROMPT[11..12],
        &PROMPT[12..],
    ] {
        let mut batch = ForwardBatch::default();
        batch.push(SeqId(0), chunk, pos);
        let step = model.forward(&batch, &mut cache).unwrap();
        pos += chunk.len();
        let whole = prefill(&model, &PROMPT[..pos]);
        let diff = max_abs_diff(&step, &whole);
        assert!(diff < 1e-5, "after {pos} tokens: max |Δlogit| = {diff}");
    }
}
