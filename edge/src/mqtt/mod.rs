//! Where device messages come from: an MQTT broker inside the agent, or one
//! already running on the gateway.
//!
//! **External broker** (`mqtt.mode = "external"`, e.g. Mosquitto): the agent
//! subscribes with a persistent session at QoS 1 and sends each PUBACK only
//! after the message's log transaction committed. A message the agent has
//! not acknowledged stays with the broker, which redelivers it after a crash;
//! the log stores a redelivered reading once.
//!
//! **Embedded broker** (`mqtt.mode = "embedded"`, rumqttd): zero-install.
//! rumqttd sends the device its PUBACK when the message reaches the broker's
//! in-memory log, *before* the agent commits it. A crash of the agent process
//! in the window between (at most the commit linger plus one commit, a few
//! milliseconds under normal load; longer if the disk stalls) loses readings
//! the device believes delivered. Use the external mode where that matters.

//!
//! **Device gate** (`[mqtt.tls]` or `[mqtt.access]` with the embedded
//! broker): TLS, device identity and per-device topic rights in front of
//! rumqttd; see `gate`.

pub mod embedded;
pub mod external;
pub mod gate;
pub mod packet;
