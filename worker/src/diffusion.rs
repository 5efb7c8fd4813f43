//! The `diffusion` engine: Stable Diffusion models from diffusers folders,
//! rendered with `hallmark-diffusion`, plus the super-resolution stage
//! (Real-ESRGAN or the hires fix). Models are hashed at start (the digest
//! the coordinator checks against the registry) and again whenever one is
//! loaded into the cache, so weights changed on disk are refused.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Tensor};
use hallmark_diffusion::cache::ModelCache;
use hallmark_diffusion::esrgan::RrdbNet;
use hallmark_diffusion::hub::{self, HubModel, HubOptions};
use hallmark_diffusion::model::{ModelFolder, sha256_file};
use hallmark_diffusion::upscale::{HiresFix, UpscaleMethod};
use hallmark_diffusion::{
    AttentionChoice, ConvAlgorithm, DiffusionError, GenerateRequest, LoadOptions, Sample,
    SchedulerKind, StableDiffusion,
};
use hallmark_proto::v1::ModelCapability;
use hallmark_provenance::credentials::UpscaleRecord;

use crate::engine::{Engine, EngineError, RenderTask, RenderedImage};
use crate::metrics as m;

/// Settings of the diffusion engine.
#[derive(Debug, Clone)]
pub struct DiffusionConfig {
    /// Model id → diffusers folder.
    pub models: Vec<(String, PathBuf)>,
    /// Real-ESRGAN weights (file or folder) for `esrgan` upscales.
    pub upscaler: Option<PathBuf>,
    pub upscale_method: UpscaleMethod,
    pub hires: HiresFix,
    /// Input tile side of Real-ESRGAN.
    pub esrgan_tile: usize,
    /// Initial latents for generate tasks (row `item_index`, or the only row).
    pub init_latents: Option<PathBuf>,
    /// Memory budget of loaded models, in bytes.
    pub cache_bytes: u64,
    pub device: Device,
    pub dtype: DType,
    /// Weight file variant to prefer (`fp16`).
    pub variant: Option<String>,
    /// The UNet's attention kernel.
    pub attention: AttentionChoice,
    /// The convolutions' cuDNN algorithm (`cudnn` builds).
    pub conv_algorithm: ConvAlgorithm,
}

impl DiffusionConfig {
    pub fn new(models: Vec<(String, PathBuf)>) -> Self {
        Self {
            models,
            upscaler: None,
            upscale_method: UpscaleMethod::Esrgan,
            hires: HiresFix::default(),
            esrgan_tile: 256,
            init_latents: None,
            cache_bytes: 16 << 30,
            device: Device::Cpu,
            dtype: DType::F32,
            variant: None,
            attention: AttentionChoice::Auto,
            conv_algorithm: ConvAlgorithm::default(),
        }
    }
}

/// Command-line settings of the diffusion engine (worker and `hallmark`).
#[derive(clap::Args, Debug, Clone)]
pub struct DiffusionArgs {
    /// A diffusers model to serve, as DIR (id = folder name) or ID=DIR, or
    /// from the Hugging Face Hub as hf:owner/name[@revision] (id = name;
    /// fetched into the Hub cache: HF_HOME, HF_ENDPOINT, HF_TOKEN,
    /// HF_HUB_OFFLINE) (repeatable).
    #[arg(
        long = "model-path",
        env = "HALLMARK_MODEL_PATH",
        value_delimiter = ','
    )]
    pub model_paths: Vec<String>,
    /// Real-ESRGAN weights (.safetensors file or folder) for esrgan upscales.
    #[arg(long, env = "HALLMARK_UPSCALER")]
    pub upscaler: Option<PathBuf>,
    /// Super-resolution method of upscale tasks whose job names none:
    /// esrgan or hires-fix.
    #[arg(
        long = "default-upscale-method",
        env = "HALLMARK_UPSCALE_METHOD",
        default_value = "esrgan"
    )]
    pub default_upscale_method: String,
    /// img2img strength of the hires fix (0.3–0.5 keeps the composition).
    #[arg(long, default_value_t = 0.4)]
    pub hires_strength: f64,
    /// Steps of the hires fix's img2img pass.
    #[arg(long, default_value_t = 20)]
    pub hires_steps: usize,
    /// Input tile side of Real-ESRGAN (smaller uses less memory).
    #[arg(long, default_value_t = 256)]
    pub esrgan_tile: usize,
    /// Initial latents (.safetensors or .npy) for generate tasks, by item.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "HALLMARK_DEVICE", default_value = "cpu")]
    pub device: String,
    /// Compute type: f32, f16 or bf16 (f16/bf16 on GPUs).
    #[arg(long, env = "HALLMARK_DTYPE", default_value = "f32")]
    pub dtype: String,
    /// Weight file variant to prefer, e.g. fp16.
    #[arg(long)]
    pub variant: Option<String>,
    /// Memory budget for loaded models, in GiB.
    #[arg(long, default_value_t = 16.0)]
    pub model_cache_gb: f64,
    /// The UNet's attention: auto (FlashAttention-2 in a flash-attn build,
    /// else the engine's own fused kernel, where the device and type allow
    /// them, else matmul), matmul, flash or fused.
    #[arg(long, env = "HALLMARK_ATTENTION", default_value = "auto")]
    pub attention: String,
    /// The convolutions' algorithm: in a cudnn build cuDNN's
    /// (winograd-nonfused, implicit-precomp-gemm, implicit-gemm, heuristic)
    /// or the own im2col (im2col); on the CPU winograd-nonfused runs the 3×3
    /// stride-1 convolutions by the own Winograd, any other the own im2col.
    #[arg(
        long = "conv-algo",
        env = "HALLMARK_CONV_ALGO",
        default_value = "winograd-nonfused"
    )]
    pub conv_algorithm: String,
}

impl DiffusionArgs {
    pub fn config(&self) -> anyhow::Result<DiffusionConfig> {
        if self.model_paths.is_empty() {
            anyhow::bail!(
                "the diffusion engine needs at least one --model-path DIR (a diffusers folder)"
            );
        }
        let models = self
            .model_paths
            .iter()
            .map(|m| {
                let (id, reference) = match m.split_once('=') {
                    Some((id, r)) if !id.is_empty() && !m.starts_with("hf:") => (Some(id), r),
                    _ => (None, m.as_str()),
                };
                // A Hub model is fetched (or found in the Hub cache) now.
                let hub = HubModel::parse(reference).transpose()?;
                let dir = match &hub {
                    Some(h) => hub::fetch(h, self.variant.as_deref(), &HubOptions::from_env())?,
                    None => PathBuf::from(reference),
                };
                let id = match (id, &hub) {
                    (Some(id), _) => id.to_string(),
                    (None, Some(h)) => h.name().to_string(),
                    (None, None) => dir
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_else(|| m.clone()),
                };
                Ok((id, dir))
            })
            .collect::<anyhow::Result<_>>()?;
        let mut cfg = DiffusionConfig::new(models);
        cfg.upscaler = self.upscaler.clone();
        cfg.upscale_method = self.default_upscale_method.parse()?;
        cfg.hires.strength = self.hires_strength;
        cfg.hires.steps = self.hires_steps;
        cfg.esrgan_tile = self.esrgan_tile;
        cfg.init_latents = self.init_latents.clone();
        cfg.device = parse_device(&self.device)?;
        cfg.dtype = parse_dtype(&self.dtype)?;
        cfg.variant = self.variant.clone();
        cfg.cache_bytes = (self.model_cache_gb * (1u64 << 30) as f64) as u64;
        cfg.attention = self.attention.parse()?;
        // Flash attention where it cannot run is refused now, not at the
        // first render.
        cfg.attention.resolve(&cfg.device, cfg.dtype)?;
        cfg.conv_algorithm = self.conv_algorithm.parse()?;
        Ok(cfg)
    }
}

pub use hallmark_diffusion::pipeline::{parse_device, parse_dtype};

struct Served {
    folder: ModelFolder,
    digest: String,
    files: Vec<(String, String)>,
}

pub struct DiffusionEngine {
    config: DiffusionConfig,
    served: HashMap<String, Served>,
    order: Vec<String>,
    cache: Mutex<ModelCache<StableDiffusion>>,
    /// The loaded Real-ESRGAN network and its weights' sha256.
    esrgan: Mutex<Option<(Arc<RrdbNet>, String)>>,
    init_latents: Option<Tensor>,
}

fn failed(e: impl std::fmt::Display) -> EngineError {
    EngineError::Failed(e.to_string())
}

/// Why a batch failed, and whether for want of device memory (then a
/// smaller batch may fit).
struct BatchFailure {
    error: EngineError,
    out_of_memory: bool,
}

impl From<EngineError> for BatchFailure {
    fn from(error: EngineError) -> Self {
        Self {
            error,
            out_of_memory: false,
        }
    }
}

/// Renders a batch of items, reporting progress; see [`in_fitting_batches`].
type RunBatch<'a, T, R> = dyn Fn(&[T], &dyn Fn(f32)) -> Result<Vec<R>, BatchFailure> + 'a;

/// `run` on all of `items` as one batch; where the device runs out of
/// memory, on each half instead (and so on down to single items), so a
/// batch too large for the GPU still renders — every sample keeps its own
/// seed, so the split changes no image beyond rounding — instead of
/// failing every task again on each retry. Results keep the items' order;
/// `progress` runs over the whole batch across the parts.
fn in_fitting_batches<T, R>(
    items: &[T],
    progress: &dyn Fn(f32),
    run: &RunBatch<T, R>,
) -> Result<Vec<R>, EngineError> {
    fn part<T, R>(
        items: &[T],
        done: usize,
        total: usize,
        progress: &dyn Fn(f32),
        run: &RunBatch<T, R>,
    ) -> Result<Vec<R>, EngineError> {
        let n = items.len();
        let part_progress = |p: f32| progress((done as f32 + p * n as f32) / total as f32);
        match run(items, &part_progress) {
            Ok(results) => Ok(results),
            Err(BatchFailure {
                error,
                out_of_memory: true,
            }) if n > 1 => {
                let half = n / 2;
                tracing::warn!(
                    "a batch of {n} ran out of device memory ({error}); rendering it as {half} and {}",
                    n - half
                );
                let mut results = part(&items[..half], done, total, progress, run)?;
                results.extend(part(&items[half..], done + half, total, progress, run)?);
                Ok(results)
            }
            Err(failure) => Err(failure.error),
        }
    }
    part(items, 0, items.len(), progress, run)
}

/// The shape of one item's initial latents for a `width`×`height` render of
/// a model whose VAE has `channels` latent channels and shrinks by `factor`.
pub fn latent_shape(channels: usize, factor: usize, width: u32, height: u32) -> [usize; 4] {
    [
        1,
        channels,
        height as usize / factor,
        width as usize / factor,
    ]
}

/// Checks an `--init-latents` file against a job before anything is
/// submitted: its rows (one, or one per item) and each row's shape.
pub fn check_init_latents(
    path: &std::path::Path,
    model: &ModelFolder,
    width: u32,
    height: u32,
    items: u64,
) -> anyhow::Result<()> {
    let t = hallmark_diffusion::latents::read_latents(path)?;
    let vae = model.vae_config()?;
    let need = latent_shape(vae.latent_channels, vae.scale_factor(), width, height);
    let rows = t.dims()[0] as u64;
    if t.dims()[1..] != need[1..] {
        anyhow::bail!(
            "--init-latents {}: latents of shape {:?}, but a {width}x{height} render of {} needs {:?} for each image",
            path.display(),
            t.dims(),
            model.root.display(),
            need
        );
    }
    if rows != 1 && rows < items {
        anyhow::bail!(
            "--init-latents {}: {rows} rows of latents for {items} images; give one row for all or one per image",
            path.display()
        );
    }
    Ok(())
}

impl DiffusionEngine {
    /// Open and hash every model folder, check the upscaler's weights file
    /// (and read the initial latents).
    pub fn new(config: DiffusionConfig) -> Result<Self, DiffusionError> {
        let mut served = HashMap::new();
        let mut order = Vec::new();
        for (id, path) in &config.models {
            let folder = ModelFolder::open(path, config.variant.as_deref())?;
            let files = folder.hash_weights()?;
            let digest = hallmark_provenance::weights_digest(
                files.iter().map(|(p, s)| (p.as_str(), s.as_str())),
            );
            tracing::info!(model = %id, path = %path.display(), %digest, "serving model");
            order.push(id.clone());
            served.insert(
                id.clone(),
                Served {
                    folder,
                    digest,
                    files,
                },
            );
        }
        // The upscaler loads at its first task; a missing or broken file
        // is refused now, as the models are.
        if let Some(path) = &config.upscaler {
            let weights = hallmark_diffusion::esrgan::find_weights(path)?;
            hallmark_diffusion::model::check_safetensors(&weights)?;
        }
        let init_latents = config
            .init_latents
            .as_deref()
            .map(hallmark_diffusion::latents::read_latents)
            .transpose()?;
        Ok(Self {
            cache: Mutex::new(ModelCache::new(config.cache_bytes)),
            esrgan: Mutex::new(None),
            config,
            served,
            order,
            init_latents,
        })
    }

    /// The loaded model for `id`, loading it (after re-checking its weights)
    /// when it is not cached.
    fn model(&self, id: &str) -> Result<Arc<StableDiffusion>, EngineError> {
        let served = self
            .served
            .get(id)
            .ok_or_else(|| EngineError::UnknownModel(id.to_string()))?;
        let mut cache = self.cache.lock().expect("model cache lock");
        let held_before = cache.held();
        let model = cache
            .get_or_load(id, served.folder.weights_size(), || {
                let started = std::time::Instant::now();
                served.folder.verify_weights(&served.files)?;
                let loaded = StableDiffusion::load(
                    served.folder.clone(),
                    LoadOptions {
                        device: self.config.device.clone(),
                        dtype: self.config.dtype,
                        variant: self.config.variant.clone(),
                        attention: self.config.attention,
                        conv_algorithm: self.config.conv_algorithm,
                    },
                );
                metrics::histogram!(m::MODEL_LOAD_SECONDS, "model" => id.to_string())
                    .record(started.elapsed());
                loaded
            })
            .map_err(failed);
        let held = cache.held();
        let evicted = held_before.iter().filter(|k| !held.contains(k)).count();
        if evicted > 0 {
            metrics::counter!(m::MODEL_EVICTIONS).increment(evicted as u64);
        }
        metrics::gauge!(m::MODELS_LOADED).set(held.len() as f64);
        metrics::gauge!(m::MODEL_CACHE_BYTES).set(cache.used() as f64);
        model
    }

    fn upscaler(&self) -> Result<(Arc<RrdbNet>, String), EngineError> {
        let mut slot = self.esrgan.lock().expect("upscaler lock");
        if let Some(loaded) = slot.as_ref() {
            return Ok(loaded.clone());
        }
        let path = self.config.upscaler.as_ref().ok_or_else(|| {
            EngineError::Failed(
                "an esrgan upscale needs Real-ESRGAN weights (--upscaler PATH)".into(),
            )
        })?;
        let net = Arc::new(
            RrdbNet::load_with(
                path,
                &self.config.device,
                self.config.dtype,
                self.config.conv_algorithm,
            )
            .map_err(failed)?,
        );
        let digest = sha256_file(&net.weights.path).map_err(failed)?;
        *slot = Some((net.clone(), digest.clone()));
        Ok((net, digest))
    }

    fn init_latents_path(&self) -> String {
        self.config
            .init_latents
            .as_deref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    fn init_latents_for(&self, item: u64) -> Result<Option<Tensor>, EngineError> {
        let Some(all) = &self.init_latents else {
            return Ok(None);
        };
        let rows = all.dim(0).map_err(failed)? as u64;
        let row = if rows == 1 { 0 } else { item };
        if row >= rows {
            return Err(EngineError::Failed(format!(
                "the initial latents file has {rows} rows; item {item} has none"
            )));
        }
        Ok(Some(all.narrow(0, row as usize, 1).map_err(failed)?))
    }

    /// Tasks of one batch that also share guidance and sampler.
    fn generate(
        &self,
        tasks: &[&RenderTask],
        progress: &dyn Fn(f32),
    ) -> Result<Vec<RenderedImage>, BatchFailure> {
        let l = &tasks[0].lease;
        let sd = self.model(&l.model_id)?;
        let samples = tasks
            .iter()
            .map(|t| Sample {
                prompt: t.lease.prompt.clone(),
                negative: t.lease.negative_prompt.clone(),
                seed: t.lease.seed,
            })
            .collect();
        let mut req = GenerateRequest::new(samples, l.width as usize, l.height as usize);
        req.steps = l.steps as usize;
        req.guidance = l.guidance as f64;
        req.scheduler = l.scheduler.parse::<SchedulerKind>().map_err(failed)?;
        // Given initial latents replace a text-to-image render's noise; a
        // refine noises its base image with its own seed.
        if self.init_latents.is_some() && l.stage == "generate" {
            let rows = tasks
                .iter()
                .map(|t| self.init_latents_for(t.lease.item_index))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .collect::<Vec<_>>();
            // The latents are this worker's, not the task's: latents of
            // the wrong shape fail the task here, where another worker may
            // render it, not as a request at fault (for good).
            let need = latent_shape(
                sd.latent_channels(),
                sd.vae_scale_factor(),
                l.width,
                l.height,
            );
            if let Some(row) = rows.iter().find(|r| r.dims() != need) {
                return Err(EngineError::Failed(format!(
                    "this worker's --init-latents {} holds latents of {:?} per item; a {}x{} render of model {} needs {need:?}",
                    self.init_latents_path(),
                    row.dims(),
                    l.width,
                    l.height,
                    l.model_id
                ))
                .into());
            }
            req.init_latents = Some(Tensor::cat(&rows, 0).map_err(failed)?);
        }
        // img2img: the group shares its strength and size (the sub-batch
        // key).
        let inits = decoded_once(tasks, RenderTask::init_image)?;
        if inits.iter().any(Option::is_some) {
            req.init_images = Some(
                inits
                    .into_iter()
                    .map(|i| i.ok_or(EngineError::MissingParent))
                    .collect::<Result<_, _>>()?,
            );
            req.strength = l.strength;
        }
        // Inpainting: the group all has masks (the sub-batch key).
        if tasks[0].inpaints() {
            req.masks = Some(
                decoded_once(tasks, RenderTask::mask)?
                    .into_iter()
                    .map(|m| {
                        m.ok_or_else(|| {
                            EngineError::Invalid(
                                "an inpainting batch with a task without a mask".into(),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            );
        }
        let out = sd.generate(&req, progress).map_err(|e| BatchFailure {
            out_of_memory: e.is_out_of_device_memory(),
            error: match e {
                DiffusionError::BadRequest(m) => EngineError::Invalid(m),
                e => failed(e),
            },
        })?;
        Ok(out.images.into_iter().map(RenderedImage::from).collect())
    }

    fn upscale(
        &self,
        task: &RenderTask,
        progress: &dyn Fn(f32),
    ) -> Result<RenderedImage, EngineError> {
        let l = &task.lease;
        let parent = task.parent.as_deref().ok_or(EngineError::MissingParent)?;
        let base = hallmark_provenance::credentials::decode_image(parent)
            .map_err(|e| EngineError::BadParent(e.to_string()))?;
        let factor = l.upscale.max(1);
        // The job's method, else this worker's default.
        let method = match l.upscale_method.as_str() {
            "" => self.config.upscale_method,
            m => m.parse().map_err(failed)?,
        };
        let mut record = UpscaleRecord {
            method: method.name().into(),
            factor,
            ..Default::default()
        };
        let pixels = match method {
            UpscaleMethod::Esrgan => {
                let (net, digest) = self.upscaler()?;
                record.weights_sha256 = Some(digest);
                hallmark_diffusion::upscale::esrgan(&net, &base, factor, self.config.esrgan_tile)
                    .map_err(failed)?
            }
            UpscaleMethod::HiresFix => {
                let sd = self.model(&l.model_id)?;
                let mut cfg = self.config.hires.clone();
                cfg.guidance = l.guidance as f64;
                if let Ok(s) = l.scheduler.parse() {
                    cfg.scheduler = s;
                }
                let sample = Sample {
                    prompt: l.prompt.clone(),
                    negative: l.negative_prompt.clone(),
                    seed: l.seed,
                };
                record.strength = Some(cfg.strength);
                record.steps = Some(cfg.steps as u32);
                hallmark_diffusion::upscale::hires_fix(&sd, &base, factor, &sample, &cfg, progress)
                    .map_err(failed)?
            }
        };
        Ok(RenderedImage {
            pixels,
            upscale: Some(record),
        })
    }
}

impl Engine for DiffusionEngine {
    fn name(&self) -> &str {
        "diffusion"
    }

    fn models(&self) -> Vec<ModelCapability> {
        self.order
            .iter()
            .map(|id| ModelCapability {
                model_id: id.clone(),
                weights_sha256: self.served[id].digest.clone(),
                refines_only: self.served[id].folder.refiner,
                inpaints_only: self.served[id].folder.is_inpainting().unwrap_or(false),
            })
            .collect()
    }

    fn loaded_model(&self) -> String {
        self.cache
            .lock()
            .expect("model cache lock")
            .held()
            .into_iter()
            .next()
            .unwrap_or_default()
    }

    fn render(
        &self,
        batch: &[RenderTask],
        progress: &dyn Fn(f32),
    ) -> Vec<Result<RenderedImage, EngineError>> {
        let mut results: Vec<Option<Result<RenderedImage, EngineError>>> =
            (0..batch.len()).map(|_| None).collect();
        // Sub-batches of tasks that share everything the sampler needs.
        let mut groups: Vec<(String, Vec<usize>)> = Vec::new();
        for (i, t) in batch.iter().enumerate() {
            let l = &t.lease;
            let key = format!(
                "{}|{}|{}x{}|{}|{}|{}|{}|{}|{}",
                l.stage,
                l.model_id,
                l.width,
                l.height,
                l.steps,
                l.guidance,
                l.scheduler,
                l.strength,
                l.parent_sha256.is_empty(),
                t.inpaints()
            );
            match groups.iter_mut().find(|(k, _)| *k == key) {
                Some((_, v)) => v.push(i),
                None => groups.push((key, vec![i])),
            }
        }
        let n = groups.len() as f32;
        for (g, (_, idx)) in groups.iter().enumerate() {
            let sub_progress = |p: f32| progress((g as f32 + p) / n);
            let stage = batch[idx[0]].lease.stage.as_str();
            match stage {
                // A refine is img2img from its base image, on the
                // sampler path a generate takes.
                "generate" | "refine" => {
                    let tasks: Vec<&RenderTask> = idx.iter().map(|&i| &batch[i]).collect();
                    match in_fitting_batches(&tasks, &sub_progress, &|part, progress| {
                        self.generate(part, progress)
                    }) {
                        Ok(images) => {
                            for (&i, img) in idx.iter().zip(images) {
                                results[i] = Some(Ok(img));
                            }
                        }
                        Err(e) => {
                            let msg = e.to_string();
                            for &i in idx {
                                results[i] = Some(Err(match &e {
                                    EngineError::UnknownModel(m) => {
                                        EngineError::UnknownModel(m.clone())
                                    }
                                    EngineError::Invalid(_) => EngineError::Invalid(msg.clone()),
                                    _ => EngineError::Failed(msg.clone()),
                                }));
                            }
                        }
                    }
                }
                "upscale" => {
                    for &i in idx {
                        results[i] = Some(self.upscale(&batch[i], &sub_progress));
                    }
                }
                other => {
                    for &i in idx {
                        results[i] = Some(Err(EngineError::UnknownStage(other.to_string())));
                    }
                }
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every task has a result"))
            .collect()
    }
}

/// Each task's picture read by `read` (its init image or mask, decoded and
/// resized), once per distinct `RenderTask::pictures_key`: the tasks of a
/// batch often share one.
fn decoded_once<I: Clone>(
    tasks: &[&RenderTask],
    read: impl Fn(&RenderTask) -> Result<Option<I>, EngineError>,
) -> Result<Vec<Option<I>>, EngineError> {
    let mut decoded: HashMap<String, I> = HashMap::new();
    let mut out = Vec::with_capacity(tasks.len());
    for &t in tasks {
        let key = t.pictures_key();
        let img = match decoded.get(&key) {
            Some(img) => Some(img.clone()),
            None => {
                let img = read(t)?;
                if let Some(img) = &img {
                    decoded.insert(key, img.clone());
                }
                img
            }
        };
        out.push(img);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        diffusion: DiffusionArgs,
    }

    fn config(extra: &[&str]) -> anyhow::Result<DiffusionConfig> {
        let args = ["worker", "--model-path", "m=/models/m"]
            .iter()
            .chain(extra);
        Cli::try_parse_from(args)?.diffusion.config()
    }

    /// A tiny checkpoint of `arch` in `dir/name`, with the real CLIP vocabulary.
    fn tiny(dir: &std::path::Path, name: &str, arch: &str) -> PathBuf {
        let vocab = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/data/clip/bpe_simple_vocab_16e6.txt.gz");
        let path = dir.join(name);
        hallmark_diffusion::tiny::init_tiny(&path, arch.parse().unwrap(), 3, Some(&vocab)).unwrap();
        path
    }

    fn generate_task(model: &str, width: u32, height: u32) -> RenderTask {
        RenderTask {
            lease: hallmark_proto::v1::TaskLease {
                model_id: model.into(),
                stage: "generate".into(),
                prompt: "a red fox".into(),
                seed: 1,
                width,
                height,
                steps: 2,
                guidance: 1.0,
                scheduler: "ddim".into(),
                ..Default::default()
            },
            parent: None,
            mask: None,
        }
    }

    #[test]
    fn a_refiner_is_declared_so_and_fails_for_good_when_asked_to_draw_from_noise() {
        let dir = tempfile::tempdir().unwrap();
        let refiner = tiny(dir.path(), "r", "sdxl-refiner");
        let sd = tiny(dir.path(), "sd", "sd1");
        let inpainting = tiny(dir.path(), "ip", "sd1-inpaint");
        let engine = DiffusionEngine::new(DiffusionConfig::new(vec![
            ("r".into(), refiner),
            ("sd".into(), sd),
            ("ip".into(), inpainting),
        ]))
        .unwrap();
        let declared: Vec<_> = engine
            .models()
            .iter()
            .map(|m| (m.model_id.clone(), m.refines_only, m.inpaints_only))
            .collect();
        assert_eq!(
            declared,
            [
                ("r".into(), true, false),
                ("sd".into(), false, false),
                ("ip".into(), false, true)
            ]
        );
        // Asked to draw from noise, the inpainting model fails for good too.
        let err = engine
            .render(&[generate_task("ip", 64, 64)], &|_| {})
            .remove(0)
            .unwrap_err();
        assert!(err.is_final(), "no retry can change it: {err}");
        assert!(err.to_string().contains("inpainting model"), "{err}");
        let err = engine
            .render(&[generate_task("r", 64, 64)], &|_| {})
            .remove(0)
            .unwrap_err();
        assert!(err.is_final(), "no retry can change it: {err}");
        assert!(err.to_string().contains("SDXL refiner"), "{err}");
    }

    #[test]
    fn this_workers_own_latents_of_another_shape_fail_a_task_for_another_worker() {
        let dir = tempfile::tempdir().unwrap();
        let sd = tiny(dir.path(), "sd", "sd1");
        let latents = dir.path().join("latents.safetensors");
        let t = Tensor::ones((1, 4, 8, 8), DType::F32, &Device::Cpu).unwrap();
        t.save_safetensors("latents", &latents).unwrap();
        let mut cfg = DiffusionConfig::new(vec![("sd".into(), sd)]);
        cfg.init_latents = Some(latents.clone());
        let engine = DiffusionEngine::new(cfg).unwrap();
        // 64² is 8×8 latent cells: it renders from them.
        let fits = engine
            .render(&[generate_task("sd", 64, 64)], &|_| {})
            .remove(0);
        assert!(fits.is_ok(), "{:?}", fits.err());
        // 96² needs 12×12: the task fails, naming the file, but not for
        // good — a worker without the file renders it.
        let err = engine
            .render(&[generate_task("sd", 96, 96)], &|_| {})
            .remove(0)
            .unwrap_err();
        assert!(!err.is_final(), "{err}");
        let said = err.to_string();
        assert!(said.contains(&latents.display().to_string()), "{said}");
        assert!(said.contains("needs [1, 4, 12, 12]"), "{said}");
    }

    #[test]
    fn a_batch_out_of_device_memory_renders_in_halves_in_order() {
        use std::cell::RefCell;
        let oom = || BatchFailure {
            error: EngineError::Failed("CUDA_ERROR_OUT_OF_MEMORY".into()),
            out_of_memory: true,
        };
        // A device that fits at most two samples; each part reports its
        // progress to the end.
        let calls = RefCell::new(Vec::new());
        let seen = RefCell::new(Vec::new());
        let run = |part: &[u32], progress: &dyn Fn(f32)| -> Result<Vec<u32>, BatchFailure> {
            calls.borrow_mut().push(part.to_vec());
            if part.len() > 2 {
                return Err(oom());
            }
            progress(0.5);
            progress(1.0);
            Ok(part.iter().map(|v| v * 10).collect())
        };
        let progress = |p: f32| seen.borrow_mut().push(p);
        let items = [1, 2, 3, 4, 5];
        let out = in_fitting_batches(&items, &progress, &run).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(out, vec![10, 20, 30, 40, 50]);
        assert_eq!(
            *calls.borrow(),
            vec![
                vec![1, 2, 3, 4, 5],
                vec![1, 2],
                vec![3, 4, 5],
                vec![3],
                vec![4, 5]
            ]
        );
        let seen = seen.borrow();
        assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
        assert_eq!(seen.last().copied(), Some(1.0));

        // Another failure is not retried, and one sample that does not fit
        // fails by name.
        calls.borrow_mut().clear();
        let other = |part: &[u32], _: &dyn Fn(f32)| -> Result<Vec<u32>, BatchFailure> {
            calls.borrow_mut().push(part.to_vec());
            Err(EngineError::Failed("the UNet produced non-finite values".into()).into())
        };
        let err = in_fitting_batches(&items, &progress, &other).unwrap_err();
        assert!(err.to_string().contains("non-finite"), "{err}");
        assert_eq!(calls.borrow().len(), 1);
        let never = |_: &[u32], _: &dyn Fn(f32)| -> Result<Vec<u32>, BatchFailure> { Err(oom()) };
        let err = in_fitting_batches(&items[..1], &progress, &never).unwrap_err();
        assert!(err.to_string().contains("OUT_OF_MEMORY"), "{err}");
    }

    #[test]
    fn attention_and_convolution_choices_are_checked_at_start() {
        let cfg = config(&["--attention", "matmul", "--conv-algo", "implicit-gemm"]).unwrap();
        assert_eq!(cfg.attention, AttentionChoice::Matmul);
        assert_eq!(cfg.conv_algorithm, ConvAlgorithm::ImplicitGemm);
        let cfg = config(&[]).unwrap();
        assert_eq!(cfg.attention, AttentionChoice::Auto);
        assert_eq!(cfg.conv_algorithm, ConvAlgorithm::WinogradNonfused);

        let err = config(&["--attention", "sdpa"]).unwrap_err().to_string();
        assert!(err.contains("\"sdpa\""), "{err}");
        let err = config(&["--conv-algo", "fft"]).unwrap_err().to_string();
        assert!(err.contains("\"fft\""), "{err}");
        // Flash attention cannot run on the CPU: refused before any render.
        let err = config(&["--attention", "flash"]).unwrap_err().to_string();
        assert!(err.contains("flash attention cannot run here"), "{err}");
        // The own fused attention runs on the CPU in f32 only.
        let cfg = config(&["--attention", "fused"]).unwrap();
        assert_eq!(cfg.attention, AttentionChoice::Fused);
        let err = config(&["--attention", "fused", "--dtype", "f16"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("fused attention cannot run here"), "{err}");
    }

    #[test]
    fn a_broken_upscaler_file_is_refused_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let weights = dir.path().join("RealESRGAN_x4plus.safetensors");
        std::fs::write(&weights, b"\x10\x00\x00\x00\x00\x00\x00\x00{}").unwrap();
        let mut cfg = DiffusionConfig::new(Vec::new());
        cfg.upscaler = Some(weights.clone());
        let err = DiffusionEngine::new(cfg.clone())
            .err()
            .expect("refused")
            .to_string();
        assert!(
            err.contains("RealESRGAN_x4plus.safetensors") && err.contains("not a safetensors file"),
            "{err}"
        );
        cfg.upscaler = Some(dir.path().join("missing"));
        assert!(
            DiffusionEngine::new(cfg).is_err(),
            "a missing upscaler is refused too"
        );
    }
}
