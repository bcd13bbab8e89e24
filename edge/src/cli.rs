//! `kappa-edge`: command-line entry point (the binary is a thin wrapper).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use crate::agent::Agent;
use crate::config::EdgeConfig;
use crate::log::{EdgeLog, Which};
use crate::now_ms;

/// The Kappa IoT edge agent: MQTT in, durable SQLite log, batches forwarded to the cloud.
///
/// Examples:
///   kappa-edge run --config deploy/edge/gateway.toml
///   kappa-edge config check --config deploy/edge/gateway.toml
///   kappa-edge log stats --config deploy/edge/gateway.toml
///   kappa-edge log export --config gw.toml --from 2026-11-26T00:00:00Z --format csv
///   kappa-edge mosquitto credentials --output creds --device sensor-1 --device sensor-2
///
/// Exit codes (the same in kappa-cloud and kappa-sim; docs/operations.md):
/// 0 success; 1 `log check` found problems; 2 the command could not run;
/// 141 the output pipe closed (`| head`).
#[derive(Debug, Parser)]
#[command(name = "kappa-edge", version, verbatim_doc_comment)]
pub struct Args {
    /// Configuration file (TOML); see deploy/edge/gateway.toml.
    #[arg(long, short, global = true, env = "KAPPA_EDGE_CONFIG", default_value = "kappa-edge.toml")]
    pub config: PathBuf,
    /// Log format on standard error: text or json.
    #[arg(long, global = true, env = "KAPPA_LOG_FORMAT", default_value = "text", value_parser = kappa_runtime::cli::LOG_FORMATS)]
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
    /// Inspect the durable log (safe while the agent runs; `compact` pauses its commits).
    #[command(subcommand)]
    Log(LogCommand),
    /// Lock an external Mosquitto down for the fleet (no config needed).
    #[command(subcommand)]
    Mosquitto(MosquittoCommand),
}

#[derive(Debug, Subcommand)]
pub enum MosquittoCommand {
    /// Write DIR/kappa.passwd (a login per device and one for the agent),
    /// DIR/kappa.acl (deny by default: each device writes only its own
    /// telemetry topic, the agent reads them all) and DIR/new-credentials.csv
    /// (the passwords created now, 0600). Existing logins are kept.
    ///
    /// Examples:
    ///   kappa-edge mosquitto credentials --output /etc/mosquitto/kappa --devices devices.txt
    ///   kappa-edge mosquitto credentials --output creds --device sensor-1 --device sensor-2
    #[command(verbatim_doc_comment)]
    Credentials {
        /// Directory for the files (`--out` is accepted too).
        #[arg(long, short, alias = "out")]
        output: PathBuf,
        /// A file with one device id per line (`#` starts a comment).
        #[arg(long)]
        devices: Option<PathBuf>,
        /// A device id (repeatable).
        #[arg(long = "device")]
        device: Vec<String>,
        /// The agent's login (its mqtt.username).
        #[arg(long, default_value = "kappa-edge")]
        agent_user: String,
        /// The agent's mqtt.topic_prefix.
        #[arg(long, default_value = "")]
        topic_prefix: String,
        /// The group the broker runs as: the password file becomes 0640 and
        /// that group's ("" for 0600, owner only).
        #[arg(long, default_value = "mosquitto")]
        group: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and check the configuration, and what `run` needs from the machine
    /// (data directory writable, files readable, certificates and keys that
    /// parse and match, environment variables set), without starting
    /// anything; report every problem.
    Check {
        /// Check the file only, not this machine (files, directories,
        /// environment variables): for a config that runs elsewhere, such
        /// as a pod's, whose certificates are mounted there.
        #[arg(long)]
        no_environment: bool,
    },
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
        /// jsonl (one reading per line, as JSON) or csv (one metric value per line).
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Send the raw readings of an event-time range that stayed local
    /// (forward.mode aggregate or hybrid). The running agent picks them up;
    /// each reading is sent once however often this is asked.
    Backfill {
        /// Start of the range: RFC 3339 or Unix milliseconds.
        #[arg(long)]
        from: String,
        /// End of the range, exclusive.
        #[arg(long)]
        to: String,
    },
    /// Batches the cloud refused (HTTP 400, 415, 422; or 413 for a single
    /// reading): they stay in the log until resent or released.
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Rewrite the log compactly (VACUUM) and give free space back to the
    /// filesystem. Needs free space about the log's size; while it runs the
    /// agent's commits wait (readings queue and are acknowledged after).
    Compact,
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// Every dead letter, one JSON object per line: batch id, kind, reading
    /// ids, how many readings it holds, when and why the cloud refused it.
    List,
    /// The readings of one dead letter (`--batch`) or all, as JSON lines or CSV.
    Export {
        #[command(flatten)]
        which: DeadLetterChoice,
        /// jsonl (one reading per line, as JSON) or csv (one metric value per line).
        #[arg(long, value_enum, default_value_t = ExportFormat::Jsonl)]
        format: ExportFormat,
        /// Output file (default: standard output).
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Queue dead letters for the cloud again, as new batches (fix what the
    /// cloud refused first: its limits, its version). The running agent
    /// sends them; refused again, they come back here.
    Resend {
        #[command(flatten)]
        which: DeadLetterChoice,
    },
    /// Give up on dead letters: the agent deletes their readings at its next
    /// housekeeping pass and counts them in
    /// kappa_edge_readings_shed_total{reason="released"}.
    Release {
        #[command(flatten)]
        which: DeadLetterChoice,
    },
}

/// One dead letter or all of them.
#[derive(Debug, clap::Args)]
#[group(required = true, multiple = false)]
pub struct DeadLetterChoice {
    /// The dead letter's batch id (from `list`).
    #[arg(long)]
    batch: Option<u64>,
    /// Every dead letter.
    #[arg(long)]
    all: bool,
}

impl DeadLetterChoice {
    fn which(&self) -> Which {
        match self.batch {
            Some(b) if !self.all => Which::Batch(b),
            _ => Which::All,
        }
    }
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
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            // Help and usage go to a pipe too (`--help | head`).
            kappa_runtime::cli::end_quietly_on_closed_pipe();
            e.exit()
        }
    };
    // rumqttd logs every ordinary client disconnect at ERROR from this target.
    kappa_runtime::logging::init(&args.log_format, "info,rumqttc=warn");
    if !matches!(args.command, Command::Run) {
        kappa_runtime::cli::end_quietly_on_closed_pipe();
    }
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kappa-edge: {e:#}");
            ExitCode::from(kappa_runtime::cli::EXIT_FAILED)
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
            // Two arenas for the runtime's threads and the log's blocking
            // calls: memory freed by one is reused by the others, not kept per thread.
            kappa_runtime::memory::limit_arenas(2);
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                Agent::start(cfg).await?.run_until_signal().await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Config(ConfigCommand::Check { no_environment }) => {
            // What `run` checks before it starts, without starting anything.
            let cfg = load(&args.config)?;
            let problems = if no_environment { Vec::new() } else { crate::agent::preflight(&cfg) };
            if !problems.is_empty() {
                let e = anyhow::Error::new(kappa_runtime::config::ConfigError(problems));
                return Err(e.context(format!("{}: run would refuse it", args.config.display())));
            }
            println!("{}: ok", args.config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Log(cmd) => log_command(&load(&args.config)?, cmd),
        Command::Mosquitto(MosquittoCommand::Credentials {
            output,
            devices,
            device,
            agent_user,
            topic_prefix,
            group,
        }) => {
            let gid = match group.as_str() {
                "" => None,
                name => Some(crate::mosquitto::group_id(name).ok_or_else(|| {
                    anyhow::anyhow!("--group {name}: no such group (pass --group \"\" for an owner-only file)")
                })?),
            };
            let mut ids = device;
            if let Some(file) = devices {
                let text =
                    std::fs::read_to_string(&file).map_err(|e| anyhow::anyhow!("--devices {}: {e}", file.display()))?;
                ids.extend(
                    text.lines()
                        .map(|l| l.split('#').next().unwrap_or("").trim())
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
            }
            if ids.is_empty() {
                anyhow::bail!("name the devices: --device ID (repeatable) or --devices FILE");
            }
            let w = crate::mosquitto::write_credentials(&output, &agent_user, &ids, &topic_prefix, gid)?;
            println!(
                "wrote {} ({} logins kept, {} created) and {}",
                w.passwd.display(),
                w.kept,
                w.created.len(),
                w.acl.display()
            );
            if let Some(csv) = w.new_credentials {
                println!("the new passwords are in {} (0600): hand them to the devices, then delete it", csv.display());
            }
            println!(
                "Mosquitto needs:\n  allow_anonymous false\n  password_file {}\n  acl_file {}",
                w.passwd.display(),
                w.acl.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(path: &Path) -> anyhow::Result<EdgeConfig> {
    Ok(EdgeConfig::load(path)?)
}

/// Writes readings to `output` (or standard output) as JSON lines or CSV, with `fill`.
fn write_readings(
    output: Option<&Path>,
    format: ExportFormat,
    fill: impl FnOnce(&mut dyn FnMut(kappa_common::Reading) -> std::io::Result<()>) -> anyhow::Result<u64>,
) -> anyhow::Result<u64> {
    let mut out: Box<dyn Write> = match output {
        Some(p) => Box::new(std::fs::File::create(p).with_context(|| format!("cannot create {}", p.display()))?),
        None => Box::new(std::io::stdout().lock()),
    };
    let mut out = std::io::BufWriter::new(&mut out);
    if matches!(format, ExportFormat::Csv) {
        writeln!(out, "device,boot,seq,ts_ms,metric,value")?;
    }
    let n = fill(&mut |r| match format {
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
    Ok(n)
}

fn dead_letter_command(cfg: &EdgeConfig, cmd: DeadLetterCommand) -> anyhow::Result<ExitCode> {
    let path = cfg.log_path();
    match cmd {
        DeadLetterCommand::List => {
            for d in EdgeLog::open_read_only(&path)?.dead_letters()? {
                println!("{}", serde_json::to_string(&d)?);
            }
        }
        DeadLetterCommand::Export { which, format, output } => {
            let log = EdgeLog::open_read_only(&path)?;
            let n =
                write_readings(output.as_deref(), format, |each| Ok(log.export_dead_letters(which.which(), each)?))?;
            eprintln!("exported {n} readings");
        }
        DeadLetterCommand::Resend { which } => {
            let mut log = open_existing(cfg)?;
            let queued = log.resend_dead_letters(which.which(), now_ms())?;
            let readings: u64 = queued.iter().map(|e| e.count).sum();
            println!("{}", serde_json::json!({ "batches": queued.len(), "readings": readings }));
        }
        DeadLetterCommand::Release { which } => {
            let released = open_existing(cfg)?.release_dead_letters(which.which(), now_ms())?;
            println!("{}", serde_json::json!({ "released": released }));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The log for writing, which must exist already.
fn open_existing(cfg: &EdgeConfig) -> anyhow::Result<EdgeLog> {
    let path = cfg.log_path();
    if !path.exists() {
        anyhow::bail!("no edge log at {}", path.display());
    }
    Ok(EdgeLog::open(&path, cfg.log.durability)?)
}

fn log_command(cfg: &EdgeConfig, cmd: LogCommand) -> anyhow::Result<ExitCode> {
    let path = cfg.log_path();
    if let LogCommand::DeadLetters(cmd) = cmd {
        return dead_letter_command(cfg, cmd);
    }
    if let LogCommand::Backfill { from, to } = &cmd {
        let (from, to) = (parse_time(from)?, parse_time(to)?);
        let mut log = open_existing(cfg)?;
        let (batches, readings) = log.request_backfill(from, to, cfg.forward.max_batch_readings, now_ms())?;
        println!("{}", serde_json::json!({ "batches": batches, "readings": readings }));
        return Ok(ExitCode::SUCCESS);
    }
    if let LogCommand::Compact = cmd {
        let mut log = open_existing(cfg)?;
        let before = log.usage()?;
        log.compact()?;
        let after = log.usage()?;
        println!("{}", serde_json::to_string_pretty(&serde_json::json!({ "before": before, "after": after }))?);
        return Ok(ExitCode::SUCCESS);
    }
    let log = EdgeLog::open_read_only(&path)?;
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
                Ok(ExitCode::from(kappa_runtime::cli::EXIT_NO))
            }
        }
        LogCommand::Compact | LogCommand::Backfill { .. } | LogCommand::DeadLetters(_) => Ok(ExitCode::SUCCESS),
        LogCommand::Export { from, to, format, output } => {
            let from = from.as_deref().map(parse_time).transpose()?.unwrap_or(i64::MIN);
            let to = to.as_deref().map(parse_time).transpose()?.unwrap_or(i64::MAX);
            let n = write_readings(output.as_deref(), format, |each| Ok(log.export(from, to, each)?))?;
            eprintln!("exported {n} readings");
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// RFC 3339 or Unix milliseconds.
fn parse_time(s: &str) -> anyhow::Result<i64> {
    kappa_runtime::time::parse_time(s).map_err(anyhow::Error::msg)
}
