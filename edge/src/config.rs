//! Edge agent configuration: a TOML file, every key optional except where noted.
//!
//! See `deploy/edge/gateway.toml` for a documented example. Unknown keys are
//! refused, and every problem is reported at once, with its key path, before
//! anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use kappa_runtime::config::ConfigError;

/// Environment variables `KAPPA_EDGE__SECTION__KEY=value` override config keys.
pub const ENV_PREFIX: &str = "KAPPA_EDGE";
use kappa_runtime::config::{self, ByteSize, Validate};
use serde::Deserialize;

/// The whole agent configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// This gateway's id, sent with every batch (1-64 of `A-Za-z0-9_.-`).
    pub gateway_id: String,
    /// Where the durable log lives.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    #[serde(default)]
    pub mqtt: MqttConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub clock: ClockConfig,
    #[serde(default)]
    pub aggregate: AggregateConfig,
    pub forward: ForwardConfig,
    #[serde(default)]
    pub http: HttpConfig,
    /// On SIGINT/SIGTERM every part drains (the writer commits what it was
    /// handed, the forwarder finishes its request) within this; what is left
    /// after it is aborted, and nothing unacknowledged is lost either way.
    #[serde(default = "default_shutdown_deadline", with = "humantime_serde")]
    pub shutdown_deadline: Duration,
}

fn default_password_env() -> String {
    "KAPPA_EDGE_MQTT_PASSWORD".into()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/edge")
}
fn default_shutdown_deadline() -> Duration {
    Duration::from_secs(10)
}

/// How devices reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    /// Devices connect to the agent's own MQTT listener.
    Embedded,
    /// Subscribe to an existing broker on the gateway (e.g. Mosquitto).
    External,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_mode")]
    pub mode: MqttMode,
    /// Embedded mode: where the agent listens for devices (plain MQTT).
    #[serde(default = "default_mqtt_listen")]
    pub listen: SocketAddr,
    /// External mode: the broker to subscribe to, `mqtt://HOST:PORT`.
    #[serde(default = "default_broker_url")]
    pub broker_url: String,
    /// External mode: the agent's username at the broker (none: anonymous).
    #[serde(default)]
    pub username: Option<String>,
    /// External mode: the environment variable that holds the password for
    /// `username` (the password itself is never in the file or the logs).
    #[serde(default = "default_password_env")]
    pub password_env: String,
    /// External mode: client id of the agent's persistent session (default `kappa-edge-{gateway_id}`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic prefix before `devices/+/telemetry`.
    #[serde(default)]
    pub topic_prefix: String,
    /// Largest device payload accepted.
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Readings decoded but not yet committed (back-pressure beyond this).
    #[serde(default = "default_queue")]
    pub queue_capacity: usize,
    /// Most messages per second one device may publish, as a token bucket
    /// that holds `max_device_burst`; the excess is quarantined as
    /// `rate_limited` and counted. 0: no limit. Set it near the fastest real
    /// device (the default only stops floods).
    #[serde(default = "default_device_rate")]
    pub max_device_rate: u32,
    #[serde(default = "default_device_burst")]
    pub max_device_burst: u32,
    /// Embedded mode: most device connections open at once; more are
    /// refused (and counted) as they arrive.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Embedded mode: a connection's TLS handshake and CONNECT must both
    /// arrive within this (slow or silent clients are cut off).
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Embedded mode: QoS 1 and 2 messages per connection waiting for their
    /// commit. MQTT 5.0 devices are told (receive maximum); from 3.1.1
    /// devices the agent reads no more until replies catch up.
    #[serde(default = "default_receive_maximum")]
    pub receive_maximum: u16,
    /// Embedded mode: accept plain-text MQTT on `listen`. Production
    /// configs set it to false; devices then connect with `[mqtt.tls]`.
    #[serde(default = "default_plain")]
    pub plain: bool,
    /// Embedded mode: MQTT over TLS, and device certificates.
    #[serde(default)]
    pub tls: Option<MqttTlsConfig>,
    /// Embedded mode: who may connect; with it (or `tls`) every device must
    /// prove an identity at CONNECT, and the listener enforces that a
    /// device publishes only to its own telemetry topic.
    #[serde(default)]
    pub access: Option<DeviceAccessConfig>,
}

/// The agent's MQTT-over-TLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttTlsConfig {
    #[serde(default = "default_mqtt_tls_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain of the gateway (leaf first).
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    /// PEM file of the CA that signs device certificates. With it, a device
    /// may present a certificate whose subject common name is its device id
    /// (and must be its MQTT client id).
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
    /// Every device must present a certificate (no password logins on TLS).
    #[serde(default)]
    pub require_client_certificate: bool,
}

/// Device identity and rights at the agent's listener.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceAccessConfig {
    /// Let clients with neither certificate nor login connect as their
    /// client id (development only; rights still apply).
    #[serde(default)]
    pub anonymous: bool,
    /// Mosquitto-format password file (`device:$7$...`, as written by
    /// `kappa-edge mosquitto credentials`): username = client id = device id.
    /// Re-read when it changes, so adding or removing a device needs no restart.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// Device ids refused whatever credential they present.
    #[serde(default)]
    pub revoked: Vec<String>,
}

fn default_plain() -> bool {
    true
}
fn default_mqtt_tls_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8883))
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}

fn default_max_connections() -> usize {
    20_000
}
fn default_receive_maximum() -> u16 {
    128
}

fn default_device_rate() -> u32 {
    1000
}
fn default_device_burst() -> u32 {
    2000
}

fn default_mode() -> MqttMode {
    MqttMode::Embedded
}
fn default_mqtt_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 1883))
}
fn default_broker_url() -> String {
    "mqtt://127.0.0.1:1883".into()
}
fn default_max_payload() -> usize {
    4096
}
fn default_queue() -> usize {
    20_000
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            mode: default_mode(),
            listen: default_mqtt_listen(),
            broker_url: default_broker_url(),
            username: None,
            password_env: default_password_env(),
            client_id: None,
            topic_prefix: String::new(),
            max_payload_bytes: default_max_payload(),
            queue_capacity: default_queue(),
            max_device_rate: default_device_rate(),
            max_device_burst: default_device_burst(),
            max_connections: default_max_connections(),
            connect_timeout: default_connect_timeout(),
            receive_maximum: default_receive_maximum(),
            plain: default_plain(),
            tls: None,
            access: None,
        }
    }
}

impl MqttConfig {
    /// Whether the agent's listener checks identities and topic rights.
    pub fn gated(&self) -> bool {
        self.mode == MqttMode::Embedded && (self.tls.is_some() || self.access.is_some() || !self.plain)
    }

    fn gate_problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.mode == MqttMode::External {
            for (set, key) in
                [(self.tls.is_some(), "mqtt.tls"), (self.access.is_some(), "mqtt.access"), (!self.plain, "mqtt.plain")]
            {
                if set {
                    errors.push(format!(
                        "{key}: is for the agent's own listener (mode = \"embedded\"); lock an external broker down with `kappa-edge mosquitto credentials`"
                    ));
                }
            }
            return errors;
        }
        if !self.plain && self.tls.is_none() {
            errors.push("mqtt.plain: false leaves devices no listener; add [mqtt.tls]".into());
        }
        let access = self.access.clone().unwrap_or_default();
        let certificates = self.tls.as_ref().is_some_and(|t| t.client_ca_file.is_some());
        if self.gated() && !access.anonymous && !certificates && access.password_file.is_none() {
            errors.push(
                "mqtt.access: devices have no way to identify themselves; set mqtt.tls.client_ca_file, mqtt.access.password_file or mqtt.access.anonymous = true"
                    .into(),
            );
        }
        if let Some(t) = &self.tls {
            if t.require_client_certificate && t.client_ca_file.is_none() {
                errors.push("mqtt.tls.require_client_certificate: needs mqtt.tls.client_ca_file".into());
            }
            if t.listen == self.listen && self.plain {
                errors.push(format!("mqtt.tls.listen: {} is also mqtt.listen", t.listen));
            }
        }
        if self.connect_timeout.is_zero() {
            errors.push("mqtt.connect_timeout: must be positive".into());
        }
        if self.max_connections == 0 {
            errors.push("mqtt.max_connections: must be at least 1".into());
        }
        if self.receive_maximum == 0 {
            errors.push("mqtt.receive_maximum: must be at least 1".into());
        }
        for id in &access.revoked {
            if kappa_common::reading::validate_device_id(id).is_err() {
                errors.push(format!("mqtt.access.revoked: {id:?} is not a device id"));
            }
        }
        errors
    }

    /// The subscription filter for device telemetry.
    pub fn telemetry_filter(&self) -> String {
        format!("{}devices/+/telemetry", self.topic_prefix)
    }

    /// `(host, port)` of the external broker.
    pub fn broker_host_port(&self) -> Result<(String, u16), String> {
        let rest = self.broker_url.strip_prefix("mqtt://").ok_or("must start with mqtt://")?;
        let (host, port) = rest.rsplit_once(':').ok_or("must be mqtt://HOST:PORT")?;
        let port = port.trim_end_matches('/').parse().map_err(|_| format!("port {port:?} is not a number"))?;
        Ok((host.to_string(), port))
    }
}

/// What "committed" means for the edge log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=FULL`: a committed reading survives power loss.
    Full,
    /// `synchronous=NORMAL`: survives a process crash; the last commits may be lost on power loss.
    Normal,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// How long the first reading of a commit waits for company.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub commit_linger: Duration,
    /// Most readings in one commit.
    #[serde(default = "default_max_commit")]
    pub max_commit_readings: usize,
    /// Quarantined (rejected) payloads kept for inspection.
    #[serde(default = "default_quarantine_keep")]
    pub quarantine_keep: u64,
    /// Hard budget for the log: data pages plus the WAL.
    #[serde(default = "default_max_bytes")]
    pub max_bytes: ByteSize,
    /// Free space to keep on the data directory's filesystem; below it the log sheds.
    #[serde(default = "default_min_free")]
    pub min_free_bytes: ByteSize,
    /// Forwarded readings are kept locally this long (for export and backfill), then deleted.
    #[serde(default = "default_retention", with = "humantime_serde")]
    pub retention: Duration,
    /// Window of the rollups that replace old unforwarded raw readings under pressure.
    #[serde(default = "default_rollup_window", with = "humantime_serde")]
    pub rollup_window: Duration,
    /// Age past which data of each class is deleted, forwarded or not.
    #[serde(default)]
    pub ttl: TtlConfig,
    /// How often retention and the budget are enforced (also at once when a commit fails for space).
    #[serde(default = "default_housekeeping", with = "humantime_serde")]
    pub housekeeping_interval: Duration,
}

/// Age limits per data class.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlConfig {
    #[serde(default = "default_ttl_raw", with = "humantime_serde")]
    pub raw: Duration,
    #[serde(default = "default_ttl_aggregate", with = "humantime_serde")]
    pub aggregate: Duration,
    #[serde(default = "default_ttl_exception", with = "humantime_serde")]
    pub exception: Duration,
}

fn default_ttl_raw() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_ttl_aggregate() -> Duration {
    Duration::from_secs(90 * 86_400)
}
fn default_ttl_exception() -> Duration {
    Duration::from_secs(365 * 86_400)
}

impl Default for TtlConfig {
    fn default() -> Self {
        Self { raw: default_ttl_raw(), aggregate: default_ttl_aggregate(), exception: default_ttl_exception() }
    }
}

fn default_rollup_window() -> Duration {
    Duration::from_secs(60)
}

fn default_max_bytes() -> ByteSize {
    ByteSize(1 << 30)
}
fn default_min_free() -> ByteSize {
    ByteSize(64 << 20)
}
fn default_retention() -> Duration {
    Duration::from_secs(7 * 86_400)
}
fn default_housekeeping() -> Duration {
    Duration::from_secs(5)
}

fn default_durability() -> Durability {
    Durability::Full
}
fn default_linger() -> Duration {
    Duration::from_millis(5)
}
fn default_max_commit() -> usize {
    5000
}
fn default_quarantine_keep() -> u64 {
    10_000
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            durability: default_durability(),
            commit_linger: default_linger(),
            max_commit_readings: default_max_commit(),
            quarantine_keep: default_quarantine_keep(),
            max_bytes: default_max_bytes(),
            min_free_bytes: default_min_free(),
            retention: default_retention(),
            rollup_window: default_rollup_window(),
            ttl: TtlConfig::default(),
            housekeeping_interval: default_housekeeping(),
        }
    }
}

/// What to do with a reading whose device clock disagrees with the gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockPolicy {
    /// Refuse the reading: it goes to the quarantine table with reason `clock_skew`.
    Quarantine,
    /// Keep the reading with the gateway's receive time as its timestamp.
    Correct,
}

/// Device clock checks, against the gateway clock at receipt.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// A device timestamp further ahead than this is skewed.
    #[serde(default = "default_max_ahead", with = "humantime_serde")]
    pub max_ahead: Duration,
    /// A device timestamp further behind than this is skewed (devices that
    /// buffer through an outage send legitimately old readings: size this
    /// for the longest buffering you expect).
    #[serde(default = "default_max_behind", with = "humantime_serde")]
    pub max_behind: Duration,
    #[serde(default = "default_clock_policy")]
    pub policy: ClockPolicy,
}

fn default_max_ahead() -> Duration {
    Duration::from_secs(300)
}
fn default_max_behind() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_clock_policy() -> ClockPolicy {
    ClockPolicy::Quarantine
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self { max_ahead: default_max_ahead(), max_behind: default_max_behind(), policy: default_clock_policy() }
    }
}

/// Pre-aggregation: per device and metric, event-time windows with count,
/// min, max, sum, sum of squares, first and last.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Window sizes, e.g. `["10s", "1m"]` (each divides a day evenly).
    #[serde(default = "default_windows")]
    pub windows: Vec<String>,
    /// A window closes once its device's readings reach this far past its end...
    #[serde(default = "default_agg_lateness", with = "humantime_serde")]
    pub lateness: Duration,
    /// ...or once no reading for it arrived for this long (gateway clock).
    #[serde(default = "default_idle_close", with = "humantime_serde")]
    pub idle_close: Duration,
}

fn default_windows() -> Vec<String> {
    vec!["1m".into()]
}
fn default_agg_lateness() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_close() -> Duration {
    Duration::from_secs(30)
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self { windows: default_windows(), lateness: default_agg_lateness(), idle_close: default_idle_close() }
    }
}

impl AggregateConfig {
    /// The window sizes in milliseconds.
    pub fn window_ms(&self) -> Result<Vec<i64>, String> {
        self.windows
            .iter()
            .map(|w| {
                let ms = humantime::parse_duration(w).map_err(|e| format!("{w:?} is not a duration: {e}"))?.as_millis();
                if ms == 0 || 86_400_000 % ms != 0 {
                    return Err(format!("{w:?} must be above zero and divide a day evenly"));
                }
                Ok(ms as i64)
            })
            .collect()
    }
}

/// What the forwarder sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    /// Every raw reading.
    Raw,
    /// Closed windows only; raw readings stay in the local log.
    Aggregate,
    /// Closed windows, plus the raw readings that moved past a deadband or trip a rule.
    Hybrid,
}

/// Which raw readings `hybrid` mode forwards.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridConfig {
    /// Per metric: forward a reading whose value moved more than this since
    /// the last one forwarded for its device (the first one always goes).
    #[serde(default)]
    pub deadband: std::collections::BTreeMap<String, f64>,
    /// Local rules, `metric > number` (also `>=`, `<`, `<=`, `==`, `!=`):
    /// a reading that trips one is forwarded.
    #[serde(default)]
    pub rules: Vec<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// `raw` (default), `aggregate` or `hybrid`.
    #[serde(default = "default_forward_mode")]
    pub mode: ForwardMode,
    #[serde(default)]
    pub hybrid: HybridConfig,
    /// The cloud ingest base URL, e.g. `http://cloud.example:8080`.
    pub cloud_url: String,
    /// Most readings in one batch.
    #[serde(default = "default_batch_readings")]
    pub max_batch_readings: usize,
    /// Batches on the wire at once (pipelining for high-latency links).
    /// Above 1, batches can reach the cloud out of order, by up to this many
    /// minus one batches: the cloud's views must allow that much lateness.
    #[serde(default = "default_in_flight")]
    pub max_in_flight: usize,
    /// New batches are built at most this many readings per second, so a
    /// backlog drains at a bounded rate; 0 means no bound.
    #[serde(default = "default_forward_rate")]
    pub max_readings_per_second: u64,
    /// A partial batch leaves once its oldest reading waited this long.
    #[serde(default = "default_batch_age", with = "humantime_serde")]
    pub max_batch_age: Duration,
    /// Batch layout on the wire: `columnar` (format 2, the default) or `cbor`
    /// (format 1, for a cloud older than the columnar layout).
    #[serde(default = "default_encoding")]
    pub encoding: BatchEncoding,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    #[serde(default = "default_request_timeout", with = "humantime_serde")]
    pub request_timeout: Duration,
    /// First retry delay; doubles per failure, with full jitter.
    #[serde(default = "default_retry_min", with = "humantime_serde")]
    pub retry_min: Duration,
    /// Longest retry delay.
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
    /// With nothing to forward, tell the cloud this often that the gateway is
    /// online and caught up (so silence alerts can tell a quiet device from an
    /// offline gateway); zero turns heartbeats off.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// PEM file of the CA that signed the cloud's certificate: with it, the
    /// agent trusts only that CA for an `https://` cloud_url; without it, the
    /// system's roots.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// The environment variable that holds this gateway's ingest token, sent
    /// as `Authorization: Bearer` (never written to the config or the logs).
    /// Unset variable: no token is sent.
    #[serde(default = "default_token_env")]
    pub token_env: String,
}

fn default_token_env() -> String {
    "KAPPA_EDGE_CLOUD_TOKEN".into()
}

/// How batches are laid out before zstd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BatchEncoding {
    /// Columns per device with differences (batch format 2): the smallest.
    Columnar,
    /// One CBOR record per reading (batch format 1).
    Cbor,
}

impl BatchEncoding {
    /// The batch format number this encoding writes.
    pub fn format(self) -> u16 {
        match self {
            Self::Columnar => kappa_common::batch::COLUMNAR_FORMAT,
            Self::Cbor => kappa_common::batch::BATCH_FORMAT,
        }
    }
}

fn default_encoding() -> BatchEncoding {
    BatchEncoding::Columnar
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}

fn default_forward_mode() -> ForwardMode {
    ForwardMode::Raw
}
fn default_in_flight() -> usize {
    1
}
fn default_forward_rate() -> u64 {
    100_000
}
fn default_batch_readings() -> usize {
    5000
}
fn default_batch_age() -> Duration {
    Duration::from_millis(500)
}
fn default_zstd_level() -> i32 {
    3
}
fn default_request_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_retry_min() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpConfig {
    /// Where `/metrics` and `/healthz` are served.
    #[serde(default = "default_http_listen")]
    pub listen: SocketAddr,
}

fn default_http_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9101))
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self { listen: default_http_listen() }
    }
}

impl EdgeConfig {
    /// Parses and checks a configuration, reporting every problem at once.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        config::from_toml(text)
    }

    /// Reads and checks a configuration file, with `KAPPA_EDGE__SECTION__KEY`
    /// environment overrides (see `kappa_runtime::config`).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        config::load_with_env(path, ENV_PREFIX)
    }

    /// The external-broker client id.
    pub fn client_id(&self) -> String {
        self.mqtt.client_id.clone().unwrap_or_else(|| format!("kappa-edge-{}", self.gateway_id))
    }

    /// Path of the SQLite log.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.join("edge-log.sqlite")
    }
}

impl Validate for EdgeConfig {
    /// Semantic checks the types cannot express.
    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.shutdown_deadline.is_zero() {
            errors.push("shutdown_deadline: must be positive".into());
        }
        if kappa_common::reading::validate_device_id(&self.gateway_id).is_err() {
            errors.push(format!("gateway_id: {:?} must be 1-64 characters of A-Z a-z 0-9 _ . -", self.gateway_id));
        }
        if self.mqtt.mode == MqttMode::External
            && let Err(e) = self.mqtt.broker_host_port()
        {
            errors.push(format!("mqtt.broker_url: {:?} {e}", self.mqtt.broker_url));
        }
        if self.mqtt.topic_prefix.contains(['+', '#']) {
            errors.push("mqtt.topic_prefix: must not contain MQTT wildcards".into());
        }
        if self.mqtt.username.as_deref().is_some_and(str::is_empty) {
            errors.push("mqtt.username: must not be empty (leave it out for an anonymous connection)".into());
        }
        if self.mqtt.username.is_some() && self.mqtt.mode == MqttMode::Embedded {
            errors
                .push("mqtt.username: is for the external broker; the agent's own listener has no agent login".into());
        }
        errors.extend(self.mqtt.gate_problems());
        if self.mqtt.queue_capacity == 0 {
            errors.push("mqtt.queue_capacity: must be at least 1".into());
        }
        if self.mqtt.max_device_rate > 0 && self.mqtt.max_device_burst == 0 {
            errors.push("mqtt.max_device_burst: must be at least 1 when mqtt.max_device_rate is set".into());
        }
        if !(self.forward.cloud_url.starts_with("http://") || self.forward.cloud_url.starts_with("https://")) {
            errors.push(format!("forward.cloud_url: {:?} must start with http:// or https://", self.forward.cloud_url));
        }
        if self.forward.ca_file.is_some() && !self.forward.cloud_url.starts_with("https://") {
            errors.push("forward.ca_file: only used with an https:// cloud_url".into());
        }
        if self.forward.max_batch_readings == 0 {
            errors.push("forward.max_batch_readings: must be at least 1".into());
        }
        if !(1..=64).contains(&self.forward.max_in_flight) {
            errors.push(format!("forward.max_in_flight: {} is outside 1..=64", self.forward.max_in_flight));
        }
        if !(1..=19).contains(&self.forward.zstd_level) {
            errors.push(format!("forward.zstd_level: {} is outside 1..=19", self.forward.zstd_level));
        }
        if self.forward.retry_min > self.forward.retry_max {
            errors.push("forward.retry_min: must not exceed forward.retry_max".into());
        }
        if self.log.max_bytes.0 < 1 << 20 {
            errors.push(format!("log.max_bytes: {} is below the 1MiB minimum", self.log.max_bytes));
        }
        if self.log.housekeeping_interval.is_zero() {
            errors.push("log.housekeeping_interval: must be above zero".into());
        }
        if let Err(e) = self.aggregate.window_ms() {
            errors.push(format!("aggregate.windows: {e}"));
        }
        if self.forward.mode != ForwardMode::Raw && self.aggregate.windows.is_empty() {
            errors.push("aggregate.windows: forward.mode aggregate and hybrid need at least one window".into());
        }
        for rule in &self.forward.hybrid.rules {
            if let Err(e) = crate::aggregate::Rule::parse(rule) {
                errors.push(format!("forward.hybrid.rules: {e}"));
            }
        }
        for (metric, band) in &self.forward.hybrid.deadband {
            if !band.is_finite() || *band < 0.0 {
                errors.push(format!("forward.hybrid.deadband.{metric}: {band} must be a number ≥ 0"));
            }
        }
        if self.log.max_commit_readings == 0 {
            errors.push("log.max_commit_readings: must be at least 1".into());
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
gateway_id = "gw-1"
[forward]
cloud_url = "http://127.0.0.1:8080"
"#;

    #[test]
    fn a_minimal_config_gets_safe_defaults() {
        let cfg = EdgeConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(cfg.mqtt.mode, MqttMode::Embedded);
        assert_eq!(cfg.log.durability, Durability::Full);
        assert_eq!(cfg.client_id(), "kappa-edge-gw-1");
        assert_eq!(cfg.mqtt.telemetry_filter(), "devices/+/telemetry");
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = EdgeConfig::from_toml(&format!("{MINIMAL}\n[log]\ndurabilty = \"full\"\n")).unwrap_err();
        assert!(err.to_string().contains("durabilty"), "{err}");
    }

    #[test]
    fn every_semantic_error_is_reported_with_its_key() {
        let text = r#"
gateway_id = "gw/1"
[mqtt]
mode = "external"
broker_url = "tcp://x"
[forward]
cloud_url = "ftp://x"
zstd_level = 40
"#;
        let err = EdgeConfig::from_toml(text).unwrap_err();
        let keys: Vec<_> = err.0.iter().map(|m| m.split(':').next().unwrap_or_default().to_string()).collect();
        assert_eq!(keys, ["gateway_id", "mqtt.broker_url", "forward.cloud_url", "forward.zstd_level"]);
    }

    #[test]
    fn a_gate_without_a_way_to_identify_devices_or_a_listener_is_refused() {
        let keys = |extra: &str| -> Vec<String> {
            match EdgeConfig::from_toml(&format!(
                "gateway_id = \"gw-1\"\n{extra}\n[forward]\ncloud_url = \"http://x\"\n"
            )) {
                Ok(_) => Vec::new(),
                Err(e) => e.0.iter().map(|m| m.split(':').next().unwrap_or_default().to_string()).collect(),
            }
        };
        let tls = "[mqtt.tls]\ncert_file = \"g.pem\"\nkey_file = \"g.key\"\n";
        assert_eq!(keys("[mqtt]\nplain = false"), ["mqtt.plain", "mqtt.access"]);
        assert_eq!(keys(&format!("[mqtt]\nplain = false\n{tls}")), ["mqtt.access"]);
        assert_eq!(keys(&format!("{tls}client_ca_file = \"ca.pem\"\n")), Vec::<String>::new());
        assert_eq!(
            keys(&format!("{tls}require_client_certificate = true\n")),
            ["mqtt.access", "mqtt.tls.require_client_certificate"]
        );
        assert_eq!(keys("[mqtt.access]\nanonymous = true\nrevoked = [\"a/b\"]"), ["mqtt.access.revoked"]);
        assert_eq!(keys("[mqtt]\nmode = \"external\"\n[mqtt.access]\nanonymous = true"), ["mqtt.access"]);
        let cfg = EdgeConfig::from_toml(MINIMAL).unwrap();
        assert!(!cfg.mqtt.gated(), "the demo's broker is open, without the gate's hop");
    }

    #[test]
    fn durations_read_like_humans_write_them() {
        let cfg = EdgeConfig::from_toml(&format!("{MINIMAL}max_batch_age = \"2s\"\n")).unwrap();
        assert_eq!(cfg.forward.max_batch_age, Duration::from_secs(2));
    }
}
