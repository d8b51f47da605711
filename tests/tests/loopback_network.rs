//! The network scenarios of issue 7 with processes on 127.0.0.1: the variant
//! that runs everywhere, without Docker. `docker_faults.rs` runs the same
//! scenarios on containers with real network partitions; here each agent
//! reaches the coordinator through its own [`Proxy`], whose
//! [`Proxy::partition`] silences every open connection in both directions
//! (a blackhole, as a pulled cable: only keepalive notices) and closes new
//! ones, and a frozen host is a SIGSTOP of its agent and of every process
//! of its services (as `docker pause` freezes a container).
//!
//! Agents and coordinator use the keepalive of the container fleet
//! ([`KEEPALIVE_INTERVAL`] + [`KEEPALIVE_TIMEOUT`] = 3 s), so a silent
//! partition or a frozen agent is noticed in seconds; the specs' deadlines
//! are seconds too.
//!
//! Every scenario ends with the history checker ([`NetRig::check_histories`]):
//! each agent's own history shows at most one activation per rollout and a
//! strictly increasing `seq`, every host ends idle on a release it committed
//! or on its last known good one, every rollout is finished with an event log
//! without gap, and a rollout reported successful has every host it
//! committed on its release.

mod crash_common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use crash_common::{Rig, Spec, WAIT};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use rollout_tests::cluster::{Cluster, CoordinatorProc};
use rollout_tests::docker::{KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT, poll};
use rollout_tests::proxy::Proxy;
use rollout_tests::{Agent, AgentOptions, bin, free_port, served_version};
use serde_json::Value;

/// Longest an agent's admin CLI may take (a frozen agent never answers).
const ADMIN_CALL: Duration = Duration::from_secs(10);

const ALL_AT_ONCE: &[(&str, &str)] = &[("batch_percent", "100"), ("max_unavailable", "\"100%\"")];

/// A coordinator and agents `h1..hN` on 127.0.0.1, each agent behind its own
/// [`Proxy`], driven synchronously.
struct NetRig {
    rt: tokio::runtime::Runtime,
    c: Cluster,
    proxies: Vec<Proxy>,
}

/// Runs `cmd`, killing it after `limit`.
fn run_bounded(cmd: &mut Command, limit: Duration) -> Result<Output> {
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pid = Pid::from_raw(i32::try_from(child.id())?);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(out) => Ok(out?),
        Err(_) => {
            let _ = kill(pid, Signal::SIGKILL);
            bail!("{cmd:?} did not finish within {limit:?}")
        }
    }
}

impl NetRig {
    fn start(n: usize) -> Result<NetRig> {
        Self::start_with(n, |_, _| {})
    }

    /// As [`NetRig::start`], with `tweak(i, options)` applied to host `i`'s
    /// agent options (0-based).
    fn start_with(n: usize, tweak: impl Fn(usize, &mut AgentOptions)) -> Result<NetRig> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let coord = rt.block_on(CoordinatorProc::start_with(&format!(
            "[agents]\nkeepalive_interval = \"{}ms\"\nkeepalive_timeout = \"{}ms\"",
            KEEPALIVE_INTERVAL.as_millis(),
            KEEPALIVE_TIMEOUT.as_millis()
        )))?;
        let upstream = std::net::SocketAddr::from(([127, 0, 0, 1], coord.port));
        let mut agents = Vec::new();
        let mut ports = Vec::new();
        let mut proxies = Vec::new();
        for i in 0..n {
            let proxy = Proxy::start(upstream)?;
            let port = free_port();
            let mut opts = AgentOptions::new(&format!("h{}", i + 1), None);
            opts.env.push(("PORT".into(), port.to_string()));
            opts.labels.push(("role".into(), "web".into()));
            // The whole `[coordinator]` table, to set its keepalive.
            opts.extra.push(format!(
                "[coordinator]\nurl = {:?}\ninsecure_dev = true\nreconnect_min = \"100ms\"\n\
                 reconnect_max = \"1s\"\nkeepalive_interval = \"{}ms\"\nkeepalive_timeout = \"{}ms\"",
                proxy.url(),
                KEEPALIVE_INTERVAL.as_millis(),
                KEEPALIVE_TIMEOUT.as_millis()
            ));
            tweak(i, &mut opts);
            agents.push(rt.block_on(Agent::start(opts))?);
            ports.push(port);
            proxies.push(proxy);
        }
        let c = Cluster {
            coord,
            agents,
            ports,
            work: tempfile::tempdir()?,
        };
        rt.block_on(c.wait_hosts_connected())?;
        Ok(NetRig { rt, c, proxies })
    }

    fn index(&self, host: &str) -> Result<usize> {
        self.c
            .agents
            .iter()
            .position(|a| a.opts.host == host)
            .with_context(|| format!("no agent {host}"))
    }

    fn proxy(&self, host: &str) -> Result<&Proxy> {
        Ok(&self.proxies[self.index(host)?])
    }

    /// Cuts `host` off from the coordinator.
    fn partition(&self, host: &str) -> Result<()> {
        self.proxy(host)?.partition();
        Ok(())
    }

    /// Connects `host` to the coordinator again.
    fn heal(&self, host: &str) -> Result<()> {
        self.proxy(host)?.heal();
        Ok(())
    }

    /// The pid of `host`'s agent process, found by its config path.
    fn agent_pid(&self, host: &str) -> Result<Pid> {
        let cfg = self.c.agents[self.index(host)?]
            .config_path()
            .display()
            .to_string();
        for p in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            if cmdline.split(|b| *b == 0).any(|a| a == cfg.as_bytes()) {
                return Ok(Pid::from_raw(pid));
            }
        }
        bail!("no running agent process for {host} ({cfg})")
    }

    /// The processes of `host`: its agent and every process working under
    /// the agent's data directory (its services and their children).
    fn host_pids(&self, host: &str) -> Result<Vec<Pid>> {
        let agent = self.agent_pid(host)?;
        let data = self.c.agents[self.index(host)?].data_dir();
        let mut pids = vec![agent];
        for p in std::fs::read_dir("/proc")?.flatten() {
            let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let Ok(cwd) = std::fs::read_link(p.path().join("cwd")) else {
                continue;
            };
            if cwd.starts_with(&data) && pid != agent.as_raw() {
                pids.push(Pid::from_raw(pid));
            }
        }
        Ok(pids)
    }

    /// Freezes the whole host: SIGSTOP of its agent and its services (as
    /// `docker pause` freezes a container), once each is seen stopped.
    fn freeze(&self, host: &str) -> Result<Vec<Pid>> {
        let pids = self.host_pids(host)?;
        ensure!(
            pids.len() >= 2,
            "{host}: no service process found to freeze"
        );
        for pid in &pids {
            kill(*pid, Signal::SIGSTOP)?;
        }
        poll(
            &format!("{host}'s processes stopped"),
            Duration::from_secs(10),
            || {
                pids.iter()
                    .all(|pid| {
                        std::fs::read_to_string(format!("/proc/{pid}/stat"))
                            .ok()
                            .and_then(|s| {
                                s.rsplit_once(')')
                                    .map(|(_, rest)| rest.trim_start().starts_with('T'))
                            })
                            .unwrap_or(false)
                    })
                    .then_some(())
            },
        )?;
        Ok(pids)
    }

    /// Thaws what [`NetRig::freeze`] froze: SIGCONT of each process.
    fn thaw(&self, pids: &[Pid]) -> Result<()> {
        for pid in pids {
            kill(*pid, Signal::SIGCONT)?;
        }
        Ok(())
    }

    fn agent_json(&self, host: &str, args: &[&str]) -> Result<Value> {
        let i = self.index(host)?;
        let out = run_bounded(
            Command::new(bin("rollout-agent"))
                .args(args)
                .args(["--output", "json", "--socket"])
                .arg(self.c.agents[i].socket()),
            ADMIN_CALL,
        )?;
        ensure!(
            out.status.success(),
            "rollout-agent {args:?} on {host}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// The version `host`'s sample service serves, if it answers.
    fn served_version(&self, host: &str) -> Option<String> {
        served_version(self.c.ports[self.index(host).ok()?])
    }

    /// Waits until each of `hosts` serves `version`.
    fn wait_serving(&self, hosts: &[&str], version: &str) -> Result<()> {
        for h in hosts {
            poll(&format!("{h} serving {version}"), WAIT, || {
                (self.served_version(h).as_deref() == Some(version)).then_some(())
            })?;
        }
        Ok(())
    }

    /// Whether the coordinator lists `host` as connected.
    fn connected(&self, host: &str) -> bool {
        self.json(&["hosts"]).is_ok_and(|v| {
            v.as_array()
                .into_iter()
                .flatten()
                .any(|h| h["host"] == host && h["connected"] == true)
        })
    }

    /// The host's own `(phase, current release)` of `web`, if its agent answers.
    fn phase_of(&self, host: &str) -> Option<(String, String)> {
        let s = crash_common::agent_service(self, host, "web").ok()??;
        Some((
            s["phase"].as_str()?.to_string(),
            s["current"].as_str().unwrap_or_default().to_string(),
        ))
    }

    /// Waits until `host` is idle on `release` by its own account.
    fn wait_idle_on(&self, host: &str, release: &str, deadline: Duration) -> Result<()> {
        poll(&format!("{host} idle on {release}"), deadline, || {
            let (phase, cur) = self.phase_of(host)?;
            (phase == "idle" && cur == release).then_some(())
        })
        .with_context(|| {
            format!(
                "{host} now {:?}\n{}",
                self.phase_of(host),
                self.agent_log(host)
            )
        })
    }

    /// Writes a spec of `web` `release` with `strategy` over the defaults.
    fn spec(&self, release: &str, strategy: &[(&str, &str)]) -> Result<String> {
        crash_common::write_spec(
            self,
            &Spec {
                service: "web",
                release,
                port_var: "PORT",
                argv: &[],
                strategy,
            },
        )
    }

    /// `rollout deploy --wait <spec>`: (success, rollout id, stdout, stderr).
    fn deploy_wait(&self, spec: &str) -> Result<(bool, String, String, String)> {
        let (ok, out, err) = self.cli(&["deploy", "--wait", spec])?;
        let id = out.lines().next().unwrap_or_default().trim().to_string();
        Ok((ok, id, out, err))
    }

    /// Deploys v1 to every host at once and waits until they all serve it.
    fn deploy_v1(&self) -> Result<String> {
        let spec = self.spec("v1", ALL_AT_ONCE)?;
        let (ok, id, out, err) = self.deploy_wait(&spec)?;
        ensure!(
            ok,
            "v1 deploy failed:\n{out}\n{err}\n{}",
            self.coordinator_log()
        );
        let hosts = self.hosts();
        let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
        self.wait_serving(&hosts, "v1")?;
        Ok(id)
    }

    /// Waits up to `deadline` until rollout `id` is in `state`.
    fn wait_state(&self, id: &str, state: &str, deadline: Duration) -> Result<Value> {
        poll(&format!("rollout {id} {state}"), deadline, || {
            crash_common::status(self, id)
                .ok()
                .filter(|s| s["state"] == state)
        })
        .with_context(|| {
            format!(
                "now {:?}\n--- coordinator log ---\n{}",
                crash_common::status(self, id).ok(),
                self.coordinator_log()
            )
        })
    }

    /// The history checker (as the container fleet's): the hosts' own
    /// histories (at most one activation per rollout, `seq` strictly
    /// increasing, idle on a committed or last known good release), every
    /// rollout finished with an event log without gap, every host a rollout
    /// reports committed committed that release by its own history, and
    /// when the newest rollout succeeded, such a host runs its release.
    /// Returns each host's `releases` document.
    fn check_histories(&self, rollouts: &[&str]) -> Result<BTreeMap<String, Value>> {
        crash_common::check_histories(self, "web", rollouts)?;
        let mut all = BTreeMap::new();
        let mut current = BTreeMap::new();
        for h in self.hosts() {
            if let Some(s) = crash_common::agent_service(self, &h, "web")? {
                current.insert(
                    h.clone(),
                    s["current"].as_str().unwrap_or_default().to_string(),
                );
            }
            all.insert(h.clone(), self.agent_releases(&h, "web")?);
        }
        for (i, id) in rollouts.iter().enumerate() {
            let st = crash_common::status(self, id)?;
            let state = st["state"].as_str().unwrap_or_default();
            ensure!(
                ["succeeded", "failed", "rolled_back", "aborted"].contains(&state),
                "rollout {id} is still {state}: it cannot be judged yet: {st}"
            );
            crash_common::events_contiguous(self, id)?;
            let release = st["release"].as_str().unwrap_or_default();
            let newest = i + 1 == rollouts.len();
            let hosts = st["batches"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|b| b["hosts"].as_array().into_iter().flatten());
            for p in hosts.filter(|p| p["state"] == "committed") {
                let h = p["host"].as_str().unwrap_or_default();
                let Some(doc) = all.get(h) else { continue };
                ensure!(
                    doc["history"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|e| e["event"] == "committed" && e["release"] == release),
                    "rollout {id} reports {h} committed on {release}, but {h}'s own history \
                     never committed it: {doc:#}"
                );
                if newest && state == "succeeded" {
                    ensure!(
                        current.get(h).map(String::as_str) == Some(release),
                        "rollout {id} succeeded with {h} committed on {release}, but {h} is on \
                         {:?}: {st}",
                        current.get(h)
                    );
                }
            }
        }
        Ok(all)
    }
}

crash_common::loopback_rig!(NetRig);

/// The `at_ms` of the first `event` of `release` in a host's own history.
fn at(doc: &Value, release: &str, event: &str) -> Option<i64> {
    doc["history"]
        .as_array()?
        .iter()
        .find(|e| e["release"] == release && e["event"] == event)
        .and_then(|e| e["at_ms"].as_i64())
}

/// How many times the host's own history shows an activation for rollout `id`.
fn activations(doc: &Value, id: &str) -> usize {
    doc["history"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["event"] == "activating" && e["cause"] == id)
        .count()
}

/// Scenario 3: h1 is cut off while it verifies v2 (the canary). Alone, it
/// passes verification, waits in probation for a commit that cannot come
/// and returns to v1 by itself after `commit_deadline`; the coordinator
/// fails it as unreachable within the budget and finishes on the others; on
/// heal h1 reports its history and the coordinator records the rollback it
/// did offline, the budget unchanged.
#[test]
fn host_partitioned_while_verifying_rolls_back_on_its_own_and_is_reconciled_on_heal() -> Result<()>
{
    let t0 = Instant::now();
    let rig = NetRig::start(3)?;
    let v1 = rig.deploy_v1()?;
    // h1 alone first; it verifies for 3 s before it answers Activate, and
    // rolls itself back 3 s after entering probation unless committed.
    let spec = rig.spec(
        "v2",
        &[
            ("canary", "[1, \"100%\"]"),
            ("max_unavailable", "\"100%\""),
            ("max_failures", "1"),
            ("min_healthy_time", "\"3s\""),
            ("healthy_deadline", "\"10s\""),
            ("commit_deadline", "\"3s\""),
        ],
    )?;
    let id = crash_common::deploy(&rig, &spec)?;
    poll("h1 verifying v2", Duration::from_secs(20), || {
        rig.phase_of("h1")
            .is_some_and(|(p, c)| p == "verifying" && c == "v2")
            .then_some(())
    })?;
    rig.partition("h1")?;
    let cut = Instant::now();
    rig.wait_idle_on("h1", "v1", Duration::from_secs(20))?;
    let local_rollback = cut.elapsed();
    let doc = rig.agent_releases("h1", "web")?;
    let hist = doc["history"].as_array().cloned().unwrap_or_default();
    assert!(
        hist.iter()
            .any(|e| e["event"] == "verified" && e["release"] == "v2"),
        "{doc:#}"
    );
    assert!(
        hist.iter().any(|e| e["event"] == "rolled_back"
            && e["reason"]
                .as_str()
                .is_some_and(|r| r.contains("commit_deadline"))),
        "h1's history does not show a rollback for commit_deadline: {doc:#}"
    );
    assert_eq!(rig.served_version("h1").as_deref(), Some("v1"));
    // The coordinator loses h1 (unreachable, within the failure budget) and
    // finishes the rollout on the others.
    let s = rig.wait_state(&id, "succeeded", Duration::from_secs(45))?;
    let detected = cut.elapsed();
    assert_eq!(s["failures"], 1, "{s}");
    let h1 = crash_common::host_progress(&rig, &id, "h1")?;
    assert_eq!(h1["failure"], "unreachable", "{h1}");
    rig.wait_serving(&["h2", "h3"], "v2")?;
    assert!(
        !rig.connected("h1"),
        "h1 is cut off but listed as connected"
    );
    // Heal: h1 reconnects with its history, and the coordinator records the
    // rollback it did offline.
    rig.heal("h1")?;
    crash_common::wait_connected(&rig)?;
    let h1 = poll("h1 reconciled", Duration::from_secs(20), || {
        let p = crash_common::host_progress(&rig, &id, "h1").ok()?;
        p["reason"]
            .as_str()?
            .contains("returned on v1")
            .then_some(p)
    })?;
    assert!(
        h1["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("rolled_back"),
        "the reconciliation does not quote h1's rollback: {h1}"
    );
    let events = crash_common::events_contiguous(&rig, &id)?;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "reconciled" && e["host"] == "h1"),
        "{events:?}"
    );
    // Budget: still one failure, and the rollout's result stands.
    let s = crash_common::status(&rig, &id)?;
    assert_eq!(s["failures"], 1, "{s}");
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(rig.served_version("h1").as_deref(), Some("v1"));
    let hist = rig.check_histories(&[&v1, &id])?;
    for (h, doc) in &hist {
        assert_eq!(activations(doc, &id), 1, "{h}: {doc:#}");
    }
    eprintln!(
        "partition: h1 rolled back {local_rollback:?} after the cut, coordinator finished \
         {detected:?} after it; total {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// Scenario 4: the coordinator is cut off from every agent while the second
/// batch verifies. Each host of that batch passes verification, waits in
/// probation for a commit that cannot come, and returns to its last known
/// good release within `commit_deadline`; the coordinator notices the loss
/// by keepalive, gives the hosts their reconnect grace, fails them as
/// unreachable and halts past its budget. Its fleet rollback cannot reach
/// the first batch: the rollout ends `rolled_back` with their rollbacks
/// owed, and on heal it rolls each of them back and records where every host
/// really is: the whole fleet ends on v1.
#[test]
fn coordinator_partitioned_from_the_fleet_mid_batch_leaves_no_host_unverified() -> Result<()> {
    let t0 = Instant::now();
    let rig = NetRig::start(4)?;
    let v1 = rig.deploy_v1()?;
    let commit_deadline = Duration::from_secs(4);
    let spec = rig.spec(
        "v2",
        &[
            ("batch_size", "2"),
            ("max_unavailable", "2"),
            ("max_failures", "1"),
            ("auto_rollback", "true"),
            ("min_healthy_time", "\"4s\""),
            ("healthy_deadline", "\"15s\""),
            ("commit_deadline", "\"4s\""),
        ],
    )?;
    let id = crash_common::deploy(&rig, &spec)?;
    // Batch 0 (h1, h2) commits; batch 1 (h3, h4) verifies for 4 s: cut then.
    poll("h3 and h4 verifying v2", Duration::from_secs(40), || {
        ["h3", "h4"]
            .iter()
            .all(|h| {
                rig.phase_of(h)
                    .is_some_and(|(p, c)| p == "verifying" && c == "v2")
            })
            .then_some(())
    })
    .with_context(|| format!("{:?}", crash_common::status(&rig, &id).ok()))?;
    for p in &rig.proxies {
        p.partition();
    }
    let cut = Instant::now();
    // Watch both sides at once: no host stays on the unverified release (each
    // rolls back by itself), and the coordinator, noticing the loss by
    // keepalive, halts past its budget and rolls back what it can reach
    // (nothing).
    let mut back: [Option<Duration>; 2] = [None, None];
    let mut alone: [Option<Duration>; 2] = [None, None];
    let mut halted = None;
    poll(
        "h3 and h4 back on v1 and the rollout rolled back",
        Duration::from_secs(40),
        || {
            for (i, h) in ["h3", "h4"].iter().enumerate() {
                if back[i].is_none()
                    && rig
                        .phase_of(h)
                        .is_some_and(|(p, c)| p == "idle" && c == "v1")
                {
                    back[i] = Some(cut.elapsed());
                }
                // The agent's own keepalive ends its session.
                if alone[i].is_none()
                    && rig
                        .agent_status(h)
                        .is_ok_and(|st| st["coordinator_connected"] == false)
                {
                    alone[i] = Some(cut.elapsed());
                }
            }
            if halted.is_none()
                && crash_common::status(&rig, &id).is_ok_and(|s| s["state"] == "rolled_back")
            {
                halted = Some(cut.elapsed());
            }
            (back.iter().chain(&alone).all(Option::is_some) && halted.is_some()).then_some(())
        },
    )
    .with_context(|| {
        format!(
            "h3 {:?}, h4 {:?}, rollout {:?}\n{}",
            rig.phase_of("h3"),
            rig.phase_of("h4"),
            crash_common::status(&rig, &id).ok(),
            rig.coordinator_log()
        )
    })?;
    for h in ["h3", "h4"] {
        let doc = rig.agent_releases(h, "web")?;
        let hist = doc["history"].as_array().cloned().unwrap_or_default();
        let verified = at(&doc, "v2", "verified").context("v2 verified")?;
        let rolling = hist
            .iter()
            .find(|e| e["event"] == "rolling_back" && e["release"] == "v2")
            .with_context(|| format!("{h} has no rollback of v2: {doc:#}"))?;
        assert!(
            rolling["reason"]
                .as_str()
                .is_some_and(|r| r.contains("commit_deadline")),
            "{h} did not roll back for its commit_deadline: {doc:#}"
        );
        assert!(
            hist.iter().any(|e| e["event"] == "rolled_back"),
            "{h}'s rollback did not finish: {doc:#}"
        );
        // On v2 uncommitted for at most commit_deadline after it verified
        // (plus the agent's timer tick) before it starts going back.
        let on_probation = rolling["at_ms"].as_i64().unwrap_or(i64::MAX) - verified;
        let limit = i64::try_from(commit_deadline.as_millis())? + 1000;
        assert!(
            on_probation <= limit,
            "{h} stayed on v2 in probation {on_probation} ms > {limit} ms: {doc:#}"
        );
        assert_eq!(rig.served_version(h).as_deref(), Some("v1"), "{h}");
    }
    let halted = halted.unwrap_or_default();
    // Both ends notice the silent cut by keepalive (1 s + 2 s), not after
    // the 20 s of the defaults.
    for (h, t) in ["h3", "h4"].iter().zip(alone) {
        let t = t.unwrap_or_default();
        assert!(
            t <= Duration::from_secs(10),
            "{h} noticed the lost coordinator only {t:?} after the cut"
        );
    }
    // Within the keepalive (3 s), the reconnect grace (a third of the 15 s
    // healthy_deadline) and the time to halt.
    assert!(
        halted <= Duration::from_secs(15),
        "the coordinator took {halted:?} to give up on the cut-off batch"
    );
    let s = crash_common::status(&rig, &id)?;
    assert_eq!(s["failures"], 2, "{s}");
    for h in ["h3", "h4"] {
        let p = crash_common::host_progress(&rig, &id, h)?;
        assert_eq!(p["failure"], "unreachable", "{h}: {p}");
    }
    // The fleet rollback could not reach the first batch: owed, and said so.
    for h in ["h1", "h2"] {
        let p = crash_common::host_progress(&rig, &id, h)?;
        assert_eq!(p["state"], "rollback_owed", "{h}: {p}");
    }
    assert!(
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("rollback still owed on h1,h2")),
        "{s}"
    );
    // Heal: the hosts come back; the coordinator rolls back the first batch
    // and records where the others are.
    for p in &rig.proxies {
        p.heal();
    }
    crash_common::wait_connected(&rig)?;
    for h in ["h3", "h4"] {
        let p = poll(&format!("{h} reconciled"), Duration::from_secs(20), || {
            let p = crash_common::host_progress(&rig, &id, h).ok()?;
            p["reason"]
                .as_str()?
                .contains("returned on v1")
                .then_some(p)
        })?;
        assert!(
            p["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("rolled_back"),
            "the reconciliation of {h} does not quote its rollback: {p}"
        );
    }
    for h in ["h1", "h2"] {
        poll(
            &format!("{h}'s owed rollback done"),
            Duration::from_secs(40),
            || {
                let p = crash_common::host_progress(&rig, &id, h).ok()?;
                (p["state"] == "rolled_back").then_some(())
            },
        )
        .with_context(|| {
            format!(
                "{:?}\n{}",
                crash_common::host_progress(&rig, &id, h).ok(),
                rig.coordinator_log()
            )
        })?;
    }
    let events = crash_common::events_contiguous(&rig, &id)?;
    for h in ["h3", "h4"] {
        assert!(
            events
                .iter()
                .any(|e| e["kind"] == "reconciled" && e["host"] == h),
            "no reconciliation of {h}: {events:?}"
        );
    }
    for h in ["h1", "h2"] {
        for kind in ["rollback_owed", "rolled_back"] {
            assert_eq!(
                events
                    .iter()
                    .filter(|e| e["kind"] == kind && e["host"] == h)
                    .count(),
                1,
                "{h}: one {kind}: {events:?}"
            );
        }
    }
    assert!(
        events.iter().any(|e| e["kind"] == "rollback_complete"),
        "{events:?}"
    );
    let s = crash_common::status(&rig, &id)?;
    assert_eq!(s["state"], "rolled_back", "{s}");
    assert_eq!(s["failures"], 2, "{s}");
    assert!(
        s["message"]
            .as_str()
            .is_some_and(|m| m.contains("fleet rollback complete")),
        "{s}"
    );
    for h in ["h1", "h2"] {
        rig.wait_idle_on(h, "v1", Duration::from_secs(30))?;
    }
    rig.wait_serving(&["h1", "h2", "h3", "h4"], "v1")?;
    let hist = rig.check_histories(&[&v1, &id])?;
    for (h, doc) in &hist {
        assert_eq!(activations(doc, &id), 1, "{h}: {doc:#}");
    }
    eprintln!(
        "coordinator partition: agents disconnected {alone:?}, hosts back on v1 {back:?} after \
         the cut, rollout rolled back {halted:?} after it; total {:?}",
        t0.elapsed()
    );
    Ok(())
}

/// Scenario 6: h2's data directory is a 64 MiB tmpfs (its own mount
/// namespace), filled until 4 MiB are free; v2 unpacks to 32 MiB. h2's stage
/// fails cleanly: `stage_failed` naming "no space left on device", nothing of
/// v2 left in its releases, v1 serving on in the same process, nothing of v2
/// in its history; the rollout succeeds on h1 and h3 within its budget.
#[test]
fn disk_full_during_staging_fails_the_stage_cleanly_and_leaves_the_running_release() -> Result<()> {
    let t0 = Instant::now();
    let rig = NetRig::start_with(3, |i, o| {
        if i == 1 {
            o.data_tmpfs = Some(64 << 20);
        }
    })?;
    let v1 = rig.deploy_v1()?;
    let h2 = &rig.c.agents[1];
    let services = |rig: &NetRig| -> Result<Vec<Pid>> {
        let agent = rig.agent_pid("h2")?;
        Ok(rig
            .host_pids("h2")?
            .into_iter()
            .filter(|p| *p != agent)
            .collect())
    };
    let pids_before = services(&rig)?;
    ensure!(!pids_before.is_empty(), "no service process on h2");
    let free = h2.fill_disk(4 << 20)?;
    ensure!(free <= 4 << 20, "{free} bytes still free on h2");
    let spec = rig.spec(
        "v2",
        &[
            ("max_failures", "1"),
            ("batch_percent", "100"),
            ("max_unavailable", "\"100%\""),
        ],
    )?;
    // v2 unpacks to 32 MiB of zeros (a few KiB compressed).
    rollout_tests::docker::write_artifact(
        &rig.work_dir().join("web-v2.tar.gz"),
        "version=v2",
        32 << 20,
    )?;
    let (ok, id, out, err) = rig.deploy_wait(&spec)?;
    ensure!(
        ok,
        "v2 deploy failed:\n{out}\n{err}\n{}",
        rig.coordinator_log()
    );
    let s = crash_common::status(&rig, &id)?;
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(s["failures"], 1, "{s}");
    let p = crash_common::host_progress(&rig, &id, "h2")?;
    assert_eq!(p["failure"], "stage_failed", "{p}");
    assert!(
        p["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no space left on device"),
        "{p}"
    );
    let events = crash_common::events_contiguous(&rig, &id)?;
    assert!(
        events.iter().any(|e| e["host"] == "h2"
            && e["kind"] == "host_failed"
            && e["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("stage_failed") && m.contains("no space"))),
        "{events:?}"
    );
    // Nothing of v2 half-unpacked on h2, and v1 runs on, the same process.
    let dirs = h2.release_dirs("web");
    assert!(
        dirs.iter().all(|d| !d.contains("v2")),
        "leftovers of the failed stage on h2: {dirs:?}"
    );
    assert!(dirs.iter().any(|d| d == "v1"), "{dirs:?}");
    assert_eq!(h2.current_link("web").as_deref(), Some("v1"));
    let st = crash_common::agent_service(&rig, "h2", "web")?.context("h2 has no web")?;
    assert_eq!(st["current"], "v1", "{st}");
    assert_eq!(st["phase"], "idle", "{st}");
    assert_eq!(rig.served_version("h2").as_deref(), Some("v1"));
    assert_eq!(services(&rig)?, pids_before);
    let doc = rig.agent_releases("h2", "web")?;
    assert!(
        !doc["history"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|e| e["release"] == "v2"),
        "h2 recorded v2 although it never staged it: {doc:#}"
    );
    rig.wait_serving(&["h1", "h3"], "v2")?;
    rig.check_histories(&[&v1, &id])?;
    eprintln!("disk full: {:?}", t0.elapsed());
    Ok(())
}

/// Scenario 5: h1 (agent and service) is frozen (SIGSTOP) while it verifies v2. The
/// coordinator's keepalive drops it as unreachable within
/// `healthy_deadline`, the rollout goes on to h2 and h3 within its failure
/// budget while h1 is still frozen, and when h1 thaws (SIGCONT) it reports
/// where it really is: the coordinator records it and h1 ends on v1, having
/// activated v2 once.
#[test]
fn frozen_agent_mid_activation_times_out_within_healthy_deadline_and_is_reconciled() -> Result<()> {
    let t0 = Instant::now();
    let rig = NetRig::start(3)?;
    let v1 = rig.deploy_v1()?;
    let healthy_deadline = Duration::from_secs(10);
    // Keepalive (not the Activate's own timeout, healthy_deadline +
    // min_healthy_time + slack) is what drops a frozen host in time.
    let keepalive = KEEPALIVE_INTERVAL + KEEPALIVE_TIMEOUT;
    ensure!(
        keepalive * 2 < healthy_deadline,
        "keepalive {keepalive:?} too long for this test"
    );
    let spec = rig.spec(
        "v2",
        &[
            ("batch_size", "1"),
            ("max_failures", "1"),
            ("min_healthy_time", "\"3s\""),
            ("healthy_deadline", "\"10s\""),
            ("commit_deadline", "\"1m\""),
        ],
    )?;
    let id = crash_common::deploy(&rig, &spec)?;
    poll("h1 verifying v2", Duration::from_secs(30), || {
        rig.phase_of("h1")
            .is_some_and(|(p, c)| p == "verifying" && c == "v2")
            .then_some(())
    })?;
    let frozen_pids = rig.freeze("h1")?;
    let frozen = Instant::now();
    let p = poll("h1 failed as unreachable", healthy_deadline, || {
        let p = crash_common::host_progress(&rig, &id, "h1").ok()?;
        (p["failure"] == "unreachable").then_some(p)
    })
    .with_context(|| format!("{:?}", crash_common::host_progress(&rig, &id, "h1").ok()))?;
    let detected = frozen.elapsed();
    assert!(
        detected <= healthy_deadline,
        "h1 dropped {detected:?} after it froze: {p}"
    );
    // The rollout goes on without h1, within its budget, while h1 is frozen.
    let s = rig.wait_state(&id, "succeeded", Duration::from_secs(60))?;
    assert_eq!(s["failures"], 1, "{s}");
    rig.wait_serving(&["h2", "h3"], "v2")?;
    assert!(!rig.connected("h1"), "h1 is frozen but listed as connected");
    let finished = frozen.elapsed();
    // Thaw: h1 finishes or abandons its activation, reconnects, reports; the
    // coordinator records where it is (and rolls it back if it came back in
    // probation on v2: the rollout counted it as failed).
    rig.thaw(&frozen_pids)?;
    let thawed = Instant::now();
    rig.wait_idle_on("h1", "v1", Duration::from_secs(40))?;
    let p = poll("h1 reconciled", Duration::from_secs(20), || {
        let p = crash_common::host_progress(&rig, &id, "h1").ok()?;
        p["reason"].as_str()?.contains("returned on").then_some(p)
    })?;
    let events = crash_common::events_contiguous(&rig, &id)?;
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "reconciled" && e["host"] == "h1"),
        "{events:?}"
    );
    let s = crash_common::status(&rig, &id)?;
    assert_eq!(s["state"], "succeeded", "{s}");
    assert_eq!(s["failures"], 1, "{s}");
    rig.wait_serving(&["h1"], "v1")?;
    let hist = rig.check_histories(&[&v1, &id])?;
    for (h, doc) in &hist {
        assert_eq!(
            activations(doc, &id),
            1,
            "{h} (no double activation): {doc:#}"
        );
    }
    eprintln!(
        "frozen host (keepalive {keepalive:?}): dropped {detected:?} after the freeze, rollout \
         finished {finished:?} after it, h1 reconciled {:?} after the thaw ({}); total {:?}",
        thawed.elapsed(),
        p["reason"],
        t0.elapsed()
    );
    Ok(())
}

/// Scenario 7: while v2 rolls out over ten hosts, random hosts are cut off
/// and reconnected again and again (a bounded, seeded schedule; set
/// `ROLLOUT_FLAP_SEED` to replay one). The rollout converges in one attempt:
/// it succeeds with no host failed, every host serves v2, and each host's own
/// history shows exactly one activation by it.
#[test]
fn flapping_network_during_a_ten_host_rollout_converges_without_duplicate_activations() -> Result<()>
{
    const FLAPS: usize = 12;
    let t0 = Instant::now();
    let rig = NetRig::start(10)?;
    let hosts = rig.hosts();
    let v1 = rig.deploy_v1()?;
    let seed: u64 = std::env::var("ROLLOUT_FLAP_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(rollout_tests::flap::DEFAULT_SEED);
    eprintln!("flap seed {seed} (ROLLOUT_FLAP_SEED={seed} replays it)");
    let spec = rig.spec(
        "v2",
        &[
            ("batch_size", "1"),
            ("max_unavailable", "2"),
            ("max_failures", "\"50%\""),
            ("min_healthy_time", "\"2s\""),
            ("healthy_deadline", "\"10s\""),
            ("commit_deadline", "\"10s\""),
            // A rollout stuck behind a host that never returns fails, not hangs.
            ("progress_deadline", "\"3m\""),
        ],
    )?;
    let done = AtomicBool::new(false);
    let (first, flapped) = std::thread::scope(|sc| -> Result<(String, Vec<String>)> {
        let flapper = sc.spawn(|| -> Result<Vec<String>> {
            let mut rng = rollout_tests::flap::Rng::new(seed);
            let mut log = Vec::new();
            for _ in 0..FLAPS {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                let i = usize::try_from(rng.below(rig.proxies.len() as u64))?;
                // Down long enough, at times, for the keepalive to drop the
                // session (interval + timeout), at times not.
                let down = Duration::from_millis(300 + rng.below(3700));
                let up = Duration::from_millis(100 + rng.below(400));
                rig.proxies[i].partition();
                // The fault schedule itself: timed waits between flaps.
                std::thread::sleep(down);
                rig.proxies[i].heal();
                log.push(format!("{} down {down:?}", hosts[i]));
                std::thread::sleep(up);
            }
            Ok(log)
        });
        let started = Instant::now();
        let res = rig.deploy_wait(&spec);
        done.store(true, Ordering::SeqCst);
        eprintln!("first attempt took {:?}", started.elapsed());
        let flapped = flapper
            .join()
            .map_err(|_| anyhow::anyhow!("the flapper panicked"))??;
        let (ok, id, out, err) = res?;
        ensure!(
            ok,
            "v2 deploy failed under flapping ({flapped:?}):\n{out}\n{err}\n{}",
            rig.coordinator_log()
        );
        Ok((id, flapped))
    })?;
    eprintln!("flaps: {flapped:?}");
    ensure!(
        rig.proxies.iter().all(|p| !p.is_partitioned()),
        "a host is still cut off after the flapping"
    );
    // Ten batches of a host each last well over four flaps.
    ensure!(
        flapped.len() >= 4,
        "only {} flaps happened during the rollout: {flapped:?}",
        flapped.len()
    );
    let s = crash_common::status(&rig, &first)?;
    assert_eq!(s["state"], "succeeded", "{s}");
    // Nothing lost to the flaps: a Stage or Commit cut is sent again when
    // the host is back, a host offline when its batch comes is waited for,
    // one cut mid-activation is judged from its report when it reconnects.
    assert_eq!(s["failures"], 0, "{s}\n{}", rig.coordinator_log());
    crash_common::wait_connected(&rig)?;
    let all: Vec<&str> = hosts.iter().map(String::as_str).collect();
    rig.wait_serving(&all, "v2")?;
    let hist = rig.check_histories(&[&v1, &first])?;
    for (h, doc) in &hist {
        assert_eq!(activations(doc, &first), 1, "{h}: {doc:#}");
    }
    eprintln!(
        "flapping: {} flaps, every host on v2 after one attempt; total {:?}",
        flapped.len(),
        t0.elapsed()
    );
    Ok(())
}
