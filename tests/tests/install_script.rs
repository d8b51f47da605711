//! `deploy/install-agent.sh` installs into a temporary root (`--root`, never
//! the real system): files and modes, the generated config accepted by the
//! real loader, idempotent re-runs (config and state untouched, binary
//! replaced), `--uninstall` keeping data, `--uninstall --purge`, the join
//! invocation (with a stand-in binary), clear errors, and the no-systemd path.

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use rollout_agent::config::AgentConfig;

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/install-agent.sh")
}

fn run(args: &[&str]) -> Output {
    let out = Command::new("bash")
        .arg(script())
        .args(args)
        .output()
        .expect("run bash");
    eprintln!(
        "$ install-agent.sh {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn run_ok(args: &[&str]) -> String {
    let out = run(args);
    assert!(out.status.success(), "install-agent.sh {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn write(p: &Path, data: &[u8]) {
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, data).expect("write");
}

/// A temporary root that looks like a systemd host with an agent certificate
/// already issued (so no join happens).
fn systemd_root_with_certificate() -> tempfile::TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(root.path().join("run/systemd/system")).expect("mkdir");
    let etc = root.path().join("etc/rollout");
    write(&etc.join("agent.pem"), b"CERT");
    write(&etc.join("agent.key"), b"KEY");
    write(&etc.join("ca.pem"), b"CA");
    root
}

#[test]
fn install_rerun_uninstall_purge() {
    let root = systemd_root_with_certificate();
    let r = root.path();
    let r_s = r.to_str().expect("utf-8 path");
    let agent = rollout_tests::bin("rollout-agent");
    let agent_s = agent.to_str().expect("utf-8 path");
    let bin = r.join("usr/local/bin/rollout-agent");
    let etc = r.join("etc/rollout");
    let config = etc.join("agent.toml");
    let data = r.join("var/lib/rollout");
    let unit = r.join("etc/systemd/system/rollout-agent.service");

    run_ok(&[
        "--root",
        r_s,
        "--no-start",
        "--binary",
        agent_s,
        "--coordinator",
        "https://coordinator.internal:7443",
        "--host",
        "web-1",
        "--label",
        "role=web",
        "--label",
        "zone=eu-1",
    ]);
    assert_eq!(read(&bin), read(&agent), "binary installed");
    assert_eq!(mode(&bin), 0o755);
    assert_eq!(mode(&etc), 0o755);
    assert_eq!(mode(&data), 0o700, "data directory private");
    assert_eq!(mode(&etc.join("agent.key")), 0o600, "key private");
    assert_eq!(mode(&config), 0o644);
    let unit_text = String::from_utf8(read(&unit)).expect("utf-8");
    assert!(
        unit_text.contains(
            "\nExecStart=/usr/local/bin/rollout-agent run --config /etc/rollout/agent.toml\n"
        ),
        "ExecStart points at the installed binary (host path, not the temp root):\n{unit_text}"
    );
    assert!(unit_text.contains("\nKillMode=process\n"));
    assert!(!unit_text.contains(r_s), "no temp-root path in the unit");

    // The config names the service user and the coordinator, and every key is
    // accepted by the agent's own loader (run_as checked separately: the user
    // is only created on a real host).
    let config_text = String::from_utf8(read(&config)).expect("utf-8");
    assert!(
        config_text.contains("run_as = \"rollout-svc\""),
        "{config_text}"
    );
    assert!(
        !config_text.contains(r_s),
        "no temp-root path in the config"
    );
    let parsed = AgentConfig::parse(
        &config_text.replace("run_as = \"rollout-svc\"", ""),
        &config,
        "fallback",
    )
    .unwrap_or_else(|e| panic!("{e}\n{config_text}"));
    assert_eq!(parsed.host, "web-1");
    assert_eq!(parsed.data_dir, Path::new("/var/lib/rollout"));
    assert_eq!(parsed.labels.get("zone").map(String::as_str), Some("eu-1"));
    let tls = parsed
        .coordinator
        .and_then(|c| c.tls)
        .expect("coordinator with TLS");
    assert_eq!(tls.cert, Path::new("/etc/rollout/agent.pem"));
    assert_eq!(tls.key, Path::new("/etc/rollout/agent.key"));

    // Agent state and an operator's config edit must survive a re-run that
    // upgrades the binary (a different file: the agent with bytes appended,
    // which still runs).
    write(&data.join("state/db"), b"STATE");
    let edited = format!("{config_text}# edited by the operator\n");
    write(&config, edited.as_bytes());
    let new_agent_dir = tempfile::tempdir().expect("tempdir");
    let new_agent = new_agent_dir.path().join("rollout-agent");
    let mut upgraded = read(&agent);
    upgraded.extend_from_slice(b"\0upgrade marker");
    write(&new_agent, &upgraded);
    std::fs::set_permissions(&new_agent, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ino_before = std::fs::metadata(&bin).expect("stat").ino();
    run_ok(&[
        "--root",
        r_s,
        "--no-start",
        "--binary",
        new_agent.to_str().expect("utf-8 path"),
    ]);
    assert_eq!(read(&bin), upgraded, "binary replaced");
    assert_ne!(
        std::fs::metadata(&bin).expect("stat").ino(),
        ino_before,
        "replaced by rename, not rewritten in place"
    );
    assert_eq!(read(&config), edited.as_bytes(), "config kept");
    assert_eq!(read(&data.join("state/db")), b"STATE", "state kept");
    assert_eq!(read(&etc.join("agent.key")), b"KEY", "certificate kept");
    assert_eq!(mode(&data), 0o700);

    // A third run with the same binary changes nothing at all.
    let ino = std::fs::metadata(&bin).expect("stat").ino();
    let out = run_ok(&[
        "--root",
        r_s,
        "--no-start",
        "--binary",
        new_agent.to_str().expect("utf-8"),
    ]);
    assert!(out.contains("up to date"), "{out}");
    assert_eq!(std::fs::metadata(&bin).expect("stat").ino(), ino);

    run_ok(&["--root", r_s, "--uninstall"]);
    assert!(!bin.exists(), "binary removed");
    assert!(!unit.exists(), "unit removed");
    assert_eq!(read(&data.join("state/db")), b"STATE", "state kept");
    assert_eq!(read(&config), edited.as_bytes(), "config kept");
    assert!(etc.join("agent.pem").exists(), "certificate kept");

    run_ok(&["--root", r_s, "--uninstall", "--purge"]);
    assert!(!data.exists(), "state purged");
    assert!(!etc.exists(), "config and certificate purged");
}

#[test]
fn joins_when_no_certificate_exists() {
    // A stand-in for `rollout-agent join`: records its arguments and writes
    // the files the real one writes into --dir.
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    let r_s = r.to_str().expect("utf-8 path");
    let fake_dir = tempfile::tempdir().expect("tempdir");
    let fake = fake_dir.path().join("rollout-agent");
    let args_log = fake_dir.path().join("join-args");
    write(
        &fake,
        format!(
            r#"#!/usr/bin/env bash
set -eu
if [ "$1" = --version ]; then echo "rollout-agent 0.0.0-fake"; exit 0; fi
[ "$1" = join ] || exit 3
echo "$*" >> {log}
while [ $# -gt 0 ]; do
  if [ "$1" = --dir ]; then dir=$2; fi
  shift
done
echo CERT > "$dir/agent.pem"; echo KEY > "$dir/agent.key"; echo CA > "$dir/ca.pem"
"#,
            log = args_log.display()
        )
        .as_bytes(),
    );
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let ca = fake_dir.path().join("ca.pem");
    write(&ca, b"CA");
    let common = [
        "--root",
        r_s,
        "--no-start",
        "--no-service-user",
        "--binary",
        fake.to_str().expect("utf-8"),
    ];

    // Without the join arguments: refused before anything is changed.
    let out = run(&common);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    for needle in ["--coordinator", "--token", "--ca", "rollout token create"] {
        assert!(err.contains(needle), "{needle}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(r).expect("ls").count(),
        0,
        "nothing installed"
    );

    let mut args = common.to_vec();
    args.extend([
        "--coordinator",
        "https://coordinator.internal:7443",
        "--token",
        "tok-123",
        "--ca",
        ca.to_str().expect("utf-8"),
        "--host",
        "db-7",
    ]);
    let out = run_ok(&args);
    assert!(out.contains("systemd not found"), "{out}");
    assert!(
        out.contains("/usr/local/bin/rollout-agent run --config /etc/rollout/agent.toml"),
        "prints the command for another supervisor: {out}"
    );
    let etc = r.join("etc/rollout");
    let logged = std::fs::read_to_string(&args_log).expect("join ran");
    assert_eq!(
        logged.trim(),
        format!(
            "join --coordinator https://coordinator.internal:7443 --token tok-123 --ca {} --host db-7 --dir {}",
            ca.display(),
            etc.display()
        )
    );
    assert_eq!(mode(&etc.join("agent.key")), 0o600);
    assert!(
        !r.join("etc/systemd/system/rollout-agent.service").exists(),
        "no unit without systemd"
    );
    let config = std::fs::read_to_string(etc.join("agent.toml")).expect("config");
    assert!(
        !config.lines().any(|l| l.starts_with("run_as")),
        "--no-service-user: {config}"
    );
    let parsed = AgentConfig::parse(&config, Path::new("agent.toml"), "x").expect("valid config");
    assert_eq!(parsed.host, "db-7");

    // The certificate now exists: a re-run with the token does not join again.
    run_ok(&args);
    assert_eq!(
        std::fs::read_to_string(&args_log)
            .expect("log")
            .lines()
            .count(),
        1,
        "joined once"
    );
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let root = tempfile::tempdir().expect("tempdir");
    let r_s = root.path().to_str().expect("utf-8");
    let agent = rollout_tests::bin("rollout-agent");
    let agent_s = agent.to_str().expect("utf-8 path");
    let cases: &[(&[&str], &str)] = &[
        (&["--bogus"], "unknown option --bogus"),
        (&["--root"], "--root needs a value"),
        (&["--purge"], "--purge only goes with --uninstall"),
        (
            &["--root", r_s, "--binary", "/nonexistent/rollout-agent"],
            "--binary PATH",
        ),
        (
            &["--root", r_s, "--no-start=yes"],
            "--no-start takes no value",
        ),
        (
            &[
                "--root",
                r_s,
                "--binary",
                agent_s,
                "--skip-join",
                "--label",
                "novalue",
            ],
            "KEY=VALUE",
        ),
    ];
    for (args, needle) in cases {
        let out = run(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} must fail");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert_eq!(
        std::fs::read_dir(root.path()).expect("ls").count(),
        0,
        "nothing installed"
    );
    let help = run_ok(&["--help"]);
    for opt in [
        "--coordinator",
        "--token",
        "--uninstall",
        "--purge",
        "--root",
        "--no-start",
    ] {
        assert!(help.contains(opt), "{opt} in --help");
    }
}
