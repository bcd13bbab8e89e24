//! Simulated device fleets for Kappa IoT.
//!
//! * [`firmware`]: the device firmware model. It samples its sensors, keeps
//!   unacknowledged samples in a fixed-capacity outbox and encodes each reading
//!   with serde_cbor into a fixed-size buffer: no heap allocation per reading.
//! * [`signal`]: deterministic, realistic sensor signals for a seed.
//! * [`fleet`]: runs N firmware models, each with its own MQTT connection
//!   (rumqttc, QoS 1), publishing to `devices/{id}/telemetry`.
//! * [`truth`]: the ground truth: every reading a broker acknowledged, summed
//!   per device and minute of event time, so tests compare views against it,
//!   and every anomaly injected.
//! * [`anomaly`]: labelled anomalies (spike, step, drift, stuck sensor,
//!   dropout, device offline, gateway offline) planned from the seed.

pub mod anomaly;
pub mod cli;
pub mod firmware;
pub mod fleet;
pub mod security;
pub mod signal;
pub mod truth;
