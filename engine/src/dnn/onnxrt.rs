//! ONNX models on onnxruntime, for graphs tract cannot run (the ai.onnx.ml
//! operators scikit-learn exports use, among others). The library is loaded
//! at run time from a `libonnxruntime` the operator names (the one the
//! `onnxruntime` PyPI wheel ships works), so the build needs nothing of it.
//! Triton's CPU session parameters map to the session: `intra_op_thread_count`,
//! `inter_op_thread_count`, `execution_mode` and `optimization.graph.level`.
use super::backend::Backend;
use super::error::{DnnError, Result};
use super::model::ModelDefinition;
use super::tensor::{bytes_elements, encode_bytes, DataType, Tensor};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::Session;
use ort::value::{DynValue, TensorElementType, ValueType};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// Where the server's configuration says the library is; read once, at the
/// first onnxruntime model, since a process holds one onnxruntime.
static LIBRARY: OnceLock<(PathBuf, String)> = OnceLock::new();
/// Where the library comes from when nothing names one (the server fetches
/// a pinned build); run once, at the first model that needs it.
type Fallback = Box<dyn Fn() -> std::result::Result<PathBuf, String> + Send + Sync>;
static FALLBACK: OnceLock<(Fallback, String)> = OnceLock::new();
static ENVIRONMENT: OnceLock<std::result::Result<ort::environment::Environment, String>> =
    OnceLock::new();

/// The environment variable that names the library when the configuration does not.
pub const LIBRARY_ENV: &str = "SWITCHYARD_ONNXRUNTIME_LIB";

/// Sets the library path for this process, with the setting it came from
/// (named in errors). Ignored once a model loaded the library.
pub fn set_library(path: PathBuf, setting: &str) {
    let _ = LIBRARY.set((path, setting.to_string()));
}

/// What provides the library when neither the configuration nor the
/// environment names one, described for errors.
pub fn set_fallback(
    fetch: impl Fn() -> std::result::Result<PathBuf, String> + Send + Sync + 'static,
    what: &str,
) {
    let _ = FALLBACK.set((Box::new(fetch), what.to_string()));
}

/// The library and the setting that names it.
fn library() -> std::result::Result<(PathBuf, String), String> {
    if let Some(p) = LIBRARY.get() {
        return Ok(p.clone());
    }
    for var in [LIBRARY_ENV, "ORT_DYLIB_PATH"] {
        if let Some(p) = std::env::var_os(var).filter(|p| !p.is_empty()) {
            return Ok((PathBuf::from(p), var.to_string()));
        }
    }
    if let Some((fetch, what)) = FALLBACK.get() {
        return fetch()
            .map(|p| (p, what.clone()))
            .map_err(|e| format!("{what}: {e}"));
    }
    Err(format!(
        "no onnxruntime library: set model_repository.onnxruntime_library in the server \
         config or {LIBRARY_ENV} to a libonnxruntime.so (the onnxruntime PyPI wheel ships \
         one as onnxruntime/capi/libonnxruntime.so.VERSION)"
    ))
}

fn environment() -> std::result::Result<&'static ort::environment::Environment, String> {
    ENVIRONMENT
        .get_or_init(|| {
            let (path, setting) = library()?;
            if !path.is_file() {
                return Err(format!(
                    "{setting}: the onnxruntime library {} does not exist",
                    path.display()
                ));
            }
            tracing::info!(library = %path.display(), "loading onnxruntime");
            ort::init_from(&path)
                .map_err(|e| format!("onnxruntime library {}: {e}", path.display()))?
                .with_name("switchyard")
                .build()
                .map_err(|e| format!("onnxruntime library {}: {e}", path.display()))
        })
        .as_ref()
        .map_err(Clone::clone)
}

fn element_type(d: DataType) -> Option<TensorElementType> {
    Some(match d {
        DataType::Bool => TensorElementType::Bool,
        DataType::Uint8 => TensorElementType::Uint8,
        DataType::Uint16 => TensorElementType::Uint16,
        DataType::Uint32 => TensorElementType::Uint32,
        DataType::Uint64 => TensorElementType::Uint64,
        DataType::Int8 => TensorElementType::Int8,
        DataType::Int16 => TensorElementType::Int16,
        DataType::Int32 => TensorElementType::Int32,
        DataType::Int64 => TensorElementType::Int64,
        DataType::Fp32 => TensorElementType::Float32,
        DataType::Fp64 => TensorElementType::Float64,
        DataType::Bytes => TensorElementType::String,
        DataType::Fp16 | DataType::Bf16 => return None,
    })
}

fn int_parameter(spec: &ModelDefinition, key: &str) -> std::result::Result<Option<usize>, String> {
    spec.config
        .parameters
        .get(key)
        .map(|p| {
            p.string_value.trim().parse::<usize>().map_err(|_| {
                format!(
                    "parameters[\"{key}\"]: '{}' is not a count (0 = onnxruntime's default)",
                    p.string_value
                )
            })
        })
        .transpose()
}

/// Triton's `optimization.graph.level`: -1 basic, 1 extended, 2 none, else all.
fn optimization_level(
    spec: &ModelDefinition,
) -> std::result::Result<GraphOptimizationLevel, String> {
    let level = spec
        .config
        .optimization
        .as_ref()
        .and_then(|o| o.graph.as_ref())
        .map(|g| g.level)
        .unwrap_or(0);
    Ok(match level {
        0 => GraphOptimizationLevel::All,
        -1 => GraphOptimizationLevel::Level1,
        1 => GraphOptimizationLevel::Level2,
        2 => GraphOptimizationLevel::Disable,
        other => {
            return Err(format!(
                "optimization.graph.level: {other} is not one of -1 (basic), 0 (all), \
                 1 (extended), 2 (disabled)"
            ))
        }
    })
}

/// Sessions, one per instance (a session runs one call at a time), and the
/// order of the model's outputs as the config lists them.
pub struct OrtBackend {
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    spec: ModelDefinition,
}

impl OrtBackend {
    pub fn load(spec: &ModelDefinition, file: &Path) -> std::result::Result<Self, String> {
        let env = environment()?;
        let intra = int_parameter(spec, "intra_op_thread_count")?;
        let inter = int_parameter(spec, "inter_op_thread_count")?;
        let parallel = match int_parameter(spec, "execution_mode")? {
            None | Some(0) => false,
            Some(1) => true,
            Some(m) => {
                return Err(format!(
                    "parameters[\"execution_mode\"]: {m} is not 0 (sequential) or 1 (parallel)"
                ))
            }
        };
        let level = optimization_level(spec)?;
        let err = |e: ort::Error| format!("{}: {e}", file.display());
        let session = || -> std::result::Result<Session, String> {
            let mut b = Session::builder(env)
                .map_err(err)?
                .with_optimization_level(level)
                .map_err(|e| err(e.into()))?
                .with_parallel_execution(parallel)
                .map_err(|e| err(e.into()))?;
            if let Some(n) = intra.filter(|&n| n > 0) {
                b = b.with_intra_threads(n).map_err(|e| err(e.into()))?;
            }
            if let Some(n) = inter.filter(|&n| n > 0) {
                b = b.with_inter_threads(n).map_err(|e| err(e.into()))?;
            }
            b.commit_from_file(file).map_err(err)
        };
        let first = session()?;
        check_signature(spec, &first)?;
        let mut sessions = vec![Mutex::new(first)];
        for _ in 1..spec.instances.max(1) {
            sessions.push(Mutex::new(session()?));
        }
        Ok(Self {
            sessions,
            next: AtomicUsize::new(0),
            spec: spec.clone(),
        })
    }
}

/// The config's inputs and outputs against the graph's: every name there,
/// the same element type, the same rank (batch dimension included).
fn check_signature(spec: &ModelDefinition, session: &Session) -> std::result::Result<(), String> {
    let batch = usize::from(spec.max_batch_size > 0);
    for (what, declared, have) in [
        ("input", &spec.inputs, session.inputs()),
        ("output", &spec.outputs, session.outputs()),
    ] {
        let names: Vec<&str> = have.iter().map(|o| o.name()).collect();
        for t in declared.iter() {
            let outlet = have.iter().find(|o| o.name() == t.name).ok_or_else(|| {
                format!(
                    "config.pbtxt declares {what} '{}', which the ONNX model does not have (it has {names:?})",
                    t.name
                )
            })?;
            let want = element_type(t.dtype).ok_or_else(|| {
                format!(
                    "{what} '{}': {} is not supported with onnxruntime",
                    t.name,
                    t.dtype.wire()
                )
            })?;
            match outlet.dtype() {
                ValueType::Tensor { ty, shape, .. } => {
                    if *ty != want {
                        return Err(format!(
                            "config.pbtxt declares {what} '{}' as {}, but the ONNX model has {ty:?}",
                            t.name,
                            t.dtype.wire()
                        ));
                    }
                    if shape.len() != t.dims.len() + batch {
                        return Err(format!(
                            "config.pbtxt declares {what} '{}' with dims {:?}{}, but the ONNX \
                             model's has rank {} (use reshape to map between them)",
                            t.name,
                            t.dims,
                            if batch == 1 {
                                " after the batch dimension"
                            } else {
                                ""
                            },
                            shape.len()
                        ));
                    }
                }
                other => {
                    return Err(format!(
                        "{what} '{}': the ONNX model's is a {other:?}, not a tensor \
                         (export classifiers without ZipMap)",
                        t.name
                    ))
                }
            }
        }
        if what == "input" {
            if let Some(n) = names
                .iter()
                .find(|n| !declared.iter().any(|t| t.name == **n))
            {
                return Err(format!(
                    "the ONNX model's input '{n}' is not declared in config.pbtxt"
                ));
            }
        }
    }
    Ok(())
}

macro_rules! typed {
    ($dtype:expr, $bytes:ident, $T:ident => $body:expr) => {
        match $dtype {
            DataType::Bool => {
                type $T = bool;
                let $bytes: Vec<$T> = $bytes.iter().map(|&b| b != 0).collect();
                $body
            }
            DataType::Uint8 => typed!(@num u8, $bytes, $T => $body),
            DataType::Uint16 => typed!(@num u16, $bytes, $T => $body),
            DataType::Uint32 => typed!(@num u32, $bytes, $T => $body),
            DataType::Uint64 => typed!(@num u64, $bytes, $T => $body),
            DataType::Int8 => typed!(@num i8, $bytes, $T => $body),
            DataType::Int16 => typed!(@num i16, $bytes, $T => $body),
            DataType::Int32 => typed!(@num i32, $bytes, $T => $body),
            DataType::Int64 => typed!(@num i64, $bytes, $T => $body),
            DataType::Fp32 => typed!(@num f32, $bytes, $T => $body),
            DataType::Fp64 => typed!(@num f64, $bytes, $T => $body),
            other => Err(DnnError::unsupported(format!(
                "{} is not supported with onnxruntime",
                other.wire()
            ))),
        }
    };
    (@num $t:ty, $bytes:ident, $T:ident => $body:expr) => {{
        type $T = $t;
        let $bytes: Vec<$T> = $bytes
            .chunks_exact(size_of::<$T>())
            .map(|c| <$T>::from_le_bytes(c.try_into().expect("chunk of the element size")))
            .collect();
        $body
    }};
}

fn to_ort(t: &Tensor) -> Result<DynValue> {
    if t.dtype == DataType::Bytes {
        // onnxruntime's strings are UTF-8 without NUL bytes.
        let strings = bytes_elements(&t.data)?
            .into_iter()
            .map(|e| {
                String::from_utf8(e.to_vec()).map_err(|_| {
                    DnnError::invalid(format!("input '{}': a string is not UTF-8", t.name))
                })
            })
            .collect::<Result<Vec<String>>>()?;
        return ort::value::Tensor::from_string_array((t.shape.clone(), strings.as_slice()))
            .map(|v| v.into_dyn())
            .map_err(|e| DnnError::invalid(format!("input '{}': {e}", t.name)));
    }
    let data = &t.data;
    typed!(t.dtype, data, T => ort::value::Tensor::<T>::from_array((t.shape.clone(), data))
        .map(|v| v.into_dyn())
        .map_err(|e| DnnError::internal(format!("input '{}': {e}", t.name))))
}

fn from_ort(name: &str, dtype: DataType, v: &DynValue) -> Result<Tensor> {
    let fail = |e: ort::Error| DnnError::internal(format!("output '{name}': {e}"));
    macro_rules! bytes {
        ($t:ty, $f:expr) => {{
            let (shape, values) = v.try_extract_tensor::<$t>().map_err(fail)?;
            let data: Vec<u8> = values.iter().flat_map($f).collect();
            (shape.to_vec(), data)
        }};
    }
    let (shape, data) = match dtype {
        DataType::Bytes => {
            let (shape, strings) = v.try_extract_strings().map_err(fail)?;
            let data = encode_bytes(strings.iter().map(|s| s.as_bytes()));
            (shape.to_vec(), data)
        }
        DataType::Bool => bytes!(bool, |&b| [u8::from(b)]),
        DataType::Uint8 => bytes!(u8, |x| x.to_le_bytes()),
        DataType::Uint16 => bytes!(u16, |x| x.to_le_bytes()),
        DataType::Uint32 => bytes!(u32, |x| x.to_le_bytes()),
        DataType::Uint64 => bytes!(u64, |x| x.to_le_bytes()),
        DataType::Int8 => bytes!(i8, |x| x.to_le_bytes()),
        DataType::Int16 => bytes!(i16, |x| x.to_le_bytes()),
        DataType::Int32 => bytes!(i32, |x| x.to_le_bytes()),
        DataType::Int64 => bytes!(i64, |x| x.to_le_bytes()),
        DataType::Fp32 => bytes!(f32, |x| x.to_le_bytes()),
        DataType::Fp64 => bytes!(f64, |x| x.to_le_bytes()),
        other => {
            return Err(DnnError::unsupported(format!(
                "output '{name}': {} is not supported with onnxruntime",
                other.wire()
            )))
        }
    };
    Ok(Tensor::new(name, dtype, shape, data))
}

impl Backend for OrtBackend {
    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let values = inputs
            .iter()
            .map(|t| Ok((t.name.clone(), to_ort(t)?)))
            .collect::<Result<Vec<_>>>()?;
        let pick = self.next.fetch_add(1, Ordering::Relaxed) % self.sessions.len();
        // A session whose lock is held runs another batch; a poisoned one
        // panicked inside onnxruntime and is used as it is.
        let mut session = self.sessions[pick]
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let out = session
            .run(values)
            .map_err(|e| DnnError::internal(format!("onnxruntime execution failed: {e}")))?;
        self.spec
            .outputs
            .iter()
            .map(|t| {
                let v = out.get(&t.name).ok_or_else(|| {
                    DnnError::internal(format!("onnxruntime gave no output '{}'", t.name))
                })?;
                from_ort(&t.name, t.dtype, v)
            })
            .collect()
    }
}
