//! One view as a streaming operator: window assignment, aggregation,
//! lateness, closing, and the changes a checkpoint must write.
//!
//! Lateness is judged against the watermark of the reading's *own
//! partition* (before the reading), which depends only on that partition's
//! prefix of the log: whether a reading counts is therefore the same live,
//! after a crash, and in a replay. The processor's global watermark (the
//! minimum over active partitions) only decides *when* a window closes.
//!
//! * tumbling / hopping window `[start, end)`: late when
//!   `end + allowed_lateness <= partition watermark`; closes when the global
//!   watermark reaches `end + allowed_lateness`.
//! * session (gap `g`): a reading opens the window `[ts, ts + g)` and merges
//!   every session it overlaps; late when `ts + g + lateness <=` partition
//!   watermark; a session closes when the global watermark reaches
//!   `last + 2g + lateness` (one gap later than its end, so no reading that
//!   is on time can still extend it).
//! * global: never late, never closes.
//!
//! A reading for a window that already closed, which can only happen when
//! the global watermark moved past an idle partition, goes to the late log
//! with reason `window_closed`.

use std::collections::HashMap;

use kappa_common::Reading;
use kappa_common::window::tumbling_start;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::agg::{AggState, Val, field_value};
use super::spec::{Condition, Literal, Op, OutputMode, ViewSpec, WindowSpec};
use crate::eventlog::{Offset, Partition};

/// The state of one window of one key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WinState {
    pub start: i64,
    /// Latest event time seen (sessions end one gap after it).
    pub last_ts: i64,
    pub aggs: Vec<AggState>,
}

#[derive(Debug, Clone)]
struct Slot {
    win: WinState,
    dirty: bool,
}

/// A reading as an operator sees it.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub partition: Partition,
    pub offset: Offset,
    pub reading: &'a Reading,
    /// The reading's partition watermark before this reading.
    pub watermark: Option<i64>,
}

/// A reading (or one of its windows) that arrived too late to count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LateEvent {
    pub view: String,
    pub partition: Partition,
    pub offset: Offset,
    pub window_start: i64,
    pub device: String,
    pub boot: u32,
    pub seq: u64,
    pub ts_ms: i64,
    pub watermark_ms: i64,
    pub reason: &'static str,
}

/// A view row to write.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: String,
    pub window_start: i64,
    pub window_end: Option<i64>,
    pub values: Json,
}

/// What a checkpoint must write for one view.
#[derive(Debug, Default)]
pub struct Changes {
    pub state_upserts: Vec<(String, i64, Vec<u8>)>,
    pub state_deletes: Vec<(String, i64)>,
    pub row_upserts: Vec<Row>,
    pub row_deletes: Vec<(String, i64)>,
}

/// Counters the processor turns into metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub applied: u64,
    pub filtered: u64,
    pub missing_key: u64,
    pub null_inputs: u64,
    pub late: u64,
}

/// One view, as an operator.
#[derive(Debug)]
pub struct ViewOperator {
    pub spec: ViewSpec,
    id: String,
    windows: HashMap<(String, i64), Slot>,
    sessions: HashMap<String, Vec<Slot>>,
    /// The global watermark at the last close.
    closed_through: Option<i64>,
    pending: Changes,
    pub tally: Tally,
}

impl ViewOperator {
    pub fn new(spec: ViewSpec) -> Self {
        Self {
            id: spec.id(),
            spec,
            windows: HashMap::new(),
            sessions: HashMap::new(),
            closed_through: None,
            pending: Changes::default(),
            tally: Tally::default(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn closed_through(&self) -> Option<i64> {
        self.closed_through
    }

    /// Restores state written by earlier checkpoints.
    pub fn restore(&mut self, closed_through: Option<i64>, states: Vec<(String, WinState)>) {
        self.closed_through = closed_through;
        for (key, win) in states {
            let slot = Slot { win, dirty: false };
            if matches!(self.spec.window, WindowSpec::Session { .. }) {
                let list = self.sessions.entry(key).or_default();
                list.push(slot);
                list.sort_by_key(|s| s.win.start);
            } else {
                self.windows.insert((key, slot.win.start), slot);
            }
        }
    }

    /// Windows held in memory.
    pub fn state_len(&self) -> usize {
        self.windows.len() + self.sessions.values().map(Vec::len).sum::<usize>()
    }

    fn end_of(&self, w: &WinState) -> i64 {
        match self.spec.window {
            WindowSpec::Tumbling { size_ms } | WindowSpec::Hopping { size_ms, .. } => w.start + size_ms,
            WindowSpec::Session { gap_ms } => w.last_ts + gap_ms,
            WindowSpec::Global => i64::MAX,
        }
    }

    /// Adds a reading to its windows; late windows go to `late`.
    pub fn process(&mut self, ev: &Event<'_>, late: &mut Vec<LateEvent>) {
        let r = ev.reading;
        if !self.spec.filter.iter().all(|c| holds(c, r)) {
            self.tally.filtered += 1;
            return;
        }
        let key = match field_value(&self.spec.key, r) {
            Some(Val::Str(s)) => s.to_string(),
            Some(Val::Num(n)) => n.to_string(),
            None => {
                self.tally.missing_key += 1;
                return;
            }
        };
        let lateness = self.spec.allowed_lateness_ms;
        let mut late_window = |view: &ViewOperator, start: i64, reason: &'static str| {
            late.push(LateEvent {
                view: view.id.clone(),
                partition: ev.partition,
                offset: ev.offset,
                window_start: start,
                device: r.device.clone(),
                boot: r.boot,
                seq: r.seq,
                ts_ms: r.ts_ms,
                watermark_ms: ev.watermark.unwrap_or(i64::MIN),
                reason,
            });
        };
        match self.spec.window {
            WindowSpec::Session { gap_ms } => {
                let lone_end = r.ts_ms.saturating_add(gap_ms);
                if ev.watermark.is_some_and(|w| lone_end.saturating_add(lateness) <= w) {
                    late_window(self, r.ts_ms, "late");
                    self.tally.late += 1;
                } else if self.closed_through.is_some_and(|g| lone_end.saturating_add(gap_ms + lateness) <= g) {
                    late_window(self, r.ts_ms, "window_closed");
                    self.tally.late += 1;
                } else {
                    self.add_to_session(key, r, gap_ms);
                    self.tally.applied += 1;
                }
            }
            window => {
                let starts = window_starts(window, r.ts_ms);
                let mut applied = false;
                for start in starts {
                    let end = match window {
                        WindowSpec::Tumbling { size_ms } | WindowSpec::Hopping { size_ms, .. } => start + size_ms,
                        _ => i64::MAX,
                    };
                    if end != i64::MAX && ev.watermark.is_some_and(|w| end.saturating_add(lateness) <= w) {
                        late_window(self, start, "late");
                        self.tally.late += 1;
                    } else if end != i64::MAX && self.closed_through.is_some_and(|g| end.saturating_add(lateness) <= g)
                    {
                        late_window(self, start, "window_closed");
                        self.tally.late += 1;
                    } else {
                        let spec = &self.spec;
                        let slot = self.windows.entry((key.clone(), start)).or_insert_with(|| Slot {
                            win: WinState {
                                start,
                                last_ts: r.ts_ms,
                                aggs: spec.aggregates.iter().map(AggState::new).collect(),
                            },
                            dirty: true,
                        });
                        add_reading(&self.spec, &mut slot.win, r, &mut self.tally);
                        slot.dirty = true;
                        applied = true;
                    }
                }
                if applied {
                    self.tally.applied += 1;
                }
            }
        }
    }

    fn add_to_session(&mut self, key: String, r: &Reading, gap_ms: i64) {
        let list = self.sessions.entry(key.clone()).or_default();
        let (lo, hi) = (r.ts_ms, r.ts_ms + gap_ms);
        let mut merged = Slot {
            win: WinState {
                start: r.ts_ms,
                last_ts: r.ts_ms,
                aggs: self.spec.aggregates.iter().map(AggState::new).collect(),
            },
            dirty: true,
        };
        let mut kept = Vec::with_capacity(list.len());
        for s in list.drain(..) {
            let (s_lo, s_hi) = (s.win.start, s.win.last_ts + gap_ms);
            if s_lo < hi && lo < s_hi {
                merged.win.start = merged.win.start.min(s.win.start);
                merged.win.last_ts = merged.win.last_ts.max(s.win.last_ts);
                for (a, b) in merged.win.aggs.iter_mut().zip(&s.win.aggs) {
                    a.merge(b);
                }
                // The merged session gets a new identity: the old one leaves the store.
                self.pending.state_deletes.push((key.clone(), s.win.start));
                self.pending.row_deletes.push((key.clone(), s.win.start));
            } else {
                kept.push(s);
            }
        }
        add_reading(&self.spec, &mut merged.win, r, &mut self.tally);
        kept.push(merged);
        kept.sort_by_key(|s| s.win.start);
        *list = kept;
    }

    /// The global watermark advanced: close every window it has passed.
    pub fn on_watermark(&mut self, watermark: i64) {
        if self.closed_through.is_some_and(|g| g >= watermark) {
            return;
        }
        self.closed_through = Some(watermark);
        let lateness = self.spec.allowed_lateness_ms;
        match self.spec.window {
            WindowSpec::Global => {}
            WindowSpec::Session { gap_ms } => {
                let mut closing = Vec::new();
                for (key, list) in self.sessions.iter_mut() {
                    list.retain(|s| {
                        let done = s.win.last_ts + 2 * gap_ms + lateness <= watermark;
                        if done {
                            closing.push((key.clone(), s.clone()));
                        }
                        !done
                    });
                }
                self.sessions.retain(|_, l| !l.is_empty());
                for (key, slot) in closing {
                    self.close(key, slot);
                }
            }
            WindowSpec::Tumbling { .. } | WindowSpec::Hopping { .. } => {
                let done: Vec<(String, i64)> = self
                    .windows
                    .iter()
                    .filter(|(_, s)| self.end_of(&s.win) + lateness <= watermark)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in done {
                    if let Some(slot) = self.windows.remove(&k) {
                        self.close(k.0, slot);
                    }
                }
            }
        }
    }

    fn close(&mut self, key: String, slot: Slot) {
        let start = slot.win.start;
        if self.spec.output == OutputMode::Final || slot.dirty {
            let row = self.row(&key, &slot.win);
            self.pending.row_upserts.push(row);
        }
        self.pending.state_deletes.push((key, start));
    }

    fn row(&self, key: &str, w: &WinState) -> Row {
        let values: Map<String, Json> =
            self.spec.aggregates.iter().zip(&w.aggs).map(|(spec, a)| (spec.name.clone(), a.output(spec))).collect();
        let end = self.end_of(w);
        Row {
            key: key.to_string(),
            window_start: w.start,
            window_end: (end != i64::MAX).then_some(end),
            values: Json::Object(values),
        }
    }

    /// Everything changed since the last checkpoint; marks it clean.
    pub fn take_changes(&mut self) -> Changes {
        let mut out = std::mem::take(&mut self.pending);
        let update = self.spec.output == OutputMode::Update;
        let mut dirty: Vec<(String, WinState)> = Vec::new();
        for ((key, _), slot) in self.windows.iter_mut().filter(|(_, s)| s.dirty) {
            slot.dirty = false;
            dirty.push((key.clone(), slot.win.clone()));
        }
        for (key, list) in self.sessions.iter_mut() {
            for slot in list.iter_mut().filter(|s| s.dirty) {
                slot.dirty = false;
                dirty.push((key.clone(), slot.win.clone()));
            }
        }
        // A deterministic order makes store writes (and their failures) reproducible.
        dirty.sort_by(|a, b| (&a.0, a.1.start).cmp(&(&b.0, b.1.start)));
        for (key, win) in dirty {
            if update {
                out.row_upserts.push(self.row(&key, &win));
            }
            // Deleted earlier in this interval and alive again: the upsert wins.
            out.state_deletes.retain(|(k, s)| !(k == &key && *s == win.start));
            out.row_deletes.retain(|(k, s)| !(k == &key && *s == win.start));
            let blob = serde_cbor::to_vec(&win).unwrap_or_default();
            out.state_upserts.push((key, win.start, blob));
        }
        out
    }
}

fn add_reading(spec: &ViewSpec, win: &mut WinState, r: &Reading, tally: &mut Tally) {
    win.last_ts = win.last_ts.max(r.ts_ms);
    for (a, s) in win.aggs.iter_mut().zip(&spec.aggregates) {
        if !a.add(s, r) {
            tally.null_inputs += 1;
        }
    }
}

/// The starts of the fixed windows containing `ts` (oldest first).
pub fn window_starts(window: WindowSpec, ts: i64) -> Vec<i64> {
    match window {
        WindowSpec::Tumbling { size_ms } => vec![tumbling_start(ts, size_ms)],
        WindowSpec::Hopping { size_ms, slide_ms } => {
            let last = tumbling_start(ts, slide_ms);
            let mut starts = Vec::new();
            let mut s = last;
            while s > ts - size_ms {
                starts.push(s);
                s -= slide_ms;
            }
            starts.reverse();
            starts
        }
        WindowSpec::Global => vec![0],
        WindowSpec::Session { .. } => vec![],
    }
}

/// Whether a filter condition holds for a reading (missing values never match).
pub fn holds(c: &Condition, r: &Reading) -> bool {
    let Some(v) = field_value(&c.field, r) else { return false };
    match (v, &c.value) {
        (Val::Num(x), Literal::Num(y)) => match c.op {
            Op::Eq => x == *y,
            Op::Ne => x != *y,
            Op::Lt => x < *y,
            Op::Le => x <= *y,
            Op::Gt => x > *y,
            Op::Ge => x >= *y,
        },
        (Val::Str(x), Literal::Str(y)) => match c.op {
            Op::Eq => x == y,
            Op::Ne => x != y,
            _ => false,
        },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::views::spec::{AggFn, AggSpec, Field};

    fn spec(window: WindowSpec, output: OutputMode, lateness: i64) -> ViewSpec {
        ViewSpec {
            name: "v".into(),
            version: 1,
            key: Field::Device,
            window,
            output,
            allowed_lateness_ms: lateness,
            filter: vec![],
            aggregates: vec![
                AggSpec { name: "n".into(), func: AggFn::Count, of: None, max: 10 },
                AggSpec { name: "t".into(), func: AggFn::Sum, of: Some(Field::Metric("t".into())), max: 10 },
            ],
        }
    }

    fn reading(ts: i64, seq: u64) -> Reading {
        Reading {
            device: "d".into(),
            boot: 1,
            seq,
            ts_ms: ts,
            schema: 2,
            metrics: [("t".to_string(), Some(1.0))].into(),
            tags: BTreeMap::new(),
        }
    }

    fn feed(op: &mut ViewOperator, ts: i64, wm: Option<i64>) -> Vec<LateEvent> {
        let r = reading(ts, ts as u64);
        let mut late = Vec::new();
        op.process(&Event { partition: 0, offset: ts as u64, reading: &r, watermark: wm }, &mut late);
        late
    }

    #[test]
    fn hopping_windows_cover_a_reading_size_over_slide_times() {
        assert_eq!(window_starts(WindowSpec::Hopping { size_ms: 300, slide_ms: 100 }, 250), [0, 100, 200]);
        assert_eq!(window_starts(WindowSpec::Hopping { size_ms: 300, slide_ms: 100 }, -1), [-300, -200, -100]);
    }

    #[test]
    fn late_beyond_allowed_lateness_goes_to_the_late_log_within_it_updates_the_row() {
        let mut op = ViewOperator::new(spec(WindowSpec::Tumbling { size_ms: 100 }, OutputMode::Update, 50));
        assert!(feed(&mut op, 10, None).is_empty());
        // Window [0,100) + 50 lateness: on time while the partition watermark is below 150.
        assert!(feed(&mut op, 20, Some(149)).is_empty());
        let late = feed(&mut op, 30, Some(150));
        assert_eq!(late.len(), 1);
        assert_eq!((late[0].reason, late[0].window_start, late[0].watermark_ms), ("late", 0, 150));
        let ch = op.take_changes();
        assert_eq!(ch.row_upserts[0].values["n"], 2);
    }

    #[test]
    fn final_rows_appear_once_when_the_watermark_passes_end_plus_lateness() {
        let mut op = ViewOperator::new(spec(WindowSpec::Tumbling { size_ms: 100 }, OutputMode::Final, 20));
        feed(&mut op, 10, None);
        feed(&mut op, 90, None);
        let ch = op.take_changes();
        assert!(ch.row_upserts.is_empty(), "nothing before the window closes");
        assert_eq!(ch.state_upserts.len(), 1, "state is checkpointed meanwhile");
        op.on_watermark(119);
        assert!(op.take_changes().row_upserts.is_empty());
        op.on_watermark(120);
        let ch = op.take_changes();
        assert_eq!(ch.row_upserts.len(), 1);
        assert_eq!(ch.row_upserts[0].values["n"], 2);
        assert_eq!(ch.state_deletes, [("d".to_string(), 0)]);
        op.on_watermark(500);
        assert!(op.take_changes().row_upserts.is_empty(), "emitted exactly once");
    }

    #[test]
    fn sessions_merge_when_a_reading_bridges_them() {
        let mut op = ViewOperator::new(spec(WindowSpec::Session { gap_ms: 10 }, OutputMode::Update, 0));
        feed(&mut op, 0, None);
        feed(&mut op, 25, None);
        assert_eq!(op.take_changes().row_upserts.len(), 2);
        feed(&mut op, 8, None); // extends [0, 10) to [0, 18)
        feed(&mut op, 16, None); // [16, 26) overlaps [0, 18) and [25, 35): one session
        let ch = op.take_changes();
        assert_eq!(ch.row_upserts.len(), 1);
        assert_eq!((ch.row_upserts[0].window_start, ch.row_upserts[0].window_end), (0, Some(35)));
        assert_eq!(ch.row_upserts[0].values["n"], 4);
        assert_eq!(
            ch.row_deletes,
            [("d".to_string(), 25)],
            "the absorbed session's row leaves; the merged one keeps start 0"
        );
    }

    #[test]
    fn a_session_closes_one_gap_after_its_end() {
        let mut op = ViewOperator::new(spec(WindowSpec::Session { gap_ms: 10 }, OutputMode::Final, 0));
        feed(&mut op, 100, None);
        op.on_watermark(119);
        assert!(op.take_changes().row_upserts.is_empty());
        op.on_watermark(120);
        assert_eq!(op.take_changes().row_upserts.len(), 1);
    }

    #[test]
    fn a_window_closed_past_an_idle_partition_sends_its_stragglers_to_the_late_log() {
        let mut op = ViewOperator::new(spec(WindowSpec::Tumbling { size_ms: 100 }, OutputMode::Final, 0));
        feed(&mut op, 10, Some(0));
        op.on_watermark(1000);
        let late = feed(&mut op, 20, Some(5));
        assert_eq!(late.iter().map(|l| l.reason).collect::<Vec<_>>(), ["window_closed"]);
    }

    #[test]
    fn restored_state_continues_where_the_checkpoint_left_off() {
        let mut a = ViewOperator::new(spec(WindowSpec::Tumbling { size_ms: 100 }, OutputMode::Update, 0));
        feed(&mut a, 10, None);
        let ch = a.take_changes();
        let states = ch.state_upserts.iter().map(|(k, _, b)| (k.clone(), serde_cbor::from_slice(b).unwrap())).collect();
        let mut b = ViewOperator::new(spec(WindowSpec::Tumbling { size_ms: 100 }, OutputMode::Update, 0));
        b.restore(None, states);
        feed(&mut b, 20, None);
        feed(&mut a, 20, None);
        assert_eq!(a.take_changes().row_upserts, b.take_changes().row_upserts);
    }
}
