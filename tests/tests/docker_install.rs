//! Installing like an operator, in containers: `deploy/install-agent.sh` on a
//! clean Debian "VM" joins a coordinator in another container with a token
//! (mutual TLS), a rolling deploy reaches the VM, re-running the script keeps
//! the agent's state, `--uninstall` keeps the data and `--uninstall --purge`
//! removes it. And `deploy/docker/demo.sh`, the containerised demo, run to the
//! end: v2 on every agent, v3 rolled back everywhere.
//!
//! Harness: `rollout_tests::vm`. Without a Docker engine these tests fail
//! with the fix, unless `ROLLOUT_SKIP_DOCKER=1`.

use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context, Result, ensure};
use rollout_tests::docker::docker;
use rollout_tests::vm::{KIT, VmLab, text, workspace_root};

const VM: &str = "vm1";

/// The command line the script prints for running the agent without systemd.
fn supervisor_command(stdout: &str) -> Option<String> {
    let mut lines = stdout.lines();
    lines.find(|l| l.contains("under your supervisor"))?;
    let cmd = lines.next()?.split_once(':')?.1.trim().to_string();
    (!cmd.is_empty()).then_some(cmd)
}

fn sha256(lab: &VmLab, path: &str) -> Result<String> {
    let out = lab.bash(VM, &format!("sha256sum {path}"))?;
    Ok(out
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string())
}

/// The agent's own history of `web`: (event, release) pairs.
fn history(lab: &VmLab) -> Result<Vec<(String, String)>> {
    let doc = lab.agent_releases(VM, "web")?;
    Ok(doc["history"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default().to_string(),
                e["release"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect())
}

/// The pid of the sample service: the one process of the service user
/// (root in a container may not read another user's `/proc/PID/cwd`).
fn service_pid(lab: &VmLab) -> Result<String> {
    let out = lab.bash(
        VM,
        "for p in /proc/[0-9]*; do [ \"$(stat -c %U $p 2>/dev/null)\" = rollout-svc ] && \
         echo ${p#/proc/}; done; true",
    )?;
    let pids: Vec<&str> = out.split_whitespace().collect();
    ensure!(pids.len() == 1, "one service process expected: {pids:?}");
    Ok(pids[0].to_string())
}

#[test]
fn install_script_on_a_clean_vm_joins_deploys_upgrades_and_uninstalls() -> Result<()> {
    let started = Instant::now();
    let Some(mut lab) = VmLab::start()? else {
        return Ok(());
    };
    lab.start_vm(VM)?;
    // A clean machine: no agent, no user, no state.
    ensure!(!lab.test(VM, &["-e", "/usr/local/bin/rollout-agent"])?);
    ensure!(!lab.test(VM, &["-e", "/var/lib/rollout"])?);
    ensure!(
        lab.exec(VM, &["getent", "passwd", "rollout-svc"])?
            .status
            .code()
            == Some(2)
    );

    // First install: joins with a one-time token, as the README says.
    let token = lab.token(&["--ttl", "10m"])?;
    let url = lab.url();
    let ca = format!("{KIT}/ca.pem");
    let args = [
        "--coordinator",
        url.as_str(),
        "--token",
        token.as_str(),
        "--ca",
        ca.as_str(),
        "--label",
        "role=web",
    ];
    let out = lab.install(VM, &args)?;
    ensure!(out.status.success(), "install: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        stdout.contains(&format!("joining {url} as {VM}")),
        "{stdout}"
    );
    ensure!(stdout.contains("systemd not found"), "{stdout}");
    let cmd = supervisor_command(&stdout).with_context(|| format!("no command in:\n{stdout}"))?;
    ensure!(
        cmd == "/usr/local/bin/rollout-agent run --config /etc/rollout/agent.toml",
        "{cmd}"
    );
    // What it installed, with the modes it documents.
    let modes = lab.bash(
        VM,
        "stat -c '%n %a %U' /usr/local/bin/rollout-agent /etc/rollout/agent.toml \
         /etc/rollout/agent.key /etc/rollout/agent.pem /etc/rollout/ca.pem /var/lib/rollout",
    )?;
    for want in [
        "/usr/local/bin/rollout-agent 755 root",
        "/etc/rollout/agent.toml 644 root",
        "/etc/rollout/agent.key 600 root",
        "/var/lib/rollout 700 root",
    ] {
        ensure!(modes.contains(want), "{want:?} not in\n{modes}");
    }
    let user = lab.bash(VM, "getent passwd rollout-svc")?;
    ensure!(user.contains("/usr/sbin/nologin"), "{user}");
    let config = lab.bash(VM, "cat /etc/rollout/agent.toml")?;
    for want in [
        "host = \"vm1\"",
        "run_as = \"rollout-svc\"",
        "role = \"web\"",
        "url = \"https://coordinator:7443\"",
    ] {
        ensure!(config.contains(want), "{want:?} not in\n{config}");
    }
    ensure!(
        !lab.test(VM, &["-e", "/etc/systemd/system/rollout-agent.service"])?,
        "no unit without systemd"
    );

    // Run it the way the script says, under a minimal supervisor.
    lab.supervise_agent(VM, &cmd)?;
    let listed = lab.wait_connected(VM)?;
    ensure!(listed["labels"]["role"] == "web", "{listed}");

    // A rolling deploy reaches the VM: v1, then v2.
    let v1 = lab.write_release("v1", true)?;
    lab.deploy_wait(&v1)?;
    lab.wait_serving(VM, "v1")?;
    let v2 = lab.write_release("v2", true)?;
    let id2 = lab.deploy_wait(&v2)?;
    lab.wait_serving(VM, "v2")?;
    let st = lab.json(&["status", &id2])?;
    let st = st.get(0).cloned().unwrap_or(st);
    ensure!(st["state"] == "succeeded", "{st}");
    // The service runs as the unprivileged user, from its release, the
    // agent as root.
    let spid = service_pid(&lab)?;
    let exe = lab.bash(VM, &format!("tr '\\0' ' ' </proc/{spid}/cmdline"))?;
    ensure!(
        exe.starts_with("/var/lib/rollout/services/web/releases/v2/./bin/sample-service"),
        "{exe}"
    );
    let apid = lab.agent_pid(VM)?;
    let auid = lab.bash(VM, &format!("stat -c %U /proc/{apid}"))?;
    ensure!(auid.trim() == "root", "agent runs as {auid}");

    // Re-running the script with the same arguments (token used up) and a
    // new build of the binary: upgraded in place, nothing else changes.
    let cert_before = sha256(&lab, "/etc/rollout/agent.pem")?;
    let config_before = config;
    let history_before = history(&lab)?;
    ensure!(
        history_before
            .iter()
            .any(|(e, r)| e == "committed" && r == "v2"),
        "{history_before:?}"
    );
    lab.bash(VM, &format!("printf 'new build' >>{KIT}/rollout-agent"))?;
    let out = lab.install(VM, &args)?;
    ensure!(out.status.success(), "re-install: {}", text(&out));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(stdout.contains("not joining again"), "{stdout}");
    ensure!(
        stdout.contains("installed /usr/local/bin/rollout-agent"),
        "{stdout}"
    );
    ensure!(
        stdout.contains(&format!("running (pid {apid})")),
        "{stdout}"
    );
    ensure!(stdout.contains("restart it in its"), "{stdout}");
    ensure!(
        sha256(&lab, "/usr/local/bin/rollout-agent")?
            == sha256(&lab, &format!("{KIT}/rollout-agent"))?,
        "the new binary is installed"
    );
    // The operator restarts it in the supervisor.
    lab.restart_agent(VM)?;
    lab.wait_connected(VM)?;
    ensure!(
        sha256(&lab, "/etc/rollout/agent.pem")? == cert_before,
        "same identity"
    );
    ensure!(
        lab.bash(VM, "cat /etc/rollout/agent.toml")? == config_before,
        "config kept"
    );
    let status = lab.agent_status(VM)?;
    ensure!(status["host"] == VM, "{status}");
    let history_after = history(&lab)?;
    ensure!(
        history_after.starts_with(&history_before),
        "history kept:\nbefore {history_before:?}\nafter {history_after:?}"
    );
    lab.wait_serving(VM, "v2")?;
    ensure!(
        service_pid(&lab)? == spid,
        "the service was adopted, not restarted"
    );
    // Unchanged binary: nothing to do.
    let out = lab.install(VM, &args)?;
    ensure!(out.status.success(), "third run: {}", text(&out));
    ensure!(
        String::from_utf8_lossy(&out.stdout).contains("is up to date"),
        "{}",
        text(&out)
    );

    // --uninstall while the agent runs: binary gone, state and config kept,
    // and the operator is told the agent still runs.
    let out = lab.install(VM, &["--uninstall"])?;
    ensure!(out.status.success(), "uninstall: {}", text(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(stderr.contains("still running"), "{}", text(&out));
    ensure!(!lab.test(VM, &["-e", "/usr/local/bin/rollout-agent"])?);
    for kept in [
        "/etc/rollout/agent.toml",
        "/etc/rollout/agent.pem",
        "/etc/rollout/agent.key",
        "/var/lib/rollout/services/web",
    ] {
        ensure!(lab.test(VM, &["-e", kept])?, "{kept} must be kept");
    }
    // --purge refuses while an agent still runs, and removes nothing.
    let out = lab.install(VM, &["--uninstall", "--purge"])?;
    ensure!(
        !out.status.success(),
        "purge with a running agent: {}",
        text(&out)
    );
    ensure!(
        String::from_utf8_lossy(&out.stderr).contains("stop it in its supervisor first"),
        "{}",
        text(&out)
    );
    ensure!(lab.test(VM, &["-d", "/var/lib/rollout/services/web"])?);
    lab.stop_agent(VM)?;
    // The service outlives the agent; purge stops it and deletes everything.
    lab.wait_serving(VM, "v2")?;
    let out = lab.install(VM, &["--uninstall", "--purge"])?;
    ensure!(out.status.success(), "purge: {}", text(&out));
    for gone in [
        "/var/lib/rollout",
        "/etc/rollout",
        "/usr/local/bin/rollout-agent",
    ] {
        ensure!(
            !lab.test(VM, &["-e", gone])?,
            "{gone} must be gone: {}",
            text(&out)
        );
    }
    ensure!(
        lab.exec(VM, &["getent", "passwd", "rollout-svc"])?
            .status
            .code()
            == Some(2),
        "user removed"
    );
    ensure!(
        lab.served_version(VM).is_none(),
        "the service must be stopped"
    );
    eprintln!("install test done in {:?}", started.elapsed());
    Ok(())
}

/// Removes the demo's containers and network when the test ends.
struct DemoDown(String);

impl Drop for DemoDown {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(workspace_root().join("deploy/docker/demo.sh"))
            .args(["--down", "--name", &self.0])
            .stdin(Stdio::null())
            .output();
    }
}

#[test]
fn container_demo_deploys_v2_everywhere_and_rolls_v3_back() -> Result<()> {
    if !rollout_tests::docker::docker_available() {
        return Ok(());
    }
    let started = Instant::now();
    let name = format!("rdemo{}", std::process::id());
    let _down = DemoDown(name.clone());
    let script = workspace_root().join("deploy/docker/demo.sh");
    let owner = format!("rollout-test.owner={}", std::process::id());
    let out = Command::new("bash")
        .arg(&script)
        .args([
            "--agents",
            "3",
            "--name",
            &name,
            "--label",
            &owner,
            "--bin-dir",
        ])
        .arg(rollout_tests::target_dir())
        .stdin(Stdio::null())
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(out.status.success(), "demo.sh: {}", text(&out));
    ensure!(
        stdout.contains("result: v2 succeeded, v3 rolled_back"),
        "{}",
        text(&out)
    );
    // Check each agent ourselves, not only the demo's summary.
    for i in 1..=3 {
        let c = format!("{name}-h{i}");
        let served = docker(&[
            "exec",
            &c,
            "sh",
            "-c",
            "timeout 3 wget -q -O - http://127.0.0.1:8080/version",
        ])?;
        ensure!(served == "v2", "h{i} serves {served:?}");
        let doc: serde_json::Value = serde_json::from_str(&docker(&[
            "exec",
            &c,
            "rollout-agent",
            "releases",
            "web",
            "--output",
            "json",
        ])?)?;
        let status: serde_json::Value = serde_json::from_str(&docker(&[
            "exec",
            &c,
            "rollout-agent",
            "status",
            "--output",
            "json",
        ])?)?;
        let web = status["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == "web")
            .with_context(|| format!("h{i} has no web: {status}"))?;
        ensure!(
            web["current"] == "v2" && web["phase"] == "idle",
            "h{i} must be idle on v2 after v3's rollback: {web}"
        );
        let hist = doc["history"].as_array().cloned().unwrap_or_default();
        ensure!(
            hist.iter()
                .any(|e| e["event"] == "committed" && e["release"] == "v2"),
            "h{i}: {doc:#}"
        );
    }
    // The coordinator's view: v3 rolled back.
    let list: serde_json::Value = serde_json::from_str(&docker(&[
        "exec",
        &format!("{name}-coordinator"),
        "rollout",
        "--certs",
        "/pki",
        "--output",
        "json",
        "status",
    ])?)?;
    let states: Vec<(String, String)> = list
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            (
                r["release"].as_str().unwrap_or_default().to_string(),
                r["state"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for (rel, state) in [("v2", "succeeded"), ("v3", "rolled_back")] {
        ensure!(
            states.iter().any(|(r, s)| r == rel && s == state),
            "{rel} not {state}: {states:?}"
        );
    }
    // --down removes everything it started.
    let out = Command::new("bash")
        .arg(&script)
        .args(["--down", "--name", &name])
        .stdin(Stdio::null())
        .output()?;
    ensure!(out.status.success(), "demo.sh --down: {}", text(&out));
    let left = docker(&[
        "ps",
        "-a",
        "--filter",
        &format!("label=rollout-demo={name}"),
        "-q",
    ])?;
    ensure!(left.is_empty(), "containers left: {left}");
    let nets = docker(&[
        "network",
        "ls",
        "--filter",
        &format!("label=rollout-demo={name}"),
        "-q",
    ])?;
    ensure!(nets.is_empty(), "networks left: {nets}");
    eprintln!("demo test done in {:?}", started.elapsed());
    Ok(())
}
