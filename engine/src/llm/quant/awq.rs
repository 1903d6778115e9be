//! `switchyard quantize`: 4-bit weight quantization of a Hugging Face folder,
//! by AWQ (Lin et al., activation-aware weight quantization) or plain
//! round-to-nearest, written as an AutoAWQ checkpoint.
//!
//! AWQ, as done here: the full-precision model runs over calibration text
//! while every projection's input is observed (per-channel mean magnitude,
//! and a sample of token rows). For each group of projections that share an
//! input (q/k/v, o, gate/up, down), a grid over `α ∈ [0, 1)` scales input
//! channel `c` by `s_c = x̄_c^α / w̄_c^(1−α)` (AutoAWQ's "duo" scaling,
//! normalized so that `max·min = 1`), quantizes `W·diag(s)` in groups,
//! and keeps the `s` whose `X·(Q(W·s)/s)ᵀ` is closest to `X·Wᵀ` on the
//! sampled rows (`α = 0` is round-to-nearest, so the search never loses to
//! it there). The scales are folded into what produces the input: the RMS
//! norm before q/k/v and gate/up, `v_proj`'s rows before o (only without
//! grouped-query attention, as AutoAWQ does) and `up_proj`'s rows before
//! down. Unlike AutoAWQ, the error is the group's projections' output, not
//! the whole attention or MLP block's.
use super::awq_format::AwqConfig;
use super::Int4;
use crate::llm::config::LlamaConfig;
use crate::llm::error::{LlmError, Result};
use crate::llm::kv_cache::KvDtype;
use crate::llm::loader::{load_err, load_model, safetensors_files};
use crate::llm::model::Site;
use crate::llm::quant::Quantization;
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// How 4-bit codes are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Activation-aware scales searched on calibration text, then rounding.
    Awq,
    /// Round-to-nearest per group: the same bits without AWQ's scaling.
    Rtn,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub method: Method,
    pub group_size: usize,
    /// Calibration sequences of `seq_len` tokens (AWQ only).
    pub samples: usize,
    pub seq_len: usize,
    /// AWQ only: also search each group's clipping range (AutoAWQ's
    /// `auto_clip`), for every projection but q and k.
    pub clip: bool,
}

/// What the search chose for one group of projections.
#[derive(Debug, Clone)]
pub struct GroupReport {
    pub layer: usize,
    pub site: Site,
    pub alpha: f32,
    /// Mean squared output error on the sampled rows with the chosen scales.
    pub error: f64,
    /// The same with round-to-nearest.
    pub rtn_error: f64,
}

/// Points of the grid over α, and steps of 1/GRID in the clipping search.
const GRID: usize = 20;
/// Clipping ranges tried: down to this share of a group's largest magnitude.
const MAX_SHRINK: f32 = 0.5;
/// Token rows kept per projection input for the search.
const ROWS: usize = 512;

/// What produces a group's input, and so takes the inverse of its scales.
#[derive(Clone, Copy)]
enum Prev {
    Norm(&'static str),
    Rows(&'static str),
    None,
}

/// The groups of one layer: the site, the projections and their producer.
fn groups(c: &LlamaConfig) -> [(Site, &'static [&'static str], Prev); 4] {
    let o_prev = if c.num_attention_heads == c.num_key_value_heads {
        Prev::Rows("self_attn.v_proj")
    } else {
        Prev::None
    };
    [
        (
            Site::Qkv,
            &["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
            Prev::Norm("input_layernorm"),
        ),
        (Site::O, &["self_attn.o_proj"], o_prev),
        (
            Site::GateUp,
            &["mlp.gate_proj", "mlp.up_proj"],
            Prev::Norm("post_attention_layernorm"),
        ),
        (Site::Down, &["mlp.down_proj"], Prev::Rows("mlp.up_proj")),
    ]
}

/// Every tensor of a checkpoint as f32, by name, with its shape.
struct Checkpoint(BTreeMap<String, (Vec<usize>, Vec<f32>)>);

impl Checkpoint {
    fn read(dir: &Path) -> Result<Self> {
        let mut map = BTreeMap::new();
        for path in safetensors_files(dir)? {
            for (name, t) in candle_core::safetensors::load(&path, &Device::Cpu)? {
                if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                    return Err(not_dense(dir, &format!("tensor {name} is {:?}", t.dtype())));
                }
                let shape = t.dims().to_vec();
                map.insert(
                    name,
                    (shape, t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?),
                );
            }
        }
        Ok(Self(map))
    }

    fn get(&self, name: &str) -> Result<&(Vec<usize>, Vec<f32>)> {
        self.0
            .get(name)
            .ok_or_else(|| LlmError::Unsupported(format!("tensor {name} is missing")))
    }

    fn weight_mut(&mut self, name: &str) -> Result<&mut Vec<f32>> {
        self.0
            .get_mut(name)
            .map(|(_, w)| w)
            .ok_or_else(|| LlmError::Unsupported(format!("tensor {name} is missing")))
    }
}

fn not_dense(path: &Path, why: &str) -> LlmError {
    LlmError::Unsupported(format!(
        "quantize reads a Hugging Face folder of f32, f16 or bf16 safetensors; {}: {why} \
         (a GGUF model becomes one with `switchyard export --dtype f16 --out DIR MODEL.gguf`)",
        path.display()
    ))
}

/// Per-channel mean magnitude and a sample of rows of one projection input.
#[derive(Default)]
struct Observed {
    abs_sum: Vec<f64>,
    count: usize,
    rows: Vec<f32>,
}

/// Runs the model over the calibration sequences and observes every
/// projection input, indexed `layer·4 + site`.
fn calibrate(
    dir: &Path,
    text: &str,
    opts: &Options,
    progress: &dyn Fn(&str, usize, usize),
) -> Result<Vec<Observed>> {
    let loaded = load_model(dir, &Device::Cpu, Quantization::None)?;
    let tokens = loaded.tokenizer.encode(text)?;
    let seqs: Vec<&[u32]> = tokens
        .chunks_exact(opts.seq_len)
        .take(opts.samples)
        .collect();
    if seqs.is_empty() {
        return Err(LlmError::InvalidRequest(format!(
            "the calibration text has {} tokens, fewer than one sequence of {}",
            tokens.len(),
            opts.seq_len
        )));
    }
    let layers = loaded.model.config.num_hidden_layers;
    let stride = (seqs.len() * opts.seq_len).div_ceil(ROWS);
    let mut observed: Vec<Observed> = (0..layers * 4).map(|_| Observed::default()).collect();
    for (i, seq) in seqs.iter().enumerate() {
        let base = i * opts.seq_len;
        let mut tap = |layer: usize, site: Site, x: &[f32]| {
            let o = &mut observed[layer * 4 + site as usize];
            let width = x.len() / seq.len();
            o.abs_sum.resize(width, 0.0);
            for (t, row) in x.chunks_exact(width).enumerate() {
                o.abs_sum
                    .iter_mut()
                    .zip(row)
                    .for_each(|(s, v)| *s += v.abs() as f64);
                if (base + t).is_multiple_of(stride) {
                    o.rows.extend_from_slice(row);
                }
            }
            o.count += seq.len();
        };
        loaded.model.observe(seq, KvDtype::F32, &mut tap)?;
        progress("calibrating", i + 1, seqs.len());
    }
    Ok(observed)
}

/// `x · wᵀ` for `x` `[rows, k]` and `w` `[n, k]`.
fn product(x: &Tensor, w: &[f32], n: usize, k: usize) -> Result<Tensor> {
    let w = Tensor::from_slice(w, (n, k), &Device::Cpu)?;
    Ok(x.matmul(&w.t()?)?)
}

fn mse(a: &Tensor, b: &Tensor) -> Result<f64> {
    Ok((a - b)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64)
}

/// `w` `[n, k]` quantized in groups after scaling its columns by `s`, then
/// unscaled: what the folded checkpoint computes.
fn fake_quant(w: &[f32], s: &[f32], n: usize, k: usize, group: usize) -> Vec<f32> {
    let scaled: Vec<f32> = w
        .chunks_exact(k)
        .flat_map(|r| r.iter().zip(s).map(|(w, s)| w * s))
        .collect();
    let mut q = Int4::quantize(&scaled, n, k, group).dequantize();
    for row in q.chunks_exact_mut(k) {
        row.iter_mut().zip(s).for_each(|(w, s)| *w /= s);
    }
    q
}

/// AutoAWQ's per-channel weight magnitude: each group normalized by its
/// largest value, averaged over rows.
fn weight_mean(w: &[f32], k: usize, group: usize) -> Vec<f32> {
    let mut mean = vec![0f32; k];
    let rows = w.len() / k;
    for row in w.chunks_exact(k) {
        for (g, chunk) in row.chunks_exact(group).enumerate() {
            let max = chunk.iter().fold(0f32, |m, v| m.max(v.abs())) + 1e-6;
            for (j, v) in chunk.iter().enumerate() {
                mean[g * group + j] += v.abs() / max / rows as f32;
            }
        }
    }
    mean
}

/// The grid search of one group: the chosen scales with their report.
fn search(
    o: &Observed,
    w: &[f32],
    n: usize,
    k: usize,
    group: usize,
) -> Result<(Vec<f32>, f32, f64, f64)> {
    let x_mean: Vec<f32> = o
        .abs_sum
        .iter()
        .map(|s| (s / o.count as f64) as f32)
        .collect();
    let w_mean = weight_mean(w, k, group);
    let x = Tensor::from_slice(&o.rows, (o.rows.len() / k, k), &Device::Cpu)?;
    let want = product(&x, w, n, k)?;
    let mut best: Option<(Vec<f32>, f32, f64)> = None;
    let mut rtn_error = f64::NAN;
    for i in 0..GRID {
        let alpha = i as f32 / GRID as f32;
        let mut s: Vec<f32> = x_mean
            .iter()
            .zip(&w_mean)
            .map(|(x, w)| (x.powf(alpha) / (w.powf(1.0 - alpha) + 1e-4)).max(1e-4))
            .collect();
        let (lo, hi) = s
            .iter()
            .fold((f32::MAX, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
        let norm = (lo * hi).sqrt();
        s.iter_mut().for_each(|v| *v /= norm);
        if i == 0 {
            // Round-to-nearest itself, the anchor of the search.
            let ones = vec![1f32; k];
            rtn_error = mse(
                &product(&x, &fake_quant(w, &ones, n, k, group), n, k)?,
                &want,
            )?;
            best = Some((ones, 0.0, rtn_error));
        }
        let err = mse(&product(&x, &fake_quant(w, &s, n, k, group), n, k)?, &want)?;
        if best.as_ref().is_none_or(|b| err < b.2) {
            best = Some((s, alpha, err));
        }
    }
    let (s, alpha, err) = best.expect("the grid is not empty");
    Ok((s, alpha, err, rtn_error))
}

/// AutoAWQ's clipping search: for each row and group of `w` `[n, k]`, the
/// range `±r·max|w|` (r from 1 down to `1 − MAX_SHRINK`) whose quantized
/// group gives the output on the sampled inputs `x` closest to the
/// unclipped one; the weights are clamped to it. A row's change `δ` on a
/// group moves the outputs by `X_g·δ`, whose mean square is `δᵀ·G·δ` with
/// `G = X_gᵀX_g / rows`: one `group × group` product per row instead of one
/// product with every sampled input.
fn clip(w: &mut [f32], n: usize, k: usize, group: usize, x: &[f32]) -> Result<()> {
    let rows = x.len() / k;
    let cpu = &Device::Cpu;
    for g in 0..k / group {
        let cols = |m: &[f32], r: usize| -> Vec<f32> {
            m.chunks_exact(k)
                .take(r)
                .flat_map(|row| &row[g * group..][..group])
                .copied()
                .collect()
        };
        let xg = Tensor::from_vec(cols(x, rows), (rows, group), cpu)?;
        let gram = (xg.t()?.contiguous()?.matmul(&xg)? / rows as f64)?;
        let wg = cols(w, n);
        let amax: Vec<f32> = wg
            .chunks_exact(group)
            .map(|r| r.iter().fold(0f32, |m, v| m.max(v.abs())))
            .collect();
        let mut best = amax.clone();
        let mut best_err = vec![f32::MAX; n];
        for i in 0..(MAX_SHRINK * GRID as f32) as usize {
            let ratio = 1.0 - i as f32 / GRID as f32;
            let clamped: Vec<f32> = wg
                .chunks_exact(group)
                .zip(&amax)
                .flat_map(|(r, m)| r.iter().map(move |v| v.clamp(-m * ratio, m * ratio)))
                .collect();
            let delta: Vec<f32> = Int4::quantize(&clamped, n, group, group)
                .dequantize()
                .iter()
                .zip(&wg)
                .map(|(q, w)| q - w)
                .collect();
            let moved = Tensor::from_slice(&delta, (n, group), cpu)?
                .matmul(&gram)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            let per_row = moved.chunks_exact(group).zip(delta.chunks_exact(group));
            for (r, (m, d)) in per_row.enumerate() {
                let err: f32 = m.iter().zip(d).map(|(m, d)| m * d).sum();
                if err < best_err[r] {
                    best_err[r] = err;
                    best[r] = amax[r] * ratio;
                }
            }
        }
        for (row, m) in w.chunks_exact_mut(k).zip(&best) {
            row[g * group..][..group]
                .iter_mut()
                .for_each(|v| *v = v.clamp(-m, *m));
        }
    }
    Ok(())
}

/// Quantizes the Hugging Face folder `src` to 4 bits into `out` (an AutoAWQ
/// checkpoint); `calibration` is the text AWQ observes (unused by RTN).
/// `progress(stage, done, total)` follows calibration and layers.
pub fn quantize(
    src: &Path,
    out: &Path,
    calibration: Option<&str>,
    opts: &Options,
    progress: &dyn Fn(&str, usize, usize),
) -> Result<Vec<GroupReport>> {
    if !src.is_dir() {
        return Err(not_dense(src, "it is a file, not a folder"));
    }
    let text = std::fs::read_to_string(src.join("config.json"))
        .map_err(|e| load_err(&src.join("config.json"), e))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| load_err(src, e))?;
    if let Some(method) = json["quantization_config"]["quant_method"].as_str() {
        return Err(not_dense(
            src,
            &format!("it is quantized already (quant_method {method})"),
        ));
    }
    let model_type = json["model_type"].as_str().unwrap_or("llama");
    if !matches!(model_type, "llama" | "mistral" | "qwen2") {
        return Err(LlmError::Unsupported(format!(
            "4-bit quantization of `{model_type}` checkpoints is not supported yet: \
             llama, mistral and qwen2 are (int8 at load works for every family)"
        )));
    }
    let config = LlamaConfig::from_hf_json(&text)?;
    let g = opts.group_size;
    if g == 0 || !g.is_multiple_of(32) {
        return Err(LlmError::InvalidRequest(format!(
            "group size {g}: a positive multiple of 32"
        )));
    }
    let mut ckpt = Checkpoint::read(src)?;
    // Every projection's input width must split into whole groups.
    for (_, names, _) in groups(&config) {
        for name in names {
            let full = format!("model.layers.0.{name}.weight");
            let k = ckpt.get(&full)?.0[1];
            if !k.is_multiple_of(g) {
                return Err(LlmError::InvalidRequest(format!(
                    "group size {g} does not divide the {k} inputs of {full}; pick one that does (e.g. 32 or 64)"
                )));
            }
        }
    }
    let observed = match (opts.method, calibration) {
        (Method::Awq, Some(text)) => Some(calibrate(src, text, opts, progress)?),
        (Method::Awq, None) => {
            return Err(LlmError::InvalidRequest(
                "AWQ needs calibration text (--calib FILE)".into(),
            ))
        }
        (Method::Rtn, _) => None,
    };
    let mut report = Vec::new();
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    let mut scales: [Option<Vec<f32>>; 4] = Default::default();
    let layers = config.num_hidden_layers;
    for layer in 0..layers {
        let p = format!("model.layers.{layer}");
        if let Some(observed) = &observed {
            // Search every group on the unscaled weights, then fold.
            scales = Default::default();
            for (site, names, prev) in groups(&config) {
                if matches!(prev, Prev::None) {
                    // Nothing can take the inverse scales: round-to-nearest.
                    continue;
                }
                let mut w = Vec::new();
                let mut k = 0;
                for name in names {
                    let (shape, v) = ckpt.get(&format!("{p}.{name}.weight"))?;
                    k = shape[1];
                    w.extend_from_slice(v);
                }
                let n = w.len() / k;
                let o = &observed[layer * 4 + site as usize];
                let (s, alpha, error, rtn_error) = search(o, &w, n, k, g)?;
                report.push(GroupReport {
                    layer,
                    site,
                    alpha,
                    error,
                    rtn_error,
                });
                scales[site as usize] = Some(s);
            }
            for (site, names, prev) in groups(&config) {
                let Some(s) = scales[site as usize].as_deref() else {
                    continue;
                };
                for name in names {
                    let w = ckpt.weight_mut(&format!("{p}.{name}.weight"))?;
                    let k = s.len();
                    for row in w.chunks_exact_mut(k) {
                        row.iter_mut().zip(s).for_each(|(w, s)| *w *= s);
                    }
                }
                match prev {
                    Prev::Norm(norm) => {
                        let w = ckpt.weight_mut(&format!("{p}.{norm}.weight"))?;
                        w.iter_mut().zip(s).for_each(|(w, s)| *w /= s);
                    }
                    Prev::Rows(proj) => {
                        let w = ckpt.weight_mut(&format!("{p}.{proj}.weight"))?;
                        let k = w.len() / s.len();
                        for (row, s) in w.chunks_exact_mut(k).zip(s) {
                            row.iter_mut().for_each(|w| *w /= s);
                        }
                        if let Ok(b) = ckpt.weight_mut(&format!("{p}.{proj}.bias")) {
                            b.iter_mut().zip(s).for_each(|(b, s)| *b /= s);
                        }
                    }
                    Prev::None => unreachable!("not searched"),
                }
            }
        }
        for (site, names, _) in groups(&config) {
            // The sampled inputs as the scaled weights see them.
            let inputs = match (&observed, opts.clip) {
                (Some(observed), true) => {
                    let o = &observed[layer * 4 + site as usize];
                    let mut rows = o.rows.clone();
                    if let Some(s) = &scales[site as usize] {
                        for row in rows.chunks_exact_mut(s.len()) {
                            row.iter_mut().zip(s).for_each(|(x, s)| *x /= s);
                        }
                    }
                    Some(rows)
                }
                _ => None,
            };
            for name in names {
                let full = format!("{p}.{name}.weight");
                let (shape, mut w) = ckpt.0.remove(&full).expect("read above");
                if let Some(x) = inputs
                    .as_ref()
                    .filter(|_| !name.ends_with("q_proj") && !name.ends_with("k_proj"))
                {
                    clip(&mut w, shape[0], shape[1], g, x)?;
                }
                let q = Int4::quantize(&w, shape[0], shape[1], g);
                tensors.extend(q.awq_tensors(&format!("{p}.{name}"))?);
            }
        }
        progress("quantizing layers", layer + 1, layers);
    }
    // Everything else (embeddings, norms, biases, an untied LM head) in f16.
    for (name, (shape, v)) in ckpt.0 {
        let t = Tensor::from_vec(v, shape, &Device::Cpu)?.to_dtype(DType::F16)?;
        tensors.insert(name, t);
    }
    write(src, out, json, g, tensors)?;
    Ok(report)
}

/// Writes the checkpoint: tensors, `config.json` with the
/// `quantization_config`, AutoAWQ's `quant_config.json`, and the source's
/// tokenizer and generation files.
fn write(
    src: &Path,
    out: &Path,
    mut json: serde_json::Value,
    group_size: usize,
    tensors: HashMap<String, Tensor>,
) -> Result<()> {
    std::fs::create_dir_all(out).map_err(|e| load_err(out, e))?;
    super::awq_format::save(tensors, &out.join("model.safetensors"))?;
    let awq = AwqConfig { group_size };
    json["quantization_config"] = awq.to_json();
    json["torch_dtype"] = "float16".into();
    let write_json = |name: &str, v: &serde_json::Value| {
        let text = serde_json::to_string_pretty(v).expect("a JSON value");
        std::fs::write(out.join(name), text).map_err(|e| load_err(&out.join(name), e))
    };
    write_json("config.json", &json)?;
    write_json(
        "quant_config.json",
        &serde_json::json!({"zero_point": true, "q_group_size": group_size, "w_bit": 4, "version": "GEMM"}),
    )?;
    crate::llm::export::copy_side_files(src, out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Values in (-1, 1), with every 29th eight times larger, as the large
    /// input channels of activations are.
    fn values(len: usize, seed: u64) -> Vec<f32> {
        let v = crate::llm::quant::tests::pseudo_random(len, seed);
        v.iter()
            .enumerate()
            .map(|(i, v)| if i % 29 == 0 { 8.0 * v } else { *v })
            .collect()
    }

    /// Each row's clamp is the candidate whose quantized group moves the
    /// outputs on the sampled inputs least, measured here directly (every
    /// input row's output, in f64).
    #[test]
    fn clip_picks_the_range_with_the_least_output_error() {
        let (n, k, group, rows) = (6, 64, 32, 40);
        let w = values(n * k, 1);
        let x = values(rows * k, 2);
        let mut clipped = w.clone();
        clip(&mut clipped, n, k, group, &x).unwrap();
        let error = |r: usize, g: usize, m: f32| -> f64 {
            let cols = g * group..(g + 1) * group;
            let c: Vec<f32> = w[r * k..][cols.clone()]
                .iter()
                .map(|v| v.clamp(-m, m))
                .collect();
            let q = Int4::quantize(&c, 1, group, group).dequantize();
            let shift: Vec<f64> = q
                .iter()
                .zip(&w[r * k..][cols.clone()])
                .map(|(q, w)| (q - w) as f64)
                .collect();
            (0..rows)
                .map(|t| {
                    let xt = &x[t * k..][cols.clone()];
                    let y: f64 = xt.iter().zip(&shift).map(|(x, d)| *x as f64 * d).sum();
                    y * y
                })
                .sum::<f64>()
                / rows as f64
        };
        for r in 0..n {
            for g in 0..k / group {
                let part = &w[r * k..][g * group..][..group];
                let amax = part.iter().fold(0f32, |m, v| m.max(v.abs()));
                let chosen = clipped[r * k..][g * group..][..group]
                    .iter()
                    .fold(0f32, |m, v| m.max(v.abs()));
                let best = (0..(MAX_SHRINK * GRID as f32) as usize)
                    .map(|i| error(r, g, amax * (1.0 - i as f32 / GRID as f32)))
                    .fold(f64::MAX, f64::min);
                let got = error(r, g, chosen);
                assert!(
                    got <= best * (1.0 + 1e-4),
                    "row {r}, group {g}: clamped at {chosen} (error {got}), best error {best}"
                );
            }
        }
    }
}
