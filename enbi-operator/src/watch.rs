//! The watch plumbing under the controllers: the one watch every cache and controller uses
//! (streaming lists where the apiserver serves them, else pages), the caches the operator
//! keeps (each object stripped to what enbi reads before it is stored), and the trigger that
//! wakes a NixBuild's reconcile when something it depends on changes.

use enbi_core::crd::{NixBuild, Phase};
use enbi_core::keys;
use futures::channel::mpsc;
use futures::stream::{self, BoxStream};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, NodeCondition, NodeSpec, NodeStatus};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::watcher::InitialListStrategy;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use tracing::{info, warn};

use crate::metrics::{Metrics, WatchMode};

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

/// Objects per page where a watch lists in pages: a start or a relist holds one page of full
/// objects at a time besides the cache. A fifth of client-go's and kube's 500: an operator
/// restarted among 10,000 Pods peaked at 31 MiB with pages of 100 and 60 MiB with pages of 500
/// (24 MiB streaming; `bench/pods-memory.sh`), for 100 list requests instead of 20.
const PAGE_SIZE: u32 = 100;

/// The watch of `api` (filtered by `config`) under every cache and controller of the operator.
///
/// It lists as a stream of single objects (a watch with `sendInitialEvents`, Kubernetes'
/// WatchList), so that neither a start nor a relist holds a page of full objects. Kubernetes
/// 1.33 ships the WatchList feature gate off, and such an apiserver refuses that watch (422
/// Invalid), which kube-runtime would retry for ever: the first refusal switches this watch,
/// for the rest of the process, to kube's default list then watch, in pages of [`PAGE_SIZE`].
/// The switch is logged once, and `enbi_watch_list_mode` says how each watch lists.
pub fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    metrics: &Metrics,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    let state = Watch {
        inner: watcher(api.clone(), config.clone().streaming_lists()).boxed(),
        mode: metrics.watch_mode(K::plural(&()).into_owned()),
        fallback: Some((api, config)),
    };
    stream::unfold(state, |mut w| async move {
        loop {
            let item = w.inner.next().await?;
            if let Some((api, config)) = w.fallback.take_if(|_| refuses_streaming(&item)) {
                info!(
                    resource = %K::plural(&()),
                    namespace = api.namespace(),
                    "the apiserver refuses streaming lists (its WatchList feature gate is off): listing in pages"
                );
                w.mode.set("paginated");
                let config = watcher::Config {
                    initial_list_strategy: InitialListStrategy::ListWatch,
                    ..config
                };
                w.inner = watcher(api, config.page_size(PAGE_SIZE)).boxed();
                continue;
            }
            if w.fallback.is_some() && matches!(item, Ok(watcher::Event::Init)) {
                // A streaming watch emits `Init` once the apiserver has accepted it.
                w.mode.set("streaming");
            }
            return Some((item, w));
        }
    })
}

/// The state of one [`watch`].
struct Watch<K> {
    inner: BoxStream<'static, watcher::Result<watcher::Event<K>>>,
    mode: WatchMode,
    /// What a paginated watch needs, until the watch has fallen back to one.
    fallback: Option<(Api<K>, watcher::Config)>,
}

/// The apiserver refused a streaming list: `sendInitialEvents is forbidden for watch unless the
/// WatchList feature gate is enabled` (422 Invalid, before the watch starts).
fn refuses_streaming<K>(item: &watcher::Result<watcher::Event<K>>) -> bool {
    matches!(item, Err(watcher::Error::WatchStartFailed(kube::Error::Api(status))) if status.is_invalid())
}

/// A cache of `api` (filtered by `config`) kept by a background [`watch`], each object passed
/// through `strip` before it is stored; `on_change` runs for every object that changes.
pub fn spawn_cache<K, F>(
    api: Api<K>,
    config: watcher::Config,
    metrics: &Metrics,
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
    let stream = watch(api, config, metrics)
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
