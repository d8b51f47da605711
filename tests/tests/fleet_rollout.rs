//! Rolling deploys across a local fleet: a real coordinator process, five or
//! more real agents on loopback, each running the real sample service, driven
//! by the real `rollout` CLI.

use std::collections::BTreeMap;

use anyhow::{Result, ensure};
use rollout_tests::cluster::Cluster;
use rollout_tests::eventually;

fn env_for(hosts: &[usize], key: &str, value: &str) -> impl Fn(usize) -> Vec<(String, String)> {
    let hosts = hosts.to_vec();
    let (key, value) = (key.to_string(), value.to_string());
    move |i| {
        let v = if hosts.contains(&(i + 1)) {
            value.clone()
        } else {
            "true".to_string()
        };
        vec![(key.clone(), v)]
    }
}

/// Per host: (release, event, cause, at_ms) from the agent's own history.
async fn histories(c: &Cluster) -> Result<BTreeMap<String, Vec<(String, String, String, i64)>>> {
    let mut out = BTreeMap::new();
    for a in &c.agents {
        let h = a.history("web").await?;
        out.insert(
            a.opts.host.clone(),
            h.into_iter()
                .map(|e| (e.release, e.event, e.cause, e.at_ms))
                .collect(),
        );
    }
    Ok(out)
}

/// The coordinator's log lines of rollout `id`'s batch events, in order:
/// (kind, host; `-` for the rollout's own).
fn logged_batch_events(log: &str, id: &str) -> Vec<(String, String)> {
    let field = |line: &str, key: &str| {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(|v| v.trim_matches('"').to_string())
    };
    log.lines()
        .filter(|l| field(l, "rollout=").as_deref() == Some(id))
        .filter_map(|l| Some((field(l, "kind=")?, field(l, "host=")?)))
        .filter(|(k, _)| BATCH_EVENTS.contains(&k.as_str()))
        .collect()
}

/// Events of a healthy batch, and the rollout's end.
const BATCH_EVENTS: [&str; 6] = [
    "batch_started",
    "activating",
    "probation",
    "committed",
    "batch_done",
    "succeeded",
];

fn activations(h: &[(String, String, String, i64)], rollout: &str) -> usize {
    h.iter()
        .filter(|e| e.1 == "activating" && e.2 == rollout)
        .count()
}

async fn deploy_v1(c: &Cluster) -> Result<()> {
    let spec = c.spec(
        "v1",
        &[],
        &[],
        "batch_percent = 100\nmax_unavailable = \"100%\"",
    )?;
    let (ok, out, err) = c.deploy_wait(&spec);
    ensure!(ok, "v1 deploy failed:\n{out}\n{err}\n{}", c.coord.log());
    c.all_serving("v1").await
}

#[tokio::test]
async fn five_hosts_batch_two_complete_in_order_within_max_unavailable() -> Result<()> {
    let c = Cluster::start(5, |_| vec![]).await?;
    deploy_v1(&c).await?;
    // Dry run first: the plan is the batches, in host order.
    let plan_spec = c.spec("v2", &[], &[], "batch_size = 2\nmax_unavailable = 2")?;
    let plan = c.coord.json(&["plan", &plan_spec.display().to_string()])?;
    assert_eq!(
        plan["batches"],
        serde_json::json!([["h1", "h2"], ["h3", "h4"], ["h5"]])
    );
    let (ok, out, err) = c.deploy_wait(&plan_spec);
    assert!(ok, "v2 deploy failed:\n{out}\n{err}");
    let id = out.lines().next().unwrap_or_default().trim().to_string();
    assert!(out.contains("succeeded"), "{out}");
    c.all_serving("v2").await?;
    let status = c.coord.json(&["status", &id])?;
    assert_eq!(status[0]["state"], "succeeded");
    // Batch order and max_unavailable, from the agents' own clocks: no host of
    // batch k+1 started before every host of batch k had committed.
    let hist = histories(&c).await?;
    let at = |host: &str, event: &str| -> i64 {
        hist[host]
            .iter()
            .find(|e| e.0 == "v2" && e.1 == event && (event != "activating" || e.2 == id))
            .map(|e| e.3)
            .unwrap_or_else(|| panic!("{host} has no v2 {event}: {:?}", hist[host]))
    };
    let batches = [vec!["h1", "h2"], vec!["h3", "h4"], vec!["h5"]];
    for w in batches.windows(2) {
        let done = w[0].iter().map(|h| at(h, "committed")).max().unwrap_or(0);
        let start = w[1].iter().map(|h| at(h, "activating")).min().unwrap_or(0);
        assert!(
            start >= done,
            "batch {:?} started at {start} before {:?} committed at {done}",
            w[1],
            w[0]
        );
    }
    for (host, h) in &hist {
        assert_eq!(
            activations(h, &id),
            1,
            "{host} activated {} times",
            activations(h, &id)
        );
    }
    // Listings work and say what runs where.
    let hosts = c.coord.json(&["hosts"])?;
    assert_eq!(hosts.as_array().map(Vec::len), Some(5));
    assert!(
        hosts
            .as_array()
            .into_iter()
            .flatten()
            .all(|h| h["services"][0]["release"] == "v2")
    );
    let events = c.coord.json(&["events", &id])?;
    let kinds: Vec<&str> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["kind"].as_str())
        .collect();
    assert_eq!(
        kinds.iter().filter(|k| **k == "batch_started").count(),
        3,
        "{kinds:?}"
    );
    // Every batch event is logged once, in the journal's order (the log of a
    // batch's start and of the writes it made durable waits for its
    // Activates to be sent; the rollout may be seen succeeded before its
    // last write is logged).
    let journal: Vec<(String, String)> = events
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let kind = e["kind"].as_str()?;
            let host = e["host"].as_str().filter(|h| !h.is_empty()).unwrap_or("-");
            BATCH_EVENTS
                .contains(&kind)
                .then(|| (kind.to_string(), host.to_string()))
        })
        .collect();
    assert_eq!(journal.len(), 3 + 5 * 3 + 3 + 1, "{journal:?}");
    let logged = eventually(
        "the rollout's end logged",
        rollout_tests::DEADLINE,
        async || {
            let logged = logged_batch_events(&c.coord.log(), &id);
            logged
                .iter()
                .any(|(k, _)| k == "succeeded")
                .then_some(logged)
        },
    )
    .await?;
    assert_eq!(logged, journal, "log:\n{}", c.coord.log());
    let history = c.coord.json(&["history", "web"])?;
    assert_eq!(history["rollouts"].as_array().map(Vec::len), Some(2));
    Ok(())
}

#[tokio::test]
async fn one_unhealthy_host_within_budget_is_rolled_back_and_the_rollout_continues() -> Result<()> {
    let c = Cluster::start(5, env_for(&[3], "V2_HEALTHY", "false")).await?;
    deploy_v1(&c).await?;
    let spec = c.spec(
        "v2",
        &[],
        &["--healthy", "${V2_HEALTHY}"],
        "batch_size = 2\nmax_unavailable = 2\nmax_failures = 1",
    )?;
    let (ok, out, err) = c.deploy_wait(&spec);
    assert!(ok, "rollout should succeed within budget:\n{out}\n{err}");
    let id = out.lines().next().unwrap_or_default().trim().to_string();
    let s = c.coord.json(&["status", &id])?;
    assert_eq!(s[0]["failures"], 1);
    let h3 = s[0]["batches"][1]["hosts"][0].clone();
    assert_eq!(h3["host"], "h3");
    assert_eq!(h3["failure"], "unhealthy", "{h3}");
    for (i, port) in c.ports.iter().enumerate() {
        let want = if i == 2 { "v1" } else { "v2" };
        eventually(
            &format!("h{} on {want}", i + 1),
            rollout_tests::DEADLINE,
            async || (rollout_tests::served_version(*port).as_deref() == Some(want)).then_some(()),
        )
        .await?;
    }
    Ok(())
}

#[tokio::test]
async fn budget_exceeded_halts_and_rolls_back_the_whole_fleet() -> Result<()> {
    let c = Cluster::start(5, env_for(&[3, 4], "V2_HEALTHY", "false")).await?;
    deploy_v1(&c).await?;
    let spec = c.spec(
        "v2",
        &[],
        &["--healthy", "${V2_HEALTHY}"],
        "batch_size = 2\nmax_unavailable = 2\nmax_failures = 1",
    )?;
    let (ok, out, _) = c.deploy_wait(&spec);
    assert!(!ok, "a rollout past its budget must not exit 0:\n{out}");
    let id = out.lines().next().unwrap_or_default().trim().to_string();
    let s = c.wait_state(&id, "rolled_back").await?;
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("failure budget exceeded"),
        "{s}"
    );
    // Every host back on v1 and serving; h5 never touched.
    c.all_serving("v1").await?;
    let hist = histories(&c).await?;
    assert_eq!(
        activations(&hist["h5"], &id),
        0,
        "h5 was activated after the halt"
    );
    for h in ["h1", "h2"] {
        let last = hist[h].last().expect("history");
        assert_eq!(
            (last.0.as_str(), last.1.as_str()),
            ("v1", "rolled_back"),
            "{h}: {:?}",
            hist[h]
        );
    }
    Ok(())
}

#[tokio::test]
async fn coordinator_kill9_mid_rollout_resumes_and_updates_each_host_once() -> Result<()> {
    let mut c = Cluster::start(5, |_| vec![]).await?;
    deploy_v1(&c).await?;
    let spec = c.spec("v2", &[], &[], "batch_size = 1\nmax_unavailable = 1")?;
    let id = c.deploy(&spec)?;
    // Let it get going, then kill the coordinator mid-rollout.
    eventually("two hosts committed", rollout_tests::DEADLINE, async || {
        let s = c.coord.json(&["status", &id]).ok()?;
        let committed = s[0]["batches"]
            .as_array()?
            .iter()
            .flat_map(|b| b["hosts"].as_array().cloned().unwrap_or_default())
            .filter(|h| h["state"] == "committed")
            .count();
        (committed >= 2).then_some(())
    })
    .await?;
    c.coord.kill9();
    c.coord.restart().await?;
    c.wait_hosts_connected().await?;
    c.wait_state(&id, "succeeded").await?;
    c.all_serving("v2").await?;
    let hist = histories(&c).await?;
    for (host, h) in &hist {
        assert_eq!(
            activations(h, &id),
            1,
            "{host} activated {} times: {h:?}",
            activations(h, &id)
        );
    }
    Ok(())
}

#[tokio::test]
async fn pause_resume_promote_and_abort() -> Result<()> {
    let c = Cluster::start(5, |_| vec![]).await?;
    deploy_v1(&c).await?;
    // Canary with a pause: one host, then wait for promote.
    let spec = c.spec(
        "v2",
        &[],
        &[],
        "canary = [1, \"100%\"]\npause_after_canary = true\nmax_unavailable = \"100%\"",
    )?;
    let id = c.deploy(&spec)?;
    c.wait_state(&id, "waiting_promote").await?;
    assert_eq!(
        rollout_tests::served_version(c.ports[0]).as_deref(),
        Some("v2")
    );
    assert_eq!(
        rollout_tests::served_version(c.ports[1]).as_deref(),
        Some("v1")
    );
    // Pause while waiting, resume back to waiting, then promote.
    c.coord.json(&["pause", &id])?;
    c.wait_state(&id, "paused").await?;
    c.coord.json(&["resume", &id])?;
    c.wait_state(&id, "waiting_promote").await?;
    c.coord.json(&["promote", &id])?;
    c.wait_state(&id, "succeeded").await?;
    c.all_serving("v2").await?;
    // Abort a canary waiting for promotion: the canary host returns to v2's predecessor.
    let spec3 = c.spec(
        "v3",
        &[],
        &[],
        "canary = [1, \"100%\"]\npause_after_canary = true\nmax_unavailable = \"100%\"",
    )?;
    let id3 = c.deploy(&spec3)?;
    c.wait_state(&id3, "waiting_promote").await?;
    assert_eq!(
        rollout_tests::served_version(c.ports[0]).as_deref(),
        Some("v3")
    );
    c.coord.json(&["abort", &id3])?;
    c.wait_state(&id3, "aborted").await?;
    c.all_serving("v2").await?;
    // Operations on a finished rollout are refused with a clear error.
    let out = c.coord.cli(&["promote", &id3]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("aborted"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

#[tokio::test]
async fn agent_killed_mid_batch_counts_as_unreachable_and_is_reconciled_on_return() -> Result<()> {
    let mut c = Cluster::start(5, |_| vec![]).await?;
    deploy_v1(&c).await?;
    // A long bake so the kill lands while h2 verifies.
    let spec = c.spec(
        "v2",
        &[],
        &[],
        "batch_size = 1\nmax_unavailable = 1\nmax_failures = 1\nmin_healthy_time = \"2s\"",
    )?;
    let spec_text = std::fs::read_to_string(&spec)?.replace("min_healthy_time = \"300ms\"\n", "");
    std::fs::write(&spec, spec_text)?;
    let id = c.deploy(&spec)?;
    eventually("h2 activating", rollout_tests::DEADLINE, async || {
        let s = c.coord.json(&["status", &id]).ok()?;
        (s[0]["batches"][1]["hosts"][0]["state"] == "activating").then_some(())
    })
    .await?;
    c.agents[1].kill9();
    let s = c.wait_state(&id, "succeeded").await?;
    let h2 = s["batches"][1]["hosts"][0].clone();
    assert_eq!(h2["failure"], "unreachable", "{h2}");
    assert_eq!(s["failures"], 1);
    // h2 returns: it finishes its own rollback (journal) and the coordinator records it.
    c.agents[1].restart(None).await?;
    let s = eventually("h2 reconciled", rollout_tests::DEADLINE, async || {
        let s = c.coord.json(&["status", &id]).ok()?;
        let h2 = s[0]["batches"][1]["hosts"][0].clone();
        h2["reason"].as_str()?.contains("returned on").then_some(h2)
    })
    .await?;
    assert!(
        s["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("returned on v1"),
        "{s}"
    );
    assert_eq!(
        rollout_tests::served_version(c.ports[1]).as_deref(),
        Some("v1")
    );
    for i in [0, 2, 3, 4] {
        assert_eq!(
            rollout_tests::served_version(c.ports[i]).as_deref(),
            Some("v2"),
            "h{}",
            i + 1
        );
    }
    let events = c.coord.json(&["events", &id])?;
    assert!(
        events
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["kind"] == "reconciled" && e["host"] == "h2"),
        "{events}"
    );
    Ok(())
}

#[tokio::test]
async fn host_rollbacks_past_max_host_rollbacks_halt_the_fleet_rollout() -> Result<()> {
    let c = Cluster::start(5, env_for(&[1, 2], "V2_HEALTHY", "false")).await?;
    deploy_v1(&c).await?;
    // The failure budget alone would let 4 failures through; the host-rollback
    // limit of 1 halts at the second host that rolls itself back.
    let spec = c.spec(
        "v2",
        &[],
        &["--healthy", "${V2_HEALTHY}"],
        "batch_size = 5\nmax_unavailable = \"100%\"\nmax_failures = 4\nmax_host_rollbacks = 1",
    )?;
    let (ok, out, _) = c.deploy_wait(&spec);
    assert!(!ok, "{out}");
    let id = out.lines().next().unwrap_or_default().trim().to_string();
    let s = c.wait_state(&id, "rolled_back").await?;
    assert!(
        s["message"]
            .as_str()
            .unwrap_or_default()
            .contains("host rollbacks exceeded"),
        "{s}"
    );
    c.all_serving("v1").await?;
    Ok(())
}

#[tokio::test]
async fn rollout_top_refreshes_the_live_hosts_table() -> Result<()> {
    let c = Cluster::start(5, |_| vec![]).await?;
    deploy_v1(&c).await?;
    let out = c
        .coord
        .cli(&["top", "--interval", "100ms", "--iterations", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(text.matches("\x1b[H\x1b[2J").count(), 3, "{text}");
    for h in ["h1", "h2", "h3", "h4", "h5"] {
        assert_eq!(text.matches(&format!("\n{h} ")).count(), 3, "{h}: {text}");
    }
    assert!(text.contains("web=v1"), "{text}");
    // JSON: one document per refresh, each listing every host with its service.
    let out = c.coord.cli(&[
        "--output",
        "json",
        "top",
        "--interval",
        "100ms",
        "--iterations",
        "2",
    ]);
    assert!(out.status.success());
    let docs: Vec<serde_json::Value> = serde_json::Deserializer::from_slice(&out.stdout)
        .into_iter::<serde_json::Value>()
        .collect::<Result<_, _>>()?;
    assert_eq!(docs.len(), 2);
    for d in &docs {
        let hosts = d.as_array().expect("array");
        assert_eq!(hosts.len(), 5);
        assert!(hosts.iter().all(|h| h["connected"] == true
            && h["services"][0]["release"] == "v1"
            && h["mem_total_bytes"].as_u64() > Some(0)));
    }
    Ok(())
}
