//! Fetch credentials: a Secret in a NixBuild's namespace (`spec.fetchSecretRef`) that lets the
//! builder fetch a private flake. Builder Jobs run in the build namespace, and a Pod mounts
//! Secrets of its own namespace only, so the operator copies the keys it knows into a Secret
//! beside each Job, owned by that Job (gone with it), and mounts it into the `build` container
//! alone: the `load` container, which holds the containerd socket, never sees it. Messages name
//! the Secret and its keys, never a value.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;

use crate::crd::SecretRef;
use crate::keys;
use crate::validation::SECRET_NAME;

/// Nix's `access-tokens` setting: `host=token` pairs (GitHub, GitLab and Gitea APIs).
pub const ACCESS_TOKENS: &str = "access-tokens";
/// A netrc file: HTTP basic auth for git over HTTP(S) and Nix's own downloads.
pub const NETRC: &str = "netrc";
/// An SSH private key for `git+ssh://` (the key of a `kubernetes.io/ssh-auth` Secret).
pub const SSH_PRIVATE_KEY: &str = "ssh-privatekey";
/// The SSH hosts' keys; required with [`SSH_PRIVATE_KEY`]: an unknown host is never trusted.
pub const KNOWN_HOSTS: &str = "known_hosts";
/// Every key enbi copies; any other key of the Secret stays where it is.
pub const KEYS: [&str; 4] = [ACCESS_TOKENS, NETRC, SSH_PRIVATE_KEY, KNOWN_HOSTS];

/// Why a build cannot use its fetch Secret. Each names the Secret and the flake URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error(
        "Secret {namespace}/{name} (spec.fetchSecretRef) does not exist; it holds the credentials to fetch {url}"
    )]
    Missing {
        namespace: String,
        name: String,
        url: String,
    },
    #[error(
        "Secret {namespace}/{name} (spec.fetchSecretRef) has none of the keys {}, so it cannot help fetch {url}",
        KEYS.join(", ")
    )]
    NoKnownKey {
        namespace: String,
        name: String,
        url: String,
    },
    #[error(
        "Secret {namespace}/{name} (spec.fetchSecretRef) has {SSH_PRIVATE_KEY} but no {KNOWN_HOSTS}, needed to fetch {url}: enbi never trusts an unknown SSH host"
    )]
    NoKnownHosts {
        namespace: String,
        name: String,
        url: String,
    },
    #[error("cannot read Secret {namespace}/{name} (spec.fetchSecretRef) to fetch {url}: {error}")]
    Unreadable {
        namespace: String,
        name: String,
        url: String,
        error: String,
    },
}

/// The credentials to copy from a Secret's `data` (`None`: no such Secret), or why they cannot
/// be used.
pub fn usable(
    namespace: &str,
    name: &str,
    url: &str,
    data: Option<&BTreeMap<String, ByteString>>,
) -> Result<BTreeMap<String, ByteString>, Unusable> {
    let (namespace, name, url) = (namespace.to_owned(), name.to_owned(), url.to_owned());
    let Some(data) = data else {
        return Err(Unusable::Missing {
            namespace,
            name,
            url,
        });
    };
    let known: BTreeMap<String, ByteString> = data
        .iter()
        .filter(|(key, value)| KEYS.contains(&key.as_str()) && !value.0.is_empty())
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    if known.is_empty() {
        return Err(Unusable::NoKnownKey {
            namespace,
            name,
            url,
        });
    }
    if known.contains_key(SSH_PRIVATE_KEY) && !known.contains_key(KNOWN_HOSTS) {
        return Err(Unusable::NoKnownHosts {
            namespace,
            name,
            url,
        });
    }
    Ok(known)
}

/// The fetch Secret a namespace names for the builds its Pods ask for (its annotation
/// [`keys::NAMESPACE_FETCH_SECRET`]): `Err` with the problem when the value is no Secret name.
pub fn of_namespace(annotations: &BTreeMap<String, String>) -> Result<Option<SecretRef>, String> {
    let Some(name) = annotations.get(keys::NAMESPACE_FETCH_SECRET) else {
        return Ok(None);
    };
    SECRET_NAME
        .check(name)
        .map(|()| Some(SecretRef { name: name.clone() }))
        .map_err(|e| format!("annotation {} {e}", keys::NAMESPACE_FETCH_SECRET))
}

/// The copy of the credentials for `job`, named as the Job (its Pod mounts it by that name),
/// owned by it so that the Job's deletion takes it along.
pub fn copy(job: &Job, credentials: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(job.name_any()),
            namespace: job.namespace(),
            labels: Some(job.labels().clone()),
            owner_references: Some(vec![OwnerReference {
                api_version: "batch/v1".into(),
                kind: "Job".into(),
                name: job.name_any(),
                uid: job.uid().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: None,
            }]),
            ..Default::default()
        },
        data: Some(credentials),
        type_: Some("Opaque".into()),
        immutable: Some(true),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, ByteString> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), ByteString(v.as_bytes().to_vec())))
            .collect()
    }

    #[test]
    fn only_known_non_empty_keys_are_copied() {
        let secret = data(&[
            (NETRC, "machine git.example login u password p"),
            (ACCESS_TOKENS, ""),
            ("other", "stays"),
        ]);
        let copied = usable("ns", "creds", "git+https://git.example/r", Some(&secret)).unwrap();
        assert_eq!(copied.keys().collect::<Vec<_>>(), [NETRC]);
    }

    #[test]
    fn unusable_secrets_say_which_and_why_without_values() {
        let url = "git+ssh://git@git.example/r";
        let cases = [
            (None, "does not exist"),
            (Some(data(&[("token", "s3cret")])), "has none of the keys"),
            (Some(data(&[(SSH_PRIVATE_KEY, "s3cret")])), "no known_hosts"),
        ];
        for (secret, why) in cases {
            let error = usable("team", "creds", url, secret.as_ref())
                .unwrap_err()
                .to_string();
            assert!(error.contains("Secret team/creds"), "{error}");
            assert!(error.contains(url), "{error}");
            assert!(error.contains(why), "{error}");
            assert!(!error.contains("s3cret"), "{error}");
        }
    }

    #[test]
    fn a_namespace_names_a_valid_secret_or_says_why_not() {
        let annotated = |v: &str| BTreeMap::from([(keys::NAMESPACE_FETCH_SECRET.into(), v.into())]);
        assert_eq!(of_namespace(&BTreeMap::new()), Ok(None));
        assert_eq!(
            of_namespace(&annotated("creds")),
            Ok(Some(SecretRef {
                name: "creds".into()
            }))
        );
        let error = of_namespace(&annotated("Not/A Name")).unwrap_err();
        assert!(
            error.starts_with("annotation enbi.hrzn.ee/fetch-secret must be"),
            "{error}"
        );
    }

    #[test]
    fn the_copy_belongs_to_its_job() {
        let job = Job {
            metadata: ObjectMeta {
                name: Some("app-1a2b3c-1".into()),
                namespace: Some("enbi-builds".into()),
                uid: Some("u-1".into()),
                labels: Some(BTreeMap::from([(keys::BUILD_NAME.into(), "app".into())])),
                ..Default::default()
            },
            ..Default::default()
        };
        let secret = copy(&job, data(&[(NETRC, "n")]));
        assert_eq!(secret.metadata.name.as_deref(), Some("app-1a2b3c-1"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("enbi-builds"));
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!((owner.kind.as_str(), owner.uid.as_str()), ("Job", "u-1"));
        assert_eq!(secret.metadata.labels, job.metadata.labels);
    }
}
