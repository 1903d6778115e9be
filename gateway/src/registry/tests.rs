//! The registry's behaviour, run against SQLite and, when
//! `SWITCHYARD_TEST_POSTGRES_URL` names a server (`scripts/test.sh` starts
//! one), against PostgreSQL with the same assertions.
use super::lifecycle::State;
use super::records::*;
use super::*;
use proptest::prelude::*;

const ALL_STATES: [State; 10] = [
    State::Registered,
    State::OfflinePassed,
    State::Shadow,
    State::Canary,
    State::AbTest,
    State::Promoted,
    State::Deprecated,
    State::Archived,
    State::Failed,
    State::RolledBack,
];

/// A fresh, empty registry database on every backend available.
pub fn backends() -> Vec<(&'static str, String, tempfile::TempDir)> {
    let dir = tempfile::tempdir().unwrap();
    let mut out = vec![(
        "sqlite",
        dir.path().join("registry.db").display().to_string(),
        dir,
    )];
    match std::env::var("SWITCHYARD_TEST_POSTGRES_URL") {
        Ok(base) => out.push((
            "postgres",
            fresh_pg_database(&base),
            tempfile::tempdir().unwrap(),
        )),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs every backend: set SWITCHYARD_TEST_POSTGRES_URL (scripts/test.sh does)"
            );
            eprintln!("SWITCHYARD_TEST_POSTGRES_URL is not set: SQLite only")
        }
    }
    out
}

/// Creates a new database on the server `base` points at; returns its URL.
pub fn fresh_pg_database(base: &str) -> String {
    let name = format!("sy_{}", uuid::Uuid::new_v4().simple());
    let mut c = postgres::Client::connect(base, postgres::NoTls).unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let (head, _) = base.rsplit_once('/').unwrap();
    format!("{head}/{name}")
}

fn actor(name: &str, role: Role) -> Actor {
    Actor {
        name: name.into(),
        role,
    }
}

/// A registry without a tier floor, so that deployers create models of any tier.
fn open(url: &str) -> Registry {
    Registry::open(url).unwrap().with_tier_floor(Tier::L0)
}

fn deployer() -> Actor {
    actor("dana", Role::Deployer)
}

fn model(name: &str, tier: Tier, rollback: RollbackClass) -> ModelSpec {
    ModelSpec {
        name: name.into(),
        class: ModelClass::Llm,
        tier,
        rollback_class: rollback,
        owner: "ml-platform".into(),
        gates: Gates {
            thresholds: [
                (
                    "accuracy".to_string(),
                    Threshold {
                        min: Some(0.8),
                        max: None,
                    },
                ),
                (
                    "latency_ms".to_string(),
                    Threshold {
                        min: None,
                        max: Some(50.0),
                    },
                ),
            ]
            .into(),
            slice_tolerance: 0.02,
        },
        rollout_unit: None,
    }
}

fn version(accuracy: f64, slice_en: f64, dependents: &[&str]) -> VersionSpec {
    VersionSpec {
        artifact: Artifact {
            uri: "file:///models/m.gguf".into(),
            sha256: "ab".repeat(32),
            format: "gguf".into(),
        },
        requirements: Requirements::default(),
        contract: Contract::default(),
        lineage: Lineage {
            training_data: Some("support-tickets@2026-10".into()),
            ..Default::default()
        },
        metrics: Metrics {
            overall: [
                ("accuracy".to_string(), accuracy),
                ("latency_ms".to_string(), 20.0),
            ]
            .into(),
            slices: [(
                "en".to_string(),
                [("accuracy".to_string(), slice_en)].into(),
            )]
            .into(),
        },
        dependents: dependents.iter().map(|s| s.to_string()).collect(),
    }
}

fn go(r: &Registry, a: &Actor, m: &str, v: u32, to: State) -> TransitionOutcome {
    r.transition(
        a,
        m,
        v,
        TransitionRequest {
            to: Some(to),
            ..Default::default()
        },
    )
    .unwrap()
}

fn failed_gates(o: &TransitionOutcome) -> Vec<&str> {
    o.gates
        .iter()
        .filter(|g| !g.passed)
        .map(|g| g.gate.as_str())
        .collect()
}

/// Registers `m` and walks version 1 to promoted, with `approver`'s
/// approval of the promotion when the tier needs one.
fn with_promoted_v1(r: &Registry, spec: ModelSpec, approver: Option<&Actor>) {
    let d = deployer();
    let name = spec.name.clone();
    r.create_model(&d, spec).unwrap();
    r.register_version(&d, &name, version(0.9, 0.9, &[]))
        .unwrap();
    assert!(go(r, &d, &name, 1, State::OfflinePassed).applied);
    if let Some(a) = approver {
        r.approve(a, &name, 1, State::Promoted, None).unwrap();
    }
    let o = go(r, &d, &name, 1, State::Promoted);
    assert!(o.applied, "{:?}", o.gates);
}

#[test]
fn a_version_walks_the_chain_and_the_old_one_is_deprecated() {
    for (db, url, _dir) in backends() {
        let r = open(&url);
        let d = deployer();
        with_promoted_v1(&r, model("m", Tier::L1, RollbackClass::Stateless), None);
        // v2 is worse on a slice than v1 beyond tolerance: refused, and said why.
        r.register_version(&d, "m", version(0.95, 0.85, &[]))
            .unwrap();
        let o = go(&r, &d, "m", 2, State::OfflinePassed);
        assert!(!o.applied, "{db}");
        assert_eq!(failed_gates(&o), ["slice_regression"], "{db}");
        assert!(
            o.gates[2].detail.contains("slice en"),
            "{db}: {:?}",
            o.gates
        );
        // v3 meets everything but may not skip to promoted at L1.
        r.register_version(&d, "m", version(0.95, 0.89, &[]))
            .unwrap();
        assert!(go(&r, &d, "m", 3, State::OfflinePassed).applied, "{db}");
        let o = go(&r, &d, "m", 3, State::Promoted);
        assert_eq!(failed_gates(&o), ["state_machine"], "{db}");
        for s in [State::Shadow, State::Canary] {
            assert!(go(&r, &d, "m", 3, s).applied, "{db} {s}");
        }
        assert_eq!(r.version("m", 3).unwrap().traffic_percent, Some(10.0));
        assert!(go(&r, &d, "m", 3, State::Promoted).applied, "{db}");
        assert_eq!(r.version("m", 1).unwrap().state, State::Deprecated, "{db}");
        assert_eq!(r.version("m", 2).unwrap().state, State::Registered, "{db}");
        // A version missing a declared metric fails the offline gate by name.
        let mut bare = version(0.9, 0.9, &[]);
        bare.metrics.overall.remove("latency_ms");
        r.register_version(&d, "m", bare).unwrap();
        let o = go(&r, &d, "m", 4, State::OfflinePassed);
        assert_eq!(failed_gates(&o), ["offline_metrics"]);
        assert!(o.gates[1].detail.contains("latency_ms is not declared"));
        let v = r.verify().unwrap();
        assert!(v.ok, "{db}: {v:?}");
    }
}

#[test]
fn tiers_demand_their_approvals() {
    for (db, url, _dir) in backends() {
        let r = open(&url);
        let d = deployer();
        let ann = actor("ann", Role::Approver);
        let bob = actor("bob", Role::Approver);
        // L2: canary and promoted need one approver.
        with_promoted_v1(
            &r,
            model("l2", Tier::L2, RollbackClass::Stateless),
            Some(&ann),
        );
        r.register_version(&d, "l2", version(0.9, 0.9, &[]))
            .unwrap();
        assert!(go(&r, &d, "l2", 2, State::OfflinePassed).applied);
        assert!(go(&r, &d, "l2", 2, State::Shadow).applied);
        let o = go(&r, &d, "l2", 2, State::Canary);
        assert_eq!(failed_gates(&o), ["approvals"], "{db}");
        r.approve(&ann, "l2", 2, State::Canary, None).unwrap();
        assert!(go(&r, &d, "l2", 2, State::Canary).applied, "{db}");
        // L3: two distinct approvers at every step; the same one twice is refused.
        r.create_model(&d, model("l3", Tier::L3, RollbackClass::Stateless))
            .unwrap();
        r.register_version(&d, "l3", version(0.9, 0.9, &[]))
            .unwrap();
        let o = go(&r, &d, "l3", 1, State::OfflinePassed);
        assert_eq!(failed_gates(&o), ["approvals"], "{db}");
        r.approve(&ann, "l3", 1, State::OfflinePassed, None)
            .unwrap();
        assert!(matches!(
            r.approve(&ann, "l3", 1, State::OfflinePassed, None),
            Err(RegistryError::Conflict(_))
        ));
        assert!(!go(&r, &d, "l3", 1, State::OfflinePassed).applied);
        r.approve(&bob, "l3", 1, State::OfflinePassed, Some("ok".into()))
            .unwrap();
        assert!(go(&r, &d, "l3", 1, State::OfflinePassed).applied, "{db}");
        // Roles: a deployer cannot approve, an approver cannot move versions.
        assert!(matches!(
            r.approve(&d, "l3", 1, State::Promoted, None),
            Err(RegistryError::Forbidden(_))
        ));
        assert!(matches!(
            r.transition(
                &ann,
                "l3",
                1,
                TransitionRequest {
                    to: Some(State::Shadow),
                    ..Default::default()
                }
            ),
            Err(RegistryError::Forbidden(_))
        ));
    }
}

#[test]
fn irreversible_models_need_an_admin_override_to_promote() {
    for (db, url, _dir) in backends() {
        let r = open(&url);
        let d = deployer();
        let ann = actor("ann", Role::Approver);
        r.create_model(&d, model("irr", Tier::L2, RollbackClass::Irreversible))
            .unwrap();
        r.register_version(&d, "irr", version(0.9, 0.9, &[]))
            .unwrap();
        assert!(go(&r, &d, "irr", 1, State::OfflinePassed).applied);
        r.approve(&ann, "irr", 1, State::Promoted, None).unwrap();
        let o = go(&r, &d, "irr", 1, State::Promoted);
        assert_eq!(failed_gates(&o), ["irreversible"], "{db}");
        let req = || TransitionRequest {
            to: Some(State::Promoted),
            override_reason: Some("contract signed with the customer".into()),
            ..Default::default()
        };
        assert!(matches!(
            r.transition(&d, "irr", 1, req()),
            Err(RegistryError::Forbidden(_))
        ));
        let root = actor("root", Role::Admin);
        let o = r.transition(&root, "irr", 1, req()).unwrap();
        assert!(o.applied, "{db}: {:?}", o.gates);
        let ov = r.version("irr", 1).unwrap().irreversible_override.unwrap();
        assert_eq!(
            (ov.by.as_str(), ov.reason.as_str()),
            ("root", "contract signed with the customer")
        );
        assert_eq!(r.model("irr").unwrap().badges(), ["irreversible"]);
    }
}

#[test]
fn rollback_returns_traffic_and_marks_dependents() {
    for (db, url, _dir) in backends() {
        let r = open(&url);
        let d = deployer();
        // A downstream model built on `base` v2, and one built on that.
        r.create_model(&d, model("ranker", Tier::L0, RollbackClass::Stateless))
            .unwrap();
        r.register_version(&d, "ranker", version(0.9, 0.9, &["reporter@1"]))
            .unwrap();
        r.create_model(&d, model("reporter", Tier::L0, RollbackClass::Stateless))
            .unwrap();
        r.register_version(&d, "reporter", version(0.9, 0.9, &[]))
            .unwrap();
        with_promoted_v1(
            &r,
            model("base", Tier::L1, RollbackClass::StateSnapshot),
            None,
        );
        r.register_version(&d, "base", version(0.9, 0.9, &["ranker@1"]))
            .unwrap();
        for s in [State::OfflinePassed, State::Shadow, State::Canary] {
            assert!(go(&r, &d, "base", 2, s).applied);
        }
        // The preview is the plan, and changes nothing.
        let entries = r.verify().unwrap().entries;
        let preview = r.preview_rollback(&d, "base").unwrap();
        assert_eq!(r.version("base", 2).unwrap().state, State::Canary, "{db}");
        assert!(!r.version("ranker", 1).unwrap().needs_retrain, "{db}");
        assert_eq!(r.verify().unwrap().entries, entries, "{db}");
        // A canary is rolled back; v1 keeps serving.
        let plan = r.rollback(&d, "base", Some("p99 too high".into())).unwrap();
        assert_eq!(
            (
                &preview.rolled_back,
                preview.serving,
                &preview.needs_retrain
            ),
            (&plan.rolled_back, plan.serving, &plan.needs_retrain)
        );
        assert_eq!(
            (plan.rolled_back.as_slice(), plan.serving),
            (&[2][..], Some(1)),
            "{db}"
        );
        assert_eq!(plan.kind, "snapshot_restore");
        assert!(plan.steps[0].contains("snapshot"), "{:?}", plan.steps);
        assert_eq!(plan.needs_retrain, ["ranker@1", "reporter@1"]);
        assert!(r.version("ranker", 1).unwrap().needs_retrain);
        assert!(r.version("reporter", 1).unwrap().needs_retrain);
        assert_eq!(r.version("ranker", 1).unwrap().state, State::Registered);
        // A promoted v3 is rolled back to v1, the version promoted before it.
        r.register_version(&d, "base", version(0.9, 0.9, &[]))
            .unwrap();
        for s in [
            State::OfflinePassed,
            State::Shadow,
            State::Canary,
            State::Promoted,
        ] {
            assert!(go(&r, &d, "base", 3, s).applied);
        }
        let plan = r.rollback(&d, "base", None).unwrap();
        assert_eq!(
            (plan.rolled_back.as_slice(), plan.serving),
            (&[3][..], Some(1)),
            "{db}"
        );
        assert_eq!(r.version("base", 1).unwrap().state, State::Promoted);
        assert_eq!(r.version("base", 3).unwrap().state, State::RolledBack);
        // Nothing earlier than v1 was promoted.
        assert!(matches!(
            r.rollback(&d, "base", None),
            Err(RegistryError::Conflict(_))
        ));
        assert!(r.verify().unwrap().ok);
    }
}

#[test]
fn irreversible_rollback_lists_what_cannot_be_undone() {
    for (_db, url, _dir) in backends() {
        let r = open(&url);
        let d = deployer();
        with_promoted_v1(
            &r,
            model("irr", Tier::L1, RollbackClass::Irreversible),
            None,
        );
        r.register_version(&d, "irr", version(0.9, 0.9, &[]))
            .unwrap();
        for s in [State::OfflinePassed, State::Shadow, State::Canary] {
            assert!(go(&r, &d, "irr", 2, s).applied);
        }
        let plan = r.rollback(&d, "irr", None).unwrap();
        assert_eq!(plan.kind, "irreversible");
        assert_eq!(plan.cannot_undo.len(), 1);
        assert!(
            plan.cannot_undo[0].contains("version 2 served as canary"),
            "{:?}",
            plan.cannot_undo
        );
    }
}

#[test]
fn served_at_replays_the_log() {
    for (db, url, _dir) in backends() {
        let r = open(&url);
        let d = deployer();
        with_promoted_v1(&r, model("m", Tier::L1, RollbackClass::Stateless), None);
        std::thread::sleep(std::time::Duration::from_millis(5));
        let t1 = now_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        r.register_version(&d, "m", version(0.9, 0.9, &[])).unwrap();
        for s in [State::OfflinePassed, State::Shadow, State::Canary] {
            go(&r, &d, "m", 2, s);
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
        let t2 = now_ms();
        std::thread::sleep(std::time::Duration::from_millis(5));
        go(&r, &d, "m", 2, State::Promoted);
        let at = |t| r.served_at("m", t).unwrap();
        assert_eq!(
            (at(t1).primary, at(t1).candidates.len()),
            (Some(1), 0),
            "{db}"
        );
        assert_eq!(at(t2).primary, Some(1));
        assert_eq!(
            at(t2).candidates,
            [ServedCandidate {
                version: 2,
                state: State::Canary,
                traffic_percent: Some(10.0)
            }]
        );
        assert_eq!(at(now_ms()).primary, Some(2));
        assert_eq!(at(0).primary, None);
    }
}

/// Runs `sql` on the database behind the registry's back.
fn raw(db: &str, url: &str, sql: &str) {
    if db == "sqlite" {
        rusqlite::Connection::open(url)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
    } else {
        postgres::Client::connect(url, postgres::NoTls)
            .unwrap()
            .batch_execute(sql)
            .unwrap();
    }
}

/// Edits one row behind the registry's back, the way an attacker with the
/// database file would (first disabling the append-only trigger).
fn tamper(db: &str, url: &str, seq: i64) {
    let unlock = match db {
        "sqlite" => "DROP TRIGGER audit_no_update",
        _ => "ALTER TABLE audit DISABLE TRIGGER audit_append_only",
    };
    raw(
        db,
        url,
        &format!(
            r#"{unlock}; UPDATE audit SET body = replace(body, '"registered"', '"promoted"') WHERE seq = {seq}"#
        ),
    );
}

#[test]
fn the_audit_log_refuses_edits_and_verify_names_the_tampered_entry() {
    for (db, url, _dir) in backends() {
        let r = open(&url);
        with_promoted_v1(&r, model("m", Tier::L1, RollbackClass::Stateless), None);
        let entries = r.audit(None, 0, 100).unwrap();
        assert_eq!(entries.len(), 4, "{db}");
        assert!(r.verify().unwrap().ok);
        // The database itself refuses UPDATE and DELETE on the log.
        let refused = if db == "sqlite" {
            rusqlite::Connection::open(&url)
                .unwrap()
                .execute_batch("DELETE FROM audit WHERE seq = 2")
                .map_err(|e| e.to_string())
        } else {
            postgres::Client::connect(&url, postgres::NoTls)
                .unwrap()
                .batch_execute("DELETE FROM audit WHERE seq = 2")
                .map_err(|e| store::StoreError::from(e).0)
        };
        assert!(refused.unwrap_err().contains("append-only"), "{db}");
        // Entry 2 registers v1; the tamperer claims it was born promoted.
        assert!(
            entries[1].body.contains("\"registered\""),
            "{}",
            entries[1].body
        );
        tamper(db, &url, 2);
        let v = r.verify().unwrap();
        assert!(!v.ok, "{db}");
        let bad = v.first_bad.unwrap();
        assert_eq!(bad.seq, 2, "{db}: {}", bad.reason);
        assert!(r.audit(None, 0, 100).unwrap()[1]
            .body
            .contains("\"promoted\""));
    }
}

/// One random API call in the property test.
#[derive(Debug, Clone)]
enum Call {
    Move {
        version: u32,
        to: State,
        actor: usize,
        override_: bool,
    },
    Approve {
        version: u32,
        to: State,
        approver: usize,
    },
    /// One of the edges out of the version's current state.
    Advance {
        version: u32,
        pick: usize,
        actor: usize,
        override_: bool,
    },
    Rollback,
    Register {
        accuracy: f64,
    },
}

fn call() -> impl Strategy<Value = Call> {
    // Mostly steps up the chain, so that many calls get through their gates.
    let forward = proptest::sample::select(
        ALL_STATES
            .iter()
            .copied()
            .filter(|s| s.is_forward())
            .collect::<Vec<_>>(),
    );
    let state =
        prop_oneof![4 => forward.clone(), 1 => proptest::sample::select(ALL_STATES.to_vec())];
    prop_oneof![
        4 => (1..4u32, state.clone(), 0..4usize, proptest::bool::weighted(0.2))
            .prop_map(|(version, to, actor, override_)| Call::Move { version, to, actor, override_ }),
        3 => (1..4u32, forward, 0..3usize).prop_map(|(version, to, approver)| Call::Approve { version, to, approver }),
        6 => (1..4u32, 0..4usize, proptest::sample::select(vec![0, 0, 0, 1, 2, 3]), proptest::bool::weighted(0.2))
            .prop_map(|(version, pick, actor, override_)| Call::Advance { version, pick, actor, override_ }),
        1 => Just(Call::Rollback),
        1 => (0.7..0.95f64).prop_map(|accuracy| Call::Register { accuracy }),
    ]
}

/// Replays the audit log and checks every applied transition against the
/// rules, independently of the registry's own gate code.
fn check_log(r: &Registry, spec: &ModelSpec) {
    let log = r.audit(None, 0, 100_000).unwrap();
    let mut approvals: BTreeMap<(i64, String), BTreeSet<String>> = BTreeMap::new();
    let mut promoted_once = false;
    for e in &log {
        let b = e.body_json();
        match e.action.as_str() {
            "approve" => {
                approvals
                    .entry((
                        e.version.unwrap(),
                        b["target"].as_str().unwrap().to_string(),
                    ))
                    .or_default()
                    .insert(e.actor.clone());
            }
            "transition" if b.get("gates").is_some() => {
                let from: State = serde_json::from_value(b["before"]["state"].clone()).unwrap();
                let to: State = serde_json::from_value(b["after"]["state"].clone()).unwrap();
                assert!(
                    lifecycle::next_states(from).contains(&to),
                    "{from} → {to} in {e:?}"
                );
                if from == State::OfflinePassed && to == State::Promoted {
                    assert!(spec.tier == Tier::L0 || !promoted_once, "{e:?}");
                }
                let have = approvals
                    .get(&(e.version.unwrap(), to.to_string()))
                    .map_or(0, |s| s.len());
                let need = match spec.tier {
                    Tier::L2 if matches!(to, State::Canary | State::Promoted) => 1,
                    Tier::L3 if to.is_forward() => 2,
                    _ => 0,
                };
                assert!(
                    have >= need,
                    "{:?} {to} with {have} approvers: {e:?}",
                    spec.tier
                );
                if to == State::Promoted
                    && spec.rollback_class == RollbackClass::Irreversible
                    && spec.tier >= Tier::L2
                {
                    assert!(b["override_reason"].is_string(), "{e:?}");
                }
                if to == State::OfflinePassed {
                    assert!(b["gates"][1]["passed"].as_bool().unwrap());
                }
                promoted_once |= to == State::Promoted;
            }
            _ => {}
        }
    }
    assert!(audit::verify(log).ok);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// No sequence of calls takes a version past a gate its tier requires,
    /// and every applied transition is in the audit log exactly once.
    #[test]
    fn no_call_sequence_passes_a_gate_the_tier_requires(
        tier in proptest::sample::select(vec![Tier::L0, Tier::L1, Tier::L2, Tier::L3]),
        irreversible in proptest::bool::ANY,
        calls in proptest::collection::vec(call(), 1..80),
    ) {
        let r = open(":memory:");
        let spec = model("p", tier, if irreversible { RollbackClass::Irreversible } else { RollbackClass::Stateless });
        let d = deployer();
        r.create_model(&d, spec.clone()).unwrap();
        r.register_version(&d, "p", version(0.9, 0.9, &[])).unwrap();
        let actors = [d.clone(), actor("root", Role::Admin), actor("ann", Role::Approver), actor("eve", Role::Viewer)];
        let approvers = [actor("ann", Role::Approver), actor("bob", Role::Approver), actor("root", Role::Admin)];
        let mut applied_seqs = Vec::new();
        for c in calls {
            match c {
                Call::Move { version, to, actor, override_ } => {
                    let req = TransitionRequest {
                        to: Some(to),
                        override_reason: override_.then(|| "accepted risk".to_string()),
                        ..Default::default()
                    };
                    if let Ok(o) = r.transition(&actors[actor], "p", version, req) {
                        if o.applied { applied_seqs.push(o.audit_seq); }
                    }
                }
                Call::Advance { version, pick, actor, override_ } => {
                    let Ok(v) = r.version("p", version) else { continue };
                    let next = lifecycle::next_states(v.state);
                    if next.is_empty() { continue; }
                    let req = TransitionRequest {
                        to: Some(next[pick % next.len()]),
                        override_reason: override_.then(|| "accepted risk".to_string()),
                        ..Default::default()
                    };
                    if let Ok(o) = r.transition(&actors[actor], "p", version, req) {
                        if o.applied { applied_seqs.push(o.audit_seq); }
                    }
                }
                Call::Approve { version, to, approver } => {
                    let _ = r.approve(&approvers[approver], "p", version, to, None);
                }
                Call::Rollback => { let _ = r.rollback(&d, "p", None); }
                Call::Register { accuracy } => {
                    r.register_version(&d, "p", version(accuracy, 0.9, &[])).unwrap();
                }
            }
        }
        check_log(&r, &spec);
        let log = r.audit(None, 0, 100_000).unwrap();
        for seq in &applied_seqs {
            let n = log.iter().filter(|e| e.seq == *seq && e.action == "transition").count();
            prop_assert_eq!(n, 1);
        }
        let refused_or_applied = log.iter().filter(|e| e.action == "transition" && e.body_json()["gates"].is_array()).count();
        prop_assert_eq!(refused_or_applied, applied_seqs.len());
    }
}

#[test]
fn a_dropped_postgres_connection_is_reopened() {
    let Some((_, url, _dir)) = backends().into_iter().find(|b| b.0 == "postgres") else {
        return;
    };
    let r = open(&url);
    r.create_model(&deployer(), model("m", Tier::L0, RollbackClass::Stateless))
        .unwrap();
    // The server ends the registry's session, as a restart or failover would.
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .unwrap();
    // Outside a transaction nothing was lost: the very next read and write
    // run on a new connection.
    assert_eq!(r.models().unwrap().len(), 1);
    admin
        .batch_execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .unwrap();
    r.create_model(&deployer(), model("n", Tier::L0, RollbackClass::Stateless))
        .unwrap();
    assert_eq!(r.models().unwrap().len(), 2);
    assert!(r.verify().unwrap().ok, "the audit chain holds");
}

#[test]
fn only_admins_create_models_below_the_tier_floor() {
    for (_, url, _dir) in backends() {
        let r = Registry::open(&url).unwrap();
        let e = r
            .create_model(
                &deployer(),
                model("low", Tier::L1, RollbackClass::Stateless),
            )
            .unwrap_err();
        assert!(
            matches!(&e, RegistryError::Forbidden(m) if m.contains("L2")),
            "{e:?}"
        );
        r.create_model(
            &deployer(),
            model("high", Tier::L2, RollbackClass::Stateless),
        )
        .unwrap();
        r.create_model(
            &actor("root", Role::Admin),
            model("low", Tier::L0, RollbackClass::Stateless),
        )
        .unwrap();
        assert_eq!(r.models().unwrap().len(), 2);
    }
}

/// `sslmode=require` connects over TLS, verified against the server's CA;
/// a server whose certificate the roots do not vouch for is refused.
#[test]
fn postgres_over_tls_verifies_the_server() {
    let (Ok(base), Ok(ca)) = (
        std::env::var("SWITCHYARD_TEST_POSTGRES_URL"),
        std::env::var("SWITCHYARD_TEST_POSTGRES_CA"),
    ) else {
        assert!(
            std::env::var_os("CI").is_none(),
            "CI runs need SWITCHYARD_TEST_POSTGRES_URL and _CA (scripts/test.sh sets them)"
        );
        eprintln!("no PostgreSQL with TLS (SWITCHYARD_TEST_POSTGRES_URL, _CA): not run");
        return;
    };
    let ca = std::path::Path::new(&ca);
    let url = format!("{}?sslmode=require", fresh_pg_database(&base));
    let r = Registry::open_with_ca(&url, Some(ca)).unwrap();
    r.create_model(
        &deployer(),
        model("tls", Tier::L2, RollbackClass::Stateless),
    )
    .unwrap();
    assert_eq!(r.models().unwrap().len(), 1);
    let mut c = postgres::Client::connect(&url, super::tls::Tls::new(Some(ca)).unwrap()).unwrap();
    let row = c
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .unwrap();
    assert!(row.get::<_, bool>(0), "the session is encrypted");
    let e = Registry::open_with_ca(&url, None).err().unwrap();
    assert!(format!("{e}").to_lowercase().contains("certificate"), "{e}");
}

/// A database as the binaries before schema versioning left it (no
/// `schema_version`) opens, is migrated, and keeps its audit chain
/// verifiable; one written by a newer binary is refused.
#[test]
fn an_older_database_is_migrated_and_a_newer_one_refused() {
    for (db, url, _dir) in backends() {
        let r = open(&url);
        with_promoted_v1(&r, model("m", Tier::L1, RollbackClass::Stateless), None);
        drop(r);
        raw(
            db,
            &url,
            "DROP TABLE schema_version; DROP INDEX audit_by_model; DROP INDEX request_log_by_route",
        );
        let r = open(&url);
        assert_eq!(r.audit(None, 0, 100).unwrap().len(), 4, "{db}");
        assert!(r.verify().unwrap().ok, "{db}");
        let version = r
            .lock()
            .query("SELECT MAX(version) FROM schema_version", &[])
            .unwrap();
        assert_eq!(
            version[0][0],
            store::Sql::Int(store::SCHEMA_VERSION),
            "{db}"
        );
        drop(r);
        // Opening again changes nothing.
        assert!(open(&url).verify().unwrap().ok, "{db}");
        raw(
            db,
            &url,
            "INSERT INTO schema_version (version, at_ms) VALUES (99, 0)",
        );
        let refused = Registry::open(&url)
            .err()
            .expect("a newer schema is refused");
        assert!(
            refused.to_string().contains("schema version 99"),
            "{db}: {refused}"
        );
    }
}
