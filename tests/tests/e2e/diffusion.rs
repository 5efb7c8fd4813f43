//! The diffusion engine in the farm, on tiny generated checkpoints: the
//! embedded `hallmark render`, and real coordinator + worker processes with
//! the model registered from its folder — outputs stamped and verified,
//! upscaled by Real-ESRGAN and by the hires fix, and weights that differ
//! from the registry refused.

use std::path::{Path, PathBuf};
use std::time::Duration;

use hallmark_e2e::*;

/// `hallmark --json verify DIR` with the embedded farm's state, which must pass.
fn verify_report(dir: &Path, state: &Path) -> String {
    ok(&std::process::Command::new(bin("hallmark"))
        .args(["--json", "verify", dir.to_str().unwrap()])
        .env("HALLMARK_STATE_DIR", state)
        .output()
        .unwrap())
}

/// The upscale record in the credentials of `NNNNN-upscalex2.png` files,
/// from a `--json verify` report of a folder.
fn upscale_records(report: &str) -> Vec<serde_json::Value> {
    let files: Vec<serde_json::Value> = serde_json::from_str(report).unwrap();
    files
        .iter()
        .filter(|f| f["path"].as_str().unwrap().ends_with("-upscalex2.png"))
        .map(|f| f["credentials"]["generation"]["upscale"].clone())
        .collect()
}

fn dims(p: &Path) -> (u32, u32) {
    image::image_dimensions(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_render_runs_the_diffusion_engine_and_the_esrgan_stage() {
    let dir = tempfile::tempdir().unwrap();
    let (model, esrgan) = (dir.path().join("tiny-sd1"), dir.path().join("esrgan"));
    init_tiny(&model, "sd1");
    init_tiny(&esrgan, "esrgan-x2");
    // The same weights served under a second id refine each image.
    let refiner = format!("refiner={}", model.display());
    let state = dir.path().join("state");
    let out_dir = dir.path().join("out");
    ok(&hallmark(&[
        "render",
        "--engine",
        "diffusion",
        "--model-path",
        model.to_str().unwrap(),
        "--model-path",
        &refiner,
        "--refine-model",
        "refiner",
        "--refine-strength",
        "0.5",
        "--upscaler",
        esrgan.to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "-o",
        out_dir.to_str().unwrap(),
        "--prompt",
        "a red fox",
        "--prompt",
        "a blue whale",
        "--seed",
        "7",
        "--width",
        "192",
        "--height",
        "192",
        "--steps",
        "4",
        "--scheduler",
        "dpmpp_2m_karras",
        "--upscale",
        "2",
        "--workers",
        "1",
    ]));
    for i in 0..2 {
        assert_eq!(dims(&out_dir.join(format!("{i:05}.png"))), (192, 192));
        let (base, refined) = (
            image::open(out_dir.join(format!("{i:05}.png")))
                .unwrap()
                .to_rgb8(),
            image::open(out_dir.join(format!("{i:05}-refine.png")))
                .unwrap()
                .to_rgb8(),
        );
        assert_eq!(refined.dimensions(), (192, 192));
        assert_ne!(base, refined, "item {i}: the refine re-rendered its base");
        assert_eq!(
            dims(&out_dir.join(format!("{i:05}-upscalex2.png"))),
            (384, 384)
        );
    }
    let report = verify_report(&out_dir, &state);
    assert!(
        report.contains("tiny-sd1"),
        "the generation record names the model: {report}"
    );
    // Each upscale names Real-ESRGAN and the digest of the weights it ran.
    let weights = std::fs::read_dir(&esrgan)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .unwrap();
    let digest = hallmark_provenance::sha256_hex(&std::fs::read(&weights).unwrap());
    // Each refine names its model, its strength and its base image, and
    // each upscale starts from the refined image.
    let files: Vec<serde_json::Value> = serde_json::from_str(&report).unwrap();
    let credentials = |suffix: &str| -> Vec<&serde_json::Value> {
        files
            .iter()
            .filter(|f| f["path"].as_str().unwrap().ends_with(suffix))
            .map(|f| &f["credentials"])
            .collect()
    };
    let refines = credentials("-refine.png");
    assert_eq!(refines.len(), 2, "{report}");
    for c in refines {
        let g = &c["generation"];
        assert_eq!(
            (&g["stage"], &g["model_id"], &g["strength"]),
            (&"refine".into(), &"refiner".into(), &0.5.into()),
            "{c:#}"
        );
        assert_eq!(c["parent"]["generation"]["stage"], "generate");
    }
    for c in credentials("-upscalex2.png") {
        assert_eq!(c["parent"]["generation"]["stage"], "refine", "{c:#}");
    }
    let records = upscale_records(&report);
    assert_eq!(records.len(), 2, "{report}");
    for r in records {
        assert_eq!(
            r,
            serde_json::json!({"method": "esrgan", "factor": 2, "weights_sha256": digest})
        );
    }

    // A model folder that is not one fails before anything is rendered.
    let out = hallmark(&[
        "render",
        "--engine",
        "diffusion",
        "--model-path",
        dir.path().to_str().unwrap(),
        "--state-dir",
        state.to_str().unwrap(),
        "-o",
        dir.path().join("none").to_str().unwrap(),
        "--prompt",
        "x",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model_index.json"), "{err}");
    assert!(!dir.path().join("none").exists(), "nothing written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_model_renders_on_a_worker_process_and_altered_weights_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-sd1");
    init_tiny(&model, "sd1");
    let db = fresh_database().await;
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"));
    let _c = spec.start().await;
    let url = spec.url();
    ok(&hallmark(&[
        "--coordinator",
        &url,
        "models",
        "register",
        "--id",
        "tiny-sd1",
        "--family",
        "sd15",
        "--model-path",
        model.to_str().unwrap(),
    ]));
    let model_arg = format!("tiny-sd1={}", model.display());
    let _w = start_worker(
        &url,
        "gpu-0",
        0,
        &[
            "--engine",
            "diffusion",
            "--model-path",
            &model_arg,
            "--default-upscale-method",
            "hires-fix",
            "--hires-steps",
            "3",
        ],
    );
    wait_for_workers(&url, 1).await;
    // A lighthouse at 192², 3 UniPC steps, upscaled ×2, with `extra` flags.
    let farm_render = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--coordinator",
            url.as_str(),
            "render",
            "--engine",
            "diffusion",
            "--model",
            "tiny-sd1",
            "--prompt",
            "a lighthouse",
            "--width",
            "192",
            "--height",
            "192",
            "--steps",
            "3",
            "--scheduler",
            "unipc",
            "--upscale",
            "2",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        hallmark(&args)
    };
    let out_dir = dir.path().join("out");
    ok(&farm_render(&out_dir, &[]));
    assert_eq!(dims(&out_dir.join("00000.png")), (192, 192));
    assert_eq!(dims(&out_dir.join("00000-upscalex2.png")), (384, 384));
    // The upscale's credentials say the worker's default method made it.
    let bytes = std::fs::read(out_dir.join("00000-upscalex2.png")).unwrap();
    let record = hallmark_provenance::credentials::inspect(&bytes, None)
        .unwrap()
        .generation
        .expect("generation record");
    let upscale = record.upscale.expect("upscale record");
    assert_eq!(
        (upscale.method.as_str(), upscale.factor, upscale.steps),
        ("hires-fix", 2, Some(3))
    );
    assert_eq!(upscale.weights_sha256, None, "{upscale:?}");
    // The default strength, written as configured (0.4, not the f32
    // nearest to it) where verifiers read it.
    assert_eq!(
        serde_json::to_value(&upscale).unwrap()["strength"],
        serde_json::json!(0.4)
    );

    // A job that names its method overrides the worker's default: this
    // worker has no Real-ESRGAN weights, so an esrgan upscale fails with
    // that reason (the job's errors name it).
    let esrgan_job = farm_render(
        &dir.path().join("out-esrgan"),
        &["--upscale-method", "esrgan", "--max-attempts", "1"],
    );
    assert!(!esrgan_job.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&esrgan_job.stdout),
        String::from_utf8_lossy(&esrgan_job.stderr)
    );
    assert!(text.contains("Real-ESRGAN weights"), "{text}");

    // The same model id served from weights that differ by one byte.
    let altered = dir.path().join("altered");
    std::fs::create_dir(&altered).unwrap();
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir(altered.join(sub)).unwrap();
        for e in std::fs::read_dir(model.join(sub)).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), altered.join(sub).join(e.file_name())).unwrap();
        }
    }
    std::fs::copy(
        model.join("model_index.json"),
        altered.join("model_index.json"),
    )
    .unwrap();
    let unet = altered.join("unet/diffusion_pytorch_model.safetensors");
    let mut bytes = std::fs::read(&unet).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&unet, bytes).unwrap();
    let ca = test_ca();
    let run = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(bin("hallmark-worker"))
            .env("HALLMARK_SIGNING_CERT_CHAIN", &ca.signer_chain)
            .env("HALLMARK_SIGNING_PRIVATE_KEY", &ca.signer_key)
            .args([
                "--coordinator",
                &url,
                "--name",
                "gpu-1",
                "--engine",
                "diffusion",
                "--model-path",
            ])
            .arg(format!("tiny-sd1={}", altered.display()))
            .output(),
    )
    .await
    .expect("the worker gives up instead of serving")
    .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("refusing to serve mismatched weights"),
        "{err}"
    );

    // SDXL's refiner, registered from its folder, is known to refine only:
    // a job that would draw from noise with it is refused at submission,
    // even one queued for workers yet to come, and no job is written.
    let refiner = dir.path().join("tiny-sdxl-refiner");
    init_tiny(&refiner, "sdxl-refiner");
    ok(&hallmark(&[
        "--coordinator",
        &url,
        "models",
        "register",
        "--id",
        "refiner",
        "--family",
        "sdxl",
        "--model-path",
        refiner.to_str().unwrap(),
    ]));
    let listed: Vec<serde_json::Value> = serde_json::from_str(&ok(&hallmark(&[
        "--coordinator",
        &url,
        "--json",
        "models",
        "list",
    ])))
    .unwrap();
    let refines_only =
        |id: &str| listed.iter().find(|m| m["model_id"] == id).unwrap()["refines_only"].clone();
    assert_eq!(
        (refines_only("refiner"), refines_only("tiny-sd1")),
        (true.into(), false.into())
    );
    let jobs = scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await;
    let out = hallmark(&[
        "--coordinator",
        &url,
        "submit",
        "--engine",
        "diffusion",
        "--model",
        "refiner",
        "--prompt",
        "a lighthouse",
        "--queue-unservable",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("model \"refiner\" refines images"), "{err}");
    assert_eq!(
        scalar(&db, "SELECT CAST(COUNT(*) AS BIGINT) FROM jobs").await,
        jobs
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_render_runs_an_sdxl_model_and_names_bad_hub_references() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-sdxl");
    init_tiny(&model, "sdxl");
    let state = dir.path().join("state");
    let out_dir = dir.path().join("out");
    let render = |model: &str, out: &Path| {
        hallmark(&[
            "render",
            "--engine",
            "diffusion",
            "--model-path",
            model,
            "--state-dir",
            state.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--prompt",
            "a red fox",
            "--negative",
            "fog",
            "--seed",
            "7",
            "--width",
            "256",
            "--height",
            "192",
            "--steps",
            "4",
            "--scheduler",
            "euler",
            "--workers",
            "1",
        ])
    };
    ok(&render(model.to_str().unwrap(), &out_dir));
    assert_eq!(dims(&out_dir.join("00000.png")), (256, 192));
    let report = verify_report(&out_dir, &state);
    assert!(report.contains("tiny-sdxl"), "{report}");

    // SDXL's refiner refines each image (the second text encoder alone,
    // aesthetic-score conditioning) and does not draw from noise.
    let refiner = dir.path().join("tiny-sdxl-refiner");
    init_tiny(&refiner, "sdxl-refiner");
    let refined = dir.path().join("refined");
    let state_arg = state.to_str().unwrap();
    let refine_args = |out: &Path, model: &str| -> Vec<String> {
        [
            "render",
            "--engine",
            "diffusion",
            "--model-path",
            model,
            "--model-path",
            &format!("refiner={}", refiner.display()),
            "--refine-model",
            "refiner",
            "--refine-strength",
            "0.5",
            "--state-dir",
            state_arg,
            "-o",
            out.to_str().unwrap(),
            "--prompt",
            "a red fox",
            "--seed",
            "7",
            "--width",
            "192",
            "--height",
            "192",
            "--steps",
            "4",
            "--workers",
            "1",
        ]
        .map(String::from)
        .to_vec()
    };
    let args = refine_args(&refined, model.to_str().unwrap());
    ok(&hallmark(
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    ));
    let (base, after) = (
        image::open(refined.join("00000.png")).unwrap().to_rgb8(),
        image::open(refined.join("00000-refine.png"))
            .unwrap()
            .to_rgb8(),
    );
    assert_eq!(after.dimensions(), (192, 192));
    assert_ne!(base, after, "the refiner changed nothing");
    let report = verify_report(&refined, &state);
    let files: Vec<serde_json::Value> = serde_json::from_str(&report).unwrap();
    let refine = files
        .iter()
        .find(|f| f["path"].as_str().unwrap().ends_with("-refine.png"))
        .expect("the refined file is verified");
    let g = &refine["credentials"]["generation"];
    assert_eq!(
        (&g["stage"], &g["model_id"]),
        (&"refine".into(), &"refiner".into()),
        "{refine:#}"
    );
    // As a job's own model it would have to draw from noise: refused
    // before the farm starts, naming why, and nothing is written.
    let alone = dir.path().join("alone");
    let mut args = refine_args(&alone, &format!("base={}", refiner.display()));
    args.retain(|a| {
        !["--refine-model", "refiner", "--refine-strength", "0.5"].contains(&a.as_str())
    });
    let out = hallmark(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is an SDXL refiner"), "{err}");
    assert!(!alone.exists(), "nothing written");

    // A malformed Hub reference is named, and nothing is written.
    let none = dir.path().join("none");
    let out = render("hf:no-owner", &none);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a Hub model reference"), "{err}");
    assert!(!none.exists(), "nothing written");
}

/// Writes `values` as a little-endian f32 `.npy` array of `shape` (NumPy's
/// format 1.0, as `numpy.save` writes it).
fn write_npy(path: &Path, shape: &[usize], values: &[f32]) {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let mut header = format!(
        "{{'descr': '<f4', 'fortran_order': False, 'shape': ({}), }}",
        dims.join(", ")
    )
    .into_bytes();
    // Magic, version and length take 10 bytes; the header ends in a newline
    // and pads the whole to a multiple of 64.
    let pad = (64 - (10 + header.len() + 1) % 64) % 64;
    header.extend(std::iter::repeat_n(b' ', pad));
    header.push(b'\n');
    let mut bytes = b"\x93NUMPY\x01\x00".to_vec();
    bytes.extend((header.len() as u16).to_le_bytes());
    bytes.extend(header);
    for v in values {
        bytes.extend(v.to_le_bytes());
    }
    std::fs::write(path, bytes).unwrap();
}

/// `n` values spread like unit noise, different for each `salt`.
fn noise_like(n: usize, salt: f32) -> Vec<f32> {
    (0..n)
        .map(|i| ((i as f32 * 12.9898 + salt).sin() * 43_758.547).fract() * 3f32.sqrt())
        .collect()
}

#[test]
fn embedded_render_starts_from_given_latents_and_refuses_ones_that_do_not_fit() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-sd1");
    init_tiny(&model, "sd1");
    let state = dir.path().join("state");
    // 192² is 24×24 latent cells of 4 channels.
    let cells = 4 * 24 * 24;
    let one = dir.path().join("one.npy");
    write_npy(&one, &[1, 4, 24, 24], &noise_like(cells, 0.0));
    let two = dir.path().join("two.npy");
    let mut rows = noise_like(cells, 0.0);
    rows.extend(noise_like(cells, 1.0));
    write_npy(&two, &[2, 4, 24, 24], &rows);
    let render = |out: &Path, seed: &str, extra: &[&str]| {
        let mut args = vec![
            "render",
            "--engine",
            "diffusion",
            "--model-path",
            model.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--prompt",
            "a red fox",
            "--seed",
            seed,
            "--width",
            "192",
            "--height",
            "192",
            "--steps",
            "4",
            "--scheduler",
            "ddim",
            "--workers",
            "1",
        ];
        args.extend_from_slice(extra);
        hallmark(&args)
    };
    let pixels = |p: PathBuf| image::open(&p).unwrap().to_rgb8();
    // Every output carries its own watermark, so two renders of the same
    // latents differ by that faint mark (PSNR ≥ 42 dB); compared as 8×8
    // block means (one per latent cell), the mark mostly averages out and
    // renders of other noise stand far apart.
    let distance = |a: &image::RgbImage, b: &image::RgbImage| -> f64 {
        let blocks = |i: &image::RgbImage| {
            image::imageops::resize(i, 24, 24, image::imageops::FilterType::Triangle)
        };
        let (a, b) = (blocks(a), blocks(b));
        let sum: f64 = a
            .as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| (f64::from(*x) - f64::from(*y)).abs())
            .sum();
        sum / a.as_raw().len() as f64
    };
    let (a, b, c) = (
        dir.path().join("a"),
        dir.path().join("b"),
        dir.path().join("c"),
    );
    ok(&render(&a, "1", &["--init-latents", one.to_str().unwrap()]));
    ok(&render(&b, "2", &["--init-latents", one.to_str().unwrap()]));
    ok(&render(&c, "1", &[]));
    let from_latents = pixels(a.join("00000.png"));
    let same = distance(&from_latents, &pixels(b.join("00000.png")));
    let other = distance(&from_latents, &pixels(c.join("00000.png")));
    assert!(
        same < 1.5 && other > 4.0 * same,
        "the latents replace the seed's noise (DDIM adds none): {same} apart from another seed's, {other} from the seed's own noise"
    );
    // One row per image: image 0 from row 0, image 1 from row 1.
    let per_image = dir.path().join("per-image");
    ok(&render(
        &per_image,
        "1",
        &[
            "--images-per-prompt",
            "2",
            "--init-latents",
            two.to_str().unwrap(),
        ],
    ));
    let (first, second) = (
        distance(&pixels(per_image.join("00000.png")), &from_latents),
        distance(&pixels(per_image.join("00001.png")), &from_latents),
    );
    assert!(
        first < 1.5 && second > 4.0 * first,
        "image 0 from row 0 ({first} apart), image 1 from row 1 ({second} apart)"
    );

    // What would not fit is refused before the farm starts, naming the file
    // and what the job needs; nothing is written.
    let small = dir.path().join("small.npy");
    write_npy(&small, &[1, 4, 16, 16], &noise_like(4 * 16 * 16, 0.0));
    let text = dir.path().join("notes.npy");
    std::fs::write(&text, b"not an array").unwrap();
    let photo = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/images/coffee.png");
    let refused = dir.path().join("refused");
    let cases: [(Vec<&str>, &str); 4] = [
        (
            vec!["--init-latents", small.to_str().unwrap()],
            "needs [1, 4, 24, 24] for each image",
        ),
        (
            vec![
                "--init-latents",
                two.to_str().unwrap(),
                "--images-per-prompt",
                "3",
            ],
            "2 rows of latents for 3 images",
        ),
        (
            vec![
                "--init-latents",
                one.to_str().unwrap(),
                "--init-image",
                photo.to_str().unwrap(),
            ],
            "--init-latents replaces the noise",
        ),
        (vec!["--init-latents", text.to_str().unwrap()], "notes.npy"),
    ];
    for (extra, expect) in cases {
        let out = render(&refused, "1", &extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains(expect), "{extra:?}: {err}");
        assert!(!refused.exists(), "{extra:?}: nothing written");
    }
}
