//! Generates the protobuf types from `proto/client.proto` with prost (protox compiles the
//! schema in pure Rust, so no `protoc` is needed).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/client.proto");
    let fds = protox::compile(["proto/client.proto"], ["proto"])?;
    prost_build::Config::new()
        .bytes(["."])
        .btree_map(["."])
        .compile_fds(fds)?;
    Ok(())
}
