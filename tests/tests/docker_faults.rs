//! Multi-host fault scenarios (issue 7): a coordinator and agents in their own
//! containers on a private Docker network, with real partitions and full
//! disks. The harness is `rollout_tests::docker`; without a Docker engine
//! these tests fail unless `ROLLOUT_SKIP_DOCKER=1`.
//!
//! Every scenario ends with the history checker
//! ([`DockerFleet::check_histories`]): each agent's own history shows at most
//! one activation per rollout, every host ends idle on a release it committed
//! or on its last known good one, every rollout is finished with an event log
//! without gap, and a rollout reported successful has every host it committed
//! on its release.
//!
//! The fleet's keepalive is short ([`KEEPALIVE_INTERVAL`] +
//! [`KEEPALIVE_TIMEOUT`] = 3 s), so a silent partition or a frozen host is
//! noticed in seconds; the deadlines of the specs are seconds too, so each
//! scenario runs in well under a minute or two.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rollout_tests::docker::{
    COORDINATOR, DockerFleet, FleetOptions, KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, poll,
};

const ALL_AT_ONCE: &[(&str, &str)] = &[("batch_percent", "100"), ("max_unavailable", "\"100%\"")];

/// Deploys v1 to every host at once and waits until they all serve it.
fn deploy_v1(f: &DockerFleet) -> Result<String> {
    let spec = f.write_spec("v1", &[], 0, ALL_AT_ONCE)?;
    let (ok, out, err) = f.deploy_wait(&spec)?;
    ensure!(
        ok,
        "v1 deploy failed:\n{out}\n{err}\n{}",
        f.logs(COORDINATOR)
    );
    let hosts = f.hosts();
    let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
    f.wait_serving(&hosts, "v1")?;
    Ok(out.lines().next().unwrap_or_default().trim().to_string())
}

/// The `at_ms` of the first `event` of `release` in a host's own history.
fn at(doc: &serde_json::Value, release: &str, event: &str) -> Option<i64> {
    doc["history"]
        .as_array()?
        .iter()
        .find(|e| e["release"] == release && e["event"] == event)
        .and_then(|e| e["at_ms"].as_i64())
}

#[test]
fn rolling_deploy_across_four_hosts_on_a_private_network() -> Result<()> {
    let t0 = Instant::now();
    let Some(f) = DockerFleet::start(FleetOptions::new(4))? else {
        return Ok(());
    };
    let v1 = deploy_v1(&f)?;
    let spec = f.write_spec(
        "v2",
        &[],
        0,
        &[("batch_size", "2"), ("max_unavailable", "2")],
    )?;
    let plan = f.json(&["plan", &spec])?;
    assert_eq!(
        plan["batches"],
        serde_json::json!([["h1", "h2"], ["h3", "h4"]])
    );
    let (ok, out, err) = f.deploy_wait(&spec)?;
    ensure!(
        ok,
        "v2 deploy failed:\n{out}\n{err}\n{}",
        f.logs(COORDINATOR)
    );
    let id = out.lines().next().unwrap_or_default().trim().to_string();
    let s = f.status(&id)?;
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(s["failures"], 0, "{s}");
    f.wait_serving(&["h1", "h2", "h3", "h4"], "v2")?;
    let hist = f.check_histories("web", &[&v1, &id])?;
    // Every host activated v2 exactly once, for this rollout, and no host of
    // the second batch started before both of the first had committed (the
    // hosts share the machine's clock).
    for (h, doc) in &hist {
        let n = doc["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["event"] == "activating" && e["cause"] == id.as_str())
            .count();
        assert_eq!(n, 1, "{h}: {doc:#}");
    }
    let first_done = ["h1", "h2"]
        .iter()
        .map(|h| at(&hist[*h], "v2", "committed").context("committed"))
        .collect::<Result<Vec<_>>>()?;
    let second_start = ["h3", "h4"]
        .iter()
        .map(|h| at(&hist[*h], "v2", "activating").context("activating"))
        .collect::<Result<Vec<_>>>()?;
    assert!(
        second_start.iter().min() >= first_done.iter().max(),
        "batch 2 started at {second_start:?} before batch 1 committed at {first_done:?}"
    );
    f.events_contiguous(&id)?;
    eprintln!("baseline: {:?}", t0.elapsed());
    Ok(())
}

#[test]
fn host_partitioned_while_verifying_rolls_back_on_its_own_and_is_reconciled_on_heal() -> Result<()>
{
    let t0 = Instant::now();
    let Some(f) = DockerFleet::start(FleetOptions::new(3))? else {
        return Ok(());
    };
    let v1 = deploy_v1(&f)?;
    // h1 alone first; it verifies for 3 s before it answers Activate, and
    // rolls itself back 3 s after entering probation unless committed.
    let spec = f.write_spec(
        "v2",
        &[],
        0,
        &[
            ("canary", "[1, \"100%\"]"),
            ("max_unavailable", "\"100%\""),
            ("max_failures", "1"),
            ("min_healthy_time", "\"3s\""),
            ("healthy_deadline", "\"10s\""),
            ("commit_deadline", "\"3s\""),
        ],
    )?;
    let id = f.deploy(&spec)?;
    poll("h1 verifying v2", Duration::from_secs(20), || {
        let s = f.agent_service("h1", "web").ok()??;
        (s["phase"] == "verifying").then_some(())
    })?;
    f.partition("h1")?;
    let cut = Instant::now();
    // Cut off, h1 passes verify, waits in probation for a commit that cannot
    // come, and returns to v1 by itself.
    poll("h1 back on v1 by itself", Duration::from_secs(20), || {
        let s = f.agent_service("h1", "web").ok()??;
        (s["phase"] == "idle" && s["current"] == "v1").then_some(())
    })?;
    let local_rollback = cut.elapsed();
    let doc = f.agent_releases("h1", "web")?;
    let hist = doc["history"].as_array().cloned().unwrap_or_default();
    assert!(
        hist.iter()
            .any(|e| e["event"] == "verified" && e["release"] == "v2"),
        "{doc:#}"
    );
    assert!(
        hist.iter().any(|e| e["event"] == "rolled_back"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("commit_deadline"))),
        "h1's history does not show a rollback for commit_deadline: {doc:#}"
    );
    assert_eq!(f.served_version("h1").as_deref(), Some("v1"));
    // The coordinator loses h1 (unreachable, within the failure budget) and
    // finishes the rollout on the others.
    let s = f.wait_state(&id, "succeeded", Duration::from_secs(45))?;
    let detected = cut.elapsed();
    assert_eq!(s["failures"], 1, "{s}");
    let h1 = f.host_progress(&id, "h1")?;
    assert_eq!(h1["failure"], "unreachable", "{h1}");
    f.wait_serving(&["h2", "h3"], "v2")?;
    // Heal: h1 reconnects with its history, and the coordinator records
    // the rollback it did offline.
    f.heal("h1")?;
    f.wait_connected(&["h1".to_string()])?;
    let h1 = poll("h1 reconciled", Duration::from_secs(20), || {
        let p = f.host_progress(&id, "h1").ok()?;
        p["reason"]
            .as_str()?
            .contains("returned on v1")
            .then_some(p)
    })?;
    assert!(
        h1["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("rolled_back"),
        "the reconciliation does not quote h1's rollback: {h1}"
    );
    let events = f.events_contiguous(&id)?;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "reconciled" && e["host"] == "h1"),
        "{events:?}"
    );
    // Budget: still one failure, and the rollout's result stands.
    let s = f.status(&id)?;
    assert_eq!(s["failures"], 1, "{s}");
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(f.served_version("h1").as_deref(), Some("v1"));
    f.check_histories("web", &[&v1, &id])?;
    eprintln!(
        "partition: h1 rolled back {local_rollback:?} after the cut, coordinator finished \
         {detected:?} after it; total {:?}",
        t0.elapsed()
    );
    Ok(())
}

#[test]
fn disk_full_during_staging_fails_the_stage_cleanly_and_leaves_the_running_release() -> Result<()> {
    let t0 = Instant::now();
    let mut opts = FleetOptions::new(3);
    opts.agent("h2").disk_limit = Some(64 << 20);
    let Some(f) = DockerFleet::start(opts)? else {
        return Ok(());
    };
    let v1 = deploy_v1(&f)?;
    let pid_before = f.sh("h2", "pidof sample-service")?;
    // v2 unpacks to 32 MiB of zeros (a few KiB compressed); h2 has 4 MiB free.
    let free = f.fill_disk("h2", 4 << 20)?;
    ensure!(free <= 4 << 20, "{free} bytes still free on h2");
    let spec = f.write_spec(
        "v2",
        &[],
        32 << 20,
        &[
            ("batch_percent", "100"),
            ("max_unavailable", "\"100%\""),
            ("max_failures", "1"),
        ],
    )?;
    let (ok, out, err) = f.deploy_wait(&spec)?;
    ensure!(
        ok,
        "v2 deploy failed:\n{out}\n{err}\n{}",
        f.logs(COORDINATOR)
    );
    let id = out.lines().next().unwrap_or_default().trim().to_string();
    let s = f.status(&id)?;
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(s["failures"], 1, "{s}");
    let h2 = f.host_progress(&id, "h2")?;
    assert_eq!(h2["failure"], "stage_failed", "{h2}");
    assert!(
        h2["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no space left on device"),
        "{h2}"
    );
    let events = f.events_contiguous(&id)?;
    assert!(
        events.iter().any(|e| e["host"] == "h2"
            && e["kind"] == "host_failed"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("stage_failed") && m.contains("no space"))),
        "{events:?}"
    );
    // Nothing of v2 half-unpacked on h2, and v1 runs on, the same process.
    let dirs = f.release_dirs("h2", "web")?;
    assert!(
        dirs.iter().all(|d| !d.contains("v2")),
        "leftovers of the failed stage on h2: {dirs:?}"
    );
    assert!(dirs.iter().any(|d| d == "v1"), "{dirs:?}");
    let st = f.agent_service("h2", "web")?.context("h2 has no web")?;
    assert_eq!(st["current"], "v1", "{st}");
    assert_eq!(st["phase"], "idle", "{st}");
    assert_eq!(f.served_version("h2").as_deref(), Some("v1"));
    assert_eq!(f.sh("h2", "pidof sample-service")?, pid_before);
    let doc = f.agent_releases("h2", "web")?;
    assert!(
        !doc["history"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["release"] == "v2"),
        "h2 recorded v2 although it never staged it: {doc:#}"
    );
    f.wait_serving(&["h1", "h3"], "v2")?;
    f.check_histories("web", &[&v1, &id])?;
    eprintln!("disk full: {:?}", t0.elapsed());
    Ok(())
}

/// The host's own `(phase, current release)` of `web`, if its agent answers.
fn phase_of(f: &DockerFleet, host: &str) -> Option<(String, String)> {
    let s = f.agent_service(host, "web").ok()??;
    Some((
        s["phase"].as_str()?.to_string(),
        s["current"].as_str().unwrap_or_default().to_string(),
    ))
}

/// Waits until `host` is idle on `release` by its own account.
fn wait_idle_on(f: &DockerFleet, host: &str, release: &str, deadline: Duration) -> Result<()> {
    poll(&format!("{host} idle on {release}"), deadline, || {
        let (phase, cur) = phase_of(f, host)?;
        (phase == "idle" && cur == release).then_some(())
    })
    .with_context(|| format!("{host} now {:?}\n{}", phase_of(f, host), f.logs(host)))
}

/// How many times the host's own history shows an activation for rollout `id`.
fn activations(doc: &serde_json::Value, id: &str) -> usize {
    doc["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["event"] == "activating" && e["cause"] == id)
        .count()
}

/// Scenario 4: the coordinator is cut off from the whole fleet while the
/// second batch verifies. Each host of that batch passes verification,
/// waits in probation for a commit that cannot come, and returns to its last
/// known good release within `commit_deadline`; the coordinator notices the
/// loss by keepalive, gives the hosts their reconnect grace, fails them as
/// unreachable and halts past its budget. Its fleet rollback cannot reach the
/// first batch (cut off too): the rollout ends `rolled_back` with their
/// rollbacks owed, and on heal it rolls each of them back and records where
/// every host really is: the whole fleet ends on v1.
#[test]
fn coordinator_partitioned_from_the_fleet_mid_batch_leaves_no_host_unverified() -> Result<()> {
    let t0 = Instant::now();
    let Some(f) = DockerFleet::start(FleetOptions::new(4))? else {
        return Ok(());
    };
    let v1 = deploy_v1(&f)?;
    let commit_deadline = Duration::from_secs(4);
    let spec = f.write_spec(
        "v2",
        &[],
        0,
        &[
            ("batch_size", "2"),
            ("max_unavailable", "2"),
            ("max_failures", "1"),
            ("auto_rollback", "true"),
            ("min_healthy_time", "\"4s\""),
            ("healthy_deadline", "\"15s\""),
            ("commit_deadline", "\"4s\""),
        ],
    )?;
    let id = f.deploy(&spec)?;
    // Batch 0 (h1, h2) commits; batch 1 (h3, h4) verifies for 4 s: cut then.
    poll("h3 and h4 verifying v2", Duration::from_secs(40), || {
        ["h3", "h4"]
            .iter()
            .all(|h| phase_of(&f, h).is_some_and(|(p, c)| p == "verifying" && c == "v2"))
            .then_some(())
    })
    .with_context(|| format!("{:?}", f.status(&id).ok()))?;
    f.partition(COORDINATOR)?;
    let cut = Instant::now();
    // Watch both sides at once: no host stays on the unverified release (each
    // rolls back by itself), and the coordinator, noticing the loss by
    // keepalive, halts past its budget and rolls back what it can reach
    // (nothing).
    let mut back: [Option<Duration>; 2] = [None, None];
    let mut alone: [Option<Duration>; 2] = [None, None];
    let mut halted = None;
    poll(
        "h3 and h4 back on v1 and the rollout rolled back",
        Duration::from_secs(40),
        || {
            for (i, h) in ["h3", "h4"].iter().enumerate() {
                if back[i].is_none()
                    && phase_of(&f, h).is_some_and(|(p, c)| p == "idle" && c == "v1")
                {
                    back[i] = Some(cut.elapsed());
                }
                // The agent's own keepalive ends its session.
                if alone[i].is_none()
                    && f.agent_status(h)
                        .is_ok_and(|st| st["coordinator_connected"] == false)
                {
                    alone[i] = Some(cut.elapsed());
                }
            }
            if halted.is_none() && f.status(&id).is_ok_and(|s| s["state"] == "rolled_back") {
                halted = Some(cut.elapsed());
            }
            (back.iter().chain(&alone).all(Option::is_some) && halted.is_some()).then_some(())
        },
    )
    .with_context(|| {
        format!(
            "h3 {:?}, h4 {:?}, rollout {:?}\n{}",
            phase_of(&f, "h3"),
            phase_of(&f, "h4"),
            f.status(&id).ok(),
            f.logs(COORDINATOR)
        )
    })?;
    for h in ["h3", "h4"] {
        let doc = f.agent_releases(h, "web")?;
        let hist = doc["history"].as_array().cloned().unwrap_or_default();
        let verified = at(&doc, "v2", "verified").context("v2 verified")?;
        let rolling = hist
            .iter()
            .find(|e| e["event"] == "rolling_back" && e["release"] == "v2")
            .with_context(|| format!("{h} has no rollback of v2: {doc:#}"))?;
        assert!(
            rolling["reason"]
                .as_str()
                .is_some_and(|r| r.contains("commit_deadline")),
            "{h} did not roll back for its commit_deadline: {doc:#}"
        );
        assert!(
            hist.iter().any(|e| e["event"] == "rolled_back"),
            "{h}'s rollback did not finish: {doc:#}"
        );
        // On v2 uncommitted for at most commit_deadline after it verified
        // (plus the agent's timer tick) before it starts going back.
        let on_probation = rolling["at_ms"].as_i64().unwrap_or(i64::MAX) - verified;
        let limit = i64::try_from(commit_deadline.as_millis())? + 1000;
        assert!(
            on_probation <= limit,
            "{h} stayed on v2 in probation {on_probation} ms > {limit} ms: {doc:#}"
        );
        assert_eq!(f.served_version(h).as_deref(), Some("v1"), "{h}");
    }
    let halted = halted.unwrap_or_default();
    // Both ends notice the silent cut by keepalive (1 s + 2 s), not after
    // the 20 s of the defaults.
    for (h, t) in ["h3", "h4"].iter().zip(alone) {
        let t = t.unwrap_or_default();
        assert!(
            t <= Duration::from_secs(10),
            "{h} noticed the lost coordinator only {t:?} after the cut"
        );
    }
    // Within the keepalive (3 s), the reconnect grace (a third of the
    // 15 s healthy_deadline) and the time to halt.
    assert!(
        halted <= Duration::from_secs(15),
        "the coordinator took {halted:?} to give up on the cut-off batch"
    );
    let s = f.status(&id)?;
    assert_eq!(s["failures"], 2, "{s}");
    for h in ["h3", "h4"] {
        let p = f.host_progress(&id, h)?;
        assert_eq!(p["failure"], "unreachable", "{h}: {p}");
    }
    // The fleet rollback could not reach the first batch: owed, and said so.
    let s = f.status(&id)?;
    for h in ["h1", "h2"] {
        let p = f.host_progress(&id, h)?;
        assert_eq!(p["state"], "rollback_owed", "{h}: {p}");
    }
    assert!(
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("rollback still owed on h1,h2")),
        "{s}"
    );
    // Heal: the hosts come back; the coordinator rolls back the first batch
    // and records where the others are.
    f.heal(COORDINATOR)?;
    f.wait_connected(&f.hosts())?;
    for h in ["h3", "h4"] {
        let p = poll(&format!("{h} reconciled"), Duration::from_secs(20), || {
            let p = f.host_progress(&id, h).ok()?;
            p["reason"]
                .as_str()?
                .contains("returned on v1")
                .then_some(p)
        })?;
        assert!(
            p["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("rolled_back"),
            "the reconciliation of {h} does not quote its rollback: {p}"
        );
    }
    for h in ["h1", "h2"] {
        poll(
            &format!("{h}'s owed rollback done"),
            Duration::from_secs(40),
            || {
                let p = f.host_progress(&id, h).ok()?;
                (p["state"] == "rolled_back").then_some(())
            },
        )
        .with_context(|| {
            format!(
                "{:?}\n{}",
                f.host_progress(&id, h).ok(),
                f.logs(COORDINATOR)
            )
        })?;
    }
    let events = f.events_contiguous(&id)?;
    for h in ["h3", "h4"] {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "reconciled" && e["host"] == h),
            "no reconciliation of {h}: {events:?}"
        );
    }
    for h in ["h1", "h2"] {
        for kind in ["rollback_owed", "rolled_back"] {
            assert_eq!(
                events
                    .iter()
                    .filter(|e| e["kind"] == kind && e["host"] == h)
                    .count(),
                1,
                "{h}: one {kind}: {events:?}"
            );
        }
    }
    assert!(
        events.iter().any(|e| e["kind"] == "rollback_complete"),
        "{events:?}"
    );
    let s = f.status(&id)?;
    assert_eq!(s["state"], "rolled_back", "{s}");
    assert_eq!(s["failures"], 2, "{s}");
    assert!(
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("fleet rollback complete")),
        "{s}"
    );
    for h in ["h1", "h2"] {
        wait_idle_on(&f, h, "v1", Duration::from_secs(30))?;
    }
    f.wait_serving(
        &f.hosts().iter().map(String::as_str).collect::<Vec<_>>(),
        "v1",
    )?;
    let hist = f.check_histories("web", &[&v1, &id])?;
    for (h, doc) in &hist {
        assert_eq!(activations(doc, &id), 1, "{h}: {doc:#}");
    }
    eprintln!(
        "coordinator partition: agents disconnected {alone:?}, hosts back on v1 {back:?} after \
         the cut, rollout rolled back {halted:?} after it; total {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// Scenario 5: h1 is frozen (`docker pause`) while it verifies v2. The
/// coordinator's keepalive drops it as unreachable within `healthy_deadline`,
/// the rollout goes on to h2 and h3 within its failure budget while h1 is
/// still frozen, and when h1 thaws it reports where it really is: the
/// coordinator records it and h1 ends on v1, having activated v2 once.
#[test]
fn frozen_agent_mid_activation_times_out_within_healthy_deadline_and_is_reconciled() -> Result<()> {
    let t0 = Instant::now();
    let Some(f) = DockerFleet::start(FleetOptions::new(3))? else {
        return Ok(());
    };
    let v1 = deploy_v1(&f)?;
    let healthy_deadline = Duration::from_secs(10);
    // Keepalive (not the Activate's own timeout, healthy_deadline +
    // min_healthy_time + slack) is what drops a frozen host in time.
    let keepalive = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT;
    ensure!(
        keepalive * 2 < healthy_deadline,
        "keepalive {keepalive:?} too long for this test"
    );
    let spec = f.write_spec(
        "v2",
        &[],
        0,
        &[
            ("batch_size", "1"),
            ("max_failures", "1"),
            ("min_healthy_time", "\"3s\""),
            ("healthy_deadline", "\"10s\""),
            ("commit_deadline", "\"1m\""),
        ],
    )?;
    let id = f.deploy(&spec)?;
    poll("h1 verifying v2", Duration::from_secs(30), || {
        phase_of(&f, "h1")
            .is_some_and(|(p, c)| p == "verifying" && c == "v2")
            .then_some(())
    })?;
    f.pause("h1")?;
    let frozen = Instant::now();
    let p = poll("h1 failed as unreachable", healthy_deadline, || {
        let p = f.host_progress(&id, "h1").ok()?;
        (p["failure"] == "unreachable").then_some(p)
    })
    .with_context(|| format!("{:?}", f.host_progress(&id, "h1").ok()))?;
    let detected = frozen.elapsed();
    assert!(
        detected <= healthy_deadline,
        "h1 dropped {detected:?} after it froze: {p}"
    );
    // The rollout goes on without h1, within its budget, while h1 is frozen.
    let s = f.wait_state(&id, "succeeded", Duration::from_secs(60))?;
    assert_eq!(s["failures"], 1, "{s}");
    f.wait_serving(&["h2", "h3"], "v2")?;
    assert!(!f.connected("h1"), "h1 is frozen but listed as connected");
    let finished = frozen.elapsed();
    // Thaw: h1 finishes or abandons its activation, reconnects, reports; the
    // coordinator records where it is (and rolls it back if it came back in
    // probation on v2: the rollout counted it as failed).
    f.unpause("h1")?;
    let thawed = Instant::now();
    wait_idle_on(&f, "h1", "v1", Duration::from_secs(40))?;
    let p = poll("h1 reconciled", Duration::from_secs(20), || {
        let p = f.host_progress(&id, "h1").ok()?;
        p["reason"].as_str()?.contains("returned on").then_some(p)
    })?;
    let events = f.events_contiguous(&id)?;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "reconciled" && e["host"] == "h1"),
        "{events:?}"
    );
    let s = f.status(&id)?;
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(s["failures"], 1, "{s}");
    assert_eq!(f.served_version("h1").as_deref(), Some("v1"));
    let hist = f.check_histories("web", &[&v1, &id])?;
    for (h, doc) in &hist {
        assert_eq!(
            activations(doc, &id),
            1,
            "{h} (no double activation): {doc:#}"
        );
    }
    eprintln!(
        "frozen agent (keepalive {keepalive:?}): dropped {detected:?} after the freeze, rollout finished {finished:?} \
         after it, h1 reconciled {:?} after the thaw ({}); total {:?}",
        thawed.elapsed(),
        p["reason"],
        t0.elapsed()
    );
    Ok(())
}

/// Scenario 7: while v2 rolls out over ten hosts, random hosts are cut off
/// and reconnected again and again (a bounded, seeded schedule; set
/// `ROLLOUT_FLAP_SEED` to replay one). The rollout converges in one attempt:
/// it succeeds with no host failed, every host serves v2, and each host's own
/// history shows exactly one activation by it.
#[test]
fn flapping_network_during_a_ten_host_rollout_converges_without_duplicate_activations() -> Result<()>
{
    const FLAPS: usize = 12;
    let t0 = Instant::now();
    let Some(f) = DockerFleet::start(FleetOptions::new(10))? else {
        return Ok(());
    };
    let hosts = f.hosts();
    let v1 = deploy_v1(&f)?;
    let seed: u64 = std::env::var("ROLLOUT_FLAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(rollout_tests::flap::DEFAULT_SEED);
    eprintln!("flap seed {seed} (ROLLOUT_FLAP_SEED={seed} replays it)");
    let spec = f.write_spec(
        "v2",
        &[],
        0,
        &[
            ("batch_size", "1"),
            ("max_unavailable", "2"),
            ("max_failures", "\"50%\""),
            ("min_healthy_time", "\"2s\""),
            ("healthy_deadline", "\"10s\""),
            ("commit_deadline", "\"10s\""),
            // A rollout stuck behind a host that never returns fails, not hangs.
            ("progress_deadline", "\"3m\""),
        ],
    )?;
    let done = AtomicBool::new(false);
    let (first, flapped) = std::thread::scope(|sc| -> Result<(String, Vec<String>)> {
        let flapper = sc.spawn(|| -> Result<Vec<String>> {
            let mut rng = rollout_tests::flap::Rng::new(seed);
            let mut log = Vec::new();
            for _ in 0..FLAPS {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let h = &hosts[usize::try_from(rng.below(hosts.len() as u64))?];
                // Down long enough, at times, for the keepalive to drop the
                // session (interval + timeout), at times not.
                let down = Duration::from_millis(300 + rng.below(3700));
                let up = Duration::from_millis(100 + rng.below(400));
                f.partition(h)?;
                // The fault schedule itself: timed waits between flaps.
                std::thread::sleep(down);
                f.heal(h)?;
                log.push(format!("{h} down {down:?}"));
                std::thread::sleep(up);
            }
            Ok(log)
        });
        let started = Instant::now();
        let res = f.deploy_wait(&spec);
        done.store(true, Ordering::SeqCst);
        eprintln!("first attempt took {:?}", started.elapsed());
        let flapped = flapper
            .join()
            .map_err(|_| anyhow::anyhow!("the flapper panicked"))??;
        let (ok, out, err) = res?;
        ensure!(
            ok,
            "v2 deploy failed under flapping ({flapped:?}):\n{out}\n{err}\n{}",
            f.logs(COORDINATOR)
        );
        Ok((
            out.lines().next().unwrap_or_default().trim().to_string(),
            flapped,
        ))
    })?;
    eprintln!("flaps: {flapped:?}");
    // Ten batches of a host each last well over four flaps.
    ensure!(
        flapped.len() >= 4,
        "only {} flaps happened during the rollout: {flapped:?}",
        flapped.len()
    );
    let s = f.status(&first)?;
    assert_eq!(s["state"], "succeeded", "{s}");
    // Nothing lost to the flaps: a Stage or Commit cut is sent again when
    // the host is back, a host offline when its batch comes is waited for,
    // one cut mid-activation is judged from its report when it reconnects.
    assert_eq!(s["failures"], 0, "{s}\n{}", f.logs(COORDINATOR));
    f.wait_connected(&hosts)?;
    let all: Vec<&str> = hosts.iter().map(String::as_str).collect();
    f.wait_serving(&all, "v2")?;
    let hist = f.check_histories("web", &[&v1, &first])?;
    for (h, doc) in &hist {
        assert_eq!(activations(doc, &first), 1, "{h}: {doc:#}");
    }
    eprintln!(
        "flapping: {} flaps, every host on v2 after one attempt; total {:?}",
        flapped.len(),
        t0.elapsed()
    );
    Ok(())
}
