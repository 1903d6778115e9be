//! Quantized weights (GGUF's Q4_0, Q4_1 and Q8_0 blocks) × f32 activations,
//! as a GEMM over a batch of rows: activations are quantized to 8 bits per
//! 32-value block exactly as ggml does, each weight block is unpacked once for
//! every row, and the integer dot products use AVX2 where the CPU has it. A
//! row's result never depends on the other rows in the batch.
use half::f16;
use rayon::prelude::*;

/// Values per block.
pub const QK: usize = 32;

/// The GGUF block formats with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// f16 scale, 16 bytes of nibbles: `w = (q - 8) · d`.
    Q4_0,
    /// f16 scale, f16 minimum, 16 bytes of nibbles: `w = q · d + m`.
    Q4_1,
    /// f16 scale, 32 signed bytes: `w = q · d`.
    Q8_0,
}

impl QuantType {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
        }
    }
}

/// One block of activations quantized to 8 bits (ggml's Q8_1, which is Q8_0
/// plus `s = d · Σq`); `d` and `s` are the f16 values ggml stores, widened.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// ggml's `quantize_row_q8_1` (its `d` and `qs` are `quantize_row_q8_0`'s);
/// `x.len()` must be a multiple of 32.
pub fn quantize_activations(x: &[f32], out: &mut Vec<BlockQ8>) {
    out.clear();
    for xs in x.chunks_exact(QK) {
        let amax = xs.iter().fold(0f32, |a, &v| a.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d = f16::from_f32(d);
        let mut qs = [0i8; QK];
        let mut sum = 0i32;
        for j in 0..QK / 2 {
            qs[j] = f32::round(xs[j] * id) as i8;
            qs[j + QK / 2] = f32::round(xs[j + QK / 2] * id) as i8;
            sum += qs[j] as i32 + qs[j + QK / 2] as i32;
        }
        out.push(BlockQ8 {
            d: d.to_f32(),
            s: (f16::from_f32(sum as f32) * d).to_f32(),
            qs,
        });
    }
}

fn f16_at(block: &[u8], at: usize) -> f32 {
    f16::from_le_bytes([block[at], block[at + 1]]).to_f32()
}

/// A weight block's scale and minimum (0 where the type has none), widened
/// once per block rather than once per row.
fn scales(ty: QuantType, block: &[u8]) -> (f32, f32) {
    match ty {
        QuantType::Q4_1 => (f16_at(block, 0), f16_at(block, 2)),
        _ => (f16_at(block, 0), 0.0),
    }
}

/// One block's contribution to the float sum from its integer dot product
/// `sumi`, in ggml's order of operations.
fn combine(ty: QuantType, (d, m): (f32, f32), sumi: i32, a: &BlockQ8) -> f32 {
    match ty {
        QuantType::Q4_0 => sumi as f32 * d * a.d,
        QuantType::Q4_1 => sumi as f32 * d * a.d + m * a.s,
        QuantType::Q8_0 => sumi as f32 * (d * a.d),
    }
}

/// Every block's scale and minimum, widened from f16 once (at load): this
/// CPU path has no F16C, and widening per use costs as much as the dot product.
fn block_scales(ty: QuantType, w: &[u8]) -> Vec<(f32, f32)> {
    w.chunks_exact(ty.block_bytes())
        .map(|b| scales(ty, b))
        .collect()
}

/// One weight row's blocks and their widened scales.
#[derive(Clone, Copy)]
struct WeightRow<'a> {
    ty: QuantType,
    bytes: &'a [u8],
    scales: &'a [(f32, f32)],
}

/// Accumulates one weight row (`blocks` blocks) against every activation row,
/// block by block.
fn column(w: WeightRow, q8: &[BlockQ8], blocks: usize, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 is present, checked at run time.
        return unsafe { column_avx2(w, q8, blocks, sums) };
    }
    column_scalar(w, q8, blocks, sums)
}

/// The 32 weight values of a block as integers (before scale and offset).
fn weight_ints(ty: QuantType, block: &[u8]) -> [i32; QK] {
    let mut v = [0i32; QK];
    match ty {
        QuantType::Q4_0 | QuantType::Q4_1 => {
            let (nibbles, zero) = match ty {
                QuantType::Q4_0 => (&block[2..18], 8),
                _ => (&block[4..20], 0),
            };
            for (j, &b) in nibbles.iter().enumerate() {
                v[j] = (b & 0x0F) as i32 - zero;
                v[j + QK / 2] = (b >> 4) as i32 - zero;
            }
        }
        QuantType::Q8_0 => {
            for (j, &b) in block[2..34].iter().enumerate() {
                v[j] = b as i8 as i32;
            }
        }
    }
    v
}

fn column_scalar(wr: WeightRow, q8: &[BlockQ8], blocks: usize, sums: &mut [f32]) {
    let ty = wr.ty;
    for (b, block) in wr.bytes.chunks_exact(ty.block_bytes()).enumerate() {
        let w = weight_ints(ty, block);
        let dm = wr.scales[b];
        for (r, sum) in sums.iter_mut().enumerate() {
            let a = &q8[r * blocks + b];
            let sumi: i32 = w.iter().zip(&a.qs).map(|(&w, &x)| w * x as i32).sum();
            *sum += combine(ty, dm, sumi, a);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2"))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn column_avx2(wr: WeightRow, q8: &[BlockQ8], blocks: usize, sums: &mut [f32]) {
    use std::arch::x86_64::*;
    let ty = wr.ty;
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for (b, block) in wr.bytes.chunks_exact(ty.block_bytes()).enumerate() {
        // The weights as 32 bytes: low nibbles pair with activations 0..16,
        // high nibbles with 16..32. `maddubs` multiplies unsigned by signed
        // bytes, so signed weights lend their sign to the activations.
        let nibbles = |at: usize| {
            let packed = _mm_loadu_si128(block.as_ptr().add(at) as *const __m128i);
            let lo = _mm_and_si128(packed, low);
            let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
            _mm256_set_m128i(hi, lo)
        };
        let (w, signed) = match ty {
            QuantType::Q4_0 => (_mm256_sub_epi8(nibbles(2), _mm256_set1_epi8(8)), true),
            QuantType::Q4_1 => (nibbles(4), false),
            QuantType::Q8_0 => (
                _mm256_loadu_si256(block.as_ptr().add(2) as *const __m256i),
                true,
            ),
        };
        let w_abs = if signed { _mm256_sign_epi8(w, w) } else { w };
        let dm = wr.scales[b];
        for (r, sum) in sums.iter_mut().enumerate() {
            let a = &q8[r * blocks + b];
            let mut x = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            if signed {
                x = _mm256_sign_epi8(x, w);
            }
            // Byte pairs summed to i16 (at most 2·127·127, no saturation), then to i32.
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(w_abs, x), ones);
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(p32),
                _mm256_extracti128_si256(p32, 1),
            );
            let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
            *sum += combine(ty, dm, _mm_cvtsi128_si32(s1), a);
        }
    }
}

/// Weights `[n, k]` as GGUF blocks, with their scales widened.
pub struct QuantMatrix {
    pub ty: QuantType,
    pub blocks: Vec<u8>,
    scales: Vec<(f32, f32)>,
    pub n: usize,
    pub k: usize,
}

impl QuantMatrix {
    /// `blocks.len()` must be `n · k / 32 · block_bytes`.
    pub fn new(ty: QuantType, blocks: Vec<u8>, n: usize, k: usize) -> Self {
        let scales = block_scales(ty, &blocks);
        Self {
            ty,
            blocks,
            scales,
            n,
            k,
        }
    }

    /// `y = x · Wᵀ` for `x.len() / k` rows.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        let rows = x.len() / self.k.max(1);
        matmul(
            self.ty,
            x,
            rows,
            self.k,
            &self.blocks,
            &self.scales,
            self.n,
            y,
        )
    }
}

/// `y[r][c] = Σ_k x[r][k] · W[c][k]` for `rows` rows of `k` activations and `n`
/// weight rows stored as `ty` blocks (`w.len() == n · k / 32 · block_bytes`)
/// whose scales are `scales` ([`block_scales`]).
#[allow(clippy::too_many_arguments)]
fn matmul(
    ty: QuantType,
    x: &[f32],
    rows: usize,
    k: usize,
    w: &[u8],
    scales: &[(f32, f32)],
    n: usize,
    y: &mut [f32],
) {
    assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
    let blocks = k / QK;
    let row_bytes = blocks * ty.block_bytes();
    assert_eq!(x.len(), rows * k, "activations");
    assert_eq!(w.len(), n * row_bytes, "weights");
    assert_eq!(scales.len(), n * blocks, "scales");
    assert_eq!(y.len(), rows * n, "output");
    // k is a multiple of 32, so blocks never straddle rows: row r owns blocks
    // r * blocks .. (r + 1) * blocks.
    let mut q8 = Vec::with_capacity(rows * blocks);
    quantize_activations(x, &mut q8);
    // Each task owns a run of output columns for every row: computed column-major,
    // then scattered, so that workers never share an output row slice.
    const COLS: usize = 16;
    let results: Vec<(usize, Vec<f32>)> = (0..n.div_ceil(COLS))
        .into_par_iter()
        .map(|t| {
            let (c0, c1) = (t * COLS, ((t + 1) * COLS).min(n));
            let mut out = vec![0f32; (c1 - c0) * rows];
            let mut sums = vec![0f32; rows];
            for c in c0..c1 {
                sums.iter_mut().for_each(|s| *s = 0.0);
                let row = WeightRow {
                    ty,
                    bytes: &w[c * row_bytes..(c + 1) * row_bytes],
                    scales: &scales[c * blocks..(c + 1) * blocks],
                };
                column(row, &q8, blocks, &mut sums);
                out[(c - c0) * rows..(c - c0 + 1) * rows].copy_from_slice(&sums);
            }
            (c0, out)
        })
        .collect();
    for (c0, out) in results {
        for (i, col) in out.chunks_exact(rows).enumerate() {
            for (r, &v) in col.iter().enumerate() {
                y[r * n + c0 + i] = v;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo_random;

    const TYPES: [QuantType; 3] = [QuantType::Q4_0, QuantType::Q4_1, QuantType::Q8_0];

    /// Quantizes f32 weights to `ty` blocks as ggml does.
    pub fn quantize(ty: QuantType, w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for xs in w.chunks_exact(QK) {
            let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            match ty {
                QuantType::Q4_0 => {
                    // ggml: the value of largest magnitude maps to -8.
                    let m = if max.abs() > min.abs() { max } else { min };
                    let d = m / -8.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    for j in 0..QK / 2 {
                        let q = |x: f32| ((x * id + 8.5) as u8).min(15);
                        out.push(q(xs[j]) | (q(xs[j + QK / 2]) << 4));
                    }
                }
                QuantType::Q4_1 => {
                    let d = (max - min) / 15.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
                    for j in 0..QK / 2 {
                        let q = |x: f32| (((x - min) * id + 0.5) as u8).min(15);
                        out.push(q(xs[j]) | (q(xs[j + QK / 2]) << 4));
                    }
                }
                QuantType::Q8_0 => {
                    let amax = max.abs().max(min.abs());
                    let d = amax / 127.0;
                    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                    out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
                    out.extend(xs.iter().map(|&x| f32::round(x * id) as i8 as u8));
                }
            }
        }
        out
    }

    /// The scalar reference: ggml's `vec_dot_*_q8_*` one row and column at a time.
    fn reference(ty: QuantType, x: &[f32], rows: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
        let bb = ty.block_bytes();
        let mut y = vec![0f32; rows * n];
        let mut q8 = Vec::new();
        for r in 0..rows {
            quantize_activations(&x[r * k..(r + 1) * k], &mut q8);
            for c in 0..n {
                let mut sumf = 0f32;
                for (b, a) in q8.iter().enumerate() {
                    let block = &w[(c * k / QK + b) * bb..][..bb];
                    let d = f16_at(block, 0);
                    let mut sumi = 0i32;
                    for j in 0..QK / 2 {
                        let (v0, v1) = match ty {
                            QuantType::Q4_0 => (
                                (block[2 + j] & 0x0F) as i32 - 8,
                                (block[2 + j] >> 4) as i32 - 8,
                            ),
                            QuantType::Q4_1 => {
                                ((block[4 + j] & 0x0F) as i32, (block[4 + j] >> 4) as i32)
                            }
                            QuantType::Q8_0 => (
                                block[2 + j] as i8 as i32,
                                block[2 + j + QK / 2] as i8 as i32,
                            ),
                        };
                        sumi += v0 * a.qs[j] as i32 + v1 * a.qs[j + QK / 2] as i32;
                    }
                    sumf += match ty {
                        QuantType::Q4_0 => sumi as f32 * d * a.d,
                        QuantType::Q4_1 => sumi as f32 * d * a.d + f16_at(block, 2) * a.s,
                        QuantType::Q8_0 => sumi as f32 * (d * a.d),
                    };
                }
                y[r * n + c] = sumf;
            }
        }
        y
    }

    #[test]
    fn gemm_equals_the_scalar_reference_bit_for_bit() {
        for ty in TYPES {
            for &(rows, k, n) in &[(1, 64, 5), (3, 576, 37), (7, 1536, 16), (2, 32, 1)] {
                let x = pseudo_random(rows * k, 1 + rows as u32);
                let w = quantize(ty, &pseudo_random(n * k, 99 + n as u32));
                let mut y = vec![0f32; rows * n];
                QuantMatrix::new(ty, w.clone(), n, k).matmul(&x, &mut y);
                assert_eq!(
                    y,
                    reference(ty, &x, rows, k, &w, n),
                    "{ty:?} rows {rows} k {k} n {n}"
                );
            }
        }
    }

    #[test]
    fn gemm_is_close_to_the_float_product() {
        let (rows, k, n) = (2, 256, 8);
        let x = pseudo_random(rows * k, 5);
        let wf = pseudo_random(n * k, 6);
        for (ty, tolerance) in [
            (QuantType::Q4_0, 0.8),
            (QuantType::Q4_1, 0.6),
            (QuantType::Q8_0, 0.1),
        ] {
            let mut y = vec![0f32; rows * n];
            QuantMatrix::new(ty, quantize(ty, &wf), n, k).matmul(&x, &mut y);
            for r in 0..rows {
                for c in 0..n {
                    let exact: f32 = (0..k).map(|i| x[r * k + i] * wf[c * k + i]).sum();
                    let got = y[r * n + c];
                    assert!((got - exact).abs() < tolerance, "{ty:?}: {got} vs {exact}");
                }
            }
        }
    }

    /// A row's result is the same alone or in a batch.
    #[test]
    fn rows_do_not_depend_on_the_batch() {
        let (rows, k, n) = (5, 128, 20);
        let x = pseudo_random(rows * k, 8);
        for ty in TYPES {
            let w = QuantMatrix::new(ty, quantize(ty, &pseudo_random(n * k, 9)), n, k);
            let mut all = vec![0f32; rows * n];
            w.matmul(&x, &mut all);
            for r in 0..rows {
                let mut one = vec![0f32; n];
                w.matmul(&x[r * k..(r + 1) * k], &mut one);
                assert_eq!(one, all[r * n..(r + 1) * n], "{ty:?} row {r}");
            }
        }
    }

    /// The portable path agrees with the SIMD one (run on any machine),
    /// including extreme weight bytes.
    #[test]
    fn scalar_column_equals_dispatch() {
        let k = 96;
        let x: Vec<f32> = (0..2 * k)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut all = Vec::new();
        quantize_activations(&x, &mut all);
        for ty in TYPES {
            let mut w: Vec<u8> = (0..k / QK * ty.block_bytes())
                .map(|i| (i * 91 % 251) as u8)
                .collect();
            // Keep the f16 scales finite; put -128 and 127 among the weights.
            for b in w.chunks_exact_mut(ty.block_bytes()) {
                b[1] &= 0x3B;
                b[3] &= 0x3B;
                b[6] = 0x80;
                b[7] = 0x7F;
            }
            let (mut a, mut b) = (vec![0f32; 2], vec![0f32; 2]);
            let scales = block_scales(ty, &w);
            let row = WeightRow {
                ty,
                bytes: &w,
                scales: &scales,
            };
            column(row, &all, k / QK, &mut a);
            column_scalar(row, &all, k / QK, &mut b);
            assert_eq!(a, b, "{ty:?}");
        }
    }
}
