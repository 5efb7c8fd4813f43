//! Parity with Hugging Face diffusers: the committed reference tensors in
//! `tests/reference/` (made by `tests/reference/run.sh` from the same tiny
//! checkpoints) against this engine, tensor by tensor.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use hallmark_diffusion::pipeline::{aesthetic_ids, size_ids};
use hallmark_diffusion::rng::NoiseGenerator;
use hallmark_diffusion::tiny::{TinyArch, init_tiny};
use hallmark_diffusion::tokenizer::ClipTokenizer;
use hallmark_diffusion::unet::AddedConditioning;
use hallmark_diffusion::{
    GenerateRequest, LoadOptions, Sample, SchedulerKind, StableDiffusion, model::ModelFolder,
};

/// Text embeddings and one UNet call: float32 on both sides, different kernels.
const TOL_SINGLE_PASS: f32 = 1e-4;
/// Four sampler steps with guidance 7.5 amplify the differences.
const TOL_FINAL_LATENTS: f32 = 2e-3;
/// Decoded pixels in [0, 1].
const TOL_IMAGE: f32 = 2e-3;

fn reference_file(arch: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(format!("../tests/reference/tiny-{arch}.safetensors"))
}

fn clip_bpe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/data/clip/bpe_simple_vocab_16e6.txt.gz")
}

struct Reference {
    tensors: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

fn read_reference(arch: &str) -> Reference {
    let path = reference_file(arch);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu).unwrap();
    Reference { tensors, meta }
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

fn assert_close(name: &str, ours: &Tensor, theirs: &Tensor, tol: f32) {
    let scale = theirs
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1.0);
    let d = max_abs_diff(ours, theirs);
    assert!(
        d <= tol * scale,
        "{name}: max |ours - diffusers| = {d:e} > {:e}",
        tol * scale
    );
}

/// A request for one square image of `prompt` as the references made it.
fn one_sample(
    prompt: &str,
    negative: &str,
    seed: u64,
    size: usize,
    steps: usize,
    scheduler: &str,
    guidance: f64,
) -> GenerateRequest {
    let mut req = GenerateRequest::new(
        vec![Sample {
            prompt: prompt.to_string(),
            negative: negative.to_string(),
            seed,
        }],
        size,
        size,
    );
    req.steps = steps;
    req.guidance = guidance;
    req.scheduler = scheduler.parse().unwrap();
    req
}

fn check_model(arch: &str, tiny: TinyArch) {
    let r = read_reference(arch);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(arch);
    init_tiny(&dir, tiny, 1, Some(&clip_bpe())).unwrap();
    let sd = StableDiffusion::load(
        ModelFolder::open(&dir, None).unwrap(),
        LoadOptions::default(),
    )
    .unwrap();
    let seed: u64 = r.meta["seed"].parse().unwrap();
    let steps: usize = r.meta["steps"].parse().unwrap();
    let size: usize = r.meta["size"].parse().unwrap();
    let prompt = r.meta["prompt"].clone();

    let xl = r.tensors.contains_key("text.pooled");

    // Tokenizers: exact ids.
    let probes: Vec<String> = serde_json::from_str(&r.meta["probes"]).unwrap();
    let tokenizers: &[(&str, &str)] = if xl {
        &[("tokenizer", "tokens"), ("tokenizer_2", "tokens2")]
    } else {
        &[("tokenizer", "tokens")]
    };
    for (folder, key) in tokenizers {
        let tok = ClipTokenizer::from_folder(&dir.join(folder)).unwrap();
        for (i, p) in probes.iter().enumerate() {
            let want: Vec<u32> = r.tensors[&format!("{key}.{i}")]
                .to_vec1::<i64>()
                .unwrap()
                .into_iter()
                .map(|x| x as u32)
                .collect();
            assert_eq!(tok.encode(p).ids, want, "{folder}: tokens of {p:?}");
        }
    }

    // Text encoders (SDXL: both penultimate states side by side, and the
    // second encoder's projected pooled output).
    let cond = sd.encode_text(std::slice::from_ref(&prompt)).unwrap();
    assert_close(
        "text.cond",
        &cond.context,
        &r.tensors["text.cond"],
        TOL_SINGLE_PASS,
    );
    let (uncond, added) = if xl {
        let pooled = cond.pooled.as_ref().expect("SDXL pools");
        assert_close(
            "text.pooled",
            pooled,
            &r.tensors["text.pooled"],
            TOL_SINGLE_PASS,
        );
        let neg = sd
            .encode_text(std::slice::from_ref(&r.meta["negative"]))
            .unwrap();
        assert_close(
            "text.neg",
            &neg.context,
            &r.tensors["text.neg"],
            TOL_SINGLE_PASS,
        );
        assert_close(
            "text.pooled_neg",
            neg.pooled.as_ref().unwrap(),
            &r.tensors["text.pooled_neg"],
            TOL_SINGLE_PASS,
        );
        // An empty negative is zeros (force_zeros_for_empty_prompt).
        assert_eq!(
            max_abs_diff(
                &r.tensors["text.uncond"],
                &cond.context.zeros_like().unwrap()
            ),
            0.0
        );
        let added = AddedConditioning {
            pooled: Tensor::cat(&[&pooled.zeros_like().unwrap(), pooled], 0).unwrap(),
            time_ids: size_ids(2, size, size).unwrap(),
        };
        (cond.context.zeros_like().unwrap(), Some(added))
    } else {
        let uncond = sd.encode_text(&[String::new()]).unwrap().context;
        assert_close(
            "text.uncond",
            &uncond,
            &r.tensors["text.uncond"],
            TOL_SINGLE_PASS,
        );
        (uncond, None)
    };
    let cond = cond.context;

    // The noise recipe: bit for bit.
    let init = &r.tensors["latents.init"];
    let ours = NoiseGenerator::new(seed).normals(init.elem_count());
    assert_eq!(
        ours,
        init.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        "initial latents"
    );

    // One UNet call with guidance's doubled batch, at DDIM's first timestep.
    let sampler = hallmark_diffusion::scheduler::Sampler::new(
        SchedulerKind::Ddim,
        sd.scheduler_config(),
        steps,
    )
    .unwrap();
    let t0 = sampler.timesteps()[0];
    let x = Tensor::cat(&[init, init], 0).unwrap();
    let ctx = Tensor::cat(&[&uncond, &cond], 0).unwrap();
    let eps = sd.predict(&x, t0, &ctx, added.as_ref()).unwrap();
    assert_close("unet.eps", &eps, &r.tensors["unet.eps"], TOL_SINGLE_PASS);

    // Whole runs, every sampler, with and without guidance.
    let request = |scheduler: &str, guidance: f64, negative: &str| {
        one_sample(&prompt, negative, seed, size, steps, scheduler, guidance)
    };
    for name in SchedulerKind::NAMES {
        for (guidance, tag) in [(7.5, "cfg"), (1.0, "nocfg")] {
            let out = sd.generate(&request(name, guidance, ""), &|_| {}).unwrap();
            let key = format!("final.{name}.{tag}");
            assert_close(&key, &out.latents, &r.tensors[&key], TOL_FINAL_LATENTS);
            let key = format!("image.{name}.{tag}");
            if let Some(img) = r.tensors.get(&key) {
                let decoded = sd.decode(&out.latents).unwrap();
                assert_close(&key, &decoded, img, TOL_IMAGE);
            }
        }
    }

    if xl {
        // A negative prompt conditions on its encoding, not zeros.
        let out = sd
            .generate(&request("euler_a", 7.5, &r.meta["negative"]), &|_| {})
            .unwrap();
        assert_close(
            "final.euler_a.cfg_neg",
            &out.latents,
            &r.tensors["final.euler_a.cfg_neg"],
            TOL_FINAL_LATENTS,
        );
        // SDXL-Turbo's way: trailing spacing, one Euler ancestral step, no
        // guidance — the scheduler config read from the folder.
        let sched = dir.join("scheduler/scheduler_config.json");
        let text = std::fs::read_to_string(&sched).unwrap();
        std::fs::write(&sched, text.replace("\"leading\"", "\"trailing\"")).unwrap();
        let turbo = StableDiffusion::load(
            ModelFolder::open(&dir, None).unwrap(),
            LoadOptions::default(),
        )
        .unwrap();
        let mut req = request("euler_a", 0.0, "");
        req.steps = 1;
        let out = turbo.generate(&req, &|_| {}).unwrap();
        assert_close(
            "final.turbo",
            &out.latents,
            &r.tensors["final.turbo"],
            TOL_FINAL_LATENTS,
        );
    }

    // Initial latents from a file give the same run as the seed.
    let npy = tmp.path().join("init.npy");
    init.write_npy(&npy).unwrap();
    let mut req = GenerateRequest::new(
        vec![Sample {
            prompt: prompt.clone(),
            negative: String::new(),
            seed: seed + 1,
        }],
        size,
        size,
    );
    req.steps = steps;
    req.scheduler = SchedulerKind::Ddim;
    req.init_latents = Some(hallmark_diffusion::latents::read_latents(&npy).unwrap());
    let out = sd.generate(&req, &|_| {}).unwrap();
    assert_close(
        "final.ddim.cfg from --init-latents",
        &out.latents,
        &r.tensors["final.ddim.cfg"],
        TOL_FINAL_LATENTS,
    );
}

#[test]
fn sd1_shaped_model_matches_diffusers() {
    check_model("sd1", TinyArch::Sd1);
}

#[test]
fn sd2_shaped_v_prediction_model_matches_diffusers() {
    check_model("sd2", TinyArch::Sd2);
}

#[test]
fn sdxl_shaped_model_matches_diffusers() {
    check_model("sdxl", TinyArch::Sdxl);
}

/// The tiny Real-ESRGAN checkpoint of `scale` against PyTorch's RRDBNet
/// (basicsr's architecture, `tests/reference/rrdbnet.py`) on the same two
/// noise images, with both of the CPU's convolution algorithms.
fn check_esrgan(scale: usize) {
    use hallmark_diffusion::conv::ConvAlgorithm;
    use hallmark_diffusion::esrgan::RrdbNet;
    let arch = format!("esrgan-x{scale}");
    let r = read_reference(&arch);
    assert_eq!(
        r.meta.get("scale").map(String::as_str),
        Some(&*scale.to_string())
    );
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(&arch);
    init_tiny(&dir, TinyArch::Esrgan { scale }, 1, None).unwrap();
    let (input, want) = (&r.tensors["input"], &r.tensors["output"]);
    // The tiny network's output stays within about ±0.005 of mid-grey (its
    // last convolution is scaled down), so the tolerance is relative to
    // that spread, not to the values.
    let spread = spread(want);
    assert!(spread > 1e-3, "the reference output is flat ({spread})");
    for algo in [ConvAlgorithm::WinogradNonfused, ConvAlgorithm::Im2col] {
        let net = RrdbNet::load_with(&dir, &Device::Cpu, candle_core::DType::F32, algo).unwrap();
        let d = max_abs_diff(&net.forward(input).unwrap(), want);
        assert!(
            d <= TOL_ESRGAN * spread,
            "{arch}, {algo}: max |ours - PyTorch| = {d:e} > {:e}",
            TOL_ESRGAN * spread
        );
    }
}

/// Real-ESRGAN's output against PyTorch's, relative to the output's spread
/// (measured: 1e-4; a dense block's residual scaled by 0.25 instead of 0.2
/// gives 2e-3).
const TOL_ESRGAN: f32 = 5e-4;

/// The largest value of `t` less its smallest.
fn spread(t: &Tensor) -> f32 {
    let scalar = |t: Tensor| t.to_scalar::<f32>().unwrap();
    scalar(t.max_all().unwrap()) - scalar(t.min_all().unwrap())
}

#[test]
fn esrgan_x2_matches_pytorch() {
    check_esrgan(2);
}

#[test]
fn esrgan_x4_matches_pytorch() {
    check_esrgan(4);
}

#[test]
fn sdxl_refiner_shaped_model_matches_diffusers() {
    let r = read_reference("sdxl-refiner");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("sdxl-refiner");
    init_tiny(&dir, TinyArch::SdxlRefiner, 1, Some(&clip_bpe())).unwrap();
    let sd = StableDiffusion::load(
        ModelFolder::open(&dir, None).unwrap(),
        LoadOptions::default(),
    )
    .unwrap();
    assert!(sd.folder.refiner);
    let seed: u64 = r.meta["seed"].parse().unwrap();
    let steps: usize = r.meta["steps"].parse().unwrap();
    let size: usize = r.meta["size"].parse().unwrap();
    let strength: f64 = r.meta["refine_strength"].parse().unwrap();
    let prompt = r.meta["prompt"].clone();
    let negative = r.meta["negative"].clone();

    // Its one tokenizer (the second, padding with `!`).
    let probes: Vec<String> = serde_json::from_str(&r.meta["probes"]).unwrap();
    let tok = ClipTokenizer::from_folder(&dir.join("tokenizer_2")).unwrap();
    for (i, p) in probes.iter().enumerate() {
        let want: Vec<u32> = r.tensors[&format!("tokens2.{i}")]
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect();
        assert_eq!(tok.encode(p).ids, want, "tokens of {p:?}");
    }

    // The second encoder's penultimate states are the whole context; an
    // empty negative is encoded, not zeros (force_zeros_for_empty_prompt
    // is false for the refiner).
    let text = |t: &str| sd.encode_text(&[t.to_string()]).unwrap();
    let (cond, uncond, neg) = (text(&prompt), text(""), text(&negative));
    for (name, ours, key) in [
        ("text.cond", &cond.context, "text.cond"),
        ("text.pooled", cond.pooled.as_ref().unwrap(), "text.pooled"),
        ("text.uncond", &uncond.context, "text.uncond"),
        (
            "text.pooled_uncond",
            uncond.pooled.as_ref().unwrap(),
            "text.pooled_uncond",
        ),
        ("text.neg", &neg.context, "text.neg"),
        (
            "text.pooled_neg",
            neg.pooled.as_ref().unwrap(),
            "text.pooled_neg",
        ),
    ] {
        assert_close(name, ours, &r.tensors[key], TOL_SINGLE_PASS);
    }

    // One guided UNet call with the five aesthetic-score ids.
    let init = &r.tensors["latents.init"];
    let sampler = hallmark_diffusion::scheduler::Sampler::new(
        SchedulerKind::Ddim,
        sd.scheduler_config(),
        steps,
    )
    .unwrap();
    let added = AddedConditioning {
        pooled: Tensor::cat(
            &[
                uncond.pooled.as_ref().unwrap(),
                cond.pooled.as_ref().unwrap(),
            ],
            0,
        )
        .unwrap(),
        time_ids: aesthetic_ids(1, true, size, size).unwrap(),
    };
    let eps = sd
        .predict(
            &Tensor::cat(&[init, init], 0).unwrap(),
            sampler.timesteps()[0],
            &Tensor::cat(&[&uncond.context, &cond.context], 0).unwrap(),
            Some(&added),
        )
        .unwrap();
    assert_close("unet.eps", &eps, &r.tensors["unet.eps"], TOL_SINGLE_PASS);

    // Refining the picture: every sampler, with and without guidance.
    let pixels: Vec<u8> = r.tensors["image.init"]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u8)
        .collect();
    let picture = image::RgbImage::from_raw(size as u32, size as u32, pixels).unwrap();
    let refine = |scheduler: &str, guidance: f64, negative: &str| {
        let mut req = one_sample(&prompt, negative, seed, size, steps, scheduler, guidance);
        req.init_images = Some(vec![picture.clone()]);
        req.strength = strength;
        sd.generate(&req, &|_| {}).unwrap().latents
    };
    for name in SchedulerKind::NAMES {
        for (guidance, tag) in [(7.5, "cfg"), (1.0, "nocfg")] {
            let key = format!("final.refine.{name}.{tag}");
            assert_close(
                &key,
                &refine(name, guidance, ""),
                &r.tensors[&key],
                TOL_FINAL_LATENTS,
            );
        }
    }
    assert_close(
        "final.refine.euler_a.cfg_neg",
        &refine("euler_a", 7.5, &negative),
        &r.tensors["final.refine.euler_a.cfg_neg"],
        TOL_FINAL_LATENTS,
    );

    // It refines; asked to draw from noise, it says so.
    let mut req = GenerateRequest::new(
        vec![Sample {
            prompt,
            negative: String::new(),
            seed,
        }],
        size,
        size,
    );
    req.steps = steps;
    let err = sd.generate(&req, &|_| {}).unwrap_err().to_string();
    assert!(
        err.contains("SDXL refiner") && err.contains("--refine-model"),
        "{err}"
    );
}

/// A reference picture (`height × width × channels`, 0–255 as f32) as bytes.
fn reference_bytes(r: &Reference, key: &str) -> Vec<u8> {
    r.tensors[key]
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
        .into_iter()
        .map(|v| v as u8)
        .collect()
}

#[test]
fn sd1_inpainting_matches_diffusers() {
    check_inpainting("sd1", TinyArch::Sd1Inpaint, TinyArch::Sd1);
}

#[test]
fn sd2_v_prediction_inpainting_matches_diffusers() {
    check_inpainting("sd2", TinyArch::Sd2Inpaint, TinyArch::Sd2);
}

#[test]
fn sdxl_inpainting_matches_diffusers() {
    check_inpainting("sdxl", TinyArch::SdxlInpaint, TinyArch::Sdxl);
}

/// The inpainting checkpoint of a shape, and the plain one, against
/// diffusers' inpainting pipeline.
fn check_inpainting(shape: &str, inpainting: TinyArch, plain: TinyArch) {
    let r = read_reference(&format!("{shape}-inpaint"));
    let seed: u64 = r.meta["seed"].parse().unwrap();
    let steps: usize = r.meta["steps"].parse().unwrap();
    let size: usize = r.meta["size"].parse().unwrap();
    let strength: f64 = r.meta["inpaint_strength"].parse().unwrap();
    let prompt = r.meta["prompt"].clone();
    let side = size as u32;
    let picture = image::RgbImage::from_raw(side, side, reference_bytes(&r, "image.init")).unwrap();
    let mask = image::GrayImage::from_raw(side, side, reference_bytes(&r, "image.mask")).unwrap();
    let tmp = tempfile::tempdir().unwrap();

    // The inpainting unet (mask and masked image as extra channels), and a
    // plain one (the kept region reset to the init image at every step).
    for (tiny, prefix) in [(inpainting, "inpaint"), (plain, "legacy")] {
        let dir = tmp.path().join(prefix);
        init_tiny(&dir, tiny, 1, Some(&clip_bpe())).unwrap();
        let sd = StableDiffusion::load(
            ModelFolder::open(&dir, None).unwrap(),
            LoadOptions::default(),
        )
        .unwrap();
        assert_eq!(sd.is_inpainting_model(), prefix == "inpaint");
        for name in ["ddim", "euler_a", "dpmpp_2m"] {
            for (guidance, tag) in [(7.5, "cfg"), (1.0, "nocfg")] {
                for s in [1.0, strength] {
                    let key = format!("final.{prefix}.{name}.{tag}.s{}", (s * 100.0).round());
                    let mut req = one_sample(&prompt, "", seed, size, steps, name, guidance);
                    req.init_images = Some(vec![picture.clone()]);
                    req.masks = Some(vec![mask.clone()]);
                    req.strength = s;
                    let ours = sd.generate(&req, &|_| {}).unwrap().latents;
                    assert_close(&key, &ours, &r.tensors[&key], TOL_FINAL_LATENTS);
                }
            }
        }

        // A mask needs an init image, of the request's size.
        let mut req = one_sample(&prompt, "", seed, size, steps, "ddim", 7.5);
        req.masks = Some(vec![mask.clone()]);
        let err = sd.generate(&req, &|_| {}).unwrap_err().to_string();
        assert!(err.contains("without init images"), "{err}");
        req.init_images = Some(vec![picture.clone()]);
        req.masks = Some(vec![image::GrayImage::new(side, side / 2)]);
        let err = sd.generate(&req, &|_| {}).unwrap_err().to_string();
        assert!(err.contains("mask is 64x32"), "{err}");

        // Without a mask the inpainting model refuses, naming why; the
        // plain one does img2img.
        req.masks = None;
        let plain = sd.generate(&req, &|_| {});
        if prefix == "inpaint" {
            let err = plain.unwrap_err().to_string();
            assert!(err.contains("inpainting model"), "{err}");
            req.init_images = None;
            let err = sd.generate(&req, &|_| {}).unwrap_err().to_string();
            assert!(err.contains("inpainting model"), "{err}");
        } else {
            plain.unwrap();
        }
    }
}
