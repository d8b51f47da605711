//! The persisted model of a rollout: its plan, state, per-host progress, and
//! the event log. Small `Copy` state enums; the watcher decides from these
//! plus what the fleet reports.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Deref;
use std::sync::Arc;

use rollout_proto::pb;
use serde::{Deserialize, Serialize};

use crate::rollout::spec::Strategy;

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Pre-fetching the release on every target.
    Staging,
    /// Activating batch `current_batch`.
    Running,
    /// Paused by an operator.
    Paused,
    /// Waiting for `rollout promote` after a canary stage.
    WaitingPromote,
    /// Every target on the new release, committed.
    Succeeded,
    /// Halted past its failure budget (no automatic rollback).
    Failed,
    /// Returning every host it changed to its previous release.
    RollingBack,
    /// Halted and rolled back.
    RolledBack,
    /// Aborted by an operator (hosts it changed were rolled back).
    Aborted,
}

impl RolloutState {
    /// Whether nothing more will happen.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded
                | RolloutState::Failed
                | RolloutState::RolledBack
                | RolloutState::Aborted
        )
    }

    /// Name on the wire and in the CLI.
    pub fn name(self) -> &'static str {
        match self {
            RolloutState::Staging => "staging",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::WaitingPromote => "waiting_promote",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Failed => "failed",
            RolloutState::RollingBack => "rolling_back",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Aborted => "aborted",
        }
    }
}

/// Where one host of a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Nothing done yet.
    Pending,
    /// Release staged on the host.
    Staged,
    /// Activate sent (journaled before sending, so a restarted coordinator
    /// reconciles instead of activating twice).
    Activating,
    /// Verified, waiting for the batch gate and commit.
    Probation,
    /// Committed: on the new release for good.
    Committed,
    /// Failed (kind in `failure`); the host is back on its old release or unreachable.
    Failed,
    /// Rollback sent.
    RollingBack,
    /// Returned to its previous release by the fleet rollback.
    RolledBack,
    /// The fleet rollback could not reach it (or it refused): still on the
    /// new release, rolled back by the reconciler when it reconnects.
    RollbackOwed,
}

impl HostState {
    /// Name on the wire and in the CLI.
    pub fn name(self) -> &'static str {
        match self {
            HostState::Pending => "pending",
            HostState::Staged => "staged",
            HostState::Activating => "activating",
            HostState::Probation => "probation",
            HostState::Committed => "committed",
            HostState::Failed => "failed",
            HostState::RollingBack => "rolling_back",
            HostState::RolledBack => "rolled_back",
            HostState::RollbackOwed => "rollback_owed",
        }
    }
}

/// Typed failures, budgeted together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Failure {
    /// The host was not connected or stopped answering.
    Unreachable,
    /// Fetch, verify or unpack failed.
    StageFailed,
    /// A hook failed (or the service could not be started).
    HookFailed,
    /// The release did not become healthy.
    Unhealthy,
    /// The host rolled the release back on its own (probation failure, deadline).
    RolledBackByHost,
    /// A resource gate failed on the host (ceiling or regression against the
    /// previous release's steady state); the host rolled back.
    ResourceRegression,
    /// Anything else the agent reported.
    Other,
}

impl Failure {
    /// Name on the wire and in the CLI.
    pub fn name(self) -> &'static str {
        match self {
            Failure::Unreachable => "unreachable",
            Failure::StageFailed => "stage_failed",
            Failure::HookFailed => "hook_failed",
            Failure::Unhealthy => "unhealthy",
            Failure::RolledBackByHost => "rolled_back_by_host",
            Failure::ResourceRegression => "resource_regression",
            Failure::Other => "other",
        }
    }

    /// From an agent's typed failure.
    pub fn from_pb(k: i32) -> Failure {
        match pb::FailureKind::try_from(k).unwrap_or(pb::FailureKind::Unspecified) {
            pb::FailureKind::StageFailed => Failure::StageFailed,
            pb::FailureKind::HookFailed => Failure::HookFailed,
            pb::FailureKind::Unhealthy => Failure::Unhealthy,
            pb::FailureKind::ResourceRegression => Failure::ResourceRegression,
            pb::FailureKind::RolledBackByHost => Failure::RolledBackByHost,
            _ => Failure::Other,
        }
    }
}

/// One host's progress in a rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostProgress {
    /// Where it stands.
    pub state: HostState,
    /// Batch it belongs to.
    pub batch: usize,
    /// Why it failed.
    pub failure: Option<Failure>,
    /// Words from the agent or the coordinator.
    pub reason: String,
    /// The release it ran before this rollout (rollback target).
    pub previous_release: Option<String>,
}

/// Per-host progress of a rollout, keyed by host name: a map that remembers
/// which hosts were changed since [`Hosts::take_changes`] and what they were
/// before, so that a change to one host of a large fleet is found, written
/// and undone without comparing or copying the others. Reads go through
/// `Deref` to the map; every change goes through [`Hosts::get_mut`] or
/// [`Hosts::insert`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Hosts {
    map: BTreeMap<String, HostProgress>,
    /// Each host changed since the last `take_changes`, with its progress
    /// before the first change (`None`: it was not there).
    #[serde(skip)]
    before: BTreeMap<String, Option<HostProgress>>,
}

impl Hosts {
    /// A host's progress, to change.
    pub fn get_mut(&mut self, host: &str) -> Option<&mut HostProgress> {
        let p = self.map.get_mut(host)?;
        if !self.before.contains_key(host) {
            self.before.insert(host.to_string(), Some(p.clone()));
        }
        Some(p)
    }

    /// Adds or replaces a host's progress.
    pub fn insert(&mut self, host: String, p: HostProgress) -> Option<HostProgress> {
        if !self.before.contains_key(&host) {
            self.before
                .insert(host.clone(), self.map.get(&host).cloned());
        }
        self.map.insert(host, p)
    }

    /// The hosts whose progress differs from what it was at the previous
    /// call (a host changed and changed back is not one); forgets the
    /// earlier values.
    pub fn take_changes(&mut self) -> Vec<String> {
        let before = std::mem::take(&mut self.before);
        before
            .into_iter()
            .filter(|(h, p)| self.map.get(h) != p.as_ref())
            .map(|(h, _)| h)
            .collect()
    }

    /// Puts back every host changed since the previous
    /// [`Hosts::take_changes`] as it was then.
    pub fn undo_changes(&mut self) {
        for (h, p) in std::mem::take(&mut self.before) {
            match p {
                Some(p) => self.map.insert(h, p),
                None => self.map.remove(&h),
            };
        }
    }

    /// Forgets what was changed (the current values become the reference).
    pub fn forget_changes(&mut self) {
        self.before.clear();
    }
}

impl Deref for Hosts {
    type Target = BTreeMap<String, HostProgress>;

    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl PartialEq for Hosts {
    fn eq(&self, other: &Self) -> bool {
        self.map == other.map
    }
}

impl FromIterator<(String, HostProgress)> for Hosts {
    fn from_iter<I: IntoIterator<Item = (String, HostProgress)>>(iter: I) -> Self {
        Hosts {
            map: iter.into_iter().collect(),
            before: BTreeMap::new(),
        }
    }
}

impl<'a> IntoIterator for &'a Hosts {
    type Item = (&'a String, &'a HostProgress);
    type IntoIter = std::collections::btree_map::Iter<'a, String, HostProgress>;

    fn into_iter(self) -> Self::IntoIter {
        self.map.iter()
    }
}

/// A rollout as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// `r-<time>-<rand>`.
    pub id: String,
    /// Service.
    pub service: String,
    /// Release id.
    pub release: String,
    /// The definition sent to agents (protobuf bytes). Shared: it never
    /// changes after creation, so a copy of the rollout does not copy it.
    pub definition: Arc<Vec<u8>>,
    /// Strategy from the spec.
    pub strategy: Strategy,
    /// Hosts per batch, in order. Shared: it never changes after creation.
    pub batches: Arc<Vec<Vec<String>>>,
    /// Batches after which to wait for `promote`.
    pub pause_points: BTreeSet<usize>,
    /// State.
    pub state: RolloutState,
    /// State before a pause, to resume into.
    pub resume_state: Option<RolloutState>,
    /// Batch being (or next to be) activated.
    pub current_batch: usize,
    /// Set by `rollout abort`: the rollout ends as aborted.
    #[serde(default)]
    pub aborted: bool,
    /// Per-host progress.
    pub hosts: Hosts,
    /// Failure budget in hosts.
    pub failure_budget: usize,
    /// Last notable message.
    pub message: String,
    /// Created (unix ms).
    pub created_at_ms: i64,
    /// Last change (unix ms).
    pub updated_at_ms: i64,
}

impl Rollout {
    /// Hosts that rolled the release back on their own.
    pub fn host_rollbacks(&self) -> usize {
        self.hosts
            .values()
            .filter(|h| {
                matches!(
                    h.failure,
                    Some(
                        Failure::Unhealthy
                            | Failure::HookFailed
                            | Failure::RolledBackByHost
                            | Failure::ResourceRegression
                    )
                )
            })
            .count()
    }

    /// Hosts whose fleet rollback is still owed, sorted.
    pub fn owed_rollbacks(&self) -> Vec<String> {
        self.hosts
            .iter()
            .filter(|(_, p)| p.state == HostState::RollbackOwed)
            .map(|(h, _)| h.clone())
            .collect()
    }

    /// Failed hosts.
    pub fn failures(&self) -> usize {
        self.hosts.values().filter(|h| h.failure.is_some()).count()
    }

    /// The definition sent to agents.
    pub fn definition(&self) -> pb::ServiceDefinition {
        prost::Message::decode(self.definition.as_slice()).unwrap_or_default()
    }

    /// Wire status.
    pub fn status(&self) -> pb::RolloutStatus {
        let batches = self
            .batches
            .iter()
            .enumerate()
            .map(|(i, hosts)| pb::Batch {
                index: i as u32,
                hosts: hosts
                    .iter()
                    .map(|h| {
                        let p = self.hosts.get(h);
                        pb::HostProgress {
                            host: h.clone(),
                            state: p.map(|p| p.state.name()).unwrap_or("pending").into(),
                            failure: p
                                .and_then(|p| p.failure)
                                .map(|f| f.name().to_string())
                                .unwrap_or_default(),
                            reason: p.map(|p| p.reason.clone()).unwrap_or_default(),
                            previous_release: p
                                .and_then(|p| p.previous_release.clone())
                                .unwrap_or_default(),
                        }
                    })
                    .collect(),
            })
            .collect();
        pb::RolloutStatus {
            id: self.id.clone(),
            service: self.service.clone(),
            release: self.release.clone(),
            state: self.state.name().into(),
            current_batch: self.current_batch as u32,
            batches,
            failures: self.failures() as u32,
            failure_budget: self.failure_budget as u32,
            message: self.message.clone(),
            created_at_ms: self.created_at_ms,
            updated_at_ms: self.updated_at_ms,
            finished: self.state.is_terminal(),
        }
    }
}

/// One line of a rollout's event log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Order; assigned by the store.
    pub seq: u64,
    /// When (unix ms).
    pub at_ms: i64,
    /// Host concerned, if any.
    pub host: Option<String>,
    /// Kind, e.g. `batch_started`, `host_failed`, `state`.
    pub kind: String,
    /// Details with measured values.
    pub message: String,
}

/// What the coordinator remembers of a host across restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HostRecord {
    /// Host name.
    pub host: String,
    /// Labels from its hello.
    pub labels: BTreeMap<String, String>,
    /// Last seen (unix ms).
    pub last_seen_ms: i64,
    /// Remote address.
    pub address: String,
    /// Last report (protobuf bytes).
    pub report: Vec<u8>,
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn progress(state: HostState) -> HostProgress {
        HostProgress {
            state,
            batch: 0,
            failure: None,
            reason: String::new(),
            previous_release: None,
        }
    }

    fn hosts(n: usize) -> Hosts {
        (1..=n)
            .map(|i| (format!("h{i}"), progress(HostState::Pending)))
            .collect()
    }

    #[test]
    fn hosts_name_exactly_the_hosts_that_changed() {
        let mut h = hosts(5);
        assert!(h.take_changes().is_empty());
        if let Some(p) = h.get_mut("h2") {
            p.state = HostState::Committed;
        }
        // Changed and changed back: not a change.
        if let Some(p) = h.get_mut("h4") {
            p.state = HostState::Staged;
        }
        if let Some(p) = h.get_mut("h4") {
            p.state = HostState::Pending;
        }
        // Looked at for a change, left as it was: not a change.
        let _ = h.get_mut("h5");
        h.insert("h9".into(), progress(HostState::Staged));
        assert_eq!(h.take_changes(), ["h2", "h9"]);
        // Taken: the next round starts from the current values.
        assert!(h.take_changes().is_empty());
        assert_eq!(h["h2"].state, HostState::Committed);
    }

    #[test]
    fn hosts_undo_puts_back_every_change_since_the_last_take() {
        let mut h = hosts(3);
        let before = h.clone();
        if let Some(p) = h.get_mut("h1") {
            p.state = HostState::Failed;
            p.reason = "x".into();
        }
        if let Some(p) = h.get_mut("h1") {
            p.state = HostState::RolledBack;
        }
        h.insert("h3".into(), progress(HostState::Committed));
        h.insert("h7".into(), progress(HostState::Committed));
        assert_ne!(h, before);
        h.undo_changes();
        assert_eq!(h, before);
        assert!(h.take_changes().is_empty());
    }

    #[test]
    fn hosts_serialize_as_a_plain_map() {
        let mut h = hosts(2);
        let _ = h.get_mut("h1");
        let json = serde_json::to_string(&h).expect("encode");
        assert_eq!(
            serde_json::from_str::<BTreeMap<String, HostProgress>>(&json).expect("as a map"),
            *h
        );
        let back: Hosts = serde_json::from_str(&json).expect("decode");
        assert_eq!(back, h);
    }
}
