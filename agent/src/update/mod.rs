//! The host update engine: phases, staging, supervision, hooks and the
//! per-service worker.

pub mod executor;
pub mod installer;
pub mod phase;
pub mod supervisor;
