//! The Pod side of enbi, as pure decisions:
//! - [`request`]: what a Pod's annotations ask enbi to build;
//! - [`findings`]: what a Pod as it is now needs (a build, or a hint why a build would not help);
//! - [`admission`]: what the webhook does with a Pod being created (gate it, or let it be);
//! - [`gate`]: when a gated Pod's gate goes and with which patch, and which Pods in back-off to
//!   recreate;
//! - [`actions`]: the Pod watcher's plan for one Pod, the requests and Events it makes.
//!
//! The rule "which of a Pod's containers use this tag" lives here once ([`using_tag`]).

pub mod actions;
pub mod admission;
pub mod findings;
pub mod gate;
pub mod request;

#[cfg(test)]
pub(crate) mod fixtures;

use k8s_openapi::api::core::v1::{Container, ContainerStatus, PodSpec, PodStatus};

use crate::reference;

/// Every container of the Pod, init containers first.
pub fn containers(spec: &PodSpec) -> impl Iterator<Item = &Container> + Clone {
    spec.init_containers
        .iter()
        .flatten()
        .chain(&spec.containers)
}

/// The Pod's containers whose image is `tag`, each with its status (init containers first);
/// a container without a status yet is left out.
pub fn statuses_using_tag<'a>(
    spec: &'a PodSpec,
    status: &'a PodStatus,
    tag: &'a str,
) -> impl Iterator<Item = (&'a Container, &'a ContainerStatus)> {
    let statuses: Vec<&ContainerStatus> = status
        .init_container_statuses
        .iter()
        .flatten()
        .chain(status.container_statuses.iter().flatten())
        .collect();
    using_tag(spec, tag)
        .filter_map(move |c| Some((c, *statuses.iter().find(|s| s.name == c.name)?)))
}

/// The Pod's containers whose image is `tag` (references compared normalised:
/// `nginx:1` is `docker.io/library/nginx:1`).
pub fn using_tag<'a>(spec: &'a PodSpec, tag: &'a str) -> impl Iterator<Item = &'a Container> {
    containers(spec).filter(move |c| {
        c.image
            .as_deref()
            .is_some_and(|image| reference::same_image(image, tag))
    })
}
