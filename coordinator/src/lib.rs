//! The rollout coordinator and the `rollout` operator CLI.
//!
//! Layout:
//! * [`config`]: `coordinator.toml`, validated once.
//! * [`pki`], [`tls`]: certificates with roles (`rollout certs init`) and the
//!   mTLS configs; every RPC checks the caller's role.
//! * [`store`]: rollouts, events, hosts, join tokens and revocations in sled.
//! * [`join`]: join tokens (single use, stored hashed) and host revocation.
//! * [`fleet`]: the live registry of connected agents and the command round-trip.
//! * [`artifacts`]: artifacts by digest on disk, streamed in chunks.
//! * [`rollout`]: the release spec ([`rollout::spec`]) and the pure planner
//!   ([`rollout::planner`]).
//! * [`engine`]: rollouts persisted and driven batch by batch.
//! * [`server`]: `AgentService` and `ControlService`; [`server::run`] is what
//!   `rollout serve` and the tests call.
//! * [`metrics`]: Prometheus `/metrics` over plain HTTP (`metrics_listen`).
//! * [`cli`]: the `rollout` commands.
//! * [`dev`]: `rollout dev`, a local fleet with a live rolling deploy.

#![forbid(unsafe_code)]

pub mod artifacts;
pub mod cli;
pub mod config;
pub mod dev;
pub mod engine;
pub mod fleet;
pub mod join;
pub mod metrics;
pub mod pki;
pub mod rollout;
pub mod server;
pub mod store;
pub mod tls;
