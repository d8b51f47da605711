//! What the agent persists: per service, the phase and journal of the running
//! operation, the current/previous/last-known-good releases, the staged
//! releases with their definitions, and the release history.
//!
//! Everything sits behind [`StateStore`], with a sled implementation
//! ([`SledStore`]) and an in-memory one ([`MemoryStore`]) for tests. A
//! [`StateStore::commit`] is atomic and durable when it returns: the executor
//! commits the next step before performing it.

mod memory;
mod sled_store;

pub use memory::MemoryStore;
pub use sled_store::SledStore;

use serde::{Deserialize, Serialize};

use crate::release::{Digest, ServiceDefinition};
use crate::update::phase::Phase;

/// A store failure, with the operation that failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database refused or failed an operation.
    #[error("state store: {context}: {message}; check the data directory's disk and permissions")]
    Backend {
        /// What was being done.
        context: String,
        /// The backend's message.
        message: String,
    },
    /// A stored value does not decode.
    #[error(
        "state store: {key} is corrupt ({message}); restore the data directory from backup or remove that service's state"
    )]
    Corrupt {
        /// Key of the bad value.
        key: String,
        /// Decoder message.
        message: String,
    },
}

/// Kind of operation in the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OpKind {
    /// Switching to a new release.
    Activate,
    /// Returning to an earlier release.
    Rollback,
}

/// The journal of the operation in progress on a service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Operation {
    /// Id of the command that started it (or a generated one).
    pub id: String,
    /// Activation or rollback.
    pub kind: OpKind,
    /// Release running before the operation.
    pub from: Option<String>,
    /// Release the operation switches to (`None`: to nothing).
    pub to: Option<String>,
    /// Rollout id or `admin`; recorded in history.
    pub cause: String,
    /// Why a rollback happens.
    pub reason: Option<String>,
    /// When the operation started (unix ms).
    pub started_at_ms: i64,
    /// Wall-clock end of probation (unix ms), so it survives agent restarts.
    pub commit_deadline_ms: Option<i64>,
    /// Journal mark for the current phase: `false` = intent written, side effect
    /// may or may not have happened; `true` = side effect done.
    pub step_done: bool,
}

/// An exec-supervised process, remembered so a restarted agent can adopt it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessRecord {
    /// Process id (also its process group id).
    pub pid: u32,
    /// Start time as the OS reports it, to tell a reused pid apart.
    pub start_time: Option<u64>,
    /// Release it runs.
    pub release: String,
}

/// Everything persisted about one service.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceRecord {
    /// Service name.
    pub service: String,
    /// Where the service stands.
    pub phase: Phase,
    /// The release `current` points to (or is being switched to).
    pub current: Option<String>,
    /// The release that was current before the last switch.
    pub previous: Option<String>,
    /// The last committed release: where automatic rollbacks return.
    pub last_known_good: Option<String>,
    /// The journal of the operation in progress.
    pub op: Option<Operation>,
    /// The process the agent runs for it, when exec-supervised.
    pub process: Option<ProcessRecord>,
    /// Why the service is degraded, or the last failure.
    pub last_error: Option<String>,
    /// Steady-state RSS/CPU of a release, measured while it ran: what the
    /// regression gates of the next release compare against.
    #[serde(default)]
    pub baseline: Option<Baseline>,
}

/// A release's measured steady state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// The release measured.
    pub release: String,
    /// Average RSS of its process tree.
    pub rss_bytes: u64,
    /// Average CPU % (share of one core).
    pub cpu_percent: f64,
}

impl ServiceRecord {
    /// A service the agent has never run.
    pub fn new(service: &str) -> Self {
        ServiceRecord {
            service: service.to_string(),
            phase: Phase::Idle,
            current: None,
            previous: None,
            last_known_good: None,
            op: None,
            process: None,
            last_error: None,
            baseline: None,
        }
    }

    /// Releases retention must never delete.
    pub fn protected(&self) -> impl Iterator<Item = &str> {
        [
            self.current.as_deref(),
            self.previous.as_deref(),
            self.last_known_good.as_deref(),
            self.op.as_ref().and_then(|o| o.from.as_deref()),
            self.op.as_ref().and_then(|o| o.to.as_deref()),
        ]
        .into_iter()
        .flatten()
    }
}

/// A staged release.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    /// Its definition (code is on disk, config is here).
    pub definition: ServiceDefinition,
    /// When it finished staging (unix ms).
    pub staged_at_ms: i64,
}

impl ReleaseRecord {
    /// Service name.
    pub fn service(&self) -> &str {
        &self.definition.service
    }

    /// Release id.
    pub fn release(&self) -> &str {
        &self.definition.release
    }

    /// Artifact digest.
    pub fn digest(&self) -> Digest {
        self.definition.artifact.digest
    }
}

/// One line of a service's release history.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryEntry {
    /// Order of the entry; assigned by the store, increasing.
    pub seq: u64,
    /// Service concerned.
    pub service: String,
    /// Release concerned.
    pub release: String,
    /// What happened: `staged`, `activating`, `verified`, `committed`,
    /// `rolling_back`, `rolled_back`, `rollback_failed`, `activation_failed`.
    pub event: String,
    /// Why, in words, with measured values where there are any.
    pub reason: Option<String>,
    /// When (unix ms).
    pub at_ms: i64,
    /// Rollout id, `admin`, or the agent's own decision (`host`).
    pub cause: String,
}

/// One atomic, durable change.
#[derive(Debug, Default)]
pub struct Write {
    /// New record of a service.
    pub service: Option<ServiceRecord>,
    /// History lines to append (their `seq` is assigned by the store).
    pub history: Vec<HistoryEntry>,
    /// Staged releases to record.
    pub put_releases: Vec<ReleaseRecord>,
    /// Releases to forget: (service, release).
    pub delete_releases: Vec<(String, String)>,
}

/// The agent's persistent state.
pub trait StateStore: Send + Sync + 'static {
    /// Every service the agent knows.
    fn services(&self) -> Result<Vec<ServiceRecord>, StoreError>;
    /// One service.
    fn service(&self, name: &str) -> Result<Option<ServiceRecord>, StoreError>;
    /// Applies `write` atomically; durable (fsynced) on return.
    fn commit(&self, write: Write) -> Result<(), StoreError>;
    /// Staged releases of a service, oldest first.
    fn releases(&self, service: &str) -> Result<Vec<ReleaseRecord>, StoreError>;
    /// One staged release.
    fn release(&self, service: &str, release: &str) -> Result<Option<ReleaseRecord>, StoreError>;
    /// The newest `limit` history entries of a service, oldest first. A
    /// store keeps the newest [`HISTORY_KEEP`] of each service.
    fn history(&self, service: &str, limit: usize) -> Result<Vec<HistoryEntry>, StoreError>;
}

/// History entries kept per service; a commit that adds entries drops the
/// oldest beyond this, so the journal's size (on disk and in sled's cache)
/// stays bounded however many deploys a host sees.
pub const HISTORY_KEEP: usize = 1000;

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
