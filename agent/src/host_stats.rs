//! Host and process figures: CPU, memory and load of the host, RSS and CPU of a
//! service's process tree, process liveness (to adopt processes after an agent
//! restart) and free disk space.
//!
//! Everything the agent reads about the host goes through [`HostStats`], so tests
//! can substitute a fake; [`SysinfoStats`] is the real implementation.
//!
//! CPU percentages are differences between two readings: the first reading after
//! start is meaningless (0 or the average since boot), and readings closer than
//! [`sysinfo::MINIMUM_CPU_UPDATE_INTERVAL`] (200 ms on Linux) are not updated.
//! A process's CPU % is a share of one core, so a process tree can exceed 100.

use std::collections::HashMap;
use std::fmt;
use std::path::Path;
use std::time::Instant;

use sysinfo::{
    CpuRefreshKind, MINIMUM_CPU_UPDATE_INTERVAL, MemoryRefreshKind, Pid, ProcessRefreshKind,
    ProcessStatus, ProcessesToUpdate, System, UpdateKind,
};

/// Reads host and process figures. Real: [`SysinfoStats`]; fakes in tests.
pub trait HostStats: Send + 'static {
    /// Refresh and return host figures.
    fn host(&mut self) -> HostSample;
    /// RSS (bytes) and CPU% (share of one core) of a process and all its
    /// descendants; `None` if the pid is gone (or a zombie).
    fn process_tree(&mut self, pid: u32) -> Option<ProcessSample>;
    /// Whether a process with this pid exists and (if given) has this start time
    /// (seconds since epoch, as sysinfo reports) — used to adopt processes after an
    /// agent restart. A zombie does not count as alive.
    fn process_alive(&mut self, pid: u32, start_time: Option<u64>) -> bool;
    /// Start time (seconds since epoch) of a live process, to persist beside its pid
    /// so that a later [`HostStats::process_alive`] is not fooled by pid reuse.
    fn process_start_time(&mut self, pid: u32) -> Option<u64>;
    /// Pids of processes whose cwd lies under `dir` (orphans of a crashed agent).
    /// The calling process itself is never listed.
    fn processes_with_cwd_under(&mut self, dir: &Path) -> Vec<u32>;
    /// Resident memory (bytes) of the agent process itself, without its
    /// children; `None` where unknown (the default, for fakes).
    fn own_rss_bytes(&mut self) -> Option<u64> {
        None
    }
}

/// Host-wide figures at one refresh.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostSample {
    /// CPU use of the whole host in percent of all cores (0–100), since the
    /// previous refresh; 0 on the first.
    pub cpu_percent: f64,
    /// Memory in use (total minus available), in bytes.
    pub mem_used_bytes: u64,
    /// Installed memory, in bytes.
    pub mem_total_bytes: u64,
    /// One-minute load average (0 where the platform has none).
    pub load1: f64,
}

/// Figures of one process tree (a process and its descendants) at one refresh.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcessSample {
    /// Sum of resident set sizes, in bytes; compared with `max_rss_bytes`.
    pub rss_bytes: u64,
    /// Sum of CPU use since the previous refresh, as a share of one core in
    /// percent (200 = two cores busy); compared with `max_cpu_percent`.
    pub cpu_percent: f64,
}

/// [`HostStats`] backed by sysinfo.
///
/// It keeps three `System`s because sysinfo's CPU figures are differences against
/// the previous refresh of the same `System`: refreshing a process for a liveness
/// check would reset its CPU baseline, and a host CPU refresh would shift the
/// interval that process CPU is divided by.
pub struct SysinfoStats {
    /// Host CPU and memory; refreshed only by [`HostStats::host`].
    host: System,
    /// All processes with memory and CPU; refreshed only by
    /// [`HostStats::process_tree`], at most once per CPU update interval.
    tree: System,
    /// When `tree` was last refreshed; several services sampled in one tick share
    /// one refresh instead of resetting each other's CPU baselines.
    tree_refreshed: Option<Instant>,
    /// Liveness, start times and cwds; refreshed with nothing but what is asked.
    lookup: System,
}

impl fmt::Debug for SysinfoStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SysinfoStats")
            .field("processes_in_tree", &self.tree.processes().len())
            .field("tree_refreshed", &self.tree_refreshed)
            .finish_non_exhaustive()
    }
}

impl SysinfoStats {
    /// Creates the reader; figures start with the first call.
    ///
    /// Fails only where sysinfo cannot read the system at all (e.g. no `/proc`).
    pub fn new() -> Result<Self, sysinfo::Error> {
        Ok(SysinfoStats {
            host: System::new()?,
            tree: System::new()?,
            tree_refreshed: None,
            lookup: System::new()?,
        })
    }

    /// Refreshes the pid in `lookup` and returns it when it exists and is not a zombie.
    fn lookup(&mut self, pid: u32) -> Option<&sysinfo::Process> {
        let pid = Pid::from_u32(pid);
        self.lookup.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().without_tasks(),
        );
        self.lookup.process(pid).filter(|p| is_live(p))
    }

    fn refresh_tree(&mut self) {
        if self
            .tree_refreshed
            .is_some_and(|at| at.elapsed() < MINIMUM_CPU_UPDATE_INTERVAL)
        {
            return;
        }
        // All processes, because descendants are found through their parent pid;
        // without tasks, because threads listed as processes would count the
        // shared memory of a process once per thread.
        self.tree.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing()
                .with_memory()
                .with_cpu()
                .without_tasks(),
        );
        self.tree_refreshed = Some(Instant::now());
    }
}

fn is_live(p: &sysinfo::Process) -> bool {
    !matches!(p.status(), ProcessStatus::Zombie | ProcessStatus::Dead)
}

impl HostStats for SysinfoStats {
    fn host(&mut self) -> HostSample {
        self.host
            .refresh_cpu_specifics(CpuRefreshKind::nothing().with_usage());
        self.host
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        HostSample {
            cpu_percent: f64::from(self.host.global_cpu_usage()),
            mem_used_bytes: self.host.used_memory(),
            mem_total_bytes: self.host.total_memory(),
            load1: System::load_average().map(|l| l.one).unwrap_or(0.0),
        }
    }

    fn process_tree(&mut self, pid: u32) -> Option<ProcessSample> {
        // Checked fresh: `tree` may be up to one interval old.
        self.lookup(pid)?;
        self.refresh_tree();
        let root = Pid::from_u32(pid);
        let processes = self.tree.processes();
        if !processes.get(&root).is_some_and(is_live) {
            return None;
        }
        let mut children: HashMap<Pid, Vec<Pid>> = HashMap::new();
        for (child, p) in processes {
            if let Some(parent) = p.parent() {
                children.entry(parent).or_default().push(*child);
            }
        }
        let mut sample = ProcessSample::default();
        let mut stack = vec![root];
        while let Some(pid) = stack.pop() {
            if let Some(p) = processes.get(&pid).filter(|p| is_live(p)) {
                sample.rss_bytes = sample.rss_bytes.saturating_add(p.memory());
                sample.cpu_percent += f64::from(p.cpu_usage());
            }
            if let Some(kids) = children.get(&pid) {
                stack.extend(kids.iter().copied().filter(|k| *k != pid));
            }
        }
        Some(sample)
    }

    fn process_alive(&mut self, pid: u32, start_time: Option<u64>) -> bool {
        match self.lookup(pid) {
            None => false,
            Some(p) => start_time.is_none_or(|t| p.start_time() == t),
        }
    }

    fn process_start_time(&mut self, pid: u32) -> Option<u64> {
        self.lookup(pid).map(|p| p.start_time())
    }

    fn processes_with_cwd_under(&mut self, dir: &Path) -> Vec<u32> {
        // The kernel reports cwds with symlinks resolved.
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        self.lookup.refresh_processes_specifics(
            ProcessesToUpdate::All,
            true,
            ProcessRefreshKind::nothing()
                .with_cwd(UpdateKind::Always)
                .without_tasks(),
        );
        let me = std::process::id();
        let mut pids: Vec<u32> = self
            .lookup
            .processes()
            .values()
            .filter(|p| is_live(p) && p.pid().as_u32() != me)
            .filter(|p| p.cwd().is_some_and(|cwd| cwd.starts_with(&dir)))
            .map(|p| p.pid().as_u32())
            .collect();
        pids.sort_unstable();
        pids
    }

    fn own_rss_bytes(&mut self) -> Option<u64> {
        let pid = Pid::from_u32(std::process::id());
        self.lookup.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[pid]),
            true,
            ProcessRefreshKind::nothing().with_memory().without_tasks(),
        );
        self.lookup.process(pid).map(|p| p.memory())
    }
}

/// Free bytes on the filesystem holding `path` (nix statvfs), as available to an
/// unprivileged user.
pub fn disk_free(path: &Path) -> std::io::Result<u64> {
    let st = nix::sys::statvfs::statvfs(path).map_err(std::io::Error::from)?;
    // The aliases are u64 on 64-bit Linux but not everywhere.
    #[allow(clippy::unnecessary_cast)]
    let (blocks, size) = (st.blocks_available() as u64, st.fragment_size() as u64);
    Ok(blocks.saturating_mul(size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};
    use std::time::Duration;

    /// Kills the child when the test ends, passed or not.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    fn spawn(cmd: &mut Command) -> Reaped {
        Reaped(
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("spawn child"),
        )
    }

    #[test]
    fn own_process_has_resident_memory() {
        let mut stats = SysinfoStats::new().expect("sysinfo");
        let own = stats
            .process_tree(std::process::id())
            .expect("the test process exists");
        assert!(own.rss_bytes > 0, "{own:?}");
        let host = stats.host();
        assert!(host.mem_total_bytes > 0, "{host:?}");
        assert!(host.mem_used_bytes <= host.mem_total_bytes, "{host:?}");
        let rss = stats.own_rss_bytes().expect("own rss");
        assert!(rss > 0, "{rss}");
    }

    #[test]
    fn child_tree_is_seen_until_it_is_killed_and_reaped() {
        let mut stats = SysinfoStats::new().expect("sysinfo");
        let mut child = spawn(Command::new("sleep").arg("5"));
        let pid = child.0.id();
        assert!(stats.process_tree(pid).is_some());
        // It is also a descendant of the test process.
        let tree = stats
            .process_tree(std::process::id())
            .expect("test process");
        assert!(tree.rss_bytes > 0);

        let start = stats.process_start_time(pid).expect("start time");
        assert!(stats.process_alive(pid, None));
        assert!(stats.process_alive(pid, Some(start)));
        assert!(!stats.process_alive(pid, Some(start + 1)));

        child.0.kill().expect("kill");
        child.0.wait().expect("wait");
        assert_eq!(stats.process_tree(pid), None);
        assert!(!stats.process_alive(pid, None));
        assert_eq!(stats.process_start_time(pid), None);
    }

    #[test]
    fn dead_pid_is_not_alive() {
        let mut stats = SysinfoStats::new().expect("sysinfo");
        let mut child = Command::new("true").spawn().expect("spawn true");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(!stats.process_alive(pid, None));
        assert_eq!(stats.process_tree(pid), None);
    }

    #[test]
    fn finds_processes_by_working_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let sub = dir.path().join("releases").join("r1");
        std::fs::create_dir_all(&sub).expect("mkdir");
        let mut stats = SysinfoStats::new().expect("sysinfo");
        let child = spawn(Command::new("sleep").arg("5").current_dir(&sub));
        let found = stats.processes_with_cwd_under(dir.path());
        assert_eq!(found, vec![child.0.id()]);
        let other = tempfile::tempdir().expect("tempdir");
        assert!(stats.processes_with_cwd_under(other.path()).is_empty());
    }

    #[test]
    fn busy_child_shows_cpu_use() {
        let mut stats = SysinfoStats::new().expect("sysinfo");
        let child = spawn(Command::new("sh").args(["-c", "while :; do :; done"]));
        let pid = child.0.id();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = stats.process_tree(pid);
        while !last.is_some_and(|s| s.cpu_percent > 20.0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            last = stats.process_tree(pid);
        }
        let last = last.expect("child alive");
        assert!(last.cpu_percent > 20.0, "{last:?}");
    }

    #[test]
    fn host_cpu_is_a_percentage() {
        let mut stats = SysinfoStats::new().expect("sysinfo");
        stats.host();
        std::thread::sleep(MINIMUM_CPU_UPDATE_INTERVAL);
        let host = stats.host();
        assert!((0.0..=100.0).contains(&host.cpu_percent), "{host:?}");
    }

    #[test]
    fn disk_free_is_positive() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert!(disk_free(dir.path()).expect("statvfs") > 0);
        assert!(disk_free(&dir.path().join("missing")).is_err());
    }
}
