//! `kappa-sim`: command-line entry point (the binary is a thin wrapper).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::Parser;
use tokio_util::sync::CancellationToken;

use crate::anomaly::{Kind, Scenario};
use crate::fleet::{self, FleetConfig, FleetStats};
use crate::security::DeviceSecurity;

/// Simulate a fleet of IoT devices publishing telemetry over MQTT (QoS 1).
///
/// Each device is a firmware model with its own MQTT connection. Readings go
/// to `{topic-prefix}devices/{id}/telemetry` as CBOR (or JSON). With --truth,
/// every reading a broker acknowledged is written to a ground-truth file.
///
/// Examples:
///   kappa-sim --broker 127.0.0.1:1883 --devices 100 --rate 1
///   kappa-sim --devices 50 --readings 600 --rate 20 --event-interval 1s --seed 7 --truth truth.json
///   kappa-sim --broker gw:8883 --tls-ca ca.pem --cert-dir certs/ --id-prefix dev- --devices 10
///
/// Exit codes (the same in kappa-edge and kappa-cloud; docs/operations.md):
/// 0 success; 2 the run could not start or failed; 3 readings were still
/// unacknowledged at the end.
#[derive(Debug, Parser)]
#[command(name = "kappa-sim", version, verbatim_doc_comment)]
pub struct Args {
    /// MQTT broker address, HOST:PORT.
    #[arg(long, env = "KAPPA_SIM_BROKER", default_value = "127.0.0.1:1883")]
    pub broker: String,
    /// Number of devices.
    #[arg(long, default_value_t = 100)]
    pub devices: u32,
    /// Readings per second per device (wall clock).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,
    /// Stop after this many readings per device.
    #[arg(long)]
    pub readings: Option<u64>,
    /// Stop after this long (e.g. 90s, 10m).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Seed for every signal: the same seed gives the same readings.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Event time of the first reading, Unix milliseconds (default: now).
    #[arg(long)]
    pub start_ms: Option<i64>,
    /// Boot id of every device (default: the start time in seconds, so every
    /// run is a new boot and sequence numbers can start again at 1).
    #[arg(long)]
    pub boot: Option<u32>,
    /// Event time between two readings of a device (default: 1/rate, i.e. real time).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub event_interval: Option<Duration>,
    /// Stamp readings with the wall clock when sampled (as real devices do)
    /// instead of their scheduled event time; for latency measurements.
    #[arg(long)]
    pub wall_clock: bool,
    /// Prefix before `devices/{id}/telemetry`, e.g. `site-a/`.
    #[arg(long, default_value = "")]
    pub topic_prefix: String,
    /// Device ids are this prefix plus a five-digit index.
    #[arg(long, default_value = "sim-")]
    pub id_prefix: String,
    /// Share of devices (0..1) that publish JSON instead of CBOR.
    #[arg(long, default_value_t = 0.0)]
    pub json_share: f64,
    /// Share of devices (0..1) running schema-1 firmware (`temp`, `hum`, ...).
    #[arg(long, default_value_t = 0.0)]
    pub v1_share: f64,
    /// Write the ground truth (acknowledged readings per device-minute) here.
    #[arg(long)]
    pub truth: Option<PathBuf>,
    /// QoS 1 publishes each device keeps in flight, waiting for their
    /// PUBACKs (1, like small firmware; more for high per-device rates when
    /// every PUBACK waits for a durable commit).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..=128))]
    pub inflight: u16,
    /// After sampling stops, wait this long for outstanding acknowledgements.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
    /// Inject one labelled anomaly per device in every this many readings
    /// (0: none); see the anomaly kinds below.
    #[arg(long, default_value_t = 0)]
    pub anomaly_every: u64,
    /// Readings before the first anomaly (detectors warm up).
    #[arg(long, default_value_t = 60)]
    pub anomaly_warmup: u64,
    /// Which anomalies: spike, step, drift, stuck, dropout, offline (comma-separated).
    #[arg(long, default_value = "spike,step,drift,stuck,dropout,offline")]
    pub anomaly_kinds: String,
    /// Every device holds its readings as if its gateway were down, from
    /// reading AT for FOR readings, then sends the backlog: `AT+FOR`, e.g. `600+60`.
    #[arg(long)]
    pub gateway_offline: Option<String>,
    /// TLS: trust this CA (PEM) for the broker's certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,
    /// With --tls-ca, device ID presents DIR/ID.pem and DIR/ID.key (e.g.
    /// from `kappa-cloud pki issue --kind device --name ID`).
    #[arg(long)]
    pub cert_dir: Option<PathBuf>,
    /// Per-device passwords: the `login,password` CSV written by
    /// `kappa-edge mosquitto credentials` (login = device id).
    #[arg(long)]
    pub credentials: Option<PathBuf>,
    /// Log format on standard error: text or json.
    #[arg(long, env = "KAPPA_LOG_FORMAT", default_value = "text", value_parser = kappa_runtime::cli::LOG_FORMATS)]
    pub log_format: String,
}

impl Args {
    fn fleet_config(&self) -> anyhow::Result<FleetConfig> {
        let (host, port) = self.broker.rsplit_once(':').context("--broker must be HOST:PORT")?;
        let port: u16 = port.parse().with_context(|| format!("--broker port {port:?} is not a port number"))?;
        if !(self.rate > 0.0 && self.rate.is_finite()) {
            bail!("--rate must be a positive number, got {}", self.rate);
        }
        for (name, share) in [("--json-share", self.json_share), ("--v1-share", self.v1_share)] {
            if !(0.0..=1.0).contains(&share) {
                bail!("{name} must be between 0 and 1, got {share}");
            }
        }
        let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or_default();
        let mut kinds = Vec::new();
        for k in self.anomaly_kinds.split(',').map(str::trim).filter(|k| !k.is_empty()) {
            kinds.push(Kind::parse(k).with_context(|| {
                format!("--anomaly-kinds: {k:?} is not one of spike, step, drift, stuck, dropout, offline")
            })?);
        }
        if self.anomaly_every > 0 {
            let longest = kinds.iter().map(|k| k.readings()).max().unwrap_or(0);
            if self.anomaly_every < 2 * longest {
                bail!(
                    "--anomaly-every {} is too short: it must be at least {} for these kinds",
                    self.anomaly_every,
                    2 * longest
                );
            }
        }
        let gateway_offline = match &self.gateway_offline {
            None => None,
            Some(s) => {
                let parsed =
                    s.split_once('+').and_then(|(a, b)| Some((a.trim().parse().ok()?, b.trim().parse().ok()?)));
                Some(
                    parsed
                        .with_context(|| format!("--gateway-offline {s:?} must be AT+FOR in readings, e.g. 600+60"))?,
                )
            }
        };
        Ok(FleetConfig {
            broker_host: host.to_string(),
            broker_port: port,
            devices: self.devices,
            rate: self.rate,
            readings: self.readings,
            duration: self.duration,
            seed: self.seed,
            start_ms: self.start_ms.unwrap_or(now_ms),
            boot: self.boot.unwrap_or((self.start_ms.unwrap_or(now_ms) / 1000) as u32),
            event_interval: self.event_interval.unwrap_or_else(|| Duration::from_secs_f64(1.0 / self.rate)),
            wall_clock: self.wall_clock,
            topic_prefix: self.topic_prefix.clone(),
            id_prefix: self.id_prefix.clone(),
            json_share: self.json_share,
            v1_share: self.v1_share,
            drain_timeout: self.drain_timeout,
            inflight: usize::from(self.inflight),
            scenario: Scenario { every: self.anomaly_every, warmup: self.anomaly_warmup, kinds, gateway_offline },
            security: DeviceSecurity::load(
                self.tls_ca.as_deref(),
                self.cert_dir.as_deref(),
                self.credentials.as_deref(),
            )
            .map_err(anyhow::Error::msg)?,
        })
    }
}

/// Exit code when readings were still unacknowledged at the end of the run.
pub use kappa_runtime::cli::EXIT_UNDELIVERED;

/// Runs `kappa-sim` with the process arguments.
pub fn main() -> ExitCode {
    main_from(std::env::args_os())
}

/// Runs `kappa-sim` with `args` (the first is the program name).
pub fn main_from(args: impl IntoIterator<Item = std::ffi::OsString>) -> ExitCode {
    let args = match Args::try_parse_from(args) {
        Ok(args) => args,
        Err(e) => {
            // Help and usage go to a pipe too (`--help | head`).
            kappa_runtime::cli::end_quietly_on_closed_pipe();
            e.exit()
        }
    };
    kappa_runtime::logging::init(&args.log_format, "info,rumqttc=warn");
    // Its devices' sockets are written with MSG_NOSIGNAL: only a closed
    // standard output raises SIGPIPE.
    kappa_runtime::cli::end_quietly_on_closed_pipe();
    match run(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("kappa-sim: {e:#}");
            ExitCode::from(kappa_runtime::cli::EXIT_FAILED)
        }
    }
}

fn run(args: Args) -> anyhow::Result<ExitCode> {
    let cfg = args.fleet_config()?;
    let files = kappa_runtime::limits::raise_open_files().unwrap_or(0);
    if u64::from(cfg.devices) + 64 > files {
        tracing::warn!(
            devices = cfg.devices,
            open_files = files,
            "The open-file limit is below one connection per device; raise it with ulimit -n."
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let stop = CancellationToken::new();
        let stats = Arc::new(FleetStats::default());
        tracing::info!(
            devices = cfg.devices,
            rate = cfg.rate,
            broker = %args.broker,
            readings = ?cfg.readings,
            seed = cfg.seed,
            "Fleet starting."
        );
        let fleet = tokio::spawn(fleet::run(cfg, stop.clone(), stats.clone()));
        let progress = tokio::spawn(report_progress(stats.clone(), args.broker.clone()));
        let signals = tokio::spawn({
            let stop = stop.clone();
            async move {
                if tokio::signal::ctrl_c().await.is_ok() {
                    tracing::info!(
                        "Interrupted: stopping sampling and draining acknowledgements (Ctrl-C again to quit now)."
                    );
                    stop.cancel();
                    if tokio::signal::ctrl_c().await.is_ok() {
                        std::process::exit(130);
                    }
                }
            }
        });
        let truth = fleet.await?;
        progress.abort();
        signals.abort();
        tracing::info!(
            sampled = truth.sampled,
            acked = truth.acked,
            dropped_on_device = truth.dropped_on_device,
            undelivered = truth.undelivered,
            reconnects = stats.reconnects.load(Ordering::Relaxed),
            "Fleet finished."
        );
        if let Some(path) = &args.truth {
            truth.write(path).with_context(|| format!("cannot write ground truth to {}", path.display()))?;
            tracing::info!(path = %path.display(), rows = truth.rows.len(), "Ground truth written.");
        }
        Ok(if truth.undelivered > 0 { ExitCode::from(EXIT_UNDELIVERED) } else { ExitCode::SUCCESS })
    })
}

async fn report_progress(stats: Arc<FleetStats>, broker: String) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.tick().await;
    let mut last = 0;
    loop {
        tick.tick().await;
        let acked = stats.acked.load(Ordering::Relaxed);
        let connected = stats.connected.load(Ordering::Relaxed);
        if connected == 0
            && let Some(error) = stats.last_error()
        {
            tracing::warn!(broker = %broker, %error, "No device can connect to the broker.");
        }
        tracing::info!(
            sampled = stats.sampled.load(Ordering::Relaxed),
            published = stats.published.load(Ordering::Relaxed),
            acked,
            acked_per_s = (acked - last) / 5,
            connected,
            reconnects = stats.reconnects.load(Ordering::Relaxed),
            "Fleet progress."
        );
        last = acked;
    }
}
