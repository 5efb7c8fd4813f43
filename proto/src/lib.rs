//! Generated gRPC types and services for Hallmark (`hallmark.v1`).
//!
//! One `.proto` per service: `jobs.proto` (submit, watch, control, download),
//! `workers.proto` (register, lease/heartbeat, complete, fail) and
//! `registry.proto` (models and datasets, the roots of lineage) and
//! `provenance.proto` (the manifest repository: watermark id or sha256 to
//! manifest and lineage).

#![allow(clippy::all, missing_docs)]

pub mod v1 {
    tonic::include_proto!("hallmark.v1");
}

/// Sampler names a job may ask for; the diffusion engine implements each,
/// the coordinator refuses any other at submission.
pub const SCHEDULERS: &[&str] = &[
    "ddim",
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
];

/// Super-resolution methods a diffusion job may ask for (`upscale_method`).
pub const UPSCALE_METHODS: &[&str] = &["esrgan", "hires-fix"];

/// How many of `steps` an img2img render at `strength` runs: the last
/// `floor(steps × strength)` of the schedule, as diffusers takes them. The
/// slack keeps a strength that passed through single precision (0.7 →
/// 0.69999999) on its step. The engine starts its schedule there, the
/// coordinator refuses a job where it is none.
pub fn img2img_steps(steps: usize, strength: f64) -> usize {
    ((steps as f64 * strength + 1e-6) as usize).min(steps)
}

/// How clients (the CLI, the worker) reach a coordinator: TLS when its URL
/// is `https://`, and the caller's token on every call.
pub mod client {
    use tonic::metadata::{Ascii, MetadataValue};
    use tonic::service::interceptor::InterceptedService;
    use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

    /// The environment variable the CLI and the worker read a token from.
    pub const TOKEN_ENV: &str = "HALLMARK_TOKEN";

    /// How a client meets an `https://` coordinator.
    #[derive(Debug, Clone, Default)]
    pub struct ClientTls {
        /// PEM roots the coordinator's certificate must chain to; unset:
        /// the system's roots.
        pub ca: Option<std::path::PathBuf>,
        /// PEM certificate chain and private key this client presents, for
        /// a coordinator that requires client certificates
        /// (`tls_client_ca`).
        pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
        /// The name the coordinator's certificate is checked against when
        /// it is not the URL's host (an embedded farm's own workers reach
        /// it over loopback).
        pub server_name: Option<String>,
    }

    impl ClientTls {
        /// Verifying against the roots in `ca` (or the system's), with no
        /// certificate of the client's own.
        pub fn roots(ca: Option<&std::path::Path>) -> Self {
            Self {
                ca: ca.map(std::path::Path::to_path_buf),
                ..Self::default()
            }
        }
    }

    fn read_pem(path: &std::path::Path, what: &str) -> Result<Vec<u8>, String> {
        std::fs::read(path).map_err(|e| format!("reading the TLS {what} {}: {e}", path.display()))
    }

    /// The endpoint of a coordinator URL: `http://` in the clear (`tls`
    /// unused), `https://` over TLS as `tls` says.
    pub fn endpoint(url: &str, tls: &ClientTls) -> Result<Endpoint, String> {
        let endpoint = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("coordinator url {url:?} is not a valid URL: {e}"))?;
        match endpoint.uri().scheme_str() {
            Some("http") => Ok(endpoint),
            Some("https") => {
                let mut config = match &tls.ca {
                    Some(path) => ClientTlsConfig::new()
                        .ca_certificate(Certificate::from_pem(read_pem(path, "roots")?)),
                    None => ClientTlsConfig::new().with_native_roots(),
                };
                if let Some((cert, key)) = &tls.identity {
                    config = config.identity(Identity::from_pem(
                        read_pem(cert, "client certificate")?,
                        read_pem(key, "client key")?,
                    ));
                }
                if let Some(name) = &tls.server_name {
                    config = config.domain_name(name.clone());
                }
                endpoint
                    .tls_config(config)
                    .map_err(|e| format!("TLS for {url}: {e}"))
            }
            _ => Err(format!(
                "coordinator url {url:?} must start with http:// or https://"
            )),
        }
    }

    /// A channel whose calls present the caller's token.
    pub type AuthChannel = InterceptedService<Channel, BearerToken>;

    /// The header in which a caller says who it is (`USER@HOST`) where
    /// nothing can check it: a coordinator with authentication off names
    /// the caller by it in its audit ledger, as unverified.
    pub const CLAIMED_USER_HEADER: &str = "hallmark-user";

    /// The longest claimed identity kept.
    const CLAIM_MAX: usize = 64;

    /// `claim` as a header and a ledger entry may carry it: visible ASCII,
    /// every other character (spaces, controls, non-ASCII) as `_`, at most
    /// 64 characters.
    pub fn sanitize_claim(claim: &str) -> String {
        claim
            .trim()
            .chars()
            .map(|c| if c.is_ascii_graphic() { c } else { '_' })
            .take(CLAIM_MAX)
            .collect()
    }

    /// This machine's host name ('unknown' when it cannot be read).
    pub fn hostname() -> String {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .or_else(|_| std::env::var("HOSTNAME"))
            .unwrap_or_else(|_| "unknown".into())
    }

    /// Who runs this process, as `USER@HOST` (`USER`, `LOGNAME` or
    /// `USERNAME` from the environment).
    pub fn local_user() -> String {
        let user = ["USER", "LOGNAME", "USERNAME"]
            .iter()
            .find_map(|v| std::env::var(v).ok().filter(|u| !u.trim().is_empty()))
            .unwrap_or_else(|| "unknown".into());
        format!("{}@{}", user.trim(), hostname())
    }

    /// The interceptor that adds `authorization: Bearer TOKEN` to each call
    /// when a token is set (a coordinator with `auth = "tokens"` identifies
    /// the caller by it); without one, the identity it claims, if any
    /// ([`CLAIMED_USER_HEADER`]).
    #[derive(Clone, Default)]
    pub struct BearerToken {
        token: Option<MetadataValue<Ascii>>,
        claim: Option<MetadataValue<Ascii>>,
    }

    impl BearerToken {
        /// `None` or an empty token: calls go without one.
        pub fn new(token: Option<&str>) -> Result<Self, String> {
            match token.map(str::trim).filter(|t| !t.is_empty()) {
                None => Ok(Self::default()),
                Some(t) => format!("Bearer {t}")
                    .parse()
                    .map(|v| Self {
                        token: Some(v),
                        claim: None,
                    })
                    .map_err(|_| {
                        "the token holds characters a gRPC header cannot carry".to_string()
                    }),
            }
        }

        /// Calls that carry no token also say they come from `user`
        /// (sanitized: [`sanitize_claim`]); a token speaks for itself.
        pub fn claiming(mut self, user: &str) -> Self {
            self.claim = sanitize_claim(user).parse().ok();
            self
        }

        /// `channel` with this token on every call.
        pub fn on(self, channel: Channel) -> AuthChannel {
            InterceptedService::new(channel, self)
        }
    }

    impl tonic::service::Interceptor for BearerToken {
        fn call(
            &mut self,
            mut req: tonic::Request<()>,
        ) -> Result<tonic::Request<()>, tonic::Status> {
            match (&self.token, &self.claim) {
                (Some(token), _) => {
                    req.metadata_mut().insert("authorization", token.clone());
                }
                (None, Some(claim)) => {
                    req.metadata_mut()
                        .insert(CLAIMED_USER_HEADER, claim.clone());
                }
                (None, None) => {}
            }
            Ok(req)
        }
    }
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hallmark_descriptor");
