//! `hallmark-bench`: farm throughput with the synthetic engine at 0 ms render.
//!
//! Starts a coordinator in this process (real gRPC on loopback) on Postgres +
//! Redis and/or on SQLite, runs W simulated workers that lease in batches and
//! upload a stamped (watermarked and signed) 128×128 PNG per task — the
//! coordinator checks every stamp — and reports tasks/s end to end, lease-call
//! latency p50/p99, and SQL statements per task (counted in a separate,
//! smaller run with sqlx's statement log on, so logging does not slow the
//! timed run).
//!
//! `cargo run --release -p hallmark-e2e --bin hallmark-bench -- --workers 64 --tasks 20000`

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use hallmark_coordinator::CoordinatorConfig;
use hallmark_coordinator::config::TokenEntry;
use hallmark_proto::client::{AuthChannel, BearerToken};
use hallmark_proto::v1::complete_message::Body;
use hallmark_proto::v1::workers_client::WorkersClient;
use hallmark_proto::v1::{
    CompleteHeader, CompleteMessage, LeaseRequest, ModelCapability, RegisterWorkerRequest,
    SubmitJobRequest,
};
use hallmark_provenance::credentials::{SigningAlgorithm, ca};
use hallmark_worker::stamp::{ModelFacts, StampSettings};
use hallmark_worker::{StampConfig, Stamping};
use tonic::transport::Channel;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;

#[derive(Parser, Debug)]
struct Args {
    /// Simulated workers.
    #[arg(long, default_value_t = 64)]
    workers: u32,
    /// Tasks in the timed job.
    #[arg(long, default_value_t = 20_000)]
    tasks: u32,
    /// Tasks per lease (the workers' batch size).
    #[arg(long, default_value_t = 8)]
    batch: u32,
    /// postgres, sqlite or both.
    #[arg(long, default_value = "both")]
    store: String,
    /// Keep metrics (the coordinator's Prometheus recorder installed and
    /// its endpoint served), to measure what recording them costs.
    #[arg(long)]
    metrics: bool,
    /// Run the coordinator with `auth = "tokens"`: the workers present a
    /// worker token and the submit a tenant's, to measure what the gate
    /// costs.
    #[arg(long)]
    auth: bool,
}

/// Counts statements sqlx executes (its `sqlx::query` log events).
struct StatementCounter(Arc<AtomicU64>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for StatementCounter {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        if event.metadata().target() == "sqlx::query" {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }
}

struct Outcome {
    seconds: f64,
    latencies_us: Vec<u64>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let statements = Arc::new(AtomicU64::new(0));
    let counting = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let filter_flag = counting.clone();
    let layer =
        StatementCounter(statements.clone()).with_filter(tracing_subscriber::filter::filter_fn(
            move |m| filter_flag.load(Ordering::Relaxed) && m.target() == "sqlx::query",
        ));
    tracing::subscriber::set_global_default(tracing_subscriber::registry().with(layer))?;

    let ca_dir = tempfile::tempdir()?;
    let stamping = bench_stamping(ca_dir.path())?;
    stamp_costs(&stamping)?;
    let stores = hallmark_e2e::stores_named(&args.store)?;
    println!(
        "hallmark-bench: synthetic 0 ms render, {} workers, batch {}, {} tasks per timed run, metrics {}, auth {}",
        args.workers,
        args.batch,
        args.tasks,
        if args.metrics { "on" } else { "off" },
        if args.auth { "tokens" } else { "off" }
    );
    println!(
        "{:<16} {:>9} {:>11} {:>11} {:>13} {:>13} {:>9}",
        "store",
        "tasks/s",
        "lease p50",
        "lease p99",
        "idle lease p50",
        "idle lease p99",
        "SQL/task"
    );
    for store in stores {
        // Statement count: a smaller run with sqlx's statement log enabled.
        let count_tasks = (args.tasks / 10).clamp(500, 2_000);
        counting.store(true, Ordering::Relaxed);
        statements.store(0, Ordering::Relaxed);
        run(
            store,
            &args.workers,
            args.batch,
            count_tasks,
            args.metrics,
            args.auth,
            &stamping,
        )
        .await?;
        let per_task = statements.load(Ordering::Relaxed) as f64 / f64::from(count_tasks);
        counting.store(false, Ordering::Relaxed);

        let out = run(
            store,
            &args.workers,
            args.batch,
            args.tasks,
            args.metrics,
            args.auth,
            &stamping,
        )
        .await?;
        // Lease latency of an idle farm: one worker, one task at a time.
        let idle = run(store, &1, 1, 300, args.metrics, args.auth, &stamping).await?;
        let (p50, p99) = hallmark_e2e::percentiles_ms(out.latencies_us);
        let (idle50, idle99) = hallmark_e2e::percentiles_ms(idle.latencies_us);
        let label = if store == "postgres" {
            "postgres+redis"
        } else {
            "sqlite"
        };
        println!(
            "{:<16} {:>9.0} {:>9.2}ms {:>9.2}ms {:>11.2}ms {:>11.2}ms {:>9.1}",
            label,
            f64::from(args.tasks) / out.seconds,
            p50,
            p99,
            idle50,
            idle99,
            per_task
        );
    }
    Ok(())
}

async fn run(
    store: &str,
    workers: &u32,
    batch: u32,
    tasks: u32,
    metrics: bool,
    auth: bool,
    stamping: &Arc<Stamping>,
) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let (database_url, redis_url) = match store {
        "postgres" => (
            hallmark_e2e::fresh_database().await,
            Some(hallmark_e2e::redis_url()),
        ),
        _ => (
            format!("sqlite://{}", dir.path().join("bench.db").display()),
            None,
        ),
    };
    let (worker_token, tenant_token) = (
        hallmark_coordinator::auth::new_token()?,
        hallmark_coordinator::auth::new_token()?,
    );
    let (auth_mode, auth_tokens) = if auth {
        let digest = hallmark_coordinator::auth::token_digest;
        (
            "tokens",
            [
                (digest(&worker_token), TokenEntry::Role("worker".into())),
                (
                    digest(&tenant_token),
                    TokenEntry::Role("tenant:bench".into()),
                ),
            ]
            .into(),
        )
    } else {
        ("off", Default::default())
    };
    let config = CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        database_url,
        redis_url,
        blob_dir: dir.path().join("blobs"),
        max_items_per_job: tasks.max(100_000),
        metrics_listen: metrics.then(|| "127.0.0.1:0".into()),
        auth: auth_mode.into(),
        auth_tokens,
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let coordinator = hallmark_coordinator::start_on(listener, config).await?;
    let url = coordinator.url();
    let channel = Channel::from_shared(url.clone())?
        .connect()
        .await
        .context("connect")?;
    let as_caller = |token: &str| -> anyhow::Result<AuthChannel> {
        let token = auth.then_some(token);
        Ok(BearerToken::new(token)
            .map_err(anyhow::Error::msg)?
            .on(channel.clone()))
    };

    let mut ids = Vec::new();
    for i in 0..*workers {
        let mut c = WorkersClient::new(as_caller(&worker_token)?);
        let id = c
            .register(RegisterWorkerRequest {
                name: format!("bench-{i}"),
                hostname: "bench".into(),
                engines: vec!["synthetic".into()],
                models: vec![ModelCapability {
                    model_id: "synthetic-v1".into(),
                    weights_sha256: hallmark_worker_digest(),
                    refines_only: false,
                    inpaints_only: false,
                }],
                max_pixels: 1 << 20,
                max_batch: batch,
            })
            .await?
            .into_inner()
            .worker_id;
        ids.push(id);
    }
    let spec = hallmark_e2e::synthetic_spec(tasks as usize, 0);
    let started = Instant::now();
    hallmark_proto::v1::jobs_client::JobsClient::new(as_caller(&tenant_token)?)
        .max_encoding_message_size(256 * 1024 * 1024)
        .submit(SubmitJobRequest {
            spec: Some(spec),
            queue_unservable: false,
        })
        .await?;
    let done = Arc::new(AtomicU64::new(0));
    let mut handles = Vec::new();
    for id in ids {
        let client = WorkersClient::new(as_caller(&worker_token)?);
        let done = done.clone();
        let stamping = stamping.clone();
        handles.push(tokio::spawn(async move {
            simulated_worker(client, id, batch, stamping, done, u64::from(tasks)).await
        }));
    }
    let mut latencies = Vec::new();
    for h in handles {
        latencies.extend(h.await??);
    }
    let seconds = started.elapsed().as_secs_f64();
    coordinator.stop().await?;
    Ok(Outcome {
        seconds,
        latencies_us: latencies,
    })
}

async fn simulated_worker(
    mut client: WorkersClient<AuthChannel>,
    worker_id: String,
    batch: u32,
    stamping: Arc<Stamping>,
    done: Arc<AtomicU64>,
    total: u64,
) -> anyhow::Result<Vec<u64>> {
    let mut latencies = Vec::new();
    while done.load(Ordering::Relaxed) < total {
        let t = Instant::now();
        let leases = client
            .lease(LeaseRequest {
                worker_id: worker_id.clone(),
                held: vec![],
                want: batch,
                wait_ms: 200,
                loaded_model: String::new(),
            })
            .await?
            .into_inner()
            .leases;
        if leases.is_empty() {
            continue;
        }
        latencies.push(t.elapsed().as_micros() as u64);
        // Stamped as a real worker stamps (watermark, encode, sign), on a
        // blocking thread; then one Complete call per leased batch.
        let n = leases.len() as u64;
        let (st, id) = (stamping.clone(), worker_id.clone());
        let stamped = tokio::task::spawn_blocking(move || {
            leases
                .into_iter()
                .map(|l| {
                    let image = bench_pixels(&l.task_id, l.width, l.height).into();
                    let out = st.stamp(&l, &id, &ModelFacts::default(), &image, None, None);
                    out.map(|img| (l, img))
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .await??;
        let mut msgs = Vec::with_capacity(stamped.len() * 2);
        for (l, img) in stamped {
            let header = CompleteHeader {
                worker_id: worker_id.clone(),
                task_id: l.task_id,
                fencing_token: l.fencing_token,
                sha256: hallmark_provenance::sha256_hex(&img.bytes),
                size: img.bytes.len() as u64,
                media_type: img.media_type.into(),
                width: img.width,
                height: img.height,
                watermark_id: img.watermark_id,
            };
            msgs.push(CompleteMessage {
                body: Some(Body::Header(header)),
            });
            msgs.push(CompleteMessage {
                body: Some(Body::Data(img.bytes)),
            });
        }
        client.complete(tokio_stream::iter(msgs)).await?;
        done.fetch_add(n, Ordering::Relaxed);
    }
    Ok(latencies)
}

/// What provenance costs per image on one thread: the worker's stamp
/// (watermark, read-back, PNG encode, sign) and the coordinator's upload
/// check, with and without reading the watermark back from the pixels.
fn stamp_costs(stamping: &Stamping) -> anyhow::Result<()> {
    use hallmark_coordinator::stamps::StampCheck;
    let key = || {
        hallmark_provenance::watermark::WatermarkKey::from_secret(
            hallmark_provenance::watermark::DEVELOPMENT_KEY.as_bytes(),
        )
    };
    let full = StampCheck::new(None, key(), true);
    let light = StampCheck::new(None, key(), false);
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    println!(
        "{:<10} {:>14} {:>18} {:>26}",
        "image", "stamp (worker)", "check (coord.)", "check without pixel read"
    );
    for size in [192u32, 512, 1024] {
        let lease = hallmark_proto::v1::TaskLease {
            task_id: format!("bench/{size}/generate"),
            job_id: "bench".into(),
            stage: "generate".into(),
            model_id: "synthetic-v1".into(),
            width: size,
            height: size,
            ..Default::default()
        };
        let image = bench_pixels(&lease.task_id, size, size).into();
        let (mut stamp_ms, mut check_ms, mut light_ms) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..15 {
            let t = Instant::now();
            let img = stamping.stamp(&lease, "w", &ModelFacts::default(), &image, None, None)?;
            stamp_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            full.check(&img.bytes, &lease.task_id, &img.watermark_id)
                .map_err(anyhow::Error::msg)?;
            check_ms.push(t.elapsed().as_secs_f64() * 1e3);
            let t = Instant::now();
            light
                .check(&img.bytes, &lease.task_id, &img.watermark_id)
                .map_err(anyhow::Error::msg)?;
            light_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!(
            "{:<10} {:>11.1} ms {:>15.1} ms {:>23.1} ms",
            format!("{size}²"),
            median(stamp_ms),
            median(check_ms),
            median(light_ms)
        );
    }
    println!();
    Ok(())
}

/// The stamping stage of the simulated workers, signing with a fresh test CA.
fn bench_stamping(dir: &std::path::Path) -> anyhow::Result<Arc<Stamping>> {
    let files = ca::init(&dir.join("ca"), "Hallmark bench", SigningAlgorithm::Es256)?;
    Ok(Stamping::new(StampConfig::from_settings(StampSettings {
        identity: files.identity(None)?,
        trust_anchors: None,
        watermark_key: hallmark_provenance::watermark::DEVELOPMENT_KEY,
        prompt_policy: "hash",
        training_mining: "notAllowed",
        output_format: "png",
    })?)?)
}

fn hallmark_worker_digest() -> String {
    hallmark_provenance::sha256_hex(b"hallmark-synthetic:synthetic-v1")
}

/// A generated-looking picture that differs per task, so every upload is
/// its own blob.
fn bench_pixels(task_id: &str, width: u32, height: u32) -> image::RgbImage {
    let seed = task_id
        .bytes()
        .fold(0u32, |h, b| h.wrapping_mul(31).wrapping_add(u32::from(b)));
    hallmark_provenance::watermark::attacks::smooth_field(width, height, seed % 10_000)
}
