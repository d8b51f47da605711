//! `rollout ping`: the coordinator pings connected agents over their streams
//! (real coordinator process, real agents on loopback, real CLI) and reports
//! each round trip; hosts that are gone or unknown are reported, not hidden.

use anyhow::{Result, ensure};
use rollout_tests::DEADLINE;
use rollout_tests::cluster::Cluster;
use rollout_tests::eventually;

fn hosts_of(v: &serde_json::Value) -> Vec<(String, bool, u64, String)> {
    v["hosts"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|h| {
                    (
                        h["host"].as_str().unwrap_or_default().to_string(),
                        h["ok"].as_bool().unwrap_or(false),
                        h["rtt_us"].as_u64().unwrap_or(0),
                        h["error"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn ping_reaches_every_connected_agent_and_reports_the_missing() -> Result<()> {
    let mut c = Cluster::start(3, |_| vec![]).await?;

    // Every connected host answers, each with a measured round trip.
    let v = c.coord.json(&["ping"])?;
    let hosts = hosts_of(&v);
    let names: Vec<&str> = hosts.iter().map(|h| h.0.as_str()).collect();
    ensure!(names == ["h1", "h2", "h3"], "pinged {names:?}: {v}");
    for (h, ok, rtt, err) in &hosts {
        ensure!(*ok && err.is_empty(), "{h} did not answer: {err}");
        ensure!(*rtt > 0, "{h}: round trip not measured: {v}");
        ensure!(
            *rtt <= v["elapsed_us"].as_u64().unwrap_or(0),
            "{h}: round trip {rtt} us longer than the whole fan-out: {v}"
        );
    }
    ensure!(v["answered"] == 3 && v["pinged"] == 3, "{v}");
    ensure!(v["rtt_p99_us"].as_u64().unwrap_or(0) > 0, "{v}");

    // The table names each host and sums up.
    let out = c.coord.cli(&["ping"]);
    let table = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "rollout ping failed: {table}");
    ensure!(
        table.contains("3 of 3 hosts answered") && table.contains("h2"),
        "{table}"
    );

    // Only the hosts asked for.
    let v = c.coord.json(&["ping", "--hosts", "h2"])?;
    let names: Vec<String> = hosts_of(&v).into_iter().map(|h| h.0).collect();
    ensure!(names == ["h2"], "pinged {names:?}");

    // An unknown name is refused with the fix, and nothing is pinged.
    let out = c.coord.cli(&["ping", "--hosts", "h1,nosuch"]);
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "pinging an unknown host succeeded");
    ensure!(
        err.contains("\"nosuch\"") && err.contains("rollout hosts"),
        "{err}"
    );

    // A host that went away is reported as unreachable, and the exit code
    // says not every host answered; a ping of all hosts skips it.
    c.agents[2].kill9();
    eventually("h3 disconnected", DEADLINE, async || {
        let v = c.coord.json(&["hosts"]).ok()?;
        v.as_array()?
            .iter()
            .any(|h| h["host"] == "h3" && h["connected"] == false)
            .then_some(())
    })
    .await?;
    let out = c
        .coord
        .cli(&["--output", "json", "ping", "--hosts", "h1,h3"]);
    ensure!(!out.status.success(), "ping of a dead host exited 0");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let hosts = hosts_of(&v);
    ensure!(hosts.len() == 2, "{v}");
    ensure!(hosts[0].0 == "h1" && hosts[0].1, "{v}");
    ensure!(
        hosts[1].0 == "h3" && !hosts[1].1 && hosts[1].3.contains("unreachable"),
        "{v}"
    );
    let v = c.coord.json(&["ping"])?;
    let names: Vec<String> = hosts_of(&v).into_iter().map(|h| h.0).collect();
    ensure!(names == ["h1", "h2"], "pinged {names:?}");
    Ok(())
}
