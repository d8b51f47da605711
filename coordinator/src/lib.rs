//! The rollout coordinator and the `rollout` operator CLI.
//!
//! The coordinator drives rolling updates across the fleet; see the repository's
//! `ARCHITECTURE.md`. This crate is being built up issue by issue.

#![forbid(unsafe_code)]
