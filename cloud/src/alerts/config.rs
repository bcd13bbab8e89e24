//! The `[alerts]` section: how the alert pipeline clocks silence, and its Kafka output.

use std::time::Duration;

use serde::Deserialize;

use super::kafka::KafkaAlertsConfig;

/// How the alert pipeline runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    /// How far out of event-time order one gateway's readings may arrive; a
    /// silence deadline fires once the gateway's clock is this far past it.
    #[serde(default = "default_gateway_lateness", with = "humantime_serde")]
    pub gateway_lateness: Duration,
    /// A device whose silence deadline has passed is declared silent only
    /// once its gateway has been sending for this long (cloud clock) without
    /// it: a device still sending its backlog after an outage is not silent.
    #[serde(default = "default_silence_quiet", with = "humantime_serde")]
    pub silence_arrival_quiet: Duration,
    /// A gap this long in a gateway's records means the gateway was away; it
    /// counts only this much towards its devices' quiet time.
    #[serde(default = "default_offline_gap", with = "humantime_serde")]
    pub gateway_offline_gap: Duration,
    /// Also produce every alert transition to a Kafka topic.
    #[serde(default)]
    pub kafka: Option<KafkaAlertsConfig>,
}

impl AlertsConfig {
    /// The alert operator's settings from this section, with the given
    /// routes and silence clock (the node derives routes from its webhooks).
    pub fn settings(
        &self,
        routes: Vec<super::engine::Route>,
        silence_clock: super::engine::SilenceClock,
    ) -> super::engine::AlertSettings {
        super::engine::AlertSettings {
            gateway_lateness_ms: self.gateway_lateness.as_millis() as i64,
            silence_quiet_ms: self.silence_arrival_quiet.as_millis() as i64,
            gateway_gap_ms: self.gateway_offline_gap.as_millis() as i64,
            routes,
            silence_clock,
        }
    }
}

fn default_gateway_lateness() -> Duration {
    Duration::from_secs(10)
}
fn default_silence_quiet() -> Duration {
    Duration::from_secs(30)
}
fn default_offline_gap() -> Duration {
    Duration::from_secs(5)
}

impl Default for AlertsConfig {
    fn default() -> Self {
        Self {
            gateway_lateness: default_gateway_lateness(),
            silence_arrival_quiet: default_silence_quiet(),
            gateway_offline_gap: default_offline_gap(),
            kafka: None,
        }
    }
}
