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

/// Presenting a caller's token: every call over an [`AuthChannel`] carries
/// `authorization: Bearer TOKEN` when a token is set (a coordinator with
/// `auth = "tokens"` identifies the caller by it), nothing otherwise.
pub mod auth {
    use tonic::metadata::{Ascii, MetadataValue};
    use tonic::service::interceptor::InterceptedService;
    use tonic::transport::Channel;

    /// The environment variable the CLI and the worker read a token from.
    pub const TOKEN_ENV: &str = "HALLMARK_TOKEN";

    /// A channel whose calls present the caller's token.
    pub type AuthChannel = InterceptedService<Channel, BearerToken>;

    /// The interceptor that adds the token to each call.
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
