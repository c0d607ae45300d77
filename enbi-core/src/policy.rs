//! Who may build what. A NixBuild writes an image into a node's containerd under any tag it
//! names, so the operator checks, before anything runs: the namespace, the flake URL's prefix,
//! and the image tag against patterns (optionally per namespace). Empty lists allow everything,
//! except fetch Secrets, which only the namespaces listed may name.

use crate::crd::NixBuildSpec;
use crate::reference;

/// An image tag pattern, for one namespace or all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TagRule {
    /// `None` applies everywhere.
    pub namespace: Option<String>,
    /// Glob over the normalised reference: `*` matches any run of characters.
    pub pattern: String,
}

/// The operator's build policy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub allowed_namespaces: Vec<String>,
    pub flake_url_prefixes: Vec<String>,
    pub tag_rules: Vec<TagRule>,
    /// Namespaces whose builds may name a fetch Secret (`spec.fetchSecretRef`); empty: none,
    /// `*`: all. The operator reads those Secrets, so the list is opt-in.
    pub fetch_secret_namespaces: Vec<String>,
}

/// Why the policy refuses a build; its message names the field and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denial {
    #[error("namespace {namespace} is not in the allowed namespaces ({})", allowed.join(", "))]
    Namespace {
        namespace: String,
        allowed: Vec<String>,
    },
    #[error("flake URL {url} does not start with an allowed prefix ({})", prefixes.join(", "))]
    FlakeUrl { url: String, prefixes: Vec<String> },
    #[error("image tag {tag} matches no allowed pattern for namespace {namespace} ({})", patterns.join(", "))]
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
    let rules: Vec<&TagRule> = policy
        .tag_rules
        .iter()
        .filter(|r| r.namespace.as_deref().is_none_or(|n| n == namespace))
        .collect();
    let tag = reference::normalise(&spec.image_tag);
    if !rules.is_empty() && !rules.iter().any(|r| glob(&r.pattern, &tag)) {
        return Err(Denial::ImageTag {
            tag,
            namespace: namespace.to_owned(),
            patterns: rules.iter().map(|r| r.pattern.clone()).collect(),
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
        }
    }

    #[test]
    fn empty_policy_allows_everything() {
        assert_eq!(
            check(&Policy::default(), "any", &spec("github:o/r", "nginx:1")),
            Ok(())
        );
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
