//! The audit ledger: every submission, dispatch, completion, failure,
//! control and registration, appended in the transaction that does it, then
//! sealed into a hash chain an auditor can check (`hallmark audit verify`).
//!
//! Appending is a plain insert, so concurrent leases and completions never
//! queue on the chain. Sealing gives unsealed entries, in insertion order,
//! the next chain positions and their hashes
//! ([`hallmark_provenance::ledger::entry_hash`]); one sealer at a time holds
//! the head row, and a replica that finds it held skips its turn.

use hallmark_provenance::ledger::{self, Anchor, Checkpoint, EntryFields, SealedEntry};
use sqlx::{AnyConnection, Row};

use super::{Dialect, Result, Store, row_placeholders};

/// What an entry records.
pub mod kind {
    pub const SUBMIT: &str = "submit";
    pub const DISPATCH: &str = "dispatch";
    pub const COMPLETE: &str = "complete";
    pub const FAIL: &str = "fail";
    pub const HAND_BACK: &str = "hand_back";
    pub const EXPIRE: &str = "expire";
    pub const FINISH: &str = "finish";
    pub const REGISTER_WORKER: &str = "register_worker";
    pub const REGISTER_MODEL: &str = "register_model";
    pub const REGISTER_DATASET: &str = "register_dataset";
    pub const UPLOAD_INPUT: &str = "upload_input";
    pub const PURGE_INPUT: &str = "purge_input";
    pub const DELETE_INPUT: &str = "delete_input";
}

/// An entry about to be appended.
#[derive(Debug, Clone)]
pub struct AuditEvent {
    pub kind: &'static str,
    pub job_id: String,
    pub subject: String,
    pub actor: String,
    /// The facts as a JSON object (stored as text; hashed as stored).
    pub body: serde_json::Value,
}

impl AuditEvent {
    pub fn new(kind: &'static str, subject: impl Into<String>, body: serde_json::Value) -> Self {
        Self {
            kind,
            job_id: String::new(),
            subject: subject.into(),
            actor: String::new(),
            body,
        }
    }

    pub fn job(mut self, job_id: impl Into<String>) -> Self {
        self.job_id = job_id.into();
        self
    }

    pub fn actor(mut self, actor: impl Into<String>) -> Self {
        self.actor = actor.into();
        self
    }
}

/// Rows per multi-row statement (4–7 parameters each: far below both
/// dialects' limits).
const ROWS_PER_STATEMENT: usize = 500;

/// Appends `events` on `conn`, inside the caller's transaction.
pub(super) async fn append(conn: &mut AnyConnection, at: i64, events: &[AuditEvent]) -> Result<()> {
    for chunk in events.chunks(ROWS_PER_STATEMENT) {
        let mut sql = String::from(
            "INSERT INTO audit_events (at, kind, job_id, subject, actor, body) VALUES ",
        );
        sql.push_str(&row_placeholders(chunk.len(), 6));
        let mut q = sqlx::query(&sql);
        for e in chunk {
            q = q
                .bind(at)
                .bind(e.kind)
                .bind(&e.job_id)
                .bind(&e.subject)
                .bind(&e.actor)
                .bind(e.body.to_string());
        }
        q.execute(&mut *conn).await?;
    }
    Ok(())
}

/// A page of the sealed chain, with where it stands.
#[derive(Debug, Clone)]
pub struct LedgerPage {
    pub entries: Vec<SealedEntry>,
    /// The last sealed entry (entry 0 with the genesis hash before any).
    pub head: Anchor,
    /// Entries appended but not sealed yet.
    pub unsealed: u64,
    /// The latest signed checkpoint and its signature, if any.
    pub checkpoint: Option<(Checkpoint, Vec<u8>)>,
}

impl Store {
    /// Seals up to `limit` unsealed entries, oldest first. Returns how many;
    /// 0 also when another replica is sealing right now.
    pub async fn seal_audit(&self, limit: u32) -> Result<u64> {
        let mut tx = self.pool.begin().await?;
        let lock = match self.dialect {
            Dialect::Postgres => " FOR UPDATE SKIP LOCKED",
            Dialect::Sqlite => "",
        };
        let Some(head) = sqlx::query(&format!(
            "SELECT seq, hash FROM audit_head WHERE id = 1{lock}"
        ))
        .fetch_optional(&mut *tx)
        .await?
        else {
            return Ok(0);
        };
        let mut seq = head.try_get::<i64, _>("seq")? as u64;
        let mut prev: String = head.try_get("hash")?;
        let rows = sqlx::query(
            "SELECT id, at, kind, job_id, subject, actor, body FROM audit_events \
             WHERE seq IS NULL ORDER BY id LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&mut *tx)
        .await?;
        if rows.is_empty() {
            return Ok(0);
        }
        let mut sealed = Vec::with_capacity(rows.len());
        for r in &rows {
            seq += 1;
            let (kind, job_id, subject, actor, body): (String, String, String, String, String) = (
                r.try_get("kind")?,
                r.try_get("job_id")?,
                r.try_get("subject")?,
                r.try_get("actor")?,
                r.try_get("body")?,
            );
            let hash = ledger::entry_hash(
                seq,
                &prev,
                &EntryFields {
                    at_ms: r.try_get("at")?,
                    kind: &kind,
                    job_id: &job_id,
                    subject: &subject,
                    actor: &actor,
                    body: &body,
                },
            );
            sealed.push((r.try_get::<i64, _>("id")?, seq, prev, hash.clone()));
            prev = hash;
        }
        for chunk in sealed.chunks(ROWS_PER_STATEMENT) {
            let mut sql = String::from("WITH v (id, seq, prev_hash, hash) AS (VALUES ");
            for i in 0..chunk.len() {
                if i > 0 {
                    sql.push_str(", ");
                }
                let p = i * 4;
                sql.push_str(&format!(
                    "(CAST(${} AS BIGINT), CAST(${} AS BIGINT), ${}, ${})",
                    p + 1,
                    p + 2,
                    p + 3,
                    p + 4
                ));
            }
            sql.push_str(
                ") UPDATE audit_events SET seq = v.seq, prev_hash = v.prev_hash, hash = v.hash \
                 FROM v WHERE audit_events.id = v.id",
            );
            let mut q = sqlx::query(&sql);
            for (id, seq, prev, hash) in chunk {
                q = q.bind(*id).bind(*seq as i64).bind(prev).bind(hash);
            }
            q.execute(&mut *tx).await?;
        }
        sqlx::query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1")
            .bind(seq as i64)
            .bind(&prev)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(sealed.len() as u64)
    }

    /// Up to `limit` sealed entries after `after_seq`, in chain order; only
    /// `job_id`'s when one is given (such a page is for reading, not for
    /// checking the chain, which needs every entry).
    pub async fn audit_page(
        &self,
        after_seq: u64,
        limit: u32,
        job_id: Option<&str>,
    ) -> Result<LedgerPage> {
        let filter = if job_id.is_some() {
            " AND job_id = $3"
        } else {
            ""
        };
        let sql = format!(
            "SELECT seq, at, kind, job_id, subject, actor, body, prev_hash, hash FROM audit_events \
             WHERE seq > $1{filter} ORDER BY seq LIMIT $2"
        );
        let mut q = sqlx::query(&sql)
            .bind(after_seq as i64)
            .bind(i64::from(limit));
        if let Some(job) = job_id {
            q = q.bind(job);
        }
        let mut entries = Vec::new();
        for r in q.fetch_all(&self.pool).await? {
            entries.push(SealedEntry {
                seq: r.try_get::<i64, _>("seq")? as u64,
                at_ms: r.try_get("at")?,
                kind: r.try_get("kind")?,
                job_id: r.try_get("job_id")?,
                subject: r.try_get("subject")?,
                actor: r.try_get("actor")?,
                body: r.try_get("body")?,
                prev_hash: r
                    .try_get::<Option<String>, _>("prev_hash")?
                    .unwrap_or_default(),
                hash: r.try_get::<Option<String>, _>("hash")?.unwrap_or_default(),
            });
        }
        let head = self.audit_head().await?;
        let checkpoint = self.latest_checkpoint().await?;
        let unsealed: i64 = sqlx::query("SELECT COUNT(*) AS n FROM audit_events WHERE seq IS NULL")
            .fetch_one(&self.pool)
            .await?
            .try_get("n")?;
        Ok(LedgerPage {
            entries,
            head,
            unsealed: unsealed as u64,
            checkpoint,
        })
    }

    /// The chain's last sealed entry (entry 0 with the genesis hash before any).
    pub async fn audit_head(&self) -> Result<Anchor> {
        let head = sqlx::query("SELECT seq, hash FROM audit_head WHERE id = 1")
            .fetch_one(&self.pool)
            .await?;
        Ok(Anchor {
            seq: head.try_get::<i64, _>("seq")? as u64,
            hash: head.try_get("hash")?,
        })
    }

    /// Keeps a signed checkpoint; one already kept for the same entry (by
    /// another replica) stays.
    pub async fn record_checkpoint(&self, c: &Checkpoint, signature: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO audit_checkpoints (seq, hash, at, signature) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (seq) DO NOTHING",
        )
        .bind(c.seq as i64)
        .bind(&c.hash)
        .bind(c.at_ms)
        .bind(signature)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The signed checkpoint furthest along the chain, with its signature.
    pub async fn latest_checkpoint(&self) -> Result<Option<(Checkpoint, Vec<u8>)>> {
        Ok(self.latest_checkpoints(1).await?.into_iter().next())
    }

    /// Up to `n` signed checkpoints, furthest along the chain first.
    pub async fn latest_checkpoints(&self, n: u32) -> Result<Vec<(Checkpoint, Vec<u8>)>> {
        let rows = sqlx::query(
            "SELECT seq, hash, at, signature FROM audit_checkpoints ORDER BY seq DESC LIMIT $1",
        )
        .bind(i64::from(n))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    Checkpoint {
                        seq: r.try_get::<i64, _>("seq")? as u64,
                        hash: r.try_get("hash")?,
                        at_ms: r.try_get("at")?,
                    },
                    r.try_get("signature")?,
                ))
            })
            .collect()
    }
}
