//! The update engine: one worker task per service owns that service's state
//! and performs its operations (activate, commit, rollback), persisting the
//! next phase to the journal before every side effect. Staging runs beside the
//! worker (it never touches the running service).
//!
//! While a worker executes an operation it answers every other request at once
//! with [`EngineError::Busy`], naming the operation in progress.
//!
//! On start, each worker recovers its service from the journal: an activation
//! that had not reached probation is rolled back, a rollback in progress is
//! finished, and a release in probation keeps its (wall-clock) commit deadline.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::health::probe::{HealthProbe, ProbeContext, run_command};
use crate::health::tracker::{HealthView, Verdict, spawn_monitor};
use crate::host_stats::HostStats;
use crate::layout::Layout;
use crate::release::{Command, ServiceDefinition, validate_name};
use crate::state::{
    HistoryEntry, OpKind, Operation, ReleaseRecord, ServiceRecord, StateStore, StoreError, Write,
    now_ms,
};
use crate::update::installer::{FetchError, InstallError, Installer};
use crate::update::phase::{ActivateStep, Event, IllegalTransition, Phase, RollbackStep};
use crate::update::supervisor::{Supervisor, service_env};

/// Why an operation failed, typed so the coordinator can budget failures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureKind {
    /// Fetching, verifying or unpacking failed.
    StageFailed,
    /// A hook exited non-zero or timed out.
    HookFailed,
    /// The release did not become (or stay) healthy.
    Unhealthy,
    /// The host rolled the release back on its own.
    RolledBackByHost,
    /// Another operation is running.
    Busy,
    /// The request itself is wrong.
    Invalid,
    /// The agent failed (disk, store).
    Internal,
    /// A resource gate failed: a ceiling, or a regression against the
    /// previous release's steady state.
    ResourceRegression,
}

/// An engine failure. Every message names the cause and what to do.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// Another operation runs on the service.
    #[error("service {service} is busy: {operation} is in progress; wait for it to finish")]
    Busy {
        /// Service name.
        service: String,
        /// The running operation, e.g. `activating v2 (step switch)`.
        operation: String,
    },
    /// No such service on this host.
    #[error("service {0} is unknown on this host; stage a release of it first")]
    UnknownService(String),
    /// The release is not staged.
    #[error("release {release} of service {service} is not staged on this host; stage it first")]
    NotStaged {
        /// Service name.
        service: String,
        /// Release id.
        release: String,
    },
    /// The request does not fit the service's phase.
    #[error("service {service}: {message}")]
    WrongPhase {
        /// Service name.
        service: String,
        /// What is wrong and what to do.
        message: String,
    },
    /// The request is malformed.
    #[error("{0}")]
    Invalid(String),
    /// Staging failed.
    #[error("stage {release} of service {service}: {source}")]
    Stage {
        /// Service name.
        service: String,
        /// Release id.
        release: String,
        /// The installer's error (boxed: it is large and rare).
        source: Box<InstallError>,
    },
    /// The activation failed and the host rolled back.
    #[error("activation of {release} on service {service} failed ({reason}); {outcome}")]
    ActivationFailed {
        /// Service name.
        service: String,
        /// Release that failed.
        release: String,
        /// Typed cause.
        kind: FailureKind,
        /// What failed, with measured values.
        reason: String,
        /// Where the host ended up.
        outcome: String,
    },
    /// A rollback could not make its target healthy.
    #[error(
        "rollback of service {service} to {target} finished but the service is not healthy ({reason}); inspect the host and deploy a fixed release"
    )]
    RollbackFailed {
        /// Service name.
        service: String,
        /// Rollback target.
        target: String,
        /// What failed.
        reason: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The agent is shutting down.
    #[error("the agent is shutting down; retry after it restarts")]
    ShuttingDown,
}

impl EngineError {
    /// The failure type for budgets.
    pub fn kind(&self) -> FailureKind {
        match self {
            EngineError::Busy { .. } => FailureKind::Busy,
            EngineError::UnknownService(_)
            | EngineError::NotStaged { .. }
            | EngineError::WrongPhase { .. }
            | EngineError::Invalid(_) => FailureKind::Invalid,
            EngineError::Stage { .. } => FailureKind::StageFailed,
            EngineError::ActivationFailed { kind, .. } => *kind,
            EngineError::RollbackFailed { .. } => FailureKind::Unhealthy,
            EngineError::Store(_) | EngineError::ShuttingDown => FailureKind::Internal,
        }
    }

    /// Whether the same command may succeed when sent again: the artifact
    /// source could not be reached (the partial download is kept and
    /// resumes), or the agent is shutting down.
    pub fn retryable(&self) -> bool {
        match self {
            EngineError::Stage { source, .. } => matches!(
                **source,
                InstallError::Fetch {
                    source: FetchError::Unavailable(_),
                    ..
                }
            ),
            EngineError::ShuttingDown => true,
            _ => false,
        }
    }
}

impl From<IllegalTransition> for EngineError {
    fn from(e: IllegalTransition) -> Self {
        EngineError::Invalid(e.to_string())
    }
}

/// Engine settings from the agent config.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Unpacked releases kept per service (current, previous and last known
    /// good are kept in any case).
    pub retain_releases: usize,
    /// Test-only: kill the agent with SIGKILL at this journal point, e.g.
    /// `activating:switch:intent` or `rolling_back:start:done`.
    pub crash_at: Option<String>,
    /// Host-level environment (agent config `[env]`): defaults for every
    /// service's environment, and the values `${NAME}` expands to in commands
    /// and health checks.
    pub host_env: std::collections::BTreeMap<String, String>,
    /// The user services and hooks run as (agent config `run_as`).
    pub run_as: Option<crate::release::RunAs>,
    /// Prometheus counters (agent config `metrics_listen`); off by default.
    pub metrics: crate::metrics::MetricsHandle,
    /// The agent's wake grid ([`crate::health::tracker::next_on_grid`]): its
    /// start. The health checks and samples of committed releases fall on it.
    pub wake_grid: tokio::time::Instant,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            host_env: Default::default(),
            run_as: None,
            retain_releases: 5,
            crash_at: None,
            metrics: Default::default(),
            wake_grid: tokio::time::Instant::now(),
        }
    }
}

/// Everything the engine acts through.
#[derive(Clone)]
pub struct Deps {
    /// Persistent state.
    pub store: Arc<dyn StateStore>,
    /// Staging and the `current` link.
    pub installer: Arc<Installer>,
    /// Runs services.
    pub supervisor: Arc<dyn Supervisor>,
    /// Health probes.
    pub probe: Arc<dyn HealthProbe>,
    /// CPU and memory.
    pub stats: Arc<Mutex<dyn HostStats>>,
    /// Paths.
    pub layout: Layout,
    /// Settings.
    pub config: EngineConfig,
}

impl std::fmt::Debug for Deps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deps")
            .field("layout", &self.layout)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// What the engine shows of a service: its record and live health.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceView {
    /// Persisted state.
    pub record: ServiceRecord,
    /// Live health of the running release (`None` when nothing runs).
    pub health: Option<HealthView>,
}

/// Outcome of a stage request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageOutcome {
    /// Whether the release was already there (nothing fetched).
    pub already_present: bool,
}

enum Request {
    Activate {
        release: String,
        cause: String,
        op_id: String,
        reply: oneshot::Sender<Result<ServiceView, EngineError>>,
    },
    Commit {
        release: String,
        reply: oneshot::Sender<Result<ServiceView, EngineError>>,
    },
    Rollback {
        to: Option<String>,
        reason: String,
        cause: String,
        reply: oneshot::Sender<Result<ServiceView, EngineError>>,
    },
}

impl Request {
    fn refuse(self, err: EngineError) {
        let _ = match self {
            Request::Activate { reply, .. }
            | Request::Commit { reply, .. }
            | Request::Rollback { reply, .. } => reply.send(Err(err)),
        };
    }
}

struct WorkerHandle {
    tx: mpsc::Sender<Request>,
    view: watch::Receiver<ServiceView>,
    /// Held while staging a release of this service.
    staging: Arc<tokio::sync::Mutex<()>>,
    /// The running monitor's output, read at query time so reports carry
    /// fresh samples without waking the worker on every sample.
    live: LiveHealth,
    task: JoinHandle<()>,
}

/// Shared slot for the running monitor's receiver.
type LiveHealth = Arc<Mutex<Option<watch::Receiver<HealthView>>>>;

fn with_live(mut view: ServiceView, live: &LiveHealth) -> ServiceView {
    if let Some(rx) = live.lock().ok().and_then(|l| l.clone()) {
        view.health = Some(rx.borrow().clone());
    }
    view
}

/// The per-host update engine.
pub struct Engine {
    deps: Deps,
    workers: Mutex<HashMap<String, WorkerHandle>>,
    changes: broadcast::Sender<String>,
    cancel: CancellationToken,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("deps", &self.deps)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Starts a worker for every known service; each first recovers its service
    /// from the journal.
    pub fn start(deps: Deps) -> Result<Arc<Engine>, EngineError> {
        let (changes, _) = broadcast::channel(256);
        let engine = Arc::new(Engine {
            deps,
            workers: Mutex::new(HashMap::new()),
            changes,
            cancel: CancellationToken::new(),
        });
        for rec in engine.deps.store.services()? {
            if let Err(e) = engine.deps.installer.clean_partial(&rec.service) {
                warn!(service = %rec.service, error = %e, "could not clean partial staging");
            }
            engine.spawn_worker(rec)?;
        }
        Ok(engine)
    }

    fn spawn_worker(&self, rec: ServiceRecord) -> Result<(), EngineError> {
        let mut workers = self
            .workers
            .lock()
            .map_err(|_| EngineError::Invalid("engine lock poisoned".into()))?;
        if workers.contains_key(&rec.service) {
            return Ok(());
        }
        let (tx, rx) = mpsc::channel(16);
        let (view_tx, view) = watch::channel(ServiceView {
            record: rec.clone(),
            health: None,
        });
        let live: LiveHealth = Arc::new(Mutex::new(None));
        let worker = Worker {
            deps: self.deps.clone(),
            record: rec.clone(),
            monitor: None,
            live: live.clone(),
            view: view_tx,
            changes: self.changes.clone(),
            cancel: self.cancel.child_token(),
        };
        let task = tokio::spawn(worker.run(rx));
        workers.insert(
            rec.service,
            WorkerHandle {
                tx,
                view,
                staging: Arc::new(tokio::sync::Mutex::new(())),
                live,
                task,
            },
        );
        Ok(())
    }

    fn handle(
        &self,
        service: &str,
    ) -> Result<(mpsc::Sender<Request>, Arc<tokio::sync::Mutex<()>>), EngineError> {
        let workers = self
            .workers
            .lock()
            .map_err(|_| EngineError::Invalid("engine lock poisoned".into()))?;
        let h = workers
            .get(service)
            .ok_or_else(|| EngineError::UnknownService(service.to_string()))?;
        Ok((h.tx.clone(), h.staging.clone()))
    }

    /// Names of services whose view changed; for pushing reports.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// The view of every service.
    pub fn views(&self) -> Vec<ServiceView> {
        match self.workers.lock() {
            Ok(w) => {
                let mut v: Vec<_> = w
                    .values()
                    .map(|h| with_live(h.view.borrow().clone(), &h.live))
                    .collect();
                v.sort_by(|a, b| a.record.service.cmp(&b.record.service));
                v
            }
            Err(_) => Vec::new(),
        }
    }

    /// The view of one service.
    pub fn view(&self, service: &str) -> Option<ServiceView> {
        let w = self.workers.lock().ok()?;
        w.get(service)
            .map(|h| with_live(h.view.borrow().clone(), &h.live))
    }

    /// The store, for listings.
    pub fn store(&self) -> &Arc<dyn StateStore> {
        &self.deps.store
    }

    /// Fetches, verifies and unpacks a release; never touches the running service.
    pub async fn stage(&self, def: ServiceDefinition) -> Result<StageOutcome, EngineError> {
        let service = def.service.clone();
        if self.handle(&service).is_err() {
            let rec = match self.deps.store.service(&service)? {
                Some(r) => r,
                None => {
                    let r = ServiceRecord::new(&service);
                    self.deps.store.commit(Write {
                        service: Some(r.clone()),
                        ..Default::default()
                    })?;
                    r
                }
            };
            self.spawn_worker(rec)?;
        }
        let (_, staging) = self.handle(&service)?;
        let _guard = staging.try_lock().map_err(|_| EngineError::Busy {
            service: service.clone(),
            operation: "staging another release".into(),
        })?;
        if let Some(existing) = self.deps.store.release(&service, &def.release)? {
            if existing.definition != def {
                return Err(EngineError::Invalid(format!(
                    "release {} of service {service} is already staged with a different definition (digest {}); release ids are immutable, publish a new release id",
                    def.release,
                    existing.digest()
                )));
            }
            if self.deps.installer.is_staged(&service, &def.release) {
                return Ok(StageOutcome {
                    already_present: true,
                });
            }
        }
        let staged = self
            .deps
            .installer
            .stage(&def)
            .await
            .inspect_err(|_| self.deps.config.metrics.operation("stage", "failed"))
            .map_err(|source| EngineError::Stage {
                service: service.clone(),
                release: def.release.clone(),
                source: Box::new(source),
            })?;
        let release = def.release.clone();
        self.deps.store.commit(Write {
            put_releases: vec![ReleaseRecord {
                definition: def,
                staged_at_ms: now_ms(),
            }],
            history: vec![history(&service, &release, "staged", None, "stage")],
            ..Default::default()
        })?;
        self.deps.config.metrics.operation("stage", "ok");
        info!(service = %service, release = %release, already = staged.already_present, "staged");
        Ok(StageOutcome {
            already_present: staged.already_present,
        })
    }

    async fn request(
        &self,
        service: &str,
        make: impl FnOnce(oneshot::Sender<Result<ServiceView, EngineError>>) -> Request,
    ) -> Result<ServiceView, EngineError> {
        let (tx, _) = self.handle(service)?;
        let (reply, rx) = oneshot::channel();
        tx.send(make(reply))
            .await
            .map_err(|_| EngineError::ShuttingDown)?;
        rx.await.map_err(|_| EngineError::ShuttingDown)?
    }

    /// Switches to a staged release and verifies it. Returns when the release
    /// is in probation, or fails after the host rolled back.
    pub async fn activate(
        &self,
        service: &str,
        release: &str,
        cause: &str,
        op_id: &str,
    ) -> Result<ServiceView, EngineError> {
        self.request(service, |reply| Request::Activate {
            release: release.to_string(),
            cause: cause.to_string(),
            op_id: op_id.to_string(),
            reply,
        })
        .await
    }

    /// Makes the release in probation the host's last known good.
    pub async fn commit(&self, service: &str, release: &str) -> Result<ServiceView, EngineError> {
        self.request(service, |reply| Request::Commit {
            release: release.to_string(),
            reply,
        })
        .await
    }

    /// Rolls the service back to `to`, or to its last known good (or previous)
    /// release.
    pub async fn rollback(
        &self,
        service: &str,
        to: Option<&str>,
        reason: &str,
        cause: &str,
    ) -> Result<ServiceView, EngineError> {
        if let Some(t) = to {
            validate_name("release", t).map_err(|e| EngineError::Invalid(e.to_string()))?;
        }
        self.request(service, |reply| Request::Rollback {
            to: to.map(str::to_string),
            reason: reason.to_string(),
            cause: cause.to_string(),
            reply,
        })
        .await
    }

    /// Stops the workers (services keep running; a restarted agent adopts them).
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        let tasks: Vec<_> = match self.workers.lock() {
            Ok(mut w) => w.drain().map(|(_, h)| h.task).collect(),
            Err(_) => Vec::new(),
        };
        for t in tasks {
            let _ = t.await;
        }
    }
}

fn history(
    service: &str,
    release: &str,
    event: &str,
    reason: Option<String>,
    cause: &str,
) -> HistoryEntry {
    HistoryEntry {
        seq: 0,
        service: service.to_string(),
        release: release.to_string(),
        event: event.to_string(),
        reason,
        at_ms: now_ms(),
        cause: cause.to_string(),
    }
}

/// Health monitoring of the running release.
struct Monitor {
    rx: watch::Receiver<HealthView>,
    /// Whether the release is being judged (any phase but idle and
    /// degraded): the monitor samples resources often only then.
    judged: watch::Sender<bool>,
    cancel: CancellationToken,
    task: JoinHandle<()>,
}

/// Whether a release in `phase` is being judged (activated, verified, in
/// probation or being rolled back to), as opposed to committed or given up on.
fn judged(phase: Phase) -> bool {
    !matches!(phase, Phase::Idle | Phase::Degraded)
}

struct Worker {
    deps: Deps,
    record: ServiceRecord,
    monitor: Option<Monitor>,
    live: LiveHealth,
    view: watch::Sender<ServiceView>,
    changes: broadcast::Sender<String>,
    cancel: CancellationToken,
}

/// Why an activation step failed.
struct StepError {
    kind: FailureKind,
    reason: String,
}

impl Worker {
    fn service(&self) -> &str {
        &self.record.service
    }

    fn publish(&self) {
        if let Some(m) = &self.monitor {
            let judged = judged(self.record.phase);
            m.judged
                .send_if_modified(|j| std::mem::replace(j, judged) != judged);
        }
        let health = self.monitor.as_ref().map(|m| m.rx.borrow().clone());
        let view = ServiceView {
            record: self.record.clone(),
            health,
        };
        let changed = self.view.send_if_modified(|old| {
            let changed = *old != view;
            *old = view;
            changed
        });
        if changed {
            let _ = self.changes.send(self.record.service.clone());
        }
    }

    /// Persists the record (with history lines) and publishes it.
    fn persist(&mut self, history_lines: Vec<HistoryEntry>) -> Result<(), StoreError> {
        self.deps.store.commit(Write {
            service: Some(self.record.clone()),
            history: history_lines,
            ..Default::default()
        })?;
        self.publish();
        Ok(())
    }

    /// Test-only crash point: SIGKILL ourselves at a named journal point.
    fn crash_point(&self, mark: &str) {
        if cfg!(feature = "crash-points") {
            let here = format!("{}:{mark}", self.record.phase.step_name());
            if self.deps.config.crash_at.as_deref() == Some(here.as_str()) {
                error!(point = %here, "crash point reached; killing the agent");
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::this(),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }

    /// Applies `event`, journals the new phase as intent (flushed), and hits
    /// the crash point.
    fn enter(&mut self, event: Event) -> Result<(), EngineError> {
        self.record.phase = self.record.phase.next(event)?;
        if let Some(op) = self.record.op.as_mut() {
            op.step_done = false;
        }
        self.persist(Vec::new())?;
        self.crash_point("intent");
        Ok(())
    }

    /// Marks the current step done in the journal (flushed).
    fn done(&mut self) -> Result<(), EngineError> {
        if let Some(op) = self.record.op.as_mut() {
            op.step_done = true;
        }
        self.persist(Vec::new())?;
        self.crash_point("done");
        Ok(())
    }

    fn release_def(&self, release: Option<&str>) -> Result<Option<ServiceDefinition>, EngineError> {
        match release {
            None => Ok(None),
            Some(r) => Ok(self.deps.store.release(self.service(), r)?.map(|r| {
                let mut d = crate::release::with_host_env(r.definition, &self.deps.config.host_env);
                d.run_as = self.deps.config.run_as;
                d
            })),
        }
    }

    fn busy_name(&self) -> String {
        let op = self.record.op.as_ref();
        let what = match op.map(|o| o.kind) {
            Some(OpKind::Activate) => "activation of",
            Some(OpKind::Rollback) => "rollback to",
            None => "operation on",
        };
        let rel = op
            .and_then(|o| o.to.clone())
            .unwrap_or_else(|| "(none)".into());
        format!("{what} {rel} (phase {})", self.record.phase)
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        let busy = Busy::new(self.service().to_string());
        let name = format!("recovery of {}", self.service());
        busy.set(&name);
        let recovered = {
            let fut = self.recover();
            guarded(&mut rx, &busy, fut).await
        };
        if let Err(e) = recovered {
            error!(service = %self.service(), error = %e, "recovery failed");
            self.record.last_error = Some(format!("recovery failed: {e}"));
            self.publish();
        }
        loop {
            let in_probation = self.record.phase == Phase::Probation;
            let deadline = self
                .record
                .op
                .as_ref()
                .and_then(|o| o.commit_deadline_ms)
                .map(|ms| Instant::now() + Duration::from_millis((ms - now_ms()).max(0) as u64));
            let mut health_rx = self.monitor.as_ref().map(|m| m.rx.clone());
            let health_changed = async {
                match health_rx.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => futures::future::pending().await,
                }
            };
            let probation_deadline = async {
                match (in_probation, deadline) {
                    (true, Some(d)) => tokio::time::sleep_until(d).await,
                    _ => futures::future::pending().await,
                }
            };
            tokio::select! {
                req = rx.recv() => {
                    let Some(req) = req else { break };
                    busy.set(&self.describe(&req));
                    let fut = self.serve(req);
                    guarded(&mut rx, &busy, fut).await;
                }
                ok = health_changed => {
                    if !ok {
                        continue;
                    }
                    self.publish();
                    // Mark the change seen, or the next clone wakes at once (a busy loop).
                    let verdict = self.monitor.as_mut().map(|m| m.rx.borrow_and_update().verdict.clone());
                    if let (true, Some(Verdict::Unhealthy(reason))) = (in_probation, verdict) {
                        warn!(service = %self.service(), reason = %reason, "unhealthy in probation; rolling back");
                        busy.set(&format!("automatic rollback of {}", self.service()));
                        let fut = self.auto_rollback(Event::Unhealthy, format!("unhealthy in probation: {reason}"));
                        if let Err(e) = guarded(&mut rx, &busy, fut).await {
                            error!(service = %self.service(), error = %e, "automatic rollback failed");
                        }
                    }
                }
                () = probation_deadline => {
                    warn!(service = %self.service(), "no commit before commit_deadline; rolling back");
                    busy.set(&format!("automatic rollback of {}", self.service()));
                    let fut = self.auto_rollback(Event::CommitDeadline, "no commit from the coordinator before commit_deadline".into());
                    if let Err(e) = guarded(&mut rx, &busy, fut).await {
                        error!(service = %self.service(), error = %e, "automatic rollback failed");
                    }
                }
                () = self.cancel.cancelled() => break,
            }
        }
        if let Some(m) = self.monitor.take() {
            m.cancel.cancel();
            let _ = m.task.await;
        }
    }

    fn describe(&self, req: &Request) -> String {
        match req {
            Request::Activate { release, .. } => format!("activation of {release}"),
            Request::Commit { release, .. } => format!("commit of {release}"),
            Request::Rollback { to, .. } => format!(
                "rollback to {}",
                to.clone()
                    .unwrap_or_else(|| "the last known good release".into())
            ),
        }
    }

    async fn serve(&mut self, req: Request) {
        match req {
            Request::Activate {
                release,
                cause,
                op_id,
                reply,
            } => {
                let r = self.activate(&release, &cause, &op_id).await;
                let _ = reply.send(r.map(|()| self.view.borrow().clone()));
            }
            Request::Commit { release, reply } => {
                let r = self.commit(&release);
                let _ = reply.send(r.map(|()| self.view.borrow().clone()));
            }
            Request::Rollback {
                to,
                reason,
                cause,
                reply,
            } => {
                let r = self.manual_rollback(to, reason, cause).await;
                let _ = reply.send(r.map(|()| self.view.borrow().clone()));
            }
        }
    }

    // ---- activation ----

    async fn activate(
        &mut self,
        release: &str,
        cause: &str,
        op_id: &str,
    ) -> Result<(), EngineError> {
        let service = self.service().to_string();
        match self.record.phase {
            Phase::Idle | Phase::Degraded => {}
            Phase::Probation => {
                let cur = self.record.current.clone().unwrap_or_default();
                if cur == release {
                    // A retried activate of the release already in probation.
                    return Ok(());
                }
                return Err(EngineError::WrongPhase {
                    service,
                    message: format!(
                        "release {cur} is in probation; commit it or roll it back before activating {release}"
                    ),
                });
            }
            _ => {
                return Err(EngineError::Busy {
                    service,
                    operation: self.busy_name(),
                });
            }
        }
        if self.record.phase == Phase::Idle && self.record.current.as_deref() == Some(release) {
            // Already active and committed: nothing to do.
            return Ok(());
        }
        let def = self
            .release_def(Some(release))?
            .filter(|_| self.deps.installer.is_staged(&service, release))
            .ok_or_else(|| EngineError::NotStaged {
                service: service.clone(),
                release: release.to_string(),
            })?;
        let from = self.record.current.clone();
        let from_def = self.release_def(from.as_deref())?;
        info!(service = %service, release, from = ?from, cause, "activating");
        self.record.op = Some(Operation {
            id: op_id.to_string(),
            kind: OpKind::Activate,
            from: from.clone(),
            to: Some(release.to_string()),
            cause: cause.to_string(),
            reason: None,
            started_at_ms: now_ms(),
            commit_deadline_ms: None,
            step_done: false,
        });
        self.record.last_error = None;
        // The running release's steady state is what the new one is compared to.
        if let (Some(cur), Some(steady)) = (
            from.clone(),
            self.monitor.as_ref().and_then(|m| m.rx.borrow().steady),
        ) {
            self.record.baseline = Some(crate::state::Baseline {
                release: cur,
                rss_bytes: steady.rss_bytes,
                cpu_percent: steady.cpu_percent,
            });
        }
        self.record.phase = self.record.phase.next(Event::Activate)?;
        self.persist(vec![history(&service, release, "activating", None, cause)])?;
        self.crash_point("intent");

        let release_dir = self.deps.layout.release_dir(&service, release);
        let log = self.deps.layout.log_file(&service, release);
        let env = service_env(&def, &release_dir);
        for step in ActivateStep::ALL {
            if step != ActivateStep::BeforeStop {
                self.enter(Event::StepDone)?;
            }
            debug_assert_eq!(self.record.phase, Phase::Activating(step));
            let result = match step {
                ActivateStep::BeforeStop => {
                    self.hook(
                        "before_stop",
                        def.hooks.before_stop.as_ref(),
                        &release_dir,
                        &env,
                        &log,
                    )
                    .await
                }
                ActivateStep::Stop => {
                    self.stop_monitor().await;
                    self.deps
                        .supervisor
                        .stop(
                            &service,
                            from_def.as_ref(),
                            &self.deps.layout.releases_dir(&service),
                            Some(&log),
                        )
                        .await
                        .map_err(|e| StepError {
                            kind: FailureKind::HookFailed,
                            reason: e.to_string(),
                        })
                }
                ActivateStep::BeforeSwitch => {
                    self.hook(
                        "before_switch",
                        def.hooks.before_switch.as_ref(),
                        &release_dir,
                        &env,
                        &log,
                    )
                    .await
                }
                ActivateStep::Switch => match self.deps.installer.switch_current(&service, release)
                {
                    Ok(()) => {
                        self.record.current = Some(release.to_string());
                        self.record.process = None;
                        Ok(())
                    }
                    Err(e) => Err(StepError {
                        kind: FailureKind::Internal,
                        reason: e.to_string(),
                    }),
                },
                ActivateStep::AfterSwitch => {
                    self.hook(
                        "after_switch",
                        def.hooks.after_switch.as_ref(),
                        &release_dir,
                        &env,
                        &log,
                    )
                    .await
                }
                ActivateStep::Start => {
                    match self.deps.supervisor.start(&def, &release_dir, &log).await {
                        Ok(()) => {
                            self.record.process = self.deps.supervisor.process(&service);
                            Ok(())
                        }
                        Err(e) => Err(StepError {
                            kind: FailureKind::HookFailed,
                            reason: e.to_string(),
                        }),
                    }
                }
            };
            if let Err(e) = result {
                return Err(self.fail_activation(release, e).await);
            }
            self.done()?;
        }
        // Verify.
        self.enter(Event::StepDone)?;
        self.start_monitor(&def);
        match self.wait_healthy(&def).await {
            Ok(()) => {
                self.record.phase = self.record.phase.next(Event::Healthy)?;
                if let Some(op) = self.record.op.as_mut() {
                    op.commit_deadline_ms = Some(now_ms() + def.commit_deadline.as_millis() as i64);
                    op.step_done = false;
                }
                self.persist(vec![history(&service, release, "verified", None, cause)])?;
                self.deps.config.metrics.operation("activate", "ok");
                self.crash_point("intent");
                info!(service = %service, release, "healthy; in probation until commit");
                Ok(())
            }
            Err(reason) => Err(self
                .fail_activation(
                    release,
                    StepError {
                        kind: if reason.contains(crate::health::tracker::RESOURCE_PREFIX) {
                            FailureKind::ResourceRegression
                        } else {
                            FailureKind::Unhealthy
                        },
                        reason,
                    },
                )
                .await),
        }
    }

    async fn hook(
        &self,
        name: &str,
        cmd: Option<&Command>,
        dir: &std::path::Path,
        env: &std::collections::BTreeMap<String, String>,
        log: &std::path::Path,
    ) -> Result<(), StepError> {
        let Some(cmd) = cmd else { return Ok(()) };
        if let Some(parent) = log.parent() {
            let _ = std::fs::create_dir_all(parent);
        }
        run_command(cmd, dir, env, Some(log), self.deps.config.run_as)
            .await
            .map_err(|e| StepError {
                kind: FailureKind::HookFailed,
                reason: format!("hook {name}: {e}"),
            })
    }

    /// Rolls back a failed activation and builds the error to return.
    async fn fail_activation(&mut self, release: &str, e: StepError) -> EngineError {
        let service = self.service().to_string();
        if self.cancel.is_cancelled() {
            // Not a verdict: the journal stays put and recovery rolls back.
            return EngineError::ShuttingDown;
        }
        warn!(service = %service, release, reason = %e.reason, "activation failed; rolling back");
        self.deps.config.metrics.operation("activate", "failed");
        let event = if self.record.phase == Phase::Verifying {
            Event::Unhealthy
        } else {
            Event::StepFailed
        };
        let outcome = match self.auto_rollback(event, e.reason.clone()).await {
            Ok(()) => format!(
                "rolled back to {}",
                self.record
                    .current
                    .clone()
                    .unwrap_or_else(|| "no release".into())
            ),
            Err(err) => format!("the rollback failed too: {err}"),
        };
        EngineError::ActivationFailed {
            service,
            release: release.to_string(),
            kind: e.kind,
            reason: e.reason,
            outcome,
        }
    }

    fn start_monitor(&mut self, def: &ServiceDefinition) {
        let dir = self.deps.layout.release_dir(&def.service, &def.release);
        let cancel = self.cancel.child_token();
        let (judged_tx, judged_rx) = watch::channel(judged(self.record.phase));
        let (rx, task) = spawn_monitor(
            crate::health::tracker::MonitorSpec {
                checks: def.health_checks.clone(),
                thresholds: def.thresholds.clone(),
                ctx: ProbeContext {
                    env: service_env(def, &dir),
                    release_dir: dir,
                    run_as: def.run_as,
                },
                baseline: self
                    .record
                    .baseline
                    .as_ref()
                    .filter(|b| b.release != def.release)
                    .map(|b| crate::host_stats::ProcessSample {
                        rss_bytes: b.rss_bytes,
                        cpu_percent: b.cpu_percent,
                    }),
                grid: self.deps.config.wake_grid,
            },
            self.deps.probe.clone(),
            self.deps.stats.clone(),
            self.deps.supervisor.watch(&def.service),
            judged_rx,
            cancel.clone(),
        );
        if let Ok(mut l) = self.live.lock() {
            *l = Some(rx.clone());
        }
        self.monitor = Some(Monitor {
            rx,
            judged: judged_tx,
            cancel,
            task,
        });
        self.publish();
    }

    async fn stop_monitor(&mut self) {
        if let Ok(mut l) = self.live.lock() {
            *l = None;
        }
        if let Some(m) = self.monitor.take() {
            m.cancel.cancel();
            let _ = m.task.await;
            self.publish();
        }
    }

    /// Healthy continuously for `min_healthy_time` within `healthy_deadline`.
    async fn wait_healthy(&mut self, def: &ServiceDefinition) -> Result<(), String> {
        let Some(mut rx) = self.monitor.as_ref().map(|m| m.rx.clone()) else {
            return Err("no health monitor".into());
        };
        let end = Instant::now() + def.healthy_deadline;
        let mut since: Option<Instant> = None;
        loop {
            let view = rx.borrow_and_update().clone();
            self.publish();
            let now = Instant::now();
            // A resource gate fails verify at once: waiting cannot fix it.
            if let Verdict::Unhealthy(r) = &view.verdict
                && r.starts_with(crate::health::tracker::RESOURCE_PREFIX)
            {
                return Err(r.clone());
            }
            // Nor can waiting help a process that is gone for good or keeps
            // exiting: such a release fails now, not at healthy_deadline.
            if view.gave_up {
                return Err(format!(
                    "the service process exited and its restart policy does not start it again; {}",
                    Self::see_log(&self.deps.layout.log_file(&def.service, &def.release))
                ));
            }
            if view.exits >= crate::health::tracker::CRASH_LOOP_EXITS {
                return Err(format!(
                    "the service process exited {} times before it was healthy for {} (a crash loop); {}",
                    view.exits,
                    humantime::format_duration(def.min_healthy_time),
                    Self::see_log(&self.deps.layout.log_file(&def.service, &def.release))
                ));
            }
            if view.verdict.is_healthy() {
                let s = *since.get_or_insert(now);
                if now.duration_since(s) >= def.min_healthy_time {
                    return Ok(());
                }
            } else {
                since = None;
            }
            if now >= end {
                let why = match (&view.verdict, &view.last_failure) {
                    (Verdict::Unhealthy(r), _) => r.clone(),
                    (_, Some(f)) => f.clone(),
                    (Verdict::Healthy, None) => "healthy for less than min_healthy_time".into(),
                    (Verdict::Pending, None) => "health checks never passed".into(),
                };
                return Err(format!(
                    "not healthy for {} within healthy_deadline {}: {why}",
                    humantime::format_duration(def.min_healthy_time),
                    humantime::format_duration(def.healthy_deadline)
                ));
            }
            let wake = match since {
                Some(s) => (s + def.min_healthy_time).min(end),
                None => end,
            };
            tokio::select! {
                r = rx.changed() => if r.is_err() { return Err("health monitor stopped".into()) },
                () = tokio::time::sleep_until(wake) => {}
                () = self.cancel.cancelled() => return Err("agent shutting down".into()),
            }
        }
    }

    /// Where an operator finds why a service process exited.
    fn see_log(log: &std::path::Path) -> String {
        format!("its output is in {}", log.display())
    }

    // ---- commit ----

    fn commit(&mut self, release: &str) -> Result<(), EngineError> {
        let service = self.service().to_string();
        let current = self.record.current.clone();
        if self.record.phase == Phase::Idle
            && current.as_deref() == Some(release)
            && self.record.last_known_good.as_deref() == Some(release)
        {
            return Ok(());
        }
        if self.record.phase != Phase::Probation || current.as_deref() != Some(release) {
            return Err(EngineError::WrongPhase {
                service,
                message: format!(
                    "cannot commit {release}: the service is {} on release {}; only a release in probation can be committed",
                    self.record.phase,
                    current.unwrap_or_else(|| "(none)".into())
                ),
            });
        }
        let cause = self
            .record
            .op
            .as_ref()
            .map(|o| o.cause.clone())
            .unwrap_or_default();
        self.record.phase = self.record.phase.next(Event::Commit)?;
        if self.record.last_known_good.as_deref() != Some(release) {
            self.record.previous = self.record.last_known_good.take();
        }
        self.record.last_known_good = Some(release.to_string());
        self.record.op = None;
        self.persist(vec![history(&service, release, "committed", None, &cause)])?;
        self.deps.config.metrics.operation("commit", "ok");
        info!(service = %service, release, "committed");
        self.retain();
        Ok(())
    }

    /// Deletes unpacked releases beyond the newest `retain_releases`, never a
    /// protected one.
    fn retain(&mut self) {
        let service = self.service().to_string();
        let releases = match self.deps.store.releases(&service) {
            Ok(r) => r,
            Err(e) => {
                warn!(service = %service, error = %e, "retention: cannot list releases");
                return;
            }
        };
        let keep = self.deps.config.retain_releases.max(1);
        if releases.len() <= keep {
            return;
        }
        let protected: Vec<String> = self.record.protected().map(str::to_string).collect();
        let excess = releases.len() - keep;
        let doomed: Vec<String> = releases
            .iter()
            .map(|r| r.release().to_string())
            .take(excess)
            .filter(|r| !protected.contains(r))
            .collect();
        if doomed.is_empty() {
            return;
        }
        let write = Write {
            delete_releases: doomed
                .iter()
                .map(|r| (service.clone(), r.clone()))
                .collect(),
            ..Default::default()
        };
        if let Err(e) = self.deps.store.commit(write) {
            warn!(service = %service, error = %e, "retention: cannot forget releases");
            return;
        }
        for r in doomed {
            info!(service = %service, release = %r, "retention: removing release");
            if let Err(e) = self.deps.installer.remove_release(&service, &r) {
                warn!(service = %service, release = %r, error = %e, "retention: cannot remove release directory");
            }
        }
    }

    // ---- rollback ----

    /// The default rollback target: the last known good release unless it is
    /// the release being left, else the one committed before it.
    fn default_target(&self) -> Option<String> {
        // The release being left: an activation's target even before the
        // switch (when `current` still names the last known good).
        let cur = match &self.record.op {
            Some(op) if op.kind == OpKind::Activate => op.to.as_deref(),
            _ => self.record.current.as_deref(),
        };
        match self.record.last_known_good.as_deref() {
            Some(lkg) if Some(lkg) != cur => Some(lkg.to_string()),
            _ => self.record.previous.clone(),
        }
    }

    async fn manual_rollback(
        &mut self,
        to: Option<String>,
        reason: String,
        cause: String,
    ) -> Result<(), EngineError> {
        let service = self.service().to_string();
        if self.record.phase.is_busy() {
            return Err(EngineError::Busy {
                service,
                operation: self.busy_name(),
            });
        }
        let target = match to {
            Some(t) => Some(t),
            None => self.default_target(),
        };
        let Some(target) = target else {
            return Err(EngineError::WrongPhase {
                service,
                message: "there is no earlier release to roll back to; name one with --to".into(),
            });
        };
        if self.release_def(Some(&target))?.is_none()
            || !self.deps.installer.is_staged(&service, &target)
        {
            return Err(EngineError::NotStaged {
                service,
                release: target,
            });
        }
        let reason = if reason.is_empty() {
            "requested by an operator".to_string()
        } else {
            reason
        };
        self.rollback_to(Event::RollbackRequested, Some(target), reason, cause, None)
            .await
    }

    /// The host's own decision to roll back (failed activation, unhealthy in
    /// probation, commit deadline, recovery).
    async fn auto_rollback(&mut self, event: Event, reason: String) -> Result<(), EngineError> {
        let target = self
            .default_target()
            .filter(|t| self.deps.installer.is_staged(self.service(), t));
        let cause = self
            .record
            .op
            .as_ref()
            .map(|o| o.cause.clone())
            .unwrap_or_else(|| "host".into());
        self.rollback_to(event, target, reason, cause, None).await
    }

    /// Stop, switch to `target` (or to nothing), start, verify. Every step is
    /// idempotent; `restart` resumes an interrupted rollback (op kept).
    async fn rollback_to(
        &mut self,
        event: Event,
        target: Option<String>,
        reason: String,
        cause: String,
        resume: Option<Operation>,
    ) -> Result<(), EngineError> {
        let service = self.service().to_string();
        let from = self.record.current.clone();
        let failed_release = from.clone().unwrap_or_default();
        self.record.phase = self.record.phase.next(event)?;
        self.record.op = Some(match resume {
            Some(mut op) => {
                op.step_done = false;
                op
            }
            None => Operation {
                id: format!("rollback-{}", now_ms()),
                kind: OpKind::Rollback,
                from: from.clone(),
                to: target.clone(),
                cause: cause.clone(),
                reason: Some(reason.clone()),
                started_at_ms: now_ms(),
                commit_deadline_ms: None,
                step_done: false,
            },
        });
        self.record.last_error = Some(reason.clone());
        let target_name = target.clone().unwrap_or_else(|| "(none)".into());
        warn!(service = %service, from = ?from, to = %target_name, reason = %reason, "rolling back");
        self.persist(vec![history(
            &service,
            &failed_release,
            "rolling_back",
            Some(format!("to {target_name}: {reason}")),
            &cause,
        )])?;
        self.deps.config.metrics.rollback(event, &cause, &reason);
        self.crash_point("intent");

        // Stop whatever runs: the current release's definition knows how.
        self.stop_monitor().await;
        let running_def = match self.release_def(from.as_deref())? {
            Some(d) => Some(d),
            None => self.release_def(target.as_deref())?,
        };
        let target_def = self.release_def(target.as_deref())?;
        let log = target
            .as_deref()
            .map(|t| self.deps.layout.log_file(&service, t));
        if let Some(l) = log.as_ref().and_then(|l| l.parent()) {
            let _ = std::fs::create_dir_all(l);
        }
        let stopped = self
            .deps
            .supervisor
            .stop(
                &service,
                running_def.as_ref(),
                &self.deps.layout.releases_dir(&service),
                log.as_deref(),
            )
            .await;
        if let Err(e) = stopped {
            return self.rollback_failed(&target_name, format!("stop: {e}"), &cause);
        }
        self.done()?;

        self.enter(Event::StepDone)?; // switch
        let switched = match &target {
            Some(t) => self.deps.installer.switch_current(&service, t),
            None => self.deps.installer.clear_current(&service),
        };
        if let Err(e) = switched {
            return self.rollback_failed(&target_name, format!("switch: {e}"), &cause);
        }
        self.record.current = target.clone();
        self.record.process = None;
        self.done()?;

        self.enter(Event::StepDone)?; // start
        if let (Some(def), Some(log)) = (&target_def, &log) {
            let dir = self.deps.layout.release_dir(&service, &def.release);
            if let Err(e) = self.deps.supervisor.start(def, &dir, log).await {
                return self.rollback_failed(&target_name, format!("start: {e}"), &cause);
            }
            self.record.process = self.deps.supervisor.process(&service);
        }
        self.done()?;

        self.enter(Event::StepDone)?; // verify
        if let Some(def) = &target_def {
            self.start_monitor(def);
            if let Err(why) = self.wait_healthy(def).await {
                if self.cancel.is_cancelled() {
                    // Left journaled; recovery finishes the rollback.
                    return Err(EngineError::ShuttingDown);
                }
                return self.rollback_failed(&target_name, why, &cause);
            }
        }
        self.record.phase = self.record.phase.next(Event::Healthy)?;
        if target.is_some() && self.record.last_known_good != target {
            // An explicit rollback to an older release makes it the known good.
            self.record.last_known_good = target.clone();
        }
        if self.record.previous == target {
            self.record.previous = self.committed_before(target.as_deref(), from.as_deref());
        }
        self.record.op = None;
        self.persist(vec![history(
            &service,
            &target_name,
            "rolled_back",
            Some(format!(
                "from {}: {reason}",
                from.unwrap_or_else(|| "(none)".into())
            )),
            &cause,
        )])?;
        self.deps.config.metrics.operation("rollback", "ok");
        info!(service = %service, to = %target_name, "rollback complete");
        Ok(())
    }

    /// The newest committed release other than `a` and `b` that is still staged.
    fn committed_before(&self, a: Option<&str>, b: Option<&str>) -> Option<String> {
        let hist = self
            .deps
            .store
            .history(self.service(), crate::state::HISTORY_KEEP)
            .ok()?;
        hist.iter()
            .rev()
            .filter(|h| h.event == "committed" || h.event == "rolled_back")
            .map(|h| h.release.as_str())
            .find(|r| {
                Some(*r) != a && Some(*r) != b && self.deps.installer.is_staged(self.service(), r)
            })
            .map(str::to_string)
    }

    fn rollback_failed(
        &mut self,
        target: &str,
        reason: String,
        cause: &str,
    ) -> Result<(), EngineError> {
        let service = self.service().to_string();
        error!(service = %service, target, reason = %reason, "rollback did not restore a healthy service");
        self.record.phase = match self.record.phase {
            Phase::RollingBack(RollbackStep::Verify) => self.record.phase.next(Event::Unhealthy)?,
            p => p.next(Event::StepFailed)?,
        };
        self.record.op = None;
        self.record.last_error = Some(format!("rollback to {target} failed: {reason}"));
        self.persist(vec![history(
            &service,
            target,
            "rollback_failed",
            Some(reason.clone()),
            cause,
        )])?;
        self.deps.config.metrics.operation("rollback", "failed");
        Err(EngineError::RollbackFailed {
            service,
            target: target.to_string(),
            reason,
        })
    }

    // ---- recovery ----

    async fn recover(&mut self) -> Result<(), EngineError> {
        let service = self.service().to_string();
        let phase = self.record.phase;
        let next = phase.next(Event::Recover)?;
        match (phase, next) {
            (_, Phase::RollingBack(_)) => {
                let step = phase.step_name();
                let (target, resume) = match self.record.op.clone() {
                    Some(op) if op.kind == OpKind::Rollback => (op.to.clone(), Some(op)),
                    _ => (
                        self.default_target()
                            .filter(|t| self.deps.installer.is_staged(&service, t)),
                        None,
                    ),
                };
                let reason = match &resume {
                    Some(op) => op
                        .reason
                        .clone()
                        .unwrap_or_else(|| "rollback interrupted".into()),
                    None => format!("the agent restarted during {step}"),
                };
                let cause = self
                    .record
                    .op
                    .as_ref()
                    .map(|o| o.cause.clone())
                    .unwrap_or_else(|| "host".into());
                warn!(service = %service, step = %step, "recovering an unfinished operation by rolling back");
                // Re-enter through a phase that accepts the rollback event.
                self.record.phase = phase;
                let event = Event::Recover;
                self.rollback_to(event, target, reason, cause, resume).await
            }
            (Phase::Probation, _) | (Phase::Idle, _) | (Phase::Degraded, _) => {
                self.ensure_running().await?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// After an agent restart: make sure `current` matches the journal and the
    /// service runs (adopting a process that survived), then watch its health.
    async fn ensure_running(&mut self) -> Result<(), EngineError> {
        let service = self.service().to_string();
        let Some(current) = self.record.current.clone() else {
            return Ok(());
        };
        let Some(def) = self.release_def(Some(&current))? else {
            warn!(service = %service, release = %current, "current release has no stored definition");
            return Ok(());
        };
        match self.deps.installer.read_current(&service) {
            Ok(Some(link)) if link == current => {}
            other => {
                warn!(service = %service, link = ?other.ok().flatten(), journal = %current, "current link disagrees with the journal; fixing it");
                self.deps
                    .installer
                    .switch_current(&service, &current)
                    .map_err(|source| EngineError::Stage {
                        service: service.clone(),
                        release: current.clone(),
                        source: Box::new(source),
                    })?;
            }
        }
        let dir = self.deps.layout.release_dir(&service, &current);
        let log = self.deps.layout.log_file(&service, &current);
        let adopted = self
            .deps
            .supervisor
            .adopt(&def, &dir, &log, self.record.process.as_ref())
            .await;
        if !adopted {
            info!(service = %service, release = %current, "starting service after agent restart");
            let releases = self.deps.layout.releases_dir(&service);
            if let Err(e) = self
                .deps
                .supervisor
                .stop(&service, Some(&def), &releases, Some(&log))
                .await
            {
                warn!(service = %service, error = %e, "could not clear strays");
            }
            if let Err(e) = self.deps.supervisor.start(&def, &dir, &log).await {
                self.record.last_error = Some(format!("start after agent restart: {e}"));
            }
        }
        self.record.process = self.deps.supervisor.process(&service);
        self.persist(Vec::new())?;
        self.start_monitor(&def);
        Ok(())
    }
}

/// The name of the operation a worker is executing, for busy errors.
#[derive(Clone)]
struct Busy {
    service: String,
    what: Arc<Mutex<String>>,
}

impl Busy {
    fn new(service: String) -> Self {
        Busy {
            service,
            what: Arc::new(Mutex::new(String::new())),
        }
    }

    fn set(&self, what: &str) {
        if let Ok(mut w) = self.what.lock() {
            *w = what.to_string();
        }
    }

    fn error(&self) -> EngineError {
        EngineError::Busy {
            service: self.service.clone(),
            operation: self.what.lock().map(|w| w.clone()).unwrap_or_default(),
        }
    }
}

/// Drives `fut` to completion, refusing every request that arrives meanwhile.
async fn guarded<F: std::future::Future>(
    rx: &mut mpsc::Receiver<Request>,
    busy: &Busy,
    fut: F,
) -> F::Output {
    tokio::pin!(fut);
    loop {
        tokio::select! {
            out = &mut fut => return out,
            Some(req) = rx.recv() => req.refuse(busy.error()),
        }
    }
}

#[cfg(test)]
#[path = "executor_tests.rs"]
mod tests;
