//! Dispatch: worker registration, fenced leases, heartbeats, completions,
//! failures and the reaping of expired leases.
//!
//! Every lease carries a fencing token (the task's `lease_token`, bumped on
//! each lease). Completions and failures name the token; a stale one changes
//! nothing and is refused, so a task records at most one artifact
//! (DESIGN invariant 2, also enforced by `artifacts`' primary key).

use hallmark_proto::v1::{ModelCapability, RevokedLease, TaskLease, WorkerInfo};
use sqlx::Row;

use super::audit::{self, AuditEvent, kind};
use super::{Result, Store, StoreError, state};
use crate::spec::{STAGE_GENERATE, STAGE_REFINE, STAGE_UPSCALE, stage_rank};
use crate::stamps::CheckedStamp;

/// Coarseness of the per-tenant dispatch time kept for round-robin.
const DISPATCH_NOTE_MS: i64 = 5;

/// How long a lease lives: a base plus a share per megapixel-step of work.
#[derive(Debug, Clone, Copy)]
pub struct LeasePolicy {
    pub base_ms: u64,
    pub ms_per_megapixel_step: u64,
}

impl LeasePolicy {
    pub fn ttl_ms(&self, pixels: u64, steps: u32) -> i64 {
        let work = pixels.saturating_mul(u64::from(steps)) / 1_000_000;
        (self.base_ms + work.saturating_mul(self.ms_per_megapixel_step)) as i64
    }
}

/// What the lease query needs to know about the asking worker.
#[derive(Debug, Clone)]
pub struct WorkerCaps {
    pub worker_id: String,
    pub max_pixels: u64,
    pub max_batch: u32,
    /// The role of the token it registered with (`Caller::name`).
    pub principal: String,
    /// SHA-256 (hex) of the TLS client certificate it registered with; ''
    /// for none.
    pub client_cert_sha256: String,
    /// The (engine, model id) pairs it registered, in order.
    pub models: Vec<(String, String)>,
}

/// How a leased attempt ended without a result ([`Store::fail`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// It failed: the task is tried again while attempts remain.
    Failed,
    /// Given back unfinished (drain, shutdown): no attempt is charged.
    HandedBack,
    /// The task itself is at fault (a request the engine refuses): it
    /// fails for good now, whatever attempts remain.
    FailedForGood,
}

/// The TLS client certificate a caller connected with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCert {
    /// SHA-256 of the certificate (DER), hex.
    pub sha256: String,
    /// Its subject, as `CN=gpu-1, O=…`.
    pub subject: String,
}

/// A worker as it registers: who it is and what it can render.
#[derive(Debug, Clone, Copy)]
pub struct WorkerRegistration<'a> {
    pub worker_id: &'a str,
    pub name: &'a str,
    pub hostname: &'a str,
    pub engines: &'a [String],
    /// (engine, model) pairs it serves.
    pub models: &'a [(String, ModelCapability)],
    pub max_pixels: u64,
    pub max_batch: u32,
    /// The role of the token it registers with (`Caller::name`); '' with
    /// authentication off.
    pub principal: &'a str,
    /// The TLS client certificate it connected with (mutual TLS), if any.
    pub client_cert: Option<&'a ClientCert>,
}

/// A finished upload, ready to be recorded.
#[derive(Debug, Clone)]
pub struct Completion {
    pub worker_id: String,
    pub task_id: String,
    pub fencing_token: i64,
    pub sha256: String,
    pub size: u64,
    pub media_type: String,
    pub width: u32,
    pub height: u32,
    /// Watermark id and manifest, checked at upload.
    pub stamp: CheckedStamp,
}

/// What a recorded failure did to the task.
#[derive(Debug, Clone)]
pub struct FailOutcome {
    pub job_id: String,
    /// `ready` (will be retried) or `failed` (budget spent).
    pub state: String,
}

/// What one reap pass changed.
#[derive(Debug, Clone, Default)]
pub struct ReapOutcome {
    /// Jobs with leases that expired (tasks back to ready, or failed).
    pub expired_jobs: Vec<String>,
    /// Expired leases, requeued or (budget spent) failed.
    pub expired: u64,
    /// Expired leases whose task went back to ready.
    pub requeued: u64,
    /// Jobs that were closed, with the state they closed in (`succeeded`
    /// or `failed`).
    pub finished_jobs: Vec<(String, String)>,
}

impl Store {
    /// Records a worker and the models it serves. A model the registry knows
    /// with other weights is refused; an unknown one is added to the registry.
    pub async fn register_worker(&self, w: &WorkerRegistration<'_>, now: i64) -> Result<()> {
        let WorkerRegistration {
            worker_id,
            name,
            hostname,
            engines,
            models,
            max_pixels,
            max_batch,
            principal,
            client_cert,
        } = *w;
        let (cert_sha256, cert_subject) = client_cert
            .map(|c| (c.sha256.as_str(), c.subject.as_str()))
            .unwrap_or_default();
        let mut tx = self.pool.begin().await?;
        for (engine, model) in models {
            let registered: Vec<(String, String)> = sqlx::query(
                "SELECT path, sha256 FROM model_weights WHERE model_id = $1 ORDER BY path",
            )
            .bind(&model.model_id)
            .fetch_all(&mut *tx)
            .await?
            .iter()
            .map(|r| Ok((r.try_get("path")?, r.try_get("sha256")?)))
            .collect::<Result<_>>()?;
            if registered.is_empty() {
                sqlx::query(
                    "INSERT INTO models (id, family, license, parent_model_id, config_json, created_at) \
                     VALUES ($1, $2, 'unknown', NULL, '{}', $3) ON CONFLICT (id) DO NOTHING",
                )
                .bind(&model.model_id)
                .bind(engine)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "INSERT INTO model_weights (model_id, path, sha256, size) VALUES ($1, '*', $2, 0) \
                     ON CONFLICT (model_id, path) DO NOTHING",
                )
                .bind(&model.model_id)
                .bind(&model.weights_sha256)
                .execute(&mut *tx)
                .await?;
            } else {
                let digest = hallmark_provenance::weights_digest(
                    registered.iter().map(|(p, s)| (p.as_str(), s.as_str())),
                );
                if digest != model.weights_sha256 {
                    return Err(StoreError::Refused(format!(
                        "worker {name:?} declares model {:?} with weights {}, but the registry has {digest}; refusing to serve mismatched weights",
                        model.model_id, model.weights_sha256
                    )));
                }
            }
            // The same weights refine (or inpaint) only, whoever serves them.
            if model.refines_only {
                sqlx::query("UPDATE models SET refines_only = 1 WHERE id = $1")
                    .bind(&model.model_id)
                    .execute(&mut *tx)
                    .await?;
            }
            if model.inpaints_only {
                sqlx::query("UPDATE models SET inpaints_only = 1 WHERE id = $1")
                    .bind(&model.model_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        sqlx::query(
            "INSERT INTO workers (id, name, hostname, engines, max_pixels, max_batch, registered_at, last_seen_at, principal, \
             client_cert_sha256, client_cert_subject) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8, $9, $10)",
        )
        .bind(worker_id)
        .bind(name)
        .bind(hostname)
        .bind(engines.join(","))
        .bind(max_pixels as i64)
        .bind(i64::from(max_batch))
        .bind(now)
        .bind(principal)
        .bind(cert_sha256)
        .bind(cert_subject)
        .execute(&mut *tx)
        .await?;
        for (engine, model) in models {
            sqlx::query(
                "INSERT INTO worker_models (worker_id, engine, model_id, weights_sha256) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT DO NOTHING",
            )
            .bind(worker_id)
            .bind(engine)
            .bind(&model.model_id)
            .bind(&model.weights_sha256)
            .execute(&mut *tx)
            .await?;
        }
        let registered = AuditEvent::new(
            kind::REGISTER_WORKER,
            worker_id,
            serde_json::json!({
                "name": name,
                "hostname": hostname,
                "engines": engines,
                "models": models.iter().map(|(engine, m)| serde_json::json!({
                    "engine": engine,
                    "model_id": m.model_id,
                    "weights_sha256": m.weights_sha256,
                })).collect::<Vec<_>>(),
                "max_pixels": max_pixels,
                "max_batch": max_batch,
                "principal": principal,
                "client_cert": client_cert.map(|c| serde_json::json!({
                    "subject": c.subject,
                    "sha256": c.sha256,
                })),
            }),
        )
        .actor(if principal.is_empty() {
            worker_id
        } else {
            principal
        });
        audit::append(&mut tx, now, &[registered]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The lease-relevant capabilities of a registered worker.
    pub async fn worker_caps(&self, worker_id: &str) -> Result<WorkerCaps> {
        // One round trip: a row per model (one with no model when it has none).
        let rows = sqlx::query(
            "SELECT w.max_pixels, w.max_batch, w.principal, w.client_cert_sha256, wm.engine, wm.model_id \
             FROM workers w LEFT JOIN worker_models wm ON wm.worker_id = w.id \
             WHERE w.id = $1 ORDER BY wm.engine, wm.model_id",
        )
        .bind(worker_id)
        .fetch_all(&self.pool)
        .await?;
        let row = rows.first().ok_or_else(|| {
            StoreError::NotFound(format!("unknown worker {worker_id:?}; register again"))
        })?;
        let mut models = Vec::with_capacity(rows.len());
        for r in &rows {
            let engine: Option<String> = r.try_get("engine")?;
            let model: Option<String> = r.try_get("model_id")?;
            if let (Some(engine), Some(model)) = (engine, model) {
                models.push((engine, model));
            }
        }
        Ok(WorkerCaps {
            worker_id: worker_id.to_string(),
            max_pixels: row.try_get::<i64, _>("max_pixels")? as u64,
            max_batch: row.try_get::<i64, _>("max_batch")? as u32,
            principal: row.try_get("principal")?,
            client_cert_sha256: row.try_get("client_cert_sha256")?,
            models,
        })
    }

    /// Whether a task leased to a worker registered by `principal` starts
    /// from the image `sha256` (an upscale's base image, an img2img input)
    /// or inpaints through it (a mask): what a worker token may fetch. Only
    /// leased tasks are looked at (a partial index), so this stays cheap
    /// however many tasks are stored.
    pub async fn base_image_leased_to(&self, sha256: &str, principal: &str) -> Result<bool> {
        let found: Option<i32> = sqlx::query_scalar(
            "SELECT 1 FROM tasks t JOIN workers w ON w.id = t.worker_id \
             WHERE t.state = 'leased' AND (t.parent_sha256 = $1 OR t.mask_sha256 = $1) \
             AND w.principal = $2 LIMIT 1",
        )
        .bind(sha256)
        .bind(principal)
        .fetch_optional(&self.pool)
        .await?;
        Ok(found.is_some())
    }

    /// Marks the worker seen now (presence) and what model it holds.
    pub async fn touch_worker(&self, worker_id: &str, loaded_model: &str, now: i64) -> Result<()> {
        sqlx::query("UPDATE workers SET last_seen_at = $2, loaded_model = $3 WHERE id = $1")
            .bind(worker_id)
            .bind(now)
            .bind(loaded_model)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Heartbeat: extends the leases the worker still holds and says which of
    /// the ones it believes it holds are no longer its own. Leases the worker
    /// does not mention (a lease reply it never got) go back to the queue.
    pub async fn heartbeat(
        &self,
        worker_id: &str,
        held: &[(String, i64, f32)],
        now: i64,
    ) -> Result<(Vec<RevokedLease>, bool)> {
        let rows = sqlx::query(
            "UPDATE tasks SET lease_expires_at = $2 + lease_ttl_ms \
             WHERE worker_id = $1 AND state = 'leased' RETURNING id, lease_token",
        )
        .bind(worker_id)
        .bind(now)
        .fetch_all(&self.pool)
        .await?;
        let mut owned = Vec::with_capacity(rows.len());
        for r in &rows {
            owned.push((
                r.try_get::<String, _>("id")?,
                r.try_get::<i64, _>("lease_token")?,
            ));
        }
        let mut requeued = false;
        for (id, token) in &owned {
            if !held.iter().any(|(h, t, _)| h == id && t == token) {
                requeued |= sqlx::query(
                    "UPDATE tasks SET state = 'ready', worker_id = NULL, lease_expires_at = NULL, attempts = attempts - 1 \
                     WHERE id = $1 AND lease_token = $2 AND state = 'leased'",
                )
                .bind(id)
                .bind(token)
                .execute(&self.pool)
                .await?
                .rows_affected()
                    > 0;
            }
        }
        let mut revoked = Vec::new();
        for (id, token, progress) in held {
            if owned.iter().any(|(o, t)| o == id && t == token) {
                if *progress > 0.0 {
                    sqlx::query("UPDATE tasks SET progress = $3 WHERE id = $1 AND lease_token = $2 AND state = 'leased'")
                        .bind(id)
                        .bind(token)
                        .bind(f64::from(progress.clamp(0.0, 1.0)))
                        .execute(&self.pool)
                        .await?;
                }
                continue;
            }
            let row = sqlx::query("SELECT state, lease_token FROM tasks WHERE id = $1")
                .bind(id)
                .fetch_optional(&self.pool)
                .await?;
            let reason = match row {
                None => "no such task".to_string(),
                Some(r) => {
                    let st: String = r.try_get("state")?;
                    let tok: i64 = r.try_get("lease_token")?;
                    match st.as_str() {
                        state::CANCELED => "job canceled".into(),
                        state::HELD => "job paused".into(),
                        state::SUCCEEDED if tok == *token => continue, // its own completion landed
                        _ if tok != *token => "lease expired and the task was leased again".into(),
                        other => format!("task is {other}"),
                    }
                }
            };
            revoked.push(RevokedLease {
                task_id: id.clone(),
                reason,
            });
        }
        Ok((revoked, requeued))
    }

    /// Leases up to `want` compatible ready tasks (same model, stage, size,
    /// steps) of the models the worker serves to it: priority first, then the tenant served longest
    /// ago, then the model the worker already holds, then job age.
    pub async fn lease(
        &self,
        worker: &WorkerCaps,
        want: u32,
        loaded_model: &str,
        cooldown_since: i64,
        failure_limit: u32,
        now: i64,
    ) -> Result<Vec<TaskLease>> {
        let want = want.min(worker.max_batch.max(1));
        if want == 0 || worker.models.is_empty() {
            return Ok(Vec::new());
        }
        let jobs = sqlx::query(
            "SELECT j.id, j.tenant, j.engine FROM jobs j JOIN tenants tn ON tn.name = j.tenant \
             WHERE j.state = 'running' \
             AND NOT EXISTS (SELECT 1 FROM job_worker_failures b WHERE b.job_id = j.id AND b.worker_id = $1 AND b.failures >= $2) \
             AND (tn.max_running = 0 OR (SELECT COUNT(*) FROM tasks r WHERE r.tenant = j.tenant AND r.state = 'leased') < tn.max_running) \
             AND EXISTS (SELECT 1 FROM worker_models wm WHERE wm.worker_id = $1 AND wm.engine = j.engine \
                         AND EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id AND t.model_id = wm.model_id \
                                     AND t.state = 'ready' AND t.pixels <= $3)) \
             ORDER BY j.priority DESC, tn.last_dispatch_at ASC, CASE WHEN j.model_id = $4 THEN 0 ELSE 1 END, j.created_at ASC, j.id \
             LIMIT 4",
        )
        .bind(&worker.worker_id)
        .bind(i64::from(failure_limit))
        .bind(worker.max_pixels as i64)
        .bind(loaded_model)
        .fetch_all(&self.pool)
        .await?;

        for job in jobs {
            let job_id: String = job.try_get("id")?;
            let tenant: String = job.try_get("tenant")?;
            let engine: String = job.try_get("engine")?;
            let models: Vec<&str> = worker
                .models
                .iter()
                .filter(|(e, _)| *e == engine)
                .map(|(_, m)| m.as_str())
                .collect();
            let leased = self
                .lease_from_job(worker, &job_id, &engine, &models, want, cooldown_since, now)
                .await?;
            if leased.is_empty() {
                continue;
            }
            // Round-robin between tenants is a preference, not state: a plain
            // update after the lease keeps the hot tenant row out of the transaction.
            if !self.note_dispatch(&tenant, now) {
                return Ok(leased);
            }
            let sql = match self.dialect {
                // Leasers racing on one tenant skip the row instead of queueing
                // on its lock: the winner's timestamp is as good as theirs.
                super::Dialect::Postgres => {
                    "UPDATE tenants SET last_dispatch_at = $2 WHERE name IN \
                     (SELECT name FROM tenants WHERE name = $1 AND last_dispatch_at < $2 FOR UPDATE SKIP LOCKED)"
                }
                super::Dialect::Sqlite => {
                    "UPDATE tenants SET last_dispatch_at = $2 WHERE name = $1 AND last_dispatch_at < $2"
                }
            };
            sqlx::query(sql)
                .bind(&tenant)
                .bind(now)
                .execute(&self.pool)
                .await?;
            return Ok(leased);
        }
        Ok(Vec::new())
    }

    /// Leases a batch of `job_id`'s ready tasks of `models` (those the
    /// worker serves with the job's `engine`).
    #[allow(clippy::too_many_arguments)]
    async fn lease_from_job(
        &self,
        worker: &WorkerCaps,
        job_id: &str,
        engine: &str,
        models: &[&str],
        want: u32,
        cooldown_since: i64,
        now: i64,
    ) -> Result<Vec<TaskLease>> {
        // Per task, not per job: a job's refine stage names its refiner. The
        // head of the batch is the first ready task of each (model, stage)
        // the worker serves, the latest stage first: one index probe each
        // (tasks_ready_lease_order), where one scan in the job's stage
        // order read past every ready task of the models it does not serve.
        // (`+t.pixels`: a filter, not an index range, so SQLite's planner
        // takes that index instead of sorting all of a model's ready tasks
        // found through tasks_ready_model's pixel range.)
        let ready = "t.job_id = $2 AND t.state = 'ready' AND +t.pixels <= $3 \
             AND NOT EXISTS (SELECT 1 FROM task_failures f WHERE f.task_id = t.id AND f.worker_id = $1 AND f.failed_at > $4)";
        if models.is_empty() {
            return Ok(Vec::new());
        }
        let stages = [STAGE_GENERATE, STAGE_REFINE, STAGE_UPSCALE];
        let mut heads = Vec::with_capacity(models.len() * stages.len());
        for i in 0..models.len() {
            let model = 8 + i;
            for rank in stages.map(stage_rank) {
                heads.push(format!(
                    "SELECT * FROM (SELECT t.model_id, t.stage_rank, t.batch_key, t.item_index FROM tasks t \
                     WHERE {ready} AND t.model_id = ${model} AND t.stage_rank = {rank} AND t.engine = $7 \
                     ORDER BY t.item_index LIMIT 1) h"
                ));
            }
        }
        // The batch: the head's compatible tasks (its batch key names the
        // engine, model and stage). The pick is a CTE so Postgres runs it
        // (and its LIMIT) exactly once; as a plain `IN (subquery)` the
        // planner may re-run it and lease more.
        let pick = format!(
            "WITH head AS (SELECT model_id, stage_rank, batch_key FROM ({}) c \
               ORDER BY stage_rank DESC, item_index LIMIT 1), \
             picked AS (SELECT t.id FROM tasks t WHERE {ready} \
               AND t.model_id = (SELECT model_id FROM head) AND t.stage_rank = (SELECT stage_rank FROM head) \
               AND t.batch_key = (SELECT batch_key FROM head) \
               ORDER BY t.item_index LIMIT $6{})",
            heads.join(" UNION ALL "),
            self.skip_locked()
        );
        let update = "UPDATE tasks SET state = 'leased', worker_id = $1, lease_token = lease_token + 1, \
             attempts = attempts + 1, started_at = $5, lease_expires_at = $5 + lease_ttl_ms, progress = 0 \
             WHERE state = 'ready' AND id IN (SELECT id FROM picked) \
             RETURNING id, lease_token, attempts, lease_expires_at, item_index, stage, engine, model_id, upscale, upscale_method, parent_sha256, strength, mask_sha256, mask_blur, mask_crop, outpaint";
        const ITEM_COLUMNS: &str =
            "prompt, negative_prompt, seed, width, height, steps, guidance, scheduler";
        let sql = match self.dialect {
            // Postgres returns the items' fields from the same statement, and
            // appends the dispatch to the audit ledger in it.
            super::Dialect::Postgres => format!(
                "{pick}, leased AS ({update}), logged AS (INSERT INTO audit_events \
                 (at, kind, job_id, subject, actor, body) SELECT $5, '{}', $2, $2, $1, \
                 json_build_object('tasks', json_agg(json_build_array(id, lease_token) ORDER BY id))::text \
                 FROM leased HAVING COUNT(*) > 0) \
                 SELECT leased.*, i.{} FROM leased \
                 JOIN items i ON i.job_id = $2 AND i.item_index = leased.item_index",
                kind::DISPATCH,
                ITEM_COLUMNS.replace(", ", ", i.")
            ),
            super::Dialect::Sqlite => format!("{pick} {update}"),
        };
        let mut query = sqlx::query(&sql)
            .bind(&worker.worker_id)
            .bind(job_id)
            .bind(worker.max_pixels as i64)
            .bind(cooldown_since)
            .bind(now)
            .bind(i64::from(want));
        query = query.bind(engine);
        for model in models {
            query = query.bind(*model);
        }
        let rows = match self.dialect {
            super::Dialect::Postgres => query.fetch_all(&self.pool).await?,
            super::Dialect::Sqlite => {
                let mut tx = self.pool.begin().await?;
                let rows = query.fetch_all(&mut *tx).await?;
                if !rows.is_empty() {
                    let mut tasks = Vec::with_capacity(rows.len());
                    for r in &rows {
                        tasks.push(serde_json::json!([
                            r.try_get::<String, _>("id")?,
                            r.try_get::<i64, _>("lease_token")?
                        ]));
                    }
                    tasks.sort_by(|a, b| a[0].as_str().cmp(&b[0].as_str()));
                    let dispatched = AuditEvent::new(
                        kind::DISPATCH,
                        job_id,
                        serde_json::json!({ "tasks": tasks }),
                    )
                    .job(job_id)
                    .actor(&worker.worker_id);
                    audit::append(&mut tx, now, &[dispatched]).await?;
                }
                tx.commit().await?;
                rows
            }
        };
        if rows.is_empty() {
            return Ok(Vec::new());
        }
        let mut leases = Vec::with_capacity(rows.len());
        for r in &rows {
            leases.push(TaskLease {
                task_id: r.try_get("id")?,
                fencing_token: r.try_get("lease_token")?,
                job_id: job_id.to_string(),
                item_index: r.try_get::<i64, _>("item_index")? as u64,
                stage: r.try_get("stage")?,
                engine: r.try_get("engine")?,
                model_id: r.try_get("model_id")?,
                upscale: r.try_get::<i64, _>("upscale")? as u32,
                upscale_method: r.try_get("upscale_method")?,
                strength: r.try_get("strength")?,
                parent_sha256: r
                    .try_get::<Option<String>, _>("parent_sha256")?
                    .unwrap_or_default(),
                mask_sha256: r
                    .try_get::<Option<String>, _>("mask_sha256")?
                    .unwrap_or_default(),
                mask_blur: r.try_get::<i64, _>("mask_blur")? as u32,
                mask_crop: r.try_get::<Option<i64>, _>("mask_crop")?.map(|p| p as u32),
                outpaint: r
                    .try_get::<Option<String>, _>("outpaint")?
                    .as_deref()
                    .and_then(crate::spec::Outpaint::from_column)
                    .map(Into::into),
                expires_at_ms: r
                    .try_get::<Option<i64>, _>("lease_expires_at")?
                    .unwrap_or(now),
                attempt: r.try_get::<i64, _>("attempts")? as u32,
                ..Default::default()
            });
        }
        let items = match self.dialect {
            super::Dialect::Postgres => rows,
            super::Dialect::Sqlite => {
                let lo = leases.iter().map(|l| l.item_index).min().unwrap_or(0);
                let hi = leases.iter().map(|l| l.item_index).max().unwrap_or(0);
                sqlx::query(&format!(
                    "SELECT item_index, {ITEM_COLUMNS} FROM items \
                     WHERE job_id = $1 AND item_index >= $2 AND item_index <= $3"
                ))
                .bind(job_id)
                .bind(lo as i64)
                .bind(hi as i64)
                .fetch_all(&self.pool)
                .await?
            }
        };
        for item in &items {
            let index = item.try_get::<i64, _>("item_index")? as u64;
            for l in leases.iter_mut().filter(|l| l.item_index == index) {
                l.prompt = item.try_get("prompt")?;
                l.negative_prompt = item.try_get("negative_prompt")?;
                l.seed = item.try_get::<i64, _>("seed")? as u64;
                l.width = item.try_get::<i64, _>("width")? as u32;
                l.height = item.try_get::<i64, _>("height")? as u32;
                l.steps = item.try_get::<i64, _>("steps")? as u32;
                l.guidance = item.try_get::<f64, _>("guidance")? as f32;
                l.scheduler = item.try_get("scheduler")?;
            }
        }
        leases.sort_by_key(|l| l.item_index);
        Ok(leases)
    }

    /// Whether this replica should write `tenant`'s dispatch time now: at
    /// most once per [`DISPATCH_NOTE_MS`], so a busy tenant's row is not
    /// rewritten by every lease. Round-robin only needs that coarseness.
    fn note_dispatch(&self, tenant: &str, now: i64) -> bool {
        let Ok(mut last) = self.dispatch_notes.lock() else {
            return true;
        };
        match last.get_mut(tenant) {
            Some(t) if now - *t < DISPATCH_NOTE_MS => false,
            Some(t) => {
                *t = now;
                true
            }
            None => {
                last.insert(tenant.to_string(), now);
                true
            }
        }
    }

    /// Refuses early (before the upload) a completion whose lease is not current.
    pub async fn check_lease(&self, worker_id: &str, task_id: &str, token: i64) -> Result<()> {
        let row = sqlx::query("SELECT state, lease_token, worker_id FROM tasks WHERE id = $1")
            .bind(task_id)
            .fetch_optional(&self.pool)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no task {task_id:?}")))?;
        let st: String = row.try_get("state")?;
        let tok: i64 = row.try_get("lease_token")?;
        let owner: Option<String> = row.try_get("worker_id")?;
        if st != state::LEASED || tok != token || owner.as_deref() != Some(worker_id) {
            return Err(stale(task_id, token, &st, tok));
        }
        Ok(())
    }

    /// Records the artifact of a task whose lease is current, and makes the
    /// item's next stage ready, in one transaction. Returns the job id and
    /// whether a dependent task became ready.
    pub async fn complete(&self, c: &Completion, now: i64) -> Result<(String, bool)> {
        self.complete_many(std::slice::from_ref(c), now)
            .await?
            .pop()
            .unwrap_or_else(|| Err(StoreError::Refused("nothing to complete".into())))
    }

    /// Records a batch of completions in one transaction. Each is judged on
    /// its own: a stale one is refused (its entry is an error) while the
    /// others are recorded.
    pub async fn complete_many(
        &self,
        completions: &[Completion],
        now: i64,
    ) -> Result<Vec<Result<(String, bool)>>> {
        let mut tx = self.pool.begin().await?;
        let mut outcomes = Vec::with_capacity(completions.len());
        let mut events = Vec::with_capacity(completions.len());
        for c in completions {
            let row = sqlx::query(
                "UPDATE tasks SET state = 'succeeded', finished_at = $4, lease_expires_at = NULL, error = NULL \
                 WHERE id = $1 AND lease_token = $2 AND worker_id = $3 AND state = 'leased' \
                 RETURNING job_id, item_index, stage, model_id, parent_sha256, mask_sha256, has_next",
            )
            .bind(&c.task_id)
            .bind(c.fencing_token)
            .bind(&c.worker_id)
            .bind(now)
            .fetch_optional(&mut *tx)
            .await?;
            let Some(row) = row else {
                outcomes.push(None);
                continue;
            };
            let job_id: String = row.try_get("job_id")?;
            let mask: Option<String> = row.try_get("mask_sha256")?;
            sqlx::query(
                "INSERT INTO artifacts (task_id, job_id, item_index, stage, model_id, parent_sha256, worker_id, \
                 sha256, size, media_type, width, height, created_at, watermark_id, manifest, manifest_label, \
                 mask_sha256) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)",
            )
            .bind(&c.task_id)
            .bind(&job_id)
            .bind(row.try_get::<i64, _>("item_index")?)
            .bind(row.try_get::<String, _>("stage")?)
            .bind(row.try_get::<String, _>("model_id")?)
            .bind(row.try_get::<Option<String>, _>("parent_sha256")?)
            .bind(&c.worker_id)
            .bind(&c.sha256)
            .bind(c.size as i64)
            .bind(&c.media_type)
            .bind(i64::from(c.width))
            .bind(i64::from(c.height))
            .bind(now)
            .bind(&c.stamp.watermark_id)
            .bind(&c.stamp.manifest)
            .bind(&c.stamp.manifest_label)
            .bind(&mask)
            .execute(&mut *tx)
            .await?;
            // Per-item stage dependency, no barrier: the next stage of this
            // item is ready now (held instead while the job is paused).
            let mut readied = 0;
            if row.try_get::<i64, _>("has_next")? != 0 {
                readied = sqlx::query(
                    "UPDATE tasks SET parent_sha256 = $2, state = CASE WHEN \
                     (SELECT j.state FROM jobs j WHERE j.id = tasks.job_id) = 'paused' THEN 'held' ELSE 'ready' END \
                     WHERE depends_on = $1 AND state = 'waiting'",
                )
                .bind(&c.task_id)
                .bind(&c.sha256)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            }
            let mut body = serde_json::json!({
                "token": c.fencing_token,
                "sha256": c.sha256,
                "watermark_id": c.stamp.watermark_id,
                "manifest_label": c.stamp.manifest_label,
                "parent_sha256": row.try_get::<Option<String>, _>("parent_sha256")?,
                "model_id": row.try_get::<String, _>("model_id")?,
            });
            if let Some(mask) = mask {
                body["mask_sha256"] = mask.into();
            }
            events.push(
                AuditEvent::new(kind::COMPLETE, &c.task_id, body)
                    .job(&job_id)
                    .actor(&c.worker_id),
            );
            outcomes.push(Some((job_id, readied > 0)));
        }
        audit::append(&mut tx, now, &events).await?;
        tx.commit().await?;
        let mut results = Vec::with_capacity(outcomes.len());
        for (c, outcome) in completions.iter().zip(outcomes) {
            results.push(match outcome {
                Some(ok) => Ok(ok),
                None => Err(self.refusal(&c.task_id, c.fencing_token).await?),
            });
        }
        Ok(results)
    }

    /// Why a completion or failure naming `token` was not accepted.
    async fn refusal(&self, task_id: &str, token: i64) -> Result<StoreError> {
        let current = sqlx::query("SELECT state, lease_token FROM tasks WHERE id = $1")
            .bind(task_id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(match current {
            None => StoreError::NotFound(format!("no task {task_id:?}")),
            Some(r) => stale(
                task_id,
                token,
                &r.try_get::<String, _>("state")?,
                r.try_get("lease_token")?,
            ),
        })
    }

    /// Records a failed (or handed-back) attempt. A failure charges the
    /// task's retry budget, keeps this worker off the task for a while and
    /// counts against the worker on this job; a hand-back charges nothing.
    pub async fn fail(
        &self,
        worker_id: &str,
        task_id: &str,
        token: i64,
        message: &str,
        how: AttemptEnd,
        now: i64,
    ) -> Result<FailOutcome> {
        let hand_back = how == AttemptEnd::HandedBack;
        let mode: i64 = match how {
            AttemptEnd::Failed => 0,
            AttemptEnd::HandedBack => 1,
            AttemptEnd::FailedForGood => 2,
        };
        let mut tx = self.pool.begin().await?;
        let row = sqlx::query(
            "UPDATE tasks SET worker_id = NULL, lease_expires_at = NULL, \
             attempts = CASE WHEN $5 = 1 THEN attempts - 1 ELSE attempts END, \
             state = CASE WHEN $5 = 1 THEN 'ready' WHEN $5 = 2 OR attempts >= max_attempts THEN 'failed' ELSE 'ready' END, \
             error = CASE WHEN $5 = 1 THEN error ELSE $4 END, \
             finished_at = CASE WHEN $5 = 2 OR ($5 = 0 AND attempts >= max_attempts) THEN $6 ELSE NULL END \
             WHERE id = $1 AND lease_token = $2 AND worker_id = $3 AND state = 'leased' \
             RETURNING job_id, state",
        )
        .bind(task_id)
        .bind(token)
        .bind(worker_id)
        .bind(message)
        .bind(mode)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(row) = row else {
            drop(tx);
            return Err(self.refusal(task_id, token).await?);
        };
        let outcome = FailOutcome {
            job_id: row.try_get("job_id")?,
            state: row.try_get("state")?,
        };
        if !hand_back {
            sqlx::query("INSERT INTO task_failures (task_id, worker_id, message, failed_at) VALUES ($1, $2, $3, $4)")
                .bind(task_id)
                .bind(worker_id)
                .bind(message)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO job_worker_failures (job_id, worker_id, failures) VALUES ($1, $2, 1) \
                 ON CONFLICT (job_id, worker_id) DO UPDATE SET failures = job_worker_failures.failures + 1",
            )
            .bind(&outcome.job_id)
            .bind(worker_id)
            .execute(&mut *tx)
            .await?;
            if outcome.state == state::FAILED {
                fail_dependents(&mut tx, &[task_id.to_string()], now).await?;
            }
        }
        let event = AuditEvent::new(
            if hand_back {
                kind::HAND_BACK
            } else {
                kind::FAIL
            },
            task_id,
            serde_json::json!({
                "token": token,
                "message": message,
                "state": outcome.state,
                "for_good": how == AttemptEnd::FailedForGood,
            }),
        )
        .job(&outcome.job_id)
        .actor(worker_id);
        audit::append(&mut tx, now, &[event]).await?;
        tx.commit().await?;
        Ok(outcome)
    }

    /// Puts expired leases back in the queue (or fails them when their budget
    /// is spent) and closes jobs with no open task left.
    pub async fn reap(&self, now: i64) -> Result<ReapOutcome> {
        let mut out = ReapOutcome::default();
        let mut tx = self.pool.begin().await?;
        let rows = sqlx::query(
            "UPDATE tasks SET worker_id = NULL, lease_expires_at = NULL, \
             state = CASE WHEN attempts >= max_attempts THEN 'failed' ELSE 'ready' END, \
             finished_at = CASE WHEN attempts >= max_attempts THEN $1 ELSE NULL END, \
             error = 'lease expired: the worker stopped heartbeating' \
             WHERE state = 'leased' AND lease_expires_at < $1 RETURNING id, job_id, state, lease_token",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        let mut failed = Vec::new();
        let mut events = Vec::new();
        for r in &rows {
            let job: String = r.try_get("job_id")?;
            let task: String = r.try_get("id")?;
            let new_state: String = r.try_get("state")?;
            events.push(
                AuditEvent::new(
                    kind::EXPIRE,
                    &task,
                    serde_json::json!({ "token": r.try_get::<i64, _>("lease_token")?, "state": new_state }),
                )
                // The worker that held it is the one the dispatch of this
                // token names; the row no longer says.
                .job(&job),
            );
            out.expired += 1;
            if new_state == state::FAILED {
                failed.push(task);
            } else {
                out.requeued += 1;
            }
            if !out.expired_jobs.contains(&job) {
                out.expired_jobs.push(job);
            }
        }
        fail_dependents(&mut tx, &failed, now).await?;
        let finished = sqlx::query(
            "UPDATE jobs SET finished_at = COALESCE((SELECT MAX(t.finished_at) FROM tasks t WHERE t.job_id = jobs.id), $1), \
             state = CASE WHEN EXISTS \
             (SELECT 1 FROM tasks t WHERE t.job_id = jobs.id AND t.state = 'failed') THEN 'failed' ELSE 'succeeded' END \
             WHERE state = 'running' AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = jobs.id \
             AND t.state IN ('waiting', 'ready', 'leased', 'held')) RETURNING id, state",
        )
        .bind(now)
        .fetch_all(&mut *tx)
        .await?;
        for r in finished {
            let job: String = r.try_get("id")?;
            let job_state: String = r.try_get("state")?;
            events.push(
                AuditEvent::new(
                    kind::FINISH,
                    &job,
                    serde_json::json!({ "state": job_state }),
                )
                .job(&job),
            );
            out.finished_jobs.push((job, job_state));
        }
        audit::append(&mut tx, now, &events).await?;
        tx.commit().await?;
        Ok(out)
    }

    /// Registered workers with their presence and current load.
    pub async fn list_workers(&self, live_since: i64) -> Result<Vec<WorkerInfo>> {
        let rows = sqlx::query(
            "SELECT w.id, w.name, w.hostname, w.engines, w.max_pixels, w.max_batch, w.last_seen_at, w.loaded_model, w.principal, \
             w.client_cert_subject, CAST((SELECT COUNT(*) FROM tasks t WHERE t.worker_id = w.id AND t.state = 'leased') AS BIGINT) AS leased \
             FROM workers w ORDER BY w.last_seen_at DESC, w.id",
        )
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: String = r.try_get("id")?;
            let models: Vec<String> = sqlx::query_scalar(
                "SELECT model_id FROM worker_models WHERE worker_id = $1 ORDER BY model_id",
            )
            .bind(&id)
            .fetch_all(&self.pool)
            .await?;
            let last_seen: i64 = r.try_get("last_seen_at")?;
            out.push(WorkerInfo {
                worker_id: id,
                name: r.try_get("name")?,
                hostname: r.try_get("hostname")?,
                engines: r
                    .try_get::<String, _>("engines")?
                    .split(',')
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect(),
                models,
                max_pixels: r.try_get::<i64, _>("max_pixels")? as u64,
                max_batch: r.try_get::<i64, _>("max_batch")? as u32,
                last_seen_ms: last_seen,
                live: last_seen >= live_since,
                leased_tasks: r.try_get::<i64, _>("leased")? as u32,
                loaded_model: r.try_get("loaded_model")?,
                principal: r.try_get("principal")?,
                client_certificate: r.try_get("client_cert_subject")?,
            });
        }
        Ok(out)
    }
}

/// Fails the later stages of items whose earlier stage failed for good, down
/// the whole chain (a failed generate fails its refine and its upscale).
async fn fail_dependents(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    failed: &[String],
    now: i64,
) -> Result<()> {
    let mut frontier = failed.to_vec();
    while let Some(id) = frontier.pop() {
        let rows = sqlx::query(
            "UPDATE tasks SET state = 'failed', error = 'its base stage failed', finished_at = $2 \
             WHERE depends_on = $1 AND state IN ('waiting', 'held') RETURNING id",
        )
        .bind(&id)
        .bind(now)
        .fetch_all(&mut **tx)
        .await?;
        for r in rows {
            frontier.push(r.try_get("id")?);
        }
    }
    Ok(())
}

fn stale(task_id: &str, token: i64, state: &str, current: i64) -> StoreError {
    StoreError::Refused(format!(
        "stale lease on task {task_id}: fencing token {token} is not current (task is {state}, token {current}); drop the work"
    ))
}
