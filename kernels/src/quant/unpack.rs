//! Turns one weight row of GGUF blocks into unsigned codes and a scale and an
//! offset per half-block of 16 values (`w = d·code + m`), from which a matrix
//! is packed at load. The layouts are ggml's (`block_q4_0` … `block_q6_K`).
use super::{QuantType, HALF, QK};

fn f16_at(b: &[u8], i: usize) -> f32 {
    half::f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// 16 bytes of nibbles as 32 codes: low nibbles first, then high ones.
fn nibbles(q: &[u8], out: &mut [u8]) {
    for i in 0..QK / 2 {
        out[i] = q[i] & 0x0F;
        out[i + QK / 2] = q[i] >> 4;
    }
}

/// One weight row in natural order: `w = d·code + m` per half-block of 16
/// values.
pub struct Unpacked {
    pub codes: Vec<u8>,
    pub d: Vec<f32>,
    pub m: Vec<f32>,
}

impl Unpacked {
    pub fn new(k: usize) -> Self {
        Self {
            codes: vec![0; k],
            d: vec![0.0; k / HALF],
            m: vec![0.0; k / HALF],
        }
    }
}

impl Unpacked {
    /// Sets the scale and offset of 32-value block `blk`.
    pub fn set_block(&mut self, blk: usize, d: f32, m: f32) {
        for h in 2 * blk..2 * blk + 2 {
            self.d[h] = d;
            self.m[h] = m;
        }
    }
}

/// ggml's `get_scale_min_k4`: the 6-bit scale and minimum of sub-block `j`.
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

/// Unpacks `src` (one row's blocks) into `row`.
pub fn unpack(ty: QuantType, src: &[u8], row: &mut Unpacked) {
    let blocks = src.chunks_exact(ty.block_bytes()).enumerate();
    match ty {
        QuantType::Q4_0 => {
            for (i, b) in blocks {
                let d = f16_at(b, 0);
                nibbles(&b[2..18], &mut row.codes[i * QK..][..QK]);
                row.set_block(i, d, -8.0 * d);
            }
        }
        QuantType::Q4_1 => {
            for (i, b) in blocks {
                nibbles(&b[4..20], &mut row.codes[i * QK..][..QK]);
                row.set_block(i, f16_at(b, 0), f16_at(b, 2));
            }
        }
        QuantType::Q8_0 => {
            for (i, b) in blocks {
                // Signed bytes as unsigned codes: w = d·(c − 128).
                let d = f16_at(b, 0);
                for (c, &q) in row.codes[i * QK..][..QK].iter_mut().zip(&b[2..34]) {
                    *c = q ^ 0x80;
                }
                row.set_block(i, d, -128.0 * d);
            }
        }
        QuantType::Q4K | QuantType::Q5K => {
            for (i, b) in blocks {
                let (d, dmin) = (f16_at(b, 0), f16_at(b, 2));
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
                        row.set_block(blk, d * sc, -(dmin * mn));
                    }
                }
            }
        }
        QuantType::Q6K => {
            for (i, b) in blocks {
                let (ql, qh, sc) = (&b[0..128], &b[128..192], &b[192..208]);
                let d = f16_at(b, 208);
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
