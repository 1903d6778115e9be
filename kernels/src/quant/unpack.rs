//! Turns one weight row of GGUF blocks into unsigned codes and a scale and an
//! offset per half-block of 16 values (`w = d·code + m`), the form every dot
//! product here reads. The layouts are ggml's (`block_q4_0` … `block_q6_K`).
use super::{QuantType, WeightRow, QK};

/// The primitive steps of unpacking, portable or with x86 SIMD (exact on
/// every path).
pub trait Steps {
    /// An f16 as f32.
    fn f32(bits: [u8; 2]) -> f32;
    /// 16 bytes of nibbles as 32 codes: low nibbles first, then high ones.
    fn nibbles(q: &[u8], out: &mut [u8]);
    /// 32 signed bytes as codes offset by 128.
    fn flip(q: &[u8], out: &mut [u8]);
}

pub struct Soft;
impl Steps for Soft {
    #[inline(always)]
    fn f32(bits: [u8; 2]) -> f32 {
        half::f16::from_le_bytes(bits).to_f32()
    }

    #[inline(always)]
    fn nibbles(q: &[u8], out: &mut [u8]) {
        for i in 0..QK / 2 {
            out[i] = q[i] & 0x0F;
            out[i + QK / 2] = q[i] >> 4;
        }
    }

    #[inline(always)]
    fn flip(q: &[u8], out: &mut [u8]) {
        for (c, &q) in out[..QK].iter_mut().zip(&q[..QK]) {
            *c = q ^ 0x80;
        }
    }
}

/// F16C and AVX2; only used from functions compiled for them, on CPUs that
/// have them.
#[cfg(target_arch = "x86_64")]
pub struct F16c;
#[cfg(target_arch = "x86_64")]
impl Steps for F16c {
    #[inline(always)]
    fn f32(bits: [u8; 2]) -> f32 {
        use std::arch::x86_64::*;
        // SAFETY: see the type's comment.
        unsafe {
            _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(
                u16::from_le_bytes(bits) as i32
            )))
        }
    }

    #[inline(always)]
    fn nibbles(q: &[u8], out: &mut [u8]) {
        use std::arch::x86_64::*;
        assert!(q.len() >= QK / 2 && out.len() >= QK);
        // SAFETY: lengths checked above; features as in the type's comment.
        unsafe {
            let v = _mm_loadu_si128(q.as_ptr() as *const __m128i);
            let low = _mm_set1_epi8(0x0F);
            let lo = _mm_and_si128(v, low);
            let hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
            _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, _mm256_set_m128i(hi, lo));
        }
    }

    #[inline(always)]
    fn flip(q: &[u8], out: &mut [u8]) {
        use std::arch::x86_64::*;
        assert!(q.len() >= QK && out.len() >= QK);
        // SAFETY: lengths checked above; features as in the type's comment.
        unsafe {
            let v = _mm256_loadu_si256(q.as_ptr() as *const __m256i);
            let v = _mm256_xor_si256(v, _mm256_set1_epi8(-128));
            _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, v);
        }
    }
}

#[inline(always)]
fn at<F: Steps>(b: &[u8], i: usize) -> f32 {
    F::f32([b[i], b[i + 1]])
}

/// Sets both half-blocks of 32-value block `blk` of `row`.
#[inline(always)]
fn block_scale(row: &mut WeightRow, blk: usize, d: f32, m: f32) {
    for h in 2 * blk..2 * blk + 2 {
        row.d[h] = d;
        row.m[h] = m;
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j`.
#[inline(always)]
fn scale_min_k4(j: usize, q: &[u8]) -> (f32, f32) {
    let (d, m) = if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0F) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    };
    (d as f32, m as f32)
}

/// Unpacks `src` (one row's blocks) into `row`, whose `codes` hold the row's
/// values. Padding half-blocks past the row keep zero scales.
#[inline(always)]
pub fn unpack<F: Steps>(ty: QuantType, src: &[u8], row: &mut WeightRow) {
    let blocks = src.chunks_exact(ty.block_bytes()).enumerate();
    match ty {
        QuantType::Q4_0 => {
            for (i, b) in blocks {
                let d = at::<F>(b, 0);
                F::nibbles(&b[2..18], &mut row.codes[i * QK..][..QK]);
                block_scale(row, i, d, -8.0 * d);
            }
        }
        QuantType::Q4_1 => {
            for (i, b) in blocks {
                F::nibbles(&b[4..20], &mut row.codes[i * QK..][..QK]);
                block_scale(row, i, at::<F>(b, 0), at::<F>(b, 2));
            }
        }
        QuantType::Q8_0 => {
            for (i, b) in blocks {
                // Signed bytes as unsigned codes: w = d·(c − 128).
                let d = at::<F>(b, 0);
                F::flip(&b[2..34], &mut row.codes[i * QK..][..QK]);
                block_scale(row, i, d, -128.0 * d);
            }
        }
        QuantType::Q4K | QuantType::Q5K => {
            for (i, b) in blocks {
                let (d, dmin) = (at::<F>(b, 0), at::<F>(b, 2));
                let scales = &b[4..16];
                let (qh, qs) = match ty {
                    QuantType::Q5K => (Some(&b[16..48]), &b[48..176]),
                    _ => (None, &b[16..144]),
                };
                for c in 0..4 {
                    let q = &qs[32 * c..][..32];
                    for s in 0..2 {
                        let blk = 8 * i + 2 * c + s;
                        let out = &mut row.codes[blk * QK..][..QK];
                        for l in 0..QK {
                            let nib = if s == 0 { q[l] & 0x0F } else { q[l] >> 4 };
                            let high = qh.map_or(0, |h| ((h[l] >> (2 * c + s)) & 1) << 4);
                            out[l] = nib | high;
                        }
                        let (sc, mn) = scale_min_k4(2 * c + s, scales);
                        block_scale(row, blk, d * sc, -(dmin * mn));
                    }
                }
            }
        }
        QuantType::Q6K => {
            for (i, b) in blocks {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = at::<F>(b, 208);
                for n in 0..2 {
                    let (ql, qh) = (&ql[64 * n..], &qh[32 * n..]);
                    let out = &mut row.codes[(8 * i + 4 * n) * QK..][..4 * QK];
                    for l in 0..32 {
                        let h = qh[l];
                        out[l] = (ql[l] & 0x0F) | ((h & 3) << 4);
                        out[l + 32] = (ql[l + 32] & 0x0F) | (((h >> 2) & 3) << 4);
                        out[l + 64] = (ql[l] >> 4) | (((h >> 4) & 3) << 4);
                        out[l + 96] = (ql[l + 32] >> 4) | (((h >> 6) & 3) << 4);
                    }
                }
                // w = d·s·(q − 32) per 16 values; d·s is exact in f32.
                for (j, &s) in sc.iter().enumerate() {
                    let h = 16 * i + j;
                    row.d[h] = d * s as i8 as f32;
                    row.m[h] = -32.0 * row.d[h];
                }
            }
        }
    }
}
