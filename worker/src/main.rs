//! `hallmark-worker`: a worker process that leases tasks from a coordinator.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use hallmark_worker::{SyntheticConfig, SyntheticEngine, WorkerConfig};

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
    /// Render engine: synthetic (the diffusion engine is not built yet).
    #[arg(long, default_value = "synthetic")]
    engine: String,
    /// Model ids to serve (synthetic engine).
    #[arg(long = "model", default_value = "synthetic-v1")]
    models: Vec<String>,
    /// Simulated render time per batch, in milliseconds (synthetic engine).
    #[arg(long, default_value_t = 0)]
    render_ms: u64,
    /// Prompts containing this text fail (synthetic engine, for fault tests).
    #[arg(long)]
    fail_marker: Option<String>,
    /// Most tasks per batch.
    #[arg(long, default_value_t = 4)]
    max_batch: u32,
    /// Largest output in pixels this worker holds.
    #[arg(long, default_value_t = 4096 * 4096)]
    max_pixels: u64,
    /// Seconds to finish held work on SIGTERM before handing it back.
    #[arg(long, default_value_t = 30)]
    drain_secs: u64,
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
    if args.engine != "synthetic" {
        anyhow::bail!(
            "engine {:?} is not available in this build: only `synthetic` is implemented so far (the diffusion engine is tracked in its own issue)",
            args.engine
        );
    }
    let engine = Arc::new(SyntheticEngine::new(SyntheticConfig {
        models: args.models,
        render_time: Duration::from_millis(args.render_ms),
        fail_marker: args.fail_marker,
    }));
    let config = WorkerConfig {
        name: args.name,
        max_pixels: args.max_pixels,
        max_batch: args.max_batch,
        drain_timeout: Duration::from_secs(args.drain_secs),
        ..Default::default()
    };
    let channel = hallmark_worker::channel(&args.coordinator)?;
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
