//! The executor interface every backend implements, and loading one from a
//! model version directory as the config's backend names it.
use super::error::Result;
use super::model::{BackendKind, ModelSpec};
use super::tensor::Tensor;
use std::path::Path;
use std::sync::Arc;

/// Runs one batch. `inputs` follow the config's input order, each with the
/// batch as its first dimension when the model batches; the result holds
/// every config output, in config order, with the same batch dimension.
pub trait Backend: Send + Sync {
    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>>;
}

/// Loads the backend for `spec` from `dir` (`<repo>/<model>/<version>`).
pub fn load(spec: &ModelSpec, dir: &Path) -> std::result::Result<Arc<dyn Backend>, String> {
    let file = dir.join(&spec.model_filename);
    if !file.exists() {
        return Err(format!("{} does not exist", file.display()));
    }
    Ok(match &spec.backend {
        BackendKind::Fil(params) => Arc::new(super::fil::FilBackend::load(spec, params, &file)?),
        BackendKind::Onnx => Arc::new(super::onnx::OnnxBackend::load(spec, &file)?),
        BackendKind::SentenceEncoder => Arc::new(super::encoder::SentenceEncoder::load(spec, dir)?),
    })
}

/// The shape of an output: `[rows] + dims` when batching, else `dims`.
pub fn output_shape(spec: &ModelSpec, dims: &[i64], rows: usize) -> Vec<i64> {
    if spec.max_batch_size > 0 {
        std::iter::once(rows as i64)
            .chain(dims.iter().copied())
            .collect()
    } else {
        dims.to_vec()
    }
}
