//! Namespace opt-in for the Pod-annotation path, as `enbi_core::optin` decides, from a cache of
//! namespace metadata (names and labels only: a metadata watch keeps no specs or statuses).

use enbi_core::optin::{self, PodBuildNamespaces};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::warn;

use crate::metrics::Metrics;
use crate::watch::watch;

/// Whether a namespace's Pods may ask for builds.
#[derive(Clone)]
pub struct OptIn {
    mode: PodBuildNamespaces,
    /// The namespaces the Pod watcher watches (empty: all).
    watched: Vec<String>,
    client: Client,
    /// Namespace labels; no watch at all when every namespace is served.
    namespaces: Option<Store<PartialObjectMeta<Namespace>>>,
}

impl std::fmt::Debug for OptIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OptIn")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl OptIn {
    /// Starts the namespace watch if `mode` needs one.
    pub fn new(
        client: Client,
        mode: PodBuildNamespaces,
        watched: Vec<String>,
        metrics: &Metrics,
    ) -> Self {
        let namespaces = (mode == PodBuildNamespaces::Labelled).then(|| {
            let (store, writer) = reflector::store();
            let api = Api::<PartialObjectMeta<Namespace>>::all(client.clone());
            let stream = watch(api, watcher::Config::default(), metrics)
                .default_backoff()
                .modify(|ns| {
                    ns.metadata.managed_fields = None;
                    ns.metadata.annotations = None;
                })
                .reflect(writer);
            tokio::spawn(async move {
                futures::pin_mut!(stream);
                while let Some(event) = stream.next().await {
                    if let Err(e) = event {
                        warn!(error = %e, "watching Namespaces");
                    }
                }
            });
            store
        });
        Self {
            mode,
            watched,
            client,
            namespaces,
        }
    }

    /// Whether Pods in `namespace` may ask for builds. A namespace the cache has not seen yet
    /// (created a moment ago) is read from the API.
    pub async fn allows(&self, namespace: &str) -> bool {
        let Some(store) = &self.namespaces else {
            return optin::allows(self.mode, &self.watched, namespace, &Default::default());
        };
        let labels = match store.get(&ObjectRef::new(namespace)) {
            Some(ns) => ns.labels().clone(),
            None => match Api::<Namespace>::all(self.client.clone())
                .get_metadata_opt(namespace)
                .await
            {
                Ok(ns) => ns.map(|ns| ns.labels().clone()).unwrap_or_default(),
                Err(e) => {
                    warn!(error = %e, %namespace, "reading a Namespace's labels");
                    Default::default()
                }
            },
        };
        optin::allows(self.mode, &self.watched, namespace, &labels)
    }
}
