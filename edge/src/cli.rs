//! `kappa-edge`: command-line entry point (the binary is a thin wrapper).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::agent::Agent;
use crate::config::EdgeConfig;
use crate::log::EdgeLog;

/// The Kappa IoT edge agent: MQTT in, durable SQLite log, batches forwarded to the cloud.
///
/// Examples:
///   kappa-edge run --config deploy/edge/gateway.toml
///   kappa-edge config check --config deploy/edge/gateway.toml
///   kappa-edge log stats --config deploy/edge/gateway.toml
///   kappa-edge log export --config gw.toml --from 2026-11-26T00:00:00Z --format csv
#[derive(Debug, Parser)]
#[command(name = "kappa-edge", version, verbatim_doc_comment)]
pub struct Args {
    /// Configuration file (TOML); see deploy/edge/gateway.toml.
    #[arg(long, short, global = true, env = "KAPPA_EDGE_CONFIG", default_value = "kappa-edge.toml")]
    pub config: PathBuf,
    /// Log format: text or json.
    #[arg(long, global = true, default_value = "text")]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent until SIGINT/SIGTERM.
    Run,
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the durable log (safe while the agent runs).
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and check the configuration; report every problem.
    Check,
}

#[derive(Debug, Subcommand)]
pub enum LogCommand {
    /// Size, backlog, oldest unforwarded reading, quarantine and dead letters (JSON).
    Stats,
    /// SQLite integrity check plus the log's own invariants; exit 1 on problems.
    Check,
    /// Write readings in an event-time range as JSON lines or CSV.
    Export {
        /// Start of the range: RFC 3339 or Unix milliseconds (default: the beginning).
        #[arg(long)]
        from: Option<String>,
        /// End of the range, exclusive (default: the end).
        #[arg(long)]
        to: Option<String>,
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum ExportFormat {
    /// One reading per line, as JSON.
    Jsonl,
    /// One metric value per line: device,boot,seq,ts_ms,metric,value.
    Csv,
}

/// Runs `kappa-edge` with the process arguments.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `kappa-edge` with `args` (the first is the program name).
pub fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args = Args::parse_from(args);
    // rumqttd logs every ordinary client disconnect at ERROR from this target.
    kappa_runtime::logging::init(&args.log_format, "info,rumqttd=warn,rumqttd::server::broker=off,rumqttc=warn");
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kappa-edge: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Run => {
            let cfg = load(&args.config)?;
            if let Err(e) = kappa_runtime::limits::raise_open_files() {
                tracing::warn!(error = %e, "Cannot raise the open-file limit.");
            }
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                Agent::start(cfg).await?.run_until_signal().await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Config(ConfigCommand::Check) => {
            load(&args.config)?;
            println!("{}: ok", args.config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(cmd) => {
            let cfg = load(&args.config)?;
            let log = EdgeLog::open_read_only(&cfg.log_path())?;
            log_command(&log, cmd)
        }
    }
}

fn load(path: &Path) -> anyhow::Result<EdgeConfig> {
    Ok(EdgeConfig::load(path)?)
}

fn log_command(log: &EdgeLog, cmd: LogCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        LogCommand::Stats => {
            println!("{}", serde_json::to_string_pretty(&log.stats()?)?);
            Ok(ExitCode::SUCCESS)
        }
        LogCommand::Check => {
            let problems = log.check()?;
            for p in &problems {
                println!("problem: {p}");
            }
            if problems.is_empty() {
                println!("ok");
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::FAILURE)
            }
        }
        LogCommand::Export { from, to, format, output } => {
            let from = from.as_deref().map(parse_time).transpose()?.unwrap_or(i64::MIN);
            let to = to.as_deref().map(parse_time).transpose()?.unwrap_or(i64::MAX);
            let mut out: Box<dyn Write> = match &output {
                Some(p) => {
                    Box::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?)
                }
                None => Box::new(std::io::stdout().lock()),
            };
            let mut out = std::io::BufWriter::new(&mut out);
            if matches!(format, ExportFormat::Csv) {
                writeln!(out, "device,boot,seq,ts_ms,metric,value")?;
            }
            let n = log.export(from, to, |r| match format {
                ExportFormat::Jsonl => {
                    serde_json::to_writer(&mut out, &r)?;
                    writeln!(out)
                }
                ExportFormat::Csv => {
                    for (name, value) in &r.metrics {
                        let v = value.map(|v| v.to_string()).unwrap_or_default();
                        writeln!(out, "{},{},{},{},{},{}", r.device, r.boot, r.seq, r.ts_ms, name, v)?;
                    }
                    Ok(())
                }
            })?;
            out.flush()?;
            eprintln!("exported {n} readings");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// RFC 3339 or Unix milliseconds.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t =
        humantime::parse_rfc3339_weak(s).with_context(|| format!("{s:?} is neither RFC 3339 nor Unix milliseconds"))?;
    Ok(t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0))
}
