use super::*;
use crate::test_util::pseudo_random;
use candle_core::quantized::{ggml_file::qtensor_from_ggml, GgmlDType, QTensor};
use candle_core::{Device, Tensor};

const TYPES: [QuantType; 6] = [
    QuantType::Q4_0,
    QuantType::Q4_1,
    QuantType::Q8_0,
    QuantType::Q4K,
    QuantType::Q5K,
    QuantType::Q6K,
];

fn ggml(ty: QuantType) -> GgmlDType {
    match ty {
        QuantType::Q4_0 => GgmlDType::Q4_0,
        QuantType::Q4_1 => GgmlDType::Q4_1,
        QuantType::Q8_0 => GgmlDType::Q8_0,
        QuantType::Q4K => GgmlDType::Q4K,
        QuantType::Q5K => GgmlDType::Q5K,
        QuantType::Q6K => GgmlDType::Q6K,
    }
}

/// `[n, k]` float weights quantized by candle's implementation of ggml's quantizers.
fn quantize(ty: QuantType, w: &[f32], n: usize, k: usize) -> Vec<u8> {
    let t = Tensor::from_slice(w, (n, k), &Device::Cpu).unwrap();
    QTensor::quantize(&t, ggml(ty))
        .unwrap()
        .data()
        .unwrap()
        .into_owned()
}

/// Blocks dequantized by candle: the reference for our unpacking.
fn dequantize(ty: QuantType, blocks: &[u8], n: usize, k: usize) -> Vec<f32> {
    qtensor_from_ggml(ggml(ty), blocks, vec![n, k], &Device::Cpu)
        .unwrap()
        .dequantize(&Device::Cpu)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

/// Arbitrary bytes for every field, with the f16 scales kept finite and small.
fn random_blocks(ty: QuantType, n: usize, k: usize, seed: u32) -> Vec<u8> {
    let len = n * k / ty.block_values() * ty.block_bytes();
    let mut s = seed;
    let mut bytes: Vec<u8> = (0..len)
        .map(|_| {
            s = s.wrapping_mul(1664525).wrapping_add(1013904223);
            (s >> 24) as u8
        })
        .collect();
    for b in bytes.chunks_exact_mut(ty.block_bytes()) {
        for &at in f16_offsets(ty) {
            let v = half::f16::from_f32((b[at] as f32 - 128.0) / 4096.0);
            b[at..at + 2].copy_from_slice(&v.to_le_bytes());
        }
    }
    bytes
}

/// Where a block of `ty` keeps its f16 scales.
fn f16_offsets(ty: QuantType) -> &'static [usize] {
    match ty {
        QuantType::Q4_0 | QuantType::Q8_0 => &[0],
        QuantType::Q4_1 | QuantType::Q4K | QuantType::Q5K => &[0, 2],
        QuantType::Q6K => &[208],
    }
}

/// The quantized activations as values, row after row.
fn dequantized(a: &Activations) -> Vec<f64> {
    let k = a.layout.k;
    let mut x = vec![0f64; a.rows() * k];
    for r in 0..a.rows() {
        let row = a.row(r);
        for (gi, g) in a.layout.groups.iter().enumerate() {
            for s in 0..g.steps() {
                for b in 0..STEP {
                    let d = row.d[gi * LANES + b / 4] as f64;
                    x[r * k + g.value(s, b)] = d * row.qs[g.start + s * STEP + b] as f64;
                }
            }
        }
    }
    x
}

/// The exact product of the dequantized weights and the quantized
/// activations, and the sum of the magnitudes of its terms.
fn exact(w: &[f32], a: &Activations, n: usize) -> Vec<(f64, f64)> {
    let k = a.layout.k;
    let x = dequantized(a);
    let mut out = Vec::new();
    for x in x.chunks_exact(k) {
        for c in 0..n {
            let terms = (0..k).map(|i| w[c * k + i] as f64 * x[i]);
            out.push((terms.clone().sum(), terms.map(f64::abs).sum()));
        }
    }
    out
}

/// An `[n, k]` matrix of arbitrary blocks ([`random_blocks`]).
fn random_matrix(ty: QuantType, n: usize, k: usize, seed: u32) -> QuantMatrix {
    QuantMatrix::new(ty, &random_blocks(ty, n, k, seed), n, k)
}

fn run(m: &QuantMatrix, isa: Isa, x: &[f32]) -> Vec<f32> {
    let a = m.activations(isa, x);
    let mut y = vec![0f32; a.rows() * m.n];
    m.matmul_with(isa, &a, &mut y);
    y
}

/// Shapes to test `ty` at: whole groups, and for 32-value blocks rows that
/// end in groups of 4, 2 and 1 blocks; batches below eight rows, from eight
/// (where VNNI takes two weight rows a pass, an odd last one alone) and
/// above sixteen (where 4-bit rows are widened first).
fn shapes(ty: QuantType) -> Vec<(usize, usize, usize)> {
    let mut v = vec![(1, 256, 5), (3, 768, 37), (6, 1536, 16), (9, 768, 37)];
    if ty.block_values() == QK {
        v.extend([(5, 576, 19), (2, 224, 7), (1, 32, 3), (17, 576, 7)]);
    }
    v
}

/// Our packing agrees with candle's dequantization, for blocks quantized
/// from floats and for arbitrary bytes, on every instruction set.
#[test]
fn matmul_equals_the_dequantized_product() {
    for ty in TYPES {
        for (rows, k, n) in shapes(ty) {
            let from_floats = quantize(ty, &pseudo_random(n * k, 7 + n as u32), n, k);
            for blocks in [from_floats, random_blocks(ty, n, k, 3)] {
                let w = dequantize(ty, &blocks, n, k);
                let m = QuantMatrix::new(ty, &blocks, n, k);
                let x = pseudo_random(rows * k, 1 + rows as u32);
                let want = exact(&w, &m.activations(Isa::Portable, &x), n);
                // ggml's Q8_1 rounds each block's sum to f16 (Q4_1's offset term).
                let rel = if ty.scheme() == Scheme::Q8_1 {
                    1e-3
                } else {
                    1e-5
                };
                for isa in Isa::available() {
                    for (got, (v, mag)) in run(&m, isa, &x).iter().zip(&want) {
                        let err = (*got as f64 - v).abs();
                        assert!(
                            err <= rel * mag.max(1e-3),
                            "{ty:?} {isa:?} rows {rows} k {k} n {n}: {got} vs {v} (terms {mag})"
                        );
                    }
                }
            }
        }
    }
}

/// Every instruction set gives the same bits, including the extreme codes.
#[test]
fn instruction_sets_agree_bit_for_bit() {
    for ty in TYPES {
        for (rows, k, n) in shapes(ty) {
            let x = pseudo_random(rows * k, 11);
            let m = random_matrix(ty, n, k, 5);
            let paths = Isa::available();
            let first = run(&m, paths[0], &x);
            for &isa in &paths[1..] {
                assert_eq!(run(&m, isa, &x), first, "{ty:?} {isa:?} vs {:?}", paths[0]);
            }
        }
    }
}

/// Every code at its largest against activations at ±127 in every lane:
/// the sums that the AVX2 path keeps in 16 bits until a group ends are
/// still exact (the portable path sums in 32 bits). Bytes of 0x80 give
/// Q8_0's code -128, the largest magnitude its AVX2 path multiplies.
#[test]
fn largest_codes_sum_exactly_on_every_path() {
    for (ty, fill) in TYPES.iter().flat_map(|&ty| [(ty, 0xFF), (ty, 0x80)]) {
        for (_, k, n) in shapes(ty) {
            let mut blocks = vec![fill; n * k / ty.block_values() * ty.block_bytes()];
            for b in blocks.chunks_exact_mut(ty.block_bytes()) {
                for &at in f16_offsets(ty) {
                    b[at..at + 2].copy_from_slice(&half::f16::from_f32(1.0 / 1024.0).to_le_bytes());
                }
            }
            let m = QuantMatrix::new(ty, &blocks, n, k);
            // Nine rows: the batches of VNNI's two-weight-row passes too.
            let x: Vec<f32> = (0..9)
                .flat_map(|r| vec![if r % 2 == 0 { 1.0f32 } else { -1.0 }; k])
                .collect();
            let want = run(&m, Isa::Portable, &x);
            for isa in Isa::available() {
                assert_eq!(run(&m, isa, &x), want, "{ty:?} {fill:#x} {isa:?} k {k}");
            }
        }
    }
}

/// The GEMM is close to the float product of the unquantized weights: the
/// relative RMS error shrinks with the bits per weight.
#[test]
fn matmul_is_close_to_the_float_product() {
    let (rows, k, n) = (4, 512, 64);
    let x = pseudo_random(rows * k, 5);
    let wf = pseudo_random(n * k, 6);
    let mut exact = vec![0f32; rows * n];
    for r in 0..rows {
        for c in 0..n {
            exact[r * n + c] = (0..k).map(|i| x[r * k + i] * wf[c * k + i]).sum();
        }
    }
    let rms = |v: &mut dyn Iterator<Item = f32>| {
        let v: Vec<f32> = v.collect();
        (v.iter().map(|e| e * e).sum::<f32>() / v.len() as f32).sqrt()
    };
    for (ty, bound) in [
        (QuantType::Q4_0, 0.1),
        (QuantType::Q4_1, 0.1),
        (QuantType::Q4K, 0.1),
        (QuantType::Q5K, 0.05),
        (QuantType::Q6K, 0.03),
        (QuantType::Q8_0, 0.01),
    ] {
        let m = QuantMatrix::new(ty, &quantize(ty, &wf, n, k), n, k);
        let mut y = vec![0f32; rows * n];
        m.matmul(&x, &mut y);
        let err = rms(&mut y.iter().zip(&exact).map(|(a, b)| a - b));
        let rel = err / rms(&mut exact.iter().copied());
        assert!(rel < bound, "{ty:?}: relative RMS error {rel}");
    }
}

/// A row's result is the same alone or in a batch (where weights are read
/// for up to four rows at a time, two weight rows a pass on VNNI from eight
/// rows, and 4-bit rows widened to bytes first for more than 16), on every
/// instruction set.
#[test]
fn rows_do_not_depend_on_the_batch() {
    let (rows, k, n) = (19, 768, 41);
    let x = pseudo_random(rows * k, 8);
    for ty in TYPES {
        let w = random_matrix(ty, n, k, 9);
        for isa in Isa::available() {
            let all = run(&w, isa, &x);
            for r in 0..rows {
                let one = run(&w, isa, &x[r * k..(r + 1) * k]);
                assert_eq!(one, all[r * n..(r + 1) * n], "{ty:?} {isa:?} row {r}");
            }
        }
    }
}
