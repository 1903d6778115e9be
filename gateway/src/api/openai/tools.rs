//! Function calling: `tools`, `tool_choice` and `parallel_tool_calls`.
//!
//! Tools reach the model through the chat template's own `tools` variable
//! when the template uses one, else as a system-prompt block in the Hermes
//! format (`<tools>` signatures, answers as `<tool_call>{"name", "arguments"}
//! </tool_call>`). A named `tool_choice` constrains the output to that
//! function's parameters schema (the output is the arguments); `required`
//! constrains it to one or more `<tool_call>` blocks over the tools' schemas;
//! `auto` lets the model choose, and the blocks it writes are parsed out.
use crate::api::error::ApiError;
use crate::api::openai_types::ToolChoiceIn;
use engine::llm::{ChatMessage, Constraint, FinishReason};
use serde_json::{json, Value};

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// One function the model may call.
#[derive(Debug, Clone)]
pub struct Tool {
    pub name: String,
    /// The definition as the client sent it (`{"type": "function", ...}`).
    pub definition: Value,
    pub parameters: Value,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    None,
    Auto,
    Required,
    Named(String),
}

/// How the tools of one request shape its prompt, output and answer.
#[derive(Debug, Clone)]
pub struct Tools {
    pub tools: Vec<Tool>,
    pub choice: Choice,
    pub parallel: bool,
}

/// How an answer's text becomes tool calls (a view of `tool_choice`,
/// read for every streamed piece, so it borrows).
#[derive(Debug, Clone, PartialEq)]
pub enum Reading<'a> {
    /// The whole output is the arguments of this function.
    Arguments(&'a str),
    /// `<tool_call>` blocks are parsed out of the output.
    Blocks,
}

/// One parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct Call {
    pub name: String,
    pub arguments: String,
}

fn invalid(param: &'static str, m: String) -> ApiError {
    ApiError::invalid(param, m)
}

impl Tools {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when
    /// the request gives no tools (a `tool_choice` then must be `none`).
    pub fn from_request(
        tools: Option<Vec<serde_json::Map<String, Value>>>,
        choice: Option<ToolChoiceIn>,
        parallel: Option<bool>,
    ) -> Result<Option<Self>, ApiError> {
        let tools = tools.unwrap_or_default();
        let choice = match choice {
            None if tools.is_empty() => Choice::None,
            None => Choice::Auto,
            Some(ToolChoiceIn::Mode(s)) => match s.as_str() {
                "none" => Choice::None,
                "auto" => Choice::Auto,
                "required" => Choice::Required,
                other => {
                    return Err(invalid(
                        "tool_choice",
                        format!("`tool_choice` must be none, auto, required or a named function, got `{other}`"),
                    ))
                }
            },
            Some(ToolChoiceIn::Function(v)) => match v.get("function").and_then(|f| f["name"].as_str()) {
                // Exactly `type` and `function: {name}`: nothing else is read.
                Some(name)
                    if v.get("type").is_some_and(|t| t == "function")
                        && v.len() == 2
                        && v["function"].as_object().is_some_and(|f| f.len() == 1) =>
                {
                    Choice::Named(name.to_string())
                }
                _ => {
                    return Err(invalid(
                        "tool_choice",
                        "`tool_choice` names a function as {\"type\": \"function\", \"function\": {\"name\": ...}}".into(),
                    ))
                }
            },
        };
        let tools: Vec<Tool> = tools
            .into_iter()
            .map(|t| tool(Value::Object(t)))
            .collect::<Result<_, _>>()?;
        if let Some(dup) = tools
            .iter()
            .enumerate()
            .find(|(i, t)| tools[..*i].iter().any(|u| u.name == t.name))
        {
            return Err(invalid(
                "tools",
                format!("two tools are named `{}`", dup.1.name),
            ));
        }
        if tools.is_empty() {
            return match choice {
                Choice::None => Ok(None),
                _ => Err(invalid(
                    "tool_choice",
                    "`tool_choice` needs `tools` to choose from".into(),
                )),
            };
        }
        if let Choice::Named(n) = &choice {
            if !tools.iter().any(|t| &t.name == n) {
                return Err(invalid(
                    "tool_choice",
                    format!("`tool_choice` names `{n}`, which is not among the `tools`"),
                ));
            }
        }
        Ok(Some(Self {
            tools,
            choice,
            parallel: parallel.unwrap_or(true),
        }))
    }

    /// The tools the model is told about (none when `tool_choice` is `none`).
    fn offered(&self) -> &[Tool] {
        match self.choice {
            Choice::None => &[],
            _ => &self.tools,
        }
    }

    /// The definitions for a template's `tools` variable.
    pub fn definitions(&self) -> Option<Value> {
        let offered = self.offered();
        (!offered.is_empty()).then(|| offered.iter().map(|t| t.definition.clone()).collect())
    }

    /// The system-prompt block for templates that do not render tools.
    pub fn system_block(&self) -> Option<String> {
        let offered = self.offered();
        if offered.is_empty() {
            return None;
        }
        let signatures: Vec<String> = offered.iter().map(|t| t.definition.to_string()).collect();
        Some(format!(
            "You may call one or more functions to assist with the user query. \
             Function signatures are within <tools></tools>:\n<tools>\n{}\n</tools>\n\
             To call a function, answer with a JSON object inside tags:\n\
             {OPEN}\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n{CLOSE}",
            signatures.join("\n")
        ))
    }

    /// The constraint `tool_choice` puts on the output.
    pub fn constraint(&self) -> Option<Constraint> {
        match &self.choice {
            Choice::None | Choice::Auto => None,
            Choice::Named(n) => {
                let t = self.tools.iter().find(|t| &t.name == n)?;
                Some(Constraint::JsonSchema(t.parameters.clone()))
            }
            Choice::Required => {
                let calls: Vec<Value> = self
                    .tools
                    .iter()
                    .map(|t| {
                        json!({"type": "object",
                               "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                               "required": ["name", "arguments"], "additionalProperties": false})
                    })
                    .collect();
                let schema = json!({"anyOf": calls});
                let call = format!(
                    "call: {} %json {schema} {}",
                    Value::from(format!("{OPEN}\n")),
                    Value::from(format!("\n{CLOSE}"))
                );
                let start = if self.parallel {
                    "start: call (\"\\n\" call)*"
                } else {
                    "start: call"
                };
                Some(Constraint::Lark(format!("{start}\n{call}\n")))
            }
        }
    }

    /// The assistant message for a finished answer, and its finish reason:
    /// `tool_calls` when the model chose to call (a named `tool_choice`
    /// answers `stop`, as OpenAI does).
    pub fn message(&self, text: &str, finish: FinishReason) -> (Value, &'static str) {
        let (content, calls) = match self.reading() {
            Some(Reading::Arguments(name)) => {
                let call = Call {
                    name: name.to_string(),
                    arguments: text.to_string(),
                };
                return (
                    json!({"role": "assistant", "content": null, "tool_calls": tool_calls_json(&[call])}),
                    finish.as_str(),
                );
            }
            Some(Reading::Blocks) => parse_blocks(text, &self.tools),
            None => (String::new(), vec![]),
        };
        if calls.is_empty() {
            return (
                json!({"role": "assistant", "content": text}),
                finish.as_str(),
            );
        }
        (
            json!({"role": "assistant", "content": (!content.is_empty()).then_some(content),
                   "tool_calls": tool_calls_json(&calls)}),
            called(finish),
        )
    }

    pub fn reading(&self) -> Option<Reading<'_>> {
        match &self.choice {
            Choice::None => None,
            Choice::Named(n) => Some(Reading::Arguments(n)),
            Choice::Auto | Choice::Required => Some(Reading::Blocks),
        }
    }
}

/// One entry of `tools`, checked.
fn tool(v: Value) -> Result<Tool, ApiError> {
    let bad = |m: &str| invalid("tools", m.to_string());
    if v["type"] != "function" {
        return Err(bad(
            "each tool must be {\"type\": \"function\", \"function\": {...}}",
        ));
    }
    if let Some(k) = v.as_object().and_then(|o| {
        o.keys()
            .find(|k| !["type", "function"].contains(&k.as_str()))
    }) {
        return Err(invalid(
            "tools",
            format!("`{k}` is not supported in a tool (it takes type and function)"),
        ));
    }
    let f = v["function"]
        .as_object()
        .ok_or_else(|| bad("a tool's `function` must be an object"))?;
    const KEYS: &[&str] = &["name", "description", "parameters", "strict"];
    if let Some(k) = f.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(invalid(
            "tools",
            format!(
                "`function.{k}` is not supported in a tool (it takes {})",
                KEYS.join(", ")
            ),
        ));
    }
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| {
            (1..=64).contains(&n.len())
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        })
        .ok_or_else(|| bad("a function's `name` must be 1 to 64 letters, digits, _ or -"))?;
    let parameters = match f.get("parameters") {
        None => json!({"type": "object", "properties": {}}),
        Some(p @ Value::Object(_)) => p.clone(),
        Some(_) => {
            return Err(bad(
                "a function's `parameters` must be a JSON schema object",
            ))
        }
    };
    Ok(Tool {
        name: name.to_string(),
        definition: v,
        parameters,
    })
}

/// The conversation's tool turns as text for templates that do not render
/// them: an assistant's calls as `<tool_call>` blocks after its content, a
/// tool's result inside `<tool_response>`.
pub fn render_turn(role: &str, content: String, calls: &[Value]) -> ChatMessage {
    let mut content = content;
    for c in calls {
        let f = &c["function"];
        let arguments: Value = match &f["arguments"] {
            Value::String(s) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            other => other.clone(),
        };
        let call = json!({"name": f["name"], "arguments": arguments});
        if !content.is_empty() {
            content.push('\n');
        }
        content.push_str(&format!("{OPEN}\n{call}\n{CLOSE}"));
    }
    if role == "tool" {
        content = format!("<tool_response>\n{content}\n</tool_response>");
    }
    ChatMessage {
        role: role.to_string(),
        content,
    }
}

/// Splits an answer into its text and its `<tool_call>` blocks. A block
/// that is not a JSON object with a known `name` stays text: a model that
/// writes a malformed call answers in text rather than failing.
pub fn parse_blocks(text: &str, tools: &[Tool]) -> (String, Vec<Call>) {
    let mut rest = text;
    let mut content = String::new();
    let mut calls = Vec::new();
    while let Some(start) = rest.find(OPEN) {
        let body_at = start + OPEN.len();
        let (body, after) = match rest[body_at..].find(CLOSE) {
            Some(end) => (
                &rest[body_at..body_at + end],
                &rest[body_at + end + CLOSE.len()..],
            ),
            None => (&rest[body_at..], ""),
        };
        let parsed = serde_json::from_str::<Value>(body.trim())
            .ok()
            .and_then(|v| {
                let name = v["name"].as_str()?;
                tools.iter().any(|t| t.name == name).then(|| Call {
                    name: name.to_string(),
                    arguments: match &v["arguments"] {
                        Value::Null => "{}".to_string(),
                        a => a.to_string(),
                    },
                })
            });
        match parsed {
            Some(c) => {
                content.push_str(&rest[..start]);
                calls.push(c);
            }
            None => content.push_str(&rest[..body_at + body.len()]),
        }
        rest = after;
    }
    content.push_str(rest);
    (content.trim().to_string(), calls)
}

/// How much of `text`'s end could still grow into `<tool_call>`: held back
/// from a stream until the next delta says.
pub fn held_back(text: &str) -> usize {
    (1..OPEN.len())
        .rev()
        .find(|&n| text.ends_with(&OPEN[..n]))
        .unwrap_or(0)
}

/// Where the first `<tool_call>` starts, if the text has one.
pub fn first_block(text: &str) -> Option<usize> {
    text.find(OPEN)
}

/// `tool_calls` for an answer that ended by itself with calls; a cut one
/// keeps `length`.
fn called(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop => "tool_calls",
        other => other.as_str(),
    }
}

/// One streamed choice's progress through its tool calls: the chat deltas
/// each piece of text makes, holding back what may open a `<tool_call>`.
#[derive(Default)]
pub struct ToolStream {
    text: String,
    /// Bytes of `text` sent as content.
    sent: usize,
    in_block: bool,
    announced: bool,
}

fn content_delta(s: &str) -> Vec<Value> {
    if s.is_empty() {
        vec![]
    } else {
        vec![json!({"content": s})]
    }
}

impl ToolStream {
    /// The deltas for the next piece of an answer.
    pub fn push(&mut self, tools: &Tools, piece: &str) -> Vec<Value> {
        match tools.reading() {
            Some(Reading::Arguments(name)) => {
                if !self.announced {
                    self.announced = true;
                    vec![
                        json!({"tool_calls": [{"index": 0, "id": call_id(), "type": "function",
                                               "function": {"name": name, "arguments": piece}}]}),
                    ]
                } else if piece.is_empty() {
                    vec![]
                } else {
                    vec![json!({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})]
                }
            }
            _ => {
                self.text.push_str(piece);
                if self.in_block {
                    return vec![];
                }
                let start = self.sent;
                if let Some(at) = first_block(&self.text[start..]) {
                    self.in_block = true;
                    self.sent = start + at;
                } else {
                    self.sent =
                        self.text.len() - held_back(&self.text).min(self.text.len() - start);
                }
                content_delta(&self.text[start..self.sent])
            }
        }
    }

    /// The last deltas once the answer is complete, and the finish reason.
    pub fn finish(&mut self, tools: &Tools, finish: FinishReason) -> (Vec<Value>, &'static str) {
        match tools.reading() {
            Some(Reading::Arguments(_)) => (self.push(tools, ""), finish.as_str()),
            _ => {
                let rest = &self.text[self.sent..];
                let (content, calls) = match self.in_block {
                    true => parse_blocks(rest, &tools.tools),
                    false => (rest.to_string(), vec![]),
                };
                let mut deltas = content_delta(&content);
                if calls.is_empty() {
                    return (deltas, finish.as_str());
                }
                let entries: Vec<Value> = tool_calls_json(&calls)
                    .as_array()
                    .into_iter()
                    .flatten()
                    .enumerate()
                    .map(|(i, c)| {
                        let mut c = c.clone();
                        c["index"] = json!(i);
                        c
                    })
                    .collect();
                deltas.push(json!({"tool_calls": entries}));
                (deltas, called(finish))
            }
        }
    }
}

/// A call's id, unique enough to match results to calls.
pub fn call_id() -> String {
    format!("call_{}", uuid::Uuid::new_v4().simple())
}

/// OpenAI's `tool_calls` entries for `calls`.
pub fn tool_calls_json(calls: &[Call]) -> Value {
    calls
        .iter()
        .map(|c| {
            json!({"id": call_id(), "type": "function",
                   "function": {"name": c.name, "arguments": c.arguments}})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!({"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
               "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}})
    }

    fn tools(choice: Value) -> Result<Option<Tools>, ApiError> {
        let object = |v: Value| v.as_object().unwrap().clone();
        let choice = match choice {
            Value::String(s) => ToolChoiceIn::Mode(s),
            v => ToolChoiceIn::Function(v.as_object().cloned().unwrap_or_default()),
        };
        Tools::from_request(Some(vec![object(weather())]), Some(choice), None)
    }

    #[test]
    fn choices_are_read_and_checked() {
        assert_eq!(tools(json!("auto")).unwrap().unwrap().choice, Choice::Auto);
        let named = tools(json!({"type": "function", "function": {"name": "get_weather"}}))
            .unwrap()
            .unwrap();
        assert_eq!(named.reading(), Some(Reading::Arguments("get_weather")));
        assert!(matches!(
            named.constraint(),
            Some(Constraint::JsonSchema(_))
        ));
        for bad in [
            json!({"type": "function", "function": {"name": "get_weather", "strict": true}}),
            json!("sometimes"),
            json!({"type": "function", "function": {"name": "nope"}}),
            json!(3),
        ] {
            assert_eq!(
                tools(bad).unwrap_err().param.as_deref(),
                Some("tool_choice")
            );
        }
        let required = Some(ToolChoiceIn::Mode("required".into()));
        let e = Tools::from_request(None, required, None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tool_choice"));
        let extra = json!({"type": "function", "function": {"name": "f"}, "cache_control": {}});
        let e = Tools::from_request(Some(vec![extra.as_object().unwrap().clone()]), None, None)
            .unwrap_err();
        assert!(e.message.contains("`cache_control`"), "{}", e.message);
        let code = json!({"type": "code"}).as_object().unwrap().clone();
        let e = Tools::from_request(Some(vec![code]), None, None).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("tools"));
        let none = tools(json!("none")).unwrap().unwrap();
        assert!(none.system_block().is_none() && none.constraint().is_none());
    }

    #[test]
    fn blocks_parse_out_of_text_and_malformed_ones_stay_text() {
        let t = tools(json!("auto")).unwrap().unwrap();
        let text = "Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>";
        let (content, calls) = parse_blocks(text, &t.tools);
        assert_eq!(content, "Let me check.");
        assert_eq!(
            calls,
            vec![Call {
                name: "get_weather".into(),
                arguments: r#"{"city":"Oslo"}"#.into()
            }]
        );
        let (content, calls) =
            parse_blocks("<tool_call>{\"name\": \"unknown\"}</tool_call>", &t.tools);
        assert!(calls.is_empty() && content.contains("unknown"));
        assert_eq!(held_back("text <tool_"), 6);
        assert_eq!(held_back("text"), 0);
    }
}
