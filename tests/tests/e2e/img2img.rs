//! img2img through the farm: an init image uploaded by the CLI to a real
//! coordinator process, fetched by a real worker process, rendered from,
//! named in each output's credentials and in the repository's lineage —
//! and every kind of bad input refused before a job exists. The diffusion
//! engine's img2img on a tiny checkpoint runs through the embedded farm.

use std::path::Path;

use hallmark_e2e::*;
use hallmark_proto::v1::{Chunk, SubmitJobRequest};

/// Mean absolute difference per channel value.
fn mean_diff(a: &image::RgbImage, b: &image::RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    let sum: u64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| u64::from(x.abs_diff(y)))
        .sum();
    sum as f64 / a.as_raw().len() as f64
}

/// `png` with a `tEXt` chunk added before `IEND`: still a valid image,
/// but no longer the bytes its C2PA hash binding covers.
fn with_text_chunk(png: &[u8]) -> Vec<u8> {
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= u32::from(b);
            for _ in 0..8 {
                c = if c & 1 == 1 {
                    (c >> 1) ^ 0xEDB8_8320
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let body = b"tEXtComment\0edited";
    let iend = png.len() - 12;
    assert_eq!(&png[iend + 4..iend + 8], b"IEND");
    let mut out = png[..iend].to_vec();
    out.extend_from_slice(&((body.len() - 4) as u32).to_be_bytes());
    out.extend_from_slice(body);
    out.extend_from_slice(&crc32(body).to_be_bytes());
    out.extend_from_slice(&png[iend..]);
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn init_image_is_uploaded_rendered_from_and_named_in_the_lineage() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let anchors = test_ca().root_cert.to_str().unwrap().to_string();
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_TRUST_ANCHORS", &anchors);
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &[]);
    wait_for_workers(&url, 1).await;

    // The uploader refuses what is not an image, and a job cannot name an
    // input that was never uploaded; no job row is written.
    let mut jobs = jobs_client(&url).await;
    let garbage = vec![Chunk {
        data: b"\x89PNG\r\n\x1a\nnot really".to_vec(),
    }];
    let err = jobs
        .upload_input(tokio_stream::iter(garbage))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("not a usable image"), "{err:?}");
    let err = jobs
        .upload_input(tokio_stream::iter(Vec::<Chunk>::new()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let mut never = synthetic_spec(1, 0);
    never.init_image_sha256 = "cd".repeat(32);
    never.strength = 0.5;
    let err = jobs
        .submit(SubmitJobRequest {
            spec: Some(never),
            queue_unservable: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("init_image_sha256"), "{err:?}");
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM jobs").await, 0);

    // The CLI uploads the photograph (451×300: the job keeps its size,
    // rounded down to 448×296) and renders from it, upscaled ×2.
    let init = photo("chelsea.png");
    let init_sha = hallmark_provenance::sha256_hex(&std::fs::read(&init).unwrap());
    let render = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--coordinator",
            url.as_str(),
            "--json",
            "render",
            "--prompt",
            "a cat on a sofa",
            "--seed",
            "5",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        hallmark(&args)
    };
    let img2img = dir.path().join("img2img");
    let out = render(
        &img2img,
        &[
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            "0.25",
            "--upscale",
            "2",
        ],
    );
    ok(&out);
    assert_eq!(json_of(&out)["job"]["state"], "succeeded");
    let base = img2img.join("00000.png");
    assert_eq!(image::image_dimensions(&base).unwrap(), (448, 296));
    assert_eq!(
        image::image_dimensions(img2img.join("00000-upscalex2.png")).unwrap(),
        (896, 592)
    );
    // The worker rendered from the photograph: at strength 0.25 the output
    // is far closer to it than the same prompt and seed without it.
    let text2img = dir.path().join("text2img");
    ok(&render(&text2img, &["--width", "448", "--height", "296"]));
    let target =
        image::imageops::resize(&rgb(&init), 448, 296, image::imageops::FilterType::Lanczos3);
    let (with, without) = (
        mean_diff(&rgb(&base), &target),
        mean_diff(&rgb(&text2img.join("00000.png")), &target),
    );
    assert!(
        with * 3.0 < without,
        "img2img output differs from its init image by {with:.1} per value, the text-to-image one by {without:.1}"
    );

    // Its credentials name the init image (its sha256 in the signed
    // generation record, the file as the `inputTo` ingredient).
    let out = hallmark(&[
        "--json",
        "verify",
        base.to_str().unwrap(),
        "--trust-anchors",
        &anchors,
        "--coordinator",
        &url,
    ]);
    ok(&out);
    let report = json_of(&out);
    assert_eq!(report["status"], "verified", "{report:#}");
    let c = &report["credentials"];
    assert_eq!(c["generation"]["init_image_sha256"], init_sha.as_str());
    assert_eq!(c["generation"]["strength"], 0.25);
    assert_eq!(c["actions"][0], "c2pa.created");
    assert!(
        c["input"]["title"]
            .as_str()
            .unwrap()
            .starts_with("init image of"),
        "{c:#}"
    );
    assert!(c["input"]["manifest_label"].is_null(), "the photo had none");
    // The repository's lineage starts at the uploaded input.
    let chain = report["repository"]["chain"].as_array().unwrap();
    assert_eq!(chain[0]["stage"], "generate");
    assert_eq!(chain[0]["parent_sha256"], init_sha.as_str(), "{report:#}");
    // The upscale names the img2img render as its base, as any upscale.
    let out = hallmark(&[
        "--json",
        "verify",
        img2img.join("00000-upscalex2.png").to_str().unwrap(),
        "--trust-anchors",
        &anchors,
    ]);
    ok(&out);
    let up = json_of(&out);
    assert_eq!(
        up["credentials"]["parent"]["generation"]["init_image_sha256"],
        init_sha.as_str()
    );
    assert!(up["credentials"]["generation"]["init_image_sha256"].is_null());

    // A Hallmark output as the init image of another job: the new image's
    // ingredient carries the first one's manifest, generation record and all.
    let again = dir.path().join("again");
    ok(&render(
        &again,
        &["--init-image", base.to_str().unwrap(), "--strength", "0.5"],
    ));
    let out = hallmark(&[
        "--json",
        "verify",
        again.join("00000.png").to_str().unwrap(),
        "--trust-anchors",
        &anchors,
    ]);
    ok(&out);
    let input = &json_of(&out)["credentials"]["input"];
    assert!(input["manifest_label"].is_string(), "{input:#}");
    assert_eq!(
        input["generation"]["task_id"], c["generation"]["task_id"],
        "{input:#}"
    );
    // The same file with its credentials broken is refused at upload, before
    // any task could fail on it.
    let broken = dir.path().join("broken.png");
    std::fs::write(&broken, with_text_chunk(&std::fs::read(&base).unwrap())).unwrap();
    let out = render(
        &dir.path().join("never"),
        &[
            "--init-image",
            broken.to_str().unwrap(),
            "--strength",
            "0.5",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("content credentials do not validate"), "{err}");
    assert!(!dir.path().join("never").exists());

    // A prompt file whose lines name their own init images (relative to
    // the file) and strengths, beside a plain text-to-image line.
    let bulk = dir.path().join("bulk");
    std::fs::create_dir(&bulk).unwrap();
    for name in ["chelsea.png", "coffee.png"] {
        std::fs::copy(photo(name), bulk.join(name)).unwrap();
    }
    let prompts = bulk.join("prompts.jsonl");
    std::fs::write(
        &prompts,
        "{\"prompt\": \"a cat\", \"init_image\": \"chelsea.png\"}\n\
         {\"prompt\": \"a cup\", \"init_image\": \"coffee.png\", \"strength\": 0.3}\n\
         {\"prompt\": \"a plain one\"}\n",
    )
    .unwrap();
    let bulk_out = dir.path().join("bulk-out");
    let out = hallmark(&[
        "--coordinator",
        &url,
        "render",
        prompts.to_str().unwrap(),
        "--strength",
        "0.2",
        "--width",
        "448",
        "--height",
        "296",
        "-o",
        bulk_out.to_str().unwrap(),
    ]);
    ok(&out);
    let resized = |name: &str| {
        image::imageops::resize(
            &rgb(&photo(name)),
            448,
            296,
            image::imageops::FilterType::Lanczos3,
        )
    };
    let (cat, cup) = (resized("chelsea.png"), resized("coffee.png"));
    let first = rgb(&bulk_out.join("00000.png"));
    let second = rgb(&bulk_out.join("00001.png"));
    // Each item starts from its own picture: closer to it than to the other.
    for (img, own, other) in [(&first, &cat, &cup), (&second, &cup, &cat)] {
        let (d_own, d_other) = (mean_diff(img, own), mean_diff(img, other));
        assert!(
            d_own * 1.5 < d_other,
            "{d_own:.1} from its own init image, {d_other:.1} from the other"
        );
    }
    let record = |i: usize| {
        let out = hallmark(&[
            "--json",
            "verify",
            bulk_out.join(format!("{i:05}.png")).to_str().unwrap(),
            "--trust-anchors",
            &anchors,
        ]);
        ok(&out);
        json_of(&out)["credentials"]["generation"].clone()
    };
    let sha_of = |name: &str| hallmark_provenance::sha256_hex(&std::fs::read(photo(name)).unwrap());
    let (r0, r1, r2) = (record(0), record(1), record(2));
    assert_eq!(r0["init_image_sha256"], sha_of("chelsea.png").as_str());
    assert_eq!(r0["strength"], 0.2, "the job's strength");
    assert_eq!(r1["init_image_sha256"], sha_of("coffee.png").as_str());
    assert_eq!(r1["strength"], 0.3, "the line's own");
    assert!(
        r2["init_image_sha256"].is_null() && r2["strength"].is_null(),
        "{r2:#}"
    );

    // The human-readable report says so too.
    let out = hallmark(&[
        "verify",
        base.to_str().unwrap(),
        "--trust-anchors",
        &anchors,
    ]);
    ok(&out);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("init image {}, strength 0.25", &init_sha[..12])),
        "{text}"
    );
}

#[test]
fn bad_init_images_and_strengths_are_refused_before_any_job() {
    let dir = tempfile::tempdir().unwrap();
    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, b"just text").unwrap();
    let init = photo("coffee.png");
    let cases: [(&[&str], &str); 5] = [
        (
            &["--init-image", "/nonexistent/photo.png"],
            "init image /nonexistent/photo.png: cannot read it",
        ),
        (
            &["--init-image", not_an_image.to_str().unwrap()],
            "not a usable image",
        ),
        (&["--strength", "0.5"], "--init-image"),
        (
            &["--init-image", init.to_str().unwrap(), "--strength", "1.5"],
            "strength",
        ),
        // 4 steps at strength 0.2 would run no step.
        (
            &["--init-image", init.to_str().unwrap(), "--strength", "0.2"],
            "steps",
        ),
    ];
    assert_renders_refused(dir.path(), &["--steps", "4"], &cases);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffusion_img2img_depends_on_its_init_image_and_strength() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-sd1");
    init_tiny(&model, "sd1");
    let state = dir.path().join("state");
    let render = |name: &str, init: &Path, strength: &str| {
        let out_dir = dir.path().join(name);
        ok(&hallmark(&[
            "render",
            "--engine",
            "diffusion",
            "--model-path",
            model.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "-o",
            out_dir.to_str().unwrap(),
            "--prompt",
            "a cat",
            "--seed",
            "9",
            "--steps",
            "4",
            "--width",
            "192",
            "--height",
            "192",
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            strength,
            "--images-per-prompt",
            "2",
            "--workers",
            "1",
        ]));
        // Two items from one init image run as one batch.
        let second = rgb(&out_dir.join("00001.png"));
        let first = rgb(&out_dir.join("00000.png"));
        assert_ne!(first, second, "each item has its own seed");
        first
    };
    // Far-apart init images: through the tiny model's random VAE two
    // photographs come out alike; black and white do not.
    let (black, white) = (dir.path().join("black.png"), dir.path().join("white.png"));
    for (path, v) in [(&black, 0u8), (&white, 255)] {
        image::RgbImage::from_pixel(200, 200, image::Rgb([v, v, v]))
            .save(path)
            .unwrap();
    }
    let from_black = render("black-a", &black, "0.25");
    let again = render("black-b", &black, "0.25");
    let from_white = render("white", &white, "0.25");
    let stronger = render("black-full", &black, "1.0");
    assert_eq!(from_black.dimensions(), (192, 192));
    // The same render twice differs only by its watermark (a fresh id each
    // time: 1.9–2.2 per value over five runs here); another init image
    // (4.0 here: the tiny model's random VAE damps it) or strength changes
    // more. Were the init image ignored, both would be watermark alone.
    let watermark = mean_diff(&from_black, &again);
    let (other_init, other_strength) = (
        mean_diff(&from_black, &from_white),
        mean_diff(&from_black, &stronger),
    );
    assert!(
        other_init > 1.5 * watermark && other_strength > 1.5 * watermark,
        "watermark alone {watermark:.2}, another init image {other_init:.2}, another strength {other_strength:.2}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_is_purged_after_its_retention_and_uploading_it_again_restores_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let metrics = format!("127.0.0.1:{}", free_port());
    let blobs = dir.path().join("blobs");
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), blobs.clone())
        .with("HALLMARK_INPUT_RETENTION_MS", 2_000)
        .with("HALLMARK_METRICS_LISTEN", &metrics);
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &[]);
    wait_for_workers(&url, 1).await;

    let init = photo("coffee.png");
    let sha = hallmark_provenance::sha256_hex(&std::fs::read(&init).unwrap());
    let blob = blobs.join(&sha[..2]).join(&sha);
    let render = |out: &str| {
        let out = hallmark(&[
            "--coordinator",
            url.as_str(),
            "--json",
            "render",
            "--prompt",
            "a cup of coffee",
            "--init-image",
            init.to_str().unwrap(),
            "--strength",
            "0.5",
            "-o",
            dir.path().join(out).to_str().unwrap(),
        ]);
        ok(&out);
        assert_eq!(json_of(&out)["job"]["state"], "succeeded");
    };
    render("first");

    // Two seconds after the job that used it, the input is purged: its
    // blob deleted, its row kept with the time, a ledger entry written.
    wait_for_count(
        &db,
        "purged inputs",
        &format!(
            "SELECT COUNT(*) FROM inputs WHERE sha256 = '{sha}' AND purged_at IS NOT NULL AND blob_pending = 0"
        ),
        |n| n == 1,
    )
    .await;
    assert!(!blob.exists(), "the purged input's blob is deleted");
    assert_eq!(
        scalar(
            &db,
            &format!(
                "SELECT COUNT(*) FROM audit_events WHERE kind = 'purge_input' AND subject = '{sha}'"
            )
        )
        .await,
        1
    );
    assert_eq!(
        Scrape::get(&metrics).sum("hallmark_inputs_purged_total", &[]),
        Some(1.0)
    );
    // What was made from it still names it.
    let first = dir.path().join("first/00000.png");
    let out = hallmark(&[
        "--json",
        "verify",
        first.to_str().unwrap(),
        "--coordinator",
        &url,
    ]);
    assert_eq!(
        json_of(&out)["credentials"]["generation"]["init_image_sha256"],
        sha.as_str()
    );

    // A job naming it is refused, saying why and what to do; none is written.
    let jobs_before = scalar(&db, "SELECT COUNT(*) FROM jobs").await;
    let mut named = synthetic_spec(1, 0);
    named.init_image_sha256 = sha.clone();
    named.strength = 0.5;
    let err = jobs_client(&url)
        .await
        .submit(SubmitJobRequest {
            spec: Some(named),
            queue_unservable: false,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(
        err.message()
            .contains(&format!("input image {sha} was purged at"))
            && err.message().contains("upload it again"),
        "{err:?}"
    );
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM jobs").await, jobs_before);

    // Uploading it again restores it, and a job renders from it.
    render("again");
    assert_eq!(
        scalar(
            &db,
            &format!(
                "SELECT COUNT(*) FROM audit_events WHERE kind = 'upload_input' AND subject = '{sha}' AND body LIKE '%\"restored\":true%'"
            )
        )
        .await,
        1
    );

    // A coordinator that died between a purge's commit and the blob's
    // deletion left the row purged and the blob marked: a later sweep
    // deletes it.
    assert!(blob.exists(), "restored with its blob");
    sqlx::any::install_default_drivers();
    let pool = sqlx::AnyPool::connect(&db).await.unwrap();
    let marked = sqlx::query(&format!(
        "UPDATE inputs SET purged_at = 1, blob_pending = 1 WHERE sha256 = '{sha}' AND purged_at IS NULL"
    ))
    .execute(&pool)
    .await
    .unwrap()
    .rows_affected();
    assert_eq!(marked, 1);
    wait_for_count(
        &db,
        "the left blob deleted",
        &format!("SELECT COUNT(*) FROM inputs WHERE sha256 = '{sha}' AND blob_pending = 0"),
        |n| n == 1,
    )
    .await;
    assert!(!blob.exists(), "the sweep deleted the blob the purge left");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_uploader_deletes_its_input_once_no_job_of_its_own_starts_from_it() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let blobs = dir.path().join("blobs");
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), blobs.clone());
    let _c = spec.start().await;
    let url = spec.url();
    // A slow worker: the job is still running when its input's deletion
    // is asked for.
    let _w = start_worker(&url, "w", 5_000, &[]);
    wait_for_workers(&url, 1).await;
    let init = photo("coffee.png");
    let sha = hallmark_provenance::sha256_hex(&std::fs::read(&init).unwrap());
    let blob = blobs.join(&sha[..2]).join(&sha);
    let cli = |args: &[&str]| hallmark(&[&["--coordinator", url.as_str()], args].concat());
    let submitted = cli(&[
        "--json",
        "submit",
        "--prompt",
        "a cup of coffee",
        "--init-image",
        init.to_str().unwrap(),
        "--strength",
        "0.5",
    ]);
    let job_id = json_of(&submitted)["job_id"].as_str().unwrap().to_string();
    assert!(blob.exists());
    // Listed with its size and when the retention (30 days by default)
    // may purge it.
    let listed = json_of(&cli(&["--json", "inputs", "list"]));
    let listed = listed.as_array().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0]["sha256"], sha.as_str());
    let (w, h) = image::image_dimensions(&init).unwrap();
    assert_eq!(
        (listed[0]["width"].as_u64(), listed[0]["height"].as_u64()),
        (Some(u64::from(w)), Some(u64::from(h)))
    );
    let last_used = listed[0]["last_used_at_ms"].as_i64().unwrap();
    assert_eq!(
        listed[0]["purge_after_ms"].as_i64().unwrap() - last_used,
        30 * 24 * 3_600_000
    );

    let busy = cli(&["inputs", "delete", init.to_str().unwrap()]);
    assert!(!busy.status.success());
    let stderr = String::from_utf8_lossy(&busy.stderr);
    assert!(
        stderr.contains(&format!(
            "is in use by job {job_id}, which has not finished"
        )),
        "{stderr}"
    );
    assert!(blob.exists(), "a refused deletion deletes nothing");

    let job = wait_for_job(&url, &job_id, std::time::Duration::from_secs(60)).await;
    assert_eq!(job.state, "succeeded");
    // By file or by hash, once its job is over.
    let out = ok(&cli(&["inputs", "delete", init.to_str().unwrap()]));
    assert_eq!(out.trim(), format!("deleted input {sha}"));
    assert!(
        !blob.exists(),
        "the last uploader's deletion purges the blob"
    );
    let listed = json_of(&cli(&["--json", "inputs", "list"]));
    assert_eq!(listed.as_array().map(Vec::len), Some(0), "{listed}");
    assert_eq!(
        scalar(
            &db,
            &format!(
                "SELECT COUNT(*) FROM inputs WHERE sha256 = '{sha}' AND purged_at IS NOT NULL"
            )
        )
        .await,
        1,
        "the row stays, for the lineage"
    );
    let again = cli(&["inputs", "delete", &sha]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains(&format!("no uploaded input image {sha}")),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let neither = cli(&["inputs", "delete", "not-a-file-or-hash"]);
    assert!(!neither.status.success());
    assert!(
        String::from_utf8_lossy(&neither.stderr).contains("is neither an input's sha256"),
        "{}",
        String::from_utf8_lossy(&neither.stderr)
    );
}
