//! Registries for other modules' tests: an in-memory registry holding one
//! LLM model, the admin who made it, and a version spec for an artifact.
use super::records::*;
use super::{Actor, Registry, Role};

pub fn admin() -> Actor {
    Actor {
        name: "root".into(),
        role: Role::Admin,
    }
}

/// An in-memory registry with model `name` (class llm, tier L0: no approvals).
pub fn with_model(name: &str) -> Registry {
    let r = Registry::open(":memory:").unwrap();
    r.create_model(
        &admin(),
        ModelSpec {
            name: name.into(),
            class: ModelClass::Llm,
            tier: Tier::L0,
            rollback_class: RollbackClass::Stateless,
            owner: "o".into(),
            gates: Gates::default(),
        },
    )
    .unwrap();
    r
}

/// A GGUF version at `uri` with `sha256`, nothing else declared.
pub fn gguf_version(uri: String, sha256: String) -> VersionSpec {
    VersionSpec {
        artifact: Artifact {
            uri,
            sha256,
            format: "gguf".into(),
        },
        requirements: Requirements::default(),
        contract: Contract::default(),
        lineage: Lineage::default(),
        metrics: Metrics::default(),
        dependents: vec![],
    }
}
