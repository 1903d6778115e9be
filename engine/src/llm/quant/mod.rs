//! Weight-only quantization done by Switchyard: INT8 per output channel at
//! load, and 4-bit groups with zero points (the form AWQ and round-to-nearest
//! checkpoints store). Both are packed for the integer kernels that serve
//! GGUF weights (`kernels::quant`): INT8 as Q8_0 blocks whose scale is the
//! row's, 4-bit groups as Q4_1 blocks (`w = d·q + m` with `d = s` and
//! `m = −z·s`, exact in f32), so activations are quantized per block to int8
//! and every product is an integer dot product on AVX-512 VNNI, AVX2 or the
//! portable path alike.
pub mod awq;
pub mod awq_format;

use kernels::quant::{QuantMatrix, QuantType, QK};
use serde::{Deserialize, Serialize};

/// What the loader does to a checkpoint's dense projections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantization {
    /// As stored: dense f32 for safetensors, the file's blocks for GGUF,
    /// 4-bit groups for AWQ folders.
    #[default]
    None,
    /// INT8 weight-only, symmetric per output channel, done at load; on
    /// an AWQ checkpoint, for the LM head that AWQ leaves dense.
    Int8,
}

impl std::str::FromStr for Quantization {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "none" => Ok(Self::None),
            "int8" => Ok(Self::Int8),
            other => Err(format!(
                "quantization `{other}`: expected `int8` or `none` (AWQ checkpoints are detected from their config.json)"
            )),
        }
    }
}

/// INT8 weights `[n, k]`: one scale per output row (`max |w| / 127`), values
/// rounded to the nearest step.
pub fn int8_matrix(w: &[f32], n: usize, k: usize) -> QuantMatrix {
    assert_eq!(w.len(), n * k, "weights [{n}, {k}]");
    QuantMatrix::from_rows(QuantType::Q8_0, n, k, |r, row| {
        let w = &w[r * k..][..k];
        let d = int8_scale(w);
        for (c, &v) in row.codes.iter_mut().zip(w) {
            *c = ((v / d).round().clamp(-127.0, 127.0) as i32 + 128) as u8;
        }
        for b in 0..k / QK {
            row.set_block(b, d, -128.0 * d);
        }
    })
}

/// The per-row INT8 step: the largest magnitude over 127 (1 for a zero row).
fn int8_scale(w: &[f32]) -> f32 {
    let amax = w.iter().fold(0f32, |m, v| m.max(v.abs()));
    if amax > 0.0 {
        amax / 127.0
    } else {
        1.0
    }
}

/// 4-bit weights `[n, k]` in groups of `group` consecutive input values per
/// row: `w = (q − z)·s`, with `q` and `z` in 0..16 and `s` an f16 value.
#[derive(Debug, Clone, PartialEq)]
pub struct Int4 {
    pub n: usize,
    pub k: usize,
    pub group: usize,
    /// `[n, k]`, one code per byte.
    pub q: Vec<u8>,
    /// `[n, k / group]`.
    pub zeros: Vec<u8>,
    /// `[n, k / group]`, each exactly an f16 value.
    pub scales: Vec<f32>,
}

impl Int4 {
    /// Round-to-nearest over each group's range (AutoAWQ's
    /// `pseudo_quantize_tensor` with a zero point): `s = (max − min) / 15`
    /// rounded to f16, `z = round(−min / s)` clamped to 0..16. The range
    /// always takes in 0, so that a group of one sign keeps its extremes
    /// (AutoAWQ clamps the zero point instead and cuts them off).
    pub fn quantize(w: &[f32], n: usize, k: usize, group: usize) -> Self {
        assert_eq!(w.len(), n * k, "weights [{n}, {k}]");
        assert!(
            group > 0 && k.is_multiple_of(group),
            "group {group} does not divide {k}"
        );
        let groups = k / group;
        let mut out = Self {
            n,
            k,
            group,
            q: vec![0; n * k],
            zeros: vec![0; n * groups],
            scales: vec![0.0; n * groups],
        };
        for (gi, chunk) in w.chunks_exact(group).enumerate() {
            let (lo, hi) = chunk
                .iter()
                .fold((0f32, 0f32), |(lo, hi), &v| (lo.min(v), hi.max(v)));
            let s = half::f16::from_f32(((hi - lo).max(1e-5)) / 15.0).to_f32();
            let z = (-(lo / s)).round().clamp(0.0, 15.0);
            out.scales[gi] = s;
            out.zeros[gi] = z as u8;
            for (q, &v) in out.q[gi * group..][..group].iter_mut().zip(chunk) {
                *q = ((v / s).round() + z).clamp(0.0, 15.0) as u8;
            }
        }
        out
    }

    /// The weights these codes stand for, `[n, k]`.
    pub fn dequantize(&self) -> Vec<f32> {
        self.q
            .chunks_exact(self.group)
            .zip(self.zeros.iter().zip(&self.scales))
            .flat_map(|(q, (&z, &s))| q.iter().map(move |&q| (q as f32 - z as f32) * s))
            .collect()
    }

    /// Packed for the Q4_1 kernel: each block of 32 takes its group's scale
    /// and `−z·s` as offset.
    pub fn matrix(&self) -> QuantMatrix {
        let (k, group) = (self.k, self.group);
        assert!(
            group.is_multiple_of(QK),
            "group {group} is not a multiple of {QK}"
        );
        QuantMatrix::from_rows(QuantType::Q4_1, self.n, k, |r, row| {
            row.codes.copy_from_slice(&self.q[r * k..][..k]);
            for b in 0..k / QK {
                let g = r * (k / group) + b * QK / group;
                let s = self.scales[g];
                row.set_block(b, s, -(self.zeros[g] as f32) * s);
            }
        })
    }
}

#[cfg(test)]
mod tests;
