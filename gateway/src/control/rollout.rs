//! Canary automation: a rollout policy per model walks a candidate through
//! traffic steps (e.g. 5 → 25 → 50 → 100) on its own, through the registry.
//! Each step needs a minimum of requests and time on the candidate and
//! thresholds on success rate and p99 latency; a shadow must first stay under
//! a divergence bound. Every decision goes to the audit log with its numbers;
//! a breach rolls the candidate back.
use crate::dispatch::outcomes::VersionOutcomes;
use crate::divergence::ShadowStats;
use crate::registry::lifecycle::State;
use crate::registry::nodes::Lease;
use crate::registry::{Actor, Registry, Role, TransitionRequest, Version};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RolloutPolicy {
    pub model: String,
    /// Traffic percent per step; the last must be 100 (promotion).
    pub steps: Vec<f64>,
    /// Candidate requests needed before a step is judged.
    #[serde(default = "default_min_requests")]
    pub min_requests: u64,
    /// Time a step lasts at least.
    #[serde(default = "default_min_secs")]
    pub min_step_secs: u64,
    /// Lowest success rate (0–1) the candidate may have.
    #[serde(default = "default_success")]
    pub min_success_rate: f64,
    /// Highest p99 latency the candidate may have.
    #[serde(default)]
    pub max_p99_latency_ms: Option<f64>,
    /// In shadow: highest divergence (1 − mean token similarity) before the
    /// first canary step.
    #[serde(default)]
    pub max_shadow_divergence: Option<f64>,
    /// In shadow: highest mean teacher-forced KL estimate (nats per token of
    /// the primary's output) before the first canary step. Without either
    /// bound, shadows are left to people.
    #[serde(default)]
    pub max_shadow_kl: Option<f64>,
    /// In shadow, for tree and DNN models: the lowest share of output rows
    /// whose argmax agrees with the primary's.
    #[serde(default)]
    pub min_shadow_argmax_agreement: Option<f64>,
    /// In shadow, for tree and DNN models: the highest mean absolute
    /// difference per output element.
    #[serde(default)]
    pub max_shadow_abs_diff: Option<f64>,
}

fn default_min_requests() -> u64 {
    50
}
fn default_min_secs() -> u64 {
    60
}
fn default_success() -> f64 {
    0.99
}

impl RolloutPolicy {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.steps.is_empty() || self.steps.last() != Some(&100.0) {
            return Err(format!(
                "{at}.steps: give increasing percents ending with 100"
            ));
        }
        if self.steps.windows(2).any(|w| w[0] >= w[1]) || self.steps[0] <= 0.0 {
            return Err(format!(
                "{at}.steps: percents must increase from above 0 to 100"
            ));
        }
        if !(0.0..=1.0).contains(&self.min_success_rate) {
            return Err(format!("{at}.min_success_rate: must be within 0 and 1"));
        }
        Ok(())
    }
}

/// What the automation decided for one candidate.
#[derive(Debug, PartialEq)]
enum Decision {
    Wait,
    Ramp(f64),
    Promote,
    Rollback,
}

pub struct RolloutController {
    pub registry: Registry,
    pub policies: Vec<RolloutPolicy>,
    pub versions: VersionOutcomes,
    pub shadows: ShadowStats,
    /// Transitions the gates refused, not retried until the version's
    /// approvals change (so a missing approval does not flood the log).
    refused: Mutex<std::collections::HashSet<(String, u32, State, usize)>>,
    /// Policies run only while this node holds the lease (nodes sharing a
    /// PostgreSQL registry take turns; one on SQLite always holds it).
    lease: Mutex<Lease>,
}

impl RolloutController {
    pub fn new(
        registry: Registry,
        policies: Vec<RolloutPolicy>,
        versions: VersionOutcomes,
        shadows: ShadowStats,
    ) -> Self {
        Self {
            registry,
            policies,
            versions,
            shadows,
            refused: Mutex::default(),
            lease: Mutex::new(Lease::Local),
        }
    }

    /// Runs the policies only while `lease` is held.
    pub fn with_lease(self, lease: Lease) -> Self {
        Self {
            lease: Mutex::new(lease),
            ..self
        }
    }

    /// Applies a transition unless the same one was refused with the same approvals.
    fn try_transition(
        &self,
        actor: &Actor,
        v: &Version,
        req: TransitionRequest,
    ) -> Result<(), crate::registry::RegistryError> {
        let to = req.to.expect("the automation always names the target");
        let key = (v.model.clone(), v.number, to, v.approvals.len());
        if self
            .refused
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(&key)
        {
            return Ok(());
        }
        let o = self.registry.transition(actor, &v.model, v.number, req)?;
        tracing::info!(version = %v.reference(), applied = o.applied, "rollout: {} → {to}", o.from);
        if !o.applied {
            self.refused
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(key);
        }
        Ok(())
    }

    /// Judges every candidate every `interval`.
    pub async fn run(self, interval: Duration) {
        let me = Arc::new(self);
        loop {
            tokio::time::sleep(interval).await;
            let c = me.clone();
            let pass = tokio::task::spawn_blocking(move || {
                let held = c.lease.lock().unwrap_or_else(|p| p.into_inner()).hold();
                if held {
                    c.pass()
                } else {
                    Ok(())
                }
            })
            .await;
            if let Ok(Err(e)) = pass {
                tracing::warn!("rollout pass failed: {e}");
            }
        }
    }

    fn pass(&self) -> Result<(), crate::registry::RegistryError> {
        for policy in &self.policies {
            let Ok(versions) = self.registry.versions(&policy.model) else {
                continue;
            };
            for v in versions
                .iter()
                .filter(|v| matches!(v.state, State::Canary | State::Shadow))
            {
                self.judge(policy, v)?;
            }
        }
        Ok(())
    }

    fn judge(
        &self,
        policy: &RolloutPolicy,
        v: &Version,
    ) -> Result<(), crate::registry::RegistryError> {
        let actor = Actor {
            name: format!("rollout-policy:{}", policy.model),
            role: Role::Deployer,
        };
        let since = v.traffic_since_ms.unwrap_or(v.state_since_ms);
        let elapsed_s = (crate::registry::now_ms() - since) as f64 / 1e3;
        let (decision, numbers) = if v.state == State::Shadow {
            if policy.max_shadow_divergence.is_none()
                && policy.max_shadow_kl.is_none()
                && policy.min_shadow_argmax_agreement.is_none()
                && policy.max_shadow_abs_diff.is_none()
            {
                return Ok(());
            }
            let c = self.shadows.counts(&policy.model, &v.number.to_string());
            let (compared, errors) = (c.compared, c.errors);
            let divergence = 1.0 - c.similarity.unwrap_or(1.0);
            let kl = c.kl.unwrap_or(0.0);
            let agreement = c.argmax_agreement.unwrap_or(1.0);
            let abs_diff = c.abs_diff.unwrap_or(0.0);
            let within = policy.max_shadow_divergence.is_none_or(|m| divergence <= m)
                && policy.max_shadow_kl.is_none_or(|m| kl <= m)
                && policy
                    .min_shadow_argmax_agreement
                    .is_none_or(|m| agreement >= m)
                && policy.max_shadow_abs_diff.is_none_or(|m| abs_diff <= m);
            let limit = |m: Option<f64>| m.map_or_else(|| "none".to_string(), |m| m.to_string());
            let total = compared + errors;
            let success = if total > 0 {
                compared as f64 / total as f64
            } else {
                1.0
            };
            let numbers = format!(
                "{compared} shadow comparisons, {errors} shadow errors (success {:.1}%), divergence {divergence:.3} (limit {}), KL {kl:.4} (limit {}), argmax agreement {agreement:.3} (min {}), mean abs diff {abs_diff:.4} (limit {}) over {elapsed_s:.1} s",
                success * 100.0,
                limit(policy.max_shadow_divergence),
                limit(policy.max_shadow_kl),
                limit(policy.min_shadow_argmax_agreement),
                limit(policy.max_shadow_abs_diff),
            );
            let d = if total >= policy.min_requests.min(10) && success < policy.min_success_rate {
                Decision::Rollback
            } else if compared < policy.min_requests || elapsed_s < policy.min_step_secs as f64 {
                Decision::Wait
            } else if within {
                Decision::Ramp(policy.steps[0])
            } else {
                Decision::Rollback
            };
            (d, numbers)
        } else {
            let w = self.versions.recent(&policy.model, v.number, since);
            let (n, errors, p99) = (w.requests, w.errors, w.p99_ms);
            let success = if n > 0 {
                1.0 - errors as f64 / n as f64
            } else {
                1.0
            };
            let current = v.traffic_percent.unwrap_or(0.0);
            let numbers = format!(
                "{n} requests at {current}%, {errors} errors (success {:.1}%, limit {:.1}%), p99 {} (limit {}) over {elapsed_s:.1} s",
                success * 100.0,
                policy.min_success_rate * 100.0,
                p99.map_or("n/a".into(), |p| format!("{p:.0} ms")),
                policy.max_p99_latency_ms.map_or("none".into(), |p| format!("{p:.0} ms")),
            );
            let breached = n > 0
                && (success < policy.min_success_rate
                    || policy
                        .max_p99_latency_ms
                        .zip(p99)
                        .is_some_and(|(max, p)| p > max));
            let d = if breached && n >= policy.min_requests.min(10) {
                Decision::Rollback
            } else if n < policy.min_requests || elapsed_s < policy.min_step_secs as f64 {
                Decision::Wait
            } else {
                match policy.steps.iter().find(|&&s| s > current) {
                    Some(&100.0) | None => Decision::Promote,
                    Some(&next) => Decision::Ramp(next),
                }
            };
            (d, numbers)
        };
        let reason = |what: &str| Some(format!("{what}: {numbers}"));
        match decision {
            Decision::Wait => {}
            Decision::Ramp(p) if v.state == State::Shadow => {
                self.try_transition(
                    &actor,
                    v,
                    TransitionRequest {
                        to: Some(State::Canary),
                        traffic_percent: Some(p),
                        reason: reason(&format!("shadow passed, canary at {p}%")),
                        override_reason: None,
                    },
                )?;
            }
            Decision::Ramp(p) => {
                self.registry.set_traffic(
                    &actor,
                    &v.model,
                    v.number,
                    p,
                    reason(&format!("step passed, ramp to {p}%")),
                )?;
                tracing::info!(version = %v.reference(), "rollout: ramp to {p}%");
            }
            Decision::Promote => {
                self.try_transition(
                    &actor,
                    v,
                    TransitionRequest {
                        to: Some(State::Promoted),
                        traffic_percent: None,
                        reason: reason("last step passed, promote"),
                        override_reason: None,
                    },
                )?;
            }
            Decision::Rollback => {
                self.registry.rollback(
                    &actor,
                    &v.model,
                    reason("thresholds breached, roll back"),
                )?;
                tracing::warn!(version = %v.reference(), "rollout: rolled back ({numbers})");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::testing::{admin, gguf_version, with_model};

    fn policy() -> RolloutPolicy {
        RolloutPolicy {
            model: "m".into(),
            steps: vec![10.0, 50.0, 100.0],
            min_requests: 4,
            min_step_secs: 0,
            min_success_rate: 0.9,
            max_p99_latency_ms: Some(100.0),
            max_shadow_divergence: Some(0.1),
            max_shadow_kl: None,
            min_shadow_argmax_agreement: None,
            max_shadow_abs_diff: None,
        }
    }

    /// A registry with `m`: version 1 promoted, version 2 in `state` (a
    /// canary at 10%, or a shadow), and a controller with `policy()`.
    fn setup(state: State) -> RolloutController {
        let r = with_model("m");
        let a = admin();
        let go = |v: u32, to: State, pct: Option<f64>| {
            let o = r
                .transition(
                    &a,
                    "m",
                    v,
                    TransitionRequest {
                        to: Some(to),
                        traffic_percent: pct,
                        ..Default::default()
                    },
                )
                .unwrap();
            assert!(o.applied, "{to}: {:?}", o.gates);
        };
        for v in [1, 2] {
            let spec = gguf_version("pypi:pkg==1/m.gguf".into(), "ab".repeat(32));
            r.register_version(&a, "m", spec).unwrap();
            go(v, State::OfflinePassed, None);
        }
        go(1, State::Promoted, None);
        go(2, State::Shadow, None);
        if state == State::Canary {
            go(2, State::Canary, Some(10.0));
        }
        RolloutController::new(
            r,
            vec![policy()],
            VersionOutcomes::default(),
            ShadowStats::default(),
        )
    }

    fn v2(c: &RolloutController) -> Version {
        c.registry.version("m", 2).unwrap()
    }

    /// Samples land after the step began: a millisecond apart, so the
    /// window of the next step never counts this one's.
    fn record(c: &RolloutController, ok: bool, latency_s: f64, n: usize) {
        std::thread::sleep(Duration::from_millis(2));
        for _ in 0..n {
            c.versions.record("m", 2, ok, latency_s);
        }
        std::thread::sleep(Duration::from_millis(2));
    }

    #[test]
    fn a_good_canary_waits_for_its_requests_then_ramps_then_is_promoted() {
        let c = setup(State::Canary);
        record(&c, true, 0.01, 3);
        c.pass().unwrap();
        assert_eq!(v2(&c).traffic_percent, Some(10.0), "3 of 4 requests: wait");
        record(&c, true, 0.01, 1);
        c.pass().unwrap();
        assert_eq!(v2(&c).traffic_percent, Some(50.0));
        c.pass().unwrap();
        assert_eq!(
            v2(&c).traffic_percent,
            Some(50.0),
            "the new step counts anew"
        );
        record(&c, true, 0.01, 4);
        c.pass().unwrap();
        assert_eq!(v2(&c).state, State::Promoted);
        let audit = c.registry.audit(Some("m"), 0, 100).unwrap();
        let ramp = audit.iter().find(|e| e.action == "ramp").unwrap();
        assert_eq!(ramp.actor, "rollout-policy:m");
        assert!(ramp.body.contains("4 requests at 10%"), "{}", ramp.body);
    }

    #[test]
    fn errors_or_a_slow_p99_roll_the_canary_back_with_the_numbers() {
        for (ok, latency_s, why) in [(false, 0.01, "2 errors"), (true, 0.5, "p99 500 ms")] {
            let c = setup(State::Canary);
            record(&c, true, 0.01, 2);
            record(&c, ok, latency_s, 2);
            c.pass().unwrap();
            assert_eq!(v2(&c).state, State::RolledBack, "{why}");
            let audit = c.registry.audit(Some("m"), 0, 100).unwrap();
            let rb = audit.iter().find(|e| e.action == "rollback").unwrap();
            assert!(rb.body.contains(why), "{why}: {}", rb.body);
        }
    }

    #[test]
    fn a_shadow_that_fails_is_rolled_back_and_one_that_agrees_becomes_a_canary() {
        let bad = setup(State::Shadow);
        for _ in 0..4 {
            bad.shadows.error("m", "2");
        }
        bad.pass().unwrap();
        assert_eq!(v2(&bad).state, State::RolledBack);
        let good = setup(State::Shadow);
        for _ in 0..4 {
            good.shadows.record(
                "m",
                "2",
                crate::divergence::compare("Paris.", "Paris."),
                0.1,
                0.1,
            );
        }
        good.pass().unwrap();
        let v = v2(&good);
        assert_eq!((v.state, v.traffic_percent), (State::Canary, Some(10.0)));
    }

    #[test]
    fn a_tensor_shadow_is_judged_by_argmax_agreement_and_abs_diff() {
        use crate::divergence::compare_tensors;
        use engine::dnn::Tensor;
        let primary = [Tensor::from_f32(
            "p",
            vec![2, 3],
            &[0.7, 0.2, 0.1, 0.1, 0.8, 0.1],
        )];
        let agreeing = [Tensor::from_f32(
            "p",
            vec![2, 3],
            &[0.69, 0.21, 0.1, 0.1, 0.8, 0.1],
        )];
        let rotated = [Tensor::from_f32(
            "p",
            vec![2, 3],
            &[0.1, 0.7, 0.2, 0.1, 0.1, 0.8],
        )];
        for (shadow, state, why) in [
            (&agreeing, State::Canary, "argmax agreement 1.000"),
            (&rotated, State::RolledBack, "argmax agreement 0.000"),
        ] {
            let mut c = setup(State::Shadow);
            c.policies[0].max_shadow_divergence = None;
            c.policies[0].min_shadow_argmax_agreement = Some(0.9);
            c.policies[0].max_shadow_abs_diff = Some(0.05);
            for _ in 0..4 {
                let cmp = compare_tensors(&primary, shadow);
                c.shadows.record_tensors("m", "2", cmp, 0.01, 0.01);
            }
            c.pass().unwrap();
            assert_eq!(v2(&c).state, state, "{why}");
            let audit = c.registry.audit(Some("m"), 0, 100).unwrap();
            let e = audit
                .iter()
                .rev()
                .find(|e| e.actor == "rollout-policy:m")
                .unwrap();
            assert!(e.body.contains(why), "{}", e.body);
        }
    }
}
