//! `rollout completions SHELL`, `rollout man --out DIR` and the same for
//! `rollout-agent`, run as real binaries.

use std::process::Command;

fn stdout_of(bin: &str, args: &[&str]) -> String {
    let out = Command::new(rollout_tests::bin(bin))
        .args(args)
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{bin} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).expect("utf-8")
}

#[test]
fn completions_for_every_shell() {
    let bash = stdout_of("rollout", &["completions", "bash"]);
    for word in ["deploy", "rollback", "completions", "--coordinator"] {
        assert!(bash.contains(word), "{word} in the bash completion");
    }
    assert!(stdout_of("rollout", &["completions", "zsh"]).contains("#compdef rollout"));
    assert!(stdout_of("rollout", &["completions", "fish"]).contains("complete -c rollout"));
    let agent = stdout_of("rollout-agent", &["completions", "bash"]);
    for word in ["run", "status", "releases", "rollback"] {
        assert!(
            agent.contains(word),
            "{word} in the agent's bash completion"
        );
    }
    assert!(stdout_of("rollout-agent", &["completions", "zsh"]).contains("#compdef rollout-agent"));
    assert!(
        stdout_of("rollout-agent", &["completions", "fish"]).contains("complete -c rollout-agent")
    );
    let bad = Command::new(rollout_tests::bin("rollout"))
        .args(["completions", "tcsh"])
        .output()
        .expect("run");
    assert!(!bad.status.success(), "an unknown shell is refused");
}

#[test]
fn man_pages_one_per_command() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("man1");
    let said = stdout_of("rollout", &["man", "--out", out.to_str().expect("utf-8")]);
    assert!(said.contains("man pages"), "{said}");
    let page = std::fs::read_to_string(out.join("rollout.1")).expect("rollout.1");
    assert!(
        page.starts_with(".ie") || page.contains(".TH"),
        "roff: {page}"
    );
    assert!(page.contains("deploy") && page.contains("rollback"));
    for sub in [
        "rollout-deploy.1",
        "rollout-rollback.1",
        "rollout-certs-init.1",
    ] {
        let p = out.join(sub);
        let len = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
        assert!(len > 0, "{} written", p.display());
    }

    stdout_of(
        "rollout-agent",
        &["man", "--out", out.to_str().expect("utf-8")],
    );
    for page in [
        "rollout-agent.1",
        "rollout-agent-run.1",
        "rollout-agent-rollback.1",
    ] {
        let text = std::fs::read_to_string(out.join(page)).expect(page);
        assert!(text.contains(".TH"), "{page}: {text}");
    }
}
