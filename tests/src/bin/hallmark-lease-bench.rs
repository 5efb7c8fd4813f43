//! `hallmark-lease-bench`: what a lease costs a worker whose model has
//! little work while other models have a deep backlog — a farm of several
//! model pools, each scaled on its own queue.
//!
//! On a fresh Postgres database and a fresh SQLite file it registers a
//! worker for model `a` and one for model `b`, queues `--backlog-jobs` jobs
//! of `--tasks-per-job` tasks for `a` and one job of `--leases` tasks for
//! `b`, then times `--leases` one-task leases by each worker, alternately
//! (`b`'s: the scan past `a`'s backlog; `a`'s: the in-run baseline), and
//! reports each one's p50, p99 and mean.
//!
//! `cargo run --release -p hallmark-e2e --bin hallmark-lease-bench`

use std::time::{Duration, Instant};

use clap::Parser;
use hallmark_coordinator::spec::{self, Limits};
use hallmark_coordinator::store::{LeasePolicy, NewJob, Store, WorkerCaps, WorkerRegistration};
use hallmark_proto::v1::{JobSpec, ModelCapability, PromptItem};

#[derive(Parser, Debug)]
struct Args {
    /// Running jobs of the busy model.
    #[arg(long, default_value_t = 50)]
    backlog_jobs: usize,
    /// Ready tasks in each of them.
    #[arg(long, default_value_t = 2000)]
    tasks_per_job: usize,
    /// Leases timed per worker.
    #[arg(long, default_value_t = 300)]
    leases: usize,
    /// postgres, sqlite or both.
    #[arg(long, default_value = "both")]
    store: String,
}

const POLICY: LeasePolicy = LeasePolicy {
    base_ms: 600_000,
    ms_per_megapixel_step: 0,
};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let stores = hallmark_e2e::stores_named(&args.store)?;
    println!(
        "hallmark-lease-bench: {} jobs × {} ready tasks of model a, {} one-task leases per worker",
        args.backlog_jobs, args.tasks_per_job, args.leases
    );
    for name in stores {
        let dir = tempfile::tempdir()?;
        let store = hallmark_e2e::bench_store(name, dir.path()).await?;
        run(name, &store, &args).await?;
    }
    Ok(())
}

async fn run(name: &str, store: &Store, args: &Args) -> anyhow::Result<()> {
    let wa = register(store, "wa", "a").await?;
    let wb = register(store, "wb", "b").await?;
    let started = Instant::now();
    for j in 0..args.backlog_jobs {
        submit(store, &format!("a{j}"), "a", args.tasks_per_job).await?;
    }
    submit(store, "b0", "b", args.leases).await?;
    let queued = started.elapsed();
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for i in 0..args.leases {
        let now = 1_000 + i as i64;
        for (w, times) in [(&wb, &mut b), (&wa, &mut a)] {
            let t = Instant::now();
            let leased = store.lease(w, 1, "", now - 1_000, 3, now).await?;
            times.push(t.elapsed());
            anyhow::ensure!(
                leased.len() == 1,
                "worker {} got {} tasks",
                w.worker_id,
                leased.len()
            );
        }
    }
    println!(
        "{name:<9} queued {} tasks in {:.1} s; lease for the idle model b: {}; for the busy model a (baseline): {}",
        args.backlog_jobs * args.tasks_per_job + args.leases,
        queued.as_secs_f64(),
        figures(&b),
        figures(&a)
    );
    Ok(())
}

fn figures(times: &[Duration]) -> String {
    let (p50, p99) =
        hallmark_e2e::percentiles_ms(times.iter().map(|t| t.as_micros() as u64).collect());
    let mean = times.iter().map(Duration::as_secs_f64).sum::<f64>() / times.len() as f64 * 1e3;
    format!("p50 {p50:.2} ms, p99 {p99:.2} ms, mean {mean:.2} ms")
}

async fn register(store: &Store, id: &str, model: &str) -> anyhow::Result<WorkerCaps> {
    let models = [(
        "synthetic".to_string(),
        ModelCapability {
            model_id: model.into(),
            weights_sha256: "0".repeat(64),
            refines_only: false,
        },
    )];
    store
        .register_worker(
            &WorkerRegistration {
                worker_id: id,
                name: id,
                hostname: "bench",
                engines: &["synthetic".into()],
                models: &models,
                max_pixels: 1 << 24,
                max_batch: 8,
                principal: "",
                client_cert: None,
            },
            0,
        )
        .await?;
    Ok(WorkerCaps {
        worker_id: id.into(),
        max_pixels: 1 << 24,
        max_batch: 8,
        principal: String::new(),
        client_cert_sha256: String::new(),
    })
}

async fn submit(store: &Store, id: &str, model: &str, tasks: usize) -> anyhow::Result<()> {
    let job = spec::expand(
        &JobSpec {
            engine: "synthetic".into(),
            model_id: model.into(),
            prompts: (0..tasks)
                .map(|i| PromptItem {
                    prompt: format!("prompt {i}"),
                    ..Default::default()
                })
                .collect(),
            width: 192,
            height: 192,
            steps: 4,
            guidance: 7.0,
            scheduler: "euler".into(),
            max_attempts: 2,
            seed: Some(1),
            ..Default::default()
        },
        &Limits {
            max_items: 100_000,
            max_side: 2048,
            max_steps: 100,
            default_max_attempts: 3,
        },
        0,
    )?;
    store
        .submit(
            &NewJob {
                id,
                job: &job,
                spec_json: "{}",
                tenant_cap: 0,
                submitted_by: "",
            },
            &POLICY,
            1,
        )
        .await?;
    Ok(())
}
