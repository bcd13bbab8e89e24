//! The Kappa IoT edge agent: the field gateway's part of the pipeline.
//!
//! Devices publish readings over MQTT (to the agent's own listener or to
//! the gateway's broker). The agent validates each one, group-commits it
//! to a SQLite log and only then acknowledges it; a forwarder builds CBOR +
//! zstd batches from the log and POSTs them to the cloud, moving its cursor
//! only when the cloud confirms a durable append.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kappa_edge::agent::AgentError> {
//! let cfg = kappa_edge::config::EdgeConfig::load("deploy/edge/gateway.toml".as_ref())
//!     .map_err(|e| kappa_edge::agent::AgentError::Config(e.to_string()))?;
//! let agent = kappa_edge::agent::Agent::start(cfg).await?;
//! agent.shutdown();
//! agent.wait().await
//! # }
//! ```

pub mod agent;
pub mod aggregate;
pub mod cli;
pub mod config;
pub mod forward;
pub mod housekeeping;
pub mod http;
pub mod ingest;
pub mod log;
pub mod metrics;
pub mod mosquitto;
pub mod mqtt;

pub(crate) use kappa_runtime::time::now_ms;
