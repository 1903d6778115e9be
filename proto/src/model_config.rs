//! ModelConfig as users write it (config.pbtxt, protobuf text format) and as
//! Triton serves it (JSON with proto field names, integers as numbers).
use crate::inference::ModelConfig;
use crate::json::POOL;
use prost_reflect::{DeserializeOptions, DynamicMessage};

fn descriptor() -> prost_reflect::MessageDescriptor {
    POOL.get_message_by_name("inference.ModelConfig")
        .expect("inference.ModelConfig is in model_config.proto")
}

/// A config that does not parse: the message names the line, column and field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// 1-based line and column of a byte offset.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Protobuf text format lets a message list follow its field name without a
/// colon (`input [ { ... } ]`, as every Triton config writes it); the parser
/// wants `input: [`. This adds the colon outside strings and comments, in
/// place of the space before `[` when there is one so columns stay true.
fn colon_before_lists(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut quote: Option<char> = None;
    let mut escaped = false;
    let mut comment = false;
    for c in text.chars() {
        if comment {
            comment = c != '\n';
        } else if let Some(q) = quote {
            if escaped {
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == q {
                quote = None;
            }
        } else if c == '"' || c == '\'' {
            quote = Some(c);
        } else if c == '#' {
            comment = true;
        } else if c == '[' {
            let trimmed = out.trim_end_matches([' ', '\t']);
            if trimmed.ends_with(|p: char| p.is_ascii_alphanumeric() || p == '_') {
                let spaces = out.len() - trimmed.len();
                out.truncate(trimmed.len());
                out.push(':');
                out.extend(std::iter::repeat_n(' ', spaces.saturating_sub(1)));
            }
        }
        out.push(c);
    }
    out
}

/// Parses protobuf text format (`config.pbtxt`).
pub fn parse_text(text: &str) -> Result<ModelConfig, ConfigError> {
    let text = &colon_before_lists(text);
    let msg = DynamicMessage::parse_text_format(descriptor(), text).map_err(|e| {
        let (line, col) = line_col(text, text_error_offset(&e));
        ConfigError(format!("line {line}, column {col}: {e}"))
    })?;
    msg.transcode_to::<ModelConfig>()
        .map_err(|e| ConfigError(e.to_string()))
}

/// Where a text-format error points (its first label), else the end.
fn text_error_offset(e: &prost_reflect::text_format::ParseError) -> usize {
    use miette::Diagnostic;
    e.labels()
        .and_then(|mut labels| labels.next())
        .map_or(usize::MAX, |label| label.offset())
}

/// Parses ModelConfig JSON (the `config` parameter of a model load request).
pub fn from_json(json: &str) -> Result<ModelConfig, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(json);
    let msg = DynamicMessage::deserialize_with_options(
        descriptor(),
        &mut de,
        &DeserializeOptions::new().deny_unknown_fields(true),
    )
    .map_err(|e| ConfigError(e.to_string()))?;
    msg.transcode_to::<ModelConfig>()
        .map_err(|e| ConfigError(e.to_string()))
}

/// ModelConfig as Triton's `GET /v2/models/{m}/config` returns it.
pub fn to_json(config: &ModelConfig) -> serde_json::Value {
    crate::json::to_json(config, "inference.ModelConfig")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIL: &str = r#"
name: "fraud_xgb"
backend: "fil"
max_batch_size: 8192
input [ { name: "input__0" data_type: TYPE_FP32 dims: [ 32 ] } ]
output [ { name: "output__0" data_type: TYPE_FP32 dims: [ 1 ] } ]
version_policy: { latest: { num_versions: 2 } }
instance_group [ { count: 2 kind: KIND_CPU } ]
dynamic_batching { preferred_batch_size: [ 64, 256 ] max_queue_delay_microseconds: 100 }
parameters [ { key: "model_type" value: { string_value: "xgboost_json" } } ]
"#;

    #[test]
    fn text_format_reads_a_fil_config() {
        let c = parse_text(FIL).unwrap();
        assert_eq!(c.name, "fraud_xgb");
        assert_eq!(c.max_batch_size, 8192);
        assert_eq!(c.input[0].dims, vec![32]);
        assert_eq!(c.parameters["model_type"].string_value, "xgboost_json");
        assert_eq!(c.instance_group[0].count, 2);
    }

    #[test]
    fn lists_without_colon_leave_strings_and_comments_alone() {
        let c = parse_text("name: \"a [b\" # c [d\ninput[{ name: \"i\" }]\n").unwrap();
        assert_eq!(c.name, "a [b");
        assert_eq!(c.input[0].name, "i");
    }

    #[test]
    fn errors_name_line_column_and_field() {
        let e = parse_text("name: \"m\"\nmax_batch_sise: 4\n").unwrap_err();
        assert!(e.0.starts_with("line 2, column 1:"), "{e}");
        assert!(e.0.contains("max_batch_sise"), "{e}");
        let e = parse_text("input [ { data_type: TYPE_FLOAT } ]").unwrap_err();
        assert!(e.0.contains("TYPE_FLOAT"), "{e}");
    }

    #[test]
    fn json_keeps_integers_as_numbers_and_round_trips() {
        let c = parse_text(FIL).unwrap();
        let j = to_json(&c);
        assert_eq!(j["max_batch_size"], 8192);
        assert_eq!(j["input"][0]["dims"], serde_json::json!([32]));
        assert_eq!(j["input"][0]["data_type"], "TYPE_FP32");
        assert_eq!(j["dynamic_batching"]["max_queue_delay_microseconds"], 100);
        assert_eq!(from_json(&j.to_string()).unwrap(), c);
        assert!(from_json(r#"{"max_batch_size": "x"}"#).is_err());
    }
}
