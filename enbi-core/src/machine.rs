//! The build state machine: `(NixBuild, Job of the current attempt, checks, now) -> Decision`;
//! once Succeeded, `spread` takes the image to the nodes where Pods wait for it.
//!
//! A [`Decision`] is data: the status to write, the Job to create (if any), the Events to emit
//! and when to look again. The operator executes it and feeds back what it observes, so every
//! path (retries, lost builders, restarts) is tested here without a cluster.
//!
//! Idempotence comes from names: attempt `n` of a build always has the Job name
//! `job::name(build, n)`, and the attempt counter only advances in the status written together
//! with the decision to create that Job. If the status write is lost, the next reconcile asks for
//! the same Job again, which server-side apply leaves as it is.
//!
//! Phases: `Pending` (waiting for a node, a slot or a retry) -> `Building` -> `Succeeded`, or
//! `Failed` with a [`FailureReason`]. Retryable failures go back to `Pending` with an
//! exponential backoff until `max_attempts`; the others end the build at once.

use std::time::Duration;

use k8s_openapi::api::core::v1::Affinity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use crate::conditions::{self, COMPLETE, READY, SUCCESS, Status, Update};
use crate::crd::{NixBuild, NixBuildStatus, Phase};
use crate::event::{Event, EventType};
use crate::fault::Fault;
use crate::job::{self, JobState, JobView};
use crate::keys::{self, RETRY};
use crate::placement::{NoEligibleNode, Placement};
use crate::reason::{FailureReason, WaitReason};
use crate::report::BuildReport;
use crate::spread;
use crate::{backoff, capacity, fetch, policy};

/// How often a build that waits for another build's turn at a slot is looked at again.
const TURN_RECHECK: Duration = Duration::from_secs(5);
/// How often a Succeeded Job whose report is not seen yet is looked at again.
const REPORT_POLL: Duration = Duration::from_secs(2);
/// How long after a Job's completion its report may still be missing from the Pods' cache
/// before the build fails for want of it (`InvalidReport`).
const REPORT_GRACE: SignedDuration = SignedDuration::from_secs(60);

/// Retry behaviour, and how images spread to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubles for each further one.
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub spread: spread::Settings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            backoff_base: Duration::from_secs(30),
            backoff_cap: Duration::from_secs(600),
            spread: spread::Settings::default(),
        }
    }
}

impl Settings {
    /// Wait after `failed_attempts` failures: base, 2×base, 4×base, … up to the cap.
    pub fn backoff(&self, failed_attempts: u32) -> Duration {
        backoff::doubling(
            self.backoff_base,
            failed_attempts.saturating_sub(1),
            self.backoff_cap,
        )
    }
}

/// What the operator observed, and the checks it evaluated with the pure policy, placement and
/// capacity functions.
#[derive(Debug)]
pub struct Observation<'a> {
    pub build: &'a NixBuild,
    /// The Job of attempt `status.attempts`, read back with [`job::observe`], if it exists.
    pub job: Option<&'a JobView>,
    /// `Err(rule)` when policy forbids the build.
    pub policy: Result<(), policy::Denial>,
    /// `Err(why)` when the build names a fetch Secret it cannot use (read before an attempt).
    pub fetch_secret: Result<(), fetch::Unusable>,
    pub placement: Result<Placement, NoEligibleNode>,
    /// `Err(why)` when a concurrency limit is reached.
    pub capacity: Result<(), capacity::Full>,
    /// Once Succeeded: the nodes where Pods wait for the image, and their load Jobs.
    pub spread: spread::Observation<'a>,
    /// A fault of the operator's installation that keeps any builder Job from being created.
    pub fault: Option<&'a Fault>,
    /// The systems of other NixBuilds that name the same image tag for another system.
    pub other_systems: Vec<String>,
    pub now: Timestamp,
}

/// The systems of the NixBuilds among `others` (any namespace) that name `build`'s image tag
/// for another system, sorted, once each.
pub fn other_systems<'b>(
    build: &NixBuild,
    others: impl IntoIterator<Item = &'b NixBuild>,
) -> Vec<String> {
    let mut systems: Vec<String> = others
        .into_iter()
        .filter(|o| o.spec.system != build.spec.system)
        .filter(|o| crate::reference::same_image(&o.spec.image_tag, &build.spec.image_tag))
        .map(|o| o.spec.system.clone())
        .collect();
    systems.sort();
    systems.dedup();
    systems
}

/// A Job to create (or re-apply) for one attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct JobPlan {
    pub attempt: u32,
    pub affinity: Affinity,
}

/// What to do now.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub status: NixBuildStatus,
    pub create_job: Option<JobPlan>,
    /// Load Jobs to create (or re-apply): the image onto nodes where Pods wait for it.
    pub loads: Vec<spread::LoadPlan>,
    pub events: Vec<Event>,
    /// Look again after this long even if nothing changes (a scheduled retry).
    pub requeue_after: Option<Duration>,
}

/// Whether the build waits for a free build slot (`enbi_builds_queued`).
pub fn is_queued(status: &NixBuildStatus) -> bool {
    status.phase == Some(Phase::Pending)
        && conditions::get(&status.conditions, READY)
            .is_some_and(|c| c.reason == WaitReason::Queued.as_str())
}

/// The reason of the Ready condition: what the build waits for or did last.
pub fn ready_reason(status: &NixBuildStatus) -> Option<&str> {
    conditions::get(&status.conditions, READY).map(|c| c.reason.as_str())
}

/// Decides the next step for a build.
pub fn decide(obs: Observation<'_>, settings: &Settings) -> Decision {
    let status = obs.build.status.clone().unwrap_or_default();
    let mut step = Step {
        obs: &obs,
        settings,
        status,
        create_job: None,
        loads: vec![],
        events: vec![],
        requeue_after: None,
    };
    match step.status.phase {
        Some(Phase::Failed) => {
            if let Some(requested) = step.retry_requested() {
                step.retry(requested);
            }
        }
        Some(Phase::Succeeded) => {
            let out = spread::decide(&mut step.status, &obs.spread, &settings.spread, obs.now);
            step.loads = out.loads;
            step.events.extend(out.events);
            step.requeue_after = out.requeue_after;
        }
        Some(Phase::Building) => step.observe_job(),
        None | Some(Phase::Pending) => match step.status.next_attempt_time.as_ref().map(|t| t.0) {
            Some(at) if at > obs.now => step.requeue_after = Some(until(obs.now, at)),
            _ => step.start_attempt(),
        },
    }
    step.status.observed_generation = obs.build.metadata.generation;
    Decision {
        status: step.status,
        create_job: step.create_job,
        loads: step.loads,
        events: step.events,
        requeue_after: step.requeue_after,
    }
}

fn until(now: Timestamp, at: Timestamp) -> Duration {
    Duration::try_from(at.duration_since(now)).unwrap_or_default()
}

/// One decision being assembled.
struct Step<'a> {
    obs: &'a Observation<'a>,
    settings: &'a Settings,
    status: NixBuildStatus,
    create_job: Option<JobPlan>,
    loads: Vec<spread::LoadPlan>,
    events: Vec<Event>,
    requeue_after: Option<Duration>,
}

impl Step<'_> {
    fn now(&self) -> Time {
        Time(self.obs.now)
    }

    fn event(&mut self, type_: EventType, reason: &'static str, note: String) {
        self.events.push(Event {
            type_,
            reason,
            note,
        });
    }

    /// Sets Ready, Success and Complete for the build's new state.
    fn conditions(
        &mut self,
        ready: Status,
        success: Status,
        complete: Status,
        reason: &str,
        message: &str,
    ) {
        let generation = self.obs.build.metadata.generation;
        let now = self.now();
        let (success_reason, complete_reason, complete_message) = match (success, complete) {
            (Status::True, _) => ("ResultSuccess", "BuildFinished", "Image loaded".to_owned()),
            (_, Status::True) => (reason, "BuildFinished", format!("Build failed: {reason}")),
            _ => (reason, reason, message.to_owned()),
        };
        let success_message = if success == Status::True {
            "Build completed successfully and the result was read from the builder's report"
        } else {
            message
        };
        for update in [
            Update {
                type_: READY,
                status: ready,
                reason: reason.into(),
                message: message.into(),
            },
            Update {
                type_: SUCCESS,
                status: success,
                reason: success_reason.into(),
                message: success_message.into(),
            },
            Update {
                type_: COMPLETE,
                status: complete,
                reason: complete_reason.into(),
                message: complete_message,
            },
        ] {
            conditions::set(&mut self.status.conditions, update, generation, &now);
        }
    }

    fn ready_reason(&self) -> Option<&str> {
        conditions::get(&self.status.conditions, READY).map(|c| c.reason.as_str())
    }

    /// The `enbi.hrzn.ee/retry` annotation's value, if it is one not yet acted on.
    fn retry_requested(&self) -> Option<String> {
        let annotations = self.obs.build.metadata.annotations.as_ref();
        let requested = annotations.and_then(|a| a.get(keys::RETRY))?;
        (Some(requested) != self.status.observed_retry.as_ref()).then(|| requested.clone())
    }

    /// A user asked to build a Failed NixBuild again: start over with a fresh attempt budget.
    fn retry(&mut self, requested: String) {
        self.event(
            EventType::Normal,
            "Retrying",
            format!("Retry requested ({RETRY}={requested})"),
        );
        self.status.observed_retry = Some(requested);
        self.status.retry_base_attempts = self.status.attempts;
        self.status.failure_reason = None;
        self.status.failure_message = None;
        self.status.completion_time = None;
        self.status.next_attempt_time = None;
        self.start_attempt();
    }

    fn start_attempt(&mut self) {
        if let Err(rule) = self.obs.policy.clone() {
            return self.finish_failed(FailureReason::PolicyDenied, rule.to_string());
        }
        if let Err(why) = self.obs.fetch_secret.clone() {
            return self.finish_failed(FailureReason::FetchSecretUnusable, why.to_string());
        }
        if let Some(fault) = self.obs.fault {
            self.status.phase = Some(Phase::Pending);
            return self.held(fault);
        }
        let placement = match &self.obs.placement {
            Ok(p) => p.clone(),
            Err(e) => return self.wait(WaitReason::NoEligibleNode, e.to_string()),
        };
        if let Err(why) = self.obs.capacity.clone() {
            // A turn given to another build is looked at again: that build may go (deleted, or
            // refused) without any Job event that would wake this one.
            if matches!(why, capacity::Full::Turn { .. }) {
                self.requeue_after = Some(TURN_RECHECK);
            }
            return self.wait(WaitReason::Queued, why.to_string());
        }
        let attempt = self.status.attempts + 1;
        let job_name = job::name(self.obs.build, attempt);
        self.status.phase = Some(Phase::Building);
        self.status.attempts = attempt;
        self.status.build_job_name = Some(job_name.clone());
        self.status.build_node = None;
        self.status.image_nodes.clear();
        self.status.next_attempt_time = None;
        self.status.start_time.get_or_insert(Time(self.obs.now));
        let message = format!("Attempt {attempt}: builder Job {job_name} created");
        self.conditions(
            Status::False,
            Status::Unknown,
            Status::False,
            "Scheduled",
            &message,
        );
        self.event(
            EventType::Normal,
            "Scheduled",
            format!(
                "{message}; eligible nodes: {}",
                placement.eligible.join(", ")
            ),
        );
        if self.settings.spread.mirror && !self.obs.other_systems.is_empty() {
            self.event(
                EventType::Warning,
                "TagSharedAcrossSystems",
                format!(
                    "Other NixBuilds build {} for {}: with a mirror, a node can be served the \
                     image of another architecture under this one tag. Use a tag per system \
                     (e.g. ending in -{}), or keep the Pods of this tag on one architecture \
                     (docs/nodes.md)",
                    self.obs.build.spec.image_tag,
                    self.obs.other_systems.join(", "),
                    self.obs.build.spec.system,
                ),
            );
        }
        self.create_job = Some(JobPlan {
            attempt,
            affinity: placement.affinity,
        });
    }

    fn wait(&mut self, reason: WaitReason, message: String) {
        let changed = self.ready_reason() != Some(reason.as_str());
        self.status.phase = Some(Phase::Pending);
        self.conditions(
            Status::False,
            Status::Unknown,
            Status::False,
            reason.as_str(),
            &message,
        );
        if changed {
            let type_ = if reason == WaitReason::NoEligibleNode {
                EventType::Warning
            } else {
                EventType::Normal
            };
            self.event(type_, reason.as_str(), message);
        }
    }

    /// The build waits for an administrator: no Job, the fault as Ready reason, an Event when
    /// it is new. The phase and attempt stay, so the same attempt goes on once the fault is
    /// fixed (the operator retries).
    fn held(&mut self, fault: &Fault) {
        let changed = self.ready_reason() != Some(fault.reason());
        let message = fault.message();
        self.conditions(
            Status::False,
            Status::Unknown,
            Status::False,
            fault.reason(),
            &message,
        );
        if changed {
            self.event(EventType::Warning, fault.reason(), message);
        }
    }

    fn observe_job(&mut self) {
        let Some(view) = self.obs.job else {
            // The Job of this attempt is not there: not yet visible, or deleted before its
            // result was read. Applying the same Job again is safe either way.
            let attempt = self.status.attempts;
            if let Some(fault) = self.obs.fault {
                return self.held(fault);
            }
            match &self.obs.placement {
                Ok(p) => {
                    self.create_job = Some(JobPlan {
                        attempt,
                        affinity: p.affinity.clone(),
                    })
                }
                Err(e) => self.wait(WaitReason::NoEligibleNode, e.to_string()),
            }
            return;
        };
        // The node is recorded (with its `Building` Event) once the builder runs or has
        // finished, not as soon as its Pod is scheduled: one status write then says both where
        // and that it runs, instead of one write for each a moment apart.
        let started = view.state != JobState::Pending;
        if started && view.node.is_some() && self.status.build_node != view.node {
            self.status.build_node = view.node.clone();
            let node = view.node.clone().unwrap_or_default();
            self.event(
                EventType::Normal,
                "Building",
                format!("Builder Job {} running on node {node}", view.name),
            );
        }
        match &view.state {
            JobState::Pending | JobState::Running => {
                if view.state == JobState::Running && self.ready_reason() != Some("Building") {
                    let message = format!("Builder Job {} is running", view.name);
                    self.conditions(
                        Status::False,
                        Status::Unknown,
                        Status::False,
                        "Building",
                        &message,
                    );
                }
            }
            JobState::Succeeded => self.read_success(view),
            JobState::Failed { reason } => self.read_failure(view, reason.as_deref()),
        }
    }

    fn read_success(&mut self, view: &JobView) {
        let Some(text) = view.termination_message.as_deref() else {
            // The Jobs' cache can be ahead of the Pods' (both lists are redone after an
            // apiserver restart): a report not seen yet is awaited, for a while.
            if !view.terminated && !self.report_overdue(view) {
                self.requeue_after = Some(REPORT_POLL);
                return;
            }
            return self.fail(
                FailureReason::InvalidReport,
                "the builder exited 0 without a report".into(),
            );
        };
        match BuildReport::parse(text) {
            Ok(BuildReport::Succeeded(image))
                // The builder stores and reports the normalised tag (what the kubelet asks for).
                if crate::reference::same_image(&image.image_tag, &self.obs.build.spec.image_tag) =>
            {
                self.status.phase = Some(Phase::Succeeded);
                self.status.image_digest = Some(image.digest.clone());
                self.status.image_size = i64::try_from(image.size).ok();
                self.status.provenance = Some(image.provenance.clone());
                self.status.failure_reason = None;
                self.status.failure_message = None;
                self.status.completion_time = Some(self.now());
                self.status.image_nodes = self
                    .status
                    .build_node
                    .iter()
                    .map(|node| spread::loaded(node, 0, self.now()))
                    .collect();
                self.conditions(
                    Status::True,
                    Status::True,
                    Status::True,
                    "ResultSuccess",
                    "Image loaded",
                );
                let node = self.status.build_node.clone().unwrap_or_default();
                self.event(
                    EventType::Normal,
                    "Succeeded",
                    format!(
                        "Image {} ({}, {} bytes) loaded on node {node}",
                        image.image_tag, image.digest, image.size
                    ),
                );
            }
            Ok(BuildReport::Succeeded(image)) => self.fail(
                FailureReason::InvalidReport,
                format!(
                    "the builder reported image {}, not {}",
                    image.image_tag, self.obs.build.spec.image_tag
                ),
            ),
            Ok(BuildReport::Failed(f)) => self.fail(f.reason, with_tail(&f.message, &f.log_tail)),
            Err(e) => self.fail(FailureReason::InvalidReport, e.to_string()),
        }
    }

    /// Whether a completed Job's report should have been seen by now.
    fn report_overdue(&self, view: &JobView) -> bool {
        view.completed
            .is_none_or(|at| self.obs.now.duration_since(at) > REPORT_GRACE)
    }

    fn read_failure(&mut self, view: &JobView, job_reason: Option<&str>) {
        let report = view.termination_message.as_deref().map(BuildReport::parse);
        match (report, job_reason) {
            (Some(Ok(BuildReport::Failed(f))), _) => {
                let message = format!("{}{}", f.message, self.fetched_with(f.reason));
                self.fail(f.reason, with_tail(&message, &f.log_tail))
            }
            (_, Some("DeadlineExceeded")) => self.fail(
                FailureReason::DeadlineExceeded,
                format!("builder Job {} ran past its deadline", view.name),
            ),
            _ if view.terminated => self.fail(
                FailureReason::BuilderCrashed,
                with_tail("the builder ended without a report", view.termination_message.as_deref().unwrap_or("")),
            ),
            _ => self.fail(
                FailureReason::BuilderLost,
                format!("builder Job {} failed before its container finished (node lost or Pod deleted)", view.name),
            ),
        }
    }

    /// For a failure to fetch or evaluate: which fetch Secret the builder had, if any, since
    /// wrong credentials fail that way.
    fn fetched_with(&self, reason: FailureReason) -> String {
        let build = self.obs.build;
        match &build.spec.fetch_secret_ref {
            Some(secret) if reason == FailureReason::EvalFailed => format!(
                " (fetched with the credentials of Secret {}/{}, spec.fetchSecretRef)",
                kube::ResourceExt::namespace(build).unwrap_or_default(),
                secret.name
            ),
            _ => String::new(),
        }
    }

    /// A failed attempt: retry later if that can help and attempts remain, else fail the build.
    fn fail(&mut self, reason: FailureReason, message: String) {
        let attempts = self.status.attempts;
        if !reason.retryable()
            || attempts.saturating_sub(self.status.retry_base_attempts)
                >= self.settings.max_attempts
        {
            return self.finish_failed(reason, message);
        }
        let wait = self.settings.backoff(attempts);
        let at = self
            .obs
            .now
            .saturating_add(SignedDuration::try_from(wait).unwrap_or(SignedDuration::MAX));
        self.status.phase = Some(Phase::Pending);
        self.status.failure_reason = Some(reason.as_str().into());
        self.status.failure_message = Some(message.clone());
        self.status.next_attempt_time = Some(Time(at.unwrap_or(self.obs.now)));
        let note = format!(
            "Attempt {attempts} failed ({}): {message}; retrying in {}s",
            reason.as_str(),
            wait.as_secs()
        );
        self.conditions(
            Status::False,
            Status::Unknown,
            Status::False,
            WaitReason::RetryScheduled.as_str(),
            &note,
        );
        self.event(
            EventType::Warning,
            WaitReason::RetryScheduled.as_str(),
            note,
        );
        self.requeue_after = Some(wait);
    }

    fn finish_failed(&mut self, reason: FailureReason, message: String) {
        self.status.phase = Some(Phase::Failed);
        self.status.failure_reason = Some(reason.as_str().into());
        self.status.failure_message = Some(message.clone());
        self.status.next_attempt_time = None;
        self.status.completion_time = Some(self.now());
        self.conditions(
            Status::False,
            Status::False,
            Status::True,
            reason.as_str(),
            &message,
        );
        self.event(
            EventType::Warning,
            "Failed",
            format!("{}: {message}", reason.as_str()),
        );
    }
}

/// A failure message with the builder log's last lines, if any.
fn with_tail(message: &str, tail: &str) -> String {
    let tail = tail.trim_end();
    if tail.is_empty() {
        message.to_owned()
    } else {
        format!("{message}\n--- last builder log lines ---\n{tail}")
    }
}

#[cfg(test)]
mod tests;
