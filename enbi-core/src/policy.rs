//! Who may build what. A NixBuild writes an image into a node's containerd under any tag it
//! names, so the operator checks, before anything runs: the namespace, the flake URL's prefix,
//! the image tag against patterns (optionally per namespace) and against the protected
//! registries, and what the builder asks for (`spec.resources`) against a maximum (optionally
//! per namespace). Empty lists allow everything, except fetch Secrets
//! (`spec.fetchSecretRef`), which only the namespaces listed may name.
//!
//! **Protected registries.** With a mirror such as Spegel, an image on one node is served to
//! every node under its name: a build tagged `docker.io/library/nginx:<new tag>` would put a
//! tenant's image where other tenants pull `nginx`. A tag under a protected registry (by
//! default the public ones, [`defaults::PROTECTED_REGISTRIES`]) is refused unless a tag rule that
//! applies to the namespace names that registry literally (`team=docker.io/team/*`): a catch-all
//! `*` allows no protected registry.

use crate::crd::{BuildResources, NixBuildSpec};
use crate::resources::{self, DEADLINE};
use crate::{defaults, reference};

/// An image tag pattern, for one namespace or all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRule {
    /// `None` applies everywhere.
    pub namespace: Option<String>,
    /// Glob over the normalised reference: `*` matches any run of characters.
    pub pattern: String,
}

/// The most a NixBuild may ask for of one resource (or `deadline-seconds`), in one namespace
/// or all; a namespace's own maximum replaces the global one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResourceMax {
    pub namespace: Option<String>,
    /// `cpu`, `memory`, `ephemeral-storage` or `deadline-seconds`.
    pub resource: String,
    pub max: String,
}

/// The operator's build policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub allowed_namespaces: Vec<String>,
    pub flake_url_prefixes: Vec<String>,
    pub tag_rules: Vec<TagRule>,
    /// Namespaces whose builds may name a fetch Secret (`spec.fetchSecretRef`); empty: none,
    /// `*`: all. The operator reads those Secrets, so the list is opt-in.
    pub fetch_secret_namespaces: Vec<String>,
    /// Registry names (`*` as wildcard, `*.gcr.io`) that a tag may use only where a tag rule
    /// names them.
    pub protected_registries: Vec<String>,
    pub resource_max: Vec<ResourceMax>,
}

impl Default for Policy {
    /// Everything allowed but tags under the public registries.
    fn default() -> Self {
        Self {
            allowed_namespaces: vec![],
            flake_url_prefixes: vec![],
            tag_rules: vec![],
            protected_registries: defaults::PROTECTED_REGISTRIES
                .iter()
                .map(|r| (*r).to_owned())
                .collect(),
            resource_max: vec![],
            fetch_secret_namespaces: vec![],
        }
    }
}

/// Why the policy refuses a build; its message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("namespace {namespace} is not in the allowed namespaces ({})", allowed.join(", "))]
    Namespace {
        namespace: String,
        allowed: Vec<String>,
    },
    #[error("spec.flakeUrl {url} does not start with an allowed prefix ({})", prefixes.join(", "))]
    FlakeUrl { url: String, prefixes: Vec<String> },
    #[error("spec.imageTag {tag} matches no allowed pattern for namespace {namespace} ({})", patterns.join(", "))]
    ImageTag {
        tag: String,
        namespace: String,
        patterns: Vec<String>,
    },
    #[error("spec.fetchSecretRef: namespace {namespace} may not use fetch Secrets (allowed: {})", if allowed.is_empty() { "none".to_owned() } else { allowed.join(", ") })]
    FetchSecret {
        namespace: String,
        allowed: Vec<String>,
    },
    #[error(
        "spec.imageTag {tag} is under the protected registry {registry}: a build could replace \
         that registry's images on every node; only a tag pattern for namespace {namespace} that \
         names {registry} allows it (e.g. {namespace}={registry}/{namespace}/*)"
    )]
    ProtectedRegistry {
        tag: String,
        registry: String,
        namespace: String,
    },
    #[error("{field} {value} is not a quantity (such as 2, 500m or 4Gi)")]
    Quantity { field: String, value: String },
    #[error("{field} {value} is above the maximum {max} for namespace {namespace}")]
    AboveMax {
        field: String,
        value: String,
        max: String,
        namespace: String,
    },
}

/// Checks a build; `Err` names the rule it breaks.
pub fn check(policy: &Policy, namespace: &str, spec: &NixBuildSpec) -> Result<(), Denial> {
    if !policy.allowed_namespaces.is_empty()
        && !policy.allowed_namespaces.iter().any(|n| n == namespace)
    {
        return Err(Denial::Namespace {
            namespace: namespace.to_owned(),
            allowed: policy.allowed_namespaces.clone(),
        });
    }
    if !policy.flake_url_prefixes.is_empty()
        && !policy
            .flake_url_prefixes
            .iter()
            .any(|p| spec.flake_url.starts_with(p.as_str()))
    {
        return Err(Denial::FlakeUrl {
            url: spec.flake_url.clone(),
            prefixes: policy.flake_url_prefixes.clone(),
        });
    }
    if spec.fetch_secret_ref.is_some()
        && !policy
            .fetch_secret_namespaces
            .iter()
            .any(|n| n == namespace || n == "*")
    {
        return Err(Denial::FetchSecret {
            namespace: namespace.to_owned(),
            allowed: policy.fetch_secret_namespaces.clone(),
        });
    }
    check_tag(policy, namespace, &spec.image_tag)?;
    if let Some(resources) = &spec.resources {
        check_resources(policy, namespace, resources)?;
    }
    Ok(())
}

/// The image tag against the tag rules and the protected registries.
fn check_tag(policy: &Policy, namespace: &str, tag: &str) -> Result<(), Denial> {
    let rules: Vec<&TagRule> = policy
        .tag_rules
        .iter()
        .filter(|r| r.namespace.as_deref().is_none_or(|n| n == namespace))
        .collect();
    let tag = reference::normalise(tag);
    if !rules.is_empty() && !rules.iter().any(|r| glob(&r.pattern, &tag)) {
        return Err(Denial::ImageTag {
            tag,
            namespace: namespace.to_owned(),
            patterns: rules.iter().map(|r| r.pattern.clone()).collect(),
        });
    }
    let (registry, _) = reference::registry_and_repository(&tag);
    let protected = policy
        .protected_registries
        .iter()
        .any(|p| glob(p, &registry));
    let named = |r: &&TagRule| {
        r.pattern
            .strip_prefix(registry.as_str())
            .is_some_and(|rest| rest.starts_with('/'))
            && glob(&r.pattern, &tag)
    };
    if protected && !rules.iter().any(named) {
        return Err(Denial::ProtectedRegistry {
            tag,
            registry,
            namespace: namespace.to_owned(),
        });
    }
    Ok(())
}

/// `spec.resources` against the maximum for the namespace.
fn check_resources(
    policy: &Policy,
    namespace: &str,
    resources: &BuildResources,
) -> Result<(), Denial> {
    let max_of = |resource: &str| {
        let rules = policy
            .resource_max
            .iter()
            .filter(|m| m.resource == resource);
        let mut rules: Vec<&ResourceMax> = rules
            .filter(|m| m.namespace.as_deref().is_none_or(|n| n == namespace))
            .collect();
        rules.sort_by_key(|m| m.namespace.is_none());
        rules.first().map(|m| m.max.clone())
    };
    let quantity = |field: &str, value: &str| {
        resources::parse_quantity(value).ok_or_else(|| Denial::Quantity {
            field: field.to_owned(),
            value: value.to_owned(),
        })
    };
    let amounts = [
        ("requests", &resources.requests),
        ("limits", &resources.limits),
    ];
    for (kind, amounts) in amounts {
        for (name, value) in amounts.by_name() {
            let field = format!("spec.resources.{kind}.{name}");
            let asked = quantity(&field, value)?;
            if let Some(max) = max_of(name)
                && resources::parse_quantity(&max).is_some_and(|m| asked > m)
            {
                return Err(Denial::AboveMax {
                    field,
                    value: value.to_owned(),
                    max,
                    namespace: namespace.to_owned(),
                });
            }
        }
    }
    if let (Some(deadline), Some(max)) = (resources.deadline_seconds, max_of(DEADLINE))
        && max.parse::<i64>().is_ok_and(|m| deadline > m)
    {
        return Err(Denial::AboveMax {
            field: "spec.resources.deadlineSeconds".into(),
            value: deadline.to_string(),
            max,
            namespace: namespace.to_owned(),
        });
    }
    Ok(())
}

/// Whether `text` matches `pattern`, where `*` matches any run of characters.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(flake: &str, tag: &str) -> NixBuildSpec {
        NixBuildSpec {
            flake_url: flake.into(),
            package_name: "p".into(),
            image_tag: tag.into(),
            system: "x86_64-linux".into(),
            fetch_secret_ref: None,
            resources: None,
        }
    }

    fn open() -> Policy {
        Policy {
            protected_registries: vec![],
            ..Policy::default()
        }
    }

    #[test]
    fn empty_policy_allows_everything() {
        assert_eq!(
            check(&open(), "any", &spec("github:o/r", "nginx:1")),
            Ok(())
        );
    }

    #[test]
    fn public_registries_are_protected_unless_a_namespaces_pattern_names_them() {
        let policy = Policy::default();
        for tag in [
            "nginx:1",
            "docker.io/library/nginx:new",
            "team/app:1",
            "ghcr.io/o/app:1",
            "eu.gcr.io/p/app:1",
            "europe-docker.pkg.dev/p/r/app:1",
            "public.ecr.aws/o/app:1",
        ] {
            let err = check(&policy, "a", &spec("github:o/r", tag)).unwrap_err();
            assert!(
                matches!(err, Denial::ProtectedRegistry { .. })
                    && err.to_string().starts_with("spec.imageTag "),
                "{tag}: {err}"
            );
        }
        for tag in [
            "localhost/app:1",
            "registry.example/app:1",
            "localhost:5000/a:1",
        ] {
            assert_eq!(
                check(&policy, "a", &spec("github:o/r", tag)),
                Ok(()),
                "{tag}"
            );
        }
        let err = check(&policy, "a", &spec("github:o/r", "nginx:1")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.imageTag docker.io/library/nginx:1 is under the protected registry docker.io: \
             a build could replace that registry's images on every node; only a tag pattern for \
             namespace a that names docker.io allows it (e.g. a=docker.io/a/*)"
        );
        let policy = Policy {
            tag_rules: vec![
                TagRule {
                    namespace: Some("a".into()),
                    pattern: "docker.io/team-a/*".into(),
                },
                TagRule {
                    namespace: None,
                    pattern: "*".into(),
                },
            ],
            ..Policy::default()
        };
        let team = spec("github:o/r", "team-a/app:1");
        assert_eq!(check(&policy, "a", &team), Ok(()), "named for a");
        assert!(check(&policy, "b", &team).is_err(), "not named for b");
        assert!(
            check(&policy, "a", &spec("github:o/r", "nginx:1")).is_err(),
            "* names no registry"
        );
        assert_eq!(
            check(&policy, "b", &spec("github:o/r", "registry.example/x:1")),
            Ok(())
        );
        assert_eq!(check(&open(), "a", &team), Ok(()), "an empty list: none");
    }

    #[test]
    fn resources_within_the_namespaces_maximum() {
        let max = |namespace: Option<&str>, resource: &str, max: &str| ResourceMax {
            namespace: namespace.map(Into::into),
            resource: resource.into(),
            max: max.into(),
        };
        let policy = Policy {
            resource_max: vec![
                max(None, "memory", "8Gi"),
                max(Some("big"), "memory", "64Gi"),
                max(None, "deadline-seconds", "7200"),
            ],
            ..open()
        };
        let with = |memory: &str, deadline: Option<i64>| {
            let mut s = spec("github:o/r", "localhost/a:1");
            s.resources = Some(Box::new(BuildResources {
                limits: crate::crd::ResourceAmounts {
                    memory: Some(memory.into()),
                    ..Default::default()
                },
                deadline_seconds: deadline,
                ..Default::default()
            }));
            s
        };
        assert_eq!(check(&policy, "a", &with("8Gi", Some(7200))), Ok(()));
        let err = check(&policy, "a", &with("16Gi", None)).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.resources.limits.memory 16Gi is above the maximum 8Gi for namespace a"
        );
        assert_eq!(check(&policy, "big", &with("16Gi", None)), Ok(()));
        let err = check(&policy, "a", &with("1Gi", Some(7201))).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("spec.resources.deadlineSeconds 7201 is above the maximum 7200"),
            "{err}"
        );
        let err = check(&policy, "a", &with("lots", None)).unwrap_err();
        assert!(matches!(err, Denial::Quantity { .. }), "{err}");
    }

    #[test]
    fn namespaces_prefixes_and_tags() {
        let policy = Policy {
            allowed_namespaces: vec!["apps".into(), "ci".into()],
            flake_url_prefixes: vec!["git+https://nossa.ee/".into()],
            tag_rules: vec![
                TagRule {
                    namespace: None,
                    pattern: "nossa.ee/*".into(),
                },
                TagRule {
                    namespace: Some("ci".into()),
                    pattern: "localhost/ci-*:*".into(),
                },
            ],
            fetch_secret_namespaces: vec![],
            ..open()
        };
        let ok = spec("git+https://nossa.ee/~talya/chog", "nossa.ee/talya/chog:1");
        assert_eq!(check(&policy, "apps", &ok), Ok(()));
        assert!(
            check(&policy, "other", &ok)
                .unwrap_err()
                .to_string()
                .contains("namespace other is not in the allowed namespaces")
        );
        let err = check(&policy, "apps", &spec("github:evil/r", "nossa.ee/x:1")).unwrap_err();
        assert!(
            matches!(&err, Denial::FlakeUrl { url, .. } if url == "github:evil/r")
                && err
                    .to_string()
                    .contains("does not start with an allowed prefix"),
            "{err}"
        );
        let err = check(
            &policy,
            "apps",
            &spec("git+https://nossa.ee/a", "nginx:latest"),
        )
        .unwrap_err();
        assert!(
            matches!(&err, Denial::ImageTag { .. })
                && err
                    .to_string()
                    .contains("docker.io/library/nginx:latest matches no allowed pattern"),
            "{err}"
        );
        assert_eq!(
            check(
                &policy,
                "ci",
                &spec("git+https://nossa.ee/a", "localhost/ci-x:9")
            ),
            Ok(())
        );
        assert!(
            check(
                &policy,
                "apps",
                &spec("git+https://nossa.ee/a", "localhost/ci-x:9")
            )
            .is_err()
        );
    }

    #[test]
    fn only_listed_namespaces_may_name_a_fetch_secret() {
        let mut private = spec("git+ssh://git@git.example/r", "localhost/app:1");
        private.fetch_secret_ref = Some(crate::crd::SecretRef {
            name: "creds".into(),
        });
        let err = check(&Policy::default(), "team", &private).unwrap_err();
        assert_eq!(
            err.to_string(),
            "spec.fetchSecretRef: namespace team may not use fetch Secrets (allowed: none)"
        );
        let listed = Policy {
            fetch_secret_namespaces: vec!["team".into()],
            ..Default::default()
        };
        assert_eq!(check(&listed, "team", &private), Ok(()));
        assert!(check(&listed, "other", &private).is_err());
        let all = Policy {
            fetch_secret_namespaces: vec!["*".into()],
            ..Default::default()
        };
        assert_eq!(check(&all, "other", &private), Ok(()));
    }

    #[test]
    fn glob_matches() {
        for (p, t, want) in [
            ("*", "", true),
            ("a*", "abc", true),
            ("*c", "abc", true),
            ("a*c", "ac", true),
            ("a*b*c", "axbyc", true),
            ("a*c", "ab", false),
            ("abc", "abcd", false),
            ("a*a", "a", false),
        ] {
            assert_eq!(glob(p, t), want, "{p} ~ {t}");
        }
    }
}
