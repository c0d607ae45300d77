//! Image references as containerd's CRI sees them.
//!
//! The kubelet asks for `nginx`; containerd stores `docker.io/library/nginx:latest`. Pods,
//! annotations and NixBuilds compare and store references in this normalised form, so the image
//! the builder imports is the very one the kubelet looks for.

use sha2::{Digest, Sha256};

/// Registry implied by a reference without a domain.
const DEFAULT_DOMAIN: &str = "docker.io";

/// The fully qualified form of an image reference: domain, `library/` for official images,
/// `:latest` when neither tag nor digest is given. Anything unparsable is returned as is (it
/// then matches nothing but itself).
///
/// The domain is the first component, as distribution/reference's `splitDockerDomain` decides:
/// when a `/` follows it and it is `localhost` or has a `.`, a `:` or an uppercase letter (Docker
/// Hub namespaces are lowercase); otherwise the image is on Docker Hub. Like
/// `ParseNormalizedNamed`, a tag and a digest given together are both kept.
pub fn normalise(reference: &str) -> String {
    let reference = reference.trim();
    let (name, digest) = match reference.split_once('@') {
        Some((n, d)) => (n, Some(d)),
        None => (reference, None),
    };
    // A tag is a ':' after the last '/', so `host:5000/app` has none.
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let (path, tag) = match name[last_slash..].rfind(':') {
        Some(i) => (&name[..last_slash + i], Some(&name[last_slash + i + 1..])),
        None => (name, None),
    };
    let (domain, remainder) = match path.split_once('/') {
        Some((first, rest)) if is_domain(first) => (first, rest.to_owned()),
        Some(_) => (DEFAULT_DOMAIN, path.to_owned()),
        None => (DEFAULT_DOMAIN, format!("library/{path}")),
    };
    let domain = if domain == "index.docker.io" {
        DEFAULT_DOMAIN
    } else {
        domain
    };
    let remainder = match (domain, remainder.contains('/')) {
        (DEFAULT_DOMAIN, false) => format!("library/{remainder}"),
        _ => remainder,
    };
    match (tag, digest) {
        (Some(t), Some(d)) => format!("{domain}/{remainder}:{t}@{d}"),
        (Some(t), None) => format!("{domain}/{remainder}:{t}"),
        (None, Some(d)) => format!("{domain}/{remainder}@{d}"),
        (None, None) => format!("{domain}/{remainder}:latest"),
    }
}

/// Whether the first component of a reference with more than one names a registry.
fn is_domain(first: &str) -> bool {
    first == "localhost" || first.contains(['.', ':']) || first.to_lowercase() != first
}

/// Whether two references name the same image once normalised.
pub fn same_image(a: &str, b: &str) -> bool {
    normalise(a) == normalise(b)
}

/// Registry host and repository path of a normalised reference, as Spegel's
/// `containerd.io/distribution.source.<registry>=<repository>` label needs them.
pub fn registry_and_repository(reference: &str) -> (String, String) {
    let normal = normalise(reference);
    let name = normal.split('@').next().unwrap_or_default();
    let last_slash = name.rfind('/').map_or(0, |i| i + 1);
    let path = match name[last_slash..].rfind(':') {
        Some(i) => &name[..last_slash + i],
        None => name,
    };
    match path.split_once('/') {
        Some((registry, repository)) => (registry.to_owned(), repository.to_owned()),
        None => (DEFAULT_DOMAIN.to_owned(), path.to_owned()),
    }
}

/// `<registry>/<repository>@<digest>`: the digest reference a pull through the CRI leaves next
/// to the tag, which the loader creates and a release removes.
pub fn digest_reference(tag: &str, digest: &str) -> String {
    let (registry, repository) = registry_and_repository(tag);
    format!("{registry}/{repository}@{digest}")
}

/// The chain ID of an image's layers (its config's `rootfs.diff_ids`), as the OCI image spec
/// defines it: the key of the top layer's snapshot, which every container of the image has as
/// its snapshot's parent.
pub fn chain_id<S: AsRef<str>>(diff_ids: &[S]) -> Option<String> {
    let (first, rest) = diff_ids.split_first()?;
    Some(rest.iter().fold(first.as_ref().to_owned(), |chain, diff| {
        sha256_digest(&Sha256::digest(
            format!("{chain} {}", diff.as_ref()).as_bytes(),
        ))
    }))
}

/// A SHA-256 hash as a digest: `sha256:<hex>`.
pub fn sha256_digest(hash: &[u8]) -> String {
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn digest_references_use_the_normalised_repository() {
        assert_eq!(
            digest_reference("x:1", "sha256:ab"),
            "docker.io/library/x@sha256:ab"
        );
        assert_eq!(
            digest_reference("localhost:5000/a/b:t", "sha256:ab"),
            "localhost:5000/a/b@sha256:ab"
        );
    }

    #[test]
    fn chain_ids_chain_the_diff_ids() {
        let [a, b, c] = ["a", "b", "c"].map(|x| format!("sha256:{}", x.repeat(64)));
        assert_eq!(chain_id::<String>(&[]), None);
        assert_eq!(chain_id(std::slice::from_ref(&a)), Some(a.clone()));
        // sha256("<a> <b>"), then sha256("<that> <c>"), computed outside Rust.
        assert_eq!(
            chain_id(&[&a, &b]).as_deref(),
            Some("sha256:ccd722928bd92476ba1745586fed6e45a102504185ad88cd89e01ff116fd146c")
        );
        assert_eq!(
            chain_id(&[a, b, c]).as_deref(),
            Some("sha256:c1377126441fb2f5ec2c21ae2a60255331d639e830f0ee1b40a36e52d4c40588")
        );
    }

    const D: &str = "sha256:707b2b90f3f21c5cccad07429f51e1a37b9833d4ff87b323786d7cb246b8360c";

    #[test]
    fn normalises_like_containerd() {
        for (given, want) in [
            ("nginx", "docker.io/library/nginx:latest"),
            ("nginx:1.27", "docker.io/library/nginx:1.27"),
            ("library/nginx", "docker.io/library/nginx:latest"),
            ("docker.io/nginx", "docker.io/library/nginx:latest"),
            (
                "index.docker.io/library/nginx:1",
                "docker.io/library/nginx:1",
            ),
            ("team/app:v1", "docker.io/team/app:v1"),
            ("localhost/enbi:0.1.0", "localhost/enbi:0.1.0"),
            ("localhost:5000/app", "localhost:5000/app:latest"),
            ("nossa.ee/talya/chog:f5d5", "nossa.ee/talya/chog:f5d5"),
            (
                "registry.example:443/a/b/c:t",
                "registry.example:443/a/b/c:t",
            ),
            // An uppercase first component is a registry, not a Docker Hub namespace.
            ("Foo/bar:1", "Foo/bar:1"),
            ("Registry.Example/app:1", "Registry.Example/app:1"),
            ("[::1]:5000/app:1", "[::1]:5000/app:1"),
            ("[2001:db8::1]/team/app:1", "[2001:db8::1]/team/app:1"),
            ("192.168.1.10:5000/app:v1", "192.168.1.10:5000/app:v1"),
            ("docker.io/app:1", "docker.io/library/app:1"),
            ("index.docker.io/app:1", "docker.io/library/app:1"),
            ("team/app__x:1", "docker.io/team/app__x:1"),
            // No `/`: a Docker Hub name with a tag, not a registry.
            ("localhost:5000", "docker.io/library/localhost:5000"),
            // Not a host (`_`): distribution keeps it as the path, with no domain; the text is the same.
            ("my_registry.example/app:1", "my_registry.example/app:1"),
        ] {
            assert_eq!(normalise(given), want, "{given}");
        }
        assert_eq!(
            normalise(&format!("app@{D}")),
            format!("docker.io/library/app@{D}")
        );
        assert_eq!(
            normalise(&format!("r.example/app:v1@{D}")),
            format!("r.example/app:v1@{D}")
        );
    }

    #[test]
    fn compares_normalised() {
        assert!(same_image("nginx", "docker.io/library/nginx:latest"));
        assert!(!same_image("nginx:1", "nginx:2"));
        assert!(!same_image("a.example/app:v1", "b.example/app:v1"));
    }

    #[test]
    fn splits_registry_and_repository() {
        assert_eq!(
            registry_and_repository("nginx:1"),
            ("docker.io".into(), "library/nginx".into())
        );
        assert_eq!(
            registry_and_repository("localhost:5000/a/b:t"),
            ("localhost:5000".into(), "a/b".into())
        );
        assert_eq!(
            registry_and_repository(&format!("r.example/app@{D}")),
            ("r.example".into(), "app".into())
        );
        assert_eq!(
            registry_and_repository("Foo/bar:1"),
            ("Foo".into(), "bar".into())
        );
        assert_eq!(
            registry_and_repository("[::1]:5000/a/b:t"),
            ("[::1]:5000".into(), "a/b".into())
        );
        // distribution gives no domain here (the path is the whole name); the label keeps the
        // registry as the text before the first `/`, as for every other name.
        assert_eq!(
            registry_and_repository("my_registry.example/app:1"),
            ("my_registry.example".into(), "app".into())
        );
    }

    proptest! {
        #[test]
        fn normalising_is_idempotent(r in "([a-z0-9.:-]{1,12}/){0,3}[a-z0-9._-]{1,12}(:[a-z0-9._-]{1,10})?") {
            let once = normalise(&r);
            prop_assert_eq!(normalise(&once), once.clone());
            prop_assert!(same_image(&r, &once));
        }

        #[test]
        fn never_panics(r in "\\PC{0,200}") {
            let _ = normalise(&r);
            let _ = registry_and_repository(&r);
        }
    }
}
