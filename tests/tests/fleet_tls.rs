//! Mutual TLS end to end with the real binaries on loopback: a PKI from
//! `rollout certs init`, a coordinator serving only mutual TLS, agents with
//! their own certificates, and the CLI with the operator certificate. Then
//! the wrong certificates, each refused with a clear error while nothing in
//! the fleet changes.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Output;

use anyhow::{Result, ensure};
use rollout_tests::tls_cluster::{Pki, TlsAgent, TlsAgentConfig, TlsCluster, cli_raw};
use rollout_tests::{DEADLINE, eventually, served_version};

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts the command failed and its stderr contains every needle
/// (case-insensitively).
fn assert_refused(what: &str, o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(
        !o.status.success(),
        "{what}: must fail, but exited 0\nstdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    for n in needles {
        assert!(
            err.to_lowercase().contains(&n.to_lowercase()),
            "{what}: stderr must mention {n:?}:\n{err}"
        );
    }
    assert!(
        !err.contains("panicked"),
        "{what}: the CLI panicked:\n{err}"
    );
}

async fn deploy_v1(c: &TlsCluster) -> Result<String> {
    let spec = c.spec("v1", "batch_percent = 100\nmax_unavailable = \"100%\"")?;
    let out = c.operator(&["deploy", "--wait", &spec.display().to_string()]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "v1 deploy over mTLS failed:\n{stdout}\n{}\n--- coordinator ---\n{}",
        stderr(&out),
        c.coord.log()
    );
    ensure!(stdout.contains("succeeded"), "{stdout}");
    c.all_serving("v1").await?;
    Ok(stdout.lines().next().unwrap_or_default().trim().to_string())
}

/// What must not change when a request is refused: the rollouts, what each
/// host runs, the coordinator's artifact store, each agent's history and what
/// each sample service serves.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rollouts: Vec<(String, String)>,
    hosts: Vec<(String, bool, String, String)>,
    artifacts: Vec<String>,
    histories: Vec<usize>,
    serving: Vec<Option<String>>,
}

async fn snapshot(c: &TlsCluster) -> Result<Snapshot> {
    let rollouts = c
        .json(&["status"])?
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| (r["id"].to_string(), r["state"].to_string()))
        .collect();
    let hosts = c
        .json(&["hosts"])?
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            (
                h["host"].to_string(),
                h["connected"] == true,
                h["services"][0]["release"].to_string(),
                h["services"][0]["phase"].to_string(),
            )
        })
        .collect();
    let mut histories = Vec::new();
    for a in &c.agents {
        histories.push(a.history("web").await?.len());
    }
    Ok(Snapshot {
        rollouts,
        hosts,
        artifacts: c.coord.artifact_files(),
        histories,
        serving: c.ports.iter().map(|p| served_version(*p)).collect(),
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn mutual_tls_fleet_deploys_to_every_host() -> Result<()> {
    let c = TlsCluster::start(3).await?;
    // `certs init` never leaves a private key readable by others.
    let d = c.pki.dir();
    for k in ["ca.key", "coordinator.key", "operator.key"] {
        assert_eq!(mode(&d.join(k)), 0o600, "{k}");
    }
    for h in ["h1", "h2", "h3"] {
        assert_eq!(mode(&c.pki.agent(h).1), 0o600, "agents/{h}.key");
    }
    assert_eq!(mode(&d), 0o700, "the certs directory");

    let id = deploy_v1(&c).await?;
    let status = c.json(&["status", &id])?;
    assert_eq!(status[0]["state"], "succeeded", "{status}");
    let hosts = c.json(&["hosts"])?;
    let mut seen: Vec<(String, String)> = hosts
        .as_array()
        .into_iter()
        .flatten()
        .map(|h| {
            assert_eq!(h["connected"], true, "{h}");
            (
                h["host"].as_str().unwrap_or_default().to_string(),
                h["services"][0]["release"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [("h1", "v1"), ("h2", "v1"), ("h3", "v1")]
            .map(|(h, r)| (h.to_string(), r.to_string()))
            .to_vec()
    );
    // Each agent knows it is connected, and committed v1 for this rollout.
    for a in &c.agents {
        let st = a.status().await?;
        assert!(st.coordinator_connected, "{} not connected", a.cfg.host);
        let h = a.history("web").await?;
        assert!(
            h.iter()
                .any(|e| e.release == "v1" && e.event == "committed"),
            "{}: {h:?}",
            a.cfg.host
        );
    }
    Ok(())
}

#[tokio::test]
async fn wrong_cli_certificates_are_refused_and_change_nothing() -> Result<()> {
    let c = TlsCluster::start(3).await?;
    deploy_v1(&c).await?;
    let before = snapshot(&c).await?;
    let v2 = c.spec("v2", "batch_percent = 100\nmax_unavailable = \"100%\"")?;
    let v2 = v2.display().to_string();

    // (a) An agent's certificate presented by the CLI.
    let (h1_cert, h1_key) = c.pki.agent("h1");
    let as_agent = c
        .pki
        .client_dir("as-agent", &c.pki.ca(), &h1_cert, &h1_key)?;
    for args in [
        vec!["deploy", "--wait", v2.as_str()],
        vec!["status"],
        vec!["hosts"],
    ] {
        let o = c.coord.cli(&as_agent, &args);
        assert_refused(
            &format!("agent certificate: rollout {args:?}"),
            &o,
            &[
                "an agent certificate (\"h1\") cannot call the control API",
                "operator certificate",
            ],
        );
    }
    assert_eq!(snapshot(&c).await?, before, "after the agent certificate");

    // (c) Certificates from another `certs init`: the CLI does not trust the
    // coordinator's certificate.
    let other = Pki::init(&[])?;
    let o = c.coord.cli(&other.dir(), &["deploy", &v2]);
    assert_refused(
        "certificates of another PKI",
        &o,
        &["certificate", "UnknownIssuer", "certs init"],
    );
    assert!(
        !stderr(&o).contains("cannot reach"),
        "a certificate problem is not an unreachable coordinator: {}",
        stderr(&o)
    );
    // … and our CA but another PKI's operator certificate: the coordinator
    // refuses the client.
    let (op_cert, op_key) = other.operator();
    let foreign_op = c
        .pki
        .client_dir("foreign-operator", &c.pki.ca(), &op_cert, &op_key)?;
    for args in [vec!["deploy", v2.as_str()], vec!["status"]] {
        let o = c.coord.cli(&foreign_op, &args);
        assert_refused(
            &format!("foreign operator certificate: rollout {args:?}"),
            &o,
            &["certificate", "certs init"],
        );
    }
    assert_eq!(snapshot(&c).await?, before, "after foreign certificates");

    // (e) A plaintext client against the TLS coordinator.
    let plain = format!("http://127.0.0.1:{}", c.coord.port);
    for args in [vec!["deploy", v2.as_str()], vec!["status"]] {
        let mut all = vec!["--insecure-dev", "--coordinator", plain.as_str()];
        all.extend_from_slice(&args);
        let o = cli_raw(&all);
        assert_refused(
            &format!("plaintext client: rollout {args:?}"),
            &o,
            &["plaintext", "TLS", "https://"],
        );
    }
    // No certificates at all, without --insecure-dev: refused before dialing.
    let o = cli_raw(&["--coordinator", &c.coord.url(), "status"]);
    assert_refused("no --certs", &o, &["--certs"]);
    assert_eq!(snapshot(&c).await?, before, "after plaintext clients");
    Ok(())
}

#[tokio::test]
async fn agents_only_speak_for_their_own_host_with_an_agent_certificate() -> Result<()> {
    let c = TlsCluster::start(1).await?;
    let url = format!("https://127.0.0.1:{}", c.coord.port);
    let cfg = |host: &str, (cert, key): (std::path::PathBuf, std::path::PathBuf)| TlsAgentConfig {
        host: host.into(),
        url: url.clone(),
        ca: c.pki.ca(),
        cert,
        key,
        env: vec![],
        labels: vec![("role".into(), "web".into())],
    };
    // (b) host = "h2" with h1's certificate.
    let imposter = TlsAgent::start(cfg("h2", c.pki.agent("h1"))).await?;
    // (d) an agent presenting the operator certificate.
    let operator = TlsAgent::start(cfg("h3", c.pki.operator())).await?;

    let listed = || -> Result<Vec<(String, bool)>> {
        Ok(c.json(&["hosts"])?
            .as_array()
            .into_iter()
            .flatten()
            .map(|h| {
                (
                    h["host"].as_str().unwrap_or_default().to_string(),
                    h["connected"] == true,
                )
            })
            .collect())
    };
    // Until both agents have been refused at least twice (they retry), the
    // coordinator never lists h2 or h3, and h1 stays connected.
    let r = eventually("both impostors refused twice", DEADLINE, async || {
        let hosts = listed().expect("rollout hosts");
        assert_eq!(hosts, vec![("h1".to_string(), true)], "hosts listed");
        let b = imposter
            .log()
            .matches("an agent may only speak for its own host")
            .count();
        let d = operator
            .log()
            .matches("an operator certificate (\"operator\") cannot call the agent API")
            .count();
        (b >= 2 && d >= 2).then_some(())
    })
    .await;
    if let Err(e) = r {
        panic!(
            "{e}\n--- h2 with h1's certificate ---\n{}\n--- operator certificate ---\n{}",
            imposter.log(),
            operator.log()
        );
    }
    let log = imposter.log();
    assert!(
        log.contains("the certificate is for host \"h1\" but the hello speaks for \"h2\""),
        "{log}"
    );
    assert!(log.contains("set host = \"h1\""), "the fix is named: {log}");
    let log = operator.log();
    assert!(log.contains("requires an agent certificate"), "{log}");
    for a in [&imposter, &operator] {
        let st = a.status().await?;
        assert!(
            !st.coordinator_connected,
            "{} must not count as connected",
            a.cfg.host
        );
        assert!(
            !a.log().contains("connected to the coordinator"),
            "{}",
            a.log()
        );
    }
    // Nothing of theirs reached the fleet registry.
    assert_eq!(listed()?, vec![("h1".to_string(), true)]);
    Ok(())
}
