//! Routes: a public model name maps to a primary deployment, an optional
//! candidate with a share of traffic (canary or A/B), and shadows. The table
//! is an immutable snapshot, swapped whole when the controller publishes.
use engine::llm::LlmEngine;
use std::collections::HashMap;
use std::sync::{Arc, RwLock};

/// One model version running in an engine.
#[derive(Clone)]
pub struct Deployment {
    /// The registry version; `None` for models configured statically.
    pub version: Option<u32>,
    pub engine: LlmEngine,
}

#[derive(Clone)]
pub struct Candidate {
    pub deployment: Deployment,
    /// `canary` or `ab_test`.
    pub arm: &'static str,
    pub percent: f64,
}

#[derive(Clone)]
pub struct Route {
    pub primary: Deployment,
    pub candidate: Option<Candidate>,
    pub shadows: Vec<Deployment>,
}

impl Route {
    pub fn single(engine: LlmEngine) -> Self {
        Self {
            primary: Deployment {
                version: None,
                engine,
            },
            candidate: None,
            shadows: vec![],
        }
    }

    /// The deployment serving a request whose unit hashes to `bucket`
    /// (0..10,000); the candidate owns the lowest buckets.
    pub fn pick(&self, bucket: u32) -> (&Deployment, &'static str) {
        match &self.candidate {
            Some(c) if f64::from(bucket) < c.percent * 100.0 => (&c.deployment, c.arm),
            _ => (&self.primary, "primary"),
        }
    }
}

/// 32-bit FNV-1a of `route`, a separator and `unit`, into 10,000 buckets.
pub fn bucket(route: &str, unit: &str) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in route.bytes().chain([0u8]).chain(unit.bytes()) {
        h ^= u32::from(b);
        h = h.wrapping_mul(16_777_619);
    }
    h % 10_000
}

/// The live table: static routes from the config, managed ones from the
/// controller. Readers clone an `Arc` and never wait on a publish.
#[derive(Clone, Default)]
pub struct Routes {
    table: Arc<RwLock<Arc<HashMap<String, Route>>>>,
    fixed: Arc<RwLock<HashMap<String, Route>>>,
}

impl Routes {
    pub fn get(&self, name: &str) -> Option<Route> {
        self.snapshot().get(name).cloned()
    }

    pub fn snapshot(&self) -> Arc<HashMap<String, Route>> {
        self.table.read().expect("route table").clone()
    }

    /// Adds a statically configured model (it keeps its name unless the
    /// registry manages a model of the same name).
    pub fn add_fixed(&self, engine: LlmEngine) {
        let name = engine.name().to_string();
        self.fixed
            .write()
            .expect("fixed routes")
            .insert(name.clone(), Route::single(engine.clone()));
        let mut next = (*self.snapshot()).clone();
        next.entry(name).or_insert_with(|| Route::single(engine));
        self.swap(next);
    }

    /// Replaces every managed route at once.
    pub fn publish(&self, managed: HashMap<String, Route>) {
        let mut next = self.fixed.read().expect("fixed routes").clone();
        next.extend(managed);
        self.swap(next);
    }

    fn swap(&self, next: HashMap<String, Route>) {
        *self.table.write().expect("route table") = Arc::new(next);
    }
}

#[cfg(test)]
mod tests {
    use super::bucket;

    #[test]
    fn buckets_are_stable_and_spread() {
        // Fixed vectors: the same unit lands in the same bucket on every node.
        assert_eq!(
            bucket("support-bot", "user-1"),
            bucket("support-bot", "user-1")
        );
        assert_ne!(bucket("support-bot", "user-1"), bucket("other", "user-1"));
        let n = 20_000;
        let low = (0..n)
            .filter(|i| bucket("r", &format!("user-{i}")) < 1_000)
            .count();
        let share = low as f64 / n as f64;
        assert!((share - 0.10).abs() < 0.01, "{share}");
    }
}
