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
//! Then the same within one job (an SDXL base and refiner pool): a job of
//! `--refine-backlog` + `--leases` items with a refine stage on model `r`,
//! whose first `--refine-backlog` generates are done, so as many refines
//! are ready; it times `--leases` one-task leases by `a`'s worker (the
//! generates rank after the ready refines: the scan past them) and by
//! `r`'s (the in-run baseline), alternately.
//!
//! `cargo run --release -p hallmark-e2e --bin hallmark-lease-bench`

use std::time::{Duration, Instant};

use clap::Parser;
use hallmark_coordinator::spec::{self, Limits};
use hallmark_coordinator::stamps::CheckedStamp;
use hallmark_coordinator::store::{
    Completion, LeasePolicy, NewJob, Store, WorkerCaps, WorkerRegistration,
};
use hallmark_proto::v1::{JobSpec, ModelCapability, PromptItem, TaskLease};

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
    /// Ready refines of the within-job scenario.
    #[arg(long, default_value_t = 4000)]
    refine_backlog: usize,
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
        let dir = tempfile::tempdir()?;
        let store = hallmark_e2e::bench_store(name, dir.path()).await?;
        run_within_job(name, &store, &args).await?;
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
    let (b, a) = alternate(store, [&wb, &wa], args.leases, 1_000).await?;
    println!(
        "{name:<9} queued {} tasks in {:.1} s; lease for the idle model b: {}; for the busy model a (baseline): {}",
        args.backlog_jobs * args.tasks_per_job + args.leases,
        queued.as_secs_f64(),
        figures(&b),
        figures(&a)
    );
    Ok(())
}

async fn run_within_job(name: &str, store: &Store, args: &Args) -> anyhow::Result<()> {
    let wa = register(store, "wa", "a").await?;
    let wr = register(store, "wr", "r").await?;
    let started = Instant::now();
    let mut job = expand("a", args.refine_backlog + args.leases)?;
    job.refine = Some(spec::Refine {
        model_id: "r".into(),
        strength: 0.3,
    });
    queue(store, "ar", &job).await?;
    let mut done = 0;
    while done < args.refine_backlog {
        let want = (args.refine_backlog - done).min(8) as u32;
        let leased = store.lease(&wa, want, "", 0, 3, 500).await?;
        anyhow::ensure!(!leased.is_empty(), "worker wa got no generate to complete");
        let completions: Vec<Completion> = leased.iter().map(|l| completion(&wa, l)).collect();
        for outcome in store.complete_many(&completions, 500).await? {
            outcome?;
        }
        done += leased.len();
    }
    let prepared = started.elapsed();
    let (a, r) = alternate(store, [&wa, &wr], args.leases, 1_000).await?;
    println!(
        "{name:<9} one job, {} refines ready (made in {:.1} s); lease of a generate past them: {}; of a refine (baseline): {}",
        args.refine_backlog,
        prepared.as_secs_f64(),
        figures(&a),
        figures(&r)
    );
    Ok(())
}

/// Times `leases` one-task leases by each of `workers`, alternately; each
/// must get one.
async fn alternate(
    store: &Store,
    workers: [&WorkerCaps; 2],
    leases: usize,
    start: i64,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut times = [Vec::new(), Vec::new()];
    for i in 0..leases {
        let now = start + i as i64;
        for (w, times) in workers.iter().zip(times.iter_mut()) {
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
    let [first, second] = times;
    Ok((first, second))
}

/// A completion of `lease` as the store records it (the upload gate's
/// checks are not what this measures).
fn completion(w: &WorkerCaps, lease: &TaskLease) -> Completion {
    let digest = hallmark_provenance::sha256_hex(lease.task_id.as_bytes());
    Completion {
        worker_id: w.worker_id.clone(),
        task_id: lease.task_id.clone(),
        fencing_token: lease.fencing_token,
        size: 10,
        media_type: "image/png".into(),
        width: 192,
        height: 192,
        stamp: CheckedStamp {
            watermark_id: digest[..16].to_string(),
            manifest: format!("manifest of {}", lease.task_id).into_bytes(),
            manifest_label: format!("urn:c2pa:{}", lease.task_id),
        },
        sha256: digest,
    }
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
            inpaints_only: false,
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
    Ok(store.worker_caps(id).await?)
}

async fn submit(store: &Store, id: &str, model: &str, tasks: usize) -> anyhow::Result<()> {
    queue(store, id, &expand(model, tasks)?).await
}

fn expand(model: &str, tasks: usize) -> anyhow::Result<spec::ExpandedJob> {
    Ok(spec::expand(
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
    )?)
}

async fn queue(store: &Store, id: &str, job: &spec::ExpandedJob) -> anyhow::Result<()> {
    store
        .submit(
            &NewJob {
                id,
                job,
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
