//! Orchestration overhead: the wall time of a rollout over N hosts against
//! its physical limit, ⌈N/batch⌉ × (restart + bake), and the coordinator's
//! share of the difference per batch.
//!
//! A fresh release coordinator per N. Hosts are real release `rollout-agent`
//! processes (each with its own data directory and the sample service on its
//! own port; used for the `--agents` sizes, default 10 and 100) or swarm
//! sessions ([`crate::swarm`], used for the `--swarm` sizes, default 1,000),
//! whose no-op service "restarts" in `--swarm-restart` (default 100 ms).
//! Batches are 10 % of the hosts (`batch_size` = ⌈N/10⌉, `max_unavailable`
//! the same), `min_healthy_time` 0 s and 2 s (the bake). A warm-up rollout
//! (v1) first puts the service on every host, so each measured rollout
//! restarts a running service.
//!
//! Every figure comes from timestamps: the coordinator's events (`rollout
//! events --output json`: `created`, `running`, `batch_started`,
//! `batch_done`, `succeeded`) and each host's own history (`activating` →
//! `verified` for this rollout; over the admin socket for real agents, as
//! its reports carry it for a swarm session):
//!
//! * batch phase = last `batch_done` − first `batch_started`;
//! * physical limit = Σ over batches of the slowest host's agent-side
//!   `activating` → `verified` (the restart plus the bake; for the swarm,
//!   the simulated restart and bake as the session's timers delivered them,
//!   which fire on the runtime's next millisecond tick and later when the
//!   swarm's process is busy), which is ⌈N/batch⌉ × (restart + bake) when
//!   all restarts take the same time;
//! * coordinator overhead = batch phase − physical limit, per batch and as a
//!   share of the limit (target at N = 1,000: ≤ 5 % and ≤ 50 ms per batch);
//! * the overhead inside batches is split by the batch's last marks
//!   (`batch_started` → last `activating` → last `probation`, less the
//!   restart + bake → last `committed` → `batch_done`), mean per batch.
//!   It is exact when the batch's hosts are journaled `activating` together
//!   (all staged and connected when the batch starts); a host activated on
//!   its own later (staged late, reconnecting) moves the last `activating`
//!   mark, and the Activate phase can then come out short, even negative.
//!   The coordinator writes a batch's start with its ready hosts'
//!   `activating`, and its commits' results with its end, so the first and
//!   the last part are about 0 when all its hosts are ready;
//! * staging (artifact to every host before the first batch) and the
//!   end-to-end time `created` → `succeeded` are reported beside it.
//!
//! The coordinator's CPU over each rollout comes from `/proc/<pid>/stat`.
//!
//! After each rollout, the floor of a batch as the design builds it, on the
//! same machine and fleet: one durable write (the batch's start) and two
//! round trips to the batch's hosts (Activate, then Commit). Measured as the
//! median of [`FLOOR_SAMPLES`] `Ping`s through the coordinator to the
//! batch's hosts (the coordinator's own first send → last answer, the path
//! every command takes) and of as many appends of 4 KiB with `fdatasync`
//! in the coordinator's directory. The overhead above that floor is what the
//! coordinator's engine adds; the floor is what no engine of this design
//! avoids on this machine, with the hosts' side on the same cores.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rollout_proto::pb::control_service_client::ControlServiceClient;
use rollout_tests::cluster::CoordinatorProc;

use crate::swarm::{Swarm, SwarmConfig, raise_nofile};
use crate::util::{self, BenchAgent, Block, Ctx, Figure, SpecParams, note};

/// Options of `bench overhead`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Real agent counts, comma-separated (full: 10,100; quick: 5; 0 = none).
    #[arg(long, value_delimiter = ',')]
    pub agents: Vec<usize>,
    /// Swarm session counts, comma-separated (full: 1000; quick: 50; 0 = none).
    #[arg(long, value_delimiter = ',')]
    pub swarm: Vec<usize>,
    /// min_healthy_time values (the bake), comma-separated (default 0s,2s).
    #[arg(long, value_delimiter = ',', value_parser = humantime::parse_duration)]
    pub min_healthy: Vec<Duration>,
    /// Simulated restart of the swarm's no-op service (default 100ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub swarm_restart: Option<Duration>,
}

/// Hosts under test.
enum Fleet {
    /// Host name and agent.
    Agents(Vec<(String, BenchAgent)>),
    Swarm(Swarm, Duration),
}

impl Fleet {
    fn label(&self) -> &'static str {
        match self {
            Fleet::Agents(_) => "real agents",
            Fleet::Swarm(..) => "swarm sessions",
        }
    }
}

/// One measured rollout.
#[derive(Debug, Clone)]
struct Measured {
    end_to_end_ms: f64,
    staging_ms: f64,
    batch_phase_ms: f64,
    limit_ms: f64,
    batches: usize,
    /// Mean of (batch_done − batch_started − slowest host's work), ms.
    in_batch_ms: f64,
    /// Time between a batch_done and the next batch_started, summed and
    /// divided by the number of batches (so in_batch + gap = per batch), ms.
    gap_ms: f64,
    /// Where the time inside batches goes, mean per batch ([`Phases`]).
    phases: Phases,
    coord_cpu: f64,
    /// The floor of a batch, measured after the rollout.
    floor: BatchFloor,
}

/// Pings and fsyncs taken for one [`BatchFloor`] (quick mode too: each is
/// milliseconds).
const FLOOR_SAMPLES: usize = 15;

/// The floor of one batch on this machine: medians, ms.
#[derive(Debug, Clone, Copy, Default)]
struct BatchFloor {
    /// A `Ping` to the batch's hosts and back, the coordinator's own time.
    ping_ms: f64,
    /// One 4 KiB append and `fdatasync` in the coordinator's directory.
    fsync_ms: f64,
}

impl BatchFloor {
    /// One durable write and two round trips to the batch's hosts.
    fn per_batch_ms(&self) -> f64 {
        2.0 * self.ping_ms + self.fsync_ms
    }
}

/// Measures [`BatchFloor`] against `hosts` (one batch) of a running fleet.
async fn batch_floor(
    client: &mut ControlServiceClient<tonic::transport::Channel>,
    coord: &CoordinatorProc,
    hosts: &[String],
) -> Result<BatchFloor> {
    let mut pings = Vec::with_capacity(FLOOR_SAMPLES);
    for _ in 0..FLOOR_SAMPLES {
        let p = crate::fanout::ping(client, hosts, hosts.len())
            .await
            .context("a Ping to a batch's hosts")?;
        pings.push(p.fanout_ms);
    }
    let path = coord.dir.path().join("bench-fsync-probe");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let page = [0x5au8; 4096];
    let mut fsyncs = Vec::with_capacity(FLOOR_SAMPLES);
    for _ in 0..FLOOR_SAMPLES {
        let t = Instant::now();
        f.write_all(&page)?;
        f.sync_data()?;
        fsyncs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    drop(f);
    std::fs::remove_file(&path)?;
    let median = |v: &[f64]| util::Stats::of(v).map_or(f64::NAN, |s| s.median);
    Ok(BatchFloor {
        ping_ms: median(&pings),
        fsync_ms: median(&fsyncs),
    })
}

/// The inside of a batch, from the coordinator's events (ms, mean per
/// batch): `batch_started` → last `activating` (journaling the batch before
/// any Activate leaves); → last `probation`, less the slowest host's
/// restart + bake (the Activate round trips and journaling their results);
/// → last `committed` (the Commit round trips and their journal write);
/// → `batch_done`.
#[derive(Debug, Clone, Copy, Default)]
struct Phases {
    journal_start_ms: f64,
    activate_ms: f64,
    commit_ms: f64,
    done_ms: f64,
}

/// [`Phases`] of one rollout's events, `(at_ms, host, kind)` in the
/// journal's order; `work[i]` is batch i's slowest restart + bake. A batch
/// is the events between its `batch_started` and its `batch_done` in that
/// order (not by timestamp: one batch's end and the next one's start can
/// share a millisecond). Batches missing one of the marks are left out.
fn phases(events: &[(i64, String, String)], work: &[f64]) -> Phases {
    let mut sum = Phases::default();
    let mut counted = 0usize;
    let mut batch = 0usize;
    // The open batch's start and its last activating, probation, committed.
    let mut open: Option<(f64, [Option<f64>; 3])> = None;
    for (at, _, kind) in events {
        let at = *at as f64;
        match (kind.as_str(), open.as_mut()) {
            ("batch_started", _) => open = Some((at, [None; 3])),
            ("activating", Some((_, m))) => m[0] = Some(at),
            ("probation", Some((_, m))) => m[1] = Some(at),
            ("committed", Some((_, m))) => m[2] = Some(at),
            ("batch_done", Some(&mut (start, [Some(act), Some(prob), Some(com)]))) => {
                sum.journal_start_ms += act - start;
                sum.activate_ms += prob - act - work.get(batch).copied().unwrap_or(0.0);
                sum.commit_ms += com - prob;
                sum.done_ms += at - com;
                counted += 1;
                open = None;
                batch += 1;
            }
            ("batch_done", _) => {
                open = None;
                batch += 1;
            }
            _ => {}
        }
    }
    let k = counted.max(1) as f64;
    Phases {
        journal_start_ms: sum.journal_start_ms / k,
        activate_ms: sum.activate_ms / k,
        commit_ms: sum.commit_ms / k,
        done_ms: sum.done_ms / k,
    }
}

/// One figure's value from a measured rollout.
type Column = fn(&Measured) -> f64;

impl Measured {
    fn overhead_ms(&self) -> f64 {
        self.batch_phase_ms - self.limit_ms
    }
    fn per_batch_ms(&self) -> f64 {
        self.overhead_ms() / self.batches.max(1) as f64
    }
    fn percent(&self) -> f64 {
        self.share(self.overhead_ms())
    }
    /// `ms` as a share of the limit, %.
    fn share(&self, ms: f64) -> f64 {
        if self.limit_ms > 0.0 {
            100.0 * ms / self.limit_ms
        } else {
            f64::INFINITY
        }
    }
    /// The floor of every batch, as a share of the limit, %.
    fn floor_percent(&self) -> f64 {
        self.share(self.floor.per_batch_ms() * self.batches as f64)
    }
}

/// Runs the benchmark and publishes one block per (N, min_healthy_time).
pub async fn run(ctx: &Ctx, args: &Args) -> Result<()> {
    let pick = |given: &[usize], quick: usize, full: &[usize]| -> Vec<usize> {
        let v = if given.is_empty() {
            if ctx.quick {
                vec![quick]
            } else {
                full.to_vec()
            }
        } else {
            given.to_vec()
        };
        v.into_iter().filter(|n| *n > 0).collect()
    };
    let agents = pick(&args.agents, 5, &[10, 100]);
    let swarm = pick(&args.swarm, 50, &[1000]);
    let bakes = if args.min_healthy.is_empty() {
        vec![Duration::ZERO, Duration::from_secs(2)]
    } else {
        args.min_healthy.clone()
    };
    let restart = args.swarm_restart.unwrap_or(Duration::from_millis(100));
    for n in agents {
        one_size(ctx, n, false, &bakes, restart).await?;
    }
    for n in swarm {
        one_size(ctx, n, true, &bakes, restart).await?;
    }
    Ok(())
}

async fn one_size(
    ctx: &Ctx,
    n: usize,
    use_swarm: bool,
    bakes: &[Duration],
    swarm_restart: Duration,
) -> Result<()> {
    raise_nofile(n as u64 + 1024)?;
    let coord = CoordinatorProc::start().await?;
    let cfg_path = coord.dir.path().join("coordinator.toml");
    let pid = util::find_pid(&cfg_path.display().to_string())
        .context("cannot find the coordinator's pid")?;
    let work = tempfile::tempdir()?;
    note(format!(
        "overhead: starting {n} {}",
        if use_swarm {
            "swarm sessions"
        } else {
            "agents"
        }
    ));
    let fleet = if use_swarm {
        let mut cfg = SwarmConfig::new(&coord.url(), n);
        cfg.restart = swarm_restart;
        cfg.prefix = "h".into();
        Fleet::Swarm(Swarm::start(cfg).await?, swarm_restart)
    } else {
        let mut agents = Vec::new();
        for (i, port) in rollout_tests::free_ports(n).into_iter().enumerate() {
            let env = vec![("PORT".to_string(), port.to_string())];
            let host = format!("h{:05}", i + 1);
            let agent =
                BenchAgent::start(ctx, &host, &coord.url(), &env, "[labels]\nrole = \"web\"")
                    .await?;
            agents.push((host, agent));
        }
        util::poll(
            "every agent connected",
            Duration::from_secs(60 + n as u64),
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
        Fleet::Agents(agents)
    };
    let batch = n.div_ceil(10);
    let sample = ctx.bin("sample-service")?;
    let mut release_no = 0usize;
    let mut next_spec = |bake: Duration, warm_up: bool| -> Result<(String, PathBuf)> {
        release_no += 1;
        let release = format!("v{release_no}");
        let art = util::write_sample_artifact(work.path(), &release, &[])?;
        // The warm-up tolerates hosts failing (a loaded machine); a measured
        // rollout does not, so a failure ends the benchmark with its reason.
        let failures = if warm_up {
            "\"50%\"\nauto_rollback = false"
        } else {
            "0"
        };
        let strategy = format!(
            "batch_size = {batch}\nmax_unavailable = {batch}\nmax_failures = {failures}\nmin_healthy_time = \"{}ms\"\nhealthy_deadline = \"60s\"\ncommit_deadline = \"30m\"\n",
            bake.as_millis()
        );
        let text = SpecParams {
            service: "web",
            release: &release,
            artifact: &art,
            sample: &sample,
            port_var: "PORT",
            extra_argv: &[],
            strategy: &strategy,
            check: util::CheckTolerance::Loose,
        }
        .toml();
        let p = work.path().join(format!("{release}.toml"));
        std::fs::write(&p, text)?;
        Ok((release, p))
    };
    // Warm-up: the service runs everywhere before the measured rollouts.
    let (_, spec) = next_spec(Duration::ZERO, true)?;
    rollout(&coord, &spec, n, Duration::ZERO).await?;
    // The floor's pings go to the first batch's hosts (name order).
    let mut names: Vec<String> = coord
        .json(&["hosts"])?
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|h| h["host"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names.truncate(batch);
    if names.len() != batch {
        bail!(
            "the coordinator lists {} hosts, fewer than a batch of {batch}",
            names.len()
        );
    }
    let mut client = crate::fanout::control_client(coord.url()).await?;
    for bake in bakes {
        let mut block = Block::start(
            format!(
                "Orchestration overhead, N = {n} {}, min_healthy_time {} s",
                fleet.label(),
                bake.as_secs_f64()
            ),
            format!(
                "{n} {}, batches of {batch} (10 %), min_healthy_time {} ms{}",
                fleet.label(),
                bake.as_millis(),
                match &fleet {
                    Fleet::Swarm(_, r) => format!(", simulated restart {} ms", r.as_millis()),
                    Fleet::Agents(_) => ", sample service with an HTTP check every 100 ms".into(),
                }
            ),
        );
        let mut runs = Vec::new();
        for i in 0..ctx.runs {
            note(format!(
                "overhead N={n} bake={}ms: run {}/{}",
                bake.as_millis(),
                i + 1,
                ctx.runs
            ));
            let (release, spec) = next_spec(*bake, false)?;
            let before = util::sample_proc(pid)?;
            let id = rollout(&coord, &spec, n, *bake).await?;
            let after = util::sample_proc(pid)?;
            let mut m = measure(&coord, &fleet, &id, &release).await?;
            m.coord_cpu = util::cpu_percent(&before, &after);
            m.floor = batch_floor(&mut client, &coord, &names).await?;
            note(format!(
                "  {} batches: batch phase {:.0} ms, limit {:.0} ms, overhead {:.1} ms/batch ({:.1} %); floor {:.1} ms/batch (ping {:.2} ms, fsync {:.2} ms)",
                m.batches,
                m.batch_phase_ms,
                m.limit_ms,
                m.per_batch_ms(),
                m.percent(),
                m.floor.per_batch_ms(),
                m.floor.ping_ms,
                m.floor.fsync_ms,
            ));
            runs.push(m);
        }
        block.finish();
        let col = |f: &dyn Fn(&Measured) -> f64| runs.iter().map(f).collect::<Vec<_>>();
        let target = use_swarm && n >= 1000;
        block.figures = vec![
            Figure::plain(
                "end to end, created → succeeded (s)",
                col(&|m| m.end_to_end_ms / 1000.0),
            ),
            Figure::plain(
                "staging before batch 0 (s)",
                col(&|m| m.staging_ms / 1000.0),
            ),
            Figure::plain("batch phase (s)", col(&|m| m.batch_phase_ms / 1000.0)),
            Figure::plain(
                "physical limit ⌈N/batch⌉ × (restart + bake) (s)",
                col(&|m| m.limit_ms / 1000.0),
            ),
            if target {
                Figure::at_most(
                    "coordinator overhead (% of the limit)",
                    col(&|m| m.percent()),
                    5.0,
                    "≤ 5 % (at 1,000)",
                )
            } else {
                Figure::plain(
                    "coordinator overhead (% of the limit)",
                    col(&|m| m.percent()),
                )
            },
            if target {
                Figure::at_most(
                    "coordinator overhead per batch (ms)",
                    col(&|m| m.per_batch_ms()),
                    50.0,
                    "≤ 50 ms (at 1,000)",
                )
            } else {
                Figure::plain(
                    "coordinator overhead per batch (ms)",
                    col(&|m| m.per_batch_ms()),
                )
            },
        ];
        let parts: [(&str, Column); 12] = [
            ("  of which inside batches (ms per batch)", |m| {
                m.in_batch_ms
            }),
            ("  of which between batches (ms per batch)", |m| m.gap_ms),
            (
                "  inside: batch_started → hosts journaled activating (ms)",
                |m| m.phases.journal_start_ms,
            ),
            (
                "  inside: Activate round trips and results, less restart + bake (ms)",
                |m| m.phases.activate_ms,
            ),
            ("  inside: Commit round trips and journal (ms)", |m| {
                m.phases.commit_ms
            }),
            ("  inside: last committed → batch_done (ms)", |m| {
                m.phases.done_ms
            }),
            ("coordinator CPU during the rollout (% of one core)", |m| {
                m.coord_cpu
            }),
            (
                "floor of a batch: one fsync and two round trips to its hosts (ms)",
                |m| m.floor.per_batch_ms(),
            ),
            ("  floor: a Ping to the batch's hosts and back (ms)", |m| {
                m.floor.ping_ms
            }),
            ("  floor: a 4 KiB append and fdatasync (ms)", |m| {
                m.floor.fsync_ms
            }),
            ("floor of every batch (% of the limit)", |m| {
                m.floor_percent()
            }),
            ("coordinator overhead above the floor (ms per batch)", |m| {
                m.per_batch_ms() - m.floor.per_batch_ms()
            }),
        ];
        for (name, f) in parts {
            block.figures.push(Figure::plain(name, col(&f)));
        }
        block.notes.push(format!(
            "batches per rollout: {}; restart + bake per batch is the slowest host's own activating → verified time{}",
            runs.first().map_or(0, |m| m.batches),
            if use_swarm { " from the history its swarm session reports (the simulated restart plus min_healthy_time, as its timers fired)" } else { " from its history" }
        ));
        block.notes.push(format!(
            "floor of a batch, measured after each rollout on the same fleet: the medians of {FLOOR_SAMPLES} Pings through the coordinator to the first batch's {batch} hosts (the coordinator's first send → last answer) and of {FLOOR_SAMPLES} 4 KiB appends with fdatasync in its directory; a batch as designed takes one durable write (its start) and two round trips to its hosts (Activate, Commit), so no engine of this design does a batch in less on this machine"
        ));
        ctx.publish(&block)?;
    }
    if let Fleet::Swarm(s, _) = fleet {
        s.stop().await;
    }
    drop(coord);
    Ok(())
}

/// Deploys and waits for success; the rollout id.
async fn rollout(
    coord: &CoordinatorProc,
    spec: &std::path::Path,
    n: usize,
    bake: Duration,
) -> Result<String> {
    let id = util::deploy(coord, spec)?;
    let batches = n.div_ceil(n.div_ceil(10)) as u64;
    let deadline = Duration::from_secs(120 + n as u64 / 5)
        + Duration::from_secs(batches * (bake.as_secs() + 30));
    let st = util::wait_state(
        coord,
        &id,
        &["succeeded", "failed", "rolled_back"],
        deadline,
    )
    .await?;
    if st != "succeeded" {
        let failed: Vec<String> = coord
            .json(&["events", &id])?
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|e| e["kind"] == "host_failed")
                    .map(|e| format!("{}: {}", e["host"], e["message"]))
                    .collect()
            })
            .unwrap_or_default();
        bail!(
            "rollout {id} ended {st} (the load average is {}); hosts failed:\n{}",
            util::loadavg(),
            failed.join("\n")
        );
    }
    Ok(id)
}

/// Figures of one finished rollout from the coordinator's events and the
/// hosts' own histories.
async fn measure(
    coord: &CoordinatorProc,
    fleet: &Fleet,
    id: &str,
    release: &str,
) -> Result<Measured> {
    let events = util::events(coord, id)?;
    let first = |kind: &str| events.iter().find(|e| e.2 == kind).map(|e| e.0 as f64);
    let created = first("created").context("no created event")?;
    let running = first("running").context("no running event")?;
    let succeeded = first("succeeded").context("no succeeded event")?;
    let starts: Vec<f64> = events
        .iter()
        .filter(|e| e.2 == "batch_started")
        .map(|e| e.0 as f64)
        .collect();
    let dones: Vec<f64> = events
        .iter()
        .filter(|e| e.2 == "batch_done")
        .map(|e| e.0 as f64)
        .collect();
    if starts.is_empty() || starts.len() != dones.len() {
        bail!(
            "rollout {id}: {} batch_started but {} batch_done events",
            starts.len(),
            dones.len()
        );
    }
    // Which batch each host was activated in: the last `batch_started`
    // before its `activating` event in the journal's order.
    let mut batch_of: HashMap<String, usize> = HashMap::new();
    let mut started = 0usize;
    for (_, host, kind) in &events {
        match kind.as_str() {
            "batch_started" => started += 1,
            "activating" if started > 0 => {
                batch_of.insert(host.clone(), started - 1);
            }
            _ => {}
        }
    }
    // Host-side restart + bake per host: its own `activating` → `verified`
    // of this rollout, from the history its agent (or swarm session) keeps.
    let histories: Vec<(String, Vec<rollout_proto::pb::HistoryEntry>)> = match fleet {
        Fleet::Swarm(swarm, _) => swarm.histories(),
        Fleet::Agents(agents) => {
            let mut v = Vec::new();
            for (host, a) in agents {
                v.push((host.clone(), a.history("web").await?));
            }
            v
        }
    };
    let mut work: BTreeMap<String, f64> = BTreeMap::new();
    for (host, hist) in histories {
        let at = |event: &str| {
            hist.iter()
                .rev()
                .find(|e| e.event == event && e.release == release && e.cause == id)
                .map(|e| e.at_ms as f64)
        };
        let (Some(s), Some(v)) = (at("activating"), at("verified")) else {
            bail!("{host}: no activating/verified of {release} by {id} in its history");
        };
        work.insert(host, v - s);
    }
    let nb = starts.len();
    let mut slowest = vec![0.0f64; nb];
    for (h, i) in &batch_of {
        if let Some(ms) = work.get(h) {
            slowest[*i] = slowest[*i].max(*ms);
        }
    }
    let limit_ms: f64 = slowest.iter().sum();
    let in_batch: f64 = (0..nb).map(|i| dones[i] - starts[i] - slowest[i]).sum();
    let gaps: f64 = (1..nb).map(|i| starts[i] - dones[i - 1]).sum();
    Ok(Measured {
        end_to_end_ms: succeeded - created,
        staging_ms: running - created,
        batch_phase_ms: dones[nb - 1] - starts[0],
        limit_ms,
        batches: nb,
        in_batch_ms: in_batch / nb as f64,
        gap_ms: gaps / nb as f64,
        phases: phases(&events, &slowest),
        coord_cpu: 0.0,
        floor: BatchFloor::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(at: i64, host: &str, kind: &str) -> (i64, String, String) {
        (at, host.to_string(), kind.to_string())
    }

    /// Each phase runs from the last mark of the one before, inside its own
    /// batch; the restart + bake is taken out of the Activate phase.
    #[test]
    fn phases_split_each_batch_at_its_last_marks() {
        let events = vec![
            ev(1000, "", "batch_started"),
            ev(1001, "a", "activating"),
            ev(1002, "b", "activating"),
            ev(1110, "a", "probation"),
            ev(1120, "b", "probation"),
            ev(1125, "a", "committed"),
            ev(1130, "b", "committed"),
            ev(1133, "", "batch_done"),
            // The next batch starts, its host activating, in the same
            // millisecond.
            ev(1133, "", "batch_started"),
            ev(1133, "c", "activating"),
            ev(1250, "c", "probation"),
            ev(1260, "c", "committed"),
            ev(1261, "", "batch_done"),
        ];
        let p = phases(&events, &[100.0, 100.0]);
        // Batch 0: 2, 18, 10, 3; batch 1: 0, 17, 10, 1.
        assert_eq!(p.journal_start_ms, 1.0);
        assert_eq!(p.activate_ms, 17.5);
        assert_eq!(p.commit_ms, 10.0);
        assert_eq!(p.done_ms, 2.0);
    }
}
