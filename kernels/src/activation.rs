//! Elementwise activations over rows, vectorized where the CPU allows.
#[cfg(target_arch = "x86_64")]
use crate::quant::Isa;

/// `silu(gate) · up` for rows laid out `[gate (width) | up (width)]`, as
/// `[rows, width]`.
pub fn silu_mul(gate_up: &[f32], width: usize) -> Vec<f32> {
    gated_mul(gate_up, width, Gate::Silu)
}

/// `gelu(gate) · up` with GELU's tanh approximation (Gemma's GeGLU, as
/// PyTorch's `gelu(approximate="tanh")`), for rows laid out as in [`silu_mul`].
pub fn gelu_tanh_mul(gate_up: &[f32], width: usize) -> Vec<f32> {
    gated_mul(gate_up, width, Gate::GeluTanh)
}

/// A gate of the form `g · σ(arg(g))`, `σ` the logistic function: SiLU's
/// argument is `g`; GELU's tanh approximation `0.5·g·(1 + tanh(z))`, with
/// `z = √(2/π)·(g + 0.044715·g³)`, is `g · σ(2z)`. Both paths compute
/// `g / (1 + e^(−arg))`, so GELU needs no `tanh` (a libm call a value on
/// the portable side).
#[derive(Clone, Copy)]
enum Gate {
    Silu,
    GeluTanh,
}

/// `2·√(2/π)` and GELU's cubic coefficient.
const GELU_TWICE_C: f32 = 1.595_769;
const GELU_CUBIC: f32 = 0.044_715;

impl Gate {
    fn arg(self, g: f32) -> f32 {
        match self {
            Gate::Silu => g,
            Gate::GeluTanh => GELU_TWICE_C * (g + GELU_CUBIC * g * g * g),
        }
    }
}

fn gated_mul(gate_up: &[f32], width: usize, gate: Gate) -> Vec<f32> {
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
            unsafe { x86::gated_mul(g, u, o, gate) };
            continue;
        }
        gated_mul_portable(g, u, o, gate);
    }
    out
}

fn gated_mul_portable(g: &[f32], u: &[f32], out: &mut [f32], gate: Gate) {
    for ((o, &g), &u) in out.iter_mut().zip(g).zip(u) {
        *o = g / (1.0 + (-gate.arg(g)).exp()) * u;
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
    pub(super) unsafe fn gated_mul(g: &[f32], u: &[f32], out: &mut [f32], gate: super::Gate) {
        let n = out.len() / 8 * 8;
        let one = _mm256_set1_ps(1.0);
        let (twice_c, cubic) = (
            _mm256_set1_ps(super::GELU_TWICE_C),
            _mm256_set1_ps(super::GELU_CUBIC),
        );
        for i in (0..n).step_by(8) {
            let gv = _mm256_loadu_ps(g[i..i + 8].as_ptr());
            let arg = match gate {
                super::Gate::Silu => gv,
                super::Gate::GeluTanh => {
                    let cube = _mm256_mul_ps(_mm256_mul_ps(gv, gv), gv);
                    _mm256_mul_ps(twice_c, _mm256_fmadd_ps(cubic, cube, gv))
                }
            };
            let e = exp(_mm256_sub_ps(_mm256_setzero_ps(), arg));
            let s = _mm256_div_ps(gv, _mm256_add_ps(one, e));
            let o = _mm256_mul_ps(s, _mm256_loadu_ps(u[i..i + 8].as_ptr()));
            _mm256_storeu_ps(out[i..i + 8].as_mut_ptr(), o);
        }
        super::gated_mul_portable(&g[n..], &u[n..], &mut out[n..], gate);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::pseudo_random;

    /// Both paths of both gates are within a few ulp of the f64 formula
    /// (GELU's in its tanh form), from saturated negatives to large
    /// positives.
    #[test]
    fn gates_match_their_formulas() {
        let width = 37;
        let mut gate_up: Vec<f32> = pseudo_random(3 * 2 * width, 4)
            .into_iter()
            .map(|v| v * 20.0)
            .collect();
        gate_up[0] = -120.0;
        gate_up[1] = 95.0;
        let silu = |g: f64| g / (1.0 + (-g).exp());
        let gelu = |g: f64| {
            let z = (2.0 / std::f64::consts::PI).sqrt() * (g + 0.044_715 * g * g * g);
            0.5 * g * (1.0 + z.tanh())
        };
        // A gate, its public function and its formula.
        type Case = (Gate, fn(&[f32], usize) -> Vec<f32>, fn(f64) -> f64);
        let cases: [Case; 2] = [
            (Gate::Silu, silu_mul, silu),
            (Gate::GeluTanh, gelu_tanh_mul, gelu),
        ];
        for (gate, simd, formula) in cases {
            let want: Vec<f64> = gate_up
                .chunks_exact(2 * width)
                .flat_map(|r| {
                    let (g, u) = r.split_at(width);
                    g.iter().zip(u).map(|(&g, &u)| formula(g as f64) * u as f64)
                })
                .collect();
            let mut portable = vec![0f32; want.len()];
            for (o, r) in portable
                .chunks_exact_mut(width)
                .zip(gate_up.chunks_exact(2 * width))
            {
                let (g, u) = r.split_at(width);
                gated_mul_portable(g, u, o, gate);
            }
            for got in [simd(&gate_up, width), portable] {
                for (i, (&a, &b)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        (a as f64 - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{i}: {a} vs {b}"
                    );
                }
            }
        }
    }
}
