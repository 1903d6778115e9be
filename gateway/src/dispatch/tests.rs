//! Resolution and outcome recording, on a tiny seeded model.
use super::llm::Generation;
use super::mirror::ShadowPolicy;
use super::routing::{Candidate, Deployment, Route, Shadow};
use super::*;
use crate::registry::testing::tiny_engine;
use engine::llm::{GenerationRequest, LlmEngine, SamplingParams};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// One engine stands for every version: resolution only looks at versions.
fn engine() -> LlmEngine {
    static ENGINE: OnceLock<LlmEngine> = OnceLock::new();
    ENGINE.get_or_init(|| tiny_engine("m")).clone()
}

fn deployment(v: u32) -> Deployment {
    Deployment {
        version: Some(v),
        engine: engine(),
    }
}

/// Route `m`: version 1 primary, version 2 a 30% canary, version 3 a shadow
/// sampling `shadow_percent` of the requests.
fn table(shadow_percent: f64) -> RouteTable {
    let mut t = RouteTable::default();
    t.routes.insert(
        "m".into(),
        Route {
            unit_header: None,
            primary: deployment(1),
            candidate: Some(Candidate {
                deployment: deployment(2),
                arm: Arm::Canary,
                percent: 30.0,
            }),
            shadows: vec![Shadow {
                deployment: deployment(3),
                policy: ShadowPolicy {
                    sample_percent: shadow_percent,
                    ..Default::default()
                },
            }],
        },
    );
    t
}

fn no_experiment(_: &Experiment) -> Option<String> {
    None
}

#[test]
fn the_canary_gets_its_share_by_sticky_unit() {
    let t = table(100.0);
    let mut canary = 0;
    for i in 0..2000 {
        let unit = format!("user-{i}");
        let r = resolve_llm(&t, "m", Some(&unit), no_experiment)
            .unwrap()
            .unwrap();
        let in_share = sticky_hash::bucket("m/rollout", &unit) < 3000;
        assert_eq!(r.arm == Arm::Canary, in_share, "{unit}");
        assert_eq!(r.version, Some(if in_share { 2 } else { 1 }));
        assert_eq!((r.route.as_str(), r.model.as_str()), ("m", "m"));
        let again = resolve_llm(&t, "m", Some(&unit), no_experiment)
            .unwrap()
            .unwrap();
        assert_eq!(again.version, r.version, "the same unit, the same version");
        assert_eq!(r.shadows.len(), 1);
        assert_eq!(r.shadows[0].label, "3");
        canary += usize::from(in_share);
    }
    // Binomial(2000, 0.3): sd ≈ 20.5; 5 sd either side.
    assert!((497..=703).contains(&canary), "{canary} of 2000");
}

#[test]
fn a_pinned_version_has_no_arms_and_no_shadows() {
    let t = table(100.0);
    let r = resolve_llm(&t, "m@3", None, no_experiment)
        .unwrap()
        .unwrap();
    assert_eq!((r.version, r.arm.clone()), (Some(3), Arm::Pinned));
    assert!(r.shadows.is_empty());
    assert!(resolve_llm(&t, "m@9", None, no_experiment)
        .unwrap()
        .is_none());
    assert!(resolve_llm(&t, "other", None, no_experiment)
        .unwrap()
        .is_none());
}

const EXPERIMENT: &str = r#"
experiments:
  - name: brief
    route: m
    unit: header:x-user
    arms:
      - {name: a, weight: 1, deployment: m@1}
      - {name: b, weight: 1, deployment: m@2}
      - name: s
        deployment: m@3
        prompt: {system: "Answer briefly."}
        shadow: {sample_percent: 25, max_in_flight: 2, timeout_ms: 1000}
"#;

#[test]
fn an_experiment_route_keeps_its_shadows_and_adds_its_shadow_arms() {
    let mut t = table(100.0);
    t.experiments =
        Arc::new(crate::dispatch::experiments::ExperimentTable::parse(EXPERIMENT).unwrap());
    let mut seen = std::collections::HashSet::new();
    for i in 0..200 {
        let unit = format!("u{i}");
        let r = resolve_llm(&t, "m", None, |_| Some(unit.clone()))
            .unwrap()
            .unwrap();
        let Arm::Experiment(arm) = &r.arm else {
            panic!("an experiment arm, got {:?}", r.arm)
        };
        assert_eq!(r.version, Some(if arm == "a" { 1 } else { 2 }), "{arm}");
        assert_ne!(arm, "s", "a shadow arm never serves");
        seen.insert(arm.clone());
        let labels: Vec<_> = r.shadows.iter().map(|s| s.label.as_str()).collect();
        assert_eq!(labels, ["3", "brief/s"]);
        let arm_shadow = &r.shadows[1];
        assert_eq!(arm_shadow.system.as_deref(), Some("Answer briefly."));
        assert_eq!(arm_shadow.policy.sample_percent, 25.0);
        assert_eq!(r.served().experiment.as_deref(), Some("brief"));
    }
    assert_eq!(seen.len(), 2, "both served arms get units: {seen:?}");
}

#[test]
fn an_experiment_arm_naming_the_route_keeps_its_canary_share() {
    let mut t = table(100.0);
    let text = EXPERIMENT.replace("deployment: m@1", "deployment: m");
    t.experiments = Arc::new(crate::dispatch::experiments::ExperimentTable::parse(&text).unwrap());
    let mut on_canary = 0;
    for i in 0..400 {
        let unit = format!("u{i}");
        let r = resolve_llm(&t, "m", None, |_| Some(unit.clone()))
            .unwrap()
            .unwrap();
        if r.arm != Arm::Experiment("a".into()) {
            continue;
        }
        let canary = sticky_hash::bucket("m/rollout", &unit) < 3000;
        assert_eq!(r.version, Some(if canary { 2 } else { 1 }), "{unit}");
        on_canary += usize::from(canary);
    }
    assert!(on_canary > 0);
}

#[test]
fn an_experiment_arm_that_is_not_loaded_is_unavailable() {
    let mut t = table(100.0);
    let text = EXPERIMENT.replace("m@2", "m@7").replace("m@1", "m@7");
    t.experiments = Arc::new(crate::dispatch::experiments::ExperimentTable::parse(&text).unwrap());
    let err = resolve_llm(&t, "m", None, |_| Some("u".into()))
        .err()
        .expect("unavailable");
    assert!(err.0.contains("`m@7` is not loaded"), "{}", err.0);
}

#[test]
fn shadow_arms_are_checked_when_the_file_loads() {
    for (from, to, says) in [
        (
            "- name: s\n",
            "- name: s\n        weight: 1\n",
            "leave its weight out",
        ),
        (
            "prompt: {system: \"Answer briefly.\"}",
            "prompt: {temperature: 0.5}",
            "takes only a `system` prompt",
        ),
        (
            "sample_percent: 25",
            "sample_percent: 250",
            "sample_percent",
        ),
    ] {
        let text = EXPERIMENT.replace(from, to);
        assert_ne!(text, EXPERIMENT, "{from}");
        let err = crate::dispatch::experiments::ExperimentTable::parse(&text).unwrap_err();
        assert!(err.contains(says), "{err}");
    }
}

fn generation(request_id: &str) -> Generation {
    Generation {
        request: GenerationRequest {
            prompt: vec![5, 6, 7],
            sampling: SamplingParams {
                temperature: 0.0,
                ..SamplingParams::default()
            },
            max_tokens: 3,
            min_tokens: 0,
            stop: vec![],
            ignore_eos: true,
            n: 1,
            constraint: None,
        },
        request_id: request_id.into(),
        shadow_prompts: vec![],
    }
}

/// Waits (bounded) until `done` holds.
async fn until(what: &str, done: impl Fn() -> bool) {
    tokio::time::timeout(Duration::from_secs(60), async {
        while !done() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("timed out waiting for {what}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_reach_the_version_and_sampled_shadows() {
    let rec = Recorders::default();
    // Request ids in and out of a 25% shadow sample.
    let policy = ShadowPolicy {
        sample_percent: 25.0,
        ..Default::default()
    };
    let ids: Vec<String> = (0..40).map(|i| format!("req-{i}")).collect();
    let (inside, outside): (Vec<_>, Vec<_>) =
        ids.iter().partition(|id| policy.samples("m", "3", id));
    let t = table(25.0);
    for id in [inside[0], inside[1], outside[0]] {
        let target = resolve_llm(&t, "m", Some(id), no_experiment)
            .unwrap()
            .unwrap();
        let mut rx = target.start(&rec, generation(id)).unwrap();
        while rx.recv().await.is_some() {}
    }
    let served = |v| rec.versions.recent("m", v, 0).requests;
    until("three outcomes", || served(1) + served(2) == 3).await;
    until("two shadow comparisons", || {
        rec.shadows.counts("m", "3").compared == 2
    })
    .await;
    let c = rec.shadows.counts("m", "3");
    assert_eq!(c.errors, 0);
    // The same engine shadows itself, so greedy answers agree exactly.
    assert_eq!(c.similarity, Some(1.0));
}

#[test]
fn the_model_record_can_name_the_rollout_unit_header() {
    use axum::http::HeaderMap;
    let mut t = table(100.0);
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", "acme".parse().unwrap());
    headers.insert(UNIT_HEADER, "other".parse().unwrap());
    // Without a named header: the front's own unit, else x-switchyard-unit.
    assert_eq!(
        unit(&t, "m", &headers, Some("u".into())).as_deref(),
        Some("u")
    );
    assert_eq!(unit(&t, "m", &headers, None).as_deref(), Some("other"));
    t.routes.get_mut("m").unwrap().unit_header = Some("x-tenant".into());
    assert_eq!(
        unit(&t, "m", &headers, Some("u".into())).as_deref(),
        Some("acme")
    );
    assert_eq!(unit(&t, "m@2", &headers, None).as_deref(), Some("acme"));
    headers.remove("x-tenant");
    assert_eq!(
        unit(&t, "m", &headers, Some("u".into())).as_deref(),
        Some("u")
    );
}
