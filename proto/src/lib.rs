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

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hallmark_descriptor");
