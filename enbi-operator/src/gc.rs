//! Periodic garbage collection of finished NixBuilds, as `enbi_core::gc` decides.
//!
//! Before it deletes a Succeeded build, it asks the API which Pods run its image (one paginated
//! list of the watched namespaces' Pods, only when there is such a build to delete): the Pod
//! watcher keeps only annotated Pods, and a Pod that merely runs the image counts too. A build
//! in use is stamped `enbi.hrzn.ee/last-used` instead, which keeps it for the retention period
//! (across restarts) and makes the next list for it wait as long.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use enbi_core::crd::{NixBuild, Phase};
use enbi_core::gc::{self, Finished, Limits};
use enbi_core::keys;
use k8s_openapi::api::core::v1::{Node, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use serde_json::json;
use tracing::{info, warn};

use crate::waiting;

/// Where to look for Pods, and how.
pub struct Settings {
    pub limits: Limits,
    pub period: Duration,
    /// The namespaces the Pod watcher watches (empty: all).
    pub namespaces: Vec<String>,
}

pub async fn run(
    client: Client,
    builds: Store<NixBuild>,
    pods: Vec<Store<Pod>>,
    nodes: Store<Node>,
    settings: Settings,
) {
    let mut tick = tokio::time::interval(settings.period);
    loop {
        tick.tick().await;
        let waited_on = waiting::waited_on(&pods, &nodes);
        let finished: Vec<Finished> = builds
            .state()
            .iter()
            .filter_map(|b| {
                let status = b.status.as_ref()?;
                let phase = status.phase?;
                let (namespace, name) = (b.namespace().unwrap_or_default(), b.name_any());
                matches!(phase, Phase::Succeeded | Phase::Failed).then(|| Finished {
                    completed: status
                        .completion_time
                        .as_ref()
                        .map_or(Timestamp::UNIX_EPOCH, |t| t.0),
                    waited_on: waited_on.contains(&(namespace.clone(), name.clone())),
                    last_used: b
                        .annotations()
                        .get(keys::LAST_USED)
                        .and_then(|t| t.parse().ok()),
                    namespace,
                    name,
                    phase,
                })
            })
            .collect();
        let now = Timestamp::now();
        let doomed = gc::to_delete(&finished, &settings.limits, now);
        let doomed: Vec<Arc<NixBuild>> = doomed
            .iter()
            .filter_map(|(ns, name)| builds.get(&ObjectRef::new(name).within(ns)))
            .collect();
        let tags: Vec<&str> = doomed
            .iter()
            .filter(|b| b.phase() == Phase::Succeeded)
            .map(|b| b.spec.image_tag.as_str())
            .collect();
        let used = if tags.is_empty() {
            BTreeSet::new()
        } else {
            match pods_using(&client, &settings.namespaces, &tags).await {
                Ok(used) => used,
                // Not knowing which images run, delete nothing that might be in use.
                Err(e) => {
                    warn!(error = %e, "listing Pods for garbage collection");
                    tags.iter().map(|t| (*t).to_owned()).collect()
                }
            }
        };
        for build in doomed {
            let (namespace, name) = (build.namespace().unwrap_or_default(), build.name_any());
            let api = Api::<NixBuild>::namespaced(client.clone(), &namespace);
            let result = if used.contains(build.spec.image_tag.as_str()) {
                let patch =
                    json!({"metadata": {"annotations": {keys::LAST_USED: now.to_string()}}});
                api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map(|_| info!(%namespace, build = %name, "kept: a Pod runs its image"))
            } else {
                api.delete(&name, &DeleteParams::background())
                    .await
                    .map(|_| info!(%namespace, build = %name, "deleted a finished NixBuild (history limit)"))
            };
            match result {
                Ok(()) => {}
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => warn!(error = %e, %namespace, build = %name, "garbage collection"),
            }
        }
    }
}

/// Which of `tags` the Pods of `namespaces` (empty: all) run, read page by page.
async fn pods_using(
    client: &Client,
    namespaces: &[String],
    tags: &[&str],
) -> Result<BTreeSet<String>, kube::Error> {
    let apis: Vec<Api<Pod>> = if namespaces.is_empty() {
        vec![Api::all(client.clone())]
    } else {
        namespaces
            .iter()
            .map(|ns| Api::namespaced(client.clone(), ns))
            .collect()
    };
    let mut used = BTreeSet::new();
    for api in apis {
        let mut params = ListParams::default().limit(500);
        loop {
            let page = api.list(&params).await?;
            used.extend(gc::in_use_now(&page.items, tags));
            match page.metadata.continue_.filter(|c| !c.is_empty()) {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(used)
}
