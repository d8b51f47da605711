//! Tests of the engine with fake supervisor and probes.
//!
//! The engine runs for real: the real [`Installer`] stages tar.gz artifacts
//! built here from a [`MemorySource`] into a temporary data directory, and
//! hooks run as real commands. Only the effects on the host's services are
//! faked: [`FakeSupervisor`] records what it is asked to do, [`FakeProbe`]
//! answers health checks per release as the test decides, [`FixedStats`]
//! returns fixed figures. Outcomes are awaited (the engine's own futures) or
//! polled with a deadline ([`eventually`]); no test sleeps to wait for one.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::sync::MutexGuard;

use futures::FutureExt;
use futures::future::BoxFuture;
use tempfile::TempDir;

use super::*;
use crate::health::probe::ProbeOutcome;
use crate::health::tracker::ProcessWatch;
use crate::host_stats::FixedStats;
use crate::release::{
    Artifact, CheckKind, HealthCheck, Hooks, RestartPolicy, Supervision, Thresholds,
};
use crate::state::{MemoryStore, ProcessRecord, SledStore};
use crate::update::installer::{ArchiveLimits, MemorySource};
use crate::update::supervisor::SuperviseError;

const SVC: &str = "web";

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

// ---- fakes ----

/// What the fake supervisor believes runs.
#[derive(Debug, Default)]
struct SupState {
    /// Every call, in order: `start web v2`, `stop web v1`, `adopt web v1`.
    calls: Vec<String>,
    /// Per service: the release running and whether its process is alive.
    running: HashMap<String, (String, bool)>,
    /// Releases whose start fails.
    fail_start: HashSet<String>,
    /// What `adopt` answers.
    adopt: bool,
    /// Per service: exits of its own since the release's start, and whether
    /// the supervisor gave up on it.
    exits: HashMap<String, (u32, bool)>,
}

/// A supervisor that runs nothing and records everything.
#[derive(Debug, Default)]
struct FakeSupervisor {
    state: Arc<Mutex<SupState>>,
}

impl FakeSupervisor {
    fn calls(&self) -> Vec<String> {
        lock(&self.state).calls.clone()
    }

    fn running(&self, service: &str) -> Option<String> {
        lock(&self.state)
            .running
            .get(service)
            .map(|(r, _)| r.clone())
    }

    fn fail_start(&self, release: &str) {
        lock(&self.state).fail_start.insert(release.to_string());
    }

    fn set_adopt(&self, adopt: bool) {
        lock(&self.state).adopt = adopt;
    }

    /// The service's process dies (and stays dead until the next start).
    fn kill(&self, service: &str) {
        if let Some(entry) = lock(&self.state).running.get_mut(service) {
            entry.1 = false;
        }
    }

    /// The service's process exits on its own; `restart`: the supervisor
    /// starts it again at once, else it stays dead, given up.
    fn exit(&self, service: &str, restart: bool) {
        let mut st = lock(&self.state);
        let e = st.exits.entry(service.to_string()).or_default();
        e.0 += 1;
        e.1 = !restart;
        if let Some(entry) = st.running.get_mut(service) {
            entry.1 = restart;
        }
    }

    /// Index of the first call equal to `call` after index `after`.
    fn position_after(&self, after: Option<usize>, call: &str) -> Option<usize> {
        let start = after.map_or(0, |a| a + 1);
        self.calls()
            .iter()
            .enumerate()
            .skip(start)
            .find(|(_, c)| c.as_str() == call)
            .map(|(i, _)| i)
    }
}

impl Supervisor for FakeSupervisor {
    fn start<'a>(
        &'a self,
        def: &'a ServiceDefinition,
        _release_dir: &'a Path,
        _log: &'a Path,
    ) -> BoxFuture<'a, Result<(), SuperviseError>> {
        async move {
            let mut st = lock(&self.state);
            st.calls
                .push(format!("start {} {}", def.service, def.release));
            if st.fail_start.contains(&def.release) {
                return Err(SuperviseError::Spawn {
                    service: def.service.clone(),
                    program: "./run.sh".into(),
                    source: std::io::Error::other("simulated start failure"),
                });
            }
            st.running
                .insert(def.service.clone(), (def.release.clone(), true));
            st.exits.remove(&def.service);
            Ok(())
        }
        .boxed()
    }

    fn stop<'a>(
        &'a self,
        service: &'a str,
        def: Option<&'a ServiceDefinition>,
        _releases_dir: &'a Path,
        _log: Option<&'a Path>,
    ) -> BoxFuture<'a, Result<(), SuperviseError>> {
        async move {
            let mut st = lock(&self.state);
            let rel = def.map_or("-", |d| d.release.as_str());
            st.calls.push(format!("stop {service} {rel}"));
            st.running.remove(service);
            Ok(())
        }
        .boxed()
    }

    fn adopt<'a>(
        &'a self,
        def: &'a ServiceDefinition,
        _release_dir: &'a Path,
        _log: &'a Path,
        _record: Option<&'a ProcessRecord>,
    ) -> BoxFuture<'a, bool> {
        async move {
            let mut st = lock(&self.state);
            st.calls
                .push(format!("adopt {} {}", def.service, def.release));
            if st.adopt {
                st.running
                    .insert(def.service.clone(), (def.release.clone(), true));
            }
            st.adopt
        }
        .boxed()
    }

    fn process(&self, service: &str) -> Option<ProcessRecord> {
        lock(&self.state)
            .running
            .get(service)
            .map(|(release, _)| ProcessRecord {
                pid: 4242,
                start_time: Some(1),
                release: release.clone(),
            })
    }

    fn watch(&self, service: &str) -> Arc<dyn ProcessWatch> {
        Arc::new(FakeWatch {
            state: self.state.clone(),
            service: service.to_string(),
        })
    }
}

/// Liveness as the fake supervisor sees it.
#[derive(Debug)]
struct FakeWatch {
    state: Arc<Mutex<SupState>>,
    service: String,
}

impl ProcessWatch for FakeWatch {
    fn pid(&self) -> Option<u32> {
        lock(&self.state)
            .running
            .contains_key(&self.service)
            .then_some(4242)
    }

    fn alive(&self) -> bool {
        lock(&self.state)
            .running
            .get(&self.service)
            .is_some_and(|(_, alive)| *alive)
    }

    fn exits(&self) -> u32 {
        lock(&self.state)
            .exits
            .get(&self.service)
            .map_or(0, |e| e.0)
    }

    fn gave_up(&self) -> bool {
        lock(&self.state)
            .exits
            .get(&self.service)
            .is_some_and(|e| e.1)
    }
}

/// Health answers per release (by the release directory's name); `Pass`
/// unless told otherwise.
#[derive(Debug, Default)]
struct FakeProbe {
    outcomes: Arc<Mutex<HashMap<String, ProbeOutcome>>>,
}

impl FakeProbe {
    fn set(&self, release: &str, outcome: ProbeOutcome) {
        lock(&self.outcomes).insert(release.to_string(), outcome);
    }

    fn fail(&self, release: &str) {
        self.set(release, ProbeOutcome::Fail(format!("{release} refuses")));
    }

    fn pass(&self, release: &str) {
        self.set(release, ProbeOutcome::Pass);
    }
}

impl HealthProbe for FakeProbe {
    fn probe<'a>(
        &'a self,
        _check: &'a HealthCheck,
        ctx: &'a ProbeContext,
    ) -> BoxFuture<'a, ProbeOutcome> {
        let release = ctx
            .release_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let outcome = lock(&self.outcomes)
            .get(&release)
            .cloned()
            .unwrap_or(ProbeOutcome::Pass);
        futures::future::ready(outcome).boxed()
    }
}

// ---- harness ----

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StoreKind {
    Memory,
    Sled,
}

/// One host: a data directory, the fakes, a store and (once started) an engine.
struct Host {
    dir: TempDir,
    layout: Layout,
    source: Arc<MemorySource>,
    installer: Arc<Installer>,
    supervisor: Arc<FakeSupervisor>,
    probe: Arc<FakeProbe>,
    kind: StoreKind,
    store: Option<Arc<dyn StateStore>>,
    engine: Option<Arc<Engine>>,
    config: EngineConfig,
}

impl Host {
    fn new(kind: StoreKind) -> Host {
        let dir = tempfile::tempdir().expect("tempdir");
        let layout = Layout::new(dir.path());
        let source = Arc::new(MemorySource::default());
        let installer = Arc::new(Installer::new(
            layout.clone(),
            ArchiveLimits::default(),
            source.clone(),
        ));
        let mut host = Host {
            dir,
            layout,
            source,
            installer,
            supervisor: Arc::new(FakeSupervisor::default()),
            probe: Arc::new(FakeProbe::default()),
            kind,
            store: None,
            engine: None,
            config: EngineConfig::default(),
        };
        host.open_store();
        host
    }

    fn open_store(&mut self) {
        let store: Arc<dyn StateStore> = match self.kind {
            StoreKind::Memory => Arc::new(MemoryStore::default()),
            StoreKind::Sled => {
                Arc::new(SledStore::open_after_close(&self.dir.path().join("state")))
            }
        };
        self.store = Some(store);
    }

    fn store(&self) -> &Arc<dyn StateStore> {
        self.store.as_ref().expect("store open")
    }

    fn engine(&self) -> &Arc<Engine> {
        self.engine.as_ref().expect("engine started")
    }

    /// Starts an engine on the store; its workers recover from the journal.
    fn start(&mut self) -> Arc<Engine> {
        let stats: Arc<Mutex<dyn HostStats>> = Arc::new(Mutex::new(FixedStats::default()));
        let engine = Engine::start(Deps {
            store: self.store().clone(),
            installer: self.installer.clone(),
            supervisor: self.supervisor.clone(),
            probe: self.probe.clone(),
            stats,
            layout: self.layout.clone(),
            config: self.config.clone(),
        })
        .expect("engine start");
        self.engine = Some(engine.clone());
        engine
    }

    /// Stops the engine and lets go of the store (sled's lock included).
    async fn stop(&mut self) {
        if let Some(engine) = self.engine.take() {
            engine.shutdown().await;
            assert_eq!(
                Arc::strong_count(&engine),
                1,
                "a test still holds the engine"
            );
        }
        self.store = None;
    }

    /// An agent restart: stop, reopen the store, start again.
    async fn restart(&mut self) -> Arc<Engine> {
        self.stop().await;
        self.open_store();
        self.start()
    }

    /// A definition of `release` of [`SVC`] whose artifact the source serves.
    fn def(&self, release: &str) -> ServiceDefinition {
        let data = artifact(release);
        let size = data.len() as u64;
        let digest = self.source.insert(data);
        ServiceDefinition {
            service: SVC.into(),
            release: release.into(),
            artifact: Artifact {
                digest,
                size,
                signature: None,
            },
            supervision: Supervision::Exec {
                argv: vec!["./run.sh".into()],
                restart: RestartPolicy::OnFailure,
                stop_timeout: Duration::from_secs(1),
            },
            env: BTreeMap::new(),
            hooks: Hooks::default(),
            health_checks: vec![HealthCheck {
                name: "port".into(),
                kind: CheckKind::Tcp {
                    address: "127.0.0.1:1".into(),
                },
                interval: Duration::from_millis(20),
                timeout: Duration::from_millis(100),
                failure_threshold: 1,
                success_threshold: 1,
            }],
            thresholds: Thresholds::default(),
            min_healthy_time: Duration::from_millis(100),
            healthy_deadline: Duration::from_secs(1),
            commit_deadline: Duration::from_secs(60),
            run_as: None,
        }
    }

    async fn stage(&self, def: &ServiceDefinition) {
        self.engine()
            .stage(def.clone())
            .await
            .unwrap_or_else(|e| panic!("stage {}: {e}", def.release));
    }

    async fn activate(&self, release: &str) -> Result<ServiceView, EngineError> {
        self.engine()
            .activate(SVC, release, "rollout-1", &format!("op-{release}"))
            .await
    }

    /// Stage, activate and commit.
    async fn deploy(&self, def: &ServiceDefinition) -> ServiceView {
        self.stage(def).await;
        let view = self
            .activate(&def.release)
            .await
            .unwrap_or_else(|e| panic!("activate {}: {e}", def.release));
        assert_eq!(view.record.phase, Phase::Probation);
        let view = self
            .engine()
            .commit(SVC, &def.release)
            .await
            .unwrap_or_else(|e| panic!("commit {}: {e}", def.release));
        assert_eq!(view.record.phase, Phase::Idle);
        view
    }

    fn view(&self) -> ServiceView {
        self.engine().view(SVC).expect("service known")
    }

    fn record(&self) -> ServiceRecord {
        self.view().record
    }

    /// History as `event release` lines, oldest first.
    fn history(&self) -> Vec<HistoryEntry> {
        self.store().history(SVC, 1000).expect("history")
    }

    fn events(&self) -> Vec<String> {
        self.history()
            .iter()
            .map(|h| format!("{} {}", h.event, h.release))
            .collect()
    }

    fn link(&self) -> Option<String> {
        self.installer.read_current(SVC).expect("read current")
    }

    /// Waits until the service is idle on `release` (or on nothing).
    async fn idle_on(&self, release: Option<&str>) {
        let want = release.map(str::to_string);
        eventually(&format!("idle on {release:?}"), || {
            let r = self.record();
            r.phase == Phase::Idle && r.current == want
        })
        .await;
    }

    /// Writes what a crashed agent would have left: both releases staged (on
    /// disk and in the store), `rec` as the journal, `link` as `current`.
    async fn seed(&self, defs: &[&ServiceDefinition], rec: ServiceRecord, link: Option<&str>) {
        for def in defs {
            self.installer.stage(def).await.expect("stage on disk");
        }
        self.store()
            .commit(Write {
                service: Some(rec),
                put_releases: defs
                    .iter()
                    .map(|d| ReleaseRecord {
                        definition: (*d).clone(),
                        staged_at_ms: now_ms(),
                    })
                    .collect(),
                ..Default::default()
            })
            .expect("seed store");
        match link {
            Some(l) => self.installer.switch_current(SVC, l).expect("link"),
            None => self.installer.clear_current(SVC).expect("unlink"),
        }
    }
}

/// A tar.gz with a start script and a version file naming `release`.
fn artifact(release: &str) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut tar = tar::Builder::new(gz);
    let files = [
        (
            "run.sh",
            format!("#!/bin/sh\necho {release}\nexec sleep 3600\n"),
        ),
        ("VERSION", format!("{release}\n")),
    ];
    for (name, body) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        tar.append_data(&mut header, name, body.as_bytes())
            .expect("append to tar");
    }
    tar.into_inner()
        .expect("finish tar")
        .finish()
        .expect("finish gzip")
}

/// Polls `cond` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        if cond() {
            return;
        }
        assert!(
            std::time::Instant::now() < end,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn hook(argv: &[&str]) -> Option<Command> {
    Some(Command {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(10),
    })
}

fn activation_failure(r: Result<ServiceView, EngineError>) -> (FailureKind, String, String) {
    match r {
        Err(EngineError::ActivationFailed {
            kind,
            reason,
            outcome,
            ..
        }) => (kind, reason, outcome),
        other => panic!("want ActivationFailed, got {other:?}"),
    }
}

fn count(events: &[String], line: &str) -> usize {
    events.iter().filter(|e| e.as_str() == line).count()
}

// ---- activation ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthy_release_reaches_probation_and_commit_makes_it_last_known_good() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    host.deploy(&v1).await;
    host.stage(&v2).await;

    let err = host
        .engine()
        .commit(SVC, "v2")
        .await
        .expect_err("v2 is not in probation");
    assert!(matches!(err, EngineError::WrongPhase { .. }), "{err}");

    let view = host.activate("v2").await.expect("activate v2");
    let rec = &view.record;
    assert_eq!(rec.phase, Phase::Probation);
    assert_eq!(rec.current.as_deref(), Some("v2"));
    assert_eq!(rec.last_known_good.as_deref(), Some("v1"));
    let op = rec.op.as_ref().expect("op kept through probation");
    assert_eq!(op.kind, OpKind::Activate);
    assert_eq!(op.from.as_deref(), Some("v1"));
    assert!(op.commit_deadline_ms.is_some_and(|d| d > now_ms()));
    assert_eq!(host.link().as_deref(), Some("v2"));
    let events = host.events();
    for e in ["staged v2", "activating v2", "verified v2"] {
        assert_eq!(count(&events, e), 1, "{e} in {events:?}");
    }
    let stop_v1 = host.supervisor.position_after(None, "stop web v1");
    assert!(
        host.supervisor
            .position_after(stop_v1, "start web v2")
            .is_some(),
        "v1 stopped, then v2 started: {:?}",
        host.supervisor.calls()
    );

    // A retried activate of the release in probation is a no-op.
    host.activate("v2").await.expect("retried activate");

    let view = host.engine().commit(SVC, "v2").await.expect("commit v2");
    let rec = &view.record;
    assert_eq!(rec.phase, Phase::Idle);
    assert_eq!(rec.current.as_deref(), Some("v2"));
    assert_eq!(rec.last_known_good.as_deref(), Some("v2"));
    assert_eq!(rec.previous.as_deref(), Some("v1"));
    assert_eq!(rec.op, None);
    assert_eq!(
        host.events().last().map(String::as_str),
        Some("committed v2")
    );
    // A retried commit is a no-op.
    host.engine()
        .commit(SVC, "v2")
        .await
        .expect("retried commit");
    assert_eq!(host.supervisor.running(SVC).as_deref(), Some("v2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unhealthy_release_fails_activation_and_rolls_back_to_v1() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    host.deploy(&v1).await;
    host.stage(&v2).await;
    host.probe.fail("v2");

    let (kind, reason, outcome) = activation_failure(host.activate("v2").await);
    assert_eq!(kind, FailureKind::Unhealthy);
    assert!(reason.contains("v2 refuses"), "{reason}");
    assert!(outcome.contains("rolled back to v1"), "{outcome}");

    let rec = host.record();
    assert_eq!(rec.phase, Phase::Idle);
    assert_eq!(rec.current.as_deref(), Some("v1"));
    assert_eq!(rec.last_known_good.as_deref(), Some("v1"));
    assert_eq!(rec.op, None);
    assert_eq!(host.link().as_deref(), Some("v1"));
    let start_v2 = host.supervisor.position_after(None, "start web v2");
    assert!(
        host.supervisor
            .position_after(start_v2, "start web v1")
            .is_some(),
        "v1 started again after v2: {:?}",
        host.supervisor.calls()
    );
    assert_eq!(host.supervisor.running(SVC).as_deref(), Some("v1"));
    let events = host.events();
    assert!(
        events.contains(&"rolling_back v2".to_string()),
        "{events:?}"
    );
    assert_eq!(events.last().map(String::as_str), Some("rolled_back v1"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_failure_fails_activation_as_hook_failed_and_rolls_back() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    host.deploy(&v1).await;
    host.stage(&v2).await;
    host.supervisor.fail_start("v2");

    let (kind, reason, _) = activation_failure(host.activate("v2").await);
    assert_eq!(kind, FailureKind::HookFailed);
    assert!(reason.contains("simulated start failure"), "{reason}");
    let rec = host.record();
    assert_eq!(rec.phase, Phase::Idle);
    assert_eq!(rec.current.as_deref(), Some("v1"));
    assert_eq!(host.link().as_deref(), Some("v1"));
    assert_eq!(host.supervisor.running(SVC).as_deref(), Some("v1"));
    assert_eq!(
        host.events().last().map(String::as_str),
        Some("rolled_back v1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_before_switch_hook_returns_to_v1_without_switching() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let mut v2 = host.def("v2");
    v2.hooks.before_switch = hook(&["false"]);
    host.deploy(&v1).await;
    host.stage(&v2).await;

    let (kind, reason, outcome) = activation_failure(host.activate("v2").await);
    assert_eq!(kind, FailureKind::HookFailed);
    assert!(reason.contains("before_switch"), "{reason}");
    assert!(outcome.contains("rolled back to v1"), "{outcome}");
    let rec = host.record();
    assert_eq!(rec.phase, Phase::Idle);
    assert_eq!(rec.current.as_deref(), Some("v1"));
    assert_eq!(rec.last_known_good.as_deref(), Some("v1"));
    assert_eq!(host.link().as_deref(), Some("v1"));
    assert_eq!(host.supervisor.running(SVC).as_deref(), Some("v1"));
    assert!(
        !host
            .supervisor
            .calls()
            .contains(&"start web v2".to_string()),
        "v2 never started: {:?}",
        host.supervisor.calls()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_in_the_release_directory_with_its_environment() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let mut v1 = host.def("v1");
    let marker = host.dir.path().join("hook-ran");
    v1.hooks.after_switch = hook(&[
        "sh",
        "-c",
        &format!(
            "test \"$(cat VERSION)\" = \"$ROLLOUT_RELEASE\" && echo ok > {}",
            marker.display()
        ),
    ]);
    host.deploy(&v1).await;
    assert!(marker.is_file(), "after_switch hook ran in releases/v1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_failure_in_probation_rolls_back_by_itself() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    host.deploy(&v1).await;
    host.stage(&v2).await;
    host.activate("v2").await.expect("activate v2");

    host.probe.fail("v2");
    host.idle_on(Some("v1")).await;
    assert_eq!(host.link().as_deref(), Some("v1"));
    assert_eq!(host.supervisor.running(SVC).as_deref(), Some("v1"));
    let last = host.history().pop().expect("history");
    assert_eq!(
        (last.event.as_str(), last.release.as_str()),
        ("rolled_back", "v1")
    );
    let reason = last.reason.unwrap_or_default();
    assert!(reason.contains("unhealthy in probation"), "{reason}");
    // Committing the rolled-back release is refused.
    let err = host.engine().commit(SVC, "v2").await.expect_err("gone");
    assert!(matches!(err, EngineError::WrongPhase { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn process_death_in_probation_rolls_back_by_itself() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    host.deploy(&v1).await;
    host.stage(&v2).await;
    host.activate("v2").await.expect("activate v2");

    host.supervisor.kill(SVC);
    host.idle_on(Some("v1")).await;
    let reason = host
        .history()
        .pop()
        .and_then(|h| h.reason)
        .unwrap_or_default();
    assert!(reason.contains("not running"), "{reason}");
}

type Activation = tokio::task::JoinHandle<Result<ServiceView, EngineError>>;

/// Deploys v1, then activates v2 (checks failing, `healthy_deadline`) in a
/// task, returned once v2 is being verified.
async fn verifying_v2(host: &Host, healthy_deadline: Duration) -> Activation {
    let v1 = host.def("v1");
    let mut v2 = host.def("v2");
    v2.healthy_deadline = healthy_deadline;
    host.deploy(&v1).await;
    host.stage(&v2).await;
    host.probe.fail("v2");
    let engine = host.engine().clone();
    let activation =
        tokio::spawn(async move { engine.activate(SVC, "v2", "rollout-1", "op-v2").await });
    eventually("verifying v2", || host.record().phase == Phase::Verifying).await;
    activation
}

/// Activates v2, whose checks never pass, with a healthy_deadline far longer
/// than any wait of the test; `exits` make its process exit meanwhile. The
/// activation must fail well before healthy_deadline.
async fn activation_of_a_release_that_exits(
    host: &Host,
    exits: impl FnOnce(&FakeSupervisor),
) -> (FailureKind, String, String) {
    let activation = verifying_v2(host, Duration::from_secs(300)).await;
    exits(&host.supervisor);
    let result = tokio::time::timeout(Duration::from_secs(20), activation)
        .await
        .expect("the activation fails before healthy_deadline (300 s)")
        .expect("activation task");
    let failure = activation_failure(result);
    let rec = host.record();
    assert_eq!(
        (rec.phase, rec.current.as_deref()),
        (Phase::Idle, Some("v1"))
    );
    assert_eq!(host.link().as_deref(), Some("v1"));
    failure
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_process_keeps_exiting_fails_at_once_as_a_crash_loop() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let (kind, reason, outcome) = activation_of_a_release_that_exits(&host, |sup| {
        for _ in 0..crate::health::tracker::CRASH_LOOP_EXITS {
            sup.exit(SVC, true);
        }
    })
    .await;
    assert_eq!(kind, FailureKind::Unhealthy);
    assert!(
        reason.contains("exited 2 times") && reason.contains("crash loop"),
        "{reason}"
    );
    assert!(
        reason.contains("web/logs/v2.log"),
        "names the service's log: {reason}"
    );
    assert!(outcome.contains("rolled back to v1"), "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_whose_process_exits_for_good_fails_at_once() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let (kind, reason, outcome) =
        activation_of_a_release_that_exits(&host, |sup| sup.exit(SVC, false)).await;
    assert_eq!(kind, FailureKind::Unhealthy);
    assert!(reason.contains("does not start it again"), "{reason}");
    assert!(outcome.contains("rolled back to v1"), "{outcome}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_release_that_exits_fewer_times_than_a_crash_loop_still_gets_its_deadline() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let activation = verifying_v2(&host, Duration::from_secs(300)).await;
    for _ in 1..crate::health::tracker::CRASH_LOOP_EXITS {
        host.supervisor.exit(SVC, true);
    }
    // The monitor has seen the exits once the agent's view of v2 shows them
    // (it polls the fake's liveness every 250 ms); v2 is still being verified.
    let want = crate::health::tracker::CRASH_LOOP_EXITS - 1;
    eventually("the exits seen", || {
        host.view().health.is_some_and(|h| h.exits == want)
    })
    .await;
    assert_eq!(host.record().phase, Phase::Verifying);
    // It then becomes healthy and passes.
    host.probe.pass("v2");
    let view = activation
        .await
        .expect("activation task")
        .expect("v2 becomes healthy");
    assert_eq!(view.record.phase, Phase::Probation);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_commit_before_commit_deadline_rolls_back_by_itself() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let mut v2 = host.def("v2");
    v2.commit_deadline = Duration::from_millis(300);
    host.deploy(&v1).await;
    host.stage(&v2).await;
    let view = host.activate("v2").await.expect("activate v2");
    assert_eq!(view.record.phase, Phase::Probation);

    host.idle_on(Some("v1")).await;
    assert_eq!(host.link().as_deref(), Some("v1"));
    let reason = host
        .history()
        .pop()
        .and_then(|h| h.reason)
        .unwrap_or_default();
    assert!(reason.contains("commit_deadline"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_during_verification_are_refused_as_busy_naming_the_activation() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let activation = verifying_v2(&host, Duration::from_secs(5)).await;
    let v3 = host.def("v3");

    // Staging never touches the running service and is allowed meanwhile.
    host.stage(&v3).await;
    let refused = [
        host.engine().commit(SVC, "v2").await,
        host.activate("v3").await,
        host.engine().rollback(SVC, None, "", "admin").await,
    ];
    for r in refused {
        match r {
            Err(e @ EngineError::Busy { .. }) => {
                assert_eq!(e.kind(), FailureKind::Busy);
                let msg = e.to_string();
                assert!(msg.contains("activation of v2"), "{msg}");
            }
            other => panic!("want Busy, got {other:?}"),
        }
    }

    host.probe.pass("v2");
    let view = activation
        .await
        .expect("activation task")
        .expect("v2 becomes healthy in time");
    assert_eq!(view.record.phase, Phase::Probation);
    assert_eq!(view.record.current.as_deref(), Some("v2"));
    host.engine().commit(SVC, "v2").await.expect("commit v2");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_staging_of_two_releases_stages_both() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    let engine = host.engine().clone();
    let (a, b) = tokio::join!(engine.stage(v1.clone()), engine.stage(v2.clone()));
    for (r, def) in [(a, &v1), (b, &v2)] {
        match r {
            Ok(_) => {}
            Err(EngineError::Busy { operation, .. }) => {
                assert!(operation.contains("staging"), "{operation}");
                host.stage(def).await;
            }
            Err(e) => panic!("stage {}: {e}", def.release),
        }
    }
    for def in [&v1, &v2] {
        assert!(host.installer.is_staged(SVC, &def.release));
        let stored = host
            .store()
            .release(SVC, &def.release)
            .expect("read")
            .expect("recorded");
        assert_eq!(&stored.definition, def);
        assert_eq!(
            host.installer
                .staged_digest(SVC, &def.release)
                .expect("digest"),
            Some(def.artifact.digest)
        );
    }
    assert_eq!(host.engine().views().len(), 1, "one worker for the service");
    host.deploy(&v2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_release_unhealthy_rolls_back_to_nothing() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    host.stage(&v1).await;
    host.probe.fail("v1");

    let (kind, _, outcome) = activation_failure(host.activate("v1").await);
    assert_eq!(kind, FailureKind::Unhealthy);
    assert!(outcome.contains("no release"), "{outcome}");
    let rec = host.record();
    assert_eq!(rec.phase, Phase::Idle);
    assert_eq!(rec.current, None);
    assert_eq!(rec.last_known_good, None);
    assert_eq!(host.link(), None);
    assert_eq!(host.supervisor.running(SVC), None);
    assert_eq!(host.view().health, None, "nothing runs, nothing monitored");
    // Nothing to roll back to now.
    let err = host
        .engine()
        .rollback(SVC, None, "", "admin")
        .await
        .expect_err("no target");
    assert!(matches!(err, EngineError::WrongPhase { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manual_rollback_returns_to_previous_and_refuses_unknown_target() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    host.deploy(&v1).await;
    host.deploy(&v2).await;

    let view = host
        .engine()
        .rollback(SVC, None, "bad metrics", "admin")
        .await
        .expect("rollback");
    let rec = &view.record;
    assert_eq!(rec.phase, Phase::Idle);
    assert_eq!(rec.current.as_deref(), Some("v1"));
    assert_eq!(rec.last_known_good.as_deref(), Some("v1"));
    assert_eq!(host.link().as_deref(), Some("v1"));
    assert_eq!(host.supervisor.running(SVC).as_deref(), Some("v1"));
    let last = host.history().pop().expect("history");
    assert_eq!(last.event, "rolled_back");
    assert_eq!(last.cause, "admin");
    assert!(
        last.reason.as_deref().unwrap_or("").contains("bad metrics"),
        "{last:?}"
    );

    let before = host.record();
    let history_before = host.history().len();
    let err = host
        .engine()
        .rollback(SVC, Some("v9"), "", "admin")
        .await
        .expect_err("v9 unknown");
    assert!(
        matches!(&err, EngineError::NotStaged { release, .. } if release == "v9"),
        "{err}"
    );
    assert_eq!(host.record(), before);
    assert_eq!(host.history().len(), history_before);
    assert_eq!(host.link().as_deref(), Some("v1"));

    let err = host
        .engine()
        .rollback(SVC, Some("../v1"), "", "admin")
        .await
        .expect_err("bad name");
    assert!(matches!(err, EngineError::Invalid(_)), "{err}");
}

// ---- retention ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_releases_and_never_a_protected_one() {
    let mut host = Host::new(StoreKind::Memory);
    host.config.retain_releases = 2;
    host.start();
    for i in 1..=5 {
        let def = host.def(&format!("v{i}"));
        host.deploy(&def).await;
        let rec = host.record();
        for protected in rec.protected() {
            assert!(
                host.installer.is_staged(SVC, protected),
                "{protected} on disk after v{i}"
            );
            assert!(
                host.store()
                    .release(SVC, protected)
                    .expect("read")
                    .is_some(),
                "{protected} in the store after v{i}"
            );
        }
    }
    let rec = host.record();
    assert_eq!(rec.current.as_deref(), Some("v5"));
    assert_eq!(rec.previous.as_deref(), Some("v4"));
    assert_eq!(
        host.installer.staged_releases(SVC).expect("list"),
        vec!["v4".to_string(), "v5".to_string()]
    );
    let stored: Vec<String> = host
        .store()
        .releases(SVC)
        .expect("releases")
        .iter()
        .map(|r| r.release().to_string())
        .collect();
    assert_eq!(stored, vec!["v4".to_string(), "v5".to_string()]);
    // The previous release is still usable.
    host.engine()
        .rollback(SVC, None, "", "admin")
        .await
        .expect("rollback to v4");
    assert_eq!(host.record().current.as_deref(), Some("v4"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_never_removes_a_release_staged_ahead_of_activation() {
    let mut host = Host::new(StoreKind::Memory);
    host.config.retain_releases = 2;
    host.start();
    let defs: Vec<_> = (1..=3).map(|i| host.def(&format!("v{i}"))).collect();
    for d in &defs {
        host.stage(d).await;
    }
    host.deploy(&defs[0]).await;
    for d in &defs {
        assert!(
            host.installer.is_staged(SVC, &d.release),
            "{} kept after committing v1",
            d.release
        );
    }
    host.deploy(&defs[1]).await;
    host.deploy(&defs[2]).await;
    assert_eq!(
        host.installer.staged_releases(SVC).expect("list"),
        vec!["v2".to_string(), "v3".to_string()]
    );
}

// ---- staging ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_is_a_retryable_stage_failure_and_the_retry_resumes() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    host.source.interrupt_once_after(v1.artifact.digest, 10);
    let err = host
        .engine()
        .stage(v1.clone())
        .await
        .expect_err("the download was cut");
    assert_eq!(err.kind(), FailureKind::StageFailed, "{err}");
    assert!(err.retryable(), "{err}");
    // Sent again, the stage resumes where the download stopped.
    host.stage(&v1).await;
    assert_eq!(host.source.fetch_offsets(v1.artifact.digest), [0, 10]);
    // A failure that sending again cannot fix is not retryable.
    let mut v2 = host.def("v2");
    v2.artifact.digest = crate::release::Digest([7; 32]);
    let err = host.engine().stage(v2).await.expect_err("no such artifact");
    assert_eq!(err.kind(), FailureKind::StageFailed, "{err}");
    assert!(!err.retryable(), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staging_a_release_id_again_with_another_definition_is_refused() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let v1 = host.def("v1");
    host.stage(&v1).await;
    let again = host.engine().stage(v1.clone()).await.expect("same again");
    assert!(again.already_present);

    let other_code = ServiceDefinition {
        artifact: host.def("v1-other").artifact,
        ..v1.clone()
    };
    let other_config = ServiceDefinition {
        commit_deadline: Duration::from_secs(1),
        ..v1.clone()
    };
    for def in [other_code, other_config] {
        let err = host.engine().stage(def).await.expect_err("immutable ids");
        assert!(matches!(err, EngineError::Invalid(_)), "{err}");
        assert!(err.to_string().contains("different definition"), "{err}");
    }
    let stored = host
        .store()
        .release(SVC, "v1")
        .expect("read")
        .expect("kept");
    assert_eq!(stored.definition, v1);
    assert_eq!(
        host.installer.staged_digest(SVC, "v1").expect("digest"),
        Some(v1.artifact.digest)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_for_unknown_services_or_unstaged_releases_are_refused() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let err = host.activate("v1").await.expect_err("unknown service");
    assert!(matches!(err, EngineError::UnknownService(_)), "{err}");
    let v1 = host.def("v1");
    host.stage(&v1).await;
    let err = host.activate("v2").await.expect_err("not staged");
    assert!(matches!(err, EngineError::NotStaged { .. }), "{err}");
    assert_eq!(host.record().phase, Phase::Idle);
}

// ---- recovery ----

/// A journal as a crashed agent leaves it, activating v2 over committed v1.
fn crashed_record(phase: Phase, step_done: bool, current: &str) -> ServiceRecord {
    let rollback = matches!(phase, Phase::RollingBack(_));
    ServiceRecord {
        service: SVC.into(),
        phase,
        current: Some(current.into()),
        previous: None,
        last_known_good: Some("v1".into()),
        op: Some(Operation {
            id: "op-2".into(),
            kind: if rollback {
                OpKind::Rollback
            } else {
                OpKind::Activate
            },
            from: Some(if rollback { "v2" } else { "v1" }.into()),
            to: Some(if rollback { "v1" } else { "v2" }.into()),
            cause: "rollout-1".into(),
            reason: rollback.then(|| "v2 unhealthy".into()),
            started_at_ms: now_ms() - 1000,
            commit_deadline_ms: None,
            step_done,
        }),
        process: None,
        last_error: None,
        baseline: None,
    }
}

/// Every journal point of an activation and a rollback, with the `current` of
/// the record and the link on disk at that point.
fn crash_points() -> Vec<(Phase, bool, &'static str, &'static str)> {
    let mut points = Vec::new();
    for (i, step) in ActivateStep::ALL.into_iter().enumerate() {
        for done in [false, true] {
            let switched = i > 3 || (step == ActivateStep::Switch && done);
            let current = if switched { "v2" } else { "v1" };
            // At the switch intent the rename may have happened before the crash.
            let link = if step == ActivateStep::Switch {
                "v2"
            } else {
                current
            };
            points.push((Phase::Activating(step), done, current, link));
        }
    }
    points.push((Phase::Verifying, false, "v2", "v2"));
    for step in RollbackStep::ALL {
        for done in [false, true] {
            let back = matches!(step, RollbackStep::Start | RollbackStep::Verify)
                || (step == RollbackStep::Switch && done);
            let current = if back { "v1" } else { "v2" };
            let link = if step == RollbackStep::Switch {
                "v1"
            } else {
                current
            };
            points.push((Phase::RollingBack(step), done, current, link));
        }
    }
    points
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_from_every_journal_point_returns_to_v1() {
    let points = crash_points();
    assert_eq!(points.len(), 6 * 2 + 1 + 4 * 2);
    for (phase, done, current, link) in points {
        let case = format!("{phase} done={done}");
        eprintln!("recovering from {case}");
        let mut host = Host::new(StoreKind::Memory);
        let v1 = host.def("v1");
        let v2 = host.def("v2");
        host.seed(
            &[&v1, &v2],
            crashed_record(phase, done, current),
            Some(link),
        )
        .await;
        host.start();
        host.idle_on(Some("v1")).await;

        let rec = host.record();
        assert_eq!(rec.last_known_good.as_deref(), Some("v1"), "{case}");
        assert_eq!(rec.op, None, "{case}");
        assert_eq!(host.link().as_deref(), Some("v1"), "{case}");
        assert_eq!(
            host.supervisor.running(SVC).as_deref(),
            Some("v1"),
            "{case}"
        );
        let events = host.events();
        assert_eq!(
            events.last().map(String::as_str),
            Some("rolled_back v1"),
            "{case}: {events:?}"
        );
        assert_eq!(count(&events, "rolled_back v1"), 1, "{case}: {events:?}");
        assert!(host.installer.is_staged(SVC, "v2"), "{case}: v2 kept");
        host.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_in_probation_past_its_commit_deadline_rolls_back() {
    let mut host = Host::new(StoreKind::Sled);
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    let mut rec = crashed_record(Phase::Probation, false, "v2");
    if let Some(op) = rec.op.as_mut() {
        op.commit_deadline_ms = Some(now_ms() - 1);
    }
    host.seed(&[&v1, &v2], rec, Some("v2")).await;
    host.start();
    host.idle_on(Some("v1")).await;
    assert_eq!(host.link().as_deref(), Some("v1"));
    let reason = host
        .history()
        .pop()
        .and_then(|h| h.reason)
        .unwrap_or_default();
    assert!(reason.contains("commit_deadline"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_in_probation_before_its_commit_deadline_keeps_probation() {
    let mut host = Host::new(StoreKind::Sled);
    host.supervisor.set_adopt(true);
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    let mut rec = crashed_record(Phase::Probation, false, "v2");
    if let Some(op) = rec.op.as_mut() {
        op.commit_deadline_ms = Some(now_ms() + 60_000);
    }
    // The link disagrees with the journal: recovery fixes the link.
    host.seed(&[&v1, &v2], rec, Some("v1")).await;
    host.start();
    eventually("v2 monitored again", || {
        host.view().health.is_some_and(|h| h.verdict.is_healthy())
    })
    .await;
    let rec = host.record();
    assert_eq!(rec.phase, Phase::Probation);
    assert_eq!(rec.current.as_deref(), Some("v2"));
    assert_eq!(host.link().as_deref(), Some("v2"));
    assert!(
        host.supervisor
            .calls()
            .contains(&"adopt web v2".to_string()),
        "{:?}",
        host.supervisor.calls()
    );
    assert!(
        !host
            .supervisor
            .calls()
            .iter()
            .any(|c| c.starts_with("start")),
        "an adopted process is not restarted: {:?}",
        host.supervisor.calls()
    );

    let view = host.engine().commit(SVC, "v2").await.expect("commit v2");
    assert_eq!(view.record.phase, Phase::Idle);
    assert_eq!(view.record.last_known_good.as_deref(), Some("v2"));
    assert_eq!(view.record.previous.as_deref(), Some("v1"));
    assert!(!host.events().iter().any(|e| e.starts_with("rolled_back")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_survives_a_second_restart_without_rolling_back_again() {
    let mut host = Host::new(StoreKind::Sled);
    let v1 = host.def("v1");
    let v2 = host.def("v2");
    let rec = crashed_record(Phase::Activating(ActivateStep::AfterSwitch), false, "v2");
    host.seed(&[&v1, &v2], rec, Some("v2")).await;
    host.start();
    host.idle_on(Some("v1")).await;
    let events = host.events();
    assert_eq!(count(&events, "rolled_back v1"), 1, "{events:?}");

    // The agent restarts; the service process is gone and is started again.
    host.restart().await;
    eventually("v1 monitored after restart", || {
        host.view().health.is_some_and(|h| h.verdict.is_healthy())
    })
    .await;
    let rec = host.record();
    assert_eq!(rec.phase, Phase::Idle);
    assert_eq!(rec.current.as_deref(), Some("v1"));
    assert_eq!(host.link().as_deref(), Some("v1"));
    assert_eq!(
        host.events(),
        events,
        "no new history after an idle restart"
    );

    // And again, with the process still running: it is adopted.
    host.supervisor.set_adopt(true);
    let starts_before = host
        .supervisor
        .calls()
        .iter()
        .filter(|c| c.starts_with("start"))
        .count();
    host.restart().await;
    eventually("v1 adopted", || {
        host.view().health.is_some_and(|h| h.verdict.is_healthy())
    })
    .await;
    let starts_after = host
        .supervisor
        .calls()
        .iter()
        .filter(|c| c.starts_with("start"))
        .count();
    assert_eq!(starts_after, starts_before, "adopted, not restarted");
    assert_eq!(host.record().phase, Phase::Idle);
    assert_eq!(host.events(), events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_verification_leaves_the_activation_to_recovery() {
    let mut host = Host::new(StoreKind::Sled);
    host.start();
    let activation = verifying_v2(&host, Duration::from_secs(30)).await;

    host.engine().shutdown().await;
    let r = activation.await.expect("activation task");
    assert!(matches!(r, Err(EngineError::ShuttingDown)), "{r:?}");
    // The journal is left where the agent stopped: recovery owns it now.
    let journal = host.store().service(SVC).expect("read").expect("present");
    assert_eq!(journal.phase, Phase::Verifying);
    assert_eq!(journal.current.as_deref(), Some("v2"));
    assert_eq!(host.link().as_deref(), Some("v2"));

    host.restart().await;
    host.idle_on(Some("v1")).await;
    assert_eq!(host.link().as_deref(), Some("v1"));
    assert_eq!(host.supervisor.running(SVC).as_deref(), Some("v1"));
    let events = host.events();
    assert_eq!(events.last().map(String::as_str), Some("rolled_back v1"));
    assert_eq!(count(&events, "rolled_back v1"), 1, "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_rollback_verification_leaves_the_rollback_to_finish_after_restart() {
    let mut host = Host::new(StoreKind::Sled);
    host.start();
    let mut v1 = host.def("v1");
    v1.healthy_deadline = Duration::from_secs(30);
    let v2 = host.def("v2");
    host.deploy(&v1).await;
    host.deploy(&v2).await;
    host.probe.fail("v1");
    let engine = host.engine().clone();
    let rollback = tokio::spawn(async move { engine.rollback(SVC, None, "bad", "admin").await });
    eventually("verifying the rollback", || {
        host.record().phase == Phase::RollingBack(RollbackStep::Verify)
    })
    .await;

    host.engine().shutdown().await;
    let r = rollback.await.expect("rollback task");
    assert!(matches!(r, Err(EngineError::ShuttingDown)), "{r:?}");
    let journal = host.store().service(SVC).expect("read").expect("present");
    assert_eq!(journal.phase, Phase::RollingBack(RollbackStep::Verify));
    assert_eq!(journal.op.map(|o| o.kind), Some(OpKind::Rollback));

    host.probe.pass("v1");
    host.restart().await;
    host.idle_on(Some("v1")).await;
    let rec = host.record();
    assert_eq!(rec.last_known_good.as_deref(), Some("v1"));
    assert_eq!(host.link().as_deref(), Some("v1"));
    let events = host.events();
    assert_eq!(count(&events, "rollback_failed v1"), 0, "{events:?}");
    assert_eq!(events.last().map(String::as_str), Some("rolled_back v1"));
}

// ---- worker hygiene ----

/// CPU time of the calling thread, in clock ticks.
fn thread_cpu_ticks() -> u64 {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("read stat");
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15.
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    tick(11) + tick(12)
}

// Current-thread runtime: the worker and monitor tasks run on this thread, so
// its CPU time is theirs.
#[tokio::test]
async fn an_idle_service_costs_no_cpu_between_health_changes() {
    let mut host = Host::new(StoreKind::Memory);
    host.start();
    let mut v1 = host.def("v1");
    for c in &mut v1.health_checks {
        c.interval = Duration::from_millis(100);
    }
    host.deploy(&v1).await;
    let before = thread_cpu_ticks();
    // A measuring window, not a wait for an outcome.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let used = thread_cpu_ticks() - before;
    assert!(
        used < 20,
        "an idle worker used {used} ticks of CPU in one second"
    );
    assert_eq!(host.record().phase, Phase::Idle);
}
