//! OpenAI's response shapes: one JSON body, or server-sent events (role,
//! content deltas, finish reason, usage, `[DONE]`), with chat's and
//! completions' logprobs.
use super::tools::{ToolStream, Tools};
use crate::api::error::ApiError;
use crate::dispatch::llm::Events;
use axum::response::sse::{Event, Sse};
use engine::llm::{FinishReason, GenerationEvent, TokenLogprob};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;

/// The two endpoints differ only in prompt building and response shapes.
#[derive(Clone, Copy, PartialEq)]
pub enum Kind {
    Chat,
    Completion,
}

/// The fixed parts of every response body of one request.
pub struct Shape {
    pub kind: Kind,
    pub id: String,
    pub model: String,
    pub created: u64,
    pub logprobs: bool,
    /// Choices in the response.
    pub n: usize,
    /// Function calling: how answers become tool calls (chat only).
    pub tools: Option<Tools>,
}

/// OpenAI's `usage`, with the prompt tokens the prefix cache served.
pub fn usage(prompt: usize, completion: usize, cached: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
           "prompt_tokens_details": {"cached_tokens": cached}})
}

/// Chat's `logprobs.content` entries.
fn chat_logprobs(lps: &[TokenLogprob]) -> Value {
    let entry = |t: &str, lp: f32| json!({"token": t, "logprob": lp, "bytes": t.as_bytes()});
    let content: Vec<Value> = lps
        .iter()
        .map(|l| {
            let mut e = entry(&l.token, l.logprob);
            e["top_logprobs"] = l.top.iter().map(|(t, lp)| entry(t, *lp)).collect();
            e
        })
        .collect();
    json!({ "content": content })
}

/// Completions' legacy logprobs object; `offset` is where the text starts.
fn completion_logprobs(lps: &[TokenLogprob], mut offset: usize) -> Value {
    let mut text_offset = Vec::new();
    for l in lps {
        text_offset.push(offset);
        offset += l.token.len();
    }
    json!({
        "tokens": lps.iter().map(|l| l.token.clone()).collect::<Vec<_>>(),
        "token_logprobs": lps.iter().map(|l| l.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|l| l.top.iter().map(|(t, lp)| (t.clone(), json!(lp))).collect::<serde_json::Map<_, _>>()).collect::<Vec<_>>(),
        "text_offset": text_offset,
    })
}

impl Shape {
    fn object(&self, chunk: bool) -> &'static str {
        match (self.kind, chunk) {
            (Kind::Chat, false) => "chat.completion",
            (Kind::Chat, true) => "chat.completion.chunk",
            (Kind::Completion, _) => "text_completion",
        }
    }

    fn logprobs(&self, lps: &[TokenLogprob], offset: usize) -> Value {
        match (self.logprobs, self.kind) {
            (false, _) => Value::Null,
            (true, Kind::Chat) => chat_logprobs(lps),
            (true, Kind::Completion) => completion_logprobs(lps, offset),
        }
    }

    /// Choice `index` holding `text`; a delta for chat chunks.
    fn choice(
        &self,
        index: usize,
        text: Option<&str>,
        lps: &[TokenLogprob],
        offset: usize,
        finish: Option<FinishReason>,
        chunk: bool,
    ) -> Value {
        let mut finish_reason = finish.map(FinishReason::as_str);
        let logprobs = self.logprobs(lps, offset);
        match (self.kind, chunk) {
            (Kind::Completion, _) => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish_reason})
            }
            (Kind::Chat, false) => {
                let text = text.unwrap_or("");
                let message = match (&self.tools, finish) {
                    (Some(t), Some(f)) => {
                        let (message, reason) = t.message(text, f);
                        finish_reason = Some(reason);
                        message
                    }
                    _ => json!({"role": "assistant", "content": text}),
                };
                json!({"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason})
            }
            (Kind::Chat, true) => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
        }
    }

    pub fn body(&self, choices: Vec<Value>, chunk: bool) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }
}

/// The whole answer as one body, once every choice has finished.
pub async fn collect_body(
    shape: Shape,
    mut rx: Events,
    prompt_tokens: usize,
) -> Result<Value, ApiError> {
    let mut texts = vec![String::new(); shape.n];
    let mut lps = vec![Vec::new(); shape.n];
    let mut finished = vec![None; shape.n];
    let (mut completion, mut cached) = (0, 0);
    while let Some(ev) = rx.recv().await {
        match ev {
            GenerationEvent::Delta {
                index,
                text,
                logprob,
            } => {
                texts[index].push_str(&text);
                lps[index].extend(logprob);
            }
            GenerationEvent::Finished {
                index,
                reason,
                completion_tokens,
                cached_tokens,
                ..
            } => {
                finished[index] = Some(reason);
                completion += completion_tokens;
                cached = cached.max(cached_tokens);
                if finished.iter().all(Option::is_some) {
                    let choices = (0..shape.n)
                        .map(|i| shape.choice(i, Some(&texts[i]), &lps[i], 0, finished[i], false))
                        .collect();
                    let mut body = shape.body(choices, false);
                    body["usage"] = usage(prompt_tokens, completion, cached);
                    return Ok(body);
                }
            }
            GenerationEvent::Failed(m) => return Err(ApiError::internal(m)),
        }
    }
    Err(ApiError::internal(format!(
        "the engine stopped before finishing (prompt of {prompt_tokens} tokens)"
    )))
}

fn sse(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Server-sent events: the role first (chat), then content deltas, the finish
/// reason, optional usage, and `[DONE]`. Dropping the stream cancels the request.
/// `echoed`: completions choices sent first (a streamed `echo`), whose
/// text the generated tokens' offsets follow.
pub fn stream_response(
    shape: Shape,
    rx: Events,
    include_usage: bool,
    shutdown: crate::server::Shutdown,
    echoed: Vec<Value>,
) -> Sse<impl futures::Stream<Item = Result<Event, Infallible>>> {
    let with_usage = move |mut v: Value| {
        if include_usage {
            v["usage"] = Value::Null;
        }
        v
    };
    let first: Vec<Value> = match shape.kind {
        Kind::Chat => (0..shape.n)
            .map(|i| {
                with_usage(shape.body(
                    vec![json!({"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": null, "finish_reason": null})],
                    true,
                ))
            })
            .collect(),
        Kind::Completion => echoed
            .iter()
            .map(|c| with_usage(shape.body(vec![c.clone()], true)))
            .collect(),
    };
    let mut offsets = vec![0; shape.n];
    for c in &echoed {
        if let Some(o) = c["index"]
            .as_u64()
            .and_then(|i| offsets.get_mut(i as usize))
        {
            *o = c["text"].as_str().map_or(0, str::len);
        }
    }
    let head = stream::iter(first.iter().map(sse).map(Ok).collect::<Vec<_>>());
    /// Per choice: text offset so far; and choices finished, completion tokens.
    struct Progress {
        offsets: Vec<usize>,
        finished: usize,
        completion: usize,
        done: bool,
        /// Per choice, where its tool calls stand (chat with tools).
        tool_streams: Vec<ToolStream>,
    }
    let progress = Progress {
        offsets,
        finished: 0,
        completion: 0,
        done: false,
        tool_streams: (0..shape.n).map(|_| ToolStream::default()).collect(),
    };
    // A chat chunk of choice `index` carrying `delta`.
    let delta_chunk = move |shape: &Shape, index: usize, delta: Value, finish: Option<&str>| {
        sse(&with_usage(shape.body(
            vec![
                json!({"index": index, "delta": delta, "logprobs": null, "finish_reason": finish}),
            ],
            true,
        )))
    };
    let body = stream::unfold(
        (rx, shape, progress),
        move |(mut rx, shape, mut pr)| async move {
            if pr.done {
                return None;
            }
            let ev = rx.recv().await;
            let events = match ev {
                Some(GenerationEvent::Delta {
                    index,
                    text,
                    logprob,
                }) => {
                    let lps: Vec<TokenLogprob> = logprob.into_iter().collect();
                    if let Some(t) = &shape.tools {
                        pr.tool_streams[index]
                            .push(t, &text)
                            .into_iter()
                            .map(|d| delta_chunk(&shape, index, d, None))
                            .collect()
                    } else if text.is_empty() && lps.is_empty() {
                        vec![]
                    } else {
                        let offset = pr.offsets[index];
                        let v = with_usage(shape.body(
                            vec![shape.choice(index, Some(&text), &lps, offset, None, true)],
                            true,
                        ));
                        pr.offsets[index] += text.len();
                        vec![sse(&v)]
                    }
                }
                Some(GenerationEvent::Finished {
                    index,
                    reason,
                    prompt_tokens,
                    completion_tokens,
                    cached_tokens,
                }) => {
                    let mut out = match &shape.tools {
                        Some(t) => {
                            let (deltas, finish) = pr.tool_streams[index].finish(t, reason);
                            let mut out: Vec<Event> = deltas
                                .into_iter()
                                .map(|d| delta_chunk(&shape, index, d, None))
                                .collect();
                            out.push(delta_chunk(&shape, index, json!({}), Some(finish)));
                            out
                        }
                        None => {
                            let text = (shape.kind == Kind::Completion).then_some("");
                            let offset = pr.offsets[index];
                            vec![sse(&with_usage(shape.body(
                                vec![shape.choice(index, text, &[], offset, Some(reason), true)],
                                true,
                            )))]
                        }
                    };
                    pr.finished += 1;
                    pr.completion += completion_tokens;
                    if pr.finished == shape.n {
                        if include_usage {
                            let mut u = shape.body(vec![], true);
                            u["usage"] = usage(prompt_tokens, pr.completion, cached_tokens);
                            out.push(sse(&u));
                        }
                        out.push(Event::default().data("[DONE]"));
                        pr.done = true;
                    }
                    out
                }
                Some(GenerationEvent::Failed(m)) => {
                    pr.done = true;
                    vec![
                        sse(&ApiError::internal(m).body()),
                        Event::default().data("[DONE]"),
                    ]
                }
                None => {
                    pr.done = true;
                    vec![sse(&ApiError::internal("the engine stopped").body())]
                }
            };
            Some((stream::iter(events.into_iter().map(Ok)), (rx, shape, pr)))
        },
    );
    let events = crate::api::until_shutdown(head.chain(body.flatten()), shutdown, || {
        vec![
            Ok(sse(&shutting_down().body())),
            Ok(Event::default().data("[DONE]")),
        ]
    });
    Sse::new(events)
}

/// What a request still running at the end of the shutdown grace period gets.
pub fn shutting_down() -> ApiError {
    ApiError {
        code: Some("shutting_down"),
        ..ApiError::unavailable("the server is shutting down; send the request again")
    }
}
