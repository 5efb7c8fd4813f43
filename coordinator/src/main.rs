//! `hallmark-coordinator`: the gRPC coordinator as a standalone server.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use hallmark_coordinator::CoordinatorConfig;

/// Serves jobs to clients and tasks to workers.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// TOML config file; HALLMARK_* environment variables and flags override it.
    #[arg(long, env = "HALLMARK_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on (e.g. 0.0.0.0:7070).
    #[arg(long)]
    listen: Option<String>,
    /// postgres://… or sqlite://…
    #[arg(long)]
    database_url: Option<String>,
    /// redis://… for wake-ups and event fan-out between replicas.
    #[arg(long)]
    redis_url: Option<String>,
    /// Directory of the blob store.
    #[arg(long)]
    blob_dir: Option<PathBuf>,
    /// Object-store URL for blobs (s3://bucket/prefix) instead of --blob-dir.
    #[arg(long)]
    blob_url: Option<String>,
    /// Address of the HTTP C2PA soft-binding resolution API (e.g. 0.0.0.0:7071).
    #[arg(long)]
    http_listen: Option<String>,
    /// Address of the Prometheus endpoint, GET /metrics (e.g. 0.0.0.0:9464).
    #[arg(long)]
    metrics_listen: Option<String>,
    /// PEM file of the roots upload signatures must chain to.
    #[arg(long)]
    trust_anchors: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("HALLMARK_LOG")
                .unwrap_or_else(|_| "hallmark_coordinator=info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let mut overrides = Vec::new();
    if let Some(v) = args.listen {
        overrides.push(("listen", v));
    }
    if let Some(v) = args.database_url {
        overrides.push(("database_url", v));
    }
    if let Some(v) = args.redis_url {
        overrides.push(("redis_url", v));
    }
    if let Some(v) = args.blob_url {
        overrides.push(("blob_url", v));
    }
    if let Some(v) = args.blob_dir {
        overrides.push(("blob_dir", v.display().to_string()));
    }
    if let Some(v) = args.http_listen {
        overrides.push(("http_listen", v));
    }
    if let Some(v) = args.metrics_listen {
        overrides.push(("metrics_listen", v));
    }
    if let Some(v) = args.trust_anchors {
        overrides.push(("trust_anchors", v.display().to_string()));
    }
    let config = CoordinatorConfig::load(args.config.as_deref(), &overrides)?;
    for variable in CoordinatorConfig::unrecognised_variables(std::env::vars().map(|(k, _)| k)) {
        tracing::warn!(%variable, "not a coordinator setting (coordinator/src/config.rs); ignored");
    }
    let mut running = hallmark_coordinator::start(config)
        .await
        .context("starting the coordinator")?;
    println!("listening on {}", running.addr);
    if let Some(url) = running.http_url() {
        println!("soft-binding API on {url}");
    }
    if let Some(metrics) = running.metrics_addr {
        println!("metrics on http://{metrics}/metrics");
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = running.wait() => return r,
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down");
    running.stop().await
}
