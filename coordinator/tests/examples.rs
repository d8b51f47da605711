//! Every file in `deploy/examples/` is accepted by the real parsers: the
//! coordinator config by `CoordinatorConfig::load`, every release spec by
//! `load_spec` (and plans), so a documented key can never be a typo.
//! `agent.toml` is checked by the agent crate's own `examples` test.

use std::path::{Path, PathBuf};

use rollout_coordinator::config::CoordinatorConfig;
use rollout_coordinator::rollout::planner::plan_batches;
use rollout_coordinator::rollout::spec::{DeploySpec, load_spec};
use rollout_proto::pb;
use rollout_proto::pb::health_check::Kind;
use rollout_proto::pb::service_definition::Supervision;

fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples")
}

fn example_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(examples_dir())
        .expect("deploy/examples exists")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

fn spec(name: &str) -> DeploySpec {
    let path = examples_dir().join(name);
    load_spec(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn check_kinds(spec: &DeploySpec) -> Vec<&'static str> {
    spec.definition
        .health_checks
        .iter()
        .map(|c| match c.kind {
            Some(Kind::Http(_)) => "http",
            Some(Kind::Tcp(_)) => "tcp",
            Some(Kind::Exec(_)) => "exec",
            None => "none",
        })
        .collect()
}

#[test]
fn every_example_parses() {
    let files = example_files();
    let names: Vec<String> = files
        .iter()
        .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .collect();
    for expected in [
        "agent.toml",
        "coordinator.toml",
        "web.toml",
        "worker.toml",
        "systemd-service.toml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "{expected} missing: {names:?}"
        );
    }
    let hosts: Vec<String> = (1..=8).map(|i| format!("host-{i}")).collect();
    for path in &files {
        match path.file_name().and_then(|n| n.to_str()) {
            Some("agent.toml") => {}
            Some("coordinator.toml") => {
                let c = CoordinatorConfig::load(path)
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert!(c.tls.is_some(), "the example uses mutual TLS");
            }
            _ => {
                let s = load_spec(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                let batches = plan_batches(&hosts, &s.strategy);
                assert_eq!(
                    batches.iter().map(Vec::len).sum::<usize>(),
                    hosts.len(),
                    "{}: every host planned once",
                    path.display()
                );
                assert!(batches.iter().all(|b| !b.is_empty()));
            }
        }
    }
}

#[test]
fn examples_show_the_three_supervision_modes() {
    let web = spec("web.toml");
    assert!(matches!(
        web.definition.supervision,
        Some(Supervision::Exec(_))
    ));
    assert!(check_kinds(&web).contains(&"http"), "web has an HTTP check");

    let worker = spec("worker.toml");
    match &worker.definition.supervision {
        Some(Supervision::Exec(pb::ExecSupervision { argv, .. })) => {
            assert!(!argv.iter().any(|a| a.contains("port")), "{argv:?}");
        }
        other => panic!("worker is not exec: {other:?}"),
    }
    assert_eq!(check_kinds(&worker), ["exec"]);

    let unit = spec("systemd-service.toml");
    assert!(
        matches!(&unit.definition.supervision, Some(Supervision::Systemd(s)) if s.unit == "billing.service")
    );
}
