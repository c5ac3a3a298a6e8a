fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox is a pure-Rust .proto compiler: no system protoc to install.
    let fds = protox::compile(["cim.proto"], ["."])?;
    prost_build::Config::new()
        // Message bodies as `Bytes`: a fan-out clones one stored message per recipient, and
        // a refcount bump is cheaper than copying the body each time.
        .bytes([".cim.v1.Message.body", ".cim.v1.Send.body"])
        .compile_fds(fds)?;
    println!("cargo:rerun-if-changed=cim.proto");
    Ok(())
}
