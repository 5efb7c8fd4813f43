//! `hallmark-worker`: a worker process that leases tasks from a coordinator.

use std::sync::Arc;
use std::time::Duration;

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hallmark_provenance::credentials::{SigningAlgorithm, SigningIdentity};
use hallmark_provenance::watermark;
use hallmark_worker::stamp::StampSettings;
use hallmark_worker::{StampConfig, Stamping, SyntheticConfig, SyntheticEngine, WorkerConfig};

/// See the workspace manifest: glibc's malloc unmaps freed tensors, so every
/// large allocation faults its pages in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Leases tasks from a coordinator, renders them and uploads the results.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Coordinator URL.
    #[arg(
        long,
        env = "HALLMARK_COORDINATOR",
        default_value = "http://127.0.0.1:7070"
    )]
    coordinator: String,
    /// Name shown in `hallmark workers`.
    #[arg(long, env = "HALLMARK_WORKER_NAME", default_value = "")]
    name: String,
    /// Token of a `worker` role, for a coordinator with `auth = "tokens"`
    /// (`hallmark token new --role worker`); best passed in the environment.
    #[arg(long, env = "HALLMARK_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM certificates an `https://` coordinator's certificate is verified
    /// against (default: the system's roots).
    #[arg(long, env = "HALLMARK_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// PEM client certificate chain this worker presents, for a
    /// coordinator that requires one (`tls_client_ca`); with --tls-key.
    #[arg(long, env = "HALLMARK_TLS_CLIENT_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "HALLMARK_TLS_CLIENT_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Render engine: synthetic or diffusion.
    #[arg(long, default_value = "synthetic")]
    engine: String,
    /// Model ids to serve (synthetic engine; default synthetic-v1). The
    /// diffusion engine serves the folders of --model-path instead.
    #[arg(long = "model")]
    models: Vec<String>,
    #[command(flatten)]
    diffusion: hallmark_worker::diffusion::DiffusionArgs,
    /// Simulated render time per batch, in milliseconds (synthetic engine).
    #[arg(long, default_value_t = 0)]
    render_ms: u64,
    /// Prompts containing this text fail (synthetic engine, for fault tests).
    #[arg(long)]
    fail_marker: Option<String>,
    /// Prompts containing this text are refused for good (synthetic engine,
    /// for fault tests).
    #[arg(long)]
    refuse_marker: Option<String>,
    /// Most tasks per batch.
    #[arg(long, default_value_t = 4)]
    max_batch: u32,
    /// Largest output in pixels this worker holds.
    #[arg(long, default_value_t = 4096 * 4096)]
    max_pixels: u64,
    /// Seconds to finish held work on SIGTERM before handing it back.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
    /// Threads that stamp a batch's outputs side by side (watermark,
    /// encode, sign); default: this machine's cores. Lower it where several
    /// workers share a node (one per GPU).
    #[arg(long, env = "HALLMARK_STAMP_THREADS")]
    stamp_threads: Option<usize>,
    /// Batches held at once: 2 renders the next batch while the last one's
    /// outputs are stamped and uploaded; 1 does one thing at a time.
    #[arg(long, env = "HALLMARK_BATCHES_IN_HAND", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=8))]
    batches_in_hand: u32,
    /// PEM certificate chain outputs are signed with (signing certificate
    /// first); `hallmark ca init` makes a test one.
    #[arg(long, env = "HALLMARK_SIGNING_CERT_CHAIN")]
    cert_chain: PathBuf,
    /// PKCS#8 PEM private key of the signing certificate.
    #[arg(long, env = "HALLMARK_SIGNING_PRIVATE_KEY")]
    private_key: PathBuf,
    /// es256 or ed25519.
    #[arg(long, env = "HALLMARK_SIGNING_ALG", default_value = "es256")]
    signing_alg: String,
    /// RFC 3161 timestamp authority URL.
    #[arg(long, env = "HALLMARK_TSA_URL")]
    tsa_url: Option<String>,
    /// PEM roots the deployment trusts (base images are checked against them).
    #[arg(long, env = "HALLMARK_TRUST_ANCHORS")]
    trust_anchors: Option<PathBuf>,
    /// Watermark key secret; the default is for development only.
    #[arg(long, env = "HALLMARK_WATERMARK_KEY", default_value = watermark::DEVELOPMENT_KEY, hide_default_value = true)]
    watermark_key: String,
    /// What the signed record says of the prompt: keep, hash or omit.
    #[arg(long, env = "HALLMARK_PROMPT_POLICY", default_value = "hash")]
    prompt_policy: String,
    /// cawg.training-mining preference: allowed, notAllowed, constrained or none.
    #[arg(long, env = "HALLMARK_TRAINING_MINING", default_value = "notAllowed")]
    training_mining: String,
    /// Address of the Prometheus endpoint, GET /metrics (e.g. 0.0.0.0:9465);
    /// unset: no metrics are kept.
    #[arg(long, env = "HALLMARK_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// Output format: png, jpeg or webp.
    #[arg(long, env = "HALLMARK_OUTPUT_FORMAT", default_value = "png")]
    output_format: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HALLMARK_LOG")
                .unwrap_or_else(|_| "hallmark_worker=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if let Some(addr) = args.metrics_listen.as_deref().filter(|a| !a.is_empty()) {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("listening for metrics on {addr}"))?;
        let handle = hallmark_telemetry::recorder()?;
        hallmark_worker::metrics::describe();
        let served = hallmark_telemetry::serve(listener, handle, None, std::future::pending())?;
        eprintln!("metrics on http://{served}/metrics");
    }
    let engine: Arc<dyn hallmark_worker::Engine> = match args.engine.as_str() {
        "synthetic" => Arc::new(SyntheticEngine::new(SyntheticConfig {
            models: if args.models.is_empty() {
                vec!["synthetic-v1".into()]
            } else {
                args.models
            },
            render_time: Duration::from_millis(args.render_ms),
            fail_marker: args.fail_marker,
            refuse_marker: args.refuse_marker,
        })),
        "diffusion" => {
            if !args.models.is_empty() {
                anyhow::bail!(
                    "--model names synthetic models; the diffusion engine serves --model-path [ID=]DIR"
                );
            }
            let config = args.diffusion.config()?;
            Arc::new(
                tokio::task::spawn_blocking(move || hallmark_worker::DiffusionEngine::new(config))
                    .await?
                    .context("opening the diffusion models")?,
            )
        }
        other => anyhow::bail!("unknown engine {other:?} (synthetic, diffusion)"),
    };
    let identity = SigningIdentity::load(
        &args.cert_chain,
        &args.private_key,
        SigningAlgorithm::parse(&args.signing_alg)?,
        args.tsa_url,
    )
    .context("loading the signing identity")?;
    let stamping = Stamping::new(StampConfig::from_settings(StampSettings {
        identity,
        trust_anchors: args.trust_anchors.as_deref(),
        watermark_key: &args.watermark_key,
        prompt_policy: &args.prompt_policy,
        training_mining: &args.training_mining,
        output_format: &args.output_format,
    })?)
    .context("preparing the signer")?;
    let defaults = WorkerConfig::new(stamping);
    let config = WorkerConfig {
        name: args.name,
        max_pixels: args.max_pixels,
        max_batch: args.max_batch,
        drain_timeout: Duration::from_secs(args.drain_secs),
        token: args.token,
        stamp_threads: args.stamp_threads.unwrap_or(defaults.stamp_threads),
        batches_in_hand: args.batches_in_hand as usize,
        ..defaults
    };
    let tls = hallmark_proto::client::ClientTls {
        ca: args.tls_ca,
        identity: args.tls_cert.zip(args.tls_key),
        server_name: None,
    };
    let channel = hallmark_worker::channel(&args.coordinator, &tls)?;
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
    };
    let report = hallmark_worker::run(channel, config, engine, shutdown).await?;
    println!(
        "worker {} stopped: {} completed, {} failed, {} dropped, {} handed back",
        report.worker_id, report.completed, report.failed, report.dropped, report.handed_back
    );
    Ok(())
}
