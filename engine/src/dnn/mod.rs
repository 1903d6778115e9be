//! The DNN plane: a Triton model repository (config.pbtxt, versions, control
//! modes), ONNX / tree / candle backends, and a dynamic batcher per version.
pub mod backend;
pub mod batcher;
pub mod bert;
pub mod cache;
pub mod encoder;
pub mod error;
pub mod fil;
pub mod forest;
pub mod lightgbm;
pub mod model;
#[cfg(feature = "tract")]
pub mod onnx;
pub mod onnxrt;
pub mod repository;
pub mod stats;
pub mod tensor;
pub mod ubjson;
pub mod warmup;
pub mod xgboost;

pub use error::{DnnError, ErrorKind};
pub use model::ModelDefinition;
pub use repository::{
    ControlMode, IndexEntry, InferRequest, InferResponse, ModelRepository, RepositoryBounds,
    RequestedOutput, DEFAULT_MAX_INSTANCES, DEFAULT_MAX_QUEUE_SIZE,
};
pub use stats::StatsSnapshot;
pub use tensor::{DataType, Tensor};
