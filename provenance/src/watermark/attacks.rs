//! The attack suite the watermark is measured against: what happens to
//! images in the wild. Used by the robustness tests and the benchmark.

use image::imageops::FilterType;
use image::{Rgb, RgbImage};

/// One named transformation of an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Attack {
    None,
    /// JPEG at this quality with 4:2:0 chroma subsampling.
    Jpeg(u8),
    /// Resize by this factor (decoded at the new size).
    Resize(f32),
    /// Centre crop keeping this share of the area.
    CenterCrop(f32),
    /// Rotation about the centre by this many degrees, same canvas.
    Rotate(f32),
    /// Gaussian blur with this sigma in pixels.
    Blur(f32),
    /// Additive Gaussian noise with this sigma, in levels of 255.
    Noise(f32),
    /// Brightness times this factor.
    Brightness(f32),
    /// Resize by the factor, then JPEG at the quality (4:2:0).
    ResizeThenJpeg(f32, u8),
}

impl Attack {
    /// The suite from the provenance issue.
    pub const SUITE: [Attack; 11] = [
        Attack::None,
        Attack::Jpeg(50),
        Attack::Resize(0.5),
        Attack::Resize(0.75),
        Attack::CenterCrop(0.8),
        Attack::Rotate(2.0),
        Attack::Blur(1.0),
        Attack::Noise(5.0),
        Attack::Brightness(1.2),
        Attack::ResizeThenJpeg(0.75, 75),
        Attack::Jpeg(90),
    ];

    pub fn name(&self) -> String {
        match self {
            Attack::None => "none".into(),
            Attack::Jpeg(q) => format!("jpeg q{q} 4:2:0"),
            Attack::Resize(f) => format!("resize {f}x"),
            Attack::CenterCrop(a) => format!("centre crop {:.0}% area", a * 100.0),
            Attack::Rotate(d) => format!("rotate {d}°"),
            Attack::Blur(s) => format!("gaussian blur σ={s}"),
            Attack::Noise(s) => format!("gaussian noise σ={s}/255"),
            Attack::Brightness(b) => format!("brightness +{:.0}%", (b - 1.0) * 100.0),
            Attack::ResizeThenJpeg(f, q) => format!("resize {f}x + jpeg q{q}"),
        }
    }

    pub fn apply(&self, img: &RgbImage) -> RgbImage {
        match *self {
            Attack::None => img.clone(),
            Attack::Jpeg(q) => jpeg(img, q),
            Attack::Resize(f) => resize(img, f),
            Attack::CenterCrop(a) => center_crop(img, a),
            Attack::Rotate(d) => rotate(img, d),
            Attack::Blur(s) => image::imageops::blur(img, s),
            Attack::Noise(s) => noise(img, s, 0x5EED),
            Attack::Brightness(b) => brightness(img, b),
            Attack::ResizeThenJpeg(f, q) => jpeg(&resize(img, f), q),
        }
    }
}

/// JPEG round trip at `quality` with 4:2:0 chroma subsampling.
pub fn jpeg(img: &RgbImage, quality: u8) -> RgbImage {
    let mut buf = Vec::new();
    let mut enc = jpeg_encoder::Encoder::new(&mut buf, quality);
    enc.set_sampling_factor(jpeg_encoder::SamplingFactor::F_2_2);
    let encoded = enc.encode(
        img.as_raw(),
        img.width() as u16,
        img.height() as u16,
        jpeg_encoder::ColorType::Rgb,
    );
    match encoded
        .ok()
        .and_then(|_| image::load_from_memory(&buf).ok())
    {
        Some(decoded) => decoded.to_rgb8(),
        None => img.clone(),
    }
}

pub fn resize(img: &RgbImage, factor: f32) -> RgbImage {
    let w = ((img.width() as f32 * factor).round() as u32).max(1);
    let h = ((img.height() as f32 * factor).round() as u32).max(1);
    image::imageops::resize(img, w, h, FilterType::CatmullRom)
}

pub fn center_crop(img: &RgbImage, area: f32) -> RgbImage {
    let side = area.sqrt();
    let w = (img.width() as f32 * side).round() as u32;
    let h = (img.height() as f32 * side).round() as u32;
    image::imageops::crop_imm(img, (img.width() - w) / 2, (img.height() - h) / 2, w, h).to_image()
}

/// Bilinear rotation about the centre; uncovered corners are black.
pub fn rotate(img: &RgbImage, degrees: f32) -> RgbImage {
    let (w, h) = (img.width() as f32, img.height() as f32);
    let (s, c) = degrees.to_radians().sin_cos();
    let (cx, cy) = (w / 2.0, h / 2.0);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
        let sx = c * dx + s * dy + cx - 0.5;
        let sy = -s * dx + c * dy + cy - 0.5;
        if sx < 0.0 || sy < 0.0 || sx > w - 1.0 || sy > h - 1.0 {
            return Rgb([0, 0, 0]);
        }
        let (x0, y0) = (sx.floor() as u32, sy.floor() as u32);
        let (x1, y1) = (
            (x0 + 1).min(img.width() - 1),
            (y0 + 1).min(img.height() - 1),
        );
        let (tx, ty) = (sx - x0 as f32, sy - y0 as f32);
        let mut out = [0u8; 3];
        for (ch, o) in out.iter_mut().enumerate() {
            let p = |x: u32, y: u32| f32::from(img.get_pixel(x, y)[ch]);
            let v = (p(x0, y0) * (1.0 - tx) + p(x1, y0) * tx) * (1.0 - ty)
                + (p(x0, y1) * (1.0 - tx) + p(x1, y1) * tx) * ty;
            *o = v.round().clamp(0.0, 255.0) as u8;
        }
        Rgb(out)
    })
}

/// Additive white Gaussian noise, deterministic for a seed.
pub fn noise(img: &RgbImage, sigma: f32, seed: u64) -> RgbImage {
    let mut state = seed;
    let mut uniform = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut out = img.clone();
    for v in out.iter_mut() {
        let (u1, u2) = (uniform().max(1e-12), uniform());
        let g = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        *v = (f64::from(*v) + g * f64::from(sigma))
            .round()
            .clamp(0.0, 255.0) as u8;
    }
    out
}

pub fn brightness(img: &RgbImage, factor: f32) -> RgbImage {
    let mut out = img.clone();
    for v in out.iter_mut() {
        *v = (f32::from(*v) * factor).round().clamp(0.0, 255.0) as u8;
    }
    out
}

/// A smooth colour field with soft bands: a stand-in for the low-texture
/// images generators produce, for tests and benchmarks.
pub fn smooth_field(width: u32, height: u32, seed: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        let (u, v) = (x as f32 / width as f32, y as f32 / height as f32);
        let t = (u * 6.0 + seed as f32).sin() * 0.5 + (v * 4.0 + u * 2.0).cos() * 0.5;
        Rgb([
            (120.0 + 80.0 * t + 40.0 * u) as u8,
            (90.0 + 60.0 * v + 30.0 * t) as u8,
            (150.0 - 70.0 * t * v) as u8,
        ])
    })
}
