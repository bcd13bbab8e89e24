//! `kappa-cloud`: command-line entry point (the binary is a thin wrapper).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use kappa_runtime::cli::{EXIT_FAILED, EXIT_NO};

use crate::admin;
use crate::config::CloudConfig;
use crate::node::Node;

/// The Kappa IoT cloud tier: ingest into the event log, stream processing, views and query API.
///
/// Examples:
///   kappa-cloud run --config deploy/cloud/single-node.toml
///   kappa-cloud worker --config deploy/cloud/cluster.toml
///   kappa-cloud config check --config deploy/cloud/single-node.toml
///   kappa-cloud views list --config deploy/cloud/single-node.toml
///   kappa-cloud views compare device_metrics 1 2 --config single-node.toml
///   kappa-cloud views promote device_metrics 2 --config single-node.toml
///   kappa-cloud archive status --config single-node.toml
///
/// Exit codes (the same in kappa-edge and kappa-sim; docs/operations.md):
/// 0 success (and, for compare and verify, "equal"); 1 the views differ,
/// or the archive is damaged; 2 the command could not run; 141 the output
/// pipe closed (`| head`).
#[derive(Debug, Parser)]
#[command(name = "kappa-cloud", version, verbatim_doc_comment)]
pub struct Args {
    /// Configuration file (TOML); see deploy/cloud/single-node.toml.
    #[arg(long, short, global = true, env = "KAPPA_CLOUD_CONFIG", default_value = "kappa-cloud.toml")]
    pub config: PathBuf,
    /// Log format on standard error: text or json.
    #[arg(long, global = true, env = "KAPPA_LOG_FORMAT", default_value = "text", value_parser = kappa_runtime::cli::LOG_FORMATS)]
    pub log_format: String,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a single node until SIGINT/SIGTERM.
    Run,
    /// Run a processor worker of a cluster ([cluster]; docs/cluster.md) until SIGINT/SIGTERM.
    Worker,
    /// Configuration tools.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// View versions: list, compare, promote, roll back, drop, verify, watch a replay.
    #[command(subcommand)]
    Views(ViewsCommand),
    /// The archive of the event log.
    #[command(subcommand)]
    Archive(ArchiveCommand),
    /// A local certificate authority for development and tests (no config needed).
    #[command(subcommand)]
    Pki(PkiCommand),
    /// Credentials for [auth] (no config needed).
    #[command(subcommand)]
    Auth(AuthCommand),
}

#[derive(Debug, Subcommand)]
pub enum PkiCommand {
    /// Create a CA (DIR/ca.pem, DIR/ca.key) for development and tests.
    ///
    /// Example: kappa-cloud pki init --dir pki
    #[command(verbatim_doc_comment)]
    Init {
        /// The CA's directory: ca.pem and ca.key go here.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
    },
    /// Issue DIR/NAME.pem and DIR/NAME.key signed by the CA in DIR.
    ///
    /// Examples:
    ///   kappa-cloud pki issue --dir pki --kind server --name cloud --san cloud.example --san 127.0.0.1
    ///   kappa-cloud pki issue --dir pki --kind gateway --name gw-0001
    ///   kappa-cloud pki issue --dir pki --kind device --name sensor-17
    #[command(verbatim_doc_comment)]
    Issue {
        /// The CA's directory (from `pki init`): NAME.pem and NAME.key go here too.
        #[arg(long, default_value = "pki")]
        dir: PathBuf,
        /// What the certificate is for: a server, a gateway or a device.
        #[arg(long, value_enum)]
        kind: crate::pki::Kind,
        /// The certificate's name (file name and common name).
        #[arg(long)]
        name: String,
        /// A DNS name or IP address the server answers on (repeatable; default: NAME).
        #[arg(long = "san")]
        sans: Vec<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuthCommand {
    /// Print a new random token and the [auth] entry that stores its hash.
    ///
    /// Examples:
    ///   kappa-cloud auth token --gateway gw-0001
    ///   kappa-cloud auth token --api grafana --role read
    #[command(verbatim_doc_comment)]
    Token {
        /// A gateway credential for this gateway id.
        #[arg(long, conflicts_with = "api")]
        gateway: Option<String>,
        /// An API token with this name.
        #[arg(long)]
        api: Option<String>,
        /// The API token's role: read or admin.
        #[arg(long, default_value = "read")]
        role: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Parse and check the configuration, and what `run` needs from the machine
    /// (data directory writable, the HTTPS certificate and key that parse and
    /// match, PostgreSQL's connection string and CA file), without starting
    /// anything or connecting anywhere; report every problem.
    Check {
        /// Check the file only, not this machine (files, directories,
        /// environment variables): for a config that runs elsewhere, such
        /// as a pod's, whose certificates are mounted there.
        #[arg(long)]
        no_environment: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ViewsCommand {
    /// Every view version: state (building, live, failed, retired), what each name serves, position and lag.
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Compare two versions of a view: row counts, per-aggregate totals, first differing rows. Exit 0 when equal.
    Compare {
        /// The view's name.
        name: String,
        /// One version.
        a: u32,
        /// The other version.
        b: u32,
        /// How many differing rows to show.
        #[arg(long, default_value_t = 10)]
        examples: usize,
    },
    /// Serve VERSION of NAME from now on (atomic for readers).
    Promote {
        /// The view's name.
        name: String,
        /// The version to serve.
        version: u32,
    },
    /// Serve the version NAME served before its last promotion.
    Rollback {
        /// The view's name.
        name: String,
    },
    /// Remove a retired version (not in the config, not served) and its rows.
    Drop {
        /// The view's name.
        name: String,
        /// The retired version to remove.
        version: u32,
    },
    /// Recompute a view with the independent batch path over archive + log and diff it with the live rows. Exit 0 when equal.
    Verify {
        /// NAME (the version served) or NAME@VERSION.
        view: String,
    },
    /// Show a version's replay progress (offsets done, rate, ETA) until it is live.
    Watch {
        /// NAME@VERSION.
        view: String,
    },
    /// Print rows (and the late log) in a canonical order: two dumps of the same log are byte-identical.
    Dump {
        /// Only this version (NAME@VERSION), without its id, so versions compare byte for byte.
        #[arg(long)]
        view: Option<String>,
        /// Also print the alerts with their history, and the merged edge aggregates.
        #[arg(long, conflicts_with = "view")]
        alerts: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ArchiveCommand {
    /// Per partition: segments, records, bytes, how far the archive reaches, lag behind the log.
    Status,
    /// Check every segment's file checksum and every block's CRC. Exit 1 on damage.
    Verify,
    /// Write readings in an event-time range as Parquet, CSV or JSON lines,
    /// partitioned by UTC date (OUT/date=YYYY-MM-DD/part-00000.parquet); see docs/archive.md for the schema.
    Export {
        /// Start (inclusive): RFC 3339 or Unix ms (default: the beginning).
        #[arg(long)]
        from: Option<String>,
        /// End (exclusive): RFC 3339 or Unix ms (default: the end).
        #[arg(long)]
        to: Option<String>,
        /// File format: parquet, csv or jsonl.
        #[arg(long, value_enum, default_value_t = Format::Parquet)]
        format: Format,
        /// Output directory (`--out` is accepted too).
        #[arg(long, short, alias = "out")]
        output: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum Format {
    Parquet,
    Csv,
    Jsonl,
}

/// Runs `kappa-cloud` with the process arguments.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `kappa-cloud` with `args` (the first is the program name).
pub fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            // Help and usage go to a pipe too (`--help | head`).
            kappa_runtime::cli::end_quietly_on_closed_pipe();
            e.exit()
        }
    };
    kappa_runtime::logging::init(&args.log_format, "info");
    if !matches!(args.command, Command::Run | Command::Worker) {
        kappa_runtime::cli::end_quietly_on_closed_pipe();
    }
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kappa-cloud: {e:#}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    match args.command {
        Command::Pki(cmd) => return pki_command(cmd),
        Command::Auth(cmd) => return auth_command(cmd),
        _ => {}
    }
    let cfg = load(&args.config)?;
    match args.command {
        Command::Run => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(async {
                Node::start(cfg).await?.run_until_signal().await?;
                Ok(ExitCode::SUCCESS)
            })
        }
        Command::Worker => {
            let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
            runtime.block_on(crate::cluster::run_until_signal(cfg))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Config(ConfigCommand::Check { no_environment }) => {
            // What `run` checks before it starts, without starting anything.
            let problems = if no_environment { Vec::new() } else { cfg.preflight() };
            if !problems.is_empty() {
                let e = anyhow::Error::new(kappa_runtime::config::ConfigError(problems));
                return Err(e.context(format!("{}: run would refuse it", args.config.display())));
            }
            println!("{}: ok", args.config.display());
            Ok(ExitCode::SUCCESS)
        }
        Command::Views(cmd) => views_command(&cfg, cmd),
        Command::Archive(cmd) => archive_command(&cfg, cmd),
        Command::Pki(_) | Command::Auth(_) => Ok(ExitCode::SUCCESS),
    }
}

fn pki_command(cmd: PkiCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        PkiCommand::Init { dir } => {
            let ca = crate::pki::init(&dir)?;
            println!("created the CA {} (key {}, readable by you only)", ca.display(), dir.join("ca.key").display());
        }
        PkiCommand::Issue { dir, kind, name, sans } => {
            let (cert, key) = crate::pki::issue(&dir, kind, &name, &sans)?;
            println!("issued {} and {}", cert.display(), key.display());
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn auth_command(cmd: AuthCommand) -> anyhow::Result<ExitCode> {
    let AuthCommand::Token { gateway, api, role } = cmd;
    let (token, hash) = crate::auth::new_token()?;
    let entry = match (gateway, api) {
        (Some(id), None) => format!("[[auth.gateways]]\nid = {id:?}\ntoken_sha256 = \"{hash}\"\n"),
        (None, Some(name)) if matches!(role.as_str(), "read" | "admin") => {
            format!("[[auth.tokens]]\nname = {name:?}\ntoken_sha256 = \"{hash}\"\nrole = \"{role}\"\n")
        }
        (None, Some(_)) => anyhow::bail!("--role must be read or admin"),
        _ => anyhow::bail!("name a --gateway or an --api token"),
    };
    println!("token (give it to its holder; it is not stored anywhere): {token}\n");
    println!("add to the cloud config:\n{entry}");
    Ok(ExitCode::SUCCESS)
}

fn views_command(cfg: &CloudConfig, cmd: ViewsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ViewsCommand::List { json } => {
            let views = admin::list(cfg)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&views)?);
            } else {
                println!(
                    "{:<28} {:<10} {:<7} {:>10} {:>12} {:>10}",
                    "VIEW", "STATE", "SERVES", "ROWS", "POSITION", "LAG"
                );
                for v in views {
                    let state = if v.info.detail.is_empty() {
                        v.info.state.clone()
                    } else {
                        format!("{} ({})", v.info.state, v.info.detail)
                    };
                    println!(
                        "{:<28} {:<10} {:<7} {:>10} {:>12} {:>10}",
                        v.info.id,
                        state,
                        if v.info.current { "yes" } else { "" },
                        v.info.rows.map_or_else(|| "-".to_string(), |n| n.to_string()),
                        v.position,
                        v.lag
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ViewsCommand::Compare { name, a, b, examples } => {
            let c = admin::compare(cfg, &name, a, b, examples)?;
            println!("{} rows: {}    {} rows: {}", c.a, c.rows_a, c.b, c.rows_b);
            println!(
                "only in {}: {}    only in {}: {}    differing: {}",
                c.a, c.only_in_a, c.b, c.only_in_b, c.differing
            );
            println!("{:<24} {:>22} {:>22}", "aggregate total", c.a, c.b);
            for (col, (x, y)) in &c.totals {
                let mark = if x == y { "" } else { "   <- differs" };
                println!("{col:<24} {x:>22} {y:>22}{mark}");
            }
            for e in &c.examples {
                println!("  {e}");
            }
            println!("{}", if c.equal() { "equal" } else { "different" });
            Ok(if c.equal() { ExitCode::SUCCESS } else { ExitCode::from(EXIT_NO) })
        }
        ViewsCommand::Promote { name, version } => {
            admin::promote(cfg, &name, version)?;
            println!("{name} now serves {name}@{version}");
            Ok(ExitCode::SUCCESS)
        }
        ViewsCommand::Rollback { name } => {
            let v = admin::rollback(cfg, &name)?;
            println!("{name} now serves {name}@{v}");
            Ok(ExitCode::SUCCESS)
        }
        ViewsCommand::Drop { name, version } => {
            let rows = admin::drop_version(cfg, &name, version)?;
            println!("dropped {name}@{version} ({rows} rows)");
            Ok(ExitCode::SUCCESS)
        }
        ViewsCommand::Verify { view } => {
            let problems = admin::verify(cfg, &view)?;
            for p in problems.iter().take(20) {
                println!("  {p}");
            }
            if problems.is_empty() {
                println!("{view}: the live rows equal the batch recomputation");
                Ok(ExitCode::SUCCESS)
            } else {
                println!("{view}: {} differences", problems.len());
                Ok(ExitCode::from(EXIT_NO))
            }
        }
        ViewsCommand::Watch { view } => watch(cfg, &view),
        ViewsCommand::Dump { view, alerts } => {
            // A cluster's rows come from PostgreSQL in the same format: a cluster and a node compare byte for byte.
            let specs = cfg.view_specs().map_err(|e| anyhow::anyhow!(e.join("\n  ")))?;
            let store = cfg.store_at().dump_reader(&specs, crate::views::operator::merge_encoded)?;
            let id = match view {
                Some(v) => Some(
                    store
                        .resolve_view(&v)?
                        .ok_or_else(|| anyhow::anyhow!("no view {v} (kappa-cloud views list shows them)"))?,
                ),
                None => None,
            };
            print!("{}", store.dump_views(id.as_deref())?);
            if alerts {
                print!("{}", store.dump_outputs()?);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn watch(cfg: &CloudConfig, view: &str) -> anyhow::Result<ExitCode> {
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} offsets, {per_sec}, ETA {eta}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    loop {
        let status = admin::list(cfg)?.into_iter().find(|v| v.info.id == view);
        let Some(v) = status else { anyhow::bail!("no view {view}; see views list") };
        bar.set_length(v.position + v.lag);
        bar.set_position(v.position);
        bar.set_message(format!("{view} {}", v.info.state));
        match v.info.state.as_str() {
            "live" => {
                bar.finish_with_message(format!("{view} live"));
                println!("{view} live at {} offsets", v.position);
                return Ok(ExitCode::SUCCESS);
            }
            "failed" => {
                bar.abandon_with_message(format!("{view} failed: {}", v.info.detail));
                return Ok(ExitCode::from(EXIT_NO));
            }
            "retired" => anyhow::bail!("{view} is retired (not in the config)"),
            _ => std::thread::sleep(std::time::Duration::from_millis(500)),
        }
    }
}

fn archive_command(cfg: &CloudConfig, cmd: ArchiveCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ArchiveCommand::Status => {
            println!(
                "{:>9} {:>8} {:>10} {:>12} {:>12} {:>12} {:>8}",
                "PARTITION", "SEGMENTS", "RECORDS", "BYTES", "ARCHIVED_TO", "LOG_END", "LAG"
            );
            for p in admin::archive_status(cfg)? {
                println!(
                    "{:>9} {:>8} {:>10} {:>12} {:>12} {:>12} {:>8}",
                    p.partition, p.segments, p.records, p.bytes, p.archived_to, p.log_end, p.lag
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        ArchiveCommand::Export { from, to, format, output } => {
            let from = from
                .as_deref()
                .map(crate::api::parse_time)
                .transpose()
                .map_err(anyhow::Error::msg)?
                .unwrap_or(i64::MIN);
            let to =
                to.as_deref().map(crate::api::parse_time).transpose().map_err(anyhow::Error::msg)?.unwrap_or(i64::MAX);
            let format = match format {
                Format::Parquet => crate::archive::export::ExportFormat::Parquet,
                Format::Csv => crate::archive::export::ExportFormat::Csv,
                Format::Jsonl => crate::archive::export::ExportFormat::Jsonl,
            };
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "export [{bar:40}] {pos}/{len} readings scanned, {per_sec}, ETA {eta}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            let stats = admin::export(cfg, from, to, format, &output, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            println!(
                "exported {} readings into {} files under {}",
                stats.readings,
                stats.files.len(),
                output.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        ArchiveCommand::Verify => {
            let damage = admin::archive_verify(cfg)?;
            for d in &damage {
                println!("damaged: {}: {}", d.segment, d.detail);
            }
            if damage.is_empty() {
                println!("ok");
                Ok(ExitCode::SUCCESS)
            } else {
                Ok(ExitCode::from(EXIT_NO))
            }
        }
    }
}

fn load(path: &Path) -> anyhow::Result<CloudConfig> {
    Ok(CloudConfig::load(path)?)
}
