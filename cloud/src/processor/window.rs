//! Window aggregation state: plain data, no I/O.
//!
//! A [`WindowView`] keeps one [`WindowAgg`] per key and window. A row is
//! replaced, never incremented, in the serving store, so writing a row twice
//! is harmless. When the processor restarts, rows are reloaded from the store
//! on first touch; the store holds them exactly as of the last checkpoint,
//! which also holds the log positions, so nothing is skipped or counted twice.

use std::collections::{BTreeMap, HashMap};

use kappa_common::Reading;
use kappa_common::window::tumbling_start;
use serde::{Deserialize, Serialize};

/// Count, null count, sum, min and max of one metric.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MetricAgg {
    pub count: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub nulls: u64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

impl MetricAgg {
    const EMPTY: MetricAgg = MetricAgg { count: 0, nulls: 0, sum: 0.0, min: 0.0, max: 0.0 };

    fn add(&mut self, value: Option<f64>) {
        let Some(v) = value else {
            self.nulls += 1;
            return;
        };
        if self.count == 0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1;
        self.sum += v;
    }

    /// The mean of the non-null values.
    pub fn avg(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Everything a view row knows about one key in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WindowAgg {
    pub count: u64,
    pub first_ts_ms: i64,
    pub last_ts_ms: i64,
    pub metrics: BTreeMap<String, MetricAgg>,
}

impl WindowAgg {
    fn new(ts_ms: i64) -> Self {
        Self { count: 0, first_ts_ms: ts_ms, last_ts_ms: ts_ms, metrics: BTreeMap::new() }
    }

    fn add(&mut self, r: &Reading) {
        self.count += 1;
        self.first_ts_ms = self.first_ts_ms.min(r.ts_ms);
        self.last_ts_ms = self.last_ts_ms.max(r.ts_ms);
        for (name, value) in &r.metrics {
            match self.metrics.get_mut(name) {
                Some(m) => m.add(*value),
                None => {
                    let mut m = MetricAgg::EMPTY;
                    m.add(*value);
                    self.metrics.insert(name.clone(), m);
                }
            }
        }
    }
}

/// Identifies a row: the key (device id) and the window start (0 for a global window).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RowKey {
    pub key: String,
    pub window_start: i64,
}

#[derive(Debug)]
struct Slot {
    agg: WindowAgg,
    dirty: bool,
}

/// A per-device view over tumbling windows of `size_ms`, or over all time.
#[derive(Debug)]
pub struct WindowView {
    name: String,
    size_ms: Option<i64>,
    rows: HashMap<RowKey, Slot>,
}

/// One row to write to the serving store.
#[derive(Debug, Clone, PartialEq)]
pub struct RowWrite {
    pub view: String,
    pub key: RowKey,
    pub window_end: i64,
    pub agg: WindowAgg,
}

impl WindowView {
    /// Tumbling windows of `size_ms`.
    pub fn tumbling(name: &str, size_ms: i64) -> Self {
        Self { name: name.to_string(), size_ms: Some(size_ms.max(1)), rows: HashMap::new() }
    }

    /// One row per key over all time (running totals).
    pub fn global(name: &str) -> Self {
        Self { name: name.to_string(), size_ms: None, rows: HashMap::new() }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    fn row_key(&self, r: &Reading) -> RowKey {
        let window_start = self.size_ms.map_or(0, |s| tumbling_start(r.ts_ms, s));
        RowKey { key: r.device.clone(), window_start }
    }

    fn window_end(&self, start: i64) -> i64 {
        self.size_ms.map_or(i64::MAX, |s| start + s)
    }

    /// Adds a reading. A row not in memory is first loaded with `load` (the
    /// serving store's copy as of the last checkpoint).
    pub fn apply<E>(
        &mut self,
        r: &Reading,
        load: impl FnOnce(&str, &RowKey) -> Result<Option<WindowAgg>, E>,
    ) -> Result<(), E> {
        let key = self.row_key(r);
        let slot = match self.rows.get_mut(&key) {
            Some(slot) => slot,
            None => {
                let agg = load(&self.name, &key)?.unwrap_or_else(|| WindowAgg::new(r.ts_ms));
                self.rows.entry(key).or_insert(Slot { agg, dirty: false })
            }
        };
        slot.agg.add(r);
        slot.dirty = true;
        Ok(())
    }

    /// Rows changed since the last call, marked clean.
    pub fn take_dirty(&mut self, out: &mut Vec<RowWrite>) {
        for (key, slot) in self.rows.iter_mut().filter(|(_, s)| s.dirty) {
            slot.dirty = false;
            out.push(RowWrite {
                view: self.name.clone(),
                key: key.clone(),
                window_end: self.size_ms.map_or(i64::MAX, |s| key.window_start + s),
                agg: slot.agg.clone(),
            });
        }
    }

    /// Forgets clean rows whose window ended at or before `watermark`: they
    /// are in the store, and a late reading reloads them.
    pub fn evict_closed(&mut self, watermark: i64) {
        if self.size_ms.is_none() {
            return;
        }
        let ends: Vec<_> = self.rows.keys().map(|k| (k.clone(), self.window_end(k.window_start))).collect();
        for (k, end) in ends {
            if end <= watermark && self.rows.get(&k).is_some_and(|s| !s.dirty) {
                self.rows.remove(&k);
            }
        }
    }

    /// Rows held in memory.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: &str, ts_ms: i64, t: Option<f64>) -> Reading {
        Reading {
            device: device.into(),
            boot: 1,
            seq: ts_ms as u64,
            ts_ms,
            schema: 2,
            metrics: [("temperature".to_string(), t)].into(),
            tags: BTreeMap::new(),
        }
    }

    fn none(_: &str, _: &RowKey) -> Result<Option<WindowAgg>, ()> {
        Ok(None)
    }

    #[test]
    fn readings_land_in_their_minute_with_count_min_max_avg() {
        let mut v = WindowView::tumbling("m", 60_000);
        for (ts, t) in [(60_000, 1.0), (61_000, 3.0), (119_999, 2.0), (120_000, 9.0)] {
            v.apply(&reading("d", ts, Some(t)), none).unwrap();
        }
        let mut rows = Vec::new();
        v.take_dirty(&mut rows);
        rows.sort_by(|a, b| a.key.cmp(&b.key));
        assert_eq!(rows.len(), 2);
        let m = rows[0].agg.metrics["temperature"];
        assert_eq!((rows[0].agg.count, m.min, m.max, m.avg()), (3, 1.0, 3.0, Some(2.0)));
        assert_eq!((rows[0].key.window_start, rows[0].window_end), (60_000, 120_000));
    }

    #[test]
    fn null_values_are_counted_apart_and_skipped_in_aggregates() {
        let mut v = WindowView::global("g");
        v.apply(&reading("d", 1, None), none).unwrap();
        v.apply(&reading("d", 2, Some(4.0)), none).unwrap();
        let mut rows = Vec::new();
        v.take_dirty(&mut rows);
        let m = rows[0].agg.metrics["temperature"];
        assert_eq!((rows[0].agg.count, m.count, m.nulls, m.avg()), (2, 1, 1, Some(4.0)));
    }

    #[test]
    fn a_row_missing_from_memory_continues_from_the_stored_copy() {
        let mut v = WindowView::tumbling("m", 60_000);
        v.apply(&reading("d", 0, Some(1.0)), none).unwrap();
        let mut rows = Vec::new();
        v.take_dirty(&mut rows);
        let stored = rows[0].agg.clone();
        v.evict_closed(60_000);
        assert!(v.is_empty());
        v.apply(&reading("d", 5, Some(3.0)), |_, _| Ok::<_, ()>(Some(stored.clone()))).unwrap();
        let mut rows = Vec::new();
        v.take_dirty(&mut rows);
        assert_eq!(rows[0].agg.count, 2);
        assert_eq!(rows[0].agg.metrics["temperature"].sum, 4.0);
    }

    #[test]
    fn dirty_rows_are_never_evicted() {
        let mut v = WindowView::tumbling("m", 60_000);
        v.apply(&reading("d", 0, Some(1.0)), none).unwrap();
        v.evict_closed(i64::MAX);
        assert_eq!(v.len(), 1);
    }
}
