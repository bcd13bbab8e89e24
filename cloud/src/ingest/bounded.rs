//! The state ingest keeps per gateway, bounded: gateway names come from
//! outside, and a flood of new ones must not grow memory or metric series.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// At most this many gateways are remembered for progress markers.
pub const MAX_PROGRESS_GATEWAYS: usize = 100_000;

/// When each gateway last had progress markers written. Bounded: a
/// gateway last marked longer than the interval ago is due anyway, so
/// forgetting it changes nothing; those are dropped when the map is full
/// (at most once per interval), and a gateway that still finds no room gets
/// no markers for that batch.
#[derive(Debug, Default)]
pub struct ProgressMarks {
    last: HashMap<String, Instant>,
    pruned: Option<Instant>,
}

impl ProgressMarks {
    /// Whether `gateway` is due for markers at `now` (and notes that it got
    /// them); `None` when there is no room to remember it.
    pub fn due(&mut self, gateway: &str, interval: Duration, now: Instant, capacity: usize) -> Option<bool> {
        if let Some(t) = self.last.get_mut(gateway) {
            if now.saturating_duration_since(*t) < interval {
                return Some(false);
            }
            *t = now;
            return Some(true);
        }
        if self.last.len() >= capacity && self.pruned.is_none_or(|p| now.saturating_duration_since(p) >= interval) {
            self.last.retain(|_, t| now.saturating_duration_since(*t) < interval);
            self.pruned = Some(now);
        }
        if self.last.len() >= capacity {
            return None;
        }
        self.last.insert(gateway.to_string(), now);
        Some(true)
    }

    /// Gateways remembered.
    pub fn len(&self) -> usize {
        self.last.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_empty()
    }
}

/// At most this many gateways' status is kept (metrics labels stay bounded).
pub const MAX_TRACKED_GATEWAYS: usize = 10_000;

/// A tracked gateway silent this long may give its place to a new one.
pub const STALE_GATEWAY: Duration = Duration::from_secs(600);

/// The gateways whose reported status is kept in metrics, with when each
/// was last heard. Full, a new gateway replaces the least recently heard
/// one if that one has been silent for [`STALE_GATEWAY`]; else it is not
/// tracked (and counted), so a live fleet's series never churn.
#[derive(Debug)]
pub struct TrackedGateways {
    last_heard: HashMap<String, i64>,
    capacity: usize,
}

/// Whether a gateway's status is kept.
#[derive(Debug, PartialEq, Eq)]
pub enum Tracked {
    Yes,
    /// Yes, in the place of this stale gateway (remove its series).
    Replacing(String),
    No,
}

impl Default for TrackedGateways {
    fn default() -> Self {
        Self::with_capacity(MAX_TRACKED_GATEWAYS)
    }
}

impl TrackedGateways {
    pub fn with_capacity(capacity: usize) -> Self {
        Self { last_heard: HashMap::new(), capacity: capacity.max(1) }
    }

    /// Notes that `gateway` was heard at `now_ms`; whether it is tracked.
    pub fn admit(&mut self, gateway: &str, now_ms: i64) -> Tracked {
        if let Some(t) = self.last_heard.get_mut(gateway) {
            *t = (*t).max(now_ms);
            return Tracked::Yes;
        }
        if self.last_heard.len() < self.capacity {
            self.last_heard.insert(gateway.to_string(), now_ms);
            return Tracked::Yes;
        }
        let stale_before = now_ms.saturating_sub(STALE_GATEWAY.as_millis() as i64);
        let oldest = self.last_heard.iter().min_by_key(|(_, t)| **t).map(|(g, t)| (g.clone(), *t));
        match oldest {
            Some((stale, heard)) if heard < stale_before => {
                self.last_heard.remove(&stale);
                self.last_heard.insert(gateway.to_string(), now_ms);
                Tracked::Replacing(stale)
            }
            _ => Tracked::No,
        }
    }

    /// Gateways tracked.
    pub fn len(&self) -> usize {
        self.last_heard.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_heard.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    /// Issue 22: the gateways remembered for progress markers are bounded,
    /// and forgetting the stale ones changes no answer.
    #[test]
    fn progress_marks_stay_bounded_and_forget_only_what_is_due_anyway() {
        let (interval, cap) = (Duration::from_secs(1), 3);
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let mut marks = ProgressMarks::default();
        for g in ["a", "b", "c"] {
            assert_eq!(marks.due(g, interval, at(0), cap), Some(true));
        }
        assert_eq!(marks.due("a", interval, at(500), cap), Some(false), "within the interval");
        assert_eq!(marks.due("d", interval, at(500), cap), None, "full of fresh gateways: no room");
        assert_eq!(marks.len(), 3);
        // "a" is marked again at 1,000 ms; by 1,500 ms (an interval after the
        // last pruning) "b" and "c" are stale and make room, and "b" is due
        // when it comes back, as it would have been.
        assert_eq!(marks.due("a", interval, at(1_000), cap), Some(true));
        assert_eq!(marks.due("d", interval, at(1_200), cap), None, "pruned at most once per interval");
        assert_eq!(marks.due("d", interval, at(1_500), cap), Some(true));
        assert_eq!(marks.len(), 2, "the stale were dropped");
        assert_eq!(marks.due("b", interval, at(1_600), cap), Some(true));
        assert_eq!(marks.due("a", interval, at(1_700), cap), Some(false));
        assert_eq!(marks.due("e", interval, at(1_800), cap), None);
        for i in 0..10_000u64 {
            let _ = marks.due(&format!("x{i}"), interval, at(2_000 + i), cap);
        }
        assert!(marks.len() <= cap, "{} remembered", marks.len());
    }

    /// Issue 22: gateway names from outside cannot grow the tracked set or
    /// the metric series past their bound; a stale gateway gives its place
    /// (least recently heard first), a live one never does.
    #[test]
    fn tracked_gateways_stay_bounded_and_give_way_only_when_stale() {
        let mut g = TrackedGateways::with_capacity(3);
        let stale = STALE_GATEWAY.as_millis() as i64;
        assert_eq!(g.admit("a", 0), Tracked::Yes);
        assert_eq!(g.admit("b", 1_000), Tracked::Yes);
        assert_eq!(g.admit("c", 2_000), Tracked::Yes);
        assert_eq!(g.admit("d", 3_000), Tracked::No, "full of live gateways");
        assert_eq!(g.admit("a", stale), Tracked::Yes, "a is heard again");
        // b is now the least recently heard and stale.
        assert_eq!(g.admit("d", stale + 1_001), Tracked::Replacing("b".into()));
        assert_eq!(g.admit("e", stale + 2_001), Tracked::Replacing("c".into()));
        assert_eq!(g.admit("f", stale + 2_002), Tracked::No, "a, d and e are live");
        for i in 0..100_000 {
            let _ = g.admit(&format!("x{i}"), 10 * stale + i);
        }
        assert_eq!(g.len(), 3);
    }
}
