//! End-to-end tests: the real binaries as separate processes over real
//! sockets, a simulated fleet with ground truth, and real brokers.
//!
//! Every test takes its own ephemeral ports and temporary directories, so
//! tests run side by side. Process logs are kept under the test's directory
//! and printed when a test fails.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

mod abuse;
mod alerts;
mod cli_manners;
mod cluster;
mod cluster_fencing;
mod config_check;
mod configs;
mod dashboard;
mod device_gate;
mod edge_aggregate;
mod edge_dead_letters;
mod edge_disk;
mod kafka_log;
#[cfg(feature = "kafka-tls")]
mod kafka_tls;
mod limits;
mod metrics_docs;
mod mqtt_abuse;
mod mqtt_auth;
mod mqtt_interop;
mod pipeline;
mod power_cut;
mod processor;
mod replay;
mod security;
mod simulator;
