//! AutoAWQ's checkpoint layout (`version: gemm`), read and written: per
//! projection `[n, k]` (out, in), `qweight` int32 `[k, n/8]` and `qzeros`
//! int32 `[k/group, n/8]` hold eight 4-bit values along the output dimension
//! in AWQ's interleaved order, `scales` f16 `[k/group, n]`; the weight is
//! `(q − z)·s`. `config.json` names it under `quantization_config`.
use super::Int4;
use crate::llm::error::{LlmError, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;

/// Nibble `i` (bits `4i..4i+4`) of a packed int32 holds column
/// `8·j + AWQ_ORDER[i]` of its eight.
const AWQ_ORDER: [usize; 8] = [0, 2, 4, 6, 1, 3, 5, 7];

/// `[rows, cols]` codes (0..16) packed eight to an int32 along the columns.
pub fn pack(codes: &[u8], rows: usize, cols: usize) -> Vec<i32> {
    assert!(cols.is_multiple_of(8) && codes.len() == rows * cols);
    codes
        .chunks_exact(8)
        .map(|eight| {
            AWQ_ORDER.iter().enumerate().fold(0u32, |acc, (i, &c)| {
                acc | ((eight[c] as u32 & 0xF) << (4 * i))
            }) as i32
        })
        .collect()
}

/// The inverse of [`pack`].
pub fn unpack(packed: &[i32], rows: usize, cols: usize) -> Vec<u8> {
    assert!(packed.len() * 8 == rows * cols);
    let mut out = vec![0u8; rows * cols];
    for (eight, &p) in out.chunks_exact_mut(8).zip(packed) {
        for (i, &c) in AWQ_ORDER.iter().enumerate() {
            eight[c] = ((p as u32 >> (4 * i)) & 0xF) as u8;
        }
    }
    out
}

fn transpose<T: Copy + Default>(v: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut out = vec![T::default(); v.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = v[r * cols + c];
        }
    }
    out
}

/// `quantization_config` of an AWQ checkpoint's `config.json`, with
/// AutoAWQ's own key names (`w_bit`, `q_group_size`) or Transformers'
/// (`bits`, `group_size`).
#[derive(Debug, Clone, PartialEq)]
pub struct AwqConfig {
    pub group_size: usize,
}

impl AwqConfig {
    /// Reads `quantization_config`; `None` when the checkpoint has none.
    /// Another method, or an AWQ variant our kernels do not run, is refused
    /// with the key named.
    pub fn from_config_json(config: &serde_json::Value) -> Result<Option<Self>> {
        let q = &config["quantization_config"];
        if q.is_null() {
            return Ok(None);
        }
        let bad = |m: String| {
            Err(LlmError::Unsupported(format!(
                "config.json quantization_config: {m}"
            )))
        };
        let method = q["quant_method"].as_str().unwrap_or("");
        if method != "awq" {
            return bad(format!(
                "quant_method `{method}` is not loaded; supported: awq (or quantize at load with `quantization: int8`)"
            ));
        }
        let num = |a: &str, b: &str| q[a].as_u64().or_else(|| q[b].as_u64());
        match num("bits", "w_bit") {
            Some(4) => {}
            other => {
                return bad(format!(
                    "bits (w_bit) is {other:?}; AWQ checkpoints load with 4 bits"
                ))
            }
        }
        let version = q["version"].as_str().unwrap_or("gemm").to_ascii_lowercase();
        if version != "gemm" {
            return bad(format!(
                "version `{version}`: only AutoAWQ's `gemm` packing is read"
            ));
        }
        if q["zero_point"].as_bool() == Some(false) {
            return bad("zero_point false: only checkpoints with zero points are read".into());
        }
        let group_size = match num("group_size", "q_group_size") {
            Some(g) if g > 0 && g % 32 == 0 => g as usize,
            other => {
                return bad(format!(
                    "group_size (q_group_size) is {other:?}; a positive multiple of 32 is needed"
                ))
            }
        };
        Ok(Some(Self { group_size }))
    }

    /// The `quantization_config` this checkpoint is written with: both key
    /// spellings, so that Transformers, vLLM and AutoAWQ read it.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "quant_method": "awq",
            "version": "gemm",
            "bits": 4,
            "w_bit": 4,
            "group_size": self.group_size,
            "q_group_size": self.group_size,
            "zero_point": true,
            "modules_to_not_convert": null,
        })
    }
}

impl Int4 {
    /// The three tensors AutoAWQ stores for this projection, under `prefix`
    /// (e.g. `model.layers.0.mlp.down_proj`).
    pub fn awq_tensors(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let (n, k, groups) = (self.n, self.k, self.k / self.group);
        let cpu = &Device::Cpu;
        let q = pack(&transpose(&self.q, n, k), k, n);
        let z = pack(&transpose(&self.zeros, n, groups), groups, n);
        let s = Tensor::from_vec(transpose(&self.scales, n, groups), (groups, n), cpu)?
            .to_dtype(DType::F16)?;
        Ok(vec![
            (
                format!("{prefix}.qweight"),
                Tensor::from_vec(q, (k, n / 8), cpu)?,
            ),
            (
                format!("{prefix}.qzeros"),
                Tensor::from_vec(z, (groups, n / 8), cpu)?,
            ),
            (format!("{prefix}.scales"), s),
        ])
    }

    /// Reads projection `prefix` of `[n, k]` from AutoAWQ's tensors; a
    /// missing tensor or a shape that does not fit names the tensor.
    pub fn from_awq(
        get: &dyn Fn(&str, DType) -> candle_core::Result<Tensor>,
        prefix: &str,
        n: usize,
        k: usize,
        group: usize,
    ) -> Result<Self> {
        let bad = |m: String| LlmError::Unsupported(format!("AWQ checkpoint: {m}"));
        if !k.is_multiple_of(group) || !n.is_multiple_of(8) {
            return Err(bad(format!(
                "{prefix} is [{n}, {k}]: group_size {group} must divide its {k} inputs and 8 its {n} outputs"
            )));
        }
        let groups = k / group;
        let load = |name: &str, dtype: DType, shape: (usize, usize)| -> Result<Tensor> {
            let full = format!("{prefix}.{name}");
            let t = get(&full, dtype).map_err(|e| bad(format!("{full}: {e}")))?;
            if t.dims() != [shape.0, shape.1] {
                return Err(bad(format!(
                    "{full} has shape {:?}; a [{n}, {k}] projection in groups of {group} needs [{}, {}]",
                    t.dims(),
                    shape.0,
                    shape.1
                )));
            }
            Ok(t)
        };
        let qweight = load("qweight", DType::I32, (k, n / 8))?;
        let qzeros = load("qzeros", DType::I32, (groups, n / 8))?;
        let scales = load("scales", DType::F32, (groups, n))?;
        let flat_i32 = |t: Tensor| -> Result<Vec<i32>> { Ok(t.flatten_all()?.to_vec1()?) };
        Ok(Self {
            n,
            k,
            group,
            q: transpose(&unpack(&flat_i32(qweight)?, k, n), k, n),
            zeros: transpose(&unpack(&flat_i32(qzeros)?, groups, n), groups, n),
            scales: transpose(&scales.flatten_all()?.to_vec1()?, groups, n),
        })
    }
}

/// Writes `tensors` as one safetensors file.
pub fn save(tensors: HashMap<String, Tensor>, path: &std::path::Path) -> Result<()> {
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packing_follows_awq_order() {
        // Columns 0..8 hold 0..8: nibble i carries column AWQ_ORDER[i].
        let codes: Vec<u8> = (0..8).collect();
        let p = pack(&codes, 1, 8)[0] as u32;
        assert_eq!(p, 0x7531_6420);
        assert_eq!(unpack(&[p as i32], 1, 8), codes);
    }

    #[test]
    fn int4_survives_the_awq_tensors() {
        let (n, k, group) = (16, 64, 32);
        let w: Vec<f32> = (0..n * k)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 30.0)
            .collect();
        let q = Int4::quantize(&w, n, k, group);
        let tensors: HashMap<String, Tensor> = q.awq_tensors("p").unwrap().into_iter().collect();
        let get = |name: &str, dtype: DType| tensors[name].to_dtype(dtype);
        assert_eq!(Int4::from_awq(&get, "p", n, k, group).unwrap(), q);
        // A shape that does not fit names the tensor.
        let e = Int4::from_awq(&get, "p", n, 2 * k, group)
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.qweight") && e.contains("[64, 2]"), "{e}");
        let missing = |name: &str, dtype: DType| {
            if name.ends_with("qzeros") {
                candle_core::bail!("no such tensor")
            }
            tensors[name].to_dtype(dtype)
        };
        let e = Int4::from_awq(&missing, "p", n, k, group)
            .unwrap_err()
            .to_string();
        assert!(e.contains("p.qzeros"), "{e}");
    }

    #[test]
    fn config_refusals_name_the_key() {
        let cfg = |q: serde_json::Value| {
            AwqConfig::from_config_json(&serde_json::json!({"quantization_config": q}))
        };
        let ok = cfg(
            serde_json::json!({"quant_method":"awq","w_bit":4,"q_group_size":128,"zero_point":true,"version":"GEMM"}),
        );
        assert_eq!(ok.unwrap(), Some(AwqConfig { group_size: 128 }));
        for (q, word) in [
            (
                serde_json::json!({"quant_method":"awq","bits":8,"group_size":128}),
                "bits",
            ),
            (serde_json::json!({"quant_method":"gptq","bits":4}), "gptq"),
            (
                serde_json::json!({"quant_method":"awq","bits":4,"group_size":128,"version":"gemv"}),
                "gemv",
            ),
            (
                serde_json::json!({"quant_method":"awq","bits":4,"group_size":100}),
                "group_size",
            ),
        ] {
            let e = cfg(q).unwrap_err().to_string();
            assert!(e.contains(word), "{e}");
        }
    }
}
