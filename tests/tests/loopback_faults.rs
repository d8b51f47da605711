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

impl Rig for LoopbackRig {
    fn hosts(&self) -> Vec<String> {
        self.c.agents.iter().map(|a| a.opts.host.clone()).collect()
    }

    fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = self.c.coord.cli(args);
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn work_dir(&self) -> PathBuf {
        self.c.work.path().to_path_buf()
    }

    fn cli_path(&self, file: &str) -> String {
        self.c.work.path().join(file).display().to_string()
    }

    fn sample_service(&self) -> String {
        bin("sample-service").display().to_string()
    }

    fn agent_status(&self, host: &str) -> Result<Value> {
        self.agent_json(host, &["status"])
    }

    fn agent_releases(&self, host: &str, service: &str) -> Result<Value> {
        self.agent_json(host, &["releases", service])
    }

    fn restart_agent(&mut self, host: &str, crash_at: Option<&str>) -> Result<()> {
        let i = self.index(host)?;
        self.rt
            .block_on(self.c.agents[i].restart(crash_at.map(str::to_string)))
    }

    fn kill9_agent(&mut self, host: &str) -> Result<()> {
        let i = self.index(host)?;
        self.c.agents[i].kill9();
        Ok(())
    }

    fn wait_agent_exit(&mut self, host: &str) -> Result<()> {
        let i = self.index(host)?;
        self.rt.block_on(self.c.agents[i].wait_exit())
    }

    fn agent_log(&self, host: &str) -> String {
        self.index(host)
            .map(|i| self.c.agents[i].log())
            .unwrap_or_default()
    }

    fn restart_coordinator(&mut self, crash_at: Option<&str>) -> Result<()> {
        let extra = crash_at
            .map(|p| format!("[testing]\ncrash_at = {p:?}"))
            .unwrap_or_default();
        self.c.coord.set_extra(&extra);
        self.rt.block_on(self.c.coord.restart())
    }

    fn kill9_coordinator(&mut self) -> Result<()> {
        self.c.coord.kill9();
        Ok(())
    }

    fn stop_coordinator(&mut self) -> Result<()> {
        let st = self
            .rt
            .block_on(self.c.coord.stop(Duration::from_secs(20)))?;
        ensure!(st.success(), "the coordinator's clean stop ended with {st}");
        Ok(())
    }

    fn wait_coordinator_exit(&mut self) -> Result<()> {
        self.rt.block_on(self.c.coord.wait_exit(WAIT))?;
        Ok(())
    }

    fn coordinator_log(&self) -> String {
        self.c.coord.log()
    }
}

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
