//! The promotion state machine and its gates: which edges exist, which
//! offline metrics and approvals each tier demands, and the irreversible
//! override. Pure functions; the registry feeds them stored records.
use super::records::{ModelSpec, RollbackClass, Tier, VersionSpec};
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Registered,
    OfflinePassed,
    Shadow,
    Canary,
    AbTest,
    Promoted,
    Deprecated,
    Archived,
    Failed,
    RolledBack,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Registered => "registered",
            State::OfflinePassed => "offline_passed",
            State::Shadow => "shadow",
            State::Canary => "canary",
            State::AbTest => "ab_test",
            State::Promoted => "promoted",
            State::Deprecated => "deprecated",
            State::Archived => "archived",
            State::Failed => "failed",
            State::RolledBack => "rolled_back",
        }
    }

    /// A version in one of these states is served (primary, arm or shadow).
    pub fn is_live(self) -> bool {
        matches!(
            self,
            State::Shadow | State::Canary | State::AbTest | State::Promoted
        )
    }

    /// Steps up the chain toward production, which tiers guard.
    pub fn is_forward(self) -> bool {
        matches!(
            self,
            State::OfflinePassed | State::Shadow | State::Canary | State::AbTest | State::Promoted
        )
    }

    /// A candidate taking live traffic beside the promoted version.
    pub fn takes_traffic_share(self) -> bool {
        matches!(self, State::Canary | State::AbTest)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Edges a transition request may take. Rollback (to `rolled_back`, and a
/// deprecated version back to `promoted`) has its own operation.
pub fn next_states(from: State) -> &'static [State] {
    use State::*;
    match from {
        Registered => &[OfflinePassed, Failed, Archived],
        OfflinePassed => &[Shadow, Promoted, Failed, Archived],
        Shadow => &[Canary, Failed],
        Canary => &[AbTest, Promoted, Failed],
        AbTest => &[Promoted, Failed],
        Promoted => &[Deprecated],
        Deprecated | Failed | RolledBack => &[Archived],
        Archived => &[],
    }
}

/// One gate's verdict, as the API shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateResult {
    pub gate: String,
    pub passed: bool,
    pub detail: String,
}

impl GateResult {
    fn new(gate: &str, passed: bool, detail: impl Into<String>) -> Self {
        Self {
            gate: gate.into(),
            passed,
            detail: detail.into(),
        }
    }
}

/// What a transition is checked against.
pub struct TransitionCheck<'a> {
    pub model: &'a ModelSpec,
    pub version: &'a VersionSpec,
    pub from: State,
    pub to: State,
    /// The currently promoted version's metrics, for slice regressions.
    pub promoted: Option<&'a VersionSpec>,
    /// Whether any version of the model was ever promoted.
    pub ever_promoted: bool,
    /// Another version already taking a canary or A/B share.
    pub other_candidate: Option<u32>,
    /// Distinct approvers who approved this version for `to`.
    pub approvers: &'a BTreeSet<String>,
    /// Who overrides the irreversible block, and why.
    pub override_by: Option<(&'a str, &'a str)>,
    pub traffic_percent: Option<f64>,
}

/// Runs every gate that applies; the transition may proceed only if all pass.
pub fn check(c: &TransitionCheck) -> Vec<GateResult> {
    let mut out = Vec::new();
    let allowed = next_states(c.from);
    let skip_allowed = c.to != State::Promoted
        || c.from != State::OfflinePassed
        || c.model.tier == Tier::L0
        || !c.ever_promoted;
    out.push(GateResult::new(
        "state_machine",
        allowed.contains(&c.to) && skip_allowed,
        if !allowed.contains(&c.to) {
            format!(
                "{} → {} is not an edge; from {} a version may go to: {}",
                c.from,
                c.to,
                c.from,
                list(allowed.iter().map(|s| s.as_str()))
            )
        } else if !skip_allowed {
            format!(
                "only an L0 model (or a first version) may skip from offline_passed to promoted; this one is {:?}: go through shadow and canary",
                c.model.tier
            )
        } else {
            format!("{} → {}", c.from, c.to)
        },
    ));
    if c.to == State::OfflinePassed {
        out.push(offline_metrics(c.model, c.version));
        out.push(slice_regression(c.model, c.version, c.promoted));
    }
    if c.to.takes_traffic_share() {
        let p = c.traffic_percent.unwrap_or(f64::NAN);
        out.push(GateResult::new(
            "traffic_percent",
            p > 0.0 && p < 100.0,
            format!("{p}% of traffic (must be above 0 and below 100)"),
        ));
        if let Some(other) = c.other_candidate {
            out.push(GateResult::new(
                "one_candidate",
                false,
                format!("version {other} already takes a canary or A/B share; finish or roll it back first"),
            ));
        }
    }
    if let Some(g) = approvals(c) {
        out.push(g);
    }
    if c.to == State::Promoted
        && c.model.rollback_class == RollbackClass::Irreversible
        && c.model.tier >= Tier::L2
    {
        out.push(match c.override_by {
            Some((who, why)) => GateResult::new(
                "irreversible",
                true,
                format!("overridden by {who}: {why}"),
            ),
            None => GateResult::new(
                "irreversible",
                false,
                "this model's effects cannot be rolled back; an admin must promote it with an override reason",
            ),
        });
    }
    out
}

/// L2: one approver to enter canary and promoted; L3: two distinct approvers
/// for every step toward production.
fn approvals(c: &TransitionCheck) -> Option<GateResult> {
    let needed = match c.model.tier {
        Tier::L0 | Tier::L1 => 0,
        Tier::L2 if matches!(c.to, State::Canary | State::Promoted) => 1,
        Tier::L2 => 0,
        Tier::L3 if c.to.is_forward() => 2,
        Tier::L3 => 0,
    };
    (needed > 0).then(|| {
        let have = c.approvers.len();
        GateResult::new(
            "approvals",
            have >= needed,
            format!(
                "{:?} needs {needed} distinct approver(s) for {}; has {have}{}",
                c.model.tier,
                c.to,
                if have > 0 {
                    format!(" ({})", list(c.approvers.iter().map(String::as_str)))
                } else {
                    String::new()
                }
            ),
        )
    })
}

fn offline_metrics(model: &ModelSpec, v: &VersionSpec) -> GateResult {
    let mut problems = Vec::new();
    for (name, t) in &model.gates.thresholds {
        match v.metrics.overall.get(name) {
            None => problems.push(format!("{name} is not declared")),
            Some(&x) => {
                if let Some(min) = t.min.filter(|&m| x.is_nan() || x < m) {
                    problems.push(format!("{name} = {x} is below the minimum {min}"));
                }
                if let Some(max) = t.max.filter(|&m| x.is_nan() || x > m) {
                    problems.push(format!("{name} = {x} is above the maximum {max}"));
                }
            }
        }
    }
    if problems.is_empty() {
        GateResult::new(
            "offline_metrics",
            true,
            format!("{} threshold(s) met", model.gates.thresholds.len()),
        )
    } else {
        GateResult::new("offline_metrics", false, problems.join("; "))
    }
}

/// Every slice metric of the promoted version must be matched within the
/// model's tolerance (higher is better unless the metric's threshold is a max).
fn slice_regression(
    model: &ModelSpec,
    v: &VersionSpec,
    promoted: Option<&VersionSpec>,
) -> GateResult {
    let Some(base) = promoted else {
        return GateResult::new(
            "slice_regression",
            true,
            "no promoted version to compare with",
        );
    };
    let tol = model.gates.slice_tolerance;
    let mut problems = Vec::new();
    for (slice, metrics) in &base.metrics.slices {
        for (name, &was) in metrics {
            let lower_better = model
                .gates
                .thresholds
                .get(name)
                .is_some_and(|t| t.lower_is_better());
            match v.metrics.slices.get(slice).and_then(|m| m.get(name)) {
                None => problems.push(format!("slice {slice}: {name} is not evaluated")),
                Some(&now) => {
                    let worse_by = if lower_better { now - was } else { was - now };
                    if worse_by.is_nan() || worse_by > tol {
                        problems.push(format!(
                            "slice {slice}: {name} {was} → {now} regresses by {worse_by:.4} (tolerance {tol})"
                        ));
                    }
                }
            }
        }
    }
    if problems.is_empty() {
        GateResult::new(
            "slice_regression",
            true,
            format!(
                "{} slice(s) within tolerance {tol}",
                base.metrics.slices.len()
            ),
        )
    } else {
        GateResult::new("slice_regression", false, problems.join("; "))
    }
}

fn list<'a>(items: impl Iterator<Item = &'a str>) -> String {
    let v: Vec<_> = items.collect();
    if v.is_empty() {
        "nothing".into()
    } else {
        v.join(", ")
    }
}
