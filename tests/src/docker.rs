//! A fleet of real hosts: a coordinator and N agents, each in its own Docker
//! container on a private network, to cut off, freeze, crash and fill.
//!
//! * The image (`rollout-test:latest`) is built from scratch from the
//!   workspace's binaries by `deploy/docker/build-image.sh` (nothing is
//!   pulled), once per test process and only when the binaries are newer than
//!   the image; a file lock keeps parallel test processes from building twice.
//! * Each [`DockerFleet`] has its own `docker network create --internal`
//!   network: no route leaves the machine, and nothing is published on the
//!   host. The coordinator's container is reachable there as `coordinator`,
//!   each agent's as its host name (`h1`, `h2`, ...).
//! * The `rollout` CLI runs inside the coordinator container (`docker exec`)
//!   against `http://127.0.0.1:7443`; specs and artifacts are written to a
//!   host temp dir bind-mounted there at `/shared`.
//! * An agent container is a host: its main process (under `docker-init`)
//!   starts `rollout-agent run` detached and stays up, so the agent can be
//!   killed alone ([`DockerFleet::kill9_agent`], services keep running) or with
//!   the whole host ([`DockerFleet::kill9`], `docker kill -s KILL`). Its data
//!   directory `/var/lib/rollout` lives in the container (kept across
//!   `docker kill` + `docker start`), or on a size-limited tmpfs for
//!   [`AgentSpec::disk_limit`] (lost on a host restart).
//! * Both ends of every agent's connection ping it every
//!   [`KEEPALIVE_INTERVAL`] and give up after [`KEEPALIVE_TIMEOUT`] of silence
//!   (agent `[coordinator]`, coordinator `[agents]` settings), so a partition
//!   or a frozen host is noticed within seconds.
//! * [`DockerFleet::check_histories`] is the history checker every scenario
//!   ends with: the agents' own histories against the coordinator's record
//!   and event log ([`DockerFleet::events_contiguous`]).
//! * Everything is removed on drop, also when the test panics; containers and
//!   networks left by a test process that was killed are labelled with its pid
//!   and removed by the next test process.
//!
//! Without a Docker engine the tests fail with a clear message, unless
//! `ROLLOUT_SKIP_DOCKER=1` asks for them to be skipped.
//!
//! Every helper runs `docker` synchronously; waits poll until a deadline.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};

use crate::bin;

/// The image the fleet runs.
pub const IMAGE: &str = "rollout-test:latest";
/// Set to `1` to skip the Docker tests explicitly.
pub const SKIP_ENV: &str = "ROLLOUT_SKIP_DOCKER";
/// The coordinator's host name on the fleet network.
pub const COORDINATOR: &str = "coordinator";
/// The agents' data directory inside their containers.
pub const DATA_DIR: &str = "/var/lib/rollout";
/// The agents' admin socket inside their containers.
pub const ADMIN_SOCKET: &str = "/var/lib/rollout/admin.sock";
/// Where the fleet's shared dir (specs, artifacts) is mounted in the coordinator.
pub const SHARED: &str = "/shared";
/// The sample service's binary inside the image.
pub const SAMPLE_SERVICE: &str = "/usr/local/bin/sample-service";
/// The coordinator's port inside its container.
pub const COORDINATOR_PORT: u16 = 7443;
/// Default wait of the fleet helpers.
pub const WAIT: Duration = Duration::from_secs(30);
/// HTTP/2 keepalive interval on both ends of every agent's connection
/// (`[coordinator]` in the agents' configs, `[agents]` in the
/// coordinator's): a silent partition or a frozen host is noticed within
/// [`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`] (plus a ping period of
/// slack), not the 20 s of the defaults.
pub const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(1);
/// How long a keepalive ping may go unanswered in the fleet.
pub const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);

/// Label every container and network of a fleet carries: the test process's pid.
const OWNER_LABEL: &str = "rollout-test.owner";
/// The agent's pid inside its container.
const AGENT_PID_FILE: &str = "/run/rollout-agent.pid";
/// The file [`DockerFleet::fill_disk`] writes.
const FILL_FILE: &str = "/var/lib/rollout/fill";

/// Polls `cond` every 100 ms until it returns `Some`, or fails after `deadline`.
pub fn poll<T>(what: &str, deadline: Duration, mut cond: impl FnMut() -> Option<T>) -> Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond() {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `docker` with `args`; stdout (trimmed) on success, an error quoting
/// stderr otherwise.
pub fn docker(args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .context("run docker")?;
    if !out.status.success() {
        bail!(
            "docker {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Whether the Docker tests run: `false` (with a note on stderr) when
/// `ROLLOUT_SKIP_DOCKER=1`; a panic with the fix when no engine answers; else
/// the image is made current (once per process) and `true`.
pub fn docker_available() -> bool {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        eprintln!("SKIPPED: the Docker fault tests were skipped because {SKIP_ENV}=1");
        return false;
    }
    let info = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .stdin(Stdio::null())
        .output();
    match info {
        Ok(o) if o.status.success() => {}
        other => {
            let why = match other {
                Ok(o) => String::from_utf8_lossy(&o.stderr).trim().to_string(),
                Err(e) => format!("cannot run docker: {e}"),
            };
            panic!(
                "the multi-host fault tests need a Docker engine and `docker info` failed: {why}\n\
                 Start the Docker daemon (and make its socket usable by this user), or set \
                 {SKIP_ENV}=1 to skip these tests explicitly."
            );
        }
    }
    static READY: OnceLock<Result<(), String>> = OnceLock::new();
    if let Err(e) = READY.get_or_init(|| {
        remove_stale();
        ensure_image().map_err(|e| format!("{e:#}"))
    }) {
        panic!("building the test image failed: {e}");
    }
    true
}

/// The workspace root (the tests crate's parent).
fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Builds the image unless it is newer than the three binaries. Holds a file
/// lock in the target dir so concurrent test processes build it once.
fn ensure_image() -> Result<()> {
    let bins = ["rollout", "rollout-agent", "sample-service"].map(bin);
    let newest = bins
        .iter()
        .map(|b| std::fs::metadata(b).and_then(|m| m.modified()))
        .collect::<std::io::Result<Vec<_>>>()?
        .into_iter()
        .max()
        .unwrap_or(UNIX_EPOCH);
    let fresh = || image_created().is_some_and(|t| t >= newest);
    if fresh() {
        return Ok(());
    }
    let lock_path = crate::target_dir().join("rollout-test-image.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .with_context(|| format!("open {}", lock_path.display()))?;
    let _lock = nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("lock {}", lock_path.display()))?;
    if fresh() {
        return Ok(());
    }
    let script = workspace_root().join("deploy/docker/build-image.sh");
    let started = Instant::now();
    let out = Command::new("sh")
        .arg(&script)
        .arg("--bin-dir")
        .arg(crate::target_dir())
        .args(["--tag", IMAGE])
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
    eprintln!("built {IMAGE} in {:?}", started.elapsed());
    Ok(())
}

/// When the image was created, if it exists.
fn image_created() -> Option<SystemTime> {
    let s = docker(&["image", "inspect", "-f", "{{.Created}}", IMAGE]).ok()?;
    parse_rfc3339_utc(&s)
}

/// `2026-11-23T20:35:10.123456789Z` → time (UTC only, as Docker writes it).
fn parse_rfc3339_utc(s: &str) -> Option<SystemTime> {
    let s = s.trim().strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|x| x.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|x| x.parse::<u64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    let nanos: u32 = format!("{frac:0<9}").get(..9)?.parse().ok()?;
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = u64::try_from(era * 146_097 + doe - 719_468).ok()?;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    Some(UNIX_EPOCH + Duration::new(secs, nanos))
}

/// Removes containers and networks of test processes that no longer run.
fn remove_stale() {
    let dead = |owner: &str| {
        owner
            .parse::<u32>()
            .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    };
    let filter = format!("label={OWNER_LABEL}");
    let format = format!("{{{{.ID}}}} {{{{.Label \"{OWNER_LABEL}\"}}}}");
    if let Ok(list) = docker(&["ps", "-a", "--filter", &filter, "--format", &format]) {
        for line in list.lines() {
            if let Some((id, owner)) = line.split_once(' ')
                && dead(owner)
            {
                let _ = docker(&["rm", "-f", "-v", id]);
            }
        }
    }
    if let Ok(list) = docker(&["network", "ls", "--filter", &filter, "--format", &format]) {
        for line in list.lines() {
            if let Some((id, owner)) = line.split_once(' ')
                && dead(owner)
            {
                let _ = docker(&["network", "rm", id]);
            }
        }
    }
    // Their host dirs (`rollout-fleet-<pid>-*`), left when the process was killed.
    if let Ok(rd) = std::fs::read_dir(std::env::temp_dir()) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some((owner, _)) = name
                .strip_prefix("rollout-fleet-")
                .and_then(|r| r.split_once('-'))
                && dead(owner)
            {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

/// One agent host of a fleet.
#[derive(Debug, Clone)]
pub struct AgentSpec {
    /// Host name: the agent's `host`, the container's host name and its name on
    /// the network.
    pub host: String,
    /// `[labels]`.
    pub labels: Vec<(String, String)>,
    /// `[env]`; `PORT` is the sample service's port.
    pub env: Vec<(String, String)>,
    /// Puts the data directory on a tmpfs of this many bytes (for
    /// [`DockerFleet::fill_disk`]); its content does not survive a host restart.
    pub disk_limit: Option<u64>,
    /// Extra top-level config lines.
    pub extra: Vec<String>,
    /// `[testing] crash_at`.
    pub crash_at: Option<String>,
}

impl AgentSpec {
    /// `host` with label `role=web` and `PORT=8080`.
    pub fn new(host: &str) -> Self {
        AgentSpec {
            host: host.into(),
            labels: vec![("role".into(), "web".into())],
            env: vec![("PORT".into(), "8080".into())],
            disk_limit: None,
            extra: Vec::new(),
            crash_at: None,
        }
    }

    /// The sample service's port on this host.
    pub fn port(&self) -> u16 {
        self.env
            .iter()
            .find(|(k, _)| k == "PORT")
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or(8080)
    }

    fn config(&self) -> String {
        let mut c = format!(
            "host = {:?}\ndata_dir = {DATA_DIR:?}\nreport_interval = \"500ms\"\n",
            self.host
        );
        for line in &self.extra {
            c.push_str(line);
            c.push('\n');
        }
        c.push_str("[labels]\n");
        for (k, v) in &self.labels {
            c.push_str(&format!("{k} = {v:?}\n"));
        }
        c.push_str("[env]\n");
        for (k, v) in &self.env {
            c.push_str(&format!("{k} = {v:?}\n"));
        }
        c.push_str(&format!(
            "[coordinator]\nurl = \"http://{COORDINATOR}:{COORDINATOR_PORT}\"\ninsecure_dev = true\n\
             reconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n\
             keepalive_interval = \"{}ms\"\nkeepalive_timeout = \"{}ms\"\n",
            KEEPALIVE_INTERVAL.as_millis(),
            KEEPALIVE_TIMEOUT.as_millis()
        ));
        if let Some(p) = &self.crash_at {
            c.push_str(&format!("[testing]\ncrash_at = {p:?}\n"));
        }
        c.push_str("[log]\nlevel = \"info,rollout_agent=debug\"\n");
        c
    }
}

/// The hosts of a fleet: `h1..hN` by default.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// The agents, in order.
    pub agents: Vec<AgentSpec>,
    /// Extra lines appended to `coordinator.toml` (e.g. `[testing]` and
    /// `crash_at = "..."`); see also [`DockerFleet::set_coordinator_extra`].
    pub coordinator_extra: Vec<String>,
}

impl FleetOptions {
    /// `n` agents `h1..hN`, each `role=web`, `PORT=8080`.
    pub fn new(n: usize) -> Self {
        FleetOptions {
            agents: (1..=n).map(|i| AgentSpec::new(&format!("h{i}"))).collect(),
            coordinator_extra: Vec::new(),
        }
    }

    /// The agent named `host` (panics if there is none: a test bug).
    pub fn agent(&mut self, host: &str) -> &mut AgentSpec {
        self.agents
            .iter_mut()
            .find(|a| a.host == host)
            .unwrap_or_else(|| panic!("no agent {host}"))
    }
}

/// Starts the host's agent detached, so the container's init reaps it, with
/// its output on the container's log.
const START_AGENT: &str = "#!/bin/sh\n\
( rollout-agent run --config /etc/rollout/agent.toml >>/proc/1/fd/1 2>&1 & echo $! >/run/rollout-agent.pid )\n";

/// The host's main process: start the agent, then stay up.
const BOOT: &str = "#!/bin/sh\n\
mkdir -p /var/lib/rollout /run\n\
sh /etc/rollout/start-agent.sh\n\
while :; do sleep 3600; done\n";

/// A coordinator container and agent containers on a private network.
#[derive(Debug)]
pub struct DockerFleet {
    /// Prefix of every container name; also the network's name.
    pub id: String,
    /// The agents as configured.
    pub agents: Vec<AgentSpec>,
    /// Host dir bind-mounted at [`SHARED`] in the coordinator: its config,
    /// `work/` (specs, artifacts) and `hosts/<host>/` (each agent's
    /// `/etc/rollout`).
    pub dir: tempfile::TempDir,
    started: Vec<String>,
    network_created: bool,
    paused: Mutex<BTreeSet<String>>,
}

static FLEETS: AtomicU32 = AtomicU32::new(0);

impl DockerFleet {
    /// Starts the fleet and waits until every agent is connected; `None` when
    /// the Docker tests are skipped (see [`docker_available`]).
    pub fn start(opts: FleetOptions) -> Result<Option<DockerFleet>> {
        if !docker_available() {
            return Ok(None);
        }
        let started = Instant::now();
        let n = FLEETS.fetch_add(1, Ordering::SeqCst);
        let mut f = DockerFleet {
            id: format!("rt{}-{n}", std::process::id()),
            agents: opts.agents,
            dir: tempfile::Builder::new()
                .prefix(&format!("rollout-fleet-{}-", std::process::id()))
                .tempdir()?,
            started: Vec::new(),
            network_created: false,
            paused: Mutex::new(BTreeSet::new()),
        };
        let owner = format!("{OWNER_LABEL}={}", std::process::id());
        docker(&["network", "create", "--internal", "--label", &owner, &f.id])?;
        f.network_created = true;
        std::fs::create_dir_all(f.dir.path().join("work"))?;
        f.set_coordinator_extra(&opts.coordinator_extra)?;
        let shared = format!("{}:{SHARED}", f.dir.path().display());
        let mut runs = vec![(
            COORDINATOR.to_string(),
            f.run_args(COORDINATOR, &["-v", &shared]),
            vec![
                "-c".to_string(),
                format!("exec rollout --insecure-dev serve --config {SHARED}/coordinator.toml"),
            ],
        )];
        for a in &f.agents {
            let hdir = f.host_dir(&a.host);
            std::fs::create_dir_all(&hdir)?;
            std::fs::write(hdir.join("agent.toml"), a.config())?;
            std::fs::write(hdir.join("start-agent.sh"), START_AGENT)?;
            std::fs::write(hdir.join("boot.sh"), BOOT)?;
            let etc = format!("{}:/etc/rollout:ro", hdir.display());
            let mut extra = vec!["-v".to_string(), etc];
            if let Some(bytes) = a.disk_limit {
                extra.push("--mount".into());
                extra.push(format!(
                    "type=tmpfs,destination={DATA_DIR},tmpfs-size={bytes}"
                ));
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            runs.push((
                a.host.clone(),
                f.run_args(&a.host, &extra),
                vec!["/etc/rollout/boot.sh".to_string()],
            ));
        }
        // All containers at once: `docker run` is mostly waiting.
        let mut children = Vec::new();
        for (host, args, cmd) in runs {
            let child = Command::new("docker")
                .args(&args)
                .arg(IMAGE)
                .args(&cmd)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .context("spawn docker run")?;
            f.started.push(f.container(&host));
            children.push((host, child));
        }
        for (host, child) in children {
            let out = child.wait_with_output()?;
            ensure!(
                out.status.success(),
                "docker run {host} failed: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        f.wait_coordinator()?;
        for a in &f.agents {
            f.wait_agent(&a.host)?;
        }
        f.wait_connected(&f.hosts())?;
        eprintln!(
            "fleet {} ({} agents) up in {:?}",
            f.id,
            f.agents.len(),
            started.elapsed()
        );
        Ok(Some(f))
    }

    fn run_args(&self, host: &str, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
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
            // Enough for a debug agent, its services and sled.
            "--memory",
            "512m",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    /// Rewrites the coordinator's config with `extra` lines appended (they
    /// take effect at its next start, e.g. [`DockerFleet::restart`]).
    pub fn set_coordinator_extra(&self, extra: &[String]) -> Result<()> {
        let mut c = format!(
            "listen = \"0.0.0.0:{COORDINATOR_PORT}\"\ndata_dir = \"/var/lib/rollout-coordinator\"\n\
             [agents]\nkeepalive_interval = \"{}ms\"\nkeepalive_timeout = \"{}ms\"\n\
             [log]\nlevel = \"info,rollout_coordinator=debug\"\n",
            KEEPALIVE_INTERVAL.as_millis(),
            KEEPALIVE_TIMEOUT.as_millis()
        );
        for line in extra {
            c.push_str(line);
            c.push('\n');
        }
        std::fs::write(self.dir.path().join("coordinator.toml"), c)?;
        Ok(())
    }

    /// The agents' host names, in order.
    pub fn hosts(&self) -> Vec<String> {
        self.agents.iter().map(|a| a.host.clone()).collect()
    }

    /// The container of `host` (an agent's name or [`COORDINATOR`]).
    pub fn container(&self, host: &str) -> String {
        format!("{}-{host}", self.id)
    }

    /// Host dir mounted at `/etc/rollout` in `host`'s container (its
    /// `agent.toml` can be rewritten before [`DockerFleet::start_agent`]).
    pub fn host_dir(&self, host: &str) -> PathBuf {
        self.dir.path().join("hosts").join(host)
    }

    /// The spec of agent `host`.
    pub fn agent(&self, host: &str) -> Result<&AgentSpec> {
        self.agents
            .iter()
            .find(|a| a.host == host)
            .with_context(|| format!("no agent {host} in fleet {}", self.id))
    }

    // ----- faults -----

    /// `docker kill -s KILL`: the whole host dies at once (agent, services).
    pub fn kill9(&self, host: &str) -> Result<()> {
        docker(&["kill", "-s", "KILL", &self.container(host)])?;
        Ok(())
    }

    /// `docker start` after [`DockerFleet::kill9`]: the host boots and starts
    /// its agent (or the coordinator); waits until it answers.
    pub fn restart(&self, host: &str) -> Result<()> {
        docker(&["start", &self.container(host)])?;
        if host == COORDINATOR {
            self.wait_coordinator()
        } else {
            self.wait_agent(host)
        }
    }

    /// SIGKILL of the agent process only; its services keep running.
    pub fn kill9_agent(&self, host: &str) -> Result<()> {
        self.sh(host, &format!("kill -9 $(cat {AGENT_PID_FILE})"))?;
        Ok(())
    }

    /// Starts the agent of a running host again (after
    /// [`DockerFleet::kill9_agent`] or a crash point); waits for its socket.
    pub fn start_agent(&self, host: &str) -> Result<()> {
        self.sh(host, "sh /etc/rollout/start-agent.sh")?;
        self.wait_agent(host)
    }

    /// Whether the agent process of `host` runs.
    pub fn agent_running(&self, host: &str) -> bool {
        self.sh(
            host,
            &format!("kill -0 $(cat {AGENT_PID_FILE}) && ! grep -q '^State:.*Z' /proc/$(cat {AGENT_PID_FILE})/status"),
        )
        .is_ok()
    }

    /// `docker pause`: every process of the host frozen (cgroup freezer).
    pub fn pause(&self, host: &str) -> Result<()> {
        docker(&["pause", &self.container(host)])?;
        self.lock_paused().insert(host.to_string());
        Ok(())
    }

    /// `docker unpause`.
    pub fn unpause(&self, host: &str) -> Result<()> {
        docker(&["unpause", &self.container(host)])?;
        self.lock_paused().remove(host);
        Ok(())
    }

    fn lock_paused(&self) -> std::sync::MutexGuard<'_, BTreeSet<String>> {
        self.paused.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Disconnects the host from the fleet network: it keeps running with
    /// only its loopback.
    pub fn partition(&self, host: &str) -> Result<()> {
        docker(&["network", "disconnect", &self.id, &self.container(host)])?;
        Ok(())
    }

    /// Connects the host again, under its name.
    pub fn heal(&self, host: &str) -> Result<()> {
        docker(&[
            "network",
            "connect",
            "--alias",
            host,
            &self.id,
            &self.container(host),
        ])?;
        Ok(())
    }

    /// Fills the host's data directory (it needs
    /// [`AgentSpec::disk_limit`]) until at most `leave` bytes are free;
    /// returns the bytes left free.
    pub fn fill_disk(&self, host: &str, leave: u64) -> Result<u64> {
        ensure!(
            self.agent(host)?.disk_limit.is_some(),
            "fill_disk({host}) needs a disk_limit: it would fill the machine's disk"
        );
        let avail = self.disk_free(host)?;
        let mib = avail.saturating_sub(leave).div_ceil(1 << 20);
        if mib > 0 {
            // dd stops at ENOSPC when the last MiB does not fit; that is fine.
            let _ = self.exec(
                host,
                &[
                    "dd",
                    "if=/dev/zero",
                    &format!("of={FILL_FILE}"),
                    "bs=1048576",
                    &format!("count={mib}"),
                ],
            )?;
        }
        self.disk_free(host)
    }

    /// Removes what [`DockerFleet::fill_disk`] wrote.
    pub fn free_disk(&self, host: &str) -> Result<()> {
        self.sh(host, &format!("rm -f {FILL_FILE}"))?;
        Ok(())
    }

    /// Bytes free under the host's data directory.
    pub fn disk_free(&self, host: &str) -> Result<u64> {
        let out = self.sh(host, &format!("df -k {DATA_DIR} | tail -n 1"))?;
        let kib: u64 = out
            .split_whitespace()
            .nth(3)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("df output: {out}"))?;
        Ok(kib * 1024)
    }

    // ----- commands on hosts -----

    /// `docker exec <host> argv...`.
    pub fn exec(&self, host: &str, argv: &[&str]) -> Result<Output> {
        Command::new("docker")
            .arg("exec")
            .arg(self.container(host))
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .context("run docker exec")
    }

    /// `sh -c script` on the host; stdout, or an error with stderr.
    pub fn sh(&self, host: &str, script: &str) -> Result<String> {
        let out = self.exec(host, &["sh", "-c", script])?;
        ensure!(
            out.status.success(),
            "{host}: `{script}` failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            String::from_utf8_lossy(&out.stdout).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// The container's log (the agent's or coordinator's output), last lines.
    pub fn logs(&self, host: &str) -> String {
        Command::new("docker")
            .args(["logs", "--tail", "150", &self.container(host)])
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

    // ----- the agents' own view -----

    /// `rollout-agent status --output json` on the host.
    pub fn agent_status(&self, host: &str) -> Result<serde_json::Value> {
        let out = self.sh(
            host,
            &format!("rollout-agent status --output json --socket {ADMIN_SOCKET}"),
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// The host's report of `service` (`current`, `phase`, ...), if it has it.
    pub fn agent_service(&self, host: &str, service: &str) -> Result<Option<serde_json::Value>> {
        let st = self.agent_status(host)?;
        Ok(st["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["service"] == service)
            .cloned())
    }

    /// `rollout-agent releases <service> --output json` on the host: its
    /// releases and its own history.
    pub fn agent_releases(&self, host: &str, service: &str) -> Result<serde_json::Value> {
        let out = self.sh(
            host,
            &format!("rollout-agent releases {service} --output json --socket {ADMIN_SOCKET}"),
        )?;
        Ok(serde_json::from_str(&out)?)
    }

    /// Entries of the service's releases directory on the host (`-A`: the
    /// dot-named markers and staging dirs too).
    pub fn release_dirs(&self, host: &str, service: &str) -> Result<Vec<String>> {
        let out = self.sh(
            host,
            &format!("ls -A {DATA_DIR}/services/{service}/releases 2>/dev/null || true"),
        )?;
        Ok(out.lines().map(str::to_string).collect())
    }

    /// The version the sample service on `host` reports, if it answers.
    pub fn served_version(&self, host: &str) -> Option<String> {
        let port = self.agent(host).ok()?.port();
        self.sh(
            host,
            // busybox-static 1.35 wget crashes with -T: time it out with `timeout`.
            &format!("timeout 3 wget -q -O - http://127.0.0.1:{port}/version"),
        )
        .ok()
        .map(|s| s.trim().to_string())
    }

    /// Waits until the sample service on every listed host serves `version`.
    pub fn wait_serving(&self, hosts: &[&str], version: &str) -> Result<()> {
        for h in hosts {
            poll(&format!("{h} serving {version}"), WAIT, || {
                (self.served_version(h).as_deref() == Some(version)).then_some(())
            })
            .with_context(|| format!("now {:?}", self.served_version(h)))?;
        }
        Ok(())
    }

    /// Waits until the agent of `host` answers on its admin socket.
    pub fn wait_agent(&self, host: &str) -> Result<()> {
        poll(&format!("{host}'s agent to answer"), WAIT, || {
            self.agent_status(host).ok().map(|_| ())
        })
        .with_context(|| self.logs(host))
    }

    // ----- the coordinator, through the CLI in its container -----

    /// Runs `rollout <args>` in the coordinator container.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let url = format!("http://127.0.0.1:{COORDINATOR_PORT}");
        let mut argv = vec!["rollout", "--insecure-dev", "--coordinator", &url];
        argv.extend_from_slice(args);
        self.exec(COORDINATOR, &argv)
    }

    /// `rollout --output json <args>`, parsed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let out = self.cli(&a)?;
        ensure!(
            out.status.success(),
            "rollout {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Waits until the coordinator answers the CLI.
    pub fn wait_coordinator(&self) -> Result<()> {
        poll("the coordinator to answer", WAIT, || {
            self.json(&["hosts"]).ok().map(|_| ())
        })
        .with_context(|| self.logs(COORDINATOR))
    }

    /// Whether the coordinator lists `host` as connected.
    pub fn connected(&self, host: &str) -> bool {
        self.json(&["hosts"]).is_ok_and(|v| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|h| h["host"] == host && h["connected"] == true)
        })
    }

    /// Waits until the coordinator lists every host in `hosts` as connected.
    pub fn wait_connected(&self, hosts: &[String]) -> Result<()> {
        poll("agents connected to the coordinator", WAIT, || {
            let v = self.json(&["hosts"]).ok()?;
            let up: BTreeSet<&str> = v
                .as_array()?
                .iter()
                .filter(|h| h["connected"] == true)
                .filter_map(|h| h["host"].as_str())
                .collect();
            hosts.iter().all(|h| up.contains(h.as_str())).then_some(())
        })
        .with_context(|| format!("hosts: {:?}", self.json(&["hosts"]).ok()))
    }

    /// Writes the artifact and spec of sample-service release `release` of
    /// service `web` into the shared dir; returns the spec's path in the
    /// coordinator container. `conf` are extra `service.conf` lines; `payload`
    /// bytes of zeros are added to the release (they compress to almost
    /// nothing but take that much room unpacked); `strategy` are `[strategy]`
    /// keys with TOML values, overriding the test defaults
    /// (`min_healthy_time = "300ms"`, `healthy_deadline = "5s"`,
    /// `commit_deadline = "2m"`).
    pub fn write_spec(
        &self,
        release: &str,
        conf: &[&str],
        payload: u64,
        strategy: &[(&str, &str)],
    ) -> Result<String> {
        let work = self.dir.path().join("work");
        let art = format!("web-{release}.tar.gz");
        let mut lines = vec![format!("version={release}")];
        lines.extend(conf.iter().map(|s| s.to_string()));
        write_artifact(&work.join(&art), &lines.join("\n"), payload)?;
        let mut strat: BTreeMap<&str, &str> = [
            ("min_healthy_time", "\"300ms\""),
            ("healthy_deadline", "\"5s\""),
            ("commit_deadline", "\"2m\""),
        ]
        .into_iter()
        .collect();
        strat.extend(strategy.iter().copied());
        let mut spec = format!(
            r#"service = "web"
release = "{release}"

[artifact]
path = "{art}"

[run]
exec = ["{SAMPLE_SERVICE}", "--port", "${{PORT}}"]
stop_timeout = "2s"

[[health]]
name = "http"
http = "http://127.0.0.1:${{PORT}}/health"
interval = "100ms"
timeout = "500ms"
failure_threshold = 2

[targets]
labels = {{ role = "web" }}

[strategy]
"#
        );
        for (k, v) in strat {
            spec.push_str(&format!("{k} = {v}\n"));
        }
        std::fs::write(work.join(format!("{release}.toml")), spec)?;
        Ok(format!("{SHARED}/work/{release}.toml"))
    }

    /// `rollout deploy <spec>`: the rollout id.
    pub fn deploy(&self, spec: &str) -> Result<String> {
        let v = self.json(&["deploy", spec])?;
        v["rollout_id"]
            .as_str()
            .map(str::to_string)
            .with_context(|| format!("no rollout_id in {v}"))
    }

    /// `rollout deploy --wait <spec>`: (success, stdout, stderr); the id is
    /// the first line of stdout.
    pub fn deploy_wait(&self, spec: &str) -> Result<(bool, String, String)> {
        let out = self.cli(&["deploy", "--wait", spec])?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// `rollout status <id>`: the rollout.
    pub fn status(&self, id: &str) -> Result<serde_json::Value> {
        let v = self.json(&["status", id])?;
        Ok(v.get(0).cloned().unwrap_or(v))
    }

    /// The coordinator's record of `host` in rollout `id` (`state`,
    /// `failure`, `reason`, ...).
    pub fn host_progress(&self, id: &str, host: &str) -> Result<serde_json::Value> {
        let s = self.status(id)?;
        s["batches"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|b| b["hosts"].as_array().into_iter().flatten())
            .find(|h| h["host"] == host)
            .cloned()
            .with_context(|| format!("{host} is not in rollout {id}: {s}"))
    }

    /// `rollout events <id>`.
    pub fn events(&self, id: &str) -> Result<Vec<serde_json::Value>> {
        let v = self.json(&["events", id])?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }

    /// Waits until rollout `id` is in `state`.
    pub fn wait_state(
        &self,
        id: &str,
        state: &str,
        deadline: Duration,
    ) -> Result<serde_json::Value> {
        poll(&format!("rollout {id} {state}"), deadline, || {
            self.status(id).ok().filter(|s| s["state"] == state)
        })
        .with_context(|| {
            format!(
                "now {:?}\n--- coordinator log ---\n{}",
                self.status(id).ok(),
                self.logs(COORDINATOR)
            )
        })
    }

    /// The coordinator's event log of rollout `id`, checked for loss: every
    /// event has a `seq`, and they run without gap or duplicate.
    pub fn events_contiguous(&self, id: &str) -> Result<Vec<serde_json::Value>> {
        let events = self.events(id)?;
        let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
        ensure!(
            seqs.len() == events.len(),
            "events of {id} without seq: {events:?}"
        );
        ensure!(
            seqs.windows(2).all(|w| w[1] == w[0] + 1),
            "event log of {id} has gaps or duplicates: {seqs:?}"
        );
        Ok(events)
    }

    /// The history checker. Collects every agent's own history of `service`
    /// and the coordinator's record and event log of each rollout in
    /// `rollouts` (oldest first), and checks the fleet invariants:
    ///
    /// * each host activated at most once per rollout (its own history: one
    ///   `activating` with that rollout as cause at most), and its history's
    ///   `seq` strictly increases (nothing reordered or written twice);
    /// * every host that has the service is idle on a release it committed or
    ///   on its last known good one;
    /// * every rollout is finished (a running one cannot be judged) and its
    ///   event log has no gap or duplicate (no event lost);
    /// * a host a rollout reports `committed` committed that release in its
    ///   own history; and when the newest rollout is reported `succeeded`,
    ///   every host it reports committed is on its release now (no success
    ///   is reported with a host elsewhere).
    ///
    /// Returns each host's `releases` document.
    pub fn check_histories(
        &self,
        service: &str,
        rollouts: &[&str],
    ) -> Result<BTreeMap<String, serde_json::Value>> {
        let mut all = BTreeMap::new();
        let mut current = BTreeMap::new();
        for h in self.hosts() {
            let doc = self.agent_releases(&h, service)?;
            let hist = doc["history"].as_array().cloned().unwrap_or_default();
            for id in rollouts {
                let n = hist
                    .iter()
                    .filter(|e| e["event"] == "activating" && e["cause"] == *id)
                    .count();
                ensure!(n <= 1, "{h} activated {n} times for rollout {id}: {doc:#}");
            }
            let seqs: Vec<u64> = hist.iter().filter_map(|e| e["seq"].as_u64()).collect();
            ensure!(
                seqs.len() == hist.len() && seqs.windows(2).all(|w| w[0] < w[1]),
                "{h}'s history is not in strictly increasing seq order: {seqs:?}"
            );
            if let Some(s) = self.agent_service(&h, service)? {
                let cur = s["current"].as_str().unwrap_or_default().to_string();
                let committed = hist
                    .iter()
                    .any(|e| e["event"] == "committed" && e["release"] == cur.as_str());
                ensure!(
                    s["phase"] == "idle" && (committed || s["last_known_good"] == cur.as_str()),
                    "{h} ends on {cur} in phase {}, neither committed nor last known good \
                     ({}): {doc:#}",
                    s["phase"],
                    s["last_known_good"]
                );
                current.insert(h.clone(), cur);
            }
            all.insert(h, doc);
        }
        for (i, id) in rollouts.iter().enumerate() {
            let st = self.status(id)?;
            let state = st["state"].as_str().unwrap_or_default();
            ensure!(
                ["succeeded", "failed", "rolled_back", "aborted"].contains(&state),
                "rollout {id} is still {state}: it cannot be judged yet: {st}"
            );
            self.events_contiguous(id)?;
            let release = st["release"].as_str().unwrap_or_default();
            let newest = i + 1 == rollouts.len();
            let hosts = st["batches"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|b| b["hosts"].as_array().into_iter().flatten());
            for p in hosts.filter(|p| p["state"] == "committed") {
                let h = p["host"].as_str().unwrap_or_default();
                let Some(doc) = all.get(h) else { continue };
                ensure!(
                    doc["history"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| { e["event"] == "committed" && e["release"] == release }),
                    "rollout {id} reports {h} committed on {release}, but {h}'s own history \
                     never committed it: {doc:#}"
                );
                if newest && state == "succeeded" {
                    ensure!(
                        current.get(h).map(String::as_str) == Some(release),
                        "rollout {id} succeeded with {h} committed on {release}, but {h} is on \
                         {:?}: {st}",
                        current.get(h)
                    );
                }
            }
        }
        Ok(all)
    }
}

impl Drop for DockerFleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in &self.started {
                let host = c.strip_prefix(&format!("{}-", self.id)).unwrap_or(c);
                eprintln!("--- {host} (container {c}) log ---\n{}", self.logs(host));
            }
        }
        // A frozen container cannot be removed on every engine: thaw first.
        let paused: Vec<String> = self.lock_paused().iter().cloned().collect();
        for h in paused {
            let _ = docker(&["unpause", &self.container(&h)]);
        }
        if !self.started.is_empty() {
            let mut args = vec!["rm", "-f", "-v"];
            args.extend(self.started.iter().map(String::as_str));
            if let Err(e) = docker(&args) {
                eprintln!("cleanup of fleet {}: {e}", self.id);
            }
        }
        // The engine may still be detaching the removed containers' endpoints
        // ("has active endpoints"): retry for a few seconds.
        if self.network_created
            && let Err(e) = poll("the fleet network removed", Duration::from_secs(10), || {
                docker(&["network", "rm", &self.id]).ok()
            })
        {
            eprintln!("cleanup of fleet {}: {e}", self.id);
        }
    }
}

/// A tar.gz of a sample-service release: `service.conf` with `conf`, a small
/// page and, when `payload > 0`, `static/blob.bin` of that many zero bytes.
pub fn write_artifact(path: &Path, conf: &str, payload: u64) -> Result<()> {
    let file = std::fs::File::create(path)?;
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        std::io::BufWriter::new(file),
        flate2::Compression::default(),
    ));
    let mut add = |name: &str, size: u64, data: &mut dyn std::io::Read| -> Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, data)?;
        Ok(())
    };
    let conf = format!("{conf}\n");
    add("service.conf", conf.len() as u64, &mut conf.as_bytes())?;
    let page = b"<h1>sample</h1>\n";
    add("static/index.html", page.len() as u64, &mut &page[..])?;
    if payload > 0 {
        add(
            "static/blob.bin",
            payload,
            &mut std::io::Read::take(std::io::repeat(0), payload),
        )?;
    }
    tar.into_inner()?.finish()?.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_timestamps_parse() {
        let t = parse_rfc3339_utc("2026-11-23T20:35:10.5Z").expect("parse");
        let d = t.duration_since(UNIX_EPOCH).expect("after epoch");
        assert_eq!(d.as_secs(), 1_795_466_110);
        assert_eq!(d.subsec_millis(), 500);
        assert_eq!(parse_rfc3339_utc("1970-01-01T00:00:00Z"), Some(UNIX_EPOCH));
        assert!(parse_rfc3339_utc("2026-11-23 20:35:10").is_none());
    }
}
