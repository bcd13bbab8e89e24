//! Where device messages come from: the agent's own MQTT listener, or a
//! broker already running on the gateway. Both keep one promise: a device
//! is told a message is safe (PUBACK) only after the log transaction that
//! holds it committed.
//!
//! **The agent's listener** (`mqtt.mode = "embedded"`, the default): devices
//! connect to the agent itself (`listener`, `session`), over TCP and TLS,
//! MQTT 3.1.1 and 5.0, with identities and per-device topic rights when
//! `[mqtt.access]` or `[mqtt.tls]` is set (`access`). It serves publishing
//! devices only: subscriptions are refused.
//!
//! **External broker** (`mqtt.mode = "external"`, e.g. Mosquitto): the agent
//! subscribes with a persistent session at QoS 1 and sends each PUBACK only
//! after the message's log transaction committed. A message the agent has
//! not acknowledged stays with the broker, which redelivers it after a crash;
//! the log stores a redelivered reading once.

pub mod access;
pub mod close;
pub mod codec;
pub mod config;
pub mod external;
pub mod link;
pub mod listener;
pub mod session;
pub mod sessions;
