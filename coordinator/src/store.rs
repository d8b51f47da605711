//! What the coordinator persists, in sled: rollouts (every transition written
//! and flushed before it is acted on), their event logs, and the last known
//! state of every host. One narrow interface, so a replicated backend can
//! replace sled later.

use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::engine::model::{Event, HostRecord, Rollout};

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

/// The coordinator's sled database.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
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
        Ok(Store { db })
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
    /// durably (flushed) before returning.
    pub fn save_rollout(&self, r: &Rollout, events: &[Event]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        let key = format!("rollout/{}", r.id);
        batch.insert(key.as_bytes(), encode(&key, r)?);
        for e in events {
            let seq = self.db.generate_id().map_err(backend("event id"))?;
            let mut ev = e.clone();
            ev.seq = seq;
            let mut k = format!("event/{}/", r.id).into_bytes();
            k.extend_from_slice(&seq.to_be_bytes());
            batch.insert(k, encode("event", &ev)?);
        }
        self.db
            .apply_batch(batch)
            .map_err(backend("write rollout"))?;
        self.db.flush().map_err(backend("flush"))?;
        Ok(())
    }

    /// One rollout.
    pub fn rollout(&self, id: &str) -> Result<Option<Rollout>, StoreError> {
        let key = format!("rollout/{id}");
        match self
            .db
            .get(key.as_bytes())
            .map_err(backend("read rollout"))?
        {
            Some(v) => Ok(Some(decode(key.as_bytes(), &v)?)),
            None => Ok(None),
        }
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<Rollout>, StoreError> {
        let mut v: Vec<Rollout> = self.scan("rollout/")?;
        v.sort_by_key(|r| r.created_at_ms);
        Ok(v)
    }

    /// The event log of a rollout, in order.
    pub fn events(&self, id: &str) -> Result<Vec<Event>, StoreError> {
        self.scan(&format!("event/{id}/"))
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
}
