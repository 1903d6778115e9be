//! `/v1/chat/completions` and `/v1/completions`: validate, tokenize, submit to
//! the engine, and answer as one JSON body or as server-sent events.
use super::error::{ApiError, OpenAiBody};
use super::openai_types::{ChatRequest, CommonParams, CompletionRequest, Validated};
use super::AppState;
use crate::divergence::{self, ShadowStats};
use crate::experiment_stats::Outcome;
use crate::experiments::Assignment;
use crate::routing::Deployment;
use crate::sticky_hash::bucket;
use crate::upstream::{Protocol, ProxyRequest, Upstream, UpstreamError};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use engine::llm::ChatMessage;
use engine::llm::{
    FinishReason, GenerationEvent, GenerationRequest, LlmEngine, LlmError, SamplingParams,
    TokenLogprob,
};
use futures::stream::{self, StreamExt};
use serde_json::{json, Value};
use std::convert::Infallible;
use std::time::{Duration, Instant};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

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
    engine: LlmEngine,
    routed: Routed,
    model: String,
    v: Validated,
    prompt: Vec<u32>,
}

/// Where the route sent a request.
struct Routed {
    version: Option<u32>,
    arm: String,
    shadows: Vec<Deployment>,
    /// Set when a prompt experiment assigned the request.
    experiment: Option<Assignment>,
    started: Instant,
}

/// Picks the deployment for this request. A route with prompt experiments
/// assigns the request's unit to an arm (its deployment and prompt variant,
/// whose sampling defaults fill what the request leaves unset); otherwise the
/// hash of `user` decides between the primary and a canary/A/B candidate.
/// Requests without a unit are assigned at random.
fn engine_for(
    state: &AppState,
    common: &mut CommonParams,
    headers: &HeaderMap,
    body: &Bytes,
) -> Result<(LlmEngine, Routed), ApiError> {
    let started = Instant::now();
    // One snapshot answers both: experiments and routes as of one publish.
    let table = state.routes().snapshot();
    if !table.experiments.on_route(&common.model).is_empty() {
        let user = common.user.clone();
        let a = table
            .experiments
            .assign(&common.model, |e| e.unit(headers, user.as_deref(), body))
            .expect("the route has experiments");
        let (engine, version) = table.deployment(a.deployment()).ok_or_else(|| {
            ApiError::unavailable(format!(
                "experiment `{}` arm `{}`: deployment `{}` is not loaded",
                a.experiment.spec.name,
                a.arm_name(),
                a.deployment()
            ))
        })?;
        let variant = a.prompt();
        common.fields.temperature = common
            .fields
            .temperature
            .or(variant.temperature.map(f64::from));
        common.fields.top_p = common.fields.top_p.or(variant.top_p.map(f64::from));
        common.fields.max_tokens = common.fields.max_tokens.or(variant.max_tokens);
        return Ok((
            engine,
            Routed {
                version,
                arm: a.arm_name().to_string(),
                shadows: vec![],
                experiment: Some(a),
                started,
            },
        ));
    }
    let route = table
        .routes
        .get(&common.model)
        .ok_or_else(|| ApiError::model_not_found(&common.model))?;
    let unit = common
        .user
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (d, arm) = route.pick(bucket(&format!("{}/rollout", common.model), &unit));
    metrics::counter!("switchyard:route_requests", "route" => common.model.clone(), "version" => version_label(d), "arm" => arm)
        .increment(1);
    Ok((
        d.engine.clone(),
        Routed {
            version: d.version,
            arm: arm.to_string(),
            shadows: route.shadows.clone(),
            experiment: None,
            started,
        },
    ))
}

/// A deployment's version as metrics and shadow reports name it.
fn version_label(d: &Deployment) -> String {
    d.version
        .map_or_else(|| "static".to_string(), |v| v.to_string())
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

/// Forwards the engine's events to a new receiver, folding each into
/// `state` with `inspect`, and hands `state` to `done` once the engine has
/// sent the last one. A client that leaves stops the forwarding, and `done`
/// is not called.
fn tap<S: Send + 'static>(
    mut rx: UnboundedReceiver<GenerationEvent>,
    mut state: S,
    inspect: impl Fn(&mut S, &GenerationEvent) + Send + 'static,
    done: impl FnOnce(S) + Send + 'static,
) -> UnboundedReceiver<GenerationEvent> {
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            inspect(&mut state, &ev);
            if tx.send(ev).is_err() {
                return;
            }
        }
        done(state);
    });
    out
}

/// Hands the request's outcome to `done` at the end (not when the client
/// left: an abandoned request says nothing).
fn observe(
    rx: UnboundedReceiver<GenerationEvent>,
    started: Instant,
    done: impl FnOnce(Outcome) + Send + 'static,
) -> UnboundedReceiver<GenerationEvent> {
    let first = Outcome {
        ok: true,
        latency_s: 0.0,
        ttft_s: None,
        output_tokens: 0,
        random: false,
    };
    let inspect = move |o: &mut Outcome, ev: &GenerationEvent| match ev {
        GenerationEvent::Delta { .. } => {
            o.ttft_s
                .get_or_insert_with(|| started.elapsed().as_secs_f64());
        }
        GenerationEvent::Finished {
            completion_tokens, ..
        } => o.output_tokens += completion_tokens,
        GenerationEvent::Failed(_) => o.ok = false,
    };
    tap(rx, first, inspect, move |mut o| {
        o.latency_s = started.elapsed().as_secs_f64();
        done(o);
    })
}

/// Where a request's outcome is recorded: its experiment arm, and the route
/// version that served it (for rollout policies).
fn outcome_sink(state: &AppState, p: &Prepared) -> impl FnOnce(Outcome) + Send + 'static {
    let (stats, versions) = (state.stats.clone(), state.versions.clone());
    let arm = p.routed.experiment.as_ref().map(|a| {
        (
            a.experiment.spec.name.clone(),
            a.arm_name().to_string(),
            a.random,
        )
    });
    let version = p
        .routed
        .version
        .filter(|_| arm.is_none())
        .map(|v| (p.model.clone(), v));
    move |mut o: Outcome| {
        if let Some((exp, arm, random)) = arm {
            o.random = random;
            stats.record(&exp, &arm, &o);
        }
        if let Some((route, v)) = version {
            versions.record(&route, v, o.ok, o.latency_s);
        }
    }
}

/// Most copies in flight per shadow; beyond it a copy is skipped (and counted).
const SHADOW_CONCURRENCY: usize = 4;
/// A shadow that takes longer is counted as an error.
const SHADOW_TIMEOUT: Duration = Duration::from_secs(120);

/// Sends a copy of the request to each shadow once the primary has it, and
/// compares the shadow's first choice with the primary's. A shadow that is
/// full, slow or failing never touches the primary's reply: it runs on its own
/// engine, and its result only reaches `ShadowStats`.
fn mirror(
    p: &Prepared,
    shadows: &ShadowStats,
    rx: UnboundedReceiver<GenerationEvent>,
) -> UnboundedReceiver<GenerationEvent> {
    if p.routed.shadows.is_empty() {
        return rx;
    }
    let (rx, primary) = capture(rx, p.routed.started);
    for d in &p.routed.shadows {
        let version = version_label(d);
        let route = p.model.clone();
        let Some(permit) = shadows.permit(&route, &version, SHADOW_CONCURRENCY) else {
            shadows.skipped(&route, &version);
            continue;
        };
        let Ok((mut srx, _)) = submit_to(&d.engine, p, p.v.params.sampling.logprobs) else {
            shadows.error(&route, &version);
            continue;
        };
        metrics::counter!("switchyard:shadow_requests", "route" => route.clone(), "version" => version.clone())
            .increment(1);
        let (stats, mut primary) = (shadows.clone(), primary.clone());
        let (engine, prompt) = (d.engine.clone(), p.prompt.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let answer = tokio::time::timeout(SHADOW_TIMEOUT, async {
                let mut text = String::new();
                while let Some(ev) = srx.recv().await {
                    match ev {
                        GenerationEvent::Delta {
                            index: 0, text: t, ..
                        } => text.push_str(&t),
                        GenerationEvent::Failed(_) => return None,
                        _ => {}
                    }
                }
                Some(text)
            })
            .await;
            let shadow_s = started.elapsed().as_secs_f64();
            let Ok(Some(text)) = answer else {
                stats.error(&route, &version);
                return;
            };
            // The primary's answer; none if its client left before the end.
            let Ok(Some(answer)) = primary.wait_for(Option::is_some).await.map(|v| v.clone())
            else {
                return;
            };
            stats.record(
                &route,
                &version,
                divergence::compare(&answer.text, &text),
                answer.seconds,
                shadow_s,
            );
            // One teacher-forced pass: the primary's tokens under the shadow.
            let from = prompt.len();
            let tokens: Vec<u32> = prompt.into_iter().chain(answer.ids).collect();
            if tokens.len() == from {
                return;
            }
            match engine.score(tokens, from) {
                Ok(rx) => match rx.await {
                    Ok(Ok(shadow_lps)) => {
                        stats.record_forced(&route, &version, &answer.logprobs, &shadow_lps)
                    }
                    _ => stats.error(&route, &version),
                },
                Err(e) => {
                    tracing::debug!(%route, %version, error = %e, "shadow cannot score the primary's tokens")
                }
            }
        });
    }
    rx
}

/// The primary's first choice as shadows compare against it.
#[derive(Clone, Default)]
struct PrimaryAnswer {
    text: String,
    /// Its tokens and their log-probabilities under the primary model.
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    seconds: f64,
}

/// Passes the primary's events through and publishes its first choice (text,
/// tokens, log-probabilities) and latency when it finishes.
fn capture(
    rx: UnboundedReceiver<GenerationEvent>,
    started: Instant,
) -> (
    UnboundedReceiver<GenerationEvent>,
    watch::Receiver<Option<PrimaryAnswer>>,
) {
    let (done, primary) = watch::channel(None);
    let inspect = |a: &mut PrimaryAnswer, ev: &GenerationEvent| {
        if let GenerationEvent::Delta {
            index: 0,
            text,
            logprob,
        } = ev
        {
            a.text.push_str(text);
            if let Some(l) = logprob {
                a.ids.push(l.id);
                a.logprobs.push(l.logprob);
            }
        }
    };
    let out = tap(rx, PrimaryAnswer::default(), inspect, move |mut a| {
        a.seconds = started.elapsed().as_secs_f64();
        let _ = done.send(Some(a));
    });
    (out, primary)
}

/// Submits the primary. With shadows, the engine also reports each token's
/// log-probability (for the shadows' teacher-forced comparison); the client
/// sees them only if it asked.
fn submit(p: &Prepared) -> Result<(UnboundedReceiver<GenerationEvent>, usize), ApiError> {
    let logprobs =
        p.v.params
            .sampling
            .logprobs
            .or((!p.routed.shadows.is_empty()).then_some(0));
    submit_to(&p.engine, p, logprobs)
}

fn submit_to(
    engine: &LlmEngine,
    p: &Prepared,
    logprobs: Option<usize>,
) -> Result<(UnboundedReceiver<GenerationEvent>, usize), ApiError> {
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
    let req = GenerationRequest {
        n: p.v.params.n,
        prompt: p.prompt.clone(),
        sampling: SamplingParams {
            logprobs,
            ..p.v.params.sampling.clone()
        },
        max_tokens,
        min_tokens: p.v.params.min_tokens,
        stop: p.v.params.stop.clone(),
        ignore_eos: p.v.params.ignore_eos,
    };
    let rx = engine.submit(req).map_err(|e| match e {
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
    let (engine, routed) = engine_for(state, &mut req.common, headers, body)?;
    let mut messages = req.chat_messages()?;
    apply_system(
        &mut messages,
        routed.experiment.as_ref().and_then(|a| a.prompt().system),
    );
    let logprobs = req.logprobs()?;
    let template = engine.template().ok_or_else(|| {
        ApiError::invalid(
            "model",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let text = template
        .render(&messages, true)
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    let prompt = engine
        .tokenizer()
        .encode(&text)
        .map_err(|e| ApiError::internal(e.to_string()))?;
    let model = req.common.model.clone();
    let v = req.common.validate(req.max_completion_tokens, logprobs)?;
    Ok(Prepared {
        engine,
        routed,
        model,
        v,
        prompt,
    })
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
    let (engine, routed) = engine_for(state, &mut req.common, headers, body)?;
    let text = req.prompt_text()?;
    if req.echo {
        return Err(ApiError::invalid("echo", "`echo` is not supported yet"));
    }
    let logprobs = req.logprobs()?;
    let prompt = engine
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
        engine,
        routed,
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
    let id = match kind {
        Kind::Chat => format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        Kind::Completion => format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
    };
    let sink = outcome_sink(state, &p);
    let (mut rx, prompt_tokens) = match submit(&p) {
        Ok(x) => x,
        Err(e) => {
            sink(Outcome {
                ok: false,
                latency_s: p.routed.started.elapsed().as_secs_f64(),
                ttft_s: None,
                output_tokens: 0,
                random: false,
            });
            return e.into_response();
        }
    };
    rx = mirror(&p, &state.shadows, rx);
    if let Some(a) = &p.routed.experiment {
        state
            .stats
            .remember(&id, &a.experiment.spec.name, a.arm_name());
    }
    rx = observe(rx, p.routed.started, sink);
    let request_id = id.clone();
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
    let h = resp.headers_mut();
    if let Some(v) = p.routed.version {
        h.insert("x-switchyard-model-version", v.into());
    }
    let header = |v: &str| HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("-"));
    h.insert("x-switchyard-arm", header(&p.routed.arm));
    h.insert("x-request-id", header(&request_id));
    if let Some(a) = &p.routed.experiment {
        h.insert("x-switchyard-experiment", header(&a.experiment.spec.name));
    }
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
