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
        // Smaller per-call buffers than tonic's default (src/codec.rs).
        .codec_path("crate::codec::RolloutCodec")
        // Artifact chunks as `bytes::Bytes`: the coordinator sends the chunk
        // its cache holds and the agent receives a slice of the decode buffer,
        // neither copying 256 KiB per message.
        .bytes(".rollout.v1.ArtifactChunk.data")
        .compile_fds(fds)?;
    Ok(())
}
