//! `rollout-agent`: the per-host update engine.
//!
//! Layout of the crate:
//!
//! * [`config`]: the agent's TOML config, validated once.
//! * [`release`]: domain types of a release (artifact + service definition).
//! * [`layout`]: paths under the data directory.
//! * [`state`]: the persisted per-service state and journal ([`state::StateStore`],
//!   sled and in-memory implementations).
//! * [`update`]: the phase machine ([`update::phase`]), staging and unpacking
//!   ([`update::installer`]), service supervision ([`update::supervisor`]) and the
//!   per-service workers that drive them ([`update::executor`]).
//! * [`health`]: probes (HTTP, TCP, exec) and the tracker that turns probe
//!   results into healthy/unhealthy with thresholds.
//! * [`host_stats`]: host and process CPU/memory from sysinfo.
//! * [`report`]: wire reports built from the engine's views.
//! * [`session`]: the outbound stream to the coordinator, with backoff.
//! * [`join`]: `rollout-agent join`: key and CSR on the host, a certificate
//!   from the coordinator for a single-use token.
//! * [`admin`]: the local admin API on a Unix socket.
//! * [`metrics`]: Prometheus `/metrics` over plain HTTP (`metrics_listen`).
//! * [`agent`]: wires everything together; [`agent::run`] is what the binary
//!   and tests call.

#![forbid(unsafe_code)]

pub mod admin;
pub mod agent;
pub mod config;
pub mod health;
pub mod host_stats;
pub mod join;
pub mod layout;
pub mod metrics;
pub mod release;
pub mod report;
pub mod session;
pub mod state;
pub mod update;
