//! `enbi-operator`: the operator binary. Decisions live in `enbi-core`; this crate does the I/O.

mod builder;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use enbi_core::crd::NixBuild;
use kube::CustomResourceExt;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Builds container images from Nix flakes into the nodes' containerd"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print the NixBuild CustomResourceDefinition as YAML (the only source of the CRD).
    Crd,
    /// Build a flake's image into the node's containerd (runs inside a build Job).
    Build(Box<builder::BuildArgs>),
}

fn main() -> ExitCode {
    match Cli::parse().command {
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
    }
}
