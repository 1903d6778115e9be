//! Dot products of one packed weight row (two on VNNI from eight activation
//! rows) with up to four rows of quantized activations, with three code
//! paths (AVX-512 VNNI, AVX2, portable) that give the same bits: per group
//! each lane sums its block exactly in integers, then every path scales and
//! accumulates the eight lanes with the same fused multiply-adds and folds
//! them the same way.
use super::{Group, Layout, QuantMatrix, LANES, STEP};

/// The instruction sets a dot product can use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2, FMA and F16C plus AVX-512 VNNI on 256-bit registers.
    Vnni,
    Avx2,
    Portable,
}

impl Isa {
    /// The best this CPU has, or the lower path `SWITCHYARD_ISA` names
    /// (`avx512vnni`, `avx2` or `portable`), so that one machine can measure
    /// and test the paths of machines with fewer instructions.
    pub fn detect() -> Isa {
        use std::sync::OnceLock;
        static ISA: OnceLock<Isa> = OnceLock::new();
        *ISA.get_or_init(|| {
            let hardware = Isa::hardware();
            match std::env::var("SWITCHYARD_ISA").ok().as_deref() {
                None | Some("") => hardware,
                Some(name) => match Isa::parse(name) {
                    // A path can only be lowered: the CPU must have it.
                    Some(forced) if forced.rank() >= hardware.rank() => forced,
                    Some(_) => {
                        eprintln!("SWITCHYARD_ISA={name}: this CPU lacks it; using {hardware:?}");
                        hardware
                    }
                    None => {
                        eprintln!("SWITCHYARD_ISA={name}: expected avx512vnni, avx2 or portable; using {hardware:?}");
                        hardware
                    }
                },
            }
        })
    }

    fn parse(name: &str) -> Option<Isa> {
        match name.to_ascii_lowercase().as_str() {
            "avx512vnni" | "vnni" => Some(Isa::Vnni),
            "avx2" => Some(Isa::Avx2),
            "portable" => Some(Isa::Portable),
            _ => None,
        }
    }

    /// 0 for the best path.
    fn rank(self) -> u8 {
        self as u8
    }

    fn hardware() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            let avx2 = is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
                && is_x86_feature_detected!("f16c");
            let vnni =
                is_x86_feature_detected!("avx512vnni") && is_x86_feature_detected!("avx512vl");
            match (avx2, vnni) {
                (true, true) => Isa::Vnni,
                (true, false) => Isa::Avx2,
                _ => Isa::Portable,
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        Isa::Portable
    }

    /// Every path this CPU can run (for tests that compare them).
    pub fn available() -> Vec<Isa> {
        let best = Isa::detect();
        [Isa::Vnni, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|&i| match best {
                Isa::Vnni => true,
                Isa::Avx2 => i != Isa::Vnni,
                Isa::Portable => i == Isa::Portable,
            })
            .collect()
    }
}

/// One packed weight row: its codes, and per group `d[8]` then `m[8]`.
pub struct WeightRow<'a> {
    pub layout: &'a Layout,
    pub codes: &'a [u8],
    pub scales: &'a [f32],
}

/// One row of activations: bytes in the layout's order, and per lane `d`,
/// `s` and the integer sum of its bytes.
#[derive(Clone, Copy)]
pub struct ActRow<'a> {
    pub qs: &'a [i8],
    pub d: &'a [f32],
    pub s: &'a [f32],
    pub sums: &'a [i32],
}

/// Whether `w` and `a` have the lengths the SIMD loops rely on.
fn fits(w: &WeightRow, a: &ActRow) -> bool {
    let (k, lanes) = (w.layout.k, w.layout.lanes());
    w.codes.len() == w.layout.code_bytes
        && w.scales.len() == 2 * lanes
        && a.qs.len() == k
        && a.d.len() == lanes
        && a.s.len() == lanes
        && a.sums.len() == lanes
}

/// `out(r, c, Σ w_c·a_r)` for every column `c` in `cols` (row `c` of `m`)
/// and every row `r` of `acts`.
pub fn columns(
    isa: Isa,
    m: &QuantMatrix,
    cols: std::ops::Range<usize>,
    acts: &[ActRow],
    out: impl FnMut(usize, usize, f32),
) {
    // Every row of a matrix has the first one's lengths (`QuantMatrix::row`).
    if let Some(c) = cols.clone().next() {
        let w = m.row(c);
        assert!(
            acts.iter().all(|a| fits(&w, a)),
            "weight rows and activations of other layouts"
        );
    }
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` found these features on this CPU; lengths checked.
        Isa::Vnni => unsafe { x86::columns_vnni(m, cols, acts, out) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::columns_avx2(m, cols, acts, out) },
        _ => {
            let mut out = out;
            for c in cols {
                let w = m.row(c);
                for (r, a) in acts.iter().enumerate() {
                    out(r, c, dot_portable(&w, a));
                }
            }
        }
    }
}

/// Folds eight lanes as the SIMD paths do: halves, then pairs, then the last two.
fn fold(v: [f32; 8]) -> f32 {
    let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

fn dot_portable(w: &WeightRow, a: &ActRow) -> f32 {
    let (mut acc, mut macc) = ([0f32; LANES], [0f32; LANES]);
    for (gi, g) in w.layout.groups.iter().enumerate() {
        let mut sum = [0i32; LANES];
        for s in 0..g.steps() {
            for b in 0..STEP {
                let (at, shift) = w.layout.code_at(g, s, b);
                let code = (w.codes[at] >> shift) & if w.layout.nibbles { 0x0F } else { 0xFF };
                sum[b / 4] += code as i32 * a.qs[g.start + s * STEP + b] as i32;
            }
        }
        let (d, m) = (
            &w.scales[2 * gi * LANES..],
            &w.scales[(2 * gi + 1) * LANES..],
        );
        for l in 0..LANES {
            let at = gi * LANES + l;
            acc[l] = (sum[l] as f32).mul_add(d[l] * a.d[at], acc[l]);
            macc[l] = m[l].mul_add(a.s[at], macc[l]);
        }
    }
    fold(acc) + fold(macc)
}

/// The step pairs of a group: bytes `[c·64, c·64 + 64)` of its activations.
fn pairs(g: &Group) -> usize {
    g.steps().div_ceil(2)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{pairs, ActRow, Layout, QuantMatrix, WeightRow, LANES, STEP};
    use crate::quant::QK;
    use std::arch::x86_64::*;
    use std::ops::Range;

    #[inline(always)]
    unsafe fn fold(v: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let y = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps(y, y, 1)))
    }

    /// `fold` of each of the first `n` vectors of `v`: the same additions on
    /// the same operands, so the same bits. From four vectors they run side
    /// by side, halves of two vectors and then pairs of four added in one
    /// instruction, in under half the instructions of one `fold` each.
    #[inline(always)]
    unsafe fn folds(v: [__m256; 8], n: usize) -> [f32; 8] {
        if n < 4 {
            return std::array::from_fn(|j| if j < n { fold(v[j]) } else { 0.0 });
        }
        // [a0 + a4, .., a3 + a7 | b0 + b4, .., b3 + b7]
        let halves = |a, b| {
            let lo = _mm256_permute2f128_ps::<0x20>(a, b);
            _mm256_add_ps(lo, _mm256_permute2f128_ps::<0x31>(a, b))
        };
        // [x0 + x2, x1 + x3, y0 + y2, y1 + y3] in each half, for x of the
        // first and y of the second.
        let pairs = |x, y| {
            let even = _mm256_shuffle_ps::<0x44>(x, y);
            _mm256_add_ps(even, _mm256_shuffle_ps::<0xEE>(x, y))
        };
        let low = pairs(halves(v[0], v[1]), halves(v[2], v[3]));
        let high = if n > 4 {
            pairs(halves(v[4], v[5]), halves(v[6], v[7]))
        } else {
            low
        };
        // (x0 + x2) + (x1 + x3): vectors 0, 2, 4, 6 in the low half, the
        // odd ones in the high half.
        let sums = _mm256_add_ps(
            _mm256_shuffle_ps::<0x88>(low, high),
            _mm256_shuffle_ps::<0xDD>(low, high),
        );
        let mut lanes = [0f32; 8];
        _mm256_storeu_ps(lanes.as_mut_ptr(), sums);
        std::array::from_fn(|j| lanes[j % 2 * 4 + j / 2])
    }

    /// How a path multiplies codes and activations: `madd(acc, codes, x)`
    /// adds the products of 32 codes and 32 activations to an accumulator.
    /// Each (weight, activation) row pair has one or two accumulators; with
    /// two, they take the even or the odd steps of one group. `split` asks
    /// for two always (AVX2's 16-bit sums hold only a few steps). `finish`
    /// turns them (and the lane sums of the activation row there) into eight
    /// integer lanes, each the sum of its lane's code·activation products:
    /// the same integers with one accumulator or two.
    #[derive(Clone, Copy)]
    struct Path<M, F> {
        madd: M,
        finish: F,
        split: bool,
    }

    /// The shared loop over `C` weight rows of one layout and `R` activation
    /// rows. A result does not depend on `C` or `R`: each pair's operations
    /// are the same whichever rows it is computed with.
    #[inline(always)]
    unsafe fn dot_with<const C: usize, const R: usize, M, F>(
        w: &[WeightRow; C],
        a: &[ActRow; R],
        Path {
            madd,
            finish,
            split,
        }: Path<M, F>,
    ) -> [[f32; R]; C]
    where
        M: Fn(__m256i, __m256i, __m256i) -> __m256i,
        F: Fn([__m256i; 2], *const i32) -> __m256i,
    {
        const { assert!(C * R <= 8, "`folds` takes at most eight accumulators") };
        // The odd steps take a second accumulator (index 1) where the path
        // needs it, or where fewer than eight row pairs would leave each
        // multiply-add waiting on the one before it (its latency is four of
        // them); otherwise they share the even steps' one.
        let odd_sum = usize::from(split || C * R < 8);
        let zero = _mm256_setzero_ps();
        let mut acc = [[zero; R]; C];
        let layout = w[0].layout;
        let low = _mm256_set1_epi8(0x0F);
        let codes: [*const u8; C] = std::array::from_fn(|c| w[c].codes.as_ptr());
        let xs: [*const u8; R] = std::array::from_fn(|r| a[r].qs.as_ptr() as *const u8);
        let ld = |p: *const u8| _mm256_loadu_si256(p as *const __m256i);
        for (gi, g) in layout.groups.iter().enumerate() {
            let steps = g.steps();
            let mut sum = [[[_mm256_setzero_si256(); 2]; R]; C];
            // One pair of steps: `odd` when the pair has its second step.
            // A macro, not a closure: as a closure called from both loops
            // below it was not inlined, and took 4.4 times the instructions.
            macro_rules! pair {
                ($p:expr, $odd:expr) => {{
                    let (p, odd): (usize, bool) = ($p, $odd);
                    // In bounds: the layout's code and activation lengths were checked.
                    let mut cw = [(_mm256_setzero_si256(), _mm256_setzero_si256()); C];
                    if layout.nibbles {
                        for (cw, codes) in cw.iter_mut().zip(codes) {
                            let v = ld(codes.add(g.codes + p * STEP));
                            let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                            *cw = (_mm256_and_si256(v, low), hi);
                        }
                    } else {
                        for (cw, codes) in cw.iter_mut().zip(codes) {
                            let at = codes.add(g.codes + 2 * p * STEP);
                            cw.0 = ld(at);
                            if odd {
                                cw.1 = ld(at.add(STEP));
                            }
                        }
                    }
                    for r in 0..R {
                        let x = xs[r].add(g.start + 2 * p * STEP);
                        let even = ld(x);
                        for c in 0..C {
                            sum[c][r][0] = madd(sum[c][r][0], cw[c].0, even);
                        }
                        if odd {
                            let next = ld(x.add(STEP));
                            for c in 0..C {
                                let s = &mut sum[c][r][odd_sum];
                                *s = madd(*s, cw[c].1, next);
                            }
                        }
                    }
                }};
            }
            // Whole groups of 32-value lanes, most of every row, run their
            // four pairs unrolled; the rest (shorter lanes) loop.
            if g.lane == QK {
                for p in 0..QK / 8 {
                    pair!(p, true);
                }
            } else {
                for p in 0..pairs(g) {
                    pair!(p, 2 * p + 1 < steps);
                }
            }
            let at = gi * LANES;
            for c in 0..C {
                let d = _mm256_loadu_ps(w[c].scales.as_ptr().add(2 * at));
                for r in 0..R {
                    let p = _mm256_cvtepi32_ps(finish(sum[c][r], a[r].sums.as_ptr().add(at)));
                    let s = _mm256_mul_ps(d, _mm256_loadu_ps(a[r].d.as_ptr().add(at)));
                    acc[c][r] = _mm256_fmadd_ps(p, s, acc[c][r]);
                }
            }
        }
        // The offsets' terms (`m·s` per lane) do not depend on the codes.
        // They are summed after the codes' loop, in the same order, so that
        // their accumulators do not take registers from it: in the loop they
        // pushed the products' accumulators onto the stack at 16 rows.
        let mut macc = [[zero; R]; C];
        for gi in 0..layout.groups.len() {
            let at = gi * LANES;
            for c in 0..C {
                let m = _mm256_loadu_ps(w[c].scales.as_ptr().add(2 * at + LANES));
                for r in 0..R {
                    let x = _mm256_loadu_ps(a[r].s.as_ptr().add(at));
                    macc[c][r] = _mm256_fmadd_ps(m, x, macc[c][r]);
                }
            }
        }
        // Row pair (c, r) at c·R + r; the rest of the eight is unread padding.
        let flat = |v: [[__m256; R]; C]| {
            std::array::from_fn(|j| if j < C * R { v[j / R][j % R] } else { zero })
        };
        let (acc, macc) = (folds(flat(acc), C * R), folds(flat(macc), C * R));
        let mut out = [[0f32; R]; C];
        for c in 0..C {
            for r in 0..R {
                out[c][r] = acc[c * R + r] + macc[c * R + r];
            }
        }
        out
    }

    /// `w`'s 4-bit codes as bytes in `to` (`bytes`, the same groups with a
    /// byte per code): the same integers, without splitting nibbles again
    /// for every pass of activation rows.
    #[inline(always)]
    unsafe fn widen_codes(w: &WeightRow, bytes: &Layout, to: &mut Vec<u8>) {
        to.resize(bytes.code_bytes, 0);
        let low = _mm256_set1_epi8(0x0F);
        for (g, g8) in w.layout.groups.iter().zip(&bytes.groups) {
            let steps = g.steps();
            for c in 0..pairs(g) {
                // In bounds: the row's lengths were checked, `to` sized above.
                let v =
                    _mm256_loadu_si256(w.codes.as_ptr().add(g.codes + c * STEP) as *const __m256i);
                let at = to.as_mut_ptr().add(g8.codes + 2 * c * STEP) as *mut __m256i;
                _mm256_storeu_si256(at, _mm256_and_si256(v, low));
                if 2 * c + 1 < steps {
                    let hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low);
                    _mm256_storeu_si256(at.add(1), hi);
                }
            }
        }
    }

    /// Hands `vs` (rows `r..r + R` of columns `cols`) to `out`.
    #[inline(always)]
    fn emit<const C: usize, const R: usize>(
        out: &mut impl FnMut(usize, usize, f32),
        r: usize,
        cols: [usize; C],
        vs: [[f32; R]; C],
    ) {
        for (c, v) in cols.into_iter().zip(vs) {
            for (i, v) in v.into_iter().enumerate() {
                out(r + i, c, v);
            }
        }
    }

    /// `C` weight rows against every activation row, four at a time, then
    /// the rest.
    #[inline(always)]
    unsafe fn rows_with<const C: usize>(
        w: &[WeightRow; C],
        cols: [usize; C],
        acts: &[ActRow],
        out: &mut impl FnMut(usize, usize, f32),
        path: Path<
            impl Fn(__m256i, __m256i, __m256i) -> __m256i + Copy,
            impl Fn([__m256i; 2], *const i32) -> __m256i + Copy,
        >,
    ) {
        let mut chunks = acts.chunks_exact(4);
        let mut r = 0;
        for a in &mut chunks {
            let a: &[ActRow; 4] = a.try_into().expect("four rows");
            emit(out, r, cols, dot_with(w, a, path));
            r += 4;
        }
        let rest = chunks.remainder();
        match rest.len() {
            1 => emit(
                out,
                r,
                cols,
                dot_with::<C, 1, _, _>(w, rest.try_into().expect("one row"), path),
            ),
            2 => emit(
                out,
                r,
                cols,
                dot_with::<C, 2, _, _>(w, rest.try_into().expect("two rows"), path),
            ),
            3 => emit(
                out,
                r,
                cols,
                dot_with::<C, 3, _, _>(w, rest.try_into().expect("three rows"), path),
            ),
            _ => {}
        }
    }

    /// Every column, `C` weight rows at a time (each activation load then
    /// feeds `C` multiply-adds), the last odd ones one by one. With more
    /// than four passes of activation rows, 4-bit rows are widened to bytes
    /// first.
    #[inline(always)]
    unsafe fn columns_with<const C: usize>(
        m: &QuantMatrix,
        cols: Range<usize>,
        acts: &[ActRow],
        mut out: impl FnMut(usize, usize, f32),
        path: Path<
            impl Fn(__m256i, __m256i, __m256i) -> __m256i + Copy,
            impl Fn([__m256i; 2], *const i32) -> __m256i + Copy,
        >,
    ) {
        let mut wide: [Vec<u8>; C] = std::array::from_fn(|_| Vec::new());
        // Measured: widening pays from about five passes (prefill chunks),
        // not at four (a batch of 16 decode rows).
        let bytes = m.bytes_layout.as_ref().filter(|_| acts.len() > 16);
        let mut at = cols.start;
        while at < cols.end {
            let n = if at + C <= cols.end { C } else { 1 };
            if let Some(bytes) = bytes {
                for (i, to) in wide[..n].iter_mut().enumerate() {
                    widen_codes(&m.row(at + i), bytes, to);
                }
            }
            let row = |i: usize| {
                let w = m.row(at + i);
                match bytes {
                    Some(bytes) => WeightRow {
                        layout: bytes,
                        codes: &wide[i],
                        scales: w.scales,
                    },
                    None => w,
                }
            };
            if n == C {
                let w: [WeightRow; C] = std::array::from_fn(row);
                rows_with(&w, std::array::from_fn(|i| at + i), acts, &mut out, path);
            } else {
                rows_with(&[row(0)], [at], acts, &mut out, path);
            }
            at += n;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn columns_vnni(
        m: &QuantMatrix,
        cols: Range<usize>,
        acts: &[ActRow],
        out: impl FnMut(usize, usize, f32),
    ) {
        // 32-bit sums: one accumulator can take every step.
        let path = Path {
            madd: |acc, c, x| _mm256_dpbusd_epi32(acc, c, x),
            finish: |[even, odd]: [__m256i; 2], _| _mm256_add_epi32(even, odd),
            split: false,
        };
        // Two weight rows per pass halve the activation loads, which pays
        // where the products are the work (eight rows or more). With fewer
        // rows the weights' memory traffic is the work, and two rows read
        // side by side streamed slower (measured: Q8_0 at one row, 0.5×).
        if acts.len() >= 8 {
            columns_with::<2>(m, cols, acts, out, path)
        } else {
            columns_with::<1>(m, cols, acts, out, path)
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn columns_avx2(
        m: &QuantMatrix,
        cols: Range<usize>,
        acts: &[ActRow],
        out: impl FnMut(usize, usize, f32),
    ) {
        let ones = _mm256_set1_epi16(1);
        let widen = move |v| _mm256_madd_epi16(v, ones);
        if m.ty.wide() {
            // `maddubs` would saturate on codes above 127: they are taken as
            // signed bytes `c - 128` instead, whose magnitudes (at most 128)
            // multiply the activations with the codes' signs (|x| ≤ 127) in
            // pairs below 32,767; the group's end adds back 128·Σx, exactly.
            let flip = _mm256_set1_epi8(-128);
            columns_with::<1>(
                m,
                cols,
                acts,
                out,
                Path {
                    madd: move |acc, c, x| {
                        let c = _mm256_xor_si256(c, flip);
                        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(c), _mm256_sign_epi8(x, c));
                        _mm256_add_epi32(acc, widen(p))
                    },
                    finish: |[even, odd]: [__m256i; 2], sums| {
                        let offset =
                            _mm256_slli_epi32(_mm256_loadu_si256(sums as *const __m256i), 7);
                        _mm256_add_epi32(_mm256_add_epi32(even, odd), offset)
                    },
                    // Widened at every step to 32 bits.
                    split: false,
                },
            )
        } else {
            // Narrow codes sum in 16 bits until the group ends: an
            // accumulator takes at most four steps of two products each, and
            // |code · x| ≤ 31 · 127 (or two steps with 6-bit codes in Q6_K's
            // groups of four), so no sum passes 32,767 and the widening
            // gives exactly the 32-bit sums.
            columns_with::<1>(
                m,
                cols,
                acts,
                out,
                Path {
                    madd: |acc, c, x| _mm256_add_epi16(acc, _mm256_maddubs_epi16(c, x)),
                    finish: move |[even, odd]: [__m256i; 2], _| {
                        _mm256_add_epi32(widen(even), widen(odd))
                    },
                    split: true,
                },
            )
        }
    }
}
