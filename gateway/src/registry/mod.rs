//! The model registry: models and versions as contracts, walked through the
//! gated state machine, every change appended to a hash-chained audit log.
//! Storage is SQLite or PostgreSQL behind one small SQL surface (`store`).
pub mod audit;
pub mod lifecycle;
pub mod records;
pub mod request_log;
pub mod store;
#[cfg(test)]
pub mod testing;
#[cfg(test)]
mod tests;
pub mod tls;

use audit::{Action, AuditEntry, Verification, GENESIS};
use lifecycle::{GateResult, State, TransitionCheck};
use records::{parse_ref, ModelSpec, RollbackClass, VersionSpec};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use store::{Db, Sql, StoreError};

pub use crate::auth::{Actor, Permission, Role};

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("registry storage: {0}")]
    Storage(#[from] StoreError),
}

type Result<T> = std::result::Result<T, RegistryError>;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    pub by: String,
    pub target: State,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Override {
    pub by: String,
    pub reason: String,
    pub at_ms: i64,
}

/// A version as stored: its contract plus where it stands.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Version {
    pub model: String,
    pub number: u32,
    pub spec: VersionSpec,
    pub state: State,
    pub state_since_ms: i64,
    /// The share of live traffic while in canary or A/B.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_percent: Option<f64>,
    /// When the share last changed (entering canary/A/B, or a ramp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traffic_since_ms: Option<i64>,
    #[serde(default)]
    pub approvals: Vec<Approval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub irreversible_override: Option<Override>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub promoted_at_ms: Option<i64>,
    /// Set when a version it depends on was rolled back.
    #[serde(default)]
    pub needs_retrain: bool,
    pub created_by: String,
    pub created_at_ms: i64,
}

impl Version {
    fn snapshot(&self) -> Value {
        json!({"state": self.state, "traffic_percent": self.traffic_percent, "needs_retrain": self.needs_retrain})
    }

    pub fn reference(&self) -> String {
        format!("{}@{}", self.model, self.number)
    }
}

/// Where the controller found a version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Loading,
    Serving,
    Unloaded,
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Serving => "serving",
            Phase::Unloaded => "unloaded",
            Phase::Failed => "failed",
        }
    }
}

/// The controller's last word on a version (observed, not desired, state).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    pub phase: Phase,
    pub message: String,
    pub at_ms: i64,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransitionRequest {
    pub to: Option<State>,
    /// Canary / A/B share in percent (defaults 10 and 50).
    #[serde(default)]
    pub traffic_percent: Option<f64>,
    #[serde(default)]
    pub reason: Option<String>,
    /// Admins only: why an irreversible model may be promoted anyway.
    #[serde(default)]
    pub override_reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TransitionOutcome {
    pub applied: bool,
    pub from: State,
    pub to: State,
    pub gates: Vec<GateResult>,
    pub audit_seq: i64,
    pub version: Version,
}

/// What `rollback` did, and what it could not do.
#[derive(Debug, Clone, Serialize)]
pub struct RollbackPlan {
    pub model: String,
    /// `immediate`, `snapshot_restore` or `irreversible`.
    pub kind: &'static str,
    pub rolled_back: Vec<u32>,
    /// The version that takes all traffic now (none if nothing was promoted).
    pub serving: Option<u32>,
    pub steps: Vec<String>,
    pub cannot_undo: Vec<String>,
    /// Downstream versions (transitively) marked `needs_retrain`.
    pub needs_retrain: Vec<String>,
}

/// Who served a model at a point in time, replayed from the audit log.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Served {
    pub model: String,
    pub at_ms: i64,
    pub primary: Option<u32>,
    /// Versions with a traffic share or a shadow copy then: (version, state, percent).
    pub candidates: Vec<ServedCandidate>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ServedCandidate {
    pub version: u32,
    pub state: State,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub traffic_percent: Option<f64>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The registry; cheap to clone, safe to share. Calls block on storage, so
/// async callers run them on the blocking pool.
#[derive(Clone)]
pub struct Registry {
    db: Arc<Mutex<Box<dyn Db>>>,
    changed: Arc<tokio::sync::Notify>,
    /// Models below this tier are created by admins only.
    tier_floor: records::Tier,
}

/// One write transaction: reads see the latest committed state, writes and
/// audit entries commit together or not at all.
struct Tx<'a> {
    db: &'a mut dyn Db,
    now: i64,
}

impl Tx<'_> {
    fn model(&mut self, name: &str) -> Result<ModelSpec> {
        read_model(self.db, name)
    }

    fn versions(&mut self, model: &str) -> Result<Vec<Version>> {
        read_versions(self.db, model)
    }

    fn put_version(&mut self, v: &Version) -> Result<()> {
        self.db.exec(
            "INSERT INTO versions (model, number, doc) VALUES ($1, $2, $3)
             ON CONFLICT (model, number) DO UPDATE SET doc = excluded.doc",
            &[
                Sql::Text(v.model.clone()),
                Sql::Int(v.number.into()),
                Sql::Text(serde_json::to_string(v).expect("version serializes")),
            ],
        )?;
        Ok(())
    }

    fn append(
        &mut self,
        actor: &str,
        action: Action,
        model: &str,
        version: Option<u32>,
        body: Value,
    ) -> Result<i64> {
        let last = self
            .db
            .query("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1", &[])?;
        let (seq, prev_hash) = match last.first() {
            Some(row) => (
                row[0].int().unwrap_or(0) + 1,
                row[1].text().unwrap_or(GENESIS).to_string(),
            ),
            None => (1, GENESIS.to_string()),
        };
        let mut e = AuditEntry {
            seq,
            at_ms: self.now,
            actor: actor.into(),
            action: action.as_str().into(),
            model: model.into(),
            version: version.map(i64::from),
            body: body.to_string(),
            prev_hash,
            hash: String::new(),
        };
        e.hash = e.compute_hash();
        self.db.exec(
            &format!(
                "INSERT INTO audit ({}) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                AuditEntry::COLUMNS
            ),
            &e.to_row(),
        )?;
        Ok(seq)
    }
}

fn read_model(db: &mut dyn Db, name: &str) -> Result<ModelSpec> {
    let rows = db.query(
        "SELECT doc FROM models WHERE name = $1",
        &[Sql::Text(name.into())],
    )?;
    let doc = rows
        .first()
        .and_then(|r| r[0].text())
        .ok_or_else(|| RegistryError::NotFound(format!("no model named `{name}`")))?;
    decode(doc)
}

fn read_versions(db: &mut dyn Db, model: &str) -> Result<Vec<Version>> {
    db.query(
        "SELECT doc FROM versions WHERE model = $1 ORDER BY number",
        &[Sql::Text(model.into())],
    )?
    .iter()
    .map(|r| decode(r[0].text().unwrap_or_default()))
    .collect()
}

fn decode<T: serde::de::DeserializeOwned>(doc: &str) -> Result<T> {
    serde_json::from_str(doc).map_err(|e| {
        RegistryError::Storage(StoreError(format!("a stored record is unreadable: {e}")))
    })
}

fn find(versions: &mut [Version], number: u32, model: &str) -> Result<usize> {
    versions
        .iter()
        .position(|v| v.number == number)
        .ok_or_else(|| RegistryError::NotFound(format!("model `{model}` has no version {number}")))
}

fn require(actor: &Actor, p: Permission) -> Result<()> {
    crate::auth::require(actor, p).map_err(|e| RegistryError::Forbidden(e.message()))
}

impl Registry {
    /// Opens (and creates) the database at `url`; see `store::open`.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with_ca(url, None)
    }

    /// As `open`, verifying a PostgreSQL server's TLS certificate against `ca`.
    pub fn open_with_ca(url: &str, ca: Option<&std::path::Path>) -> Result<Self> {
        Ok(Self::with_db(store::open(url, ca)?))
    }

    pub fn with_db(db: Box<dyn Db>) -> Self {
        Self {
            db: Arc::new(Mutex::new(db)),
            changed: Arc::default(),
            tier_floor: records::Tier::L2,
        }
    }

    /// Models below `tier` (fewer approvals) may be created by admins only.
    pub fn with_tier_floor(mut self, tier: records::Tier) -> Self {
        self.tier_floor = tier;
        self
    }

    /// Fires after every committed change, for the controller.
    pub fn changes(&self) -> Arc<tokio::sync::Notify> {
        self.changed.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Db>> {
        // A panic while holding the lock leaves no open transaction behind
        // (every path rolls back), so the connection is still usable.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write<T>(&self, f: impl FnOnce(&mut Tx) -> Result<T>) -> Result<T> {
        let mut guard = self.lock();
        let db: &mut dyn Db = &mut **guard;
        db.begin_write()?;
        let mut tx = Tx { db, now: now_ms() };
        match f(&mut tx) {
            Ok(v) => {
                if let Err(e) = tx.db.commit() {
                    tx.db.rollback();
                    return Err(e.into());
                }
                drop(guard);
                self.changed.notify_one();
                Ok(v)
            }
            Err(e) => {
                tx.db.rollback();
                Err(e)
            }
        }
    }

    pub fn create_model(&self, actor: &Actor, spec: ModelSpec) -> Result<ModelSpec> {
        require(actor, Permission::Deploy)?;
        spec.validate().map_err(RegistryError::Invalid)?;
        if spec.tier < self.tier_floor && !actor.role.allows(Permission::Override) {
            return Err(RegistryError::Forbidden(format!(
                "tier {:?} needs fewer approvals than this registry's floor {:?} \
                 (registry.min_tier_without_admin); only an admin may create such a model",
                spec.tier, self.tier_floor
            )));
        }
        self.write(|tx| {
            if tx.model(&spec.name).is_ok() {
                return Err(RegistryError::Conflict(format!(
                    "model `{}` is already registered",
                    spec.name
                )));
            }
            tx.db.exec(
                "INSERT INTO models (name, doc) VALUES ($1, $2)",
                &[
                    Sql::Text(spec.name.clone()),
                    Sql::Text(serde_json::to_string(&spec).expect("model serializes")),
                ],
            )?;
            tx.append(
                &actor.name,
                Action::RegisterModel,
                &spec.name,
                None,
                json!({"before": null, "after": spec}),
            )?;
            Ok(spec.clone())
        })
    }

    pub fn model(&self, name: &str) -> Result<ModelSpec> {
        read_model(&mut **self.lock(), name)
    }

    pub fn models(&self) -> Result<Vec<ModelSpec>> {
        self.lock()
            .query("SELECT doc FROM models ORDER BY name", &[])?
            .iter()
            .map(|r| decode(r[0].text().unwrap_or_default()))
            .collect()
    }

    pub fn versions(&self, model: &str) -> Result<Vec<Version>> {
        let mut db = self.lock();
        read_model(&mut **db, model)?;
        read_versions(&mut **db, model)
    }

    pub fn version(&self, model: &str, number: u32) -> Result<Version> {
        let mut vs = self.versions(model)?;
        let i = find(&mut vs, number, model)?;
        Ok(vs.swap_remove(i))
    }

    /// Registers the next version number of `model`, in state `registered`.
    pub fn register_version(
        &self,
        actor: &Actor,
        model: &str,
        spec: VersionSpec,
    ) -> Result<Version> {
        require(actor, Permission::Deploy)?;
        spec.validate().map_err(RegistryError::Invalid)?;
        self.write(|tx| {
            tx.model(model)?;
            let versions = tx.versions(model)?;
            if let Some(p) = spec.lineage.parent_version {
                if !versions.iter().any(|v| v.number == p) {
                    return Err(RegistryError::Invalid(format!(
                        "lineage.parent_version: model `{model}` has no version {p}"
                    )));
                }
            }
            let v = Version {
                model: model.into(),
                number: versions.iter().map(|v| v.number).max().unwrap_or(0) + 1,
                spec: spec.clone(),
                state: State::Registered,
                state_since_ms: tx.now,
                traffic_percent: None,
                traffic_since_ms: None,
                approvals: vec![],
                irreversible_override: None,
                promoted_at_ms: None,
                needs_retrain: false,
                created_by: actor.name.clone(),
                created_at_ms: tx.now,
            };
            tx.put_version(&v)?;
            tx.append(
                &actor.name,
                Action::RegisterVersion,
                model,
                Some(v.number),
                json!({"before": null, "after": {"state": v.state, "spec": spec}}),
            )?;
            Ok(v)
        })
    }

    /// Records `actor`'s approval of `target` for this version.
    pub fn approve(
        &self,
        actor: &Actor,
        model: &str,
        number: u32,
        target: State,
        comment: Option<String>,
    ) -> Result<Version> {
        require(actor, Permission::Approve)?;
        self.write(|tx| {
            let mut vs = tx.versions(model)?;
            let i = find(&mut vs, number, model)?;
            let v = &mut vs[i];
            if v.approvals
                .iter()
                .any(|a| a.by == actor.name && a.target == target)
            {
                return Err(RegistryError::Conflict(format!(
                    "`{}` already approved {} for {target}",
                    actor.name,
                    v.reference()
                )));
            }
            v.approvals.push(Approval {
                by: actor.name.clone(),
                target,
                comment: comment.clone(),
                at_ms: tx.now,
            });
            let v = v.clone();
            tx.put_version(&v)?;
            tx.append(
                &actor.name,
                Action::Approve,
                model,
                Some(number),
                json!({"target": target, "comment": comment}),
            )?;
            Ok(v)
        })
    }

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
        require(actor, Permission::Deploy)?;
        self.write(|tx| {
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

    /// Appended entries, oldest first; `model` filters, `after` pages.
    pub fn audit(&self, model: Option<&str>, after: i64, limit: i64) -> Result<Vec<AuditEntry>> {
        let sql = format!(
            "SELECT {} FROM audit WHERE seq > $1 AND ($2 = '' OR model = $2) ORDER BY seq LIMIT $3",
            AuditEntry::COLUMNS
        );
        let rows = self.lock().query(
            &sql,
            &[
                Sql::Int(after),
                Sql::Text(model.unwrap_or_default().into()),
                Sql::Int(limit),
            ],
        )?;
        rows.iter()
            .map(|r| {
                AuditEntry::from_row(r).ok_or_else(|| {
                    RegistryError::Storage(StoreError("an audit row has missing columns".into()))
                })
            })
            .collect()
    }

    /// Every entry (of `model`, or all), oldest first, read in pages.
    fn all_entries(&self, model: Option<&str>) -> Result<Vec<AuditEntry>> {
        let mut all = Vec::new();
        loop {
            let after = all.last().map_or(0, |e: &AuditEntry| e.seq);
            let page = self.audit(model, after, 10_000)?;
            if page.is_empty() {
                return Ok(all);
            }
            all.extend(page);
        }
    }

    /// Recomputes the whole chain.
    pub fn verify(&self) -> Result<Verification> {
        Ok(audit::verify(self.all_entries(None)?))
    }

    /// Which versions served `model` at `at_ms`, replayed from the audit log.
    pub fn served_at(&self, model: &str, at_ms: i64) -> Result<Served> {
        self.model(model)?;
        let mut states: BTreeMap<u32, (State, Option<f64>)> = BTreeMap::new();
        for e in self.all_entries(Some(model))? {
            if e.at_ms > at_ms {
                break;
            }
            let body = e.body_json();
            let (Some(v), Some(s)) = (e.version, body["after"].get("state")) else {
                continue;
            };
            if let Ok(s) = serde_json::from_value::<State>(s.clone()) {
                let pct = body["after"]["traffic_percent"].as_f64();
                states.insert(v as u32, (s, pct));
            }
        }
        Ok(Served {
            model: model.into(),
            at_ms,
            primary: states
                .iter()
                .find(|(_, (s, _))| *s == State::Promoted)
                .map(|(v, _)| *v),
            candidates: states
                .iter()
                .filter(|(_, (s, _))| s.is_live() && *s != State::Promoted)
                .map(|(v, (s, p))| ServedCandidate {
                    version: *v,
                    state: *s,
                    traffic_percent: *p,
                })
                .collect(),
        })
    }

    /// The version's ancestors (through `parent_version`) and its transitive dependents.
    pub fn lineage(&self, model: &str, number: u32) -> Result<Value> {
        let vs = self.versions(model)?;
        let v = vs.iter().find(|v| v.number == number).ok_or_else(|| {
            RegistryError::NotFound(format!("model `{model}` has no version {number}"))
        })?;
        let mut ancestors = Vec::new();
        let mut parent = v.spec.lineage.parent_version;
        while let Some(p) = parent.filter(|p| !ancestors.contains(p)) {
            ancestors.push(p);
            parent = vs
                .iter()
                .find(|x| x.number == p)
                .and_then(|x| x.spec.lineage.parent_version);
        }
        let mut dependents = Vec::new();
        let mut queue = v.spec.dependents.clone();
        while let Some(d) = queue.pop() {
            if dependents.contains(&d) {
                continue;
            }
            if let Ok((m, n)) = parse_ref(&d) {
                if let Ok(dv) = self.version(&m, n) {
                    queue.extend(dv.spec.dependents.clone());
                }
            }
            dependents.push(d);
        }
        Ok(json!({
            "model": model,
            "version": number,
            "lineage": v.spec.lineage,
            "ancestors": ancestors,
            "dependents": dependents,
        }))
    }

    pub fn status(&self, model: &str, number: u32) -> Result<Option<Status>> {
        let rows = self.lock().query(
            "SELECT doc FROM version_status WHERE model = $1 AND number = $2",
            &[Sql::Text(model.into()), Sql::Int(number.into())],
        )?;
        rows.first()
            .map(|r| decode(r[0].text().unwrap_or_default()))
            .transpose()
    }

    /// The controller's report; written only when it changes. Observed state
    /// is not a registry change, so it is not audited.
    pub fn set_status(&self, model: &str, number: u32, phase: Phase, message: &str) -> Result<()> {
        if let Some(s) = self.status(model, number)? {
            if s.phase == phase && s.message == message {
                return Ok(());
            }
        }
        let doc = Status {
            phase,
            message: message.into(),
            at_ms: now_ms(),
        };
        self.lock().exec(
            "INSERT INTO version_status (model, number, doc) VALUES ($1, $2, $3)
             ON CONFLICT (model, number) DO UPDATE SET doc = excluded.doc",
            &[
                Sql::Text(model.into()),
                Sql::Int(number.into()),
                Sql::Text(serde_json::to_string(&doc).expect("status serializes")),
            ],
        )?;
        Ok(())
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

pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}
