//! Compiles the Coder protobuf schemas at build time. protox parses the .proto files in pure Rust
//! (it ships the google/protobuf well-known types), so no `protoc` binary is needed anywhere.
use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = PathBuf::from("proto");
    let files = [dir.join("tailnet.proto"), dir.join("agent.proto")];
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    println!("cargo:rerun-if-changed=build.rs");
    let fds = protox::compile(files, [dir])?;
    let mut config = prost_build::Config::new();
    // Bytes fields are zero-copy; BTreeMap makes encoding deterministic (stable dedup/compare).
    config.bytes(["."]);
    config.btree_map(["."]);
    config.compile_fds(fds)?;
    Ok(())
}
