//! Starting and stopping a coordinator: store, blob store, notifier, the
//! reaper loop, the gRPC server (with health checking and reflection) and
//! the optional HTTP soft-binding resolution API and Prometheus endpoint.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hallmark_proto::v1::jobs_server::JobsServer;
use hallmark_proto::v1::provenance_server::ProvenanceServer;
use hallmark_proto::v1::registry_server::RegistryServer;
use hallmark_proto::v1::workers_server::WorkersServer;
use hallmark_provenance::watermark::WatermarkKey;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::service::interceptor::InterceptedService;

use crate::auth::Gate;
use crate::blobs::BlobStore;
use crate::config::CoordinatorConfig;
use crate::notify::Notifier;
use crate::service::{
    Coordinator, JobsService, ProvenanceService, RegistryService, WorkersService,
};
use crate::stamps::StampCheck;
use crate::store::Store;

/// Largest gRPC message accepted (chunks are far smaller; this bounds abuse).
const MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// A coordinator that is serving; [`RunningCoordinator::stop`] shuts it down.
pub struct RunningCoordinator {
    pub addr: SocketAddr,
    /// Whether gRPC is served over TLS (`https://`).
    pub tls: bool,
    /// The C2PA soft-binding resolution API, when `http_listen` is set.
    pub http_addr: Option<SocketAddr>,
    /// The Prometheus endpoint, when `metrics_listen` is set.
    pub metrics_addr: Option<SocketAddr>,
    /// The plain-text health endpoint, when `health_listen` is set.
    pub health_addr: Option<SocketAddr>,
    pub state: Arc<Coordinator>,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    health_server: Option<JoinHandle<Result<(), tonic::transport::Error>>>,
    reaper: JoinHandle<()>,
    token_reloader: Option<JoinHandle<()>>,
    revoked_reloader: Option<JoinHandle<()>>,
}

impl RunningCoordinator {
    /// `http://addr` (`https://` with TLS), for clients and workers.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.addr)
    }

    /// The soft-binding API's `http://addr` (`https://` with TLS, which it
    /// serves too), when `http_listen` is set.
    pub fn http_url(&self) -> Option<String> {
        self.http_addr
            .map(|addr| format!("{}://{addr}", self.scheme()))
    }

    fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// Stops accepting calls, lets running ones finish, stops the reaper and
    /// seals what the audit ledger still holds unsealed.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.shutdown.send(true);
        self.reaper.abort();
        for reloader in [&self.token_reloader, &self.revoked_reloader]
            .into_iter()
            .flatten()
        {
            reloader.abort();
        }
        self.server.await.context("coordinator server task")??;
        if let Some(health) = self.health_server {
            health.await.context("coordinator health server task")??;
        }
        self.state
            .seal_ledger()
            .await
            .context("sealing the audit ledger")?;
        Ok(())
    }

    /// Waits until the server ends by itself (an error) or forever.
    pub async fn wait(&mut self) -> anyhow::Result<()> {
        (&mut self.server)
            .await
            .context("coordinator server task")??;
        Ok(())
    }
}

/// Connects the store and starts serving on `config.listen`.
pub async fn start(config: CoordinatorConfig) -> anyhow::Result<RunningCoordinator> {
    let listener = TcpListener::bind(&config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    start_on(listener, config).await
}

/// Like [`start`], on a listener the caller already bound (port 0 for tests).
pub async fn start_on(
    listener: TcpListener,
    config: CoordinatorConfig,
) -> anyhow::Result<RunningCoordinator> {
    let store = Store::connect(&config.database_url, config.database_max_connections)
        .await
        .with_context(|| format!("opening the store at {}", redact(&config.database_url)))?;
    let blobs = match &config.blob_url {
        Some(url) if !url.is_empty() => {
            BlobStore::open_url(url, &config.blob_options, config.blob_dir.join("tmp"))
                .with_context(|| format!("opening the blob store at {url}"))?
        }
        _ => BlobStore::open(&config.blob_dir)
            .with_context(|| format!("opening the blob store at {}", config.blob_dir.display()))?,
    };
    let notifier = match &config.redis_url {
        Some(url) if !url.is_empty() => {
            Notifier::with_redis(url).with_context(|| format!("redis url {url}"))?
        }
        _ => Notifier::local(),
    };
    let gate = Gate::from_config(&config.auth, &config.auth_tokens, &config.pinned_tokens)?;
    match gate.tokens() {
        Some(t) => {
            tracing::info!(roles = ?t.roles(), "callers need a token");
            crate::auth::log_expired(&t);
        }
        None if !is_loopback(&listener) => tracing::warn!(
            "auth = \"off\" on a non-loopback address: anyone who reaches it can submit as any tenant, lease work and read prompts; set auth = \"tokens\""
        ),
        None => {}
    }
    let reload_tokens = gate.tokens().is_some();
    let has_tls = config.tls_cert.is_some();
    // The HTTP API serves HTTPS with the same certificate.
    let mut http_tls = None;
    let tls = match (&config.tls_cert, &config.tls_key) {
        (Some(cert), Some(key)) => {
            let read = |path: &std::path::PathBuf, what: &str| {
                std::fs::read(path)
                    .with_context(|| format!("reading the TLS {what} {}", path.display()))
            };
            let (cert, key) = (
                read(cert, "certificate chain (tls_cert)")?,
                read(key, "private key (tls_key)")?,
            );
            if config.http_listen.is_some() {
                http_tls = Some(crate::http::tls_acceptor(&cert, &key)?);
            }
            let tls = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key));
            Some(match &config.tls_client_ca {
                Some(roots) => tls.client_ca_root(tonic::transport::Certificate::from_pem(read(
                    roots,
                    "client roots (tls_client_ca)",
                )?)),
                None => tls,
            })
        }
        (None, None) if config.tls_client_ca.is_some() => anyhow::bail!(
            "tls_client_ca asks callers for certificates, which needs TLS: set tls_cert and tls_key too"
        ),
        (None, None) => None,
        _ => anyhow::bail!("tls_cert and tls_key go together: set both for TLS, or neither"),
    };
    if config.tls_revoked_certs.is_some() && config.tls_client_ca.is_none() {
        anyhow::bail!(
            "tls_revoked_certs lists client certificates to refuse, which needs tls_client_ca (client certificates required)"
        );
    }
    let trust_anchors = match &config.trust_anchors {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("reading trust anchors {}", path.display()))?,
        ),
        None => None,
    };
    let ledger_signer = ledger_signing_identity(&config)?;
    match &ledger_signer {
        Some(_) => tracing::info!(
            interval_ms = config.ledger_checkpoint_interval_ms,
            "audit ledger checkpoints are signed"
        ),
        None => tracing::info!(
            "audit ledger checkpoints are not signed (set signing_cert_chain and signing_private_key)"
        ),
    }
    let stamps = StampCheck::new(
        trust_anchors,
        WatermarkKey::from_secret(config.watermark_key.as_bytes()),
        config.verify_watermark_on_upload,
    );
    let http_listener = match &config.http_listen {
        Some(addr) if !addr.is_empty() => Some((
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for HTTP on {addr}"))?,
            crate::http::ClientRate::from_config(&config)?,
        )),
        _ => None,
    };
    let health_listener = match &config.health_listen {
        Some(addr) if !addr.is_empty() => {
            Some(TcpListener::bind(addr).await.with_context(|| {
                format!("listening for health checks (health_listen) on {addr}")
            })?)
        }
        _ => None,
    };
    let metrics = match &config.metrics_listen {
        Some(addr) if !addr.is_empty() => {
            let listener = TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening for metrics on {addr}"))?;
            let handle = hallmark_telemetry::recorder()?;
            crate::metrics::describe();
            gate.report_expiries();
            Some((listener, handle))
        }
        _ => None,
    };
    let addr = listener.local_addr()?;
    let (shutdown, mut shutdown_rx) = watch::channel(false);
    let state = Arc::new(Coordinator::new(
        store,
        blobs,
        notifier,
        config,
        stamps,
        ledger_signer,
        shutdown_rx.clone(),
    ));
    let token_reloader = match (
        &state.config.config_file,
        state.config.auth_reload_interval_ms,
    ) {
        (Some(file), ms) if reload_tokens && ms > 0 => {
            Some(gate.reload_from(file.clone(), Duration::from_millis(ms)))
        }
        _ => None,
    };
    let revoked_reloader = match (&state.config.tls_revoked_certs, &state.config.tls_client_ca) {
        (Some(file), Some(roots)) => Some(
            gate.revoke_from(
                file.clone(),
                Duration::from_millis(state.config.auth_reload_interval_ms.max(100)),
                std::fs::read(roots)
                    .with_context(|| format!("reading tls_client_ca {}", roots.display()))?,
            )?,
        ),
        _ => None,
    };
    let reaper_state = state.clone();
    let reaper = tokio::spawn(async move {
        let every = Duration::from_millis(reaper_state.config.reap_interval_ms.max(10));
        let retention = reaper_state.config.input_retention();
        // Inputs are looked at a tenth of their retention apart, at least
        // every minute (without a retention, every minute for the blobs
        // deletions left to remove).
        let sweep_every =
            Duration::from_millis(retention.map_or(60_000, |r| (r / 10).clamp(100, 60_000) as u64));
        let mut next_sweep = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = reaper_state.reap_once().await {
                tracing::warn!(error = %e, "reap pass failed; will retry");
            }
            if tokio::time::Instant::now() >= next_sweep {
                next_sweep = tokio::time::Instant::now() + sweep_every;
                if let Err(e) = reaper_state.purge_unused_inputs().await {
                    tracing::warn!(error = %e, "input retention pass failed; will retry");
                }
            }
        }
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<JobsServer<JobsService>>().await;
    health.set_serving::<WorkersServer<WorkersService>>().await;
    health
        .set_serving::<RegistryServer<RegistryService>>()
        .await;
    health
        .set_serving::<ProvenanceServer<ProvenanceService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(hallmark_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .context("building gRPC reflection")?;

    // Health alone, in plain text, for probes that cannot speak TLS.
    let (health_addr, health_server) = match health_listener {
        Some(listener) => {
            let addr = listener.local_addr()?;
            let mut stop = shutdown_rx.clone();
            let server = tonic::transport::Server::builder()
                .add_service(health_service.clone())
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async move {
                    let _ = stop.wait_for(|s| *s).await;
                });
            (Some(addr), Some(tokio::spawn(server)))
        }
        None => (None, None),
    };
    let mut builder = tonic::transport::Server::builder().tcp_nodelay(true);
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .context("the TLS certificate and key (tls_cert, tls_key)")?;
    }
    let router = builder
        .layer(crate::metrics::GrpcMetricsLayer {
            enabled: metrics.is_some(),
        })
        .add_service(health_service)
        .add_service(reflection)
        .add_service(InterceptedService::new(
            JobsServer::new(JobsService(state.clone())).max_decoding_message_size(MAX_MESSAGE),
            gate.clone(),
        ))
        .add_service(InterceptedService::new(
            WorkersServer::new(WorkersService(state.clone()))
                .max_decoding_message_size(MAX_MESSAGE),
            gate.clone(),
        ))
        .add_service(RegistryServer::with_interceptor(
            RegistryService(state.clone()),
            gate.clone(),
        ))
        .add_service(ProvenanceServer::with_interceptor(
            ProvenanceService(state.clone()),
            gate,
        ));
    let http_addr = match http_listener {
        Some((listener, rate)) => Some(crate::http::serve(
            listener,
            state.clone(),
            shutdown_rx.clone(),
            http_tls,
            rate,
        )?),
        None => None,
    };
    let metrics_addr = match metrics {
        Some((listener, handle)) => {
            let mut stop = shutdown_rx.clone();
            Some(hallmark_telemetry::serve(
                listener,
                handle,
                Some(state.clone() as Arc<dyn hallmark_telemetry::Refresh>),
                async move {
                    let _ = stop.wait_for(|s| *s).await;
                },
            )?)
        }
        None => None,
    };
    let server = tokio::spawn(router.serve_with_incoming_shutdown(
        TcpListenerStream::new(listener),
        async move {
            let _ = shutdown_rx.wait_for(|stop| *stop).await;
        },
    ));
    tracing::info!(%addr, tls = has_tls, ?http_addr, ?metrics_addr, ?health_addr, "coordinator listening");
    Ok(RunningCoordinator {
        addr,
        tls: has_tls,
        http_addr,
        metrics_addr,
        health_addr,
        state,
        shutdown,
        server,
        health_server,
        reaper,
        token_reloader,
        revoked_reloader,
    })
}

fn is_loopback(listener: &TcpListener) -> bool {
    listener.local_addr().is_ok_and(|a| a.ip().is_loopback())
}

/// Hides a password in a database URL before it is logged.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => match url[s + 3..at].find(':') {
            Some(colon) => format!("{}:***{}", &url[..s + 3 + colon], &url[at..]),
            None => url.to_string(),
        },
        _ => url.to_string(),
    }
}

/// The identity the audit ledger's checkpoints are signed with: one handed
/// over in code, or the configured files (both, or neither).
fn ledger_signing_identity(
    config: &CoordinatorConfig,
) -> anyhow::Result<Option<hallmark_provenance::credentials::SigningIdentity>> {
    use hallmark_provenance::credentials::{SigningAlgorithm, SigningIdentity};
    if let Some(identity) = &config.signing_identity {
        return Ok(Some(identity.clone()));
    }
    match (&config.signing_cert_chain, &config.signing_private_key) {
        (Some(chain), Some(key)) => {
            let alg = SigningAlgorithm::parse(&config.signing_alg)?;
            let tsa = config.ledger_tsa_url.clone().filter(|u| !u.is_empty());
            let identity = SigningIdentity::load(chain, key, alg, tsa).context(
                "loading the ledger's signing identity (signing_cert_chain, signing_private_key, ledger_tsa_url)",
            )?;
            // A time-stamp authority URL that cannot be used is refused now.
            identity.check().context("ledger_tsa_url")?;
            // A key that cannot sign is found now, not at the first
            // checkpoint; the time-stamp authority is not asked (one that
            // is down does not keep the coordinator from starting).
            let untimed = SigningIdentity {
                tsa_url: None,
                ..identity.clone()
            };
            hallmark_provenance::credentials::detached::sign_detached(&untimed, b"start-up check")
                .context("signing with signing_cert_chain and signing_private_key")?;
            Ok(Some(identity))
        }
        (None, None) => Ok(None),
        _ => anyhow::bail!(
            "signing_cert_chain and signing_private_key go together: set both to sign the audit ledger, or neither"
        ),
    }
}
