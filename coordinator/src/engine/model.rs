//! The persisted model of a rollout: its plan, state, per-host progress, and
//! the event log. Small `Copy` state enums; the watcher decides from these
//! plus what the fleet reports.

use std::collections::{BTreeMap, BTreeSet};

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

/// A rollout as persisted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    /// `r-<time>-<rand>`.
    pub id: String,
    /// Service.
    pub service: String,
    /// Release id.
    pub release: String,
    /// The definition sent to agents (protobuf bytes).
    pub definition: Vec<u8>,
    /// Strategy from the spec.
    pub strategy: Strategy,
    /// Hosts per batch, in order.
    pub batches: Vec<Vec<String>>,
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
    pub hosts: BTreeMap<String, HostProgress>,
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
