//! Event-time watermarks.
//!
//! Each partition's watermark is the latest event time it has delivered
//! minus the out-of-orderness bound; it depends only on that partition's
//! prefix of the log. The processor's (global) watermark is the minimum over
//! the partitions that count: every partition with unread records counts
//! (one that has not delivered anything yet holds the watermark where it
//! is), and a partition that is caught up and has delivered nothing for the
//! idle timeout (wall clock) stops holding the others back until it delivers
//! again. The global watermark never moves backwards.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::eventlog::Partition;

#[derive(Debug, Clone, Copy)]
struct Part {
    max_ts: i64,
    last_seen: Instant,
}

/// Per-partition and global watermarks.
#[derive(Debug)]
pub struct Watermarks {
    bound_ms: i64,
    idle_timeout: Duration,
    parts: BTreeMap<Partition, Part>,
    global: Option<i64>,
}

impl Watermarks {
    pub fn new(bound_ms: i64, idle_timeout: Duration) -> Self {
        Self { bound_ms, idle_timeout, parts: BTreeMap::new(), global: None }
    }

    /// Restores a partition's max event time and the global watermark.
    pub fn restore(&mut self, partition: Partition, max_ts: i64, now: Instant) {
        self.parts.insert(partition, Part { max_ts, last_seen: now });
    }

    pub fn restore_global(&mut self, global: Option<i64>) {
        self.global = global;
    }

    /// The partition's watermark, if it has delivered anything.
    pub fn partition(&self, p: Partition) -> Option<i64> {
        self.parts.get(&p).map(|x| x.max_ts.saturating_sub(self.bound_ms))
    }

    pub fn max_ts(&self, p: Partition) -> Option<i64> {
        self.parts.get(&p).map(|x| x.max_ts)
    }

    pub fn observe(&mut self, p: Partition, ts_ms: i64, now: Instant) {
        let part = self.parts.entry(p).or_insert(Part { max_ts: ts_ms, last_seen: now });
        part.max_ts = part.max_ts.max(ts_ms);
        part.last_seen = now;
    }

    /// Recomputes the global watermark at `now`, given which of `assigned`
    /// partitions are caught up with their source; returns it.
    pub fn advance(
        &mut self,
        now: Instant,
        assigned: &[Partition],
        caught_up: impl Fn(Partition) -> bool,
    ) -> Option<i64> {
        let mut min: Option<i64> = None;
        for &p in assigned {
            let lagging = !caught_up(p);
            match self.parts.get(&p) {
                // Unread records, nothing delivered yet: nothing may close.
                None if lagging => return self.global,
                None => {}
                Some(part) => {
                    let idle = !lagging && now.saturating_duration_since(part.last_seen) >= self.idle_timeout;
                    if !idle {
                        let w = part.max_ts.saturating_sub(self.bound_ms);
                        min = Some(min.map_or(w, |m| m.min(w)));
                    }
                }
            }
        }
        if let Some(w) = min {
            self.global = Some(self.global.map_or(w, |g| g.max(w)));
        }
        self.global
    }

    pub fn global(&self) -> Option<i64> {
        self.global
    }

    /// Partitions now considered idle.
    pub fn idle(&self, now: Instant) -> usize {
        self.parts.values().filter(|p| now.saturating_duration_since(p.last_seen) >= self.idle_timeout).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_slowest_partition_sets_the_global_watermark() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(10, Duration::from_secs(30));
        w.observe(0, 100, t0);
        w.observe(1, 50, t0);
        assert_eq!(w.advance(t0, &[0, 1], |_| true), Some(40));
        assert_eq!(w.partition(0), Some(90));
    }

    #[test]
    fn an_idle_partition_stops_holding_the_others_back_and_counts_again_when_it_speaks() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(0, Duration::from_secs(30));
        w.observe(0, 100, t0);
        w.observe(1, 10, t0);
        assert_eq!(w.advance(t0, &[0, 1], |_| true), Some(10));
        let later = t0 + Duration::from_secs(31);
        w.observe(0, 200, later);
        assert_eq!(w.advance(later, &[0, 1], |_| true), Some(200), "partition 1 is idle");
        assert_eq!(w.idle(later), 1);
        w.observe(1, 20, later);
        assert_eq!(w.advance(later, &[0, 1], |_| true), Some(200), "the global watermark never goes back");
    }

    #[test]
    fn a_partition_with_unread_records_is_never_idle_even_before_it_delivers() {
        let t0 = Instant::now();
        let mut w = Watermarks::new(0, Duration::from_secs(30));
        w.observe(0, 100, t0);
        assert_eq!(w.advance(t0, &[0, 1], |p| p == 0), None, "partition 1 has a backlog and no watermark yet");
        assert_eq!(w.advance(t0, &[0, 1], |_| true), Some(100), "a partition with no data at all does not count");
        w.observe(1, 10, t0);
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            w.advance(later, &[0, 1], |p| p == 0),
            Some(100),
            "silent but lagging: it still counts (and is behind)"
        );
    }
}
