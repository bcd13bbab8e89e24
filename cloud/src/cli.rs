//! `kappa-cloud`: command-line entry point (the binary is a thin wrapper).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::CloudConfig;
use crate::node::Node;
use crate::store::ViewStore;

/// The Kappa IoT cloud tier: ingest into the event log, stream processing, views and query API.
///
/// Examples:
///   kappa-cloud run --config deploy/cloud/single-node.toml
///   kappa-cloud config check --config deploy/cloud/single-node.toml
///   kappa-cloud views dump --config deploy/cloud/single-node.toml
#[derive(Debug, Parser)]
#[command(name = "kappa-cloud", version, verbatim_doc_comment)]
pub struct Args {
    /// Configuration file (TOML); see deploy/cloud/single-node.toml.
    #[arg(long, short, global = true, env = "KAPPA_CLOUD_CONFIG", default_value = "kappa-cloud.toml")]
    pub config: PathBuf,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a single node until SIGINT/SIGTERM.
    Run,
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// View tools.
    #[command(subcommand)]
    Views(ViewsCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and check the configuration; report every problem.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum ViewsCommand {
    /// Print every row of every view version, then the late log, in a
    /// canonical order: two dumps of the same log are byte-identical.
    Dump,
}

/// Runs `kappa-cloud` with the process arguments.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `kappa-cloud` with `args` (the first is the program name).
pub fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args = Args::parse_from(args);
    kappa_runtime::logging::init(&args.log_format, "info");
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kappa-cloud: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = load(&args.config)?;
    match args.command {
        Command::Run => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                Node::start(cfg).await?.run_until_signal().await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Config(ConfigCommand::Check) => {
            println!("{}: ok", args.config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Views(ViewsCommand::Dump) => {
            let store = ViewStore::open_read_only(&cfg.data_dir.join("views.sqlite"))?;
            print!("{}# late\n{}", store.dump()?, store.dump_late()?);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(path: &Path) -> anyhow::Result<CloudConfig> {
    Ok(CloudConfig::load(path)?)
}
