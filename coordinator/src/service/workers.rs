//! `hallmark.v1.Workers`: registration, the lease/heartbeat call, uploads and failures.

use std::pin::pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hallmark_proto::v1::complete_message::Body;
use hallmark_proto::v1::complete_outcome::Kind;
use hallmark_proto::v1::workers_server::Workers;
use hallmark_proto::v1::{
    Chunk, CompleteHeader, CompleteMessage, CompleteOutcome, CompleteResponse,
    DownloadArtifactRequest, FailRequest, FailResponse, LeaseRequest, LeaseResponse,
    ListWorkersRequest, ListWorkersResponse, RegisterWorkerRequest, RegisterWorkerResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Coordinator, blob_status, client_cert, status};
use crate::auth::{Caller, ClientFingerprint};
use crate::blobs::BlobWriter;
use crate::metrics as m;
use crate::spec::ENGINES;
use crate::stamps::StampCheck;
use crate::store::{AttemptEnd, Completion, StoreError, WorkerRegistration, now_ms};

/// Largest upload a worker may send (one image).
const MAX_UPLOAD: u64 = 256 * 1024 * 1024;
/// Most bytes one Complete call may carry: uploads are held in memory for
/// the stamp check until the call ends.
const MAX_CALL_BYTES: u64 = 512 * 1024 * 1024;
/// Most uploads one Complete call may carry.
const MAX_UPLOADS_PER_CALL: usize = 64;
/// Uploads above this size have their lease checked before the bytes are taken.
const EARLY_CHECK_BYTES: u64 = 1024 * 1024;
/// Longest a lease call may wait for work.
const MAX_WAIT: Duration = Duration::from_secs(30);

pub struct WorkersService(pub Arc<Coordinator>);

#[tonic::async_trait]
impl Workers for WorkersService {
    async fn register(
        &self,
        req: Request<RegisterWorkerRequest>,
    ) -> Result<Response<RegisterWorkerResponse>, Status> {
        let caller = Caller::of(&req);
        caller.require_worker("registering a worker")?;
        let cert = client_cert(&req);
        let r = req.into_inner();
        if r.engines.is_empty() {
            return Err(Status::invalid_argument(
                "a worker must declare at least one engine",
            ));
        }
        if let Some(bad) = r.engines.iter().find(|e| !ENGINES.contains(&e.as_str())) {
            return Err(Status::invalid_argument(format!("unknown engine {bad:?}")));
        }
        if r.max_batch == 0 || r.max_pixels == 0 {
            return Err(Status::invalid_argument(
                "max_batch and max_pixels must be positive",
            ));
        }
        if r.models
            .iter()
            .any(|m| m.model_id.is_empty() || m.weights_sha256.len() != 64)
        {
            return Err(Status::invalid_argument(
                "every model needs an id and a 64-hex-digit weights_sha256",
            ));
        }
        let worker_id = format!("w-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        let name = if r.name.is_empty() {
            worker_id.clone()
        } else {
            r.name.clone()
        };
        // A worker serves each of its models with each of its engines.
        let models: Vec<_> = r
            .engines
            .iter()
            .flat_map(|e| r.models.iter().map(move |m| (e.clone(), m.clone())))
            .collect();
        let registration = WorkerRegistration {
            worker_id: &worker_id,
            name: &name,
            hostname: &r.hostname,
            engines: &r.engines,
            models: &models,
            max_pixels: r.max_pixels,
            max_batch: r.max_batch,
            principal: &caller.name(),
            client_cert: cert.as_ref(),
        };
        self.0
            .store
            .register_worker(&registration, now_ms())
            .await
            .map_err(status)?;
        tracing::info!(worker_id = %worker_id, name = %name, "worker registered");
        // A new worker may serve tasks that were waiting for one.
        self.0.notifier.tasks_ready();
        Ok(Response::new(RegisterWorkerResponse {
            worker_id,
            heartbeat_interval_ms: self.0.config.heartbeat_interval_ms as u32,
        }))
    }

    async fn lease(&self, req: Request<LeaseRequest>) -> Result<Response<LeaseResponse>, Status> {
        let caller = Caller::of(&req);
        caller.require_worker("leasing tasks")?;
        let cert = ClientFingerprint::of(&req);
        let c = &self.0;
        let r = req.into_inner();
        let now = now_ms();
        let caps = c
            .seen_worker(&caller, &cert, &r.worker_id, &r.loaded_model, now)
            .await?;
        let held: Vec<(String, i64, f32)> = r
            .held
            .iter()
            .map(|h| (h.task_id.clone(), h.fencing_token, h.progress))
            .collect();
        let (revoked, requeued) = c
            .store
            .heartbeat(&r.worker_id, &held, now)
            .await
            .map_err(status)?;
        if requeued {
            c.notifier.tasks_ready();
        }
        let deadline =
            tokio::time::Instant::now() + Duration::from_millis(u64::from(r.wait_ms)).min(MAX_WAIT);
        let poll = Duration::from_millis(c.config.poll_interval_ms.max(10));
        loop {
            // Register interest before looking, so a wake-up between the look
            // and the wait is not missed.
            let mut notified = pin!(c.notifier.wake().notified());
            notified.as_mut().enable();
            let now = now_ms();
            let looked = Instant::now();
            let leases = c
                .store
                .lease(
                    &caps,
                    r.want,
                    &r.loaded_model,
                    now - c.config.failure_cooldown_ms as i64,
                    c.config.job_worker_failure_limit,
                    now,
                )
                .await
                .map_err(status)?;
            metrics::histogram!(m::LEASE_SECONDS).record(looked.elapsed());
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !leases.is_empty() || r.want == 0 || remaining.is_zero() {
                if let Some(first) = leases.first() {
                    // A batch is one stage (the batch key holds it).
                    metrics::counter!(m::TASKS_LEASED, "stage" => first.stage.clone())
                        .increment(leases.len() as u64);
                    tracing::debug!(worker_id = %r.worker_id, job_id = %first.job_id, n = leases.len(), "leased");
                    c.notifier.job_changed(&first.job_id);
                }
                return Ok(Response::new(LeaseResponse { leases, revoked }));
            }
            tokio::select! {
                _ = c.stopping() => {
                    return Ok(Response::new(LeaseResponse { leases: Vec::new(), revoked }));
                }
                _ = notified => {}
                _ = tokio::time::sleep(remaining.min(poll)) => {
                    // The wait ran out with no wake-up: answer empty; the
                    // worker's next call looks again.
                    if remaining <= poll {
                        return Ok(Response::new(LeaseResponse { leases: Vec::new(), revoked }));
                    }
                }
            }
        }
    }

    async fn complete(
        &self,
        req: Request<Streaming<CompleteMessage>>,
    ) -> Result<Response<CompleteResponse>, Status> {
        let caller = Caller::of(&req);
        caller.require_worker("completing tasks")?;
        let cert = ClientFingerprint::of(&req);
        let c = &self.0;
        let mut stream = req.into_inner();
        let mut uploads: Vec<Upload> = Vec::new();
        // Workers this call may complete for (normally the one).
        let mut drives: Vec<String> = Vec::new();
        let mut call_bytes = 0u64;
        while let Some(msg) = stream.message().await? {
            match msg.body {
                Some(Body::Header(h)) => {
                    if uploads.len() >= MAX_UPLOADS_PER_CALL {
                        return Err(Status::invalid_argument(format!(
                            "more than {MAX_UPLOADS_PER_CALL} uploads in one call"
                        )));
                    }
                    if h.size > MAX_UPLOAD {
                        return Err(Status::invalid_argument(format!(
                            "upload of {} bytes is over the limit",
                            h.size
                        )));
                    }
                    if !drives.contains(&h.worker_id) {
                        c.check_worker_caller(&caller, &cert, &h.worker_id).await?;
                        drives.push(h.worker_id.clone());
                    }
                    // Refuse a stale lease before taking a large upload; a small
                    // one is checked when it is recorded (one statement less).
                    if h.size > EARLY_CHECK_BYTES {
                        c.store
                            .check_lease(&h.worker_id, &h.task_id, h.fencing_token)
                            .await
                            .inspect_err(count_stale)
                            .map_err(status)?;
                    }
                    uploads.push(Upload {
                        writer: c.blobs.writer(MAX_UPLOAD),
                        body: Vec::with_capacity(h.size.min(EARLY_CHECK_BYTES) as usize),
                        header: h,
                    });
                }
                Some(Body::Data(data)) => {
                    let u = uploads.last_mut().ok_or_else(|| {
                        Status::invalid_argument("the first message of Complete must be a header")
                    })?;
                    call_bytes += data.len() as u64;
                    if (u.body.len() + data.len()) as u64 > MAX_UPLOAD
                        || call_bytes > MAX_CALL_BYTES
                    {
                        return Err(Status::invalid_argument(
                            "upload is over the limit (per image or per call)",
                        ));
                    }
                    u.body.extend_from_slice(&data);
                    u.writer.write(&data).await.map_err(blob_status)?;
                }
                None => return Err(Status::invalid_argument("empty Complete message")),
            }
        }
        if uploads.is_empty() {
            return Err(Status::invalid_argument("Complete carried no upload"));
        }

        // Publish the blobs; an upload that is wrong is a failed attempt of its task.
        let mut outcomes: Vec<CompleteOutcome> = Vec::with_capacity(uploads.len());
        let mut completions = Vec::with_capacity(uploads.len());
        for u in uploads {
            let task_id = u.header.task_id.clone();
            match u.publish(&c.stamps).await {
                Ok(completion) => {
                    outcomes.push(CompleteOutcome {
                        task_id,
                        artifact_sha256: completion.sha256.clone(),
                        ..Default::default()
                    });
                    completions.push(completion);
                }
                Err(message) => {
                    metrics::counter!(m::UPLOADS_REFUSED, "reason" => "rejected").increment(1);
                    outcomes.push(CompleteOutcome {
                        task_id,
                        kind: Kind::Rejected as i32,
                        message,
                        ..Default::default()
                    })
                }
            }
        }
        let single = outcomes.len() == 1;
        if single && outcomes[0].kind == Kind::Rejected as i32 {
            return Err(Status::invalid_argument(outcomes.remove(0).message));
        }
        let recording = Instant::now();
        let results = c
            .store
            .complete_many(&completions, now_ms())
            .await
            .map_err(status)?;
        metrics::histogram!(m::COMPLETE_SECONDS).record(recording.elapsed());
        let mut readied = false;
        let mut jobs = std::collections::BTreeSet::new();
        let mut results = results.into_iter().zip(&completions);
        for o in outcomes
            .iter_mut()
            .filter(|o| o.kind == Kind::Recorded as i32)
        {
            match results.next() {
                Some((Ok((job_id, r)), recorded)) => {
                    metrics::counter!(m::ARTIFACTS_RECORDED).increment(1);
                    metrics::counter!(m::UPLOAD_BYTES).increment(recorded.size);
                    readied |= r;
                    jobs.insert(job_id);
                }
                Some((Err(e), _)) => {
                    count_stale(&e);
                    if single {
                        return Err(status(e));
                    }
                    o.kind = Kind::Stale as i32;
                    o.message = e.to_string();
                    o.artifact_sha256.clear();
                }
                None => {
                    return Err(Status::internal(
                        "completion results out of step with uploads",
                    ));
                }
            }
        }
        if readied {
            c.notifier.tasks_ready();
        }
        for job_id in &jobs {
            c.notifier.job_changed(job_id);
        }
        let artifact_sha256 = if single {
            outcomes[0].artifact_sha256.clone()
        } else {
            String::new()
        };
        Ok(Response::new(CompleteResponse {
            artifact_sha256,
            outcomes,
        }))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailResponse>, Status> {
        let caller = Caller::of(&req);
        caller.require_worker("failing tasks")?;
        let cert = ClientFingerprint::of(&req);
        let c = &self.0;
        let r = req.into_inner();
        c.check_worker_caller(&caller, &cert, &r.worker_id).await?;
        let message: String = r.message.chars().take(2000).collect();
        let out = c
            .store
            .fail(
                &r.worker_id,
                &r.task_id,
                r.fencing_token,
                &message,
                match (r.hand_back, r.for_good) {
                    (true, _) => AttemptEnd::HandedBack,
                    (false, true) => AttemptEnd::FailedForGood,
                    (false, false) => AttemptEnd::Failed,
                },
                now_ms(),
            )
            .await
            .map_err(status)?;
        tracing::info!(task_id = %r.task_id, worker_id = %r.worker_id, hand_back = r.hand_back, for_good = r.for_good, state = %out.state, "task attempt ended without a result");
        let outcome = match (r.hand_back, out.state.as_str()) {
            (true, _) => "handed_back",
            (false, "ready") => "retry",
            (false, _) => "failed",
        };
        metrics::counter!(m::ATTEMPTS_FAILED, "outcome" => outcome).increment(1);
        if out.state == "ready" {
            c.notifier.tasks_ready();
        }
        c.notifier.job_changed(&out.job_id);
        Ok(Response::new(FailResponse {}))
    }

    type FetchArtifactStream = ReceiverStream<Result<Chunk, Status>>;

    async fn fetch_artifact(
        &self,
        req: Request<DownloadArtifactRequest>,
    ) -> Result<Response<Self::FetchArtifactStream>, Status> {
        let caller = Caller::of(&req);
        caller.require_worker("fetching a base image")?;
        let sha256 = req.into_inner().sha256;
        // A worker token fetches only what its workers' leases start from:
        // not other tenants' outputs or inputs by their (public) hashes.
        if let Caller::Worker(_) = caller {
            let principal = caller.name();
            if !self
                .0
                .store
                .base_image_leased_to(&sha256, &principal)
                .await
                .map_err(status)?
            {
                return Err(Status::not_found(format!(
                    "no task leased to {principal}'s workers starts from image {sha256}"
                )));
            }
        }
        Ok(Response::new(self.0.stream_blob(&sha256).await?))
    }

    async fn list_workers(
        &self,
        req: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        Caller::of(&req).require_operator("listing workers")?;
        let workers = self
            .0
            .store
            .list_workers(self.0.live_since(now_ms()))
            .await
            .map_err(status)?;
        Ok(Response::new(ListWorkersResponse { workers }))
    }
}

/// Counts an upload the store refused for its lease (not a database error).
fn count_stale(e: &StoreError) {
    if matches!(e, StoreError::Refused(_) | StoreError::NotFound(_)) {
        metrics::counter!(m::UPLOADS_REFUSED, "reason" => "stale").increment(1);
    }
}

/// One upload of a Complete call: its header, the bytes so far, the first bytes.
struct Upload {
    header: CompleteHeader,
    writer: BlobWriter,
    /// The bytes, kept for the stamp check (images are small next to the
    /// upload limit; the blob store gets them as they arrive).
    body: Vec<u8>,
}

impl Upload {
    /// Checks the format, the stamp and the hash and stores the blob; the
    /// completion to record.
    async fn publish(self, stamps: &Arc<StampCheck>) -> Result<Completion, String> {
        let h = self.header;
        let magic: &[u8] = match h.media_type.as_str() {
            "image/png" => b"\x89PNG\r\n\x1a\n",
            "image/jpeg" => b"\xff\xd8\xff",
            "image/webp" => b"RIFF",
            other => return Err(format!("unsupported media type {other:?}")),
        };
        if !self.body.starts_with(magic) {
            return Err(format!("upload is not a {} file", h.media_type));
        }
        let (check, body, task_id, declared) = (
            stamps.clone(),
            self.body,
            h.task_id.clone(),
            h.watermark_id.clone(),
        );
        let stamp = tokio::task::spawn_blocking(move || check.check(&body, &task_id, &declared))
            .await
            .map_err(|e| format!("stamp check panicked: {e}"))??;
        let sha256 = self
            .writer
            .finish(&h.sha256, h.size)
            .await
            .map_err(|e| e.to_string())?;
        Ok(Completion {
            worker_id: h.worker_id,
            task_id: h.task_id,
            fencing_token: h.fencing_token,
            sha256,
            size: h.size,
            media_type: h.media_type,
            width: h.width,
            height: h.height,
            stamp,
        })
    }
}
