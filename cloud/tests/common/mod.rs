//! Helpers shared by the cloud's integration tests.

use kappa_cloud::eventlog::{AppendBatch, AppendRecord};
use kappa_common::Reading;
use kappa_common::record::{self, LogEvent, LogRecord};

/// The batch `batch_id` of gateway "gw" carrying `readings`, as ingest appends it.
pub fn reading_batch(batch_id: u64, readings: &[Reading]) -> AppendBatch {
    let records = readings
        .iter()
        .map(|r| AppendRecord {
            key: r.device.clone(),
            partition: None,
            value: record::encode(&LogRecord {
                gateway: "gw".into(),
                batch_id,
                ingest_ms: 0,
                event: LogEvent::Reading(r.clone()),
            }),
        })
        .collect();
    AppendBatch { gateway: "gw".into(), batch_id, records }
}
