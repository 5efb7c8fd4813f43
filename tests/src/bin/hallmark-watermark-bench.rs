//! `hallmark-watermark-bench`: the watermark attack suite on Hallmark's codec
//! and, side by side in the same run, on invisible-watermark's dwtDct and
//! dwtDctSvd (through `bench/watermark/baseline.py`). Same images, same
//! attacks (this binary applies them to every method's marked files).
//!
//! Prints, per attack and method: bit accuracy (of 64 payload bits, averaged
//! over images) and detection rate; and per method PSNR and time per image.
//! Detection for Hallmark is its CRC-checked decode; the baselines have no
//! detector, so they count as detected when ≥ 58 of 64 bits are right
//! (chance of that on an unmarked image: about 10⁻¹¹).
//!
//! Run it with `bench/watermark/run.sh`, which makes the Python environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use hallmark_provenance::watermark::{self, EmbedOptions, WatermarkKey, attacks::Attack};
use image::RgbImage;

#[derive(Parser)]
struct Args {
    /// Folder of photographs (PNG/JPEG).
    #[arg(long)]
    images: PathBuf,
    /// Python of the virtual environment with invisible-watermark.
    #[arg(long)]
    python: PathBuf,
    /// The baseline driver script.
    #[arg(long)]
    baseline: PathBuf,
}

const PAYLOAD: u64 = 0x0123_4567_89AB_CDEF;
const BASELINES: [&str; 2] = ["dwtDct", "dwtDctSvd"];

#[derive(Default)]
struct Tally {
    bits: f64,
    detected: u32,
    runs: u32,
}

impl Tally {
    fn add(&mut self, correct_bits: u32, detected: bool) {
        self.bits += f64::from(correct_bits) / 64.0;
        self.detected += u32::from(detected);
        self.runs += 1;
    }

    fn cell(&self) -> String {
        if self.runs == 0 {
            return "–".into();
        }
        format!(
            "{:.1}% / {:.0}%",
            100.0 * self.bits / f64::from(self.runs),
            100.0 * f64::from(self.detected) / f64::from(self.runs)
        )
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let images = load_images(&args.images)?;
    let key = WatermarkKey::from_secret(b"hallmark-watermark-bench");
    let work = tempfile::tempdir()?;
    let root = work.path();
    std::fs::create_dir_all(root.join("orig"))?;

    // Hallmark's codec.
    let mut ours: BTreeMap<usize, Tally> = BTreeMap::new();
    let (mut psnr, mut embed_ms, mut detect_ms, mut detects) = (Vec::new(), 0.0, 0.0, 0);
    for (name, img) in &images {
        img.save(root.join("orig").join(name))?;
        let t = Instant::now();
        let marked = watermark::embed(img, PAYLOAD, &key, EmbedOptions::default())?;
        embed_ms += t.elapsed().as_secs_f64() * 1000.0;
        psnr.push(watermark::psnr(img, &marked));
        for (i, attack) in Attack::SUITE.iter().enumerate() {
            let attacked = attack.apply(&marked);
            let t = Instant::now();
            let found = watermark::analyze(&attacked, &key);
            detect_ms += t.elapsed().as_secs_f64() * 1000.0;
            detects += 1;
            let correct = found
                .best_payload
                .map(|p| 64 - (p ^ PAYLOAD).count_ones())
                .unwrap_or(32);
            ours.entry(i).or_default().add(
                correct,
                found.detection.is_some_and(|d| d.payload == PAYLOAD),
            );
        }
    }

    // The baselines: embed in Python, attack here, decode in Python.
    let embedded = python(&args, "embed", root)?;
    let mut base_psnr: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let mut base_embed_ms: BTreeMap<String, f64> = BTreeMap::new();
    for line in &embedded {
        let method = line["method"].as_str().unwrap_or_default().to_string();
        let name = line["image"].as_str().unwrap_or_default();
        *base_embed_ms.entry(method.clone()).or_default() +=
            line["embed_ms"].as_f64().unwrap_or(0.0);
        let original = image::open(root.join("orig").join(name))?.to_rgb8();
        let marked = image::open(root.join(&method).join(name))?.to_rgb8();
        base_psnr
            .entry(method.clone())
            .or_default()
            .push(watermark::psnr(&original, &marked));
        for (i, attack) in Attack::SUITE.iter().enumerate() {
            let dir = root.join(&method).join(format!("a{i:02}"));
            std::fs::create_dir_all(&dir)?;
            attack.apply(&marked).save(dir.join(name))?;
        }
    }
    let decoded = python(&args, "decode", root)?;
    let mut theirs: BTreeMap<(String, usize), Tally> = BTreeMap::new();
    let mut base_decode_ms: BTreeMap<String, f64> = BTreeMap::new();
    for line in &decoded {
        let method = line["method"].as_str().unwrap_or_default().to_string();
        let attack: usize = line["attack"].as_str().unwrap_or("a99")[1..]
            .parse()
            .unwrap_or(99);
        let bits = line["bits"].as_u64().unwrap_or(0) as u32;
        *base_decode_ms.entry(method.clone()).or_default() +=
            line["decode_ms"].as_f64().unwrap_or(0.0);
        theirs
            .entry((method, attack))
            .or_default()
            .add(bits, bits >= 58);
    }

    // Past the targets: harsher attacks, Hallmark only.
    let harsher = [
        Attack::Jpeg(30),
        Attack::Resize(0.4),
        Attack::Resize(1.5),
        Attack::CenterCrop(0.6),
        Attack::Rotate(4.0),
        Attack::Rotate(-7.0),
        Attack::Noise(10.0),
        Attack::ResizeThenJpeg(0.5, 60),
    ];
    let mut beyond: Vec<Tally> = harsher.iter().map(|_| Tally::default()).collect();
    for (_, img) in &images {
        let marked = watermark::embed(img, PAYLOAD, &key, EmbedOptions::default())?;
        for (tally, attack) in beyond.iter_mut().zip(harsher) {
            let found = watermark::analyze(&attack.apply(&marked), &key);
            let correct = found
                .best_payload
                .map(|p| 64 - (p ^ PAYLOAD).count_ones())
                .unwrap_or(32);
            tally.add(
                correct,
                found.detection.is_some_and(|d| d.payload == PAYLOAD),
            );
        }
    }

    // False detections: every unmarked image under every attack.
    let mut false_hits = 0;
    for (_, img) in &images {
        for attack in Attack::SUITE {
            false_hits += usize::from(watermark::detect(&attack.apply(img), &key).is_some());
        }
    }
    // Embed + decode of one 1024×1024 image on this thread (median of 7).
    let square: Vec<&RgbImage> = images
        .iter()
        .filter(|(_, i)| i.width() == 1024 && i.height() == 1024)
        .map(|(_, i)| i)
        .collect();
    let mut both_ms = Vec::new();
    for img in &square {
        for _ in 0..7 {
            let t = Instant::now();
            let marked = watermark::embed(img, PAYLOAD, &key, EmbedOptions::default())?;
            let _ = watermark::detect(&marked, &key);
            both_ms.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    both_ms.sort_by(f64::total_cmp);

    let n = images.len() as f64;
    println!(
        "Watermark robustness: {} images ({}), 64-bit payload",
        images.len(),
        images
            .iter()
            .map(|(n, i)| format!("{n} {}x{}", i.width(), i.height()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!();
    println!(
        "| attack | Hallmark bits / detected | dwtDct bits / detected | dwtDctSvd bits / detected |"
    );
    println!("|---|---|---|---|");
    for (i, attack) in Attack::SUITE.iter().enumerate() {
        let base = |m: &str| {
            theirs
                .get(&(m.to_string(), i))
                .map(Tally::cell)
                .unwrap_or_else(|| "–".into())
        };
        println!(
            "| {} | {} | {} | {} |",
            attack.name(),
            ours[&i].cell(),
            base("dwtDct"),
            base("dwtDctSvd")
        );
    }
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "| PSNR mean (min) | {:.1} dB ({:.1}) | {} | {} |",
        mean(&psnr),
        min(&psnr),
        BASELINES.map(|m| base_psnr
            .get(m)
            .map(|v| format!("{:.1} dB ({:.1})", mean(v), min(v)))
            .unwrap_or_default())[0],
        BASELINES.map(|m| base_psnr
            .get(m)
            .map(|v| format!("{:.1} dB ({:.1})", mean(v), min(v)))
            .unwrap_or_default())[1]
    );
    let runs = Attack::SUITE.len() as f64 * n;
    println!(
        "| embed ms / image | {:.1} | {:.1} | {:.1} |",
        embed_ms / n,
        base_embed_ms.get("dwtDct").copied().unwrap_or(0.0) / n,
        base_embed_ms.get("dwtDctSvd").copied().unwrap_or(0.0) / n
    );
    println!(
        "| decode ms / image | {:.1} | {:.1} | {:.1} |",
        detect_ms / f64::from(detects),
        base_decode_ms.get("dwtDct").copied().unwrap_or(0.0) / runs,
        base_decode_ms.get("dwtDctSvd").copied().unwrap_or(0.0) / runs
    );
    println!();
    println!("| harsher attack (Hallmark only) | bits / detected |");
    println!("|---|---|");
    for (attack, tally) in harsher.iter().zip(&beyond) {
        println!("| {} | {} |", attack.name(), tally.cell());
    }
    println!();
    println!(
        "Hallmark embed + decode at 1024×1024, one thread: median {:.1} ms over {} runs",
        both_ms.get(both_ms.len() / 2).copied().unwrap_or(0.0),
        both_ms.len()
    );
    println!(
        "Hallmark false detections on the unmarked images under every attack: {false_hits} of {}",
        images.len() * Attack::SUITE.len()
    );
    Ok(())
}

/// The photographs at 512 and 1024 wide, and two smooth generated-like images.
fn load_images(dir: &Path) -> anyhow::Result<Vec<(String, RgbImage)>> {
    let mut out = Vec::new();
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("png" | "jpg" | "jpeg")
            )
        })
        .collect();
    names.sort();
    for path in names {
        let img = image::open(&path)
            .with_context(|| format!("{}", path.display()))?
            .to_rgb8();
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("image")
            .to_string();
        for width in [512u32, 1024] {
            let height =
                (u64::from(width) * u64::from(img.height()) / u64::from(img.width())) as u32;
            let resized =
                image::imageops::resize(&img, width, height, image::imageops::FilterType::Lanczos3);
            out.push((format!("{stem}-{width}.png"), resized));
        }
    }
    out.push((
        "generated-512.png".into(),
        watermark::attacks::smooth_field(512, 512, 1),
    ));
    out.push((
        "generated-1024.png".into(),
        watermark::attacks::smooth_field(1024, 1024, 2),
    ));
    Ok(out)
}

fn python(args: &Args, verb: &str, root: &Path) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = Command::new(&args.python)
        .arg(&args.baseline)
        .arg(verb)
        .arg(root)
        .output()
        .with_context(|| format!("running {}", args.python.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "baseline {verb} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect())
}
