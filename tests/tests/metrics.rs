//! Prometheus `/metrics` on both daemons: a real coordinator and two real
//! agents (one with `metrics_listen`, one without), a good deploy and one that
//! a host rolls back, then both endpoints scraped over plain HTTP and parsed
//! with a Prometheus text-format parser.

use std::collections::HashSet;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use prometheus_parse::{Scrape, Value};
use rollout_tests::cluster::{Cluster, CoordinatorProc};
use rollout_tests::{Agent, AgentOptions, DEADLINE, eventually, free_port, http_get};

/// GETs `/metrics` on 127.0.0.1:`port` and parses it.
fn scrape(port: u16) -> Option<Scrape> {
    let body = http_get(port, "/metrics")?;
    assert!(
        body.ends_with("# EOF\n"),
        "not an OpenMetrics body:\n{body}"
    );
    Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).ok()
}

/// The value of the sample `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .find_map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Some(v),
            _ => None,
        })
}

/// The `+Inf` bucket of the histogram `name` whose labels include `labels`.
fn histogram_total(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .filter(|x| x.metric == name)
        .filter(|x| labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .find_map(|x| match &x.value {
            Value::Histogram(b) => b
                .iter()
                .find(|b| b.less_than.is_infinite())
                .map(|b| b.count),
            _ => None,
        })
}

/// Pids of processes whose command line names `config`.
fn pids_with_arg(config: &Path) -> Vec<u32> {
    let want = config.display().to_string();
    let mut pids = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        if cmdline.split(|b| *b == 0).any(|a| a == want.as_bytes()) {
            pids.push(pid);
        }
    }
    pids
}

/// TCP ports `pid` listens on, from its socket fds and `/proc/<pid>/net/tcp{,6}`.
fn listening_ports(pid: u32) -> Vec<u16> {
    let inodes: HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|fd| std::fs::read_link(fd.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().into_owned();
            l.strip_prefix("socket:[")?
                .strip_suffix(']')
                .map(str::to_string)
        })
        .collect();
    let mut ports = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // local_address st ... inode: columns 1, 3 and 9; 0A is LISTEN.
            if cols.len() > 9 && cols[3] == "0A" && inodes.contains(cols[9]) {
                let port = cols[1].rsplit(':').next().unwrap_or_default();
                ports.extend(u16::from_str_radix(port, 16).ok());
            }
        }
    }
    ports
}

#[tokio::test]
async fn both_endpoints_are_scraped_and_parsed_after_a_deploy_and_a_host_rollback() -> Result<()> {
    let coord_metrics = free_port();
    let coord =
        CoordinatorProc::start_with(&format!("metrics_listen = \"127.0.0.1:{coord_metrics}\""))
            .await?;
    let agent_metrics = free_port();
    let mut agents = Vec::new();
    let mut ports = Vec::new();
    for (i, healthy) in ["false", "true"].into_iter().enumerate() {
        let port = free_port();
        let mut opts = AgentOptions::new(&format!("h{}", i + 1), Some(coord.url()));
        opts.env.push(("PORT".into(), port.to_string()));
        opts.env.push(("V2_HEALTHY".into(), healthy.into()));
        opts.labels.push(("role".into(), "web".into()));
        if i == 0 {
            opts.extra
                .push(format!("metrics_listen = \"127.0.0.1:{agent_metrics}\""));
        }
        agents.push(Agent::start(opts).await?);
        ports.push(port);
    }
    let c = Cluster {
        coord,
        agents,
        ports,
        work: tempfile::tempdir()?,
    };
    c.wait_hosts_connected().await?;

    // Off unless configured: h2 listens on no TCP port at all; h1 on exactly
    // its metrics port (which also shows the check sees listeners).
    let listeners = |a: &Agent| -> Result<Vec<u16>> {
        let pids = pids_with_arg(&a.config_path());
        ensure!(pids.len() == 1, "agent process not found: {pids:?}");
        Ok(listening_ports(pids[0]))
    };
    assert_eq!(listeners(&c.agents[0])?, vec![agent_metrics]);
    assert_eq!(listeners(&c.agents[1])?, Vec::<u16>::new());
    let config = std::fs::read_to_string(c.agents[1].config_path())?;
    assert!(!config.contains("metrics_listen"), "{config}");

    // v1 everywhere, one host per batch; then v2, which h1 rolls back
    // (unhealthy) within the failure budget.
    let v1 = c.spec("v1", &[], &[], "batch_size = 1\nmax_unavailable = 1")?;
    let (ok, out, err) = c.deploy_wait(&v1);
    ensure!(ok, "v1 deploy failed:\n{out}\n{err}\n{}", c.coord.log());
    c.all_serving("v1").await?;
    let v2 = c.spec(
        "v2",
        &[],
        &["--healthy", "${V2_HEALTHY}"],
        "batch_size = 1\nmax_unavailable = 1\nmax_failures = 1",
    )?;
    let (ok, out, err) = c.deploy_wait(&v2);
    ensure!(ok, "v2 should succeed within budget:\n{out}\n{err}");

    // The coordinator.
    let s = scrape(coord_metrics).context("coordinator /metrics")?;
    for name in [
        "rollout_rollouts",
        "rollout_hosts_connected",
        "rollout_hosts_known",
        "rollout_batch_duration_seconds",
        "rollout_rollbacks",
        "rollout_command_duration_seconds",
    ] {
        assert!(
            s.docs.contains_key(name),
            "no HELP for {name}: {:?}",
            s.docs
        );
    }
    assert_eq!(value(&s, "rollout_hosts_connected", &[]), Some(2.0));
    assert_eq!(value(&s, "rollout_hosts_known", &[]), Some(2.0));
    assert_eq!(
        value(&s, "rollout_rollouts", &[("state", "succeeded")]),
        Some(2.0)
    );
    assert_eq!(
        value(&s, "rollout_rollouts", &[("state", "running")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "rollout_rollbacks_total", &[("reason", "unhealthy")]),
        Some(1.0),
        "h1 rolled v2 back"
    );
    assert_eq!(
        value(&s, "rollout_rollbacks_total", &[("reason", "fleet_halt")]),
        Some(0.0)
    );
    // Two batches per rollout, each finished (h1's failure is in budget).
    let batches = value(&s, "rollout_batch_duration_seconds_count", &[]).unwrap_or(0.0);
    assert!(batches >= 4.0, "batches {batches}");
    for (command, at_least) in [("stage", 4.0), ("activate", 4.0), ("commit", 3.0)] {
        let labels = [("command", command)];
        let count = value(&s, "rollout_command_duration_seconds_count", &labels).unwrap_or(0.0);
        assert!(count >= at_least, "{command}: {count}");
        let total = histogram_total(&s, "rollout_command_duration_seconds", &labels);
        assert_eq!(total, Some(count), "{command}: +Inf bucket");
        let sum = value(&s, "rollout_command_duration_seconds_sum", &labels).unwrap_or(0.0);
        assert!(sum > 0.0, "{command}: sum {sum}");
    }

    // The agent with metrics: web back on v1 and healthy.
    let s = eventually("h1 healthy in its metrics", DEADLINE, async || {
        scrape(agent_metrics).filter(|s| {
            value(s, "rollout_agent_service_healthy", &[("service", "web")]) == Some(1.0)
        })
    })
    .await?;
    for name in [
        "rollout_agent_operations",
        "rollout_agent_rollbacks",
        "rollout_agent_service_healthy",
        "rollout_agent_services",
        "rollout_agent_resident_memory_bytes",
    ] {
        assert!(
            s.docs.contains_key(name),
            "no HELP for {name}: {:?}",
            s.docs
        );
    }
    assert_eq!(value(&s, "rollout_agent_services", &[]), Some(1.0));
    let rss = value(&s, "rollout_agent_resident_memory_bytes", &[]).unwrap_or(0.0);
    assert!(rss > 1e6, "agent RSS {rss}");
    let op = |kind: &str, outcome: &str| {
        value(
            &s,
            "rollout_agent_operations_total",
            &[("kind", kind), ("outcome", outcome)],
        )
    };
    assert_eq!(op("stage", "ok"), Some(2.0));
    assert_eq!(op("activate", "ok"), Some(1.0));
    assert_eq!(op("activate", "failed"), Some(1.0));
    assert_eq!(op("commit", "ok"), Some(1.0));
    assert_eq!(op("rollback", "ok"), Some(1.0));
    assert_eq!(op("rollback", "failed"), Some(0.0));
    assert_eq!(
        value(
            &s,
            "rollout_agent_rollbacks_total",
            &[("reason", "unhealthy")]
        ),
        Some(1.0)
    );
    assert_eq!(
        value(
            &s,
            "rollout_agent_rollbacks_total",
            &[("reason", "operator")]
        ),
        Some(0.0)
    );
    Ok(())
}
