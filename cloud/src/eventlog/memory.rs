//! An in-memory log source: records held in a vector per partition. For
//! benchmarks and tests that measure or exercise the processor without
//! storage underneath.

use std::collections::BTreeMap;
use std::time::Duration;

use super::{ConsumedRecord, EventLogError, LogSource, Offset, Partition};

/// A fixed log in memory; every partition is assigned.
#[derive(Debug, Default)]
pub struct MemorySource {
    partitions: BTreeMap<Partition, Vec<bytes::Bytes>>,
    positions: BTreeMap<Partition, Offset>,
}

impl MemorySource {
    /// Appends a record to `partition`.
    pub fn push(&mut self, partition: Partition, value: Vec<u8>) {
        self.partitions.entry(partition).or_default().push(value.into());
        self.positions.entry(partition).or_insert(0);
    }

    /// Records in all partitions.
    pub fn len(&self) -> usize {
        self.partitions.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl LogSource for MemorySource {
    fn assigned(&self) -> Vec<Partition> {
        self.partitions.keys().copied().collect()
    }

    fn seek(&mut self, partition: Partition, offset: Offset) {
        self.positions.insert(partition, offset);
    }

    fn poll(&mut self, max: usize, _timeout: Duration) -> Result<Vec<ConsumedRecord>, EventLogError> {
        let share = max.div_ceil(self.partitions.len().max(1)).max(1);
        let mut out = Vec::with_capacity(max);
        for (p, recs) in &self.partitions {
            let pos = self.positions.entry(*p).or_insert(0);
            let end = (*pos as usize + share).min(recs.len());
            for (i, v) in recs[*pos as usize..end].iter().enumerate() {
                out.push(ConsumedRecord { partition: *p, offset: *pos + i as u64, value: v.clone() });
            }
            *pos = end as u64;
        }
        Ok(out)
    }

    fn end_offsets(&mut self) -> Result<Vec<(Partition, Offset)>, EventLogError> {
        Ok(self.partitions.iter().map(|(p, r)| (*p, r.len() as u64)).collect())
    }

    fn caught_up(&self, partition: Partition) -> bool {
        let len = self.partitions.get(&partition).map_or(0, Vec::len) as u64;
        self.positions.get(&partition).is_none_or(|pos| *pos >= len)
    }
}
