//! The rollout engine: creates rollouts from specs, and drives each one with a
//! watcher task: stage everywhere (bounded parallelism), then batch by batch
//! activate, gate on the agents' verify/probation, commit; past the failure
//! budget halt and, with `auto_rollback`, return every host it changed to its
//! previous release, newest batch first.
//!
//! Every transition is persisted (and flushed) before it is acted on; a
//! restarted coordinator resumes each unfinished rollout from the store. A host
//! journaled as `activating` is reconciled from its own report and history, so
//! it is never activated twice nor skipped. A resumed rollout first waits (up
//! to [`RESUME_GRACE`]) for its hosts to reconnect, so that none counts as
//! unreachable only for reconnecting later than the coordinator started.
//!
//! A host whose stream ends while its Activate is in flight gets a bounded
//! grace to reconnect ([`planner::activation_reconnect_by`]), then is decided
//! from its report like a host found `activating` after a restart; one that
//! does not return in time is unreachable. A host the fleet rollback cannot
//! reach is persisted as `rollback_owed`; the reconciler rolls it back when it
//! is connected again (or records that it went back by itself), and the
//! rollout's message names the hosts still owed until none is.

pub mod model;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use rollout_proto::pb;
use rollout_proto::pb::coordinator_message::Cmd;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::artifacts::Artifacts;
use crate::fleet::{Fleet, FleetError};
use crate::rollout::planner;
use crate::rollout::spec::{DeploySpec, parse_spec};
use crate::store::{HostsToWrite, Store, StoreError};
use model::{Event, Failure, HostProgress, HostState, Rollout, RolloutState, now_ms};

/// Engine failures, each naming the cause and the fix.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The spec does not parse or validate.
    #[error("{0}")]
    Spec(String),
    /// Target selection failed.
    #[error("{0}")]
    Targets(String),
    /// No such rollout.
    #[error("rollout {0} not found; `rollout status` lists rollouts")]
    NotFound(String),
    /// The request does not fit the rollout's state.
    #[error("rollout {id} is {state}: {message}")]
    WrongState {
        /// Rollout id.
        id: String,
        /// Its state.
        state: String,
        /// What to do.
        message: String,
    },
    /// Another rollout of the service runs.
    #[error(
        "rollout {other} of service {service} is still {state}; wait for it, or `rollout abort {other}`"
    )]
    Conflict {
        /// Service.
        service: String,
        /// The running rollout.
        other: String,
        /// Its state.
        state: String,
    },
    /// The artifact is not uploaded.
    #[error("{0}")]
    Artifact(#[from] crate::artifacts::ArtifactError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The coordinator is stopping: nothing more is written.
    #[error("the coordinator is shutting down; retry once it is back")]
    ShuttingDown,
}

impl EngineError {
    /// The one conversion to a gRPC status.
    pub fn to_status(&self) -> tonic::Status {
        let m = self.to_string();
        match self {
            EngineError::Spec(_) | EngineError::Targets(_) => tonic::Status::invalid_argument(m),
            EngineError::NotFound(_) => tonic::Status::not_found(m),
            EngineError::WrongState { .. } | EngineError::Conflict { .. } => {
                tonic::Status::failed_precondition(m)
            }
            EngineError::Artifact(crate::artifacts::ArtifactError::Missing(_)) => {
                tonic::Status::not_found(m)
            }
            EngineError::Artifact(_) => tonic::Status::invalid_argument(m),
            EngineError::Store(_) => tonic::Status::internal(m),
            EngineError::ShuttingDown => tonic::Status::unavailable(m),
        }
    }
}

/// Slack added to an agent's own deadlines before the coordinator gives up on
/// a command.
const COMMAND_SLACK: Duration = Duration::from_secs(30);

/// How long a rollout resumed after a restart waits for its hosts to
/// reconnect before it acts (agents back off up to 30 s by default).
pub const RESUME_GRACE: Duration = Duration::from_secs(40);

/// The engine.
pub struct Engine {
    store: Store,
    fleet: Arc<Fleet>,
    artifacts: Artifacts,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    changes: broadcast::Sender<String>,
    cancel: CancellationToken,
    tasks: tokio_util::task::TaskTracker,
    /// Owed rollbacks sent by the reconciler: (rollout, host) → the session
    /// and reported (release, phase) it was sent for, so a refused one is
    /// retried once the host reconnects or its situation changes, not on
    /// every report.
    owed_sent: Mutex<HashMap<(String, String), OwedSent>>,
    /// The latest written state of each rollout this engine changed: reads
    /// skip decoding the stored record (the engine is its only writer).
    cache: Mutex<HashMap<String, Rollout>>,
    /// What the reconciler looks at when a host reports: host → rollouts in
    /// which it was counted unreachable and has not returned yet, or owes a
    /// fleet rollback ([`needs_reconcile`]). Built from the store on first
    /// use, kept by [`Engine::update`]; `None` until built.
    watch: Mutex<Option<HashMap<String, BTreeSet<String>>>>,
}

/// Whether the reconciler must look at a host of a rollout when it reports.
fn needs_reconcile(p: &HostProgress) -> bool {
    (p.failure == Some(Failure::Unreachable) && !p.reason.contains("returned on"))
        || p.state == HostState::RollbackOwed
}

/// Halts a running rollout whose failures are past its budget or its host
/// rollbacks past their limit, or for `why`: moves it to rolling back (or
/// failed, without `auto_rollback`) and returns the `halted` event. `None`:
/// it goes on (or has already stopped).
fn halt(r: &mut Rollout, why: Option<String>) -> Option<Event> {
    if r.state.is_terminal() || r.state == RolloutState::RollingBack {
        return None;
    }
    let host_rollback_limit = r
        .strategy
        .max_host_rollbacks
        .as_ref()
        .map(|c| c.resolve_floor(r.hosts.len()));
    let reason = why
        .or_else(|| {
            planner::budget_exceeded(r.failures(), r.failure_budget).then(|| {
                format!(
                    "failure budget exceeded: {} hosts failed, budget {}",
                    r.failures(),
                    r.failure_budget
                )
            })
        })
        .or_else(|| {
            let limit = host_rollback_limit?;
            (r.host_rollbacks() > limit).then(|| {
                format!(
                    "host rollbacks exceeded: {} hosts rolled the release back on their own, limit {limit}",
                    r.host_rollbacks()
                )
            })
        })?;
    r.state = if r.strategy.auto_rollback {
        RolloutState::RollingBack
    } else {
        RolloutState::Failed
    };
    r.message = reason.clone();
    warn!(rollout = %r.id, reason = %reason, "rollout halted");
    Some(ev(None, "halted", reason))
}

/// A batch's hosts for a message: all of them up to ten, else how many
/// with the first and the last (the message is in the rollout's head,
/// which every write carries; `rollout status` lists the hosts).
fn hosts_in_brief(batch: &[String]) -> String {
    match batch {
        [first, .., last] if batch.len() > 10 => {
            format!("{} hosts, {first} … {last}", batch.len())
        }
        _ => batch.join(","),
    }
}

/// What an owed rollback was sent for: the host's session and its reported
/// (release, phase) at the time.
type OwedSent = (u64, String, i32);

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").finish_non_exhaustive()
    }
}

/// Whether a Stage's outcome is worth sending again: the host was not
/// connected or its stream ended, or the agent says the failure is transient
/// (its artifact download was cut and resumes).
fn stage_retryable(res: &Result<pb::CommandResult, FleetError>) -> bool {
    match res {
        Ok(x) => !x.ok && x.retryable,
        Err(_) => transport_cut(res),
    }
}

/// Whether a command never reached the host or its answer was lost with the
/// stream (not a timeout: a host that does not answer is not waited for again).
fn transport_cut(res: &Result<pb::CommandResult, FleetError>) -> bool {
    matches!(
        res,
        Err(FleetError::Unreachable(_) | FleetError::Dropped(_))
    )
}

/// What [`Engine::apply`] wrote, for the log once it is durable.
struct Written {
    events: Vec<Event>,
    service: String,
    release: String,
}

/// Writes made (visible in the cache) and not yet durable, logged or
/// announced: for a later [`Engine::publish`], before anything acts on them.
type Deferred = std::sync::Mutex<Vec<Written>>;

fn take(d: &Deferred) -> Vec<Written> {
    std::mem::take(&mut *d.lock().unwrap_or_else(std::sync::PoisonError::into_inner))
}

fn ev(host: Option<&str>, kind: &str, message: impl Into<String>) -> Event {
    Event {
        seq: 0,
        at_ms: now_ms(),
        host: host.map(str::to_string),
        kind: kind.to_string(),
        message: message.into(),
    }
}

impl Engine {
    /// An engine; call [`Engine::resume_all`] to pick up unfinished rollouts.
    pub fn new(
        store: Store,
        fleet: Arc<Fleet>,
        artifacts: Artifacts,
        cancel: CancellationToken,
    ) -> Arc<Engine> {
        let (changes, _) = broadcast::channel(1024);
        Arc::new(Engine {
            store,
            fleet,
            artifacts,
            locks: Mutex::new(HashMap::new()),
            changes,
            cancel,
            tasks: tokio_util::task::TaskTracker::new(),
            owed_sent: Mutex::new(HashMap::new()),
            cache: Mutex::new(HashMap::new()),
            watch: Mutex::new(None),
        })
    }

    /// The fleet registry.
    pub fn fleet(&self) -> &Arc<Fleet> {
        &self.fleet
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Ids of rollouts that changed.
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    /// Restarts a watcher for every unfinished rollout.
    pub fn resume_all(self: &Arc<Self>) -> Result<(), EngineError> {
        for r in self.store.rollout_heads()? {
            if !r.state.is_terminal() {
                info!(rollout = %r.id, state = r.state.name(), "resuming rollout");
                let me = self.clone();
                let id = r.id.clone();
                self.tasks.spawn(async move {
                    me.await_hosts(&id).await;
                    me.drive(id).await
                });
            }
        }
        Ok(())
    }

    /// Stops every watcher (rollouts resume on the next start); from the
    /// cancellation on, no rollout is written.
    pub async fn shutdown(&self) {
        self.cancel.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Waits until every host of the rollout not already failed that the
    /// fleet has seen before is connected, at most [`RESUME_GRACE`].
    async fn await_hosts(&self, id: &str) {
        let end = tokio::time::Instant::now() + RESUME_GRACE;
        loop {
            let Ok(r) = self.get(id) else { return };
            let missing: Vec<&String> = r
                .hosts
                .iter()
                .filter(|(h, p)| {
                    p.failure.is_none() && self.fleet.knows(h) && !self.fleet.connected(h)
                })
                .map(|(h, _)| h)
                .collect();
            if missing.is_empty() {
                return;
            }
            if tokio::time::Instant::now() > end {
                warn!(rollout = %id, missing = ?missing, "hosts did not reconnect after the restart; resuming without them");
                return;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(100)) => {}
                () = self.cancel.cancelled() => return,
            }
        }
    }

    fn spawn(self: &Arc<Self>, id: String) {
        let me = self.clone();
        self.tasks.spawn(async move { me.drive(id).await });
    }

    fn lock_for(&self, id: &str) -> Arc<tokio::sync::Mutex<()>> {
        match self.locks.lock() {
            Ok(mut m) => m.entry(id.to_string()).or_default().clone(),
            Err(_) => Arc::new(tokio::sync::Mutex::new(())),
        }
    }

    /// One rollout.
    pub fn get(&self, id: &str) -> Result<Rollout, EngineError> {
        let cached = self
            .cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned();
        match cached {
            Some(r) => Ok(r),
            None => self.stored(id),
        }
    }

    /// `f` of one rollout, looked at in place in the cache (a copy of a
    /// large rollout would cost more than most looks), else as the store
    /// has it. `f` runs under the cache's lock: it must be quick.
    pub fn view<T>(&self, id: &str, f: impl FnOnce(&Rollout) -> T) -> Result<T, EngineError> {
        {
            let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(r) = cache.get(id) {
                return Ok(f(r));
            }
        }
        self.stored(id).map(|r| f(&r))
    }

    /// The rollout as the store has it.
    fn stored(&self, id: &str) -> Result<Rollout, EngineError> {
        self.store
            .rollout(id)?
            .ok_or_else(|| EngineError::NotFound(id.to_string()))
    }

    /// One rollout's status (a watcher asks on every change), built in place.
    pub fn status(&self, id: &str) -> Result<pb::RolloutStatus, EngineError> {
        self.view(id, Rollout::status)
    }

    /// Loads, changes and persists a rollout under its lock; `f` returns the
    /// events explaining the change. The cost does not grow with the fleet:
    /// the rollout is changed in place in the cache (readers never miss it
    /// and fall back to the store), and only the hosts `f` changed are
    /// compared and written (the rollout's [`Hosts`] keeps their earlier
    /// values).
    async fn update(
        &self,
        id: &str,
        f: impl FnOnce(&mut Rollout) -> Result<Vec<Event>, EngineError>,
    ) -> Result<(), EngineError> {
        self.update_with(id, &Deferred::default(), f).await
    }

    /// As [`Engine::update`], and makes `deferred`'s writes (made before
    /// this one) durable, logged and announced with it.
    async fn update_with(
        &self,
        id: &str,
        deferred: &Deferred,
        f: impl FnOnce(&mut Rollout) -> Result<Vec<Event>, EngineError>,
    ) -> Result<(), EngineError> {
        let res = self.update_deferred(id, deferred, f).await;
        self.publish(id, take(deferred)).await?;
        res
    }

    /// As [`Engine::update`], but the change is only written (visible in
    /// the cache, not yet durable, not yet logged or announced): it joins
    /// `deferred`, which the caller hands to [`Engine::publish`] before it
    /// acts on any of it.
    async fn update_deferred(
        &self,
        id: &str,
        deferred: &Deferred,
        f: impl FnOnce(&mut Rollout) -> Result<Vec<Event>, EngineError>,
    ) -> Result<(), EngineError> {
        let lock = self.lock_for(id);
        let _g = lock.lock().await;
        // Once stopping, commands fail as the agents' streams are closed:
        // their failures are not the hosts' and must not be recorded.
        if self.cancel.is_cancelled() {
            return Err(EngineError::ShuttingDown);
        }
        if let Some(written) = self.apply(id, f)? {
            deferred
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(written);
        }
        Ok(())
    }

    /// Makes written changes durable (one fsync, shared with the other
    /// writes waiting at the same time), then logs their events and
    /// announces the rollout's change.
    async fn publish(&self, id: &str, written: Vec<Written>) -> Result<(), EngineError> {
        if written.is_empty() {
            return Ok(());
        }
        self.make_durable(&written).await?;
        self.log_and_announce(id, &written);
        Ok(())
    }

    /// The second half of [`Engine::publish`], for writes made durable:
    /// their events logged, one line each, and the rollout's change
    /// announced.
    fn log_and_announce(&self, id: &str, written: &[Written]) {
        if written.is_empty() {
            return;
        }
        for w in written {
            for e in &w.events {
                info!(
                    rollout = %id,
                    service = %w.service,
                    release = %w.release,
                    host = e.host.as_deref().unwrap_or("-"),
                    kind = %e.kind,
                    "{}",
                    e.message
                );
            }
        }
        let _ = self.changes.send(id.to_string());
    }

    /// The first half of [`Engine::publish`]: the log and the announcement
    /// are the caller's ([`Engine::log_and_announce`]).
    async fn make_durable(&self, written: &[Written]) -> Result<(), EngineError> {
        // Durable before the caller acts on it: the first flush covers every
        // write here; the others only honour a crash point among their events.
        for w in written {
            self.store.flush(&w.events).await?;
        }
        Ok(())
    }

    /// The synchronous part of [`Engine::update`], under the cache's lock:
    /// changes the rollout in place and writes it (unflushed). `None`: no
    /// change, nothing written. On an error the rollout is left as it was.
    fn apply(
        &self,
        id: &str,
        f: impl FnOnce(&mut Rollout) -> Result<Vec<Event>, EngineError>,
    ) -> Result<Option<Written>, EngineError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        // A rollout read from the store now is written whole the first
        // time (it may be a record of an earlier version); one from the
        // cache is one this engine wrote, so only its changed hosts are.
        let loaded = !cache.contains_key(id);
        if loaded {
            let r = self
                .store
                .rollout(id)?
                .ok_or_else(|| EngineError::NotFound(id.to_string()))?;
            cache.insert(id.to_string(), r);
        }
        let Some(r) = cache.get_mut(id) else {
            return Err(EngineError::NotFound(id.to_string()));
        };
        r.hosts.forget_changes();
        // The rollout without its hosts: small (the plan is shared).
        let head_of = |r: &mut Rollout| {
            let hosts = std::mem::take(&mut r.hosts);
            let head = r.clone();
            r.hosts = hosts;
            head
        };
        let before = head_of(r);
        // Back as it was (the hosts `f` changed, and the head).
        let undo = |r: &mut Rollout, before: Rollout| {
            r.hosts.undo_changes();
            let hosts = std::mem::take(&mut r.hosts);
            *r = before;
            r.hosts = hosts;
        };
        // Only a rollout this engine has written stays cached.
        let events = match f(r) {
            Ok(events) => events,
            Err(e) => {
                undo(r, before);
                if loaded {
                    cache.remove(id);
                }
                return Err(e);
            }
        };
        let changed = r.hosts.take_changes();
        // Nothing changed, nothing to explain: no write (and no fsync).
        if events.is_empty() && changed.is_empty() && head_of(r) == before {
            if loaded {
                cache.remove(id);
            }
            return Ok(None);
        }
        r.updated_at_ms = now_ms();
        let hosts = if loaded {
            HostsToWrite::All
        } else {
            HostsToWrite::Only(&changed)
        };
        if let Err(e) = self.store.write_rollout(r, hosts, &events) {
            // What is stored is unknown now: read it back next time.
            cache.remove(id);
            return Err(e.into());
        }
        if let Ok(mut w) = self.watch.lock()
            && let Some(w) = w.as_mut()
        {
            let hosts: Box<dyn Iterator<Item = &String>> = if loaded {
                Box::new(r.hosts.keys())
            } else {
                Box::new(changed.iter())
            };
            for h in hosts {
                let set = w.entry(h.clone()).or_default();
                if r.hosts.get(h).is_some_and(needs_reconcile) {
                    set.insert(r.id.clone());
                } else {
                    set.remove(&r.id);
                }
            }
        }
        let written = Written {
            events,
            service: r.service.clone(),
            release: r.release.clone(),
        };
        if r.state.is_terminal() {
            cache.remove(id);
        }
        Ok(Some(written))
    }

    /// As [`Engine::update`], then the rollout as it is after the change
    /// (a copy, for an operator's command).
    async fn update_get(
        &self,
        id: &str,
        f: impl FnOnce(&mut Rollout) -> Result<Vec<Event>, EngineError>,
    ) -> Result<Rollout, EngineError> {
        self.update(id, f).await?;
        self.get(id)
    }

    /// Parses the spec, selects targets and plans batches.
    pub fn plan(&self, spec_toml: &str) -> Result<(DeploySpec, Vec<Vec<String>>), EngineError> {
        let spec = parse_spec(spec_toml, std::path::Path::new("."))
            .map_err(|e| EngineError::Spec(e.to_string()))?;
        let hosts = planner::select_hosts(&spec.targets, &self.fleet.labels())
            .map_err(|e| EngineError::Targets(e.to_string()))?;
        let batches = planner::plan_batches(&hosts, &spec.strategy);
        Ok((spec, batches))
    }

    /// Creates and starts a rollout.
    pub fn deploy(
        self: &Arc<Self>,
        spec_toml: &str,
        digest: &str,
        size: u64,
    ) -> Result<Rollout, EngineError> {
        let (spec, batches) = self.plan(spec_toml)?;
        if !self.artifacts.has(digest) {
            return Err(crate::artifacts::ArtifactError::Missing(digest.to_string()).into());
        }
        if let Some(d) = spec.artifact.digest.as_deref()
            && d != digest
        {
            return Err(crate::artifacts::ArtifactError::Mismatch {
                expected: d.to_string(),
                actual: digest.to_string(),
            }
            .into());
        }
        for other in self.store.rollout_heads()? {
            if other.service == spec.service && !other.state.is_terminal() {
                return Err(EngineError::Conflict {
                    service: spec.service.clone(),
                    other: other.id.clone(),
                    state: other.state.name().to_string(),
                });
            }
        }
        let mut def = spec.definition.clone();
        def.artifact = Some(pb::Artifact {
            digest: digest.to_string(),
            size,
            signature: spec.artifact.signature.clone().unwrap_or_default(),
        });
        let n: usize = batches.iter().map(Vec::len).sum();
        let mut hosts = std::collections::BTreeMap::new();
        for (i, b) in batches.iter().enumerate() {
            for h in b {
                hosts.insert(
                    h.clone(),
                    HostProgress {
                        state: HostState::Pending,
                        batch: i,
                        failure: None,
                        reason: String::new(),
                        previous_release: None,
                    },
                );
            }
        }
        let now = now_ms();
        let id = format!("r-{}-{:04x}", now, rand::random::<u16>());
        let pause_points: BTreeSet<usize> = if spec.strategy.pause_after_canary {
            planner::pause_points(&batches, &spec.strategy)
        } else {
            BTreeSet::new()
        };
        let r = Rollout {
            id: id.clone(),
            service: spec.service.clone(),
            release: spec.release.clone(),
            definition: Arc::new(prost::Message::encode_to_vec(&def)),
            failure_budget: planner::failure_budget(&spec.strategy, n),
            strategy: spec.strategy.clone(),
            batches: Arc::new(batches),
            pause_points,
            state: RolloutState::Staging,
            resume_state: None,
            current_batch: 0,
            aborted: false,
            hosts: hosts.into_iter().collect(),
            message: "staging the release on every target".into(),
            created_at_ms: now,
            updated_at_ms: now,
        };
        let plan = r
            .batches
            .iter()
            .enumerate()
            .map(|(i, b)| format!("batch {i}: {}", b.join(",")))
            .collect::<Vec<_>>()
            .join("; ");
        let created = ev(
            None,
            "created",
            format!("{} {} on {n} hosts; {plan}", r.service, r.release),
        );
        self.store.save_rollout(&r, &[created])?;
        // Written whole by this engine: cached from the start, so that
        // readers while it stages do not decode it from the store.
        self.cache
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), r.clone());
        info!(rollout = %id, service = %r.service, release = %r.release, hosts = n, "rollout created");
        self.spawn(id);
        Ok(r)
    }

    /// Pauses a rollout between batches.
    pub async fn pause(&self, id: &str) -> Result<Rollout, EngineError> {
        self.update_get(id, |r| match r.state {
            RolloutState::Staging | RolloutState::Running | RolloutState::WaitingPromote => {
                r.resume_state = Some(r.state);
                r.state = RolloutState::Paused;
                r.message = "paused by an operator".into();
                Ok(vec![ev(None, "paused", "paused by an operator")])
            }
            s => Err(EngineError::WrongState {
                id: r.id.clone(),
                state: s.name().into(),
                message: "only a staging, running or waiting rollout can be paused".into(),
            }),
        })
        .await
    }

    /// Resumes a paused rollout.
    pub async fn resume(&self, id: &str) -> Result<Rollout, EngineError> {
        self.update_get(id, |r| match r.state {
            RolloutState::Paused => {
                r.state = r.resume_state.take().unwrap_or(RolloutState::Running);
                r.message = "resumed".into();
                Ok(vec![ev(None, "resumed", "resumed by an operator")])
            }
            s => Err(EngineError::WrongState {
                id: r.id.clone(),
                state: s.name().into(),
                message: "only a paused rollout can be resumed".into(),
            }),
        })
        .await
    }

    /// Lets a rollout waiting after a canary stage continue.
    pub async fn promote(&self, id: &str) -> Result<Rollout, EngineError> {
        self.update_get(id, |r| match r.state {
            RolloutState::WaitingPromote => {
                r.state = RolloutState::Running;
                r.message = format!("promoted; continuing with batch {}", r.current_batch);
                Ok(vec![ev(None, "promoted", r.message.clone())])
            }
            s => Err(EngineError::WrongState {
                id: r.id.clone(),
                state: s.name().into(),
                message: "only a rollout waiting for promotion can be promoted".into(),
            }),
        })
        .await
    }

    /// Aborts a rollout: no further batch; hosts it changed are rolled back
    /// (with `auto_rollback`).
    pub async fn abort(&self, id: &str) -> Result<Rollout, EngineError> {
        self.update_get(id, |r| {
            if r.state.is_terminal() {
                return Err(EngineError::WrongState {
                    id: r.id.clone(),
                    state: r.state.name().into(),
                    message: "it has already finished".into(),
                });
            }
            r.aborted = true;
            r.state = if r.strategy.auto_rollback {
                RolloutState::RollingBack
            } else {
                RolloutState::Aborted
            };
            r.message = "aborted by an operator".into();
            Ok(vec![ev(None, "aborted", "aborted by an operator")])
        })
        .await
    }

    // ---- the watcher ----

    async fn drive(self: Arc<Self>, id: String) {
        // A batch's end, left to be made durable by the next batch's start
        // (see `run_batch`); made durable here when the rollout does not go
        // straight on.
        let carried = Deferred::default();
        self.drive_steps(&id, &carried).await;
        if let Err(e) = self.publish(&id, take(&carried)).await {
            warn!(rollout = %id, error = %e, "watcher cannot make its last writes durable");
        }
    }

    async fn drive_steps(&self, id: &str, carried: &Deferred) {
        let id = id.to_string();
        let mut changes = self.changes.subscribe();
        loop {
            if self.cancel.is_cancelled() {
                return;
            }
            let r = match self.get(&id) {
                Ok(r) => r,
                Err(e) => {
                    warn!(rollout = %id, error = %e, "watcher cannot load its rollout");
                    return;
                }
            };
            if r.state != RolloutState::Running
                && let Err(e) = self.publish(&id, take(carried)).await
            {
                warn!(rollout = %id, error = %e, "cannot make the batch's end durable");
            }
            let step = match r.state {
                RolloutState::Staging => self.stage_all(&r).await,
                RolloutState::Running => self.run_batch(&r, carried).await,
                RolloutState::RollingBack => self.rollback_all(&r).await,
                RolloutState::Paused | RolloutState::WaitingPromote => {
                    // Wait for an operator's change to this rollout.
                    loop {
                        tokio::select! {
                            m = changes.recv() => match m {
                                Ok(x) if x == id => break,
                                Ok(_) => continue,
                                Err(broadcast::error::RecvError::Lagged(_)) => break,
                                Err(_) => return,
                            },
                            () = self.cancel.cancelled() => return,
                        }
                    }
                    Ok(())
                }
                _ => return,
            };
            if let Err(e) = step {
                warn!(rollout = %id, error = %e, "rollout step failed; retrying");
                if let Err(e) = self.publish(&id, take(carried)).await {
                    warn!(rollout = %id, error = %e, "cannot make the step's writes durable");
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = self.cancel.cancelled() => return,
                }
            }
        }
    }

    fn def_timeouts(r: &Rollout) -> (Duration, Duration) {
        let d = r.definition();
        let healthy = Duration::from_millis(d.healthy_deadline_ms.max(1000));
        (
            healthy + Duration::from_millis(d.min_healthy_time_ms) + COMMAND_SLACK,
            Duration::from_secs(600),
        )
    }

    fn past_deadline(r: &Rollout) -> bool {
        planner::deadline_passed(r.created_at_ms, now_ms(), r.strategy.progress_deadline)
    }

    /// Halts past the budget or deadline; returns whether it did.
    async fn check_halt(&self, id: &str, why: Option<String>) -> Result<bool, EngineError> {
        self.check_halt_after(id, why, &Deferred::default()).await
    }

    /// As [`Engine::check_halt`]; a halt also makes `deferred`'s writes
    /// durable (it acts on them: the fleet rollback follows). Without a halt
    /// nothing is written and `deferred` is left as it is.
    async fn check_halt_after(
        &self,
        id: &str,
        why: Option<String>,
        deferred: &Deferred,
    ) -> Result<bool, EngineError> {
        let mut halted = false;
        self.update_deferred(id, deferred, |r| {
            let e = halt(r, why);
            halted = e.is_some();
            Ok(e.into_iter().collect())
        })
        .await?;
        if halted {
            self.publish(id, take(deferred)).await?;
        }
        Ok(halted)
    }

    async fn stage_all(&self, r: &Rollout) -> Result<(), EngineError> {
        if Self::past_deadline(r) {
            self.check_halt(&r.id, Some("progress_deadline passed while staging".into()))
                .await?;
            return Ok(());
        }
        let def = r.definition();
        let (_, stage_timeout) = Self::def_timeouts(r);
        let pending: Vec<String> = r
            .hosts
            .iter()
            .filter(|(_, p)| p.state == HostState::Pending)
            .map(|(h, _)| h.clone())
            .collect();
        let results = self
            .fan_out(
                pending.into_iter().map(|h| {
                    let cmd = Cmd::Stage(pb::Stage {
                        definition: Some(def.clone()),
                    });
                    (h, cmd)
                }),
                stage_timeout,
                r.strategy.stage_parallelism,
            )
            .await;
        self.update(&r.id, |r| {
            let mut events = Vec::new();
            for (h, res) in results {
                let Some(p) = r.hosts.get_mut(&h) else {
                    continue;
                };
                match res {
                    // Cut by the network (or the host is offline): the host
                    // stays pending and is staged again when its batch comes.
                    res if stage_retryable(&res) => {
                        let why = match &res {
                            Ok(x) => x.error.clone(),
                            Err(e) => e.to_string(),
                        };
                        events.push(ev(
                            Some(&h),
                            "stage_deferred",
                            format!("staged again when its batch comes: {why}"),
                        ));
                    }
                    res => events.push(self.record_stage(p, &h, res)),
                }
            }
            if r.state == RolloutState::Staging {
                r.state = RolloutState::Running;
                r.message = "staged; activating batch 0".into();
                events.push(ev(None, "running", r.message.clone()));
            }
            Ok(events)
        })
        .await?;
        self.check_halt(&r.id, None).await?;
        Ok(())
    }

    /// Runs batch `r.current_batch`. `carried` holds writes not yet durable:
    /// the previous batch's end on the way in, made durable with this
    /// batch's start; this batch's end on the way out, when the rollout goes
    /// straight on to the next batch.
    async fn run_batch(&self, r: &Rollout, carried: &Deferred) -> Result<(), EngineError> {
        let i = r.current_batch;
        if i >= r.batches.len() {
            self.update_with(&r.id, carried, |r| {
                r.state = RolloutState::Succeeded;
                r.message = format!(
                    "succeeded: {} of {} hosts on {}",
                    r.hosts
                        .values()
                        .filter(|h| h.state == HostState::Committed)
                        .count(),
                    r.hosts.len(),
                    r.release
                );
                Ok(vec![ev(None, "succeeded", r.message.clone())])
            })
            .await?;
            return Ok(());
        }
        if Self::past_deadline(r) {
            self.check_halt_after(
                &r.id,
                Some(format!("progress_deadline passed during batch {i}")),
                carried,
            )
            .await?;
            return Ok(());
        }
        let batch = r.batches[i].clone();
        // Fleet-wide gate: hosts this rollout already changed (earlier
        // batches) that are now down or unhealthy, plus this batch, must fit
        // in max_unavailable. Untouched hosts that are offline do not block:
        // they count as unreachable against the budget when their batch comes.
        let n: usize = r.hosts.len();
        let allowed = planner::max_unavailable(&r.strategy, n);
        let in_batch: std::collections::HashSet<&String> = batch.iter().collect();
        loop {
            let down: Vec<&String> = r
                .hosts
                .iter()
                .filter(|(h, p)| {
                    p.batch < i
                        && !in_batch.contains(h)
                        && p.failure.is_none()
                        && (!self.fleet.connected(h) || self.fleet.service_unhealthy(h, &r.service))
                })
                .map(|(h, _)| h)
                .collect();
            if down.len() + batch.len() <= allowed.max(batch.len()) || down.is_empty() {
                break;
            }
            if Self::past_deadline(r) {
                self.check_halt_after(
                    &r.id,
                    Some(format!(
                        "progress_deadline passed waiting for unavailable hosts ({}) before batch {i}",
                        down.iter().map(|h| h.as_str()).collect::<Vec<_>>().join(",")
                    )),
                    carried,
                )
                .await?;
                return Ok(());
            }
            // The previous batch's end is durable while this one waits.
            self.publish(&r.id, take(carried)).await?;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(250)) => {}
                () = self.cancel.cancelled() => return Ok(()),
            }
        }
        let batch_started = std::time::Instant::now();
        let (activate_timeout, _) = Self::def_timeouts(r);
        let work: Vec<String> = batch
            .iter()
            .filter(|h| {
                matches!(
                    r.hosts.get(*h).map(|p| p.state),
                    Some(HostState::Pending | HostState::Staged | HostState::Activating)
                )
            })
            .cloned()
            .collect();
        // The batch starts, and the hosts ready at once (staged and
        // connected) are journaled `activating`, in one write before any
        // Activate leaves; the others (to be staged again, offline, or
        // journaled before a restart) go one by one.
        let ready: BTreeSet<String> = work
            .iter()
            .filter(|h| {
                r.hosts.get(*h).map(|p| p.state) == Some(HostState::Staged)
                    && self.fleet.connected(h)
            })
            .cloned()
            .collect();
        let before: BTreeMap<String, Option<String>> = ready
            .iter()
            .map(|h| {
                let cur = self
                    .fleet
                    .current_release(h, &r.service)
                    .filter(|s| !s.is_empty());
                (h.clone(), cur)
            })
            .collect();
        // The batch's start is durable before any Activate leaves; its
        // events and those it made durable (the previous batch's results
        // and end: a few hundred lines on a large batch) are logged once
        // the Activates are out, while the hosts restart.
        let started = self
            .update_deferred(&r.id, carried, |r| {
                r.message = format!("batch {i}: activating {}", hosts_in_brief(&batch));
                let mut events = vec![ev(None, "batch_started", r.message.clone())];
                for (h, prev) in &before {
                    if let Some(p) = r.hosts.get_mut(h) {
                        p.state = HostState::Activating;
                        p.previous_release = prev.clone();
                        events.push(ev(
                            Some(h),
                            "activating",
                            format!("from {}", prev.clone().unwrap_or_default()),
                        ));
                    }
                }
                Ok(events)
            })
            .await;
        let to_log = take(carried);
        self.make_durable(&to_log).await?;
        if let Err(e) = started {
            self.log_and_announce(&r.id, &to_log);
            return Err(e);
        }
        let n = work.len().max(1);
        // The batch's hosts are driven by this one task: outside tokio's
        // cooperative budget, or a large batch's sends and results would be
        // spread over many polls of every pending host (each yielding at once
        // once the task's 128 operations per poll are spent).
        // The results of the hosts journaled above are written as they come,
        // those that came together in one write, and made durable with the
        // batch's end (or a halt, or the resource gate's first rollback): a
        // coordinator stopped before finds those hosts `activating` and asks
        // them, as for any restart during a batch, and a host it committed
        // answers that it is committed.
        let mut results = std::pin::pin!(
            futures::stream::iter(work.into_iter().map(|h| {
                let journaled = ready.contains(&h);
                async move {
                    if journaled {
                        let res = self.activate(r, &h, activate_timeout).await?;
                        Ok(res.map(|res| (h, res)))
                    } else {
                        self.activate_host(r, h, activate_timeout).await?;
                        Ok(None)
                    }
                }
            }))
            .buffer_unordered(n)
            .ready_chunks(n)
        );
        let mut first_error = None;
        let record = async {
            while let Some(chunk) = tokio::task::unconstrained(results.next()).await {
                let mut came = Vec::new();
                for res in chunk {
                    match res {
                        Ok(Some(x)) => came.push(x),
                        Ok(None) => {}
                        Err(e) => {
                            first_error.get_or_insert(e);
                        }
                    }
                }
                if came.is_empty() {
                    continue;
                }
                let recorded = self
                    .update_deferred(&r.id, carried, |r| {
                        Ok(came
                            .into_iter()
                            .filter_map(|(h, res)| self.record_activation(r, &h, res))
                            .collect())
                    })
                    .await;
                if let Err(e) = recorded {
                    first_error.get_or_insert(e);
                }
            }
        };
        // Polled in this order: the first poll of `record` sends every
        // Activate, then the log is written.
        futures::future::join(record, async { self.log_and_announce(&r.id, &to_log) }).await;
        if let Some(e) = first_error {
            return Err(e);
        }
        if self.check_halt_after(&r.id, None, carried).await? {
            return Ok(());
        }
        // The coordinator's own look at the batch: every host in probation
        // must report its service under the definition's resource ceilings.
        self.resource_gate(r, &batch, carried).await?;
        if self.check_halt_after(&r.id, None, carried).await? {
            return Ok(());
        }
        // The batch's gate passed on every surviving host: commit them.
        let (state, to_commit) = self.view(&r.id, |now| {
            let in_probation: Vec<String> = batch
                .iter()
                .filter(|h| now.hosts.get(*h).map(|p| p.state) == Some(HostState::Probation))
                .cloned()
                .collect();
            (now.state, in_probation)
        })?;
        if state != RolloutState::Running && state != RolloutState::Paused {
            return Ok(());
        }
        // A commit cut by the network is sent again when the host is back
        // (committing twice is a no-op on the agent).
        let healthy = Duration::from_millis(r.definition().healthy_deadline_ms.max(1000));
        let commit_by = tokio::time::Instant::now() + planner::batch_reconnect_grace(healthy);
        let results: Vec<(String, Result<pb::CommandResult, FleetError>)> =
            tokio::task::unconstrained(
                futures::stream::iter(to_commit.into_iter().map(|h| {
                    let cmd = Cmd::Commit(pb::Commit {
                        service: r.service.clone(),
                        release: r.release.clone(),
                    });
                    async move {
                        let res = self
                            .command_until(&h, cmd, COMMAND_SLACK, commit_by, transport_cut)
                            .await;
                        (h, res)
                    }
                }))
                .buffer_unordered(n)
                .collect(),
            )
            .await;
        // The commits' results, then the batch's end (or the rollout's halt,
        // when they put it past its budget), in one write.
        let mut straight_on = false;
        self.update_deferred(&r.id, carried, |r| {
            let mut events = Vec::new();
            for (h, res) in results {
                let Some(p) = r.hosts.get_mut(&h) else {
                    continue;
                };
                match res {
                    Ok(x) if x.ok => {
                        p.state = HostState::Committed;
                        events.push(ev(Some(&h), "committed", "committed"));
                    }
                    Ok(x) => {
                        p.state = HostState::Failed;
                        // The host rolled back in probation; its history says why.
                        let why = self.fleet.service(&h, &r.service).and_then(|s| {
                            s.recent
                                .iter()
                                .rev()
                                .find(|e| e.event == "rolling_back" && e.release == r.release)
                                .map(|e| e.reason.clone())
                        });
                        p.failure = Some(match &why {
                            Some(w) if w.contains("resource gate") => Failure::ResourceRegression,
                            _ => Failure::RolledBackByHost,
                        });
                        self.fleet.metrics().host_failed(p.failure);
                        p.reason = why.unwrap_or_else(|| x.error.clone());
                        events.push(ev(
                            Some(&h),
                            "host_failed",
                            format!("rolled_back_by_host: {}", x.error),
                        ));
                    }
                    Err(e) => {
                        p.state = HostState::Failed;
                        p.failure = Some(Failure::Unreachable);
                        p.reason = format!("commit: {e}");
                        events.push(ev(
                            Some(&h),
                            "host_failed",
                            format!("unreachable at commit: {e}"),
                        ));
                    }
                }
            }
            if let Some(e) = halt(r, None) {
                events.push(e);
                return Ok(events);
            }
            if r.current_batch != i {
                return Ok(events);
            }
            r.current_batch = i + 1;
            self.fleet.metrics().observe_batch(batch_started.elapsed());
            events.push(ev(None, "batch_done", format!("batch {i} done")));
            if r.current_batch < r.batches.len() && r.pause_points.contains(&i) {
                if r.state == RolloutState::Running {
                    r.state = RolloutState::WaitingPromote;
                } else {
                    r.resume_state = Some(RolloutState::WaitingPromote);
                }
                r.message = format!(
                    "canary stage done after batch {i}; waiting for `rollout promote {}`",
                    r.id
                );
                events.push(ev(None, "waiting_promote", r.message.clone()));
            }
            straight_on = r.state == RolloutState::Running;
            Ok(events)
        })
        .await?;
        // Going straight on, the batch's end is made durable by the next
        // batch's start, the one write that must precede its Activates
        // (nothing acts on this one before: a coordinator stopped in between
        // asks this batch's hosts again and finds them committed). Otherwise
        // (a halt, a pause, a canary stage's end) it is made durable now.
        if !straight_on {
            self.publish(&r.id, take(carried)).await?;
        }
        Ok(())
    }

    /// Checks the latest reports of the batch's hosts in probation against
    /// the definition's absolute ceilings; a host over one is failed as
    /// `resource_regression` (with the numbers) and rolled back.
    async fn resource_gate(
        &self,
        r: &Rollout,
        batch: &[String],
        deferred: &Deferred,
    ) -> Result<(), EngineError> {
        let t = r.definition().thresholds.unwrap_or_default();
        if t.max_rss_bytes == 0 && t.max_cpu_percent <= 0.0 {
            return Ok(());
        }
        // The batch's hosts in probation, with the release each returns to.
        let in_probation: Vec<(&String, Option<String>)> = self.view(&r.id, |now| {
            batch
                .iter()
                .filter_map(|h| {
                    let p = now.hosts.get(h)?;
                    (p.state == HostState::Probation).then(|| (h, p.previous_release.clone()))
                })
                .collect()
        })?;
        for (h, prev) in in_probation {
            let Some(s) = self.fleet.service(h, &r.service) else {
                continue;
            };
            // The steady-state average once the agent has one (a single spike
            // is the agent's call, with its sustained_samples), else the latest.
            let rss = if s.steady_rss_bytes > 0 {
                s.steady_rss_bytes
            } else {
                s.rss_bytes
            };
            let cpu = if s.steady_rss_bytes > 0 {
                s.steady_cpu_percent
            } else {
                s.cpu_percent
            };
            let over = if t.max_rss_bytes > 0 && rss > t.max_rss_bytes {
                Some(format!(
                    "coordinator batch gate: rss {rss} bytes over the ceiling of {} bytes",
                    t.max_rss_bytes
                ))
            } else if t.max_cpu_percent > 0.0 && cpu > t.max_cpu_percent {
                Some(format!(
                    "coordinator batch gate: cpu {cpu:.1}% over the ceiling of {:.1}%",
                    t.max_cpu_percent
                ))
            } else {
                None
            };
            let Some(reason) = over else { continue };
            warn!(rollout = %r.id, host = %h, reason = %reason, "resource gate failed");
            // The host's verified result is durable before it is rolled back.
            self.publish(&r.id, take(deferred)).await?;
            let cmd = Cmd::Rollback(pb::Rollback {
                service: r.service.clone(),
                to_release: prev.unwrap_or_default(),
                reason: reason.clone(),
            });
            let (timeout, _) = Self::def_timeouts(r);
            let res = self.fleet.command(h, cmd, timeout).await;
            let note = match res {
                Ok(x) if x.ok => {
                    self.fleet
                        .metrics()
                        .host_failed(Some(Failure::ResourceRegression));
                    reason.clone()
                }
                Ok(x) => format!("{reason}; rollback refused: {}", x.error),
                Err(e) => format!("{reason}; rollback failed: {e}"),
            };
            self.update(&r.id, |r| {
                if let Some(p) = r.hosts.get_mut(h) {
                    p.state = HostState::Failed;
                    p.failure = Some(Failure::ResourceRegression);
                    p.reason = note.clone();
                }
                Ok(vec![ev(
                    Some(h),
                    "host_failed",
                    format!("resource_regression: {note}"),
                )])
            })
            .await?;
        }
        Ok(())
    }

    /// Sends one command per host, at most `parallelism` at once, and
    /// collects each host's result.
    async fn fan_out(
        &self,
        commands: impl Iterator<Item = (String, Cmd)>,
        timeout: Duration,
        parallelism: usize,
    ) -> Vec<(String, Result<pb::CommandResult, FleetError>)> {
        // Outside tokio's cooperative budget (as the batch's hosts in
        // `run_batch`).
        tokio::task::unconstrained(
            futures::stream::iter(commands.map(|(h, cmd)| async move {
                let res = self.fleet.command(&h, cmd, timeout).await;
                (h, res)
            }))
            .buffer_unordered(parallelism.max(1))
            .collect(),
        )
        .await
    }

    /// Activates one host (or reconciles one journaled as activating).
    async fn activate_host(
        &self,
        r: &Rollout,
        host: String,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        let state = r.hosts.get(&host).map(|p| p.state);
        if state == Some(HostState::Activating) {
            let end = tokio::time::Instant::now() + timeout;
            return self.reconcile_activating(r, host, end, end, false).await;
        }
        let healthy = Duration::from_millis(r.definition().healthy_deadline_ms.max(1000));
        let grace_end = tokio::time::Instant::now() + planner::batch_reconnect_grace(healthy);
        if state == Some(HostState::Pending) && !self.stage_late(r, &host, grace_end).await? {
            return Ok(());
        }
        // A host briefly offline when its batch comes is waited for; the
        // Activate below fails it as unreachable if it does not return.
        if !self.await_connected(&host, grace_end).await {
            info!(rollout = %r.id, host = %host, "host not connected when its batch came; counting it unreachable");
        }
        let before = self.fleet.current_release(&host, &r.service);
        self.update(&r.id, |r| {
            if let Some(p) = r.hosts.get_mut(&host) {
                p.state = HostState::Activating;
                p.previous_release = before.clone().filter(|s| !s.is_empty());
            }
            Ok(vec![ev(
                Some(&host),
                "activating",
                format!("from {}", before.clone().unwrap_or_default()),
            )])
        })
        .await?;
        self.send_activate(r, host, timeout).await
    }

    /// Waits until `host` is connected, at most until `by`; returns whether it is.
    async fn await_connected(&self, host: &str, by: tokio::time::Instant) -> bool {
        loop {
            if self.fleet.connected(host) {
                return true;
            }
            if tokio::time::Instant::now() >= by {
                return false;
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
                () = self.cancel.cancelled() => return false,
            }
        }
    }

    /// Sends an idempotent command (Stage, Commit), and sends it again while
    /// `retry` says its outcome is transient (the host not connected, its
    /// stream cut, ...) until `by`; waits for the host to reconnect between
    /// tries. Returns the last outcome.
    async fn command_until(
        &self,
        host: &str,
        cmd: Cmd,
        timeout: Duration,
        by: tokio::time::Instant,
        retry: fn(&Result<pb::CommandResult, FleetError>) -> bool,
    ) -> Result<pb::CommandResult, FleetError> {
        loop {
            if !self.await_connected(host, by).await {
                return Err(FleetError::Unreachable(host.to_string()));
            }
            let res = self.fleet.command(host, cmd.clone(), timeout).await;
            if !retry(&res) || tokio::time::Instant::now() >= by || self.cancel.is_cancelled() {
                return res;
            }
            info!(host = %host, "command cut by the network; sending it again when the host is back");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = self.cancel.cancelled() => return res,
            }
        }
    }

    /// Stages a host whose Stage was cut at the start (still pending) when
    /// its batch comes, sending it again while the failure is transient, until
    /// `by`. Records the outcome; returns whether the host is staged.
    async fn stage_late(
        &self,
        r: &Rollout,
        host: &str,
        by: tokio::time::Instant,
    ) -> Result<bool, EngineError> {
        let (_, stage_timeout) = Self::def_timeouts(r);
        let cmd = Cmd::Stage(pb::Stage {
            definition: Some(r.definition()),
        });
        let res = self
            .command_until(host, cmd, stage_timeout, by, stage_retryable)
            .await;
        let staged = matches!(&res, Ok(x) if x.ok);
        self.update(&r.id, |r| {
            let Some(p) = r.hosts.get_mut(host) else {
                return Ok(vec![]);
            };
            if p.state != HostState::Pending {
                return Ok(vec![]);
            }
            Ok(vec![self.record_stage(p, host, res)])
        })
        .await?;
        Ok(staged)
    }

    /// Records a Stage's final outcome on its host: staged, or failed
    /// (`stage_failed` with the agent's words, or unreachable).
    fn record_stage(
        &self,
        p: &mut HostProgress,
        host: &str,
        res: Result<pb::CommandResult, FleetError>,
    ) -> Event {
        match res {
            Ok(x) if x.ok => {
                p.state = HostState::Staged;
                ev(Some(host), "staged", "release staged")
            }
            Ok(x) => {
                self.fail(p, Failure::from_pb(x.failure), x.error.clone());
                ev(
                    Some(host),
                    "host_failed",
                    format!("stage_failed: {}", x.error),
                )
            }
            Err(e) => {
                self.fail(p, Failure::Unreachable, e.to_string());
                ev(Some(host), "host_failed", format!("unreachable: {e}"))
            }
        }
    }

    /// Marks a host failed, with its failure and reason; a failure that
    /// means the host rolled itself back is counted in the metrics.
    fn fail(&self, p: &mut HostProgress, failure: Failure, reason: String) {
        p.state = HostState::Failed;
        p.failure = Some(failure);
        self.fleet.metrics().host_failed(p.failure);
        p.reason = reason;
    }

    /// Sends Activate to a host journaled `activating` and records its
    /// result durably before returning.
    async fn send_activate(
        &self,
        r: &Rollout,
        host: String,
        timeout: Duration,
    ) -> Result<(), EngineError> {
        if let Some(res) = self.activate(r, &host, timeout).await? {
            self.update(&r.id, |r| {
                Ok(self.record_activation(r, &host, res).into_iter().collect())
            })
            .await?;
        }
        Ok(())
    }

    /// Sends Activate to a host journaled `activating` and returns its
    /// answer, for the caller to record. `None`: the stream ended while the
    /// host was activating, and the outcome was decided (and recorded) from
    /// its report once it came back, or it did not.
    async fn activate(
        &self,
        r: &Rollout,
        host: &str,
        timeout: Duration,
    ) -> Result<Option<Result<pb::CommandResult, FleetError>>, EngineError> {
        let cmd = Cmd::Activate(pb::Activate {
            service: r.service.clone(),
            release: r.release.clone(),
            cause: r.id.clone(),
        });
        let sent = tokio::time::Instant::now();
        let sent_ms = now_ms();
        let res = self.fleet.command(host, cmd, timeout).await;
        if let Err(FleetError::Dropped(_)) = &res {
            // The stream ended while the host was activating: it may come
            // back at once (a network blip) having verified the release. Give
            // it a bounded grace to reconnect, then decide from its report.
            let healthy = Duration::from_millis(r.definition().healthy_deadline_ms.max(1000));
            let now = now_ms();
            let by = planner::activation_reconnect_by(sent_ms, now, healthy);
            let reconnect_by = tokio::time::Instant::now()
                + Duration::from_millis(u64::try_from(by.saturating_sub(now)).unwrap_or(0));
            info!(rollout = %r.id, host = %host, grace_ms = by.saturating_sub(now), "stream ended during the activation; waiting for the host to reconnect");
            Box::pin(self.reconcile_activating(
                r,
                host.to_string(),
                reconnect_by,
                sent + timeout,
                true,
            ))
            .await?;
            return Ok(None);
        }
        Ok(Some(res))
    }

    /// Records an Activate's answer on its host: in probation, or failed
    /// (with the agent's words, or unreachable). `None`: not a host of `r`.
    fn record_activation(
        &self,
        r: &mut Rollout,
        host: &str,
        res: Result<pb::CommandResult, FleetError>,
    ) -> Option<Event> {
        let p = r.hosts.get_mut(host)?;
        Some(match res {
            Ok(x) if x.ok => {
                p.state = HostState::Probation;
                ev(Some(host), "probation", "verified healthy; in probation")
            }
            Ok(x) => {
                let failure = Failure::from_pb(x.failure);
                self.fail(p, failure, x.error.clone());
                ev(
                    Some(host),
                    "host_failed",
                    format!("{}: {}", failure.name(), x.error),
                )
            }
            Err(e) => {
                self.fail(p, Failure::Unreachable, e.to_string());
                ev(Some(host), "host_failed", format!("unreachable: {e}"))
            }
        })
    }

    /// A host journaled as activating when the coordinator stopped, or whose
    /// stream ended while its Activate was in flight (`after_drop`): decide
    /// from its own report whether the activation happened. It must be
    /// connected by `reconnect_by` and settled (not activating, verifying or
    /// rolling back) by `settle_by`, else it counts as unreachable.
    async fn reconcile_activating(
        &self,
        r: &Rollout,
        host: String,
        reconnect_by: tokio::time::Instant,
        settle_by: tokio::time::Instant,
        after_drop: bool,
    ) -> Result<(), EngineError> {
        let mut reconnected = false;
        loop {
            let connected = self.fleet.connected(&host);
            reconnected |= connected;
            if connected && let Some(s) = self.fleet.service(&host, &r.service) {
                let ours = |event: &str| {
                    s.recent
                        .iter()
                        .any(|h| h.release == r.release && h.event == event && h.cause == r.id)
                };
                let phase = pb::Phase::try_from(s.phase).unwrap_or(pb::Phase::Unspecified);
                let outcome = if s.current_release == r.release && phase == pb::Phase::Probation {
                    Some((
                        HostState::Probation,
                        None,
                        "reconciled: in probation".to_string(),
                    ))
                } else if s.current_release == r.release
                    && phase == pb::Phase::Idle
                    && s.last_known_good == r.release
                {
                    Some((
                        HostState::Committed,
                        None,
                        "reconciled: committed".to_string(),
                    ))
                } else if ours("activating") {
                    if matches!(
                        phase,
                        pb::Phase::Activating | pb::Phase::Verifying | pb::Phase::RollingBack
                    ) {
                        None
                    } else {
                        Some((
                            HostState::Failed,
                            Some(Failure::RolledBackByHost),
                            "reconciled: the host rolled the release back".to_string(),
                        ))
                    }
                } else if !matches!(
                    phase,
                    pb::Phase::Activating | pb::Phase::Verifying | pb::Phase::RollingBack
                ) {
                    // The activation never reached the host: send it now.
                    info!(rollout = %r.id, host = %host, "activation was never received; sending it");
                    let left = settle_by.saturating_duration_since(tokio::time::Instant::now());
                    return self.send_activate(r, host, left.max(COMMAND_SLACK)).await;
                } else {
                    None
                };
                if let Some((state, failure, msg)) = outcome {
                    self.fleet.metrics().host_failed(failure);
                    // After a drop, the outcome is the answer the Activate
                    // would have had: recorded under the same event kinds.
                    let (kind, msg) = if after_drop {
                        let kind = match state {
                            HostState::Probation => "probation",
                            HostState::Committed => "committed",
                            _ => "host_failed",
                        };
                        (
                            kind,
                            format!(
                                "its stream ended during the activation; it reconnected: {msg}"
                            ),
                        )
                    } else {
                        ("reconciled", msg)
                    };
                    self.update(&r.id, |r| {
                        if let Some(p) = r.hosts.get_mut(&host) {
                            p.state = state;
                            p.failure = failure;
                            if failure.is_some() {
                                p.reason = msg.clone();
                            }
                        }
                        Ok(vec![ev(Some(&host), kind, msg)])
                    })
                    .await?;
                    return Ok(());
                }
            }
            let now = tokio::time::Instant::now();
            if now > settle_by || (!reconnected && now > reconnect_by) {
                let why = match (after_drop, reconnected) {
                    (false, _) => "no report after a coordinator restart".to_string(),
                    (true, false) => format!(
                        "its stream ended during the activation and it did not reconnect within {:?}",
                        planner::reconnect_grace(Duration::from_millis(
                            r.definition().healthy_deadline_ms.max(1000)
                        ))
                    ),
                    (true, true) => {
                        "its stream ended during the activation; it reconnected but did not settle in time"
                            .to_string()
                    }
                };
                self.update(&r.id, |r| {
                    if let Some(p) = r.hosts.get_mut(&host) {
                        p.state = HostState::Failed;
                        p.failure = Some(Failure::Unreachable);
                        p.reason = why.clone();
                    }
                    Ok(vec![ev(
                        Some(&host),
                        "host_failed",
                        format!("unreachable: {why}"),
                    )])
                })
                .await?;
                return Ok(());
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => {}
                () = self.cancel.cancelled() => return Ok(()),
            }
        }
    }

    async fn rollback_all(&self, r: &Rollout) -> Result<(), EngineError> {
        let mut by_batch: Vec<(usize, String, Option<String>)> = r
            .hosts
            .iter()
            .filter(|(_, p)| {
                matches!(
                    p.state,
                    HostState::Probation
                        | HostState::Committed
                        | HostState::RollingBack
                        | HostState::Activating
                )
            })
            .map(|(h, p)| (p.batch, h.clone(), p.previous_release.clone()))
            .collect();
        by_batch.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut batch_ids: Vec<usize> = by_batch.iter().map(|x| x.0).collect();
        batch_ids.dedup();
        for b in batch_ids {
            let hosts: Vec<(String, Option<String>)> = by_batch
                .iter()
                .filter(|x| x.0 == b)
                .map(|x| (x.1.clone(), x.2.clone()))
                .collect();
            self.update(&r.id, |r| {
                for (h, _) in &hosts {
                    if let Some(p) = r.hosts.get_mut(h) {
                        p.state = HostState::RollingBack;
                    }
                }
                Ok(vec![ev(
                    None,
                    "rolling_back",
                    format!(
                        "batch {b}: rolling back {}",
                        hosts
                            .iter()
                            .map(|h| h.0.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                )])
            })
            .await?;
            let (t, _) = Self::def_timeouts(r);
            let results = self
                .fan_out(
                    hosts.into_iter().map(|(h, prev)| {
                        let cmd = Cmd::Rollback(pb::Rollback {
                            service: r.service.clone(),
                            to_release: prev.unwrap_or_default(),
                            reason: format!("rollout {} halted: {}", r.id, r.message),
                        });
                        (h, cmd)
                    }),
                    t,
                    r.strategy.rollback_parallelism,
                )
                .await;
            self.update(&r.id, |r| {
                let mut events = Vec::new();
                for (h, res) in results {
                    let Some(p) = r.hosts.get_mut(&h) else {
                        continue;
                    };
                    match res {
                        Ok(x) if x.ok => {
                            p.state = HostState::RolledBack;
                            let why = if r.aborted { "abort" } else { "fleet_halt" };
                            self.fleet.metrics().rollback(why);
                            events.push(ev(
                                Some(&h),
                                "rolled_back",
                                "returned to its previous release",
                            ));
                        }
                        // Still on the new release: the rollback is owed, and
                        // the reconciler sends it when the host is back.
                        Ok(x) => {
                            p.state = HostState::RollbackOwed;
                            p.reason = format!("rollback refused: {}", x.error);
                            events.push(ev(
                                Some(&h),
                                "rollback_owed",
                                format!("rollback refused: {}; retried when the host reconnects or settles", x.error),
                            ));
                        }
                        Err(e) => {
                            p.state = HostState::RollbackOwed;
                            p.reason = format!("rollback: {e}");
                            events.push(ev(
                                Some(&h),
                                "rollback_owed",
                                format!("{e}; rolled back when it reconnects"),
                            ));
                        }
                    }
                }
                Ok(events)
            })
            .await?;
        }
        self.update(&r.id, |r| {
            r.state = if r.aborted {
                RolloutState::Aborted
            } else {
                RolloutState::RolledBack
            };
            let owed = r.owed_rollbacks();
            let tail = if owed.is_empty() {
                String::new()
            } else {
                format!(
                    "; rollback still owed on {} (unreachable or refused): each is rolled back when it reconnects",
                    owed.join(",")
                )
            };
            r.message = format!("{}{tail}", r.message);
            Ok(vec![ev(None, r.state.name(), r.message.clone())])
        })
        .await?;
        Ok(())
    }

    /// Watches hosts come back: a host a rollout counted as unreachable is
    /// reconciled from its own report (and rolled back if it returned on the
    /// new release uncommitted), and the rollout's record says so.
    pub fn spawn_reconciler(self: &Arc<Self>) {
        let me = self.clone();
        let mut changes = self.fleet.subscribe();
        self.tasks.spawn(async move {
            loop {
                let host = tokio::select! {
                    m = changes.recv() => match m {
                        Ok(h) => h,
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(_) => return,
                    },
                    () = me.cancel.cancelled() => return,
                };
                if !me.fleet.connected(&host) {
                    continue;
                }
                if let Err(e) = me.reconcile_returned(&host).await {
                    warn!(host = %host, error = %e, "reconciling a returned host failed");
                }
                if let Err(e) = me.settle_owed_rollbacks(&host).await {
                    warn!(host = %host, error = %e, "settling an owed rollback failed");
                }
            }
        });
    }

    /// The rollouts the reconciler must look at for `host`, newest first
    /// (see [`Engine::watch`]).
    fn watched(&self, host: &str) -> Result<Vec<Rollout>, EngineError> {
        let ids: Vec<String> = {
            let mut w = self
                .watch
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if w.is_none() {
                let mut index: HashMap<String, BTreeSet<String>> = HashMap::new();
                for r in self.store.rollouts()? {
                    for (h, p) in &r.hosts {
                        if needs_reconcile(p) {
                            index.entry(h.clone()).or_default().insert(r.id.clone());
                        }
                    }
                }
                *w = Some(index);
            }
            w.as_ref()
                .and_then(|w| w.get(host))
                .map(|s| s.iter().cloned().collect())
                .unwrap_or_default()
        };
        let mut v = Vec::new();
        for id in ids {
            match self.get(&id) {
                Ok(r) => v.push(r),
                Err(EngineError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        v.sort_by_key(|r| std::cmp::Reverse(r.created_at_ms));
        Ok(v)
    }

    async fn reconcile_returned(&self, host: &str) -> Result<(), EngineError> {
        let rollouts: Vec<Rollout> = self
            .watched(host)?
            .into_iter()
            .filter(|r| {
                r.hosts.get(host).is_some_and(|p| {
                    p.failure == Some(Failure::Unreachable) && !p.reason.contains("returned on")
                })
            })
            .collect();
        for r in rollouts {
            let Some(s) = self.fleet.service(host, &r.service) else {
                continue;
            };
            let phase = pb::Phase::try_from(s.phase).unwrap_or(pb::Phase::Unspecified);
            if matches!(
                phase,
                pb::Phase::Activating | pb::Phase::Verifying | pb::Phase::RollingBack
            ) {
                // Still recovering; a later report settles it.
                continue;
            }
            let away: Vec<String> = s
                .recent
                .iter()
                .filter(|h| h.cause == r.id || h.release == r.release)
                .map(|h| format!("{} {}", h.release, h.event))
                .collect();
            let mut note = format!(
                "returned on {} ({}); its history: {}",
                if s.current_release.is_empty() {
                    "-"
                } else {
                    &s.current_release
                },
                s.step,
                if away.is_empty() {
                    "nothing".to_string()
                } else {
                    away.join(", ")
                }
            );
            if s.current_release == r.release && phase == pb::Phase::Probation {
                // On the new release but never committed by this rollout: it
                // counted as failed, so it goes back.
                let prev = r.hosts.get(host).and_then(|p| p.previous_release.clone());
                let cmd = Cmd::Rollback(pb::Rollback {
                    service: r.service.clone(),
                    to_release: prev.unwrap_or_default(),
                    reason: format!("rollout {} counted this host as unreachable", r.id),
                });
                let (t, _) = Self::def_timeouts(&r);
                match self.fleet.command(host, cmd, t).await {
                    Ok(x) if x.ok => note.push_str("; rolled back"),
                    Ok(x) => note.push_str(&format!("; rollback refused: {}", x.error)),
                    Err(e) => note.push_str(&format!("; rollback failed: {e}")),
                }
            }
            info!(rollout = %r.id, host, note = %note, "reconciled a returned host");
            self.update(&r.id, |r| {
                if let Some(p) = r.hosts.get_mut(host) {
                    p.reason = format!("{}; {note}", p.reason);
                }
                Ok(vec![ev(Some(host), "reconciled", note.clone())])
            })
            .await?;
        }
        Ok(())
    }

    /// A connected host whose fleet rollback is owed (it was unreachable or
    /// refused when its rollout rolled back): rolled back now if it still
    /// runs the rollout's release, else recorded as back. Once no host of
    /// the rollout is owed any more, the rollout records that its fleet
    /// rollback is complete.
    async fn settle_owed_rollbacks(&self, host: &str) -> Result<(), EngineError> {
        let rollouts: Vec<Rollout> = self
            .watched(host)?
            .into_iter()
            .filter(|r| r.hosts.get(host).map(|p| p.state) == Some(HostState::RollbackOwed))
            .collect();
        for r in rollouts {
            let (Some(session), Some(s)) = (
                self.fleet.session(host),
                self.fleet.service(host, &r.service),
            ) else {
                continue;
            };
            let phase = pb::Phase::try_from(s.phase).unwrap_or(pb::Phase::Unspecified);
            let busy = matches!(
                phase,
                pb::Phase::Activating | pb::Phase::Verifying | pb::Phase::RollingBack
            );
            let note = match planner::owed_rollback(busy, s.current_release == r.release) {
                planner::OwedRollback::Wait => continue,
                planner::OwedRollback::Settled => format!(
                    "back on {} by itself ({}); nothing to send",
                    if s.current_release.is_empty() {
                        "-"
                    } else {
                        &s.current_release
                    },
                    s.step
                ),
                planner::OwedRollback::Send => {
                    let key = (r.id.clone(), host.to_string());
                    let seen = (session, s.current_release.clone(), s.phase);
                    let again = self
                        .owed_sent
                        .lock()
                        .map(|m| m.get(&key) == Some(&seen))
                        .unwrap_or(false);
                    if again {
                        continue;
                    }
                    if let Ok(mut m) = self.owed_sent.lock() {
                        m.insert(key, seen);
                    }
                    let prev = r.hosts.get(host).and_then(|p| p.previous_release.clone());
                    let cmd = Cmd::Rollback(pb::Rollback {
                        service: r.service.clone(),
                        to_release: prev.unwrap_or_default(),
                        reason: format!("rollout {} halted: owed rollback ({})", r.id, r.message),
                    });
                    let (t, _) = Self::def_timeouts(&r);
                    match self.fleet.command(host, cmd, t).await {
                        Ok(x) if x.ok => {
                            let why = if r.aborted { "abort" } else { "fleet_halt" };
                            self.fleet.metrics().rollback(why);
                            "returned to its previous release on reconnect".to_string()
                        }
                        Ok(x) => {
                            self.update(&r.id, |_| {
                                Ok(vec![ev(
                                    Some(host),
                                    "rollback_failed",
                                    format!("owed rollback refused: {}; still owed", x.error),
                                )])
                            })
                            .await?;
                            continue;
                        }
                        Err(e) => {
                            self.update(&r.id, |_| {
                                Ok(vec![ev(
                                    Some(host),
                                    "rollback_failed",
                                    format!("owed rollback: {e}; still owed"),
                                )])
                            })
                            .await?;
                            continue;
                        }
                    }
                }
            };
            info!(rollout = %r.id, host, note = %note, "owed rollback settled");
            self.update(&r.id, |r| {
                let Some(p) = r.hosts.get_mut(host) else {
                    return Ok(vec![]);
                };
                if p.state != HostState::RollbackOwed {
                    return Ok(vec![]);
                }
                p.state = HostState::RolledBack;
                p.reason = format!("{}; {note}", p.reason);
                let mut events = vec![ev(Some(host), "rolled_back", note.clone())];
                if r.owed_rollbacks().is_empty() && r.state.is_terminal() {
                    r.message = format!(
                        "{}; fleet rollback complete: every host it changed is back",
                        r.message
                            .split("; rollback still owed on")
                            .next()
                            .unwrap_or_default()
                    );
                    events.push(ev(
                        None,
                        "rollback_complete",
                        "every host it changed is back on its previous release",
                    ));
                }
                Ok(events)
            })
            .await?;
            if let Ok(mut m) = self.owed_sent.lock() {
                m.remove(&(r.id.clone(), host.to_string()));
            }
        }
        Ok(())
    }

    /// `rollout rollback <service> [--to]`: every host reporting the service.
    pub async fn rollback_service(&self, service: &str, to: &str) -> Vec<pb::HostProgress> {
        let hosts: Vec<String> = self
            .fleet
            .hosts()
            .into_iter()
            .filter(|h| {
                h.report
                    .as_ref()
                    .is_some_and(|r| r.services.iter().any(|s| s.service == service))
            })
            .map(|h| h.host)
            .collect();
        futures::stream::iter(hosts.into_iter().map(|h| async move {
            let cmd = Cmd::Rollback(pb::Rollback {
                service: service.to_string(),
                to_release: to.to_string(),
                reason: "requested by an operator (rollout rollback)".into(),
            });
            let res = self.fleet.command(&h, cmd, Duration::from_secs(600)).await;
            if res.as_ref().is_ok_and(|x| x.ok) {
                self.fleet.metrics().rollback("operator");
            }
            let (state, reason) = match res {
                Ok(x) if x.ok => (
                    "rolled_back".to_string(),
                    x.service
                        .map(|s| format!("now on {}", s.current_release))
                        .unwrap_or_default(),
                ),
                Ok(x) => ("failed".to_string(), x.error),
                Err(e) => ("failed".to_string(), e.to_string()),
            };
            pb::HostProgress {
                host: h,
                state,
                failure: String::new(),
                reason,
                previous_release: String::new(),
            }
        }))
        .buffer_unordered(10)
        .collect()
        .await
    }
}

#[cfg(test)]
mod tests;
