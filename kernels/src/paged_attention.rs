//! Causal attention that reads keys and values through per-sequence block tables,
//! for a flattened batch mixing prefill chunks and single decode tokens.
//!
//! Keys and values are stored as f16 by default (half the memory traffic of
//! f32, which is what bounds attention over long contexts), as int8 with one
//! scale per row of a head (half again), or as f32. f16 and f32 rows are
//! computed on in f32. Over int8 rows the SIMD paths compute in integers,
//! two 16-bit products a lane (`vpdpwssd` with VNNI, `vpmaddwd` with AVX2):
//! each query head is rounded to 16 bits against its largest magnitude and
//! scored against the keys widened to 16 bits, and each block's weights
//! `p·step` are rounded to 16 bits against their largest and summed with the
//! values two positions a lane.
//! Each (query token, KV head) pair is one task computed the same way whatever
//! else is in the batch, so a token's output does not depend on how it was
//! batched or chunked. It walks the sequence block by block: a block's keys
//! and values are converted once for every query head of the group, scores
//! are reduced eight positions at a time, and the next block is prefetched.
//! AVX-512 VNNI and AVX2/FMA/F16C where the CPU has them, with a portable
//! fallback (in f32 for every pool).
use crate::quant::Isa;
use half::{f16, slice::HalfFloatSliceExt, vec::HalfBitsVecExt};
use rayon::prelude::*;

/// Shape of one layer's KV pool: `[num_blocks, kv_heads, block_size, head_dim]`,
/// so the keys of one head within a block are contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvLayout {
    pub block_size: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

impl KvLayout {
    /// Values of one block (all heads) in one layer's K or V pool.
    pub fn block_len(&self) -> usize {
        self.kv_heads * self.block_size * self.head_dim
    }

    /// Offset of token `pos` of head `head` in a sequence with `table`.
    fn offset(&self, table: &[u32], pos: usize, head: usize) -> usize {
        let block = table[pos / self.block_size] as usize;
        ((block * self.kv_heads + head) * self.block_size + pos % self.block_size) * self.head_dim
    }

    /// Writes `x` (`[tokens, kv_heads, head_dim]`) to positions `start_pos..` of
    /// the sequence whose blocks are `table`.
    pub fn write(&self, pool: &mut Pool, table: &[u32], start_pos: usize, x: &[f32]) {
        let d = self.head_dim;
        for (t, token) in x.chunks_exact(self.kv_heads * d).enumerate() {
            for (h, row) in token.chunks_exact(d).enumerate() {
                let o = self.offset(table, start_pos + t, h);
                match pool {
                    Pool::F16(p) => p[o..o + d].convert_from_f32_slice(row),
                    Pool::F32(p) => p[o..o + d].copy_from_slice(row),
                    Pool::Int8 { values, scales } => {
                        scales[o / d] = quantize_row(row, &mut values[o..o + d])
                    }
                }
            }
        }
    }
}

/// How keys and values are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KvDtype {
    /// Half the memory and memory traffic; values rounded to 11 significant bits.
    #[default]
    F16,
    /// Exact f32 keys and values.
    F32,
    /// A quarter of f32's memory and traffic (plus one f32 scale per row of
    /// a head): each row is rounded to 127 steps of its largest magnitude,
    /// and attention over it runs in 16-bit integer products.
    Int8,
}

/// The names `kv_cache_dtype` takes: `f16`, `f32`, `int8`.
impl std::str::FromStr for KvDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f16" => Ok(Self::F16),
            "f32" => Ok(Self::F32),
            "int8" => Ok(Self::Int8),
            _ => Err(format!("unknown KV dtype `{s}`: f16, f32 or int8")),
        }
    }
}

impl KvDtype {
    /// Bytes one row of `head_dim` values takes.
    pub fn row_bytes(self, head_dim: usize) -> usize {
        match self {
            Self::F16 => 2 * head_dim,
            Self::F32 => 4 * head_dim,
            Self::Int8 => head_dim + 4,
        }
    }
}

/// One layer's keys or values, `[num_blocks, kv_heads, block_size, head_dim]`.
#[derive(Debug, Clone)]
pub enum Pool {
    F16(Vec<f16>),
    F32(Vec<f32>),
    /// Row `r` (`head_dim` values from `r · head_dim`) is `values` times
    /// `scales[r]`.
    Int8 {
        values: Vec<i8>,
        scales: Vec<f32>,
    },
}

/// Rounds `row` to `out` in steps of its largest magnitude over 127 and
/// returns that step (0 for a row of zeros).
fn quantize_row(row: &[f32], out: &mut [i8]) -> f32 {
    let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
    let step = max / 127.0;
    let inv = if max > 0.0 { 127.0 / max } else { 0.0 };
    for (o, v) in out.iter_mut().zip(row) {
        *o = round(v * inv);
    }
    step
}

/// `x.round()` for |x| ≤ 127.5 (half away from zero), without a call into
/// libm: the cast truncates, and the fraction left is exact.
#[inline(always)]
fn round(x: f32) -> i8 {
    let t = x as i8;
    let f = x - t as f32;
    t + (f >= 0.5) as i8 - (f <= -0.5) as i8
}

impl Pool {
    /// Room for `len` values of `layout`, all zeros, taken from the OS's
    /// zero pages (so untouched blocks cost nothing).
    pub fn zeros(dtype: KvDtype, layout: KvLayout, len: usize) -> Self {
        match dtype {
            KvDtype::F16 => Self::F16(vec![0u16; len].reinterpret_into()),
            KvDtype::F32 => Self::F32(vec![0f32; len]),
            KvDtype::Int8 => Self::Int8 {
                values: vec![0; len],
                scales: vec![0.0; len / layout.head_dim],
            },
        }
    }

    pub fn dtype(&self) -> KvDtype {
        match self {
            Self::F16(_) => KvDtype::F16,
            Self::F32(_) => KvDtype::F32,
            Self::Int8 { .. } => KvDtype::Int8,
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::F16(p) => p.len(),
            Self::F32(p) => p.len(),
            Self::Int8 { values, .. } => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Copies whole rows of `row` values from `src` to `dst` (copy-on-write
    /// of a block).
    pub fn copy_within(&mut self, src: std::ops::Range<usize>, dst: usize, row: usize) {
        match self {
            Self::F16(p) => p.copy_within(src, dst),
            Self::F32(p) => p.copy_within(src, dst),
            Self::Int8 { values, scales } => {
                scales.copy_within(src.start / row..src.end / row, dst / row);
                values.copy_within(src, dst);
            }
        }
    }

    /// `out = self[at..at + out.len()]` as f32; whole rows of `row` values.
    fn widen_portable(&self, at: usize, out: &mut [f32], row: usize) {
        match self {
            Self::F16(p) => p[at..at + out.len()].convert_to_f32_slice(out),
            Self::F32(p) => out.copy_from_slice(&p[at..at + out.len()]),
            Self::Int8 { values, scales } => {
                for (r, out) in out.chunks_exact_mut(row).enumerate() {
                    let (src, step) = (&values[at + r * row..][..row], scales[at / row + r]);
                    out.iter_mut()
                        .zip(src)
                        .for_each(|(o, &q)| *o = q as f32 * step);
                }
            }
        }
    }
}

/// One layer's key and value pools.
#[derive(Debug, Clone, Copy)]
pub struct LayerKv<'a> {
    pub k: &'a Pool,
    pub v: &'a Pool,
    pub layout: KvLayout,
}

/// One sequence's queries in the batch.
#[derive(Debug, Clone, Copy)]
pub struct SeqQueries<'a> {
    /// Row of its first query in `q`.
    pub offset: usize,
    pub len: usize,
    /// Position of its first query; query `i` sees keys `0..=start_pos + i`.
    pub start_pos: usize,
    /// Blocks holding positions `0..start_pos + len`.
    pub block_table: &'a [u32],
}

/// How scores are formed from `q · k`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Scoring {
    /// Multiplies `q · k` (usually `1/√head_dim`).
    pub scale: f32,
    /// A query sees only the last `window` positions, itself included
    /// (sliding-window attention, as Mistral and Gemma's local layers have).
    pub window: Option<usize>,
    /// Scores become `cap · tanh(score / cap)` before the softmax (Gemma 2).
    pub softcap: Option<f32>,
}

impl Scoring {
    /// Plain causal attention scaled by `scale`.
    pub fn scaled(scale: f32) -> Self {
        Self {
            scale,
            window: None,
            softcap: None,
        }
    }
}

/// `out[t, h] = softmax(scale · q[t, h] · Kᵀ) · V` over the keys each query may
/// see (all before it, or the last `window` of them), with query head `h`
/// reading KV head `h / (heads / kv_heads)`. `q` and
/// `out` are `[tokens, heads, head_dim]`; the sequences' rows must cover `q`.
/// `isa` (which the CPU must have) picks the SIMD path unless it is
/// [`Isa::Portable`] or the head size is not a whole number of vectors.
pub fn paged_attention(
    isa: Isa,
    q: &[f32],
    heads: usize,
    seqs: &[SeqQueries],
    kv: LayerKv,
    scoring: Scoring,
    out: &mut [f32],
) {
    let layout = kv.layout;
    let (d, kv_heads) = (layout.head_dim, layout.kv_heads);
    assert!(
        heads.is_multiple_of(kv_heads),
        "{heads} heads over {kv_heads} KV heads"
    );
    let group = heads / kv_heads;
    let rows = q.len() / (heads * d);
    assert_eq!(q.len(), rows * heads * d, "queries");
    assert_eq!(out.len(), q.len(), "output");
    let mut owner = vec![usize::MAX; rows];
    for (i, s) in seqs.iter().enumerate() {
        assert!(
            s.block_table.len() * layout.block_size >= s.start_pos + s.len,
            "block table too short"
        );
        owner[s.offset..s.offset + s.len].fill(i);
    }
    assert!(
        owner.iter().all(|&o| o != usize::MAX),
        "uncovered query rows"
    );
    let len = |pool: &Pool| pool.len() / layout.block_len();
    let blocks = len(kv.k).min(len(kv.v));
    for s in seqs {
        let used = (s.start_pos + s.len).div_ceil(layout.block_size);
        assert!(
            s.block_table[..used].iter().all(|&b| (b as usize) < blocks),
            "block outside the pool"
        );
    }
    // One task per (token, KV head): the group's queries and the keys they see.
    let work = |task: usize| {
        let (row, kvh) = (task / kv_heads, task % kv_heads);
        let s = &seqs[owner[row]];
        let ctx = s.start_pos + (row - s.offset) + 1;
        Work {
            q: &q[(row * heads + kvh * group) * d..][..group * d],
            keys: Keys {
                table: s.block_table,
                first: scoring.window.map_or(0, |w| ctx.saturating_sub(w)),
                ctx,
                head: kvh,
            },
            kv,
            scoring,
        }
    };
    let width = group * d;
    let per = (PIECE_POSITIONS / layout.block_size).max(1);
    let pieces: Vec<usize> = (0..rows * kv_heads)
        .map(|t| work(t).blocks().len().div_ceil(per))
        .collect();
    if pieces.iter().all(|&n| n == 1) {
        out.par_chunks_mut(width)
            .enumerate()
            .for_each_init(Scratch::default, |scratch, (task, out)| {
                attend(isa, work(task), scratch, out)
            });
        return;
    }
    // Long contexts: each task's keys in pieces of `per` blocks, attended
    // in parallel, then merged by their softmax maxima and sums.
    let at: Vec<(usize, usize)> = pieces
        .iter()
        .enumerate()
        .flat_map(|(t, &n)| (0..n).map(move |i| (t, i)))
        .collect();
    // Reused across calls on this thread: every piece overwrites its part.
    thread_local! {
        static PIECES: std::cell::RefCell<Pieces> = Default::default();
    }
    PIECES.with_borrow_mut(|(partial, stats)| {
        partial.resize(at.len() * width, 0.0);
        stats.resize(at.len() * group, (0.0, 0.0));
        merge_pieces(isa, &at, &pieces, per, group, d, &work, partial, stats, out)
    });
}

/// Each piece's output rows and its softmax maxima and sums.
type Pieces = (Vec<f32>, Vec<(f32, f32)>);

/// Attends each piece `at[i]` (task, piece) into `partial` and `stats`,
/// then merges each task's pieces into its `out` rows.
#[allow(clippy::too_many_arguments)]
fn merge_pieces<'a>(
    isa: Isa,
    at: &[(usize, usize)],
    pieces: &[usize],
    per: usize,
    group: usize,
    d: usize,
    work: &(impl Fn(usize) -> Work<'a> + Sync),
    partial: &mut [f32],
    stats: &mut [(f32, f32)],
    out: &mut [f32],
) {
    let width = group * d;
    partial
        .par_chunks_mut(width)
        .zip(stats.par_chunks_mut(group))
        .enumerate()
        .for_each_init(Scratch::default, |scratch, (i, (out, stats))| {
            let (task, piece) = at[i];
            attend(isa, work(task).piece(piece, per), scratch, out);
            stats.copy_from_slice(&scratch.stats);
        });
    let first: Vec<usize> = pieces
        .iter()
        .scan(0, |next, &n| {
            let at = *next;
            *next += n;
            Some(at)
        })
        .collect();
    out.par_chunks_mut(width)
        .enumerate()
        .for_each(|(task, out)| {
            let range = first[task]..first[task] + pieces[task];
            if range.len() == 1 {
                return out.copy_from_slice(&partial[range.start * width..][..width]);
            }
            for (g, o) in out.chunks_exact_mut(d).enumerate() {
                let stat = |p: usize| stats[p * group + g];
                let max = range
                    .clone()
                    .map(|p| stat(p).0)
                    .fold(f32::NEG_INFINITY, f32::max);
                o.fill(0.0);
                let mut total = 0.0;
                for p in range.clone() {
                    let (m, sum) = stat(p);
                    let weight = sum * (m - max).exp();
                    total += weight;
                    let part = &partial[p * width + g * d..][..d];
                    o.iter_mut().zip(part).for_each(|(o, x)| *o += weight * x);
                }
                let inv = 1.0 / total;
                o.iter_mut().for_each(|o| *o *= inv);
            }
        });
}

/// A query's visible keys beyond this many positions are attended in
/// pieces of this many (rounded to whole blocks) that run in parallel: a
/// decoding sequence is otherwise one task per KV head, fewer than the
/// cores. The split depends on the context alone, so a row's result does
/// not depend on what else is in its batch.
const PIECE_POSITIONS: usize = 512;

/// The keys one query sees: positions `first..ctx` of KV head `head`.
#[derive(Clone, Copy)]
struct Keys<'a> {
    table: &'a [u32],
    first: usize,
    ctx: usize,
    head: usize,
}

/// One KV head's group of query heads for one token.
#[derive(Clone, Copy)]
struct Work<'a> {
    /// The group's queries, `[group, head_dim]`.
    q: &'a [f32],
    keys: Keys<'a>,
    kv: LayerKv<'a>,
    scoring: Scoring,
}

impl Work<'_> {
    /// Piece `i` of this work's keys, in pieces of `per` blocks.
    fn piece(self, i: usize, per: usize) -> Self {
        let (bs, blocks) = (self.kv.layout.block_size, self.blocks());
        let start = blocks.start + i * per;
        let end = (start + per).min(blocks.end);
        Self {
            keys: Keys {
                first: self.keys.first.max(start * bs),
                ctx: self.keys.ctx.min(end * bs),
                ..self.keys
            },
            ..self
        }
    }

    /// The blocks holding visible keys.
    fn blocks(&self) -> std::ops::Range<usize> {
        let bs = self.kv.layout.block_size;
        self.keys.first / bs..self.keys.ctx.div_ceil(bs)
    }

    /// The position of the first visible block's first row: scores are
    /// kept from there.
    fn base(&self) -> usize {
        self.blocks().start * self.kv.layout.block_size
    }

    /// Positions of scores kept per row (from [`Work::base`] to `ctx`).
    fn span(&self) -> usize {
        self.keys.ctx - self.base()
    }

    /// Soft-caps each row's visible scores and hides the positions of its
    /// first block that lie before the window; rows are `stride` apart and
    /// begin at [`Work::base`].
    fn finish_scores(&self, scores: &mut [f32], stride: usize) {
        let base = self.base();
        let (first, ctx) = (self.keys.first - base, self.keys.ctx - base);
        for row in scores.chunks_exact_mut(stride) {
            if let Some(cap) = self.scoring.softcap {
                row[first..ctx]
                    .iter_mut()
                    .for_each(|s| *s = cap * (*s / cap).tanh());
            }
            row[..first].fill(f32::NEG_INFINITY);
        }
    }

    /// Where block `b`'s rows of this head begin in a pool, and how many
    /// positions it holds.
    fn rows(&self, b: usize) -> (usize, usize) {
        let layout = self.kv.layout;
        let pos = b * layout.block_size;
        let n = (self.keys.ctx - pos).min(layout.block_size);
        (layout.offset(self.keys.table, pos, self.keys.head), n)
    }
}

/// Per-thread buffers: scores `[group, span]`, one block's rows in f32,
/// each query head's softmax maximum and sum (for merging pieces), and for
/// int8 pools the group's rounded queries and the integer paths' buffers.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    rows: Vec<f32>,
    stats: Vec<(f32, f32)>,
    queries: Rounded,
    ints: IntRows,
}

/// Buffers of the integer paths over int8 rows, per block.
#[derive(Default)]
struct IntRows {
    /// The block's rows widened to 16 bits (values as pairs of positions).
    wide: Vec<i16>,
    /// The rows' steps, and a head's weights `p·step` over the values, both
    /// zero past the block's positions.
    steps: Vec<f32>,
    weights: Vec<f32>,
    /// A head's weights rounded to 16 bits, two positions to an `i32`.
    rounded: Vec<i32>,
}

/// Whether the SIMD paths read `pool` of `layout` in integers: int8 rows of
/// whole registers, whose sums stay inside 32 bits (a score's `head_dim`
/// products of at most 32,767·127, a block's weighed values `block_size` of
/// them).
fn integer_rows(pool: &Pool, layout: KvLayout) -> bool {
    let (d, bs) = (layout.head_dim, layout.block_size);
    matches!(pool, Pool::Int8 { .. }) && d.is_multiple_of(32) && d <= 256 && bs <= 256
}

/// A group's queries rounded to 16 bits for scoring against int8 keys in
/// integers: each head's row to 32,767 steps of its largest magnitude.
#[derive(Default)]
struct Rounded {
    /// `[group, head_dim]`.
    q16: Vec<i16>,
    /// Each head's step.
    steps: Vec<f32>,
}

/// Scores over the visible keys, softmax, weighted sum of values.
fn attend(isa: Isa, w: Work, scratch: &mut Scratch, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if w.kv.layout.head_dim.is_multiple_of(8) {
        // SAFETY: every SIMD `Isa` includes AVX2, FMA and F16C, `Vnni` the
        // AVX-512 VNNI instructions, and rows are whole vectors.
        match isa {
            Isa::Vnni => return unsafe { x86::attend_vnni(w, scratch, out) },
            Isa::Avx2 => return unsafe { x86::attend_avx2(w, scratch, out) },
            Isa::Portable => {}
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = isa;
    attend_portable(w, scratch, out)
}

/// Softmax in place of the first `cols` scores of each row of `stride`;
/// `exp(row, max)` sets `row[i] = e^(row[i] - max)` and returns their sum.
/// Each row's maximum and sum go to `stats`.
#[inline(always)]
fn softmax(
    scores: &mut [f32],
    stride: usize,
    cols: usize,
    stats: &mut Vec<(f32, f32)>,
    exp: impl Fn(&mut [f32], f32) -> f32,
) {
    stats.clear();
    for row in scores.chunks_exact_mut(stride) {
        let row = &mut row[..cols];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let sum = exp(row, max);
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|p| *p *= inv);
        stats.push((max, sum));
    }
}

fn attend_portable(w: Work, scratch: &mut Scratch, out: &mut [f32]) {
    let (d, span, bs) = (w.kv.layout.head_dim, w.span(), w.kv.layout.block_size);
    let (group, base) = (w.q.len() / d, w.base());
    let blocks = w.blocks();
    let Scratch {
        scores,
        rows,
        stats,
        ..
    } = scratch;
    scores.clear();
    scores.resize(group * span, 0.0);
    rows.resize(bs * d, 0.0);
    for b in blocks.clone() {
        let (at, n) = w.rows(b);
        w.kv.k.widen_portable(at, &mut rows[..n * d], d);
        let pos = b * w.kv.layout.block_size - base;
        for (g, q) in w.q.chunks_exact(d).enumerate() {
            for (j, k) in rows[..n * d].chunks_exact(d).enumerate() {
                let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                scores[g * span + pos + j] = dot * w.scoring.scale;
            }
        }
    }
    w.finish_scores(scores, span);
    softmax(scores, span, span, stats, |row, max| {
        let mut sum = 0.0;
        for p in row.iter_mut() {
            *p = (*p - max).exp();
            sum += *p;
        }
        sum
    });
    out.fill(0.0);
    for b in blocks {
        let (at, n) = w.rows(b);
        w.kv.v.widen_portable(at, &mut rows[..n * d], d);
        let pos = b * w.kv.layout.block_size - base;
        for (g, o) in out.chunks_exact_mut(d).enumerate() {
            for (j, v) in rows[..n * d].chunks_exact(d).enumerate() {
                let p = scores[g * span + pos + j];
                o.iter_mut().zip(v).for_each(|(o, v)| *o += p * v);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{softmax, IntRows, Pool, Rounded, Scratch, Work};
    use crate::activation::x86::exp;
    use std::arch::x86_64::*;

    /// `row[i] = e^(row[i] - max)`, returning their sum.
    #[inline(always)]
    unsafe fn exp_row(row: &mut [f32], max: f32) -> f32 {
        let (m, mut acc) = (_mm256_set1_ps(max), _mm256_setzero_ps());
        let mut chunks = row.chunks_exact_mut(8);
        for c in &mut chunks {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(c.as_ptr()), m));
            _mm256_storeu_ps(c.as_mut_ptr(), e);
            acc = _mm256_add_ps(acc, e);
        }
        let mut tail = [f32::NEG_INFINITY; 8];
        let rest = chunks.into_remainder();
        tail[..rest.len()].copy_from_slice(rest);
        let e = exp(_mm256_sub_ps(_mm256_loadu_ps(tail.as_ptr()), m));
        _mm256_storeu_ps(tail.as_mut_ptr(), e);
        rest.copy_from_slice(&tail[..rest.len()]);
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), acc);
        lanes.iter().sum::<f32>() + tail[..rest.len()].iter().sum::<f32>()
    }

    /// Horizontal sums of eight vectors, as one vector (lane `t` sums
    /// `a[t]`), from the type's pairwise sums `h` and `join`, which adds
    /// `lo`'s and `hi`'s halves: `lo = [0 1 2 3 | 0 1 2 3]`, `hi` likewise
    /// for 4..8.
    #[inline(always)]
    fn tree_sums<T: Copy>(a: [T; 8], h: impl Fn(T, T) -> T, join: impl Fn(T, T) -> T) -> T {
        let (s01, s23, s45, s67) = (h(a[0], a[1]), h(a[2], a[3]), h(a[4], a[5]), h(a[6], a[7]));
        join(h(s01, s23), h(s45, s67))
    }

    /// Horizontal sums of eight vectors, as one vector.
    #[inline(always)]
    unsafe fn sums(a: [__m256; 8]) -> __m256 {
        tree_sums(
            a,
            |x, y| _mm256_hadd_ps(x, y),
            |lo, hi| {
                let first = _mm256_permute2f128_ps(lo, hi, 0x20);
                _mm256_add_ps(first, _mm256_permute2f128_ps(lo, hi, 0x31))
            },
        )
    }

    /// `out = pool[at..at + out.len()]` as f32, whole rows of `d` values, `d`
    /// a multiple of 8.
    #[inline(always)]
    unsafe fn widen(pool: &Pool, at: usize, out: &mut [f32], d: usize) {
        match pool {
            Pool::F16(p) => {
                let src = &p[at..at + out.len()];
                for (s, d) in src.chunks_exact(8).zip(out.chunks_exact_mut(8)) {
                    let h = _mm_loadu_si128(s.as_ptr() as *const __m128i);
                    _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
                }
            }
            Pool::F32(p) => out.copy_from_slice(&p[at..at + out.len()]),
            Pool::Int8 { values, scales } => {
                let src = &values[at..at + out.len()];
                for (r, (s, o)) in src.chunks_exact(d).zip(out.chunks_exact_mut(d)).enumerate() {
                    let step = _mm256_set1_ps(scales[at / d + r]);
                    for (s, o) in s.chunks_exact(8).zip(o.chunks_exact_mut(8)) {
                        let q = _mm_loadl_epi64(s.as_ptr() as *const __m128i);
                        let v = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
                        _mm256_storeu_ps(o.as_mut_ptr(), _mm256_mul_ps(v, step));
                    }
                }
            }
        }
    }

    /// Brings `len` values from `at` toward the cache while other rows are
    /// computed.
    #[inline(always)]
    unsafe fn prefetch(pool: &Pool, at: usize, len: usize) {
        let (base, bytes) = match pool {
            Pool::F16(p) => (p[at..at + len].as_ptr() as *const i8, 2 * len),
            Pool::F32(p) => (p[at..at + len].as_ptr() as *const i8, 4 * len),
            Pool::Int8 { values, .. } => (values[at..at + len].as_ptr(), len),
        };
        for line in (0..bytes).step_by(64) {
            _mm_prefetch(base.add(line), _MM_HINT_T0);
        }
    }

    /// Puts the block after `b` of `pool` on its way to the cache.
    #[inline(always)]
    unsafe fn prefetch_next(w: &Work, pool: &Pool, b: usize) {
        if (b + 1) * w.kv.layout.block_size < w.keys.ctx {
            let (next, m) = w.rows(b + 1);
            prefetch(pool, next, m * w.kv.layout.head_dim);
        }
    }

    /// Block `b`'s rows of `pool` as f32 in `rows`, the next block on its way
    /// to the cache; returns how many positions it holds.
    #[inline(always)]
    unsafe fn block(w: &Work, pool: &Pool, b: usize, rows: &mut [f32]) -> usize {
        let d = w.kv.layout.head_dim;
        let (at, n) = w.rows(b);
        prefetch_next(w, pool, b);
        widen(pool, at, &mut rows[..n * d], d);
        n
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn attend_avx2(w: Work, scratch: &mut Scratch, out: &mut [f32]) {
        attend(w, scratch, out, |acc, a, b| {
            _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
        })
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn attend_vnni(w: Work, scratch: &mut Scratch, out: &mut [f32]) {
        attend(w, scratch, out, |acc, a, b| _mm256_dpwssd_epi32(acc, a, b))
    }

    /// Horizontal sums of eight integer vectors, as one vector.
    #[inline(always)]
    unsafe fn int_sums(a: [__m256i; 8]) -> __m256i {
        tree_sums(
            a,
            |x, y| _mm256_hadd_epi32(x, y),
            |lo, hi| {
                let first = _mm256_permute2x128_si256(lo, hi, 0x20);
                _mm256_add_epi32(first, _mm256_permute2x128_si256(lo, hi, 0x31))
            },
        )
    }

    /// Rounds each of the group's query heads to 16 bits against its
    /// largest magnitude (`q = q16 · step`).
    #[inline(always)]
    unsafe fn round_queries(q: &[f32], d: usize, rounded: &mut Rounded) {
        rounded.q16.resize(q.len(), 0);
        rounded.steps.clear();
        let magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(i32::MAX));
        for (row, out) in q.chunks_exact(d).zip(rounded.q16.chunks_exact_mut(d)) {
            let mut top = _mm256_setzero_ps();
            for v in row.chunks_exact(8) {
                let v = _mm256_and_ps(_mm256_loadu_ps(v.as_ptr()), magnitude);
                top = _mm256_max_ps(top, v);
            }
            let top = max_lane(top);
            rounded.steps.push(top / 32767.0);
            let up = _mm256_set1_ps(if top > 0.0 { 32767.0 / top } else { 0.0 });
            for (v, out) in row.chunks_exact(16).zip(out.chunks_exact_mut(16)) {
                _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, round16(v, up));
            }
        }
    }

    /// The first sixteen of `v` times `up`, rounded to 16-bit integers in
    /// order.
    #[inline(always)]
    unsafe fn round16(v: &[f32], up: __m256) -> __m256i {
        let half = |at: usize| {
            _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(v[at..][..8].as_ptr()), up))
        };
        // `packs` interleaves the halves' 128-bit lanes; the permute puts
        // the sixteen back in order.
        _mm256_permute4x64_epi64(_mm256_packs_epi32(half(0), half(8)), 0xD8)
    }

    /// The largest of a vector's lanes (none of them NaN).
    #[inline(always)]
    unsafe fn max_lane(v: __m256) -> f32 {
        let m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let m = _mm_max_ps(m, _mm_movehl_ps(m, m));
        let m = _mm_max_ss(m, _mm_movehdup_ps(m));
        _mm_cvtss_f32(m)
    }

    /// Block `b` of int8 rows widened to 16 bits in `wide`, and their steps
    /// in `steps`, zero past the block's `n` positions up to a multiple of
    /// `round`; returns `n`. The next block is prefetched. The rows are
    /// `[n / 8, d / 16, 8, 16]` (each sixteen dims of eight positions side
    /// by side), or with `PAIRS` `[n / 2, d, 2]` (each two positions' values
    /// of a dim side by side, an odd last position beside zeros).
    #[inline(always)]
    unsafe fn widen_int8<const PAIRS: bool>(
        w: &Work,
        pool: &Pool,
        b: usize,
        round: usize,
        wide: &mut Vec<i16>,
        steps: &mut Vec<f32>,
    ) -> usize {
        let Pool::Int8 { values, scales } = pool else {
            unreachable!("int8 rows")
        };
        let d = w.kv.layout.head_dim;
        let (at, n) = w.rows(b);
        prefetch_next(w, pool, b);
        let len = n.div_ceil(round) * round;
        wide.resize(len * d, 0);
        // The block's rows of this head are contiguous: sixteen values a
        // chunk, `chunks` a row.
        let chunks = d / 16;
        let rows = values[at..][..n * d].as_ptr() as *const __m128i;
        let to = wide.as_mut_ptr() as *mut __m256i;
        if PAIRS {
            for pair in 0..n.div_ceil(2) {
                let (x, to) = (rows.add(2 * pair * chunks), to.add(2 * pair * chunks));
                let second = 2 * pair + 1 < n;
                for c in 0..chunks {
                    let lo = _mm_loadu_si128(x.add(c));
                    let hi = if second {
                        _mm_loadu_si128(x.add(chunks + c))
                    } else {
                        _mm_setzero_si128()
                    };
                    let (first, last) = (_mm_unpacklo_epi8(lo, hi), _mm_unpackhi_epi8(lo, hi));
                    _mm256_storeu_si256(to.add(2 * c), _mm256_cvtepi8_epi16(first));
                    _mm256_storeu_si256(to.add(2 * c + 1), _mm256_cvtepi8_epi16(last));
                }
            }
        } else {
            for j in 0..n {
                let (from, to) = (rows.add(j * chunks), to.add(j / 8 * chunks * 8 + j % 8));
                for c in 0..chunks {
                    let v = _mm256_cvtepi8_epi16(_mm_loadu_si128(from.add(c)));
                    _mm256_storeu_si256(to.add(8 * c), v);
                }
            }
        }
        steps.clear();
        steps.extend_from_slice(&scales[at / d..][..n]);
        steps.resize(len, 0.0);
        n
    }

    /// Scores of block `b` (keys converted to f32) for each query head of
    /// the group, eight positions at a time (past the block's positions,
    /// rows and scores are scratch that later positions overwrite).
    #[inline(always)]
    unsafe fn f32_scores(w: &Work, b: usize, rows: &mut [f32], scores: &mut [f32], stride: usize) {
        let d = w.kv.layout.head_dim;
        let n = block(w, w.kv.k, b, rows);
        let scores = &mut scores[b * w.kv.layout.block_size - w.base()..];
        if d.is_multiple_of(32) {
            scores_by::<4>(w, rows, n, scores, stride)
        } else {
            scores_by::<1>(w, rows, n, scores, stride)
        }
    }

    /// Scores of the `n` positions of `rows` into each head's row of
    /// `scores`: `C` vectors of a query head (`8 · C` dims of the head
    /// size's multiple) stay in registers while eight positions' keys are
    /// multiplied with them, so a key's address is computed once for `C`
    /// products.
    #[inline(always)]
    unsafe fn scores_by<const C: usize>(
        w: &Work,
        rows: &[f32],
        n: usize,
        scores: &mut [f32],
        stride: usize,
    ) {
        let d = w.kv.layout.head_dim;
        let scale = _mm256_set1_ps(w.scoring.scale);
        for (g, q) in w.q.chunks_exact(d).enumerate() {
            for j in (0..n).step_by(8) {
                let mut acc = [_mm256_setzero_ps(); 8];
                let keys = rows.as_ptr().add(j * d);
                for i in (0..d).step_by(8 * C) {
                    let mut qv = [_mm256_setzero_ps(); C];
                    for (c, qv) in qv.iter_mut().enumerate() {
                        *qv = _mm256_loadu_ps(q.as_ptr().add(i + 8 * c));
                    }
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let k = keys.add(t * d + i);
                        for (c, &qv) in qv.iter().enumerate() {
                            *acc = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k.add(8 * c)), *acc);
                        }
                    }
                }
                let s = _mm256_mul_ps(sums(acc), scale);
                _mm256_storeu_ps(scores.as_mut_ptr().add(g * stride + j), s);
            }
        }
    }

    /// Scores of block `b` of int8 keys for each query head of the group,
    /// eight positions at a time: `madd` sums the products of the 16-bit
    /// queries and the keys widened to 16 bits two a lane, and each
    /// position's sum is scaled once by both rows' steps (positions past
    /// the block's are scratch that later ones overwrite).
    #[inline(always)]
    unsafe fn int8_scores(
        w: &Work,
        b: usize,
        q: &Rounded,
        ints: &mut IntRows,
        scores: &mut [f32],
        stride: usize,
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let d = w.kv.layout.head_dim;
        let n = widen_int8::<false>(w, w.kv.k, b, 8, &mut ints.wide, &mut ints.steps);
        let (keys, steps) = (&ints.wide, &ints.steps);
        let pos = b * w.kv.layout.block_size - w.base();
        for (g, qs) in q.q16.chunks_exact(d).enumerate() {
            let factor = _mm256_set1_ps(q.steps[g] * w.scoring.scale);
            for j in (0..n).step_by(8) {
                let keys = keys[j * d..][..8 * d].as_ptr() as *const __m256i;
                let mut acc = [_mm256_setzero_si256(); 8];
                for c in 0..d / 16 {
                    let qv = _mm256_loadu_si256(qs[16 * c..].as_ptr() as *const __m256i);
                    for (t, acc) in acc.iter_mut().enumerate() {
                        let k = _mm256_loadu_si256(keys.add(8 * c + t));
                        *acc = madd(*acc, k, qv);
                    }
                }
                let s = _mm256_mul_ps(_mm256_cvtepi32_ps(int_sums(acc)), factor);
                let s = _mm256_mul_ps(s, _mm256_loadu_ps(steps[j..][..8].as_ptr()));
                _mm256_storeu_ps(scores[g * stride + pos + j..][..8].as_mut_ptr(), s);
            }
        }
    }

    /// `out += Σⱼ p[j]·v[j]` over block `b` of int8 values, for each query
    /// head of the group (`p` its scores from the block's first position,
    /// rows `stride` apart). Each head's weights `p[j]·step[j]` are rounded
    /// to 16 bits against their largest, the values widened to 16 bits with
    /// each two positions' values of a dim side by side, and `madd` sums
    /// two positions a lane; the sums are scaled once per block.
    #[inline(always)]
    unsafe fn int8_weigh(
        w: &Work,
        b: usize,
        p: &[f32],
        stride: usize,
        ints: &mut IntRows,
        out: &mut [f32],
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let d = w.kv.layout.head_dim;
        let IntRows {
            wide,
            steps: row_steps,
            weights,
            rounded,
        } = ints;
        // Sixteen weights a pass below.
        let n = widen_int8::<true>(w, w.kv.v, b, 16, wide, row_steps);
        let (len, pairs) = (row_steps.len(), n.div_ceil(2));
        weights.resize(len, 0.0);
        rounded.resize(len / 2, 0);
        let lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        for (g, o) in out.chunks_exact_mut(d).enumerate() {
            let p = &p[g * stride..];
            let mut top = _mm256_setzero_ps();
            for j in (0..len).step_by(8) {
                let wv = if j < n {
                    let live = _mm256_cmpgt_epi32(_mm256_set1_epi32((n - j) as i32), lanes);
                    let v = _mm256_loadu_ps(p[j..][..8].as_ptr());
                    let v = _mm256_mul_ps(v, _mm256_loadu_ps(row_steps[j..][..8].as_ptr()));
                    _mm256_and_ps(v, _mm256_castsi256_ps(live))
                } else {
                    _mm256_setzero_ps()
                };
                _mm256_storeu_ps(weights[j..][..8].as_mut_ptr(), wv);
                top = _mm256_max_ps(top, wv);
            }
            let top = max_lane(top);
            if top == 0.0 {
                continue;
            }
            let up = _mm256_set1_ps(32767.0 / top);
            for (v, out) in weights.chunks_exact(16).zip(rounded.chunks_exact_mut(8)) {
                _mm256_storeu_si256(out.as_mut_ptr() as *mut __m256i, round16(v, up));
            }
            let step = top / 32767.0;
            let mut i = 0;
            while i + 64 <= d {
                weigh_pairs::<8>(&rounded[..pairs], wide, d, i, step, o, &madd);
                i += 64;
            }
            while i < d {
                weigh_pairs::<1>(&rounded[..pairs], wide, d, i, step, o, &madd);
                i += 8;
            }
        }
    }

    /// `o[i..i + 8W] += step · Σ pairs`: each pair of rounded weights is
    /// broadcast once for the `W` vectors of pairs of values it multiplies.
    #[inline(always)]
    unsafe fn weigh_pairs<const W: usize>(
        weights: &[i32],
        wide: &[i16],
        d: usize,
        i: usize,
        step: f32,
        o: &mut [f32],
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let mut acc = [_mm256_setzero_si256(); W];
        for (pair, &w) in weights.iter().enumerate() {
            let w = _mm256_set1_epi32(w);
            let v = wide.as_ptr().add(2 * (pair * d + i)) as *const __m256i;
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = madd(*acc, _mm256_loadu_si256(v.add(c)), w);
            }
        }
        let step = _mm256_set1_ps(step);
        for (c, acc) in acc.iter().enumerate() {
            let o = o.as_mut_ptr().add(i + 8 * c);
            let sum = _mm256_cvtepi32_ps(*acc);
            _mm256_storeu_ps(o, _mm256_fmadd_ps(sum, step, _mm256_loadu_ps(o)));
        }
    }

    /// Attention with `madd`, the instruction set's sum of two 16-bit
    /// products a lane, for int8 pools.
    #[inline(always)]
    unsafe fn attend(
        w: Work,
        scratch: &mut Scratch,
        out: &mut [f32],
        madd: impl Fn(__m256i, __m256i, __m256i) -> __m256i,
    ) {
        let (d, span, bs) = (w.kv.layout.head_dim, w.span(), w.kv.layout.block_size);
        let (group, base) = (w.q.len() / d, w.base());
        let blocks = w.blocks();
        let Scratch {
            scores,
            rows,
            stats,
            queries: rounded,
            ints,
        } = scratch;
        // Rows of scores have room for a last group of eight past `ctx`.
        let stride = span + 8;
        scores.clear();
        scores.resize(group * stride, 0.0);
        rows.resize((bs + 8) * d, 0.0);
        if super::integer_rows(w.kv.k, w.kv.layout) {
            round_queries(w.q, d, rounded);
            for b in blocks.clone() {
                int8_scores(&w, b, rounded, ints, scores, stride, &madd);
            }
        } else {
            for b in blocks.clone() {
                f32_scores(&w, b, rows, scores, stride);
            }
        }
        w.finish_scores(scores, stride);
        softmax(scores, stride, span, stats, |row, max| exp_row(row, max));
        out.fill(0.0);
        if super::integer_rows(w.kv.v, w.kv.layout) {
            for b in blocks {
                int8_weigh(&w, b, &scores[b * bs - base..], stride, ints, out, &madd);
            }
            return;
        }
        for b in blocks {
            let n = block(&w, w.kv.v, b, rows);
            let pos = b * bs - base;
            for (g, o) in out.chunks_exact_mut(d).enumerate() {
                let p = &scores[g * stride + pos..][..n];
                // Up to eight vectors of the output row stay in registers
                // while the block's positions are summed into them.
                let mut i = 0;
                while i + 64 <= d {
                    weigh::<8>(p, rows, d, i, o);
                    i += 64;
                }
                while i < d {
                    weigh::<1>(p, rows, d, i, o);
                    i += 8;
                }
            }
        }
    }

    /// `o[i..i + 8W] += Σⱼ p[j] · rows[j·d + i..][..8W]`: each weight is
    /// broadcast once for the `W` vectors it multiplies.
    #[inline(always)]
    unsafe fn weigh<const W: usize>(p: &[f32], rows: &[f32], d: usize, i: usize, o: &mut [f32]) {
        let mut acc = [_mm256_setzero_ps(); W];
        for (c, acc) in acc.iter_mut().enumerate() {
            *acc = _mm256_loadu_ps(o.as_ptr().add(i + 8 * c));
        }
        for (j, &p) in p.iter().enumerate() {
            let p = _mm256_set1_ps(p);
            let v = rows.as_ptr().add(j * d + i);
            for (c, acc) in acc.iter_mut().enumerate() {
                *acc = _mm256_fmadd_ps(p, _mm256_loadu_ps(v.add(8 * c)), *acc);
            }
        }
        for (c, acc) in acc.iter().enumerate() {
            _mm256_storeu_ps(o.as_mut_ptr().add(i + 8 * c), *acc);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo_random;

    /// Textbook dense causal attention over one sequence's contiguous K and V
    /// (`[ctx, kv_heads, d]`), in f64, with a mask for the window.
    #[allow(clippy::too_many_arguments)]
    fn dense(
        q: &[f32],
        heads: usize,
        k: &[f32],
        v: &[f32],
        kv_heads: usize,
        d: usize,
        start_pos: usize,
        scoring: Scoring,
    ) -> Vec<f32> {
        let len = q.len() / (heads * d);
        let mut out = vec![0f32; q.len()];
        for i in 0..len {
            let ctx = start_pos + i + 1;
            let visible = |j: usize| scoring.window.is_none_or(|w| ctx - j <= w);
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qh = &q[(i * heads + h) * d..][..d];
                let s: Vec<f64> = (0..ctx)
                    .map(|j| {
                        let kj = &k[(j * kv_heads + kvh) * d..][..d];
                        let s = qh
                            .iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scoring.scale as f64;
                        let s = scoring
                            .softcap
                            .map_or(s, |c| c as f64 * (s / c as f64).tanh());
                        if visible(j) {
                            s
                        } else {
                            f64::NEG_INFINITY
                        }
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let sum: f64 = e.iter().sum();
                for c in 0..d {
                    let acc: f64 = (0..ctx)
                        .map(|j| e[j] / sum * v[(j * kv_heads + kvh) * d + c] as f64)
                        .sum();
                    out[(i * heads + h) * d + c] = acc as f32;
                }
            }
        }
        out
    }

    /// Each row of `d` values as an int8 pool stores it (the rounding
    /// itself is held to half a step by `int8_rows_round_to_half_a_step`).
    fn int8_round_trip(x: &[f32], d: usize) -> Vec<f32> {
        let mut q = vec![0i8; d];
        x.chunks_exact(d)
            .flat_map(|row| {
                let step = quantize_row(row, &mut q);
                q.iter().map(|&q| q as f32 * step).collect::<Vec<_>>()
            })
            .collect()
    }

    /// The rounding of int8 rows is `f32::round`'s (half away from zero),
    /// at the halves, beside them and at the ends of the range.
    #[test]
    fn rows_round_as_f32_round() {
        let mut xs: Vec<f32> = (-255..=255).map(|h| h as f32 / 2.0).collect();
        for &x in &xs.clone() {
            xs.extend([x.next_up(), x.next_down()]);
        }
        xs.extend(pseudo_random(1000, 3).iter().map(|v| v * 127.0));
        for x in xs.into_iter().filter(|x| x.abs() <= 127.0) {
            assert_eq!(round(x), x.round() as i8, "{x}");
        }
    }

    /// An int8 row is within half a step of what was written, its largest
    /// magnitude exact; a row of zeros reads back as zeros; copy-on-write
    /// carries the rows' scales with them.
    #[test]
    fn int8_rows_round_to_half_a_step() {
        let layout = KvLayout {
            block_size: 2,
            kv_heads: 1,
            head_dim: 8,
        };
        let mut pool = Pool::zeros(KvDtype::Int8, layout, 4 * layout.block_len());
        let mut x = pseudo_random(3 * 8, 5);
        x[8..16].fill(0.0);
        x[19] = -3.5;
        layout.write(&mut pool, &[2, 0], 0, &x);
        let mut back = vec![0f32; 16];
        pool.widen_portable(2 * 16, &mut back, 8);
        let mut third = vec![0f32; 8];
        pool.widen_portable(0, &mut third, 8);
        back.extend(third);
        for (row, got) in x.chunks_exact(8).zip(back.chunks_exact(8)) {
            let max = row.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (a, b) in row.iter().zip(got) {
                assert!(
                    (a - b).abs() <= max / 254.0 * 1.0001,
                    "{a} read back as {b}"
                );
            }
        }
        assert_eq!(back[19], -3.5);
        assert!(back[8..16].iter().all(|&v| v == 0.0));
        pool.copy_within(0..16, 3 * 16, 8);
        let mut copied = vec![0f32; 8];
        pool.widen_portable(3 * 16, &mut copied, 8);
        assert_eq!(copied, back[16..24]);
    }

    /// Sequences of odd lengths whose blocks are scattered through the pool,
    /// some decoding one token, some prefilling a chunk after cached tokens,
    /// on every instruction set the CPU has (SIMD where the head size allows it).
    #[test]
    fn equals_dense_attention() {
        equals_dense(|d| Scoring::scaled(1.0 / (d as f32).sqrt()));
    }

    /// A window shorter than, equal to, or across block edges of the
    /// context, with soft-capped scores: masked positions carry no weight.
    #[test]
    fn windowed_and_softcapped_equal_dense_attention() {
        for window in [1, 3, 6, 11] {
            equals_dense(|d| Scoring {
                scale: 1.0 / (d as f32).sqrt(),
                window: Some(window),
                softcap: Some(1.5),
            });
        }
    }

    /// A row's output has the same bits whether its sequence is attended
    /// alone or batched with others (prefill chunks, decode rows, a context
    /// attended in pieces), on every pool and instruction set: the integer
    /// paths round per row and per block, never across the batch.
    #[test]
    fn a_rows_output_does_not_depend_on_its_batch() {
        let (heads, d) = (9, 64);
        let layout = KvLayout {
            block_size: 16,
            kv_heads: 3,
            head_dim: d,
        };
        // (cached tokens, new tokens)
        let shapes = [(0, 7), (13, 1), (PIECE_POSITIONS + 300, 1), (40, 9)];
        let mut next = 0u32;
        let tables: Vec<Vec<u32>> = shapes
            .iter()
            .map(|(c, n)| {
                let blocks = (c + n).div_ceil(layout.block_size) as u32;
                next += blocks;
                (next - blocks..next).collect()
            })
            .collect();
        let len = next as usize * layout.block_len();
        let scoring = Scoring::scaled(0.125);
        for dtype in [KvDtype::F16, KvDtype::F32, KvDtype::Int8] {
            let (mut k, mut v) = (
                Pool::zeros(dtype, layout, len),
                Pool::zeros(dtype, layout, len),
            );
            let mut q = Vec::new();
            let mut seqs = Vec::new();
            for (i, (&(cached, new), table)) in shapes.iter().zip(&tables).enumerate() {
                let ctx = (cached + new) * layout.kv_heads * d;
                layout.write(&mut k, table, 0, &pseudo_random(ctx, 10 * i as u32));
                layout.write(&mut v, table, 0, &pseudo_random(ctx, 10 * i as u32 + 1));
                let offset = q.len() / (heads * d);
                q.extend(pseudo_random(new * heads * d, 10 * i as u32 + 2));
                seqs.push(SeqQueries {
                    offset,
                    len: new,
                    start_pos: cached,
                    block_table: table,
                });
            }
            let kv = LayerKv {
                k: &k,
                v: &v,
                layout,
            };
            for isa in Isa::available() {
                let mut batched = vec![0f32; q.len()];
                paged_attention(isa, &q, heads, &seqs, kv, scoring, &mut batched);
                for s in &seqs {
                    let rows = s.offset * heads * d..(s.offset + s.len) * heads * d;
                    let mut alone = vec![0f32; rows.len()];
                    let seq = SeqQueries { offset: 0, ..*s };
                    paged_attention(
                        isa,
                        &q[rows.clone()],
                        heads,
                        &[seq],
                        kv,
                        scoring,
                        &mut alone,
                    );
                    assert!(
                        alone
                            .iter()
                            .zip(&batched[rows])
                            .all(|(a, b)| a.to_bits() == b.to_bits()),
                        "{dtype:?}, {isa:?}: the sequence at row {} changes with its batch",
                        s.offset
                    );
                }
            }
        }
    }

    fn equals_dense(scoring_for: impl Fn(usize) -> Scoring) {
        for (case, &(heads, kv_heads, d, block_size)) in [
            (4, 2, 16, 4),
            (9, 3, 64, 16),
            (2, 2, 8, 1),
            (6, 1, 12, 5),
            (4, 2, 32, 5),
            (2, 1, 40, 16),
        ]
        .iter()
        .enumerate()
        {
            let layout = KvLayout {
                block_size,
                kv_heads,
                head_dim: d,
            };
            // (cached tokens, new tokens)
            // The last two run past PIECE_POSITIONS: attended in pieces.
            let shapes = [
                (0, 7),
                (13, 1),
                (block_size * 2, block_size),
                (3, 1),
                (0, 1),
                (1100, 1),
                (PIECE_POSITIONS * 2 - 3, 5),
            ];
            let total_blocks: usize = shapes
                .iter()
                .map(|(c, n)| (c + n).div_ceil(block_size))
                .sum();
            let num_blocks = total_blocks + 3;
            let len = num_blocks * layout.block_len();
            // Unwritten cells are NaN (an int8 row's scale), so reading one shows.
            let nan = [
                Pool::F16(vec![f16::NAN; len]),
                Pool::F32(vec![f32::NAN; len]),
                Pool::Int8 {
                    values: vec![0; len],
                    scales: vec![f32::NAN; len / d],
                },
            ];
            let (mut k_pools, mut v_pools) = (nan.clone(), nan);
            // Hand out blocks in a scrambled order.
            let mut free: Vec<u32> = (0..num_blocks as u32).rev().collect();
            free.swap(0, num_blocks / 2);
            let mut q_all = Vec::new();
            // Per pool: f16 and f32 hold the values exactly; int8 holds them
            // rounded, and dense attention over the rounded values is its answer.
            let mut expected = [Vec::new(), Vec::new(), Vec::new()];
            let mut tables = Vec::new();
            for (i, &(cached, new)) in shapes.iter().enumerate() {
                let ctx = cached + new;
                let seed = (case * 100 + i) as u32;
                // Values f16 holds exactly, so both kinds of pool store them as they are.
                let f16s = |v: Vec<f32>| v.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
                let k: Vec<f32> = f16s(pseudo_random(ctx * kv_heads * d, seed));
                let v: Vec<f32> = f16s(pseudo_random(ctx * kv_heads * d, seed + 7));
                let q = pseudo_random(new * heads * d, seed + 13);
                let table: Vec<u32> = (0..ctx.div_ceil(block_size))
                    .map(|_| free.pop().unwrap())
                    .collect();
                for (kp, vp) in k_pools.iter_mut().zip(&mut v_pools) {
                    layout.write(kp, &table, 0, &k);
                    layout.write(vp, &table, 0, &v);
                }
                let scoring = scoring_for(d);
                let exact = dense(&q, heads, &k, &v, kv_heads, d, cached, scoring);
                let (k8, v8) = (int8_round_trip(&k, d), int8_round_trip(&v, d));
                expected[0].extend(&exact);
                expected[1].extend(exact);
                expected[2].extend(dense(&q, heads, &k8, &v8, kv_heads, d, cached, scoring));
                q_all.extend(q);
                tables.push(table);
            }
            let mut offset = 0;
            let seqs: Vec<SeqQueries> = shapes
                .iter()
                .zip(&tables)
                .map(|(&(cached, new), table)| {
                    let s = SeqQueries {
                        offset,
                        len: new,
                        start_pos: cached,
                        block_table: table,
                    };
                    offset += new;
                    s
                })
                .collect();
            let mut out = vec![0f32; q_all.len()];
            let scoring = scoring_for(d);
            for ((k, v), expected) in k_pools.iter().zip(&v_pools).zip(&expected) {
                let kv = LayerKv { k, v, layout };
                for isa in Isa::available() {
                    paged_attention(isa, &q_all, heads, &seqs, kv, scoring, &mut out);
                    let diff = out
                        .iter()
                        .zip(expected)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0f32, f32::max);
                    // The integer paths over int8 rows round to 16 bits
                    // against the largest: each query (a score moves by at
                    // most d half-steps of the largest |q| times the largest
                    // |k|, times the scale, and an output by twice that times
                    // the largest |v|), and each block's weights (a block is
                    // off by block_size half-steps of its largest
                    // probability times the largest |v|, and the blocks'
                    // largest probabilities sum to at most 1). All of q, k
                    // and v are within 1 here.
                    let rounding = match isa {
                        Isa::Vnni | Isa::Avx2 if integer_rows(k, layout) => {
                            (d as f32 * scoring.scale + block_size as f32 / 2.0) / 32767.0
                        }
                        _ => 0.0,
                    };
                    assert!(
                        diff < 1e-5 + rounding,
                        "case {case}, {scoring:?}, {:?}, {isa:?}: max |Δ| = {diff}",
                        k.dtype()
                    );
                }
            }
        }
    }
}
