//! Retry delays: exponential with jitter, so a fleet of gateways that lost
//! the cloud together does not come back in lock-step.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

/// Exponential backoff with "equal jitter": each delay is uniform in
/// `[cap/2, cap]`, where `cap` doubles per failure from `min` up to `max`.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    failures: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Self { min, max: max.max(min), failures: 0 }
    }

    /// The delay before the next attempt, given a uniform sample in `[0, 1)`.
    pub fn next_with(&mut self, unit: f64) -> Duration {
        let delay = jittered(self.min, self.max, self.failures, unit);
        self.failures = self.failures.saturating_add(1);
        delay
    }

    /// The delay before the next attempt.
    pub fn next_delay(&mut self) -> Duration {
        let unit = (RandomState::new().hash_one(self.failures) >> 11) as f64 / (1u64 << 53) as f64;
        self.next_with(unit)
    }

    /// Call after a success.
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// The delay after `failures` failures in a row (0 for the first retry):
/// uniform in `[cap/2, cap]` for a `unit` sample in `[0, 1)`, where `cap` is
/// `min` doubled per failure, at most `max`.
pub fn jittered(min: Duration, max: Duration, failures: u32, unit: f64) -> Duration {
    let cap = min.saturating_mul(1u32 << failures.min(20)).min(max.max(min));
    cap.mul_f64(0.5 + 0.5 * unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap_and_stay_within_the_jitter_band() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
        let caps = [100, 200, 400, 800, 1000, 1000];
        for cap in caps {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(cap / 2) && d <= Duration::from_millis(cap), "{d:?} for cap {cap}");
        }
    }

    #[test]
    fn a_success_starts_over() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        for _ in 0..5 {
            b.next_with(1.0);
        }
        b.reset();
        assert_eq!(b.next_with(1.0), Duration::from_millis(100));
    }
}
