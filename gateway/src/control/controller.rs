//! The deployment controller: makes the running planes match the registry.
//! Each pass loads every live version (sha256 checked), publishes all routes
//! in one swap once their engines are up, unloads what no route uses, and
//! writes each version's outcome to its status. It keeps no state of its own
//! that the registry cannot rebuild, so a restart reconciles from the registry.
use crate::config::EngineSettings;
use crate::dispatch::mirror::ShadowPolicy;
use crate::dispatch::routing::{
    Arm, Candidate, Deployment, Route, Routes, Shadow, TensorDeployment,
};
use crate::plane::Plane;
use crate::registry::lifecycle::State;
use crate::registry::records::{Contract, ModelClass, ModelSpec};
use crate::registry::{Phase, Registry, Version};
use anyhow::{Context, Result};
use engine::llm::{load_model, EngineConfig, LlmEngine};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Controller {
    registry: Registry,
    routes: Routes,
    engine: EngineSettings,
    /// Where local artifacts may come from.
    artifact_roots: Vec<PathBuf>,
    /// How much traffic each model's shadows see (default for the rest).
    shadow_policies: HashMap<String, ShadowPolicy>,
    /// The registry's repository plane, for tree and DNN versions.
    plane: Option<Arc<Plane>>,
    /// What serves each (model, version).
    loaded: HashMap<(String, u32), Loaded>,
    /// The last routes published per model, kept when a pass cannot build new ones.
    published: HashMap<String, Route>,
    published_tensors: HashMap<String, Route<TensorDeployment>>,
    /// When a version last failed to load; it is retried after `RETRY_AFTER`.
    failed: HashMap<(String, u32), Instant>,
}

/// A failed load is not retried at every pass (each try hashes the artifact).
const RETRY_AFTER: Duration = Duration::from_secs(60);

impl Controller {
    pub fn new(
        registry: Registry,
        routes: Routes,
        engine: EngineSettings,
        artifact_roots: Vec<PathBuf>,
    ) -> Self {
        Self {
            registry,
            routes,
            engine,
            artifact_roots,
            shadow_policies: HashMap::new(),
            plane: None,
            loaded: HashMap::new(),
            published: HashMap::new(),
            published_tensors: HashMap::new(),
            failed: HashMap::new(),
        }
    }

    /// The shadow policy of each model's shadow versions.
    pub fn with_shadow_policies(mut self, policies: HashMap<String, ShadowPolicy>) -> Self {
        self.shadow_policies = policies;
        self
    }

    /// Serves tree and DNN versions from `plane`.
    pub fn with_plane(mut self, plane: Arc<Plane>) -> Self {
        self.plane = Some(plane);
        self
    }

    /// Reconciles now, after every registry change, and every `interval`.
    pub async fn run(mut self, interval: Duration) {
        let changes = self.registry.changes();
        loop {
            self = tokio::task::spawn_blocking(move || {
                if let Err(e) = self.pass() {
                    tracing::warn!("reconcile pass failed: {e:#}");
                }
                self
            })
            .await
            .expect("the reconcile pass panicked");
            tokio::select! {
                _ = changes.notified() => {}
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One reconcile pass over every model in the registry.
    pub fn pass(&mut self) -> Result<()> {
        let (mut routes, mut tensors) = (HashMap::new(), HashMap::new());
        let mut keep = HashSet::new();
        for model in self.registry.models()? {
            let versions = self.registry.versions(&model.name)?;
            let live: Vec<&Version> = versions.iter().filter(|v| v.state.is_live()).collect();
            keep.extend(live.iter().map(|v| (v.model.clone(), v.number)));
            let tensor = model.class != ModelClass::Llm;
            if tensor && self.plane.is_none() {
                for v in &live {
                    self.status(
                        v,
                        Phase::Failed,
                        "this server has no repository plane (it needs a registry data directory)",
                    );
                }
                continue;
            }
            let mut failed = false;
            for v in &live {
                failed |= !self.ensure_loaded(v, tensor);
            }
            let name = model.name.clone();
            // A version that did not load leaves the model's routes as they were.
            if tensor {
                let route = match failed {
                    true => self.published_tensors.get(&name).cloned(),
                    false => self.route_of(&model, &live, |l| match l {
                        Loaded::Tensor(d) => Some(d.clone()),
                        Loaded::Llm(_) => None,
                    }),
                };
                tensors.extend(route.map(|r| (name, r)));
            } else {
                let route = match failed {
                    true => self.published.get(&name).cloned(),
                    false => self.route_of(&model, &live, |l| match l {
                        Loaded::Llm(d) => Some(d.clone()),
                        Loaded::Tensor(_) => None,
                    }),
                };
                routes.extend(route.map(|r| (name, r)));
            }
        }
        self.routes.publish(routes.clone(), tensors.clone());
        self.published = routes;
        self.published_tensors = tensors;
        keep.extend(versions_in_use(&self.published, |d| d.version));
        keep.extend(versions_in_use(&self.published_tensors, |d| {
            Some(d.version)
        }));
        self.unload_unused(&keep);
        Ok(())
    }

    fn status(&self, v: &Version, phase: Phase, message: &str) {
        if let Err(e) = self.registry.set_status(&v.model, v.number, phase, message) {
            tracing::warn!(version = %v.reference(), "writing status: {e}");
        }
    }

    /// Loads `v` unless it runs already; false (with the reason in its status) on failure.
    fn ensure_loaded(&mut self, v: &Version, tensor: bool) -> bool {
        let key = (v.model.clone(), v.number);
        if self.loaded.contains_key(&key) {
            self.status(v, Phase::Serving, &format!("serving as {}", v.state));
            return true;
        }
        if self
            .failed
            .get(&key)
            .is_some_and(|t| t.elapsed() < RETRY_AFTER)
        {
            return false;
        }
        self.status(
            v,
            Phase::Loading,
            "fetching, verifying and loading the artifact",
        );
        tracing::info!(version = %v.reference(), uri = %v.spec.artifact.uri, "loading");
        let loaded = match tensor {
            true => self.load_tensor(v).map(Loaded::Tensor),
            false => self.load(v).map(|engine| {
                Loaded::Llm(Deployment {
                    version: Some(v.number),
                    engine,
                })
            }),
        };
        match loaded {
            Ok(loaded) => {
                self.failed.remove(&key);
                self.loaded.insert(key, loaded);
                tracing::info!(version = %v.reference(), "ready");
                self.status(v, Phase::Serving, &format!("serving as {}", v.state));
                true
            }
            Err(e) => {
                tracing::warn!(version = %v.reference(), "load failed: {e:#}");
                metrics::counter!("switchyard:registry_load_failures_total", "model" => v.model.clone())
                    .increment(1);
                self.failed.insert(key, Instant::now());
                self.status(
                    v,
                    Phase::Failed,
                    &format!("{e:#}; the previous routes keep serving"),
                );
                false
            }
        }
    }

    fn load(&self, v: &Version) -> Result<LlmEngine> {
        let artifact = &v.spec.artifact;
        let mut path =
            crate::models::resolve_artifact(&artifact.uri, &artifact.sha256, &self.artifact_roots)?;
        if path.is_file() && artifact.format == "awq" {
            // An AWQ folder as .tar.gz, unpacked under the cache by its sha256.
            let to = crate::models::cache_dir()
                .join("unpacked")
                .join(artifact.sha256.to_ascii_lowercase());
            path = crate::plane::unpack(&path, &to, "config.json").map_err(anyhow::Error::msg)?;
        }
        let loaded = load_model(&path, &candle_core::Device::Cpu, self.engine.quantization)
            .with_context(|| format!("loading {}", path.display()))?;
        let mut config: EngineConfig = (&self.engine).into();
        if let Some(n) = v.spec.requirements.context_length {
            config.max_model_len = n;
        }
        let engine = match &v.spec.requirements.draft_model {
            None => {
                // `method: draft` speculates only for versions naming a draft.
                if self
                    .engine
                    .speculative
                    .as_ref()
                    .is_some_and(|s| s.method == "draft")
                {
                    config.speculative = None;
                }
                LlmEngine::start(&v.reference(), loaded, config)
            }
            Some(reference) => {
                let draft = self.load_draft(reference)?;
                LlmEngine::start_with_draft(&v.reference(), loaded, draft, config)
                    .context("requirements.draft_model")?
            }
        };
        check_llm_contract(&v.spec.contract, &engine).map_err(anyhow::Error::msg)?;
        Ok(engine)
    }

    /// The draft a version names as `MODEL@VERSION`: another registered
    /// version, its artifact fetched and checked as any version's.
    fn load_draft(&self, reference: &str) -> Result<engine::llm::LoadedWeights> {
        let bad = || {
            anyhow::anyhow!(
                "requirements.draft_model `{reference}`: name a registered version as MODEL@VERSION"
            )
        };
        let (model, number) = reference.rsplit_once('@').ok_or_else(bad)?;
        let number: u32 = number.parse().map_err(|_| bad())?;
        let d = self
            .registry
            .version(model, number)
            .with_context(|| format!("requirements.draft_model `{reference}`"))?;
        if self.engine.speculative.is_none() {
            anyhow::bail!(
                "requirements.draft_model `{reference}`: set registry.engine.speculative \
                 (method: draft, num_speculative_tokens) to say how it proposes"
            );
        }
        let a = &d.spec.artifact;
        let path = crate::models::resolve_artifact(&a.uri, &a.sha256, &self.artifact_roots)?;
        load_model(&path, &candle_core::Device::Cpu, Default::default())
            .with_context(|| format!("loading the draft {}", path.display()))
    }

    /// Lays out and loads a tree or DNN version in the repository plane.
    fn load_tensor(&self, v: &Version) -> Result<TensorDeployment> {
        let plane = self.plane.as_ref().expect("checked by the pass");
        let artifact = &v.spec.artifact;
        let path =
            crate::models::resolve_artifact(&artifact.uri, &artifact.sha256, &self.artifact_roots)?;
        let model = plane.load(v, &path).map_err(anyhow::Error::msg)?;
        Ok(TensorDeployment {
            version: v.number,
            model,
        })
    }

    /// The route of `model`'s live versions, of the plane `of` picks.
    fn route_of<D>(
        &self,
        spec: &ModelSpec,
        live: &[&Version],
        of: impl Fn(&Loaded) -> Option<D>,
    ) -> Option<Route<D>> {
        let model = spec.name.as_str();
        let deployment = |v: &Version| of(&self.loaded[&(model.to_string(), v.number)]);
        let primary = deployment(live.iter().find(|v| v.state == State::Promoted)?)?;
        Some(Route {
            unit_header: spec.unit_header(),
            primary,
            candidate: live
                .iter()
                .find(|v| v.state.takes_traffic_share())
                .and_then(|v| Some((v, deployment(v)?)))
                .map(|(v, d)| Candidate {
                    deployment: d,
                    arm: if v.state == State::Canary {
                        Arm::Canary
                    } else {
                        Arm::AbTest
                    },
                    percent: v.traffic_percent.unwrap_or(0.0),
                }),
            shadows: live
                .iter()
                .filter(|v| v.state == State::Shadow)
                .filter_map(|v| deployment(v))
                .map(|deployment| Shadow {
                    deployment,
                    policy: self.shadow_policies.get(model).copied().unwrap_or_default(),
                })
                .collect(),
        })
    }

    fn unload_unused(&mut self, in_use: &HashSet<(String, u32)>) {
        let unused: Vec<_> = self
            .loaded
            .keys()
            .filter(|k| !in_use.contains(*k))
            .cloned()
            .collect();
        for key in unused {
            // In-flight requests hold their own handle; the engine thread
            // ends when the last one finishes.
            if let (Some(Loaded::Tensor(d)), Some(plane)) = (self.loaded.remove(&key), &self.plane)
            {
                plane.unload(&d.model);
            }
            tracing::info!(model = %key.0, version = key.1, "unloaded");
            let why = "unloaded: the version is no longer live";
            if let Err(e) = self
                .registry
                .set_status(&key.0, key.1, Phase::Unloaded, why)
            {
                tracing::warn!("writing status: {e}");
            }
        }
    }
}

fn versions_in_use<D>(
    routes: &HashMap<String, Route<D>>,
    version: impl Fn(&D) -> Option<u32>,
) -> HashSet<(String, u32)> {
    routes
        .iter()
        .flat_map(|(name, r)| {
            let versions: Vec<u32> = r.deployments().filter_map(&version).collect();
            versions.into_iter().map(move |n| (name.clone(), n))
        })
        .collect()
}

/// The fingerprints an LLM contract names: `sha256:` of the vocabulary
/// (tokens in id order, one per line) and of the chat template's text
/// (`none` when the model has no template).
pub fn llm_fingerprints(engine: &LlmEngine) -> (String, String) {
    use sha2::{Digest, Sha256};
    let vocab = engine.tokenizer().vocabulary().join("\n");
    let tokenizer = format!("sha256:{}", hex::encode(Sha256::digest(vocab.as_bytes())));
    let template = engine.template().map_or_else(
        || "none".to_string(),
        |t| {
            format!(
                "sha256:{}",
                hex::encode(Sha256::digest(t.source().as_bytes()))
            )
        },
    );
    (tokenizer, template)
}

/// Compares an LLM version's declared tokenizer and chat template with the
/// artifact's; a mismatch names the field and what the artifact has.
fn check_llm_contract(contract: &Contract, engine: &LlmEngine) -> Result<(), String> {
    let (tokenizer, template) = llm_fingerprints(engine);
    for (field, declared, found) in [
        ("contract.tokenizer", &contract.tokenizer, tokenizer),
        ("contract.chat_template", &contract.chat_template, template),
    ] {
        if let Some(d) = declared
            .as_deref()
            .filter(|d| !d.eq_ignore_ascii_case(&found))
        {
            return Err(format!(
                "{field}: the version declares `{d}`; the artifact's is `{found}`"
            ));
        }
    }
    Ok(())
}

/// What serves a version: an engine, or a model in the repository plane.
enum Loaded {
    Llm(Deployment),
    Tensor(TensorDeployment),
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::testing::{admin, gguf_version as version, tiny_gguf, with_model};
    use crate::registry::TransitionRequest;
    use std::path::Path;

    /// A registry with model `m` (L0), its artifacts under `root`.
    fn setup(root: &Path) -> (Registry, Controller) {
        let r = with_model("m");
        let engine = EngineSettings {
            kv_cache_bytes: Some(1 << 20),
            max_num_seqs: 2,
            ..Default::default()
        };
        let ctl = Controller::new(
            r.clone(),
            Routes::default(),
            engine,
            vec![root.to_path_buf()],
        );
        (r, ctl)
    }

    fn promote(r: &Registry, v: u32) {
        for to in [State::OfflinePassed, State::Promoted] {
            let req = TransitionRequest {
                to: Some(to),
                ..Default::default()
            };
            assert!(r.transition(&admin(), "m", v, req).unwrap().applied);
        }
    }

    fn phase(r: &Registry, v: u32) -> (String, String) {
        let s = r.status("m", v).unwrap().expect("a status");
        (s.phase.as_str().to_string(), s.message)
    }

    fn served_version(ctl: &Controller) -> Option<u32> {
        ctl.routes
            .snapshot()
            .routes
            .get("m")
            .map(|r| r.primary.version.expect("a managed version"))
    }

    #[test]
    fn a_promoted_version_is_loaded_routed_and_its_status_written() {
        let dir = tempfile::tempdir().unwrap();
        let (r, mut ctl) = setup(dir.path());
        let path = dir.path().join("m.gguf");
        let sha = tiny_gguf(&path);
        r.register_version(
            &admin(),
            "m",
            version(format!("file://{}", path.display()), sha),
        )
        .unwrap();
        promote(&r, 1);
        ctl.pass().unwrap();
        assert_eq!(served_version(&ctl), Some(1));
        assert_eq!(phase(&r, 1).0, "serving");
        // Deprecated, nothing routes to it: unloaded, and its status says so.
        let req = TransitionRequest {
            to: Some(State::Deprecated),
            ..Default::default()
        };
        assert!(r.transition(&admin(), "m", 1, req).unwrap().applied);
        ctl.pass().unwrap();
        assert_eq!(served_version(&ctl), None);
        assert_eq!(phase(&r, 1).0, "unloaded");
    }

    #[test]
    fn a_version_that_fails_to_load_leaves_the_previous_route_serving() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let (r, mut ctl) = setup(dir.path());
        let good = dir.path().join("good.gguf");
        let sha = tiny_gguf(&good);
        r.register_version(
            &admin(),
            "m",
            version(format!("file://{}", good.display()), sha.clone()),
        )
        .unwrap();
        promote(&r, 1);
        ctl.pass().unwrap();
        // Version 2: the same file, but outside the artifact roots.
        let stray = outside.path().join("stray.gguf");
        std::fs::copy(&good, &stray).unwrap();
        r.register_version(
            &admin(),
            "m",
            version(format!("file://{}", stray.display()), sha),
        )
        .unwrap();
        promote(&r, 2);
        ctl.pass().unwrap();
        let (p, message) = phase(&r, 2);
        assert_eq!(p, "failed");
        assert!(
            message.contains("artifact roots") && message.contains("previous routes keep serving"),
            "{message}"
        );
        assert_eq!(
            served_version(&ctl),
            Some(1),
            "the route still serves version 1"
        );
    }

    #[test]
    fn an_llm_contract_names_the_tokenizer_and_template_it_was_built_for() {
        let dir = tempfile::tempdir().unwrap();
        let (r, mut ctl) = setup(dir.path());
        let path = dir.path().join("m.gguf");
        let sha = tiny_gguf(&path);
        let engine = crate::registry::testing::tiny_engine("probe");
        let (tokenizer, template) = llm_fingerprints(&engine);
        assert!(tokenizer.starts_with("sha256:"), "{tokenizer}");
        let with = |tokenizer: &str, template: &str| {
            let mut spec = version(format!("file://{}", path.display()), sha.clone());
            spec.contract.tokenizer = Some(tokenizer.into());
            spec.contract.chat_template = Some(template.into());
            spec
        };
        r.register_version(&admin(), "m", with(&tokenizer, &template))
            .unwrap();
        promote(&r, 1);
        ctl.pass().unwrap();
        assert_eq!(phase(&r, 1).0, "serving", "{}", phase(&r, 1).1);
        // Another vocabulary than the artifact's: refused, v1 keeps serving.
        let other = format!("sha256:{}", "0".repeat(64));
        r.register_version(&admin(), "m", with(&other, &template))
            .unwrap();
        for to in [State::OfflinePassed, State::Shadow] {
            let req = TransitionRequest {
                to: Some(to),
                ..Default::default()
            };
            assert!(r.transition(&admin(), "m", 2, req).unwrap().applied);
        }
        ctl.pass().unwrap();
        let (p, message) = phase(&r, 2);
        assert_eq!(p, "failed");
        assert!(
            message.contains("contract.tokenizer") && message.contains(&tokenizer),
            "{message}"
        );
        assert_eq!(served_version(&ctl), Some(1));
    }
}
