//! The engine loop: one thread per model takes requests from a bounded queue and
//! runs schedule → forward → sample each iteration, streaming events back.
use super::chat_template::ChatTemplate;
use super::detokenize::{IncrementalDecoder, StopMatcher};
use super::error::{LlmError, Result};
use super::guided::{Constraint, Guidance, Guide};
use super::kv_cache::{KvCache, SeqId};
use super::loader::LoadedWeights;
use super::model::{ForwardBatch, LlamaModel, Scored};
use super::sampling::Sampler;
use super::scheduler::{Schedulable, Schedule, Scheduler, SchedulerConfig};
use super::speculative;
use super::tokenizer::Tokenizer;
use super::types::*;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, OnceLock};
use std::time::Instant;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

/// The engine thread's live counters, read by handles.
#[derive(Default)]
struct SharedStats {
    free_blocks: AtomicUsize,
    preemptions: AtomicU64,
    prefix_queried: AtomicU64,
    prefix_hit: AtomicU64,
    speculation: std::sync::Mutex<Speculated>,
}

/// What speculation proposed, and accepted by position in the proposal
/// (their sum is every accepted token).
#[derive(Default)]
struct Speculated {
    drafts: u64,
    draft_tokens: u64,
    accepted_at: Vec<u64>,
}

/// What the engine thread is asked to do.
enum Job {
    Generate(Box<Submission>),
    Score(ScoreJob),
    Embed(EmbedJob),
}

/// An embedding pass ([`LlmEngine::embed`]).
struct EmbedJob {
    tokens: Vec<u32>,
    reply: tokio::sync::oneshot::Sender<std::result::Result<Vec<f32>, String>>,
}

/// The scored tokens of a scoring pass, or why it failed.
pub type Scores = std::result::Result<Vec<Scored>, String>;

/// A teacher-forced pass ([`LlmEngine::score`]).
struct ScoreJob {
    tokens: Vec<u32>,
    from: usize,
    top: usize,
    reply: tokio::sync::oneshot::Sender<Scores>,
}

struct Submission {
    id: SeqId,
    req: GenerationRequest,
    guide: Option<Box<Guide>>,
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
    tx: mpsc::Sender<Job>,
    waiting: Arc<AtomicUsize>,
    next_id: AtomicU64,
    config: EngineConfig,
    tokenizer: Arc<Tokenizer>,
    template: Option<ChatTemplate>,
    stats: Arc<SharedStats>,
    total_blocks: usize,
    vocab_size: usize,
    /// Structured outputs' compiler, built on the first constrained request.
    guidance: OnceLock<std::result::Result<Guidance, String>>,
}

impl Inner {
    /// Compiles a request's constraint for this model.
    fn guide(&self, c: &Constraint) -> Result<Guide> {
        let guidance = self.guidance.get_or_init(|| {
            let started = Instant::now();
            let g = Guidance::new(self.tokenizer.clone(), self.vocab_size).map_err(|e| e.to_string());
            tracing::info!(model = %self.name, ms = started.elapsed().as_millis() as u64, ok = g.is_ok(), "structured outputs ready");
            g
        });
        match guidance {
            Ok(g) => g.compile(c),
            Err(e) => Err(LlmError::Constraint(e.clone())),
        }
    }

    /// Queues a pass over the whole of `tokens` outside the batch (scoring,
    /// embedding) once they are in the vocabulary and the context; `from`
    /// is where the prompt ends, for the context error.
    fn one_pass<T>(
        &self,
        tokens: Vec<u32>,
        from: usize,
        job: impl FnOnce(Vec<u32>, tokio::sync::oneshot::Sender<T>) -> Job,
    ) -> Result<tokio::sync::oneshot::Receiver<T>> {
        self.check_vocab(&tokens)?;
        let max = self.config.max_model_len;
        if tokens.len() > max {
            return Err(LlmError::ContextLength {
                max,
                prompt: from,
                max_tokens: tokens.len() - from,
            });
        }
        let (reply, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(job(tokens, reply))
            .map_err(|_| LlmError::EngineStopped)?;
        Ok(rx)
    }

    fn check_vocab(&self, tokens: &[u32]) -> Result<()> {
        match tokens.iter().find(|&&t| t as usize >= self.vocab_size) {
            Some(t) => Err(LlmError::InvalidRequest(format!(
                "token id {t} is outside the vocabulary of {} tokens",
                self.vocab_size
            ))),
            None => Ok(()),
        }
    }
}

impl LlmEngine {
    /// Starts the engine thread for `model`, served under `name`.
    pub fn start(name: &str, loaded: LoadedWeights, config: EngineConfig) -> Self {
        Self::launch(name, loaded, None, config)
    }

    /// [`LlmEngine::start`] with a draft model proposing tokens for
    /// speculative decoding (`config.speculative` says how many). The draft
    /// must have the target's vocabulary and cover its context; it gets a
    /// KV pool of as many tokens as the target's.
    pub fn start_with_draft(
        name: &str,
        loaded: LoadedWeights,
        draft: LoadedWeights,
        config: EngineConfig,
    ) -> Result<Self> {
        if config.speculative.is_none() {
            return Err(LlmError::Unsupported(
                "a draft model needs speculative settings (num_speculative_tokens)".into(),
            ));
        }
        let (ours, theirs) = (loaded.tokenizer.vocabulary(), draft.tokenizer.vocabulary());
        if ours != theirs || loaded.model.config.vocab_size != draft.model.config.vocab_size {
            let at = ours.iter().zip(&theirs).position(|(a, b)| a != b);
            return Err(LlmError::Unsupported(format!(
                "speculative.draft: its vocabulary differs from the model's ({} tokens and {} rows \
                 vs {} and {}{})",
                theirs.len(),
                draft.model.config.vocab_size,
                ours.len(),
                loaded.model.config.vocab_size,
                at.map_or(String::new(), |i| format!("; first difference at id {i}"))
            )));
        }
        let serves = config
            .max_model_len
            .min(loaded.model.config.max_position_embeddings);
        let reach = draft.model.config.max_position_embeddings;
        if reach < serves {
            return Err(LlmError::Unsupported(format!(
                "speculative.draft: its context ({reach} positions) is shorter than the \
                 {serves} tokens the model serves; lower max_model_len to {reach} or pick \
                 another draft"
            )));
        }
        Ok(Self::launch(name, loaded, Some(draft.model), config))
    }

    fn launch(
        name: &str,
        loaded: LoadedWeights,
        draft: Option<LlamaModel>,
        mut config: EngineConfig,
    ) -> Self {
        let model = &loaded.model;
        let layers = model.config.num_hidden_layers;
        let vocab_size = model.config.vocab_size;
        let layout = model.kv_layout(config.block_size.max(1));
        let block_bytes = KvCache::block_bytes(layers, layout, config.kv_cache_dtype);
        let num_blocks = (config.kv_cache.bytes() / block_bytes as u64).max(1) as usize;
        config.max_model_len = config
            .max_model_len
            .min(model.config.max_position_embeddings)
            .min(num_blocks * layout.block_size);
        let drafter = draft.map(|d| {
            let layout = d.kv_layout(layout.block_size);
            let blocks = num_blocks + config.max_num_seqs;
            let dtype = config.kv_cache_dtype;
            let cache = KvCache::new(d.config.num_hidden_layers, layout, dtype, blocks, false);
            tracing::info!(model = %name, blocks, "draft model's KV cache pool");
            speculative::Drafter::new(d, cache)
        });
        tracing::info!(
            model = %name,
            blocks = num_blocks,
            block_size = layout.block_size,
            tokens = num_blocks * layout.block_size,
            mib = (num_blocks * block_bytes) >> 20,
            prefix_caching = config.enable_prefix_caching,
            dtype = ?config.kv_cache_dtype,
            "KV cache pool"
        );
        let cache = KvCache::new(
            layers,
            layout,
            config.kv_cache_dtype,
            num_blocks,
            config.enable_prefix_caching,
        );
        let (tx, rx) = mpsc::channel();
        let waiting = Arc::new(AtomicUsize::new(0));
        let tokenizer = Arc::new(loaded.tokenizer);
        let stats = Arc::new(SharedStats::default());

        stats.free_blocks.store(num_blocks, Ordering::Relaxed);
        let worker = Worker {
            name: name.to_string(),
            labels: [("model_name", name.to_string())],
            cache,
            stats: stats.clone(),
            model: loaded.model,
            tokenizer: tokenizer.clone(),
            scheduler: Scheduler::new(SchedulerConfig {
                max_num_seqs: config.max_num_seqs,
                max_num_batched_tokens: config.max_num_batched_tokens,
            }),
            waiting: waiting.clone(),
            speculative: config.speculative,
            max_model_len: config.max_model_len,
            drafter,
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
                stats,
                total_blocks: num_blocks,
                vocab_size,
                guidance: OnceLock::new(),
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

    /// Tokens in the model's vocabulary (the LM head's rows).
    pub fn vocab_size(&self) -> usize {
        self.inner.vocab_size
    }

    pub fn max_model_len(&self) -> usize {
        self.inner.config.max_model_len
    }

    /// Sequences run at once; also the largest `n` a request may ask for.
    pub fn max_num_seqs(&self) -> usize {
        self.inner.config.max_num_seqs
    }

    pub fn stats(&self) -> EngineStats {
        let s = &self.inner.stats;
        let (drafts, draft_tokens, accepted_at) = s
            .speculation
            .lock()
            .map(|x| (x.drafts, x.draft_tokens, x.accepted_at.clone()))
            .unwrap_or_default();
        EngineStats {
            total_blocks: self.inner.total_blocks,
            free_blocks: s.free_blocks.load(Ordering::Relaxed),
            preemptions: s.preemptions.load(Ordering::Relaxed),
            prefix_queried: s.prefix_queried.load(Ordering::Relaxed),
            prefix_hit: s.prefix_hit.load(Ordering::Relaxed),
            drafts,
            draft_tokens,
            accepted_tokens: accepted_at.iter().sum(),
            accepted_at,
        }
    }

    /// Queues a request; its events arrive on the returned receiver. Dropping
    /// the receiver cancels the request and frees its cache.
    pub fn submit(&self, req: GenerationRequest) -> Result<UnboundedReceiver<GenerationEvent>> {
        let inner = &self.inner;
        if req.prompt.is_empty() {
            return Err(LlmError::InvalidRequest("the prompt is empty".into()));
        }
        inner.check_vocab(&req.prompt)?;
        if req.n == 0 || req.n > inner.config.max_num_seqs {
            return Err(LlmError::InvalidRequest(format!(
                "n = {} must be between 1 and this model's max_num_seqs ({})",
                req.n, inner.config.max_num_seqs
            )));
        }
        let max = inner.config.max_model_len;
        let total = req.prompt.len().checked_add(req.max_tokens);
        if req.max_tokens == 0 {
            return Err(LlmError::InvalidRequest(
                "max_tokens must be at least 1".into(),
            ));
        }
        if total.is_none_or(|t| t > max) {
            return Err(LlmError::ContextLength {
                max,
                prompt: req.prompt.len(),
                max_tokens: req.max_tokens,
            });
        }
        let guide = req
            .constraint
            .as_ref()
            .map(|c| inner.guide(c).map(Box::new))
            .transpose()?;
        let capacity = inner.config.max_waiting;
        if inner.waiting.fetch_add(1, Ordering::SeqCst) >= capacity {
            inner.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(LlmError::QueueFull { capacity });
        }
        let (events, rx) = unbounded_channel();
        // Parallel samples take the ids after the request's own.
        let id = SeqId(inner.next_id.fetch_add(req.n as u64, Ordering::Relaxed));
        inner
            .tx
            .send(Job::Generate(Box::new(Submission {
                id,
                req,
                guide,
                events,
                arrived: Instant::now(),
            })))
            .map_err(|_| LlmError::EngineStopped)?;
        Ok(rx)
    }

    /// Whether this model serves embeddings (`EngineConfig::embeddings`).
    pub fn serves_embeddings(&self) -> bool {
        self.inner.config.embeddings
    }

    /// The embedding of `tokens` ([`LlamaModel::embed`]), computed on the
    /// engine thread between two iterations.
    pub fn embed(
        &self,
        tokens: Vec<u32>,
    ) -> Result<tokio::sync::oneshot::Receiver<std::result::Result<Vec<f32>, String>>> {
        let inner = &self.inner;
        if !inner.config.embeddings {
            return Err(LlmError::Unsupported(format!(
                "`{}` is not configured for embeddings (engine: {{ embeddings: true }})",
                inner.name
            )));
        }
        if tokens.is_empty() {
            return Err(LlmError::InvalidRequest("the input is empty".into()));
        }
        let from = tokens.len();
        inner.one_pass(tokens, from, |tokens, reply| {
            Job::Embed(EmbedJob { tokens, reply })
        })
    }

    /// Teacher forcing: the log-probability this model gives each of
    /// `tokens[from..]` after the tokens before it (temperature 1, no
    /// penalties), with the `top` most likely tokens at each. It runs on
    /// the engine thread between two iterations, as one forward pass over
    /// the whole sequence in a private cache.
    pub fn score(
        &self,
        tokens: Vec<u32>,
        from: usize,
        top: usize,
    ) -> Result<tokio::sync::oneshot::Receiver<Scores>> {
        let inner = &self.inner;
        if from == 0 || from >= tokens.len() {
            return Err(LlmError::InvalidRequest(format!(
                "scoring needs a prefix and at least one token after it (from = {from}, {} tokens)",
                tokens.len()
            )));
        }
        inner.one_pass(tokens, from, |tokens, reply| {
            Job::Score(ScoreJob {
                tokens,
                from,
                top,
                reply,
            })
        })
    }
}

/// One sample of a request being served.
struct Sequence {
    id: SeqId,
    /// Which of the request's `n` samples this is.
    index: usize,
    /// Samples still to fork off once the prompt is computed.
    forks: usize,
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    req: Arc<GenerationRequest>,
    sampler: Sampler,
    decoder: IncrementalDecoder,
    stops: StopMatcher,
    events: UnboundedSender<GenerationEvent>,
    arrived: Instant,
    scheduled: bool,
    last_token_at: Option<Instant>,
    finished: bool,
    /// Prompt tokens the prefix cache held at its first admission.
    cached_prompt: Option<usize>,
    /// Where a structured output stands in its grammar.
    guide: Option<Box<Guide>>,
    /// Tokens proposed for this step, verified after its forward pass.
    draft: Vec<u32>,
    speculation: speculative::Record,
    /// How the sample ended, as vLLM's `finished_reason` says it: `stop`,
    /// `length`, `error`, or `abort` (the client left, or the server did).
    outcome: &'static str,
    /// The engine's metric labels.
    labels: [(&'static str, String); 1],
}

/// The last sample of a request to go records the request once, whatever
/// `n` and however it ended: its end-to-end latency and its outcome.
impl Drop for Sequence {
    fn drop(&mut self) {
        if Arc::strong_count(&self.req) > 1 {
            return;
        }
        let labels = &self.labels;
        metrics::histogram!("switchyard:e2e_request_latency_seconds", labels)
            .record(self.arrived.elapsed().as_secs_f64());
        let [(k, v)] = labels;
        metrics::counter!("switchyard:request_success_total", *k => v.clone(), "finished_reason" => self.outcome)
            .increment(1);
    }
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
    fn set_computed(&mut self, n: usize) {
        self.computed = n;
    }
    fn admitted(&mut self, cached: usize) {
        self.cached_prompt
            .get_or_insert(cached.min(self.prompt_len));
    }
    fn width(&self) -> usize {
        1 + self.forks
    }
}

impl Sequence {
    fn new(s: Submission, labels: &[(&'static str, String); 1]) -> Self {
        let req = Arc::new(s.req);
        let mut seq = Self::sample(&req, s.id, 0, s.events, s.arrived, labels);
        seq.forks = req.n - 1;
        seq.guide = s.guide;
        seq
    }

    /// Sample `index` of `req`, before its first token. Seeded samples get
    /// distinct seeds so that they differ.
    fn sample(
        req: &Arc<GenerationRequest>,
        id: SeqId,
        index: usize,
        events: UnboundedSender<GenerationEvent>,
        arrived: Instant,
        labels: &[(&'static str, String); 1],
    ) -> Self {
        let mut params = req.sampling.clone();
        params.seed = params.seed.map(|s| s.wrapping_add(index as u64));
        Self {
            id,
            index,
            forks: 0,
            prompt_len: req.prompt.len(),
            tokens: req.prompt.clone(),
            computed: 0,
            sampler: Sampler::new(params),
            stops: StopMatcher::new(req.stop.clone()),
            decoder: IncrementalDecoder::default(),
            req: req.clone(),
            events,
            arrived,
            scheduled: false,
            last_token_at: None,
            finished: false,
            cached_prompt: None,
            guide: None,
            draft: Vec::new(),
            speculation: speculative::Record::default(),
            outcome: "abort",
            labels: labels.clone(),
        }
    }

    fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Ends the sequence with an error the client sees.
    fn fail(&mut self, message: String) {
        self.finished = true;
        self.outcome = "error";
        let _ = self.events.send(GenerationEvent::Failed(message));
    }

    fn finish(&mut self, reason: FinishReason) {
        self.finished = true;
        self.outcome = reason.as_str();
        let _ = self.events.send(GenerationEvent::Finished {
            index: self.index,
            reason,
            prompt_tokens: self.prompt_len,
            completion_tokens: self.output().len(),
            cached_tokens: self.cached_prompt.unwrap_or(0),
        });
    }
}

struct Worker {
    name: String,
    labels: [(&'static str, String); 1],
    model: LlamaModel,
    tokenizer: Arc<Tokenizer>,
    cache: KvCache,
    stats: Arc<SharedStats>,
    scheduler: Scheduler<Sequence>,
    waiting: Arc<AtomicUsize>,
    speculative: Option<SpeculativeConfig>,
    max_model_len: usize,
    /// Proposes tokens by a draft model; without one, by n-gram lookup.
    drafter: Option<speculative::Drafter>,
}

impl Worker {
    fn run(mut self, rx: mpsc::Receiver<Job>) {
        tracing::info!(model = %self.name, "engine loop started");
        // Exported from the start, so that dashboards and alerts see every
        // series before the first event.
        let labels = &self.labels;
        for counter in [
            "switchyard:num_preemptions_total",
            "switchyard:prompt_tokens_total",
            "switchyard:generation_tokens_total",
            "switchyard:prefix_cache_queries_total",
            "switchyard:prefix_cache_hits_total",
        ] {
            metrics::counter!(counter, labels).increment(0);
        }
        for reason in ["stop", "length", "abort", "error"] {
            let [(k, v)] = labels;
            metrics::counter!("switchyard:request_success_total", *k => v.clone(), "finished_reason" => reason)
                .increment(0);
        }
        for histogram in [
            "switchyard:time_to_first_token_seconds",
            "switchyard:inter_token_latency_seconds",
            "switchyard:e2e_request_latency_seconds",
            "switchyard:request_queue_time_seconds",
        ] {
            // A histogram handle registers the series with no observations.
            let _ = metrics::histogram!(histogram, labels);
        }
        loop {
            if self.scheduler.is_idle() {
                match rx.recv() {
                    Ok(job) => self.take(job),
                    Err(_) => return,
                }
            }
            while let Ok(job) = rx.try_recv() {
                self.take(job);
            }
            self.step();
        }
    }

    /// Queues a generation; runs a scoring pass at once.
    fn take(&mut self, job: Job) {
        match job {
            Job::Generate(s) => self
                .scheduler
                .waiting
                .push_back(Sequence::new(*s, &self.labels)),
            Job::Score(j) => {
                let dtype = self.cache.dtype;
                let out = self
                    .model
                    .score_top(&j.tokens, j.from, dtype, j.top)
                    .map_err(|e| {
                        tracing::warn!(model = %self.name, error = %e, "scoring pass failed");
                        e.to_string()
                    });
                let _ = j.reply.send(out);
            }
            Job::Embed(j) => {
                let out = self
                    .model
                    .embed(&j.tokens, self.cache.dtype)
                    .map_err(|e| e.to_string());
                let _ = j.reply.send(out);
            }
        }
    }

    /// One iteration: drop cancelled sequences, schedule, forward, sample.
    fn step(&mut self) {
        let cancelled = |s: &Sequence| s.events.is_closed();
        let before = self.scheduler.waiting.len();
        self.scheduler.waiting.retain(|s| !cancelled(s));
        self.waiting
            .fetch_sub(before - self.scheduler.waiting.len(), Ordering::SeqCst);
        self.scheduler.preempted.retain(|s| !cancelled(s));
        for s in self.scheduler.retire(&mut self.cache, cancelled) {
            tracing::debug!(seq = s.id.0, "client went away; sequence cancelled");
        }
        let mut sched = self.scheduler.schedule(&mut self.cache);
        self.waiting.fetch_sub(sched.admitted, Ordering::SeqCst);
        for mut s in self.scheduler.unfit.drain(..) {
            let blocks = self.cache.blocks.num_blocks();
            tracing::warn!(model = %self.name, seq = s.id.0, tokens = s.tokens.len(), blocks, "a sequence cannot fit the KV pool alone; ended");
            s.fail(format!(
                "the sequence needs more KV cache than the whole pool holds ({blocks} blocks of {} tokens); \
                 send a shorter prompt or a smaller max_tokens",
                self.cache.blocks.block_size()
            ));
        }
        let labels = self.labels.clone();
        if sched.preempted > 0 {
            metrics::counter!("switchyard:num_preemptions_total", &labels)
                .increment(sched.preempted as u64);
            self.stats
                .preemptions
                .fetch_add(sched.preempted as u64, Ordering::Relaxed);
        }
        for s in &mut self.scheduler.running {
            if !s.scheduled {
                s.scheduled = true;
                metrics::histogram!("switchyard:request_queue_time_seconds", &labels)
                    .record(s.arrived.elapsed().as_secs_f64());
            }
        }
        self.report();
        if sched.batch.is_empty() {
            return;
        }
        let tails = self.propose(&mut sched);
        // Structured outputs' masks for this step are computed on another
        // thread while the forward pass runs; the guides go back after.
        let mut guides: Vec<(usize, Box<Guide>)> = sched
            .plan
            .iter()
            .filter(|p| p.samples)
            .filter_map(|p| {
                let g = self.scheduler.running[p.index].guide.take()?;
                Some((p.index, g))
            })
            .collect();
        let (model, cache) = (&self.model, &mut self.cache);
        let rows = std::thread::scope(|scope| {
            let masks = (!guides.is_empty())
                .then(|| scope.spawn(|| guides.iter_mut().for_each(|(_, g)| g.prepare())));
            let rows = model.tail_logits(&sched.batch, cache, &tails);
            // A mask that failed here is computed again, and its error
            // reported, when the token is sampled.
            if let Some(Err(_)) = masks.map(|h| h.join()) {
                tracing::warn!(model = %self.name, "computing structured-output masks failed");
            }
            rows
        });
        for (index, g) in guides {
            self.scheduler.running[index].guide = Some(g);
        }
        let mut rows = match rows {
            Ok(rows) => rows,
            Err(e) => {
                tracing::error!(model = %self.name, error = %e, "forward pass failed");
                for p in &sched.plan {
                    let s = &mut self.scheduler.running[p.index];
                    s.fail(format!("forward pass failed: {e}"));
                }
                self.scheduler.retire(&mut self.cache, |s| s.finished);
                return;
            }
        };
        // Each segment's rows of logits, sampled from in place.
        let vocab = self.model.config.vocab_size;
        let mut rest = rows.as_mut_slice();
        for (p, &tail) in sched.plan.iter().zip(&tails) {
            let (logits, after) = std::mem::take(&mut rest).split_at_mut(tail * vocab);
            rest = after;
            let s = &mut self.scheduler.running[p.index];
            s.computed += p.len;
            self.cache.blocks.computed(s.id, &s.tokens, s.computed);
            if !p.samples {
                continue;
            }
            if !s.draft.is_empty() {
                self.verify(p.index, logits);
                continue;
            }
            let mut family = vec![p.index];
            if s.forks > 0 {
                family.extend(self.fork(p.index));
            }
            // Each of a request's parallel samples takes a copy of the row,
            // the last the row itself.
            let last = family.pop().expect("the request itself");
            for index in family {
                self.sample_next(index, &mut logits.to_vec(), None);
            }
            self.sample_next(last, logits, None);
        }
        // Dropped here; the last sample of a request records it.
        self.scheduler.retire(&mut self.cache, |s| s.finished);
        self.report();
    }

    /// Proposes tokens for the decoding sequences that speculate, puts them
    /// in the batch after their decode token, and returns how many rows of
    /// logits each planned segment needs. A proposal is dropped rather than
    /// exceed the token budget or take a block another sequence would need.
    fn propose(&mut self, sched: &mut Schedule) -> Vec<usize> {
        let mut tails = vec![1; sched.plan.len()];
        let Some(spec) = self.speculative else {
            return tails;
        };
        let running = &mut self.scheduler.running;
        if let Some(d) = &mut self.drafter {
            d.retain(|id| running.iter().any(|s| s.id == id));
        }
        if spec
            .disable_by_batch_size
            .is_some_and(|max| running.len() > max)
        {
            return tails;
        }
        let k = spec.num_speculative_tokens;
        let mut budget = self
            .scheduler
            .config
            .max_num_batched_tokens
            .saturating_sub(sched.batch.tokens.len());
        // Who may speculate this step, and how many tokens each may take.
        let mut wanted = Vec::new();
        for (i, p) in sched.plan.iter().enumerate() {
            let s = &mut running[p.index];
            let decoding = p.samples && p.len == 1 && s.computed + 1 == s.tokens.len();
            if !decoding || s.guide.is_some() || s.forks > 0 || !s.speculation.ready() {
                continue;
            }
            // The bonus token needs room too.
            let room = (s.req.max_tokens.saturating_sub(s.output().len() + 1))
                .min(self.max_model_len.saturating_sub(s.tokens.len() + 1))
                .min(k);
            if room > 0 {
                wanted.push((i, room));
            }
        }
        let drafts: Vec<Vec<u32>> = match &mut self.drafter {
            Some(d) => {
                let wants: Vec<_> = wanted
                    .iter()
                    .map(|&(i, room)| {
                        let s = &running[sched.plan[i].index];
                        (s.id, s.tokens.as_slice(), room)
                    })
                    .collect();
                match d.propose(&wants) {
                    Ok(drafts) => drafts,
                    Err(e) => {
                        tracing::warn!(model = %self.name, error = %e, "the draft model's pass failed; no proposals this step");
                        vec![Vec::new(); wanted.len()]
                    }
                }
            }
            None => wanted
                .iter()
                .map(|&(i, room)| {
                    let s = &running[sched.plan[i].index];
                    speculative::ngram(
                        &s.tokens,
                        spec.prompt_lookup_min,
                        spec.prompt_lookup_max,
                        room,
                    )
                })
                .collect(),
        };
        for ((i, _), mut draft) in wanted.into_iter().zip(drafts) {
            let s = &mut running[sched.plan[i].index];
            draft.truncate(budget);
            let total = s.tokens.len() + draft.len();
            if draft.is_empty() || self.cache.prepare(s.id, s.computed, total).is_err() {
                if let Some(d) = &mut self.drafter {
                    d.keep(s.id, s.tokens.len());
                }
                continue;
            }
            budget -= draft.len();
            tails[i] += draft.len();
            s.draft = draft;
        }
        if tails.iter().any(|&t| t > 1) {
            let mut batch = ForwardBatch::default();
            for p in &sched.plan {
                let s = &running[p.index];
                let mut tokens = s.tokens[s.computed..s.computed + p.len].to_vec();
                tokens.extend_from_slice(&s.draft);
                batch.push(s.id, &tokens, s.computed);
            }
            sched.batch = batch;
        }
        tails
    }

    /// Samples the tokens of a speculating sequence from its rows of logits,
    /// one per proposed token and one past them: each proposed token is
    /// judged by the sampler's rule, and the first refused one is replaced
    /// by the token drawn in its place, which ends the step (as does a
    /// finished sequence). The accepted tokens' keys and values were
    /// computed in this pass; the rest of the pass is left to be
    /// overwritten.
    fn verify(&mut self, index: usize, logits: &mut [f32]) {
        let s = &mut self.scheduler.running[index];
        let draft = std::mem::take(&mut s.draft);
        let (seq, before) = (s.id, s.tokens.len());
        let mut accepted = 0;
        let vocab = self.model.config.vocab_size;
        for (j, row) in logits.chunks_exact_mut(vocab).enumerate() {
            let proposed = draft.get(j).copied();
            let picked = self.sample_next(index, row, proposed);
            if picked.is_none() || picked != proposed {
                break;
            }
            accepted += 1;
            metrics::counter!("switchyard:spec_decode_num_accepted_tokens_per_pos_total", "model_name" => self.name.clone(), "position" => j.to_string())
                .increment(1);
            // An accepted token can end the sequence (EOS, a stop string,
            // max_tokens); the rest of the proposal goes unjudged.
            let s = &mut self.scheduler.running[index];
            if s.finished {
                break;
            }
            s.computed += 1;
            self.cache.blocks.computed(s.id, &s.tokens, s.computed);
        }
        self.scheduler.running[index].speculation.judged(accepted);
        if let Some(d) = &mut self.drafter {
            d.keep(seq, before + accepted);
        }
        let labels = &self.labels;
        metrics::counter!("switchyard:spec_decode_num_drafts_total", labels).increment(1);
        metrics::counter!("switchyard:spec_decode_num_draft_tokens_total", labels)
            .increment(draft.len() as u64);
        metrics::counter!("switchyard:spec_decode_num_accepted_tokens_total", labels)
            .increment(accepted as u64);
        if let Ok(mut spec) = self.stats.speculation.lock() {
            spec.drafts += 1;
            spec.draft_tokens += draft.len() as u64;
            if spec.accepted_at.len() < accepted {
                spec.accepted_at.resize(accepted, 0);
            }
            spec.accepted_at
                .iter_mut()
                .take(accepted)
                .for_each(|n| *n += 1);
        }
    }

    /// Splits the request at `index` into its parallel samples, which share
    /// the prompt's blocks; returns their indices in `running`.
    fn fork(&mut self, index: usize) -> Vec<usize> {
        let running = &mut self.scheduler.running;
        let forks = std::mem::take(&mut running[index].forks);
        let mut added = Vec::with_capacity(forks);
        for i in 1..=forks {
            let p = &running[index];
            let mut child = Sequence::sample(
                &p.req,
                SeqId(p.id.0 + i as u64),
                i,
                p.events.clone(),
                p.arrived,
                &p.labels,
            );
            child.computed = p.computed;
            child.cached_prompt = p.cached_prompt;
            child.guide = p.guide.clone();
            child.scheduled = true;
            self.cache.blocks.fork(p.id, child.id);
            added.push(running.len());
            running.push(child);
        }
        added
    }

    /// Exports the queue, KV pool and prefix-cache gauges and counters.
    fn report(&mut self) {
        let labels = &self.labels;
        metrics::gauge!("switchyard:num_requests_running", labels)
            .set(self.scheduler.running.len() as f64);
        metrics::gauge!("switchyard:num_requests_waiting", labels)
            .set((self.scheduler.waiting.len() + self.scheduler.preempted.len()) as f64);
        metrics::gauge!("switchyard:kv_cache_usage_perc", labels).set(self.cache.blocks.usage());
        let now = self.cache.blocks.prefix_stats();
        let stats = &self.stats;
        let queried = stats.prefix_queried.swap(now.queried, Ordering::Relaxed);
        let hit = stats.prefix_hit.swap(now.hit, Ordering::Relaxed);
        metrics::counter!("switchyard:prefix_cache_queries_total", labels)
            .increment(now.queried - queried);
        metrics::counter!("switchyard:prefix_cache_hits_total", labels).increment(now.hit - hit);
        stats
            .free_blocks
            .store(self.cache.blocks.num_free(), Ordering::Relaxed);
    }

    /// Samples the next token of the sequence at `index` (judging `proposed`
    /// first, when speculating) and sends it on; returns the token, or
    /// `None` when the sequence failed.
    fn sample_next(
        &mut self,
        index: usize,
        logits: &mut [f32],
        proposed: Option<u32>,
    ) -> Option<u32> {
        let tok = &self.tokenizer;
        let labels = &self.labels;
        let s = &mut self.scheduler.running[index];
        let banned: &[u32] = if s.output().len() < s.req.min_tokens && !s.req.ignore_eos {
            tok.eos_ids()
        } else {
            &[]
        };
        let mask = match s.guide.as_mut().map(|g| g.take_mask()).transpose() {
            Ok(m) => m,
            Err(e) => {
                s.fail(format!("structured output: the grammar failed: {e}"));
                return None;
            }
        };
        let picked = s.sampler.sample(
            logits,
            &s.tokens[..s.prompt_len],
            &s.tokens[s.prompt_len..],
            banned,
            mask.as_ref(),
            proposed,
        );
        s.tokens.push(picked.token);
        let now = Instant::now();
        match s.last_token_at {
            // Once per request, whatever `n`.
            None if s.index == 0 => {
                metrics::histogram!("switchyard:time_to_first_token_seconds", labels)
                    .record((now - s.arrived).as_secs_f64());
                metrics::counter!("switchyard:prompt_tokens_total", labels)
                    .increment(s.prompt_len as u64);
            }
            None => {}
            Some(t) => metrics::histogram!("switchyard:inter_token_latency_seconds", labels)
                .record((now - t).as_secs_f64()),
        }
        s.last_token_at = Some(now);
        metrics::counter!("switchyard:generation_tokens_total", labels).increment(1);
        let n = s.output().len();
        let is_eos = tok.is_eos(picked.token) && !s.req.ignore_eos;
        // The grammar is complete once it admits nothing more.
        let complete = match s.guide.as_mut().filter(|_| !is_eos) {
            None => false,
            Some(g) => match g.advance(picked.token) {
                Ok(done) => done,
                Err(e) => {
                    s.fail(format!(
                        "structured output: the grammar refused token {}: {e}",
                        picked.token
                    ));
                    return None;
                }
            },
        };
        let delta = if is_eos {
            String::new()
        } else {
            s.decoder.next(tok, &s.tokens[s.prompt_len..])
        };
        let released = s.stops.push(&delta, n >= s.req.min_tokens);
        let logprob = s.req.sampling.logprobs.map(|_| TokenLogprob {
            id: picked.token,
            token: tok.token_text(picked.token),
            logprob: picked.logprob,
            top: picked
                .top
                .iter()
                .map(|&(t, lp)| (tok.token_text(t), lp))
                .collect(),
        });
        let mut text = released.text;
        let reason = if released.stopped || is_eos || complete {
            Some(FinishReason::Stop)
        } else if n >= s.req.max_tokens {
            Some(FinishReason::Length)
        } else {
            None
        };
        if reason.is_some() && !released.stopped {
            text.push_str(&s.stops.flush());
        }
        let _ = s.events.send(GenerationEvent::Delta {
            index: s.index,
            text,
            logprob,
        });
        if let Some(r) = reason {
            s.finish(r);
        }
        Some(picked.token)
    }
}
