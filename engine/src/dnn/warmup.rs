//! Triton's `model_warmup`: requests made from zeros, random values or a
//! file under `<model>/warmup/`, run on each version before it is ready.
use super::backend::confined;
use super::model::ModelDefinition;
use super::tensor::{element_count, encode_bytes, DataType, Tensor};
use proto::inference::model_warmup::input::InputDataType;
use rand::{Rng, SeedableRng};
use std::path::Path;

/// One warmup sample: its inputs in config order (client shapes, batch
/// dimension included when the model batches), rows, and how often to run it.
pub struct Sample {
    pub name: String,
    pub inputs: Vec<Tensor>,
    pub rows: usize,
    pub count: usize,
}

/// The config's warmup samples, checked against its inputs; errors name the
/// field. `model_dir` holds the `warmup/` folder that data files lie in.
pub fn samples(spec: &ModelDefinition, model_dir: &Path) -> Result<Vec<Sample>, String> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(0);
    let batching = spec.max_batch_size > 0;
    spec.config
        .model_warmup
        .iter()
        .enumerate()
        .map(|(i, w)| {
            let at = format!("model_warmup[{i}] ('{}')", w.name);
            let rows = w.batch_size.max(1) as usize;
            if batching && rows > spec.max_batch_size {
                return Err(format!(
                    "{at}.batch_size: {rows} is more than max_batch_size ({})",
                    spec.max_batch_size
                ));
            }
            if !batching && w.batch_size > 1 {
                return Err(format!(
                    "{at}.batch_size: {} needs a model that batches (max_batch_size is 0)",
                    w.batch_size
                ));
            }
            if let Some(extra) = w
                .inputs
                .keys()
                .find(|k| !spec.inputs.iter().any(|t| &t.name == *k))
            {
                return Err(format!(
                    "{at}.inputs: '{extra}' is not an input of the model"
                ));
            }
            let inputs = spec
                .inputs
                .iter()
                .map(|t| {
                    let field = format!("{at}.inputs[\"{}\"]", t.name);
                    let input = w
                        .inputs
                        .get(&t.name)
                        .ok_or_else(|| format!("{field}: missing; warmup gives every input"))?;
                    if DataType::from_config(input.data_type) != Some(t.dtype) {
                        return Err(format!(
                            "{field}.data_type: the model's input is {}",
                            t.dtype.wire()
                        ));
                    }
                    let fits = input.dims.len() == t.dims.len()
                        && input
                            .dims
                            .iter()
                            .zip(&t.dims)
                            .all(|(&g, &w)| g > 0 && (w == -1 || g == w));
                    if !fits {
                        return Err(format!(
                            "{field}.dims: {:?} does not fit the input's dims {:?}",
                            input.dims, t.dims
                        ));
                    }
                    let shape: Vec<i64> = batching
                        .then_some(rows as i64)
                        .into_iter()
                        .chain(input.dims.iter().copied())
                        .collect();
                    let n = element_count(&shape).map_err(|e| format!("{field}: {e}"))?;
                    let data = match &input.input_data_type {
                        Some(InputDataType::ZeroData(true)) => zeros(t.dtype, n),
                        Some(InputDataType::RandomData(true)) => random(t.dtype, n, &mut rng),
                        Some(InputDataType::InputDataFile(file)) => {
                            let field = format!("{field}.input_data_file");
                            let folder = model_dir.join("warmup");
                            if !folder.is_dir() {
                                return Err(format!(
                                    "{field}: '{file}' is not there: warmup files lie in {}",
                                    folder.display()
                                ));
                            }
                            let path = confined(&folder, file, &field)?;
                            let data = std::fs::read(&path)
                                .map_err(|e| format!("{field}: {}: {e}", path.display()))?;
                            // Each row of a batch is the file's content.
                            data.repeat(if batching { rows } else { 1 })
                        }
                        _ => {
                            return Err(format!(
                                "{field}: set one of zero_data, random_data, input_data_file"
                            ))
                        }
                    };
                    let tensor = Tensor::new(t.name.clone(), t.dtype, shape, data);
                    tensor
                        .check_size()
                        .map_err(|e| format!("{field}: {}", e.message))?;
                    Ok(tensor)
                })
                .collect::<Result<Vec<_>, String>>()?;
            Ok(Sample {
                name: w.name.clone(),
                inputs,
                rows,
                count: w.count.max(1) as usize,
            })
        })
        .collect()
}

fn zeros(dtype: DataType, n: usize) -> Vec<u8> {
    match dtype.size() {
        Some(size) => vec![0; n * size],
        // BYTES: empty strings.
        None => encode_bytes(std::iter::repeat_n(&[][..], n)),
    }
}

/// Values in [0, 1) for floats, 0..=9 for integers (small enough for any
/// index input), random bits for booleans, ten printable bytes for strings.
fn random(dtype: DataType, n: usize, rng: &mut impl Rng) -> Vec<u8> {
    let mut out = Vec::new();
    for _ in 0..n {
        let v: f64 = rng.gen();
        let digit = (v * 10.0) as u8;
        match dtype {
            DataType::Fp32 => out.extend((v as f32).to_le_bytes()),
            DataType::Fp64 => out.extend(v.to_le_bytes()),
            DataType::Fp16 => out.extend(half::f16::from_f64(v).to_le_bytes()),
            DataType::Bf16 => out.extend(half::bf16::from_f64(v).to_le_bytes()),
            DataType::Bool => out.push(u8::from(v < 0.5)),
            DataType::Bytes => {
                let s: Vec<u8> = (0..10).map(|_| rng.gen_range(b'a'..=b'z')).collect();
                out.extend((s.len() as u32).to_le_bytes());
                out.extend(s);
            }
            other => {
                let size = other.size().expect("fixed-size integer");
                let mut bytes = vec![0; size];
                bytes[0] = digit;
                out.extend(bytes);
            }
        }
    }
    out
}
