//! Builds and signs the manifest of one rendered image.
//!
//! A base render asserts `c2pa.created` (trainedAlgorithmicMedia), naming
//! an img2img render's init image as its `inputTo` ingredient; an
//! upscale names its base image, manifest and all, as the `parentOf`
//! ingredient with `c2pa.opened` + `c2pa.resized`, and a refine (img2img
//! of the base image at its size) the same with `c2pa.edited`. All assert
//! `c2pa.watermarked.bound` with the soft binding that carries the watermark
//! id, the generation record and the training-and-mining preferences.

use std::io::Cursor;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::{
    CredentialsError, GENERATION_LABEL, ImageFormat, SOFT_BINDING_ALG, SigningIdentity,
    TRAINED_ALGORITHMIC_MEDIA,
};

/// What happens to the prompt in the signed record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum PromptPolicy {
    /// The prompt is written in the manifest.
    Keep,
    /// Only its sha256 is written: whoever has the prompt can check it.
    #[default]
    Hash,
    /// Nothing about the prompt is written.
    Omit,
}

impl PromptPolicy {
    pub fn parse(name: &str) -> Result<Self, CredentialsError> {
        match name.to_ascii_lowercase().as_str() {
            "keep" => Ok(Self::Keep),
            "hash" => Ok(Self::Hash),
            "omit" => Ok(Self::Omit),
            other => Err(CredentialsError::Manifest(format!(
                "unknown prompt policy {other:?}: use keep, hash or omit"
            ))),
        }
    }
}

/// The generation assertion: how this image was made.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct GenerationRecord {
    pub model_id: String,
    pub weights_sha256: String,
    /// Training datasets of the model, as `name@version`.
    #[serde(default)]
    pub datasets: Vec<String>,
    /// Written as a decimal string: C2PA's CBOR layer holds integers up to
    /// i64::MAX, and seeds use all 64 bits.
    #[serde(with = "seed_text")]
    pub seed: u64,
    pub steps: u32,
    pub guidance: f32,
    pub scheduler: String,
    /// `generate`, `refine` or `upscale`.
    pub stage: String,
    pub width: u32,
    pub height: u32,
    pub job_id: String,
    pub task_id: String,
    pub worker_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_sha256: Option<String>,
    /// An `upscale` stage's method (absent on generated images).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upscale: Option<UpscaleRecord>,
    /// img2img: the sha256 of the init image file the render started from
    /// (the `inputTo` ingredient), and its strength; a refine's strength.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub init_image_sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// Inpainting: the sha256 of the mask file over the init image (a second
    /// `inputTo` ingredient); only its white part was repainted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_sha256: Option<String>,
    /// Inpainting: the blur radius the mask was softened by (pixels of the
    /// output), when it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_blur: Option<u32>,
    /// Inpainting: the padding of the crop around the mask that was
    /// rendered at full size and pasted back, when only a crop was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask_crop: Option<u32>,
    /// Outpainting: the new canvas drawn around the init image, through a
    /// mask white over it (made by the worker, so no mask file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outpaint: Option<OutpaintRecord>,
}

/// Pixels of new canvas on each side of an outpainted image's init image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct OutpaintRecord {
    pub left: u32,
    pub top: u32,
    pub right: u32,
    pub bottom: u32,
}

/// How an upscaled image was made from its base image (the `parentOf`
/// ingredient): enough to tell which network, or which img2img pass, made
/// its detail.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct UpscaleRecord {
    /// `esrgan`, `hires-fix`, or an engine's own (`resize` for the
    /// synthetic engine).
    pub method: String,
    pub factor: u32,
    /// The super-resolution network's weights (Real-ESRGAN); a hires fix
    /// reuses the generation model named by the record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weights_sha256: Option<String>,
    /// Hires fix: the img2img strength and its steps.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steps: Option<u32>,
}

/// A u64 as decimal text; numbers are accepted when read back.
mod seed_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Seed {
        Text(String),
        Number(u64),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Seed::deserialize(d)? {
            Seed::Number(n) => Ok(n),
            Seed::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

impl GenerationRecord {
    /// Fills the prompt fields as `policy` says.
    pub fn set_prompt(&mut self, prompt: &str, policy: PromptPolicy) {
        self.prompt = None;
        self.prompt_sha256 = None;
        match policy {
            PromptPolicy::Keep => self.prompt = Some(prompt.to_string()),
            PromptPolicy::Hash => self.prompt_sha256 = Some(crate::sha256_hex(prompt.as_bytes())),
            PromptPolicy::Omit => {}
        }
    }
}

/// A CAWG training-and-mining preference.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum MiningUse {
    #[serde(rename = "allowed")]
    Allowed,
    #[default]
    #[serde(rename = "notAllowed")]
    NotAllowed,
    #[serde(rename = "constrained")]
    Constrained,
}

impl MiningUse {
    pub fn parse(name: &str) -> Result<Self, CredentialsError> {
        match name.to_ascii_lowercase().replace(['-', '_'], "").as_str() {
            "allowed" => Ok(Self::Allowed),
            "notallowed" => Ok(Self::NotAllowed),
            "constrained" => Ok(Self::Constrained),
            other => Err(CredentialsError::Manifest(format!(
                "unknown training-mining use {other:?}: use allowed, notAllowed or constrained"
            ))),
        }
    }
}

/// The `cawg.training-mining` entries; `None` leaves the assertion out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TrainingMining {
    pub data_mining: MiningUse,
    pub ai_inference: MiningUse,
    pub ai_generative_training: MiningUse,
    pub ai_training: MiningUse,
}

impl TrainingMining {
    pub fn all(use_: MiningUse) -> Self {
        Self {
            data_mining: use_,
            ai_inference: use_,
            ai_generative_training: use_,
            ai_training: use_,
        }
    }

    fn assertion(&self) -> serde_json::Value {
        json!({ "entries": {
            "cawg.data_mining": { "use": self.data_mining },
            "cawg.ai_inference": { "use": self.ai_inference },
            "cawg.ai_generative_training": { "use": self.ai_generative_training },
            "cawg.ai_training": { "use": self.ai_training },
        }})
    }
}

/// `c2pa.soft-binding`: the value is a CBOR byte string, as the spec says
/// (the `c2pa` crate's own struct writes a text string).
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SoftBindingAssertion {
    pub alg: String,
    pub blocks: Vec<SoftBindingBlock>,
    #[serde(with = "serde_bytes", default)]
    pub pad: Vec<u8>,
}

#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct SoftBindingBlock {
    pub scope: serde_json::Map<String, serde_json::Value>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

/// Everything that goes into one image's manifest besides the pixels.
#[derive(Debug, Clone)]
pub struct Stamp<'a> {
    pub title: String,
    pub record: &'a GenerationRecord,
    /// The id the watermark in the pixels carries.
    pub watermark_id: u64,
    pub training_mining: Option<TrainingMining>,
    /// The base image file (with its manifest) an upscale was made from.
    pub parent: Option<&'a [u8]>,
    /// The init image file an img2img render started from (an `inputTo`
    /// ingredient, with its own manifest where it has one).
    pub input: Option<&'a [u8]>,
    /// The mask file an inpainting render repainted through (with `input`;
    /// an `inputTo` ingredient too).
    pub mask: Option<&'a [u8]>,
}

/// Signs images with one identity; cheap to share between threads.
pub struct Stamper {
    signer: c2pa::BoxedSigner,
    context: Arc<c2pa::Context>,
    software_agent: (String, String),
}

impl Stamper {
    /// `trust_anchors` (PEM) lets the parent ingredient's own validation be
    /// recorded as trusted; `software_agent` is (name, version).
    pub fn new(
        identity: &SigningIdentity,
        trust_anchors: Option<&str>,
        software_agent: (&str, &str),
    ) -> Result<Self, CredentialsError> {
        Ok(Self {
            signer: identity.signer()?,
            context: super::inspect::context(trust_anchors)?,
            software_agent: (software_agent.0.into(), software_agent.1.into()),
        })
    }

    /// Signs `image` (already watermarked, encoded as `format`) and returns
    /// the file with its manifest embedded.
    pub fn sign(
        &self,
        format: ImageFormat,
        image: &[u8],
        stamp: &Stamp<'_>,
    ) -> Result<Vec<u8>, CredentialsError> {
        let (agent_name, agent_version) = &self.software_agent;
        let agent = json!({ "name": agent_name, "version": agent_version });
        let mut builder =
            c2pa::Builder::from_shared_context(&self.context).with_definition(json!({
                "title": stamp.title,
                "format": format.mime(),
                "claim_generator_info": [agent],
            }))?;
        match stamp.parent {
            None => {
                let mut created = json!({
                    "action": "c2pa.created",
                    "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                    "softwareAgent": agent,
                });
                if let Some(input) = stamp.input {
                    builder.add_ingredient_from_stream(
                        json!({
                            "title": format!("init image of {}", stamp.record.task_id),
                            "relationship": "inputTo",
                            "label": "init_image",
                        })
                        .to_string(),
                        ImageFormat::sniff(input)?.mime(),
                        &mut Cursor::new(input),
                    )?;
                    let mut ids = vec!["init_image"];
                    if let Some(mask) = stamp.mask {
                        builder.add_ingredient_from_stream(
                            json!({
                                "title": format!("{} {}", super::inspect::MASK_TITLE_PREFIX, stamp.record.task_id),
                                "relationship": "inputTo",
                                "label": "mask",
                            })
                            .to_string(),
                            ImageFormat::sniff(mask)?.mime(),
                            &mut Cursor::new(mask),
                        )?;
                        ids.push("mask");
                    }
                    created["parameters"] = json!({ "ingredientIds": ids });
                }
                builder.add_action(created)?;
            }
            Some(parent) => {
                let parent_format = ImageFormat::sniff(parent)?;
                builder.add_ingredient_from_stream(
                    json!({
                        "title": format!("base image of {}", stamp.record.task_id),
                        "relationship": "parentOf",
                        "label": "base_image",
                    })
                    .to_string(),
                    parent_format.mime(),
                    &mut Cursor::new(parent),
                )?;
                builder.add_action(json!({
                    "action": "c2pa.opened",
                    "softwareAgent": agent,
                    "parameters": { "ingredientIds": ["base_image"] },
                }))?;
                // An upscale changes the size; a refine re-renders part of
                // the picture at its size.
                let action = if stamp.record.stage == "upscale" {
                    "c2pa.resized"
                } else {
                    "c2pa.edited"
                };
                builder.add_action(json!({
                    "action": action,
                    "softwareAgent": agent,
                    "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
                }))?;
            }
        }
        builder.add_action(json!({
            "action": "c2pa.watermarked.bound",
            "softwareAgent": agent,
        }))?;
        builder.add_assertion(
            c2pa::assertions::labels::SOFT_BINDING,
            &SoftBindingAssertion {
                alg: SOFT_BINDING_ALG.into(),
                blocks: vec![SoftBindingBlock {
                    scope: Default::default(),
                    value: stamp.watermark_id.to_be_bytes().to_vec(),
                }],
                pad: Vec::new(),
            },
        )?;
        builder.add_assertion(GENERATION_LABEL, stamp.record)?;
        if let Some(tm) = &stamp.training_mining {
            builder.add_assertion("cawg.training-mining", &tm.assertion())?;
        }
        let mut source = Cursor::new(image);
        let mut dest = Cursor::new(Vec::new());
        builder.sign(&*self.signer, format.mime(), &mut source, &mut dest)?;
        Ok(dest.into_inner())
    }
}

/// One-off signing; a worker keeps a [`Stamper`] instead.
pub fn sign_image(
    identity: &SigningIdentity,
    trust_anchors: Option<&str>,
    format: ImageFormat,
    image: &[u8],
    stamp: &Stamp<'_>,
) -> Result<Vec<u8>, CredentialsError> {
    Stamper::new(
        identity,
        trust_anchors,
        ("hallmark", env!("CARGO_PKG_VERSION")),
    )?
    .sign(format, image, stamp)
}
