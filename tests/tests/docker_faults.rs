//! Multi-host fault scenarios (issue 7): a coordinator and agents in their own
//! containers on a private Docker network, with real partitions and full
//! disks. The harness is `rollout_tests::docker`; without a Docker engine
//! these tests fail unless `ROLLOUT_SKIP_DOCKER=1`.
//!
//! Every scenario ends with the history checker: each agent's own history
//! shows at most one activation per rollout, and every host ends idle on a
//! release it committed or on its last known good one.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use rollout_tests::docker::{COORDINATOR, DockerFleet, FleetOptions, poll};

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

/// The coordinator's event log of `id` has no gap and no duplicate.
fn events_contiguous(f: &DockerFleet, id: &str) -> Result<Vec<serde_json::Value>> {
    let events = f.events(id)?;
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    ensure!(seqs.len() == events.len(), "events without seq: {events:?}");
    ensure!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "event log of {id} has gaps or duplicates: {seqs:?}"
    );
    Ok(events)
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
    events_contiguous(&f, &id)?;
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
    let events = events_contiguous(&f, &id)?;
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
    let events = events_contiguous(&f, &id)?;
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
