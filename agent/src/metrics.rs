//! Prometheus metrics of the agent, served as plain HTTP on `metrics_listen`
//! (off unless configured).
//!
//! Counters are bumped by the engine where it writes its history
//! ([`MetricsHandle`] in the engine config: a no-op when metrics are off);
//! health, the service count and the agent's own RSS are read at scrape time.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `rollout_agent_operations_total` | counter | `kind` (stage, activate, commit, rollback), `outcome` (ok, failed) |
//! | `rollout_agent_rollbacks_total` | counter | `reason` (see [`rollback_reason`]) |
//! | `rollout_agent_service_healthy` | gauge | `service`: 1 healthy, 0 otherwise |
//! | `rollout_agent_services` | gauge | |
//! | `rollout_agent_resident_memory_bytes` | gauge | |

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::health::tracker::{RESOURCE_PREFIX, Verdict};
use crate::host_stats::HostStats;
use crate::update::executor::{Engine, ServiceView};
use crate::update::phase::Event;

/// Content type of the exposition (OpenMetrics text, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type OpLabels = [(&'static str, &'static str); 2];
type ReasonLabels = [(&'static str, &'static str); 1];
type ServiceLabels = [(&'static str, String); 1];

/// Operation kinds counted in `rollout_agent_operations_total`.
pub const OPERATIONS: [&str; 4] = ["stage", "activate", "commit", "rollback"];

/// Reason classes of `rollout_agent_rollbacks_total`.
pub const ROLLBACK_REASONS: [&str; 7] = [
    "unhealthy",
    "resource_regression",
    "step_failed",
    "commit_deadline",
    "recovery",
    "operator",
    "coordinator",
];

/// The agent's metric families.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    operations: Family<OpLabels, Counter>,
    rollbacks: Family<ReasonLabels, Counter>,
    healthy: Family<ServiceLabels, Gauge>,
    services: Gauge,
    rss: Gauge,
    /// One scrape at a time refreshes the scrape-time gauges and encodes.
    scrape: Mutex<()>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Registers every family; the counters start at zero for every known
    /// label value, so rates work from the first scrape.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let operations = Family::<OpLabels, Counter>::default();
        let rollbacks = Family::<ReasonLabels, Counter>::default();
        let healthy = Family::<ServiceLabels, Gauge>::default();
        let services = Gauge::default();
        let rss = Gauge::default();
        registry.register(
            "rollout_agent_operations",
            "Operations finished by the agent, by kind and outcome",
            operations.clone(),
        );
        registry.register(
            "rollout_agent_rollbacks",
            "Rollbacks started on this host, by reason class",
            rollbacks.clone(),
        );
        registry.register(
            "rollout_agent_service_healthy",
            "1 when the service's running release passes its health checks, else 0",
            healthy.clone(),
        );
        registry.register(
            "rollout_agent_services",
            "Services this agent manages",
            services.clone(),
        );
        registry.register(
            "rollout_agent_resident_memory_bytes",
            "Resident memory of the agent process itself",
            rss.clone(),
        );
        for kind in OPERATIONS {
            for outcome in ["ok", "failed"] {
                if kind != "commit" || outcome == "ok" {
                    let _ = operations.get_or_create(&[("kind", kind), ("outcome", outcome)]);
                }
            }
        }
        for reason in ROLLBACK_REASONS {
            let _ = rollbacks.get_or_create(&[("reason", reason)]);
        }
        Metrics {
            registry,
            operations,
            rollbacks,
            healthy,
            services,
            rss,
            scrape: Mutex::new(()),
        }
    }

    /// Counts a finished operation (`outcome` is `ok` or `failed`).
    pub fn operation(&self, kind: &'static str, outcome: &'static str) {
        self.operations
            .get_or_create(&[("kind", kind), ("outcome", outcome)])
            .inc();
    }

    /// Counts a rollback that starts, by reason class.
    pub fn rollback(&self, reason: &'static str) {
        self.rollbacks.get_or_create(&[("reason", reason)]).inc();
    }

    /// Sets the scrape-time gauges from the engine's views and the agent's
    /// own RSS (left as it was when unknown), and encodes everything.
    pub fn render(&self, views: &[ServiceView], own_rss: Option<u64>) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|e| e.into_inner());
        self.healthy.clear();
        for v in views {
            let healthy = v
                .health
                .as_ref()
                .is_some_and(|h| h.verdict == Verdict::Healthy);
            self.healthy
                .get_or_create(&[("service", v.record.service.clone())])
                .set(i64::from(healthy));
        }
        self.services
            .set(i64::try_from(views.len()).unwrap_or(i64::MAX));
        if let Some(rss) = own_rss {
            self.rss.set(i64::try_from(rss).unwrap_or(i64::MAX));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// The engine's handle on the metrics: counts when metrics are on, does
/// nothing when they are off (the default, and what tests use).
#[derive(Debug, Clone, Default)]
pub struct MetricsHandle(Option<Arc<Metrics>>);

impl MetricsHandle {
    /// A handle counting into `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        MetricsHandle(Some(metrics))
    }

    /// The metrics, when on.
    pub fn get(&self) -> Option<&Arc<Metrics>> {
        self.0.as_ref()
    }

    /// See [`Metrics::operation`].
    pub fn operation(&self, kind: &'static str, outcome: &'static str) {
        if let Some(m) = &self.0 {
            m.operation(kind, outcome);
        }
    }

    /// Counts a rollback that starts; the reason class comes from
    /// [`rollback_reason`].
    pub fn rollback(&self, event: Event, cause: &str, reason: &str) {
        if let Some(m) = &self.0 {
            m.rollback(rollback_reason(event, cause, reason));
        }
    }
}

/// The reason class of a rollback: `resource_regression` (a resource gate),
/// `unhealthy`, `step_failed` (hook, stop, switch or start), `commit_deadline`,
/// `recovery` (an operation interrupted by an agent restart), `operator`
/// (admin socket) or `coordinator` (a fleet or operator rollback sent by it).
pub fn rollback_reason(event: Event, cause: &str, reason: &str) -> &'static str {
    if reason.contains(RESOURCE_PREFIX) {
        return "resource_regression";
    }
    match event {
        Event::Unhealthy => "unhealthy",
        Event::StepFailed => "step_failed",
        Event::CommitDeadline => "commit_deadline",
        Event::Recover => "recovery",
        Event::RollbackRequested if cause == "admin" => "operator",
        Event::RollbackRequested => "coordinator",
        _ => "other",
    }
}

/// Binds the metrics listener (before the agent reports itself started, so a
/// taken port fails the start).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Serves `GET /metrics` on `listener` until `cancel`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    engine: Arc<Engine>,
    stats: Arc<Mutex<dyn HostStats>>,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    serve_with(
        listener,
        move || {
            let own_rss = stats.lock().ok().and_then(|mut s| s.own_rss_bytes());
            metrics.render(&engine.views(), own_rss)
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
    use crate::health::tracker::HealthView;
    use crate::state::ServiceRecord;

    fn view(service: &str, verdict: Option<Verdict>) -> ServiceView {
        ServiceView {
            record: ServiceRecord::new(service),
            health: verdict.map(|verdict| HealthView {
                verdict,
                last_failure: None,
                sample: None,
                steady: None,
                exits: 0,
                gave_up: false,
            }),
        }
    }

    #[test]
    fn encoding_has_every_family_and_the_values() {
        let m = Metrics::new();
        m.operation("stage", "ok");
        m.operation("commit", "ok");
        m.operation("commit", "ok");
        m.rollback("unhealthy");
        let text = m.render(
            &[
                view("web", Some(Verdict::Healthy)),
                view("api", Some(Verdict::Unhealthy("down".into()))),
                view("idle", None),
            ],
            Some(12_345_678),
        );
        for family in [
            "# TYPE rollout_agent_operations counter",
            "# TYPE rollout_agent_rollbacks counter",
            "# TYPE rollout_agent_service_healthy gauge",
            "# TYPE rollout_agent_services gauge",
            "# TYPE rollout_agent_resident_memory_bytes gauge",
        ] {
            assert!(text.contains(family), "{family} missing:\n{text}");
        }
        for sample in [
            "rollout_agent_operations_total{kind=\"commit\",outcome=\"ok\"} 2",
            "rollout_agent_operations_total{kind=\"stage\",outcome=\"ok\"} 1",
            "rollout_agent_operations_total{kind=\"rollback\",outcome=\"failed\"} 0",
            "rollout_agent_rollbacks_total{reason=\"unhealthy\"} 1",
            "rollout_agent_rollbacks_total{reason=\"commit_deadline\"} 0",
            "rollout_agent_service_healthy{service=\"web\"} 1",
            "rollout_agent_service_healthy{service=\"api\"} 0",
            "rollout_agent_service_healthy{service=\"idle\"} 0",
            "rollout_agent_services 3",
            "rollout_agent_resident_memory_bytes 12345678",
        ] {
            assert!(text.contains(sample), "{sample} missing:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
        // A service that went away is no longer listed.
        let text = m.render(&[view("web", Some(Verdict::Healthy))], None);
        assert!(!text.contains("service=\"api\""), "{text}");
        assert!(text.contains("rollout_agent_services 1"), "{text}");
        assert!(
            text.contains("rollout_agent_resident_memory_bytes 12345678"),
            "{text}"
        );
    }

    #[test]
    fn off_handle_counts_nothing_and_reasons_are_classified() {
        MetricsHandle::default().operation("stage", "ok");
        MetricsHandle::default().rollback(Event::Unhealthy, "host", "x");
        assert!(MetricsHandle::default().get().is_none());
        let cases = [
            (
                Event::Unhealthy,
                "r-1",
                "unhealthy in probation",
                "unhealthy",
            ),
            (
                Event::Unhealthy,
                "r-1",
                "resource gate: rss 300 MiB over 100 MiB",
                "resource_regression",
            ),
            (Event::StepFailed, "r-1", "hook before_stop", "step_failed"),
            (Event::CommitDeadline, "r-1", "", "commit_deadline"),
            (Event::Recover, "host", "", "recovery"),
            (Event::RollbackRequested, "admin", "", "operator"),
            (Event::RollbackRequested, "coordinator", "", "coordinator"),
        ];
        for (event, cause, reason, class) in cases {
            assert_eq!(rollback_reason(event, cause, reason), class, "{event:?}");
            assert!(ROLLBACK_REASONS.contains(&class));
        }
        let m = Arc::new(Metrics::new());
        let h = MetricsHandle::new(m.clone());
        h.rollback(Event::RollbackRequested, "admin", "");
        h.operation("rollback", "ok");
        let text = m.render(&[], None);
        assert!(
            text.contains("rollout_agent_rollbacks_total{reason=\"operator\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rollout_agent_operations_total{kind=\"rollback\",outcome=\"ok\"} 1"),
            "{text}"
        );
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
            move || metrics.render(&[], Some(1)),
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
            body.contains("rollout_agent_resident_memory_bytes 1"),
            "{body}"
        );
        cancel.cancel();
        task.await.expect("join").expect("serve");
    }
}
