//! [`StateStore`] on sled. One tree, key prefixes per kind, so that a
//! [`Write`] is a single atomic batch followed by one `flush` (fsync).
//!
//! Keys: `svc/<service>` → [`ServiceRecord`], `rel/<service>/<release>` →
//! [`ReleaseRecord`], `hist/<service>/<seq as 8 big-endian bytes>` → [`HistoryEntry`].
//! Values are JSON: small, and readable with any sled dump when debugging a host.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{
    HISTORY_KEEP, HistoryEntry, ReleaseRecord, ServiceRecord, StateStore, StoreError, Write,
};

/// sled's page cache (its default is 1 GiB). The agent reads a few records
/// per service and the newest history lines; with the history trimmed to
/// [`HISTORY_KEEP`] entries per service the whole database of a host with a
/// few services fits.
const CACHE_CAPACITY_BYTES: u64 = 2 << 20;

/// Period of sled's background flusher (its default is 500 ms). Every
/// [`StateStore::commit`] flushes (fsync) before it returns, so durability
/// never waits for the flusher; what is left to it is reclaiming log segments,
/// which can wait seconds, and an idle agent should not wake twice a second.
const FLUSH_EVERY_MS: u64 = 10_000;

/// The agent's sled database.
#[derive(Debug, Clone)]
pub struct SledStore {
    db: sled::Db,
    /// History entries per service, counted once per service from the
    /// database and kept up to date by every commit, so that trimming to
    /// [`HISTORY_KEEP`] walks only the entries it drops. The lock is held from
    /// a commit's batch to the end of its trim, so the counts match the tree.
    history_len: Arc<Mutex<HashMap<String, usize>>>,
}

fn backend(context: impl Into<String>) -> impl FnOnce(sled::Error) -> StoreError {
    let context = context.into();
    move |e| StoreError::Backend {
        context,
        message: e.to_string(),
    }
}

fn encode<T: Serialize>(key: &[u8], v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(key: &[u8], bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        message: e.to_string(),
    })
}

fn svc_key(service: &str) -> Vec<u8> {
    format!("svc/{service}").into_bytes()
}

fn rel_key(service: &str, release: &str) -> Vec<u8> {
    format!("rel/{service}/{release}").into_bytes()
}

fn hist_prefix(service: &str) -> Vec<u8> {
    format!("hist/{service}/").into_bytes()
}

impl SledStore {
    /// Test-only: opens `dir` again right after this process dropped its
    /// handle. sled's flusher thread may hold the file lock a moment after
    /// the drop (spacejam/sled#1234), so the open is retried for up to 5 s.
    #[cfg(test)]
    pub fn open_after_close(dir: &Path) -> Self {
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

    /// Opens (or creates) the database in `dir`.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY_BYTES)
            .flush_every_ms(Some(FLUSH_EVERY_MS))
            .open()
            .map_err(backend(format!("open {}", dir.display())))?;
        Ok(SledStore {
            db,
            history_len: Arc::default(),
        })
    }

    /// Drops a service's history entries beyond the newest [`HISTORY_KEEP`],
    /// after a batch that added `added` of them. `lens` is the locked map of
    /// counts; an entry is removed from it when its count cannot be trusted.
    fn trim_history(
        &self,
        lens: &mut HashMap<String, usize>,
        service: &str,
        added: usize,
    ) -> Result<(), StoreError> {
        let prefix = hist_prefix(service);
        let len = match lens.get(service) {
            Some(len) => len.saturating_add(added),
            None => self
                .db
                .scan_prefix(&prefix)
                .keys()
                .try_fold(0usize, |n, k| k.map(|_| n + 1))
                .map_err(backend("count history"))?,
        };
        // Unknown until the trim below is through.
        lens.remove(service);
        let excess = len.saturating_sub(HISTORY_KEEP);
        if excess > 0 {
            let mut batch = sled::Batch::default();
            for k in self.db.scan_prefix(&prefix).keys().take(excess) {
                batch.remove(k.map_err(backend("scan history"))?);
            }
            self.db
                .apply_batch(batch)
                .map_err(backend("trim history"))?;
        }
        lens.insert(service.to_string(), len - excess);
        Ok(())
    }

    fn scan<T: DeserializeOwned>(&self, prefix: &[u8]) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(prefix) {
            let (k, v) = kv.map_err(backend("scan"))?;
            out.push(decode(&k, &v)?);
        }
        Ok(out)
    }
}

impl StateStore for SledStore {
    fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        self.scan(b"svc/")
    }

    fn service(&self, name: &str) -> Result<Option<ServiceRecord>, StoreError> {
        let key = svc_key(name);
        match self.db.get(&key).map_err(backend("read service"))? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    fn commit(&self, write: Write) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        if let Some(s) = &write.service {
            let key = svc_key(&s.service);
            let v = encode(&key, s)?;
            batch.insert(key, v);
        }
        for r in &write.put_releases {
            let key = rel_key(r.service(), r.release());
            let v = encode(&key, r)?;
            batch.insert(key, v);
        }
        for (s, r) in &write.delete_releases {
            batch.remove(rel_key(s, r));
        }
        let mut history_of = BTreeMap::<String, usize>::new();
        for mut h in write.history {
            h.seq = self.db.generate_id().map_err(backend("history id"))?;
            let mut key = hist_prefix(&h.service);
            key.extend_from_slice(&h.seq.to_be_bytes());
            let v = encode(&key, &h)?;
            batch.insert(key, v);
            *history_of.entry(h.service).or_default() += 1;
        }
        if history_of.is_empty() {
            self.db.apply_batch(batch).map_err(backend("write"))?;
        } else {
            let mut lens = self.history_len.lock().map_err(|_| StoreError::Backend {
                context: "count history".into(),
                message: "a commit panicked while trimming history".into(),
            })?;
            self.db.apply_batch(batch).map_err(backend("write"))?;
            for (service, added) in &history_of {
                self.trim_history(&mut lens, service, *added)?;
            }
        }
        self.db.flush().map_err(backend("flush"))?;
        Ok(())
    }

    fn releases(&self, service: &str) -> Result<Vec<ReleaseRecord>, StoreError> {
        let mut v: Vec<ReleaseRecord> = self.scan(format!("rel/{service}/").as_bytes())?;
        v.sort_by_key(|r| r.staged_at_ms);
        Ok(v)
    }

    fn release(&self, service: &str, release: &str) -> Result<Option<ReleaseRecord>, StoreError> {
        let key = rel_key(service, release);
        match self.db.get(&key).map_err(backend("read release"))? {
            Some(v) => Ok(Some(decode(&key, &v)?)),
            None => Ok(None),
        }
    }

    fn history(&self, service: &str, limit: usize) -> Result<Vec<HistoryEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.db.scan_prefix(hist_prefix(service)).rev().take(limit) {
            let (k, v) = kv.map_err(backend("scan history"))?;
            out.push(decode(&k, &v)?);
        }
        out.reverse();
        Ok(out)
    }
}
