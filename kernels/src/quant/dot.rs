//! The dot product of one unpacked weight row with one row of quantized
//! activations, with three code paths (AVX-512 VNNI, AVX2, portable) that give
//! the same bits: each sums the same 4-byte integer lanes, scales and
//! accumulates them in eight float lanes with fused multiply-adds in the same
//! order, and folds the lanes the same way.
use super::{ActRow, QuantType, WeightRow, GROUP, HALVES_PER_GROUP, QK};

/// Independent accumulators, so that consecutive blocks' multiply-adds do not
/// wait on each other.
const ACCS: usize = 4;

/// The instruction sets a dot product can use, best first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// AVX2, FMA and F16C plus AVX-512 VNNI on 256-bit registers.
    Vnni,
    Avx2,
    Portable,
}

impl Isa {
    /// The best this CPU has.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            use std::sync::OnceLock;
            static ISA: OnceLock<Isa> = OnceLock::new();
            *ISA.get_or_init(|| {
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
            })
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

/// `Σ w·x` over a row: `w = d·code + m` per half-block of 16 values, `x = d·q`
/// per block of 32 (carried per half-block). `wide` says codes may exceed 127.
pub fn dot(isa: Isa, w: &WeightRow, a: &ActRow, wide: bool) -> f32 {
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `Isa::detect` found these features on this CPU.
        Isa::Vnni => unsafe { x86::dot_vnni(w, a) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::dot_avx2(w, a, wide) },
        _ => dot_portable(w, a),
    }
}

/// [`dot`] reading a row of Q4_0, Q4_1 or Q8_0 blocks in place, without
/// unpacking; `None` for the other types and on the portable path, which
/// unpack instead.
pub fn dot_blocks(isa: Isa, ty: QuantType, bytes: &[u8], a: &ActRow) -> Option<f32> {
    #[cfg(target_arch = "x86_64")]
    {
        use x86::{Blocks, Legacy};
        fn run<L: Legacy>(isa: Isa, bytes: &[u8], a: &ActRow) -> Option<f32> {
            let w = Blocks::<L>::new(bytes);
            match isa {
                // SAFETY: `Isa::detect` found these features on this CPU.
                Isa::Vnni => Some(unsafe { x86::dot_vnni(w, a) }),
                // SAFETY: as above.
                Isa::Avx2 => Some(unsafe { x86::dot_avx2(w, a, L::TY.wide()) }),
                Isa::Portable => None,
            }
        }
        match ty {
            QuantType::Q4_0 => run::<x86::Q4_0>(isa, bytes, a),
            QuantType::Q4_1 => run::<x86::Q4_1>(isa, bytes, a),
            QuantType::Q8_0 => run::<x86::Q8_0>(isa, bytes, a),
            _ => None,
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = (isa, ty, bytes, a);
        None
    }
}

/// Folds eight lanes as the SIMD paths do: halves, then pairs, then the last two.
fn fold(v: [f32; 8]) -> f32 {
    let t = [v[0] + v[4], v[1] + v[5], v[2] + v[6], v[3] + v[7]];
    (t[0] + t[2]) + (t[1] + t[3])
}

fn dot_portable(w: &WeightRow, a: &ActRow) -> f32 {
    let blocks = w.blocks;
    let (mut acc, mut macc) = ([[0f32; 8]; ACCS], [0f32; 8]);
    for g in 0..blocks.div_ceil(GROUP) {
        let h0 = g * HALVES_PER_GROUP;
        let mut scale = [[0f32; 8]; 2];
        for (half, s) in scale.iter_mut().enumerate() {
            for (l, s) in s.iter_mut().enumerate() {
                let h = h0 + 8 * half + l;
                *s = w.d[h] * a.d[h];
            }
        }
        for half in 0..2 {
            for (l, m) in macc.iter_mut().enumerate() {
                let h = h0 + 8 * half + l;
                *m = w.m[h].mul_add(a.s[h], *m);
            }
        }
        // Whole groups, as the SIMD paths run them (padding adds exact zeros).
        for j in 0..GROUP {
            let b = g * GROUP + j;
            let s = &scale[j / 4];
            let (c, x) = (&w.codes[b * QK..][..QK], &a.qs[b * QK..][..QK]);
            for (l, acc) in acc[j % ACCS].iter_mut().enumerate() {
                let lane: i32 = (4 * l..4 * l + 4).map(|t| c[t] as i32 * x[t] as i32).sum();
                *acc = (lane as f32).mul_add(s[2 * (j % 4) + l / 4], *acc);
            }
        }
    }
    let lanes = std::array::from_fn(|l| (acc[0][l] + acc[1][l]) + (acc[2][l] + acc[3][l]));
    fold(lanes) + fold(macc)
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::super::{ActRow, QuantType, WeightRow, GROUP, HALVES_PER_GROUP, QK};
    use super::ACCS;
    use std::arch::x86_64::*;

    /// Where a dot product reads a weight row: per group of 8 blocks the
    /// scales and offsets of its 16 half-blocks (low 8, high 8), per block its
    /// 32 codes.
    pub trait Source {
        fn blocks(&self) -> usize;
        /// `[d low, d high, m low, m high]`.
        unsafe fn group(&self, g: usize) -> [__m256; 4];
        unsafe fn codes(&self, b: usize) -> __m256i;
    }

    impl Source for &WeightRow {
        #[inline(always)]
        fn blocks(&self) -> usize {
            self.blocks
        }

        #[inline(always)]
        unsafe fn group(&self, g: usize) -> [__m256; 4] {
            let h = g * HALVES_PER_GROUP;
            let ld = |v: &[f32], at: usize| _mm256_loadu_ps(v[at..at + 8].as_ptr());
            [
                ld(&self.d, h),
                ld(&self.d, h + 8),
                ld(&self.m, h),
                ld(&self.m, h + 8),
            ]
        }

        #[inline(always)]
        unsafe fn codes(&self, b: usize) -> __m256i {
            _mm256_loadu_si256(self.codes[b * QK..][..QK].as_ptr() as *const __m256i)
        }
    }

    /// The block formats a row can be read from in place.
    pub trait Legacy {
        const TY: QuantType;
    }
    pub struct Q4_0;
    pub struct Q4_1;
    pub struct Q8_0;
    impl Legacy for Q4_0 {
        const TY: QuantType = QuantType::Q4_0;
    }
    impl Legacy for Q4_1 {
        const TY: QuantType = QuantType::Q4_1;
    }
    impl Legacy for Q8_0 {
        const TY: QuantType = QuantType::Q8_0;
    }

    /// A row of Q4_0, Q4_1 or Q8_0 blocks read in place, giving exactly the
    /// values that unpacking it would (the one-row fast path); blocks past the
    /// row read as zero.
    pub struct Blocks<'a, L> {
        bytes: &'a [u8],
        blocks: usize,
        ty: std::marker::PhantomData<L>,
    }

    impl<'a, L: Legacy> Blocks<'a, L> {
        pub fn new(bytes: &'a [u8]) -> Self {
            Self {
                blocks: bytes.len() / L::TY.block_bytes(),
                bytes,
                ty: std::marker::PhantomData,
            }
        }
    }

    impl<L: Legacy> Source for Blocks<'_, L> {
        #[inline(always)]
        fn blocks(&self) -> usize {
            self.blocks
        }

        #[inline(always)]
        unsafe fn group(&self, g: usize) -> [__m256; 4] {
            let bb = L::TY.block_bytes();
            let (mut d, mut m) = ([0u16; GROUP], [0u16; GROUP]);
            for j in 0..GROUP.min(self.blocks - g * GROUP) {
                let b = &self.bytes[(g * GROUP + j) * bb..][..4];
                d[j] = u16::from_le_bytes([b[0], b[1]]);
                m[j] = u16::from_le_bytes([b[2], b[3]]);
            }
            let d = _mm256_cvtph_ps(_mm_loadu_si128(d.as_ptr() as *const __m128i));
            let m = match L::TY {
                QuantType::Q4_1 => _mm256_cvtph_ps(_mm_loadu_si128(m.as_ptr() as *const __m128i)),
                QuantType::Q4_0 => _mm256_mul_ps(d, _mm256_set1_ps(-8.0)),
                _ => _mm256_mul_ps(d, _mm256_set1_ps(-128.0)),
            };
            let lo = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
            let hi = _mm256_setr_epi32(4, 4, 5, 5, 6, 6, 7, 7);
            [
                _mm256_permutevar8x32_ps(d, lo),
                _mm256_permutevar8x32_ps(d, hi),
                _mm256_permutevar8x32_ps(m, lo),
                _mm256_permutevar8x32_ps(m, hi),
            ]
        }

        #[inline(always)]
        unsafe fn codes(&self, b: usize) -> __m256i {
            if b >= self.blocks {
                return _mm256_setzero_si256();
            }
            // In bounds: block b < blocks lies inside `bytes`.
            let block = self.bytes.as_ptr().add(b * L::TY.block_bytes());
            let nibbles = |at: usize| {
                let v = _mm_loadu_si128(block.add(at) as *const __m128i);
                let low = _mm_set1_epi8(0x0F);
                let hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
                _mm256_set_m128i(hi, _mm_and_si128(v, low))
            };
            match L::TY {
                QuantType::Q4_0 => nibbles(2),
                QuantType::Q4_1 => nibbles(4),
                _ => _mm256_xor_si256(
                    _mm256_loadu_si256(block.add(2) as *const __m256i),
                    _mm256_set1_epi8(-128),
                ),
            }
        }
    }

    /// Lanes 0–3 take half-block `2j`'s scale, lanes 4–7 half-block `2j + 1`'s.
    #[inline(always)]
    unsafe fn lane_index(j: usize) -> __m256i {
        let j = 2 * (j % 4) as i32;
        _mm256_setr_epi32(j, j, j, j, j + 1, j + 1, j + 1, j + 1)
    }

    #[inline(always)]
    unsafe fn fold(v: __m256) -> f32 {
        let x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let y = _mm_add_ps(x, _mm_movehl_ps(x, x));
        _mm_cvtss_f32(_mm_add_ss(y, _mm_shuffle_ps(y, y, 1)))
    }

    /// The shared loop; `lanes` turns 32 codes and 32 activations into eight
    /// 4-byte integer sums.
    #[inline(always)]
    unsafe fn dot_with(
        w: impl Source,
        a: &ActRow,
        lanes: impl Fn(__m256i, __m256i) -> __m256i,
    ) -> f32 {
        let blocks = w.blocks();
        let groups = blocks.div_ceil(GROUP);
        // The activation row covers whole groups (the raw loads below rely on it).
        assert!(a.qs.len() >= groups * GROUP * QK && a.d.len() >= groups * HALVES_PER_GROUP);
        let (mut acc, mut macc) = ([_mm256_setzero_ps(); ACCS], _mm256_setzero_ps());
        for g in 0..groups {
            let h = g * HALVES_PER_GROUP;
            let ld = |v: &[f32], at: usize| _mm256_loadu_ps(v[at..at + 8].as_ptr());
            let [dlo, dhi, mlo, mhi] = w.group(g);
            let scale = [
                _mm256_mul_ps(dlo, ld(a.d, h)),
                _mm256_mul_ps(dhi, ld(a.d, h + 8)),
            ];
            macc = _mm256_fmadd_ps(mlo, ld(a.s, h), macc);
            macc = _mm256_fmadd_ps(mhi, ld(a.s, h + 8), macc);
            // Whole groups: blocks past the row have zero codes and scales,
            // so they add exact zeros.
            for j in 0..GROUP {
                let b = g * GROUP + j;
                if j == GROUP / 2 && b >= blocks {
                    break;
                }
                let x = _mm256_loadu_si256(a.qs.as_ptr().add(b * QK) as *const __m256i);
                let s = _mm256_permutevar8x32_ps(scale[j / 4], lane_index(j));
                let p = _mm256_cvtepi32_ps(lanes(w.codes(b), x));
                acc[j % ACCS] = _mm256_fmadd_ps(p, s, acc[j % ACCS]);
            }
        }
        let sum = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        fold(sum) + fold(macc)
    }

    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
    pub unsafe fn dot_vnni(w: impl Source, a: &ActRow) -> f32 {
        dot_with(w, a, |c, x| {
            _mm256_dpbusd_epi32(_mm256_setzero_si256(), c, x)
        })
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot_avx2(w: impl Source, a: &ActRow, wide: bool) -> f32 {
        let ones = _mm256_set1_epi16(1);
        // `maddubs` saturates at i16: codes up to 63 never reach it, wider
        // codes are split at bit 7 so that each half stays below it.
        let pairs = |c, x| _mm256_madd_epi16(_mm256_maddubs_epi16(c, x), ones);
        if wide {
            let (low7, high) = (_mm256_set1_epi8(0x7F), _mm256_set1_epi8(-128));
            dot_with(w, a, |c, x| {
                _mm256_add_epi32(
                    pairs(_mm256_and_si256(c, low7), x),
                    pairs(_mm256_and_si256(c, high), x),
                )
            })
        } else {
            dot_with(w, a, pairs)
        }
    }
}
