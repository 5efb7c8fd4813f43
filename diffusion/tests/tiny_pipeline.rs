//! The whole pipeline on tiny generated checkpoints, loaded through the
//! same loader real checkpoints use.

use std::path::{Path, PathBuf};

use hallmark_diffusion::tiny::{TinyArch, init_tiny};
use hallmark_diffusion::{
    GenerateRequest, LoadOptions, Sample, SchedulerKind, StableDiffusion, model::ModelFolder,
};

pub fn clip_bpe() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/data/clip/bpe_simple_vocab_16e6.txt.gz")
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
