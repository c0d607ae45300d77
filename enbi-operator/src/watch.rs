//! The watch plumbing under the controllers: how every watch lists, the caches the operator
//! keeps (each object stripped to what enbi reads before it is stored), and the trigger that
//! wakes a NixBuild's reconcile when something it depends on changes.

use enbi_core::crd::{NixBuild, Phase};
use enbi_core::keys;
use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use tracing::warn;

/// Wakes the reconcile of a NixBuild.
pub type Trigger = mpsc::UnboundedSender<ObjectRef<NixBuild>>;

/// The NixBuild a builder Job or Pod belongs to, from its labels.
pub fn owner_of<K: Resource>(object: &K) -> Option<ObjectRef<NixBuild>> {
    let labels = object.meta().labels.as_ref()?;
    let name = labels.get(keys::BUILD_NAME)?;
    let namespace = labels.get(keys::BUILD_NAMESPACE)?;
    Some(ObjectRef::new(name).within(namespace))
}

/// Reconciles `owner` (if any) and every Pending build: a finished Job frees a slot, a new
/// Node may be the one a build waits for.
pub fn notify(trigger: &Trigger, builds: &Store<NixBuild>, owner: Option<ObjectRef<NixBuild>>) {
    let pending = builds
        .state()
        .into_iter()
        .filter(|b| b.phase() == Phase::Pending)
        .map(|b| ObjectRef::from(b.as_ref()));
    for r in owner.into_iter().chain(pending) {
        let _ = trigger.unbounded_send(r);
    }
}

/// How every watch lists: as a stream of single objects (a watch with `sendInitialEvents`,
/// Kubernetes' WatchList), so that neither a start nor a relist holds a page of full objects.
pub fn list_config() -> watcher::Config {
    watcher::Config::default().streaming_lists()
}

/// A cache of `api` (filtered by `config`) kept by a background watch, each object passed
/// through `strip` before it is stored; `on_change` runs for every object that changes.
pub fn spawn_cache<K, F>(
    api: Api<K>,
    config: watcher::Config,
    strip: fn(&mut K),
    on_change: F,
) -> Store<K>
where
    K: Resource<DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
    F: Fn(&K) + Send + 'static,
{
    let (store, writer) = reflector::store();
    let stream = watcher(api, config)
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        .touched_objects();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(object) => on_change(&object),
                Err(e) => warn!(error = %e, kind = %K::kind(&()), "watch"),
            }
        }
    });
    store
}

pub fn strip_managed_fields<K: Resource>(object: &mut K) {
    object.meta_mut().managed_fields = None;
}

/// Keeps what placement reads of a Node (`placement::NodeView`): labels, taints, cordon and
/// the Ready condition. A node's status lists every image on it, often the largest part.
pub fn strip_node(node: &mut Node) {
    node.metadata.managed_fields = None;
    node.metadata.annotations = None;
    node.spec = node.spec.take().map(|s| NodeSpec {
        taints: s.taints,
        unschedulable: s.unschedulable,
        ..NodeSpec::default()
    });
    node.status = node.status.take().map(|s| NodeStatus {
        conditions: s.conditions.map(|cs| {
            cs.into_iter()
                .filter(|c| c.type_ == "Ready")
                .map(|c| NodeCondition {
                    type_: c.type_,
                    status: c.status,
                    ..NodeCondition::default()
                })
                .collect()
        }),
        ..NodeStatus::default()
    });
}
