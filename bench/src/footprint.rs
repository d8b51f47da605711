//! Agent footprint: idle RSS and CPU of a release `rollout-agent` managing 3
//! services, then RSS after many consecutive deploy+rollback cycles (a leak
//! check).
//!
//! The agent runs with its default configuration (report interval, log
//! level) against the in-process fake coordinator of `rollout-tests`, which
//! speaks the real agent protocol; each service is the sample service with an
//! HTTP check every 2 s (the spec default). RSS is `VmRSS` of
//! `/proc/<pid>/status`; CPU is the growth of utime+stime in `/proc/<pid>/stat`
//! over the idle window, as a share of one core. A cycle stages a new release
//! of one service, activates it (HTTP check every 100 ms, 100 ms healthy),
//! commits it, then rolls it back to the previous release.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rollout_proto::pb;
use rollout_proto::pb::coordinator_message::Cmd;
use rollout_tests::FakeCoordinator;

use crate::util::{self, BenchAgent, Block, Ctx, Figure, mib, note};

/// Options of `bench footprint`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Idle window in seconds (full: 600, quick: 15).
    #[arg(long)]
    pub idle_secs: Option<u64>,
    /// Deploy+rollback cycles (full: 1000, quick: 10).
    #[arg(long)]
    pub cycles: Option<usize>,
    /// Runs the `--runs` agents side by side instead of one after another:
    /// their idle windows open and close together (nothing else runs in
    /// them), then their cycles run at the same time.
    #[arg(long)]
    pub parallel: bool,
}

const SERVICES: [&str; 3] = ["svc-a", "svc-b", "svc-c"];

struct RunResult {
    idle_rss: f64,
    idle_anon: f64,
    idle_file: f64,
    /// Resident pages of the agent binary's own file (code, read-only data).
    idle_own_file: f64,
    idle_cpu: f64,
    /// The share of sled's I/O threads (`sled-io-*`, which wake every
    /// second whatever the load), from their scheduler time.
    idle_cpu_sled: f64,
    before_cycles_rss: f64,
    /// RSS after the first tenth of the cycles (code paths and allocator
    /// pools the cycles use are in by then).
    warm_rss: f64,
    after_cycles_rss: f64,
    after_anon: f64,
    after_file: f64,
    cycle_ms: f64,
}

/// Runs the benchmark and publishes its block.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<()> {
    let idle = Duration::from_secs(args.idle_secs.unwrap_or(if ctx.quick { 15 } else { 600 }));
    let cycles = args.cycles.unwrap_or(if ctx.quick { 10 } else { 1000 });
    let mut block = Block::start(
        "Agent footprint",
        format!(
            "3 services, idle window {} s, {cycles} deploy+rollback cycles",
            idle.as_secs()
        ),
    );
    let mut results = Vec::new();
    if args.parallel {
        note(format!("footprint: {} runs side by side", ctx.runs));
        let barrier = tokio::sync::Barrier::new(ctx.runs);
        let runs = (0..ctx.runs).map(|_| one_run(ctx, idle, cycles, Some(&barrier)));
        // The first failure drops the other runs (none is left at the barrier).
        results = futures::future::try_join_all(runs).await?;
    } else {
        for i in 0..ctx.runs {
            note(format!("footprint run {}/{}", i + 1, ctx.runs));
            results.push(one_run(ctx, idle, cycles, None).await?);
        }
    }
    block.finish();
    let col = |f: fn(&RunResult) -> f64| results.iter().map(f).collect::<Vec<_>>();
    let binary = ctx.bin("rollout-agent")?;
    let binary_mib = mib(std::fs::metadata(&binary)
        .with_context(|| binary.display().to_string())?
        .len());
    block.figures = vec![
        Figure::plain(
            "agent binary (MiB)",
            results.iter().map(|_| binary_mib).collect(),
        ),
        Figure::at_most("idle RSS (MiB)", col(|r| r.idle_rss), 8.0, "≤ 8 MiB"),
        Figure::plain("idle RssAnon: heap, stacks (MiB)", col(|r| r.idle_anon)),
        Figure::plain("idle RssFile: binary, libc (MiB)", col(|r| r.idle_file)),
        Figure::plain(
            "of which the agent binary's own file (MiB)",
            col(|r| r.idle_own_file),
        ),
        Figure::at_most(
            "idle CPU (% of one core)",
            col(|r| r.idle_cpu),
            0.1,
            "≤ 0.1 %",
        ),
        Figure::plain(
            "of which sled's I/O threads (% of one core)",
            col(|r| r.idle_cpu_sled),
        ),
        Figure::plain("RSS before the cycles (MiB)", col(|r| r.before_cycles_rss)),
        Figure::plain(
            format!("RSS after {cycles} cycles (MiB)"),
            col(|r| r.after_cycles_rss),
        ),
        Figure::at_most(
            format!("RSS growth over {cycles} cycles (MiB)"),
            col(|r| r.after_cycles_rss - r.before_cycles_rss),
            1.0,
            "≤ 1 MiB (after 1,000 cycles)",
        ),
        Figure::plain(
            "of which RssAnon (MiB)",
            col(|r| r.after_anon - r.idle_anon),
        ),
        Figure::plain(
            "of which RssFile (MiB)",
            col(|r| r.after_file - r.idle_file),
        ),
        Figure::plain(
            format!(
                "RSS growth from cycle {} to {cycles} (MiB)",
                warm_up(cycles)
            ),
            col(|r| r.after_cycles_rss - r.warm_rss),
        ),
        Figure::plain("one deploy+rollback cycle (ms)", col(|r| r.cycle_ms)),
    ];
    ctx.publish(&block)
}

/// The cycle after which RSS is read a second time: a tenth of the way.
fn warm_up(cycles: usize) -> usize {
    (cycles / 10).max(1).min(cycles)
}

fn definition(
    service: &str,
    release: &str,
    digest: &str,
    port: u16,
    fast: bool,
) -> pb::ServiceDefinition {
    let mut d = rollout_tests::sample_definition(service, release, digest, port);
    for h in &mut d.health_checks {
        h.interval_ms = if fast { 100 } else { 2000 };
    }
    d.min_healthy_time_ms = if fast { 100 } else { 300 };
    d
}

async fn deploy(fake: &FakeCoordinator, host: &str, def: pb::ServiceDefinition) -> Result<()> {
    let service = def.service.clone();
    let release = def.release.clone();
    fake.stage(host, def).await?;
    let r = fake.activate(host, &service, &release).await?;
    if !r.ok {
        bail!("activate {service} {release} failed: {}", r.error);
    }
    fake.commit(host, &service, &release).await?;
    Ok(())
}

/// One agent's run. With `together`, waits for the other runs before the
/// idle window opens and after it closes.
async fn one_run(
    ctx: &Ctx,
    idle: Duration,
    cycles: usize,
    together: Option<&tokio::sync::Barrier>,
) -> Result<RunResult> {
    let fake = FakeCoordinator::start().await?;
    let host = "footprint";
    let agent = BenchAgent::start(ctx, host, &fake.url(), &[], "").await?;
    fake.wait_connected(host, 1).await?;
    let pid = agent.pid().context("agent pid")?;
    let ports = rollout_tests::free_ports(SERVICES.len());
    let digest = fake.add_artifact(rollout_tests::sample_artifact(&["version=r0"]));
    for (svc, port) in SERVICES.iter().zip(&ports) {
        deploy(&fake, host, definition(svc, "r0", &digest, *port, false))
            .await
            .with_context(|| agent.log())?;
    }
    // Let start-up work settle before the idle window opens.
    tokio::time::sleep(Duration::from_secs(if ctx.quick { 2 } else { 10 })).await;
    if let Some(b) = together {
        b.wait().await;
    }
    let threads_a = util::cpu_ns_by_thread(pid)?;
    let a = util::sample_proc(pid)?;
    tokio::time::sleep(idle).await;
    let b = util::sample_proc(pid)?;
    let threads_b = util::cpu_ns_by_thread(pid)?;
    if let Some(b) = together {
        b.wait().await;
    }
    let idle_cpu = util::cpu_percent(&a, &b);
    let idle_rss = mib(b.rss_bytes);
    let (idle_anon, idle_file) = (mib(b.rss_anon_bytes), mib(b.rss_file_bytes));
    let by_file = util::rss_by_file(pid)?;
    let exe = std::fs::read_link(format!("/proc/{pid}/exe"))?;
    let idle_own_file = mib(by_file
        .get(&exe.display().to_string())
        .copied()
        .unwrap_or(0));
    note(format!(
        "idle RssFile by file: {}",
        by_file
            .iter()
            .map(|(path, bytes)| format!("{path} {:.0} KiB", *bytes as f64 / 1024.0))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    // Each thread group's share of one core over the idle window.
    let window_ns = b.at.duration_since(a.at).as_nanos().max(1) as f64;
    let share = |group: &str| {
        let ns = |m: &std::collections::BTreeMap<String, u64>| m.get(group).copied().unwrap_or(0);
        ns(&threads_b).saturating_sub(ns(&threads_a)) as f64 / window_ns * 100.0
    };
    let idle_cpu_sled = share("sled-io");
    note(format!(
        "idle CPU by thread: {}",
        threads_b
            .keys()
            .map(|group| format!("{group} {:.4} %", share(group)))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    note(format!(
        "idle: RSS {idle_rss:.2} MiB, CPU {idle_cpu:.3} % over {} s",
        idle.as_secs()
    ));

    let svc = SERVICES[0];
    let port = ports[0];
    let started = Instant::now();
    let mut warm_rss = idle_rss;
    for k in 1..=cycles {
        let release = format!("c{k}");
        deploy(&fake, host, definition(svc, &release, &digest, port, true))
            .await
            .with_context(|| format!("cycle {k}\n{}", util::tail(&agent.log(), 40)))?;
        let r = fake
            .command(
                host,
                Cmd::Rollback(pb::Rollback {
                    service: svc.into(),
                    to_release: String::new(),
                    reason: "benchmark cycle".into(),
                }),
            )
            .await?;
        if !r.ok {
            bail!("cycle {k}: rollback failed: {}", r.error);
        }
        if k == warm_up(cycles) {
            warm_rss = mib(util::sample_proc(pid)?.rss_bytes);
        }
        if k % 100 == 0 {
            note(format!(
                "cycle {k}/{cycles}: RSS {:.2} MiB",
                mib(util::sample_proc(pid)?.rss_bytes)
            ));
        }
    }
    let cycle_ms = started.elapsed().as_secs_f64() * 1000.0 / cycles.max(1) as f64;
    // The same settling as before the idle window, so both readings compare.
    tokio::time::sleep(Duration::from_secs(if ctx.quick { 2 } else { 10 })).await;
    let after = util::sample_proc(pid)?;
    let after_cycles_rss = mib(after.rss_bytes);
    note(format!(
        "after {cycles} cycles: RSS {after_cycles_rss:.2} MiB ({cycle_ms:.0} ms per cycle)"
    ));
    Ok(RunResult {
        idle_rss,
        idle_anon,
        idle_file,
        idle_own_file,
        idle_cpu,
        idle_cpu_sled,
        before_cycles_rss: idle_rss,
        warm_rss,
        after_cycles_rss,
        after_anon: mib(after.rss_anon_bytes),
        after_file: mib(after.rss_file_bytes),
        cycle_ms,
    })
}
