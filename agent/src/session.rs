//! The agent's link to the coordinator: one outbound, long-lived
//! `AgentService.Connect` stream (hosts need no inbound port), reconnected with
//! exponential backoff and jitter. Commands arrive on it; results, progress and
//! reports go back, tagged by command id. Artifacts are fetched over the same
//! HTTP/2 connection ([`GrpcSource`]).
//!
//! HTTP/2 pings every `[coordinator] keepalive_interval`, also while idle; a
//! ping unanswered for `keepalive_timeout` ends the session, so a silent
//! partition or a frozen coordinator is noticed within their sum and the
//! reconnect loop takes over.

use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use rand::Rng;
use rollout_proto::pb;
use rollout_proto::pb::agent_service_client::AgentServiceClient;
use rollout_proto::pb::coordinator_message::Cmd;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tracing::{debug, info, warn};

use crate::config::CoordinatorConfig;
use crate::host_stats::HostStats;
use crate::release::{Digest, ServiceDefinition};
use crate::report::{failure_to_pb, full_report, service_report};
use crate::update::executor::{Engine, EngineError, FailureKind};
use crate::update::installer::{ArtifactSource, FetchError};

/// A session failure (the session reconnects after it).
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// TLS files cannot be read.
    #[error("read {what} {path}: {source}; check the agent config's [coordinator] section")]
    TlsFile {
        /// Which file.
        what: &'static str,
        /// Its path.
        path: String,
        /// OS error.
        source: std::io::Error,
    },
    /// The endpoint is malformed or TLS setup failed.
    #[error("coordinator endpoint {url}: {message}")]
    Endpoint {
        /// The URL.
        url: String,
        /// What is wrong.
        message: String,
    },
}

/// Artifacts from the coordinator's `FetchArtifact` stream, over the session's
/// channel.
#[derive(Debug, Default)]
pub struct GrpcSource {
    channel: RwLock<Option<Channel>>,
}

impl GrpcSource {
    fn set(&self, ch: Option<Channel>) {
        if let Ok(mut c) = self.channel.write() {
            *c = ch;
        }
    }
}

impl ArtifactSource for GrpcSource {
    fn fetch(&self, digest: Digest, offset: u64) -> BoxStream<'static, Result<Bytes, FetchError>> {
        let channel = self.channel.read().ok().and_then(|c| c.clone());
        Box::pin(async_stream::stream! {
            let Some(channel) = channel else {
                yield Err(FetchError::Unavailable("not connected to the coordinator".into()));
                return;
            };
            let mut client = AgentServiceClient::new(channel)
                .max_decoding_message_size(rollout_proto::MAX_MESSAGE_BYTES);
            let req = pb::FetchArtifactRequest { digest: digest.to_string(), offset };
            let mut stream = match client.fetch_artifact(req).await {
                Ok(r) => r.into_inner(),
                Err(s) if s.code() == tonic::Code::NotFound => {
                    yield Err(FetchError::NotFound(s.message().to_string()));
                    return;
                }
                Err(s) => {
                    yield Err(FetchError::Unavailable(s.message().to_string()));
                    return;
                }
            };
            loop {
                match stream.message().await {
                    Ok(Some(chunk)) => yield Ok(chunk.data),
                    Ok(None) => return,
                    Err(s) => {
                        yield Err(FetchError::Unavailable(s.message().to_string()));
                        return;
                    }
                }
            }
        })
    }
}

/// What the session needs.
pub struct Session {
    /// Where and how to connect.
    pub config: CoordinatorConfig,
    /// This host's name.
    pub host: String,
    /// This host's labels.
    pub labels: std::collections::BTreeMap<String, String>,
    /// Time between full reports.
    pub report_interval: Duration,
    /// The agent's wake grid ([`crate::health::tracker::next_on_grid`]):
    /// reports fall on whole intervals after it.
    pub wake_grid: tokio::time::Instant,
    /// The engine commands go to.
    pub engine: Arc<Engine>,
    /// Host figures for reports.
    pub stats: Arc<Mutex<dyn HostStats>>,
    /// Data directory (disk free in reports).
    pub data_dir: std::path::PathBuf,
    /// Shared with the installer.
    pub source: Arc<GrpcSource>,
    /// `true` while a stream is up.
    pub connected: watch::Sender<bool>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("host", &self.host)
            .field("url", &self.config.url)
            .finish_non_exhaustive()
    }
}

/// How long one attempt to connect may take: the keepalive timeout (the
/// time a silent peer is given), at most 5 s. A connection attempt whose SYN
/// was lost in a network blip is then retried soon after the network heals,
/// not only after a long TCP timeout.
pub fn connect_timeout(config: &CoordinatorConfig) -> Duration {
    config.keepalive_timeout.min(Duration::from_secs(5))
}

/// Opens the session's stream. The name lookup, TCP, TLS, HTTP/2 and the
/// coordinator's answer together get `limit` ([`connect_timeout`]): a lookup
/// sent while the network was down waits out the resolver's own timeout (5 s
/// in glibc), which the connection's TCP timeout does not cover, and would
/// hold the reconnect past the coordinator's grace for a host cut
/// mid-activation.
async fn open_stream(
    client: &mut AgentServiceClient<Channel>,
    outbound: mpsc::Receiver<pb::AgentMessage>,
    limit: Duration,
) -> Result<tonic::Streaming<pb::CoordinatorMessage>, String> {
    match tokio::time::timeout(limit, client.connect(ReceiverStream::new(outbound))).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("connect: {}", s.message())),
        Err(_) => Err(format!(
            "connect: no answer within {limit:?} (name lookup, connection and the coordinator's answer together); trying again"
        )),
    }
}

/// Builds the channel to the coordinator (lazily connected).
pub fn endpoint(config: &CoordinatorConfig) -> Result<Channel, SessionError> {
    let ep_err = |message: String| SessionError::Endpoint {
        url: config.url.clone(),
        message,
    };
    let mut ep = Endpoint::from_shared(config.url.clone())
        .map_err(|e| ep_err(e.to_string()))?
        .connect_timeout(connect_timeout(config))
        .http2_keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(config.keepalive_timeout)
        .keep_alive_while_idle(true);
    if let Some(tls) = &config.tls {
        let read = |what: &'static str, p: &std::path::Path| {
            std::fs::read(p).map_err(|source| SessionError::TlsFile {
                what,
                path: p.display().to_string(),
                source,
            })
        };
        let ca = read("CA certificate", &tls.ca)?;
        let cert = read("agent certificate", &tls.cert)?;
        let key = read("agent key", &tls.key)?;
        ep = ep
            .tls_config(
                ClientTlsConfig::new()
                    .ca_certificate(Certificate::from_pem(ca))
                    .identity(Identity::from_pem(cert, key)),
            )
            .map_err(|e| ep_err(e.to_string()))?;
    }
    Ok(ep.connect_lazy())
}

impl Session {
    /// Connects, serves, and reconnects with backoff until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut backoff = self.config.reconnect_min;
        loop {
            let started = tokio::time::Instant::now();
            match self.serve_once(&cancel).await {
                Ok(()) => return,
                Err(e) => {
                    self.source.set(None);
                    let _ = self.connected.send(false);
                    warn!(url = %self.config.url, error = %e, "coordinator session ended");
                }
            }
            // A session that lived a while resets the backoff.
            if started.elapsed() > self.config.reconnect_max {
                backoff = self.config.reconnect_min;
            }
            let jitter = rand::rng().random_range(0.5..1.0);
            let wait = backoff.mul_f64(jitter);
            debug!(?wait, "reconnecting after backoff");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return,
            }
            backoff = (backoff * 2).min(self.config.reconnect_max);
        }
    }

    fn report(&self) -> pb::Report {
        full_report(
            &self.engine.views(),
            self.engine.store().as_ref(),
            self.stats.as_ref(),
            &self.data_dir,
        )
    }

    /// One session; `Ok` only when cancelled.
    async fn serve_once(&self, cancel: &CancellationToken) -> Result<(), String> {
        let channel = endpoint(&self.config).map_err(|e| e.to_string())?;
        let mut client = AgentServiceClient::new(channel.clone())
            .max_decoding_message_size(rollout_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                host: self.host.clone(),
                labels: self.labels.clone().into_iter().collect(),
                agent_version: env!("CARGO_PKG_VERSION").to_string(),
                report: Some(self.report()),
            })),
        };
        tx.send(hello).await.map_err(|e| e.to_string())?;
        let mut inbound = open_stream(&mut client, rx, connect_timeout(&self.config)).await?;
        self.source.set(Some(channel));
        let _ = self.connected.send(true);
        info!(url = %self.config.url, host = %self.host, "connected to the coordinator");
        let mut changes = self.engine.subscribe();
        // Full reports on the agent's wake grid, with its services' steady
        // checks where their periods meet (the hello above was the first).
        let first = crate::health::tracker::next_on_grid(
            self.wake_grid,
            tokio::time::Instant::now(),
            self.report_interval,
        );
        let mut tick = tokio::time::interval_at(first, self.report_interval);
        let commands = tokio_util::task::TaskTracker::new();
        let result = loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        let engine = self.engine.clone();
                        let tx = tx.clone();
                        commands.spawn(async move { handle(engine, m, tx).await });
                    }
                    Ok(None) => break Err("the coordinator closed the stream".to_string()),
                    Err(s) => break Err(format!("stream error: {}", s.message())),
                },
                changed = changes.recv() => {
                    let services = match changed {
                        Ok(svc) => self.engine.view(&svc).into_iter().collect::<Vec<_>>(),
                        Err(_) => self.engine.views(),
                    };
                    let mut report = self.report();
                    let names: Vec<_> = services.iter().map(|v| v.record.service.clone()).collect();
                    report.services.retain(|s| names.contains(&s.service));
                    let m = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Report(report)) };
                    if tx.send(m).await.is_err() { break Err("outbound closed".into()); }
                }
                _ = tick.tick() => {
                    let m = pb::AgentMessage { msg: Some(pb::agent_message::Msg::Report(self.report())) };
                    if tx.send(m).await.is_err() { break Err("outbound closed".into()); }
                }
                () = cancel.cancelled() => break Ok(()),
            }
        };
        // Commands in flight finish (their results are lost if the stream is
        // gone; the coordinator reconciles from the next hello's report).
        commands.close();
        result
    }
}

/// Why a command failed, as the coordinator is told.
struct CommandFailure {
    kind: FailureKind,
    error: String,
    retryable: bool,
}

impl CommandFailure {
    fn invalid(error: &str) -> Self {
        CommandFailure {
            kind: FailureKind::Invalid,
            error: error.to_string(),
            retryable: false,
        }
    }
}

fn result_msg(id: &str, r: Result<Option<pb::ServiceReport>, CommandFailure>) -> pb::AgentMessage {
    let result = match r {
        Ok(service) => pb::CommandResult {
            command_id: id.to_string(),
            ok: true,
            failure: pb::FailureKind::Unspecified as i32,
            error: String::new(),
            service,
            retryable: false,
        },
        Err(f) => pb::CommandResult {
            command_id: id.to_string(),
            ok: false,
            failure: failure_to_pb(f.kind) as i32,
            error: f.error,
            service: None,
            retryable: f.retryable,
        },
    };
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Result(result)),
    }
}

fn engine_err(e: EngineError) -> CommandFailure {
    CommandFailure {
        kind: e.kind(),
        retryable: e.retryable(),
        error: e.to_string(),
    }
}

/// Executes one coordinator command and sends its result.
async fn handle(
    engine: Arc<Engine>,
    m: pb::CoordinatorMessage,
    tx: mpsc::Sender<pb::AgentMessage>,
) {
    let id = m.command_id.clone();
    let report_of = |svc: &str| {
        engine
            .view(svc)
            .map(|v| service_report(&v, engine.store().as_ref()))
    };
    let r = match m.cmd {
        Some(Cmd::Ping(_)) => Ok(None),
        Some(Cmd::Stage(s)) => match s.definition.map(ServiceDefinition::try_from) {
            None => Err(CommandFailure::invalid("stage without a definition")),
            Some(Err(e)) => Err(CommandFailure::invalid(&e.to_string())),
            Some(Ok(def)) => {
                let svc = def.service.clone();
                engine
                    .stage(def)
                    .await
                    .map(|_| report_of(&svc))
                    .map_err(engine_err)
            }
        },
        Some(Cmd::Activate(a)) => {
            let progress = pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Progress(pb::CommandProgress {
                    command_id: id.clone(),
                    service: a.service.clone(),
                    step: "activating".into(),
                })),
            };
            let _ = tx.send(progress).await;
            engine
                .activate(&a.service, &a.release, &a.cause, &id)
                .await
                .map(|v| Some(service_report(&v, engine.store().as_ref())))
                .map_err(engine_err)
        }
        Some(Cmd::Commit(c)) => engine
            .commit(&c.service, &c.release)
            .await
            .map(|v| Some(service_report(&v, engine.store().as_ref())))
            .map_err(engine_err),
        Some(Cmd::Rollback(r)) => {
            let to = (!r.to_release.is_empty()).then_some(r.to_release.as_str());
            let reason = if r.reason.is_empty() {
                "requested by the coordinator"
            } else {
                r.reason.as_str()
            };
            engine
                .rollback(&r.service, to, reason, "coordinator")
                .await
                .map(|v| Some(service_report(&v, engine.store().as_ref())))
                .map_err(engine_err)
        }
        None => Err(CommandFailure::invalid("empty command")),
    };
    if let Err(f) = &r {
        warn!(command = %id, error = %f.error, retryable = f.retryable, "command failed");
    }
    let _ = tx.send(result_msg(&id, r)).await;
}

#[cfg(test)]
mod connect_tests {
    use super::*;

    fn config(keepalive_timeout: Duration) -> CoordinatorConfig {
        CoordinatorConfig {
            url: "http://127.0.0.1:1".into(),
            tls: None,
            reconnect_min: Duration::from_millis(50),
            reconnect_max: Duration::from_secs(30),
            keepalive_interval: Duration::from_secs(10),
            keepalive_timeout,
        }
    }

    #[tokio::test]
    async fn opening_the_stream_gives_up_on_a_silent_coordinator_within_the_limit() {
        // Accepts connections and never answers (as a lookup or a peer lost
        // in a network cut would leave the attempt waiting).
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let held = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        let mut c = config(Duration::from_millis(300));
        c.url = format!("http://{addr}");
        let mut client = AgentServiceClient::new(endpoint(&c).expect("endpoint"));
        let (_tx, rx) = mpsc::channel(1);
        let started = std::time::Instant::now();
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            open_stream(&mut client, rx, connect_timeout(&c)),
        )
        .await
        .expect("the attempt must end on its own, within its limit");
        let e = r.expect_err("a silent coordinator is an error");
        assert!(e.contains("no answer within 300ms"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(3));
        held.abort();
    }

    #[test]
    fn a_connection_attempt_is_given_the_keepalive_timeout_at_most_5_s() {
        let t = |ms| connect_timeout(&config(Duration::from_millis(ms)));
        assert_eq!(t(1_500), Duration::from_millis(1_500));
        assert_eq!(t(10_000), Duration::from_secs(5));
        assert_eq!(t(100), Duration::from_millis(100));
    }
}
