//! Signed releases across a fleet: agents configured with a trusted key
//! refuse unsigned and wrongly signed releases before unpacking anything, and
//! accept the release signed with `rollout release sign`.

use anyhow::Result;
use rollout_tests::bin;
use rollout_tests::cluster::Cluster;

fn run(args: &[&str]) -> std::process::Output {
    std::process::Command::new(bin("rollout"))
        .args(args)
        .output()
        .expect("run rollout")
}

#[tokio::test]
async fn agents_with_trusted_keys_stage_only_correctly_signed_releases() -> Result<()> {
    let keys = tempfile::tempdir()?;
    let k = keys.path().join("good");
    let other = keys.path().join("other");
    for d in [&k, &other] {
        let out = run(&["release", "keygen", "--out", &d.display().to_string()]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let public = std::fs::read_to_string(k.join("release-signing.pub"))?;
    let c = Cluster::start_with(
        3,
        |_| vec![],
        &[format!("trusted_keys = [{:?}]", public.trim())],
    )
    .await?;
    let strategy = "batch_percent = 100\nmax_unavailable = \"100%\"";

    // Unsigned: every host refuses at staging; nothing runs.
    let spec = c.spec("v1", &[], &[], strategy)?;
    let (ok, out, _) = c.deploy_wait(&spec);
    assert!(!ok, "unsigned release deployed:\n{out}");
    let id = out.lines().next().unwrap_or_default().trim().to_string();
    let s = c.coord.json(&["status", &id])?;
    for h in s[0]["batches"][0]["hosts"].as_array().into_iter().flatten() {
        assert_eq!(h["failure"], "stage_failed", "{h}");
        assert!(
            h["reason"]
                .as_str()
                .unwrap_or_default()
                .contains("unsigned"),
            "{h}"
        );
    }
    for a in &c.agents {
        assert!(
            a.release_dirs("web")
                .iter()
                .all(|d| d.starts_with('.') || d.is_empty()),
            "{:?}",
            a.release_dirs("web")
        );
    }

    // Signed with a key the agents do not trust: refused.
    let art = c.work.path().join("sample-v1.tar.gz");
    let sign = |key: &std::path::Path| -> Result<String> {
        let out = run(&[
            "--output",
            "json",
            "release",
            "sign",
            "--key",
            &key.join("release-signing.key").display().to_string(),
            &art.display().to_string(),
        ]);
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(v["signature"].as_str().unwrap_or_default().to_string())
    };
    let with_sig = |sig: &str| -> Result<()> {
        let text = std::fs::read_to_string(&spec)?;
        let text = match text.find("\nsignature = ") {
            Some(_) => text,
            None => text.replacen(
                "[artifact]\n",
                &format!("[artifact]\nsignature = {sig:?}\n"),
                1,
            ),
        };
        std::fs::write(&spec, text)?;
        Ok(())
    };
    with_sig(&sign(&other)?)?;
    let (ok, out, _) = c.deploy_wait(&spec);
    assert!(!ok, "wrongly signed release deployed:\n{out}");
    assert!(out.contains("stage_failed"), "{out}");

    // Signed with the trusted key: deployed everywhere.
    let text = std::fs::read_to_string(&spec)?;
    let text: String = text
        .lines()
        .filter(|l| !l.starts_with("signature = "))
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&spec, text)?;
    with_sig(&sign(&k)?)?;
    let (ok, out, err) = c.deploy_wait(&spec);
    assert!(ok, "signed release failed:\n{out}\n{err}");
    c.all_serving("v1").await?;
    Ok(())
}
