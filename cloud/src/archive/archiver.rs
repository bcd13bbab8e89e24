//! The archiver: consumes the log and publishes segments.
//!
//! Per partition it keeps one open segment in memory, cut into blocks as it
//! grows, and publishes it (segment object, then manifest) when it reaches
//! `segment_bytes` or has been open for `segment_age`, and on shutdown. Its
//! position is the archive itself: on start it reads the manifests and seeks
//! each partition to the offset after the last archived record.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappa_common::record;
use tokio_util::sync::CancellationToken;

use super::segment::{SegmentWriter, file_crc};
use super::store::ArchiveStore;
use super::{ArchiveError, ArchiveIndex, SegmentManifest, manifest_name};
use crate::eventlog::{LogSource, Offset, Partition};
use crate::metrics::CloudMetrics;

/// Log retention the archiver applies (records both archived and consumed).
#[derive(Debug, Clone)]
pub struct Retention {
    pub log_path: std::path::PathBuf,
    /// The serving store, for every pipeline's position.
    pub store_path: std::path::PathBuf,
    pub older_than: Duration,
}

/// How segments are cut.
#[derive(Debug, Clone, Copy)]
pub struct ArchiverSettings {
    /// Publish a segment once it holds this many compressed bytes.
    pub segment_bytes: usize,
    /// Publish a segment once it has been open this long.
    pub segment_age: Duration,
    /// Cut blocks at about this many uncompressed bytes.
    pub block_bytes: usize,
    pub poll_records: usize,
}

impl Default for ArchiverSettings {
    fn default() -> Self {
        Self {
            segment_bytes: 8 << 20,
            segment_age: Duration::from_secs(300),
            block_bytes: 256 << 10,
            poll_records: 5000,
        }
    }
}

#[derive(Debug)]
struct Open {
    writer: SegmentWriter,
    opened: Instant,
    min_ts: Option<i64>,
    max_ts: Option<i64>,
}

/// The archiver.
#[derive(Debug)]
pub struct Archiver<S: LogSource> {
    source: S,
    store: Arc<dyn ArchiveStore>,
    settings: ArchiverSettings,
    open: BTreeMap<Partition, Open>,
    next: BTreeMap<Partition, Offset>,
    metrics: Arc<CloudMetrics>,
    last_lag: Instant,
    retention: Option<Retention>,
    last_retention: Instant,
}

impl<S: LogSource> Archiver<S> {
    /// Also deletes old log records that are archived and processed by every pipeline.
    pub fn with_retention(mut self, retention: Retention) -> Self {
        self.retention = Some(retention);
        self
    }

    /// Deletes, now, the log records that are archived, processed by every
    /// pipeline and older than the retention (the archiver also does this
    /// on its own every `older_than`, between 0.5 and 60 s).
    pub fn apply_retention(&mut self) -> Result<(), ArchiveError> {
        let Some(r) = &self.retention else { return Ok(()) };
        self.last_retention = Instant::now();
        let positions = crate::store::ViewStore::open_read_only(&r.store_path)
            .and_then(|s| s.pipeline_positions())
            .map_err(|e| ArchiveError::Damaged(e.to_string()))?;
        let mut below = self.next.clone();
        for (p, bound) in below.iter_mut() {
            for pipeline in positions.values() {
                // A pipeline that has not checkpointed this partition yet has read nothing of it.
                *bound = (*bound).min(pipeline.get(p).copied().unwrap_or(0));
            }
            if positions.is_empty() {
                *bound = 0;
            }
        }
        let cutoff = std::time::SystemTime::now()
            .checked_sub(r.older_than)
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_millis() as i64);
        let deleted = crate::eventlog::sqlite::SqliteLog::apply_retention(&r.log_path, &below, cutoff)?;
        if deleted > 0 {
            self.metrics.log_records_deleted.inc_by(deleted);
            tracing::info!(deleted, below = %kappa_runtime::logging::pairs(&below), "Log retention deleted archived, processed records.");
        }
        Ok(())
    }
    /// Resumes after the last published segment of every partition.
    pub fn new(
        mut source: S,
        store: Arc<dyn ArchiveStore>,
        settings: ArchiverSettings,
        metrics: Arc<CloudMetrics>,
    ) -> Result<Self, ArchiveError> {
        let index = ArchiveIndex::load(store.as_ref())?;
        let mut next = BTreeMap::new();
        for p in source.assigned() {
            let o = index.next_offset(p);
            source.seek(p, o);
            next.insert(p, o);
        }
        tracing::info!(next = %kappa_runtime::logging::pairs(&next), records = index.records(), "Archiver resumes after the last published segments.");
        Ok(Self {
            source,
            store,
            settings,
            open: BTreeMap::new(),
            next,
            metrics,
            last_lag: Instant::now() - Duration::from_secs(60),
            retention: None,
            last_retention: Instant::now(),
        })
    }

    /// Runs until `cancel` fires, then publishes what is open.
    pub fn run(mut self, cancel: CancellationToken) -> Result<(), ArchiveError> {
        while !cancel.is_cancelled() {
            self.step(Duration::from_millis(200))?;
        }
        self.flush()
    }

    /// One poll; publishes segments that are full or old. Returns records archived.
    pub fn step(&mut self, wait: Duration) -> Result<usize, ArchiveError> {
        let records = self.source.poll(self.settings.poll_records, wait)?;
        let n = records.len();
        let now = Instant::now();
        for rec in records {
            let block_bytes = self.settings.block_bytes;
            let open = self.open.entry(rec.partition).or_insert_with(|| Open {
                writer: SegmentWriter::new(rec.partition, rec.offset, block_bytes),
                opened: now,
                min_ts: None,
                max_ts: None,
            });
            if let Ok(r) = record::decode(&rec.value) {
                let ts = r.ts_ms();
                open.min_ts = Some(open.min_ts.map_or(ts, |m| m.min(ts)));
                open.max_ts = Some(open.max_ts.map_or(ts, |m| m.max(ts)));
            }
            open.writer.push(rec.offset, rec.value).map_err(|e| ArchiveError::Damaged(e.to_string()))?;
            if open.writer.bytes() >= self.settings.segment_bytes {
                self.publish(rec.partition)?;
            }
        }
        let old: Vec<Partition> = self
            .open
            .iter()
            .filter(|(_, o)| o.opened.elapsed() >= self.settings.segment_age)
            .map(|(p, _)| *p)
            .collect();
        for p in old {
            self.publish(p)?;
        }
        self.metrics.archive_records.inc_by(n as u64);
        let every =
            self.retention.as_ref().map(|r| r.older_than.clamp(Duration::from_millis(500), Duration::from_secs(60)));
        if every.is_some_and(|e| self.last_retention.elapsed() >= e) {
            self.apply_retention()?;
        }
        if self.last_lag.elapsed() >= Duration::from_secs(2) {
            for (p, end) in self.source.end_offsets()? {
                let done = self.next.get(&p).copied().unwrap_or(0);
                self.metrics
                    .archive_lag_records
                    .get_or_create(&[("partition", p)])
                    .set(end.saturating_sub(done) as i64);
            }
            self.last_lag = Instant::now();
        }
        Ok(n)
    }

    /// Publishes every open segment.
    pub fn flush(&mut self) -> Result<(), ArchiveError> {
        let open: Vec<Partition> = self.open.keys().copied().collect();
        for p in open {
            self.publish(p)?;
        }
        Ok(())
    }

    fn publish(&mut self, p: Partition) -> Result<(), ArchiveError> {
        let Some(open) = self.open.remove(&p) else { return Ok(()) };
        let (first, records) = (open.writer.first_offset(), open.writer.records());
        let Some(last) = open.writer.last_offset() else { return Ok(()) };
        let bytes = open.writer.finish();
        let manifest = SegmentManifest {
            format: 1,
            partition: p,
            first_offset: first,
            last_offset: last,
            records,
            min_ts_ms: open.min_ts,
            max_ts_ms: open.max_ts,
            bytes: bytes.len() as u64,
            crc32: file_crc(&bytes),
            created_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64),
        };
        // Segment first, manifest second: a segment without a manifest does not exist.
        self.store.put(&manifest.segment_name(), &bytes)?;
        let json = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        self.store.put(&manifest_name(p, first), &json)?;
        self.next.insert(p, last + 1);
        self.metrics.archive_segments.inc();
        self.metrics.archive_bytes.inc_by(bytes.len() as u64);
        tracing::debug!(partition = p, first, last, records, bytes = bytes.len(), "Published an archive segment.");
        Ok(())
    }

    /// The offset after the last published record, per partition.
    pub fn archived(&self) -> &BTreeMap<Partition, Offset> {
        &self.next
    }
}
