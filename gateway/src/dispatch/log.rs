//! Sampling requests into the request log: a route's `log_sample_percent`
//! of its requests (sticky by request id) is recorded, with each answer
//! (the primary's and each shadow's), by a writer thread that batches
//! entries into the registry's database. A full queue drops the entry and
//! counts it (`switchyard:request_log_dropped_total`); serving never waits on it.
use super::sticky_hash::bucket;
use crate::registry::request_log::Entry;
use crate::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::HashMap;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;

/// `registry.request_log` in the config.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RequestLogConfig {
    /// Rows kept; the oldest go first.
    #[serde(default = "default_max_rows")]
    pub max_rows: u64,
    /// The routes logged (every other route is not).
    #[serde(default)]
    pub routes: Vec<LoggedRoute>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LoggedRoute {
    pub route: String,
    pub log_sample_percent: f64,
}

fn default_max_rows() -> u64 {
    100_000
}

impl RequestLogConfig {
    pub fn validate(&self, at: &str) -> Result<(), String> {
        if self.max_rows == 0 {
            return Err(format!("{at}.max_rows: must be at least 1"));
        }
        for (i, r) in self.routes.iter().enumerate() {
            if !(0.0..=100.0).contains(&r.log_sample_percent) {
                return Err(format!(
                    "{at}.routes[{i}].log_sample_percent: must be between 0 and 100, got {}",
                    r.log_sample_percent
                ));
            }
        }
        Ok(())
    }
}

/// Entries waiting for the writer at most.
const QUEUE: usize = 4096;
/// Entries written in one transaction at most.
const BATCH: usize = 256;

#[derive(Clone)]
pub struct RequestLog {
    tx: SyncSender<Entry>,
    percents: Arc<HashMap<String, f64>>,
}

impl RequestLog {
    /// Starts the writer thread.
    pub fn start(registry: Registry, config: &RequestLogConfig) -> Self {
        let (tx, rx) = sync_channel(QUEUE);
        let max_rows = config.max_rows;
        std::thread::Builder::new()
            .name("request-log".into())
            .spawn(move || write_loop(&registry, &rx, max_rows))
            .expect("spawning the request log writer");
        Self {
            tx,
            percents: Arc::new(
                config
                    .routes
                    .iter()
                    .map(|r| (r.route.clone(), r.log_sample_percent))
                    .collect(),
            ),
        }
    }

    /// Whether request `request_id` of `route` is logged: its bucket under
    /// `{route}/log` lies in the route's share.
    pub fn samples(&self, route: &str, request_id: &str) -> bool {
        self.percents
            .get(route)
            .is_some_and(|p| f64::from(bucket(&format!("{route}/log"), request_id)) < p * 100.0)
    }

    /// Queues an entry; never waits.
    pub fn write(&self, route: &str, doc: Value) {
        let entry = Entry {
            at_ms: crate::registry::now_ms(),
            route: route.to_string(),
            doc,
        };
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) = self.tx.try_send(entry)
        {
            metrics::counter!("switchyard:request_log_dropped_total", "route" => route.to_string())
                .increment(1);
        }
    }
}

fn write_loop(registry: &Registry, rx: &Receiver<Entry>, max_rows: u64) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(e) => batch.push(e),
                Err(_) => break,
            }
        }
        if let Err(e) = registry.log_requests(&batch, max_rows) {
            tracing::warn!(entries = batch.len(), "writing the request log: {e}");
            metrics::counter!("switchyard:request_log_dropped_total", "route" => "*")
                .increment(batch.len() as u64);
        }
    }
}
