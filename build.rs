//! Compiles the relay's wire envelopes in `proto/` with a pure-Rust protobuf compiler, so that a
//! build needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/alpn_xds/wire/v1/discovery.proto";
    println!("cargo:rerun-if-changed={proto}");

    let descriptors = protox::compile([proto], ["proto"])?;

    // Every nested message is kept as zero-copy `Bytes`, and the only map is ordered so that an
    // envelope the relay re-encodes always comes out the same.
    prost_build::Config::new()
        .bytes(["."])
        .btree_map(["."])
        .compile_fds(descriptors)?;
    Ok(())
}
