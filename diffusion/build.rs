//! With the `cuda` feature, compiles the crate's own CUDA kernels
//! (`src/kernels/*.cu`) to PTX with `nvcc`, which the driver compiles for
//! the GPU it runs on. Without it, nothing to do.

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 3] = ["softmax", "fused", "attention"];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/kernels/common.cuh");
    for k in KERNELS {
        println!("cargo::rerun-if-changed=src/kernels/{k}.cu");
    }
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo::rerun-if-env-changed=CUDA_ROOT");
    let nvcc = std::env::var_os("CUDA_ROOT")
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    for k in KERNELS {
        let ptx = out.join(format!("{k}.ptx"));
        // compute_80 PTX: any GPU from Ampere on runs it.
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "--gpu-architecture=compute_80", "-o"])
            .arg(&ptx)
            .arg(format!("src/kernels/{k}.cu"))
            .status()
            .unwrap_or_else(|e| panic!("cannot run {} for the cuda feature: {e}", nvcc.display()));
        assert!(status.success(), "nvcc failed on src/kernels/{k}.cu");
    }
}
