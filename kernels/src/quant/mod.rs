//! Quantized weights (GGUF's Q4_0, Q4_1, Q8_0, Q4_K, Q5_K and Q6_K blocks) ×
//! f32 activations, as a GEMM over a batch of rows.
//!
//! At load, each matrix is packed into one interleaved form for every type
//! ([`Layout`]): unsigned codes (4 or 8 bits) with a scale and an offset per
//! block (`w = d·code + m`), arranged so that one 4-byte integer lane of a
//! vector register sums a whole block. Activations are quantized to 8 bits as
//! ggml does for the weight type and laid out the same way. A group of eight
//! blocks then costs integer multiply-adds (AVX-512 VNNI or AVX2 where the CPU
//! has them), one conversion to float and one multiply-add per row, and each
//! weight group is read once for up to four activation rows (from eight rows,
//! VNNI also reads each activation once for two weight rows). Output columns
//! are spread over the cores. A row's result never depends on the other rows
//! in the batch, nor on the instruction set.
mod act;
mod dot;
mod unpack;

use crate::huge::HugeBuf;
pub use act::Activations;
pub use dot::Isa;
use rayon::prelude::*;
pub use unpack::Unpacked;

/// Values per block of Q4_0, Q4_1, Q8_0 and of ggml's Q8_0/Q8_1 activations.
pub const QK: usize = 32;
/// Values that share one weight scale in the finest format (Q6_K).
const HALF: usize = 16;
/// Integer lanes of a 256-bit register: the blocks of one group.
const LANES: usize = 8;
/// Bytes of one step: four values for each lane.
const STEP: usize = 4 * LANES;

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

    /// Values that share one scale and offset (the block of the packed form).
    fn scale_values(self) -> usize {
        if self == Self::Q6K {
            HALF
        } else {
            QK
        }
    }

    /// Whether codes fit in 4 bits (packed two to a byte).
    fn nibbles(self) -> bool {
        matches!(self, Self::Q4_0 | Self::Q4_1 | Self::Q4K)
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

/// How activations are quantized for a weight type: as ggml does for it, so
/// that our products round as llama.cpp's do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// ggml's Q8_0 (for Q4_0 and Q8_0 weights): the scale rounded to f16.
    Q8_0,
    /// ggml's Q8_1 (for Q4_1): as Q8_0, and the block's sum `d·Σq` rounded to f16.
    Q8_1,
    /// ggml's Q8_K (for the K-quants): one f32 scale per 256 values, from the
    /// value of largest magnitude.
    Q8K,
}

/// One group of a row: eight lanes of `lane` consecutive values from `start`,
/// each lane inside one block. Step `s` holds values `4s..4s + 4` of every
/// lane, lane after lane (32 bytes); 4-bit codes keep two steps per byte,
/// the even one in the low nibble.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Group {
    start: usize,
    lane: usize,
    /// Where its codes begin in a packed weight row.
    codes: usize,
}

impl Group {
    fn steps(&self) -> usize {
        self.lane / 4
    }

    /// Byte `b` of step `s` is value `start + (b / 4)·lane + 4s + b % 4`.
    fn value(&self, s: usize, b: usize) -> usize {
        self.start + b / 4 * self.lane + 4 * s + b % 4
    }
}

/// How a row of `k` values is cut into groups: whole groups of eight blocks,
/// then the rest in groups of 4, 2 and 1 blocks whose lanes split the blocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    k: usize,
    nibbles: bool,
    groups: Vec<Group>,
    /// Bytes of codes per weight row.
    code_bytes: usize,
}

impl Layout {
    fn new(ty: QuantType, k: usize) -> Self {
        Self::with_codes(ty, k, ty.nibbles())
    }

    /// The layout of `ty`'s groups with codes packed as nibbles or as bytes.
    fn with_codes(ty: QuantType, k: usize, nibbles: bool) -> Self {
        let full = LANES * ty.scale_values();
        let mut sizes = vec![full; k / full];
        let mut rest = k % full;
        for part in [4 * QK, 2 * QK, QK] {
            if rest >= part {
                sizes.push(part);
                rest -= part;
            }
        }
        assert_eq!(rest, 0, "k = {k} is not a multiple of {QK}");
        let (mut start, mut codes, mut groups) = (0, 0, Vec::new());
        for size in sizes {
            let lane = size / LANES;
            groups.push(Group { start, lane, codes });
            start += size;
            let steps = lane / 4;
            codes += STEP * if nibbles { steps.div_ceil(2) } else { steps };
        }
        Self {
            k,
            nibbles,
            groups,
            code_bytes: codes,
        }
    }

    /// Where step `s`, byte `b` of group `g` lies in a packed weight row, and
    /// the shift of its nibble.
    fn code_at(&self, g: &Group, s: usize, b: usize) -> (usize, u32) {
        if self.nibbles {
            (g.codes + s / 2 * STEP + b, 4 * (s % 2) as u32)
        } else {
            (g.codes + s * STEP + b, 0)
        }
    }

    /// Groups × lanes: per-lane values (scales, sums) in a row.
    fn lanes(&self) -> usize {
        self.groups.len() * LANES
    }
}

/// Weights `[n, k]` packed from GGUF blocks into a [`Layout`]: per row, the
/// codes, and per lane a scale and an offset (`d[8], m[8]` per group).
pub struct QuantMatrix {
    pub ty: QuantType,
    pub n: usize,
    pub k: usize,
    layout: Layout,
    /// For 4-bit codes, the same groups with a byte per code: a weight row is
    /// widened to it once when many activation rows will read it.
    bytes_layout: Option<Layout>,
    /// On huge pages: every token streams them.
    codes: HugeBuf<u8>,
    scales: HugeBuf<f32>,
}

/// Output columns per parallel task.
const COLS: usize = 16;

/// The output matrix, written by tasks that own disjoint columns.
struct Out(*mut f32);
// SAFETY: every task writes only the cells of its own columns.
unsafe impl Sync for Out {}

impl QuantMatrix {
    /// Packs `blocks`: `n` rows of `k` values as GGUF blocks of `ty`.
    pub fn new(ty: QuantType, blocks: &[u8], n: usize, k: usize) -> Self {
        assert!(
            k.is_multiple_of(ty.block_values()),
            "{ty:?} rows of {k} values: not whole blocks"
        );
        let row_bytes = k / ty.block_values() * ty.block_bytes();
        assert_eq!(blocks.len(), n * row_bytes, "{ty:?} weights [{n}, {k}]");
        Self::from_rows(ty, n, k, |r, row| {
            unpack::unpack(ty, &blocks[r * row_bytes..][..row_bytes], row)
        })
    }

    /// Packs `n` rows of `k` values that `fill` writes as codes with a
    /// scale and an offset per block of 32 (`w = d·code + m`), for weights
    /// quantized here rather than read from GGUF blocks: `ty` is `Q4_1`
    /// (codes 0..16) or `Q8_0` (codes 0..256) and picks the kernel and the
    /// activations' scheme.
    pub fn from_rows(
        ty: QuantType,
        n: usize,
        k: usize,
        fill: impl Fn(usize, &mut Unpacked) + Sync,
    ) -> Self {
        let layout = Layout::new(ty, k);
        let lanes = layout.lanes();
        let mut codes = HugeBuf::zeroed(n * layout.code_bytes);
        let mut scales = HugeBuf::zeroed(n * 2 * lanes);
        let rows = codes
            .par_chunks_mut(layout.code_bytes)
            .zip(scales.par_chunks_mut(2 * lanes))
            .enumerate();
        rows.for_each_init(
            || Unpacked::new(k),
            |row, (r, (codes, scales))| {
                fill(r, row);
                for (gi, g) in layout.groups.iter().enumerate() {
                    for s in 0..g.steps() {
                        for b in 0..STEP {
                            let (at, shift) = layout.code_at(g, s, b);
                            codes[at] |= row.codes[g.value(s, b)] << shift;
                        }
                    }
                    for l in 0..LANES {
                        let half = (g.start + l * g.lane) / HALF;
                        scales[2 * gi * LANES + l] = row.d[half];
                        scales[(2 * gi + 1) * LANES + l] = row.m[half];
                    }
                }
            },
        );
        Self {
            ty,
            n,
            k,
            bytes_layout: layout.nibbles.then(|| Layout::with_codes(ty, k, false)),
            layout,
            codes,
            scales,
        }
    }

    /// Matrices of one type and width stacked: their rows one after another.
    pub fn concat(parts: Vec<QuantMatrix>) -> Self {
        let first = parts.first().expect("a first part");
        for p in &parts {
            assert!(
                p.ty == first.ty && p.k == first.k,
                "{:?}×{} beside {:?}×{}",
                p.ty,
                p.k,
                first.ty,
                first.k
            );
        }
        let n = parts.iter().map(|p| p.n).sum();
        let (mut codes, mut scales) = (Vec::new(), Vec::new());
        for p in &parts {
            codes.extend_from_slice(&p.codes);
            scales.extend_from_slice(&p.scales);
        }
        let (ty, k, layout, bytes_layout) = (
            first.ty,
            first.k,
            first.layout.clone(),
            first.bytes_layout.clone(),
        );
        // The parts are the arena's newest buffers: dropped newest first
        // (each one's scales were carved after its codes), they give their
        // room back to the stacked matrix instead of staying resident
        // beside it.
        for p in parts.into_iter().rev() {
            let QuantMatrix { codes, scales, .. } = p;
            drop(scales);
            drop(codes);
        }
        Self {
            ty,
            n,
            k,
            layout,
            bytes_layout,
            codes: HugeBuf::from_slice(&codes),
            scales: HugeBuf::from_slice(&scales),
        }
    }

    fn row(&self, c: usize) -> dot::WeightRow<'_> {
        let (bytes, lanes) = (self.layout.code_bytes, self.layout.lanes());
        dot::WeightRow {
            layout: &self.layout,
            codes: &self.codes[c * bytes..][..bytes],
            scales: &self.scales[c * 2 * lanes..][..2 * lanes],
        }
    }

    /// `x.len() / k` rows quantized for this matrix with the given
    /// instruction set (which the CPU must have).
    pub fn activations(&self, isa: Isa, x: &[f32]) -> Activations {
        Activations::new(isa, x, &self.layout, self.ty.scheme())
    }

    /// `y = x · Wᵀ` for `x.len() / k` rows, on the best instruction set.
    pub fn matmul(&self, x: &[f32], y: &mut [f32]) {
        let isa = Isa::detect();
        let a = self.activations(isa, x);
        self.matmul_with(isa, &a, y)
    }

    /// `y = a · Wᵀ` with the given instruction set (which the CPU must have).
    pub fn matmul_with(&self, isa: Isa, a: &Activations, y: &mut [f32]) {
        assert!(
            a.layout == self.layout && a.scheme == self.ty.scheme(),
            "activations of width {} quantized for another matrix (k = {})",
            a.layout.k,
            self.k
        );
        let (rows, n) = (a.rows(), self.n);
        assert_eq!(y.len(), rows * n, "output");
        let acts: Vec<_> = (0..rows).map(|r| a.row(r)).collect();
        let out = Out(y.as_mut_ptr());
        let out = &out;
        (0..n.div_ceil(COLS)).into_par_iter().for_each(|t| {
            let cols = t * COLS..((t + 1) * COLS).min(n);
            dot::columns(isa, self, cols, &acts, |r, c, v| {
                // SAFETY: r < rows and c < n, so the cell is inside `y`,
                // and column c belongs to this task alone.
                unsafe { *out.0.add(r * n + c) = v };
            });
        });
    }
}

#[cfg(test)]
mod tests;
