//! The archive's segment format (version 1).
//!
//! A segment holds a contiguous range of one partition's offsets:
//!
//! ```text
//! header  "KAPPASEG" | u16 version = 1 | u32 partition | u64 first offset      (22 bytes, little-endian)
//! block*  u32 payload length | u32 CRC-32 | u64 first offset | u32 records | payload
//! ```
//!
//! A block's payload is zstd-compressed CBOR: an array of `[offset, bytes]`
//! pairs, offsets consecutive from the block's first offset, `bytes` the log
//! record exactly as the log holds it. The CRC covers the block's first
//! offset, record count and payload, so damage to a block is found and
//! located (file, byte position, offset range) before anything is decoded.

use serde::{Deserialize, Serialize};

const MAGIC: &[u8; 8] = b"KAPPASEG";
const VERSION: u16 = 1;
/// Header bytes before the first block.
pub const HEADER_LEN: usize = 22;
const BLOCK_HEADER_LEN: usize = 20;
/// Largest decompressed block accepted when reading.
const MAX_BLOCK_BYTES: usize = 64 << 20;

#[derive(Serialize, Deserialize)]
struct Entry(u64, #[serde(with = "serde_bytes")] Vec<u8>);

/// Builds a segment in memory.
#[derive(Debug)]
pub struct SegmentWriter {
    partition: u32,
    first_offset: u64,
    next_offset: u64,
    out: Vec<u8>,
    block: Vec<(u64, bytes::Bytes)>,
    block_bytes: usize,
    block_limit: usize,
    blocks: u32,
    records: u64,
}

impl SegmentWriter {
    /// A segment of `partition` starting at `first_offset`; blocks are cut
    /// at about `block_limit` uncompressed bytes.
    pub fn new(partition: u32, first_offset: u64, block_limit: usize) -> Self {
        let mut out = Vec::with_capacity(1 << 16);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&partition.to_le_bytes());
        out.extend_from_slice(&first_offset.to_le_bytes());
        Self {
            partition,
            first_offset,
            next_offset: first_offset,
            out,
            block: Vec::new(),
            block_bytes: 0,
            block_limit,
            blocks: 0,
            records: 0,
        }
    }

    /// Appends the record at `offset`, which must come after the last one
    /// (the embedded log's offsets are dense; Kafka's may skip).
    pub fn push(&mut self, offset: u64, value: bytes::Bytes) -> Result<(), SegmentError> {
        if offset < self.next_offset {
            return Err(SegmentError::Gap { partition: self.partition, expected: self.next_offset, got: offset });
        }
        self.block_bytes += value.len() + 12;
        self.block.push((offset, value));
        self.next_offset = offset + 1;
        self.records += 1;
        if self.block_bytes >= self.block_limit {
            self.flush_block();
        }
        Ok(())
    }

    fn flush_block(&mut self) {
        if self.block.is_empty() {
            return;
        }
        let first = self.block[0].0;
        let entries: Vec<Entry> = self.block.drain(..).map(|(o, v)| Entry(o, v.to_vec())).collect();
        let cbor = serde_cbor::to_vec(&entries).unwrap_or_default();
        let payload = crate::frame::compress(&cbor, 3);
        let records = entries.len() as u32;
        let crc = block_crc(first, records, &payload);
        self.out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.out.extend_from_slice(&crc.to_le_bytes());
        self.out.extend_from_slice(&first.to_le_bytes());
        self.out.extend_from_slice(&records.to_le_bytes());
        self.out.extend_from_slice(&payload);
        self.block_bytes = 0;
        self.blocks += 1;
    }

    /// Records so far.
    pub fn records(&self) -> u64 {
        self.records
    }

    /// The last offset pushed.
    pub fn last_offset(&self) -> Option<u64> {
        (self.records > 0).then(|| self.next_offset - 1)
    }

    /// Bytes written so far (completed blocks).
    pub fn bytes(&self) -> usize {
        self.out.len()
    }

    pub fn first_offset(&self) -> u64 {
        self.first_offset
    }

    /// The finished segment.
    pub fn finish(mut self) -> Vec<u8> {
        self.flush_block();
        self.out
    }
}

fn block_crc(first: u64, records: u32, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&first.to_le_bytes());
    h.update(&records.to_le_bytes());
    h.update(payload);
    h.finalize()
}

/// A CRC-32 of a whole segment file, for its manifest.
pub fn file_crc(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// One block read back.
#[derive(Debug)]
pub enum Block {
    /// The block's records, `(offset, bytes)`.
    Records(Vec<(u64, bytes::Bytes)>),
    /// A damaged block: where, and which offsets it held (if its header is
    /// readable; otherwise `records` is `None` and the rest of the file is lost).
    Damaged { position: usize, first_offset: u64, records: Option<u32>, reason: String },
}

/// Reads a segment's blocks in order.
#[derive(Debug, Clone)]
pub struct SegmentReader {
    bytes: bytes::Bytes,
    pos: usize,
    pub partition: u32,
    pub first_offset: u64,
    next_offset: u64,
}

impl SegmentReader {
    pub fn new(bytes: impl Into<bytes::Bytes>) -> Result<Self, SegmentError> {
        let bytes: bytes::Bytes = bytes.into();
        if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
            return Err(SegmentError::NotASegment);
        }
        let version = u16::from_le_bytes([bytes[8], bytes[9]]);
        if version != VERSION {
            return Err(SegmentError::UnknownVersion(version));
        }
        let partition = u32::from_le_bytes(bytes[10..14].try_into().unwrap_or_default());
        let first_offset = u64::from_le_bytes(bytes[14..22].try_into().unwrap_or_default());
        Ok(Self { bytes, pos: HEADER_LEN, partition, first_offset, next_offset: first_offset })
    }

    /// The next block, `None` at the end.
    pub fn next_block(&mut self) -> Option<Block> {
        if self.pos >= self.bytes.len() {
            return None;
        }
        let position = self.pos;
        let all = self.bytes.clone();
        let rest = &all[self.pos..];
        if rest.len() < BLOCK_HEADER_LEN {
            self.pos = self.bytes.len();
            return Some(Block::Damaged {
                position,
                first_offset: self.next_offset,
                records: None,
                reason: "truncated block header".into(),
            });
        }
        let len = u32::from_le_bytes(rest[0..4].try_into().unwrap_or_default()) as usize;
        let crc = u32::from_le_bytes(rest[4..8].try_into().unwrap_or_default());
        let first = u64::from_le_bytes(rest[8..16].try_into().unwrap_or_default());
        let records = u32::from_le_bytes(rest[16..20].try_into().unwrap_or_default());
        let Some(payload) = rest.get(BLOCK_HEADER_LEN..BLOCK_HEADER_LEN + len) else {
            self.pos = self.bytes.len();
            return Some(Block::Damaged {
                position,
                first_offset: self.next_offset,
                records: None,
                reason: format!("block claims {len} bytes, past the end of the file"),
            });
        };
        self.pos += BLOCK_HEADER_LEN + len;
        if block_crc(first, records, payload) != crc || first < self.next_offset {
            // The header may be what is damaged: past a plausible header the
            // reader can go on; otherwise the rest of the file is lost.
            let header_ok = first >= self.next_offset && (records as usize) <= MAX_BLOCK_BYTES;
            if !header_ok {
                self.pos = self.bytes.len();
            }
            return Some(Block::Damaged {
                position,
                first_offset: if header_ok { first } else { self.next_offset },
                records: header_ok.then_some(records),
                reason: "checksum mismatch".into(),
            });
        }
        let decoded = crate::frame::decompress(
            payload,
            &crate::frame::FrameLimits { max_compressed: len, max_decompressed: MAX_BLOCK_BYTES, max_ratio: 1000 },
        )
        .map_err(|e| e.to_string())
        .and_then(|cbor| block_entries(cbor.into()));
        match decoded {
            Ok(entries) if entries.len() == records as usize => {
                self.next_offset = entries.last().map_or(self.next_offset, |e| e.0 + 1);
                Some(Block::Records(entries))
            }
            Ok(_) | Err(_) => Some(Block::Damaged {
                position,
                first_offset: first,
                records: Some(records),
                reason: "block does not decode".into(),
            }),
        }
    }
}

/// A decompressed block's entries, each record a slice of `cbor` (no copy)
/// when the block is in the definite-length form the writer produces;
/// through the general CBOR decoder otherwise.
fn block_entries(cbor: bytes::Bytes) -> Result<Vec<(u64, bytes::Bytes)>, String> {
    if let Some(entries) = entries_in_place(&cbor) {
        return Ok(entries);
    }
    let entries = serde_cbor::from_slice::<Vec<Entry>>(&cbor).map_err(|e| e.to_string())?;
    Ok(entries.into_iter().map(|Entry(o, v)| (o, v.into())).collect())
}

/// `[[offset, bytes], ...]` with definite lengths, read in place; `None`
/// for anything else (the caller decodes it the general way).
fn entries_in_place(cbor: &bytes::Bytes) -> Option<Vec<(u64, bytes::Bytes)>> {
    let mut at = 0;
    let n = usize::try_from(cbor_head(cbor, &mut at, 4)?).ok()?;
    // Each entry takes at least 3 bytes: no allocation beyond what the block can hold.
    let mut out = Vec::with_capacity(n.min(cbor.len() / 3));
    for _ in 0..n {
        (cbor_head(cbor, &mut at, 4)? == 2).then_some(())?;
        let offset = cbor_head(cbor, &mut at, 0)?;
        let len = usize::try_from(cbor_head(cbor, &mut at, 2)?).ok()?;
        let end = at.checked_add(len).filter(|e| *e <= cbor.len())?;
        out.push((offset, cbor.slice(at..end)));
        at = end;
    }
    (at == cbor.len()).then_some(out)
}

/// The argument of the CBOR item of major type `major` at `*at` (definite
/// lengths only), moving `*at` past its head.
fn cbor_head(bytes: &[u8], at: &mut usize, major: u8) -> Option<u64> {
    let b = *bytes.get(*at)?;
    *at += 1;
    (b >> 5 == major).then_some(())?;
    let width = match b & 0x1f {
        n @ 0..=23 => return Some(u64::from(n)),
        24 => 1,
        25 => 2,
        26 => 4,
        27 => 8,
        _ => return None,
    };
    let arg = bytes.get(*at..*at + width)?;
    *at += width;
    Some(arg.iter().fold(0u64, |n, b| n << 8 | u64::from(*b)))
}

/// Segment-level failures.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SegmentError {
    #[error("not an archive segment (bad magic)")]
    NotASegment,
    #[error("archive segment format version {0} is not supported (this build reads 1)")]
    UnknownVersion(u16),
    #[error("partition {partition}: expected an offset from {expected}, got {got}")]
    Gap { partition: u32, expected: u64, got: u64 },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_read_in_place_as_the_general_decoder_reads_them() {
        let entries = vec![
            Entry(0, vec![]),
            Entry(23, vec![1; 23]),
            Entry(24, vec![2; 24]),
            Entry(300, vec![3; 300]),
            Entry(70_000, vec![4; 70_000]),
            Entry(u64::MAX, vec![5]),
        ];
        let cbor = bytes::Bytes::from(serde_cbor::to_vec(&entries).unwrap());
        let fast = entries_in_place(&cbor).expect("the writer's form is read in place");
        let general: Vec<(u64, bytes::Bytes)> = entries.into_iter().map(|Entry(o, v)| (o, v.into())).collect();
        assert_eq!(fast, general);
        // Truncated or trailing bytes: not read in place (the general decoder then refuses them).
        assert!(entries_in_place(&cbor.slice(..cbor.len() - 1)).is_none());
        let mut longer = cbor.to_vec();
        longer.push(0);
        assert!(entries_in_place(&bytes::Bytes::from(longer.clone())).is_none());
        assert!(block_entries(bytes::Bytes::from(longer)).is_err());
        // An indefinite-length array is valid CBOR the general decoder reads.
        let mut indefinite = vec![0x9f];
        indefinite.extend_from_slice(&serde_cbor::to_vec(&Entry(7, vec![9])).unwrap());
        indefinite.push(0xff);
        assert_eq!(block_entries(bytes::Bytes::from(indefinite)).unwrap(), [(7, bytes::Bytes::from(vec![9]))]);
    }

    fn segment(n: u64) -> Vec<u8> {
        let mut w = SegmentWriter::new(3, 100, 200);
        for o in 100..100 + n {
            w.push(o, bytes::Bytes::from(format!("record {o}"))).unwrap();
        }
        w.finish()
    }

    /// Offsets read, and (position, first offset, records) of damaged blocks.
    type Read = (Vec<u64>, Vec<(usize, u64, Option<u32>)>);

    fn read_all(bytes: &[u8]) -> Read {
        let mut r = SegmentReader::new(bytes.to_vec()).unwrap();
        let (mut ok, mut bad) = (Vec::new(), Vec::new());
        while let Some(b) = r.next_block() {
            match b {
                Block::Records(recs) => ok.extend(recs.iter().map(|(o, _)| *o)),
                Block::Damaged { position, first_offset, records, .. } => bad.push((position, first_offset, records)),
            }
        }
        (ok, bad)
    }

    #[test]
    fn records_come_back_in_order_across_blocks() {
        let bytes = segment(50);
        let (ok, bad) = read_all(&bytes);
        assert_eq!(ok, (100..150).collect::<Vec<_>>());
        assert!(bad.is_empty());
        let mut r = SegmentReader::new(bytes.clone()).unwrap();
        assert_eq!((r.partition, r.first_offset), (3, 100));
        let Some(Block::Records(first)) = r.next_block() else { panic!() };
        assert_eq!(&first[0].1[..], b"record 100");
    }

    #[test]
    fn a_flipped_byte_is_found_and_located_and_the_rest_still_reads() {
        let mut bytes = segment(50);
        let (ok, _) = read_all(&bytes);
        // Damage a byte inside the second block's payload.
        let mut r = SegmentReader::new(bytes.clone()).unwrap();
        r.next_block();
        let second = r.pos;
        bytes[second + BLOCK_HEADER_LEN + 3] ^= 0xff;
        let (ok2, bad) = read_all(&bytes);
        assert_eq!(bad.len(), 1);
        let (position, first_offset, records) = bad[0];
        assert_eq!(position, second);
        let lost = records.unwrap() as usize;
        assert_eq!(ok2.len(), ok.len() - lost);
        assert!(!ok2.contains(&first_offset));
    }

    #[test]
    fn offsets_must_increase() {
        let mut w = SegmentWriter::new(0, 0, 100);
        w.push(0, bytes::Bytes::new()).unwrap();
        w.push(2, bytes::Bytes::new()).unwrap();
        assert_eq!(w.push(2, bytes::Bytes::new()), Err(SegmentError::Gap { partition: 0, expected: 3, got: 2 }));
        assert_eq!((w.records(), w.last_offset()), (2, Some(2)));
    }

    #[test]
    fn truncation_is_reported_not_a_panic() {
        let bytes = segment(50);
        let (_, bad) = read_all(&bytes[..bytes.len() - 5]);
        assert_eq!(bad.len(), 1);
        assert_eq!(bad[0].2, None);
    }
}
