//! Builds the wire reports (health, CPU/memory, releases, recent history) from
//! the engine's views, for the coordinator session and the admin API.

use std::path::Path;
use std::sync::Mutex;

use rollout_proto::pb;

use crate::health::tracker::Verdict;
use crate::host_stats::{HostStats, disk_free};
use crate::state::{HistoryEntry, StateStore};
use crate::update::executor::{EngineError, FailureKind, ServiceView};
use crate::update::phase::Phase;

/// History entries carried in each service report, so that a reconnecting
/// agent tells the coordinator what happened while it was away.
pub const RECENT_HISTORY: usize = 10;

/// The wire phase of a domain phase.
pub fn phase_to_pb(p: Phase) -> pb::Phase {
    match p {
        Phase::Idle => pb::Phase::Idle,
        Phase::Activating(_) => pb::Phase::Activating,
        Phase::Verifying => pb::Phase::Verifying,
        Phase::Probation => pb::Phase::Probation,
        Phase::RollingBack(_) => pb::Phase::RollingBack,
        Phase::Degraded => pb::Phase::Degraded,
    }
}

/// The wire failure kind of an engine failure.
pub fn failure_to_pb(k: FailureKind) -> pb::FailureKind {
    match k {
        FailureKind::StageFailed => pb::FailureKind::StageFailed,
        FailureKind::HookFailed => pb::FailureKind::HookFailed,
        FailureKind::Unhealthy => pb::FailureKind::Unhealthy,
        FailureKind::RolledBackByHost => pb::FailureKind::RolledBackByHost,
        FailureKind::Busy => pb::FailureKind::Busy,
        FailureKind::Invalid => pb::FailureKind::Invalid,
        FailureKind::Internal => pb::FailureKind::Internal,
        FailureKind::ResourceRegression => pb::FailureKind::ResourceRegression,
    }
}

/// The one conversion of engine errors to gRPC statuses.
pub fn status_of(e: &EngineError) -> tonic::Status {
    let msg = e.to_string();
    match e.kind() {
        FailureKind::Busy => tonic::Status::failed_precondition(msg),
        FailureKind::Invalid => match e {
            EngineError::UnknownService(_) | EngineError::NotStaged { .. } => {
                tonic::Status::not_found(msg)
            }
            EngineError::WrongPhase { .. } => tonic::Status::failed_precondition(msg),
            _ => tonic::Status::invalid_argument(msg),
        },
        FailureKind::Internal => tonic::Status::internal(msg),
        _ => tonic::Status::aborted(msg),
    }
}

/// A history entry on the wire.
pub fn history_to_pb(h: &HistoryEntry) -> pb::HistoryEntry {
    pb::HistoryEntry {
        seq: h.seq,
        release: h.release.clone(),
        event: h.event.clone(),
        reason: h.reason.clone().unwrap_or_default(),
        at_ms: h.at_ms,
        cause: h.cause.clone(),
    }
}

/// The report of one service.
pub fn service_report(view: &ServiceView, store: &dyn StateStore) -> pb::ServiceReport {
    let r = &view.record;
    let health = match view.health.as_ref().map(|h| &h.verdict) {
        Some(Verdict::Healthy) => pb::Health::Healthy,
        Some(Verdict::Unhealthy(_)) => pb::Health::Unhealthy,
        Some(Verdict::Pending) | None => pb::Health::Unknown,
    };
    let sample = view.health.as_ref().and_then(|h| h.sample);
    pb::ServiceReport {
        service: r.service.clone(),
        current_release: r.current.clone().unwrap_or_default(),
        previous_release: r.previous.clone().unwrap_or_default(),
        last_known_good: r.last_known_good.clone().unwrap_or_default(),
        phase: phase_to_pb(r.phase) as i32,
        step: r.phase.step_name(),
        health: health as i32,
        rss_bytes: sample.map(|s| s.rss_bytes).unwrap_or(0),
        cpu_percent: sample.map(|s| s.cpu_percent).unwrap_or(0.0),
        steady_rss_bytes: view
            .health
            .as_ref()
            .and_then(|h| h.steady)
            .map(|s| s.rss_bytes)
            .unwrap_or(0),
        steady_cpu_percent: view
            .health
            .as_ref()
            .and_then(|h| h.steady)
            .map(|s| s.cpu_percent)
            .unwrap_or(0.0),
        recent: store
            .history(&r.service, RECENT_HISTORY)
            .unwrap_or_default()
            .iter()
            .map(history_to_pb)
            .collect(),
    }
}

/// A full report: host figures and every service.
pub fn full_report(
    views: &[ServiceView],
    store: &dyn StateStore,
    stats: &Mutex<dyn HostStats>,
    data_dir: &Path,
) -> pb::Report {
    let host = stats.lock().map(|mut s| s.host()).unwrap_or_default();
    pb::Report {
        cpu_percent: host.cpu_percent,
        mem_used_bytes: host.mem_used_bytes,
        mem_total_bytes: host.mem_total_bytes,
        load1: host.load1,
        disk_free_bytes: disk_free(data_dir).unwrap_or(0),
        services: views.iter().map(|v| service_report(v, store)).collect(),
    }
}
