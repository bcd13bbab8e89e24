//! The columnar batch layout (batch format 2): what makes the WAN link cheap.
//!
//! A gateway's batch holds many readings from few devices, and a device's
//! consecutive readings differ little: the same boot, the next sequence
//! number, the timestamp one period later, values that move by a few sensor
//! steps. Format 1 spells every reading out in CBOR; zstd then has to find
//! that regularity inside interleaved records. This layout hands it over
//! directly. Readings are grouped per device, and each field of a group is
//! one column:
//!
//! * `boot`, `schema` and the tag set (an index into the group's distinct tag
//!   maps) as integers; `seq` as first differences; `ts_ms` as second
//!   differences (a steady period becomes a column of zeros);
//! * each metric as a presence column (absent, null, value) and its values as
//!   first differences of scaled integers when every value is a decimal with
//!   at most [`MAX_SCALE`] digits (as `f64`, or as the `f32` a sensor sent);
//!   otherwise as raw IEEE bits XORed with the previous value;
//! * a column whose values are all equal is written once.
//!
//! The original order of readings across devices is kept in an `order` column
//! of group indexes, so the receiver sees exactly the batch the gateway built:
//! decoding is lossless, bit for bit. Integers are LEB128 varints (signed ones
//! zigzagged); the whole payload is then one zstd frame like format 1.
//!
//! ```text
//! "KBC\x02"  gateway:str  batch_id:varint  readings:varint  groups:varint
//! group*:    device:str  count:varint  tag_sets:varint (pairs:varint (str str)*)*
//!            boot:ints  schema:ints  tag_set:ints  seq:series(1)  ts:series(2)
//!            metrics:varint (name:str kind:u8 [scale:u8] presence:ints values)*
//! order:     ints (group index per reading)
//! [aggregates: varint length, packed CBOR of the batch's aggregates]
//! ints:      0x00 zigzag            (all equal)  |  0x01 zigzag*   (one per row)
//! series(k): k zigzags (the first k-fold differences), then ints of the rest
//! ```
//!
//! The decoder treats its input as hostile: every count is checked against
//! the bytes left and the batch's reading cap before anything is allocated.

use std::collections::BTreeMap;

use super::{BatchError, EdgeBatch};
use crate::reading::Reading;

/// The batch format number of this layout.
pub const COLUMNAR_FORMAT: u16 = 2;

/// What a columnar payload starts with (packed CBOR of format 1 starts with a map header).
pub(crate) const MAGIC: &[u8; 4] = b"KBC\x02";

/// Most decimal digits after the point a scaled value column carries.
pub const MAX_SCALE: u8 = 6;

/// Metric and tag cells (rows × columns) a batch may decode to, per reading
/// it may carry: a hostile batch cannot make the decoder build more values
/// than that many full readings hold.
const CELLS_PER_READING: usize = 48;

/// Scaled integers stay within the range an `f64` holds exactly.
const MAX_SCALED: f64 = 9_007_199_254_740_992.0; // 2^53

const PRESENCE_ABSENT: i64 = 0;
const PRESENCE_NULL: i64 = 1;
const PRESENCE_VALUE: i64 = 2;

/// How one metric's values of one device are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ValueKind {
    /// `value == m / 10^scale` exactly, for an integer `m`.
    Decimal(u8),
    /// `value == f64::from((m / 10^scale) as f32)` exactly: what a sensor sending `f32` produces.
    DecimalF32(u8),
    /// Anything else: IEEE bits, XORed with the previous value's.
    Raw,
}

impl ValueKind {
    fn tag(self) -> u8 {
        match self {
            Self::Decimal(_) => 0,
            Self::DecimalF32(_) => 1,
            Self::Raw => 2,
        }
    }

    fn value(self, m: i64) -> f64 {
        match self {
            Self::Decimal(s) => m as f64 / pow10(s),
            Self::DecimalF32(s) => f64::from((m as f64 / pow10(s)) as f32),
            Self::Raw => f64::from_bits(m as u64),
        }
    }

    /// The scaled integer for `v` if this kind reproduces `v` bit for bit.
    fn scaled(self, v: f64) -> Option<i64> {
        let scale = match self {
            Self::Decimal(s) | Self::DecimalF32(s) => s,
            Self::Raw => return Some(v.to_bits() as i64),
        };
        let m = (v * pow10(scale)).round();
        if !m.is_finite() || m.abs() > MAX_SCALED {
            return None;
        }
        let m = m as i64;
        (self.value(m).to_bits() == v.to_bits()).then_some(m)
    }

    /// The most compact kind that reproduces every value exactly.
    fn choose(values: &[f64]) -> Self {
        let fits = |kind: Self| values.iter().all(|&v| kind.scaled(v).is_some());
        (0..=MAX_SCALE)
            .map(Self::Decimal)
            .find(|&k| fits(k))
            .or_else(|| (0..=MAX_SCALE).map(Self::DecimalF32).find(|&k| fits(k)))
            .unwrap_or(Self::Raw)
    }
}

fn pow10(scale: u8) -> f64 {
    10f64.powi(i32::from(scale))
}

/// Encodes a batch in the columnar layout (not yet compressed).
pub fn encode(batch: &EdgeBatch) -> Vec<u8> {
    let mut groups: Vec<(&str, Vec<&Reading>)> = Vec::new();
    let mut index: BTreeMap<&str, usize> = BTreeMap::new();
    let mut order = Vec::with_capacity(batch.readings.len());
    for r in &batch.readings {
        let g = *index.entry(&r.device).or_insert_with(|| {
            groups.push((&r.device, Vec::new()));
            groups.len() - 1
        });
        groups[g].1.push(r);
        order.push(g as i64);
    }

    let mut out = Out(Vec::with_capacity(batch.readings.len() * 8 + 64));
    out.0.extend_from_slice(MAGIC);
    out.str(&batch.gateway);
    out.varint(batch.batch_id);
    out.varint(batch.readings.len() as u64);
    out.varint(groups.len() as u64);
    for (device, rows) in &groups {
        encode_group(&mut out, device, rows);
    }
    out.ints(&order);
    if !batch.aggregates.is_empty() {
        // Few per batch (one per device, metric and window): packed CBOR is small enough.
        let cbor = serde_cbor::ser::to_vec_packed(&batch.aggregates).unwrap_or_default();
        out.varint(cbor.len() as u64);
        out.0.extend_from_slice(&cbor);
    }
    out.0
}

fn encode_group(out: &mut Out, device: &str, rows: &[&Reading]) {
    out.str(device);
    out.varint(rows.len() as u64);

    let mut tag_sets: Vec<&BTreeMap<String, String>> = Vec::new();
    let tag_index: Vec<i64> = rows
        .iter()
        .map(|r| {
            let i = tag_sets.iter().position(|t| **t == r.tags).unwrap_or_else(|| {
                tag_sets.push(&r.tags);
                tag_sets.len() - 1
            });
            i as i64
        })
        .collect();
    out.varint(tag_sets.len() as u64);
    for tags in &tag_sets {
        out.varint(tags.len() as u64);
        for (k, v) in *tags {
            out.str(k);
            out.str(v);
        }
    }

    out.ints(&rows.iter().map(|r| i64::from(r.boot)).collect::<Vec<_>>());
    out.ints(&rows.iter().map(|r| i64::from(r.schema)).collect::<Vec<_>>());
    out.ints(&tag_index);
    out.series(&rows.iter().map(|r| r.seq as i64).collect::<Vec<_>>(), 1);
    out.series(&rows.iter().map(|r| r.ts_ms).collect::<Vec<_>>(), 2);

    let names: std::collections::BTreeSet<&str> =
        rows.iter().flat_map(|r| r.metrics.keys()).map(String::as_str).collect();
    out.varint(names.len() as u64);
    for name in names {
        let mut presence = Vec::with_capacity(rows.len());
        let mut values = Vec::with_capacity(rows.len());
        for r in rows {
            presence.push(match r.metrics.get(name) {
                None => PRESENCE_ABSENT,
                Some(None) => PRESENCE_NULL,
                Some(Some(v)) => {
                    values.push(*v);
                    PRESENCE_VALUE
                }
            });
        }
        let kind = ValueKind::choose(&values);
        out.str(name);
        out.0.push(kind.tag());
        if let ValueKind::Decimal(s) | ValueKind::DecimalF32(s) = kind {
            out.0.push(s);
        }
        out.ints(&presence);
        // `choose` checked every value, so `scaled` answers for each.
        let scaled: Vec<i64> = values.iter().map(|&v| kind.scaled(v).unwrap_or_default()).collect();
        match kind {
            ValueKind::Raw => {
                let mut prev = 0u64;
                for m in scaled {
                    out.0.extend_from_slice(&((m as u64) ^ prev).to_le_bytes());
                    prev = m as u64;
                }
            }
            _ => out.series(&scaled, 1),
        }
    }
}

/// Decodes a columnar payload (already decompressed), refusing more than `max_readings`.
pub fn decode(bytes: &[u8], max_readings: usize) -> Result<EdgeBatch, BatchError> {
    let mut inp = In { buf: bytes, pos: 0 };
    if inp.take(MAGIC.len())? != MAGIC {
        return Err(malformed("not a columnar batch"));
    }
    let gateway = inp.str()?.to_string();
    let batch_id = inp.varint()?;
    let count = usize::try_from(inp.varint()?).unwrap_or(usize::MAX);
    if count > max_readings {
        return Err(BatchError::TooManyReadings { count, max: max_readings });
    }
    if count > inp.left() {
        return Err(malformed("count larger than the batch"));
    }
    let group_count = inp.len()?;
    if group_count > count {
        return Err(malformed("more device groups than readings"));
    }
    let mut groups = Vec::with_capacity(group_count);
    let mut seen = 0usize;
    let mut cells = max_readings.saturating_mul(CELLS_PER_READING);
    for _ in 0..group_count {
        let group = decode_group(&mut inp, count - seen, &mut cells)?;
        seen += group.len();
        groups.push(group.into_iter());
    }
    if seen != count {
        return Err(malformed("device groups do not add up to the reading count"));
    }
    let order = inp.ints(count)?;
    let mut readings = Vec::with_capacity(count);
    for g in order {
        let reading = usize::try_from(g)
            .ok()
            .and_then(|g| groups.get_mut(g))
            .and_then(Iterator::next)
            .ok_or_else(|| malformed("order column does not match the device groups"))?;
        readings.push(reading);
    }
    let mut aggregates = Vec::new();
    if inp.left() > 0 {
        let n = inp.len()?;
        aggregates = serde_cbor::from_slice(inp.take(n)?).map_err(|e| malformed(&format!("aggregates: {e}")))?;
    }
    if inp.left() != 0 {
        return Err(malformed("trailing bytes after the aggregates"));
    }
    Ok(EdgeBatch { format: COLUMNAR_FORMAT, gateway, batch_id, readings, aggregates })
}

/// Takes `rows × columns` cells from the batch's budget.
fn spend(cells: &mut usize, rows: usize, columns: usize) -> Result<(), BatchError> {
    *cells = cells
        .checked_sub(rows.saturating_mul(columns))
        .ok_or_else(|| malformed("more metric and tag values than the batch's readings may hold"))?;
    Ok(())
}

fn decode_group(inp: &mut In<'_>, left: usize, cells: &mut usize) -> Result<Vec<Reading>, BatchError> {
    let device = inp.str()?.to_string();
    let n = inp.len()?;
    if n == 0 || n > left {
        return Err(malformed("a device group's row count is out of range"));
    }
    let set_count = inp.len()?;
    let mut tag_sets = Vec::with_capacity(set_count.min(n));
    for _ in 0..set_count {
        let pairs = inp.len()?;
        spend(cells, n, pairs)?;
        let mut tags = BTreeMap::new();
        for _ in 0..pairs {
            let k = inp.str()?.to_string();
            let v = inp.str()?.to_string();
            tags.insert(k, v);
        }
        tag_sets.push(tags);
    }
    let boots = inp.ints(n)?;
    let schemas = inp.ints(n)?;
    let tag_index = inp.ints(n)?;
    let seqs = inp.series(n, 1)?;
    let times = inp.series(n, 2)?;

    let mut rows = Vec::with_capacity(n);
    for i in 0..n {
        let tags = usize::try_from(tag_index[i])
            .ok()
            .and_then(|t| tag_sets.get(t))
            .ok_or_else(|| malformed("tag set index out of range"))?
            .clone();
        rows.push(Reading {
            device: device.clone(),
            boot: u32::try_from(boots[i]).map_err(|_| malformed("boot out of range"))?,
            seq: seqs[i] as u64,
            ts_ms: times[i],
            schema: u16::try_from(schemas[i]).map_err(|_| malformed("schema out of range"))?,
            metrics: BTreeMap::new(),
            tags,
        });
    }

    let metric_count = inp.len()?;
    spend(cells, n, metric_count)?;
    for _ in 0..metric_count {
        let name = inp.str()?.to_string();
        let kind = match inp.byte()? {
            0 => ValueKind::Decimal(inp.scale()?),
            1 => ValueKind::DecimalF32(inp.scale()?),
            2 => ValueKind::Raw,
            t => return Err(malformed(&format!("unknown value kind {t}"))),
        };
        let presence = inp.ints(n)?;
        let present = presence.iter().filter(|&&p| p == PRESENCE_VALUE).count();
        let scaled = match kind {
            ValueKind::Raw => {
                let mut prev = 0u64;
                let mut out = Vec::with_capacity(present.min(inp.left() / 8));
                for _ in 0..present {
                    let word = inp.take(8)?;
                    let mut le = [0u8; 8];
                    le.copy_from_slice(word);
                    prev ^= u64::from_le_bytes(le);
                    out.push(prev as i64);
                }
                out
            }
            _ => inp.series(present, 1)?,
        };
        let mut values = scaled.into_iter().map(|m| kind.value(m));
        for (row, p) in rows.iter_mut().zip(presence) {
            let value = match p {
                PRESENCE_ABSENT => continue,
                PRESENCE_NULL => None,
                PRESENCE_VALUE => values.next(),
                _ => return Err(malformed("presence flag out of range")),
            };
            row.metrics.insert(name.clone(), value);
        }
    }
    Ok(rows)
}

fn malformed(what: &str) -> BatchError {
    BatchError::Cbor(format!("columnar batch: {what}"))
}

/// The writer: varints, zigzag, strings, and the column shapes.
struct Out(Vec<u8>);

impl Out {
    fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    fn zigzag(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    fn str(&mut self, s: &str) {
        self.varint(s.len() as u64);
        self.0.extend_from_slice(s.as_bytes());
    }

    /// One integer per row, or one for all rows when they are equal.
    fn ints(&mut self, values: &[i64]) {
        match values.first() {
            Some(&first) if values.iter().all(|&v| v == first) => {
                self.0.push(0);
                self.zigzag(first);
            }
            None => {
                self.0.push(0);
                self.zigzag(0);
            }
            Some(_) => {
                self.0.push(1);
                for &v in values {
                    self.zigzag(v);
                }
            }
        }
    }

    /// `values` differenced `order` times: the first `order` results, then the rest as [`Out::ints`].
    fn series(&mut self, values: &[i64], order: usize) {
        let mut d = values.to_vec();
        for _ in 0..order {
            difference(&mut d);
        }
        let head = order.min(d.len());
        for &v in &d[..head] {
            self.zigzag(v);
        }
        self.ints(&d[head..]);
    }
}

/// In place: `d[i] = d[i] - d[i-1]` (wrapping), keeping `d[0]`.
fn difference(d: &mut [i64]) {
    for i in (1..d.len()).rev() {
        d[i] = d[i].wrapping_sub(d[i - 1]);
    }
}

/// In place: the inverse of [`difference`].
fn prefix_sum(d: &mut [i64]) {
    for i in 1..d.len() {
        d[i] = d[i].wrapping_add(d[i - 1]);
    }
}

/// The reader: every read checks the bytes left.
struct In<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> In<'a> {
    fn left(&self) -> usize {
        self.buf.len() - self.pos
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], BatchError> {
        if n > self.left() {
            return Err(malformed("truncated"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn byte(&mut self) -> Result<u8, BatchError> {
        Ok(self.take(1)?[0])
    }

    fn scale(&mut self) -> Result<u8, BatchError> {
        match self.byte()? {
            s if s <= MAX_SCALE => Ok(s),
            s => Err(malformed(&format!("scale {s} is above {MAX_SCALE}"))),
        }
    }

    fn varint(&mut self) -> Result<u64, BatchError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(malformed("varint longer than 10 bytes"))
    }

    fn zigzag(&mut self) -> Result<i64, BatchError> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// A count: it must fit in the bytes left (every counted item takes at least one byte).
    fn len(&mut self) -> Result<usize, BatchError> {
        let n = self.varint()?;
        usize::try_from(n).ok().filter(|&n| n <= self.left()).ok_or_else(|| malformed("count larger than the batch"))
    }

    fn str(&mut self) -> Result<&'a str, BatchError> {
        let n = self.len()?;
        std::str::from_utf8(self.take(n)?).map_err(|_| malformed("string is not UTF-8"))
    }

    fn ints(&mut self, n: usize) -> Result<Vec<i64>, BatchError> {
        match self.byte()? {
            0 => Ok(vec![self.zigzag()?; n]),
            1 => {
                if n > self.left() {
                    return Err(malformed("column longer than the batch"));
                }
                (0..n).map(|_| self.zigzag()).collect()
            }
            t => Err(malformed(&format!("unknown column shape {t}"))),
        }
    }

    fn series(&mut self, n: usize, order: usize) -> Result<Vec<i64>, BatchError> {
        let head = order.min(n);
        let mut d = Vec::with_capacity(n.min(self.left()));
        for _ in 0..head {
            d.push(self.zigzag()?);
        }
        d.extend(self.ints(n - head)?);
        for _ in 0..order {
            prefix_sum(&mut d);
        }
        Ok(d)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::reading::tests::sample;

    fn fleet(devices: usize, per_device: usize) -> Vec<Reading> {
        let mut out = Vec::new();
        for n in 0..per_device {
            for d in 0..devices {
                let mut r = sample();
                r.device = format!("sim-{d:05}");
                r.seq = n as u64 + 1;
                r.ts_ms = 1_767_225_600_000 + n as i64 * 1000 + d as i64;
                r.metrics = [
                    ("temperature".to_string(), Some(f64::from(21.37f32 + (n % 7) as f32 * 0.01))),
                    ("humidity".to_string(), Some(55.5 - (n % 3) as f64 * 0.1)),
                    ("pressure".to_string(), if n % 10 == 3 { None } else { Some(1013.2) }),
                ]
                .into();
                r.tags = [("user".to_string(), format!("u-{}", d / 4))].into();
                out.push(r);
            }
        }
        out
    }

    fn roundtrip(readings: Vec<Reading>) {
        let batch = EdgeBatch::new("gw-1", 9, readings).with_format(COLUMNAR_FORMAT);
        let back = decode(&encode(&batch), 1_000_000).unwrap();
        assert_eq!(back.readings.len(), batch.readings.len());
        for (a, b) in batch.readings.iter().zip(&back.readings) {
            // Bit for bit, so NaN payloads and -0.0 count too.
            let bits =
                |r: &Reading| r.metrics.iter().map(|(k, v)| (k.clone(), v.map(f64::to_bits))).collect::<Vec<_>>();
            assert_eq!(
                (&a.device, a.boot, a.seq, a.ts_ms, a.schema, &a.tags),
                (&b.device, b.boot, b.seq, b.ts_ms, b.schema, &b.tags)
            );
            assert_eq!(bits(a), bits(b));
        }
        assert_eq!((back.gateway.as_str(), back.batch_id, back.format), ("gw-1", 9, COLUMNAR_FORMAT));
    }

    #[test]
    fn a_fleet_batch_comes_back_in_the_same_order() {
        roundtrip(fleet(7, 50));
    }

    #[test]
    fn value_kinds_are_the_most_compact_exact_ones() {
        assert_eq!(ValueKind::choose(&[1.0, 2.0, -3.0]), ValueKind::Decimal(0));
        assert_eq!(ValueKind::choose(&[21.37, 21.4]), ValueKind::Decimal(2));
        assert_eq!(ValueKind::choose(&[f64::from(21.37f32), f64::from(1013.2f32)]), ValueKind::DecimalF32(2));
        assert_eq!(ValueKind::choose(&[std::f64::consts::PI]), ValueKind::Raw);
        assert_eq!(ValueKind::choose(&[-0.0]), ValueKind::Raw, "-0.0 is not the integer 0");
        assert_eq!(ValueKind::choose(&[1e300]), ValueKind::Raw);
    }

    #[test]
    fn odd_values_survive_bit_for_bit() {
        let mut rows = fleet(2, 4);
        rows[0].metrics.insert("x".into(), Some(f64::NAN));
        rows[1].metrics.insert("x".into(), Some(-0.0));
        rows[2].metrics.insert("x".into(), Some(f64::MIN_POSITIVE));
        rows[3].metrics.insert("x".into(), None);
        rows[4].seq = u64::MAX;
        rows[5].ts_ms = i64::MIN;
        rows[6].boot = u32::MAX;
        roundtrip(rows);
    }

    #[test]
    fn a_regular_fleet_is_much_smaller_than_cbor() {
        let batch = EdgeBatch::new("gw-1", 1, fleet(50, 100)).with_format(COLUMNAR_FORMAT);
        let columnar = crate::frame::compress(&encode(&batch), 3).len();
        let cbor = crate::frame::compress(&crate::batch::to_cbor(&batch), 3).len();
        assert!(columnar * 3 < cbor, "columnar {columnar} B vs CBOR {cbor} B");
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let batch = EdgeBatch::new("gw-1", 1, fleet(3, 5)).with_format(COLUMNAR_FORMAT);
        let bytes = encode(&batch);
        for cut in 0..bytes.len() {
            assert!(decode(&bytes[..cut], 1000).is_err(), "cut at {cut}");
        }
        let mut longer = bytes.clone();
        longer.push(1);
        assert!(decode(&longer, 1000).is_err(), "a claimed aggregates section that is not there");
    }

    #[test]
    fn a_huge_claimed_count_is_refused_before_allocating() {
        let mut out = Out(MAGIC.to_vec());
        out.str("gw-1");
        out.varint(1);
        out.varint(u64::MAX >> 1);
        assert!(decode(&out.0, usize::MAX).is_err());
        let mut out = Out(MAGIC.to_vec());
        out.str("gw-1");
        out.varint(1);
        out.varint(5);
        assert!(matches!(decode(&out.0, 4), Err(BatchError::TooManyReadings { count: 5, max: 4 })));
    }

    #[test]
    fn a_batch_cannot_claim_more_values_than_its_readings_may_hold() {
        // One reading whose group claims 100 metric columns, each a cheap "all null".
        let mut out = Out(MAGIC.to_vec());
        out.str("gw-1");
        out.varint(1);
        out.varint(1);
        out.varint(1);
        out.str("d");
        out.varint(1);
        out.varint(1);
        out.varint(0);
        out.ints(&[1]); // boot
        out.ints(&[2]); // schema
        out.ints(&[0]); // tag set
        out.series(&[1], 1);
        out.series(&[1], 2);
        out.varint(100);
        for i in 0..100 {
            out.str(&format!("m{i}"));
            out.0.push(2);
            out.ints(&[PRESENCE_NULL]);
        }
        out.ints(&[0]);
        let err = decode(&out.0, 1).unwrap_err();
        assert!(err.to_string().contains("more metric and tag values"), "{err}");
        assert_eq!(decode(&out.0, 3).map(|b| b.readings[0].metrics.len()).ok(), Some(100));
    }

    proptest! {
        #[test]
        fn any_batch_roundtrips(rows in proptest::collection::vec(
            (0u8..4, any::<u32>(), any::<u64>(), any::<i64>(), proptest::option::of(any::<f64>()), 0u8..3),
            0..40,
        )) {
            let readings = rows.into_iter().map(|(d, boot, seq, ts, v, tag)| {
                let mut r = sample();
                r.device = format!("d{d}");
                (r.boot, r.seq, r.ts_ms) = (boot, seq, ts);
                r.metrics = [("m".to_string(), v)].into();
                r.tags = (0..tag).map(|i| (format!("t{i}"), "x".to_string())).collect();
                r
            }).collect();
            roundtrip(readings);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let mut input = MAGIC.to_vec();
            input.extend(bytes);
            let _ = decode(&input, 1000);
        }
    }
}
