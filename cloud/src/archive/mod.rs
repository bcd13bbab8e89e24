//! The archive: the event log's long-term copy, and the way back from it.
//!
//! The [`archiver`] consumes the log and writes, per partition,
//! offset-ordered segment files ([`segment`]: zstd-compressed CBOR blocks,
//! each with a CRC) and a JSON manifest per segment ([`SegmentManifest`]).
//! Objects are named
//!
//! ```text
//! p0003/00000000000000012000.seg    the segment holding partition 3 from offset 12000
//! p0003/00000000000000012000.json   its manifest, written after the segment
//! ```
//!
//! A segment is built in memory and published whole (segment, then
//! manifest), so the archive only ever holds complete segments: after a
//! crash the archiver resumes after the last manifest, with no gap and no
//! duplicate. [`source`] reads the archive back as a log source, and chains
//! it to the live log at exactly the next offset.

pub mod archiver;
pub mod config;
pub mod export;
/// The segment format lives with the other wire codecs.
pub use kappa_common::segment;
pub mod source;
pub mod store;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use self::store::{ArchiveStore, StoreError as ObjectError};
use crate::eventlog::{Offset, Partition};

/// The manifest of one published segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SegmentManifest {
    pub format: u16,
    pub partition: Partition,
    pub first_offset: Offset,
    pub last_offset: Offset,
    pub records: u64,
    /// Event-time range of the readings in it, Unix ms.
    pub min_ts_ms: Option<i64>,
    pub max_ts_ms: Option<i64>,
    pub bytes: u64,
    /// CRC-32 of the whole segment file.
    pub crc32: u32,
    pub created_ms: i64,
}

impl SegmentManifest {
    pub fn segment_name(&self) -> String {
        segment_name(self.partition, self.first_offset)
    }
}

pub fn segment_name(partition: Partition, first: Offset) -> String {
    format!("p{partition:04}/{first:020}.seg")
}

pub fn manifest_name(partition: Partition, first: Offset) -> String {
    format!("p{partition:04}/{first:020}.json")
}

/// Every published segment, per partition, in offset order.
#[derive(Debug, Clone, Default)]
pub struct ArchiveIndex {
    pub partitions: BTreeMap<Partition, Vec<SegmentManifest>>,
}

impl ArchiveIndex {
    /// Reads every manifest. Segments without a manifest (a crash between
    /// the two writes) are ignored; overlapping manifests are an error.
    pub fn load(store: &dyn ArchiveStore) -> Result<Self, ArchiveError> {
        let mut partitions: BTreeMap<Partition, Vec<SegmentManifest>> = BTreeMap::new();
        for name in store.list("")?.into_iter().filter(|n| n.ends_with(".json")) {
            let bytes = store.get(&name)?;
            let m: SegmentManifest = serde_json::from_slice(&bytes)
                .map_err(|e| ArchiveError::Damaged(format!("manifest {} does not parse: {e}", store.locate(&name))))?;
            partitions.entry(m.partition).or_default().push(m);
        }
        for (p, list) in partitions.iter_mut() {
            list.sort_by_key(|m| m.first_offset);
            for w in list.windows(2) {
                if w[1].first_offset <= w[0].last_offset {
                    return Err(ArchiveError::Damaged(format!(
                        "partition {p}: segments at {} and {} overlap",
                        w[0].first_offset, w[1].first_offset
                    )));
                }
            }
        }
        Ok(Self { partitions })
    }

    /// The offset after the last archived record of `p` (0 if none).
    pub fn next_offset(&self, p: Partition) -> Offset {
        self.partitions.get(&p).and_then(|l| l.last()).map_or(0, |m| m.last_offset + 1)
    }

    pub fn records(&self) -> u64 {
        self.partitions.values().flatten().map(|m| m.records).sum()
    }
}

/// Archive failures.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum ArchiveError {
    #[error(transparent)]
    Store(#[from] ObjectError),
    #[error("archive damaged: {0}")]
    Damaged(String),
    #[error(transparent)]
    Log(#[from] crate::eventlog::EventLogError),
}
