//! `/v1/chat/completions` and `/v1/completions`: validate, tokenize, submit to
//! the engine, and answer as one JSON body or as server-sent events.
use super::error::{ApiError, OpenAiBody};
use super::openai_types::{ChatRequest, CommonParams, CompletionRequest, Validated};
use super::AppState;
use crate::dispatch::llm::{Generation, LlmTarget};
use crate::dispatch::{self, Unavailable};
use crate::upstream::{Protocol, ProxyRequest, Upstream, UpstreamError};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::http::StatusCode;
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::llm::ChatMessage;
use engine::llm::{
    FinishReason, GenerationEvent, GenerationRequest, LlmEngine, LlmError, TokenLogprob,
};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;

fn parse<T: serde::de::DeserializeOwned>(body: &Bytes) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_body(format!("invalid request body: {e}")))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The two endpoints differ only in prompt building and response shapes.
#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Chat,
    Completion,
}

struct Prepared {
    target: LlmTarget,
    /// The name the client sent, as the response repeats it.
    model: String,
    v: Validated,
    prompt: Vec<u32>,
    /// An experiment shadow arm's own prompt, by shadow.
    shadow_prompts: Vec<Option<Vec<u32>>>,
    request_id: String,
}

/// Resolves the request's model through the dispatch layer. The rollout
/// unit is `user`, else the `x-switchyard-unit` header; a prompt
/// experiment reads its own unit. An experiment arm's sampling defaults fill
/// what the request leaves unset.
fn route(
    state: &AppState,
    common: &mut CommonParams,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<LlmTarget, ApiError> {
    // One snapshot answers both: experiments and routes as of one publish.
    let table = state.routes().snapshot();
    let user = common.user.clone();
    let unit = user.clone().or_else(|| dispatch::header_unit(headers));
    let target = dispatch::resolve_llm(&table, &common.model, unit.as_deref(), |e| {
        e.unit(headers, user.as_deref(), body)
    })
    .map_err(|Unavailable(m)| ApiError::unavailable(m))?
    .ok_or_else(|| ApiError::model_not_found(&common.model))?;
    if let Some(a) = &target.experiment {
        let variant = a.prompt();
        let f = &mut common.fields;
        f.temperature = f.temperature.or(variant.temperature.map(f64::from));
        f.top_p = f.top_p.or(variant.top_p.map(f64::from));
        f.max_tokens = f.max_tokens.or(variant.max_tokens);
    }
    Ok(target)
}

/// Replaces the system message (or adds one first) with the arm's.
fn apply_system(messages: &mut Vec<ChatMessage>, system: Option<String>) {
    let Some(content) = system else { return };
    match messages.first_mut() {
        Some(m) if m.role == "system" => m.content = content,
        _ => messages.insert(
            0,
            ChatMessage {
                role: "system".into(),
                content,
            },
        ),
    }
}

/// The engine request for `p`, started through the dispatch layer.
fn submit(
    p: &Prepared,
    state: &AppState,
) -> Result<(UnboundedReceiver<GenerationEvent>, usize), ApiError> {
    let engine = &p.target.engine;
    // Without max_tokens, the rest of the context (at least one token, so an
    // over-long prompt gets the engine's context error).
    let max_tokens =
        p.v.params
            .max_tokens
            .unwrap_or_else(|| engine.max_model_len().saturating_sub(p.prompt.len()).max(1));
    let most = engine.max_num_seqs();
    if p.v.params.n > most {
        return Err(ApiError::invalid(
            "n",
            format!(
                "`n` = {} is more than this model's max_num_seqs ({most})",
                p.v.params.n
            ),
        ));
    }
    let request = GenerationRequest {
        n: p.v.params.n,
        prompt: p.prompt.clone(),
        sampling: p.v.params.sampling.clone(),
        max_tokens,
        min_tokens: p.v.params.min_tokens,
        stop: p.v.params.stop.clone(),
        ignore_eos: p.v.params.ignore_eos,
    };
    let generation = Generation {
        request,
        request_id: p.request_id.clone(),
        shadow_prompts: p.shadow_prompts.clone(),
    };
    let rx = p
        .target
        .start(&state.recorders(), generation)
        .map_err(|e| match e {
            LlmError::QueueFull { .. } => ApiError::overloaded(format!("{e}; retry shortly")),
            LlmError::ContextLength {
                max,
                prompt,
                max_tokens,
            } => ApiError::context_length(max, prompt, max_tokens),
            LlmError::InvalidRequest(m) => ApiError::invalid("prompt", m),
            other => ApiError::internal(other.to_string()),
        })?;
    Ok((rx, p.prompt.len()))
}

pub async fn chat_completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBody(body): OpenAiBody,
) -> Response {
    if let Some((u, stream)) = upstream_for(&state, &body) {
        return proxy(u, stream, "/v1/chat/completions", body).await;
    }
    let s = state.clone();
    let prepared = state
        .offload
        .run(body.len(), move || prepare_chat(&s, &headers, &body))
        .await;
    respond(prepared, Kind::Chat, &state).await
}

/// Parses, routes, renders the chat template and tokenizes: the work that
/// runs on the blocking pool for a large body.
fn prepare_chat(state: &AppState, headers: &HeaderMap, body: &Bytes) -> Result<Prepared, ApiError> {
    let mut req: ChatRequest = parse(body)?;
    let target = route(state, &mut req.common, headers, body)?;
    let messages = req.chat_messages()?;
    let logprobs = req.logprobs()?;
    let system = target.experiment.as_ref().and_then(|a| a.prompt().system);
    let prompt = render_chat(&target.engine, messages.clone(), system)?;
    let shadow_prompts = target
        .shadows
        .iter()
        .map(|s| {
            s.system
                .clone()
                .map(|sys| render_chat(&s.engine, messages.clone(), Some(sys)))
                .transpose()
        })
        .collect::<Result<_, _>>()?;
    let model = req.common.model.clone();
    let v = req.common.validate(req.max_completion_tokens, logprobs)?;
    Ok(Prepared {
        request_id: dispatch::request_id(headers, "chatcmpl"),
        target,
        model,
        v,
        prompt,
        shadow_prompts,
    })
}

/// The chat prompt as `engine`'s template renders it (with `system` in place
/// of the first system message), tokenized.
fn render_chat(
    engine: &LlmEngine,
    mut messages: Vec<ChatMessage>,
    system: Option<String>,
) -> Result<Vec<u32>, ApiError> {
    apply_system(&mut messages, system);
    let template = engine.template().ok_or_else(|| {
        ApiError::invalid(
            "model",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    engine
        .tokenizer()
        .encode(&text)
        .map_err(|e| ApiError::internal(e.to_string()))
}

pub async fn completions(
    State(state): State<AppState>,
    headers: HeaderMap,
    OpenAiBody(body): OpenAiBody,
) -> Response {
    if let Some((u, stream)) = upstream_for(&state, &body) {
        return proxy(u, stream, "/v1/completions", body).await;
    }
    let s = state.clone();
    let prepared = state
        .offload
        .run(body.len(), move || prepare_completion(&s, &headers, &body))
        .await;
    respond(prepared, Kind::Completion, &state).await
}

fn prepare_completion(
    state: &AppState,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<Prepared, ApiError> {
    let mut req: CompletionRequest = parse(body)?;
    let target = route(state, &mut req.common, headers, body)?;
    let text = req.prompt_text()?;
    if req.echo {
        return Err(ApiError::invalid("echo", "`echo` is not supported yet"));
    }
    let logprobs = req.logprobs()?;
    let prompt = target
        .engine
        .tokenizer()
        .encode(&text)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    let model = req.common.model.clone();
    // OpenAI's default for completions is 16 tokens.
    let max_tokens = req.common.fields.max_tokens.or(Some(16));
    let v = req.common.validate(max_tokens, logprobs)?;
    Ok(Prepared {
        request_id: dispatch::request_id(headers, "cmpl"),
        // A shadow arm's system prompt is for chat; completions copy the prompt.
        shadow_prompts: vec![],
        target,
        model,
        v,
        prompt,
    })
}

/// The fields a proxied request is read for.
#[derive(serde::Deserialize)]
struct ProxyFields {
    model: String,
    #[serde(default)]
    stream: bool,
}

/// The remote upstream serving the body's `model`, if any.
fn upstream_for(state: &AppState, body: &Bytes) -> Option<(Upstream, bool)> {
    if state.upstreams.is_empty() {
        return None;
    }
    let f: ProxyFields = serde_json::from_slice(body).ok()?;
    state
        .upstream(&f.model, Protocol::Openai)
        .map(|u| (u.clone(), f.stream))
}

/// Forwards the request to a replica and sends its answer back as is (a
/// stream as it comes), naming the replica in `x-switchyard-upstream`. The
/// body is rewritten only when the upstream knows the model by another name.
async fn proxy(u: Upstream, stream: bool, path: &'static str, body: Bytes) -> Response {
    let body = match &u.config.model {
        Some(m) => {
            let mut v: Value = match serde_json::from_slice(&body) {
                Ok(v) => v,
                Err(e) => {
                    return ApiError::bad_body(format!("invalid request body: {e}")).into_response()
                }
            };
            v["model"] = json!(m);
            Bytes::from(serde_json::to_vec(&v).expect("a JSON value serializes"))
        }
        None => body,
    };
    let name = u.config.name.clone();
    match u.send(ProxyRequest { path, body, stream }).await {
        Ok((resp, replica)) => {
            metrics::counter!("switchyard:upstream_requests", "upstream" => name, "replica" => replica.clone(), "status" => resp.status().as_u16().to_string())
                .increment(1);
            let mut out = Response::builder()
                .status(resp.status())
                .header("x-switchyard-upstream", replica);
            if let Some(ct) = resp.headers().get("content-type") {
                out = out.header("content-type", ct);
            }
            let body = if stream {
                axum::body::Body::from_stream(resp.bytes_stream())
            } else {
                match resp.bytes().await {
                    Ok(b) => axum::body::Body::from(b),
                    Err(e) => {
                        return upstream_error(
                            &u.config.name,
                            UpstreamError::Failed(u.config.name.clone(), e.to_string()),
                        )
                    }
                }
            };
            out.body(body)
                .unwrap_or_else(|e| ApiError::internal(e.to_string()).into_response())
        }
        Err(e) => upstream_error(&name, e),
    }
}

fn upstream_error(name: &str, e: UpstreamError) -> Response {
    metrics::counter!("switchyard:upstream_errors", "upstream" => name.to_string()).increment(1);
    let status = match &e {
        UpstreamError::Timeout(..) => StatusCode::GATEWAY_TIMEOUT,
        UpstreamError::Failed(..) => StatusCode::BAD_GATEWAY,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    ApiError {
        status,
        code: Some("upstream_unavailable"),
        ..ApiError::internal(e.to_string())
    }
    .into_response()
}

async fn respond(prepared: Result<Prepared, ApiError>, kind: Kind, state: &AppState) -> Response {
    let p = match prepared {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    // The body's id is the request id, prefixed as OpenAI's are.
    let prefix = match kind {
        Kind::Chat => "chatcmpl-",
        Kind::Completion => "cmpl-",
    };
    let id = match p.request_id.starts_with(prefix) {
        true => p.request_id.clone(),
        false => format!("{prefix}{}", p.request_id),
    };
    let (rx, prompt_tokens) = match submit(&p, state) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let shape = Shape {
        kind,
        id,
        model: p.model,
        created: now(),
        logprobs: p.v.params.sampling.logprobs.is_some(),
        n: p.v.params.n,
    };
    let mut resp = if p.v.stream {
        stream_response(shape, rx, p.v.include_usage, state.shutdown.clone()).into_response()
    } else {
        tokio::select! {
            r = collect_response(shape, rx, prompt_tokens) => r,
            _ = state.shutdown.ended() => shutting_down().into_response(),
        }
    };
    dispatch::headers(resp.headers_mut(), &p.target.served(), &p.request_id);
    resp
}

/// The fixed parts of every response body of one request.
struct Shape {
    kind: Kind,
    id: String,
    model: String,
    created: u64,
    logprobs: bool,
    /// Choices in the response.
    n: usize,
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
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
        let finish_reason = finish.map(FinishReason::as_str);
        let logprobs = self.logprobs(lps, offset);
        match (self.kind, chunk) {
            (Kind::Completion, _) => {
                json!({"index": index, "text": text.unwrap_or(""), "logprobs": logprobs, "finish_reason": finish_reason})
            }
            (Kind::Chat, false) => {
                json!({"index": index, "message": {"role": "assistant", "content": text.unwrap_or("")},
                                          "logprobs": logprobs, "finish_reason": finish_reason})
            }
            (Kind::Chat, true) => {
                let delta = text.map_or(json!({}), |t| json!({"content": t}));
                json!({"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason})
            }
        }
    }

    fn body(&self, choices: Vec<Value>, chunk: bool) -> Value {
        json!({"id": self.id, "object": self.object(chunk), "created": self.created, "model": self.model, "choices": choices})
    }
}

async fn collect_response(
    shape: Shape,
    mut rx: UnboundedReceiver<GenerationEvent>,
    prompt_tokens: usize,
) -> Response {
    let mut texts = vec![String::new(); shape.n];
    let mut lps = vec![Vec::new(); shape.n];
    let mut finished = vec![None; shape.n];
    let mut completion = 0;
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
                ..
            } => {
                finished[index] = Some(reason);
                completion += completion_tokens;
                if finished.iter().all(Option::is_some) {
                    let choices = (0..shape.n)
                        .map(|i| shape.choice(i, Some(&texts[i]), &lps[i], 0, finished[i], false))
                        .collect();
                    let mut body = shape.body(choices, false);
                    body["usage"] = usage(prompt_tokens, completion);
                    return Json(body).into_response();
                }
            }
            GenerationEvent::Failed(m) => return ApiError::internal(m).into_response(),
        }
    }
    ApiError::internal(format!(
        "the engine stopped before finishing (prompt of {prompt_tokens} tokens)"
    ))
    .into_response()
}

fn sse(v: &Value) -> Event {
    Event::default().data(v.to_string())
}

/// Server-sent events: the role first (chat), then content deltas, the finish
/// reason, optional usage, and `[DONE]`. Dropping the stream cancels the request.
fn stream_response(
    shape: Shape,
    rx: UnboundedReceiver<GenerationEvent>,
    include_usage: bool,
    shutdown: crate::server::Shutdown,
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
        Kind::Completion => vec![],
    };
    let head = stream::iter(first.iter().map(sse).map(Ok).collect::<Vec<_>>());
    /// Per choice: text offset so far; and choices finished, completion tokens.
    struct Progress {
        offsets: Vec<usize>,
        finished: usize,
        completion: usize,
        done: bool,
    }
    let progress = Progress {
        offsets: vec![0; shape.n],
        finished: 0,
        completion: 0,
        done: false,
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
                    if text.is_empty() && lps.is_empty() {
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
                }) => {
                    let text = (shape.kind == Kind::Completion).then_some("");
                    let offset = pr.offsets[index];
                    let mut out = vec![sse(&with_usage(shape.body(
                        vec![shape.choice(index, text, &[], offset, Some(reason), true)],
                        true,
                    )))];
                    pr.finished += 1;
                    pr.completion += completion_tokens;
                    if pr.finished == shape.n {
                        if include_usage {
                            let mut u = shape.body(vec![], true);
                            u["usage"] = usage(prompt_tokens, pr.completion);
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
    let events = super::until_shutdown(head.chain(body.flatten()), shutdown, || {
        vec![
            Ok(sse(&shutting_down().body())),
            Ok(Event::default().data("[DONE]")),
        ]
    });
    Sse::new(events)
}

/// What a request still running at the end of the shutdown grace period gets.
fn shutting_down() -> ApiError {
    ApiError {
        code: Some("shutting_down"),
        ..ApiError::unavailable("the server is shutting down; send the request again")
    }
}
