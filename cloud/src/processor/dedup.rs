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

use std::collections::HashMap;

use compact_str::CompactString;
use kappa_common::Reading;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

/// Most ranges kept per device boot.
pub const MAX_RANGES: usize = 256;

/// The sequence numbers seen in one boot.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SeqSet {
    /// `(start, end)`, inclusive, sorted, disjoint and not adjacent; one
    /// range inline (a device sending in order). Encoded as a map start -> end.
    #[serde(with = "ranges_as_map")]
    ranges: SmallVec<[(u64, u64); 1]>,
    pub last_ts: i64,
}

impl SeqSet {
    /// Adds `seq`; false if it was already there.
    pub fn insert(&mut self, seq: u64) -> bool {
        let r = &mut self.ranges;
        // The ranges before `i` start at or below `seq`.
        let i = r.partition_point(|&(s, _)| s <= seq);
        if i > 0 && seq <= r[i - 1].1 {
            return false;
        }
        let joins_below = i > 0 && r[i - 1].1.checked_add(1) == Some(seq);
        let joins_above = i < r.len() && seq.checked_add(1) == Some(r[i].0);
        match (joins_below, joins_above) {
            // The common case: the next number of the newest range.
            (true, false) => r[i - 1].1 = seq,
            (true, true) => {
                r[i - 1].1 = r[i].1;
                r.remove(i);
            }
            (false, true) => r[i].0 = seq,
            (false, false) => r.insert(i, (seq, seq)),
        }
        while r.len() > MAX_RANGES {
            r[0].1 = r[1].1;
            r.remove(1);
        }
        true
    }

    pub fn ranges(&self) -> usize {
        self.ranges.len()
    }
}

/// The ranges as a CBOR map `start -> end` (the form checkpoints have always used).
mod ranges_as_map {
    use serde::de::{MapAccess, Visitor};
    use serde::{Deserializer, Serializer};
    use smallvec::SmallVec;

    pub fn serialize<S: Serializer>(ranges: &SmallVec<[(u64, u64); 1]>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(ranges.iter().map(|(a, b)| (a, b)))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SmallVec<[(u64, u64); 1]>, D::Error> {
        struct Ranges;
        impl<'de> Visitor<'de> for Ranges {
            type Value = SmallVec<[(u64, u64); 1]>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of sequence ranges")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = SmallVec::new();
                while let Some((start, end)) = map.next_entry::<u64, u64>()? {
                    out.push((start, end));
                }
                out.sort_unstable();
                Ok(out)
            }
        }
        d.deserialize_map(Ranges)
    }
}

/// Encoded boots to upsert, and boots to delete, for a checkpoint.
pub type DedupChanges = (Vec<(String, u32, Vec<u8>)>, Vec<(String, u32)>);

#[derive(Debug)]
struct Slot {
    boot: u32,
    set: SeqSet,
    dirty: bool,
}

/// Dedup state for every device boot, with what the next checkpoint must write.
#[derive(Debug)]
pub struct Dedup {
    /// device -> its boots (usually one, searched in place). Looked up by
    /// `&str` with the id stored inline: no allocation, one probe per reading.
    boots: HashMap<CompactString, SmallVec<[Slot; 1]>, foldhash::fast::RandomState>,
    deleted: Vec<(String, u32)>,
    horizon_ms: i64,
    /// No boot's latest reading is older than this (a lower bound: pruning
    /// below it finds nothing, without visiting every device).
    oldest_ts: i64,
}

impl Default for Dedup {
    fn default() -> Self {
        Self { boots: HashMap::default(), deleted: Vec::new(), horizon_ms: 0, oldest_ts: i64::MAX }
    }
}

impl Dedup {
    pub fn new(horizon_ms: i64) -> Self {
        Self { horizon_ms, ..Self::default() }
    }

    pub fn restore(&mut self, device: String, boot: u32, set: SeqSet) {
        self.oldest_ts = self.oldest_ts.min(set.last_ts);
        self.boots.entry(CompactString::from(device)).or_default().push(Slot { boot, set, dirty: false });
    }

    /// True the first time a reading identity is seen.
    pub fn first_sighting(&mut self, r: &Reading) -> bool {
        let boots = match self.boots.get_mut(r.device.as_str()) {
            Some(b) => b,
            None => self.boots.entry(CompactString::from(r.device.as_str())).or_default(),
        };
        let at = match boots.iter().position(|s| s.boot == r.boot) {
            Some(at) => at,
            None => {
                self.oldest_ts = self.oldest_ts.min(r.ts_ms);
                let set = SeqSet { ranges: SmallVec::new(), last_ts: r.ts_ms };
                boots.push(Slot { boot: r.boot, set, dirty: true });
                boots.len() - 1
            }
        };
        let slot = &mut boots[at];
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
        if self.oldest_ts.saturating_add(horizon) > watermark {
            return;
        }
        let deleted = &mut self.deleted;
        let mut oldest = i64::MAX;
        self.boots.retain(|device, boots| {
            boots.retain(|s| {
                let keep = s.set.last_ts.saturating_add(horizon) > watermark;
                if keep {
                    oldest = oldest.min(s.set.last_ts);
                } else {
                    deleted.push((device.to_string(), s.boot));
                }
                keep
            });
            !boots.is_empty()
        });
        self.oldest_ts = oldest;
    }

    /// Changed boots (encoded) and forgotten ones, since the last call.
    pub fn take_changes(&mut self) -> DedupChanges {
        let mut up = Vec::new();
        for (d, boots) in self.boots.iter_mut() {
            for s in boots.iter_mut().filter(|s| s.dirty) {
                s.dirty = false;
                up.push((d.to_string(), s.boot, crate::model::packed_cbor(&s.set, 32)));
            }
        }
        up.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        (up, std::mem::take(&mut self.deleted))
    }

    /// Device boots remembered.
    pub fn len(&self) -> usize {
        self.boots.values().map(|b| b.len()).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.boots.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Checkpoints written before the ranges were kept inline hold a
    /// `BTreeMap<u64, u64>`: the encoding is the same both ways.
    #[test]
    fn the_ranges_encode_as_the_map_checkpoints_have_always_held() {
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Before {
            ranges: std::collections::BTreeMap<u64, u64>,
            last_ts: i64,
        }
        let mut s = SeqSet { last_ts: 77, ..SeqSet::default() };
        for seq in [9, 1, 2, 3, 5, u64::MAX] {
            s.insert(seq);
        }
        let before = Before { ranges: [(1, 3), (5, 5), (9, 9), (u64::MAX, u64::MAX)].into(), last_ts: 77 };
        let bytes = serde_cbor::ser::to_vec_packed(&s).unwrap();
        assert_eq!(bytes, serde_cbor::ser::to_vec_packed(&before).unwrap());
        assert_eq!(serde_cbor::from_slice::<SeqSet>(&bytes).unwrap(), s);
    }

    proptest::proptest! {
        /// Against a plain set of every number seen (below the range cap).
        #[test]
        fn seq_set_answers_as_a_set_of_every_number_seen(seqs in proptest::collection::vec(0u64..300, 0..400)) {
            let mut s = SeqSet::default();
            let mut model = std::collections::BTreeSet::new();
            for seq in seqs {
                proptest::prop_assert_eq!(s.insert(seq), model.insert(seq));
            }
            let runs = model.iter().zip(model.iter().skip(1)).filter(|(a, b)| **a + 1 != **b).count();
            proptest::prop_assert_eq!(s.ranges(), if model.is_empty() { 0 } else { runs + 1 });
        }
    }

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
