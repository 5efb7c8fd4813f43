//! The `hallmark` CLI against a running coordinator: job control, listings,
//! the registry, health checking and reflection.

use std::time::Duration;

use hallmark_e2e::*;

fn run_ok(args: &[&str]) -> String {
    let out = hallmark(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

/// Runs `hallmark --coordinator URL --json ARGS` and parses its output.
fn on(url: &str, rest: &[&str]) -> serde_json::Value {
    let mut args = vec!["--coordinator", url, "--json"];
    args.extend_from_slice(rest);
    json(&args)
}

/// The command's JSON output (the last line, for commands that stream updates).
fn json(args: &[&str]) -> serde_json::Value {
    let stdout = run_ok(args);
    let last = stdout.trim().lines().last().unwrap_or_default();
    serde_json::from_str(last)
        .unwrap_or_else(|e| panic!("{args:?} printed no JSON ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_cancel_and_listings_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_HEARTBEAT_INTERVAL_MS", 200);
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "slow", 300, &["--max-batch", "1"]);
    eventually("worker listed", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            on(&url, &["workers"])
                .as_array()
                .is_some_and(|w| w.len() == 1 && w[0]["live"] == true)
        }
    })
    .await;

    let job = on(
        &url,
        &[
            "submit",
            "--prompt",
            "a",
            "--prompt",
            "b",
            "--prompt",
            "c",
            "--width",
            "192",
            "--height",
            "192",
            "--images-per-prompt",
            "4",
        ],
    );
    let id = job["job_id"].as_str().unwrap().to_string();
    assert_eq!(job["items"], 12);

    // Heartbeats carry the worker's progress on its running task.
    eventually("partial progress reported", Duration::from_secs(20), || {
        let url = url.clone();
        let id = id.clone();
        async move {
            let st = on(&url, &["status", &id]);
            let g = &st["stages"][0];
            let done = g["succeeded"].as_f64().unwrap() / g["total"].as_f64().unwrap();
            g["progress"].as_f64().unwrap() > done + 0.001
        }
    })
    .await;
    let paused = on(&url, &["pause", &id]);
    assert_eq!(paused["state"], "paused");
    // The worker hears of the pause on its next heartbeat and drops its lease.
    wait_for_count(
        &db,
        "no leased task while paused",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM tasks WHERE state = 'leased'",
        |n| n == 0,
    )
    .await;
    let done_while_paused = scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts").await,
        done_while_paused,
        "nothing renders while paused"
    );
    let status = on(&url, &["status", &id]);
    assert!(
        status["waiting_reason"]
            .as_str()
            .unwrap()
            .contains("paused"),
        "{status}"
    );

    assert_eq!(on(&url, &["resume", &id])["state"], "running");
    wait_for_count(
        &db,
        "progress after resume",
        "SELECT CAST(COUNT(*) AS BIGINT) FROM artifacts",
        |n| n > done_while_paused,
    )
    .await;
    let canceled = on(&url, &["cancel", &id]);
    assert_eq!(canceled["state"], "canceled");
    let jobs = on(&url, &["jobs"]);
    assert_eq!(jobs[0]["job_id"], id.as_str());
    assert_eq!(jobs[0]["state"], "canceled");
    // A canceled job cannot be resumed: refused with a non-zero exit.
    let out = hallmark(&["--coordinator", &url, "resume", &id]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("it is canceled"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_from_the_cli_links_models_to_datasets() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"));
    let _c = spec.start().await;
    let url = spec.url();
    let weights = dir.path().join("unet.safetensors");
    std::fs::write(&weights, b"pretend weights").unwrap();
    let index = dir.path().join("index.parquet");
    std::fs::write(&index, b"pretend dataset index").unwrap();
    let c = ["--coordinator", url.as_str(), "--json"];
    let d = json(
        &[
            &c[..],
            &[
                "datasets",
                "register",
                "--name",
                "laion",
                "--version",
                "5b",
                "--uri",
                "s3://datasets/laion",
                "--file",
                index.to_str().unwrap(),
                "--license",
                "cc-by-4.0",
            ],
        ]
        .concat(),
    );
    assert_eq!(d["content_sha256"].as_str().unwrap().len(), 64);
    let m = json(
        &[
            &c[..],
            &[
                "models",
                "register",
                "--id",
                "sd15-test",
                "--family",
                "sd15",
                "--weights",
                weights.to_str().unwrap(),
                "--dataset",
                "laion@5b",
                "--license",
                "openrail",
            ],
        ]
        .concat(),
    );
    assert_eq!(m["weights"][0]["path"], "unet.safetensors");
    assert_eq!(m["weights"][0]["size"], 15);
    let models = json(&[&c[..], &["models", "list"]].concat());
    assert_eq!(models[0]["training_datasets"][0], "laion@5b");
    assert_eq!(models[0]["refines_only"], false);
    // A refiner given by its files says so itself; a folder cannot be
    // told otherwise than it says.
    let refiner = json(
        &[
            &c[..],
            &[
                "models",
                "register",
                "--id",
                "refiner-files",
                "--family",
                "sdxl",
                "--weights",
                weights.to_str().unwrap(),
                "--refines-only",
            ],
        ]
        .concat(),
    );
    assert_eq!(refiner["refines_only"], true);
    let out = hallmark(
        &[
            &c[..],
            &[
                "models",
                "register",
                "--id",
                "y",
                "--family",
                "sdxl",
                "--model-path",
                dir.path().to_str().unwrap(),
                "--refines-only",
            ],
        ]
        .concat(),
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cannot be used with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut spec = synthetic_spec(1, 0);
    spec.model_id = "refiner-files".into();
    let err = jobs_client(&url)
        .await
        .submit(hallmark_proto::v1::SubmitJobRequest {
            spec: Some(spec),
            queue_unservable: true,
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("does not draw from noise"),
        "{err:?}"
    );
    let out = hallmark(
        &[
            &c[..],
            &[
                "models",
                "register",
                "--id",
                "x",
                "--family",
                "sd15",
                "--weights",
                weights.to_str().unwrap(),
                "--dataset",
                "nope@1",
            ],
        ]
        .concat(),
    );
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope@1"));
    assert_eq!(
        json(&[&c[..], &["datasets", "list"]].concat())
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coordinator_serves_health_checks_and_reflection() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"));
    let _c = spec.start().await;
    let channel = tonic::transport::Channel::from_shared(spec.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    for service in [
        "hallmark.v1.Jobs",
        "hallmark.v1.Workers",
        "hallmark.v1.Registry",
    ] {
        assert_serving(channel.clone(), service).await;
    }
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await
        .unwrap()
        .into_inner();
    let reply = stream.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
        panic!("unexpected reply {reply:?}")
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "hallmark.v1.Jobs",
        "hallmark.v1.Workers",
        "hallmark.v1.Registry",
        "grpc.health.v1.Health",
    ] {
        assert!(
            names.iter().any(|n| n == want),
            "{want} missing from {names:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_an_embedded_farm_that_outside_workers_and_clients_join() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let url = format!("http://{listen}");
    let metrics = format!("127.0.0.1:{}", free_port());
    let mut up = Proc::spawn(
        "hallmark up",
        std::process::Command::new(bin("hallmark")).args([
            "up",
            "--listen",
            &listen,
            "--workers",
            "1",
            "--render-ms",
            "300",
            "--state-dir",
            dir.path().join("state").to_str().unwrap(),
            "--metrics-listen",
            &metrics,
        ]),
    );
    eventually("the embedded farm answers", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                hallmark(&["--coordinator", &url, "workers"])
                    .status
                    .success()
            })
            .await
            .unwrap()
        }
    })
    .await;
    // An outside worker signs with the farm's (local test) CA, which the
    // embedded coordinator requires uploads to chain to.
    let ca = dir.path().join("state/ca");
    let ca_file = |name: &str| ca.join(name).to_str().unwrap().to_string();
    let (chain, key, root) = (
        ca_file("signer.pem"),
        ca_file("signer.key"),
        ca_file("root.pem"),
    );
    let _outside = start_worker(
        &url,
        "outside",
        0,
        &[
            "--cert-chain",
            &chain,
            "--private-key",
            &key,
            "--trust-anchors",
            &root,
        ],
    );
    eventually("two workers", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                on(&url, &["workers"])
                    .as_array()
                    .is_some_and(|w| w.len() == 2)
            })
            .await
            .unwrap()
        }
    })
    .await;
    let job = on(
        &url,
        &[
            "submit",
            "--prompt",
            "x",
            "--images-per-prompt",
            "8",
            "--width",
            "192",
            "--height",
            "192",
            "--watch",
        ],
    );
    assert_eq!(job["state"], "succeeded");
    // Every image verifies against the farm's CA, and the fast outside
    // worker made some of them.
    let files = dir.path().join("files");
    let job_id = job["job_id"].as_str().unwrap();
    run_ok(&[
        "--coordinator",
        &url,
        "download",
        job_id,
        "-o",
        files.to_str().unwrap(),
    ]);
    let out = std::process::Command::new(bin("hallmark"))
        .args(["--json", "verify", files.to_str().unwrap()])
        .env("HALLMARK_STATE_DIR", dir.path().join("state"))
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let reports: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let outside_id = on(&url, &["workers"])
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["name"] == "outside")
        .map(|w| w["worker_id"].clone())
        .unwrap();
    assert!(
        reports
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["credentials"]["generation"]["worker_id"] == outside_id),
        "no image from the outside worker: {reports:#}"
    );
    // The farm's endpoint carries the coordinator's metrics and its local
    // worker's (the outside worker has its own process).
    let by_outside = reports
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["credentials"]["generation"]["worker_id"] == outside_id)
        .count();
    let scrape = Scrape::get(&metrics);
    assert_eq!(scrape.sum("hallmark_tasks_leased_total", &[]), Some(8.0));
    assert_eq!(scrape.sum("hallmark_workers_live", &[]), Some(2.0));
    assert_eq!(
        scrape
            .sum("hallmark_worker_tasks_total", &[("outcome", "completed")])
            .unwrap_or(0.0),
        (8 - by_outside) as f64
    );
    assert!(
        up.terminate().success(),
        "`hallmark up` drains and exits 0 on SIGTERM"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_task_fails_its_job_with_the_reason_and_retry_runs_it_again() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"))
        .with("HALLMARK_FAILURE_COOLDOWN_MS", 0);
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &["--fail-marker", "[boom]"]);
    wait_for_workers(&url, 1).await;
    let submit = [
        "--coordinator",
        &url,
        "--json",
        "submit",
        "--prompt",
        "fine",
        "--prompt",
        "this one [boom]",
        "--upscale",
        "2",
        "--width",
        "192",
        "--height",
        "192",
        "--max-attempts",
        "2",
        "--watch",
    ];
    let out = hallmark(&submit);
    assert_eq!(out.status.code(), Some(1), "a failed job exits 1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(job["state"], "failed");
    assert!(
        job["errors"][0]
            .as_str()
            .unwrap()
            .contains("synthetic failure requested"),
        "{job}"
    );
    assert_eq!(job["stages"][0]["failed"], 1);
    assert_eq!(job["stages"][1]["failed"], 1, "its upscale fails with it");
    assert_eq!(
        job["stages"][1]["succeeded"], 1,
        "the good item finished end to end"
    );
    let id = job["job_id"].as_str().unwrap();
    assert_eq!(
        scalar(&db, "SELECT CAST(MAX(attempts) AS BIGINT) FROM tasks").await,
        2,
        "the retry budget was used"
    );

    let retried = on(&url, &["retry", id]);
    assert_eq!(retried["state"], "running");
    let out = hallmark(&["--coordinator", &url, "watch", id]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("synthetic failure requested"));
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM task_failures").await,
        4,
        "two attempts, twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_the_engine_refuses_as_asked_fails_for_good_at_its_first_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    // The failure cool-down stays at its default (30 s): a retry would
    // also take that long.
    let spec = CoordinatorSpec::new(&db, None, dir.path().join("blobs"));
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &["--refuse-marker", "[refused]"]);
    wait_for_workers(&url, 1).await;
    let out = hallmark(&[
        "--coordinator",
        &url,
        "--json",
        "submit",
        "--prompt",
        "fine",
        "--prompt",
        "this one [refused]",
        "--upscale",
        "2",
        "--width",
        "192",
        "--height",
        "192",
        "--max-attempts",
        "3",
        "--watch",
    ]);
    assert_eq!(out.status.code(), Some(1), "a failed job exits 1");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let job: serde_json::Value =
        serde_json::from_str(stdout.trim().lines().last().unwrap()).unwrap();
    assert_eq!(job["state"], "failed");
    assert!(
        job["errors"][0]
            .as_str()
            .unwrap()
            .contains("synthetic refusal requested"),
        "{job}"
    );
    assert_eq!(job["stages"][0]["failed"], 1);
    assert_eq!(job["stages"][1]["failed"], 1, "its upscale fails with it");
    assert_eq!(job["stages"][1]["succeeded"], 1);
    assert_eq!(
        scalar(
            &db,
            "SELECT CAST(MAX(attempts) AS BIGINT) FROM tasks WHERE stage = 'generate'"
        )
        .await,
        1,
        "one attempt of three: no retry can change a refusal"
    );
    // The ledger says why it was not retried. The log lists sealed entries,
    // and the job can end before the sealer's next pass.
    wait_for_count(
        &db,
        "the fail entry sealed",
        "SELECT COUNT(*) FROM audit_events WHERE kind = 'fail' AND seq IS NOT NULL",
        |n| n >= 1,
    )
    .await;
    let log = ok(&hallmark(&[
        "--coordinator",
        &url,
        "--json",
        "audit",
        "log",
    ]));
    let fails: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == "fail")
        .collect();
    assert_eq!(fails.len(), 1, "{fails:#?}");
    assert_eq!(fails[0]["body"]["for_good"], true, "{fails:#?}");
}

#[test]
fn watermark_embed_and_detect_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let photo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/images/rocket.jpg");
    let marked = dir.path().join("marked.jpg");
    let m = marked.to_str().unwrap();
    let out = hallmark(&[
        "--json",
        "watermark",
        "embed",
        photo.to_str().unwrap(),
        m,
        "--payload",
        "c0ffee0123456789",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let embedded: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(embedded["psnr_db"].as_f64().unwrap() >= 42.0);
    let found = json(&["--json", "watermark", "detect", m]);
    assert_eq!(found["found"], true);
    assert_eq!(found["payload"], "c0ffee0123456789");
    // Unmarked: exit 2 and says so.
    let out = hallmark(&["watermark", "detect", photo.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no watermark found"));
    // Another key sees nothing.
    let other = std::process::Command::new(bin("hallmark"))
        .args(["watermark", "detect", m])
        .env("HALLMARK_WATERMARK_KEY", "another deployment")
        .output()
        .unwrap();
    assert_eq!(other.status.code(), Some(2));
    // Bad input: a clear error, exit 1, no output file.
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"not an image").unwrap();
    let bad = dir.path().join("never.png");
    for (args, needle) in [
        (
            vec!["watermark", "detect", junk.to_str().unwrap()],
            "not a PNG or JPEG",
        ),
        (
            vec![
                "watermark",
                "embed",
                photo.to_str().unwrap(),
                bad.to_str().unwrap(),
                "--payload",
                "xyz",
            ],
            "not hexadecimal",
        ),
        (
            vec![
                "watermark",
                "embed",
                photo.to_str().unwrap(),
                bad.to_str().unwrap(),
                "--payload",
                "11112222333344445",
            ],
            "1 to 16 hex digits",
        ),
        (
            vec![
                "watermark",
                "embed",
                junk.to_str().unwrap(),
                bad.to_str().unwrap(),
                "--payload",
                "1",
            ],
            "not a PNG or JPEG",
        ),
    ] {
        let out = hallmark(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains(needle),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    assert!(!bad.exists());
}
