//! A tiny random-weight llama checkpoint in Hugging Face's layout, written to a
//! folder, shared by the integration tests.
#![allow(dead_code)]
use candle_core::{DType, Device, Tensor};
use engine::llm::kv_cache::{KvCache, KvDtype};
use engine::llm::model::LlamaModel;
use engine::llm::LlamaConfig;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::collections::HashMap;

pub const CONFIG: &str = r#"{"model_type":"llama","hidden_size":64,"intermediate_size":128,"num_hidden_layers":2,
  "num_attention_heads":4,"num_key_value_heads":2,"vocab_size":97,"rms_norm_eps":1e-5,"rope_theta":10000.0,
  "max_position_embeddings":256,"tie_word_embeddings":false}"#;

/// A standard normal sample (Box–Muller).
fn gaussian(rng: &mut StdRng) -> f32 {
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
}

/// Writes seeded random weights in Hugging Face's llama layout.
pub fn tiny_checkpoint(dir: &std::path::Path) {
    let dev = Device::Cpu;
    let c = LlamaConfig::from_hf_json(CONFIG).unwrap();
    let (h, i, kv) = (
        c.hidden_size,
        c.intermediate_size,
        c.num_key_value_heads * c.head_dim,
    );
    let mut t: HashMap<String, Tensor> = HashMap::new();
    // Seeded: a failure reproduces with the same weights.
    let mut rng = StdRng::seed_from_u64(0x5eed);
    let mut normal = |shape: &[usize], std: f32| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| gaussian(&mut rng) * std).collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    t.insert(
        "model.embed_tokens.weight".into(),
        normal(&[c.vocab_size, h], 1.0),
    );
    t.insert("lm_head.weight".into(), normal(&[c.vocab_size, h], 0.2));
    for l in 0..c.num_hidden_layers {
        let p = format!("model.layers.{l}");
        for (n, shape) in [
            ("self_attn.q_proj", [h, h]),
            ("self_attn.k_proj", [kv, h]),
            ("self_attn.v_proj", [kv, h]),
            ("self_attn.o_proj", [h, h]),
            ("mlp.gate_proj", [i, h]),
            ("mlp.up_proj", [i, h]),
            ("mlp.down_proj", [h, i]),
        ] {
            t.insert(format!("{p}.{n}.weight"), normal(&shape, 0.15));
        }
    }
    for l in 0..c.num_hidden_layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            let w = (normal(&[h], 0.1) + 1.0).unwrap();
            t.insert(format!("model.layers.{l}.{n}.weight"), w);
        }
    }
    t.insert(
        "model.norm.weight".into(),
        Tensor::ones(h, DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&t, dir.join("model.safetensors")).unwrap();
    std::fs::write(dir.join("config.json"), CONFIG).unwrap();
}

/// Adds a word-level `tokenizer.json` (one word per id) and a
/// `tokenizer_config.json` with a chat template, so the folder loads whole.
pub fn tiny_tokenizer(dir: &std::path::Path) {
    let mut vocab: Vec<String> = vec!["<unk>".into(), "<s>".into(), "</s>".into()];
    vocab.extend((3..97).map(|i| format!("w{i}")));
    let vocab_json: serde_json::Map<String, serde_json::Value> = vocab
        .iter()
        .enumerate()
        .map(|(i, w)| (w.clone(), serde_json::json!(i)))
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [
            {"id": 1, "content": "<s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true},
            {"id": 2, "content": "</s>", "single_word": false, "lstrip": false, "rstrip": false, "normalized": false, "special": true}
        ],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": null,
        "decoder": {"type": "WordPiece", "prefix": "##", "cleanup": false},
        "model": {"type": "WordLevel", "vocab": vocab_json, "unk_token": "<unk>"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string()).unwrap();
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": true,
        "chat_template": "{% for m in messages %}{{ m.role }} {{ m.content }} {% endfor %}{% if add_generation_prompt %}w3{% endif %}"
    });
    std::fs::write(dir.join("tokenizer_config.json"), config.to_string()).unwrap();
}

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A KV pool of 4096 tokens in 16-token blocks for `model`, without prefix
/// caching, in f32 (as the reference implementations keep keys and values).
pub fn kv_cache(model: &LlamaModel) -> KvCache {
    kv_cache_of(model, KvDtype::F32)
}

/// The same pool, keys and values stored as `dtype`.
pub fn kv_cache_of(model: &LlamaModel, dtype: KvDtype) -> KvCache {
    KvCache::new(
        model.config.num_hidden_layers,
        model.kv_layout(16),
        dtype,
        256,
        false,
    )
}
