//! Operating views and the archive: what `kappa-cloud views ...` and
//! `kappa-cloud archive ...` do, as functions tests call directly. They work
//! on the node's files beside a running node (SQLite readers and short
//! writers), or with a `[cluster]` config on the workers' PostgreSQL store;
//! promote and rollback are single transactions, so an API reader sees one
//! version or the other, never a mix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kappa_common::record;
use serde_json::Value as Json;

use crate::archive::segment::{Block, SegmentReader, file_crc};
use crate::archive::source::{ArchiveSource, ChainSource};
use crate::archive::store::ArchiveStore;
use crate::archive::{ArchiveError, ArchiveIndex};
use crate::config::CloudConfig;
use crate::eventlog::EventLog;
use crate::eventlog::{LogSource, Offset, Partition};
use crate::store::{StoreError, ViewCatalog, ViewInfo};
use crate::views::reference::{self, LogEntry, Rows};

/// Why an admin command failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Archive(#[from] ArchiveError),
    #[error(transparent)]
    Log(#[from] crate::eventlog::EventLogError),
    #[error("{0}")]
    Usage(String),
}

fn archive_store(cfg: &CloudConfig) -> Result<Arc<dyn ArchiveStore>, AdminError> {
    Ok(crate::archive::store::open(cfg.archive.url.as_deref(), &cfg.archive_path()).map_err(ArchiveError::from)?)
}

/// The node's views, or on a cluster (`[cluster]`) the workers' in PostgreSQL.
fn store(cfg: &CloudConfig) -> Result<Box<dyn ViewCatalog>, AdminError> {
    // Views keyed by a tag are merged from partials: a cluster's reader needs their definitions.
    let specs = cfg.view_specs().map_err(|e| AdminError::Usage(e.join("; ")))?;
    Ok(cfg.store_at().catalog(&specs, crate::views::operator::merge_encoded)?)
}

/// A view version with its progress through the log.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ViewStatus {
    #[serde(flatten)]
    pub info: ViewInfo,
    /// Records processed by the version's pipeline.
    pub position: u64,
    /// Records in the log not yet processed.
    pub lag: u64,
}

/// `views list`: every version, its state, what each name serves, position and lag.
pub fn list(cfg: &CloudConfig) -> Result<Vec<ViewStatus>, AdminError> {
    let s = store(cfg)?;
    let ends = EventLog::end_offsets(&cfg.log, &cfg.data_dir)?;
    let end_total: u64 = ends.iter().map(|(_, o)| o).sum();
    let positions = s.pipeline_positions()?;
    Ok(s.list_views()?
        .into_iter()
        .map(|mut info| {
            info.definition = crate::views::syntax::stored_in_config_syntax(&info.definition);
            let position: u64 = positions.get(&info.pipeline).map_or(0, |p| p.values().sum());
            ViewStatus { lag: end_total.saturating_sub(position), position, info }
        })
        .collect())
}

/// What `views compare` found.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Comparison {
    pub a: String,
    pub b: String,
    pub rows_a: usize,
    pub rows_b: usize,
    pub only_in_a: usize,
    pub only_in_b: usize,
    pub differing: usize,
    /// Per aggregate present in both: the sum of its numeric values over all rows.
    pub totals: BTreeMap<String, (f64, f64)>,
    /// The first differences, as sentences.
    pub examples: Vec<String>,
}

impl Comparison {
    pub fn equal(&self) -> bool {
        self.only_in_a == 0 && self.only_in_b == 0 && self.differing == 0
    }
}

fn rows_of(s: &mut dyn ViewCatalog, id: &str) -> Result<Rows, AdminError> {
    let (rows, _) = s.snapshot(id)?;
    Ok(rows
        .into_iter()
        .map(|r| ((r.key, r.window_start), (r.window_end, r.values.as_object().cloned().unwrap_or_default())))
        .collect())
}

/// `views compare NAME A B`: row counts, per-aggregate totals and the first differing rows.
pub fn compare(cfg: &CloudConfig, name: &str, a: u32, b: u32, examples: usize) -> Result<Comparison, AdminError> {
    let mut s = store(cfg)?;
    let (ida, idb) = (format!("{name}@{a}"), format!("{name}@{b}"));
    let (ra, rb) = (rows_of(s.as_mut(), &ida)?, rows_of(s.as_mut(), &idb)?);
    let mut out =
        Comparison { a: ida.clone(), b: idb.clone(), rows_a: ra.len(), rows_b: rb.len(), ..Comparison::default() };
    let note = |out: &mut Comparison, line: String| {
        if out.examples.len() < examples {
            out.examples.push(line);
        }
    };
    for (k, (end, va)) in &ra {
        match rb.get(k) {
            None => {
                out.only_in_a += 1;
                note(&mut out, format!("{} window {}: only in {ida}", k.0, k.1));
            }
            Some((end_b, vb)) => {
                if end != end_b || va != vb {
                    out.differing += 1;
                    let cols: std::collections::BTreeSet<&String> =
                        va.keys().chain(vb.keys()).filter(|c| va.get(*c) != vb.get(*c)).collect();
                    let cols: Vec<String> = cols
                        .iter()
                        .map(|c| {
                            format!(
                                "{c}: {} vs {}",
                                va.get(*c).unwrap_or(&Json::Null),
                                vb.get(*c).unwrap_or(&Json::Null)
                            )
                        })
                        .collect();
                    note(&mut out, format!("{} window {}: {}", k.0, k.1, cols.join(", ")));
                }
            }
        }
    }
    for k in rb.keys().filter(|k| !ra.contains_key(*k)) {
        out.only_in_b += 1;
        note(&mut out, format!("{} window {}: only in {idb}", k.0, k.1));
    }
    let numeric =
        |rows: &Rows, col: &str| -> f64 { rows.values().filter_map(|(_, v)| v.get(col).and_then(Json::as_f64)).sum() };
    let cols: Vec<String> = ra
        .values()
        .chain(rb.values())
        .flat_map(|(_, v)| v.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    let is_numeric = |rows: &Rows, col: &str| rows.values().any(|(_, v)| v.get(col).is_some_and(Json::is_number));
    for c in cols.into_iter().filter(|c| is_numeric(&ra, c) || is_numeric(&rb, c)) {
        out.totals.insert(c.clone(), (numeric(&ra, &c), numeric(&rb, &c)));
    }
    Ok(out)
}

/// `views promote NAME N`.
pub fn promote(cfg: &CloudConfig, name: &str, version: u32) -> Result<(), AdminError> {
    Ok(store(cfg)?.promote(name, version, crate::now_ms())?)
}

/// `views rollback NAME`: returns the version now served.
pub fn rollback(cfg: &CloudConfig, name: &str) -> Result<u32, AdminError> {
    Ok(store(cfg)?.rollback(name, crate::now_ms())?)
}

/// `views drop NAME N`: returns rows removed.
pub fn drop_version(cfg: &CloudConfig, name: &str, version: u32) -> Result<u64, AdminError> {
    Ok(store(cfg)?.drop_view(name, version)?)
}

/// The log as the batch path reads it: archive then log, every record
/// before `positions` (per partition).
fn log_entries(cfg: &CloudConfig, positions: &BTreeMap<Partition, Offset>) -> Result<Vec<LogEntry>, AdminError> {
    let log = EventLog::open_existing(&cfg.log, &cfg.data_dir)?;
    let archive = archive_store(cfg)?;
    let mut source = ChainSource::new(ArchiveSource::open(archive, false)?, log.source()?);
    for p in source.assigned() {
        source.seek(p, 0);
    }
    let mut out = Vec::new();
    loop {
        let recs = source.poll(10_000, Duration::ZERO)?;
        if recs.is_empty() {
            break;
        }
        for rec in recs {
            if rec.offset >= positions.get(&rec.partition).copied().unwrap_or(0) {
                continue;
            }
            if let Some(reading) = record::decode(&rec.value).ok().and_then(|r| r.into_reading()) {
                out.push(LogEntry { partition: rec.partition, offset: rec.offset, reading });
            }
        }
    }
    Ok(out)
}

/// `views verify NAME`: recomputes the view with the independent batch path
/// over archive + log up to the view's position and lists every difference.
pub fn verify(cfg: &CloudConfig, view: &str) -> Result<Vec<String>, AdminError> {
    let mut s = store(cfg)?;
    let id = s.resolve_view(view)?.ok_or_else(|| AdminError::Usage(format!("no view named {view:?}")))?;
    let spec = cfg
        .view_specs()
        .map_err(|e| AdminError::Usage(e.join("; ")))?
        .into_iter()
        .find(|v| v.id() == id)
        .ok_or_else(|| AdminError::Usage(format!("{id} is not in the config; verify needs its definition")))?;
    let (rows, positions) = s.snapshot(&id)?;
    let stream: Rows = rows
        .into_iter()
        .map(|r| ((r.key, r.window_start), (r.window_end, r.values.as_object().cloned().unwrap_or_default())))
        .collect();
    let entries = log_entries(cfg, &positions)?;
    let computed = reference::compute(&spec, &entries, cfg.processor.max_out_of_orderness.as_millis() as i64);
    Ok(reference::diff(&spec, &stream, &computed))
}

/// `archive export`: readings with `from_ms <= event time < to_ms` as
/// Hive-partitioned files; `progress(done, total)` is called as it goes.
pub fn export(
    cfg: &CloudConfig,
    from_ms: i64,
    to_ms: i64,
    format: crate::archive::export::ExportFormat,
    out: &std::path::Path,
    mut progress: impl FnMut(u64, u64),
) -> Result<crate::archive::export::ExportStats, AdminError> {
    let archive = archive_store(cfg)?;
    let index = ArchiveIndex::load(archive.as_ref())?;
    let total: u64 = index
        .partitions
        .values()
        .flatten()
        .filter(|m| !(m.max_ts_ms.is_some_and(|t| t < from_ms) || m.min_ts_ms.is_some_and(|t| t >= to_ms)))
        .map(|m| m.records)
        .sum();
    Ok(crate::archive::export::export(archive.as_ref(), &cfg.schema.metrics, from_ms, to_ms, format, out, |n| {
        progress(n, total)
    })?)
}

/// A damaged place in the archive.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Damage {
    pub segment: String,
    pub detail: String,
}

/// What `archive status` shows per partition.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionArchive {
    pub partition: Partition,
    pub segments: usize,
    pub records: u64,
    pub bytes: u64,
    pub archived_to: Offset,
    pub log_end: Offset,
    pub lag: u64,
    pub min_ts_ms: Option<i64>,
    pub max_ts_ms: Option<i64>,
}

/// `archive status`.
pub fn archive_status(cfg: &CloudConfig) -> Result<Vec<PartitionArchive>, AdminError> {
    let archive = archive_store(cfg)?;
    let index = ArchiveIndex::load(archive.as_ref())?;
    let ends = EventLog::end_offsets(&cfg.log, &cfg.data_dir)?;
    Ok(ends
        .into_iter()
        .map(|(p, end)| {
            let segs = index.partitions.get(&p).map(Vec::as_slice).unwrap_or_default();
            let to = index.next_offset(p);
            PartitionArchive {
                partition: p,
                segments: segs.len(),
                records: segs.iter().map(|m| m.records).sum(),
                bytes: segs.iter().map(|m| m.bytes).sum(),
                archived_to: to,
                log_end: end,
                lag: end.saturating_sub(to),
                min_ts_ms: segs.iter().filter_map(|m| m.min_ts_ms).min(),
                max_ts_ms: segs.iter().filter_map(|m| m.max_ts_ms).max(),
            }
        })
        .collect())
}

/// `archive verify`: every segment's file checksum and every block's CRC.
pub fn archive_verify(cfg: &CloudConfig) -> Result<Vec<Damage>, AdminError> {
    let archive = archive_store(cfg)?;
    let index = ArchiveIndex::load(archive.as_ref())?;
    let mut out = Vec::new();
    for m in index.partitions.values().flatten() {
        let name = m.segment_name();
        let bytes = archive.get(&name).map_err(ArchiveError::from)?;
        let segment = archive.locate(&name);
        if file_crc(&bytes) != m.crc32 {
            out.push(Damage { segment: segment.clone(), detail: "file checksum differs from the manifest".into() });
        }
        match SegmentReader::new(bytes) {
            Err(e) => out.push(Damage { segment, detail: e.to_string() }),
            Ok(mut r) => {
                while let Some(b) = r.next_block() {
                    if let Block::Damaged { position, first_offset, records, reason } = b {
                        let n = records.map_or("the rest of the file".to_string(), |n| format!("{n} records"));
                        out.push(Damage {
                            segment: segment.clone(),
                            detail: format!("block at byte {position}, offsets from {first_offset}, {n}: {reason}"),
                        });
                    }
                }
            }
        }
    }
    Ok(out)
}
