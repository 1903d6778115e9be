//! Request bodies of the OpenAI API, and their validation into the engine's
//! request type. Unknown fields are ignored, as OpenAI's own server does.
use super::error::ApiError;
use crate::params::{GenerateParams, ParamError, SamplingFields};
use engine::llm::ChatMessage;
use serde::Deserialize;

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
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum PromptIn {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
pub struct CompletionRequest {
    #[serde(flatten)]
    pub common: CommonParams,
    pub prompt: PromptIn,
    pub logprobs: Option<i64>,
    #[serde(default)]
    pub echo: bool,
}

/// The validated, endpoint-independent part of a request.
#[derive(Debug)]
pub struct Validated {
    pub params: GenerateParams,
    pub stream: bool,
    pub include_usage: bool,
}

impl From<ParamError> for ApiError {
    fn from(e: ParamError) -> Self {
        ApiError::invalid(e.param, e.message)
    }
}

impl CommonParams {
    /// Checks every parameter; `logprobs` is the number of alternatives per token.
    pub fn validate(
        self,
        max_tokens: Option<i64>,
        logprobs: Option<usize>,
    ) -> Result<Validated, ApiError> {
        Ok(Validated {
            params: self.fields.validate(max_tokens, logprobs)?,
            include_usage: self.stream_options.is_some_and(|o| o.include_usage),
            stream: self.stream,
        })
    }
}

impl ChatRequest {
    pub fn chat_messages(&self) -> Result<Vec<ChatMessage>, ApiError> {
        if self.messages.is_empty() {
            return Err(ApiError::invalid(
                "messages",
                "`messages` must hold at least one message",
            ));
        }
        self.messages
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
                    "system".into()
                } else {
                    m.role.clone()
                };
                Ok(ChatMessage { role, content })
            })
            .collect()
    }

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

impl CompletionRequest {
    pub fn prompt_text(&self) -> Result<String, ApiError> {
        match &self.prompt {
            PromptIn::One(p) => Ok(p.clone()),
            PromptIn::Many(v) if v.len() == 1 => Ok(v[0].clone()),
            PromptIn::Many(_) => Err(ApiError::invalid(
                "prompt",
                "batched prompts are not supported yet; send one prompt",
            )),
        }
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
            assert_eq!(e.param, Some(param), "{body}: {}", e.message);
            assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        }
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
