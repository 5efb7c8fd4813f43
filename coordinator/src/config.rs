//! Coordinator settings: defaults in code, then a TOML file, then
//! `HALLMARK_*` environment variables, then command-line flags.
//!
//! Every setting is documented on its field; `README.md` points here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One `auth_tokens` entry: a role, or a role with an expiry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(
    untagged,
    expecting = "a role (\"tenant:NAME\", \"worker[:NAME]\", \"operator[:NAME]\") or { role = ROLE, expires = \"RFC 3339 time\" }"
)]
pub enum TokenEntry {
    Role(String),
    Grant {
        role: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        expires: Option<String>,
    },
}

impl TokenEntry {
    pub fn role(&self) -> &str {
        match self {
            TokenEntry::Role(role) | TokenEntry::Grant { role, .. } => role,
        }
    }

    pub fn expires(&self) -> Option<&str> {
        match self {
            TokenEntry::Role(_) => None,
            TokenEntry::Grant { expires, .. } => expires.as_deref(),
        }
    }
}

/// All coordinator settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default)]
pub struct CoordinatorConfig {
    /// Address the gRPC server listens on.
    pub listen: String,
    /// `postgres://…` for a cluster, `sqlite://…` for a single node.
    pub database_url: String,
    /// Connections in the database pool (SQLite always uses one writer).
    pub database_max_connections: u32,
    /// Redis for wake-ups, event fan-out and worker presence; none in single-node mode.
    pub redis_url: Option<String>,
    /// Directory of the content-addressed blob store (and, with `blob_url`,
    /// where large uploads spill while they arrive).
    pub blob_dir: PathBuf,
    /// Object-store URL for blobs instead of `blob_dir`, e.g.
    /// `s3://bucket/prefix` (S3-compatible stores via `blob_options`).
    pub blob_url: Option<String>,
    /// `object_store` options for `blob_url`: `aws_endpoint`,
    /// `aws_allow_http`, `aws_region`, `aws_access_key_id`, … (`AWS_*`
    /// environment variables fill in the rest).
    pub blob_options: BTreeMap<String, String>,
    /// Most items (prompts × images per prompt) one job may hold.
    pub max_items_per_job: u32,
    /// Largest width or height a job may ask for, in pixels.
    pub max_side: u32,
    /// Most sampling steps a job may ask for.
    pub max_steps: u32,
    /// Retry budget of a task when the job does not set one.
    pub default_max_attempts: u32,
    /// Lease time-to-live for the smallest work, in milliseconds.
    pub lease_base_ms: u64,
    /// Extra lease time per megapixel-step of the leased work, in milliseconds.
    pub lease_ms_per_megapixel_step: u64,
    /// How often workers should call `Lease` while they hold work.
    pub heartbeat_interval_ms: u64,
    /// Longest a lease call waits without a wake-up before looking again.
    pub poll_interval_ms: u64,
    /// A worker not seen for this long is not live.
    pub worker_timeout_ms: u64,
    /// After a worker fails a task, other workers get it first for this long.
    pub failure_cooldown_ms: u64,
    /// A worker that failed this many tasks of a job gets no more of them.
    pub job_worker_failure_limit: u32,
    /// How often expired leases are reclaimed and finished jobs closed.
    pub reap_interval_ms: u64,
    /// Cap on running (leased) tasks per tenant; 0 means none.
    pub tenant_max_running: u32,
    /// Items (prompts × images) a tenant may submit per minute, as a
    /// bucket that refills continuously and holds one minute's worth; a job
    /// over it is refused with RESOURCE_EXHAUSTED and when to retry. Shared
    /// by the replicas through Redis (per replica without it); 0 means no
    /// limit.
    pub tenant_submit_items_per_minute: u32,
    /// Bytes of input images (img2img) a tenant may upload per minute, as a
    /// bucket like the submit rate's; an upload over it is refused with
    /// RESOURCE_EXHAUSTED. Applies to tenants known by their token (`auth =
    /// "tokens"`); 0 means no limit.
    pub tenant_upload_bytes_per_minute: u64,
    /// How long an uploaded input image (img2img) is kept after its last
    /// use (its upload, or the submission or retry of a job that starts
    /// from it), never while an unfinished task starts from it. Then its
    /// blob is deleted (unless an artifact is the same image) and its row
    /// kept as purged, so the lineage of what was made from it still names
    /// its hash; a job naming it is refused until it is uploaded again. 0
    /// keeps inputs forever.
    pub input_retention_ms: u64,
    /// Per-tenant overrides of the cap and the rates, e.g.
    /// `[tenants.acme] max_running = 8`, `submit_items_per_minute = 5000`
    /// and `upload_bytes_per_minute = 1000000000`.
    pub tenants: BTreeMap<String, TenantConfig>,
    /// Secret of the invisible watermark (the same as the workers'). The
    /// default is for development only.
    pub watermark_key: String,
    /// PEM file of the roots upload signatures must chain to; unset accepts
    /// any intact signature.
    pub trust_anchors: Option<PathBuf>,
    /// Check that an upload's pixels carry the watermark its manifest names.
    pub verify_watermark_on_upload: bool,
    /// PEM certificate chain (signing certificate first) the coordinator
    /// signs the audit ledger's checkpoints with: the deployment's signing
    /// identity, the one its workers stamp images with
    /// (`HALLMARK_SIGNING_CERT_CHAIN`). Unset: the ledger is hash-chained
    /// but not signed.
    pub signing_cert_chain: Option<PathBuf>,
    /// PKCS#8 PEM private key of `signing_cert_chain`.
    pub signing_private_key: Option<PathBuf>,
    /// `es256` or `ed25519`.
    pub signing_alg: String,
    /// Least time between two signed ledger checkpoints, in milliseconds:
    /// after a sealing pass that moved the chain's head, once this long has
    /// passed since the last, the head is signed.
    pub ledger_checkpoint_interval_ms: u64,
    /// An RFC 3161 time-stamp authority (`http://`) for the ledger's
    /// checkpoints: each signature then carries a time the coordinator
    /// cannot set, and stays checkable after the signing certificate
    /// expires. A checkpoint the authority cannot stamp is not signed (and
    /// counted as refused) until it can.
    pub ledger_tsa_url: Option<String>,
    /// A signing identity handed over in code (the embedded farm signs with
    /// its own); takes the place of the two files.
    #[serde(skip)]
    pub signing_identity: Option<hallmark_provenance::credentials::SigningIdentity>,
    /// Who may call: `off` (anyone may make every call, and requests name
    /// their own tenant: one machine, or a network of trusted callers only)
    /// or `tokens` (each call carries `authorization: Bearer TOKEN`; see
    /// `auth_tokens` and `auth.rs` for what each role may do).
    pub auth: String,
    /// The tokens accepted with `auth = "tokens"`, by their SHA-256 digest
    /// (hex) — the configuration never holds a token itself — each with its
    /// role: `"<digest>" = "tenant:acme"`, `"worker"` or `"operator"`
    /// (`worker:NAME` and `operator:NAME` name the holder in the audit
    /// ledger), or with an expiry: `"<digest>" = { role = "tenant:acme",
    /// expires = "2027-01-31T00:00:00Z" }` (RFC 3339, UTC), after which the
    /// token is refused. `hallmark token new --role ROLE [--expires-in 30d]`
    /// makes a token and prints its line.
    pub auth_tokens: BTreeMap<String, TokenEntry>,
    /// How often the configuration file is read again for `auth_tokens`, in
    /// milliseconds, so tokens are added and revoked without a restart (a
    /// Kubernetes Secret's update reaches every replica this way); 0: never.
    /// The `auth` mode itself changes only with a restart.
    pub auth_reload_interval_ms: u64,
    /// Tokens set in code beside `auth_tokens`, by digest, and kept when
    /// the file is reloaded: the embedded farm's own workers and calls.
    #[serde(skip)]
    pub pinned_tokens: BTreeMap<String, TokenEntry>,
    /// The file the settings were loaded from, if any (set by `load`).
    #[serde(skip)]
    pub config_file: Option<PathBuf>,
    /// PEM certificate chain the gRPC server presents: with `tls_key`, it
    /// serves TLS only (clients use `https://` URLs). Unset: plain HTTP/2,
    /// for loopback or a network whose links are already protected (a
    /// mesh, or TLS ended in front of the coordinator).
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM roots for mutual TLS: with it, every caller (workers, the CLI,
    /// tenants' tools) must present a client certificate that chains to
    /// one of them, before any token is read. Needs `tls_cert`.
    pub tls_client_ca: Option<PathBuf>,
    /// A file of revoked client certificates, refused on every call: one
    /// SHA-256 fingerprint per line (hex, colons allowed, as `openssl x509
    /// -noout -fingerprint -sha256` prints it; `#` starts a comment), or
    /// certificate revocation lists (PEM or DER) signed by a
    /// `tls_client_ca` certificate. Read again as it changes (every
    /// `auth_reload_interval_ms`). Needs `tls_client_ca`.
    pub tls_revoked_certs: Option<PathBuf>,
    /// Address of the HTTP C2PA soft-binding resolution API; unset: off.
    /// HTTPS with `tls_cert` (no client certificates: the API is public).
    pub http_listen: Option<String>,
    /// Requests one client address may make to the HTTP API per minute, as
    /// a bucket like the submit rate's (shared by the replicas through
    /// Redis); a request over it is answered 429 with `Retry-After`. An
    /// IPv6 client is counted by its /64 network, which one host can fill
    /// with addresses. 0 means no limit.
    pub http_requests_per_minute: u32,
    /// The header a reverse proxy in front of the HTTP API writes the
    /// client's address into, e.g. `x-forwarded-for`: the API counts its
    /// requests by the header's last address (the one the proxy added)
    /// instead of the connection's peer (the proxy). Unset: the peer. Set
    /// it only behind such a proxy: anyone reaching the API directly could
    /// name any address in it.
    pub http_client_address_header: Option<String>,
    /// Address of the Prometheus endpoint (`GET /metrics`), e.g.
    /// `0.0.0.0:9464`; unset: no metrics are kept. Keep it off the public
    /// network: it names tenants and models.
    pub metrics_listen: Option<String>,
    /// How long the census of open work (the `hallmark_tasks`, `_jobs`,
    /// `_workers` gauges, read from the database at a scrape) is served
    /// again before the next scrape reads it afresh: scrapes within it —
    /// several Prometheus servers, or one that retries — cost the database
    /// one read, whose age `hallmark_census_age_seconds` gives. 0 reads it
    /// at every scrape.
    pub census_max_age_ms: u64,
    /// Address of a plain-text gRPC endpoint serving only the standard
    /// health service (`grpc.health.v1`), e.g. `0.0.0.0:7072`, for probes
    /// that speak no TLS — the kubelet's — when `listen` requires it;
    /// unset: off. It answers nothing but whether the coordinator serves.
    pub health_listen: Option<String>,
}

/// Settings of one tenant; each unset one is the all-tenant setting.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct TenantConfig {
    /// Cap on this tenant's running tasks; 0 means none.
    #[serde(default)]
    pub max_running: Option<u32>,
    /// Items (prompts × images) this tenant may submit per minute; 0 means
    /// no limit.
    #[serde(default)]
    pub submit_items_per_minute: Option<u32>,
    /// Bytes of input images this tenant may upload per minute; 0 means
    /// no limit.
    #[serde(default)]
    pub upload_bytes_per_minute: Option<u64>,
}

impl Default for CoordinatorConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7070".into(),
            database_url: "sqlite://.hallmark/coordinator.db".into(),
            database_max_connections: 32,
            redis_url: None,
            blob_dir: PathBuf::from(".hallmark/blobs"),
            blob_url: None,
            blob_options: BTreeMap::new(),
            max_items_per_job: 100_000,
            max_side: 2048,
            max_steps: 150,
            default_max_attempts: 3,
            lease_base_ms: 30_000,
            lease_ms_per_megapixel_step: 200,
            heartbeat_interval_ms: 2_000,
            poll_interval_ms: 1_000,
            worker_timeout_ms: 15_000,
            failure_cooldown_ms: 30_000,
            job_worker_failure_limit: 3,
            reap_interval_ms: 250,
            tenant_max_running: 0,
            tenant_submit_items_per_minute: 0,
            tenant_upload_bytes_per_minute: 0,
            input_retention_ms: 30 * 24 * 3_600_000,
            tenants: BTreeMap::new(),
            watermark_key: hallmark_provenance::watermark::DEVELOPMENT_KEY.into(),
            trust_anchors: None,
            verify_watermark_on_upload: true,
            signing_cert_chain: None,
            signing_private_key: None,
            signing_alg: "es256".into(),
            ledger_checkpoint_interval_ms: 60_000,
            ledger_tsa_url: None,
            signing_identity: None,
            auth: "off".into(),
            auth_tokens: BTreeMap::new(),
            auth_reload_interval_ms: 5_000,
            pinned_tokens: BTreeMap::new(),
            config_file: None,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            tls_revoked_certs: None,
            http_listen: None,
            http_requests_per_minute: 600,
            http_client_address_header: None,
            metrics_listen: None,
            census_max_age_ms: 5_000,
            health_listen: None,
        }
    }
}

impl CoordinatorConfig {
    /// Loads defaults, then `file` (if given; it must exist), then
    /// `HALLMARK_*` variables (`HALLMARK_DATABASE_URL`, `HALLMARK_REDIS_URL`, …),
    /// then `overrides` (flag name → value) from the command line.
    pub fn load(file: Option<&Path>, overrides: &[(&str, String)]) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                anyhow::bail!("config file {} does not exist", path.display());
            }
            builder = builder.add_source(config::File::from(path.to_path_buf()));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("HALLMARK")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true),
        );
        for (key, value) in overrides {
            builder = builder.set_override(*key, value.clone())?;
        }
        let mut cfg: Self = builder
            .build()?
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid coordinator configuration: {e}"))?;
        cfg.config_file = file.map(Path::to_path_buf);
        Ok(cfg)
    }

    /// The name of every setting (`HALLMARK_` + the name in capitals sets
    /// it from the environment).
    pub fn setting_names() -> Vec<String> {
        match serde_json::to_value(Self::default()) {
            Ok(serde_json::Value::Object(fields)) => fields.keys().cloned().collect(),
            _ => Vec::new(),
        }
    }

    /// The `HALLMARK_*` variables among `vars` that set no coordinator
    /// setting: the environment source ignores them, so a misspelt one
    /// would otherwise change nothing without a word. `HALLMARK_LOG` and
    /// `HALLMARK_CONFIG` are the binary's own.
    pub fn unrecognised_variables(vars: impl IntoIterator<Item = String>) -> Vec<String> {
        let names = Self::setting_names();
        vars.into_iter()
            .filter(|k| k.starts_with("HALLMARK_") && k != "HALLMARK_LOG" && k != "HALLMARK_CONFIG")
            .filter(|k| {
                let setting = k["HALLMARK_".len()..].to_ascii_lowercase();
                let setting = setting.split("__").next().unwrap_or_default();
                !names.iter().any(|n| n == setting)
            })
            .collect()
    }

    /// The running-task cap of `tenant` (0 = none).
    pub fn tenant_cap(&self, tenant: &str) -> u32 {
        self.tenants
            .get(tenant)
            .and_then(|t| t.max_running)
            .unwrap_or(self.tenant_max_running)
    }

    /// `input_retention_ms` as a span of milliseconds; `None` when inputs
    /// are kept forever.
    pub fn input_retention(&self) -> Option<i64> {
        match self.input_retention_ms {
            0 => None,
            ms => Some(i64::try_from(ms).unwrap_or(i64::MAX)),
        }
    }

    /// The input bytes `tenant` may upload per minute (0 = no limit).
    pub fn tenant_upload_rate(&self, tenant: &str) -> u64 {
        self.tenants
            .get(tenant)
            .and_then(|t| t.upload_bytes_per_minute)
            .unwrap_or(self.tenant_upload_bytes_per_minute)
    }

    /// The items `tenant` may submit per minute (0 = no limit).
    pub fn tenant_submit_rate(&self, tenant: &str) -> u32 {
        self.tenants
            .get(tenant)
            .and_then(|t| t.submit_items_per_minute)
            .unwrap_or(self.tenant_submit_items_per_minute)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unrecognised(vars: &[&str]) -> Vec<String> {
        CoordinatorConfig::unrecognised_variables(vars.iter().map(|v| v.to_string()))
    }

    #[test]
    fn a_tenants_own_settings_override_the_all_tenant_ones_one_by_one() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "tenant_max_running = 4\ntenant_submit_items_per_minute = 100\n\
             tenant_upload_bytes_per_minute = 1000\n\
             [tenants.acme]\nsubmit_items_per_minute = 5000\nupload_bytes_per_minute = 0\n\
             [tenants.small]\nmax_running = 1\n",
        )
        .unwrap();
        let c = CoordinatorConfig::load(Some(&file), &[]).unwrap();
        assert_eq!(
            (c.tenant_cap("acme"), c.tenant_submit_rate("acme")),
            (4, 5000)
        );
        assert_eq!(
            (c.tenant_cap("small"), c.tenant_submit_rate("small")),
            (1, 100)
        );
        assert_eq!(
            (c.tenant_cap("other"), c.tenant_submit_rate("other")),
            (4, 100)
        );
        assert_eq!(
            (c.tenant_upload_rate("acme"), c.tenant_upload_rate("small")),
            (0, 1000)
        );
    }

    #[test]
    fn misspelt_hallmark_variables_are_named_and_settings_are_not() {
        assert_eq!(
            unrecognised(&[
                "HALLMARK_DATABASE_URL",
                "HALLMARK_METRICS_LISTEN",
                "HALLMARK_BLOB_OPTIONS__AWS_REGION",
                "HALLMARK_TENANTS__ACME__MAX_RUNNING",
                "HALLMARK_LOG",
                "HALLMARK_CONFIG",
                "AWS_REGION",
                "HALLMARK_HTTP_LISTN",
                "HALLMARK_COORDINATOR",
            ]),
            ["HALLMARK_HTTP_LISTN", "HALLMARK_COORDINATOR"]
        );
    }
}
