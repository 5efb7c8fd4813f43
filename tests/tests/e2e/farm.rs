//! End to end: real coordinator and worker processes on Postgres and Redis,
//! driven by the real `hallmark` CLI; and single-node `hallmark render`.

use std::time::Duration;

use hallmark_e2e::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_prompts_with_upscale_on_three_workers() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
    let _coordinator = spec.start().await;
    let url = spec.url();
    let _workers: Vec<Proc> = (0..3)
        .map(|i| start_worker(&url, &format!("w{i}"), 5, &[]))
        .collect();
    wait_for_workers(&url, 3).await;

    let prompts = prompt_file(dir.path(), 200);
    let out = hallmark(&[
        "--coordinator",
        &url,
        "--json",
        "submit",
        prompts.to_str().unwrap(),
        "--upscale",
        "2",
        "--width",
        "192",
        "--height",
        "192",
        "--seed",
        "7",
    ]);
    assert!(
        out.status.success(),
        "submit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let submitted: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("submit --json prints the job");
    let job_id = submitted["job_id"].as_str().expect("job_id").to_string();
    assert_eq!(submitted["items"], 200);

    let job = wait_for_job(&url, &job_id, Duration::from_secs(180)).await;
    assert_eq!(job.state, "succeeded", "{job:?}");

    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks").await,
        400
    );
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await,
        400
    );
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks t WHERE NOT EXISTS (SELECT 1 FROM artifacts a WHERE a.task_id = t.id)").await,
        0,
        "every task has its artifact"
    );
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts a JOIN artifacts b ON b.sha256 = a.parent_sha256 WHERE a.stage = 'upscale' AND b.item_index = a.item_index").await,
        200,
        "each upscale names its own item's base image"
    );
    assert_eq!(
        scalar(&db, "SELECT CAST(CASE WHEN (SELECT MIN(started_at) FROM tasks WHERE stage = 'upscale') < (SELECT MAX(finished_at) FROM tasks WHERE stage = 'generate') THEN 1 ELSE 0 END AS BIGINT)").await,
        1,
        "some upscale started before the last generate ended (no stage barrier)"
    );
    assert_eq!(
        scalar(
            &db,
            "SELECT CAST(COUNT(DISTINCT worker_id) AS BIGINT) FROM artifacts"
        )
        .await,
        3
    );

    let out_dir = dir.path().join("out");
    let out = hallmark(&[
        "--coordinator",
        &url,
        "download",
        &job_id,
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "download failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("job.json")).unwrap()).unwrap();
    let artifacts = manifest["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 400);
    for a in artifacts.iter().step_by(37) {
        let bytes = std::fs::read(out_dir.join(a["file"].as_str().unwrap())).unwrap();
        assert!(bytes.starts_with(b"\x89PNG"));
        assert_eq!(
            hallmark_provenance_sha(&bytes),
            a["sha256"].as_str().unwrap()
        );
    }
}

fn hallmark_provenance_sha(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let digest = <sha2_like::Sha256 as sha2_like::Digest>::digest(bytes);
    digest.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

mod sha2_like {
    pub use sha2::{Digest, Sha256};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_runs_the_whole_job_on_the_embedded_farm() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out_dir = dir.path().join("out");
    let args = [
        "render",
        "--state-dir",
        state.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--prompt",
        "a red fox",
        "--prompt",
        "a blue whale",
        "--upscale",
        "4",
        "--width",
        "192",
        "--height",
        "192",
        "--seed",
        "3",
        "--workers",
        "2",
    ];
    let out = hallmark(&args);
    assert!(
        out.status.success(),
        "render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("succeeded") && stdout.contains("wrote 4 images"),
        "{stdout}"
    );
    let upscaled = std::fs::read(out_dir.join("00001-upscalex4.png")).unwrap();
    // PNG IHDR: width and height as big-endian u32 at bytes 16..24.
    assert_eq!(
        &upscaled[16..24],
        &[0, 0, 3, 0, 0, 0, 3, 0],
        "768×768 after ×4"
    );
    // Same seed, same picture: a second run reproduces the first up to its
    // own watermark (every output gets a fresh id) and signature.
    let first = std::fs::read(out_dir.join("00000.png")).unwrap();
    std::fs::remove_dir_all(&out_dir).unwrap();
    let out = hallmark(&args);
    assert!(out.status.success());
    let second = std::fs::read(out_dir.join("00000.png")).unwrap();
    assert_ne!(
        first, second,
        "each output has its own watermark and manifest"
    );
    let decode = |b: &[u8]| image::load_from_memory(b).unwrap().to_rgb8();
    let psnr = hallmark_provenance::watermark::psnr(&decode(&first), &decode(&second));
    assert!(
        psnr > 38.0,
        "the two renders differ by more than two marks: {psnr:.1} dB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_can_live_in_an_s3_compatible_store() {
    let dir = tempfile::tempdir().unwrap();
    let moto = Moto::start();
    let db = fresh_database().await;
    let mut spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_BLOB_URL", moto.bucket_url());
    for (k, v) in moto.options() {
        spec = spec.with(&format!("HALLMARK_BLOB_OPTIONS__{}", k.to_uppercase()), v);
    }
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &[]);
    wait_for_workers(&url, 1).await;
    let out_dir = dir.path().join("out");
    let out = hallmark(&[
        "--coordinator",
        &url,
        "--json",
        "submit",
        "--prompt",
        "a",
        "--prompt",
        "b",
        "--upscale",
        "2",
        "--width",
        "192",
        "--height",
        "192",
        "--watch",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let last = String::from_utf8_lossy(&out.stdout)
        .lines()
        .last()
        .unwrap_or_default()
        .to_string();
    let job: serde_json::Value = serde_json::from_str(&last).unwrap();
    let job_id = job["job_id"].as_str().unwrap();
    let out = hallmark(&[
        "--coordinator",
        &url,
        "download",
        job_id,
        "-o",
        out_dir.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        std::fs::read(out_dir.join("00001-upscalex2.png"))
            .unwrap()
            .starts_with(b"\x89PNG")
    );
    // The blobs went to the bucket, not to the local blob directory.
    let local = walk(&dir.path().join("blobs"));
    assert!(local.is_empty(), "local blob dir holds {local:?}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                files.extend(walk(&p));
            } else {
                files.push(p);
            }
        }
    }
    files
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenants_submit_rate_is_shared_by_the_replicas_through_redis() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let a = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_TENANT_SUBMIT_ITEMS_PER_MINUTE", 10);
    let b = CoordinatorSpec {
        port: free_port(),
        ..a.clone()
    };
    let (_a, _b) = (a.start().await, b.start().await);
    let _w = start_worker(&a.url(), "w", 0, &[]);
    wait_for_workers(&a.url(), 1).await;
    // The buckets live in the shared Redis: a tenant of this run only.
    let tenant = format!("rate-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let submit = |url: &str, tenant: &str, images: u32| {
        hallmark(&[
            "--coordinator",
            url,
            "--json",
            "submit",
            "--prompt",
            "a kite",
            "--images-per-prompt",
            &images.to_string(),
            "--width",
            "192",
            "--height",
            "192",
            "--tenant",
            tenant,
        ])
    };
    ok(&submit(&a.url(), &tenant, 6));
    // Six more through the other replica: over the 10 per minute.
    let out = submit(&b.url(), &tenant, 6);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("over its limit of 10 items per minute") && err.contains("retry in"),
        "{err}"
    );
    // What is left still passes, through either replica; a job larger than
    // a minute's allowance is refused outright; other tenants are apart.
    ok(&submit(&b.url(), &tenant, 4));
    let out = submit(&a.url(), &tenant, 11);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("split it"), "{err}");
    ok(&submit(&a.url(), &format!("{tenant}-other"), 10));
    // The refused jobs left no rows.
    let jobs: serde_json::Value = serde_json::from_str(&ok(&hallmark(&[
        "--coordinator",
        &a.url(),
        "--json",
        "jobs",
        "--tenant",
        &tenant,
    ])))
    .unwrap();
    assert_eq!(jobs.as_array().map(Vec::len), Some(2), "{jobs:#}");
}

/// A worker leases its next batch as soon as the engine is done with the
/// last one and renders it while the last one's outputs are stamped and
/// uploaded; with one batch in hand it does one thing at a time. Seen in
/// the coordinator's own record: a task leased before an earlier batch's
/// completion was recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_renders_its_next_batch_while_the_last_is_stamped_and_uploaded() {
    for (in_hand, overlapping) in [("2", true), ("1", false)] {
        let dir = tempfile::tempdir().unwrap();
        let db = fresh_database().await;
        let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
        let _coordinator = spec.start().await;
        let url = spec.url();
        let _worker = start_worker(
            &url,
            "pipelined",
            100,
            &["--max-batch", "4", "--batches-in-hand", in_hand],
        );
        wait_for_workers(&url, 1).await;
        submit_and_finish(&url, dir.path(), 16, 512).await;
        assert_eq!(
            scalar(
                &db,
                "SELECT CAST(COUNT(DISTINCT started_at) AS BIGINT) FROM tasks"
            )
            .await,
            4,
            "four batches of four"
        );
        let overlaps = scalar(
            &db,
            "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks a JOIN tasks b \
             ON b.started_at > a.started_at AND b.started_at < a.finished_at",
        )
        .await;
        assert_eq!(
            overlaps > 0,
            overlapping,
            "{in_hand} batches in hand: {overlaps} tasks leased while an earlier batch was in hand"
        );
        // Never more than two batches in hand, so never more than one
        // leased while another's completion is outstanding.
        let most = scalar(
            &db,
            "SELECT CAST(COALESCE(MAX(n), 0) AS BIGINT) FROM (SELECT a.id, COUNT(DISTINCT b.started_at) AS n \
             FROM tasks a JOIN tasks b ON b.started_at > a.started_at AND b.started_at < a.finished_at \
             GROUP BY a.id) c",
        )
        .await;
        assert!(most <= 1, "{most} batches leased while one was in hand");
    }
}

/// While a worker waits for work with a batch still in hand (its outputs
/// being stamped and uploaded), its long poll ends by the next heartbeat,
/// so that batch's leases live on even when they are shorter than the
/// wait: every task renders once, none is leased twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_being_stamped_keeps_its_leases_while_the_worker_waits_for_work() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_LEASE_BASE_MS", 1500)
        .with("HALLMARK_LEASE_MS_PER_MEGAPIXEL_STEP", 0)
        .with("HALLMARK_HEARTBEAT_INTERVAL_MS", 300)
        .with("HALLMARK_REAP_INTERVAL_MS", 100);
    let _coordinator = spec.start().await;
    let url = spec.url();
    // One stamping thread on large outputs: the batch stays in hand for
    // seconds after its render, longer than a lease without heartbeats.
    let _worker = start_worker(
        &url,
        "stamping",
        50,
        &["--max-batch", "8", "--stamp-threads", "1"],
    );
    wait_for_workers(&url, 1).await;
    submit_and_finish(&url, dir.path(), 8, 2048).await;
    let held_for = scalar(
        &db,
        "SELECT CAST(MAX(finished_at - started_at) AS BIGINT) FROM tasks",
    )
    .await;
    assert!(
        held_for > 1500,
        "the batch was in hand {held_for} ms, not longer than its lease: the test shows nothing"
    );
    assert_eq!(
        scalar(&db, "SELECT CAST(MAX(attempts) AS BIGINT) FROM tasks").await,
        1,
        "no lease ran out while the batch was in hand ({held_for} ms)"
    );
}

/// Submits `n` prompts at `size`² and waits for the job to succeed.
async fn submit_and_finish(url: &str, dir: &std::path::Path, n: usize, size: u32) {
    let prompts = prompt_file(dir, n);
    let size = size.to_string();
    let out = hallmark(&[
        "--coordinator",
        url,
        "--json",
        "submit",
        prompts.to_str().unwrap(),
        "--width",
        &size,
        "--height",
        &size,
    ]);
    let job_id = json_of(&out)["job_id"].as_str().unwrap().to_string();
    let job = wait_for_job(url, &job_id, Duration::from_secs(120)).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_the_coordinator_forgot_registers_again_and_renders() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
    let _coordinator = spec.start().await;
    let url = spec.url();
    let _worker = start_worker(&url, "forgotten", 0, &[]);
    wait_for_workers(&url, 1).await;
    // The coordinator's record of the worker is gone (a database restored
    // from before it joined): its next lease call is told so.
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db).await.unwrap();
    let before: String = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_one(&pool)
        .await
        .unwrap();
    for sql in ["DELETE FROM worker_models", "DELETE FROM workers"] {
        sqlx::query(sql).execute(&pool).await.unwrap();
    }
    let prompts = prompt_file(dir.path(), 3);
    let out = hallmark(&[
        "--coordinator",
        &url,
        "--json",
        "submit",
        prompts.to_str().unwrap(),
        "--queue-unservable",
    ]);
    let job_id = json_of(&out)["job_id"].as_str().unwrap().to_string();
    let job = wait_for_job(&url, &job_id, Duration::from_secs(60)).await;
    assert_eq!(job.state, "succeeded", "{job:?}");
    let after: String = sqlx::query_scalar("SELECT id FROM workers")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_ne!(before, after, "it registered again, under a new id");
}
