//! What the Pod caches say Pods wait for: the builds they ask for and the nodes they wait on,
//! read by the NixBuild controller (where to load an image), garbage collection (what not to
//! delete) and the Pod watcher.

use std::collections::{BTreeSet, HashSet};

use enbi_core::keys;
use enbi_core::pod::findings::{self, Finding};
use enbi_core::pod::request::BuildRequest;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

/// The builds Pods in `stores` wait for, with the Pod's namespace.
fn requests<'a>(
    stores: &'a [Store<Pod>],
    nodes: &'a Store<Node>,
) -> impl Iterator<Item = (String, BuildRequest)> + 'a {
    stores.iter().flat_map(|s| s.state()).flat_map(move |pod| {
        let namespace = pod.namespace().unwrap_or_default();
        findings::inspect(&pod, node_arch(&pod, nodes).as_deref())
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

/// The `kubernetes.io/arch` of the Pod's node, if it is scheduled and the node is known.
pub fn node_arch(pod: &Pod, nodes: &Store<Node>) -> Option<String> {
    let node = nodes.get(&ObjectRef::new(pod.spec.as_ref()?.node_name.as_ref()?))?;
    node.labels().get(keys::ARCH_LABEL).cloned()
}
