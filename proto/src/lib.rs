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

/// The encoded file descriptor set, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("hallmark_descriptor");
