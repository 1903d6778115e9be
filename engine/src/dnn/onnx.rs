//! ONNX models on tract, a pure-Rust runtime: the graph is typed with the
//! config's shapes (a symbolic batch dimension) and optimized once at load.
use super::backend::Backend;
use super::error::{DnnError, Result};
use super::model::ModelDefinition;
use super::tensor::{element_count, DataType, Tensor};
use std::path::Path;
use std::sync::Arc;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModelExt, IntoRunnable, TDim, TValue, TVec,
    Tensor as TractTensor, TypedRunnableModel,
};
use tract_onnx::tract_hir::infer::Factoid;

pub struct OnnxBackend {
    plan: Arc<TypedRunnableModel>,
    /// For each model input, its index among the config's inputs.
    input_order: Vec<usize>,
    /// For each config output, its index among the model's outputs.
    output_order: Vec<usize>,
    spec: ModelDefinition,
}

fn datum_type(d: DataType) -> Option<DatumType> {
    Some(match d {
        DataType::Bool => DatumType::Bool,
        DataType::Uint8 => DatumType::U8,
        DataType::Uint16 => DatumType::U16,
        DataType::Uint32 => DatumType::U32,
        DataType::Uint64 => DatumType::U64,
        DataType::Int8 => DatumType::I8,
        DataType::Int16 => DatumType::I16,
        DataType::Int32 => DatumType::I32,
        DataType::Int64 => DatumType::I64,
        DataType::Fp16 => DatumType::F16,
        DataType::Fp32 => DatumType::F32,
        DataType::Fp64 => DatumType::F64,
        DataType::Bytes | DataType::Bf16 => return None,
    })
}

impl OnnxBackend {
    pub fn load(spec: &ModelDefinition, file: &Path) -> std::result::Result<Self, String> {
        let err = |e: tract_onnx::prelude::TractError| format!("{}: {e:#}", file.display());
        let mut model = tract_onnx::onnx().model_for_path(file).map_err(err)?;
        let batch = model.sym("N");
        let inputs: Vec<String> = model
            .input_outlets()
            .map_err(err)?
            .iter()
            .map(|o| model.node(o.node).name.clone())
            .collect();
        let mut input_order = Vec::new();
        for (k, name) in inputs.iter().enumerate() {
            let i = spec
                .inputs
                .iter()
                .position(|t| &t.name == name)
                .ok_or_else(|| {
                    format!("the ONNX model's input '{name}' is not declared in config.pbtxt")
                })?;
            let t = &spec.inputs[i];
            let dt = datum_type(t.dtype).ok_or_else(|| {
                format!(
                    "input '{name}': {} is not supported for ONNX",
                    t.dtype.wire()
                )
            })?;
            // A datatype the graph declares must be the config's: tract
            // would otherwise take the config's word and fail, or cast, later.
            let declared = model.input_fact(k).map_err(err)?.datum_type.concretize();
            if let Some(own) = declared.filter(|own| *own != dt) {
                return Err(format!(
                    "config.pbtxt declares input '{name}' as {}, but the ONNX model takes {own:?}",
                    t.dtype.wire()
                ));
            }
            let mut shape: Vec<TDim> = Vec::new();
            if spec.max_batch_size > 0 {
                shape.push(batch.clone().into());
            }
            for (j, &d) in t.dims.iter().enumerate() {
                shape.push(if d < 0 {
                    model.sym(&format!("{name}_{j}")).into()
                } else {
                    (d as usize).into()
                });
            }
            model = model
                .with_input_fact(k, InferenceFact::dt_shape(dt, shape))
                .map_err(err)?;
            input_order.push(i);
        }
        if let Some(t) = spec.inputs.iter().find(|t| !inputs.contains(&t.name)) {
            return Err(format!(
                "config.pbtxt declares input '{}', which the ONNX model does not have (it has {inputs:?})",
                t.name
            ));
        }
        let outputs: Vec<String> = model
            .output_outlets()
            .map_err(err)?
            .iter()
            .map(|o| {
                model
                    .outlet_label(*o)
                    .map(str::to_string)
                    .unwrap_or_else(|| model.node(o.node).name.clone())
            })
            .collect();
        let output_order = spec
            .outputs
            .iter()
            .map(|t| {
                outputs.iter().position(|n| n == &t.name).ok_or_else(|| {
                    format!("config.pbtxt declares output '{}', which the ONNX model does not have (it has {outputs:?})", t.name)
                })
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let plan = model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(err)?;
        Ok(Self {
            plan,
            input_order,
            output_order,
            spec: spec.clone(),
        })
    }
}

fn to_tract(t: &Tensor) -> Result<TValue> {
    let dt = datum_type(t.dtype).ok_or_else(|| {
        DnnError::unsupported(format!(
            "{} inputs are not supported for ONNX",
            t.dtype.wire()
        ))
    })?;
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    // SAFETY: `check_size` has verified that `data` holds exactly shape × size bytes.
    let tensor = unsafe { TractTensor::from_raw_dt(dt, &shape, &t.data) }
        .map_err(|e| DnnError::internal(format!("input '{}': {e}", t.name)))?;
    Ok(tensor.into())
}

fn from_tract(name: &str, dtype: DataType, v: &TractTensor) -> Result<Tensor> {
    let want = datum_type(dtype).expect("config output types are checked at load");
    let v = v
        .cast_to_dt(want)
        .map_err(|e| DnnError::internal(format!("output '{name}': {e}")))?;
    let shape: Vec<i64> = v.shape().iter().map(|&d| d as i64).collect();
    // A tensor's bytes are its elements in row-major order, little-endian on every target tract runs on.
    let data = v.as_bytes().to_vec();
    debug_assert_eq!(
        data.len(),
        element_count(&shape).unwrap_or(0) * dtype.size().unwrap_or(0)
    );
    Ok(Tensor::new(name, dtype, shape, data))
}

impl Backend for OnnxBackend {
    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let values: TVec<TValue> = self
            .input_order
            .iter()
            .map(|&i| to_tract(&inputs[i]))
            .collect::<Result<_>>()?;
        let out = self
            .plan
            .run(values)
            .map_err(|e| DnnError::internal(format!("ONNX execution failed: {e:#}")))?;
        self.spec
            .outputs
            .iter()
            .zip(&self.output_order)
            .map(|(t, &k)| from_tract(&t.name, t.dtype, &out[k]))
            .collect()
    }
}
