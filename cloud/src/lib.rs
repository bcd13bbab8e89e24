//! The Kappa IoT cloud tier.
//!
//! * [`ingest`]: `POST /v1/ingest` takes edge batches and appends their
//!   readings to the [`eventlog`], answering 2xx only once they are durable.
//! * [`eventlog`]: the immutable, partitioned source of truth (embedded
//!   SQLite on one machine, a Kafka topic for clusters; [`kafka`] holds what
//!   the Kafka clients share).
//! * [`processor`]: consumes the log, tracks event time and watermarks and
//!   maintains the views, checkpointing rows and log positions together.
//! * [`store`]: the serving store; [`api`]: the JSON query API over it.
//! * [`aggregates`]: the pipeline that stores windows pre-aggregated at the edge.
//! * [`node`]: all of it in one process.
//!
//! ```no_run
//! # async fn demo() -> Result<(), kappa_cloud::node::NodeError> {
//! let cfg = kappa_cloud::config::CloudConfig::from_toml("data_dir = \"data/cloud\"")
//!     .map_err(|e| kappa_cloud::node::NodeError::Config(e.to_string()))?;
//! let node = kappa_cloud::node::Node::start(cfg).await?;
//! println!("serving on http://{}", node.http_addr());
//! node.shutdown();
//! node.wait().await
//! # }
//! ```

pub mod admin;
pub mod aggregates;
pub mod alerts;
pub mod api;
pub mod archive;
pub mod auth;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod eventlog;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod node;
pub mod pki;
pub mod processor;
pub mod store;
pub mod tls;
pub mod views;

pub(crate) use kappa_runtime::time::now_ms;
