//! `switchyard`: one server for LLMs over the OpenAI API. This file holds the
//! command line; `api` the HTTP surface, `config` and `models` the setup.
mod api;
mod config;
mod controller;
mod divergence;
mod experiment_stats;
mod experiments;
mod models;
mod registry;
mod registry_cli;
mod rollout;
mod routing;
mod sticky_hash;
mod upstream;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use config::Config;
use engine::llm::{load_model, LlmEngine};
use std::path::PathBuf;

/// The configuration used when no `--config` is given.
const DEFAULT_CONFIG: &str = include_str!("../../configs/default.yaml");

#[derive(Parser)]
#[command(
    name = "switchyard",
    version,
    about = "Serve ML models in production: an LLM engine behind the OpenAI API.",
    long_about = "Serve ML models in production: an LLM engine behind the OpenAI API.\n\n\
        Start with `switchyard serve`: it fetches and verifies the default model \
        (SmolLM2-135M-Instruct) the first time, then answers on http://127.0.0.1:8080/v1."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the configured models and serve them over HTTP.
    Serve {
        /// YAML configuration (models, sources, limits); the built-in default serves SmolLM2-135M-Instruct.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Address for the HTTP API, overriding `server.http` in the config.
        #[arg(long)]
        http: Option<String>,
        /// Serve a Triton model repository over KServe v2 (HTTP and gRPC). Without
        /// `--config`, only the repository is served.
        #[arg(long)]
        model_repository: Option<PathBuf>,
        /// `none` (load every model at start), `poll` (and rescan), `explicit` (load via the API).
        #[arg(long)]
        model_control_mode: Option<String>,
        /// Seconds between repository rescans in `poll` mode.
        #[arg(long)]
        repository_poll_secs: Option<u64>,
        /// A model to load at start in `explicit` mode (repeatable; `*` = all).
        #[arg(long)]
        load_model: Vec<String>,
        /// Address for KServe v2 gRPC, overriding `server.grpc` (default 127.0.0.1:8081).
        #[arg(long)]
        grpc: Option<String>,
    },
    /// Manage model files.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Use a running server's model registry (versions, transitions, rollback, audit).
    Registry {
        /// The server's base URL.
        #[arg(long, env = "SWITCHYARD_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// An API key from the server's `registry.api_keys`.
        #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
        key: Option<String>,
        #[command(subcommand)]
        command: registry_cli::RegistryCommand,
    },
}

#[derive(Subcommand)]
enum ModelsCommand {
    /// Download and verify the configured models (all, or the one named) and print their paths.
    Fetch {
        /// A model name from the config; all models when omitted.
        name: Option<String>,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load_config(path: Option<&PathBuf>) -> Result<Config> {
    match path {
        Some(p) => Ok(Config::load(p)?),
        None => Config::parse(DEFAULT_CONFIG).map_err(|m| anyhow::anyhow!("built-in config: {m}")),
    }
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,tokenizers=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Serve {
            config,
            http,
            model_repository,
            model_control_mode,
            repository_poll_secs,
            load_model,
            grpc,
        } => {
            let mut cfg = match (&config, &model_repository) {
                (None, Some(_)) => Config::default(),
                _ => load_config(config.as_ref())?,
            };
            if let Some(addr) = http {
                cfg.server.http = addr;
            }
            if let Some(addr) = grpc {
                cfg.server.grpc = addr;
            }
            if let Some(path) = model_repository {
                match cfg.model_repository.as_mut() {
                    Some(r) => r.path = path,
                    None => cfg.model_repository = Some(config::RepositoryConfig::at(path)),
                }
            }
            if let Some(r) = cfg.model_repository.as_mut() {
                if let Some(m) = model_control_mode {
                    r.control_mode = m;
                }
                if let Some(secs) = repository_poll_secs {
                    r.poll_secs = secs;
                }
                if !load_model.is_empty() {
                    r.load_models = load_model;
                }
            } else if model_control_mode.is_some() || !load_model.is_empty() {
                anyhow::bail!("--model-control-mode and --load-model need --model-repository (or `model_repository:` in the config)");
            }
            cfg.validate().map_err(anyhow::Error::msg)?;
            tokio::runtime::Runtime::new()?.block_on(serve(cfg))
        }
        Command::Registry { url, key, command } => registry_cli::run(&url, key.as_deref(), command),
        Command::Models {
            command: ModelsCommand::Fetch { name, config },
        } => {
            let cfg = load_config(config.as_ref())?;
            let chosen: Vec<_> = cfg
                .models
                .iter()
                .filter(|m| name.as_ref().is_none_or(|n| &m.name == n))
                .collect();
            if chosen.is_empty() {
                let known: Vec<_> = cfg.models.iter().map(|m| m.name.as_str()).collect();
                anyhow::bail!(
                    "no model named `{}` in the config; known: {}",
                    name.unwrap_or_default(),
                    known.join(", ")
                );
            }
            for m in chosen {
                let path = models::resolve(&m.source)
                    .with_context(|| format!("fetching model `{}`", m.name))?;
                println!("{}\t{}", m.name, path.display());
            }
            Ok(())
        }
    }
}

async fn serve(cfg: Config) -> Result<()> {
    // Latencies as histograms (not summaries), as vLLM's dashboards expect.
    let buckets = [
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ];
    // The Triton plane's latencies are sub-millisecond to seconds; its batch
    // sizes powers of two. Full and prefix matchers win over the suffix one.
    let dnn_buckets = [
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0,
    ];
    let batch_sizes: Vec<f64> = (0..=12).map(|p| f64::from(1u32 << p)).collect();
    use metrics_exporter_prometheus::Matcher;
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &buckets)?
        .set_buckets_for_metric(Matcher::Prefix("nv_inference_".into()), &dnn_buckets)?
        .set_buckets_for_metric(
            Matcher::Full("nv_inference_batch_size".into()),
            &batch_sizes,
        )?
        .install_recorder()
        .context("installing the metrics recorder")?;
    let mut state = api::AppState::new(cfg.models.len(), Some(prometheus));
    if !cfg.upstreams.is_empty() {
        let ups: Vec<_> = cfg
            .upstreams
            .iter()
            .cloned()
            .map(upstream::Upstream::new)
            .collect();
        for u in &ups {
            tokio::spawn(u.clone().check_health());
            tracing::info!(upstream = %u.config.name, replicas = u.config.endpoints.len(), "remote upstream");
        }
        state = state.with_upstreams(ups);
    }
    if let Some(path) = &cfg.experiments_file {
        let exps = experiments::Experiments::load(path, state.routes().clone())
            .map_err(anyhow::Error::msg)?;
        tracing::info!(path = %path.display(), experiments = exps.current().names().len(), "experiments loaded; watching for changes and SIGHUP");
        tokio::spawn(exps.clone().watch());
    }
    if let Some(rc) = &cfg.registry {
        let url = rc.database_url(&cfg.server);
        let registry = tokio::task::block_in_place(|| registry::Registry::open(&url))
            .with_context(|| format!("opening the registry at {url}"))?;
        tracing::info!(database = %url.split('@').next_back().unwrap_or_default(), "registry open");
        let mut keys = Vec::new();
        for k in &rc.api_keys {
            let secret = k.secret().map_err(anyhow::Error::msg)?;
            let actor = registry::Actor {
                name: k.name.clone(),
                role: k.role,
            };
            keys.push((secret, actor));
        }
        state = state.with_registry(api::registry::RegistryApi::new(registry.clone(), keys));
        if !rc.rollouts.is_empty() {
            let auto = rollout::RolloutController::new(
                registry.clone(),
                rc.rollouts.clone(),
                state.versions.clone(),
                state.shadows.clone(),
            );
            tokio::spawn(auto.run(std::time::Duration::from_millis(
                rc.rollout_interval_ms.max(100),
            )));
        }
        let ctl = controller::Controller::new(registry, state.routes().clone(), rc.engine.clone());
        tokio::spawn(ctl.run(std::time::Duration::from_secs(rc.reconcile_interval_secs)));
    }
    if let Some(rc) = &cfg.model_repository {
        let mode: engine::dnn::ControlMode = rc.control_mode.parse().map_err(anyhow::Error::msg)?;
        let (path, load) = (rc.path.clone(), rc.load_models.clone());
        tracing::info!(path = %path.display(), mode = %rc.control_mode, "loading the model repository");
        let repo = tokio::task::spawn_blocking(move || {
            engine::dnn::ModelRepository::open(&path, mode, &load)
        })
        .await?
        .map_err(anyhow::Error::msg)?;
        if mode == engine::dnn::ControlMode::Poll {
            let (repo, every) = (repo.clone(), std::time::Duration::from_secs(rc.poll_secs));
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(every).await;
                    let r = repo.clone();
                    let _ = tokio::task::spawn_blocking(move || r.poll()).await;
                }
            });
        }
        let shadows = api::kserve::shadow::Shadows::new(&rc.shadows).map_err(anyhow::Error::msg)?;
        state = state.with_model_repository(repo, shadows);
    }
    let kserve_upstreams = cfg
        .upstreams
        .iter()
        .any(|u| u.protocol == upstream::Protocol::Kserve);
    if cfg.model_repository.is_some() || kserve_upstreams {
        let grpc = tokio::net::TcpListener::bind(&cfg.server.grpc)
            .await
            .with_context(|| format!("binding {}", cfg.server.grpc))?;
        tracing::info!("KServe gRPC on {}", cfg.server.grpc);
        let grpc_state = state.clone();
        tokio::spawn(async move {
            let shutdown = async {
                let _ = tokio::signal::ctrl_c().await;
            };
            if let Err(e) = api::kserve::grpc::serve(grpc, grpc_state, shutdown).await {
                tracing::error!("KServe gRPC stopped: {e:#}");
            }
        });
    }
    let listener = tokio::net::TcpListener::bind(&cfg.server.http)
        .await
        .with_context(|| format!("binding {}", cfg.server.http))?;
    tracing::info!(
        "listening on http://{} (health: /health, API: /v1, KServe: /v2)",
        cfg.server.http
    );
    let app = api::router(state.clone());
    let server = tokio::spawn(async move {
        use axum::serve::ListenerExt;
        // Small responses go out at once, not after a delayed ACK.
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
    });
    let models = cfg.models.clone();
    let loading = tokio::task::spawn_blocking(move || -> Result<()> {
        let device = candle_core::Device::Cpu;
        for m in &models {
            let path = models::resolve(&m.source)
                .with_context(|| format!("fetching model `{}`", m.name))?;
            tracing::info!(model = %m.name, path = %path.display(), "loading");
            let loaded = load_model(&path, &device)
                .with_context(|| format!("loading model `{}`", m.name))?;
            state.add(LlmEngine::start(&m.name, loaded, (&m.engine).into()));
            tracing::info!(model = %m.name, "ready");
        }
        Ok(())
    });
    loading.await??;
    server.await??;
    Ok(())
}
