//! Fixtures for other modules' tests: an in-memory registry holding one
//! LLM model, the admin who made it, a version spec for an artifact, and a
//! tiny seeded model (as a GGUF file, and served by an engine).
use super::records::*;
use super::{Actor, Registry, Role};
use candle_core::quantized::{gguf_file, GgmlDType, QTensor};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};
use std::path::Path;

pub fn admin() -> Actor {
    Actor {
        name: "root".into(),
        role: Role::Admin,
    }
}

/// An in-memory registry with model `name` (class llm, tier L0: no approvals).
pub fn with_model(name: &str) -> Registry {
    let r = Registry::open(":memory:").unwrap();
    r.create_model(
        &admin(),
        ModelSpec {
            name: name.into(),
            class: ModelClass::Llm,
            tier: Tier::L0,
            rollback_class: RollbackClass::Stateless,
            owner: "o".into(),
            gates: Gates::default(),
            rollout_unit: None,
        },
    )
    .unwrap();
    r
}

/// A GGUF version at `uri` with `sha256`, nothing else declared.
pub fn gguf_version(uri: String, sha256: String) -> VersionSpec {
    VersionSpec {
        artifact: Artifact {
            uri,
            sha256,
            format: "gguf".into(),
        },
        requirements: Requirements::default(),
        contract: Contract::default(),
        lineage: Lineage::default(),
        metrics: Metrics::default(),
        dependents: vec![],
    }
}

/// A one-layer llama with seeded weights and the small test vocabulary,
/// as a GGUF file; returns its sha256.
pub fn tiny_gguf(path: &Path) -> String {
    let (vocab, hidden, ffn, heads, kv_heads) = (263usize, 32usize, 64usize, 4u32, 2u32);
    let kv = hidden / heads as usize * kv_heads as usize;
    let mut seed = 7u32;
    let mut tensor = |dims: &[usize], scale: f32| {
        let n: usize = dims.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                seed = seed.wrapping_mul(1664525).wrapping_add(1013904223);
                ((seed >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect();
        let t = Tensor::from_vec(v, dims, &Device::Cpu).unwrap();
        QTensor::quantize(&t, GgmlDType::F32).unwrap()
    };
    let mut tensors = vec![
        (
            "token_embd.weight".to_string(),
            tensor(&[vocab, hidden], 1.0),
        ),
        ("output_norm.weight".to_string(), tensor(&[hidden], 0.1)),
    ];
    for (name, dims) in [
        ("attn_q", vec![hidden, hidden]),
        ("attn_k", vec![kv, hidden]),
        ("attn_v", vec![kv, hidden]),
        ("attn_output", vec![hidden, hidden]),
        ("ffn_gate", vec![ffn, hidden]),
        ("ffn_up", vec![ffn, hidden]),
        ("ffn_down", vec![hidden, ffn]),
        ("attn_norm", vec![hidden]),
        ("ffn_norm", vec![hidden]),
    ] {
        tensors.push((format!("blk.0.{name}.weight"), tensor(&dims, 0.2)));
    }
    use gguf_file::Value;
    let mut md = crate::fuzz::small_vocabulary();
    for (k, v) in [
        ("general.architecture", Value::String("llama".into())),
        ("llama.embedding_length", Value::U32(hidden as u32)),
        ("llama.feed_forward_length", Value::U32(ffn as u32)),
        ("llama.block_count", Value::U32(1)),
        ("llama.attention.head_count", Value::U32(heads)),
        ("llama.attention.head_count_kv", Value::U32(kv_heads)),
        ("llama.context_length", Value::U32(256)),
    ] {
        md.insert(k.to_string(), v);
    }
    let md: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let ts: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    let mut f = std::fs::File::create(path).unwrap();
    gguf_file::write(&mut f, &md, &ts).unwrap();
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

/// An engine serving the tiny model of [`tiny_gguf`] as `name`.
pub fn tiny_engine(name: &str) -> engine::llm::LlmEngine {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    tiny_gguf(&path);
    let loaded = engine::llm::load_model(&path, &Device::Cpu, Default::default()).unwrap();
    let config = engine::llm::EngineConfig {
        kv_cache: engine::llm::KvCacheSize::Bytes(1 << 20),
        max_num_seqs: 2,
        ..Default::default()
    };
    engine::llm::LlmEngine::start(name, loaded, config)
}
