//! Routes: a public model name maps to a primary deployment, an optional
//! candidate with a share of traffic (canary or A/B), and shadows; prompt
//! experiments map a route name to arms. Both live in one table, an
//! immutable snapshot: the registry's controller publishes the routes, the
//! experiments file its experiments, and each publish swaps the whole table,
//! so a request reads one consistent view.
use super::mirror::ShadowPolicy;
use crate::dispatch::experiments;
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

impl Deployment {
    /// Its version as metrics, headers and shadow reports name it.
    pub fn label(&self) -> String {
        self.version
            .map_or_else(|| "static".to_string(), |v| v.to_string())
    }
}

/// Which part of a route served a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arm {
    Primary,
    Canary,
    AbTest,
    /// The client named the version (`model@3`).
    Pinned,
    /// An arm of a prompt experiment (`holdout` outside its traffic).
    Experiment(String),
}

impl Arm {
    pub fn as_str(&self) -> &str {
        match self {
            Arm::Primary => "primary",
            Arm::Canary => "canary",
            Arm::AbTest => "ab_test",
            Arm::Pinned => "pinned",
            Arm::Experiment(name) => name,
        }
    }
}

/// One registry version of a tree or DNN model, loaded into the registry's
/// repository plane as `model@version`.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorDeployment {
    pub version: u32,
    /// Its name in the repository plane.
    pub model: String,
}

#[derive(Clone)]
pub struct Candidate<D = Deployment> {
    pub deployment: D,
    /// [`Arm::Canary`] or [`Arm::AbTest`].
    pub arm: Arm,
    pub percent: f64,
}

/// A deployment that gets copies of a route's requests.
#[derive(Clone)]
pub struct Shadow<D = Deployment> {
    pub deployment: D,
    pub policy: ShadowPolicy,
}

/// A public name's deployments: LLM engines, or (`Route<TensorDeployment>`)
/// versions in the repository plane.
#[derive(Clone)]
pub struct Route<D = Deployment> {
    /// The header the model's record names as its rollout unit.
    pub unit_header: Option<String>,
    pub primary: D,
    pub candidate: Option<Candidate<D>>,
    pub shadows: Vec<Shadow<D>>,
}

impl<D> Route<D> {
    /// Every deployment of the route: primary, candidate, shadows.
    pub fn deployments(&self) -> impl Iterator<Item = &D> {
        std::iter::once(&self.primary)
            .chain(self.candidate.iter().map(|c| &c.deployment))
            .chain(self.shadows.iter().map(|s| &s.deployment))
    }

    /// The deployment serving a request whose unit hashes to `bucket`
    /// (`sticky_hash`, seed `{route}/rollout`); the candidate owns the lowest
    /// buckets, so ramping it from 10% to 20% only moves users into it.
    pub fn pick(&self, bucket: u32) -> (&D, Arm) {
        match &self.candidate {
            Some(c) if f64::from(bucket) < c.percent * 100.0 => (&c.deployment, c.arm.clone()),
            _ => (&self.primary, Arm::Primary),
        }
    }
}

impl Route {
    pub fn single(engine: LlmEngine) -> Self {
        Self {
            unit_header: None,
            primary: Deployment {
                version: None,
                engine,
            },
            candidate: None,
            shadows: vec![],
        }
    }
}

/// Everything that decides where a request goes, as of one publish.
#[derive(Clone, Default)]
pub struct RouteTable {
    /// Static routes from the config and managed ones from the controller.
    pub routes: HashMap<String, Route>,
    /// The registry's tree and DNN models, by name.
    pub tensor_routes: HashMap<String, Route<TensorDeployment>>,
    /// Prompt experiments from YAML, by route.
    pub experiments: Arc<experiments::ExperimentTable>,
}

impl RouteTable {
    /// The engine of `model` (its route's primary) or `model@version` (any
    /// deployment of that version in the route), with its version.
    pub fn deployment(&self, name: &str) -> Option<(LlmEngine, Option<u32>)> {
        let (model, version) = match name.rsplit_once('@') {
            Some((m, v)) => (m, Some(v.parse::<u32>().ok()?)),
            None => (name, None),
        };
        let route = self.routes.get(model)?;
        let Some(v) = version else {
            return Some((route.primary.engine.clone(), route.primary.version));
        };
        route
            .deployments()
            .find(|d| d.version == Some(v))
            .map(|d| (d.engine.clone(), d.version))
    }
}

/// The live table. Readers clone an `Arc` and never wait on a publish.
#[derive(Clone, Default)]
pub struct Routes {
    table: Arc<RwLock<Arc<RouteTable>>>,
    fixed: Arc<RwLock<HashMap<String, Route>>>,
}

impl Routes {
    pub fn snapshot(&self) -> Arc<RouteTable> {
        self.table.read().expect("route table").clone()
    }

    /// Replaces the prompt experiments; the routes stay as they are.
    pub fn set_experiments(&self, table: experiments::ExperimentTable) {
        let table = Arc::new(table);
        self.update(|t| t.experiments = table);
    }

    /// Adds a statically configured model (it keeps its name unless the
    /// registry manages a model of the same name).
    pub fn add_fixed(&self, engine: LlmEngine) {
        let name = engine.name().to_string();
        // Held until the swap, so a concurrent `publish` cannot be overwritten.
        let mut fixed = self.fixed.write().expect("fixed routes");
        fixed.insert(name.clone(), Route::single(engine.clone()));
        self.update(|t| {
            t.routes
                .entry(name)
                .or_insert_with(|| Route::single(engine));
        });
    }

    /// Replaces every managed route at once, of both planes; the
    /// experiments stay.
    pub fn publish(
        &self,
        managed: HashMap<String, Route>,
        tensors: HashMap<String, Route<TensorDeployment>>,
    ) {
        let fixed = self.fixed.read().expect("fixed routes");
        self.update(|t| {
            t.routes = fixed.clone();
            t.routes.extend(managed);
            t.tensor_routes = tensors;
        });
    }

    /// Builds the next table from the current one and swaps it in, under
    /// the write lock so that concurrent publishers never lose a change.
    fn update(&self, change: impl FnOnce(&mut RouteTable)) {
        let mut current = self.table.write().expect("route table");
        let mut next = (**current).clone();
        change(&mut next);
        *current = Arc::new(next);
    }
}
