//! `bench`: the project's benchmarks (see `BENCHMARKS.md` and `bench/README.md`).
//!
//! Each subcommand measures one thing against the release binaries on
//! loopback, repeats it (`--runs`, default 3; 1 with `--quick`), and prints a
//! Markdown block (command, machine, date, load average, median/min/max,
//! target and whether it is met), also appended to `--append FILE` when given.
//! `--quick` shrinks every size and duration so CI can check that the harness
//! still works; its figures are not the published ones.
//!
//! * [`footprint`]: agent idle RSS/CPU with 3 services; RSS growth over
//!   deploy+rollback cycles.
//! * [`overhead`]: rollout wall time over N hosts against the physical limit.
//! * [`fanout`]: a ping to N sessions and back, p50/p99; coordinator RSS/CPU
//!   with N sessions reporting.
//! * [`swarm`]: many agent sessions in one process (used for N ≥ 1,000).
//! * [`floor`]: the fan-out over raw TCP, the floor `fanout` reports against.
//! * [`rollback`]: host-level and fleet-level rollback latency.
//! * [`staging`]: a large artifact to many hosts against measured bandwidth.
//!
//! This file only parses the command line and dispatches.

mod fanout;
mod floor;
mod footprint;
mod overhead;
mod rollback;
mod staging;
mod swarm;
mod util;

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "bench", about = "rollout benchmarks")]
struct Cli {
    /// Small sizes and short durations: checks the harness, not the figures.
    #[arg(long, global = true)]
    quick: bool,
    /// Repeats of each measurement (default 3; 1 with --quick).
    #[arg(long, global = true)]
    runs: Option<usize>,
    /// Directory of the release binaries (rollout, sample-service).
    #[arg(long, global = true, default_value = "target/release")]
    bin_dir: PathBuf,
    /// The agent binary, as shipped: built with the size-tuned `agent`
    /// profile (`cargo build --profile agent -p rollout-agent`).
    #[arg(long, global = true, default_value = "target/agent/rollout-agent")]
    agent_bin: PathBuf,
    /// Also append each Markdown result block to this file.
    #[arg(long, global = true)]
    append: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Agent idle RSS/CPU with 3 services, RSS after deploy+rollback cycles.
    Footprint(footprint::Args),
    /// Host-level and fleet-level rollback latency.
    Rollback(rollback::Args),
    /// A large release to many hosts against loopback/disk bandwidth.
    Staging(staging::Args),
    /// Rollout wall time over N hosts against ⌈N/batch⌉ × (restart + bake).
    Overhead(overhead::Args),
    /// A ping to N sessions and back (p50/p99); coordinator RSS/CPU with N
    /// sessions reporting every 5 s.
    Fanout(fanout::Args),
    /// Many agent sessions in this process against a coordinator on
    /// loopback, for a bounded time (what overhead and fanout use for N ≥ 1,000).
    Swarm(swarm::Args),
    /// The raw-TCP server of `fanout`'s floor (started by `bench fanout`).
    #[command(hide = true)]
    FanoutFloorServer(floor::ServerArgs),
    /// Every benchmark with its default parameters (with --quick: CI's check).
    All,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin_dir = std::path::absolute(&cli.bin_dir)?;
    rollout_tests::set_bin_dir(bin_dir.clone());
    let ctx = util::Ctx {
        quick: cli.quick,
        runs: cli.runs.unwrap_or(if cli.quick { 1 } else { 3 }).max(1),
        bin_dir,
        agent_bin: std::path::absolute(&cli.agent_bin)?,
        append: cli.append,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        match cli.cmd {
            Cmd::Footprint(a) => footprint::run(&ctx, &a).await,
            Cmd::Rollback(a) => rollback::run(&ctx, &a).await,
            Cmd::Staging(a) => staging::run(&ctx, &a).await,
            Cmd::Overhead(a) => overhead::run(&ctx, &a).await,
            Cmd::Fanout(a) => fanout::run(&ctx, &a).await,
            Cmd::Swarm(a) => swarm::run(&a).await,
            Cmd::FanoutFloorServer(a) => floor::serve(&a).await,
            Cmd::All => {
                footprint::run(&ctx, &Default::default()).await?;
                rollback::run(&ctx, &Default::default()).await?;
                staging::run(&ctx, &Default::default()).await?;
                overhead::run(&ctx, &Default::default()).await?;
                fanout::run(&ctx, &Default::default()).await?;
                Ok(())
            }
        }
    })
}
