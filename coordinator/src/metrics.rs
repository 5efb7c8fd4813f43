//! The coordinator's metrics, exported for Prometheus on `metrics_listen`.
//!
//! Counters and histograms count what this replica did. The census gauges
//! (`hallmark_tasks`, `hallmark_jobs`, `hallmark_workers_live`,
//! `hallmark_audit_unsealed_entries`) are read from the database before each
//! scrape, so every replica reports the same farm-wide figures: aggregate
//! them with `max`, the counters with `sum`. `hallmark_tasks{state="ready"}`
//! by model is the signal to scale a model's workers on.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use hallmark_telemetry::Refresh;
use metrics::{Unit, describe_counter, describe_gauge, describe_histogram, gauge};

use crate::service::Coordinator;
use crate::store::{Census, now_ms};

pub const JOBS_SUBMITTED: &str = "hallmark_jobs_submitted_total";
pub const SUBMITS_RATE_LIMITED: &str = "hallmark_submits_rate_limited_total";
pub const UPLOADS_RATE_LIMITED: &str = "hallmark_uploads_rate_limited_total";
pub const API_RATE_LIMITED: &str = "hallmark_http_api_rate_limited_total";
pub const INPUTS_PURGED: &str = "hallmark_inputs_purged_total";
pub const TASKS_SUBMITTED: &str = "hallmark_tasks_submitted_total";
pub const JOBS_FINISHED: &str = "hallmark_jobs_finished_total";
pub const TASKS_LEASED: &str = "hallmark_tasks_leased_total";
pub const LEASE_SECONDS: &str = "hallmark_store_lease_seconds";
pub const ARTIFACTS_RECORDED: &str = "hallmark_artifacts_recorded_total";
pub const UPLOAD_BYTES: &str = "hallmark_upload_bytes_total";
pub const UPLOADS_REFUSED: &str = "hallmark_uploads_refused_total";
pub const COMPLETE_SECONDS: &str = "hallmark_store_complete_seconds";
pub const ATTEMPTS_FAILED: &str = "hallmark_task_attempts_failed_total";
pub const LEASES_EXPIRED: &str = "hallmark_leases_expired_total";
pub const AUDIT_SEALED: &str = "hallmark_audit_entries_sealed_total";
pub const AUDIT_CHECKPOINTS: &str = "hallmark_audit_checkpoints_signed_total";
pub const AUDIT_CHECKPOINT_REFUSALS: &str = "hallmark_audit_checkpoint_refusals_total";
pub const TOKEN_EXPIRY: &str = "hallmark_auth_token_expiry_timestamp_seconds";
pub const TASKS: &str = "hallmark_tasks";
pub const TENANT_TASKS: &str = "hallmark_tenant_tasks";
pub const JOBS: &str = "hallmark_jobs";
pub const WORKERS_LIVE: &str = "hallmark_workers_live";
pub const MODEL_WORKERS_LIVE: &str = "hallmark_model_workers_live";
pub const AUDIT_UNSEALED: &str = "hallmark_audit_unsealed_entries";
pub const CENSUS_UP: &str = "hallmark_census_up";
pub const CENSUS_AGE: &str = "hallmark_census_age_seconds";
pub const GRPC_REQUESTS: &str = "hallmark_grpc_requests_total";
pub const GRPC_SECONDS: &str = "hallmark_grpc_request_seconds";

/// Gives every metric its help text (call once the recorder is installed).
pub fn describe() {
    describe_counter!(JOBS_SUBMITTED, "Jobs accepted, by tenant.");
    describe_counter!(
        SUBMITS_RATE_LIMITED,
        "Jobs refused by the tenant's submission rate limit, by tenant."
    );
    describe_counter!(
        UPLOADS_RATE_LIMITED,
        "Input uploads refused by the tenant's upload rate limit, by tenant."
    );
    describe_counter!(
        API_RATE_LIMITED,
        "Soft-binding HTTP API requests refused by the per-client rate limit (http_requests_per_minute)."
    );
    describe_counter!(
        INPUTS_PURGED,
        "Input images purged by this replica after input_retention_ms unused."
    );
    describe_counter!(TASKS_SUBMITTED, "Tasks created by accepted jobs.");
    describe_counter!(
        JOBS_FINISHED,
        "Jobs closed by this replica's reaper, by final state."
    );
    describe_counter!(TASKS_LEASED, "Tasks leased to workers, by stage.");
    describe_histogram!(
        LEASE_SECONDS,
        Unit::Seconds,
        "Time of the store's lease statement, per look at the queue (empty ones too)."
    );
    describe_counter!(
        ARTIFACTS_RECORDED,
        "Uploads recorded as artifacts (stamp checked, lease current)."
    );
    describe_counter!(UPLOAD_BYTES, Unit::Bytes, "Bytes of recorded artifacts.");
    describe_counter!(
        UPLOADS_REFUSED,
        "Uploads not recorded, by reason: rejected (format, stamp or hash) or stale (the lease was no longer the worker's)."
    );
    describe_histogram!(
        COMPLETE_SECONDS,
        Unit::Seconds,
        "Time of the store transaction that records one Complete call's artifacts."
    );
    describe_counter!(
        ATTEMPTS_FAILED,
        "Task attempts a worker ended without a result, by outcome: retry, failed (budget spent) or handed_back."
    );
    describe_counter!(
        LEASES_EXPIRED,
        "Leases that ran out without a heartbeat, by outcome: requeued or failed."
    );
    describe_counter!(
        AUDIT_SEALED,
        "Audit ledger entries sealed into the hash chain by this replica."
    );
    describe_counter!(
        AUDIT_CHECKPOINTS,
        "Audit ledger checkpoints (the chain's head) this replica signed."
    );
    describe_counter!(
        AUDIT_CHECKPOINT_REFUSALS,
        "Times this replica did not sign a due ledger checkpoint: the chain does not run on from the last checkpoint (rewritten?), no stored checkpoint is its deployment's, or signing failed."
    );
    describe_gauge!(
        TOKEN_EXPIRY,
        Unit::Seconds,
        "When the first of each role's expiring tokens expires (Unix time); +Inf once the role has none."
    );
    describe_gauge!(
        TASKS,
        "Open tasks of running and paused jobs, by state (waiting, ready, held, leased), stage, engine and model. Farm-wide."
    );
    describe_gauge!(
        TENANT_TASKS,
        "Open tasks of running and paused jobs, by tenant and state: each tenant's queue. Farm-wide."
    );
    describe_gauge!(JOBS, "Open jobs, by state (running, paused). Farm-wide.");
    describe_gauge!(
        WORKERS_LIVE,
        "Workers seen within worker_timeout_ms. Farm-wide."
    );
    describe_gauge!(
        MODEL_WORKERS_LIVE,
        "Live workers serving each engine and model (a worker counts for every model it serves). Farm-wide."
    );
    describe_gauge!(
        AUDIT_UNSEALED,
        "Audit ledger entries not yet sealed into the chain. Farm-wide."
    );
    describe_counter!(
        GRPC_REQUESTS,
        "gRPC calls served, by method and status code."
    );
    describe_histogram!(
        GRPC_SECONDS,
        Unit::Seconds,
        "gRPC call time by method, until the response ends (a stream's whole life; a lease call's long poll)."
    );
    describe_gauge!(
        CENSUS_UP,
        "1 when the last scrape could read the census from the database, else 0."
    );
    describe_gauge!(
        CENSUS_AGE,
        Unit::Seconds,
        "Age of the census gauges: 0 when this scrape read them from the database, else how long ago a scrape did (they are served again for census_max_age_ms)."
    );
}

/// The label sets the census gauges have reported so far, by metric: once
/// seen, a set is reported as 0 when it is gone (a drained queue, a model
/// whose last worker left), so it reads 0 instead of keeping its last value
/// or vanishing.
#[derive(Default)]
pub struct CensusLabels(Mutex<BTreeSet<Series>>);

/// One gauge series: the metric and its label pairs.
type Series = (&'static str, Vec<(&'static str, String)>);

impl CensusLabels {
    /// Sets the census gauges from `census`.
    pub fn publish(&self, census: &Census) {
        let Ok(mut reported) = self.0.lock() else {
            return;
        };
        let mut now: BTreeMap<Series, u64> = BTreeMap::new();
        for t in &census.tasks {
            let labels = vec![
                ("state", t.state.clone()),
                ("stage", t.stage.clone()),
                ("engine", t.engine.clone()),
                ("model", t.model_id.clone()),
            ];
            *now.entry((TASKS, labels)).or_default() += t.count;
            let labels = vec![("tenant", t.tenant.clone()), ("state", t.state.clone())];
            *now.entry((TENANT_TASKS, labels)).or_default() += t.count;
        }
        for m in &census.model_workers {
            let labels = vec![("engine", m.engine.clone()), ("model", m.model_id.clone())];
            now.insert((MODEL_WORKERS_LIVE, labels), m.live);
        }
        reported.extend(now.keys().cloned());
        for key in reported.iter() {
            let value = now.get(key).copied().unwrap_or(0);
            let (metric, labels) = key;
            let labels: Vec<metrics::Label> = labels
                .iter()
                .map(|(k, v)| metrics::Label::new(*k, v.clone()))
                .collect();
            gauge!(*metric, labels).set(value as f64);
        }
        gauge!(JOBS, "state" => "running").set(census.running_jobs as f64);
        gauge!(JOBS, "state" => "paused").set(census.paused_jobs as f64);
        gauge!(WORKERS_LIVE).set(census.live_workers as f64);
        gauge!(AUDIT_UNSEALED).set(census.unsealed_audit_entries as f64);
    }
}

impl Refresh for Coordinator {
    fn refresh(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let mut read = self.census_read.lock().await;
            let max_age = Duration::from_millis(self.config.census_max_age_ms);
            if let Some(at) = *read
                && at.elapsed() < max_age
            {
                gauge!(CENSUS_AGE).set(at.elapsed().as_secs_f64());
                return;
            }
            match self.store.census(self.live_since(now_ms())).await {
                Ok(census) => {
                    self.census_labels.publish(&census);
                    gauge!(CENSUS_UP).set(1.0);
                    gauge!(CENSUS_AGE).set(0.0);
                    *read = Some(Instant::now());
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the census for metrics");
                    gauge!(CENSUS_UP).set(0.0);
                }
            }
        })
    }
}

/// Counts and times every gRPC call by method and status code, as a tower
/// layer on the server: `hallmark_grpc_requests_total{method,code}` and
/// `hallmark_grpc_request_seconds{method}` (until the response ends, so a
/// stream's whole life). The status comes from the response headers for an
/// error answered at once, else from the trailers that end the body.
/// Disabled (no `metrics_listen`), it passes calls through unmeasured.
#[derive(Debug, Clone, Copy, Default)]
pub struct GrpcMetricsLayer {
    pub enabled: bool,
}

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics {
            inner,
            enabled: self.enabled,
        }
    }
}

/// The service [`GrpcMetricsLayer`] wraps around the gRPC routes.
#[derive(Debug, Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
    enabled: bool,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<ObservedBody<ResBody>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        let mut call = self.enabled.then(|| GrpcCall {
            method: request.uri().path().to_string(),
            started: std::time::Instant::now(),
            ended: false,
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            if let (Some(call), Some(code)) = (call.as_mut(), grpc_status(response.headers())) {
                call.end(code);
            }
            let (parts, body) = response.into_parts();
            Ok(http::Response::from_parts(
                parts,
                ObservedBody { body, call },
            ))
        })
    }
}

/// One call being measured; recorded once, when its status is known (or,
/// failing that, when the response is dropped: `Cancelled`).
struct GrpcCall {
    method: String,
    started: std::time::Instant,
    ended: bool,
}

impl GrpcCall {
    fn end(&mut self, code: tonic::Code) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        metrics::counter!(GRPC_REQUESTS, "method" => self.method.clone(), "code" => format!("{code:?}"))
            .increment(1);
        metrics::histogram!(GRPC_SECONDS, "method" => self.method.clone())
            .record(self.started.elapsed());
    }
}

impl Drop for GrpcCall {
    fn drop(&mut self) {
        self.end(tonic::Code::Cancelled);
    }
}

fn grpc_status(headers: &http::HeaderMap) -> Option<tonic::Code> {
    let value = headers
        .get("grpc-status")?
        .to_str()
        .ok()?
        .parse::<i32>()
        .ok()?;
    Some(tonic::Code::from_i32(value))
}

/// A response body that records its call's status from the trailers.
pub struct ObservedBody<B> {
    body: B,
    call: Option<GrpcCall>,
}

impl<B: http_body::Body + Unpin> http_body::Body for ObservedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = std::pin::Pin::new(&mut self.body).poll_frame(cx);
        let Some(call) = self.call.as_mut() else {
            return polled;
        };
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(grpc_status) {
                    call.end(code);
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => call.end(tonic::Code::Internal),
            std::task::Poll::Ready(None) => call.end(tonic::Code::Unknown),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
