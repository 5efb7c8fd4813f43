//! `hallmark.v1.Workers`: registration, the lease/heartbeat call, uploads and failures.

use std::pin::pin;
use std::sync::Arc;
use std::time::Duration;

use hallmark_proto::v1::complete_message::Body;
use hallmark_proto::v1::workers_server::Workers;
use hallmark_proto::v1::{
    Chunk, CompleteMessage, CompleteResponse, DownloadArtifactRequest, FailRequest, FailResponse,
    LeaseRequest, LeaseResponse, ListWorkersRequest, ListWorkersResponse, RegisterWorkerRequest,
    RegisterWorkerResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{Coordinator, blob_status, status};
use crate::spec::ENGINES;
use crate::store::{Completion, now_ms};

/// Largest upload a worker may send (one image).
const MAX_UPLOAD: u64 = 256 * 1024 * 1024;
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
        self.0
            .store
            .register_worker(
                &worker_id,
                &name,
                &r.hostname,
                &r.engines,
                &models,
                r.max_pixels,
                r.max_batch,
                now_ms(),
            )
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
        let c = &self.0;
        let r = req.into_inner();
        let now = now_ms();
        let caps = c.seen_worker(&r.worker_id, &r.loaded_model, now).await?;
        let held: Vec<(String, i64)> = r
            .held
            .iter()
            .map(|h| (h.task_id.clone(), h.fencing_token))
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
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if !leases.is_empty() || r.want == 0 || remaining.is_zero() {
                if let Some(first) = leases.first() {
                    tracing::debug!(worker_id = %r.worker_id, job_id = %first.job_id, n = leases.len(), "leased");
                    c.notifier.job_changed(&first.job_id);
                }
                return Ok(Response::new(LeaseResponse { leases, revoked }));
            }
            tokio::select! {
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
        let c = &self.0;
        let mut stream = req.into_inner();
        let header = match stream.message().await?.and_then(|m| m.body) {
            Some(Body::Header(h)) => h,
            _ => {
                return Err(Status::invalid_argument(
                    "the first message of Complete must be the header",
                ));
            }
        };
        if header.size > MAX_UPLOAD {
            return Err(Status::invalid_argument(format!(
                "upload of {} bytes is over the limit",
                header.size
            )));
        }
        let magic: &[u8] = match header.media_type.as_str() {
            "image/png" => b"\x89PNG\r\n\x1a\n",
            "image/jpeg" => b"\xff\xd8\xff",
            "image/webp" => b"RIFF",
            other => {
                return Err(Status::invalid_argument(format!(
                    "unsupported media type {other:?}"
                )));
            }
        };
        // Refuse a stale lease before taking a large upload; a small one is
        // checked only when it is recorded (one statement less per task).
        if header.size > EARLY_CHECK_BYTES {
            c.store
                .check_lease(&header.worker_id, &header.task_id, header.fencing_token)
                .await
                .map_err(status)?;
        }
        let mut writer = c.blobs.writer(MAX_UPLOAD);
        let mut head = Vec::with_capacity(16);
        while let Some(msg) = stream.message().await? {
            match msg.body {
                Some(Body::Data(data)) => {
                    if head.len() < 16 {
                        head.extend_from_slice(&data[..data.len().min(16 - head.len())]);
                    }
                    writer.write(&data).await.map_err(blob_status)?;
                }
                _ => {
                    return Err(Status::invalid_argument(
                        "only data chunks may follow the header",
                    ));
                }
            }
        }
        if !head.starts_with(magic) {
            return Err(Status::invalid_argument(format!(
                "upload is not a {} file",
                header.media_type
            )));
        }
        let sha256 = writer
            .finish(&header.sha256, header.size)
            .await
            .map_err(blob_status)?;
        let completion = Completion {
            worker_id: header.worker_id,
            task_id: header.task_id,
            fencing_token: header.fencing_token,
            sha256: sha256.clone(),
            size: header.size,
            media_type: header.media_type,
            width: header.width,
            height: header.height,
        };
        let (job_id, readied) = c
            .store
            .complete(&completion, now_ms())
            .await
            .map_err(status)?;
        if readied {
            c.notifier.tasks_ready();
        }
        c.notifier.job_changed(&job_id);
        Ok(Response::new(CompleteResponse {
            artifact_sha256: sha256,
        }))
    }

    async fn fail(&self, req: Request<FailRequest>) -> Result<Response<FailResponse>, Status> {
        let c = &self.0;
        let r = req.into_inner();
        let message: String = r.message.chars().take(2000).collect();
        let out = c
            .store
            .fail(
                &r.worker_id,
                &r.task_id,
                r.fencing_token,
                &message,
                r.hand_back,
                now_ms(),
            )
            .await
            .map_err(status)?;
        tracing::info!(task_id = %r.task_id, worker_id = %r.worker_id, hand_back = r.hand_back, state = %out.state, "task attempt ended without a result");
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
        Ok(Response::new(
            self.0.stream_blob(&req.into_inner().sha256).await?,
        ))
    }

    async fn list_workers(
        &self,
        _: Request<ListWorkersRequest>,
    ) -> Result<Response<ListWorkersResponse>, Status> {
        let workers = self
            .0
            .store
            .list_workers(self.0.live_since(now_ms()))
            .await
            .map_err(status)?;
        Ok(Response::new(ListWorkersResponse { workers }))
    }
}
