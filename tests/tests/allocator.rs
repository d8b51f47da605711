//! The allocator the binaries ship with: jemalloc in `rollout` and in
//! `rollout-agent`, with the build's options (`.cargo/config.toml`: one arena,
//! no thread caches), and the coordinator unit's override of them accepted.
//! jemalloc reports its options when a process exits with `stats_print:true`
//! in `_RJEM_MALLOC_CONF`; a glibc-allocated binary prints nothing.

use std::path::Path;
use std::process::Command;

/// `bin --version` run with `_RJEM_MALLOC_CONF` set to `conf`.
fn version_with(bin: &str, conf: &str) -> std::process::Output {
    Command::new(rollout_tests::bin(bin))
        .arg("--version")
        .env("_RJEM_MALLOC_CONF", conf)
        .output()
        .expect("run")
}

/// What jemalloc writes to stderr when `bin --version` exits with
/// `_RJEM_MALLOC_CONF` set to `conf` plus `stats_print:true`.
fn jemalloc_report(bin: &str, conf: &str) -> String {
    let conf = match conf {
        "" => "stats_print:true".to_string(),
        c => format!("{c},stats_print:true"),
    };
    let out = version_with(bin, &conf);
    assert!(
        out.status.success(),
        "{bin} --version with _RJEM_MALLOC_CONF={conf}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        report.contains("___ Begin jemalloc statistics ___"),
        "{bin} printed no jemalloc statistics: it does not run on jemalloc\n{report}"
    );
    assert!(
        !report.contains("<jemalloc>:"),
        "jemalloc refused an option of {bin} (_RJEM_MALLOC_CONF={conf}):\n{}",
        report
            .lines()
            .filter(|l| l.contains("<jemalloc>:"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    report
}

fn assert_options(bin: &str, report: &str, expected: &[&str]) {
    for opt in expected {
        assert!(
            report
                .lines()
                .any(|l| l.trim() == *opt || l.trim().starts_with(&format!("{opt} "))),
            "{bin}: jemalloc does not report `{opt}`; its options:\n{}",
            report
                .lines()
                .filter(|l| l.trim_start().starts_with("opt."))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
}

#[test]
fn both_binaries_run_on_jemalloc_with_the_builds_options() {
    for bin in ["rollout", "rollout-agent"] {
        let report = jemalloc_report(bin, "");
        assert_options(
            bin,
            &report,
            &[
                "opt.narenas: 1",
                "opt.tcache: false",
                "opt.dirty_decay_ms: 1000",
                "opt.muzzy_decay_ms: 0",
            ],
        );
    }
}

#[test]
fn the_coordinator_unit_gives_per_cpu_arenas_and_thread_caches() {
    let unit =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/rollout-coordinator.service");
    let text = std::fs::read_to_string(&unit).expect("read the coordinator's unit");
    let conf = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Environment=_RJEM_MALLOC_CONF="))
        .unwrap_or_else(|| panic!("{} sets no _RJEM_MALLOC_CONF", unit.display()));
    let report = jemalloc_report("rollout", conf);
    assert_options(
        "rollout",
        &report,
        &["opt.percpu_arena: \"percpu\"", "opt.tcache: true"],
    );
}

#[test]
fn a_refused_option_is_seen() {
    // The check above would pass an option jemalloc ignores with a warning
    // if it did not look for the warning; this is that warning.
    let out = version_with("rollout", "percpu_arena:percpux");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("<jemalloc>: Invalid conf value"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
