//! In-memory [`StateStore`] for tests of the executor.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;

use super::{
    HISTORY_KEEP, HistoryEntry, ReleaseRecord, ServiceRecord, StateStore, StoreError, Write,
};

#[derive(Debug, Default)]
struct Inner {
    services: BTreeMap<String, ServiceRecord>,
    releases: BTreeMap<(String, String), ReleaseRecord>,
    history: BTreeMap<(String, u64), HistoryEntry>,
    seq: u64,
}

/// A store that forgets everything when dropped.
#[derive(Debug, Default)]
pub struct MemoryStore {
    inner: Mutex<Inner>,
}

impl MemoryStore {
    fn lock(&self) -> Result<std::sync::MutexGuard<'_, Inner>, StoreError> {
        self.inner.lock().map_err(|_| StoreError::Backend {
            context: "lock".into(),
            message: "poisoned".into(),
        })
    }
}

impl StateStore for MemoryStore {
    fn services(&self) -> Result<Vec<ServiceRecord>, StoreError> {
        Ok(self.lock()?.services.values().cloned().collect())
    }

    fn service(&self, name: &str) -> Result<Option<ServiceRecord>, StoreError> {
        Ok(self.lock()?.services.get(name).cloned())
    }

    fn commit(&self, write: Write) -> Result<(), StoreError> {
        let mut inner = self.lock()?;
        if let Some(s) = write.service {
            inner.services.insert(s.service.clone(), s);
        }
        for r in write.put_releases {
            inner
                .releases
                .insert((r.service().to_string(), r.release().to_string()), r);
        }
        for key in write.delete_releases {
            inner.releases.remove(&key);
        }
        let mut touched = BTreeSet::new();
        for mut h in write.history {
            inner.seq += 1;
            h.seq = inner.seq;
            touched.insert(h.service.clone());
            inner.history.insert((h.service.clone(), h.seq), h);
        }
        for service in touched {
            let kept: Vec<(String, u64)> = inner
                .history
                .range((service.clone(), 0)..=(service, u64::MAX))
                .map(|(k, _)| k.clone())
                .collect();
            for key in &kept[..kept.len().saturating_sub(HISTORY_KEEP)] {
                inner.history.remove(key);
            }
        }
        Ok(())
    }

    fn releases(&self, service: &str) -> Result<Vec<ReleaseRecord>, StoreError> {
        let mut v: Vec<_> = self
            .lock()?
            .releases
            .iter()
            .filter(|((s, _), _)| s == service)
            .map(|(_, r)| r.clone())
            .collect();
        v.sort_by_key(|r| r.staged_at_ms);
        Ok(v)
    }

    fn release(&self, service: &str, release: &str) -> Result<Option<ReleaseRecord>, StoreError> {
        Ok(self
            .lock()?
            .releases
            .get(&(service.to_string(), release.to_string()))
            .cloned())
    }

    fn history(&self, service: &str, limit: usize) -> Result<Vec<HistoryEntry>, StoreError> {
        let inner = self.lock()?;
        let all: Vec<_> = inner
            .history
            .iter()
            .filter(|((s, _), _)| s == service)
            .map(|(_, h)| h.clone())
            .collect();
        let skip = all.len().saturating_sub(limit);
        Ok(all.into_iter().skip(skip).collect())
    }
}
