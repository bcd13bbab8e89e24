//! The `[processor]` section: checkpoints, watermarks, polling and dedup.

use std::time::Duration;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessorConfig {
    /// How often operator state and log positions are committed together.
    #[serde(default = "default_checkpoint", with = "humantime_serde")]
    pub checkpoint_interval: Duration,
    /// Bound on out-of-order event time: watermark = max event time - this.
    #[serde(default = "default_ooo", with = "humantime_serde")]
    pub max_out_of_orderness: Duration,
    /// Records read from the log per step.
    #[serde(default = "default_poll")]
    pub poll_records: usize,
    /// A partition with no new record for this long stops holding the watermark back.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// How long (in event time) a device's sequence numbers are remembered for dedup.
    #[serde(default = "default_dedup_horizon", with = "humantime_serde")]
    pub dedup_horizon: Duration,
}

fn default_checkpoint() -> Duration {
    Duration::from_secs(1)
}
fn default_ooo() -> Duration {
    Duration::from_secs(10)
}
fn default_poll() -> usize {
    5000
}
fn default_idle() -> Duration {
    Duration::from_secs(30)
}
fn default_dedup_horizon() -> Duration {
    Duration::from_secs(24 * 3600)
}

impl Default for ProcessorConfig {
    fn default() -> Self {
        Self {
            checkpoint_interval: default_checkpoint(),
            max_out_of_orderness: default_ooo(),
            poll_records: default_poll(),
            idle_timeout: default_idle(),
            dedup_horizon: default_dedup_horizon(),
        }
    }
}
