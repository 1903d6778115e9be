//! Moving versions: gated transitions, traffic ramps and rollbacks, each in
//! one write transaction with its audit entry.
use super::*;

impl Registry {
    /// Runs the gates for `req.to`; applies the transition if all pass. A
    /// refused transition is recorded too (`transition_refused`).
    pub fn transition(
        &self,
        actor: &Actor,
        model: &str,
        number: u32,
        req: TransitionRequest,
    ) -> Result<TransitionOutcome> {
        require(actor, Permission::Deploy)?;
        let to = req
            .to
            .ok_or_else(|| RegistryError::Invalid("to: name the target state".into()))?;
        if matches!(to, State::RolledBack) {
            return Err(RegistryError::Invalid(
                "to: use POST /v1/registry/models/{model}/rollback to roll back".into(),
            ));
        }
        if req.override_reason.is_some() {
            require(actor, Permission::Override)?;
        }
        self.write(|tx| {
            let spec = tx.model(model)?;
            let mut vs = tx.versions(model)?;
            let i = find(&mut vs, number, model)?;
            let promoted = vs
                .iter()
                .position(|v| v.state == State::Promoted && v.number != number);
            let other_candidate = vs
                .iter()
                .find(|v| v.state.takes_traffic_share() && v.number != number)
                .map(|v| v.number);
            let v = &vs[i];
            let approvers: BTreeSet<String> = v
                .approvals
                .iter()
                .filter(|a| a.target == to)
                .map(|a| a.by.clone())
                .collect();
            let traffic_percent = to.takes_traffic_share().then(|| {
                req.traffic_percent
                    .unwrap_or(if to == State::Canary { 10.0 } else { 50.0 })
            });
            let from = v.state;
            let gates = lifecycle::check(&TransitionCheck {
                model: &spec,
                version: &v.spec,
                from,
                to,
                promoted: promoted.map(|p| &vs[p].spec),
                ever_promoted: vs.iter().any(|v| v.promoted_at_ms.is_some()),
                other_candidate,
                approvers: &approvers,
                override_by: req
                    .override_reason
                    .as_deref()
                    .map(|r| (actor.name.as_str(), r)),
                traffic_percent,
            });
            let applied = gates.iter().all(|g| g.passed);
            if !applied {
                let seq = tx.append(
                    &actor.name,
                    Action::TransitionRefused,
                    model,
                    Some(number),
                    json!({"from": from, "to": to, "gates": gates, "reason": req.reason}),
                )?;
                return Ok(TransitionOutcome {
                    applied,
                    from,
                    to,
                    gates,
                    audit_seq: seq,
                    version: vs[i].clone(),
                });
            }
            let before = vs[i].snapshot();
            {
                let v = &mut vs[i];
                v.state = to;
                v.state_since_ms = tx.now;
                v.traffic_percent = traffic_percent;
                v.traffic_since_ms = traffic_percent.map(|_| tx.now);
                if to == State::Promoted {
                    v.promoted_at_ms = Some(tx.now);
                    v.irreversible_override = req.override_reason.as_ref().map(|r| Override {
                        by: actor.name.clone(),
                        reason: r.clone(),
                        at_ms: tx.now,
                    });
                }
            }
            tx.put_version(&vs[i])?;
            let seq = tx.append(
                &actor.name,
                Action::Transition,
                model,
                Some(number),
                json!({"before": before, "after": vs[i].snapshot(), "gates": gates,
                       "reason": req.reason, "override_reason": req.override_reason}),
            )?;
            if let (State::Promoted, Some(p)) = (to, promoted) {
                let before = vs[p].snapshot();
                vs[p].state = State::Deprecated;
                vs[p].state_since_ms = tx.now;
                tx.put_version(&vs[p])?;
                tx.append(
                    &actor.name,
                    Action::Transition,
                    model,
                    Some(vs[p].number),
                    json!({"before": before, "after": vs[p].snapshot(),
                           "reason": format!("superseded by version {number}")}),
                )?;
            }
            Ok(TransitionOutcome {
                applied,
                from,
                to,
                gates,
                audit_seq: seq,
                version: vs[i].clone(),
            })
        })
    }

    /// Changes a canary's or A/B candidate's share of traffic (a ramp).
    pub fn set_traffic(
        &self,
        actor: &Actor,
        model: &str,
        number: u32,
        percent: f64,
        reason: Option<String>,
    ) -> Result<Version> {
        require(actor, Permission::Deploy)?;
        if !(percent > 0.0 && percent < 100.0) {
            return Err(RegistryError::Invalid(format!(
                "traffic_percent: {percent} must be above 0 and below 100; promote for 100"
            )));
        }
        self.write(|tx| {
            let mut vs = tx.versions(model)?;
            let i = find(&mut vs, number, model)?;
            let v = &mut vs[i];
            if !v.state.takes_traffic_share() {
                return Err(RegistryError::Conflict(format!(
                    "version {number} is {}; only a canary or A/B version has a share to change",
                    v.state
                )));
            }
            let before = v.snapshot();
            v.traffic_percent = Some(percent);
            v.traffic_since_ms = Some(tx.now);
            let v = v.clone();
            tx.put_version(&v)?;
            tx.append(
                &actor.name,
                Action::Ramp,
                model,
                Some(number),
                json!({"before": before, "after": v.snapshot(), "reason": reason}),
            )?;
            Ok(v)
        })
    }

    /// Moves traffic back: candidates (shadow, canary, A/B) are rolled back
    /// and the promoted version keeps serving; with no candidate, the promoted
    /// version is rolled back and the one promoted before it serves again.
    /// Downstream dependents are marked `needs_retrain`, never rolled back.
    pub fn rollback(
        &self,
        actor: &Actor,
        model: &str,
        reason: Option<String>,
    ) -> Result<RollbackPlan> {
        self.rollback_as(actor, model, reason, true)
    }

    /// The plan `rollback` would carry out now, carried out in a transaction
    /// that is then abandoned: nothing changes and nothing is audited.
    pub fn preview_rollback(&self, actor: &Actor, model: &str) -> Result<RollbackPlan> {
        self.rollback_as(actor, model, None, false)
    }

    fn rollback_as(
        &self,
        actor: &Actor,
        model: &str,
        reason: Option<String>,
        commit: bool,
    ) -> Result<RollbackPlan> {
        require(actor, Permission::Deploy)?;
        self.transact(commit, |tx| {
            let spec = tx.model(model)?;
            let mut vs = tx.versions(model)?;
            let candidates: Vec<usize> = (0..vs.len())
                .filter(|&i| vs[i].state.is_live() && vs[i].state != State::Promoted)
                .collect();
            let promoted = vs.iter().position(|v| v.state == State::Promoted);
            let (rolled, restore) = if !candidates.is_empty() {
                (candidates, None)
            } else if let Some(p) = promoted {
                let previous = (0..vs.len())
                    .filter(|&i| vs[i].state == State::Deprecated && vs[i].promoted_at_ms.is_some())
                    .max_by_key(|&i| vs[i].promoted_at_ms)
                    .ok_or_else(|| {
                        RegistryError::Conflict(format!(
                            "version {} is the only version of `{model}` ever promoted; there is nothing to roll back to",
                            vs[p].number
                        ))
                    })?;
                (vec![p], Some(previous))
            } else {
                return Err(RegistryError::Conflict(format!(
                    "no version of `{model}` is live; there is nothing to roll back"
                )));
            };
            let serving = restore.or(promoted).map(|i| vs[i].number);
            let mut cannot_undo = Vec::new();
            let mut rolled_numbers = Vec::new();
            for &i in &rolled {
                let before = vs[i].snapshot();
                if spec.rollback_class == RollbackClass::Irreversible && vs[i].state != State::Shadow {
                    cannot_undo.push(format!(
                        "what version {} served as {} since {} stays done: `{model}` is irreversible",
                        vs[i].number,
                        vs[i].state,
                        format_ms(vs[i].state_since_ms)
                    ));
                }
                vs[i].state = State::RolledBack;
                vs[i].state_since_ms = tx.now;
                vs[i].traffic_percent = None;
                vs[i].traffic_since_ms = None;
                rolled_numbers.push(vs[i].number);
                tx.put_version(&vs[i])?;
                tx.append(
                    &actor.name,
                    Action::Rollback,
                    model,
                    Some(vs[i].number),
                    json!({"before": before, "after": vs[i].snapshot(), "reason": reason, "serving": serving}),
                )?;
            }
            if let Some(r) = restore {
                let before = vs[r].snapshot();
                vs[r].state = State::Promoted;
                vs[r].state_since_ms = tx.now;
                tx.put_version(&vs[r])?;
                tx.append(
                    &actor.name,
                    Action::RollbackRestore,
                    model,
                    Some(vs[r].number),
                    json!({"before": before, "after": vs[r].snapshot(), "reason": reason}),
                )?;
            }
            let names = rolled_numbers.iter().map(|n| format!("version {n}")).collect::<Vec<_>>().join(", ");
            let mut steps = Vec::new();
            let kind = match spec.rollback_class {
                RollbackClass::Stateless => "immediate",
                RollbackClass::StateSnapshot => {
                    if let Some(n) = serving {
                        steps.push(format!("restore the state snapshot taken for version {n}"));
                    }
                    "snapshot_restore"
                }
                RollbackClass::Irreversible => "irreversible",
            };
            steps.push(match serving {
                Some(n) => format!("route all traffic of `{model}` to version {n}"),
                None => format!("stop serving `{model}` (no version was promoted)"),
            });
            steps.push(format!("stop sending traffic to {names} and unload it"));
            let mut needs_retrain = Vec::new();
            let roots: Vec<String> = rolled.iter().flat_map(|&i| vs[i].spec.dependents.clone()).collect();
            mark_dependents(tx, &actor.name, roots, &rolled_numbers, model, &mut needs_retrain)?;
            Ok(RollbackPlan {
                model: model.into(),
                kind,
                rolled_back: rolled_numbers,
                serving,
                steps,
                cannot_undo,
                needs_retrain,
            })
        })
    }
}

/// Marks every registered dependent (transitively) `needs_retrain`.
fn mark_dependents(
    tx: &mut Tx,
    actor: &str,
    mut queue: Vec<String>,
    rolled: &[u32],
    model: &str,
    out: &mut Vec<String>,
) -> Result<()> {
    while let Some(d) = queue.pop() {
        if out.contains(&d) {
            continue;
        }
        out.push(d.clone());
        let Ok((m, n)) = parse_ref(&d) else { continue };
        let Ok(mut vs) = tx.versions(&m) else {
            continue;
        };
        let Some(v) = vs.iter_mut().find(|v| v.number == n) else {
            continue;
        };
        queue.extend(v.spec.dependents.clone());
        if v.needs_retrain {
            continue;
        }
        let before = v.snapshot();
        v.needs_retrain = true;
        let v = v.clone();
        tx.put_version(&v)?;
        tx.append(
            actor,
            Action::MarkNeedsRetrain,
            &m,
            Some(n),
            json!({"before": before, "after": v.snapshot(),
                   "reason": format!("upstream `{model}` version(s) {rolled:?} rolled back")}),
        )?;
    }
    Ok(())
}
