//! What the coordinator persists, in sled: rollouts (every transition written
//! and flushed before it is acted on), their event logs, the last known
//! state of every host, join tokens (`token/<sha256>`, never the token) and
//! removed hosts (`revoked/<host>`). One narrow interface, so a replicated
//! backend can replace sled later.
//!
//! Test-only crash points: in builds with the `crash-points` feature, a store
//! given a point of [`CRASH_POINTS`] (`[testing] crash_at`) SIGKILLs the
//! process right after the first rollout write that persists it.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::model::{Event, HostRecord, Rollout, RolloutState};
use crate::join::{HostRevocation, TokenRecord, TokenRefusal};

/// A store failure.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database failed.
    #[error(
        "coordinator state store: {context}: {message}; check the data directory's disk and permissions"
    )]
    Backend {
        /// What was being done.
        context: String,
        /// Backend message.
        message: String,
    },
    /// A value does not decode.
    #[error("coordinator state store: {key} is corrupt: {message}")]
    Corrupt {
        /// Key.
        key: String,
        /// Decoder message.
        message: String,
    },
}

fn backend(context: &str) -> impl FnOnce(sled::Error) -> StoreError + '_ {
    move |e| StoreError::Backend {
        context: context.to_string(),
        message: e.to_string(),
    }
}

fn encode<T: Serialize>(key: &str, v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
        key: key.to_string(),
        message: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(key: &[u8], v: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

/// The events stored under one key: those of one write (a list), or one
/// event alone (a record of an earlier version, one event per key).
fn decode_events(key: &[u8], v: &[u8]) -> Result<Vec<Event>, StoreError> {
    if v.first() == Some(&b'[') {
        decode(key, v)
    } else {
        decode(key, v).map(|e| vec![e])
    }
}

/// The coordinator's test-only crash points, one per persisted rollout
/// transition: a point is reached right after (flushed) the first rollout
/// write carrying an event of that kind, `host_<kind>` for a host's event
/// (`host_failed` for a host's `host_failed`).
pub const CRASH_POINTS: &[&str] = &[
    // The rollout, staging.
    "created",
    // Staging results (hosts staged or failed) and the move to running.
    "running",
    // A batch's start, in the write that journals its ready hosts
    // activating (host_activating), before any Activate is sent.
    "batch_started",
    // A host journaled activating, before its Activate is sent.
    "host_activating",
    // A host's Activate answered: verified, in probation. Written unflushed,
    // made durable with the batch's end or, when the rollout goes straight
    // on, with the next batch's start.
    "host_probation",
    // The batch's commits' results and its end, in one write (durable as
    // the results above).
    "host_committed",
    "batch_done",
    "succeeded",
    // Canary stage done; then the operator's promote.
    "waiting_promote",
    "promoted",
    "paused",
    "resumed",
    "host_failed",
    // Past the budget: rolling back (or failed).
    "halted",
    // A batch of hosts journaled rolling back, before the Rollbacks are sent.
    "rolling_back",
    "host_rolled_back",
    // A host the fleet rollback could not reach (or that refused): its
    // rollback is owed, sent by the reconciler when it reconnects.
    "host_rollback_owed",
    "rolled_back",
    // The last owed rollback of a finished rollout settled.
    "rollback_complete",
    // The operator's abort.
    "aborted",
];

/// The part of a rollout that never changes after its creation.
#[derive(Serialize, serde::Deserialize)]
struct Plan {
    batches: std::sync::Arc<Vec<Vec<String>>>,
    definition: std::sync::Arc<Vec<u8>>,
}

/// Which hosts' progress [`Store::write_rollout`] writes.
#[derive(Debug, Clone, Copy)]
pub enum HostsToWrite<'a> {
    /// Every host (a new rollout, or the first write of a loaded one).
    All,
    /// Only these hosts changed.
    Only(&'a [String]),
}

/// What [`Store::rollout_heads`] reads of a rollout: enough to count
/// rollouts by state and find a service's unfinished one, without decoding
/// its hosts or plan.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct RolloutHead {
    /// Rollout id.
    pub id: String,
    /// Service it updates.
    pub service: String,
    /// Where it stands.
    pub state: RolloutState,
    /// When it was created (unix ms).
    pub created_at_ms: i64,
}

/// The coordinator's sled database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    crash_at: Option<String>,
    group: std::sync::Arc<GroupFlush>,
    /// Each rollout's last event number, once written by this process (the
    /// store is its only writer), so a write does not look it up.
    last_event: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, u64>>>,
    /// A rollout is kept under several keys (head, plan, hosts): a reader
    /// holds this shared while it reads them, a rollout write holds it
    /// exclusively while it applies, so a read never sees part of a write
    /// (sled 0.34 has no snapshot reads and its transactions cannot scan).
    whole: std::sync::Arc<std::sync::RwLock<()>>,
}

/// Group commit for [`Store::flush`]: one fsync at a time, each covering
/// every write made before it started, so that the writers of a batch's
/// results share a few fsyncs instead of each starting its own (on its own
/// blocking thread).
#[derive(Debug, Default)]
struct GroupFlush {
    /// Writes so far (each [`Store::write_rollout`] counts one).
    written: std::sync::atomic::AtomicU64,
    /// Writes known durable: the `written` count when the last completed
    /// flush started.
    durable: std::sync::atomic::AtomicU64,
    /// Held by the one flush in progress.
    running: tokio::sync::Mutex<()>,
    /// fsyncs done by [`Store::flush`].
    fsyncs: std::sync::atomic::AtomicU64,
}

impl Store {
    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .open()
            .map_err(|e| StoreError::Backend {
                context: format!("open {}", dir.display()),
                message: e.to_string(),
            })?;
        Ok(Store {
            db,
            crash_at: None,
            group: Default::default(),
            last_event: Default::default(),
            whole: Default::default(),
        })
    }

    /// Test-only: opens `dir` again right after this process dropped its
    /// handle. sled's flusher thread may hold the file lock a moment after
    /// the drop (spacejam/sled#1234), so the open is retried for up to 5 s.
    #[cfg(test)]
    pub fn open_after_close(dir: &Path) -> Store {
        let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Self::open(dir) {
                Ok(s) => return s,
                Err(e) if std::time::Instant::now() >= end => {
                    panic!("reopen {}: {e}", dir.display())
                }
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            }
        }
    }

    /// Test-only: writes raw bytes under `key` (records of earlier versions).
    #[cfg(test)]
    pub fn insert_raw(&self, key: &str, value: Vec<u8>) {
        self.db.insert(key.as_bytes(), value).expect("insert");
    }

    /// Test-only: the raw bytes under `key`.
    #[cfg(test)]
    pub fn raw(&self, key: &str) -> Option<Vec<u8>> {
        self.db
            .get(key.as_bytes())
            .expect("get")
            .map(|v| v.to_vec())
    }

    /// Arms a test-only crash point (one of [`CRASH_POINTS`]). Builds without
    /// the `crash-points` feature ignore it with a warning.
    pub fn with_crash_at(mut self, point: Option<String>) -> Store {
        if point.is_some() && !cfg!(feature = "crash-points") {
            tracing::warn!(
                point = point.as_deref().unwrap_or_default(),
                "[testing] crash_at is ignored: this build has no crash points"
            );
            return self;
        }
        self.crash_at = point;
        self
    }

    /// Test-only: SIGKILLs the process when this write persisted the armed
    /// crash point.
    fn crash_point(&self, events: &[Event]) {
        let Some(point) = self.crash_at.as_deref() else {
            return;
        };
        // A host's event `x` is point `host_x` (`host_failed` stays as is).
        let hit = events.iter().any(|e| match &e.host {
            Some(_) if !e.kind.starts_with("host_") => {
                point.strip_prefix("host_") == Some(e.kind.as_str())
            }
            _ => point == e.kind,
        });
        if hit {
            tracing::error!(point, "crash point reached; killing the coordinator");
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
        }
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv.map_err(backend("scan"))?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }

    /// Writes a rollout and the events that explain the change, atomically and
    /// durably (flushed) before returning. Each rollout numbers its events
    /// 1, 2, 3, ... (the next after its last stored one), so a gap in a log
    /// is a lost event. Writes of one rollout must not race (the engine
    /// holds the rollout's lock).
    pub fn save_rollout(&self, r: &Rollout, events: &[Event]) -> Result<(), StoreError> {
        self.write_rollout(&mut r.clone(), HostsToWrite::All, events)?;
        self.db.flush().map_err(backend("flush"))?;
        self.crash_point(events);
        Ok(())
    }

    /// As [`Store::save_rollout`], but flushed by the caller's
    /// [`Store::flush`] (outside the rollout's lock, so that concurrent
    /// writers share one fsync): the write is visible to readers at once,
    /// durable only after that flush. Writes of one rollout must not race.
    ///
    /// The record is kept in pieces, so that a host's transition writes a
    /// few hundred bytes whatever the fleet's size: `rollout/<id>` holds the
    /// rollout's state without its hosts and plan, `rplan/<id>` the plan
    /// (batches and definition, which never change; written with every
    /// host), `rhost/<id>/<host>` each host's progress (`hosts` says which
    /// are written), `event/<id>/<n>` the write's events, numbered from `n`
    /// (earlier versions kept one event per key; both are read). Records of
    /// earlier versions, with the hosts and plan inline, are read as they
    /// are and split on their first write (which writes every host and the
    /// plan).
    pub fn write_rollout(
        &self,
        r: &mut Rollout,
        hosts: HostsToWrite<'_>,
        events: &[Event],
    ) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let key = format!("rollout/{}", r.id);
        if matches!(hosts, HostsToWrite::All) {
            let k = format!("rplan/{}", r.id);
            let plan = Plan {
                batches: r.batches.clone(),
                definition: r.definition.clone(),
            };
            batch.insert(k.as_bytes(), encode(&k, &plan)?);
        }
        // The head: what is left without the hosts and the plan.
        let all = std::mem::take(&mut r.hosts);
        let batches = std::mem::take(&mut r.batches);
        let definition = std::mem::take(&mut r.definition);
        let head = encode(&key, &*r);
        r.hosts = all;
        r.batches = batches;
        r.definition = definition;
        batch.insert(key.as_bytes(), head?);
        let mut put_host = |h: &str, p: &crate::engine::model::HostProgress| {
            let k = format!("rhost/{}/{h}", r.id);
            encode(&k, p).map(|v| batch.insert(k.as_bytes(), v))
        };
        match hosts {
            HostsToWrite::All => {
                for (h, p) in &r.hosts {
                    put_host(h, p)?;
                }
            }
            HostsToWrite::Only(list) => {
                for h in list {
                    if let Some(p) = r.hosts.get(h) {
                        put_host(h, p)?;
                    }
                }
            }
        }
        let prefix = format!("event/{}/", r.id);
        // Held to the end: two writes of one rollout never take one number.
        let mut last_event = self
            .last_event
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let known = last_event.get(&r.id).copied();
        let mut seq = match known {
            Some(seq) => seq,
            None => self.last_stored_event(&prefix)?,
        };
        // The write's events under one key, the number of its first: a
        // batch's hundred host events are one insert, not a hundred.
        if !events.is_empty() {
            let mut k = prefix.clone().into_bytes();
            k.extend_from_slice(&(seq + 1).to_be_bytes());
            let numbered: Vec<Event> = events
                .iter()
                .map(|e| {
                    seq += 1;
                    Event { seq, ..e.clone() }
                })
                .collect();
            batch.insert(k, encode("event", &numbered)?);
        }
        {
            let _whole = self
                .whole
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.db
                .apply_batch(batch)
                .map_err(backend("write rollout"))?;
        }
        // A finished rollout is rarely written again: its number is read
        // from the store then.
        if r.state.is_terminal() {
            last_event.remove(&r.id);
        } else {
            last_event.insert(r.id.clone(), seq);
        }
        drop(last_event);
        self.group
            .written
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// The number of the last event stored under `prefix` (0: none).
    fn last_stored_event(&self, prefix: &str) -> Result<u64, StoreError> {
        Ok(match self.db.scan_prefix(prefix.as_bytes()).next_back() {
            None => 0,
            Some(kv) => {
                let (k, v) = kv.map_err(backend("read the last event"))?;
                let first = k
                    .get(prefix.len()..)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_be_bytes)
                    .ok_or_else(|| StoreError::Corrupt {
                        key: String::from_utf8_lossy(&k).into_owned(),
                        message: "an event key must end in a 64-bit sequence number".into(),
                    })?;
                decode_events(&k, &v)?
                    .last()
                    .map_or(first, |e| e.seq.max(first))
            }
        })
    }

    /// Makes every write so far durable, then honours an armed crash point
    /// among `events` (the events of the caller's write). Group commit: a
    /// caller whose write an fsync started after it already covers returns
    /// without one; the others wait for the fsync in progress and start the
    /// next, which covers all of them.
    pub async fn flush(&self, events: &[Event]) -> Result<(), StoreError> {
        use std::sync::atomic::Ordering::SeqCst;
        let mine = self.group.written.load(SeqCst);
        if self.group.durable.load(SeqCst) < mine {
            let _running = self.group.running.lock().await;
            if self.group.durable.load(SeqCst) < mine {
                let upto = self.group.written.load(SeqCst);
                // A blocking flush on the blocking pool: concurrent
                // `flush_async` futures of sled 0.34 can be left never woken
                // (spacejam/sled#1241).
                let db = self.db.clone();
                tokio::task::spawn_blocking(move || db.flush())
                    .await
                    .map_err(|e| StoreError::Backend {
                        context: "flush".into(),
                        message: e.to_string(),
                    })?
                    .map_err(backend("flush"))?;
                self.group.durable.fetch_max(upto, SeqCst);
                self.group.fsyncs.fetch_add(1, SeqCst);
            }
        }
        self.crash_point(events);
        Ok(())
    }

    /// How many fsyncs [`Store::flush`] has done.
    pub fn flushes(&self) -> u64 {
        self.group.fsyncs.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many rollout writes [`Store::write_rollout`] has made.
    pub fn writes(&self) -> u64 {
        self.group.written.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// How many rollout writes no completed [`Store::flush`] covers yet.
    pub fn not_durable(&self) -> u64 {
        use std::sync::atomic::Ordering::SeqCst;
        let durable = self.group.durable.load(SeqCst);
        self.group.written.load(SeqCst).saturating_sub(durable)
    }

    /// One rollout, as one write left it (never part of a write).
    pub fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        let key = format!("rollout/{id}");
        let _whole = self
            .whole
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match self
            .db
            .get(key.as_bytes())
            .map_err(backend("read rollout"))?
        {
            Some(v) => {
                let mut r: Rollout = decode(key.as_bytes(), &v)?;
                self.load_parts(&mut r)?;
                Ok(Some(r))
            }
            None => Ok(None),
        }
    }

    /// Fills in the plan (`rplan/<id>`) and the hosts stored under their own
    /// keys (`rhost/<id>/<host>`). The caller holds `whole`.
    fn load_parts(&self, r: &mut Rollout) -> Result<(), StoreError> {
        let k = format!("rplan/{}", r.id);
        if let Some(v) = self
            .db
            .get(k.as_bytes())
            .map_err(backend("read a rollout's plan"))?
        {
            let plan: Plan = decode(k.as_bytes(), &v)?;
            r.batches = plan.batches;
            r.definition = plan.definition;
        }
        let prefix = format!("rhost/{}/", r.id);
        for kv in self.db.scan_prefix(prefix.as_bytes()) {
            let (k, v) = kv.map_err(backend("read a rollout's hosts"))?;
            let host = String::from_utf8_lossy(k.get(prefix.len()..).unwrap_or_default());
            r.hosts.insert(host.into_owned(), decode(&k, &v)?);
        }
        // As loaded: nothing changed yet.
        r.hosts.forget_changes();
        Ok(())
    }

    /// Every rollout, oldest first; each as one write left it (read one at
    /// a time, so that writers wait for one rollout's read, not all).
    pub fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let mut ids = Vec::new();
        for k in self.db.scan_prefix(b"rollout/").keys() {
            let k = k.map_err(backend("list rollouts"))?;
            ids.push(
                String::from_utf8_lossy(k.get("rollout/".len()..).unwrap_or_default()).into_owned(),
            );
        }
        let mut v = Vec::with_capacity(ids.len());
        for id in ids {
            // Gone since the listing: not a rollout any more.
            if let Some(r) = self.rollout(&id)? {
                v.push(r);
            }
        }
        v.sort_by_key(|r| r.created_at_ms);
        Ok(v)
    }

    /// Every rollout's head, oldest first: its id, service and state, read
    /// from `rollout/<id>` alone. What a metrics scrape or a deploy's check
    /// for a running rollout needs, at a cost that does not grow with the
    /// hosts of the rollouts kept.
    pub fn rollout_heads(&self) -> Result<Vec<RolloutHead>, StoreError> {
        let mut v: Vec<RolloutHead> = self.scan("rollout/")?;
        v.sort_by_key(|r| r.created_at_ms);
        Ok(v)
    }

    /// The event log of a rollout, in order.
    pub fn events(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(format!("event/{id}/").as_bytes()) {
            let (k, v) = kv.map_err(backend("read a rollout's events"))?;
            out.extend(decode_events(&k, &v)?);
        }
        Ok(out)
    }

    /// Remembers a host (labels, last report), flushed.
    pub fn save_host(&self, h: &HostRecord) -> Result<(), StoreError> {
        let key = format!("host/{}", h.host);
        self.db
            .insert(key.as_bytes(), encode(&key, h)?)
            .map_err(backend("write host"))?;
        self.db.flush().map_err(backend("flush"))?;
        Ok(())
    }

    /// Every host ever seen.
    pub fn hosts(&self) -> Result<Vec<HostRecord>, StoreError> {
        self.scan("host/")
    }

    /// Forgets a host.
    pub fn remove_host(&self, host: &str) -> Result<(), StoreError> {
        self.db
            .remove(format!("host/{host}").as_bytes())
            .map_err(backend("remove host"))?;
        self.db.flush().map_err(backend("flush"))?;
        Ok(())
    }

    /// Stores a new join token, pruning tokens spent or expired long ago
    /// (one batch, flushed).
    pub fn save_token(&self, t: &TokenRecord, now_ms: i64) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for kv in self.db.scan_prefix(b"token/") {
            let (k, v) = kv.map_err(backend("scan tokens"))?;
            let old: TokenRecord = decode(&k, &v)?;
            if old.prunable(now_ms) {
                batch.remove(k);
            }
        }
        let key = format!("token/{}", t.hash);
        batch.insert(key.as_bytes(), encode(&key, t)?);
        self.db.apply_batch(batch).map_err(backend("write token"))?;
        self.db.flush().map_err(backend("flush"))?;
        Ok(())
    }

    /// A join token by the hash of the token.
    pub fn token(&self, hash: &str) -> Result<Option<TokenRecord>, StoreError> {
        let key = format!("token/{hash}");
        match self.db.get(key.as_bytes()).map_err(backend("read token"))? {
            Some(v) => Ok(Some(decode(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Spends the token with `hash` for `host` at `now_ms` if it admits it:
    /// checked and marked used in one compare-and-swap (two joins racing with
    /// one token cannot both succeed), flushed before returning. The inner
    /// `Err` says why the token was refused.
    pub fn use_token(
        &self,
        hash: &str,
        host: &str,
        now_ms: i64,
    ) -> Result<Result<TokenRecord, TokenRefusal>, StoreError> {
        let key = format!("token/{hash}");
        loop {
            let Some(current) = self.db.get(key.as_bytes()).map_err(backend("read token"))? else {
                return Ok(Err(TokenRefusal::Unknown));
            };
            let record: TokenRecord = decode(key.as_bytes(), &current)?;
            if let Err(refusal) = record.check(host, now_ms) {
                return Ok(Err(refusal));
            }
            let spent = record.spent_by(host, now_ms);
            let swapped = self
                .db
                .compare_and_swap(key.as_bytes(), Some(current), Some(encode(&key, &spent)?))
                .map_err(backend("spend token"))?;
            if swapped.is_ok() {
                self.db.flush().map_err(backend("flush"))?;
                return Ok(Ok(spent));
            }
            // Changed under us (another join): read it again.
        }
    }

    /// Records a host's removal and forgets the host (one batch, flushed).
    pub fn revoke_host(&self, r: &HostRevocation) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let key = format!("revoked/{}", r.host);
        batch.insert(key.as_bytes(), encode(&key, r)?);
        batch.remove(format!("host/{}", r.host).as_bytes());
        self.db.apply_batch(batch).map_err(backend("revoke host"))?;
        self.db.flush().map_err(backend("flush"))?;
        Ok(())
    }

    /// Rewrites a revocation (a join admitted a new certificate), flushed.
    pub fn save_revocation(&self, r: &HostRevocation) -> Result<(), StoreError> {
        let key = format!("revoked/{}", r.host);
        self.db
            .insert(key.as_bytes(), encode(&key, r)?)
            .map_err(backend("write revocation"))?;
        self.db.flush().map_err(backend("flush"))?;
        Ok(())
    }

    /// Every removed host.
    pub fn revocations(&self) -> Result<Vec<HostRevocation>, StoreError> {
        self.scan("revoked/")
    }
}

#[cfg(test)]
mod join_tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::join::hash_token;

    const T0: i64 = 1_700_000_000_000;

    #[test]
    fn store_spends_a_token_once_and_keeps_only_its_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let hash = hash_token("secret-token");
        let labels = BTreeMap::from([("role".to_string(), "web".to_string())]);
        let rec = TokenRecord::new(
            hash.clone(),
            T0,
            Duration::from_secs(60),
            labels.clone(),
            None,
        );
        store.save_token(&rec, T0).expect("save");
        assert_eq!(store.token(&hash).expect("read"), Some(rec));
        for kv in store.db.iter() {
            let (k, v) = kv.expect("kv");
            let all = [k.as_ref(), v.as_ref()].concat();
            assert!(!String::from_utf8_lossy(&all).contains("secret-token"));
        }

        let spent = store
            .use_token(&hash, "web-1", T0 + 1)
            .expect("store")
            .expect("first use");
        assert_eq!(spent.labels, labels);
        let again = store.use_token(&hash, "web-2", T0 + 2).expect("store");
        assert!(matches!(again, Err(TokenRefusal::Used { ref host, .. }) if host == "web-1"));
        let unknown = store
            .use_token(&hash_token("nope"), "web-1", T0)
            .expect("store");
        assert_eq!(unknown, Err(TokenRefusal::Unknown));

        // Reopened: still spent (flushed).
        drop(store);
        let store = Store::open_after_close(dir.path());
        let r = store.token(&hash).expect("read").expect("kept");
        assert_eq!(r.used.map(|u| u.host).as_deref(), Some("web-1"));
    }

    #[test]
    fn store_refuses_an_expired_token_without_spending_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let hash = hash_token("t");
        let rec = TokenRecord::new(
            hash.clone(),
            T0,
            Duration::from_secs(1),
            BTreeMap::new(),
            None,
        );
        store.save_token(&rec, T0).expect("save");
        let r = store.use_token(&hash, "h", T0 + 1000).expect("store");
        assert_eq!(r, Err(TokenRefusal::Expired { at_ms: T0 + 1000 }));
        assert_eq!(store.token(&hash).expect("read").and_then(|t| t.used), None);
        // A day later the next `token create` prunes it.
        let day = crate::join::KEEP_SPENT.as_millis() as i64;
        let fresh = TokenRecord::new(
            hash_token("u"),
            T0,
            Duration::from_secs(60),
            BTreeMap::new(),
            None,
        );
        store.save_token(&fresh, T0 + 2000 + day).expect("save");
        assert_eq!(store.token(&hash).expect("read"), None);
    }

    #[test]
    fn concurrent_joins_with_one_token_admit_exactly_one() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let hash = hash_token("race");
        let rec = TokenRecord::new(
            hash.clone(),
            T0,
            Duration::from_secs(60),
            BTreeMap::new(),
            None,
        );
        store.save_token(&rec, T0).expect("save");
        let wins: usize = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let (store, hash) = (store.clone(), hash.clone());
                    s.spawn(move || {
                        store
                            .use_token(&hash, &format!("h{i}"), T0 + 1)
                            .expect("store")
                            .is_ok() as usize
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap_or(0)).sum()
        });
        assert_eq!(wins, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn writers_waiting_together_share_one_fsync() {
        use crate::engine::model::{HostProgress, HostState, Hosts, Rollout, RolloutState};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let rollout = |i: usize| Rollout {
            id: format!("r-{i}"),
            service: "web".into(),
            release: "v2".into(),
            definition: Default::default(),
            strategy: Default::default(),
            batches: std::sync::Arc::new(vec![vec!["h1".into()]]),
            pause_points: Default::default(),
            state: RolloutState::Running,
            resume_state: None,
            current_batch: 0,
            aborted: false,
            hosts: Hosts::from_iter([(
                "h1".to_string(),
                HostProgress {
                    state: HostState::Pending,
                    batch: 0,
                    failure: None,
                    reason: String::new(),
                    previous_release: None,
                },
            )]),
            failure_budget: 0,
            message: String::new(),
            created_at_ms: T0,
            updated_at_ms: T0,
        };
        // 32 writers write, then all flush at once: the first fsync covers
        // every write, so it is the only one.
        let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(32));
        let tasks: Vec<_> = (0..32)
            .map(|i| {
                let (store, barrier) = (store.clone(), barrier.clone());
                tokio::spawn(async move {
                    store
                        .write_rollout(&mut rollout(i), HostsToWrite::All, &[])
                        .expect("write");
                    barrier.wait().await;
                    store.flush(&[]).await.expect("flush");
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task");
        }
        assert_eq!(store.flushes(), 1);
        // A write after it needs a flush of its own; one already covered
        // does not.
        store.flush(&[]).await.expect("flush");
        assert_eq!(store.flushes(), 1);
        store
            .write_rollout(&mut rollout(99), HostsToWrite::All, &[])
            .expect("write");
        store.flush(&[]).await.expect("flush");
        assert_eq!(store.flushes(), 2);
        assert_eq!(store.rollouts().expect("read").len(), 33);
    }

    #[test]
    fn revoking_a_host_forgets_it_and_is_remembered() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        store
            .save_host(&HostRecord {
                host: "web-1".into(),
                labels: BTreeMap::new(),
                last_seen_ms: T0,
                address: String::new(),
                report: Vec::new(),
            })
            .expect("host");
        let mut rev = HostRevocation::new("web-1", T0);
        store.revoke_host(&rev).expect("revoke");
        assert!(store.hosts().expect("hosts").is_empty());
        rev.admitted_serials.push("ab".into());
        store.save_revocation(&rev).expect("admit");
        assert_eq!(store.revocations().expect("list"), vec![rev]);
    }
}

#[cfg(test)]
mod event_tests {
    use super::*;
    use crate::engine::model::RolloutState;

    fn rollout(id: &str) -> Rollout {
        Rollout {
            id: id.to_string(),
            service: "web".into(),
            release: "v2".into(),
            definition: Default::default(),
            strategy: Default::default(),
            batches: Default::default(),
            pause_points: Default::default(),
            state: RolloutState::Running,
            resume_state: None,
            current_batch: 0,
            aborted: false,
            hosts: Default::default(),
            failure_budget: 0,
            message: String::new(),
            created_at_ms: 0,
            updated_at_ms: 0,
        }
    }

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|i| Event {
                seq: 0,
                at_ms: 0,
                host: None,
                kind: format!("k{i}"),
                message: String::new(),
            })
            .collect()
    }

    fn seqs(store: &Store, id: &str) -> Vec<u64> {
        store
            .events(id)
            .expect("events")
            .iter()
            .map(|e| e.seq)
            .collect()
    }

    /// Each rollout numbers its events 1, 2, 3, ... across its writes,
    /// another rollout's writes in between, its end, and a reopen of the
    /// store (where the last number is read back from the store).
    #[test]
    fn event_numbers_follow_on_across_writes_rollouts_and_reopens() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = Store::open(dir.path()).expect("open");
            let mut a = rollout("r-a");
            let mut b = rollout("r-b");
            store
                .write_rollout(&mut a, HostsToWrite::All, &events(2))
                .expect("write a");
            store
                .write_rollout(&mut b, HostsToWrite::All, &events(1))
                .expect("write b");
            store
                .write_rollout(&mut a, HostsToWrite::Only(&[]), &events(3))
                .expect("write a again");
            a.state = RolloutState::Succeeded;
            store
                .write_rollout(&mut a, HostsToWrite::Only(&[]), &events(1))
                .expect("a ends");
            // A finished rollout written again (an owed rollback settled).
            store
                .write_rollout(&mut a, HostsToWrite::Only(&[]), &events(1))
                .expect("a after its end");
            assert_eq!(seqs(&store, "r-a"), vec![1, 2, 3, 4, 5, 6, 7]);
            assert_eq!(seqs(&store, "r-b"), vec![1]);
            store.db.flush().expect("flush");
        }
        let store = Store::open_after_close(dir.path());
        let mut b = rollout("r-b");
        store
            .write_rollout(&mut b, HostsToWrite::Only(&[]), &events(2))
            .expect("write b after the reopen");
        assert_eq!(seqs(&store, "r-b"), vec![1, 2, 3]);
        assert_eq!(seqs(&store, "r-a").len(), 7);
    }

    /// A write's events are stored under one key; a log of an earlier
    /// version (one event per key) is read as it is and followed on.
    #[test]
    fn a_write_s_events_share_one_key_and_older_logs_are_followed_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        for seq in 1..=2u64 {
            let mut k = b"event/r-old/".to_vec();
            k.extend_from_slice(&seq.to_be_bytes());
            let e = Event {
                seq,
                at_ms: 0,
                host: None,
                kind: format!("old{seq}"),
                message: String::new(),
            };
            store
                .db
                .insert(k, serde_json::to_vec(&e).expect("encode"))
                .expect("insert");
        }
        let mut r = rollout("r-old");
        store
            .write_rollout(&mut r, HostsToWrite::All, &events(100))
            .expect("write");
        store
            .write_rollout(&mut r, HostsToWrite::Only(&[]), &events(1))
            .expect("write again");
        let keys = store.db.scan_prefix(b"event/r-old/").count();
        assert_eq!(keys, 4, "two old keys, then one per write");
        let got = store.events("r-old").expect("events");
        assert_eq!(seqs(&store, "r-old"), (1..=103).collect::<Vec<u64>>());
        assert_eq!(got[0].kind, "old1");
        assert_eq!(got[2].kind, "k0");
        assert_eq!(got[101].kind, "k99");
        assert_eq!(got[102].kind, "k0");
    }

    /// Heads are read without the hosts: a rollout whose host record does
    /// not decode still counts, where reading it whole fails; a record of
    /// an earlier version, hosts inline, is read too; oldest first.
    #[test]
    fn heads_are_read_without_the_hosts() {
        use crate::engine::model::{HostProgress, HostState};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut old = rollout("r-old");
        old.created_at_ms = 1;
        old.state = RolloutState::Succeeded;
        old.hosts.insert(
            "h1".into(),
            HostProgress {
                state: HostState::Committed,
                batch: 0,
                failure: None,
                reason: String::new(),
                previous_release: None,
            },
        );
        store.insert_raw("rollout/r-old", serde_json::to_vec(&old).expect("encode"));
        let mut a = rollout("r-a");
        a.created_at_ms = 3;
        a.service = "api".into();
        a.hosts = old.hosts.clone();
        store
            .write_rollout(&mut a, HostsToWrite::All, &[])
            .expect("write a");
        let mut b = rollout("r-b");
        b.created_at_ms = 2;
        store
            .write_rollout(&mut b, HostsToWrite::All, &[])
            .expect("write b");
        store.insert_raw("rhost/r-a/h1", b"not json".to_vec());
        assert!(store.rollouts().is_err(), "a host that does not decode");
        let heads = store.rollout_heads().expect("heads");
        let seen: Vec<(&str, &str, RolloutState)> = heads
            .iter()
            .map(|h| (h.id.as_str(), h.service.as_str(), h.state))
            .collect();
        assert_eq!(
            seen,
            vec![
                ("r-old", "web", RolloutState::Succeeded),
                ("r-b", "web", RolloutState::Running),
                ("r-a", "api", RolloutState::Running),
            ]
        );
    }

    /// A rollout read while it is written is the rollout of one write: its
    /// head and its hosts (separate keys) agree. The writer stamps the head's
    /// message and both hosts' reasons with the write's number; a reader
    /// racing it never sees two numbers.
    #[test]
    fn a_rollout_read_during_writes_is_never_part_of_one() {
        use crate::engine::model::{HostProgress, HostState};
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let mut r = rollout("r-torn");
        let names = ["h1".to_string(), "h2".to_string()];
        for h in &names {
            r.hosts.insert(
                h.clone(),
                HostProgress {
                    state: HostState::Probation,
                    batch: 0,
                    failure: None,
                    reason: "0".into(),
                    previous_release: None,
                },
            );
        }
        r.message = "0".into();
        store
            .write_rollout(&mut r, HostsToWrite::All, &[])
            .expect("first write");
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reader = {
            let store = store.clone();
            let done = done.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !done.load(std::sync::atomic::Ordering::SeqCst) {
                    let r = store.rollout("r-torn").expect("read").expect("stored");
                    let seen: Vec<&str> = std::iter::once(r.message.as_str())
                        .chain(r.hosts.values().map(|p| p.reason.as_str()))
                        .collect();
                    assert!(
                        seen.iter().all(|x| *x == seen[0]),
                        "a read mixed two writes after {reads} reads: {seen:?}"
                    );
                    reads += 1;
                }
                reads
            })
        };
        for n in 1..=2_000u32 {
            r.message = n.to_string();
            for h in &names {
                if let Some(p) = r.hosts.get_mut(h) {
                    p.reason = n.to_string();
                }
            }
            store
                .write_rollout(&mut r, HostsToWrite::Only(&names), &[])
                .expect("write");
        }
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        let reads = reader.join().expect("the reader saw every read whole");
        assert!(reads > 0, "the reader never read");
        let listed = store.rollouts().expect("list");
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].message, "2000");
    }
}
