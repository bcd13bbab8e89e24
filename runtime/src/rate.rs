//! Token buckets per key (a device, a gateway): `per_second` tokens a
//! second, at most `burst` held. A request costing more than the burst is
//! admitted from a full bucket and leaves it in debt, so large batches pass
//! while the average rate stays bounded.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Buckets kept at most: keys come from outside (a device id in a topic, a
/// gateway's header), and a flood of new ones must not grow memory.
pub const MAX_KEYS: usize = 100_000;

/// Per-key token buckets, at most `capacity` of them. The keys live in two
/// generations: a key used goes to the young one; when the young one holds
/// half the capacity, the old one is forgotten and the young one becomes
/// old. So the keys forgotten are those unused for a whole generation
/// (least recently used, roughly), each step is O(1), and a key in use
/// keeps its bucket however many new keys arrive.
#[derive(Debug)]
pub struct KeyedRate {
    per_second: f64,
    burst: f64,
    capacity: usize,
    buckets: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    young: HashMap<String, Bucket>,
    old: HashMap<String, Bucket>,
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
        let per_second = per_second.max(f64::MIN_POSITIVE);
        self.refill(per_second, burst, now);
        let burst = burst.max(1.0);
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

    /// Takes `cost` tokens at `now` whatever the bucket holds: it may go
    /// into debt, which [`Bucket::debt`] says how long to repay (a sender
    /// that spends first and waits after, like the agent's forwarder).
    pub fn spend(&mut self, per_second: f64, burst: f64, cost: f64, now: Instant) {
        self.refill(per_second, burst, now);
        self.tokens -= cost;
    }

    /// How long until the bucket is out of debt, if it is in debt at `now`.
    pub fn debt(&mut self, per_second: f64, burst: f64, now: Instant) -> Option<Duration> {
        self.refill(per_second, burst, now);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / per_second.max(f64::MIN_POSITIVE)))
    }

    fn refill(&mut self, per_second: f64, burst: f64, now: Instant) {
        let gained = now.saturating_duration_since(self.at).as_secs_f64() * per_second;
        self.tokens = (self.tokens + gained).min(burst.max(1.0));
        self.at = now;
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
        Self::with_capacity(per_second, burst, MAX_KEYS)
    }

    /// At most `capacity` keys (at least 2).
    pub fn with_capacity(per_second: f64, burst: f64, capacity: usize) -> Self {
        Self {
            per_second: per_second.max(f64::MIN_POSITIVE),
            burst: burst.max(1.0),
            capacity: capacity.max(2),
            buckets: Default::default(),
        }
    }

    /// Takes `cost` tokens for `key` at `now`, or says how long to wait.
    pub fn admit(&self, key: &str, cost: f64, now: Instant) -> Result<(), Refused> {
        // A panic elsewhere while holding the lock leaves the buckets as
        // they were: keep enforcing them (never admit everything).
        let mut g = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (rate, burst) = (self.per_second, self.burst);
        if let Some(b) = g.young.get_mut(key) {
            return b.admit(rate, burst, cost, now);
        }
        // Only a key seen for the first time allocates (this runs per
        // message); one from the old generation moves over with its bucket.
        let (owned, bucket) = match g.old.remove_entry(key) {
            Some(found) => found,
            None => (key.to_string(), Bucket::full(burst, now)),
        };
        if g.young.len() >= self.capacity / 2 {
            g.old = std::mem::take(&mut g.young);
        }
        g.young.entry(owned).or_insert(bucket).admit(rate, burst, cost, now)
    }

    /// Keys held now (at most the capacity).
    pub fn keys(&self) -> usize {
        let g = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        g.young.len() + g.old.len()
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

    #[test]
    fn a_flood_of_new_keys_stays_within_the_capacity_and_a_key_in_use_keeps_its_bucket() {
        let rate = KeyedRate::with_capacity(1.0, 2.0, 1000);
        let t = Instant::now();
        // The key in use empties its bucket.
        assert!(rate.admit("busy", 2.0, t).is_ok());
        for i in 0..1_000_000 {
            let _ = rate.admit(&format!("flood-{i}"), 1.0, t);
            if i % 100 == 0 {
                // Still refused: its empty bucket was not forgotten and refilled.
                assert!(rate.admit("busy", 1.0, t).is_err(), "after {i} new keys");
            }
            assert!(rate.keys() <= 1000);
        }
        // A key unused for a whole generation is forgotten: it starts full.
        let idle = KeyedRate::with_capacity(1.0, 2.0, 10);
        assert!(idle.admit("idle", 2.0, t).is_ok());
        for i in 0..20 {
            let _ = idle.admit(&format!("k{i}"), 1.0, t);
        }
        assert!(idle.admit("idle", 2.0, t).is_ok(), "forgotten, so full again");
    }

    #[test]
    fn a_poisoned_lock_keeps_enforcing_the_limits() {
        let rate = std::sync::Arc::new(KeyedRate::new(1.0, 1.0));
        let t = Instant::now();
        assert!(rate.admit("a", 1.0, t).is_ok());
        let r = rate.clone();
        let _ = std::thread::spawn(move || {
            let _g = r.buckets.lock().unwrap();
            panic!("poison the lock");
        })
        .join();
        assert!(rate.buckets.is_poisoned());
        assert!(rate.admit("a", 1.0, t).is_err(), "still refused, not admitted");
    }
}
