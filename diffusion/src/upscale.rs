//! The super-resolution stage: Real-ESRGAN, or the "hires fix" (resize,
//! then img2img with the same Stable Diffusion model at a low strength,
//! tile by tile when the image is large).

use std::str::FromStr;

use image::RgbImage;
use image::imageops::FilterType;

use crate::DiffusionError;
use crate::esrgan::RrdbNet;
use crate::pipeline::{GenerateRequest, Sample, StableDiffusion};
use crate::scheduler::SchedulerKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpscaleMethod {
    Esrgan,
    HiresFix,
}

impl UpscaleMethod {
    /// The name jobs use (one of `hallmark_proto::UPSCALE_METHODS`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Esrgan => "esrgan",
            Self::HiresFix => "hires-fix",
        }
    }
}

impl FromStr for UpscaleMethod {
    type Err = DiffusionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "esrgan" => Ok(Self::Esrgan),
            "hires-fix" | "hires_fix" => Ok(Self::HiresFix),
            other => Err(DiffusionError::BadRequest(format!(
                "unknown upscale method {other:?} ({})",
                hallmark_proto::UPSCALE_METHODS.join(", ")
            ))),
        }
    }
}

/// Upscale by `factor` (2 or 4) with a Real-ESRGAN network of scale 2 or 4
/// (a ×4 network downsamples its output for ×2; a ×2 network runs twice for ×4).
pub fn esrgan(
    net: &RrdbNet,
    img: &RgbImage,
    factor: u32,
    tile: usize,
) -> Result<RgbImage, DiffusionError> {
    check_factor(factor)?;
    let s = net.config.scale as u32;
    let (w, h) = (img.width() * factor, img.height() * factor);
    let out = match (s, factor) {
        (a, b) if a == b => net.upscale(img, tile, 16)?,
        (4, 2) => image::imageops::resize(&net.upscale(img, tile, 16)?, w, h, FilterType::Lanczos3),
        (2, 4) => net.upscale(&net.upscale(img, tile, 16)?, tile, 16)?,
        _ => {
            return Err(DiffusionError::BadModel(format!(
                "a x{s} network cannot upscale x{factor}"
            )));
        }
    };
    Ok(out)
}

fn check_factor(factor: u32) -> Result<(), DiffusionError> {
    if factor == 2 || factor == 4 {
        Ok(())
    } else {
        Err(DiffusionError::BadRequest(format!(
            "upscale factor must be 2 or 4, got {factor}"
        )))
    }
}

/// Settings of the hires fix.
#[derive(Debug, Clone)]
pub struct HiresFix {
    pub strength: f64,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    /// Largest side of one img2img tile (a multiple of 64).
    pub tile: usize,
    /// Overlap between tiles, blended linearly.
    pub overlap: usize,
}

impl Default for HiresFix {
    fn default() -> Self {
        Self {
            strength: 0.4,
            steps: 20,
            guidance: 7.5,
            scheduler: SchedulerKind::EulerAncestral,
            tile: 512,
            overlap: 64,
        }
    }
}

/// Tile origins covering `len` with tiles of `tile` overlapping by `overlap`.
fn tile_starts(len: usize, tile: usize, overlap: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let stride = tile - overlap;
    let mut v: Vec<usize> = (0..)
        .map(|i| i * stride)
        .take_while(|&s| s + tile < len)
        .collect();
    v.push(len - tile);
    v
}

/// Resize by `factor`, then re-render at `strength` with the same prompt.
pub fn hires_fix(
    sd: &StableDiffusion,
    img: &RgbImage,
    factor: u32,
    sample: &Sample,
    cfg: &HiresFix,
    progress: &dyn Fn(f32),
) -> Result<RgbImage, DiffusionError> {
    check_factor(factor)?;
    if !(cfg.strength > 0.0 && cfg.strength <= 1.0) {
        return Err(DiffusionError::BadRequest(format!(
            "hires-fix strength must be in (0, 1], got {}",
            cfg.strength
        )));
    }
    let (w, h) = (img.width() * factor, img.height() * factor);
    if !w.is_multiple_of(8) || !h.is_multiple_of(8) {
        return Err(DiffusionError::BadRequest(format!(
            "the upscaled size {w}x{h} is not a multiple of 8"
        )));
    }
    let big = image::imageops::resize(img, w, h, FilterType::Lanczos3);
    let tile = (cfg.tile / 8 * 8).max(64);
    let overlap = (cfg.overlap / 8 * 8).min(tile / 2);
    let xs = tile_starts(w as usize, tile, overlap);
    let ys = tile_starts(h as usize, tile, overlap);
    let (tw, th) = ((w as usize).min(tile), (h as usize).min(tile));
    let mut acc = vec![0f32; (w * h * 3) as usize];
    let mut weight = vec![0f32; (w * h) as usize];
    let total = xs.len() * ys.len();
    let mut done = 0;
    for &y0 in &ys {
        for &x0 in &xs {
            let crop = image::imageops::crop_imm(&big, x0 as u32, y0 as u32, tw as u32, th as u32)
                .to_image();
            let mut req = GenerateRequest::new(
                vec![Sample {
                    seed: sample.seed.wrapping_add(done as u64),
                    ..sample.clone()
                }],
                tw,
                th,
            );
            req.steps = cfg.steps;
            req.guidance = cfg.guidance;
            req.scheduler = cfg.scheduler;
            req.init_images = Some(vec![crop]);
            req.strength = cfg.strength;
            let base = done as f32 / total as f32;
            let out = sd.generate(&req, &|p| progress(base + p / total as f32))?;
            let tile_img = &out.images[0];
            // Feathered weights: 1 inside, ramping down across the overlap.
            let ramp = |i: usize, n: usize| -> f32 {
                if overlap == 0 {
                    return 1.0;
                }
                let d = i.min(n - 1 - i) as f32 + 1.0;
                (d / overlap as f32).min(1.0)
            };
            for (x, y, p) in tile_img.enumerate_pixels() {
                let (x, y) = (x as usize, y as usize);
                let wgt = ramp(x, tw) * ramp(y, th);
                let (gx, gy) = (x0 + x, y0 + y);
                let idx = gy * w as usize + gx;
                weight[idx] += wgt;
                for c in 0..3 {
                    acc[idx * 3 + c] += wgt * p[c] as f32;
                }
            }
            done += 1;
        }
    }
    let mut out = RgbImage::new(w, h);
    for (i, p) in out.pixels_mut().enumerate() {
        for c in 0..3 {
            p[c] = (acc[i * 3 + c] / weight[i].max(1e-6))
                .round()
                .clamp(0.0, 255.0) as u8;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_a_job_may_name_is_implemented() {
        let parsed: Vec<UpscaleMethod> = hallmark_proto::UPSCALE_METHODS
            .iter()
            .map(|m| m.parse().unwrap())
            .collect();
        assert_eq!(parsed, [UpscaleMethod::Esrgan, UpscaleMethod::HiresFix]);
        let names: Vec<&str> = parsed.iter().map(|m| m.name()).collect();
        assert_eq!(names, hallmark_proto::UPSCALE_METHODS, "names round-trip");
        let e = "bicubic".parse::<UpscaleMethod>().unwrap_err().to_string();
        assert!(e.contains("esrgan, hires-fix"), "{e}");
    }

    #[test]
    fn tiles_cover_the_image_with_the_requested_overlap() {
        assert_eq!(tile_starts(400, 512, 64), vec![0]);
        let s = tile_starts(1024, 512, 64);
        assert_eq!(s, vec![0, 448, 512]);
        assert!(s.windows(2).all(|w| w[1] - w[0] <= 448));
        assert_eq!(s.last().unwrap() + 512, 1024);
    }
}
