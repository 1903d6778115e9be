//! `/v1/chat/completions` and `/v1/completions`: validate, tokenize, submit to
//! the engine, and answer as one JSON body or as server-sent events.
mod echo;
mod embeddings;
mod proxy;
mod render;
mod scan;
mod tokenize;
pub mod tools;

use super::error::{ApiError, OpenAiBody};
use super::openai_types::{
    refuse_unknown_fields, ChatRequest, CommonParams, CompletionRequest, PromptIn, Validated,
    CHAT_FIELDS, COMPLETION_FIELDS,
};
use super::AppState;
use crate::dispatch::llm::{Events, Generation, LlmTarget};
use crate::dispatch::{self, Unavailable};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::Json;
use echo::Echo;
use engine::llm::ChatMessage;
use engine::llm::{GenerationRequest, LlmEngine, LlmError};
use proxy::{proxy, upstream_for};
use render::{collect_body, shutting_down, stream_response, Kind, Shape};
use std::time::{SystemTime, UNIX_EPOCH};

pub use embeddings::embeddings;
pub use tokenize::{detokenize, tokenize, tokenizer_info};
use tools::Tools;

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_body(format!("invalid request body: {e}")))
}

/// The tokens `logit_bias` names must be in the served model's vocabulary.
fn check_logit_bias(v: &Validated, engine: &LlmEngine) -> Result<(), ApiError> {
    let vocab = engine.vocab_size();
    match v
        .params
        .sampling
        .logit_bias
        .iter()
        .find(|(t, _)| *t as usize >= vocab)
    {
        Some((t, _)) => Err(ApiError::invalid(
            "logit_bias",
            format!("`logit_bias` names token {t}, outside this model's vocabulary of {vocab}"),
        )),
        None => Ok(()),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// How many of each prompt's samples are returned, and whether their
/// logprobs were asked for (they are computed to rank the samples).
struct BestOf {
    keep: usize,
    report: bool,
}

impl Prepared {
    /// Drops what `best_of` does not keep from a collected body.
    fn keep_best(&self, body: &mut serde_json::Value) {
        if let Some(b) = &self.best_of {
            echo::keep_best(body, self.v.params.n, b.keep, b.report);
        }
    }

    /// Choices returned per prompt.
    fn returned_n(&self) -> usize {
        self.best_of.as_ref().map_or(self.v.params.n, |b| b.keep)
    }

    /// The logprobs the client asked for (not those `best_of` ranks by).
    fn reported_logprobs(&self) -> Option<usize> {
        let asked = self.best_of.as_ref().is_none_or(|b| b.report);
        self.v.params.sampling.logprobs.filter(|_| asked)
    }

    fn prompt_tokens(&self) -> usize {
        self.prompts.iter().map(Vec::len).sum()
    }

    /// The prompts' echoes, scored when the client asked for logprobs.
    async fn echoes(&self, echo: &Echo) -> Result<Vec<echo::Echoed>, ApiError> {
        let top = self.reported_logprobs();
        echo::score_prompts(&self.target.engine, &self.prompts, &echo.texts, top).await
    }
}

struct Prepared {
    target: LlmTarget,
    /// The name the client sent, as the response repeats it.
    model: String,
    v: Validated,
    /// One for chat; completions may batch several.
    prompts: Vec<Vec<u32>>,
    /// Completions' `echo`.
    echo: Option<Echo>,
    /// Completions' `best_of`, when it exceeds `n`.
    best_of: Option<BestOf>,
    /// An experiment shadow arm's own prompt, by shadow.
    shadow_prompts: Vec<Option<Vec<u32>>>,
    request_id: String,
    /// Function calling (chat).
    tools: Option<Tools>,
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
    let unit = dispatch::unit(&table, &common.model, headers, user.clone());
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
    Ok(target.charging(state.token_budget(headers)))
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

/// Appends `block` to the system message, or opens the conversation with it.
fn add_to_system(messages: &mut Vec<ChatMessage>, block: String) {
    match messages.first_mut() {
        Some(m) if m.role == "system" => m.content = format!("{}\n\n{block}", m.content),
        _ => messages.insert(
            0,
            ChatMessage {
                role: "system".into(),
                content: block,
            },
        ),
    }
}

/// The engine requests for `p` (one per prompt), started through the
/// dispatch layer; their events arrive on one receiver, with the prompt
/// tokens of all of them.
fn submit(p: &Prepared, state: &AppState) -> Result<(Events, usize), ApiError> {
    let engine = &p.target.engine;
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
    let mut receivers = Vec::with_capacity(p.prompts.len());
    for prompt in &p.prompts {
        // Without max_tokens, the rest of the context (at least one token,
        // so an over-long prompt gets the engine's context error).
        let max_tokens =
            p.v.params
                .max_tokens
                .unwrap_or_else(|| engine.max_model_len().saturating_sub(prompt.len()).max(1));
        let request = GenerationRequest {
            n: p.v.params.n,
            prompt: prompt.clone(),
            sampling: p.v.params.sampling.clone(),
            max_tokens,
            min_tokens: p.v.params.min_tokens,
            stop: p.v.params.stop.clone(),
            ignore_eos: p.v.params.ignore_eos,
            constraint: p.v.constraint.as_ref().map(|(_, c)| c.clone()),
        };
        let generation = Generation {
            request,
            request_id: p.request_id.clone(),
            shadow_prompts: p.shadow_prompts.clone(),
        };
        let rx = p
            .target
            .start(&state.recorders(), generation)
            .map_err(|e| llm_error(e, p))?;
        receivers.push(rx);
    }
    let prompt_tokens = p.prompt_tokens();
    let rx = match receivers.len() {
        1 => receivers.pop().expect("one receiver"),
        _ => echo::merge(receivers, p.v.params.n, prompt_tokens),
    };
    Ok((rx, prompt_tokens))
}

/// An engine's refusal in OpenAI's shape, naming the field at fault.
fn llm_error(e: LlmError, p: &Prepared) -> ApiError {
    match e {
        LlmError::QueueFull { .. } => ApiError::overloaded(format!("{e}; retry shortly")),
        LlmError::ContextLength {
            max,
            prompt,
            max_tokens,
        } => ApiError::context_length(max, prompt, max_tokens),
        LlmError::InvalidRequest(m) => ApiError::invalid("prompt", m),
        LlmError::Constraint(m) => {
            let field = p.v.constraint.as_ref().map_or("response_format", |c| c.0);
            ApiError::invalid(field, format!("`{field}`: {m}"))
        }
        other => ApiError::internal(other.to_string()),
    }
}

pub async fn chat_completions(
    State(state): State<AppState>,
    OpenAiBody(headers, body): OpenAiBody,
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
    refuse_unknown_fields(body, CHAT_FIELDS)?;
    let target = route(state, &mut req.common, headers, body)?;
    let messages = req.chat_messages()?;
    let logprobs = req.logprobs()?;
    let tools = Tools::from_request(
        req.tools.take(),
        req.tool_choice.take(),
        req.parallel_tool_calls,
    )?;
    if tools.is_some() && logprobs.is_some() {
        return Err(ApiError::invalid(
            "logprobs",
            "`logprobs` together with `tools` is not supported; send one or the other",
        ));
    }
    let system = target.experiment.as_ref().and_then(|a| a.prompt().system);
    let prompt = render_chat(&target.engine, messages.clone(), system, tools.as_ref())?;
    let shadow_prompts = target
        .shadows
        .iter()
        .map(|s| {
            s.system
                .clone()
                .map(|sys| render_chat(&s.engine, messages.clone(), Some(sys), tools.as_ref()))
                .transpose()
        })
        .collect::<Result<_, _>>()?;
    let model = req.common.model.clone();
    let mut v = req.common.validate(req.max_completion_tokens, logprobs)?;
    check_logit_bias(&v, &target.engine)?;
    if let Some(c) = tools.as_ref().and_then(Tools::constraint) {
        if let Some((field, _)) = &v.constraint {
            return Err(ApiError::invalid(
                "tool_choice",
                format!("`tool_choice` and `{field}` both constrain the output; give one"),
            ));
        }
        v.constraint = Some(("tool_choice", c));
    }
    Ok(Prepared {
        tools,
        best_of: None,
        echo: None,
        request_id: dispatch::request_id(headers, "chatcmpl"),
        target,
        model,
        v,
        prompts: vec![prompt],
        shadow_prompts,
    })
}

/// The chat prompt as `engine`'s template renders it (with `system` in place
/// of the first system message, and the tools offered), tokenized.
fn render_chat(
    engine: &LlmEngine,
    mut messages: Vec<ChatMessage>,
    system: Option<String>,
    tools: Option<&Tools>,
) -> Result<Vec<u32>, ApiError> {
    apply_system(&mut messages, system);
    let template = engine.template().ok_or_else(|| {
        ApiError::invalid(
            "model",
            "this model has no chat template; use /v1/completions",
        )
    })?;
    let definitions = tools.and_then(Tools::definitions);
    if !template.renders_tools() {
        if let Some(block) = tools.and_then(Tools::system_block) {
            add_to_system(&mut messages, block);
        }
    }
    let text = template
        .render_with_tools(&messages, true, definitions.as_ref())
        .map_err(|e| ApiError::invalid("messages", e.to_string()))?;
    engine
        .tokenizer()
        .encode(&text)
        .map_err(|e| ApiError::internal(e.to_string()))
}

pub async fn completions(
    State(state): State<AppState>,
    OpenAiBody(headers, body): OpenAiBody,
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
    refuse_unknown_fields(body, COMPLETION_FIELDS)?;
    let target = route(state, &mut req.common, headers, body)?;
    let mut logprobs = req.logprobs()?;
    let best_of = match req.best_of {
        None => None,
        Some(b) => {
            let n = req.common.fields.n.unwrap_or(1).max(1);
            if b < n {
                return Err(ApiError::invalid(
                    "best_of",
                    format!("`best_of` ({b}) must be at least `n` ({n})"),
                ));
            }
            if b > n && req.common.stream {
                return Err(ApiError::invalid(
                    "best_of",
                    "`best_of` greater than `n` cannot stream: the best are known at the end",
                ));
            }
            // The samples are ranked by their log-probabilities.
            (b > n).then(|| {
                req.common.fields.n = Some(b);
                let keep = BestOf {
                    keep: n as usize,
                    report: logprobs.is_some(),
                };
                logprobs = logprobs.or(Some(0));
                keep
            })
        }
    };
    let tokenizer = target.engine.tokenizer();
    let mut prompts = Vec::new();
    let mut texts = Vec::new();
    for p in req.prompts()? {
        let (ids, text) = match p {
            PromptIn::Text(t) => (
                tokenizer
                    .encode(&t)
                    .map_err(|e| ApiError::internal(e.to_string()))?,
                t,
            ),
            PromptIn::Ids(ids) => {
                let text = match req.echo {
                    true => tokenizer.decode(&ids).unwrap_or_default(),
                    false => String::new(),
                };
                (ids, text)
            }
        };
        if ids.is_empty() {
            return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
        }
        prompts.push(ids);
        texts.push(text);
    }
    let model = req.common.model.clone();
    // OpenAI's default for completions is 16 tokens; `echo` may ask for
    // none, and then only scores the prompt.
    let asked = req.common.fields.max_tokens;
    let echo = match (req.echo, asked) {
        (false, _) => None,
        (true, Some(0)) if req.common.stream => {
            return Err(ApiError::invalid(
                "echo",
                "`echo` with `max_tokens: 0` answers at once; send it without `stream`",
            ))
        }
        (true, asked) => Some(Echo {
            texts,
            generate: asked != Some(0),
        }),
    };
    // A score-only echo generates nothing: OpenAI's default stands in.
    let generates = echo.as_ref().is_none_or(|e| e.generate);
    let v = req
        .common
        .validate(asked.filter(|_| generates).or(Some(16)), logprobs)?;
    check_logit_bias(&v, &target.engine)?;
    Ok(Prepared {
        tools: None,
        best_of,
        echo,
        request_id: dispatch::request_id(headers, "cmpl"),
        // A shadow arm's system prompt is for chat; completions copy the prompt.
        shadow_prompts: vec![],
        target,
        model,
        v,
        prompts,
    })
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
    let shape = Shape {
        kind,
        id,
        model: p.model.clone(),
        created: now(),
        logprobs: p.v.params.sampling.logprobs.is_some(),
        n: p.v.params.n * p.prompts.len(),
        tools: p.tools.clone(),
    };
    if let Some(echo) = p.echo.as_ref().filter(|_| !p.v.stream) {
        let mut resp = tokio::select! {
            r = answer_echo(&p, echo, shape, state) => r.unwrap_or_else(|e| e.into_response()),
            _ = state.shutdown.ended() => shutting_down().into_response(),
        };
        dispatch::headers(resp.headers_mut(), &p.target.served(), &p.request_id);
        return resp;
    }
    let (rx, prompt_tokens) = match submit(&p, state) {
        Ok(x) => x,
        Err(e) => return e.into_response(),
    };
    let mut resp = if p.v.stream {
        // A streamed echo opens each choice with its prompt.
        let echoed = match &p.echo {
            None => vec![],
            Some(e) => match p.echoes(e).await {
                Ok(echoes) => {
                    let logprobs = p.reported_logprobs().is_some();
                    echo::echo_choices(&echoes, p.v.params.n, logprobs, None)
                }
                Err(e) => return e.into_response(),
            },
        };
        stream_response(shape, rx, p.v.include_usage, state.shutdown.clone(), echoed)
            .into_response()
    } else {
        tokio::select! {
            r = collect_body(shape, rx, prompt_tokens) => match r {
                Ok(mut body) => {
                    p.keep_best(&mut body);
                    Json(body).into_response()
                }
                Err(e) => e.into_response(),
            },
            _ = state.shutdown.ended() => shutting_down().into_response(),
        }
    };
    dispatch::headers(resp.headers_mut(), &p.target.served(), &p.request_id);
    resp
}

/// A completions answer with `echo`: the prompts scored when `logprobs` is
/// set, then generated after (unless `max_tokens` is 0), each choice
/// opening with its prompt.
async fn answer_echo(
    p: &Prepared,
    echo: &Echo,
    shape: Shape,
    state: &AppState,
) -> Result<Response, ApiError> {
    let echoes = p.echoes(echo).await?;
    let n = p.returned_n();
    let prompt_tokens = p.prompt_tokens();
    let body = if echo.generate {
        let (rx, _) = submit(p, state)?;
        let mut body = collect_body(shape, rx, prompt_tokens).await?;
        p.keep_best(&mut body);
        echo::apply(&mut body, &echoes, n);
        body
    } else {
        let logprobs = p.reported_logprobs().is_some();
        let choices = echo::echo_choices(&echoes, n, logprobs, Some("length"));
        let mut body = shape.body(choices, false);
        body["usage"] = render::usage(prompt_tokens, 0, 0);
        body
    };
    Ok(Json(body).into_response())
}
