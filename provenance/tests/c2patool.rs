//! The official `c2patool` (0.27.22, installed by `scripts/services.sh`)
//! reads and validates what we sign, in every format, upscales included:
//! our own reader is not the only judge.

use std::path::PathBuf;
use std::process::Command;

use hallmark_provenance::credentials::stamp::Stamper;
use hallmark_provenance::credentials::{
    self, GenerationRecord, ImageFormat, SigningAlgorithm, Stamp, TrainingMining, UpscaleRecord, ca,
};
use hallmark_provenance::watermark::{self, EmbedOptions, WatermarkKey};

fn c2patool() -> PathBuf {
    let path = std::env::var_os("HALLMARK_C2PATOOL")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .map(|h| PathBuf::from(h).join(".cache/hallmark/c2patool/bin/c2patool"))
        })
        .expect("HOME or HALLMARK_C2PATOOL");
    assert!(
        path.is_file(),
        "{} is missing: scripts/services.sh installs c2patool 0.27.22 (or set HALLMARK_C2PATOOL)",
        path.display()
    );
    path
}

fn record(stage: &str) -> GenerationRecord {
    GenerationRecord {
        model_id: "sd15-test".into(),
        weights_sha256: "ab".repeat(32),
        seed: 7,
        steps: 20,
        guidance: 7.5,
        scheduler: "ddim".into(),
        stage: stage.into(),
        width: 256,
        height: 256,
        job_id: "job".into(),
        task_id: format!("job/0/{stage}"),
        worker_id: "w".into(),
        ..Default::default()
    }
}

/// `c2patool FILE trust --trust_anchors ROOT`: the report's JSON.
fn check(file: &std::path::Path, anchors: &std::path::Path) -> serde_json::Value {
    let out = Command::new(c2patool())
        .arg(file)
        .arg("trust")
        .arg("--trust_anchors")
        .arg(anchors)
        .output()
        .expect("run c2patool");
    assert!(
        out.status.success(),
        "c2patool failed on {}: {}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "c2patool output is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

#[test]
fn c2patool_validates_png_jpeg_and_webp_outputs_and_upscales() {
    let dir = tempfile::tempdir().unwrap();
    for alg in [SigningAlgorithm::Es256, SigningAlgorithm::Ed25519] {
        let files = ca::init(&dir.path().join(alg.name()), "Hallmark c2patool", alg).unwrap();
        let stamper = Stamper::new(
            &files.identity(None).unwrap(),
            Some(&files.trust_anchors().unwrap()),
            ("hallmark-test", "0"),
        )
        .unwrap();
        let key = WatermarkKey::from_secret(b"c2patool");
        let img = watermark::attacks::smooth_field(256, 256, 3);
        for format in [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Webp] {
            let sign = |pixels: &image::RgbImage, rec: &GenerationRecord, parent: Option<&[u8]>| {
                let marked = watermark::embed(pixels, 99, &key, EmbedOptions::default()).unwrap();
                let encoded = credentials::encode_image(&marked, format).unwrap();
                stamper
                    .sign(
                        format,
                        &encoded,
                        &Stamp {
                            title: "t".into(),
                            record: rec,
                            watermark_id: 99,
                            training_mining: Some(TrainingMining::default()),
                            parent,
                            input: None,
                            mask: None,
                        },
                    )
                    .unwrap()
            };
            let base = sign(&img, &record("generate"), None);
            let big =
                image::imageops::resize(&img, 512, 512, image::imageops::FilterType::Triangle);
            let mut up_rec = record("upscale");
            up_rec.upscale = Some(UpscaleRecord {
                method: "hires-fix".into(),
                factor: 2,
                strength: Some(0.4),
                steps: Some(20),
                ..Default::default()
            });
            let up = sign(&big, &up_rec, Some(&base));
            for (name, bytes) in [("base", &base), ("upscale", &up)] {
                let path = dir
                    .path()
                    .join(format!("{}-{name}.{}", alg.name(), format.extension()));
                std::fs::write(&path, bytes).unwrap();
                let report = check(&path, &files.root_cert);
                assert_eq!(
                    report["validation_state"], "Trusted",
                    "{alg:?} {format:?} {name}: {report:#}"
                );
                let active = report["active_manifest"].as_str().unwrap();
                let manifest = &report["manifests"][active];
                let labels: Vec<&str> = manifest["assertions"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter_map(|a| a["label"].as_str())
                    .collect();
                for label in [
                    "c2pa.soft-binding",
                    "com.hallmark.generation",
                    "cawg.training-mining",
                ] {
                    assert!(labels.contains(&label), "{name}: {labels:?}");
                }
                if name == "upscale" {
                    assert_eq!(manifest["ingredients"][0]["relationship"], "parentOf");
                    let generation = manifest["assertions"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .find(|a| a["label"] == "com.hallmark.generation")
                        .unwrap();
                    let upscale = &generation["data"]["upscale"];
                    assert_eq!(upscale["method"], "hires-fix", "{generation:#}");
                    assert_eq!(upscale["factor"], 2, "{generation:#}");
                }
            }
        }
    }
}

#[test]
fn c2patool_validates_an_img2img_output_and_its_init_image_ingredient() {
    let dir = tempfile::tempdir().unwrap();
    let files = ca::init(
        &dir.path().join("ca"),
        "Hallmark c2patool",
        SigningAlgorithm::Es256,
    )
    .unwrap();
    let stamper = Stamper::new(
        &files.identity(None).unwrap(),
        Some(&files.trust_anchors().unwrap()),
        ("hallmark-test", "0"),
    )
    .unwrap();
    let photo =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/images/rocket.jpg");
    let init = std::fs::read(&photo).unwrap();
    let mut rec = record("generate");
    rec.init_image_sha256 = Some(hallmark_provenance::sha256_hex(&init));
    rec.strength = Some(0.6);
    let key = WatermarkKey::from_secret(b"c2patool");
    let img = watermark::attacks::smooth_field(256, 256, 5);
    let marked = watermark::embed(&img, 5, &key, EmbedOptions::default()).unwrap();
    let encoded = credentials::encode_image(&marked, ImageFormat::Png).unwrap();
    let signed = stamper
        .sign(
            ImageFormat::Png,
            &encoded,
            &Stamp {
                title: "img2img.png".into(),
                record: &rec,
                watermark_id: 5,
                training_mining: None,
                parent: None,
                input: Some(&init),
                mask: None,
            },
        )
        .unwrap();
    let path = dir.path().join("img2img.png");
    std::fs::write(&path, &signed).unwrap();
    let report = check(&path, &files.root_cert);
    assert_eq!(report["validation_state"], "Trusted", "{report:#}");
    let active = report["active_manifest"].as_str().unwrap();
    let manifest = &report["manifests"][active];
    let ingredient = &manifest["ingredients"][0];
    assert_eq!(ingredient["relationship"], "inputTo", "{manifest:#}");
    assert_eq!(ingredient["format"], "image/jpeg", "{manifest:#}");
    // Our own reader agrees, and finds the record's link to the input.
    let ours = credentials::inspect(&signed, Some(&files.trust_anchors().unwrap())).unwrap();
    assert_eq!(ours.verdict, credentials::Verdict::Verified, "{ours:#?}");
    assert!(ours.input.is_some() && ours.parent.is_none(), "{ours:#?}");
    assert_eq!(
        ours.generation.unwrap().init_image_sha256,
        rec.init_image_sha256
    );

    // Inpainting: the mask is a second `inputTo` ingredient, told apart
    // from the init image by our reader.
    let mask_img = image::RgbImage::from_fn(64, 64, |x, _| image::Rgb([(x / 32 * 255) as u8; 3]));
    let mask = credentials::encode_image(&mask_img, ImageFormat::Png).unwrap();
    rec.mask_sha256 = Some(hallmark_provenance::sha256_hex(&mask));
    let signed = stamper
        .sign(
            ImageFormat::Png,
            &encoded,
            &Stamp {
                title: "inpainted.png".into(),
                record: &rec,
                watermark_id: 5,
                training_mining: None,
                parent: None,
                input: Some(&init),
                mask: Some(&mask),
            },
        )
        .unwrap();
    let path = dir.path().join("inpainted.png");
    std::fs::write(&path, &signed).unwrap();
    let report = check(&path, &files.root_cert);
    assert_eq!(report["validation_state"], "Trusted", "{report:#}");
    let manifest = &report["manifests"][report["active_manifest"].as_str().unwrap()];
    let formats: Vec<_> = manifest["ingredients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["relationship"].as_str().unwrap(),
                i["format"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        formats,
        [("inputTo", "image/jpeg"), ("inputTo", "image/png")],
        "{manifest:#}"
    );
    let ours = credentials::inspect(&signed, Some(&files.trust_anchors().unwrap())).unwrap();
    assert_eq!(ours.verdict, credentials::Verdict::Verified, "{ours:#?}");
    let title =
        |s: &Option<credentials::InputSummary>| s.as_ref().and_then(|s| s.title.clone()).unwrap();
    assert!(title(&ours.input).starts_with("init image of"), "{ours:#?}");
    assert!(
        title(&ours.mask).starts_with("inpainting mask of"),
        "{ours:#?}"
    );
    assert_eq!(ours.generation.unwrap().mask_sha256, rec.mask_sha256);
}
