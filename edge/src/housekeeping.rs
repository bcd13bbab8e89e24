//! Keeping the log inside its budget: retention, then the shedding order.
//!
//! Every `log.housekeeping_interval`, and at once when a commit fails for
//! lack of space, the agent:
//!
//! 1. deletes forwarded readings older than `log.retention` (counted in
//!    `kappa_edge_readings_pruned_total{reason="retention"}`);
//! 2. while the log is over `log.max_bytes` or the filesystem is below
//!    `log.min_free_bytes`, deletes forwarded readings, oldest first, even
//!    within retention (`pruned{reason="budget"|"disk_floor"}`). Nothing is
//!    lost: the cloud has them;
//! 3. if still over, drops the oldest readings not yet forwarded
//!    (`kappa_edge_readings_shed_total{reason="budget"|"disk_floor"}`): these
//!    never reach the cloud, and the counter says how many.
//!
//! Dead letters (batches the cloud refused) are neither pruned nor shed:
//! they stay until an operator resends or releases them; released ones are
//! deleted by the next pass (`shed_total{reason="released"}`), and a class's
//! `log.ttl` takes them like any data of that class (`shed{reason="ttl"}`).
//!
//! The floor counts free space whoever used it. A commit that fails because
//! the disk is full is different: the agent prunes forwarded readings
//! to make room, but does not shed unforwarded ones to make room for newer
//! ones. It stops acknowledging instead, so devices (or the external broker)
//! keep their readings, reports `kappa_edge_log_full 1`, and resumes by
//! itself when a commit succeeds again.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::log::config::LogConfig;
use crate::log::{Class, EdgeLog, LogError, SharedLog, Usage};
use crate::metrics::EdgeMetrics;
use crate::now_ms;

/// Readings deleted per transaction: bounded so the writer never waits long.
const CHUNK: usize = 2000;

/// Why space is needed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pressure {
    /// The log is over `log.max_bytes`.
    Budget,
    /// The filesystem is below `log.min_free_bytes`.
    DiskFloor,
    /// A commit failed with a full disk.
    DiskFull,
}

impl Pressure {
    fn label(self) -> &'static str {
        match self {
            Self::Budget => "budget",
            Self::DiskFloor => "disk_floor",
            Self::DiskFull => "disk_full",
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    pub pruned: Vec<(&'static str, u64)>,
    /// By `(reason, class)`.
    pub shed: Vec<((&'static str, &'static str), u64)>,
    pub rolled_up: Vec<(&'static str, u64)>,
    pub rollups: u64,
    pub usage: Usage,
    pub disk_free: u64,
}

/// The limits a pass enforces.
#[derive(Debug, Clone)]
pub struct Limits {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub min_free_bytes: u64,
    pub retention: Duration,
    pub rollup_window_ms: i64,
    /// Age past which data of a class goes, forwarded or not.
    pub ttl: [(Class, Duration); 3],
}

impl Limits {
    pub fn new(dir: &Path, cfg: &LogConfig) -> Self {
        Self {
            dir: dir.to_path_buf(),
            max_bytes: cfg.max_bytes.0,
            min_free_bytes: cfg.min_free_bytes.0,
            retention: cfg.retention,
            rollup_window_ms: cfg.rollup_window.as_millis().max(1) as i64,
            ttl: [
                (Class::Raw, cfg.ttl.raw),
                (Class::Aggregate, cfg.ttl.aggregate),
                (Class::Exception, cfg.ttl.exception),
            ],
        }
    }

    fn disk_free(&self) -> u64 {
        // An unreadable filesystem is not a reason to shed.
        kappa_runtime::limits::disk_space(&self.dir).map_or(u64::MAX, |(free, _)| free)
    }

    fn pressure(&self, log: &EdgeLog) -> Result<Option<Pressure>, LogError> {
        if log.usage()?.budget_bytes() > self.max_bytes {
            return Ok(Some(Pressure::Budget));
        }
        Ok((self.disk_free() < self.min_free_bytes).then_some(Pressure::DiskFloor))
    }
}

/// One housekeeping pass; `disk_full` when a commit just failed for space.
pub fn pass(log: &mut EdgeLog, limits: &Limits, disk_full: bool, now_ms: i64) -> Result<Pass, LogError> {
    let mut out = Pass::default();
    let before = now_ms - limits.retention.as_millis() as i64;
    let mut retained = 0;
    loop {
        let n = log.prune_forwarded(Some(before), CHUNK)?;
        retained += n;
        if n < CHUNK as u64 {
            break;
        }
    }
    add(&mut out.pruned, "retention", retained);
    log.prune_aggregates(before)?;
    // Dead letters an operator released (`kappa-edge log dead-letters release`).
    let released = log.drop_released()?;
    add(&mut out.shed, ("released", Class::Raw.label()), released.readings);
    add(&mut out.shed, ("released", Class::Aggregate.label()), released.aggregates);
    for (class, ttl) in limits.ttl {
        let (gone, unsent) = log.expire(class, now_ms - ttl.as_millis() as i64)?;
        add(&mut out.pruned, "ttl", gone - unsent);
        add(&mut out.shed, ("ttl", class.label()), unsent);
    }

    let pressure = |log: &EdgeLog| -> Result<Option<Pressure>, LogError> {
        Ok(limits.pressure(log)?.or(disk_full.then_some(Pressure::DiskFull)))
    };
    while let Some(p) = pressure(log)? {
        let n = log.prune_forwarded(None, CHUNK)?;
        if n == 0 {
            break;
        }
        add(&mut out.pruned, p.label(), n);
        log.reclaim(true)?;
        if p == Pressure::DiskFull {
            // Room for the next commit; if it is not enough, the next failure brings us back.
            break;
        }
    }
    while let Some(p) = limits.pressure(log)? {
        let (n, rollups) = log.roll_up(limits.rollup_window_ms, CHUNK, now_ms)?;
        if n == 0 {
            break;
        }
        add(&mut out.rolled_up, p.label(), n);
        out.rollups += rollups;
        log.reclaim(true)?;
    }
    for class in Class::ALL {
        while let Some(p) = limits.pressure(log)? {
            let n = log.shed(class, CHUNK)?;
            if n == 0 {
                break;
            }
            add(&mut out.shed, (p.label(), class.label()), n);
            log.reclaim(true)?;
        }
    }
    log.reclaim(false)?;
    out.usage = log.usage()?;
    out.disk_free = limits.disk_free();
    Ok(out)
}

fn add<K: PartialEq>(counts: &mut Vec<(K, u64)>, reason: K, n: u64) {
    if n == 0 {
        return;
    }
    match counts.iter_mut().find(|(r, _)| *r == reason) {
        Some((_, total)) => *total += n,
        None => counts.push((reason, n)),
    }
}

/// Runs passes until `cancel` fires. `disk_full` is notified by the writer
/// when a commit fails for space.
pub async fn run(
    log: SharedLog,
    limits: Limits,
    interval: Duration,
    disk_full: Arc<Notify>,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) -> Result<(), LogError> {
    metrics.log_budget_bytes.set(limits.max_bytes as i64);
    let limits = Arc::new(limits);
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let full = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            _ = tick.tick() => false,
            _ = disk_full.notified() => true,
        };
        let l = limits.clone();
        match log.call(move |log| pass(log, &l, full, now_ms())).await {
            Ok(p) => {
                for (reason, n) in &p.pruned {
                    metrics.readings_pruned.get_or_create(&[("reason", reason)]).inc_by(*n);
                }
                for ((reason, class), n) in &p.shed {
                    metrics.readings_shed.get_or_create(&[("reason", reason), ("class", class)]).inc_by(*n);
                    tracing::warn!(
                        count = n,
                        reason,
                        class,
                        "Shed unforwarded data to stay within the log's limits; it will not reach the cloud."
                    );
                }
                for (reason, n) in &p.rolled_up {
                    metrics.readings_rolled_up.get_or_create(&[("reason", reason)]).inc_by(*n);
                }
                metrics.rollups.inc_by(p.rollups);
                metrics.log_used_bytes.set(p.usage.budget_bytes() as i64);
                metrics.disk_free_bytes.set(p.disk_free.min(i64::MAX as u64) as i64);
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "Log housekeeping failed; will try again.");
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Entry;
    use crate::log::config::Durability;
    use crate::log::tests::reading;

    fn fill(log: &mut EdgeLog, device: &str, n: u64, received_ms: i64) {
        let entries: Vec<Entry> = (1..=n).map(|s| Entry::Reading(reading(device, s))).collect();
        log.append(&entries, received_ms).unwrap();
    }

    fn limits(dir: &Path, max_bytes: u64) -> Limits {
        let long = Duration::from_secs(10 * 365 * 86_400);
        Limits {
            dir: dir.to_path_buf(),
            max_bytes,
            min_free_bytes: 0,
            retention: Duration::from_secs(3600),
            rollup_window_ms: 60_000,
            ttl: [(Class::Raw, long), (Class::Aggregate, long), (Class::Exception, long)],
        }
    }

    #[test]
    fn under_budget_only_retention_applies() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EdgeLog::open(&dir.path().join("l.sqlite"), Durability::Normal).unwrap();
        fill(&mut log, "old", 100, 0);
        fill(&mut log, "new", 100, 10_000_000);
        let b = log.assign_batch(150, 0).unwrap().unwrap();
        log.complete_batch(b.batch_id).unwrap();
        let p = pass(&mut log, &limits(dir.path(), u64::MAX), false, 10_000_000).unwrap();
        assert_eq!((p.pruned, p.shed), (vec![("retention", 100)], vec![]));
        assert_eq!(log.stats().unwrap().readings, 100);
    }

    fn rollup_total(log: &EdgeLog) -> u64 {
        let e = crate::log::OutboxEntry {
            batch_id: 0,
            kind: crate::log::BatchKind::Aggregates,
            first_id: 0,
            last_id: i64::MAX,
            count: 0,
            created_ms: 0,
        };
        log.load_aggregates(&e).unwrap().iter().map(|a| a.count).sum()
    }

    #[test]
    fn over_budget_forwarded_readings_go_first_then_old_raw_is_rolled_up() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EdgeLog::open(&dir.path().join("l.sqlite"), Durability::Normal).unwrap();
        for d in 0..10 {
            fill(&mut log, &format!("d{d}"), 2000, 0);
        }
        let b = log.assign_batch(5000, 0).unwrap().unwrap();
        log.complete_batch(b.batch_id).unwrap();
        log.reclaim(true).unwrap();
        let used = log.usage().unwrap().budget_bytes();

        // A budget that the 15,000 unforwarded readings alone still exceed.
        let budget = used / 2;
        let p = pass(&mut log, &limits(dir.path(), budget), false, 0).unwrap();
        assert_eq!(p.pruned, vec![("budget", 5000)], "every forwarded reading went first");
        let rolled = p.rolled_up.iter().map(|(_, n)| n).sum::<u64>();
        assert!(rolled > 0 && p.shed.is_empty(), "rollups sufficed: {p:?}");
        assert!(p.usage.budget_bytes() <= budget, "{:?} over {budget}", p.usage);
        // Nothing vanished: every rolled-up reading is counted in a rollup.
        assert_eq!(rollup_total(&log), rolled);
        assert_eq!(log.stats().unwrap().readings, 15_000 - rolled);
        // Rollups are per minute: 2,000 readings 1 s apart make 34 per device, far fewer than the readings.
        assert!(p.rollups * 20 < rolled, "{} rollups for {rolled} readings", p.rollups);
        assert!(log.check().unwrap().is_empty());
    }

    #[test]
    fn when_rollups_do_not_pay_raw_is_shed_before_aggregates_and_exceptions() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EdgeLog::open(&dir.path().join("l.sqlite"), Durability::Normal).unwrap();
        // One reading per device: a rollup per reading would save nothing.
        let entries: Vec<Entry> = (0..6000).map(|i| Entry::Reading(reading(&format!("d{i}"), 1))).collect();
        log.append(&entries, 0).unwrap();
        // The last 500 tripped a local rule (hybrid mode marks them as exceptions).
        let step = crate::log::FoldStep { exceptions: (5501..=6000).collect(), ..Default::default() };
        log.commit_fold(&step, 0).unwrap();
        log.reclaim(true).unwrap();
        let used = log.usage().unwrap().budget_bytes();
        let p = pass(&mut log, &limits(dir.path(), used / 2), false, 0).unwrap();
        assert!(p.rolled_up.is_empty(), "{p:?}");
        assert!(p.shed.iter().all(|((_, class), _)| *class == "raw"), "{:?}", p.shed);
        // Now a budget below what the exceptions alone need: raw goes entirely, then exceptions.
        let p = pass(&mut log, &limits(dir.path(), 1), false, 0).unwrap();
        let classes: Vec<&str> = p.shed.iter().map(|((_, c), _)| *c).collect();
        assert_eq!(classes, vec!["raw", "exception"], "{:?}", p.shed);
        assert_eq!(log.stats().unwrap().readings, 0);
    }

    #[test]
    fn data_past_its_ttl_goes_forwarded_or_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EdgeLog::open(&dir.path().join("l.sqlite"), Durability::Normal).unwrap();
        fill(&mut log, "old", 100, 0);
        fill(&mut log, "new", 100, 5_000_000);
        let b = log.assign_batch(50, 0).unwrap().unwrap();
        log.complete_batch(b.batch_id).unwrap();
        let mut l = limits(dir.path(), u64::MAX);
        l.ttl[0].1 = Duration::from_secs(3600);
        let p = pass(&mut log, &l, false, 4_000_000).unwrap();
        // 50 old ones were forwarded (retention 1 h also takes them), 50 never were.
        let pruned: u64 = p.pruned.iter().map(|(_, n)| n).sum();
        assert_eq!((pruned, p.shed.clone()), (50, vec![(("ttl", "raw"), 50)]));
        assert_eq!(log.stats().unwrap().readings, 100);
    }

    #[test]
    fn a_full_disk_prunes_forwarded_readings_but_never_sheds() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = EdgeLog::open(&dir.path().join("l.sqlite"), Durability::Normal).unwrap();
        fill(&mut log, "a", 3000, 0);
        let b = log.assign_batch(1000, 0).unwrap().unwrap();
        log.complete_batch(b.batch_id).unwrap();
        let p = pass(&mut log, &limits(dir.path(), u64::MAX), true, 0).unwrap();
        assert_eq!((p.pruned, p.shed), (vec![("disk_full", 1000)], vec![]));
        assert_eq!(log.stats().unwrap().readings, 2000);
    }
}
