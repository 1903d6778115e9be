//! Several nodes on one PostgreSQL registry: each learns of a change the
//! moment another commits it (LISTEN/NOTIFY, the poll staying as the
//! fallback), and rollout policies run on one node at a time (a session
//! advisory lock as the lease: it is released when its holder's connection
//! ends, so a node that dies hands it over to the next that asks).
use super::store::{self, StoreError};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The channel registry writes notify on.
pub const CHANNEL: &str = "switchyard_registry";

/// The advisory lock key of the rollout lease (any fixed number; this is
/// "swyd" in ASCII).
const LEASE_KEY: i64 = 0x7377_7964;

/// Listens on its own connection, on a thread of its own, waking `changed`
/// for every notification. A lost connection is opened again (with a wake,
/// since notifications may have been missed meanwhile).
pub fn listen(url: &str, ca: Option<&Path>, changed: Arc<tokio::sync::Notify>) {
    let (url, ca) = (url.to_string(), ca.map(Path::to_path_buf));
    std::thread::Builder::new()
        .name("registry-listen".into())
        .spawn(move || {
            let mut backoff = Duration::from_millis(200);
            loop {
                match listen_once(&url, ca.as_deref(), &changed) {
                    Ok(()) => backoff = Duration::from_millis(200),
                    Err(e) => {
                        tracing::warn!(error = %e, "registry notifications stopped; listening again");
                        std::thread::sleep(backoff);
                        backoff = (backoff * 2).min(Duration::from_secs(10));
                    }
                }
            }
        })
        .expect("spawning the registry listener");
}

/// Listens until the connection fails.
fn listen_once(
    url: &str,
    ca: Option<&Path>,
    changed: &tokio::sync::Notify,
) -> Result<(), StoreError> {
    use postgres::fallible_iterator::FallibleIterator;
    let mut client = store::pg_session(url, ca)?;
    client.batch_execute(&format!("LISTEN {CHANNEL}"))?;
    tracing::info!("listening for registry changes from other nodes");
    changed.notify_one();
    loop {
        let next = client
            .notifications()
            .timeout_iter(Duration::from_secs(15))
            .next()?;
        match next {
            Some(_) => {
                metrics::counter!("switchyard:registry_notifications_total").increment(1);
                changed.notify_one();
            }
            // Quiet for a while: make sure the connection still stands.
            None => {
                client.is_valid(Duration::from_secs(5))?;
            }
        }
    }
}

/// Whether this node may run the rollout policies now.
pub enum Lease {
    /// SQLite is one node's: always.
    Local,
    /// A PostgreSQL session that holds (or tries for) the advisory lock.
    Shared {
        url: String,
        ca: Option<PathBuf>,
        session: Option<Box<postgres::Client>>,
        held: bool,
    },
}

impl Lease {
    pub fn new(url: &str, ca: Option<&Path>) -> Self {
        if store::is_postgres(url) {
            Lease::Shared {
                url: url.to_string(),
                ca: ca.map(Path::to_path_buf),
                session: None,
                held: false,
            }
        } else {
            Lease::Local
        }
    }

    /// Holds the lease, taking it if it is free; false while another node
    /// holds it or the database cannot be reached. Blocks on the database.
    pub fn hold(&mut self) -> bool {
        let Lease::Shared {
            url,
            ca,
            session,
            held,
        } = self
        else {
            return true;
        };
        let before = *held;
        *held = match Self::check(url, ca.as_deref(), session, *held) {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "rollout lease: the database is unreachable");
                // The session is gone, and the lock with it.
                *session = None;
                false
            }
        };
        if *held != before {
            tracing::info!(
                held = *held,
                "rollout lease {}",
                if *held { "taken" } else { "lost" }
            );
        }
        metrics::gauge!("switchyard:rollout_lease_held").set(f64::from(u8::from(*held)));
        *held
    }

    fn check(
        url: &str,
        ca: Option<&Path>,
        session: &mut Option<Box<postgres::Client>>,
        held: bool,
    ) -> Result<bool, StoreError> {
        if session.as_ref().is_none_or(|c| c.is_closed()) {
            let fresh = session.insert(Box::new(store::pg_session(url, ca)?));
            return Ok(try_lock(fresh)?);
        }
        let client = session.as_mut().expect("a session stands");
        if held {
            // Still ours while the session stands.
            client.is_valid(Duration::from_secs(5))?;
            return Ok(true);
        }
        Ok(try_lock(client)?)
    }
}

fn try_lock(c: &mut postgres::Client) -> Result<bool, postgres::Error> {
    c.query_one("SELECT pg_try_advisory_lock($1)", &[&LEASE_KEY])
        .map(|row| row.get(0))
}
