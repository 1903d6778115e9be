//! The model registry: models and versions as contracts, walked through the
//! gated state machine, every change appended to a hash-chained audit log.
//! Storage is SQLite or PostgreSQL behind one small SQL surface (`store`).
pub mod audit;
mod history;
pub mod lifecycle;
pub mod nodes;
pub mod records;
pub mod request_log;
pub mod store;
#[cfg(test)]
pub mod testing;
#[cfg(test)]
mod tests;
pub mod tls;
mod transitions;

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

    /// Fires [`Registry::changes`] for changes other nodes commit too, when
    /// the database is PostgreSQL (LISTEN/NOTIFY); see `nodes::listen`.
    pub fn listen_to_other_nodes(&self, url: &str, ca: Option<&std::path::Path>) {
        if store::is_postgres(url) {
            nodes::listen(url, ca, self.changed.clone());
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Box<dyn Db>> {
        // A panic while holding the lock leaves no open transaction behind
        // (every path rolls back), so the connection is still usable.
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write<T>(&self, f: impl FnOnce(&mut Tx) -> Result<T>) -> Result<T> {
        self.transact(true, f)
    }

    /// Runs `f` in a write transaction, committed (and announced) when
    /// `commit`, else rolled back whatever `f` did.
    fn transact<T>(&self, commit: bool, f: impl FnOnce(&mut Tx) -> Result<T>) -> Result<T> {
        let mut guard = self.lock();
        let db: &mut dyn Db = &mut **guard;
        db.begin_write()?;
        let mut tx = Tx { db, now: now_ms() };
        match f(&mut tx) {
            Ok(v) if !commit => {
                tx.db.rollback();
                Ok(v)
            }
            Ok(v) => {
                if let Err(e) = tx.db.announce().and_then(|()| tx.db.commit()) {
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
}

pub fn format_ms(ms: i64) -> String {
    let t = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}
