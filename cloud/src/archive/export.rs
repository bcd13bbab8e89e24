//! `archive export`: a time range of the archive as files other engines read
//! directly, partitioned Hive-style by UTC date so they prune by time:
//!
//! ```text
//! OUT/date=2026-11-26/part-00000.parquet     (or .csv, .jsonl)
//! ```
//!
//! One row per reading whose event time is in `[from, to)`, in log order
//! (partition, then offset). Columns, in order:
//!
//! | column | Parquet type | meaning |
//! |---|---|---|
//! | `ts` | TIMESTAMP(MILLIS, UTC) | event time (CSV and JSON lines: RFC 3339, plus `ts_ms`) |
//! | `device` | STRING | device id |
//! | `boot` | INT64 | boot id |
//! | `seq` | INT64 | sequence number within the boot |
//! | `schema_version` | INT32 | the payload version the reading arrived in |
//! | `gateway` | STRING | the gateway that forwarded it |
//! | `batch_id` | INT64 | the gateway's batch |
//! | `partition` | INT32 | event log partition |
//! | `offset` | INT64 | event log offset |
//! | one per `schema.metrics` entry | DOUBLE (nullable) | the metric's value; null when absent or null |
//! | `tags` | STRING | the tags as a JSON object |
//!
//! The date (`date=YYYY-MM-DD`) is the directory, as Hive, Spark, DuckDB
//! (`hive_partitioning`) and pandas/pyarrow expect.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow_array::builder::{Float64Builder, Int32Builder, Int64Builder, StringBuilder, TimestampMillisecondBuilder};
use arrow_array::{ArrayRef, RecordBatch};
use arrow_schema::{DataType, Field, Schema, TimeUnit};
use kappa_common::record::{self, LogRecord};

use super::segment::{Block, SegmentReader};
use super::store::ArchiveStore;
use super::{ArchiveError, ArchiveIndex};

/// Rows per output file before a new part starts.
const ROWS_PER_PART: usize = 200_000;

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Parquet,
    Csv,
    Jsonl,
}

impl ExportFormat {
    fn ext(self) -> &'static str {
        match self {
            Self::Parquet => "parquet",
            Self::Csv => "csv",
            Self::Jsonl => "jsonl",
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ExportStats {
    pub readings: u64,
    pub files: Vec<PathBuf>,
    /// Segments read (the others were outside the time range).
    pub segments_read: usize,
}

#[derive(Debug)]
struct Row {
    partition: u32,
    offset: u64,
    rec: LogRecord,
}

/// Exports readings with `from_ms <= event time < to_ms` into `out`.
pub fn export(
    store: &dyn ArchiveStore,
    metrics: &[String],
    from_ms: i64,
    to_ms: i64,
    format: ExportFormat,
    out: &Path,
    mut progress: impl FnMut(u64),
) -> Result<ExportStats, ArchiveError> {
    let index = ArchiveIndex::load(store)?;
    let mut stats = ExportStats::default();
    let mut days: BTreeMap<i64, (Vec<Row>, usize)> = BTreeMap::new();
    for m in index.partitions.values().flatten() {
        if m.max_ts_ms.is_some_and(|t| t < from_ms) || m.min_ts_ms.is_some_and(|t| t >= to_ms) {
            continue;
        }
        stats.segments_read += 1;
        let name = m.segment_name();
        let mut reader = SegmentReader::new(store.get(&name)?)
            .map_err(|e| ArchiveError::Damaged(format!("{}: {e}", store.locate(&name))))?;
        while let Some(block) = reader.next_block() {
            let recs = match block {
                Block::Records(r) => r,
                Block::Damaged { position, first_offset, reason, .. } => {
                    return Err(ArchiveError::Damaged(format!(
                        "{}: block at byte {position}, offsets from {first_offset}: {reason}",
                        store.locate(&name)
                    )));
                }
            };
            for (offset, bytes) in recs {
                let Ok(rec) = record::decode(&bytes) else { continue };
                let Some(r) = rec.reading() else { continue };
                if r.ts_ms < from_ms || r.ts_ms >= to_ms {
                    continue;
                }
                let day = r.ts_ms.div_euclid(86_400_000);
                let (rows, part) = days.entry(day).or_default();
                rows.push(Row { partition: m.partition, offset, rec });
                stats.readings += 1;
                if rows.len() >= ROWS_PER_PART {
                    let full = std::mem::take(rows);
                    stats.files.push(write_part(out, day, *part, &full, metrics, format)?);
                    *part += 1;
                }
            }
            progress(stats.readings);
        }
    }
    for (day, (rows, part)) in days {
        if !rows.is_empty() {
            stats.files.push(write_part(out, day, part, &rows, metrics, format)?);
        }
    }
    Ok(stats)
}

fn io(path: &Path, e: impl std::fmt::Display) -> ArchiveError {
    ArchiveError::Store(super::store::StoreError(format!("cannot write {}: {e}", path.display())))
}

fn write_part(
    out: &Path,
    day: i64,
    part: usize,
    rows: &[Row],
    metrics: &[String],
    format: ExportFormat,
) -> Result<PathBuf, ArchiveError> {
    let dir = out.join(format!("date={}", civil_date(day)));
    std::fs::create_dir_all(&dir).map_err(|e| io(&dir, e))?;
    let path = dir.join(format!("part-{part:05}.{}", format.ext()));
    let file = std::fs::File::create(&path).map_err(|e| io(&path, e))?;
    match format {
        ExportFormat::Parquet => write_parquet(file, rows, metrics).map_err(|e| io(&path, e))?,
        ExportFormat::Csv => write_csv(file, rows, metrics).map_err(|e| io(&path, e))?,
        ExportFormat::Jsonl => write_jsonl(file, rows).map_err(|e| io(&path, e))?,
    }
    Ok(path)
}

fn write_parquet(file: std::fs::File, rows: &[Row], metrics: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    let mut fields = vec![
        Field::new("ts", DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into())), false),
        Field::new("device", DataType::Utf8, false),
        Field::new("boot", DataType::Int64, false),
        Field::new("seq", DataType::Int64, false),
        Field::new("schema_version", DataType::Int32, false),
        Field::new("gateway", DataType::Utf8, false),
        Field::new("batch_id", DataType::Int64, false),
        Field::new("partition", DataType::Int32, false),
        Field::new("offset", DataType::Int64, false),
    ];
    fields.extend(metrics.iter().map(|m| Field::new(m, DataType::Float64, true)));
    fields.push(Field::new("tags", DataType::Utf8, false));
    let schema = Arc::new(Schema::new(fields));

    let mut ts = TimestampMillisecondBuilder::new().with_timezone("UTC");
    let (mut device, mut gateway, mut tags) = (StringBuilder::new(), StringBuilder::new(), StringBuilder::new());
    let (mut boot, mut seq, mut batch, mut offset) =
        (Int64Builder::new(), Int64Builder::new(), Int64Builder::new(), Int64Builder::new());
    let (mut version, mut partition) = (Int32Builder::new(), Int32Builder::new());
    let mut values: Vec<Float64Builder> = metrics.iter().map(|_| Float64Builder::new()).collect();
    for row in rows {
        let Some(r) = row.rec.reading() else { continue };
        ts.append_value(r.ts_ms);
        device.append_value(&r.device);
        boot.append_value(i64::from(r.boot));
        seq.append_value(r.seq as i64);
        version.append_value(i32::from(r.schema));
        gateway.append_value(&row.rec.gateway);
        batch.append_value(row.rec.batch_id as i64);
        partition.append_value(row.partition as i32);
        offset.append_value(row.offset as i64);
        for (b, m) in values.iter_mut().zip(metrics) {
            b.append_option(r.metric(m));
        }
        tags.append_value(serde_json::to_string(&r.tags)?);
    }
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(ts.finish()),
        Arc::new(device.finish()),
        Arc::new(boot.finish()),
        Arc::new(seq.finish()),
        Arc::new(version.finish()),
        Arc::new(gateway.finish()),
        Arc::new(batch.finish()),
        Arc::new(partition.finish()),
        Arc::new(offset.finish()),
    ];
    columns.extend(values.iter_mut().map(|b| Arc::new(b.finish()) as ArrayRef));
    columns.push(Arc::new(tags.finish()));
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut writer = parquet::arrow::ArrowWriter::try_new(file, schema, Some(props))?;
    writer.write(&batch)?;
    writer.close()?;
    Ok(())
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) { format!("\"{}\"", s.replace('"', "\"\"")) } else { s.to_string() }
}

fn write_csv(file: std::fs::File, rows: &[Row], metrics: &[String]) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(file);
    let header: Vec<&str> =
        ["ts", "ts_ms", "device", "boot", "seq", "schema_version", "gateway", "batch_id", "partition", "offset"]
            .into_iter()
            .chain(metrics.iter().map(String::as_str))
            .chain(["tags"])
            .collect();
    writeln!(w, "{}", header.join(","))?;
    for row in rows {
        let Some(r) = row.rec.reading() else { continue };
        let mut fields = vec![
            rfc3339(r.ts_ms),
            r.ts_ms.to_string(),
            csv_field(&r.device),
            r.boot.to_string(),
            r.seq.to_string(),
            r.schema.to_string(),
            csv_field(&row.rec.gateway),
            row.rec.batch_id.to_string(),
            row.partition.to_string(),
            row.offset.to_string(),
        ];
        fields.extend(metrics.iter().map(|m| r.metric(m).map(|v| v.to_string()).unwrap_or_default()));
        fields.push(csv_field(&serde_json::to_string(&r.tags).unwrap_or_default()));
        writeln!(w, "{}", fields.join(","))?;
    }
    w.flush()
}

fn write_jsonl(file: std::fs::File, rows: &[Row]) -> std::io::Result<()> {
    let mut w = std::io::BufWriter::new(file);
    for row in rows {
        let Some(r) = row.rec.reading() else { continue };
        let line = serde_json::json!({
            "ts": rfc3339(r.ts_ms), "ts_ms": r.ts_ms, "device": r.device, "boot": r.boot, "seq": r.seq,
            "schema_version": r.schema, "gateway": row.rec.gateway, "batch_id": row.rec.batch_id,
            "partition": row.partition, "offset": row.offset, "metrics": r.metrics, "tags": r.tags,
        });
        serde_json::to_writer(&mut w, &line)?;
        writeln!(w)?;
    }
    w.flush()
}

/// `YYYY-MM-DD` of a day number since 1970-01-01 (proleptic Gregorian).
pub fn civil_date(days: i64) -> String {
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

/// RFC 3339 in UTC with milliseconds.
pub fn rfc3339(ts_ms: i64) -> String {
    let day = ts_ms.div_euclid(86_400_000);
    let ms = ts_ms.rem_euclid(86_400_000);
    let (h, mi, s, milli) = (ms / 3_600_000, ms / 60_000 % 60, ms / 1000 % 60, ms % 1000);
    format!("{}T{h:02}:{mi:02}:{s:02}.{milli:03}Z", civil_date(day))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_are_utc_and_correct_across_leap_years() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(20_454), "2026-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(rfc3339(1_767_225_600_123), "2026-01-01T00:00:00.123Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn csv_fields_with_commas_or_quotes_are_quoted() {
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field(r#"{"k":"v"}"#), r#""{""k"":""v""}""#);
        assert_eq!(csv_field("plain"), "plain");
    }
}
