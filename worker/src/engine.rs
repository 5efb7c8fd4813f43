//! The engine interface every renderer implements (synthetic now, latent
//! diffusion next), and the synthetic engine used for load and fault tests.

use std::time::Duration;

use hallmark_proto::v1::{ModelCapability, TaskLease};
use image::{ImageBuffer, Rgb, RgbImage};

/// One task to render: its lease, and the base image for a later stage.
#[derive(Debug, Clone)]
pub struct RenderTask {
    pub lease: TaskLease,
    /// The encoded base image of an `upscale` task.
    pub parent: Option<Vec<u8>>,
}

/// An encoded output image.
#[derive(Debug, Clone)]
pub struct RenderedImage {
    pub bytes: Vec<u8>,
    pub media_type: &'static str,
    pub width: u32,
    pub height: u32,
}

/// Why a task could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("model {0:?} is not served by this engine")]
    UnknownModel(String),
    #[error("stage {0:?} is not supported by this engine")]
    UnknownStage(String),
    #[error("the upscale task has no base image")]
    MissingParent,
    #[error("cannot decode the base image: {0}")]
    BadParent(String),
    #[error("encoding the output: {0}")]
    Encode(String),
    #[error("{0}")]
    Failed(String),
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
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            models: vec!["synthetic-v1".into()],
            render_time: Duration::ZERO,
            fail_marker: None,
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
        let img = match l.stage.as_str() {
            "generate" => generate(&l.prompt, l.seed, l.width, l.height),
            "upscale" => {
                let parent = task.parent.as_deref().ok_or(EngineError::MissingParent)?;
                let base = image::load_from_memory(parent)
                    .map_err(|e| EngineError::BadParent(e.to_string()))?
                    .to_rgb8();
                let f = l.upscale.max(1);
                image::imageops::resize(
                    &base,
                    base.width() * f,
                    base.height() * f,
                    image::imageops::FilterType::Triangle,
                )
            }
            other => return Err(EngineError::UnknownStage(other.to_string())),
        };
        encode_png(&img)
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

/// A smooth colour field with bands, fixed by (prompt, seed).
fn generate(prompt: &str, seed: u64, width: u32, height: u32) -> RgbImage {
    let h = hallmark_provenance::sha256_hex(format!("{seed}:{prompt}").as_bytes());
    let b = h.as_bytes();
    let byte = |i: usize| {
        u32::from_str_radix(
            std::str::from_utf8(&b[i * 2..i * 2 + 2]).unwrap_or("00"),
            16,
        )
        .unwrap_or(0)
    };
    let (r0, g0, b0, fx, fy) = (byte(0), byte(1), byte(2), byte(3) % 7 + 1, byte(4) % 7 + 1);
    ImageBuffer::from_fn(width, height, |x, y| {
        let u = x * 255 / width.max(1);
        let v = y * 255 / height.max(1);
        let band = ((x * fx + y * fy) / 8) % 2 * 24;
        Rgb([
            ((r0 + u + band) % 256) as u8,
            ((g0 + v) % 256) as u8,
            ((b0 + (u + v) / 2 + band) % 256) as u8,
        ])
    })
}

fn encode_png(img: &RgbImage) -> Result<RenderedImage, EngineError> {
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| EngineError::Encode(e.to_string()))?;
    Ok(RenderedImage {
        bytes,
        media_type: "image/png",
        width: img.width(),
        height: img.height(),
    })
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
        assert_eq!(a0.bytes, a1.bytes);
        assert_ne!(a0.bytes, a2.bytes);
        assert_eq!((a0.width, a0.height), (64, 48));
    }

    #[test]
    fn upscale_multiplies_the_base_size() {
        let e = SyntheticEngine::new(SyntheticConfig::default());
        let base = e.render(&[task("a cat", 1)], &|_| {}).remove(0).unwrap();
        let mut up = task("a cat", 1);
        up.lease.stage = "upscale".into();
        up.lease.upscale = 4;
        up.parent = Some(base.bytes);
        let out = e.render(&[up], &|_| {}).remove(0).unwrap();
        assert_eq!((out.width, out.height), (256, 192));
        let decoded = image::load_from_memory(&out.bytes).unwrap();
        assert_eq!(decoded.width(), 256);
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
}
