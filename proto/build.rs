fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/meta.proto",
        "proto/transport.proto",
        "proto/command.proto",
        "proto/kv.proto",
        "proto/admin.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .bytes(".")
        .server_mod_attribute(".", "#[cfg(feature = \"grpc\")]")
        .client_mod_attribute(".", "#[cfg(feature = \"grpc\")]")
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
