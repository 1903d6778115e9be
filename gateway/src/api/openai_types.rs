//! Request bodies of the OpenAI API, and their validation into the engine's
//! request type. A field Switchyard does not honour is refused with a 400
//! naming it ([`refuse_unknown_fields`]), never silently ignored: a client
//! that asks for `response_format` or `tools` must not get free text while
//! believing otherwise.
use super::error::ApiError;
use crate::params::{GenerateParams, ParamError, SamplingFields};
use engine::llm::ChatMessage;
use engine::llm::Constraint;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

#[derive(Debug, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// Fields shared by both endpoints: the model, streaming, the user, and the
/// generation parameters (with vLLM's extensions) that every LLM front checks
/// the same way (`params`).
#[derive(Debug, Deserialize, Default)]
pub struct CommonParams {
    pub model: String,
    #[serde(flatten)]
    pub fields: SamplingFields,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    /// The end user; keeps one user on one arm of a rollout.
    pub user: Option<String>,
    /// Structured output, OpenAI's way: `{"type": "text" | "json_object" |
    /// "json_schema", "json_schema": {"name", "schema", "strict"}}`.
    pub response_format: Option<serde_json::Map<String, Value>>,
    /// vLLM's structured-output extensions: a JSON schema (an object, or
    /// a string holding one), a regular expression, a list of choices, a
    /// Lark grammar.
    pub guided_json: Option<SchemaIn>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// `tool_choice`: a mode, or `{"type": "function", "function": {"name"}}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ToolChoiceIn {
    Mode(String),
    Function(serde_json::Map<String, Value>),
}

/// A JSON schema as given: the object, or text holding it (vLLM takes both).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum SchemaIn {
    Object(serde_json::Map<String, Value>),
    Text(String),
}

impl SchemaIn {
    fn into_value(self, param: &'static str) -> Result<Value, ApiError> {
        match self {
            Self::Object(o) => Ok(Value::Object(o)),
            Self::Text(t) => serde_json::from_str(&t)
                .map_err(|e| ApiError::invalid(param, format!("`{param}` is not valid JSON: {e}"))),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum MessageContent {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Debug, Deserialize)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct MessageIn {
    pub role: String,
    pub content: Option<MessageContent>,
    /// An assistant turn's calls, as an earlier answer gave them.
    #[serde(default)]
    pub tool_calls: Vec<Value>,
    /// A tool turn's answer to this call (and the function's name).
    pub tool_call_id: Option<String>,
    pub name: Option<String>,
    /// Any other key: refused unless null (clients that send an answer's
    /// message back include `refusal: null` and the like).
    #[serde(flatten)]
    pub other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
pub struct ChatRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub messages: Vec<MessageIn>,
    pub max_completion_tokens: Option<i64>,
    #[serde(default)]
    pub logprobs: bool,
    pub top_logprobs: Option<i64>,
    /// Function calling ([`super::openai::tools`]).
    pub tools: Option<Vec<serde_json::Map<String, Value>>>,
    pub tool_choice: Option<ToolChoiceIn>,
    pub parallel_tool_calls: Option<bool>,
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    /// A string, a list of strings, a list of token ids or a list of
    /// lists: read as JSON and checked by [`CompletionRequest::prompt_text`],
    /// so that a form not served is refused with `param: prompt`.
    pub prompt: serde_json::Value,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
    /// Samples generated per prompt, of which the `n` most likely are
    /// returned.
    pub best_of: Option<i64>,
}

/// Fields both endpoints honour: [`CommonParams`] and [`SamplingFields`].
pub const COMMON_FIELDS: &[&str] = &[
    "model",
    "stream",
    "stream_options",
    "user",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "frequency_penalty",
    "presence_penalty",
    "repetition_penalty",
    "seed",
    "n",
    "stop",
    "ignore_eos",
    "min_tokens",
    "logit_bias",
    "response_format",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
];
/// [`ChatRequest`]'s own fields.
pub const CHAT_FIELDS: &[&str] = &[
    "messages",
    "max_completion_tokens",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
];
/// [`CompletionRequest`]'s own fields (`echo` is read to be refused by name).
pub const COMPLETION_FIELDS: &[&str] = &["prompt", "logprobs", "echo", "best_of"];
/// Accepted and ignored, as documented: they change nothing in the answer
/// (OpenAI's stored-completion tags).
pub const IGNORED_FIELDS: &[&str] = &["metadata", "store"];

/// Refuses the first top-level field of `body` (a JSON object) that is
/// neither common, nor in `own`, nor in [`IGNORED_FIELDS`].
pub fn refuse_unknown_fields(body: &[u8], own: &[&str]) -> Result<(), ApiError> {
    refuse_fields_outside(body, &[own, COMMON_FIELDS, IGNORED_FIELDS])
}

/// Refuses the first top-level field of `body` (a JSON object) that none
/// of `lists` names.
pub fn refuse_fields_outside(body: &[u8], lists: &[&[&str]]) -> Result<(), ApiError> {
    // Only the keys: the values were read by the typed parse already.
    let Ok(map) = serde_json::from_slice::<BTreeMap<String, serde::de::IgnoredAny>>(body) else {
        // Not an object: the typed parse names what is wrong.
        return Ok(());
    };
    let known = |k: &str| lists.iter().any(|l| l.contains(&k));
    match map.keys().find(|k| !known(k)) {
        None => Ok(()),
        Some(field) => Err(ApiError::invalid(
            field.clone(),
            format!(
                "`{field}` is not supported by this server; it refuses fields it does not honour \
                 rather than ignoring them (honoured: {})",
                lists.concat().join(", ")
            ),
        )),
    }
}

/// The validated, endpoint-independent part of a request.
#[derive(Debug)]
pub struct Validated {
    pub params: GenerateParams,
    pub stream: bool,
    pub include_usage: bool,
    /// The structured-output constraint, and the field that gave it (a
    /// grammar that does not compile is refused naming that field).
    pub constraint: Option<(&'static str, Constraint)>,
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::invalid(e.param, e.message)
    }
}

impl CommonParams {
    /// Checks every parameter; `logprobs` is the number of alternatives per token.
    pub fn validate(
        mut self,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
    ) -> Result<Validated, ApiError> {
        let constraint = self.constraint()?;
        Ok(Validated {
            params: self.fields.validate(max_tokens, logprobs)?,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            stream: self.stream,
            constraint,
        })
    }

    /// The one structured-output constraint the request gives, if any.
    fn constraint(&mut self) -> Result<Option<(&'static str, Constraint)>, ApiError> {
        let mut given: Vec<(&'static str, Constraint)> = Vec::new();
        if let Some(f) = self.response_format.take() {
            if let Some(c) = response_format(f)? {
                given.push(("response_format", c));
            }
        }
        if let Some(s) = self.guided_json.take() {
            let schema = s.into_value("guided_json")?;
            given.push(("guided_json", Constraint::JsonSchema(schema)));
        }
        if let Some(r) = self.guided_regex.take() {
            given.push(("guided_regex", Constraint::Regex(r)));
        }
        if let Some(c) = self.guided_choice.take() {
            given.push(("guided_choice", Constraint::Choice(c)));
        }
        if let Some(g) = self.guided_grammar.take() {
            given.push(("guided_grammar", Constraint::Lark(g)));
        }
        match given.len() {
            0 | 1 => Ok(given.pop()),
            _ => Err(ApiError::invalid(
                given[1].0,
                format!(
                    "`{}` and `{}` both constrain the output; give one",
                    given[0].0, given[1].0
                ),
            )),
        }
    }
}

/// OpenAI's `response_format`: `text` (no constraint), `json_object`, or
/// `json_schema` with its `schema`.
fn response_format(f: serde_json::Map<String, Value>) -> Result<Option<Constraint>, ApiError> {
    let invalid = |m: String| Err(ApiError::invalid("response_format", m));
    let kind = f.get("type").and_then(Value::as_str).unwrap_or_default();
    let allowed: &[&str] = match kind {
        "text" | "json_object" => &["type"],
        "json_schema" => &["type", "json_schema"],
        other => {
            return invalid(format!(
            "`response_format.type` must be `text`, `json_object` or `json_schema`, got `{other}`"
        ))
        }
    };
    if let Some(k) = f.keys().find(|k| !allowed.contains(&k.as_str())) {
        return invalid(format!(
            "`response_format.{k}` is not a field of a `{kind}` response format"
        ));
    }
    match kind {
        "text" => Ok(None),
        "json_object" => Ok(Some(Constraint::JsonObject)),
        _ => {
            let Some(Value::Object(spec)) = f.get("json_schema") else {
                return invalid(
                    "`response_format.json_schema` must be an object with `name` and `schema`"
                        .into(),
                );
            };
            const SPEC: &[&str] = &["name", "schema", "strict", "description"];
            if let Some(k) = spec.keys().find(|k| !SPEC.contains(&k.as_str())) {
                return invalid(format!(
                    "`response_format.json_schema.{k}` is not supported (it takes {})",
                    SPEC.join(", ")
                ));
            }
            if !spec.get("name").is_some_and(Value::is_string) {
                return invalid("`response_format.json_schema.name` must be a string".into());
            }
            if spec
                .get("strict")
                .is_some_and(|s| !s.is_boolean() && !s.is_null())
            {
                return invalid(
                    "`response_format.json_schema.strict` must be true or false".into(),
                );
            }
            // The output is held to the schema whether `strict` is set or not.
            match spec.get("schema") {
                Some(s @ Value::Object(_)) => Ok(Some(Constraint::JsonSchema(s.clone()))),
                _ => invalid(
                    "`response_format.json_schema.schema` must be a JSON schema object".into(),
                ),
            }
        }
    }
}

impl ChatRequest {
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        chat_messages(&self.messages)
    }
}

/// The conversation for the chat template: text only, `developer` read as
/// `system`; an unknown role or content part is refused.
pub fn chat_messages(messages: &[MessageIn]) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must hold at least one message",
        ));
    }
    messages
        .iter()
        .map(|m| {
            if !matches!(
                m.role.as_str(),
                "system" | "developer" | "user" | "assistant" | "tool"
            ) {
                return Err(ApiError::invalid(
                    "messages",
                    format!("unknown message role `{}`", m.role),
                ));
            }
            let content = match &m.content {
                None => String::new(),
                Some(MessageContent::Text(t)) => t.clone(),
                Some(MessageContent::Parts(parts)) => {
                    let mut out = String::new();
                    for p in parts {
                        match (p.kind.as_str(), &p.text) {
                            ("text", Some(t)) => out.push_str(t),
                            (k, _) => {
                                return Err(ApiError::invalid(
                                    "messages",
                                    format!("content part `{k}` is not supported"),
                                ))
                            }
                        }
                    }
                    out
                }
            };
            let role = if m.role == "developer" {
                "system"
            } else {
                &m.role
            };
            if let Some((k, _)) = m.other.iter().find(|(_, v)| !v.is_null()) {
                return Err(ApiError::invalid(
                    "messages",
                    format!(
                        "`{k}` in a message is not supported (a message takes role, content, name, \
                         tool_calls and tool_call_id)"
                    ),
                ));
            }
            if !m.tool_calls.is_empty() && role != "assistant" {
                return Err(ApiError::invalid(
                    "messages",
                    format!("a `{role}` message cannot carry `tool_calls`"),
                ));
            }
            Ok(super::openai::tools::render_turn(
                role,
                content,
                &m.tool_calls,
            ))
        })
        .collect()
}

impl ChatRequest {
    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match (self.logprobs, self.top_logprobs) {
            (_, Some(k)) if !(0..=20).contains(&k) => Err(ApiError::invalid(
                "top_logprobs",
                format!("`top_logprobs` must be between 0 and 20, got {k}"),
            )),
            (false, Some(_)) => Err(ApiError::invalid(
                "top_logprobs",
                "`top_logprobs` needs `logprobs` set to true",
            )),
            (true, k) => Ok(Some(k.unwrap_or(0) as usize)),
            (false, None) => Ok(None),
        }
    }
}

/// One prompt of a completions request, or one input of an embeddings
/// request.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptIn {
    Text(String),
    Ids(Vec<u32>),
}

/// The most prompts one completions request may batch.
pub const MAX_PROMPTS: usize = 64;

/// A list of token ids, or `None` when `v` is not one.
fn token_ids(v: &[Value]) -> Option<Vec<u32>> {
    v.iter()
        .map(|t| t.as_u64().and_then(|i| u32::try_from(i).ok()))
        .collect()
}

/// Texts or token ids in OpenAI's forms, as completions' `prompt` and
/// embeddings' `input` take them: a string, a list of strings, a list of
/// token ids, or a list of such lists; at most `max` of them. A bad form is
/// refused naming `param`.
pub fn prompt_forms(
    value: &Value,
    param: &'static str,
    max: usize,
) -> Result<Vec<PromptIn>, ApiError> {
    let invalid = |m: String| Err(ApiError::invalid(param, m));
    let forms = "a string, a list of strings, a list of token ids or a list of such lists";
    let prompts = match value {
        Value::String(p) => vec![PromptIn::Text(p.clone())],
        Value::Array(v) if v.is_empty() => {
            return invalid(format!("`{param}` must not be an empty list"))
        }
        Value::Array(v) if v.iter().all(Value::is_string) => v
            .iter()
            .map(|p| PromptIn::Text(p.as_str().unwrap_or_default().to_string()))
            .collect(),
        Value::Array(v) if v.iter().all(Value::is_number) => match token_ids(v) {
            Some(ids) => vec![PromptIn::Ids(ids)],
            None => {
                return invalid(format!(
                    "token ids in `{param}` must be integers from 0 to 2^32 - 1"
                ))
            }
        },
        Value::Array(v) if v.iter().all(Value::is_array) => {
            let lists: Option<Vec<_>> = v
                .iter()
                .map(|l| {
                    l.as_array()
                        .and_then(|l| token_ids(l))
                        .filter(|l| !l.is_empty())
                })
                .collect();
            match lists {
                Some(l) => l.into_iter().map(PromptIn::Ids).collect(),
                None => {
                    return invalid(format!(
                        "each list in `{param}` must be non-empty token ids"
                    ))
                }
            }
        }
        Value::Array(_) => return invalid(format!("`{param}` must be {forms}, not a mixed list")),
        _ => return invalid(format!("`{param}` must be {forms}")),
    };
    if prompts.len() > max {
        return invalid(format!(
            "`{param}` takes at most {max} entries, got {}",
            prompts.len()
        ));
    }
    Ok(prompts)
}

impl CompletionRequest {
    /// The prompts ([`prompt_forms`]).
    pub fn prompts(&self) -> Result<Vec<PromptIn>, ApiError> {
        prompt_forms(&self.prompt, "prompt", MAX_PROMPTS)
    }

    pub fn logprobs(&self) -> Result<Option<usize>, ApiError> {
        match self.logprobs {
            None => Ok(None),
            Some(k) if (0..=20).contains(&k) => Ok(Some(k as usize)),
            Some(k) => Err(ApiError::invalid(
                "logprobs",
                format!("`logprobs` must be between 0 and 20, got {k}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> ChatRequest {
        serde_json::from_str(body).unwrap()
    }

    /// Every honoured field is read by the request types (a value of the
    /// wrong shape there fails the parse), so the lists cannot name a field
    /// that is in fact dropped; any other field is refused by name.
    #[test]
    fn honoured_fields_are_read_and_others_refused() {
        type Parses = fn(&str) -> bool;
        let chat: Parses = |b| serde_json::from_str::<ChatRequest>(b).is_ok();
        let completion: Parses = |b| serde_json::from_str::<CompletionRequest>(b).is_ok();
        let chat_input = r#""messages":[{"role":"user","content":"hi"}]"#;
        for (own, input, parse) in [
            (CHAT_FIELDS, chat_input, chat),
            (COMPLETION_FIELDS, r#""prompt":"p""#, completion),
        ] {
            let valid = |extra: &str| format!(r#"{{"model":"m",{input}{extra}}}"#);
            assert!(parse(&valid("")));
            // `prompt` is read as JSON and checked by `prompt_text` (below).
            for field in COMMON_FIELDS.iter().chain(own).filter(|f| **f != "prompt") {
                let mut v: serde_json::Value = serde_json::from_str(&valid("")).unwrap();
                v[field] = serde_json::json!([[[]]]);
                assert!(!parse(&v.to_string()), "`{field}` is listed but not read");
            }
            for field in [
                "functions",
                "function_call",
                "prediction",
                "suffix",
                "seed_list",
            ] {
                let body = valid(&format!(r#","{field}":1"#));
                let e = refuse_unknown_fields(body.as_bytes(), own).unwrap_err();
                assert_eq!(e.param.as_deref(), Some(field), "{}", e.message);
            }
            let body = valid(r#","metadata":{"a":"b"},"store":false"#);
            assert!(refuse_unknown_fields(body.as_bytes(), own).is_ok());
        }
    }

    #[test]
    fn every_prompt_form_is_read_and_bad_ones_name_the_prompt() {
        let prompts = |p: &str| {
            serde_json::from_str::<CompletionRequest>(&format!(r#"{{"model":"m","prompt":{p}}}"#))
                .unwrap()
                .prompts()
        };
        let text = |s: &str| PromptIn::Text(s.into());
        assert_eq!(prompts(r#""hi""#).unwrap(), vec![text("hi")]);
        assert_eq!(prompts(r#"["a","b"]"#).unwrap(), vec![text("a"), text("b")]);
        assert_eq!(
            prompts("[1,2,3]").unwrap(),
            vec![PromptIn::Ids(vec![1, 2, 3])]
        );
        assert_eq!(
            prompts("[[1],[2,3]]").unwrap(),
            vec![PromptIn::Ids(vec![1]), PromptIn::Ids(vec![2, 3])]
        );
        let many = format!("[{}]", vec!["\"x\""; MAX_PROMPTS + 1].join(","));
        for (p, word) in [
            ("[[[]]]", "token ids"),
            ("[[]]", "token ids"),
            ("[-1]", "integers"),
            ("[1.5]", "integers"),
            (r#"["a",1]"#, "mixed"),
            ("[]", "empty"),
            ("5", "string"),
            (many.as_str(), "at most"),
        ] {
            let e = prompts(p).unwrap_err();
            assert_eq!(e.param.as_deref(), Some("prompt"));
            assert!(
                e.message.contains(word) && !e.message.contains("PromptIn"),
                "{p}: {}",
                e.message
            );
        }
    }

    #[test]
    fn defaults_and_extensions_parse() {
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"hi"}]}],
               "ignore_eos":true,"min_tokens":3,"max_tokens":8,"stop":"END","seed":5,"top_k":-1}"#,
        );
        assert_eq!(r.chat_messages().unwrap()[0].content, "hi");
        let v = r.common.validate(None, None).unwrap().params;
        assert!(v.ignore_eos);
        assert_eq!(
            (v.min_tokens, v.max_tokens, v.sampling.top_k),
            (3, Some(8), 0)
        );
        assert_eq!(v.stop, vec!["END".to_string()]);
        assert_eq!(v.sampling.seed, Some(5));
    }

    #[test]
    fn out_of_range_parameters_name_themselves() {
        for (body, param) in [
            (r#""temperature":3"#, "temperature"),
            (r#""top_p":0"#, "top_p"),
            (r#""top_k":-2"#, "top_k"),
            (r#""n":0"#, "n"),
            (r#""max_tokens":0"#, "max_tokens"),
            (r#""presence_penalty":-3"#, "presence_penalty"),
            (r#""min_tokens":9,"max_tokens":2"#, "min_tokens"),
        ] {
            let r = chat(&format!(
                r#"{{"model":"m","messages":[{{"role":"user","content":"x"}}],{body}}}"#
            ));
            let e = r.common.validate(None, None).unwrap_err();
            assert_eq!(e.param.as_deref(), Some(param), "{body}: {}", e.message);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
    }

    #[test]
    fn message_keys_not_honoured_are_refused_unless_null() {
        let with = |extra: &str| {
            chat(&format!(
                r#"{{"model":"m","messages":[{{"role":"assistant","content":"x"{extra}}}]}}"#
            ))
            .chat_messages()
        };
        assert!(with(r#","refusal":null,"annotations":null"#).is_ok());
        let e = with(r#","audio":{"id":"a"}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("messages"));
        assert!(e.message.contains("`audio`"), "{}", e.message);
    }

    #[test]
    fn logprob_rules() {
        let r =
            chat(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"top_logprobs":2}"#);
        assert!(r.logprobs().is_err());
        let r = chat(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"logprobs":true,"top_logprobs":2}"#,
        );
        assert_eq!(r.logprobs().unwrap(), Some(2));
        let r = chat(r#"{"model":"m","messages":[{"role":"wizard","content":"x"}]}"#);
        assert!(r.chat_messages().is_err());
    }
}
