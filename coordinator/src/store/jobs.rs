//! Jobs: submission in one transaction, progress views and user control.

use std::collections::BTreeMap;

use hallmark_proto::v1::{Artifact, Job, StageProgress};
use sqlx::Row;

use super::{AuditEvent, Result, Store, StoreError, audit_kind, row_placeholders, state};
use crate::spec::{ExpandedJob, STAGE_REFINE, STAGE_UPSCALE, SpecError, stage_rank};

/// What a user can do to a running job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobControl {
    Cancel,
    Pause,
    Resume,
    RetryFailed,
}

impl JobControl {
    /// The action's name, as the audit ledger records it.
    pub fn name(self) -> &'static str {
        match self {
            JobControl::Cancel => "cancel",
            JobControl::Pause => "pause",
            JobControl::Resume => "resume",
            JobControl::RetryFailed => "retry",
        }
    }
}

const ROWS_PER_INSERT: usize = 400;

/// A job to write: what [`Store::submit`] records.
#[derive(Clone, Copy)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub job: &'a ExpandedJob,
    /// The stored spec (its hash goes in the ledger's submit entry).
    pub spec_json: &'a str,
    /// The tenant's running-task cap (0: none).
    pub tenant_cap: u32,
    /// Who submitted it, for the ledger: empty for the tenant itself (an
    /// operator submitting for a tenant is named instead).
    pub submitted_by: &'a str,
}

/// How a job uses one of its models, for what the model cannot do.
struct ModelUse {
    /// It draws items from noise.
    draws_from_noise: bool,
    /// It renders without a mask.
    without_mask: bool,
    /// The spec field that names the model.
    field: &'static str,
}

impl Store {
    /// Refuses a job no registered worker can run (unless `queue_unservable`)
    /// and a model nobody has heard of, before anything is written.
    pub async fn check_servable(&self, job: &ExpandedJob, queue_unservable: bool) -> Result<()> {
        // The job's own model draws the items without an init image from
        // noise, renders those without a mask unmasked, and re-renders a
        // hires-fix upscale unmasked; a refine stage has no mask.
        let from_noise = job.items.iter().any(|i| i.init_image.is_none());
        let unmasked = job.items.iter().any(|i| !i.inpaints());
        for (model_id, needed) in job.models() {
            let own = model_id == job.model_id;
            let uses = ModelUse {
                draws_from_noise: from_noise && own,
                without_mask: if own {
                    unmasked || job.upscale_method == "hires-fix"
                } else {
                    true
                },
                field: if own { "model_id" } else { "refine.model_id" },
            };
            self.check_model_servable(&job.engine, model_id, needed, uses, queue_unservable)
                .await?;
        }
        Ok(())
    }

    async fn check_model_servable(
        &self,
        engine: &str,
        model_id: &str,
        needed: u64,
        uses: ModelUse,
        queue_unservable: bool,
    ) -> Result<()> {
        let Some(model) =
            sqlx::query("SELECT refines_only, inpaints_only FROM models WHERE id = $1")
                .bind(model_id)
                .fetch_optional(&self.pool)
                .await?
        else {
            return Err(StoreError::NotFound(format!(
                "unknown model {model_id:?}: register it (`hallmark models register`) or start a worker that serves it"
            )));
        };
        // A model that only refines cannot draw an item from noise.
        if uses.draws_from_noise && model.try_get::<i64, _>("refines_only")? != 0 {
            return Err(StoreError::Spec(SpecError {
                field: "model_id".into(),
                message: format!(
                    "model {model_id:?} refines images and does not draw from noise (an SDXL refiner); give its items an init image, or make it the job's refine model"
                ),
            }));
        }
        // A model that only inpaints renders nothing without a mask.
        if uses.without_mask && model.try_get::<i64, _>("inpaints_only")? != 0 {
            return Err(StoreError::Spec(SpecError {
                field: uses.field.into(),
                message: format!(
                    "model {model_id:?} is an inpainting model (its unet takes a mask): it renders only items with an init image and a mask (--init-image and --mask), not a refine stage or a hires-fix upscale"
                ),
            }));
        }
        if queue_unservable {
            return Ok(());
        }
        let (n, px) = self.model_workers(engine, model_id, i64::MIN).await?;
        if n == 0 {
            return Err(StoreError::Refused(format!(
                "no registered worker serves model {model_id:?} with engine {engine:?}; start one, or pass --queue-unservable to queue the job anyway"
            )));
        }
        let needed = needed as i64;
        if needed > px {
            return Err(StoreError::Refused(format!(
                "the job needs a worker that holds {needed} pixels; the largest registered worker for {model_id:?} holds {px}; pass --queue-unservable to queue it anyway"
            )));
        }
        Ok(())
    }

    /// How many workers seen since `seen_since` serve `model_id` with
    /// `engine`, and the most pixels one of them holds (0 when none).
    async fn model_workers(
        &self,
        engine: &str,
        model_id: &str,
        seen_since: i64,
    ) -> Result<(i64, i64)> {
        let row = sqlx::query(
            "SELECT CAST(COUNT(*) AS BIGINT) AS n, CAST(COALESCE(MAX(w.max_pixels), 0) AS BIGINT) AS px \
             FROM worker_models wm JOIN workers w ON w.id = wm.worker_id \
             WHERE wm.engine = $1 AND wm.model_id = $2 AND w.last_seen_at >= $3",
        )
        .bind(engine)
        .bind(model_id)
        .bind(seen_since)
        .fetch_one(&self.pool)
        .await?;
        Ok((row.try_get("n")?, row.try_get("px")?))
    }

    /// Writes the job, its items and per-item stage tasks in one transaction.
    pub async fn submit(
        &self,
        new: &NewJob<'_>,
        lease: &super::LeasePolicy,
        now: i64,
    ) -> Result<()> {
        let NewJob {
            id: job_id,
            job,
            spec_json,
            tenant_cap,
            submitted_by,
        } = *new;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO tenants (name, max_running, last_dispatch_at) VALUES ($1, $2, 0) \
             ON CONFLICT (name) DO UPDATE SET max_running = excluded.max_running",
        )
        .bind(&job.tenant)
        .bind(i64::from(tenant_cap))
        .execute(&mut *tx)
        .await?;
        // The inputs it starts from are used now; touching each locks its
        // row, so a purge of one either waits and then leaves it, or went
        // first and the job is refused.
        for (sha256, field) in job.inputs() {
            if !super::inputs::touch(&mut tx, sha256, now).await? {
                return Err(StoreError::Spec(SpecError {
                    field: field.into(),
                    message: input_gone(sha256),
                }));
            }
        }
        let labels = serde_json::to_string(&job.labels.iter().collect::<BTreeMap<_, _>>())
            .unwrap_or_else(|_| "{}".into());
        sqlx::query(
            "INSERT INTO jobs (id, tenant, priority, state, engine, model_id, items, spec_json, labels_json, created_at) \
             VALUES ($1, $2, $3, 'running', $4, $5, $6, $7, $8, $9)",
        )
        .bind(job_id)
        .bind(&job.tenant)
        .bind(i64::from(job.priority))
        .bind(&job.engine)
        .bind(&job.model_id)
        .bind(job.items.len() as i64)
        .bind(spec_json)
        .bind(labels)
        .bind(now)
        .execute(&mut *tx)
        .await?;

        for chunk in job.items.chunks(ROWS_PER_INSERT) {
            let mut sql = String::from(
                "INSERT INTO items (job_id, item_index, prompt, negative_prompt, seed, width, height, steps, guidance, scheduler) VALUES ",
            );
            sql.push_str(&row_placeholders(&tx, chunk.len(), 10));
            let mut q = sqlx::query(&sql);
            for item in chunk {
                q = q
                    .bind(job_id)
                    .bind(item.index as i64)
                    .bind(&item.prompt)
                    .bind(&item.negative_prompt)
                    .bind(item.seed as i64)
                    .bind(i64::from(item.width))
                    .bind(i64::from(item.height))
                    .bind(i64::from(item.steps))
                    .bind(f64::from(item.guidance))
                    .bind(&item.scheduler);
            }
            q.execute(&mut *tx).await?;
        }

        // Stage by stage: each task references the item's task of the stage
        // before, which must exist first.
        let stages = job.stages();
        for (rank, &stage) in stages.iter().enumerate() {
            let first = rank == 0;
            let last = rank + 1 == stages.len();
            let upscale = stage == STAGE_UPSCALE;
            let model_id = job.stage_model(stage);
            for chunk in job.items.chunks(ROWS_PER_INSERT) {
                let mut sql = String::from(
                    "INSERT INTO tasks (id, job_id, item_index, stage, stage_rank, state, tenant, engine, model_id, \
                     pixels, upscale, upscale_method, batch_key, depends_on, has_next, max_attempts, lease_ttl_ms, \
                     parent_sha256, strength, mask_sha256, mask_blur, mask_crop, outpaint) VALUES ",
                );
                sql.push_str(&row_placeholders(&tx, chunk.len(), 23));
                let mut q = sqlx::query(&sql);
                for item in chunk {
                    let factor = if upscale { u64::from(job.upscale) } else { 1 };
                    let pixels = u64::from(item.width) * u64::from(item.height) * factor * factor;
                    let method = if upscale {
                        job.upscale_method.as_str()
                    } else {
                        ""
                    };
                    // A generate task of an img2img job starts from the
                    // init image, named where later stages name their base.
                    let init = item.init_image.as_ref().filter(|_| first);
                    let strength = match (&job.refine, stage) {
                        (Some(r), STAGE_REFINE) => r.strength,
                        _ => init.map_or(0.0, |i| i.strength),
                    };
                    let mask = init.and_then(|i| i.mask.as_deref());
                    // Inpainting (through an uploaded mask, or the one an
                    // outpaint makes) renders apart from plain img2img.
                    let inpaints = first && item.inpaints();
                    let outpaint = item.outpaint().filter(|_| first);
                    let inpaint = if inpaints { "|inpaint" } else { "" };
                    let batch_key = format!(
                        "{}|{model_id}|{stage}|{}x{}|{}|{}|{}|{method}|{strength}{inpaint}",
                        job.engine, item.width, item.height, item.steps, item.scheduler, factor
                    );
                    let work_steps = match stage {
                        STAGE_UPSCALE => 4,
                        STAGE_REFINE => {
                            hallmark_proto::img2img_steps(item.steps as usize, strength) as u32
                        }
                        _ => item.steps,
                    };
                    q = q
                        .bind(task_id(job_id, item.index, stage))
                        .bind(job_id)
                        .bind(item.index as i64)
                        .bind(stage)
                        .bind(rank as i64)
                        .bind(if first { state::READY } else { state::WAITING })
                        .bind(&job.tenant)
                        .bind(&job.engine)
                        .bind(model_id)
                        .bind(pixels as i64)
                        .bind(factor as i64)
                        .bind(method)
                        .bind(batch_key)
                        .bind((!first).then(|| task_id(job_id, item.index, stages[rank - 1])))
                        .bind(i64::from(!last))
                        .bind(i64::from(job.max_attempts))
                        .bind(lease.ttl_ms(pixels, work_steps))
                        .bind(init.map(|i| i.sha256.as_str()))
                        .bind(strength)
                        .bind(mask)
                        .bind(i64::from(if inpaints { item.mask_use.blur } else { 0 }))
                        .bind(item.mask_use.crop.filter(|_| inpaints).map(i64::from))
                        .bind(outpaint.map(|o| o.to_column()));
                }
                q.execute(&mut *tx).await?;
            }
        }
        let submitted = AuditEvent::new(
            audit_kind::SUBMIT,
            job_id,
            serde_json::json!({
                "engine": job.engine,
                "model_id": job.model_id,
                "items": job.items.len(),
                "refine": job.refine,
                "upscale": job.upscale,
                "priority": job.priority,
                "spec_sha256": hallmark_provenance::sha256_hex(spec_json.as_bytes()),
            }),
        )
        .job(job_id)
        .actor(if submitted_by.is_empty() {
            job.tenant.as_str()
        } else {
            submitted_by
        });
        super::audit::append(&mut tx, now, &[submitted]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// The job's state, per-stage counts, queue position, why it waits and an ETA.
    pub async fn get_job(&self, job_id: &str, now: i64, live_since: i64) -> Result<Job> {
        let row = sqlx::query(
            "SELECT id, tenant, priority, state, engine, model_id, items, labels_json, created_at, finished_at \
             FROM jobs WHERE id = $1",
        )
        .bind(job_id)
        .fetch_optional(&self.pool)
        .await?
        .ok_or_else(|| StoreError::NotFound(format!("no job with id {job_id:?}")))?;
        let mut job = Job {
            job_id: row.try_get("id")?,
            tenant: row.try_get("tenant")?,
            priority: row.try_get::<i64, _>("priority")? as i32,
            state: row.try_get("state")?,
            engine: row.try_get("engine")?,
            model_id: row.try_get("model_id")?,
            items: row.try_get::<i64, _>("items")? as u64,
            created_at_ms: row.try_get("created_at")?,
            finished_at_ms: row.try_get::<Option<i64>, _>("finished_at")?.unwrap_or(0),
            labels: serde_json::from_str(&row.try_get::<String, _>("labels_json")?)
                .unwrap_or_default(),
            ..Default::default()
        };

        let counts = sqlx::query(
            "SELECT stage, state, MIN(model_id) AS model_id, CAST(COUNT(*) AS BIGINT) AS n, \
             CAST(SUM(progress) AS DOUBLE PRECISION) AS p \
             FROM tasks WHERE job_id = $1 GROUP BY stage, state",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        let mut stages: BTreeMap<(i32, String), StageProgress> = BTreeMap::new();
        let mut running_progress: BTreeMap<String, f64> = BTreeMap::new();
        for r in counts {
            let stage: String = r.try_get("stage")?;
            let st: String = r.try_get("state")?;
            let n = r.try_get::<i64, _>("n")? as u64;
            let rank = stage_rank(&stage);
            let p = stages
                .entry((rank, stage.clone()))
                .or_insert_with(|| StageProgress {
                    stage: stage.clone(),
                    ..Default::default()
                });
            // Every task of a stage runs on the stage's model.
            p.model_id = r.try_get("model_id")?;
            p.total += n;
            if st == state::LEASED {
                running_progress.insert(
                    stage.clone(),
                    r.try_get::<Option<f64>, _>("p")?.unwrap_or(0.0),
                );
            }
            match st.as_str() {
                state::WAITING | state::HELD => p.waiting += n,
                state::READY => p.ready += n,
                state::LEASED => p.leased += n,
                state::SUCCEEDED => p.succeeded += n,
                state::FAILED => p.failed += n,
                _ => p.canceled += n,
            }
        }
        job.stages = stages.into_values().collect();
        for st in &mut job.stages {
            let partial = running_progress.get(&st.stage).copied().unwrap_or(0.0);
            let finished = (st.succeeded + st.failed + st.canceled) as f64;
            st.progress = if st.total == 0 {
                0.0
            } else {
                ((finished + partial) / st.total as f64) as f32
            };
        }
        let open: u64 = job
            .stages
            .iter()
            .map(|s| s.waiting + s.ready + s.leased)
            .sum();
        let failed: u64 = job.stages.iter().map(|s| s.failed).sum();
        let done: u64 = job.stages.iter().map(|s| s.succeeded).sum();
        let ready: u64 = job.stages.iter().map(|s| s.ready).sum();
        let leased: u64 = job.stages.iter().map(|s| s.leased).sum();
        // The stored state lags completions by one reap interval; derive it,
        // and the finish time (the last task's), as the reap will record them.
        if job.state == "running" && open == 0 {
            job.state = if failed > 0 {
                "failed".into()
            } else {
                "succeeded".into()
            };
            job.finished_at_ms = self.last_task_finished(job_id).await?.unwrap_or(now);
        }
        if job.state == "running" {
            let elapsed = (now - job.created_at_ms).max(0) as u64;
            job.eta_ms = elapsed.saturating_mul(open).checked_div(done).unwrap_or(0);
            job.queue_position = self.queue_position(&job).await?;
            if ready > 0 && leased == 0 {
                job.waiting_reason = self.waiting_reason(&job, now, live_since).await?;
            }
        } else if job.state == "paused" {
            job.waiting_reason = "the job is paused; `hallmark resume` continues it".into();
        }
        if failed > 0 {
            let errs = sqlx::query(
                "SELECT error FROM tasks WHERE job_id = $1 AND state = 'failed' AND error IS NOT NULL \
                 GROUP BY error ORDER BY MIN(stage_rank), error LIMIT 5",
            )
            .bind(job_id)
            .fetch_all(&self.pool)
            .await?;
            job.errors = errs
                .iter()
                .filter_map(|r| r.try_get("error").ok())
                .collect();
        }
        Ok(job)
    }

    /// When the job's last finished task finished.
    async fn last_task_finished(&self, job_id: &str) -> Result<Option<i64>> {
        Ok(sqlx::query_scalar::<_, Option<i64>>(
            "SELECT MAX(finished_at) FROM tasks WHERE job_id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.pool)
        .await?)
    }

    async fn queue_position(&self, job: &Job) -> Result<u64> {
        let n: i64 = sqlx::query_scalar(
            "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks t JOIN jobs j ON j.id = t.job_id \
             WHERE t.state = 'ready' AND j.state = 'running' AND t.job_id <> $1 \
             AND (j.priority > $2 OR (j.priority = $2 AND j.created_at < $3))",
        )
        .bind(&job.job_id)
        .bind(i64::from(job.priority))
        .bind(job.created_at_ms)
        .fetch_one(&self.pool)
        .await?;
        Ok(n as u64)
    }

    /// Why the job's ready tasks are not leased (DESIGN invariant 5).
    async fn waiting_reason(&self, job: &Job, now: i64, live_since: i64) -> Result<String> {
        // Per model: a refine stage's ready tasks name the refiner.
        let ready = sqlx::query(
            "SELECT model_id, CAST(MIN(pixels) AS BIGINT) AS px FROM tasks \
             WHERE job_id = $1 AND state = 'ready' GROUP BY model_id ORDER BY model_id",
        )
        .bind(&job.job_id)
        .fetch_all(&self.pool)
        .await?;
        for r in ready {
            let model_id: String = r.try_get("model_id")?;
            let smallest: i64 = r.try_get("px")?;
            let (live, px) = self
                .model_workers(&job.engine, &model_id, live_since)
                .await?;
            if live == 0 {
                return Ok(format!(
                    "no live worker serves model {model_id:?} with engine {:?}",
                    job.engine
                ));
            }
            if smallest > px {
                return Ok(format!(
                    "too large: its tasks need {smallest} pixels, the largest live worker for {model_id:?} holds {px}"
                ));
            }
        }
        let cap = sqlx::query(
            "SELECT max_running, CAST((SELECT COUNT(*) FROM tasks r WHERE r.tenant = $1 AND r.state = 'leased') AS BIGINT) AS running \
             FROM tenants WHERE name = $1",
        )
        .bind(&job.tenant)
        .fetch_one(&self.pool)
        .await?;
        let (max, running): (i64, i64) = (cap.try_get("max_running")?, cap.try_get("running")?);
        if max > 0 && running >= max {
            return Ok(format!(
                "tenant {:?} is at its cap of {max} running tasks",
                job.tenant
            ));
        }
        let _ = now;
        Ok("waiting for a free worker slot".into())
    }

    /// Jobs, newest first, optionally of one tenant.
    pub async fn list_jobs(
        &self,
        tenant: &str,
        limit: u32,
        now: i64,
        live_since: i64,
    ) -> Result<Vec<Job>> {
        let ids: Vec<String> = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE ($1 = '' OR tenant = $1) ORDER BY created_at DESC, id DESC LIMIT $2",
        )
        .bind(tenant)
        .bind(i64::from(if limit == 0 { 50 } else { limit.min(1000) }))
        .fetch_all(&self.pool)
        .await?;
        let mut jobs = Vec::with_capacity(ids.len());
        for id in ids {
            jobs.push(self.get_job(&id, now, live_since).await?);
        }
        Ok(jobs)
    }

    /// Cancel, pause, resume or retry the failed tasks of a job.
    pub async fn control(&self, job_id: &str, action: JobControl, now: i64) -> Result<()> {
        self.control_by(job_id, action, "", now).await
    }

    /// [`Store::control`], naming who did it in the audit ledger.
    pub async fn control_by(
        &self,
        job_id: &str,
        action: JobControl,
        actor: &str,
        now: i64,
    ) -> Result<()> {
        let mut tx = self.pool.begin().await?;
        let current: String = sqlx::query_scalar("SELECT state FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_optional(&mut *tx)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("no job with id {job_id:?}")))?;
        let refuse = |what: &str| {
            StoreError::Refused(format!("cannot {what} job {job_id}: it is {current}"))
        };
        match action {
            JobControl::Cancel => {
                if !matches!(current.as_str(), "running" | "paused") {
                    return Err(refuse("cancel"));
                }
                sqlx::query("UPDATE jobs SET state = 'canceled', finished_at = $2 WHERE id = $1")
                    .bind(job_id)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE tasks SET state = 'canceled', worker_id = NULL, lease_expires_at = NULL, finished_at = $2 \
                     WHERE job_id = $1 AND state IN ('waiting', 'ready', 'held', 'leased')",
                )
                .bind(job_id)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            }
            JobControl::Pause => {
                if current != "running" {
                    return Err(refuse("pause"));
                }
                sqlx::query("UPDATE jobs SET state = 'paused' WHERE id = $1")
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                // A paused lease is not the worker's fault: its attempt is given back.
                sqlx::query(
                    "UPDATE tasks SET state = 'held', worker_id = NULL, lease_expires_at = NULL, \
                     attempts = CASE WHEN state = 'leased' THEN attempts - 1 ELSE attempts END \
                     WHERE job_id = $1 AND state IN ('ready', 'leased')",
                )
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            }
            JobControl::Resume => {
                if current != "paused" {
                    return Err(refuse("resume"));
                }
                sqlx::query("UPDATE jobs SET state = 'running' WHERE id = $1")
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query(
                    "UPDATE tasks SET state = CASE WHEN depends_on IS NOT NULL AND parent_sha256 IS NULL \
                     THEN 'waiting' ELSE 'ready' END WHERE job_id = $1 AND state = 'held'",
                )
                .bind(job_id)
                .execute(&mut *tx)
                .await?;
            }
            JobControl::RetryFailed => {
                if !matches!(current.as_str(), "running" | "failed" | "succeeded") {
                    return Err(refuse("retry"));
                }
                // The failed tasks that start from an input need it stored:
                // they use it now (see `submit`).
                let inputs: Vec<String> = sqlx::query_scalar(
                    "SELECT parent_sha256 FROM tasks WHERE job_id = $1 AND state = 'failed' \
                     AND stage_rank = 0 AND parent_sha256 IS NOT NULL \
                     UNION SELECT mask_sha256 FROM tasks WHERE job_id = $1 AND state = 'failed' \
                     AND stage_rank = 0 AND mask_sha256 IS NOT NULL",
                )
                .bind(job_id)
                .fetch_all(&mut *tx)
                .await?;
                for sha256 in &inputs {
                    if !super::inputs::touch(&mut tx, sha256, now).await? {
                        return Err(StoreError::Refused(format!(
                            "cannot retry job {job_id}: {}",
                            input_gone(sha256)
                        )));
                    }
                }
                let n = sqlx::query(
                    "UPDATE tasks SET attempts = 0, error = NULL, finished_at = NULL, \
                     state = CASE WHEN depends_on IS NOT NULL AND parent_sha256 IS NULL THEN 'waiting' ELSE 'ready' END \
                     WHERE job_id = $1 AND state = 'failed'",
                )
                .bind(job_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if n == 0 {
                    return Err(StoreError::Refused(format!(
                        "job {job_id} has no failed tasks"
                    )));
                }
                sqlx::query("DELETE FROM job_worker_failures WHERE job_id = $1")
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
                sqlx::query("UPDATE jobs SET state = 'running', finished_at = NULL WHERE id = $1")
                    .bind(job_id)
                    .execute(&mut *tx)
                    .await?;
            }
        }
        let event = AuditEvent::new(
            action.name(),
            job_id,
            serde_json::json!({ "from_state": current }),
        )
        .job(job_id)
        .actor(actor);
        super::audit::append(&mut tx, now, &[event]).await?;
        tx.commit().await?;
        Ok(())
    }

    /// Every artifact of a job, in item order, base images first.
    pub async fn list_artifacts(&self, job_id: &str) -> Result<Vec<Artifact>> {
        let rows = sqlx::query(
            "SELECT a.task_id, a.job_id, a.item_index, a.stage, a.model_id, a.parent_sha256, a.worker_id, \
             a.sha256, a.size, a.media_type, a.width, a.height, a.created_at, a.mask_sha256, i.seed, i.prompt \
             FROM artifacts a JOIN items i ON i.job_id = a.job_id AND i.item_index = a.item_index \
             WHERE a.job_id = $1 ORDER BY a.item_index, a.stage",
        )
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(artifact_from_row).collect()
    }

    /// The artifact rows stored under `sha256` (identical images share a blob).
    pub async fn artifact_known(&self, sha256: &str) -> Result<bool> {
        Ok(
            sqlx::query("SELECT task_id FROM artifacts WHERE sha256 = $1 LIMIT 1")
                .bind(sha256)
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Whether `sha256` is a stored blob a worker may fetch: an artifact or
    /// an uploaded input.
    pub async fn blob_known(&self, sha256: &str) -> Result<bool> {
        Ok(self.artifact_known(sha256).await? || self.find_input(sha256).await?.is_some())
    }

    /// The tenant of a job; `None` when there is no such job.
    pub async fn job_tenant(&self, job_id: &str) -> Result<Option<String>> {
        Ok(sqlx::query_scalar("SELECT tenant FROM jobs WHERE id = $1")
            .bind(job_id)
            .fetch_optional(&self.pool)
            .await?)
    }

    /// The tenants a stored blob belongs to: those whose jobs made an
    /// artifact stored under `sha256` (identical images share a blob) and
    /// those who uploaded it as an input.
    pub async fn blob_tenants(&self, sha256: &str) -> Result<Vec<String>> {
        Ok(sqlx::query_scalar(
            "SELECT j.tenant FROM artifacts a JOIN jobs j ON j.id = a.job_id WHERE a.sha256 = $1 \
             UNION SELECT tenant FROM input_owners WHERE sha256 = $1",
        )
        .bind(sha256)
        .fetch_all(&self.pool)
        .await?)
    }
}

fn artifact_from_row(r: &sqlx::any::AnyRow) -> Result<Artifact> {
    Ok(Artifact {
        task_id: r.try_get("task_id")?,
        job_id: r.try_get("job_id")?,
        item_index: r.try_get::<i64, _>("item_index")? as u64,
        stage: r.try_get("stage")?,
        model_id: r.try_get("model_id")?,
        parent_sha256: r
            .try_get::<Option<String>, _>("parent_sha256")?
            .unwrap_or_default(),
        worker_id: r.try_get("worker_id")?,
        sha256: r.try_get("sha256")?,
        size: r.try_get::<i64, _>("size")? as u64,
        media_type: r.try_get("media_type")?,
        width: r.try_get::<i64, _>("width")? as u32,
        height: r.try_get::<i64, _>("height")? as u32,
        created_at_ms: r.try_get("created_at")?,
        seed: r.try_get::<i64, _>("seed")? as u64,
        prompt: r.try_get("prompt")?,
        mask_sha256: r
            .try_get::<Option<String>, _>("mask_sha256")?
            .unwrap_or_default(),
    })
}

/// Why a job cannot start from the input `sha256` any more.
fn input_gone(sha256: &str) -> String {
    format!(
        "input image {sha256} is no longer stored (deleted by its uploaders, or unused for input_retention_ms); upload it again (`hallmark submit --init-image FILE`, or `--mask FILE` for a mask, restores it)"
    )
}

/// Task ids read as `job/item/stage`.
pub fn task_id(job_id: &str, item: u64, stage: &str) -> String {
    format!("{job_id}/{item}/{stage}")
}
