//! Deterministic, DNS-safe names.
//!
//! Names are pure functions of what they stand for, so a retried or restarted operator computes
//! the same name and finds the object it already made instead of making a second one: however many
//! Pods ask for one build, they map to one NixBuild; one attempt of one NixBuild maps to one Job.

use sha2::{Digest, Sha256};

use crate::crd::NixBuildSpec;

/// Longest DNS-1123 label, and so the longest Job name (its Pods carry it as a label value).
pub const MAX_NAME: usize = 63;

/// The NixBuild name for a build request: a readable stem from the image name plus a hash of
/// the whole spec, so equal requests always share it and different ones never collide in practice.
pub fn nixbuild_name(spec: &NixBuildSpec) -> String {
    let repository = spec.image_tag.split(['@']).next().unwrap_or_default();
    let last = repository.rsplit('/').next().unwrap_or_default();
    let stem = last.split(':').next().unwrap_or_default();
    let hash = short_hash(&[
        &spec.flake_url,
        &spec.package_name,
        &spec.image_tag,
        &spec.system,
    ]);
    join(stem, &hash, 40)
}

/// The builder Job name for one attempt of one NixBuild. The UID keeps a recreated NixBuild of the
/// same name from adopting an old Job; the namespace is in the hash because all Jobs share one
/// build namespace.
pub fn job_name(namespace: &str, name: &str, uid: &str, attempt: u32) -> String {
    let hash = short_hash(&[namespace, name, uid]);
    join(name, &format!("{hash}-{attempt}"), 40)
}

/// The Job name for load `round` of `build` on `node` (see `spread`): the node is in the hash,
/// `l` tells it from an attempt.
pub fn load_job_name(namespace: &str, name: &str, uid: &str, node: &str, round: u32) -> String {
    let hash = short_hash(&[namespace, name, uid, node]);
    join(name, &format!("{hash}-l{round}"), 40)
}

/// The Job name for the release of a deleted build's image on `node` (see `release`): one per
/// node, `r` tells it from a load.
pub fn release_job_name(namespace: &str, name: &str, uid: &str, node: &str) -> String {
    let hash = short_hash(&[namespace, name, uid, node]);
    join(name, &format!("{hash}-r"), 40)
}

/// `<sanitised stem, at most max_stem chars>-<suffix>`, a valid DNS-1123 label.
fn join(stem: &str, suffix: &str, max_stem: usize) -> String {
    let stem = sanitise(stem, max_stem);
    let name = format!("{stem}-{suffix}");
    debug_assert!(name.len() <= MAX_NAME);
    name
}

/// Lowercase alphanumerics and single dashes, starting with a letter, at most `max` chars.
fn sanitise(raw: &str, max: usize) -> String {
    let mut out = String::with_capacity(raw.len().min(max));
    for c in raw.chars().map(|c| c.to_ascii_lowercase()) {
        if out.len() == max {
            break;
        }
        match c {
            'a'..='z' => out.push(c),
            '0'..='9' if !out.is_empty() => out.push(c),
            _ if !out.is_empty() && !out.ends_with('-') => out.push('-'),
            _ => {}
        }
    }
    let trimmed = out.trim_end_matches('-');
    if trimmed.is_empty() {
        "build".to_owned()
    } else {
        trimmed.to_owned()
    }
}

/// First 10 hex digits of SHA-256 over the parts, NUL-separated (a stable hash, unlike std's).
fn short_hash(parts: &[&str]) -> String {
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    hasher.finalize()[..5]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Whether `name` is a DNS-1123 label (what Kubernetes requires of Job and label-value names).
pub fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_NAME
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn spec(tag: &str) -> NixBuildSpec {
        NixBuildSpec {
            flake_url: "github:o/r".into(),
            package_name: "p".into(),
            image_tag: tag.into(),
            system: "x86_64-linux".into(),
            fetch_secret_ref: None,
            resources: None,
        }
    }

    #[test]
    fn nixbuild_names_read_like_the_image() {
        let name = nixbuild_name(&spec("nossa.ee/talya/chog:f5d5"));
        assert!(name.starts_with("chog-"), "{name}");
        assert_eq!(name.len(), "chog-".len() + 10);
        assert!(nixbuild_name(&spec("localhost:5000/App_2:v1")).starts_with("app-2-"));
        assert!(nixbuild_name(&spec("9lives:1")).starts_with("lives-"));
    }

    #[test]
    fn equal_requests_share_a_name_and_different_ones_do_not() {
        assert_eq!(nixbuild_name(&spec("a:1")), nixbuild_name(&spec("a:1")));
        assert_ne!(nixbuild_name(&spec("a:1")), nixbuild_name(&spec("a:2")));
        let mut other = spec("a:1");
        other.system = "aarch64-linux".into();
        assert_ne!(nixbuild_name(&spec("a:1")), nixbuild_name(&other));
    }

    #[test]
    fn job_names_change_with_attempt_and_uid() {
        let first = job_name("ns", "chog-5d74cd57bb", "uid-1", 1);
        assert!(
            first.starts_with("chog-5d74cd57bb-") && first.ends_with("-1"),
            "{first}"
        );
        assert_eq!(first, job_name("ns", "chog-5d74cd57bb", "uid-1", 1));
        assert_ne!(first, job_name("ns", "chog-5d74cd57bb", "uid-1", 2));
        assert_ne!(first, job_name("ns", "chog-5d74cd57bb", "uid-2", 1));
        assert_ne!(first, job_name("other", "chog-5d74cd57bb", "uid-1", 1));
    }

    #[test]
    fn load_job_names_differ_per_node_and_round_and_from_attempts() {
        let a = load_job_name("ns", "chog-5d74cd57bb", "uid-1", "node-a", 1);
        assert!(a.ends_with("-l1"), "{a}");
        assert_ne!(
            a,
            load_job_name("ns", "chog-5d74cd57bb", "uid-1", "node-b", 1)
        );
        assert_ne!(
            a,
            load_job_name("ns", "chog-5d74cd57bb", "uid-1", "node-a", 2)
        );
        assert_ne!(a, job_name("ns", "chog-5d74cd57bb", "uid-1", 1));
    }

    proptest! {
        #[test]
        fn job_names_are_dns_labels(ns in "[a-z0-9-]{1,63}", name in "\\PC{0,253}", uid in "\\PC{0,40}", attempt in 0u32..) {
            let job = job_name(&ns, &name, &uid, attempt);
            prop_assert!(is_dns_label(&job), "{job}");
        }

        #[test]
        fn load_job_names_are_dns_labels(name in "\\PC{0,253}", node in "\\PC{0,253}", round in 0u32..) {
            let job = load_job_name("ns", &name, "uid", &node, round);
            prop_assert!(is_dns_label(&job), "{job}");
        }

        #[test]
        fn nixbuild_names_are_dns_labels(tag in "\\PC{0,300}", flake in "\\PC{0,50}") {
            let mut s = spec(&tag);
            s.flake_url = flake;
            let name = nixbuild_name(&s);
            prop_assert!(is_dns_label(&name), "{name}");
        }
    }
}
