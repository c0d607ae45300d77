//! Faults of the operator's installation that no retry fixes: the build namespace missing, RBAC
//! refusing a request, no builder image. They hold up every build, so they are shown where users
//! look (the Ready condition and an Event on each NixBuild held up, and `/readyz`), not only in
//! the operator's log. Other API errors are transient and only retried.

use kube::core::Status;

use crate::job::BuilderSettings;

/// A fault only an administrator can fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// The namespace the builder Jobs run in does not exist.
    BuildNamespaceMissing { namespace: String },
    /// RBAC refuses the operator a request on `resource`; `message` is the apiserver's, which
    /// names the verb and the operator's identity.
    Forbidden { resource: String, message: String },
    /// No builder image is configured, so no builder Job can run.
    BuilderImageUnset,
}

impl Fault {
    /// The CamelCase reason of the Ready condition and the Event.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::BuildNamespaceMissing { .. } => "BuildNamespaceMissing",
            Self::Forbidden { .. } => "OperatorForbidden",
            Self::BuilderImageUnset => "BuilderImageUnset",
        }
    }

    /// What is wrong and what to do, for humans.
    pub fn message(&self) -> String {
        match self {
            Self::BuildNamespaceMissing { namespace } => format!(
                "The build namespace {namespace} does not exist, so no builder Job can be created: \
                 install enbi with its Timoni module (which creates it), or create it with the \
                 builder ServiceAccount, or set --build-namespace (ENBI_BUILD_NAMESPACE) to one that exists"
            ),
            Self::Forbidden { resource, message } => format!(
                "The operator's RBAC does not allow a request it needs on {resource} ({message}): \
                 grant it (the Timoni module's ClusterRole and Role list every verb enbi uses)"
            ),
            Self::BuilderImageUnset => "No builder image is set, so no builder Job can run: set \
                 --builder-image (ENBI_BUILDER_IMAGE, the Timoni value build.image)"
                .to_owned(),
        }
    }

    /// Which fault this is, regardless of the object it happened on: `/readyz` lists each once,
    /// and a success of the same kind clears it.
    pub fn key(&self) -> String {
        match self {
            Self::BuildNamespaceMissing { namespace } => format!("{}/{namespace}", self.reason()),
            Self::Forbidden { resource, .. } => format!("{}/{resource}", self.reason()),
            Self::BuilderImageUnset => self.reason().to_owned(),
        }
    }

    /// Whether a successful request on `resource` (`jobs.batch`, `nixbuilds.enbi.hrzn.ee`)
    /// shows the fault is fixed: a Job created shows the build namespace exists. A setting is
    /// only fixed by a restart.
    pub fn cleared_by(&self, resource: &str) -> bool {
        match self {
            Self::BuildNamespaceMissing { .. } => resource == JOBS,
            Self::Forbidden { resource: r, .. } => r == resource,
            Self::BuilderImageUnset => false,
        }
    }
}

/// The resource of builder Jobs, as API errors and [`Fault::cleared_by`] name it.
pub const JOBS: &str = "jobs.batch";

/// The fault in the builder settings, if any: known before any build starts.
pub fn of_settings(settings: &BuilderSettings) -> Option<Fault> {
    settings
        .image
        .trim()
        .is_empty()
        .then_some(Fault::BuilderImageUnset)
}

/// The fault an API error means, if it is one (`None`: an ordinary error, worth a retry).
/// `build_namespace` tells a missing build namespace from other missing objects.
pub fn of_api_error(status: &Status, build_namespace: &str) -> Option<Fault> {
    let details = status.details.as_ref();
    // Writing into a namespace being deleted (say, the Events of a NixBuild deleted with its
    // namespace) is refused with 403 too: that is no fault of the installation.
    let terminating =
        details.is_some_and(|d| d.causes.iter().any(|c| c.reason == "NamespaceTerminating"));
    match status.code {
        403 if terminating => None,
        403 => {
            let resource = details.map_or_else(String::new, |d| {
                if d.group.is_empty() {
                    d.kind.clone()
                } else {
                    format!("{}.{}", d.kind, d.group)
                }
            });
            Some(Fault::Forbidden {
                resource: if resource.is_empty() {
                    "an API resource".into()
                } else {
                    resource
                },
                message: status.message.clone(),
            })
        }
        404 if details.is_some_and(|d| d.kind == "namespaces" && d.name == build_namespace) => {
            Some(Fault::BuildNamespaceMissing {
                namespace: build_namespace.to_owned(),
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use kube::core::response::StatusDetails;

    use super::*;

    fn status(code: u16, kind: &str, group: &str, name: &str, message: &str) -> Status {
        Status {
            code,
            message: message.into(),
            details: Some(StatusDetails {
                kind: kind.into(),
                group: group.into(),
                name: name.into(),
                uid: String::new(),
                causes: vec![],
                retry_after_seconds: 0,
            }),
            ..Status::default()
        }
    }

    #[test]
    fn a_missing_build_namespace_is_a_fault_other_missing_objects_are_not() {
        let missing = status(
            404,
            "namespaces",
            "",
            "enbi-builds",
            "namespaces \"enbi-builds\" not found",
        );
        let fault = of_api_error(&missing, "enbi-builds").expect("a fault");
        assert_eq!(fault.reason(), "BuildNamespaceMissing");
        assert!(
            fault
                .message()
                .contains("build namespace enbi-builds does not exist")
        );
        assert!(fault.message().contains("--build-namespace"));
        let job = status(404, "jobs", "batch", "b-1", "jobs.batch \"b-1\" not found");
        assert_eq!(of_api_error(&job, "enbi-builds"), None);
        let other_ns = status(
            404,
            "namespaces",
            "",
            "apps",
            "namespaces \"apps\" not found",
        );
        assert_eq!(of_api_error(&other_ns, "enbi-builds"), None);
        assert!(
            fault.cleared_by(JOBS),
            "a Job created shows the namespace exists"
        );
    }

    #[test]
    fn forbidden_names_the_resource_and_keeps_the_apiservers_words() {
        let text = "jobs.batch \"b-1\" is forbidden: User \"system:serviceaccount:e:op\" cannot patch \
                    resource \"jobs\" in API group \"batch\" in the namespace \"enbi-builds\"";
        let fault = of_api_error(&status(403, "jobs", "batch", "b-1", text), "enbi-builds")
            .expect("a fault");
        assert_eq!(fault.reason(), "OperatorForbidden");
        assert_eq!(fault.key(), "OperatorForbidden/jobs.batch");
        let message = fault.message();
        assert!(message.contains("on jobs.batch"), "{message}");
        assert!(
            message.contains("cannot patch resource \"jobs\""),
            "{message}"
        );
        let core = of_api_error(&status(403, "events", "", "", "no"), "x").expect("a fault");
        assert_eq!(core.key(), "OperatorForbidden/events");
        assert!(fault.cleared_by(JOBS));
        assert!(!fault.cleared_by("nixbuilds.enbi.hrzn.ee"));
    }

    #[test]
    fn a_namespace_being_deleted_is_no_fault() {
        let mut refused = status(403, "events", "events.k8s.io", "e", "forbidden");
        if let Some(d) = refused.details.as_mut() {
            d.causes = vec![kube::core::response::StatusCause {
                reason: "NamespaceTerminating".into(),
                message: "namespace app is being terminated".into(),
                field: "metadata.namespace".into(),
            }];
        }
        assert_eq!(of_api_error(&refused, "b"), None);
    }

    #[test]
    fn transient_errors_are_not_faults() {
        for code in [409, 422, 429, 500, 503] {
            assert_eq!(
                of_api_error(&status(code, "jobs", "batch", "b", "x"), "b"),
                None
            );
        }
    }

    #[test]
    fn an_empty_builder_image_is_a_fault() {
        let mut settings = BuilderSettings {
            image: " ".into(),
            ..BuilderSettings::default()
        };
        assert_eq!(of_settings(&settings), Some(Fault::BuilderImageUnset));
        assert!(
            Fault::BuilderImageUnset
                .message()
                .contains("ENBI_BUILDER_IMAGE")
        );
        assert!(
            !Fault::BuilderImageUnset.cleared_by(JOBS),
            "only a restart sets it"
        );
        settings.image = "localhost/enbi:1".into();
        assert_eq!(of_settings(&settings), None);
    }
}
