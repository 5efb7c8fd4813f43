//! The Hallmark worker.
//!
//! - [`engine`]: the [`Engine`](engine::Engine) interface renderers implement,
//!   and the deterministic `synthetic` engine for load and fault tests.
//! - [`stamp`]: watermark, encode and sign every output before upload.
//! - [`run`]: the lease loop — register, lease/heartbeat, render, stamp,
//!   upload, back off and reconnect, drain on shutdown.

pub mod engine;
pub mod run;
pub mod stamp;

pub use engine::{Engine, SyntheticConfig, SyntheticEngine};
pub use run::{WorkerConfig, WorkerReport, channel, run};
pub use stamp::{StampConfig, Stamping};
