//! The NixBuild controller: read -> checks (policy, placement, capacity) -> `machine::decide` ->
//! apply the Job -> write status -> publish Events. All decisions are enbi-core's; this module
//! only gathers what they need and carries them out.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use enbi_core::crd::{ImageNodeState, NixBuild, NixBuildStatus, Phase};
use enbi_core::event::EventType;
use enbi_core::fault::{self, Fault};
use enbi_core::job::{self, BuilderSettings, JobView, Purpose};
use enbi_core::keys;
use enbi_core::machine::{self, Decision, Observation};
use enbi_core::placement::{self, NodeView};
use enbi_core::trace::TraceContext;
use enbi_core::{backoff, capacity, census, conditions, fetch, policy, release, spread};
use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType as KubeEventType, Recorder, Reporter};
use kube::runtime::finalizer::{Event as Finalizer, finalizer};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, CustomResourceExt, Resource, ResourceExt};
use opentelemetry::KeyValue;
use serde_json::json;
use tracing::field::Empty;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::error::Error;
use crate::http::Health;
use crate::metrics::{Finished, Metrics, Outcome};
use crate::{telemetry, waiting};

#[cfg(test)]
mod tests;

/// The resource of the Events enbi publishes, as API errors name it.
const EVENTS: &str = "events.events.k8s.io";

/// What the reconciler needs: the client, settings and the caches the operator keeps.
pub struct Context {
    pub client: Client,
    pub builder: BuilderSettings,
    pub machine: machine::Settings,
    pub policy: policy::Policy,
    pub capacity: capacity::Limits,
    pub node_repel: Vec<String>,
    /// How long a deleted build's image release may take; `None`: images are kept on delete.
    pub release_timeout: Option<Duration>,
    /// Every NixBuild (the controller's own cache).
    pub builds: Store<NixBuild>,
    pub jobs: Store<Job>,
    pub builder_pods: Store<Pod>,
    pub nodes: Store<Node>,
    /// The Pod watcher and its caches: Pods waiting for a build are looked at again when it
    /// finishes or goes, and tell where its image is needed.
    pub pods: Arc<crate::pods::PodWatcher>,
    pub pod_stores: Vec<Store<Pod>>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    /// `/readyz`, which lists the faults that hold builds up.
    pub health: Arc<Health>,
    /// A fault of the settings (e.g. no builder image), which holds every build up.
    pub settings_fault: Option<Fault>,
    /// Whether spans are exported: builds then get a trace context.
    pub tracing: bool,
    /// Consecutive failures per NixBuild, for error_policy's backoff.
    pub failures: Mutex<HashMap<ObjectRef<NixBuild>, u32>>,
}

impl Context {
    pub fn reporter(instance: Option<String>) -> Reporter {
        Reporter {
            controller: keys::MANAGER.into(),
            instance,
        }
    }

    fn builder_pod(&self, job_name: &str) -> Option<Arc<Pod>> {
        self.builder_pods
            .state()
            .into_iter()
            .filter(|p| p.labels().get("job-name").is_some_and(|n| n == job_name))
            .max_by_key(|p| p.creation_timestamp())
    }

    fn job_view(&self, build: &NixBuild) -> Option<JobView> {
        let attempts = build.status.as_ref().map_or(0, |s| s.attempts);
        if attempts == 0 {
            return None;
        }
        self.observe_job(&job::name(build, attempts))
    }

    fn observe_job(&self, name: &str) -> Option<JobView> {
        let job = self
            .jobs
            .get(&ObjectRef::new(name).within(&self.builder.namespace))?;
        Some(job::observe(&job, self.builder_pod(name).as_deref()))
    }

    /// The current load Job of every node the build's image is being loaded on.
    fn load_views(&self, build: &NixBuild) -> BTreeMap<String, JobView> {
        let entries = build.status.iter().flat_map(|s| &s.image_nodes);
        entries
            .filter(|e| e.state == ImageNodeState::Loading)
            .filter_map(|e| {
                let name = job::load_name(build, &e.node, e.loads);
                Some((e.node.clone(), self.observe_job(&name)?))
            })
            .collect()
    }

    /// Whether a load may start on each node where Pods wait for the build's image.
    fn load_slots(&self, build: &NixBuild, nodes: &[NodeView]) -> BTreeMap<String, spread::Slot> {
        let waiting = waiting::waiting_nodes(
            &self.pod_stores,
            &self.nodes,
            &build.namespace().unwrap_or_default(),
            &build.name_any(),
        );
        let running = nodes_of(&self.running_builds());
        waiting
            .into_iter()
            .map(|node| {
                let slot = spread::slot(
                    &build.spec.system,
                    nodes,
                    &self.node_repel,
                    &node,
                    &running,
                    self.capacity,
                );
                (node, slot)
            })
            .collect()
    }

    /// Namespace and node (`None`: not scheduled yet) of each build running now.
    fn running_builds(&self) -> Vec<(String, Option<String>)> {
        self.jobs
            .state()
            .into_iter()
            .filter(|j| {
                !job::is_release(j)
                    && matches!(
                        job::observe(j, None).state,
                        job::JobState::Pending | job::JobState::Running
                    )
            })
            .map(|j| {
                let namespace = j.labels().get(keys::BUILD_NAMESPACE).cloned();
                let node = self
                    .builder_pod(&j.name_any())
                    .and_then(|p| p.spec.as_ref()?.node_name.clone());
                (namespace.unwrap_or_default(), node)
            })
            .collect()
    }

    /// Whether it is `build`'s turn for a cluster-wide slot (`capacity::turn`), among the
    /// builds that wait for one: Pending, new or `Queued`, and allowed by the policy.
    fn turn(
        &self,
        build: &NixBuild,
        running: &[(String, Option<String>)],
    ) -> Result<(), capacity::Full> {
        if self.capacity.global == 0 {
            return Ok(());
        }
        let waiting_of = |b: &NixBuild| capacity::Waiting {
            namespace: b.namespace().unwrap_or_default(),
            name: b.name_any(),
            created: b.creation_timestamp().map(|t| t.0),
        };
        let candidate = waiting_of(build);
        let mut waiting: Vec<capacity::Waiting> = self
            .builds
            .state()
            .iter()
            .filter(|b| b.phase() == Phase::Pending && b.meta().deletion_timestamp.is_none())
            .filter(|b| {
                b.status
                    .as_ref()
                    .is_none_or(|s| s.conditions.is_empty() || machine::is_queued(s))
            })
            .filter(|b| {
                policy::check(&self.policy, &b.namespace().unwrap_or_default(), &b.spec).is_ok()
            })
            .map(|b| waiting_of(b))
            .filter(|w| w != &candidate)
            .collect();
        waiting.push(candidate.clone());
        let mut per_namespace = BTreeMap::new();
        for (namespace, _) in running {
            *per_namespace.entry(namespace.clone()).or_default() += 1;
        }
        let free = self.capacity.global.saturating_sub(running.len());
        capacity::turn(&candidate, &waiting, &per_namespace, free)
    }
}

/// The nodes of running builds, as the per-node cap counts them.
fn nodes_of(running: &[(String, Option<String>)]) -> Vec<Option<String>> {
    running.iter().map(|(_, node)| node.clone()).collect()
}

impl std::fmt::Debug for Context {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Context")
            .field("builder", &self.builder)
            .finish_non_exhaustive()
    }
}

pub async fn reconcile(build: Arc<NixBuild>, ctx: Arc<Context>) -> Result<Action, Error> {
    ctx.metrics.reconciliations.inc();
    let namespace = build.namespace().ok_or(Error::NoNamespace)?;
    let api = Api::<NixBuild>::namespaced(ctx.client.clone(), &namespace);
    let trace = TraceContext::of(&build);
    if trace.is_none() && ctx.tracing && build.meta().deletion_timestamp.is_none() {
        // The write wakes the next reconcile, which then works inside the trace.
        stamp_trace(&api, &build).await?;
        return Ok(Action::await_change());
    }
    let span = info_span!(
        "reconcile",
        k8s.namespace.name = %namespace,
        enbi.nixbuild = %build.name_any(),
        enbi.phase = ?build.phase(),
        enbi.next_phase = Empty,
        enbi.reason = Empty,
        enbi.job_applied = Empty,
        trace_id = Empty,
        span_id = Empty,
    );
    telemetry::join(&span, trace.as_ref());
    let key = ObjectRef::from(build.as_ref());
    // kube's finalizer helper removes the finalizer as soon as cleanup returns: the release,
    // which may take several reconciles, comes first.
    if build.meta().deletion_timestamp.is_some()
        && build.finalizers().iter().any(|f| f == keys::FINALIZER)
        && let Some(action) = releasing(&build, &ctx).instrument(span.clone()).await?
    {
        ctx.failures.lock().map(|mut f| f.remove(&key)).ok();
        return Ok(action);
    }
    let action = finalizer(&api, keys::FINALIZER, build, |event| async {
        match event {
            Finalizer::Apply(build) => apply(&build, &namespace, trace.as_ref(), &ctx).await,
            Finalizer::Cleanup(build) => cleanup(&build, &ctx).await,
        }
    })
    .instrument(span)
    .await
    .map_err(|e| Error::Finalizer(Box::new(e)))?;
    ctx.failures.lock().map(|mut f| f.remove(&key)).ok();
    Ok(action)
}

/// Gives a build made without one (by a user, or before spans were exported) its trace, and
/// the finalizer in the same write. The resourceVersion makes it conditional: the finalizer
/// list is replaced whole, so it must be the list this reconcile read.
async fn stamp_trace(api: &Api<NixBuild>, build: &NixBuild) -> Result<(), Error> {
    let mut finalizers = build.finalizers().to_vec();
    if !finalizers.iter().any(|f| f == keys::FINALIZER) {
        finalizers.push(keys::FINALIZER.to_owned());
    }
    let patch = json!({"metadata": {
        "resourceVersion": build.resource_version(),
        "finalizers": finalizers,
        "annotations": {keys::TRACEPARENT: telemetry::new_context().to_string()},
    }});
    api.patch(
        &build.name_any(),
        &PatchParams::default(),
        &Patch::Merge(&patch),
    )
    .await?;
    Ok(())
}

async fn apply(
    build: &NixBuild,
    namespace: &str,
    trace: Option<&TraceContext>,
    ctx: &Context,
) -> Result<Action, Error> {
    if matches!(build.phase(), Phase::Succeeded | Phase::Failed) {
        ctx.pods.build_changed(build, &ctx.pod_stores).await;
    }
    let mut decision = decide(build, namespace, ctx, ctx.settings_fault.as_ref(), Ok(()));
    // The fetch Secret is read only when a Job is about to be made, which needs its copy.
    let mut credentials = None;
    if build.spec.fetch_secret_ref.is_some()
        && (decision.create_job.is_some() || !decision.loads.is_empty())
    {
        match read_fetch_secret(build, namespace, ctx).await? {
            Ok(found) => credentials = Some(found),
            Err(why) if decision.create_job.is_some() => {
                decision = decide(build, namespace, ctx, ctx.settings_fault.as_ref(), Err(why));
            }
            // A load of a Succeeded build: its Job waits for the copy until its deadline, and
            // the load is retried as any failed load; this says why.
            Err(why) => {
                let warning = enbi_core::event::Event::warning(
                    enbi_core::reason::FailureReason::FetchSecretUnusable.as_str(),
                    why.to_string(),
                );
                publish(build, &[warning], ctx).await;
            }
        }
    }
    // What this reconcile decided, on its span: a trace reads as the build's history.
    let span = tracing::Span::current();
    span.record(
        "enbi.next_phase",
        tracing::field::debug(decision.status.phase.unwrap_or_default()),
    );
    if let Some(c) = conditions::get(&decision.status.conditions, conditions::READY) {
        span.record("enbi.reason", c.reason.as_str());
    }
    span.record("enbi.job_applied", decision.create_job.is_some());
    let credentials = credentials.as_ref();
    if let Err(e) = execute(build, namespace, &decision, trace, credentials, ctx).await {
        // A fault of the installation kept the Job from being made: the build says why it
        // waits, and the error still backs the reconcile off until the fault is fixed.
        if let Error::Job(_) = e
            && let Some(fault) = e
                .api_status()
                .and_then(|s| fault::of_api_error(s, &ctx.builder.namespace))
        {
            let held = decide(build, namespace, ctx, Some(&fault), Ok(()));
            execute(build, namespace, &held, trace, credentials, ctx).await?;
        }
        return Err(e);
    }
    Ok(decision
        .requeue_after
        .map_or_else(Action::await_change, Action::requeue))
}

/// Gathers what `machine::decide` needs from the caches and settings, and decides.
fn decide(
    build: &NixBuild,
    namespace: &str,
    ctx: &Context,
    fault: Option<&Fault>,
    fetch_secret: Result<(), fetch::Unusable>,
) -> Decision {
    let nodes: Vec<NodeView> = ctx
        .nodes
        .state()
        .iter()
        .map(|n| NodeView::new(n.as_ref(), &ctx.builder.tolerations))
        .collect();
    let preferred = build
        .annotations()
        .get(keys::WANTED_ON_NODE)
        .map(String::as_str);
    let placement = placement::place(&build.spec.system, &nodes, &ctx.node_repel, preferred);
    let eligible = placement
        .as_ref()
        .map(|p| p.eligible.clone())
        .unwrap_or_default();
    let job = ctx.job_view(build);
    let running = ctx.running_builds();
    let succeeded = build.phase() == Phase::Succeeded;
    let loads = if succeeded {
        ctx.load_views(build)
    } else {
        BTreeMap::new()
    };
    let spread = spread::Observation {
        waiting: if succeeded {
            ctx.load_slots(build, &nodes)
        } else {
            BTreeMap::new()
        },
        jobs: loads
            .iter()
            .map(|(node, view)| (node.clone(), view))
            .collect(),
        nodes: nodes.iter().map(|n| n.name.clone()).collect(),
    };
    machine::decide(
        Observation {
            build,
            job: job.as_ref(),
            policy: policy::check(&ctx.policy, namespace, &build.spec),
            fetch_secret,
            placement,
            capacity: capacity::check(&nodes_of(&running), &eligible, ctx.capacity)
                .and_then(|()| ctx.turn(build, &running)),
            spread,
            fault,
            other_systems: machine::other_systems(
                build,
                ctx.builds.state().iter().map(|b| b.as_ref()),
            ),
            now: k8s_openapi::jiff::Timestamp::now(),
        },
        &ctx.machine,
    )
}

/// The fetch Secret `build` names, read from its namespace: its credentials, or why they cannot
/// be used. Only an error that may pass (not a 404, not a 403) fails the reconcile.
async fn read_fetch_secret(
    build: &NixBuild,
    namespace: &str,
    ctx: &Context,
) -> Result<Result<Credentials, fetch::Unusable>, Error> {
    let name = build
        .spec
        .fetch_secret_ref
        .as_ref()
        .map(|s| s.name.as_str())
        .unwrap_or_default();
    let url = &build.spec.flake_url;
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), namespace);
    let data = match secrets.get_opt(name).await {
        Ok(secret) => secret.map(|s| s.data.unwrap_or_default()),
        Err(kube::Error::Api(status)) if status.code == 403 => {
            return Ok(Err(fetch::Unusable::Unreadable {
                namespace: namespace.into(),
                name: name.into(),
                url: url.clone(),
                error: status.message,
            }));
        }
        Err(e) => return Err(e.into()),
    };
    Ok(fetch::usable(namespace, name, url, data.as_ref()))
}

/// The keys of a fetch Secret that a builder gets (`fetch::usable`).
type Credentials = BTreeMap<String, ByteString>;

/// Carries out a decision: Job first, then status (so a lost status write only repeats an
/// idempotent apply), then Events. Each Job gets its copy of the fetch credentials, if any,
/// right after it: the kubelet retries the Pod's mount until the copy is there.
async fn execute(
    build: &NixBuild,
    namespace: &str,
    decision: &Decision,
    trace: Option<&TraceContext>,
    credentials: Option<&Credentials>,
    ctx: &Context,
) -> Result<(), Error> {
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &ctx.builder.namespace);
    let secrets = Api::<Secret>::namespaced(ctx.client.clone(), &ctx.builder.namespace);
    let apply = PatchParams::apply(keys::MANAGER).force();
    let apply_job = |purpose: Purpose, affinity| {
        let manifest = job::render(build, &purpose, affinity, trace, &ctx.builder);
        let (jobs, secrets, apply) = (jobs.clone(), secrets.clone(), apply.clone());
        async move {
            let job = jobs
                .patch(&manifest.name_any(), &apply, &Patch::Apply(&manifest))
                .await
                .map_err(Error::Job)?;
            if let Some(credentials) = credentials {
                let copy = fetch::copy(&job, credentials.clone());
                secrets
                    .patch(&job.name_any(), &apply, &Patch::Apply(&copy))
                    .await
                    .map_err(Error::Job)?;
            }
            Ok::<_, Error>(job.name_any())
        }
    };
    if let Some(plan) = &decision.create_job {
        let name = apply_job(Purpose::Build(plan.attempt), plan.affinity.clone()).await?;
        ctx.health.succeeded(fault::JOBS);
        if build.status.as_ref().map_or(0, |s| s.attempts) < plan.attempt {
            ctx.metrics.builds_started.inc();
            info!(build = %build.name_any(), %namespace, job = %name, attempt = plan.attempt, "builder Job created");
        }
    }
    for load in &decision.loads {
        let purpose = Purpose::Load {
            node: load.node.clone(),
            round: load.round,
        };
        let name = apply_job(purpose, load.affinity.clone()).await?;
        info!(build = %build.name_any(), %namespace, job = %name, node = %load.node, round = load.round, "load Job applied");
    }
    if build.status.as_ref() != Some(&decision.status) {
        let patch = json!({"apiVersion": keys::API_VERSION, "kind": NixBuild::kind(&()), "status": decision.status});
        Api::<NixBuild>::namespaced(ctx.client.clone(), namespace)
            .patch_status(
                &build.name_any(),
                &PatchParams::apply(keys::MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await?;
        ctx.health.succeeded(NixBuild::crd_name());
        ctx.metrics
            .status_written(build.status.as_ref(), &decision.status);
        debug!(
            build = %build.name_any(),
            phase = ?decision.status.phase,
            ready = ?machine::ready_reason(&decision.status),
            node = ?decision.status.build_node,
            "status written"
        );
        ctx.metrics
            .set_queued(ObjectRef::from(build), machine::is_queued(&decision.status));
        let finished = matches!(
            decision.status.phase,
            Some(Phase::Succeeded | Phase::Failed)
        );
        if finished && build.phase() != decision.status.phase.unwrap_or_default() {
            finish(build, namespace, &decision.status, trace, ctx);
        }
    }
    publish(build, &decision.events, ctx).await;
    Ok(())
}

/// Publishes Events about `build`. A failure is logged (and an RBAC fault raised), never
/// returned: an Event lost must not repeat the work it reports.
async fn publish(build: &NixBuild, events: &[enbi_core::event::Event], ctx: &Context) {
    let reference = build.object_ref(&());
    for event in events {
        let event = Event {
            type_: match event.type_ {
                EventType::Normal => KubeEventType::Normal,
                EventType::Warning => KubeEventType::Warning,
            },
            reason: event.reason.into(),
            note: Some(truncate(&event.note, 1000)),
            action: "Reconcile".into(),
            secondary: None,
        };
        match ctx.recorder.publish(&event, &reference).await {
            Ok(()) => ctx.health.succeeded(EVENTS),
            Err(e) => {
                warn!(error = %e, "publishing an Event");
                if let kube::Error::Api(s) = &e
                    && let Some(fault) = fault::of_api_error(s, &ctx.builder.namespace)
                {
                    ctx.health.raise(fault);
                }
            }
        }
    }
}

/// Counts a build that just finished and ends its trace's root span.
fn finish(
    build: &NixBuild,
    namespace: &str,
    status: &NixBuildStatus,
    trace: Option<&TraceContext>,
    ctx: &Context,
) {
    let succeeded = status.phase == Some(Phase::Succeeded);
    let result = if succeeded { "succeeded" } else { "failed" };
    let reason = status
        .failure_reason
        .clone()
        .unwrap_or_else(|| "ResultSuccess".into());
    info!(build = %build.name_any(), %namespace, result, %reason, "build finished");
    ctx.metrics
        .builds_finished
        .get_or_create(&Finished {
            result,
            reason: reason.clone(),
        })
        .inc();
    if let (Some(start), Some(end)) = (&status.start_time, &status.completion_time) {
        let seconds = end.0.duration_since(start.0).as_secs_f64().max(0.0);
        ctx.metrics
            .build_duration
            .get_or_create(&Outcome { result })
            .observe(seconds);
    }
    let Some(context) = trace else { return };
    let spec = &build.spec;
    let mut attributes = vec![
        KeyValue::new("k8s.namespace.name", namespace.to_owned()),
        KeyValue::new("enbi.nixbuild", build.name_any()),
        KeyValue::new("enbi.flake_url", spec.flake_url.clone()),
        KeyValue::new("enbi.package", spec.package_name.clone()),
        KeyValue::new("enbi.system", spec.system.clone()),
        KeyValue::new("enbi.image_tag", spec.image_tag.clone()),
        KeyValue::new("enbi.result", result),
        KeyValue::new("enbi.attempts", i64::from(status.attempts)),
    ];
    let optional = [
        ("enbi.node", status.build_node.clone()),
        ("enbi.image_digest", status.image_digest.clone()),
        ("enbi.failure_reason", status.failure_reason.clone()),
    ];
    attributes.extend(
        optional
            .into_iter()
            .filter_map(|(key, value)| Some(KeyValue::new(key, value?))),
    );
    if let Some(size) = status.image_size {
        attributes.push(KeyValue::new("enbi.image_size", size));
    }
    let error = (!succeeded).then(|| {
        format!(
            "{reason}: {}",
            status.failure_message.as_deref().unwrap_or_default()
        )
    });
    telemetry::end_root_span(telemetry::RootSpan {
        context: *context,
        started: build
            .creation_timestamp()
            .map_or_else(SystemTime::now, |t| SystemTime::from(t.0)),
        attributes,
        error: error.as_deref(),
    });
}

/// While a deleted build's image is being released on its nodes (see `enbi_core::release`),
/// the action that brings the reconcile back; `None` once every node has an outcome (or there
/// is nothing to release), when the finalizer's cleanup may run.
async fn releasing(build: &NixBuild, ctx: &Context) -> Result<Option<Action>, Error> {
    ctx.metrics.set_queued(ObjectRef::from(build), false);
    // Gated Pods go back to the kubelet's path rather than wait for a build that is gone.
    ctx.pods.build_changed(build, &ctx.pod_stores).await;
    let Some(timeout) = ctx.release_timeout else {
        return Ok(None);
    };
    let Some(plan) = release::plan(build, ctx.builds.state().iter().map(AsRef::as_ref)) else {
        return Ok(None);
    };
    let key = ObjectRef::from(build);
    let Some(progress) = release(build, &plan, timeout, ctx).await? else {
        ctx.metrics.set_releasing(key, false);
        return Ok(Some(Action::await_change()));
    };
    ctx.metrics.set_releasing(key, !progress.done);
    Ok((!progress.done).then(|| {
        progress
            .requeue_after
            .map_or_else(Action::await_change, Action::requeue)
    }))
}

/// Deletes every Job of the NixBuild (attempts, loads, releases), found by its UID label, once
/// its image is released.
async fn cleanup(build: &NixBuild, ctx: &Context) -> Result<Action, Error> {
    let uid = build.uid().unwrap_or_default();
    let api = Api::<Job>::namespaced(ctx.client.clone(), &ctx.builder.namespace);
    for job in ctx
        .jobs
        .state()
        .iter()
        .filter(|j| j.labels().get(keys::BUILD_UID) == Some(&uid))
    {
        match api
            .delete(&job.name_any(), &DeleteParams::background())
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(Action::await_change())
}

/// One step of the release: starts the release Jobs that are due, publishes the Events;
/// `None` if the NixBuild is already gone.
async fn release(
    build: &NixBuild,
    plan: &release::Plan,
    timeout: Duration,
    ctx: &Context,
) -> Result<Option<release::Progress>, Error> {
    let views: BTreeMap<String, JobView> = plan
        .nodes
        .keys()
        .filter_map(|node| {
            Some((
                node.clone(),
                ctx.observe_job(&job::release_name(build, node))?,
            ))
        })
        .collect();
    let nodes = ctx.nodes.state().iter().map(|n| n.name_any()).collect();
    let now = k8s_openapi::jiff::Timestamp::now();
    let progress = release::progress(&release::Observation {
        plan,
        jobs: views.iter().map(|(n, v)| (n.clone(), v)).collect(),
        nodes: &nodes,
        deleted: build
            .metadata
            .deletion_timestamp
            .as_ref()
            .map_or(now, |t| t.0),
        now,
        timeout,
    });
    // A reconcile of a cached copy, after the finalizer went (woken by its Jobs' deletion),
    // would start the release again: starting is confirmed against the API first.
    if !progress.start.is_empty() && !finalizer_still_on(build, ctx).await? {
        return Ok(None);
    }
    let jobs = Api::<Job>::namespaced(ctx.client.clone(), &ctx.builder.namespace);
    let deadline = i64::try_from(timeout.as_secs()).unwrap_or(i64::MAX);
    for node in &progress.start {
        let Some(target) = plan.target(node) else {
            continue;
        };
        let manifest = job::render_release(build, &target, deadline, &ctx.builder);
        jobs.patch(
            &manifest.name_any(),
            &PatchParams::apply(keys::MANAGER).force(),
            &Patch::Apply(&manifest),
        )
        .await
        .map_err(Error::Job)?;
        info!(build = %build.name_any(), %node, tag = %plan.tag, "release Job applied");
    }
    if progress.done {
        info!(build = %build.name_any(), tag = %plan.tag, outcome = ?progress.nodes, "image released");
        for outcome in progress.nodes.values() {
            match outcome {
                release::NodeRelease::Released(_) => ctx
                    .metrics
                    .job_finished(census::Purpose::Release.as_str(), true),
                release::NodeRelease::Failed(_) | release::NodeRelease::TimedOut => {
                    ctx.metrics
                        .job_finished(census::Purpose::Release.as_str(), false);
                }
                _ => {}
            }
        }
    }
    publish(build, &progress.events, ctx).await;
    Ok(Some(progress))
}

/// Whether the API still has the NixBuild with enbi's finalizer.
async fn finalizer_still_on(build: &NixBuild, ctx: &Context) -> Result<bool, Error> {
    let api =
        Api::<NixBuild>::namespaced(ctx.client.clone(), &build.namespace().unwrap_or_default());
    let current = api.get_opt(&build.name_any()).await?;
    Ok(current.is_some_and(|b| {
        b.uid() == build.uid() && b.finalizers().iter().any(|f| f == keys::FINALIZER)
    }))
}

/// Retries a failed reconcile with per-object exponential backoff: 1 s, 2 s, 4 s, … 5 min.
pub fn error_policy(build: Arc<NixBuild>, error: &Error, ctx: Arc<Context>) -> Action {
    if let Some(fault) = error
        .api_status()
        .and_then(|s| fault::of_api_error(s, &ctx.builder.namespace))
    {
        ctx.health.raise(fault);
    }
    ctx.metrics
        .reconcile_errors
        .get_or_create(&crate::metrics::Category {
            category: error.category(),
        })
        .inc();
    let failures = ctx
        .failures
        .lock()
        .map(|mut f| {
            let n = f.entry(ObjectRef::from(build.as_ref())).or_default();
            *n = n.saturating_add(1);
            *n
        })
        .unwrap_or(1);
    let wait = backoff::doubling(
        Duration::from_secs(1),
        failures.saturating_sub(1),
        Duration::from_secs(300),
    );
    warn!(build = %build.name_any(), error = %error, category = error.category(), retry_in = ?wait, "reconcile failed");
    Action::requeue(wait)
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}
