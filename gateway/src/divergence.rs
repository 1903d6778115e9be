//! How far a shadow's answers are from the primary's on the same requests:
//! exact-match rate, token-level similarity (1 − normalized edit distance over
//! word and punctuation tokens), length ratio, errors and latency, per route
//! and shadow version.
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// One request's comparison.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Comparison {
    pub exact: bool,
    pub similarity: f64,
    /// Shadow length ÷ primary length, in tokens (1 when both are empty).
    pub length_ratio: f64,
}

fn tokens(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = None;
    for (i, c) in text.char_indices() {
        if c.is_alphanumeric() {
            start.get_or_insert(i);
            continue;
        }
        if let Some(s) = start.take() {
            out.push(&text[s..i]);
        }
        if !c.is_whitespace() {
            out.push(&text[i..i + c.len_utf8()]);
        }
    }
    if let Some(s) = start {
        out.push(&text[s..]);
    }
    out
}

fn edit_distance(a: &[&str], b: &[&str]) -> usize {
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, x) in a.iter().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, y) in b.iter().enumerate() {
            cur[j + 1] = (prev[j] + usize::from(x != y))
                .min(prev[j + 1] + 1)
                .min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

pub fn compare(primary: &str, shadow: &str) -> Comparison {
    let (p, s) = (tokens(primary), tokens(shadow));
    let longest = p.len().max(s.len());
    Comparison {
        exact: primary == shadow,
        similarity: if longest == 0 {
            1.0
        } else {
            1.0 - edit_distance(&p, &s) as f64 / longest as f64
        },
        length_ratio: match (p.len(), s.len()) {
            (0, 0) => 1.0,
            (0, _) => f64::INFINITY,
            (n, m) => m as f64 / n as f64,
        },
    }
}

#[derive(Default, Clone)]
struct Totals {
    compared: u64,
    exact: u64,
    similarity: f64,
    length_ratio: f64,
    errors: u64,
    skipped: u64,
    primary_s: f64,
    shadow_s: f64,
}

/// A route and one of its shadow versions.
type ShadowKey = (String, String);

/// Per (route, shadow version) totals and concurrency bounds; shared by the handlers.
#[derive(Clone, Default)]
pub struct ShadowStats {
    inner: Arc<Mutex<BTreeMap<(String, String), Totals>>>,
    bounds: Arc<Mutex<HashMap<ShadowKey, Arc<Semaphore>>>>,
}

impl ShadowStats {
    /// A slot for one copy to this shadow, if fewer than `most` are in flight.
    pub fn permit(&self, route: &str, version: &str, most: usize) -> Option<OwnedSemaphorePermit> {
        let sem = self
            .bounds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry((route.into(), version.into()))
            .or_insert_with(|| Arc::new(Semaphore::new(most)))
            .clone();
        sem.try_acquire_owned().ok()
    }

    fn with(&self, route: &str, version: &str, f: impl FnOnce(&mut Totals)) {
        let mut g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        f(g.entry((route.into(), version.into())).or_default());
    }

    pub fn record(&self, route: &str, version: &str, c: Comparison, primary_s: f64, shadow_s: f64) {
        let labels = [
            ("route", route.to_string()),
            ("version", version.to_string()),
        ];
        metrics::counter!("switchyard:shadow_compared", &labels).increment(1);
        if c.exact {
            metrics::counter!("switchyard:shadow_exact_matches", &labels).increment(1);
        }
        metrics::histogram!("switchyard:shadow_similarity", &labels).record(c.similarity);
        metrics::histogram!("switchyard:shadow_latency_delta_seconds", &labels)
            .record(shadow_s - primary_s);
        self.with(route, version, |t| {
            t.compared += 1;
            t.exact += u64::from(c.exact);
            t.similarity += c.similarity;
            if c.length_ratio.is_finite() {
                t.length_ratio += c.length_ratio;
            }
            t.primary_s += primary_s;
            t.shadow_s += shadow_s;
        });
    }

    /// The shadow failed, timed out or was refused.
    pub fn error(&self, route: &str, version: &str) {
        metrics::counter!("switchyard:shadow_errors", "route" => route.to_string(), "version" => version.to_string()).increment(1);
        self.with(route, version, |t| t.errors += 1);
    }

    /// The shadow was at its concurrency bound; no copy was sent.
    pub fn skipped(&self, route: &str, version: &str) {
        metrics::counter!("switchyard:shadow_skipped", "route" => route.to_string(), "version" => version.to_string()).increment(1);
        self.with(route, version, |t| t.skipped += 1);
    }

    /// Comparisons, shadow errors and mean similarity of one shadow so far.
    pub fn counts(&self, route: &str, version: &str) -> (u64, u64, Option<f64>) {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(route.to_string(), version.to_string()))
            .map_or((0, 0, None), |t| {
                let mean = (t.compared > 0).then(|| t.similarity / t.compared as f64);
                (t.compared, t.errors, mean)
            })
    }

    pub fn summary(&self, route: &str) -> Value {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let shadows: Vec<Value> = g
            .iter()
            .filter(|((r, _), _)| r == route)
            .map(|((_, v), t)| {
                let n = t.compared.max(1) as f64;
                json!({
                    "version": v, "compared": t.compared, "errors": t.errors, "skipped": t.skipped,
                    "exact_match_rate": (t.compared > 0).then(|| t.exact as f64 / n),
                    "mean_similarity": (t.compared > 0).then(|| t.similarity / n),
                    "mean_length_ratio": (t.compared > 0).then(|| t.length_ratio / n),
                    "mean_latency_ms": {"primary": (t.compared > 0).then(|| t.primary_s / n * 1e3),
                                        "shadow": (t.compared > 0).then(|| t.shadow_s / n * 1e3)},
                })
            })
            .collect();
        json!({"route": route, "shadows": shadows})
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_text_is_zero_divergence_and_different_text_is_not() {
        let same = compare(
            "The capital of France is Paris.",
            "The capital of France is Paris.",
        );
        assert_eq!(
            same,
            Comparison {
                exact: true,
                similarity: 1.0,
                length_ratio: 1.0
            }
        );
        let other = compare("The capital of France is Paris.", "Paris is the capital.");
        assert!(!other.exact && other.similarity < 0.5, "{other:?}");
        assert!((other.length_ratio - 5.0 / 7.0).abs() < 1e-9);
        // One word of seven changed.
        let near = compare(
            "The capital of France is Paris.",
            "The capital of France is Lyon.",
        );
        assert!((near.similarity - 6.0 / 7.0).abs() < 1e-9, "{near:?}");
        assert_eq!(compare("", "").similarity, 1.0);
    }
}
