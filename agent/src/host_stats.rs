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
//!
//! Sampling a process tree reads only the tree's own processes. Its
//! descendants are listed afresh only when the caller's last listing is older
//! than it allows, from the kernel's lists of each thread's children
//! (`/proc/<pid>/task/<tid>/children`): a read per thread of the tree. Where
//! the kernel keeps no such lists (built without `CONFIG_PROC_CHILDREN`),
//! listing reads the parent of every process on the host instead.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use sysinfo::{
    CpuRefreshKind, MINIMUM_CPU_UPDATE_INTERVAL, MemoryRefreshKind, Pid, ProcessRefreshKind,
    ProcessStatus, ProcessesToUpdate, System, UpdateKind,
};

/// Reads host and process figures. Real: [`SysinfoStats`]; fakes in tests.
pub trait HostStats: Send + 'static {
    /// Refresh and return host figures.
    fn host(&mut self) -> HostSample;
    /// RSS (bytes) and CPU% (share of one core, since the previous sample of
    /// the same tree) of a process and all its descendants; `None` if the pid
    /// is gone (or a zombie). The descendants are listed afresh when the
    /// latest listing for this tree is `members_max_age` old or older (zero:
    /// every time); in between, processes the tree gained are not seen.
    fn process_tree(&mut self, pid: u32, members_max_age: Duration) -> Option<ProcessSample>;
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
/// Host CPU and liveness lookups use separate `System`s because sysinfo's CPU
/// figures are differences against the previous refresh of the same `System`.
/// Process trees take their CPU % from the processes' accumulated CPU time
/// instead, as differences against the previous sample of the same tree, so
/// that trees sampled at different times and paces never disturb each other.
pub struct SysinfoStats {
    /// Host CPU and memory; refreshed only by [`HostStats::host`].
    host: System,
    /// Memory and CPU time of the members of sampled trees; refreshed only
    /// for the members of the tree being sampled.
    members: System,
    /// Sampled trees by root pid.
    trees: HashMap<u32, Tree>,
    /// Liveness, start times and cwds; refreshed with nothing but what is asked.
    lookup: System,
    /// Whether the kernel lists each thread's children
    /// (`/proc/<pid>/task/<tid>/children`); else listing a tree reads every
    /// process's parent.
    children_lists: bool,
}

/// One sampled process tree.
#[derive(Debug)]
struct Tree {
    /// The root and its descendants at the latest listing.
    members: Vec<Pid>,
    /// When `members` was listed.
    listed: Instant,
    /// The latest sample: when, its figures, and each member's CPU time (ms).
    sampled: Option<(Instant, ProcessSample, HashMap<Pid, u64>)>,
}

impl fmt::Debug for SysinfoStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SysinfoStats")
            .field("trees", &self.trees)
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
            members: System::new()?,
            trees: HashMap::new(),
            lookup: System::new()?,
            children_lists: Path::new("/proc/thread-self/children").exists(),
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

    /// Lists the descendants of `root` afresh, and forgets the trees whose
    /// root is gone.
    fn list_tree(&mut self, root: u32, now: Instant) -> Result<(), sysinfo::Error> {
        let members = if self.children_lists {
            self.trees
                .retain(|r, _| Path::new(&format!("/proc/{r}")).exists());
            descendants_by(root, children)
        } else {
            let parents = parents();
            self.trees.retain(|r, _| parents.contains_key(r));
            descendants(root, &parents)
        };
        let tree = self.trees.entry(root).or_insert_with(|| Tree {
            members: Vec::new(),
            listed: now,
            sampled: None,
        });
        tree.members = members.into_iter().map(Pid::from_u32).collect();
        tree.listed = now;
        // Processes of forgotten trees (and former members) would stay in
        // `members` for good: start it afresh once it holds more than the
        // trees do. CPU times are absolute, so nothing is lost.
        let wanted: usize = self.trees.values().map(|t| t.members.len()).sum();
        if self.members.processes().len() > wanted {
            self.members = System::new()?;
        }
        Ok(())
    }
}

/// Parent pid of every process, from `/proc/<pid>/stat`: one small read per
/// process, where a sysinfo refresh of all processes reads several files each.
fn parents() -> HashMap<u32, u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return HashMap::new();
    };
    dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            Some((pid, parent_in_stat(&stat)?))
        })
        .collect()
}

/// The parent pid in the text of `/proc/<pid>/stat`. Fields are counted after
/// the command name's closing parenthesis: the name itself may contain
/// spaces and parentheses.
fn parent_in_stat(stat: &str) -> Option<u32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let _state = fields.next()?;
    fields.next()?.parse().ok()
}

/// `root` and every descendant of it, root first, from a table of every
/// process's parent.
fn descendants(root: u32, parents: &HashMap<u32, u32>) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for (&child, &parent) in parents {
        children.entry(parent).or_default().push(child);
    }
    descendants_by(root, |pid| children.get(&pid).cloned().unwrap_or_default())
}

/// `root` and every descendant of it, root first, asking `children_of` for
/// the children of each. A pid met twice (reuse while listing) is kept once.
fn descendants_by(root: u32, mut children_of: impl FnMut(u32) -> Vec<u32>) -> Vec<u32> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut stack = vec![root];
    while let Some(pid) = stack.pop() {
        if !seen.insert(pid) {
            continue;
        }
        out.push(pid);
        stack.extend(children_of(pid));
    }
    out
}

/// The children of a process, as the kernel lists them per thread
/// (`/proc/<pid>/task/<tid>/children`: the children each thread forked). A
/// process or thread gone while it is read has none. The kernel's lists are
/// exact only while nothing forks or exits; the next listing sees what one
/// missed.
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(|t| {
            let t = t.ok()?;
            std::fs::read_to_string(t.path().join("children")).ok()
        })
        .flat_map(|list| {
            list.split_ascii_whitespace()
                .filter_map(|c| c.parse::<u32>().ok())
                .collect::<Vec<_>>()
        })
        .collect()
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

    fn process_tree(&mut self, pid: u32, members_max_age: Duration) -> Option<ProcessSample> {
        let now = Instant::now();
        // Too soon for new CPU figures: the latest sample, if the root lives.
        let recent = self.trees.get(&pid).and_then(|t| {
            let (at, last, _) = t.sampled.as_ref()?;
            (now.duration_since(*at) < MINIMUM_CPU_UPDATE_INTERVAL).then_some(*last)
        });
        if let Some(last) = recent {
            return self.lookup(pid).map(|_| last);
        }
        // Otherwise the refresh of the members below tells whether it lives.
        let previous = self.trees.get(&pid);
        if previous.is_none_or(|t| now.duration_since(t.listed) >= members_max_age) {
            self.list_tree(pid, now).ok()?;
        }
        let tree = self.trees.get_mut(&pid)?;
        // Without tasks, because threads listed as processes would count the
        // shared memory of a process once per thread.
        self.members.refresh_processes_specifics(
            ProcessesToUpdate::Some(&tree.members),
            true,
            ProcessRefreshKind::nothing()
                .with_memory()
                .with_cpu()
                .without_tasks(),
        );
        let root = Pid::from_u32(pid);
        if !self.members.process(root).is_some_and(is_live) {
            self.trees.remove(&pid);
            return None;
        }
        let before = tree.sampled.as_ref();
        let mut sample = ProcessSample::default();
        let mut cpu_ms = HashMap::with_capacity(tree.members.len());
        let mut used_ms = 0u64;
        for member in &tree.members {
            let Some(p) = self.members.process(*member).filter(|p| is_live(p)) else {
                continue;
            };
            sample.rss_bytes = sample.rss_bytes.saturating_add(p.memory());
            let t = p.accumulated_cpu_time();
            // A member new since the previous sample counts from its second.
            if let Some(b) = before.and_then(|(_, _, ms)| ms.get(member)) {
                used_ms = used_ms.saturating_add(t.saturating_sub(*b));
            }
            cpu_ms.insert(*member, t);
        }
        if let Some((at, _, _)) = before {
            let secs = now.duration_since(*at).as_secs_f64();
            if secs > 0.0 {
                sample.cpu_percent = used_ms as f64 / 1000.0 / secs * 100.0;
            }
        }
        tree.sampled = Some((now, sample, cpu_ms));
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

/// Fixed, modest figures for tests of what uses [`HostStats`]: every process
/// alive with start time 1, 10 MiB and 1 % CPU; counts the resource samples.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct FixedStats {
    /// How many times [`HostStats::process_tree`] was asked.
    pub samples: u32,
}

#[cfg(test)]
impl HostStats for FixedStats {
    fn host(&mut self) -> HostSample {
        HostSample {
            cpu_percent: 5.0,
            mem_used_bytes: 1 << 30,
            mem_total_bytes: 8 << 30,
            load1: 0.1,
        }
    }

    fn process_tree(&mut self, _pid: u32, _max_age: Duration) -> Option<ProcessSample> {
        self.samples += 1;
        Some(ProcessSample {
            rss_bytes: 10 << 20,
            cpu_percent: 1.0,
        })
    }

    fn process_alive(&mut self, _pid: u32, _start_time: Option<u64>) -> bool {
        true
    }

    fn process_start_time(&mut self, _pid: u32) -> Option<u64> {
        Some(1)
    }

    fn processes_with_cwd_under(&mut self, _dir: &Path) -> Vec<u32> {
        Vec::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

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
            .process_tree(std::process::id(), Duration::ZERO)
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
        assert!(stats.process_tree(pid, Duration::ZERO).is_some());
        // It is also a descendant of the test process.
        let tree = stats
            .process_tree(std::process::id(), Duration::ZERO)
            .expect("test process");
        assert!(tree.rss_bytes > 0);

        let start = stats.process_start_time(pid).expect("start time");
        assert!(stats.process_alive(pid, None));
        assert!(stats.process_alive(pid, Some(start)));
        assert!(!stats.process_alive(pid, Some(start + 1)));

        child.0.kill().expect("kill");
        child.0.wait().expect("wait");
        assert_eq!(stats.process_tree(pid, Duration::ZERO), None);
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
        assert_eq!(stats.process_tree(pid, Duration::ZERO), None);
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
        let mut last = stats.process_tree(pid, Duration::ZERO);
        while !last.is_some_and(|s| s.cpu_percent > 20.0) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(250));
            last = stats.process_tree(pid, Duration::ZERO);
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

    #[test]
    fn the_parent_is_read_after_the_command_name() {
        let stat =
            "4242 (a (b) c) S 17 4242 4242 0 -1 4194560 100 0 0 0 3 1 0 0 20 0 1 0 9 1000 200";
        assert_eq!(parent_in_stat(stat), Some(17));
        assert_eq!(parent_in_stat("4242 (x"), None);
    }

    #[test]
    fn descendants_are_found_through_every_generation() {
        let parents = HashMap::from([(10, 1), (11, 10), (12, 11), (13, 10), (20, 1), (1, 0)]);
        let mut d = descendants(10, &parents);
        assert_eq!(d[0], 10, "root first");
        d.sort_unstable();
        assert_eq!(d, vec![10, 11, 12, 13]);
        // A loop in the table (pid reuse while listing) ends.
        let looped = HashMap::from([(5, 6), (6, 5)]);
        assert_eq!(descendants(5, &looped).len(), 2);
    }

    #[test]
    fn children_forked_by_any_thread_are_listed() {
        assert!(
            Path::new("/proc/thread-self/children").exists(),
            "this kernel keeps no children lists; the tests of them need one"
        );
        // Forked by a thread other than the process's first, which lives on
        // while the lists are read: the child is in that thread's list only.
        let (forked, forked_rx) = std::sync::mpsc::channel();
        let (done, done_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::spawn(move || {
            let child = spawn(Command::new("sleep").arg("5"));
            forked.send(child.0.id()).expect("send pid");
            let _ = done_rx.recv();
            drop(child);
        });
        let pid = forked_rx.recv().expect("forked");
        let me = std::process::id();
        let first_thread = std::fs::read_to_string(format!("/proc/{me}/task/{me}/children"))
            .expect("first thread's children");
        assert!(
            !first_thread
                .split_ascii_whitespace()
                .any(|c| c == pid.to_string()),
            "{pid} in the first thread's list {first_thread:?}"
        );
        let listed = children(me);
        assert!(listed.contains(&pid), "{pid} not among {listed:?}");
        assert!(children(pid).is_empty());
        done.send(()).expect("done");
        thread.join().expect("forking thread");
        assert!(!children(me).contains(&pid), "reaped");
    }

    #[test]
    fn children_lists_and_the_parents_table_find_the_same_tree() {
        let child =
            spawn(Command::new("sh").args(["-c", "sleep 5 & sleep 5 & (sleep 5 & wait) & wait"]));
        let pid = child.0.id();
        // sh, two sleeps, a subshell and its sleep.
        let deadline = Instant::now() + Duration::from_secs(10);
        let sorted = |mut v: Vec<u32>| {
            v.sort_unstable();
            v
        };
        loop {
            let by_children = sorted(descendants_by(pid, children));
            let by_parents = sorted(descendants(pid, &parents()));
            if by_children.len() == 5 && by_children == by_parents {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "children lists {by_children:?}, parents table {by_parents:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // Sampled either way, the tree is the same.
        for lists in [true, false] {
            let mut stats = SysinfoStats::new().expect("sysinfo");
            stats.children_lists = lists;
            assert!(stats.process_tree(pid, Duration::ZERO).is_some());
            let members = sorted(
                stats.trees[&pid]
                    .members
                    .iter()
                    .map(|p| p.as_u32())
                    .collect(),
            );
            assert_eq!(
                members,
                sorted(descendants(pid, &parents())),
                "children lists: {lists}"
            );
        }
    }

    #[test]
    fn a_tree_is_listed_again_only_when_its_listing_is_too_old() {
        let mut stats = SysinfoStats::new().expect("sysinfo");
        // The first sleep is a child from the start; the second replaces it.
        let child = spawn(Command::new("sh").args(["-c", "sleep 0.3; sleep 5; true"]));
        let pid = child.0.id();
        let members = |stats: &SysinfoStats| -> Vec<u32> {
            stats.trees[&pid]
                .members
                .iter()
                .map(|p| p.as_u32())
                .collect()
        };
        let hour = Duration::from_secs(3600);
        let deadline = Instant::now() + Duration::from_secs(10);
        while descendants(pid, &parents()).len() < 2 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(stats.process_tree(pid, hour).is_some());
        let first = members(&stats);
        assert_eq!(first.len(), 2, "sh and its first sleep: {first:?}");
        // Wait for the second sleep.
        let second = loop {
            let now = descendants(pid, &parents());
            if let Some(s) = now.iter().find(|p| !first.contains(p)) {
                break *s;
            }
            assert!(Instant::now() < deadline, "no second sleep");
            std::thread::sleep(Duration::from_millis(10));
        };
        std::thread::sleep(MINIMUM_CPU_UPDATE_INTERVAL);
        assert!(stats.process_tree(pid, hour).is_some());
        assert_eq!(members(&stats), first, "the listing is recent enough");
        std::thread::sleep(MINIMUM_CPU_UPDATE_INTERVAL);
        assert!(stats.process_tree(pid, Duration::ZERO).is_some());
        assert!(members(&stats).contains(&second), "listed afresh");
    }
}
