//! The engine interface every renderer implements (synthetic now, latent
//! diffusion next), and the synthetic engine used for load and fault tests.

use std::time::Duration;

use hallmark_diffusion::mask;
use hallmark_proto::v1::{ModelCapability, TaskLease};
use hallmark_provenance::credentials::UpscaleRecord;
use image::{GrayImage, RgbImage};

/// One task to render: its lease, and the image it starts from.
#[derive(Debug, Clone)]
pub struct RenderTask {
    pub lease: TaskLease,
    /// The encoded file named by `lease.parent_sha256`: a `refine` or
    /// `upscale` task's base image, or an img2img `generate` task's init
    /// image.
    pub parent: Option<Vec<u8>>,
    /// The encoded mask named by `lease.mask_sha256` (inpainting).
    pub mask: Option<Vec<u8>>,
}

impl RenderTask {
    /// The image an img2img pass starts from, resized to the task's size
    /// (as diffusers' img2img resizes to the requested size): an img2img
    /// `generate` task's init image, or a `refine` task's base image;
    /// `None` for text-to-image. An inpainting task that renders only a crop
    /// around its mask (`mask_crop`) gets that crop, resized to the task's
    /// size.
    pub fn init_image(&self) -> Result<Option<RgbImage>, EngineError> {
        let Some(init) = self.whole_init_image()? else {
            return Ok(None);
        };
        // The mask is read only where it decides the crop.
        let crop = match self.lease.mask_crop {
            Some(_) => self.inpaint_crop(self.whole_mask()?.as_ref())?,
            None => None,
        };
        Ok(Some(self.cropped(init, crop)))
    }

    /// The inpainting mask, as grey levels at the task's size (resized as
    /// the init image is, blurred by `mask_blur`; white repaints, black
    /// keeps), cut to the crop `init_image` is: `None` without one.
    pub fn mask(&self) -> Result<Option<GrayImage>, EngineError> {
        let Some(mask) = self.whole_mask()? else {
            return Ok(None);
        };
        let crop = self.inpaint_crop(Some(&mask))?;
        Ok(Some(self.cropped(mask, crop)))
    }

    /// A picture at the task's size cut to an inpainting crop and resized
    /// back to the task's size; as it is without one.
    fn cropped<P>(
        &self,
        img: image::ImageBuffer<P, Vec<P::Subpixel>>,
        crop: Option<mask::Region>,
    ) -> image::ImageBuffer<P, Vec<P::Subpixel>>
    where
        P: image::Pixel + 'static,
    {
        match crop {
            Some(region) => mask::crop_to(&img, region, self.lease.width, self.lease.height),
            None => img,
        }
    }

    /// A rendered output made final: an inpainting task's output (of its
    /// crop, put back in its place) laid over its init image, so what the
    /// mask keeps is the init image's own pixels rather than the VAE's
    /// reconstruction of them, blended across a blurred edge (diffusers'
    /// `apply_overlay`). Other outputs are returned as they are.
    pub fn finish(&self, mut rendered: RenderedImage) -> Result<RenderedImage, EngineError> {
        let Some(mask) = self.whole_mask()? else {
            return Ok(rendered);
        };
        let init = self.whole_init_image()?.ok_or(EngineError::MissingParent)?;
        let crop = self.inpaint_crop(Some(&mask))?;
        let want = (self.lease.width, self.lease.height);
        if rendered.pixels.dimensions() != want {
            return Err(EngineError::Failed(format!(
                "the engine rendered {:?} pixels for a {want:?} inpainting task",
                rendered.pixels.dimensions()
            )));
        }
        rendered.pixels = mask::overlay(&init, &mask, &rendered.pixels, crop);
        Ok(rendered)
    }

    /// Which pictures `init_image` and `mask` make: tasks with the same key
    /// get the same ones (a batch decodes each once).
    pub fn pictures_key(&self) -> String {
        let l = &self.lease;
        format!(
            "{}|{}|{}|{:?}|{:?}",
            l.parent_sha256, l.mask_sha256, l.mask_blur, l.mask_crop, l.outpaint
        )
    }

    /// Whether the task renders through a mask: an uploaded one, or the
    /// one an outpaint makes.
    pub fn inpaints(&self) -> bool {
        !self.lease.mask_sha256.is_empty() || self.outpaints()
    }

    /// Whether the task extends its init image (only a `generate` task
    /// starts from one).
    fn outpaints(&self) -> bool {
        self.lease.outpaint.is_some() && self.lease.stage == "generate"
    }

    /// Where an outpainting task's init image goes on its canvas (what the
    /// margins leave); `None` when it does not outpaint, or leaves nothing.
    fn outpaint_inner(&self) -> Option<mask::Region> {
        let l = &self.lease;
        let o = l.outpaint.as_ref().filter(|_| self.outpaints())?;
        let x2 = l.width.checked_sub(o.right)?;
        let y2 = l.height.checked_sub(o.bottom)?;
        (o.left < x2 && o.top < y2).then_some(mask::Region {
            x1: o.left,
            y1: o.top,
            x2,
            y2,
        })
    }

    fn whole_init_image(&self) -> Result<Option<RgbImage>, EngineError> {
        let l = &self.lease;
        if l.stage != "generate" && l.stage != "refine" {
            return Ok(None);
        }
        let Some(bytes) = self.parent.as_deref() else {
            if l.parent_sha256.is_empty() && l.stage == "generate" {
                return Ok(None);
            }
            return Err(EngineError::MissingParent);
        };
        if !(l.strength > 0.0 && l.strength <= 1.0) {
            return Err(EngineError::Failed(format!(
                "img2img strength {} is outside (0, 1]",
                l.strength
            )));
        }
        let img = hallmark_provenance::credentials::decode_image(bytes)
            .map_err(|e| EngineError::BadParent(e.to_string()))?;
        if self.outpaints() {
            let inner = self
                .outpaint_inner()
                .ok_or_else(|| self.no_room_to_outpaint())?;
            return Ok(Some(mask::outpaint_canvas(img, l.width, l.height, inner)));
        }
        Ok(Some(mask::resized(img, l.width, l.height)))
    }

    fn no_room_to_outpaint(&self) -> EngineError {
        let l = &self.lease;
        EngineError::Invalid(format!(
            "outpaint margins {:?} leave no room for the init image on a {}x{} canvas",
            l.outpaint, l.width, l.height
        ))
    }

    /// The whole mask at the task's size, blurred. Colours are brought to
    /// grey as PIL's `convert("L")` does (ITU-R 601 luma), so a mask means
    /// here what it means to diffusers.
    fn whole_mask(&self) -> Result<Option<GrayImage>, EngineError> {
        let l = &self.lease;
        if !self.inpaints() {
            return Ok(None);
        }
        if l.stage != "generate" || l.parent_sha256.is_empty() {
            return Err(EngineError::Invalid(format!(
                "a mask on a {} task without an init image (masks inpaint a generate task's init image)",
                l.stage
            )));
        }
        if self.outpaints() {
            if !l.mask_sha256.is_empty() {
                return Err(EngineError::Invalid(
                    "an outpainting task with a mask of its own (outpainting makes its mask)"
                        .into(),
                ));
            }
            let inner = self
                .outpaint_inner()
                .ok_or_else(|| self.no_room_to_outpaint())?;
            let made = mask::outpaint_mask(l.width, l.height, inner);
            return Ok(Some(mask::blur(&made, l.mask_blur as f32)));
        }
        let bytes = self.mask.as_deref().ok_or_else(|| {
            EngineError::Failed(format!("the mask {} was not fetched", l.mask_sha256))
        })?;
        let rgb = hallmark_provenance::credentials::decode_image(bytes)
            .map_err(|e| EngineError::Invalid(format!("the mask {}: {e}", l.mask_sha256)))?;
        let grey = GrayImage::from_fn(rgb.width(), rgb.height(), |x, y| {
            let [r, g, b] = rgb.get_pixel(x, y).0;
            let luma =
                (u32::from(r) * 19595 + u32::from(g) * 38470 + u32::from(b) * 7471 + 0x8000) >> 16;
            image::Luma([luma as u8])
        });
        let grey = mask::resized(grey, l.width, l.height);
        Ok(Some(mask::blur(&grey, l.mask_blur as f32)))
    }

    /// The part of the task's image an inpainting task with `mask_crop`
    /// renders: the crop around its mask's white part, with that much
    /// padding, at the task's aspect ratio (from `whole_mask`). `None` to
    /// render the whole.
    fn inpaint_crop(
        &self,
        whole_mask: Option<&GrayImage>,
    ) -> Result<Option<mask::Region>, EngineError> {
        let l = &self.lease;
        let (Some(pad), Some(mask)) = (l.mask_crop, whole_mask) else {
            return Ok(None);
        };
        mask::crop_region(mask, l.width, l.height, pad)
            .map(Some)
            .ok_or_else(|| {
                EngineError::Invalid(format!(
                    "the mask {} is black everywhere: there is nothing to inpaint, and no crop around it to render (mask_crop)",
                    l.mask_sha256
                ))
            })
    }
}

/// A rendered output, before stamping (the worker watermarks, encodes and
/// signs it).
#[derive(Debug, Clone)]
pub struct RenderedImage {
    pub pixels: RgbImage,
    /// How an `upscale` output was made (recorded in its credentials).
    pub upscale: Option<UpscaleRecord>,
}

impl From<RgbImage> for RenderedImage {
    fn from(pixels: RgbImage) -> Self {
        Self {
            pixels,
            upscale: None,
        }
    }
}

/// Why a task could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model {0:?} is not served by this engine")]
    UnknownModel(String),
    #[error("stage {0:?} is not supported by this engine")]
    UnknownStage(String),
    #[error("the task has no base or init image")]
    MissingParent,
    #[error("cannot decode the base or init image: {0}")]
    BadParent(String),
    #[error("{0}")]
    Failed(String),
    /// The task asks for what the engine cannot do with it (a refiner
    /// asked to draw from noise, a strength that leaves no step): retrying,
    /// here or on another worker, cannot help.
    #[error("{0}")]
    Invalid(String),
}

impl EngineError {
    /// Whether the task should fail for good rather than be tried again:
    /// the request itself is at fault, or its base image cannot be decoded.
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Invalid(_) | Self::BadParent(_))
    }
}

/// A renderer. `render` runs a batch of compatible tasks (same model, stage,
/// size and steps) and returns one result per task, in order; it is called
/// from a blocking thread and reports the fraction done through `progress`
/// (the worker forwards it on its heartbeats).
pub trait Engine: Send + Sync + 'static {
    /// The engine name jobs select (`synthetic`, `diffusion`).
    fn name(&self) -> &str;
    /// The models this engine can render, with their weights digests.
    fn models(&self) -> Vec<ModelCapability>;
    /// The model held in memory now, if any (the coordinator prefers it).
    fn loaded_model(&self) -> String;
    fn render(
        &self,
        batch: &[RenderTask],
        progress: &dyn Fn(f32),
    ) -> Vec<Result<RenderedImage, EngineError>>;
}

/// Settings of the synthetic engine.
#[derive(Debug, Clone)]
pub struct SyntheticConfig {
    /// Model ids it claims to serve.
    pub models: Vec<String>,
    /// Simulated render time per batch.
    pub render_time: Duration,
    /// A prompt containing this text fails (for fault tests).
    pub fail_marker: Option<String>,
    /// A prompt containing this text is refused as asked, which no retry
    /// can change (for fault tests of tasks that fail for good).
    pub refuse_marker: Option<String>,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            models: vec!["synthetic-v1".into()],
            render_time: Duration::ZERO,
            fail_marker: None,
            refuse_marker: None,
        }
    }
}

/// Deterministic images from prompt and seed, after a configurable delay:
/// the farm's load and fault tests run on it without a GPU.
#[derive(Debug, Clone)]
pub struct SyntheticEngine {
    config: SyntheticConfig,
}

impl SyntheticEngine {
    pub fn new(config: SyntheticConfig) -> Self {
        Self { config }
    }

    /// The weights digest a synthetic model reports (it has no weights).
    pub fn weights_digest(model_id: &str) -> String {
        hallmark_provenance::sha256_hex(format!("hallmark-synthetic:{model_id}").as_bytes())
    }

    fn render_one(&self, task: &RenderTask) -> Result<RenderedImage, EngineError> {
        let l = &task.lease;
        if !self.config.models.contains(&l.model_id) {
            return Err(EngineError::UnknownModel(l.model_id.clone()));
        }
        if let Some(marker) = &self.config.fail_marker
            && l.prompt.contains(marker.as_str())
        {
            return Err(EngineError::Failed(format!(
                "synthetic failure requested by {marker:?} in the prompt"
            )));
        }
        if let Some(marker) = &self.config.refuse_marker
            && l.prompt.contains(marker.as_str())
        {
            return Err(EngineError::Invalid(format!(
                "synthetic refusal requested by {marker:?} in the prompt"
            )));
        }
        match l.stage.as_str() {
            "generate" => {
                let made = generate(&l.prompt, l.seed, l.width, l.height);
                Ok(match (task.init_image()?, task.mask()?) {
                    // img2img: the init image shows through by 1 - strength;
                    // inpainting: only where the mask is white.
                    (Some(init), mask) => {
                        let mut out = blend(&init, &made, l.strength);
                        if let Some(mask) = mask {
                            for ((o, i), m) in
                                out.pixels_mut().zip(init.pixels()).zip(mask.pixels())
                            {
                                if m.0[0] < 128 {
                                    *o = *i;
                                }
                            }
                        }
                        out.into()
                    }
                    (None, _) => made.into(),
                })
            }
            "refine" => {
                let base = task.init_image()?.ok_or(EngineError::MissingParent)?;
                // Re-rendered detail shows through by the strength.
                let detail = generate(&l.prompt, l.seed ^ REFINE_SEED, l.width, l.height);
                Ok(blend(&base, &detail, l.strength).into())
            }
            "upscale" => {
                let parent = task.parent.as_deref().ok_or(EngineError::MissingParent)?;
                let base = hallmark_provenance::credentials::decode_image(parent)
                    .map_err(|e| EngineError::BadParent(e.to_string()))?;
                let f = l.upscale.max(1);
                Ok(RenderedImage {
                    pixels: image::imageops::resize(
                        &base,
                        base.width() * f,
                        base.height() * f,
                        image::imageops::FilterType::Triangle,
                    ),
                    upscale: Some(UpscaleRecord {
                        method: "resize".into(),
                        factor: f,
                        ..Default::default()
                    }),
                })
            }
            other => Err(EngineError::UnknownStage(other.to_string())),
        }
    }
}

impl Engine for SyntheticEngine {
    fn name(&self) -> &str {
        "synthetic"
    }

    fn models(&self) -> Vec<ModelCapability> {
        self.config
            .models
            .iter()
            .map(|m| ModelCapability {
                model_id: m.clone(),
                weights_sha256: Self::weights_digest(m),
                refines_only: false,
                inpaints_only: false,
            })
            .collect()
    }

    fn loaded_model(&self) -> String {
        self.config.models.first().cloned().unwrap_or_default()
    }

    fn render(
        &self,
        batch: &[RenderTask],
        progress: &dyn Fn(f32),
    ) -> Vec<Result<RenderedImage, EngineError>> {
        // The simulated render time passes in ten steps, like sampler steps.
        const STEPS: u32 = 10;
        for step in 1..=STEPS {
            if !self.config.render_time.is_zero() {
                std::thread::sleep(self.config.render_time / STEPS);
            }
            progress(step as f32 / STEPS as f32 * 0.9);
        }
        let out = batch.iter().map(|t| self.render_one(t)).collect();
        progress(1.0);
        out
    }
}

/// Mixed into a refine's seed so its re-rendered detail is not the base
/// image over again.
const REFINE_SEED: u64 = 0x5EF1_0E00_0000_0001;

/// A smooth colour field with a little grain, fixed by (prompt, seed): the
/// low-texture look of generated images, which is what the watermark is
/// tuned for.
fn generate(prompt: &str, seed: u64, width: u32, height: u32) -> RgbImage {
    let digest = hallmark_provenance::sha256_hex(format!("{seed}:{prompt}").as_bytes());
    let field_seed = u32::from_str_radix(&digest[..8], 16).unwrap_or(0);
    let grain_seed = u64::from_str_radix(&digest[8..24], 16).unwrap_or(0);
    let mut img =
        hallmark_provenance::watermark::attacks::smooth_field(width, height, field_seed % 1000);
    for (x, y, px) in img.enumerate_pixels_mut() {
        let mut z = grain_seed ^ (u64::from(y) << 32 | u64::from(x));
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let grain = ((z >> 59) as i16) - 16; // -16..=15
        for c in px.0.iter_mut() {
            *c = (i16::from(*c) + grain / 3).clamp(0, 255) as u8;
        }
    }
    img
}

/// `a · (1 - t) + b · t`, per channel.
fn blend(a: &RgbImage, b: &RgbImage, t: f64) -> RgbImage {
    let mut out = a.clone();
    for (o, q) in out.pixels_mut().zip(b.pixels()) {
        for (c, d) in o.0.iter_mut().zip(q.0) {
            *c = (f64::from(*c) * (1.0 - t) + f64::from(d) * t).round() as u8;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn task(prompt: &str, seed: u64) -> RenderTask {
        RenderTask {
            lease: TaskLease {
                model_id: "synthetic-v1".into(),
                stage: "generate".into(),
                prompt: prompt.into(),
                seed,
                width: 64,
                height: 48,
                ..Default::default()
            },
            parent: None,
            mask: None,
        }
    }

    #[test]
    fn same_prompt_and_seed_give_the_same_pixels() {
        let e = SyntheticEngine::new(SyntheticConfig::default());
        let a = e.render(
            &[task("a cat", 1), task("a cat", 1), task("a cat", 2)],
            &|_| {},
        );
        let (a0, a1, a2) = (
            a[0].as_ref().unwrap(),
            a[1].as_ref().unwrap(),
            a[2].as_ref().unwrap(),
        );
        assert_eq!(a0.pixels, a1.pixels);
        assert_ne!(a0.pixels, a2.pixels);
        assert_eq!(a0.pixels.dimensions(), (64, 48));
    }

    #[test]
    fn upscale_multiplies_the_base_size() {
        let e = SyntheticEngine::new(SyntheticConfig::default());
        let base = e.render(&[task("a cat", 1)], &|_| {}).remove(0).unwrap();
        let mut up = task("a cat", 1);
        up.lease.stage = "upscale".into();
        up.lease.upscale = 4;
        let mut png = Vec::new();
        base.pixels
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        up.parent = Some(png);
        let out = e.render(&[up], &|_| {}).remove(0).unwrap();
        assert_eq!(out.pixels.dimensions(), (256, 192));
        assert_eq!(base.upscale, None);
        let record = out.upscale.expect("an upscale says how it was made");
        assert_eq!((record.method.as_str(), record.factor), ("resize", 4));
    }

    #[test]
    fn fail_marker_and_unknown_model_fail_with_a_reason() {
        let e = SyntheticEngine::new(SyntheticConfig {
            fail_marker: Some("[fail]".into()),
            ..Default::default()
        });
        let mut t = task("x [fail]", 1);
        assert!(
            e.render(&[t.clone()], &|_| {})[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("[fail]")
        );
        t.lease.model_id = "other".into();
        assert!(matches!(
            e.render(&[t], &|_| {})[0],
            Err(EngineError::UnknownModel(_))
        ));
    }

    fn png(img: &RgbImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        img.write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
        bytes
    }

    #[test]
    fn a_mask_is_grey_as_pil_sees_it_resized_and_keeps_the_init_image_where_black() {
        let e = SyntheticEngine::new(SyntheticConfig::default());
        let white = RgbImage::from_pixel(64, 48, image::Rgb([255, 255, 255]));
        // Twice the task's size; the left half repaints. Pure red is 76
        // grey to PIL (kept), pure green 150 (repainted).
        let mask = RgbImage::from_fn(128, 96, |x, _| {
            if x < 64 {
                image::Rgb([0, 255, 0])
            } else {
                image::Rgb([255, 0, 0])
            }
        });
        let mut t = task("a cat", 1);
        t.lease.parent_sha256 = "ab".repeat(32);
        t.lease.mask_sha256 = "cd".repeat(32);
        t.lease.strength = 1.0;
        t.parent = Some(png(&white));
        t.mask = Some(png(&mask));
        let grey = t.mask().unwrap().unwrap();
        assert_eq!(grey.dimensions(), (64, 48));
        assert_eq!(
            (grey.get_pixel(10, 10).0[0], grey.get_pixel(50, 10).0[0]),
            (150, 76)
        );
        let out = e.render(&[t.clone()], &|_| {}).remove(0).unwrap().pixels;
        let plain = e
            .render(&[task("a cat", 1)], &|_| {})
            .remove(0)
            .unwrap()
            .pixels;
        for (x, y) in [(5, 5), (20, 40), (28, 0)] {
            assert_eq!(
                out.get_pixel(x, y),
                plain.get_pixel(x, y),
                "repainted at ({x}, {y})"
            );
        }
        for (x, y) in [(40, 5), (63, 47)] {
            assert_eq!(out.get_pixel(x, y).0, [255; 3], "kept at ({x}, {y})");
        }

        // A mask that is not an image, or one without an init image: refused.
        t.mask = Some(b"not an image".to_vec());
        let err = e.render(&[t.clone()], &|_| {}).remove(0).unwrap_err();
        assert!(err.to_string().contains("the mask"), "{err}");
        t.mask = Some(png(&mask));
        t.lease.parent_sha256.clear();
        t.parent = None;
        let err = e.render(&[t], &|_| {}).remove(0).unwrap_err();
        assert!(err.to_string().contains("without an init image"), "{err}");
    }

    #[test]
    fn a_cropped_inpaint_renders_the_crop_and_finish_puts_it_back_over_the_init_image() {
        // A striped init image and a 16×12 white box in a 64×48 mask.
        let init = RgbImage::from_fn(64, 48, |x, _| image::Rgb([(x * 4) as u8, 0, 200]));
        let mask = RgbImage::from_fn(64, 48, |x, y| {
            let on = (40..56).contains(&x) && (10..22).contains(&y);
            image::Rgb([if on { 255 } else { 0 }; 3])
        });
        let mut t = task("a cat", 1);
        t.lease.parent_sha256 = "ab".repeat(32);
        t.lease.mask_sha256 = "cd".repeat(32);
        t.lease.strength = 1.0;
        t.parent = Some(png(&init));
        t.mask = Some(png(&mask));
        let whole_key = t.pictures_key();
        t.lease.mask_crop = Some(4);
        assert_ne!(t.pictures_key(), whole_key, "a crop makes other pictures");
        // The box grown by 4 (24×20) and widened towards 4:3 (26×20), as the
        // engine sees it: at the task's size, the box filling most of it.
        let whole = t.whole_mask().unwrap();
        let region = t.inpaint_crop(whole.as_ref()).unwrap().unwrap();
        assert_eq!(
            region,
            mask::Region {
                x1: 35,
                y1: 6,
                x2: 61,
                y2: 26
            }
        );
        let (seen_init, seen_mask) = (t.init_image().unwrap().unwrap(), t.mask().unwrap().unwrap());
        assert_eq!(seen_init.dimensions(), (64, 48));
        assert_eq!(seen_mask.dimensions(), (64, 48));
        assert_eq!(seen_mask.get_pixel(32, 24).0[0], 255, "the box's middle");
        assert_eq!(seen_mask.get_pixel(2, 2).0[0], 0, "the crop's context");
        assert!(
            seen_init.get_pixel(0, 0).0[0] >= 35 * 4 - 8,
            "the crop's left edge"
        );

        // Finished: a flat green render lands in the box, scaled back to the
        // region; the rest is the init image's own pixels.
        let green = RgbImage::from_pixel(64, 48, image::Rgb([0, 255, 0]));
        let done = t.finish(green.clone().into()).unwrap().pixels;
        assert_eq!(done.get_pixel(48, 16).0, [0, 255, 0]);
        for (x, y) in [(0, 0), (36, 16), (48, 30), (63, 47)] {
            assert_eq!(done.get_pixel(x, y), init.get_pixel(x, y), "({x}, {y})");
        }
        // A render of the wrong size is not laid over anything.
        let small = RgbImage::new(32, 24);
        assert!(t.finish(small.into()).is_err());

        // Blurred, the edge blends; without a mask nothing is touched.
        t.lease.mask_crop = None;
        t.lease.mask_blur = 2;
        let done = t.finish(green.clone().into()).unwrap().pixels;
        let edge = done.get_pixel(39, 16).0;
        assert!(edge[1] > 0 && edge[1] < 255, "{edge:?}");
        let plain = task("a cat", 1);
        assert_eq!(plain.finish(green.clone().into()).unwrap().pixels, green);

        // A crop around a mask black everywhere: refused for good.
        t.lease.mask_crop = Some(4);
        t.mask = Some(png(&RgbImage::new(64, 48)));
        let err = t.init_image().unwrap_err();
        assert!(
            err.is_final() && err.to_string().contains("black everywhere"),
            "{err}"
        );
    }

    #[test]
    fn an_outpaint_places_the_init_image_on_its_canvas_and_draws_around_it() {
        let e = SyntheticEngine::new(SyntheticConfig::default());
        // A 32×48 init image on a 64×48 canvas: 16 new columns each side.
        let init = RgbImage::from_fn(32, 48, |x, y| image::Rgb([x as u8 * 8, y as u8, 250]));
        let mut t = task("a cat", 1);
        t.lease.parent_sha256 = "ab".repeat(32);
        t.lease.strength = 1.0;
        t.lease.outpaint = Some(hallmark_proto::v1::Outpaint {
            left: 16,
            top: 0,
            right: 16,
            bottom: 0,
        });
        t.parent = Some(png(&init));
        assert!(t.inpaints());
        let canvas = t.init_image().unwrap().unwrap();
        assert_eq!(canvas.dimensions(), (64, 48));
        assert_eq!(canvas.get_pixel(16, 5), init.get_pixel(0, 5));
        assert_eq!(canvas.get_pixel(47, 9), init.get_pixel(31, 9));
        assert_eq!(
            canvas.get_pixel(2, 5),
            init.get_pixel(0, 5),
            "the edge carried out"
        );
        let mask = t.mask().unwrap().unwrap();
        assert_eq!(
            (mask.get_pixel(15, 0).0[0], mask.get_pixel(16, 0).0[0]),
            (255, 0)
        );
        assert_eq!(
            (mask.get_pixel(47, 0).0[0], mask.get_pixel(48, 0).0[0]),
            (0, 255)
        );

        // Rendered and finished: the init image in the middle, exactly; the
        // model's drawing in the margins.
        let out = e.render(&[t.clone()], &|_| {}).remove(0).unwrap();
        let out = t.finish(out).unwrap().pixels;
        let drawn = e
            .render(&[task("a cat", 1)], &|_| {})
            .remove(0)
            .unwrap()
            .pixels;
        for (x, y) in [(16, 0), (30, 20), (47, 47)] {
            assert_eq!(out.get_pixel(x, y), init.get_pixel(x - 16, y), "({x}, {y})");
        }
        for (x, y) in [(0, 0), (15, 30), (48, 10), (63, 47)] {
            assert_eq!(out.get_pixel(x, y), drawn.get_pixel(x, y), "({x}, {y})");
        }

        // Margins that leave no room, or a mask besides: refused for good.
        let mut wide = t.clone();
        wide.lease.outpaint = Some(hallmark_proto::v1::Outpaint {
            left: 40,
            right: 30,
            ..Default::default()
        });
        let err = wide.init_image().unwrap_err();
        assert!(
            err.is_final() && err.to_string().contains("no room"),
            "{err}"
        );
        let mut masked = t.clone();
        masked.lease.mask_sha256 = "cd".repeat(32);
        let err = masked.mask().unwrap_err();
        assert!(
            err.is_final() && err.to_string().contains("outpainting makes its mask"),
            "{err}"
        );
    }

    #[test]
    fn init_image_is_resized_to_the_task_and_shows_through_by_strength() {
        let e = SyntheticEngine::new(SyntheticConfig::default());
        let plain = e.render(&[task("a cat", 1)], &|_| {}).remove(0).unwrap();
        // A white init image twice the task's size.
        let white = RgbImage::from_pixel(128, 96, image::Rgb([255, 255, 255]));
        let mut t = task("a cat", 1);
        t.lease.parent_sha256 = "ab".repeat(32);
        t.parent = Some(png(&white));
        let mean = |img: &RgbImage| {
            img.as_raw().iter().map(|&v| f64::from(v)).sum::<f64>() / img.as_raw().len() as f64
        };
        let mut last = f64::INFINITY;
        for strength in [0.25, 0.5, 1.0] {
            t.lease.strength = strength;
            let out = e.render(&[t.clone()], &|_| {}).remove(0).unwrap();
            assert_eq!(out.pixels.dimensions(), (64, 48));
            let m = mean(&out.pixels);
            assert!(m < last, "more strength keeps less of the white init image");
            last = m;
        }
        assert!(
            (last - mean(&plain.pixels)).abs() < 1e-9,
            "strength 1 ignores the init image"
        );

        // Named but missing, undecodable, or without a strength: refused.
        t.lease.strength = 0.5;
        t.parent = None;
        assert!(matches!(
            e.render(&[t.clone()], &|_| {})[0],
            Err(EngineError::MissingParent)
        ));
        t.parent = Some(b"not an image".to_vec());
        assert!(matches!(
            e.render(&[t.clone()], &|_| {})[0],
            Err(EngineError::BadParent(_))
        ));
        t.parent = Some(png(&white));
        t.lease.strength = 0.0;
        assert!(
            e.render(&[t], &|_| {})[0]
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("strength")
        );
    }

    #[test]
    fn refine_starts_from_its_base_image_at_its_size() {
        let e = SyntheticEngine::new(SyntheticConfig::default());
        let base = e.render(&[task("a cat", 1)], &|_| {}).remove(0).unwrap();
        let mut t = task("a cat", 1);
        t.lease.stage = "refine".into();
        t.lease.parent_sha256 = "ab".repeat(32);
        t.lease.strength = 0.3;
        t.parent = Some(png(&base.pixels));
        let diff = |a: &RgbImage, b: &RgbImage| {
            a.as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(&x, &y)| (f64::from(x) - f64::from(y)).abs())
                .sum::<f64>()
                / a.as_raw().len() as f64
        };
        let light = e.render(&[t.clone()], &|_| {}).remove(0).unwrap();
        assert_eq!(light.pixels.dimensions(), (64, 48));
        t.lease.strength = 0.6;
        let strong = e.render(&[t.clone()], &|_| {}).remove(0).unwrap();
        let (d_light, d_strong) = (
            diff(&light.pixels, &base.pixels),
            diff(&strong.pixels, &base.pixels),
        );
        assert!(d_light > 0.5, "a refine changes the image ({d_light})");
        assert!(
            d_strong > d_light * 1.5,
            "more strength changes more ({d_light} vs {d_strong})"
        );
        assert_eq!(
            e.render(&[t.clone()], &|_| {}).remove(0).unwrap().pixels,
            strong.pixels,
            "deterministic"
        );
        // A refine has no text-to-image fallback: no base, no render.
        t.parent = None;
        assert!(matches!(
            e.render(&[t.clone()], &|_| {})[0],
            Err(EngineError::MissingParent)
        ));
        t.lease.parent_sha256.clear();
        assert!(matches!(
            e.render(&[t], &|_| {})[0],
            Err(EngineError::MissingParent)
        ));
    }
}
