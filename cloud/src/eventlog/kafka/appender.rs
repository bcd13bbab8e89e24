//! The ingest side of the Kafka log: an append resolves when Kafka has
//! confirmed every record of the batch.

use super::*;

/// TEST ONLY: with this environment variable set, an append resolves as
/// soon as its records are queued, before any delivery report. It exists to
/// show that the broker-outage test catches an ingest that answers 2xx for
/// records Kafka never confirmed.
pub const FAULT_ACK_BEFORE_DELIVERY: &str = "KAPPA_TEST_KAFKA_ACK_BEFORE_DELIVERY";

/// Test switch: the log's producer is librdkafka's idempotent one (see
/// [`KafkaLog::appender`]).
pub const FAULT_IDEMPOTENT_LOG_PRODUCER: &str = "KAPPA_TEST_KAFKA_IDEMPOTENT_LOG_PRODUCER";

/// The ingest side: a producer, not idempotent (see [`KafkaLog::appender`]).
#[derive(Debug, Clone)]
pub struct KafkaAppender {
    pub(super) producer: std::sync::Arc<ProducerSlot>,
    pub(super) topic: String,
    pub(super) partitions: u32,
    pub(super) ack_before_delivery: bool,
}

impl LogAppender for KafkaAppender {
    async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, EventLogError> {
        let producer = self.producer.get().map_err(EventLogError::Unavailable)?;
        let mut deliveries = Vec::with_capacity(batch.records.len());
        for rec in &batch.records {
            let p = match rec.partition {
                Some(p) if p < self.partitions => p,
                _ => partition_for(&rec.key, self.partitions),
            };
            let record = FutureRecord::to(&self.topic).key(&rec.key).payload(&rec.value).partition(p as i32);
            match producer.send_result(record) {
                Ok(delivery) => deliveries.push(delivery),
                Err((e, _)) => {
                    self.producer.failed(&e);
                    return Err(EventLogError::Unavailable(format!("the Kafka producer refused a record: {e}")));
                }
            }
        }
        if self.ack_before_delivery {
            return Ok(AppendOutcome::Appended { records: batch.records.len() });
        }
        let mut failure: Option<KafkaError> = None;
        // Every record is in flight already; waiting in order costs nothing.
        for delivery in deliveries {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => failure = Some(e),
                Err(_) => failure = Some(KafkaError::Canceled),
            }
        }
        match failure {
            None => {
                self.producer.succeeded();
                Ok(AppendOutcome::Appended { records: batch.records.len() })
            }
            Some(e) => {
                let n = self.producer.failed(&e);
                Err(EventLogError::Unavailable(format!("Kafka did not confirm the batch: {e} (failure {n} in a row)")))
            }
        }
    }
}
