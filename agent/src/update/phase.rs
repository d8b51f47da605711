//! The update phase of one service on a host: a small `Copy` enum with a pure
//! transition function. The executor persists the next phase (the journal)
//! before performing the side effect that the phase names.
//!
//! ```mermaid
//! stateDiagram-v2
//!     [*] --> Idle
//!     Idle --> Activating: Activate
//!     Degraded --> Activating: Activate
//!     Activating --> Activating: StepDone (before_stop, stop, before_switch, switch, after_switch, start)
//!     Activating --> Verifying: StepDone after start
//!     Activating --> RollingBack: StepFailed / Recover
//!     Verifying --> Probation: Healthy
//!     Verifying --> RollingBack: Unhealthy / Recover
//!     Probation --> Idle: Commit
//!     Probation --> Probation: Recover
//!     Probation --> RollingBack: Unhealthy / CommitDeadline / RollbackRequested
//!     Idle --> RollingBack: RollbackRequested
//!     Degraded --> RollingBack: RollbackRequested
//!     RollingBack --> RollingBack: StepDone (stop, switch, start, verify) / Recover (from stop)
//!     RollingBack --> Idle: Healthy at verify
//!     RollingBack --> Degraded: Unhealthy at verify / StepFailed
//! ```

use serde::{Deserialize, Serialize};

/// Steps of an activation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActivateStep {
    /// Hook `before_stop` of the incoming release.
    BeforeStop,
    /// Stop the running service.
    Stop,
    /// Hook `before_switch`.
    BeforeSwitch,
    /// Point `current` at the incoming release.
    Switch,
    /// Hook `after_switch`.
    AfterSwitch,
    /// Start the service from the incoming release.
    Start,
}

impl ActivateStep {
    /// Every step, in order.
    pub const ALL: [ActivateStep; 6] = [
        ActivateStep::BeforeStop,
        ActivateStep::Stop,
        ActivateStep::BeforeSwitch,
        ActivateStep::Switch,
        ActivateStep::AfterSwitch,
        ActivateStep::Start,
    ];

    fn next(self) -> Option<ActivateStep> {
        use ActivateStep::*;
        match self {
            BeforeStop => Some(Stop),
            Stop => Some(BeforeSwitch),
            BeforeSwitch => Some(Switch),
            Switch => Some(AfterSwitch),
            AfterSwitch => Some(Start),
            Start => None,
        }
    }

    /// Name used in journals, reports and crash points.
    pub fn name(self) -> &'static str {
        use ActivateStep::*;
        match self {
            BeforeStop => "before_stop",
            Stop => "stop",
            BeforeSwitch => "before_switch",
            Switch => "switch",
            AfterSwitch => "after_switch",
            Start => "start",
        }
    }
}

/// Steps of a rollback, in order. Every step is idempotent, so a rollback
/// interrupted anywhere restarts from [`RollbackStep::Stop`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RollbackStep {
    /// Stop whatever runs.
    Stop,
    /// Point `current` at the target (or remove it when there is none).
    Switch,
    /// Start the target.
    Start,
    /// Wait for the target to be healthy.
    Verify,
}

impl RollbackStep {
    /// Every step, in order.
    pub const ALL: [RollbackStep; 4] = [
        RollbackStep::Stop,
        RollbackStep::Switch,
        RollbackStep::Start,
        RollbackStep::Verify,
    ];

    /// Name used in journals, reports and crash points.
    pub fn name(self) -> &'static str {
        match self {
            RollbackStep::Stop => "stop",
            RollbackStep::Switch => "switch",
            RollbackStep::Start => "start",
            RollbackStep::Verify => "verify",
        }
    }
}

/// Where a service stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "phase", content = "step")]
pub enum Phase {
    /// No operation; `current` (if any) is committed.
    Idle,
    /// An activation is at this step.
    Activating(ActivateStep),
    /// The new release runs; waiting for it to be healthy long enough.
    Verifying,
    /// Healthy; waiting for the coordinator's commit.
    Probation,
    /// A rollback is at this step.
    RollingBack(RollbackStep),
    /// A rollback finished but its target did not become healthy; needs an operator.
    Degraded,
}

/// What happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// Begin activating a staged release.
    Activate,
    /// The current step's side effect finished.
    StepDone,
    /// The current step's side effect failed (hook, stop, switch, start).
    StepFailed,
    /// The health gate passed.
    Healthy,
    /// The health gate failed (deadline passed, check failing, ceiling crossed).
    Unhealthy,
    /// The coordinator committed the release in probation.
    Commit,
    /// No commit arrived in time.
    CommitDeadline,
    /// An operator or the coordinator asked for a rollback.
    RollbackRequested,
    /// The agent restarted and found the service in this phase.
    Recover,
}

impl Event {
    /// Every event, for exhaustive tests.
    pub const ALL: [Event; 9] = [
        Event::Activate,
        Event::StepDone,
        Event::StepFailed,
        Event::Healthy,
        Event::Unhealthy,
        Event::Commit,
        Event::CommitDeadline,
        Event::RollbackRequested,
        Event::Recover,
    ];
}

/// An event that makes no sense in a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{event:?} is not allowed while {phase}")]
pub struct IllegalTransition {
    /// The phase the service was in.
    pub phase: Phase,
    /// The refused event.
    pub event: Event,
}

impl Phase {
    /// The phase after `event`, or an error when the event is illegal here.
    pub fn next(self, event: Event) -> Result<Phase, IllegalTransition> {
        use Event as E;
        use Phase as P;
        let next = match (self, event) {
            (P::Idle | P::Degraded, E::Activate) => P::Activating(ActivateStep::BeforeStop),
            (P::Activating(s), E::StepDone) => match s.next() {
                Some(n) => P::Activating(n),
                None => P::Verifying,
            },
            (P::Activating(_), E::StepFailed | E::Recover) => P::RollingBack(RollbackStep::Stop),
            (P::Verifying, E::Healthy) => P::Probation,
            (P::Verifying, E::Unhealthy | E::Recover | E::RollbackRequested) => {
                P::RollingBack(RollbackStep::Stop)
            }
            (P::Probation, E::Commit) => P::Idle,
            (P::Probation, E::Recover) => P::Probation,
            (P::Probation, E::Unhealthy | E::CommitDeadline | E::RollbackRequested) => {
                P::RollingBack(RollbackStep::Stop)
            }
            (P::Idle | P::Degraded, E::RollbackRequested) => P::RollingBack(RollbackStep::Stop),
            (P::RollingBack(RollbackStep::Stop), E::StepDone) => {
                P::RollingBack(RollbackStep::Switch)
            }
            (P::RollingBack(RollbackStep::Switch), E::StepDone) => {
                P::RollingBack(RollbackStep::Start)
            }
            (P::RollingBack(RollbackStep::Start), E::StepDone) => {
                P::RollingBack(RollbackStep::Verify)
            }
            (P::RollingBack(RollbackStep::Verify), E::Healthy) => P::Idle,
            (P::RollingBack(RollbackStep::Verify), E::Unhealthy) => P::Degraded,
            (P::RollingBack(_), E::StepFailed) => P::Degraded,
            (P::RollingBack(_), E::Recover) => P::RollingBack(RollbackStep::Stop),
            (P::Idle, E::Recover) => P::Idle,
            (P::Degraded, E::Recover) => P::Degraded,
            (phase, event) => return Err(IllegalTransition { phase, event }),
        };
        Ok(next)
    }

    /// Whether an operation is executing (requests other than status are refused).
    pub fn is_busy(self) -> bool {
        matches!(
            self,
            Phase::Activating(_) | Phase::Verifying | Phase::RollingBack(_)
        )
    }

    /// Every phase, for exhaustive tests.
    pub fn all() -> Vec<Phase> {
        let mut v = vec![
            Phase::Idle,
            Phase::Verifying,
            Phase::Probation,
            Phase::Degraded,
        ];
        v.extend(ActivateStep::ALL.iter().map(|s| Phase::Activating(*s)));
        v.extend(RollbackStep::ALL.iter().map(|s| Phase::RollingBack(*s)));
        v
    }

    /// Short name of the phase.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Idle => "idle",
            Phase::Activating(_) => "activating",
            Phase::Verifying => "verifying",
            Phase::Probation => "probation",
            Phase::RollingBack(_) => "rolling_back",
            Phase::Degraded => "degraded",
        }
    }

    /// Phase and step, e.g. `activating:switch`; the crash-point and journal name.
    pub fn step_name(self) -> String {
        match self {
            Phase::Activating(s) => format!("activating:{}", s.name()),
            Phase::RollingBack(s) => format!("rolling_back:{}", s.name()),
            p => p.name().to_string(),
        }
    }
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.step_name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ActivateStep as A;
    use Event as E;
    use Phase as P;
    use RollbackStep as R;

    /// The whole table: every (phase, event) pair, legal or not.
    fn expected(phase: Phase, event: Event) -> Option<Phase> {
        let rb = Some(P::RollingBack(R::Stop));
        match (phase, event) {
            (P::Idle, E::Activate) | (P::Degraded, E::Activate) => {
                Some(P::Activating(A::BeforeStop))
            }
            (P::Idle, E::RollbackRequested) | (P::Degraded, E::RollbackRequested) => rb,
            (P::Idle, E::Recover) => Some(P::Idle),
            (P::Degraded, E::Recover) => Some(P::Degraded),
            (P::Activating(A::BeforeStop), E::StepDone) => Some(P::Activating(A::Stop)),
            (P::Activating(A::Stop), E::StepDone) => Some(P::Activating(A::BeforeSwitch)),
            (P::Activating(A::BeforeSwitch), E::StepDone) => Some(P::Activating(A::Switch)),
            (P::Activating(A::Switch), E::StepDone) => Some(P::Activating(A::AfterSwitch)),
            (P::Activating(A::AfterSwitch), E::StepDone) => Some(P::Activating(A::Start)),
            (P::Activating(A::Start), E::StepDone) => Some(P::Verifying),
            (P::Activating(_), E::StepFailed) | (P::Activating(_), E::Recover) => rb,
            (P::Verifying, E::Healthy) => Some(P::Probation),
            (P::Verifying, E::Unhealthy | E::Recover | E::RollbackRequested) => rb,
            (P::Probation, E::Commit) => Some(P::Idle),
            (P::Probation, E::Recover) => Some(P::Probation),
            (P::Probation, E::Unhealthy | E::CommitDeadline | E::RollbackRequested) => rb,
            (P::RollingBack(R::Stop), E::StepDone) => Some(P::RollingBack(R::Switch)),
            (P::RollingBack(R::Switch), E::StepDone) => Some(P::RollingBack(R::Start)),
            (P::RollingBack(R::Start), E::StepDone) => Some(P::RollingBack(R::Verify)),
            (P::RollingBack(R::Verify), E::Healthy) => Some(P::Idle),
            (P::RollingBack(R::Verify), E::Unhealthy) => Some(P::Degraded),
            (P::RollingBack(_), E::StepFailed) => Some(P::Degraded),
            (P::RollingBack(_), E::Recover) => rb,
            _ => None,
        }
    }

    #[test]
    fn every_phase_event_pair_matches_the_table() {
        let mut legal = 0;
        for phase in Phase::all() {
            for event in Event::ALL {
                match (phase.next(event), expected(phase, event)) {
                    (Ok(got), Some(want)) => {
                        assert_eq!(got, want, "{phase:?} + {event:?}");
                        legal += 1;
                    }
                    (Err(e), None) => {
                        assert_eq!(e.phase, phase);
                        assert_eq!(e.event, event);
                    }
                    (got, want) => panic!("{phase:?} + {event:?}: got {got:?}, want {want:?}"),
                }
            }
        }
        // 14 phases x 9 events; a change in the number of legal pairs must be deliberate.
        assert_eq!(Phase::all().len(), 14);
        assert_eq!(legal, 46);
    }

    #[test]
    fn a_clean_activation_walks_every_step_to_idle() {
        let mut p = P::Idle.next(E::Activate).expect("activate");
        let mut seen = vec![p];
        while p != P::Verifying {
            p = p.next(E::StepDone).expect("step");
            seen.push(p);
        }
        p = p.next(E::Healthy).expect("healthy");
        assert_eq!(p, P::Probation);
        assert_eq!(p.next(E::Commit).expect("commit"), P::Idle);
        assert_eq!(seen.len(), 7);
    }

    #[test]
    fn recovery_rolls_back_unfinished_activations_but_keeps_probation() {
        for s in A::ALL {
            assert_eq!(
                P::Activating(s).next(E::Recover),
                Ok(P::RollingBack(R::Stop))
            );
        }
        assert_eq!(P::Verifying.next(E::Recover), Ok(P::RollingBack(R::Stop)));
        assert_eq!(P::Probation.next(E::Recover), Ok(P::Probation));
        for s in R::ALL {
            assert_eq!(
                P::RollingBack(s).next(E::Recover),
                Ok(P::RollingBack(R::Stop))
            );
        }
    }

    #[test]
    fn busy_phases_are_exactly_the_executing_ones() {
        for p in Phase::all() {
            let busy = matches!(p, P::Activating(_) | P::Verifying | P::RollingBack(_));
            assert_eq!(p.is_busy(), busy, "{p:?}");
        }
    }

    #[test]
    fn phase_round_trips_through_json() {
        for p in Phase::all() {
            let s = serde_json::to_string(&p).expect("serialize");
            let back: Phase = serde_json::from_str(&s).expect("deserialize");
            assert_eq!(back, p);
        }
    }
}
