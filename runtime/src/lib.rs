//! Process plumbing shared by the Kappa IoT services, so each binary stays a
//! thin `parse, build, run`: structured logging, shutdown signals, TOML config
//! files that report every problem at once, and a supervisor for named tasks.
//!
//! ```
//! use kappa_runtime::config::{self, Validate};
//! #[derive(Debug, serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Cfg { workers: u32 }
//! impl Validate for Cfg {
//!     fn problems(&self) -> Vec<String> {
//!         if self.workers == 0 { vec!["workers: must be at least 1".into()] } else { vec![] }
//!     }
//! }
//! let err = config::from_toml::<Cfg>("workers = 0").unwrap_err();
//! assert_eq!(err.0, ["workers: must be at least 1"]);
//! ```

pub mod backoff;
pub mod cli;
pub mod config;
pub mod fault;
pub mod limits;
pub mod logging;
pub mod memory;
pub mod net;
pub mod rate;
pub mod signal;
pub mod tasks;
pub mod time;
#[cfg(feature = "tls")]
pub mod tls;
