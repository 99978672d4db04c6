//! Compiles `proto/` with protox (pure Rust), so a build needs no `protoc`.

use std::{env, fs, path::PathBuf};

use prost::Message;

const PROTO: &str = "proto/skykit/agent/v1/agent.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let descriptors = protox::compile([PROTO], ["proto"])?;
    // The encoded descriptor set is kept for gRPC server reflection.
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out_dir.join("skykit_agent_descriptor.bin"),
        descriptors.encode_to_vec(),
    )?;
    tonic_prost_build::configure()
        .emit_rerun_if_changed(false)
        .compile_fds(descriptors)?;
    Ok(())
}
