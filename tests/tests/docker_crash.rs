//! The crash scenarios of issue 7 on real hosts: a coordinator and agents in
//! their own containers on a private Docker network (`rollout_tests::docker`).
//! The scenarios are in `crash_common` (also run on loopback by
//! `loopback_faults.rs`):
//!
//! 1. an agent `kill -9` at every journaled step of an activation and of a
//!    rollback (crash points), one small host per point in one fleet;
//! 2. a coordinator `kill -9` right after each persisted rollout transition
//!    (the coordinator's crash points), the container started again;
//! 8. rolling restarts of the coordinator container (`docker kill` and
//!    `docker stop`, in turn) while three services' rollouts run.
//!
//! Without a Docker engine these tests fail unless `ROLLOUT_SKIP_DOCKER=1`.

mod crash_common;

use std::path::PathBuf;

use anyhow::{Context, Result, ensure};
use crash_common::{Rig, WAIT};
use rollout_tests::docker::{
    COORDINATOR, DockerFleet, FleetOptions, SAMPLE_SERVICE, SHARED, docker, poll,
};
use serde_json::Value;

/// A [`DockerFleet`] as a [`Rig`].
struct DockerRig {
    f: DockerFleet,
}

impl DockerRig {
    /// A fleet of `n` hosts `h1..hN`, host `i` with extra `[env]` `env(i)`;
    /// `None` when the Docker tests are skipped.
    fn start(n: usize, env: impl Fn(usize) -> Vec<(String, String)>) -> Result<Option<DockerRig>> {
        let mut opts = FleetOptions::new(n);
        for (i, a) in opts.agents.iter_mut().enumerate() {
            a.env.extend(env(i));
        }
        Ok(DockerFleet::start(opts)?.map(|f| DockerRig { f }))
    }

    fn coordinator_running(&self) -> bool {
        docker(&[
            "inspect",
            "-f",
            "{{.State.Running}}",
            &self.f.container(COORDINATOR),
        ])
        .is_ok_and(|s| s == "true")
    }

    fn wait_coordinator_down(&self) -> Result<()> {
        poll("the coordinator container to stop", WAIT, || {
            (!self.coordinator_running()).then_some(())
        })
    }
}

impl Rig for DockerRig {
    fn hosts(&self) -> Vec<String> {
        self.f.hosts()
    }

    fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
        let out = self.f.cli(args)?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    fn work_dir(&self) -> PathBuf {
        self.f.dir.path().join("work")
    }

    fn cli_path(&self, file: &str) -> String {
        format!("{SHARED}/work/{file}")
    }

    fn sample_service(&self) -> String {
        SAMPLE_SERVICE.to_string()
    }

    fn agent_status(&self, host: &str) -> Result<Value> {
        self.f.agent_status(host)
    }

    fn agent_releases(&self, host: &str, service: &str) -> Result<Value> {
        self.f.agent_releases(host, service)
    }

    fn restart_agent(&mut self, host: &str, crash_at: Option<&str>) -> Result<()> {
        if self.f.agent_running(host) {
            self.f.kill9_agent(host)?;
            poll(&format!("{host}'s agent to die"), WAIT, || {
                (!self.f.agent_running(host)).then_some(())
            })?;
        }
        // The config without its `[testing]` table, then the crash point.
        let path = self.f.host_dir(host).join("agent.toml");
        let text = std::fs::read_to_string(&path)?;
        let mut out = String::new();
        for line in text.lines() {
            if line == "[testing]" || line.starts_with("crash_at") {
                continue;
            }
            if line == "[log]"
                && let Some(p) = crash_at
            {
                out.push_str(&format!("[testing]\ncrash_at = {p:?}\n"));
            }
            out.push_str(line);
            out.push('\n');
        }
        ensure!(
            crash_at.is_none() || out.contains("crash_at"),
            "no [log] table in {}",
            path.display()
        );
        std::fs::write(&path, out)?;
        self.f.start_agent(host)
    }

    fn kill9_agent(&mut self, host: &str) -> Result<()> {
        self.f.kill9_agent(host)?;
        poll(&format!("{host}'s agent to die"), WAIT, || {
            (!self.f.agent_running(host)).then_some(())
        })
    }

    fn wait_agent_exit(&mut self, host: &str) -> Result<()> {
        poll(&format!("{host}'s agent to exit"), WAIT, || {
            (!self.f.agent_running(host)).then_some(())
        })
        .with_context(|| self.f.logs(host))
    }

    fn agent_log(&self, host: &str) -> String {
        self.f.logs(host)
    }

    fn restart_coordinator(&mut self, crash_at: Option<&str>) -> Result<()> {
        let extra: Vec<String> = crash_at
            .map(|p| vec!["[testing]".to_string(), format!("crash_at = {p:?}")])
            .unwrap_or_default();
        self.f.set_coordinator_extra(&extra)?;
        if self.coordinator_running() {
            self.kill9_coordinator()?;
        }
        self.f.restart(COORDINATOR)
    }

    fn kill9_coordinator(&mut self) -> Result<()> {
        self.f.kill9(COORDINATOR)?;
        self.wait_coordinator_down()
    }

    fn stop_coordinator(&mut self) -> Result<()> {
        let c = self.f.container(COORDINATOR);
        docker(&["stop", "-t", "20", &c])?;
        let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &c])?;
        ensure!(
            code == "0",
            "the coordinator's clean stop ended with exit code {code}"
        );
        Ok(())
    }

    fn wait_coordinator_exit(&mut self) -> Result<()> {
        self.wait_coordinator_down()
    }

    fn coordinator_log(&self) -> String {
        self.f.logs(COORDINATOR)
    }
}

#[test]
fn agent_kill9_at_every_crash_point_in_containers_recovers_and_is_reported() -> Result<()> {
    let Some(mut rig) = DockerRig::start(
        crash_common::agent_crash_hosts(),
        crash_common::agent_crash_env,
    )?
    else {
        return Ok(());
    };
    crash_common::agent_crash_points(&mut rig)
}

#[test]
fn coordinator_kill9_at_every_persisted_state_in_a_container_finishes_each_rollout_once()
-> Result<()> {
    let Some(mut rig) = DockerRig::start(2, crash_common::coordinator_crash_env)? else {
        return Ok(());
    };
    crash_common::coordinator_crash_points(&mut rig)
}

#[test]
fn coordinator_container_rolling_restarts_during_three_concurrent_rollouts() -> Result<()> {
    let Some(mut rig) = DockerRig::start(3, |_| {
        crash_common::SERVICES
            .iter()
            .zip([8081, 8082, 8083])
            .map(|((_, var), port)| (var.to_string(), port.to_string()))
            .collect()
    })?
    else {
        return Ok(());
    };
    crash_common::rolling_restarts_with_three_rollouts(&mut rig, 4, "\"4s\"")
}
