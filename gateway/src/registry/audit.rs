//! The audit log's entries and their hash chain: each entry's hash covers its
//! own fields and the hash of the entry before, so changing any row breaks
//! the chain from that row on.
use super::store::Sql;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// The `prev_hash` of the first entry.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditEntry {
    pub seq: i64,
    pub at_ms: i64,
    pub actor: String,
    pub action: String,
    pub model: String,
    pub version: Option<i64>,
    /// JSON: before, after, gates, reason and whatever else the action records.
    pub body: String,
    pub prev_hash: String,
    pub hash: String,
}

/// The fields a hash covers, in a fixed order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: i64,
    at_ms: i64,
    actor: &'a str,
    action: &'a str,
    model: &'a str,
    version: Option<i64>,
    body: &'a str,
    prev_hash: &'a str,
}

impl AuditEntry {
    pub fn compute_hash(&self) -> String {
        let fields = Hashed {
            seq: self.seq,
            at_ms: self.at_ms,
            actor: &self.actor,
            action: &self.action,
            model: &self.model,
            version: self.version,
            body: &self.body,
            prev_hash: &self.prev_hash,
        };
        let bytes = serde_json::to_vec(&fields).expect("plain fields serialize");
        hex::encode(Sha256::digest(bytes))
    }

    pub const COLUMNS: &'static str =
        "seq, at_ms, actor, action, model, version, body, prev_hash, hash";

    pub fn to_row(&self) -> Vec<Sql> {
        vec![
            Sql::Int(self.seq),
            Sql::Int(self.at_ms),
            Sql::Text(self.actor.clone()),
            Sql::Text(self.action.clone()),
            Sql::Text(self.model.clone()),
            self.version.map_or(Sql::Null, Sql::Int),
            Sql::Text(self.body.clone()),
            Sql::Text(self.prev_hash.clone()),
            Sql::Text(self.hash.clone()),
        ]
    }

    pub fn from_row(row: &[Sql]) -> Option<Self> {
        let text = |i: usize| row.get(i)?.text().map(str::to_string);
        Some(Self {
            seq: row.first()?.int()?,
            at_ms: row.get(1)?.int()?,
            actor: text(2)?,
            action: text(3)?,
            model: text(4)?,
            version: row.get(5)?.int(),
            body: text(6)?,
            prev_hash: text(7)?,
            hash: text(8)?,
        })
    }

    pub fn body_json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// The outcome of recomputing the chain.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    pub entries: usize,
    pub ok: bool,
    /// The first entry whose hash or link does not hold.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub first_bad: Option<BadEntry>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct BadEntry {
    pub seq: i64,
    pub reason: String,
}

/// Walks entries in order; the first broken link or hash is reported.
pub fn verify(entries: impl IntoIterator<Item = AuditEntry>) -> Verification {
    let mut prev = GENESIS.to_string();
    let mut count = 0;
    for (expected_seq, e) in (1..).zip(entries) {
        count += 1;
        let bad = |reason: String| Verification {
            entries: count,
            ok: false,
            first_bad: Some(BadEntry { seq: e.seq, reason }),
        };
        if e.seq != expected_seq {
            return bad(format!(
                "expected entry {expected_seq} here, found {}",
                e.seq
            ));
        }
        if e.prev_hash != prev {
            return bad("prev_hash does not match the hash of the entry before".into());
        }
        if e.compute_hash() != e.hash {
            return bad("the entry's contents do not match its hash".into());
        }
        prev = e.hash.clone();
    }
    Verification {
        entries: count,
        ok: true,
        first_bad: None,
    }
}

/// What an audit entry records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    RegisterModel,
    RegisterVersion,
    Approve,
    Transition,
    TransitionRefused,
    Ramp,
    Rollback,
    RollbackRestore,
    MarkNeedsRetrain,
}

impl Action {
    /// The name entries carry (and the hash chain covers).
    pub fn as_str(self) -> &'static str {
        match self {
            Action::RegisterModel => "register_model",
            Action::RegisterVersion => "register_version",
            Action::Approve => "approve",
            Action::Transition => "transition",
            Action::TransitionRefused => "transition_refused",
            Action::Ramp => "ramp",
            Action::Rollback => "rollback",
            Action::RollbackRestore => "rollback_restore",
            Action::MarkNeedsRetrain => "mark_needs_retrain",
        }
    }
}
