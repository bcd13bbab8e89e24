//! The batch computation of a view: a deliberately simple second code path
//! that shares only the view definitions (`spec`) with the streaming
//! operators. It has its own field access, filter evaluation and window
//! assignment (windows found by enumeration, not arithmetic), so a bug in
//! the streaming versions cannot hide by being made twice. It reads the
//! whole log, decides lateness the way the definition says (each reading
//! against its own partition's watermark before it), groups readings by key
//! and window, and computes every aggregate directly from the list of
//! values: two-pass variance, plain sorting for sets, lists, first and last,
//! an exact distinct count where the stream keeps a HyperLogLog sketch.
//!
//! The stream and this path must agree ([`diff`]); a test checks that over
//! random scenarios, and `views verify` (later) audits a live view with it.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use kappa_common::Reading;
use serde_json::{Map, Value as Json};

use super::spec::{AggFn, AggSpec, Condition, Field, Literal, Op, OutputMode, ViewSpec, WindowSpec};
use crate::eventlog::{Offset, Partition};

/// One log record, as the batch path reads it.
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub partition: Partition,
    pub offset: Offset,
    pub reading: Reading,
}

/// A view's rows: (key, window start) -> (window end, values).
pub type Rows = BTreeMap<(String, i64), (Option<i64>, Map<String, Json>)>;

/// A view computed in batch.
#[derive(Debug, Default)]
pub struct BatchView {
    pub rows: Rows,
    /// (partition, offset, window start) of every late reading-window.
    pub late: BTreeSet<(Partition, Offset, i64)>,
}

/// Computes `spec` over `log` (every partition, each in offset order), with
/// the processor's out-of-orderness bound.
pub fn compute(spec: &ViewSpec, log: &[LogEntry], bound_ms: i64) -> BatchView {
    let mut out = BatchView::default();
    // Each partition's watermark before each reading; duplicates are dropped
    // first and move nothing.
    let mut seen: HashSet<(String, u32, u64)> = HashSet::new();
    let mut max_ts: BTreeMap<Partition, i64> = BTreeMap::new();
    let mut sorted: Vec<&LogEntry> = log.iter().collect();
    sorted.sort_by_key(|e| (e.partition, e.offset));
    let lateness = spec.allowed_lateness_ms;
    let mut groups: BTreeMap<(String, i64), Vec<&Reading>> = BTreeMap::new();
    let mut session_input: BTreeMap<String, Vec<&Reading>> = BTreeMap::new();
    for e in sorted {
        let r = &e.reading;
        if !seen.insert((r.device.clone(), r.boot, r.seq)) {
            continue;
        }
        let wm = max_ts.get(&e.partition).map(|m| m - bound_ms);
        let m = max_ts.entry(e.partition).or_insert(r.ts_ms);
        *m = (*m).max(r.ts_ms);
        if !spec.filter.iter().all(|c| passes(c, r)) {
            continue;
        }
        let key = match value_of(&spec.key, r) {
            Some(Val::Str(s)) => s.to_string(),
            Some(Val::Num(n)) => n.to_string(),
            None => continue,
        };
        match spec.window {
            WindowSpec::Session { gap_ms } => {
                if wm.is_some_and(|w| r.ts_ms + gap_ms + lateness <= w) {
                    out.late.insert((e.partition, e.offset, r.ts_ms));
                } else {
                    session_input.entry(key).or_default().push(r);
                }
            }
            window => {
                for start in windows_of(window, r.ts_ms) {
                    let end = window_end(window, start);
                    if end.is_some_and(|end| wm.is_some_and(|w| end + lateness <= w)) {
                        out.late.insert((e.partition, e.offset, start));
                    } else {
                        groups.entry((key.clone(), start)).or_default().push(r);
                    }
                }
            }
        }
    }
    if let WindowSpec::Session { gap_ms } = spec.window {
        for (key, mut rs) in session_input {
            rs.sort_by_key(|r| r.ts_ms);
            let mut current: Vec<&Reading> = Vec::new();
            let mut last = i64::MIN;
            for r in rs {
                if !current.is_empty() && r.ts_ms >= last + gap_ms {
                    groups.insert((key.clone(), current[0].ts_ms), std::mem::take(&mut current));
                }
                last = if current.is_empty() { r.ts_ms } else { last.max(r.ts_ms) };
                current.push(r);
            }
            if !current.is_empty() {
                groups.insert((key.clone(), current[0].ts_ms), current);
            }
        }
    }
    // The processor's global watermark at the end: the minimum partition watermark.
    let global = max_ts.values().min().map(|m| m - bound_ms);
    for ((key, start), rs) in groups {
        let end = match spec.window {
            WindowSpec::Session { gap_ms } => rs.iter().map(|r| r.ts_ms).max().map(|l| l + gap_ms),
            w => window_end(w, start),
        };
        if spec.output == OutputMode::Final {
            let closes_at = match spec.window {
                WindowSpec::Session { gap_ms } => end.map(|e| e + gap_ms + lateness),
                _ => end.map(|e| e + lateness),
            };
            if global.is_none_or(|g| closes_at.is_none_or(|c| c > g)) {
                continue;
            }
        }
        let values = spec
            .aggregates
            .iter()
            .map(|a| {
                let v = aggregate(a, &rs);
                let times =
                    a.of == Some(Field::EventTime) && !matches!(a.func, AggFn::Avg | AggFn::Variance | AggFn::Stddev);
                (a.name.clone(), if times { integral(v) } else { v })
            })
            .collect();
        out.rows.insert((key, start), (end, values));
    }
    out
}

/// A field's value in a reading (`None`: null or missing).
#[derive(Debug, Clone, Copy)]
enum Val<'a> {
    Num(f64),
    Str(&'a str),
}

fn value_of<'r>(field: &Field, r: &'r Reading) -> Option<Val<'r>> {
    match field {
        Field::Device => Some(Val::Str(r.device.as_str())),
        Field::EventTime => Some(Val::Num(r.ts_ms as f64)),
        Field::Metric(name) => r.metrics.get(name).copied().flatten().map(Val::Num),
        Field::Tag(name) => r.tags.get(name).map(|t| Val::Str(t.as_str())),
    }
}

/// Whether a reading passes a filter condition: a missing value never does,
/// strings compare only for (in)equality.
fn passes(c: &Condition, r: &Reading) -> bool {
    match (value_of(&c.field, r), &c.value) {
        (Some(Val::Num(x)), Literal::Num(y)) => match c.op {
            Op::Eq => x == *y,
            Op::Ne => x != *y,
            Op::Lt => x < *y,
            Op::Le => x <= *y,
            Op::Gt => x > *y,
            Op::Ge => x >= *y,
        },
        (Some(Val::Str(x)), Literal::Str(y)) => match c.op {
            Op::Eq => x == y.as_str(),
            Op::Ne => x != y.as_str(),
            _ => false,
        },
        _ => false,
    }
}

/// The start of every window holding `ts`, found by walking the window
/// grid (multiples of the slide, or of the size) near `ts`.
fn windows_of(window: WindowSpec, ts: i64) -> Vec<i64> {
    let (size, slide) = match window {
        WindowSpec::Tumbling { size_ms } => (size_ms, size_ms),
        WindowSpec::Hopping { size_ms, slide_ms } => (size_ms, slide_ms),
        WindowSpec::Global => return vec![0],
        WindowSpec::Session { .. } => return Vec::new(),
    };
    // The grid point at or below ts, then back while windows still hold it.
    let mut start = ts - ts.rem_euclid(slide);
    let mut starts = Vec::new();
    while start + size > ts {
        starts.push(start);
        start -= slide;
    }
    starts.reverse();
    starts
}

/// Values over event times shown as integers (milliseconds), in lists too.
fn integral(v: Json) -> Json {
    match v {
        Json::Array(items) => Json::Array(items.into_iter().map(integral).collect()),
        v => match v.as_f64() {
            Some(x) if x.fract() == 0.0 && x.abs() < 9e15 => Json::from(x as i64),
            _ => v,
        },
    }
}

/// The order in which `first`, `last` and `list` see readings: event time,
/// then the reading's identity.
fn order(r: &Reading) -> (i64, &str, u32, u64) {
    (r.ts_ms, r.device.as_str(), r.boot, r.seq)
}

fn window_end(window: WindowSpec, start: i64) -> Option<i64> {
    match window {
        WindowSpec::Tumbling { size_ms } | WindowSpec::Hopping { size_ms, .. } => Some(start + size_ms),
        WindowSpec::Global | WindowSpec::Session { .. } => None,
    }
}

fn num(v: f64) -> Json {
    serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number)
}

fn aggregate(a: &AggSpec, rs: &[&Reading]) -> Json {
    let Some(field) = &a.of else { return Json::from(rs.len()) };
    let vals: Vec<(&Reading, Val<'_>)> = rs.iter().filter_map(|r| value_of(field, r).map(|v| (*r, v))).collect();
    let nums: Vec<f64> = vals.iter().filter_map(|(_, v)| if let Val::Num(n) = v { Some(*n) } else { None }).collect();
    let to_json = |v: &Val<'_>| match v {
        Val::Num(n) => num(*n),
        Val::Str(s) => Json::String(s.to_string()),
    };
    let n = nums.len() as f64;
    let mean = nums.iter().sum::<f64>() / n;
    let var = || nums.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1.0);
    match a.func {
        AggFn::Count => Json::from(vals.len()),
        AggFn::Sum => {
            if nums.is_empty() {
                Json::Null
            } else {
                num(nums.iter().sum())
            }
        }
        AggFn::Min => nums.iter().copied().reduce(f64::min).map_or(Json::Null, num),
        AggFn::Max => nums.iter().copied().reduce(f64::max).map_or(Json::Null, num),
        AggFn::Avg => {
            if nums.is_empty() {
                Json::Null
            } else {
                num(mean)
            }
        }
        AggFn::Variance => {
            if nums.len() < 2 {
                Json::Null
            } else {
                num(var())
            }
        }
        AggFn::Stddev => {
            if nums.len() < 2 {
                Json::Null
            } else {
                num(var().sqrt())
            }
        }
        AggFn::First => vals.iter().min_by_key(|(r, _)| order(r)).map_or(Json::Null, |(_, v)| to_json(v)),
        AggFn::Last => vals.iter().max_by_key(|(r, _)| order(r)).map_or(Json::Null, |(_, v)| to_json(v)),
        AggFn::ApproxDistinct => {
            let distinct: BTreeSet<String> = vals.iter().map(|(_, v)| text(v)).collect();
            Json::from(distinct.len())
        }
        AggFn::Set => {
            let distinct: BTreeSet<String> = vals.iter().map(|(_, v)| text(v)).collect();
            Json::Array(distinct.into_iter().take(a.max).map(Json::String).collect())
        }
        AggFn::List => {
            let mut sorted = vals.clone();
            sorted.sort_by_key(|(r, _)| order(r));
            Json::Array(sorted.iter().take(a.max).map(|(_, v)| to_json(v)).collect())
        }
    }
}

fn text(v: &Val<'_>) -> String {
    match v {
        Val::Num(n) => n.to_string(),
        Val::Str(s) => s.to_string(),
    }
}

/// Every difference between streamed rows and the batch result. Floats agree
/// within `1e-9` relative; `approx_distinct` within 2% or 1 (the sketch's
/// error); everything else exactly.
pub fn diff(spec: &ViewSpec, stream: &Rows, batch: &BatchView) -> Vec<String> {
    let mut problems = Vec::new();
    for (k, (end, values)) in &batch.rows {
        match stream.get(k) {
            None => problems.push(format!("{} {k:?}: in batch, missing from stream", spec.id())),
            Some((s_end, s_values)) => {
                if s_end != end {
                    problems.push(format!("{} {k:?}: window end {s_end:?} != batch {end:?}", spec.id()));
                }
                for a in &spec.aggregates {
                    let (s, b) =
                        (s_values.get(&a.name).unwrap_or(&Json::Null), values.get(&a.name).unwrap_or(&Json::Null));
                    if !agrees(a.func, s, b) {
                        problems.push(format!("{} {k:?} {}: stream {s} != batch {b}", spec.id(), a.name));
                    }
                }
            }
        }
    }
    for k in stream.keys().filter(|k| !batch.rows.contains_key(*k)) {
        problems.push(format!("{} {k:?}: in stream, missing from batch", spec.id()));
    }
    problems
}

fn agrees(f: AggFn, s: &Json, b: &Json) -> bool {
    match (s, b) {
        (Json::Number(x), Json::Number(y)) => {
            let (x, y) = (x.as_f64().unwrap_or(f64::NAN), y.as_f64().unwrap_or(f64::NAN));
            if f == AggFn::ApproxDistinct {
                (x - y).abs() <= (0.02 * y).max(1.0)
            } else {
                (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0)
            }
        }
        _ => s == b,
    }
}
