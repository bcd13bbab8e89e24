//! Token buckets per key (a device, a gateway): `per_second` tokens a
//! second, at most `burst` held. A request costing more than the burst is
//! admitted from a full bucket and leaves it in debt, so large batches pass
//! while the average rate stays bounded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept before idle (full) ones are forgotten.
const MAX_KEYS: usize = 100_000;

/// Per-key token buckets.
#[derive(Debug)]
pub struct KeyedRate {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

/// One token bucket (a key's in [`KeyedRate`], or a connection's own).
#[derive(Debug, Clone, Copy)]
pub struct Bucket {
    tokens: f64,
    at: Instant,
    /// Requests refused since the bucket was last within its rate.
    refused: u64,
}

impl Bucket {
    /// A full bucket at `now`.
    pub fn full(burst: f64, now: Instant) -> Self {
        Self { tokens: burst.max(1.0), at: now, refused: 0 }
    }

    /// Takes `cost` tokens at `now` from a bucket refilled at `per_second`
    /// up to `burst` (positive), or says how long to wait.
    pub fn admit(&mut self, per_second: f64, burst: f64, cost: f64, now: Instant) -> Result<(), Refused> {
        let (per_second, burst) = (per_second.max(f64::MIN_POSITIVE), burst.max(1.0));
        self.tokens = (self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * per_second).min(burst);
        self.at = now;
        let needed = cost.min(burst);
        if self.tokens >= needed {
            self.tokens -= cost;
            self.refused = 0;
            Ok(())
        } else {
            self.refused += 1;
            Err(Refused { wait: Duration::from_secs_f64((needed - self.tokens) / per_second), in_a_row: self.refused })
        }
    }

    /// Whether the bucket is full again at `now`.
    fn is_full(&self, per_second: f64, burst: f64, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.at).as_secs_f64() * per_second >= burst
    }
}

/// A refused request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Refused {
    /// When the same request would be admitted.
    pub wait: Duration,
    /// Requests refused in a row for this key (1 for the first).
    pub in_a_row: u64,
}

impl KeyedRate {
    /// `per_second` must be positive.
    pub fn new(per_second: f64, burst: f64) -> Self {
        Self { per_second: per_second.max(f64::MIN_POSITIVE), burst: burst.max(1.0), buckets: Default::default() }
    }

    /// Takes `cost` tokens for `key` at `now`, or says how long to wait.
    pub fn admit(&self, key: &str, cost: f64, now: Instant) -> Result<(), Refused> {
        let Ok(mut buckets) = self.buckets.lock() else { return Ok(()) };
        let (rate, burst) = (self.per_second, self.burst);
        // Only a key seen for the first time allocates (this runs per message).
        if !buckets.contains_key(key) {
            if buckets.len() >= MAX_KEYS {
                buckets.retain(|_, b| !b.is_full(rate, burst, now));
            }
            buckets.insert(key.to_string(), Bucket::full(burst, now));
        }
        let Some(b) = buckets.get_mut(key) else { return Ok(()) };
        b.admit(rate, burst, cost, now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_then_the_rate_per_key() {
        let rate = KeyedRate::new(10.0, 5.0);
        let t = Instant::now();
        let burst: Vec<bool> = (0..7).map(|_| rate.admit("a", 1.0, t).is_ok()).collect();
        assert_eq!(burst, [true, true, true, true, true, false, false]);
        assert_eq!(rate.admit("a", 1.0, t).unwrap_err().in_a_row, 3);
        assert!(rate.admit("b", 1.0, t).is_ok(), "another key has its own bucket");
        assert!(rate.admit("a", 1.0, t + Duration::from_millis(100)).is_ok(), "one token per 100 ms");
        assert!(rate.admit("a", 1.0, t + Duration::from_millis(100)).is_err());
    }

    #[test]
    fn a_single_bucket_refills_at_its_rate() {
        let t = Instant::now();
        let mut b = Bucket::full(2.0, t);
        assert!(b.admit(10.0, 2.0, 1.0, t).is_ok() && b.admit(10.0, 2.0, 1.0, t).is_ok());
        assert_eq!(b.admit(10.0, 2.0, 1.0, t).unwrap_err().in_a_row, 1);
        assert!(b.admit(10.0, 2.0, 1.0, t + Duration::from_millis(100)).is_ok());
    }

    #[test]
    fn a_request_larger_than_the_burst_passes_from_a_full_bucket_and_leaves_a_debt() {
        let rate = KeyedRate::new(1000.0, 2000.0);
        let t = Instant::now();
        assert!(rate.admit("gw", 5000.0, t).is_ok());
        let refused = rate.admit("gw", 5000.0, t).unwrap_err();
        // 3,000 in debt: 5 s until the bucket is full again.
        assert!((refused.wait.as_secs_f64() - 5.0).abs() < 1e-6, "{refused:?}");
        assert!(rate.admit("gw", 5000.0, t + Duration::from_secs(5)).is_ok());
    }
}
