//! One validation for every LLM front: the OpenAI API and KServe's `infer`,
//! `generate` and gRPC streaming fill the same `SamplingFields`, and
//! `validate` gives the same ranges and messages for all of them; each front
//! maps a `ParamError` to its protocol's error shape.
use engine::llm::SamplingParams;
use serde::Deserialize;
use serde_json::{Map, Value};
use std::collections::HashMap;

/// A parameter the request got wrong, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamError {
    pub param: &'static str,
    pub message: String,
}

impl ParamError {
    fn new(param: &'static str, message: impl Into<String>) -> Self {
        Self {
            param,
            message: message.into(),
        }
    }
}

/// `stop`: one string or a list.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// The generation parameters as a request gives them, before any check.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct SamplingFields {
    pub max_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub min_p: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub presence_penalty: Option<f64>,
    pub repetition_penalty: Option<f64>,
    pub seed: Option<i64>,
    pub n: Option<i64>,
    pub stop: Option<OneOrMany>,
    pub ignore_eos: Option<bool>,
    pub min_tokens: Option<i64>,
    /// Token id (as a string) → bias added to its logit, in [−100, 100].
    pub logit_bias: Option<HashMap<String, f64>>,
}

/// A checked generation request's parameters, the same for every front.
#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub sampling: SamplingParams,
    /// `None`: the front's default (the rest of the context, or 16).
    pub max_tokens: Option<usize>,
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
    /// Choices to generate.
    pub n: usize,
}

/// The longest `stop` list, and the longest stop string, accepted.
const MAX_STOPS: usize = 16;
const MAX_STOP_CHARS: usize = 1024;

fn in_range(
    param: &'static str,
    v: Option<f64>,
    lo: f64,
    hi: f64,
    default: f32,
) -> Result<f32, ParamError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && x >= lo && x <= hi => Ok(x as f32),
        Some(x) => Err(ParamError::new(
            param,
            format!("`{param}` must be between {lo} and {hi}, got {x}"),
        )),
    }
}

/// Sampling keys of a KServe request, by their JSON type: Triton's vLLM
/// backend takes each also as a string holding the value.
enum Kind {
    Float,
    Int,
    Bool,
    Stop,
}

const KSERVE_KEYS: [(&str, Kind); 13] = [
    ("max_tokens", Kind::Int),
    ("temperature", Kind::Float),
    ("top_p", Kind::Float),
    ("top_k", Kind::Int),
    ("min_p", Kind::Float),
    ("frequency_penalty", Kind::Float),
    ("presence_penalty", Kind::Float),
    ("repetition_penalty", Kind::Float),
    ("seed", Kind::Int),
    ("n", Kind::Int),
    ("stop", Kind::Stop),
    ("ignore_eos", Kind::Bool),
    ("min_tokens", Kind::Int),
];

/// Whether `key` is a sampling parameter the KServe fronts take.
pub fn is_sampling_key(key: &str) -> bool {
    KSERVE_KEYS.iter().any(|(k, _)| *k == key)
}

impl SamplingFields {
    /// Reads KServe sampling parameters (`sampling_parameters`, or the
    /// request's `parameters`): numbers, booleans, or strings holding them
    /// as Triton's vLLM backend converts them. A key that is no sampling
    /// parameter, or a value of the wrong type, is refused by name.
    pub fn from_json(map: &Map<String, Value>) -> Result<Self, ParamError> {
        let mut f = Self::default();
        for (key, value) in map {
            let Some((param, kind)) = KSERVE_KEYS.iter().find(|(k, _)| k == key) else {
                return Err(ParamError::new(
                    "sampling_parameters",
                    format!(
                        "`{key}` is not a sampling parameter this server takes (it takes: {})",
                        KSERVE_KEYS.map(|(k, _)| k).join(", ")
                    ),
                ));
            };
            let param: &'static str = param;
            let bad = |want: &str| {
                ParamError::new(param, format!("`{param}` must be {want}, got {value}"))
            };
            let text = value.as_str().map(str::trim);
            match kind {
                Kind::Float => {
                    let v = value
                        .as_f64()
                        .or_else(|| text.and_then(|t| t.parse().ok()))
                        .ok_or_else(|| bad("a number"))?;
                    let slot = match param {
                        "temperature" => &mut f.temperature,
                        "top_p" => &mut f.top_p,
                        "min_p" => &mut f.min_p,
                        "frequency_penalty" => &mut f.frequency_penalty,
                        "presence_penalty" => &mut f.presence_penalty,
                        _ => &mut f.repetition_penalty,
                    };
                    *slot = Some(v);
                }
                Kind::Int => {
                    let v = value
                        .as_i64()
                        .or_else(|| value.as_u64().map(|_| i64::MAX))
                        .or_else(|| text.and_then(parse_int))
                        .ok_or_else(|| bad("an integer"))?;
                    let slot = match param {
                        "max_tokens" => &mut f.max_tokens,
                        "top_k" => &mut f.top_k,
                        "seed" => &mut f.seed,
                        "n" => &mut f.n,
                        _ => &mut f.min_tokens,
                    };
                    *slot = Some(v);
                }
                Kind::Bool => {
                    let v = value
                        .as_bool()
                        .or_else(|| match text.map(str::to_ascii_lowercase).as_deref() {
                            Some("true" | "1") => Some(true),
                            Some("false" | "0") => Some(false),
                            _ => None,
                        })
                        .ok_or_else(|| bad("true or false"))?;
                    f.ignore_eos = Some(v);
                }
                Kind::Stop => {
                    f.stop = Some(
                        serde_json::from_value(value.clone())
                            .map_err(|_| bad("a string or a list of strings"))?,
                    );
                }
            }
        }
        Ok(f)
    }

    /// Checks every parameter. `max_tokens` overrides the field when given
    /// (chat's `max_completion_tokens`); `logprobs` is the number of
    /// alternatives reported per token.
    pub fn validate(
        self,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
    ) -> Result<GenerateParams, ParamError> {
        let temperature = in_range("temperature", self.temperature, 0.0, 2.0, 1.0)?;
        let top_p = in_range("top_p", self.top_p, 0.0, 1.0, 1.0)?;
        if top_p == 0.0 {
            return Err(ParamError::new("top_p", "`top_p` must be greater than 0"));
        }
        let min_p = in_range("min_p", self.min_p, 0.0, 1.0, 0.0)?;
        let frequency_penalty =
            in_range("frequency_penalty", self.frequency_penalty, -2.0, 2.0, 0.0)?;
        let presence_penalty = in_range("presence_penalty", self.presence_penalty, -2.0, 2.0, 0.0)?;
        let repetition_penalty = in_range(
            "repetition_penalty",
            self.repetition_penalty,
            0.01,
            10.0,
            1.0,
        )?;
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => 0,
            Some(k) if k > 0 => usize::try_from(k).unwrap_or(usize::MAX),
            Some(k) => {
                return Err(ParamError::new(
                    "top_k",
                    format!("`top_k` must be -1 (off) or positive, got {k}"),
                ))
            }
        };
        let n = match self.n {
            None => 1,
            Some(n) if n >= 1 => usize::try_from(n).unwrap_or(usize::MAX),
            Some(n) => {
                return Err(ParamError::new(
                    "n",
                    format!("`n` must be at least 1, got {n}"),
                ))
            }
        };
        let max_tokens = match max_tokens.or(self.max_tokens) {
            None => None,
            Some(m) if m >= 1 => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            Some(m) => {
                return Err(ParamError::new(
                    "max_tokens",
                    format!("`max_tokens` must be at least 1, got {m}"),
                ))
            }
        };
        let min_tokens = match self.min_tokens {
            None => 0,
            Some(m) if m >= 0 && max_tokens.is_none_or(|mx| m as u64 <= mx as u64) => {
                usize::try_from(m).unwrap_or(usize::MAX)
            }
            Some(m) => {
                return Err(ParamError::new(
                    "min_tokens",
                    format!("`min_tokens` ({m}) must be between 0 and max_tokens"),
                ))
            }
        };
        let stop = self.stop.map(OneOrMany::into_vec).unwrap_or_default();
        if stop.iter().any(String::is_empty) {
            return Err(ParamError::new("stop", "`stop` strings must not be empty"));
        }
        if stop.len() > MAX_STOPS || stop.iter().any(|s| s.chars().count() > MAX_STOP_CHARS) {
            return Err(ParamError::new(
                "stop",
                format!(
                    "`stop` takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} characters"
                ),
            ));
        }
        let logit_bias = logit_bias(self.logit_bias)?;
        Ok(GenerateParams {
            sampling: SamplingParams {
                temperature,
                top_k,
                top_p,
                min_p,
                frequency_penalty,
                presence_penalty,
                repetition_penalty,
                seed: self.seed.map(|s| s as u64),
                logprobs,
                logit_bias,
            },
            max_tokens,
            min_tokens,
            stop,
            ignore_eos: self.ignore_eos.unwrap_or(false),
            n,
        })
    }
}

/// The most tokens one `logit_bias` may name.
const MAX_LOGIT_BIAS: usize = 1024;

/// `logit_bias` checked: token ids as keys, biases in [−100, 100], sorted by id.
fn logit_bias(map: Option<HashMap<String, f64>>) -> Result<Vec<(u32, f32)>, ParamError> {
    let map = map.unwrap_or_default();
    if map.len() > MAX_LOGIT_BIAS {
        return Err(ParamError::new(
            "logit_bias",
            format!(
                "`logit_bias` names at most {MAX_LOGIT_BIAS} tokens, got {}",
                map.len()
            ),
        ));
    }
    let mut out = Vec::with_capacity(map.len());
    for (k, v) in map {
        let id: u32 = k.trim().parse().map_err(|_| {
            ParamError::new(
                "logit_bias",
                format!("`logit_bias` keys are token ids, got `{k}`"),
            )
        })?;
        if !(v.is_finite() && (-100.0..=100.0).contains(&v)) {
            return Err(ParamError::new(
                "logit_bias",
                format!("`logit_bias` values must be between -100 and 100, got {v} for token {id}"),
            ));
        }
        out.push((id, v as f32));
    }
    out.sort_by_key(|&(id, _)| id);
    Ok(out)
}

/// A decimal integer; one beyond i64 becomes the nearest i64 (it fails the
/// range checks the same way, and never wraps to a small number).
fn parse_int(t: &str) -> Option<i64> {
    let digits = t.strip_prefix(['-', '+']).unwrap_or(t);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(t.parse::<i64>().unwrap_or(if t.starts_with('-') {
        i64::MIN
    } else {
        i64::MAX
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn from_json(v: Value) -> Result<GenerateParams, ParamError> {
        SamplingFields::from_json(v.as_object().unwrap())?.validate(None, None)
    }

    #[test]
    fn every_range_names_its_parameter() {
        for (body, param) in [
            (json!({"temperature": 3}), "temperature"),
            (json!({"temperature": -0.5}), "temperature"),
            (json!({"top_p": 0}), "top_p"),
            (json!({"top_p": -1}), "top_p"),
            (json!({"top_k": -2}), "top_k"),
            (json!({"n": 0}), "n"),
            (json!({"max_tokens": 0}), "max_tokens"),
            (json!({"max_tokens": -5}), "max_tokens"),
            (json!({"presence_penalty": -3}), "presence_penalty"),
            (json!({"repetition_penalty": 0}), "repetition_penalty"),
            (json!({"min_tokens": 9, "max_tokens": 2}), "min_tokens"),
            (json!({"min_tokens": -1}), "min_tokens"),
            (json!({"stop": ""}), "stop"),
            (json!({"stop": 5}), "stop"),
            (json!({"temperature": "hot"}), "temperature"),
            (json!({"ignore_eos": "maybe"}), "ignore_eos"),
            (json!({"best_of": 2}), "sampling_parameters"),
        ] {
            let e = from_json(body.clone()).unwrap_err();
            assert_eq!(e.param, param, "{body}: {}", e.message);
        }
    }

    #[test]
    fn strings_convert_as_tritons_vllm_backend_converts_them() {
        let p = from_json(json!({"max_tokens": "32", "temperature": "0", "ignore_eos": "true", "top_k": "5", "stop": ["\n"]}))
            .unwrap();
        assert_eq!(p.max_tokens, Some(32));
        assert_eq!(p.sampling.temperature, 0.0);
        assert_eq!(p.sampling.top_k, 5);
        assert!(p.ignore_eos);
        assert_eq!(p.stop, vec!["\n".to_string()]);
    }

    #[test]
    fn huge_integers_do_not_wrap() {
        // 2^64 - 1 and beyond: a count, never a small number after wrapping.
        let p = from_json(json!({"max_tokens": u64::MAX})).unwrap();
        assert_eq!(p.max_tokens, Some(i64::MAX as usize));
        let p =
            from_json(json!({"max_tokens": "340282366920938463463374607431768211455"})).unwrap();
        assert_eq!(p.max_tokens, Some(i64::MAX as usize));
        let e = from_json(json!({"max_tokens": "-18446744073709551615"})).unwrap_err();
        assert_eq!(e.param, "max_tokens");
    }
}
