//! The bound on how fast new batches are built: the project's token bucket
//! (`kappa_runtime::rate::Bucket`), in readings.

use std::time::{Duration, Instant};

use kappa_runtime::rate::Bucket;

/// At most `rate` readings per second on average, in bursts of up to one
/// second's worth. A batch may take the bucket into debt; the next one waits
/// until the debt is repaid. A rate of zero means no bound.
#[derive(Debug, Clone)]
pub struct Limiter {
    rate: f64,
    bucket: Bucket,
}

impl Limiter {
    pub fn new(rate: u64) -> Self {
        let rate = rate as f64;
        Self { rate, bucket: Bucket::full(rate, Instant::now()) }
    }

    /// How long until the next batch may be built, if it must wait.
    pub fn delay(&mut self) -> Option<Duration> {
        self.delay_at(Instant::now())
    }

    fn delay_at(&mut self, now: Instant) -> Option<Duration> {
        if self.rate == 0.0 {
            return None;
        }
        self.bucket.debt(self.rate, self.rate, now)
    }

    /// Spends `readings` tokens.
    pub fn take(&mut self, readings: u64) {
        self.take_at(readings, Instant::now());
    }

    fn take_at(&mut self, readings: u64, now: Instant) {
        if self.rate > 0.0 {
            self.bucket.spend(self.rate, self.rate, readings as f64, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_average_rate_is_bounded() {
        let start = Instant::now();
        let mut l = Limiter::new(1000);
        let (mut now, mut sent) = (start, 0u64);
        // Batches of 400 as fast as the limiter allows, for 10 simulated seconds.
        while now < start + Duration::from_secs(10) {
            match l.delay_at(now) {
                Some(d) => now += d,
                None => {
                    l.take_at(400, now);
                    sent += 400;
                }
            }
        }
        // 10 s at 1000/s, plus the first second's burst and one batch of debt.
        assert!((10_000..=11_400).contains(&sent), "{sent}");
    }

    #[test]
    fn zero_means_unbounded() {
        let mut l = Limiter::new(0);
        l.take(1_000_000);
        assert_eq!(l.delay(), None);
    }
}
