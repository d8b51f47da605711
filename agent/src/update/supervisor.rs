//! Running the service of a release: `exec` (the agent runs and restarts the
//! process itself), `systemd` (a unit restarted via systemctl) or `hooks` (the
//! release's own start/stop scripts).
//!
//! Exec processes get their own process group and write to a per-release log
//! file, not to a pipe, so they survive an agent restart; the restarted agent
//! adopts a process that still runs the current release (by pid and start time)
//! and kills any other process whose working directory lies in the service's
//! releases (an orphan of a crash between spawn and journal).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::future::BoxFuture;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::health::probe::{CommandError, run_command};
use crate::health::tracker::ProcessWatch;
use crate::host_stats::HostStats;
use crate::release::{Command, RestartPolicy, ServiceDefinition, Supervision};
use crate::state::ProcessRecord;

/// A supervision failure.
#[derive(Debug, thiserror::Error)]
pub enum SuperviseError {
    /// The exec program could not be started.
    #[error(
        "start {program} for service {service}: {source}; check that the program exists in the release and is executable"
    )]
    Spawn {
        /// Service name.
        service: String,
        /// Program as written.
        program: String,
        /// OS error.
        source: std::io::Error,
    },
    /// A start/stop script or systemctl failed.
    #[error("{what} for service {service}: {source}")]
    Command {
        /// Which action.
        what: String,
        /// Service name.
        service: String,
        /// The failure.
        source: CommandError,
    },
    /// The process did not exit even after SIGKILL.
    #[error("service {service}: process {pid} did not exit after SIGKILL")]
    Unkillable {
        /// Service name.
        service: String,
        /// The stubborn pid.
        pid: u32,
    },
}

/// Runs and stops the service of a release. Real: [`RealSupervisor`]; fakes in tests.
pub trait Supervisor: Send + Sync + 'static {
    /// Starts the service of `def` from `release_dir`, its output appended to `log`.
    fn start<'a>(
        &'a self,
        def: &'a ServiceDefinition,
        release_dir: &'a Path,
        log: &'a Path,
    ) -> BoxFuture<'a, Result<(), SuperviseError>>;

    /// Stops whatever runs for `service`: the supervised process, strays whose
    /// working directory is under `releases_dir`, and, for systemd/hooks, the
    /// unit or stop script of `def` (the running release's definition).
    fn stop<'a>(
        &'a self,
        service: &'a str,
        def: Option<&'a ServiceDefinition>,
        releases_dir: &'a Path,
        log: Option<&'a Path>,
    ) -> BoxFuture<'a, Result<(), SuperviseError>>;

    /// After an agent restart: takes over the service if it still runs `def`'s
    /// release (`record` is what the journal remembers). Returns whether it runs;
    /// when it does not, the caller starts it.
    fn adopt<'a>(
        &'a self,
        def: &'a ServiceDefinition,
        release_dir: &'a Path,
        log: &'a Path,
        record: Option<&'a ProcessRecord>,
    ) -> BoxFuture<'a, bool>;

    /// The main process now, to journal for a later adoption.
    fn process(&self, service: &str) -> Option<ProcessRecord>;

    /// Liveness and pid of the service's process, for health monitoring.
    fn watch(&self, service: &str) -> Arc<dyn ProcessWatch>;
}

/// Environment every service process and hook gets, on top of the definition's.
pub fn service_env(def: &ServiceDefinition, release_dir: &Path) -> BTreeMap<String, String> {
    let mut env = def.env.clone();
    env.insert("ROLLOUT_SERVICE".into(), def.service.clone());
    env.insert("ROLLOUT_RELEASE".into(), def.release.clone());
    env.insert(
        "ROLLOUT_RELEASE_DIR".into(),
        release_dir.display().to_string(),
    );
    env
}

/// Pid and liveness of one exec-supervised service, shared with the monitor.
#[derive(Debug, Default)]
struct ExecState {
    pid: AtomicU32,
    alive: AtomicBool,
    /// Exits on its own (not stopped by the agent) since this release's
    /// supervision began.
    exits: AtomicU32,
    /// The process exited and the restart policy does not start it again.
    gave_up: AtomicBool,
    /// Marked on every change of `pid`, `alive`, `exits` or `gave_up`, so
    /// monitors need not poll.
    changed: watch::Sender<()>,
}

impl ExecState {
    /// A new release's supervision begins with process `pid`.
    fn begin(&self, pid: u32) {
        self.exits.store(0, Ordering::SeqCst);
        self.gave_up.store(false, Ordering::SeqCst);
        self.pid.store(pid, Ordering::SeqCst);
        self.alive.store(true, Ordering::SeqCst);
        self.changed.send_replace(());
    }

    fn set_pid(&self, pid: u32) {
        self.pid.store(pid, Ordering::SeqCst);
        self.changed.send_replace(());
    }

    /// The process exited on its own; `restart`: the supervisor starts it again.
    fn exited(&self, restart: bool) {
        self.exits.fetch_add(1, Ordering::SeqCst);
        self.gave_up.store(!restart, Ordering::SeqCst);
        self.set_alive(false);
    }

    fn set_alive(&self, alive: bool) {
        self.alive.store(alive, Ordering::SeqCst);
        self.changed.send_replace(());
    }
}

impl ProcessWatch for ExecState {
    fn pid(&self) -> Option<u32> {
        match self.pid.load(Ordering::SeqCst) {
            0 => None,
            p => Some(p),
        }
    }

    fn alive(&self) -> bool {
        self.alive.load(Ordering::SeqCst)
    }

    fn changes(&self) -> Option<watch::Receiver<()>> {
        Some(self.changed.subscribe())
    }

    fn exits(&self) -> u32 {
        self.exits.load(Ordering::SeqCst)
    }

    fn gave_up(&self) -> bool {
        self.gave_up.load(Ordering::SeqCst)
    }
}

/// A [`ProcessWatch`] for modes without a pid: always "alive"; health checks decide.
#[derive(Debug)]
struct NoPid;

impl ProcessWatch for NoPid {
    fn pid(&self) -> Option<u32> {
        None
    }
    fn alive(&self) -> bool {
        true
    }
    fn changes(&self) -> Option<watch::Receiver<()>> {
        // Closed at once: nothing ever changes.
        Some(watch::channel(()).1)
    }
}

#[derive(Debug)]
struct ExecEntry {
    state: Arc<ExecState>,
    release: String,
    start_time: Option<u64>,
    stop: CancellationToken,
    task: JoinHandle<()>,
}

/// The supervisor used by the daemon.
pub struct RealSupervisor {
    stats: Arc<Mutex<dyn HostStats>>,
    exec: Mutex<HashMap<String, ExecEntry>>,
    /// Watches handed out before a start, so the monitor sees the new process.
    states: Mutex<HashMap<String, Arc<ExecState>>>,
}

impl std::fmt::Debug for RealSupervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RealSupervisor").finish_non_exhaustive()
    }
}

fn resolve(program: &str, dir: &Path) -> PathBuf {
    if !program.starts_with('/') && program.contains('/') {
        dir.join(program)
    } else {
        PathBuf::from(program)
    }
}

fn signal_group(pid: u32, sig: Signal) {
    if let Ok(raw) = i32::try_from(pid) {
        // ESRCH (already gone) is the expected outcome of a race with exit.
        let _ = killpg(Pid::from_raw(raw), sig);
        let _ = nix::sys::signal::kill(Pid::from_raw(raw), sig);
    }
}

fn systemctl(unit_action: &str, unit: &str) -> Command {
    Command {
        argv: vec!["systemctl".into(), unit_action.into(), unit.into()],
        timeout: Duration::from_secs(90),
    }
}

impl RealSupervisor {
    /// A supervisor reading process facts from `stats`.
    pub fn new(stats: Arc<Mutex<dyn HostStats>>) -> Self {
        RealSupervisor {
            stats,
            exec: Mutex::new(HashMap::new()),
            states: Mutex::new(HashMap::new()),
        }
    }

    fn state(&self, service: &str) -> Arc<ExecState> {
        match self.states.lock() {
            Ok(mut m) => m.entry(service.to_string()).or_default().clone(),
            Err(_) => Arc::new(ExecState::default()),
        }
    }

    fn alive(&self, pid: u32, start_time: Option<u64>) -> bool {
        self.stats
            .lock()
            .map(|mut s| s.process_alive(pid, start_time))
            .unwrap_or(false)
    }

    fn take_entry(&self, service: &str) -> Option<ExecEntry> {
        self.exec.lock().ok().and_then(|mut m| m.remove(service))
    }

    /// Spawns the supervise loop: run, wait, restart per policy, until stopped.
    fn supervise(
        &self,
        def: &ServiceDefinition,
        release_dir: &Path,
        log: &Path,
        adopted: Option<(u32, Option<u64>)>,
    ) -> Result<(), SuperviseError> {
        let Supervision::Exec {
            argv,
            restart,
            stop_timeout: _,
        } = &def.supervision
        else {
            return Ok(());
        };
        let service = def.service.clone();
        let state = self.state(&service);
        let stop = CancellationToken::new();
        let env = service_env(def, release_dir);
        let program = resolve(&argv[0], release_dir);
        let args: Vec<String> = argv[1..].to_vec();
        let dir = release_dir.to_path_buf();
        let log = log.to_path_buf();
        let restart = *restart;
        let run_as = def.run_as;
        let spawn = move || -> Result<tokio::process::Child, std::io::Error> {
            if let Some(parent) = log.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)?;
            let err = out.try_clone()?;
            let mut c = tokio::process::Command::new(&program);
            c.args(&args)
                .current_dir(&dir)
                .envs(&env)
                .stdin(std::process::Stdio::null())
                .stdout(out)
                .stderr(err)
                .process_group(0)
                .kill_on_drop(false);
            if let Some(u) = run_as {
                c.uid(u.uid).gid(u.gid);
            }
            c.spawn()
        };
        // The first spawn happens here so that a missing program fails the start.
        let mut first: Option<tokio::process::Child> = None;
        let start_time;
        match adopted {
            Some((pid, st)) => {
                state.begin(pid);
                start_time = st;
            }
            None => {
                let child = spawn().map_err(|source| SuperviseError::Spawn {
                    service: service.clone(),
                    program: argv[0].clone(),
                    source,
                })?;
                let pid = child.id().unwrap_or(0);
                state.begin(pid);
                start_time = self
                    .stats
                    .lock()
                    .ok()
                    .and_then(|mut s| s.process_start_time(pid));
                first = Some(child);
            }
        }
        let task_state = state.clone();
        let task_stop = stop.clone();
        let stats = self.stats.clone();
        let task_service = service.clone();
        let task = tokio::spawn(async move {
            let mut child = first;
            let mut backoff = Duration::from_millis(500);
            loop {
                let success = match child.take() {
                    Some(mut c) => tokio::select! {
                        s = c.wait() => s.map(|s| s.success()).unwrap_or(false),
                        () = task_stop.cancelled() => {
                            // The stopper signals the group; reap the child here.
                            let _ = c.wait().await;
                            false
                        }
                    },
                    None => {
                        // Adopted: not our child, so poll for its exit.
                        let pid = task_state.pid.load(Ordering::SeqCst);
                        loop {
                            let alive = stats
                                .lock()
                                .map(|mut s| s.process_alive(pid, start_time))
                                .unwrap_or(false);
                            if !alive || task_stop.is_cancelled() {
                                break;
                            }
                            tokio::select! {
                                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                                () = task_stop.cancelled() => {}
                            }
                        }
                        false
                    }
                };
                if task_stop.is_cancelled() {
                    task_state.set_alive(false);
                    break;
                }
                let again = match restart {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => !success,
                    RestartPolicy::Never => false,
                };
                task_state.exited(again);
                if !again {
                    info!(service = %task_service, success, "service exited; not restarting per policy");
                    break;
                }
                warn!(service = %task_service, success, backoff = ?backoff, "service exited; restarting");
                tokio::select! {
                    () = tokio::time::sleep(backoff) => {}
                    () = task_stop.cancelled() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(30));
                match spawn() {
                    Ok(c) => {
                        task_state.set_pid(c.id().unwrap_or(0));
                        task_state.set_alive(true);
                        child = Some(c);
                    }
                    Err(e) => {
                        warn!(service = %task_service, error = %e, "restart failed");
                    }
                }
            }
        });
        if let Ok(mut m) = self.exec.lock() {
            m.insert(
                service,
                ExecEntry {
                    state,
                    release: def.release.clone(),
                    start_time,
                    stop,
                    task,
                },
            );
        }
        Ok(())
    }

    async fn stop_exec(&self, service: &str, stop_timeout: Duration) -> Result<(), SuperviseError> {
        let Some(entry) = self.take_entry(service) else {
            return Ok(());
        };
        entry.stop.cancel();
        let pid = entry.state.pid.load(Ordering::SeqCst);
        if pid != 0 && entry.state.alive() {
            signal_group(pid, Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + stop_timeout;
            while self.alive(pid, entry.start_time) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            if self.alive(pid, entry.start_time) {
                warn!(service, pid, "still running after SIGTERM; sending SIGKILL");
                signal_group(pid, Signal::SIGKILL);
            }
        }
        let _ = entry.task.await;
        entry.state.set_alive(false);
        entry.state.set_pid(0);
        Ok(())
    }

    /// Kills every process whose working directory is in the service's releases.
    async fn kill_strays(&self, service: &str, releases_dir: &Path) -> Result<(), SuperviseError> {
        let pids = self
            .stats
            .lock()
            .map(|mut s| s.processes_with_cwd_under(releases_dir))
            .unwrap_or_default();
        if pids.is_empty() {
            return Ok(());
        }
        warn!(service, ?pids, "killing stray service processes");
        for &pid in &pids {
            signal_group(pid, Signal::SIGKILL);
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        for &pid in &pids {
            while self.alive(pid, None) {
                if tokio::time::Instant::now() > deadline {
                    return Err(SuperviseError::Unkillable {
                        service: service.to_string(),
                        pid,
                    });
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }
}

impl Supervisor for RealSupervisor {
    fn start<'a>(
        &'a self,
        def: &'a ServiceDefinition,
        release_dir: &'a Path,
        log: &'a Path,
    ) -> BoxFuture<'a, Result<(), SuperviseError>> {
        Box::pin(async move {
            match &def.supervision {
                Supervision::Exec { .. } => self.supervise(def, release_dir, log, None),
                Supervision::Systemd { unit } => run_command(
                    &systemctl("restart", unit),
                    release_dir,
                    &BTreeMap::new(),
                    Some(log),
                    None,
                )
                .await
                .map_err(|source| SuperviseError::Command {
                    what: format!("systemctl restart {unit}"),
                    service: def.service.clone(),
                    source,
                }),
                Supervision::Hooks { start, .. } => match start {
                    None => Ok(()),
                    Some(cmd) => run_command(
                        cmd,
                        release_dir,
                        &service_env(def, release_dir),
                        Some(log),
                        def.run_as,
                    )
                    .await
                    .map_err(|source| SuperviseError::Command {
                        what: "start script".into(),
                        service: def.service.clone(),
                        source,
                    }),
                },
            }
        })
    }

    fn stop<'a>(
        &'a self,
        service: &'a str,
        def: Option<&'a ServiceDefinition>,
        releases_dir: &'a Path,
        log: Option<&'a Path>,
    ) -> BoxFuture<'a, Result<(), SuperviseError>> {
        Box::pin(async move {
            let stop_timeout = match def.map(|d| &d.supervision) {
                Some(Supervision::Exec { stop_timeout, .. }) => *stop_timeout,
                _ => crate::release::DEFAULT_STOP_TIMEOUT,
            };
            self.stop_exec(service, stop_timeout).await?;
            match def.map(|d| (&d.supervision, d)) {
                Some((Supervision::Systemd { unit }, _)) => {
                    run_command(
                        &systemctl("stop", unit),
                        releases_dir,
                        &BTreeMap::new(),
                        log,
                        None,
                    )
                    .await
                    .map_err(|source| SuperviseError::Command {
                        what: format!("systemctl stop {unit}"),
                        service: service.to_string(),
                        source,
                    })?;
                }
                Some((
                    Supervision::Hooks {
                        stop: Some(cmd), ..
                    },
                    d,
                )) => {
                    let dir = releases_dir.join(&d.release);
                    run_command(cmd, &dir, &service_env(d, &dir), log, d.run_as)
                        .await
                        .map_err(|source| SuperviseError::Command {
                            what: "stop script".into(),
                            service: service.to_string(),
                            source,
                        })?;
                }
                _ => {}
            }
            self.kill_strays(service, releases_dir).await
        })
    }

    fn adopt<'a>(
        &'a self,
        def: &'a ServiceDefinition,
        release_dir: &'a Path,
        log: &'a Path,
        record: Option<&'a ProcessRecord>,
    ) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            match &def.supervision {
                Supervision::Exec { .. } => {
                    let Some(rec) = record.filter(|r| r.release == def.release) else {
                        return false;
                    };
                    if !self.alive(rec.pid, rec.start_time) {
                        return false;
                    }
                    info!(service = %def.service, pid = rec.pid, "adopting running service process");
                    self.supervise(def, release_dir, log, Some((rec.pid, rec.start_time)))
                        .is_ok()
                }
                // systemd keeps its units running across agent restarts; scripts
                // cannot be asked, so health checks decide.
                Supervision::Systemd { .. } | Supervision::Hooks { .. } => true,
            }
        })
    }

    fn process(&self, service: &str) -> Option<ProcessRecord> {
        let m = self.exec.lock().ok()?;
        let e = m.get(service)?;
        let pid = e.state.pid()?;
        Some(ProcessRecord {
            pid,
            start_time: e.start_time,
            release: e.release.clone(),
        })
    }

    fn watch(&self, service: &str) -> Arc<dyn ProcessWatch> {
        let exec = self
            .exec
            .lock()
            .ok()
            .and_then(|m| m.get(service).map(|e| e.state.clone()));
        match exec {
            Some(state) => state,
            None => Arc::new(NoPid),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_stats::SysinfoStats;

    fn def(
        service: &str,
        release: &str,
        script: &str,
        restart: RestartPolicy,
    ) -> ServiceDefinition {
        ServiceDefinition {
            service: service.into(),
            release: release.into(),
            artifact: crate::release::Artifact {
                digest: crate::release::Digest([0; 32]),
                size: 0,
                signature: None,
            },
            supervision: Supervision::Exec {
                argv: vec!["/bin/sh".into(), "-c".into(), script.into()],
                restart,
                stop_timeout: Duration::from_secs(2),
            },
            env: Default::default(),
            hooks: Default::default(),
            health_checks: vec![],
            thresholds: Default::default(),
            min_healthy_time: Duration::ZERO,
            healthy_deadline: Duration::from_secs(30),
            commit_deadline: Duration::from_secs(30),
            run_as: None,
        }
    }

    /// Waits (up to 20 s) until `cond` holds of the watch, woken by its changes.
    async fn until(
        w: &Arc<dyn ProcessWatch>,
        what: &str,
        cond: impl Fn(&dyn ProcessWatch) -> bool,
    ) {
        let mut rx = w.changes().expect("exec watches notify");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while !cond(w.as_ref()) {
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => {}
                _ => panic!(
                    "{what}: not reached within 20 s (exits {}, gave up {}, alive {})",
                    w.exits(),
                    w.gave_up(),
                    w.alive()
                ),
            }
        }
    }

    #[tokio::test]
    async fn exits_are_counted_per_release_and_a_process_not_restarted_is_given_up() {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats: Arc<Mutex<dyn HostStats>> =
            Arc::new(Mutex::new(SysinfoStats::new().expect("stats")));
        let sup = RealSupervisor::new(stats);
        let log = dir.path().join("log");
        let start = |d: ServiceDefinition| {
            let (sup, dir, log) = (&sup, dir.path(), &log);
            async move { sup.start(&d, dir, log).await.expect("start") }
        };

        // Restarted after each failure: the exits add up, never given up.
        start(def("crash", "v1", "exit 3", RestartPolicy::OnFailure)).await;
        let crash = sup.watch("crash");
        until(&crash, "two exits", |w| w.exits() >= 2).await;
        assert!(!crash.gave_up());
        // A new release's supervision counts from zero.
        sup.stop("crash", None, dir.path(), None)
            .await
            .expect("stop");
        start(def("crash", "v2", "sleep 30", RestartPolicy::OnFailure)).await;
        assert_eq!(crash.exits(), 0);
        assert!(crash.alive());
        // Stopped by the agent: not an exit of its own.
        sup.stop("crash", None, dir.path(), None)
            .await
            .expect("stop");
        assert_eq!(crash.exits(), 0);
        assert!(!crash.gave_up());

        // Policy `never`: one exit and it is gone for good.
        start(def("once", "v1", "exit 0", RestartPolicy::Never)).await;
        let once = sup.watch("once");
        until(&once, "given up", |w| w.gave_up()).await;
        assert_eq!(once.exits(), 1);
        assert!(!once.alive());

        // `on-failure` after a clean exit: not started again either.
        start(def("clean", "v1", "exit 0", RestartPolicy::OnFailure)).await;
        let clean = sup.watch("clean");
        until(&clean, "given up", |w| w.gave_up()).await;
        assert_eq!(clean.exits(), 1);
    }
}
