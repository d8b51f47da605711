//! Test harness: starts real `rollout-agent` processes on this machine and
//! drives them through a fake coordinator that speaks the real
//! `AgentService` protocol, and through the agents' admin sockets.
//!
//! The binaries come from the workspace's target directory; build them first
//! with `cargo build --workspace` (the README's test command does).
//!
//! Nothing here sleeps and hopes: waits poll a condition until a deadline.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod coordinator;
pub mod docker;
pub mod flap;
pub mod join_harness;
pub mod proxy;
pub mod tls_cluster;
pub mod vm;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rollout_proto::pb;
use sha2::Digest as _;

pub use coordinator::FakeCoordinator;

/// How long any wait in the harness may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(30);

static BIN_DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();

/// Makes [`bin`] (and so every harness here) run the binaries in `dir`
/// instead of those next to the running executable, e.g. `target/release`
/// for the benchmarks. Only the first call counts.
pub fn set_bin_dir(dir: PathBuf) {
    let _ = BIN_DIR.set(dir);
}

/// The workspace's `target/debug` (or wherever this test binary was built),
/// unless [`set_bin_dir`] chose another directory.
pub fn target_dir() -> PathBuf {
    if let Some(dir) = BIN_DIR.get() {
        return dir.clone();
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/debug/deps/<test> -> target/debug
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// Path of a workspace binary; fails with the fix when it is not built.
pub fn bin(name: &str) -> PathBuf {
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is missing: run `cargo build --workspace` before the tests",
        p.display()
    );
    p
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    free_ports(1)[0]
}

/// `n` distinct free TCP ports on 127.0.0.1: all are bound at once before
/// any is released, so no two are the same (separate [`free_port`] calls can
/// return one port twice, and two services of a fleet would then share it).
///
/// They are taken below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`) when it leaves room: a port
/// from that range, free when picked, can be handed to another socket (the
/// source port of any outgoing connection of the tests running alongside)
/// before the service meant for it binds it, and that service then fails to
/// start. Below the range only an explicit bind takes a port.
pub fn free_ports(n: usize) -> Vec<u16> {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    const FLOOR: u16 = 10_000;
    if low <= FLOOR + 1_000 {
        return ephemeral_ports(n);
    }
    // A start that differs between the test processes running at once.
    let span = u32::from(low - FLOOR);
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut held = Vec::new();
    for k in 0..span {
        if held.len() == n {
            break;
        }
        let port = FLOOR + u16::try_from((seed.wrapping_add(k)) % span).unwrap_or(0);
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
        }
    }
    if held.len() < n {
        return ephemeral_ports(n);
    }
    held.iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// `n` distinct ports the kernel picks (in its ephemeral range).
fn ephemeral_ports(n: usize) -> Vec<u16> {
    let held: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0"))
        .collect();
    held.iter()
        .map(|l| l.local_addr().expect("local address").port())
        .collect()
}

/// Polls `cond` every 50 ms until it returns `Some`, or fails after `deadline`.
pub async fn eventually<T>(
    what: &str,
    deadline: Duration,
    mut cond: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A tar.gz of the sample service's release: a `service.conf` with the given
/// lines (e.g. `version=v2`, `healthy=false`) and a small payload file.
pub fn sample_artifact(conf: &[&str]) -> Vec<u8> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut add = |path: &str, data: &[u8], mode: u32| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(mode);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, path, data).expect("append");
    };
    let mut text = conf.join("\n");
    text.push('\n');
    add("service.conf", text.as_bytes(), 0o644);
    add("static/index.html", b"<h1>sample</h1>\n", 0o644);
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .expect("finish archive")
}

/// `sha256:<hex>` of bytes.
pub fn digest_of(data: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(data)))
}

/// A definition of the sample service: exec supervision, an HTTP health
/// check on `/health`, short timings suited to tests.
pub fn sample_definition(
    service: &str,
    release: &str,
    digest: &str,
    port: u16,
) -> pb::ServiceDefinition {
    pb::ServiceDefinition {
        service: service.into(),
        release: release.into(),
        artifact: Some(pb::Artifact {
            digest: digest.into(),
            size: 0,
            signature: String::new(),
        }),
        supervision: Some(pb::service_definition::Supervision::Exec(
            pb::ExecSupervision {
                argv: vec![
                    bin("sample-service").display().to_string(),
                    "--port".into(),
                    port.to_string(),
                ],
                restart: pb::RestartPolicy::OnFailure as i32,
                stop_timeout_ms: 2000,
            },
        )),
        env: HashMap::new(),
        hooks: None,
        health_checks: vec![pb::HealthCheck {
            name: "http".into(),
            kind: Some(pb::health_check::Kind::Http(pb::HttpCheck {
                url: format!("http://127.0.0.1:{port}/health"),
                expect_status: 200,
                body_contains: String::new(),
            })),
            interval_ms: 100,
            timeout_ms: 500,
            failure_threshold: 2,
            success_threshold: 1,
        }],
        thresholds: None,
        min_healthy_time_ms: 300,
        healthy_deadline_ms: 4000,
        commit_deadline_ms: 60_000,
    }
}

/// GET `path` from 127.0.0.1:`port`; the body, or `None` when nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    if !head.starts_with("HTTP/1.1 200") && !head.starts_with("HTTP/1.0 200") {
        return None;
    }
    Some(body.to_string())
}

/// The version the sample service on `port` reports, if it answers.
pub fn served_version(port: u16) -> Option<String> {
    http_get(port, "/version").map(|b| b.trim().to_string())
}

/// Options of one agent process.
#[derive(Debug, Clone)]
pub struct AgentOptions {
    /// Host name.
    pub host: String,
    /// `http://127.0.0.1:port` of the coordinator, if any.
    pub coordinator: Option<String>,
    /// Test-only crash point.
    pub crash_at: Option<String>,
    /// Releases kept.
    pub retain: usize,
    /// Host environment (`[env]`), e.g. the sample service's `PORT`.
    pub env: Vec<(String, String)>,
    /// Labels.
    pub labels: Vec<(String, String)>,
    /// Extra top-level config lines, e.g. `trusted_keys = [...]`.
    pub extra: Vec<String>,
    /// Runs the agent in its own user and mount namespace (`unshare -rm`)
    /// with its data directory on a tmpfs of this many bytes: a small disk
    /// to fill ([`Agent::fill_disk`]), gone with the process (its content
    /// does not survive an agent restart). The admin socket moves out of the
    /// data directory; [`Agent::seen_data_dir`] reads the tmpfs.
    pub data_tmpfs: Option<u64>,
}

impl AgentOptions {
    /// Options for `host` talking to `coordinator`.
    pub fn new(host: &str, coordinator: Option<String>) -> Self {
        AgentOptions {
            host: host.into(),
            coordinator,
            crash_at: None,
            retain: 5,
            env: Vec::new(),
            labels: Vec::new(),
            extra: Vec::new(),
            data_tmpfs: None,
        }
    }
}

/// A real `rollout-agent` process with its own data directory.
#[derive(Debug)]
pub struct Agent {
    /// Its options.
    pub opts: AgentOptions,
    /// Temp dir holding data dir, config and log.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Agent {
    /// Writes a config and starts the agent; waits for its admin socket.
    pub async fn start(opts: AgentOptions) -> Result<Agent> {
        let dir = tempfile::tempdir()?;
        let mut a = Agent {
            opts,
            dir,
            child: None,
        };
        a.spawn().await?;
        Ok(a)
    }

    /// The agent's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The admin socket.
    pub fn socket(&self) -> PathBuf {
        if self.opts.data_tmpfs.is_some() {
            self.dir.path().join("admin.sock")
        } else {
            self.data_dir().join("admin.sock")
        }
    }

    /// The agent's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The data directory as the agent sees it: through its own mount
    /// namespace with [`AgentOptions::data_tmpfs`] (while it runs).
    pub fn seen_data_dir(&self) -> PathBuf {
        match (self.opts.data_tmpfs, self.pid()) {
            (Some(_), Some(pid)) => PathBuf::from(format!("/proc/{pid}/root")).join(
                self.data_dir()
                    .strip_prefix("/")
                    .unwrap_or(&self.data_dir()),
            ),
            _ => self.data_dir(),
        }
    }

    /// Fills the agent's tmpfs ([`AgentOptions::data_tmpfs`]) until at most
    /// `leave` bytes are free; returns the bytes left free.
    pub fn fill_disk(&self, leave: u64) -> Result<u64> {
        ensure!(
            self.opts.data_tmpfs.is_some() && self.pid().is_some(),
            "fill_disk needs a running agent with data_tmpfs: it would fill the machine's disk"
        );
        let dir = self.seen_data_dir();
        let free = || -> Result<u64> {
            let st = nix::sys::statvfs::statvfs(&dir)?;
            Ok(st.blocks_available() * st.fragment_size())
        };
        let mut f = std::fs::File::create(dir.join("fill"))?;
        let chunk = vec![0u8; 1 << 20];
        // Bounded: the tmpfs holds at most data_tmpfs bytes.
        for _ in 0..self.opts.data_tmpfs.unwrap_or(0).div_ceil(1 << 20) + 1 {
            let now = free()?;
            if now <= leave {
                break;
            }
            let n = usize::try_from((now - leave).min(1 << 20))?;
            f.write_all(&chunk[..n])?;
            f.sync_all()?;
        }
        free()
    }

    /// The config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("agent.toml")
    }

    fn write_config(&self) -> Result<()> {
        let mut c = format!(
            "host = {:?}\ndata_dir = {:?}\nretain_releases = {}\nreport_interval = \"500ms\"\n",
            self.opts.host,
            self.data_dir().display().to_string(),
            self.opts.retain
        );
        if self.opts.data_tmpfs.is_some() {
            c.push_str(&format!(
                "admin_socket = {:?}\n",
                self.socket().display().to_string()
            ));
        }
        for line in &self.opts.extra {
            c.push_str(line);
            c.push('\n');
        }
        if !self.opts.env.is_empty() {
            c.push_str("[env]\n");
            for (k, v) in &self.opts.env {
                c.push_str(&format!("{k} = {v:?}\n"));
            }
        }
        if !self.opts.labels.is_empty() {
            c.push_str("[labels]\n");
            for (k, v) in &self.opts.labels {
                c.push_str(&format!("{k} = {v:?}\n"));
            }
        }
        if let Some(url) = &self.opts.coordinator {
            c.push_str(&format!(
                "[coordinator]\nurl = {url:?}\ninsecure_dev = true\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n"
            ));
        }
        if let Some(p) = &self.opts.crash_at {
            c.push_str(&format!("[testing]\ncrash_at = {p:?}\n"));
        }
        c.push_str("[log]\nlevel = \"info,rollout_agent=debug\"\n");
        std::fs::write(self.config_path(), c)?;
        Ok(())
    }

    async fn spawn(&mut self) -> Result<()> {
        self.write_config()?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))?;
        let mut cmd = match self.opts.data_tmpfs {
            None => Command::new(bin("rollout-agent")),
            Some(bytes) => {
                std::fs::create_dir_all(self.data_dir())?;
                let mut c = Command::new("unshare");
                c.args(["--user", "--map-root-user", "--mount", "--", "sh", "-c"])
                    .arg(r#"mount -t tmpfs -o "size=$1" tmpfs "$2" && shift 2 && exec "$@""#)
                    .arg("sh")
                    .arg(bytes.to_string())
                    .arg(self.data_dir())
                    .arg(bin("rollout-agent"));
                c
            }
        };
        let child = cmd
            .arg("run")
            .arg("--config")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn rollout-agent")?;
        self.child = Some(child);
        let sock = self.socket();
        eventually("the agent's admin socket", DEADLINE, async || {
            match rollout_agent::admin::connect(&sock).await {
                Ok(mut c) => c.status(pb::StatusRequest {}).await.ok().map(|_| ()),
                Err(_) => None,
            }
        })
        .await
        .with_context(|| self.log())?;
        Ok(())
    }

    /// The agent's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// SIGKILL the agent (its services keep running).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Waits for the agent to exit by itself (e.g. at a crash point).
    pub async fn wait_exit(&mut self) -> Result<()> {
        let child = self.child.as_mut().context("agent not running")?;
        let end = Instant::now() + DEADLINE;
        loop {
            if child.try_wait()?.is_some() {
                self.child = None;
                return Ok(());
            }
            if Instant::now() > end {
                bail!("agent did not exit\n{}", self.log());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Starts the agent again on the same data directory.
    pub async fn restart(&mut self, crash_at: Option<String>) -> Result<()> {
        self.kill9();
        self.opts.crash_at = crash_at;
        self.spawn().await
    }

    /// Admin status of one service.
    pub async fn service(&self, service: &str) -> Result<Option<pb::ServiceReport>> {
        let mut c = rollout_agent::admin::connect(&self.socket()).await?;
        let st = c.status(pb::StatusRequest {}).await?.into_inner();
        Ok(st
            .report
            .unwrap_or_default()
            .services
            .into_iter()
            .find(|s| s.service == service))
    }

    /// Admin history of one service.
    pub async fn history(&self, service: &str) -> Result<Vec<pb::HistoryEntry>> {
        let mut c = rollout_agent::admin::connect(&self.socket()).await?;
        let r = c
            .releases(pb::ReleasesRequest {
                service: service.into(),
            })
            .await?
            .into_inner();
        Ok(r.history)
    }

    /// Waits until the service is in `phase` on `release`.
    pub async fn wait_for(
        &self,
        service: &str,
        phase: pb::Phase,
        release: &str,
    ) -> Result<pb::ServiceReport> {
        let r = eventually(
            &format!("{service} {phase:?} on {release}"),
            DEADLINE,
            async || {
                self.service(service)
                    .await
                    .ok()
                    .flatten()
                    .filter(|s| s.phase == phase as i32 && s.current_release == release)
            },
        )
        .await;
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let now = self.service(service).await.ok().flatten();
                bail!("{e}; now {now:?}\n--- agent log ---\n{}", self.log())
            }
        }
    }

    /// The release the `current` link of a service points at.
    pub fn current_link(&self, service: &str) -> Option<String> {
        let link = self
            .seen_data_dir()
            .join("services")
            .join(service)
            .join("current");
        let target = std::fs::read_link(link).ok()?;
        target.file_name().map(|n| n.to_string_lossy().into_owned())
    }

    /// Entries of the releases directory (to spot leftovers like `.tmp`).
    pub fn release_dirs(&self, service: &str) -> Vec<String> {
        let dir = self
            .seen_data_dir()
            .join("services")
            .join(service)
            .join("releases");
        let mut v: Vec<String> = std::fs::read_dir(dir)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Kills the service processes this agent started (test cleanup), found by
    /// their working directory.
    pub fn kill_services(&self) {
        let root = self.data_dir().join("services");
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return;
        };
        for p in procs.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            if let Ok(cwd) = std::fs::read_link(p.path().join("cwd"))
                && cwd.starts_with(&root)
            {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        self.kill_services();
    }
}

#[cfg(test)]
mod port_tests {
    /// Test ports are distinct, free, and below the kernel's ephemeral range
    /// when it leaves room (where no outgoing connection can take them).
    #[test]
    fn free_ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .expect("ephemeral range")
            .split_whitespace()
            .next()
            .and_then(|s| s.parse().ok())
            .expect("its low end");
        let ports = super::free_ports(20);
        let distinct: std::collections::BTreeSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), 20, "{ports:?}");
        for p in &ports {
            if low > 11_000 {
                assert!(*p >= 10_000 && *p < low, "{p} not below {low}");
            }
            std::net::TcpListener::bind(("127.0.0.1", *p)).expect("the port is free");
        }
    }
}
