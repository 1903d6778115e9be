//! How far a shadow's answers are from the primary's on the same requests:
//! exact-match rate, token-level similarity (1 − normalized edit distance over
//! word and punctuation tokens), length ratio, errors and latency, per route
//! and shadow version. For a shadow in our own engine, also the primary's
//! output tokens scored under the shadow model in one teacher-forced pass:
//! their mean log-probability there, and the mean per-token log-ratio
//! `log p(x) − log q(x)` of primary over shadow, which on tokens sampled from
//! the primary at temperature 1 estimates KL(primary ‖ shadow) per token (and
//! is 0 for the same model). For tensor models (the Triton plane): argmax
//! agreement per row, mean absolute difference, and KL of rows that are
//! probability distributions.
use engine::dnn::Tensor;
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

/// One tensor request's comparison, over the outputs both sides returned
/// with the same name and shape. A row is the last dimension of an output.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TensorComparison {
    pub elements: u64,
    pub abs_diff: f64,
    /// Rows with a class to compare: several values (argmax), or one
    /// probability (above or below 0.5).
    pub rows: u64,
    pub argmax_agree: u64,
    /// Rows that are probability distributions on both sides, and the sum of
    /// KL(primary ‖ shadow) over them, in nats.
    pub kl_rows: u64,
    pub kl: f64,
}

/// Values that sum to 1 (within float rounding) and are all in [0, 1].
fn is_distribution(row: &[f32]) -> bool {
    let sum: f64 = row.iter().map(|&x| f64::from(x)).sum();
    row.iter().all(|x| (0.0..=1.0).contains(x)) && (sum - 1.0).abs() < 1e-3
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, &x)| {
            if x > best.1 {
                (i, x)
            } else {
                best
            }
        })
        .0
}

/// KL(p ‖ q) in nats; q is floored so that a zero where p is not stays finite.
fn kl(p: &[f64], q: &[f64]) -> f64 {
    p.iter()
        .zip(q)
        .filter(|(&p, _)| p > 0.0)
        .map(|(&p, &q)| p * (p / q.max(1e-12)).ln())
        .sum()
}

pub fn compare_tensors(primary: &[Tensor], shadow: &[Tensor]) -> TensorComparison {
    let mut c = TensorComparison::default();
    for p in primary {
        let Some(q) = shadow
            .iter()
            .find(|q| q.name == p.name && q.shape == p.shape)
        else {
            continue;
        };
        let (Ok(a), Ok(b)) = (p.to_f32(), q.to_f32()) else {
            continue;
        };
        if a.is_empty() || a.len() != b.len() {
            continue;
        }
        c.elements += a.len() as u64;
        c.abs_diff += a
            .iter()
            .zip(&b)
            .map(|(&x, &y)| f64::from((x - y).abs()))
            .sum::<f64>();
        let width = match p.shape.len() {
            0 | 1 => 1,
            _ => usize::try_from(*p.shape.last().unwrap_or(&1))
                .unwrap_or(1)
                .max(1),
        };
        for (x, y) in a.chunks(width).zip(b.chunks(width)) {
            if width > 1 {
                c.rows += 1;
                c.argmax_agree += u64::from(argmax(x) == argmax(y));
                if is_distribution(x) && is_distribution(y) {
                    let wide = |r: &[f32]| r.iter().map(|&v| f64::from(v)).collect::<Vec<_>>();
                    c.kl_rows += 1;
                    c.kl += kl(&wide(x), &wide(y));
                }
            } else if (0.0..=1.0).contains(&x[0]) && (0.0..=1.0).contains(&y[0]) {
                // One probability: the positive class's, as a Bernoulli.
                let (p1, q1) = (f64::from(x[0]), f64::from(y[0]));
                c.rows += 1;
                c.argmax_agree += u64::from((p1 >= 0.5) == (q1 >= 0.5));
                c.kl_rows += 1;
                c.kl += kl(&[p1, 1.0 - p1], &[q1, 1.0 - q1]);
            }
        }
    }
    c
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
    /// Tensor comparisons, summed.
    tensors: u64,
    tensor: TensorComparison,
    /// Requests scored by teacher forcing, and their per-request means.
    scored: u64,
    primary_logprob: f64,
    shadow_logprob: f64,
    kl: f64,
}

/// A shadow's comparisons and errors, mean text similarity, and mean
/// teacher-forced KL estimate.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ShadowCounts {
    pub compared: u64,
    pub errors: u64,
    pub similarity: Option<f64>,
    pub kl: Option<f64>,
    /// Tensor shadows: the share of rows whose argmax agrees, and the mean
    /// absolute difference per element.
    pub argmax_agreement: Option<f64>,
    pub abs_diff: Option<f64>,
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

    /// Counts a comparison and its latencies; returns the metric labels.
    fn compared(
        &self,
        route: &str,
        version: &str,
        primary_s: f64,
        shadow_s: f64,
    ) -> [(&'static str, String); 2] {
        let labels = [
            ("route", route.to_string()),
            ("version", version.to_string()),
        ];
        metrics::counter!("switchyard:shadow_compared_total", &labels).increment(1);
        metrics::histogram!("switchyard:shadow_latency_delta_seconds", &labels)
            .record(shadow_s - primary_s);
        self.with(route, version, |t| {
            t.compared += 1;
            t.primary_s += primary_s;
            t.shadow_s += shadow_s;
        });
        labels
    }

    pub fn record(&self, route: &str, version: &str, c: Comparison, primary_s: f64, shadow_s: f64) {
        let labels = self.compared(route, version, primary_s, shadow_s);
        if c.exact {
            metrics::counter!("switchyard:shadow_exact_matches_total", &labels).increment(1);
        }
        metrics::histogram!("switchyard:shadow_similarity", &labels).record(c.similarity);
        self.with(route, version, |t| {
            t.exact += u64::from(c.exact);
            t.similarity += c.similarity;
            if c.length_ratio.is_finite() {
                t.length_ratio += c.length_ratio;
            }
        });
    }

    pub fn record_tensors(
        &self,
        route: &str,
        version: &str,
        c: TensorComparison,
        primary_s: f64,
        shadow_s: f64,
    ) {
        let labels = self.compared(route, version, primary_s, shadow_s);
        if c.elements > 0 {
            metrics::histogram!("switchyard:shadow_mean_abs_diff", &labels)
                .record(c.abs_diff / c.elements as f64);
        }
        if c.rows > 0 {
            metrics::histogram!("switchyard:shadow_argmax_agreement", &labels)
                .record(c.argmax_agree as f64 / c.rows as f64);
        }
        if c.kl_rows > 0 {
            metrics::histogram!("switchyard:shadow_kl", &labels).record(c.kl / c.kl_rows as f64);
        }
        self.with(route, version, |t| {
            t.tensors += 1;
            let s = &mut t.tensor;
            s.elements += c.elements;
            s.abs_diff += c.abs_diff;
            s.rows += c.rows;
            s.argmax_agree += c.argmax_agree;
            s.kl_rows += c.kl_rows;
            s.kl += c.kl;
        });
    }

    /// The primary's output tokens with their log-probabilities under the
    /// primary (`primary`) and under the shadow (`shadow`, teacher-forced).
    pub fn record_forced(&self, route: &str, version: &str, primary: &[f32], shadow: &[f32]) {
        if primary.is_empty() || primary.len() != shadow.len() {
            return;
        }
        let n = primary.len() as f64;
        let mean = |v: &[f32]| v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let (p, q) = (mean(primary), mean(shadow));
        let labels = [
            ("route", route.to_string()),
            ("version", version.to_string()),
        ];
        metrics::histogram!("switchyard:shadow_kl", &labels).record(p - q);
        metrics::histogram!("switchyard:shadow_mean_logprob", &labels).record(q);
        self.with(route, version, |t| {
            t.scored += 1;
            t.primary_logprob += p;
            t.shadow_logprob += q;
            t.kl += p - q;
        });
    }

    /// The shadow failed, timed out or was refused.
    pub fn error(&self, route: &str, version: &str) {
        metrics::counter!("switchyard:shadow_errors_total", "route" => route.to_string(), "version" => version.to_string()).increment(1);
        self.with(route, version, |t| t.errors += 1);
    }

    /// The shadow was at its concurrency bound; no copy was sent.
    pub fn skipped(&self, route: &str, version: &str) {
        metrics::counter!("switchyard:shadow_skipped_total", "route" => route.to_string(), "version" => version.to_string()).increment(1);
        self.with(route, version, |t| t.skipped += 1);
    }

    /// What rollout policies judge a shadow by, so far.
    pub fn counts(&self, route: &str, version: &str) -> ShadowCounts {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        g.get(&(route.to_string(), version.to_string()))
            .map_or_else(ShadowCounts::default, |t| ShadowCounts {
                compared: t.compared,
                errors: t.errors,
                similarity: (t.compared > 0).then(|| t.similarity / t.compared as f64),
                kl: (t.scored > 0).then(|| t.kl / t.scored as f64),
                argmax_agreement: (t.tensor.rows > 0)
                    .then(|| t.tensor.argmax_agree as f64 / t.tensor.rows as f64),
                abs_diff: (t.tensor.elements > 0)
                    .then(|| t.tensor.abs_diff / t.tensor.elements as f64),
            })
    }

    pub fn summary(&self, route: &str) -> Value {
        let g = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let shadows: Vec<Value> = g
            .iter()
            .filter(|((r, _), _)| r == route)
            .map(|((_, v), t)| {
                let n = t.compared.max(1) as f64;
                let texts = t.compared - t.tensors;
                let text = |sum: f64| (texts > 0).then(|| sum / texts as f64);
                let per = |sum: f64, count: u64| (count > 0).then(|| sum / count as f64);
                let forced = |sum: f64| per(sum, t.scored);
                let c = &t.tensor;
                json!({
                    "version": v, "compared": t.compared, "errors": t.errors, "skipped": t.skipped,
                    "exact_match_rate": text(t.exact as f64),
                    "mean_similarity": text(t.similarity),
                    "mean_length_ratio": text(t.length_ratio),
                    "mean_latency_ms": {"primary": (t.compared > 0).then(|| t.primary_s / n * 1e3),
                                        "shadow": (t.compared > 0).then(|| t.shadow_s / n * 1e3)},
                    "tensors": {"compared": t.tensors, "rows": c.rows,
                                "argmax_agreement": per(c.argmax_agree as f64, c.rows),
                                "mean_abs_diff": per(c.abs_diff, c.elements),
                                "mean_kl": per(c.kl, c.kl_rows)},
                    "teacher_forced": {"scored": t.scored,
                                       "primary_mean_logprob": forced(t.primary_logprob),
                                       "shadow_mean_logprob": forced(t.shadow_logprob),
                                       "mean_kl": forced(t.kl)},
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

    #[test]
    fn tensor_outputs_compare_by_argmax_difference_and_kl() {
        let probs = |v: &[f32]| Tensor::from_f32("probs", vec![2, 2], v);
        let same = compare_tensors(
            &[probs(&[0.9, 0.1, 0.2, 0.8])],
            &[probs(&[0.9, 0.1, 0.2, 0.8])],
        );
        assert_eq!((same.rows, same.argmax_agree, same.kl_rows), (2, 2, 2));
        assert_eq!((same.abs_diff, same.kl), (0.0, 0.0));
        // The second row's class flips.
        let other = compare_tensors(
            &[probs(&[0.9, 0.1, 0.2, 0.8])],
            &[probs(&[0.9, 0.1, 0.6, 0.4])],
        );
        assert_eq!((other.rows, other.argmax_agree), (2, 1));
        assert!((other.abs_diff / other.elements as f64 - 0.2).abs() < 1e-6);
        let want = 0.2 * (0.2f64 / 0.6).ln() + 0.8 * (0.8f64 / 0.4).ln();
        assert!((other.kl - want).abs() < 1e-6, "{other:?}");
        // Regression values: a difference, no classes.
        let y = |v: f32| Tensor::from_f32("y", vec![1, 1], &[v]);
        let reg = compare_tensors(&[y(140.0)], &[y(150.0)]);
        assert_eq!((reg.elements, reg.abs_diff, reg.rows), (1, 10.0, 0));
        // One probability per row is a Bernoulli.
        let bin = compare_tensors(&[y(0.7)], &[y(0.4)]);
        assert_eq!((bin.rows, bin.argmax_agree, bin.kl_rows), (1, 0, 1));
        // Outputs of another name or shape are not compared.
        assert_eq!(
            compare_tensors(&[y(0.7)], &[probs(&[0.5; 4])]),
            TensorComparison::default()
        );
    }

    #[test]
    fn teacher_forced_scores_average_per_request() {
        let s = ShadowStats::default();
        // The same model: every token equally likely under both.
        s.record_forced("r", "2", &[-1.0, -3.0], &[-1.0, -3.0]);
        let t = s.summary("r")["shadows"][0]["teacher_forced"].clone();
        assert_eq!(t["mean_kl"], 0.0);
        // Another model finds the primary's tokens less likely: (−1.0) − (−2.5).
        s.record_forced("r", "2", &[-0.5, -1.5], &[-2.0, -3.0]);
        let t = s.summary("r")["shadows"][0]["teacher_forced"].clone();
        assert_eq!(t["scored"], 2);
        assert_eq!(t["mean_kl"], 0.75);
        assert_eq!(t["primary_mean_logprob"], -1.5);
        assert_eq!(t["shadow_mean_logprob"], -2.25);
        // Mismatched lengths are not a comparison.
        s.record_forced("r", "2", &[-1.0], &[]);
        assert_eq!(s.summary("r")["shadows"][0]["teacher_forced"]["scored"], 2);
    }
}
