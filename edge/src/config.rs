//! Edge agent configuration: a TOML file, every key optional except where noted.
//!
//! See `deploy/edge/gateway.toml` for a documented example. Unknown keys are
//! refused, and every problem is reported at once, with its key path, before
//! anything starts.
//!
//! Each component owns its section, next to its code (`mqtt::config`,
//! `log::config`, `ingest::config`, `aggregate::config`, `forward::config`,
//! `http`), with its defaults and its own checks; this module composes them,
//! re-exports them, and checks what spans sections.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use kappa_runtime::config::ConfigError;

/// Environment variables `KAPPA_EDGE__SECTION__KEY=value` override config keys.
pub const ENV_PREFIX: &str = "KAPPA_EDGE";
use kappa_runtime::config::{self, Validate};
use serde::Deserialize;

pub use crate::aggregate::config::{AggregateConfig, ForwardMode, HybridConfig};
pub use crate::forward::config::{BatchEncoding, ForwardConfig};
pub use crate::http::HttpConfig;
pub use crate::ingest::config::{ClockConfig, ClockPolicy};
pub use crate::log::config::{Durability, LogConfig, TtlConfig};
pub use crate::mqtt::config::{DeviceAccessConfig, MqttConfig, MqttMode, MqttTlsConfig};

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

fn default_data_dir() -> PathBuf {
    PathBuf::from("data/edge")
}
fn default_shutdown_deadline() -> Duration {
    Duration::from_secs(10)
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
    /// Semantic checks the types cannot express: each section's own, then
    /// the ones across sections.
    fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.shutdown_deadline.is_zero() {
            errors.push("shutdown_deadline: must be positive".into());
        }
        if kappa_common::reading::validate_device_id(&self.gateway_id).is_err() {
            errors.push(format!("gateway_id: {:?} must be 1-64 characters of A-Z a-z 0-9 _ . -", self.gateway_id));
        }
        errors.extend(self.mqtt.problems());
        errors.extend(self.forward.problems());
        errors.extend(self.log.problems());
        errors.extend(self.aggregate.problems());
        if self.forward.mode != ForwardMode::Raw && self.aggregate.windows.is_empty() {
            errors.push("aggregate.windows: forward.mode aggregate and hybrid need at least one window".into());
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
