//! `bench`: the project's benchmarks (see `BENCHMARKS.md`).
//!
//! Each subcommand measures one thing against real binaries (built with
//! `--release`) on loopback and prints a JSON result line plus a Markdown
//! row for `BENCHMARKS.md`; `--quick` shrinks every size and duration so CI
//! can check that the harness still works (its figures are not published).
//!
//! * [`footprint`]: agent idle RSS/CPU with 3 services; RSS growth over
//!   deploy+rollback cycles.
//! * [`overhead`]: rollout wall time over N agents against the physical limit.
//! * [`fanout`]: a ping to N sessions and back, p50/p99; coordinator
//!   RSS/CPU with N sessions reporting.
//! * [`rollback`]: host-level and fleet-level rollback latency.
//! * [`staging`]: a large artifact to many hosts against measured bandwidth.

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bench", about = "rollout benchmarks")]
struct Cli {
    /// Small sizes and short durations: checks the harness, not the figures.
    #[arg(long, global = true)]
    quick: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {}
}
