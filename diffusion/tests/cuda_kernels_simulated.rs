//! The crate's own CUDA kernels (`src/kernels/*.cu`: softmax, group norm,
//! GEGLU, bias adds, tokens, im2col, fused attention), compiled unchanged for the
//! CPU against a host simulation of the CUDA execution model
//! (`tests/cuda_sim/sim.h`: threads, shared memory, barriers, warp shuffles
//! and the tensor cores' `mma.sync` with the PTX ISA's fragment layouts) and
//! compared with f64 references (`tests/cuda_sim/harness.cpp`). This checks
//! the kernels' indexing, fragment bookkeeping, masking, tiling and numerics
//! on every machine; their speed, and the hardware's own agreement, need a
//! GPU (`hallmark-diffusion-bench kernels`).

use std::path::Path;
use std::process::Command;

#[test]
fn own_cuda_kernels_match_f64_references_in_the_host_simulation() {
    let sim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_sim");
    let dir = tempfile::tempdir().unwrap();
    let harness = dir.path().join("harness");
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".into());
    let compiled = Command::new(&cxx)
        .args([
            "-std=c++20",
            "-O2",
            "-Wall",
            "-Wno-unknown-pragmas",
            // The kernels read half-precision arrays through 16-byte vector
            // types, as CUDA allows.
            "-fno-strict-aliasing",
            "-pthread",
            "-DHALLMARK_CUDA_SIM",
        ])
        .arg(format!("-I{}", sim.join("include").display()))
        .arg("-include")
        .arg(sim.join("sim.h"))
        .arg(sim.join("harness.cpp"))
        .arg("-o")
        .arg(&harness)
        .output()
        .unwrap_or_else(|e| panic!("the simulation needs a C++20 compiler ({cxx}): {e}"));
    assert!(
        compiled.status.success(),
        "compiling the simulation failed:\n{}",
        String::from_utf8_lossy(&compiled.stderr)
    );
    let run = Command::new(&harness).output().unwrap();
    let report = String::from_utf8_lossy(&run.stdout);
    println!("{report}");
    assert!(run.status.success(), "kernel checks failed:\n{report}");
    // Every kernel family was exercised.
    for kernel in [
        "softmax",
        "group norm",
        "GEGLU",
        "bias add",
        "tokens",
        "im2col",
        "attention",
    ] {
        assert!(report.contains(&format!("ok   {kernel}")), "{report}");
    }
}
