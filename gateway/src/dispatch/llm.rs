//! Running one generation on the deployment a request resolved to: the
//! engine gets the request, each shadow that samples it gets a copy, and
//! the outcome reaches the version's and the experiment arm's statistics.
//! The fronts receive the engine's events and render them in their protocol.
use super::log::RequestLog;
use super::mirror::{Copy, Primary, ShadowPolicy};
use super::routing::{Arm, Shadow};
use super::Recorders;
use crate::dispatch::experiments::Assignment;
use crate::divergence;
use crate::experiment_stats::Outcome;
use engine::llm::{GenerationEvent, GenerationRequest, LlmEngine, LlmError};
use serde_json::json;
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::sync::watch;

/// Where one LLM request goes.
pub struct LlmTarget {
    /// The public name the client sent (without `@version`).
    pub route: String,
    /// The model whose version serves it (an experiment arm's deployment
    /// may belong to another model).
    pub model: String,
    pub engine: LlmEngine,
    pub version: Option<u32>,
    pub arm: Arm,
    /// Set when a prompt experiment assigned the request.
    pub experiment: Option<Assignment>,
    pub shadows: Vec<TextShadow>,
    pub started: Instant,
    /// The caller's key's token budget (`tokens_per_minute`), set by the
    /// front: charged the prompt at submission and each generated token as
    /// it passes (shadows' tokens are not the caller's).
    pub budget: Option<Arc<crate::auth::Bucket>>,
}

/// A deployment that gets copies of the request.
pub struct TextShadow {
    pub engine: LlmEngine,
    /// How its statistics name it: the version, or `experiment/arm`.
    pub label: String,
    pub policy: ShadowPolicy,
    /// An experiment shadow arm's system prompt (chat requests).
    pub system: Option<String>,
}

impl TextShadow {
    pub fn of_route(s: &Shadow) -> Self {
        Self {
            engine: s.deployment.engine.clone(),
            label: s.deployment.label(),
            policy: s.policy,
            system: None,
        }
    }
}

/// A request ready for the engine.
pub struct Generation {
    pub request: GenerationRequest,
    /// The request id: shadows sample by its hash; feedback names it.
    pub request_id: String,
    /// A shadow's own prompt tokens (an experiment shadow arm with its own
    /// system prompt), by index into [`LlmTarget::shadows`].
    pub shadow_prompts: Vec<Option<Vec<u32>>>,
}

impl LlmTarget {
    /// Charges the request's tokens to `budget`.
    pub fn charging(self, budget: Option<Arc<crate::auth::Bucket>>) -> Self {
        Self { budget, ..self }
    }

    /// What served the request, as responses name it.
    pub fn served(&self) -> super::Served {
        super::Served {
            version: self.version,
            arm: self.arm.clone(),
            experiment: self
                .experiment
                .as_ref()
                .map(|a| a.experiment.spec.name.clone()),
        }
    }

    /// Submits the request and returns the engine's events, after the
    /// shadows got their copies; the outcome is recorded as [`Events`] are
    /// read (a client that leaves records nothing). With shadows, the
    /// engine also computes each token's log-probability (for the
    /// teacher-forced comparison); a front shows them only if asked.
    pub fn start(&self, rec: &Recorders, g: Generation) -> Result<Events, LlmError> {
        let sink = self.outcome_sink(rec);
        let mut primary = g.request.clone();
        if !self.shadows.is_empty() {
            primary.sampling.logprobs = primary.sampling.logprobs.or(Some(0));
        }
        let rx = match self.engine.submit(primary) {
            Ok(rx) => rx,
            Err(e) => {
                sink(Outcome {
                    ok: false,
                    latency_s: self.started.elapsed().as_secs_f64(),
                    ..Outcome::default()
                });
                return Err(e);
            }
        };
        let logged = rec.logged(&self.route, &g.request_id);
        let rx = if self.shadows.is_empty() && logged.is_none() {
            rx
        } else {
            let (rx, primary) = capture(rx, self.started);
            self.mirror(rec, &g, &primary, logged.as_ref());
            if let Some(log) = logged {
                self.log_primary(log, &g, primary);
            }
            rx
        };
        if let Some(a) = &self.experiment {
            rec.experiments
                .remember(&g.request_id, &a.experiment.spec.name, a.arm_name());
        }
        if let Some(b) = &self.budget {
            b.charge(g.request.prompt.len() as f64);
        }
        Ok(Events {
            rx,
            watch: Some(Watch {
                outcome: Outcome {
                    ok: true,
                    ..Outcome::default()
                },
                started: self.started,
                choices: g.request.n.max(1),
                finished: 0,
                budget: self.budget.clone(),
                done: Box::new(sink),
            }),
        })
    }

    /// Where the outcome is recorded: its experiment arm, and the version
    /// that served it (for rollout policies).
    fn outcome_sink(&self, rec: &Recorders) -> impl FnOnce(Outcome) + Send + 'static {
        let (stats, versions, llm) = (
            rec.experiments.clone(),
            rec.versions.clone(),
            rec.llm.clone(),
        );
        let route = self.route.clone();
        let served = self.version.unwrap_or(1) as i64;
        let arm = self.experiment.as_ref().map(|a| {
            (
                a.experiment.spec.name.clone(),
                a.arm_name().to_string(),
                a.random,
            )
        });
        let version = self.version.map(|v| (self.model.clone(), v));
        move |mut o: Outcome| {
            if let Some((exp, arm, random)) = arm {
                o.random = random;
                stats.record(&exp, &arm, &o);
            }
            if let Some((model, v)) = version {
                versions.record(&model, v, o.ok, o.latency_s);
            }
            llm.record(&route, served, &o);
        }
    }

    /// Writes the primary's answer to the request log once it is complete
    /// (a request whose client left is not logged).
    fn log_primary(&self, log: RequestLog, g: &Generation, mut primary: Primary<PrimaryAnswer>) {
        let served = self.served();
        let (route, model) = (self.route.clone(), self.model.clone());
        let (engine, prompt) = (self.engine.clone(), g.request.prompt.clone());
        let request_id = g.request_id.clone();
        tokio::spawn(async move {
            let Ok(Some(a)) = primary
                .wait_for(Option::is_some)
                .await
                .map(|v| v.clone().flatten())
            else {
                return;
            };
            let text = engine.tokenizer().decode(&prompt).unwrap_or_default();
            log.write(
                &route,
                json!({"request_id": request_id, "role": "primary", "route": route, "model": model,
                       "version": served.version, "arm": served.arm.as_str(),
                       "experiment": served.experiment, "ok": a.ok,
                       "latency_ms": a.seconds * 1e3, "prompt_tokens": prompt.len(),
                       "completion_tokens": a.tokens, "prompt": text, "response": a.text}),
            );
        });
    }

    /// Sends a copy of the request to each shadow that samples it, and
    /// compares the shadow's first choice with the primary's: text, and one
    /// teacher-forced pass of the primary's tokens under the shadow. A
    /// logged request's shadow answers are logged too.
    fn mirror(
        &self,
        rec: &Recorders,
        g: &Generation,
        primary: &Primary<PrimaryAnswer>,
        log: Option<&RequestLog>,
    ) {
        for (i, s) in self.shadows.iter().enumerate() {
            let prompt = g
                .shadow_prompts
                .get(i)
                .cloned()
                .flatten()
                .unwrap_or_else(|| g.request.prompt.clone());
            let copy = GenerationRequest {
                prompt: prompt.clone(),
                n: 1,
                sampling: engine::llm::SamplingParams {
                    logprobs: None,
                    ..g.request.sampling.clone()
                },
                ..g.request.clone()
            };
            let engine = s.engine.clone();
            let run = async move {
                let mut srx = engine.submit(copy).map_err(|e| e.to_string())?;
                let mut text = String::new();
                while let Some(ev) = srx.recv().await {
                    match ev {
                        GenerationEvent::Delta {
                            index: 0, text: t, ..
                        } => text.push_str(&t),
                        GenerationEvent::Failed(e) => return Err(e),
                        _ => {}
                    }
                }
                Ok(text)
            };
            let (route, label, engine) = (self.route.clone(), s.label.clone(), s.engine.clone());
            let (log, request_id) = (log.cloned(), g.request_id.clone());
            let compare = move |stats: divergence::ShadowStats,
                                answer: PrimaryAnswer,
                                text: String,
                                shadow_s: f64| async move {
                let c = divergence::compare(&answer.text, &text);
                if let Some(log) = log {
                    log.write(
                        &route,
                        json!({"request_id": request_id, "role": "shadow", "route": route,
                               "shadow": label, "latency_ms": shadow_s * 1e3, "response": text,
                               "comparison": {"exact": c.exact, "similarity": c.similarity,
                                              "length_ratio": c.length_ratio}}),
                    );
                }
                stats.record(&route, &label, c, answer.seconds, shadow_s);
                forced(&stats, &route, &label, &engine, prompt, answer).await;
            };
            Copy {
                stats: &rec.shadows,
                route: &self.route,
                label: &s.label,
                policy: s.policy,
            }
            .launch(&g.request_id, primary.clone(), run, compare);
        }
    }
}

/// The primary's tokens scored under the shadow (teacher forcing): the KL
/// between the two models along the primary's own answer.
async fn forced(
    stats: &divergence::ShadowStats,
    route: &str,
    label: &str,
    engine: &LlmEngine,
    prompt: Vec<u32>,
    answer: PrimaryAnswer,
) {
    let from = prompt.len();
    let tokens: Vec<u32> = prompt.into_iter().chain(answer.ids).collect();
    if tokens.len() == from {
        return;
    }
    match engine.score(tokens, from, 0) {
        Ok(rx) => match rx.await {
            Ok(Ok(scored)) => {
                let shadow_lps: Vec<f32> = scored.iter().map(|s| s.logprob).collect();
                stats.record_forced(route, label, &answer.logprobs, &shadow_lps)
            }
            _ => stats.error(route, label),
        },
        Err(e) => {
            tracing::debug!(%route, %label, error = %e, "shadow cannot score the primary's tokens")
        }
    }
}

/// One request's engine events as a front reads them. The request's
/// outcome is folded in as they pass, in the reader's own task (no task
/// between the engine and the socket), and handed on once every choice has
/// finished, one failed or the engine ended the stream. A reader that stops
/// before (its client left) records nothing.
pub struct Events {
    rx: UnboundedReceiver<GenerationEvent>,
    watch: Option<Watch>,
}

/// The outcome of the request being read, and where it goes.
struct Watch {
    outcome: Outcome,
    started: Instant,
    choices: usize,
    finished: usize,
    /// Charged each generated token as it passes.
    budget: Option<Arc<crate::auth::Bucket>>,
    done: Box<dyn FnOnce(Outcome) + Send>,
}

impl Watch {
    /// Folds `ev` in; true once the outcome is known.
    fn fold(&mut self, ev: &GenerationEvent) -> bool {
        let o = &mut self.outcome;
        match ev {
            GenerationEvent::Delta { .. } => {
                o.ttft_s
                    .get_or_insert_with(|| self.started.elapsed().as_secs_f64());
                if let Some(b) = &self.budget {
                    b.charge(1.0);
                }
                false
            }
            GenerationEvent::Finished {
                completion_tokens, ..
            } => {
                o.output_tokens += completion_tokens;
                self.finished += 1;
                self.finished >= self.choices
            }
            GenerationEvent::Failed(_) => {
                o.ok = false;
                true
            }
        }
    }

    fn record(mut self) {
        self.outcome.latency_s = self.started.elapsed().as_secs_f64();
        (self.done)(self.outcome);
    }
}

impl Events {
    /// Events that record nothing (several requests' events merged into
    /// one, each recorded as its own is read).
    pub fn merged(rx: UnboundedReceiver<GenerationEvent>) -> Self {
        Self { rx, watch: None }
    }

    /// The next event; `None` once the engine has sent the last one.
    pub async fn recv(&mut self) -> Option<GenerationEvent> {
        let ev = self.rx.recv().await;
        let known = match (&mut self.watch, &ev) {
            (Some(w), Some(ev)) => w.fold(ev),
            (Some(_), None) => true,
            (None, _) => false,
        };
        if let Some(w) = self.watch.take_if(|_| known) {
            w.record();
        }
        ev
    }
}

/// The primary's first choice as shadows compare against it.
#[derive(Clone)]
struct PrimaryAnswer {
    ok: bool,
    /// Completion tokens, all choices.
    tokens: usize,
    text: String,
    /// Its tokens and their log-probabilities under the primary model.
    ids: Vec<u32>,
    logprobs: Vec<f32>,
    seconds: f64,
}

/// Passes the primary's events through (on a task of its own, since the
/// answer is needed whether or not the client reads to the end) and
/// publishes its first choice (text, tokens, log-probabilities) and latency
/// when the engine has sent the last event, or that there is none when its
/// client left.
fn capture(
    mut rx: UnboundedReceiver<GenerationEvent>,
    started: Instant,
) -> (
    UnboundedReceiver<GenerationEvent>,
    watch::Receiver<Option<Option<PrimaryAnswer>>>,
) {
    let (done, primary) = watch::channel(None);
    let fold = |a: &mut PrimaryAnswer, ev: &GenerationEvent| match ev {
        GenerationEvent::Delta {
            index: 0,
            text,
            logprob,
        } => {
            a.text.push_str(text);
            if let Some(l) = logprob {
                a.ids.push(l.id);
                a.logprobs.push(l.logprob);
            }
        }
        GenerationEvent::Delta { .. } => {}
        GenerationEvent::Finished {
            completion_tokens, ..
        } => a.tokens += completion_tokens,
        GenerationEvent::Failed(_) => a.ok = false,
    };
    let (tx, out) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut a = PrimaryAnswer {
            ok: true,
            tokens: 0,
            text: String::new(),
            ids: vec![],
            logprobs: vec![],
            seconds: 0.0,
        };
        while let Some(ev) = rx.recv().await {
            fold(&mut a, &ev);
            if tx.send(ev).is_err() {
                let _ = done.send(Some(None));
                return;
            }
        }
        a.seconds = started.elapsed().as_secs_f64();
        let _ = done.send(Some(Some(a)));
    });
    (out, primary)
}
