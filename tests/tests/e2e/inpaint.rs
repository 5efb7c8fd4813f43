//! Inpainting through the farm: an init image and a mask uploaded by the
//! CLI to a real coordinator process, fetched by a real worker process,
//! repainted only where the mask is white, and both named in each output's
//! credentials; bad masks refused before a job exists. The diffusion
//! engine's inpainting on a tiny inpainting checkpoint runs through the
//! embedded farm (its parity with diffusers is in the diffusion crate's
//! reference tests).

use std::path::Path;

use hallmark_e2e::*;

/// Mean absolute difference per channel value over the columns `xs`.
fn mean_diff_in(a: &image::RgbImage, b: &image::RgbImage, xs: std::ops::Range<u32>) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions());
    mean_diff_over(a, b, xs, 0..a.height())
}

/// Mean absolute difference per channel value over `xs` × `ys`.
fn mean_diff_over(
    a: &image::RgbImage,
    b: &image::RgbImage,
    xs: std::ops::Range<u32>,
    ys: std::ops::Range<u32>,
) -> f64 {
    let (mut sum, mut n) = (0u64, 0u64);
    for y in ys {
        for x in xs.clone() {
            for (p, q) in a.get_pixel(x, y).0.iter().zip(b.get_pixel(x, y).0) {
                sum += u64::from(p.abs_diff(q));
                n += 1;
            }
        }
    }
    sum as f64 / n as f64
}

/// A mask of `w`×`h` whose left half is white (repainted).
fn left_half_mask(path: &Path, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, _| {
        if x < w / 2 {
            image::Rgb([255, 255, 255])
        } else {
            image::Rgb([0, 0, 0])
        }
    })
    .save(path)
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inpainting_repaints_only_the_mask_and_names_it_in_the_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let db = fresh_database().await;
    let anchors = test_ca().root_cert.to_str().unwrap().to_string();
    let spec = CoordinatorSpec::new(&db, Some(redis_url()), dir.path().join("blobs"))
        .with("HALLMARK_TRUST_ANCHORS", &anchors);
    let _c = spec.start().await;
    let url = spec.url();
    let _w = start_worker(&url, "w", 0, &[]);
    wait_for_workers(&url, 1).await;

    // The photograph is 451×300 (the job renders 448×296); the mask is
    // another size and is resized to the job's as the init image is.
    let init = photo("chelsea.png");
    let mask = dir.path().join("mask.png");
    left_half_mask(&mask, 224, 148);
    let mask_sha = hallmark_provenance::sha256_hex(&std::fs::read(&mask).unwrap());
    let render = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "--coordinator",
            url.as_str(),
            "--json",
            "render",
            "--prompt",
            "a dog on a sofa",
            "--seed",
            "5",
            "-o",
            out.to_str().unwrap(),
        ];
        args.extend_from_slice(extra);
        hallmark(&args)
    };
    let inpainted = dir.path().join("inpainted");
    let out = render(
        &inpainted,
        &[
            "--init-image",
            init.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
            "--strength",
            "1",
        ],
    );
    ok(&out);
    let job = json_of(&out)["job"].clone();
    assert_eq!(job["state"], "succeeded");
    let text2img = dir.path().join("text2img");
    ok(&render(&text2img, &["--width", "448", "--height", "296"]));
    let got = rgb(&inpainted.join("00000.png"));
    assert_eq!(got.dimensions(), (448, 296));
    let target =
        image::imageops::resize(&rgb(&init), 448, 296, image::imageops::FilterType::Lanczos3);
    let drawn = rgb(&text2img.join("00000.png"));
    // The right half (away from the edge) is the photograph, the left half
    // what the prompt draws; each up to the watermark (about 2 per value).
    let (kept, kept_vs_drawn) = (
        mean_diff_in(&got, &target, 240..448),
        mean_diff_in(&got, &drawn, 240..448),
    );
    let (repainted, repainted_vs_photo) = (
        mean_diff_in(&got, &drawn, 0..208),
        mean_diff_in(&got, &target, 0..208),
    );
    assert!(
        kept < 4.0 && kept * 5.0 < kept_vs_drawn,
        "kept half: {kept:.1} from the photo, {kept_vs_drawn:.1} from the drawing"
    );
    assert!(
        repainted < 4.0 && repainted * 5.0 < repainted_vs_photo,
        "masked half: {repainted:.1} from the drawing, {repainted_vs_photo:.1} from the photo"
    );

    // Its credentials name the mask: its sha256 in the signed record, the
    // file as a second `inputTo` ingredient beside the init image.
    let out = hallmark(&[
        "--json",
        "verify",
        inpainted.join("00000.png").to_str().unwrap(),
        "--trust-anchors",
        &anchors,
        "--coordinator",
        &url,
    ]);
    ok(&out);
    let report = json_of(&out);
    assert_eq!(report["status"], "verified", "{report:#}");
    // The repository's lineage starts at the init image and names the mask.
    let init_sha = hallmark_provenance::sha256_hex(&std::fs::read(&init).unwrap());
    let chain = &report["repository"]["chain"][0];
    assert_eq!(chain["parent_sha256"], init_sha.as_str(), "{report:#}");
    assert_eq!(chain["mask_sha256"], mask_sha.as_str(), "{report:#}");
    // So does the audit ledger's completion entry, once the reaper seals it.
    let job_id = job["job_id"].as_str().unwrap();
    wait_for_count(
        &db,
        "the completion sealed",
        &format!(
            "SELECT COUNT(*) FROM audit_events WHERE kind = 'complete' AND job_id = '{job_id}' AND seq IS NOT NULL"
        ),
        |n| n == 1,
    )
    .await;
    let log = hallmark(&[
        "--coordinator",
        &url,
        "--json",
        "audit",
        "log",
        "--job",
        job_id,
    ]);
    let completes: Vec<serde_json::Value> = ok(&log)
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|e| e["kind"] == "complete")
        .collect();
    assert_eq!(completes.len(), 1);
    assert_eq!(
        completes[0]["body"]["mask_sha256"],
        mask_sha.as_str(),
        "{completes:?}"
    );
    let c = &report["credentials"];
    assert_eq!(c["generation"]["mask_sha256"], mask_sha.as_str(), "{c:#}");
    assert!(
        c["mask"]["title"]
            .as_str()
            .unwrap()
            .starts_with("inpainting mask of"),
        "{c:#}"
    );
    assert!(
        c["input"]["title"]
            .as_str()
            .unwrap()
            .starts_with("init image of"),
        "{c:#}"
    );
    // The text-to-image render names neither.
    let out = hallmark(&[
        "--json",
        "verify",
        text2img.join("00000.png").to_str().unwrap(),
        "--trust-anchors",
        &anchors,
    ]);
    let c = &json_of(&out)["credentials"];
    assert!(
        c["mask"].is_null() && c["generation"]["mask_sha256"].is_null(),
        "{c:#}"
    );

    // A prompt file's lines name their own masks: one inpaints, one does
    // plain img2img, in one job.
    let lines = dir.path().join("lines.jsonl");
    std::fs::copy(&init, dir.path().join("cat.png")).unwrap();
    std::fs::write(
        &lines,
        "{\"prompt\": \"a dog\", \"init_image\": \"cat.png\", \"mask\": \"mask.png\"}\n\
         {\"prompt\": \"a dog\", \"init_image\": \"cat.png\"}\n",
    )
    .unwrap();
    let mixed = dir.path().join("mixed");
    ok(&hallmark(&[
        "--coordinator",
        url.as_str(),
        "render",
        lines.to_str().unwrap(),
        "--strength",
        "1",
        "--width",
        "448",
        "--height",
        "296",
        "-o",
        mixed.to_str().unwrap(),
    ]));
    let (masked, whole) = (rgb(&mixed.join("00000.png")), rgb(&mixed.join("00001.png")));
    let target =
        image::imageops::resize(&rgb(&init), 448, 296, image::imageops::FilterType::Lanczos3);
    assert!(
        mean_diff_in(&masked, &target, 240..448) < 4.0,
        "line 1 keeps the right half"
    );
    assert!(
        mean_diff_in(&whole, &target, 240..448) > 20.0,
        "line 2 repaints it all at strength 1"
    );

    // An inpainting checkpoint registered from its folder is marked so, and
    // a job that would render with it without a mask is refused at
    // submission, naming why, with no job written.
    let model = dir.path().join("tiny-inpaint");
    init_tiny(&model, "sd1-inpaint");
    let reg = hallmark(&[
        "--coordinator",
        url.as_str(),
        "--json",
        "models",
        "register",
        "--id",
        "inpainter",
        "--family",
        "sd15",
        "--model-path",
        model.to_str().unwrap(),
    ]);
    ok(&reg);
    assert_eq!(json_of(&reg)["inpaints_only"], true);
    let submit = |extra: &[&str]| {
        let mut args = vec![
            "--coordinator",
            url.as_str(),
            "submit",
            "--engine",
            "diffusion",
            "--model",
            "inpainter",
            "--prompt",
            "a dog",
            "--queue-unservable",
        ];
        args.extend_from_slice(extra);
        hallmark(&args)
    };
    let jobs = scalar(&db, "SELECT COUNT(*) FROM jobs").await;
    for extra in [&[][..], &["--init-image", init.to_str().unwrap()]] {
        let out = submit(extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(
            err.contains("\"inpainter\" is an inpainting model"),
            "{extra:?}: {err}"
        );
    }
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM jobs").await, jobs);
    ok(&submit(&[
        "--init-image",
        init.to_str().unwrap(),
        "--mask",
        mask.to_str().unwrap(),
    ]));
    assert_eq!(scalar(&db, "SELECT COUNT(*) FROM jobs").await, jobs + 1);
}

#[test]
fn bad_masks_are_refused_before_any_job() {
    let dir = tempfile::tempdir().unwrap();
    let not_an_image = dir.path().join("notes.png");
    std::fs::write(&not_an_image, b"just text").unwrap();
    let init = photo("coffee.png");
    let mask = dir.path().join("mask.png");
    left_half_mask(&mask, 64, 64);
    let cases: [(&[&str], &str); 3] = [
        (
            &["--mask", mask.to_str().unwrap()],
            "--mask says which part of an init image",
        ),
        (
            &[
                "--init-image",
                init.to_str().unwrap(),
                "--mask",
                "/nonexistent/mask.png",
            ],
            "--mask /nonexistent/mask.png",
        ),
        (
            &[
                "--init-image",
                init.to_str().unwrap(),
                "--mask",
                not_an_image.to_str().unwrap(),
            ],
            "not a usable image",
        ),
    ];
    assert_renders_refused(dir.path(), &[], &cases);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diffusion_inpainting_model_renders_with_a_mask_and_refuses_without() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny-sd1-inpaint");
    init_tiny(&model, "sd1-inpaint");
    let state = dir.path().join("state");
    let init = dir.path().join("init.png");
    image::RgbImage::from_fn(192, 192, |x, y| image::Rgb([x as u8, y as u8, 128]))
        .save(&init)
        .unwrap();
    let mask = dir.path().join("mask.png");
    left_half_mask(&mask, 192, 192);
    let mask_sha = hallmark_provenance::sha256_hex(&std::fs::read(&mask).unwrap());
    let render = |name: &str, extra: &[&str]| {
        let out_dir = dir.path().join(name);
        let mut args = vec![
            "--json",
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
            "--workers",
            "1",
        ];
        args.extend_from_slice(extra);
        (hallmark(&args), out_dir)
    };
    let (out, out_dir) = render(
        "inpainted",
        &[
            "--init-image",
            init.to_str().unwrap(),
            "--mask",
            mask.to_str().unwrap(),
        ],
    );
    ok(&out);
    let image = out_dir.join("00000.png");
    assert_eq!(image::image_dimensions(&image).unwrap(), (192, 192));
    // The kept half is the init image's own pixels (up to the watermark),
    // laid over the render, not the tiny VAE's reconstruction of them; the
    // masked half is what the model drew.
    let (got, init_px) = (rgb(&image), rgb(&init));
    let kept = mean_diff_in(&got, &init_px, 100..192);
    let repainted = mean_diff_in(&got, &init_px, 0..92);
    assert!(
        kept < 4.0 && repainted > 5.0 * kept,
        "kept half {kept:.1} from the init image, masked half {repainted:.1}"
    );
    let out = hallmark(&["--json", "verify", image.to_str().unwrap()]);
    let c = &json_of(&out)["credentials"];
    assert_eq!(c["generation"]["mask_sha256"], mask_sha.as_str(), "{c:#}");

    // An outpaint needs no mask file: the inpainting model draws the new
    // canvas through the one the worker makes, and the init image stays
    // as it is in the middle.
    let (out, out_dir) = render(
        "outpainted",
        &[
            "--init-image",
            init.to_str().unwrap(),
            "--outpaint",
            "left=32,right=32",
        ],
    );
    ok(&out);
    // The canvas is the job's 192×192; the init image is squeezed into
    // the middle 128 columns.
    let got = rgb(&out_dir.join("00000.png"));
    assert_eq!(got.dimensions(), (192, 192));
    let middle = image::imageops::crop_imm(&got, 32, 0, 128, 192).to_image();
    let fitted = image::imageops::resize(&init_px, 128, 192, image::imageops::FilterType::Lanczos3);
    let kept = mean_diff_in(&middle, &fitted, 0..128);
    assert!(kept < 4.0, "the middle is {kept:.1} from the init image");

    // Without a mask (or an init image) the inpainting model is refused
    // before a job is written, naming why.
    for extra in [&["--init-image", init.to_str().unwrap()][..], &[]] {
        let (out, out_dir) = render("refused", extra);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{extra:?} was accepted");
        assert!(err.contains("is an inpainting model"), "{extra:?}: {err}");
        assert!(!out_dir.exists(), "nothing written");
    }
}

/// A mask of `w`×`h` white only in `xs` × `ys`.
fn box_mask(
    w: u32,
    h: u32,
    xs: std::ops::Range<u32>,
    ys: std::ops::Range<u32>,
) -> image::GrayImage {
    image::GrayImage::from_fn(w, h, |x, y| {
        image::Luma([if xs.contains(&x) && ys.contains(&y) {
            255
        } else {
            0
        }])
    })
}

/// Renders "a dog on a sofa", seed 5, on an embedded farm of one worker
/// with its state in `dir/state`, into `dir/name`; the first image's path.
fn render_locally(dir: &Path, name: &str, extra: &[&str]) -> std::path::PathBuf {
    let (state, out) = (dir.join("state"), dir.join(name));
    let mut args = vec![
        "render",
        "--state-dir",
        state.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--prompt",
        "a dog on a sofa",
        "--seed",
        "5",
        "--workers",
        "1",
    ];
    args.extend_from_slice(extra);
    ok(&hallmark(&args));
    out.join("00000.png")
}

#[test]
fn a_cropped_inpaint_renders_around_the_mask_at_full_size_and_pastes_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let (w, h) = (256, 192);
    let init = dir.path().join("init.png");
    image::imageops::resize(
        &rgb(&photo("chelsea.png")),
        w,
        h,
        image::imageops::FilterType::Lanczos3,
    )
    .save(&init)
    .unwrap();
    let photo_px = rgb(&init);
    let mask = dir.path().join("mask.png");
    let white = (150..190, 40..80);
    box_mask(w, h, white.0.clone(), white.1.clone())
        .save(&mask)
        .unwrap();
    let render = |name: &str, extra: &[&str]| {
        let size = ["--width", "256", "--height", "192"];
        rgb(&render_locally(
            dir.path(),
            name,
            &[&size[..], extra].concat(),
        ))
    };
    let inpaint = [
        "--init-image",
        init.to_str().unwrap(),
        "--mask",
        mask.to_str().unwrap(),
        "--strength",
        "1",
    ];
    let drawn = render("text2img", &[]);
    let whole = render("whole", &inpaint);
    let cropped = render(
        "cropped",
        &[&inpaint[..], &["--mask-crop", "8", "--mask-blur", "4"]].concat(),
    );

    // The crop the worker rendered: around the blurred mask, 8 px of
    // context, at the image's 4:3.
    let blurred =
        hallmark_diffusion::mask::blur(&box_mask(w, h, white.0.clone(), white.1.clone()), 4.0);
    let region = hallmark_diffusion::mask::crop_region(&blurred, w, h, 8).unwrap();
    assert!(region.width() < w / 2, "{region:?}");
    // Inside the mask: the drawing of the whole frame, shrunk into the crop
    // (the cropped render), where the whole-image inpaint shows the drawing
    // at its own scale.
    let shrunk = image::imageops::resize(
        &drawn,
        region.width(),
        region.height(),
        image::imageops::FilterType::Lanczos3,
    );
    let mut placed = photo_px.clone();
    image::imageops::replace(&mut placed, &shrunk, region.x1.into(), region.y1.into());
    let inner = (
        white.0.start + 8..white.0.end - 8,
        white.1.start + 8..white.1.end - 8,
    );
    let (to_placed, to_drawn) = (
        mean_diff_over(&cropped, &placed, inner.0.clone(), inner.1.clone()),
        mean_diff_over(&cropped, &drawn, inner.0.clone(), inner.1.clone()),
    );
    assert!(
        to_placed < 6.0 && to_placed * 3.0 < to_drawn,
        "inside the mask: {to_placed:.1} from the drawing shrunk into the crop, {to_drawn:.1} from it unshrunk"
    );
    assert!(
        mean_diff_over(&whole, &drawn, inner.0.clone(), inner.1.clone()) < 4.0,
        "the whole-image inpaint draws at full scale"
    );
    // Outside the crop: the photograph, up to the watermark.
    let left_of_crop = mean_diff_over(&cropped, &photo_px, 0..region.x1, 0..h);
    assert!(left_of_crop < 4.0, "{left_of_crop:.1}");
    // The blur softens the edge: just inside the box the blurred mask is
    // grey, so the output there is blended with the photo, where the sharp
    // mask's is the drawing alone.
    let soft = render("soft", &[&inpaint[..], &["--mask-blur", "4"]].concat());
    let rim = (
        white.0.end - 3..white.0.end - 1,
        white.1.start + 8..white.1.end - 8,
    );
    let (blurred_rim, sharp_rim) = (
        mean_diff_over(&soft, &drawn, rim.0.clone(), rim.1.clone()),
        mean_diff_over(&whole, &drawn, rim.0.clone(), rim.1.clone()),
    );
    assert!(
        blurred_rim > sharp_rim + 4.0 && sharp_rim < 4.0,
        "inner rim from the drawing: blurred {blurred_rim:.1}, sharp {sharp_rim:.1}"
    );
    assert!(
        mean_diff_over(&soft, &drawn, inner.0.clone(), inner.1.clone()) < 4.0,
        "the blur leaves the middle of the mask to the drawing"
    );

    // The credentials say how the mask was used.
    let generation = |name: &str| {
        let image = match name.ends_with(".png") {
            true => dir.path().join(name),
            false => dir.path().join(name).join("00000.png"),
        };
        let out = hallmark(&["--json", "verify", image.to_str().unwrap()]);
        json_of(&out)["credentials"]["generation"].clone()
    };
    let g = generation("cropped");
    assert_eq!(
        (g["mask_blur"].as_u64(), g["mask_crop"].as_u64()),
        (Some(4), Some(8)),
        "{g:#}"
    );
    let g = generation("whole");
    assert!(
        g["mask_blur"].is_null() && g["mask_crop"].is_null(),
        "{g:#}"
    );

    // A prompt file's lines may set their own: here one crops, one blurs.
    let lines = dir.path().join("lines.jsonl");
    std::fs::write(
        &lines,
        "{\"prompt\": \"a\", \"init_image\": \"init.png\", \"mask\": \"mask.png\", \"mask_crop\": 8}\n\
         {\"prompt\": \"b\", \"init_image\": \"init.png\", \"mask\": \"mask.png\", \"mask_blur\": 3}\n",
    )
    .unwrap();
    let out = dir.path().join("lines");
    ok(&hallmark(&[
        "render",
        lines.to_str().unwrap(),
        "--state-dir",
        dir.path().join("state").to_str().unwrap(),
        "--strength",
        "1",
        "--width",
        "256",
        "--height",
        "192",
        "-o",
        out.to_str().unwrap(),
    ]));
    let g = generation("lines/00000.png");
    assert_eq!(
        (g["mask_blur"].as_u64(), g["mask_crop"].as_u64()),
        (None, Some(8)),
        "{g:#}"
    );
    let g = generation("lines/00001.png");
    assert_eq!(
        (g["mask_blur"].as_u64(), g["mask_crop"].as_u64()),
        (Some(3), None),
        "{g:#}"
    );

    // Settings without a mask, or a crop around nothing: refused before any job.
    let black = dir.path().join("black.png");
    image::GrayImage::new(64, 64).save(&black).unwrap();
    let init_arg = init.to_str().unwrap();
    let cases: [(&[&str], &str); 3] = [
        (
            &["--init-image", init_arg, "--mask-blur", "4"],
            "--mask-blur says how a mask is used",
        ),
        (
            &["--init-image", init_arg, "--mask-crop", "4"],
            "--mask-crop says how a mask is used",
        ),
        (
            &[
                "--init-image",
                init_arg,
                "--mask",
                black.to_str().unwrap(),
                "--mask-crop",
                "4",
            ],
            "is black everywhere",
        ),
    ];
    assert_renders_refused(&dir.path().join("refused"), &[], &cases);
}

#[test]
fn an_outpaint_extends_the_init_image_with_new_canvas_drawn_around_it() {
    let dir = tempfile::tempdir().unwrap();
    // 451×300: the canvas defaults to the photo and its margins (576×296,
    // multiples of 8), the photo resized into the middle 448×296.
    let init = photo("chelsea.png");
    let render = |name: &str, extra: &[&str]| render_locally(dir.path(), name, extra);
    let extended = render(
        "extended",
        &[
            "--init-image",
            init.to_str().unwrap(),
            "--outpaint",
            "left=64,right=64",
        ],
    );
    let got = rgb(&extended);
    assert_eq!(got.dimensions(), (576, 296));
    let drawn = rgb(&render("text2img", &["--width", "576", "--height", "296"]));
    let mut placed = image::RgbImage::new(576, 296);
    let fitted =
        image::imageops::resize(&rgb(&init), 448, 296, image::imageops::FilterType::Lanczos3);
    image::imageops::replace(&mut placed, &fitted, 64, 0);
    // The photo in the middle, the drawing on each side (the strength is
    // 1: the margins are drawn afresh), each up to the watermark.
    let middle = mean_diff_in(&got, &placed, 64..512);
    let sides = (
        mean_diff_in(&got, &drawn, 0..64),
        mean_diff_in(&got, &drawn, 512..576),
    );
    assert!(middle < 4.0, "the middle is {middle:.1} from the photo");
    assert!(
        sides.0 < 4.0 && sides.1 < 4.0,
        "the sides: {sides:?} from the drawing"
    );
    assert!(
        mean_diff_in(&got, &drawn, 64..512) > 5.0 * middle,
        "the middle is not the drawing"
    );
    let out = hallmark(&["--json", "verify", extended.to_str().unwrap()]);
    let g = &json_of(&out)["credentials"]["generation"];
    assert_eq!(
        g["outpaint"],
        serde_json::json!({"left": 64, "top": 0, "right": 64, "bottom": 0}),
        "{g:#}"
    );
    assert_eq!(g["strength"], 1.0, "{g:#}");
    assert!(g["mask_sha256"].is_null(), "no mask file: {g:#}");

    // Bad outpaints are refused before any job, naming what is wrong.
    let mask = dir.path().join("mask.png");
    left_half_mask(&mask, 64, 64);
    let init_arg = init.to_str().unwrap();
    let cases: [(&[&str], &str); 5] = [
        (
            &["--outpaint", "left=64"],
            "--outpaint extends an init image",
        ),
        (
            &[
                "--init-image",
                init_arg,
                "--mask",
                mask.to_str().unwrap(),
                "--outpaint",
                "left=64",
            ],
            "--outpaint makes its own mask",
        ),
        (
            &["--init-image", init_arg, "--outpaint", "up=64"],
            "unknown side \"up\"",
        ),
        (
            &["--init-image", init_arg, "--outpaint", "left=8,left=9"],
            "left is given twice",
        ),
        (
            &[
                "--init-image",
                init_arg,
                "--width",
                "256",
                "--outpaint",
                "left=200,right=50",
            ],
            "outpaint: leaves 6x",
        ),
    ];
    assert_renders_refused(&dir.path().join("refused"), &[], &cases);
}

#[test]
fn prompt_file_lines_outpaint_and_keep_their_own_init_image_s_size() {
    let dir = tempfile::tempdir().unwrap();
    let fitted = |name: &str, w: u32, h: u32| {
        image::imageops::resize(
            &rgb(&photo(name)),
            w,
            h,
            image::imageops::FilterType::Triangle,
        )
    };
    let wide = fitted("chelsea.png", 256, 192);
    wide.save(dir.path().join("wide.png")).unwrap();
    fitted("coffee.png", 200, 200)
        .save(dir.path().join("square.png"))
        .unwrap();
    left_half_mask(&dir.path().join("mask.png"), 256, 192);
    let render = |name: &str, lines: &str, extra: &[&str]| {
        let file = dir.path().join(format!("{name}.jsonl"));
        std::fs::write(&file, lines).unwrap();
        let (out, state) = (dir.path().join(name), dir.path().join("state"));
        let mut args = vec![
            "render",
            file.to_str().unwrap(),
            "--state-dir",
            state.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--seed",
            "3",
        ];
        args.extend_from_slice(extra);
        ok(&hallmark(&args));
        out
    };
    let generation = |image: &Path| {
        let out = hallmark(&["--json", "verify", image.to_str().unwrap()]);
        json_of(&out)["credentials"]["generation"].clone()
    };

    // No job-wide size or outpaint: each line's canvas is its own init
    // image and its own margins; the outpainting line starts from noise.
    let out = render(
        "own",
        "{\"prompt\": \"a wider cat\", \"init_image\": \"wide.png\", \"outpaint\": \"left=32,right=32\"}\n\
         {\"prompt\": \"a cup\", \"init_image\": \"square.png\"}\n",
        &[],
    );
    let extended = rgb(&out.join("00000.png"));
    assert_eq!(extended.dimensions(), (320, 192));
    let mut placed = image::RgbImage::new(320, 192);
    image::imageops::replace(&mut placed, &wide, 32, 0);
    let middle = mean_diff_in(&extended, &placed, 32..288);
    assert!(middle < 4.0, "the middle is {middle:.1} from the photo");
    let g = generation(&out.join("00000.png"));
    assert_eq!(
        (&g["outpaint"], g["strength"].as_f64()),
        (
            &serde_json::json!({"left": 32, "top": 0, "right": 32, "bottom": 0}),
            Some(1.0)
        ),
        "{g:#}"
    );
    assert_eq!(rgb(&out.join("00001.png")).dimensions(), (200, 200));
    let g = generation(&out.join("00001.png"));
    assert_eq!(
        (&g["outpaint"], g["strength"].as_f64()),
        (&serde_json::Value::Null, Some(0.8)),
        "{g:#}"
    );

    // The job outpaints and crops around its masks; one line turns both
    // off and inpaints the whole image through a mask of its own.
    let out = render(
        "job",
        "{\"prompt\": \"a taller cat\", \"init_image\": \"wide.png\"}\n\
         {\"prompt\": \"half a cat\", \"init_image\": \"wide.png\", \"mask\": \"mask.png\", \"outpaint\": \"none\", \"mask_crop\": \"none\"}\n",
        &["--outpaint", "top=32", "--mask-crop", "8"],
    );
    assert_eq!(rgb(&out.join("00000.png")).dimensions(), (256, 224));
    let g = generation(&out.join("00000.png"));
    assert_eq!(
        (
            &g["outpaint"]["top"],
            g["mask_crop"].as_u64(),
            g["strength"].as_f64()
        ),
        (&serde_json::json!(32), Some(8), Some(1.0)),
        "{g:#}"
    );
    let inpainted = rgb(&out.join("00001.png"));
    assert_eq!(inpainted.dimensions(), (256, 192));
    let g = generation(&out.join("00001.png"));
    assert!(g["outpaint"].is_null() && g["mask_crop"].is_null(), "{g:#}");
    assert_eq!(g["strength"].as_f64(), Some(0.8), "{g:#}");
    assert!(g["mask_sha256"].is_string(), "{g:#}");
    // The kept right half is the photo's own.
    let kept = mean_diff_in(&inpainted, &wide, 128..256);
    assert!(kept < 4.0, "the kept half is {kept:.1} from the photo");

    // Refused before any job, each naming what is wrong.
    let small = dir.path().join("small.png");
    fitted("coffee.png", 160, 120).save(&small).unwrap();
    image::GrayImage::new(256, 192)
        .save(dir.path().join("black.png"))
        .unwrap();
    let line_file = |name: &str, line: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, format!("{line}\n")).unwrap();
        path.to_str().unwrap().to_string()
    };
    // A line's mask under the job's outpaint (the line does not turn it off).
    let clash = line_file(
        "clash.jsonl",
        r#"{"prompt": "x", "init_image": "wide.png", "mask": "mask.png"}"#,
    );
    // Margins on a line with no init image: named, not defaulted into a
    // strength the line never asked for.
    let bare = line_file("bare.jsonl", r#"{"prompt": "x", "outpaint": "left=8"}"#);
    // A picture too small for the canvas it would make, named with the
    // flags that set a size instead.
    let small_line = line_file(
        "small.jsonl",
        r#"{"prompt": "x", "init_image": "small.png"}"#,
    );
    // A line's crop around a mask black everywhere.
    let black = line_file(
        "black.jsonl",
        r#"{"prompt": "x", "init_image": "wide.png", "mask": "black.png", "mask_crop": 8}"#,
    );
    assert_renders_refused(
        &dir.path().join("refused"),
        &[],
        &[
            (&[&clash, "--outpaint", "left=8"], "prompt 0 names one"),
            (
                &[&bare],
                "prompts[0].outpaint: is set but the item has no init image",
            ),
            (
                &["--init-image", small.to_str().unwrap()],
                "is 160x120: the canvas it makes (160x120) is under the 192-pixel side",
            ),
            (&[&small_line], "prompt 0's init image is 160x120"),
            (&[&black], "prompt 0's mask"),
        ],
    );
}
