//! The Pod watcher: Pods that cannot start because their annotated image is missing, or that
//! the admission webhook gated, get a NixBuild (one per build, however many Pods ask), and
//! Events saying what happens. When the build succeeds, gated Pods lose their gate and Pods in
//! the kubelet's back-off that a controller owns are deleted, so that new ones start at once
//! (`enbi_core::gate` decides both).
//!
//! It sees every Pod, but keeps only those with enbi annotations (`podwatch::annotated`): any
//! other is dropped before it reaches the cache or the handler, so memory follows the Pods that
//! ask for builds, not the cluster's size. Those kept are stripped to the enbi annotations, node,
//! container names, images, pull policies and waiting reasons.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::{Arc, Mutex};

use enbi_core::crd::{NixBuild, Phase};
use enbi_core::podwatch::{self, BuildRequest, Finding};
use enbi_core::trace::ANNOTATION_TRACEPARENT;
use enbi_core::{gate, optin};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateWaiting, ContainerStatus, Node, ObjectReference, Pod,
    PodSpec, PodStatus,
};
use k8s_openapi::api::events::v1::Event as KubeEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::events::{EventType, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::field::Empty;
use tracing::{Instrument, debug, info, info_span, warn};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::controller::{ANNOTATION_WANTED_ON, FINALIZER};
use crate::metrics::Metrics;
use crate::namespaces::OptIn;
use crate::operator::Trigger;
use crate::telemetry;

/// Label on NixBuilds the Pod watcher made.
pub const LABEL_CREATED_BY: &str = "app.kubernetes.io/created-by";
/// Annotation naming the first Pod that asked for the build.
pub const ANNOTATION_REQUESTED_BY: &str = "enbi.hrzn.ee/requested-by-pod";

/// How the Pod watcher acts.
#[derive(Debug)]
pub struct Settings {
    /// Which namespaces may ask for builds.
    pub opt_in: OptIn,
    /// Delete controller-owned Pods in back-off once their image is loaded.
    pub recreate: bool,
    /// Narrow a gated Pod's node affinity to the nodes holding its image as it is ungated.
    pub narrow: bool,
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
    /// Delete controller-owned Pods in back-off once their image is loaded.
    recreate: bool,
    /// Narrow a gated Pod's node affinity to the nodes holding its image as it is ungated.
    narrow: bool,
    /// Whether spans are exported: new NixBuilds then get a trace context.
    tracing: bool,
    /// NixBuilds this process created, until the cache shows them.
    created: Mutex<HashSet<ObjectRef<NixBuild>>>,
    /// Events already published, as (Pod UID, `reason/key`), so each is said once per Pod
    /// (see `podwatch::waiting_notices` for which a waiting Pod gets).
    announced: Mutex<HashSet<(String, String)>>,
}

impl std::fmt::Debug for PodWatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodWatcher").finish_non_exhaustive()
    }
}

/// Keeps what `podwatch::inspect` and GC read, drops the rest.
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
                .filter(|(k, _)| k.starts_with("enbi.hrzn.ee/"))
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
            recreate: settings.recreate,
            narrow: settings.narrow,
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
        let stream = watcher(api, crate::operator::list_config())
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
                    self.handle(&pod).await
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

    async fn handle(&self, pod: &Pod) {
        let findings = podwatch::inspect(pod, node_arch(pod, &self.nodes).as_deref());
        let gated = pod.spec.as_ref().is_some_and(gate::is_gated);
        if findings.is_empty() && !gated {
            return;
        }
        let namespace = pod.namespace().unwrap_or_default();
        if !self.opt_in.allows(&namespace).await {
            let note = optin::not_enabled_note(&namespace);
            self.announce(
                pod,
                EventType::Warning,
                "PodBuildsNotEnabled",
                &namespace,
                note,
                None,
            )
            .await;
            if gated {
                self.ungate(pod, "its namespace no longer opts in", None)
                    .await;
            }
            return;
        }
        if gated
            && !findings.iter().any(|f| matches!(f, Finding::Build(_)))
            && let Some(why) = gate::release(None, None)
        {
            self.ungate(pod, &why, None).await;
        }
        for finding in findings {
            match finding {
                Finding::Build(request) => {
                    let build = self.ensure_build(pod, &request).await;
                    if let Some(b) = build.as_deref().filter(|b| b.phase() == Phase::Succeeded) {
                        let _ = self.trigger.unbounded_send(ObjectRef::from(b));
                    }
                    if gated {
                        if let Some(why) = gate::release(Some(&request), build.as_deref()) {
                            let loaded = build
                                .as_deref()
                                .filter(|b| self.narrow && b.phase() == Phase::Succeeded);
                            self.ungate(pod, &why, loaded).await;
                        }
                    } else if self.recreate && gate::recreate(pod, build.as_deref()) {
                        self.recreate(pod, &request.name).await;
                    }
                    let related = build_reference(pod, &request.name);
                    for notice in podwatch::waiting_notices(&request, build.as_deref(), gated) {
                        let type_ = if notice.warning {
                            EventType::Warning
                        } else {
                            EventType::Normal
                        };
                        self.announce(
                            pod,
                            type_,
                            notice.reason,
                            &notice.key,
                            notice.note,
                            Some(related.clone()),
                        )
                        .await;
                    }
                }
                Finding::InvalidAnnotations(message) => {
                    self.announce(
                        pod,
                        EventType::Warning,
                        "InvalidBuildAnnotations",
                        &message,
                        message.clone(),
                        None,
                    )
                    .await;
                }
                Finding::PullAlways { container } => {
                    let note = format!(
                        "Container {container} has imagePullPolicy: Always, so the kubelet never uses an image \
                         enbi loads onto the node; use IfNotPresent or Never. No build started."
                    );
                    self.announce(
                        pod,
                        EventType::Warning,
                        "ImagePullPolicyAlways",
                        &container,
                        note,
                        None,
                    )
                    .await;
                }
                Finding::CrashLoop { container } => {
                    let note = format!(
                        "Container {container} crash-loops on an image that is present; if it was built for \
                         another architecture (exec format error), check the system of its NixBuild. No build started."
                    );
                    self.announce(
                        pod,
                        EventType::Warning,
                        "CrashLoopOnLoadedImage",
                        &container,
                        note,
                        None,
                    )
                    .await;
                }
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
            let waits = podwatch::inspect(&pod, node_arch(&pod, &self.nodes).as_deref())
                .iter()
                .any(|f| matches!(f, Finding::Build(r) if r.name == name));
            if waits {
                self.handle(&pod).await;
            }
        }
    }

    /// Removes enbi's scheduling gate from the Pod, so that it is scheduled now. With `loaded`
    /// (narrowing on, and the NixBuild that loaded its image), the same patch narrows the Pod's
    /// node affinity to the nodes holding the image (`gate::narrow_patch`), read from the Pod as
    /// it is now: the cache keeps no affinity.
    async fn ungate(&self, pod: &Pod, why: &str, loaded: Option<&NixBuild>) {
        let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace().unwrap_or_default());
        let (mut ops, mut narrowed_to) = (vec![], None);
        let mut spec = pod.spec.clone().unwrap_or_default();
        if let Some(build) = loaded {
            match api.get_opt(&pod.name_any()).await {
                Ok(Some(current)) => {
                    spec = current.spec.unwrap_or_default();
                    let nodes: Vec<Arc<Node>> = gate::image_holders(build)
                        .iter()
                        .filter_map(|n| self.nodes.get(&ObjectRef::new(n)))
                        .collect();
                    let holders: Vec<&Node> = nodes.iter().map(Arc::as_ref).collect();
                    if let Some(narrow) = gate::narrow_patch(&spec, &holders) {
                        narrowed_to = Some(
                            nodes
                                .iter()
                                .map(|n| n.name_any())
                                .collect::<Vec<_>>()
                                .join(", "),
                        );
                        ops = narrow;
                    }
                }
                Ok(None) => return,
                Err(e) => {
                    return warn!(error = %e, pod = %pod.name_any(), "reading a Pod to narrow");
                }
            }
        }
        let Some(ungate) = gate::ungate_patch(&spec) else {
            return;
        };
        // With a narrowing the apiserver refuses (a rule of another version, say), the Pod is
        // ungated without it rather than kept gated.
        let attempts = if ops.is_empty() {
            vec![ungate]
        } else {
            vec![ops.into_iter().chain(ungate.clone()).collect(), ungate]
        };
        for (attempt, ops) in attempts.into_iter().enumerate() {
            let narrowing = attempt == 0 && narrowed_to.is_some();
            let patch: json_patch::Patch =
                match serde_json::from_value(serde_json::Value::Array(ops)) {
                    Ok(p) => p,
                    Err(e) => return warn!(error = %e, "the ungate patch"),
                };
            match api
                .patch(
                    &pod.name_any(),
                    &PatchParams::default(),
                    &Patch::Json::<()>(patch),
                )
                .await
            {
                Ok(_) => {
                    let narrowed = narrowed_to.as_deref().filter(|_| narrowing);
                    info!(pod = %pod.name_any(), namespace = ?pod.namespace(), %why, narrowed_among = narrowed.unwrap_or("-"), "Pod ungated");
                    if let (Some(nodes), Some(build)) = (narrowed, loaded) {
                        let note = format!(
                            "Node affinity narrowed, as the scheduling gate went, to the nodes \
                             among those holding the image of NixBuild {} ({nodes}) that the Pod \
                             can run on (--narrow-gated-pods).",
                            build.name_any()
                        );
                        let related = build_reference(pod, &build.name_any());
                        self.announce(
                            pod,
                            EventType::Normal,
                            "NodeAffinityNarrowed",
                            "",
                            note,
                            Some(related),
                        )
                        .await;
                    }
                    return;
                }
                Err(kube::Error::Api(s)) if s.code == 422 && narrowing => {
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

    /// Makes sure the NixBuild exists; returns it if the cache has it.
    async fn ensure_build(&self, pod: &Pod, request: &BuildRequest) -> Option<Arc<NixBuild>> {
        let namespace = pod.namespace().unwrap_or_default();
        let key = ObjectRef::<NixBuild>::new(&request.name).within(&namespace);
        if let Some(existing) = self.builds.get(&key) {
            // The cache has it now: forget it, so a NixBuild deleted later is made again
            // while Pods still wait for its image.
            if let Ok(mut c) = self.created.lock() {
                c.remove(&key);
            }
            return Some(existing);
        }
        if self
            .created
            .lock()
            .map(|mut c| !c.insert(key.clone()))
            .unwrap_or(false)
        {
            return None;
        }
        let mut build = NixBuild::new(&request.name, request.spec.clone());
        build.metadata.namespace = Some(namespace.clone());
        // Made with the controller's finalizer, so that its first reconcile need not add it
        // (a write per build, and one that could race the first status write).
        build.metadata.finalizers = Some(vec![FINALIZER.into()]);
        build.metadata.labels = Some(BTreeMap::from([(
            LABEL_CREATED_BY.into(),
            "enbi-pod-watcher".into(),
        )]));
        let mut annotations = BTreeMap::from([(ANNOTATION_REQUESTED_BY.into(), pod.name_any())]);
        if let Some(node) = &request.node {
            annotations.insert(ANNOTATION_WANTED_ON.into(), node.clone());
        }
        // The build's trace starts here, stamped at creation (no extra write); this Pod's span
        // links to it.
        let trace = self.tracing.then(telemetry::new_context);
        if let Some(cx) = &trace {
            annotations.insert(ANNOTATION_TRACEPARENT.into(), cx.to_string());
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
        None
    }

    /// Publishes an Event on the Pod unless this process already published `key` for it.
    /// `related` is the NixBuild it is about, if any.
    async fn announce(
        &self,
        pod: &Pod,
        type_: EventType,
        reason: &str,
        key: &str,
        note: String,
        related: Option<ObjectReference>,
    ) {
        let id = (pod.uid().unwrap_or_default(), format!("{reason}/{key}"));
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
            type_: Some(
                match type_ {
                    EventType::Normal => "Normal",
                    EventType::Warning => "Warning",
                }
                .into(),
            ),
            reason: Some(reason.into()),
            note: Some(note),
            action: Some("WatchPod".into()),
            event_time: Some(MicroTime(now)),
            regarding: Some(pod.object_ref(&())),
            related,
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
        Event::InitApply(pod) if !podwatch::annotated(&pod) => None,
        Event::Apply(pod) | Event::Delete(pod)
            if !podwatch::annotated(&pod) && !is_cached(&pod) =>
        {
            None
        }
        Event::Apply(pod) if !podwatch::annotated(&pod) => Some(Event::Delete(pod)),
        event => Some(event),
    }
}

/// The builds Pods in `stores` wait for, with the Pod's namespace.
fn requests<'a>(
    stores: &'a [Store<Pod>],
    nodes: &'a Store<Node>,
) -> impl Iterator<Item = (String, BuildRequest)> + 'a {
    stores.iter().flat_map(|s| s.state()).flat_map(move |pod| {
        let namespace = pod.namespace().unwrap_or_default();
        podwatch::inspect(&pod, node_arch(&pod, nodes).as_deref())
            .into_iter()
            .filter_map(move |finding| match finding {
                Finding::Build(r) => Some((namespace.clone(), r)),
                _ => None,
            })
    })
}

/// The NixBuilds Pods in `stores` are waiting on, as `(namespace, name)`.
pub fn waited_on(stores: &[Store<Pod>], nodes: &Store<Node>) -> HashSet<(String, String)> {
    requests(stores, nodes)
        .map(|(namespace, r)| (namespace, r.name))
        .collect()
}

/// The nodes where Pods wait for the image of NixBuild `name` in `namespace`.
pub fn waiting_nodes(
    stores: &[Store<Pod>],
    nodes: &Store<Node>,
    namespace: &str,
    name: &str,
) -> BTreeSet<String> {
    requests(stores, nodes)
        .filter(|(ns, r)| ns == namespace && r.name == name)
        .filter_map(|(_, r)| r.node)
        .collect()
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

/// The `kubernetes.io/arch` of the Pod's node, if it is scheduled and the node is known.
fn node_arch(pod: &Pod, nodes: &Store<Node>) -> Option<String> {
    let node = nodes.get(&ObjectRef::new(pod.spec.as_ref()?.node_name.as_ref()?))?;
    node.labels().get(enbi_core::placement::ARCH_LABEL).cloned()
}
