//! A model-based test of the cloud's embedded path: random sequences of
//! appends (new batches, a batch sent again with the same id, readings sent
//! again in a new batch), processor steps, checkpoints and crashes, archiver
//! steps, flushes and crashes, and log retention, run against the real
//! `SqliteLog`, `Processor`, `ViewStore`, `Archiver` and `LocalStore`.
//!
//! After every sequence it checks the promises that hold whatever happened:
//! * nothing is lost: the archive chained to the log (what a replay reads)
//!   holds every reading ever acknowledged, and no batch twice;
//! * retention never deletes what a reader still needs: no source ever
//!   meets a gap;
//! * the live views, through crashes, equal the independent batch
//!   computation over everything the log ever held;
//! * a replay from the archive and the log into an empty store gives the
//!   same rows, byte for byte.
//!
//! A negative control runs a retention that ignores the processor's
//! position and shows the processor then refuses to read on (a gap).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use kappa_cloud::archive::archiver::{Archiver, ArchiverSettings, Retention};
use kappa_cloud::archive::source::{ArchiveSource, ChainSource};
use kappa_cloud::archive::store::{ArchiveStore, LocalStore};
use kappa_cloud::config::{CloudConfig, Durability};
use kappa_cloud::eventlog::sqlite::{SqliteAppender, SqliteLog, SqliteSource};
use kappa_cloud::eventlog::{AppendOutcome, EventLogError, LogAppender, LogSource};
use kappa_cloud::metrics::CloudMetrics;
use kappa_cloud::processor::{Processor, ProcessorSettings};
use kappa_cloud::store::{RowQuery, ViewStore};
use kappa_cloud::views::reference::{self, LogEntry};
use kappa_cloud::views::spec::ViewSpec;
use kappa_common::Reading;
use kappa_common::record;
use proptest::prelude::*;

mod common;

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const BOUND_MS: i64 = 60_000;
const PARTITIONS: u32 = 3;
const DEVICES: usize = 4;

#[derive(Debug, Clone)]
enum Op {
    /// A new batch of `n` readings from `device`.
    Append {
        device: usize,
        n: usize,
    },
    /// An earlier batch sent again with its id (its answer was lost).
    Resend {
        pick: usize,
    },
    /// An earlier batch's readings sent again in a new batch (re-batched).
    Rebatch {
        pick: usize,
    },
    Process {
        polls: usize,
    },
    Checkpoint,
    /// The processor dies; uncommitted work is lost; a new one restores.
    CrashProcessor,
    Archive {
        polls: usize,
    },
    Flush,
    /// The archiver dies; open segments are lost; a new one resumes.
    CrashArchiver,
    Retention,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..DEVICES, 1usize..12).prop_map(|(device, n)| Op::Append { device, n }),
        1 => any::<usize>().prop_map(|pick| Op::Resend { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Rebatch { pick }),
        3 => (1usize..6).prop_map(|polls| Op::Process { polls }),
        1 => Just(Op::Checkpoint),
        1 => Just(Op::CrashProcessor),
        2 => (1usize..4).prop_map(|polls| Op::Archive { polls }),
        1 => Just(Op::Flush),
        1 => Just(Op::CrashArchiver),
        2 => Just(Op::Retention),
    ]
}

fn views() -> Vec<ViewSpec> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud/single-node.toml");
    CloudConfig::load(&path).unwrap().view_specs().unwrap()
}

fn metrics() -> Arc<CloudMetrics> {
    Arc::new(CloudMetrics::new(&mut prometheus_client::registry::Registry::default()))
}

fn settings() -> ProcessorSettings {
    ProcessorSettings {
        max_out_of_orderness_ms: BOUND_MS,
        // Checkpoints only when the model says so (or windows close).
        checkpoint_interval: Duration::from_secs(3600),
        idle_timeout: Duration::from_secs(3600),
        poll_records: 5,
        ..ProcessorSettings::default()
    }
}

/// The system under test and what the model knows.
struct World {
    dir: PathBuf,
    specs: Vec<ViewSpec>,
    rt: tokio::runtime::Runtime,
    log: SqliteLog,
    appender: SqliteAppender,
    archive: Arc<dyn ArchiveStore>,
    processor: Option<Processor<SqliteSource>>,
    archiver: Option<Archiver<SqliteSource>>,
    /// Every batch sent, by id.
    batches: Vec<(u64, Vec<Reading>)>,
    /// Every reading acknowledged: (device, seq).
    acked: BTreeSet<(String, u64)>,
    next_seq: [u64; DEVICES],
    clock: [i64; DEVICES],
}

impl World {
    fn new(dir: &Path) -> Self {
        let log = SqliteLog::open(&dir.join("log.sqlite"), PARTITIONS, Durability::Normal).unwrap();
        let appender = log.start_writer(16).unwrap();
        let archive: Arc<dyn ArchiveStore> = Arc::new(LocalStore::open(&dir.join("archive")).unwrap());
        let mut world = Self {
            dir: dir.to_path_buf(),
            specs: views(),
            rt: tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap(),
            log,
            appender,
            archive,
            processor: None,
            archiver: None,
            batches: Vec::new(),
            acked: BTreeSet::new(),
            next_seq: [0; DEVICES],
            clock: [T0; DEVICES],
        };
        world.processor = Some(world.open_processor());
        world.archiver = Some(world.open_archiver());
        world
    }

    fn open_processor(&self) -> Processor<SqliteSource> {
        let store = ViewStore::open(&self.dir.join("views.sqlite")).unwrap();
        Processor::single(self.log.source().unwrap(), store, self.specs.clone(), settings(), metrics()).unwrap()
    }

    fn open_archiver(&self) -> Archiver<SqliteSource> {
        let settings = ArchiverSettings {
            segment_bytes: 1500,
            segment_age: Duration::from_secs(3600),
            block_bytes: 600,
            poll_records: 7,
        };
        Archiver::new(self.log.source().unwrap(), self.archive.clone(), settings, metrics()).unwrap().with_retention(
            Retention {
                log_path: self.dir.join("log.sqlite"),
                store_path: self.dir.join("views.sqlite"),
                older_than: Duration::ZERO,
            },
        )
    }

    fn send(&mut self, batch_id: u64, readings: &[Reading]) -> AppendOutcome {
        let outcome = self.rt.block_on(self.appender.append(common::reading_batch(batch_id, readings))).unwrap();
        self.acked.extend(readings.iter().map(|r| (r.device.clone(), r.seq)));
        outcome
    }

    fn apply(&mut self, op: &Op) -> Result<(), String> {
        match *op {
            Op::Append { device, n } => {
                let mut readings = Vec::new();
                for _ in 0..n {
                    self.next_seq[device] += 1;
                    let seq = self.next_seq[device];
                    // Mostly forward 20 s; every fifth a little back (out of order).
                    self.clock[device] += if seq.is_multiple_of(5) { -30_000 } else { 20_000 };
                    readings.push(reading(device, seq, self.clock[device]));
                }
                let id = self.batches.len() as u64;
                self.send(id, &readings);
                self.batches.push((id, readings));
            }
            Op::Resend { pick } => {
                if let Some((id, readings)) = pick_one(&self.batches, pick).cloned() {
                    let outcome = self.send(id, &readings);
                    if outcome != AppendOutcome::Duplicate {
                        return Err(format!("batch {id} sent again was appended again"));
                    }
                }
            }
            Op::Rebatch { pick } => {
                if let Some((_, readings)) = pick_one(&self.batches, pick).cloned() {
                    let id = self.batches.len() as u64;
                    self.send(id, &readings);
                    self.batches.push((id, readings));
                }
            }
            Op::Process { polls } => {
                let p = self.processor.as_mut().unwrap();
                for _ in 0..polls {
                    p.step(Duration::ZERO).map_err(|e| format!("processor: {e}"))?;
                }
            }
            Op::Checkpoint => {
                let p = self.processor.as_mut().unwrap();
                p.checkpoint().and_then(|()| p.sync()).map_err(|e| format!("checkpoint: {e}"))?;
            }
            Op::CrashProcessor => {
                drop(self.processor.take());
                self.processor = Some(self.open_processor());
            }
            Op::Archive { polls } => {
                let a = self.archiver.as_mut().unwrap();
                for _ in 0..polls {
                    a.step(Duration::ZERO).map_err(|e| format!("archiver: {e}"))?;
                }
            }
            Op::Flush => self.archiver.as_mut().unwrap().flush().map_err(|e| format!("flush: {e}"))?,
            Op::CrashArchiver => {
                drop(self.archiver.take());
                self.archiver = Some(self.open_archiver());
            }
            Op::Retention => {
                // Retention deletes what is older than "now": make sure the
                // newest appends are a millisecond in the past.
                std::thread::sleep(Duration::from_millis(2));
                self.archiver.as_mut().unwrap().apply_retention().map_err(|e| format!("retention: {e}"))?;
            }
        }
        Ok(())
    }

    /// Processes to the log's end and checkpoints.
    fn drain(&mut self) -> Result<(), String> {
        let p = self.processor.as_mut().unwrap();
        let mut idle = 0;
        while idle < 3 {
            let n = p.step(Duration::ZERO).map_err(|e| format!("processor: {e}"))?;
            idle = if n == 0 { idle + 1 } else { 0 };
        }
        p.checkpoint().and_then(|()| p.sync()).map_err(|e| format!("checkpoint: {e}"))
    }

    fn chain(&self) -> Result<ChainSource<SqliteSource>, String> {
        let archive = ArchiveSource::open(self.archive.clone(), false).map_err(|e| e.to_string())?;
        Ok(ChainSource::new(archive, self.log.source().map_err(|e| e.to_string())?))
    }
}

fn pick_one<T>(items: &[T], i: usize) -> Option<&T> {
    if items.is_empty() { None } else { items.get(i % items.len()) }
}

fn reading(device: usize, seq: u64, ts_ms: i64) -> Reading {
    Reading {
        device: format!("dev-{device}"),
        boot: 1,
        seq,
        ts_ms,
        schema: 2,
        metrics: [
            ("temperature".to_string(), Some(15.0 + (seq % 11) as f64)),
            ("humidity".to_string(), Some(40.0 + (seq % 7) as f64)),
        ]
        .into(),
        tags: [("user".to_string(), format!("u-{}", device % 2)), ("type".to_string(), "telemetry".to_string())].into(),
    }
}

/// Everything a source reads to its end.
fn read_all(src: &mut impl LogSource) -> Result<Vec<LogEntry>, EventLogError> {
    for p in src.assigned() {
        src.seek(p, 0);
    }
    let mut entries = Vec::new();
    loop {
        let recs = src.poll(1000, Duration::ZERO)?;
        if recs.is_empty() && src.assigned().iter().all(|p| src.caught_up(*p)) {
            return Ok(entries);
        }
        for rec in recs {
            let reading = record::decode(&rec.value).unwrap().into_reading().unwrap();
            entries.push(LogEntry { partition: rec.partition, offset: rec.offset, reading });
        }
    }
}

fn view_rows(store: &ViewStore, spec: &ViewSpec) -> reference::Rows {
    let q = RowQuery { view_id: spec.id(), key: None, from: i64::MIN, to: i64::MAX, after: None, limit: 1 << 30 };
    store
        .rows(&q)
        .unwrap()
        .into_iter()
        .map(|r| ((r.key, r.window_start), (r.window_end, r.values.as_object().cloned().unwrap_or_default())))
        .collect()
}

/// Runs `ops`, then checks every promise; an error says which broke.
/// Returns how many records retention deleted from the log.
fn check(ops: &[Op]) -> Result<usize, String> {
    let dir = tempfile::tempdir().unwrap();
    let mut world = World::new(dir.path());
    for (i, op) in ops.iter().enumerate() {
        world.apply(op).map_err(|e| format!("step {i} ({op:?}): {e}"))?;
    }
    world.drain()?;
    world.archiver.as_mut().unwrap().flush().map_err(|e| format!("final flush: {e}"))?;

    // Nothing acknowledged is missing from archive + log; no batch is in it twice.
    let mut chain = world.chain()?;
    let entries = read_all(&mut chain).map_err(|e| format!("reading archive + log: {e}"))?;
    let offsets: BTreeSet<(u32, u64)> = entries.iter().map(|e| (e.partition, e.offset)).collect();
    if offsets.len() != entries.len() {
        return Err("archive + log delivered an offset twice".into());
    }
    let held: BTreeMap<(String, u64), usize> = entries.iter().fold(BTreeMap::new(), |mut m, e| {
        *m.entry((e.reading.device.clone(), e.reading.seq)).or_default() += 1;
        m
    });
    let missing: Vec<_> = world.acked.iter().filter(|k| !held.contains_key(*k)).collect();
    if !missing.is_empty() {
        return Err(format!("acknowledged readings missing from archive + log: {missing:?}"));
    }
    let appended: usize = world.batches.iter().map(|(_, r)| r.len()).sum();
    if entries.len() != appended {
        return Err(format!("archive + log hold {} records, {appended} were appended once each", entries.len()));
    }

    // The live views equal the independent batch computation.
    let live = ViewStore::open_read_only(&dir.path().join("views.sqlite")).unwrap();
    for spec in &world.specs {
        let b = reference::compute(spec, &entries, BOUND_MS);
        let problems = reference::diff(spec, &view_rows(&live, spec), &b);
        if !problems.is_empty() {
            return Err(format!(
                "live view {} differs from the batch computation:\n{}",
                spec.id(),
                problems.join("\n")
            ));
        }
    }

    // A replay from the archive and the log gives the same rows.
    let replay_path = dir.path().join("replay.sqlite");
    let mut replay = Processor::single(
        world.chain()?,
        ViewStore::open(&replay_path).unwrap(),
        world.specs.clone(),
        settings(),
        metrics(),
    )
    .unwrap();
    let mut idle = 0;
    while idle < 3 {
        let n = replay.step(Duration::ZERO).map_err(|e| format!("replay: {e}"))?;
        idle = if n == 0 { idle + 1 } else { 0 };
    }
    replay.checkpoint().and_then(|()| replay.sync()).map_err(|e| format!("replay checkpoint: {e}"))?;
    drop(replay);
    let replayed = ViewStore::open_read_only(&replay_path).unwrap();
    for spec in &world.specs {
        let (a, b) = (live.dump_rows(Some(&spec.id())).unwrap(), replayed.dump_rows(Some(&spec.id())).unwrap());
        if a != b {
            return Err(format!("view {}: the replay differs from the live rows\nlive:\n{a}\nreplay:\n{b}", spec.id()));
        }
    }
    let in_log: u64 =
        SqliteLog::held_at(&dir.path().join("log.sqlite")).unwrap().values().map(|(records, _)| records).sum();
    Ok(appended - in_log as usize)
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(128),
        ..ProptestConfig::default()
    })]

    #[test]
    fn appends_crashes_archiving_and_retention_lose_nothing_and_views_stay_exact(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        if let Err(problem) = check(&ops).map(drop) {
            prop_assert!(false, "{}", problem);
        }
    }
}

/// The model's invariants are not vacuous: a fixed sequence passes, and the
/// same sequence with a retention that ignores where the processor is
/// (only what the archive holds) is caught.
#[test]
fn negative_control_retention_past_the_processor_is_caught_as_a_gap() {
    let ops = [
        Op::Append { device: 0, n: 10 },
        Op::Append { device: 1, n: 10 },
        Op::Flush,
        Op::Archive { polls: 10 },
        Op::Flush,
        Op::Retention,
    ];
    assert_eq!(check(&ops).unwrap(), 0, "nothing is processed, so retention keeps everything");

    let dir = tempfile::tempdir().unwrap();
    let mut world = World::new(dir.path());
    for op in &ops[..5] {
        world.apply(op).unwrap();
    }
    let archived = world.archiver.as_ref().unwrap().archived().clone();
    assert!(archived.values().any(|o| *o > 1), "the archive holds records: {archived:?}");
    std::thread::sleep(Duration::from_millis(2));
    let deleted = SqliteLog::apply_retention(&dir.path().join("log.sqlite"), &archived, i64::MAX).unwrap();
    assert!(deleted > 0);
    match world.drain() {
        Err(e) => assert!(e.contains("no longer in the log"), "{e}"),
        Ok(()) => panic!("the processor read on past records retention deleted under it"),
    }
}

/// Retention does delete: with everything archived and processed, the log
/// keeps only each partition's newest record, and the promises still hold
/// through a processor crash and more appends after it.
#[test]
fn retention_deletes_what_is_archived_and_processed_and_the_promises_still_hold() {
    let ops = [
        Op::Append { device: 0, n: 11 },
        Op::Append { device: 1, n: 11 },
        Op::Append { device: 2, n: 11 },
        Op::Process { polls: 20 },
        Op::Checkpoint,
        Op::Archive { polls: 10 },
        Op::Flush,
        Op::Retention,
        Op::CrashProcessor,
        Op::Append { device: 3, n: 5 },
        Op::Rebatch { pick: 1 },
        Op::Process { polls: 3 },
        Op::CrashArchiver,
        Op::Retention,
    ];
    let deleted = check(&ops).unwrap();
    assert!(deleted >= 30, "retention deleted {deleted} of 49 records");
}
