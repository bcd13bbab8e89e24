//! zstd framing with hard caps, for bytes that arrive from outside the process.
//!
//! [`decompress`] never allocates more than the configured output cap, never
//! lets the decoder reserve a window larger than [`MAX_WINDOW_LOG`] allows,
//! and refuses a frame whose expansion ratio exceeds the configured maximum:
//! a "zstd bomb" costs the receiver at most `max_decompressed` bytes.

use std::io::Read;

/// Largest zstd window (2^23 = 8 MiB) a decoder will allocate for one frame.
pub const MAX_WINDOW_LOG: u32 = 23;

/// Caps on one compressed frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameLimits {
    /// Largest compressed input accepted.
    pub max_compressed: usize,
    /// Largest decompressed output produced.
    pub max_decompressed: usize,
    /// Largest ratio of decompressed to compressed size.
    pub max_ratio: usize,
}

impl Default for FrameLimits {
    /// 4 MiB compressed, 32 MiB and 100:1 decompressed.
    fn default() -> Self {
        Self { max_compressed: 4 << 20, max_decompressed: 32 << 20, max_ratio: 100 }
    }
}

/// Compresses `data` into one zstd frame at `level`.
pub fn compress(data: &[u8], level: i32) -> Vec<u8> {
    // Compressing from a slice into a Vec only fails on allocation failure.
    zstd::bulk::compress(data, level).unwrap_or_default()
}

/// Decompresses one zstd frame, refusing to go past `limits`.
pub fn decompress(data: &[u8], limits: &FrameLimits) -> Result<Vec<u8>, FrameError> {
    if data.len() > limits.max_compressed {
        return Err(FrameError::CompressedTooLarge { len: data.len(), max: limits.max_compressed });
    }
    let cap = limits.max_decompressed.min(data.len().saturating_mul(limits.max_ratio));
    let mut decoder = zstd::stream::read::Decoder::with_buffer(data).map_err(|e| FrameError::Corrupt(e.to_string()))?;
    decoder.window_log_max(MAX_WINDOW_LOG).map_err(|e| FrameError::Corrupt(e.to_string()))?;
    let mut out = Vec::with_capacity(cap.min(data.len().saturating_mul(4)));
    let read = decoder.take(cap as u64 + 1).read_to_end(&mut out).map_err(|e| FrameError::Corrupt(e.to_string()))?;
    if read > cap {
        return Err(FrameError::DecompressedTooLarge {
            compressed: data.len(),
            cap,
            max: limits.max_decompressed,
            max_ratio: limits.max_ratio,
        });
    }
    Ok(out)
}

/// Why a frame was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("compressed body of {len} bytes exceeds the {max}-byte limit")]
    CompressedTooLarge { len: usize, max: usize },
    #[error(
        "{compressed}-byte body inflates past {cap} bytes (limits: {max} bytes, {max_ratio}:1); refusing a possible decompression bomb"
    )]
    DecompressedTooLarge { compressed: usize, cap: usize, max: usize, max_ratio: usize },
    #[error("corrupt zstd frame: {0}")]
    Corrupt(String),
}

impl FrameError {
    /// A short, stable label for metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::CompressedTooLarge { .. } => "body_too_large",
            Self::DecompressedTooLarge { .. } => "decompression_bomb",
            Self::Corrupt(_) => "corrupt_frame",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_within_limits() {
        let data = b"hello hello hello hello".repeat(10);
        assert_eq!(decompress(&compress(&data, 3), &FrameLimits::default()), Ok(data));
    }

    #[test]
    fn a_zstd_bomb_is_refused_at_the_ratio_cap() {
        let zeros = vec![0u8; 64 << 20];
        let bomb = compress(&zeros, 19);
        assert!(bomb.len() < 64 << 10, "the bomb should be tiny: {}", bomb.len());
        let err = decompress(&bomb, &FrameLimits::default()).unwrap_err();
        assert_eq!(err.reason(), "decompression_bomb");
    }

    #[test]
    fn output_cap_applies_even_when_the_ratio_is_fine() {
        let data: Vec<u8> = (0..100_000u32).flat_map(|i| i.to_le_bytes()).collect();
        let limits = FrameLimits { max_decompressed: 1000, ..FrameLimits::default() };
        assert_eq!(decompress(&compress(&data, 1), &limits).unwrap_err().reason(), "decompression_bomb");
    }

    #[test]
    fn oversized_compressed_input_is_refused_before_decoding() {
        let limits = FrameLimits { max_compressed: 10, ..FrameLimits::default() };
        assert_eq!(decompress(&[0u8; 11], &limits), Err(FrameError::CompressedTooLarge { len: 11, max: 10 }));
    }

    #[test]
    fn garbage_is_reported_as_corrupt() {
        assert_eq!(decompress(b"definitely not zstd", &FrameLimits::default()).unwrap_err().reason(), "corrupt_frame");
    }
}
