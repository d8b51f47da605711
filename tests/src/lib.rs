//! Test harness: starts real `rollout-agent` processes and drives them.
#![forbid(unsafe_code)]
