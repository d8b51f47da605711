//! Artifact staging: one large release to many hosts through the real
//! coordinator, against the limit set by this machine's loopback and disk
//! bandwidth measured in the same run.
//!
//! The artifact is a tar.gz (stored, not compressed) of the sample service's
//! `service.conf` and an incompressible payload. Wall time is from the
//! rollout's first event to its last `staged` event (coordinator clock);
//! `stage_parallelism` is the host count. Bytes sent, bytes read from the
//! artifact file and fetches come from the coordinator's
//! `rollout_artifact_bytes_sent_total`, `rollout_artifact_bytes_read_total` and
//! `rollout_artifact_fetches_total` (reads of the file = bytes read / size);
//! `/proc/<coordinator>/io` `read_bytes` shows what reached storage (the page
//! cache usually holds the artifact).
//!
//! The limit: the coordinator must push `hosts × size` over loopback and the
//! agents must write what ends in their data dirs (measured with a directory
//! walk afterwards). Loopback bandwidth is a plain TCP copy of `size` bytes.
//! Disk bandwidth is measured at the agents' own volume and concurrency, just
//! before the rollout: one thread per host writes its share of `2 × hosts ×
//! size` (each host keeps the artifact and the release unpacked from it) to a
//! new file in the temp dir and fsyncs it; the files stay until the run ends,
//! so the agents never write into memory the probe has just freed. The disk
//! time is what the agents wrote (directory walk) at that rate. A write of
//! one release by one thread after the run, into memory just freed, is
//! reported beside it (the limit of earlier runs). The limit is the larger of
//! the loopback and disk times (they overlap at best).

use std::io::{Read, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rollout_tests::cluster::CoordinatorProc;

use crate::util::{self, BenchAgent, Block, Ctx, Figure, SpecParams, mib, note};

/// Options of `bench staging`.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct Args {
    /// Release size in MiB (full: 200, quick: 5).
    #[arg(long)]
    pub size_mib: Option<u64>,
    /// Hosts (full: 20, quick: 3).
    #[arg(long)]
    pub hosts: Option<usize>,
    /// Pause before each run after the first (full: 30 s, quick: 0), so
    /// that every run starts with memory as cold as the first's: on a
    /// virtual machine whose host takes freed guest memory back within
    /// seconds, writing into memory the last run just freed is several times
    /// faster than writing into memory the host has taken back.
    #[arg(long)]
    pub cool_down_secs: Option<u64>,
}

struct RunResult {
    wall_s: f64,
    limit_s: f64,
    net_mibs: f64,
    disk_mibs: f64,
    one_release_mibs: f64,
    sent_mib: f64,
    fetches: f64,
    file_reads: f64,
    storage_read_mib: f64,
}

/// Runs the benchmark and publishes its block.
pub async fn run(ctx: &Ctx, args: &Args) -> Result<()> {
    let size = args.size_mib.unwrap_or(if ctx.quick { 5 } else { 200 });
    let n = args.hosts.unwrap_or(if ctx.quick { 3 } else { 20 });
    let cool_down =
        Duration::from_secs(
            args.cool_down_secs
                .unwrap_or(if ctx.quick { 0 } else { 30 }),
        );
    let mut block = Block::start(
        "Artifact staging",
        format!(
            "{size} MiB release to {n} hosts, stage_parallelism {n}, {} s between runs",
            cool_down.as_secs()
        ),
    );
    let mut results = Vec::new();
    for i in 0..ctx.runs {
        if i > 0 && !cool_down.is_zero() {
            note(format!("cooling down for {} s", cool_down.as_secs()));
            tokio::time::sleep(cool_down).await;
        }
        note(format!(
            "staging run {}/{}: {size} MiB to {n} hosts",
            i + 1,
            ctx.runs
        ));
        let r = one_run(ctx, size * 1024 * 1024, n).await?;
        note(format!(
            "wall {:.2} s, limit {:.2} s, sent {:.0} MiB in {} fetches",
            r.wall_s, r.limit_s, r.sent_mib, r.fetches
        ));
        results.push(r);
    }
    block.finish();
    let col = |f: fn(&RunResult) -> f64| results.iter().map(f).collect::<Vec<_>>();
    block.figures = vec![
        Figure::plain("wall time (s)", col(|r| r.wall_s)),
        Figure::plain("limit from loopback/disk bandwidth (s)", col(|r| r.limit_s)),
        Figure::at_most(
            "wall time / limit",
            col(|r| r.wall_s / r.limit_s),
            1.5,
            "≤ 1.5",
        ),
        Figure::plain("loopback TCP copy (MiB/s)", col(|r| r.net_mibs)),
        Figure::plain(
            "disk write+fsync of what the agents wrote, one writer per host (MiB/s)",
            col(|r| r.disk_mibs),
        ),
        Figure::plain(
            "disk write+fsync of one release, one writer (MiB/s)",
            col(|r| r.one_release_mibs),
        ),
        Figure::plain("coordinator artifact bytes sent (MiB)", col(|r| r.sent_mib)),
        Figure::plain("artifact fetches", col(|r| r.fetches)),
        Figure::at_most(
            "artifact file reads by the coordinator (bytes read / size)",
            col(|r| r.file_reads),
            1.0,
            "1 (read once)",
        ),
        Figure::plain(
            "coordinator reads reaching storage (MiB, /proc io read_bytes)",
            col(|r| r.storage_read_mib),
        ),
    ];
    let reads = util::Stats::of(&col(|r| r.file_reads)).map_or(0.0, |s| s.median);
    if reads > 1.01 {
        block.notes.push(format!(
            "finding: the coordinator read the artifact {reads:.2} times for {n} hosts: some downloads fell further behind the others than its chunk cache holds (`artifact_cache_bytes`, 64 MiB by default), so their chunks were read again"
        ));
    }
    ctx.publish(&block)
}

/// Fills `buf` with incompressible bytes (xorshift64*).
fn fill_random(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        let n = chunk.len();
        chunk.copy_from_slice(&v[..n]);
    }
}

/// Writes the release archive; returns its size.
fn write_artifact(path: &Path, size: u64) -> Result<u64> {
    let f = std::fs::File::create(path)?;
    let gz = flate2::write::GzEncoder::new(std::io::BufWriter::new(f), flate2::Compression::none());
    let mut tar = tar::Builder::new(gz);
    let conf = b"version=big\n";
    let mut h = tar::Header::new_gnu();
    h.set_size(conf.len() as u64);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "service.conf", &conf[..])?;
    let mut payload = vec![0u8; usize::try_from(size)?];
    fill_random(&mut payload, size);
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    tar.append_data(&mut h, "payload.bin", &payload[..])?;
    let mut w = tar.into_inner()?.finish()?;
    w.flush()?;
    drop(w);
    Ok(std::fs::metadata(path)?.len())
}

/// MiB/s of a plain TCP copy of `size` bytes over loopback.
fn loopback_bandwidth(size: u64) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let reader = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = listener.accept()?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n as u64;
        }
    });
    let mut chunk = vec![0u8; 256 * 1024];
    fill_random(&mut chunk, 7);
    let start = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    let mut left = size;
    while left > 0 {
        let n = usize::try_from(left.min(chunk.len() as u64))?;
        s.write_all(&chunk[..n])?;
        left -= n as u64;
    }
    drop(s);
    let got = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    let secs = start.elapsed().as_secs_f64();
    if got != size {
        bail!("loopback copy moved {got} of {size} bytes");
    }
    Ok(mib(size) / secs)
}

/// Files a disk probe wrote, removed when dropped.
struct ProbeFiles(Vec<std::path::PathBuf>);

impl Drop for ProbeFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// MiB/s of `writers` threads each writing its share of `bytes` to a new file
/// in `dir` and fsyncing it, timed from the first write to the last fsync.
/// The files stay until the returned [`ProbeFiles`] is dropped.
fn disk_bandwidth(dir: &Path, bytes: u64, writers: usize) -> Result<(f64, ProbeFiles)> {
    let writers = writers.max(1);
    let share = bytes / writers as u64;
    let mut chunk = vec![0u8; 1024 * 1024];
    fill_random(&mut chunk, 11);
    let chunk = std::sync::Arc::new(chunk);
    let start = Instant::now();
    let threads: Vec<_> = (0..writers)
        .map(|i| {
            let path = dir.join(format!("disk-probe-{i}.bin"));
            let chunk = std::sync::Arc::clone(&chunk);
            std::thread::spawn(move || -> std::io::Result<std::path::PathBuf> {
                let mut f = std::fs::File::create(&path)?;
                let mut left = share;
                while left > 0 {
                    let n = usize::try_from(left.min(chunk.len() as u64)).unwrap_or(chunk.len());
                    f.write_all(&chunk[..n])?;
                    left -= n as u64;
                }
                f.sync_all()?;
                Ok(path)
            })
        })
        .collect();
    let mut files = ProbeFiles(Vec::new());
    for t in threads {
        files.0.push(
            t.join()
                .map_err(|_| anyhow::anyhow!("disk probe writer panicked"))??,
        );
    }
    let secs = start.elapsed().as_secs_f64();
    Ok((mib(share * writers as u64) / secs, files))
}

/// Total size of the regular files under `dir`.
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for e in rd.flatten() {
        let Ok(ft) = e.file_type() else { continue };
        if ft.is_dir() {
            total += dir_bytes(&e.path());
        } else if ft.is_file() {
            total += e.metadata().map_or(0, |m| m.len());
        }
    }
    total
}

async fn one_run(ctx: &Ctx, payload: u64, n: usize) -> Result<RunResult> {
    let work = tempfile::tempdir()?;
    let art = work.path().join("big.tar.gz");
    let size = write_artifact(&art, payload)?;
    let metrics_port = rollout_tests::free_port();
    let coord =
        CoordinatorProc::start_with(&format!("metrics_listen = \"127.0.0.1:{metrics_port}\""))
            .await?;
    let coord_pid =
        util::find_pid(&coord.dir.path().display().to_string()).context("the coordinator's pid")?;
    let mut agents = Vec::new();
    for (i, port) in rollout_tests::free_ports(n).into_iter().enumerate() {
        let env = vec![("PORT".to_string(), port.to_string())];
        agents.push(
            BenchAgent::start(
                ctx,
                &format!("s{:03}", i + 1),
                &coord.url(),
                &env,
                "[labels]\nrole = \"web\"",
            )
            .await?,
        );
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
        "batch_size = {n}\nmax_unavailable = {n}\nstage_parallelism = {n}\nmin_healthy_time = \"0s\"\n"
    );
    let spec = work.path().join("big.toml");
    std::fs::write(
        &spec,
        SpecParams {
            service: "web",
            release: "big",
            artifact: &art,
            sample: &sample,
            port_var: "PORT",
            extra_argv: &[],
            strategy: &strategy,
            check: util::CheckTolerance::Loose,
        }
        .toml(),
    )?;
    // The disk probe runs before the rollout, at the volume the agents will
    // write (each host keeps the artifact and the release unpacked from it)
    // and one writer per host, and its files stay until the run ends: neither
    // it nor the agents can write into memory the other has just freed, which
    // is faster on a virtual machine whose host takes freed guest memory back
    // within seconds (BENCHMARKS.md, staging).
    let expected_bytes = 2 * size * n as u64;
    let (disk_mibs, probe_files) = disk_bandwidth(work.path(), expected_bytes, n)?;
    let sent0 = util::metric(metrics_port, "rollout_artifact_bytes_sent_total").unwrap_or(0.0);
    let read0 = util::metric(metrics_port, "rollout_artifact_bytes_read_total").unwrap_or(0.0);
    let fetch0 = util::metric(metrics_port, "rollout_artifact_fetches_total").unwrap_or(0.0);
    let io0 = util::proc_io(coord_pid).map_or(0, |(_, rb)| rb);
    let id = util::deploy(&coord, &spec)?;
    let deadline = Duration::from_secs(120 + mib(size) as u64 * n as u64 / 5);
    let ev = util::poll(
        "every host staged",
        deadline,
        Duration::from_millis(100),
        async || {
            let ev = util::events(&coord, &id).ok()?;
            let staged = ev.iter().filter(|e| e.2 == "staged").count();
            let failed = ev.iter().any(|e| e.2 == "host_failed" || e.2 == "halted");
            (staged == n || failed).then_some(ev)
        },
    )
    .await
    .with_context(|| util::tail(&coord.log(), 40))?;
    if let Some(f) = ev.iter().find(|e| e.2 == "host_failed" || e.2 == "halted") {
        bail!(
            "staging failed on {}: {:?}\n{}",
            f.1,
            ev,
            util::tail(&coord.log(), 40)
        );
    }
    let first = ev.iter().map(|e| e.0).min().unwrap_or(0);
    let last = ev
        .iter()
        .filter(|e| e.2 == "staged")
        .map(|e| e.0)
        .max()
        .unwrap_or(0);
    let wall_s = (last - first) as f64 / 1000.0;
    let sent =
        util::metric(metrics_port, "rollout_artifact_bytes_sent_total").unwrap_or(0.0) - sent0;
    let fetches =
        util::metric(metrics_port, "rollout_artifact_fetches_total").unwrap_or(0.0) - fetch0;
    let read =
        util::metric(metrics_port, "rollout_artifact_bytes_read_total").unwrap_or(0.0) - read0;
    let io1 = util::proc_io(coord_pid).map_or(0, |(_, rb)| rb);
    let disk_bytes: u64 = agents
        .iter()
        .map(|a| dir_bytes(&a.dir.path().join("data")))
        .sum();
    // Let the rollout finish before tearing down (not measured).
    let _ = util::wait_state(
        &coord,
        &id,
        &["succeeded", "failed", "rolled_back"],
        Duration::from_secs(120),
    )
    .await;
    let net_mibs = loopback_bandwidth(size)?;
    drop(agents);
    drop(probe_files);
    // The earlier runs' limit: one release by one writer, into memory just
    // freed.
    let (one_release_mibs, _) = disk_bandwidth(work.path(), size, 1)?;
    let net_s = mib(size) * n as f64 / net_mibs;
    let disk_s = mib(disk_bytes) / disk_mibs;
    note(format!(
        "disk write+fsync: {disk_mibs:.0} MiB/s for {:.0} MiB by {n} writers before the rollout (the agents wrote {:.0} MiB), {one_release_mibs:.0} MiB/s for one release's {:.0} MiB by one writer after it",
        mib(expected_bytes),
        mib(disk_bytes),
        mib(size)
    ));
    note(format!(
        "limit: loopback {:.2} s ({net_mibs:.0} MiB/s for {:.0} MiB), disk {:.2} s ({disk_mibs:.0} MiB/s for {:.0} MiB written by agents)",
        net_s,
        mib(size) * n as f64,
        disk_s,
        mib(disk_bytes)
    ));
    Ok(RunResult {
        wall_s,
        limit_s: net_s.max(disk_s),
        net_mibs,
        disk_mibs,
        one_release_mibs,
        sent_mib: sent / 1024.0 / 1024.0,
        fetches,
        file_reads: read / size as f64,
        storage_read_mib: mib(io1.saturating_sub(io0)),
    })
}
