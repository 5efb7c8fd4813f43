//! Fault tests: killed workers, a restarted coordinator, a Redis outage,
//! stale fencing tokens and two coordinator replicas racing for leases.

use std::time::Duration;

use hallmark_e2e::*;
use hallmark_proto::v1::complete_message::Body;
use hallmark_proto::v1::{
    CompleteHeader, CompleteMessage, JobRef, LeaseRequest, ModelCapability, RegisterWorkerRequest,
    SubmitJobRequest,
};

async fn submit(url: &str, n: usize, upscale: u32) -> String {
    jobs_client(url)
        .await
        .submit(SubmitJobRequest {
            spec: Some(synthetic_spec(n, upscale)),
            queue_unservable: false,
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id
}

/// Registers a hand-driven worker for the synthetic model; its id.
async fn fake_worker(url: &str) -> String {
    workers_client(url)
        .await
        .register(RegisterWorkerRequest {
            name: "fake".into(),
            hostname: "test".into(),
            engines: vec!["synthetic".into()],
            models: vec![ModelCapability {
                model_id: "synthetic-v1".into(),
                weights_sha256: sha256(b"hallmark-synthetic:synthetic-v1"),
                refines_only: false,
                inpaints_only: false,
            }],
            max_pixels: 1 << 20,
            max_batch: 1,
        })
        .await
        .expect("register")
        .into_inner()
        .worker_id
}

fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_worker_tasks_are_released_and_the_job_completes_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_LEASE_BASE_MS", 1500)
        .with("HALLMARK_REAP_INTERVAL_MS", 100);
    let _c = spec.start().await;
    let url = spec.url();
    let mut slow = start_worker(&url, "slow", 600_000, &["--max-batch", "2"]);
    wait_for_workers(&url, 1).await;
    let job_id = submit(&url, 6, 0).await;
    wait_for_count(
        &db,
        "the slow worker holds two leases",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE state = 'leased'",
        |n| n == 2,
    )
    .await;
    slow.kill(); // kill -9 mid-task
    let _fast: Vec<Proc> = (0..2)
        .map(|i| start_worker(&url, &format!("fast{i}"), 5, &[]))
        .collect();
    let job = wait_for_job(&url, &job_id, Duration::from_secs(60)).await;
    assert_eq!(job.state, "succeeded");
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await,
        6
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT CAST(COUNT(DISTINCT task_id) AS BIGINT) FROM artifacts"
        )
        .await,
        6
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE attempts = 2"
        )
        .await,
        2,
        "the killed worker's two tasks were leased again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unstamped_and_stale_completions_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"))
        .with("HALLMARK_METRICS_LISTEN", &metrics);
    let _c = spec.start().await;
    let url = spec.url();
    let worker_id = fake_worker(&url).await;
    submit(&url, 2, 0).await;
    let mut w = workers_client(&url).await;
    let mut leases: Vec<hallmark_proto::v1::TaskLease> = Vec::new();
    for _ in 0..2 {
        let held = leases
            .iter()
            .map(|l| hallmark_proto::v1::HeldLease {
                task_id: l.task_id.clone(),
                fencing_token: l.fencing_token,
                progress: 0.0,
            })
            .collect();
        leases.extend(
            w.lease(LeaseRequest {
                worker_id: worker_id.clone(),
                held,
                want: 1,
                wait_ms: 2000,
                loaded_model: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .leases,
        );
    }
    assert_eq!(leases.len(), 2);
    let (lease, other) = (leases.remove(0), leases.remove(0));
    let good = stamp_for(&lease, &worker_id);
    let upload = |token: i64, bytes: &[u8], watermark_id: &str| {
        let header = CompleteHeader {
            worker_id: worker_id.clone(),
            task_id: lease.task_id.clone(),
            fencing_token: token,
            sha256: sha256(bytes),
            size: bytes.len() as u64,
            media_type: "image/png".into(),
            width: 192,
            height: 192,
            watermark_id: watermark_id.into(),
        };
        tokio_stream::iter(vec![
            CompleteMessage {
                body: Some(Body::Header(header)),
            },
            CompleteMessage {
                body: Some(Body::Data(bytes.to_vec())),
            },
        ])
    };
    let artifacts = || scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts");

    // A plain PNG: no content credentials.
    let mut plain = Vec::new();
    image::RgbImage::new(192, 192)
        .write_to(
            &mut std::io::Cursor::new(&mut plain),
            image::ImageFormat::Png,
        )
        .unwrap();
    let err = w
        .complete(upload(lease.fencing_token, &plain, &good.watermark_id))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
    assert!(err.message().contains("unstamped upload"), "{err}");
    // Stamped, but for another task.
    let theirs = stamp_for(&other, &worker_id);
    let err = w
        .complete(upload(
            lease.fencing_token,
            &theirs.bytes,
            &theirs.watermark_id,
        ))
        .await
        .unwrap_err();
    assert!(err.message().contains("made for task"), "{err}");
    // Stamped for this task, declaring another watermark id.
    let err = w
        .complete(upload(lease.fencing_token, &good.bytes, "0123456789abcdef"))
        .await
        .unwrap_err();
    assert!(err.message().contains("soft binding names"), "{err}");
    // Validly signed for this task, but the pixels carry no mark.
    let unmarked = {
        use hallmark_provenance::credentials::{self, ImageFormat, Stamp, stamp::Stamper};
        let ca = test_ca();
        let stamper = Stamper::new(&ca.identity(None).unwrap(), None, ("test", "0")).unwrap();
        let record = credentials::GenerationRecord {
            task_id: lease.task_id.clone(),
            stage: "generate".into(),
            ..Default::default()
        };
        let pixels = hallmark_provenance::watermark::attacks::smooth_field(192, 192, 5);
        let png = credentials::encode_image(&pixels, ImageFormat::Png).unwrap();
        let stamp = Stamp {
            title: "unmarked".into(),
            record: &record,
            watermark_id: 0x0123_4567_89ab_cdef,
            training_mining: None,
            parent: None,
            input: None,
            mask: None,
        };
        stamper.sign(ImageFormat::Png, &png, &stamp).unwrap()
    };
    let err = w
        .complete(upload(lease.fencing_token, &unmarked, "0123456789abcdef"))
        .await
        .unwrap_err();
    assert!(
        err.message().contains("pixels do not carry watermark"),
        "{err}"
    );
    // Signed bytes with one pixel byte flipped: the hash binding breaks.
    let mut flipped = good.bytes.clone();
    let n = flipped.len();
    flipped[n - 30] ^= 1;
    let err = w
        .complete(upload(lease.fencing_token, &flipped, &good.watermark_id))
        .await
        .unwrap_err();
    assert!(err.message().contains("do not validate"), "{err}");
    assert_eq!(
        artifacts().await,
        0,
        "nothing recorded from refused uploads"
    );

    let err = w
        .complete(upload(
            lease.fencing_token + 1,
            &good.bytes,
            &good.watermark_id,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition, "{err}");
    assert!(err.message().contains("stale lease"), "{err}");
    assert_eq!(artifacts().await, 0);

    w.complete(upload(lease.fencing_token, &good.bytes, &good.watermark_id))
        .await
        .expect("current token accepted");
    assert_eq!(artifacts().await, 1);
    assert_eq!(
        scalar(
            &db,
            &format!(
                "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts WHERE watermark_id = '{}' \
                 AND manifest IS NOT NULL AND manifest_label LIKE 'urn:c2pa:%'",
                good.watermark_id
            )
        )
        .await,
        1,
        "the artifact is recorded with its watermark id and manifest"
    );
    // The refusals are counted by reason.
    let scrape = Scrape::get(&metrics);
    let refused = |reason| scrape.sum("hallmark_uploads_refused_total", &[("reason", reason)]);
    assert_eq!(refused("rejected"), Some(5.0));
    assert_eq!(refused("stale"), Some(1.0));
    assert_eq!(
        scrape.sum("hallmark_artifacts_recorded_total", &[]),
        Some(1.0)
    );
    // The same calls by gRPC status code.
    let completes = |code| {
        scrape.sum(
            "hallmark_grpc_requests_total",
            &[("method", "/hallmark.v1.Workers/Complete"), ("code", code)],
        )
    };
    assert_eq!(
        (
            completes("InvalidArgument"),
            completes("FailedPrecondition"),
            completes("Ok")
        ),
        (Some(5.0), Some(1.0), Some(1.0))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_killed_and_restarted_mid_job_finishes_the_job() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
    let mut coordinator = spec.start().await;
    let url = spec.url();
    let _workers: Vec<Proc> = (0..2)
        .map(|i| start_worker(&url, &format!("w{i}"), 20, &[]))
        .collect();
    wait_for_workers(&url, 2).await;
    let job_id = submit(&url, 80, 2).await;
    wait_for_count(
        &db,
        "some progress",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts",
        |n| n >= 10,
    )
    .await;
    coordinator.kill();
    assert!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await < 160,
        "killed mid-job"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _coordinator = spec.start().await;
    let job = wait_for_job(&url, &job_id, Duration::from_secs(90)).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await,
        160
    );
}

/// Submits a one-item job on `submit_url` while a lease call waits on
/// `lease_url`; true when the waiting call got the task before its wait ran
/// out, i.e. a wake-up crossed between the replicas (their poll interval is
/// longer than the wait).
async fn wake_up_crosses_replicas(lease_url: &str, submit_url: &str, worker_id: &str) -> bool {
    let mut w = workers_client(lease_url).await;
    let wid = worker_id.to_string();
    let waiting = tokio::spawn(async move {
        w.lease(LeaseRequest {
            worker_id: wid,
            held: vec![],
            want: 1,
            wait_ms: 8000,
            loaded_model: String::new(),
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    let job_id = submit(submit_url, 1, 0).await;
    let leases = waiting
        .await
        .unwrap()
        .expect("lease call")
        .into_inner()
        .leases;
    // Take the job out of the way of later checks.
    jobs_client(submit_url)
        .await
        .cancel_job(JobRef { job_id })
        .await
        .expect("cancel");
    !leases.is_empty()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_outage_slows_wake_ups_but_loses_no_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let mut redis = PrivateRedis::start();
    let a = CoordinatorSpec::new(&db, Some(redis.url()), dir.path().join("blobs"))
        .with("HALLMARK_POLL_INTERVAL_MS", 20_000);
    let b = CoordinatorSpec::new(&db, Some(redis.url()), dir.path().join("blobs"))
        .with("HALLMARK_POLL_INTERVAL_MS", 20_000);
    let _ca = a.start().await;
    let _cb = b.start().await;
    let fake = fake_worker(&a.url()).await;
    assert!(
        wake_up_crosses_replicas(&a.url(), &b.url(), &fake).await,
        "with Redis, a submit on B wakes a lease call on A"
    );

    // Redis goes away mid-job: the job still completes (lease calls fall back to polling).
    let mut workers: Vec<Proc> = (0..2)
        .map(|i| start_worker(&a.url(), &format!("w{i}"), 10, &[]))
        .collect();
    wait_for_workers(&a.url(), 2).await;
    let job_id = submit(&b.url(), 30, 2).await;
    wait_for_count(
        &db,
        "some progress",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts",
        |n| n >= 4,
    )
    .await;
    redis.stop();
    let job = wait_for_job(&b.url(), &job_id, Duration::from_secs(120)).await;
    assert_eq!(job.state, "succeeded");
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await,
        60
    );
    for w in &mut workers {
        assert!(
            w.terminate().success(),
            "worker drains and exits 0 on SIGTERM"
        );
    }
    assert!(
        !wake_up_crosses_replicas(&a.url(), &b.url(), &fake).await,
        "without Redis the wait runs out first"
    );

    // Redis is back: the replicas resubscribe and wake-ups cross again.
    redis.restart();
    tokio::time::sleep(Duration::from_secs(7)).await; // subscriber back-off tops out at 5 s
    assert!(
        wake_up_crosses_replicas(&a.url(), &b.url(), &fake).await,
        "wake-ups resume when Redis is back"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_never_lease_a_task_twice() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let a = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
    let b = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
    let _ca = a.start().await;
    let _cb = b.start().await;
    let mut workers = Vec::new();
    for i in 0..6 {
        let url = if i % 2 == 0 { a.url() } else { b.url() };
        workers.push(start_worker(
            &url,
            &format!("w{i}"),
            0,
            &["--max-batch", "3"],
        ));
    }
    wait_for_workers(&a.url(), 6).await;
    let job_id = submit(&a.url(), 300, 0).await;
    let job = wait_for_job(&b.url(), &job_id, Duration::from_secs(120)).await;
    assert_eq!(job.state, "succeeded");
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await,
        300
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE attempts <> 1"
        )
        .await,
        0,
        "every task was leased exactly once"
    );
    assert!(
        scalar(
            &db,
            "SELECT CAST(COUNT(DISTINCT worker_id) AS BIGINT) FROM artifacts"
        )
        .await
            >= 4
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_redis_the_submit_rate_falls_back_to_each_replicas_own_bucket() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let mut redis = PrivateRedis::start();
    let c = CoordinatorSpec::new(&db, Some(redis.url()), dir.path().join("blobs"))
        .with("HALLMARK_TENANT_SUBMIT_ITEMS_PER_MINUTE", 10);
    let _c = c.start().await;
    fake_worker(&c.url()).await;
    let try_submit = |n: usize| {
        let url = c.url();
        async move {
            jobs_client(&url)
                .await
                .submit(SubmitJobRequest {
                    spec: Some(synthetic_spec(n, 0)),
                    queue_unservable: false,
                })
                .await
                .map(|_| ())
                .map_err(|s| s.code())
        }
    };
    try_submit(6).await.unwrap();
    // Redis gone: submissions go on under this replica's own (fresh) bucket.
    redis.stop();
    try_submit(6).await.unwrap();
    assert_eq!(try_submit(6).await, Err(tonic::Code::ResourceExhausted));
    // Redis back (empty: it keeps nothing on disk here): a fresh shared
    // bucket, used again instead of the replica's.
    redis.restart();
    // Redis is left alone for a moment after it failed.
    tokio::time::sleep(hallmark_coordinator::rate::REDIS_RETRY_AFTER + Duration::from_millis(500))
        .await;
    try_submit(6).await.unwrap();
    assert_eq!(try_submit(6).await, Err(tonic::Code::ResourceExhausted));
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await,
        3,
        "refused jobs leave no rows"
    );
}
