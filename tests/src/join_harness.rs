//! Joining with tokens, end to end: a coordinator serving mutual TLS with
//! `[tls] ca_key` (so it signs joining agents), `rollout-agent join` run as a
//! process, and agents run from the config that join wrote. The PKI comes
//! from [`crate::tls_cluster::Pki`] (`rollout certs init`, typically with no
//! agent certificates at all).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use anyhow::{Context, Result, bail};
use rollout_proto::pb;

use crate::tls_cluster::{Pki, cli_raw};
use crate::{DEADLINE, bin, eventually, free_port};

/// A `rollout serve` process with mutual TLS and joining on.
#[derive(Debug)]
pub struct JoiningCoordinator {
    /// Config, data and log.
    pub dir: tempfile::TempDir,
    /// Listen port on 127.0.0.1.
    pub port: u16,
    /// The operator `--certs` directory (the PKI's).
    pub certs: PathBuf,
    /// The CA certificate agents verify the coordinator with.
    pub ca: PathBuf,
    child: Option<Child>,
}

impl JoiningCoordinator {
    /// Starts `rollout serve` with the PKI's coordinator certificate and its
    /// CA key as `[tls] ca_key`.
    pub async fn start(pki: &Pki) -> Result<JoiningCoordinator> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let cfg = dir.path().join("coordinator.toml");
        let p = |f: &str| pki.dir().join(f).display().to_string();
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{port}\"\ndata_dir = {:?}\n[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\nca_key = {:?}\n[log]\nlevel = \"info,rollout_coordinator=debug\"\n",
                dir.path().join("data").display().to_string(),
                p("ca.pem"),
                p("coordinator.pem"),
                p("coordinator.key"),
                p("ca.key"),
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
        let c = JoiningCoordinator {
            dir,
            port,
            certs: pki.dir(),
            ca: pki.ca(),
            child: Some(child),
        };
        eventually("the coordinator to listen", DEADLINE, async || {
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

    /// `rollout ARGS` as the operator.
    pub fn cli(&self, args: &[&str]) -> Output {
        let url = self.url();
        let certs = self.certs.display().to_string();
        let mut all = vec!["--coordinator", url.as_str(), "--certs", certs.as_str()];
        all.extend_from_slice(args);
        cli_raw(&all)
    }

    /// `rollout --output json ARGS` as the operator, parsed.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        if !out.status.success() {
            bail!(
                "rollout {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `rollout token create ARGS`: the token.
    pub fn token(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["token", "create"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
        if !out.status.success() {
            bail!(
                "rollout token create failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        Ok(stdout.lines().next().unwrap_or_default().trim().to_string())
    }

    /// The `rollout hosts --output json` entry of `host`, if listed.
    pub fn host(&self, host: &str) -> Result<Option<serde_json::Value>> {
        let v = self.json(&["hosts"])?;
        Ok(v.as_array()
            .into_iter()
            .flatten()
            .find(|h| h["host"] == host)
            .cloned())
    }
}

impl Drop for JoiningCoordinator {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A host about to join: a directory standing in for its `/etc/rollout`
/// (certificate, key, CA, agent.toml) and `/var/lib/rollout`.
#[derive(Debug)]
pub struct JoiningHost {
    /// The host name.
    pub name: String,
    /// Root of the host's files.
    pub root: tempfile::TempDir,
    child: Option<Child>,
}

impl JoiningHost {
    /// A host named `name` with nothing on it yet.
    pub fn new(name: &str) -> Result<JoiningHost> {
        Ok(JoiningHost {
            name: name.to_string(),
            root: tempfile::tempdir()?,
            child: None,
        })
    }

    /// Where join writes agent.pem, agent.key and ca.pem.
    pub fn etc(&self) -> PathBuf {
        self.root.path().join("etc")
    }

    /// The agent config join writes.
    pub fn config(&self) -> PathBuf {
        self.etc().join("agent.toml")
    }

    /// The agent's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.root.path().join("data")
    }

    /// `rollout-agent join --coordinator URL --token TOKEN --ca CA --host NAME
    /// --dir ETC --config ETC/agent.toml --data-dir DATA`.
    pub fn join(&self, url: &str, token: &str, ca: &Path) -> Output {
        Command::new(bin("rollout-agent"))
            .args(["join", "--coordinator", url, "--token", token, "--ca"])
            .arg(ca)
            .args(["--host", &self.name, "--dir"])
            .arg(self.etc())
            .arg("--config")
            .arg(self.config())
            .arg("--data-dir")
            .arg(self.data_dir())
            .env_remove("ROLLOUT_JOIN_TOKEN")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run rollout-agent join: {e}"))
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.root.path().join("agent.log")).unwrap_or_default()
    }

    /// Starts `rollout-agent run --config ETC/agent.toml` (the config join
    /// wrote) and waits for its admin socket.
    pub async fn run(&mut self) -> Result<()> {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.root.path().join("agent.log"))?;
        let child = Command::new(bin("rollout-agent"))
            .args(["run", "--config"])
            .arg(self.config())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn rollout-agent")?;
        self.child = Some(child);
        eventually("the agent's admin socket", DEADLINE, async || {
            self.status().await.ok().map(|_| ())
        })
        .await
        .with_context(|| self.log())?;
        Ok(())
    }

    /// The agent's admin status.
    pub async fn status(&self) -> Result<pb::StatusResponse> {
        let sock = self.data_dir().join("admin.sock");
        let mut c = rollout_agent::admin::connect(&sock).await?;
        Ok(c.status(pb::StatusRequest {}).await?.into_inner())
    }

    /// Stops the agent (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for JoiningHost {
    fn drop(&mut self) {
        self.stop();
    }
}
