//! `enbi-operator run` settings: every flag is also an environment variable (`ENBI_*`), which
//! is how the Timoni module configures the Deployment.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use clap::Args;
use enbi_core::defaults;
use enbi_core::job::{BuilderSettings, Cache, StoreMode};
use enbi_core::optin::PodBuildNamespaces;
use enbi_core::policy::{Policy, ResourceMax, TagRule};
use enbi_core::{gc, machine, resources, spread};
use k8s_openapi::api::core::v1::{EnvVar, ResourceRequirements, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// Checks one `--builder-tolerations` entry; an empty one (an empty ENBI_BUILDER_TOLERATIONS, as
/// the Timoni module sets by default) means none.
fn check_toleration(text: &str) -> Result<String, String> {
    if !text.is_empty() {
        parse_toleration(text)?;
    }
    Ok(text.to_owned())
}

/// Parses `key[=value][:Effect]`: `Equal` with a value, `Exists` without; no effect matches
/// every effect.
fn parse_toleration(text: &str) -> Result<Toleration, String> {
    let (rest, effect) = match text.rsplit_once(':') {
        Some((rest, effect)) => (rest, Some(effect)),
        None => (text, None),
    };
    if let Some(effect) = effect
        && !["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect)
    {
        return Err(format!(
            "{text:?}: the effect must be NoSchedule, PreferNoSchedule or NoExecute"
        ));
    }
    let (key, value) = match rest.split_once('=') {
        Some((key, value)) => (key, Some(value)),
        None => (rest, None),
    };
    if key.is_empty() {
        return Err(format!(
            "{text:?}: a toleration needs a key (key[=value][:Effect])"
        ));
    }
    Ok(Toleration {
        key: Some(key.to_owned()),
        operator: Some(if value.is_some() { "Equal" } else { "Exists" }.to_owned()),
        value: value.map(str::to_owned),
        effect: effect.map(str::to_owned),
        ..Default::default()
    })
}

/// Parses one `[namespace:]resource=quantity` entry of `--builder-requests`, `--builder-limits`
/// (no namespace there) or `--max-build-resources` (`deadline-seconds` too); an empty one means
/// none.
fn parse_amount(text: &str) -> Result<Option<ResourceMax>, String> {
    if text.is_empty() {
        return Ok(None);
    }
    let (scope, amount) = match text.split_once(':') {
        Some((namespace, amount)) => (Some(namespace.to_owned()), amount),
        None => (None, text),
    };
    let Some((resource, max)) = amount.split_once('=') else {
        return Err(format!("{text:?}: expected [namespace:]resource=quantity"));
    };
    let valid = if resource == resources::DEADLINE {
        max.parse::<i64>().is_ok_and(|s| s > 0)
    } else {
        resources::NAMES.contains(&resource) && resources::parse_quantity(max).is_some()
    };
    if !valid {
        return Err(format!(
            "{text:?}: the resource must be one of {}, {} (seconds) with a quantity such as 2, 500m or 4Gi",
            resources::NAMES.join(", "),
            resources::DEADLINE
        ));
    }
    Ok(Some(ResourceMax {
        namespace: scope,
        resource: resource.to_owned(),
        max: max.to_owned(),
    }))
}

/// Checks one `--max-build-resources` entry.
fn check_max(text: &str) -> Result<String, String> {
    parse_amount(text).map(|_| text.to_owned())
}

/// Checks one `--builder-requests` or `--builder-limits` entry: a container resource, for
/// every build.
fn check_amount(text: &str) -> Result<String, String> {
    match parse_amount(text)? {
        Some(a) if a.namespace.is_some() || a.resource == resources::DEADLINE => Err(format!(
            "{text:?}: expected resource=quantity with one of {}",
            resources::NAMES.join(", ")
        )),
        _ => Ok(text.to_owned()),
    }
}

/// The `resource=quantity` entries as a resource list.
fn amounts(entries: &[String]) -> Option<BTreeMap<String, Quantity>> {
    let list: BTreeMap<String, Quantity> = entries
        .iter()
        .filter_map(|e| parse_amount(e).ok().flatten())
        .map(|a| (a.resource, Quantity(a.max)))
        .collect();
    (!list.is_empty()).then_some(list)
}

#[derive(Debug, Clone, Args)]
pub struct RunArgs {
    /// Namespace the builder Jobs run in (must allow privileged Pods).
    #[arg(long, env = "ENBI_BUILD_NAMESPACE", default_value = defaults::BUILD_NAMESPACE)]
    pub build_namespace: String,
    /// ServiceAccount of the builder Pods (no API token is mounted).
    #[arg(
        long,
        env = "ENBI_BUILDER_SERVICE_ACCOUNT",
        default_value = defaults::BUILDER_SERVICE_ACCOUNT
    )]
    pub builder_service_account: String,
    /// Image of the builder (this binary plus Nix).
    #[arg(long, env = "ENBI_BUILDER_IMAGE", default_value = defaults::BUILDER_IMAGE)]
    pub builder_image: String,
    /// Nodes never to build on (comma-separated); the label enbi.hrzn.ee/repel does the same.
    #[arg(long, env = "ENBI_NODE_REPEL", value_delimiter = ',')]
    pub node_repel: Vec<String>,
    /// Taints the builder Pods tolerate, as `key[=value][:Effect]` (comma-separated); a node
    /// with a NoSchedule or NoExecute taint is used for builds only if it is tolerated.
    #[arg(long, env = "ENBI_BUILDER_TOLERATIONS", value_delimiter = ',', value_parser = check_toleration)]
    pub builder_tolerations: Vec<String>,
    /// Where builders keep their Nix store.
    #[arg(long, env = "ENBI_STORE_MODE", value_enum, default_value_t = StoreMode::Pod)]
    pub store_mode: StoreMode,
    /// With --store-mode pod: run builder Pods in a user namespace of their own (`hostUsers:
    /// false`), so that the build container's root is not root on the node, and Nix's sandbox
    /// on inside it. Needs Kubernetes >= 1.33, containerd >= 2.0 and runc >= 1.2 on the nodes;
    /// false for nodes that cannot (the build then runs as the node's root, without the sandbox).
    #[arg(
        long,
        env = "ENBI_BUILDER_USER_NAMESPACES",
        default_value_t = true,
        action = clap::ArgAction::Set
    )]
    pub builder_user_namespaces: bool,
    /// Binary caches builders substitute from, as Nix store URLs (comma-separated; Nix's
    /// extra-substituters). With --store-mode node-daemon the node's daemon uses only those it
    /// trusts (its trusted-substituters).
    #[arg(long, env = "ENBI_CACHE_SUBSTITUTERS", value_delimiter = ',')]
    pub cache_substituters: Vec<String>,
    /// Public keys of those caches, `name:base64` (comma-separated; extra-trusted-public-keys).
    #[arg(long, env = "ENBI_CACHE_TRUSTED_PUBLIC_KEYS", value_delimiter = ',')]
    pub cache_trusted_public_keys: Vec<String>,
    /// Binary cache every build's closure is copied to, as a Nix store URL (empty: none).
    #[arg(long, env = "ENBI_CACHE_PUSH_TO", default_value = "")]
    pub cache_push_to: String,
    /// Secret of the build namespace whose key `secret-key` (a Nix signing key) signs what is
    /// pushed (empty: unsigned).
    #[arg(long, env = "ENBI_CACHE_SIGNING_SECRET", default_value = "")]
    pub cache_signing_secret: String,
    /// containerd socket on the nodes.
    #[arg(
        long,
        env = "ENBI_CONTAINERD_SOCKET",
        default_value = defaults::CONTAINERD_SOCKET
    )]
    pub containerd_socket: String,
    /// containerd namespace of the kubelet's images.
    #[arg(long, env = "ENBI_CONTAINERD_NAMESPACE", default_value = defaults::CONTAINERD_NAMESPACE)]
    pub containerd_namespace: String,
    /// Seconds a builder may run, unless its NixBuild says (spec.resources.deadlineSeconds).
    #[arg(long, env = "ENBI_BUILD_TIMEOUT_SECONDS", default_value_t = defaults::BUILD_TIMEOUT_SECONDS)]
    pub build_timeout_seconds: i64,
    /// Requests of the build container, as `resource=quantity` for cpu, memory and
    /// ephemeral-storage (comma-separated; empty: none), unless its NixBuild says.
    #[arg(long, env = "ENBI_BUILDER_REQUESTS", value_delimiter = ',', value_parser = check_amount, default_value = defaults::BUILDER_REQUESTS)]
    pub builder_requests: Vec<String>,
    /// Limits of the build container, as `resource=quantity` (comma-separated; empty: none),
    /// unless its NixBuild says.
    #[arg(long, env = "ENBI_BUILDER_LIMITS", value_delimiter = ',', value_parser = check_amount, default_value = defaults::BUILDER_LIMITS)]
    pub builder_limits: Vec<String>,
    /// The most a NixBuild's spec.resources may ask for, as `[namespace:]resource=value` for
    /// cpu, memory, ephemeral-storage and deadline-seconds; a namespace's own entry replaces the
    /// global one for it (comma-separated; empty: no maximum).
    #[arg(long, env = "ENBI_MAX_BUILD_RESOURCES", value_delimiter = ',', value_parser = check_max, default_value = defaults::MAX_BUILD_RESOURCES)]
    pub max_build_resources: Vec<String>,
    /// Attempts per build for retryable failures.
    #[arg(long, env = "ENBI_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: u32,
    /// Builds running at once in the cluster (0: no limit).
    #[arg(long, env = "ENBI_MAX_CONCURRENT_BUILDS", default_value_t = 4)]
    pub max_concurrent_builds: usize,
    /// Builds running at once on one node (0: no limit).
    #[arg(long, env = "ENBI_MAX_BUILDS_PER_NODE", default_value_t = 1)]
    pub max_builds_per_node: usize,
    /// Succeeded NixBuilds kept per namespace.
    #[arg(long, env = "ENBI_KEEP_SUCCEEDED", default_value_t = 10)]
    pub keep_succeeded: usize,
    /// Failed NixBuilds kept per namespace.
    #[arg(long, env = "ENBI_KEEP_FAILED", default_value_t = 5)]
    pub keep_failed: usize,
    /// Delete finished NixBuilds older than this many seconds (0: no age limit).
    #[arg(long, env = "ENBI_MAX_AGE_SECONDS", default_value_t = 0)]
    pub max_age_seconds: u64,
    /// Keep a Succeeded NixBuild whose image a Pod uses, whatever the history limits, until this
    /// many seconds after the last such Pod is gone.
    #[arg(
        long,
        env = "ENBI_RETAIN_AFTER_LAST_USE_SECONDS",
        default_value_t = 86400
    )]
    pub retain_after_last_use_seconds: u64,
    /// Namespaces whose Pods are watched (comma-separated; empty: all).
    #[arg(long, env = "ENBI_WATCH_NAMESPACES", value_delimiter = ',')]
    pub watch_namespaces: Vec<String>,
    /// Namespaces whose annotated Pods may ask for builds: those labelled
    /// enbi.hrzn.ee/pod-builds=enabled, or all.
    #[arg(long, env = "ENBI_POD_BUILDS_NAMESPACES", value_enum, default_value_t = PodBuildNamespaces::Labelled)]
    pub pod_builds_namespaces: PodBuildNamespaces,
    /// Delete a Pod that waits in the kubelet's image pull back-off, on the node where its image
    /// was just loaded, when a ReplicaSet, StatefulSet or DaemonSet owns it: the new Pod starts
    /// at once instead of at the kubelet's next retry (up to 5 minutes later).
    #[arg(long, env = "ENBI_RECREATE_WAITING_PODS", default_value_t = true, action = clap::ArgAction::Set)]
    pub recreate_waiting_pods: bool,
    /// Namespaces allowed to build (comma-separated; empty: all).
    #[arg(long, env = "ENBI_ALLOWED_NAMESPACES", value_delimiter = ',')]
    pub allowed_namespaces: Vec<String>,
    /// Flake URL prefixes allowed (comma-separated; empty: all).
    #[arg(long, env = "ENBI_ALLOWED_FLAKE_PREFIXES", value_delimiter = ',')]
    pub allowed_flake_prefixes: Vec<String>,
    /// Namespaces whose NixBuilds may name a fetch Secret, `spec.fetchSecretRef`
    /// (comma-separated; empty: none; `*`: all). The operator needs `get` on Secrets there.
    #[arg(long, env = "ENBI_FETCH_SECRET_NAMESPACES", value_delimiter = ',')]
    pub fetch_secret_namespaces: Vec<String>,
    /// Image tag patterns allowed, `pattern` or `namespace=pattern`, `*` as wildcard
    /// (comma-separated; empty: all).
    #[arg(long, env = "ENBI_ALLOWED_IMAGE_TAGS", value_delimiter = ',')]
    pub allowed_image_tags: Vec<String>,
    /// Registries (`*` as wildcard, e.g. `*.gcr.io`) whose names a tag may use only where an
    /// --allowed-image-tags pattern for its namespace names the registry (comma-separated;
    /// empty: none protected).
    #[arg(long, env = "ENBI_PROTECTED_REGISTRIES", value_delimiter = ',', default_values = defaults::PROTECTED_REGISTRIES)]
    pub protected_registries: Vec<String>,
    /// Let a build replace a tag that already names another image.
    #[arg(long, env = "ENBI_ALLOW_TAG_OVERWRITE")]
    pub allow_tag_overwrite: bool,
    /// Do not pin loaded images (the kubelet's image GC may then remove them).
    #[arg(long, env = "ENBI_NO_PIN")]
    pub no_pin: bool,
    /// A mirror such as Spegel spreads images between nodes: enbi then loads an image only on
    /// its build node, never on the other nodes where Pods wait for it.
    #[arg(long, env = "ENBI_IMAGE_MIRROR")]
    pub image_mirror: bool,
    /// When a gated Pod's image is loaded, narrow its required node affinity to the nodes that
    /// hold the image (as it loses its gate), so that it starts at once; replicas then gather
    /// on those nodes. Ignored with --image-mirror.
    #[arg(long, env = "ENBI_NARROW_GATED_PODS", default_value_t = false, action = clap::ArgAction::Set, num_args = 0..=1, default_missing_value = "true")]
    pub narrow_gated_pods: bool,
    /// Seconds a Pod may still wait for an image on a node enbi loaded it on (the image was
    /// removed there, e.g. collected) before enbi loads it there again; each further reload of
    /// the same node waits twice as long (at most 64 times).
    #[arg(long, env = "ENBI_RELOAD_AFTER_SECONDS", default_value_t = 60)]
    pub reload_after_seconds: u64,
    /// Leave a deleted NixBuild's image on the nodes, pinned (otherwise enbi releases it: see
    /// README, "Images after their NixBuild").
    #[arg(long, env = "ENBI_KEEP_IMAGES_ON_DELETE")]
    pub keep_images_on_delete: bool,
    /// Seconds a deleted NixBuild waits for its image's release on every node before its
    /// finalizer goes anyway (a node that is gone or never answers; a Warning says which).
    #[arg(long, env = "ENBI_RELEASE_TIMEOUT_SECONDS", default_value_t = 120)]
    pub release_timeout_seconds: u64,
    /// Elect a leader through a Lease so that only one replica writes.
    #[arg(long, env = "ENBI_LEADER_ELECTION")]
    pub leader_election: bool,
    /// Namespace of the leader Lease (defaults to the operator's own, from POD_NAMESPACE).
    #[arg(long, env = "ENBI_LEASE_NAMESPACE")]
    pub lease_namespace: Option<String>,
    /// Seconds between garbage collection passes.
    #[arg(long, env = "ENBI_GC_INTERVAL_SECONDS", default_value_t = 30)]
    pub gc_interval_seconds: u64,
    /// The MutatingWebhookConfiguration whose CA bundle enbi keeps; when set, `run` serves the
    /// admission webhook that gates annotated Pods until their image is built (empty: none).
    #[arg(long, env = "ENBI_WEBHOOK_CONFIGURATION", default_value = "")]
    pub webhook_configuration: String,
    /// Address serving the admission webhook (HTTPS).
    #[arg(long, env = "ENBI_WEBHOOK_ADDRESS", default_value = "0.0.0.0:8443")]
    pub webhook_address: SocketAddr,
    /// Service in front of the webhook, in the operator's namespace ($POD_NAMESPACE): its names
    /// go into the serving certificate.
    #[arg(long, env = "ENBI_WEBHOOK_SERVICE", default_value = "enbi-webhook")]
    pub webhook_service: String,
    /// Other host names or IP addresses for the serving certificate (comma-separated).
    #[arg(long, env = "ENBI_WEBHOOK_HOSTS", value_delimiter = ',')]
    pub webhook_hosts: Vec<String>,
    /// Secret in the operator's namespace that holds the webhook's CA and certificate.
    #[arg(long, env = "ENBI_WEBHOOK_SECRET", default_value = "enbi-webhook-tls")]
    pub webhook_secret: String,
    /// Address serving /livez, /readyz and /metrics.
    #[arg(long, env = "ENBI_LISTEN_ADDRESS", default_value = "0.0.0.0:8080")]
    pub listen_address: SocketAddr,
}

impl RunArgs {
    /// Drops empty entries of the list settings: an empty environment variable (as the Timoni
    /// module sets for an empty list, e.g. `ENBI_ALLOWED_NAMESPACES=""`) reaches clap as one empty
    /// value, which would otherwise be a list of one empty name (allowing no namespace at all).
    pub fn without_empty_entries(mut self) -> Self {
        for list in [
            &mut self.node_repel,
            &mut self.builder_tolerations,
            &mut self.cache_substituters,
            &mut self.cache_trusted_public_keys,
            &mut self.watch_namespaces,
            &mut self.allowed_namespaces,
            &mut self.allowed_flake_prefixes,
            &mut self.fetch_secret_namespaces,
            &mut self.allowed_image_tags,
            &mut self.protected_registries,
            &mut self.builder_requests,
            &mut self.builder_limits,
            &mut self.max_build_resources,
            &mut self.webhook_hosts,
        ] {
            list.retain(|entry| !entry.trim().is_empty());
        }
        self
    }

    pub fn builder(&self) -> BuilderSettings {
        BuilderSettings {
            image: self.builder_image.clone(),
            namespace: self.build_namespace.clone(),
            service_account: self.builder_service_account.clone(),
            containerd_socket: self.containerd_socket.clone(),
            containerd_namespace: self.containerd_namespace.clone(),
            store: self.store_mode,
            user_namespaces: self.builder_user_namespaces,
            active_deadline_seconds: self.build_timeout_seconds,
            pin: !self.no_pin,
            resources: Some(ResourceRequirements {
                requests: amounts(&self.builder_requests),
                limits: amounts(&self.builder_limits),
                ..ResourceRequirements::default()
            })
            .filter(|r| r.requests.is_some() || r.limits.is_some()),
            allow_overwrite: self.allow_tag_overwrite,
            env: enbi_core::trace::builder_env(&std::env::vars().collect())
                .into_iter()
                .map(|(name, value)| EnvVar {
                    name,
                    value: Some(value),
                    ..EnvVar::default()
                })
                .collect(),
            tolerations: self
                .builder_tolerations
                .iter()
                .filter(|t| !t.is_empty())
                .filter_map(|t| parse_toleration(t).ok())
                .collect(),
            cache: Cache {
                substituters: self.cache_substituters.clone(),
                trusted_public_keys: self.cache_trusted_public_keys.clone(),
                push_to: Some(self.cache_push_to.clone()).filter(|s| !s.is_empty()),
                signing_secret: Some(self.cache_signing_secret.clone()).filter(|s| !s.is_empty()),
            },
            ..BuilderSettings::default()
        }
    }

    pub fn machine(&self) -> machine::Settings {
        machine::Settings {
            max_attempts: self.max_attempts.max(1),
            spread: spread::Settings {
                mirror: self.image_mirror,
                reload_after: Duration::from_secs(self.reload_after_seconds),
            },
            ..machine::Settings::default()
        }
    }

    /// How long a release may take, or `None` when images are kept on delete.
    pub fn release_timeout(&self) -> Option<Duration> {
        (!self.keep_images_on_delete)
            .then(|| Duration::from_secs(self.release_timeout_seconds.max(1)))
    }

    /// Whether gated Pods get their node affinity narrowed: asked for, and no mirror.
    pub fn narrow(&self) -> bool {
        self.narrow_gated_pods && !self.image_mirror
    }

    /// The admission webhook's settings, if it is served.
    pub fn webhook(&self) -> Option<crate::webhook::Settings> {
        if self.webhook_configuration.is_empty() {
            return None;
        }
        let namespace = std::env::var("POD_NAMESPACE").unwrap_or_else(|_| "default".into());
        let service = &self.webhook_service;
        let mut hosts = vec![
            service.clone(),
            format!("{service}.{namespace}"),
            format!("{service}.{namespace}.svc"),
            format!("{service}.{namespace}.svc.cluster.local"),
        ];
        hosts.extend(self.webhook_hosts.iter().cloned());
        Some(crate::webhook::Settings {
            address: self.webhook_address,
            configuration: self.webhook_configuration.clone(),
            secret: self.webhook_secret.clone(),
            namespace,
            hosts,
        })
    }

    pub fn gc(&self) -> gc::Limits {
        gc::Limits {
            keep_succeeded: self.keep_succeeded,
            keep_failed: self.keep_failed,
            max_age: (self.max_age_seconds > 0).then(|| Duration::from_secs(self.max_age_seconds)),
            retain_after_last_use: Duration::from_secs(self.retain_after_last_use_seconds),
        }
    }

    pub fn policy(&self) -> Policy {
        let tag_rules = self
            .allowed_image_tags
            .iter()
            .map(|rule| match rule.split_once('=') {
                Some((ns, pattern)) => TagRule {
                    namespace: Some(ns.into()),
                    pattern: pattern.into(),
                },
                None => TagRule {
                    namespace: None,
                    pattern: rule.clone(),
                },
            })
            .collect();
        Policy {
            allowed_namespaces: self.allowed_namespaces.clone(),
            flake_url_prefixes: self.allowed_flake_prefixes.clone(),
            tag_rules,
            fetch_secret_namespaces: self.fetch_secret_namespaces.clone(),
            protected_registries: self.protected_registries.clone(),
            resource_max: self
                .max_build_resources
                .iter()
                .filter_map(|m| parse_amount(m).ok().flatten())
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tolerations_parse_like_kubectl_taints() {
        let t = parse_toleration("enbi.test/real-node=true:NoSchedule").expect("valid");
        assert_eq!(
            (
                t.key.as_deref(),
                t.operator.as_deref(),
                t.value.as_deref(),
                t.effect.as_deref()
            ),
            (
                Some("enbi.test/real-node"),
                Some("Equal"),
                Some("true"),
                Some("NoSchedule")
            )
        );
        let t = parse_toleration("dedicated").expect("valid");
        assert_eq!(
            (t.operator.as_deref(), t.value, t.effect),
            (Some("Exists"), None, None)
        );
        let t = parse_toleration("dedicated:NoExecute").expect("valid");
        assert_eq!(t.effect.as_deref(), Some("NoExecute"));
        assert!(parse_toleration("dedicated:Sometimes").is_err());
        assert!(parse_toleration("=x").is_err());
        assert_eq!(check_toleration(""), Ok(String::new()), "empty: none");
    }

    #[test]
    fn empty_environment_lists_are_empty_lists() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        let args = Cli::try_parse_from([
            "run",
            "--allowed-namespaces",
            "",
            "--watch-namespaces",
            "",
            "--node-repel",
            "a,,b",
            "--builder-tolerations",
            "",
        ])
        .expect("parses")
        .run;
        assert_eq!(
            args.allowed_namespaces,
            [""],
            "what clap makes of an empty value"
        );
        let args = args.without_empty_entries();
        assert!(args.allowed_namespaces.is_empty());
        assert!(args.watch_namespaces.is_empty());
        assert!(args.builder_tolerations.is_empty());
        assert_eq!(args.node_repel, ["a", "b"]);
        assert!(args.policy().allowed_namespaces.is_empty());
        assert!(check_toleration("a:Sometimes").is_err());
    }

    /// `run`'s settings from `args`, as `main` makes them.
    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            run: RunArgs,
        }
        Cli::try_parse_from(std::iter::once("run").chain(args.iter().copied()))
            .map(|c| c.run.without_empty_entries())
    }

    #[test]
    fn resources_and_protected_registries_have_defaults_and_an_empty_list_turns_them_off() {
        let args = parse(&[]).expect("parses");
        let resources = args.builder().resources.expect("default resources");
        assert_eq!(
            resources.limits.expect("limits").get("memory"),
            Some(&Quantity("8Gi".into()))
        );
        let policy = args.policy();
        assert!(
            policy
                .protected_registries
                .contains(&"docker.io".to_owned())
        );
        assert!(
            policy
                .resource_max
                .iter()
                .any(|m| m.resource == "deadline-seconds")
        );
        let args = parse(&[
            "--protected-registries",
            "",
            "--builder-requests",
            "",
            "--builder-limits",
            "",
            "--max-build-resources",
            "team:memory=64Gi",
        ])
        .expect("parses");
        assert!(args.builder().resources.is_none());
        let policy = args.policy();
        assert!(policy.protected_registries.is_empty());
        assert_eq!(
            policy.resource_max,
            [ResourceMax {
                namespace: Some("team".into()),
                resource: "memory".into(),
                max: "64Gi".into()
            }]
        );
        assert!(parse(&["--builder-limits", "gpu=1"]).is_err());
        assert!(parse(&["--builder-limits", "team:cpu=1"]).is_err());
        assert!(parse(&["--max-build-resources", "cpu=lots"]).is_err());
        assert!(parse(&["--max-build-resources", "deadline-seconds=0"]).is_err());
    }

    #[test]
    fn narrowing_is_a_bare_flag_or_a_boolean_and_off_with_a_mirror() {
        let parse = |args: &[&str]| parse(args).expect("parses");
        assert!(!parse(&[]).narrow(), "off by default");
        assert!(parse(&["--narrow-gated-pods"]).narrow());
        assert!(parse(&["--narrow-gated-pods=true"]).narrow());
        assert!(!parse(&["--narrow-gated-pods=false"]).narrow());
        assert!(
            !parse(&["--narrow-gated-pods", "--image-mirror"]).narrow(),
            "ignored with a mirror"
        );
    }
}
