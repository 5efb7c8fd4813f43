//! The whole pipeline on tiny generated checkpoints, loaded through the
//! same loader real checkpoints use.

use std::path::{Path, PathBuf};

use hallmark_diffusion::attention::{AttentionChoice, AttentionKernel};
use hallmark_diffusion::tiny::{TinyArch, init_tiny};
use hallmark_diffusion::{
    GenerateRequest, LoadOptions, Sample, SchedulerKind, StableDiffusion, model::ModelFolder,
};

pub fn clip_bpe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/clip/bpe_simple_vocab_16e6.txt.gz")
}

fn tiny(arch: TinyArch, seed: u64) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    init_tiny(&dir, arch, seed, Some(&clip_bpe())).unwrap();
    (tmp, dir)
}

fn load(dir: &Path) -> StableDiffusion {
    StableDiffusion::load(
        ModelFolder::open(dir, None).unwrap(),
        LoadOptions::default(),
    )
    .unwrap()
}

/// Why loading the model in `dir` fails.
fn load_error(dir: &Path) -> String {
    StableDiffusion::load(
        ModelFolder::open(dir, None).unwrap(),
        LoadOptions::default(),
    )
    .unwrap_err()
    .to_string()
}

/// Replace `from` by `to` in a text file (a config to break).
fn rewrite(path: &Path, from: &str, to: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.contains(from), "{} has no {from}", path.display());
    std::fs::write(path, text.replace(from, to)).unwrap();
}

fn sample(prompt: &str, seed: u64) -> Sample {
    Sample {
        prompt: prompt.into(),
        negative: String::new(),
        seed,
    }
}

fn request(samples: Vec<Sample>, scheduler: SchedulerKind) -> GenerateRequest {
    let mut r = GenerateRequest::new(samples, 192, 192);
    r.steps = 4;
    r.scheduler = scheduler;
    r
}

fn max_diff(a: &image::RgbImage, b: &image::RgbImage) -> u8 {
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap()
}

#[test]
fn every_scheduler_renders_deterministically_from_the_seed() {
    let (_t, dir) = tiny(TinyArch::Sd1, 1);
    let sd = load(&dir);
    for name in SchedulerKind::NAMES {
        let kind: SchedulerKind = name.parse().unwrap();
        let a = sd
            .generate(&request(vec![sample("a red fox", 5)], kind), &|_| {})
            .unwrap();
        let b = sd
            .generate(&request(vec![sample("a red fox", 5)], kind), &|_| {})
            .unwrap();
        let c = sd
            .generate(&request(vec![sample("a red fox", 6)], kind), &|_| {})
            .unwrap();
        assert_eq!(a.images[0].dimensions(), (192, 192));
        assert_eq!(a.images[0], b.images[0], "{name}: same seed, other pixels");
        assert!(
            max_diff(&a.images[0], &c.images[0]) > 10,
            "{name}: the seed changes nothing"
        );
        let distinct: std::collections::HashSet<_> = a.images[0].pixels().map(|p| p.0).collect();
        assert!(
            distinct.len() > 1000,
            "{name}: a flat image ({} colours)",
            distinct.len()
        );
    }
}

#[test]
fn a_batch_renders_what_its_samples_render_alone() {
    let (_t, dir) = tiny(TinyArch::Sd1, 2);
    let sd = load(&dir);
    let both = sd
        .generate(
            &request(
                vec![sample("a red fox", 5), sample("a blue whale", 6)],
                SchedulerKind::EulerAncestral,
            ),
            &|_| {},
        )
        .unwrap();
    let a = sd
        .generate(
            &request(vec![sample("a red fox", 5)], SchedulerKind::EulerAncestral),
            &|_| {},
        )
        .unwrap();
    let b = sd
        .generate(
            &request(
                vec![sample("a blue whale", 6)],
                SchedulerKind::EulerAncestral,
            ),
            &|_| {},
        )
        .unwrap();
    assert!(max_diff(&both.images[0], &a.images[0]) <= 1);
    assert!(max_diff(&both.images[1], &b.images[0]) <= 1);
    assert!(max_diff(&both.images[0], &both.images[1]) > 10);
}

#[test]
fn negative_prompts_steer_guided_renders_and_guidance_one_skips_them() {
    let (_t, dir) = tiny(TinyArch::Sd1, 3);
    let sd = load(&dir);
    let with_negative = |guidance: f64, negative: &str| {
        let mut r = request(
            vec![Sample {
                negative: negative.into(),
                ..sample("a lighthouse", 9)
            }],
            SchedulerKind::Ddim,
        );
        r.guidance = guidance;
        sd.generate(&r, &|_| {}).unwrap().images.remove(0)
    };
    let d = max_diff(&with_negative(7.5, ""), &with_negative(7.5, "fog, rain"));
    assert!(d > 0, "the negative prompt changed nothing under guidance");
    assert_eq!(with_negative(1.0, ""), with_negative(1.0, "fog, rain"));
}

#[test]
fn img2img_starts_from_the_image_and_strength_sets_how_far() {
    let (_t, dir) = tiny(TinyArch::Sd1, 4);
    let sd = load(&dir);
    let init = sd
        .generate(
            &request(vec![sample("a harbour", 1)], SchedulerKind::Ddim),
            &|_| {},
        )
        .unwrap()
        .images
        .remove(0);
    let run = |strength: f64| {
        let mut r = request(vec![sample("a harbour at night", 2)], SchedulerKind::Ddim);
        r.steps = 10;
        r.init_images = Some(vec![init.clone()]);
        r.strength = strength;
        sd.generate(&r, &|_| {})
    };
    let mean_diff = |a: &image::RgbImage, b: &image::RgbImage| {
        a.as_raw()
            .iter()
            .zip(b.as_raw())
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .sum::<f64>()
            / a.as_raw().len() as f64
    };
    let light = run(0.3).unwrap().images.remove(0);
    let heavy = run(1.0).unwrap().images.remove(0);
    assert_eq!(
        light,
        run(0.3).unwrap().images[0],
        "img2img is deterministic"
    );
    assert!(
        mean_diff(&light, &init) < mean_diff(&heavy, &init),
        "strength 0.3 should stay closer to the image than 1.0"
    );
    let err = run(0.05).unwrap_err().to_string();
    assert!(err.contains("leaves no step"), "{err}");
}

#[test]
fn long_prompts_are_truncated_and_reported() {
    let (_t, dir) = tiny(TinyArch::Sd1, 5);
    let sd = load(&dir);
    let long = "castle ".repeat(90);
    let out = sd
        .generate(
            &request(
                vec![sample("short", 1), sample(&long, 1)],
                SchedulerKind::Euler,
            ),
            &|_| {},
        )
        .unwrap();
    assert_eq!(out.truncated, vec![1]);
}

#[test]
fn bad_requests_fail_with_the_cause() {
    let (_t, dir) = tiny(TinyArch::Sd1, 6);
    let sd = load(&dir);
    let mut r = request(vec![sample("x", 1)], SchedulerKind::Ddim);
    r.width = 196;
    let err = sd.generate(&r, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("multiples of 8") && err.contains("196x192"),
        "{err}"
    );

    let mut r = request(vec![sample("x", 1)], SchedulerKind::Ddim);
    r.init_latents = Some(
        candle_core::Tensor::zeros(
            (1, 4, 8, 8),
            candle_core::DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap(),
    );
    let err = sd.generate(&r, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("initial latents have shape [1, 4, 8, 8]") && err.contains("[1, 4, 24, 24]"),
        "{err}"
    );

    let mut r = request(vec![sample("x", 1)], SchedulerKind::Ddim);
    r.steps = 0;
    assert!(
        sd.generate(&r, &|_| {})
            .unwrap_err()
            .to_string()
            .contains("steps must be between 1 and 1000")
    );

    // Flash attention asked for where it cannot run is refused by name;
    // `auto` on the CPU in f32 is the own fused attention.
    let with = |attention| {
        StableDiffusion::load(
            ModelFolder::open(&dir, None).unwrap(),
            LoadOptions {
                attention,
                ..LoadOptions::default()
            },
        )
    };
    let err = with(AttentionChoice::Flash).unwrap_err().to_string();
    assert!(err.contains("flash attention cannot run here"), "{err}");
    assert_eq!(sd.attention(), AttentionKernel::Fused);
    assert_eq!(
        with(AttentionChoice::Matmul).unwrap().attention(),
        AttentionKernel::Matmul
    );
}

#[test]
fn fused_and_matmul_attention_render_the_same_image() {
    let (_t, dir) = tiny(TinyArch::Sd1, 3);
    let render = |attention| {
        let sd = StableDiffusion::load(
            ModelFolder::open(&dir, None).unwrap(),
            LoadOptions {
                attention,
                ..LoadOptions::default()
            },
        )
        .unwrap();
        let samples = vec![sample("a red fox", 11), sample("a lighthouse", 12)];
        sd.generate(&request(samples, SchedulerKind::EulerAncestral), &|_| {})
            .unwrap()
    };
    let fused = render(AttentionChoice::Fused);
    let matmul = render(AttentionChoice::Matmul);
    let flat = |t: &candle_core::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let latent_diff = flat(&fused.latents)
        .iter()
        .zip(flat(&matmul.latents))
        .map(|(f, m)| (f - m).abs())
        .fold(0f32, f32::max);
    // Summation order alone, compounded over 20 Euler a steps through
    // F(4×4) Winograd convolutions (about 1e-5 of a layer's output off
    // exact, ten times F(2×2)'s): measured 1.8e-4 (4.4e-5 with F(2×2)).
    assert!(latent_diff < 5e-4, "final latents differ by {latent_diff}");
    for (f, m) in fused.images.iter().zip(&matmul.images) {
        // Summation order alone: at most one step of 8-bit rounding.
        assert!(max_diff(f, m) <= 1, "differ by {}", max_diff(f, m));
    }
    assert!(
        max_diff(&fused.images[0], &fused.images[1]) > 8,
        "the two prompts render alike"
    );
}

#[test]
fn non_finite_outputs_fail_instead_of_writing_a_black_image() {
    let (_t, dir) = tiny(TinyArch::Sd1, 7);
    // A scaling factor of 0 sends infinities into the decoder.
    let cfg = dir.join("vae/config.json");
    rewrite(
        &cfg,
        "\"scaling_factor\": 0.18215",
        "\"scaling_factor\": 0.0",
    );
    let sd = load(&dir);
    let err = sd
        .generate(&request(vec![sample("x", 1)], SchedulerKind::Ddim), &|_| {})
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("VAE decoder produced non-finite values"),
        "{err}"
    );
}

#[test]
fn broken_model_folders_are_refused_with_the_file_named() {
    // Truncated weights.
    let (_t, dir) = tiny(TinyArch::Sd1, 8);
    let unet = dir.join("unet/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&unet).unwrap();
    std::fs::write(&unet, &bytes[..bytes.len() / 2]).unwrap();
    let err = load_error(&dir);
    assert!(
        err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // Hashing the folder (what a worker does when it starts) refuses it too.
    let folder = ModelFolder::open(&dir, None).unwrap();
    let err = folder.hash_weights().unwrap_err().to_string();
    assert!(
        err.contains("unet/diffusion_pytorch_model.safetensors") && err.contains("truncated"),
        "{err}"
    );
    // Bytes after the last tensor, and a file that is not safetensors.
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0; 16]);
    std::fs::write(&unet, &padded).unwrap();
    let err = folder.hash_weights().unwrap_err().to_string();
    assert!(err.contains("bytes after the last tensor"), "{err}");
    std::fs::write(&unet, b"PK\x03\x04 a zip file, not safetensors").unwrap();
    let err = folder.hash_weights().unwrap_err().to_string();
    assert!(err.contains("not a safetensors file"), "{err}");
    std::fs::write(&unet, &bytes).unwrap();
    assert!(folder.hash_weights().is_ok(), "the whole file passes");

    // Weights that do not fit the config.
    let (_t, dir) = tiny(TinyArch::Sd1, 8);
    let cfg = dir.join("unet/config.json");
    rewrite(&cfg, "\"layers_per_block\": 2", "\"layers_per_block\": 3");
    let err = load_error(&dir);
    assert!(
        err.contains("loading unet") && err.contains("resnets.2"),
        "{err}"
    );

    // A missing weights file.
    let (_t, dir) = tiny(TinyArch::Sd1, 8);
    std::fs::remove_file(dir.join("vae/diffusion_pytorch_model.safetensors")).unwrap();
    let err = ModelFolder::open(&dir, None).unwrap_err().to_string();
    assert!(err.contains("vae has no weights file"), "{err}");

    // Not a diffusers folder.
    let err = ModelFolder::open(&dir.join("unet"), None)
        .unwrap_err()
        .to_string();
    assert!(err.contains("model_index.json"), "{err}");
}

#[test]
fn weights_that_differ_from_the_registry_are_refused() {
    let (_t, dir) = tiny(TinyArch::Sd1, 9);
    let folder = ModelFolder::open(&dir, None).unwrap();
    let mut record = folder.hash_weights().unwrap();
    folder.verify_weights(&record).unwrap();
    record[0].1 = "0".repeat(64);
    let err = folder.verify_weights(&record).unwrap_err().to_string();
    assert!(
        err.contains(&record[0].0) && err.contains("refusing to render"),
        "{err}"
    );
}

#[test]
fn tiny_checkpoints_are_deterministic_from_the_seed() {
    let (_a, a) = tiny(TinyArch::Sd1, 11);
    let (_b, b) = tiny(TinyArch::Sd1, 11);
    let (_c, c) = tiny(TinyArch::Sd1, 12);
    let digest = |d: &Path| ModelFolder::open(d, None).unwrap().hash_weights().unwrap();
    assert_eq!(digest(&a), digest(&b));
    assert_ne!(digest(&a), digest(&c));
    let err = init_tiny(&a, TinyArch::Sd1, 1, Some(&clip_bpe()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("not empty"), "{err}");
}

mod super_resolution {
    use super::*;
    use hallmark_diffusion::esrgan::RrdbNet;
    use hallmark_diffusion::upscale::{HiresFix, esrgan, hires_fix};

    fn photo(w: u32, h: u32) -> image::RgbImage {
        image::RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 3) as u8, (y * 5) as u8, ((x ^ y) * 7) as u8])
        })
    }

    fn net(scale: usize) -> (tempfile::TempDir, RrdbNet) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("esrgan");
        init_tiny(&dir, TinyArch::Esrgan { scale }, 3, None).unwrap();
        let n = RrdbNet::load(&dir, &candle_core::Device::Cpu, candle_core::DType::F32).unwrap();
        (tmp, n)
    }

    #[test]
    fn esrgan_upscales_by_its_factor_and_tiles_match_one_pass() {
        for scale in [2usize, 4] {
            let (_t, n) = net(scale);
            assert_eq!(n.config.scale, scale);
            let img = photo(60, 44);
            let whole = n.upscale(&img, 1024, 0).unwrap();
            assert_eq!(whole.dimensions(), (60 * scale as u32, 44 * scale as u32));
            // A margin wider than the network's receptive field makes tiles seamless.
            let tiled = n.upscale(&img, 24, 96).unwrap();
            assert!(
                max_diff(&whole, &tiled) <= 1,
                "x{scale}: tiles differ from one pass"
            );
        }
        let (_t, n) = net(4);
        let img = photo(48, 32);
        assert_eq!(esrgan(&n, &img, 2, 64).unwrap().dimensions(), (96, 64));
        assert!(
            esrgan(&n, &img, 3, 64)
                .unwrap_err()
                .to_string()
                .contains("must be 2 or 4")
        );
    }

    #[test]
    fn hires_fix_rerenders_the_resized_image_tile_by_tile() {
        let (_t, dir) = tiny(TinyArch::Sd1, 13);
        let sd = load(&dir);
        let base = sd
            .generate(
                &request(vec![sample("a barn", 4)], SchedulerKind::Ddim),
                &|_| {},
            )
            .unwrap()
            .images
            .remove(0);
        let cfg = HiresFix {
            steps: 4,
            tile: 256,
            overlap: 64,
            ..HiresFix::default()
        };
        let up = hires_fix(&sd, &base, 2, &sample("a barn", 4), &cfg, &|_| {}).unwrap();
        assert_eq!(up.dimensions(), (384, 384));
        assert_eq!(
            up,
            hires_fix(&sd, &base, 2, &sample("a barn", 4), &cfg, &|_| {}).unwrap()
        );
        let resized =
            image::imageops::resize(&base, 384, 384, image::imageops::FilterType::Lanczos3);
        assert!(
            max_diff(&up, &resized) > 10,
            "the img2img pass changed nothing"
        );
    }

    #[test]
    fn a_file_that_is_not_rrdbnet_is_refused() {
        let (_t, dir) = tiny(TinyArch::Sd1, 14);
        let err = RrdbNet::load(
            &dir.join("unet/diffusion_pytorch_model.safetensors"),
            &candle_core::Device::Cpu,
            candle_core::DType::F32,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("not an RRDBNet checkpoint"), "{err}");
    }
}

#[test]
fn a_tokenizer_json_folder_as_transformers_5_saves_it_loads_the_same_tokenizer() {
    let (_t, dir) = tiny(TinyArch::Sd1, 15);
    let tok = dir.join("tokenizer");
    let vocab: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tok.join("vocab.json")).unwrap()).unwrap();
    let merges: Vec<serde_json::Value> = std::fs::read_to_string(tok.join("merges.txt"))
        .unwrap()
        .lines()
        .skip(1)
        .map(|l| {
            let (a, b) = l.split_once(' ').unwrap();
            serde_json::json!([a, b])
        })
        .collect();
    let before = hallmark_diffusion::tokenizer::ClipTokenizer::from_folder(&tok).unwrap();
    let prompt = "A PHOTO of a naïve cat, 4:30pm!!";
    let want = before.encode(prompt);
    std::fs::remove_file(tok.join("vocab.json")).unwrap();
    std::fs::remove_file(tok.join("merges.txt")).unwrap();
    let json = serde_json::json!({"model": {"type": "BPE", "vocab": vocab, "merges": merges}});
    std::fs::write(tok.join("tokenizer.json"), json.to_string()).unwrap();
    let after = hallmark_diffusion::tokenizer::ClipTokenizer::from_folder(&tok).unwrap();
    assert_eq!(after.encode(prompt), want);
}

#[test]
fn sdxl_batches_mix_empty_and_given_negatives_as_singles_do() {
    let (_t, dir) = tiny(TinyArch::Sdxl, 11);
    let sd = load(&dir);
    let fox = sample("a red fox", 5);
    let whale = Sample {
        negative: "fog, rain".into(),
        ..sample("a blue whale", 6)
    };
    let mut both = request(vec![fox.clone(), whale.clone()], SchedulerKind::Euler);
    both.width = 64;
    both.height = 64;
    let single = |s: &Sample| {
        let mut r = request(vec![s.clone()], SchedulerKind::Euler);
        r.width = 64;
        r.height = 64;
        sd.generate(&r, &|_| {}).unwrap()
    };
    let out = sd.generate(&both, &|_| {}).unwrap();
    let (a, b) = (single(&fox), single(&whale));
    let lat = |g: &hallmark_diffusion::Generation, i: usize| -> Vec<f32> {
        g.latents
            .get(i)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let close = |x: &[f32], y: &[f32]| x.iter().zip(y).all(|(p, q)| (p - q).abs() < 1e-4);
    assert!(
        close(&lat(&out, 0), &lat(&a, 0)),
        "the empty negative's zeros leaked"
    );
    assert!(
        close(&lat(&out, 1), &lat(&b, 0)),
        "the given negative was lost in the batch"
    );
    // The negative matters under guidance: zeros and an encoding differ.
    let plain = single(&Sample {
        negative: String::new(),
        ..whale.clone()
    });
    assert!(!close(&lat(&plain, 0), &lat(&b, 0)));
}

#[test]
fn sdxl_folders_with_missing_or_mismatched_parts_are_refused_by_name() {
    // No second text encoder.
    let (_t, dir) = tiny(TinyArch::Sdxl, 12);
    std::fs::remove_file(dir.join("text_encoder_2/model.safetensors")).unwrap();
    let err = ModelFolder::open(&dir, None).unwrap_err().to_string();
    assert!(err.contains("text_encoder_2 has no weights file"), "{err}");

    // A refiner-style UNet (aesthetic-score ids: another added width).
    let (_t, dir) = tiny(TinyArch::Sdxl, 12);
    let cfg = dir.join("unet/config.json");
    rewrite(
        &cfg,
        "\"projection_class_embeddings_input_dim\": 80",
        "\"projection_class_embeddings_input_dim\": 72",
    );
    let err = load_error(&dir);
    assert!(
        err.contains("added conditioning takes 72") && err.contains("refiner"),
        "{err}"
    );

    // A base model's folder relabelled as a refiner (no first encoder,
    // aesthetic score): its UNet attends to both encoders' states.
    let (_t, dir) = tiny(TinyArch::Sdxl, 12);
    let index = dir.join("model_index.json");
    let relabel = |f: &dyn Fn(&mut serde_json::Value)| {
        let mut json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&index).unwrap()).unwrap();
        f(&mut json);
        std::fs::write(&index, json.to_string()).unwrap();
    };
    relabel(&|j| {
        j["text_encoder"] = serde_json::json!([null, null]);
        j["tokenizer"] = serde_json::json!([null, null]);
        j["requires_aesthetics_score"] = true.into();
    });
    let err = load_error(&dir);
    assert!(err.contains("attends to 64-wide text states"), "{err}");
    // Half a refiner: the aesthetic score with a first encoder, or the
    // other way round.
    relabel(&|j| j["text_encoder"] = serde_json::json!(["transformers", "CLIPTextModel"]));
    let err = ModelFolder::open(&dir, None).unwrap_err().to_string();
    assert!(
        err.contains("an aesthetic score but a first text encoder"),
        "{err}"
    );
    relabel(&|j| {
        j["text_encoder"] = serde_json::json!([null, null]);
        j["requires_aesthetics_score"] = false.into();
    });
    let err = ModelFolder::open(&dir, None).unwrap_err().to_string();
    assert!(
        err.contains("no first text encoder but no aesthetic score"),
        "{err}"
    );
    // A refiner's UNet needs its five ids.
    let (_t, dir) = tiny(TinyArch::SdxlRefiner, 12);
    rewrite(
        &dir.join("unet/config.json"),
        "\"projection_class_embeddings_input_dim\": 72",
        "\"projection_class_embeddings_input_dim\": 80",
    );
    let err = load_error(&dir);
    assert!(
        err.contains("added conditioning takes 80") && err.contains("five ids"),
        "{err}"
    );

    // A second encoder without the projection SDXL pools through.
    let (_t, dir) = tiny(TinyArch::Sdxl, 12);
    let cfg = dir.join("text_encoder_2/config.json");
    rewrite(&cfg, "CLIPTextModelWithProjection", "CLIPTextModel");
    let err = load_error(&dir);
    assert!(err.contains("CLIPTextModelWithProjection"), "{err}");
}
