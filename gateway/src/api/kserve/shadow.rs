//! Shadows for the Triton plane: a sampled copy of a repository model's
//! infer requests goes to another repository model or to a model on a remote
//! KServe v2 node over gRPC. Each shadow has its own concurrency bound and
//! timeout; its outputs are compared with the primary's (argmax agreement,
//! mean absolute difference, KL of probabilities) and never reach the client.
use super::grpc::Remote;
use crate::divergence::{compare_tensors, ShadowStats};
use crate::sticky_hash::bucket;
use engine::dnn::{DnnError, InferRequest, InferResponse, ModelRepository, Tensor};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The repository model whose requests are copied.
    pub model: String,
    /// The model that gets the copies: in this repository, or at `endpoint`.
    pub target: String,
    /// A remote KServe v2 gRPC node, e.g. `grpc://10.0.0.7:8001`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// Share of requests copied, by the hash of the request id.
    #[serde(default = "default_sample")]
    pub sample_percent: f64,
    /// Copies in flight at most; beyond it a copy is skipped (and counted).
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// A copy that takes longer counts as a shadow error.
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_sample() -> f64 {
    100.0
}
fn default_in_flight() -> usize {
    4
}
fn default_timeout_ms() -> u64 {
    5000
}

impl ShadowConfig {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if !(0.0..=100.0).contains(&self.sample_percent) {
            return Err(format!("{at}.sample_percent: must be between 0 and 100"));
        }
        if self.max_in_flight == 0 || self.timeout_ms == 0 {
            return Err(format!(
                "{at}: max_in_flight and timeout_ms must be at least 1"
            ));
        }
        if self.endpoint.is_none() && self.target == self.model {
            return Err(format!(
                "{at}.target: `{}` would shadow itself; name another model or an endpoint",
                self.target
            ));
        }
        if let Some(e) = &self.endpoint {
            Remote::endpoint(e).map_err(|e| format!("{at}.endpoint: {e}"))?;
        }
        Ok(())
    }

    /// How reports and metrics name this shadow: the target, with its node.
    pub fn label(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("{e}/{}", self.target),
            None => self.target.clone(),
        }
    }
}

#[derive(Clone)]
enum Target {
    Local(String),
    Remote(Remote),
}

#[derive(Clone)]
pub struct Shadow {
    config: ShadowConfig,
    label: String,
    target: Target,
}

/// The shadows of each repository model, from the config.
#[derive(Clone, Default)]
pub struct Shadows {
    by_model: Arc<HashMap<String, Vec<Shadow>>>,
}

impl Shadows {
    /// Builds the targets; call within the runtime (remote channels connect lazily).
    pub fn new(configs: &[ShadowConfig]) -> Result<Self, String> {
        let mut by_model: HashMap<String, Vec<Shadow>> = HashMap::new();
        for c in configs {
            let target = match &c.endpoint {
                Some(e) => Target::Remote(Remote::new(
                    e,
                    &c.target,
                    Duration::from_millis(c.timeout_ms),
                )?),
                None => Target::Local(c.target.clone()),
            };
            by_model.entry(c.model.clone()).or_default().push(Shadow {
                label: c.label(),
                config: c.clone(),
                target,
            });
        }
        Ok(Self {
            by_model: Arc::new(by_model),
        })
    }
}

/// What shadows compare against: the primary's outputs and latency, or
/// `None` if it failed.
pub type PrimaryOutcome = Option<(Arc<Vec<Tensor>>, f64)>;

/// Sends copies of `req` to the shadows of its model that sample it, and
/// returns where the caller publishes the primary's outcome (`None` when no
/// copy was sent). The copies run as their own tasks: a shadow that is
/// slow, failing or down only reaches `stats`.
pub fn mirror(
    shadows: &Shadows,
    repo: &Arc<ModelRepository>,
    stats: &ShadowStats,
    req: &InferRequest,
) -> Option<watch::Sender<Option<PrimaryOutcome>>> {
    let list = shadows.by_model.get(&req.model)?;
    let unit = if req.id.is_empty() {
        uuid::Uuid::new_v4().to_string()
    } else {
        req.id.clone()
    };
    let (done, primary) = watch::channel::<Option<PrimaryOutcome>>(None);
    let mut sent = false;
    for s in list {
        let seed = format!("{}/shadow/{}", req.model, s.label);
        if f64::from(bucket(&seed, &unit)) >= s.config.sample_percent * 100.0 {
            continue;
        }
        let (route, label) = (req.model.clone(), s.label.clone());
        let Some(permit) = stats.permit(&route, &label, s.config.max_in_flight) else {
            stats.skipped(&route, &label);
            continue;
        };
        metrics::counter!("switchyard:shadow_requests", "route" => route.clone(), "version" => label.clone())
            .increment(1);
        sent = true;
        let copy = InferRequest {
            version: None,
            ..req.clone()
        };
        let (target, repo, stats, mut primary) = (
            s.target.clone(),
            repo.clone(),
            stats.clone(),
            primary.clone(),
        );
        let timeout = Duration::from_millis(s.config.timeout_ms);
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let answer = tokio::time::timeout(timeout, run(&target, &repo, copy)).await;
            let shadow_s = started.elapsed().as_secs_f64();
            let outputs = match answer {
                Ok(Ok(r)) => r.outputs,
                Ok(Err(e)) => {
                    tracing::debug!(%route, shadow = %label, error = %e.message, "shadow failed");
                    return stats.error(&route, &label);
                }
                Err(_) => return stats.error(&route, &label),
            };
            // Nothing to compare with if the primary failed.
            let Ok(Some((p, primary_s))) = primary
                .wait_for(Option::is_some)
                .await
                .map(|v| v.clone().flatten())
            else {
                return;
            };
            stats.record_tensors(
                &route,
                &label,
                compare_tensors(&p, &outputs),
                primary_s,
                shadow_s,
            );
        });
    }
    sent.then_some(done)
}

async fn run(
    target: &Target,
    repo: &ModelRepository,
    mut req: InferRequest,
) -> Result<InferResponse, DnnError> {
    match target {
        Target::Local(model) => {
            req.model = model.clone();
            repo.infer(req).await
        }
        Target::Remote(r) => r.infer(&req).await,
    }
}
