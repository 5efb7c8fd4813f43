//! Client settings: defaults, then a TOML file (`--config`, `HALLMARK_CONFIG`
//! or `~/.config/hallmark/config.toml`), then `HALLMARK_*` environment
//! variables, then flags.

use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The watermark key used when none is configured (development only).
pub const DEVELOPMENT_WATERMARK_KEY: &str = hallmark_provenance::watermark::DEVELOPMENT_KEY;

/// Everything the CLI reads from configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ClientConfig {
    /// Coordinator URL; unset means `hallmark render` runs an embedded farm.
    pub coordinator: Option<String>,
    /// Where the embedded farm keeps its SQLite store and blobs.
    pub state_dir: PathBuf,
    /// Tenant jobs are submitted as (see [`ClientConfig::tenant`]).
    pub tenant: Option<String>,
    /// Token presented to a coordinator with `auth = "tokens"`
    /// (`HALLMARK_TOKEN`); `hallmark token new` makes one. Keep it out of
    /// shared config files: it is a password.
    pub token: Option<String>,
    /// PEM certificates an `https://` coordinator's certificate is verified
    /// against (`HALLMARK_TLS_CA`); unset: the system's roots.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate chain presented to a coordinator that
    /// requires one (`HALLMARK_TLS_CLIENT_CERT`; with `tls_client_key`).
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of `tls_client_cert` (`HALLMARK_TLS_CLIENT_KEY`).
    pub tls_client_key: Option<PathBuf>,
    /// Local workers the embedded farm starts.
    pub workers: u32,
    /// Secret the invisible watermark is keyed with. The default is for
    /// development only: a deployment sets its own, or anyone can forge marks.
    pub watermark_key: String,
    /// PEM certificate chain outputs of the embedded farm are signed with.
    /// Unset: a local test CA is made in the state directory on first use.
    pub signing_cert_chain: Option<PathBuf>,
    /// PKCS#8 PEM private key of that certificate.
    pub signing_private_key: Option<PathBuf>,
    /// es256 or ed25519.
    pub signing_alg: String,
    /// RFC 3161 timestamp authority. Without one, signed files stop
    /// validating once the signing certificate expires.
    pub tsa_url: Option<String>,
    /// PEM roots `hallmark verify` trusts (the local test CA's root is
    /// trusted too when it exists).
    pub trust_anchors: Option<PathBuf>,
    /// What signed records say of the prompt: keep, hash or omit.
    pub prompt_policy: String,
    /// cawg.training-mining preference: allowed, notAllowed, constrained or none.
    pub training_mining: String,
    /// Output format of the embedded farm: png, jpeg or webp.
    pub output_format: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        let state_dir = std::env::var_os("HOME")
            .map(|h| PathBuf::from(h).join(".local/state/hallmark"))
            .unwrap_or_else(|| PathBuf::from(".hallmark"));
        Self {
            coordinator: None,
            state_dir,
            tenant: None,
            token: None,
            tls_ca: None,
            tls_client_cert: None,
            tls_client_key: None,
            workers: 2,
            watermark_key: DEVELOPMENT_WATERMARK_KEY.into(),
            signing_cert_chain: None,
            signing_private_key: None,
            signing_alg: "es256".into(),
            tsa_url: None,
            trust_anchors: None,
            prompt_policy: "hash".into(),
            training_mining: "notAllowed".into(),
            output_format: "png".into(),
        }
    }
}

impl ClientConfig {
    /// How this client meets an `https://` coordinator: the roots it
    /// verifies it against and the certificate it presents, if any.
    pub fn client_tls(&self) -> anyhow::Result<hallmark_proto::client::ClientTls> {
        let identity = match (&self.tls_client_cert, &self.tls_client_key) {
            (Some(cert), Some(key)) => Some((cert.clone(), key.clone())),
            (None, None) => None,
            _ => anyhow::bail!(
                "tls_client_cert and tls_client_key (HALLMARK_TLS_CLIENT_CERT, HALLMARK_TLS_CLIENT_KEY) go together: set both, or neither"
            ),
        };
        Ok(hallmark_proto::client::ClientTls {
            ca: self.tls_ca.clone(),
            identity,
            server_name: None,
        })
    }

    /// The tenant requests name: the configured one; unset, `default`, or
    /// with a token none, so the coordinator takes the token's own tenant.
    pub fn tenant(&self) -> String {
        match (&self.tenant, &self.token) {
            (Some(t), _) => t.clone(),
            (None, Some(_)) => String::new(),
            (None, None) => "default".into(),
        }
    }

    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder();
        let defaults = Self::default();
        builder = builder
            .set_default("state_dir", defaults.state_dir.display().to_string())?
            .set_default("workers", defaults.workers)?
            .set_default("watermark_key", defaults.watermark_key)?
            .set_default("signing_alg", defaults.signing_alg)?
            .set_default("prompt_policy", defaults.prompt_policy)?
            .set_default("training_mining", defaults.training_mining)?
            .set_default("output_format", defaults.output_format)?;
        let default_file =
            std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config/hallmark/config.toml"));
        match file {
            Some(path) => {
                if !path.exists() {
                    anyhow::bail!("config file {} does not exist", path.display());
                }
                builder = builder.add_source(config::File::from(path.to_path_buf()));
            }
            None => {
                if let Some(path) = default_file.filter(|p| p.exists()) {
                    builder = builder.add_source(config::File::from(path));
                }
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("HALLMARK")
                .prefix_separator("_")
                .try_parsing(true)
                .ignore_empty(true),
        );
        builder
            .build()?
            .try_deserialize()
            .map_err(|e| anyhow::anyhow!("invalid client configuration: {e}"))
    }
}
