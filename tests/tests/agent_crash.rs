//! `kill -9` of the agent at every journaled step of an activation and of a
//! rollback (crash points: the test-only `[testing] crash_at` setting makes
//! the agent SIGKILL itself right after journaling that point), then a
//! restart: the host must end on a healthy release, old or new, with a
//! consistent `current` link and history.

use anyhow::{Result, ensure};
use rollout_proto::pb;
use rollout_tests::{
    Agent, AgentOptions, DEADLINE, FakeCoordinator, eventually, free_port, sample_artifact,
    sample_definition, served_version,
};

const SVC: &str = "web";

/// Where the host must end after the crash and restart.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Expect {
    /// Rolled back: idle on v1.
    Old,
    /// Kept in probation on v2 (the crash came after verify); commit works.
    NewInProbation,
}

async fn crash_and_recover(
    host: &str,
    point: &str,
    v2_healthy: bool,
    expect: Expect,
) -> Result<()> {
    let coord = FakeCoordinator::start().await?;
    let mut agent = Agent::start(AgentOptions::new(host, Some(coord.url()))).await?;
    coord.wait_connected(host, 1).await?;
    let port = free_port();
    let d1 = coord.add_artifact(sample_artifact(&["version=v1"]));
    coord
        .stage(host, sample_definition(SVC, "v1", &d1, port))
        .await?;
    let r = coord.activate(host, SVC, "v1").await?;
    ensure!(r.ok, "v1: {}", r.error);
    coord.commit(host, SVC, "v1").await?;
    let healthy = if v2_healthy {
        "healthy=true"
    } else {
        "healthy=false"
    };
    let d2 = coord.add_artifact(sample_artifact(&["version=v2", healthy]));
    let mut def2 = sample_definition(SVC, "v2", &d2, port);
    def2.healthy_deadline_ms = 2000;
    coord.stage(host, def2).await?;

    // Arm the crash point and activate; the agent kills itself there.
    agent.restart(Some(point.to_string())).await?;
    coord.wait_connected(host, 2).await?;
    coord
        .send(
            host,
            pb::coordinator_message::Cmd::Activate(pb::Activate {
                service: SVC.into(),
                release: "v2".into(),
                cause: "crash-test".into(),
            }),
        )
        .await?;
    agent.wait_exit().await?;
    ensure!(
        agent.log().contains("crash point reached"),
        "agent exited but not at {point}:\n{}",
        agent.log()
    );

    // Restart without the crash point: the agent recovers from its journal.
    agent.restart(None).await?;
    let report = match expect {
        Expect::Old => agent.wait_for(SVC, pb::Phase::Idle, "v1").await?,
        Expect::NewInProbation => agent.wait_for(SVC, pb::Phase::Probation, "v2").await?,
    };
    let want = match expect {
        Expect::Old => "v1",
        Expect::NewInProbation => "v2",
    };
    // No half-switched `current`, no half-staged release.
    assert_eq!(
        agent.current_link(SVC).as_deref(),
        Some(want),
        "current link"
    );
    let dirs = agent.release_dirs(SVC);
    assert!(
        dirs.iter().all(|d| !d.ends_with(".tmp")),
        "leftover temp dirs: {dirs:?}"
    );
    assert_eq!(report.last_known_good, "v1");
    eventually(&format!("{want} serving"), DEADLINE, async || {
        (served_version(port).as_deref() == Some(want)).then_some(())
    })
    .await?;
    // History: nothing lost, v2 activated exactly once, in order.
    let hist = agent.history(SVC).await?;
    let seqs: Vec<u64> = hist.iter().map(|h| h.seq).collect();
    let mut sorted = seqs.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(seqs, sorted, "history out of order or duplicated");
    let events: Vec<String> = hist
        .iter()
        .map(|h| format!("{}:{}", h.release, h.event))
        .collect();
    assert_eq!(
        &events[..5],
        [
            "v1:staged",
            "v1:activating",
            "v1:verified",
            "v1:committed",
            "v2:staged"
        ],
        "{events:?}"
    );
    assert_eq!(
        events.iter().filter(|e| *e == "v2:activating").count(),
        1,
        "{events:?}"
    );
    match expect {
        Expect::Old => {
            assert_eq!(
                events.last().map(String::as_str),
                Some("v1:rolled_back"),
                "{events:?}"
            );
        }
        Expect::NewInProbation => {
            assert_eq!(
                events.last().map(String::as_str),
                Some("v2:verified"),
                "{events:?}"
            );
            coord.wait_connected(host, 3).await?;
            coord.commit(host, SVC, "v2").await?;
            agent.wait_for(SVC, pb::Phase::Idle, "v2").await?;
        }
    }
    // Recovery is idempotent: another restart changes nothing.
    let before = agent.history(SVC).await?.len();
    agent.restart(None).await?;
    let after_phase = match expect {
        Expect::Old => agent.wait_for(SVC, pb::Phase::Idle, "v1").await?,
        Expect::NewInProbation => agent.wait_for(SVC, pb::Phase::Idle, "v2").await?,
    };
    assert_eq!(after_phase.current_release, want);
    assert_eq!(
        agent.history(SVC).await?.len(),
        before,
        "a clean restart wrote history"
    );
    Ok(())
}

macro_rules! crash_tests {
    ($($name:ident: $point:literal, $healthy:expr, $expect:expr;)*) => {$(
        #[tokio::test]
        async fn $name() -> Result<()> {
            crash_and_recover(stringify!($name), $point, $healthy, $expect).await
        }
    )*};
}

crash_tests! {
    kill9_activating_before_stop_intent: "activating:before_stop:intent", true, Expect::Old;
    kill9_activating_before_stop_done: "activating:before_stop:done", true, Expect::Old;
    kill9_activating_stop_intent: "activating:stop:intent", true, Expect::Old;
    kill9_activating_stop_done: "activating:stop:done", true, Expect::Old;
    kill9_activating_before_switch_intent: "activating:before_switch:intent", true, Expect::Old;
    kill9_activating_before_switch_done: "activating:before_switch:done", true, Expect::Old;
    kill9_activating_switch_intent: "activating:switch:intent", true, Expect::Old;
    kill9_activating_switch_done: "activating:switch:done", true, Expect::Old;
    kill9_activating_after_switch_intent: "activating:after_switch:intent", true, Expect::Old;
    kill9_activating_after_switch_done: "activating:after_switch:done", true, Expect::Old;
    kill9_activating_start_intent: "activating:start:intent", true, Expect::Old;
    kill9_activating_start_done: "activating:start:done", true, Expect::Old;
    kill9_verifying_intent: "verifying:intent", true, Expect::Old;
    kill9_probation_intent: "probation:intent", true, Expect::NewInProbation;
    kill9_rolling_back_stop_intent: "rolling_back:stop:intent", false, Expect::Old;
    kill9_rolling_back_stop_done: "rolling_back:stop:done", false, Expect::Old;
    kill9_rolling_back_switch_intent: "rolling_back:switch:intent", false, Expect::Old;
    kill9_rolling_back_switch_done: "rolling_back:switch:done", false, Expect::Old;
    kill9_rolling_back_start_intent: "rolling_back:start:intent", false, Expect::Old;
    kill9_rolling_back_start_done: "rolling_back:start:done", false, Expect::Old;
    kill9_rolling_back_verify_intent: "rolling_back:verify:intent", false, Expect::Old;
}
