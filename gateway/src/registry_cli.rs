//! `switchyard registry ...`: the registry's REST API from the command line.
//! Prints the server's JSON answer; a refused or failed call exits non-zero
//! with the server's message on stderr.
use anyhow::{bail, Context, Result};
use clap::Subcommand;
use serde_json::{json, Value};
use std::path::PathBuf;

#[derive(Subcommand)]
pub enum RegistryCommand {
    /// Models: list, create FILE, show NAME.
    Models {
        #[command(subcommand)]
        command: ModelsCmd,
    },
    /// Versions of a model: list, register FILE, show.
    Versions {
        #[command(subcommand)]
        command: VersionsCmd,
    },
    /// Move a version to STATE (offline_passed, shadow, canary, ab_test, promoted, deprecated, archived, failed).
    Transition {
        model: String,
        version: u32,
        state: String,
        /// Share of traffic for canary / ab_test (defaults 10 and 50).
        #[arg(long)]
        percent: Option<f64>,
        #[arg(long)]
        reason: Option<String>,
        /// Admins: promote an irreversible model anyway, for this reason.
        #[arg(long)]
        override_reason: Option<String>,
    },
    /// Change a canary's or A/B candidate's share of traffic (a ramp).
    Ramp {
        model: String,
        version: u32,
        /// The new share, above 0 and below 100 (promote for 100).
        percent: f64,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Approve a version for a target state.
    Approve {
        model: String,
        version: u32,
        target: String,
        #[arg(long)]
        comment: Option<String>,
    },
    /// Return the model's traffic to its previous promoted version.
    Rollback {
        model: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// A version's lineage and transitive dependents.
    Lineage { model: String, version: u32 },
    /// Which versions served MODEL at a time (RFC 3339 or Unix ms; default now).
    Served {
        model: String,
        #[arg(long)]
        at: Option<String>,
    },
    /// Audit entries, oldest first.
    Audit {
        #[arg(long)]
        model: Option<String>,
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long)]
        limit: Option<i64>,
    },
    /// Recompute the audit log's hash chain.
    Verify,
}

#[derive(Subcommand)]
pub enum ModelsCmd {
    List,
    /// Register a model from a YAML or JSON file (name, class, tier, rollback_class, owner, gates).
    Create {
        file: PathBuf,
    },
    Show {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum VersionsCmd {
    List {
        model: String,
    },
    /// Register the next version from a YAML or JSON file (artifact, metrics, lineage, ...).
    Register {
        model: String,
        file: PathBuf,
    },
    Show {
        model: String,
        version: u32,
    },
}

fn read_doc(path: &PathBuf) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_yaml::from_str(&text).with_context(|| format!("{} is not YAML or JSON", path.display()))
}

pub fn run(url: &str, key: Option<&str>, command: RegistryCommand) -> Result<()> {
    use reqwest::Method;
    let base = format!("{}/v1/registry", url.trim_end_matches('/'));
    let (method, path, body): (Method, String, Option<Value>) = match command {
        RegistryCommand::Models { command } => match command {
            ModelsCmd::List => (Method::GET, "/models".into(), None),
            ModelsCmd::Create { file } => (Method::POST, "/models".into(), Some(read_doc(&file)?)),
            ModelsCmd::Show { name } => (Method::GET, format!("/models/{name}"), None),
        },
        RegistryCommand::Versions { command } => match command {
            VersionsCmd::List { model } => (Method::GET, format!("/models/{model}/versions"), None),
            VersionsCmd::Register { model, file } => (
                Method::POST,
                format!("/models/{model}/versions"),
                Some(read_doc(&file)?),
            ),
            VersionsCmd::Show { model, version } => (
                Method::GET,
                format!("/models/{model}/versions/{version}"),
                None,
            ),
        },
        RegistryCommand::Transition {
            model,
            version,
            state,
            percent,
            reason,
            override_reason,
        } => (
            Method::POST,
            format!("/models/{model}/versions/{version}/transitions"),
            Some(
                json!({"to": state, "traffic_percent": percent, "reason": reason, "override_reason": override_reason}),
            ),
        ),
        RegistryCommand::Ramp {
            model,
            version,
            percent,
            reason,
        } => (
            Method::POST,
            format!("/models/{model}/versions/{version}/traffic"),
            Some(json!({"traffic_percent": percent, "reason": reason})),
        ),
        RegistryCommand::Approve {
            model,
            version,
            target,
            comment,
        } => (
            Method::POST,
            format!("/models/{model}/versions/{version}/approvals"),
            Some(json!({"target": target, "comment": comment})),
        ),
        RegistryCommand::Rollback { model, reason } => (
            Method::POST,
            format!("/models/{model}/rollback"),
            Some(json!({ "reason": reason })),
        ),
        RegistryCommand::Lineage { model, version } => (
            Method::GET,
            format!("/models/{model}/versions/{version}/lineage"),
            None,
        ),
        RegistryCommand::Served { model, at } => (
            Method::GET,
            match at {
                Some(t) => format!("/models/{model}/served?at={t}"),
                None => format!("/models/{model}/served"),
            },
            None,
        ),
        RegistryCommand::Audit {
            model,
            after,
            limit,
        } => {
            let mut q = format!("/audit?after={after}");
            if let Some(m) = model {
                q.push_str(&format!("&model={m}"));
            }
            if let Some(l) = limit {
                q.push_str(&format!("&limit={l}"));
            }
            (Method::GET, q, None)
        }
        RegistryCommand::Verify => (Method::GET, "/audit/verify".into(), None),
    };
    let value = send(&format!("{base}{path}"), key, method, &[], body)?;
    println!("{}", serde_json::to_string_pretty(&value)?);
    if value["ok"] == json!(false) {
        bail!("the audit chain does not verify");
    }
    Ok(())
}

/// Calls the server; an answer that is not a success is an error with the
/// server's message.
fn send(
    url: &str,
    key: Option<&str>,
    method: reqwest::Method,
    query: &[(&str, String)],
    body: Option<Value>,
) -> Result<Value> {
    let client = reqwest::blocking::Client::new();
    let mut req = client.request(method, url).query(query);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req
        .send()
        .with_context(|| format!("calling {url} (is `switchyard serve` running there?)"))?;
    let status = resp.status();
    let text = resp.text()?;
    let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
    if !status.is_success() {
        let msg = value["error"]["message"]
            .as_str()
            .map_or_else(|| value.to_string(), str::to_string);
        bail!("{status}: {msg}");
    }
    Ok(value)
}

#[derive(Subcommand)]
pub enum RequestsCommand {
    /// Print the request log's entries (sampled requests and answers), oldest first.
    Export {
        #[arg(long)]
        route: Option<String>,
        /// Only entries served by this arm (primary, canary, ab_test, pinned, an experiment arm).
        #[arg(long)]
        arm: Option<String>,
        /// From this time on (RFC 3339 or Unix ms).
        #[arg(long)]
        since: Option<String>,
        #[arg(long, default_value_t = 10_000)]
        limit: u32,
        /// `jsonl` (one entry per line) or `json` (one document).
        #[arg(long, default_value = "jsonl")]
        format: String,
    },
}

/// `switchyard requests ...`: the request log of a running server.
pub fn requests(url: &str, key: Option<&str>, command: RequestsCommand) -> Result<()> {
    let RequestsCommand::Export {
        route,
        arm,
        since,
        limit,
        format,
    } = command;
    if format != "jsonl" && format != "json" {
        bail!("--format: `{format}` is not jsonl or json");
    }
    let mut query = vec![("limit", limit.to_string())];
    for (k, v) in [("route", route), ("arm", arm), ("since", since)] {
        query.extend(v.map(|v| (k, v)));
    }
    let url = format!("{}/v1/requests", url.trim_end_matches('/'));
    let value = send(&url, key, reqwest::Method::GET, &query, None)?;
    if format == "json" {
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    for entry in value["requests"].as_array().into_iter().flatten() {
        println!("{entry}");
    }
    Ok(())
}
