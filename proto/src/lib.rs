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

    /// The interceptor that adds `authorization: Bearer TOKEN` to each call
    /// when a token is set (a coordinator with `auth = "tokens"` identifies
    /// the caller by it), nothing otherwise.
    #[derive(Clone, Default)]
    pub struct BearerToken(Option<MetadataValue<Ascii>>);

    impl BearerToken {
        /// `None` or an empty token: calls go without one.
        pub fn new(token: Option<&str>) -> Result<Self, String> {
            match token.map(str::trim).filter(|t| !t.is_empty()) {
                None => Ok(Self(None)),
                Some(t) => format!("Bearer {t}")
                    .parse()
                    .map(|v| Self(Some(v)))
                    .map_err(|_| {
                        "the token holds characters a gRPC header cannot carry".to_string()
                    }),
            }
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
            if let Some(v) = &self.0 {
                req.metadata_mut().insert("authorization", v.clone());
            }
            Ok(req)
        }
    }
}

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hallmark_descriptor");
