//! Prompt experiments from YAML: a public route name splits its users into
//! arms (a deployment plus a prompt variant) by sticky hash; experiments in
//! one layer are mutually exclusive. The file is validated on load and hot
//! reloaded by `control::experiments_file` (on change or SIGHUP); a bad file
//! keeps the old table.
use crate::dispatch::mirror::ShadowPolicy;
use crate::dispatch::sticky_hash::{bucket, pick, BUCKETS};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::Arc;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct ExperimentsFile {
    #[serde(default)]
    experiments: Vec<ExperimentSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExperimentSpec {
    pub name: String,
    /// The model name clients send.
    pub route: String,
    /// `header:NAME`, `user` (the OpenAI field) or `body:FIELD`.
    pub unit: Unit,
    /// Experiments in one layer never share a unit.
    #[serde(default)]
    pub layer: Option<String>,
    /// Percent of the layer's units enrolled (default 100).
    #[serde(default = "hundred")]
    pub traffic: f64,
    pub arms: Vec<ArmSpec>,
    /// What the team reads in the summary: `latency`, `ttft`,
    /// `output_tokens`, `errors`, `feedback` (all are recorded).
    #[serde(default)]
    pub metrics: Vec<String>,
}

fn hundred() -> f64 {
    100.0
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmSpec {
    pub name: String,
    /// The arm's share among the served arms; a shadow arm takes none.
    #[serde(default)]
    pub weight: f64,
    /// `model` (its primary) or `model@version`.
    pub deployment: String,
    #[serde(default)]
    pub prompt: PromptVariant,
    /// A shadow arm: it gets a copy of the route's sampled requests, its
    /// answer is compared with the served arm's and never reaches a client.
    #[serde(default)]
    pub shadow: Option<ShadowPolicy>,
}

/// What an arm changes in the request: a system prompt, and sampling
/// defaults that apply where the request does not set its own.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PromptVariant {
    #[serde(default)]
    pub system: Option<String>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f32>,
    #[serde(default)]
    pub max_tokens: Option<i64>,
}

/// Where the assignment unit comes from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "String")]
pub enum Unit {
    Header(String),
    User,
    BodyField(String),
}

impl TryFrom<String> for Unit {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        if s == "user" {
            Ok(Unit::User)
        } else if let Some(h) = s.strip_prefix("header:").filter(|h| !h.is_empty()) {
            Ok(Unit::Header(h.to_ascii_lowercase()))
        } else if let Some(f) = s.strip_prefix("body:").filter(|f| !f.is_empty()) {
            Ok(Unit::BodyField(f.to_string()))
        } else {
            Err(format!(
                "unit `{s}`: use `header:NAME`, `user` or `body:FIELD`"
            ))
        }
    }
}

/// One experiment, ready to assign.
#[derive(Debug)]
pub struct Experiment {
    pub spec: ExperimentSpec,
    /// The slice `[start, end)` of its layer's buckets it owns.
    range: (u32, u32),
    /// The arms' weights, in order.
    weights: Vec<f64>,
    layer_seed: String,
}

/// The outcome for one request.
#[derive(Debug, Clone)]
pub struct Assignment {
    pub experiment: Arc<Experiment>,
    /// `None`: outside the experiment's traffic (served by the first arm's
    /// deployment without its prompt, counted as `holdout`).
    pub arm: Option<usize>,
    /// No unit was present, so the assignment was random.
    pub random: bool,
}

impl Assignment {
    pub fn arm_name(&self) -> &str {
        self.arm
            .map_or("holdout", |i| self.experiment.spec.arms[i].name.as_str())
    }

    pub fn deployment(&self) -> &str {
        &self.experiment.spec.arms[self.arm.unwrap_or(0)].deployment
    }

    /// The experiment's shadow arms.
    pub fn shadows(&self) -> impl Iterator<Item = &ArmSpec> {
        self.experiment
            .spec
            .arms
            .iter()
            .filter(|a| a.shadow.is_some())
    }

    pub fn prompt(&self) -> PromptVariant {
        self.arm
            .map(|i| self.experiment.spec.arms[i].prompt.clone())
            .unwrap_or_default()
    }
}

impl Experiment {
    /// The unit as this experiment reads it from the request; the body is
    /// parsed only for a `body:` unit.
    pub fn unit(
        &self,
        headers: &axum::http::HeaderMap,
        user: Option<&str>,
        body: &[u8],
    ) -> Option<String> {
        match &self.spec.unit {
            Unit::Header(h) => headers
                .get(h.as_str())
                .and_then(|v| v.to_str().ok())
                .map(str::to_string),
            Unit::User => user.map(str::to_string),
            Unit::BodyField(f) => serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|b| {
                    b.get(f).map(|v| match v {
                        serde_json::Value::String(s) => s.clone(),
                        other => other.to_string(),
                    })
                }),
        }
        .filter(|u| !u.is_empty())
    }

    fn enrolled(&self, unit: &str) -> bool {
        let b = bucket(&self.layer_seed, unit);
        self.range.0 <= b && b < self.range.1
    }

    fn arm_of(&self, unit: &str) -> usize {
        pick(&self.weights, bucket(&self.spec.name, unit)).unwrap_or(0)
    }
}

/// The experiments in force, by route.
#[derive(Debug, Default)]
pub struct ExperimentTable {
    by_route: HashMap<String, Vec<Arc<Experiment>>>,
    pub(crate) by_name: HashMap<String, Arc<Experiment>>,
}

impl ExperimentTable {
    /// Parses and validates a file; errors name the key, and the line where
    /// the YAML parser or the experiment's `name:` line can tell.
    pub fn parse(text: &str) -> Result<Self, String> {
        let file: ExperimentsFile = serde_yaml::from_str(text).map_err(|e| e.to_string())?;
        let line_of = |name: &str| {
            text.lines()
                .position(|l| {
                    let l = l.trim().trim_start_matches("- ").trim();
                    l == format!("name: {name}") || l == format!("name: \"{name}\"")
                })
                .map_or(String::new(), |i| {
                    format!(" (experiment at line {})", i + 1)
                })
        };
        let mut table = ExperimentTable::default();
        let mut layer_used: HashMap<String, u32> = HashMap::new();
        for (i, spec) in file.experiments.into_iter().enumerate() {
            let at = |k: &str| format!("experiments[{i}].{k}");
            let err = |k: &str, m: String| format!("{}: {m}{}", at(k), line_of(&spec.name));
            if spec.name.trim().is_empty() || table.by_name.contains_key(&spec.name) {
                return Err(err(
                    "name",
                    format!("`{}` is empty or used twice", spec.name),
                ));
            }
            if spec.arms.is_empty() {
                return Err(err("arms", "give at least one arm".into()));
            }
            let mut names = std::collections::HashSet::new();
            for (j, a) in spec.arms.iter().enumerate() {
                if !names.insert(&a.name) || a.name == "holdout" {
                    return Err(err(
                        &format!("arms[{j}].name"),
                        format!("`{}` is used twice or reserved", a.name),
                    ));
                }
                if !(a.weight.is_finite() && a.weight >= 0.0) {
                    return Err(err(
                        &format!("arms[{j}].weight"),
                        format!("must be a number ≥ 0, got {}", a.weight),
                    ));
                }
                if a.deployment.trim().is_empty() {
                    return Err(err(
                        &format!("arms[{j}].deployment"),
                        "name a model or model@version".into(),
                    ));
                }
                if let Some(policy) = &a.shadow {
                    if j == 0 {
                        return Err(err(
                            &format!("arms[{j}].shadow"),
                            "the first arm serves the holdout; put the shadow arm after it".into(),
                        ));
                    }
                    if a.weight != 0.0 {
                        return Err(err(
                            &format!("arms[{j}].weight"),
                            "a shadow arm serves no one; leave its weight out".into(),
                        ));
                    }
                    if a.prompt.temperature.is_some()
                        || a.prompt.top_p.is_some()
                        || a.prompt.max_tokens.is_some()
                    {
                        return Err(err(
                            &format!("arms[{j}].prompt"),
                            "a shadow arm runs the served request's sampling; it takes only a \
                             `system` prompt"
                                .into(),
                        ));
                    }
                    policy.validate(&at(&format!("arms[{j}].shadow")))?;
                }
                if let Some(t) = a.prompt.temperature.filter(|t| !(0.0..=2.0).contains(t)) {
                    return Err(err(
                        &format!("arms[{j}].prompt.temperature"),
                        format!("must be within 0 and 2, got {t}"),
                    ));
                }
            }
            const METRICS: [&str; 5] = ["latency", "ttft", "output_tokens", "errors", "feedback"];
            if let Some(m) = spec.metrics.iter().find(|m| !METRICS.contains(&m.as_str())) {
                return Err(err(
                    "metrics",
                    format!("`{m}` is not one of {}", METRICS.join(", ")),
                ));
            }
            if spec.arms.iter().map(|a| a.weight).sum::<f64>() <= 0.0 {
                return Err(err("arms", "the weights add up to 0".into()));
            }
            if !(spec.traffic > 0.0 && spec.traffic <= 100.0) {
                return Err(err(
                    "traffic",
                    format!("must be above 0 and at most 100, got {}", spec.traffic),
                ));
            }
            let layer = spec
                .layer
                .clone()
                .unwrap_or_else(|| format!("experiment:{}", spec.name));
            let start = layer_used.get(&layer).copied().unwrap_or(0);
            let end = start + (spec.traffic / 100.0 * f64::from(BUCKETS)).round() as u32;
            if end > BUCKETS {
                return Err(err(
                    "traffic",
                    format!(
                    "layer `{layer}` is over-allocated: its experiments take more than 100% of it"
                ),
                ));
            }
            layer_used.insert(layer.clone(), end);
            let others = table
                .by_route
                .get(&spec.route)
                .map_or(&[][..], Vec::as_slice);
            if let Some(o) = others
                .iter()
                .find(|o| o.layer_seed != format!("layer:{layer}"))
            {
                return Err(err("layer", format!(
                    "experiment `{}` is on route `{}` too; experiments sharing a route must share a layer",
                    o.spec.name, spec.route
                )));
            }
            let exp = Arc::new(Experiment {
                range: (start, end),
                weights: spec.arms.iter().map(|a| a.weight).collect(),
                layer_seed: format!("layer:{layer}"),
                spec,
            });
            table.by_name.insert(exp.spec.name.clone(), exp.clone());
            table
                .by_route
                .entry(exp.spec.route.clone())
                .or_default()
                .push(exp);
        }
        Ok(table)
    }

    pub fn get(&self, name: &str) -> Option<Arc<Experiment>> {
        self.by_name.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<_> = self.by_name.keys().cloned().collect();
        v.sort();
        v
    }

    /// The experiments on `route` (all in one layer).
    pub fn on_route(&self, route: &str) -> &[Arc<Experiment>] {
        self.by_route.get(route).map_or(&[], Vec::as_slice)
    }

    /// Assigns a request on `route`; `unit_of` reads the unit per experiment.
    pub fn assign(
        &self,
        route: &str,
        unit_of: impl Fn(&Experiment) -> Option<String>,
    ) -> Option<Assignment> {
        let exps = self.by_route.get(route)?;
        let unit = unit_of(&exps[0]);
        let random = unit.is_none();
        let unit = unit.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        for e in exps {
            if e.enrolled(&unit) {
                return Some(Assignment {
                    experiment: e.clone(),
                    arm: Some(e.arm_of(&unit)),
                    random,
                });
            }
        }
        Some(Assignment {
            experiment: exps[0].clone(),
            arm: None,
            random,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The example shipped in `configs/`.
    const TWO_ARMS: &str = include_str!("../../../configs/experiments.yaml");

    fn arm_of(t: &ExperimentTable, route: &str, user: &str) -> String {
        t.assign(route, |_| Some(user.to_string()))
            .map(|a| format!("{}/{}", a.experiment.spec.name, a.arm_name()))
            .unwrap()
    }

    #[test]
    fn the_issue_example_parses_and_users_stick() {
        let t = ExperimentTable::parse(TWO_ARMS).unwrap();
        let a = t.assign("support-bot", |_| Some("user-1".into())).unwrap();
        assert!(!a.random);
        assert_eq!(a.deployment(), "smollm2-135m-instruct");
        // Sticky across processes: a table parsed anew assigns every user
        // alike (no seed drawn at start), and the 50/50 split holds.
        let again = ExperimentTable::parse(TWO_ARMS).unwrap();
        let mut concise = 0;
        for i in 0..2000 {
            let u = format!("user-{i}");
            let arm = arm_of(&t, "support-bot", &u);
            assert_eq!(arm, arm_of(&again, "support-bot", &u), "{u}");
            concise += usize::from(arm.ends_with("/concise"));
        }
        // Binomial(2000, 0.5): the standard deviation is 22.4; 5 of them.
        assert!((1000 - 112..=1000 + 112).contains(&concise), "{concise}");
        assert!(t.assign("other-route", |_| None).is_none());
        assert!(t.assign("support-bot", |_| None).unwrap().random);
    }

    #[test]
    fn errors_name_the_key_and_line() {
        let line = |needle: &str| TWO_ARMS.lines().position(|l| l.contains(needle)).unwrap() + 1;
        let name_line = format!("line {}", line("name: support-tone"));
        // The second arm's weight made negative.
        let (head, tail) = TWO_ARMS.split_at(TWO_ARMS.rfind("weight: 50").unwrap());
        let bad = format!("{head}{}", tail.replacen("weight: 50", "weight: -5", 1));
        let e = ExperimentTable::parse(&bad).unwrap_err();
        assert!(
            e.starts_with("experiments[0].arms[1].weight") && e.contains(&name_line),
            "{e}"
        );
        let e =
            ExperimentTable::parse(&TWO_ARMS.replace("header:x-user-id", "cookie:x")).unwrap_err();
        assert!(
            e.contains("unit `cookie:x`") && e.contains(&name_line),
            "{e}"
        );
        let e = ExperimentTable::parse(&TWO_ARMS.replace("metrics:", "metrix:")).unwrap_err();
        let metrics_line = format!("line {}", line("metrics:"));
        assert!(e.contains("metrix") && e.contains(&metrics_line), "{e}");
    }

    fn layered(traffic_a: u32, traffic_b: u32) -> ExperimentTable {
        ExperimentTable::parse(&format!(
            "experiments:
  - {{ name: a, route: r, unit: user, layer: l, traffic: {traffic_a},
      arms: [{{ name: x, weight: 1, deployment: m }}, {{ name: y, weight: 1, deployment: m }}] }}
  - {{ name: b, route: r, unit: user, layer: l, traffic: {traffic_b},
      arms: [{{ name: x, weight: 1, deployment: m }}] }}
"
        ))
        .unwrap()
    }

    #[test]
    fn layers_never_overlap_and_ramps_only_move_who_they_should() {
        let t = layered(30, 50);
        let (mut a, mut b, mut hold) = (0i32, 0i32, 0i32);
        for i in 0..100_000 {
            let u = format!("u{i}");
            match arm_of(&t, "r", &u).as_str() {
                s if s.ends_with("/holdout") => hold += 1,
                s if s.starts_with("a/") => a += 1,
                "b/x" => b += 1,
                other => panic!("{other}"),
            }
        }
        for (got, want) in [(a, 30_000), (b, 50_000), (hold, 20_000)] {
            assert!((got - want).abs() < 1_000, "{a} {b} {hold}");
        }
        // Ramping `b` from 50% to 70% moves holdout users into `b` only.
        let ramped = layered(30, 70);
        for i in 0..20_000 {
            let u = format!("u{i}");
            let (before, after) = (arm_of(&t, "r", &u), arm_of(&ramped, "r", &u));
            if before != after {
                assert!(
                    before.ends_with("holdout") && after == "b/x",
                    "{u}: {before} → {after}"
                );
            }
        }
        let e = ExperimentTable::parse(
            "experiments:
  - { name: a, route: r, unit: user, layer: l, traffic: 60, arms: [{ name: x, weight: 1, deployment: m }] }
  - { name: b, route: s, unit: user, layer: l, traffic: 60, arms: [{ name: x, weight: 1, deployment: m }] }
",
        )
        .unwrap_err();
        assert!(
            e.starts_with("experiments[1].traffic") && e.contains("over-allocated"),
            "{e}"
        );
    }
}
