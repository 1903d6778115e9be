//! Weight quantization on a tiny random-weight model: INT8 at load, AWQ and
//! round-to-nearest checkpoints written by `quantize` and read back by the
//! loader and by `export`, and the refusals a user meets first.
mod common;

use candle_core::{DType, Device, Tensor};
use engine::llm::export::export;
use engine::llm::kv_cache::KvDtype;
use engine::llm::load_model;
use engine::llm::quant::awq::{quantize, Method, Options};
use engine::llm::quant::Quantization;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

fn tiny(dir: &Path) {
    common::tiny_checkpoint(dir);
    common::tiny_tokenizer(dir);
}

/// Seeded words of the tiny vocabulary.
fn words(n: usize, seed: usize) -> String {
    (0..n)
        .map(|i| format!("w{}", 3 + (i * 7919 + seed * 104_729 + i * i) % 94))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Log-probabilities of a fixed continuation under the model at `dir`.
fn scores(dir: &Path, q: Quantization) -> Vec<f32> {
    let m = load_model(dir, &Device::Cpu, q).unwrap();
    let tokens = m.tokenizer.encode(&words(48, 1)).unwrap();
    m.model.score(&tokens, 1, KvDtype::F32).unwrap()
}

fn mean_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(a, b)| (a - b).abs()).sum::<f32>() / a.len() as f32
}

fn opts(method: Method) -> Options {
    Options {
        method,
        group_size: 32,
        samples: 8,
        seq_len: 64,
        clip: true,
    }
}

#[test]
fn int8_at_load_stays_close_to_the_dense_model() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let dense = scores(dir.path(), Quantization::None);
    let int8 = scores(dir.path(), Quantization::Int8);
    let rtn = dir.path().join("rtn");
    quantize(dir.path(), &rtn, None, &opts(Method::Rtn), &|_, _, _| ()).unwrap();
    let (d8, d4) = (
        mean_abs_diff(&dense, &int8),
        mean_abs_diff(&dense, &scores(&rtn, Quantization::None)),
    );
    assert!(
        d8 > 0.0 && d8 < 0.25 * d4,
        "mean |Δ log p|: int8 {d8}, 4-bit {d4}"
    );
    // A GGUF (any file) is quantized already.
    let e = load_model(
        &dir.path().join("model.safetensors"),
        &Device::Cpu,
        Quantization::Int8,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(e.contains("quantized already"), "{e}");
}

#[test]
fn awq_and_rtn_checkpoints_load_and_export_to_what_they_hold() {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let calib = words(1024, 2);
    let (awq, rtn) = (dir.path().join("awq"), dir.path().join("rtn"));
    let report = quantize(
        dir.path(),
        &awq,
        Some(&calib),
        &opts(Method::Awq),
        &|_, _, _| (),
    )
    .unwrap();
    // q/k/v, gate/up and down per layer (o has no producer to fold into
    // under grouped-query attention); α = 0 is round-to-nearest, so the
    // search never does worse on its rows.
    assert_eq!(report.len(), 2 * 3);
    for g in &report {
        assert!(g.error <= g.rtn_error, "{g:?}");
    }
    assert!(report.iter().any(|g| g.error < g.rtn_error), "{report:?}");
    assert!(
        quantize(dir.path(), &rtn, None, &opts(Method::Rtn), &|_, _, _| ())
            .unwrap()
            .is_empty()
    );

    let dense = scores(dir.path(), Quantization::None);
    for ckpt in [&awq, &rtn] {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(ckpt.join("config.json")).unwrap())
                .unwrap();
        assert_eq!(config["quantization_config"]["quant_method"], "awq");
        assert_eq!(config["quantization_config"]["group_size"], 32);
        let served = scores(ckpt, Quantization::None);
        // The 4-bit model against the weights its groups stand for, written
        // out dense by `export`: only the activations' 8-bit rounding differs.
        let out = ckpt.with_extension("dense");
        export(ckpt, &out, DType::F32, &|_, _| ()).unwrap();
        let exported = scores(&out, Quantization::None);
        let (to_exported, to_dense) = (
            mean_abs_diff(&served, &exported),
            mean_abs_diff(&served, &dense),
        );
        assert!(
            to_exported < 0.2 * to_dense,
            "{}: mean |Δ log p| {to_exported} to its dense export, {to_dense} to the original",
            ckpt.display()
        );
    }

    // Quantizing again, or with groups that do not divide, is refused.
    let e = quantize(
        &awq,
        &dir.path().join("x"),
        None,
        &opts(Method::Rtn),
        &|_, _, _| (),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("quantized already"), "{e}");
    let mut odd = opts(Method::Rtn);
    odd.group_size = 96;
    let e = quantize(dir.path(), &dir.path().join("x"), None, &odd, &|_, _, _| ())
        .unwrap_err()
        .to_string();
    assert!(e.contains("group size 96") && e.contains("q_proj"), "{e}");
    let e = quantize(
        &dir.path().join("model.safetensors"),
        &dir.path().join("x"),
        None,
        &odd,
        &|_, _, _| (),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("switchyard export"), "{e}");
}

/// The tiny model in a temporary folder, with its round-to-nearest AWQ
/// checkpoint written beside it (`awq`).
fn rtn_checkpoint() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    tiny(dir.path());
    let awq = dir.path().join("awq");
    quantize(dir.path(), &awq, None, &opts(Method::Rtn), &|_, _, _| ()).unwrap();
    (dir, awq)
}

/// Rewrites the checkpoint at `dir` with `edit` applied to its tensors.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut HashMap<String, Tensor>)) {
    let path = dir.join("model.safetensors");
    let mut t = candle_core::safetensors::load(&path, &Device::Cpu).unwrap();
    edit(&mut t);
    candle_core::safetensors::save(&t, &path).unwrap();
}

#[test]
fn a_broken_awq_checkpoint_names_what_is_wrong() {
    let (dir, awq) = rtn_checkpoint();
    let err = |dir: &Path| {
        load_model(dir, &Device::Cpu, Quantization::None)
            .err()
            .unwrap()
            .to_string()
    };

    let missing = dir.path().join("missing");
    copy_dir(&awq, &missing);
    edit_tensors(&missing, |t| {
        t.remove("model.layers.1.mlp.up_proj.qzeros");
    });
    let e = err(&missing);
    assert!(e.contains("model.layers.1.mlp.up_proj.qzeros"), "{e}");

    let shape = dir.path().join("shape");
    copy_dir(&awq, &shape);
    edit_tensors(&shape, |t| {
        let s = &t["model.layers.0.self_attn.k_proj.scales"];
        let narrow = s.narrow(1, 0, 16).unwrap();
        t.insert("model.layers.0.self_attn.k_proj.scales".into(), narrow);
    });
    let e = err(&shape);
    assert!(
        e.contains("model.layers.0.self_attn.k_proj.scales") && e.contains("[2, 16]"),
        "{e}"
    );

    let bits = dir.path().join("bits");
    copy_dir(&awq, &bits);
    let cfg = std::fs::read_to_string(bits.join("config.json")).unwrap();
    std::fs::write(
        bits.join("config.json"),
        cfg.replace("\"bits\": 4", "\"bits\": 3")
            .replace("\"w_bit\": 4", "\"w_bit\": 3"),
    )
    .unwrap();
    let e = err(&bits);
    assert!(e.contains("bits (w_bit)"), "{e}");
}

#[test]
fn int8_on_an_awq_checkpoint_quantizes_its_dense_head() {
    let (_dir, awq) = rtn_checkpoint();
    let (dense_head, int8_head) = (
        scores(&awq, Quantization::None),
        scores(&awq, Quantization::Int8),
    );
    let d = mean_abs_diff(&dense_head, &int8_head);
    assert!(d > 0.0 && d < 0.05, "mean |Δ log p| {d}");
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}
