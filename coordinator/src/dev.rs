//! `rollout dev`: a whole local fleet in one command. A throw-away CA, a
//! coordinator (in this process) and N `rollout-agent` processes on loopback
//! over mutual TLS, each running the bundled sample service on its own port.
//! It deploys v1, rolls out v2 with live progress, then rolls out a
//! deliberately unhealthy v3 and shows the automatic rollback.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rollout_proto::pb;
use tokio_util::sync::CancellationToken;

use crate::cli::{self, Client, Connection, Output};
use crate::config::{CoordinatorConfig, TlsFiles};

/// A dev-mode failure.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// A binary is missing.
    #[error(
        "{path} is missing: build the workspace first (`cargo build --workspace`), or pass --bin-dir"
    )]
    MissingBinary {
        /// The expected path.
        path: String,
    },
    /// File or process I/O.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// OS error.
        source: std::io::Error,
    },
    /// A step of the demo failed.
    #[error("{0}")]
    Step(String),
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DevError {
    let context = context.into();
    move |source| DevError::Io { context, source }
}

impl From<cli::CliError> for DevError {
    fn from(e: cli::CliError) -> Self {
        DevError::Step(e.to_string())
    }
}

/// Options of `rollout dev`.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Number of agents.
    pub agents: usize,
    /// Working directory (CA, data, logs, specs); created.
    pub dir: PathBuf,
    /// Where `rollout-agent` and `sample-service` are.
    pub bin_dir: PathBuf,
    /// Stop after the demo instead of waiting for Ctrl-C.
    pub exit_after_demo: bool,
}

/// What the demo ended with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DevOutcome {
    /// Release each host runs at the end, by host.
    pub releases: Vec<(String, String)>,
    /// Final state of the v2 rollout.
    pub v2_state: String,
    /// Final state of the v3 rollout.
    pub v3_state: String,
}

fn free_port() -> Result<u16, DevError> {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(io("pick a free port"))
}

fn artifact(version: &str, healthy: bool) -> Result<Vec<u8>, DevError> {
    let mut tar = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let conf = format!("version={version}\nhealthy={healthy}\n");
    let mut h = tar::Header::new_gnu();
    h.set_size(conf.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "service.conf", conf.as_bytes())
        .map_err(io("build artifact"))?;
    tar.into_inner()
        .and_then(|gz| gz.finish())
        .map_err(io("build artifact"))
}

fn spec(
    dir: &Path,
    sample: &Path,
    version: &str,
    healthy: bool,
    strategy: &str,
) -> Result<PathBuf, DevError> {
    let art = dir.join(format!("sample-{version}.tar.gz"));
    std::fs::write(&art, artifact(version, healthy)?).map_err(io("write artifact"))?;
    let text = format!(
        r#"# The bundled sample service, release {version}.
service = "web"
release = "{version}"

[artifact]
path = "sample-{version}.tar.gz"

[run]
exec = [{sample:?}, "--port", "${{PORT}}"]
stop_timeout = "2s"

[[health]]
name = "http"
http = "http://127.0.0.1:${{PORT}}/health"
interval = "250ms"
timeout = "1s"
failure_threshold = 2

[targets]
labels = {{ role = "web" }}

[strategy]
min_healthy_time = "1s"
healthy_deadline = "5s"
commit_deadline = "5m"
{strategy}
"#,
        sample = sample.display().to_string(),
    );
    let p = dir.join(format!("{version}.toml"));
    std::fs::write(&p, text).map_err(io("write spec"))?;
    Ok(p)
}

/// Kills every process whose working directory lies under `dir` (the sample
/// services the agents started), so a dev run leaves nothing behind.
fn kill_under(dir: &Path) {
    let under = || -> Vec<i32> {
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|p| {
                let pid = p.file_name().to_string_lossy().parse::<i32>().ok()?;
                let cwd = std::fs::read_link(p.path().join("cwd")).ok()?;
                cwd.starts_with(dir).then_some(pid)
            })
            .collect()
    };
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for pid in under() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    // Bounded wait for them to go, then SIGKILL what is left.
    for _ in 0..50 {
        if under().is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in under() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
}

struct Agents(Vec<Child>, PathBuf);

impl Drop for Agents {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_under(&self.1);
    }
}

async fn latest_state(client: &mut Client, id: &str) -> Result<String, DevError> {
    let s = client
        .raw()
        .get_rollout(pb::RolloutRef { id: id.to_string() })
        .await
        .map_err(|s| DevError::Step(s.message().to_string()))?
        .into_inner();
    Ok(s.state)
}

/// Runs the demo; with `exit_after_demo` returns after it, else waits for `cancel`.
pub async fn run(
    opts: DevOptions,
    out: &mut dyn Write,
    cancel: CancellationToken,
) -> Result<DevOutcome, DevError> {
    let agent_bin = opts.bin_dir.join("rollout-agent");
    let sample = opts.bin_dir.join("sample-service");
    for p in [&agent_bin, &sample] {
        if !p.is_file() {
            return Err(DevError::MissingBinary {
                path: p.display().to_string(),
            });
        }
    }
    let dir = opts.dir.clone();
    std::fs::create_dir_all(&dir).map_err(io(format!("create {}", dir.display())))?;
    let pki = dir.join("pki");
    let hosts: Vec<String> = (1..=opts.agents).map(|i| format!("h{i}")).collect();
    if !pki.join("ca.pem").exists() {
        crate::pki::init(&pki, &[], &hosts).map_err(|e| DevError::Step(e.to_string()))?;
    }
    writeln!(out, "rollout dev: a throw-away CA in {}", pki.display()).map_err(io("write"))?;

    // The coordinator, in this process.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(io("bind the coordinator"))?;
    let port = listener.local_addr().map_err(io("local addr"))?.port();
    let config = CoordinatorConfig {
        listen: ([127, 0, 0, 1], port).into(),
        data_dir: dir.join("coordinator"),
        max_artifact_bytes: 1 << 30,
        artifact_cache_bytes: crate::config::DEFAULT_ARTIFACT_CACHE_BYTES,
        tls: Some(TlsFiles {
            ca: pki.join("ca.pem"),
            cert: pki.join("coordinator.pem"),
            key: pki.join("coordinator.key"),
            ca_key: None,
        }),
        log_json: false,
        log_level: "info".into(),
        metrics_listen: None,
        crash_at: None,
        agent_keepalive: crate::config::Keepalive::default(),
    };
    let server_cancel = cancel.child_token();
    let server = tokio::spawn(crate::server::run(
        listener,
        config,
        false,
        server_cancel.clone(),
    ));
    let url = format!("https://127.0.0.1:{port}");
    writeln!(out, "coordinator listening on {url} (mutual TLS)").map_err(io("write"))?;

    // The agents.
    let mut agents = Agents(Vec::new(), dir.clone());
    let mut ports = Vec::new();
    for h in &hosts {
        let adir = dir.join("agents").join(h);
        std::fs::create_dir_all(&adir).map_err(io("create agent dir"))?;
        let sport = free_port()?;
        ports.push(sport);
        let cfg = format!(
            "host = {h:?}\ndata_dir = {:?}\nreport_interval = \"1s\"\n[env]\nPORT = \"{sport}\"\n[labels]\nrole = \"web\"\n[coordinator]\nurl = {url:?}\nca = {:?}\ncert = {:?}\nkey = {:?}\nreconnect_min = \"200ms\"\nreconnect_max = \"2s\"\n",
            adir.join("data").display().to_string(),
            pki.join("ca.pem").display().to_string(),
            pki.join("agents")
                .join(format!("{h}.pem"))
                .display()
                .to_string(),
            pki.join("agents")
                .join(format!("{h}.key"))
                .display()
                .to_string(),
        );
        let cfg_path = adir.join("agent.toml");
        std::fs::write(&cfg_path, cfg).map_err(io("write agent config"))?;
        let log = std::fs::File::create(adir.join("agent.log")).map_err(io("create agent log"))?;
        let child = Command::new(&agent_bin)
            .arg("run")
            .arg("--config")
            .arg(&cfg_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("log"))?)
            .stderr(log)
            .spawn()
            .map_err(io(format!("start {}", agent_bin.display())))?;
        agents.0.push(child);
    }
    let conn = Connection {
        url: url.clone(),
        certs: Some(pki.clone()),
        insecure_dev: false,
        answer_timeout: crate::cli::ANSWER_TIMEOUT,
    };
    let mut client = Client::connect(&conn).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let hs = client
            .raw()
            .list_hosts(pb::ListHostsRequest {})
            .await
            .map_err(|s| DevError::Step(s.message().to_string()))?
            .into_inner()
            .hosts;
        if hs.iter().filter(|h| h.connected).count() == hosts.len() {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            return Err(DevError::Step(format!(
                "only {} of {} agents connected within 30s; see {}/agents/*/agent.log",
                hs.iter().filter(|h| h.connected).count(),
                hosts.len(),
                dir.display()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    writeln!(
        out,
        "{} agents connected: {}",
        hosts.len(),
        hosts.join(", ")
    )
    .map_err(io("write"))?;

    let specs = dir.join("specs");
    std::fs::create_dir_all(&specs).map_err(io("create specs dir"))?;
    let v1 = spec(
        &specs,
        &sample,
        "v1",
        true,
        "batch_percent = 100\nmax_unavailable = \"100%\"",
    )?;
    let v2 = spec(
        &specs,
        &sample,
        "v2",
        true,
        "batch_size = 2\nmax_unavailable = 2",
    )?;
    let v3 = spec(
        &specs,
        &sample,
        "v3",
        false,
        "batch_size = 2\nmax_unavailable = 2\nmax_failures = 0",
    )?;

    writeln!(out, "\n== deploying v1 everywhere").map_err(io("write"))?;
    if !cli::deploy(&conn, &v1, false, true, Output::Table, out).await? {
        return Err(DevError::Step("the v1 deploy failed".into()));
    }
    writeln!(out, "\n== rolling out v2, two hosts at a time").map_err(io("write"))?;
    cli::deploy(&conn, &v2, false, true, Output::Table, out).await?;
    writeln!(
        out,
        "\n== rolling out v3, which never becomes healthy: watch the automatic rollback"
    )
    .map_err(io("write"))?;
    cli::deploy(&conn, &v3, false, true, Output::Table, out).await?;

    let list = client
        .raw()
        .list_rollouts(pb::ListRolloutsRequest {
            service: "web".into(),
        })
        .await
        .map_err(|s| DevError::Step(s.message().to_string()))?
        .into_inner()
        .rollouts;
    let state_of = |rel: &str| {
        list.iter()
            .rev()
            .find(|r| r.release == rel)
            .map(|r| r.id.clone())
    };
    let v2_state = match state_of("v2") {
        Some(id) => latest_state(&mut client, &id).await?,
        None => "missing".into(),
    };
    let v3_state = match state_of("v3") {
        Some(id) => latest_state(&mut client, &id).await?,
        None => "missing".into(),
    };
    let hs = client
        .raw()
        .list_hosts(pb::ListHostsRequest {})
        .await
        .map_err(|s| DevError::Step(s.message().to_string()))?
        .into_inner()
        .hosts;
    let releases: Vec<(String, String)> = hs
        .iter()
        .map(|h| {
            let rel = h
                .report
                .as_ref()
                .and_then(|r| r.services.iter().find(|s| s.service == "web"))
                .map(|s| s.current_release.clone())
                .unwrap_or_default();
            (h.host.clone(), rel)
        })
        .collect();
    writeln!(out, "\n== result: v2 {v2_state}, v3 {v3_state}").map_err(io("write"))?;
    for ((h, rel), p) in releases.iter().zip(&ports) {
        writeln!(out, "  {h}: {rel}  (http://127.0.0.1:{p}/)").map_err(io("write"))?;
    }
    let outcome = DevOutcome {
        releases,
        v2_state,
        v3_state,
    };
    if !opts.exit_after_demo {
        let certs = pki.display();
        writeln!(
            out,
            "\nThe fleet keeps running until Ctrl-C. Try, in another terminal:\n  rollout --coordinator {url} --certs {certs} hosts\n  rollout --coordinator {url} --certs {certs} history web\n  rollout --coordinator {url} --certs {certs} status\n  rollout --coordinator {url} --certs {certs} deploy --wait {}\n  rollout --coordinator {url} --certs {certs} rollback web\n  {}/rollout-agent status --config {}",
            v2.display(),
            opts.bin_dir.display(),
            dir.join("agents/h1/agent.toml").display()
        )
        .map_err(io("write"))?;
        out.flush().map_err(io("write"))?;
        cancel.cancelled().await;
    }
    drop(agents);
    server_cancel.cancel();
    let _ = server.await;
    Ok(outcome)
}
