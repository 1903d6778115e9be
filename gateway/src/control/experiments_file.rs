//! The experiments file: read at start, published into the route table,
//! and reloaded on change or SIGHUP; a bad file keeps the table in force.
use crate::dispatch::experiments::ExperimentTable;
use crate::dispatch::routing::Routes;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The experiments file and the route table it publishes into.
#[derive(Clone)]
pub struct Experiments {
    routes: Routes,
    path: PathBuf,
}

fn read(path: &Path) -> Result<ExperimentTable, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    ExperimentTable::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
}

impl Experiments {
    /// Reads `path` and publishes its experiments into `routes`.
    pub fn load(path: &Path, routes: Routes) -> Result<Self, String> {
        routes.set_experiments(read(path)?);
        Ok(Self {
            routes,
            path: path.to_path_buf(),
        })
    }

    pub fn current(&self) -> Arc<ExperimentTable> {
        self.routes.snapshot().experiments.clone()
    }

    /// Reads the file again; a bad file keeps the table in force.
    pub fn reload(&self) -> Result<usize, String> {
        let table = read(&self.path)?;
        let n = table.by_name.len();
        self.routes.set_experiments(table);
        Ok(n)
    }

    /// Reloads on SIGHUP and whenever the file's modification time or size changes.
    pub async fn watch(self) {
        let path = self.path.clone();
        let stamp = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().ok(), m.len()))
        };
        let mut last = stamp(&path);
        #[cfg(unix)]
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        loop {
            #[cfg(unix)]
            let hangup = async {
                match hup.as_mut() {
                    Some(h) => {
                        h.recv().await;
                    }
                    None => std::future::pending::<()>().await,
                }
            };
            #[cfg(not(unix))]
            let hangup = std::future::pending::<()>();
            let forced = tokio::select! {
                _ = hangup => true,
                _ = tokio::time::sleep(std::time::Duration::from_millis(500)) => false,
            };
            let now = stamp(&path);
            if !forced && now == last {
                continue;
            }
            last = now;
            match self.reload() {
                Ok(n) => {
                    tracing::info!(path = %path.display(), experiments = n, "experiments reloaded");
                    metrics::counter!("switchyard:experiment_reloads_total", "outcome" => "ok")
                        .increment(1);
                }
                Err(e) => {
                    tracing::warn!(
                        "experiments not reloaded, the previous ones stay in force: {e}"
                    );
                    metrics::counter!("switchyard:experiment_reloads_total", "outcome" => "rejected")
                        .increment(1);
                }
            }
        }
    }
}
