//! `switchyard`: one server for ML models in production. This file holds the
//! command line; the `gateway` library holds everything it runs.
mod model_cli;
mod registry_cli;
mod serve_cli;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use gateway::config::{self, Config};
use gateway::models;
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
        /// With `--model-control-mode explicit` and no API keys configured,
        /// let anyone who reaches the ports load and unload models.
        #[arg(long)]
        allow_unauthenticated_control: bool,
        /// Triton's response cache: `local,size=BYTES` (models opt in with
        /// `response_cache { enable: true }`).
        #[arg(long)]
        cache_config: Option<String>,
        #[command(flatten)]
        flags: Box<serve_cli::ServeFlags>,
    },
    /// Manage model files.
    Models {
        #[command(subcommand)]
        command: ModelsCommand,
    },
    /// Write a GGUF model or an AWQ checkpoint out as a dense Hugging Face folder.
    Export {
        /// A GGUF file, an AWQ folder, or a model name from the config.
        model: String,
        #[arg(long, value_enum, default_value = "f16")]
        dtype: model_cli::Dtype,
        #[arg(long)]
        out: PathBuf,
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Quantize a dense Hugging Face folder to 4 bits (AWQ or round-to-nearest),
    /// written as an AutoAWQ checkpoint.
    Quantize {
        /// A folder of f32, f16 or bf16 safetensors (see `switchyard export`).
        model: PathBuf,
        #[command(flatten)]
        args: model_cli::QuantizeArgs,
    },
    /// Measure a model (perplexity).
    Eval {
        #[command(subcommand)]
        command: model_cli::EvalCommand,
    },
    /// Use a running server's model registry (versions, transitions, rollback, audit).
    Registry {
        /// The server's base URL.
        #[arg(long, env = "SWITCHYARD_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// An API key from the server's `auth.api_keys` or `registry.api_keys`.
        #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
        key: Option<String>,
        #[command(subcommand)]
        command: registry_cli::RegistryCommand,
    },
    /// Read a running server's request log (`registry.request_log`).
    Requests {
        /// The server's base URL.
        #[arg(long, env = "SWITCHYARD_URL", default_value = "http://127.0.0.1:8080")]
        url: String,
        /// An API key whose role may read the registry.
        #[arg(long, env = "SWITCHYARD_API_KEY", hide_env_values = true)]
        key: Option<String>,
        #[command(subcommand)]
        command: registry_cli::RequestsCommand,
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
            allow_unauthenticated_control,
            cache_config,
            flags,
        } => {
            let mut cfg = match (&config, &model_repository) {
                (None, Some(_)) => Config::default(),
                _ => load_config(config.as_ref())?,
            };
            if grpc.is_some() && flags.grpc_port.is_some() {
                anyhow::bail!("give --grpc ADDR or --grpc-port, not both");
            }
            let print_config = flags.print_config;
            flags.apply(&mut cfg, http)?;
            if let Some(addr) = grpc {
                cfg.server.grpc = Some(addr);
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
                if allow_unauthenticated_control {
                    r.allow_unauthenticated_control = true;
                }
                if let Some(c) = &cache_config {
                    r.cache_size = config::parse_cache_config(c).map_err(anyhow::Error::msg)?;
                }
            } else if model_control_mode.is_some()
                || !load_model.is_empty()
                || allow_unauthenticated_control
                || cache_config.is_some()
            {
                anyhow::bail!("--model-control-mode, --load-model, --allow-unauthenticated-control and --cache-config need --model-repository (or `model_repository:` in the config)");
            }
            cfg.validate().map_err(anyhow::Error::msg)?;
            if print_config {
                print!("{}", serve_cli::effective_yaml(&cfg)?);
                return Ok(());
            }
            tokio::runtime::Runtime::new()?.block_on(gateway::server::serve(cfg))
        }
        Command::Export {
            model,
            dtype,
            out,
            config,
        } => {
            let path = model_cli::model_path(&model, &load_config(config.as_ref())?)?;
            model_cli::export(&path, &out, dtype)
        }
        Command::Quantize { model, args } => model_cli::quantize(&model, args),
        Command::Eval { command } => model_cli::eval(command, load_config),
        Command::Registry { url, key, command } => registry_cli::run(&url, key.as_deref(), command),
        Command::Requests { url, key, command } => {
            registry_cli::requests(&url, key.as_deref(), command)
        }
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
