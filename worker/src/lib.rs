//! The Hallmark worker.
//!
//! - [`engine`]: the [`Engine`](engine::Engine) interface renderers implement,
//!   and the deterministic `synthetic` engine for load and fault tests.
//! - [`diffusion`]: the `diffusion` engine (Stable Diffusion and
//!   super-resolution on candle, from `hallmark-diffusion`).
//! - [`metrics`]: what the worker exports for Prometheus.
//! - [`stamp`]: watermark, encode and sign every output before upload.
//! - [`run`]: the lease loop — register, lease/heartbeat, render, stamp,
//!   upload, back off and reconnect, drain on shutdown.

pub mod diffusion;
pub mod engine;
pub mod metrics;
pub mod run;
pub mod stamp;

pub use diffusion::{DiffusionConfig, DiffusionEngine};
pub use engine::{Engine, SyntheticConfig, SyntheticEngine};
pub use run::{WorkerConfig, WorkerReport, channel, run};
pub use stamp::{StampConfig, Stamping};
