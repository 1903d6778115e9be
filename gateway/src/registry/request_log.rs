//! The request log: sampled records of requests and their answers (the
//! primary's and each shadow's), kept in the registry's database so that
//! they survive restarts and every node writes to one place, with a bound on
//! the rows kept. Entries are JSON documents; the route and time are columns
//! so that reads filter in SQL.
use super::store::Sql;
use super::{Registry, RegistryError, Result};
use serde_json::Value;

/// One entry, as written.
#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub at_ms: i64,
    pub route: String,
    /// `request_id`, `version`, `arm`, `experiment`, `role` (`primary` or
    /// `shadow`), `latency_ms`, token counts, the request and the answer, and
    /// for shadows the comparison.
    pub doc: Value,
}

impl Registry {
    /// Appends `entries` and drops the oldest rows beyond `max_rows`. It
    /// takes the write lock but is no registry change (the controller is
    /// not woken).
    pub fn log_requests(&self, entries: &[Entry], max_rows: u64) -> Result<()> {
        let mut guard = self.lock();
        let db = &mut **guard;
        db.begin_write()?;
        let run = |db: &mut dyn super::store::Db| -> Result<()> {
            let rows = db.query("SELECT COALESCE(MAX(id), 0) FROM request_log", &[])?;
            let mut id = rows
                .first()
                .and_then(|r| r.first())
                .and_then(Sql::int)
                .unwrap_or(0);
            for e in entries {
                id += 1;
                db.exec(
                    "INSERT INTO request_log (id, at_ms, route, doc) VALUES ($1, $2, $3, $4)",
                    &[
                        Sql::Int(id),
                        Sql::Int(e.at_ms),
                        Sql::Text(e.route.clone()),
                        Sql::Text(e.doc.to_string()),
                    ],
                )?;
            }
            let keep = i64::try_from(max_rows).unwrap_or(i64::MAX);
            db.exec(
                "DELETE FROM request_log WHERE id <= $1",
                &[Sql::Int(id.saturating_sub(keep))],
            )?;
            Ok(())
        };
        match run(db) {
            Ok(()) => Ok(db.commit()?),
            Err(e) => {
                db.rollback();
                Err(e)
            }
        }
    }

    /// Entries of `route` (or all) since `since_ms`, oldest first, at most `limit`.
    pub fn requests(&self, route: Option<&str>, since_ms: i64, limit: i64) -> Result<Vec<Entry>> {
        let rows = self.lock().query(
            "SELECT at_ms, route, doc FROM request_log \
             WHERE at_ms >= $1 AND ($2 = '' OR route = $2) ORDER BY id LIMIT $3",
            &[
                Sql::Int(since_ms),
                Sql::Text(route.unwrap_or_default().into()),
                Sql::Int(limit),
            ],
        )?;
        rows.iter()
            .map(|r| match r.as_slice() {
                [Sql::Int(at_ms), Sql::Text(route), Sql::Text(doc)] => Ok(Entry {
                    at_ms: *at_ms,
                    route: route.clone(),
                    doc: serde_json::from_str(doc).map_err(|e| {
                        RegistryError::Invalid(format!("a request log row is not JSON: {e}"))
                    })?,
                }),
                _ => Err(RegistryError::Invalid(
                    "a request log row has missing columns".into(),
                )),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(route: &str, i: i64) -> Entry {
        Entry {
            at_ms: 1000 + i,
            route: route.into(),
            doc: serde_json::json!({"request_id": format!("r{i}")}),
        }
    }

    #[test]
    fn entries_are_kept_in_order_up_to_the_bound() {
        let r = Registry::open(":memory:").unwrap();
        let batch: Vec<Entry> = (0..5)
            .map(|i| entry(if i % 2 == 0 { "a" } else { "b" }, i))
            .collect();
        r.log_requests(&batch, 4).unwrap();
        let all = r.requests(None, 0, 100).unwrap();
        // Five written, four kept: the oldest went.
        assert_eq!(all, batch[1..].to_vec());
        assert_eq!(
            r.requests(Some("a"), 0, 100).unwrap(),
            vec![batch[2].clone(), batch[4].clone()]
        );
        assert_eq!(r.requests(None, 1003, 100).unwrap(), batch[3..].to_vec());
        assert_eq!(r.requests(None, 0, 1).unwrap(), vec![batch[1].clone()]);
    }
}
