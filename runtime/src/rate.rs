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

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    /// Requests refused since the key was last within its rate.
    refused: u64,
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
        // Only a key seen for the first time allocates (this runs per message).
        if !buckets.contains_key(key) {
            if buckets.len() >= MAX_KEYS {
                let (rate, burst) = (self.per_second, self.burst);
                buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
            }
            buckets.insert(key.to_string(), Bucket { tokens: self.burst, at: now, refused: 0 });
        }
        let Some(b) = buckets.get_mut(key) else { return Ok(()) };
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.per_second).min(self.burst);
        b.at = now;
        let needed = cost.min(self.burst);
        if b.tokens >= needed {
            b.tokens -= cost;
            b.refused = 0;
            Ok(())
        } else {
            b.refused += 1;
            Err(Refused { wait: Duration::from_secs_f64((needed - b.tokens) / self.per_second), in_a_row: b.refused })
        }
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
