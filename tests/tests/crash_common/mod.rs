//! The crash scenarios of issue 7, written once against [`Rig`]: a coordinator
//! and agents that can be crashed and restarted. `docker_crash.rs` runs them
//! on containers, `loopback_faults.rs` on processes on 127.0.0.1.
//!
//! * [`agent_crash_points`] (scenario 1): one host per agent crash point of
//!   an activation and of a rollback, all in one rollout; each agent kills
//!   itself at its point, is started again, and must end healthy and idle on
//!   a release it committed or its last known good one, with a consistent
//!   history and the coordinator's view matching its own.
//! * [`coordinator_crash_points`] (scenario 2): for every point of
//!   [`CRASH_POINTS`], a rollout that kills the coordinator right after
//!   persisting that transition; restarted, the rollout finishes and each
//!   host was activated exactly once (from the agents' own histories).
//! * [`rolling_restarts_with_three_rollouts`] (scenario 8): three services'
//!   rollouts at once while the coordinator is killed or stopped and started
//!   again a few times.
//!
//! Each ends with the history checker and a check that every rollout's event
//! log has contiguous sequence numbers.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use rollout_coordinator::store::CRASH_POINTS;
use rollout_tests::docker::{poll, write_artifact};
use serde_json::Value;

/// The agent's crash points of an activation and of its rollback, and whether
/// the new release must be unhealthy on that host for the point to be reached.
pub const AGENT_POINTS: &[(&str, bool)] = &[
    ("activating:before_stop:intent", true),
    ("activating:before_stop:done", true),
    ("activating:stop:intent", true),
    ("activating:stop:done", true),
    ("activating:before_switch:intent", true),
    ("activating:before_switch:done", true),
    ("activating:switch:intent", true),
    ("activating:switch:done", true),
    ("activating:after_switch:intent", true),
    ("activating:after_switch:done", true),
    ("activating:start:intent", true),
    ("activating:start:done", true),
    ("verifying:intent", true),
    ("probation:intent", true),
    ("rolling_back:stop:intent", false),
    ("rolling_back:stop:done", false),
    ("rolling_back:switch:intent", false),
    ("rolling_back:switch:done", false),
    ("rolling_back:start:intent", false),
    ("rolling_back:start:done", false),
    ("rolling_back:verify:intent", false),
];

/// Longest wait of one step of a scenario.
pub const WAIT: Duration = Duration::from_secs(60);

/// A coordinator and agents `hosts()`, each agent with `[env]` set by the
/// rig's maker, that a scenario crashes and restarts.
pub trait Rig {
    /// The agents' host names.
    fn hosts(&self) -> Vec<String>;
    /// `rollout <args>` against the coordinator: (success, stdout, stderr).
    fn cli(&self, args: &[&str]) -> Result<(bool, String, String)>;
    /// Host dir where specs and artifacts are written.
    fn work_dir(&self) -> PathBuf;
    /// The path of a file of [`Rig::work_dir`] as the CLI sees it.
    fn cli_path(&self, file: &str) -> String;
    /// The sample service's binary as the agents see it.
    fn sample_service(&self) -> String;
    /// `rollout-agent status --output json` of `host`.
    fn agent_status(&self, host: &str) -> Result<Value>;
    /// `rollout-agent releases <service> --output json` of `host`.
    fn agent_releases(&self, host: &str, service: &str) -> Result<Value>;
    /// Starts the agent of `host` again (killing it first if it runs) with
    /// `[testing] crash_at` set to `crash_at` (or unset); waits for its socket.
    fn restart_agent(&mut self, host: &str, crash_at: Option<&str>) -> Result<()>;
    /// SIGKILL of the agent of `host` (its services run on).
    fn kill9_agent(&mut self, host: &str) -> Result<()>;
    /// Waits until the agent of `host` has exited by itself.
    fn wait_agent_exit(&mut self, host: &str) -> Result<()>;
    /// The agent's log.
    fn agent_log(&self, host: &str) -> String;
    /// Starts the coordinator (killing it first if it runs) with
    /// `[testing] crash_at` set to `crash_at` (or unset); waits until it answers.
    fn restart_coordinator(&mut self, crash_at: Option<&str>) -> Result<()>;
    /// SIGKILL of the coordinator.
    fn kill9_coordinator(&mut self) -> Result<()>;
    /// SIGTERM of the coordinator, waiting until it has exited.
    fn stop_coordinator(&mut self) -> Result<()>;
    /// Waits until the coordinator has exited by itself.
    fn wait_coordinator_exit(&mut self) -> Result<()>;
    /// The coordinator's log.
    fn coordinator_log(&self) -> String;

    /// `rollout --output json <args>`, parsed.
    fn json(&self, args: &[&str]) -> Result<Value> {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        let (ok, out, err) = self.cli(&a)?;
        ensure!(ok, "rollout {args:?} failed: {err}{out}");
        Ok(serde_json::from_str(&out)?)
    }
}

/// What a spec deploys.
#[derive(Debug, Clone)]
pub struct Spec<'a> {
    /// Service name.
    pub service: &'a str,
    /// Release.
    pub release: &'a str,
    /// The `[env]` variable holding the service's port on each host.
    pub port_var: &'a str,
    /// Extra argv of the sample service (e.g. `--healthy ${X}`).
    pub argv: &'a [&'a str],
    /// `[strategy]` keys with TOML values, over the defaults here.
    pub strategy: &'a [(&'a str, &'a str)],
}

/// Writes the artifact and spec; the spec's path as the CLI sees it.
pub fn write_spec(rig: &dyn Rig, s: &Spec) -> Result<String> {
    let work = rig.work_dir();
    let art = format!("{}-{}.tar.gz", s.service, s.release);
    write_artifact(&work.join(&art), &format!("version={}", s.release), 0)?;
    let mut strat: BTreeMap<&str, &str> = [
        ("min_healthy_time", "\"300ms\""),
        ("healthy_deadline", "\"5s\""),
        ("commit_deadline", "\"2m\""),
    ]
    .into_iter()
    .collect();
    strat.extend(s.strategy.iter().copied());
    let mut argv = vec![
        rig.sample_service(),
        "--port".into(),
        format!("${{{}}}", s.port_var),
    ];
    argv.extend(s.argv.iter().map(|a| a.to_string()));
    let mut spec = format!(
        r#"service = "{svc}"
release = "{rel}"

[artifact]
path = "{art}"

[run]
exec = {argv:?}
stop_timeout = "2s"

[[health]]
name = "http"
http = "http://127.0.0.1:${{{port}}}/health"
interval = "100ms"
timeout = "500ms"
failure_threshold = 2

[targets]
labels = {{ role = "web" }}

[strategy]
"#,
        svc = s.service,
        rel = s.release,
        port = s.port_var,
    );
    for (k, v) in strat {
        spec.push_str(&format!("{k} = {v}\n"));
    }
    let file = format!("{}-{}.toml", s.service, s.release);
    std::fs::write(work.join(&file), spec)?;
    Ok(rig.cli_path(&file))
}

/// `rollout deploy <spec>`: the rollout id.
pub fn deploy(rig: &dyn Rig, spec: &str) -> Result<String> {
    let v = rig.json(&["deploy", spec])?;
    v["rollout_id"]
        .as_str()
        .map(str::to_string)
        .with_context(|| format!("no rollout_id in {v}"))
}

/// `rollout status <id>`.
pub fn status(rig: &dyn Rig, id: &str) -> Result<Value> {
    let v = rig.json(&["status", id])?;
    Ok(v.get(0).cloned().unwrap_or(v))
}

/// Waits until rollout `id` is in `state`.
pub fn wait_state(rig: &dyn Rig, id: &str, state: &str) -> Result<Value> {
    poll(&format!("rollout {id} {state}"), WAIT, || {
        status(rig, id).ok().filter(|s| s["state"] == state)
    })
    .with_context(|| {
        format!(
            "now {:?}\n--- coordinator log ---\n{}",
            status(rig, id).ok(),
            tail(&rig.coordinator_log(), 80)
        )
    })
}

/// The id of the (one) rollout of `service` `release`, found in the list.
pub fn rollout_of(rig: &dyn Rig, service: &str, release: &str) -> Result<String> {
    let v = rig.json(&["status"])?;
    let ids: Vec<String> = v
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["service"] == service && r["release"] == release)
        .filter_map(|r| r["id"].as_str().map(str::to_string))
        .collect();
    ensure!(
        ids.len() == 1,
        "expected one rollout of {service} {release}, found {ids:?}"
    );
    Ok(ids[0].clone())
}

/// The coordinator's record of `host` in rollout `id`.
pub fn host_progress(rig: &dyn Rig, id: &str, host: &str) -> Result<Value> {
    let s = status(rig, id)?;
    s["batches"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|b| b["hosts"].as_array().into_iter().flatten())
        .find(|h| h["host"] == host)
        .cloned()
        .with_context(|| format!("{host} is not in rollout {id}: {s}"))
}

/// Waits until the coordinator lists every host as connected.
pub fn wait_connected(rig: &dyn Rig) -> Result<()> {
    let hosts = rig.hosts();
    poll("every agent connected", WAIT, || {
        let v = rig.json(&["hosts"]).ok()?;
        let up: Vec<&str> = v
            .as_array()?
            .iter()
            .filter(|h| h["connected"] == true)
            .filter_map(|h| h["host"].as_str())
            .collect();
        hosts.iter().all(|h| up.contains(&h.as_str())).then_some(())
    })
}

/// The host's own report of `service`, if it has it.
pub fn agent_service(rig: &dyn Rig, host: &str, service: &str) -> Result<Option<Value>> {
    let st = rig.agent_status(host)?;
    Ok(st["services"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["service"] == service)
        .cloned())
}

/// The host's own history of `service`.
pub fn history(rig: &dyn Rig, host: &str, service: &str) -> Result<Vec<Value>> {
    Ok(rig.agent_releases(host, service)?["history"]
        .as_array()
        .cloned()
        .unwrap_or_default())
}

/// How many times `host` activated `service` for rollout `id`, by its own history.
pub fn activations(rig: &dyn Rig, host: &str, service: &str, id: &str) -> Result<usize> {
    Ok(history(rig, host, service)?
        .iter()
        .filter(|e| e["event"] == "activating" && e["cause"] == id)
        .count())
}

/// The history checker: on every host, at most one activation of `service`
/// per rollout in `rollouts`, history sequence numbers strictly increasing,
/// and the service idle on a release the host committed or on its last known
/// good one.
pub fn check_histories(rig: &dyn Rig, service: &str, rollouts: &[&str]) -> Result<()> {
    for h in rig.hosts() {
        let doc = rig.agent_releases(&h, service)?;
        let hist = doc["history"].as_array().cloned().unwrap_or_default();
        let seqs: Vec<u64> = hist.iter().filter_map(|e| e["seq"].as_u64()).collect();
        ensure!(
            seqs.len() == hist.len() && seqs.windows(2).all(|w| w[0] < w[1]),
            "{h}: history of {service} out of order: {seqs:?}"
        );
        for id in rollouts {
            let n = hist
                .iter()
                .filter(|e| e["event"] == "activating" && e["cause"] == *id)
                .count();
            ensure!(
                n <= 1,
                "{h} activated {service} {n} times for rollout {id}: {doc:#}"
            );
        }
        if let Some(s) = agent_service(rig, &h, service)? {
            let cur = s["current"].as_str().unwrap_or_default();
            let committed = hist
                .iter()
                .any(|e| e["event"] == "committed" && e["release"] == cur);
            ensure!(
                s["phase"] == "idle" && (committed || s["last_known_good"] == cur),
                "{h} ends {service} on {cur} in phase {}, neither committed nor last known \
                 good ({}): {doc:#}",
                s["phase"],
                s["last_known_good"]
            );
        }
    }
    Ok(())
}

/// The coordinator's event log of `id` has no gap and no duplicate; returns it.
pub fn events_contiguous(rig: &dyn Rig, id: &str) -> Result<Vec<Value>> {
    let v = rig.json(&["events", id])?;
    let events = v.as_array().cloned().unwrap_or_default();
    let seqs: Vec<u64> = events.iter().filter_map(|e| e["seq"].as_u64()).collect();
    ensure!(
        !events.is_empty() && seqs.len() == events.len(),
        "events of {id} without seq: {events:?}"
    );
    ensure!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "event log of {id} has gaps or duplicates: {seqs:?}"
    );
    Ok(events)
}

/// Waits until `host` runs `service` idle and healthy on `release`.
pub fn wait_idle_on(rig: &dyn Rig, host: &str, service: &str, release: &str) -> Result<Value> {
    poll(
        &format!("{host} idle and healthy on {release}"),
        WAIT,
        || {
            let s = agent_service(rig, host, service).ok()??;
            (s["phase"] == "idle" && s["current"] == release && s["health"] == "healthy")
                .then_some(s)
        },
    )
    .with_context(|| {
        format!(
            "now {:?}\n--- {host} log ---\n{}",
            agent_service(rig, host, service).ok(),
            tail(&rig.agent_log(host), 60)
        )
    })
}

fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

const ALL_AT_ONCE: &[(&str, &str)] = &[("batch_percent", "100"), ("max_unavailable", "\"100%\"")];

/// Deploys `release` of `service` to every host at once and waits for success.
fn deploy_everywhere(
    rig: &dyn Rig,
    service: &str,
    port_var: &str,
    release: &str,
) -> Result<String> {
    let spec = write_spec(
        rig,
        &Spec {
            service,
            release,
            port_var,
            argv: &[],
            strategy: ALL_AT_ONCE,
        },
    )?;
    let id = deploy(rig, &spec)?;
    wait_state(rig, &id, "succeeded")?;
    Ok(id)
}

// ---------------------------------------------------------------------------
// Scenario 1: agent crash points.

/// Crash hosts per round of [`agent_crash_points`]: the points are taken in
/// rounds on one small fleet (a few hosts keep a 2-core machine responsive).
pub const AGENT_CRASH_PER_ROUND: usize = 7;
const _: () = assert!(AGENT_POINTS.len().is_multiple_of(AGENT_CRASH_PER_ROUND));

/// The number of hosts [`agent_crash_points`] needs: a control host and
/// [`AGENT_CRASH_PER_ROUND`] crash hosts.
pub fn agent_crash_hosts() -> usize {
    AGENT_CRASH_PER_ROUND + 1
}

fn agent_crash_rounds() -> usize {
    AGENT_POINTS.len().div_ceil(AGENT_CRASH_PER_ROUND)
}

/// The `[env]` of host `i` (0-based) of [`agent_crash_points`]: `h1` is the
/// control host without a crash point; in round `r` host `i > 0` crashes at
/// [`AGENT_POINTS`]`[r * AGENT_CRASH_PER_ROUND + i - 1]`, and `HEALTHY_R<r>`
/// makes that round's release unhealthy on it when its point is in a rollback.
pub fn agent_crash_env(host_index: usize) -> Vec<(String, String)> {
    (0..agent_crash_rounds())
        .map(|r| {
            let healthy = match host_index.checked_sub(1) {
                None => true,
                Some(i) => AGENT_POINTS
                    .get(r * AGENT_CRASH_PER_ROUND + i)
                    .is_none_or(|p| p.1),
            };
            (format!("HEALTHY_R{r}"), healthy.to_string())
        })
        .collect()
}

/// Scenario 1 on a rig of [`agent_crash_hosts`] hosts `h1..`, host `i`
/// (0-based) with [`agent_crash_env`]`(i)`, the service on `${PORT}`: in
/// rounds, each crash host armed with its point, one rollout to every host.
pub fn agent_crash_points(rig: &mut dyn Rig) -> Result<()> {
    let t0 = Instant::now();
    let hosts = rig.hosts();
    ensure!(hosts.len() == agent_crash_hosts(), "{hosts:?}");
    let mut ids = vec![deploy_everywhere(rig, "web", "PORT", "v1")?];
    for (r, points) in AGENT_POINTS.chunks(AGENT_CRASH_PER_ROUND).enumerate() {
        let t = Instant::now();
        let id = agent_crash_round(rig, r, points)?;
        ids.push(id);
        eprintln!("agent crash points, round {r}: {:?}", t.elapsed());
    }
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    check_histories(rig, "web", &ids)?;
    eprintln!(
        "agent crash points: {} points on {} hosts in {:?}",
        AGENT_POINTS.len(),
        hosts.len(),
        t0.elapsed()
    );
    Ok(())
}

fn rollbacks_to(rig: &dyn Rig, host: &str, release: &str) -> Result<usize> {
    Ok(history(rig, host, "web")?
        .iter()
        .filter(|e| e["event"] == "rolled_back" && e["release"] == release)
        .count())
}

fn agent_crash_round(rig: &mut dyn Rig, round: usize, points: &[(&str, bool)]) -> Result<String> {
    let hosts = rig.hosts();
    let control = hosts[0].clone();
    let crash: Vec<(String, &str)> = hosts[1..]
        .iter()
        .zip(points)
        .map(|(h, p)| (h.clone(), p.0))
        .collect();
    let release = format!("v{}", round + 2);
    // Arm each crash host's point (an agent restart; its service runs on).
    // A host's old release is the one it runs now: v1, or the release an
    // earlier round committed on it.
    let mut before = BTreeMap::new();
    for (h, point) in &crash {
        let old = agent_service(rig, h, "web")?
            .and_then(|s| s["current"].as_str().map(str::to_string))
            .with_context(|| format!("{h} runs no release of web"))?;
        let n = rollbacks_to(rig, h, &old)?;
        before.insert(h.clone(), (old, n));
        rig.restart_agent(h, Some(point))?;
    }
    wait_connected(rig)?;
    let healthy = format!("${{HEALTHY_R{round}}}");
    let spec = write_spec(
        rig,
        &Spec {
            service: "web",
            release: &release,
            port_var: "PORT",
            argv: &["--healthy", &healthy],
            strategy: &[
                ("batch_percent", "100"),
                ("max_unavailable", "\"100%\""),
                ("max_failures", "\"100%\""),
                ("healthy_deadline", "\"3s\""),
            ],
        },
    )?;
    let id = deploy(rig, &spec)?;
    // Every crash host's agent kills itself at its point; start it again
    // without it: it recovers from its journal.
    for (h, point) in &crash {
        rig.wait_agent_exit(h)
            .with_context(|| format!("{h} at {point}"))?;
        let log = rig.agent_log(h);
        ensure!(
            log.contains("crash point reached") && log.contains(point),
            "{h}'s agent exited but not at {point}:\n{}",
            tail(&log, 40)
        );
        rig.restart_agent(h, None)?;
    }
    let s = wait_state(rig, &id, "succeeded")?;
    // The control host: on the new release, committed.
    let p = host_progress(rig, &id, &control)?;
    ensure!(p["state"] == "committed", "{p}");
    wait_idle_on(rig, &control, "web", &release)?;
    // Each crash host ends idle and healthy on its old release or on the new one (an
    // interrupted activation or rollback is rolled back by the agent; one
    // found in probation after its restart is committed or rolled back by
    // the coordinator), activated once, and the coordinator's record agrees
    // with the host's own: committed on the new release, else failed (and,
    // if counted unreachable, reconciled when it returned).
    let mut on_old = 0;
    for (h, point) in &crash {
        let (old_release, rollbacks_before) = &before[h];
        let st = poll(&format!("{h} idle and healthy"), WAIT, || {
            let s = agent_service(rig, h, "web").ok()??;
            (s["phase"] == "idle"
                && s["health"] == "healthy"
                && (s["current"] == old_release.as_str() || s["current"] == release.as_str()))
            .then_some(s)
        })
        .with_context(|| {
            format!(
                "{h} crashed at {point}; now {:?}\n{}",
                agent_service(rig, h, "web").ok(),
                tail(&rig.agent_log(h), 40)
            )
        })?;
        let old = st["current"] == old_release.as_str();
        on_old += usize::from(old);
        let n = activations(rig, h, "web", &id)?;
        ensure!(n == 1, "{h} ({point}) activated {release} {n} times");
        let after = rollbacks_to(rig, h, old_release)?;
        ensure!(
            after == rollbacks_before + usize::from(old),
            "{h} ({point}) rolled back to {old_release} {} times in this round: {:?}",
            after - rollbacks_before,
            history(rig, h, "web")?
        );
        poll(&format!("{h}'s record to match the host"), WAIT, || {
            let p = host_progress(rig, &id, h).ok()?;
            let agrees = if old {
                p["state"] == "failed"
                    && (p["failure"] != "unreachable"
                        || p["reason"].as_str()?.contains("returned on"))
            } else {
                p["state"] == "committed"
            };
            agrees.then_some(())
        })
        .with_context(|| {
            format!(
                "{h} ({point}) is on {}; the coordinator says {:?}",
                st["current"],
                host_progress(rig, &id, h).ok()
            )
        })?;
    }
    ensure!(
        s["failures"] == on_old,
        "{on_old} crash hosts returned to their old release, the rollout counts other failures: {s}"
    );
    // The coordinator's live view of every host matches the host's own.
    poll(
        "the coordinator's host list to match the agents",
        WAIT,
        || {
            let v = rig.json(&["hosts"]).ok()?;
            let mut ok = true;
            for h in &hosts {
                let own = agent_service(rig, h, "web").ok()??;
                ok &= v.as_array().into_iter().flatten().any(|x| {
                    x["host"] == h.as_str()
                        && x["services"].as_array().into_iter().flatten().any(|s| {
                            s["service"] == "web"
                                && s["release"] == own["current"]
                                && s["phase"] == "idle"
                                && s["health"] == "healthy"
                        })
                });
            }
            ok.then_some(())
        },
    )?;
    events_contiguous(rig, &id)?;
    Ok(id)
}

// ---------------------------------------------------------------------------
// Scenario 2: coordinator crash points.

/// What drives a rollout to a coordinator crash point.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Recipe {
    /// Two batches, both healthy: succeeds.
    Success,
    /// h1 commits, h2 is unhealthy: halts and rolls h1 back.
    Failing,
    /// Canary h1, waits for promote (and the operator's actions), succeeds.
    Canary,
    /// Canary h1, waits for promote, aborted: h1 rolled back, h2 untouched.
    Abort,
    /// As `Abort`, with h1's agent down at the abort: its rollback is owed
    /// and sent when it returns.
    Owed,
}

fn recipe(point: &str) -> Result<Recipe> {
    Ok(match point {
        "created" | "running" | "batch_started" | "host_activating" | "host_probation"
        | "host_committed" | "batch_done" | "succeeded" => Recipe::Success,
        "host_failed" | "halted" | "rolling_back" | "host_rolled_back" | "rolled_back" => {
            Recipe::Failing
        }
        "waiting_promote" | "promoted" | "paused" | "resumed" => Recipe::Canary,
        "aborted" => Recipe::Abort,
        "host_rollback_owed" | "rollback_complete" => Recipe::Owed,
        p => bail!("no recipe reaches coordinator crash point {p}"),
    })
}

/// The `[env]` of host `i` of [`coordinator_crash_points`]: the failing
/// recipe's release is healthy on `h1` only.
pub fn coordinator_crash_env(host_index: usize) -> Vec<(String, String)> {
    vec![("CANARY_HEALTHY".into(), (host_index == 0).to_string())]
}

/// Scenario 2 on a rig of two hosts with [`coordinator_crash_env`], the
/// service on `${PORT}`: every point of [`CRASH_POINTS`], one rollout each.
pub fn coordinator_crash_points(rig: &mut dyn Rig) -> Result<()> {
    let t0 = Instant::now();
    let hosts = rig.hosts();
    ensure!(hosts.len() == 2, "{hosts:?}");
    let mut prev = "v0".to_string();
    let mut all_ids = vec![deploy_everywhere(rig, "web", "PORT", &prev)?];
    for (i, point) in CRASH_POINTS.iter().enumerate() {
        let t = Instant::now();
        let rel = format!("c{i}");
        let id = coordinator_crash_point(rig, point, &rel, &prev)
            .with_context(|| format!("coordinator crash point {point}"))?;
        let ended_on_new = matches!(recipe(point)?, Recipe::Success | Recipe::Canary);
        if ended_on_new {
            prev = rel;
        }
        all_ids.push(id);
        eprintln!("coordinator crash point {point}: {:?}", t.elapsed());
    }
    let ids: Vec<&str> = all_ids.iter().map(String::as_str).collect();
    check_histories(rig, "web", &ids)?;
    eprintln!(
        "coordinator crash points: {} in {:?}",
        CRASH_POINTS.len(),
        t0.elapsed()
    );
    Ok(())
}

fn coordinator_crash_point(
    rig: &mut dyn Rig,
    point: &str,
    rel: &str,
    prev: &str,
) -> Result<String> {
    let hosts = rig.hosts();
    let recipe = recipe(point)?;
    rig.restart_coordinator(Some(point))?;
    ensure!(
        !rig.coordinator_log().contains("crash_at is ignored"),
        "the coordinator binary was built without its crash points (e.g. by `cargo build -p \
         rollout-coordinator`); build it with `cargo build --workspace`, which enables the \
         `crash-points` feature through the tests crate"
    );
    wait_connected(rig)?;
    let mut strategy = vec![("batch_size", "1"), ("max_unavailable", "1")];
    let mut argv: Vec<&str> = Vec::new();
    match recipe {
        Recipe::Success => {}
        Recipe::Failing => {
            argv = vec!["--healthy", "${CANARY_HEALTHY}"];
            strategy.push(("healthy_deadline", "\"2s\""));
        }
        Recipe::Canary | Recipe::Abort | Recipe::Owed => {
            strategy = vec![
                ("canary", "[1, \"100%\"]"),
                ("pause_after_canary", "true"),
                ("max_unavailable", "1"),
            ];
        }
    }
    let spec = write_spec(
        rig,
        &Spec {
            service: "web",
            release: rel,
            port_var: "PORT",
            argv: &argv,
            strategy: &strategy,
        },
    )?;
    // Drive the rollout until the coordinator dies at the point; the action
    // that reaches it may fail (the coordinator died answering it).
    let deployed = deploy(rig, &spec);
    ensure!(
        deployed.is_ok() || point == "created",
        "deploy failed before the crash point: {deployed:?}"
    );
    if let Ok(id) = &deployed
        && recipe == Recipe::Owed
    {
        wait_state(rig, id, "waiting_promote")?;
        rig.kill9_agent(&hosts[0])?;
        poll(&format!("{} disconnected", hosts[0]), WAIT, || {
            let v = rig.json(&["hosts"]).ok()?;
            v.as_array()?
                .iter()
                .any(|h| h["host"] == hosts[0].as_str() && h["connected"] == false)
                .then_some(())
        })?;
        let _ = rig.cli(&["abort", id]);
        if point == "rollback_complete" {
            // Owed until h1 returns; then the rollback is sent and settled.
            wait_state(rig, id, "aborted")?;
            rig.restart_agent(&hosts[0], None)?;
        }
    }
    if let Ok(id) = &deployed
        && matches!(recipe, Recipe::Canary | Recipe::Abort)
        && point != "waiting_promote"
    {
        wait_state(rig, id, "waiting_promote")?;
        let _ = match point {
            "promoted" => rig.cli(&["promote", id]),
            "paused" => rig.cli(&["pause", id]),
            "resumed" => {
                let (ok, out, err) = rig.cli(&["pause", id])?;
                ensure!(ok, "pause: {out}{err}");
                rig.cli(&["resume", id])
            }
            "aborted" => rig.cli(&["abort", id]),
            p => bail!("no operator action reaches {p}"),
        };
    }
    rig.wait_coordinator_exit().with_context(|| {
        format!(
            "deploy: {deployed:?}\n--- coordinator log ---\n{}",
            tail(&rig.coordinator_log(), 60)
        )
    })?;
    let log = rig.coordinator_log();
    ensure!(
        log.contains("crash point reached") && log.contains(point),
        "the coordinator exited but not at {point}:\n{}",
        tail(&log, 40)
    );
    // Started again without the crash point, it resumes the rollout.
    rig.restart_coordinator(None)?;
    if point == "host_rollback_owed" {
        rig.restart_agent(&hosts[0], None)?;
    }
    let id = rollout_of(rig, "web", rel)?;
    if let Ok(d) = &deployed {
        ensure!(*d == id, "deploy said {d}, the list says {id}");
    }
    match point {
        "waiting_promote" | "resumed" => {
            wait_state(rig, &id, "waiting_promote")?;
            act(rig, "promote", &id)?;
        }
        "paused" => {
            wait_state(rig, &id, "paused")?;
            act(rig, "resume", &id)?;
            wait_state(rig, &id, "waiting_promote")?;
            act(rig, "promote", &id)?;
        }
        _ => {}
    }
    let (end, on) = match recipe {
        Recipe::Success | Recipe::Canary => ("succeeded", [rel, rel]),
        Recipe::Failing => ("rolled_back", [prev, prev]),
        Recipe::Abort | Recipe::Owed => ("aborted", [prev, prev]),
    };
    wait_state(rig, &id, end)?;
    for (h, release) in hosts.iter().zip(on) {
        wait_idle_on(rig, h, "web", release)?;
    }
    // Each host activated exactly once for the rollout (by its own
    // history), none skipped; after an abort the second host never was.
    for (i, h) in hosts.iter().enumerate() {
        let want = if matches!(recipe, Recipe::Abort | Recipe::Owed) && i == 1 {
            0
        } else {
            1
        };
        let n = activations(rig, h, "web", &id)?;
        ensure!(
            n == want,
            "{h} activated {rel} {n} times for {id}, want {want}: {:?}",
            history(rig, h, "web")?
        );
        if recipe == Recipe::Owed {
            continue;
        }
        let p = host_progress(rig, &id, h)?;
        let want_state = match (recipe, i) {
            (Recipe::Success | Recipe::Canary, _) => "committed",
            (Recipe::Failing, 0) | (Recipe::Abort, 0) => "rolled_back",
            (Recipe::Failing, _) => "failed",
            (Recipe::Abort, _) => "staged",
            (Recipe::Owed, _) => unreachable!("skipped above"),
        };
        ensure!(p["state"] == want_state, "{h} in {id}: {p}");
    }
    events_contiguous(rig, &id)?;
    Ok(id)
}

fn act(rig: &dyn Rig, verb: &str, id: &str) -> Result<()> {
    let (ok, out, err) = rig.cli(&[verb, id])?;
    ensure!(ok, "rollout {verb} {id}: {out}{err}");
    Ok(())
}

// ---------------------------------------------------------------------------
// Scenario 8: rolling restarts of the coordinator under three rollouts.

/// The three services of scenario 8 and their port variables.
pub const SERVICES: [(&str, &str); 3] =
    [("alpha", "PORT_A"), ("beta", "PORT_B"), ("gamma", "PORT_C")];

/// Scenario 8 on a rig whose hosts have `PORT_A`, `PORT_B` and `PORT_C`:
/// v1 of three services everywhere, then their v2 rollouts at once, batch by
/// batch, while the coordinator is killed (`kill -9`) and stopped cleanly in
/// turn, each time after the rollouts made progress, at most `restarts` times.
/// `min_healthy_time` (a TOML string) paces the batches: long enough for at
/// least two restarts on the rig.
pub fn rolling_restarts_with_three_rollouts(
    rig: &mut dyn Rig,
    restarts: usize,
    min_healthy_time: &str,
) -> Result<()> {
    let t0 = Instant::now();
    let hosts = rig.hosts();
    let mut v1 = Vec::new();
    for (svc, port) in SERVICES {
        v1.push(deploy_everywhere(rig, svc, port, "v1")?);
    }
    let mut ids = Vec::new();
    for (svc, port) in SERVICES {
        let spec = write_spec(
            rig,
            &Spec {
                service: svc,
                release: "v2",
                port_var: port,
                argv: &[],
                strategy: &[
                    ("batch_size", "1"),
                    ("max_unavailable", "1"),
                    ("min_healthy_time", min_healthy_time),
                    // Room for a slow probe on a loaded machine: a failed
                    // probe restarts the healthy window.
                    ("healthy_deadline", "\"30s\""),
                ],
            },
        )?;
        ids.push(deploy(rig, &spec)?);
    }
    let count_events = |rig: &dyn Rig| -> Option<usize> {
        let mut n = 0;
        for id in &ids {
            n += rig.json(&["events", id]).ok()?.as_array()?.len();
        }
        Some(n)
    };
    let all_done = |rig: &dyn Rig| -> bool {
        ids.iter().all(|id| {
            status(rig, id).is_ok_and(|s| {
                s["finished"] == true
                    || ["succeeded", "failed", "rolled_back", "aborted"]
                        .iter()
                        .any(|x| s["state"] == *x)
            })
        })
    };
    let mut done = 0;
    let mut seen = count_events(rig).unwrap_or(0);
    while done < restarts && !all_done(rig) {
        // Wait for progress since the last (re)start, then take it down.
        let before = seen;
        let progressed = poll("the rollouts to progress", WAIT, || {
            if all_done(rig) {
                return Some(None);
            }
            count_events(rig).filter(|n| *n >= before + 2).map(Some)
        })?;
        let Some(n) = progressed else { break };
        if done % 2 == 0 {
            rig.kill9_coordinator()?;
        } else {
            rig.stop_coordinator()?;
        }
        rig.restart_coordinator(None)?;
        done += 1;
        seen = count_events(rig).unwrap_or(n);
        eprintln!("rolling restart {done} at {:?} ({n} events)", t0.elapsed());
    }
    ensure!(
        done >= 2,
        "only {done} restarts happened before the rollouts ended"
    );
    for id in &ids {
        let s = wait_state(rig, id, "succeeded")?;
        ensure!(s["failures"] == 0, "{s}");
    }
    for ((svc, _), id) in SERVICES.iter().zip(&ids) {
        for h in &hosts {
            wait_idle_on(rig, h, svc, "v2")?;
            let n = activations(rig, h, svc, id)?;
            ensure!(n == 1, "{h} activated {svc} v2 {n} times for {id}");
        }
        events_contiguous(rig, id)?;
    }
    for (i, (svc, _)) in SERVICES.iter().enumerate() {
        check_histories(rig, svc, &[&v1[i], &ids[i]])?;
    }
    eprintln!(
        "rolling restarts: {done} restarts, 3 rollouts on {} hosts in {:?}",
        hosts.len(),
        t0.elapsed()
    );
    Ok(())
}

/// Implements [`Rig`] (imported at the call site) for a loopback rig: a struct with a tokio runtime `rt`,
/// a `rollout_tests::cluster::Cluster` `c` and an
/// `agent_json(&self, host, args) -> Result<Value>` method. Both loopback
/// test files use it; only how they call the agent's admin socket differs.
#[allow(unused_macros)]
macro_rules! loopback_rig {
    ($rig:ty) => {
        impl Rig for $rig {
            fn hosts(&self) -> Vec<String> {
                self.c.agents.iter().map(|a| a.opts.host.clone()).collect()
            }

            fn cli(&self, args: &[&str]) -> Result<(bool, String, String)> {
                let out = self.c.coord.cli(args);
                Ok((
                    out.status.success(),
                    String::from_utf8_lossy(&out.stdout).into_owned(),
                    String::from_utf8_lossy(&out.stderr).into_owned(),
                ))
            }

            fn work_dir(&self) -> PathBuf {
                self.c.work.path().to_path_buf()
            }

            fn cli_path(&self, file: &str) -> String {
                self.c.work.path().join(file).display().to_string()
            }

            fn sample_service(&self) -> String {
                bin("sample-service").display().to_string()
            }

            fn agent_status(&self, host: &str) -> Result<Value> {
                self.agent_json(host, &["status"])
            }

            fn agent_releases(&self, host: &str, service: &str) -> Result<Value> {
                self.agent_json(host, &["releases", service])
            }

            fn restart_agent(&mut self, host: &str, crash_at: Option<&str>) -> Result<()> {
                let i = self.index(host)?;
                self.rt
                    .block_on(self.c.agents[i].restart(crash_at.map(str::to_string)))
            }

            fn kill9_agent(&mut self, host: &str) -> Result<()> {
                let i = self.index(host)?;
                self.c.agents[i].kill9();
                Ok(())
            }

            fn wait_agent_exit(&mut self, host: &str) -> Result<()> {
                let i = self.index(host)?;
                self.rt.block_on(self.c.agents[i].wait_exit())
            }

            fn agent_log(&self, host: &str) -> String {
                self.index(host)
                    .map(|i| self.c.agents[i].log())
                    .unwrap_or_default()
            }

            fn restart_coordinator(&mut self, crash_at: Option<&str>) -> Result<()> {
                let extra = crash_at
                    .map(|p| format!("[testing]\ncrash_at = {p:?}"))
                    .unwrap_or_default();
                self.c.coord.set_extra(&extra);
                self.rt.block_on(self.c.coord.restart())
            }

            fn kill9_coordinator(&mut self) -> Result<()> {
                self.c.coord.kill9();
                Ok(())
            }

            fn stop_coordinator(&mut self) -> Result<()> {
                let st = self
                    .rt
                    .block_on(self.c.coord.stop(Duration::from_secs(20)))?;
                ensure!(st.success(), "the coordinator's clean stop ended with {st}");
                Ok(())
            }

            fn wait_coordinator_exit(&mut self) -> Result<()> {
                self.rt.block_on(self.c.coord.wait_exit(WAIT))?;
                Ok(())
            }

            fn coordinator_log(&self) -> String {
                self.c.coord.log()
            }
        }
    };
}
#[allow(unused_imports)]
pub(crate) use loopback_rig;
