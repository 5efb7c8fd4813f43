//! Provenance end to end on real processes: a farm stamps every output, the
//! `hallmark verify` CLI checks them offline, and an image stripped of its
//! metadata, shrunk and re-encoded leads back through its watermark to the
//! manifest repository — over gRPC and over the HTTP soft-binding API.

use std::path::Path;
use std::time::Duration;

use base64::Engine as _;
use hallmark_e2e::*;
use hallmark_proto::v1::registry_client::RegistryClient;
use hallmark_proto::v1::{Dataset, Model, WeightFile};
use hallmark_provenance::credentials;
use hallmark_provenance::watermark::attacks::Attack;
use serde_json::Value;

/// Strips everything but the pixels, shrinks to 0.75× and re-encodes as
/// JPEG quality 75.
fn launder(src: &Path, dst: &Path) {
    let img = image::open(src).unwrap().to_rgb8();
    let attacked = Attack::ResizeThenJpeg(0.75, 75).apply(&img);
    let bytes = credentials::encode_image(&attacked, credentials::ImageFormat::Jpeg).unwrap();
    std::fs::write(dst, bytes).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stamped_outputs_verify_and_a_laundered_copy_leads_back_to_its_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let http_addr = format!("127.0.0.1:{}", free_port());
    let anchors = test_ca().root_cert.to_str().unwrap().to_string();
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_HTTP_LISTEN", &http_addr)
        .with("HALLMARK_TRUST_ANCHORS", &anchors);
    let _c = spec.start().await;
    let url = spec.url();

    // Lineage roots: a dataset and a model trained on it.
    let mut registry = RegistryClient::new(channel(&url).await);
    registry
        .register_dataset(Dataset {
            name: "laion-mini".into(),
            version: "1".into(),
            uri: "s3://datasets/laion-mini/1".into(),
            content_sha256: "cd".repeat(32),
            license: "cc-by-4.0".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    registry
        .register_model(Model {
            model_id: "synth-prov".into(),
            family: "synthetic".into(),
            weights: vec![WeightFile {
                path: "*".into(),
                sha256: hallmark_provenance::sha256_hex(b"hallmark-synthetic:synth-prov"),
                size: 0,
            }],
            license: "apache-2.0".into(),
            training_datasets: vec!["laion-mini@1".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let _w = start_worker(
        &url,
        "w",
        0,
        &["--model", "synth-prov", "--prompt-policy", "keep"],
    );
    wait_for_workers(&url, 1).await;

    let files = dir.path().join("files");
    run_job(
        &url,
        &[
            "--engine",
            "synthetic",
            "--model",
            "synth-prov",
            "--prompt",
            "a lighthouse at dusk",
            "--upscale",
            "2",
            "--width",
            "256",
            "--height",
            "256",
            "--tenant",
            "acme",
        ],
        &files,
        Duration::from_secs(60),
    )
    .await;
    let base = files.join("00000.png");
    let up = files.join("00000-upscalex2.png");

    // Offline: both files verify against the deployment's root.
    let (code, report) = verify_json(&[base.to_str().unwrap(), "--trust-anchors", &anchors]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["status"], "verified");
    let gen_record = &report["credentials"]["generation"];
    assert_eq!(gen_record["stage"], "generate");
    assert_eq!(gen_record["model_id"], "synth-prov");
    assert_eq!(gen_record["prompt"], "a lighthouse at dusk");
    assert_eq!(gen_record["datasets"][0], "laion-mini@1");
    let (code, report) = verify_json(&[up.to_str().unwrap(), "--trust-anchors", &anchors]);
    assert_eq!(code, 0, "{report:#}");
    let up_id = report["credentials"]["watermark_id"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(
        report["watermark"]["id"],
        up_id.as_str(),
        "pixels carry the bound id"
    );
    assert_eq!(report["watermark"]["stage"], "upscale");
    assert_eq!(
        report["credentials"]["actions"],
        serde_json::json!(["c2pa.opened", "c2pa.resized", "c2pa.watermarked.bound"])
    );
    assert_eq!(
        report["credentials"]["parent"]["generation"]["task_id"],
        gen_record["task_id"]
    );
    let up_label = report["credentials"]["manifest_label"]
        .as_str()
        .unwrap()
        .to_string();
    // With another root the same file is not trusted.
    let other = tempfile::tempdir().unwrap();
    let ca_dir = other.path().join("ca");
    let out = hallmark(&[
        "ca",
        "init",
        ca_dir.to_str().unwrap(),
        "--organization",
        "Other",
    ]);
    assert!(out.status.success());
    let other_root = ca_dir.join("root.pem");
    let (code, report) = verify_json(&[
        up.to_str().unwrap(),
        "--trust-anchors",
        other_root.to_str().unwrap(),
    ]);
    assert_eq!((code, report["status"].as_str()), (1, Some("untrusted")));

    // Laundered: metadata gone, 0.75×, JPEG 75.
    let laundered = dir.path().join("laundered.jpg");
    launder(&up, &laundered);
    let (code, report) = verify_json(&[laundered.to_str().unwrap(), "--trust-anchors", &anchors]);
    assert_eq!(code, 2, "offline there is only the watermark: {report:#}");
    assert_eq!(report["status"], "watermark_only");
    assert_eq!(report["watermark"]["id"], up_id.as_str());
    let online = |tenant: &str| {
        verify_json(&[
            laundered.to_str().unwrap(),
            "--trust-anchors",
            &anchors,
            "--coordinator",
            &url,
            "--tenant",
            tenant,
        ])
    };
    let (code, report) = online("acme");
    assert_eq!(code, 1, "{report:#}");
    assert_eq!(report["status"], "recovered");
    assert!(
        report["summary"]
            .as_str()
            .unwrap()
            .contains("content differs from the signed bytes"),
        "{report:#}"
    );
    let repo = &report["repository"];
    assert_eq!(repo["manifest_label"], up_label.as_str());
    assert_eq!(repo["original"]["verdict"], "verified");
    assert_eq!(repo["model"]["model_id"], "synth-prov");
    assert_eq!(repo["datasets"][0]["name"], "laion-mini");
    let chain = repo["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2, "base image then upscale: {repo:#}");
    assert_eq!(chain[0]["stage"], "generate");
    assert_eq!(chain[1]["watermark_id"], up_id.as_str());
    assert_eq!(chain[1]["prompt"], "a lighthouse at dusk");
    // Another tenant sees the lineage but not the prompt.
    let (_, report) = online("someone-else");
    assert!(report["repository"]["chain"][1].get("prompt").is_none());

    // A watermark made with the key but never registered.
    let stray = dir.path().join("stray.png");
    let photo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/images/coffee.png");
    let out = hallmark(&[
        "watermark",
        "embed",
        photo.to_str().unwrap(),
        stray.to_str().unwrap(),
        "--payload",
        "0123456789abcdef",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (code, report) = verify_json(&[stray.to_str().unwrap(), "--coordinator", &url]);
    assert_eq!(code, 2, "{report:#}");
    assert!(
        report["summary"]
            .as_str()
            .unwrap()
            .contains("unknown to the repository")
    );

    // The C2PA soft-binding resolution API.
    let (status, body) = http(&http_addr, "GET", "/services/supportedAlgorithms", b"");
    assert_eq!(status, 200);
    let alg = credentials::SOFT_BINDING_ALG;
    assert_eq!(
        serde_json::from_slice::<Value>(&body).unwrap()["watermarks"][0]["alg"],
        alg
    );
    let value = base64::engine::general_purpose::STANDARD.encode(hex::decode(&up_id).unwrap());
    let value = value
        .replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D");
    let (status, body) = http(
        &http_addr,
        "GET",
        &format!("/matches/byBinding?alg={alg}&value={value}"),
        b"",
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let matches: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(matches["matches"][0]["manifestId"], up_label.as_str());
    let (status, body) = http(
        &http_addr,
        "POST",
        &format!("/matches/byContent?alg={alg}"),
        &std::fs::read(&laundered).unwrap(),
    );
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    let matches: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(matches["matches"][0]["manifestId"], up_label.as_str());
    let (status, manifest) = http(&http_addr, "GET", &format!("/manifests/{up_label}"), b"");
    assert_eq!(status, 200);
    let original = std::fs::read(&up).unwrap();
    assert_eq!(
        manifest,
        credentials::inspect::manifest_store(&original).unwrap(),
        "the repository serves the manifest the file was signed with"
    );
    let (status, body) = http(
        &http_addr,
        "GET",
        &format!("/matches/byBinding?alg={alg}&value=ASNFZ4mrze8%3D"),
        b"",
    );
    assert_eq!(
        (
            status,
            serde_json::from_slice::<Value>(&body).unwrap()["matches"]
                .as_array()
                .map(Vec::len)
        ),
        (200, Some(0))
    );
    let (status, _) = http(
        &http_addr,
        "GET",
        "/matches/byBinding?alg=com.example.other&value=AA%3D%3D",
        b"",
    );
    assert_eq!(status, 400);

    // A folder: one table, the worst outcome decides the exit code.
    std::fs::copy(&laundered, files.join("laundered.jpg")).unwrap();
    let out = hallmark(&[
        "verify",
        files.to_str().unwrap(),
        "--trust-anchors",
        &anchors,
    ]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{table}");
    assert!(table.contains("3 files: 2 verified"), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_output_verifies_out_of_the_box_and_a_changed_pixel_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out_dir = dir.path().join("out");
    let out = hallmark(&[
        "render",
        "--state-dir",
        state.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--prompt",
        "a red fox",
        "--width",
        "256",
        "--height",
        "256",
        "--workers",
        "1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("made a local test CA"),
        "the first render says it made a CA"
    );
    let file = out_dir.join("00000.png");
    let with_state = |args: &[&str]| {
        std::process::Command::new(bin("hallmark"))
            .args(args)
            .env("HALLMARK_STATE_DIR", &state)
            .output()
            .unwrap()
    };
    let out = with_state(&["verify", file.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // The same bytes with one byte of image data changed.
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 40] ^= 0x10;
    let tampered = dir.path().join("tampered.png");
    std::fs::write(&tampered, &bytes).unwrap();
    let out = with_state(&["--json", "verify", tampered.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let report = json_of(&out);
    assert_eq!(report["status"], "tampered");
    assert!(
        report["summary"].as_str().unwrap().contains("mismatch"),
        "{report:#}"
    );
    // JPEG and WebP outputs, upscales included, verify the same way.
    for format in ["jpeg", "webp"] {
        let dir_out = dir.path().join(format);
        let out = std::process::Command::new(bin("hallmark"))
            .args([
                "render",
                "-o",
                dir_out.to_str().unwrap(),
                "--prompt",
                "a blue whale",
                "--upscale",
                "2",
                "--width",
                "192",
                "--height",
                "192",
                "--workers",
                "1",
            ])
            .env("HALLMARK_STATE_DIR", &state)
            .env("HALLMARK_OUTPUT_FORMAT", format)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let out = with_state(&["--json", "verify", dir_out.to_str().unwrap()]);
        let reports = json_of(&out);
        let reports = reports.as_array().unwrap();
        assert_eq!(reports.len(), 2, "{format}: {reports:?}");
        for r in reports {
            assert_eq!(r["status"], "verified", "{format}: {r:#}");
            let expected = if format == "jpeg" {
                "image/jpeg"
            } else {
                "image/webp"
            };
            assert_eq!(r["credentials"]["format"], expected);
        }
        assert_eq!(out.status.code(), Some(0));
    }
    // Not an image at all.
    let junk = dir.path().join("junk.png");
    std::fs::write(&junk, b"definitely not a picture").unwrap();
    let out = with_state(&["verify", junk.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("not a PNG, JPEG or WebP"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_soft_binding_api_limits_each_client_across_replicas_and_answers_429() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    // A Redis of its own: the buckets of other tests' coordinators (all
    // on 127.0.0.1) stay out of this one.
    let redis = PrivateRedis::start();
    let replica = |proxy_header: Option<&str>| {
        let http = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let mut spec = CoordinatorSpec::new(&db, Some(redis.url()), dir.path().join("blobs"))
            .with("HALLMARK_HTTP_LISTEN", &http)
            .with("HALLMARK_METRICS_LISTEN", &metrics)
            .with("HALLMARK_HTTP_REQUESTS_PER_MINUTE", 3);
        if let Some(header) = proxy_header {
            spec = spec.with("HALLMARK_HTTP_CLIENT_ADDRESS_HEADER", header);
        }
        (spec, http, metrics)
    };
    let (a, a_http, _) = replica(None);
    let (b, b_http, b_metrics) = replica(None);
    let (c, c_http, _) = replica(Some("x-forwarded-for"));
    let _running = (a.start().await, b.start().await, c.start().await);
    let get = |addr: &str, headers: &[(&str, &str)]| {
        http_request(addr, "GET", "/services/supportedAlgorithms", headers, b"")
    };

    // Three requests on one replica spend this client's minute, and the
    // other replica, sharing the bucket through Redis, refuses the fourth.
    for _ in 0..3 {
        assert_eq!(get(&a_http, &[]).status, 200);
    }
    let refused = get(&b_http, &[]);
    assert_eq!(refused.status, 429);
    let error = refused.json()["error"].as_str().unwrap().to_string();
    assert!(
        error.contains("client \"127.0.0.1\" is over its limit of 3 requests per minute"),
        "{error}"
    );
    // At 3 per minute one request takes 20 s to come back.
    let retry: u64 = refused.header("retry-after").unwrap().parse().unwrap();
    assert!((15..=20).contains(&retry), "Retry-After: {retry}");
    assert_eq!(
        Scrape::get(&b_metrics).sum("hallmark_http_api_rate_limited_total", &[]),
        Some(1.0)
    );
    // The refusal is before any work: a POST of an image is refused too.
    let photo = std::fs::read(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/images/coffee.png"),
    )
    .unwrap();
    let post = http_request(
        &a_http,
        "POST",
        &format!("/matches/byContent?alg={}", credentials::SOFT_BINDING_ALG),
        &[],
        &photo,
    );
    assert_eq!(post.status, 429);

    // Behind a proxy the client is the address the proxy added last: the
    // connections all come from 127.0.0.1, but each client has its own
    // bucket, and an address a client puts in front cannot change its own.
    let client = [("x-forwarded-for", "192.0.2.1, 198.51.100.7")];
    for _ in 0..3 {
        assert_eq!(get(&c_http, &client).status, 200);
    }
    let refused = get(&c_http, &[("x-forwarded-for", "203.0.113.1, 198.51.100.7")]);
    assert_eq!(refused.status, 429);
    assert!(
        refused.json()["error"]
            .as_str()
            .unwrap()
            .contains("client \"198.51.100.7\""),
        "{}",
        String::from_utf8_lossy(&refused.body)
    );
    assert_eq!(
        get(&c_http, &[("x-forwarded-for", "198.51.100.8")]).status,
        200
    );
    // The replicas without the setting do not believe the header.
    assert_eq!(
        get(&a_http, &[("x-forwarded-for", "198.51.100.9")]).status,
        429
    );
}
