//! The resell pipeline of one request (C2) as a state machine in the engine shape of
//! `docs/ARCHITECTURE.md`: `handle_*(now, input)` moves it, `poll()` says what the
//! shell must do next, `next_deadline()` when it must be woken.
//!
//! Pure and whole in its fields: the shell stores it as a row after every step and
//! rebuilds it after a restart, and `poll()` is computed from the state alone, so a
//! step that was applied is never asked for again and one that was not is asked for
//! again. Stages: preliminary criteria, then validation of every host through its
//! agent, then accepted (at least one host met every acceptance criterion) or
//! rejected (with every reason).

use serde::{Deserialize, Serialize};
use surplus_protocol::clock::UnixMillis;
use uuid::Uuid;

use crate::resell::{Assessment, Unmet};

pub use crate::Refusal;
use crate::refuse;

/// Where a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Waiting for the preliminary criteria to be checked.
    Preliminary,
    /// Its hosts are being validated.
    Validating,
    /// At least one host was accepted; its listings are made.
    Accepted,
    /// Nothing was accepted; the reasons are kept.
    Rejected,
}

/// One host of a request and how far its validation got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct HostProgress {
    /// The host's agent.
    pub host: Uuid,
    /// The index of its resource set in the request.
    pub set: usize,
    /// The validation run ordered on it.
    pub run: Option<Uuid>,
    /// How it was judged, once its run ended.
    pub assessment: Option<Assessment>,
    /// Why it could not be judged (the run failed, the agent was offline, time ran out).
    pub failure: Option<String>,
    /// Validation runs ordered on it so far (a run lost to a controller restart is
    /// ordered again, up to [`MAX_ATTEMPTS`]).
    #[serde(default)]
    pub attempts: u32,
}

/// The most validation runs ordered on one host of a request.
pub const MAX_ATTEMPTS: u32 = 3;

impl HostProgress {
    fn done(&self) -> bool {
        self.assessment.is_some() || self.failure.is_some()
    }
    fn accepted(&self) -> bool {
        self.assessment.as_ref().is_some_and(Assessment::accepted)
    }
}

/// One step the request went through, for the provider to read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Step {
    /// When.
    pub at_ms: UnixMillis,
    /// What happened (`submitted`, `preliminary passed`, `validation ordered on ...`).
    pub what: String,
}

/// What the shell must do next, from the state alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Check the preliminary criteria and hand the result to
    /// [`Pipeline::handle_preliminary`].
    CheckPreliminary,
    /// Order a validation run on each of these hosts
    /// ([`Pipeline::handle_run_ordered`] or [`Pipeline::handle_host_failed`]); a host
    /// whose agent is not connected is left for later (its deadline still runs).
    OrderValidation {
        /// The hosts without a run, in the request's order.
        hosts: Vec<Uuid>,
    },
    /// Create the listings of the accepted hosts, then
    /// [`Pipeline::handle_listed`].
    CreateListings {
        /// The accepted hosts with their resource set and category.
        hosts: Vec<(Uuid, usize, Option<String>)>,
    },
    /// Queue the provider's notice of the outcome (in the same transaction as the
    /// step that records it), then [`Pipeline::handle_notified`].
    Notify {
        /// `accepted` or `rejected`.
        outcome: Stage,
    },
}

/// One resell request's way through the pipeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Pipeline {
    /// The request.
    pub request: Uuid,
    /// Where it is.
    pub stage: Stage,
    /// Its hosts, in the request's order.
    pub hosts: Vec<HostProgress>,
    /// Why it was rejected: the unmet preliminary criteria, or every host's failed
    /// criteria.
    pub reasons: Vec<String>,
    /// Every step with its time.
    pub steps: Vec<Step>,
    /// When validation that has not ended by then fails.
    pub validation_deadline_ms: Option<UnixMillis>,
    /// The listings were created.
    pub listed: bool,
    /// The provider's notice of the outcome was queued.
    pub notified: bool,
}

impl Pipeline {
    /// A request just submitted, with its hosts as (agent, resource set index).
    pub fn new(request: Uuid, hosts: &[(Uuid, usize)], now_ms: UnixMillis) -> Self {
        Self {
            request,
            stage: Stage::Preliminary,
            hosts: hosts
                .iter()
                .map(|&(host, set)| HostProgress {
                    host,
                    set,
                    run: None,
                    assessment: None,
                    failure: None,
                    attempts: 0,
                })
                .collect(),
            reasons: Vec::new(),
            steps: vec![Step {
                at_ms: now_ms,
                what: "submitted".into(),
            }],
            validation_deadline_ms: None,
            listed: false,
            notified: false,
        }
    }

    fn expect(&self, stage: Stage, input: &str) -> Result<(), Refusal> {
        if self.stage == stage {
            Ok(())
        } else {
            Err(refuse(
                "stage",
                format!(
                    "{input} needs the {stage:?} stage; the request is {:?}",
                    self.stage
                )
                .to_lowercase(),
            ))
        }
    }

    fn host_mut(&mut self, host: Uuid) -> Result<&mut HostProgress, Refusal> {
        self.hosts
            .iter_mut()
            .find(|h| h.host == host)
            .ok_or_else(|| refuse("unknown_host", format!("host {host} is not in the request")))
    }

    /// `host`, whose ordered run is `run` and which is not judged yet.
    fn waiting_on(&mut self, host: Uuid, run: Uuid) -> Result<&mut HostProgress, Refusal> {
        let h = self.host_mut(host)?;
        if h.run != Some(run) {
            return Err(refuse(
                "run",
                format!("run {run} is not the run ordered on host {host}"),
            ));
        }
        if h.done() {
            return Err(refuse("already", format!("host {host} was judged already")));
        }
        Ok(h)
    }

    fn step(&mut self, now_ms: UnixMillis, what: String) {
        self.steps.push(Step {
            at_ms: now_ms,
            what,
        });
    }

    /// The preliminary criteria were checked: none unmet moves on to validation,
    /// which must end by `now_ms + validation_timeout_ms`; any unmet rejects the
    /// request with every one of them.
    pub fn handle_preliminary(
        &mut self,
        now_ms: UnixMillis,
        unmet: &[Unmet],
        validation_timeout_ms: i64,
    ) -> Result<(), Refusal> {
        self.expect(Stage::Preliminary, "the preliminary criteria")?;
        if unmet.is_empty() {
            self.stage = Stage::Validating;
            self.validation_deadline_ms = Some(now_ms.saturating_add(validation_timeout_ms));
            self.step(now_ms, "preliminary criteria met".into());
        } else {
            self.stage = Stage::Rejected;
            self.reasons = unmet
                .iter()
                .map(|u| match &u.field {
                    Some(f) => format!("{} ({f}): {}", u.rule, u.message),
                    None => format!("{}: {}", u.rule, u.message),
                })
                .collect();
            self.step(
                now_ms,
                format!("rejected: {} preliminary criteria unmet", unmet.len()),
            );
        }
        Ok(())
    }

    /// A validation run was ordered on `host`.
    pub fn handle_run_ordered(
        &mut self,
        now_ms: UnixMillis,
        host: Uuid,
        run: Uuid,
    ) -> Result<(), Refusal> {
        self.expect(Stage::Validating, "a validation run")?;
        let h = self.host_mut(host)?;
        if h.run.is_some() || h.done() {
            return Err(refuse(
                "already",
                format!("host {host} has its validation run already"),
            ));
        }
        h.run = Some(run);
        h.attempts += 1;
        self.step(now_ms, format!("validation run {run} ordered on {host}"));
        Ok(())
    }

    /// The run `run` on `host` ended without a verdict on the host (the controller
    /// stopped during it): it is ordered again, unless it was the
    /// [`MAX_ATTEMPTS`]th, which fails the host.
    pub fn handle_run_lost(
        &mut self,
        now_ms: UnixMillis,
        host: Uuid,
        run: Uuid,
        why: &str,
    ) -> Result<(), Refusal> {
        self.expect(Stage::Validating, "a lost run")?;
        let h = self.waiting_on(host, run)?;
        if h.attempts >= MAX_ATTEMPTS {
            h.failure = Some(format!(
                "{} validation runs lost, the last: {why}",
                h.attempts
            ));
            self.step(
                now_ms,
                format!("{host} not validated: run {run} lost ({why})"),
            );
            self.settle(now_ms);
        } else {
            h.run = None;
            self.step(
                now_ms,
                format!("run {run} on {host} lost ({why}); ordering another"),
            );
        }
        Ok(())
    }

    /// `host` could not be validated (`why`: the agent was offline, the run failed).
    pub fn handle_host_failed(
        &mut self,
        now_ms: UnixMillis,
        host: Uuid,
        why: &str,
    ) -> Result<(), Refusal> {
        self.expect(Stage::Validating, "a host's failure")?;
        let h = self.host_mut(host)?;
        if h.done() {
            return Err(refuse("already", format!("host {host} was judged already")));
        }
        h.failure = Some(why.into());
        self.step(now_ms, format!("{host} not validated: {why}"));
        self.settle(now_ms);
        Ok(())
    }

    /// The run `run` on `host` ended and its evidence was judged.
    pub fn handle_assessed(
        &mut self,
        now_ms: UnixMillis,
        host: Uuid,
        run: Uuid,
        assessment: Assessment,
    ) -> Result<(), Refusal> {
        self.expect(Stage::Validating, "an assessment")?;
        let h = self.waiting_on(host, run)?;
        let verdict = if assessment.accepted() {
            "met every acceptance criterion".to_owned()
        } else {
            format!(
                "failed {}",
                assessment
                    .criteria
                    .iter()
                    .filter(|c| !c.passed)
                    .map(|c| c.field.as_deref().unwrap_or(&c.rule).to_owned())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        h.assessment = Some(assessment);
        self.step(now_ms, format!("{host} {verdict}"));
        self.settle(now_ms);
        Ok(())
    }

    /// The time to wake the pipeline at: validation that has not ended by its deadline
    /// fails for the hosts still waiting.
    pub fn handle_timeout(&mut self, now_ms: UnixMillis) -> Result<(), Refusal> {
        self.expect(Stage::Validating, "a timeout")?;
        match self.validation_deadline_ms {
            Some(deadline) if now_ms >= deadline => {}
            other => {
                return Err(refuse(
                    "stage",
                    format!("the validation deadline {other:?} has not come (now {now_ms})"),
                ));
            }
        }
        for h in self.hosts.iter_mut().filter(|h| !h.done()) {
            h.failure = Some("validation did not end before the deadline".into());
        }
        self.step(now_ms, "validation deadline passed".into());
        self.settle(now_ms);
        Ok(())
    }

    /// Once every host is judged: accepted when one was, else rejected with every
    /// host's reasons.
    fn settle(&mut self, now_ms: UnixMillis) {
        if !self.hosts.iter().all(HostProgress::done) {
            return;
        }
        self.validation_deadline_ms = None;
        if self.hosts.iter().any(HostProgress::accepted) {
            self.stage = Stage::Accepted;
            let n = self.hosts.iter().filter(|h| h.accepted()).count();
            self.step(
                now_ms,
                format!("accepted: {n} of {} hosts", self.hosts.len()),
            );
        } else {
            self.stage = Stage::Rejected;
            self.reasons = self
                .hosts
                .iter()
                .flat_map(|h| {
                    let failure = h.failure.iter().map(move |f| format!("{}: {f}", h.host));
                    let failed = h
                        .assessment
                        .iter()
                        .flat_map(|a| a.criteria.iter().filter(|c| !c.passed))
                        .map(move |c| {
                            format!(
                                "{}: {} {}: claimed {}, measured {}, required {}",
                                h.host,
                                c.rule,
                                c.field.as_deref().unwrap_or(""),
                                c.claimed.as_deref().unwrap_or("-"),
                                c.measured.as_deref().unwrap_or("-"),
                                c.required.as_deref().unwrap_or("-"),
                            )
                        });
                    failure.chain(failed)
                })
                .collect();
            self.step(now_ms, "rejected: no host met every criterion".into());
        }
    }

    /// The listings of the accepted hosts were created.
    pub fn handle_listed(&mut self, now_ms: UnixMillis) -> Result<(), Refusal> {
        self.expect(Stage::Accepted, "listing")?;
        if self.listed {
            return Err(refuse("already", "the listings exist already"));
        }
        self.listed = true;
        self.step(now_ms, "listed".into());
        Ok(())
    }

    /// The provider's notice of the outcome was queued.
    pub fn handle_notified(&mut self, now_ms: UnixMillis) -> Result<(), Refusal> {
        if !matches!(self.stage, Stage::Accepted | Stage::Rejected) {
            return Err(refuse("stage", "there is no outcome to notify yet"));
        }
        if self.notified {
            return Err(refuse("already", "the provider was notified already"));
        }
        self.notified = true;
        self.step(now_ms, "provider notified".into());
        Ok(())
    }

    /// What the shell must do next; `None` when the request waits for an event (a run
    /// to end, the deadline) or is finished.
    pub fn poll(&self) -> Option<Action> {
        match self.stage {
            Stage::Preliminary => Some(Action::CheckPreliminary),
            Stage::Validating => {
                let hosts: Vec<Uuid> = self
                    .hosts
                    .iter()
                    .filter(|h| h.run.is_none() && !h.done())
                    .map(|h| h.host)
                    .collect();
                (!hosts.is_empty()).then_some(Action::OrderValidation { hosts })
            }
            Stage::Accepted if !self.listed => Some(Action::CreateListings {
                hosts: self
                    .hosts
                    .iter()
                    .filter(|h| h.accepted())
                    .map(|h| {
                        let category = h.assessment.as_ref().and_then(|a| a.category.clone());
                        (h.host, h.set, category)
                    })
                    .collect(),
            }),
            Stage::Accepted | Stage::Rejected if !self.notified => Some(Action::Notify {
                outcome: self.stage,
            }),
            Stage::Accepted | Stage::Rejected => None,
        }
    }

    /// When the shell must call [`Pipeline::handle_timeout`].
    pub fn next_deadline(&self) -> Option<UnixMillis> {
        match self.stage {
            Stage::Validating => self.validation_deadline_ms,
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resell::Criterion;

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    fn assessment(passed: bool) -> Assessment {
        Assessment {
            criteria: vec![Criterion {
                rule: "spec".into(),
                field: Some("system.threads".into()),
                passed,
                claimed: Some("32".into()),
                measured: Some("8".into()),
                required: Some("at least 32".into()),
            }],
            category: Some("medium".into()),
            measured: Default::default(),
        }
    }

    /// Drives a pipeline the way a shell does: asks `poll`, applies it, until it waits.
    fn drive(p: &mut Pipeline, now: UnixMillis, runs: &mut u128) -> Vec<Action> {
        let mut done = Vec::new();
        while let Some(action) = p.poll() {
            match &action {
                Action::CheckPreliminary => p.handle_preliminary(now, &[], 600_000).unwrap(),
                Action::OrderValidation { hosts } => {
                    for host in hosts {
                        *runs += 1;
                        p.handle_run_ordered(now, *host, id(1000 + *runs)).unwrap()
                    }
                }
                Action::CreateListings { .. } => p.handle_listed(now).unwrap(),
                Action::Notify { .. } => p.handle_notified(now).unwrap(),
            }
            done.push(action);
        }
        done
    }

    #[test]
    fn a_request_whose_hosts_pass_is_validated_listed_and_notified_once() {
        let (a, b) = (id(1), id(2));
        let mut p = Pipeline::new(id(9), &[(a, 0), (b, 0)], 0);
        let mut runs = 0;
        assert_eq!(
            drive(&mut p, 10, &mut runs),
            [
                Action::CheckPreliminary,
                Action::OrderValidation { hosts: vec![a, b] },
            ]
        );
        assert_eq!(
            (p.stage, p.next_deadline()),
            (Stage::Validating, Some(600_010))
        );
        p.handle_assessed(20, a, id(1001), assessment(true))
            .unwrap();
        assert_eq!(p.poll(), None, "waits for the other host");
        p.handle_assessed(30, b, id(1002), assessment(false))
            .unwrap();
        assert_eq!(p.stage, Stage::Accepted);
        assert_eq!(p.next_deadline(), None);
        assert_eq!(
            drive(&mut p, 40, &mut runs),
            [
                Action::CreateListings {
                    hosts: vec![(a, 0, Some("medium".into()))]
                },
                Action::Notify {
                    outcome: Stage::Accepted
                },
            ]
        );
        assert_eq!(p.poll(), None);
        let steps: Vec<&str> = p.steps.iter().map(|s| s.what.as_str()).collect();
        assert_eq!(steps[0], "submitted");
        assert!(steps.contains(&"accepted: 1 of 2 hosts"), "{steps:?}");
    }

    #[test]
    fn unmet_preliminary_criteria_reject_with_every_reason() {
        let mut p = Pipeline::new(id(9), &[(id(1), 0)], 0);
        let unmet = [
            Unmet {
                rule: "agreement".into(),
                field: None,
                message: "the agreement ended at 5000 (now 6000)".into(),
            },
            Unmet {
                rule: "platform".into(),
                field: Some("resource_sets[0].system.architecture".into()),
                message: "aarch64 is not supported".into(),
            },
        ];
        p.handle_preliminary(6_000, &unmet, 600_000).unwrap();
        assert_eq!(p.stage, Stage::Rejected);
        assert_eq!(
            p.reasons,
            [
                "agreement: the agreement ended at 5000 (now 6000)",
                "platform (resource_sets[0].system.architecture): aarch64 is not supported"
            ]
        );
        assert_eq!(
            p.poll(),
            Some(Action::Notify {
                outcome: Stage::Rejected
            })
        );
    }

    #[test]
    fn hosts_that_all_fail_reject_with_claimed_against_measured() {
        let (a, b) = (id(1), id(2));
        let mut p = Pipeline::new(id(9), &[(a, 0), (b, 1)], 0);
        drive(&mut p, 0, &mut 0);
        p.handle_assessed(5, a, id(1001), assessment(false))
            .unwrap();
        p.handle_host_failed(6, b, "the agent is offline").unwrap();
        assert_eq!(p.stage, Stage::Rejected);
        assert_eq!(
            p.reasons,
            [
                format!("{a}: spec system.threads: claimed 32, measured 8, required at least 32"),
                format!("{b}: the agent is offline"),
            ]
        );
    }

    #[test]
    fn the_deadline_fails_the_hosts_still_waiting() {
        let (a, b) = (id(1), id(2));
        let mut p = Pipeline::new(id(9), &[(a, 0), (b, 0)], 0);
        drive(&mut p, 0, &mut 0);
        p.handle_assessed(5, a, id(1001), assessment(true)).unwrap();
        assert_eq!(p.handle_timeout(599_999).unwrap_err().rule, "stage");
        p.handle_timeout(600_000).unwrap();
        assert_eq!(p.stage, Stage::Accepted);
        assert_eq!(
            p.hosts[1].failure.as_deref(),
            Some("validation did not end before the deadline")
        );
    }

    /// Each case: (rule it pins, the input, the refusal's rule); a refused input
    /// changes nothing.
    #[test]
    fn inputs_out_of_turn_are_refused_and_change_nothing() {
        let a = id(1);
        let mut validating = Pipeline::new(id(9), &[(a, 0)], 0);
        drive(&mut validating, 0, &mut 0);
        type Input = fn(&mut Pipeline) -> Result<(), Refusal>;
        let cases: Vec<(&str, Pipeline, Input, &str)> = vec![
            (
                "validation before the preliminary criteria",
                Pipeline::new(id(9), &[(a, 0)], 0),
                |p| p.handle_run_ordered(1, id(1), id(5)),
                "stage",
            ),
            (
                "a run ordered twice",
                validating.clone(),
                |p| p.handle_run_ordered(1, id(1), id(5)),
                "already",
            ),
            (
                "the result of another run",
                validating.clone(),
                |p| p.handle_assessed(1, id(1), id(5), assessment(true)),
                "run",
            ),
            (
                "a host not in the request",
                validating.clone(),
                |p| p.handle_host_failed(1, id(7), "?"),
                "unknown_host",
            ),
            (
                "a notice before the outcome",
                validating.clone(),
                |p| p.handle_notified(1),
                "stage",
            ),
            (
                "listing what was not accepted",
                validating.clone(),
                |p| p.handle_listed(1),
                "stage",
            ),
        ];
        for (rule, before, input, want) in cases {
            let mut p = before.clone();
            assert_eq!(input(&mut p).unwrap_err().rule, want, "{rule}");
            assert_eq!(p, before, "{rule}: a refused input changed the pipeline");
        }
        // A result delivered twice (a retried step after a restart) is refused the
        // second time.
        let mut p = validating.clone();
        p.handle_assessed(2, a, id(1001), assessment(true)).unwrap();
        let after = p.clone();
        assert_eq!(
            p.handle_assessed(3, a, id(1001), assessment(true))
                .unwrap_err()
                .rule,
            "stage"
        );
        assert_eq!(p, after);
    }

    proptest::proptest! {
        /// Whatever each host's outcome and the order they arrive in, with the state
        /// rebuilt from its row after every step: accepted exactly when one host
        /// passed, listed once only then, the provider notified exactly once.
        #[test]
        fn every_interleaving_ends_once_with_the_right_outcome(
            outcomes in proptest::collection::vec(0u8..4, 1..7),
            order in proptest::collection::vec(proptest::prelude::any::<proptest::sample::Index>(), 7),
        ) {
            let hosts: Vec<(Uuid, usize)> = (0..outcomes.len()).map(|i| (id(i as u128 + 1), i % 2)).collect();
            let mut p = Pipeline::new(id(99), &hosts, 0);
            let reload = |p: &Pipeline| -> Pipeline {
                serde_json::from_str(&serde_json::to_string(p).unwrap()).unwrap()
            };
            let mut runs = 0;
            let mut actions = drive(&mut p, 1, &mut runs);
            // Deliver the results in a random order; outcome 3 never arrives.
            let mut pending: Vec<usize> = (0..outcomes.len()).filter(|&i| outcomes[i] != 3).collect();
            let mut k = 0;
            while !pending.is_empty() {
                let i = pending.remove(order[k % order.len()].index(pending.len()));
                k += 1;
                p = reload(&p);
                let host = hosts[i].0;
                let run = p.hosts[i].run.unwrap();
                match outcomes[i] {
                    0 => p.handle_assessed(10, host, run, assessment(true)).unwrap(),
                    1 => p.handle_assessed(10, host, run, assessment(false)).unwrap(),
                    _ => p.handle_host_failed(10, host, "the agent is offline").unwrap(),
                }
                actions.extend(drive(&mut p, 11, &mut runs));
            }
            if p.stage == Stage::Validating {
                p = reload(&p);
                p.handle_timeout(p.next_deadline().unwrap()).unwrap();
            }
            actions.extend(drive(&mut p, 700_000, &mut runs));
            let passed = outcomes.iter().filter(|o| **o == 0).count();
            let want = if passed > 0 { Stage::Accepted } else { Stage::Rejected };
            proptest::prop_assert_eq!(p.stage, want);
            let notices = actions.iter().filter(|a| matches!(a, Action::Notify { .. })).count();
            proptest::prop_assert_eq!(notices, 1);
            let listings: Vec<_> = actions.iter().filter_map(|a| match a {
                Action::CreateListings { hosts } => Some(hosts.len()),
                _ => None,
            }).collect();
            proptest::prop_assert_eq!(listings, if passed > 0 { vec![passed] } else { vec![] });
            proptest::prop_assert_eq!(runs as usize, outcomes.len());
            proptest::prop_assert_eq!(p.poll(), None);
        }
    }

    #[test]
    fn a_lost_run_is_ordered_again_until_the_last_attempt_fails_the_host() {
        let a = id(1);
        let mut p = Pipeline::new(id(9), &[(a, 0)], 0);
        let mut runs = 0;
        drive(&mut p, 1, &mut runs);
        for attempt in 1..MAX_ATTEMPTS {
            let run = p.hosts[0].run.unwrap();
            p.handle_run_lost(2, a, run, "the controller stopped")
                .unwrap();
            assert_eq!(p.stage, Stage::Validating, "attempt {attempt}");
            assert_eq!(p.poll(), Some(Action::OrderValidation { hosts: vec![a] }));
            drive(&mut p, 3, &mut runs);
        }
        assert_eq!(p.hosts[0].attempts, MAX_ATTEMPTS);
        let run = p.hosts[0].run.unwrap();
        assert_eq!(
            p.handle_run_lost(4, a, id(5), "?").unwrap_err().rule,
            "run",
            "only the run ordered can be lost"
        );
        p.handle_run_lost(4, a, run, "the controller stopped")
            .unwrap();
        assert_eq!(p.stage, Stage::Rejected);
        assert!(
            p.reasons[0].contains("3 validation runs lost"),
            "{:?}",
            p.reasons
        );
    }

    #[test]
    fn a_pipeline_rebuilt_from_its_row_asks_for_what_was_not_applied() {
        let (a, b) = (id(1), id(2));
        let mut p = Pipeline::new(id(9), &[(a, 0), (b, 0)], 0);
        p.handle_preliminary(1, &[], 600_000).unwrap();
        p.handle_run_ordered(2, a, id(1001)).unwrap();
        // The controller stops here; the row is all that is left.
        let row = serde_json::to_string(&p).unwrap();
        let rebuilt: Pipeline = serde_json::from_str(&row).unwrap();
        assert_eq!(rebuilt, p);
        assert_eq!(
            rebuilt.poll(),
            Some(Action::OrderValidation { hosts: vec![b] })
        );
        assert_eq!(rebuilt.next_deadline(), Some(600_001));
    }
}
