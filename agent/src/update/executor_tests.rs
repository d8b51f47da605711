//! Tests of the engine with fake supervisor and probes.
