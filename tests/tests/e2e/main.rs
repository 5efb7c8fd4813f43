//! The end-to-end tests, one module per area, linked as one test binary:
//! each of these links the whole farm (coordinator, worker, engine, CLI),
//! so thirteen binaries cost thirteen large links and as many copies on disk.

mod audit;
mod auth;
mod bad_input;
mod blobs;
mod cli;
mod deploy;
mod diffusion;
mod farm;
mod faults;
mod img2img;
mod inpaint;
mod metrics;
mod provenance;
mod refine;
