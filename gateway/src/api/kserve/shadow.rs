//! Shadows for the Triton plane: a sampled copy of a repository model's
//! infer requests goes to another repository model or to a model on a remote
//! KServe v2 node over gRPC, through the one shadow runner
//! (`dispatch::mirror`). Each shadow has its own concurrency bound and
//! timeout; its outputs are compared with the primary's (argmax agreement,
//! mean absolute difference, KL of probabilities) and never reach the client.
use crate::dispatch::mirror::{Copy, ShadowConfig, ShadowPolicy};
use crate::divergence::{compare_tensors, ShadowStats};
use crate::kserve_client::Remote;
use engine::dnn::{DnnError, InferRequest, ModelRepository, Tensor};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Clone)]
enum Target {
    Local(String),
    Remote(Remote),
}

#[derive(Clone)]
pub struct Shadow {
    /// How reports and metrics name it.
    label: String,
    target: Target,
    policy: ShadowPolicy,
}

impl Shadow {
    /// A model of `repo`'s plane, as a registry shadow version.
    pub fn local(label: String, model: String, policy: ShadowPolicy) -> Self {
        Self {
            label,
            target: Target::Local(model),
            policy,
        }
    }
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
                    c.tls.as_ref(),
                    usize::MAX,
                )?),
                None => Target::Local(c.target.clone()),
            };
            by_model.entry(c.model.clone()).or_default().push(Shadow {
                label: c.label(),
                target,
                policy: c.policy(),
            });
        }
        Ok(Self {
            by_model: Arc::new(by_model),
        })
    }

    /// The configured shadows of repository model `model`.
    pub fn of(&self, model: &str) -> &[Shadow] {
        self.by_model.get(model).map_or(&[], Vec::as_slice)
    }
}

/// What shadows compare against: the primary's outputs and latency, or
/// `None` if it failed.
pub type PrimaryOutcome = Option<(Arc<Vec<Tensor>>, f64)>;

/// Sends copies of `req` to each of `route`'s shadows that samples
/// `request_id` (local ones run on `repo`), and returns where the caller
/// publishes the primary's outcome (`None` when no copy was sent). The copies
/// run on the one shadow runner: a shadow that is slow, failing or down only
/// reaches `stats`.
pub fn mirror(
    list: &[Shadow],
    route: &str,
    repo: &Arc<ModelRepository>,
    stats: &ShadowStats,
    req: &InferRequest,
    request_id: &str,
) -> Option<watch::Sender<Option<PrimaryOutcome>>> {
    if list.is_empty() {
        return None;
    }
    let (done, primary) = watch::channel::<Option<PrimaryOutcome>>(None);
    let mut sent = false;
    for s in list {
        let copy = InferRequest {
            version: None,
            ..req.clone()
        };
        let (target, repo) = (s.target.clone(), repo.clone());
        let run = async move { run(&target, &repo, copy).await.map_err(|e| e.message) };
        let (route_name, label) = (route.to_string(), s.label.clone());
        let compare = move |stats: ShadowStats,
                            (p, primary_s): (Arc<Vec<Tensor>>, f64),
                            outputs: Vec<Tensor>,
                            shadow_s: f64| async move {
            stats.record_tensors(
                &route_name,
                &label,
                compare_tensors(&p, &outputs),
                primary_s,
                shadow_s,
            );
        };
        sent |= Copy {
            stats,
            route,
            label: &s.label,
            policy: s.policy,
        }
        .launch(request_id, primary.clone(), run, compare);
    }
    sent.then_some(done)
}

async fn run(
    target: &Target,
    repo: &ModelRepository,
    mut req: InferRequest,
) -> Result<Vec<Tensor>, DnnError> {
    let resp = match target {
        Target::Local(model) => {
            req.model = model.clone();
            repo.infer(req).await
        }
        Target::Remote(r) => r.infer(&req).await,
    };
    resp.map(|r| r.outputs)
}
