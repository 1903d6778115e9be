//! Quantized weights (GGUF's Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K blocks) ×
//! f32 activations, as a GEMM over a batch of rows.
//!
//! Activations are quantized to 8 bits per 32-value block as ggml does. Each
//! weight row is unpacked once per call into unsigned codes with a scale and an
//! offset per 16 values, then dotted with every activation row using integer
//! multiply-adds (AVX-512 VNNI or AVX2 where the CPU has them) and float
//! accumulation. Output columns are spread over the cores. A row's result
//! never depends on the other rows in the batch, nor on the instruction set.
mod dot;
mod unpack;

pub use dot::Isa;
use rayon::prelude::*;

/// Values per block of activations and per unit of the dot product.
pub const QK: usize = 32;
/// Values that share one weight scale in the finest format (Q6_K).
const HALF: usize = 16;
/// Blocks whose scales are combined in one vector operation.
const GROUP: usize = 8;
const HALVES_PER_GROUP: usize = GROUP * QK / HALF;

/// The GGUF block formats with a kernel here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuantType {
    /// f16 scale, 16 bytes of nibbles: `w = (q - 8) · d`.
    Q4_0,
    /// f16 scale, f16 minimum, 16 bytes of nibbles: `w = q · d + m`.
    Q4_1,
    /// f16 scale, 32 signed bytes: `w = q · d`.
    Q8_0,
    /// 256 values: f16 scale and minimum, eight 6-bit sub-scales and
    /// sub-minimums, 4-bit values.
    Q4K,
    /// As Q4_K with a fifth bit per value.
    Q5K,
    /// 256 values: 6-bit values, sixteen 8-bit scales, an f16 scale.
    Q6K,
}

impl QuantType {
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q4_0 => 18,
            Self::Q4_1 => 20,
            Self::Q8_0 => 34,
            Self::Q4K => 144,
            Self::Q5K => 176,
            Self::Q6K => 210,
        }
    }

    /// Values per block.
    pub fn block_values(self) -> usize {
        match self {
            Self::Q4_0 | Self::Q4_1 | Self::Q8_0 => QK,
            _ => 256,
        }
    }

    /// 32-value blocks with an f16 scale first (and an f16 minimum next, for
    /// Q4_1), which a one-row product reads in place.
    fn legacy(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4_1 | Self::Q8_0)
    }

    /// Whether unpacked codes can exceed 127.
    fn wide(self) -> bool {
        self == Self::Q8_0
    }

    /// How activations are quantized for this weight type.
    pub fn scheme(self) -> Scheme {
        match self {
            Self::Q4_0 | Self::Q8_0 => Scheme::Q8_0,
            Self::Q4_1 => Scheme::Q8_1,
            _ => Scheme::Q8K,
        }
    }
}

/// Half-blocks of scales for a row of `k` values, padded to whole groups.
fn halves(k: usize) -> usize {
    (k / QK).div_ceil(GROUP) * HALVES_PER_GROUP
}

/// How activations are quantized for a weight type: as ggml does for it, so
/// that our products round as llama.cpp's do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// ggml's Q8_0 (for Q4_0 and Q8_0 weights): the scale rounded to f16.
    Q8_0,
    /// ggml's Q8_1 (for Q4_1): as Q8_0, and the block's sum `d·Σq` rounded to f16.
    Q8_1,
    /// ggml's Q8_K (for the K-quants): one f32 scale per 256 values, from the
    /// value of largest magnitude, and a sum per 16 values (their offsets may
    /// change every 16 values).
    Q8K,
}

/// Rows of activations quantized to 8 bits per 32-value block: `x ≈ d · q`,
/// each row padded with zeros to whole groups of blocks.
/// Per half-block of 16 values, `d` repeats its block's scale and `s` holds
/// the scaled sum of the half's values (with [`Scheme::Q8_0`] and
/// [`Scheme::Q8_1`], the whole block's sum in the first half and zero in the
/// second); zero in the padding.
pub struct Activations {
    k: usize,
    halves: usize,
    qs: Vec<i8>,
    d: Vec<f32>,
    s: Vec<f32>,
}

/// One row of [`Activations`].
pub struct ActRow<'a> {
    qs: &'a [i8],
    d: &'a [f32],
    s: &'a [f32],
}

impl Activations {
    /// Quantizes `x.len() / k` rows of `k` values as ggml's `quantize_row_q8_0`,
    /// `_q8_1` or `_q8_K` does (`k` a multiple of 32, or of 256 for Q8_K).
    pub fn new(x: &[f32], k: usize, scheme: Scheme) -> Self {
        let unit = if scheme == Scheme::Q8K { 256 } else { QK };
        assert!(
            k.is_multiple_of(unit),
            "k = {k} is not a multiple of {unit}"
        );
        let rows = x.len() / k;
        let halves = halves(k);
        let mut a = Self {
            k,
            halves,
            qs: vec![0; rows * halves * HALF],
            d: vec![0.0; rows * halves],
            s: vec![0.0; rows * halves],
        };
        let f16 = |v: f32| half::f16::from_f32(v).to_f32();
        let sum = |q: &[i8]| q.iter().map(|&q| q as i32).sum::<i32>() as f32;
        for (r, xs) in x.chunks_exact(k).enumerate() {
            for (u, xs) in xs.chunks_exact(unit).enumerate() {
                // ggml's scale: the block's largest magnitude maps to ±127.
                let (d, id) = match scheme {
                    Scheme::Q8K => {
                        let max = xs
                            .iter()
                            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
                        let iscale = if max != 0.0 { -127.0 / max } else { 0.0 };
                        (if max != 0.0 { 1.0 / iscale } else { 0.0 }, iscale)
                    }
                    _ => {
                        let amax = xs.iter().fold(0f32, |m, &v| m.max(v.abs()));
                        let d = amax / 127.0;
                        (d, if d != 0.0 { 1.0 / d } else { 0.0 })
                    }
                };
                for (i, xs) in xs.chunks_exact(QK).enumerate() {
                    let b = u * unit / QK + i;
                    let qs = &mut a.qs[r * halves * HALF + b * QK..][..QK];
                    for (q, &v) in qs.iter_mut().zip(xs) {
                        *q = f32::round(v * id).clamp(-128.0, 127.0) as i8;
                    }
                    let at = r * halves + 2 * b;
                    let (ds, ss) = (&mut a.d[at..at + 2], &mut a.s[at..at + 2]);
                    match scheme {
                        // d·Σq is exact in f32 for an f16 d and |Σq| < 2¹².
                        Scheme::Q8_0 => {
                            ds.fill(f16(d));
                            ss[0] = f16(d) * sum(qs);
                        }
                        Scheme::Q8_1 => {
                            ds.fill(f16(d));
                            ss[0] = f16(d * sum(qs));
                        }
                        Scheme::Q8K => {
                            ds.fill(d);
                            for (s, half) in ss.iter_mut().zip(qs.chunks_exact(HALF)) {
                                *s = d * sum(half);
                            }
                        }
                    }
                }
            }
        }
        a
    }

    pub fn rows(&self) -> usize {
        self.d.len() / self.halves
    }

    fn row(&self, r: usize) -> ActRow<'_> {
        let h = r * self.halves..(r + 1) * self.halves;
        ActRow {
            qs: &self.qs[h.start * HALF..h.end * HALF],
            d: &self.d[h.clone()],
            s: &self.s[h],
        }
    }
}

/// One weight row unpacked: `w = d·code + m` per half-block, with zero codes
/// and scales past the row up to a whole group.
pub struct WeightRow {
    blocks: usize,
    codes: Vec<u8>,
    d: Vec<f32>,
    m: Vec<f32>,
}

impl WeightRow {
    fn new(k: usize) -> Self {
        Self {
            blocks: k / QK,
            codes: vec![0; halves(k) * HALF],
            d: vec![0.0; halves(k)],
            m: vec![0.0; halves(k)],
        }
    }
}

/// Weights `[n, k]` as GGUF blocks, one row after another.
pub struct QuantMatrix {
    pub ty: QuantType,
    pub blocks: Vec<u8>,
    pub n: usize,
    pub k: usize,
}

/// Output columns per parallel task.
const COLS: usize = 16;

/// The output matrix, written by tasks that own disjoint columns.
struct Out(*mut f32);
// SAFETY: every task writes only the cells of its own columns.
unsafe impl Sync for Out {}

impl QuantMatrix {
    /// `blocks.len()` must be `n · k / block_values · block_bytes`.
    pub fn new(ty: QuantType, blocks: Vec<u8>, n: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(ty.block_values()),
            "{ty:?} rows of {k} values: not whole blocks"
        );
        assert_eq!(
            blocks.len(),
            n * k / ty.block_values() * ty.block_bytes(),
            "{ty:?} weights [{n}, {k}]"
        );
        Self { ty, blocks, n, k }
    }

    fn row_bytes(&self) -> usize {
        self.k / self.ty.block_values() * self.ty.block_bytes()
    }

    /// Unpacks weight row `c` into `row`.
    fn unpack(&self, isa: Isa, c: usize, row: &mut WeightRow) {
        let src = &self.blocks[c * self.row_bytes()..][..self.row_bytes()];
        match isa {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: both ISAs include F16C (`Isa::detect`).
            Isa::Vnni | Isa::Avx2 => unsafe { unpack_f16c(self.ty, src, row) },
            _ => unpack::unpack::<unpack::Soft>(self.ty, src, row),
        }
    }

    /// `y = x · Wᵀ` for `x.len() / k` rows, on the best instruction set.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        let a = Activations::new(x, self.k, self.ty.scheme());
        self.matmul_with(Isa::detect(), &a, y)
    }

    /// `y = a · Wᵀ` with the given instruction set (which the CPU must have).
    pub fn matmul_with(&self, isa: Isa, a: &Activations, y: &mut [f32]) {
        assert_eq!(
            a.k, self.k,
            "activations of width {} for k = {}",
            a.k, self.k
        );
        let (rows, n) = (a.rows(), self.n);
        assert_eq!(y.len(), rows * n, "output");
        if rows == 1 && self.ty.legacy() && isa != Isa::Portable {
            let (a, rb) = (a.row(0), self.row_bytes());
            y.par_chunks_mut(COLS).enumerate().for_each(|(t, y)| {
                for (i, y) in y.iter_mut().enumerate() {
                    let bytes = &self.blocks[(t * COLS + i) * rb..][..rb];
                    *y = dot::dot_blocks(isa, self.ty, bytes, &a).expect("a SIMD path");
                }
            });
            return;
        }
        let out = Out(y.as_mut_ptr());
        let out = &out;
        (0..n.div_ceil(COLS)).into_par_iter().for_each_init(
            || WeightRow::new(self.k),
            |row, t| {
                for c in t * COLS..((t + 1) * COLS).min(n) {
                    self.unpack(isa, c, row);
                    for r in 0..rows {
                        let v = dot::dot(isa, row, &a.row(r), self.ty.wide());
                        // SAFETY: r < rows and c < n, so the cell is inside `y`,
                        // and column c belongs to this task alone.
                        unsafe { *out.0.add(r * n + c) = v };
                    }
                }
            },
        );
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,f16c")]
unsafe fn unpack_f16c(ty: QuantType, src: &[u8], row: &mut WeightRow) {
    unpack::unpack::<unpack::F16c>(ty, src, row)
}

#[cfg(test)]
mod tests;
