//! The Kappa IoT event model and its wire formats. No I/O, no async runtime.
//!
//! Everything that crosses a process boundary is defined here once, so the
//! firmware simulator, the edge agent and the cloud tier agree on the wire:
//!
//! * [`Reading`]: one device measurement. `(device, boot, seq)` is its identity
//!   everywhere (dedup, ordering, gap detection).
//! * [`device`]: what devices publish on `devices/{id}/telemetry` (CBOR or JSON,
//!   schema versions 1 and 2, upgraded to the current model on decode).
//! * [`aggregate`]: pre-aggregated windows (mergeable partials) from the edge.
//! * [`batch`]: what an edge agent POSTs to the cloud (CBOR, then a zstd frame).
//! * [`columnar`]: the compact batch layout (columns per device, differences).
//! * [`frame`]: zstd framing that refuses to inflate past a cap.
//! * [`record`]: what the cloud appends to its event log.
//! * [`partition`]: the stable device-id → partition function every log uses.
//! * [`segment`]: the archive's segment files (blocks of log records, CRC-checked).
//!
//! ```
//! use kappa_common::{device, Reading};
//! let json = br#"{"v":2,"boot":1,"seq":7,"ts":1767225600000,"data":{"temperature":21.5}}"#;
//! let reading: Reading = device::decode("sensor-1", json, &device::Limits::default()).unwrap();
//! assert_eq!(reading.seq, 7);
//! assert_eq!(reading.metric("temperature"), Some(21.5));
//! ```

pub mod aggregate;
pub mod batch;
pub mod device;
pub mod frame;
pub mod partition;
pub mod reading;
pub mod record;
pub mod segment;
pub mod window;

pub use batch::columnar;
pub use reading::{Reading, ReadingId, ValidationError};
