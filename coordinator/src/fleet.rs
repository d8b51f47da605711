//! The live fleet registry: which agents are connected, their labels and last
//! report, and the command round-trip over each agent's stream (commands down,
//! results matched back by command id). It also holds the removed hosts
//! (`rollout hosts remove`, see [`crate::join`]): [`Fleet::admit`] refuses
//! their certificates, [`Fleet::remove_host`] closes their stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rollout_proto::pb;
use tokio::sync::{broadcast, mpsc, oneshot};
use tonic::Status;
use tracing::{info, warn};

use crate::engine::model::{HostRecord, now_ms};
use crate::join::HostRevocation;
use crate::store::{Store, StoreError};
use crate::tls::Identity;

/// Why a command did not get a result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FleetError {
    /// The host has no live stream.
    #[error("host {0} is unreachable (not connected to the coordinator)")]
    Unreachable(String),
    /// The host's stream ended (or was replaced by a newer one) while the
    /// command was in flight: the host may have acted on it.
    #[error("host {0} is unreachable (its stream ended while the command was in flight)")]
    Dropped(String),
    /// No result within the time allowed.
    #[error("host {host} did not answer within {after:?}")]
    Timeout {
        /// Host.
        host: String,
        /// Time waited.
        after: Duration,
    },
}

/// What [`Fleet::remove_host`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemovedHost {
    /// The host was connected or remembered (else the name may be a typo;
    /// it is revoked all the same).
    pub was_known: bool,
    /// A live stream was closed.
    pub was_connected: bool,
    /// When the removal took effect (unix ms).
    pub removed_at_ms: i64,
}

/// One item down an agent stream: a command, or the status that ends the
/// stream. Boxed because the channel allocates its slots 32 at a time for
/// every connected agent, and unboxed slots (a message or a `Status`, some
/// 450 bytes) cost about 14 KiB per agent: 140 MiB of the coordinator's
/// memory at 10,000 agents (BENCHMARKS.md, fan-out).
pub type Outbound = Box<Result<pb::CoordinatorMessage, Status>>;

/// Outbound half of an agent stream.
pub type AgentTx = mpsc::Sender<Outbound>;

struct Conn {
    session: u64,
    tx: AgentTx,
    pending: HashMap<String, oneshot::Sender<pb::CommandResult>>,
}

struct Known {
    labels: BTreeMap<String, String>,
    report: pb::Report,
    last_seen_ms: i64,
    address: String,
}

/// The registry.
pub struct Fleet {
    conns: Mutex<HashMap<String, Conn>>,
    known: Mutex<BTreeMap<String, Known>>,
    /// Removed hosts, by name; read on every agent RPC, so cached here.
    revoked: Mutex<HashMap<String, HostRevocation>>,
    store: Store,
    changes: broadcast::Sender<String>,
    next: AtomicU64,
    metrics: crate::metrics::MetricsHook,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fleet").finish_non_exhaustive()
    }
}

impl Fleet {
    /// A registry seeded with the hosts the store remembers (all disconnected).
    pub fn new(store: Store) -> Fleet {
        let mut known = BTreeMap::new();
        for h in store.hosts().unwrap_or_default() {
            known.insert(
                h.host.clone(),
                Known {
                    labels: h.labels,
                    report: prost::Message::decode(h.report.as_slice()).unwrap_or_default(),
                    last_seen_ms: h.last_seen_ms,
                    address: h.address,
                },
            );
        }
        let revoked = store
            .revocations()
            .unwrap_or_default()
            .into_iter()
            .map(|r| (r.host.clone(), r))
            .collect();
        let (changes, _) = broadcast::channel(1024);
        Fleet {
            conns: Mutex::new(HashMap::new()),
            known: Mutex::new(known),
            revoked: Mutex::new(revoked),
            store,
            changes,
            next: AtomicU64::new(1),
            metrics: Default::default(),
        }
    }

    /// Where the fleet and the engine record Prometheus metrics (a no-op
    /// until `server::run` sets it, with `metrics_listen`).
    pub fn metrics(&self) -> &crate::metrics::MetricsHook {
        &self.metrics
    }

    /// Host names that changed (connected, reported, disconnected).
    pub fn subscribe(&self) -> broadcast::Receiver<String> {
        self.changes.subscribe()
    }

    fn persist(&self, host: &str) {
        let rec = self.known.lock().ok().and_then(|k| {
            k.get(host).map(|k| HostRecord {
                host: host.to_string(),
                labels: k.labels.clone(),
                last_seen_ms: k.last_seen_ms,
                address: k.address.clone(),
                report: prost::Message::encode_to_vec(&k.report),
            })
        });
        if let Some(rec) = rec
            && let Err(e) = self.store.save_host(&rec)
        {
            warn!(host, error = %e, "cannot persist host");
        }
    }

    /// Refuses the certificate of a removed host (`PermissionDenied`), unless a
    /// join after the removal issued it. Called on every agent RPC.
    pub fn admit(&self, id: &Identity) -> Result<(), Status> {
        let revoked = self
            .revoked
            .lock()
            .map_err(|_| Status::internal("revocation list unavailable"))?;
        crate::join::check_admitted(id, revoked.get(&id.name))
    }

    /// `rollout hosts remove`: records the removal (durably, before anything
    /// else), closes the host's live stream with the refusal its agent will
    /// log, and forgets the host.
    pub fn remove_host(&self, host: &str) -> Result<RemovedHost, StoreError> {
        let revocation = HostRevocation::new(host, now_ms());
        {
            let mut revoked = self.revoked.lock().map_err(|_| StoreError::Backend {
                context: "revoke host".into(),
                message: "revocation list poisoned".into(),
            })?;
            self.store.revoke_host(&revocation)?;
            revoked.insert(host.to_string(), revocation.clone());
        }
        let conn = self.conns.lock().ok().and_then(|mut c| c.remove(host));
        let was_connected = conn.is_some();
        if let Some(conn) = conn {
            // The agent sees this status as the end of its stream; dropping
            // the sender (and the pending commands) ends it in any case.
            let _ = conn.tx.try_send(Box::new(Err(revocation.refusal())));
        }
        let was_known = self
            .known
            .lock()
            .map(|mut k| k.remove(host).is_some())
            .unwrap_or(false);
        info!(
            host,
            was_connected, "host removed; its certificates are refused"
        );
        let _ = self.changes.send(host.to_string());
        Ok(RemovedHost {
            was_known: was_known || was_connected,
            was_connected,
            removed_at_ms: revocation.removed_at_ms,
        })
    }

    /// A join issued the certificate `serial` to `host`: if the host was
    /// removed, that certificate (only) is admitted again.
    pub fn admit_serial(&self, host: &str, serial: &str) -> Result<(), StoreError> {
        let mut revoked = self.revoked.lock().map_err(|_| StoreError::Backend {
            context: "admit certificate".into(),
            message: "revocation list poisoned".into(),
        })?;
        if let Some(r) = revoked.get(host) {
            let mut next = r.clone();
            next.admitted_serials.push(serial.to_string());
            self.store.save_revocation(&next)?;
            revoked.insert(host.to_string(), next);
        }
        Ok(())
    }

    /// A new stream from `host`; replaces an older one. Returns its session id.
    pub fn register(&self, hello: &pb::Hello, address: String, tx: AgentTx) -> u64 {
        let session = self.next.fetch_add(1, Ordering::SeqCst);
        if let Ok(mut c) = self.conns.lock() {
            // Dropping the old connection's pending senders fails its commands
            // as unreachable.
            c.insert(
                hello.host.clone(),
                Conn {
                    session,
                    tx,
                    pending: HashMap::new(),
                },
            );
        }
        if let Ok(mut k) = self.known.lock() {
            k.insert(
                hello.host.clone(),
                Known {
                    labels: hello.labels.clone().into_iter().collect(),
                    report: hello.report.clone().unwrap_or_default(),
                    last_seen_ms: now_ms(),
                    address,
                },
            );
        }
        self.persist(&hello.host);
        info!(host = %hello.host, session, "agent connected");
        let _ = self.changes.send(hello.host.clone());
        session
    }

    /// Ends every agent's stream (the coordinator is stopping): their
    /// outbound halves close, so a graceful shutdown does not wait on
    /// streams that never end; commands in flight fail as unreachable.
    pub fn close_all(&self) {
        if let Ok(mut c) = self.conns.lock() {
            c.clear();
        }
    }

    /// The stream of `host` ended.
    pub fn unregister(&self, host: &str, session: u64) {
        if let Ok(mut c) = self.conns.lock()
            && c.get(host).is_some_and(|c| c.session == session)
        {
            c.remove(host);
        }
        self.persist(host);
        info!(host, session, "agent disconnected");
        let _ = self.changes.send(host.to_string());
    }

    /// A report arrived: services it carries replace the ones known.
    pub fn on_report(&self, host: &str, report: pb::Report) {
        if let Ok(mut k) = self.known.lock()
            && let Some(known) = k.get_mut(host)
        {
            known.last_seen_ms = now_ms();
            let mut services = std::mem::take(&mut known.report.services);
            for s in &report.services {
                services.retain(|x| x.service != s.service);
            }
            services.extend(report.services.iter().cloned());
            services.sort_by(|a, b| a.service.cmp(&b.service));
            known.report = pb::Report { services, ..report };
        }
        let _ = self.changes.send(host.to_string());
    }

    /// A command result arrived.
    pub fn on_result(&self, host: &str, result: pb::CommandResult) {
        let waiter = self.conns.lock().ok().and_then(|mut c| {
            c.get_mut(host)
                .and_then(|c| c.pending.remove(&result.command_id))
        });
        if let Some(tx) = waiter {
            let _ = tx.send(result);
        }
    }

    /// Whether `host` has a live stream.
    pub fn connected(&self, host: &str) -> bool {
        self.conns
            .lock()
            .map(|c| c.contains_key(host))
            .unwrap_or(false)
    }

    /// The session id of `host`'s live stream (a new one on every connect).
    pub fn session(&self, host: &str) -> Option<u64> {
        self.conns.lock().ok()?.get(host).map(|c| c.session)
    }

    /// How many known hosts have a live stream, and how many are known: the
    /// figures of [`Fleet::hosts`] without copying every host's report.
    pub fn counts(&self) -> (usize, usize) {
        let Ok(known) = self.known.lock() else {
            return (0, 0);
        };
        let connected = self
            .conns
            .lock()
            .map(|c| known.keys().filter(|h| c.contains_key(*h)).count())
            .unwrap_or(0);
        (connected, known.len())
    }

    /// Names of the hosts with a live stream, sorted.
    pub fn connected_hosts(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .conns
            .lock()
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Whether the registry knows `host` (connected now or remembered).
    pub fn knows(&self, host: &str) -> bool {
        self.connected(host) || self.known.lock().is_ok_and(|k| k.contains_key(host))
    }

    /// Last report of `host`'s `service`.
    pub fn service(&self, host: &str, service: &str) -> Option<pb::ServiceReport> {
        self.with_service(host, service, Clone::clone)
    }

    /// The release `host` last reported `service` on (no copy of the
    /// report: a batch's start asks this of each of its hosts).
    pub fn current_release(&self, host: &str, service: &str) -> Option<String> {
        self.with_service(host, service, |s| s.current_release.clone())
    }

    /// `f` of the last report of `host`'s `service`, under the registry's lock.
    fn with_service<T>(
        &self,
        host: &str,
        service: &str,
        f: impl FnOnce(&pb::ServiceReport) -> T,
    ) -> Option<T> {
        let k = self.known.lock().ok()?;
        k.get(host)?
            .report
            .services
            .iter()
            .find(|s| s.service == service)
            .map(f)
    }

    /// Whether `host` last reported `service` unhealthy (no copy of the
    /// report: the fleet-wide gate asks this of every host between batches).
    pub fn service_unhealthy(&self, host: &str, service: &str) -> bool {
        self.known.lock().ok().is_some_and(|k| {
            k.get(host).is_some_and(|k| {
                k.report
                    .services
                    .iter()
                    .any(|s| s.service == service && s.health == pb::Health::Unhealthy as i32)
            })
        })
    }

    /// Every known host with its labels (for target selection).
    pub fn labels(&self) -> Vec<(String, BTreeMap<String, String>)> {
        self.known
            .lock()
            .map(|k| {
                k.iter()
                    .map(|(h, k)| (h.clone(), k.labels.clone()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every known host for `rollout hosts`.
    pub fn hosts(&self) -> Vec<pb::HostInfo> {
        let known = match self.known.lock() {
            Ok(k) => k,
            Err(_) => return Vec::new(),
        };
        known
            .iter()
            .map(|(h, k)| pb::HostInfo {
                host: h.clone(),
                labels: k.labels.clone().into_iter().collect(),
                connected: self.connected(h),
                last_seen_ms: k.last_seen_ms,
                report: Some(k.report.clone()),
                address: k.address.clone(),
            })
            .collect()
    }

    /// Sends `cmd` to `host` and waits up to `timeout` for its result.
    pub async fn command(
        &self,
        host: &str,
        cmd: pb::coordinator_message::Cmd,
        timeout: Duration,
    ) -> Result<pb::CommandResult, FleetError> {
        let id = format!("c{}", self.next.fetch_add(1, Ordering::SeqCst));
        let kind = crate::metrics::command_name(&cmd);
        let started = std::time::Instant::now();
        let (tx, rx) = oneshot::channel();
        let out = {
            let mut c = self
                .conns
                .lock()
                .map_err(|_| FleetError::Unreachable(host.to_string()))?;
            let conn = c
                .get_mut(host)
                .ok_or_else(|| FleetError::Unreachable(host.to_string()))?;
            conn.pending.insert(id.clone(), tx);
            conn.tx.clone()
        };
        let msg = pb::CoordinatorMessage {
            command_id: id.clone(),
            cmd: Some(cmd),
        };
        if out.send(Box::new(Ok(msg))).await.is_err() {
            return Err(FleetError::Dropped(host.to_string()));
        }
        let waited = tokio::time::timeout(timeout, rx).await;
        self.metrics.observe_command(kind, started.elapsed());
        match waited {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(_)) => Err(FleetError::Dropped(host.to_string())),
            Err(_) => {
                if let Ok(mut c) = self.conns.lock()
                    && let Some(conn) = c.get_mut(host)
                {
                    conn.pending.remove(&id);
                }
                Err(FleetError::Timeout {
                    host: host.to_string(),
                    after: timeout,
                })
            }
        }
    }
}
