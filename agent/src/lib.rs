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
//!   ([`update::installer`]), service supervision ([`update::supervisor`]), hooks
//!   ([`update::hooks`]) and the per-service worker that drives them
//!   ([`update::executor`]).
//! * [`health`]: probes (HTTP, TCP, exec) and the tracker that turns probe
//!   results into healthy/unhealthy with thresholds.
//! * [`host_stats`]: host and process CPU/memory from sysinfo.
//! * [`session`]: the outbound stream to the coordinator, with backoff.
//! * [`admin`]: the local admin API on a Unix socket.
//! * [`agent`]: wires everything together; `run` is what the binary and tests call.

#![forbid(unsafe_code)]

pub mod health;
pub mod host_stats;
pub mod layout;
pub mod release;
pub mod state;
pub mod update;
