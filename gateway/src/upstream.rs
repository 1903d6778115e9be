//! Remote upstreams: a route served by other nodes speaking the OpenAI API
//! (another Switchyard, vLLM, llama.cpp's server). A tower stack per
//! upstream: a timeout layer, a retry layer (only for non-streamed requests
//! that never reached a node), and a balancer service that sends each request
//! to the healthy replica with the fewest requests outstanding and opens a
//! replica's circuit after consecutive failures. Active health checks run
//! beside it.
use axum::body::Bytes;
use serde::Deserialize;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tower::{Service, ServiceBuilder, ServiceExt};

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// The model name clients send.
    pub name: String,
    /// Base URLs of the replicas, e.g. `http://10.0.0.5:8080`.
    pub endpoints: Vec<String>,
    /// The model name at the upstream (default: `name`).
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default = "default_timeout")]
    pub timeout_secs: u64,
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
}

fn default_timeout() -> u64 {
    120
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
            if reqwest::Url::parse(e).map_or(true, |u| !matches!(u.scheme(), "http" | "https")) {
                return Err(format!("{at}.endpoints[{i}]: `{e}` is not an http(s) URL"));
            }
        }
        if self.timeout_secs == 0 || self.health_interval_ms == 0 || self.failure_threshold == 0 {
            return Err(format!(
                "{at}: timeout_secs, health_interval_ms and failure_threshold must be at least 1"
            ));
        }
        Ok(())
    }
}

/// One replica and what is known of it.
struct Replica {
    base: String,
    outstanding: AtomicUsize,
    healthy: AtomicBool,
    failures: AtomicU32,
    open_until: Mutex<Option<Instant>>,
}

impl Replica {
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

/// The innermost service: least outstanding requests over available
/// replicas, circuit breaking on failures.
#[derive(Clone)]
struct Balancer {
    name: String,
    replicas: Arc<Vec<Replica>>,
    /// Where the search starts, so ties rotate over the replicas.
    next: Arc<AtomicUsize>,
    client: reqwest::Client,
    threshold: u32,
    open: Duration,
}

impl Service<ProxyRequest> for Balancer {
    type Response = (reqwest::Response, String);
    type Error = UpstreamError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, UpstreamError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), UpstreamError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: ProxyRequest) -> Self::Future {
        let me = self.clone();
        Box::pin(async move {
            let n = me.replicas.len();
            let start = me.next.fetch_add(1, Ordering::Relaxed);
            let i = (0..n)
                .map(|k| (start + k) % n)
                .filter(|&i| me.replicas[i].available())
                .min_by_key(|&i| me.replicas[i].outstanding.load(Ordering::Relaxed))
                .ok_or_else(|| UpstreamError::NoneHealthy(me.name.clone()))?;
            let r = &me.replicas[i];
            r.outstanding.fetch_add(1, Ordering::Relaxed);
            let sent = me
                .client
                .post(format!("{}{}", r.base, req.path))
                .header("content-type", "application/json")
                .body(req.body)
                .send()
                .await;
            r.outstanding.fetch_sub(1, Ordering::Relaxed);
            match sent {
                Ok(resp) if resp.status().is_server_error() && resp.status() != 503 => {
                    r.failed(me.threshold, me.open);
                    Ok((resp, r.base.clone()))
                }
                Ok(resp) => {
                    r.succeeded();
                    Ok((resp, r.base.clone()))
                }
                Err(e) => {
                    r.failed(me.threshold, me.open);
                    if e.is_connect() {
                        Err(UpstreamError::NotReached(
                            me.name.clone(),
                            format!("{}: {e}", r.base),
                        ))
                    } else {
                        Err(UpstreamError::Failed(
                            me.name.clone(),
                            format!("{}: {e}", r.base),
                        ))
                    }
                }
            }
        })
    }
}

/// Retries only what never reached a replica, and never a stream.
#[derive(Clone)]
struct RetryUnreached(usize);

impl tower::retry::Policy<ProxyRequest, (reqwest::Response, String), UpstreamError>
    for RetryUnreached
{
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        req: &mut ProxyRequest,
        result: &mut Result<(reqwest::Response, String), UpstreamError>,
    ) -> Option<Self::Future> {
        match result {
            Err(UpstreamError::NotReached(..)) if !req.stream && self.0 > 0 => {
                self.0 -= 1;
                Some(std::future::ready(()))
            }
            _ => None,
        }
    }

    fn clone_request(&mut self, req: &ProxyRequest) -> Option<ProxyRequest> {
        Some(req.clone())
    }
}

/// The stack every request goes through, built once per upstream.
type Stack = tower::timeout::Timeout<tower::retry::Retry<RetryUnreached, Balancer>>;

/// One remote upstream: its config, replicas and tower stack.
#[derive(Clone)]
pub struct Upstream {
    pub config: UpstreamConfig,
    balancer: Balancer,
    stack: Stack,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Self {
        let replicas = config
            .endpoints
            .iter()
            .map(|e| Replica {
                base: e.trim_end_matches('/').to_string(),
                outstanding: AtomicUsize::new(0),
                healthy: AtomicBool::new(true),
                failures: AtomicU32::new(0),
                open_until: Mutex::new(None),
            })
            .collect();
        let balancer = Balancer {
            name: config.name.clone(),
            replicas: Arc::new(replicas),
            next: Arc::default(),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(2))
                .build()
                .expect("an HTTP client"),
            threshold: config.failure_threshold,
            open: Duration::from_secs(config.open_secs),
        };
        let stack = ServiceBuilder::new()
            .timeout(Duration::from_secs(config.timeout_secs))
            .retry(RetryUnreached(config.retries))
            .service(balancer.clone());
        Self {
            config,
            balancer,
            stack,
        }
    }

    /// Sends the request through timeout → retry → balancer; returns the
    /// response and the replica that answered.
    pub async fn send(
        &self,
        req: ProxyRequest,
    ) -> Result<(reqwest::Response, String), UpstreamError> {
        let (name, secs) = (self.config.name.clone(), self.config.timeout_secs);
        self.stack
            .clone()
            .oneshot(req)
            .await
            .map_err(|e| match e.downcast::<UpstreamError>() {
                Ok(e) => *e,
                // The timeout layer's own error.
                Err(_) => UpstreamError::Timeout(name, secs),
            })
    }

    /// Marks replicas up or down from `health_path`, forever.
    pub async fn check_health(self) {
        let every = Duration::from_millis(self.config.health_interval_ms);
        let client = reqwest::Client::builder()
            .timeout(every.min(Duration::from_secs(2)))
            .build()
            .expect("an HTTP client");
        loop {
            for r in self.balancer.replicas.iter() {
                let up = client
                    .get(format!("{}{}", r.base, self.config.health_path))
                    .send()
                    .await
                    .is_ok_and(|resp| resp.status().is_success());
                if r.healthy.swap(up, Ordering::Relaxed) != up {
                    tracing::info!(replica = %r.base, up, "upstream health changed");
                }
                metrics::gauge!("switchyard:upstream_healthy", "upstream" => self.config.name.clone(), "replica" => r.base.clone())
                    .set(if up { 1.0 } else { 0.0 });
            }
            tokio::time::sleep(every).await;
        }
    }
}
