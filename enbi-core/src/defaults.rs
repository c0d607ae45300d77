//! Default settings, written once: the operator's flags, the builder's own flags and
//! `BuilderSettings::default` all take them from here (the Timoni module's values restate them
//! for users, and its tests render them).

/// Namespace the builder Jobs run in.
pub const BUILD_NAMESPACE: &str = "enbi-builds";
/// ServiceAccount of the builder Pods.
pub const BUILDER_SERVICE_ACCOUNT: &str = "enbi-builder";
/// The image the repository's flake builds, loaded onto nodes like any enbi image.
pub const BUILDER_IMAGE: &str = concat!("localhost/enbi:", env!("CARGO_PKG_VERSION"));
/// containerd's socket on a kubeadm-style node.
pub const CONTAINERD_SOCKET: &str = "/run/containerd/containerd.sock";
/// containerd namespace of the kubelet's images.
pub const CONTAINERD_NAMESPACE: &str = "k8s.io";
/// The Nix daemon's socket on a node that runs one.
pub const NIX_DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";
/// Seconds a builder Job may run (its `activeDeadlineSeconds`).
pub const BUILD_TIMEOUT_SECONDS: i64 = 3600;
/// Seconds a finished builder Job is kept.
pub const JOB_TTL_SECONDS: i32 = 3600;
/// The `emptyDir` the build and load containers share, and the FIFO in it.
pub const HANDOFF_DIR: &str = "/run/enbi";
pub const IMAGE_PIPE: &str = "/run/enbi/image";
/// Where the `build` container finds the build's fetch credentials (`fetch`), when it has any.
pub const FETCH_CREDENTIALS_DIR: &str = "/run/enbi-fetch";
/// Where the `build` container finds the key that signs what it pushes to a binary cache.
pub const CACHE_SIGNING_KEY_DIR: &str = "/run/enbi-cache";
/// Seconds the build container's evaluation and build may take, and the load container waits
/// for its result, when the Job does not say (it always does: 3/4 of its deadline).
pub const BUILDER_BUILD_TIMEOUT_SECONDS: u64 = 3000;
/// Seconds streaming and importing may take, when the Job does not say (1/6 of its deadline).
pub const BUILDER_IMPORT_TIMEOUT_SECONDS: u64 = 900;
/// Registries a tag may name only where the policy says so: the public ones, whose images
/// Pods pull by name (a mirror such as Spegel serves a node's copy to every node).
pub const PROTECTED_REGISTRIES: &[&str] = &[
    "docker.io",
    "ghcr.io",
    "quay.io",
    "registry.k8s.io",
    "gcr.io",
    "*.gcr.io",
    "*.pkg.dev",
    "public.ecr.aws",
    "*.amazonaws.com",
    "mcr.microsoft.com",
    "*.azurecr.io",
    "registry.gitlab.com",
    "nvcr.io",
    "cgr.dev",
    "registry.redhat.io",
];
/// The build container's requests and limits by default (`--builder-requests`,
/// `--builder-limits`): enough for a small image, capped so that one build cannot take a node.
pub const BUILDER_REQUESTS: &str = "cpu=250m,memory=512Mi,ephemeral-storage=1Gi";
pub const BUILDER_LIMITS: &str = "cpu=4,memory=8Gi,ephemeral-storage=20Gi";
/// The most a NixBuild's `spec.resources` may ask for by default (`--max-build-resources`).
pub const MAX_BUILD_RESOURCES: &str =
    "cpu=8,memory=32Gi,ephemeral-storage=100Gi,deadline-seconds=14400";
