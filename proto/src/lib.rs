//! The rollout wire protocol.
//!
//! The `.proto` files under `proto/rollout/v1/` are the contract between the
//! coordinator, the agents and the operator tools. Generated code lives in the
//! private `generated` module and is re-exported as [`pb`]; conversions to domain
//! types live with the crates that own those types.

#![forbid(unsafe_code)]

pub mod codec;

mod generated {
    #![allow(clippy::all, clippy::pedantic, missing_debug_implementations)]
    tonic::include_proto!("rollout.v1");
}

/// Generated protobuf messages and gRPC clients/servers (`rollout.v1`).
pub mod pb {
    pub use crate::generated::*;
}

/// Largest gRPC message either side accepts; artifacts travel in chunks well
/// below it, so anything larger is hostile or a bug.
pub const MAX_MESSAGE_BYTES: usize = 4 * 1024 * 1024;

/// Size of one artifact chunk on the wire.
pub const ARTIFACT_CHUNK_BYTES: usize = 256 * 1024;
