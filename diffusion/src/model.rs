//! A model folder in the diffusers layout: which pipeline it is, its
//! component configs, its weight files (with the fp16 variant when asked),
//! and their sha256 digests.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::DiffusionError;
use crate::clip::ClipTextConfig;
use crate::scheduler::SchedulerConfig;

/// The pipeline families this engine knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `StableDiffusionPipeline`: SD 1.x, SD 2.x (v-prediction too), SD-Turbo.
    StableDiffusion,
    /// `StableDiffusionXLPipeline`: SDXL, SDXL-Turbo.
    StableDiffusionXl,
}

/// One weight file of a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightFile {
    /// Path relative to the model folder, with `/` separators
    /// (`unet/diffusion_pytorch_model.safetensors`).
    pub relative: String,
    pub path: PathBuf,
    pub size: u64,
}

/// A diffusers model folder, opened and checked for the files it needs.
#[derive(Debug, Clone)]
pub struct ModelFolder {
    pub root: PathBuf,
    pub family: Family,
    pub unet: Vec<WeightFile>,
    pub vae: Vec<WeightFile>,
    pub text_encoder: Vec<WeightFile>,
    pub text_encoder_2: Vec<WeightFile>,
    /// SDXL: empty negative prompts condition on zeros.
    pub force_zeros_for_empty_prompt: bool,
    /// SDXL's refiner: the second text encoder only, and an aesthetic
    /// score in place of the target size among the added time ids. It
    /// refines images (img2img) and does not draw from noise.
    pub refiner: bool,
}

#[derive(Debug, Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: String,
    /// SDXL: an empty negative prompt conditions on zeros rather than on
    /// the encoding of "" (diffusers' default for SDXL pipelines: true).
    #[serde(default = "d_true")]
    force_zeros_for_empty_prompt: bool,
    /// SDXL's refiner: conditioned on an aesthetic score instead of the
    /// target size, with the second text encoder only.
    #[serde(default)]
    requires_aesthetics_score: bool,
    /// `["transformers", "CLIPTextModel"]`, or `[null, null]` where the
    /// pipeline has no first text encoder (SDXL's refiner).
    #[serde(default)]
    text_encoder: Option<serde_json::Value>,
}

/// `unet/config.json` (the fields this engine reads).
#[derive(Debug, Clone, Deserialize)]
pub struct UnetConfig {
    #[serde(default = "d4")]
    pub in_channels: usize,
    #[serde(default = "d4")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "d2v")]
    pub layers_per_block: serde_json::Value,
    #[serde(default)]
    pub attention_head_dim: Option<serde_json::Value>,
    #[serde(default)]
    pub num_attention_heads: Option<serde_json::Value>,
    pub cross_attention_dim: serde_json::Value,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Attention scores in f32 (SD 2.x v-models overflow in fp16).
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default)]
    pub transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d1")]
    pub downsample_padding: usize,
    #[serde(default = "d1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

/// `vae/config.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d1")]
    pub layers_per_block: usize,
    #[serde(default = "d4")]
    pub latent_channels: usize,
    #[serde(default = "d32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// The VAE overflows in fp16 and runs in f32 (diffusers' default: true).
    #[serde(default = "d_true")]
    pub force_upcast: bool,
    /// The mid blocks have their self-attention (diffusers' default: true).
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl UnetConfig {
    /// Input channels of an inpainting unet over `latent` latent channels:
    /// the latents, the mask and the masked image's latents.
    pub fn inpainting_channels(latent: usize) -> usize {
        2 * latent + 1
    }

    /// Whether this is an inpainting unet for `vae`'s latents.
    pub fn is_inpainting(&self, vae: &VaeConfig) -> bool {
        self.in_channels == Self::inpainting_channels(vae.latent_channels)
    }
}

impl VaeConfig {
    /// Pixels per latent cell along each side.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

fn d1() -> usize {
    1
}
fn d4() -> usize {
    4
}
fn d32() -> usize {
    32
}
fn d2v() -> serde_json::Value {
    2.into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d1f() -> f64 {
    1.0
}
fn d_true() -> bool {
    true
}
fn d_scale() -> f64 {
    0.18215
}

/// Read and parse a JSON file, naming it in errors.
pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DiffusionError> {
    let bytes = std::fs::read(path).map_err(|e| DiffusionError::io(path, e))?;
    serde_json::from_slice(&bytes).map_err(|e| DiffusionError::corrupt(path, e))
}

/// The safetensors files of one component (`unet`, …), preferring the full
/// precision file unless `variant` asks for one and it exists.
fn component_weights(
    root: &Path,
    component: &str,
    variant: Option<&str>,
) -> Result<Vec<WeightFile>, DiffusionError> {
    let dir = root.join(component);
    if !dir.is_dir() {
        return Err(DiffusionError::BadModel(format!(
            "{} has no {component}/ folder (expected the diffusers layout)",
            root.display()
        )));
    }
    let stems = ["diffusion_pytorch_model", "model"];
    let mut candidates = Vec::new();
    for stem in stems {
        if let Some(v) = variant {
            candidates.push(format!("{stem}.{v}.safetensors"));
        }
        candidates.push(format!("{stem}.safetensors"));
        candidates.push(format!("{stem}.fp16.safetensors"));
    }
    for stem in stems {
        let index = dir.join(format!("{stem}.safetensors.index.json"));
        if index.exists() && !candidates.iter().any(|c| dir.join(c).exists()) {
            #[derive(Deserialize)]
            struct Index {
                weight_map: std::collections::BTreeMap<String, String>,
            }
            let idx: Index = read_json(&index)?;
            let mut files: Vec<String> = idx.weight_map.into_values().collect();
            files.sort();
            files.dedup();
            return files
                .iter()
                .map(|f| weight_file(root, &format!("{component}/{f}")))
                .collect();
        }
    }
    for c in &candidates {
        if dir.join(c).exists() {
            return Ok(vec![weight_file(root, &format!("{component}/{c}"))?]);
        }
    }
    let has_bin = std::fs::read_dir(&dir)
        .map(|d| {
            d.flatten()
                .any(|e| e.path().extension().is_some_and(|x| x == "bin"))
        })
        .unwrap_or(false);
    Err(DiffusionError::BadModel(if has_bin {
        format!(
            "{} holds only PyTorch .bin weights; convert them to .safetensors (diffusers: save_pretrained(..., safe_serialization=True))",
            dir.display()
        )
    } else {
        format!(
            "{} has no weights file (expected {})",
            dir.display(),
            candidates[1]
        )
    }))
}

fn weight_file(root: &Path, relative: &str) -> Result<WeightFile, DiffusionError> {
    let path = root.join(relative);
    let meta = std::fs::metadata(&path).map_err(|e| DiffusionError::io(&path, e))?;
    Ok(WeightFile {
        relative: relative.to_string(),
        path,
        size: meta.len(),
    })
}

impl ModelFolder {
    /// Open a folder; `variant` (`"fp16"`) picks variant weight files.
    pub fn open(root: &Path, variant: Option<&str>) -> Result<Self, DiffusionError> {
        if !root.is_dir() {
            return Err(DiffusionError::BadModel(format!(
                "model folder {} does not exist",
                root.display()
            )));
        }
        let index: ModelIndex = read_json(&root.join("model_index.json"))?;
        let family = match index.class_name.as_str() {
            "StableDiffusionPipeline"
            | "StableDiffusionImg2ImgPipeline"
            | "StableDiffusionInpaintPipeline" => Family::StableDiffusion,
            "StableDiffusionXLPipeline"
            | "StableDiffusionXLImg2ImgPipeline"
            | "StableDiffusionXLInpaintPipeline" => Family::StableDiffusionXl,
            other => {
                return Err(DiffusionError::BadModel(format!(
                    "{}: pipeline {other:?} is not supported (StableDiffusionPipeline, StableDiffusionXLPipeline, their Img2Img and Inpaint pipelines)",
                    root.display()
                )));
            }
        };
        let no_first_encoder = index
            .text_encoder
            .as_ref()
            .and_then(|v| v.as_array())
            .is_some_and(|a| a.iter().all(serde_json::Value::is_null));
        let refiner = index.requires_aesthetics_score || no_first_encoder;
        if refiner && family != Family::StableDiffusionXl {
            return Err(DiffusionError::BadModel(format!(
                "{}: aesthetic-score conditioning or no first text encoder, which only SDXL's refiner has, in a {} folder",
                root.display(),
                index.class_name
            )));
        }
        if refiner && !(index.requires_aesthetics_score && no_first_encoder) {
            return Err(DiffusionError::BadModel(format!(
                "{}: an SDXL refiner has requires_aesthetics_score and no first text encoder (text_encoder: [null, null]); this folder has {}",
                root.display(),
                if no_first_encoder {
                    "no first text encoder but no aesthetic score"
                } else {
                    "an aesthetic score but a first text encoder"
                }
            )));
        }
        let text_encoder_2 = if family == Family::StableDiffusionXl {
            component_weights(root, "text_encoder_2", variant)?
        } else {
            Vec::new()
        };
        Ok(Self {
            root: root.to_path_buf(),
            family,
            unet: component_weights(root, "unet", variant)?,
            vae: component_weights(root, "vae", variant)?,
            text_encoder: if refiner {
                Vec::new()
            } else {
                component_weights(root, "text_encoder", variant)?
            },
            text_encoder_2,
            force_zeros_for_empty_prompt: family == Family::StableDiffusionXl
                && index.force_zeros_for_empty_prompt,
            refiner,
        })
    }

    /// Refuses to draw from noise with SDXL's refiner, which only refines
    /// an image (img2img).
    pub fn check_draws_from_noise(&self) -> Result<(), DiffusionError> {
        if self.refiner {
            return Err(DiffusionError::BadRequest(format!(
                "{} is an SDXL refiner: it refines an image and does not draw from noise; give it an init image, or make it a job's --refine-model",
                self.root.display()
            )));
        }
        Ok(())
    }

    pub fn weight_files(&self) -> impl Iterator<Item = &WeightFile> {
        self.unet
            .iter()
            .chain(&self.vae)
            .chain(&self.text_encoder)
            .chain(&self.text_encoder_2)
    }

    /// Bytes of all weight files (the model cache's size estimate).
    pub fn weights_size(&self) -> u64 {
        self.weight_files().map(|w| w.size).sum()
    }

    /// `(relative path, sha256)` of every weight file, each checked first
    /// to be a whole safetensors file ([`check_safetensors`]), so a worker
    /// serving a truncated or foreign file refuses it when it starts.
    pub fn hash_weights(&self) -> Result<Vec<(String, String)>, DiffusionError> {
        self.weight_files()
            .map(|w| {
                check_safetensors(&w.path)?;
                Ok((w.relative.clone(), sha256_file(&w.path)?))
            })
            .collect()
    }

    /// Check every weight file against the digests the registry records
    /// (`relative path → sha256`); a file the registry does not list, or one
    /// whose bytes differ, refuses the model.
    pub fn verify_weights(&self, expected: &[(String, String)]) -> Result<(), DiffusionError> {
        for (rel, actual) in self.hash_weights()? {
            let Some((_, want)) = expected.iter().find(|(p, _)| *p == rel) else {
                return Err(DiffusionError::BadModel(format!(
                    "weights file {rel} is not listed in the registry's record of this model"
                )));
            };
            if !want.eq_ignore_ascii_case(&actual) {
                return Err(DiffusionError::WeightsMismatch {
                    path: self.root.join(&rel),
                    expected: want.clone(),
                    actual,
                });
            }
        }
        Ok(())
    }

    pub fn unet_config(&self) -> Result<UnetConfig, DiffusionError> {
        read_json(&self.root.join("unet/config.json"))
    }

    /// Whether the unet is an inpainting one (it also takes a mask and the
    /// masked image's latents), which renders only with a mask.
    pub fn is_inpainting(&self) -> Result<bool, DiffusionError> {
        Ok(self.unet_config()?.is_inpainting(&self.vae_config()?))
    }
    pub fn vae_config(&self) -> Result<VaeConfig, DiffusionError> {
        read_json(&self.root.join("vae/config.json"))
    }
    pub fn text_encoder_config(&self, component: &str) -> Result<ClipTextConfig, DiffusionError> {
        read_json(&self.root.join(component).join("config.json"))
    }
    pub fn scheduler_config(&self) -> Result<SchedulerConfig, DiffusionError> {
        read_json(&self.root.join("scheduler/scheduler_config.json"))
    }
}

/// Largest safetensors header this reads (the format's own limit).
const MAX_SAFETENSORS_HEADER: u64 = 100 << 20;

/// Checks that `path` is a whole safetensors file (as it is now): an
/// 8-byte header length, a JSON header of that length, and its tensors'
/// data ending exactly at the end of the file — so a truncated download or
/// a foreign file is named before anything maps it.
pub fn check_safetensors(path: &Path) -> Result<(), DiffusionError> {
    safetensors_header(path).map(|_| ())
}

/// The header of a whole safetensors file ([`check_safetensors`]): its
/// tensors by name (without `__metadata__`).
pub(crate) fn safetensors_header(
    path: &Path,
) -> Result<serde_json::Map<String, serde_json::Value>, DiffusionError> {
    let corrupt = |why: String| DiffusionError::corrupt(path, why);
    let mut f = std::fs::File::open(path).map_err(|e| DiffusionError::io(path, e))?;
    let size = f.metadata().map_err(|e| DiffusionError::io(path, e))?.len();
    let mut head = [0u8; 8];
    f.read_exact(&mut head)
        .map_err(|_| corrupt(format!("not a safetensors file ({size} bytes)")))?;
    let header_len = u64::from_le_bytes(head);
    if !(2..=MAX_SAFETENSORS_HEADER).contains(&header_len) || 8 + header_len > size {
        return Err(corrupt(format!(
            "not a safetensors file (bad or truncated header: {header_len} bytes of header in {size} bytes)"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header)
        .map_err(|e| DiffusionError::io(path, e))?;
    let mut entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header)
            .map_err(|e| corrupt(format!("not a safetensors file (header: {e})")))?;
    entries.remove("__metadata__");
    let mut end = 0u64;
    for (name, entry) in &entries {
        let offsets = entry
            .get("data_offsets")
            .and_then(|o| o.as_array())
            .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)));
        match offsets {
            Some((from, to)) if from <= to => end = end.max(to),
            _ => {
                return Err(corrupt(format!(
                    "tensor {name:?} has no valid data_offsets"
                )));
            }
        }
    }
    let data = size - 8 - header_len;
    if end != data {
        return Err(corrupt(format!(
            "{} (its tensors take {end} bytes of data, the file holds {data})",
            if end > data {
                "truncated"
            } else {
                "bytes after the last tensor"
            }
        )));
    }
    Ok(entries)
}

/// Streamed sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String, DiffusionError> {
    let mut f = std::fs::File::open(path).map_err(|e| DiffusionError::io(path, e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| DiffusionError::io(path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hex::encode(hasher.finalize()))
}
