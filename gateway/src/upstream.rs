//! Remote upstreams: a model served by other nodes speaking the OpenAI API
//! (another Switchyard, vLLM, llama.cpp's server) or KServe v2 over gRPC
//! (Triton, another Switchyard). Per upstream, one future a request: under
//! the upstream's timeout, a balancer sends it to the healthy replica with
//! the fewest requests outstanding (opening a replica's circuit after
//! consecutive failures), and on to the next while one was not reached (a
//! non-streamed request only). Active health checks run beside it.
use crate::kserve_client::Remote;
use crate::tls::ClientTlsConfig;
use crate::upstream_pool::{Pool, PoolError, Pooled, Reply};
use axum::body::Bytes;
use axum::http::uri::{PathAndQuery, Scheme};
use axum::http::{HeaderValue, Method, Uri};
use engine::dnn::{DnnError, InferRequest, InferResponse};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use std::time::{Duration, Instant};

/// What an upstream's replicas speak.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Protocol {
    /// The OpenAI API over HTTP; `/v1/chat/completions` and `/v1/completions`
    /// are forwarded.
    #[default]
    Openai,
    /// KServe v2 over gRPC; the model's infer, metadata, config and
    /// readiness are forwarded from both of our KServe fronts.
    Kserve,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The model name clients send.
    pub name: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// The replicas: base URLs (`http://10.0.0.5:8080`) for `openai`, gRPC
    /// addresses (`grpc://10.0.0.5:8001`) for `kserve`.
    pub endpoints: Vec<String>,
    /// The model name at the upstream (default: `name`).
    #[serde(default)]
    pub model: Option<String>,
    /// Until a replica's answer starts; for a non-streamed answer, until
    /// its last byte; within a stream, between two chunks.
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
    /// The largest non-streamed answer passed on (it is read whole before
    /// it is sent on, so that a broken replica gets a clean 502; a KServe
    /// answer is refused before it is read); an OpenAI stream is passed on
    /// as it comes, without a cap on its size.
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: usize,
    /// Extra tries on another replica for non-streamed requests that never
    /// reached one (connection refused or reset before a response).
    #[serde(default = "default_retries")]
    pub retries: usize,
    #[serde(default = "default_health_path")]
    pub health_path: String,
    #[serde(default = "default_health_ms")]
    pub health_interval_ms: u64,
    /// Consecutive failures that open a replica's circuit, and for how long.
    #[serde(default = "default_failures")]
    pub failure_threshold: u32,
    #[serde(default = "default_open_secs")]
    pub open_secs: u64,
    /// The CA to trust and a client certificate to present (mTLS), for
    /// `https://` and `grpcs://` endpoints.
    #[serde(default)]
    pub tls: Option<ClientTlsConfig>,
}

impl UpstreamConfig {
    /// The TLS client of an `openai` upstream's `https://` replicas, from
    /// its TLS settings.
    fn tls_connector(&self) -> Result<tokio_rustls::TlsConnector, String> {
        let tls = self.tls.clone().unwrap_or_default().rustls("tls")?;
        Ok(Arc::new(tls).into())
    }

    /// The model's name at the upstream.
    pub fn model(&self) -> &str {
        self.model.as_deref().unwrap_or(&self.name)
    }
}

fn default_timeout() -> u64 {
    120
}
fn default_max_response_bytes() -> usize {
    64 << 20
}
fn default_retries() -> usize {
    2
}
fn default_health_path() -> String {
    "/health".into()
}
fn default_health_ms() -> u64 {
    1000
}
fn default_failures() -> u32 {
    3
}
fn default_open_secs() -> u64 {
    5
}

impl UpstreamConfig {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.endpoints.is_empty() {
            return Err(format!("{at}.endpoints: give at least one base URL"));
        }
        for (i, e) in self.endpoints.iter().enumerate() {
            let scheme = reqwest::Url::parse(e).map(|u| u.scheme().to_string());
            let ok = match self.protocol {
                Protocol::Openai => {
                    matches!(scheme.as_deref(), Ok("http" | "https")) && Origin::parse(e).is_some()
                }
                Protocol::Kserve => {
                    matches!(scheme.as_deref(), Ok("grpc" | "grpcs" | "http" | "https"))
                        && Remote::endpoint(e).is_ok()
                }
            };
            if !ok {
                let want = match self.protocol {
                    Protocol::Openai => {
                        "an http(s) base URL without credentials, query or fragment \
                         (http://host:8080, https://host/prefix)"
                    }
                    Protocol::Kserve => "a gRPC address like grpc://host:8001 (grpcs:// for TLS)",
                };
                return Err(format!("{at}.endpoints[{i}]: `{e}` is not {want}"));
            }
        }
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{at}.tls"))?;
        }
        for (key, value) in [
            ("timeout_secs", self.timeout_secs),
            ("health_interval_ms", self.health_interval_ms),
            ("failure_threshold", u64::from(self.failure_threshold)),
            ("max_response_bytes", self.max_response_bytes as u64),
        ] {
            if value == 0 {
                return Err(format!("{at}.{key}: must be at least 1"));
            }
        }
        Ok(())
    }
}

/// Where an `openai` replica's requests go: its base URL in parts, parsed
/// once, so that a request only puts its path after them.
struct Origin {
    /// Scheme and authority: where connections go.
    root: Uri,
    /// The base URL's path, without its trailing `/` (usually empty).
    prefix: String,
    /// The `Host` header of its requests (the port left out when it is the
    /// scheme's own), made once instead of formatted on every request.
    host: String,
}

impl Origin {
    /// The parts of `base`; `None` for a URL with credentials, a query or a
    /// fragment, which a base URL cannot carry into the requests.
    fn parse(base: &str) -> Option<Self> {
        let uri: Uri = base.trim_end_matches('/').parse().ok()?;
        let parts = uri.into_parts();
        let authority = parts.authority?;
        if authority.as_str().contains('@') || base.contains('#') {
            return None;
        }
        let prefix = match parts.path_and_query {
            Some(pq) if pq.query().is_some() => return None,
            Some(pq) => pq.path().trim_end_matches('/').to_string(),
            None => String::new(),
        };
        let scheme = parts.scheme?;
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host = match authority.port_u16() {
            Some(p) if p != default_port => authority.as_str(),
            _ => authority.host(),
        };
        Some(Self {
            host: host.to_string(),
            root: Uri::builder()
                .scheme(scheme)
                .authority(authority)
                .path_and_query("/")
                .build()
                .ok()?,
            prefix,
        })
    }

    /// The request target (origin form) of `path` at this replica.
    fn target(&self, path: &'static str) -> Cow<'static, str> {
        if self.prefix.is_empty() {
            return Cow::Borrowed(path);
        }
        Cow::Owned(format!("{}{path}", self.prefix))
    }

    /// The request target of any `path` at this replica, if it is one.
    fn target_of(&self, path: &str) -> Result<PathAndQuery, axum::http::uri::InvalidUri> {
        PathAndQuery::try_from(format!("{}{path}", self.prefix))
    }
}

/// One replica and what is known of it.
pub struct Replica {
    base: String,
    /// `x-switchyard-upstream` naming it in the answers it gave (`None` for
    /// a base URL that is no header value).
    header: Option<HeaderValue>,
    /// Its `switchyard:upstream_requests_total` by answer status, each
    /// registered once: a request only finds its counter and adds one.
    counters: Mutex<Vec<(String, metrics::Counter)>>,
    /// `Some` for `openai` replicas.
    origin: Option<Origin>,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl std::fmt::Debug for Replica {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Replica").field("base", &self.base).finish()
    }
}

impl Replica {
    fn new(base: &str, protocol: Protocol) -> Self {
        let base = base.trim_end_matches('/').to_string();
        Self {
            origin: match protocol {
                Protocol::Openai => Origin::parse(&base),
                Protocol::Kserve => None,
            },
            header: HeaderValue::from_str(&base).ok(),
            counters: Mutex::default(),
            base,
            outstanding: AtomicUsize::new(0),
            healthy: AtomicBool::new(true),
            failures: AtomicU32::new(0),
            open_until: Mutex::new(None),
        }
    }

    /// Its base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `x-switchyard-upstream` naming it.
    pub fn header(&self) -> Option<&HeaderValue> {
        self.header.as_ref()
    }

    /// Counts an answer of `upstream`'s from this replica with `status`.
    pub fn count(&self, upstream: &str, status: &str) {
        let mut counters = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, c)) = counters.iter().find(|(s, _)| s == status) {
            return c.increment(1);
        }
        let c = metrics::counter!("switchyard:upstream_requests_total", "upstream" => upstream.to_string(), "replica" => self.base.clone(), "status" => status.to_string());
        c.increment(1);
        counters.push((status.to_string(), c));
    }

    fn available(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && self
                .open_until
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .is_none_or(|t| Instant::now() >= t)
    }

    fn succeeded(&self) {
        self.failures.store(0, Ordering::Relaxed);
        *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn failed(&self, threshold: u32, open: Duration) {
        if self.failures.fetch_add(1, Ordering::Relaxed) + 1 >= threshold {
            *self.open_until.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Instant::now() + open);
            tracing::warn!(replica = %self.base, "circuit open for {open:?}");
        }
    }
}

/// A request for the upstream: the path (`/v1/chat/completions`) and body.
#[derive(Clone)]
pub struct ProxyRequest {
    pub path: &'static str,
    pub body: Bytes,
    pub stream: bool,
}

/// A replica's stream, ended once the replica has sent nothing for its
/// upstream's `timeout_secs`: with `last_words(error)` when the stream
/// stopped between two server-sent events, else cut with the error.
pub struct UntilStalled {
    body: Pooled,
    limit: Duration,
    stall: Pin<Box<tokio::time::Sleep>>,
    upstream: Arc<str>,
    /// The events that end a stream stalled between two events.
    last_words: fn(&UpstreamError) -> Bytes,
    /// Whether what came so far ended with an event's blank line.
    between_events: bool,
    /// The last words went out: the body has ended.
    ended: bool,
}

impl hyper::body::Body for UntilStalled {
    type Data = Bytes;
    type Error = UpstreamError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Bytes>, UpstreamError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.body).poll_frame(cx) {
            let next = tokio::time::Instant::now() + this.limit;
            this.stall.as_mut().reset(next);
            if let Some(data) = frame.as_ref().and_then(|f| f.as_ref().ok()?.data_ref()) {
                if !data.is_empty() {
                    this.between_events = data.ends_with(b"\n\n") || data.ends_with(b"\r\n\r\n");
                }
            }
            let failed =
                |e: std::io::Error| UpstreamError::Failed(this.upstream.to_string(), e.to_string());
            return Poll::Ready(frame.map(|f| f.map_err(failed)));
        }
        ready!(this.stall.as_mut().poll(cx));
        let secs = this.limit.as_secs();
        tracing::warn!(upstream = %this.upstream, secs, "a replica's stream stalled; ended");
        count_error(&this.upstream);
        let error = UpstreamError::Failed(
            this.upstream.to_string(),
            format!("the stream sent nothing for {secs} s"),
        );
        if !this.between_events {
            return Poll::Ready(Some(Err(error)));
        }
        this.ended = true;
        let last = (this.last_words)(&error);
        Poll::Ready(Some(Ok(hyper::body::Frame::data(last))))
    }

    fn is_end_stream(&self) -> bool {
        self.ended || self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

/// Counts a request no replica of `upstream` answered (in full).
pub fn count_error(upstream: &str) {
    metrics::counter!("switchyard:upstream_errors_total", "upstream" => upstream.to_string())
        .increment(1);
}

/// What is sent to an upstream, by protocol.
#[derive(Clone)]
enum Call {
    Http(ProxyRequest),
    Infer(Arc<InferRequest>),
}

impl Call {
    fn stream(&self) -> bool {
        matches!(self, Self::Http(r) if r.stream)
    }
}

/// A replica's answer: an HTTP response, or a KServe result (an error the
/// remote model gave is an answer too).
enum Answer {
    Http(Reply),
    Infer(Result<InferResponse, DnnError>),
}

/// How one attempt on a replica ended.
enum Attempt {
    /// `failed`: a server-side failure that counts toward the circuit.
    Answered {
        answer: Answer,
        failed: bool,
    },
    NotReached(String),
    Failed(String),
}

/// How replicas are reached.
#[derive(Clone)]
enum Transport {
    /// Per HTTP front, then one for every other thread, a connection pool
    /// per replica: a pooled connection is driven by the thread that opened
    /// it, so a front that used another's would wake that thread.
    Http(Arc<[Box<[Pool]>]>),
    /// One gRPC client per replica, in replica order.
    Kserve(Arc<Vec<Remote>>),
}

impl Transport {
    /// This thread's connection pools of an `openai` upstream, by replica.
    fn pools(fronts: &[Box<[Pool]>]) -> &[Pool] {
        match crate::server::front() {
            Some(f) if f + 1 < fronts.len() => &fronts[f],
            _ => &fronts[fronts.len() - 1],
        }
    }

    async fn attempt(&self, replica: &Replica, i: usize, call: Call) -> Attempt {
        let base = &replica.base;
        match (self, call, &replica.origin) {
            (Self::Http(fronts), Call::Http(req), Some(origin)) => {
                let target = origin.target(req.path);
                let pool = &Self::pools(fronts)[i];
                match pool
                    .request(&Method::POST, &target, &origin.host, &req.body)
                    .await
                {
                    Ok(resp) => Attempt::Answered {
                        failed: resp.status.is_server_error() && resp.status != 503,
                        answer: Answer::Http(resp),
                    },
                    Err(PoolError::Connect(e)) => Attempt::NotReached(format!("{base}: {e}")),
                    Err(PoolError::Failed(e)) => Attempt::Failed(format!("{base}: {e}")),
                }
            }
            (Self::Kserve(remotes), Call::Infer(req), _) => match remotes[i].call(&req).await {
                Ok(r) => Attempt::Answered {
                    answer: Answer::Infer(Ok(r)),
                    failed: false,
                },
                // tonic reports a refused or failed connection as UNAVAILABLE
                // with the connector's message.
                Err(s)
                    if s.code() == tonic::Code::Unavailable && s.message().contains("connect") =>
                {
                    Attempt::NotReached(format!("{base}: {}", s.message()))
                }
                // Our own bound, not the replica's failure.
                Err(s) if Remote::too_large(&s) => Attempt::Answered {
                    failed: false,
                    answer: Answer::Infer(Err(DnnError::unavailable(format!(
                        "{base}: {}; the answer is larger than this upstream's \
                         max_response_bytes",
                        s.message()
                    )))),
                },
                Err(s) if matches!(s.code(), tonic::Code::Cancelled | tonic::Code::Unknown) => {
                    Attempt::Failed(format!("{base}: {}", s.message()))
                }
                Err(s) => Attempt::Answered {
                    failed: s.code() == tonic::Code::Internal,
                    answer: Answer::Infer(Err(remotes[i].error(s))),
                },
            },
            _ => Attempt::Failed(format!(
                "{base}: the request is not of this upstream's protocol"
            )),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No replica took the request; safe to try another.
    #[error("no replica of `{0}` could be reached: {1}")]
    NotReached(String, String),
    #[error("upstream `{0}` has no healthy replica")]
    NoneHealthy(String),
    #[error("upstream `{0}` did not answer within {1} s")]
    Timeout(String, u64),
    #[error("upstream `{0}`: {1}")]
    Failed(String, String),
}

/// Least outstanding requests over available replicas, circuit breaking
/// on failures.
#[derive(Clone)]
struct Balancer {
    name: Arc<str>,
    replicas: Arc<Vec<Replica>>,
    /// Where the search starts, so ties rotate over the replicas.
    next: Arc<AtomicUsize>,
    transport: Transport,
    threshold: u32,
    open: Duration,
}

impl Balancer {
    /// One try: the available replica with the fewest requests in flight,
    /// and its index.
    async fn attempt(&self, call: Call) -> Result<(Answer, usize), UpstreamError> {
        let n = self.replicas.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let i = (0..n)
            .map(|k| (start + k) % n)
            .filter(|&i| self.replicas[i].available())
            .min_by_key(|&i| self.replicas[i].outstanding.load(Ordering::Relaxed))
            .ok_or_else(|| UpstreamError::NoneHealthy(self.name.to_string()))?;
        let r = &self.replicas[i];
        r.outstanding.fetch_add(1, Ordering::Relaxed);
        let attempt = self.transport.attempt(r, i, call).await;
        r.outstanding.fetch_sub(1, Ordering::Relaxed);
        match attempt {
            Attempt::Answered { answer, failed } => {
                if failed {
                    r.failed(self.threshold, self.open);
                } else {
                    r.succeeded();
                }
                Ok((answer, i))
            }
            Attempt::NotReached(why) => {
                r.failed(self.threshold, self.open);
                Err(UpstreamError::NotReached(self.name.to_string(), why))
            }
            Attempt::Failed(why) => {
                r.failed(self.threshold, self.open);
                Err(UpstreamError::Failed(self.name.to_string(), why))
            }
        }
    }
}

/// One remote upstream: its config and replicas.
#[derive(Clone)]
pub struct Upstream {
    pub config: UpstreamConfig,
    balancer: Balancer,
}

impl Upstream {
    /// `fronts`: the HTTP front threads, each given a connection pool of its own.
    pub fn new(config: UpstreamConfig, fronts: usize) -> Self {
        let replicas: Arc<Vec<Replica>> = Arc::new(
            config
                .endpoints
                .iter()
                .map(|e| Replica::new(e, config.protocol))
                .collect(),
        );
        let balancer = Balancer {
            name: config.name.as_str().into(),
            replicas: replicas.clone(),
            next: Arc::default(),
            transport: match config.protocol {
                Protocol::Openai => {
                    let tls = config.tls_connector().expect("validated TLS files");
                    // A replica without an origin is refused by `attempt`
                    // before any pool is asked.
                    let pools = || {
                        replicas
                            .iter()
                            .map(|r| {
                                let root = r.origin.as_ref().map(|o| o.root.clone());
                                Pool::new(tls.clone(), root.unwrap_or_default())
                            })
                            .collect()
                    };
                    Transport::Http((0..=fronts).map(|_| pools()).collect())
                }
                Protocol::Kserve => Transport::Kserve(Arc::new(
                    config
                        .endpoints
                        .iter()
                        .map(|e| {
                            let timeout = Duration::from_secs(config.timeout_secs);
                            let tls = config.tls.as_ref();
                            Remote::new(e, config.model(), timeout, tls, config.max_response_bytes)
                                .expect("validated endpoints")
                        })
                        .collect(),
                )),
            },
            threshold: config.failure_threshold,
            open: Duration::from_secs(config.open_secs),
        };
        Self { config, balancer }
    }

    /// Sends the request to a replica, and on to the next while one was
    /// not reached, up to `retries` more (never a stream), all within
    /// `timeout_secs`; returns the answer and the replica that gave it.
    async fn run(&self, call: Call) -> Result<(Answer, &Replica), UpstreamError> {
        let mut left = if call.stream() {
            0
        } else {
            self.config.retries
        };
        let tries = async {
            loop {
                match self.balancer.attempt(call.clone()).await {
                    Err(UpstreamError::NotReached(..)) if left > 0 => left -= 1,
                    done => return done,
                }
            }
        };
        let limit = Duration::from_secs(self.config.timeout_secs);
        match tokio::time::timeout(limit, tries).await {
            Ok(done) => done.map(|(answer, i)| (answer, &self.balancer.replicas[i])),
            Err(_) => Err(UpstreamError::Timeout(
                self.config.name.clone(),
                self.config.timeout_secs,
            )),
        }
    }

    /// An OpenAI API request; returns the response and the replica.
    pub async fn send(&self, req: ProxyRequest) -> Result<(Reply, &Replica), UpstreamError> {
        match self.run(Call::Http(req)).await? {
            (Answer::Http(resp), replica) => Ok((resp, replica)),
            (Answer::Infer(_), _) => Err(self.wrong_protocol()),
        }
    }

    /// A non-streamed answer's body, whole: by the end of the request's
    /// time limit, counted from `started` (before [`Upstream::send`]), and
    /// at most `max_response_bytes`. A body left unread closes its
    /// connection.
    pub async fn read_whole(
        &self,
        body: Pooled,
        started: tokio::time::Instant,
    ) -> Result<Bytes, UpstreamError> {
        let c = &self.config;
        let deadline = started + Duration::from_secs(c.timeout_secs);
        let mut read = std::pin::pin!(crate::limits::collect(body, c.max_response_bytes));
        // A small answer has mostly come with its head: read without a timer.
        let read = match futures::poll!(read.as_mut()) {
            Poll::Ready(done) => Ok(done),
            Poll::Pending => tokio::time::timeout_at(deadline, read).await,
        };
        match read {
            Ok(Ok(Some(b))) => Ok(b),
            Ok(Ok(None)) => Err(UpstreamError::Failed(
                c.name.clone(),
                format!(
                    "the answer is larger than this upstream's max_response_bytes ({})",
                    c.max_response_bytes
                ),
            )),
            Ok(Err(e)) => Err(UpstreamError::Failed(c.name.clone(), e.to_string())),
            Err(_) => Err(UpstreamError::Timeout(c.name.clone(), c.timeout_secs)),
        }
    }

    /// A stream's body, passed on as it comes, but ended once the replica
    /// has sent nothing for `timeout_secs`: with `last_words` (an error
    /// event in the protocol's shape) when it stopped between two events,
    /// else cut with an error, as by a proxy's read timeout.
    pub fn until_stalled(
        &self,
        body: Pooled,
        last_words: fn(&UpstreamError) -> Bytes,
    ) -> UntilStalled {
        let limit = Duration::from_secs(self.config.timeout_secs);
        UntilStalled {
            body,
            limit,
            stall: Box::pin(tokio::time::sleep(limit)),
            upstream: self.balancer.name.clone(),
            last_words,
            between_events: true,
            ended: false,
        }
    }

    /// A KServe infer request, answered under this upstream's model name.
    pub async fn infer(&self, req: InferRequest) -> Result<InferResponse, DnnError> {
        let name = self.config.name.clone();
        let answer = self.run(Call::Infer(Arc::new(req))).await;
        match &answer {
            Ok((a, replica)) => {
                let ok = matches!(a, Answer::Infer(Ok(_)));
                replica.count(&name, if ok { "ok" } else { "error" })
            }
            Err(_) => metrics::counter!("switchyard:upstream_requests_total", "upstream" => name.clone(), "replica" => "-", "status" => "error")
                .increment(1),
        }
        match answer {
            Ok((Answer::Infer(r), _)) => r.map(|mut r| {
                r.model_name = name;
                r
            }),
            Ok((Answer::Http(_), _)) => {
                Err(DnnError::unavailable(self.wrong_protocol().to_string()))
            }
            Err(e) => Err(DnnError::unavailable(e.to_string())),
        }
    }

    fn wrong_protocol(&self) -> UpstreamError {
        UpstreamError::Failed(
            self.config.name.clone(),
            format!("this upstream speaks {:?}", self.config.protocol),
        )
    }

    /// The first available KServe replica, for metadata and config.
    fn remote(&self) -> Result<&Remote, DnnError> {
        let Transport::Kserve(remotes) = &self.balancer.transport else {
            return Err(DnnError::unsupported(format!(
                "`{}` is served over the OpenAI API",
                self.config.name
            )));
        };
        self.balancer
            .replicas
            .iter()
            .position(Replica::available)
            .map(|i| &remotes[i])
            .ok_or_else(|| {
                DnnError::unavailable(
                    UpstreamError::NoneHealthy(self.config.name.clone()).to_string(),
                )
            })
    }

    pub async fn metadata(&self) -> Result<proto::inference::ModelMetadataResponse, DnnError> {
        let mut m = self.remote()?.metadata().await?;
        m.name = self.config.name.clone();
        Ok(m)
    }

    pub async fn model_config(&self) -> Result<proto::inference::ModelConfig, DnnError> {
        let mut c = self.remote()?.config().await?;
        c.name = self.config.name.clone();
        Ok(c)
    }

    /// Whether any replica is up.
    pub fn is_available(&self) -> bool {
        self.balancer.replicas.iter().any(Replica::available)
    }

    /// Whether `origin` answers `health_path` with a success within `limit`.
    /// The status decides; the body is read (up to 64 KiB) only so that
    /// the connection is kept.
    async fn answers_health(&self, pool: &Pool, origin: &Origin, limit: Duration) -> bool {
        let Ok(target) = origin.target_of(&self.config.health_path) else {
            return false;
        };
        let get = pool.request(&Method::GET, target.as_str(), &origin.host, b"");
        let Ok(Ok(resp)) = tokio::time::timeout(limit, get).await else {
            return false;
        };
        let up = resp.status.is_success();
        let body = crate::limits::collect(resp.body, 1 << 16);
        let _ = tokio::time::timeout(limit, body).await;
        up
    }

    /// Marks replicas up or down from `health_path`, forever, and drops
    /// every front's idle connections that are closed or stale.
    pub async fn check_health(self) {
        let every = Duration::from_millis(self.config.health_interval_ms);
        let limit = every.min(Duration::from_secs(2));
        loop {
            for (i, r) in self.balancer.replicas.iter().enumerate() {
                let up = match &self.balancer.transport {
                    Transport::Http(fronts) => {
                        let pool = &Transport::pools(fronts)[i];
                        match r.origin.as_ref() {
                            Some(o) => self.answers_health(pool, o, limit).await,
                            None => false,
                        }
                    }
                    Transport::Kserve(remotes) => {
                        tokio::time::timeout(limit, remotes[i].is_ready())
                            .await
                            .unwrap_or(false)
                    }
                };
                if r.healthy.swap(up, Ordering::Relaxed) != up {
                    tracing::info!(replica = %r.base, up, "upstream health changed");
                }
                metrics::gauge!("switchyard:upstream_healthy", "upstream" => self.config.name.clone(), "replica" => r.base.clone())
                    .set(if up { 1.0 } else { 0.0 });
            }
            if let Transport::Http(fronts) = &self.balancer.transport {
                fronts.iter().flat_map(|f| f.iter()).for_each(Pool::sweep);
            }
            tokio::time::sleep(every).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::post;
    use http_body_util::BodyExt;

    /// A replica on loopback answering `/v1/completions` with `status` after
    /// `delay`, counting its requests.
    async fn replica(status: u16, delay: Duration) -> (String, Arc<AtomicUsize>) {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().route(
            "/v1/completions",
            post(move || {
                let counted = counted.clone();
                async move {
                    counted.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    (
                        axum::http::StatusCode::from_u16(status).unwrap(),
                        "{\"ok\": true}",
                    )
                }
            }),
        );
        (serve(app).await, hits)
    }

    /// Serves `app` on loopback; returns its base URL.
    async fn serve(app: axum::Router) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        format!("http://{addr}")
    }

    /// An address that refuses connections: bound, then closed.
    fn refusing() -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    }

    fn upstream(endpoints: Vec<String>, retries: usize, threshold: u32) -> Upstream {
        Upstream::new(
            UpstreamConfig {
                name: "m".into(),
                protocol: Protocol::Openai,
                endpoints,
                model: None,
                timeout_secs: 5,
                max_response_bytes: 1 << 20,
                retries,
                health_path: "/health".into(),
                health_interval_ms: 1000,
                failure_threshold: threshold,
                open_secs: 60,
                tls: None,
            },
            1,
        )
    }

    fn request(stream: bool) -> ProxyRequest {
        ProxyRequest {
            path: "/v1/completions",
            body: Bytes::from_static(b"{}"),
            stream,
        }
    }

    #[tokio::test]
    async fn a_redirect_goes_back_to_the_client() {
        let (target, hits) = replica(200, Duration::ZERO).await;
        let app = axum::Router::new().route(
            "/v1/completions",
            post(move || {
                let to = format!("{target}/v1/completions");
                async move {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [(axum::http::header::LOCATION, to)],
                    )
                }
            }),
        );
        let moved = serve(app).await;
        let u = upstream(vec![moved.clone()], 0, 5);
        let (resp, replica) = u.send(request(false)).await.unwrap();
        assert_eq!((resp.status.as_u16(), replica.base()), (307, &*moved));
        assert_eq!(hits.load(Ordering::SeqCst), 0, "the redirect was followed");
    }

    #[tokio::test]
    async fn retries_go_to_the_next_replica_and_stop_at_their_limit() {
        let (live, hits) = replica(200, Duration::ZERO).await;
        // Tries start at replicas 0, 1, 2 in turn: two refusals, then the live one.
        let endpoints = vec![refusing(), refusing(), live.clone()];
        let two = upstream(endpoints.clone(), 2, 10);
        let (resp, used) = two.send(request(false)).await.unwrap();
        assert_eq!((resp.status.as_u16(), used.base()), (200, &*live));
        let one = upstream(endpoints.clone(), 1, 10);
        let e = one.send(request(false)).await.unwrap_err();
        assert!(matches!(e, UpstreamError::NotReached(..)), "{e}");
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "the live replica was tried once"
        );
        // A stream is never sent twice, even when it never arrived.
        let streams = upstream(endpoints, 2, 10);
        let e = streams.send(request(true)).await.unwrap_err();
        assert!(matches!(e, UpstreamError::NotReached(..)), "{e}");
    }

    #[tokio::test]
    async fn a_replica_that_keeps_failing_is_left_out_until_its_circuit_closes() {
        let (live, _) = replica(200, Duration::ZERO).await;
        let (broken, broken_hits) = replica(500, Duration::ZERO).await;
        let u = upstream(vec![broken.clone(), live.clone()], 0, 2);
        let mut answers = Vec::new();
        for _ in 0..8 {
            let (resp, used) = u.send(request(false)).await.unwrap();
            // A 500 is the replica's answer: passed on, not retried.
            answers.push((resp.status.as_u16(), used.base()));
        }
        assert_eq!(broken_hits.load(Ordering::SeqCst), 2, "{answers:?}");
        assert!(
            answers[4..].iter().all(|a| a == &(200, &*live)),
            "{answers:?}"
        );
        assert!(!u.balancer.replicas[0].available() && u.is_available());
    }

    #[tokio::test]
    async fn a_base_url_path_goes_before_the_request_path() {
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        let app = axum::Router::new().route(
            "/node/7/v1/completions",
            post(move || async move {
                counted.fetch_add(1, Ordering::SeqCst);
                "{}"
            }),
        );
        let base = format!("{}/node/7/", serve(app).await);
        let u = upstream(vec![base.clone()], 0, 5);
        let (resp, replica) = u.send(request(false)).await.unwrap();
        assert_eq!(resp.status.as_u16(), 200);
        assert_eq!(replica.base(), base.trim_end_matches('/'));
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_base_url_that_cannot_carry_requests_is_refused_by_name() {
        for bad in [
            "http://user:secret@10.0.0.5:8080",
            "http://10.0.0.5:8080/v1?key=1",
            "ftp://10.0.0.5",
        ] {
            let u = upstream(vec![bad.into()], 0, 5);
            let e = u.config.validate("upstreams[0]").unwrap_err();
            assert!(
                e.starts_with(&format!(
                    "upstreams[0].endpoints[0]: `{bad}` is not an http(s) base URL"
                )),
                "{e}"
            );
        }
    }

    /// A replica that sends `head` on each connection, then holds it open
    /// without another byte.
    async fn stalling(head: String) -> String {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let head = Bytes::from(head);
        tokio::spawn(async move {
            while let Ok((mut c, _)) = listener.accept().await {
                let head = head.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = c.read(&mut buf).await;
                    let _ = c.write_all(&head).await;
                    tokio::time::sleep(Duration::from_secs(60)).await;
                });
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test]
    async fn an_answer_that_stops_midway_runs_into_the_timeout() {
        let head = "HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{\"id\":";
        let base = stalling(head.into()).await;
        let u = Upstream::new(
            UpstreamConfig {
                timeout_secs: 1,
                ..upstream(vec![base], 0, 5).config
            },
            1,
        );
        let started = tokio::time::Instant::now();
        let (resp, _) = u.send(request(false)).await.unwrap();
        assert_eq!(resp.status.as_u16(), 200, "the head arrives in time");
        let e = u.read_whole(resp.body, started).await.unwrap_err();
        assert!(matches!(e, UpstreamError::Timeout(_, 1)), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn an_answer_over_max_response_bytes_is_refused_by_name() {
        let big = "x".repeat(3000);
        let app = axum::Router::new().route("/v1/completions", post(move || async move { big }));
        let u = Upstream::new(
            UpstreamConfig {
                max_response_bytes: 2048,
                ..upstream(vec![serve(app).await], 0, 5).config
            },
            1,
        );
        let started = tokio::time::Instant::now();
        let (resp, _) = u.send(request(false)).await.unwrap();
        let e = u.read_whole(resp.body, started).await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "upstream `m`: the answer is larger than this upstream's max_response_bytes (2048)"
        );
        // At the cap, it passes.
        let (resp, _) = u.send(request(false)).await.unwrap();
        let fits = Upstream::new(
            UpstreamConfig {
                max_response_bytes: 3000,
                ..u.config.clone()
            },
            1,
        );
        assert_eq!(
            fits.read_whole(resp.body, started).await.unwrap().len(),
            3000
        );
    }

    /// What the tests' streams end with when they stall between events.
    fn last_words(e: &UpstreamError) -> Bytes {
        Bytes::from(format!("error: {e}\n\n"))
    }

    /// An upstream whose replica answers a stream with `events` (an HTTP
    /// chunk), then sends nothing more; the body and how long its end took.
    async fn stalled_after(events: &'static str) -> (Vec<Result<Bytes, String>>, Duration) {
        let head = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n\
             transfer-encoding: chunked\r\n\r\n{:x}\r\n{events}\r\n",
            events.len()
        );
        let stalls = Upstream::new(
            UpstreamConfig {
                timeout_secs: 1,
                ..upstream(vec![stalling(head).await], 0, 5).config
            },
            1,
        );
        let (resp, _) = stalls.send(request(true)).await.unwrap();
        let mut body = stalls.until_stalled(resp.body, last_words);
        let started = Instant::now();
        let mut frames = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame
                .map(|f| f.into_data().unwrap())
                .map_err(|e| e.to_string());
            let failed = frame.is_err();
            frames.push(frame);
            if failed {
                break;
            }
        }
        (frames, started.elapsed())
    }

    #[tokio::test]
    async fn a_stream_that_stalls_ends_and_one_that_flows_does_not() {
        let stalled = "upstream `m`: the stream sent nothing for 1 s";
        // Between two events: the last words, and a clean end.
        let (frames, took) = stalled_after("data: 1\n\n").await;
        let last = format!("error: {stalled}\n\n");
        assert_eq!(frames, [Ok("data: 1\n\n".into()), Ok(last.into())]);
        assert!(
            took >= Duration::from_millis(900) && took < Duration::from_secs(5),
            "{took:?}"
        );
        // Inside an event: cut with the error.
        let (frames, _) = stalled_after("data: 1\n").await;
        assert_eq!(frames, [Ok("data: 1\n".into()), Err(stalled.into())]);

        // Four events 400 ms apart: 1.6 s in all, never 1 s without one.
        let app = axum::Router::new().route(
            "/v1/completions",
            post(|| async {
                let events = futures::stream::unfold(0, |i| async move {
                    if i == 4 {
                        return None;
                    }
                    tokio::time::sleep(Duration::from_millis(400)).await;
                    Some((Ok::<_, std::io::Error>(Bytes::from("data: x\n\n")), i + 1))
                });
                axum::body::Body::from_stream(events)
            }),
        );
        let flows = Upstream::new(
            UpstreamConfig {
                timeout_secs: 1,
                ..upstream(vec![serve(app).await], 0, 5).config
            },
            1,
        );
        let (resp, _) = flows.send(request(true)).await.unwrap();
        let body = flows.until_stalled(resp.body, last_words);
        let all = body.collect().await.unwrap();
        assert_eq!(all.to_bytes(), "data: x\n\n".repeat(4));
    }

    #[test]
    fn a_bound_of_zero_is_refused_by_name() {
        let config = upstream(vec!["http://10.0.0.5:8080".into()], 0, 5).config;
        assert_eq!(config.validate("upstreams[0]"), Ok(()));
        let zero = UpstreamConfig {
            max_response_bytes: 0,
            ..config
        };
        assert_eq!(
            zero.validate("upstreams[0]").unwrap_err(),
            "upstreams[0].max_response_bytes: must be at least 1"
        );
    }

    #[tokio::test]
    async fn a_slow_replica_runs_into_the_timeout() {
        let (slow, _) = replica(200, Duration::from_secs(30)).await;
        let mut u = upstream(vec![slow], 0, 10);
        u = Upstream::new(
            UpstreamConfig {
                timeout_secs: 1,
                ..u.config
            },
            1,
        );
        let e = u.send(request(false)).await.unwrap_err();
        assert!(matches!(e, UpstreamError::Timeout(_, 1)), "{e}");
    }
}
