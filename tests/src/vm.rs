//! Installing on clean machines: a coordinator container serving mutual TLS
//! (with joining on) and fresh Debian "VM" containers that hold nothing of
//! rollout until a test copies in what an operator would: the agent binary
//! and `deploy/install-agent.sh` (plus the systemd unit next to it).
//!
//! * The VM image (`rollout-vm:bookworm`) is a debootstrapped Debian userland
//!   (`deploy/docker/build-vm-image.sh`, nothing pulled), built once and
//!   reused. It has bash, apt, adduser and useradd, but no systemd running,
//!   no curl and no procps: the harness reads the sample service with bash's
//!   `/dev/tcp` and processes through `/proc`.
//! * The coordinator runs `rollout serve` from the test image
//!   (`rollout-test:latest`, [`crate::docker`]) with the PKI of a real
//!   `rollout certs init --name coordinator` and `[tls] ca_key`, so agents
//!   join with `rollout token create` tokens. The CLI runs in its container
//!   with the operator certificate (`--certs /pki`).
//! * Releases carry the sample service's binary (`bin/sample-service`), so a
//!   VM runs exactly what the rollout delivered.
//! * Everything sits on one `docker network create --internal` network and
//!   carries the owner label of [`crate::docker`], so a killed test's leftovers
//!   are removed by the next one; a [`VmLab`] removes its own on drop.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::bin;
use crate::docker::{IMAGE, docker, docker_available, poll};

/// The clean Debian image VMs start from.
pub const VM_IMAGE: &str = "rollout-vm:bookworm";
/// The coordinator's name on the lab network.
pub const COORDINATOR: &str = "coordinator";
/// The coordinator's port.
pub const PORT: u16 = 7443;
/// Where the lab's files (artifacts, specs) are in the coordinator container.
pub const SHARED: &str = "/shared";
/// Where a test puts what the operator copies onto a VM.
pub const KIT: &str = "/root/rollout";
/// The port the sample service listens on in the VMs.
pub const SERVICE_PORT: u16 = 8080;
/// Default wait.
pub const WAIT: Duration = Duration::from_secs(30);

const OWNER_LABEL: &str = "rollout-test.owner";

/// The workspace root (the tests crate's parent).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Whether the VM tests run (see [`docker_available`]); also makes sure the
/// test image and the VM image exist (the latter built once, then reused).
pub fn vm_available() -> bool {
    if !docker_available() {
        return false;
    }
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = READY.get_or_init(|| ensure_vm_image().map_err(|e| format!("{e:#}"))) {
        panic!("building the VM image failed: {e}");
    }
    true
}

/// Runs `deploy/docker/build-vm-image.sh` (a no-op when the image exists)
/// under a file lock, so parallel test processes build it once.
fn ensure_vm_image() -> Result<()> {
    if docker(&["image", "inspect", "-f", "{{.Id}}", VM_IMAGE]).is_ok() {
        return Ok(());
    }
    let lock_path = crate::target_dir().join("rollout-vm-image.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("lock {}", lock_path.display()))?;
    let script = workspace_root().join("deploy/docker/build-vm-image.sh");
    let started = Instant::now();
    let out = Command::new("bash")
        .arg(&script)
        .args(["--tag", VM_IMAGE])
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("run {}", script.display()))?;
    ensure!(
        out.status.success(),
        "{} failed ({}):\n{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("built {VM_IMAGE} in {:?}", started.elapsed());
    Ok(())
}

/// stdout and stderr of a command, for messages.
pub fn text(o: &Output) -> String {
    format!(
        "exit {}\n--- stdout ---\n{}--- stderr ---\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

static LABS: AtomicU32 = AtomicU32::new(0);

/// A coordinator container and clean VM containers on a private network.
#[derive(Debug)]
pub struct VmLab {
    /// Prefix of every container name; also the network's name.
    pub id: String,
    /// `pki/` (mounted read-only at `/pki` in the coordinator) and `shared/`
    /// (at [`SHARED`]).
    pub dir: tempfile::TempDir,
    started: Vec<String>,
    network_created: bool,
}

impl VmLab {
    /// Creates the PKI and network and starts the coordinator; `None` when
    /// the Docker tests are skipped.
    pub fn start() -> Result<Option<VmLab>> {
        if !vm_available() {
            return Ok(None);
        }
        let n = LABS.fetch_add(1, Ordering::SeqCst);
        let mut lab = VmLab {
            id: format!("rv{}-{n}", std::process::id()),
            // The same prefix as the fleets': removed when this process is gone.
            dir: tempfile::Builder::new()
                .prefix(&format!("rollout-fleet-{}-", std::process::id()))
                .tempdir()?,
            started: Vec::new(),
            network_created: false,
        };
        let pki = lab.dir.path().join("pki");
        let out = Command::new(bin("rollout"))
            .args(["certs", "init", "--name", COORDINATOR, "--dir"])
            .arg(&pki)
            .stdin(Stdio::null())
            .output()
            .context("run rollout certs init")?;
        ensure!(out.status.success(), "rollout certs init: {}", text(&out));
        let shared = lab.dir.path().join("shared");
        std::fs::create_dir_all(&shared)?;
        std::fs::write(
            shared.join("coordinator.toml"),
            format!(
                "listen = \"0.0.0.0:{PORT}\"\ndata_dir = \"/var/lib/rollout-coordinator\"\n\
                 [tls]\nca = \"/pki/ca.pem\"\ncert = \"/pki/coordinator.pem\"\n\
                 key = \"/pki/coordinator.key\"\nca_key = \"/pki/ca.key\"\n\
                 [log]\nlevel = \"info,rollout_coordinator=debug\"\n"
            ),
        )?;
        let owner = format!("{OWNER_LABEL}={}", std::process::id());
        docker(&[
            "network",
            "create",
            "--internal",
            "--label",
            &owner,
            &lab.id,
        ])?;
        lab.network_created = true;
        let name = lab.container(COORDINATOR);
        lab.started.push(name.clone());
        let pki_mount = format!("{}:/pki:ro", pki.display());
        let shared_mount = format!("{}:{SHARED}", shared.display());
        let serve = format!("exec rollout serve --config {SHARED}/coordinator.toml");
        let mut args = lab.run_args(COORDINATOR);
        args.extend(["-v", &pki_mount, "-v", &shared_mount, IMAGE, "-c", &serve].map(String::from));
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        poll("the coordinator to answer", WAIT, || {
            lab.json(&["hosts"]).ok().map(|_| ())
        })
        .with_context(|| lab.logs(COORDINATOR))?;
        Ok(Some(lab))
    }

    /// `docker run -d` arguments for a container of the lab named `host`.
    fn run_args(&self, host: &str) -> Vec<String> {
        [
            "run",
            "-d",
            "--init",
            "--name",
            &self.container(host),
            "--hostname",
            host,
            "--network",
            &self.id,
            "--network-alias",
            host,
            "--label",
            &format!("{OWNER_LABEL}={}", std::process::id()),
            "--memory",
            "512m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    /// The container of `host`.
    pub fn container(&self, host: &str) -> String {
        format!("{}-{host}", self.id)
    }

    /// `https://coordinator:7443`, as the VMs reach it.
    pub fn url(&self) -> String {
        format!("https://{COORDINATOR}:{PORT}")
    }

    /// The CA certificate agents verify the coordinator with (on this machine).
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("pki/ca.pem")
    }

    /// The lab's shared dir on this machine ([`SHARED`] in the coordinator).
    pub fn shared(&self) -> PathBuf {
        self.dir.path().join("shared")
    }

    /// Starts a fresh VM `host` (its main process only waits) and copies the
    /// operator's kit into [`KIT`]: `install-agent.sh`, `systemd/` and
    /// `rollout-agent` (the workspace's binary) as the script expects them
    /// next to it, and `ca.pem`.
    pub fn start_vm(&mut self, host: &str) -> Result<()> {
        let name = self.container(host);
        self.started.push(name.clone());
        let mut args = self.run_args(host);
        args.extend([VM_IMAGE, "sleep", "infinity"].map(String::from));
        docker(&args.iter().map(String::as_str).collect::<Vec<_>>())?;
        let kit = tempfile::tempdir()?;
        let root = workspace_root();
        std::fs::copy(
            root.join("deploy/install-agent.sh"),
            kit.path().join("install-agent.sh"),
        )?;
        std::fs::create_dir_all(kit.path().join("systemd"))?;
        std::fs::copy(
            root.join("deploy/systemd/rollout-agent.service"),
            kit.path().join("systemd/rollout-agent.service"),
        )?;
        std::fs::copy(bin("rollout-agent"), kit.path().join("rollout-agent"))?;
        std::fs::copy(self.ca(), kit.path().join("ca.pem"))?;
        docker(&[
            "cp",
            &format!("{}/.", kit.path().display()),
            &format!("{name}:{KIT}"),
        ])?;
        Ok(())
    }

    /// Runs `argv` in the container of `host`.
    pub fn exec(&self, host: &str, argv: &[&str]) -> Result<Output> {
        Command::new("docker")
            .arg("exec")
            .arg(self.container(host))
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .context("run docker exec")
    }

    /// `bash -c script` in a VM; stdout, or an error with the output.
    pub fn bash(&self, host: &str, script: &str) -> Result<String> {
        let out = self.exec(host, &["bash", "-c", script])?;
        ensure!(out.status.success(), "{host}: `{script}`: {}", text(&out));
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Whether `test ARGS` holds in the VM (`-e /path`, `-d /path`, ...).
    pub fn test(&self, host: &str, args: &[&str]) -> Result<bool> {
        let mut argv = vec!["test"];
        argv.extend_from_slice(args);
        Ok(self.exec(host, &argv)?.status.success())
    }

    /// `bash KIT/install-agent.sh ARGS` in the VM, as root.
    pub fn install(&self, host: &str, args: &[&str]) -> Result<Output> {
        let script = format!("{KIT}/install-agent.sh");
        let mut argv = vec!["bash", script.as_str()];
        argv.extend_from_slice(args);
        self.exec(host, &argv)
    }

    /// Runs `command` (the line the script printed) under a minimal
    /// supervisor, as an operator without systemd would: a bash loop that
    /// restarts it when it exits, the agent's pid in `/run/rollout-agent.pid`,
    /// its output in `/var/log/rollout-agent.log`; then waits until the
    /// agent answers on its admin socket.
    pub fn supervise_agent(&self, host: &str, command: &str) -> Result<()> {
        let script = format!(
            "#!/bin/bash\n\
             # Restarts the agent whenever it exits.\n\
             echo $$ >/run/rollout-supervisor.pid\n\
             while [ -x /usr/local/bin/rollout-agent ]; do\n\
             \x20 {command} >>/var/log/rollout-agent.log 2>&1 &\n\
             \x20 echo $! >/run/rollout-agent.pid\n\
             \x20 wait $!\n\
             \x20 sleep 0.5\n\
             done\n"
        );
        let path = self.shared().join(format!("supervise-{host}.sh"));
        std::fs::write(&path, script)?;
        docker(&[
            "cp",
            &path.display().to_string(),
            &format!("{}:/root/supervise-agent.sh", self.container(host)),
        ])?;
        docker(&[
            "exec",
            "-d",
            &self.container(host),
            "bash",
            "/root/supervise-agent.sh",
        ])?;
        self.wait_agent(host)
    }

    /// The agent's pid as the supervisor wrote it.
    pub fn agent_pid(&self, host: &str) -> Result<u32> {
        let s = self.bash(host, "cat /run/rollout-agent.pid")?;
        s.trim().parse().with_context(|| format!("agent pid {s:?}"))
    }

    /// Stops the agent with SIGTERM (its pid only) and waits until the
    /// supervisor has started a new one that answers.
    pub fn restart_agent(&self, host: &str) -> Result<()> {
        let old = self.agent_pid(host)?;
        self.bash(host, &format!("kill -TERM {old}"))?;
        poll(&format!("{host}: a new agent"), WAIT, || {
            self.agent_pid(host).ok().filter(|p| *p != old)
        })?;
        self.wait_agent(host)
    }

    /// Stops the supervisor, then the agent (SIGTERM, its pid only).
    pub fn stop_agent(&self, host: &str) -> Result<()> {
        let pid = self.agent_pid(host)?;
        self.bash(
            host,
            &format!("kill -TERM \"$(cat /run/rollout-supervisor.pid)\"; kill -TERM {pid}"),
        )?;
        poll(&format!("{host}: agent {pid} to exit"), WAIT, || {
            (!self
                .test(host, &["-d", &format!("/proc/{pid}")])
                .unwrap_or(true))
            .then_some(())
        })
    }

    /// `rollout-agent status --output json` in the VM.
    pub fn agent_status(&self, host: &str) -> Result<serde_json::Value> {
        let out = self.bash(host, "rollout-agent status --output json")?;
        Ok(serde_json::from_str(&out)?)
    }

    /// `rollout-agent releases SERVICE --output json` in the VM.
    pub fn agent_releases(&self, host: &str, service: &str) -> Result<serde_json::Value> {
        let out = self.bash(
            host,
            &format!("rollout-agent releases {service} --output json"),
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Waits until the agent answers on its admin socket.
    pub fn wait_agent(&self, host: &str) -> Result<()> {
        poll(&format!("{host}'s agent to answer"), WAIT, || {
            self.agent_status(host).ok().map(|_| ())
        })
        .with_context(|| self.agent_log(host))
    }

    /// The agent's log (`/var/log/rollout-agent.log`), last lines.
    pub fn agent_log(&self, host: &str) -> String {
        self.bash(host, "tail -n 80 /var/log/rollout-agent.log 2>&1")
            .unwrap_or_else(|e| format!("{e:#}"))
    }

    /// The version the sample service on the VM answers, read with bash's
    /// `/dev/tcp` (the VM has no HTTP client).
    pub fn served_version(&self, host: &str) -> Option<String> {
        let script = format!(
            "exec 3<>/dev/tcp/127.0.0.1/{SERVICE_PORT} || exit 1\n\
             printf 'GET /version HTTP/1.0\\r\\nHost: vm\\r\\n\\r\\n' >&3\n\
             timeout 3 cat <&3"
        );
        let resp = self.bash(host, &script).ok()?;
        let (head, body) = resp.split_once("\r\n\r\n")?;
        head.starts_with("HTTP/1.")
            .then(|| body.trim().to_string())
            .filter(|b| !b.is_empty())
    }

    /// Waits until the VM's sample service answers `version`.
    pub fn wait_serving(&self, host: &str, version: &str) -> Result<()> {
        poll(&format!("{host} serving {version}"), WAIT, || {
            (self.served_version(host).as_deref() == Some(version)).then_some(())
        })
        .with_context(|| format!("now {:?}", self.served_version(host)))
    }

    /// The container's own log.
    pub fn logs(&self, host: &str) -> String {
        Command::new("docker")
            .args(["logs", "--tail", "100", &self.container(host)])
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    }

    // ----- the coordinator, through the CLI in its container -----

    /// `rollout --coordinator https://127.0.0.1:7443 --certs /pki ARGS` in the
    /// coordinator container (the operator certificate).
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let url = format!("https://127.0.0.1:{PORT}");
        let mut argv = vec!["rollout", "--coordinator", &url, "--certs", "/pki"];
        argv.extend_from_slice(args);
        self.exec(COORDINATOR, &argv)
    }

    /// `rollout --output json ARGS`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let out = self.cli(&a)?;
        ensure!(out.status.success(), "rollout {args:?}: {}", text(&out));
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `rollout token create ARGS`: the token.
    pub fn token(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["token", "create"];
        a.extend_from_slice(args);
        let out = self.cli(&a)?;
        ensure!(out.status.success(), "rollout token create: {}", text(&out));
        let token = String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string();
        ensure!(!token.is_empty(), "no token printed: {}", text(&out));
        Ok(token)
    }

    /// The coordinator's `rollout hosts` entry of `host`.
    pub fn host(&self, host: &str) -> Result<Option<serde_json::Value>> {
        let v = self.json(&["hosts"])?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .find(|h| h["host"] == host)
            .cloned())
    }

    /// Waits until the coordinator lists `host` as connected.
    pub fn wait_connected(&self, host: &str) -> Result<serde_json::Value> {
        poll(&format!("{host} connected"), WAIT, || {
            self.host(host).ok()?.filter(|h| h["connected"] == true)
        })
        .with_context(|| {
            format!(
                "hosts: {:?}\n--- agent ---\n{}\n--- coordinator ---\n{}",
                self.json(&["hosts"]).ok(),
                self.agent_log(host),
                self.logs(COORDINATOR)
            )
        })
    }

    /// Writes release `release` of service `web`: an artifact holding the
    /// sample service's binary (`bin/sample-service`) and its `service.conf`
    /// (port [`SERVICE_PORT`], `healthy`), and its spec targeting
    /// `role=web`; returns the spec's path in the coordinator container.
    pub fn write_release(&self, release: &str, healthy: bool) -> Result<String> {
        let art = format!("web-{release}.tar.gz");
        write_sample_artifact(
            &self.shared().join(&art),
            &format!("version={release}\nport={SERVICE_PORT}\nhealthy={healthy}\n"),
        )?;
        let spec = format!(
            r#"service = "web"
release = "{release}"

[artifact]
path = "{art}"

[run]
exec = ["./bin/sample-service"]
stop_timeout = "2s"

[[health]]
name = "http"
http = "http://127.0.0.1:{SERVICE_PORT}/health"
interval = "100ms"
timeout = "500ms"
failure_threshold = 2

[targets]
labels = {{ role = "web" }}

[strategy]
min_healthy_time = "300ms"
healthy_deadline = "5s"
commit_deadline = "2m"
"#
        );
        std::fs::write(self.shared().join(format!("{release}.toml")), spec)?;
        Ok(format!("{SHARED}/{release}.toml"))
    }

    /// `rollout deploy --wait SPEC`: the rollout's id when it succeeded.
    pub fn deploy_wait(&self, spec: &str) -> Result<String> {
        let out = self.cli(&["deploy", "--wait", spec])?;
        if !out.status.success() {
            bail!(
                "rollout deploy --wait {spec}: {}\n--- coordinator ---\n{}",
                text(&out),
                self.logs(COORDINATOR)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_string())
    }
}

impl Drop for VmLab {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.started {
                let host = c.strip_prefix(&format!("{}-", self.id)).unwrap_or(c);
                eprintln!("--- {host} (container {c}) log ---\n{}", self.logs(host));
            }
        }
        if !self.started.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(self.started.iter().map(String::as_str));
            if let Err(e) = docker(&args) {
                eprintln!("cleanup of lab {}: {e}", self.id);
            }
        }
        if self.network_created
            && let Err(e) = docker(&["network", "rm", &self.id])
        {
            eprintln!("cleanup of lab {}: {e}", self.id);
        }
    }
}

/// A tar.gz of a sample-service release: `bin/sample-service` (the
/// workspace's binary, mode 0755) and `service.conf` with `conf`.
pub fn write_sample_artifact(path: &Path, conf: &str) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        std::io::BufWriter::new(file),
        flate2::Compression::fast(),
    ));
    let mut add = |name: &str, mode: u32, data: &[u8]| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)?;
        Ok(())
    };
    add("service.conf", 0o644, conf.as_bytes())?;
    let sample = std::fs::read(bin("sample-service"))?;
    add("bin/sample-service", 0o755, &sample)?;
    use std::io::Write as _;
    tar.into_inner()?.finish()?.flush()?;
    Ok(())
}
