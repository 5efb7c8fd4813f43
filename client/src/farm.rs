//! The embedded farm of single-node mode: a coordinator on SQLite in the
//! state directory, with an in-process notifier, plus local workers in the
//! same process, all talking real gRPC over loopback.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use hallmark_coordinator::config::TokenEntry;
use hallmark_coordinator::{CoordinatorConfig, RunningCoordinator};
use hallmark_proto::v1::ListWorkersRequest;
use hallmark_provenance::credentials::SigningIdentity;
use hallmark_worker::{Stamping, SyntheticConfig, SyntheticEngine, WorkerConfig, WorkerReport};
use serde::Deserialize;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use hallmark_proto::client::ClientTls;

use crate::remote::Remote;

/// What the local workers run.
#[derive(Debug, Clone)]
pub struct LocalWorkers {
    pub count: u32,
    pub engine: String,
    pub models: Vec<String>,
    pub render_time: Duration,
    pub max_batch: u32,
    /// The diffusion engine's settings (engine `diffusion`).
    pub diffusion: Option<hallmark_worker::DiffusionConfig>,
}

/// How the embedded farm stamps and checks its outputs.
#[derive(Clone)]
pub struct FarmStamping {
    pub stamping: Arc<Stamping>,
    /// The coordinator's copy of the watermark key (it checks uploads).
    pub watermark_key: String,
    /// Roots the coordinator requires upload signatures to chain to.
    pub trust_anchors: Option<PathBuf>,
    /// What the coordinator signs the audit ledger's checkpoints with (the
    /// farm's signing identity).
    pub ledger_identity: SigningIdentity,
}

/// Token authentication for an embedded farm that other machines join
/// (`hallmark up --auth-tokens FILE`): the file's `auth_tokens` admit
/// outside callers, read again as the file changes, and the farm's own
/// workers and calls use tokens it makes for itself, held only in memory.
#[derive(Debug, Clone)]
pub struct FarmAuth {
    file: PathBuf,
    tokens: BTreeMap<String, TokenEntry>,
    reload_interval_ms: u64,
}

/// What `hallmark up --auth-tokens` reads: a coordinator configuration
/// holding the authentication settings and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AuthFile {
    auth: Option<String>,
    #[serde(default)]
    auth_tokens: BTreeMap<String, TokenEntry>,
    auth_reload_interval_ms: Option<u64>,
}

impl FarmAuth {
    /// Reads and checks `file`: `auth = "tokens"` and at least one valid
    /// entry in `[auth_tokens]` (the form `hallmark token new` prints), as a
    /// coordinator would take them.
    pub fn load(file: &Path) -> anyhow::Result<Self> {
        let shown = file.display();
        if !file.is_file() {
            anyhow::bail!("--auth-tokens {shown}: no such file");
        }
        let parsed: AuthFile = config::Config::builder()
            .add_source(config::File::from(file.to_path_buf()).format(config::FileFormat::Toml))
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| {
                anyhow::anyhow!(
                    "--auth-tokens {shown}: {e} (the file holds auth = \"tokens\", [auth_tokens] and optionally auth_reload_interval_ms)"
                )
            })?;
        match parsed.auth.as_deref() {
            Some("tokens") => {}
            Some(other) => anyhow::bail!(
                "--auth-tokens {shown}: auth = {other:?}; a farm that checks tokens needs auth = \"tokens\""
            ),
            None => anyhow::bail!(
                "--auth-tokens {shown}: no auth = \"tokens\" line (put it above [auth_tokens], as in a coordinator's configuration)"
            ),
        }
        hallmark_coordinator::auth::Tokens::from_config("tokens", &parsed.auth_tokens)
            .map_err(|e| anyhow::anyhow!("--auth-tokens {shown}: {e}"))?;
        Ok(Self {
            file: file.to_path_buf(),
            tokens: parsed.auth_tokens,
            reload_interval_ms: parsed
                .auth_reload_interval_ms
                .unwrap_or(CoordinatorConfig::default().auth_reload_interval_ms),
        })
    }
}

/// TLS for an embedded farm that other machines join (`hallmark up
/// --tls`): a server certificate from the farm's own TLS CA
/// (`STATE/tls/ca.pem`, which joining machines verify it against), and
/// optionally client certificates required of every caller.
#[derive(Debug, Clone, Default)]
pub struct FarmTls {
    /// Names the server certificate holds beside the loopback names, the
    /// listen address and the host name (`--tls-name`), each checked.
    names: Vec<String>,
    /// Every caller must present a client certificate from the farm's TLS
    /// CA (`hallmark tls client-cert`); the farm's own workers get one.
    pub require_client_certs: bool,
}

impl FarmTls {
    /// Checks `names` before anything is made.
    pub fn new(names: Vec<String>, require_client_certs: bool) -> anyhow::Result<Self> {
        for n in &names {
            crate::tls::check_name(n)?;
        }
        Ok(Self {
            names,
            require_client_certs,
        })
    }
}

/// A token for `role` made for this process only: (token, its config entry).
fn own_token(role: &str) -> anyhow::Result<(String, (String, TokenEntry))> {
    let token = hallmark_coordinator::auth::new_token()
        .map_err(|e| anyhow::anyhow!("making a token for the farm's own {role}: {e}"))?;
    let digest = hallmark_coordinator::auth::token_digest(&token);
    Ok((token, (digest, TokenEntry::Role(role.into()))))
}

/// The URL the farm's own workers and calls use: its address, or loopback
/// where it listens on every address (loopback is in its certificate).
fn local_url(coordinator: &RunningCoordinator) -> String {
    let mut addr = coordinator.addr;
    match addr.ip() {
        std::net::IpAddr::V4(ip) if ip.is_unspecified() => {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into())
        }
        std::net::IpAddr::V6(ip) if ip.is_unspecified() => {
            addr.set_ip(std::net::Ipv6Addr::LOCALHOST.into())
        }
        _ => {}
    }
    let scheme = if coordinator.tls { "https" } else { "http" };
    format!("{scheme}://{addr}")
}

/// A running embedded farm.
pub struct LocalFarm {
    coordinator: RunningCoordinator,
    /// Where the farm's own workers and calls reach it.
    local_url: String,
    workers: Vec<JoinHandle<anyhow::Result<WorkerReport>>>,
    stop: watch::Sender<bool>,
}

/// The embedded farm's coordinator settings for `state_dir`.
fn coordinator_config(state_dir: &Path, listen: &str) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: listen.to_string(),
        database_url: format!("sqlite://{}", state_dir.join("coordinator.db").display()),
        blob_dir: state_dir.join("blobs"),
        poll_interval_ms: 500,
        ..Default::default()
    }
}

/// Whether `state_dir` holds an embedded farm's state.
pub fn has_state(state_dir: &Path) -> bool {
    state_dir.join("coordinator.db").is_file()
}

/// Opens an embedded farm's existing state with a coordinator and no
/// workers on a loopback port, for reading it (`hallmark audit`).
pub async fn open_state(
    state_dir: &Path,
    ledger_identity: Option<SigningIdentity>,
) -> anyhow::Result<RunningCoordinator> {
    if !has_state(state_dir) {
        anyhow::bail!(
            "no embedded farm state in {} (nothing rendered there yet); pass --coordinator URL or --state-dir DIR",
            state_dir.display()
        );
    }
    hallmark_coordinator::start(CoordinatorConfig {
        signing_identity: ledger_identity,
        ..coordinator_config(state_dir, "127.0.0.1:0")
    })
    .await
}

/// Where an embedded farm listens: gRPC, and optionally the Prometheus
/// endpoint and the C2PA soft-binding HTTP API.
#[derive(Debug, Clone, Copy)]
pub struct FarmListen<'a> {
    pub grpc: &'a str,
    pub metrics: Option<&'a str>,
    pub http: Option<&'a str>,
}

/// A listen address as a certificate names it: its IP address
/// (unspecified for a host name), and the host name a certificate can hold.
fn listen_parts(addr: &str) -> (std::net::IpAddr, Option<String>) {
    match addr.parse::<std::net::SocketAddr>() {
        Ok(addr) => (addr.ip(), None),
        Err(_) => (
            std::net::Ipv4Addr::UNSPECIFIED.into(),
            addr.rsplit_once(':')
                .map(|(host, _)| host.to_string())
                .filter(|h| crate::tls::check_name(h).is_ok()),
        ),
    }
}

impl LocalFarm {
    /// Starts the coordinator on `listen.grpc` (port 0 picks one) and the
    /// workers, and returns once every worker has registered. With
    /// `listen.metrics` the coordinator's and the local workers' metrics are
    /// served there; with `listen.http`, the soft-binding API.
    pub async fn start(
        state_dir: &Path,
        listen: &FarmListen<'_>,
        workers: &LocalWorkers,
        stamping: FarmStamping,
        auth: Option<&FarmAuth>,
        tls: Option<&FarmTls>,
    ) -> anyhow::Result<Self> {
        // The engine is opened first: a bad model folder fails before the farm starts.
        let engine: Arc<dyn hallmark_worker::Engine> =
            match (workers.engine.as_str(), &workers.diffusion) {
                ("synthetic", _) => Arc::new(SyntheticEngine::new(SyntheticConfig {
                    models: workers.models.clone(),
                    render_time: workers.render_time,
                    fail_marker: None,
                    refuse_marker: None,
                })),
                ("diffusion", Some(config)) => {
                    let config = config.clone();
                    Arc::new(
                        tokio::task::spawn_blocking(move || {
                            hallmark_worker::DiffusionEngine::new(config)
                        })
                        .await?
                        .context("opening the diffusion models")?,
                    )
                }
                ("diffusion", None) => anyhow::bail!("the diffusion engine needs --model-path DIR"),
                (other, _) => anyhow::bail!("unknown engine {other:?} (synthetic, diffusion)"),
            };
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating state directory {}", state_dir.display()))?;
        let mut config = CoordinatorConfig {
            watermark_key: stamping.watermark_key.clone(),
            trust_anchors: stamping.trust_anchors.clone(),
            metrics_listen: listen.metrics.map(str::to_string),
            http_listen: listen.http.map(str::to_string),
            signing_identity: Some(stamping.ledger_identity.clone()),
            ..coordinator_config(state_dir, listen.grpc)
        };
        let (mut worker_token, mut operator_token) = (None, None);
        if let Some(auth) = auth {
            let (w, w_entry) = own_token("worker:local")?;
            let (o, o_entry) = own_token("operator:local")?;
            config.auth = "tokens".into();
            config.auth_tokens = auth.tokens.clone();
            config.config_file = Some(auth.file.clone());
            config.auth_reload_interval_ms = auth.reload_interval_ms;
            config.pinned_tokens = BTreeMap::from([w_entry, o_entry]);
            (worker_token, operator_token) = (Some(w), Some(o));
        }
        let mut local_tls = ClientTls::default();
        if let Some(tls) = tls {
            let ca = crate::tls::FarmTlsCa::open_or_init(&state_dir.join("tls"))?;
            let (listen_ip, listen_host) = listen_parts(listen.grpc);
            let mut extra = tls.names.clone();
            extra.extend(listen_host);
            // The soft-binding API serves with the same certificate, so it
            // names that address too.
            if let Some(http) = listen.http {
                let (ip, host) = listen_parts(http);
                extra.extend((!ip.is_unspecified()).then(|| ip.to_string()));
                extra.extend(host);
            }
            let server = ca.issue_server(&crate::tls::server_names(listen_ip, &extra))?;
            config.tls_cert = Some(server.chain);
            config.tls_key = Some(server.key);
            local_tls.ca = Some(ca.cert.clone());
            if tls.require_client_certs {
                config.tls_client_ca = Some(ca.cert.clone());
                config.tls_revoked_certs = Some(ca.revoked_list()?);
                let own = ca.issue_own_client()?;
                local_tls.identity = Some((own.chain, own.key));
            }
        }
        let coordinator = hallmark_coordinator::start(config).await?;
        if coordinator.metrics_addr.is_some() {
            hallmark_worker::metrics::describe();
        }
        let url = local_url(&coordinator);
        let remote = Remote::connect(&url, operator_token.as_deref(), &local_tls).await?;
        let before = remote
            .workers
            .clone()
            .list_workers(ListWorkersRequest {})
            .await?
            .into_inner()
            .workers
            .len();

        let (stop, stop_rx) = watch::channel(false);
        let mut handles = Vec::new();
        for i in 0..workers.count {
            let channel = hallmark_worker::channel(&url, &local_tls)?;
            let config = WorkerConfig {
                name: format!("local-{i}"),
                max_batch: workers.max_batch,
                token: worker_token.clone(),
                ..WorkerConfig::new(stamping.stamping.clone())
            };
            let mut rx = stop_rx.clone();
            let engine = engine.clone();
            handles.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = rx.wait_for(|s| *s).await;
                };
                hallmark_worker::run(channel, config, engine, shutdown).await
            }));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let n = remote
                .workers
                .clone()
                .list_workers(ListWorkersRequest {})
                .await?
                .into_inner()
                .workers
                .len();
            if n >= before + workers.count as usize {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                anyhow::bail!("local workers did not register within 15 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Self {
            coordinator,
            local_url: url,
            workers: handles,
            stop,
        })
    }

    /// The URL the farm listens on (for other machines: its address, which
    /// may be every address).
    pub fn url(&self) -> String {
        self.coordinator.url()
    }

    /// The URL this machine reaches the farm at.
    pub fn local_url(&self) -> &str {
        &self.local_url
    }

    /// Whether the farm serves TLS.
    pub fn is_tls(&self) -> bool {
        self.coordinator.tls
    }

    /// Whether the farm listens on a loopback address only.
    pub fn is_loopback(&self) -> bool {
        self.coordinator.addr.ip().is_loopback()
    }

    /// Where the Prometheus endpoint is served, if it is.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.coordinator.metrics_addr
    }

    /// Where the C2PA soft-binding API is served, if it is.
    pub fn http_url(&self) -> Option<String> {
        self.coordinator.http_url()
    }

    /// Drains the workers, then stops the coordinator.
    pub async fn stop(self) -> anyhow::Result<()> {
        let _ = self.stop.send(true);
        for w in self.workers {
            match w.await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "local worker ended with an error"),
                Err(e) => tracing::warn!(error = %e, "local worker panicked"),
            }
        }
        self.coordinator.stop().await
    }
}
