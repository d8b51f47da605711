//! Joining with single-use tokens and removing hosts, with the real binaries:
//! `rollout certs init` (no agent certificates), a coordinator with
//! `[tls] ca_key`, `rollout token create`, `rollout-agent join`, the agent run
//! from the config join wrote, and `rollout hosts remove`.

use std::os::unix::fs::PermissionsExt;
use std::process::Output;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, ensure};
use rollout_tests::join_harness::{JoiningCoordinator, JoiningHost};
use rollout_tests::tls_cluster::Pki;
use rollout_tests::{DEADLINE, eventually};

fn text(o: &Output) -> String {
    format!(
        "stdout:\n{}\nstderr:\n{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The command failed, without a panic, and stderr says every needle.
fn assert_refused(what: &str, o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "{what}: must fail\n{}", text(o));
    for n in needles {
        assert!(
            err.contains(n),
            "{what}: stderr must say {n:?}\n{}",
            text(o)
        );
    }
    assert!(!err.contains("panicked"), "{what}: panicked\n{err}");
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Waits until `rollout hosts` lists `host` connected.
async fn wait_connected(coord: &JoiningCoordinator, host: &JoiningHost) -> Result<()> {
    eventually(
        &format!("{} connected in `rollout hosts`", host.name),
        DEADLINE,
        async || {
            let h = coord.host(&host.name).ok()??;
            (h["connected"] == true).then_some(())
        },
    )
    .await
    .with_context(|| {
        format!(
            "--- agent ---\n{}\n--- coordinator ---\n{}",
            host.log(),
            coord.log()
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_join_then_remove_then_rejoin() -> Result<()> {
    let pki = Pki::init(&[])?;
    ensure!(
        !pki.dir().join("agents").exists(),
        "no agent certificates up front"
    );
    let coord = JoiningCoordinator::start(&pki).await?;
    let url = coord.url();

    // Join with a fresh token; the host generates its key and gets its labels.
    let token = coord.token(&["--ttl", "10m", "--label", "role=web", "--label", "zone=a"])?;
    ensure!(token.len() >= 43, "a token carries >= 128 bits: {token:?}");
    let mut web1 = JoiningHost::new("web-1")?;
    let out = web1.join(&url, &token, &coord.ca);
    ensure!(out.status.success(), "join failed\n{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("joined the fleet as web-1"),
        "{}",
        text(&out)
    );
    for f in ["agent.pem", "agent.key", "ca.pem", "agent.toml"] {
        ensure!(web1.etc().join(f).is_file(), "{f} missing");
    }
    let mode = std::fs::metadata(web1.etc().join("agent.key"))?
        .permissions()
        .mode();
    ensure!(mode & 0o777 == 0o600, "agent.key mode {mode:o}");
    let config = std::fs::read_to_string(web1.config())?;
    ensure!(config.contains("\"role\" = \"web\""), "{config}");

    web1.run().await?;
    wait_connected(&coord, &web1).await?;
    let listed = coord.host("web-1")?.context("web-1 listed")?;
    ensure!(listed["labels"]["role"] == "web", "{listed}");

    // The same token again: refused, nothing written.
    let other = JoiningHost::new("web-2")?;
    let out = other.join(&url, &token, &coord.ca);
    assert_refused(
        "reused token",
        &out,
        &["token already used", "rollout token create"],
    );
    ensure!(
        !other.etc().join("agent.key").exists(),
        "a refused join writes nothing"
    );

    // An unknown token (starting with '-': still taken as the token).
    let out = other.join(
        &url,
        "-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        &coord.ca,
    );
    assert_refused("unknown token", &out, &["unknown token"]);

    // An expired token: created with a 1s lifetime, used once the clock has
    // passed its expiry (polled, never used before).
    let v = coord.json(&["token", "create", "--ttl", "1s"])?;
    let expired = v["token"].as_str().context("token")?.to_string();
    let expires_at = v["expires_at_ms"].as_i64().context("expires_at_ms")?;
    eventually("the token's expiry to pass", DEADLINE, async || {
        (now_ms() > expires_at).then_some(())
    })
    .await?;
    let out = other.join(&url, &expired, &coord.ca);
    assert_refused(
        "expired token",
        &out,
        &[
            "token expired at",
            "create a new one with `rollout token create`",
        ],
    );

    // Remove web-1: its stream is closed, reconnects are refused, it leaves
    // the hosts list.
    let out = coord.cli(&["hosts", "remove", "web-1"]);
    ensure!(out.status.success(), "hosts remove failed\n{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("its connection was closed"),
        "{}",
        text(&out)
    );
    eventually("web-1's reconnect to be refused", DEADLINE, async || {
        web1.log()
            .contains("connect: host web-1 was removed")
            .then_some(())
    })
    .await
    .with_context(|| web1.log())?;
    let log = web1.log();
    ensure!(log.contains("join it again with a new token"), "{log}");
    ensure!(
        coord.host("web-1")?.is_none(),
        "web-1 must not be listed after removal: {:?}",
        coord.host("web-1")?
    );
    let status = web1.status().await?;
    ensure!(!status.coordinator_connected, "{status:?}");

    // Rejoin with a new token (into the same directory; the config exists,
    // so join prints the lines instead of rewriting it), restart: admitted.
    let token = coord.token(&["--ttl", "10m", "--label", "role=web"])?;
    let out = web1.join(&url, &token, &coord.ca);
    ensure!(out.status.success(), "rejoin failed\n{}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("exists and was left as is"),
        "{}",
        text(&out)
    );
    web1.run().await?;
    wait_connected(&coord, &web1).await?;
    Ok(())
}
