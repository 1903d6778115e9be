//! KServe v2 / Triton protocol definitions: the gRPC service and messages
//! generated from `proto/`, and ModelConfig in text format and JSON.
pub use prost;
pub mod json;
pub mod model_config;

/// Messages and the `GRPCInferenceService` server and client.
pub mod inference {
    tonic::include_proto!("inference");
}

/// The encoded `FileDescriptorSet` of every message above.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/inference_descriptor.bin"));
