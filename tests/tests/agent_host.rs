//! Scenarios of one real `rollout-agent` on this machine, driven through the
//! real protocol by a fake coordinator and through the admin socket: a real
//! sample service is deployed, verified, committed and rolled back.

use std::process::Command;
use std::time::Duration;

use anyhow::Result;
use rollout_proto::pb;
use rollout_tests::{
    Agent, AgentOptions, DEADLINE, FakeCoordinator, bin, eventually, free_port, sample_artifact,
    sample_definition, served_version,
};

const SVC: &str = "web";

struct Env {
    coord: FakeCoordinator,
    agent: Agent,
    port: u16,
}

async fn setup(host: &str) -> Result<Env> {
    let coord = FakeCoordinator::start().await?;
    let agent = Agent::start(AgentOptions::new(host, Some(coord.url()))).await?;
    coord.wait_connected(host, 1).await?;
    Ok(Env {
        coord,
        agent,
        port: free_port(),
    })
}

impl Env {
    fn host(&self) -> &str {
        &self.agent.opts.host
    }

    fn release(&self, release: &str, conf: &[&str]) -> pb::ServiceDefinition {
        let mut lines = vec![format!("version={release}")];
        lines.extend(conf.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let digest = self.coord.add_artifact(sample_artifact(&refs));
        sample_definition(SVC, release, &digest, self.port)
    }

    /// Stage + activate + commit a healthy release.
    async fn deploy(&self, release: &str) -> Result<()> {
        let def = self.release(release, &[]);
        self.coord.stage(self.host(), def).await?;
        let r = self.coord.activate(self.host(), SVC, release).await?;
        anyhow::ensure!(
            r.ok,
            "activate {release}: {}\n{}",
            r.error,
            self.agent.log()
        );
        self.coord.commit(self.host(), SVC, release).await?;
        Ok(())
    }

    async fn serving(&self, version: &str) -> Result<()> {
        eventually(&format!("{version} serving"), DEADLINE, async || {
            (served_version(self.port).as_deref() == Some(version)).then_some(())
        })
        .await
    }
}

#[tokio::test]
async fn good_release_activates_verifies_and_commits() -> Result<()> {
    let env = setup("good-1").await?;
    env.deploy("v1").await?;
    env.serving("v1").await?;
    let def = env.release("v2", &[]);
    env.coord.stage(env.host(), def).await?;
    let r = env.coord.activate(env.host(), SVC, "v2").await?;
    assert!(r.ok, "{}", r.error);
    let s = r.service.expect("service report");
    assert_eq!(s.phase, pb::Phase::Probation as i32);
    assert_eq!(s.current_release, "v2");
    assert_eq!(s.last_known_good, "v1");
    env.serving("v2").await?;
    let r = env.coord.commit(env.host(), SVC, "v2").await?;
    let s = r.service.expect("service report");
    assert_eq!(s.phase, pb::Phase::Idle as i32);
    assert_eq!(s.last_known_good, "v2");
    assert_eq!(s.previous_release, "v1");
    assert_eq!(env.agent.current_link(SVC).as_deref(), Some("v2"));
    let events: Vec<String> = env
        .agent
        .history(SVC)
        .await?
        .into_iter()
        .map(|h| format!("{}:{}", h.release, h.event))
        .collect();
    assert_eq!(
        events,
        [
            "v1:staged",
            "v1:activating",
            "v1:verified",
            "v1:committed",
            "v2:staged",
            "v2:activating",
            "v2:verified",
            "v2:committed"
        ]
    );
    Ok(())
}

#[tokio::test]
async fn staging_twice_fetches_once_and_leaves_the_running_service_alone() -> Result<()> {
    let env = setup("stage-1").await?;
    env.deploy("v1").await?;
    let before = env.coord.fetches();
    let def = env.release("v2", &[]);
    env.coord.stage(env.host(), def.clone()).await?;
    env.coord.stage(env.host(), def).await?;
    assert_eq!(
        env.coord.fetches(),
        before + 1,
        "second stage fetched again"
    );
    assert_eq!(served_version(env.port).as_deref(), Some("v1"));
    assert_eq!(env.agent.current_link(SVC).as_deref(), Some("v1"));
    Ok(())
}

#[tokio::test]
async fn wrong_digest_is_refused_before_unpacking_and_nothing_changes() -> Result<()> {
    let env = setup("digest-1").await?;
    env.deploy("v1").await?;
    let good = sample_artifact(&["version=v2"]);
    let claimed = rollout_tests::digest_of(b"something else");
    env.coord.add_artifact_as(&claimed, good);
    let def = sample_definition(SVC, "v2", &claimed, env.port);
    let r = env
        .coord
        .command(
            env.host(),
            pb::coordinator_message::Cmd::Stage(pb::Stage {
                definition: Some(def),
            }),
        )
        .await?;
    assert!(!r.ok);
    assert_eq!(r.failure, pb::FailureKind::StageFailed as i32);
    assert!(r.error.contains("digest"), "{}", r.error);
    assert_eq!(
        env.agent
            .release_dirs(SVC)
            .iter()
            .filter(|d| !d.starts_with('.'))
            .collect::<Vec<_>>(),
        ["v1"]
    );
    assert!(
        env.agent
            .release_dirs(SVC)
            .iter()
            .all(|d| !d.ends_with(".tmp"))
    );
    assert_eq!(served_version(env.port).as_deref(), Some("v1"));
    Ok(())
}

#[tokio::test]
async fn unhealthy_release_is_rolled_back_and_the_old_version_serves_again() -> Result<()> {
    let env = setup("unhealthy-1").await?;
    env.deploy("v1").await?;
    let def = env.release("v2", &["healthy=false"]);
    env.coord.stage(env.host(), def).await?;
    let r = env.coord.activate(env.host(), SVC, "v2").await?;
    assert!(!r.ok, "unhealthy release was accepted");
    assert_eq!(r.failure, pb::FailureKind::Unhealthy as i32, "{}", r.error);
    assert!(r.error.contains("rolled back to v1"), "{}", r.error);
    let s = env.agent.wait_for(SVC, pb::Phase::Idle, "v1").await?;
    assert_eq!(s.last_known_good, "v1");
    env.serving("v1").await?;
    assert_eq!(env.agent.current_link(SVC).as_deref(), Some("v1"));
    let hist = env.agent.history(SVC).await?;
    let last = hist.last().expect("history");
    assert_eq!(
        (last.release.as_str(), last.event.as_str()),
        ("v1", "rolled_back")
    );
    assert!(
        hist.iter()
            .any(|h| h.event == "rolling_back" && h.release == "v2" && h.reason.contains("health")),
        "{hist:?}"
    );
    Ok(())
}

#[tokio::test]
async fn release_that_crashes_at_start_is_rolled_back_at_once_not_at_healthy_deadline() -> Result<()>
{
    let env = setup("crash-1").await?;
    env.deploy("v1").await?;
    // Exits 2 at once, as when its port is taken; restarted on failure.
    let mut def = env.release("v2", &["bind_fail=true"]);
    def.healthy_deadline_ms = 300_000;
    env.coord.stage(env.host(), def).await?;
    let asked = std::time::Instant::now();
    let r = env.coord.activate(env.host(), SVC, "v2").await?;
    let took = asked.elapsed();
    assert!(!r.ok, "a crashing release was accepted");
    assert_eq!(r.failure, pb::FailureKind::Unhealthy as i32, "{}", r.error);
    assert!(r.error.contains("crash loop"), "{}", r.error);
    assert!(r.error.contains("rolled back to v1"), "{}", r.error);
    assert!(
        took < std::time::Duration::from_secs(60),
        "judged after {took:?}, as if it waited for healthy_deadline"
    );
    env.agent.wait_for(SVC, pb::Phase::Idle, "v1").await?;
    env.serving("v1").await?;
    Ok(())
}

#[tokio::test]
async fn release_that_turns_unhealthy_in_probation_is_rolled_back_by_the_host() -> Result<()> {
    let env = setup("probation-1").await?;
    env.deploy("v1").await?;
    // Healthy long enough to pass verify, then crashes for good.
    let mut def = env.release("v2", &["exit_after_ms=1500"]);
    if let Some(pb::service_definition::Supervision::Exec(e)) = def.supervision.as_mut() {
        e.restart = pb::RestartPolicy::Never as i32;
    }
    env.coord.stage(env.host(), def).await?;
    let r = env.coord.activate(env.host(), SVC, "v2").await?;
    assert!(r.ok, "{}", r.error);
    env.agent.wait_for(SVC, pb::Phase::Idle, "v1").await?;
    env.serving("v1").await?;
    let hist = env.agent.history(SVC).await?;
    assert!(
        hist.iter()
            .any(|h| h.event == "rolling_back" && h.reason.contains("unhealthy in probation")),
        "{hist:?}"
    );
    Ok(())
}

#[tokio::test]
async fn uncommitted_release_is_rolled_back_after_commit_deadline_with_the_coordinator_gone()
-> Result<()> {
    let mut env = setup("deadline-1").await?;
    env.deploy("v1").await?;
    let mut def = env.release("v2", &[]);
    def.commit_deadline_ms = 1500;
    env.coord.stage(env.host(), def).await?;
    let r = env.coord.activate(env.host(), SVC, "v2").await?;
    assert!(r.ok, "{}", r.error);
    env.serving("v2").await?;
    // The coordinator vanishes mid-rollout.
    env.coord.stop();
    env.agent.wait_for(SVC, pb::Phase::Idle, "v1").await?;
    env.serving("v1").await?;
    let hist = env.agent.history(SVC).await?;
    assert!(
        hist.iter()
            .any(|h| h.event == "rolling_back" && h.reason.contains("commit_deadline")),
        "{hist:?}"
    );
    Ok(())
}

#[tokio::test]
async fn operator_rolls_back_on_the_host_with_no_coordinator() -> Result<()> {
    let mut env = setup("admin-1").await?;
    env.deploy("v1").await?;
    env.deploy("v2").await?;
    env.serving("v2").await?;
    env.coord.stop();
    let out = Command::new(bin("rollout-agent"))
        .args(["rollback", SVC, "--reason", "bad deploy", "--config"])
        .arg(env.agent.config_path())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("rolled back to v1"), "{text}");
    env.serving("v1").await?;
    let s = env.agent.service(SVC).await?.expect("service");
    assert_eq!(s.current_release, "v1");
    // And forward again by name.
    let out = Command::new(bin("rollout-agent"))
        .args(["rollback", SVC, "--to", "v2", "--socket"])
        .arg(env.agent.socket())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    env.serving("v2").await?;
    // A release that does not exist is a clear error and changes nothing.
    let out = Command::new(bin("rollout-agent"))
        .args(["rollback", SVC, "--to", "v9", "--socket"])
        .arg(env.agent.socket())
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("v9") && err.contains("not staged"), "{err}");
    assert_eq!(served_version(env.port).as_deref(), Some("v2"));
    // status and releases work offline, in JSON too.
    let out = Command::new(bin("rollout-agent"))
        .args(["releases", SVC, "--output", "json", "--socket"])
        .arg(env.agent.socket())
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["releases"].as_array().map(Vec::len), Some(2));
    let out = Command::new(bin("rollout-agent"))
        .args(["status", "--output", "json", "--socket"])
        .arg(env.agent.socket())
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["coordinator_connected"], false);
    assert_eq!(v["services"][0]["current"], "v2");
    Ok(())
}

#[tokio::test]
async fn admin_socket_is_private_to_the_agent_user() -> Result<()> {
    let env = setup("perm-1").await?;
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(env.agent.socket())?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    Ok(())
}

#[tokio::test]
async fn a_second_activation_while_one_runs_is_refused_naming_it() -> Result<()> {
    let env = setup("busy-1").await?;
    env.deploy("v1").await?;
    // v2 stays unhealthy, so its verify lasts the whole healthy_deadline.
    let def = env.release("v2", &["healthy=false"]);
    env.coord.stage(env.host(), def).await?;
    env.coord
        .send(
            env.host(),
            pb::coordinator_message::Cmd::Activate(pb::Activate {
                service: SVC.into(),
                release: "v2".into(),
                cause: "r1".into(),
            }),
        )
        .await?;
    env.agent.wait_for(SVC, pb::Phase::Verifying, "v2").await?;
    let r = env.coord.activate(env.host(), SVC, "v1").await?;
    assert!(!r.ok);
    assert_eq!(r.failure, pb::FailureKind::Busy as i32);
    assert!(r.error.contains("activation of v2"), "{}", r.error);
    env.agent.wait_for(SVC, pb::Phase::Idle, "v1").await?;
    Ok(())
}

#[tokio::test]
async fn agent_restart_adopts_the_running_service_without_restarting_it() -> Result<()> {
    let mut env = setup("adopt-1").await?;
    env.deploy("v1").await?;
    let pid_before = env.agent.service(SVC).await?.map(|s| s.current_release);
    assert_eq!(pid_before.as_deref(), Some("v1"));
    // The service keeps serving while the agent is down.
    env.agent.kill9();
    assert_eq!(served_version(env.port).as_deref(), Some("v1"));
    env.agent.restart(None).await?;
    env.coord.wait_connected(env.host(), 2).await?;
    let s = env.agent.wait_for(SVC, pb::Phase::Idle, "v1").await?;
    assert_eq!(s.last_known_good, "v1");
    let hello = env.coord.last_hello(env.host()).expect("hello");
    let reported = hello.report.expect("report").services;
    assert_eq!(reported.len(), 1);
    assert_eq!(reported[0].current_release, "v1");
    assert!(
        env.agent.log().contains("adopting running service process"),
        "{}",
        env.agent.log()
    );
    let _ = Duration::ZERO;
    Ok(())
}

#[tokio::test]
async fn services_and_hooks_run_as_the_configured_user() -> Result<()> {
    let coord = FakeCoordinator::start().await?;
    let mut opts = AgentOptions::new("runas-1", Some(coord.url()));
    opts.extra.push("run_as = \"nobody\"".into());
    let agent = Agent::start(opts).await?;
    // The test's temp dir is private; let the service user traverse it.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(agent.dir.path(), std::fs::Permissions::from_mode(0o711))?;
    coord.wait_connected("runas-1", 1).await?;
    let port = free_port();
    let digest = coord.add_artifact(sample_artifact(&["version=v1"]));
    let mut def = sample_definition(SVC, "v1", &digest, port);
    // A hook records who ran it.
    def.hooks = Some(pb::Hooks {
        after_switch: Some(pb::Command {
            argv: vec!["sh".into(), "-c".into(), "id -u".into()],
            timeout_ms: 5000,
        }),
        ..Default::default()
    });
    coord.stage("runas-1", def).await?;
    let r = coord.activate("runas-1", SVC, "v1").await?;
    assert!(r.ok, "{}\n{}", r.error, agent.log());
    // The service process: found by its working directory, owned by nobody (65534).
    let root = agent.data_dir().join("services");
    let uids: Vec<String> = std::fs::read_dir("/proc")?
        .flatten()
        .filter(|p| std::fs::read_link(p.path().join("cwd")).is_ok_and(|c| c.starts_with(&root)))
        .filter_map(|p| std::fs::read_to_string(p.path().join("status")).ok())
        .filter_map(|st| {
            st.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
        })
        .collect();
    assert!(!uids.is_empty(), "no service process found");
    assert!(uids.iter().all(|u| u == "65534"), "service uids: {uids:?}");
    // The hook's output went to the release log: it printed nobody's uid.
    let log = std::fs::read_to_string(agent.data_dir().join("services/web/logs/v1.log"))?;
    assert!(log.lines().any(|l| l.trim() == "65534"), "hook log: {log}");
    // State and cache stay private to the agent.
    for d in ["state", "cache"] {
        let mode = std::fs::metadata(agent.data_dir().join(d))?
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o700, "{d}");
    }
    Ok(())
}

#[tokio::test]
async fn an_oversized_message_is_refused_and_changes_nothing() -> Result<()> {
    let env = setup("oversize-1").await?;
    env.deploy("v1").await?;
    let before = env.agent.history(SVC).await?;
    // A stage whose definition carries 5 MiB of environment: over the 4 MiB
    // message limit of the agent's stream.
    let mut def = env.release("v2", &[]);
    def.env.insert("HUGE".into(), "x".repeat(5 << 20));
    env.coord
        .send(
            env.host(),
            pb::coordinator_message::Cmd::Stage(pb::Stage {
                definition: Some(def),
            }),
        )
        .await?;
    // The agent drops that stream and dials again: a second hello.
    env.coord.wait_connected(env.host(), 2).await?;
    let log = env.agent.log();
    assert!(
        log.to_lowercase().contains("message") && log.contains("coordinator session ended"),
        "{log}"
    );
    // Nothing changed: same history, same release serving, nothing staged.
    assert_eq!(env.agent.history(SVC).await?, before);
    assert_eq!(served_version(env.port).as_deref(), Some("v1"));
    assert_eq!(
        env.agent
            .release_dirs(SVC)
            .iter()
            .filter(|d| !d.starts_with('.'))
            .count(),
        1
    );
    // And the agent still takes normal commands.
    env.deploy("v3").await?;
    env.serving("v3").await?;
    Ok(())
}

fn with_thresholds(mut def: pb::ServiceDefinition, t: pb::Thresholds) -> pb::ServiceDefinition {
    def.thresholds = Some(t);
    def
}

#[tokio::test]
async fn a_release_over_its_memory_ceiling_is_rolled_back_with_the_numbers() -> Result<()> {
    let env = setup("ceiling-1").await?;
    env.deploy("v1").await?;
    let def = with_thresholds(
        env.release("v2", &["alloc_mb=64"]),
        pb::Thresholds {
            max_rss_bytes: 32 << 20,
            sustained_samples: 2,
            ..Default::default()
        },
    );
    env.coord.stage(env.host(), def).await?;
    let r = env.coord.activate(env.host(), SVC, "v2").await?;
    assert!(!r.ok, "a release over its ceiling was accepted");
    assert_eq!(
        r.failure,
        pb::FailureKind::ResourceRegression as i32,
        "{}",
        r.error
    );
    assert!(
        r.error.contains("over the ceiling of 33554432 bytes"),
        "{}",
        r.error
    );
    env.agent.wait_for(SVC, pb::Phase::Idle, "v1").await?;
    env.serving("v1").await?;
    let hist = env.agent.history(SVC).await?;
    assert!(
        hist.iter()
            .any(|h| h.event == "rolling_back" && h.release == "v2" && h.reason.contains("rss")),
        "{hist:?}"
    );
    Ok(())
}

#[tokio::test]
async fn a_release_using_3x_the_memory_of_the_previous_one_is_rolled_back() -> Result<()> {
    let env = setup("regress-1").await?;
    let v1 = env.release("v1", &["alloc_mb=16"]);
    env.coord.stage(env.host(), v1).await?;
    assert!(env.coord.activate(env.host(), SVC, "v1").await?.ok);
    env.coord.commit(env.host(), SVC, "v1").await?;
    // Wait until the agent has measured v1's steady state.
    let steady = rollout_tests::eventually("v1 steady state measured", DEADLINE, async || {
        let s = env.agent.service(SVC).await.ok().flatten()?;
        (s.steady_rss_bytes > 16 << 20).then_some(s.steady_rss_bytes)
    })
    .await?;
    let def = with_thresholds(
        env.release("v2", &["alloc_mb=64"]),
        pb::Thresholds {
            max_rss_ratio: 1.5,
            sustained_samples: 2,
            ..Default::default()
        },
    );
    env.coord.stage(env.host(), def).await?;
    let r = env.coord.activate(env.host(), SVC, "v2").await?;
    assert!(
        !r.ok,
        "a 3x memory regression was accepted (v1 steady {steady})"
    );
    assert_eq!(
        r.failure,
        pb::FailureKind::ResourceRegression as i32,
        "{}",
        r.error
    );
    assert!(
        r.error.contains("memory regression")
            && r.error.contains("previous release's steady state"),
        "{}",
        r.error
    );
    env.agent.wait_for(SVC, pb::Phase::Idle, "v1").await?;
    env.serving("v1").await?;
    // The same growth within the ratio passes.
    let def = with_thresholds(
        env.release("v3", &["alloc_mb=18"]),
        pb::Thresholds {
            max_rss_ratio: 1.5,
            sustained_samples: 2,
            ..Default::default()
        },
    );
    env.coord.stage(env.host(), def).await?;
    let r = env.coord.activate(env.host(), SVC, "v3").await?;
    assert!(r.ok, "{}", r.error);
    Ok(())
}

#[tokio::test]
async fn reported_cpu_and_memory_match_a_known_load() -> Result<()> {
    let env = setup("measure-1").await?;
    let def = env.release("v1", &["alloc_mb=64", "burn_cpu_percent=50"]);
    env.coord.stage(env.host(), def).await?;
    assert!(env.coord.activate(env.host(), SVC, "v1").await?.ok);
    // Memory: the 64 MiB allocation plus a small process.
    let rss = rollout_tests::eventually("rss reported", DEADLINE, async || {
        let s = env.agent.service(SVC).await.ok().flatten()?;
        (s.rss_bytes >= 64 << 20).then_some(s.rss_bytes)
    })
    .await?;
    assert!(
        rss < (64 + 32) << 20,
        "rss {rss} far above the 64 MiB allocation"
    );
    // CPU: half a core, within a tolerance (readings on a busy machine vary).
    let cpu = rollout_tests::eventually("cpu near 50%", DEADLINE, async || {
        let s = env.agent.service(SVC).await.ok().flatten()?;
        (s.steady_cpu_percent > 0.0 && (s.cpu_percent - 50.0).abs() < 20.0).then_some(s.cpu_percent)
    })
    .await?;
    assert!((30.0..70.0).contains(&cpu), "cpu {cpu}");
    Ok(())
}
