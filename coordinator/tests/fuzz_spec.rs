//! Property-based fuzzing of the release spec parser: arbitrary text and
//! mutations of a valid spec never panic; they parse or give an error.
//!
//! Quick run (part of the test suite): `cargo test -p rollout-coordinator --test fuzz_spec`.
//! Longer run: `PROPTEST_CASES=20000 cargo test -p rollout-coordinator --test fuzz_spec`.

use std::path::Path;

use proptest::prelude::*;
use rollout_coordinator::rollout::planner::plan_batches;
use rollout_coordinator::rollout::spec::parse_spec;

const VALID: &str = r#"
service = "web"
release = "v2"
[artifact]
path = "web.tar.gz"
[run]
exec = ["./bin/web", "--port", "8080"]
[[health]]
http = "http://127.0.0.1:8080/health"
interval = "2s"
[targets]
labels = { role = "web" }
[strategy]
canary = [1, "10%", "50%", "100%"]
max_unavailable = "25%"
max_failures = 1
min_healthy_time = "10s"
"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_text_never_panics(text in "\\PC{0,400}") {
        let _ = parse_spec(&text, Path::new("."));
    }

    #[test]
    fn mutated_specs_never_panic(cut in 0usize..VALID.len(), insert in "[a-z0-9=\"\\[\\]%., -]{0,12}") {
        let mut s = VALID.to_string();
        let at = (0..=cut).rev().find(|i| s.is_char_boundary(*i)).unwrap_or(0);
        s.insert_str(at, &insert);
        if let Ok(spec) = parse_spec(&s, Path::new(".")) {
            // Whatever parses also plans without a 0-host batch.
            let hosts: Vec<String> = (0..7).map(|i| format!("h{i}")).collect();
            let batches = plan_batches(&hosts, &spec.strategy);
            prop_assert!(batches.iter().all(|b| !b.is_empty()));
            prop_assert_eq!(batches.iter().map(Vec::len).sum::<usize>(), hosts.len());
        }
    }
}
