//! Metrics end to end: a coordinator process on Postgres and a worker
//! process each serve `GET /metrics`; what they export is checked against
//! what the job did — the census of open work before and after, the tasks
//! leased, recorded and failed, and the worker's own tallies.

use std::process::Command;
use std::time::Duration;

use hallmark_e2e::*;
use hallmark_proto::v1::registry_client::RegistryClient;
use hallmark_proto::v1::{Model, SubmitJobRequest, WeightFile};

const SYNTHETIC: [(&str, &str); 2] = [("engine", "synthetic"), ("model", "synthetic-v1")];

fn open_tasks(s: &Scrape, state: &str, stage: &str) -> Option<f64> {
    s.sum(
        "hallmark_tasks",
        &[
            SYNTHETIC[0],
            SYNTHETIC[1],
            ("state", state),
            ("stage", stage),
        ],
    )
}

/// Registers the synthetic engine's model, so jobs for it queue before any
/// worker serves it.
async fn register_synthetic(url: &str) {
    RegistryClient::new(channel(url).await)
        .register_model(Model {
            model_id: "synthetic-v1".into(),
            family: "synthetic".into(),
            weights: vec![WeightFile {
                path: "*".into(),
                sha256: hallmark_provenance::sha256_hex(b"hallmark-synthetic:synthetic-v1"),
                size: 0,
            }],
            ..Default::default()
        })
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_coordinator_and_the_worker_export_what_the_farm_did() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    // Every scrape reads the census afresh (the default serves one read
    // for 5 s): the test reads it before and after each change.
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_METRICS_LISTEN", &metrics)
        .with("HALLMARK_CENSUS_MAX_AGE_MS", "0");
    let _c = spec.start().await;
    let url = spec.url();

    // The model is registered; its worker is not up yet.
    register_synthetic(&url).await;
    // Six prompts with an upscale each, one of them failing on the worker
    // with no retry: queued before any worker exists.
    let mut job = synthetic_spec(6, 2);
    job.prompts[3].prompt = "p3 [boom]".into();
    job.max_attempts = 1;
    let job_id = jobs_client(&url)
        .await
        .submit(SubmitJobRequest {
            spec: Some(job),
            queue_unservable: true,
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;

    let before = Scrape::get(&metrics);
    assert_eq!(open_tasks(&before, "ready", "generate"), Some(6.0));
    assert_eq!(open_tasks(&before, "waiting", "upscale"), Some(6.0));
    assert_eq!(before.sum("hallmark_tasks", &[("state", "leased")]), None);
    // Each tenant's queue: the job's 12 open tasks, by state.
    let tenant_tasks = |s: &Scrape, state: &str| {
        s.sum(
            "hallmark_tenant_tasks",
            &[("tenant", "default"), ("state", state)],
        )
    };
    assert_eq!(tenant_tasks(&before, "ready"), Some(6.0));
    assert_eq!(tenant_tasks(&before, "waiting"), Some(6.0));
    assert_eq!(
        before.sum("hallmark_jobs", &[("state", "running")]),
        Some(1.0)
    );
    assert_eq!(before.sum("hallmark_workers_live", &[]), Some(0.0));
    assert_eq!(before.sum("hallmark_model_workers_live", &SYNTHETIC), None);
    assert_eq!(before.sum("hallmark_census_up", &[]), Some(1.0));
    assert_eq!(before.sum("hallmark_jobs_submitted_total", &[]), Some(1.0));
    // Every gRPC call is counted by method and code: one submit, and the
    // model registration.
    let calls = |s: &Scrape, method: &str, code: &str| {
        s.sum(
            "hallmark_grpc_requests_total",
            &[("method", method), ("code", code)],
        )
    };
    assert_eq!(calls(&before, "/hallmark.v1.Jobs/Submit", "Ok"), Some(1.0));
    assert_eq!(
        calls(&before, "/hallmark.v1.Registry/RegisterModel", "Ok"),
        Some(1.0)
    );
    assert_eq!(
        before.sum("hallmark_tasks_submitted_total", &[]),
        Some(12.0)
    );
    assert!(
        before.text.contains("# HELP hallmark_tasks Open tasks"),
        "help texts are exported:\n{}",
        before.text
    );

    let worker_metrics = format!("127.0.0.1:{}", free_port());
    let _w = start_worker(
        &url,
        "w",
        0,
        &[
            "--fail-marker",
            "[boom]",
            "--metrics-listen",
            &worker_metrics,
        ],
    );
    let done = wait_for_job(&url, &job_id, Duration::from_secs(60)).await;
    assert_eq!(done.state, "failed", "item 3 fails with no retry");

    // The reaper closes the job; then the census has nothing open.
    eventually("the job's finish counted", Duration::from_secs(20), || {
        let closed = Scrape::get(&metrics)
            .sum("hallmark_jobs_finished_total", &[("state", "failed")])
            == Some(1.0);
        async move { closed }
    })
    .await;
    // A scrape reads the census before it renders the counters, so the one
    // that first counted the finish may have read the job still running;
    // the next reads it after the finish was committed.
    let after = Scrape::get(&metrics);
    // Label sets seen before read 0 now, instead of vanishing.
    assert_eq!(open_tasks(&after, "ready", "generate"), Some(0.0));
    assert_eq!(open_tasks(&after, "waiting", "upscale"), Some(0.0));
    assert_eq!(after.sum("hallmark_tasks", &[]), Some(0.0));
    assert_eq!(after.sum("hallmark_tenant_tasks", &[]), Some(0.0));
    assert_eq!(tenant_tasks(&after, "ready"), Some(0.0));
    assert_eq!(
        after.sum("hallmark_jobs", &[("state", "running")]),
        Some(0.0)
    );
    assert_eq!(after.sum("hallmark_workers_live", &[]), Some(1.0));
    assert_eq!(
        after.sum("hallmark_model_workers_live", &SYNTHETIC),
        Some(1.0)
    );
    // What the coordinator did: 6 generate leases, 5 upscales (the failed
    // item's upscale never became ready), 10 artifacts, 1 failed attempt.
    assert_eq!(
        after.sum("hallmark_tasks_leased_total", &[("stage", "generate")]),
        Some(6.0)
    );
    assert_eq!(
        after.sum("hallmark_tasks_leased_total", &[("stage", "upscale")]),
        Some(5.0)
    );
    assert_eq!(
        after.sum("hallmark_artifacts_recorded_total", &[]),
        Some(10.0)
    );
    let stored_bytes = scalar(&db, "SELECT CAST(SUM(size) AS BIGINT) FROM artifacts").await;
    assert_eq!(
        after.sum("hallmark_upload_bytes_total", &[]),
        Some(stored_bytes as f64)
    );
    assert_eq!(
        after.sum(
            "hallmark_task_attempts_failed_total",
            &[("outcome", "failed")]
        ),
        Some(1.0)
    );
    assert_eq!(
        after.sum(
            "hallmark_task_attempts_failed_total",
            &[("outcome", "retry")]
        ),
        None
    );
    assert!(after.sum("hallmark_store_lease_seconds_count", &[]) >= Some(2.0));
    assert!(after.sum("hallmark_store_complete_seconds_count", &[]) >= Some(1.0));
    // Every ledger entry is sealed by the reaper soon, this replica's count.
    let ledger = scalar(&db, "SELECT COUNT(*) FROM audit_events").await;
    eventually("the ledger sealed", Duration::from_secs(20), || {
        let s = Scrape::get(&metrics);
        let sealed = s.sum("hallmark_audit_unsealed_entries", &[]) == Some(0.0)
            && s.sum("hallmark_audit_entries_sealed_total", &[]) == Some(ledger as f64);
        async move { sealed }
    })
    .await;

    // The worker's side of the same work.
    let w = Scrape::get(&worker_metrics);
    assert_eq!(
        w.sum("hallmark_worker_tasks_total", &[("outcome", "completed")]),
        Some(10.0)
    );
    assert_eq!(
        w.sum("hallmark_worker_tasks_total", &[("outcome", "failed")]),
        Some(1.0)
    );
    assert_eq!(w.sum("hallmark_worker_batch_tasks_sum", &[]), Some(11.0));
    assert_eq!(
        w.sum("hallmark_worker_stamp_seconds_count", &[]),
        Some(10.0)
    );
    assert!(
        w.sum(
            "hallmark_worker_render_seconds_count",
            &[("engine", "synthetic"), ("stage", "upscale")]
        ) >= Some(1.0)
    );
    assert_eq!(w.sum("hallmark_worker_busy", &[]), Some(0.0));
    // The worker's calls: one registration, one Complete per uploaded
    // batch, one Fail; at least one answered Lease per batch it held.
    let batches = w.sum("hallmark_worker_batch_tasks_count", &[]);
    assert_eq!(
        calls(&after, "/hallmark.v1.Workers/Register", "Ok"),
        Some(1.0)
    );
    assert_eq!(calls(&after, "/hallmark.v1.Workers/Fail", "Ok"), Some(1.0));
    assert_eq!(
        calls(&after, "/hallmark.v1.Workers/Complete", "Ok"),
        w.sum("hallmark_worker_upload_seconds_count", &[])
    );
    assert!(calls(&after, "/hallmark.v1.Workers/Lease", "Ok") >= batches);
    assert!(
        after.sum(
            "hallmark_grpc_request_seconds_count",
            &[("method", "/hallmark.v1.Workers/Lease")]
        ) >= batches
    );
    // Prometheus's own linter accepts both endpoints' output.
    promtool_check(&after);
    promtool_check(&w);
    assert_eq!(
        w.sum("hallmark_tasks", &[]),
        None,
        "a worker does not export the coordinator's census"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_metrics_address_in_use_stops_the_coordinator_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = Command::new(bin("hallmark-coordinator"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.path().join("c.db").display()))
        .arg("--blob-dir")
        .arg(dir.path().join("blobs"))
        .args(["--metrics-listen", &addr])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!("listening for metrics on {addr}")),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_diffusion_worker_exports_its_model_cache() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-sd1");
    init_tiny(&model, "sd1");
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"));
    let _c = spec.start().await;
    let url = spec.url();
    // Two models (the same folder under two ids) and a cache too small for
    // both: each switch of model evicts the other.
    let (a, b) = (
        format!("tiny-a={}", model.display()),
        format!("tiny-b={}", model.display()),
    );
    let metrics = format!("127.0.0.1:{}", free_port());
    let _w = start_worker(
        &url,
        "gpu-0",
        0,
        &[
            "--engine",
            "diffusion",
            "--model-path",
            &a,
            "--model-path",
            &b,
            "--model-cache-gb",
            "0.000001",
            "--metrics-listen",
            &metrics,
        ],
    );
    wait_for_workers(&url, 1).await;
    for model_id in ["tiny-a", "tiny-b", "tiny-a", "tiny-a"] {
        let out_dir = dir.path().join(format!("out-{}", uuid::Uuid::new_v4()));
        run_job(
            &url,
            &[
                "--prompt",
                "a fox",
                "--engine",
                "diffusion",
                "--model",
                model_id,
                "--width",
                "192",
                "--height",
                "192",
                "--steps",
                "2",
            ],
            &out_dir,
            Duration::from_secs(60),
        )
        .await;
    }
    let s = Scrape::get(&metrics);
    let loads = |model| {
        s.sum(
            "hallmark_worker_model_load_seconds_count",
            &[("model", model)],
        )
    };
    assert_eq!(
        (loads("tiny-a"), loads("tiny-b")),
        (Some(2.0), Some(1.0)),
        "the last render hit the cache"
    );
    assert_eq!(
        s.sum("hallmark_worker_model_evictions_total", &[]),
        Some(2.0)
    );
    assert_eq!(s.sum("hallmark_worker_models_loaded", &[]), Some(1.0));
    let weights: u64 = std::fs::read_dir(model.join("unet"))
        .into_iter()
        .chain(std::fs::read_dir(model.join("vae")))
        .chain(std::fs::read_dir(model.join("text_encoder")))
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "safetensors"))
        .map(|e| e.metadata().unwrap().len())
        .sum();
    assert_eq!(
        s.sum("hallmark_worker_model_cache_bytes", &[]),
        Some(weights as f64)
    );
    promtool_check(&s);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scrapes_within_the_census_max_age_share_one_read_of_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_METRICS_LISTEN", &metrics)
        .with("HALLMARK_CENSUS_MAX_AGE_MS", "600000");
    let _c = spec.start().await;
    let url = spec.url();
    register_synthetic(&url).await;
    let first = Scrape::get(&metrics);
    assert_eq!(first.sum("hallmark_census_age_seconds", &[]), Some(0.0));
    assert_eq!(first.sum("hallmark_tasks", &[]), None, "nothing open yet");

    // A job arrives; the next scrape, within the max age, serves the census
    // it read before (and says how old it is) without reading the tasks.
    jobs_client(&url)
        .await
        .submit(SubmitJobRequest {
            spec: Some(synthetic_spec(3, 0)),
            queue_unservable: true,
        })
        .await
        .unwrap();
    assert_eq!(
        scalar(&db, "SELECT COUNT(*) FROM tasks WHERE state = 'ready'").await,
        3
    );
    let second = Scrape::get(&metrics);
    assert_eq!(
        second.sum("hallmark_tasks", &[]),
        None,
        "the census is served again"
    );
    let age = second.sum("hallmark_census_age_seconds", &[]).unwrap();
    assert!(age > 0.0 && age < 600.0, "{age}");
    assert_eq!(second.sum("hallmark_census_up", &[]), Some(1.0));
    // The counters are this replica's own, live at every scrape.
    assert_eq!(second.sum("hallmark_tasks_submitted_total", &[]), Some(3.0));
}
