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
    /// (`sticky_hash`, seed `{route}/rollout`); the candidate owns the lowest
    /// buckets, so ramping it from 10% to 20% only moves users into it.
    pub fn pick(&self, bucket: u32) -> (&Deployment, &'static str) {
        match &self.candidate {
            Some(c) if f64::from(bucket) < c.percent * 100.0 => (&c.deployment, c.arm),
            _ => (&self.primary, "primary"),
        }
    }
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
        // Held until the swap, so a concurrent `publish` cannot be overwritten.
        let mut fixed = self.fixed.write().expect("fixed routes");
        fixed.insert(name.clone(), Route::single(engine.clone()));
        let mut next = (*self.snapshot()).clone();
        next.entry(name).or_insert_with(|| Route::single(engine));
        self.swap(next);
    }

    /// Replaces every managed route at once.
    pub fn publish(&self, managed: HashMap<String, Route>) {
        let fixed = self.fixed.read().expect("fixed routes");
        let mut next = fixed.clone();
        next.extend(managed);
        self.swap(next);
    }

    fn swap(&self, next: HashMap<String, Route>) {
        *self.table.write().expect("route table") = Arc::new(next);
    }
}
