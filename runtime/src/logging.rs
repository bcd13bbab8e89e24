//! Structured logs on standard error: human-readable text or JSON lines.
//! Text is coloured only when standard error is a terminal: files, pipes and
//! the journal get plain text.

use std::fmt::Display;
use std::io::IsTerminal;

/// `items` as one log field, space-separated (`0 1 5`): JSON logs carry a
/// plain string rather than Rust's debug syntax (`[0, 1, 5]`).
pub fn listed<T: Display>(items: impl IntoIterator<Item = T>) -> String {
    items.into_iter().map(|i| i.to_string()).collect::<Vec<_>>().join(" ")
}

/// A map as one log field, `key=value` pairs space-separated (`0=120 1=96`),
/// rather than Rust's debug syntax (`{0: 120, 1: 96}`).
pub fn pairs<K: Display, V: Display>(items: impl IntoIterator<Item = (K, V)>) -> String {
    items.into_iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
}

/// Lets a repeated log line through at most once per period; the caller
/// counts every occurrence in a metric. A flood of refusals then cannot
/// flood the log.
#[derive(Debug)]
pub struct Throttle {
    period_ms: i64,
    next_ms: std::sync::atomic::AtomicI64,
}

impl Throttle {
    pub const fn new(period: std::time::Duration) -> Self {
        Self { period_ms: period.as_millis() as i64, next_ms: std::sync::atomic::AtomicI64::new(i64::MIN) }
    }

    /// Whether the line may be logged at `now_ms` (and the next one only a
    /// period later).
    pub fn ready_at(&self, now_ms: i64) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let next = self.next_ms.load(Relaxed);
        now_ms >= next
            && self.next_ms.compare_exchange(next, now_ms.saturating_add(self.period_ms), Relaxed, Relaxed).is_ok()
    }

    /// [`Self::ready_at`] now.
    pub fn ready(&self) -> bool {
        self.ready_at(crate::time::now_ms())
    }
}

/// Installs the global subscriber. `RUST_LOG` overrides `default_filter`.
pub fn init(format: &str, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_throttled_line_passes_once_per_period() {
        let t = Throttle::new(std::time::Duration::from_secs(10));
        let passed: Vec<i64> = (0..100).map(|i| i * 1_000).filter(|now| t.ready_at(*now)).collect();
        assert_eq!(passed, [0, 10_000, 20_000, 30_000, 40_000, 50_000, 60_000, 70_000, 80_000, 90_000]);
    }
}
