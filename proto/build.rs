//! Compiles `proto/rollout/v1/*.proto` with `protox` (pure Rust), so no system
//! `protoc` is needed on any machine.

use std::error::Error;

const PROTOS: &[&str] = &[
    "proto/rollout/v1/release.proto",
    "proto/rollout/v1/agent.proto",
    "proto/rollout/v1/admin.proto",
    "proto/rollout/v1/control.proto",
    "proto/rollout/v1/join.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    for p in PROTOS {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        // `AgentService.Connect` would clash with the generated `connect` constructor;
        // clients are built from a `Channel` instead.
        .build_transport(false)
        .compile_fds(fds)?;
    Ok(())
}
