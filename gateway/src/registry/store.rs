//! The registry's storage: one small SQL surface (exec, query, a write
//! transaction) over SQLite (embedded default) or PostgreSQL (shared by nodes).
use std::path::Path;

/// A value going into or coming out of a statement.
#[derive(Debug, Clone, PartialEq)]
pub enum Sql {
    Null,
    Int(i64),
    Text(String),
}

impl Sql {
    pub fn int(&self) -> Option<i64> {
        match self {
            Sql::Int(i) => Some(*i),
            _ => None,
        }
    }

    pub fn text(&self) -> Option<&str> {
        match self {
            Sql::Text(s) => Some(s),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StoreError(pub String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        Self(format!("sqlite: {e}"))
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => Self(format!("postgres: {}", db.message())),
            None => {
                // The cause (a refused certificate, a reset connection) is in the chain.
                let mut message = format!("postgres: {e}");
                let mut cause = std::error::Error::source(&e);
                while let Some(c) = cause {
                    message.push_str(&format!(": {c}"));
                    cause = c.source();
                }
                Self(message)
            }
        }
    }
}

/// Statements use `$1, $2, ...` placeholders and only BIGINT and TEXT columns,
/// so the same text runs on both databases.
pub trait Db: Send {
    /// Starts a transaction that holds the registry's write lock until commit.
    fn begin_write(&mut self) -> Result<(), StoreError>;
    fn commit(&mut self) -> Result<(), StoreError>;
    fn rollback(&mut self);
    fn exec(&mut self, sql: &str, params: &[Sql]) -> Result<u64, StoreError>;
    fn query(&mut self, sql: &str, params: &[Sql]) -> Result<Vec<Vec<Sql>>, StoreError>;
    /// Within a write transaction: tells the other nodes sharing the
    /// database, at commit, that the registry changed.
    fn announce(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Opens `sqlite:PATH`, `postgres://...` / `postgresql://...`, or a plain
/// file path (SQLite), creates the tables when they are missing and brings
/// the schema to this binary's version ([`migrate`]).
/// PostgreSQL URLs with `sslmode=require` connect over TLS, verified against
/// `ca` (a PEM file) or the webpki roots.
pub fn open(url: &str, ca: Option<&Path>) -> Result<Box<dyn Db>, StoreError> {
    let mut db = connect(url, ca)?;
    migrate(db.as_mut())?;
    Ok(db)
}

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = 2;

/// Forward migrations, by the version they bring the schema to. Version 1
/// is [`TABLES`] as every database had them before the schema was
/// versioned (a database without `schema_version` is at 1); each later
/// version's statements run once, in order, in one write transaction.
const MIGRATIONS: &[(i64, &[&str])] = &[
    (1, &[]),
    (
        2,
        &[
            // The audit log by model (`/audit?model=`), the request log by route.
            "CREATE INDEX IF NOT EXISTS audit_by_model ON audit (model, seq)",
            "CREATE INDEX IF NOT EXISTS request_log_by_route ON request_log (route, id)",
        ],
    ),
];

/// Brings the schema to [`SCHEMA_VERSION`], recording each step in
/// `schema_version`; a database written by a newer binary is refused
/// rather than written in a shape that binary does not expect.
pub fn migrate(db: &mut dyn Db) -> Result<(), StoreError> {
    db.begin_write()?;
    let steps = |db: &mut dyn Db| -> Result<(), StoreError> {
        db.exec(
            "CREATE TABLE IF NOT EXISTS schema_version (version BIGINT NOT NULL, at_ms BIGINT NOT NULL)",
            &[],
        )?;
        let rows = db.query("SELECT MAX(version) FROM schema_version", &[])?;
        let current = rows
            .first()
            .and_then(|r| r.first())
            .and_then(Sql::int)
            .unwrap_or(1);
        if current > SCHEMA_VERSION {
            return Err(StoreError(format!(
                "the registry database is at schema version {current}, newer than this \
                 switchyard's {SCHEMA_VERSION}: run a switchyard at least as new as the one that \
                 wrote it"
            )));
        }
        for (version, statements) in MIGRATIONS.iter().filter(|(v, _)| *v > current) {
            for sql in *statements {
                db.exec(sql, &[])?;
            }
            db.exec(
                "INSERT INTO schema_version (version, at_ms) VALUES ($1, $2)",
                &[Sql::Int(*version), Sql::Int(super::now_ms())],
            )?;
            tracing::info!(version, "registry schema migrated");
        }
        Ok(())
    };
    match steps(db) {
        Ok(()) => db.commit(),
        Err(e) => {
            db.rollback();
            Err(e)
        }
    }
}

/// Whether `url` names a PostgreSQL database (shared by nodes).
pub fn is_postgres(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The TLS a PostgreSQL URL asks for (`sslmode=require`), verified against `ca`.
fn pg_tls(url: &str, ca: Option<&Path>) -> Result<Option<super::tls::Tls>, StoreError> {
    match (super::tls::required(url), ca) {
        (true, ca) => Ok(Some(super::tls::Tls::new(ca).map_err(StoreError)?)),
        (false, Some(_)) => Err(StoreError(
            "registry.database_ca is set, but the database URL does not say \
             sslmode=require"
                .into(),
        )),
        (false, None) => Ok(None),
    }
}

/// A plain PostgreSQL session of its own (notifications, the rollout lease).
pub fn pg_session(url: &str, ca: Option<&Path>) -> Result<postgres::Client, StoreError> {
    Postgres::connect(url, &pg_tls(url, ca)?)
}

fn connect(url: &str, ca: Option<&Path>) -> Result<Box<dyn Db>, StoreError> {
    if is_postgres(url) {
        Ok(Box::new(Postgres::open(url, pg_tls(url, ca)?)?))
    } else {
        let path = url.strip_prefix("sqlite:").unwrap_or(url);
        Ok(Box::new(Sqlite::open(Path::new(path))?))
    }
}

/// Tables shared by both databases. Audit rows are guarded by triggers that
/// refuse UPDATE and DELETE, so only direct tampering with the file (or the
/// database's superuser) can change them — which `verify` then detects.
const TABLES: &str = "
CREATE TABLE IF NOT EXISTS models (name TEXT PRIMARY KEY, doc TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS versions (
    model TEXT NOT NULL, number BIGINT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (model, number));
CREATE TABLE IF NOT EXISTS version_status (
    model TEXT NOT NULL, number BIGINT NOT NULL, doc TEXT NOT NULL,
    PRIMARY KEY (model, number));
CREATE TABLE IF NOT EXISTS audit (
    seq BIGINT PRIMARY KEY, at_ms BIGINT NOT NULL, actor TEXT NOT NULL,
    action TEXT NOT NULL, model TEXT NOT NULL, version BIGINT,
    body TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS request_log (
    id BIGINT PRIMARY KEY, at_ms BIGINT NOT NULL, route TEXT NOT NULL, doc TEXT NOT NULL);
";

pub struct Sqlite {
    conn: rusqlite::Connection,
}

impl Sqlite {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("creating {}: {e}", dir.display())))?;
        }
        let conn = rusqlite::Connection::open(path)
            .map_err(|e| StoreError(format!("opening {}: {e}", path.display())))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // WAL for concurrent readers; FULL so every commit is on disk before
        // the API acknowledges it.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(TABLES)?;
        conn.execute_batch(
            "CREATE TRIGGER IF NOT EXISTS audit_no_update BEFORE UPDATE ON audit
               BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;
             CREATE TRIGGER IF NOT EXISTS audit_no_delete BEFORE DELETE ON audit
               BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END;",
        )?;
        Ok(Self { conn })
    }
}

/// SQLite numbers `?N` parameters; `$N` would be a named one.
fn sqlite_text(sql: &str) -> String {
    sql.replace('$', "?")
}

fn to_sqlite(p: &Sql) -> rusqlite::types::Value {
    match p {
        Sql::Null => rusqlite::types::Value::Null,
        Sql::Int(i) => rusqlite::types::Value::Integer(*i),
        Sql::Text(s) => rusqlite::types::Value::Text(s.clone()),
    }
}

impl Db for Sqlite {
    fn begin_write(&mut self) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch("BEGIN IMMEDIATE")?)
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        Ok(self.conn.execute_batch("COMMIT")?)
    }

    fn rollback(&mut self) {
        let _ = self.conn.execute_batch("ROLLBACK");
    }

    fn exec(&mut self, sql: &str, params: &[Sql]) -> Result<u64, StoreError> {
        let params: Vec<_> = params.iter().map(to_sqlite).collect();
        let n = self
            .conn
            .prepare_cached(&sqlite_text(sql))?
            .execute(rusqlite::params_from_iter(params))?;
        Ok(n as u64)
    }

    fn query(&mut self, sql: &str, params: &[Sql]) -> Result<Vec<Vec<Sql>>, StoreError> {
        let params: Vec<_> = params.iter().map(to_sqlite).collect();
        let mut stmt = self.conn.prepare_cached(&sqlite_text(sql))?;
        let cols = stmt.column_count();
        let rows = stmt.query_map(rusqlite::params_from_iter(params), |row| {
            (0..cols)
                .map(|i| {
                    Ok(match row.get::<_, rusqlite::types::Value>(i)? {
                        rusqlite::types::Value::Integer(v) => Sql::Int(v),
                        rusqlite::types::Value::Text(s) => Sql::Text(s),
                        _ => Sql::Null,
                    })
                })
                .collect::<Result<Vec<_>, _>>()
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }
}

pub struct Postgres {
    url: String,
    tls: Option<super::tls::Tls>,
    client: postgres::Client,
    /// A statement failed below SQL (the connection): open a new one next time.
    broken: bool,
    /// A write transaction is open: a lost connection lost it, so nothing is
    /// retried until it ends.
    in_tx: bool,
}

impl Postgres {
    fn connect(url: &str, tls: &Option<super::tls::Tls>) -> Result<postgres::Client, StoreError> {
        Ok(match tls {
            Some(t) => postgres::Client::connect(url, t.clone())?,
            None => postgres::Client::connect(url, postgres::NoTls)?,
        })
    }

    pub fn open(url: &str, tls: Option<super::tls::Tls>) -> Result<Self, StoreError> {
        let mut client = Self::connect(url, &tls)?;
        client.batch_execute(TABLES)?;
        client.batch_execute(
            "CREATE OR REPLACE FUNCTION switchyard_audit_append_only() RETURNS trigger
               LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$;
             DO $$ BEGIN
               IF NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgname = 'audit_append_only') THEN
                 CREATE TRIGGER audit_append_only BEFORE UPDATE OR DELETE ON audit
                   FOR EACH ROW EXECUTE FUNCTION switchyard_audit_append_only();
               END IF;
             END $$;",
        )?;
        Ok(Self {
            url: url.to_string(),
            tls,
            client,
            broken: false,
            in_tx: false,
        })
    }

    /// The connection, opened again if the server closed it (a restart, a
    /// failover); the statement that saw it close has already failed.
    fn client(&mut self) -> Result<&mut postgres::Client, StoreError> {
        if self.broken || self.client.is_closed() {
            tracing::warn!("the registry's PostgreSQL connection closed; reconnecting");
            self.client = Self::connect(&self.url, &self.tls)?;
            self.broken = false;
        }
        Ok(&mut self.client)
    }

    /// Runs `f` on the connection. If the connection turns out to be gone
    /// (a server restart, a failover) outside a write transaction, nothing
    /// was done on it: `f` runs once more on a new one.
    fn retrying<T>(
        &mut self,
        f: impl Fn(&mut postgres::Client) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let r = f(self.client()?);
        match self.check(r) {
            Err(_) if self.broken && !self.in_tx => {
                let r = f(self.client()?);
                self.check(r)
            }
            other => other,
        }
    }

    /// Notes a failure of the connection itself (not of a statement): an
    /// I/O error, or the server ending the session (SQLSTATE class 08, 57).
    fn check<T>(&mut self, r: Result<T, postgres::Error>) -> Result<T, StoreError> {
        if let Err(e) = &r {
            let code = e.as_db_error().map(|d| d.code().code().to_string());
            self.broken |=
                e.is_closed() || code.is_none_or(|c| c.starts_with("08") || c.starts_with("57"));
        }
        Ok(r?)
    }
}

impl Db for Postgres {
    fn begin_write(&mut self) -> Result<(), StoreError> {
        // One writer at a time across every node sharing the database, so the
        // audit chain stays a chain and gate checks see the latest state.
        self.retrying(|c| c.batch_execute("BEGIN; LOCK TABLE audit IN EXCLUSIVE MODE"))?;
        self.in_tx = true;
        Ok(())
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.in_tx = false;
        let r = self.client.batch_execute("COMMIT");
        self.check(r)
    }

    fn rollback(&mut self) {
        self.in_tx = false;
        let r = self.client.batch_execute("ROLLBACK");
        let _ = self.check(r);
    }

    fn announce(&mut self) -> Result<(), StoreError> {
        let r = self
            .client
            .batch_execute(&format!("NOTIFY {}", super::nodes::CHANNEL));
        self.check(r)
    }

    fn exec(&mut self, sql: &str, params: &[Sql]) -> Result<u64, StoreError> {
        let boxed = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            boxed.iter().map(|b| b.as_ref()).collect();
        self.retrying(|c| c.execute(sql, &refs))
    }

    fn query(&mut self, sql: &str, params: &[Sql]) -> Result<Vec<Vec<Sql>>, StoreError> {
        let boxed = pg_params(params);
        let refs: Vec<&(dyn postgres::types::ToSql + Sync)> =
            boxed.iter().map(|b| b.as_ref()).collect();
        let rows = self.retrying(|c| c.query(sql, &refs))?;
        rows.iter()
            .map(|row| {
                (0..row.len())
                    .map(|i| {
                        Ok(
                            if *row.columns()[i].type_() == postgres::types::Type::INT8 {
                                row.try_get::<_, Option<i64>>(i)?
                                    .map_or(Sql::Null, Sql::Int)
                            } else {
                                row.try_get::<_, Option<String>>(i)?
                                    .map_or(Sql::Null, Sql::Text)
                            },
                        )
                    })
                    .collect()
            })
            .collect()
    }
}

fn pg_params(params: &[Sql]) -> Vec<Box<dyn postgres::types::ToSql + Sync>> {
    params
        .iter()
        .map(|p| -> Box<dyn postgres::types::ToSql + Sync> {
            match p {
                Sql::Null => Box::new(None::<i64>),
                Sql::Int(i) => Box::new(*i),
                Sql::Text(s) => Box::new(s.clone()),
            }
        })
        .collect()
}
