//! Edge agent configuration: a TOML file, every key optional except where noted.
//!
//! See `deploy/edge/gateway.toml` for a documented example. Unknown keys are
//! refused, and every problem is reported at once, with its key path, before
//! anything starts.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use kappa_runtime::config::ConfigError;
use kappa_runtime::config::{self, Validate};
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
    pub forward: ForwardConfig,
    #[serde(default)]
    pub http: HttpConfig,
}

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/edge")
}

/// How devices reach the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MqttMode {
    /// Run an MQTT broker (rumqttd) inside the agent.
    Embedded,
    /// Subscribe to an existing broker on the gateway (e.g. Mosquitto).
    External,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    #[serde(default = "default_mode")]
    pub mode: MqttMode,
    /// Embedded mode: where the broker listens for devices.
    #[serde(default = "default_mqtt_listen")]
    pub listen: SocketAddr,
    /// External mode: the broker to subscribe to, `mqtt://HOST:PORT`.
    #[serde(default = "default_broker_url")]
    pub broker_url: String,
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
            client_id: None,
            topic_prefix: String::new(),
            max_payload_bytes: default_max_payload(),
            queue_capacity: default_queue(),
        }
    }
}

impl MqttConfig {
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
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardConfig {
    /// The cloud ingest base URL, e.g. `http://cloud.example:8080`.
    pub cloud_url: String,
    /// Most readings in one batch.
    #[serde(default = "default_batch_readings")]
    pub max_batch_readings: usize,
    /// A partial batch leaves once its oldest reading waited this long.
    #[serde(default = "default_batch_age", with = "humantime_serde")]
    pub max_batch_age: Duration,
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
}

fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
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

    /// Reads and checks a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        config::load(path)
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
        if self.mqtt.queue_capacity == 0 {
            errors.push("mqtt.queue_capacity: must be at least 1".into());
        }
        if !(self.forward.cloud_url.starts_with("http://") || self.forward.cloud_url.starts_with("https://")) {
            errors.push(format!("forward.cloud_url: {:?} must start with http:// or https://", self.forward.cloud_url));
        }
        if self.forward.max_batch_readings == 0 {
            errors.push("forward.max_batch_readings: must be at least 1".into());
        }
        if !(1..=19).contains(&self.forward.zstd_level) {
            errors.push(format!("forward.zstd_level: {} is outside 1..=19", self.forward.zstd_level));
        }
        if self.forward.retry_min > self.forward.retry_max {
            errors.push("forward.retry_min: must not exceed forward.retry_max".into());
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
    fn durations_read_like_humans_write_them() {
        let cfg = EdgeConfig::from_toml(&format!("{MINIMAL}max_batch_age = \"2s\"\n")).unwrap();
        assert_eq!(cfg.forward.max_batch_age, Duration::from_secs(2));
    }
}
