//! The store: the only source of truth for jobs, tasks, leases, workers,
//! artifacts and the registry (DESIGN invariant 1).
//!
//! One interface, two backends chosen by `database_url`: Postgres for a
//! cluster and SQLite for a single node. Both run the same SQL through sqlx's
//! `Any` driver; where the dialects differ (row locking) the statement is
//! chosen by [`Dialect`]. The shared test suite in `tests/store.rs` runs
//! against both.

mod audit;
mod census;
mod dispatch;
mod inputs;
mod jobs;
mod provenance;
mod registry;

use std::path::Path;
use std::str::FromStr;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyConnection, AnyPool, Executor};

pub use audit::{AuditEvent, LedgerPage, TreeCheck, kind as audit_kind};
pub use census::{Census, ModelWorkers, TaskCount};
pub use dispatch::{
    AttemptEnd, ClientCert, Completion, FailOutcome, LeasePolicy, ReapOutcome, WorkerCaps,
    WorkerRegistration,
};
pub use inputs::{DeletedInput, InputRecorded, PurgedInput};
pub use jobs::{JobControl, NewJob};
pub use provenance::{ArtifactKey, StoredArtifact};

use crate::spec::SpecError;

static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/postgres");
static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Which SQL dialect the store speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Postgres,
    Sqlite,
}

/// Why a store call did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The job spec is wrong; nothing was written.
    #[error("invalid job spec: {0}")]
    Spec(#[from] SpecError),
    /// The thing asked for does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The call is refused in the current state: stale fencing token, unservable job, …
    #[error("{0}")]
    Refused(String),
    #[error("database error: {0}")]
    Db(#[from] sqlx::Error),
    #[error("database migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The blob store failed a step the transaction waited on.
    #[error("blob store: {0}")]
    Blob(#[from] crate::blobs::BlobError),
    /// Stored data that does not check out (a ledger tree node missing or
    /// not what its children hash to): nothing is built on it.
    #[error("{0}")]
    Corrupt(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Task states, as stored.
pub mod state {
    pub const WAITING: &str = "waiting";
    pub const READY: &str = "ready";
    pub const HELD: &str = "held";
    pub const LEASED: &str = "leased";
    pub const SUCCEEDED: &str = "succeeded";
    pub const FAILED: &str = "failed";
    pub const CANCELED: &str = "canceled";
}

/// A connection pool over Postgres or SQLite.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    dialect: Dialect,
    /// When this replica last wrote each tenant's dispatch time (a hint).
    dispatch_notes: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, i64>>>,
}

impl Store {
    /// Connects to `url` and brings the schema up to date.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self> {
        sqlx::any::install_default_drivers();
        let dialect = if url.starts_with("postgres:") || url.starts_with("postgresql:") {
            Dialect::Postgres
        } else if url.starts_with("sqlite:") {
            Dialect::Sqlite
        } else {
            return Err(StoreError::Refused(format!(
                "database_url {url:?} is neither postgres://… nor sqlite://…"
            )));
        };
        let url = match dialect {
            Dialect::Sqlite => sqlite_url(url)?,
            Dialect::Postgres => url.to_string(),
        };
        let options = AnyConnectOptions::from_str(&url)?;
        let pool = AnyPoolOptions::new()
            // SQLite allows one writer at a time: one connection serialises
            // transactions instead of failing them with SQLITE_BUSY.
            .max_connections(match dialect {
                Dialect::Postgres => max_connections.max(1),
                Dialect::Sqlite => 1,
            })
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if dialect == Dialect::Sqlite {
                        conn.execute(
                            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; \
                             PRAGMA foreign_keys=ON; PRAGMA busy_timeout=10000;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await?;
        match dialect {
            Dialect::Postgres => {
                POSTGRES_MIGRATIONS.run(&pool).await?;
                rebuild_invalid_indexes(&pool).await?;
            }
            Dialect::Sqlite => SQLITE_MIGRATIONS.run(&pool).await?,
        }
        Ok(Self {
            pool,
            dialect,
            dispatch_notes: Default::default(),
        })
    }

    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    pub fn pool(&self) -> &AnyPool {
        &self.pool
    }

    /// Row locking for a queue pick: concurrent leasers skip each other's rows
    /// on Postgres; SQLite has one writer, so it needs none.
    fn skip_locked(&self) -> &'static str {
        match self.dialect {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        }
    }
}

/// Rebuilds the schema's indexes Postgres holds invalid. A migration that
/// builds one `CONCURRENTLY` (0015, 0016) and fails part-way — the coordinator
/// killed, the statement cancelled — leaves it invalid: written on every
/// change, never used, and skipped by its `IF NOT EXISTS` when the
/// migration runs again. Runs after the migrations, whose lock keeps
/// another replica's build from looking invalid here while it is under way.
async fn rebuild_invalid_indexes(pool: &AnyPool) -> Result<()> {
    let invalid: Vec<String> = sqlx::query_scalar(
        "SELECT CAST(c.relname AS TEXT) FROM pg_index i \
         JOIN pg_class c ON c.oid = i.indexrelid \
         JOIN pg_namespace n ON n.oid = c.relnamespace \
         WHERE NOT i.indisvalid AND n.nspname = current_schema() ORDER BY 1",
    )
    .fetch_all(pool)
    .await?;
    for index in invalid {
        tracing::warn!(%index, "an index a failed build left invalid is rebuilt (REINDEX CONCURRENTLY)");
        let quoted = format!("\"{}\"", index.replace('"', "\"\""));
        sqlx::query(&format!("REINDEX INDEX CONCURRENTLY {quoted}"))
            .execute(pool)
            .await?;
    }
    Ok(())
}

/// Makes `sqlite://path` create its file (and folder) when missing.
fn sqlite_url(url: &str) -> Result<String> {
    let rest = url
        .trim_start_matches("sqlite://")
        .trim_start_matches("sqlite:");
    let path = rest.split('?').next().unwrap_or_default();
    if path.is_empty() || path == ":memory:" {
        return Err(StoreError::Refused(
            "an in-memory SQLite store would lose every job on restart; give a file path".into(),
        ));
    }
    if let Some(parent) = Path::new(path)
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
    {
        std::fs::create_dir_all(parent)
            .map_err(|e| StoreError::Refused(format!("cannot create {}: {e}", parent.display())))?;
    }
    Ok(if url.contains('?') {
        url.to_string()
    } else {
        format!("sqlite://{path}?mode=rwc")
    })
}

/// Parameter `n` (from 1) of a statement on `conn` whose parameters are
/// bound in the order they appear in its text: `$n`, or on SQLite a plain
/// `?`. SQLite looks a numbered parameter up by its name in a list as long
/// as the statement's, once per value bound, which made binding a
/// statement of thousands of parameters (a 400-row insert) quadratic —
/// 90% of a large job's submission; unnumbered ones are bound by position.
fn param(conn: &AnyConnection, n: usize) -> String {
    if conn.backend_name() == <sqlx::Sqlite as sqlx::Database>::NAME {
        "?".to_string()
    } else {
        format!("${n}")
    }
}

/// The placeholders of a multi-row insert on `conn` whose only parameters
/// they are: `rows` rows of `width` values, bound in order ([`param`]).
fn row_placeholders(conn: &AnyConnection, rows: usize, width: usize) -> String {
    (0..rows)
        .map(|r| {
            let row: Vec<String> = (1..=width).map(|i| param(conn, r * width + i)).collect();
            format!("({})", row.join(", "))
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}
