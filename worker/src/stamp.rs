//! Stamping: every output is watermarked, encoded and signed before it
//! leaves the worker. Pixels first, because the C2PA hard binding covers the
//! encoded bytes, watermark included.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;

use hallmark_proto::v1::TaskLease;
use hallmark_provenance::credentials::stamp::{MiningUse, Stamper};
use hallmark_provenance::credentials::{
    self, CredentialsError, GenerationRecord, ImageFormat, OutpaintRecord, PromptPolicy,
    SigningIdentity, Stamp, TrainingMining,
};
use hallmark_provenance::watermark::{self, EmbedOptions, WatermarkKey};
use image::RgbImage;

use crate::engine::RenderedImage;

/// How this worker stamps its outputs.
#[derive(Clone)]
pub struct StampConfig {
    pub identity: SigningIdentity,
    /// Roots the deployment trusts (PEM): a base image's manifest is
    /// recorded as trusted when an upscale takes it in.
    pub trust_anchors: Option<String>,
    pub watermark_key: WatermarkKey,
    pub prompt_policy: PromptPolicy,
    /// `None` leaves the `cawg.training-mining` assertion out.
    pub training_mining: Option<MiningUse>,
    pub format: ImageFormat,
}

/// Stamping settings as configuration spells them (flags, TOML, env).
#[derive(Debug, Clone)]
pub struct StampSettings<'a> {
    pub identity: SigningIdentity,
    /// PEM file of the roots the deployment trusts.
    pub trust_anchors: Option<&'a Path>,
    pub watermark_key: &'a str,
    /// keep, hash or omit.
    pub prompt_policy: &'a str,
    /// allowed, notAllowed, constrained or none.
    pub training_mining: &'a str,
    /// png, jpeg or webp.
    pub output_format: &'a str,
}

impl StampConfig {
    pub fn from_settings(s: StampSettings<'_>) -> anyhow::Result<Self> {
        let trust_anchors = match s.trust_anchors {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("reading trust anchors {}", p.display()))?,
            ),
            None => None,
        };
        let training_mining = match s.training_mining {
            "none" => None,
            other => Some(MiningUse::parse(other)?),
        };
        Ok(Self {
            identity: s.identity,
            trust_anchors,
            watermark_key: WatermarkKey::from_secret(s.watermark_key.as_bytes()),
            prompt_policy: PromptPolicy::parse(s.prompt_policy)?,
            training_mining,
            format: ImageFormat::parse(s.output_format)?,
        })
    }
}

impl std::fmt::Debug for StampConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StampConfig")
            .field("identity", &self.identity)
            .field("prompt_policy", &self.prompt_policy)
            .field("training_mining", &self.training_mining)
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

/// A stamped output, ready to upload.
#[derive(Debug, Clone)]
pub struct StampedImage {
    pub bytes: Vec<u8>,
    pub media_type: &'static str,
    pub width: u32,
    pub height: u32,
    /// The id in the watermark and in the soft-binding assertion (hex).
    pub watermark_id: String,
}

/// What a task's record needs besides its lease.
#[derive(Debug, Clone, Default)]
pub struct ModelFacts {
    pub weights_sha256: String,
    /// Training datasets as `name@version`.
    pub datasets: Vec<String>,
}

/// The worker's stamping stage; shared by its render threads.
pub struct Stamping {
    stamper: Stamper,
    config: StampConfig,
}

impl std::fmt::Debug for Stamping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.config.fmt(f)
    }
}

impl Stamping {
    pub fn new(config: StampConfig) -> Result<Arc<Self>, CredentialsError> {
        let stamper = Stamper::new(
            &config.identity,
            config.trust_anchors.as_deref(),
            ("hallmark-worker", env!("CARGO_PKG_VERSION")),
        )?;
        Ok(Arc::new(Self { stamper, config }))
    }

    /// Watermarks, encodes and signs one rendered image. `parent` is the file
    /// the task started from: an upscale's base image (its manifest becomes
    /// the `parentOf` ingredient) or an img2img render's init image (the
    /// `inputTo` ingredient, named by sha256 in the generation record);
    /// `mask` an inpainting render's mask (another `inputTo` ingredient).
    pub fn stamp(
        &self,
        lease: &TaskLease,
        worker_id: &str,
        model: &ModelFacts,
        image: &RenderedImage,
        parent: Option<&[u8]>,
        mask: Option<&[u8]>,
    ) -> Result<StampedImage, CredentialsError> {
        let pixels = &image.pixels;
        let watermark_id = fresh_watermark_id();
        let key = self.config.watermark_key.for_stage(&lease.stage);
        let marked = mark_and_check(pixels, watermark_id, &key)?;
        let encoded = credentials::encode_image(&marked, self.config.format)?;

        let mut record = GenerationRecord {
            model_id: lease.model_id.clone(),
            weights_sha256: model.weights_sha256.clone(),
            datasets: model.datasets.clone(),
            seed: lease.seed,
            steps: lease.steps,
            guidance: lease.guidance,
            scheduler: lease.scheduler.clone(),
            stage: lease.stage.clone(),
            width: pixels.width(),
            height: pixels.height(),
            job_id: lease.job_id.clone(),
            task_id: lease.task_id.clone(),
            worker_id: worker_id.to_string(),
            upscale: image.upscale.clone(),
            ..Default::default()
        };
        let (parent, input) = if lease.stage == "generate" {
            (None, parent)
        } else {
            (parent, None)
        };
        if input.is_some() {
            record.init_image_sha256 = Some(lease.parent_sha256.clone());
            record.strength = Some(lease.strength);
            if mask.is_some() {
                record.mask_sha256 = Some(lease.mask_sha256.clone());
            }
            if mask.is_some() || lease.outpaint.is_some() {
                record.mask_blur = Some(lease.mask_blur).filter(|&b| b > 0);
                record.mask_crop = lease.mask_crop;
            }
            record.outpaint = lease.outpaint.as_ref().map(|o| OutpaintRecord {
                left: o.left,
                top: o.top,
                right: o.right,
                bottom: o.bottom,
            });
        } else if lease.stage == "refine" {
            record.strength = Some(lease.strength);
        }
        record.set_prompt(&lease.prompt, self.config.prompt_policy);
        let stamp = Stamp {
            title: format!(
                "{}-{}-{}.{}",
                lease.job_id,
                lease.item_index,
                lease.stage,
                self.config.format.extension()
            ),
            record: &record,
            watermark_id,
            training_mining: self.config.training_mining.map(TrainingMining::all),
            parent,
            input,
            mask: mask.filter(|_| input.is_some()),
        };
        let bytes = self.stamper.sign(self.config.format, &encoded, &stamp)?;
        Ok(StampedImage {
            bytes,
            media_type: self.config.format.mime(),
            width: pixels.width(),
            height: pixels.height(),
            watermark_id: format!("{watermark_id:016x}"),
        })
    }
}

/// Embeds the mark and reads it back: the coordinator refuses an upload
/// whose pixels do not carry the id its manifest names. An image the mark
/// does not read back from at the default strength (rare: strong periodic
/// texture) is marked again a little stronger before the task gives up.
fn mark_and_check(
    pixels: &RgbImage,
    id: u64,
    key: &WatermarkKey,
) -> Result<RgbImage, CredentialsError> {
    let default = EmbedOptions::default().target_psnr;
    for target_psnr in [default, default - 2.0, default - 4.0] {
        let marked = watermark::embed(pixels, id, key, EmbedOptions { target_psnr })
            .map_err(|e| CredentialsError::Image(e.to_string()))?;
        if watermark::detect(&marked, key).is_some_and(|d| d.payload == id) {
            if target_psnr < default {
                tracing::warn!(
                    target_psnr,
                    "watermark needed a stronger embedding on this image"
                );
            }
            return Ok(marked);
        }
    }
    Err(CredentialsError::Image(
        "the watermark does not read back from this image even at 38 dB; refusing to ship it unstamped".into(),
    ))
}

/// A random non-zero 64-bit id; the repository's unique index refuses the
/// (1 in 2^64 per pair) collision and the task is retried.
fn fresh_watermark_id() -> u64 {
    loop {
        let id = uuid::Uuid::new_v4().as_u64_pair().0;
        if id != 0 {
            return id;
        }
    }
}
