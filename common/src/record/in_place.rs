//! Decoding log records into a record kept between calls, reusing its
//! allocations: the processor's hot path.
//!
//! A reading's device id, gateway, metric names and tag values are owned
//! strings, and its metrics and tags are maps, so decoding a record afresh
//! allocates about ten times. Consecutive readings of a stream nearly always
//! have the same metric and tag names: here the strings are overwritten in
//! their existing buffers and the map values updated in place, so a reading
//! like the last one costs no allocation at all.
//!
//! Only the packed form [`super::encode`] writes is read here (integer field
//! keys, known fields, definite lengths). Anything else (another layout, an
//! unknown field, an aggregate or heartbeat) is decoded by [`super::decode`],
//! so the result is always exactly what `decode` gives; a property test holds
//! the two to that.

use std::collections::BTreeMap;

use smallvec::SmallVec;

use super::{LogEvent, LogRecord, RecordError, decode};
use crate::reading::Reading;

/// Decodes `bytes` into `into`, which afterwards equals `decode(bytes)`.
/// On error `into` is left in an unspecified (but valid) state.
pub fn decode_into(bytes: &[u8], into: &mut LogRecord) -> Result<(), RecordError> {
    if let LogEvent::Reading(reading) = &mut into.event {
        let mut cur = Cursor { bytes, at: 0 };
        let mut names = Names::default();
        if let Some(head) = read_record(&mut cur, reading, &mut names)
            && cur.at == bytes.len()
            && set_text(&mut into.gateway, head.gateway)
        {
            into.batch_id = head.batch_id;
            into.ingest_ms = head.ingest_ms;
            return Ok(());
        }
    }
    *into = decode(bytes)?;
    Ok(())
}

/// The record's own fields, borrowed from the bytes.
struct Head<'a> {
    gateway: &'a [u8],
    batch_id: u64,
    ingest_ms: i64,
}

/// Metric and tag entries of the reading being decoded, borrowed (on the
/// stack for readings of up to 16 metrics and 8 tags).
#[derive(Default)]
struct Names<'a> {
    metrics: SmallVec<[(&'a [u8], Option<f64>); 16]>,
    tags: SmallVec<[(&'a [u8], &'a [u8]); 8]>,
}

/// `None`: not the plain packed form of a record holding a reading (the
/// caller decodes it the general way).
fn read_record<'a>(cur: &mut Cursor<'a>, reading: &mut Reading, names: &mut Names<'a>) -> Option<Head<'a>> {
    let fields = cur.map_len()?;
    let (mut gateway, mut batch_id, mut ingest_ms, mut event) = (None, None, None, false);
    for _ in 0..fields {
        match cur.uint()? {
            0 => gateway = Some(cur.raw_text()?),
            1 => batch_id = Some(cur.uint()?),
            2 => ingest_ms = Some(cur.int()?),
            3 => {
                // `LogEvent::Reading`, as a one-entry map keyed by its name.
                if cur.map_len()? != 1 || cur.raw_text()? != b"Reading" {
                    return None;
                }
                read_reading(cur, reading, names)?;
                event = true;
            }
            _ => return None,
        }
    }
    event.then_some(())?;
    Some(Head { gateway: gateway?, batch_id: batch_id?, ingest_ms: ingest_ms? })
}

fn read_reading<'a>(cur: &mut Cursor<'a>, r: &mut Reading, names: &mut Names<'a>) -> Option<()> {
    let fields = cur.map_len()?;
    let mut seen = [false; 7];
    names.metrics.clear();
    names.tags.clear();
    for _ in 0..fields {
        let field = usize::try_from(cur.uint()?).ok().filter(|f| *f < seen.len())?;
        if std::mem::replace(&mut seen[field], true) {
            return None;
        }
        match field {
            0 => {
                set_text(&mut r.device, cur.raw_text()?).then_some(())?;
            }
            1 => r.boot = u32::try_from(cur.uint()?).ok()?,
            2 => r.seq = cur.uint()?,
            3 => r.ts_ms = cur.int()?,
            4 => r.schema = u16::try_from(cur.uint()?).ok()?,
            5 => {
                for _ in 0..cur.map_len()? {
                    names.metrics.push((cur.raw_text()?, cur.float_or_null()?));
                }
            }
            _ => {
                for _ in 0..cur.map_len()? {
                    names.tags.push((cur.raw_text()?, cur.raw_text()?));
                }
            }
        }
    }
    // Every field but the tags (left out when empty) must be there.
    if !seen[..6].iter().all(|s| *s) {
        return None;
    }
    if same_names(r.metrics.keys(), names.metrics.iter().map(|e| e.0)) {
        r.metrics.values_mut().zip(&names.metrics).for_each(|(v, e)| *v = e.1);
    } else {
        r.metrics =
            names.metrics.iter().map(|&(k, v)| Some((utf8(k)?.to_string(), v))).collect::<Option<BTreeMap<_, _>>>()?;
    }
    if same_names(r.tags.keys(), names.tags.iter().map(|e| e.0)) {
        for (v, e) in r.tags.values_mut().zip(&names.tags) {
            set_text(v, e.1).then_some(())?;
        }
    } else {
        r.tags = names
            .tags
            .iter()
            .map(|&(k, v)| Some((utf8(k)?.to_string(), utf8(v)?.to_string())))
            .collect::<Option<BTreeMap<_, _>>>()?;
    }
    Some(())
}

/// The map already holds exactly these names, in this order (so the
/// decoded entries are sorted and unique, as a map built from them would be).
fn same_names<'k>(
    have: impl ExactSizeIterator<Item = &'k String>,
    got: impl ExactSizeIterator<Item = &'k [u8]>,
) -> bool {
    have.len() == got.len() && have.zip(got).all(|(a, b)| a.as_bytes() == b)
}

/// Makes `into` the text `bytes` holds; false when they are not UTF-8.
/// Bytes equal to what `into` holds (the last record's text, most often)
/// are known to be UTF-8 and are not checked again.
fn set_text(into: &mut String, bytes: &[u8]) -> bool {
    if into.as_bytes() == bytes {
        return true;
    }
    let Some(text) = utf8(bytes) else { return false };
    into.clear();
    into.push_str(text);
    true
}

fn utf8(bytes: &[u8]) -> Option<&str> {
    std::str::from_utf8(bytes).ok()
}

/// Reads the CBOR items the packed form uses; `None` for anything else.
struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn byte(&mut self) -> Option<u8> {
        let b = *self.bytes.get(self.at)?;
        self.at += 1;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.at.checked_add(n)?;
        let s = self.bytes.get(self.at..end)?;
        self.at = end;
        Some(s)
    }

    /// The argument of a head byte's additional information (definite only).
    fn argument(&mut self, info: u8) -> Option<u64> {
        Some(match info {
            0..=23 => u64::from(info),
            24 => u64::from(self.byte()?),
            25 => u64::from(u16::from_be_bytes(self.take(2)?.try_into().ok()?)),
            26 => u64::from(u32::from_be_bytes(self.take(4)?.try_into().ok()?)),
            27 => u64::from_be_bytes(self.take(8)?.try_into().ok()?),
            _ => return None,
        })
    }

    /// An item of major type `major`: its argument.
    fn head(&mut self, major: u8) -> Option<u64> {
        let b = self.byte()?;
        (b >> 5 == major).then_some(())?;
        self.argument(b & 0x1f)
    }

    fn uint(&mut self) -> Option<u64> {
        self.head(0)
    }

    fn int(&mut self) -> Option<i64> {
        let b = *self.bytes.get(self.at)?;
        match b >> 5 {
            0 => i64::try_from(self.head(0)?).ok(),
            1 => i64::try_from(self.head(1)?).ok().map(|n| -1 - n),
            _ => None,
        }
    }

    fn map_len(&mut self) -> Option<usize> {
        usize::try_from(self.head(5)?).ok()
    }

    /// A text string's bytes, not yet checked to be UTF-8.
    fn raw_text(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.head(3)?).ok()?;
        self.take(len)
    }

    /// A float (half, single or double precision) or null.
    fn float_or_null(&mut self) -> Option<Option<f64>> {
        let b = self.byte()?;
        Some(match b {
            0xf6 => None,
            0xf9 => {
                let h = u16::from_be_bytes(self.take(2)?.try_into().ok()?);
                // A NaN keeps its payload the general way: leave it to that.
                (h & 0x7c00 != 0x7c00 || h & 0x3ff == 0).then_some(())?;
                Some(f16_to_f64(h))
            }
            0xfa => Some(f64::from(f32::from_bits(u32::from_be_bytes(self.take(4)?.try_into().ok()?)))),
            0xfb => Some(f64::from_bits(u64::from_be_bytes(self.take(8)?.try_into().ok()?))),
            _ => return None,
        })
    }
}

/// IEEE 754 half precision to double (exact: every half is a double).
fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((h >> 10) & 0x1f);
    let mant = f64::from(h & 0x3ff);
    sign * match exp {
        0 => mant * 2f64.powi(-24),
        31 if mant == 0.0 => f64::INFINITY,
        31 => f64::NAN, // not reached from the decoder, which leaves NaN to `decode`
        _ => (1.0 + mant / 1024.0) * 2f64.powi(exp - 15),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::record::encode;

    fn reading(
        device: String,
        seq: u64,
        ts_ms: i64,
        metrics: Vec<(String, Option<f64>)>,
        tags: Vec<(String, String)>,
    ) -> Reading {
        Reading {
            device,
            boot: 3,
            seq,
            ts_ms,
            schema: 2,
            metrics: metrics.into_iter().collect(),
            tags: tags.into_iter().collect(),
        }
    }

    fn value() -> impl Strategy<Value = Option<f64>> {
        prop_oneof![
            Just(None),
            any::<f64>().prop_map(Some),
            any::<f32>().prop_map(|x| Some(f64::from(x))),
            (-2048i32..2048).prop_map(|x| Some(f64::from(x) / 8.0)),
            Just(Some(f64::NAN)),
            Just(Some(-0.0)),
            Just(Some(6.0e-8)),
        ]
    }

    fn record() -> impl Strategy<Value = LogRecord> {
        let name = prop_oneof![Just("t".to_string()), Just("humidity".to_string()), "[a-z]{1,12}"];
        let reading = (
            "[a-z0-9-]{1,30}",
            any::<u64>(),
            any::<i64>(),
            proptest::collection::vec((name.clone(), value()), 0..5),
            proptest::collection::vec((name, "\\PC{0,10}"), 0..3),
        )
            .prop_map(|(d, seq, ts, m, g)| LogEvent::Reading(reading(d, seq, ts, m, g)));
        let event = prop_oneof![
            8 => reading,
            1 => any::<i64>().prop_map(|ts_ms| LogEvent::Heartbeat { ts_ms }),
            1 => any::<i64>().prop_map(|ts_ms| LogEvent::Progress { ts_ms }),
        ];
        ("\\PC{0,8}", any::<u64>(), any::<i64>(), event).prop_map(|(gateway, batch_id, ingest_ms, event)| LogRecord {
            gateway,
            batch_id,
            ingest_ms,
            event,
        })
    }

    /// Compares floats by bits (NaN equals itself).
    fn same(a: &LogRecord, b: &LogRecord) -> bool {
        format!("{a:?}") == format!("{b:?}") && encode(a) == encode(b)
    }

    proptest! {
        /// One record reused across a stream of records decodes each exactly as `decode` does.
        #[test]
        fn decoding_in_place_gives_what_decode_gives(records in proptest::collection::vec(record(), 1..12)) {
            let mut into = LogRecord { gateway: String::new(), batch_id: 0, ingest_ms: 0, event: LogEvent::Reading(reading("x".into(), 0, 0, vec![], vec![])) };
            for rec in &records {
                let bytes = encode(rec);
                decode_into(&bytes, &mut into).unwrap();
                prop_assert!(same(&into, &decode(&bytes).unwrap()), "{into:?} vs {rec:?}");
            }
        }

        /// Damaged bytes: the same answer as `decode`, never a panic.
        #[test]
        fn damaged_records_fail_as_decode_fails(rec in record(), cut in 0usize..200, flip in any::<(usize, u8)>()) {
            let mut bytes = encode(&rec);
            let i = flip.0 % bytes.len();
            bytes[i] ^= flip.1;
            bytes.truncate(cut.max(1));
            let mut into = LogRecord { gateway: String::new(), batch_id: 0, ingest_ms: 0, event: LogEvent::Reading(reading("x".into(), 0, 0, vec![("t".into(), None)], vec![])) };
            match (decode_into(&bytes, &mut into), decode(&bytes)) {
                (Ok(()), Ok(want)) => prop_assert!(same(&into, &want)),
                (Err(_), Err(_)) => {}
                (got, want) => prop_assert!(false, "{got:?} vs {want:?}"),
            }
        }
    }

    /// `r` as gateway `gw-1` forwarded it.
    fn from_gateway(batch_id: u64, ingest_ms: i64, r: Reading) -> LogRecord {
        LogRecord { gateway: "gw-1".into(), batch_id, ingest_ms, event: LogEvent::Reading(r) }
    }

    #[test]
    fn a_reading_like_the_last_reuses_every_buffer() {
        let metrics = vec![("humidity".to_string(), Some(40.5)), ("temperature".to_string(), Some(21.25))];
        let first =
            from_gateway(1, 5, reading("dev-1".into(), 1, 10, metrics.clone(), vec![("user".into(), "u-1".into())]));
        let second = from_gateway(
            2,
            6,
            reading(
                "dev-2".into(),
                2,
                20,
                vec![("humidity".into(), None), ("temperature".into(), Some(1e300))],
                vec![("user".into(), "u-2".into())],
            ),
        );
        let mut into = decode(&encode(&first)).unwrap();
        let LogEvent::Reading(r) = &into.event else { unreachable!() };
        let device_buffer = r.device.as_ptr();
        decode_into(&encode(&second), &mut into).unwrap();
        assert_eq!(into, second);
        let LogEvent::Reading(r) = &into.event else { unreachable!() };
        assert_eq!(r.device.as_ptr(), device_buffer, "the device id was written into the same buffer");
    }

    /// Text is checked to be UTF-8 unless it equals what the record being
    /// reused holds: a byte that breaks UTF-8 anywhere is refused as `decode` refuses it.
    #[test]
    fn text_that_is_not_utf8_is_refused_wherever_it_is() {
        let rec = from_gateway(
            1,
            5,
            reading("dev-1".into(), 1, 10, vec![("humidity".into(), Some(40.5))], vec![("user".into(), "u-1".into())]),
        );
        let good = encode(&rec);
        for text in [&b"gw-1"[..], b"dev-1", b"humidity", b"user", b"u-1"] {
            let at = good.windows(text.len()).position(|w| w == text).unwrap();
            let mut bad = good.clone();
            bad[at] = 0xff;
            assert!(decode(&bad).is_err());
            // Reused after the good record (the other texts equal), and fresh.
            let mut into = decode(&good).unwrap();
            assert!(decode_into(&bad, &mut into).is_err(), "{}", String::from_utf8_lossy(text));
            let mut fresh = LogRecord {
                gateway: String::new(),
                batch_id: 0,
                ingest_ms: 0,
                event: LogEvent::Reading(reading("x".into(), 0, 0, vec![], vec![])),
            };
            assert!(decode_into(&bad, &mut fresh).is_err(), "{}", String::from_utf8_lossy(text));
        }
    }

    #[test]
    fn half_precision_floats_convert_exactly() {
        assert_eq!(f16_to_f64(0x3c00), 1.0);
        assert_eq!(f16_to_f64(0xc000), -2.0);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert_eq!(f16_to_f64(0x7bff), 65504.0);
        assert!(f16_to_f64(0x7e00).is_nan());
        assert_eq!(f16_to_f64(0xfc00), f64::NEG_INFINITY);
    }
}
