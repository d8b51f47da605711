//! `rollout`: the operator CLI and the coordinator daemon (`rollout serve`).

use clap::Parser;

/// Operator CLI for rollout.
#[derive(Debug, Parser)]
#[command(name = "rollout", version, about)]
struct Cli {}

fn main() -> anyhow::Result<()> {
    let _cli = Cli::parse();
    anyhow::bail!("the coordinator is not built yet; see the repository's issues")
}
