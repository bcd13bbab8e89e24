//! An archive segment file, read block by block. Random bytes rarely pass a
//! block's CRC, so an input that does not start like a segment (`K`) is
//! wrapped into a well-formed one: its first byte is the block's record
//! count, the rest the block's CBOR, zstd-framed, with a valid CRC. That
//! reaches the block decoder behind the checksum.
#![no_main]

use kappa_common::segment::{Block, SegmentReader};
use libfuzzer_sys::fuzz_target;

fn read(bytes: Vec<u8>) {
    let Ok(mut reader) = SegmentReader::new(bytes) else { return };
    // Every block moves the reader forward; the bound only guards the fuzzer.
    for _ in 0..100_000 {
        match reader.next_block() {
            None => return,
            Some(Block::Records(_) | Block::Damaged { .. }) => {}
        }
    }
    panic!("the segment reader did not reach the end");
}

fuzz_target!(|data: &[u8]| {
    match data.split_first() {
        Some((first, rest)) if *first != b'K' => {
            let payload = kappa_common::frame::compress(rest, 1);
            let (offset, records) = (7u64, u32::from(*first));
            let mut crc = crc32fast::Hasher::new();
            crc.update(&offset.to_le_bytes());
            crc.update(&records.to_le_bytes());
            crc.update(&payload);
            let mut seg = b"KAPPASEG".to_vec();
            seg.extend_from_slice(&1u16.to_le_bytes());
            seg.extend_from_slice(&0u32.to_le_bytes());
            seg.extend_from_slice(&offset.to_le_bytes());
            seg.extend_from_slice(&(payload.len() as u32).to_le_bytes());
            seg.extend_from_slice(&crc.finalize().to_le_bytes());
            seg.extend_from_slice(&offset.to_le_bytes());
            seg.extend_from_slice(&records.to_le_bytes());
            seg.extend_from_slice(&payload);
            read(seg);
        }
        _ => read(data.to_vec()),
    }
});
