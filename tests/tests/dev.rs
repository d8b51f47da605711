//! `rollout dev` end to end: a throw-away CA, a coordinator and five agents
//! over mutual TLS; v2 reaches every agent and the unhealthy v3 is rolled back.

use std::process::Command;

use rollout_tests::bin;

#[test]
fn rollout_dev_deploys_v2_everywhere_and_rolls_v3_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let work = dir.path().join("dev");
    let out = Command::new(bin("rollout"))
        .args(["dev", "--agents", "5", "--exit-after-demo", "--dir"])
        .arg(&work)
        .output()
        .expect("run rollout dev");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "rollout dev failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("result: v2 succeeded, v3 rolled_back"),
        "{stdout}"
    );
    for h in ["h1", "h2", "h3", "h4", "h5"] {
        assert!(
            stdout.contains(&format!("  {h}: v2 ")),
            "{h} not on v2:\n{stdout}"
        );
    }
    // Nothing keeps running after the demo: no process works in its directory.
    let leftovers: Vec<String> = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|p| {
            let cwd = std::fs::read_link(p.path().join("cwd")).ok()?;
            cwd.starts_with(&work)
                .then(|| p.file_name().to_string_lossy().into_owned())
        })
        .collect();
    assert!(
        leftovers.is_empty(),
        "processes left running in {}: {leftovers:?}",
        work.display()
    );
}
