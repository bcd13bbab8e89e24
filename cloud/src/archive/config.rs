//! The `[archive]` section: where and how the event log is archived (docs/archive.md).

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// The archive of the event log (see docs/archive.md).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArchiveConfig {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Directory of segments and manifests (default `{data_dir}/archive`).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// An object store instead of the directory: `s3://bucket/prefix` or
    /// `az://container/prefix`; credentials from the environment.
    #[serde(default)]
    pub url: Option<String>,
    /// Publish a segment once it holds this many compressed bytes.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: usize,
    /// Publish a segment once it has been open this long.
    #[serde(default = "default_segment_age", with = "humantime_serde")]
    pub segment_age: Duration,
    /// Replay skips damaged blocks (counting them) instead of stopping.
    #[serde(default)]
    pub skip_damaged: bool,
}

fn default_true() -> bool {
    true
}
fn default_segment_bytes() -> usize {
    8 << 20
}
fn default_segment_age() -> Duration {
    Duration::from_secs(300)
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            path: None,
            url: None,
            segment_bytes: default_segment_bytes(),
            segment_age: default_segment_age(),
            skip_damaged: false,
        }
    }
}
