//! Tree ensembles served as Triton's FIL backend serves them: FP32 features
//! in `input__0`, and predictions, class ids or class probabilities out.
use super::backend::{output_shape, Backend};
use super::error::{DnnError, Result};
use super::forest::{Forest, Transform};
use super::model::{FilParams, ModelDefinition};
use super::tensor::{element_count, Tensor};
use std::path::Path;

pub struct FilBackend {
    forest: Forest,
    params: FilParams,
    output_name: String,
    output_dims: Vec<i64>,
    spec: ModelDefinition,
}

impl FilBackend {
    pub fn load(
        spec: &ModelDefinition,
        params: &FilParams,
        file: &Path,
    ) -> std::result::Result<Self, String> {
        let bytes = std::fs::read(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let text =
            || std::str::from_utf8(&bytes).map_err(|_| "the model is not text (UTF-8)".to_string());
        let forest = match params.model_type.as_str() {
            "xgboost_json" => text().and_then(super::xgboost::parse),
            "xgboost_ubj" => super::xgboost::parse_ubjson(&bytes),
            _ => text().and_then(super::lightgbm::parse),
        }
        .map_err(|e| format!("{}: {e}", file.display()))?;
        if spec.inputs.len() != 1 || spec.outputs.len() != 1 {
            return Err("a fil model has exactly one input and one output".into());
        }
        let input = &spec.inputs[0];
        if input
            .dims
            .last()
            .is_some_and(|&d| d != -1 && d as usize != forest.num_features)
        {
            return Err(format!(
                "input[0] ('{}').dims {:?}: the model reads {} features",
                input.name, input.dims, forest.num_features
            ));
        }
        let classes = if forest.num_groups == 1 {
            2
        } else {
            forest.num_groups
        };
        let columns = if params.predict_proba {
            classes
        } else if params.is_classifier {
            1
        } else {
            forest.num_groups
        };
        let output = &spec.outputs[0];
        if element_count(&output.dims).ok() != Some(columns) {
            return Err(format!(
                "output[0] ('{}').dims {:?}: the model gives {columns} value(s) per row{}",
                output.name,
                output.dims,
                if params.predict_proba {
                    " (predict_proba)"
                } else {
                    ""
                }
            ));
        }
        Ok(Self {
            forest,
            params: params.clone(),
            output_name: output.name.clone(),
            output_dims: output.dims.clone(),
            spec: spec.clone(),
        })
    }
}

impl Backend for FilBackend {
    fn execute(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>> {
        let x = inputs[0].to_f32()?;
        let nf = self.forest.num_features;
        if x.len() % nf != 0 {
            return Err(DnnError::invalid(format!(
                "input '{}' holds {} values, not a multiple of {nf} features",
                inputs[0].name,
                x.len()
            )));
        }
        let rows = x.len() / nf;
        let preds = self.forest.predict(&x, rows);
        let ng = self.forest.num_groups;
        let binary_probability = ng == 1 && matches!(self.forest.transform, Transform::Sigmoid(_));
        let mut out = Vec::with_capacity(rows * ng.max(2));
        for row in preds.chunks_exact(ng) {
            if self.params.predict_proba {
                if ng == 1 {
                    out.extend([1.0 - row[0] as f32, row[0] as f32]);
                } else {
                    out.extend(row.iter().map(|&p| p as f32));
                }
            } else if self.params.is_classifier {
                let class = if ng == 1 {
                    let threshold = if binary_probability {
                        self.params.threshold as f64
                    } else {
                        0.0
                    };
                    (row[0] > threshold) as usize
                } else {
                    row.iter()
                        .enumerate()
                        .fold(0, |best, (i, &p)| if p > row[best] { i } else { best })
                };
                out.push(class as f32);
            } else {
                out.extend(row.iter().map(|&p| p as f32));
            }
        }
        Ok(vec![Tensor::from_f32(
            self.output_name.clone(),
            output_shape(&self.spec, &self.output_dims, rows),
            &out,
        )])
    }
}
