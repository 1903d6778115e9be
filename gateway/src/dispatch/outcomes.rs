//! Outcomes per route version, recorded by the dispatch layer for every
//! front and judged by the rollout policies.
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

/// How one routed request ended, for the version that served it.
#[derive(Clone, Copy)]
struct Sample {
    at_ms: i64,
    ok: bool,
    latency_ms: f64,
}

/// A route and one of its versions.
type RouteVersion = (String, u32);

/// Recent outcomes per (route, version), for the rollout policies.
#[derive(Clone, Default)]
pub struct VersionOutcomes {
    inner: Arc<Mutex<HashMap<RouteVersion, VecDeque<Sample>>>>,
}

/// Samples kept per version.
const KEEP: usize = 50_000;

impl VersionOutcomes {
    pub fn record(&self, route: &str, version: u32, ok: bool, latency_s: f64) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let q = g.entry((route.into(), version)).or_default();
        if q.len() == KEEP {
            q.pop_front();
        }
        q.push_back(Sample {
            at_ms: crate::registry::now_ms(),
            ok,
            latency_ms: latency_s * 1e3,
        });
    }

    /// What a version served since `since_ms`: requests, errors, and the
    /// p50 and p99 latency (ms) of the successful ones.
    pub fn recent(&self, route: &str, version: u32, since_ms: i64) -> Window {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let Some(q) = g.get(&(route.to_string(), version)) else {
            return Window::default();
        };
        let recent: Vec<&Sample> = q.iter().filter(|s| s.at_ms >= since_ms).collect();
        let mut lat: Vec<f64> = recent
            .iter()
            .filter(|s| s.ok)
            .map(|s| s.latency_ms)
            .collect();
        lat.sort_by(f64::total_cmp);
        let at =
            |q: f64| (!lat.is_empty()).then(|| lat[((lat.len() - 1) as f64 * q).round() as usize]);
        Window {
            requests: recent.len() as u64,
            errors: recent.iter().filter(|s| !s.ok).count() as u64,
            p50_ms: at(0.5),
            p99_ms: at(0.99),
        }
    }
}

/// A version's outcomes over a recent window.
#[derive(Debug, Default, Clone, Copy, serde::Serialize)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

/// Each LLM route version's statistics.
type LlmRoutes = std::collections::BTreeMap<(String, i64), Arc<engine::dnn::stats::VersionStats>>;

/// Triton's statistics for LLM routes, per (route, version), as the
/// statistics extension reports a vLLM backend model's: each request one
/// execution, its time to the first token (queue and prefill) as
/// `compute_input`, the rest of the generation as `compute_infer`.
#[derive(Clone, Default)]
pub struct LlmStatistics {
    inner: Arc<Mutex<LlmRoutes>>,
}

impl LlmStatistics {
    fn of(&self, route: &str, version: i64) -> Arc<engine::dnn::stats::VersionStats> {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.entry((route.to_string(), version))
            .or_insert_with(|| Arc::new(engine::dnn::stats::VersionStats::new(route, version)))
            .clone()
    }

    pub fn record(&self, route: &str, version: i64, o: &crate::experiment_stats::Outcome) {
        use std::time::Duration;
        let stats = self.of(route, version);
        let total = Duration::from_secs_f64(o.latency_s.max(0.0));
        if !o.ok {
            stats.failure(total, engine::dnn::stats::FailReason::Backend);
            return;
        }
        let first =
            Duration::from_secs_f64(o.ttft_s.unwrap_or(o.latency_s).clamp(0.0, o.latency_s));
        stats.execution(&engine::dnn::stats::Execution {
            requests: 1,
            rows: 1,
            compute_input: first,
            compute_infer: total - first,
            compute_output: Duration::ZERO,
        });
        stats.success(Duration::ZERO, total);
    }

    /// A route's statistics (zeros before its first request), per version asked for.
    pub fn snapshot(
        &self,
        route: &str,
        versions: &[i64],
    ) -> Vec<(String, i64, engine::dnn::StatsSnapshot)> {
        versions
            .iter()
            .map(|&v| (route.to_string(), v, self.of(route, v).snapshot()))
            .collect()
    }

    /// Every route that served a request.
    pub fn all(&self) -> Vec<(String, i64, engine::dnn::StatsSnapshot)> {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.iter()
            .map(|((r, v), s)| (r.clone(), *v, s.snapshot()))
            .collect()
    }
}
