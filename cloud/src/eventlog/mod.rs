//! The event log: the immutable, partitioned source of truth.
//!
//! One interface, several backends. Ingest appends through a [`LogAppender`];
//! the processor (and later the archiver and replay) read through a
//! [`LogSource`]. The embedded backend is SQLite ([`sqlite`]), the cluster
//! backend Kafka ([`kafka`]); the interface is shaped after Kafka's:
//!
//! * records are keyed by device id, and the partition is
//!   [`kappa_common::partition::partition_for`] of the key, so one device's
//!   records stay in order in one partition;
//! * offsets are per partition, dense from 0, and never reused;
//! * an append resolves only when every record is durable;
//! * a source is *assigned* partitions (all of them for the embedded log, a
//!   consumer-group share for Kafka), is told where to start with
//!   [`LogSource::seek`], and polls records in offset order per partition.

pub mod config;
pub mod kafka;
pub mod memory;
pub mod sqlite;

use std::future::Future;
use std::path::Path;
use std::time::Duration;

pub use self::config::{Durability, LogBackend, LogConfig};

/// A partition number.
pub type Partition = u32;
/// A record's position within its partition.
pub type Offset = u64;

/// One record to append.
#[derive(Debug, Clone)]
pub struct AppendRecord {
    /// The partitioning key: the device id.
    pub key: String,
    /// Where the record goes when not where its key hashes (heartbeats are
    /// written to every partition).
    pub partition: Option<Partition>,
    /// The encoded [`kappa_common::record::LogRecord`].
    pub value: Vec<u8>,
}

/// Everything one gateway batch contributes to the log.
#[derive(Debug, Clone)]
pub struct AppendBatch {
    pub gateway: String,
    pub batch_id: u64,
    pub records: Vec<AppendRecord>,
}

/// What an append did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendOutcome {
    /// The records are durably in the log.
    Appended { records: usize },
    /// This `(gateway, batch_id)` was appended before; nothing was added.
    Duplicate,
}

/// Appends batches durably.
pub trait LogAppender: Send + Sync + 'static {
    /// Resolves when the batch is durable (or known to be a duplicate).
    fn append(&self, batch: AppendBatch) -> impl Future<Output = Result<AppendOutcome, EventLogError>> + Send;
}

/// A record read from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    pub partition: Partition,
    pub offset: Offset,
    pub value: bytes::Bytes,
}

/// Reads assigned partitions in offset order. Blocking: sources run on the
/// processor's own thread.
pub trait LogSource: Send {
    /// The partitions this source currently reads.
    fn assigned(&self) -> Vec<Partition>;
    /// The next poll returns `partition`'s records from `offset` on.
    fn seek(&mut self, partition: Partition, offset: Offset);
    /// Up to `max` records across assigned partitions, waiting at most
    /// `timeout` when none are available (then returns an empty list).
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<ConsumedRecord>, EventLogError>;
    /// The offset the next appended record of each assigned partition will get.
    fn end_offsets(&mut self) -> Result<Vec<(Partition, Offset)>, EventLogError>;
    /// Records skipped because they were damaged (archive blocks), so far.
    fn skipped(&self) -> u64 {
        0
    }
    /// Whether the last poll found nothing more to read in `partition`. A
    /// partition that is not caught up holds the watermark back even if it
    /// has delivered nothing yet: windows must not close past unread data.
    fn caught_up(&self, partition: Partition) -> bool;
}

/// Event log failures, classified for the caller.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum EventLogError {
    /// Temporarily unable to take or serve records: ingest answers 503.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    /// The stored log disagrees with the configuration or is damaged.
    #[error("event log is inconsistent: {0}")]
    Inconsistent(String),
    /// Records a reader had not read are gone from the log (deleted by
    /// retention past the reader's position): reading on would skip them.
    #[error(
        "partition {partition}: records {expected}..{found} are no longer in the log, and this reader had not read them; \
         the views would miss them. Rebuild the views from the archive (docs/archive.md, \"Replay\")"
    )]
    Gap { partition: Partition, expected: Offset, found: Offset },
}

impl LogSource for Box<dyn LogSource> {
    fn assigned(&self) -> Vec<Partition> {
        (**self).assigned()
    }
    fn seek(&mut self, partition: Partition, offset: Offset) {
        (**self).seek(partition, offset);
    }
    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<ConsumedRecord>, EventLogError> {
        (**self).poll(max, timeout)
    }
    fn end_offsets(&mut self) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        (**self).end_offsets()
    }
    fn skipped(&self) -> u64 {
        (**self).skipped()
    }
    fn caught_up(&self, partition: Partition) -> bool {
        (**self).caught_up(partition)
    }
}

/// The configured log backend, opened.
#[derive(Debug, Clone)]
pub enum EventLog {
    Sqlite(sqlite::SqliteLog),
    Kafka(kafka::KafkaLog),
}

impl EventLog {
    /// Opens the log the `[log]` section names (the embedded one in
    /// `data_dir`), creating it (or its topic) if allowed.
    pub async fn open(log: &LogConfig, data_dir: &Path) -> Result<Self, EventLogError> {
        match (&log.backend, &log.kafka) {
            (LogBackend::Kafka, Some(k)) => Ok(Self::Kafka(kafka::KafkaLog::connect(k.clone(), log.partitions).await?)),
            _ => Self::open_existing(log, data_dir),
        }
    }

    /// Opens the log the `[log]` section names without creating a Kafka topic (offline tools).
    pub fn open_existing(log: &LogConfig, data_dir: &Path) -> Result<Self, EventLogError> {
        match (&log.backend, &log.kafka) {
            (LogBackend::Kafka, Some(k)) => Ok(Self::Kafka(kafka::KafkaLog::existing(k.clone(), log.partitions))),
            (LogBackend::Kafka, None) => {
                Err(EventLogError::Inconsistent("log.backend is kafka but there is no [log.kafka]".into()))
            }
            (LogBackend::Sqlite, _) => Ok(Self::Sqlite(sqlite::SqliteLog::open(
                &data_dir.join("eventlog.sqlite"),
                log.partitions,
                log.durability,
            )?)),
        }
    }

    /// Where ingest appends; `queue` appends may wait for the embedded writer.
    pub fn appender(&self, queue: usize) -> Result<Appender, EventLogError> {
        Ok(match self {
            Self::Sqlite(l) => Appender::Sqlite(l.start_writer(queue)?),
            Self::Kafka(l) => Appender::Kafka(l.appender()?),
        })
    }

    /// A source over every partition, from offset 0.
    pub fn source(&self) -> Result<Box<dyn LogSource>, EventLogError> {
        Ok(match self {
            Self::Sqlite(l) => Box::new(l.source()?),
            Self::Kafka(l) => Box::new(l.source()?),
        })
    }

    /// The next offset of every partition (read beside a running node).
    pub fn end_offsets(log: &LogConfig, data_dir: &Path) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        match (&log.backend, &log.kafka) {
            (LogBackend::Kafka, Some(k)) => kafka::end_offsets(k, log.partitions),
            _ => sqlite::SqliteLog::end_offsets_at(&data_dir.join("eventlog.sqlite")),
        }
    }
}

/// The appender of whichever backend is configured.
#[derive(Debug, Clone)]
pub enum Appender {
    Sqlite(sqlite::SqliteAppender),
    Kafka(kafka::KafkaAppender),
}

impl LogAppender for Appender {
    async fn append(&self, batch: AppendBatch) -> Result<AppendOutcome, EventLogError> {
        match self {
            Self::Sqlite(a) => a.append(batch).await,
            Self::Kafka(a) => a.append(batch).await,
        }
    }
}
