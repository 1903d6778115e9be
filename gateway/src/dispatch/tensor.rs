//! Tree and DNN models of the registry: a public name resolves to one of
//! its versions in the repository plane, by the same sticky hash and arms
//! as an LLM route, with its shadows; outcomes reach the version statistics
//! that rollout policies judge.
use super::mirror::ShadowPolicy;
use super::routing::{Arm, Route, RouteTable, TensorDeployment};
use super::{model_of, sticky_hash, Served};
use std::time::Instant;

/// Where one tensor request goes.
pub struct TensorTarget {
    /// The public name.
    pub route: String,
    pub deployment: TensorDeployment,
    pub arm: Arm,
    /// Each shadow's label (its version), plane model and policy.
    pub shadows: Vec<(String, String, ShadowPolicy)>,
    pub started: Instant,
}

impl TensorTarget {
    pub fn served(&self) -> Served {
        Served {
            version: Some(self.deployment.version),
            arm: self.arm.clone(),
            experiment: None,
        }
    }
}

/// Resolves `name` (a route, or `model@version`) to a version of a
/// registry tree or DNN model, or `None` when the registry serves no such
/// model. The unit picks a canary or A/B candidate by its share.
pub fn resolve_tensor(table: &RouteTable, name: &str, unit: &str) -> Option<TensorTarget> {
    let started = Instant::now();
    let route_name = model_of(name);
    let route: &Route<TensorDeployment> = table.tensor_routes.get(route_name)?;
    let (deployment, arm, shadows) = if let Some((_, v)) = name.rsplit_once('@') {
        let v: u32 = v.parse().ok()?;
        let d = route.deployments().find(|d| d.version == v)?;
        (d.clone(), Arm::Pinned, vec![])
    } else {
        let (d, arm) = route.pick(sticky_hash::bucket(&format!("{name}/rollout"), unit));
        let shadows = route
            .shadows
            .iter()
            .map(|s| {
                (
                    s.deployment.version.to_string(),
                    s.deployment.model.clone(),
                    s.policy,
                )
            })
            .collect();
        (d.clone(), arm, shadows)
    };
    metrics::counter!("switchyard:route_requests_total", "route" => route_name.to_string(),
        "version" => deployment.version.to_string(), "arm" => arm.as_str().to_string())
    .increment(1);
    Some(TensorTarget {
        route: route_name.to_string(),
        deployment,
        arm,
        shadows,
        started,
    })
}
