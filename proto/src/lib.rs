//! KServe v2 protocol definitions; the gRPC code generated from them arrives with the Triton plane.
