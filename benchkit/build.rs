fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/etcd.proto", "proto/echo.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .bytes(".")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
