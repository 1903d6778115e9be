use super::*;
use kernels::quant::Isa;

pub(super) fn pseudo_random(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect()
}

fn float_product(x: &[f32], w: &[f32], k: usize) -> Vec<f64> {
    x.chunks_exact(k)
        .flat_map(|x| {
            w.chunks_exact(k)
                .map(|w| x.iter().zip(w).map(|(a, b)| *a as f64 * *b as f64).sum())
        })
        .collect()
}

fn run(m: &QuantMatrix, isa: Isa, x: &[f32]) -> Vec<f32> {
    let a = m.activations(isa, x);
    let mut y = vec![0f32; a.rows() * m.n];
    m.matmul_with(isa, &a, &mut y);
    y
}

/// Relative RMS distance of `got` from `want`.
fn rel_rms(got: &[f32], want: &[f64]) -> f64 {
    let err: f64 = got
        .iter()
        .zip(want)
        .map(|(g, w)| (*g as f64 - w).powi(2))
        .sum();
    let mag: f64 = want.iter().map(|w| w * w).sum();
    (err / mag).sqrt()
}

#[test]
fn int4_round_trip_stays_within_half_a_step() {
    let (n, k, group) = (24, 256, 64);
    let mut w = pseudo_random(n * k, 1);
    // A skewed group (all positive) and a constant one.
    w[..group].iter_mut().for_each(|v| *v = v.abs() + 0.5);
    w[group..2 * group].iter_mut().for_each(|v| *v = 0.25);
    let q = Int4::quantize(&w, n, k, group);
    let back = q.dequantize();
    for (i, (a, b)) in w.iter().zip(&back).enumerate() {
        let s = q.scales[i / group];
        assert!(q.q[i] < 16 && q.zeros[i / group] < 16);
        assert!(
            (a - b).abs() <= 0.51 * s + 1e-6,
            "value {i}: {a} → {b} (step {s})"
        );
        assert_eq!(half::f16::from_f32(s).to_f32(), s, "scales are f16 values");
    }
}

#[test]
fn int8_and_int4_matrices_agree_on_every_instruction_set() {
    let (rows, k, n) = (5, 576, 40);
    let x = pseudo_random(rows * k, 2);
    let w = pseudo_random(n * k, 3);
    let exact = float_product(&x, &w, k);
    let int4 = Int4::quantize(&w, n, k, 64);
    let deq = float_product(&x, &int4.dequantize(), k);
    for (m, want, bound) in [
        // INT8 against the float weights: activations and weights both at 8 bits.
        (int8_matrix(&w, n, k), &exact, 0.01),
        // 4-bit against its own dequantized weights: only the activations'
        // quantization (and Q8_1's f16 block sums) remain.
        (int4.matrix(), &deq, 0.01),
    ] {
        let paths = Isa::available();
        let first = run(&m, paths[0], &x);
        let rel = rel_rms(&first, want);
        assert!(rel < bound, "{:?}: relative RMS error {rel}", m.ty);
        for &isa in &paths[1..] {
            assert_eq!(run(&m, isa, &x), first, "{:?} {isa:?}", m.ty);
        }
    }
    // 4-bit against the float weights: coarser, but still the same product.
    assert!(rel_rms(&run(&int4.matrix(), Isa::detect(), &x), &exact) < 0.15);
}

#[test]
fn a_zero_row_quantizes_to_zero() {
    let (n, k) = (2, 64);
    let mut w = pseudo_random(n * k, 4);
    w[..k].iter_mut().for_each(|v| *v = 0.0);
    let y = run(&int8_matrix(&w, n, k), Isa::detect(), &pseudo_random(k, 5));
    assert_eq!(y[0], 0.0);
}
