//! The engine loop: one thread per model takes requests from a bounded queue and
//! runs schedule → forward → sample each iteration, streaming events back.
use super::chat_template::ChatTemplate;
use super::detokenize::{IncrementalDecoder, StopMatcher};
use super::error::{LlmError, Result};
use super::kv_cache::{ContiguousKvCache, SeqId};
use super::loader::LoadedModel;
use super::model::LlamaModel;
use super::sampling::{Sampler, SamplingParams};
use super::scheduler::{Schedulable, Scheduler, SchedulerConfig};
use super::tokenizer::Tokenizer;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub max_num_seqs: usize,
    pub max_num_batched_tokens: usize,
    /// Requests that may wait for admission; more are refused with [`LlmError::QueueFull`].
    pub max_waiting: usize,
    /// Longest prompt + output served; capped by the model's own context.
    pub max_model_len: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        Self {
            max_num_seqs: 16,
            max_num_batched_tokens: 512,
            max_waiting: 64,
            max_model_len: 8192,
        }
    }
}

#[derive(Debug, Clone)]
pub struct GenerationRequest {
    pub prompt: Vec<u32>,
    pub sampling: SamplingParams,
    pub max_tokens: usize,
    /// EOS and stop strings are ignored until this many tokens exist.
    pub min_tokens: usize,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    Stop,
    Length,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub token: String,
    pub logprob: f32,
    pub top: Vec<(String, f32)>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum GenerationEvent {
    /// Text released by one generated token (may be empty while held back).
    Delta {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Finished {
        reason: FinishReason,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

struct Submission {
    id: SeqId,
    req: GenerationRequest,
    events: UnboundedSender<GenerationEvent>,
    arrived: Instant,
}

/// A handle to a running engine; cheap to clone.
#[derive(Clone)]
pub struct LlmEngine {
    inner: Arc<Inner>,
}

struct Inner {
    name: String,
    tx: mpsc::Sender<Submission>,
    waiting: Arc<AtomicUsize>,
    next_id: AtomicU64,
    config: EngineConfig,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
}

impl LlmEngine {
    /// Starts the engine thread for `model`, served under `name`.
    pub fn start(name: &str, loaded: LoadedModel, mut config: EngineConfig) -> Self {
        config.max_model_len = config
            .max_model_len
            .min(loaded.model.config.max_position_embeddings);
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let tokenizer = Arc::new(loaded.tokenizer);
        let worker = Worker {
            name: name.to_string(),
            cache: ContiguousKvCache::new(loaded.model.config.num_hidden_layers),
            model: loaded.model,
            tokenizer: tokenizer.clone(),
            scheduler: Scheduler::new(SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
            }),
            waiting: waiting.clone(),
        };
        std::thread::Builder::new()
            .name(format!("engine-{name}"))
            .spawn(move || worker.run(rx))
            .expect("spawning the engine thread");
        Self {
            inner: Arc::new(Inner {
                name: name.to_string(),
                tx,
                waiting,
                next_id: AtomicU64::new(1),
                config,
                tokenizer,
                template: loaded.template,
            }),
        }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.inner.tokenizer
    }

    pub fn template(&self) -> Option<&ChatTemplate> {
        self.inner.template.as_ref()
    }

    pub fn max_model_len(&self) -> usize {
        self.inner.config.max_model_len
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping
    /// the receiver cancels the request and frees its cache.
    pub fn submit(&self, req: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>> {
        let inner = &self.inner;
        if req.prompt.is_empty() {
            return Err(LlmError::InvalidRequest("the prompt is empty".into()));
        }
        let max = inner.config.max_model_len;
        if req.prompt.len() + req.max_tokens > max {
            return Err(LlmError::ContextLength {
                max,
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
            });
        }
        let capacity = inner.config.max_waiting;
        if inner.waiting.fetch_add(1, Ordering::SeqCst) >= capacity {
            inner.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(LlmError::QueueFull { capacity });
        }
        let (events, rx) = unbounded_channel();
        let id = SeqId(inner.next_id.fetch_add(1, Ordering::Relaxed));
        inner
            .tx
            .send(Submission {
                id,
                req,
                events,
                arrived: Instant::now(),
            })
            .map_err(|_| LlmError::EngineStopped)?;
        Ok(rx)
    }
}

/// A request being served.
struct Sequence {
    id: SeqId,
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    req: GenerationRequest,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    events: UnboundedSender<GenerationEvent>,
    arrived: Instant,
    last_token_at: Option<Instant>,
    finished: bool,
}

impl Schedulable for Sequence {
    fn id(&self) -> SeqId {
        self.id
    }
    fn tokens(&self) -> &[u32] {
        &self.tokens
    }
    fn computed(&self) -> usize {
        self.computed
    }
    fn max_len(&self) -> usize {
        self.prompt_len + self.req.max_tokens
    }
}

impl Sequence {
    fn new(s: Submission) -> Self {
        Self {
            id: s.id,
            prompt_len: s.req.prompt.len(),
            tokens: s.req.prompt.clone(),
            computed: 0,
            sampler: Sampler::new(s.req.sampling.clone()),
            stops: StopMatcher::new(s.req.stop.clone()),
            decoder: IncrementalDecoder::default(),
            req: s.req,
            events: s.events,
            arrived: s.arrived,
            last_token_at: None,
            finished: false,
        }
    }

    fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    fn finish(&mut self, reason: FinishReason) {
        self.finished = true;
        let _ = self.events.send(GenerationEvent::Finished {
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.output().len(),
        });
    }
}

struct Worker {
    name: String,
    model: LlamaModel,
    tokenizer: Arc<Tokenizer>,
    cache: ContiguousKvCache,
    scheduler: Scheduler<Sequence>,
    waiting: Arc<AtomicUsize>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Submission>) {
        tracing::info!(model = %self.name, "engine loop started");
        loop {
            if self.scheduler.is_idle() {
                match rx.recv() {
                    Ok(s) => self.scheduler.waiting.push_back(Sequence::new(s)),
                    Err(_) => return,
                }
            }
            while let Ok(s) = rx.try_recv() {
                self.scheduler.waiting.push_back(Sequence::new(s));
            }
            self.step();
        }
    }

    /// One iteration: drop cancelled sequences, schedule, forward, sample.
    fn step(&mut self) {
        let cancelled = |s: &Sequence| s.events.is_closed();
        let before = self.scheduler.waiting.len();
        self.scheduler.waiting.retain(|s| !cancelled(s));
        self.waiting
            .fetch_sub(before - self.scheduler.waiting.len(), Ordering::SeqCst);
        for s in self.scheduler.retire(&mut self.cache, cancelled) {
            tracing::debug!(seq = s.id.0, "client went away; sequence cancelled");
        }
        let (batch, plan, admitted) = self.scheduler.schedule(&mut self.cache);
        self.waiting.fetch_sub(admitted, Ordering::SeqCst);
        let labels = [("model_name", self.name.clone())];
        self.report_queue(&labels);
        if batch.is_empty() {
            return;
        }
        let rows = self
            .model
            .forward(&batch, &mut self.cache)
            .and_then(|l| l.to_vec2::<f32>());
        let rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(model = %self.name, error = %e, "forward pass failed");
                for p in &plan {
                    let s = &mut self.scheduler.running[p.index];
                    let _ = s
                        .events
                        .send(GenerationEvent::Failed(format!("forward pass failed: {e}")));
                    s.finished = true;
                }
                self.scheduler.retire(&mut self.cache, |s| s.finished);
                return;
            }
        };
        for (p, mut logits) in plan.iter().zip(rows) {
            let s = &mut self.scheduler.running[p.index];
            s.computed += p.len;
            if s.computed == s.prompt_len {
                metrics::counter!("switchyard:prompt_tokens", &labels)
                    .increment(s.prompt_len as u64);
            }
            if p.samples {
                self.sample_next(p.index, &mut logits);
            }
        }
        for s in self.scheduler.retire(&mut self.cache, |s| s.finished) {
            metrics::histogram!("switchyard:e2e_request_latency_seconds", &labels)
                .record(s.arrived.elapsed().as_secs_f64());
        }
        self.report_queue(&labels);
    }

    fn report_queue(&self, labels: &[(&'static str, String); 1]) {
        metrics::gauge!("switchyard:num_requests_running", labels)
            .set(self.scheduler.running.len() as f64);
        metrics::gauge!("switchyard:num_requests_waiting", labels)
            .set(self.scheduler.waiting.len() as f64);
    }

    fn sample_next(&mut self, index: usize, logits: &mut [f32]) {
        let tok = &self.tokenizer;
        let labels = [("model_name", self.name.clone())];
        let s = &mut self.scheduler.running[index];
        let banned: &[u32] = if s.output().len() < s.req.min_tokens && !s.req.ignore_eos {
            tok.eos_ids()
        } else {
            &[]
        };
        let picked = s.sampler.sample(
            logits,
            &s.tokens[..s.prompt_len],
            &s.tokens[s.prompt_len..],
            banned,
        );
        s.tokens.push(picked.token);
        let now = Instant::now();
        match s.last_token_at {
            None => metrics::histogram!("switchyard:time_to_first_token_seconds", &labels)
                .record((now - s.arrived).as_secs_f64()),
            Some(t) => metrics::histogram!("switchyard:inter_token_latency_seconds", &labels)
                .record((now - t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        metrics::counter!("switchyard:generation_tokens", &labels).increment(1);
        let n = s.output().len();
        let is_eos = tok.is_eos(picked.token) && !s.req.ignore_eos;
        let delta = if is_eos {
            String::new()
        } else {
            s.decoder.next(tok, &s.tokens[s.prompt_len..])
        };
        let released = s.stops.push(&delta, n >= s.req.min_tokens);
        let logprob = s.req.sampling.logprobs.map(|_| TokenLogprob {
            token: tok.token_text(picked.token),
            logprob: picked.logprob,
            top: picked
                .top
                .iter()
                .map(|&(t, lp)| (tok.token_text(t), lp))
                .collect(),
        });
        let mut text = released.text;
        let reason = if released.stopped || is_eos {
            Some(FinishReason::Stop)
        } else if n >= s.req.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if reason.is_some() && !released.stopped {
            text.push_str(&s.stops.flush());
        }
        let _ = s.events.send(GenerationEvent::Delta { text, logprob });
        if let Some(r) = reason {
            s.finish(r);
        }
    }
}
