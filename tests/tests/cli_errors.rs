//! The `rollout` CLI's errors name the cause and the fix, against a real
//! coordinator with two real agents serving v1, and a refused command changes
//! nothing: no rollout is created and every host keeps serving v1.

use std::process::Output;

use anyhow::{Result, ensure};
use rollout_tests::cluster::Cluster;
use rollout_tests::{free_port, served_version};

/// What a refused command must leave as it was.
#[derive(Debug, PartialEq)]
struct Snapshot {
    rollouts: serde_json::Value,
    serving: Vec<Option<String>>,
    links: Vec<Option<String>>,
    histories: Vec<usize>,
}

async fn snapshot(c: &Cluster) -> Result<Snapshot> {
    let mut histories = Vec::new();
    for a in &c.agents {
        histories.push(a.history("web").await?.len());
    }
    Ok(Snapshot {
        rollouts: c.coord.json(&["status"])?,
        serving: c.ports.iter().map(|p| served_version(*p)).collect(),
        links: c.agents.iter().map(|a| a.current_link("web")).collect(),
        histories,
    })
}

/// Asserts the command failed, without a panic, with every needle in stderr.
fn assert_refused(what: &str, o: &Output, needles: &[&str]) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "{what}: must fail, but exited 0\nstdout: {}\nstderr: {err}",
        String::from_utf8_lossy(&o.stdout)
    );
    for n in needles {
        assert!(err.contains(n), "{what}: stderr must mention {n:?}:\n{err}");
    }
    assert!(
        !err.contains("panicked"),
        "{what}: the CLI panicked:\n{err}"
    );
}

/// Writes a variant of the v2 spec with `from` replaced by `to`.
fn variant(c: &Cluster, name: &str, from: &str, to: &str) -> Result<String> {
    let base = c.spec("v2", &[], &[], "batch_percent = 100")?;
    let text = std::fs::read_to_string(&base)?;
    ensure!(text.contains(from), "the spec has no {from:?}:\n{text}");
    let path = c.work.path().join(format!("{name}.toml"));
    std::fs::write(&path, text.replacen(from, to, 1))?;
    Ok(path.display().to_string())
}

#[tokio::test]
async fn cli_errors_name_the_cause_and_change_nothing() -> Result<()> {
    let c = Cluster::start(2, |_| vec![]).await?;
    let v1 = c.spec(
        "v1",
        &[],
        &[],
        "batch_percent = 100\nmax_unavailable = \"100%\"",
    )?;
    let (ok, out, err) = c.deploy_wait(&v1);
    ensure!(ok, "v1 deploy failed:\n{out}\n{err}\n{}", c.coord.log());
    c.all_serving("v1").await?;
    let before = snapshot(&c).await?;
    assert_eq!(before.rollouts.as_array().map(Vec::len), Some(1));
    let unchanged = async |what: &str| -> Result<()> {
        let now = snapshot(&c).await?;
        assert_eq!(now, before, "{what} changed the fleet");
        Ok(())
    };

    let targets = "[targets]\nlabels = { role = \"web\" }";

    // Coordinator unreachable: a port nobody listens on.
    let good = variant(&c, "good", "[run]", "[run]")?;
    let wrong = format!("http://127.0.0.1:{}", free_port());
    for args in [vec!["deploy", good.as_str()], vec!["status"]] {
        let o = std::process::Command::new(rollout_tests::bin("rollout"))
            .args(["--insecure-dev", "--coordinator", &wrong])
            .args(&args)
            .output()?;
        assert_refused(
            &format!("unreachable: {args:?}"),
            &o,
            &["cannot reach the coordinator", &wrong, "--coordinator"],
        );
    }
    unchanged("an unreachable coordinator").await?;

    // An unknown host in the targets.
    let spec = variant(&c, "nope", targets, "[targets]\nhosts = [\"nope\"]")?;
    for cmd in ["deploy", "plan"] {
        let o = c.coord.cli(&[cmd, &spec]);
        assert_refused(
            &format!("unknown host ({cmd})"),
            &o,
            &["unknown host \"nope\"", "h1", "rollout hosts"],
        );
    }
    unchanged("an unknown host").await?;

    // A label selector matching nothing.
    let spec = variant(
        &c,
        "db",
        targets,
        "[targets]\nlabels = { role = \"db\", zone = \"mars\" }",
    )?;
    let o = c.coord.cli(&["deploy", &spec]);
    assert_refused(
        "label selector",
        &o,
        &["role=db", "zone=mars", "matches no host", "rollout hosts"],
    );
    unchanged("a label selector matching nothing").await?;

    // Unknown keys, at the top and inside a table.
    let spec = variant(
        &c,
        "colour",
        "service = \"web\"",
        "service = \"web\"\ncolour = \"blue\"",
    )?;
    assert_refused(
        "unknown key",
        &c.coord.cli(&["deploy", &spec]),
        &["colour.toml", "unknown field `colour`", "expected one of"],
    );
    let spec = variant(&c, "sise", "[strategy]", "[strategy]\nbatch_sise = 2")?;
    assert_refused(
        "unknown strategy key",
        &c.coord.cli(&["deploy", &spec]),
        &["unknown field `batch_sise`", "batch_size"],
    );
    unchanged("unknown spec keys").await?;

    // The artifact file is missing.
    let missing = c.work.path().join("no-such-artifact.tar.gz");
    let art = c.work.path().join("sample-v2.tar.gz");
    let spec = variant(
        &c,
        "missing",
        &format!("path = {:?}", art.display().to_string()),
        &format!("path = {:?}", missing.display().to_string()),
    )?;
    let o = c.coord.cli(&["deploy", &spec]);
    assert_eq!(
        String::from_utf8_lossy(&o.stderr)
            .matches("No such file or directory")
            .count(),
        1,
        "the cause once: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_refused(
        "missing artifact",
        &o,
        &[
            &format!("artifact {} cannot be read", missing.display()),
            "check `artifact.path`",
        ],
    );
    unchanged("a missing artifact").await?;

    // The spec's digest does not match the artifact.
    let bad = format!("sha256:{}", "0".repeat(64));
    let spec = variant(&c, "digest", "[run]", &format!("digest = {bad:?}\n\n[run]"))?;
    assert_refused(
        "digest mismatch",
        &c.coord.cli(&["deploy", &spec]),
        &["digest mismatch", &bad],
    );
    unchanged("a wrong digest").await?;

    // Unknown rollout ids and services.
    assert_refused(
        "status of an unknown rollout",
        &c.coord.cli(&["status", "r-unknown"]),
        &["r-unknown", "not found", "rollout status"],
    );
    for cmd in ["promote", "pause", "resume", "abort", "watch", "events"] {
        assert_refused(
            &format!("{cmd} of an unknown rollout"),
            &c.coord.cli(&[cmd, "r-unknown"]),
            &["r-unknown", "not found"],
        );
    }
    assert_refused(
        "rollback of an unknown service",
        &c.coord.cli(&["rollback", "nosuchservice"]),
        &["\"nosuchservice\"", "rollout hosts"],
    );
    unchanged("unknown ids and services").await?;
    Ok(())
}

#[tokio::test]
async fn certs_dir_without_the_operator_files_names_them() -> Result<()> {
    // Refused before dialing: no coordinator needed.
    let empty = tempfile::tempdir()?;
    let o = std::process::Command::new(rollout_tests::bin("rollout"))
        .args(["--coordinator", "https://127.0.0.1:1", "--certs"])
        .arg(empty.path())
        .arg("status")
        .output()?;
    let ca = empty.path().join("ca.pem").display().to_string();
    assert_refused("empty --certs", &o, &[&ca, "rollout certs init"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(
        err.matches("No such file or directory").count(),
        1,
        "the cause once: {err}"
    );
    Ok(())
}

#[test]
fn the_coordinator_refuses_to_serve_plaintext_without_insecure_dev() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = dir.path().join("coordinator.toml");
    std::fs::write(
        &cfg,
        format!(
            "listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\n",
            rollout_tests::free_port(),
            dir.path().join("data").display().to_string()
        ),
    )
    .expect("config");
    let out = std::process::Command::new(rollout_tests::bin("rollout"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .output()
        .expect("run rollout serve");
    assert!(
        !out.status.success(),
        "served plaintext without --insecure-dev"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mutual TLS") && err.contains("rollout certs init"),
        "{err}"
    );
    // Nothing was created in the data directory.
    assert!(!dir.path().join("data").join("state").exists());
}
