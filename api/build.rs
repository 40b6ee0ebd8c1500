//! Generates the `weft.v1` protobuf and gRPC code. The .proto files are parsed
//! by protox (pure Rust), so building weft needs no `protoc` on the machine.
fn main() {
    let proto = "proto/weft/v1/weft.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = match protox::compile([proto], ["proto"]) {
        Ok(fds) => fds,
        Err(e) => {
            eprintln!("error: {proto}: {e}");
            std::process::exit(1);
        }
    };
    if let Err(e) = tonic_prost_build::configure().compile_fds(fds) {
        eprintln!("error: generating code from {proto}: {e}");
        std::process::exit(1);
    }
}
