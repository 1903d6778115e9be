//! KServe v2's HTTP tensor encoding: JSON `data` (nested lists, typed,
//! non-finite floats as strings), Triton's binary extension
//! (`Inference-Header-Content-Length`) both ways, and compressed answers.
use super::encode;
use axum::http::{header, HeaderMap};
use engine::dnn::tensor::{bytes_elements, element_count, encode_bytes};
use engine::dnn::{DataType, DnnError, InferRequest, InferResponse, RequestedOutput, Tensor};
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::io::Write;
use std::time::Duration;

pub const HEADER_LENGTH: &str = "inference-header-content-length";

/// How the client wants each output: binary (the extension) or JSON data.
pub struct OutputFormat {
    default_binary: bool,
    binary: HashMap<String, bool>,
}

fn flatten<'a>(v: &'a Value, out: &mut Vec<&'a Value>) {
    match v {
        Value::Array(items) => items.iter().for_each(|i| flatten(i, out)),
        other => out.push(other),
    }
}

/// JSON `data` (flat or nested) as the tensor's binary encoding.
fn json_data(
    name: &str,
    dtype: DataType,
    shape: &[i64],
    data: &Value,
) -> Result<Vec<u8>, DnnError> {
    let mut flat = Vec::new();
    flatten(data, &mut flat);
    let want = element_count(shape)?;
    if flat.len() != want {
        return Err(DnnError::invalid(format!(
            "input '{name}': {} values in 'data', but shape {shape:?} holds {want}",
            flat.len()
        )));
    }
    let bad = |v: &Value| {
        DnnError::invalid(format!(
            "input '{name}': {v} is not a valid {} value",
            dtype.wire()
        ))
    };
    let float = |v: &Value| match v.as_str() {
        Some("NaN") => Some(f64::NAN),
        Some("Infinity") => Some(f64::INFINITY),
        Some("-Infinity") => Some(f64::NEG_INFINITY),
        _ => v.as_f64(),
    };
    let flat = flat.into_iter();
    match dtype {
        DataType::Bytes => {
            let strings = flat
                .map(|v| v.as_str().map(str::as_bytes).ok_or_else(|| bad(v)))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(encode_bytes(strings))
        }
        DataType::Bool => encode(name, dtype, flat, Value::as_bool, |b| [b as u8]),
        DataType::Uint8 => encode(name, dtype, flat, int::<u8>, u8::to_le_bytes),
        DataType::Int8 => encode(name, dtype, flat, int::<i8>, i8::to_le_bytes),
        DataType::Uint16 => encode(name, dtype, flat, int::<u16>, u16::to_le_bytes),
        DataType::Int16 => encode(name, dtype, flat, int::<i16>, i16::to_le_bytes),
        DataType::Uint32 => encode(name, dtype, flat, int::<u32>, u32::to_le_bytes),
        DataType::Int32 => encode(name, dtype, flat, int::<i32>, i32::to_le_bytes),
        DataType::Uint64 => encode(name, dtype, flat, int::<u64>, u64::to_le_bytes),
        DataType::Int64 => encode(name, dtype, flat, int::<i64>, i64::to_le_bytes),
        DataType::Fp16 => encode(name, dtype, flat, float, |f| {
            half::f16::from_f64(f).to_le_bytes()
        }),
        DataType::Bf16 => encode(name, dtype, flat, float, |f| {
            half::bf16::from_f64(f).to_le_bytes()
        }),
        DataType::Fp32 => encode(name, dtype, flat, float, |f| (f as f32).to_le_bytes()),
        DataType::Fp64 => encode(name, dtype, flat, float, f64::to_le_bytes),
    }
}

/// A JSON integer, if it fits `T`.
fn int<T: TryFrom<i128>>(v: &Value) -> Option<T> {
    let n = v
        .as_i64()
        .map(i128::from)
        .or_else(|| v.as_u64().map(i128::from))?;
    T::try_from(n).ok()
}

/// A tensor's elements as flat JSON (BYTES as strings).
pub fn tensor_json(t: &Tensor) -> Value {
    fn each<const N: usize>(d: &[u8], f: impl Fn([u8; N]) -> Value) -> Vec<Value> {
        d.chunks_exact(N)
            .map(|c| f(c.try_into().expect("chunk of N")))
            .collect()
    }
    let d = &t.data;
    Value::Array(match t.dtype {
        DataType::Bool => d.iter().map(|&b| Value::Bool(b != 0)).collect(),
        DataType::Uint8 => d.iter().map(|&b| b.into()).collect(),
        DataType::Int8 => d.iter().map(|&b| (b as i8).into()).collect(),
        DataType::Uint16 => each(d, |b| u16::from_le_bytes(b).into()),
        DataType::Int16 => each(d, |b| i16::from_le_bytes(b).into()),
        DataType::Uint32 => each(d, |b| u32::from_le_bytes(b).into()),
        DataType::Int32 => each(d, |b| i32::from_le_bytes(b).into()),
        DataType::Uint64 => each(d, |b| u64::from_le_bytes(b).into()),
        DataType::Int64 => each(d, |b| i64::from_le_bytes(b).into()),
        DataType::Fp16 => each(d, |b| half::f16::from_le_bytes(b).to_f64().into()),
        DataType::Bf16 => each(d, |b| half::bf16::from_le_bytes(b).to_f64().into()),
        DataType::Fp32 => each(d, |b| (f32::from_le_bytes(b) as f64).into()),
        DataType::Fp64 => each(d, |b| f64::from_le_bytes(b).into()),
        DataType::Bytes => bytes_elements(d)
            .unwrap_or_default()
            .into_iter()
            .map(|e| String::from_utf8_lossy(e).into_owned().into())
            .collect(),
    })
}

fn shape_of(name: &str, v: &Value) -> Result<Vec<i64>, DnnError> {
    v.as_array()
        .and_then(|dims| {
            dims.iter()
                .map(|d| d.as_i64().filter(|d| *d >= 0))
                .collect::<Option<Vec<_>>>()
        })
        .ok_or_else(|| {
            DnnError::invalid(format!(
                "input '{name}': 'shape' must be a list of non-negative integers"
            ))
        })
}

/// Python's `json` (and so tritonclient) writes NaN and infinities as bare
/// `NaN` / `Infinity` / `-Infinity`, which JSON does not have; this quotes
/// them outside strings so they parse, and float inputs accept the strings.
fn quote_non_finite(head: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    let has = |t: &[u8]| head.windows(t.len()).any(|w| w == t);
    if !has(b"NaN") && !has(b"Infinity") {
        return std::borrow::Cow::Borrowed(head);
    }
    let mut out = Vec::with_capacity(head.len() + 16);
    let (mut in_string, mut escaped) = (false, false);
    let mut i = 0;
    while i < head.len() {
        let c = head[i];
        if in_string {
            if escaped {
                escaped = false;
            } else if c == b'\\' {
                escaped = true;
            } else if c == b'"' {
                in_string = false;
            }
        } else if c == b'"' {
            in_string = true;
        } else if let Some(token) = [b"NaN".as_slice(), b"Infinity", b"-Infinity"]
            .into_iter()
            .find(|t| head[i..].starts_with(t))
        {
            out.push(b'"');
            out.extend_from_slice(token);
            out.push(b'"');
            i += token.len();
            continue;
        }
        out.push(c);
        i += 1;
    }
    std::borrow::Cow::Owned(out)
}

/// Parses an infer request: JSON alone, or a JSON header followed by the
/// binary tensors, or (header length 0) one raw input tensor.
pub fn parse_infer(
    model: String,
    version: Option<i64>,
    headers: &HeaderMap,
    body: &[u8],
    repo: Option<&engine::dnn::ModelRepository>,
) -> Result<(InferRequest, OutputFormat), DnnError> {
    let header_len = match headers.get(HEADER_LENGTH) {
        None => None,
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| {
                    DnnError::invalid("Inference-Header-Content-Length is not a number")
                })?,
        ),
    };
    if let Some(n) = header_len.filter(|&n| n > body.len()) {
        return Err(DnnError::invalid(format!(
            "Inference-Header-Content-Length ({n}) is larger than the body ({} bytes)",
            body.len()
        )));
    }
    if header_len == Some(0) {
        let repo =
            repo.ok_or_else(|| DnnError::invalid("a raw binary request needs a repository model"))?;
        return raw_request(model, version, body, repo);
    }
    let (head, mut binary) = body.split_at(header_len.unwrap_or(body.len()));
    let head = quote_non_finite(head);
    let req: Value = serde_json::from_slice(&head)
        .map_err(|e| DnnError::invalid(format!("failed to parse the request JSON buffer: {e}")))?;
    let obj = req
        .as_object()
        .ok_or_else(|| DnnError::invalid("the request must be a JSON object"))?;
    let empty = Map::new();
    let params = obj
        .get("parameters")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    let inputs_json = obj
        .get("inputs")
        .and_then(Value::as_array)
        .ok_or_else(|| DnnError::invalid("the request has no 'inputs' list"))?;
    let mut inputs = Vec::with_capacity(inputs_json.len());
    for (i, input) in inputs_json.iter().enumerate() {
        let name = input["name"]
            .as_str()
            .ok_or_else(|| DnnError::invalid(format!("inputs[{i}] has no 'name'")))?
            .to_string();
        let dt_name = input["datatype"].as_str().unwrap_or("");
        let dtype = DataType::from_wire(dt_name).ok_or_else(|| {
            DnnError::invalid(format!("input '{name}': invalid datatype '{dt_name}'"))
        })?;
        let shape = shape_of(&name, &input["shape"])?;
        let data = match input["parameters"]["binary_data_size"].as_u64() {
            Some(size) => {
                let size = size as usize;
                if size > binary.len() {
                    return Err(DnnError::invalid(format!(
                        "input '{name}': binary_data_size is {size} bytes, but only {} bytes of binary data remain",
                        binary.len()
                    )));
                }
                let (mine, rest) = binary.split_at(size);
                binary = rest;
                mine.to_vec()
            }
            None => match input.get("data") {
                Some(data) => json_data(&name, dtype, &shape, data)?,
                None => {
                    return Err(DnnError::invalid(format!(
                        "input '{name}' has neither 'data' nor binary_data_size"
                    )))
                }
            },
        };
        inputs.push(Tensor::new(name, dtype, shape, data));
    }
    if !binary.is_empty() {
        return Err(DnnError::invalid(format!(
            "{} bytes of binary data follow the inputs that no binary_data_size claims",
            binary.len()
        )));
    }
    let mut format = OutputFormat {
        default_binary: params
            .get("binary_data_output")
            .and_then(Value::as_bool)
            .unwrap_or(false),
        binary: HashMap::new(),
    };
    let mut outputs = Vec::new();
    for (i, o) in obj
        .get("outputs")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let name = o["name"]
            .as_str()
            .ok_or_else(|| DnnError::invalid(format!("outputs[{i}] has no 'name'")))?
            .to_string();
        if let Some(b) = o["parameters"]["binary_data"].as_bool() {
            format.binary.insert(name.clone(), b);
        }
        let classification = match &o["parameters"]["classification"] {
            Value::Null => None,
            v => Some(v.as_u64().filter(|&k| k > 0).ok_or_else(|| {
                DnnError::invalid(format!(
                    "output '{name}': classification must be a positive integer"
                ))
            })? as usize),
        };
        outputs.push(RequestedOutput {
            name,
            classification,
        });
    }
    let timeout = params
        .get("timeout")
        .and_then(Value::as_u64)
        .map(Duration::from_micros);
    Ok((
        InferRequest {
            model,
            version,
            id: obj
                .get("id")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
            inputs,
            outputs,
            timeout,
        },
        format,
    ))
}

/// `Inference-Header-Content-Length: 0`: the body is the model's single input, batch 1.
fn raw_request(
    model: String,
    version: Option<i64>,
    body: &[u8],
    repo: &engine::dnn::ModelRepository,
) -> Result<(InferRequest, OutputFormat), DnnError> {
    let (m, _) = repo.version(&model, version)?;
    let spec = &m.spec;
    let [input] = spec.inputs.as_slice() else {
        return Err(DnnError::invalid(format!(
            "a raw binary request needs a model with one input; '{model}' has {}",
            spec.inputs.len()
        )));
    };
    let mut shape = if spec.max_batch_size > 0 {
        vec![1]
    } else {
        vec![]
    };
    shape.extend(&input.dims);
    if shape.iter().any(|&d| d < 0) {
        return Err(DnnError::invalid(format!(
            "a raw binary request needs fixed dims; input '{}' has {:?}",
            input.name, input.dims
        )));
    }
    let tensor = Tensor::new(input.name.clone(), input.dtype, shape, body.to_vec());
    Ok((
        InferRequest {
            model,
            version,
            id: String::new(),
            inputs: vec![tensor],
            outputs: vec![],
            timeout: None,
        },
        OutputFormat {
            default_binary: true,
            binary: HashMap::new(),
        },
    ))
}

pub fn infer_body(resp: InferResponse, format: &OutputFormat) -> (Vec<u8>, Option<usize>) {
    let mut outputs = Vec::with_capacity(resp.outputs.len());
    let mut binary: Vec<&[u8]> = Vec::new();
    for t in &resp.outputs {
        let mut o = json!({"name": t.name, "datatype": t.dtype.wire(), "shape": t.shape});
        if *format.binary.get(&t.name).unwrap_or(&format.default_binary) {
            o["parameters"] = json!({"binary_data_size": t.data.len()});
            binary.push(&t.data);
        } else {
            o["data"] = tensor_json(t);
        }
        outputs.push(o);
    }
    let mut head = json!({"model_name": resp.model_name, "model_version": resp.model_version, "outputs": outputs});
    if !resp.id.is_empty() {
        head["id"] = resp.id.as_str().into();
    }
    let mut body = serde_json::to_vec(&head).expect("JSON serializes");
    if binary.is_empty() {
        return (body, None);
    }
    let header_len = body.len();
    binary.iter().for_each(|b| body.extend_from_slice(b));
    (body, Some(header_len))
}

/// Compresses the response as `Accept-Encoding` asks (gzip or deflate).
pub fn encode_response(headers: &HeaderMap, body: Vec<u8>) -> (Option<&'static str>, Vec<u8>) {
    let accept = headers
        .get(header::ACCEPT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let wants = |name: &str| {
        accept
            .split(',')
            .any(|e| e.split(';').next().unwrap_or("").trim() == name)
    };
    let compressed = if wants("gzip") {
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&body)
            .and_then(|_| enc.finish())
            .ok()
            .map(|b| ("gzip", b))
    } else if wants("deflate") {
        let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&body)
            .and_then(|_| enc.finish())
            .ok()
            .map(|b| ("deflate", b))
    } else {
        None
    };
    match compressed {
        Some((name, b)) => (Some(name), b),
        None => (None, body),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_data_accepts_nested_lists_and_checks_types() {
        let d = json_data("x", DataType::Int8, &[2, 2], &json!([[1, -2], [3, 127]])).unwrap();
        assert_eq!(d, vec![1, 0xfe, 3, 127]);
        let e = json_data("x", DataType::Int8, &[1], &json!([128])).unwrap_err();
        assert!(
            e.message.contains("128 is not a valid INT8"),
            "{}",
            e.message
        );
        let e = json_data("x", DataType::Fp32, &[3], &json!([1.0, 2.0])).unwrap_err();
        assert!(e.message.contains("2 values"), "{}", e.message);
        let nan = json_data("x", DataType::Fp32, &[2], &json!(["NaN", "-Infinity"])).unwrap();
        assert!(f32::from_le_bytes(nan[..4].try_into().unwrap()).is_nan());
        let q = quote_non_finite(br#"{"a": [NaN, -Infinity, "NaN x"]}"#);
        assert_eq!(&*q, br#"{"a": ["NaN", "-Infinity", "NaN x"]}"#.as_slice());
        let s = json_data("s", DataType::Bytes, &[2], &json!(["hi", ""])).unwrap();
        assert_eq!(s, encode_bytes([b"hi".as_slice(), b""]));
        let t = Tensor::new("s", DataType::Bytes, vec![2], s);
        assert_eq!(tensor_json(&t), json!(["hi", ""]));
    }
}
