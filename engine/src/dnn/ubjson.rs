//! Universal Binary JSON (the draft-12 form XGBoost writes its `.ubj` models
//! in) read into a `serde_json::Value`: big-endian numbers, strings and keys
//! with a length prefix, and containers optionally typed (`$`) and counted (`#`).
use serde_json::{Map, Number, Value};

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

/// How deep containers may nest: far more than any model has, few enough
/// that a hostile file cannot exhaust the stack.
const MAX_DEPTH: usize = 64;

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.bytes.len())
            .ok_or_else(|| format!("ends inside a value at byte {}", self.at))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn byte(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }

    fn peek(&self) -> Option<u8> {
        self.bytes.get(self.at).copied()
    }

    fn int(&mut self, marker: u8) -> Result<i64, String> {
        Ok(match marker {
            b'i' => self.byte()? as i8 as i64,
            b'U' => self.byte()? as i64,
            b'I' => i16::from_be_bytes(self.take(2)?.try_into().expect("2 bytes")) as i64,
            b'l' => i32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes")) as i64,
            b'L' => i64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes")),
            m => {
                return Err(format!(
                    "'{}' at byte {} is not a length",
                    m as char,
                    self.at - 1
                ))
            }
        })
    }

    fn length(&mut self) -> Result<usize, String> {
        let m = self.byte()?;
        let n = self.int(m)?;
        usize::try_from(n).map_err(|_| format!("negative length {n} at byte {}", self.at))
    }

    fn string(&mut self) -> Result<String, String> {
        let n = self.length()?;
        String::from_utf8(self.take(n)?.to_vec())
            .map_err(|_| format!("a string before byte {} is not UTF-8", self.at))
    }

    fn value(&mut self, marker: u8, depth: usize) -> Result<Value, String> {
        if depth > MAX_DEPTH {
            return Err(format!("containers nest deeper than {MAX_DEPTH}"));
        }
        Ok(match marker {
            b'Z' => Value::Null,
            b'T' => Value::Bool(true),
            b'F' => Value::Bool(false),
            b'i' | b'U' | b'I' | b'l' | b'L' => Value::from(self.int(marker)?),
            b'd' => {
                let f = f32::from_be_bytes(self.take(4)?.try_into().expect("4 bytes"));
                Number::from_f64(f as f64).map_or(Value::Null, Value::Number)
            }
            b'D' => {
                let f = f64::from_be_bytes(self.take(8)?.try_into().expect("8 bytes"));
                Number::from_f64(f).map_or(Value::Null, Value::Number)
            }
            b'C' => Value::String((self.byte()? as char).to_string()),
            b'S' | b'H' => Value::String(self.string()?),
            b'[' => Value::Array(
                self.container(depth, |_, _| Ok(None))?
                    .into_iter()
                    .map(|(_, v)| v)
                    .collect(),
            ),
            b'{' => Value::Object(
                self.container(depth, |r, _| r.string().map(Some))?
                    .into_iter()
                    .map(|(k, v)| (k.expect("objects have keys"), v))
                    .collect::<Map<String, Value>>(),
            ),
            m => {
                return Err(format!(
                    "'{}' at byte {} is not a UBJSON type",
                    m as char,
                    self.at - 1
                ))
            }
        })
    }

    /// An array's or object's entries (`key` reads an object's key), in
    /// either the counted-and-typed form or the one closed by `]` / `}`.
    fn container(
        &mut self,
        depth: usize,
        key: impl Fn(&mut Self, usize) -> Result<Option<String>, String> + Copy,
    ) -> Result<Vec<(Option<String>, Value)>, String> {
        let mut typed = None;
        if self.peek() == Some(b'$') {
            self.at += 1;
            typed = Some(self.byte()?);
        }
        let count = if self.peek() == Some(b'#') {
            self.at += 1;
            let n = self.length()?;
            // Every entry takes a byte at least: a larger count is a lie
            // that would only make us allocate.
            if n > self.bytes.len() - self.at {
                return Err(format!(
                    "a count of {n} at byte {} is past the input",
                    self.at
                ));
            }
            Some(n)
        } else if typed.is_some() {
            return Err(format!(
                "a typed container without a count at byte {}",
                self.at
            ));
        } else {
            None
        };
        let mut out = Vec::new();
        let mut i = 0;
        loop {
            match count {
                Some(n) if i == n => break,
                None if matches!(self.peek(), Some(b']') | Some(b'}')) => {
                    self.at += 1;
                    break;
                }
                _ => {}
            }
            let k = key(self, i)?;
            let marker = match typed {
                Some(t) => t,
                None => loop {
                    let m = self.byte()?;
                    if m != b'N' {
                        break m;
                    }
                },
            };
            out.push((k, self.value(marker, depth + 1)?));
            i += 1;
        }
        Ok(out)
    }
}

pub fn parse(bytes: &[u8]) -> Result<Value, String> {
    let mut r = Reader { bytes, at: 0 };
    let m = r.byte()?;
    let v = r.value(m, 0)?;
    if r.at != bytes.len() {
        return Err(format!("{} bytes follow the value", bytes.len() - r.at));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_typed_and_untyped_containers() {
        // {"a": [$d#i 2 1.5 -2.0], "b": {"c": "x"}, "n": L 7, "t": T}
        let mut b = vec![b'{'];
        b.extend([b'i', 1, b'a', b'[', b'$', b'd', b'#', b'i', 2]);
        b.extend(1.5f32.to_be_bytes());
        b.extend((-2.0f32).to_be_bytes());
        b.extend([
            b'i', 1, b'b', b'{', b'i', 1, b'c', b'S', b'i', 1, b'x', b'}',
        ]);
        b.extend([b'i', 1, b'n', b'L']);
        b.extend(7i64.to_be_bytes());
        b.extend([b'i', 1, b't', b'T', b'}']);
        let v = parse(&b).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"a": [1.5, -2.0], "b": {"c": "x"}, "n": 7, "t": true})
        );
        assert!(parse(&b[..b.len() - 3]).is_err());
        assert!(parse(&[b'[', b'$', b'd', b'#', b'L', 0x7f, 0, 0, 0, 0, 0, 0, 0]).is_err());
    }
}
