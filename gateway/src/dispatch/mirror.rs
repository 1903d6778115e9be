//! The one shadow runner, for text and tensors alike: a shadow gets a copy
//! of the requests whose request id hashes into its `sample_percent`, at
//! most `max_in_flight` copies at once (a copy beyond that is skipped and
//! counted), each stopped at `timeout_ms`. Its answer is compared with the
//! primary's once both are known, and never reaches the client.
use crate::dispatch::sticky_hash::bucket;
use crate::divergence::ShadowStats;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How much of a route's traffic a shadow sees, and how long it may take.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShadowPolicy {
    /// Share of requests copied, by the hash of the request id.
    #[serde(default = "hundred")]
    pub sample_percent: f64,
    /// Copies in flight at most; beyond it a copy is skipped (and counted).
    #[serde(default = "four")]
    pub max_in_flight: usize,
    /// A copy that takes longer counts as a shadow error.
    #[serde(default = "two_minutes")]
    pub timeout_ms: u64,
}

fn hundred() -> f64 {
    100.0
}
fn four() -> usize {
    4
}
fn two_minutes() -> u64 {
    120_000
}

impl Default for ShadowPolicy {
    /// Every request, four copies in flight, two minutes each (a generation's time).
    fn default() -> Self {
        Self {
            sample_percent: hundred(),
            max_in_flight: four(),
            timeout_ms: two_minutes(),
        }
    }
}

impl ShadowPolicy {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if !(0.0..=100.0).contains(&self.sample_percent) {
            return Err(format!(
                "{at}.sample_percent: must be between 0 and 100, got {}",
                self.sample_percent
            ));
        }
        if self.max_in_flight == 0 || self.timeout_ms == 0 {
            return Err(format!(
                "{at}: max_in_flight and timeout_ms must be at least 1"
            ));
        }
        Ok(())
    }

    /// Whether the request `request_id` of `route` is copied to `label`:
    /// its bucket under the seed `{route}/shadow/{label}` lies in the share.
    pub fn samples(&self, route: &str, label: &str, request_id: &str) -> bool {
        let seed = format!("{route}/shadow/{label}");
        f64::from(bucket(&seed, request_id)) < self.sample_percent * 100.0
    }
}

/// A configured shadow of a repository model (`model_repository.shadows`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ShadowConfig {
    /// The repository model whose requests are copied.
    pub model: String,
    /// The model that gets the copies: in this repository, or at `endpoint`.
    pub target: String,
    /// A remote KServe v2 gRPC node, e.g. `grpc://10.0.0.7:8001`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// The CA and client certificate for a `grpcs://` endpoint.
    #[serde(default)]
    pub tls: Option<crate::tls::ClientTlsConfig>,
    /// Share of requests copied, by the hash of the request id.
    #[serde(default = "default_tensor_sample")]
    pub sample_percent: f64,
    /// Copies in flight at most; beyond it a copy is skipped (and counted).
    #[serde(default = "default_tensor_in_flight")]
    pub max_in_flight: usize,
    /// A copy that takes longer counts as a shadow error.
    #[serde(default = "default_tensor_timeout_ms")]
    pub timeout_ms: u64,
}

fn default_tensor_sample() -> f64 {
    100.0
}
fn default_tensor_in_flight() -> usize {
    4
}
fn default_tensor_timeout_ms() -> u64 {
    5000
}

impl ShadowConfig {
    /// How much of the model's traffic the shadow sees.
    pub fn policy(&self) -> ShadowPolicy {
        ShadowPolicy {
            sample_percent: self.sample_percent,
            max_in_flight: self.max_in_flight,
            timeout_ms: self.timeout_ms,
        }
    }

    pub fn validate(&self, at: &str) -> Result<(), String> {
        self.policy().validate(at)?;
        if self.endpoint.is_none() && self.target == self.model {
            return Err(format!(
                "{at}.target: `{}` would shadow itself; name another model or an endpoint",
                self.target
            ));
        }
        if let Some(e) = &self.endpoint {
            crate::kserve_client::Remote::endpoint(e).map_err(|e| format!("{at}.endpoint: {e}"))?;
        }
        if let Some(tls) = &self.tls {
            tls.validate(&format!("{at}.tls"))?;
        }
        Ok(())
    }

    /// How reports and metrics name this shadow: the target, with its node.
    pub fn label(&self) -> String {
        match &self.endpoint {
            Some(e) => format!("{e}/{}", self.target),
            None => self.target.clone(),
        }
    }
}

/// One shadow of one route, as its statistics name it.
pub struct Copy<'a> {
    pub stats: &'a ShadowStats,
    pub route: &'a str,
    pub label: &'a str,
    pub policy: ShadowPolicy,
}

/// What the primary's outcome will be: `Some(Some(answer))` once it has
/// answered, `Some(None)` if it failed or its client left.
pub type Primary<P> = watch::Receiver<Option<Option<P>>>;

impl Copy<'_> {
    /// Sends the copy if the policy samples `request_id` and the shadow has
    /// room: `run` is the shadow's answer, `compare` records it against the
    /// primary's (with the shadow's seconds). Returns whether it was sent.
    pub fn launch<P, A, F, C, CF>(
        &self,
        request_id: &str,
        mut primary: Primary<P>,
        run: F,
        compare: C,
    ) -> bool
    where
        P: Clone + Send + Sync + 'static,
        A: Send + 'static,
        F: Future<Output = Result<A, String>> + Send + 'static,
        C: FnOnce(ShadowStats, P, A, f64) -> CF + Send + 'static,
        CF: Future<Output = ()> + Send + 'static,
    {
        if !self.policy.samples(self.route, self.label, request_id) {
            return false;
        }
        let (route, label) = (self.route.to_string(), self.label.to_string());
        let Some(permit) = self.stats.permit(&route, &label, self.policy.max_in_flight) else {
            self.stats.skipped(&route, &label);
            return false;
        };
        metrics::counter!("switchyard:shadow_requests_total", "route" => route.clone(), "version" => label.clone())
            .increment(1);
        let stats = self.stats.clone();
        let timeout = Duration::from_millis(self.policy.timeout_ms);
        tokio::spawn(async move {
            let _permit = permit;
            let started = Instant::now();
            let answer = match tokio::time::timeout(timeout, run).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    tracing::debug!(%route, shadow = %label, error = %e, "shadow failed");
                    return stats.error(&route, &label);
                }
                Err(_) => {
                    tracing::debug!(%route, shadow = %label, "shadow timed out");
                    return stats.error(&route, &label);
                }
            };
            let shadow_s = started.elapsed().as_secs_f64();
            // Nothing to compare with if the primary failed or was left.
            let Ok(Some(p)) = primary
                .wait_for(Option::is_some)
                .await
                .map(|v| v.clone().flatten())
            else {
                return;
            };
            compare(stats, p, answer, shadow_s).await;
        });
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_follows_the_request_id_hash() {
        let quarter = ShadowPolicy {
            sample_percent: 25.0,
            ..Default::default()
        };
        let ids: Vec<String> = (0..4000).map(|i| format!("req-{i}")).collect();
        let sampled = ids
            .iter()
            .filter(|id| quarter.samples("chat", "3", id))
            .count();
        // Binomial(4000, 0.25): sd ≈ 27; 5 sd either side.
        assert!((865..=1135).contains(&sampled), "{sampled} of 4000");
        for id in &ids {
            let b = bucket("chat/shadow/3", id);
            assert_eq!(quarter.samples("chat", "3", id), b < 2500, "{id}");
        }
        let none = ShadowPolicy {
            sample_percent: 0.0,
            ..Default::default()
        };
        assert!(ids.iter().all(|id| !none.samples("chat", "3", id)));
    }

    #[test]
    fn bounds_are_checked() {
        let bad = ShadowPolicy {
            sample_percent: 101.0,
            ..Default::default()
        };
        assert!(bad.validate("s").unwrap_err().contains("s.sample_percent"));
        let zero = ShadowPolicy {
            max_in_flight: 0,
            ..Default::default()
        };
        assert!(zero.validate("s").is_err());
    }

    #[tokio::test]
    async fn a_slow_shadow_is_an_error_and_a_full_one_is_skipped() {
        let stats = ShadowStats::default();
        let policy = ShadowPolicy {
            max_in_flight: 1,
            timeout_ms: 50,
            ..Default::default()
        };
        let copy = Copy {
            stats: &stats,
            route: "r",
            label: "2",
            policy,
        };
        let (done, primary) = watch::channel(None::<Option<u32>>);
        let never = std::future::pending::<Result<u32, String>>();
        assert!(copy.launch("a", primary.clone(), never, |_, _, _, _| async {}));
        // The first copy holds the only slot until it times out.
        let quick = async { Ok::<u32, String>(1) };
        assert!(!copy.launch("b", primary.clone(), quick, |_, _, _, _| async {}));
        assert_eq!(stats.counts("r", "2").errors, 0);
        tokio::time::timeout(Duration::from_secs(10), async {
            while stats.counts("r", "2").errors == 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the slow copy is ended by its timeout");
        let (tx, rx) = tokio::sync::oneshot::channel();
        let sent = copy.launch(
            "c",
            primary,
            async { Ok::<u32, String>(7) },
            move |_, p: u32, a: u32, _| async move {
                let _ = tx.send((p, a));
            },
        );
        assert!(sent, "the slot is free again");
        let unsampled = Copy {
            policy: ShadowPolicy {
                sample_percent: 0.0,
                ..policy
            },
            ..copy
        };
        let sent = unsampled.launch(
            "d",
            watch::channel(None).1,
            async { Ok(1u32) },
            |_, _: u32, _, _| async {},
        );
        assert!(!sent, "a request outside the sample gets no copy");
        done.send(Some(Some(3))).unwrap();
        assert_eq!(rx.await.unwrap(), (3, 7));
    }
}
