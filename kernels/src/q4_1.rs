//! Q4_1 weights × f32 activations, as a GEMM over a batch of rows: activations
//! are quantized to Q8_1 per 32-value block exactly as ggml does, each weight
//! block is unpacked once for every row, and the integer dot products use AVX2
//! where the CPU has it. Results equal ggml's scalar reference bit for bit.
use half::f16;
use rayon::prelude::*;

/// Values per block.
pub const QK: usize = 32;
/// Bytes of one Q4_1 block: f16 scale, f16 minimum, 16 bytes of nibbles.
pub const Q4_1_BLOCK_BYTES: usize = 20;

/// One block of activations quantized to 8 bits, with `s = d * Σq`; `d` and
/// `s` are the f16 values ggml stores, kept widened to f32.
#[derive(Debug, Clone, Copy)]
pub struct BlockQ8_1 {
    pub d: f32,
    pub s: f32,
    pub qs: [i8; QK],
}

/// ggml's `quantize_row_q8_1`; `x.len()` must be a multiple of 32.
pub fn quantize_q8_1(x: &[f32], out: &mut Vec<BlockQ8_1>) {
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
        out.push(BlockQ8_1 {
            d: d.to_f32(),
            s: (f16::from_f32(sum as f32) * d).to_f32(),
            qs,
        });
    }
}

/// Accumulates one weight row (`blocks` Q4_1 blocks) against every activation
/// row: `sums[r] = Σ_b (sumi·d4)·d8 + m4·s8`, ggml's order, block by block.
fn column(wrow: &[u8], q8: &[BlockQ8_1], blocks: usize, sums: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: AVX2 is present, checked at run time.
        return unsafe { column_avx2(wrow, q8, blocks, sums) };
    }
    column_scalar(wrow, q8, blocks, sums)
}

fn scales(block: &[u8]) -> (f32, f32) {
    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
    (d, m)
}

fn column_scalar(wrow: &[u8], q8: &[BlockQ8_1], blocks: usize, sums: &mut [f32]) {
    for (b, block) in wrow.chunks_exact(Q4_1_BLOCK_BYTES).enumerate() {
        let (d, m) = scales(block);
        for (r, sum) in sums.iter_mut().enumerate() {
            let a = &q8[r * blocks + b];
            let mut sumi = 0i32;
            for j in 0..QK / 2 {
                let v = block[4 + j];
                sumi +=
                    (v & 0x0F) as i32 * a.qs[j] as i32 + (v >> 4) as i32 * a.qs[j + QK / 2] as i32;
            }
            *sum += sumi as f32 * d * a.d + m * a.s;
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
unsafe fn column_avx2(wrow: &[u8], q8: &[BlockQ8_1], blocks: usize, sums: &mut [f32]) {
    use std::arch::x86_64::*;
    let low = _mm_set1_epi8(0x0F);
    let ones = _mm256_set1_epi16(1);
    for (b, block) in wrow.chunks_exact(Q4_1_BLOCK_BYTES).enumerate() {
        let (d, m) = scales(block);
        // 16 bytes of nibbles -> 32 values: low nibbles pair with activations
        // 0..16, high nibbles with 16..32.
        let packed = _mm_loadu_si128(block.as_ptr().add(4) as *const __m128i);
        let lo = _mm_and_si128(packed, low);
        let hi = _mm_and_si128(_mm_srli_epi16(packed, 4), low);
        let w = _mm256_set_m128i(hi, lo);
        for (r, sum) in sums.iter_mut().enumerate() {
            let a = &q8[r * blocks + b];
            let x = _mm256_loadu_si256(a.qs.as_ptr() as *const __m256i);
            // u8 × i8 pairs summed to i16 (at most 2·15·128, no saturation), then to i32.
            let p32 = _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), ones);
            let s4 = _mm_add_epi32(
                _mm256_castsi256_si128(p32),
                _mm256_extracti128_si256(p32, 1),
            );
            let s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0b01_00_11_10));
            let s1 = _mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0b10_11_00_01));
            let sumi = _mm_cvtsi128_si32(s1);
            *sum += sumi as f32 * d * a.d + m * a.s;
        }
    }
}

/// `y[r][c] = Σ_k x[r][k] · W[c][k]` for `rows` rows of `k` activations and `n`
/// weight rows stored as Q4_1 blocks (`w.len() == n * k / 32 * 20`).
pub fn matmul(x: &[f32], rows: usize, k: usize, w: &[u8], n: usize, y: &mut [f32]) {
    assert!(k.is_multiple_of(QK), "k = {k} is not a multiple of {QK}");
    let blocks = k / QK;
    assert_eq!(x.len(), rows * k, "activations");
    assert_eq!(w.len(), n * blocks * Q4_1_BLOCK_BYTES, "weights");
    assert_eq!(y.len(), rows * n, "output");
    // k is a multiple of 32, so blocks never straddle rows: row r owns blocks
    // r * blocks .. (r + 1) * blocks.
    let mut q8 = Vec::with_capacity(rows * blocks);
    quantize_q8_1(x, &mut q8);
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
                let wrow = &w[c * blocks * Q4_1_BLOCK_BYTES..(c + 1) * blocks * Q4_1_BLOCK_BYTES];
                column(wrow, &q8, blocks, &mut sums);
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

    /// Quantizes f32 weights to Q4_1 blocks as ggml does.
    pub fn quantize_q4_1(w: &[f32]) -> Vec<u8> {
        let mut out = Vec::new();
        for xs in w.chunks_exact(QK) {
            let min = xs.iter().copied().fold(f32::INFINITY, f32::min);
            let max = xs.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let d = (max - min) / 15.0;
            let id = if d != 0.0 { 1.0 / d } else { 0.0 };
            out.extend_from_slice(&f16::from_f32(d).to_le_bytes());
            out.extend_from_slice(&f16::from_f32(min).to_le_bytes());
            for j in 0..QK / 2 {
                let lo = (((xs[j] - min) * id + 0.5) as u8).min(15);
                let hi = (((xs[j + QK / 2] - min) * id + 0.5) as u8).min(15);
                out.push(lo | (hi << 4));
            }
        }
        out
    }

    /// The scalar reference: ggml's `vec_dot_q4_1_q8_1` one row and column at a time.
    fn reference(x: &[f32], rows: usize, k: usize, w: &[u8], n: usize) -> Vec<f32> {
        let mut y = vec![0f32; rows * n];
        let mut q8 = Vec::new();
        for r in 0..rows {
            quantize_q8_1(&x[r * k..(r + 1) * k], &mut q8);
            for c in 0..n {
                let mut sumf = 0f32;
                for (b, a) in q8.iter().enumerate() {
                    let block = &w[(c * k / QK + b) * Q4_1_BLOCK_BYTES..][..Q4_1_BLOCK_BYTES];
                    let mut sumi = 0i32;
                    for j in 0..QK / 2 {
                        let v0 = (block[4 + j] & 0x0F) as i32;
                        let v1 = (block[4 + j] >> 4) as i32;
                        sumi += v0 * a.qs[j] as i32 + v1 * a.qs[j + QK / 2] as i32;
                    }
                    let d = f16::from_le_bytes([block[0], block[1]]).to_f32();
                    let m = f16::from_le_bytes([block[2], block[3]]).to_f32();
                    sumf += sumi as f32 * d * a.d + m * a.s;
                }
                y[r * n + c] = sumf;
            }
        }
        y
    }

    #[test]
    fn gemm_equals_the_scalar_reference_bit_for_bit() {
        for &(rows, k, n) in &[(1, 64, 5), (3, 576, 37), (7, 1536, 16), (2, 32, 1)] {
            let x = pseudo_random(rows * k, 1 + rows as u32);
            let w = quantize_q4_1(&pseudo_random(n * k, 99 + n as u32));
            let mut y = vec![0f32; rows * n];
            matmul(&x, rows, k, &w, n, &mut y);
            assert_eq!(y, reference(&x, rows, k, &w, n), "rows {rows} k {k} n {n}");
        }
    }

    #[test]
    fn gemm_is_close_to_the_float_product() {
        let (rows, k, n) = (2, 256, 8);
        let x = pseudo_random(rows * k, 5);
        let wf = pseudo_random(n * k, 6);
        let mut y = vec![0f32; rows * n];
        matmul(&x, rows, k, &quantize_q4_1(&wf), n, &mut y);
        for r in 0..rows {
            for c in 0..n {
                let exact: f32 = (0..k).map(|i| x[r * k + i] * wf[c * k + i]).sum();
                assert!(
                    (y[r * n + c] - exact).abs() < 0.6,
                    "{} vs {exact}",
                    y[r * n + c]
                );
            }
        }
    }

    /// The portable path agrees with the SIMD one (run on any machine).
    #[test]
    fn scalar_column_equals_dispatch() {
        let k = 96;
        let x: Vec<f32> = (0..2 * k)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) / 7.0)
            .collect();
        let mut all = Vec::new();
        quantize_q8_1(&x, &mut all);
        let w: Vec<u8> = (0..k / QK * Q4_1_BLOCK_BYTES)
            .map(|i| (i * 91 % 251) as u8)
            .collect();
        let (mut a, mut b) = (vec![0f32; 2], vec![0f32; 2]);
        column(&w, &all, k / QK, &mut a);
        column_scalar(&w, &all, k / QK, &mut b);
        assert_eq!(a, b);
    }
}
