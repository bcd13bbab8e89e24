//! The archive read back as a log source, and chained to the live log.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use super::segment::{Block, SegmentReader};
use super::store::ArchiveStore;
use super::{ArchiveError, ArchiveIndex};
use crate::eventlog::{ConsumedRecord, EventLogError, LogSource, Offset, Partition};

#[derive(Debug, Default)]
struct Cursor {
    /// The next offset to deliver.
    position: Offset,
    /// Index of the segment being read in the partition's manifest list.
    segment: usize,
    reader: Option<SegmentReader>,
    /// Records of the segment seen so far (delivered, filtered or skipped).
    seen_in_segment: u64,
    buffer: VecDeque<(Offset, bytes::Bytes)>,
}

/// Reads archived segments in offset order per partition, checking every
/// block's CRC. A damaged block stops the read with an error naming the
/// file, byte position and offsets, unless `skip_damaged` is set: then it is
/// skipped and its records counted in [`ArchiveSource::skipped`].
#[derive(Debug)]
pub struct ArchiveSource {
    store: Arc<dyn ArchiveStore>,
    index: ArchiveIndex,
    skip_damaged: bool,
    cursors: BTreeMap<Partition, Cursor>,
    skipped: u64,
}

impl ArchiveSource {
    pub fn open(store: Arc<dyn ArchiveStore>, skip_damaged: bool) -> Result<Self, ArchiveError> {
        let index = ArchiveIndex::load(store.as_ref())?;
        let cursors = index.partitions.keys().map(|p| (*p, Cursor::default())).collect();
        Ok(Self { store, index, skip_damaged, cursors, skipped: 0 })
    }

    /// Records skipped in damaged blocks so far.
    pub fn skipped(&self) -> u64 {
        self.skipped
    }

    /// Reads only `partitions` (a cluster worker's share).
    pub fn only(mut self, partitions: &[Partition]) -> Self {
        self.cursors.retain(|p, _| partitions.contains(p));
        self
    }

    pub fn index(&self) -> &ArchiveIndex {
        &self.index
    }

    /// Fills a partition's buffer with the next block; false at the archive's end.
    fn refill(&mut self, p: Partition) -> Result<bool, EventLogError> {
        let Some(manifests) = self.index.partitions.get(&p) else { return Ok(false) };
        let Some(cursor) = self.cursors.get_mut(&p) else { return Ok(false) };
        loop {
            let Some(m) = manifests.get(cursor.segment) else { return Ok(false) };
            if cursor.reader.is_none() {
                let name = m.segment_name();
                let bytes = self.store.get(&name).map_err(|e| EventLogError::Inconsistent(e.to_string()))?;
                let reader = SegmentReader::new(bytes).map_err(|e| {
                    EventLogError::Inconsistent(format!("archive segment {}: {e}", self.store.locate(&name)))
                })?;
                cursor.reader = Some(reader);
                cursor.seen_in_segment = 0;
            }
            let block = cursor.reader.as_mut().and_then(SegmentReader::next_block);
            match block {
                Some(Block::Records(recs)) => {
                    cursor.seen_in_segment += recs.len() as u64;
                    cursor.buffer.extend(recs.into_iter().filter(|(o, _)| *o >= cursor.position));
                    if !cursor.buffer.is_empty() {
                        return Ok(true);
                    }
                }
                Some(Block::Damaged { position, first_offset, records, reason }) => {
                    let lost = records.map_or(m.records.saturating_sub(cursor.seen_in_segment), u64::from);
                    let location = format!(
                        "archive segment {} (partition {p}, offsets {}..={}): block at byte {position}, offsets from {first_offset}, {lost} records: {reason}",
                        self.store.locate(&m.segment_name()),
                        m.first_offset,
                        m.last_offset
                    );
                    if !self.skip_damaged {
                        return Err(EventLogError::Inconsistent(format!(
                            "{location}; stopping (set archive.skip_damaged = true to skip damaged blocks, counting what is skipped)"
                        )));
                    }
                    tracing::error!(%location, "Skipping a damaged archive block.");
                    cursor.seen_in_segment += lost;
                    self.skipped += lost;
                }
                None => {
                    cursor.reader = None;
                    cursor.segment += 1;
                }
            }
        }
    }
}

impl LogSource for ArchiveSource {
    fn assigned(&self) -> Vec<Partition> {
        self.cursors.keys().copied().collect()
    }

    fn seek(&mut self, partition: Partition, offset: Offset) {
        let segment = self
            .index
            .partitions
            .get(&partition)
            .map_or(0, |l| l.iter().position(|m| m.last_offset >= offset).unwrap_or(l.len()));
        self.cursors.insert(partition, Cursor { position: offset, segment, ..Cursor::default() });
    }

    fn poll(&mut self, max: usize, _timeout: Duration) -> Result<Vec<ConsumedRecord>, EventLogError> {
        let parts: Vec<Partition> = self.cursors.keys().copied().collect();
        let share = max.div_ceil(parts.len().max(1)).max(1);
        let mut out = Vec::new();
        for p in parts {
            let mut taken = 0;
            while taken < share {
                let empty = self.cursors.get(&p).is_none_or(|c| c.buffer.is_empty());
                if empty && !self.refill(p)? {
                    break;
                }
                let Some(cursor) = self.cursors.get_mut(&p) else { break };
                while taken < share {
                    let Some((offset, value)) = cursor.buffer.pop_front() else { break };
                    cursor.position = offset + 1;
                    out.push(ConsumedRecord { partition: p, offset, value });
                    taken += 1;
                }
            }
        }
        Ok(out)
    }

    fn end_offsets(&mut self) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        Ok(self.index.partitions.keys().map(|p| (*p, self.index.next_offset(*p))).collect())
    }

    fn caught_up(&self, partition: Partition) -> bool {
        self.cursors.get(&partition).is_none_or(|c| c.position >= self.index.next_offset(partition))
    }
}

/// The archive up to what it held when opened, then the live log from
/// exactly the next offset of each partition: no gap, no duplicate.
#[derive(Debug)]
pub struct ChainSource<L: LogSource> {
    archive: ArchiveSource,
    log: L,
    /// Where the log takes over, per partition.
    boundary: BTreeMap<Partition, Offset>,
    /// Where each partition continues in the log.
    log_from: BTreeMap<Partition, Offset>,
    in_log: bool,
}

impl<L: LogSource> ChainSource<L> {
    pub fn new(mut archive: ArchiveSource, mut log: L) -> Self {
        let boundary: BTreeMap<Partition, Offset> =
            log.assigned().into_iter().map(|p| (p, archive.index.next_offset(p))).collect();
        for (p, b) in &boundary {
            archive.seek(*p, *b);
            log.seek(*p, *b);
        }
        Self { archive, log, log_from: boundary.clone(), boundary, in_log: false }
    }

    /// The log this source continues with.
    pub fn log(&self) -> &L {
        &self.log
    }

    /// The log, without the archive.
    pub fn into_log(self) -> L {
        self.log
    }

    /// The log, to keep its connection served while the archive is read.
    pub fn log_mut(&mut self) -> &mut L {
        &mut self.log
    }

    /// Whether the archive is done and records come from the log.
    pub fn in_log(&self) -> bool {
        self.in_log
    }
}

impl<L: LogSource> LogSource for ChainSource<L> {
    fn assigned(&self) -> Vec<Partition> {
        self.log.assigned()
    }

    fn seek(&mut self, partition: Partition, offset: Offset) {
        let b = self.boundary.get(&partition).copied().unwrap_or(0);
        self.archive.seek(partition, offset.min(b));
        self.log_from.insert(partition, offset.max(b));
        self.in_log = false;
    }

    fn poll(&mut self, max: usize, timeout: Duration) -> Result<Vec<ConsumedRecord>, EventLogError> {
        if !self.in_log {
            let recs = self.archive.poll(max, Duration::ZERO)?;
            let recs: Vec<ConsumedRecord> =
                recs.into_iter().filter(|r| r.offset < self.boundary.get(&r.partition).copied().unwrap_or(0)).collect();
            if !recs.is_empty() {
                return Ok(recs);
            }
            for (p, o) in &self.log_from {
                self.log.seek(*p, *o);
            }
            self.in_log = true;
            tracing::info!(boundary = %kappa_runtime::logging::pairs(&self.boundary), "Replay reached the end of the archive; continuing from the live log.");
        }
        self.log.poll(max, timeout)
    }

    fn end_offsets(&mut self) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        self.log.end_offsets()
    }

    fn skipped(&self) -> u64 {
        self.archive.skipped()
    }

    /// While the archive is being read, nothing is caught up: the log still follows.
    fn caught_up(&self, partition: Partition) -> bool {
        self.in_log && self.log.caught_up(partition)
    }
}
