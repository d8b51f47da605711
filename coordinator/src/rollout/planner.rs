//! Pure rollout decisions: which hosts a spec targets, which hosts go in which
//! batch, where to wait for `rollout promote`, how many failures the rollout
//! tolerates, whether a deadline has passed, how long a host that dropped
//! mid-activation may take to reconnect, and what an owed fleet rollback
//! needs.
//!
//! Nothing here does I/O or reads a clock; callers pass the fleet and `now` in,
//! so a restarted coordinator recomputes exactly the same plan from persisted
//! state, and every rule is tested without sockets.
//!
//! Batching happens in two steps. First the [`BatchPlan`] cuts the hosts (in
//! the order given) into *stages*: fixed-size chunks, percentage chunks, or
//! cumulative canary stages. Then every stage is split so that no batch holds
//! more than [`max_unavailable`] hosts, since a batch's hosts are all restarting
//! at once. A canary pause therefore always falls on a batch boundary.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Range;
use std::time::Duration;

use super::spec::{BatchPlan, Count, Strategy, Targets};

/// How many known hosts an unknown-host error lists.
const KNOWN_HOSTS_LISTED: usize = 10;

/// Targets that select nothing usable, with the fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectError {
    /// No agent has ever registered.
    #[error(
        "no hosts are registered with the coordinator; start rollout-agent on the target hosts and check `rollout hosts`"
    )]
    EmptyFleet,
    /// The targets name neither hosts nor labels.
    #[error("the spec targets nothing; set targets.hosts and/or targets.labels")]
    NoTargets,
    /// `targets.hosts` names a host no agent registered as.
    #[error("unknown host {host:?} in targets.hosts; known hosts: {known}; check `rollout hosts`")]
    UnknownHost {
        /// The name as written in the spec.
        host: String,
        /// The first known host names, comma-separated.
        known: String,
    },
    /// `targets.labels` matches no registered host.
    #[error(
        "targets.labels {{{selector}}} matches no host; check the labels shown by `rollout hosts`"
    )]
    NoLabelMatch {
        /// The selector as `k=v,k=v`.
        selector: String,
    },
}

/// The hosts a rollout updates: the union of the named hosts and the hosts whose
/// labels include every `targets.labels` pair, sorted by name, deduplicated.
///
/// `fleet` is every registered host with its labels.
pub fn select_hosts(
    targets: &Targets,
    fleet: &[(String, BTreeMap<String, String>)],
) -> Result<Vec<String>, SelectError> {
    if fleet.is_empty() {
        return Err(SelectError::EmptyFleet);
    }
    if targets.hosts.is_empty() && targets.labels.is_empty() {
        return Err(SelectError::NoTargets);
    }
    let known: BTreeSet<&str> = fleet.iter().map(|(name, _)| name.as_str()).collect();
    let mut selected = BTreeSet::new();
    for host in &targets.hosts {
        if !known.contains(host.as_str()) {
            let mut listed: Vec<&str> = known.iter().copied().take(KNOWN_HOSTS_LISTED).collect();
            if known.len() > KNOWN_HOSTS_LISTED {
                listed.push("...");
            }
            return Err(SelectError::UnknownHost {
                host: host.clone(),
                known: format!("{} ({} in all)", listed.join(", "), known.len()),
            });
        }
        selected.insert(host.clone());
    }
    if !targets.labels.is_empty() {
        let before = selected.len();
        let mut matched = false;
        for (name, labels) in fleet {
            let all_match = targets
                .labels
                .iter()
                .all(|(k, v)| labels.get(k).is_some_and(|have| have == v));
            if all_match {
                matched = true;
                selected.insert(name.clone());
            }
        }
        if !matched {
            debug_assert_eq!(before, selected.len());
            let selector: Vec<String> = targets
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            return Err(SelectError::NoLabelMatch {
                selector: selector.join(","),
            });
        }
    }
    Ok(selected.into_iter().collect())
}

/// The batches of a rollout over `hosts`, in order: every host exactly once,
/// in the given order, no batch empty, none larger than
/// [`max_unavailable`]. No hosts, no batches.
pub fn plan_batches(hosts: &[String], strategy: &Strategy) -> Vec<Vec<String>> {
    let cap = max_unavailable(strategy, hosts.len());
    stage_ranges(hosts.len(), strategy)
        .into_iter()
        .flat_map(|r| {
            hosts[r]
                .chunks(cap)
                .map(<[String]>::to_vec)
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Cumulative host counts at the end of each stage, before the
/// `max_unavailable` split: `[2, 4, 5]` for 5 hosts in batches of 2. For a
/// canary these are the stage totals with stages that add nobody left out; the
/// last entry is always `hosts_len` (none when there are no hosts).
pub fn stage_ends(hosts_len: usize, strategy: &Strategy) -> Vec<usize> {
    stage_ranges(hosts_len, strategy)
        .into_iter()
        .map(|r| r.end)
        .collect()
}

/// Indices of the batches after which the rollout waits for `rollout promote`:
/// with `pause_after_canary`, the last batch of every canary stage but the
/// final one. Empty otherwise.
pub fn pause_points(batches: &[Vec<String>], strategy: &Strategy) -> BTreeSet<usize> {
    if !strategy.pause_after_canary || !matches!(strategy.batches, BatchPlan::Canary(_)) {
        return BTreeSet::new();
    }
    let total: usize = batches.iter().map(Vec::len).sum();
    let ends = stage_ends(total, strategy);
    let pause_at: BTreeSet<usize> = ends
        .iter()
        .copied()
        .take(ends.len().saturating_sub(1))
        .collect();
    let mut done = 0;
    let mut points = BTreeSet::new();
    for (i, batch) in batches.iter().enumerate() {
        done += batch.len();
        if pause_at.contains(&done) {
            points.insert(i);
        }
    }
    points
}

/// Hosts that may be updating at once out of `n` targeted hosts: at least 1,
/// so a percentage over a tiny fleet still makes progress.
pub fn max_unavailable(strategy: &Strategy, n: usize) -> usize {
    strategy.max_unavailable.resolve(n).max(1)
}

/// Failures a rollout over `n` hosts tolerates: an absolute count as written,
/// a percentage rounded down (10% of 5 hosts tolerates none).
pub fn failure_budget(strategy: &Strategy, n: usize) -> usize {
    match strategy.max_failures {
        Count::Absolute(k) => usize::try_from(k).unwrap_or(usize::MAX),
        pct @ Count::Percent(_) => pct.resolve_floor(n),
    }
}

/// Whether `failures` is past the `budget`: the budget itself is tolerated.
pub fn budget_exceeded(failures: usize, budget: usize) -> bool {
    failures > budget
}

/// Whether more than `deadline` has elapsed between `started_ms` and `now_ms`
/// (both milliseconds since the Unix epoch). A clock that went backwards never
/// passes a deadline.
pub fn deadline_passed(started_ms: i64, now_ms: i64, deadline: Duration) -> bool {
    let elapsed = i128::from(now_ms) - i128::from(started_ms);
    elapsed > 0 && elapsed.unsigned_abs() > deadline.as_millis()
}

/// Longest a host whose stream ended during its own activation is waited for
/// to reconnect (see [`activation_reconnect_by`]).
pub const MAX_RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// How long a host whose stream ended while its Activate was in flight is
/// given to reconnect before it counts as unreachable: half the
/// release's `healthy_deadline`, at most [`MAX_RECONNECT_GRACE`].
pub fn reconnect_grace(healthy_deadline: Duration) -> Duration {
    (healthy_deadline / 2).min(MAX_RECONNECT_GRACE)
}

/// How long a host of the current batch that is not connected, or whose
/// Stage was cut by the network, is waited for before it counts as
/// unreachable: as long as a release is given to become healthy
/// (`healthy_deadline`), at most [`MAX_RECONNECT_GRACE`]. A network blip
/// then costs a short wait, not a failed host.
pub fn batch_reconnect_grace(healthy_deadline: Duration) -> Duration {
    healthy_deadline.min(MAX_RECONNECT_GRACE)
}

/// Until when (unix ms) a host whose stream ended at `dropped_ms`, while the
/// Activate sent at `sent_ms` was in flight, may reconnect: the
/// [`reconnect_grace`] after the drop, but never past the activation's own
/// `healthy_deadline`, so a frozen host is still declared unreachable within
/// it.
pub fn activation_reconnect_by(sent_ms: i64, dropped_ms: i64, healthy_deadline: Duration) -> i64 {
    let ms = |d: Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
    dropped_ms
        .saturating_add(ms(reconnect_grace(healthy_deadline)))
        .min(sent_ms.saturating_add(ms(healthy_deadline)))
}

/// What to do about a host whose fleet rollback is still owed, from its
/// latest report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwedRollback {
    /// The host is in the middle of an operation: a later report settles it.
    Wait,
    /// The host no longer runs the rollout's release: nothing to send.
    Settled,
    /// The host runs the rollout's release: send the rollback.
    Send,
}

/// The rule for an owed rollback: `busy` when the host reports its service
/// activating, verifying or rolling back; `on_release` when it reports the
/// rollout's release as current.
pub fn owed_rollback(busy: bool, on_release: bool) -> OwedRollback {
    if busy {
        OwedRollback::Wait
    } else if on_release {
        OwedRollback::Send
    } else {
        OwedRollback::Settled
    }
}

/// Host index ranges of each stage, before the `max_unavailable` split; never
/// an empty range, together covering `0..n` in order.
fn stage_ranges(n: usize, strategy: &Strategy) -> Vec<Range<usize>> {
    if n == 0 {
        return Vec::new();
    }
    let fixed = |size: usize| {
        let size = size.max(1);
        (0..n)
            .step_by(size)
            .map(|start| start..(start + size).min(n))
            .collect()
    };
    match &strategy.batches {
        BatchPlan::Size(k) => fixed(usize::try_from(*k).unwrap_or(usize::MAX)),
        BatchPlan::Percent(p) => fixed(Count::Percent(*p).resolve(n)),
        BatchPlan::Canary(stages) => {
            let mut out = Vec::with_capacity(stages.len());
            let mut done = 0;
            for stage in stages {
                let target = stage.resolve(n);
                if target > done {
                    out.push(done..target);
                    done = target;
                }
            }
            // Validation makes the last stage "100%"; never leave hosts behind
            // if a persisted strategy somehow says otherwise.
            if done < n {
                out.push(done..n);
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hosts(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("h{i:03}")).collect()
    }

    fn with(batches: BatchPlan, max_unavailable: Count) -> Strategy {
        Strategy {
            batches,
            max_unavailable,
            ..Strategy::default()
        }
    }

    /// Batch sizes only, which is what the math is about.
    fn sizes(n: usize, strategy: &Strategy) -> Vec<usize> {
        plan_batches(&hosts(n), strategy)
            .iter()
            .map(Vec::len)
            .collect()
    }

    fn canary() -> BatchPlan {
        BatchPlan::Canary(vec![
            Count::Absolute(1),
            Count::Percent(10.0),
            Count::Percent(50.0),
            Count::Percent(100.0),
        ])
    }

    const WIDE: Count = Count::Percent(100.0);

    #[test]
    fn batch_size_chunks_in_order_with_a_short_last_batch() {
        let s = with(BatchPlan::Size(2), WIDE);
        assert_eq!(
            plan_batches(&hosts(5), &s),
            vec![vec!["h000", "h001"], vec!["h002", "h003"], vec!["h004"]]
        );
        assert_eq!(sizes(1, &s), [1]);
        assert_eq!(sizes(2, &s), [2]);
        assert_eq!(sizes(3, &with(BatchPlan::Size(10), WIDE)), [3]);
    }

    #[test]
    fn batch_percent_rounds_up_and_never_yields_an_empty_batch() {
        // (N, percent) -> expected batch sizes.
        let cases: &[(usize, f64, &[usize])] = &[
            (1, 1.0, &[1]),
            (1, 10.0, &[1]),
            (1, 33.0, &[1]),
            (1, 50.0, &[1]),
            (1, 100.0, &[1]),
            (2, 1.0, &[1, 1]),
            (2, 10.0, &[1, 1]),
            (2, 33.0, &[1, 1]),
            (2, 50.0, &[1, 1]),
            (2, 100.0, &[2]),
            (3, 1.0, &[1, 1, 1]),
            (3, 10.0, &[1, 1, 1]),
            (3, 33.0, &[1, 1, 1]),
            (3, 50.0, &[2, 1]),
            (3, 100.0, &[3]),
            (5, 10.0, &[1, 1, 1, 1, 1]),
            (5, 33.0, &[2, 2, 1]),
            (5, 50.0, &[3, 2]),
            (5, 100.0, &[5]),
            (7, 10.0, &[1; 7]),
            (7, 33.0, &[3, 3, 1]),
            (7, 50.0, &[4, 3]),
            (7, 100.0, &[7]),
            (10, 1.0, &[1; 10]),
            (10, 10.0, &[1; 10]),
            (10, 33.0, &[4, 4, 2]),
            (10, 50.0, &[5, 5]),
            (10, 100.0, &[10]),
            (100, 10.0, &[10; 10]),
            (100, 50.0, &[50, 50]),
            (100, 100.0, &[100]),
        ];
        for &(n, p, expected) in cases {
            assert_eq!(
                sizes(n, &with(BatchPlan::Percent(p), WIDE)),
                expected,
                "N={n} batch_percent={p}"
            );
        }
        let s = sizes(100, &with(BatchPlan::Percent(1.0), WIDE));
        assert_eq!((s.len(), s.iter().all(|b| *b == 1)), (100, true));
        let s = sizes(100, &with(BatchPlan::Percent(33.0), WIDE));
        assert_eq!(s, [33, 33, 33, 1]);
    }

    #[test]
    fn canary_stages_are_cumulative_and_skip_stages_that_add_nobody() {
        let s = with(canary(), WIDE);
        // 1 host: stage 1 covers everyone; the percentages add nobody.
        assert_eq!(sizes(1, &s), [1]);
        assert_eq!(stage_ends(1, &s), [1]);
        // 3 hosts: 1, 10% -> 1 (skipped), 50% -> 2, 100% -> 3.
        assert_eq!(sizes(3, &s), [1, 1, 1]);
        assert_eq!(stage_ends(3, &s), [1, 2, 3]);
        // 10 hosts: 1, 10% -> 1 (skipped), 50% -> 5, 100%.
        assert_eq!(sizes(10, &s), [1, 4, 5]);
        assert_eq!(stage_ends(10, &s), [1, 5, 10]);
        // 20 hosts: 1, 10% -> 2, 50% -> 10, 100%.
        assert_eq!(sizes(20, &s), [1, 1, 8, 10]);
        assert_eq!(stage_ends(20, &s), [1, 2, 10, 20]);
    }

    #[test]
    fn a_canary_that_stops_short_still_covers_every_host() {
        let s = with(
            BatchPlan::Canary(vec![Count::Absolute(2), Count::Percent(50.0)]),
            WIDE,
        );
        assert_eq!(sizes(10, &s), [2, 3, 5]);
    }

    #[test]
    fn max_unavailable_splits_every_batch() {
        assert_eq!(
            sizes(5, &with(BatchPlan::Size(4), Count::Absolute(3))),
            [3, 1, 1]
        );
        assert_eq!(
            sizes(10, &with(BatchPlan::Percent(50.0), Count::Absolute(2))),
            [2, 2, 1, 2, 2, 1]
        );
        // 25% of 20 = 5 at once: canary 1, 1, 8, 10 -> 1, 1, 5, 3, 5, 5.
        assert_eq!(
            sizes(20, &with(canary(), Count::Percent(25.0))),
            [1, 1, 5, 3, 5, 5]
        );
        // 10% of 3 hosts rounds up to 1; a percentage never stalls a rollout.
        assert_eq!(
            sizes(3, &with(BatchPlan::Size(3), Count::Percent(10.0))),
            [1, 1, 1]
        );
        // The default (1) makes a one-at-a-time rollout.
        assert_eq!(
            sizes(
                4,
                &Strategy {
                    batches: BatchPlan::Size(4),
                    ..Strategy::default()
                }
            ),
            [1, 1, 1, 1]
        );
        assert_eq!(
            max_unavailable(&with(BatchPlan::Size(1), Count::Percent(1.0)), 3),
            1
        );
        assert_eq!(
            max_unavailable(&with(BatchPlan::Size(1), Count::Percent(1.0)), 0),
            1
        );
        assert_eq!(
            max_unavailable(&with(BatchPlan::Size(1), Count::Percent(50.0)), 7),
            4
        );
        assert_eq!(
            max_unavailable(&with(BatchPlan::Size(1), Count::Absolute(9)), 3),
            3
        );
    }

    #[test]
    fn no_hosts_means_no_batches_and_no_pauses() {
        for plan in [BatchPlan::Size(2), BatchPlan::Percent(50.0), canary()] {
            let s = Strategy {
                pause_after_canary: true,
                ..with(plan, WIDE)
            };
            let batches = plan_batches(&[], &s);
            assert!(batches.is_empty());
            assert!(pause_points(&batches, &s).is_empty());
            assert!(stage_ends(0, &s).is_empty());
        }
    }

    #[test]
    fn pause_points_fall_after_each_canary_stage_but_the_last() {
        let s = Strategy {
            pause_after_canary: true,
            ..with(canary(), WIDE)
        };
        let b = plan_batches(&hosts(20), &s);
        assert_eq!(pause_points(&b, &s), BTreeSet::from([0, 1, 2]));
        let b = plan_batches(&hosts(1), &s);
        assert!(
            pause_points(&b, &s).is_empty(),
            "a single stage has nothing to promote"
        );

        // Split by max_unavailable = 5: batches 1 | 1 | 5 3 | 5 5 -> pause after 0, 1, 3.
        let s = Strategy {
            pause_after_canary: true,
            ..with(canary(), Count::Absolute(5))
        };
        let b = plan_batches(&hosts(20), &s);
        assert_eq!(pause_points(&b, &s), BTreeSet::from([0, 1, 3]));

        let no_pause = with(canary(), WIDE);
        assert!(pause_points(&plan_batches(&hosts(20), &no_pause), &no_pause).is_empty());
    }

    #[test]
    fn failure_budget_counts_and_rounds_percentages_down() {
        let budget = |c: Count, n: usize| {
            failure_budget(
                &Strategy {
                    max_failures: c,
                    ..Strategy::default()
                },
                n,
            )
        };
        assert_eq!(budget(Count::Absolute(0), 5), 0);
        assert_eq!(budget(Count::Absolute(2), 5), 2);
        assert_eq!(
            budget(Count::Absolute(2), 1),
            2,
            "an absolute budget is as written"
        );
        assert_eq!(budget(Count::Percent(10.0), 1), 0);
        assert_eq!(budget(Count::Percent(10.0), 5), 0);
        assert_eq!(budget(Count::Percent(10.0), 10), 1);
        assert_eq!(budget(Count::Percent(10.0), 30), 3);
        assert_eq!(budget(Count::Percent(33.0), 3), 0);
        assert_eq!(budget(Count::Percent(50.0), 3), 1);
        assert_eq!(budget(Count::Percent(50.0), 2), 1);
        assert_eq!(budget(Count::Percent(100.0), 7), 7);
        assert_eq!(budget(Count::Percent(0.0), 100), 0);

        assert!(!budget_exceeded(0, 0));
        assert!(budget_exceeded(1, 0));
        assert!(!budget_exceeded(1, 1));
        assert!(budget_exceeded(2, 1));
    }

    #[test]
    fn deadlines_use_the_injected_clock() {
        let start = 1_700_000_000_000;
        let hour = Duration::from_secs(3600);
        assert!(!deadline_passed(start, start, hour));
        assert!(
            !deadline_passed(start, start + 3_600_000, hour),
            "exactly at the deadline"
        );
        assert!(deadline_passed(start, start + 3_600_001, hour));
        assert!(
            !deadline_passed(start, start - 10_000, hour),
            "clock went backwards"
        );
        assert!(deadline_passed(0, 1, Duration::ZERO));
        assert!(!deadline_passed(i64::MIN, i64::MAX, Duration::MAX));
        assert!(deadline_passed(i64::MIN, i64::MAX, hour), "no overflow");
    }

    #[test]
    fn the_reconnect_grace_is_bounded_by_the_activation_deadline() {
        let secs = Duration::from_secs;
        assert_eq!(reconnect_grace(secs(9)), Duration::from_millis(4_500));
        assert_eq!(reconnect_grace(secs(300)), MAX_RECONNECT_GRACE);
        let sent = 1_700_000_000_000;
        // Dropped early: half the healthy_deadline after the drop.
        assert_eq!(
            activation_reconnect_by(sent, sent + 1_000, secs(9)),
            sent + 5_500
        );
        // Dropped late: never past the activation's own healthy_deadline.
        assert_eq!(
            activation_reconnect_by(sent, sent + 8_000, secs(9)),
            sent + 9_000
        );
        assert_eq!(
            activation_reconnect_by(sent, sent + 1_000, secs(300)),
            sent + 11_000
        );
        assert_eq!(
            activation_reconnect_by(i64::MAX - 1, i64::MAX - 1, secs(9)),
            i64::MAX
        );
    }

    #[test]
    fn an_owed_rollback_is_sent_only_to_a_settled_host_on_the_release() {
        assert_eq!(owed_rollback(true, true), OwedRollback::Wait);
        assert_eq!(owed_rollback(true, false), OwedRollback::Wait);
        assert_eq!(owed_rollback(false, true), OwedRollback::Send);
        assert_eq!(owed_rollback(false, false), OwedRollback::Settled);
    }

    fn fleet(entries: &[(&str, &[(&str, &str)])]) -> Vec<(String, BTreeMap<String, String>)> {
        entries
            .iter()
            .map(|(name, labels)| {
                (
                    name.to_string(),
                    labels
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                )
            })
            .collect()
    }

    fn targets(hosts: &[&str], labels: &[(&str, &str)]) -> Targets {
        Targets {
            hosts: hosts.iter().map(|h| h.to_string()).collect(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    #[test]
    fn select_hosts_unions_names_and_labels_sorted_and_deduplicated() {
        let f = fleet(&[
            ("web-3", &[("role", "web"), ("zone", "a")]),
            ("db-1", &[("role", "db")]),
            ("web-1", &[("role", "web"), ("zone", "b")]),
            ("web-2", &[("role", "web"), ("zone", "a")]),
        ]);
        assert_eq!(
            select_hosts(&targets(&["web-1"], &[]), &f),
            Ok(vec!["web-1".to_string()])
        );
        assert_eq!(
            select_hosts(&targets(&[], &[("role", "web"), ("zone", "a")]), &f),
            Ok(vec!["web-2".to_string(), "web-3".to_string()])
        );
        assert_eq!(
            select_hosts(&targets(&["web-2", "db-1", "web-2"], &[("zone", "a")]), &f),
            Ok(vec![
                "db-1".to_string(),
                "web-2".to_string(),
                "web-3".to_string()
            ])
        );
    }

    #[test]
    fn select_hosts_errors_name_the_cause() {
        let many: Vec<String> = (0..15).map(|i| format!("n{i:02}")).collect();
        let f: Vec<_> = many
            .iter()
            .map(|h| {
                (
                    h.clone(),
                    BTreeMap::from([("role".to_string(), "web".to_string())]),
                )
            })
            .collect();

        assert_eq!(
            select_hosts(&targets(&["a"], &[]), &[]),
            Err(SelectError::EmptyFleet)
        );
        assert_eq!(
            select_hosts(&targets(&[], &[]), &f),
            Err(SelectError::NoTargets)
        );

        let err = select_hosts(&targets(&["n01", "web-9"], &[]), &f).expect_err("unknown host");
        let msg = err.to_string();
        assert!(
            msg.contains("\"web-9\"") && msg.contains("n00, n01") && msg.contains("n09"),
            "{msg}"
        );
        assert!(
            !msg.contains("n10") && msg.contains("15 in all"),
            "lists only the first 10: {msg}"
        );

        let err = select_hosts(&targets(&["n01"], &[("role", "db"), ("zone", "x")]), &f)
            .expect_err("no match");
        assert_eq!(
            err,
            SelectError::NoLabelMatch {
                selector: "role=db,zone=x".into()
            }
        );
        assert!(err.to_string().contains("{role=db,zone=x}"), "{err}");
    }

    /// Every plan partitions the hosts in order, with no empty batch and none
    /// over max_unavailable, and pauses only between batches.
    #[test]
    fn property_batches_partition_hosts_in_order_without_empty_batches() {
        let mut plans = vec![canary(), BatchPlan::Canary(vec![Count::Percent(100.0)])];
        plans.extend((1..=12).map(BatchPlan::Size));
        plans.extend(
            [1.0, 5.0, 10.0, 12.5, 25.0, 33.0, 50.0, 66.6, 99.0, 100.0].map(BatchPlan::Percent),
        );
        plans.push(BatchPlan::Canary(vec![
            Count::Absolute(2),
            Count::Absolute(5),
            Count::Percent(25.0),
            Count::Percent(100.0),
        ]));
        let caps = [
            Count::Absolute(1),
            Count::Absolute(2),
            Count::Absolute(7),
            Count::Percent(1.0),
            Count::Percent(25.0),
            Count::Percent(100.0),
        ];
        for n in 0..=64 {
            let hs = hosts(n);
            for plan in &plans {
                for cap in caps {
                    let s = Strategy {
                        pause_after_canary: true,
                        ..with(plan.clone(), cap)
                    };
                    let batches = plan_batches(&hs, &s);
                    let limit = max_unavailable(&s, n);
                    assert!(
                        batches.iter().all(|b| !b.is_empty() && b.len() <= limit),
                        "N={n} {s:?}: {batches:?}"
                    );
                    assert_eq!(batches.concat(), hs, "N={n} {s:?}");
                    let ends = stage_ends(n, &s);
                    assert_eq!(ends.last().copied(), (n > 0).then_some(n));
                    assert!(ends.windows(2).all(|w| w[0] < w[1]), "{ends:?}");
                    let pauses = pause_points(&batches, &s);
                    assert!(
                        pauses.iter().all(|&i| i + 1 < batches.len()),
                        "N={n} {s:?}: {pauses:?}"
                    );
                    if matches!(plan, BatchPlan::Canary(_)) {
                        assert_eq!(pauses.len(), ends.len().saturating_sub(1), "N={n} {s:?}");
                    }
                }
            }
        }
    }
}
