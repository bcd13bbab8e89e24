//! Pre-aggregation: folds committed readings into per-device, per-metric
//! event-time windows, and decides which raw readings travel.
//!
//! The aggregator reads the log after the writer (readings with
//! `id > agg_cursor`), so it sees exactly what was committed, once. Each step
//! commits the changed open windows, the windows it closed and the new
//! cursor in one transaction ([`FoldStep`]): after a crash it resumes from its
//! saved state, and no reading is counted twice or missed.
//!
//! A window closes when its device's readings have moved `lateness` past its
//! end (event time), or when nothing arrived for it for `idle_close` (gateway
//! clock; a device that went quiet). A reading for a window already closed
//! opens a new partial of the same window: aggregates are mergeable partials,
//! and the cloud merges them, so late data adds rather than gets lost.
//!
//! In `aggregate` mode every raw reading stays local (exportable, kept for
//! `log.retention`); in `hybrid` mode a raw reading travels too when one of
//! its metrics moved past its deadband since the last one forwarded for that
//! device, or when it trips a local rule.

pub mod config;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use kappa_common::Reading;
use kappa_common::aggregate::{Aggregate, window_start};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use self::config::{AggregateConfig, ForwardMode, HybridConfig};
use crate::log::{EdgeLog, FoldStep, LogError, SharedLog};
use crate::metrics::EdgeMetrics;
use crate::now_ms;

/// Readings folded per step.
const STEP: usize = 5000;

type Key = (String, String, i64, i64);

/// A local rule: `metric op number`.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    metric: String,
    op: &'static str,
    value: f64,
}

impl Rule {
    pub fn parse(text: &str) -> Result<Self, String> {
        let ops = [">=", "<=", "==", "!=", ">", "<"];
        let (pos, op) = ops
            .iter()
            .filter_map(|op| text.find(op).map(|p| (p, *op)))
            .min_by_key(|(p, op)| (*p, std::cmp::Reverse(op.len())))
            .ok_or_else(|| format!("{text:?} is not `metric > number`"))?;
        let metric = text[..pos].trim();
        let value: f64 = text[pos + op.len()..]
            .trim()
            .parse()
            .map_err(|_| format!("{text:?}: {:?} is not a number", text[pos + op.len()..].trim()))?;
        if metric.is_empty() || !value.is_finite() {
            return Err(format!("{text:?} is not `metric > number`"));
        }
        Ok(Self { metric: metric.to_string(), op, value })
    }

    fn trips(&self, r: &Reading) -> bool {
        let Some(v) = r.metric(&self.metric) else { return false };
        match self.op {
            ">" => v > self.value,
            ">=" => v >= self.value,
            "<" => v < self.value,
            "<=" => v <= self.value,
            "==" => v == self.value,
            _ => v != self.value,
        }
    }
}

/// The aggregator's state between steps.
#[derive(Debug)]
pub struct Folder {
    windows: Vec<i64>,
    lateness_ms: i64,
    idle_ms: i64,
    mode: ForwardMode,
    deadband: Vec<(String, f64)>,
    rules: Vec<Rule>,
    /// Open windows and when a reading last arrived for each (gateway clock).
    open: HashMap<Key, (Aggregate, i64)>,
    /// Newest event time seen per device.
    device_time: HashMap<String, i64>,
    /// Last value forwarded raw per device and metric (hybrid).
    last_forwarded: HashMap<(String, String), f64>,
}

/// What a step did, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Folded {
    pub readings: u64,
    pub closed: u64,
    pub raw_forwarded: u64,
}

impl Folder {
    pub fn new(cfg: &AggregateConfig, mode: ForwardMode, hybrid: &HybridConfig) -> Result<Self, String> {
        Ok(Self {
            windows: cfg.window_ms()?,
            lateness_ms: cfg.lateness.as_millis() as i64,
            idle_ms: cfg.idle_close.as_millis() as i64,
            mode,
            deadband: hybrid.deadband.iter().map(|(m, b)| (m.clone(), *b)).collect(),
            rules: hybrid.rules.iter().map(|r| Rule::parse(r)).collect::<Result<_, _>>()?,
            open: HashMap::new(),
            device_time: HashMap::new(),
            last_forwarded: HashMap::new(),
        })
    }

    /// Takes over the open windows a previous run saved.
    pub fn restore(&mut self, open: Vec<Aggregate>, now_ms: i64) {
        for a in open {
            let t = self.device_time.entry(a.device.clone()).or_insert(a.last_ts);
            *t = (*t).max(a.last_ts);
            let key = (a.device.clone(), a.metric.clone(), a.window_ms, a.start_ms);
            self.open.insert(key, (a, now_ms));
        }
    }

    /// Folds readings `(id, reading)` (ids ascending, all after `from`) and closes what is due.
    pub fn step(&mut self, from: i64, readings: &[(i64, Reading)], now_ms: i64) -> (FoldStep, Folded) {
        let mut changed: HashMap<Key, ()> = HashMap::new();
        let mut forwarded = Vec::new();
        let mut exceptions = Vec::new();
        for (id, r) in readings {
            let t = self.device_time.entry(r.device.clone()).or_insert(r.ts_ms);
            *t = (*t).max(r.ts_ms);
            for (metric, value) in &r.metrics {
                let Some(v) = value else { continue };
                for &w in &self.windows {
                    let key = (r.device.clone(), metric.clone(), w, window_start(r.ts_ms, w));
                    match self.open.get_mut(&key) {
                        Some((a, arrived)) => {
                            a.add(r.ts_ms, *v);
                            *arrived = now_ms;
                        }
                        None => {
                            self.open.insert(key.clone(), (Aggregate::of(&r.device, metric, w, r.ts_ms, *v), now_ms));
                        }
                    }
                    changed.insert(key, ());
                }
            }
            if self.mode == ForwardMode::Hybrid {
                let (travels, tripped) = self.raw_travels(r);
                if travels {
                    forwarded.push(*id);
                }
                if tripped {
                    exceptions.push(*id);
                }
            }
        }
        let due: Vec<Key> = self
            .open
            .iter()
            .filter(|((device, _, _, _), (a, arrived))| {
                let device_time = self.device_time.get(device).copied().unwrap_or(i64::MIN);
                device_time >= a.end_ms().saturating_add(self.lateness_ms) || now_ms - arrived >= self.idle_ms
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut step = FoldStep {
            from,
            upto: readings.last().map_or(from, |(id, _)| *id),
            forward_only: (self.mode != ForwardMode::Raw).then_some(Vec::new()),
            exceptions,
            ..FoldStep::default()
        };
        let folded = Folded { readings: readings.len() as u64, closed: due.len() as u64, raw_forwarded: 0 };
        for key in due {
            if let Some((a, _)) = self.open.remove(&key) {
                changed.remove(&key);
                step.closed.push(a);
                step.gone.push(key);
            }
        }
        step.open = changed.into_keys().filter_map(|k| self.open.get(&k).map(|(a, _)| a.clone())).collect();
        let raw_forwarded = forwarded.len() as u64;
        if let Some(ids) = &mut step.forward_only {
            *ids = forwarded;
        }
        (step, Folded { raw_forwarded, ..folded })
    }

    /// Hybrid: `(travels, tripped a rule)`: it travels when it trips a rule
    /// or a metric moved past its deadband.
    fn raw_travels(&mut self, r: &Reading) -> (bool, bool) {
        let tripped = self.rules.iter().any(|rule| rule.trips(r));
        let moved = self.deadband.iter().any(|(metric, band)| {
            r.metric(metric).is_some_and(|v| {
                self.last_forwarded.get(&(r.device.clone(), metric.clone())).is_none_or(|last| (v - last).abs() > *band)
            })
        });
        if tripped || moved {
            for (metric, value) in &r.metrics {
                if let Some(v) = value {
                    self.last_forwarded.insert((r.device.clone(), metric.clone()), *v);
                }
            }
        }
        (tripped || moved, tripped)
    }

    /// Windows open now.
    pub fn open_len(&self) -> usize {
        self.open.len()
    }
}

/// Runs one step against the log: read, fold, commit.
pub fn fold_once(log: &mut EdgeLog, folder: &mut Folder, now_ms: i64) -> Result<Folded, LogError> {
    let from = log.fold_cursor()?;
    let readings = log.unfolded(STEP)?;
    let (step, folded) = folder.step(from, &readings, now_ms);
    if readings.is_empty() && step.closed.is_empty() {
        return Ok(folded);
    }
    log.commit_fold(&step, now_ms)?;
    Ok(folded)
}

/// Folds after every commit (and every 200 ms, to close idle windows) until `cancel` fires.
pub async fn run(
    log: SharedLog,
    folder: Folder,
    committed: Arc<Notify>,
    folded: Arc<Notify>,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) -> Result<(), LogError> {
    let folder = Arc::new(std::sync::Mutex::new(folder));
    {
        let f = folder.clone();
        log.call(move |l| {
            let open = l.open_windows()?;
            let mut f = f.lock().map_err(|_| LogError::Io("aggregator state poisoned".into()))?;
            f.restore(open, now_ms());
            Ok(())
        })
        .await?;
    }
    loop {
        let f = folder.clone();
        let result = log
            .call(move |l| {
                let mut f = f.lock().map_err(|_| LogError::Io("aggregator state poisoned".into()))?;
                let done = fold_once(l, &mut f, now_ms())?;
                Ok((done, f.open_len()))
            })
            .await;
        match result {
            Ok((done, open)) => {
                metrics.aggregate_readings.inc_by(done.readings);
                metrics.aggregates_closed.inc_by(done.closed);
                metrics.aggregate_raw_forwarded.inc_by(done.raw_forwarded);
                metrics.aggregate_open_windows.set(open as i64);
                if done.closed > 0 || done.readings > 0 {
                    folded.notify_one();
                }
                if done.readings as usize == STEP {
                    continue;
                }
            }
            Err(e) if e.is_transient() => tracing::warn!(error = %e, "Pre-aggregation step failed; will retry."),
            Err(e) => return Err(e),
        }
        tokio::select! {
            _ = committed.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            _ = cancel.cancelled() => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Entry;
    use crate::log::config::Durability;

    fn reading(device: &str, seq: u64, t: f64) -> Reading {
        Reading {
            device: device.into(),
            boot: 1,
            seq,
            ts_ms: 1_767_225_600_000 + seq as i64 * 1000,
            schema: 2,
            metrics: [("t".to_string(), Some(t))].into(),
            tags: Default::default(),
        }
    }

    fn cfg() -> AggregateConfig {
        AggregateConfig {
            windows: vec!["10s".into(), "1m".into()],
            lateness: Duration::from_secs(5),
            idle_close: Duration::from_secs(3600),
        }
    }

    fn folder(mode: ForwardMode, hybrid: &HybridConfig) -> Folder {
        Folder::new(&cfg(), mode, hybrid).unwrap()
    }

    /// Merges partials by window, as the cloud does.
    fn merged(parts: impl IntoIterator<Item = Aggregate>) -> Vec<Aggregate> {
        let mut by: std::collections::BTreeMap<(String, String, i64, i64), Aggregate> = Default::default();
        for a in parts {
            let k = (a.device.clone(), a.metric.clone(), a.window_ms, a.start_ms);
            match by.get_mut(&k) {
                Some(m) => m.merge(&a),
                None => {
                    by.insert(k, a);
                }
            }
        }
        by.into_values().collect()
    }

    fn run_log(log: &mut EdgeLog, folder: &mut Folder, now: i64) -> Vec<Aggregate> {
        let mut closed = Vec::new();
        loop {
            let before = log.fold_cursor().unwrap();
            let readings = log.unfolded(700).unwrap();
            let (step, _) = folder.step(before, &readings, now);
            closed.extend(step.closed.clone());
            log.commit_fold(&step, now).unwrap();
            if readings.is_empty() {
                return closed;
            }
        }
    }

    #[test]
    fn a_restart_mid_fold_gives_the_same_aggregates_as_an_uninterrupted_run() {
        let entries: Vec<Entry> =
            (1..=3000).map(|s| Entry::Reading(reading(&format!("d{}", s % 7), s, (s % 13) as f64 * 0.5))).collect();
        let whole = {
            let dir = tempfile::tempdir().unwrap();
            let mut log = EdgeLog::open(&dir.path().join("a.sqlite"), Durability::Normal).unwrap();
            log.append(&entries, 0).unwrap();
            let mut f = folder(ForwardMode::Aggregate, &HybridConfig::default());
            let mut all = run_log(&mut log, &mut f, 0);
            all.extend(log.open_windows().unwrap());
            merged(all)
        };
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.sqlite");
        let mut closed = Vec::new();
        for chunk in entries.chunks(1100) {
            // A new process each time: state only from the log.
            let mut log = EdgeLog::open(&path, Durability::Normal).unwrap();
            log.append(chunk, 0).unwrap();
            let mut f = folder(ForwardMode::Aggregate, &HybridConfig::default());
            f.restore(log.open_windows().unwrap(), 0);
            let readings = log.unfolded(450).unwrap();
            let (step, _) = f.step(log.fold_cursor().unwrap(), &readings, 0);
            closed.extend(step.closed.clone());
            log.commit_fold(&step, 0).unwrap();
            // Crash here: the rest of this chunk is folded by the next process.
        }
        let mut log = EdgeLog::open(&path, Durability::Normal).unwrap();
        let mut f = folder(ForwardMode::Aggregate, &HybridConfig::default());
        f.restore(log.open_windows().unwrap(), 0);
        closed.extend(run_log(&mut log, &mut f, 0));
        closed.extend(log.open_windows().unwrap());
        assert_eq!(merged(closed), whole);
        assert_eq!(whole.iter().filter(|a| a.window_ms == 10_000).map(|a| a.count).sum::<u64>(), 3000);
        assert_eq!(whole.iter().filter(|a| a.window_ms == 60_000).map(|a| a.count).sum::<u64>(), 3000);
    }

    #[test]
    fn windows_close_on_device_time_or_idleness_and_late_readings_add_a_partial() {
        let mut f = folder(ForwardMode::Aggregate, &HybridConfig::default());
        let rs: Vec<(i64, Reading)> = (1..=16).map(|s| (s as i64, reading("a", s, 1.0))).collect();
        let (step, _) = f.step(0, &rs, 0);
        // Device time is +16 s: the 10 s window [0, 10) closed (16 >= 10 + 5); [10, 20) is open.
        let closed: Vec<_> = step.closed.iter().map(|a| (a.window_ms, a.count)).collect();
        assert_eq!(closed, vec![(10_000, 9)]);
        // A late reading for the closed window: a new partial, not a lost one.
        let (step, _) = f.step(16, &[(17, reading("a", 2, 5.0))], 0);
        assert!(step.closed.iter().any(|a| a.window_ms == 10_000 && a.count == 1 && a.max == 5.0));
        // Idle: an hour of gateway time later everything closes.
        let (step, _) = f.step(17, &[], 3_600_000);
        assert_eq!(f.open_len(), 0);
        assert!(step.closed.len() >= 2);
    }

    #[test]
    fn hybrid_forwards_raw_readings_past_the_deadband_or_a_rule() {
        let hybrid = HybridConfig { deadband: [("t".to_string(), 1.0)].into(), rules: vec!["t >= 50".into()] };
        let mut f = folder(ForwardMode::Hybrid, &hybrid);
        let values = [20.0, 20.5, 20.9, 21.5, 21.0, 60.0, 59.9, 20.0];
        let rs: Vec<(i64, Reading)> =
            values.iter().enumerate().map(|(i, v)| (i as i64 + 1, reading("a", i as u64 + 1, *v))).collect();
        let (step, done) = f.step(0, &rs, 0);
        // 20.0 (first), 21.5 (moved 1.5), 60.0 (rule and band), 59.9 (rule), 20.0 (moved 39.9).
        assert_eq!(step.forward_only, Some(vec![1, 4, 6, 7, 8]));
        assert_eq!(step.exceptions, vec![6, 7], "the rule trips are exceptions");
        assert_eq!(done.raw_forwarded, 5);
        let (step, _) = folder(ForwardMode::Aggregate, &hybrid).step(0, &rs, 0);
        assert_eq!(step.forward_only, Some(vec![]));
        let (step, _) = folder(ForwardMode::Raw, &hybrid).step(0, &rs, 0);
        assert_eq!(step.forward_only, None);
    }

    #[test]
    fn rules_parse_like_they_read() {
        assert_eq!(
            Rule::parse("temperature >= 50").unwrap(),
            Rule { metric: "temperature".into(), op: ">=", value: 50.0 }
        );
        assert_eq!(Rule::parse("p<-1.5").unwrap().op, "<");
        assert!(Rule::parse("temperature is hot").is_err());
        assert!(Rule::parse("> 5").is_err());
    }
}
