//! Hot numeric loops shared by the engines: sampling helpers, quantized GEMM
//! (Q4_0, Q4_1, Q8_0, Q4_K, Q5_K, Q6_K), rotary embeddings, SiLU and paged
//! attention (AVX-512 VNNI or AVX2/FMA with portable fallbacks).
pub mod activation;
pub mod huge;
pub mod paged_attention;
pub mod quant;
pub mod rope;
pub mod sampling;

#[cfg(test)]
mod test_util {
    /// Deterministic values in [-1, 1) from a linear congruential generator.
    pub fn pseudo_random(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed;
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(1664525).wrapping_add(1013904223);
                (s >> 8) as f32 / (1u32 << 24) as f32 * 2.0 - 1.0
            })
            .collect()
    }
}
