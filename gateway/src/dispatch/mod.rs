//! The one dispatch layer every front calls (OpenAI, KServe HTTP and gRPC,
//! `generate` / `generate_stream`): a public name is resolved once, from
//! one snapshot of the route table, to a target and an arm; shadows get
//! their copies and the outcome is recorded (per version, per experiment
//! arm, per shadow) the same way whichever protocol carried the request.
//! The fronts only parse, call [`resolve_llm`] and [`llm::LlmTarget::start`],
//! and render.
pub mod experiments;
pub mod llm;
pub mod log;
pub mod mirror;
pub mod outcomes;
pub mod routing;
pub mod sticky_hash;
pub mod tensor;

use crate::dispatch::experiments::Experiment;
use crate::divergence::ShadowStats;
use crate::experiment_stats::ExperimentStats;
use llm::{LlmTarget, TextShadow};
use outcomes::VersionOutcomes;
use routing::{Arm, RouteTable};
use std::time::Instant;

/// Where outcomes go: experiment arms, route versions (for rollout
/// policies) and shadows.
#[derive(Clone, Default)]
pub struct Recorders {
    pub experiments: ExperimentStats,
    pub versions: VersionOutcomes,
    /// Triton's statistics of LLM routes (the KServe statistics extension).
    pub llm: outcomes::LlmStatistics,
    pub shadows: ShadowStats,
    /// The request log, when the registry keeps one.
    pub log: Option<log::RequestLog>,
}

impl Recorders {
    /// The request log, if it samples request `request_id` of `route`.
    pub fn logged(&self, route: &str, request_id: &str) -> Option<log::RequestLog> {
        self.log.clone().filter(|l| l.samples(route, request_id))
    }
}

/// Why a name that exists cannot take the request now.
#[derive(Debug, PartialEq)]
pub struct Unavailable(pub String);

/// The model a deployment name (`model` or `model@version`) belongs to.
fn model_of(deployment: &str) -> &str {
    deployment.rsplit_once('@').map_or(deployment, |(m, _)| m)
}

/// Resolves `name` (a route, or `model@version`) to the LLM deployment that
/// serves this request, or `None` when no LLM has that name.
///
/// - `model@version` is that version, with no shadows ([`Arm::Pinned`]).
/// - A route with prompt experiments assigns the request to an arm by the
///   experiment's unit (`experiment_unit`); an arm naming a route is served
///   as that route serves (canary share included); the route's shadows and
///   the experiment's shadow arms still get their copies.
/// - Any other route picks its canary or A/B candidate by the sticky hash
///   of `unit` (a random one when the request has none).
pub fn resolve_llm(
    table: &RouteTable,
    name: &str,
    unit: Option<&str>,
    experiment_unit: impl Fn(&Experiment) -> Option<String>,
) -> Result<Option<LlmTarget>, Unavailable> {
    let started = Instant::now();
    let route_name = model_of(name);
    let route = table.routes.get(route_name);
    let route_shadows = || -> Vec<TextShadow> {
        route
            .map(|r| r.shadows.iter().map(TextShadow::of_route).collect())
            .unwrap_or_default()
    };
    let target = |model: &str, d: (engine::llm::LlmEngine, Option<u32>), arm, shadows| {
        metrics::counter!("switchyard:route_requests_total", "route" => route_name.to_string(),
            "version" => d.1.map_or_else(|| "static".to_string(), |v| v.to_string()), "arm" => Arm::as_str(&arm).to_string())
        .increment(1);
        LlmTarget {
            route: route_name.to_string(),
            model: model.to_string(),
            engine: d.0,
            version: d.1,
            arm,
            experiment: None,
            shadows,
            started,
            budget: None,
        }
    };
    if name.contains('@') {
        return Ok(table
            .deployment(name)
            .map(|d| target(route_name, d, Arm::Pinned, vec![])));
    }
    if !table.experiments.on_route(name).is_empty() {
        let a = table
            .experiments
            .assign(name, &experiment_unit)
            .expect("the route has experiments");
        // An arm that names a route (not `model@version`) is served as that
        // route serves: its canary or A/B candidate gets its share of the
        // arm's units too, so a rollout policy sees experiment traffic.
        let picked = table.routes.get(a.deployment()).map(|r| {
            let unit =
                experiment_unit(&a.experiment).unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            let (d, _) = r.pick(sticky_hash::bucket(
                &format!("{}/rollout", a.deployment()),
                &unit,
            ));
            (d.engine.clone(), d.version)
        });
        let served = picked
            .or_else(|| table.deployment(a.deployment()))
            .ok_or_else(|| {
                Unavailable(format!(
                    "experiment `{}` arm `{}`: deployment `{}` is not loaded",
                    a.experiment.spec.name,
                    a.arm_name(),
                    a.deployment()
                ))
            })?;
        let mut shadows = route_shadows();
        for arm in a.shadows() {
            match table.deployment(&arm.deployment) {
                Some((engine, _)) => shadows.push(TextShadow {
                    engine,
                    label: format!("{}/{}", a.experiment.spec.name, arm.name),
                    policy: arm.shadow.unwrap_or_default(),
                    system: arm.prompt.system.clone(),
                }),
                None => tracing::warn!(experiment = %a.experiment.spec.name, arm = %arm.name,
                    deployment = %arm.deployment, "the shadow arm's deployment is not loaded"),
            }
        }
        let arm = Arm::Experiment(a.arm_name().to_string());
        let mut t = target(model_of(a.deployment()), served, arm, shadows);
        t.experiment = Some(a);
        return Ok(Some(t));
    }
    let Some(route) = route else {
        return Ok(None);
    };
    let unit = unit.map_or_else(|| uuid::Uuid::new_v4().to_string(), str::to_string);
    let (d, arm) = route.pick(sticky_hash::bucket(&format!("{name}/rollout"), &unit));
    Ok(Some(target(
        name,
        (d.engine.clone(), d.version),
        arm,
        route_shadows(),
    )))
}

/// The header that carries a rollout unit on fronts without a `user` field.
pub const UNIT_HEADER: &str = "x-switchyard-unit";

/// The rollout unit of a request to `name`: the header its model's record
/// names (`rollout_unit: header:NAME`), else `fallback` (the front's own:
/// OpenAI's `user`), else [`UNIT_HEADER`].
pub fn unit(
    table: &RouteTable,
    name: &str,
    headers: &axum::http::HeaderMap,
    fallback: Option<String>,
) -> Option<String> {
    let route = model_of(name);
    let named = table
        .routes
        .get(route)
        .and_then(|r| r.unit_header.as_deref())
        .or_else(|| {
            table
                .tensor_routes
                .get(route)
                .and_then(|r| r.unit_header.as_deref())
        });
    named
        .and_then(|h| headers.get(h))
        .and_then(|v| v.to_str().ok())
        .filter(|u| !u.is_empty())
        .map(str::to_string)
        .or(fallback)
        .or_else(|| header_unit(headers))
}

/// The rollout unit a request names in [`UNIT_HEADER`], if any.
pub fn header_unit(headers: &axum::http::HeaderMap) -> Option<String> {
    headers
        .get(UNIT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|u| !u.is_empty())
        .map(str::to_string)
}

/// Longest client request id kept; a longer one is replaced.
const MAX_REQUEST_ID: usize = 128;

/// The client's `x-request-id` when it is a usable one (visible ASCII, at
/// most 128 bytes), else a new `{prefix}-{uuid}`.
pub fn request_id(headers: &axum::http::HeaderMap, prefix: &str) -> String {
    headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|id| {
            !id.is_empty() && id.len() <= MAX_REQUEST_ID && id.bytes().all(|b| b.is_ascii_graphic())
        })
        .map_or_else(
            || format!("{prefix}-{}", uuid::Uuid::new_v4().simple()),
            str::to_string,
        )
}

/// What served a request, as responses name it.
#[derive(Clone, Debug, PartialEq)]
pub struct Served {
    pub version: Option<u32>,
    pub arm: Arm,
    pub experiment: Option<String>,
}

/// Names what served the request in HTTP response headers: the version,
/// the arm, the experiment and the request id.
pub fn headers(h: &mut axum::http::HeaderMap, t: &Served, request_id: &str) {
    use axum::http::HeaderValue;
    let value = |v: &str| HeaderValue::from_str(v).unwrap_or(HeaderValue::from_static("-"));
    if let Some(v) = t.version {
        h.insert("x-switchyard-model-version", v.into());
    }
    h.insert("x-switchyard-arm", value(t.arm.as_str()));
    h.insert("x-request-id", value(request_id));
    if let Some(e) = &t.experiment {
        h.insert("x-switchyard-experiment", value(e));
    }
}

#[cfg(test)]
mod tests;
