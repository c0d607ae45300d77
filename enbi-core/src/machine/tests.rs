use k8s_openapi::jiff::Timestamp;
use proptest::prelude::*;

use super::*;
use crate::crd::{ImageNodeState, NixBuildSpec};
use crate::keys;
use crate::placement::{NodeView, place};
use crate::report::{FailureReport, ImageReport, Timings};

const TAG: &str = "registry.example/app:v1";

fn build() -> NixBuild {
    let mut b = NixBuild::new(
        "app-0123456789",
        NixBuildSpec {
            flake_url: "github:o/r".into(),
            package_name: "app.stream".into(),
            image_tag: TAG.into(),
            system: "aarch64-linux".into(),
            fetch_secret_ref: None,
            resources: None,
        },
    );
    b.metadata.namespace = Some("apps".into());
    b.metadata.uid = Some("uid-1".into());
    b.metadata.generation = Some(1);
    b
}

fn nodes() -> Vec<NodeView> {
    vec![NodeView {
        name: "arm-0".into(),
        arch: Some("arm64".into()),
        os: Some("linux".into()),
        ready: true,
        schedulable: true,
        repel_label: false,
        unsupported: None,
    }]
}

fn at(secs: i64) -> Timestamp {
    Timestamp::from_second(1_800_000_000 + secs).expect("in range")
}

fn observe<'a>(b: &'a NixBuild, job: Option<&'a JobView>, now: i64) -> Observation<'a> {
    Observation {
        build: b,
        job,
        policy: Ok(()),
        fetch_secret: Ok(()),
        placement: place(&b.spec.system, &nodes(), &[], None),
        capacity: Ok(()),
        spread: Default::default(),
        fault: None,
        other_systems: vec![],
        now: at(now),
    }
}

fn apply(b: &mut NixBuild, d: &Decision) {
    b.status = Some(d.status.clone());
}

fn view(b: &NixBuild, state: JobState, message: Option<String>, terminated: bool) -> JobView {
    JobView {
        name: job::name(b, b.status.as_ref().map_or(0, |s| s.attempts)),
        state,
        node: Some("arm-0".into()),
        termination_message: message,
        terminated,
        completed: None,
    }
}

fn success_report(tag: &str) -> String {
    BuildReport::Succeeded(ImageReport {
        image_tag: tag.into(),
        digest: format!("sha256:{}", "b".repeat(64)),
        size: 4096,
        provenance: crate::report::Provenance {
            store_path: "/nix/store/x-app".into(),
            ..Default::default()
        },
        bytes_streamed: 4096,
        imported: true,
        timings: Timings::default(),
    })
    .encode()
}

fn failure_report(reason: FailureReason) -> String {
    BuildReport::Failed(FailureReport {
        reason,
        message: "it broke".into(),
        log_tail: "error: line\n".into(),
    })
    .encode()
}

fn condition<'a>(
    d: &'a Decision,
    type_: &str,
) -> &'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
    conditions::get(&d.status.conditions, type_).expect("condition set")
}

fn settings() -> Settings {
    Settings::default()
}

#[test]
fn first_sight_creates_attempt_one() {
    let b = build();
    let d = decide(observe(&b, None, 0), &settings());
    assert_eq!(d.create_job.as_ref().map(|p| p.attempt), Some(1));
    assert_eq!(d.status.phase, Some(Phase::Building));
    assert_eq!(d.status.attempts, 1);
    assert_eq!(d.status.build_job_name, Some(job::name(&b, 1)));
    assert_eq!(d.status.observed_generation, Some(1));
    assert_eq!(d.events[0].reason, "Scheduled");
    assert!(d.events[0].note.contains("arm-0"));
    assert_eq!(condition(&d, READY).status, "False");
}

#[test]
fn success_path_records_digest_size_and_node() {
    let mut b = build();
    let d = decide(observe(&b, None, 0), &settings());
    apply(&mut b, &d);
    let running = view(&b, JobState::Running, None, false);
    let d = decide(observe(&b, Some(&running), 5), &settings());
    assert!(d.create_job.is_none());
    assert_eq!(d.status.build_node.as_deref(), Some("arm-0"));
    assert_eq!(
        d.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        ["Building"]
    );
    apply(&mut b, &d);
    // Seeing the same running Job again changes nothing and says nothing.
    let again = decide(observe(&b, Some(&running), 6), &settings());
    assert!(again.events.is_empty() && again.create_job.is_none());
    assert_eq!(again.status, b.status.clone().expect("status"));

    let done = view(&b, JobState::Succeeded, Some(success_report(TAG)), true);
    let d = decide(observe(&b, Some(&done), 60), &settings());
    assert_eq!(d.status.phase, Some(Phase::Succeeded));
    assert_eq!(d.status.image_size, Some(4096));
    assert_eq!(
        d.status.image_digest,
        Some(format!("sha256:{}", "b".repeat(64)))
    );
    assert_eq!(
        d.status.provenance.as_ref().map(|p| p.store_path.as_str()),
        Some("/nix/store/x-app")
    );
    assert_eq!(d.status.completion_time, Some(Time(at(60))));
    for (type_, reason) in [
        (READY, "ResultSuccess"),
        (SUCCESS, "ResultSuccess"),
        (COMPLETE, "BuildFinished"),
    ] {
        let c = condition(&d, type_);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", reason),
            "{type_}"
        );
    }
    assert_eq!(
        d.events.iter().map(|e| e.reason).collect::<Vec<_>>(),
        ["Succeeded"]
    );
    let holders: Vec<(&str, ImageNodeState)> = d
        .status
        .image_nodes
        .iter()
        .map(|n| (n.node.as_str(), n.state))
        .collect();
    assert_eq!(holders, [("arm-0", ImageNodeState::Loaded)]);
    apply(&mut b, &d);
    // A finished build is left alone while no Pod waits elsewhere...
    let after = decide(observe(&b, Some(&done), 61), &settings());
    assert!(after.events.is_empty() && after.create_job.is_none() && after.requeue_after.is_none());
    assert!(after.loads.is_empty());
    // ...and loaded where one does, without another attempt.
    let mut obs = observe(&b, Some(&done), 62);
    obs.spread.waiting.insert(
        "arm-1".into(),
        crate::spread::Slot::Open(Default::default()),
    );
    let d = decide(obs, &settings());
    assert!(d.create_job.is_none());
    assert_eq!(d.status.attempts, 1);
    assert_eq!(
        d.loads.iter().map(|l| l.node.as_str()).collect::<Vec<_>>(),
        ["arm-1"]
    );
    assert_eq!(d.status.image_nodes[1].state, ImageNodeState::Loading);
    // A retry starts over: no node holds the new attempt's image yet.
    apply(&mut b, &d);
    b.status.as_mut().expect("status").phase = Some(Phase::Failed);
    b.metadata.annotations = Some([(keys::RETRY.to_owned(), "1".to_owned())].into());
    let d = decide(observe(&b, None, 70), &settings());
    assert!(d.create_job.is_some());
    assert!(d.status.image_nodes.is_empty());
}

/// Status writes of one successful build: the operator writes whenever the decided status
/// differs from the one it read.
fn status_writes(states: &[JobState]) -> (usize, NixBuild) {
    let mut b = build();
    let mut writes = 0;
    let mut step = |b: &mut NixBuild, v: Option<&JobView>, now| {
        let d = decide(observe(b, v, now), &settings());
        if b.status.as_ref() != Some(&d.status) {
            writes += 1;
        }
        apply(b, &d);
    };
    step(&mut b, None, 0);
    for (i, state) in states.iter().enumerate() {
        let message = (*state == JobState::Succeeded).then(|| success_report(TAG));
        let v = view(&b, state.clone(), message.clone(), message.is_some());
        // Each state is seen twice, as after the watch event of the write it caused.
        step(&mut b, Some(&v), 1 + i as i64);
        step(&mut b, Some(&v), 1 + i as i64);
    }
    (writes, b)
}

#[test]
fn a_scheduled_builder_is_recorded_with_its_start_not_apart() {
    // Scheduled (node known, container not running yet) -> Running -> Succeeded: the node
    // is written with Running, not on its own.
    let (writes, b) = status_writes(&[JobState::Pending, JobState::Running, JobState::Succeeded]);
    assert_eq!(writes, 3, "Scheduled, Running with its node, Succeeded");
    assert_eq!(
        b.status.and_then(|s| s.build_node).as_deref(),
        Some("arm-0")
    );

    // A builder that finishes before it was seen running: its node comes with the result.
    let mut b = build();
    let d = decide(observe(&b, None, 0), &settings());
    apply(&mut b, &d);
    let pending = view(&b, JobState::Pending, None, false);
    let d = decide(observe(&b, Some(&pending), 1), &settings());
    assert_eq!(
        Some(&d.status),
        b.status.as_ref(),
        "a scheduled Pod alone writes nothing"
    );
    assert!(d.events.is_empty());
    let (writes, b) = status_writes(&[JobState::Pending, JobState::Succeeded]);
    assert_eq!(writes, 2, "Scheduled, Succeeded with its node");
    let status = b.status.expect("status");
    assert_eq!(status.phase, Some(Phase::Succeeded));
    assert_eq!(status.build_node.as_deref(), Some("arm-0"));
}

#[test]
fn deterministic_failures_end_the_build_at_once() {
    for reason in [
        FailureReason::EvalFailed,
        FailureReason::BuildFailed,
        FailureReason::NotAnImage,
        FailureReason::TagConflict,
    ] {
        let mut b = build();
        let first = decide(observe(&b, None, 0), &settings());
        apply(&mut b, &first);
        let failed = view(
            &b,
            JobState::Failed {
                reason: Some("BackoffLimitExceeded".into()),
            },
            Some(failure_report(reason)),
            true,
        );
        let d = decide(observe(&b, Some(&failed), 10), &settings());
        assert_eq!(d.status.phase, Some(Phase::Failed), "{reason:?}");
        assert_eq!(d.status.failure_reason.as_deref(), Some(reason.as_str()));
        assert!(
            d.status
                .failure_message
                .as_deref()
                .is_some_and(|m| m.contains("it broke") && m.contains("error: line"))
        );
        assert_eq!(condition(&d, SUCCESS).status, "False");
        assert_eq!(condition(&d, COMPLETE).reason, "BuildFinished");
        let last = d.events.last().expect("an event");
        assert_eq!((last.type_, last.reason), (EventType::Warning, "Failed"));
        assert!(d.create_job.is_none());
    }
}

#[test]
fn lost_builders_are_retried_with_backoff_then_fail() {
    let mut b = build();
    let s = Settings {
        max_attempts: 3,
        backoff_base: Duration::from_secs(30),
        backoff_cap: Duration::from_secs(45),
        ..Settings::default()
    };
    let mut now = 0;
    let mut waits = vec![];
    for attempt in 1..=3 {
        let d = decide(observe(&b, None, now), &s);
        assert_eq!(d.create_job.as_ref().map(|p| p.attempt), Some(attempt));
        apply(&mut b, &d);
        let lost = view(
            &b,
            JobState::Failed {
                reason: Some("BackoffLimitExceeded".into()),
            },
            None,
            false,
        );
        let d = decide(observe(&b, Some(&lost), now + 1), &s);
        apply(&mut b, &d);
        if attempt < 3 {
            assert_eq!(d.status.phase, Some(Phase::Pending));
            assert_eq!(d.status.failure_reason.as_deref(), Some("BuilderLost"));
            let wait = d.requeue_after.expect("retry scheduled");
            waits.push(wait.as_secs());
            // Before the retry time nothing happens but a requeue.
            let early = decide(observe(&b, None, now + 2), &s);
            assert!(early.create_job.is_none() && early.requeue_after.is_some());
            now += 1 + wait.as_secs() as i64;
        } else {
            assert_eq!(d.status.phase, Some(Phase::Failed));
            assert_eq!(d.status.attempts, 3);
        }
    }
    assert_eq!(waits, [30, 45], "doubles, capped");
}

#[test]
fn deadline_crash_and_bad_reports_have_their_reasons() {
    let cases = [
        (
            JobState::Failed {
                reason: Some("DeadlineExceeded".into()),
            },
            None,
            false,
            "DeadlineExceeded",
        ),
        (
            JobState::Failed {
                reason: Some("BackoffLimitExceeded".into()),
            },
            Some("Killed".into()),
            true,
            "BuilderCrashed",
        ),
        (JobState::Succeeded, None, true, "InvalidReport"),
        (
            JobState::Succeeded,
            Some("x".repeat(5000)),
            true,
            "InvalidReport",
        ),
        (
            JobState::Succeeded,
            Some(success_report("other.example/app:v1")),
            true,
            "InvalidReport",
        ),
    ];
    for (state, message, terminated, reason) in cases {
        let mut b = build();
        let first = decide(observe(&b, None, 0), &settings());
        apply(&mut b, &first);
        let v = view(&b, state, message, terminated);
        let d = decide(observe(&b, Some(&v), 1), &settings());
        assert_eq!(d.status.failure_reason.as_deref(), Some(reason));
    }
}

/// A Job seen Complete before its Pod's termination (the two caches relist apart after an
/// apiserver restart) is no failure: the report is awaited, up to a minute after completion.
#[test]
fn a_report_not_seen_yet_is_awaited_for_a_while() {
    let mut b = build();
    let first = decide(observe(&b, None, 0), &settings());
    apply(&mut b, &first);
    let mut v = view(&b, JobState::Succeeded, None, false);
    v.completed = Some(at(10));
    let d = decide(observe(&b, Some(&v), 15), &settings());
    assert_eq!(d.status.failure_reason, None);
    assert_eq!(d.status.phase, first.status.phase);
    assert_eq!(d.requeue_after, Some(std::time::Duration::from_secs(2)));
    let d = decide(observe(&b, Some(&v), 75), &settings());
    assert_eq!(d.status.failure_reason.as_deref(), Some("InvalidReport"));
}

#[test]
fn crash_message_carries_the_log_end() {
    let mut b = build();
    let first = decide(observe(&b, None, 0), &settings());
    apply(&mut b, &first);
    let v = view(
        &b,
        JobState::Failed { reason: None },
        Some("out of memory\n".into()),
        true,
    );
    let d = decide(observe(&b, Some(&v), 1), &settings());
    assert!(
        d.status
            .failure_message
            .as_deref()
            .is_some_and(|m| m.ends_with("out of memory"))
    );
}

#[test]
fn policy_denial_fails_without_a_job() {
    let b = build();
    let mut obs = observe(&b, None, 0);
    obs.policy = Err(crate::policy::Denial::Namespace {
        namespace: "apps".into(),
        allowed: vec!["builds".into()],
    });
    let d = decide(obs, &settings());
    assert!(d.create_job.is_none());
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(d.status.failure_reason.as_deref(), Some("PolicyDenied"));
    assert_eq!(d.status.attempts, 0);
}

#[test]
fn an_unusable_fetch_secret_fails_without_a_job() {
    let b = build();
    let mut obs = observe(&b, None, 0);
    obs.fetch_secret = Err(crate::fetch::Unusable::Missing {
        namespace: "apps".into(),
        name: "creds".into(),
        url: "github:o/r".into(),
    });
    let d = decide(obs, &settings());
    assert!(d.create_job.is_none());
    assert_eq!(d.status.phase, Some(Phase::Failed));
    assert_eq!(
        d.status.failure_reason.as_deref(),
        Some("FetchSecretUnusable")
    );
    let message = d.status.failure_message.expect("a message");
    assert!(message.contains("Secret apps/creds") && message.contains("github:o/r"));
}

#[test]
fn a_failed_fetch_names_the_fetch_secret_it_used() {
    let mut b = build();
    b.spec.fetch_secret_ref = Some(crate::crd::SecretRef {
        name: "creds".into(),
    });
    let first = decide(observe(&b, None, 0), &settings());
    apply(&mut b, &first);
    for (reason, named) in [
        (FailureReason::EvalFailed, true),
        (FailureReason::BuildFailed, false),
    ] {
        let failed = view(
            &b,
            JobState::Failed { reason: None },
            Some(failure_report(reason)),
            true,
        );
        let d = decide(observe(&b, Some(&failed), 10), &settings());
        let message = d.status.failure_message.expect("a message");
        assert_eq!(
            message.contains("credentials of Secret apps/creds"),
            named,
            "{message}"
        );
    }
}

#[test]
fn no_node_and_queue_wait_and_say_so_once() {
    let mut b = build();
    let mut obs = observe(&b, None, 0);
    obs.placement = place("aarch64-linux", &[], &[], None);
    let d = decide(obs, &settings());
    assert_eq!(d.status.phase, Some(Phase::Pending));
    assert_eq!(condition(&d, READY).reason, "NoEligibleNode");
    assert!(!is_queued(&d.status));
    assert_eq!(d.events.len(), 1);
    assert!(
        d.requeue_after.is_none(),
        "Node changes trigger the next look, not a timer"
    );
    apply(&mut b, &d);
    let mut obs = observe(&b, None, 5);
    obs.placement = place("aarch64-linux", &[], &[], None);
    assert!(decide(obs, &settings()).events.is_empty());

    let mut obs = observe(&b, None, 6);
    obs.capacity = Err(crate::capacity::Full::Cluster { running: 2 });
    let d = decide(obs, &settings());
    assert_eq!(condition(&d, READY).reason, "Queued");
    assert!(is_queued(&d.status));
    assert!(d.create_job.is_none());
    assert!(d.requeue_after.is_none(), "a Job's end wakes it");
    let mut obs = observe(&b, None, 6);
    obs.capacity = Err(crate::capacity::Full::Turn {
        namespace: "other".into(),
    });
    let turn = decide(obs, &settings());
    assert!(is_queued(&turn.status));
    assert!(
        turn.requeue_after.is_some(),
        "another build's turn is looked at again: it may go without a Job event"
    );
    apply(&mut b, &d);
    // A node appears and a slot frees: the build starts.
    assert_eq!(
        decide(observe(&b, None, 7), &settings())
            .create_job
            .map(|p| p.attempt),
        Some(1)
    );
}

#[test]
fn an_operator_fault_holds_the_build_says_so_once_and_lets_go() {
    let fault = crate::fault::Fault::BuildNamespaceMissing {
        namespace: "enbi-builds".into(),
    };
    let mut b = build();
    let mut obs = observe(&b, None, 0);
    obs.fault = Some(&fault);
    let d = decide(obs, &settings());
    assert!(d.create_job.is_none());
    assert_eq!(d.status.phase, Some(Phase::Pending));
    assert_eq!(d.status.attempts, 0);
    let ready = condition(&d, READY);
    assert_eq!(ready.reason, "BuildNamespaceMissing");
    assert_eq!(ready.message, fault.message());
    assert_eq!(d.events.len(), 1);
    assert_eq!(d.events[0].type_, EventType::Warning);
    apply(&mut b, &d);
    let mut obs = observe(&b, None, 5);
    obs.fault = Some(&fault);
    let again = decide(obs, &settings());
    assert!(again.events.is_empty(), "one Event per fault");
    assert_eq!(again.status, b.status.clone().expect("status"));

    let started = decide(observe(&b, None, 6), &settings());
    assert_eq!(started.create_job.as_ref().map(|p| p.attempt), Some(1));
    assert_eq!(condition(&started, READY).reason, "Scheduled");
    apply(&mut b, &started);
    // The Job of attempt 1 could not be created: the same attempt waits, then goes on.
    let mut obs = observe(&b, None, 7);
    obs.fault = Some(&fault);
    let held = decide(obs, &settings());
    assert!(held.create_job.is_none());
    assert_eq!(
        (held.status.phase, held.status.attempts),
        (Some(Phase::Building), 1)
    );
    apply(&mut b, &held);
    assert_eq!(
        decide(observe(&b, None, 8), &settings())
            .create_job
            .map(|p| p.attempt),
        Some(1)
    );
}

#[test]
fn a_missing_job_of_the_current_attempt_is_applied_again_not_advanced() {
    let mut b = build();
    let first = decide(observe(&b, None, 0), &settings());
    apply(&mut b, &first);
    let d = decide(observe(&b, None, 1), &settings());
    assert_eq!(d.create_job.map(|p| p.attempt), Some(1));
    assert_eq!(d.status.attempts, 1);
    assert!(d.events.is_empty());
}

#[test]
fn retry_annotation_starts_a_fresh_round_once() {
    let mut b = build();
    let first = decide(observe(&b, None, 0), &settings());
    apply(&mut b, &first);
    let failed = view(
        &b,
        JobState::Failed { reason: None },
        Some(failure_report(FailureReason::BuildFailed)),
        true,
    );
    let d = decide(observe(&b, Some(&failed), 1), &settings());
    apply(&mut b, &d);
    assert_eq!(b.phase(), Phase::Failed);
    // Without the annotation a Failed build stays Failed.
    assert!(
        decide(observe(&b, None, 2), &settings())
            .create_job
            .is_none()
    );

    b.metadata.annotations = Some([(keys::RETRY.to_owned(), "1".to_owned())].into());
    let d = decide(observe(&b, None, 3), &settings());
    assert_eq!(d.create_job.as_ref().map(|p| p.attempt), Some(2));
    assert_eq!(d.status.phase, Some(Phase::Building));
    assert_eq!(d.status.failure_reason, None);
    assert_eq!(d.events.first().map(|e| e.reason), Some("Retrying"));
    apply(&mut b, &d);
    let failed = view(
        &b,
        JobState::Failed { reason: None },
        Some(failure_report(FailureReason::BuildFailed)),
        true,
    );
    let d = decide(observe(&b, Some(&failed), 4), &settings());
    apply(&mut b, &d);
    // The same annotation value is not acted on twice.
    assert!(
        decide(observe(&b, None, 5), &settings())
            .create_job
            .is_none()
    );
}

#[test]
fn backoff_doubles_and_caps() {
    let s = Settings::default();
    let secs: Vec<u64> = (1..=7).map(|n| s.backoff(n).as_secs()).collect();
    assert_eq!(secs, [30, 60, 120, 240, 480, 600, 600]);
    assert_eq!(s.backoff(u32::MAX), s.backoff_cap);
}

/// What the world shows the machine for the current attempt's Job at one step.
#[derive(Debug, Clone)]
enum World {
    Missing,
    Pending,
    Running,
    Succeeded,
    FailedRetryable,
    FailedFinal,
    Deadline,
}

fn world() -> impl Strategy<Value = World> {
    prop_oneof![
        Just(World::Missing),
        Just(World::Pending),
        Just(World::Running),
        Just(World::Succeeded),
        Just(World::FailedRetryable),
        Just(World::FailedFinal),
        Just(World::Deadline),
    ]
}

proptest! {
    /// However the Jobs behave and however often the operator looks (or loses its status
    /// writes), the machine never asks for a Job of an attempt whose Job exists, never skips or
    /// reuses an attempt number for a new Job, never exceeds max_attempts, and never leaves a
    /// finished build.
    #[test]
    fn one_job_per_attempt(steps in prop::collection::vec((world(), 0i64..120, any::<bool>()), 1..60)) {
        let s = Settings::default();
        let mut b = build();
        let mut now = 0;
        let mut created: Vec<u32> = vec![];
        for (w, dt, status_write_lost) in steps {
            now += dt;
            let attempts = b.status.as_ref().map_or(0, |st| st.attempts);
            let exists = attempts > 0 && created.contains(&attempts) && !matches!(w, World::Missing);
            let v = exists.then(|| match w {
                World::Pending => view(&b, JobState::Pending, None, false),
                World::Running => view(&b, JobState::Running, None, false),
                World::Succeeded => view(&b, JobState::Succeeded, Some(success_report(TAG)), true),
                World::FailedRetryable => view(&b, JobState::Failed { reason: None }, Some(failure_report(FailureReason::ImportFailed)), true),
                World::FailedFinal => view(&b, JobState::Failed { reason: None }, Some(failure_report(FailureReason::BuildFailed)), true),
                World::Deadline => view(&b, JobState::Failed { reason: Some("DeadlineExceeded".into()) }, None, false),
                World::Missing => unreachable!(),
            });
            let was_finished = matches!(b.phase(), Phase::Succeeded | Phase::Failed);
            let d = decide(observe(&b, v.as_ref(), now), &s);
            if was_finished {
                prop_assert!(d.create_job.is_none());
                prop_assert_eq!(Some(&d.status), b.status.as_ref());
            }
            if let Some(plan) = &d.create_job {
                prop_assert!(plan.attempt == attempts || plan.attempt == attempts + 1);
                if plan.attempt == attempts {
                    prop_assert!(v.is_none(), "asked again for attempt {}'s Job while it exists", attempts);
                }
                prop_assert!(plan.attempt <= s.max_attempts);
                prop_assert_eq!(plan.attempt, d.status.attempts);
                if !created.contains(&plan.attempt) {
                    prop_assert_eq!(plan.attempt as usize, created.len() + 1, "attempts are consecutive");
                    created.push(plan.attempt);
                }
            }
            if !status_write_lost {
                apply(&mut b, &d);
            }
        }
    }
}

#[test]
fn a_report_with_the_normalised_tag_succeeds() {
    let mut b = build();
    b.spec.image_tag = "app:v1".into();
    let first = decide(observe(&b, None, 0), &settings());
    apply(&mut b, &first);
    let tag = crate::reference::normalise(&b.spec.image_tag);
    assert_eq!(tag, "docker.io/library/app:v1");
    let v = view(&b, JobState::Succeeded, Some(success_report(&tag)), true);
    let d = decide(observe(&b, Some(&v), 1), &settings());
    assert_eq!(d.status.phase, Some(Phase::Succeeded), "{:?}", d.status);
}

#[test]
fn with_a_mirror_one_tag_for_two_systems_is_a_warning_naming_the_fix() {
    let b = build();
    let mut mirrored = settings();
    mirrored.spread.mirror = true;
    let mut obs = observe(&b, None, 0);
    obs.other_systems = vec!["aarch64-linux".into()];
    let d = decide(obs, &mirrored);
    let warning = d
        .events
        .iter()
        .find(|e| e.reason == "TagSharedAcrossSystems")
        .expect("a warning");
    assert_eq!(warning.type_, EventType::Warning);
    assert!(warning.note.contains("aarch64-linux"), "{}", warning.note);
    assert!(
        warning.note.contains("a tag per system"),
        "{}",
        warning.note
    );

    // Without a mirror each node only gets the image enbi loads there: no warning.
    let mut obs = observe(&b, None, 0);
    obs.other_systems = vec!["aarch64-linux".into()];
    let d = decide(obs, &settings());
    assert!(
        d.events
            .iter()
            .all(|e| e.reason != "TagSharedAcrossSystems")
    );
}
