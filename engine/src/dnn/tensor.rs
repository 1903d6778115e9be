//! Tensors as the protocol carries them: a datatype, a shape and row-major
//! little-endian bytes (BYTES elements each prefixed by a 4-byte length).
use super::error::{DnnError, Result};

/// The protocol's datatypes (`"FP32"` on the wire, `TYPE_FP32` in configs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataType {
    Bool,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Int8,
    Int16,
    Int32,
    Int64,
    Fp16,
    Fp32,
    Fp64,
    Bytes,
    Bf16,
}

const WIRE: [(DataType, &str); 14] = [
    (DataType::Bool, "BOOL"),
    (DataType::Uint8, "UINT8"),
    (DataType::Uint16, "UINT16"),
    (DataType::Uint32, "UINT32"),
    (DataType::Uint64, "UINT64"),
    (DataType::Int8, "INT8"),
    (DataType::Int16, "INT16"),
    (DataType::Int32, "INT32"),
    (DataType::Int64, "INT64"),
    (DataType::Fp16, "FP16"),
    (DataType::Fp32, "FP32"),
    (DataType::Fp64, "FP64"),
    (DataType::Bytes, "BYTES"),
    (DataType::Bf16, "BF16"),
];

impl DataType {
    /// Parses a wire name such as `FP32`.
    pub fn from_wire(name: &str) -> Option<Self> {
        WIRE.iter().find(|(_, n)| *n == name).map(|(d, _)| *d)
    }

    pub fn wire(self) -> &'static str {
        WIRE.iter()
            .find(|(d, _)| *d == self)
            .map(|(_, n)| *n)
            .unwrap_or("BYTES")
    }

    /// From a ModelConfig `DataType` value (`TYPE_STRING` is BYTES).
    pub fn from_config(value: i32) -> Option<Self> {
        use proto::inference::DataType as C;
        Some(match C::try_from(value).ok()? {
            C::TypeBool => Self::Bool,
            C::TypeUint8 => Self::Uint8,
            C::TypeUint16 => Self::Uint16,
            C::TypeUint32 => Self::Uint32,
            C::TypeUint64 => Self::Uint64,
            C::TypeInt8 => Self::Int8,
            C::TypeInt16 => Self::Int16,
            C::TypeInt32 => Self::Int32,
            C::TypeInt64 => Self::Int64,
            C::TypeFp16 => Self::Fp16,
            C::TypeFp32 => Self::Fp32,
            C::TypeFp64 => Self::Fp64,
            C::TypeString => Self::Bytes,
            C::TypeBf16 => Self::Bf16,
            C::TypeInvalid => return None,
        })
    }

    /// Bytes per element; `None` for BYTES, whose elements vary.
    pub fn size(self) -> Option<usize> {
        Some(match self {
            Self::Bool | Self::Uint8 | Self::Int8 => 1,
            Self::Uint16 | Self::Int16 | Self::Fp16 | Self::Bf16 => 2,
            Self::Uint32 | Self::Int32 | Self::Fp32 => 4,
            Self::Uint64 | Self::Int64 | Self::Fp64 => 8,
            Self::Bytes => return None,
        })
    }
}

/// A named tensor. `data` holds the protocol's binary encoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub dtype: DataType,
    pub shape: Vec<i64>,
    pub data: Vec<u8>,
}

/// Number of elements of a shape; an error for negative or overflowing dims.
pub fn element_count(shape: &[i64]) -> Result<usize> {
    shape.iter().try_fold(1usize, |acc, &d| {
        usize::try_from(d)
            .ok()
            .and_then(|d| acc.checked_mul(d))
            .ok_or_else(|| DnnError::invalid(format!("invalid shape {shape:?}")))
    })
}

/// Splits BYTES data into its elements; an error names what is malformed.
pub fn bytes_elements(data: &[u8]) -> Result<Vec<&[u8]>> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() < 4 {
            return Err(DnnError::invalid(
                "BYTES data ends inside a 4-byte length prefix",
            ));
        }
        let len = u32::from_le_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if rest.len() - 4 < len {
            return Err(DnnError::invalid(format!(
                "BYTES element of {len} bytes runs past the end of the data"
            )));
        }
        out.push(&rest[4..4 + len]);
        rest = &rest[4 + len..];
    }
    Ok(out)
}

/// Encodes BYTES elements with their 4-byte length prefixes.
pub fn encode_bytes<'a>(elements: impl IntoIterator<Item = &'a [u8]>) -> Vec<u8> {
    let mut out = Vec::new();
    for e in elements {
        out.extend_from_slice(&(e.len() as u32).to_le_bytes());
        out.extend_from_slice(e);
    }
    out
}

impl Tensor {
    pub fn new(name: impl Into<String>, dtype: DataType, shape: Vec<i64>, data: Vec<u8>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
            data,
        }
    }

    pub fn from_f32(name: impl Into<String>, shape: Vec<i64>, values: &[f32]) -> Self {
        let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        Self::new(name, DataType::Fp32, shape, data)
    }

    pub fn element_count(&self) -> Result<usize> {
        element_count(&self.shape)
    }

    /// Checks that `data` holds exactly the elements `shape` promises.
    pub fn check_size(&self) -> Result<()> {
        let count = self.element_count()?;
        match self.dtype.size() {
            Some(size) => {
                let want = count.checked_mul(size).ok_or_else(|| {
                    DnnError::invalid(format!(
                        "input '{}': shape {:?} of {} is larger than memory",
                        self.name,
                        self.shape,
                        self.dtype.wire()
                    ))
                })?;
                if self.data.len() != want {
                    return Err(DnnError::invalid(format!(
                        "input '{}': {} bytes of data, but shape {:?} of {} needs {want}",
                        self.name,
                        self.data.len(),
                        self.shape,
                        self.dtype.wire()
                    )));
                }
            }
            None => {
                let n = bytes_elements(&self.data)
                    .map_err(|e| DnnError::invalid(format!("input '{}': {e}", self.name)))?
                    .len();
                if n != count {
                    return Err(DnnError::invalid(format!(
                        "input '{}': {n} BYTES elements, but shape {:?} needs {count}",
                        self.name, self.shape
                    )));
                }
            }
        }
        Ok(())
    }

    /// The elements as f32, converting any numeric type (for tree features).
    pub fn to_f32(&self) -> Result<Vec<f32>> {
        fn conv<const N: usize>(d: &[u8], f: impl Fn([u8; N]) -> f32) -> Vec<f32> {
            d.chunks_exact(N)
                .map(|c| f(c.try_into().expect("chunk of N")))
                .collect()
        }
        let d = &self.data;
        Ok(match self.dtype {
            DataType::Fp32 => conv(d, f32::from_le_bytes),
            DataType::Fp64 => conv(d, |b| f64::from_le_bytes(b) as f32),
            DataType::Fp16 => conv(d, |b| half::f16::from_le_bytes(b).to_f32()),
            DataType::Bf16 => conv(d, |b| half::bf16::from_le_bytes(b).to_f32()),
            DataType::Int8 => conv(d, |b: [u8; 1]| b[0] as i8 as f32),
            DataType::Uint8 | DataType::Bool => conv(d, |b: [u8; 1]| b[0] as f32),
            DataType::Int16 => conv(d, |b| i16::from_le_bytes(b) as f32),
            DataType::Uint16 => conv(d, |b| u16::from_le_bytes(b) as f32),
            DataType::Int32 => conv(d, |b| i32::from_le_bytes(b) as f32),
            DataType::Uint32 => conv(d, |b| u32::from_le_bytes(b) as f32),
            DataType::Int64 => conv(d, |b| i64::from_le_bytes(b) as f32),
            DataType::Uint64 => conv(d, |b| u64::from_le_bytes(b) as f32),
            DataType::Bytes => {
                return Err(DnnError::invalid(format!(
                    "'{}' is BYTES where numbers are expected",
                    self.name
                )))
            }
        })
    }

    /// Bytes of one row along the first (batch) dimension; `None` for BYTES.
    fn row_bytes(&self) -> Option<usize> {
        let per_row = element_count(self.shape.get(1..).unwrap_or(&[])).ok()?;
        Some(per_row * self.dtype.size()?)
    }

    /// Joins tensors of equal datatype and inner shape along dimension 0.
    pub fn concat(parts: &[&Tensor]) -> Tensor {
        let first = parts[0];
        let mut shape = first.shape.clone();
        shape[0] = parts.iter().map(|t| t.shape[0]).sum();
        let data = parts.iter().flat_map(|t| t.data.iter().copied()).collect();
        Tensor::new(first.name.clone(), first.dtype, shape, data)
    }

    /// Splits along dimension 0 into pieces of `rows[i]` rows each.
    pub fn split(&self, rows: &[usize]) -> Result<Vec<Tensor>> {
        let total: usize = rows.iter().sum();
        if self.shape.first().copied() != Some(total as i64) {
            return Err(DnnError::internal(format!(
                "output '{}' has shape {:?}, expected {total} rows",
                self.name, self.shape
            )));
        }
        let piece = |data: Vec<u8>, n: usize| {
            let mut shape = self.shape.clone();
            shape[0] = n as i64;
            Tensor::new(self.name.clone(), self.dtype, shape, data)
        };
        if let Some(row) = self.row_bytes() {
            let mut at = 0;
            return Ok(rows
                .iter()
                .map(|&n| {
                    let p = piece(self.data[at..at + n * row].to_vec(), n);
                    at += n * row;
                    p
                })
                .collect());
        }
        let per_row = element_count(&self.shape[1..])?;
        let elements = bytes_elements(&self.data)?;
        let mut at = 0;
        Ok(rows
            .iter()
            .map(|&n| {
                let p = piece(
                    encode_bytes(elements[at..at + n * per_row].iter().copied()),
                    n,
                );
                at += n * per_row;
                p
            })
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_truncation_is_an_error() {
        let data = encode_bytes([b"ab".as_slice(), b"".as_slice(), b"xyz".as_slice()]);
        assert_eq!(
            bytes_elements(&data).unwrap(),
            vec![b"ab".as_slice(), b"", b"xyz"]
        );
        assert!(bytes_elements(&data[..data.len() - 1]).is_err());
        assert!(bytes_elements(&[1, 0]).is_err());
    }

    #[test]
    fn concat_then_split_gives_back_the_parts() {
        let a = Tensor::from_f32("x", vec![1, 2], &[1.0, 2.0]);
        let b = Tensor::from_f32("x", vec![2, 2], &[3.0, 4.0, 5.0, 6.0]);
        let joined = Tensor::concat(&[&a, &b]);
        assert_eq!(joined.shape, vec![3, 2]);
        assert_eq!(joined.split(&[1, 2]).unwrap(), vec![a, b]);

        let s = Tensor::new(
            "s",
            DataType::Bytes,
            vec![3, 1],
            encode_bytes([b"a".as_slice(), b"bb", b"ccc"]),
        );
        let parts = s.split(&[2, 1]).unwrap();
        assert_eq!(
            bytes_elements(&parts[1].data).unwrap(),
            vec![b"ccc".as_slice()]
        );
    }

    #[test]
    fn size_checks_name_the_input() {
        let t = Tensor::new("in", DataType::Fp32, vec![2, 2], vec![0; 12]);
        let e = t.check_size().unwrap_err().message;
        assert!(e.contains("'in'") && e.contains("needs 16"), "{e}");
    }
}
