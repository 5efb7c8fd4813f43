//! The refine stage end to end on real processes: generate on one model's
//! workers, refine on another's, upscale from the refined image, and every
//! file's credentials and the repository's lineage name that chain.

use std::time::Duration;

use hallmark_e2e::*;
use serde_json::Value;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refine_stage_runs_on_the_refiners_workers_and_the_chain_is_in_every_file() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let anchors = test_ca().root_cert.to_str().unwrap().to_string();
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_TRUST_ANCHORS", &anchors);
    let _c = spec.start().await;
    let url = spec.url();
    // Base and refiner on separate workers: each stage must find its own.
    let _base = start_worker(&url, "base", 0, &["--model", "synth-base"]);
    let _refiner = start_worker(&url, "refiner", 0, &["--model", "synth-refiner"]);
    wait_for_workers(&url, 2).await;

    let files = dir.path().join("files");
    run_job(
        &url,
        &[
            "--engine",
            "synthetic",
            "--model",
            "synth-base",
            "--refine-model",
            "synth-refiner",
            "--refine-strength",
            "0.4",
            "--prompt",
            "a harbour in fog",
            "--prompt",
            "a desert road",
            "--upscale",
            "2",
            "--width",
            "256",
            "--height",
            "256",
        ],
        &files,
        Duration::from_secs(60),
    )
    .await;

    let job: Value =
        serde_json::from_slice(&std::fs::read(files.join("job.json")).unwrap()).unwrap();
    let artifacts = job["artifacts"].as_array().unwrap();
    assert_eq!(artifacts.len(), 6, "{job:#}");
    let stages: Vec<(&str, &str)> = job["job"]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["stage"].as_str().unwrap(),
                s["model_id"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        stages,
        [
            ("generate", "synth-base"),
            ("refine", "synth-refiner"),
            ("upscale", "synth-base")
        ]
    );
    // `hallmark status` names the refiner on its stage's line.
    let job_id = job["job"]["job_id"].as_str().unwrap();
    let status = ok(&hallmark(&["--coordinator", &url, "status", job_id]));
    let refine_line = status
        .lines()
        .find(|l| l.trim_start().starts_with("refine"));
    assert!(
        refine_line.is_some_and(|l| l.ends_with("model synth-refiner")),
        "{status}"
    );
    assert!(
        status
            .lines()
            .filter(|l| l.contains("model synth-refiner"))
            .count()
            == 1,
        "{status}"
    );
    for item in 0..2u64 {
        let of = |stage: &str| {
            artifacts
                .iter()
                .find(|a| a["item_index"] == item && a["stage"] == stage)
                .unwrap_or_else(|| panic!("item {item} has no {stage} artifact: {job:#}"))
        };
        let (generated, refined, upscaled) = (of("generate"), of("refine"), of("upscale"));
        assert_eq!(refined["parent_sha256"], generated["sha256"]);
        assert_eq!(upscaled["parent_sha256"], refined["sha256"]);
        assert_eq!(refined["model_id"], "synth-refiner");
        assert_eq!(upscaled["model_id"], "synth-base");
        assert_ne!(refined["worker_id"], generated["worker_id"]);
        assert_eq!(upscaled["worker_id"], generated["worker_id"]);
        assert_eq!(
            (refined["width"].as_u64(), upscaled["width"].as_u64()),
            (Some(256), Some(512))
        );
    }

    // The refined file: its own mark under the refine key, its base as the
    // parentOf ingredient, edited (not resized), with the strength it ran at.
    let refined = files.join("00000-refine.png");
    let (code, report) = verify_json(&[refined.to_str().unwrap(), "--trust-anchors", &anchors]);
    assert_eq!(code, 0, "{report:#}");
    let record = &report["credentials"]["generation"];
    assert_eq!(
        (&record["stage"], &record["model_id"], &record["strength"]),
        (&"refine".into(), &"synth-refiner".into(), &0.4.into())
    );
    assert_eq!(report["watermark"]["stage"], "refine");
    assert_eq!(
        report["credentials"]["actions"],
        serde_json::json!(["c2pa.opened", "c2pa.edited", "c2pa.watermarked.bound"])
    );
    assert_eq!(
        report["credentials"]["parent"]["generation"]["stage"],
        "generate"
    );
    // The upscale's parent is the refined image, and the repository walks
    // the whole chain from it.
    let up = files.join("00000-upscalex2.png");
    let (code, report) = verify_json(&[
        up.to_str().unwrap(),
        "--trust-anchors",
        &anchors,
        "--coordinator",
        &url,
    ]);
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(
        report["credentials"]["parent"]["generation"]["stage"],
        "refine"
    );
    let chain: Vec<&str> = report["repository"]["chain"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["stage"].as_str().unwrap())
        .collect();
    assert_eq!(chain, ["generate", "refine", "upscale"], "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn render_refines_on_the_embedded_farm_and_refuses_a_bad_strength() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let out_dir = dir.path().join("out");
    let render = |extra: &[&str]| {
        hallmark(
            &[
                &[
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
                ][..],
                extra,
            ]
            .concat(),
        )
    };
    // The embedded workers serve the refiner the job names.
    let out = render(&["--refine-model", "synthetic-refiner"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: std::collections::BTreeSet<String> = std::fs::read_dir(&out_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    assert_eq!(
        names,
        ["00000-refine.png", "00000.png", "job.json"]
            .map(String::from)
            .into()
    );

    let out = render(&["--refine-strength", "1.5"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("refine.strength") && err.contains("1.5"),
        "{err}"
    );
}
