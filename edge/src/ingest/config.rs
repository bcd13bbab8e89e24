//! The `[clock]` section: device clocks checked against the gateway's at receipt.

use std::time::Duration;

use serde::Deserialize;

/// What to do with a reading whose device clock disagrees with the gateway's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockPolicy {
    /// Refuse the reading: it goes to the quarantine table with reason `clock_skew`.
    Quarantine,
    /// Keep the reading with the gateway's receive time as its timestamp.
    Correct,
}

/// Device clock checks, against the gateway clock at receipt.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClockConfig {
    /// A device timestamp further ahead than this is skewed.
    #[serde(default = "default_max_ahead", with = "humantime_serde")]
    pub max_ahead: Duration,
    /// A device timestamp further behind than this is skewed (devices that
    /// buffer through an outage send legitimately old readings: size this
    /// for the longest buffering you expect).
    #[serde(default = "default_max_behind", with = "humantime_serde")]
    pub max_behind: Duration,
    #[serde(default = "default_clock_policy")]
    pub policy: ClockPolicy,
}

fn default_max_ahead() -> Duration {
    Duration::from_secs(300)
}
fn default_max_behind() -> Duration {
    Duration::from_secs(30 * 86_400)
}
fn default_clock_policy() -> ClockPolicy {
    ClockPolicy::Quarantine
}

impl Default for ClockConfig {
    fn default() -> Self {
        Self { max_ahead: default_max_ahead(), max_behind: default_max_behind(), policy: default_clock_policy() }
    }
}
