//! The `[aggregate]` section and what the agent forwards (`forward.mode`,
//! `[forward.hybrid]`): the settings of pre-aggregation.

use std::time::Duration;

use serde::Deserialize;

/// Pre-aggregation: per device and metric, event-time windows with count,
/// min, max, sum, sum of squares, first and last.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Window sizes, e.g. `["10s", "1m"]` (each divides a day evenly).
    #[serde(default = "default_windows")]
    pub windows: Vec<String>,
    /// A window closes once its device's readings reach this far past its end...
    #[serde(default = "default_agg_lateness", with = "humantime_serde")]
    pub lateness: Duration,
    /// ...or once no reading for it arrived for this long (gateway clock).
    #[serde(default = "default_idle_close", with = "humantime_serde")]
    pub idle_close: Duration,
}

fn default_windows() -> Vec<String> {
    vec!["1m".into()]
}
fn default_agg_lateness() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_close() -> Duration {
    Duration::from_secs(30)
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self { windows: default_windows(), lateness: default_agg_lateness(), idle_close: default_idle_close() }
    }
}

impl AggregateConfig {
    /// The window sizes in milliseconds.
    pub fn window_ms(&self) -> Result<Vec<i64>, String> {
        self.windows
            .iter()
            .map(|w| {
                let ms = humantime::parse_duration(w).map_err(|e| format!("{w:?} is not a duration: {e}"))?.as_millis();
                if ms == 0 || 86_400_000 % ms != 0 {
                    return Err(format!("{w:?} must be above zero and divide a day evenly"));
                }
                Ok(ms as i64)
            })
            .collect()
    }
}

/// What the forwarder sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ForwardMode {
    /// Every raw reading.
    Raw,
    /// Closed windows only; raw readings stay in the local log.
    Aggregate,
    /// Closed windows, plus the raw readings that moved past a deadband or trip a rule.
    Hybrid,
}

/// Which raw readings `hybrid` mode forwards.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HybridConfig {
    /// Per metric: forward a reading whose value moved more than this since
    /// the last one forwarded for its device (the first one always goes).
    #[serde(default)]
    pub deadband: std::collections::BTreeMap<String, f64>,
    /// Local rules, `metric > number` (also `>=`, `<`, `<=`, `==`, `!=`):
    /// a reading that trips one is forwarded.
    #[serde(default)]
    pub rules: Vec<String>,
}

impl AggregateConfig {
    /// The section's own problems, each with its key.
    pub fn problems(&self) -> Vec<String> {
        match self.window_ms() {
            Ok(_) => Vec::new(),
            Err(e) => vec![format!("aggregate.windows: {e}")],
        }
    }
}

impl HybridConfig {
    /// The `[forward.hybrid]` table's own problems, each with its key.
    pub fn problems(&self) -> Vec<String> {
        let mut errors = Vec::new();
        for rule in &self.rules {
            if let Err(e) = super::Rule::parse(rule) {
                errors.push(format!("forward.hybrid.rules: {e}"));
            }
        }
        for (metric, band) in &self.deadband {
            if !band.is_finite() || *band < 0.0 {
                errors.push(format!("forward.hybrid.deadband.{metric}: {band} must be a number ≥ 0"));
            }
        }
        errors
    }
}
