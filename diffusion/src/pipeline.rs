//! The Stable Diffusion pipeline (SD 1.x / 2.x / SD-Turbo, and SDXL /
//! SDXL-Turbo with their two text encoders, pooled text embedding and size
//! ids): tokenize, encode the prompts, loop over the sampler's timesteps with
//! classifier-free guidance, decode. Read top to bottom in
//! [`StableDiffusion::generate`].

use std::sync::OnceLock;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use image::{GrayImage, RgbImage};

use crate::DiffusionError;
use crate::attention::{AttentionChoice, AttentionKernel};
use crate::clip::ClipTextModel;
use crate::conv::ConvAlgorithm;
use crate::graph::{GraphMode, UnetCalls};
use crate::model::{Family, ModelFolder, UnetConfig, VaeConfig, WeightFile};
use crate::rng::NoiseGenerator;
use crate::scheduler::{Sampler, SchedulerConfig, SchedulerKind};
use crate::tokenizer::ClipTokenizer;
use crate::unet::{AddedConditioning, Unet, UnetSpec};
use crate::vae;

/// Where and how to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute type of the networks (f32 on CPU; f16 or bf16 on a GPU).
    pub dtype: DType,
    /// Weight file variant to prefer (`fp16`).
    pub variant: Option<String>,
    /// The UNet's attention kernel.
    pub attention: AttentionChoice,
    /// The UNet's convolution algorithm (`cudnn` builds).
    pub conv_algorithm: ConvAlgorithm,
}

/// A device by name: `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device, DiffusionError> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal = match s.strip_prefix("cuda:") {
                Some(n) => n.parse().map_err(|_| {
                    DiffusionError::BadRequest(format!("device {s:?}: {n:?} is not a GPU number"))
                })?,
                None => 0,
            };
            Device::new_cuda(ordinal).map_err(|e| {
                DiffusionError::BadRequest(format!(
                    "device {s}: {e} (is this a build with the `cuda` feature, on a machine with an NVIDIA driver?)"
                ))
            })
        }
        other => Err(DiffusionError::BadRequest(format!(
            "unknown device {other:?} (cpu, cuda, cuda:N)"
        ))),
    }
}

/// A compute type by name: `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType, DiffusionError> {
    match s {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(DiffusionError::BadRequest(format!(
            "unknown dtype {other:?} (f32, f16, bf16)"
        ))),
    }
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            attention: AttentionChoice::Auto,
            conv_algorithm: ConvAlgorithm::default(),
        }
    }
}

/// One image of a batch.
#[derive(Debug, Clone)]
pub struct Sample {
    pub prompt: String,
    pub negative: String,
    pub seed: u64,
}

/// A batch of images that share model, size, steps, guidance and sampler.
#[derive(Debug, Clone)]
pub struct GenerateRequest {
    pub samples: Vec<Sample>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    /// Initial latents `(batch, channels, height/f, width/f)`, replacing the
    /// seeded noise (for reproducibility and comparisons).
    pub init_latents: Option<Tensor>,
    /// img2img: start from these images (one per sample) at `strength`.
    pub init_images: Option<Vec<RgbImage>>,
    pub strength: f64,
    /// Inpainting (with `init_images`): one mask per sample, the request's
    /// size; white (≥ 50 % grey) is repainted, black kept from the init
    /// image. An inpainting unet sees the mask and the masked image; any
    /// other unet's latents outside the mask are reset to the init image's,
    /// noised to each step's level (diffusers' StableDiffusionInpaintPipeline).
    pub masks: Option<Vec<GrayImage>>,
}

impl GenerateRequest {
    pub fn new(samples: Vec<Sample>, width: usize, height: usize) -> Self {
        Self {
            samples,
            width,
            height,
            steps: 20,
            guidance: 7.5,
            scheduler: SchedulerKind::EulerAncestral,
            init_latents: None,
            init_images: None,
            strength: 0.5,
            masks: None,
        }
    }
}

/// The result of a batch.
#[derive(Debug)]
pub struct Generation {
    pub images: Vec<RgbImage>,
    /// Final latents before decoding (f32, on the CPU).
    pub latents: Tensor,
    /// Prompts that were cut to 77 tokens (indices into the batch).
    pub truncated: Vec<usize>,
}

/// A CLIP tokenizer and its text encoder.
struct TextEncoder {
    tokenizer: ClipTokenizer,
    model: ClipTextModel,
}

/// What the UNet is conditioned on, for a batch of prompts.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Text states the UNet attends to, `(batch, 77, cross_attention_dim)`:
    /// the text encoder's last state (SD 1.x/2.x), or both encoders'
    /// penultimate states side by side (SDXL).
    pub context: Tensor,
    /// SDXL: the second encoder's projected pooled output `(batch, dim)`.
    pub pooled: Option<Tensor>,
}

/// SDXL's six size/crop ids for a `width`×`height` render, one row per image:
/// original size = target size = the render's, crop at the origin (the
/// diffusers defaults).
pub fn size_ids(batch: usize, width: usize, height: usize) -> Result<Tensor, DiffusionError> {
    let (h, w) = (height as f32, width as f32);
    let row = [h, w, 0.0, 0.0, h, w];
    let data: Vec<f32> = (0..batch).flat_map(|_| row).collect();
    Ok(Tensor::from_vec(data, (batch, 6), &Device::Cpu)?)
}

/// SDXL refiner's added time ids for `batch` samples: the image size, the
/// crop origin and an aesthetic score — [`NEGATIVE_AESTHETIC_SCORE`] for the
/// unconditional half when `guided` (which comes first), else
/// [`AESTHETIC_SCORE`], as diffusers' SDXL img2img pipeline sets them.
pub fn aesthetic_ids(
    batch: usize,
    guided: bool,
    width: usize,
    height: usize,
) -> Result<Tensor, DiffusionError> {
    let (h, w) = (height as f32, width as f32);
    let scores = if guided {
        vec![NEGATIVE_AESTHETIC_SCORE, AESTHETIC_SCORE]
    } else {
        vec![AESTHETIC_SCORE]
    };
    let data: Vec<f32> = scores
        .iter()
        .flat_map(|&score| (0..batch).flat_map(move |_| [h, w, 0.0, 0.0, score]))
        .collect();
    Ok(Tensor::from_vec(
        data,
        (scores.len() * batch, 5),
        &Device::Cpu,
    )?)
}

/// The aesthetic score an SDXL refiner is asked for (diffusers' default).
pub const AESTHETIC_SCORE: f32 = 6.0;
/// The score of the unconditional half under guidance (diffusers' default).
pub const NEGATIVE_AESTHETIC_SCORE: f32 = 2.5;

/// Output pixels the VAE decodes in one call (see [`StableDiffusion::decode`]).
pub const DECODE_PIXELS: usize = 4 * 512 * 512;

/// A loaded Stable Diffusion model.
pub struct StableDiffusion {
    pub folder: ModelFolder,
    /// One encoder (SD 1.x/2.x) or two (SDXL).
    text_encoders: Vec<TextEncoder>,
    unet: Unet,
    vae: vae::Decoder,
    /// Built on first img2img use.
    vae_encoder: OnceLock<Result<vae::Encoder, String>>,
    vae_cfg: VaeConfig,
    scheduler_cfg: SchedulerConfig,
    options: LoadOptions,
    /// The unet is an inpainting one (9 input channels: the latents, the
    /// mask and the masked image's latents); it renders only with a mask.
    inpainting_unet: bool,
}

impl std::fmt::Debug for StableDiffusion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StableDiffusion")
            .field("root", &self.folder.root)
            .finish_non_exhaustive()
    }
}

/// The VAE's compute type. As in diffusers, an f16 SDXL model decodes in
/// f32 when its VAE config says it overflows (`force_upcast`, true for the
/// original SDXL VAE); SD 1.x/2.x VAEs run in f16 (diffusers' SD pipelines
/// ignore the flag). An overflow still fails the task by name (the
/// non-finite check on the decoded pixels), never a black image.
fn vae_dtype(family: Family, c: &VaeConfig, dtype: DType) -> DType {
    if dtype == DType::F16 && c.force_upcast && family == Family::StableDiffusionXl {
        DType::F32
    } else {
        dtype
    }
}

/// A VarBuilder over a component's safetensors files, naming the files when
/// they cannot be read.
fn var_builder<'a>(
    files: &[WeightFile],
    opts: &LoadOptions,
) -> Result<VarBuilder<'a>, DiffusionError> {
    for f in files {
        // Checked first so a truncated or foreign file is named.
        crate::model::check_safetensors(&f.path)?;
    }
    let paths: Vec<_> = files.iter().map(|f| f.path.clone()).collect();
    // Safety: the files are memory-mapped read-only; the model folder must not
    // be modified while the model is loaded (as with every mmap-based loader).
    unsafe { VarBuilder::from_mmaped_safetensors(&paths, opts.dtype, &opts.device) }
        .map_err(|e| DiffusionError::corrupt(&files[0].path, e))
}

fn load_err(component: &str, files: &[WeightFile], e: impl std::fmt::Display) -> DiffusionError {
    DiffusionError::BadModel(format!(
        "loading {component} from {}: {e}",
        files
            .first()
            .map(|f| f.path.display().to_string())
            .unwrap_or_default()
    ))
}

impl StableDiffusion {
    /// Load the model in `folder`.
    pub fn load(folder: ModelFolder, options: LoadOptions) -> Result<Self, DiffusionError> {
        crate::gpu::prepare(&options.device);
        let unet_cfg = folder.unet_config()?;
        let vae_cfg = folder.vae_config()?;
        let scheduler_cfg = folder.scheduler_config()?;
        if vae_cfg.block_out_channels.is_empty() {
            return Err(DiffusionError::BadModel(
                "vae config: block_out_channels is empty".into(),
            ));
        }
        // An inpainting unet also takes the mask and the masked image's
        // latents: 4 + 1 + 4 channels in, 4 out.
        let latent = vae_cfg.latent_channels;
        let inpainting_unet = unet_cfg.is_inpainting(&vae_cfg);
        if unet_cfg.out_channels != latent || (unet_cfg.in_channels != latent && !inpainting_unet) {
            return Err(DiffusionError::BadModel(format!(
                "the unet takes {} channels and returns {}, the vae has {latent} latent channels (a unet takes {latent}, or {} to inpaint, and returns {latent})",
                unet_cfg.in_channels,
                unet_cfg.out_channels,
                UnetConfig::inpainting_channels(latent)
            )));
        }
        let xl = folder.family == Family::StableDiffusionXl;
        // SDXL's refiner has the second encoder only.
        let mut components = Vec::new();
        if !folder.refiner {
            components.push(("tokenizer", "text_encoder", &folder.text_encoder));
        }
        if xl {
            components.push(("tokenizer_2", "text_encoder_2", &folder.text_encoder_2));
        }
        let mut text_encoders = Vec::new();
        let mut widths = Vec::new();
        for (tok_dir, component, files) in components {
            let cfg = folder.text_encoder_config(component)?;
            let tokenizer = ClipTokenizer::from_folder(&folder.root.join(tok_dir))?;
            if tokenizer.vocab_size() > cfg.vocab_size {
                return Err(DiffusionError::BadModel(format!(
                    "{tok_dir} has {} tokens, {component} only {}",
                    tokenizer.vocab_size(),
                    cfg.vocab_size
                )));
            }
            let vb = var_builder(files, &options)?;
            let model = ClipTextModel::new(vb, &cfg).map_err(|e| load_err(component, files, e))?;
            widths.push((
                cfg.hidden_size,
                cfg.projection_dim.unwrap_or(cfg.hidden_size),
            ));
            text_encoders.push(TextEncoder { tokenizer, model });
        }
        if xl
            && !text_encoders
                .last()
                .is_some_and(|e| e.model.has_projection())
        {
            return Err(DiffusionError::BadModel(
                "text_encoder_2 must be a CLIPTextModelWithProjection (SDXL's pooled text embedding)"
                    .into(),
            ));
        }
        let mut spec = UnetSpec::from_config(&unet_cfg)?;
        spec.attention = options.attention.resolve(&options.device, options.dtype)?;
        spec.conv_algorithm = options.conv_algorithm;
        let text_width: usize = widths.iter().map(|w| w.0).sum();
        if spec.cross_attention_dim != text_width {
            return Err(DiffusionError::BadModel(format!(
                "the unet attends to {}-wide text states, the text encoder{} make{} {text_width}",
                spec.cross_attention_dim,
                if xl { "s" } else { "" },
                if xl { "" } else { "s" },
            )));
        }
        match (xl, spec.text_time) {
            (false, None) => {}
            (true, Some(tt)) => {
                let pooled = widths.last().map_or(0, |w| w.1);
                let (ids, which) = if folder.refiner {
                    (5, "five ids (size, crop, aesthetic score: an SDXL refiner)")
                } else {
                    (
                        6,
                        "six size ids (an SDXL refiner's unet takes five: its model_index.json says requires_aesthetics_score)",
                    )
                };
                let want = pooled + ids * tt.time_dim;
                if tt.input_dim != want {
                    return Err(DiffusionError::BadModel(format!(
                        "the unet's added conditioning takes {} values, the pooled text ({pooled}) and {which} give {want}",
                        tt.input_dim
                    )));
                }
            }
            (false, Some(_)) => {
                return Err(DiffusionError::BadModel(
                    "the unet takes SDXL's added conditioning but the pipeline is not StableDiffusionXLPipeline".into(),
                ));
            }
            (true, None) => {
                return Err(DiffusionError::BadModel(
                    "an SDXL pipeline whose unet lacks addition_embed_type \"text_time\"".into(),
                ));
            }
        }
        let vb = var_builder(&folder.unet, &options)?;
        let unet = Unet::new(vb, spec).map_err(|e| load_err("unet", &folder.unet, e))?;
        let vae_options = LoadOptions {
            dtype: vae_dtype(folder.family, &vae_cfg, options.dtype),
            ..options.clone()
        };
        let vb = var_builder(&folder.vae, &vae_options)?;
        let vae = vae::Decoder::new(vb, &vae_cfg, options.conv_algorithm)
            .map_err(|e| load_err("vae", &folder.vae, e))?;
        Ok(Self {
            folder,
            text_encoders,
            unet,
            vae,
            vae_encoder: OnceLock::new(),
            vae_cfg,
            scheduler_cfg,
            options,
            inpainting_unet,
        })
    }

    /// Whether the unet is an inpainting one, which needs a mask (and an
    /// init image) to render.
    pub fn is_inpainting_model(&self) -> bool {
        self.inpainting_unet
    }

    /// Pixels per latent cell along each side.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_cfg.scale_factor()
    }

    pub fn latent_channels(&self) -> usize {
        self.vae_cfg.latent_channels
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_cfg
    }

    /// The UNet's attention kernel, as the load resolved it.
    pub fn attention(&self) -> AttentionKernel {
        self.unet.attention()
    }

    pub fn device(&self) -> &Device {
        &self.options.device
    }

    /// The prompts' conditioning, and the indices of prompts cut to 77
    /// tokens (each with a warning).
    fn encode(&self, prompts: &[String]) -> Result<(Conditioning, Vec<usize>), DiffusionError> {
        let mut truncated = Vec::new();
        let mut states = Vec::new();
        let mut pooled = None;
        let xl = self.folder.family == Family::StableDiffusionXl;
        for (k, enc) in self.text_encoders.iter().enumerate() {
            let mut ids = Vec::new();
            let mut eos = Vec::new();
            for (i, p) in prompts.iter().enumerate() {
                let t = enc.tokenizer.encode(p);
                if t.truncated && k == 0 {
                    tracing::warn!(
                        prompt_index = i,
                        "prompt is longer than CLIP's 77 tokens; the rest was ignored"
                    );
                    truncated.push(i);
                }
                ids.push(t.ids);
                eos.push(t.eos_position);
            }
            let out = enc.model.encode(&ids, &eos, &self.options.device)?;
            if xl {
                // SDXL conditions on each encoder's penultimate state; the
                // pooled embedding is the last encoder's.
                states.push(out.penultimate);
                pooled = Some(out.pooled);
            } else {
                states.push(out.last);
            }
        }
        let context = if states.len() == 1 {
            states.remove(0)
        } else {
            Tensor::cat(&states, 2)?
        };
        Ok((Conditioning { context, pooled }, truncated))
    }

    /// The conditioning for `prompts`, in the compute type.
    pub fn encode_text(&self, prompts: &[String]) -> Result<Conditioning, DiffusionError> {
        Ok(self.encode(prompts)?.0)
    }

    /// The negative prompts' conditioning: their encoding, or zeros for an
    /// empty negative when the model says so (SDXL's
    /// `force_zeros_for_empty_prompt`).
    /// `prompts` is the batch's prompt conditioning, whose shape the zeros take
    /// when no negative needs encoding.
    fn encode_negatives(
        &self,
        negatives: &[String],
        prompts: &Conditioning,
    ) -> Result<Conditioning, DiffusionError> {
        let zeros = self.folder.force_zeros_for_empty_prompt;
        if zeros && negatives.iter().all(String::is_empty) {
            return Ok(Conditioning {
                context: prompts.context.zeros_like()?,
                pooled: prompts
                    .pooled
                    .as_ref()
                    .map(Tensor::zeros_like)
                    .transpose()?,
            });
        }
        let enc = self.encode(negatives)?.0;
        if !zeros {
            return Ok(enc);
        }
        let keep: Vec<f32> = negatives
            .iter()
            .map(|n| if n.is_empty() { 0.0 } else { 1.0 })
            .collect();
        let keep = Tensor::from_vec(keep, negatives.len(), &self.options.device)?;
        let zero_empty = |t: &Tensor| -> candle_core::Result<Tensor> {
            let mut shape = vec![negatives.len()];
            shape.resize(t.rank(), 1);
            t.broadcast_mul(&keep.to_dtype(t.dtype())?.reshape(shape)?)
        };
        Ok(Conditioning {
            context: zero_empty(&enc.context)?,
            pooled: enc.pooled.as_ref().map(zero_empty).transpose()?,
        })
    }

    /// The UNet's raw prediction for latents (f32) at timestep `t`. `added`
    /// is SDXL's pooled text and size ids (see [`size_ids`]).
    pub fn predict(
        &self,
        latents: &Tensor,
        t: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor, DiffusionError> {
        let mut calls = UnetCalls::new(&self.unet, &self.options.device, GraphMode::Off);
        self.predict_with(&mut calls, latents, t, context, added)
    }

    /// [`predict`](Self::predict) through a render's `calls` (which may
    /// replay a CUDA graph).
    fn predict_with(
        &self,
        calls: &mut UnetCalls,
        latents: &Tensor,
        t: f64,
        context: &Tensor,
        added: Option<&AddedConditioning>,
    ) -> Result<Tensor, DiffusionError> {
        let x = latents
            .to_device(&self.options.device)?
            .to_dtype(self.options.dtype)?;
        Ok(calls.forward(&x, t, context, added)?.to_dtype(DType::F32)?)
    }

    /// Decode latents to images in [0, 1], `(batch, 3, H, W)` f32 on the CPU.
    ///
    /// Images are decoded together, up to [`DECODE_PIXELS`] output pixels
    /// at a time (four 512² images, one 1024² image): batched where that is
    /// cheap, sliced where the decoder's full-size feature maps would not fit.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor, DiffusionError> {
        let (n, _, h, w) = latents.dims4()?;
        let f = self.vae_scale_factor();
        let per_call = (DECODE_PIXELS / (h * f * w * f)).max(1);
        let dtype = vae_dtype(self.folder.family, &self.vae_cfg, self.options.dtype);
        let mut out = Vec::new();
        for start in (0..n).step_by(per_call) {
            let z =
                (latents.narrow(0, start, per_call.min(n - start))? / self.vae_cfg.scaling_factor)?;
            let z = z.to_device(&self.options.device)?.to_dtype(dtype)?;
            let img = self.vae.forward(&z)?.to_dtype(DType::F32)?;
            self.check_finite(&img, "VAE decoder")?;
            out.push(
                ((img / 2.0)? + 0.5)?
                    .clamp(0f32, 1f32)?
                    .to_device(&Device::Cpu)?,
            );
        }
        Ok(Tensor::cat(&out, 0)?)
    }

    fn vae_encoder(&self) -> Result<&vae::Encoder, DiffusionError> {
        self.vae_encoder
            .get_or_init(|| {
                let opts = LoadOptions {
                    dtype: vae_dtype(self.folder.family, &self.vae_cfg, self.options.dtype),
                    ..self.options.clone()
                };
                let vb = var_builder(&self.folder.vae, &opts).map_err(|e| e.to_string())?;
                vae::Encoder::new(vb, &self.vae_cfg, self.options.conv_algorithm)
                    .map_err(|e| load_err("vae encoder", &self.folder.vae, e).to_string())
            })
            .as_ref()
            .map_err(|e| DiffusionError::BadModel(e.clone()))
    }

    /// Latents of an image (img2img), sampled with `rng`.
    fn encode_image(
        &self,
        img: &RgbImage,
        rng: &mut NoiseGenerator,
    ) -> Result<Tensor, DiffusionError> {
        self.encode_pixels(&pixels_of(img)?, rng)
    }

    /// Latents of `(1, 3, H, W)` pixels in [-1, 1] (f32, on the CPU),
    /// sampled from the VAE's distribution with `rng`.
    fn encode_pixels(
        &self,
        x: &Tensor,
        rng: &mut NoiseGenerator,
    ) -> Result<Tensor, DiffusionError> {
        let x = x.to_device(&self.options.device)?.to_dtype(vae_dtype(
            self.folder.family,
            &self.vae_cfg,
            self.options.dtype,
        ))?;
        let (mean, std) = self.vae_encoder()?.forward(&x)?;
        let mean = mean.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let std = std.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let noise = Tensor::from_vec(rng.normals(mean.elem_count()), mean.shape(), &Device::Cpu)?;
        Ok(((mean + (std * noise)?)? * self.vae_cfg.scaling_factor)?)
    }

    /// The first latents of an inpainting run, and what its steps need.
    /// Each sample's generator draws as diffusers' inpainting pipeline does:
    /// the init image's latents (where they are used), the noise, then the
    /// masked image's latents.
    fn start_inpainting(
        &self,
        req: &GenerateRequest,
        sampler: &Sampler,
        rngs: &mut Vec<NoiseGenerator>,
        noise: &dyn Fn(&mut Vec<NoiseGenerator>) -> candle_core::Result<Tensor>,
    ) -> Result<(Tensor, Inpainting), DiffusionError> {
        let dev = &self.options.device;
        let (Some(images), Some(masks)) = (&req.init_images, &req.masks) else {
            return Err(DiffusionError::BadRequest(
                "inpainting needs init images and masks".into(),
            ));
        };
        let f = self.vae_scale_factor();
        let (lh, lw) = (req.height / f, req.width / f);
        let start = sampler.start_index(req.strength);
        if masks.len() != images.len() {
            return Err(DiffusionError::BadRequest(format!(
                "{} masks for {} init images",
                masks.len(),
                images.len()
            )));
        }
        for m in masks {
            check_size("mask", m.dimensions(), req)?;
        }
        // diffusers starts from pure noise at strength 1 (exactly).
        let from_noise = req.strength == 1.0;
        let pixels = images
            .iter()
            .map(pixels_of)
            .collect::<Result<Vec<_>, _>>()?;
        let bins = masks
            .iter()
            .map(binary_mask)
            .collect::<Result<Vec<_>, _>>()?;
        let x0 = if !self.inpainting_unet || !from_noise {
            let mut x0 = Vec::with_capacity(images.len());
            for (px, rng) in pixels.iter().zip(rngs.iter_mut()) {
                x0.push(self.encode_pixels(px, rng)?);
            }
            Some(Tensor::cat(&x0, 0)?.to_device(dev)?)
        } else {
            None
        };
        let n = noise(rngs)?;
        let mut masked = Vec::with_capacity(images.len());
        for ((px, bin), rng) in pixels.iter().zip(&bins).zip(rngs.iter_mut()) {
            if self.inpainting_unet {
                let kept = px.broadcast_mul(&(1.0 - bin)?)?;
                masked.push(self.encode_pixels(&kept, rng)?);
            } else {
                // diffusers encodes the masked image for any unet; only an
                // inpainting one uses it. Its draw is kept, so that the
                // steps' noise is the same as there.
                rng.normals(self.latent_channels() * lh * lw);
            }
        }
        let mask = Tensor::cat(
            &bins
                .iter()
                .map(|m| latent_mask(m, lh, lw))
                .collect::<Result<Vec<_>, _>>()?,
            0,
        )?
        .to_device(dev)?;
        let latents = match &x0 {
            Some(x0) if !from_noise => sampler.add_noise(x0, &n, start)?,
            _ => (&n * sampler.init_noise_sigma())?,
        };
        let state = match x0 {
            Some(x0) if !self.inpainting_unet => Inpainting::Reset {
                kept: (1.0 - &mask)?,
                repainted: mask,
                x0,
                noise: n,
            },
            _ => {
                let masked = Tensor::cat(&masked, 0)?.to_device(dev)?;
                Inpainting::Channels(Tensor::cat(&[&mask, &masked], 1)?)
            }
        };
        Ok((latents, state))
    }

    fn check_finite(&self, t: &Tensor, stage: &'static str) -> Result<(), DiffusionError> {
        let s = t
            .abs()?
            .sum_all()?
            .to_dtype(DType::F32)?
            .to_scalar::<f32>()?;
        if s.is_finite() {
            return Ok(());
        }
        let hint = match self.options.dtype {
            DType::F16 => "; an fp16 overflow: run this model in bf16 or f32".to_string(),
            _ => String::new(),
        };
        Err(DiffusionError::NonFinite { stage, hint })
    }

    /// Render a batch. `progress` receives the fraction of steps done.
    pub fn generate(
        &self,
        req: &GenerateRequest,
        progress: &dyn Fn(f32),
    ) -> Result<Generation, DiffusionError> {
        let b = req.samples.len();
        let f = self.vae_scale_factor();
        if b == 0 {
            return Err(DiffusionError::BadRequest("the batch is empty".into()));
        }
        if req.width == 0
            || req.height == 0
            || !req.width.is_multiple_of(8)
            || !req.height.is_multiple_of(8)
            || !req.width.is_multiple_of(f)
            || !req.height.is_multiple_of(f)
        {
            return Err(DiffusionError::BadRequest(format!(
                "width and height must be positive multiples of 8 (and of the VAE's factor {f}), got {}x{}",
                req.width, req.height
            )));
        }
        let (lh, lw, c) = (req.height / f, req.width / f, self.latent_channels());
        let cpu = Device::Cpu;
        if req.init_images.is_none() {
            self.folder.check_draws_from_noise()?;
        }

        // 1. Text: the prompts, and the negatives when guidance is on.
        let guided = req.guidance > 1.0;
        let prompts: Vec<String> = req.samples.iter().map(|s| s.prompt.clone()).collect();
        let (cond, truncated) = self.encode(&prompts)?;
        let cond = if guided {
            let negatives: Vec<String> = req.samples.iter().map(|s| s.negative.clone()).collect();
            let uncond = self.encode_negatives(&negatives, &cond)?;
            Conditioning {
                context: Tensor::cat(&[uncond.context, cond.context], 0)?,
                pooled: match (uncond.pooled, cond.pooled) {
                    (Some(u), Some(c)) => Some(Tensor::cat(&[u, c], 0)?),
                    _ => None,
                },
            }
        } else {
            cond
        };
        let rows = if guided { 2 * b } else { b };
        let added = match cond.pooled {
            Some(pooled) => Some(AddedConditioning {
                pooled,
                time_ids: if self.folder.refiner {
                    aesthetic_ids(b, guided, req.width, req.height)?
                } else {
                    size_ids(rows, req.width, req.height)?
                },
            }),
            None => None,
        };
        let context = cond.context;

        // 2. Initial latents: given, seeded noise, or a noised image. Noise
        // is drawn on the CPU (the same on every device), then moved.
        let dev = &self.options.device;
        let mut sampler = Sampler::new(req.scheduler, &self.scheduler_cfg, req.steps)?;
        let mut rngs: Vec<NoiseGenerator> = req
            .samples
            .iter()
            .map(|s| NoiseGenerator::new(s.seed))
            .collect();
        let noise = |rngs: &mut Vec<NoiseGenerator>| -> candle_core::Result<Tensor> {
            let rows = rngs
                .iter_mut()
                .map(|r| Tensor::from_vec(r.normals(c * lh * lw), (1, c, lh, lw), &cpu))
                .collect::<candle_core::Result<Vec<_>>>()?;
            Tensor::cat(&rows, 0)?.to_device(dev)
        };
        let mut start = 0;
        if req.masks.is_some() && req.init_images.is_none() {
            return Err(DiffusionError::BadRequest(
                "inpainting masks without init images: a mask says which part of an init image to repaint".into(),
            ));
        }
        if self.inpainting_unet && req.masks.is_none() {
            return Err(DiffusionError::BadRequest(format!(
                "{} is an inpainting model (its unet takes a mask): give it an init image and a mask",
                self.folder.root.display()
            )));
        }
        let mut inpaint = None;
        let mut latents = if let Some(images) = &req.init_images {
            if images.len() != b {
                return Err(DiffusionError::BadRequest(format!(
                    "{} init images for {b} samples",
                    images.len()
                )));
            }
            if !(req.strength > 0.0 && req.strength <= 1.0) {
                return Err(DiffusionError::BadRequest(format!(
                    "strength must be in (0, 1], got {}",
                    req.strength
                )));
            }
            start = sampler.start_index(req.strength);
            if start >= sampler.timesteps().len() {
                return Err(DiffusionError::BadRequest(format!(
                    "strength {} with {} steps leaves no step to run",
                    req.strength, req.steps
                )));
            }
            for img in images {
                check_size("init image", img.dimensions(), req)?;
            }
            if req.masks.is_some() {
                let (x, state) = self.start_inpainting(req, &sampler, &mut rngs, &noise)?;
                inpaint = Some(state);
                x
            } else {
                let mut x0 = Vec::with_capacity(b);
                for (img, rng) in images.iter().zip(rngs.iter_mut()) {
                    x0.push(self.encode_image(img, rng)?);
                }
                let x0 = Tensor::cat(&x0, 0)?.to_device(dev)?;
                let n = noise(&mut rngs)?;
                sampler.add_noise(&x0, &n, start)?
            }
        } else {
            let x = match &req.init_latents {
                Some(l) => {
                    if l.dims() != [b, c, lh, lw] {
                        return Err(DiffusionError::BadRequest(format!(
                            "initial latents have shape {:?}, this request needs [{b}, {c}, {lh}, {lw}]",
                            l.dims()
                        )));
                    }
                    l.to_dtype(DType::F32)?.to_device(dev)?
                }
                None => noise(&mut rngs)?,
            };
            (x * sampler.init_noise_sigma())?
        };

        // 3. Denoise (latents stay f32 on the device; the UNet runs in the
        // compute type).
        let steps = sampler.timesteps().len();
        let total = steps - start;
        // The calls (and a recorded graph's memory) end with the loop,
        // before the VAE needs room.
        {
            let mut calls = UnetCalls::new(&self.unet, dev, GraphMode::from_env());
            for i in start..steps {
                let t = sampler.timesteps()[i];
                let input = sampler.scale_model_input(&latents, i)?;
                // An inpainting unet also sees the mask and the masked image.
                let input = match &inpaint {
                    Some(Inpainting::Channels(extra)) => Tensor::cat(&[&input, extra], 1)?,
                    _ => input,
                };
                let input = if guided {
                    Tensor::cat(&[&input, &input], 0)?
                } else {
                    input
                };
                let pred = self.predict_with(&mut calls, &input, t, &context, added.as_ref())?;
                let pred = if guided {
                    let (u, t) = (pred.narrow(0, 0, b)?, pred.narrow(0, b, b)?);
                    (&u + ((t - &u)? * req.guidance)?)?
                } else {
                    pred
                };
                latents = sampler.step(&pred, i, &latents, &mut || noise(&mut rngs))?;
                // Any other unet: what the mask keeps is reset to the init
                // image, noised to the next step's level (clean after the last).
                if let Some(Inpainting::Reset {
                    x0,
                    noise: n,
                    kept,
                    repainted,
                }) = &inpaint
                {
                    let init = if i + 1 < steps {
                        sampler.add_noise(x0, n, i + 1)?
                    } else {
                        x0.clone()
                    };
                    latents = (init.broadcast_mul(kept)? + latents.broadcast_mul(repainted)?)?;
                }
                progress((i + 1 - start) as f32 / total as f32);
            }
        }
        self.check_finite(&latents, "UNet")?;

        // 4. Decode.
        let pixels = self.decode(&latents)?;
        let images = to_images(&pixels)?;
        Ok(Generation {
            images,
            latents: latents.to_device(&cpu)?,
            truncated,
        })
    }
}

/// `(batch, 3, H, W)` values in [0, 1] to 8-bit RGB images (rounded as
/// diffusers does).
pub fn to_images(pixels: &Tensor) -> Result<Vec<RgbImage>, DiffusionError> {
    let (b, _, h, w) = pixels.dims4()?;
    let data = (pixels.permute((0, 2, 3, 1))? * 255.0)?
        .round()?
        .clamp(0f32, 255f32)?
        .to_dtype(DType::U8)?
        .flatten_all()?
        .to_vec1::<u8>()?;
    let per = h * w * 3;
    Ok((0..b)
        .map(|i| {
            RgbImage::from_raw(w as u32, h as u32, data[i * per..(i + 1) * per].to_vec())
                .expect("buffer sized from the tensor")
        })
        .collect())
}

/// An RGB image as `(1, 3, H, W)` values in [-1, 1] (f32, on the CPU), as
/// the VAE's encoder takes it.
fn pixels_of(img: &RgbImage) -> Result<Tensor, DiffusionError> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(
        Tensor::from_vec(data, (1, h as usize, w as usize, 3), &Device::Cpu)?
            .permute((0, 3, 1, 2))?,
    )
}

/// A mask binarised as diffusers does (≥ 50 % grey repaints): 1 where the
/// image is repainted, 0 where it is kept, `(1, 1, H, W)` f32 on the CPU.
fn binary_mask(mask: &GrayImage) -> Result<Tensor, DiffusionError> {
    let (w, h) = mask.dimensions();
    let data: Vec<f32> = mask
        .as_raw()
        .iter()
        .map(|&v| if v >= 128 { 1.0 } else { 0.0 })
        .collect();
    Ok(Tensor::from_vec(
        data,
        (1, 1, h as usize, w as usize),
        &Device::Cpu,
    )?)
}

/// A binary mask `(1, 1, H, W)` brought to the latents' `lh`×`lw` by
/// nearest neighbour (PyTorch's `interpolate` default: each cell takes the
/// pixel at its top-left corner).
fn latent_mask(mask: &Tensor, lh: usize, lw: usize) -> Result<Tensor, DiffusionError> {
    let (_, _, h, w) = mask.dims4()?;
    let rows = Tensor::new(
        (0..lh).map(|y| (y * h / lh) as u32).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    let cols = Tensor::new(
        (0..lw).map(|x| (x * w / lw) as u32).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    Ok(mask.index_select(&rows, 2)?.index_select(&cols, 3)?)
}

/// What an inpainting run's steps need.
enum Inpainting {
    /// An inpainting unet's extra input channels: the mask at the latents'
    /// size and the masked image's latents.
    Channels(Tensor),
    /// Any other unet: the kept region is reset at each step to the init
    /// image's latents `x0`, noised with the first `noise`.
    Reset {
        x0: Tensor,
        noise: Tensor,
        /// The mask at the latents' size, `(batch, 1, h, w)`, both ways
        /// round (made once, not at every step): 1 where the init image is
        /// kept, and 1 where the image is repainted.
        kept: Tensor,
        repainted: Tensor,
    },
}

/// Refuses an init image or mask whose size is not the request's.
fn check_size(what: &str, (w, h): (u32, u32), req: &GenerateRequest) -> Result<(), DiffusionError> {
    if w as usize != req.width || h as usize != req.height {
        return Err(DiffusionError::BadRequest(format!(
            "{what} is {w}x{h}, the request {}x{}",
            req.width, req.height
        )));
    }
    Ok(())
}
