//! Prometheus metrics of the coordinator, served as plain HTTP on
//! `metrics_listen` (off unless configured).
//!
//! The fleet and the engine record through the fleet's [`MetricsHook`] (a
//! no-op until `server::run` sets it); rollouts by state and host counts are
//! read at scrape time.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `rollout_rollouts` | gauge | `state` (every rollout state, 0 included) |
//! | `rollout_hosts_connected` | gauge | |
//! | `rollout_hosts_known` | gauge | |
//! | `rollout_batch_duration_seconds` | histogram | |
//! | `rollout_rollbacks_total` | counter | `reason` (see [`ROLLBACK_REASONS`]) |
//! | `rollout_command_duration_seconds` | histogram | `command` (stage, activate, commit, rollback, ping) |
//! | `rollout_artifact_fetches` | counter | |
//! | `rollout_artifact_bytes_sent` | counter | |
//! | `rollout_artifact_bytes_read` | counter | |
//!
//! Downloads share chunks through the coordinator's chunk cache
//! (`artifact_cache_bytes`), so `rollout_artifact_bytes_read` (bytes read
//! from artifact files) is less than `rollout_artifact_bytes_sent` when
//! agents fetch the same release together.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use rollout_proto::pb::coordinator_message::Cmd;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::engine::Engine;
use crate::engine::model::{Failure, RolloutState};

/// Content type of the exposition (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Every rollout state, each always exported.
pub const STATES: [RolloutState; 9] = [
    RolloutState::Staging,
    RolloutState::Running,
    RolloutState::Paused,
    RolloutState::WaitingPromote,
    RolloutState::Succeeded,
    RolloutState::Failed,
    RolloutState::RollingBack,
    RolloutState::RolledBack,
    RolloutState::Aborted,
];

/// Reasons of `rollout_rollbacks_total`, one count per host rolled back:
/// the failure kinds after which a host rolled itself back, then the
/// coordinator's own rollbacks (a halted rollout, an abort, `rollout rollback`).
pub const ROLLBACK_REASONS: [&str; 7] = [
    "hook_failed",
    "unhealthy",
    "resource_regression",
    "rolled_back_by_host",
    "fleet_halt",
    "abort",
    "operator",
];

/// Command kinds of `rollout_command_duration_seconds`.
pub const COMMANDS: [&str; 5] = ["stage", "activate", "commit", "rollback", "ping"];

type StateLabels = [(&'static str, &'static str); 1];
type ReasonLabels = [(&'static str, &'static str); 1];
type CommandLabels = [(&'static str, &'static str); 1];

fn command_histogram() -> Histogram {
    // 5 ms .. about 12 min: a commit answers at once, an activation waits for
    // min_healthy_time, a stage downloads.
    Histogram::new(exponential_buckets(0.005, 2.5, 14))
}

/// The coordinator's metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    rollouts: Family<StateLabels, Gauge>,
    hosts_connected: Gauge,
    hosts_known: Gauge,
    batch_duration: Histogram,
    rollbacks: Family<ReasonLabels, Counter>,
    commands: Family<CommandLabels, Histogram, fn() -> Histogram>,
    artifact_fetches: Counter,
    artifact_bytes: Counter,
    artifact_bytes_read: Counter,
    /// One scrape at a time refreshes the scrape-time gauges and encodes.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family; every known label value starts at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let rollouts = Family::<StateLabels, Gauge>::default();
        let hosts_connected = Gauge::default();
        let hosts_known = Gauge::default();
        // 0.5 s .. about 68 min.
        let batch_duration = Histogram::new(exponential_buckets(0.5, 2.0, 14));
        let rollbacks = Family::<ReasonLabels, Counter>::default();
        let commands: Family<CommandLabels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(command_histogram);
        registry.register(
            "rollout_rollouts",
            "Rollouts in the store, by state",
            rollouts.clone(),
        );
        registry.register(
            "rollout_hosts_connected",
            "Agents with a live stream to this coordinator",
            hosts_connected.clone(),
        );
        registry.register(
            "rollout_hosts_known",
            "Hosts this coordinator knows, connected or not",
            hosts_known.clone(),
        );
        registry.register(
            "rollout_batch_duration_seconds",
            "Time from a batch's start to its commit",
            batch_duration.clone(),
        );
        registry.register(
            "rollout_rollbacks",
            "Hosts rolled back, by reason: the failure kind after which the host rolled itself back, or the coordinator's fleet_halt, abort and operator rollbacks",
            rollbacks.clone(),
        );
        registry.register(
            "rollout_command_duration_seconds",
            "Round trip of a command to an agent until its result (or timeout), by command",
            commands.clone(),
        );
        let artifact_fetches = Counter::default();
        let artifact_bytes = Counter::default();
        let artifact_bytes_read = Counter::default();
        registry.register(
            "rollout_artifact_fetches",
            "Artifact downloads started by agents",
            artifact_fetches.clone(),
        );
        registry.register(
            "rollout_artifact_bytes_sent",
            "Artifact bytes sent to agents",
            artifact_bytes.clone(),
        );
        registry.register(
            "rollout_artifact_bytes_read",
            "Artifact bytes read from disk (downloads share chunks read once)",
            artifact_bytes_read.clone(),
        );
        for reason in ROLLBACK_REASONS {
            let _ = rollbacks.get_or_create(&[("reason", reason)]);
        }
        for command in COMMANDS {
            let _ = commands.get_or_create(&[("command", command)]);
        }
        Metrics {
            registry,
            rollouts,
            hosts_connected,
            hosts_known,
            batch_duration,
            rollbacks,
            commands,
            artifact_fetches,
            artifact_bytes,
            artifact_bytes_read,
            scrape: Mutex::new(()),
        }
    }

    /// A batch finished (committed) after `d`.
    pub fn observe_batch(&self, d: Duration) {
        self.batch_duration.observe(d.as_secs_f64());
    }

    /// One host rolled back for `reason`.
    pub fn rollback(&self, reason: &'static str) {
        self.rollbacks.get_or_create(&[("reason", reason)]).inc();
    }

    /// A command round trip of `d`.
    pub fn observe_command(&self, command: &'static str, d: Duration) {
        self.commands
            .get_or_create(&[("command", command)])
            .observe(d.as_secs_f64());
    }

    /// An agent started an artifact download.
    pub fn artifact_fetch(&self) {
        self.artifact_fetches.inc();
    }

    /// `n` artifact bytes were sent.
    pub fn artifact_sent(&self, n: usize) {
        self.artifact_bytes.inc_by(n as u64);
    }

    /// `n` artifact bytes were read from disk.
    pub fn artifact_read(&self, n: usize) {
        self.artifact_bytes_read.inc_by(n as u64);
    }

    /// Sets the scrape-time gauges and encodes everything.
    pub fn render(
        &self,
        states: impl IntoIterator<Item = RolloutState>,
        hosts_connected: usize,
        hosts_known: usize,
    ) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        let mut counts = [0i64; STATES.len()];
        for s in states {
            if let Some(i) = STATES.iter().position(|x| *x == s) {
                counts[i] += 1;
            }
        }
        for (s, n) in STATES.iter().zip(counts) {
            self.rollouts.get_or_create(&[("state", s.name())]).set(n);
        }
        self.hosts_connected
            .set(i64::try_from(hosts_connected).unwrap_or(i64::MAX));
        self.hosts_known
            .set(i64::try_from(hosts_known).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The command's label in `rollout_command_duration_seconds`.
pub fn command_name(cmd: &Cmd) -> &'static str {
    match cmd {
        Cmd::Stage(_) => "stage",
        Cmd::Activate(_) => "activate",
        Cmd::Commit(_) => "commit",
        Cmd::Rollback(_) => "rollback",
        Cmd::Ping(_) => "ping",
    }
}

/// Where the fleet and the engine record: does nothing until [`MetricsHook::set`].
#[derive(Debug, Default)]
pub struct MetricsHook(OnceLock<Arc<Metrics>>);

impl MetricsHook {
    /// Starts recording into `metrics` (only the first call counts).
    pub fn set(&self, metrics: Arc<Metrics>) {
        let _ = self.0.set(metrics);
    }

    /// The metrics, once set.
    pub fn get(&self) -> Option<&Arc<Metrics>> {
        self.0.get()
    }

    /// See [`Metrics::observe_batch`].
    pub fn observe_batch(&self, d: Duration) {
        if let Some(m) = self.get() {
            m.observe_batch(d);
        }
    }

    /// See [`Metrics::observe_command`].
    pub fn observe_command(&self, command: &'static str, d: Duration) {
        if let Some(m) = self.get() {
            m.observe_command(command, d);
        }
    }

    /// See [`Metrics::artifact_fetch`].
    pub fn artifact_fetch(&self) {
        if let Some(m) = self.get() {
            m.artifact_fetch();
        }
    }

    /// See [`Metrics::artifact_sent`].
    pub fn artifact_sent(&self, n: usize) {
        if let Some(m) = self.get() {
            m.artifact_sent(n);
        }
    }

    /// See [`Metrics::artifact_read`].
    pub fn artifact_read(&self, n: usize) {
        if let Some(m) = self.get() {
            m.artifact_read(n);
        }
    }

    /// See [`Metrics::rollback`].
    pub fn rollback(&self, reason: &'static str) {
        if let Some(m) = self.get() {
            m.rollback(reason);
        }
    }

    /// A host failed with `failure`: counted when it means the host rolled
    /// itself back (hook_failed, unhealthy, resource_regression,
    /// rolled_back_by_host).
    pub fn host_failed(&self, failure: Option<Failure>) {
        if let Some(
            f @ (Failure::HookFailed
            | Failure::Unhealthy
            | Failure::ResourceRegression
            | Failure::RolledBackByHost),
        ) = failure
        {
            self.rollback(f.name());
        }
    }
}

/// Binds the metrics listener.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    engine: Arc<Engine>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    serve_with(
        listener,
        move || {
            let states = engine
                .store()
                .rollout_heads()
                .unwrap_or_default()
                .into_iter()
                .map(|r| r.state);
            let (connected, known) = engine.fleet().counts();
            metrics.render(states, connected, known)
        },
        cancel,
    )
    .await
}

/// Serves `GET /metrics` with the body `render` returns, until `cancel`.
async fn serve_with(
    listener: TcpListener,
    render: impl Fn() -> String + Clone + Send + Sync + 'static,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let body = render();
            async move { ([(axum::http::header::CONTENT_TYPE, CONTENT_TYPE)], body) }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_has_every_family_and_the_values() {
        let m = Metrics::new();
        m.observe_batch(Duration::from_secs(3));
        m.observe_command("commit", Duration::from_millis(20));
        m.observe_command("commit", Duration::from_millis(30));
        m.artifact_fetch();
        m.artifact_sent(1000);
        m.artifact_sent(24);
        m.artifact_read(512);
        let hook = MetricsHook::default();
        hook.host_failed(Some(Failure::Unhealthy));
        hook.set(Arc::new(Metrics::new()));
        hook.host_failed(Some(Failure::Unhealthy));
        hook.host_failed(Some(Failure::Unreachable));
        hook.host_failed(Some(Failure::StageFailed));
        hook.rollback("fleet_halt");
        let text = m.render(
            [
                RolloutState::Succeeded,
                RolloutState::Succeeded,
                RolloutState::Running,
            ],
            2,
            3,
        );
        for family in [
            "# TYPE rollout_rollouts gauge",
            "# TYPE rollout_hosts_connected gauge",
            "# TYPE rollout_hosts_known gauge",
            "# TYPE rollout_batch_duration_seconds histogram",
            "# TYPE rollout_rollbacks counter",
            "# TYPE rollout_command_duration_seconds histogram",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        for sample in [
            "rollout_rollouts{state=\"succeeded\"} 2",
            "rollout_rollouts{state=\"running\"} 1",
            "rollout_rollouts{state=\"aborted\"} 0",
            "rollout_hosts_connected 2",
            "rollout_hosts_known 3",
            "rollout_batch_duration_seconds_count 1",
            "rollout_batch_duration_seconds_sum 3.0",
            "rollout_command_duration_seconds_count{command=\"commit\"} 2",
            "rollout_command_duration_seconds_count{command=\"stage\"} 0",
            "rollout_rollbacks_total{reason=\"unhealthy\"} 0",
            "rollout_artifact_fetches_total 1",
            "rollout_artifact_bytes_sent_total 1024",
            "rollout_artifact_bytes_read_total 512",
        ] {
            assert!(text.contains(sample), "{sample} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // The hook counted only once set, and only host rollbacks.
        let hooked = hook.get().expect("set").render([], 0, 0);
        for sample in [
            "rollout_rollbacks_total{reason=\"unhealthy\"} 1",
            "rollout_rollbacks_total{reason=\"fleet_halt\"} 1",
            "rollout_rollbacks_total{reason=\"abort\"} 0",
        ] {
            assert!(hooked.contains(sample), "{sample} missing:\n{hooked}");
        }
        assert!(!hooked.contains("unreachable"), "{hooked}");
        assert!(!hooked.contains("stage_failed"), "{hooked}");
    }

    #[test]
    fn command_names() {
        use rollout_proto::pb;
        assert_eq!(command_name(&Cmd::Ping(pb::Ping::default())), "ping");
        assert_eq!(command_name(&Cmd::Commit(pb::Commit::default())), "commit");
        assert!(COMMANDS.contains(&command_name(&Cmd::Stage(pb::Stage::default()))));
    }

    #[tokio::test]
    async fn serves_metrics_over_http_until_cancelled() {
        let listener = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = Arc::new(Metrics::new());
        let cancel = CancellationToken::new();
        let task = tokio::spawn(serve_with(
            listener,
            move || metrics.render([RolloutState::Failed], 1, 1),
            cancel.clone(),
        ));
        let body = tokio::task::spawn_blocking(move || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect(addr).expect("connect");
            write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").expect("write");
            let mut buf = String::new();
            s.read_to_string(&mut buf).expect("read");
            buf
        })
        .await
        .expect("join");
        assert!(body.starts_with("HTTP/1.0 200"), "{body}");
        assert!(body.contains("application/openmetrics-text"), "{body}");
        assert!(
            body.contains("rollout_rollouts{state=\"failed\"} 1"),
            "{body}"
        );
        cancel.cancel();
        task.await.expect("join").expect("serve");
    }
}
