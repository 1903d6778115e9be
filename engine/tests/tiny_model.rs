//! Our forward pass on tiny random-weight llama models built in code, checked
//! against candle-transformers' reference llama on the same safetensors, and
//! batched against one-sequence-at-a-time.
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use engine::llm::kv_cache::SeqId;
use engine::llm::loader::{weights_from_varbuilder, Projections};
use engine::llm::model::{ForwardBatch, LlamaModel};
use engine::llm::LlamaConfig;
mod common;
use common::{max_abs_diff, tiny_checkpoint, CONFIG};

fn ours(dir: &std::path::Path) -> LlamaModel {
    let c = LlamaConfig::from_hf_json(CONFIG).unwrap();
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    LlamaModel::new(
        c.clone(),
        weights_from_varbuilder(&c, vb, Projections::Dense).unwrap(),
        &Device::Cpu,
    )
    .unwrap()
}

/// Logits of our model and the reference agree within 1e-4 over a prefill and
/// 16 greedy decode steps.
#[test]
fn logits_match_candle_transformers_llama() {
    use candle_transformers::models::llama as reference;
    let dir = tempfile::tempdir().unwrap();
    tiny_checkpoint(dir.path());
    let model = ours(dir.path());
    let rcfg: reference::LlamaConfig = serde_json::from_str(CONFIG).unwrap();
    let rcfg = rcfg.into_config(false);
    let vb = unsafe {
        VarBuilder::from_mmaped_safetensors(
            &[dir.path().join("model.safetensors")],
            DType::F32,
            &Device::Cpu,
        )
    }
    .unwrap();
    let rmodel = reference::Llama::load(vb, &rcfg).unwrap();
    let mut rcache = reference::Cache::new(true, DType::F32, &rcfg, &Device::Cpu).unwrap();
    let mut cache = common::kv_cache(&model);
    let seq = SeqId(1);
    cache.allocate(seq, 64).unwrap();
    let mut tokens: Vec<u32> = vec![3, 17, 42, 8, 96, 0, 55, 23, 11];
    let mut pos = 0;
    let mut fed = tokens.clone();
    for step in 0..17 {
        let mut batch = ForwardBatch::default();
        batch.push(seq, &fed, pos);
        let a = model.forward(&batch, &mut cache).unwrap();
        let input = Tensor::new(fed.as_slice(), &Device::Cpu)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let b = rmodel.forward(&input, pos, &mut rcache).unwrap();
        let diff = max_abs_diff(&a, &b);
        assert!(diff < 1e-4, "step {step}: max |Δlogit| = {diff}");
        pos += fed.len();
        let next = a.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
        tokens.push(next);
        fed = vec![next];
    }
}

/// One forward pass over several sequences (prefill chunks mixed with decode
/// tokens) gives each the logits it gets alone.
#[test]
fn batched_forward_equals_one_sequence_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    tiny_checkpoint(dir.path());
    let model = ours(dir.path());
    let prompts: Vec<Vec<u32>> = vec![
        (0..13).collect(),
        vec![5, 9, 2],
        (20..47).map(|x| x % 97).collect(),
        vec![60],
    ];
    // Alone: prefill in one go, then 4 greedy steps; keep every step's logits.
    let mut alone = Vec::new();
    let mut continuations = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut cache = common::kv_cache(&model);
        let seq = SeqId(i as u64);
        cache.allocate(seq, 64).unwrap();
        let (mut fed, mut pos, mut steps, mut cont) = (p.clone(), 0, Vec::new(), Vec::new());
        for _ in 0..5 {
            let mut b = ForwardBatch::default();
            b.push(seq, &fed, pos);
            let l = model.forward(&b, &mut cache).unwrap();
            pos += fed.len();
            let next = l.argmax(D::Minus1).unwrap().to_vec1::<u32>().unwrap()[0];
            steps.push(l);
            cont.push(next);
            fed = vec![next];
        }
        alone.push(steps);
        continuations.push(cont);
    }
    // Together: sequence 0 prefills in two chunks while the others run.
    let mut cache = common::kv_cache(&model);
    for i in 0..prompts.len() {
        cache.allocate(SeqId(i as u64), 64).unwrap();
    }
    let mut b = ForwardBatch::default();
    b.push(SeqId(0), &prompts[0][..6], 0);
    for (i, p) in prompts.iter().enumerate().skip(1) {
        b.push(SeqId(i as u64), p, 0);
    }
    let first = model.forward(&b, &mut cache).unwrap();
    for (i, steps) in alone.iter().enumerate().skip(1) {
        let d = max_abs_diff(&first.get(i).unwrap(), &steps[0].get(0).unwrap());
        assert!(d < 1e-4, "seq {i} prefill: {d}");
    }
    for step in 0..4 {
        let mut b = ForwardBatch::default();
        if step == 0 {
            b.push(SeqId(0), &prompts[0][6..], 6);
        } else {
            b.push(
                SeqId(0),
                &[continuations[0][step - 1]],
                prompts[0].len() + step - 1,
            );
        }
        for (i, (p, cont)) in prompts.iter().zip(&continuations).enumerate().skip(1) {
            b.push(SeqId(i as u64), &[cont[step]], p.len() + step);
        }
        let l = model.forward(&b, &mut cache).unwrap();
        let d0 = max_abs_diff(&l.get(0).unwrap(), &alone[0][step].get(0).unwrap());
        assert!(d0 < 1e-4, "seq 0 step {step}: {d0}");
        for (i, steps) in alone.iter().enumerate().skip(1) {
            let d = max_abs_diff(&l.get(i).unwrap(), &steps[step + 1].get(0).unwrap());
            assert!(d < 1e-4, "seq {i} step {step}: {d}");
        }
    }
}
