//! The event log on Kafka (librdkafka through rdkafka), for clusters.
//!
//! One topic holds the log; its partitions are the log's partitions, and a
//! record goes to `partition_for(device id)` exactly as in the embedded log,
//! so ingest, processor, archiver and replay see the same layout on both
//! backends. Kafka offsets are the log's offsets.
//!
//! * **Append**: an `acks=all` producer, not idempotent (see
//!   [`KafkaLog::appender`] for why: repeats are dropped by the views, a
//!   broker's forgotten producer state must not drop batches). An append resolves
//!   only when every record of the batch has a successful delivery report;
//!   any failure (broker down, `delivery_timeout` passed, queue full) is
//!   [`EventLogError::Unavailable`], which ingest answers with 503.
//! * **Resent batches**: Kafka does not know gateway batches, so a batch the
//!   edge sends again (its first answer was lost) is appended again. The
//!   processor drops the repeated readings by `(device, boot, seq)` and the
//!   repeated aggregate partials by `(gateway, batch id)`, so views still count
//!   each once; the duplicates stay visible in the log.
//! * **Read**: a consumer with manually assigned partitions and no committed
//!   group offsets: positions live in the processor's checkpoints, as with the
//!   embedded log. Broker outages are waited out, never fatal to a pipeline.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use kappa_common::partition::partition_for;

use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureRecord;
use rdkafka::{ClientConfig, Message, TopicPartitionList};
use serde::Deserialize;

mod appender;
mod config;
/// Group members: shares assigned by Kafka or handed by PostgreSQL.
mod group;

pub use self::appender::{FAULT_ACK_BEFORE_DELIVERY, FAULT_IDEMPOTENT_LOG_PRODUCER, KafkaAppender};
pub use self::config::KafkaLogConfig;
pub use self::group::{GroupContext, GroupSource, GroupState};
use super::{AppendBatch, AppendOutcome, ConsumedRecord, EventLogError, LogAppender, LogSource, Offset, Partition};
use crate::kafka::{ProducerSlot, TopicSpec, client_config, ensure_topic, topic_problem};

/// The log on a Kafka topic: hands out appenders and sources.
#[derive(Debug, Clone)]
pub struct KafkaLog {
    cfg: KafkaLogConfig,
    partitions: u32,
}

impl KafkaLog {
    /// Checks (or creates) the topic; its partition count must be `partitions`.
    pub async fn connect(cfg: KafkaLogConfig, partitions: u32) -> Result<Self, EventLogError> {
        let spec = TopicSpec {
            name: &cfg.topic,
            partitions: partitions as i32,
            replication_factor: cfg.replication_factor,
            create: cfg.create_topic,
            timeout: Duration::from_secs(10).max(cfg.delivery_timeout),
            section: "log.kafka",
        };
        let found = ensure_topic(&cfg.client(), &spec).await.map_err(EventLogError::Unavailable)?;
        if found != partitions {
            return Err(EventLogError::Inconsistent(format!(
                "topic {:?} has {found} partitions but log.partitions is {partitions}; records are placed by \
                 partition_for(device, log.partitions), so the two must agree",
                cfg.topic
            )));
        }
        Ok(Self::existing(cfg, partitions))
    }

    /// The log on a topic known to exist (offline tools): no broker round trip.
    pub fn existing(cfg: KafkaLogConfig, partitions: u32) -> Self {
        Self { cfg, partitions }
    }

    pub fn appender(&self) -> Result<KafkaAppender, EventLogError> {
        // Not idempotent: the views drop repeated readings themselves, and a
        // broker that loses its producer state in a restart (tansu 0.6 did,
        // in the kappa-chaos soak) answers a retried batch it never stored
        // with DuplicateSequenceNumber, which librdkafka reports as delivered.
        // A plain retry is appended again instead. (A test switch turns
        // idempotence back on, for the negative control.)
        let idempotent = kappa_runtime::fault::on(
            FAULT_IDEMPOTENT_LOG_PRODUCER,
            "the log's producer is idempotent; a broker that forgets producer state loses retried batches",
        );
        self.appender_as(idempotent)
    }

    /// [`Self::appender`] with the producer idempotent or not.
    fn appender_as(&self, idempotent: bool) -> Result<KafkaAppender, EventLogError> {
        let producer = ProducerSlot::new(self.cfg.client(), self.cfg.delivery_timeout, "log.kafka", idempotent)
            .map_err(EventLogError::Unavailable)?;
        let ack_before_delivery = kappa_runtime::fault::on(
            FAULT_ACK_BEFORE_DELIVERY,
            "ingest answers before Kafka confirms; acknowledged batches can be lost",
        );
        Ok(KafkaAppender {
            producer: std::sync::Arc::new(producer),
            topic: self.cfg.topic.clone(),
            partitions: self.partitions,
            ack_before_delivery,
        })
    }

    /// A source over every partition, starting at offset 0.
    pub fn source(&self) -> Result<KafkaSource, EventLogError> {
        let consumer: BaseConsumer<ReaderContext> = self
            .cfg
            .client()
            .set("group.id", "kappa-unused")
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50")
            .create_with_context(ReaderContext)
            .map_err(|e| EventLogError::Unavailable(format!("log.kafka: cannot create a consumer: {e}")))?;
        let all: Vec<Partition> = (0..self.partitions).collect();
        let mut src = KafkaSource::over(consumer, &self.cfg.topic, &all);
        src.assign()?;
        Ok(src)
    }
}

/// librdkafka reports reaching a partition's end as a "global error"; it is
/// how a source learns it is caught up, not a failure (left to rdkafka's
/// default context, it is an ERROR line per partition per fetch). Everything
/// else is logged.
fn log_client_error(error: KafkaError, reason: &str) {
    let end = matches!(error, KafkaError::PartitionEOF(_))
        || error.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::PartitionEOF);
    if !end {
        tracing::warn!(%error, reason, "librdkafka reported an error.");
    }
}

/// The context of a source that reads partitions it assigns itself.
#[derive(Debug, Default, Clone, Copy)]
pub struct ReaderContext;

impl ClientContext for ReaderContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(error, reason);
    }
}

impl ConsumerContext for ReaderContext {}

/// The contexts a [`KafkaSource`] runs with: fixed partitions or a group.
pub trait SourceContext: ConsumerContext + 'static {
    /// The partitions the source holds are no longer its own.
    fn stale(&self) -> bool;
}

impl SourceContext for ReaderContext {
    fn stale(&self) -> bool {
        false
    }
}

/// The read side: partitions assigned (all of them, or a consumer group's
/// share), positions set by `seek`.
pub struct KafkaSource<C: SourceContext = ReaderContext> {
    consumer: BaseConsumer<C>,
    topic: String,
    positions: BTreeMap<Partition, Offset>,
    /// Partitions whose last fetch reached the end of what the broker holds.
    at_end: BTreeSet<Partition>,
    /// Positions changed by `seek`: assign again before the next poll.
    reassign: bool,
    /// The last end offsets read (kept through broker outages).
    ends: BTreeMap<Partition, Offset>,
    last_warning: Option<Instant>,
    /// Where this source's own `assign` last positioned each partition's fetch.
    positioned: BTreeMap<Partition, Offset>,
    /// Partitions positioned by `assign` that have not delivered a record since.
    fresh: BTreeSet<Partition>,
    /// How far before its position a partition's fetch starts (see `poll`).
    rewind: BTreeMap<Partition, Offset>,
    /// The last offset each partition's fetch delivered since `assign`
    /// positioned it (records before the position included).
    delivered: BTreeMap<Partition, Offset>,
    /// Offsets the broker's log does not hold, skipped so far.
    holes: u64,
}

impl<C: SourceContext> std::fmt::Debug for KafkaSource<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaSource").field("topic", &self.topic).field("positions", &self.positions).finish()
    }
}

impl<C: SourceContext> KafkaSource<C> {
    /// A source reading `partitions` of `topic` from offset 0 (assigned at
    /// the first poll); none yet for a group member.
    fn over(consumer: BaseConsumer<C>, topic: &str, partitions: &[Partition]) -> Self {
        KafkaSource {
            consumer,
            topic: topic.to_string(),
            positions: partitions.iter().map(|p| (*p, 0)).collect(),
            at_end: BTreeSet::new(),
            reassign: !partitions.is_empty(),
            ends: partitions.iter().map(|p| (*p, 0)).collect(),
            last_warning: None,
            positioned: BTreeMap::new(),
            fresh: BTreeSet::new(),
            rewind: BTreeMap::new(),
            delivered: BTreeMap::new(),
            holes: 0,
        }
    }

    fn assign(&mut self) -> Result<(), EventLogError> {
        if self.consumer.context().stale() {
            // The group moved these partitions away: never read them again.
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        self.positioned.clear();
        self.delivered.clear();
        for (p, o) in &self.positions {
            let from = o.saturating_sub(self.rewind.get(p).copied().unwrap_or(0));
            tpl.add_partition_offset(&self.topic, *p as i32, rdkafka::Offset::Offset(from as i64))
                .map_err(|e| EventLogError::Unavailable(format!("log.kafka: {e}")))?;
            self.positioned.insert(*p, from);
        }
        self.consumer.assign(&tpl).map_err(|e| EventLogError::Unavailable(format!("log.kafka: cannot assign: {e}")))?;
        self.fresh = self.positions.keys().copied().collect();
        self.reassign = false;
        Ok(())
    }

    /// Whether the first record after positioning `partition` may be past
    /// `expected`: only for a reader starting at the beginning of a topic
    /// whose oldest records retention took. Records a positioned reader had
    /// not read and the log no longer holds are a gap: an error, never a skip.
    fn skip_allowed(&mut self, partition: Partition, expected: Offset, offset: Offset) -> Result<bool, EventLogError> {
        let low = match self.consumer.fetch_watermarks(&self.topic, partition as i32, Duration::from_secs(2)) {
            Ok((low, _)) => low.max(0) as Offset,
            Err(e) => {
                self.warn(&e);
                return Ok(false);
            }
        };
        let from = self.positioned.get(&partition).copied().unwrap_or(expected);
        if expected == 0 && from <= low {
            // A reader starting at the beginning of a topic whose oldest
            // records retention already took: it starts where the log starts
            // (a replay reads the archive first; docs/cluster.md).
            tracing::warn!(partition, offset, low, "Starting at the oldest record the log still holds.");
            return Ok(true);
        }
        if expected < low {
            return Err(EventLogError::Gap { partition, expected, found: offset });
        }
        Ok(false)
    }

    /// Logs a broker problem at most every 10 s; the pipeline waits it out.
    fn warn(&mut self, e: &KafkaError) {
        if self.last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!(topic = %self.topic, error = %e, "Reading the Kafka log failed; retrying.");
            self.last_warning = Some(Instant::now());
        }
    }
}

impl<C: SourceContext> LogSource for KafkaSource<C> {
    fn assigned(&self) -> Vec<Partition> {
        self.positions.keys().copied().collect()
    }

    fn seek(&mut self, partition: Partition, offset: Offset) {
        if let Some(pos) = self.positions.get_mut(&partition) {
            *pos = offset;
            self.at_end.remove(&partition);
            self.reassign = true;
        }
    }

    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<ConsumedRecord>, EventLogError> {
        if self.reassign {
            self.assign()?;
        }
        let mut out = Vec::new();
        let mut wait = timeout;
        while out.len() < max {
            let Some(next) = self.consumer.poll(wait) else { break };
            wait = Duration::ZERO;
            // Copied out at once: the message borrows the consumer.
            let record = next.map(|m| {
                let value = bytes::Bytes::copy_from_slice(m.payload().unwrap_or_default());
                (m.partition() as Partition, m.offset() as Offset, value)
            });
            match record {
                Ok((p, offset, value)) => {
                    let Some(pos) = self.positions.get_mut(&p) else { continue };
                    let fresh = self.fresh.remove(&p);
                    let previous = self.delivered.insert(p, offset);
                    if offset < *pos {
                        continue; // fetched before a seek moved past it, or rewound on purpose
                    }
                    if offset > *pos {
                        let expected = *pos;
                        let what = ahead(previous, expected, fresh);
                        if what == Ahead::Hole {
                            // The fetch delivered the record just before the
                            // position and then this one: the broker's log has
                            // no records in between (a hole: Kafka leaves them
                            // for transaction markers, tansu after a crash).
                            // Nothing was there to read; read on.
                            self.holes += offset - expected;
                            tracing::warn!(
                                partition = p,
                                from = expected,
                                to = offset,
                                holes = self.holes,
                                "The Kafka log has no records at these offsets; reading on after them."
                            );
                            *pos = offset;
                        } else if what == Ahead::Reposition {
                            // The fetch runs ahead of this source's position
                            // (it was not positioned here since the last
                            // seek): never skip records, position it again.
                            self.reassign = true;
                            break;
                        } else if self.skip_allowed(p, expected, offset)? {
                            if let Some(pos) = self.positions.get_mut(&p) {
                                *pos = offset;
                            }
                        } else {
                            // Positioned at or before `expected`, the broker
                            // answered from a later batch (tansu does so for
                            // a fetch from inside a batch): start earlier and
                            // skip the records before `expected`.
                            let back = self.rewind.get(&p).map_or(256, |r| r.saturating_mul(2));
                            tracing::info!(
                                partition = p,
                                expected,
                                offset,
                                rewind = back,
                                "The broker answered past this reader's position; fetching again from earlier."
                            );
                            self.rewind.insert(p, back);
                            self.reassign = true;
                            break;
                        }
                    }
                    let Some(pos) = self.positions.get_mut(&p) else { continue };
                    self.rewind.remove(&p);
                    *pos = offset + 1;
                    self.at_end.remove(&p);
                    out.push(ConsumedRecord { partition: p, offset, value });
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    self.at_end.insert(p as Partition);
                }
                Err(e) => {
                    self.warn(&e);
                    break;
                }
            }
        }
        Ok(out)
    }

    fn end_offsets(&mut self) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        for p in self.positions.keys() {
            match self.consumer.fetch_watermarks(&self.topic, *p as i32, Duration::from_secs(2)) {
                Ok((_, high)) => {
                    self.ends.insert(*p, high.max(0) as Offset);
                }
                Err(e) => {
                    // Keep the last known ends: lag reporting must not stop a pipeline.
                    self.warn(&e);
                    break;
                }
            }
        }
        Ok(self.ends.iter().map(|(p, o)| (*p, *o)).collect())
    }

    fn caught_up(&self, partition: Partition) -> bool {
        self.at_end.contains(&partition)
    }
}

/// The end offset of every partition of `cfg`'s topic (for tools beside a node).
pub fn end_offsets(cfg: &KafkaLogConfig, partitions: u32) -> Result<Vec<(Partition, Offset)>, EventLogError> {
    let consumer: BaseConsumer = cfg
        .client()
        .create()
        .map_err(|e| EventLogError::Unavailable(format!("log.kafka: cannot create a consumer: {e}")))?;
    (0..partitions)
        .map(|p| {
            let (_, high) = consumer.fetch_watermarks(&cfg.topic, p as i32, Duration::from_secs(10)).map_err(|e| {
                EventLogError::Unavailable(format!("log.kafka: cannot read the end of partition {p}: {e}"))
            })?;
            Ok((p, high.max(0) as Offset))
        })
        .collect()
}

/// A record at an offset past a reader's position `expected`: what it means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ahead {
    /// The fetch delivered `expected - 1` and then this one: the broker's
    /// log holds nothing in between.
    Hole,
    /// The fetch was positioned elsewhere before a seek: position it again.
    Reposition,
    /// The first record since positioning: retention took the start of the
    /// log, or the broker answered from a later batch (see `poll`).
    FirstAfterPositioning,
}

fn ahead(previous: Option<Offset>, expected: Offset, fresh: bool) -> Ahead {
    if previous.is_some_and(|o| o + 1 == expected) {
        Ahead::Hole
    } else if fresh {
        Ahead::FirstAfterPositioning
    } else {
        Ahead::Reposition
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::eventlog::AppendRecord;

    fn config(brokers: &str) -> KafkaLogConfig {
        KafkaLogConfig {
            brokers: brokers.into(),
            topic: "events".into(),
            create_topic: false,
            replication_factor: 1,
            delivery_timeout: Duration::from_secs(5),
            properties: BTreeMap::new(),
        }
    }

    /// librdkafka's mock cluster: enough for the read and write paths; the
    /// outage and cluster behaviour is tested against a broker process.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn records_come_back_per_partition_in_offset_order_and_seek_rewinds() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("events", 4, 1).unwrap();
        let log = KafkaLog::connect(config(&cluster.bootstrap_servers()), 4).await.unwrap();
        let appender = log.appender().unwrap();
        let records: Vec<AppendRecord> = (0..40)
            .map(|i| AppendRecord { key: format!("dev-{}", i % 7), partition: None, value: vec![i as u8] })
            .collect();
        let batch = AppendBatch { gateway: "gw".into(), batch_id: 1, records };
        assert_eq!(appender.append(batch).await.unwrap(), AppendOutcome::Appended { records: 40 });

        let mut src = log.source().unwrap();
        let got = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while got.len() < 40 && Instant::now() < deadline {
                got.extend(src.poll(100, Duration::from_millis(200)).unwrap());
            }
            assert_eq!(src.end_offsets().unwrap().iter().map(|(_, o)| o).sum::<u64>(), 40);
            src.seek(got[0].partition, 1);
            let mut again = Vec::new();
            while again.is_empty() && Instant::now() < deadline {
                again = src.poll(100, Duration::from_millis(200)).unwrap();
            }
            (got, again)
        })
        .await
        .unwrap();
        let (got, again) = got;
        assert_eq!(got.len(), 40);
        for p in 0..4 {
            let offs: Vec<u64> = got.iter().filter(|r| r.partition == p).map(|r| r.offset).collect();
            assert_eq!(offs, (0..offs.len() as u64).collect::<Vec<_>>(), "partition {p}");
        }
        for r in &got {
            let key = format!("dev-{}", r.value[0] % 7);
            assert_eq!(r.partition, partition_for(&key, 4), "a device's records go to its partition");
        }
        let p = got[0].partition;
        let expect: Vec<u64> = got.iter().filter(|r| r.partition == p).skip(1).map(|r| r.offset).collect();
        assert_eq!(again.iter().map(|r| r.offset).collect::<Vec<_>>(), expect, "seek rewinds one partition");
    }

    /// A fetch that delivered the record before the position and then one
    /// past it found a hole in the log (tansu left one after a crash in the
    /// kappa-chaos soak): read on. The reader used to fetch again from
    /// earlier, meet the same hole, and loop forever. (librdkafka's mock
    /// cluster writes no transaction markers, so it cannot make a hole.)
    #[test]
    fn a_record_past_the_position_is_a_hole_only_right_after_the_one_before_it() {
        // Positioned at 1270 after a rewind: ..., 1269, then 1288.
        assert_eq!(ahead(Some(1269), 1270, false), Ahead::Hole);
        assert_eq!(ahead(Some(1269), 1270, true), Ahead::Hole);
        // The fetch ran ahead of a seek: position it again, never skip.
        assert_eq!(ahead(Some(1200), 1270, false), Ahead::Reposition);
        // The first record after positioning: the start of the log, or a
        // broker answering from a later batch.
        assert_eq!(ahead(None, 1270, true), Ahead::FirstAfterPositioning);
        assert_eq!(ahead(None, 0, true), Ahead::FirstAfterPositioning);
    }

    /// Regression (kappa-chaos seed 5, docs/reliability.md): after a broker
    /// `kill -9`, tansu answered a batch it had never stored with
    /// DUPLICATE_SEQUENCE_NUMBER; librdkafka's idempotent producer takes that
    /// answer for "stored before" and reports the batch delivered, and 53
    /// acknowledged readings were lost. The log's producer is not idempotent,
    /// so the same answer fails the append (the edge sends the batch again).
    /// Negative control: the idempotent producer acknowledges a batch the
    /// topic does not hold. (librdkafka's mock cluster gives that answer on
    /// demand; a broker process cannot be made to.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_answered_with_a_duplicate_sequence_number_is_not_acknowledged_unless_stored() {
        use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
        for idempotent in [false, true] {
            let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
            cluster.create_topic("events", 1, 1).unwrap();
            let log = KafkaLog::connect(config(&cluster.bootstrap_servers()), 1).await.unwrap();
            let appender = log.appender_as(idempotent).unwrap();
            let records =
                (0..3).map(|i| AppendRecord { key: "dev-1".into(), partition: None, value: vec![i] }).collect();
            cluster
                .request_errors(RDKafkaApiKey::Produce, &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_DUPLICATE_SEQUENCE_NUMBER]);
            let acked = appender.append(AppendBatch { gateway: "gw".into(), batch_id: 1, records }).await.is_ok();
            let mut src = log.source().unwrap();
            let held: u64 =
                tokio::task::spawn_blocking(move || src.end_offsets().unwrap().iter().map(|(_, o)| o).sum())
                    .await
                    .unwrap();
            if idempotent {
                assert!(
                    acked && held == 0,
                    "negative control: the idempotent producer acknowledged ({acked}) a batch the topic does not hold ({held} records)"
                );
            } else {
                assert!(!acked, "the batch was acknowledged though the broker refused it ({held} records held)");
            }
        }
    }

    #[tokio::test]
    async fn a_missing_topic_or_another_partition_count_is_refused() {
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("events", 3, 1).unwrap();
        let err = KafkaLog::connect(config(&cluster.bootstrap_servers()), 4).await.unwrap_err();
        assert!(matches!(err, EventLogError::Inconsistent(_)) && err.to_string().contains("3 partitions"), "{err}");
        let mut cfg = config(&cluster.bootstrap_servers());
        cfg.topic = "absent".into();
        let err = KafkaLog::connect(cfg, 4).await.unwrap_err();
        assert!(err.to_string().contains("does not exist and create_topic is false"), "{err}");
    }

    #[test]
    fn settings_the_log_owns_cannot_be_overridden() {
        let mut cfg = config("k:9092");
        cfg.properties.insert("acks".into(), "1".into());
        cfg.properties.insert("security.protocol".into(), "SSL".into());
        let problems = cfg.problems();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("\"acks\""), "{problems:?}");
    }

    /// The bundled librdkafka is built without OpenSSL (docs/cluster.md):
    /// a TLS setting is refused when the client is made, with its reason.
    #[test]
    fn tls_settings_reach_librdkafka() {
        let mut cfg = config("k:9092");
        cfg.properties.insert("security.protocol".into(), "SSL".into());
        let err = KafkaLog::existing(cfg, 1).appender().unwrap_err().to_string();
        assert!(err.contains("security.protocol") && err.contains("OpenSSL not available at build time"), "{err}");
    }
}
