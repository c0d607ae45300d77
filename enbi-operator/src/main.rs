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
mod namespaces;
mod operator;
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
