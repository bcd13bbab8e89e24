//! The bound on how fast new batches are built: a token bucket in readings.

use std::time::{Duration, Instant};

/// At most `rate` readings per second on average, in bursts of up to one
/// second's worth. A batch may take the bucket into debt; the next one waits
/// until the debt is repaid. A rate of zero means no bound.
#[derive(Debug, Clone)]
pub struct Limiter {
    rate: f64,
    tokens: f64,
    at: Instant,
}

impl Limiter {
    pub fn new(rate: u64) -> Self {
        Self { rate: rate as f64, tokens: rate as f64, at: Instant::now() }
    }

    fn refill(&mut self, now: Instant) {
        self.tokens = (self.tokens + now.duration_since(self.at).as_secs_f64() * self.rate).min(self.rate);
        self.at = now;
    }

    /// How long until the next batch may be built, if it must wait.
    pub fn delay(&mut self) -> Option<Duration> {
        self.delay_at(Instant::now())
    }

    fn delay_at(&mut self, now: Instant) -> Option<Duration> {
        if self.rate == 0.0 {
            return None;
        }
        self.refill(now);
        (self.tokens < 0.0).then(|| Duration::from_secs_f64(-self.tokens / self.rate))
    }

    /// Spends `readings` tokens.
    pub fn take(&mut self, readings: u64) {
        self.take_at(readings, Instant::now());
    }

    fn take_at(&mut self, readings: u64, now: Instant) {
        if self.rate > 0.0 {
            self.refill(now);
            self.tokens -= readings as f64;
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
