//! Fan-out: the time for a ping to reach all N connected sessions and for
//! every answer to return, and the coordinator's RSS and CPU while N sessions
//! report every 5 s.
//!
//! A fresh release coordinator (`rollout --insecure-dev serve`) per N; N
//! swarm sessions ([`crate::swarm`], one HTTP/2 connection each by default)
//! in this process. A ping is the `ControlService.Ping` RPC (`rollout ping`):
//! the coordinator sends a `Ping` command down every session's stream at once
//! and returns the wall time from the first send to the last answer
//! (`elapsed_us`, measured inside the coordinator) and each host's round trip.
//! Each run sends `--pings` pings one after another; p50/p99 are over the
//! pings of a run, and the table shows the median/min/max of those over the
//! runs. Then, with no pings, the coordinator's `VmRSS` and CPU (utime+stime
//! from `/proc/<pid>/stat`, share of one core) are sampled over
//! `--sample-secs` while the sessions report. Each process's CPU time over a
//! run's pings (utime+stime), divided by their number, is its CPU per ping.
//!
//! Then the floor ([`crate::floor`]): the same fan-out, as many runs and
//! pings, over N raw TCP connections between a server process and this one,
//! with no HTTP/2, gRPC or coordinator: what the kernel and tokio cost alone
//! on this machine.
//!
//! The sessions run on the same 2 cores as the coordinator, so the
//! coordinator's CPU and the fan-out times include that competition.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rollout_proto::pb;
use rollout_proto::pb::control_service_client::ControlServiceClient;
use rollout_tests::cluster::CoordinatorProc;

use crate::floor::Floor;
use crate::swarm::{Swarm, SwarmConfig, raise_nofile};
use crate::util::{self, Block, Ctx, Figure, mib, note};

/// Options of `bench fanout`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Session counts, comma-separated (full: 1000,10000; quick: 100).
    #[arg(long, value_delimiter = ',')]
    pub sessions: Vec<usize>,
    /// Pings per run (full: 50; quick: 10).
    #[arg(long)]
    pub pings: Option<usize>,
    /// Window sampling the coordinator's RSS/CPU, seconds (full: 60; quick: 5).
    #[arg(long)]
    pub sample_secs: Option<u64>,
    /// Sessions per HTTP/2 connection, 1 to 100 (default 1: one connection
    /// per session, as agents have).
    #[arg(long)]
    pub per_connection: Option<usize>,
}

/// The nearest-rank percentile of sorted values.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Runs the benchmark and publishes one block per N.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<()> {
    let sizes = if args.sessions.is_empty() {
        if ctx.quick {
            vec![100]
        } else {
            vec![1_000, 10_000]
        }
    } else {
        args.sessions.clone()
    };
    let pings = args.pings.unwrap_or(if ctx.quick { 10 } else { 50 }).max(1);
    let window = Duration::from_secs(args.sample_secs.unwrap_or(if ctx.quick { 5 } else { 60 }));
    for n in sizes {
        one_size(ctx, args, n, pings, window).await?;
    }
    Ok(())
}

pub(crate) struct Ping {
    /// Coordinator-side fan-out time (first send to last answer), ms.
    pub(crate) fanout_ms: f64,
    /// Client-side RPC time, ms.
    rpc_ms: f64,
    /// Per-host round trips, ms.
    rtts: Vec<f64>,
}

/// Pings every connected host (`hosts` empty) or `hosts`, through the
/// coordinator; fails unless all `n` answer.
pub(crate) async fn ping(
    client: &mut ControlServiceClient<tonic::transport::Channel>,
    hosts: &[String],
    n: usize,
) -> Result<Ping> {
    let started = Instant::now();
    let r = client
        .ping(pb::PingRequest {
            hosts: hosts.to_vec(),
            timeout_ms: 30_000,
        })
        .await
        .context("Ping RPC")?
        .into_inner();
    let rpc_ms = started.elapsed().as_secs_f64() * 1000.0;
    let failed: Vec<&pb::HostPing> = r.hosts.iter().filter(|h| !h.ok).collect();
    if r.hosts.len() != n || !failed.is_empty() {
        bail!(
            "a ping reached {} hosts, {} failed (first: {:?}); expected {n} answers",
            r.hosts.len(),
            failed.len(),
            failed.first().map(|h| (&h.host, &h.error))
        );
    }
    Ok(Ping {
        fanout_ms: r.elapsed_us as f64 / 1000.0,
        rpc_ms,
        rtts: r.hosts.iter().map(|h| h.rtt_us as f64 / 1000.0).collect(),
    })
}

/// A client of the coordinator's control API at `url`.
pub(crate) async fn control_client(
    url: String,
) -> Result<ControlServiceClient<tonic::transport::Channel>> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await?;
    Ok(ControlServiceClient::new(channel)
        .max_decoding_message_size(rollout_proto::MAX_MESSAGE_BYTES))
}

/// CPU time between two samples of one process, ms.
fn cpu_ms(a: &util::ProcSample, b: &util::ProcSample) -> f64 {
    b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64 * 1000.0 / util::clk_tck()
}

/// The floor's figures, one value per run.
struct FloorRuns {
    p50: Vec<f64>,
    p99: Vec<f64>,
    cpu_ms: Vec<f64>,
}

/// The same fan-out over raw TCP ([`crate::floor`]), as many runs and
/// pings as the gRPC one.
async fn floor_runs(ctx: &Ctx, n: usize, pings: usize) -> Result<FloorRuns> {
    note(format!("fanout N={n}: the raw TCP floor"));
    let exe = std::env::current_exe().context("this program's path, to start the floor server")?;
    let mut floor = Floor::start(&exe, n).await?;
    let server = floor.pid().context("the floor server has no pid")?;
    let me = std::process::id();
    floor.ping().await?;
    let mut out = FloorRuns {
        p50: vec![],
        p99: vec![],
        cpu_ms: vec![],
    };
    for _ in 0..ctx.runs {
        let (a, me_a) = (util::sample_proc(server)?, util::sample_proc(me)?);
        let mut fan = Vec::new();
        for _ in 0..pings {
            fan.push(floor.ping().await?);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (b, me_b) = (util::sample_proc(server)?, util::sample_proc(me)?);
        fan.sort_by(f64::total_cmp);
        out.p50.push(percentile(&fan, 0.50));
        out.p99.push(percentile(&fan, 0.99));
        out.cpu_ms
            .push((cpu_ms(&a, &b) + cpu_ms(&me_a, &me_b)) / pings as f64);
    }
    floor.stop().await;
    Ok(out)
}

async fn one_size(ctx: &Ctx, args: &Args, n: usize, pings: usize, window: Duration) -> Result<()> {
    let mut block = Block::start(
        format!("Fan-out to {n} sessions"),
        format!(
            "{n} swarm sessions ({} per HTTP/2 connection), reports every 5 s, {pings} pings per run, RSS/CPU window {} s",
            args.per_connection.unwrap_or(1).clamp(1, 100),
            window.as_secs()
        ),
    );
    // The coordinator holds one socket per connection; it inherits this limit.
    raise_nofile(n as u64 + 1024)?;
    let coord = CoordinatorProc::start().await?;
    let cfg_path = coord.dir.path().join("coordinator.toml");
    let pid = util::find_pid(&cfg_path.display().to_string())
        .context("cannot find the coordinator's pid")?;
    note(format!("fanout: starting {n} sessions"));
    let connect_started = Instant::now();
    let mut cfg = SwarmConfig::new(&coord.url(), n);
    cfg.per_connection = args.per_connection.unwrap_or(1);
    let swarm = Swarm::start(cfg).await?;
    let connect_s = connect_started.elapsed().as_secs_f64();
    note(format!(
        "fanout: {n} sessions connected in {connect_s:.1} s"
    ));
    let mut client = control_client(coord.url()).await?;
    // Warm-up (first-use allocations on both sides).
    ping(&mut client, &[], n).await?;
    let (mut p50, mut p99, mut max, mut rtt_p50, mut rtt_p99, mut rpc_p50) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    let me = std::process::id();
    let (mut coord_ms, mut swarm_ms) = (vec![], vec![]);
    for run in 0..ctx.runs {
        note(format!("fanout N={n}: run {}/{}", run + 1, ctx.runs));
        let mut fan = Vec::new();
        let mut rpc = Vec::new();
        let mut rtts = Vec::new();
        let (c0, s0) = (util::sample_proc(pid)?, util::sample_proc(me)?);
        for _ in 0..pings {
            let p = ping(&mut client, &[], n).await?;
            fan.push(p.fanout_ms);
            rpc.push(p.rpc_ms);
            rtts.extend(p.rtts);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (c1, s1) = (util::sample_proc(pid)?, util::sample_proc(me)?);
        coord_ms.push(cpu_ms(&c0, &c1) / pings as f64);
        swarm_ms.push(cpu_ms(&s0, &s1) / pings as f64);
        fan.sort_by(f64::total_cmp);
        rpc.sort_by(f64::total_cmp);
        rtts.sort_by(f64::total_cmp);
        p50.push(percentile(&fan, 0.50));
        p99.push(percentile(&fan, 0.99));
        max.push(fan.last().copied().unwrap_or(f64::NAN));
        rtt_p50.push(percentile(&rtts, 0.50));
        rtt_p99.push(percentile(&rtts, 0.99));
        rpc_p50.push(percentile(&rpc, 0.50));
    }
    note(format!(
        "fanout N={n}: sampling the coordinator for {} s",
        window.as_secs()
    ));
    let reports_before = swarm
        .counters
        .reports
        .load(std::sync::atomic::Ordering::Relaxed);
    let (a, me_a) = (util::sample_proc(pid)?, util::sample_proc(me)?);
    let mut peak_rss = a.rss_bytes;
    let end = Instant::now() + window;
    while Instant::now() < end {
        tokio::time::sleep(Duration::from_millis(500)).await;
        peak_rss = peak_rss.max(util::sample_proc(pid)?.rss_bytes);
    }
    let (b, me_b) = (util::sample_proc(pid)?, util::sample_proc(me)?);
    let reports = swarm
        .counters
        .reports
        .load(std::sync::atomic::Ordering::Relaxed)
        - reports_before;
    let coord_cpu = util::cpu_percent(&a, &b);
    let swarm_cpu = util::cpu_percent(&me_a, &me_b);
    let connected = swarm.connected();
    let errors = swarm
        .counters
        .stream_errors
        .load(std::sync::atomic::Ordering::Relaxed);
    swarm.stop().await;
    drop(coord);
    let floor = floor_runs(ctx, n, pings).await?;
    block.finish();
    let big = n >= 10_000;
    let target_ms = |name: &str, v: Vec<f64>| {
        if big {
            Figure::at_most(name, v, 200.0, "≤ 200 ms (at 10,000)")
        } else {
            Figure::plain(name, v)
        }
    };
    block.figures = vec![
        Figure::plain("fan-out to all, p50 (ms)", p50),
        target_ms("fan-out to all, p99 (ms)", p99),
        Figure::plain("fan-out to all, slowest (ms)", max),
        Figure::plain("Ping RPC seen by the client, p50 (ms)", rpc_p50),
        Figure::plain("per-host round trip, p50 (ms)", rtt_p50),
        Figure::plain("per-host round trip, p99 (ms)", rtt_p99),
        Figure::plain("CPU per ping, coordinator (ms of one core)", coord_ms),
        Figure::plain("CPU per ping, swarm (ms of one core)", swarm_ms),
        Figure::plain("floor: raw TCP fan-out, p50 (ms)", floor.p50),
        Figure::plain("floor: raw TCP fan-out, p99 (ms)", floor.p99),
        Figure::plain(
            "floor: CPU per ping, server + clients (ms of one core)",
            floor.cpu_ms,
        ),
    ];
    let rss = mib(b.rss_bytes);
    let peak = mib(peak_rss);
    if big {
        block.figures.push(Figure::at_most(
            "coordinator CPU, sessions reporting (% of one core)",
            vec![coord_cpu],
            100.0,
            "≤ 1 core (at 10,000)",
        ));
        block.figures.push(Figure::at_most(
            "coordinator peak RSS (MiB)",
            vec![peak],
            512.0,
            "≤ 512 MiB (at 10,000)",
        ));
    } else {
        block.figures.push(Figure::plain(
            "coordinator CPU, sessions reporting (% of one core)",
            vec![coord_cpu],
        ));
        block
            .figures
            .push(Figure::plain("coordinator peak RSS (MiB)", vec![peak]));
    }
    block.notes.push(format!(
        "{n} sessions connected in {connect_s:.1} s; {connected} still connected at the end, {errors} stream errors; {reports} reports in the {} s window ({:.0}/s)",
        window.as_secs(),
        reports as f64 / window.as_secs_f64().max(0.001)
    ));
    block.notes.push(format!(
        "coordinator RSS at the end of the window {rss:.1} MiB; the swarm process (all sessions) used {swarm_cpu:.1} % of one core on the same machine"
    ));
    block.notes.push(format!(
        "CPU per ping: utime+stime of each process over a run's pings divided by their number; it includes the reports that arrive during a ping and the 100 ms pause after it ({:.0} reports/s in all)",
        reports as f64 / window.as_secs_f64().max(0.001)
    ));
    block.notes.push(format!(
        "floor: the same fan-out over {n} raw TCP connections between a server process and this one, {} bytes each way, no HTTP/2, gRPC or coordinator (`bench fanout-floor-server`, src/floor.rs); timed inside the server; the same pings per run and pauses",
        crate::floor::FRAME
    ));
    block.notes.push(
        "fan-out time: measured inside the coordinator from the first Ping sent to the last answer (`rollout ping` prints it); round trips per host likewise; CPU/RSS from /proc of the coordinator process".into(),
    );
    if connected < n {
        bail!("only {connected} of {n} sessions were still connected at the end");
    }
    ctx.publish(&block)
}
