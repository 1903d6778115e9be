//! Completions' batches and `echo`: several prompts answered in one body
//! (choice `p * n + j` is sample `j` of prompt `p`, as OpenAI orders them),
//! and the prompt repeated before each answer, with its tokens'
//! log-probabilities when `logprobs` is set (the first token has none), as
//! log-likelihood harnesses read them.
use crate::api::error::ApiError;
use crate::dispatch::llm::Events;
use engine::llm::{GenerationEvent, LlmEngine};
use serde_json::{json, Map, Value};
use tokio::sync::mpsc::unbounded_channel;

/// One prompt token as completions' logprobs report it: its text, its
/// log-probability and the most likely tokens there (none for the first).
pub struct PromptToken {
    text: String,
    logprob: Option<f32>,
    top: Option<Map<String, Value>>,
}

/// One prompt's echo: its text, and its tokens with their scores (none
/// without `logprobs`).
pub struct Echoed {
    pub text: String,
    pub tokens: Vec<PromptToken>,
}

/// What `echo` asks for.
pub struct Echo {
    /// Each prompt's text as the answer repeats it.
    pub texts: Vec<String>,
    /// Generate after the prompt (`max_tokens` > 0).
    pub generate: bool,
}

/// The prompts' echoes; with `top` (the request's `logprobs`), scored by
/// one teacher-forced pass each on `engine`.
pub async fn score_prompts(
    engine: &LlmEngine,
    prompts: &[Vec<u32>],
    texts: &[String],
    top: Option<usize>,
) -> Result<Vec<Echoed>, ApiError> {
    let tok = engine.tokenizer();
    let mut out = Vec::with_capacity(prompts.len());
    for (prompt, text) in prompts.iter().zip(texts) {
        let mut tokens = Vec::new();
        if let Some(k) = top {
            let scored = match prompt.len() {
                0 | 1 => vec![],
                _ => engine
                    .score(prompt.clone(), 1, k)
                    .map_err(|e| ApiError::invalid("prompt", e.to_string()))?
                    .await
                    .map_err(|_| ApiError::internal("the engine stopped"))?
                    .map_err(ApiError::internal)?,
            };
            tokens.push(PromptToken {
                text: tok.token_text(prompt[0]),
                logprob: None,
                top: None,
            });
            for (&id, s) in prompt[1..].iter().zip(scored) {
                let alternatives: Map<String, Value> = s
                    .top
                    .iter()
                    .map(|&(t, lp)| (tok.token_text(t), json!(lp)))
                    .collect();
                tokens.push(PromptToken {
                    text: tok.token_text(id),
                    logprob: Some(s.logprob),
                    top: Some(alternatives),
                });
            }
        }
        out.push(Echoed {
            text: text.clone(),
            tokens,
        });
    }
    Ok(out)
}

/// Puts each prompt's echo before its choices' text and logprobs.
pub fn apply(body: &mut Value, echoes: &[Echoed], n: usize) {
    let Some(choices) = body["choices"].as_array_mut() else {
        return;
    };
    for c in choices {
        let Some(e) = c["index"].as_u64().and_then(|i| echoes.get(i as usize / n)) else {
            continue;
        };
        let text = c["text"].as_str().unwrap_or_default();
        c["text"] = Value::from(format!("{}{text}", e.text));
        if c["logprobs"].is_object() {
            c["logprobs"] = prepend(&e.tokens, e.text.len(), &c["logprobs"]);
        }
    }
}

/// The prompt's tokens before the generated ones in a completions
/// logprobs object; generated offsets move past the echoed text.
fn prepend(tokens: &[PromptToken], shift: usize, generated: &Value) -> Value {
    let list = |k: &str| generated[k].as_array().cloned().unwrap_or_default();
    let mut offset = 0;
    let mut text_offset = Vec::new();
    for t in tokens {
        text_offset.push(json!(offset));
        offset += t.text.len();
    }
    text_offset.extend(
        list("text_offset")
            .iter()
            .map(|o| json!(o.as_u64().unwrap_or(0) as usize + shift)),
    );
    let cat = |mut head: Vec<Value>, k: &str| {
        head.extend(list(k));
        head
    };
    json!({
        "tokens": cat(tokens.iter().map(|t| json!(t.text)).collect(), "tokens"),
        "token_logprobs": cat(tokens.iter().map(|t| json!(t.logprob)).collect(), "token_logprobs"),
        "top_logprobs": cat(tokens.iter().map(|t| json!(t.top)).collect(), "top_logprobs"),
        "text_offset": text_offset,
    })
}

/// Each prompt's echo, `n` times, as completions choices: the whole answer
/// without generation (`max_tokens: 0`, ended by `length`), or a stream's
/// first chunk of each choice (`finish` none).
pub fn echo_choices(
    echoes: &[Echoed],
    n: usize,
    logprobs: bool,
    finish: Option<&str>,
) -> Vec<Value> {
    let mut choices = Vec::new();
    for (p, e) in echoes.iter().enumerate() {
        for j in 0..n {
            let lps = match logprobs {
                true => prepend(&e.tokens, 0, &json!({})),
                false => Value::Null,
            };
            choices.push(json!({"index": p * n + j, "text": e.text, "logprobs": lps, "finish_reason": finish}));
        }
    }
    choices
}

/// `best_of`: of each prompt's `best_of` samples (choices `p * best_of`
/// onwards), keeps the `keep` with the highest cumulative log-probability,
/// renumbered `p * keep + j`; their logprobs stay only when asked for.
pub fn keep_best(body: &mut Value, best_of: usize, keep: usize, report: bool) {
    let Some(choices) = body["choices"].as_array_mut() else {
        return;
    };
    let total = |c: &Value| -> f64 {
        c["logprobs"]["token_logprobs"]
            .as_array()
            .map_or(0.0, |l| l.iter().filter_map(Value::as_f64).sum())
    };
    let mut all: Vec<Value> = std::mem::take(choices);
    all.sort_by_key(|c| c["index"].as_u64().unwrap_or(0));
    for (p, group) in all.chunks_mut(best_of).enumerate() {
        group.sort_by(|a, b| total(b).total_cmp(&total(a)));
        for (j, c) in group.iter_mut().take(keep).enumerate() {
            c["index"] = json!(p * keep + j);
            if !report {
                c["logprobs"] = Value::Null;
            }
            choices.push(c.take());
        }
    }
}

/// One receiver for several prompts' requests: sample `j` of prompt `p`
/// becomes choice `p * n + j`, and every `Finished` counts the prompt
/// tokens of the whole batch. Dropping it cancels them all.
pub fn merge(receivers: Vec<Events>, n: usize, prompt_tokens: usize) -> Events {
    let (tx, out) = unbounded_channel();
    for (p, mut rx) in receivers.into_iter().enumerate() {
        let tx = tx.clone();
        tokio::spawn(async move {
            loop {
                let ev = tokio::select! {
                    ev = rx.recv() => ev,
                    _ = tx.closed() => return,
                };
                let Some(mut ev) = ev else { return };
                match &mut ev {
                    GenerationEvent::Delta { index, .. } => *index += p * n,
                    GenerationEvent::Finished {
                        index,
                        prompt_tokens: total,
                        ..
                    } => {
                        *index += p * n;
                        *total = prompt_tokens;
                    }
                    GenerationEvent::Failed(_) => {}
                }
                if tx.send(ev).is_err() {
                    return;
                }
            }
        });
    }
    Events::merged(out)
}
