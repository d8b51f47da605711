//! Shared pieces of the benchmarks: the run context (mode, repeats, where
//! results go), the machine description, process RSS/CPU from `/proc`,
//! median/min/max, Markdown result blocks, a release-binary agent and a
//! sample-service prober.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use rollout_proto::pb;

/// Builds the binaries of [`Ctx::bin_dir`].
pub const BUILD_RELEASE: &str =
    "cargo build --release -p rollout-coordinator -p rollout-sample-service -p rollout-bench";
/// Builds [`Ctx::agent_bin`].
pub const BUILD_AGENT: &str = "cargo build --profile agent -p rollout-agent";

/// How every benchmark runs.
#[derive(Debug, Clone)]
pub struct Ctx {
    /// Tiny sizes and durations: checks the harness, not the figures.
    pub quick: bool,
    /// Repeats of each measurement (full: at least 3; quick: 1).
    pub runs: usize,
    /// Where the release binaries are.
    pub bin_dir: PathBuf,
    /// The agent binary (built with the `agent` profile).
    pub agent_bin: PathBuf,
    /// Markdown result blocks are appended here too, when set.
    pub append: Option<PathBuf>,
    /// The command line, as run.
    pub command: String,
}

impl Ctx {
    /// `quick` or `full`, for the result blocks.
    pub fn mode(&self) -> &'static str {
        if self.quick { "quick" } else { "full" }
    }

    /// A binary from [`Ctx::bin_dir`] (`rollout-agent`: [`Ctx::agent_bin`]);
    /// fails with the fix when missing.
    pub fn bin(&self, name: &str) -> Result<PathBuf> {
        if name == "rollout-agent" {
            if !self.agent_bin.is_file() {
                bail!(
                    "{} is missing: build the agent first with `{BUILD_AGENT}`, or pass --agent-bin",
                    self.agent_bin.display()
                );
            }
            return Ok(self.agent_bin.clone());
        }
        let p = self.bin_dir.join(name);
        if !p.is_file() {
            bail!(
                "{} is missing: build the release binaries first with `{BUILD_RELEASE}`, or pass --bin-dir",
                p.display()
            );
        }
        Ok(p)
    }

    /// Prints a result block and appends it to [`Ctx::append`].
    pub fn publish(&self, block: &Block) -> Result<()> {
        let text = block.markdown(self);
        let mut out = std::io::stdout().lock();
        writeln!(out, "{text}")?;
        out.flush()?;
        if let Some(path) = &self.append {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .with_context(|| format!("open {}", path.display()))?;
            writeln!(f, "{text}")?;
        }
        Ok(())
    }
}

/// Progress on stderr (stdout carries the results).
pub fn note(msg: impl AsRef<str>) {
    let _ = writeln!(std::io::stderr(), "[bench] {}", msg.as_ref());
}

/// Median, minimum and maximum of some runs.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Median (mean of the middle two for an even count).
    pub median: f64,
    /// Minimum.
    pub min: f64,
    /// Maximum.
    pub max: f64,
}

impl Stats {
    /// Stats of `values`; `None` when empty.
    pub fn of(values: &[f64]) -> Option<Stats> {
        if values.is_empty() {
            return None;
        }
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Stats {
            median,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// How a figure compares with its target.
#[derive(Debug, Clone, Copy)]
pub enum Target {
    /// No target: context for other figures.
    None,
    /// The median must be at most this.
    AtMost(f64),
}

/// One figure over the runs.
#[derive(Debug, Clone)]
pub struct Figure {
    /// What it is, with its unit.
    pub name: String,
    /// One value per run.
    pub values: Vec<f64>,
    /// The issue's target.
    pub target: Target,
    /// How the target reads, e.g. `≤ 8 MiB`; empty for none.
    pub target_text: String,
}

impl Figure {
    /// A figure without a target.
    pub fn plain(name: impl Into<String>, values: Vec<f64>) -> Figure {
        Figure {
            name: name.into(),
            values,
            target: Target::None,
            target_text: String::new(),
        }
    }

    /// A figure whose median must be at most `limit`.
    pub fn at_most(
        name: impl Into<String>,
        values: Vec<f64>,
        limit: f64,
        text: impl Into<String>,
    ) -> Figure {
        Figure {
            name: name.into(),
            values,
            target: Target::AtMost(limit),
            target_text: text.into(),
        }
    }

    /// Whether the median meets the target (`None` without one).
    pub fn met(&self) -> Option<bool> {
        let s = Stats::of(&self.values)?;
        match self.target {
            Target::None => None,
            Target::AtMost(l) => Some(s.median <= l),
        }
    }
}

/// The result of one benchmark, rendered as a Markdown block.
#[derive(Debug, Clone)]
pub struct Block {
    /// Benchmark name.
    pub title: String,
    /// Parameters, e.g. `hosts=20, size=200 MiB`.
    pub params: String,
    /// `/proc/loadavg` at the start.
    pub load_start: String,
    /// `/proc/loadavg` at the end.
    pub load_end: String,
    /// Figures.
    pub figures: Vec<Figure>,
    /// Free-text findings, one per line.
    pub notes: Vec<String>,
}

impl Block {
    /// A block started now (records the load average).
    pub fn start(title: impl Into<String>, params: impl Into<String>) -> Block {
        Block {
            title: title.into(),
            params: params.into(),
            load_start: loadavg(),
            load_end: String::new(),
            figures: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Records the end-of-run load average.
    pub fn finish(&mut self) {
        self.load_end = loadavg();
    }

    /// The Markdown text.
    pub fn markdown(&self, ctx: &Ctx) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "### {} ({} mode)\n", self.title, ctx.mode());
        let _ = writeln!(s, "- command: `{}`", ctx.command);
        let _ = writeln!(s, "- machine: {}", machine());
        let _ = writeln!(s, "- date: {}", utc_now());
        let _ = writeln!(s, "- parameters: {}; runs: {}", self.params, ctx.runs);
        let _ = writeln!(
            s,
            "- load average (1/5/15 min) at start: {}; at end: {}\n",
            self.load_start, self.load_end
        );
        let _ = writeln!(s, "| figure | median | min | max | target | met |");
        let _ = writeln!(s, "| --- | ---: | ---: | ---: | --- | --- |");
        for f in &self.figures {
            let (med, min, max) = match Stats::of(&f.values) {
                Some(st) => (num(st.median), num(st.min), num(st.max)),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let met = match f.met() {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "",
            };
            let _ = writeln!(
                s,
                "| {} | {med} | {min} | {max} | {} | {met} |",
                f.name, f.target_text
            );
        }
        if !self.notes.is_empty() {
            s.push('\n');
            for n in &self.notes {
                let _ = writeln!(s, "- {n}");
            }
        }
        s
    }
}

/// A number with sensible precision for a table.
pub fn num(x: f64) -> String {
    if x.abs() >= 100.0 {
        format!("{x:.0}")
    } else if x.abs() >= 1.0 {
        format!("{x:.2}")
    } else {
        format!("{x:.3}")
    }
}

/// `/proc/loadavg`'s three averages.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

/// CPU model, cores, memory, kernel.
pub fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0 / 1024.0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    format!("{cpu}, {cores} cores, {mem_gib:.0} GiB RAM, Linux {kernel}")
}

/// Now as `YYYY-MM-DD HH:MM UTC`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = i64::try_from(secs / 86_400).unwrap_or(0);
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        (rem % 3600) / 60
    )
}

/// Unix milliseconds now (comparable with the daemons' event times).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// One reading of a process from `/proc`.
#[derive(Debug, Clone, Copy)]
pub struct ProcSample {
    /// When it was taken.
    pub at: Instant,
    /// `VmRSS`, bytes.
    pub rss_bytes: u64,
    /// `RssAnon` (heap, stacks), bytes.
    pub rss_anon_bytes: u64,
    /// `RssFile` (mapped binary and libraries), bytes.
    pub rss_file_bytes: u64,
    /// `utime + stime`, clock ticks.
    pub cpu_ticks: u64,
}

/// Resident bytes of each file mapped by `pid` (`/proc/<pid>/smaps`), by
/// path; anonymous mappings are left out (`RssAnon` counts them).
pub fn rss_by_file(pid: u32) -> Result<std::collections::BTreeMap<String, u64>> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .with_context(|| format!("process {pid} is gone"))?;
    let mut by_file = std::collections::BTreeMap::new();
    let mut current: Option<String> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if first.contains('-') && !first.ends_with(':') {
            // A mapping's header: range perms offset dev inode [path].
            current = fields
                .nth(4)
                .filter(|p| p.starts_with('/'))
                .map(str::to_owned);
        } else if first == "Rss:"
            && let (Some(path), Some(kib)) = (&current, fields.next())
        {
            let kib: u64 = kib.parse().unwrap_or(0);
            *by_file.entry(path.clone()).or_insert(0) += kib * 1024;
        }
    }
    Ok(by_file)
}

/// Time on CPU of each of `pid`'s threads, in nanoseconds
/// (`/proc/<pid>/task/<tid>/schedstat`, exact where utime and stime count
/// whole clock ticks), summed by thread name with any `-<number>` suffix
/// dropped: the 7 threads `sled-io-0` .. `sled-io-6` are one `sled-io`.
/// Threads that exit between two readings take their time with them.
pub fn cpu_ns_by_thread(pid: u32) -> Result<std::collections::BTreeMap<String, u64>> {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
        .with_context(|| format!("process {pid} is gone"))?;
    let mut by_name = std::collections::BTreeMap::new();
    for task in tasks.flatten() {
        // A thread may exit while it is read: skip it.
        let (Ok(comm), Ok(sched)) = (
            std::fs::read_to_string(task.path().join("comm")),
            std::fs::read_to_string(task.path().join("schedstat")),
        ) else {
            continue;
        };
        let ns: u64 = sched
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("malformed {}/schedstat", task.path().display()))?;
        *by_name.entry(thread_group(comm.trim())).or_insert(0) += ns;
    }
    Ok(by_name)
}

/// A thread's name without a trailing `-<number>` (`sled-io-3` → `sled-io`).
fn thread_group(comm: &str) -> String {
    match comm.rsplit_once('-') {
        Some((group, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => {
            group.to_owned()
        }
        _ => comm.to_owned(),
    }
}

/// Reads `/proc/<pid>/status` `VmRSS` and `/proc/<pid>/stat` utime+stime.
pub fn sample_proc(pid: u32) -> Result<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let kib = |key: &str| -> Result<u64> {
        status
            .lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {key} in /proc/{pid}/status"))
    };
    let rss_kib = kib("VmRSS:")?;
    let anon_kib = kib("RssAnon:")?;
    let file_kib = kib("RssFile:")?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends at the last ')'.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed /proc/<pid>/stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11).and_then(|v| v.parse().ok()).context("utime")?;
    let stime: u64 = f.get(12).and_then(|v| v.parse().ok()).context("stime")?;
    Ok(ProcSample {
        at: Instant::now(),
        rss_bytes: rss_kib * 1024,
        rss_anon_bytes: anon_kib * 1024,
        rss_file_bytes: file_kib * 1024,
        cpu_ticks: utime + stime,
    })
}

/// Clock ticks per second (`getconf CLK_TCK`; 100 when that fails).
pub fn clk_tck() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// CPU use between two samples, percent of one core.
pub fn cpu_percent(a: &ProcSample, b: &ProcSample) -> f64 {
    let wall = b.at.duration_since(a.at).as_secs_f64();
    if wall <= 0.0 {
        return 0.0;
    }
    (b.cpu_ticks.saturating_sub(a.cpu_ticks) as f64) / clk_tck() / wall * 100.0
}

/// The pid of the first process whose command line contains `needle`.
pub fn find_pid(needle: &str) -> Option<u32> {
    let me = std::process::id();
    for p in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmd) = std::fs::read(p.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(needle) {
            return Some(pid);
        }
    }
    None
}

/// `/proc/<pid>/io` as (rchar, read_bytes): bytes the process read with
/// read calls (files and sockets), and bytes it caused to be read from storage.
pub fn proc_io(pid: u32) -> Option<(u64, u64)> {
    let t = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    let get = |k: &str| {
        t.lines()
            .find(|l| l.starts_with(k))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some((get("rchar:")?, get("read_bytes:")?))
}

/// Bytes as MiB.
pub fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// Polls `cond` every `every` until it returns `Some` or `deadline` passes.
pub async fn poll<T>(
    what: &str,
    deadline: Duration,
    every: Duration,
    mut cond: impl AsyncFnMut() -> Option<T>,
) -> Result<T> {
    let end = Instant::now() + deadline;
    loop {
        if let Some(v) = cond().await {
            return Ok(v);
        }
        if Instant::now() > end {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(every).await;
    }
}

/// GET `path` from 127.0.0.1:`port`: (status, body), `None` when nothing answers.
pub fn http(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.trim().to_string()))
}

/// The version the sample service on `port` serves (HTTP 200 on `/version`).
pub fn served_version(port: u16) -> Option<String> {
    match http(port, "/version") {
        Some((200, body)) => Some(body),
        _ => None,
    }
}

/// A `rollout-agent` release binary with the default configuration except
/// what a benchmark needs (host, data dir, host env, coordinator on loopback
/// without TLS); its log goes to a file.
#[derive(Debug)]
pub struct BenchAgent {
    /// Temp dir with config, data and log.
    pub dir: tempfile::TempDir,
    child: Option<Child>,
}

impl BenchAgent {
    /// Starts the agent and waits for its admin socket.
    pub async fn start(
        ctx: &Ctx,
        host: &str,
        coordinator: &str,
        env: &[(String, String)],
        extra: &str,
    ) -> Result<BenchAgent> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let mut c = format!(
            "host = {host:?}\ndata_dir = {:?}\n{extra}\n",
            data.display().to_string()
        );
        if !env.is_empty() {
            c.push_str("[env]\n");
            for (k, v) in env {
                let _ = writeln!(c, "{k} = {v:?}");
            }
        }
        let _ = writeln!(
            c,
            "[coordinator]\nurl = {coordinator:?}\ninsecure_dev = true\nreconnect_min = \"100ms\"\nreconnect_max = \"1s\""
        );
        let cfg = dir.path().join("agent.toml");
        std::fs::write(&cfg, c)?;
        let log = std::fs::File::create(dir.path().join("agent.log"))?;
        let child = Command::new(ctx.bin("rollout-agent")?)
            .arg("run")
            .arg("--config")
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn rollout-agent")?;
        let a = BenchAgent {
            dir,
            child: Some(child),
        };
        let sock = a.socket();
        poll(
            "the agent's admin socket",
            Duration::from_secs(30),
            Duration::from_millis(20),
            async || match rollout_agent::admin::connect(&sock).await {
                Ok(mut c) => c.status(pb::StatusRequest {}).await.ok().map(|_| ()),
                Err(_) => None,
            },
        )
        .await
        .with_context(|| format!("agent {host}: {}", a.log()))?;
        Ok(a)
    }

    /// The admin socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("data").join("admin.sock")
    }

    /// The agent's pid.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The agent's log.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Admin history of one service.
    pub async fn history(&self, service: &str) -> Result<Vec<pb::HistoryEntry>> {
        let mut c = rollout_agent::admin::connect(&self.socket()).await?;
        Ok(c.releases(pb::ReleasesRequest {
            service: service.into(),
        })
        .await?
        .into_inner()
        .history)
    }

    /// Kills the agent and the services it started (found by working directory).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        kill_under(&self.dir.path().join("data"));
    }
}

impl Drop for BenchAgent {
    fn drop(&mut self) {
        self.stop();
    }
}

/// SIGKILLs every process whose working directory is under `root`.
pub fn kill_under(root: &Path) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if let Ok(cwd) = std::fs::read_link(p.path().join("cwd"))
            && cwd.starts_with(root)
        {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// A release spec for the real coordinator: the sample service from
/// `sample` (release binary), its port from the host env `port_var`, an HTTP
/// check every 100 ms (2 failures fail it), `strategy` lines appended to
/// `[strategy]`.
pub struct SpecParams<'a> {
    /// Service name.
    pub service: &'a str,
    /// Release name.
    pub release: &'a str,
    /// The artifact file.
    pub artifact: &'a Path,
    /// The sample-service binary.
    pub sample: &'a Path,
    /// Host env variable holding the port.
    pub port_var: &'a str,
    /// Extra argv after `--port ${port_var}`.
    pub extra_argv: &'a [&'a str],
    /// Lines of `[strategy]`.
    pub strategy: &'a str,
    /// The health check's `timeout` and `failure_threshold`: tight ones
    /// detect a failure fast (the rollback benchmark); loose ones keep a
    /// healthy release healthy on a loaded machine (many agents on a
    /// 2-core box: the overhead benchmark).
    pub check: CheckTolerance,
}

/// How forgiving a benchmark spec's health check is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckTolerance {
    /// `timeout = "500ms"`, `failure_threshold = 2`.
    Tight,
    /// `timeout = "2s"`, `failure_threshold = 10`.
    Loose,
}

impl SpecParams<'_> {
    /// The spec's TOML text.
    pub fn toml(&self) -> String {
        let mut argv = vec![
            self.sample.display().to_string(),
            "--port".into(),
            format!("${{{}}}", self.port_var),
        ];
        argv.extend(self.extra_argv.iter().map(|s| s.to_string()));
        format!(
            r#"service = "{service}"
release = "{release}"

[artifact]
path = {art:?}

[run]
exec = {argv:?}
stop_timeout = "2s"

[[health]]
name = "http"
http = "http://127.0.0.1:${{{port_var}}}/health"
interval = "100ms"
timeout = "{timeout}"
failure_threshold = {threshold}

[targets]
labels = {{ role = "web" }}

[strategy]
{strategy}
"#,
            service = self.service,
            release = self.release,
            art = self.artifact.display().to_string(),
            port_var = self.port_var,
            strategy = self.strategy,
            timeout = match self.check {
                CheckTolerance::Tight => "500ms",
                CheckTolerance::Loose => "2s",
            },
            threshold = match self.check {
                CheckTolerance::Tight => 2,
                CheckTolerance::Loose => 10,
            },
        )
    }
}

/// Writes the sample artifact (`version=<release>` plus `conf` lines) to `dir`.
pub fn write_sample_artifact(dir: &Path, release: &str, conf: &[&str]) -> Result<PathBuf> {
    let mut lines = vec![format!("version={release}")];
    lines.extend(conf.iter().map(|s| s.to_string()));
    let refs: Vec<&str> = lines.iter().map(String::as_str).collect();
    let p = dir.join(format!("sample-{release}.tar.gz"));
    std::fs::write(&p, rollout_tests::sample_artifact(&refs))?;
    Ok(p)
}

/// `rollout deploy` (no wait) through the CLI: the rollout id.
pub fn deploy(coord: &rollout_tests::cluster::CoordinatorProc, spec: &Path) -> Result<String> {
    let out = coord.cli(&["deploy", &spec.display().to_string()]);
    if !out.status.success() {
        bail!(
            "rollout deploy {} failed: {}",
            spec.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A rollout's events (`rollout events --output json`): (at_ms, host, kind).
pub fn events(
    coord: &rollout_tests::cluster::CoordinatorProc,
    id: &str,
) -> Result<Vec<(i64, String, String)>> {
    let v = coord.json(&["events", id])?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    (
                        e["at_ms"].as_i64().unwrap_or(0),
                        e["host"].as_str().unwrap_or("").to_string(),
                        e["kind"].as_str().unwrap_or("").to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// A rollout's state (`rollout status --output json`).
pub fn rollout_state(coord: &rollout_tests::cluster::CoordinatorProc, id: &str) -> Option<String> {
    let v = coord.json(&["status", id]).ok()?;
    v.get(0)?["state"].as_str().map(str::to_string)
}

/// Waits until the rollout is in one of `states`; returns that state.
pub async fn wait_state(
    coord: &rollout_tests::cluster::CoordinatorProc,
    id: &str,
    states: &[&str],
    deadline: Duration,
) -> Result<String> {
    let r = poll(
        &format!("rollout {id} in {states:?}"),
        deadline,
        Duration::from_millis(100),
        async || rollout_state(coord, id).filter(|s| states.contains(&s.as_str())),
    )
    .await;
    r.with_context(|| {
        format!(
            "now {:?}; coordinator log tail:\n{}",
            rollout_state(coord, id),
            tail(&coord.log(), 40)
        )
    })
}

/// The last `n` lines of `text`.
pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// GET `/metrics` on 127.0.0.1:`port` and return the value of `name`.
pub fn metric(port: u16, name: &str) -> Option<f64> {
    let (status, body) = http(port, "/metrics")?;
    if status != 200 {
        return None;
    }
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        (k == name).then(|| v.trim().parse().ok())?
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_median_min_max() {
        let s = Stats::of(&[3.0, 1.0, 2.0]).expect("stats");
        assert_eq!(
            s,
            Stats {
                median: 2.0,
                min: 1.0,
                max: 3.0
            }
        );
        let s = Stats::of(&[4.0, 1.0, 2.0, 3.0]).expect("stats");
        assert_eq!(s.median, 2.5);
        assert!(Stats::of(&[]).is_none());
    }

    #[test]
    fn targets() {
        assert_eq!(
            Figure::at_most("x", vec![1.0, 9.0, 2.0], 2.0, "").met(),
            Some(true)
        );
        assert_eq!(Figure::at_most("x", vec![3.0], 2.0, "").met(), Some(false));
        assert_eq!(Figure::plain("x", vec![3.0]).met(), None);
    }

    #[test]
    fn this_process_has_rss_and_a_date() {
        let s = sample_proc(std::process::id()).expect("sample");
        assert!(s.rss_bytes > 0);
        let d = utc_now();
        assert!(d.starts_with("20") && d.ends_with("UTC"), "{d}");
        assert!(machine().contains("cores"));
    }

    #[test]
    fn thread_groups_drop_a_numeric_suffix() {
        assert_eq!(thread_group("sled-io-3"), "sled-io");
        assert_eq!(thread_group("sled-io-12"), "sled-io");
        assert_eq!(thread_group("log flusher"), "log flusher");
        assert_eq!(thread_group("tokio-runtime-worker"), "tokio-runtime-worker");
        assert_eq!(thread_group("x-"), "x-");
    }

    #[test]
    fn cpu_by_thread_counts_a_busy_thread() {
        let busy = std::thread::Builder::new()
            .name("bench-busy-7".into())
            .spawn(|| {
                // Spin until the thread has used 20 ms of CPU (bounded: 10 s).
                let start = std::time::Instant::now();
                let mut x = 0u64;
                while start.elapsed() < std::time::Duration::from_secs(10) {
                    x = x.wrapping_add(std::hint::black_box(1));
                    let by = cpu_ns_by_thread(std::process::id()).expect("read");
                    if by.get("bench-busy").copied().unwrap_or(0) >= 20_000_000 {
                        return x;
                    }
                }
                panic!("the busy thread never showed 20 ms of CPU");
            })
            .expect("spawn");
        busy.join().expect("busy thread");
    }
}
