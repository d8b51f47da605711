//! The rollout engine's inputs and decisions.
//!
//! * [`spec`] owns the release spec an operator writes for `rollout deploy
//!   spec.toml`: parsing, validation, and the artifact digest check. Its output,
//!   [`spec::DeploySpec`], is the one validated value the rest of the engine sees.
//! * [`planner`] owns the pure decisions of a rollout: which hosts a spec targets,
//!   which hosts go in which batch, where to pause for `promote`, the failure
//!   budget and the deadlines. No I/O and no clock: callers pass `now` in, so every
//!   decision is testable without sockets.

pub mod planner;
pub mod spec;
