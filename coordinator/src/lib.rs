//! The Hallmark coordinator.
//!
//! It takes bulk jobs over gRPC, expands them into per-item stage tasks,
//! leases those to workers with fencing tokens, records their outputs and
//! tells watchers about progress. The database is the only source of truth;
//! Redis only carries wake-ups and events.
//!
//! - [`auth`]: who is calling — bearer tokens of tenants, workers and
//!   operators, checked by an interceptor in front of every service.
//! - [`config`]: every setting, with defaults, file, environment and flags.
//! - [`spec`]: job spec validation and expansion (pure).
//! - [`store`]: Postgres/SQLite store — jobs, tasks, leases, artifacts, registry.
//! - [`blobs`]: content-addressed blob store for uploaded images.
//! - [`notify`]: in-process and Redis wake-ups and job events.
//! - [`rate`]: per-tenant submission rate limits (token buckets in Redis).
//! - [`stamps`]: the upload gate — content credentials and watermark checked
//!   before an artifact is recorded.
//! - [`service`]: the gRPC services (`Jobs`, `Workers`, `Registry`,
//!   `Provenance` — the manifest repository).
//! - [`http`]: the C2PA soft-binding resolution API over HTTP.
//! - [`metrics`]: what the Prometheus endpoint exports, and the census of
//!   open work it reads from the store.
//! - [`server`]: `start` — wires it all up and serves; `stop` shuts down.

pub mod auth;
pub mod blobs;
pub mod config;
pub mod http;
pub mod metrics;
pub mod notify;
pub mod rate;
pub mod server;
pub mod service;
pub mod spec;
pub mod stamps;
pub mod store;

pub use config::CoordinatorConfig;
pub use server::{RunningCoordinator, start, start_on};
