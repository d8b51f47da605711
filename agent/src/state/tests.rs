//! The same contract tests run against both stores.

use std::time::Duration;

use super::*;
use crate::release::{Artifact, RestartPolicy, Supervision};

fn def(service: &str, release: &str) -> ServiceDefinition {
    ServiceDefinition {
        service: service.into(),
        release: release.into(),
        artifact: Artifact {
            digest: Digest([7; 32]),
            size: 10,
            signature: None,
        },
        supervision: Supervision::Exec {
            argv: vec!["./run".into()],
            restart: RestartPolicy::OnFailure,
            stop_timeout: Duration::from_secs(1),
        },
        env: Default::default(),
        hooks: Default::default(),
        health_checks: vec![],
        thresholds: Default::default(),
        min_healthy_time: Duration::ZERO,
        healthy_deadline: Duration::from_secs(5),
        commit_deadline: Duration::from_secs(60),
        run_as: None,
    }
}

fn hist(service: &str, release: &str, event: &str) -> HistoryEntry {
    HistoryEntry {
        seq: 0,
        service: service.into(),
        release: release.into(),
        event: event.into(),
        reason: None,
        at_ms: now_ms(),
        cause: "test".into(),
    }
}

fn contract(store: &dyn StateStore) {
    assert!(store.services().expect("services").is_empty());
    let mut rec = ServiceRecord::new("web");
    rec.current = Some("v1".into());
    store
        .commit(Write {
            service: Some(rec.clone()),
            history: vec![hist("web", "v1", "staged"), hist("web", "v1", "committed")],
            put_releases: vec![
                ReleaseRecord {
                    definition: def("web", "v1"),
                    staged_at_ms: 1,
                },
                ReleaseRecord {
                    definition: def("web", "v2"),
                    staged_at_ms: 2,
                },
            ],
            delete_releases: vec![],
        })
        .expect("commit");
    store
        .commit(Write {
            service: Some(ServiceRecord::new("web-2")),
            history: vec![hist("web-2", "a", "staged")],
            ..Default::default()
        })
        .expect("commit");
    assert_eq!(store.service("web").expect("get"), Some(rec));
    assert_eq!(store.services().expect("all").len(), 2);
    let rels = store.releases("web").expect("releases");
    assert_eq!(
        rels.iter().map(|r| r.release()).collect::<Vec<_>>(),
        ["v1", "v2"]
    );
    assert!(store.release("web", "v2").expect("get").is_some());
    let h = store.history("web", 10).expect("history");
    assert_eq!(
        h.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
        ["staged", "committed"]
    );
    assert!(h[0].seq < h[1].seq);
    assert_eq!(
        store.history("web", 1).expect("history")[0].event,
        "committed"
    );
    assert_eq!(store.history("web-2", 10).expect("history").len(), 1);
    store
        .commit(Write {
            delete_releases: vec![("web".into(), "v1".into())],
            ..Default::default()
        })
        .expect("delete");
    assert!(store.release("web", "v1").expect("get").is_none());
    assert!(store.release("web", "v2").expect("get").is_some());
}

#[test]
fn memory_store_keeps_the_contract() {
    contract(&MemoryStore::default());
}

#[test]
fn sled_store_keeps_the_contract_and_survives_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let store = SledStore::open(dir.path()).expect("open");
        contract(&store);
    }
    let store = SledStore::open_after_close(dir.path());
    let rec = store.service("web").expect("get").expect("present");
    assert_eq!(rec.current.as_deref(), Some("v1"));
    assert_eq!(store.history("web", 10).expect("history").len(), 2);
    // Ids keep increasing after a reopen.
    let before = store.history("web", 1).expect("h")[0].seq;
    store
        .commit(Write {
            history: vec![hist("web", "v2", "activating")],
            ..Default::default()
        })
        .expect("commit");
    assert!(store.history("web", 1).expect("h")[0].seq > before);
}

/// Keeps the newest [`HISTORY_KEEP`] entries of each service, whatever the
/// commits carry, and leaves other services' history alone.
fn history_is_trimmed(store: &dyn StateStore) {
    store
        .commit(Write {
            history: vec![hist("other", "a", "staged")],
            ..Default::default()
        })
        .expect("commit");
    // One commit with many entries, then single entries.
    let many = (0..HISTORY_KEEP + 5)
        .map(|i| hist("web", &format!("r{i}"), "staged"))
        .collect();
    store
        .commit(Write {
            history: many,
            ..Default::default()
        })
        .expect("commit");
    for i in 0..3 {
        store
            .commit(Write {
                history: vec![hist("web", &format!("s{i}"), "committed")],
                ..Default::default()
            })
            .expect("commit");
    }
    let h = store.history("web", usize::MAX).expect("history");
    assert_eq!(h.len(), HISTORY_KEEP);
    // The oldest went: r0..r7 (HISTORY_KEEP + 8 written).
    assert_eq!(h[0].release, "r8");
    assert_eq!(h[HISTORY_KEEP - 1].release, "s2");
    assert!(h.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(store.history("other", usize::MAX).expect("other").len(), 1);
}

#[test]
fn memory_store_keeps_the_newest_history() {
    history_is_trimmed(&MemoryStore::default());
}

#[test]
fn sled_store_keeps_the_newest_history() {
    let dir = tempfile::tempdir().expect("tempdir");
    history_is_trimmed(&SledStore::open(dir.path()).expect("open"));
}

/// The sled store counts each service's history once and then keeps the
/// count: clones share it, and a reopened store counts again from disk.
#[test]
fn sled_store_trims_history_across_clones_and_a_reopen() {
    let dir = tempfile::tempdir().expect("tempdir");
    let one = |store: &SledStore, release: &str| {
        store
            .commit(Write {
                history: vec![hist("web", release, "committed")],
                ..Default::default()
            })
            .expect("commit");
    };
    {
        let store = SledStore::open(dir.path()).expect("open");
        history_is_trimmed(&store);
        let clone = store.clone();
        for i in 0..2 {
            one(&clone, &format!("t{i}"));
            one(&store, &format!("u{i}"));
        }
        let h = store.history("web", usize::MAX).expect("history");
        assert_eq!(h.len(), HISTORY_KEEP);
        assert_eq!(h[0].release, "r12");
        assert_eq!(h[HISTORY_KEEP - 1].release, "u1");
    }
    let store = SledStore::open_after_close(dir.path());
    one(&store, "v0");
    let h = store.history("web", usize::MAX).expect("history");
    assert_eq!(h.len(), HISTORY_KEEP);
    assert_eq!(h[0].release, "r13");
    assert_eq!(h[HISTORY_KEEP - 1].release, "v0");
}
