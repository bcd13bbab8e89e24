//! A model-based test of the edge log (the way Vector tests its disk
//! buffer): random sequences of every operation the agent performs on its
//! log (append with duplicates, batch, complete, refuse, split, prune,
//! shed, roll up, expire, resend, release, reopen) applied to the real
//! SQLite log and to a model of where each acknowledged reading must be.
//! After every step: each acknowledged reading is forwarded, still in the
//! log, or accounted for by exactly one reason (shed, rolled up, expired
//! unsent, released), and `kappa-edge log check` finds nothing wrong.
//!
//! Reopening the log is the crash: every operation is one transaction, so a
//! process killed at any moment leaves the state after some whole
//! operation, which reopening must show unchanged.
//!
//! What it found, each now a named test in `edge/src/log`: pruning deleted
//! the readings of a pending backfill batch (and so of a resent dead
//! letter) before it was sent
//! (`a_pending_backfill_batch_is_not_pruned_before_it_is_sent`,
//! `a_resent_dead_letter_is_not_pruned_before_it_is_sent`), and `log check`
//! reported batches completed out of order (pipelining) as a broken
//! invariant (`log_check_accepts_batches_completed_out_of_order`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::{BTreeMap, BTreeSet};

use kappa_common::Reading;
use kappa_edge::config::Durability;
use kappa_edge::log::{BatchKind, Class, EdgeLog, Entry, Which};
use proptest::prelude::*;

/// A reading's identity.
type Key = (String, u64);

#[derive(Debug, Clone)]
enum Op {
    /// Readings `seqs` of device `device` (some may be resends), received at the model's clock.
    Append {
        device: u8,
        first: u64,
        n: u8,
    },
    Assign {
        max: u8,
    },
    Complete {
        pick: usize,
    },
    Refuse {
        pick: usize,
    },
    Split {
        pick: usize,
    },
    Prune {
        limit: u8,
    },
    Shed {
        limit: u8,
    },
    RollUp {
        limit: u8,
    },
    /// Everything received more than `age` ticks ago.
    Expire {
        age: u8,
    },
    Resend {
        pick: usize,
    },
    Release {
        pick: usize,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 1u64..40, 1u8..12).prop_map(|(device, first, n)| Op::Append { device, first, n }),
        3 => (1u8..12).prop_map(|max| Op::Assign { max }),
        3 => any::<usize>().prop_map(|pick| Op::Complete { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Refuse { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Split { pick }),
        2 => (1u8..20).prop_map(|limit| Op::Prune { limit }),
        1 => (1u8..8).prop_map(|limit| Op::Shed { limit }),
        1 => (4u8..40).prop_map(|limit| Op::RollUp { limit }),
        1 => (1u8..30).prop_map(|age| Op::Expire { age }),
        1 => any::<usize>().prop_map(|pick| Op::Resend { pick }),
        1 => any::<usize>().prop_map(|pick| Op::Release { pick }),
        1 => Just(Op::Reopen),
    ]
}

/// Where every acknowledged reading must be.
#[derive(Debug, Default)]
struct Model {
    acked: BTreeSet<Key>,
    /// In a batch the cloud accepted.
    forwarded: BTreeSet<Key>,
    /// Deleted without reaching the cloud, by reason.
    dropped: BTreeMap<&'static str, BTreeSet<Key>>,
    /// Outbox batches and the readings each carries (aggregate batches carry none).
    batches: BTreeMap<u64, BTreeSet<Key>>,
    /// Dead letters and their readings.
    dead: BTreeMap<u64, BTreeSet<Key>>,
    /// Readings the cloud has whose row in the log is a later resend, not yet
    /// sent again: the log cannot tell them from new ones.
    resent: BTreeSet<Key>,
    clock: i64,
}

fn reading(device: u8, seq: u64) -> Reading {
    Reading {
        device: format!("dev-{device}"),
        boot: 1,
        seq,
        // Few minutes of event time per device, so rollups pay.
        ts_ms: 1_767_225_600_000 + seq as i64 * 1000,
        schema: 2,
        metrics: [("t".to_string(), Some(seq as f64))].into(),
        tags: Default::default(),
    }
}

fn key(r: &Reading) -> Key {
    (r.device.clone(), r.seq)
}

/// The readings in the log now.
fn contents(log: &EdgeLog) -> BTreeSet<Key> {
    let mut out = BTreeSet::new();
    log.export(i64::MIN, i64::MAX, |r| {
        out.insert(key(&r));
        Ok(())
    })
    .unwrap();
    out
}

/// The readings outbox batch `batch_id` carries.
fn batch_readings(log: &EdgeLog, batch_id: u64) -> BTreeSet<Key> {
    let entry = log.outbox().unwrap().into_iter().find(|e| e.batch_id == batch_id).unwrap();
    log.load_batch(&entry).unwrap().iter().map(key).collect()
}

fn pick<T: Copy>(items: &[T], i: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[i % items.len()])
}

struct Harness {
    dir: tempfile::TempDir,
    log: EdgeLog,
    model: Model,
}

impl Harness {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = EdgeLog::open(&dir.path().join("log.sqlite"), Durability::Normal).unwrap();
        Self { dir, log, model: Model::default() }
    }

    /// Applies `op`; `removed` is what left the log in it.
    fn apply(&mut self, op: &Op) {
        let before = contents(&self.log);
        let m = &mut self.model;
        let outbox: Vec<u64> = self.log.outbox().unwrap().iter().map(|e| e.batch_id).collect();
        let dead: Vec<u64> = m.dead.keys().copied().collect();
        match *op {
            Op::Append { device, first, n } => {
                m.clock += 1;
                let rs: Vec<Reading> = (first..first + u64::from(n)).map(|s| reading(device, s)).collect();
                let out =
                    self.log.append(&rs.iter().cloned().map(Entry::Reading).collect::<Vec<_>>(), m.clock).unwrap();
                // The log stores a reading once while it holds it; one sent
                // again after it was pruned is stored again (the cloud
                // dedups it by identity).
                let fresh: BTreeSet<Key> = rs.iter().map(key).filter(|k| !before.contains(k)).collect();
                assert_eq!(
                    out.inserted as usize,
                    fresh.len(),
                    "exactly the readings the log does not hold are inserted"
                );
                for k in &fresh {
                    for dropped in m.dropped.values_mut() {
                        dropped.remove(k);
                    }
                    if m.forwarded.contains(k) {
                        m.resent.insert(k.clone());
                    }
                }
                m.acked.extend(fresh);
            }
            Op::Assign { max } => {
                if let Some(entry) = self.log.assign_batch(usize::from(max), m.clock).unwrap() {
                    let carried = batch_readings(&self.log, entry.batch_id);
                    m.batches.insert(entry.batch_id, carried);
                }
            }
            Op::Complete { pick: i } => {
                if let Some(b) = pick(&outbox, i) {
                    self.log.complete_batch(b).unwrap();
                    let carried = m.batches.remove(&b).unwrap_or_default();
                    m.resent.retain(|k| !carried.contains(k));
                    m.forwarded.extend(carried);
                }
            }
            Op::Refuse { pick: i } => {
                if let Some(b) = pick(&outbox, i) {
                    let kind = self.log.outbox().unwrap().into_iter().find(|e| e.batch_id == b).unwrap().kind;
                    self.log.dead_letter_batch(b, "HTTP 400: refused in the model", m.clock).unwrap();
                    let carried = m.batches.remove(&b).unwrap_or_default();
                    if kind != BatchKind::Aggregates {
                        m.dead.insert(b, carried);
                    } else {
                        m.dead.insert(b, BTreeSet::new());
                    }
                }
            }
            Op::Split { pick: i } => {
                if let Some(b) = pick(&outbox, i)
                    && let Some((x, y)) = self.log.split_batch(b).unwrap()
                {
                    let whole = m.batches.remove(&b).unwrap_or_default();
                    let (rx, ry) = (batch_readings(&self.log, x.batch_id), batch_readings(&self.log, y.batch_id));
                    assert!(rx.is_disjoint(&ry), "the halves share readings");
                    assert_eq!(rx.union(&ry).cloned().collect::<BTreeSet<_>>(), whole, "the halves are the batch");
                    m.batches.insert(x.batch_id, rx);
                    m.batches.insert(y.batch_id, ry);
                }
            }
            Op::Prune { limit } => {
                let n = self.log.prune_forwarded(None, usize::from(limit)).unwrap();
                let removed: BTreeSet<Key> = before.difference(&contents(&self.log)).cloned().collect();
                assert_eq!(removed.len() as u64, n);
                let lost: Vec<&Key> = removed.iter().filter(|k| !m.forwarded.contains(*k)).collect();
                assert!(lost.is_empty(), "pruning deleted readings the cloud does not have: {lost:?}");
            }
            Op::Shed { limit } => {
                let n = self.log.shed(Class::Raw, usize::from(limit)).unwrap();
                self.dropped("shed", &before, n);
            }
            Op::RollUp { limit } => {
                let (n, _) = self.log.roll_up(60_000, usize::from(limit), m.clock).unwrap();
                self.dropped("rolled_up", &before, n);
            }
            Op::Expire { age } => {
                let (gone, unsent) = self.log.expire(Class::Raw, m.clock - i64::from(age)).unwrap();
                let removed: BTreeSet<Key> = before.difference(&contents(&self.log)).cloned().collect();
                assert_eq!(removed.len() as u64, gone);
                let never_sent: BTreeSet<Key> = removed.iter().filter(|k| !m.forwarded.contains(*k)).cloned().collect();
                // Rows the log never sent: readings the cloud never had, and resent copies of ones it has.
                let unsent_rows = never_sent.len() + removed.iter().filter(|k| m.resent.contains(*k)).count();
                assert_eq!(unsent_rows as u64, unsent, "expired rows the log never sent are counted as such");
                m.resent.retain(|k| !removed.contains(k));
                for held in self.model.dead.values_mut() {
                    held.retain(|k| !removed.contains(k));
                }
                self.account("expired", never_sent);
            }
            Op::Resend { pick: i } => {
                if let Some(b) = pick(&dead, i) {
                    let carried = m.dead.remove(&b).unwrap_or_default();
                    let queued = self.log.resend_dead_letters(Which::Batch(b), m.clock).unwrap();
                    if let Some(e) = queued.first() {
                        let again = batch_readings(&self.log, e.batch_id);
                        assert_eq!(again, carried, "a resend carries the dead letter's readings");
                        self.model.batches.insert(e.batch_id, again);
                    }
                }
            }
            Op::Release { pick: i } => {
                if let Some(b) = pick(&dead, i) {
                    self.log.release_dead_letters(Which::Batch(b), m.clock).unwrap();
                    let released = self.log.drop_released().unwrap();
                    let carried = self.model.dead.remove(&b).unwrap_or_default();
                    let removed: BTreeSet<Key> = before.difference(&contents(&self.log)).cloned().collect();
                    assert_eq!(removed, carried, "release deletes exactly the dead letter's readings");
                    assert_eq!(released.readings as usize, carried.len());
                    self.account("released", removed);
                }
            }
            Op::Reopen => {
                let path = self.dir.path().join("log.sqlite");
                self.log = EdgeLog::open(&path, Durability::Normal).unwrap();
                assert_eq!(contents(&self.log), before, "reopening changes nothing");
            }
        }
        // Dead letters whose readings a ttl took are gone from the log's list too.
        let listed: BTreeSet<u64> = self.log.dead_letters().unwrap().iter().map(|d| d.batch_id).collect();
        self.model.dead.retain(|b, rs| listed.contains(b) || rs.is_empty());
        self.check();
    }

    /// Readings that left the log in an operation that drops unforwarded ones: `n` of them, none forwarded or batched.
    fn dropped(&mut self, reason: &'static str, before: &BTreeSet<Key>, n: u64) {
        let removed: BTreeSet<Key> = before.difference(&contents(&self.log)).cloned().collect();
        assert_eq!(removed.len() as u64, n, "{reason}: the count says what left");
        let m = &self.model;
        for k in &removed {
            assert!(!m.batches.values().any(|b| b.contains(k)), "{reason} took a reading from a pending batch {k:?}");
            assert!(!m.dead.values().any(|b| b.contains(k)), "{reason} took a dead letter's reading {k:?}");
        }
        self.account(reason, removed);
    }

    /// Counts `keys` as gone for `reason`; a copy of a reading the cloud already has is not a loss.
    fn account(&mut self, reason: &'static str, keys: BTreeSet<Key>) {
        let m = &mut self.model;
        let lost: Vec<Key> = keys.into_iter().filter(|k| !m.forwarded.contains(k)).collect();
        m.dropped.entry(reason).or_default().extend(lost);
    }

    /// Every acknowledged reading is forwarded, still in the log, or dropped for exactly one reason.
    fn check(&self) {
        let m = &self.model;
        let held = contents(&self.log);
        for k in &m.acked {
            let reasons: Vec<&str> = m.dropped.iter().filter(|(_, ks)| ks.contains(k)).map(|(r, _)| *r).collect();
            let (forwarded, in_log) = (m.forwarded.contains(k), held.contains(k));
            match (forwarded, in_log, reasons.as_slice()) {
                (true, _, []) | (false, true, []) | (false, false, [_]) => {}
                other => panic!("reading {k:?}: forwarded, in the log, dropped = {other:?}"),
            }
        }
        let problems = self.log.check().unwrap();
        assert!(problems.is_empty(), "kappa-edge log check: {problems:?}");
    }
}

proptest! {
    // PROPTEST_CASES=20000 searches deeper (docs/reliability.md).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn every_acknowledged_reading_is_forwarded_held_or_counted_by_exactly_one_reason(ops in proptest::collection::vec(op(), 1..60)) {
        let mut h = Harness::new();
        for op in &ops {
            h.apply(op);
        }
    }
}
