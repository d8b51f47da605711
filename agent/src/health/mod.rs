//! Health checking: probes and the tracker that applies thresholds.

pub mod probe;
pub mod tracker;
