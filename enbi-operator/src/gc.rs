//! Periodic garbage collection of finished NixBuilds, as `enbi_core::gc` decides.

use std::time::Duration;

use enbi_core::crd::{NixBuild, Phase};
use enbi_core::gc::{self, Finished, Limits};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams};
use kube::runtime::reflector::Store;
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::waiting;

pub async fn run(
    client: Client,
    builds: Store<NixBuild>,
    pods: Vec<Store<Pod>>,
    nodes: Store<Node>,
    limits: Limits,
    period: Duration,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tick.tick().await;
        let waited_on = waiting::waited_on(&pods, &nodes);
        let finished: Vec<Finished> = builds
            .state()
            .iter()
            .filter_map(|b| {
                let status = b.status.as_ref()?;
                let phase = status.phase?;
                matches!(phase, Phase::Succeeded | Phase::Failed).then(|| Finished {
                    namespace: b.namespace().unwrap_or_default(),
                    name: b.name_any(),
                    phase,
                    completed: status
                        .completion_time
                        .as_ref()
                        .map_or_else(|| k8s_openapi::jiff::Timestamp::UNIX_EPOCH, |t| t.0),
                    waited_on: waited_on
                        .contains(&(b.namespace().unwrap_or_default(), b.name_any())),
                })
            })
            .collect();
        for (namespace, name) in
            gc::to_delete(&finished, &limits, k8s_openapi::jiff::Timestamp::now())
        {
            match Api::<NixBuild>::namespaced(client.clone(), &namespace)
                .delete(&name, &DeleteParams::background())
                .await
            {
                Ok(_) => {
                    info!(%namespace, build = %name, "deleted a finished NixBuild (history limit)")
                }
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => warn!(error = %e, %namespace, build = %name, "garbage collection"),
            }
        }
    }
}
