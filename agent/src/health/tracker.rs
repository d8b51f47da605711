//! Turns probe outcomes and resource samples into a verdict, with the
//! thresholds of each check, and runs that loop for a running release
//! ([`spawn_monitor`]).
//!
//! A check starts *pending*; it is *passing* after `success_threshold`
//! consecutive passes and *failing* after `failure_threshold` consecutive
//! failures. The service is healthy when its process is alive, every check is
//! passing and no resource ceiling has been crossed for `sustained_samples`
//! samples in a row.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::health::probe::{HealthProbe, ProbeContext, ProbeOutcome};
use crate::host_stats::{HostStats, ProcessSample};
use crate::release::{HealthCheck, Thresholds};

/// The health of a running release.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Some check has not passed yet.
    Pending,
    /// Every check passing, process alive, under every ceiling.
    Healthy,
    /// Something is wrong; the reason names it with measured values.
    Unhealthy(String),
}

impl Verdict {
    /// Whether this is [`Verdict::Healthy`].
    pub fn is_healthy(&self) -> bool {
        matches!(self, Verdict::Healthy)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CheckStatus {
    Pending,
    Passing,
    Failing,
}

#[derive(Debug, Clone)]
struct CheckState {
    status: CheckStatus,
    ok_run: u32,
    fail_run: u32,
    last_failure: Option<String>,
}

/// Threshold bookkeeping for the checks and ceilings of one release.
#[derive(Debug, Clone)]
pub struct Tracker {
    checks: Vec<HealthCheck>,
    states: Vec<CheckState>,
    thresholds: Thresholds,
    rss_over: u32,
    cpu_over: u32,
    last_sample: Option<ProcessSample>,
    /// The previous release's steady state, for the regression gates.
    baseline: Option<ProcessSample>,
    rss_regressed: u32,
    cpu_regressed: u32,
    seen: u32,
    /// Running sum and count of samples after warm-up: this release's steady state.
    sum: ProcessSample,
    samples: u32,
}

/// Samples skipped at start before the steady-state average begins.
const WARMUP_SAMPLES: u32 = 2;
/// A regression must also exceed the baseline by this much RSS...
const RSS_REGRESSION_FLOOR: u64 = 4 << 20;
/// ... or this many CPU percentage points, so idle noise never trips it.
const CPU_REGRESSION_FLOOR: f64 = 5.0;

/// Prefix of verdict reasons from resource gates (ceilings and regressions),
/// so failures can be typed `resource_regression`.
pub const RESOURCE_PREFIX: &str = "resource gate: ";

impl Tracker {
    /// Compares samples against `baseline` for the ratio gates.
    pub fn with_baseline(mut self, baseline: Option<ProcessSample>) -> Self {
        self.baseline = baseline;
        self
    }

    /// Whether enough resource samples were seen for the gates to have had
    /// their say (always true without resource gates).
    pub fn resources_settled(&self) -> bool {
        let t = &self.thresholds;
        let gated = t.max_rss_bytes.is_some()
            || t.max_cpu_percent.is_some()
            || (self.baseline.is_some()
                && (t.max_rss_ratio.is_some() || t.max_cpu_ratio.is_some()));
        // A crossing that has begun but not yet lasted `sustained_samples`
        // must finish its count: the release is judged only once every gate
        // has a full run of samples under its limit or has fired.
        !gated || (self.seen >= t.sustained_samples.max(1) && !self.crossing())
    }

    /// Whether some gate has been crossed by the latest sample(s) without
    /// having fired yet, or is firing.
    fn crossing(&self) -> bool {
        self.rss_over > 0 || self.cpu_over > 0 || self.rss_regressed > 0 || self.cpu_regressed > 0
    }

    /// How old the list of the processes in the release's tree may be at a
    /// sample: listed afresh at every sample while the gates need samples (a
    /// child the service forks counts at once), else at most every
    /// [`IDLE_MEMBERS_MAX_AGE`] (listing reads a file per thread of the tree,
    /// or every process on the host where the kernel keeps no children lists).
    pub fn members_max_age(&self, judged: bool) -> Duration {
        if self.sample_interval(judged) == SAMPLE_INTERVAL {
            Duration::ZERO
        } else {
            IDLE_MEMBERS_MAX_AGE
        }
    }

    /// How long after the latest resource sample the next one is due.
    ///
    /// [`SAMPLE_INTERVAL`] while the gates need samples: while the release is
    /// `judged` (verification and probation: the regression gates and the
    /// steady state the coordinator checks before it commits), whenever an
    /// absolute ceiling is configured (ceilings hold in every phase), and while
    /// a crossing finishes its count. Otherwise [`IDLE_SAMPLE_INTERVAL`]: a
    /// committed release only keeps its steady state (the next activation's
    /// baseline) and the figures of reports current.
    pub fn sample_interval(&self, judged: bool) -> Duration {
        let t = &self.thresholds;
        let ceiling = t.max_rss_bytes.is_some() || t.max_cpu_percent.is_some();
        if judged || ceiling || self.crossing() {
            SAMPLE_INTERVAL
        } else {
            IDLE_SAMPLE_INTERVAL
        }
    }

    /// Average of the samples after warm-up: this release's steady state.
    pub fn steady_state(&self) -> Option<ProcessSample> {
        (self.samples > 0).then(|| ProcessSample {
            rss_bytes: self.sum.rss_bytes / u64::from(self.samples),
            cpu_percent: self.sum.cpu_percent / f64::from(self.samples),
        })
    }

    /// A tracker with every check pending.
    pub fn new(checks: Vec<HealthCheck>, thresholds: Thresholds) -> Self {
        let states = checks
            .iter()
            .map(|_| CheckState {
                status: CheckStatus::Pending,
                ok_run: 0,
                fail_run: 0,
                last_failure: None,
            })
            .collect();
        Tracker {
            checks,
            states,
            thresholds,
            rss_over: 0,
            cpu_over: 0,
            last_sample: None,
            baseline: None,
            rss_regressed: 0,
            cpu_regressed: 0,
            seen: 0,
            sum: ProcessSample::default(),
            samples: 0,
        }
    }

    /// The checks tracked.
    pub fn checks(&self) -> &[HealthCheck] {
        &self.checks
    }

    /// Records one probe outcome of check `idx`.
    pub fn record(&mut self, idx: usize, outcome: &ProbeOutcome) {
        let (Some(check), Some(st)) = (self.checks.get(idx), self.states.get_mut(idx)) else {
            return;
        };
        match outcome {
            ProbeOutcome::Pass => {
                st.ok_run += 1;
                st.fail_run = 0;
                if st.ok_run >= check.success_threshold {
                    st.status = CheckStatus::Passing;
                }
            }
            ProbeOutcome::Fail(reason) => {
                st.fail_run += 1;
                st.ok_run = 0;
                st.last_failure = Some(format!("check {:?}: {reason}", check.name));
                if st.fail_run >= check.failure_threshold {
                    st.status = CheckStatus::Failing;
                }
            }
        }
    }

    /// Records one resource sample of the service's process tree.
    pub fn record_resources(&mut self, sample: ProcessSample) {
        self.last_sample = Some(sample);
        let over_rss = self
            .thresholds
            .max_rss_bytes
            .is_some_and(|max| sample.rss_bytes > max);
        let over_cpu = self
            .thresholds
            .max_cpu_percent
            .is_some_and(|max| sample.cpu_percent > max);
        self.rss_over = if over_rss { self.rss_over + 1 } else { 0 };
        self.cpu_over = if over_cpu { self.cpu_over + 1 } else { 0 };
        let (rss_reg, cpu_reg) = match self.baseline {
            Some(b) => (
                self.thresholds.max_rss_ratio.is_some_and(|r| {
                    sample.rss_bytes as f64 > b.rss_bytes as f64 * r
                        && sample.rss_bytes > b.rss_bytes + RSS_REGRESSION_FLOOR
                }),
                self.thresholds.max_cpu_ratio.is_some_and(|r| {
                    sample.cpu_percent > b.cpu_percent * r
                        && sample.cpu_percent > b.cpu_percent + CPU_REGRESSION_FLOOR
                }),
            ),
            None => (false, false),
        };
        self.rss_regressed = if rss_reg { self.rss_regressed + 1 } else { 0 };
        self.cpu_regressed = if cpu_reg { self.cpu_regressed + 1 } else { 0 };
        self.seen += 1;
        if self.seen > WARMUP_SAMPLES {
            self.sum.rss_bytes += sample.rss_bytes;
            self.sum.cpu_percent += sample.cpu_percent;
            self.samples += 1;
        }
    }

    /// The last resource sample.
    pub fn last_sample(&self) -> Option<ProcessSample> {
        self.last_sample
    }

    /// The verdict now; `process_alive` is false when the supervised process is gone.
    pub fn verdict(&self, process_alive: bool) -> Verdict {
        if !process_alive {
            return Verdict::Unhealthy("the service process is not running".into());
        }
        let sustained = self.thresholds.sustained_samples.max(1);
        let last = self.last_sample.unwrap_or_default();
        if self.rss_over >= sustained {
            let max = self.thresholds.max_rss_bytes.unwrap_or(0);
            return Verdict::Unhealthy(format!(
                "{RESOURCE_PREFIX}memory: rss {} bytes over the ceiling of {max} bytes for {} samples",
                last.rss_bytes, self.rss_over
            ));
        }
        if self.cpu_over >= sustained {
            let max = self.thresholds.max_cpu_percent.unwrap_or(0.0);
            return Verdict::Unhealthy(format!(
                "{RESOURCE_PREFIX}cpu: {:.1}% over the ceiling of {max:.1}% for {} samples",
                last.cpu_percent, self.cpu_over
            ));
        }
        if let Some(b) = self.baseline {
            if self.rss_regressed >= sustained {
                return Verdict::Unhealthy(format!(
                    "{RESOURCE_PREFIX}memory regression: rss {} bytes is {:.2}x the previous release's steady state of {} bytes (limit {:.2}x) for {} samples",
                    last.rss_bytes,
                    last.rss_bytes as f64 / (b.rss_bytes.max(1)) as f64,
                    b.rss_bytes,
                    self.thresholds.max_rss_ratio.unwrap_or(0.0),
                    self.rss_regressed
                ));
            }
            if self.cpu_regressed >= sustained {
                return Verdict::Unhealthy(format!(
                    "{RESOURCE_PREFIX}cpu regression: {:.1}% is {:.2}x the previous release's steady state of {:.1}% (limit {:.2}x) for {} samples",
                    last.cpu_percent,
                    last.cpu_percent / b.cpu_percent.max(0.1),
                    b.cpu_percent,
                    self.thresholds.max_cpu_ratio.unwrap_or(0.0),
                    self.cpu_regressed
                ));
            }
        }
        if let Some(st) = self
            .states
            .iter()
            .find(|s| s.status == CheckStatus::Failing)
        {
            return Verdict::Unhealthy(
                st.last_failure
                    .clone()
                    .unwrap_or_else(|| "a health check is failing".into()),
            );
        }
        if self.states.iter().any(|s| s.status == CheckStatus::Pending) {
            return Verdict::Pending;
        }
        Verdict::Healthy
    }

    /// The most recent failure of any check, for deadline messages.
    pub fn last_failure(&self) -> Option<String> {
        self.states.iter().find_map(|s| s.last_failure.clone())
    }
}

/// What the monitor publishes.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthView {
    /// Current verdict.
    pub verdict: Verdict,
    /// Latest failure seen, even when the verdict is pending.
    pub last_failure: Option<String>,
    /// Latest resource sample of the process tree.
    pub sample: Option<ProcessSample>,
    /// Steady-state average of this release so far.
    pub steady: Option<ProcessSample>,
    /// Times the process exited on its own since this release started
    /// ([`ProcessWatch::exits`]).
    pub exits: u32,
    /// The process is gone for good: the supervisor will not start it again
    /// ([`ProcessWatch::gave_up`]).
    pub gave_up: bool,
}

/// Exits of a release's process during verification that fail it at once, as
/// a crash loop, instead of at `healthy_deadline`. One exit is forgiven (a
/// dependency not up yet, say): the supervisor starts the process again
/// 0.5 s later. A second exit fails verify.
pub const CRASH_LOOP_EXITS: u32 = 2;

/// Where the monitor learns whether the service's process runs, and its pid.
pub trait ProcessWatch: Send + Sync + 'static {
    /// `Some(pid)` of the main process when known; `None` when the supervision
    /// mode has no pid (systemd, hooks).
    fn pid(&self) -> Option<u32>;
    /// Whether the service's process runs (always true without a pid).
    fn alive(&self) -> bool;
    /// A receiver marked changed whenever [`ProcessWatch::pid`] or
    /// [`ProcessWatch::alive`] may have changed, so that the monitor sleeps
    /// until then instead of polling; a closed channel means they never
    /// change. `None` (the default): the monitor polls `alive` every
    /// [`LIVENESS_POLL`].
    fn changes(&self) -> Option<watch::Receiver<()>> {
        None
    }
    /// How many times the process exited on its own (not stopped by the
    /// agent) since the supervisor started this release. 0 (the default)
    /// when the supervision mode cannot tell.
    fn exits(&self) -> u32 {
        0
    }
    /// Whether the process exited and the supervisor will not start it again
    /// (restart policy `never`, or `on-failure` after a clean exit): it
    /// cannot become healthy. False (the default) when the mode cannot tell.
    fn gave_up(&self) -> bool {
        false
    }
}

/// How often resources are sampled while the gates need them (see
/// [`Tracker::sample_interval`]); CPU % needs ≥ 200 ms between refreshes.
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(500);

/// How often resources are sampled when no gate needs them: a committed
/// release without ceilings.
pub const IDLE_SAMPLE_INTERVAL: Duration = Duration::from_secs(10);

/// How old the list of a release's processes may be when no gate needs
/// samples (see [`Tracker::members_max_age`]).
pub const IDLE_MEMBERS_MAX_AGE: Duration = Duration::from_secs(60);

/// How often a monitor polls liveness when its [`ProcessWatch`] cannot notify.
pub const LIVENESS_POLL: Duration = Duration::from_millis(250);

/// What a monitor watches: the release's checks, ceilings and gates, where
/// exec checks run, and the previous release's steady state.
#[derive(Debug, Clone)]
pub struct MonitorSpec {
    /// Health checks.
    pub checks: Vec<HealthCheck>,
    /// Ceilings and regression gates.
    pub thresholds: Thresholds,
    /// Exec check context.
    pub ctx: ProbeContext,
    /// The previous release's steady state, for the regression gates.
    pub baseline: Option<ProcessSample>,
    /// The agent's wake grid (see [`next_on_grid`]): while the release is not
    /// judged, its checks and samples fall on whole periods after it.
    pub grid: Instant,
}

/// The first instant after `t` that is a whole number of `period`s after
/// `grid` (`grid` itself when `t` is before it; `t` for a zero period).
///
/// The agent's steady periodic work (the health checks and resource samples
/// of committed releases, its reports) is put on one grid, the agent's start,
/// so that work of the same or related periods falls on the same instants: an
/// idle agent with several services wakes once for all their checks instead
/// of once for each. Each agent's grid is its own start, so a fleet's agents
/// do not act in step.
pub fn next_on_grid(grid: Instant, t: Instant, period: Duration) -> Instant {
    if t < grid {
        return grid;
    }
    let period_ns = period.as_nanos();
    if period_ns == 0 {
        return t;
    }
    let periods = (t - grid).as_nanos() / period_ns + 1;
    u64::try_from(periods * period_ns)
        .ok()
        .and_then(|ns| grid.checked_add(Duration::from_nanos(ns)))
        .unwrap_or(t + period)
}

/// When each piece of a monitor's work is due. The monitor sleeps until the
/// earliest of them; nothing else wakes it but a liveness change, a change of
/// `judged` and cancellation.
#[derive(Debug, Clone)]
struct Schedule {
    /// Next probe of each check.
    checks: Vec<Instant>,
    /// The latest resource sample; `None` before the first (due at once).
    sampled: Option<Instant>,
    /// The agent's wake grid ([`next_on_grid`]).
    grid: Instant,
    /// Whether checks and samples are put on the grid: while the release is
    /// not judged. A judged release is probed and sampled a whole period
    /// after the previous time, from its start.
    steady: bool,
}

impl Schedule {
    /// Every check due at `start`, a sample due at once.
    fn new(checks: usize, start: Instant, grid: Instant) -> Self {
        Schedule {
            checks: vec![start; checks],
            sampled: None,
            grid,
            steady: false,
        }
    }

    /// When work of this period, last done at `at`, is due again: a period
    /// later, or, steady, at the next point of its period on the grid.
    fn next_after(&self, at: Instant, period: Duration) -> Instant {
        if self.steady {
            next_on_grid(self.grid, at, period)
        } else {
            at + period
        }
    }

    /// When the next resource sample is due: `every` after the latest, or,
    /// steady, at the next point of `every` on the grid.
    fn next_sample(&self, every: Duration, now: Instant) -> Instant {
        self.sampled.map_or(now, |at| self.next_after(at, every))
    }

    /// When the monitor must wake next: the earliest due check, the next
    /// sample when there is a process to sample (`sample_every`), and the
    /// next liveness poll when liveness must be polled (`poll_every`).
    /// `None`: nothing is ever due (no checks, nothing to sample or poll).
    fn next_wake(
        &self,
        sample_every: Option<Duration>,
        poll_every: Option<Duration>,
        now: Instant,
    ) -> Option<Instant> {
        let sample = sample_every.map(|every| self.next_sample(every, now));
        let poll = poll_every.map(|every| now + every);
        self.checks.iter().copied().chain(sample).chain(poll).min()
    }
}

/// Probes every check at its interval and samples resources (see
/// [`Tracker::sample_interval`]; `judged` is true while the release is being
/// verified or in probation) until `cancel`, publishing every change of the
/// verdict.
pub fn spawn_monitor(
    spec: MonitorSpec,
    probe: Arc<dyn HealthProbe>,
    stats: Arc<Mutex<dyn HostStats>>,
    process: Arc<dyn ProcessWatch>,
    mut judged: watch::Receiver<bool>,
    cancel: CancellationToken,
) -> (watch::Receiver<HealthView>, tokio::task::JoinHandle<()>) {
    let MonitorSpec {
        checks,
        thresholds,
        ctx,
        baseline,
        grid,
    } = spec;
    let mut tracker = Tracker::new(checks, thresholds).with_baseline(baseline);
    let initial = HealthView {
        verdict: tracker.verdict(process.alive()),
        last_failure: None,
        sample: None,
        steady: None,
        exits: process.exits(),
        gave_up: process.gave_up(),
    };
    let (tx, rx) = watch::channel(initial);
    let task = tokio::spawn(async move {
        let mut schedule = Schedule::new(tracker.checks().len(), Instant::now(), grid);
        let mut settled = false;
        let mut changes = process.changes();
        let poll_every = changes.is_none().then_some(LIVENESS_POLL);
        let mut is_judged = *judged.borrow_and_update();
        let mut judged = Some(judged);
        loop {
            schedule.steady = !is_judged;
            let now = Instant::now();
            for idx in 0..schedule.checks.len() {
                if schedule.checks[idx] <= now {
                    let check = tracker.checks()[idx].clone();
                    let outcome = tokio::select! {
                        o = probe.probe(&check, &ctx) => o,
                        () = cancel.cancelled() => return,
                    };
                    tracker.record(idx, &outcome);
                    schedule.checks[idx] = schedule.next_after(Instant::now(), check.interval);
                }
            }
            let pid = process.pid();
            let sample_every = tracker.sample_interval(is_judged);
            if let Some(pid) = pid {
                let now = Instant::now();
                if schedule.next_sample(sample_every, now) <= now {
                    let max_age = tracker.members_max_age(is_judged);
                    let sample = stats
                        .lock()
                        .ok()
                        .and_then(|mut s| s.process_tree(pid, max_age));
                    if let Some(sample) = sample {
                        tracker.record_resources(sample);
                    }
                    schedule.sampled = Some(Instant::now());
                }
            }
            let mut verdict = tracker.verdict(process.alive());
            // With resource gates, a release is not healthy before the gates
            // have seen enough samples of its process (a crossing that began
            // finishes its count first). Once settled, a later crossing shows
            // only when it has lasted `sustained_samples`.
            if verdict == Verdict::Healthy && pid.is_some() && !settled {
                if tracker.resources_settled() {
                    settled = true;
                } else {
                    verdict = Verdict::Pending;
                }
            }
            let view = HealthView {
                verdict,
                last_failure: tracker.last_failure(),
                sample: tracker.last_sample(),
                steady: tracker.steady_state(),
                exits: process.exits(),
                gave_up: process.gave_up(),
            };
            tx.send_if_modified(|old| {
                let changed = old.verdict != view.verdict
                    || old.last_failure != view.last_failure
                    || old.exits != view.exits
                    || old.gave_up != view.gave_up;
                *old = view;
                changed
            });
            // Sleep until the next due check or sample (the sample interval
            // may have changed with the latest sample); a liveness change or
            // a change of `judged` wakes the loop early.
            let sample_every = pid.map(|_| tracker.sample_interval(is_judged));
            let next = schedule.next_wake(sample_every, poll_every, Instant::now());
            let sleep = async {
                match next {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let liveness = async {
                match changes.as_mut() {
                    Some(rx) => rx.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let judging = async {
                match judged.as_mut() {
                    Some(rx) => rx.changed().await.map(|()| *rx.borrow_and_update()),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                () = sleep => {}
                open = liveness => if !open {
                    // Closed: pid and liveness never change again.
                    changes = None;
                },
                j = judging => match j {
                    Ok(j) => is_judged = j,
                    // The worker let go of the monitor: keep the last value.
                    Err(_) => judged = None,
                },
                () = cancel.cancelled() => return,
            }
        }
    });
    (rx, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host_stats::FixedStats;
    use crate::release::CheckKind;

    fn check(name: &str, fail: u32, ok: u32) -> HealthCheck {
        HealthCheck {
            name: name.into(),
            kind: CheckKind::Tcp {
                address: "127.0.0.1:1".into(),
            },
            interval: Duration::from_millis(10),
            timeout: Duration::from_millis(10),
            failure_threshold: fail,
            success_threshold: ok,
        }
    }

    fn fail() -> ProbeOutcome {
        ProbeOutcome::Fail("refused".into())
    }

    #[test]
    fn no_checks_is_healthy_while_the_process_lives() {
        let t = Tracker::new(vec![], Thresholds::default());
        assert_eq!(t.verdict(true), Verdict::Healthy);
        assert!(matches!(t.verdict(false), Verdict::Unhealthy(r) if r.contains("not running")));
    }

    #[test]
    fn a_check_passes_only_after_its_success_threshold() {
        let mut t = Tracker::new(vec![check("http", 3, 2)], Thresholds::default());
        assert_eq!(t.verdict(true), Verdict::Pending);
        t.record(0, &ProbeOutcome::Pass);
        assert_eq!(t.verdict(true), Verdict::Pending);
        t.record(0, &ProbeOutcome::Pass);
        assert_eq!(t.verdict(true), Verdict::Healthy);
    }

    #[test]
    fn a_check_fails_only_after_consecutive_failures() {
        let mut t = Tracker::new(vec![check("http", 3, 1)], Thresholds::default());
        t.record(0, &ProbeOutcome::Pass);
        t.record(0, &fail());
        t.record(0, &fail());
        assert_eq!(
            t.verdict(true),
            Verdict::Healthy,
            "two failures < threshold 3"
        );
        t.record(0, &ProbeOutcome::Pass);
        t.record(0, &fail());
        t.record(0, &fail());
        assert_eq!(t.verdict(true), Verdict::Healthy, "a pass resets the run");
        t.record(0, &fail());
        assert!(
            matches!(t.verdict(true), Verdict::Unhealthy(r) if r.contains("\"http\"") && r.contains("refused"))
        );
        t.record(0, &ProbeOutcome::Pass);
        assert_eq!(
            t.verdict(true),
            Verdict::Healthy,
            "recovers after success threshold"
        );
    }

    #[test]
    fn every_check_must_pass() {
        let mut t = Tracker::new(
            vec![check("a", 1, 1), check("b", 1, 1)],
            Thresholds::default(),
        );
        t.record(0, &ProbeOutcome::Pass);
        assert_eq!(t.verdict(true), Verdict::Pending);
        t.record(1, &fail());
        assert!(matches!(t.verdict(true), Verdict::Unhealthy(r) if r.contains("\"b\"")));
    }

    #[test]
    fn ceilings_count_only_when_sustained() {
        let th = Thresholds {
            max_rss_bytes: Some(1000),
            max_cpu_percent: Some(50.0),
            sustained_samples: 2,
            ..Default::default()
        };
        let mut t = Tracker::new(vec![], th);
        let high_rss = ProcessSample {
            rss_bytes: 5000,
            cpu_percent: 1.0,
        };
        t.record_resources(high_rss);
        assert_eq!(t.verdict(true), Verdict::Healthy);
        t.record_resources(high_rss);
        assert!(
            matches!(t.verdict(true), Verdict::Unhealthy(r) if r.contains("5000") && r.contains("1000"))
        );
        t.record_resources(ProcessSample {
            rss_bytes: 10,
            cpu_percent: 90.0,
        });
        assert_eq!(
            t.verdict(true),
            Verdict::Healthy,
            "rss run reset, cpu run 1"
        );
        t.record_resources(ProcessSample {
            rss_bytes: 10,
            cpu_percent: 90.0,
        });
        assert!(
            matches!(t.verdict(true), Verdict::Unhealthy(r) if r.contains("90.0%") && r.contains("50.0%"))
        );
    }

    #[test]
    fn a_crossing_in_progress_keeps_the_gates_unsettled() {
        let th = Thresholds {
            max_rss_bytes: Some(1000),
            sustained_samples: 2,
            ..Default::default()
        };
        let mut t = Tracker::new(vec![], th);
        let low = ProcessSample {
            rss_bytes: 10,
            cpu_percent: 1.0,
        };
        let high = ProcessSample {
            rss_bytes: 5000,
            cpu_percent: 1.0,
        };
        // The service allocates after the first sample: two samples seen,
        // but the ceiling has been crossed for one only.
        t.record_resources(low);
        assert!(!t.resources_settled());
        t.record_resources(high);
        assert!(!t.resources_settled(), "a crossing is in progress");
        assert_eq!(t.verdict(true), Verdict::Healthy);
        t.record_resources(high);
        assert!(matches!(t.verdict(true), Verdict::Unhealthy(_)));
        // Back under the ceiling for good: settled again.
        t.record_resources(low);
        assert!(t.resources_settled());
        assert_eq!(t.verdict(true), Verdict::Healthy);
    }

    #[test]
    fn regression_gates_compare_with_the_previous_steady_state() {
        let th = Thresholds {
            max_rss_ratio: Some(1.5),
            max_cpu_ratio: Some(2.0),
            sustained_samples: 2,
            ..Default::default()
        };
        let base = ProcessSample {
            rss_bytes: 20 << 20,
            cpu_percent: 10.0,
        };
        let mut t = Tracker::new(vec![], th.clone()).with_baseline(Some(base));
        // 1.4x: fine.
        for _ in 0..5 {
            t.record_resources(ProcessSample {
                rss_bytes: 28 << 20,
                cpu_percent: 12.0,
            });
        }
        assert_eq!(t.verdict(true), Verdict::Healthy);
        // 3x RSS, sustained: a typed regression with the numbers.
        t.record_resources(ProcessSample {
            rss_bytes: 60 << 20,
            cpu_percent: 12.0,
        });
        assert_eq!(
            t.verdict(true),
            Verdict::Healthy,
            "one sample is not sustained"
        );
        t.record_resources(ProcessSample {
            rss_bytes: 60 << 20,
            cpu_percent: 12.0,
        });
        match t.verdict(true) {
            Verdict::Unhealthy(r) => {
                assert!(r.starts_with(RESOURCE_PREFIX), "{r}");
                assert!(r.contains("3.00x") && r.contains("20971520"), "{r}");
            }
            v => panic!("{v:?}"),
        }
        // CPU doubling of a near-idle service stays under the floor.
        let idle = ProcessSample {
            rss_bytes: 20 << 20,
            cpu_percent: 0.5,
        };
        let mut t = Tracker::new(vec![], th.clone()).with_baseline(Some(idle));
        for _ in 0..5 {
            t.record_resources(ProcessSample {
                rss_bytes: 20 << 20,
                cpu_percent: 2.0,
            });
        }
        assert_eq!(t.verdict(true), Verdict::Healthy);
        // Without a baseline the ratios do nothing.
        let mut t = Tracker::new(vec![], th);
        for _ in 0..5 {
            t.record_resources(ProcessSample {
                rss_bytes: 500 << 20,
                cpu_percent: 90.0,
            });
        }
        assert_eq!(t.verdict(true), Verdict::Healthy);
        // Steady state skips the warm-up samples.
        let steady = t.steady_state().expect("steady");
        assert_eq!(steady.rss_bytes, 500 << 20);
    }

    #[test]
    fn resources_are_sampled_often_only_while_gates_need_it() {
        let t = Tracker::new(vec![], Thresholds::default());
        assert_eq!(t.sample_interval(true), SAMPLE_INTERVAL, "judged");
        assert_eq!(t.sample_interval(false), IDLE_SAMPLE_INTERVAL, "committed");
        assert_eq!(t.members_max_age(true), Duration::ZERO);
        assert_eq!(t.members_max_age(false), IDLE_MEMBERS_MAX_AGE);
        let ceiling = Thresholds {
            max_cpu_percent: Some(50.0),
            ..Default::default()
        };
        let t = Tracker::new(vec![], ceiling);
        assert_eq!(
            t.sample_interval(false),
            SAMPLE_INTERVAL,
            "a ceiling holds always"
        );
        // A ratio gate crossed once: its count finishes at the gate's pace.
        let ratio = Thresholds {
            max_rss_ratio: Some(1.5),
            sustained_samples: 3,
            ..Default::default()
        };
        let base = ProcessSample {
            rss_bytes: 10 << 20,
            cpu_percent: 1.0,
        };
        let mut t = Tracker::new(vec![], ratio).with_baseline(Some(base));
        assert_eq!(t.sample_interval(false), IDLE_SAMPLE_INTERVAL);
        t.record_resources(ProcessSample {
            rss_bytes: 100 << 20,
            cpu_percent: 1.0,
        });
        assert_eq!(t.sample_interval(false), SAMPLE_INTERVAL, "crossing");
        t.record_resources(base);
        assert_eq!(t.sample_interval(false), IDLE_SAMPLE_INTERVAL);
    }

    #[test]
    fn the_monitor_wakes_only_when_something_is_due() {
        let start = Instant::now();
        let s = std::time::Duration::from_secs;
        let mut sch = Schedule::new(2, start, start);
        assert_eq!(
            sch.next_wake(None, None, start),
            Some(start),
            "checks due at once"
        );
        sch.checks = vec![start + s(2), start + s(5)];
        // No pid, a notifying watch: only the checks.
        assert_eq!(sch.next_wake(None, None, start), Some(start + s(2)));
        // The first sample is due at once; later ones an interval after the latest.
        assert_eq!(sch.next_wake(Some(s(10)), None, start), Some(start));
        sch.sampled = Some(start);
        assert_eq!(sch.next_wake(Some(s(10)), None, start), Some(start + s(2)));
        sch.checks = vec![start + s(30)];
        assert_eq!(sch.next_wake(Some(s(10)), None, start), Some(start + s(10)));
        assert_eq!(
            sch.next_wake(Some(SAMPLE_INTERVAL), None, start),
            Some(start + SAMPLE_INTERVAL)
        );
        // Polled liveness adds its period.
        assert_eq!(
            sch.next_wake(Some(s(10)), Some(LIVENESS_POLL), start),
            Some(start + LIVENESS_POLL)
        );
        // Nothing at all: sleep until a change or cancellation.
        let idle = Schedule::new(0, start, start);
        assert_eq!(idle.next_wake(None, None, start), None);
    }

    /// Counts probes and notes when they came.
    #[derive(Debug, Default)]
    struct CountingProbe {
        probes: std::sync::atomic::AtomicU32,
        at: Mutex<Vec<Instant>>,
    }

    impl HealthProbe for CountingProbe {
        fn probe<'a>(
            &'a self,
            _check: &'a HealthCheck,
            _ctx: &'a ProbeContext,
        ) -> futures::future::BoxFuture<'a, ProbeOutcome> {
            self.probes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            if let Ok(mut at) = self.at.lock() {
                at.push(Instant::now());
            }
            Box::pin(std::future::ready(ProbeOutcome::Pass))
        }
    }

    /// A process that notifies its changes (`notify`) or must be polled;
    /// counts how often the monitor asked whether it is alive (once a wake).
    #[derive(Debug)]
    struct TestProcess {
        alive: std::sync::atomic::AtomicBool,
        asked: std::sync::atomic::AtomicU32,
        changed: Option<watch::Sender<()>>,
    }

    impl TestProcess {
        fn new(notify: bool) -> Arc<Self> {
            Arc::new(TestProcess {
                alive: true.into(),
                asked: 0.into(),
                changed: notify.then(|| watch::channel(()).0),
            })
        }
        fn die(&self) {
            self.alive.store(false, std::sync::atomic::Ordering::SeqCst);
            if let Some(c) = &self.changed {
                c.send_replace(());
            }
        }
        fn wakes(&self) -> u32 {
            self.asked.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl ProcessWatch for TestProcess {
        fn pid(&self) -> Option<u32> {
            Some(4242)
        }
        fn alive(&self) -> bool {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.alive.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn changes(&self) -> Option<watch::Receiver<()>> {
            self.changed.as_ref().map(watch::Sender::subscribe)
        }
    }

    struct Running {
        probe: Arc<CountingProbe>,
        stats: Arc<Mutex<FixedStats>>,
        process: Arc<TestProcess>,
        judged: watch::Sender<bool>,
        health: watch::Receiver<HealthView>,
        cancel: CancellationToken,
    }

    impl Running {
        fn probes(&self) -> u32 {
            self.probe.probes.load(std::sync::atomic::Ordering::SeqCst)
        }
        fn samples(&self) -> u32 {
            self.stats.lock().map(|s| s.samples).unwrap_or(0)
        }
    }

    fn run_monitor(check_every: Duration, judged: bool, notify: bool) -> Running {
        run_monitor_on(check_every, judged, notify, Instant::now())
    }

    fn run_monitor_on(check_every: Duration, judged: bool, notify: bool, grid: Instant) -> Running {
        let probe = Arc::new(CountingProbe::default());
        let stats = Arc::new(Mutex::new(FixedStats::default()));
        let process = TestProcess::new(notify);
        let (judged, judged_rx) = watch::channel(judged);
        let cancel = CancellationToken::new();
        let mut c = check("http", 3, 1);
        c.interval = check_every;
        let (health, _task) = spawn_monitor(
            MonitorSpec {
                checks: vec![c],
                thresholds: Thresholds::default(),
                ctx: ProbeContext {
                    release_dir: std::path::PathBuf::from("/nonexistent"),
                    env: Default::default(),
                    run_as: None,
                },
                baseline: None,
                grid,
            },
            probe.clone(),
            stats.clone(),
            process.clone(),
            judged_rx,
            cancel.clone(),
        );
        Running {
            probe,
            stats,
            process,
            judged,
            health,
            cancel,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_committed_release_wakes_its_monitor_only_for_checks_and_rare_samples() {
        let m = run_monitor(Duration::from_secs(2), false, true);
        tokio::time::sleep(Duration::from_secs(60) + Duration::from_millis(1)).await;
        // Checks at 0, 2, ..., 60 s; samples at 0, 10, ..., 60 s.
        assert_eq!(m.probes(), 31);
        assert_eq!(m.samples(), 7);
        // One wake per check (the samples fall on check times), plus the
        // verdict of the initial view: no fixed tick.
        assert!(m.process.wakes() <= 32, "{} wakes", m.process.wakes());
        assert!(m.health.borrow().verdict.is_healthy());
        let steady = m
            .health
            .borrow()
            .steady
            .expect("a steady state from idle samples");
        assert_eq!(steady.rss_bytes, 10 << 20);
        m.cancel.cancel();
    }

    #[test]
    fn the_grid_is_whole_periods_after_its_start() {
        let grid = Instant::now();
        let ms = Duration::from_millis;
        assert_eq!(
            next_on_grid(grid, grid, ms(2000)),
            grid + ms(2000),
            "strictly after"
        );
        assert_eq!(next_on_grid(grid, grid + ms(1), ms(2000)), grid + ms(2000));
        assert_eq!(
            next_on_grid(grid, grid + ms(4003), ms(2000)),
            grid + ms(6000)
        );
        assert_eq!(
            next_on_grid(grid, grid + ms(4003), ms(5000)),
            grid + ms(5000)
        );
        assert_eq!(
            next_on_grid(grid + ms(10), grid, ms(2000)),
            grid + ms(10),
            "before the grid"
        );
        assert_eq!(
            next_on_grid(grid, grid + ms(7), Duration::ZERO),
            grid + ms(7)
        );
        // Far from the grid's start, with a short period.
        let day = Duration::from_secs(86_400 * 60);
        assert_eq!(
            next_on_grid(grid, grid + day + ms(1), ms(1)),
            grid + day + ms(2)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn steady_monitors_of_several_services_probe_at_the_same_instants() {
        let s = Duration::from_secs;
        let grid = Instant::now();
        // Two services committed at different times, a third being verified.
        let a = run_monitor_on(s(2), false, true, grid);
        tokio::time::sleep(Duration::from_millis(700)).await;
        let b = run_monitor_on(s(2), false, true, grid);
        let judged = run_monitor_on(s(2), true, true, grid);
        tokio::time::sleep(s(10) + Duration::from_millis(1)).await;
        let since = |m: &Running| -> Vec<Duration> {
            let at = m.probe.at.lock().map(|a| a.clone()).unwrap_or_default();
            at.iter().map(|t| *t - grid).collect()
        };
        let ms = |v: &[u64]| {
            v.iter()
                .map(|m| Duration::from_millis(*m))
                .collect::<Vec<_>>()
        };
        assert_eq!(since(&a), ms(&[0, 2000, 4000, 6000, 8000, 10_000]));
        // The second one's first probe comes at its start, the others on the grid.
        assert_eq!(since(&b), ms(&[700, 2000, 4000, 6000, 8000, 10_000]));
        // A judged release is probed a whole interval after its previous probe.
        assert_eq!(since(&judged), ms(&[700, 2700, 4700, 6700, 8700, 10_700]));
        // Its samples too: every 500 ms from its start, not on the grid.
        assert_eq!(judged.samples(), 21);
        for m in [a, b, judged] {
            m.cancel.cancel();
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_judged_release_is_sampled_every_sample_interval_until_committed() {
        let m = run_monitor(Duration::from_secs(2), true, true);
        tokio::time::sleep(Duration::from_secs(10) + Duration::from_millis(1)).await;
        assert_eq!(m.probes(), 6);
        assert_eq!(m.samples(), 21, "every 500 ms from 0 to 10 s");
        assert!(m.process.wakes() <= 22, "{} wakes", m.process.wakes());
        // Committed: the next sample comes an idle interval after the latest.
        m.judged.send_replace(false);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(m.samples(), 22);
        // Judged again (e.g. after an agent restart in probation): fast at once.
        m.judged.send_replace(true);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(m.samples(), 24);
        m.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_dead_process_is_noticed_at_once_without_polling() {
        let mut m = run_monitor(Duration::from_secs(30), false, true);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(m.process.wakes() <= 3, "{} wakes", m.process.wakes());
        let died = Instant::now();
        m.process.die();
        let unhealthy = m
            .health
            .wait_for(|h| matches!(h.verdict, Verdict::Unhealthy(_)))
            .await
            .map(|h| h.verdict.clone());
        assert!(matches!(unhealthy, Ok(Verdict::Unhealthy(r)) if r.contains("not running")));
        assert_eq!(Instant::now(), died, "no time passed: woken by the change");
        m.cancel.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_process_that_cannot_notify_is_polled() {
        let mut m = run_monitor(Duration::from_secs(30), false, false);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert!(m.process.wakes() >= 20, "{} wakes", m.process.wakes());
        let died = Instant::now();
        m.process.die();
        m.health
            .wait_for(|h| matches!(h.verdict, Verdict::Unhealthy(_)))
            .await
            .expect("monitor running");
        assert!(Instant::now() - died <= LIVENESS_POLL);
        m.cancel.cancel();
    }
}
