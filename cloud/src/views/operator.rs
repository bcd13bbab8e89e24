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

use std::borrow::Cow;

use kappa_common::Reading;
use kappa_common::window::tumbling_start;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;

use super::agg::{AggState, Inputs, Val, Values, field_value};
use super::spec::{Condition, Literal, Op, OutputMode, ViewSpec, WindowSpec};
use super::table::{Key, KeyTable, prefetch_slice};
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

/// One key's open windows, sorted by start (usually one, kept in place).
type Windows = SmallVec<[Slot; 1]>;

/// How far ahead of the reading being applied its successors' state is prefetched.
const PREFETCH_AHEAD: usize = 4;

/// A reading as an operator sees it.
#[derive(Debug, Clone, Copy)]
pub struct Event<'a> {
    pub partition: Partition,
    pub offset: Offset,
    /// The gateway that forwarded the reading.
    pub gateway: &'a str,
    /// When the cloud appended it (cloud clock, from the log record).
    pub ingest_ms: i64,
    pub reading: &'a Reading,
    /// The reading's partition watermark before this reading.
    pub watermark: Option<i64>,
}

pub use crate::model::{Changes, LateEvent, Row};

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
    /// key -> its open windows (sessions too), sorted by start. Looked up by
    /// `&str`, so a reading for a known key allocates nothing here; a short
    /// key is stored inline, compared without a pointer chase.
    slots: KeyTable<Windows>,
    /// The entry of each reading of the batch being processed (reused).
    batch_at: Vec<Option<u32>>,
    /// The fields the aggregates read, each read once per reading.
    inputs: Inputs,
    /// The global watermark at the last close.
    closed_through: Option<i64>,
    /// No open window closes before this watermark (a lower bound: a
    /// watermark below it closes nothing, without visiting every key).
    next_close: i64,
    pending: Changes,
    pub tally: Tally,
    /// Aggregate indices in name order: rows list their values sorted by name.
    by_name: Vec<usize>,
    /// Write each window's state where a row would go (a reader merges them).
    partials: bool,
}

impl ViewOperator {
    pub fn new(spec: ViewSpec) -> Self {
        let mut by_name: Vec<usize> = (0..spec.aggregates.len()).collect();
        by_name.sort_by(|a, b| spec.aggregates[*a].name.cmp(&spec.aggregates[*b].name));
        Self {
            by_name,
            id: spec.id(),
            inputs: Inputs::new(&spec.aggregates),
            spec,
            slots: KeyTable::default(),
            batch_at: Vec::new(),
            closed_through: None,
            next_close: i64::MAX,
            pending: Changes::default(),
            tally: Tally::default(),
            partials: false,
        }
    }

    /// Emits window states ([`Changes::partial_upserts`]) where rows would
    /// go, and its row deletes mean partials: for cluster workers computing
    /// a view keyed by a tag, whose rows mix partitions. The reader merges
    /// the partials of all partitions ([`merge_partials`]).
    pub fn keeping_partials(mut self) -> Self {
        self.partials = true;
        self
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn closed_through(&self) -> Option<i64> {
        self.closed_through
    }

    /// Restores state written by earlier checkpoints.
    pub fn restore(&mut self, closed_through: Option<i64>, states: Vec<(String, Vec<u8>)>) -> Result<(), String> {
        self.closed_through = closed_through;
        for (key, blob) in states {
            let win: WinState = serde_cbor::from_slice(&blob)
                .map_err(|e| format!("state of {} key {key:?} does not decode: {e}", self.id))?;
            self.next_close = self.next_close.min(close_at(&self.spec, &win));
            let at = self.slots.slot(&key);
            let list = self.slots.entry_mut(at).1;
            list.push(Slot { win, dirty: false });
            list.sort_by_key(|s| s.win.start);
        }
        Ok(())
    }

    /// Final rows of closed windows are waiting (update-mode rows simply go
    /// out with the next checkpoint).
    pub fn has_pending_output(&self) -> bool {
        self.spec.output == OutputMode::Final && !self.pending.row_upserts.is_empty()
    }

    /// Windows held in memory.
    pub fn state_len(&self) -> usize {
        self.slots.values().map(|l| l.len()).sum()
    }

    /// Adds a reading to its windows; late windows go to `late`.
    pub fn process(&mut self, ev: &Event<'_>, late: &mut Vec<LateEvent>) {
        self.process_batch(std::slice::from_ref(ev), late);
    }

    /// Adds readings to their windows, in order; late windows go to `late`.
    /// The same as [`ViewOperator::process`] for each in turn, but every
    /// reading's key is looked up first, so that the lookups' cache misses
    /// overlap, and state is then updated by index with the next readings'
    /// entries already on their way into the cache.
    pub fn process_batch(&mut self, evs: &[Event<'_>], late: &mut Vec<LateEvent>) {
        let mut at = std::mem::take(&mut self.batch_at);
        at.clear();
        at.extend(evs.iter().map(|ev| self.resolve(ev.reading)));
        for i in at.iter().take(PREFETCH_AHEAD).flatten() {
            self.slots.prefetch(*i);
        }
        for (n, ev) in evs.iter().enumerate() {
            if let Some(Some(next)) = at.get(n + PREFETCH_AHEAD) {
                self.slots.prefetch(*next);
            }
            // The aggregates of the next reading's newest window (its entry was prefetched).
            if let Some(Some(next)) = at.get(n + 1)
                && let Some(w) = self.slots.get(*next).and_then(|l| l.last())
            {
                prefetch_slice(&w.win.aggs);
            }
            if let Some(slot) = at[n] {
                self.apply(slot, ev, late);
            }
        }
        self.batch_at = at;
    }

    /// The entry of the reading's key; `None` (counted) when the filter
    /// rejects the reading or it has no key.
    fn resolve(&mut self, r: &Reading) -> Option<u32> {
        if !self.spec.filter.iter().all(|c| holds(c, r)) {
            self.tally.filtered += 1;
            return None;
        }
        let key: Cow<'_, str> = match field_value(&self.spec.key, r) {
            Some(Val::Str(s)) => Cow::Borrowed(s),
            Some(Val::Num(n)) => Cow::Owned(n.to_string()),
            None => {
                self.tally.missing_key += 1;
                return None;
            }
        };
        Some(self.slots.slot(&key))
    }

    /// Adds a reading whose key has entry `slot` to its windows.
    fn apply(&mut self, slot: u32, ev: &Event<'_>, late: &mut Vec<LateEvent>) {
        let r = ev.reading;
        let lateness = self.spec.allowed_lateness_ms;
        let late_window = |id: &str, start: i64, reason: &'static str| LateEvent {
            view: id.to_string(),
            partition: ev.partition,
            offset: ev.offset,
            window_start: start,
            device: r.device.clone(),
            boot: r.boot,
            seq: r.seq,
            ts_ms: r.ts_ms,
            watermark_ms: ev.watermark.unwrap_or(i64::MIN),
            reason,
        };
        match self.spec.window {
            WindowSpec::Session { gap_ms } => {
                let lone_end = r.ts_ms.saturating_add(gap_ms);
                if ev.watermark.is_some_and(|w| lone_end.saturating_add(lateness) <= w) {
                    late.push(late_window(&self.id, r.ts_ms, "late"));
                    self.tally.late += 1;
                } else if self.closed_through.is_some_and(|g| lone_end.saturating_add(gap_ms + lateness) <= g) {
                    late.push(late_window(&self.id, r.ts_ms, "window_closed"));
                    self.tally.late += 1;
                } else {
                    self.add_to_session(slot, r, gap_ms);
                    self.tally.applied += 1;
                }
            }
            window => {
                let mut applied = false;
                // Read once, for the first window that is on time.
                let mut values = None;
                for start in window_starts(window, r.ts_ms) {
                    let end = match window {
                        WindowSpec::Tumbling { size_ms } | WindowSpec::Hopping { size_ms, .. } => start + size_ms,
                        _ => i64::MAX,
                    };
                    if end != i64::MAX && ev.watermark.is_some_and(|w| end.saturating_add(lateness) <= w) {
                        late.push(late_window(&self.id, start, "late"));
                        self.tally.late += 1;
                        continue;
                    }
                    if end != i64::MAX && self.closed_through.is_some_and(|g| end.saturating_add(lateness) <= g) {
                        late.push(late_window(&self.id, start, "window_closed"));
                        self.tally.late += 1;
                        continue;
                    }
                    let Self { spec, slots, tally, next_close, inputs, .. } = self;
                    let values = values.get_or_insert_with(|| inputs.read(r));
                    let list = slots.entry_mut(slot).1;
                    let at = match list.binary_search_by_key(&start, |s| s.win.start) {
                        Ok(i) => i,
                        Err(i) => {
                            let win = WinState {
                                start,
                                last_ts: r.ts_ms,
                                aggs: spec.aggregates.iter().map(AggState::new).collect(),
                            };
                            *next_close = (*next_close).min(close_at(spec, &win));
                            list.insert(i, Slot { win, dirty: true });
                            i
                        }
                    };
                    add_reading(spec, inputs, values, &mut list[at].win, r, tally);
                    list[at].dirty = true;
                    applied = true;
                }
                if applied {
                    self.tally.applied += 1;
                }
            }
        }
    }

    fn add_to_session(&mut self, slot: u32, r: &Reading, gap_ms: i64) {
        let Self { spec, slots, tally, pending, next_close, inputs, .. } = self;
        let values = inputs.read(r);
        let (key, list) = slots.entry_mut(slot);
        let (lo, hi) = (r.ts_ms, r.ts_ms + gap_ms);
        let overlaps = |s: &Slot| s.win.start < hi && lo < s.win.last_ts + gap_ms;
        let mut hits = list.iter().enumerate().filter(|(_, s)| overlaps(s)).map(|(i, _)| i);
        let (first, second) = (hits.next(), hits.next());
        match (first, second) {
            // The common case: the reading extends one session in place.
            (Some(i), None) => {
                let old_start = list[i].win.start;
                let slot = &mut list[i];
                slot.win.start = slot.win.start.min(r.ts_ms);
                add_reading(spec, inputs, &values, &mut slot.win, r, tally);
                slot.dirty = true;
                if slot.win.start != old_start {
                    pending.state_deletes.push((key.to_string(), old_start));
                    pending.row_deletes.push((key.to_string(), old_start));
                    list.sort_by_key(|s| s.win.start);
                }
            }
            (None, _) => {
                let win = WinState {
                    start: r.ts_ms,
                    last_ts: r.ts_ms,
                    aggs: spec.aggregates.iter().map(AggState::new).collect(),
                };
                let mut slot = Slot { win, dirty: true };
                add_reading(spec, inputs, &values, &mut slot.win, r, tally);
                // A session only ever closes later as readings extend or merge it.
                *next_close = (*next_close).min(close_at(spec, &slot.win));
                let at = list.partition_point(|s| s.win.start < slot.win.start);
                list.insert(at, slot);
            }
            // The reading bridges sessions: merge them all into one.
            _ => {
                let mut merged = Slot {
                    win: WinState {
                        start: r.ts_ms,
                        last_ts: r.ts_ms,
                        aggs: spec.aggregates.iter().map(AggState::new).collect(),
                    },
                    dirty: true,
                };
                let mut kept = Windows::with_capacity(list.len());
                let mut absorbed = Vec::new();
                for s in list.drain(..) {
                    if overlaps(&s) {
                        merged.win.start = merged.win.start.min(s.win.start);
                        merged.win.last_ts = merged.win.last_ts.max(s.win.last_ts);
                        for (a, b) in merged.win.aggs.iter_mut().zip(&s.win.aggs) {
                            a.merge(b);
                        }
                        absorbed.push(s.win.start);
                    } else {
                        kept.push(s);
                    }
                }
                // An absorbed session that started elsewhere had another identity: it leaves the store.
                for start in absorbed.into_iter().filter(|s| *s != merged.win.start) {
                    pending.state_deletes.push((key.to_string(), start));
                    pending.row_deletes.push((key.to_string(), start));
                }
                add_reading(spec, inputs, &values, &mut merged.win, r, tally);
                kept.push(merged);
                kept.sort_by_key(|s| s.win.start);
                *list = kept;
            }
        }
    }

    /// The global watermark advanced: close every window it has passed.
    pub fn on_watermark(&mut self, watermark: i64) {
        if self.closed_through.is_some_and(|g| g >= watermark) {
            return;
        }
        self.closed_through = Some(watermark);
        if self.spec.window == WindowSpec::Global || watermark < self.next_close {
            return;
        }
        let mut closing = Vec::new();
        let mut next_close = i64::MAX;
        let Self { spec, slots, .. } = self;
        for (key, list) in slots.iter_mut() {
            // Closed windows move out (lists are short): no copy of their state.
            let mut i = 0;
            while i < list.len() {
                let at = close_at(spec, &list[i].win);
                if at <= watermark {
                    closing.push((key.to_string(), list.remove(i)));
                } else {
                    next_close = next_close.min(at);
                    i += 1;
                }
            }
        }
        self.next_close = next_close;
        // Keys left without windows go (a late reading's key can have made one).
        self.slots.retain(|_, l| !l.is_empty());
        closing.sort_by(|a, b| (&a.0, a.1.win.start).cmp(&(&b.0, b.1.win.start)));
        for (key, slot) in closing {
            self.close(key, slot);
        }
    }

    fn close(&mut self, key: String, slot: Slot) {
        let start = slot.win.start;
        if self.partials && (self.spec.output == OutputMode::Final || slot.dirty) {
            let partial = partial_of(self.spec.window, &key, &slot.win);
            self.pending.partial_upserts.push(partial);
        } else if self.spec.output == OutputMode::Final || slot.dirty {
            let row = self.row(&key, &slot.win);
            self.pending.row_upserts.push(row);
        }
        self.pending.state_deletes.push((key, start));
    }

    fn row(&self, key: &str, w: &WinState) -> Row {
        row_of(&self.spec, &self.by_name, key, w)
    }

    /// Everything changed since the last checkpoint; marks it clean. Rows
    /// and state are encoded straight from the live windows, in key order.
    pub fn take_changes(&mut self) -> Changes {
        let mut out = std::mem::take(&mut self.pending);
        let update = self.spec.output == OutputMode::Update;
        let partials = self.partials;
        let Self { spec, slots, by_name, .. } = self;
        let mut keys: Vec<(&Key, &mut Windows)> = slots.iter_mut().filter(|(_, l)| l.iter().any(|s| s.dirty)).collect();
        keys.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut alive: std::collections::HashSet<(String, i64)> = std::collections::HashSet::new();
        for (key, list) in keys {
            let key = key.as_str();
            for slot in list.iter_mut().filter(|s| s.dirty) {
                slot.dirty = false;
                if update && partials {
                    out.partial_upserts.push(partial_of(spec.window, key, &slot.win));
                } else if update {
                    out.row_upserts.push(row_of(spec, by_name, key, &slot.win));
                }
                let blob = crate::model::packed_cbor(&slot.win, 256);
                out.state_upserts.push((key.to_string(), slot.win.start, blob));
                if !out.state_deletes.is_empty() {
                    alive.insert((key.to_string(), slot.win.start));
                }
            }
        }
        // Deleted earlier in this interval and alive again: the upsert wins.
        out.state_deletes.retain(|k| !alive.contains(k));
        out.row_deletes.retain(|k| !alive.contains(k));
        out
    }
}

/// A row's JSON, written directly: values in name order.
fn row_of(spec: &ViewSpec, by_name: &[usize], key: &str, w: &WinState) -> Row {
    let mut values = Vec::with_capacity(32 * by_name.len());
    values.push(b'{');
    for (n, &i) in by_name.iter().enumerate() {
        if n > 0 {
            values.push(b',');
        }
        let a = &spec.aggregates[i];
        // Names are checked to be plain identifiers: no escaping needed.
        values.push(b'"');
        values.extend_from_slice(a.name.as_bytes());
        values.extend_from_slice(b"\":");
        // Writing JSON values into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut values, &w.aggs[i].output(a));
    }
    values.push(b'}');
    let end = Some(end_of(spec.window, w)).filter(|e| *e != i64::MAX);
    // serde_json writes UTF-8 only.
    let values = String::from_utf8(values).unwrap_or_default();
    Row { key: key.to_string(), window_start: w.start, window_end: end, values }
}

/// A window's state as a partial: key, start, end (none for the global window), CBOR.
fn partial_of(window: WindowSpec, key: &str, w: &WinState) -> (String, i64, Option<i64>, Vec<u8>) {
    let end = Some(end_of(window, w)).filter(|e| *e != i64::MAX);
    (key.to_string(), w.start, end, crate::model::packed_cbor(w, 256))
}

/// The rows of one key from its windows' partial states, computed apart
/// (one per partition) and handed over in any order: fixed windows with the
/// same start merge, and sessions merge wherever they overlap (a session
/// spans its readings plus one gap), exactly as one operator seeing every
/// reading would have merged them. Rows come out by window start.
/// [`merge_partials`] of window states as the operator encodes them (what
/// a store keeps): the function a store that serves merged views is given,
/// so that it never decodes window state itself.
pub fn merge_encoded(spec: &ViewSpec, key: &str, parts: &[Vec<u8>]) -> Result<Vec<Row>, String> {
    let wins = parts
        .iter()
        .map(|blob| serde_cbor::from_slice(blob))
        .collect::<Result<Vec<WinState>, _>>()
        .map_err(|e| format!("a partial of {} key {key:?} does not decode: {e}", spec.id()))?;
    Ok(merge_partials(spec, key, wins))
}

pub fn merge_partials(spec: &ViewSpec, key: &str, mut parts: Vec<WinState>) -> Vec<Row> {
    let mut by_name: Vec<usize> = (0..spec.aggregates.len()).collect();
    by_name.sort_by(|a, b| spec.aggregates[*a].name.cmp(&spec.aggregates[*b].name));
    parts.sort_by_key(|w| (w.start, w.last_ts));
    let mut merged: Vec<WinState> = Vec::with_capacity(parts.len());
    for w in parts {
        let joins = match (merged.last(), spec.window) {
            (Some(cur), WindowSpec::Session { gap_ms }) => w.start < cur.last_ts.saturating_add(gap_ms),
            (Some(cur), _) => w.start == cur.start,
            (None, _) => false,
        };
        match merged.last_mut() {
            Some(cur) if joins => {
                cur.last_ts = cur.last_ts.max(w.last_ts);
                for (a, b) in cur.aggs.iter_mut().zip(&w.aggs) {
                    a.merge(b);
                }
            }
            _ => merged.push(w),
        }
    }
    merged.iter().map(|w| row_of(spec, &by_name, key, w)).collect()
}

/// The global watermark at which a window closes (see [`ViewOperator::on_watermark`]).
fn close_at(spec: &ViewSpec, w: &WinState) -> i64 {
    let extra = match spec.window {
        WindowSpec::Session { gap_ms } => gap_ms,
        WindowSpec::Tumbling { .. } | WindowSpec::Hopping { .. } | WindowSpec::Global => 0,
    };
    end_of(spec.window, w).saturating_add(extra).saturating_add(spec.allowed_lateness_ms)
}

/// Where a window ends (exclusive); `i64::MAX` for the global window.
fn end_of(window: WindowSpec, w: &WinState) -> i64 {
    match window {
        WindowSpec::Tumbling { size_ms } | WindowSpec::Hopping { size_ms, .. } => w.start + size_ms,
        WindowSpec::Session { gap_ms } => w.last_ts + gap_ms,
        WindowSpec::Global => i64::MAX,
    }
}

fn add_reading(
    spec: &ViewSpec,
    inputs: &Inputs,
    values: &Values<'_>,
    win: &mut WinState,
    r: &Reading,
    tally: &mut Tally,
) {
    win.last_ts = win.last_ts.max(r.ts_ms);
    for (i, (a, s)) in win.aggs.iter_mut().zip(&spec.aggregates).enumerate() {
        if !a.add_value(s, inputs.of(i, values), r) {
            tally.null_inputs += 1;
        }
    }
}

/// The starts of the fixed windows containing `ts`, oldest first (no allocation).
pub fn window_starts(window: WindowSpec, ts: i64) -> impl Iterator<Item = i64> {
    let (first, step, count) = match window {
        WindowSpec::Tumbling { size_ms } => (tumbling_start(ts, size_ms), 1, 1),
        WindowSpec::Hopping { size_ms, slide_ms } => {
            let last = tumbling_start(ts, slide_ms);
            // Windows [s, s + size) with s = last - k * slide and s > ts - size.
            let count = (last - (ts - size_ms) - 1) / slide_ms + 1;
            (last - (count - 1) * slide_ms, slide_ms, count)
        }
        WindowSpec::Global => (0, 1, 1),
        WindowSpec::Session { .. } => (0, 1, 0),
    };
    (0..count).map(move |k| first + k * step)
}

/// Whether a filter condition holds for a reading (missing values never match).
pub fn holds(c: &Condition, r: &Reading) -> bool {
    let Some(v) = field_value(&c.field, r) else { return false };
    match (v, &c.value) {
        (Val::Num(x), Literal::Num(y)) => c.op.num(x, *y),
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
        op.process(
            &Event { partition: 0, offset: ts as u64, gateway: "gw", ingest_ms: 0, reading: &r, watermark: wm },
            &mut late,
        );
        late
    }

    proptest::proptest! {
        /// Readings handed over in batches of any size leave the same rows,
        /// state, late log and counters as one at a time: several keys,
        /// readings late and on time, sessions merging, windows closing
        /// between batches (and keys leaving and coming back).
        #[test]
        fn batches_of_any_size_process_as_one_reading_at_a_time(
            readings in proptest::collection::vec((0u8..4, 0i64..400, 0u8..3), 1..120),
            cuts in proptest::collection::vec(1usize..9, 1..40),
            session in proptest::bool::ANY,
        ) {
            let window = if session { WindowSpec::Session { gap_ms: 30 } } else { WindowSpec::Tumbling { size_ms: 50 } };
            let (mut one, mut batched) = (
                ViewOperator::new(spec(window, OutputMode::Update, 10)),
                ViewOperator::new(spec(window, OutputMode::Update, 10)),
            );
            let rs: Vec<Reading> = readings
                .iter()
                .enumerate()
                .map(|(i, (k, ts, _))| Reading { device: format!("d{k}"), ..reading(*ts, i as u64) })
                .collect();
            // The partition watermark trails the newest time by 40 ms; some readings are late.
            let mut newest = i64::MIN;
            let evs: Vec<Event<'_>> = rs
                .iter()
                .enumerate()
                .map(|(i, r)| {
                    let watermark = (newest != i64::MIN).then(|| newest - 40);
                    newest = newest.max(r.ts_ms);
                    Event { partition: 0, offset: i as u64, gateway: "gw", ingest_ms: 0, reading: r, watermark }
                })
                .collect();
            let (mut late_one, mut late_batched) = (Vec::new(), Vec::new());
            let (mut at, mut cut) = (0, cuts.iter().cycle());
            let mut changes = (Vec::new(), Vec::new());
            while at < evs.len() {
                let end = (at + cut.next().copied().unwrap_or(1)).min(evs.len());
                for ev in &evs[at..end] {
                    one.process(ev, &mut late_one);
                }
                batched.process_batch(&evs[at..end], &mut late_batched);
                // Now and then the global watermark closes windows, and a checkpoint takes the changes.
                if readings[end - 1].2 == 0 {
                    let g = evs[end - 1].watermark.unwrap_or(i64::MIN);
                    one.on_watermark(g);
                    batched.on_watermark(g);
                    changes.0.push(one.take_changes());
                    changes.1.push(batched.take_changes());
                }
                at = end;
            }
            changes.0.push(one.take_changes());
            changes.1.push(batched.take_changes());
            proptest::prop_assert_eq!(format!("{:?}", changes.0), format!("{:?}", changes.1));
            proptest::prop_assert_eq!(late_one, late_batched);
            proptest::prop_assert_eq!(one.state_len(), batched.state_len());
            proptest::prop_assert_eq!(format!("{:?}", one.tally), format!("{:?}", batched.tally));
        }
    }

    #[test]
    fn hopping_windows_cover_a_reading_size_over_slide_times() {
        let starts = |w, ts| window_starts(w, ts).collect::<Vec<_>>();
        assert_eq!(starts(WindowSpec::Hopping { size_ms: 300, slide_ms: 100 }, 250), [0, 100, 200]);
        assert_eq!(starts(WindowSpec::Hopping { size_ms: 300, slide_ms: 100 }, -1), [-300, -200, -100]);
        assert_eq!(starts(WindowSpec::Hopping { size_ms: 300, slide_ms: 100 }, 300), [100, 200, 300]);
        assert_eq!(starts(WindowSpec::Hopping { size_ms: 250, slide_ms: 100 }, 250), [100, 200]);
        assert_eq!(starts(WindowSpec::Tumbling { size_ms: 60 }, 59), [0]);
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
        assert_eq!(ch.row_upserts[0].json()["n"], 2);
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
        assert_eq!(ch.row_upserts[0].json()["n"], 2);
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
        assert_eq!(ch.row_upserts[0].json()["n"], 4);
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
        let states = ch.state_upserts.iter().map(|(k, _, b)| (k.clone(), b.clone())).collect();
        let mut b = ViewOperator::new(spec(WindowSpec::Tumbling { size_ms: 100 }, OutputMode::Update, 0));
        b.restore(None, states).unwrap();
        feed(&mut b, 20, None);
        feed(&mut a, 20, None);
        assert_eq!(a.take_changes().row_upserts, b.take_changes().row_upserts);
    }

    /// Readings split between two operators that keep partials, merged by
    /// [`merge_partials`], give the rows one operator over all of them gives:
    /// sessions bridged across the split, and fixed windows.
    #[test]
    fn partials_from_a_split_merge_into_the_rows_of_one_operator() {
        let times = [0, 300, 700, 1_200, 5_000, 5_400, 9_900, 10_100, 10_500, 30_000];
        for window in [WindowSpec::Session { gap_ms: 1_000 }, WindowSpec::Tumbling { size_ms: 2_000 }] {
            let mut one = ViewOperator::new(spec(window, OutputMode::Update, 0));
            let mut halves = [
                ViewOperator::new(spec(window, OutputMode::Update, 0)).keeping_partials(),
                ViewOperator::new(spec(window, OutputMode::Update, 0)).keeping_partials(),
            ];
            for (i, ts) in times.iter().enumerate() {
                feed(&mut one, *ts, None);
                // Alternate, so sessions are bridged only by the other half's readings.
                feed(&mut halves[i % 2], *ts, None);
            }
            let expected = one.take_changes().row_upserts;
            let wins: Vec<WinState> = halves
                .iter_mut()
                .flat_map(|h| h.take_changes().partial_upserts)
                .map(|(_, _, _, blob)| serde_cbor::from_slice(&blob).unwrap())
                .collect();
            assert!(wins.len() > expected.len(), "the halves hold partial windows: {window:?}");
            assert_eq!(merge_partials(&spec(window, OutputMode::Update, 0), "d", wins), expected, "{window:?}");
        }
    }
}
