//! Tiny random-weight checkpoints in the real layouts, generated
//! deterministically from a seed: SD-1.x-shaped, SD-2.x-shaped (v-prediction,
//! linear projections, GELU, `!` padding) and SDXL-shaped (two text encoders,
//! pooled text and size ids) diffusers folders with the real CLIP tokenizer,
//! and a Real-ESRGAN ×2/×4 RRDBNet file. The
//! engine loads them through the same loader real checkpoints use.
//!
//! The weights are recorded by building the real networks over a
//! [`SimpleBackend`] that invents each parameter when it is first asked for
//! (from the seed and the parameter's name), so the files hold exactly the
//! names and shapes the loader reads.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};
use serde_json::json;

use crate::DiffusionError;
use crate::clip::{ClipTextConfig, ClipTextModel};
use crate::esrgan::{RrdbConfig, RrdbNet};
use crate::model::WeightFile;
use crate::rng::NoiseGenerator;

/// The tiny architectures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TinyArch {
    Sd1,
    /// SD-1.x-shaped with an inpainting unet (9 input channels: the
    /// latents, the mask, the masked image's latents), as
    /// runwayml/stable-diffusion-inpainting.
    Sd1Inpaint,
    /// SD-2.x-shaped (v-prediction) with an inpainting unet.
    Sd2Inpaint,
    /// SDXL-shaped with an inpainting unet, as
    /// diffusers/stable-diffusion-xl-1.0-inpainting-0.1.
    SdxlInpaint,
    Sd2,
    /// SDXL-shaped: two text encoders (the second with projection), the
    /// pooled text and size ids added to the UNet's time embedding.
    Sdxl,
    /// SDXL's refiner: the second text encoder only (its states are the
    /// context), and an aesthetic score among five added time ids.
    SdxlRefiner,
    /// The full-size SD 1.5 architecture (860M-parameter UNet) with random
    /// weights, for benchmarks.
    Sd15Full,
    Esrgan {
        scale: usize,
    },
    /// Real-ESRGAN ×4plus's own sizes (64 features, 23 blocks, 32 growth
    /// channels) with random weights, for benchmarks.
    EsrganX4Full,
}

impl TinyArch {
    /// Whether [`init_tiny`] needs CLIP's vocabulary for this architecture
    /// (every Stable Diffusion one; the upscalers have no tokenizer).
    pub fn needs_clip_vocab(&self) -> bool {
        !matches!(self, Self::Esrgan { .. } | Self::EsrganX4Full)
    }
}

impl std::str::FromStr for TinyArch {
    type Err = DiffusionError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "sd1" => Self::Sd1,
            "sd1-inpaint" => Self::Sd1Inpaint,
            "sd2-inpaint" => Self::Sd2Inpaint,
            "sdxl-inpaint" => Self::SdxlInpaint,
            "sd2" => Self::Sd2,
            "sd15-full" => Self::Sd15Full,
            "esrgan" | "esrgan-x2" => Self::Esrgan { scale: 2 },
            "esrgan-x4" => Self::Esrgan { scale: 4 },
            "esrgan-x4-full" => Self::EsrganX4Full,
            "sdxl" => Self::Sdxl,
            "sdxl-refiner" => Self::SdxlRefiner,
            other => {
                return Err(DiffusionError::BadRequest(format!(
                    "unknown tiny architecture {other:?} (sd1, sd1-inpaint, sd2, sd2-inpaint, sdxl, sdxl-inpaint, sdxl-refiner, sd15-full, esrgan-x2, esrgan-x4, esrgan-x4-full)"
                )));
            }
        })
    }
}

/// Invents parameters on first request and remembers them.
struct Recorder {
    seed: u64,
    tensors: Arc<Mutex<BTreeMap<String, Tensor>>>,
}

fn name_hash(name: &str) -> u64 {
    // FNV-1a: stable across runs and platforms.
    name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        h: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let mut map = self.tensors.lock().expect("recorder lock");
        if let Some(t) = map.get(name) {
            if t.shape() != &s {
                candle_core::bail!("{name} requested as {s:?} and as {:?}", t.shape());
            }
            return t.to_dtype(dtype)?.to_device(dev);
        }
        let n = s.elem_count();
        let mut rng = NoiseGenerator::new(self.seed ^ name_hash(name));
        let data: Vec<f32> = match h {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| (mean + stdev * rng.next_normal()) as f32)
                .collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.next_uniform(lo, up) as f32).collect(),
            Init::Kaiming { .. } => {
                // PyTorch's default for linear and conv layers: U(±1/√fan_in).
                let fan_in: usize = s.dims().iter().skip(1).product::<usize>().max(1);
                let b = 1.0 / (fan_in as f64).sqrt();
                (0..n).map(|_| rng.next_uniform(-b, b) as f32).collect()
            }
        };
        let t = Tensor::from_vec(data, s, &Device::Cpu)?;
        map.insert(name.to_string(), t.clone());
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.tensors.lock().expect("recorder lock").get(name) {
            Some(t) => t.to_dtype(dtype)?.to_device(dev),
            None => candle_core::bail!("{name} has not been created"),
        }
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        // Loaders probe for the newer parameter names; answer yes so those are made.
        true
    }
}

fn recorder(seed: u64) -> (VarBuilder<'static>, Arc<Mutex<BTreeMap<String, Tensor>>>) {
    let tensors = Arc::new(Mutex::new(BTreeMap::new()));
    let backend = Recorder {
        seed,
        tensors: tensors.clone(),
    };
    (
        VarBuilder::from_backend(Box::new(backend), DType::F32, Device::Cpu),
        tensors,
    )
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DiffusionError + '_ {
    move |e| DiffusionError::io(path, e)
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), DiffusionError> {
    let text = serde_json::to_string_pretty(v).expect("json values serialize");
    std::fs::write(path, text + "\n").map_err(io(path))
}

/// Write recorded tensors (with any `adjust`ments) as safetensors with the
/// `format: pt` metadata transformers expects.
fn write_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<(), DiffusionError> {
    let data: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|(k, t)| {
            let v: Vec<f32> = t.flatten_all()?.to_vec1()?;
            let bytes = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Ok((k.clone(), bytes, t.dims().to_vec()))
        })
        .collect::<candle_core::Result<_>>()?;
    let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = data
        .iter()
        .map(|(k, b, s)| {
            let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                .expect("sizes computed from the tensor");
            (k.clone(), view)
        })
        .collect();
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(views, Some(meta), path)
        .map_err(|e| DiffusionError::corrupt(path, e))
}

/// Generate a tiny checkpoint of `arch` from `seed` into `dir` (created;
/// must be empty or absent). `clip_bpe` is CLIP's `bpe_simple_vocab_16e6.txt.gz`.
pub fn init_tiny(
    dir: &Path,
    arch: TinyArch,
    seed: u64,
    clip_bpe: Option<&Path>,
) -> Result<(), DiffusionError> {
    if dir.exists() && std::fs::read_dir(dir).map_err(io(dir))?.next().is_some() {
        return Err(DiffusionError::BadRequest(format!(
            "{} is not empty; choose a new folder",
            dir.display()
        )));
    }
    // Write into a sibling temp folder, then rename: never a half-written model.
    let parent = dir
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let staging = parent.join(format!(
        ".{}.partial-{}",
        dir.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&staging);
    std::fs::create_dir_all(&staging).map_err(io(&staging))?;
    let result = match arch {
        TinyArch::Sd1
        | TinyArch::Sd1Inpaint
        | TinyArch::Sd2Inpaint
        | TinyArch::SdxlInpaint
        | TinyArch::Sd2
        | TinyArch::Sdxl
        | TinyArch::SdxlRefiner
        | TinyArch::Sd15Full => {
            let bpe = clip_bpe.ok_or_else(|| {
                DiffusionError::BadRequest(
                    "the CLIP vocabulary (bpe_simple_vocab_16e6.txt.gz) is needed for the Stable Diffusion architectures"
                        .into(),
                )
            })?;
            let shape = match arch {
                TinyArch::Sd1 => SdShape::tiny(false),
                TinyArch::Sd1Inpaint => SdShape {
                    inpaint: true,
                    ..SdShape::tiny(false)
                },
                TinyArch::Sd2 => SdShape::tiny(true),
                TinyArch::Sd2Inpaint => SdShape {
                    inpaint: true,
                    ..SdShape::tiny(true)
                },
                TinyArch::Sdxl => SdShape::tiny_xl(),
                TinyArch::SdxlInpaint => SdShape {
                    inpaint: true,
                    ..SdShape::tiny_xl()
                },
                TinyArch::SdxlRefiner => SdShape {
                    refiner: true,
                    ..SdShape::tiny_xl()
                },
                _ => SdShape::sd15(),
            };
            write_sd(&staging, &shape, seed, bpe)
        }
        TinyArch::Esrgan { scale } => write_esrgan(&staging, tiny_esrgan(scale), seed, "tiny"),
        TinyArch::EsrganX4Full => write_esrgan(
            &staging,
            RrdbConfig {
                scale: 4,
                num_feat: 64,
                num_block: 23,
                num_grow_ch: 32,
            },
            seed,
            "random",
        ),
    };
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    if dir.exists() {
        std::fs::remove_dir(dir).map_err(io(dir))?;
    }
    std::fs::rename(&staging, dir).map_err(io(dir))
}

/// The tiny RRDBNet's sizes.
fn tiny_esrgan(scale: usize) -> RrdbConfig {
    RrdbConfig {
        scale,
        num_feat: 16,
        num_block: 2,
        num_grow_ch: 8,
    }
}

/// An RRDBNet of `config`'s sizes, its file named `RealESRGAN_x{scale}plus_{name}`.
pub(crate) fn write_esrgan(
    dir: &Path,
    config: RrdbConfig,
    seed: u64,
    name: &str,
) -> Result<(), DiffusionError> {
    let scale = config.scale;
    let (vb, tensors) = recorder(seed);
    let dummy = WeightFile {
        relative: String::new(),
        path: dir.to_path_buf(),
        size: 0,
    };
    RrdbNet::new(vb, config, dummy, crate::conv::ConvAlgorithm::default())?;
    let mut t = tensors.lock().expect("recorder lock").clone();
    // Keep the random network's output around mid-grey rather than clipped.
    if let Some(w) = t.get_mut("conv_last.weight") {
        *w = (&*w * 0.05)?;
    }
    if let Some(b) = t.get_mut("conv_last.bias") {
        *b = b.ones_like()?.affine(0.5, 0.0)?;
    }
    write_safetensors(
        &dir.join(format!("RealESRGAN_x{scale}plus_{name}.safetensors")),
        &t,
    )?;
    write_json(
        &dir.join("config.json"),
        &json!({"architecture": "RRDBNet", "scale": scale, "num_feat": config.num_feat,
                "num_block": config.num_block, "num_grow_ch": config.num_grow_ch, "seed": seed}),
    )
}

/// The sizes of a Stable Diffusion 1.x/2.x/XL model.
struct SdShape {
    v2: bool,
    xl: bool,
    /// SDXL's refiner (with `xl`).
    refiner: bool,
    /// An inpainting unet (9 input channels).
    inpaint: bool,
    hidden: usize,
    intermediate: usize,
    text_layers: usize,
    text_heads: usize,
    unet_channels: Vec<usize>,
    unet_down: Vec<&'static str>,
    unet_up: Vec<&'static str>,
    unet_heads: serde_json::Value,
    vae_channels: Vec<usize>,
    vae_layers: usize,
    sample_size: usize,
    /// Scale of the random decoder's last convolution: at full scale a random
    /// VAE paints full-range 8-pixel texture, which no invisible watermark
    /// reads through (the worker then rightly refuses to ship the image).
    vae_out_scale: f64,
}

impl SdShape {
    fn tiny(v2: bool) -> Self {
        Self {
            v2,
            xl: false,
            refiner: false,
            inpaint: false,
            hidden: 32,
            intermediate: 37,
            text_layers: 2,
            text_heads: 4,
            unet_channels: vec![32, 64],
            unet_down: vec!["CrossAttnDownBlock2D", "DownBlock2D"],
            unet_up: vec!["UpBlock2D", "CrossAttnUpBlock2D"],
            unet_heads: if v2 { json!([2, 4]) } else { json!(8) },
            vae_channels: vec![32, 32, 64, 64],
            vae_layers: 1,
            sample_size: 24,
            vae_out_scale: 0.3,
        }
    }

    /// runwayml/stable-diffusion-v1-5's configuration.
    /// Two 32-wide text encoders (the second projected, as SDXL's OpenCLIP
    /// bigG), a UNet whose first level has no attention and whose second has
    /// two transformer layers, SDXL's VAE scale.
    fn tiny_xl() -> Self {
        Self {
            v2: false,
            xl: true,
            unet_down: vec!["DownBlock2D", "CrossAttnDownBlock2D"],
            unet_up: vec!["CrossAttnUpBlock2D", "UpBlock2D"],
            unet_heads: json!([2, 4]),
            ..Self::tiny(false)
        }
    }

    fn sd15() -> Self {
        Self {
            v2: false,
            xl: false,
            refiner: false,
            inpaint: false,
            hidden: 768,
            intermediate: 3072,
            text_layers: 12,
            text_heads: 12,
            unet_channels: vec![320, 640, 1280, 1280],
            unet_down: vec![
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "CrossAttnDownBlock2D",
                "DownBlock2D",
            ],
            unet_up: vec![
                "UpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
                "CrossAttnUpBlock2D",
            ],
            unet_heads: json!(8),
            vae_channels: vec![128, 256, 512, 512],
            vae_layers: 2,
            sample_size: 64,
            vae_out_scale: 1.0,
        }
    }
}

/// A CLIP tokenizer folder rebuilt from the BPE list, padding with `pad`.
fn write_tokenizer(tok: &Path, bpe: &Path, pad: &str) -> Result<(), DiffusionError> {
    std::fs::create_dir_all(tok).map_err(io(tok))?;
    let (vocab, merges) = crate::tokenizer::vocab_from_bpe_gz(bpe)?;
    std::fs::write(tok.join("vocab.json"), vocab).map_err(io(tok))?;
    std::fs::write(tok.join("merges.txt"), merges).map_err(io(tok))?;
    let special = json!({
        "bos_token": crate::tokenizer::START_OF_TEXT, "eos_token": crate::tokenizer::END_OF_TEXT,
        "unk_token": crate::tokenizer::END_OF_TEXT, "pad_token": pad
    });
    write_json(&tok.join("special_tokens_map.json"), &special)?;
    write_json(
        &tok.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true,
                "bos_token": crate::tokenizer::START_OF_TEXT, "eos_token": crate::tokenizer::END_OF_TEXT,
                "unk_token": crate::tokenizer::END_OF_TEXT, "pad_token": pad}),
    )
}

/// A CLIP text encoder folder: config and recorded weights.
fn write_text_encoder(dir: &Path, cfg: serde_json::Value, seed: u64) -> Result<(), DiffusionError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_json(&dir.join("config.json"), &cfg)?;
    let text: ClipTextConfig = serde_json::from_value(cfg).expect("static config");
    let (vb, tensors) = recorder(seed);
    ClipTextModel::new(vb, &text)?;
    write_safetensors(
        &dir.join("model.safetensors"),
        &tensors.lock().expect("lock"),
    )
}

fn text_config(shape: &SdShape, gelu: bool, projected: bool, pad_id: u32) -> serde_json::Value {
    json!({
        "architectures": [if projected { "CLIPTextModelWithProjection" } else { "CLIPTextModel" }],
        "model_type": "clip_text_model",
        "vocab_size": 49408, "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.text_layers, "num_attention_heads": shape.text_heads, "max_position_embeddings": 77,
        "hidden_act": if gelu { "gelu" } else { "quick_gelu" }, "layer_norm_eps": 1e-5,
        "projection_dim": shape.hidden, "bos_token_id": 49406, "eos_token_id": 49407,
        "pad_token_id": pad_id, "torch_dtype": "float32"
    })
}

fn write_sd(dir: &Path, shape: &SdShape, seed: u64, bpe: &Path) -> Result<(), DiffusionError> {
    let (v2, xl, refiner) = (shape.v2, shape.xl, shape.refiner);
    let hidden = shape.hidden;
    let mut unet_cfg = json!({
        "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0",
        "sample_size": shape.sample_size, "in_channels": if shape.inpaint { 9 } else { 4 }, "out_channels": 4,
        "down_block_types": shape.unet_down, "up_block_types": shape.unet_up,
        "block_out_channels": shape.unet_channels, "layers_per_block": 2,
        "attention_head_dim": shape.unet_heads,
        "cross_attention_dim": hidden, "norm_num_groups": 32, "norm_eps": 1e-5,
        "act_fn": "silu", "center_input_sample": false, "flip_sin_to_cos": true, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1,
        "use_linear_projection": v2, "upcast_attention": v2
    });
    if xl {
        // SDXL's UNet: both encoders' states side by side, and the pooled
        // text plus six size ids (each embedded in `time_dim` sinusoids).
        // The refiner: the second encoder's states only, and five ids.
        let time_dim = 8;
        let (encoders, ids) = if refiner { (1, 5) } else { (2, 6) };
        let extra = json!({
            "cross_attention_dim": encoders * hidden, "use_linear_projection": true, "upcast_attention": false,
            "transformer_layers_per_block": [1, 2],
            "addition_embed_type": "text_time", "addition_time_embed_dim": time_dim,
            "projection_class_embeddings_input_dim": hidden + ids * time_dim
        });
        for (k, v) in extra.as_object().expect("object") {
            unet_cfg[k] = v.clone();
        }
    }
    let vae_cfg = json!({
        "_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0",
        "in_channels": 3, "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"], "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": shape.vae_channels, "layers_per_block": shape.vae_layers, "latent_channels": 4,
        "norm_num_groups": 32, "sample_size": shape.sample_size * 8,
        "scaling_factor": if xl { 0.13025 } else { 0.18215 }, "force_upcast": true, "act_fn": "silu"
    });
    let sched_cfg = if xl {
        json!({
            "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.30.0",
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "steps_offset": 1, "clip_sample": false, "trained_betas": null,
            "interpolation_type": "linear", "use_karras_sigmas": false, "sample_max_value": 1.0,
            "prediction_type": "epsilon", "timestep_spacing": "leading"
        })
    } else {
        json!({
            "_class_name": "PNDMScheduler", "_diffusers_version": "0.30.0",
            "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "num_train_timesteps": 1000, "set_alpha_to_one": false, "skip_prk_steps": true,
            "steps_offset": 1, "clip_sample": false, "trained_betas": null,
            "prediction_type": if v2 { "v_prediction" } else { "epsilon" }, "timestep_spacing": "leading"
        })
    };
    let index = if refiner {
        json!({
            "_class_name": "StableDiffusionXLImg2ImgPipeline", "_diffusers_version": "0.30.0",
            "force_zeros_for_empty_prompt": false, "requires_aesthetics_score": true,
            "feature_extractor": [null, null], "image_encoder": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": [null, null], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": [null, null], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]
        })
    } else if xl {
        json!({
            "_class_name": if shape.inpaint { "StableDiffusionXLInpaintPipeline" } else { "StableDiffusionXLPipeline" },
            "_diffusers_version": "0.30.0",
            "force_zeros_for_empty_prompt": true, "feature_extractor": [null, null], "image_encoder": [null, null],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"], "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]
        })
    } else {
        json!({
            "_class_name": if shape.inpaint { "StableDiffusionInpaintPipeline" } else { "StableDiffusionPipeline" },
            "_diffusers_version": "0.30.0",
            "feature_extractor": [null, null], "safety_checker": [null, null],
            "requires_safety_checker": false,
            "scheduler": ["diffusers", "PNDMScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        })
    };
    for sub in ["unet", "vae", "scheduler"] {
        let p = dir.join(sub);
        std::fs::create_dir_all(&p).map_err(io(&p))?;
    }
    write_json(&dir.join("model_index.json"), &index)?;
    write_json(&dir.join("unet/config.json"), &unet_cfg)?;
    write_json(&dir.join("vae/config.json"), &vae_cfg)?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &sched_cfg)?;

    // Text: SD 2.x pads with `!` (id 0), SD 1.x with end-of-text; SDXL's
    // first tokenizer as SD 1.x, its second as SD 2.x.
    let eot = crate::tokenizer::END_OF_TEXT;
    let (pad, pad_id) = if v2 { ("!", 0) } else { (eot, 49407) };
    if !refiner {
        write_tokenizer(&dir.join("tokenizer"), bpe, pad)?;
        write_text_encoder(
            &dir.join("text_encoder"),
            text_config(shape, v2, false, pad_id),
            seed ^ 1,
        )?;
    }
    if xl {
        write_tokenizer(&dir.join("tokenizer_2"), bpe, "!")?;
        write_text_encoder(
            &dir.join("text_encoder_2"),
            text_config(shape, true, true, 0),
            seed ^ 4,
        )?;
    }

    // Build each network over the recorder, then write what it asked for.
    let folder_unet: crate::model::UnetConfig =
        serde_json::from_value(unet_cfg).expect("static config");
    let (vb, tensors) = recorder(seed ^ 2);
    crate::unet::Unet::new(vb, crate::unet::UnetSpec::from_config(&folder_unet)?)?;
    write_safetensors(
        &dir.join("unet/diffusion_pytorch_model.safetensors"),
        &tensors.lock().expect("lock"),
    )?;

    let folder_vae: crate::model::VaeConfig =
        serde_json::from_value(vae_cfg).expect("static config");
    let (vb, tensors) = recorder(seed ^ 3);
    // The VAE as the pipeline builds it, both halves.
    crate::vae::Decoder::new(vb.clone(), &folder_vae, Default::default())?;
    crate::vae::Encoder::new(vb, &folder_vae, Default::default())?;
    let mut vae = tensors.lock().expect("lock").clone();
    for name in ["decoder.conv_out.weight", "decoder.conv_out.bias"] {
        if let Some(t) = vae.get_mut(name) {
            *t = t.affine(shape.vae_out_scale, 0.0)?;
        }
    }
    write_safetensors(&dir.join("vae/diffusion_pytorch_model.safetensors"), &vae)
}
