//! Input images (img2img): their rows, their owners, and their retention.
//!
//! An input's blob is published while its row is locked, and purged while
//! its row is locked, so an upload, a submission and a purge of the same
//! input never interleave: a purge that finds the input used again since its
//! cutoff, or started from by an unfinished task, leaves it; a submission
//! that finds it purged is refused; an upload of purged content restores it.

use std::future::Future;

use hallmark_proto::v1::InputImage;
use sqlx::{AnyConnection, Row};

use super::{AuditEvent, Result, Store, StoreError, audit_kind};
use crate::blobs::BlobError;

/// The tasks that start from the input `inputs.sha256`, or inpaint
/// through it, and are not finished (the terms of the `tasks_open_inputs`
/// and `tasks_open_masks` indexes).
const OPEN_TASKS_STARTING_FROM: &str = "SELECT 1 FROM tasks WHERE tasks.parent_sha256 = inputs.sha256 \
     AND tasks.stage_rank = 0 AND tasks.parent_sha256 IS NOT NULL \
     AND tasks.state IN ('waiting', 'ready', 'held', 'leased') \
     UNION ALL SELECT 1 FROM tasks WHERE tasks.mask_sha256 = inputs.sha256 \
     AND tasks.stage_rank = 0 AND tasks.mask_sha256 IS NOT NULL \
     AND tasks.state IN ('waiting', 'ready', 'held', 'leased')";

/// What recording an upload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputRecorded {
    /// A new input.
    New,
    /// An input purged before, stored again.
    Restored,
    /// An input already stored: its last use is now.
    Known,
}

/// An input the retention purge removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PurgedInput {
    pub sha256: String,
    pub last_used_at: i64,
    /// The blob stays when an artifact is stored under the same hash.
    pub blob_kept: bool,
    /// The blob could not be removed yet (the error): the input is purged
    /// all the same, and the retention sweep removes the blob later.
    pub blob_pending: Option<String>,
}

/// What taking back an upload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeletedInput {
    /// No uploader was left: the input was purged.
    pub purged: bool,
    /// As for [`PurgedInput::blob_pending`].
    pub blob_pending: Option<String>,
}

/// Makes `now` the last use of the stored input `sha256`, locking its row
/// until the transaction ends; false when it is purged or unknown.
pub(super) async fn touch(conn: &mut AnyConnection, sha256: &str, now: i64) -> Result<bool> {
    let touched =
        sqlx::query("UPDATE inputs SET last_used_at = $2 WHERE sha256 = $1 AND purged_at IS NULL")
            .bind(sha256.to_ascii_lowercase())
            .bind(now)
            .execute(conn)
            .await?
            .rows_affected();
    Ok(touched > 0)
}

impl Store {
    /// Records an uploaded input image and that `tenant` uploaded it (none:
    /// an upload without authentication), and runs `publish` (storing its
    /// blob) with the row locked; if `publish` fails, nothing is recorded.
    /// An input uploaded before keeps its first row, and its last use
    /// becomes `now`; a purged one is restored.
    pub async fn record_input<F>(
        &self,
        input: &InputImage,
        tenant: &str,
        now: i64,
        publish: F,
    ) -> Result<InputRecorded>
    where
        F: Future<Output = std::result::Result<(), BlobError>>,
    {
        let sha256 = input.sha256.to_ascii_lowercase();
        let mut tx = self.pool.begin().await?;
        let mut recorded = None;
        // Each statement locks the row it changes; one that changes none
        // lets the next try, and a row another upload inserts meanwhile is
        // found by the next round.
        for _ in 0..3 {
            if touch(&mut tx, &sha256, now).await? {
                recorded = Some(InputRecorded::Known);
                break;
            }
            let restored = sqlx::query(
                "UPDATE inputs SET last_used_at = $2, purged_at = NULL, blob_pending = 0 \
                 WHERE sha256 = $1 AND purged_at IS NOT NULL",
            )
            .bind(&sha256)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if restored > 0 {
                recorded = Some(InputRecorded::Restored);
                break;
            }
            let added = sqlx::query(
                "INSERT INTO inputs (sha256, media_type, width, height, size, created_at, last_used_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (sha256) DO NOTHING",
            )
            .bind(&sha256)
            .bind(&input.media_type)
            .bind(i64::from(input.width))
            .bind(i64::from(input.height))
            .bind(input.size as i64)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if added > 0 {
                recorded = Some(InputRecorded::New);
                break;
            }
        }
        let recorded = recorded.ok_or_else(|| {
            StoreError::Refused(format!(
                "input {sha256} changed under this upload three times; upload it again"
            ))
        })?;
        // Uploaded again: wanted again, whoever took it back before.
        sqlx::query(
            "UPDATE inputs SET delete_requested = 0 WHERE sha256 = $1 AND delete_requested = 1",
        )
        .bind(&sha256)
        .execute(&mut *tx)
        .await?;
        if recorded != InputRecorded::Known {
            let event = AuditEvent::new(
                audit_kind::UPLOAD_INPUT,
                &sha256,
                serde_json::json!({
                    "media_type": input.media_type,
                    "width": input.width,
                    "height": input.height,
                    "size": input.size,
                    "restored": recorded == InputRecorded::Restored,
                }),
            );
            super::audit::append(&mut tx, now, &[event]).await?;
        }
        if !tenant.is_empty() {
            sqlx::query(
                "INSERT INTO input_owners (sha256, tenant) VALUES ($1, $2) ON CONFLICT DO NOTHING",
            )
            .bind(&sha256)
            .bind(tenant)
            .execute(&mut *tx)
            .await?;
        }
        publish.await?;
        tx.commit().await?;
        Ok(recorded)
    }

    /// Whether `tenant` uploaded the input image `sha256`.
    pub async fn input_owned_by(&self, sha256: &str, tenant: &str) -> Result<bool> {
        Ok(
            sqlx::query("SELECT tenant FROM input_owners WHERE sha256 = $1 AND tenant = $2")
                .bind(sha256.to_ascii_lowercase())
                .bind(tenant)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// A stored input image; `None` when there is none, or it was purged
    /// (see [`Store::input_purged_at`]).
    pub async fn find_input(&self, sha256: &str) -> Result<Option<InputImage>> {
        let Some(r) = sqlx::query(
            "SELECT sha256, media_type, width, height, size FROM inputs \
             WHERE sha256 = $1 AND purged_at IS NULL",
        )
        .bind(sha256.to_ascii_lowercase())
        .fetch_optional(&self.pool)
        .await?
        else {
            return Ok(None);
        };
        Ok(Some(input_from_row(&r)?))
    }

    /// Up to `limit` stored inputs `tenant` uploaded (`None`: every stored
    /// input), most recently used first (then by hash), with their upload
    /// and last use; from after `after` (the previous page's last, as its
    /// last use and hash).
    pub async fn list_inputs(
        &self,
        tenant: Option<&str>,
        limit: u32,
        after: Option<&(i64, String)>,
    ) -> Result<Vec<(InputImage, i64, i64)>> {
        let (after_used, after_sha) = match after {
            Some((used, sha)) => (*used, sha.as_str()),
            None => (i64::MAX, ""),
        };
        let rows = sqlx::query(
            "SELECT sha256, media_type, width, height, size, created_at, last_used_at FROM inputs \
             WHERE purged_at IS NULL AND ($1 = '' OR sha256 IN \
               (SELECT sha256 FROM input_owners WHERE tenant = $1)) \
             AND (last_used_at < $3 OR (last_used_at = $3 AND sha256 > $4)) \
             ORDER BY last_used_at DESC, sha256 LIMIT $2",
        )
        .bind(tenant.unwrap_or(""))
        .bind(i64::from(limit))
        .bind(after_used)
        .bind(after_sha)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    input_from_row(r)?,
                    r.try_get("created_at")?,
                    r.try_get("last_used_at")?,
                ))
            })
            .collect()
    }

    /// When the input `sha256` was purged; `None` when it is stored, or was
    /// never uploaded.
    pub async fn input_purged_at(&self, sha256: &str) -> Result<Option<i64>> {
        Ok(
            sqlx::query_scalar::<_, Option<i64>>("SELECT purged_at FROM inputs WHERE sha256 = $1")
                .bind(sha256.to_ascii_lowercase())
                .fetch_optional(&self.pool)
                .await?
                .flatten(),
        )
    }

    /// Up to `limit` inputs the purge may remove: last used before
    /// `cutoff`, and started from by no unfinished task; least recently used
    /// first, as (last use, sha256), from after `after` (the last one of
    /// the previous page), so inputs whose blobs cannot be deleted yet do
    /// not hold back the ones behind them.
    pub async fn unused_inputs(
        &self,
        cutoff: i64,
        limit: u32,
        after: Option<&(i64, String)>,
    ) -> Result<Vec<(i64, String)>> {
        let (after_used, after_sha) = match after {
            Some((used, sha)) => (*used, sha.as_str()),
            None => (i64::MIN, ""),
        };
        let rows = sqlx::query(&format!(
            "SELECT last_used_at, sha256 FROM inputs WHERE purged_at IS NULL AND last_used_at < $1 \
             AND (last_used_at > $3 OR (last_used_at = $3 AND sha256 > $4)) \
             AND NOT EXISTS ({OPEN_TASKS_STARTING_FROM}) ORDER BY last_used_at, sha256 LIMIT $2"
        ))
        .bind(cutoff)
        .bind(i64::from(limit))
        .bind(after_used)
        .bind(after_sha)
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| Ok((r.try_get("last_used_at")?, r.try_get("sha256")?)))
            .collect()
    }

    /// Purges the input `sha256` if it is still unused since before
    /// `cutoff` (`i64::MAX`: whenever it was last used, for one whose
    /// deletion waited) and no unfinished task starts from it: marks it purged, with
    /// an audit entry, and commits; then removes its blob with
    /// [`Store::remove_input_blob`] (kept when an artifact shares it). A
    /// blob that cannot be removed now is left to a later sweep
    /// ([`PurgedInput::blob_pending`]). `None`: it was not purged (used
    /// again, or purged already).
    pub async fn purge_input<F, Fut>(
        &self,
        sha256: &str,
        cutoff: i64,
        now: i64,
        remove_blob: F,
    ) -> Result<Option<PurgedInput>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<(), BlobError>>,
    {
        let mut tx = self.pool.begin().await?;
        let last_used_at: Option<i64> = sqlx::query_scalar(&format!(
            "UPDATE inputs SET purged_at = $2, blob_pending = 1, delete_requested = 0 \
             WHERE sha256 = $1 AND purged_at IS NULL \
             AND last_used_at < $3 AND NOT EXISTS ({OPEN_TASKS_STARTING_FROM}) \
             RETURNING last_used_at"
        ))
        .bind(sha256)
        .bind(now)
        .bind(cutoff)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(last_used_at) = last_used_at else {
            return Ok(None);
        };
        let blob_kept = keep_if_shared(&mut tx, sha256).await?;
        let event = AuditEvent::new(
            audit_kind::PURGE_INPUT,
            sha256,
            serde_json::json!({ "last_used_at": last_used_at, "blob_kept": blob_kept }),
        );
        super::audit::append(&mut tx, now, &[event]).await?;
        tx.commit().await?;
        Ok(Some(PurgedInput {
            sha256: sha256.to_string(),
            last_used_at,
            blob_kept,
            blob_pending: self.remove_pending_blob(sha256, remove_blob).await?,
        }))
    }

    /// Removes the blob of the purged input `sha256` if it is still marked
    /// for removal, running `remove_blob` with the input's row locked: an
    /// upload restoring it meanwhile waits, then stores the blob again; one
    /// that came first cleared the mark, and nothing is removed. Returns
    /// whether it removed one. If `remove_blob` fails, the mark stays.
    pub async fn remove_input_blob<F, Fut>(&self, sha256: &str, remove_blob: F) -> Result<bool>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<(), BlobError>>,
    {
        let mut tx = self.pool.begin().await?;
        let marked = sqlx::query(
            "UPDATE inputs SET blob_pending = 0 WHERE sha256 = $1 AND blob_pending = 1 \
             AND purged_at IS NOT NULL",
        )
        .bind(sha256)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if marked == 0 {
            return Ok(false);
        }
        // An artifact stored under the same hash since keeps it too.
        let removed = !keep_if_shared(&mut tx, sha256).await?;
        if removed {
            remove_blob().await?;
        }
        tx.commit().await?;
        Ok(removed)
    }

    /// [`Store::remove_input_blob`], with a blob store's refusal returned
    /// as the message of a removal left for later.
    async fn remove_pending_blob<F, Fut>(
        &self,
        sha256: &str,
        remove_blob: F,
    ) -> Result<Option<String>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<(), BlobError>>,
    {
        match self.remove_input_blob(sha256, remove_blob).await {
            Ok(_) => Ok(None),
            Err(StoreError::Blob(e)) => Ok(Some(e.to_string())),
            Err(e) => Err(e),
        }
    }

    /// Up to `limit` inputs taken back by their last uploader while
    /// another tenant's job still started from them, that no unfinished
    /// task starts from any more: purged when a job ends, and by the sweep,
    /// whatever the retention.
    pub async fn deleted_inputs_now_unused(&self, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT sha256 FROM inputs WHERE delete_requested = 1 AND purged_at IS NULL \
             AND NOT EXISTS ({OPEN_TASKS_STARTING_FROM}) ORDER BY sha256 LIMIT $1"
        ))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Up to `limit` purged inputs whose blobs are still to be removed.
    pub async fn pending_input_blobs(&self, limit: u32) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT sha256 FROM inputs WHERE blob_pending = 1 ORDER BY sha256 LIMIT $1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?)
    }

    /// Takes back `tenant`'s upload of the input `sha256` (`None`: every
    /// tenant's, for an operator or with authentication off), and purges
    /// the input when no uploader is left, running `remove_blob` with its
    /// row locked (skipped when an artifact shares the blob). Refused while
    /// an unfinished task of a job the caller may act on starts from it;
    /// an input the tenant did not upload is not found. With no uploader
    /// left but another tenant's unfinished task starting from it (a job an
    /// operator submitted), it is marked `delete_requested`, and purged
    /// when that job ends (or by the sweep) once no unfinished task starts
    /// from it
    /// ([`Store::deleted_inputs_now_unused`]), whatever the retention. The
    /// purge commits before the blob is removed, as
    /// [`Store::purge_input`]'s does.
    pub async fn delete_input<F, Fut>(
        &self,
        sha256: &str,
        tenant: Option<&str>,
        actor: &str,
        now: i64,
        remove_blob: F,
    ) -> Result<DeletedInput>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = std::result::Result<(), BlobError>>,
    {
        let sha256 = sha256.to_ascii_lowercase();
        let not_found = || StoreError::NotFound(format!("no uploaded input image {sha256}"));
        let mut tx = self.pool.begin().await?;
        // Locks the row: a submission naming the input waits for this.
        let stored = sqlx::query(
            "UPDATE inputs SET last_used_at = last_used_at WHERE sha256 = $1 AND purged_at IS NULL",
        )
        .bind(&sha256)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if stored == 0 {
            return Err(not_found());
        }
        let released =
            sqlx::query("DELETE FROM input_owners WHERE sha256 = $1 AND ($2 = '' OR tenant = $2)")
                .bind(&sha256)
                .bind(tenant.unwrap_or(""))
                .execute(&mut *tx)
                .await?
                .rows_affected();
        if tenant.is_some() && released == 0 {
            return Err(not_found());
        }
        let in_use: Option<String> = sqlx::query_scalar(
            "SELECT job_id FROM tasks WHERE parent_sha256 = $1 AND stage_rank = 0 \
             AND parent_sha256 IS NOT NULL AND state IN ('waiting', 'ready', 'held', 'leased') \
             AND ($2 = '' OR tenant = $2) \
             UNION ALL SELECT job_id FROM tasks WHERE mask_sha256 = $1 AND stage_rank = 0 \
             AND mask_sha256 IS NOT NULL AND state IN ('waiting', 'ready', 'held', 'leased') \
             AND ($2 = '' OR tenant = $2) LIMIT 1",
        )
        .bind(&sha256)
        .bind(tenant.unwrap_or(""))
        .fetch_optional(&mut *tx)
        .await?;
        if let Some(job_id) = in_use {
            return Err(StoreError::Refused(format!(
                "input image {sha256} is in use by job {job_id}, which has not finished; cancel it or let it finish, then delete the input"
            )));
        }
        let owners: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM input_owners WHERE sha256 = $1",
        )
        .bind(&sha256)
        .fetch_one(&mut *tx)
        .await?;
        // Another tenant's job (one an operator submitted) may still start
        // from it: then it is purged once that ends (marked
        // `delete_requested`). (With no tenant, `in_use` above looked at
        // every job already.)
        let others_in_use = match (owners, tenant) {
            (0, Some(_)) => sqlx::query_scalar::<_, String>(&format!(
                "SELECT sha256 FROM inputs WHERE sha256 = $1 AND EXISTS ({OPEN_TASKS_STARTING_FROM})"
            ))
            .bind(&sha256)
            .fetch_optional(&mut *tx)
            .await?
            .is_some(),
            _ => false,
        };
        let purged = owners == 0 && !others_in_use;
        if others_in_use {
            sqlx::query("UPDATE inputs SET delete_requested = 1 WHERE sha256 = $1")
                .bind(&sha256)
                .execute(&mut *tx)
                .await?;
        }
        let mut blob_kept = None;
        if purged {
            sqlx::query("UPDATE inputs SET purged_at = $2, blob_pending = 1 WHERE sha256 = $1")
                .bind(&sha256)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            blob_kept = Some(keep_if_shared(&mut tx, &sha256).await?);
        }
        let event = AuditEvent::new(
            audit_kind::DELETE_INPUT,
            &sha256,
            serde_json::json!({
                "tenant": tenant,
                "purged": purged,
                "blob_kept": blob_kept,
            }),
        )
        .actor(actor);
        super::audit::append(&mut tx, now, &[event]).await?;
        tx.commit().await?;
        let blob_pending = match purged {
            true => self.remove_pending_blob(&sha256, remove_blob).await?,
            false => None,
        };
        Ok(DeletedInput {
            purged,
            blob_pending,
        })
    }
}

fn input_from_row(r: &sqlx::any::AnyRow) -> Result<InputImage> {
    Ok(InputImage {
        sha256: r.try_get("sha256")?,
        media_type: r.try_get("media_type")?,
        width: r.try_get::<i64, _>("width")? as u32,
        height: r.try_get::<i64, _>("height")? as u32,
        size: r.try_get::<i64, _>("size")? as u64,
    })
}

/// Whether an artifact is stored under the same hash as the input
/// `sha256` (then its blob stays, and is no longer marked for removal).
async fn keep_if_shared(conn: &mut AnyConnection, sha256: &str) -> Result<bool> {
    let shared = sqlx::query("SELECT task_id FROM artifacts WHERE sha256 = $1 LIMIT 1")
        .bind(sha256)
        .fetch_optional(&mut *conn)
        .await?
        .is_some();
    if shared {
        sqlx::query("UPDATE inputs SET blob_pending = 0 WHERE sha256 = $1")
            .bind(sha256)
            .execute(&mut *conn)
            .await?;
    }
    Ok(shared)
}
