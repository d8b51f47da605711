//! Swarm mode: many agent sessions in this one process, each a real
//! `AgentService.Connect` stream over real gRPC/HTTP/2 connections to a real
//! coordinator, so the coordinator sees N healthy hosts without N agent
//! processes. The benchmarks use it for N ≥ 1,000 (N = 10 and 100 use real
//! `rollout-agent` processes).
//!
//! Each session speaks the protocol as `rollout-agent` does
//! (`agent/src/session.rs`, `agent/src/report.rs`): a `Hello` with labels and a
//! full report (one service, its current release, recent history), a report
//! every `report_interval` (staggered over the interval across sessions, as
//! agents started at different times are) and one after every change, and a
//! `CommandResult` per command. The service is a no-op:
//!
//! * `Ping`: answered at once.
//! * `Stage`: the artifact is really fetched (`FetchArtifact`, bytes counted,
//!   not unpacked); then answered.
//! * `Activate`: answered after the simulated `restart` plus the staged
//!   definition's `min_healthy_time` (what an agent's verify waits; no
//!   wait at all for a zero one), in
//!   probation and healthy; the host's history gets `activating` and
//!   `verified` with the rollout as cause.
//! * `Commit` / `Rollback`: answered at once, with the state an agent reaches.
//!
//! Sessions share `per_connection` HTTP/2 connections (1 = one TCP connection
//! per session, as real agents have; more multiplexes streams and needs fewer
//! file descriptors). The soft limit on open files is raised to the hard one.
//! What it does not model: the agent's disk writes (journal, unpack), process
//! supervision and health probing, and its CPU cost; all sessions share this
//! process's CPU with the coordinator on the same machine.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use futures::StreamExt;
use rollout_proto::pb;
use rollout_proto::pb::agent_service_client::AgentServiceClient;
use rollout_proto::pb::coordinator_message::Cmd;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};

/// Options of `bench swarm`: a swarm against a coordinator already running
/// on loopback (started with `--insecure-dev`), for a bounded time.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Coordinator URL; loopback only (`http://127.0.0.1:PORT`).
    #[arg(long)]
    pub coordinator: String,
    /// Number of sessions (hosts).
    #[arg(long, default_value_t = 1000)]
    pub sessions: usize,
    /// Sessions per HTTP/2 connection (1 to 100).
    #[arg(long, default_value_t = 1)]
    pub per_connection: usize,
    /// How long to run (at most 24h).
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Simulated restart of the no-op service at Activate.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    pub restart: Duration,
    /// Time between periodic reports.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub report_interval: Duration,
    /// Host names are PREFIX00001, PREFIX00002, ...
    #[arg(long, default_value = "s")]
    pub prefix: String,
}

/// `bench swarm`: runs the sessions for `--duration`, printing counters.
pub async fn run(args: &Args) -> Result<()> {
    let url = args.coordinator.trim_end_matches('/');
    let loopback = ["http://127.0.0.1:", "http://localhost:", "http://[::1]:"];
    if !loopback.iter().any(|p| url.starts_with(p)) {
        bail!(
            "--coordinator {url}: the swarm only talks to a coordinator on loopback started with --insecure-dev, e.g. http://127.0.0.1:7443"
        );
    }
    if args.duration > Duration::from_secs(24 * 3600) {
        bail!("--duration is at most 24h");
    }
    let mut cfg = SwarmConfig::new(url, args.sessions);
    cfg.per_connection = args.per_connection;
    cfg.restart = args.restart;
    cfg.report_interval = args.report_interval;
    cfg.prefix = args.prefix.clone();
    let started = Instant::now();
    let swarm = Swarm::start(cfg).await?;
    crate::util::note(format!(
        "{} sessions connected in {:.1} s; running for {:?}",
        args.sessions,
        started.elapsed().as_secs_f64(),
        args.duration
    ));
    let end = Instant::now() + args.duration;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_secs(10).min(end - Instant::now())).await;
        let c = &swarm.counters;
        crate::util::note(format!(
            "connected {}, commands {}, reports {}, stream errors {}",
            swarm.connected(),
            c.commands.load(Ordering::Relaxed),
            c.reports.load(Ordering::Relaxed),
            c.stream_errors.load(Ordering::Relaxed)
        ));
    }
    swarm.stop().await;
    Ok(())
}

/// History entries each session keeps in its reports (newest last).
const RECENT: usize = 10;
/// Connections opened at once while the swarm starts.
const CONNECT_PARALLELISM: usize = 64;

/// What the swarm looks like.
#[derive(Debug, Clone)]
pub struct SwarmConfig {
    /// Coordinator URL (`http://127.0.0.1:port`, an `--insecure-dev` coordinator).
    pub url: String,
    /// Number of sessions (hosts).
    pub sessions: usize,
    /// Sessions per HTTP/2 connection (1 = one connection each).
    pub per_connection: usize,
    /// Host names are `<prefix><index>`, index from 1, zero-padded to 5.
    pub prefix: String,
    /// Labels of every host.
    pub labels: BTreeMap<String, String>,
    /// Time between periodic reports.
    pub report_interval: Duration,
    /// Simulated restart of the service at `Activate` (before the bake).
    pub restart: Duration,
    /// The service every host reports.
    pub service: String,
    /// Its release at start (committed, healthy).
    pub release: String,
}

impl SwarmConfig {
    /// `n` sessions against `url` with role=web, one connection each, reports
    /// every 5 s, no simulated restart, service `web` on release `v0`.
    pub fn new(url: &str, n: usize) -> SwarmConfig {
        SwarmConfig {
            url: url.to_string(),
            sessions: n,
            per_connection: 1,
            prefix: "s".into(),
            labels: BTreeMap::from([("role".to_string(), "web".to_string())]),
            report_interval: Duration::from_secs(5),
            restart: Duration::ZERO,
            service: "web".into(),
            release: "v0".into(),
        }
    }

    /// The name of session `i` (from 0).
    pub fn host(&self, i: usize) -> String {
        format!("{}{:05}", self.prefix, i + 1)
    }
}

/// Counters over all sessions.
#[derive(Debug, Default)]
pub struct Counters {
    /// Sessions with a live stream.
    pub connected: AtomicUsize,
    /// Commands received.
    pub commands: AtomicU64,
    /// Reports sent (periodic and on change).
    pub reports: AtomicU64,
    /// Artifact bytes fetched.
    pub fetched_bytes: AtomicU64,
    /// Streams that ended or failed (each session then reconnects).
    pub stream_errors: AtomicU64,
}

/// A running swarm; [`Swarm::stop`] ends every session.
#[derive(Debug)]
pub struct Swarm {
    /// Counters.
    pub counters: Arc<Counters>,
    cancel: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
    /// Last error of a session, for failure messages.
    last_error: Arc<Mutex<Option<String>>>,
    /// Each session's host, by index.
    hosts: Vec<Arc<Mutex<HostState>>>,
    cfg: Arc<SwarmConfig>,
}

/// Raises the soft limit on open files to the hard limit; fails with the fix
/// when even that is below `need`. Returns the new soft limit.
pub fn raise_nofile(need: u64) -> Result<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit(RLIMIT_NOFILE)")?;
    if hard < need {
        bail!(
            "{need} open files are needed but the hard limit is {hard}: raise it (`ulimit -Hn`, or LimitNOFILE= in a unit), use fewer sessions, or more sessions per connection (--per-connection)"
        );
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).context("setrlimit(RLIMIT_NOFILE)")?;
    }
    Ok(hard.max(soft))
}

impl Swarm {
    /// Opens the connections, starts every session and waits until all are
    /// connected (the coordinator registered them), within a deadline that
    /// grows with N.
    pub async fn start(cfg: SwarmConfig) -> Result<Swarm> {
        let per = cfg.per_connection.clamp(1, 100);
        let n_conns = cfg.sessions.div_ceil(per);
        raise_nofile(n_conns as u64 + 256)?;
        let endpoint = Endpoint::from_shared(cfg.url.clone())
            .context("swarm coordinator URL")?
            .connect_timeout(Duration::from_secs(10))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channels: Vec<Channel> = futures::stream::iter((0..n_conns).map(|_| {
            let ep = endpoint.clone();
            async move { ep.connect().await }
        }))
        .buffer_unordered(CONNECT_PARALLELISM)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .with_context(|| format!("connect to the coordinator at {}", cfg.url))?;
        let counters = Arc::new(Counters::default());
        let cancel = CancellationToken::new();
        let last_error = Arc::new(Mutex::new(None));
        let mut tasks = tokio::task::JoinSet::new();
        let cfg = Arc::new(cfg);
        let hosts: Vec<Arc<Mutex<HostState>>> = (0..cfg.sessions)
            .map(|_| Arc::new(Mutex::new(HostState::new(&cfg))))
            .collect();
        for (i, state) in hosts.iter().enumerate() {
            let s = SessionTask {
                cfg: cfg.clone(),
                index: i,
                channel: channels[i / per].clone(),
                counters: counters.clone(),
                last_error: last_error.clone(),
                state: state.clone(),
            };
            let cancel = cancel.clone();
            tasks.spawn(async move { s.run(cancel).await });
        }
        let swarm = Swarm {
            counters,
            cancel,
            tasks,
            last_error,
            hosts,
            cfg: cfg.clone(),
        };
        let deadline = Duration::from_secs(60) + Duration::from_millis(10) * cfg.sessions as u32;
        let end = Instant::now() + deadline;
        while swarm.connected() < cfg.sessions {
            if Instant::now() > end {
                bail!(
                    "only {} of {} swarm sessions connected within {deadline:?}; last error: {:?}",
                    swarm.connected(),
                    cfg.sessions,
                    swarm.last_error()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(swarm)
    }

    /// Sessions with a live stream.
    pub fn connected(&self) -> usize {
        self.counters.connected.load(Ordering::SeqCst)
    }

    /// The last session error seen, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Each session's host name and the history of its service as its
    /// reports carry it (the newest entries, oldest first).
    pub fn histories(&self) -> Vec<(String, Vec<pb::HistoryEntry>)> {
        self.hosts
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let recent = h.lock().map(|h| h.recent.clone()).unwrap_or_default();
                (self.cfg.host(i), recent)
            })
            .collect()
    }

    /// Ends every session and waits for them.
    pub async fn stop(mut self) {
        self.cancel.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// The no-op service's state on one simulated host.
#[derive(Debug)]
struct HostState {
    service: String,
    current: String,
    previous: String,
    last_known_good: String,
    phase: pb::Phase,
    /// Staged release → its min_healthy_time.
    staged: HashMap<String, Duration>,
    recent: Vec<pb::HistoryEntry>,
    seq: u64,
}

impl HostState {
    fn new(cfg: &SwarmConfig) -> HostState {
        HostState {
            service: cfg.service.clone(),
            current: cfg.release.clone(),
            previous: String::new(),
            last_known_good: cfg.release.clone(),
            phase: pb::Phase::Idle,
            staged: HashMap::new(),
            recent: Vec::new(),
            seq: 0,
        }
    }

    fn history(&mut self, release: &str, event: &str, cause: &str, reason: &str) {
        self.seq += 1;
        self.recent.push(pb::HistoryEntry {
            seq: self.seq,
            release: release.to_string(),
            event: event.to_string(),
            reason: reason.to_string(),
            at_ms: crate::util::now_ms(),
            cause: cause.to_string(),
        });
        if self.recent.len() > RECENT {
            self.recent.remove(0);
        }
    }

    fn service_report(&self) -> pb::ServiceReport {
        pb::ServiceReport {
            service: self.service.clone(),
            current_release: self.current.clone(),
            previous_release: self.previous.clone(),
            last_known_good: self.last_known_good.clone(),
            phase: self.phase as i32,
            step: String::new(),
            health: pb::Health::Healthy as i32,
            rss_bytes: 6 << 20,
            cpu_percent: 0.2,
            recent: self.recent.clone(),
            steady_rss_bytes: 6 << 20,
            steady_cpu_percent: 0.2,
        }
    }

    fn report(&self) -> pb::Report {
        pb::Report {
            cpu_percent: 1.0,
            mem_used_bytes: 512 << 20,
            mem_total_bytes: 4 << 30,
            services: vec![self.service_report()],
            load1: 0.1,
            disk_free_bytes: 10 << 30,
        }
    }
}

struct SessionTask {
    cfg: Arc<SwarmConfig>,
    index: usize,
    channel: Channel,
    counters: Arc<Counters>,
    last_error: Arc<Mutex<Option<String>>>,
    state: Arc<Mutex<HostState>>,
}

type Outbound = mpsc::Sender<pb::AgentMessage>;

fn report_msg(state: &Mutex<HostState>) -> pb::AgentMessage {
    let report = state.lock().map(|s| s.report()).unwrap_or_default();
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Report(report)),
    }
}

impl SessionTask {
    async fn run(self, cancel: CancellationToken) {
        loop {
            let r = self.serve_once(&cancel).await;
            match r {
                Ok(()) => return,
                Err(e) => {
                    self.counters.stream_errors.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = self.last_error.lock() {
                        *l = Some(format!("{}: {e}", self.cfg.host(self.index)));
                    }
                }
            }
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(500)) => {}
                () = cancel.cancelled() => return,
            }
        }
    }

    async fn serve_once(&self, cancel: &CancellationToken) -> Result<(), String> {
        let host = self.cfg.host(self.index);
        let mut client = AgentServiceClient::new(self.channel.clone())
            .max_decoding_message_size(rollout_proto::MAX_MESSAGE_BYTES);
        let (tx, rx) = mpsc::channel::<pb::AgentMessage>(16);
        let report = self.state.lock().map(|s| s.report()).unwrap_or_default();
        let hello = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Hello(pb::Hello {
                host: host.clone(),
                labels: self.cfg.labels.clone().into_iter().collect(),
                agent_version: "swarm".into(),
                report: Some(report),
            })),
        };
        tx.send(hello).await.map_err(|e| e.to_string())?;
        let connected = tokio::select! {
            r = client.connect(ReceiverStream::new(rx)) => r,
            () = cancel.cancelled() => return Ok(()),
        };
        let mut inbound = connected
            .map_err(|s| format!("connect: {}", s.message()))?
            .into_inner();
        self.counters.connected.fetch_add(1, Ordering::SeqCst);
        // Stagger periodic reports over the interval across sessions.
        let every = self.cfg.report_interval;
        let offset = every.mul_f64(self.index as f64 / self.cfg.sessions.max(1) as f64);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + offset, every);
        let result = loop {
            tokio::select! {
                msg = inbound.message() => match msg {
                    Ok(Some(m)) => {
                        self.counters.commands.fetch_add(1, Ordering::Relaxed);
                        let (state, tx, counters) = (self.state.clone(), tx.clone(), self.counters.clone());
                        let (channel, restart) = (self.channel.clone(), self.cfg.restart);
                        tokio::spawn(async move {
                            handle(m, state, tx, counters, channel, restart).await;
                        });
                    }
                    Ok(None) => break Err("the coordinator closed the stream".to_string()),
                    Err(s) => break Err(format!("stream error: {}", s.message())),
                },
                _ = tick.tick() => {
                    if tx.send(report_msg(&self.state)).await.is_err() {
                        break Err("outbound closed".into());
                    }
                    self.counters.reports.fetch_add(1, Ordering::Relaxed);
                }
                () = cancel.cancelled() => break Ok(()),
            }
        };
        self.counters.connected.fetch_sub(1, Ordering::SeqCst);
        result
    }
}

fn result_msg(
    id: &str,
    r: Result<pb::ServiceReport, (pb::FailureKind, String)>,
) -> pb::AgentMessage {
    let result = match r {
        Ok(s) => pb::CommandResult {
            command_id: id.to_string(),
            ok: true,
            failure: pb::FailureKind::Unspecified as i32,
            error: String::new(),
            service: Some(s),
            retryable: false,
        },
        Err((kind, error)) => pb::CommandResult {
            command_id: id.to_string(),
            ok: false,
            failure: kind as i32,
            error,
            service: None,
            retryable: false,
        },
    };
    pb::AgentMessage {
        msg: Some(pb::agent_message::Msg::Result(result)),
    }
}

async fn fetch(channel: Channel, digest: &str) -> Result<u64, String> {
    let mut client = AgentServiceClient::new(channel)
        .max_decoding_message_size(rollout_proto::MAX_MESSAGE_BYTES);
    let mut stream = client
        .fetch_artifact(pb::FetchArtifactRequest {
            digest: digest.to_string(),
            offset: 0,
        })
        .await
        .map_err(|s| format!("fetch {digest}: {}", s.message()))?
        .into_inner();
    let mut n = 0u64;
    while let Some(chunk) = stream
        .message()
        .await
        .map_err(|s| format!("fetch {digest}: {}", s.message()))?
    {
        n += chunk.data.len() as u64;
    }
    Ok(n)
}

/// One command, answered as the no-op service would be.
async fn handle(
    m: pb::CoordinatorMessage,
    state: Arc<Mutex<HostState>>,
    tx: Outbound,
    counters: Arc<Counters>,
    channel: Channel,
    restart: Duration,
) {
    let id = m.command_id;
    let poisoned = || (pb::FailureKind::Internal, "state poisoned".to_string());
    let mut changed = false;
    let r: Result<pb::ServiceReport, (pb::FailureKind, String)> = match m.cmd {
        Some(Cmd::Ping(_)) => {
            let _ = tx
                .send(pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Result(pb::CommandResult {
                        command_id: id,
                        ok: true,
                        ..Default::default()
                    })),
                })
                .await;
            return;
        }
        Some(Cmd::Stage(s)) => match s.definition {
            None => Err((
                pb::FailureKind::Invalid,
                "stage without a definition".into(),
            )),
            Some(def) => {
                let digest = def
                    .artifact
                    .as_ref()
                    .map(|a| a.digest.clone())
                    .unwrap_or_default();
                match fetch(channel, &digest).await {
                    Ok(n) => {
                        counters.fetched_bytes.fetch_add(n, Ordering::Relaxed);
                        state.lock().map_err(|_| poisoned()).map(|mut st| {
                            st.staged.insert(
                                def.release.clone(),
                                Duration::from_millis(def.min_healthy_time_ms),
                            );
                            st.history(&def.release, "staged", "stage", "");
                            changed = true;
                            st.service_report()
                        })
                    }
                    Err(e) => Err((pb::FailureKind::StageFailed, e)),
                }
            }
        },
        Some(Cmd::Activate(a)) => {
            let bake = state.lock().map_err(|_| poisoned()).and_then(|mut st| {
                match st.staged.get(&a.release).copied() {
                    None => Err((
                        pb::FailureKind::Invalid,
                        format!("release {} is not staged", a.release),
                    )),
                    Some(bake) => {
                        st.phase = pb::Phase::Activating;
                        st.history(&a.release, "activating", &a.cause, "");
                        Ok(bake)
                    }
                }
            });
            match bake {
                Err(e) => Err(e),
                Ok(bake) => {
                    let _ = tx
                        .send(pb::AgentMessage {
                            msg: Some(pb::agent_message::Msg::Progress(pb::CommandProgress {
                                command_id: id.clone(),
                                service: a.service.clone(),
                                step: "activating".into(),
                            })),
                        })
                        .await;
                    tokio::time::sleep(restart).await;
                    if let Ok(mut st) = state.lock() {
                        st.previous = std::mem::take(&mut st.current);
                        st.current = a.release.clone();
                        st.phase = pb::Phase::Verifying;
                    }
                    // No bake, no wait (a timer, even a zero one, waits
                    // for the runtime's next tick).
                    if !bake.is_zero() {
                        tokio::time::sleep(bake).await;
                    }
                    state.lock().map_err(|_| poisoned()).map(|mut st| {
                        st.phase = pb::Phase::Probation;
                        st.history(&a.release, "verified", &a.cause, "");
                        changed = true;
                        st.service_report()
                    })
                }
            }
        }
        Some(Cmd::Commit(c)) => state.lock().map_err(|_| poisoned()).and_then(|mut st| {
            if st.current != c.release {
                return Err((
                    pb::FailureKind::Invalid,
                    format!("{} is not the current release", c.release),
                ));
            }
            st.phase = pb::Phase::Idle;
            st.last_known_good = c.release.clone();
            st.history(&c.release, "committed", "coordinator", "");
            changed = true;
            Ok(st.service_report())
        }),
        Some(Cmd::Rollback(r)) => state.lock().map_err(|_| poisoned()).map(|mut st| {
            let to = if r.to_release.is_empty() {
                st.last_known_good.clone()
            } else {
                r.to_release.clone()
            };
            let from = std::mem::replace(&mut st.current, to.clone());
            st.history(&from, "rolling_back", "coordinator", &r.reason);
            st.previous = from;
            st.phase = pb::Phase::Idle;
            st.last_known_good = to.clone();
            st.history(&to, "rolled_back", "coordinator", &r.reason);
            changed = true;
            st.service_report()
        }),
        None => Err((pb::FailureKind::Invalid, "empty command".into())),
    };
    // As an agent does: the change is reported, then the result sent.
    if changed {
        let _ = tx.send(report_msg(&state)).await;
        counters.reports.fetch_add(1, Ordering::Relaxed);
    }
    let _ = tx.send(result_msg(&id, r)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_sort_in_index_order() {
        let c = SwarmConfig::new("http://127.0.0.1:1", 12_000);
        assert_eq!(c.host(0), "s00001");
        assert!(c.host(8) < c.host(9) && c.host(998) < c.host(999));
    }

    #[test]
    fn history_keeps_the_newest_entries() {
        let mut s = HostState::new(&SwarmConfig::new("http://127.0.0.1:1", 1));
        for i in 0..(RECENT + 5) {
            s.history(&format!("v{i}"), "staged", "stage", "");
        }
        let r = s.service_report();
        assert_eq!(r.recent.len(), RECENT);
        assert_eq!(r.recent.last().map(|e| e.seq), Some((RECENT + 5) as u64));
    }
}
