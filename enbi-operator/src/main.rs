//! `enbi-operator`: the operator binary. Decisions live in `enbi-core`; this crate does the I/O.

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use enbi_core::crd::NixBuild;
use kube::CustomResourceExt;

mod builder;
mod config;
mod controller;
mod error;
mod gc;
mod http;
mod leader;
mod metrics;
mod operator;
mod pods;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Builds container images from Nix flakes into the nodes' containerd"
)]
struct Cli {
    /// Log line format.
    #[arg(long, env = "ENBI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the NixBuild CustomResourceDefinition as YAML (the only source of the CRD).
    Crd,
    /// Run the operator: the NixBuild controller, the Pod watcher and garbage collection.
    Run(Box<config::RunArgs>),
    /// Build a flake's image into the node's containerd (runs inside a build Job).
    Build(Box<builder::BuildArgs>),
}

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Build(args) => builder::run(*args),
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
        Command::Run(args) => {
            init_logs(cli.log_format);
            let result = tokio::runtime::Runtime::new()
                .map_err(Into::into)
                .and_then(|rt| rt.block_on(operator::run(args.without_empty_entries())));
            match result {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "enbi-operator stopped");
                    ExitCode::FAILURE
                }
            }
        }
    }
}
