//! `hallmark.v1.Jobs`: submit, view, watch, control and download.

use std::sync::Arc;
use std::time::Duration;

use hallmark_proto::v1::jobs_server::Jobs;
use hallmark_proto::v1::{
    Chunk, DeleteInputResponse, DownloadArtifactRequest, InputImage, InputRef, Job, JobRef,
    ListArtifactsResponse, ListInputsRequest, ListInputsResponse, ListJobsRequest,
    ListJobsResponse, StoredInput, SubmitJobRequest,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Coordinator, blob_status, status};
use crate::auth::Caller;
use crate::metrics as m;
use crate::rate::{Quota, RateRefusal};
use crate::spec::{self, Limits, SpecError};
use crate::store::{InputRecorded, JobControl, NewJob, StoreError, now_ms};

pub struct JobsService(pub Arc<Coordinator>);

/// Largest input image accepted by `UploadInput`.
pub const MAX_INPUT_BYTES: u64 = 64 * 1024 * 1024;

/// A rate refusal as a status: one that can never pass is invalid, one
/// that may pass later is RESOURCE_EXHAUSTED.
fn rate_status(refusal: RateRefusal) -> Status {
    match refusal {
        RateRefusal::TooLarge { .. } => Status::invalid_argument(refusal.to_string()),
        RateRefusal::Exhausted { .. } => Status::resource_exhausted(refusal.to_string()),
    }
}

fn is_terminal(state: &str) -> bool {
    matches!(state, "succeeded" | "failed" | "canceled")
}

impl JobsService {
    async fn view(&self, job_id: &str) -> Result<Job, Status> {
        let now = now_ms();
        self.0
            .store
            .get_job(job_id, now, self.0.live_since(now))
            .await
            .map_err(status)
    }

    async fn control(
        &self,
        req: Request<JobRef>,
        action: JobControl,
    ) -> Result<Response<Job>, Status> {
        let caller = Caller::of(&req);
        let job_id = req.into_inner().job_id;
        self.0.check_job_owner(&caller, &job_id).await?;
        self.0
            .store
            .control_by(&job_id, action, &caller.actor(), now_ms())
            .await
            .map_err(status)?;
        if matches!(action, JobControl::Resume | JobControl::RetryFailed) {
            self.0.notifier.tasks_ready();
        }
        if action == JobControl::Cancel {
            self.0.purge_deleted_inputs_after_a_job().await;
        }
        self.0.notifier.job_changed(&job_id);
        Ok(Response::new(self.view(&job_id).await?))
    }
}

#[tonic::async_trait]
impl Jobs for JobsService {
    async fn submit(&self, req: Request<SubmitJobRequest>) -> Result<Response<Job>, Status> {
        let c = &self.0;
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let mut spec = r
            .spec
            .ok_or_else(|| Status::invalid_argument("invalid job spec: spec: missing"))?;
        spec.tenant = caller.acting_tenant(&spec.tenant, "submitting")?;
        let limits = Limits {
            max_items: c.config.max_items_per_job,
            max_side: c.config.max_side,
            max_steps: c.config.max_steps,
            default_max_attempts: c.config.default_max_attempts,
        };
        let random_seed = uuid::Uuid::new_v4().as_u64_pair().0;
        let job =
            spec::expand(&spec, &limits, random_seed).map_err(|e| status(StoreError::Spec(e)))?;
        c.store
            .check_servable(&job, r.queue_unservable)
            .await
            .map_err(status)?;
        // A tenant's token renders only from the tenant's own uploads.
        let own_inputs_only = matches!(caller, Caller::Tenant(_));
        for (sha256, field) in job.inputs() {
            let what = if field == "mask_sha256" {
                "mask"
            } else {
                "input image"
            };
            let flag = if field == "mask_sha256" {
                "--mask"
            } else {
                "--init-image"
            };
            let owned = !own_inputs_only
                || c.store
                    .input_owned_by(sha256, &job.tenant)
                    .await
                    .map_err(status)?;
            let stored = c.store.find_input(sha256).await.map_err(status)?.is_some();
            if !(owned && stored) {
                let purged = if stored {
                    None
                } else {
                    c.store.input_purged_at(sha256).await.map_err(status)?
                };
                let message = match purged {
                    // Said only to whom the input was usable before.
                    Some(at) if owned => {
                        format!(
                            "{what} {sha256} was purged at {} (deleted by its uploaders, or unused for input_retention_ms); upload it again (UploadInput, or `hallmark submit {flag} FILE`)",
                            crate::auth::format_time_ms(at)
                        )
                    }
                    _ => format!(
                        "no uploaded {what} {sha256}; upload it first (UploadInput, or `hallmark submit {flag} FILE`)"
                    ),
                };
                return Err(status(StoreError::Spec(SpecError {
                    field: field.into(),
                    message,
                })));
            }
        }
        let job_id = format!("j-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let spec_json = serde_json::json!({
            "engine": job.engine, "model_id": job.model_id, "upscale": job.upscale,
            "upscale_method": job.upscale_method,
            "width": spec.width, "height": spec.height, "steps": spec.steps,
            "guidance": spec.guidance, "scheduler": spec.scheduler,
            "images_per_prompt": spec.images_per_prompt.max(1),
            "seed": spec.seed.unwrap_or(random_seed), "negative_prompt": spec.negative_prompt,
            "init_image_sha256": spec.init_image_sha256, "strength": spec.strength,
            "init_images": job.init_images(),
            "mask_sha256": spec.mask_sha256, "masks": job.masks(),
            "mask_blur": spec.mask_blur, "mask_crop": spec.mask_crop,
            "outpaint": spec.outpaint.map(crate::spec::Outpaint::from),
            "refine": job.refine,
        })
        .to_string();
        let tenant_cap = c.config.tenant_cap(&job.tenant);
        // Counted last, so a job refused for anything else costs nothing,
        // and given back if it is not written.
        let rate = u64::from(c.config.tenant_submit_rate(&job.tenant));
        let items = job.items.len() as u64;
        if let Err(refusal) = c
            .limiter
            .admit(Quota::SubmitItems, &job.tenant, items, rate, now_ms())
            .await
        {
            metrics::counter!(m::SUBMITS_RATE_LIMITED, "tenant" => job.tenant.clone()).increment(1);
            return Err(rate_status(refusal));
        }
        let submitted_by = match &caller {
            Caller::Operator(_) | Caller::Open(_) => caller.actor(),
            _ => String::new(),
        };
        let new = NewJob {
            id: &job_id,
            job: &job,
            spec_json: &spec_json,
            tenant_cap,
            submitted_by: &submitted_by,
        };
        if let Err(e) = c.store.submit(&new, &c.lease_policy, now_ms()).await {
            c.limiter
                .refund(Quota::SubmitItems, &job.tenant, items, rate, now_ms())
                .await;
            return Err(status(e));
        }
        tracing::info!(job_id = %job_id, items = job.items.len(), tenant = %job.tenant, "job submitted");
        metrics::counter!(m::JOBS_SUBMITTED, "tenant" => job.tenant.clone()).increment(1);
        metrics::counter!(m::TASKS_SUBMITTED).increment(job.task_count() as u64);
        c.notifier.tasks_ready();
        c.notifier.job_changed(&job_id);
        Ok(Response::new(self.view(&job_id).await?))
    }

    async fn get_job(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        let caller = Caller::of(&req);
        let job_id = req.into_inner().job_id;
        self.0.check_job_owner(&caller, &job_id).await?;
        Ok(Response::new(self.view(&job_id).await?))
    }

    async fn list_jobs(
        &self,
        req: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let tenant = caller.acting_tenant(&r.tenant, "listing jobs")?;
        let now = now_ms();
        let jobs = self
            .0
            .store
            .list_jobs(&tenant, r.limit, now, self.0.live_since(now))
            .await
            .map_err(status)?;
        Ok(Response::new(ListJobsResponse { jobs }))
    }

    type WatchJobStream = ReceiverStream<Result<Job, Status>>;

    async fn watch_job(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let caller = Caller::of(&req);
        let job_id = req.into_inner().job_id;
        self.0.check_job_owner(&caller, &job_id).await?;
        let first = self.view(&job_id).await?;
        let mut events = self.0.notifier.subscribe_jobs();
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let svc = JobsService(self.0.clone());
        tokio::spawn(async move {
            let mut last = first;
            if tx.send(Ok(last.clone())).await.is_err() || is_terminal(&last.state) {
                return;
            }
            loop {
                // Wake on an event for this job, or every second for the ETA.
                let tick = tokio::time::sleep(Duration::from_secs(1));
                tokio::pin!(tick);
                loop {
                    tokio::select! {
                        _ = svc.0.stopping() => return,
                        _ = &mut tick => break,
                        ev = events.recv() => match ev {
                            Ok(id) if id == job_id => break,
                            Ok(_) => {}
                            Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => break,
                            Err(_) => return,
                        }
                    }
                }
                // Coalesce bursts of completions into one update.
                tokio::time::sleep(Duration::from_millis(100)).await;
                match svc.view(&job_id).await {
                    Ok(job) => {
                        let done = is_terminal(&job.state);
                        if job != last && tx.send(Ok(job.clone())).await.is_err() {
                            return;
                        }
                        last = job;
                        if done {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn cancel_job(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        self.control(req, JobControl::Cancel).await
    }

    async fn pause_job(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        self.control(req, JobControl::Pause).await
    }

    async fn resume_job(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        self.control(req, JobControl::Resume).await
    }

    async fn retry_failed(&self, req: Request<JobRef>) -> Result<Response<Job>, Status> {
        self.control(req, JobControl::RetryFailed).await
    }

    async fn list_artifacts(
        &self,
        req: Request<JobRef>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        let caller = Caller::of(&req);
        let job_id = req.into_inner().job_id;
        self.0.check_job_owner(&caller, &job_id).await?;
        let artifacts = self.0.store.list_artifacts(&job_id).await.map_err(status)?;
        Ok(Response::new(ListArtifactsResponse { artifacts }))
    }

    async fn delete_input(
        &self,
        req: Request<InputRef>,
    ) -> Result<Response<DeleteInputResponse>, Status> {
        let c = &self.0;
        let caller = Caller::of(&req);
        let tenant = caller.acting_tenant("", "deleting an input image")?;
        let sha256 = req.into_inner().sha256;
        if !hallmark_provenance::is_sha256_hex(&sha256) {
            return Err(Status::invalid_argument(format!(
                "{sha256:?} is not the sha256 of an input image (64 hex digits)"
            )));
        }
        // A tenant takes back its own upload; an operator, or anyone with
        // authentication off, every tenant's.
        let scope = match caller {
            Caller::Tenant(_) => Some(tenant.as_str()),
            _ => None,
        };
        let deleted = c
            .store
            .delete_input(&sha256, scope, &caller.actor(), now_ms(), || {
                c.blobs.remove(&sha256)
            })
            .await
            .map_err(status)?;
        // A blob the store refuses to delete now is deleted by a later
        // retention pass; the input is gone either way.
        tracing::info!(
            %sha256,
            tenant = %tenant,
            purged = deleted.purged,
            blob_pending = deleted.blob_pending,
            "input image deleted"
        );
        Ok(Response::new(DeleteInputResponse {}))
    }

    async fn list_inputs(
        &self,
        req: Request<ListInputsRequest>,
    ) -> Result<Response<ListInputsResponse>, Status> {
        let c = &self.0;
        let caller = Caller::of(&req);
        let r = req.into_inner();
        let tenant = caller.acting_tenant(&r.tenant, "listing input images")?;
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) };
        let after = match r.after.as_str() {
            "" => None,
            cursor => Some(parse_input_cursor(cursor).ok_or_else(|| {
                Status::invalid_argument(format!(
                    "after {cursor:?} is not a page cursor this coordinator gave (LAST_USED_MS:SHA256)"
                ))
            })?),
        };
        let retention = c.config.input_retention();
        let page = c
            .store
            .list_inputs(
                Some(tenant.as_str()).filter(|t| !t.is_empty()),
                limit,
                after.as_ref(),
            )
            .await
            .map_err(status)?;
        // A full page may have more behind it.
        let next_after = match page.last() {
            Some((image, _, last_used)) if page.len() == limit as usize => {
                format!("{last_used}:{}", image.sha256)
            }
            _ => String::new(),
        };
        let inputs = page
            .into_iter()
            .map(|(image, uploaded_at_ms, last_used_at_ms)| StoredInput {
                image: Some(image),
                uploaded_at_ms,
                last_used_at_ms,
                purge_after_ms: retention.map_or(0, |r| last_used_at_ms.saturating_add(r)),
            })
            .collect();
        Ok(Response::new(ListInputsResponse { inputs, next_after }))
    }

    type DownloadArtifactStream = ReceiverStream<Result<Chunk, Status>>;

    async fn download_artifact(
        &self,
        req: Request<DownloadArtifactRequest>,
    ) -> Result<Response<Self::DownloadArtifactStream>, Status> {
        let caller = Caller::of(&req);
        let sha256 = req.into_inner().sha256;
        if !matches!(caller, Caller::Open(_) | Caller::Operator(_)) {
            caller.require_known("downloading an artifact")?;
            let tenants = self.0.store.blob_tenants(&sha256).await.map_err(status)?;
            if !tenants.iter().any(|t| caller.owns(t)) {
                return Err(Status::not_found(format!(
                    "no artifact with sha256 {sha256}"
                )));
            }
        }
        Ok(Response::new(self.0.stream_blob(&sha256).await?))
    }

    async fn upload_input(
        &self,
        req: Request<Streaming<Chunk>>,
    ) -> Result<Response<InputImage>, Status> {
        let c = &self.0;
        let tenant = Caller::of(&req).acting_tenant("", "uploading an input image")?;
        let mut stream = req.into_inner();
        let mut writer = c.blobs.writer(MAX_INPUT_BYTES);
        let mut body = Vec::new();
        while let Some(chunk) = stream.message().await? {
            writer.write(&chunk.data).await.map_err(blob_status)?;
            body.extend_from_slice(&chunk.data);
        }
        if body.is_empty() {
            return Err(Status::invalid_argument("the input image is empty"));
        }
        // Decoded whole: a truncated or corrupt file is refused here, not
        // by every task that would start from it. So are credentials that
        // do not validate: every output names the input as an ingredient,
        // and would carry its failure.
        let (media_type, width, height) = tokio::task::spawn_blocking(move || {
            use hallmark_provenance::credentials as cr;
            let unusable = |e: cr::CredentialsError| format!("the input is not a usable image: {e}");
            let format = cr::ImageFormat::sniff(&body).map_err(unusable)?;
            let pixels = cr::decode_image(&body).map_err(unusable)?;
            let report = cr::inspect(&body, None).map_err(unusable)?;
            if report.verdict == cr::Verdict::Invalid {
                return Err(format!(
                    "the input's content credentials do not validate ({}); use the original file or one without credentials",
                    report.failures.join("; ")
                ));
            }
            Ok((format.mime(), pixels.width(), pixels.height()))
        })
        .await
        .map_err(|e| Status::internal(format!("decoding the input panicked: {e}")))?
        .map_err(Status::invalid_argument)?;
        let (sha256, size) = writer.digest();
        // Counted once the upload is whole and good; nothing is kept when it
        // does not fit, and the count is given back if it is not recorded.
        let rate = if tenant.is_empty() {
            0
        } else {
            c.config.tenant_upload_rate(&tenant)
        };
        if let Err(refusal) = c
            .limiter
            .admit(Quota::UploadBytes, &tenant, size, rate, now_ms())
            .await
        {
            metrics::counter!(m::UPLOADS_RATE_LIMITED, "tenant" => tenant.clone()).increment(1);
            return Err(rate_status(refusal));
        }
        let refund = || async {
            c.limiter
                .refund(Quota::UploadBytes, &tenant, size, rate, now_ms())
                .await
        };
        let input = InputImage {
            sha256: sha256.clone(),
            media_type: media_type.to_string(),
            width,
            height,
            size,
        };
        // The blob is published with the input's row locked, so a purge of
        // the same content cannot delete it between the two.
        let publish = async { writer.finish(&sha256, size).await.map(drop) };
        let recorded = match c
            .store
            .record_input(&input, &tenant, now_ms(), publish)
            .await
        {
            Ok(recorded) => recorded,
            Err(e) => {
                refund().await;
                return Err(status(e));
            }
        };
        let restored = recorded == InputRecorded::Restored;
        tracing::info!(sha256 = %input.sha256, width, height, size, restored, "input image uploaded");
        Ok(Response::new(input))
    }
}

/// A `ListInputs` page cursor: the last input's last use and hash.
fn parse_input_cursor(cursor: &str) -> Option<(i64, String)> {
    let (used, sha256) = cursor.split_once(':')?;
    let used = used.parse().ok()?;
    hallmark_provenance::is_sha256_hex(sha256).then(|| (used, sha256.to_ascii_lowercase()))
}

#[cfg(test)]
mod tests {
    use super::parse_input_cursor;

    #[test]
    fn an_input_page_cursor_reads_back_as_given_and_nothing_else_does() {
        let sha = "AB".repeat(32);
        assert_eq!(
            parse_input_cursor(&format!("1700:{sha}")),
            Some((1700, sha.to_ascii_lowercase()))
        );
        for bad in [
            "",
            "1700",
            &format!("x:{sha}"),
            "1700:abc",
            &format!(":{sha}"),
        ] {
            assert_eq!(parse_input_cursor(bad), None, "{bad}");
        }
    }
}
