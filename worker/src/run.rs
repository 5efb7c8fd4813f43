//! The lease loop: register, lease (which is also the heartbeat), render,
//! stamp, upload, repeat; reconnect with back-off; drain on shutdown.
//!
//! Batches are pipelined: once the engine is done with a batch, the worker
//! leases the next one and renders it while the last one's outputs are
//! stamped (in parallel, one image per thread) and uploaded, so the device
//! does not wait on the CPU's share. At most
//! [`WorkerConfig::batches_in_hand`] batches are in hand (two by default),
//! and only one of them renders.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hallmark_proto::client::{AuthChannel, BearerToken, hostname};
use hallmark_proto::v1::complete_message::Body;
use hallmark_proto::v1::complete_outcome::Kind;
use hallmark_proto::v1::registry_client::RegistryClient;
use hallmark_proto::v1::workers_client::WorkersClient;
use hallmark_proto::v1::{
    CompleteHeader, CompleteMessage, DownloadArtifactRequest, FailRequest, HeldLease, LeaseRequest,
    ListModelsRequest, RegisterWorkerRequest, RegisterWorkerResponse, TaskLease,
};
use rayon::prelude::*;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::engine::{Engine, RenderTask};
use crate::metrics as m;
use crate::stamp::{ModelFacts, StampedImage, Stamping};

const UPLOAD_CHUNK: usize = 256 * 1024;

/// Settings of one worker.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How outputs are watermarked and signed: nothing leaves unstamped.
    pub stamping: Arc<Stamping>,
    /// Name shown in `hallmark workers`.
    pub name: String,
    /// Largest output (width × height) this worker can hold.
    pub max_pixels: u64,
    /// Most tasks rendered together as one batch.
    pub max_batch: u32,
    /// How long one lease call may wait for work.
    pub lease_wait: Duration,
    /// On shutdown, how long to finish held work before handing it back.
    pub drain_timeout: Duration,
    /// Token presented to a coordinator with `auth = "tokens"` (a
    /// `worker` role's).
    pub token: Option<String>,
    /// Threads that stamp a batch's outputs side by side (watermark,
    /// encode, sign are per image and CPU-bound).
    pub stamp_threads: usize,
    /// Batches held at once: 2 renders the next while the last is stamped
    /// and uploaded; 1 does one thing at a time.
    pub batches_in_hand: usize,
}

impl WorkerConfig {
    /// Defaults for everything but the stamping identity.
    pub fn new(stamping: Arc<Stamping>) -> Self {
        Self {
            stamping,
            name: String::new(),
            max_pixels: 4096 * 4096,
            max_batch: 4,
            lease_wait: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(30),
            token: None,
            stamp_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            batches_in_hand: 2,
        }
    }
}

/// What a worker did before it stopped.
#[derive(Debug, Clone, Default)]
pub struct WorkerReport {
    pub worker_id: String,
    pub completed: u64,
    pub failed: u64,
    pub dropped: u64,
    pub handed_back: u64,
}

/// A lease this worker believes it holds.
struct HeldTask {
    fencing_token: i64,
    /// Fraction done of its batch's render, as f32 bits (shared by the
    /// batch; 1 once rendered).
    progress: Arc<AtomicU32>,
}

/// Leases this worker believes it holds, by task id.
type Held = Arc<Mutex<HashMap<String, HeldTask>>>;

/// A batch in hand.
struct InFlight {
    handle: JoinHandle<()>,
    /// Set once the engine is done with it (the device is free).
    rendered: Arc<AtomicBool>,
    /// Set as its task ends, before it wakes the loop: the handle itself
    /// reads finished only a moment after the wake-up.
    done: Arc<AtomicBool>,
}

/// Whether the loop should ask for no work: a batch renders, or the
/// pipeline is full.
fn pipeline_busy(in_flight: &[InFlight], in_hand: usize) -> bool {
    in_flight.iter().any(InFlight::rendering) || in_flight.len() >= in_hand
}

impl InFlight {
    fn ended(&self) -> bool {
        self.done.load(Ordering::Acquire) || self.handle.is_finished()
    }

    fn rendering(&self) -> bool {
        !self.rendered.load(Ordering::Acquire) && !self.ended()
    }
}

struct Shared {
    client: WorkersClient<AuthChannel>,
    registry: RegistryClient<AuthChannel>,
    engine: Arc<dyn Engine>,
    stamping: Arc<Stamping>,
    /// Weights digest and training datasets per model, from the registry.
    models: tokio::sync::Mutex<HashMap<String, ModelFacts>>,
    worker_id: String,
    held: Held,
    /// Woken when a batch in hand is rendered or ends.
    changed: tokio::sync::Notify,
    /// `stamp_threads` threads that stamp a batch's outputs side by side.
    stamp_pool: Arc<rayon::ThreadPool>,
    report: Mutex<WorkerReport>,
}

/// Why the coordinator turned this worker away, with what to do about it.
fn refused_credentials(status: &tonic::Status) -> String {
    let hint = if status.message().contains("client certificate") {
        "issue it a new client certificate (--tls-cert, --tls-key)"
    } else {
        "set HALLMARK_TOKEN to a worker token: `hallmark token new --role worker`"
    };
    format!(
        "the coordinator no longer accepts this worker's credentials: {} ({hint})",
        status.message()
    )
}

/// Connects lazily to the coordinator at `url` (reconnecting by itself);
/// an `https://` one over TLS as `tls` says.
pub fn channel(url: &str, tls: &hallmark_proto::client::ClientTls) -> anyhow::Result<Channel> {
    Ok(hallmark_proto::client::endpoint(url, tls)
        .map_err(anyhow::Error::msg)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .connect_lazy())
}

/// Runs the worker until `shutdown` resolves, then drains: held work is
/// finished within `drain_timeout` or handed back.
pub async fn run(
    channel: Channel,
    config: WorkerConfig,
    engine: Arc<dyn Engine>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<WorkerReport> {
    let channel = BearerToken::new(config.token.as_deref())
        .map_err(|e| anyhow::anyhow!("worker token: {e}"))?
        .on(channel);
    let mut client =
        WorkersClient::new(channel.clone()).max_decoding_message_size(64 * 1024 * 1024);
    let registry = RegistryClient::new(channel);
    let mut shutdown = std::pin::pin!(shutdown);
    let Some(registered) =
        register(&mut client, &config, engine.as_ref(), shutdown.as_mut()).await?
    else {
        return Ok(WorkerReport::default());
    };
    let worker_id = registered.worker_id;
    // Heartbeats (lease calls with nothing wanted) while a batch renders.
    let heartbeat = Duration::from_millis(u64::from(registered.heartbeat_interval_ms).max(100));
    tracing::info!(worker_id = %worker_id, engine = engine.name(), "worker registered");
    let stamp_pool = Arc::new(
        rayon::ThreadPoolBuilder::new()
            .num_threads(config.stamp_threads.max(1))
            .thread_name(|i| format!("stamp-{i}"))
            .build()
            .map_err(|e| anyhow::anyhow!("starting the stamping threads: {e}"))?,
    );
    // What the batches share; made again, with a fresh registration's
    // id, when the coordinator forgets this worker.
    let batch_client = client.clone();
    let share = |report: WorkerReport| {
        Arc::new(Shared {
            client: batch_client.clone(),
            registry: registry.clone(),
            engine: engine.clone(),
            stamping: config.stamping.clone(),
            models: Default::default(),
            worker_id: report.worker_id.clone(),
            held: Arc::new(Mutex::new(HashMap::new())),
            changed: tokio::sync::Notify::new(),
            stamp_pool: stamp_pool.clone(),
            report: Mutex::new(report),
        })
    };
    let mut shared = share(WorkerReport {
        worker_id,
        ..Default::default()
    });

    let mut in_flight: Vec<InFlight> = Vec::new();
    let in_hand = config.batches_in_hand.max(1);
    let mut backoff = Duration::from_millis(100);
    let mut draining = false;
    loop {
        in_flight.retain(|b| !b.ended());
        if draining {
            break;
        }
        // Wanting work while the device is free and the pipeline has room.
        let busy = pipeline_busy(&in_flight, in_hand);
        let request = LeaseRequest {
            worker_id: shared.worker_id.clone(),
            held: held_leases(&shared),
            want: if busy { 0 } else { config.max_batch },
            // A long poll while a batch is still in hand (stamping,
            // uploading) ends by the next heartbeat, which keeps its leases.
            wait_ms: if busy {
                0
            } else if in_flight.is_empty() {
                config.lease_wait.as_millis() as u32
            } else {
                config.lease_wait.min(heartbeat).as_millis() as u32
            },
            loaded_model: shared.engine.loaded_model(),
        };
        let mut c = shared.client.clone();
        let call = async move { c.lease(request).await };
        let reply = tokio::select! {
            r = call => r,
            _ = shutdown.as_mut() => { draining = true; continue; }
        };
        match reply {
            Ok(resp) => {
                backoff = Duration::from_millis(100);
                let resp = resp.into_inner();
                for r in resp.revoked {
                    if shared
                        .held
                        .lock()
                        .map(|mut h| h.remove(&r.task_id))
                        .ok()
                        .flatten()
                        .is_some()
                    {
                        tracing::info!(task_id = %r.task_id, reason = %r.reason, "lease revoked; dropping the work");
                        tally(&shared, Outcome::Dropped);
                    }
                }
                if !resp.leases.is_empty() {
                    let progress = Arc::new(AtomicU32::new(0f32.to_bits()));
                    if let Ok(mut h) = shared.held.lock() {
                        for l in &resp.leases {
                            h.insert(
                                l.task_id.clone(),
                                HeldTask {
                                    fencing_token: l.fencing_token,
                                    progress: progress.clone(),
                                },
                            );
                        }
                    }
                    let s = shared.clone();
                    let rendered = Arc::new(AtomicBool::new(false));
                    let done = Arc::new(AtomicBool::new(false));
                    let batch = Batch {
                        progress,
                        rendered: rendered.clone(),
                    };
                    metrics::histogram!(m::BATCH_TASKS).record(resp.leases.len() as f64);
                    let ended = done.clone();
                    let handle = tokio::spawn(async move {
                        let busy = Busy::start();
                        run_batch(s.clone(), resp.leases, batch).await;
                        drop(busy);
                        ended.store(true, Ordering::Release);
                        s.changed.notify_one();
                    });
                    in_flight.push(InFlight {
                        handle,
                        rendered,
                        done,
                    });
                }
            }
            Err(status) if status.code() == Code::NotFound => {
                tracing::warn!(error = %status.message(), "coordinator forgot this worker; registering again");
                let Some(RegisterWorkerResponse { worker_id: id, .. }) =
                    register(&mut client, &config, engine.as_ref(), shutdown.as_mut()).await?
                else {
                    draining = true;
                    continue;
                };
                // A new identity: leases of the old one are gone, so are the batches in hand.
                for b in in_flight.drain(..) {
                    b.handle.abort();
                }
                let report = shared.report.lock().map(|r| r.clone()).unwrap_or_default();
                shared = share(WorkerReport {
                    worker_id: id,
                    ..report
                });
            }
            Err(status) if status.code() == Code::Unauthenticated => {
                // Revoked or expired: nothing this worker holds can be
                // completed any more, and retrying changes nothing. Its
                // leases run out and go to other workers.
                for b in in_flight.drain(..) {
                    b.handle.abort();
                }
                anyhow::bail!("{}", refused_credentials(&status));
            }
            Err(status) => {
                metrics::counter!(m::LEASE_ERRORS).increment(1);
                tracing::warn!(code = ?status.code(), error = %status.message(), "lease call failed; backing off");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.as_mut() => draining = true,
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue;
            }
        }
        if pipeline_busy(&in_flight, in_hand) {
            // Heartbeat at the interval, or sooner when a batch is rendered
            // or ends (the device or a pipeline slot is free again).
            tokio::select! {
                _ = tokio::time::timeout(heartbeat, shared.changed.notified()) => {}
                _ = shutdown.as_mut() => draining = true,
            }
        }
    }

    // Drain: finish the batches in hand, with heartbeats, or hand them back.
    if !in_flight.is_empty() {
        tracing::info!(batches = in_flight.len(), "draining: finishing held work");
        let deadline = tokio::time::Instant::now() + config.drain_timeout;
        let aborts: Vec<_> = in_flight.iter().map(|b| b.handle.abort_handle()).collect();
        let mut all = std::pin::pin!(futures::future::join_all(
            in_flight.into_iter().map(|b| b.handle)
        ));
        loop {
            let mut c = shared.client.clone();
            let _ = c
                .lease(LeaseRequest {
                    worker_id: shared.worker_id.clone(),
                    held: held_leases(&shared),
                    want: 0,
                    wait_ms: 0,
                    loaded_model: shared.engine.loaded_model(),
                })
                .await;
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            if tokio::time::timeout(heartbeat.min(left), &mut all)
                .await
                .is_ok()
            {
                break;
            }
        }
        // What is left unfinished stops here (dropping a JoinHandle would
        // detach it) and is handed back below.
        for a in aborts {
            a.abort();
        }
    }
    let leftover: Vec<(String, i64)> = shared
        .held
        .lock()
        .map(|h| {
            h.iter()
                .map(|(k, v)| (k.clone(), v.fencing_token))
                .collect()
        })
        .unwrap_or_default();
    for (task_id, token) in leftover {
        let mut c = shared.client.clone();
        let r = c
            .fail(FailRequest {
                worker_id: shared.worker_id.clone(),
                task_id: task_id.clone(),
                fencing_token: token,
                message: "worker shutting down".into(),
                hand_back: true,
                for_good: false,
            })
            .await;
        if r.is_ok() {
            tally(&shared, Outcome::HandedBack);
        }
    }
    let report = shared.report.lock().map(|r| r.clone()).unwrap_or_default();
    tracing::info!(
        completed = report.completed,
        failed = report.failed,
        handed_back = report.handed_back,
        "worker stopped"
    );
    Ok(report)
}

/// Registers, retrying with back-off until the coordinator answers.
/// `None` when shutdown came first.
async fn register(
    client: &mut WorkersClient<AuthChannel>,
    config: &WorkerConfig,
    engine: &dyn Engine,
    mut shutdown: std::pin::Pin<&mut impl Future<Output = ()>>,
) -> anyhow::Result<Option<RegisterWorkerResponse>> {
    let request = RegisterWorkerRequest {
        name: config.name.clone(),
        hostname: hostname(),
        engines: vec![engine.name().to_string()],
        models: engine.models(),
        max_pixels: config.max_pixels,
        max_batch: config.max_batch,
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        let call = client.register(request.clone());
        let result = tokio::select! {
            r = call => r,
            _ = shutdown.as_mut() => return Ok(None),
        };
        match result {
            Ok(resp) => return Ok(Some(resp.into_inner())),
            Err(s) if matches!(s.code(), Code::InvalidArgument | Code::FailedPrecondition) => {
                anyhow::bail!("the coordinator refused this worker: {}", s.message())
            }
            Err(s) if matches!(s.code(), Code::Unauthenticated | Code::PermissionDenied) => {
                anyhow::bail!("{}", refused_credentials(&s))
            }
            Err(s) => {
                tracing::warn!(error = %s.message(), "cannot register yet; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = shutdown.as_mut() => return Ok(None),
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

fn held_leases(shared: &Shared) -> Vec<HeldLease> {
    shared
        .held
        .lock()
        .map(|h| {
            h.iter()
                .map(|(task_id, t)| HeldLease {
                    task_id: task_id.clone(),
                    fencing_token: t.fencing_token,
                    progress: f32::from_bits(t.progress.load(Ordering::Relaxed)),
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A batch in hand, counted in the busy gauge until it ends or is aborted.
struct Busy;

impl Busy {
    fn start() -> Self {
        metrics::gauge!(m::BUSY).increment(1.0);
        Busy
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        metrics::gauge!(m::BUSY).decrement(1.0);
    }
}

/// How a leased task ended on this worker.
#[derive(Clone, Copy)]
enum Outcome {
    Completed,
    Failed,
    Dropped,
    HandedBack,
}

/// Counts a task's end in the report and the metrics.
fn tally(shared: &Shared, outcome: Outcome) {
    let label = match outcome {
        Outcome::Completed => "completed",
        Outcome::Failed => "failed",
        Outcome::Dropped => "dropped",
        Outcome::HandedBack => "handed_back",
    };
    metrics::counter!(m::TASKS, "outcome" => label).increment(1);
    if let Ok(mut r) = shared.report.lock() {
        match outcome {
            Outcome::Completed => r.completed += 1,
            Outcome::Failed => r.failed += 1,
            Outcome::Dropped => r.dropped += 1,
            Outcome::HandedBack => r.handed_back += 1,
        }
    }
}

fn still_held(shared: &Shared, lease: &TaskLease) -> bool {
    shared
        .held
        .lock()
        .map(|h| h.get(&lease.task_id).map(|t| t.fencing_token) == Some(lease.fencing_token))
        .unwrap_or(false)
}

fn release(shared: &Shared, lease: &TaskLease) {
    if let Ok(mut h) = shared.held.lock() {
        h.remove(&lease.task_id);
    }
}

/// A task's stamped output, or why there is none (and whether for good).
type Stamped = Result<StampedImage, (String, bool)>;

/// What the lease loop and a batch's task share about the batch.
struct Batch {
    /// Fraction done of its render, as f32 bits.
    progress: Arc<AtomicU32>,
    /// Set once the engine is done with it.
    rendered: Arc<AtomicBool>,
}

/// The blob `sha256` (none when empty), fetched once per batch.
async fn fetch_once(
    shared: &Shared,
    fetched: &mut HashMap<String, Vec<u8>>,
    sha256: &str,
) -> Result<Option<Vec<u8>>, String> {
    if sha256.is_empty() {
        return Ok(None);
    }
    if let Some(bytes) = fetched.get(sha256) {
        return Ok(Some(bytes.clone()));
    }
    let bytes = fetch(&shared.client, sha256)
        .await
        .map_err(|e| e.to_string())?;
    fetched.insert(sha256.to_string(), bytes.clone());
    Ok(Some(bytes))
}

/// Renders one leased batch, stamps and uploads its outputs, and reports
/// every task's outcome.
async fn run_batch(shared: Arc<Shared>, leases: Vec<TaskLease>, batch: Batch) {
    let mut tasks = Vec::with_capacity(leases.len());
    let mut pending = Vec::new();
    // The tasks of an img2img batch share one init image (and an inpainting
    // batch one mask): each fetched once.
    let mut fetched: HashMap<String, Vec<u8>> = HashMap::new();
    for lease in leases {
        let parent = match fetch_once(&shared, &mut fetched, &lease.parent_sha256).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let what = if lease.stage == "generate" {
                    "init"
                } else {
                    "base"
                };
                pending.push((lease, format!("fetching the {what} image: {e}")));
                continue;
            }
        };
        match fetch_once(&shared, &mut fetched, &lease.mask_sha256).await {
            Ok(mask) => tasks.push(RenderTask {
                lease,
                parent,
                mask,
            }),
            Err(e) => pending.push((lease, format!("fetching the mask: {e}"))),
        }
    }
    for (lease, message) in pending {
        report_failure(&shared, &lease, &message).await;
    }
    if tasks.is_empty() {
        return;
    }
    let mut facts = Vec::with_capacity(tasks.len());
    for t in &tasks {
        match model_facts(&shared, &t.lease.model_id).await {
            Ok(f) => facts.push(f),
            Err(e) => {
                for t in &tasks {
                    report_failure(&shared, &t.lease, &e).await;
                }
                return;
            }
        }
    }
    let engine = shared.engine.clone();
    let render_input = tasks.clone();
    let progress = batch.progress.clone();
    let report = move |p: f32| progress.store(p.to_bits(), Ordering::Relaxed);
    let render = move || {
        let started = Instant::now();
        let rendered = engine.render(&render_input, &report);
        if let Some(first) = render_input.first() {
            metrics::histogram!(m::RENDER_SECONDS, "engine" => engine.name().to_string(), "stage" => first.lease.stage.clone())
                .record(started.elapsed());
        }
        (render_input, rendered)
    };
    let rendered = tokio::task::spawn_blocking(render).await;
    // The device is free: the loop may lease the next batch while this
    // one's outputs are stamped and uploaded.
    batch.progress.store(1f32.to_bits(), Ordering::Relaxed);
    batch.rendered.store(true, Ordering::Release);
    shared.changed.notify_one();
    let (inputs, rendered) = match rendered {
        Ok(r) => r,
        Err(e) => {
            for t in &tasks {
                report_failure(&shared, &t.lease, &format!("engine panicked: {e}")).await;
            }
            return;
        }
    };
    let stamping = shared.stamping.clone();
    let worker_id = shared.worker_id.clone();
    let pool = shared.stamp_pool.clone();
    // Watermark, encode and sign each output, side by side on the pool.
    let stamp = move || {
        pool.install(|| {
            inputs
                .par_iter()
                .zip(rendered)
                .zip(facts.par_iter())
                .map(|((task, result), facts)| -> Stamped {
                    let image = result
                        .and_then(|image| task.finish(image))
                        .map_err(|e| (e.to_string(), e.is_final()))?;
                    let started = Instant::now();
                    let stamped = stamping
                        .stamp(
                            &task.lease,
                            &worker_id,
                            facts,
                            &image,
                            task.parent.as_deref(),
                            task.mask.as_deref(),
                        )
                        .map_err(|e| (format!("stamping the output: {e}"), false));
                    metrics::histogram!(m::STAMP_SECONDS).record(started.elapsed());
                    stamped
                })
                .collect::<Vec<_>>()
        })
    };
    let results = match tokio::task::spawn_blocking(stamp).await {
        Ok(r) => r,
        Err(e) => {
            for t in &tasks {
                report_failure(&shared, &t.lease, &format!("stamping panicked: {e}")).await;
            }
            return;
        }
    };
    let mut stamped = Vec::with_capacity(tasks.len());
    for (task, result) in tasks.into_iter().zip(results) {
        match result {
            Ok(image) => stamped.push((task.lease, image)),
            Err((e, for_good)) => report_failure_of(&shared, &task.lease, &e, for_good).await,
        }
    }
    if !stamped.is_empty() {
        upload(&shared, stamped).await;
    }
}

/// What the generation record names as a model's weights and training
/// datasets (cached).
async fn model_facts(shared: &Shared, model_id: &str) -> Result<ModelFacts, String> {
    let mut cache = shared.models.lock().await;
    if let Some(f) = cache.get(model_id) {
        return Ok(f.clone());
    }
    let mut registry = shared.registry.clone();
    let models = registry
        .list_models(ListModelsRequest {})
        .await
        .map_err(|e| format!("reading the model registry: {}", e.message()))?
        .into_inner()
        .models;
    // The digest is the engine's own (the weights it loaded, which the
    // coordinator checked against the registry at registration).
    let digests: HashMap<String, String> = shared
        .engine
        .models()
        .into_iter()
        .map(|m| (m.model_id, m.weights_sha256))
        .collect();
    for m in models {
        if let Some(digest) = digests.get(&m.model_id) {
            cache.insert(
                m.model_id,
                ModelFacts {
                    weights_sha256: digest.clone(),
                    datasets: m.training_datasets,
                },
            );
        }
    }
    cache
        .get(model_id)
        .cloned()
        .ok_or_else(|| format!("model {model_id:?} is not in the registry"))
}

async fn fetch(client: &WorkersClient<AuthChannel>, sha256: &str) -> Result<Vec<u8>, Status> {
    let mut c = client.clone();
    let mut stream = c
        .fetch_artifact(DownloadArtifactRequest {
            sha256: sha256.to_string(),
        })
        .await?
        .into_inner();
    let mut bytes = Vec::new();
    while let Some(chunk) = stream.message().await? {
        bytes.extend_from_slice(&chunk.data);
    }
    let got = hallmark_provenance::sha256_hex(&bytes);
    if got != sha256 {
        return Err(Status::data_loss(format!(
            "image {sha256} arrived with sha256 {got}"
        )));
    }
    Ok(bytes)
}

/// Uploads a batch of results in one call (recorded in one transaction);
/// retries transport errors while the leases may still be current, drops
/// work whose lease the coordinator calls stale, and reports a rejected
/// upload as a failed attempt.
async fn upload(shared: &Shared, results: Vec<(TaskLease, StampedImage)>) {
    let results: Vec<(TaskLease, StampedImage, String)> = results
        .into_iter()
        .map(|(l, img)| {
            let sha = hallmark_provenance::sha256_hex(&img.bytes);
            (l, img, sha)
        })
        .collect();
    let mut backoff = Duration::from_millis(100);
    for attempt in 0..6 {
        let live: Vec<&(TaskLease, StampedImage, String)> = results
            .iter()
            .filter(|(l, _, _)| {
                let held = still_held(shared, l);
                if !held {
                    tracing::info!(task_id = %l.task_id, "lease no longer held; dropping the result");
                }
                held
            })
            .collect();
        if live.is_empty() {
            return;
        }
        let mut messages = Vec::new();
        for (lease, image, sha256) in &live {
            messages.push(CompleteMessage {
                body: Some(Body::Header(CompleteHeader {
                    worker_id: shared.worker_id.clone(),
                    task_id: lease.task_id.clone(),
                    fencing_token: lease.fencing_token,
                    sha256: sha256.clone(),
                    size: image.bytes.len() as u64,
                    media_type: image.media_type.to_string(),
                    width: image.width,
                    height: image.height,
                    watermark_id: image.watermark_id.clone(),
                })),
            });
            messages.extend(image.bytes.chunks(UPLOAD_CHUNK).map(|c| CompleteMessage {
                body: Some(Body::Data(c.to_vec())),
            }));
        }
        let mut c = shared.client.clone();
        let started = Instant::now();
        let reply = c.complete(tokio_stream::iter(messages)).await;
        metrics::histogram!(m::UPLOAD_SECONDS).record(started.elapsed());
        match reply {
            Ok(resp) => {
                let resp = resp.into_inner();
                if resp.outcomes.len() != live.len() {
                    tracing::error!(
                        "coordinator answered {} outcomes for {} uploads",
                        resp.outcomes.len(),
                        live.len()
                    );
                }
                for ((lease, _, _), outcome) in live.iter().zip(resp.outcomes) {
                    match Kind::try_from(outcome.kind).unwrap_or(Kind::Stale) {
                        Kind::Recorded => {
                            release(shared, lease);
                            tally(shared, Outcome::Completed);
                        }
                        Kind::Stale => {
                            tracing::warn!(task_id = %lease.task_id, error = %outcome.message, "completion refused; dropping the work");
                            release(shared, lease);
                            tally(shared, Outcome::Dropped);
                        }
                        Kind::Rejected => {
                            report_failure(
                                shared,
                                lease,
                                &format!("upload rejected: {}", outcome.message),
                            )
                            .await;
                        }
                    }
                }
                return;
            }
            Err(s) if matches!(s.code(), Code::FailedPrecondition | Code::NotFound) => {
                for (lease, _, _) in &live {
                    tracing::warn!(task_id = %lease.task_id, error = %s.message(), "completion refused; dropping the work");
                    release(shared, lease);
                    tally(shared, Outcome::Dropped);
                }
                return;
            }
            Err(s) if s.code() == Code::InvalidArgument => {
                for (lease, _, _) in &live {
                    report_failure(shared, lease, &format!("upload rejected: {}", s.message()))
                        .await;
                }
                return;
            }
            Err(s) => {
                tracing::warn!(attempt, error = %s.message(), "upload failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
    }
    for (lease, _, _) in &results {
        if still_held(shared, lease) {
            tracing::error!(task_id = %lease.task_id, "upload kept failing; leaving the lease to expire");
            release(shared, lease);
        }
    }
}

async fn report_failure(shared: &Shared, lease: &TaskLease, message: &str) {
    report_failure_of(shared, lease, message, false).await
}

/// Reports a failed attempt; `for_good` when the task itself is at fault
/// and no retry can help ([`crate::EngineError::is_final`]).
async fn report_failure_of(shared: &Shared, lease: &TaskLease, message: &str, for_good: bool) {
    tracing::warn!(task_id = %lease.task_id, error = %message, for_good, "task failed");
    let mut c = shared.client.clone();
    let _ = c
        .fail(FailRequest {
            worker_id: shared.worker_id.clone(),
            task_id: lease.task_id.clone(),
            fencing_token: lease.fencing_token,
            message: message.to_string(),
            hand_back: false,
            for_good,
        })
        .await;
    release(shared, lease);
    tally(shared, Outcome::Failed);
}
