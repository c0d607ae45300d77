//! `enbi-operator`: the operator binary. Decisions live in `enbi-core`; this crate does the I/O.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use enbi_core::crd::NixBuild;
use kube::CustomResourceExt;

use crate::telemetry::LogFormat;

mod builder;
mod config;
mod controller;
mod error;
mod gc;
mod http;
mod leader;
mod metrics;
#[cfg(test)]
mod mock;
mod operator;
mod optin;
mod patch;
mod pods;
mod telemetry;
mod waiting;
mod watch;
mod webhook;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Builds container images from Nix flakes into the nodes' containerd"
)]
struct Cli {
    /// Log line format. Spans are exported over OTLP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set; see README, "Observability".
    #[arg(long, env = "ENBI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the NixBuild CustomResourceDefinition as YAML (the only source of the CRD).
    Crd,
    /// Run the operator: the NixBuild controller, the Pod watcher and garbage collection.
    Run(Box<config::RunArgs>),
    /// Build a flake's image into the image pipe (a builder Pod's `build` container).
    Build(Box<builder::BuildArgs>),
    /// Load the image from the image pipe into the node's containerd (a builder Pod's `load`
    /// container).
    Load(Box<builder::LoadArgs>),
    /// Release a deleted NixBuild's image on this node: unpin it and remove its references,
    /// unless a container uses it (a release Job's container).
    Release(Box<builder::ReleaseArgs>),
}

/// Runs `work` with logs and span export set up, then flushes the spans. The runtime carries
/// the gRPC exporter (and the operator); it outlives `work` so the flush can still send.
fn traced(
    format: LogFormat,
    service_name: &'static str,
    work: impl FnOnce(&tokio::runtime::Runtime, bool) -> ExitCode,
) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = {
        let _entered = runtime.enter();
        telemetry::init(format, service_name)
    };
    let code = work(&runtime, telemetry.exporting());
    telemetry.shutdown();
    code
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Build(args) => traced(cli.log_format, "enbi-builder", |_, _| {
            builder::run_build(*args)
        }),
        Command::Load(args) => traced(cli.log_format, "enbi-loader", |_, _| {
            builder::run_load(*args)
        }),
        Command::Release(args) => traced(cli.log_format, "enbi-releaser", |_, _| {
            builder::run_release(*args)
        }),
        Command::Crd => match serde_yaml::to_string(&NixBuild::crd()) {
            Ok(yaml) => {
                print!("{yaml}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: cannot serialise the CRD: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Run(args) => traced(cli.log_format, "enbi-operator", |rt, tracing| {
            match rt.block_on(operator::run(args.without_empty_entries(), tracing)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "enbi-operator stopped");
                    ExitCode::FAILURE
                }
            }
        }),
    }
}

#[cfg(test)]
mod tests {
    use enbi_core::crd::NixBuildSpec;
    use enbi_core::job::{self, BuilderSettings, Purpose, StoreMode};
    use k8s_openapi::api::core::v1::{Affinity, Container};

    use super::*;

    /// Parses a rendered container's arguments as the builder binary does.
    fn parse(container: &Container) -> Command {
        let args = container.args.clone().unwrap_or_default();
        let argv = std::iter::once("enbi-operator".to_owned()).chain(args);
        Cli::try_parse_from(argv)
            .unwrap_or_else(|e| panic!("{}: {e}", container.name))
            .command
    }

    /// The Job enbi-core renders and the flags this binary parses are one contract: every
    /// argument the Job passes is a flag of `build`/`load`, with the value the build asked for.
    #[test]
    fn the_jobs_arguments_are_the_builders_flags() {
        for (store, pin, overwrite, fetch_secret) in [
            (StoreMode::Pod, true, false, None),
            (StoreMode::NodeDaemon, false, true, Some("creds")),
        ] {
            let build = NixBuild::new(
                "app",
                NixBuildSpec {
                    flake_url: "git+https://example.test/app?rev=1".into(),
                    package_name: "app.stream".into(),
                    image_tag: "example.test/app:v1".into(),
                    system: "aarch64-linux".into(),
                    fetch_secret_ref: fetch_secret
                        .map(|name| enbi_core::crd::SecretRef { name: name.into() }),
                    resources: None,
                },
            );
            let settings = BuilderSettings {
                store,
                pin,
                allow_overwrite: overwrite,
                containerd_socket: "/run/k3s/containerd/containerd.sock".into(),
                ..BuilderSettings::default()
            };
            for purpose in [
                Purpose::Build(1),
                Purpose::Load {
                    node: "n1".into(),
                    round: 2,
                },
            ] {
                let job = job::render(&build, &purpose, Affinity::default(), None, &settings);
                let containers = job
                    .spec
                    .and_then(|s| s.template.spec)
                    .map(|s| s.containers)
                    .unwrap_or_default();
                let of = |name: &str| {
                    containers
                        .iter()
                        .find(|c| c.name == name)
                        .unwrap_or_else(|| panic!("container {name}"))
                };
                let Command::Build(b) = parse(of(job::BUILD_CONTAINER)) else {
                    panic!("the build container runs `build`")
                };
                assert_eq!(b.flake_url, build.spec.flake_url);
                assert_eq!(b.package_name, build.spec.package_name);
                assert_eq!(b.system, build.spec.system);
                assert_eq!(b.store, store);
                assert_eq!(
                    b.fetch_credentials.is_some(),
                    fetch_secret.is_some(),
                    "{store:?}"
                );
                let Command::Load(l) = parse(of(job::LOAD_CONTAINER)) else {
                    panic!("the load container runs `load`")
                };
                assert_eq!(l.image_tag, build.spec.image_tag);
                assert_eq!(l.image_pipe, b.image_pipe, "one pipe for both");
                assert_eq!(
                    l.containerd.address.to_str(),
                    Some(settings.containerd_socket.as_str())
                );
                assert_eq!(l.containerd.namespace, settings.containerd_namespace);
                assert_eq!((l.pin, l.allow_overwrite), (pin, overwrite));
                assert_eq!(l.build_timeout, b.build_timeout);
                let deadline = u64::try_from(settings.active_deadline_seconds).unwrap_or(0);
                assert!(
                    b.build_timeout + l.import_timeout < deadline,
                    "the builder stops itself before the Job's deadline"
                );
            }
            let mut built = build.clone();
            built.status = Some(enbi_core::crd::NixBuildStatus {
                image_digest: Some(format!("sha256:{}", "d".repeat(64))),
                build_node: Some("n1".into()),
                ..Default::default()
            });
            let plan = enbi_core::release::plan(&built, []).expect("a plan");
            let job = job::render_release(&built, &plan.target("n1").expect("n1"), 120, &settings);
            let container = job
                .spec
                .and_then(|s| s.template.spec)
                .map(|s| s.containers[0].clone())
                .expect("a container");
            let Command::Release(r) = parse(&container) else {
                panic!("the release container runs `release`")
            };
            assert_eq!(r.image_tag, plan.tag);
            assert_eq!(Some(&r.image_digest), plan.nodes.get("n1"));
            assert!(!r.keep_digest_reference);
            assert_eq!(
                r.containerd.address.to_str(),
                Some(settings.containerd_socket.as_str())
            );
            assert_eq!(r.containerd.namespace, settings.containerd_namespace);
        }
    }
}
