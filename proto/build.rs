//! Generates the gRPC code with the vendored `protoc`, so a fresh machine needs
//! nothing installed.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the env.
    unsafe { std::env::set_var("PROTOC", protoc) };
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("hallmark_descriptor.bin"))
        .compile_protos(
            &[
                "proto/jobs.proto",
                "proto/workers.proto",
                "proto/registry.proto",
                "proto/provenance.proto",
            ],
            &["proto"],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
