//! The executor interface every backend implements, and loading one from a
//! model version directory as the config's backend names it.
use super::error::Result;
use super::model::{BackendKind, ModelDefinition, OnnxExecutor};
use super::tensor::Tensor;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Runs one batch. `inputs` follow the config's input order, each with the
/// batch as its first dimension when the model batches; the result holds
/// every config output, in config order, with the same batch dimension.
pub trait Backend: Send + Sync {
    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>>;
}

/// Loads the backend for `spec` from `dir` (`<repo>/<model>/<version>`);
/// the model file must lie inside `dir`. Returns it with the name of the
/// executor that runs it.
pub fn load(
    spec: &ModelDefinition,
    dir: &Path,
) -> std::result::Result<(Arc<dyn Backend>, &'static str), String> {
    if matches!(spec.backend, BackendKind::Ensemble(_)) {
        return Err("an ensemble has no backend: its steps run on their own models".into());
    }
    let file = confined(dir, &spec.model_filename, "default_model_filename")?;
    if !file.exists() {
        return Err(format!("{} does not exist", file.display()));
    }
    Ok(match &spec.backend {
        BackendKind::Fil(params) => (
            Arc::new(super::fil::FilBackend::load(spec, params, &file)?),
            "fil",
        ),
        BackendKind::Onnx(executor) => load_onnx(spec, *executor, &file)?,
        BackendKind::Ensemble(_) => unreachable!("refused above"),
        BackendKind::SentenceEncoder => (
            Arc::new(super::encoder::SentenceEncoder::load(spec, dir, &file)?),
            "candle",
        ),
    })
}

/// An ONNX model on tract, on onnxruntime, or (auto) on tract unless tract
/// refuses the graph; the refusal is logged with the fallback. A build
/// without the `tract` feature runs every ONNX model on onnxruntime.
fn load_onnx(
    spec: &ModelDefinition,
    executor: OnnxExecutor,
    file: &Path,
) -> std::result::Result<(Arc<dyn Backend>, &'static str), String> {
    let ort = || -> std::result::Result<(Arc<dyn Backend>, &'static str), String> {
        Ok((
            Arc::new(super::onnxrt::OrtBackend::load(spec, file)?),
            "onnxruntime",
        ))
    };
    match executor {
        OnnxExecutor::OnnxRuntime => ort(),
        #[cfg(not(feature = "tract"))]
        OnnxExecutor::Auto => ort(),
        #[cfg(feature = "tract")]
        OnnxExecutor::Tract => Ok((
            Arc::new(super::onnx::OnnxBackend::load(spec, file)?),
            "tract",
        )),
        #[cfg(feature = "tract")]
        OnnxExecutor::Auto => match super::onnx::OnnxBackend::load(spec, file) {
            Ok(b) => Ok((Arc::new(b), "tract")),
            Err(tract) => {
                tracing::info!(model = %spec.name, "tract cannot run the graph ({tract}); trying onnxruntime");
                ort().map_err(|e| {
                    format!("tract cannot run the graph ({tract}), and onnxruntime: {e}")
                })
            }
        },
    }
}

/// `name`, a file a config names, as a path inside `dir`: relative, without
/// `..`, and (symlinks resolved) still inside `dir`. The refusal is the same
/// whether or not something exists outside, so it tells nothing about it.
pub fn confined(dir: &Path, name: &str, field: &str) -> std::result::Result<PathBuf, String> {
    use std::path::Component;
    let refuse = || format!("{field}: '{name}' must name a file inside the model's directory");
    let relative = Path::new(name);
    let plain = relative
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if name.is_empty() || !plain {
        return Err(refuse());
    }
    let path = dir.join(relative);
    let root = dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", dir.display()))?;
    match path.canonicalize() {
        Ok(real) if !real.starts_with(&root) => Err(refuse()),
        // A missing file is reported where it is read.
        _ => Ok(path),
    }
}

/// The shape of an output: `[rows] + dims` when batching, else `dims`.
pub fn output_shape(spec: &ModelDefinition, dims: &[i64], rows: usize) -> Vec<i64> {
    if spec.max_batch_size > 0 {
        std::iter::once(rows as i64)
            .chain(dims.iter().copied())
            .collect()
    } else {
        dims.to_vec()
    }
}
