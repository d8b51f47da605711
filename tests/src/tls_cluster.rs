//! A local fleet over mutual TLS: a PKI made by the real `rollout certs init`,
//! a real `rollout serve` with a `[tls]` section (no `--insecure-dev`), real
//! agents each presenting its own certificate, and the real `rollout` CLI
//! with a chosen `--certs` directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context, Result, bail, ensure};
use rollout_proto::pb;

use crate::{DEADLINE, bin, eventually, free_port, free_ports, sample_artifact, served_version};

/// A PKI written by `rollout certs init` into a temp dir.
#[derive(Debug)]
pub struct Pki {
    tmp: tempfile::TempDir,
}

impl Pki {
    /// Runs `rollout certs init --dir <tmp>/pki --agent A...`.
    pub fn init(agents: &[&str]) -> Result<Pki> {
        let tmp = tempfile::tempdir()?;
        let pki = Pki { tmp };
        let mut cmd = Command::new(bin("rollout"));
        cmd.args(["certs", "init", "--dir"]).arg(pki.dir());
        for a in agents {
            cmd.args(["--agent", a]);
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .context("run certs init")?;
        ensure!(
            out.status.success(),
            "rollout certs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(pki)
    }

    /// The directory `certs init` wrote (also a valid operator `--certs`).
    pub fn dir(&self) -> PathBuf {
        self.tmp.path().join("pki")
    }

    /// `ca.pem`.
    pub fn ca(&self) -> PathBuf {
        self.dir().join("ca.pem")
    }

    /// The operator's (certificate, key).
    pub fn operator(&self) -> (PathBuf, PathBuf) {
        (
            self.dir().join("operator.pem"),
            self.dir().join("operator.key"),
        )
    }

    /// An agent's (certificate, key).
    pub fn agent(&self, host: &str) -> (PathBuf, PathBuf) {
        let d = self.dir().join("agents");
        (d.join(format!("{host}.pem")), d.join(format!("{host}.key")))
    }

    /// A `--certs` directory `<tmp>/<name>` that trusts `ca` and presents
    /// `cert`/`key` as if they were the operator's.
    pub fn client_dir(&self, name: &str, ca: &Path, cert: &Path, key: &Path) -> Result<PathBuf> {
        let d = self.tmp.path().join(name);
        std::fs::create_dir_all(&d)?;
        std::fs::copy(ca, d.join("ca.pem"))?;
        std::fs::copy(cert, d.join("operator.pem"))?;
        std::fs::copy(key, d.join("operator.key"))?;
        Ok(d)
    }
}

/// A `rollout serve` process with mutual TLS.
#[derive(Debug)]
pub struct TlsCoordinator {
    /// Config, data and log.
    pub dir: tempfile::TempDir,
    /// Listen port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
}

impl TlsCoordinator {
    /// Starts `rollout serve` (no `--insecure-dev`) with the PKI's
    /// coordinator certificate.
    pub async fn start(pki: &Pki) -> Result<TlsCoordinator> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let cfg = dir.path().join("coordinator.toml");
        let p = |f: &str| pki.dir().join(f).display().to_string();
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n[log]\nlevel = \"info,rollout_coordinator=debug\"\n",
                dir.path().join("data").display().to_string(),
                p("ca.pem"),
                p("coordinator.pem"),
                p("coordinator.key"),
            ),
        )?;
        let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
        let child = Command::new(bin("rollout"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn rollout serve")?;
        let c = TlsCoordinator {
            dir,
            port,
            child: Some(child),
        };
        eventually("the TLS coordinator to listen", DEADLINE, async || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })
        .await
        .with_context(|| c.log())?;
        Ok(c)
    }

    /// `https://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// The coordinator's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    /// File names under the coordinator's artifact store (sorted).
    pub fn artifact_files(&self) -> Vec<String> {
        fn walk(d: &Path, out: &mut Vec<String>) {
            for e in std::fs::read_dir(d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    walk(&p, out);
                } else {
                    out.push(p.display().to_string());
                }
            }
        }
        let mut v = Vec::new();
        walk(&self.dir.path().join("data").join("artifacts"), &mut v);
        v.sort();
        v
    }

    /// `rollout --coordinator <url> --certs <certs> ARGS`.
    pub fn cli(&self, certs: &Path, args: &[&str]) -> Output {
        let mut all = vec!["--coordinator".to_string(), self.url(), "--certs".into()];
        all.push(certs.display().to_string());
        all.extend(args.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        cli_raw(&refs)
    }

    /// The CLI with `--output json`, parsed; an error when it fails.
    pub fn json(&self, certs: &Path, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let out = self.cli(certs, &a);
        if !out.status.success() {
            bail!(
                "rollout {args:?} failed: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for TlsCoordinator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// `rollout ARGS` with exactly these arguments (no environment defaults).
pub fn cli_raw(args: &[&str]) -> Output {
    Command::new(bin("rollout"))
        .args(args)
        .env_remove("ROLLOUT_COORDINATOR")
        .env_remove("ROLLOUT_CERTS")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run rollout {args:?}: {e}"))
}

/// How one TLS agent is configured.
#[derive(Debug, Clone)]
pub struct TlsAgentConfig {
    /// `host` in agent.toml.
    pub host: String,
    /// `[coordinator] url`.
    pub url: String,
    /// `[coordinator] ca`.
    pub ca: PathBuf,
    /// `[coordinator] cert`.
    pub cert: PathBuf,
    /// `[coordinator] key`.
    pub key: PathBuf,
    /// `[env]` (e.g. the sample service's `PORT`).
    pub env: Vec<(String, String)>,
    /// `[labels]`.
    pub labels: Vec<(String, String)>,
}

/// A real `rollout-agent` connecting over mutual TLS.
#[derive(Debug)]
pub struct TlsAgent {
    /// Its configuration.
    pub cfg: TlsAgentConfig,
    /// Data dir, config and log.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl TlsAgent {
    /// Writes agent.toml, starts the agent and waits for its admin socket.
    pub async fn start(cfg: TlsAgentConfig) -> Result<TlsAgent> {
        let dir = tempfile::tempdir()?;
        let q = |p: &Path| format!("{:?}", p.display().to_string());
        let mut c = format!(
            "host = {:?}\ndata_dir = {}\nreport_interval = \"500ms\"\n",
            cfg.host,
            q(&dir.path().join("data"))
        );
        c.push_str("[env]\n");
        for (k, v) in &cfg.env {
            c.push_str(&format!("{k} = {v:?}\n"));
        }
        c.push_str("[labels]\n");
        for (k, v) in &cfg.labels {
            c.push_str(&format!("{k} = {v:?}\n"));
        }
        c.push_str(&format!(
            "[coordinator]\nurl = {:?}\nca = {}\ncert = {}\nkey = {}\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\"\n[log]\nlevel = \"info,rollout_agent=debug\"\n",
            cfg.url,
            q(&cfg.ca),
            q(&cfg.cert),
            q(&cfg.key)
        ));
        let config = dir.path().join("agent.toml");
        std::fs::write(&config, c)?;
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = Command::new(bin("rollout-agent"))
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn rollout-agent")?;
        let a = TlsAgent {
            cfg,
            dir,
            child: Some(child),
        };
        eventually("the agent's admin socket", DEADLINE, async || {
            a.status().await.ok().map(|_| ())
        })
        .await
        .with_context(|| a.log())?;
        Ok(a)
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// The agent's own admin status.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        let sock = self.dir.path().join("data").join("admin.sock");
        let mut c = rollout_agent::admin::connect(&sock).await?;
        Ok(c.status(pb::StatusRequest {}).await?.into_inner())
    }

    /// The agent's history of `service` (from its admin socket).
    pub async fn history(&self, service: &str) -> Result<Vec<pb::HistoryEntry>> {
        let sock = self.dir.path().join("data").join("admin.sock");
        let mut c = rollout_agent::admin::connect(&sock).await?;
        Ok(c.releases(pb::ReleasesRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .history)
    }

    fn kill_services(&self) {
        let root = self.dir.path().join("data").join("services");
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

impl Drop for TlsAgent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        self.kill_services();
    }
}

/// Writes the sample artifact for `release` into `dir` and a spec deploying
/// it to every `role=web` host with `strategy` as the body of `[strategy]`
/// (the same format as [`crate::cluster::Cluster::spec`]).
pub fn write_sample_spec(dir: &Path, release: &str, strategy: &str) -> Result<PathBuf> {
    let version = format!("version={release}");
    let art = dir.join(format!("sample-{release}.tar.gz"));
    std::fs::write(&art, sample_artifact(&[version.as_str()]))?;
    let argv = vec![
        bin("sample-service").display().to_string(),
        "--port".into(),
        "${PORT}".into(),
    ];
    let spec = format!(
        r#"service = "web"
release = "{release}"

[artifact]
path = {art:?}

[run]
exec = {argv:?}
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
min_healthy_time = "300ms"
healthy_deadline = "3s"
commit_deadline = "2m"
{strategy}
"#,
        art = art.display().to_string(),
    );
    let path = dir.join(format!("{release}.toml"));
    std::fs::write(&path, spec)?;
    Ok(path)
}

/// A PKI, a TLS coordinator and agents `h1..hN`, each with its own
/// certificate and its sample service on its own port.
#[derive(Debug)]
pub struct TlsCluster {
    /// Agents, in name order (dropped before the coordinator).
    pub agents: Vec<TlsAgent>,
    /// The coordinator.
    pub coord: TlsCoordinator,
    /// Each agent's sample-service port, by index.
    pub ports: Vec<u16>,
    /// Specs and artifacts.
    pub work: tempfile::TempDir,
    /// The PKI (`certs init --agent h1 .. --agent hN`).
    pub pki: Pki,
}

impl TlsCluster {
    /// Certificates for `h1..hN`, the coordinator, and `n` agents dialing
    /// `https://localhost:port` with their own certificates; waits until the
    /// coordinator lists all of them connected.
    pub async fn start(n: usize) -> Result<TlsCluster> {
        let names: Vec<String> = (1..=n).map(|i| format!("h{i}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        let pki = Pki::init(&refs)?;
        let coord = TlsCoordinator::start(&pki).await?;
        let mut agents = Vec::new();
        let mut ports = Vec::new();
        for (name, port) in names.iter().zip(free_ports(n)) {
            let (cert, key) = pki.agent(name);
            agents.push(
                TlsAgent::start(TlsAgentConfig {
                    host: name.clone(),
                    url: format!("https://localhost:{}", coord.port),
                    ca: pki.ca(),
                    cert,
                    key,
                    env: vec![("PORT".into(), port.to_string())],
                    labels: vec![("role".into(), "web".into())],
                })
                .await?,
            );
            ports.push(port);
        }
        let c = TlsCluster {
            agents,
            coord,
            ports,
            work: tempfile::tempdir()?,
            pki,
        };
        let r = eventually("every TLS agent connected", DEADLINE, async || {
            let v = c.json(&["hosts"]).ok()?;
            let connected = v
                .as_array()?
                .iter()
                .filter(|h| h["connected"] == true)
                .count();
            (connected == n).then_some(())
        })
        .await;
        if let Err(e) = r {
            let logs: Vec<String> = c.agents.iter().map(TlsAgent::log).collect();
            bail!(
                "{e}\n--- coordinator ---\n{}\n--- agents ---\n{}",
                c.coord.log(),
                logs.join("\n---\n")
            );
        }
        Ok(c)
    }

    /// The CLI with the operator certificates of the cluster's PKI.
    pub fn operator(&self, args: &[&str]) -> Output {
        self.coord.cli(&self.pki.dir(), args)
    }

    /// `--output json` with the operator certificates.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        self.coord.json(&self.pki.dir(), args)
    }

    /// A sample spec for `release` (see [`write_sample_spec`]).
    pub fn spec(&self, release: &str, strategy: &str) -> Result<PathBuf> {
        write_sample_spec(self.work.path(), release, strategy)
    }

    /// Waits until every agent's sample service serves `version`.
    pub async fn all_serving(&self, version: &str) -> Result<()> {
        for (i, port) in self.ports.iter().enumerate() {
            eventually(
                &format!("h{} serving {version}", i + 1),
                DEADLINE,
                async || (served_version(*port).as_deref() == Some(version)).then_some(()),
            )
            .await?;
        }
        Ok(())
    }
}
