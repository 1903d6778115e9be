//! What each experiment arm saw: requests, errors, latency, time to first
//! token, output tokens and user feedback, and the summary that compares arms
//! with the first (control) arm: effect sizes, a Mann-Whitney test for
//! latency, two-proportion tests for error and positive-feedback rates, and
//! whether the sample is large enough yet.
use serde_json::{json, Value};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// Samples kept per arm and metric (the oldest are dropped beyond it).
const MAX_SAMPLES: usize = 100_000;
/// Request ids remembered for feedback.
const MAX_REQUESTS: usize = 200_000;

/// Why feedback was not recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum FeedbackError {
    /// No such request (or it is too old to remember).
    Unknown(String),
    /// The request was scored already.
    Duplicate(String),
}

#[derive(Debug, Default, Clone)]
struct ArmStats {
    requests: u64,
    errors: u64,
    random: u64,
    latency_ms: VecDeque<f64>,
    ttft_ms: VecDeque<f64>,
    output_tokens: VecDeque<f64>,
    feedback: VecDeque<f64>,
}

fn push(v: &mut VecDeque<f64>, x: f64) {
    if v.len() == MAX_SAMPLES {
        v.pop_front();
    }
    v.push_back(x);
}

/// How one request ended.
#[derive(Default)]
pub struct Outcome {
    pub ok: bool,
    pub latency_s: f64,
    pub ttft_s: Option<f64>,
    pub output_tokens: usize,
    pub random: bool,
}

#[derive(Default)]
struct Inner {
    arms: HashMap<(String, String), ArmStats>,
    /// Experiment, arm, and whether feedback was given, per request id.
    requests: HashMap<String, (String, String, bool)>,
    order: VecDeque<String>,
}

/// Shared by the handlers; survives reloads of the experiments file.
#[derive(Clone, Default)]
pub struct ExperimentStats {
    inner: Arc<Mutex<Inner>>,
}

impl ExperimentStats {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers which arm served `request_id`, for feedback.
    pub fn remember(&self, request_id: &str, experiment: &str, arm: &str) {
        let mut g = self.lock();
        if g.order.len() == MAX_REQUESTS {
            if let Some(old) = g.order.pop_front() {
                g.requests.remove(&old);
            }
        }
        g.order.push_back(request_id.to_string());
        g.requests.insert(
            request_id.to_string(),
            (experiment.into(), arm.into(), false),
        );
    }

    pub fn record(&self, experiment: &str, arm: &str, o: &Outcome) {
        let labels = [
            ("experiment", experiment.to_string()),
            ("arm", arm.to_string()),
        ];
        metrics::counter!("switchyard:experiment_requests_total", &labels).increment(1);
        metrics::histogram!("switchyard:experiment_latency_seconds", &labels).record(o.latency_s);
        if let Some(t) = o.ttft_s {
            metrics::histogram!("switchyard:experiment_ttft_seconds", &labels).record(t);
        }
        metrics::counter!("switchyard:experiment_output_tokens_total", &labels)
            .increment(o.output_tokens as u64);
        if !o.ok {
            metrics::counter!("switchyard:experiment_errors_total", &labels).increment(1);
        }
        if o.random {
            metrics::counter!("switchyard:experiment_random_assignments_total", &labels)
                .increment(1);
        }
        let mut g = self.lock();
        let s = g
            .arms
            .entry((experiment.to_string(), arm.to_string()))
            .or_default();
        s.requests += 1;
        s.random += u64::from(o.random);
        if o.ok {
            push(&mut s.latency_ms, o.latency_s * 1e3);
            if let Some(t) = o.ttft_s {
                push(&mut s.ttft_ms, t * 1e3);
            }
            push(&mut s.output_tokens, o.output_tokens as f64);
        } else {
            s.errors += 1;
        }
    }

    /// Records a user's score for the request's arm; `Err` when the id is unknown.
    /// Credits `score` to the arm that served `request_id`, once per request.
    pub fn feedback(
        &self,
        request_id: &str,
        score: f64,
    ) -> Result<(String, String), FeedbackError> {
        let mut g = self.lock();
        let entry = g.requests.get_mut(request_id).ok_or_else(|| {
            FeedbackError::Unknown(format!("no experiment request with id `{request_id}` (ids are kept for the last {MAX_REQUESTS} requests)"))
        })?;
        if entry.2 {
            return Err(FeedbackError::Duplicate(format!(
                "feedback for `{request_id}` was recorded already; each request is scored once"
            )));
        }
        entry.2 = true;
        let (exp, arm) = (entry.0.clone(), entry.1.clone());
        push(
            &mut g
                .arms
                .entry((exp.clone(), arm.clone()))
                .or_default()
                .feedback,
            score,
        );
        metrics::counter!("switchyard:experiment_feedback_total", "experiment" => exp.clone(), "arm" => arm.clone())
            .increment(1);
        Ok((exp, arm))
    }

    /// Per-arm figures and each arm against the first (control) arm.
    pub fn summary(&self, experiment: &str, arms: &[String]) -> Value {
        let g = self.lock();
        let get = |a: &str| {
            g.arms
                .get(&(experiment.to_string(), a.to_string()))
                .cloned()
                .unwrap_or_default()
        };
        let mut names: Vec<String> = arms.to_vec();
        names.push("holdout".into());
        let per_arm: Vec<Value> = names
            .iter()
            .map(|a| arm_json(a, &get(a)))
            .filter(|v| v["name"] != "holdout" || v["requests"] != 0)
            .collect();
        let control = get(&arms[0]);
        let comparisons: Vec<Value> = arms[1..]
            .iter()
            .map(|a| compare(&arms[0], &control, a, &get(a)))
            .collect();
        json!({"experiment": experiment, "control": arms[0], "arms": per_arm, "comparisons": comparisons})
    }
}

fn sorted(v: &VecDeque<f64>) -> Vec<f64> {
    let mut s: Vec<f64> = v.iter().copied().collect();
    s.sort_by(f64::total_cmp);
    s
}

fn percentile(sorted: &[f64], p: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    Some(sorted[i])
}

fn mean(v: &VecDeque<f64>) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

fn positives(v: &VecDeque<f64>) -> u64 {
    v.iter().filter(|&&x| x > 0.0).count() as u64
}

fn arm_json(name: &str, s: &ArmStats) -> Value {
    let lat = sorted(&s.latency_ms);
    let ttft = sorted(&s.ttft_ms);
    json!({
        "name": name,
        "requests": s.requests,
        "errors": s.errors,
        "error_rate": ratio(s.errors, s.requests),
        "random_assignments": s.random,
        "latency_ms": {"p50": percentile(&lat, 50.0), "p95": percentile(&lat, 95.0), "p99": percentile(&lat, 99.0), "mean": mean(&s.latency_ms)},
        "ttft_ms": {"p50": percentile(&ttft, 50.0), "p95": percentile(&ttft, 95.0)},
        "output_tokens": {"total": s.output_tokens.iter().sum::<f64>(), "mean": mean(&s.output_tokens)},
        "feedback": {"count": s.feedback.len(), "mean": mean(&s.feedback), "positive_rate": ratio(positives(&s.feedback), s.feedback.len() as u64)},
    })
}

fn ratio(a: u64, b: u64) -> Option<f64> {
    (b > 0).then(|| a as f64 / b as f64)
}

/// Each test of `arm` against `control`, with the sample it would need.
fn compare(control_name: &str, c: &ArmStats, arm: &str, t: &ArmStats) -> Value {
    let (cl, tl): (Vec<f64>, Vec<f64>) = (
        c.latency_ms.iter().copied().collect(),
        t.latency_ms.iter().copied().collect(),
    );
    let latency = mann_whitney(&cl, &tl).map(|(u, p)| {
        let (mc, mt) = (
            mean(&c.latency_ms).unwrap_or(0.0),
            mean(&t.latency_ms).unwrap_or(0.0),
        );
        let d = cohens_d(&cl, &tl);
        let need = d.map(required_n_means);
        json!({
            "test": "mann_whitney_u", "u": u, "p_value": p,
            "mean_ratio": (mc > 0.0).then(|| mt / mc),
            "cohens_d": d,
            "required_per_arm": need,
            "enough_data": need.is_some_and(|n| cl.len().min(tl.len()) as f64 >= n),
        })
    });
    let errors = proportion_test(c.errors, c.requests, t.errors, t.requests);
    let fb = proportion_test(
        positives(&c.feedback),
        c.feedback.len() as u64,
        positives(&t.feedback),
        t.feedback.len() as u64,
    );
    json!({"control": control_name, "arm": arm, "latency": latency, "error_rate": errors, "positive_feedback_rate": fb})
}

/// Two-sided two-proportion z-test (pooled), with the effect and the sample
/// each arm needs to detect it at α = 0.05 and 80% power.
fn proportion_test(x1: u64, n1: u64, x2: u64, n2: u64) -> Option<Value> {
    if n1 == 0 || n2 == 0 {
        return None;
    }
    let (p1, p2) = (x1 as f64 / n1 as f64, x2 as f64 / n2 as f64);
    let p = (x1 + x2) as f64 / (n1 + n2) as f64;
    let se = (p * (1.0 - p) * (1.0 / n1 as f64 + 1.0 / n2 as f64)).sqrt();
    let z = if se > 0.0 { (p2 - p1) / se } else { 0.0 };
    let diff = p2 - p1;
    let need = (diff != 0.0).then(|| {
        let (za, zb): (f64, f64) = (1.959_964, 0.841_621);
        ((za + zb).powi(2) * (p1 * (1.0 - p1) + p2 * (1.0 - p2)) / (diff * diff)).ceil()
    });
    Some(json!({
        "test": "two_proportion_z", "control_rate": p1, "arm_rate": p2, "difference": diff,
        "z": z, "p_value": 2.0 * (1.0 - normal_cdf(z.abs())),
        "required_per_arm": need,
        "enough_data": need.is_some_and(|n| n1.min(n2) as f64 >= n),
    }))
}

/// Mann-Whitney U of `y` against `x` with the normal approximation (tie
/// corrected, continuity corrected); returns (U of y, two-sided p).
pub fn mann_whitney(x: &[f64], y: &[f64]) -> Option<(f64, f64)> {
    let (n1, n2) = (x.len() as f64, y.len() as f64);
    if x.is_empty() || y.is_empty() {
        return None;
    }
    let mut all: Vec<(f64, bool)> = x
        .iter()
        .map(|&v| (v, false))
        .chain(y.iter().map(|&v| (v, true)))
        .collect();
    all.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (mut rank_y, mut ties) = (0.0, 0.0);
    let mut i = 0;
    while i < all.len() {
        let mut j = i;
        while j + 1 < all.len() && all[j + 1].0 == all[i].0 {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        rank_y += all[i..=j].iter().filter(|e| e.1).count() as f64 * avg;
        i = j + 1;
    }
    let u = rank_y - n2 * (n2 + 1.0) / 2.0;
    let n = n1 + n2;
    let var = n1 * n2 / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    if var <= 0.0 {
        return Some((u, 1.0));
    }
    let diff = u - n1 * n2 / 2.0;
    let z = (diff.abs() - 0.5).max(0.0) / var.sqrt();
    Some((u, (2.0 * (1.0 - normal_cdf(z))).min(1.0)))
}

fn cohens_d(x: &[f64], y: &[f64]) -> Option<f64> {
    if x.len() < 2 || y.len() < 2 {
        return None;
    }
    let m = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let var =
        |v: &[f64], m: f64| v.iter().map(|a| (a - m).powi(2)).sum::<f64>() / (v.len() - 1) as f64;
    let (mx, my) = (m(x), m(y));
    let pooled = (((x.len() - 1) as f64 * var(x, mx) + (y.len() - 1) as f64 * var(y, my))
        / (x.len() + y.len() - 2) as f64)
        .sqrt();
    (pooled > 0.0).then(|| (my - mx) / pooled)
}

/// Per-arm sample to detect a standardized effect `d` (α = 0.05, power 0.8),
/// inflated by π/3 for the Mann-Whitney test's efficiency in the worst case.
fn required_n_means(d: f64) -> f64 {
    let (za, zb) = (1.959_964, 0.841_621);
    (2.0 * (za + zb) * (za + zb) / (d * d) * std::f64::consts::PI / 3.0).ceil()
}

/// Φ(z), from erf by Abramowitz and Stegun 7.1.26 (|error| < 1.5e-7).
pub fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tests_agree_with_hand_computed_values() {
        assert!((normal_cdf(1.959_964) - 0.975).abs() < 1e-6);
        assert!((normal_cdf(-1.0) - 0.158_655_25).abs() < 1e-6);
        // 50/100 vs 60/100: pooled p 0.55, z = 1.4213, p = 0.1552.
        let v = proportion_test(50, 100, 60, 100).unwrap();
        assert!((v["z"].as_f64().unwrap() - 1.4213).abs() < 1e-3, "{v}");
        assert!(
            (v["p_value"].as_f64().unwrap() - 0.1552).abs() < 1e-3,
            "{v}"
        );
        // 0.5 vs 0.6 needs 385 per arm at α 0.05 and 80% power.
        assert_eq!(v["required_per_arm"], 385.0);
        // U for fully separated samples is n1·n2; identical samples give p = 1.
        let (u, p) = mann_whitney(&[1.0, 2.0, 3.0, 4.0, 5.0], &[6.0, 7.0, 8.0, 9.0, 10.0]).unwrap();
        assert_eq!(u, 25.0);
        // n = 5 + 5, σ_U = sqrt(5·5·11/12) = 4.787; z = (12.5 − 0.5)/4.787 = 2.507; p = 0.0122.
        assert!((p - 0.0122).abs() < 1e-3, "{p}");
        let same: Vec<f64> = (0..50).map(f64::from).collect();
        assert!(mann_whitney(&same, &same).unwrap().1 > 0.999);
    }

    #[test]
    fn the_summary_counts_what_was_recorded() {
        let s = ExperimentStats::default();
        let ok = |latency_s| Outcome {
            ok: true,
            latency_s,
            ttft_s: Some(0.01),
            output_tokens: 4,
            random: false,
        };
        for i in 0..30 {
            s.record("e", "a", &ok(0.1 + f64::from(i) * 1e-3));
            s.record("e", "b", &ok(0.2 + f64::from(i) * 1e-3));
        }
        s.record(
            "e",
            "b",
            &Outcome {
                ok: false,
                latency_s: 0.0,
                ttft_s: None,
                output_tokens: 0,
                random: true,
            },
        );
        s.remember("req-1", "e", "b");
        assert!(s.feedback("req-1", 1.0).is_ok());
        assert!(matches!(
            s.feedback("req-1", 1.0),
            Err(FeedbackError::Duplicate(_))
        ));
        assert!(matches!(
            s.feedback("nope", 1.0),
            Err(FeedbackError::Unknown(_))
        ));
        let v = s.summary("e", &["a".into(), "b".into()]);
        assert_eq!(v["arms"][1]["requests"], 31);
        assert_eq!(v["arms"][1]["errors"], 1);
        assert_eq!(v["arms"][1]["random_assignments"], 1);
        assert_eq!(v["arms"][1]["feedback"]["count"], 1);
        assert_eq!(v["arms"][0]["output_tokens"]["total"], 120.0);
        let lat = &v["comparisons"][0]["latency"];
        assert!(lat["p_value"].as_f64().unwrap() < 1e-6, "{lat}");
        assert!(lat["enough_data"].as_bool().unwrap(), "{lat}");
    }
}
