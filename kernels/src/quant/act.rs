//! Activations quantized to 8 bits as ggml quantizes them for each weight
//! type, laid out in the weights' [`Layout`].
use super::{dot::ActRow, Isa, Layout, Scheme, LANES, QK, STEP};

/// Rows of activations quantized to 8 bits, in a [`Layout`]'s order: per
/// group, each step's bytes at `start + 32·s`. Per lane, `d` is its block's
/// scale and `s` the scaled sum of values that the lane's weight offset
/// multiplies (with [`Scheme::Q8_0`] and [`Scheme::Q8_1`], the whole
/// 32-value block's sum in its first lane and zero in the others), and
/// `sums` the integer sum of the lane's own values.
pub struct Activations {
    pub(super) layout: Layout,
    pub(super) scheme: Scheme,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
    sums: Vec<i32>,
}

fn f16(v: f32) -> f32 {
    half::f16::from_f32(v).to_f32()
}

/// ggml's scale for a 32-value block: its largest magnitude maps to ±127
/// (stored rounded to f16); and the factor values are multiplied by.
fn q8_scale(amax: f32) -> (f32, f32) {
    let d = amax / 127.0;
    (d, if d != 0.0 { 1.0 / d } else { 0.0 })
}

/// `v·id` rounded to the nearest integer, ties away from zero (as ggml's
/// reference `roundf`).
fn q8(v: f32, id: f32) -> i8 {
    (v * id).round().clamp(-128.0, 127.0) as i8
}

/// Quantizes one row of 32-value blocks (Q8_0/Q8_1), a scale per block.
fn quantize_q8_portable(x: &[f32], q: &mut [i8], scale: &mut [f32]) {
    for ((xs, q), scale) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(scale) {
        let (d, id) = q8_scale(xs.iter().fold(0f32, |m, &v| m.max(v.abs())));
        *scale = d;
        for (q, &v) in q.iter_mut().zip(xs) {
            *q = q8(v, id);
        }
    }
}

/// [`quantize_q8_portable`] with AVX2, to the same bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn quantize_q8_avx2(x: &[f32], q: &mut [i8], scale: &mut [f32]) {
    use std::arch::x86_64::*;
    let sign = _mm256_set1_ps(-0.0);
    let order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for ((xs, q), scale) in x.chunks_exact(QK).zip(q.chunks_exact_mut(QK)).zip(scale) {
        // SAFETY: 32 values in, 32 bytes out (chunks_exact).
        let v: [__m256; 4] = std::array::from_fn(|i| _mm256_loadu_ps(xs[8 * i..].as_ptr()));
        let abs = v.map(|v| _mm256_andnot_ps(sign, v));
        let m = _mm256_max_ps(_mm256_max_ps(abs[0], abs[1]), _mm256_max_ps(abs[2], abs[3]));
        let m = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let amax = _mm_cvtss_f32(_mm_max_ss(m, _mm_shuffle_ps(m, m, 1)));
        let (d, id) = q8_scale(amax);
        *scale = d;
        let id = _mm256_set1_ps(id);
        let (half, one) = (_mm256_set1_ps(0.5), _mm256_set1_ps(1.0));
        let i = v.map(|v| {
            // Ties away from zero: truncate, then step outwards when the
            // (exact) remainder is at least one half.
            let v = _mm256_mul_ps(v, id);
            let t = _mm256_round_ps(v, _MM_FROUND_TO_ZERO | _MM_FROUND_NO_EXC);
            let rest = _mm256_andnot_ps(sign, _mm256_sub_ps(v, t));
            let up = _mm256_cmp_ps(rest, half, _CMP_GE_OQ);
            let step = _mm256_and_ps(up, _mm256_or_ps(one, _mm256_and_ps(sign, v)));
            _mm256_cvtps_epi32(_mm256_add_ps(t, step))
        });
        let w = _mm256_packs_epi16(
            _mm256_packs_epi32(i[0], i[1]),
            _mm256_packs_epi32(i[2], i[3]),
        );
        let w = _mm256_permutevar8x32_epi32(w, order);
        _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, w);
    }
}

/// ggml's Q8_K: one f32 scale per 256 values, from the value of largest
/// magnitude (which maps to -127).
fn quantize_q8k(x: &[f32], q: &mut [i8], scale: &mut [f32]) {
    for ((xs, q), scale) in x.chunks_exact(256).zip(q.chunks_exact_mut(256)).zip(scale) {
        let max = xs
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let iscale = if max != 0.0 { -127.0 / max } else { 0.0 };
        *scale = if max != 0.0 { 1.0 / iscale } else { 0.0 };
        for (q, &v) in q.iter_mut().zip(xs) {
            *q = q8(v, iscale);
        }
    }
}

impl Activations {
    /// Quantizes `x.len() / k` rows of `k` values as ggml's `quantize_row_q8_0`,
    /// `_q8_1` or `_q8_K` does, with the given instruction set.
    pub(super) fn new(isa: Isa, x: &[f32], layout: &Layout, scheme: Scheme) -> Self {
        let k = layout.k;
        let unit = if scheme == Scheme::Q8K { 256 } else { QK };
        assert!(
            k.is_multiple_of(unit),
            "k = {k} is not a multiple of {unit}"
        );
        let rows = x.len() / k;
        let lanes = layout.lanes();
        let mut a = Self {
            layout: layout.clone(),
            scheme,
            qs: vec![0; rows * k],
            d: vec![0.0; rows * lanes],
            s: vec![0.0; rows * lanes],
            sums: vec![0; rows * lanes],
        };
        let (mut q, mut scale) = (vec![0i8; k], vec![0f32; k / unit]);
        let sum = |q: &[i8]| q.iter().map(|&q| q as i32).sum::<i32>();
        for (r, xs) in x.chunks_exact(k).enumerate() {
            match (scheme, isa) {
                (Scheme::Q8K, _) => quantize_q8k(xs, &mut q, &mut scale),
                #[cfg(target_arch = "x86_64")]
                // SAFETY: both ISAs include AVX2, FMA and F16C (`Isa::detect`).
                (_, Isa::Vnni | Isa::Avx2) => unsafe { quantize_q8_avx2(xs, &mut q, &mut scale) },
                _ => quantize_q8_portable(xs, &mut q, &mut scale),
            }
            let qs = &mut a.qs[r * k..][..k];
            let (ds, ss, sums) = (
                &mut a.d[r * lanes..][..lanes],
                &mut a.s[r * lanes..][..lanes],
                &mut a.sums[r * lanes..][..lanes],
            );
            for (gi, g) in layout.groups.iter().enumerate() {
                for l in 0..LANES {
                    let first = g.start + l * g.lane;
                    // Lane l's four values of step s, from their natural place.
                    for s in 0..g.steps() {
                        let to = g.start + s * STEP + 4 * l;
                        qs[to..to + 4].copy_from_slice(&q[first + 4 * s..][..4]);
                    }
                    let lane_sum = sum(&q[first..][..g.lane]);
                    sums[gi * LANES + l] = lane_sum;
                    let d = scale[first / unit];
                    ds[gi * LANES + l] = if scheme == Scheme::Q8K { d } else { f16(d) };
                    ss[gi * LANES + l] = match scheme {
                        // d·Σq is exact in f32 for an f16 d and |Σq| < 2¹².
                        Scheme::Q8_0 if first.is_multiple_of(QK) => {
                            f16(d) * sum(&q[first..][..QK]) as f32
                        }
                        // ggml rounds the sum taken with the unrounded scale.
                        Scheme::Q8_1 if first.is_multiple_of(QK) => {
                            f16(d * sum(&q[first..][..QK]) as f32)
                        }
                        Scheme::Q8K => d * lane_sum as f32,
                        _ => 0.0,
                    };
                }
            }
        }
        a
    }

    pub fn rows(&self) -> usize {
        self.d.len() / self.layout.lanes()
    }

    pub(super) fn row(&self, r: usize) -> ActRow<'_> {
        let (k, lanes) = (self.layout.k, self.layout.lanes());
        ActRow {
            qs: &self.qs[r * k..][..k],
            d: &self.d[r * lanes..][..lanes],
            s: &self.s[r * lanes..][..lanes],
            sums: &self.sums[r * lanes..][..lanes],
        }
    }
}

#[cfg(test)]
mod tests {
    //! Our activation quantizers against an independent implementation:
    //! candle's `BlockQ8_0` / `BlockQ8_1` / `BlockQ8K::from_float`, on every
    //! instruction-set path. Candle computes Q8_1's sum in f16 arithmetic
    //! (`f16(Σq)·f16(d)`), where ggml's `quantize_row_q8_1` rounds `Σq·d` once
    //! from the unrounded scale; the sum is checked against ggml's formula.
    use super::super::{QuantType, Scheme};
    use super::*;
    use crate::test_util::pseudo_random;
    use candle_core::quantized::k_quants::{BlockQ8K, BlockQ8_0, BlockQ8_1, GgmlType};
    use half::f16 as F16;

    /// Rows of 512 values: ordinary ones, a row of exact halves after scaling
    /// (ties, where rounding modes differ), a row with one large outlier and
    /// tiny rest (values that round to zero), and a zero block.
    fn rows() -> Vec<Vec<f32>> {
        let plain = pseudo_random(512, 7).iter().map(|v| v * 3.0).collect();
        // With amax = 127, the scale is 1 and every value k + 0.5 is a tie.
        let ties = (0..512)
            .map(|i| {
                if i % 32 == 0 {
                    127.0
                } else {
                    (i % 64) as f32 - 31.5
                }
            })
            .collect();
        let outlier = (0..512)
            .map(|i| {
                if i == 5 {
                    -900.0
                } else {
                    1e-3 * (i as f32).sin()
                }
            })
            .collect();
        let mut zeros: Vec<f32> = pseudo_random(512, 9);
        zeros[64..96].fill(0.0);
        vec![plain, ties, outlier, zeros]
    }

    /// One block of candle's, read from its `#[repr(C)]` bytes (its fields
    /// are private): the scale, Q8_1's sum, and the codes.
    struct Block {
        d: f32,
        s: f32,
        qs: Vec<i8>,
    }

    fn bytes<T>(blocks: &[T]) -> &[u8] {
        // SAFETY: candle's blocks are `#[repr(C)]` plain data without padding
        // (candle asserts their sizes); read only.
        unsafe { std::slice::from_raw_parts(blocks.as_ptr().cast(), std::mem::size_of_val(blocks)) }
    }

    fn f16_at(b: &[u8], at: usize) -> f32 {
        F16::from_le_bytes([b[at], b[at + 1]]).to_f32()
    }

    fn codes(b: &[u8]) -> Vec<i8> {
        b.iter().map(|&c| c as i8).collect()
    }

    /// candle's Q8_0, Q8_1 and Q8_K blocks of `x`.
    fn candle_q8_0(x: &[f32]) -> Vec<Block> {
        let mut blocks = vec![BlockQ8_0::zeros(); x.len() / QK];
        BlockQ8_0::from_float(x, &mut blocks);
        bytes(&blocks)
            .chunks_exact(34)
            .map(|b| Block {
                d: f16_at(b, 0),
                s: 0.0,
                qs: codes(&b[2..]),
            })
            .collect()
    }

    fn candle_q8_1(x: &[f32]) -> Vec<Block> {
        let mut blocks = vec![BlockQ8_1::zeros(); x.len() / QK];
        BlockQ8_1::from_float(x, &mut blocks);
        bytes(&blocks)
            .chunks_exact(36)
            .map(|b| Block {
                d: f16_at(b, 0),
                s: f16_at(b, 2),
                qs: codes(&b[4..]),
            })
            .collect()
    }

    fn candle_q8_k(x: &[f32]) -> Vec<Block> {
        let mut blocks = vec![BlockQ8K::zeros(); x.len() / 256];
        BlockQ8K::from_float(x, &mut blocks);
        bytes(&blocks)
            .chunks_exact(292)
            .map(|b| Block {
                d: f32::from_le_bytes(b[..4].try_into().unwrap()),
                s: 0.0,
                qs: codes(&b[4..260]),
            })
            .collect()
    }

    type Quantizer = fn(&[f32], &mut [i8], &mut [f32]);

    #[cfg(target_arch = "x86_64")]
    fn avx2(x: &[f32], q: &mut [i8], scale: &mut [f32]) {
        // SAFETY: only listed when the CPU has AVX2, FMA and F16C.
        unsafe { quantize_q8_avx2(x, q, scale) }
    }

    /// Every Q8_0/Q8_1 quantizer this CPU can run.
    fn paths() -> Vec<(&'static str, Quantizer)> {
        let mut out: Vec<(&'static str, Quantizer)> = vec![("portable", quantize_q8_portable)];
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() != Isa::Portable {
            out.push(("avx2", avx2));
        }
        out
    }

    #[test]
    fn q8_0_and_q8_1_match_candle_and_ggml() {
        for (r, x) in rows().iter().enumerate() {
            let (b0, b1) = (candle_q8_0(x), candle_q8_1(x));
            for (name, quantize) in paths() {
                let (mut q, mut scale) = (vec![0i8; x.len()], vec![0f32; x.len() / QK]);
                quantize(x, &mut q, &mut scale);
                for (b, (c0, c1)) in b0.iter().zip(&b1).enumerate() {
                    let qs = &q[b * QK..][..QK];
                    assert_eq!(qs, &c0.qs[..], "{name} row {r} block {b}: Q8_0 codes");
                    assert_eq!(qs, &c1.qs[..], "{name} row {r} block {b}: Q8_1 codes");
                    assert_eq!(f16(scale[b]), c0.d, "{name} row {r} block {b}");
                    assert_eq!(f16(scale[b]), c1.d, "{name} row {r} block {b}");
                    // Candle's own sum, in f16 arithmetic, for the record:
                    // within one f16 step of ggml's, which the lanes carry.
                    let ggml = f16(qs.iter().map(|&q| q as i32).sum::<i32>() as f32 * scale[b]);
                    assert!(
                        (c1.s - ggml).abs() <= ggml.abs() / 512.0 + 1e-7,
                        "{name} row {r} block {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn q8_k_matches_candle() {
        for (r, x) in rows().iter().enumerate() {
            let blocks = candle_q8_k(x);
            let (mut q, mut scale) = (vec![0i8; x.len()], vec![0f32; x.len() / 256]);
            quantize_q8k(x, &mut q, &mut scale);
            for (b, c) in blocks.iter().enumerate() {
                assert_eq!(&q[b * 256..][..256], &c.qs[..], "row {r} block {b}");
                assert_eq!(scale[b], c.d, "row {r} block {b}");
            }
        }
    }

    /// The scale and sum each lane carries, as the dot products read them,
    /// from every path: Q8_0's `f16(d)·Σq`, Q8_1's ggml `f16(Σq·d)`, Q8_K's
    /// `d·Σq` over the lane's values.
    #[test]
    fn lane_scales_and_sums_are_ggmls() {
        for (ty, scheme) in [
            (QuantType::Q4_0, Scheme::Q8_0),
            (QuantType::Q4_1, Scheme::Q8_1),
            (QuantType::Q4K, Scheme::Q8K),
        ] {
            let layout = Layout::new(ty, 512);
            for (r, x) in rows().iter().enumerate() {
                let (b0, bk) = (candle_q8_0(x), candle_q8_k(x));
                for isa in Isa::available() {
                    let a = Activations::new(isa, x, &layout, scheme);
                    let row = a.row(0);
                    for (gi, g) in layout.groups.iter().enumerate() {
                        for l in 0..LANES {
                            let first = g.start + l * g.lane;
                            let (d, s) = (row.d[gi * LANES + l], row.s[gi * LANES + l]);
                            let at = format!("{isa:?} {ty:?} row {r} lane at {first}");
                            match scheme {
                                Scheme::Q8K => {
                                    let c = &bk[first / 256];
                                    let sum: i32 = c.qs[first % 256..][..g.lane]
                                        .iter()
                                        .map(|&q| q as i32)
                                        .sum();
                                    assert_eq!(d, c.d, "{at}");
                                    assert_eq!(s, c.d * sum as f32, "{at}");
                                }
                                _ => {
                                    let c = &b0[first / QK];
                                    assert_eq!(d, c.d, "{at}");
                                    let sum: i32 = c.qs.iter().map(|&q| q as i32).sum();
                                    let amax = x[first / QK * QK..][..QK]
                                        .iter()
                                        .fold(0f32, |m, v| m.max(v.abs()));
                                    let want = if !first.is_multiple_of(QK) {
                                        0.0
                                    } else if scheme == Scheme::Q8_0 {
                                        c.d * sum as f32
                                    } else {
                                        f16(sum as f32 * (amax / 127.0))
                                    };
                                    assert_eq!(s, want, "{at}");
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
