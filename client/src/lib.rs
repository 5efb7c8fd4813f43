//! The `hallmark` command line.
//!
//! - [`prompts`]: prompt files (`.txt`, `.jsonl`, `.csv`).
//! - [`config`]: client settings (file, `HALLMARK_*`, flags).
//! - [`remote`]: coordinator calls — submit, watch with progress, download.
//! - [`farm`]: the embedded single-node farm behind `render` and `up`.
//! - [`credentials`]: the signing identity (or local test CA) and trust anchors.
//! - [`verify`]: `hallmark verify` — credentials, watermark, repository.
//! - [`audit`]: `hallmark audit` — the audit ledger, re-hashed here.
//! - [`output`]: human and `--json` output.

pub mod audit;
pub mod config;
pub mod credentials;
pub mod farm;
pub mod output;
pub mod prompts;
pub mod remote;
pub mod tls;
pub mod verify;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use hallmark_proto::client::ClientTls;
use hallmark_proto::v1::{
    Dataset, InputRef, Job, JobRef, JobSpec, ListDatasetsRequest, ListInputsRequest,
    ListJobsRequest, ListModelsRequest, ListWorkersRequest, Model, PromptItem, SubmitJobRequest,
    WeightFile,
};
use serde_json::json;

use crate::config::ClientConfig;
use crate::farm::{FarmListen, FarmStamping, LocalFarm, LocalWorkers};
use crate::remote::{Remote, rpc};

/// Hallmark: a render farm for generative images with provenance built in.
#[derive(Parser, Debug)]
#[command(name = "hallmark", version, about)]
pub struct Cli {
    /// Config file (TOML); HALLMARK_* environment variables and flags override it.
    #[arg(long, global = true, env = "HALLMARK_CONFIG")]
    pub config: Option<PathBuf>,
    /// Coordinator URL (e.g. http://coordinator:7070); without one, `render` runs a local farm.
    #[arg(long, global = true)]
    pub coordinator: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Render a job and write the images: on the local embedded farm, or on
    /// `--coordinator` when one is configured.
    Render(Box<RenderArgs>),
    /// Run the embedded farm as a long-lived local server others can join.
    Up(Box<UpArgs>),
    /// Submit a job to a coordinator and print its id.
    Submit(Box<SubmitArgs>),
    /// Follow a job's progress until it ends.
    Watch { job_id: String },
    /// Show a job's state once.
    Status { job_id: String },
    /// List jobs, newest first.
    Jobs {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Cancel a job: its open tasks stop, workers drop their leases.
    Cancel { job_id: String },
    /// Pause a job: no new leases; running tasks are handed back.
    Pause { job_id: String },
    /// Resume a paused job.
    Resume { job_id: String },
    /// Retry a job's failed tasks.
    Retry { job_id: String },
    /// Download a job's images into a directory.
    Download {
        job_id: String,
        #[arg(short, long)]
        output: PathBuf,
    },
    /// List workers with their models and load.
    Workers,
    /// Register or list models.
    #[command(subcommand)]
    Models(ModelsCommand),
    /// Register or list training datasets.
    #[command(subcommand)]
    Datasets(DatasetsCommand),
    /// Uploaded input images (img2img's init images).
    #[command(subcommand)]
    Inputs(InputsCommand),
    /// Embed or detect the invisible watermark (keyed by `watermark_key`).
    #[command(subcommand)]
    Watermark(WatermarkCommand),
    /// Check images' content credentials and watermark; with --coordinator,
    /// recover the manifest and lineage of altered or stripped copies.
    /// Exit 0 verified, 1 invalid or tampered, 2 no provenance found.
    Verify {
        /// Files, or folders searched for .png/.jpg/.jpeg/.webp.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// PEM roots to trust instead of the configured ones.
        #[arg(long)]
        trust_anchors: Option<PathBuf>,
        /// Tenant to resolve as (private fields are shown to the owner only).
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Certificate authority tools.
    #[command(subcommand)]
    Ca(CaCommand),
    /// Tokens callers present to a coordinator with `auth = "tokens"`.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The embedded farm's TLS certificate authority (`hallmark up --tls`).
    #[command(subcommand)]
    Tls(TlsCommand),
    /// Read and check the audit ledger: submissions, dispatches, completions,
    /// failures, controls and registrations, hash-chained. Without a
    /// coordinator, the embedded farm's (`--state-dir`).
    Audit(AuditArgs),
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(subcommand)]
    pub command: AuditCommand,
    /// State directory of the embedded farm (when no coordinator is configured).
    #[arg(long, env = "HALLMARK_STATE_DIR", global = true)]
    pub state_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum AuditCommand {
    /// Re-hash the whole chain here. Exit 0 intact, 1 tampered or inconsistent.
    Verify {
        /// `SEQ:HASH` printed by an earlier run (repeatable): the chain must
        /// still pass through it, which catches a chain recomputed from scratch.
        #[arg(long = "anchor")]
        anchors: Vec<hallmark_provenance::ledger::Anchor>,
        /// Also hold this job's artifacts against their recorded completions.
        #[arg(long)]
        job: Option<String>,
        #[command(flatten)]
        trust: CheckpointTrust,
    },
    /// Prove a job's ledger entries are in the signed ledger, without
    /// reading anyone else's: each is re-hashed and its Merkle path walked
    /// to the root of the latest signed checkpoint, and the job's artifacts
    /// held against the completions proven. Exit 0 proven, 1 not.
    Prove {
        /// The job (a tenant's own).
        #[arg(long)]
        job: String,
        #[command(flatten)]
        trust: CheckpointTrust,
        /// Keep the checkpoint proven against in this file (once everything
        /// checks out), for `--checkpoint` next time.
        #[arg(long)]
        save_checkpoint: Option<PathBuf>,
    },
    /// Operators: rebuild the ledger's Merkle tree from its chain, every
    /// entry re-hashed, and hold the stored tree to it node by node; the
    /// rebuilt tree must lead to the newest checkpoint the coordinator
    /// signed. Exit 0 intact (or repaired), 1 when nodes differ; refused
    /// when the chain itself does not check out.
    CheckTree {
        /// Rewrite the nodes that differ, store the missing ones and delete
        /// those beyond the tree (recorded in the ledger as `repair_tree`).
        #[arg(long)]
        repair: bool,
    },
    /// Print ledger entries in chain order.
    Log {
        /// Only this job's entries.
        #[arg(long)]
        job: Option<String>,
        /// Entries after this one.
        #[arg(long, default_value_t = 0)]
        after: u64,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
}

/// What `hallmark audit verify` and `prove` hold the ledger's signed
/// checkpoints to.
#[derive(Args, Debug)]
pub struct CheckpointTrust {
    /// PEM roots the ledger checkpoint's signer must chain to (default:
    /// `trust_anchors` and the local test CA's root, as for `verify`).
    #[arg(long)]
    pub trust_anchors: Option<PathBuf>,
    /// Fail unless the ledger has a checkpoint signed by a trusted certificate.
    #[arg(long)]
    pub require_signed: bool,
    /// A published checkpoint file you hold (repeatable): a copy of the
    /// blob store's `ledger-checkpoints/SEQ.json`, or one `prove
    /// --save-checkpoint` kept, where the database's administrators cannot
    /// change it. Its signature is checked; `verify` holds the chain to it,
    /// `prove` asks for the proof that the ledger only grew since.
    #[arg(long = "checkpoint")]
    pub checkpoints: Vec<PathBuf>,
}

impl CheckpointTrust {
    /// The trust anchors and checkpoint copies the flags name, read.
    fn read(&self, cfg: &ClientConfig) -> anyhow::Result<audit::CheckpointHold> {
        Ok(audit::CheckpointHold {
            trust_anchors: credentials::trust_anchors(cfg, self.trust_anchors.as_deref())?,
            require_signed: self.require_signed,
            own_checkpoints: audit::read_checkpoints(&self.checkpoints)?,
        })
    }
}

#[derive(Subcommand, Debug)]
pub enum CaCommand {
    /// Make a test root CA and a signing certificate C2PA validators accept.
    Init {
        dir: PathBuf,
        /// Organisation named in the certificates (O=).
        #[arg(long, default_value = "Hallmark test")]
        organization: String,
        /// es256 or ed25519.
        #[arg(long, default_value = "es256")]
        alg: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Issue a client certificate from the farm's TLS CA (made first if the
    /// state directory has none), for a machine joining a farm started with
    /// `hallmark up --tls --tls-client-certs`. Writes NAME.pem and NAME.key.
    ClientCert {
        /// Which machine or person holds it (the certificate's common name).
        name: String,
        /// Folder to write the certificate and key into.
        #[arg(short, long, default_value = ".")]
        output: PathBuf,
        #[arg(long, env = "HALLMARK_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
    /// Revoke the client certificates issued under NAME (or the one with
    /// that SHA-256 fingerprint): a running farm refuses them within
    /// seconds (`STATE/tls/revoked.txt`).
    Revoke {
        name: String,
        #[arg(long, env = "HALLMARK_STATE_DIR")]
        state_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum TokenCommand {
    /// Make a token and print it with the `auth_tokens` line that admits it
    /// (the coordinator keeps only the token's SHA-256 digest).
    New {
        /// tenant:NAME, worker[:NAME] or operator[:NAME].
        #[arg(long)]
        role: String,
        /// The token stops working this long from now (`30d`, `12h`, `90min`).
        #[arg(long, value_name = "DURATION")]
        expires_in: Option<String>,
        /// The token stops working at this time (RFC 3339, `2027-01-31T00:00:00Z`).
        #[arg(long, value_name = "TIME")]
        expires: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
pub enum WatermarkCommand {
    /// Mark an image with a 64-bit payload (PNG or JPEG out, by extension).
    Embed {
        input: PathBuf,
        output: PathBuf,
        /// 64-bit payload as up to 16 hex digits.
        #[arg(long)]
        payload: String,
    },
    /// Look for a mark; exit 0 when found, 2 when none was found.
    Detect { input: PathBuf },
}

/// What to render: the prompts and everything that sets the pixels.
#[derive(Args, Debug, Clone)]
pub struct SpecArgs {
    /// Prompt file: .txt (a prompt per line), .jsonl or .csv.
    pub prompts: Option<PathBuf>,
    /// A prompt on the command line (repeatable) instead of a file.
    #[arg(long = "prompt")]
    pub prompt: Vec<String>,
    /// Render engine: synthetic or diffusion.
    #[arg(long, default_value = "synthetic")]
    pub engine: String,
    /// Model id (default: synthetic-v1 for the synthetic engine).
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long, default_value = "")]
    pub negative: String,
    #[arg(long, default_value_t = 1)]
    pub images_per_prompt: u32,
    /// Job seed; item seeds derive from it. Random when unset.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Image width (default 512, or the init image's width rounded down
    /// to a multiple of 8).
    #[arg(long)]
    pub width: Option<u32>,
    /// Image height (default 512, or the init image's, as the width).
    #[arg(long)]
    pub height: Option<u32>,
    #[arg(long, default_value_t = 20)]
    pub steps: u32,
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f32,
    #[arg(long, default_value = "euler_a")]
    pub scheduler: String,
    /// Super-resolve each image ×2 or ×4 after it is generated.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(["2", "4"]))]
    pub upscale: Option<String>,
    /// How the diffusion engine super-resolves: esrgan or hires-fix
    /// (default: each worker's --default-upscale-method).
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(hallmark_proto::UPSCALE_METHODS))]
    pub upscale_method: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Tenant (default from config: "default").
    #[arg(long)]
    pub tenant: Option<String>,
    /// Labels, key=value (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// Attempts per task before it fails (default: the coordinator's).
    #[arg(long, default_value_t = 0)]
    pub max_attempts: u32,
    /// img2img: start every image from this picture (PNG, JPEG or WebP),
    /// uploaded to the coordinator and named in each output's credentials.
    /// It is resized to the job's size.
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// img2img: how much of the init image is re-imagined, in (0, 1]
    /// (default 0.8, as diffusers); floor(steps × strength) steps run.
    /// Prompt-file lines may name their own `init_image` (a path relative
    /// to the file) and `strength`.
    #[arg(long)]
    pub strength: Option<f64>,
    /// Inpainting: repaint only the white part (≥ 50 % grey) of the init
    /// image, keeping the black part; a PNG, JPEG or WebP resized to the
    /// job's size (an inpainting checkpoint — 9-channel unet — sees it
    /// directly; any other SD model renders through it). Needs
    /// --init-image or init_image in the prompt file; lines may name their
    /// own `mask`.
    #[arg(long)]
    pub mask: Option<PathBuf>,
    /// Inpainting: blur the masks by this radius in pixels (a Gaussian, as
    /// PIL's GaussianBlur) so the repainted part fades into the kept one.
    #[arg(long, value_name = "PX")]
    pub mask_blur: Option<u32>,
    /// Inpainting: render only a crop around the mask's white part, with
    /// PX pixels of context on each side (grown to the image's aspect
    /// ratio), at the job's full size, then paste it back: more detail for
    /// a small mask (diffusers' padding_mask_crop). Default: the whole
    /// image.
    #[arg(long, value_name = "PX")]
    pub mask_crop: Option<u32>,
    /// Outpainting: extend the init image with new canvas the model draws,
    /// e.g. `left=128,right=128` (sides: left, top, right, bottom; pixels).
    /// --width/--height are the whole canvas (default: the init image's
    /// size plus the margins); the strength defaults to 1. Soften the seam
    /// with --mask-blur. Not with --mask: it makes its own.
    #[arg(long, value_name = "SIDE=PX,…", value_parser = parse_outpaint)]
    pub outpaint: Option<hallmark_proto::v1::Outpaint>,
    /// Refine each image before any upscale: img2img at its size with this
    /// model (a fine-tune, another SD model, or the job's own model).
    #[arg(long)]
    pub refine_model: Option<String>,
    /// How much a refine re-renders, in (0, 1) (default 0.3; implies a
    /// refine with the job's model when --refine-model is not given).
    #[arg(long)]
    pub refine_strength: Option<f64>,
}

impl SpecArgs {
    /// The refine stage the flags ask for, if any.
    fn refine(&self) -> Option<hallmark_proto::v1::RefineSpec> {
        if self.refine_model.is_none() && self.refine_strength.is_none() {
            return None;
        }
        Some(hallmark_proto::v1::RefineSpec {
            model_id: self.refine_model.clone().unwrap_or_default(),
            strength: self.refine_strength.unwrap_or(0.0),
        })
    }
}

/// An init image or mask file as read for a job: its sha256, and what the
/// CLI checks of the picture.
pub struct InitImageFile {
    pub sha256: String,
    pub picture: prompts::Picture,
}

impl InitImageFile {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("init image {}: cannot read it", path.display()))?;
        let img = hallmark_provenance::credentials::decode_image(&bytes)
            .with_context(|| format!("init image {}: not a usable image", path.display()))?;
        Ok(Self {
            sha256: hallmark_provenance::sha256_hex(&bytes),
            picture: prompts::Picture {
                width: img.width(),
                height: img.height(),
                black: img.pixels().all(|p| p.0 == [0, 0, 0]),
            },
        })
    }
}

/// A job spec and the local files of the init images and masks it names.
pub struct BuiltSpec {
    pub spec: JobSpec,
    /// (sha256, path) of every distinct init image and mask.
    pub uploads: Vec<(String, PathBuf)>,
}

impl BuiltSpec {
    /// Whether any image starts from an init image (img2img or inpainting).
    pub fn starts_from_images(&self) -> bool {
        any_init_image(!self.spec.init_image_sha256.is_empty(), &self.spec.prompts)
    }
}

/// Whether any image of a job starts from an init image: the job's own
/// (`job_init`), or a prompt line's.
fn any_init_image(job_init: bool, prompts: &[PromptItem]) -> bool {
    job_init || prompts.iter().any(|p| p.init_image_sha256.is_some())
}

/// Uploads the spec's init images and masks (read again — building the
/// spec decoded them — and checked to be the same bytes), then submits the
/// job.
pub async fn submit_job(
    remote: &Remote,
    built: BuiltSpec,
    queue_unservable: bool,
) -> anyhow::Result<Job> {
    for (sha256, path) in &built.uploads {
        let bytes = std::fs::read(path)
            .with_context(|| format!("input {}: cannot read it", path.display()))?;
        if &hallmark_provenance::sha256_hex(&bytes) != sha256 {
            bail!(
                "input {} changed while the job was being submitted",
                path.display()
            );
        }
        let input = remote.upload_input(&bytes).await?;
        if &input.sha256 != sha256 {
            bail!(
                "the coordinator stored input {} as {}, not {sha256}",
                path.display(),
                input.sha256
            );
        }
    }
    Ok(remote
        .jobs
        .clone()
        .submit(SubmitJobRequest {
            spec: Some(built.spec),
            queue_unservable,
        })
        .await
        .map_err(rpc)?
        .into_inner())
}

#[derive(Args, Debug)]
pub struct RenderArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Output directory.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Local workers to start (embedded farm).
    #[arg(long)]
    pub workers: Option<u32>,
    /// State directory of the embedded farm.
    #[arg(long, env = "HALLMARK_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Simulated render time per batch for the synthetic engine, in ms.
    #[arg(long, default_value_t = 0)]
    pub render_ms: u64,
    #[command(flatten)]
    pub diffusion: hallmark_worker::diffusion::DiffusionArgs,
}

#[derive(Args, Debug)]
pub struct UpArgs {
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: String,
    /// Address of the Prometheus endpoint, GET /metrics (the coordinator's
    /// and the local workers' metrics); unset: none.
    #[arg(long, env = "HALLMARK_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Address of the C2PA soft-binding resolution API, for third-party
    /// verifiers (HTTPS with --tls); unset: none.
    #[arg(long, env = "HALLMARK_HTTP_LISTEN")]
    pub http_listen: Option<String>,
    /// Local workers to start (0 for a coordinator only).
    #[arg(long)]
    pub workers: Option<u32>,
    #[arg(long, default_value = "synthetic")]
    pub engine: String,
    #[arg(long = "model", default_value = "synthetic-v1")]
    pub models: Vec<String>,
    #[arg(long, env = "HALLMARK_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 0)]
    pub render_ms: u64,
    /// Require a token on every call, from the `[auth_tokens]` of this file
    /// (`auth = "tokens"`, then the lines `hallmark token new` prints),
    /// read again when it changes; the farm's own workers need none. For a
    /// farm that other machines join.
    #[arg(long, env = "HALLMARK_UP_AUTH_TOKENS")]
    pub auth_tokens: Option<PathBuf>,
    /// Serve TLS (`https://`) with a certificate from the farm's own TLS CA,
    /// made in `STATE/tls/` on first use: joining machines verify the farm
    /// against `STATE/tls/ca.pem` (HALLMARK_TLS_CA, or the worker's
    /// --tls-ca).
    #[arg(long)]
    pub tls: bool,
    /// A name (DNS name or IP address) joining machines reach the farm by,
    /// for its certificate; repeatable. Loopback, the listen address and
    /// this machine's host name are always in it.
    #[arg(long = "tls-name", value_name = "NAME", requires = "tls")]
    pub tls_names: Vec<String>,
    /// Require a client certificate from the farm's TLS CA of every caller
    /// (`hallmark tls client-cert NAME` issues them); the farm's own
    /// workers get one.
    #[arg(long, requires = "tls")]
    pub tls_client_certs: bool,
    #[command(flatten)]
    pub diffusion: hallmark_worker::diffusion::DiffusionArgs,
}

#[derive(Args, Debug)]
pub struct SubmitArgs {
    #[command(flatten)]
    pub spec: SpecArgs,
    /// Follow the job after submitting it.
    #[arg(long)]
    pub watch: bool,
    /// Accept the job even if no registered worker can run it yet.
    #[arg(long)]
    pub queue_unservable: bool,
}

#[derive(Subcommand, Debug)]
pub enum ModelsCommand {
    /// Register a model: its weight files are hashed here.
    Register {
        #[arg(long)]
        id: String,
        /// sd15, sd21, sdxl, sd-turbo, sdxl-turbo, esrgan, synthetic, …
        #[arg(long)]
        family: String,
        /// Weight files to hash and record (repeatable).
        #[arg(long = "weights", required_unless_present = "model_path")]
        weights: Vec<PathBuf>,
        /// A diffusers folder, or a Hub model hf:owner/name[@revision]
        /// (fetched into the Hub cache): every weight file it loads is hashed
        /// and recorded by its path inside the folder (what a diffusion
        /// worker serving it declares).
        #[arg(long, conflicts_with = "weights")]
        model_path: Option<String>,
        /// The weights variant the workers serve (fp16), as their --variant.
        #[arg(long, requires = "model_path")]
        variant: Option<String>,
        /// The model refines images and cannot draw from noise (an SDXL
        /// refiner given by --weights; a --model-path folder says so
        /// itself): a job rendering from noise with it is refused.
        #[arg(long, conflicts_with = "model_path")]
        refines_only: bool,
        /// The model only inpaints (an inpainting checkpoint given by
        /// --weights; a --model-path folder says so itself): a job that
        /// would render with it without a mask is refused.
        #[arg(long, conflicts_with = "model_path")]
        inpaints_only: bool,
        #[arg(long, default_value = "unknown")]
        license: String,
        #[arg(long)]
        parent: Option<String>,
        /// Training datasets, name@version (repeatable).
        #[arg(long = "dataset")]
        datasets: Vec<String>,
    },
    List,
    /// Write a tiny random-weight checkpoint (deterministic from the seed)
    /// in the real layout: sd1, sd2, sdxl, their inpainting shapes (sd1-inpaint, sd2-inpaint,
    /// sdxl-inpaint), sdxl-refiner (diffusers folders with the real
    /// CLIP tokenizer), esrgan-x2 or esrgan-x4 (Real-ESRGAN RRDBNet); for
    /// benchmarks, the full-size sd15-full and esrgan-x4-full.
    InitTiny {
        dir: PathBuf,
        #[arg(long)]
        arch: String,
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// CLIP's bpe_simple_vocab_16e6.txt.gz (for sd1/sd2/sdxl).
        #[arg(long, env = "HALLMARK_CLIP_VOCAB", default_value = DEFAULT_CLIP_VOCAB)]
        clip_vocab: PathBuf,
    },
}

/// Where the CLIP vocabulary lies in a checkout (run from the repository root).
pub const DEFAULT_CLIP_VOCAB: &str = "tests/data/clip/bpe_simple_vocab_16e6.txt.gz";

#[derive(Subcommand, Debug)]
pub enum InputsCommand {
    /// Delete uploaded input images: your own upload (every tenant's, for
    /// an operator); once no uploader is left the picture is purged from
    /// the blob store, its hash kept for the lineage. Refused while a job
    /// of yours that starts from it has not finished.
    Delete {
        /// Each a picture's sha256 (64 hex digits), or the picture's file.
        #[arg(required = true)]
        inputs: Vec<String>,
    },
    /// List your uploaded input images, most recently used first, with when
    /// the retention purge may take each (an operator: a --tenant's, or all).
    List {
        #[arg(long)]
        tenant: Option<String>,
        /// At most this many (0: all, page by page).
        #[arg(long, default_value_t = 0)]
        limit: u32,
    },
}

#[derive(Subcommand, Debug)]
pub enum DatasetsCommand {
    /// Register a dataset version; give its content hash or a file to hash.
    Register {
        #[arg(long)]
        name: String,
        #[arg(long)]
        version: String,
        #[arg(long)]
        uri: String,
        #[arg(long, conflicts_with = "file")]
        sha256: Option<String>,
        /// A file (e.g. the dataset's index or archive) to hash.
        #[arg(long)]
        file: Option<PathBuf>,
        #[arg(long, default_value = "unknown")]
        license: String,
    },
    List,
}

fn init_tiny(
    dir: &Path,
    arch: &str,
    seed: u64,
    clip_vocab: &Path,
    json: bool,
) -> anyhow::Result<i32> {
    let arch_name = arch;
    let arch: hallmark_diffusion::tiny::TinyArch = arch.parse()?;
    let needs_vocab = arch.needs_clip_vocab();
    if needs_vocab && !clip_vocab.is_file() {
        bail!(
            "CLIP vocabulary {} not found: pass --clip-vocab PATH to bpe_simple_vocab_16e6.txt.gz (or set HALLMARK_CLIP_VOCAB)",
            clip_vocab.display()
        );
    }
    hallmark_diffusion::tiny::init_tiny(dir, arch, seed, needs_vocab.then_some(clip_vocab))
        .with_context(|| format!("writing a tiny checkpoint into {}", dir.display()))?;
    if json {
        println!("{}", json!({"dir": dir, "arch": arch_name, "seed": seed}));
    } else {
        println!(
            "wrote a tiny {arch_name} checkpoint (seed {seed}) into {}",
            dir.display()
        );
    }
    Ok(0)
}

/// Runs the CLI; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    let mut cfg = ClientConfig::load(cli.config.as_deref())?;
    if let Some(c) = &cli.coordinator {
        cfg.coordinator = Some(c.clone());
    }
    let json = cli.json;
    match cli.command {
        Command::Render(args) => render(&cfg, *args, json).await,
        Command::Up(args) => up(&cfg, *args).await,
        Command::Watermark(cmd) => watermark_command(&cfg, cmd, json),
        Command::Verify {
            paths,
            trust_anchors,
            tenant,
        } => verify_command(&cfg, &paths, trust_anchors.as_deref(), tenant, json).await,
        Command::Models(ModelsCommand::InitTiny {
            dir,
            arch,
            seed,
            clip_vocab,
        }) => init_tiny(&dir, &arch, seed, &clip_vocab, json),
        Command::Ca(CaCommand::Init {
            dir,
            organization,
            alg,
        }) => ca_init(&dir, &organization, &alg, json),
        Command::Token(TokenCommand::New {
            role,
            expires_in,
            expires,
        }) => token_new(&role, expires_in.as_deref(), expires.as_deref(), json),
        Command::Tls(TlsCommand::ClientCert {
            name,
            output,
            state_dir,
        }) => tls_client_cert(&cfg, &name, &output, state_dir, json),
        Command::Tls(TlsCommand::Revoke { name, state_dir }) => {
            let state_dir = state_dir.unwrap_or_else(|| cfg.state_dir.clone());
            let ca = crate::tls::FarmTlsCa::in_dir(&state_dir.join("tls"));
            if !ca.exists() {
                bail!(
                    "no farm TLS CA in {} (nothing to revoke)",
                    state_dir.display()
                );
            }
            let revoked = ca.revoke(&name)?;
            if json {
                println!("{}", json!({"revoked": revoked}));
            } else {
                for sha in &revoked {
                    println!("revoked {name}: {sha}");
                }
            }
            Ok(0)
        }
        Command::Audit(args) => audit_command(&cfg, args, json).await,
        command => {
            let url = cfg.coordinator.clone().context(
                "no coordinator configured: pass --coordinator URL, set HALLMARK_COORDINATOR, or run `hallmark up`",
            )?;
            let remote = Remote::connect_as(&url, &cfg).await?;
            remote_command(&cfg, &remote, command, json).await
        }
    }
}

/// Inputs listed per call (the coordinator's most).
const INPUTS_PAGE: u32 = 1000;

/// Prints a check's report as asked; its exit code: 0 when it checked out.
fn report_exit(
    json: bool,
    ok: bool,
    as_json: impl FnOnce() -> serde_json::Value,
    as_text: impl FnOnce() -> String,
) -> i32 {
    if json {
        println!("{}", as_json());
    } else {
        print!("{}", as_text());
    }
    if ok { 0 } else { 1 }
}

async fn audit_command(cfg: &ClientConfig, args: AuditArgs, json: bool) -> anyhow::Result<i32> {
    // Without a coordinator the embedded farm's state is opened here; it
    // seals what its last run left unsealed before anything is read.
    let cfg = &ClientConfig {
        state_dir: args.state_dir.unwrap_or_else(|| cfg.state_dir.clone()),
        ..cfg.clone()
    };
    let (remote, embedded) = match &cfg.coordinator {
        Some(url) => (Remote::connect_as(url, cfg).await?, None),
        None => {
            // The farm's own identity signs the checkpoint of what it seals
            // now (none is made where nothing was rendered: that is refused).
            let identity = if farm::has_state(&cfg.state_dir) {
                Some(credentials::farm_signing(cfg)?.identity)
            } else {
                None
            };
            let running = farm::open_state(&cfg.state_dir, identity).await?;
            running.state.seal_ledger().await?;
            (
                Remote::connect(&running.url(), None, &ClientTls::default()).await?,
                Some(running),
            )
        }
    };
    let outcome = match args.command {
        AuditCommand::Verify {
            anchors,
            job,
            trust,
        } => audit::verify(
            &remote,
            audit::VerifyOptions {
                anchors,
                job,
                hold: trust.read(cfg)?,
            },
        )
        .await
        .map(|report| report_exit(json, report.ok(), || report.to_json(), || report.to_text())),
        AuditCommand::Prove {
            job,
            trust,
            save_checkpoint,
        } => audit::prove(
            &remote,
            audit::ProveOptions {
                job,
                hold: trust.read(cfg)?,
                save_checkpoint,
            },
        )
        .await
        .map(|report| report_exit(json, report.ok(), || report.to_json(), || report.to_text())),
        AuditCommand::CheckTree { repair } => audit::check_tree(&remote, repair)
            .await
            .map(|report| report_exit(json, report.ok(), || report.to_json(), || report.to_text())),
        AuditCommand::Log { job, after, limit } => {
            audit::log(&remote, job.as_deref(), after, limit, json)
                .await
                .map(|()| 0)
        }
    };
    if let Some(running) = embedded {
        running.stop().await?;
    }
    outcome
}

async fn remote_command(
    cfg: &ClientConfig,
    remote: &Remote,
    command: Command,
    json: bool,
) -> anyhow::Result<i32> {
    match command {
        Command::Submit(args) => {
            let built = build_spec(&args.spec, cfg)?;
            let job = submit_job(remote, built, args.queue_unservable).await?;
            if json && !args.watch {
                println!("{}", output::job_json(&job));
            } else if !json {
                println!("{}", job.job_id);
            }
            if args.watch {
                let end = remote.watch(&job.job_id, json, false).await?;
                return Ok(job_exit(&end));
            }
        }
        Command::Watch { job_id } => {
            let end = remote.watch(&job_id, json, false).await?;
            if !json {
                print!("{}", output::job_text(&end));
            }
            return Ok(job_exit(&end));
        }
        Command::Status { job_id } => print_job(&remote.job(&job_id).await?, json),
        Command::Jobs { tenant, limit } => {
            let jobs = remote
                .jobs
                .clone()
                .list_jobs(ListJobsRequest {
                    tenant: tenant.unwrap_or_default(),
                    limit,
                })
                .await
                .map_err(rpc)?
                .into_inner()
                .jobs;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(jobs.iter().map(output::job_json).collect())
                );
            } else {
                println!(
                    "{:<16} {:<10} {:<12} {:>7} {:>9}",
                    "JOB", "STATE", "TENANT", "ITEMS", "DONE"
                );
                for j in jobs {
                    let done: u64 = j.stages.iter().map(|s| s.succeeded).sum();
                    let total: u64 = j.stages.iter().map(|s| s.total).sum();
                    println!(
                        "{:<16} {:<10} {:<12} {:>7} {:>9}",
                        j.job_id,
                        j.state,
                        j.tenant,
                        j.items,
                        format!("{done}/{total}")
                    );
                }
            }
        }
        Command::Cancel { job_id } => print_job(
            &remote
                .jobs
                .clone()
                .cancel_job(JobRef { job_id })
                .await
                .map_err(rpc)?
                .into_inner(),
            json,
        ),
        Command::Pause { job_id } => print_job(
            &remote
                .jobs
                .clone()
                .pause_job(JobRef { job_id })
                .await
                .map_err(rpc)?
                .into_inner(),
            json,
        ),
        Command::Resume { job_id } => print_job(
            &remote
                .jobs
                .clone()
                .resume_job(JobRef { job_id })
                .await
                .map_err(rpc)?
                .into_inner(),
            json,
        ),
        Command::Retry { job_id } => print_job(
            &remote
                .jobs
                .clone()
                .retry_failed(JobRef { job_id })
                .await
                .map_err(rpc)?
                .into_inner(),
            json,
        ),
        Command::Download { job_id, output } => {
            let files = remote.download(&job_id, &output).await?;
            if json {
                println!(
                    "{}",
                    json!({"job_id": job_id, "files": files.iter().map(|(p, a)| json!({"path": p, "sha256": a.sha256})).collect::<Vec<_>>()})
                );
            } else {
                println!(
                    "wrote {} to {}",
                    count(files.len(), "file"),
                    output.display()
                );
            }
        }
        Command::Workers => {
            let workers = remote
                .workers
                .clone()
                .list_workers(ListWorkersRequest {})
                .await
                .map_err(rpc)?
                .into_inner()
                .workers;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(workers.iter().map(output::worker_json).collect())
                );
            } else {
                println!(
                    "{:<16} {:<14} {:<6} {:>6} {:>9}  {:<16} {:<16} MODELS",
                    "WORKER", "NAME", "LIVE", "LEASED", "MAXBATCH", "TOKEN", "CERTIFICATE"
                );
                let or_dash = |s: &str| {
                    if s.is_empty() {
                        "-".to_string()
                    } else {
                        s.to_string()
                    }
                };
                for w in workers {
                    println!(
                        "{:<16} {:<14} {:<6} {:>6} {:>9}  {:<16} {:<16} {}",
                        w.worker_id,
                        w.name,
                        if w.live { "yes" } else { "no" },
                        w.leased_tasks,
                        w.max_batch,
                        or_dash(&w.principal),
                        or_dash(&w.client_certificate),
                        w.models.join(",")
                    );
                }
            }
        }
        Command::Models(ModelsCommand::Register {
            id,
            family,
            weights,
            model_path,
            variant,
            refines_only,
            inpaints_only,
            license,
            parent,
            datasets,
        }) => {
            let mut files = Vec::new();
            let (mut refines_only, mut inpaints_only) = (refines_only, inpaints_only);
            if let Some(reference) = &model_path {
                let dir = hallmark_diffusion::hub::resolve(reference, variant.as_deref())?;
                let folder =
                    hallmark_diffusion::model::ModelFolder::open(&dir, variant.as_deref())?;
                refines_only = folder.refiner;
                inpaints_only = folder.is_inpainting()?;
                for (w, (rel, sha256)) in folder.weight_files().zip(folder.hash_weights()?) {
                    files.push(WeightFile {
                        path: rel,
                        sha256,
                        size: w.size,
                    });
                }
            }
            for path in &weights {
                let (sha256, size) = hash_file(path)?;
                let name = path
                    .file_name()
                    .map(|n| n.to_string_lossy().to_string())
                    .unwrap_or_default();
                files.push(WeightFile {
                    path: name,
                    sha256,
                    size,
                });
            }
            let model = Model {
                model_id: id,
                family,
                weights: files,
                license,
                parent_model_id: parent.unwrap_or_default(),
                training_datasets: datasets,
                refines_only,
                inpaints_only,
                ..Default::default()
            };
            let m = remote
                .registry
                .clone()
                .register_model(model)
                .await
                .map_err(rpc)?
                .into_inner();
            if json {
                println!("{}", output::model_json(&m));
            } else {
                println!(
                    "registered model {} ({} weight files)",
                    m.model_id,
                    m.weights.len()
                );
            }
        }
        Command::Models(ModelsCommand::List) => {
            let models = remote
                .registry
                .clone()
                .list_models(ListModelsRequest {})
                .await
                .map_err(rpc)?
                .into_inner()
                .models;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(models.iter().map(output::model_json).collect())
                );
            } else {
                for m in models {
                    println!(
                        "{:<24} {:<12} {:<12} datasets: {}{}",
                        m.model_id,
                        m.family,
                        m.license,
                        m.training_datasets.join(","),
                        if m.refines_only {
                            "  (refines only)"
                        } else if m.inpaints_only {
                            "  (inpaints only)"
                        } else {
                            ""
                        }
                    );
                }
            }
        }
        Command::Datasets(DatasetsCommand::Register {
            name,
            version,
            uri,
            sha256,
            file,
            license,
        }) => {
            let content_sha256 = match (sha256, file) {
                (Some(s), _) => s,
                (None, Some(f)) => hash_file(&f)?.0,
                (None, None) => bail!("give the dataset's --sha256 or a --file to hash"),
            };
            let d = remote
                .registry
                .clone()
                .register_dataset(Dataset {
                    name,
                    version,
                    uri,
                    content_sha256,
                    license,
                    created_at_ms: 0,
                })
                .await
                .map_err(rpc)?
                .into_inner();
            if json {
                println!("{}", output::dataset_json(&d));
            } else {
                println!("registered dataset {}@{}", d.name, d.version);
            }
        }
        Command::Datasets(DatasetsCommand::List) => {
            let ds = remote
                .registry
                .clone()
                .list_datasets(ListDatasetsRequest {})
                .await
                .map_err(rpc)?
                .into_inner()
                .datasets;
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(ds.iter().map(output::dataset_json).collect())
                );
            } else {
                for d in ds {
                    println!(
                        "{}@{}  {}  {}  {}",
                        d.name, d.version, d.license, d.content_sha256, d.uri
                    );
                }
            }
        }
        Command::Inputs(InputsCommand::Delete { inputs }) => {
            for input in &inputs {
                let sha256 = input_sha256(input)?;
                remote
                    .jobs
                    .clone()
                    .delete_input(InputRef {
                        sha256: sha256.clone(),
                    })
                    .await
                    .map_err(rpc)
                    .with_context(|| format!("deleting input {input}"))?;
                if json {
                    println!("{}", json!({ "sha256": sha256, "deleted": true }));
                } else {
                    println!("deleted input {sha256}");
                }
            }
        }
        Command::Inputs(InputsCommand::List { tenant, limit }) => {
            let mut inputs = Vec::new();
            let mut after = String::new();
            loop {
                let want = match limit {
                    0 => INPUTS_PAGE,
                    n => (n - inputs.len() as u32).min(INPUTS_PAGE),
                };
                let page = remote
                    .jobs
                    .clone()
                    .list_inputs(ListInputsRequest {
                        tenant: tenant.clone().unwrap_or_default(),
                        limit: want,
                        after,
                    })
                    .await
                    .map_err(rpc)?
                    .into_inner();
                inputs.extend(page.inputs);
                after = page.next_after;
                if after.is_empty() || (limit > 0 && inputs.len() as u32 >= limit) {
                    break;
                }
            }
            if json {
                println!(
                    "{}",
                    serde_json::Value::Array(inputs.iter().map(output::input_json).collect())
                );
            } else {
                for input in &inputs {
                    println!("{}", output::input_text(input));
                }
            }
        }
        Command::Render(_)
        | Command::Up(_)
        | Command::Watermark(_)
        | Command::Verify { .. }
        | Command::Models(ModelsCommand::InitTiny { .. })
        | Command::Ca(_)
        | Command::Token(_)
        | Command::Tls(_)
        | Command::Audit(_) => {
            unreachable!("handled before connecting")
        }
    }
    Ok(0)
}

fn print_job(job: &Job, json: bool) {
    if json {
        println!("{}", output::job_json(job));
    } else {
        print!("{}", output::job_text(job));
    }
}

fn job_exit(job: &Job) -> i32 {
    if job.state == "succeeded" { 0 } else { 1 }
}

/// Builds the job spec from flags and the prompt file; reads nothing remote.
pub fn build_spec(args: &SpecArgs, cfg: &ClientConfig) -> anyhow::Result<BuiltSpec> {
    let prompts::PromptFile {
        items: mut prompts,
        mut uploads,
        pictures,
    } = match &args.prompts {
        Some(path) => prompts::read_prompt_file(path)?,
        None => prompts::PromptFile::default(),
    };
    prompts.extend(args.prompt.iter().map(|p| PromptItem {
        prompt: p.clone(),
        ..Default::default()
    }));
    if prompts.is_empty() {
        bail!("no prompts: give a prompt file or --prompt TEXT");
    }
    let model = match (&args.model, args.engine.as_str()) {
        (Some(m), _) => m.clone(),
        (None, "synthetic") => "synthetic-v1".into(),
        (None, engine) => bail!("--model is required with the {engine} engine"),
    };
    let init = args
        .init_image
        .as_deref()
        .map(InitImageFile::read)
        .transpose()?;
    // img2img keeps the init image's size unless told otherwise; an
    // outpaint's canvas is the init image and its margins.
    let o = args.outpaint.unwrap_or_default();
    let width = args
        .width
        .or(init
            .as_ref()
            .map(|i| canvas_side(i.picture.width, o.left, o.right)))
        .unwrap_or(512);
    let height = args
        .height
        .or(init
            .as_ref()
            .map(|i| canvas_side(i.picture.height, o.top, o.bottom)))
        .unwrap_or(512);
    if let (Some(file), Some(path)) = (&init, &args.init_image) {
        check_canvas(
            &format!("--init-image {}", path.display()),
            file.picture,
            (args.width.is_none(), width),
            (args.height.is_none(), height),
            "--width/--height",
        )?;
    }
    line_defaults(&mut prompts, &pictures, init.as_ref(), args)?;
    let mut labels = HashMap::new();
    for l in &args.labels {
        let (k, v) = l
            .split_once('=')
            .with_context(|| format!("label {l:?} must be key=value"))?;
        labels.insert(k.to_string(), v.to_string());
    }
    let mask = args
        .mask
        .as_deref()
        .map(|p| InitImageFile::read(p).with_context(|| format!("--mask {}", p.display())))
        .transpose()?;
    for (file, path) in [(&init, &args.init_image), (&mask, &args.mask)] {
        if let (Some(file), Some(path)) = (file, path)
            && !uploads.iter().any(|(sha, _)| *sha == file.sha256)
        {
            uploads.push((file.sha256.clone(), path.clone()));
        }
    }
    let from_images = any_init_image(init.is_some(), &prompts);
    if args.strength.is_some() && !from_images {
        bail!("--strength applies to img2img: give --init-image or init_image in the prompt file");
    }
    if args.mask.is_some() && !from_images {
        bail!(
            "--mask says which part of an init image to repaint: give --init-image or init_image in the prompt file"
        );
    }
    if args.outpaint.is_some() {
        if !from_images {
            bail!(
                "--outpaint extends an init image: give --init-image or init_image in the prompt file"
            );
        }
        // A line may turn the job's outpaint off, and inpaint through a
        // mask of its own instead.
        let masked_line = prompts
            .iter()
            .position(|p| p.mask_sha256.is_some() && line_outpaint(p, args.outpaint).is_some());
        if mask.is_some() || masked_line.is_some() {
            bail!(
                "--outpaint makes its own mask (white over the new canvas): leave out --mask and the prompt file's masks{}",
                masked_line.map_or(String::new(), |i| format!(
                    " (prompt {i} names one; or give that line outpaint none)"
                ))
            );
        }
    }
    let any_mask = mask.is_some()
        || args.outpaint.is_some()
        || prompts
            .iter()
            .any(|p| p.mask_sha256.is_some() || line_outpaint(p, args.outpaint).is_some());
    for (flag, set) in [
        ("--mask-blur", args.mask_blur.is_some()),
        ("--mask-crop", args.mask_crop.is_some()),
    ] {
        if set && !any_mask {
            bail!("{flag} says how a mask is used: give --mask or mask in the prompt file");
        }
    }
    if let (Some(file), Some(path), Some(_)) = (&mask, &args.mask, args.mask_crop)
        && file.picture.black
    {
        bail!(
            "--mask {} is black everywhere: there is nothing to inpaint, and no crop around it for --mask-crop to render",
            path.display()
        );
    }
    for (i, line) in prompts.iter().enumerate() {
        let crops = line.mask_crop.is_some() || (args.mask_crop.is_some() && !line.no_mask_crop);
        if let Some(sha) = &line.mask_sha256
            && crops
            && pictures.get(sha).is_some_and(|p| p.black)
        {
            let path = uploads
                .iter()
                .find(|(s, _)| s == sha)
                .map(|(_, p)| p.display());
            bail!(
                "prompt {i}'s mask {} is black everywhere: there is nothing to inpaint, and no crop around it to render",
                path.map_or(sha.clone(), |p| p.to_string())
            );
        }
    }
    let spec = JobSpec {
        engine: args.engine.clone(),
        model_id: model,
        prompts,
        negative_prompt: args.negative.clone(),
        images_per_prompt: args.images_per_prompt,
        seed: args.seed,
        width,
        height,
        steps: args.steps,
        guidance: args.guidance,
        scheduler: args.scheduler.clone(),
        upscale: args
            .upscale
            .as_deref()
            .map(|u| u.parse())
            .transpose()?
            .unwrap_or(0),
        upscale_method: args.upscale_method.clone().unwrap_or_default(),
        priority: args.priority,
        tenant: args.tenant.clone().unwrap_or_else(|| cfg.tenant()),
        labels,
        max_attempts: args.max_attempts,
        strength: match (from_images, args.outpaint) {
            (false, _) => 0.0,
            // The new canvas starts as the init image's edges carried out:
            // drawn from noise, not from those.
            (true, Some(_)) => args.strength.unwrap_or(OUTPAINT_STRENGTH),
            (true, None) => args.strength.unwrap_or(DEFAULT_STRENGTH),
        },
        init_image_sha256: init.map(|i| i.sha256).unwrap_or_default(),
        mask_sha256: mask.map(|m| m.sha256).unwrap_or_default(),
        mask_blur: args.mask_blur.unwrap_or(0),
        mask_crop: args.mask_crop,
        outpaint: args.outpaint,
        refine: args.refine(),
    };
    Ok(BuiltSpec { spec, uploads })
}

/// The default strength of img2img and inpainting.
const DEFAULT_STRENGTH: f64 = 0.8;
/// The default strength of outpainting: its new canvas starts as the init
/// image's edges carried out, drawn from noise rather than from those.
const OUTPAINT_STRENGTH: f64 = 1.0;

/// The margins a prompt line outpaints with, as the spec reads them: its
/// own (none where all four are 0), else the job's.
fn line_outpaint(
    line: &PromptItem,
    job: Option<hallmark_proto::v1::Outpaint>,
) -> Option<hallmark_coordinator::spec::Outpaint> {
    hallmark_coordinator::spec::Outpaint::of_line(
        line.outpaint.map(Into::into),
        job.map(Into::into),
    )
}

/// One side of an img2img or outpaint canvas: the init image's side and the
/// margins on either end, rounded down to a multiple of 8.
fn canvas_side(picture: u32, a: u32, b: u32) -> u32 {
    picture.saturating_add(a.saturating_add(b)) / 8 * 8
}

/// What a prompt line with an init image or outpaint of its own gets by
/// default, as the job's init image gets it from the command: its canvas is
/// its init image's size and its margins (unless the line or the command
/// gives a size), and it starts from noise where it outpaints and the job
/// does not, or from its init image where it turns the job's outpaint off
/// (unless the line or the command gives a strength).
fn line_defaults(
    prompts: &mut [PromptItem],
    pictures: &HashMap<String, prompts::Picture>,
    job_init: Option<&InitImageFile>,
    args: &SpecArgs,
) -> anyhow::Result<()> {
    for (i, line) in prompts.iter_mut().enumerate() {
        let own_init = line
            .init_image_sha256
            .as_ref()
            .and_then(|s| pictures.get(s));
        if own_init.is_none() && line.outpaint.is_none() {
            continue;
        }
        // Without an init image there is nothing to default (the spec
        // refuses the line's outpaint, naming it).
        let Some(pic) = own_init.copied().or(job_init.map(|i| i.picture)) else {
            continue;
        };
        let margins = line_outpaint(line, args.outpaint).unwrap_or_default();
        let width = (args.width.is_none() && line.width.is_none())
            .then(|| canvas_side(pic.width, margins.left, margins.right));
        let height = (args.height.is_none() && line.height.is_none())
            .then(|| canvas_side(pic.height, margins.top, margins.bottom));
        check_canvas(
            &format!("prompt {i}'s init image"),
            pic,
            // Not from the picture: the line's or the command's.
            (
                width.is_some(),
                width.or(line.width).or(args.width).unwrap_or_default(),
            ),
            (
                height.is_some(),
                height.or(line.height).or(args.height).unwrap_or_default(),
            ),
            "the line's width and height, or --width/--height",
        )?;
        line.width = line.width.or(width);
        line.height = line.height.or(height);
        if args.strength.is_none()
            && line.strength.is_none()
            && let Some(own) = line.outpaint
        {
            let adds_canvas = hallmark_coordinator::spec::Outpaint::from(own).adds_canvas();
            match (adds_canvas, args.outpaint.is_some()) {
                (true, false) => line.strength = Some(OUTPAINT_STRENGTH),
                (false, true) => line.strength = Some(DEFAULT_STRENGTH),
                _ => {}
            }
        }
    }
    Ok(())
}

/// The smallest side of an output: every output carries the watermark.
const MIN_SIDE: u32 = hallmark_provenance::watermark::MIN_SIDE;

/// Refuses a canvas side under `MIN_SIDE` that was taken from a picture
/// (each of `width`, `height`: whether it was, and the side), naming the
/// picture (`what`) and the flags (`give`) that would set a size instead.
fn check_canvas(
    what: &str,
    pic: prompts::Picture,
    width: (bool, u32),
    height: (bool, u32),
    give: &str,
) -> anyhow::Result<()> {
    for (from_picture, side) in [width, height] {
        if from_picture && side < MIN_SIDE {
            bail!(
                "{what} is {}x{}: the canvas it makes ({}x{}) is under the {MIN_SIDE}-pixel side every output needs for its watermark; give {give}",
                pic.width,
                pic.height,
                width.1,
                height.1
            );
        }
    }
    Ok(())
}

/// `hallmark render`: submit, follow, download, summarise — on a local
/// embedded farm unless a coordinator is configured.
/// The diffusion engine's settings when `engine` is `diffusion` (the local
/// workers' models), and the model id a job names by default.
fn local_diffusion(
    engine: &str,
    args: &hallmark_worker::diffusion::DiffusionArgs,
) -> anyhow::Result<Option<hallmark_worker::DiffusionConfig>> {
    if engine != "diffusion" {
        return Ok(None);
    }
    Ok(Some(args.config()?))
}

/// What the local diffusion workers would refuse, refused before the farm
/// starts and anything is written: a refiner asked to draw from noise, an
/// inpainting model without a mask, and initial latents that do not fit
/// the job.
fn check_local_job(d: &hallmark_worker::DiffusionConfig, built: &BuiltSpec) -> anyhow::Result<()> {
    let spec = &built.spec;
    let Some((_, dir)) = d.models.iter().find(|(id, _)| *id == spec.model_id) else {
        return Ok(());
    };
    let folder = hallmark_diffusion::model::ModelFolder::open(dir, d.variant.as_deref())?;
    let from_noise = !built.starts_from_images();
    if from_noise {
        folder.check_draws_from_noise()?;
    }
    let inpaints_every_image = spec.prompts.iter().all(|p| {
        let outpaints = line_outpaint(p, spec.outpaint).is_some();
        (p.init_image_sha256.is_some() || !spec.init_image_sha256.is_empty())
            && (p.mask_sha256.is_some() || !spec.mask_sha256.is_empty() || outpaints)
    });
    if folder.is_inpainting()? && !inpaints_every_image {
        bail!(
            "model {} is an inpainting model (its unet takes a mask): give every image an init image and a mask (--init-image and --mask)",
            spec.model_id
        );
    }
    if let Some(latents) = &d.init_latents {
        if !from_noise {
            bail!(
                "--init-latents replaces the noise a text-to-image render starts from; this job starts from images (--init-image or init_image in the prompt file)"
            );
        }
        let items = spec.prompts.len() as u64 * u64::from(spec.images_per_prompt.max(1));
        hallmark_worker::diffusion::check_init_latents(
            latents,
            &folder,
            spec.width,
            spec.height,
            items,
        )?;
    }
    Ok(())
}

async fn render(cfg: &ClientConfig, mut args: RenderArgs, json: bool) -> anyhow::Result<i32> {
    let diffusion = match &cfg.coordinator {
        None => local_diffusion(&args.spec.engine, &args.diffusion)?,
        Some(_) => None,
    };
    if let Some(d) = &diffusion
        && args.spec.model.is_none()
    {
        args.spec.model = d.models.first().map(|(id, _)| id.clone());
    }
    let built = build_spec(&args.spec, cfg)?;
    if let Some(d) = &diffusion {
        check_local_job(d, &built)?;
    }
    let started = Instant::now();
    let (farm, url) = match &cfg.coordinator {
        Some(url) => (None, url.clone()),
        None => {
            let state_dir = args
                .state_dir
                .clone()
                .unwrap_or_else(|| cfg.state_dir.clone());
            let workers = LocalWorkers {
                count: args.workers.unwrap_or(cfg.workers).max(1),
                engine: args.spec.engine.clone(),
                // The local workers serve the job's model and its refiner.
                models: std::iter::once(built.spec.model_id.clone())
                    .chain(
                        built
                            .spec
                            .refine
                            .as_ref()
                            .map(|r| r.model_id.clone())
                            .filter(|m| !m.is_empty() && *m != built.spec.model_id),
                    )
                    .collect(),
                render_time: Duration::from_millis(args.render_ms),
                max_batch: 4,
                diffusion,
            };
            let stamping = farm_stamping(cfg, &state_dir)?;
            let listen = FarmListen {
                grpc: "127.0.0.1:0",
                metrics: None,
                http: None,
            };
            let farm =
                LocalFarm::start(&state_dir, &listen, &workers, stamping, None, None).await?;
            if !json {
                eprintln!(
                    "embedded farm: {} local workers, state in {}",
                    workers.count,
                    state_dir.display()
                );
            }
            let url = farm.local_url().to_string();
            (Some(farm), url)
        }
    };
    let result = render_on(&url, cfg, built, &args.output, json).await;
    if let Some(farm) = farm {
        farm.stop().await?;
    }
    let (job, files) = result?;
    let elapsed = started.elapsed();
    if json {
        println!(
            "{}",
            json!({"job": output::job_json(&job), "output": args.output, "files": files.len(), "seconds": elapsed.as_secs_f64()})
        );
    } else {
        print!("{}", output::job_text(&job));
        println!(
            "wrote {} to {} in {:.1}s",
            count(files.len(), "image"),
            args.output.display(),
            elapsed.as_secs_f64()
        );
    }
    Ok(job_exit(&job))
}

async fn render_on(
    url: &str,
    cfg: &ClientConfig,
    built: BuiltSpec,
    out: &Path,
    json: bool,
) -> anyhow::Result<(Job, Vec<PathBuf>)> {
    let remote = Remote::connect_as(url, cfg).await?;
    let job = submit_job(&remote, built, false).await?;
    let end = remote.watch(&job.job_id, false, json).await?;
    let files = remote.download(&job.job_id, out).await?;
    Ok((end, files.into_iter().map(|(p, _)| p).collect()))
}

/// Signing for an embedded farm whose state lives in `state_dir`.
fn farm_stamping(cfg: &ClientConfig, state_dir: &Path) -> anyhow::Result<FarmStamping> {
    let cfg = ClientConfig {
        state_dir: state_dir.to_path_buf(),
        ..cfg.clone()
    };
    let signing = credentials::farm_signing(&cfg)?;
    Ok(FarmStamping {
        stamping: credentials::stamping(&cfg, &signing)?,
        watermark_key: cfg.watermark_key.clone(),
        trust_anchors: signing.anchors_path,
        ledger_identity: signing.identity,
    })
}

/// `hallmark up`: the embedded farm as a long-running server.
async fn up(cfg: &ClientConfig, args: UpArgs) -> anyhow::Result<i32> {
    let state_dir = args.state_dir.unwrap_or_else(|| cfg.state_dir.clone());
    let auth = args
        .auth_tokens
        .as_deref()
        .map(crate::farm::FarmAuth::load)
        .transpose()?;
    let tls = args
        .tls
        .then(|| crate::farm::FarmTls::new(args.tls_names.clone(), args.tls_client_certs))
        .transpose()?;
    let workers = LocalWorkers {
        count: args.workers.unwrap_or(cfg.workers),
        diffusion: local_diffusion(&args.engine, &args.diffusion)?,
        engine: args.engine,
        models: args.models,
        render_time: Duration::from_millis(args.render_ms),
        max_batch: 4,
    };
    let stamping = farm_stamping(cfg, &state_dir)?;
    let listen = FarmListen {
        grpc: &args.listen,
        metrics: args.metrics_listen.as_deref(),
        http: args.http_listen.as_deref(),
    };
    let farm = LocalFarm::start(
        &state_dir,
        &listen,
        &workers,
        stamping,
        auth.as_ref(),
        tls.as_ref(),
    )
    .await?;
    println!(
        "hallmark farm up at {} with {} local workers (state in {})",
        farm.url(),
        workers.count,
        state_dir.display()
    );
    if let Some(addr) = farm.metrics_addr() {
        println!("metrics on http://{addr}/metrics");
    }
    if let Some(url) = farm.http_url() {
        println!("C2PA soft-binding API on {url}");
    }
    if let Some(tls) = &tls {
        let ca = crate::tls::FarmTlsCa::in_dir(&state_dir.join("tls"));
        println!(
            "TLS: joining machines verify the farm against {} (HALLMARK_TLS_CA=…, or hallmark-worker --tls-ca …)",
            ca.cert.display()
        );
        if tls.require_client_certs {
            println!(
                "every caller presents a client certificate from that CA: `hallmark tls client-cert NAME --state-dir {}` issues one (HALLMARK_TLS_CLIENT_CERT/_KEY, or hallmark-worker --tls-cert/--tls-key)",
                state_dir.display()
            );
        }
    }
    match &args.auth_tokens {
        Some(file) => {
            println!(
                "every call needs a token listed in {} (HALLMARK_TOKEN=… hallmark --coordinator {} submit PROMPTS)",
                file.display(),
                farm.url()
            );
            if !farm.is_loopback() && !farm.is_tls() {
                tracing::warn!(
                    "tokens reach this farm in the clear: add --tls, or use it only on a network you trust"
                );
            }
        }
        None => println!(
            "submit with: hallmark --coordinator {} submit PROMPTS",
            farm.url()
        ),
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    eprintln!("draining local workers…");
    farm.stop().await?;
    Ok(0)
}

/// `hallmark tls client-cert`: a client certificate from the farm's TLS CA.
fn tls_client_cert(
    cfg: &ClientConfig,
    name: &str,
    output: &Path,
    state_dir: Option<PathBuf>,
    json: bool,
) -> anyhow::Result<i32> {
    let state_dir = state_dir.unwrap_or_else(|| cfg.state_dir.clone());
    let ca = crate::tls::FarmTlsCa::open_or_init(&state_dir.join("tls"))?;
    let issued = ca.issue_client(name, output)?;
    if json {
        println!(
            "{}",
            json!({"certificate": issued.chain, "key": issued.key, "ca": ca.cert})
        );
    } else {
        println!(
            "client certificate for {name:?}: {} (key {})\non the joining machine: HALLMARK_TLS_CLIENT_CERT={} HALLMARK_TLS_CLIENT_KEY={} HALLMARK_TLS_CA={}",
            issued.chain.display(),
            issued.key.display(),
            issued.chain.display(),
            issued.key.display(),
            ca.cert.display()
        );
    }
    Ok(0)
}

/// An input named by its sha256 or by its file.
fn input_sha256(input: &str) -> anyhow::Result<String> {
    if hallmark_provenance::is_sha256_hex(input) {
        return Ok(input.to_ascii_lowercase());
    }
    let path = Path::new(input);
    if !path.is_file() {
        anyhow::bail!("{input:?} is neither an input's sha256 (64 hex digits) nor a file");
    }
    Ok(hash_file(path)?.0)
}

fn hash_file(path: &Path) -> anyhow::Result<(String, u64)> {
    let digest = hallmark_diffusion::model::sha256_file(path)?;
    let size = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    Ok((digest, size))
}

/// `hallmark verify`: offline checks, plus the repository when a
/// coordinator is configured.
async fn verify_command(
    cfg: &ClientConfig,
    paths: &[PathBuf],
    trust_anchors: Option<&Path>,
    tenant: Option<String>,
    json: bool,
) -> anyhow::Result<i32> {
    let files = verify::collect_files(paths)?;
    if files.is_empty() {
        bail!("no .png, .jpg, .jpeg or .webp files under the given paths");
    }
    let remote = match &cfg.coordinator {
        Some(url) => Some(Remote::connect_as(url, cfg).await?),
        None => None,
    };
    let verifier = verify::Verifier {
        trust_anchors: credentials::trust_anchors(cfg, trust_anchors)?,
        key: hallmark_provenance::watermark::WatermarkKey::from_secret(
            cfg.watermark_key.as_bytes(),
        ),
        remote,
        tenant: tenant.unwrap_or_else(|| cfg.tenant()),
    };
    let mut reports = Vec::with_capacity(files.len());
    for f in &files {
        reports.push(verifier.verify(f).await);
    }
    if json {
        let value = if reports.len() == 1 && paths.len() == 1 && !paths[0].is_dir() {
            serde_json::to_value(&reports[0])?
        } else {
            serde_json::to_value(&reports)?
        };
        println!("{value}");
    } else if reports.len() == 1 {
        verify::print_report(&reports[0]);
    } else {
        verify::print_table(&reports);
    }
    Ok(verify::exit_code(&reports))
}

/// `hallmark ca init DIR`.
fn ca_init(dir: &Path, organization: &str, alg: &str, json: bool) -> anyhow::Result<i32> {
    use hallmark_provenance::credentials::{SigningAlgorithm, ca};
    let files = ca::init(dir, organization, SigningAlgorithm::parse(alg)?)?;
    if json {
        println!(
            "{}",
            json!({"root_cert": files.root_cert, "signer_chain": files.signer_chain,
                   "signer_key": files.signer_key, "alg": files.alg.name()})
        );
    } else {
        println!("test CA for {organization:?} in {}", dir.display());
        println!(
            "  trust anchor (give to verifiers): {}",
            files.root_cert.display()
        );
        println!("  signing chain: {}", files.signer_chain.display());
        println!("  signing key:   {}", files.signer_key.display());
        println!(
            "use: HALLMARK_SIGNING_CERT_CHAIN={} HALLMARK_SIGNING_PRIVATE_KEY={} HALLMARK_SIGNING_ALG={}",
            files.signer_chain.display(),
            files.signer_key.display(),
            files.alg.name()
        );
    }
    Ok(0)
}

/// `hallmark token new`: a token, and the configuration line admitting it.
fn token_new(
    role: &str,
    expires_in: Option<&str>,
    expires: Option<&str>,
    json: bool,
) -> anyhow::Result<i32> {
    use hallmark_coordinator::auth;
    if auth::parse_role(role).is_none() {
        bail!("--role {role:?} is not tenant:NAME, worker[:NAME] or operator[:NAME]");
    }
    let expires =
        auth::expiry(expires_in, expires, std::time::SystemTime::now()).map_err(|e| anyhow!(e))?;
    let token = auth::new_token().context("reading the system's random generator")?;
    let digest = auth::token_digest(&token);
    if json {
        println!(
            "{}",
            json!({"token": token, "sha256": digest, "role": role, "expires": expires})
        );
    } else {
        println!("{token}");
        // Both lines are TOML, so `2>> auth.toml` builds the coordinator's list.
        eprintln!(
            "# {role}: the token on stdout is shown only now (give it to its holder as HALLMARK_TOKEN); admit it under [auth_tokens]:\n{}",
            auth::token_line(&digest, role, expires.as_deref())
        );
    }
    Ok(0)
}

/// `hallmark watermark embed|detect`: offline, on local files.
fn watermark_command(cfg: &ClientConfig, cmd: WatermarkCommand, json: bool) -> anyhow::Result<i32> {
    use hallmark_provenance::credentials::ImageFormat;
    use hallmark_provenance::watermark;
    let key = watermark::WatermarkKey::from_secret(cfg.watermark_key.as_bytes());
    let read = |path: &Path| -> anyhow::Result<image::RgbImage> {
        let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
        let img = image::load_from_memory(&bytes).with_context(|| {
            format!(
                "{} is not a PNG or JPEG image this build can read",
                path.display()
            )
        })?;
        Ok(img.to_rgb8())
    };
    match cmd {
        WatermarkCommand::Embed {
            input,
            output,
            payload,
        } => {
            let digits = payload.trim_start_matches("0x");
            if digits.is_empty() || digits.len() > 16 {
                bail!("--payload {payload:?} must be 1 to 16 hex digits (64 bits)");
            }
            let value = u64::from_str_radix(digits, 16)
                .with_context(|| format!("--payload {payload:?} is not hexadecimal"))?;
            let format = match output
                .extension()
                .and_then(|e| e.to_str())
                .map(str::to_ascii_lowercase)
                .as_deref()
            {
                Some("png") => ImageFormat::Png,
                Some("jpg" | "jpeg") => ImageFormat::Jpeg,
                _ => bail!(
                    "output {} must end in .png, .jpg or .jpeg",
                    output.display()
                ),
            };
            let img = read(&input)?;
            let marked = watermark::embed(&img, value, &key, watermark::EmbedOptions::default())
                .with_context(|| format!("marking {}", input.display()))?;
            let bytes = hallmark_provenance::credentials::encode_image(&marked, format)
                .with_context(|| format!("encoding {}", output.display()))?;
            remote::write_atomic(&output, &bytes)?;
            let psnr = watermark::psnr(&img, &marked);
            if json {
                println!(
                    "{}",
                    json!({"output": output, "payload": format!("{value:016x}"), "psnr_db": psnr})
                );
            } else {
                println!(
                    "marked {} with payload {value:016x} (PSNR {psnr:.1} dB)",
                    output.display()
                );
            }
            Ok(0)
        }
        WatermarkCommand::Detect { input } => {
            let img = read(&input)?;
            // Farm outputs: an upscale's mark is made with its stage's key.
            match watermark::detect_stages(&img, &key).next().map(|(_, d)| d) {
                Some(d) => {
                    if json {
                        println!(
                            "{}",
                            json!({"found": true, "payload": format!("{:016x}", d.payload), "confidence": d.sync_z,
                                   "bit_agreement": d.agreement, "scale": d.scale, "rotation_deg": d.rotation_deg})
                        );
                    } else {
                        println!(
                            "watermark {:016x} (confidence {:.1}σ, {:.0}% of coded bits agree; scale {:.2}, rotation {:.1}°)",
                            d.payload,
                            d.sync_z,
                            d.agreement * 100.0,
                            d.scale,
                            d.rotation_deg
                        );
                    }
                    Ok(0)
                }
                None => {
                    if json {
                        println!("{}", json!({"found": false}));
                    } else {
                        println!("no watermark found in {}", input.display());
                    }
                    Ok(2)
                }
            }
        }
    }
}

/// `n` things, as English says it: "1 image", "2 images".
fn count(n: usize, thing: &str) -> String {
    if n == 1 {
        format!("1 {thing}")
    } else {
        format!("{n} {thing}s")
    }
}

/// `--outpaint left=128,right=64`: pixels of new canvas per side, each side
/// named once.
pub(crate) fn parse_outpaint(text: &str) -> Result<hallmark_proto::v1::Outpaint, String> {
    let mut o = hallmark_proto::v1::Outpaint::default();
    let mut seen = Vec::new();
    for part in text.split(',') {
        let (side, px) = part
            .split_once('=')
            .ok_or_else(|| format!("{part:?} is not SIDE=PX (e.g. left=128)"))?;
        let side = side.trim();
        let px: u32 = px
            .trim()
            .parse()
            .map_err(|_| format!("{side}={px}: the pixels must be a whole number"))?;
        if seen.contains(&side) {
            return Err(format!("{side} is given twice"));
        }
        seen.push(side);
        match side {
            "left" => o.left = px,
            "top" => o.top = px,
            "right" => o.right = px,
            "bottom" => o.bottom = px,
            other => {
                return Err(format!(
                    "unknown side {other:?}: left, top, right or bottom"
                ));
            }
        }
    }
    Ok(o)
}
