//! Causal attention that reads keys and values through per-sequence block tables,
//! for a flattened batch mixing prefill chunks and single decode tokens.
//!
//! Each (query token, KV head) pair is one task computed the same way whatever
//! else is in the batch, so a token's output does not depend on how it was
//! batched or chunked. Dot products and accumulations use AVX2/FMA where the CPU
//! has them, with a portable fallback.
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
    /// Floats of one block (all heads) in one layer's K or V pool.
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
    pub fn write(&self, pool: &mut [f32], table: &[u32], start_pos: usize, x: &[f32]) {
        let d = self.head_dim;
        for (t, token) in x.chunks_exact(self.kv_heads * d).enumerate() {
            for (h, row) in token.chunks_exact(d).enumerate() {
                let o = self.offset(table, start_pos + t, h);
                pool[o..o + d].copy_from_slice(row);
            }
        }
    }
}

/// One layer's key and value pools.
#[derive(Debug, Clone, Copy)]
pub struct LayerKv<'a> {
    pub k: &'a [f32],
    pub v: &'a [f32],
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

/// `out[t, h] = softmax(scale · q[t, h] · Kᵀ) · V` over the keys each query may
/// see, with query head `h` reading KV head `h / (heads / kv_heads)`. `q` and
/// `out` are `[tokens, heads, head_dim]`; the sequences' rows must cover `q`.
pub fn paged_attention(
    q: &[f32],
    heads: usize,
    seqs: &[SeqQueries],
    kv: LayerKv,
    scale: f32,
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
    out.par_chunks_mut(group * d)
        .enumerate()
        .for_each_init(Vec::new, |scores, (task, out)| {
            let (row, kvh) = (task / kv_heads, task % kv_heads);
            let s = &seqs[owner[row]];
            let ctx = s.start_pos + (row - s.offset) + 1;
            let q = &q[(row * heads + kvh * group) * d..][..group * d];
            let keys = Keys {
                table: s.block_table,
                ctx,
                head: kvh,
            };
            attend(Work { q, keys, kv, scale }, scores, out);
        });
}

/// The keys one query sees: positions `0..ctx` of KV head `head`.
#[derive(Clone, Copy)]
struct Keys<'a> {
    table: &'a [u32],
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
    scale: f32,
}

/// Scores over the visible keys, softmax, weighted sum of values.
fn attend(w: Work, scores: &mut Vec<f32>, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if fma() {
        // SAFETY: AVX2 and FMA are present, checked at run time.
        return unsafe { attend_fma(w, scores, out) };
    }
    attend_with(w, scores, out, dot_portable, axpy_portable)
}

/// [`attend`] compiled for AVX2 and FMA, with the vector helpers inlined.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn attend_fma(w: Work, scores: &mut Vec<f32>, out: &mut [f32]) {
    attend_with(
        w,
        scores,
        out,
        |a, b| dot_fma(a, b),
        |a, x, y| axpy_fma(a, x, y),
    )
}

#[inline(always)]
fn attend_with(
    w: Work,
    scores: &mut Vec<f32>,
    out: &mut [f32],
    dot: impl Fn(&[f32], &[f32]) -> f32,
    axpy: impl Fn(f32, &[f32], &mut [f32]),
) {
    let Work { q, keys, kv, scale } = w;
    let Keys {
        table,
        ctx,
        head: kvh,
    } = keys;
    let (layout, k_pool, v_pool) = (kv.layout, kv.k, kv.v);
    let d = layout.head_dim;
    let group = q.len() / d;
    scores.clear();
    scores.resize(group * ctx, 0.0);
    for pos in 0..ctx {
        let k = &k_pool[layout.offset(table, pos, kvh)..][..d];
        for g in 0..group {
            scores[g * ctx + pos] = dot(&q[g * d..(g + 1) * d], k) * scale;
        }
    }
    out.fill(0.0);
    for g in 0..group {
        let row = &mut scores[g * ctx..(g + 1) * ctx];
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for p in row.iter_mut() {
            *p = (*p - max).exp();
            sum += *p;
        }
        row.iter_mut().for_each(|p| *p /= sum);
    }
    // Each value row is read once for every head of the group.
    for pos in 0..ctx {
        let v = &v_pool[layout.offset(table, pos, kvh)..][..d];
        for (g, o) in out.chunks_exact_mut(d).enumerate() {
            axpy(scores[g * ctx + pos], v, o);
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn fma() -> bool {
    use std::sync::OnceLock;
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"))
}

/// Eight partial sums, like the SIMD path, so the compiler can vectorize it.
fn dot_portable(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn dot_fma(a: &[f32], b: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let n = a.len() / 8 * 8;
    let mut acc = _mm256_setzero_ps();
    for i in (0..n).step_by(8) {
        acc = _mm256_fmadd_ps(
            _mm256_loadu_ps(a.as_ptr().add(i)),
            _mm256_loadu_ps(b.as_ptr().add(i)),
            acc,
        );
    }
    let s4 = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    let s1 = _mm_add_ss(s2, _mm_shuffle_ps(s2, s2, 1));
    let tail: f32 = a[n..].iter().zip(&b[n..]).map(|(x, y)| x * y).sum();
    _mm_cvtss_f32(s1) + tail
}

/// `y += alpha · x`.
fn axpy_portable(alpha: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += alpha * x;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
#[inline]
unsafe fn axpy_fma(alpha: f32, x: &[f32], y: &mut [f32]) {
    use std::arch::x86_64::*;
    let n = x.len() / 8 * 8;
    let a = _mm256_set1_ps(alpha);
    for i in (0..n).step_by(8) {
        let py = y.as_mut_ptr().add(i);
        _mm256_storeu_ps(
            py,
            _mm256_fmadd_ps(a, _mm256_loadu_ps(x.as_ptr().add(i)), _mm256_loadu_ps(py)),
        );
    }
    for i in n..x.len() {
        y[i] += alpha * x[i];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo_random;

    /// Textbook dense causal attention over one sequence's contiguous K and V
    /// (`[ctx, kv_heads, d]`), in f64.
    #[allow(clippy::too_many_arguments)]
    fn dense(
        q: &[f32],
        heads: usize,
        k: &[f32],
        v: &[f32],
        kv_heads: usize,
        d: usize,
        start_pos: usize,
        scale: f32,
    ) -> Vec<f32> {
        let len = q.len() / (heads * d);
        let mut out = vec![0f32; q.len()];
        for i in 0..len {
            let ctx = start_pos + i + 1;
            for h in 0..heads {
                let kvh = h / (heads / kv_heads);
                let qh = &q[(i * heads + h) * d..][..d];
                let s: Vec<f64> = (0..ctx)
                    .map(|j| {
                        let kj = &k[(j * kv_heads + kvh) * d..][..d];
                        qh.iter()
                            .zip(kj)
                            .map(|(a, b)| *a as f64 * *b as f64)
                            .sum::<f64>()
                            * scale as f64
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

    /// Sequences of odd lengths whose blocks are scattered through the pool,
    /// some decoding one token, some prefilling a chunk after cached tokens.
    #[test]
    fn equals_dense_attention() {
        for (case, &(heads, kv_heads, d, block_size)) in
            [(4, 2, 16, 4), (9, 3, 64, 16), (2, 2, 8, 1), (6, 1, 12, 5)]
                .iter()
                .enumerate()
        {
            let layout = KvLayout {
                block_size,
                kv_heads,
                head_dim: d,
            };
            // (cached tokens, new tokens)
            let shapes = [
                (0, 7),
                (13, 1),
                (block_size * 2, block_size),
                (3, 1),
                (0, 1),
            ];
            let total_blocks: usize = shapes
                .iter()
                .map(|(c, n)| (c + n).div_ceil(block_size))
                .sum();
            let num_blocks = total_blocks + 3;
            let mut k_pool = vec![f32::NAN; num_blocks * layout.block_len()];
            let mut v_pool = k_pool.clone();
            // Hand out blocks in a scrambled order.
            let mut free: Vec<u32> = (0..num_blocks as u32).rev().collect();
            free.swap(0, num_blocks / 2);
            let mut q_all = Vec::new();
            let mut expected = Vec::new();
            let mut tables = Vec::new();
            for (i, &(cached, new)) in shapes.iter().enumerate() {
                let ctx = cached + new;
                let seed = (case * 100 + i) as u32;
                let k = pseudo_random(ctx * kv_heads * d, seed);
                let v = pseudo_random(ctx * kv_heads * d, seed + 7);
                let q = pseudo_random(new * heads * d, seed + 13);
                let table: Vec<u32> = (0..ctx.div_ceil(block_size))
                    .map(|_| free.pop().unwrap())
                    .collect();
                layout.write(&mut k_pool, &table, 0, &k);
                layout.write(&mut v_pool, &table, 0, &v);
                let scale = 1.0 / (d as f32).sqrt();
                expected.extend(dense(&q, heads, &k, &v, kv_heads, d, cached, scale));
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
            let scale = 1.0 / (d as f32).sqrt();
            let kv = LayerKv {
                k: &k_pool,
                v: &v_pool,
                layout,
            };
            paged_attention(&q_all, heads, &seqs, kv, scale, &mut out);
            let diff = out
                .iter()
                .zip(&expected)
                .map(|(a, b)| (a - b).abs())
                .fold(0f32, f32::max);
            assert!(diff < 1e-5, "case {case}: max |Δ| = {diff}");
        }
    }

    #[test]
    fn simd_and_portable_dot_agree() {
        let a = pseudo_random(67, 1);
        let b = pseudo_random(67, 2);
        let exact: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * *y as f64).sum();
        assert!((dot_portable(&a, &b) as f64 - exact).abs() < 1e-5);
        let mut y1 = pseudo_random(67, 3);
        let mut y2 = y1.clone();
        axpy_portable(0.5, &a, &mut y2);
        #[cfg(target_arch = "x86_64")]
        if fma() {
            // SAFETY: AVX2 and FMA are present; the lengths are equal.
            unsafe {
                assert!((dot_fma(&a, &b) as f64 - exact).abs() < 1e-5);
                axpy_fma(0.5, &a, &mut y1);
            }
        } else {
            axpy_portable(0.5, &a, &mut y1);
        }
        let diff = y1
            .iter()
            .zip(&y2)
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(diff < 1e-6);
    }
}
