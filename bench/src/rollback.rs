//! Rollback latency, host-level and fleet-level.
//!
//! **Host-level** (one release agent, driven by the in-process fake
//! coordinator of `rollout-tests`, sample service with an HTTP check every
//! 100 ms, 2 failures fail it, `min_healthy_time` 300 ms, `healthy_deadline`
//! 4 s): a prober polls the service's `/health` and `/version` every 2 ms. The
//! restart time is the gap, during a healthy activation (v1 → v1b), between
//! the last answer of v1 and the first of v1b. Two rollbacks follow, each from
//! the first `/health` answer 500 (no health check can fail earlier) to the
//! first answer of v1b again:
//!
//! - *unhealthy in probation* (what the target is about): v3 passes
//!   verification, so its activation succeeds and the host holds it in
//!   probation awaiting the commit, then turns unhealthy
//!   (`unhealthy_after_ms`, [`UNHEALTHY_AFTER_MS`] after its start); the agent
//!   rolls back on the unhealthy verdict at once. Also reported: the share of
//!   that latency before the agent's `rolling_back` history entry (detection).
//! - *never healthy*: v2 answers 500 from the start. The agent lets a release
//!   in verification fail its checks until `healthy_deadline` (a slow starter
//!   may), so this latency is bounded below by `healthy_deadline` by design
//!   and is not compared with the target.
//! - *crashes at start*: v4 exits at once (`bind_fail`), is restarted 0.5 s
//!   later by its `on-failure` policy and exits again: the agent fails it as a
//!   crash loop at the second exit, without waiting for `healthy_deadline`.
//!   Measured from the first probe that gets no answer (v1b stopped) to the
//!   first answer of v1b again, and compared with the target.
//!
//! **Fleet-level** (the real coordinator and N release agents named
//! `h001..`, batches of 10 %): v1 everywhere, then v2 which is healthy on all
//! hosts but the last batch; the last batch fails, the failure budget (0) is
//! exceeded and the coordinator rolls every updated host back (default
//! `rollback_parallelism`). The latency is from the coordinator's `halted`
//! event to the moment the prober (a sweep over every host's `/version`) has
//! seen every host serve v1 again.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rollout_proto::pb;
use rollout_tests::FakeCoordinator;
use rollout_tests::cluster::CoordinatorProc;

use crate::util::{self, BenchAgent, Block, Ctx, Figure, SpecParams, note};

/// When the probation release starts failing `/health`, after its start: long
/// enough for it to pass verification (start, one check, `min_healthy_time`
/// 300 ms) first, even on a loaded machine.
const UNHEALTHY_AFTER_MS: u64 = 3000;

/// One host-level run's figures (ms).
struct HostRun {
    restart: f64,
    probation: f64,
    detection: f64,
    never_healthy: f64,
    crash: f64,
}

/// Options of `bench rollback`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Agents of the fleet-level measurement (full: 100, quick: 5).
    #[arg(long)]
    pub hosts: Option<usize>,
    /// Skip the fleet-level measurement.
    #[arg(long)]
    pub host_only: bool,
}

/// Runs the benchmark and publishes its block.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<()> {
    let n = args.hosts.unwrap_or(if ctx.quick { 5 } else { 100 });
    let mut block = Block::start(
        "Rollback latency",
        if args.host_only {
            "host-level only".to_string()
        } else {
            format!("fleet-level over {n} agents, batches of 10 %, max_failures 0")
        },
    );
    let (mut restart, mut probation, mut detection, mut never, mut crash) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut fleet, mut updated) = (Vec::new(), Vec::new());
    for i in 0..ctx.runs {
        note(format!("rollback run {}/{}: host-level", i + 1, ctx.runs));
        let h = host_level(ctx).await?;
        note(format!(
            "restart {:.0} ms; rollback: unhealthy in probation {:.0} ms (detection {:.0} ms), never healthy {:.0} ms, crashes at start {:.0} ms",
            h.restart, h.probation, h.detection, h.never_healthy, h.crash
        ));
        restart.push(h.restart);
        probation.push(h.probation);
        detection.push(h.detection);
        never.push(h.never_healthy);
        crash.push(h.crash);
    }
    if !args.host_only {
        for i in 0..ctx.runs {
            note(format!(
                "rollback run {}/{}: fleet-level, {n} agents",
                i + 1,
                ctx.runs
            ));
            // A run the loaded machine breaks is reported, not fatal.
            match fleet_level(ctx, n).await {
                Ok((f, u)) => {
                    note(format!(
                        "fleet-level rollback {f:.0} ms ({u} hosts on v2 at the halt)"
                    ));
                    fleet.push(f);
                    updated.push(u as f64);
                }
                Err(e) => {
                    note(format!("fleet-level run {} failed: {e:#}", i + 1));
                    block.notes.push(format!(
                        "fleet-level run {} failed and is not counted: {}",
                        i + 1,
                        e.to_string().lines().next().unwrap_or_default()
                    ));
                }
            }
        }
    }
    block.finish();
    let budget: Vec<f64> = restart.iter().map(|r| r + 1000.0).collect();
    let budget_median = util::Stats::of(&budget).map_or(0.0, |s| s.median);
    block.figures = vec![
        Figure::plain("restart time (ms)", restart),
        Figure::at_most(
            "host-level, unhealthy in probation: first failed check → previous release serving (ms)",
            probation,
            budget_median,
            format!("≤ restart + 1 s ({} ms)", util::num(budget_median)),
        ),
        Figure::plain(
            "of which first failed check → agent's rolling_back entry (ms)",
            detection,
        ),
        Figure::plain(
            "host-level, never healthy (bounded by healthy_deadline 4 s by design): first failed check → previous release serving (ms)",
            never,
        ),
        Figure::at_most(
            "host-level, crashes at start (a crash loop): first unanswered probe → previous release serving (ms)",
            crash,
            budget_median,
            format!("≤ restart + 1 s ({} ms)", util::num(budget_median)),
        ),
    ];
    if !args.host_only {
        block.figures.push(Figure::plain(
            format!("fleet-level, {n} agents: budget exceeded → all on the old release (ms)"),
            fleet,
        ));
        block.figures.push(Figure::plain(
            "hosts committed on the new release when the budget was exceeded",
            updated,
        ));
    }
    block.notes.push(
        "host-level start is the first unhealthy answer seen by a 2 ms prober, which is no later than the agent's first failed check (100 ms interval, 2 failures to fail)".into(),
    );
    block.notes.push(
        "a release that never passes its checks is rolled back when healthy_deadline (4 s) runs out, by design (a slow starter may fail checks until then), so its figure is not compared with the target".into(),
    );
    ctx.publish(&block)
}

/// What the prober saw at one instant.
#[derive(Debug, Clone)]
struct Probe {
    at: Instant,
    /// The same instant, Unix ms, to compare with the agent's history.
    unix_ms: i64,
    health: Option<u16>,
    version: Option<String>,
}

/// Polls one sample service until stopped.
struct Prober {
    stop: Arc<AtomicBool>,
    probes: Arc<Mutex<Vec<Probe>>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Prober {
    /// Starts probing, and returns once a probe has seen the service answer
    /// `/version`: what it served before the change under measurement.
    async fn start(port: u16) -> Result<Prober> {
        let stop = Arc::new(AtomicBool::new(false));
        let probes = Arc::new(Mutex::new(Vec::new()));
        let (s, seen) = (stop.clone(), probes.clone());
        let thread = std::thread::spawn(move || {
            // Bounded: at most ten minutes of probes.
            let end = Instant::now() + Duration::from_secs(600);
            while !s.load(Ordering::Relaxed) && Instant::now() < end {
                let health = util::http(port, "/health").map(|(st, _)| st);
                let version = util::served_version(port);
                let probe = Probe {
                    at: Instant::now(),
                    unix_ms: util::now_ms(),
                    health,
                    version,
                };
                if let Ok(mut v) = seen.lock() {
                    v.push(probe);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let prober = Prober {
            stop,
            probes,
            thread: Some(thread),
        };
        util::poll(
            "the prober's first answer",
            Duration::from_secs(10),
            Duration::from_millis(5),
            async || {
                let v = prober.probes.lock().ok()?;
                v.iter().any(|p| p.version.is_some()).then_some(())
            },
        )
        .await?;
        Ok(prober)
    }

    /// Keeps probing until `measure` finds its figure in the probes so far
    /// (up to `deadline`), then stops and returns the figure. The service
    /// being seen by another poller is not enough: this prober must have seen
    /// it too, or its probes end before the event they time.
    async fn finish_with<T>(
        self,
        what: &str,
        deadline: Duration,
        measure: impl Fn(&[Probe]) -> Option<T>,
    ) -> Result<T> {
        let found = util::poll(what, deadline, Duration::from_millis(5), async || {
            self.probes.lock().ok().and_then(|v| measure(&v))
        })
        .await;
        drop(self);
        found
    }
}

impl Drop for Prober {
    /// Stops the prober, on every path out of a measurement.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // A panicked prober has nothing more to give.
            let _ = t.join();
        }
    }
}

fn def(release: &str, digest: &str, port: u16) -> pb::ServiceDefinition {
    rollout_tests::sample_definition("web", release, digest, port)
}

async fn host_level(ctx: &Ctx) -> Result<HostRun> {
    let fake = FakeCoordinator::start().await?;
    let host = "rollback";
    let agent = BenchAgent::start(ctx, host, &fake.url(), &[], "").await?;
    fake.wait_connected(host, 1).await?;
    let port = rollout_tests::free_port();
    let d1 = fake.add_artifact(rollout_tests::sample_artifact(&["version=v1"]));
    let d1b = fake.add_artifact(rollout_tests::sample_artifact(&["version=v1b"]));
    let d2 = fake.add_artifact(rollout_tests::sample_artifact(&[
        "version=v2",
        "healthy=false",
    ]));
    let d3 = fake.add_artifact(rollout_tests::sample_artifact(&[
        "version=v3",
        &format!("unhealthy_after_ms={UNHEALTHY_AFTER_MS}"),
    ]));
    let d4 = fake.add_artifact(rollout_tests::sample_artifact(&[
        "version=v4",
        "bind_fail=true",
    ]));
    let activate = async |release: &str, digest: &str| -> Result<pb::CommandResult> {
        fake.stage(host, def(release, digest, port)).await?;
        fake.activate(host, "web", release).await
    };
    let r = activate("v1", &d1).await?;
    if !r.ok {
        bail!("v1 failed: {}\n{}", r.error, agent.log());
    }
    fake.commit(host, "web", "v1").await?;

    // Restart time: a healthy activation's gap between v1 and v1b.
    fake.stage(host, def("v1b", &d1b, port)).await?;
    let prober = Prober::start(port).await?;
    let r = fake.activate(host, "web", "v1b").await?;
    if !r.ok {
        bail!("v1b failed: {}", r.error);
    }
    let restart = prober
        .finish_with(
            "the prober to see v1 and then v1b",
            Duration::from_secs(10),
            |probes| {
                let first_new = probes.iter().position(|p| serves(p, "v1b"))?;
                let last_old = probes[..first_new].iter().rposition(|p| serves(p, "v1"))?;
                Some(ms(probes[first_new].at - probes[last_old].at))
            },
        )
        .await?;
    fake.commit(host, "web", "v1b").await?;

    // Host-level rollback: v2 answers 500 on /health.
    fake.stage(host, def("v2", &d2, port)).await?;
    let prober = Prober::start(port).await?;
    let r = fake.activate(host, "web", "v2").await?;
    if r.ok {
        bail!("the unhealthy v2 was accepted");
    }
    let never_healthy = prober
        .finish_with(
            "the prober to see v2 unhealthy and then v1b again",
            Duration::from_secs(10),
            |probes| {
                let first_fail = probes.iter().position(|p| p.health == Some(500))?;
                let back = probes[first_fail..].iter().find(|p| serves(p, "v1b"))?;
                Some(ms(back.at - probes[first_fail].at))
            },
        )
        .await?;
    let hist = agent.history("web").await.unwrap_or_default();
    if !hist
        .iter()
        .any(|h| h.release == "v2" && h.event == "rolling_back")
    {
        bail!("no rolling_back entry for v2 in the agent's history: {hist:?}");
    }

    // Host-level rollback in probation: v3 passes verification, then its
    // /health answers 500 from UNHEALTHY_AFTER_MS after its start.
    fake.stage(host, def("v3", &d3, port)).await?;
    let prober = Prober::start(port).await?;
    let r = fake.activate(host, "web", "v3").await?;
    if !r.ok {
        bail!(
            "v3 did not reach probation before turning unhealthy {UNHEALTHY_AFTER_MS} ms after its start: {}",
            r.error
        );
    }
    let (probation, first_fail_ms) = prober
        .finish_with(
            "the prober to see v3, v3 unhealthy and then v1b again",
            Duration::from_millis(UNHEALTHY_AFTER_MS) + Duration::from_secs(10),
            |probes| {
                let first_v3 = probes.iter().position(|p| serves(p, "v3"))?;
                let first_fail = first_v3
                    + probes[first_v3..]
                        .iter()
                        .position(|p| p.health == Some(500))?;
                let back = probes[first_fail..].iter().find(|p| serves(p, "v1b"))?;
                let fail = &probes[first_fail];
                Some((ms(back.at - fail.at), fail.unix_ms))
            },
        )
        .await?;
    let hist = agent.history("web").await.unwrap_or_default();
    let verdict = hist
        .iter()
        .find(|h| {
            h.release == "v3"
                && h.event == "rolling_back"
                && h.reason.contains("unhealthy in probation")
        })
        .with_context(|| {
            format!("no rolling_back entry for v3 unhealthy in probation in the agent's history: {hist:?}")
        })?;
    let detection = (verdict.at_ms - first_fail_ms) as f64;
    // The agent takes v4 once its rollback from v3 is over.
    util::poll(
        "the agent's rollback from v3 finished",
        Duration::from_secs(10),
        Duration::from_millis(20),
        async || {
            let hist = agent.history("web").await.unwrap_or_default();
            hist.last()
                .is_some_and(|h| h.event == "rolled_back" && h.release == "v1b")
                .then_some(())
        },
    )
    .await?;

    // Host-level rollback of a release that crashes at start: v4 cannot
    // bind, exits 2, is restarted 0.5 s later and exits again.
    fake.stage(host, def("v4", &d4, port)).await?;
    let prober = Prober::start(port).await?;
    let r = fake.activate(host, "web", "v4").await?;
    if r.ok {
        bail!("the crashing v4 was accepted");
    }
    if !r.error.contains("crash loop") {
        bail!("v4 failed, but not as a crash loop: {}", r.error);
    }
    let crash = prober
        .finish_with(
            "the prober to see v1b stop and then serve again",
            Duration::from_secs(10),
            |probes| {
                let first_gap = probes
                    .iter()
                    .position(|p| p.version.is_none() && p.health.is_none())?;
                let back = probes[first_gap..].iter().find(|p| serves(p, "v1b"))?;
                Some(ms(back.at - probes[first_gap].at))
            },
        )
        .await?;
    Ok(HostRun {
        restart,
        probation,
        detection,
        never_healthy,
        crash,
    })
}

/// Whether `p` saw the service serve `release`.
fn serves(p: &Probe, release: &str) -> bool {
    p.version.as_deref() == Some(release)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The fleet-level run: returns milliseconds from `halted` to all on v1.
async fn fleet_level(ctx: &Ctx, n: usize) -> Result<(f64, usize)> {
    let coord = CoordinatorProc::start().await?;
    let work = tempfile::tempdir()?;
    let batch = n.div_ceil(10);
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for (i, port) in rollout_tests::free_ports(n).into_iter().enumerate() {
        // The last batch (in name order) fails v2's health check.
        let healthy = i < n - batch;
        let env = vec![
            ("PORT".to_string(), port.to_string()),
            ("V2_HEALTHY".to_string(), healthy.to_string()),
        ];
        agents.push(
            BenchAgent::start(
                ctx,
                &format!("h{:03}", i + 1),
                &coord.url(),
                &env,
                "[labels]\nrole = \"web\"",
            )
            .await?,
        );
        ports.push(port);
    }
    util::poll(
        "every agent connected",
        Duration::from_secs(60),
        Duration::from_millis(200),
        async || {
            let v = coord.json(&["hosts"]).ok()?;
            let c = v
                .as_array()?
                .iter()
                .filter(|h| h["connected"] == true)
                .count();
            (c == n).then_some(())
        },
    )
    .await?;
    let sample = ctx.bin("sample-service")?;
    let strategy = format!(
        "batch_size = {batch}\nmax_unavailable = {batch}\nmax_failures = 0\nmin_healthy_time = \"300ms\"\nhealthy_deadline = \"20s\"\ncommit_deadline = \"10m\"\n"
    );
    let spec = |release: &str, conf: &[&str], extra: &[&str]| -> Result<std::path::PathBuf> {
        let art = util::write_sample_artifact(work.path(), release, conf)?;
        let text = SpecParams {
            service: "web",
            release,
            artifact: &art,
            sample: &sample,
            port_var: "PORT",
            extra_argv: extra,
            strategy: &strategy,
            check: util::CheckTolerance::Tight,
        }
        .toml();
        let p = work.path().join(format!("{release}.toml"));
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let id = util::deploy(&coord, &spec("v1", &[], &[])?)?;
    let deadline = Duration::from_secs(60 + 3 * n as u64);
    let st = util::wait_state(
        &coord,
        &id,
        &["succeeded", "failed", "rolled_back"],
        deadline,
    )
    .await?;
    if st != "succeeded" {
        let why: Vec<String> = coord
            .json(&["events", &id])
            .ok()
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter(|e| e["kind"] == "host_failed" || e["kind"] == "halted")
            .map(|e| format!("{} {}", e["host"], e["message"]))
            .collect();
        bail!("v1 rollout ended {st}: {}", why.join("; "));
    }
    for p in &ports {
        util::poll(
            "v1 everywhere",
            Duration::from_secs(30),
            Duration::from_millis(20),
            async || (util::served_version(*p).as_deref() == Some("v1")).then_some(()),
        )
        .await?;
    }

    // Watch every host from before v2 starts.
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    // Whole sweeps over every host so far.
    let sweeps = Arc::new(AtomicU64::new(0));
    let swept = sweeps.clone();
    let watch_ports = ports.clone();
    let watcher = std::thread::spawn(move || {
        // Per port: when it was last seen switching to v1 (Unix ms), and
        // whether it is on v1 now.
        let mut back: HashMap<u16, i64> = HashMap::new();
        let mut on_v1: HashMap<u16, bool> = watch_ports.iter().map(|p| (*p, true)).collect();
        let end = Instant::now() + Duration::from_secs(1200);
        while !s.load(Ordering::Relaxed) && Instant::now() < end {
            for p in &watch_ports {
                let v1 = util::served_version(*p).as_deref() == Some("v1");
                let was = on_v1.insert(*p, v1).unwrap_or(true);
                if v1 && !was {
                    back.insert(*p, util::now_ms());
                }
            }
            swept.fetch_add(1, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(5));
        }
        (back, on_v1)
    });
    let id2 = util::deploy(&coord, &spec("v2", &[], &["--healthy", "${V2_HEALTHY}"])?)?;
    let st = util::wait_state(
        &coord,
        &id2,
        &["succeeded", "failed", "rolled_back"],
        deadline,
    )
    .await;
    // The watcher must see the last hosts come back itself: once every host
    // serves v1, one whole sweep that starts after that sees them all.
    let all_v1 = util::poll(
        "every host serving v1 again",
        Duration::from_secs(60),
        Duration::from_millis(20),
        async || {
            ports
                .iter()
                .all(|p| util::served_version(*p).as_deref() == Some("v1"))
                .then_some(())
        },
    )
    .await;
    let from = sweeps.load(Ordering::Relaxed);
    let seen = util::poll(
        "the watcher's sweep over every host serving v1",
        Duration::from_secs(60),
        Duration::from_millis(5),
        async || (sweeps.load(Ordering::Relaxed) >= from + 2).then_some(()),
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    let (back, _) = watcher
        .join()
        .map_err(|_| anyhow::anyhow!("watcher panicked"))?;
    let st = st?;
    all_v1?;
    seen?;
    if st != "rolled_back" {
        bail!("v2 rollout ended {st}, expected rolled_back");
    }
    let ev = util::events(&coord, &id2)?;
    let halted = ev
        .iter()
        .find(|(_, _, k)| k == "halted")
        .map(|(t, _, _)| *t)
        .context("no halted event")?;
    let halted_ms = halted;
    let committed = ev
        .iter()
        .filter(|(t, _, k)| k == "committed" && *t <= halted_ms)
        .count();
    let last_back = back
        .values()
        .copied()
        .max()
        .context("no host switched back to v1")?;
    if back.len() < n - batch {
        note(format!(
            "only {} of {} updated hosts were seen leaving and returning to v1",
            back.len(),
            n - batch
        ));
    }
    drop(agents);
    Ok(((last_back - halted) as f64, committed))
}
