//! The Pod watcher: Pods that cannot start because their annotated image is missing, or that
//! the admission webhook gated, get a NixBuild (one per build, however many Pods ask), and
//! Events saying what happens. When the build succeeds, gated Pods lose their gate and Pods in
//! the kubelet's back-off that a controller owns are deleted, so that new ones start at once
//! (`enbi_core::gate` decides both).
//!
//! It sees every Pod, but keeps only those with enbi annotations (`request::annotated`): any
//! other is dropped before it reaches the cache or the handler, so memory follows the Pods that
//! ask for builds, not the cluster's size. Those kept are stripped to the enbi annotations, node,
//! container names, images, pull policies and waiting reasons.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

use enbi_core::crd::{NixBuild, SecretRef};
use enbi_core::fetch;
use enbi_core::keys;
use enbi_core::pod::actions::{self as podactions, Notice, PodAction};
use enbi_core::pod::findings::{self, Finding};
use enbi_core::pod::gate;
use enbi_core::pod::request::{self, BuildRequest};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, Namespace, Node,
    ObjectReference, Pod, PodSpec, PodStatus,
};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, PatchParams, PostParams, Preconditions};
use kube::runtime::events::Reporter;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::field::Empty;
use tracing::{Instrument, debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::metrics::Metrics;
use crate::optin::OptIn;
use crate::patch::json_patch;
use crate::watch::{Trigger, watch};
use crate::{telemetry, waiting};

#[cfg(test)]
mod tests;

/// How the Pod watcher acts.
#[derive(Debug)]
pub struct Settings {
    /// Which namespaces may ask for builds.
    pub opt_in: OptIn,
    /// Recreating Pods in back-off and narrowing gated Pods.
    pub actions: podactions::Settings,
    /// Which builds Pods may ask for.
    pub policy: enbi_core::policy::Policy,
    /// Whether spans are exported: new NixBuilds then get a trace context.
    pub tracing: bool,
}

pub struct PodWatcher {
    pub client: Client,
    pub nodes: Store<Node>,
    pub builds: Store<NixBuild>,
    /// Reconciles a Succeeded NixBuild whose image a Pod waits for (to load it on its node).
    trigger: Trigger,
    /// Who publishes the Pods' Events.
    pub reporter: Reporter,
    pub metrics: Arc<Metrics>,
    /// Which namespaces may ask for builds.
    opt_in: OptIn,
    settings: podactions::Settings,
    policy: enbi_core::policy::Policy,
    /// Whether spans are exported: new NixBuilds then get a trace context.
    tracing: bool,
    /// NixBuilds this process created, until the cache shows them.
    created: Mutex<HashSet<ObjectRef<NixBuild>>>,
    /// Events already published, as (Pod UID, `reason/key`), so each is said once per Pod.
    announced: Mutex<HashSet<(String, String)>>,
}

impl std::fmt::Debug for PodWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodWatcher").finish_non_exhaustive()
    }
}

/// Keeps what `enbi_core::pod` and GC read, drops the rest.
pub fn strip(pod: &mut Pod) {
    let meta = &mut pod.metadata;
    meta.managed_fields = None;
    meta.labels = None;
    meta.owner_references = meta
        .owner_references
        .take()
        .map(|o| {
            o.into_iter()
                .filter(|r| r.controller == Some(true))
                .collect::<Vec<_>>()
        })
        .filter(|o| !o.is_empty());
    meta.annotations = meta
        .annotations
        .take()
        .map(|a| {
            a.into_iter()
                .filter(|(k, _)| k.starts_with(keys::PREFIX))
                .collect::<BTreeMap<_, _>>()
        })
        .filter(|a| !a.is_empty());
    let container = |c: &Container| Container {
        name: c.name.clone(),
        image: c.image.clone(),
        image_pull_policy: c.image_pull_policy.clone(),
        ..Default::default()
    };
    let status = |s: &ContainerStatus| ContainerStatus {
        name: s.name.clone(),
        state: s
            .state
            .as_ref()
            .and_then(|st| st.waiting.as_ref())
            .map(|w| ContainerState {
                waiting: Some(ContainerStateWaiting {
                    reason: w.reason.clone(),
                    message: None,
                }),
                ..Default::default()
            }),
        ..Default::default()
    };
    pod.spec = pod.spec.take().map(|s| PodSpec {
        node_name: s.node_name,
        scheduling_gates: s.scheduling_gates,
        containers: s.containers.iter().map(container).collect(),
        init_containers: s
            .init_containers
            .map(|cs| cs.iter().map(container).collect()),
        ..Default::default()
    });
    pod.status = pod.status.take().map(|s| PodStatus {
        phase: s.phase,
        container_statuses: s
            .container_statuses
            .map(|cs| cs.iter().map(status).collect()),
        init_container_statuses: s
            .init_container_statuses
            .map(|cs| cs.iter().map(status).collect()),
        ..Default::default()
    });
}

impl PodWatcher {
    pub fn new(
        client: Client,
        nodes: Store<Node>,
        builds: Store<NixBuild>,
        trigger: Trigger,
        reporter: Reporter,
        metrics: Arc<Metrics>,
        settings: Settings,
    ) -> Self {
        Self {
            tracing: settings.tracing,
            opt_in: settings.opt_in,
            settings: settings.actions,
            policy: settings.policy,
            trigger,
            client,
            nodes,
            builds,
            reporter,
            metrics,
            created: Mutex::default(),
            announced: Mutex::default(),
        }
    }

    /// Watches Pods in `namespace` (all if `None`), filling `writer`, until the stream ends.
    pub async fn run(
        self: Arc<Self>,
        namespace: Option<String>,
        writer: reflector::store::Writer<Pod>,
    ) {
        let api: Api<Pod> = match &namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        };
        let cached = writer.as_reader();
        let stream = watch(api, watcher::Config::default(), &self.metrics)
            .default_backoff()
            .filter_map(move |event| {
                std::future::ready(event.map(|e| annotated_only(e, &cached)).transpose())
            })
            .modify(strip)
            .reflect(writer);
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod)) => {
                    self.handle(&pod, None).await
                }
                Ok(watcher::Event::Delete(pod)) => {
                    let uid = pod.uid().unwrap_or_default();
                    if let Ok(mut a) = self.announced.lock() {
                        a.retain(|(u, _)| *u != uid);
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "watching Pods"),
            }
        }
    }

    /// Carries out the core's plan for the Pod (`enbi_core::pod::actions::plan`), in order.
    /// `reconciling`: the NixBuild whose reconcile asks (see `build_changed`), which is not
    /// woken again.
    async fn handle(&self, pod: &Pod, reconciling: Option<&str>) {
        let namespace = pod.namespace().unwrap_or_default();
        let node_arch = waiting::node_arch(pod, &self.nodes);
        if !podactions::asks(pod, node_arch.as_deref()) {
            return;
        }
        let opted_in = self.opt_in.allows(&namespace).await;
        let build_of = |name: &str| self.builds.get(&ObjectRef::new(name).within(&namespace));
        let plan = podactions::plan(
            pod,
            node_arch.as_deref(),
            opted_in,
            build_of,
            &self.policy,
            self.settings,
        );
        for action in plan {
            match action {
                PodAction::EnsureBuild(request) => self.ensure_build(pod, &request).await,
                PodAction::Wake { build } if reconciling == Some(build.as_str()) => {}
                PodAction::Wake { build } => {
                    let _ = self
                        .trigger
                        .unbounded_send(ObjectRef::new(&build).within(&namespace));
                }
                PodAction::Ungate { why, narrow_for } => {
                    let narrow = narrow_for.as_deref().and_then(build_of);
                    self.ungate(pod, &why, narrow.as_deref()).await
                }
                PodAction::Recreate { build } => self.recreate(pod, &build).await,
                PodAction::Announce(notice) => self.announce(pod, notice).await,
            }
        }
    }

    /// Looks again at the Pods in `stores` that wait for `build`, whose phase changed or which is
    /// being deleted: their gates go, back-off Pods are recreated, failures are told.
    pub async fn build_changed(&self, build: &NixBuild, stores: &[Store<Pod>]) {
        let (namespace, name) = (build.namespace(), build.name_any());
        for pod in stores.iter().flat_map(|s| s.state()) {
            if pod.namespace() != namespace {
                continue;
            }
            let node_arch = waiting::node_arch(&pod, &self.nodes);
            let waits = findings::inspect(&pod, node_arch.as_deref())
                .iter()
                .any(|f| matches!(f, Finding::Build(r) if r.name == name));
            if waits {
                self.handle(&pod, Some(&name)).await;
            }
        }
    }

    /// Removes enbi's scheduling gate from the Pod, so that it is scheduled now, as
    /// `gate::ungate_plan` says: with `narrow` (the NixBuild that loaded its image, narrowing
    /// on) from the Pod as it is now (the cache keeps no affinity), trying each patch in turn
    /// while the apiserver refuses one as invalid.
    async fn ungate(&self, pod: &Pod, why: &str, narrow: Option<&NixBuild>) {
        let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let spec = match narrow {
            None => pod.spec.clone().unwrap_or_default(),
            Some(_) => match api.get_opt(&pod.name_any()).await {
                Ok(Some(current)) => current.spec.unwrap_or_default(),
                Ok(None) => return,
                Err(e) => {
                    return warn!(error = %e, pod = %pod.name_any(), "reading a Pod to narrow");
                }
            },
        };
        let holders: Vec<Arc<Node>> = narrow
            .map(|b| b.image_holders().into_keys().collect::<Vec<_>>())
            .unwrap_or_default()
            .iter()
            .filter_map(|n| self.nodes.get(&ObjectRef::new(n)))
            .collect();
        let holders: Vec<&Node> = holders.iter().map(Arc::as_ref).collect();
        let Some(plan) = gate::ungate_plan(&spec, narrow.map(|b| (b, holders.as_slice()))) else {
            return;
        };
        let last = plan.attempts.len() - 1;
        for (i, attempt) in plan.attempts.into_iter().enumerate() {
            let patch = match json_patch(attempt.patch) {
                Ok(p) => p,
                Err(e) => return warn!(error = %e, "the ungate patch"),
            };
            match api
                .patch(&pod.name_any(), &PatchParams::default(), &patch)
                .await
            {
                Ok(_) => {
                    info!(pod = %pod.name_any(), namespace = ?pod.namespace(), %why, narrowed = attempt.event.is_some(), "Pod ungated");
                    if let Some(event) = attempt.event {
                        let build = narrow.map(|b| b.name_any()).unwrap_or_default();
                        let notice = Notice {
                            key: String::new(),
                            build: Some(build),
                            event,
                        };
                        self.announce(pod, notice).await;
                    }
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 422 && i < last => {
                    warn!(pod = %pod.name_any(), message = %s.message, "narrowing refused; ungating without it")
                }
                // Gone, or its gates changed meanwhile (the test op failed): the next event
                // decides.
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 422 => {
                    return debug!(pod = %pod.name_any(), code = s.code, message = %s.message, "Pod not ungated");
                }
                Err(e) => return warn!(error = %e, pod = %pod.name_any(), "ungating a Pod"),
            }
        }
    }

    /// Deletes a controller-owned Pod that waits in the kubelet's back-off for an image that is
    /// now loaded: its controller makes a new Pod, which starts at once.
    async fn recreate(&self, pod: &Pod, build: &str) {
        let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid: pod.uid(),
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(&pod.name_any(), &params).await {
            Ok(_) => {
                info!(pod = %pod.name_any(), namespace = ?pod.namespace(), %build, "deleted a Pod in image pull back-off for its controller to recreate")
            }
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(e) => warn!(error = %e, pod = %pod.name_any(), "recreating a Pod in back-off"),
        }
    }

    /// Makes sure the NixBuild exists: creates it unless the cache has it or this process
    /// created it already.
    /// The fetch Secret `namespace` gives the builds its Pods ask for, read as one is made. A
    /// value that names no Secret is logged and not used: the build then fails its fetch.
    async fn fetch_secret_of(&self, namespace: &str) -> Option<SecretRef> {
        let found = Api::<Namespace>::all(self.client.clone())
            .get_metadata_opt(namespace)
            .await;
        let annotations = match found {
            Ok(ns) => ns.map(|ns| ns.metadata.annotations.unwrap_or_default())?,
            Err(e) => {
                warn!(%namespace, error = %e, "reading the namespace's fetch Secret");
                return None;
            }
        };
        fetch::of_namespace(&annotations)
            .inspect_err(|e| warn!(%namespace, "{e}"))
            .ok()
            .flatten()
    }

    async fn ensure_build(&self, pod: &Pod, request: &BuildRequest) {
        let namespace = pod.namespace().unwrap_or_default();
        let key = ObjectRef::<NixBuild>::new(&request.name).within(&namespace);
        if self.builds.get(&key).is_some() {
            // The cache has it now: forget it, so a NixBuild deleted later is made again
            // while Pods still wait for its image.
            if let Ok(mut c) = self.created.lock() {
                c.remove(&key);
            }
            return;
        }
        if self
            .created
            .lock()
            .map(|mut c| !c.insert(key.clone()))
            .unwrap_or(false)
        {
            return;
        }
        let mut build = NixBuild::new(&request.name, request.spec.clone());
        build.spec.fetch_secret_ref = self.fetch_secret_of(&namespace).await;
        build.metadata.namespace = Some(namespace.clone());
        // Made with the controller's finalizer, so that its first reconcile need not add it
        // (a write per build, and one that could race the first status write).
        build.metadata.finalizers = Some(vec![keys::FINALIZER.into()]);
        build.metadata.labels = Some(BTreeMap::from([(
            keys::CREATED_BY.into(),
            "enbi-pod-watcher".into(),
        )]));
        let mut annotations = BTreeMap::from([(keys::REQUESTED_BY_POD.into(), pod.name_any())]);
        if let Some(node) = &request.node {
            annotations.insert(keys::WANTED_ON_NODE.into(), node.clone());
        }
        // The build's trace starts here, stamped at creation (no extra write); this Pod's span
        // links to it.
        let trace = self.tracing.then(telemetry::new_context);
        if let Some(cx) = &trace {
            annotations.insert(keys::TRACEPARENT.into(), cx.to_string());
        }
        build.metadata.annotations = Some(annotations);
        let span = info_span!(
            "pod needs image",
            k8s.namespace.name = %namespace,
            k8s.pod.name = %pod.name_any(),
            enbi.nixbuild = %request.name,
            enbi.image_tag = %request.spec.image_tag,
            trace_id = Empty,
            span_id = Empty,
        );
        if let Some(cx) = &trace {
            span.add_link(telemetry::span_context(cx));
        }
        telemetry::record_ids(&span);
        let created = Api::<NixBuild>::namespaced(self.client.clone(), &namespace)
            .create(&PostParams::default(), &build)
            .instrument(span.clone())
            .await;
        let _in_span = span.enter();
        match created {
            Ok(_) => {
                self.metrics.pod_triggered_builds.inc();
                info!(build = %request.name, %namespace, pod = %pod.name_any(), "NixBuild created for a Pod");
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {
                debug!(build = %request.name, %namespace, "NixBuild for a Pod already exists");
            }
            Err(e) => {
                warn!(error = %e, build = %request.name, "creating a NixBuild for a Pod");
                if let Ok(mut c) = self.created.lock() {
                    c.remove(&key);
                }
            }
        }
    }

    /// Publishes the notice's Event on the Pod unless this process already published its
    /// `(reason, key)` for it.
    async fn announce(&self, pod: &Pod, notice: Notice) {
        let Notice { key, build, event } = notice;
        let id = (
            pod.uid().unwrap_or_default(),
            format!("{}/{key}", event.reason),
        );
        if !self
            .announced
            .lock()
            .map(|mut a| a.insert(id))
            .unwrap_or(false)
        {
            return;
        }
        // Created directly, not through kube's Recorder: each is said once per Pod already, and
        // the Recorder would keep every one in its series cache for six minutes (and scan that
        // cache on each publish), which is most of the operator's memory with 10,000 Pods.
        let now = Timestamp::now();
        let event = KubeEvent {
            metadata: ObjectMeta {
                name: Some(format!("{}.{:x}", pod.name_any(), now.as_nanosecond())),
                namespace: pod.namespace(),
                ..ObjectMeta::default()
            },
            type_: Some(event.type_.as_str().into()),
            reason: Some(event.reason.into()),
            note: Some(event.note),
            action: Some("WatchPod".into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(pod.object_ref(&())),
            related: build.map(|name| build_reference(pod, &name)),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            ..KubeEvent::default()
        };
        let events =
            Api::<KubeEvent>::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        if let Err(e) = events.create(&PostParams::default(), &event).await {
            warn!(error = %e, "publishing a Pod Event");
        }
    }
}

/// The event as the Pod cache and the handler see it: a Pod without enbi annotations is left
/// out, or, if `cached` holds it (its annotations were removed), becomes a removal.
fn annotated_only(event: watcher::Event<Pod>, cached: &Store<Pod>) -> Option<watcher::Event<Pod>> {
    use watcher::Event;
    let is_cached = |pod: &Pod| cached.get(&ObjectRef::from(pod)).is_some();
    match event {
        Event::InitApply(pod) if !request::annotated(&pod) => None,
        Event::Apply(pod) | Event::Delete(pod) if !request::annotated(&pod) && !is_cached(&pod) => {
            None
        }
        Event::Apply(pod) if !request::annotated(&pod) => Some(Event::Delete(pod)),
        event => Some(event),
    }
}

/// A reference to the NixBuild `name` in the Pod's namespace, for an Event's `related`.
fn build_reference(pod: &Pod, name: &str) -> ObjectReference {
    ObjectReference {
        api_version: Some(NixBuild::api_version(&()).into_owned()),
        kind: Some(NixBuild::kind(&()).into_owned()),
        name: Some(name.to_owned()),
        namespace: pod.namespace(),
        ..Default::default()
    }
}
