//! Dedup by reading identity `(device, boot, seq)`.
//!
//! Per device boot, the sequence numbers seen are kept as a set of ranges:
//! a device that sends in order costs one range, whatever its rate. A boot
//! is forgotten once its latest event time is more than the dedup horizon
//! behind the watermark; a duplicate older than that would be counted again
//! (it is also far past any window's allowed lateness for windowed views).
//! At most [`MAX_RANGES`] ranges are kept per boot: past that the two oldest
//! are joined, and a reading from the gap between them is then counted as a
//! duplicate (`kappa_cloud_readings_duplicate_total`), never twice.

use std::collections::{BTreeMap, HashMap};

use kappa_common::Reading;
use serde::{Deserialize, Serialize};

/// Most ranges kept per device boot.
pub const MAX_RANGES: usize = 256;

/// The sequence numbers seen in one boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeqSet {
    /// start -> end, inclusive, disjoint and not adjacent.
    ranges: BTreeMap<u64, u64>,
    pub last_ts: i64,
}

impl SeqSet {
    /// Adds `seq`; false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        let below = self.ranges.range_mut(..=seq).next_back();
        if let Some((_, e)) = below {
            if seq <= *e {
                return false;
            }
            // The common case: the next number of the newest range, with nothing after it.
            let next = seq.checked_add(1);
            if *e + 1 == seq && next.is_none_or(|n| !self.ranges.contains_key(&n)) {
                if let Some((_, e)) = self.ranges.range_mut(..=seq).next_back() {
                    *e = seq;
                }
                return true;
            }
        }
        let mut start = seq;
        let mut end = seq;
        if let Some((&s, &e)) = self.ranges.range(..seq).next_back()
            && e.checked_add(1) == Some(seq)
        {
            start = s;
            self.ranges.remove(&s);
        }
        if let Some(next) = seq.checked_add(1)
            && let Some(e) = self.ranges.remove(&next)
        {
            end = e;
        }
        self.ranges.insert(start, end);
        while self.ranges.len() > MAX_RANGES {
            let mut it = self.ranges.iter();
            let (Some((&s0, _)), Some((&s1, &e1))) = (it.next(), it.next()) else { break };
            self.ranges.remove(&s1);
            self.ranges.insert(s0, e1);
        }
        true
    }

    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }
}

/// Encoded boots to upsert, and boots to delete, for a checkpoint.
pub type DedupChanges = (Vec<(String, u32, Vec<u8>)>, Vec<(String, u32)>);

#[derive(Debug)]
struct Slot {
    set: SeqSet,
    dirty: bool,
}

/// Dedup state for every device boot, with what the next checkpoint must write.
#[derive(Debug, Default)]
pub struct Dedup {
    /// device -> boot -> sequence numbers (looked up by `&str`, no allocation per reading).
    boots: HashMap<String, HashMap<u32, Slot>, foldhash::fast::RandomState>,
    deleted: Vec<(String, u32)>,
    horizon_ms: i64,
}

impl Dedup {
    pub fn new(horizon_ms: i64) -> Self {
        Self { horizon_ms, ..Self::default() }
    }

    pub fn restore(&mut self, device: String, boot: u32, set: SeqSet) {
        self.boots.entry(device).or_default().insert(boot, Slot { set, dirty: false });
    }

    /// True the first time a reading identity is seen.
    pub fn first_sighting(&mut self, r: &Reading) -> bool {
        let boots = match self.boots.get_mut(r.device.as_str()) {
            Some(b) => b,
            None => self.boots.entry(r.device.clone()).or_default(),
        };
        let slot = boots
            .entry(r.boot)
            .or_insert_with(|| Slot { set: SeqSet { ranges: BTreeMap::new(), last_ts: r.ts_ms }, dirty: true });
        let new = slot.set.insert(r.seq);
        if new {
            slot.set.last_ts = slot.set.last_ts.max(r.ts_ms);
            slot.dirty = true;
        }
        new
    }

    /// Forgets boots whose latest reading is more than the horizon behind `watermark`.
    pub fn prune(&mut self, watermark: i64) {
        let horizon = self.horizon_ms;
        let deleted = &mut self.deleted;
        self.boots.retain(|device, boots| {
            boots.retain(|boot, s| {
                let keep = s.set.last_ts.saturating_add(horizon) > watermark;
                if !keep {
                    deleted.push((device.clone(), *boot));
                }
                keep
            });
            !boots.is_empty()
        });
    }

    /// Changed boots (encoded) and forgotten ones, since the last call.
    pub fn take_changes(&mut self) -> DedupChanges {
        let mut up = Vec::new();
        for (d, boots) in self.boots.iter_mut() {
            for (b, s) in boots.iter_mut().filter(|(_, s)| s.dirty) {
                s.dirty = false;
                up.push((d.clone(), *b, serde_cbor::ser::to_vec_packed(&s.set).unwrap_or_default()));
            }
        }
        up.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        (up, std::mem::take(&mut self.deleted))
    }

    /// Device boots remembered.
    pub fn len(&self) -> usize {
        self.boots.values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.boots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_order_sequences_cost_one_range() {
        let mut s = SeqSet::default();
        for seq in 1..=10_000 {
            assert!(s.insert(seq));
        }
        assert_eq!(s.ranges(), 1);
        assert!(!s.insert(5_000));
    }

    #[test]
    fn out_of_order_and_gaps_are_tracked_exactly() {
        let mut s = SeqSet::default();
        for seq in [5, 3, 4, 10, 1] {
            assert!(s.insert(seq), "{seq}");
        }
        for seq in [1, 3, 4, 5, 10] {
            assert!(!s.insert(seq), "{seq}");
        }
        assert!(s.insert(2));
        assert_eq!(s.ranges(), 2, "1..=5 and 10");
        assert!(s.insert(u64::MAX) && !s.insert(u64::MAX));
    }

    #[test]
    fn past_the_range_cap_the_oldest_gap_closes_and_never_double_counts() {
        let mut s = SeqSet::default();
        for i in 0..(MAX_RANGES as u64 + 1) {
            s.insert(i * 2);
        }
        assert_eq!(s.ranges(), MAX_RANGES);
        assert!(!s.insert(1), "the oldest gap was joined: treated as seen");
        assert!(s.insert(MAX_RANGES as u64 * 2 - 1), "a recent gap is still open");
    }

    #[test]
    fn old_boots_are_forgotten_past_the_horizon() {
        let mut d = Dedup::new(1000);
        let r = |boot, ts| Reading {
            device: "d".into(),
            boot,
            seq: 1,
            ts_ms: ts,
            schema: 2,
            metrics: Default::default(),
            tags: Default::default(),
        };
        assert!(d.first_sighting(&r(1, 0)));
        assert!(d.first_sighting(&r(2, 5000)));
        d.prune(4000);
        assert_eq!(d.len(), 1);
        let (_, deleted) = d.take_changes();
        assert_eq!(deleted, [("d".to_string(), 1)]);
    }
}
