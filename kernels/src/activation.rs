//! Elementwise activations over rows, vectorized where the CPU allows.
#[cfg(target_arch = "x86_64")]
use crate::quant::Isa;

/// `silu(gate) · up` for rows laid out `[gate (width) | up (width)]`, as
/// `[rows, width]`.
pub fn silu_mul(gate_up: &[f32], width: usize) -> Vec<f32> {
    let rows = gate_up.len() / (2 * width);
    let mut out = vec![0f32; rows * width];
    for (o, r) in out
        .chunks_exact_mut(width)
        .zip(gate_up.chunks_exact(2 * width))
    {
        let (g, u) = r.split_at(width);
        #[cfg(target_arch = "x86_64")]
        if Isa::detect() != Isa::Portable {
            // SAFETY: every SIMD `Isa` includes AVX2 and FMA.
            unsafe { x86::silu_mul(g, u, o) };
            continue;
        }
        silu_mul_portable(g, u, o);
    }
    out
}

/// `gelu(gate) · up` with GELU's tanh approximation (Gemma's GeGLU, as
/// PyTorch's `gelu(approximate="tanh")`), for rows laid out as in [`silu_mul`].
pub fn gelu_tanh_mul(gate_up: &[f32], width: usize) -> Vec<f32> {
    const C: f32 = 0.797_884_6; // √(2/π)
    gate_up
        .chunks_exact(2 * width)
        .flat_map(|r| {
            let (g, u) = r.split_at(width);
            g.iter()
                .zip(u)
                .map(|(&g, &u)| 0.5 * g * (1.0 + (C * (g + 0.044_715 * g * g * g)).tanh()) * u)
        })
        .collect()
}

fn silu_mul_portable(g: &[f32], u: &[f32], out: &mut [f32]) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-g).exp()) * u;
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    /// `e^x` for eight lanes (Cephes' polynomial, within 2 ulp over
    /// [-87, 88], inputs clamped to that range).
    #[inline(always)]
    pub unsafe fn exp(x: __m256) -> __m256 {
        let x = _mm256_max_ps(
            _mm256_min_ps(x, _mm256_set1_ps(88.0)),
            _mm256_set1_ps(-87.0),
        );
        let n = _mm256_floor_ps(_mm256_fmadd_ps(
            x,
            _mm256_set1_ps(std::f32::consts::LOG2_E),
            _mm256_set1_ps(0.5),
        ));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_359_4), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.121_944_4e-4), r);
        let mut y = _mm256_set1_ps(1.987_569_1e-4);
        for c in [1.398_2e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
            y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
        }
        let y = _mm256_fmadd_ps(
            y,
            _mm256_mul_ps(r, r),
            _mm256_add_ps(r, _mm256_set1_ps(1.0)),
        );
        let pow2 = _mm256_slli_epi32(
            _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)),
            23,
        );
        _mm256_mul_ps(y, _mm256_castsi256_ps(pow2))
    }

    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn silu_mul(g: &[f32], u: &[f32], out: &mut [f32]) {
        let n = out.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        for i in (0..n).step_by(8) {
            let gv = _mm256_loadu_ps(g[i..i + 8].as_ptr());
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), gv));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            let o = _mm256_mul_ps(s, _mm256_loadu_ps(u[i..i + 8].as_ptr()));
            _mm256_storeu_ps(out[i..i + 8].as_mut_ptr(), o);
        }
        super::silu_mul_portable(&g[n..], &u[n..], &mut out[n..]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo_random;

    /// Both paths are within a few ulp of the f64 formula, from saturated
    /// negatives to large positives.
    #[test]
    fn silu_mul_matches_the_formula() {
        let width = 37;
        let mut gate_up: Vec<f32> = pseudo_random(3 * 2 * width, 4)
            .into_iter()
            .map(|v| v * 20.0)
            .collect();
        gate_up[0] = -120.0;
        gate_up[1] = 95.0;
        let want: Vec<f64> = gate_up
            .chunks_exact(2 * width)
            .flat_map(|r| {
                let (g, u) = r.split_at(width);
                g.iter()
                    .zip(u)
                    .map(|(&g, &u)| g as f64 / (1.0 + (-g as f64).exp()) * u as f64)
            })
            .collect();
        let mut portable = vec![0f32; want.len()];
        for (o, r) in portable
            .chunks_exact_mut(width)
            .zip(gate_up.chunks_exact(2 * width))
        {
            let (g, u) = r.split_at(width);
            silu_mul_portable(g, u, o);
        }
        for got in [silu_mul(&gate_up, width), portable] {
            for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0),
                    "{i}: {a} vs {b}"
                );
            }
        }
    }
}
