//! Engine tests against fake agents at the [`Fleet`] level (no network).
//!
//! Every fake host registers with the fleet like a real agent's hello, answers
//! each command on its stream through [`Fleet::on_result`], keeps its own
//! simulated `ServiceReport` (release, phase, history with the rollout id as
//! cause) and reports it through [`Fleet::on_report`]. Every command a fake
//! receives is logged, so tests count activations per host and check order.
//!
//! Waits poll the store against a deadline. The only fixed waits are the short
//! observation windows of negative checks ("nothing is sent while paused").

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rollout_proto::pb;
use rollout_proto::pb::coordinator_message::Cmd;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::model::{Event, Failure, HostProgress, HostState, Rollout, RolloutState, now_ms};
use super::{Engine, EngineError, hosts_in_brief};
use crate::artifacts::Artifacts;
use crate::fleet::Fleet;
use crate::rollout::planner;
use crate::rollout::spec::parse_spec;
use crate::store::{HostsToWrite, Store};

/// How long a test waits for the engine before failing.
const PATIENCE: Duration = Duration::from_secs(30);
/// Observation window of a negative check.
const QUIET: Duration = Duration::from_millis(400);
/// How a fake agent's retryable stage failure starts.
const STAGE_CUT: &str = "artifact source unavailable";
/// How long a blipping fake agent stays away.
const BLIP: Duration = Duration::from_millis(300);

/// 5 hosts in batches of 2: [host-1, host-2], [host-3, host-4], [host-5].
const SPEC_BATCH2: &str = r#"
service = "web"
release = "v2"

[artifact]
path = "web-v2.tar.gz"

[run]
exec = ["./bin/web", "--port", "8080"]

[targets]
labels = { role = "web" }

[strategy]
batch_size = 2
max_unavailable = 2
max_failures = 1
"#;

/// As [`SPEC_BATCH2`] with a 3 s `healthy_deadline`: a host whose stream
/// ends mid-activation gets a 1.5 s grace to reconnect.
const SPEC_BATCH2_FAST: &str = r#"
service = "web"
release = "v2"

[artifact]
path = "web-v2.tar.gz"

[run]
exec = ["./bin/web", "--port", "8080"]

[targets]
labels = { role = "web" }

[strategy]
batch_size = 2
max_unavailable = 2
max_failures = 1
healthy_deadline = "3s"
min_healthy_time = "1s"
"#;

/// One canary host, then everyone (one host at a time), waiting for promote.
const SPEC_CANARY: &str = r#"
service = "web"
release = "v2"

[artifact]
path = "web-v2.tar.gz"

[run]
exec = ["./bin/web"]

[targets]
labels = { role = "web" }

[strategy]
canary = [1, "100%"]
pause_after_canary = true
"#;

// ---- fake agents ----

/// A command as a fake agent received it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Sent {
    host: String,
    kind: &'static str,
    release: String,
}

/// What every fake agent shares: the command log and, to freeze the fleet
/// mid-rollout, how many commands get answers (later ones are carried out but
/// never answered, as when the coordinator dies while waiting).
#[derive(Debug)]
struct Agents {
    sent: Mutex<Vec<Sent>>,
    answered: AtomicUsize,
    /// The coordinator's store, to read its fsync count.
    store: std::sync::OnceLock<Store>,
    /// The store's fsync count when each command of `sent` arrived.
    flushes_at: Mutex<Vec<u64>>,
    /// The store's rollout write count when each command of `sent` arrived.
    writes_at: Mutex<Vec<u64>>,
}

impl Default for Agents {
    fn default() -> Self {
        Agents {
            sent: Mutex::default(),
            answered: AtomicUsize::new(usize::MAX),
            store: std::sync::OnceLock::new(),
            flushes_at: Mutex::default(),
            writes_at: Mutex::default(),
        }
    }
}

type Log = Arc<Agents>;

/// One simulated agent.
#[derive(Debug, Default)]
struct Sim {
    name: String,
    /// Activation fails verification (the agent rolls back on its own).
    fail_activate: AtomicBool,
    /// Activation happens but its result is never sent (a coordinator crash
    /// while it waits).
    hold_activate: AtomicBool,
    /// The agent switches to the release, then its stream drops (killed mid-batch).
    die_on_activate: AtomicBool,
    /// The stream drops when a Rollback arrives, before the agent acts on it
    /// (the host is cut off during the fleet rollback).
    die_on_rollback: AtomicBool,
    /// The agent activates, its stream drops and it reconnects shortly after
    /// (a network blip during its own activation); once.
    blip_on_activate: AtomicBool,
    /// The stream drops when a Commit arrives, before the agent acts on it,
    /// and the agent reconnects shortly after; once.
    blip_on_commit: AtomicBool,
    /// The release turns unhealthy in probation: the agent rolls back on its
    /// own when the Commit arrives, and refuses it.
    fail_in_probation: AtomicBool,
    /// RSS the service reports once activated (0: none).
    rss_on_activate: AtomicU64,
    /// This many Stage commands fail as a cut artifact download would:
    /// `stage_failed`, retryable.
    stage_cuts: AtomicUsize,
    /// Every Stage fails for good (`stage_failed`, not retryable: disk full).
    stage_no_space: AtomicBool,
    report: Mutex<pb::ServiceReport>,
    session: AtomicU64,
    seq: AtomicU64,
}

impl Sim {
    fn new(name: &str) -> Sim {
        Sim {
            name: name.to_string(),
            report: Mutex::new(pb::ServiceReport {
                service: "web".into(),
                current_release: "v1".into(),
                previous_release: String::new(),
                last_known_good: "v1".into(),
                phase: pb::Phase::Idle as i32,
                step: "idle".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn snapshot(&self) -> pb::ServiceReport {
        self.report.lock().expect("report").clone()
    }

    fn report(&self) -> pb::Report {
        pb::Report {
            services: vec![self.snapshot()],
            ..Default::default()
        }
    }

    fn history(&self, s: &mut pb::ServiceReport, release: &str, event: &str, cause: &str) {
        s.recent.push(pb::HistoryEntry {
            seq: self.seq.fetch_add(1, Ordering::SeqCst) + 1,
            release: release.to_string(),
            event: event.to_string(),
            reason: String::new(),
            at_ms: now_ms(),
            cause: cause.to_string(),
        });
    }

    /// Changes the simulated service.
    fn with(&self, f: impl FnOnce(&Sim, &mut pb::ServiceReport)) {
        let mut s = self.report.lock().expect("report");
        f(self, &mut s);
    }

    /// Makes the simulated service "already activated by rollout `cause`":
    /// on `release` in probation, with the history entry a real agent writes.
    fn activated(&self, release: &str, cause: &str) {
        self.with(|me, s| {
            me.history(s, release, "activating", cause);
            s.previous_release = std::mem::replace(&mut s.current_release, release.into());
            s.phase = pb::Phase::Probation as i32;
            s.step = "probation".into();
            s.rss_bytes = me.rss_on_activate.load(Ordering::SeqCst);
        });
    }

    /// Handles one command; `None` means no answer is sent.
    fn handle(&self, fleet: &Fleet, cmd: Cmd) -> Option<(bool, pb::FailureKind, String)> {
        let ok = Some((true, pb::FailureKind::Unspecified, String::new()));
        let answer = match cmd {
            Cmd::Stage(_)
                if self
                    .stage_cuts
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok() =>
            {
                Some((
                    false,
                    pb::FailureKind::StageFailed,
                    format!("{STAGE_CUT}: connection reset"),
                ))
            }
            Cmd::Stage(_) if self.stage_no_space.load(Ordering::SeqCst) => Some((
                false,
                pb::FailureKind::StageFailed,
                "no space left on device while trying to unpack".to_string(),
            )),
            Cmd::Stage(st) => {
                let release = st.definition.map(|d| d.release).unwrap_or_default();
                self.with(|me, s| me.history(s, &release, "staged", ""));
                ok
            }
            Cmd::Activate(a) => {
                if self.fail_activate.load(Ordering::SeqCst) {
                    // Verification failed; the agent returned to its old release.
                    self.with(|me, s| {
                        me.history(s, &a.release, "activating", &a.cause);
                        let back = s.current_release.clone();
                        me.history(s, &back, "rolled_back", &a.cause);
                        s.phase = pb::Phase::Idle as i32;
                    });
                    Some((
                        false,
                        pb::FailureKind::Unhealthy,
                        "health check http failed 3 times".to_string(),
                    ))
                } else {
                    self.activated(&a.release, &a.cause);
                    if self.die_on_activate.load(Ordering::SeqCst)
                        || self.blip_on_activate.load(Ordering::SeqCst)
                    {
                        fleet.on_report(&self.name, self.report());
                        fleet.unregister(&self.name, self.session.load(Ordering::SeqCst));
                        return None;
                    }
                    if self.hold_activate.load(Ordering::SeqCst) {
                        fleet.on_report(&self.name, self.report());
                        return None;
                    }
                    ok
                }
            }
            Cmd::Commit(c) if self.fail_in_probation.load(Ordering::SeqCst) => {
                self.with(|me, s| {
                    if s.current_release == c.release {
                        me.history(s, &c.release, "rolling_back", "");
                        s.current_release = s.last_known_good.clone();
                        let back = s.current_release.clone();
                        me.history(s, &back, "rolled_back", "");
                        s.phase = pb::Phase::Idle as i32;
                    }
                });
                Some((
                    false,
                    pb::FailureKind::Invalid,
                    format!("{} is not in probation", c.release),
                ))
            }
            Cmd::Commit(c) => {
                let mut done = false;
                self.with(|me, s| {
                    let idle = s.phase == pb::Phase::Idle as i32;
                    if idle && s.current_release == c.release && s.last_known_good == c.release {
                        // Already committed: like the real agent, a no-op.
                        done = true;
                    } else if s.current_release == c.release
                        && s.phase == pb::Phase::Probation as i32
                    {
                        s.phase = pb::Phase::Idle as i32;
                        s.step = "idle".into();
                        s.last_known_good = c.release.clone();
                        me.history(s, &c.release, "committed", "");
                        done = true;
                    }
                });
                if done {
                    ok
                } else {
                    Some((
                        false,
                        pb::FailureKind::Invalid,
                        format!("{} is not in probation", c.release),
                    ))
                }
            }
            Cmd::Rollback(_) if self.die_on_rollback.load(Ordering::SeqCst) => {
                fleet.unregister(&self.name, self.session.load(Ordering::SeqCst));
                return None;
            }
            Cmd::Rollback(rb) => {
                self.with(|me, s| {
                    let to = if rb.to_release.is_empty() {
                        s.last_known_good.clone()
                    } else {
                        rb.to_release.clone()
                    };
                    s.previous_release = std::mem::replace(&mut s.current_release, to.clone());
                    s.last_known_good = to.clone();
                    s.phase = pb::Phase::Idle as i32;
                    s.step = "idle".into();
                    me.history(s, &to, "rolled_back", "");
                });
                ok
            }
            Cmd::Ping(_) => ok,
        };
        fleet.on_report(&self.name, self.report());
        answer
    }
}

fn describe(cmd: &Cmd) -> (&'static str, String) {
    match cmd {
        Cmd::Stage(s) => (
            "stage",
            s.definition
                .as_ref()
                .map(|d| d.release.clone())
                .unwrap_or_default(),
        ),
        Cmd::Activate(a) => ("activate", a.release.clone()),
        Cmd::Commit(c) => ("commit", c.release.clone()),
        Cmd::Rollback(r) => ("rollback", r.to_release.clone()),
        Cmd::Ping(_) => ("ping", String::new()),
    }
}

/// Connects `sim` to `fleet` (a hello with its full report) and answers its
/// commands until the stream ends.
fn connect(fleet: &Arc<Fleet>, sim: &Arc<Sim>, log: &Log) {
    let (tx, mut rx) = mpsc::channel(64);
    let hello = pb::Hello {
        host: sim.name.clone(),
        labels: [("role".to_string(), "web".to_string())].into(),
        agent_version: "fake".into(),
        report: Some(sim.report()),
    };
    let session = fleet.register(&hello, "test".into(), tx);
    sim.session.store(session, Ordering::SeqCst);
    let (fleet, sim, log) = (fleet.clone(), sim.clone(), log.clone());
    tokio::spawn(async move {
        while let Some(item) = rx.recv().await {
            let Ok(msg) = *item else { break };
            let Some(cmd) = msg.cmd else { continue };
            let (kind, release) = describe(&cmd);
            let nth = {
                let mut sent = log.sent.lock().expect("log");
                sent.push(Sent {
                    host: sim.name.clone(),
                    kind,
                    release,
                });
                let flushes = log.store.get().map_or(0, Store::flushes);
                log.flushes_at.lock().expect("log").push(flushes);
                let writes = log.store.get().map_or(0, Store::writes);
                log.writes_at.lock().expect("log").push(writes);
                sent.len()
            };
            let frozen = nth > log.answered.load(Ordering::SeqCst);
            let dies = (kind == "activate" && sim.die_on_activate.load(Ordering::SeqCst))
                || (kind == "rollback" && sim.die_on_rollback.load(Ordering::SeqCst));
            if kind == "commit" && sim.blip_on_commit.swap(false, Ordering::SeqCst) {
                fleet.unregister(&sim.name, sim.session.load(Ordering::SeqCst));
                tokio::spawn(async move {
                    tokio::time::sleep(BLIP).await;
                    connect(&fleet, &sim, &log);
                });
                return;
            }
            let blips = kind == "activate" && sim.blip_on_activate.load(Ordering::SeqCst);
            let answer = sim.handle(&fleet, cmd);
            if blips {
                // Back a moment later, with a hello carrying its report.
                sim.blip_on_activate.store(false, Ordering::SeqCst);
                tokio::spawn(async move {
                    tokio::time::sleep(BLIP).await;
                    connect(&fleet, &sim, &log);
                });
                return;
            }
            if let Some((ok, failure, error)) = answer.filter(|_| !frozen) {
                fleet.on_result(
                    &sim.name,
                    pb::CommandResult {
                        command_id: msg.command_id,
                        ok,
                        failure: failure as i32,
                        retryable: !ok && error.starts_with(STAGE_CUT),
                        error,
                        service: Some(sim.snapshot()),
                    },
                );
            }
            if dies {
                return;
            }
        }
    });
}

// ---- harness ----

struct Harness {
    _dir: tempfile::TempDir,
    store: Store,
    fleet: Arc<Fleet>,
    artifacts: Artifacts,
    digest: String,
    size: u64,
    log: Log,
    sims: BTreeMap<String, Arc<Sim>>,
}

fn host(i: usize) -> String {
    format!("host-{i}")
}

impl Harness {
    /// `n` connected fake hosts `host-1..=host-n`, all on v1, plus a stored
    /// artifact.
    async fn new(n: usize) -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("db")).expect("store");
        let artifacts = Artifacts::new(dir.path().join("artifacts"), 1 << 20);
        let mut up = artifacts.begin().await.expect("upload");
        up.write(b"web v2 release tarball").await.expect("write");
        let (digest, size) = artifacts.finish(up, None).await.expect("finish");
        let fleet = Arc::new(Fleet::new(store.clone()));
        let log: Log = Arc::default();
        let _ = log.store.set(store.clone());
        let mut sims = BTreeMap::new();
        for i in 1..=n {
            let sim = Arc::new(Sim::new(&host(i)));
            connect(&fleet, &sim, &log);
            sims.insert(host(i), sim);
        }
        Harness {
            _dir: dir,
            store,
            fleet,
            artifacts,
            digest,
            size,
            log,
            sims,
        }
    }

    fn sim(&self, host: &str) -> &Arc<Sim> {
        self.sims.get(host).expect("known fake host")
    }

    fn engine(&self) -> Arc<Engine> {
        Engine::new(
            self.store.clone(),
            self.fleet.clone(),
            self.artifacts.clone(),
            CancellationToken::new(),
        )
    }

    /// A restarted coordinator's registry: every fake agent reconnects with a
    /// hello carrying its full report.
    fn restart_fleet(&mut self) {
        self.fleet = Arc::new(Fleet::new(self.store.clone()));
        for sim in self.sims.values() {
            connect(&self.fleet, sim, &self.log);
        }
    }

    /// Changes a fake host's service and reports it.
    fn set(&self, host: &str, f: impl FnOnce(&Sim, &mut pb::ServiceReport)) {
        let sim = self.sim(host);
        sim.with(f);
        self.fleet.on_report(host, sim.report());
    }

    /// A fake host that is on `release` for good (committed earlier).
    fn committed(&self, host: &str, release: &str, cause: &str) {
        self.set(host, |me, s| {
            me.history(s, release, "activating", cause);
            me.history(s, release, "committed", cause);
            s.previous_release = std::mem::replace(&mut s.current_release, release.into());
            s.last_known_good = release.into();
            s.phase = pb::Phase::Idle as i32;
        });
    }

    fn sent(&self) -> Vec<Sent> {
        self.log.sent.lock().expect("log").clone()
    }

    fn count(&self, host: &str, kind: &str) -> usize {
        self.sent()
            .iter()
            .filter(|s| s.host == host && s.kind == kind)
            .count()
    }

    fn get(&self, id: &str) -> Rollout {
        self.store
            .rollout(id)
            .expect("read rollout")
            .expect("rollout exists")
    }

    fn dump(&self, r: &Rollout) -> String {
        let hosts: Vec<String> = r
            .hosts
            .iter()
            .map(|(h, p)| format!("{h}={}/{:?}", p.state.name(), p.failure))
            .collect();
        let events: Vec<String> = self
            .store
            .events(&r.id)
            .unwrap_or_default()
            .iter()
            .map(|e| format!("{} {:?} {}", e.kind, e.host, e.message))
            .collect();
        format!(
            "rollout {} is {} (batch {}, {:?}); hosts {hosts:?}; commands {:?}; events {events:#?}",
            r.id,
            r.state.name(),
            r.current_batch,
            r.message,
            self.sent()
        )
    }

    /// Polls the store until `pred` holds.
    async fn wait_until(&self, id: &str, what: &str, pred: impl Fn(&Rollout) -> bool) -> Rollout {
        let end = Instant::now() + PATIENCE;
        loop {
            let r = self.get(id);
            if pred(&r) {
                return r;
            }
            assert!(
                Instant::now() < end,
                "timed out waiting for {what}: {}",
                self.dump(&r)
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls until every rollout write is durable (a completed fsync
    /// covers it).
    async fn wait_durable(&self, what: &str) {
        let end = Instant::now() + PATIENCE;
        while self.store.not_durable() > 0 {
            assert!(
                Instant::now() < end,
                "{} rollout writes still not durable {what}",
                self.store.not_durable()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls until the rollout is in `state`; fails at once on another
    /// terminal state.
    async fn wait_state(&self, id: &str, state: RolloutState) -> Rollout {
        let r = self
            .wait_until(id, state.name(), |r| {
                r.state == state || r.state.is_terminal()
            })
            .await;
        assert_eq!(r.state, state, "{}", self.dump(&r));
        r
    }

    /// Nothing reaches any fake agent for a while.
    async fn assert_quiet(&self, what: &str) {
        let before = self.sent().len();
        tokio::time::sleep(QUIET).await;
        let after = self.sent();
        assert_eq!(
            after.len(),
            before,
            "{what}: commands were sent: {:?}",
            &after[before..]
        );
    }

    /// A rollout of `spec` as the store would hold it, in `state` at
    /// `current_batch`, each host in its given state (others `Pending`); saved.
    fn persist(
        &self,
        id: &str,
        spec: &str,
        state: RolloutState,
        current_batch: usize,
        states: &[(&str, HostState)],
    ) -> Rollout {
        let spec = parse_spec(spec, Path::new(".")).expect("spec");
        let hosts =
            planner::select_hosts(&spec.targets, &self.fleet.labels()).expect("select hosts");
        self.persist_hosts(id, spec, hosts, state, current_batch, states)
    }

    fn persist_hosts(
        &self,
        id: &str,
        spec: crate::rollout::spec::DeploySpec,
        hosts: Vec<String>,
        state: RolloutState,
        current_batch: usize,
        states: &[(&str, HostState)],
    ) -> Rollout {
        let batches = planner::plan_batches(&hosts, &spec.strategy);
        let mut def = spec.definition.clone();
        def.artifact = Some(pb::Artifact {
            digest: self.digest.clone(),
            size: self.size,
            signature: String::new(),
        });
        let mut progress = BTreeMap::new();
        for (i, b) in batches.iter().enumerate() {
            for h in b {
                let st = states
                    .iter()
                    .find(|(x, _)| x == h)
                    .map(|(_, s)| *s)
                    .unwrap_or(HostState::Pending);
                let touched = !matches!(st, HostState::Pending | HostState::Staged);
                progress.insert(
                    h.clone(),
                    HostProgress {
                        state: st,
                        batch: i,
                        failure: (st == HostState::Failed).then_some(Failure::Unhealthy),
                        reason: String::new(),
                        previous_release: touched.then(|| "v1".to_string()),
                    },
                );
            }
        }
        let now = now_ms();
        let n = hosts.len();
        let r = Rollout {
            id: id.to_string(),
            service: spec.service.clone(),
            release: spec.release.clone(),
            definition: prost::Message::encode_to_vec(&def).into(),
            failure_budget: planner::failure_budget(&spec.strategy, n),
            pause_points: planner::pause_points(&batches, &spec.strategy),
            strategy: spec.strategy.clone(),
            batches: batches.into(),
            state,
            resume_state: None,
            current_batch,
            aborted: false,
            hosts: progress.into_iter().collect(),
            message: "persisted by a test".into(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        self.save(&r);
        r
    }

    fn save(&self, r: &Rollout) {
        let e = Event {
            seq: 0,
            at_ms: now_ms(),
            host: None,
            kind: "created".into(),
            message: "by a test".into(),
        };
        self.store.save_rollout(r, &[e]).expect("save rollout");
    }
}

fn index_of(log: &[Sent], host: &str, kind: &str) -> Option<usize> {
    log.iter().position(|s| s.host == host && s.kind == kind)
}

/// Every host `Committed`, activated exactly once, never rolled back.
fn assert_all_committed_once(h: &Harness, r: &Rollout) {
    for (host, p) in &r.hosts {
        assert_eq!(p.state, HostState::Committed, "{host}: {}", h.dump(r));
        assert_eq!(h.count(host, "activate"), 1, "{host}: {}", h.dump(r));
        assert_eq!(h.count(host, "rollback"), 0, "{host}: {}", h.dump(r));
        let s = h.sim(host).snapshot();
        assert_eq!(
            (s.current_release.as_str(), s.last_known_good.as_str()),
            ("v2", "v2"),
            "{host}"
        );
    }
}

// ---- a rolling deploy ----

#[tokio::test(flavor = "multi_thread")]
async fn deploy_updates_every_host_once_in_batch_order() {
    let h = Harness::new(5).await;
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2, &h.digest, h.size)
        .expect("deploy");
    assert_eq!(
        *r.batches,
        vec![
            vec![host(1), host(2)],
            vec![host(3), host(4)],
            vec![host(5)]
        ]
    );
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_all_committed_once(&h, &r);
    assert_eq!(r.current_batch, 3);

    let log = h.sent();
    for i in 1..=5 {
        assert_eq!(h.count(&host(i), "stage"), 1, "{log:?}");
        assert_eq!(h.count(&host(i), "commit"), 1, "{log:?}");
    }
    // Staged everywhere before the first activation.
    let first_activate = log
        .iter()
        .position(|s| s.kind == "activate")
        .expect("activations");
    assert!(
        log[..first_activate]
            .iter()
            .filter(|s| s.kind == "stage")
            .count()
            == 5,
        "{log:?}"
    );
    // No activation of batch k+1 before every commit of batch k.
    for k in 1..r.batches.len() {
        let last_commit = r.batches[k - 1]
            .iter()
            .map(|x| index_of(&log, x, "commit").expect("commit"))
            .max()
            .expect("batch");
        for x in &r.batches[k] {
            let a = index_of(&log, x, "activate").expect("activate");
            assert!(
                a > last_commit,
                "{x} activated before batch {} committed: {log:?}",
                k - 1
            );
        }
    }
    // Never more than max_unavailable (2) hosts between activate and commit.
    let mut in_flight = std::collections::BTreeSet::new();
    for s in &log {
        match s.kind {
            "activate" => {
                in_flight.insert(s.host.clone());
            }
            "commit" | "rollback" => {
                in_flight.remove(&s.host);
            }
            _ => {}
        }
        assert!(in_flight.len() <= 2, "{in_flight:?} at once: {log:?}");
    }
}

/// A rollout's status is the status of the rollout `get` returns, while
/// cached and once read back from the store; an unknown id is not found.
#[tokio::test(flavor = "multi_thread")]
async fn status_is_the_status_of_the_rollout() {
    let h = Harness::new(5).await;
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2, &h.digest, h.size)
        .expect("deploy");
    assert_eq!(
        engine.status(&r.id).expect("status"),
        engine.get(&r.id).expect("get").status()
    );
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    let status = engine.status(&r.id).expect("status");
    assert_eq!(status, engine.get(&r.id).expect("get").status());
    assert_eq!(
        (status.state.as_str(), status.finished),
        ("succeeded", true)
    );
    assert_eq!(
        status.batches.iter().map(|b| b.hosts.len()).sum::<usize>(),
        5
    );
    // Read back from the store, as a restarted coordinator would.
    let fresh = h.engine();
    assert_eq!(fresh.status(&r.id).expect("status from the store"), status);
    assert!(matches!(
        engine.status("r-none"),
        Err(EngineError::NotFound(_))
    ));
}

/// Where, in the command log of one batch, the first and last Activate and
/// the first Commit are; every Activate comes before the first Commit.
fn activations_and_first_commit(log: &[Sent]) -> (usize, usize, usize) {
    let first = log
        .iter()
        .position(|s| s.kind == "activate")
        .expect("activations");
    let last = log
        .iter()
        .rposition(|s| s.kind == "activate")
        .expect("activations");
    let commit = log
        .iter()
        .position(|s| s.kind == "commit")
        .expect("commits");
    assert!(last < commit, "{log:?}");
    (first, last, commit)
}

/// A rollout of eight fake hosts in one batch, run to its success.
async fn one_batch_of_eight() -> (Harness, Rollout) {
    let h = Harness::new(8).await;
    let engine = h.engine();
    let spec = SPEC_BATCH2
        .replace("batch_size = 2", "batch_size = 8")
        .replace("max_unavailable = 2", "max_unavailable = 8");
    let r = engine.deploy(&spec, &h.digest, h.size).expect("deploy");
    assert_eq!(r.batches.len(), 1);
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_all_committed_once(&h, &r);
    (h, r)
}

/// A batch's results are not flushed before its Commits leave: they are
/// made durable with its end, which, the rollout going straight on, the
/// rollout's next write (here its success) makes durable. A one-batch
/// rollout takes one fsync from its first Activate to its end.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_s_results_are_made_durable_with_its_end() {
    let (h, _) = one_batch_of_eight().await;
    h.wait_durable("after the rollout succeeded").await;
    let log = h.sent();
    let at = h.log.flushes_at.lock().expect("log").clone();
    let (first_activate, last_activate, first_commit) = activations_and_first_commit(&log);
    assert_eq!(
        at[first_commit], at[last_activate],
        "fsyncs between the last Activate and the first Commit: {at:?} {log:?}"
    );
    assert_eq!(
        h.store.flushes() - at[first_activate],
        1,
        "fsyncs from the first Activate to the end: {at:?} {log:?}"
    );
}

/// Activation results that come back together are recorded in one write,
/// not one write each. On one thread, the eight fake agents all answer
/// before the engine looks: one write between the last Activate and the
/// first Commit.
#[tokio::test]
async fn activation_results_that_come_together_are_written_together() {
    let (h, r) = one_batch_of_eight().await;
    let log = h.sent();
    let at = h.log.writes_at.lock().expect("log").clone();
    let (_, last_activate, first_commit) = activations_and_first_commit(&log);
    assert_eq!(
        at[first_commit] - at[last_activate],
        1,
        "rollout writes between the last Activate and the first Commit: {at:?} {log:?}"
    );
    let probation = h
        .store
        .events(&r.id)
        .expect("events")
        .into_iter()
        .filter(|e| e.kind == "probation")
        .count();
    assert_eq!(probation, 8, "{}", h.dump(&r));
}

/// The batch-started message (in the rollout's head, which every write
/// carries) names a batch in full up to ten hosts, else in brief.
#[test]
fn a_large_batch_is_named_in_brief() {
    let hosts = |n: usize| (1..=n).map(host).collect::<Vec<_>>();
    assert_eq!(hosts_in_brief(&hosts(1)), "host-1");
    assert_eq!(hosts_in_brief(&hosts(2)), "host-1,host-2");
    assert_eq!(hosts_in_brief(&hosts(10)).split(',').count(), 10);
    assert_eq!(hosts_in_brief(&hosts(100)), "100 hosts, host-1 … host-100");
}

/// A healthy batch takes one fsync: its start with its hosts `activating`,
/// which also makes the previous batch's results and end durable. Between
/// the first Activates of consecutive batches there is one, not one per
/// event kind.
#[tokio::test(flavor = "multi_thread")]
async fn consecutive_batches_are_joined_by_one_fsync() {
    let h = Harness::new(4).await;
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2, &h.digest, h.size)
        .expect("deploy");
    assert_eq!(r.batches.len(), 2);
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_all_committed_once(&h, &r);
    let log = h.sent();
    let at = h.log.flushes_at.lock().expect("log").clone();
    let second: Vec<String> = r.batches[1].clone();
    let last_commit_0 = log
        .iter()
        .rposition(|s| s.kind == "commit" && !second.contains(&s.host))
        .expect("commits of batch 0");
    let first_activate_0 = log
        .iter()
        .position(|s| s.kind == "activate")
        .expect("activations of batch 0");
    let first_activate_1 = log
        .iter()
        .position(|s| s.kind == "activate" && second.contains(&s.host))
        .expect("activations of batch 1");
    assert!(last_commit_0 < first_activate_1, "{log:?}");
    assert_eq!(
        at[first_activate_1] - at[first_activate_0],
        1,
        "fsyncs between batch 0's first Activate and batch 1's: {at:?} {log:?}"
    );
    // The batch's end follows its commits, and the next batch starts with its
    // hosts activating, in that order in the journal.
    let kinds: Vec<(String, Option<String>)> = h
        .store
        .events(&r.id)
        .expect("events")
        .into_iter()
        .map(|e| (e.kind, e.host))
        .collect();
    let pos = |kind: &str, host: Option<&str>| {
        kinds
            .iter()
            .position(|(k, hh)| k == kind && hh.as_deref() == host)
            .unwrap_or_else(|| panic!("no {kind} {host:?} in {kinds:?}"))
    };
    let done_0 = pos("batch_done", None);
    for hh in &r.batches[0] {
        assert!(pos("committed", Some(hh)) < done_0, "{kinds:?}");
    }
    let started: Vec<usize> = kinds
        .iter()
        .enumerate()
        .filter(|(_, (k, _))| k == "batch_started")
        .map(|(i, _)| i)
        .collect();
    assert_eq!(started.len(), 2, "{kinds:?}");
    assert!(done_0 < started[1], "{kinds:?}");
    for hh in &second {
        assert!(started[1] < pos("activating", Some(hh)), "{kinds:?}");
    }
}

/// A batch waiting for earlier hosts to be available again does not leave
/// the previous batch's end waiting for its start: it is durable while the
/// batch waits.
#[tokio::test(flavor = "multi_thread")]
async fn a_batch_s_end_is_durable_while_the_next_waits_at_the_gate() {
    let h = Harness::new(4).await;
    for i in 1..=4 {
        h.set(&host(i), |_, s| s.health = pb::Health::Unhealthy as i32);
    }
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2, &h.digest, h.size)
        .expect("deploy");
    assert_eq!(r.batches.len(), 2);
    // Batch 0's hosts report unhealthy after their commit: batch 1 (two
    // more) would put four hosts out, over max_unavailable (2).
    let r = h
        .wait_until(&r.id, "batch 0 done", |r| r.current_batch == 1)
        .await;
    h.wait_durable("while batch 1 waits at the gate").await;
    for hh in &r.batches[1] {
        assert_eq!(h.count(hh, "activate"), 0, "{}", h.dump(&r));
    }
    for hh in &r.batches[0] {
        h.set(hh, |_, s| s.health = pb::Health::Healthy as i32);
    }
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_all_committed_once(&h, &r);
}

/// Commits refused by hosts that rolled back in probation put the rollout
/// past its budget: it halts in the same write, the batch is not recorded
/// done and the next batch never starts.
#[tokio::test(flavor = "multi_thread")]
async fn refused_commits_past_the_budget_halt_before_the_batch_ends() {
    let h = Harness::new(4).await;
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2, &h.digest, h.size)
        .expect("deploy");
    assert_eq!(r.failure_budget, 1);
    for hh in &r.batches[0] {
        h.sim(hh).fail_in_probation.store(true, Ordering::SeqCst);
    }
    let r = h.wait_state(&r.id, RolloutState::RolledBack).await;
    for hh in &r.batches[0] {
        let p = &r.hosts[hh];
        assert_eq!(
            (p.state, p.failure),
            (HostState::Failed, Some(Failure::RolledBackByHost)),
            "{}",
            h.dump(&r)
        );
    }
    for hh in &r.batches[1] {
        assert_eq!(h.count(hh, "activate"), 0, "{:?}", h.sent());
    }
    let kinds: Vec<String> = h
        .store
        .events(&r.id)
        .expect("events")
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert!(kinds.contains(&"halted".to_string()), "{kinds:?}");
    assert!(!kinds.contains(&"batch_done".to_string()), "{kinds:?}");
    assert_eq!(
        kinds.iter().filter(|k| *k == "batch_started").count(),
        1,
        "{kinds:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_mid_activation_then_restarted_updates_each_host_once() {
    let mut h = Harness::new(5).await;
    // host-3's activation happens but its result never reaches the first
    // coordinator.
    h.sim(&host(3)).hold_activate.store(true, Ordering::SeqCst);

    let rt1 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let engine1 = h.engine();
    let id = {
        let _in_rt1 = rt1.enter();
        engine1
            .deploy(SPEC_BATCH2, &h.digest, h.size)
            .expect("deploy")
            .id
    };
    let log = h.log.clone();
    h.wait_until(&id, "host-3 activating, host-4 in probation", |r| {
        r.hosts[&host(3)].state == HostState::Activating
            && r.hosts[&host(4)].state == HostState::Probation
            && log
                .sent
                .lock()
                .expect("log")
                .iter()
                .any(|s| s.host == host(3) && s.kind == "activate")
    })
    .await;
    // kill -9: every task of the first coordinator dies where it stands.
    tokio::task::spawn_blocking(move || drop(rt1))
        .await
        .expect("kill the first coordinator");
    drop(engine1);
    h.sim(&host(3)).hold_activate.store(false, Ordering::SeqCst);
    let r = h.get(&id);
    assert_eq!(r.state, RolloutState::Running, "{}", h.dump(&r));
    assert_eq!(r.current_batch, 1, "{}", h.dump(&r));

    // Restart: agents reconnect, the engine resumes from the store.
    h.restart_fleet();
    let engine2 = h.engine();
    engine2.resume_all().expect("resume");
    let r = h.wait_state(&id, RolloutState::Succeeded).await;
    assert_all_committed_once(&h, &r);
    let events = h.store.events(&id).expect("events");
    // The log numbers its events 1, 2, 3, ... across the restart: none lost.
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=events.len() as u64).collect::<Vec<_>>());
    assert!(
        events
            .iter()
            .any(|e| e.kind == "reconciled" && e.host.as_deref() == Some("host-3")),
        "{}",
        h.dump(&r)
    );
    engine2.shutdown().await;
}

/// Deploys `SPEC_BATCH2` with a first coordinator whose fleet answers only
/// `answered` commands (later ones are carried out, never answered), kills it
/// (`kill -9`: its tasks die where they stand) once command `answered + 1`
/// reached its agent, then resumes with a second coordinator and waits for the
/// rollout to end in `end`.
async fn crash_after(answered: usize, failing: &[usize], end: RolloutState) -> (Harness, Rollout) {
    let mut h = Harness::new(5).await;
    for i in failing {
        h.sim(&host(*i)).fail_activate.store(true, Ordering::SeqCst);
    }
    h.log.answered.store(answered, Ordering::SeqCst);
    let rt1 = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let engine1 = h.engine();
    let id = {
        let _in_rt1 = rt1.enter();
        engine1
            .deploy(SPEC_BATCH2, &h.digest, h.size)
            .expect("deploy")
            .id
    };
    let log = h.log.clone();
    h.wait_until(&id, &format!("command {}", answered + 1), |_| {
        log.sent.lock().expect("log").len() > answered
    })
    .await;
    tokio::task::spawn_blocking(move || drop(rt1))
        .await
        .expect("kill the first coordinator");
    drop(engine1);
    let at_crash = h.get(&id);
    h.log.answered.store(usize::MAX, Ordering::SeqCst);
    h.restart_fleet();
    let engine2 = h.engine();
    engine2.resume_all().expect("resume");
    let r = h
        .wait_until(&id, end.name(), |r| r.state.is_terminal())
        .await;
    assert_eq!(
        r.state,
        end,
        "killed after {answered} answers in state {}: {}",
        at_crash.state.name(),
        h.dump(&r)
    );
    engine2.shutdown().await;
    (h, r)
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_at_every_command_finishes_with_each_host_updated_once() {
    // 5 stages, then activate + commit per host: 15 commands.
    for answered in 0..15 {
        let (h, r) = crash_after(answered, &[], RolloutState::Succeeded).await;
        for (host, p) in &r.hosts {
            assert_eq!(
                (p.state, p.failure),
                (HostState::Committed, None),
                "{host}, killed after {answered} answers: {}",
                h.dump(&r)
            );
            assert_eq!(
                h.count(host, "activate"),
                1,
                "{host}, killed after {answered} answers: {}",
                h.dump(&r)
            );
            assert_eq!(h.count(host, "rollback"), 0, "{}", h.dump(&r));
            assert_eq!(h.sim(host).snapshot().last_known_good, "v2");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn coordinator_killed_at_every_command_of_a_failing_rollout_rolls_back_once() {
    // 5 stages, batch 0 activated and committed, batch 1 fails (2 activations),
    // batch 0 rolled back: 13 commands.
    for answered in 0..13 {
        let (h, r) = crash_after(answered, &[3, 4], RolloutState::RolledBack).await;
        let why = format!("killed after {answered} answers: {}", h.dump(&r));
        for i in 1..=4 {
            assert_eq!(h.count(&host(i), "activate"), 1, "host-{i}, {why}");
        }
        assert_eq!(h.count(&host(5), "activate"), 0, "{why}");
        for i in [1, 2] {
            assert_eq!(r.hosts[&host(i)].state, HostState::RolledBack, "{why}");
            assert_eq!(h.sim(&host(i)).snapshot().current_release, "v1", "{why}");
        }
        for i in 1..=5 {
            assert_eq!(h.sim(&host(i)).snapshot().current_release, "v1", "{why}");
        }
        assert_eq!(r.failures(), 2, "{why}");
    }
}

// ---- resume from every persisted state ----

#[tokio::test(flavor = "multi_thread")]
async fn resume_staging_stages_only_pending_hosts() {
    let h = Harness::new(5).await;
    let r = h.persist(
        "r-staging",
        SPEC_BATCH2,
        RolloutState::Staging,
        0,
        &[(&host(1), HostState::Staged), (&host(2), HostState::Staged)],
    );
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_all_committed_once(&h, &r);
    for (i, n) in [(1, 0), (2, 0), (3, 1), (4, 1), (5, 1)] {
        assert_eq!(h.count(&host(i), "stage"), n, "host-{i}: {}", h.dump(&r));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_running_skips_committed_batch() {
    let h = Harness::new(5).await;
    let id = "r-running";
    for i in [1, 2] {
        h.committed(&host(i), "v2", id);
    }
    let r = h.persist(
        id,
        SPEC_BATCH2,
        RolloutState::Running,
        1,
        &[
            (&host(1), HostState::Committed),
            (&host(2), HostState::Committed),
            (&host(3), HostState::Staged),
            (&host(4), HostState::Staged),
            (&host(5), HostState::Staged),
        ],
    );
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    for i in [1, 2] {
        let got: Vec<Sent> = h.sent().into_iter().filter(|s| s.host == host(i)).collect();
        assert!(got.is_empty(), "host-{i} was done: {got:?}");
    }
    for (host, p) in &r.hosts {
        assert_eq!(p.state, HostState::Committed, "{host}: {}", h.dump(&r));
    }
    for i in 3..=5 {
        assert_eq!(h.count(&host(i), "activate"), 1, "{}", h.dump(&r));
        assert_eq!(h.count(&host(i), "commit"), 1, "{}", h.dump(&r));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_activating_host_that_activated_is_not_activated_again() {
    let h = Harness::new(5).await;
    let id = "r-activated";
    for i in [1, 2] {
        h.committed(&host(i), "v2", id);
    }
    // host-3 got the activation before the crash; host-4 reached probation
    // and was journaled so.
    for i in [3, 4] {
        h.sim(&host(i)).activated("v2", id);
        h.fleet.on_report(&host(i), h.sim(&host(i)).report());
    }
    let r = h.persist(
        id,
        SPEC_BATCH2,
        RolloutState::Running,
        1,
        &[
            (&host(1), HostState::Committed),
            (&host(2), HostState::Committed),
            (&host(3), HostState::Activating),
            (&host(4), HostState::Probation),
            (&host(5), HostState::Staged),
        ],
    );
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    for i in [3, 4] {
        assert_eq!(h.count(&host(i), "activate"), 0, "{}", h.dump(&r));
        assert_eq!(h.count(&host(i), "commit"), 1, "{}", h.dump(&r));
    }
    assert_eq!(h.count(&host(5), "activate"), 1, "{}", h.dump(&r));
    for (host, p) in &r.hosts {
        assert_eq!(p.state, HostState::Committed, "{host}: {}", h.dump(&r));
    }
    assert_eq!(h.sim(&host(3)).snapshot().last_known_good, "v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_probation_host_whose_commit_landed_is_committed_not_failed() {
    let h = Harness::new(5).await;
    let id = "r-commit-landed";
    // host-1 and host-2 committed on the agents, but the coordinator died
    // before journaling it.
    for i in [1, 2] {
        h.committed(&host(i), "v2", id);
    }
    let r = h.persist(
        id,
        SPEC_BATCH2,
        RolloutState::Running,
        0,
        &[
            (&host(1), HostState::Probation),
            (&host(2), HostState::Probation),
            (&host(3), HostState::Staged),
            (&host(4), HostState::Staged),
            (&host(5), HostState::Staged),
        ],
    );
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    for (host, p) in &r.hosts {
        assert_eq!(
            (p.state, p.failure),
            (HostState::Committed, None),
            "{host}: {}",
            h.dump(&r)
        );
    }
    for i in [1, 2] {
        assert_eq!(h.count(&host(i), "activate"), 0, "{}", h.dump(&r));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_probation_host_that_rolled_back_meanwhile_counts_as_failed() {
    let h = Harness::new(5).await;
    let id = "r-probation-expired";
    // host-1's commit deadline passed while the coordinator was down: the
    // agent returned to v1 on its own.
    h.set(&host(1), |me, s| {
        me.history(s, "v2", "activating", id);
        me.history(s, "v1", "rolled_back", id);
    });
    h.sim(&host(2)).activated("v2", id);
    h.fleet.on_report(&host(2), h.sim(&host(2)).report());
    let r = h.persist(
        id,
        SPEC_BATCH2,
        RolloutState::Running,
        0,
        &[
            (&host(1), HostState::Probation),
            (&host(2), HostState::Probation),
            (&host(3), HostState::Staged),
            (&host(4), HostState::Staged),
            (&host(5), HostState::Staged),
        ],
    );
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    let p = &r.hosts[&host(1)];
    assert_eq!(
        (p.state, p.failure),
        (HostState::Failed, Some(Failure::RolledBackByHost)),
        "{}",
        h.dump(&r)
    );
    assert_eq!(h.sim(&host(1)).snapshot().current_release, "v1");
    for i in 2..=5 {
        assert_eq!(
            r.hosts[&host(i)].state,
            HostState::Committed,
            "{}",
            h.dump(&r)
        );
    }
    for i in [1, 2] {
        assert_eq!(h.count(&host(i), "activate"), 0, "{}", h.dump(&r));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_activating_host_that_never_got_it_is_activated_once() {
    let h = Harness::new(5).await;
    let id = "r-lost-activate";
    for i in [1, 2] {
        h.committed(&host(i), "v2", id);
    }
    let r = h.persist(
        id,
        SPEC_BATCH2,
        RolloutState::Running,
        1,
        &[
            (&host(1), HostState::Committed),
            (&host(2), HostState::Committed),
            (&host(3), HostState::Activating),
            (&host(4), HostState::Staged),
            (&host(5), HostState::Staged),
        ],
    );
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    for i in 3..=5 {
        assert_eq!(h.count(&host(i), "activate"), 1, "{}", h.dump(&r));
    }
    for i in [1, 2] {
        assert_eq!(h.count(&host(i), "activate"), 0, "{}", h.dump(&r));
    }
    assert_eq!(r.hosts[&host(3)].state, HostState::Committed);
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_activating_host_that_rolled_back_on_its_own_counts_as_failed() {
    let h = Harness::new(5).await;
    let id = "r-host-rolled-back";
    for i in [1, 2] {
        h.committed(&host(i), "v2", id);
    }
    // host-3 activated, failed verification and returned to v1 while the
    // coordinator was down.
    h.set(&host(3), |me, s| {
        me.history(s, "v2", "activating", id);
        me.history(s, "v1", "rolled_back", id);
    });
    let r = h.persist(
        id,
        SPEC_BATCH2,
        RolloutState::Running,
        1,
        &[
            (&host(1), HostState::Committed),
            (&host(2), HostState::Committed),
            (&host(3), HostState::Activating),
            (&host(4), HostState::Staged),
            (&host(5), HostState::Staged),
        ],
    );
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    let p = &r.hosts[&host(3)];
    assert_eq!(
        (p.state, p.failure),
        (HostState::Failed, Some(Failure::RolledBackByHost)),
        "{}",
        h.dump(&r)
    );
    assert_eq!(h.count(&host(3), "activate"), 0, "{}", h.dump(&r));
    for i in [4, 5] {
        assert_eq!(r.hosts[&host(i)].state, HostState::Committed);
        assert_eq!(h.count(&host(i), "activate"), 1, "{}", h.dump(&r));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_paused_waits_for_resume() {
    let h = Harness::new(5).await;
    let id = "r-paused";
    for i in [1, 2] {
        h.committed(&host(i), "v2", id);
    }
    let mut r = h.persist(
        id,
        SPEC_BATCH2,
        RolloutState::Paused,
        1,
        &[
            (&host(1), HostState::Committed),
            (&host(2), HostState::Committed),
            (&host(3), HostState::Staged),
            (&host(4), HostState::Staged),
            (&host(5), HostState::Staged),
        ],
    );
    r.resume_state = Some(RolloutState::Running);
    h.save(&r);
    let engine = h.engine();
    engine.resume_all().expect("resume");
    h.assert_quiet("a paused rollout").await;
    assert_eq!(h.get(id).state, RolloutState::Paused);
    // promote is refused while paused.
    assert!(engine.promote(id).await.is_err());
    engine.resume(id).await.expect("resume");
    let r = h.wait_state(id, RolloutState::Succeeded).await;
    for i in 3..=5 {
        assert_eq!(h.count(&host(i), "activate"), 1, "{}", h.dump(&r));
    }
    for (host, p) in &r.hosts {
        assert_eq!(p.state, HostState::Committed, "{host}: {}", h.dump(&r));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_waiting_promote_continues_after_promote() {
    let h = Harness::new(5).await;
    let id = "r-waiting";
    h.committed(&host(1), "v2", id);
    let staged: Vec<(String, HostState)> = (2..=5).map(|i| (host(i), HostState::Staged)).collect();
    let mut states: Vec<(&str, HostState)> = staged.iter().map(|(x, s)| (x.as_str(), *s)).collect();
    let h1 = host(1);
    states.push((&h1, HostState::Committed));
    let r = h.persist(id, SPEC_CANARY, RolloutState::WaitingPromote, 1, &states);
    assert_eq!(r.batches.len(), 5);
    assert!(r.pause_points.contains(&0), "{:?}", r.pause_points);
    let engine = h.engine();
    engine.resume_all().expect("resume");
    h.assert_quiet("a rollout waiting for promote").await;
    assert_eq!(h.get(id).state, RolloutState::WaitingPromote);
    engine.promote(id).await.expect("promote");
    let r = h.wait_state(id, RolloutState::Succeeded).await;
    assert_eq!(h.count(&host(1), "activate"), 0);
    for i in 2..=5 {
        assert_eq!(h.count(&host(i), "activate"), 1, "{}", h.dump(&r));
    }
    for (host, p) in &r.hosts {
        assert_eq!(p.state, HostState::Committed, "{host}: {}", h.dump(&r));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_rolling_back_skips_hosts_already_rolled_back() {
    let h = Harness::new(5).await;
    let id = "r-rolling-back";
    for i in [1, 3] {
        h.committed(&host(i), "v2", id);
    }
    // host-2 was rolled back before the crash: back on v1.
    h.set(&host(2), |me, s| {
        me.history(s, "v2", "activating", id);
        me.history(s, "v1", "rolled_back", id);
    });
    let r = h.persist(
        id,
        SPEC_BATCH2,
        RolloutState::RollingBack,
        1,
        &[
            (&host(1), HostState::Committed),
            (&host(2), HostState::RolledBack),
            (&host(3), HostState::Committed),
            (&host(4), HostState::Failed),
            (&host(5), HostState::Staged),
        ],
    );
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::RolledBack).await;
    let log = h.sent();
    assert!(log.iter().all(|s| s.kind == "rollback"), "{log:?}");
    for i in [1, 3] {
        assert_eq!(h.count(&host(i), "rollback"), 1, "{log:?}");
        assert_eq!(r.hosts[&host(i)].state, HostState::RolledBack);
        assert_eq!(h.sim(&host(i)).snapshot().current_release, "v1");
    }
    for i in [2, 4, 5] {
        assert_eq!(h.count(&host(i), "rollback"), 0, "{log:?}");
    }
    assert!(
        log.iter().all(|s| s.release == "v1"),
        "rollback target: {log:?}"
    );
    // Newest batch first.
    assert!(
        index_of(&log, &host(3), "rollback") < index_of(&log, &host(1), "rollback"),
        "{log:?}"
    );
    assert_eq!(
        (r.hosts[&host(2)].state, r.hosts[&host(4)].state),
        (HostState::RolledBack, HostState::Failed)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn resume_ignores_finished_rollouts() {
    let h = Harness::new(5).await;
    let ended = [
        RolloutState::Succeeded,
        RolloutState::Failed,
        RolloutState::RolledBack,
        RolloutState::Aborted,
    ];
    for state in ended {
        // Host states a live watcher would act on, to be sure none does.
        h.persist(
            &format!("r-{}", state.name()),
            SPEC_BATCH2,
            state,
            1,
            &[
                (&host(1), HostState::Committed),
                (&host(3), HostState::Activating),
                (&host(4), HostState::Probation),
            ],
        );
    }
    let engine = h.engine();
    engine.resume_all().expect("resume");
    assert_eq!(
        engine.tasks.len(),
        0,
        "a watcher started for a finished rollout"
    );
    h.assert_quiet("finished rollouts").await;
    for state in ended {
        assert_eq!(h.get(&format!("r-{}", state.name())).state, state);
    }
    // The check above can fail: an unfinished rollout does get a watcher.
    h.persist("r-paused", SPEC_BATCH2, RolloutState::Paused, 0, &[]);
    engine.resume_all().expect("resume");
    assert_eq!(engine.tasks.len(), 1);
    engine.shutdown().await;
    assert!(h.sent().is_empty(), "{:?}", h.sent());
}

// ---- failure budget, abort, promote ----

#[tokio::test(flavor = "multi_thread")]
async fn past_the_budget_the_fleet_is_rolled_back() {
    let h = Harness::new(5).await;
    for i in [3, 4] {
        h.sim(&host(i)).fail_activate.store(true, Ordering::SeqCst);
    }
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2, &h.digest, h.size)
        .expect("deploy");
    assert_eq!(r.failure_budget, 1);
    let r = h.wait_state(&r.id, RolloutState::RolledBack).await;
    let log = h.sent();
    for i in [1, 2] {
        let rb: Vec<&Sent> = log
            .iter()
            .filter(|s| s.host == host(i) && s.kind == "rollback")
            .collect();
        assert_eq!(rb.len(), 1, "{log:?}");
        assert_eq!(rb[0].release, "v1");
        assert_eq!(r.hosts[&host(i)].state, HostState::RolledBack);
        assert_eq!(h.sim(&host(i)).snapshot().current_release, "v1");
    }
    for i in [3, 4] {
        let p = &r.hosts[&host(i)];
        assert_eq!(
            (p.state, p.failure),
            (HostState::Failed, Some(Failure::Unhealthy)),
            "{}",
            h.dump(&r)
        );
        assert_eq!(h.count(&host(i), "activate"), 1);
        // It rolled back on its own; nothing more to do there.
        assert_eq!(h.count(&host(i), "rollback"), 0, "{log:?}");
    }
    assert_eq!(h.count(&host(5), "activate"), 0, "{log:?}");
    assert_eq!(r.failures(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn one_failure_within_budget_continues() {
    let h = Harness::new(5).await;
    h.sim(&host(3)).fail_activate.store(true, Ordering::SeqCst);
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_eq!(r.hosts[&host(3)].failure, Some(Failure::Unhealthy));
    for i in [1, 2, 4, 5] {
        assert_eq!(
            r.hosts[&host(i)].state,
            HostState::Committed,
            "{}",
            h.dump(&r)
        );
        assert_eq!(h.count(&host(i), "activate"), 1);
    }
    assert_eq!(h.sent().iter().filter(|s| s.kind == "rollback").count(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn canary_waits_for_promote() {
    let h = Harness::new(5).await;
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_CANARY, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::WaitingPromote).await;
    assert_eq!(r.hosts[&host(1)].state, HostState::Committed);
    // The batch's end is not left for a next batch's start.
    h.wait_durable("waiting for promote").await;
    h.assert_quiet("waiting for promote").await;
    for i in 2..=5 {
        assert_eq!(h.count(&host(i), "activate"), 0, "{}", h.dump(&r));
    }
    engine.promote(&r.id).await.expect("promote");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_all_committed_once(&h, &r);
}

#[tokio::test(flavor = "multi_thread")]
async fn abort_while_waiting_for_promote_rolls_the_canary_back() {
    let h = Harness::new(5).await;
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_CANARY, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::WaitingPromote).await;
    assert_eq!(r.hosts[&host(1)].state, HostState::Committed);
    engine.abort(&r.id).await.expect("abort");
    let r = h.wait_state(&r.id, RolloutState::Aborted).await;
    assert!(r.aborted);
    assert_eq!(r.hosts[&host(1)].state, HostState::RolledBack);
    assert_eq!(h.count(&host(1), "rollback"), 1, "{}", h.dump(&r));
    assert_eq!(h.sim(&host(1)).snapshot().current_release, "v1");
    for i in 2..=5 {
        assert_eq!(h.count(&host(i), "activate"), 0, "{}", h.dump(&r));
        assert_eq!(h.count(&host(i), "rollback"), 0, "{}", h.dump(&r));
    }
    assert!(engine.abort(&r.id).await.is_err(), "aborting twice");
}

// ---- unreachable hosts ----

/// The fleet's counts (what a metrics scrape shows) agree with its list of
/// hosts, before and after a host's stream ends.
#[tokio::test(flavor = "multi_thread")]
async fn the_fleet_s_counts_follow_its_hosts() {
    let h = Harness::new(4).await;
    let from_list = |h: &Harness| {
        let hosts = h.fleet.hosts();
        (hosts.iter().filter(|x| x.connected).count(), hosts.len())
    };
    assert_eq!(h.fleet.counts(), (4, 4));
    assert_eq!(h.fleet.counts(), from_list(&h));
    h.fleet
        .unregister(&host(2), h.sim(&host(2)).session.load(Ordering::SeqCst));
    assert_eq!(h.fleet.counts(), (3, 4));
    assert_eq!(h.fleet.counts(), from_list(&h));
}

#[tokio::test(flavor = "multi_thread")]
async fn disconnected_host_counts_as_unreachable_within_budget() {
    let h = Harness::new(5).await;
    // host-4 is known (and targeted by its labels) but its stream is gone.
    h.fleet
        .unregister(&host(4), h.sim(&host(4)).session.load(Ordering::SeqCst));
    assert!(!h.fleet.connected(&host(4)));
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2_FAST, &h.digest, h.size)
        .expect("deploy");
    assert!(r.hosts.contains_key(&host(4)));
    let id = r.id.clone();
    // Its batch waits for it for the grace (its 3 s healthy_deadline) first.
    let batch = h.wait_until(&id, "batch 1", |r| r.current_batch == 1).await;
    let started = Instant::now();
    let r = h.wait_state(&id, RolloutState::Succeeded).await;
    assert!(
        started.elapsed() >= Duration::from_secs(3) - Duration::from_millis(100),
        "failed {:?} after its batch began: {}",
        started.elapsed(),
        h.dump(&batch)
    );
    let p = &r.hosts[&host(4)];
    assert_eq!(
        (p.state, p.failure),
        (HostState::Failed, Some(Failure::Unreachable)),
        "{}",
        h.dump(&r)
    );
    assert!(p.reason.contains("not connected"), "{}", h.dump(&r));
    let events = h.store.events(&id).expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.kind == "stage_deferred" && e.host.as_deref() == Some(host(4).as_str())),
        "{}",
        h.dump(&r)
    );
    assert!(h.sent().iter().all(|s| s.host != host(4)));
    for i in [1, 2, 3, 5] {
        assert_eq!(
            r.hosts[&host(i)].state,
            HostState::Committed,
            "{}",
            h.dump(&r)
        );
        assert_eq!(h.count(&host(i), "activate"), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_cut_by_the_network_is_sent_again_when_the_hosts_batch_comes() {
    let h = Harness::new(5).await;
    // host-3's first download is cut (the agent says: retryable).
    h.sim(&host(3)).stage_cuts.store(1, Ordering::SeqCst);
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2_FAST, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_eq!(r.failures(), 0, "{}", h.dump(&r));
    for i in 1..=5 {
        assert_eq!(
            r.hosts[&host(i)].state,
            HostState::Committed,
            "{}",
            h.dump(&r)
        );
        assert_eq!(h.count(&host(i), "activate"), 1, "{}", h.dump(&r));
    }
    assert_eq!(h.count(&host(3), "stage"), 2, "{}", h.dump(&r));
    // Staged again before its activation, not before.
    let sent = h.sent();
    let mine: Vec<&str> = sent
        .iter()
        .filter(|s| s.host == host(3))
        .map(|s| s.kind)
        .collect();
    assert_eq!(
        mine,
        ["stage", "stage", "activate", "commit"],
        "{}",
        h.dump(&r)
    );
    let events = h.store.events(&r.id).expect("events");
    let kinds: Vec<&str> = events
        .iter()
        .filter(|e| e.host.as_deref() == Some(host(3).as_str()))
        .map(|e| e.kind.as_str())
        .collect();
    assert_eq!(
        kinds,
        [
            "stage_deferred",
            "staged",
            "activating",
            "probation",
            "committed"
        ],
        "{}",
        h.dump(&r)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stage_failure_that_is_not_transient_fails_the_host_at_once() {
    let h = Harness::new(3).await;
    h.sim(&host(2)).stage_no_space.store(true, Ordering::SeqCst);
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2_FAST, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    let p = &r.hosts[&host(2)];
    assert_eq!(
        (p.state, p.failure),
        (HostState::Failed, Some(Failure::StageFailed)),
        "{}",
        h.dump(&r)
    );
    assert!(p.reason.contains("no space left"), "{}", h.dump(&r));
    assert_eq!(h.count(&host(2), "stage"), 1, "{}", h.dump(&r));
    assert_eq!(h.count(&host(2), "activate"), 0, "{}", h.dump(&r));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_host_briefly_offline_when_its_batch_comes_is_waited_for() {
    let h = Harness::new(5).await;
    // host-3 drops off before the rollout and returns while the first batch
    // runs: it is staged late and activated with its batch, not failed.
    h.fleet
        .unregister(&host(3), h.sim(&host(3)).session.load(Ordering::SeqCst));
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2_FAST, &h.digest, h.size)
        .expect("deploy");
    let id = r.id.clone();
    h.wait_until(&id, "batch 1 to begin", |r| r.current_batch == 1)
        .await;
    assert_eq!(h.get(&id).hosts[&host(3)].state, HostState::Pending);
    connect(&h.fleet, h.sim(&host(3)), &h.log);
    let r = h.wait_state(&id, RolloutState::Succeeded).await;
    assert_eq!(r.failures(), 0, "{}", h.dump(&r));
    assert_eq!(
        r.hosts[&host(3)].state,
        HostState::Committed,
        "{}",
        h.dump(&r)
    );
    assert_eq!(h.count(&host(3), "stage"), 1, "{}", h.dump(&r));
    assert_eq!(h.count(&host(3), "activate"), 1, "{}", h.dump(&r));
    assert_eq!(h.sim(&host(3)).snapshot().current_release, "v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_cut_by_the_network_is_sent_again_when_the_host_is_back() {
    let h = Harness::new(3).await;
    h.sim(&host(2)).blip_on_commit.store(true, Ordering::SeqCst);
    let engine = h.engine();
    let r = engine
        .deploy(SPEC_BATCH2_FAST, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_eq!(r.failures(), 0, "{}", h.dump(&r));
    assert_eq!(
        r.hosts[&host(2)].state,
        HostState::Committed,
        "{}",
        h.dump(&r)
    );
    assert_eq!(h.count(&host(2), "commit"), 2, "{}", h.dump(&r));
    assert_eq!(h.count(&host(2), "activate"), 1, "{}", h.dump(&r));
    assert_eq!(h.sim(&host(2)).snapshot().last_known_good, "v2");
}

#[tokio::test(flavor = "multi_thread")]
async fn never_registered_host_counts_as_unreachable() {
    let h = Harness::new(4).await;
    let spec = parse_spec(SPEC_BATCH2, Path::new(".")).expect("spec");
    let hosts: Vec<String> = (1..=5).map(host).collect();
    let r = h.persist_hosts("r-ghost", spec, hosts, RolloutState::Staging, 0, &[]);
    let engine = h.engine();
    engine.resume_all().expect("resume");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    let p = &r.hosts[&host(5)];
    assert_eq!(
        (p.state, p.failure),
        (HostState::Failed, Some(Failure::Unreachable)),
        "{}",
        h.dump(&r)
    );
    for i in 1..=4 {
        assert_eq!(
            r.hosts[&host(i)].state,
            HostState::Committed,
            "{}",
            h.dump(&r)
        );
        assert_eq!(h.count(&host(i), "activate"), 1);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn agent_killed_mid_batch_is_unreachable_and_reconciled_on_return() {
    let h = Harness::new(5).await;
    h.sim(&host(3))
        .die_on_activate
        .store(true, Ordering::SeqCst);
    let engine = h.engine();
    engine.spawn_reconciler();
    let started = Instant::now();
    let r = engine
        .deploy(SPEC_BATCH2_FAST, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    let p = &r.hosts[&host(3)];
    assert_eq!(
        (p.state, p.failure),
        (HostState::Failed, Some(Failure::Unreachable)),
        "{}",
        h.dump(&r)
    );
    // Not at once: after the reconnect grace (1.5 s of the 3 s healthy_deadline).
    assert!(
        p.reason.contains("did not reconnect within 1.5s"),
        "{}",
        h.dump(&r)
    );
    assert!(started.elapsed() >= Duration::from_millis(1_500));
    for i in [1, 2, 4, 5] {
        assert_eq!(
            r.hosts[&host(i)].state,
            HostState::Committed,
            "{}",
            h.dump(&r)
        );
    }
    // It returns on v2, uncommitted: the rollout counted it as failed, so it
    // is rolled back and the record says so.
    h.sim(&host(3))
        .die_on_activate
        .store(false, Ordering::SeqCst);
    assert_eq!(h.sim(&host(3)).snapshot().current_release, "v2");
    connect(&h.fleet, h.sim(&host(3)), &h.log);
    let r = h
        .wait_until(&r.id, "host-3 reconciled", |r| {
            r.hosts[&host(3)].reason.contains("returned on")
        })
        .await;
    assert_eq!(h.count(&host(3), "rollback"), 1, "{}", h.dump(&r));
    assert_eq!(h.count(&host(3), "activate"), 1, "{}", h.dump(&r));
    assert_eq!(h.sim(&host(3)).snapshot().current_release, "v1");
    assert!(
        r.hosts[&host(3)].reason.contains("rolled back"),
        "{}",
        h.dump(&r)
    );
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_coordinator_fails_a_host_reporting_rss_over_the_ceiling() {
    let h = Harness::new(3).await;
    h.sim(&host(2))
        .rss_on_activate
        .store(64 << 20, Ordering::SeqCst);
    for i in [1, 3] {
        h.sim(&host(i))
            .rss_on_activate
            .store(8 << 20, Ordering::SeqCst);
    }
    let spec = SPEC_BATCH2.replace(
        "[targets]",
        "[thresholds]\nmax_rss = \"32MiB\"\n\n[targets]",
    );
    let metrics = Arc::new(crate::metrics::Metrics::new());
    h.fleet.metrics().set(metrics.clone());
    let engine = h.engine();
    let r = engine.deploy(&spec, &h.digest, h.size).expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    let text = metrics.render([], 0, 0);
    assert!(
        text.contains("rollout_rollbacks_total{reason=\"resource_regression\"} 1"),
        "the gate's rollback is counted once:\n{text}"
    );
    let h2 = &r.hosts[&host(2)];
    assert_eq!(
        h2.failure,
        Some(Failure::ResourceRegression),
        "{}",
        h.dump(&r)
    );
    assert!(
        h2.reason.contains("67108864") && h2.reason.contains("33554432"),
        "{}",
        h2.reason
    );
    assert_eq!(h.count(&host(2), "rollback"), 1);
    assert_eq!(h.count(&host(2), "commit"), 0);
    for i in [1, 3] {
        assert_eq!(
            r.hosts[&host(i)].state,
            HostState::Committed,
            "{}",
            h.dump(&r)
        );
    }
}

// ---- owed fleet rollbacks, reconnect grace ----

/// host-1 (batch 0, committed) is cut off when the fleet rollback reaches it.
async fn fleet_rollback_with_host_1_offline(h: &Harness, engine: &Arc<Engine>) -> Rollout {
    for i in [3, 4] {
        h.sim(&host(i)).fail_activate.store(true, Ordering::SeqCst);
    }
    h.sim(&host(1))
        .die_on_rollback
        .store(true, Ordering::SeqCst);
    let r = engine
        .deploy(SPEC_BATCH2, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::RolledBack).await;
    let p = &r.hosts[&host(1)];
    assert_eq!(p.state, HostState::RollbackOwed, "{}", h.dump(&r));
    assert_eq!(r.owed_rollbacks(), vec![host(1)], "{}", h.dump(&r));
    assert!(
        r.message.contains("rollback still owed on host-1"),
        "{}",
        h.dump(&r)
    );
    assert_eq!(r.status().batches[0].hosts[0].state, "rollback_owed");
    assert_eq!(r.hosts[&host(2)].state, HostState::RolledBack);
    let events = h.store.events(&r.id).expect("events");
    assert!(
        events
            .iter()
            .any(|e| e.kind == "rollback_owed" && e.host.as_deref() == Some("host-1")),
        "{}",
        h.dump(&r)
    );
    assert!(!events.iter().any(|e| e.kind == "rollback_complete"));
    // Still on the new release, and the rollback did not reach it.
    assert!(!h.fleet.connected(&host(1)));
    assert_eq!(h.sim(&host(1)).snapshot().current_release, "v2");
    h.sim(&host(1))
        .die_on_rollback
        .store(false, Ordering::SeqCst);
    r
}

/// How many times the fake host's own history shows a rollback.
fn rollbacks_done(h: &Harness, host: &str) -> usize {
    h.sim(host)
        .snapshot()
        .recent
        .iter()
        .filter(|e| e.event == "rolled_back")
        .count()
}

async fn assert_owed_rollback_settled(h: &Harness, id: &str) {
    // Both parts of the one write that settles the debt (the host's state
    // and the head's message).
    let r = h
        .wait_until(id, "host-1 rolled back on reconnect", |r| {
            r.hosts[&host(1)].state == HostState::RolledBack
                && r.message.contains("fleet rollback complete")
        })
        .await;
    assert_eq!(r.state, RolloutState::RolledBack);
    assert!(r.owed_rollbacks().is_empty());
    assert_eq!(h.sim(&host(1)).snapshot().current_release, "v1");
    assert_eq!(rollbacks_done(h, &host(1)), 1, "{}", h.dump(&r));
    assert!(
        r.message.contains("fleet rollback complete") && !r.message.contains("still owed"),
        "{}",
        h.dump(&r)
    );
    let events = h.store.events(id).expect("events");
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "rolled_back" && e.host.as_deref() == Some("host-1"))
            .count(),
        1,
        "{}",
        h.dump(&r)
    );
    assert_eq!(
        events
            .iter()
            .filter(|e| e.kind == "rollback_complete")
            .count(),
        1
    );
    // Later reports of the host change nothing: rolled back exactly once.
    let sent = h.count(&host(1), "rollback");
    for _ in 0..3 {
        h.set(&host(1), |_, _| {});
    }
    h.assert_quiet("reports after the owed rollback").await;
    assert_eq!(h.count(&host(1), "rollback"), sent);
    assert_eq!(rollbacks_done(h, &host(1)), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn host_offline_during_the_fleet_rollback_is_rolled_back_once_when_it_reconnects() {
    let h = Harness::new(5).await;
    let engine = h.engine();
    engine.spawn_reconciler();
    let r = fleet_rollback_with_host_1_offline(&h, &engine).await;
    // Reports of other hosts do not settle it.
    h.set(&host(2), |_, _| {});
    h.assert_quiet("host-1 still offline").await;
    assert_eq!(h.get(&r.id).hosts[&host(1)].state, HostState::RollbackOwed);
    connect(&h.fleet, h.sim(&host(1)), &h.log);
    assert_owed_rollback_settled(&h, &r.id).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owed_rollback_survives_a_coordinator_restart() {
    let mut h = Harness::new(5).await;
    let engine = h.engine();
    let r = fleet_rollback_with_host_1_offline(&h, &engine).await;
    engine.shutdown().await;
    // A new coordinator: the debt comes from the store alone.
    h.fleet = Arc::new(Fleet::new(h.store.clone()));
    let engine = h.engine();
    engine.spawn_reconciler();
    engine.resume_all().expect("resume");
    assert_eq!(h.get(&r.id).owed_rollbacks(), vec![host(1)]);
    for sim in h.sims.values() {
        connect(&h.fleet, sim, &h.log);
    }
    assert_owed_rollback_settled(&h, &r.id).await;
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_owed_host_already_back_on_its_own_is_recorded_without_a_command() {
    let h = Harness::new(5).await;
    let engine = h.engine();
    engine.spawn_reconciler();
    let r = fleet_rollback_with_host_1_offline(&h, &engine).await;
    let sent = h.count(&host(1), "rollback");
    // While away it went back by itself (commit deadline, an operator).
    h.sim(&host(1)).with(|me, s| {
        s.current_release = "v1".into();
        s.last_known_good = "v1".into();
        me.history(s, "v1", "rolled_back", "admin");
    });
    connect(&h.fleet, h.sim(&host(1)), &h.log);
    let r = h
        .wait_until(&r.id, "host-1 settled", |r| {
            r.hosts[&host(1)].state == HostState::RolledBack
        })
        .await;
    assert_eq!(h.count(&host(1), "rollback"), sent, "{}", h.dump(&r));
    assert!(r.hosts[&host(1)].reason.contains("back on v1 by itself"));
    engine.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn host_whose_stream_blips_during_its_activation_is_decided_from_its_report() {
    let h = Harness::new(5).await;
    h.sim(&host(3))
        .blip_on_activate
        .store(true, Ordering::SeqCst);
    let engine = h.engine();
    engine.spawn_reconciler();
    let r = engine
        .deploy(SPEC_BATCH2_FAST, &h.digest, h.size)
        .expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_eq!(r.failures(), 0, "{}", h.dump(&r));
    assert_all_committed_once(&h, &r);
    let events = h.store.events(&r.id).expect("events");
    assert!(
        events.iter().any(|e| e.kind == "probation"
            && e.host.as_deref() == Some("host-3")
            && e.message.contains("reconnected")),
        "{}",
        h.dump(&r)
    );
    engine.shutdown().await;
}

// ---- storage ----

#[tokio::test(flavor = "multi_thread")]
async fn a_rollout_is_stored_with_each_host_under_its_own_key() {
    let h = Harness::new(3).await;
    let spec = parse_spec(SPEC_BATCH2, Path::new(".")).expect("spec");
    let hosts: Vec<String> = (1..=3).map(host).collect();
    let r = h.persist_hosts(
        "r-split",
        spec.clone(),
        hosts.clone(),
        RolloutState::Paused,
        0,
        &[],
    );
    assert_eq!(h.get("r-split"), r);
    // The head holds neither hosts nor plan: its size does not grow with
    // the fleet. The plan is written once, under its own key.
    let head = h.store.raw("rollout/r-split").expect("head");
    let head = String::from_utf8_lossy(&head);
    assert!(!head.contains(&host(1)), "{head}");
    let plan = h.store.raw("rplan/r-split").expect("plan");
    assert!(String::from_utf8_lossy(&plan).contains(&host(3)));
    // One host changed and named: it and the head are written.
    let mut r2 = r.clone();
    r2.message = "changed".into();
    r2.hosts.get_mut(&host(2)).expect("h2").state = HostState::Committed;
    h.store
        .write_rollout(&mut r2.clone(), HostsToWrite::Only(&[host(2)]), &[])
        .expect("write");
    assert_eq!(h.get("r-split"), r2);
    // A host changed but not named is not written: writes are per host.
    let mut r3 = r2.clone();
    r3.hosts.get_mut(&host(3)).expect("h3").state = HostState::Committed;
    h.store
        .write_rollout(&mut r3.clone(), HostsToWrite::Only(&[]), &[])
        .expect("write");
    assert_eq!(h.get("r-split").hosts[&host(3)].state, HostState::Pending);

    // A record of an earlier version, hosts inline: read as it is; the
    // engine's first write splits it (every host written), later writes
    // carry only the changed host.
    let mut old = h.persist_hosts("r-old", spec, hosts, RolloutState::Paused, 0, &[]);
    old.id = "r-inline".into();
    h.store.insert_raw(
        "rollout/r-inline",
        serde_json::to_vec(&old).expect("encode"),
    );
    assert_eq!(h.get("r-inline"), old);
    let engine = h.engine();
    // A change that changes nothing writes nothing, and does not count as
    // the engine's first write.
    engine
        .update("r-inline", |_| Ok(vec![]))
        .await
        .expect("no-op");
    engine
        .update("r-inline", |r| {
            r.hosts.get_mut(&host(1)).expect("h1").state = HostState::Staged;
            Ok(vec![])
        })
        .await
        .expect("update");
    engine
        .update("r-inline", |r| {
            r.hosts.get_mut(&host(3)).expect("h3").state = HostState::Staged;
            Ok(vec![])
        })
        .await
        .expect("update");
    let back = h.store.rollout("r-inline").expect("read").expect("kept");
    let states: Vec<HostState> = back.hosts.values().map(|p| p.state).collect();
    assert_eq!(
        states,
        [HostState::Staged, HostState::Pending, HostState::Staged]
    );
    // A new engine (a restarted coordinator) reads the same.
    assert_eq!(h.engine().get("r-inline").expect("get").hosts, back.hosts);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_change_leaves_the_rollout_as_it_was() {
    let h = Harness::new(3).await;
    let spec = parse_spec(SPEC_BATCH2, Path::new(".")).expect("spec");
    let hosts: Vec<String> = (1..=3).map(host).collect();
    let r = h.persist_hosts("r-undo", spec, hosts, RolloutState::Paused, 0, &[]);
    let engine = h.engine();
    // Into the engine's cache.
    engine
        .update("r-undo", |r| {
            r.hosts.get_mut(&host(1)).expect("h1").state = HostState::Staged;
            Ok(vec![])
        })
        .await
        .expect("update");
    let kept = engine.get("r-undo").expect("get");
    assert_ne!(kept, r);
    let err = engine
        .update("r-undo", |r| {
            r.hosts.get_mut(&host(2)).expect("h2").state = HostState::Failed;
            r.hosts.get_mut(&host(1)).expect("h1").state = HostState::Committed;
            r.message = "half done".into();
            Err(crate::engine::EngineError::NotFound("on purpose".into()))
        })
        .await;
    assert!(err.is_err());
    assert_eq!(engine.get("r-undo").expect("get"), kept);
    // The next change is written from the state before the failed one.
    engine
        .update("r-undo", |r| {
            r.hosts.get_mut(&host(3)).expect("h3").state = HostState::Staged;
            Ok(vec![])
        })
        .await
        .expect("update");
    let stored = h.store.rollout("r-undo").expect("read").expect("kept");
    let states: Vec<HostState> = stored.hosts.values().map(|p| p.state).collect();
    assert_eq!(
        states,
        [HostState::Staged, HostState::Pending, HostState::Staged]
    );
    assert_eq!(stored.message, kept.message);
    assert_eq!(engine.get("r-undo").expect("get").hosts, stored.hosts);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_batch_of_many_hosts_writes_concurrently_and_finishes() {
    // 150 hosts in one batch: their results are written (and flushed)
    // concurrently; every write must complete.
    let h = Harness::new(150).await;
    let spec = SPEC_BATCH2_FAST.replace("batch_size = 2", "batch_size = 150");
    let engine = h.engine();
    let r = engine.deploy(&spec, &h.digest, h.size).expect("deploy");
    let r = h.wait_state(&r.id, RolloutState::Succeeded).await;
    assert_eq!(r.failures(), 0, "{}", h.dump(&r));
    assert!(
        r.hosts.values().all(|p| p.state == HostState::Committed),
        "{}",
        h.dump(&r)
    );
    let back = h.store.rollout(&r.id).expect("read").expect("kept");
    assert_eq!(back.hosts, r.hosts);
    let events = h.store.events(&r.id).expect("events");
    assert_eq!(events.iter().filter(|e| e.kind == "probation").count(), 150);
}
