//! A local fleet: a real `rollout serve` process and N real agents on
//! loopback, each agent's sample service on its own port (the agent's `[env]`
//! sets `PORT`, which the spec uses as `${PORT}`), driven by the real `rollout`
//! CLI.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::{
    Agent, AgentOptions, DEADLINE, bin, eventually, free_port, free_ports, sample_artifact,
    served_version,
};

/// A coordinator process.
#[derive(Debug)]
pub struct CoordinatorProc {
    /// Its temp dir (config, data, log).
    pub dir: tempfile::TempDir,
    /// Listen port on 127.0.0.1.
    pub port: u16,
    child: Option<Child>,
    /// Extra top-level config lines, e.g. `metrics_listen = "..."`.
    extra: String,
}

impl CoordinatorProc {
    /// Starts `rollout serve --insecure-dev` on a free port.
    pub async fn start() -> Result<CoordinatorProc> {
        Self::start_with("").await
    }

    /// Like [`CoordinatorProc::start`], with extra top-level config lines.
    pub async fn start_with(extra: &str) -> Result<CoordinatorProc> {
        let dir = tempfile::tempdir()?;
        let mut c = CoordinatorProc {
            dir,
            port: free_port(),
            child: None,
            extra: extra.to_string(),
        };
        c.spawn().await?;
        Ok(c)
    }

    /// `http://127.0.0.1:port`.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The coordinator's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default()
    }

    async fn spawn(&mut self) -> Result<()> {
        let cfg = self.dir.path().join("coordinator.toml");
        std::fs::write(
            &cfg,
            format!(
                "listen = \"127.0.0.1:{}\"\ndata_dir = {:?}\n{}\n[log]\nlevel = \"info,rollout_coordinator=debug\"\n",
                self.port,
                self.dir.path().join("data").display().to_string(),
                self.extra
            ),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))?;
        self.child = Some(
            Command::new(bin("rollout"))
                .args(["--insecure-dev", "serve", "--config"])
                .arg(&cfg)
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawn rollout serve")?,
        );
        let port = self.port;
        eventually("the coordinator to listen", DEADLINE, async || {
            std::net::TcpStream::connect(("127.0.0.1", port))
                .ok()
                .map(|_| ())
        })
        .await
        .with_context(|| self.log())
    }

    /// SIGKILL.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same data directory and port.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill9();
        self.spawn().await
    }

    /// Replaces the extra top-level config lines (they may end with tables,
    /// e.g. `[testing]`); they take effect at the next start.
    pub fn set_extra(&mut self, extra: &str) {
        self.extra = extra.to_string();
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits up to `deadline` for the process to exit by itself (e.g. at a
    /// crash point); its exit status.
    pub async fn wait_exit(&mut self, deadline: Duration) -> Result<std::process::ExitStatus> {
        let child = self
            .child
            .as_mut()
            .context("the coordinator is not running")?;
        let end = std::time::Instant::now() + deadline;
        loop {
            if let Some(st) = child.try_wait()? {
                self.child = None;
                return Ok(st);
            }
            if std::time::Instant::now() > end {
                bail!("the coordinator did not exit within {deadline:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM (a clean stop), then waits up to `deadline` for the exit.
    pub async fn stop(&mut self, deadline: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.pid().context("the coordinator is not running")?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid)?),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        self.wait_exit(deadline).await
    }

    /// Runs the `rollout` CLI against this coordinator.
    pub fn cli(&self, args: &[&str]) -> Output {
        Command::new(bin("rollout"))
            .args(["--insecure-dev", "--coordinator", &self.url()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run rollout {args:?}: {e}"))
    }

    /// Runs the CLI with `--output json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> Result<serde_json::Value> {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let out = self.cli(&a);
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

impl Drop for CoordinatorProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A coordinator and N agents named `h1..hN`.
#[derive(Debug)]
pub struct Cluster {
    /// The coordinator.
    pub coord: CoordinatorProc,
    /// Agents, in name order.
    pub agents: Vec<Agent>,
    /// Each agent's sample-service port, by index.
    pub ports: Vec<u16>,
    /// Where specs and artifacts are written.
    pub work: tempfile::TempDir,
}

impl Cluster {
    /// Starts a coordinator and `n` agents; `env(i)` adds host env for agent i.
    pub async fn start(n: usize, env: impl Fn(usize) -> Vec<(String, String)>) -> Result<Cluster> {
        Self::start_with(n, env, &[]).await
    }

    /// Like [`Cluster::start`], with extra top-level agent config lines.
    pub async fn start_with(
        n: usize,
        env: impl Fn(usize) -> Vec<(String, String)>,
        extra: &[String],
    ) -> Result<Cluster> {
        let coord = CoordinatorProc::start().await?;
        let mut agents = Vec::new();
        let mut ports = Vec::new();
        for (i, port) in free_ports(n).into_iter().enumerate() {
            let mut opts = AgentOptions::new(&format!("h{}", i + 1), Some(coord.url()));
            opts.env.push(("PORT".into(), port.to_string()));
            opts.env.extend(env(i));
            opts.labels.push(("role".into(), "web".into()));
            opts.extra.extend(extra.iter().cloned());
            agents.push(Agent::start(opts).await?);
            ports.push(port);
        }
        let c = Cluster {
            coord,
            agents,
            ports,
            work: tempfile::tempdir()?,
        };
        c.wait_hosts_connected().await?;
        Ok(c)
    }

    /// Waits until the coordinator lists every agent as connected.
    pub async fn wait_hosts_connected(&self) -> Result<()> {
        let n = self.agents.len();
        eventually("every agent connected", DEADLINE, async || {
            let v = self.coord.json(&["hosts"]).ok()?;
            let connected = v
                .as_array()?
                .iter()
                .filter(|h| h["connected"] == true)
                .count();
            (connected == n).then_some(())
        })
        .await
    }

    /// Writes the sample artifact for `release` and a spec deploying it to
    /// every `role=web` host; `extra_argv` is appended to the service's argv;
    /// `strategy` is the body of `[strategy]`.
    pub fn spec(
        &self,
        release: &str,
        conf: &[&str],
        extra_argv: &[&str],
        strategy: &str,
    ) -> Result<PathBuf> {
        let mut lines = vec![format!("version={release}")];
        lines.extend(conf.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
        let art = self.work.path().join(format!("sample-{release}.tar.gz"));
        std::fs::write(&art, sample_artifact(&refs))?;
        let mut argv = vec![
            bin("sample-service").display().to_string(),
            "--port".into(),
            "${PORT}".into(),
        ];
        argv.extend(extra_argv.iter().map(|s| s.to_string()));
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
            argv = argv,
        );
        let path = self.work.path().join(format!("{release}.toml"));
        std::fs::write(&path, spec)?;
        Ok(path)
    }

    /// `rollout deploy --wait`: (success, stdout, stderr).
    pub fn deploy_wait(&self, spec: &Path) -> (bool, String, String) {
        let out = self
            .coord
            .cli(&["deploy", "--wait", &spec.display().to_string()]);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `rollout deploy` (no wait): the rollout id.
    pub fn deploy(&self, spec: &Path) -> Result<String> {
        let out = self.coord.cli(&["deploy", &spec.display().to_string()]);
        if !out.status.success() {
            bail!("deploy failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Waits until the rollout's state is `state`.
    pub async fn wait_state(&self, id: &str, state: &str) -> Result<serde_json::Value> {
        let r = eventually(
            &format!("rollout {id} {state}"),
            Duration::from_secs(60),
            async || {
                let v = self.coord.json(&["status", id]).ok()?;
                let s = v.get(0)?.clone();
                (s["state"] == state).then_some(s)
            },
        )
        .await;
        match r {
            Ok(v) => Ok(v),
            Err(e) => {
                let now = self.coord.json(&["status", id]).ok();
                bail!(
                    "{e}; now {now:?}\n--- coordinator log ---\n{}",
                    self.coord.log()
                )
            }
        }
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
