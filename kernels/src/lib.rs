//! Hot numeric loops shared by the engines: sampling helpers and the Q4_1
//! quantized GEMM (AVX2 with a portable fallback); paged attention next.
pub mod q4_1;
pub mod sampling;
