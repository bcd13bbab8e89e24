//! The `[mqtt]` section: how devices reach the agent.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

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

    /// The section's own problems, each with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        if self.mode == MqttMode::External
            && let Err(e) = self.broker_host_port()
        {
            errors.push(format!("mqtt.broker_url: {:?} {e}", self.broker_url));
        }
        if self.topic_prefix.contains(['+', '#']) {
            errors.push("mqtt.topic_prefix: must not contain MQTT wildcards".into());
        }
        if self.username.as_deref().is_some_and(str::is_empty) {
            errors.push("mqtt.username: must not be empty (leave it out for an anonymous connection)".into());
        }
        if self.username.is_some() && self.mode == MqttMode::Embedded {
            errors
                .push("mqtt.username: is for the external broker; the agent's own listener has no agent login".into());
        }
        errors.extend(self.gate_problems());
        if self.queue_capacity == 0 {
            errors.push("mqtt.queue_capacity: must be at least 1".into());
        }
        if self.max_device_rate > 0 && self.max_device_burst == 0 {
            errors.push("mqtt.max_device_burst: must be at least 1 when mqtt.max_device_rate is set".into());
        }
        errors
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

fn default_password_env() -> String {
    "KAPPA_EDGE_MQTT_PASSWORD".into()
}
