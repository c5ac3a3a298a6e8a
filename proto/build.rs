fn main() -> Result<(), Box<dyn std::error::Error>> {
    // protox is a pure-Rust .proto compiler: no system protoc to install.
    let fds = protox::compile(["cim.proto"], ["."])?;
    prost_build::Config::new().compile_fds(fds)?;
    println!("cargo:rerun-if-changed=cim.proto");
    Ok(())
}
