//! Hot numeric loops shared by the engines: sampling helpers today; quantized
//! matmul and paged attention kernels (CPU SIMD, CUDA behind `cuda`) next.
pub mod sampling;
