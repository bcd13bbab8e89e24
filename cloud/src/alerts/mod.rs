//! Anomaly detection and alerting (see `docs/alerts.md`).
//!
//! * [`spec`]: the `[[rules]]` of the cloud config, validated.
//! * [`engine`]: the operator that evaluates every rule per device in log
//!   order and keeps each alert's lifecycle; it runs in its own processor
//!   pipeline (`alerts`), so its state, alerts, history and webhook outbox
//!   are committed with its log positions, exactly once.
//! * [`deliver`]: sends the outbox to webhooks with retry, backoff, an
//!   idempotency key and a dead-letter state.
//! * [`kafka`]: sends it to a Kafka topic with the idempotent producer.

pub mod config;
pub mod deliver;
pub mod engine;
pub mod kafka;
pub mod spec;

use crate::metrics::CloudMetrics;
use crate::processor::{GatewayClock, Operator};
use crate::store::{Checkpoint, ProcessorStore, StoreError};
use crate::views::operator::{Event, LateEvent};

/// The pipeline the alert operator runs in.
pub const ALERTS_PIPELINE: &str = "alerts";

impl Operator for engine::AlertOperator {
    fn id(&self) -> &str {
        engine::AlertOperator::id(self)
    }

    fn on_start(&mut self, store: &dyn ProcessorStore) -> Result<(), StoreError> {
        self.restore(store.alert_state()?).map_err(StoreError)
    }

    fn process(&mut self, ev: &Event<'_>, _late: &mut Vec<LateEvent>) {
        engine::AlertOperator::process(self, ev.partition, ev.gateway, ev.ingest_ms, ev.reading);
    }

    fn on_gateway_clock(
        &mut self,
        partition: crate::eventlog::Partition,
        gateway: &str,
        clock: GatewayClock,
        ingest_ms: i64,
    ) {
        match clock {
            GatewayClock::Heartbeat(ts) => self.heartbeat(partition, gateway, ts, ingest_ms),
            GatewayClock::NewestReading(ts) => self.progress(partition, gateway, ts, ingest_ms),
        }
    }

    fn on_watermark(&mut self, watermark: i64) {
        self.watermark(watermark);
    }

    fn on_checkpoint(&mut self, cp: &mut Checkpoint) {
        cp.alerts = Some(self.take_changes());
    }

    fn report(&mut self, metrics: &CloudMetrics) {
        for ((rule, transition), n) in self.take_transitions() {
            metrics
                .alert_transitions
                .get_or_create(&[("rule", rule), ("transition", transition.to_string())])
                .inc_by(n);
        }
        metrics.alert_series.set(self.series() as i64);
        metrics.alerts_open.set(self.open_alerts());
    }

    fn state_len(&self) -> usize {
        self.series()
    }

    fn has_pending_output(&self) -> bool {
        engine::AlertOperator::has_pending_output(self)
    }
}
