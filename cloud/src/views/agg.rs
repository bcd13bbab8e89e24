//! Aggregate state: plain data with `add`, `merge` and `output`.
//!
//! Every aggregate gives the same result whatever order its inputs arrive
//! in, bit for bit. Sums are exact (Shewchuk's partials, as Python's
//! `math.fsum`), and variance is computed from exact `n·Σx² − (Σx)²` using
//! fused multiply-add for exact products, so it is both numerically stable
//! and independent of order. `first`, `last` and `list` order readings by
//! `(event time, device, boot, seq)`. Hence a view computed live, after a
//! crash, or by replaying the log is the same to the last bit.

use compact_str::CompactString;
use kappa_common::Reading;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use smallvec::SmallVec;

use super::spec::{AggFn, AggSpec, Field};

/// A value read from a reading: a number or text.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Val<'a> {
    Num(f64),
    Str(&'a str),
}

/// The value of `field` in `r`; `None` when null or missing.
pub fn field_value<'r>(field: &Field, r: &'r Reading) -> Option<Val<'r>> {
    match field {
        Field::Device => Some(Val::Str(&r.device)),
        Field::EventTime => Some(Val::Num(r.ts_ms as f64)),
        Field::Metric(m) => r.metric(m).map(Val::Num),
        Field::Tag(t) => r.tags.get(t).map(|s| Val::Str(s.as_str())),
    }
}

/// The distinct fields a view's aggregates read, each looked up once per
/// reading (metric and tag lookups compare names), and which one each
/// aggregate reads.
#[derive(Debug, Clone)]
pub struct Inputs {
    fields: Vec<Field>,
    of: Vec<Option<usize>>,
}

/// A reading's values of a view's [`Inputs`] (inline for up to 8 fields).
pub type Values<'r> = SmallVec<[Option<Val<'r>>; 8]>;

impl Inputs {
    pub fn new(aggregates: &[AggSpec]) -> Self {
        let mut fields: Vec<Field> = Vec::new();
        let of = aggregates
            .iter()
            .map(|a| {
                let f = a.of.as_ref()?;
                Some(fields.iter().position(|x| x == f).unwrap_or_else(|| {
                    fields.push(f.clone());
                    fields.len() - 1
                }))
            })
            .collect();
        Self { fields, of }
    }

    /// Each field's value in `r`.
    pub fn read<'r>(&self, r: &'r Reading) -> Values<'r> {
        self.fields.iter().map(|f| field_value(f, r)).collect()
    }

    /// What aggregate `i` reads from `values`: `None` when it reads no
    /// field (a count of readings), `Some(None)` when its field is null or missing.
    pub fn of<'r>(&self, i: usize, values: &Values<'r>) -> Option<Option<Val<'r>>> {
        self.of.get(i).copied().flatten().map(|k| values[k])
    }
}

/// A stored value (short text inline: no allocation per reading).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OwnedVal {
    Num(f64),
    Str(CompactString),
}

impl From<Val<'_>> for OwnedVal {
    fn from(v: Val<'_>) -> Self {
        match v {
            Val::Num(n) => OwnedVal::Num(n),
            Val::Str(s) => OwnedVal::Str(CompactString::from(s)),
        }
    }
}

fn json_num(v: f64) -> Json {
    serde_json::Number::from_f64(v).map_or(Json::Null, Json::Number)
}

impl OwnedVal {
    fn to_json(&self) -> Json {
        match self {
            OwnedVal::Num(n) => json_num(*n),
            OwnedVal::Str(s) => Json::String(s.to_string()),
        }
    }
}

/// Text form of a value for sets (numbers in shortest round-trip form).
fn text(v: Val<'_>) -> String {
    match v {
        Val::Num(n) => n.to_string(),
        Val::Str(s) => s.to_string(),
    }
}

/// The total order of readings used by `first`, `last` and `list` (the
/// device id inline when short: compared without a pointer chase).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct OrderKey {
    pub ts_ms: i64,
    pub device: CompactString,
    pub boot: u32,
    pub seq: u64,
}

impl OrderKey {
    pub fn of(r: &Reading) -> Self {
        Self { ts_ms: r.ts_ms, device: CompactString::from(r.device.as_str()), boot: r.boot, seq: r.seq }
    }

    /// How `r` orders against this key, without building a key for it.
    pub fn cmp_reading(&self, r: &Reading) -> std::cmp::Ordering {
        (r.ts_ms, r.device.as_str(), r.boot, r.seq).cmp(&(self.ts_ms, self.device.as_str(), self.boot, self.seq))
    }
}

/// An exact sum of floats: the non-overlapping partials of Shewchuk's algorithm.
/// Sums of sensor values need one or two partials, kept inline (no
/// allocation, no pointer to follow); it encodes as the list it is.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ExactSum {
    partials: SmallVec<[f64; 2]>,
}

impl ExactSum {
    pub fn add(&mut self, mut x: f64) {
        let mut i = 0;
        for j in 0..self.partials.len() {
            let mut y = self.partials[j];
            if x.abs() < y.abs() {
                std::mem::swap(&mut x, &mut y);
            }
            let hi = x + y;
            let lo = y - (hi - x);
            if lo != 0.0 {
                self.partials[i] = lo;
                i += 1;
            }
            x = hi;
        }
        self.partials.truncate(i);
        self.partials.push(x);
    }

    pub fn merge(&mut self, other: &ExactSum) {
        for &p in &other.partials {
            self.add(p);
        }
    }

    /// The sum, correctly rounded (round half to even), as `math.fsum`.
    pub fn value(&self) -> f64 {
        let p = &self.partials;
        let mut n = p.len();
        if n == 0 {
            return 0.0;
        }
        n -= 1;
        let mut hi = p[n];
        let mut lo = 0.0;
        while n > 0 {
            let x = hi;
            n -= 1;
            let y = p[n];
            hi = x + y;
            let yr = hi - x;
            lo = y - yr;
            if lo != 0.0 {
                break;
            }
        }
        if n > 0 && ((lo < 0.0 && p[n - 1] < 0.0) || (lo > 0.0 && p[n - 1] > 0.0)) {
            let y = lo * 2.0;
            let x = hi + y;
            if y == x - hi {
                hi = x;
            }
        }
        hi
    }

    /// Adds `a·b` exactly (the product and its rounding error).
    fn add_product(&mut self, a: f64, b: f64) {
        let p = a * b;
        self.add(p);
        self.add(a.mul_add(b, -p));
    }
}

/// Count, exact sum and exact sum of squares: avg, variance, stddev.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    pub n: u64,
    s: ExactSum,
    q: ExactSum,
}

impl Moments {
    pub fn add(&mut self, x: f64) {
        self.n += 1;
        self.s.add(x);
        self.q.add_product(x, x);
    }

    /// Adds `x` to the count and the sum only: for sums and averages,
    /// whose outputs never read the sum of squares.
    pub fn add_without_squares(&mut self, x: f64) {
        self.n += 1;
        self.s.add(x);
    }

    pub fn merge(&mut self, o: &Moments) {
        self.n += o.n;
        self.s.merge(&o.s);
        self.q.merge(&o.q);
    }

    pub fn sum(&self) -> f64 {
        self.s.value()
    }

    pub fn avg(&self) -> Option<f64> {
        (self.n > 0).then(|| self.s.value() / self.n as f64)
    }

    /// Sample variance (n − 1), from the exact `n·Σx² − (Σx)²`.
    pub fn variance(&self) -> Option<f64> {
        if self.n < 2 {
            return None;
        }
        let n = self.n as f64;
        let mut num = ExactSum::default();
        for &q in &self.q.partials {
            num.add_product(n, q);
        }
        for &a in &self.s.partials {
            for &b in &self.s.partials {
                num.add_product(-a, b);
            }
        }
        Some((num.value() / (n * (n - 1.0))).max(0.0))
    }
}

/// Distinct texts in byte order, the first two inline: most sets a window
/// keeps are small, and are then searched without a pointer chase. Encoded
/// as the sorted list of texts, as the `BTreeSet<String>` before it was.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
#[serde(transparent)]
pub struct TextSet(SmallVec<[CompactString; 2]>);

/// Sorted and deduplicated as it is read: a search relies on the order,
/// and state written by hand (or damaged) need not keep it.
impl<'de> Deserialize<'de> for TextSet {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut texts = SmallVec::<[CompactString; 2]>::deserialize(d)?;
        texts.sort_unstable();
        texts.dedup();
        Ok(TextSet(texts))
    }
}

impl TextSet {
    pub fn insert(&mut self, text: &str) {
        if let Err(at) = self.0.binary_search_by(|t| t.as_str().cmp(text)) {
            self.0.insert(at, CompactString::from(text));
        }
    }

    /// Keeps the `max` smallest texts.
    pub fn keep_first(&mut self, max: usize) {
        self.0.truncate(max);
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(CompactString::as_str)
    }
}

/// HyperLogLog with 2^12 registers, sparse while small. Small cardinalities
/// are estimated by linear counting and come out exact in practice.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Hll {
    Sparse(Vec<(u16, u8)>),
    Dense(Vec<u8>),
}

const HLL_P: u32 = 12;
const HLL_M: usize = 1 << HLL_P;
const HLL_SPARSE_MAX: usize = 512;

impl Default for Hll {
    fn default() -> Self {
        Hll::Sparse(Vec::new())
    }
}

/// A stable 64-bit hash of a value (FNV-1a, then a SplitMix64 finaliser).
pub fn stable_hash(v: Val<'_>) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |b: u8| {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    };
    match v {
        Val::Num(n) => {
            eat(1);
            n.to_bits().to_le_bytes().iter().for_each(|b| eat(*b));
        }
        Val::Str(s) => {
            eat(2);
            s.bytes().for_each(&mut eat);
        }
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl Hll {
    pub fn add_hash(&mut self, hash: u64) {
        let idx = (hash >> (64 - HLL_P)) as u16;
        let rho = (((hash << HLL_P) | (1 << (HLL_P - 1))).leading_zeros() + 1) as u8;
        self.set(idx, rho);
    }

    fn set(&mut self, idx: u16, rho: u8) {
        match self {
            Hll::Dense(regs) => regs[idx as usize] = regs[idx as usize].max(rho),
            Hll::Sparse(entries) => {
                match entries.binary_search_by_key(&idx, |e| e.0) {
                    Ok(i) => entries[i].1 = entries[i].1.max(rho),
                    Err(i) => entries.insert(i, (idx, rho)),
                }
                if entries.len() > HLL_SPARSE_MAX {
                    let mut regs = vec![0u8; HLL_M];
                    for &(i, r) in entries.iter() {
                        regs[i as usize] = r;
                    }
                    *self = Hll::Dense(regs);
                }
            }
        }
    }

    pub fn merge(&mut self, other: &Hll) {
        match other {
            Hll::Sparse(e) => e.iter().for_each(|&(i, r)| self.set(i, r)),
            Hll::Dense(regs) => {
                regs.iter().enumerate().filter(|(_, r)| **r > 0).for_each(|(i, &r)| self.set(i as u16, r))
            }
        }
    }

    pub fn estimate(&self) -> u64 {
        let m = HLL_M as f64;
        let (sum, zeros) = match self {
            Hll::Sparse(e) => {
                let set: f64 = e.iter().map(|&(_, r)| 2f64.powi(-i32::from(r))).sum();
                (set + (HLL_M - e.len()) as f64, HLL_M - e.len())
            }
            Hll::Dense(regs) => {
                (regs.iter().map(|&r| 2f64.powi(-i32::from(r))).sum(), regs.iter().filter(|&&r| r == 0).count())
            }
        };
        let alpha = 0.7213 / (1.0 + 1.079 / m);
        let raw = alpha * m * m / sum;
        let est = if raw <= 2.5 * m && zeros > 0 { m * (m / zeros as f64).ln() } else { raw };
        est.round() as u64
    }
}

/// The state of one aggregate in one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum AggState {
    Count(u64),
    Sum(Moments),
    Min(Option<f64>),
    Max(Option<f64>),
    Moments(Moments),
    First(Option<(OrderKey, OwnedVal)>),
    Last(Option<(OrderKey, OwnedVal)>),
    Distinct(Hll),
    Set { items: TextSet, max: usize },
    List { items: Vec<(OrderKey, OwnedVal)>, max: usize },
}

impl AggState {
    /// The empty state for `spec`.
    pub fn new(spec: &AggSpec) -> Self {
        match spec.func {
            AggFn::Count => AggState::Count(0),
            AggFn::Sum => AggState::Sum(Moments::default()),
            AggFn::Min => AggState::Min(None),
            AggFn::Max => AggState::Max(None),
            AggFn::Avg | AggFn::Variance | AggFn::Stddev => AggState::Moments(Moments::default()),
            AggFn::First => AggState::First(None),
            AggFn::Last => AggState::Last(None),
            AggFn::ApproxDistinct => AggState::Distinct(Hll::default()),
            AggFn::Set => AggState::Set { items: TextSet::default(), max: spec.max },
            AggFn::List => AggState::List { items: Vec::new(), max: spec.max },
        }
    }

    /// Adds reading `r`, whose value of the aggregate's field is `value`
    /// (read once per reading by [`Inputs`]; `None` when the aggregate reads
    /// no field). Returns false when the input was null or missing (skipped,
    /// for the caller to count).
    pub fn add_value(&mut self, spec: &AggSpec, value: Option<Option<Val<'_>>>, r: &Reading) -> bool {
        let value = match value {
            None => {
                if let AggState::Count(n) = self {
                    *n += 1;
                }
                return true;
            }
            Some(v) => v,
        };
        let Some(v) = value else { return false };
        let num = match v {
            Val::Num(n) => Some(n),
            Val::Str(_) => None,
        };
        match self {
            AggState::Count(n) => *n += 1,
            // A sum or an average needs no sum of squares (variance does).
            AggState::Sum(m) => {
                if let Some(x) = num {
                    m.add_without_squares(x);
                }
            }
            AggState::Moments(m) => match (num, spec.func) {
                (Some(x), AggFn::Avg) => m.add_without_squares(x),
                (Some(x), _) => m.add(x),
                (None, _) => {}
            },
            AggState::Min(cur) => {
                if let Some(x) = num {
                    *cur = Some(cur.map_or(x, |c| c.min(x)));
                }
            }
            AggState::Max(cur) => {
                if let Some(x) = num {
                    *cur = Some(cur.map_or(x, |c| c.max(x)));
                }
            }
            AggState::First(cur) => {
                if cur.as_ref().is_none_or(|(c, _)| c.cmp_reading(r).is_lt()) {
                    *cur = Some((OrderKey::of(r), v.into()));
                }
            }
            AggState::Last(cur) => {
                if cur.as_ref().is_none_or(|(c, _)| c.cmp_reading(r).is_gt()) {
                    *cur = Some((OrderKey::of(r), v.into()));
                }
            }
            AggState::Distinct(h) => h.add_hash(stable_hash(v)),
            AggState::Set { items, max } => {
                match v {
                    Val::Str(s) => items.insert(s),
                    Val::Num(_) => items.insert(&text(v)),
                }
                items.keep_first(*max);
            }
            AggState::List { items, max } => {
                let at = items.partition_point(|(c, _)| !c.cmp_reading(r).is_lt());
                if at < *max {
                    items.insert(at, (OrderKey::of(r), v.into()));
                    items.truncate(*max);
                }
            }
        }
        true
    }

    /// Folds `other` (the same aggregate) into `self`, as if every reading of
    /// both had been added here.
    pub fn merge(&mut self, other: &AggState) {
        match (self, other) {
            (AggState::Count(a), AggState::Count(b)) => *a += b,
            (AggState::Sum(a), AggState::Sum(b)) | (AggState::Moments(a), AggState::Moments(b)) => a.merge(b),
            (AggState::Min(a), AggState::Min(b)) => *a = min_opt(*a, *b, f64::min),
            (AggState::Max(a), AggState::Max(b)) => *a = min_opt(*a, *b, f64::max),
            (AggState::First(a), AggState::First(b)) => {
                if let Some(bv) = b
                    && a.as_ref().is_none_or(|av| bv.0 < av.0)
                {
                    *a = Some(bv.clone());
                }
            }
            (AggState::Last(a), AggState::Last(b)) => {
                if let Some(bv) = b
                    && a.as_ref().is_none_or(|av| bv.0 > av.0)
                {
                    *a = Some(bv.clone());
                }
            }
            (AggState::Distinct(a), AggState::Distinct(b)) => a.merge(b),
            (AggState::Set { items: a, max }, AggState::Set { items: b, .. }) => {
                b.iter().for_each(|t| a.insert(t));
                a.keep_first(*max);
            }
            (AggState::List { items: a, max }, AggState::List { items: b, .. }) => {
                a.extend(b.iter().cloned());
                a.sort_by(|x, y| x.0.cmp(&y.0));
                a.truncate(*max);
            }
            _ => {}
        }
    }

    /// The output column value. Event times come out as integers (Unix ms).
    pub fn output(&self, spec: &AggSpec) -> Json {
        let out = self.output_raw(spec);
        if spec.of == Some(Field::EventTime) && !matches!(spec.func, AggFn::Avg | AggFn::Variance | AggFn::Stddev) {
            return integral(out);
        }
        out
    }

    fn output_raw(&self, spec: &AggSpec) -> Json {
        match self {
            AggState::Count(n) => Json::from(*n),
            AggState::Sum(m) => {
                if m.n > 0 {
                    json_num(m.sum())
                } else {
                    Json::Null
                }
            }
            AggState::Min(v) | AggState::Max(v) => v.map_or(Json::Null, json_num),
            AggState::Moments(m) => match spec.func {
                AggFn::Avg => m.avg().map_or(Json::Null, json_num),
                AggFn::Variance => m.variance().map_or(Json::Null, json_num),
                _ => m.variance().map_or(Json::Null, |v| json_num(v.sqrt())),
            },
            AggState::First(v) | AggState::Last(v) => v.as_ref().map_or(Json::Null, |(_, v)| v.to_json()),
            AggState::Distinct(h) => Json::from(h.estimate()),
            AggState::Set { items, .. } => Json::Array(items.iter().map(|s| Json::String(s.to_string())).collect()),
            AggState::List { items, .. } => Json::Array(items.iter().map(|(_, v)| v.to_json()).collect()),
        }
    }
}

/// Whole numbers as JSON integers, recursively through arrays.
pub fn integral(v: Json) -> Json {
    match v {
        Json::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Json::from(f as i64),
            _ => Json::Number(n),
        },
        Json::Array(a) => Json::Array(a.into_iter().map(integral).collect()),
        other => other,
    }
}

fn min_opt(a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(f(x, y)),
        (x, None) => x,
        (None, y) => y,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_set_is_the_sorted_set_it_replaced_and_reads_its_state() {
        let words = ["status", "telemetry", "alarm", "status", "a-much-longer-text-than-fits-inline", "boot"];
        let mut set = TextSet::default();
        let mut old = std::collections::BTreeSet::new();
        for w in words {
            set.insert(w);
            old.insert(w.to_string());
        }
        assert_eq!(set.iter().collect::<Vec<_>>(), old.iter().map(String::as_str).collect::<Vec<_>>());
        let (new_bytes, old_bytes) = (serde_cbor::to_vec(&set).unwrap(), serde_cbor::to_vec(&old).unwrap());
        assert_eq!(new_bytes, old_bytes, "checkpointed state encodes as before");
        assert_eq!(serde_cbor::from_slice::<TextSet>(&old_bytes).unwrap(), set, "earlier state decodes");
        let unsorted = serde_cbor::to_vec(&["status", "alarm", "status"]).unwrap();
        let read: TextSet = serde_cbor::from_slice(&unsorted).unwrap();
        assert_eq!(read.iter().collect::<Vec<_>>(), ["alarm", "status"], "read sorted, once each");
        set.keep_first(2);
        assert_eq!(set.iter().collect::<Vec<_>>(), ["a-much-longer-text-than-fits-inline", "alarm"]);
    }

    #[test]
    fn exact_sums_do_not_depend_on_order() {
        let xs = [1e16, 1.0, -1e16, 3.25, 1e-9, 7.0, -2.5e15, 2.5e15];
        let mut a = ExactSum::default();
        xs.iter().for_each(|&x| a.add(x));
        let mut b = ExactSum::default();
        xs.iter().rev().for_each(|&x| b.add(x));
        assert_eq!(a.value().to_bits(), b.value().to_bits());
        assert_eq!(a.value(), 11.250000001);
        let naive: f64 = xs.iter().sum();
        assert_ne!(naive, a.value(), "naive summation loses the small terms");
    }

    #[test]
    fn variance_is_stable_where_the_textbook_formula_cancels() {
        // Values near 1e9 with spread 1: naive sum-of-squares variance collapses.
        let xs: Vec<f64> = (0..1000).map(|i| 1e9 + f64::from(i % 3)).collect();
        let mut m = Moments::default();
        xs.iter().for_each(|&x| m.add(x));
        let mean = xs.iter().sum::<f64>() / 1000.0;
        let two_pass = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / 999.0;
        assert!((m.variance().unwrap() - two_pass).abs() < 1e-12, "{:?} vs {two_pass}", m.variance());
    }

    #[test]
    fn merging_equals_adding_everything_in_one_place() {
        let mut a = Moments::default();
        let mut b = Moments::default();
        let mut all = Moments::default();
        for i in 0..100 {
            let x = f64::from(i) * 0.1;
            if i % 3 == 0 {
                a.add(x)
            } else {
                b.add(x)
            }
            all.add(x);
        }
        a.merge(&b);
        assert_eq!(a.avg().unwrap().to_bits(), all.avg().unwrap().to_bits());
        assert_eq!(a.variance().unwrap().to_bits(), all.variance().unwrap().to_bits());
    }

    #[test]
    fn small_distinct_counts_are_exact_and_large_ones_close() {
        let mut h = Hll::default();
        for i in 0..3 {
            h.add_hash(stable_hash(Val::Str(&format!("user-{i}"))));
            h.add_hash(stable_hash(Val::Str(&format!("user-{i}"))));
        }
        assert_eq!(h.estimate(), 3);
        let mut big = Hll::default();
        for i in 0..100_000 {
            big.add_hash(stable_hash(Val::Num(f64::from(i))));
        }
        let e = big.estimate() as f64;
        assert!((e - 100_000.0).abs() / 100_000.0 < 0.03, "{e}");
    }

    #[test]
    fn a_sparse_and_a_dense_sketch_merge_into_the_union() {
        let mut a = Hll::default();
        let mut b = Hll::default();
        for i in 0..2000 {
            b.add_hash(stable_hash(Val::Num(f64::from(i))));
        }
        for i in 1000..1010 {
            a.add_hash(stable_hash(Val::Num(f64::from(i))));
        }
        a.merge(&b);
        let e = a.estimate() as f64;
        assert!((e - 2000.0).abs() < 60.0, "{e}");
    }
}
