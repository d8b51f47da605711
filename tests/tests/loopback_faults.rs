//! The crash scenarios of issue 7 (agent crash points, coordinator crash
//! points, rolling coordinator restarts under three rollouts) with processes
//! on 127.0.0.1: the variant that runs everywhere, without Docker. The
//! scenarios are in `crash_common`; `docker_crash.rs` runs the same ones on
//! containers. `kill -9` is a SIGKILL of the child process (or the crash
//! point's own SIGKILL).

mod crash_common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use crash_common::{Rig, WAIT};
use rollout_tests::cluster::Cluster;
use rollout_tests::{bin, free_port};
use serde_json::Value;

/// A [`Cluster`] driven synchronously.
struct LoopbackRig {
    rt: tokio::runtime::Runtime,
    c: Cluster,
}

impl LoopbackRig {
    fn start(n: usize, env: impl Fn(usize) -> Vec<(String, String)>) -> Result<LoopbackRig> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let c = rt.block_on(Cluster::start(n, env))?;
        Ok(LoopbackRig { rt, c })
    }

    fn index(&self, host: &str) -> Result<usize> {
        self.c
            .agents
            .iter()
            .position(|a| a.opts.host == host)
            .with_context(|| format!("no agent {host}"))
    }

    fn agent_json(&self, host: &str, args: &[&str]) -> Result<Value> {
        let i = self.index(host)?;
        let out = Command::new(bin("rollout-agent"))
            .args(args)
            .args(["--output", "json", "--socket"])
            .arg(self.c.agents[i].socket())
            .stdin(Stdio::null())
            .output()?;
        ensure!(
            out.status.success(),
            "rollout-agent {args:?} on {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

crash_common::loopback_rig!(LoopbackRig);

#[test]
fn agent_kill9_at_every_crash_point_recovers_and_is_reported() -> Result<()> {
    let mut rig = LoopbackRig::start(
        crash_common::agent_crash_hosts(),
        crash_common::agent_crash_env,
    )?;
    crash_common::agent_crash_points(&mut rig)
}

#[test]
fn coordinator_kill9_at_every_persisted_state_finishes_each_rollout_once() -> Result<()> {
    let mut rig = LoopbackRig::start(2, crash_common::coordinator_crash_env)?;
    crash_common::coordinator_crash_points(&mut rig)
}

#[test]
fn coordinator_rolling_restarts_during_three_concurrent_rollouts() -> Result<()> {
    let mut rig = LoopbackRig::start(3, |_| {
        crash_common::SERVICES
            .iter()
            .map(|(_, var)| (var.to_string(), free_port().to_string()))
            .collect()
    })?;
    crash_common::rolling_restarts_with_three_rollouts(&mut rig, 4, "\"1s\"")
}
