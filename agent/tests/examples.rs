//! `deploy/examples/agent.toml` is accepted by the real config loader, and its
//! commented-out keys are too once uncommented (so the documentation of every
//! key is checked, not only of the ones set).

use std::path::{Path, PathBuf};

use rollout_agent::config::AgentConfig;

fn example() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/agent.toml")
}

#[test]
fn the_example_agent_config_loads() {
    let path = example();
    let c = AgentConfig::load(&path, "fallback").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.host, "web-1");
    assert_eq!(c.labels.get("role").map(String::as_str), Some("web"));
    let coord = c.coordinator.expect("the example names a coordinator");
    let tls = coord.tls.expect("mutual TLS");
    assert_eq!(tls.cert, Path::new("/etc/rollout/agent.pem"));
    assert_eq!(tls.key, Path::new("/etc/rollout/agent.key"));
    assert_eq!(tls.ca, Path::new("/etc/rollout/ca.pem"));
}

#[test]
fn the_commented_keys_are_real_keys() {
    let text = std::fs::read_to_string(example()).expect("read");
    // `# key = value` lines document optional keys; uncomment each one alone
    // (with a value that validates here) and parse again.
    let mut tried = 0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# ") else {
            continue;
        };
        let Some((key, _)) = rest.split_once(" = ") else {
            continue;
        };
        if key.contains(' ') {
            continue;
        }
        let replacement = match key {
            // The user must exist on the test host; root always does.
            "run_as" => "run_as = \"root\"".to_string(),
            // Any valid ed25519 public key.
            "trusted_keys" => {
                use base64::Engine as _;
                let key = ed25519_dalek::SigningKey::from_bytes(&[7; 32]).verifying_key();
                let b64 = base64::engine::general_purpose::STANDARD.encode(key.to_bytes());
                format!("trusted_keys = [\"{b64}\"]")
            }
            // Needs the TLS files gone; checked by the config unit tests.
            "insecure_dev" => continue,
            _ => rest.to_string(),
        };
        let edited = text.replacen(line, &replacement, 1);
        AgentConfig::parse(&edited, &example(), "fallback")
            .unwrap_or_else(|e| panic!("uncommenting {key:?}: {e}"));
        tried += 1;
    }
    assert!(tried >= 3, "only {tried} commented keys found");
}
