//! The alert operator: every rule, evaluated per device in log order.
//!
//! Everything an alert depends on is in one partition of the log, in offset
//! order: a device's readings (its key hashes there) and its gateway's
//! progress in that partition (the gateway's other readings there and the
//! heartbeat copy ingest writes to every partition). So the same log gives
//! the same alerts, with the same ids, live or replayed, whatever order the
//! processor interleaves partitions in.
//!
//! * Per-reading rules (threshold, zscore, rate_of_change, flatline, gap)
//!   judge each reading as it arrives and move the `(rule, device)` series
//!   through its lifecycle: ok → pending (threshold `for`) → firing →
//!   resolved once the clear condition has held for `clear_for`.
//! * Silence is a timer: a device's deadline is its last event time plus
//!   `after`. It fires when the *gateway clock* of the device's gateway in
//!   the device's partition passes the deadline. That clock is the newest
//!   heartbeat, or the newest reading from that gateway minus
//!   `gateway_lateness`. Ingest writes a gateway's progress into the
//!   partitions its batches do not touch (at most once per
//!   `ingest.progress_interval`), so every partition hears from every active
//!   gateway. A gateway that is offline sends nothing, so its
//!   clock stops and its devices are not declared silent; when it returns
//!   with its backlog (oldest first) the clock and the devices' readings
//!   advance together.
//!
//! Alert ids are `rule:device:started_ms` (event time): deterministic.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use kappa_common::Reading;
use serde::{Deserialize, Serialize};

pub use crate::model::{AlertChanges, AlertEvent, AlertRecord, OutboxItem};

use super::spec::{Expr, RuleKind, RuleSpec, Severity};
use crate::eventlog::Partition;
use crate::views::spec::{Field, Literal};

mod judge;
mod lifecycle;
mod silence;

use self::judge::{Compiled, Verdict, compile, describe, judge, slot_of};
use self::silence::Clock;

/// Which webhook hears which alerts.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub webhook: String,
    pub min_severity: Severity,
    /// Rule names; empty means every rule.
    pub rules: Vec<String>,
}

/// How silence is clocked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SilenceClock {
    /// Per gateway and partition (the design above).
    Gateway,
    /// TEST ONLY: the processor's global watermark, as a naive engine would
    /// do. It exists to show that the gateway-offline test catches an engine
    /// that declares every device of an offline gateway silent.
    GlobalWatermarkForTests,
}

/// Operator settings.
#[derive(Debug, Clone)]
pub struct AlertSettings {
    /// How far out of order (event time) one gateway's readings may arrive.
    pub gateway_lateness_ms: i64,
    /// A device is declared silent only once its gateway has been sending
    /// for this long (cloud clock, from the log's ingest times) without it.
    pub silence_quiet_ms: i64,
    /// A gap this long in a gateway's records means the gateway was away:
    /// it counts only this much towards its devices' quiet time.
    pub gateway_gap_ms: i64,
    pub routes: Vec<Route>,
    pub silence_clock: SilenceClock,
}

/// Where a `(rule, device)` series is in its lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Life {
    Ok,
    Pending { since: i64 },
    Firing { started: i64, clear_since: Option<i64> },
}

/// What a detector remembers between readings.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
enum Memory {
    None,
    /// Exponentially weighted mean and variance.
    Ewma {
        n: u32,
        mean: f64,
        var: f64,
    },
    /// The previous value and its time.
    Last {
        ts: i64,
        v: f64,
    },
    /// The value a run of equal readings started with, when, and how long it is.
    Run {
        v: f64,
        since: i64,
        n: u32,
    },
}

/// One `(rule, device)` series.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
struct Series {
    life: Life,
    mem: Memory,
}

/// Everything kept per device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct DeviceState {
    gateway: String,
    partition: Partition,
    /// Newest event time seen.
    last_ts: i64,
    /// Its gateway's active time (see [`Clock::active`]) at its last reading.
    #[serde(default)]
    last_active: i64,
    boot: u32,
    seq: u64,
    /// Per rule (config order); `None` until the rule's filter first matches.
    series: Vec<Option<Series>>,
}

/// Key of a gateway clock: gateway index and partition.
type ClockKey = (u32, Partition);

type FastMap<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// The operator.
#[derive(Debug)]
pub struct AlertOperator {
    id: String,
    rules: Vec<RuleSpec>,
    settings: AlertSettings,
    names: FastMap<String, u32>,
    devices: Vec<(String, DeviceState)>,
    /// Per device: a bit per silence rule with a timer entry (not stored).
    armed: Vec<u64>,
    /// Per device: the clock it is judged by (its gateway's, in its partition).
    homes: Vec<ClockKey>,
    /// Per device: changed since the last checkpoint.
    dirty: Vec<bool>,
    dirty_list: Vec<u32>,
    gateways: Vec<String>,
    gateway_index: FastMap<String, u32>,
    /// The gateway of the previous reading (most readings share it).
    last_gateway: Option<(String, u32)>,
    /// Clocks by gateway, then partition.
    clocks: Vec<Vec<Clock>>,
    dirty_clocks: Vec<ClockKey>,
    /// Distinct metrics the rules read, and per rule its slot among them.
    metrics: Vec<String>,
    slots: Vec<Option<usize>>,
    compiled: Vec<Compiled>,
    values: Vec<Option<f64>>,
    changes: AlertChanges,
    alert_slots: HashMap<String, usize>,
    open: i64,
    transitions: BTreeMap<(String, &'static str), u64>,
}

impl AlertOperator {
    pub fn new(rules: Vec<RuleSpec>, settings: AlertSettings) -> Self {
        let mut metrics: Vec<String> = Vec::new();
        let slots = rules
            .iter()
            .map(|r| match &r.kind {
                RuleKind::Zscore { metric, .. }
                | RuleKind::RateOfChange { metric, .. }
                | RuleKind::Flatline { metric, .. } => Some(slot_of(&mut metrics, metric)),
                _ => None,
            })
            .collect();
        let compiled = rules
            .iter()
            .map(|r| match &r.kind {
                RuleKind::Threshold { when, resolve_when, .. } => Compiled {
                    when: compile(when, &mut metrics),
                    resolve_when: resolve_when.as_ref().map(|e| compile(e, &mut metrics)).unwrap_or_default(),
                },
                _ => Compiled::default(),
            })
            .collect();
        Self {
            id: "alerts".into(),
            rules,
            settings,
            names: FastMap::default(),
            devices: Vec::new(),
            armed: Vec::new(),
            homes: Vec::new(),
            dirty: Vec::new(),
            dirty_list: Vec::new(),
            gateways: Vec::new(),
            gateway_index: FastMap::default(),
            last_gateway: None,
            clocks: Vec::new(),
            dirty_clocks: Vec::new(),
            metrics,
            slots,
            compiled,
            values: Vec::new(),
            changes: AlertChanges::default(),
            alert_slots: HashMap::new(),
            open: 0,
            transitions: BTreeMap::new(),
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// Device series held (devices times rules that apply to them).
    pub fn series(&self) -> usize {
        self.devices.iter().map(|(_, d)| d.series.iter().filter(|s| s.is_some()).count()).sum()
    }

    /// Alerts currently firing.
    pub fn open_alerts(&self) -> i64 {
        self.open
    }

    /// Transitions since the last call, by rule and transition.
    pub fn take_transitions(&mut self) -> BTreeMap<(String, &'static str), u64> {
        std::mem::take(&mut self.transitions)
    }

    /// Restores from stored state rows (`meta:rules`, `d:{device}`, `c:{gateway}:{partition}`).
    pub fn restore(&mut self, rows: Vec<(String, Vec<u8>)>) -> Result<(), String> {
        let mut stored_rules: Option<Vec<String>> = None;
        let mut devices = Vec::new();
        let mut clocks = Vec::new();
        for (key, blob) in rows {
            if key == "meta:rules" {
                stored_rules = Some(
                    serde_cbor::from_slice(&blob).map_err(|e| format!("alert state {key}: does not decode: {e}"))?,
                );
            } else if let Some(device) = key.strip_prefix("d:") {
                let st: DeviceState =
                    serde_cbor::from_slice(&blob).map_err(|e| format!("alert state {key}: does not decode: {e}"))?;
                devices.push((device.to_string(), st));
            } else if let Some(rest) = key.strip_prefix("c:") {
                let (gateway, partition) =
                    rest.rsplit_once(':').ok_or_else(|| format!("alert state {key}: not c:GATEWAY:PARTITION"))?;
                let partition: Partition =
                    partition.parse().map_err(|_| format!("alert state {key}: partition is not a number"))?;
                let (ts, arrival, active): (i64, i64, i64) =
                    serde_cbor::from_slice(&blob).map_err(|e| format!("alert state {key}: does not decode: {e}"))?;
                clocks.push((gateway.to_string(), partition, ts, arrival, active));
            }
        }
        // Rules may have changed since the state was written: carry series
        // over by rule name (and kind); new rules start fresh.
        let stored = stored_rules.unwrap_or_default();
        let mapping: Vec<Option<usize>> = self
            .rules
            .iter()
            .map(|r| stored.iter().position(|s| *s == format!("{}/{}", r.name, r.kind.name())))
            .collect();
        for (name, mut st) in devices {
            let old = std::mem::take(&mut st.series);
            st.series = mapping.iter().map(|m| m.and_then(|i| old.get(i).copied().flatten())).collect();
            let d = self.intern_device(&name, &st.gateway, st.partition);
            let g = self.intern_gateway(&st.gateway);
            self.homes[d as usize] = (g, st.partition);
            self.devices[d as usize].1 = st;
            self.arm_silence(d);
        }
        for (gateway, partition, ts, arrival, active) in clocks {
            let g = self.intern_gateway(&gateway);
            let c = self.clock_mut((g, partition));
            c.ts = (ts != i64::MIN).then_some(ts);
            c.arrival = arrival;
            c.active = active;
        }
        // Bring timers and postponements to where an uninterrupted run has
        // them: deadlines the clocks already passed are due (or postponed).
        if self.settings.silence_clock == SilenceClock::Gateway {
            for g in 0..self.clocks.len() {
                for p in 0..self.clocks[g].len() {
                    let key = (g as u32, p as Partition);
                    if let Some(ts) = self.clocks[g][p].ts {
                        self.fire_due(key, ts);
                    }
                    self.fire_postponed(key);
                    self.clocks[g][p].dirty = false;
                }
            }
            self.dirty_clocks.clear();
        }
        self.open = self
            .devices
            .iter()
            .flat_map(|(_, d)| d.series.iter().flatten())
            .filter(|s| matches!(s.life, Life::Firing { .. }))
            .count() as i64;
        // The rule list is written again at the next checkpoint.
        self.changes.state_upserts.push(("meta:rules".into(), self.rules_blob()));
        Ok(())
    }

    fn rules_blob(&self) -> Vec<u8> {
        let names: Vec<String> = self.rules.iter().map(|r| format!("{}/{}", r.name, r.kind.name())).collect();
        serde_cbor::to_vec(&names).unwrap_or_default()
    }

    fn intern_gateway(&mut self, gateway: &str) -> u32 {
        if let Some((name, g)) = &self.last_gateway
            && name == gateway
        {
            return *g;
        }
        let g = match self.gateway_index.get(gateway) {
            Some(g) => *g,
            None => {
                let g = self.gateways.len() as u32;
                self.gateways.push(gateway.to_string());
                self.gateway_index.insert(gateway.to_string(), g);
                g
            }
        };
        self.last_gateway = Some((gateway.to_string(), g));
        g
    }

    fn intern_device(&mut self, device: &str, gateway: &str, partition: Partition) -> u32 {
        if let Some(d) = self.names.get(device) {
            return *d;
        }
        let d = self.devices.len() as u32;
        let st = DeviceState {
            gateway: gateway.to_string(),
            partition,
            last_ts: i64::MIN,
            last_active: 0,
            boot: 0,
            seq: 0,
            series: vec![None; self.rules.len()],
        };
        self.devices.push((device.to_string(), st));
        self.armed.push(0);
        self.homes.push((u32::MAX, partition));
        self.dirty.push(false);
        self.names.insert(device.to_string(), d);
        d
    }

    fn clock_mut(&mut self, (g, p): ClockKey) -> &mut Clock {
        let per_gateway = &mut self.clocks;
        if per_gateway.len() <= g as usize {
            per_gateway.resize_with(g as usize + 1, Vec::new);
        }
        let parts = &mut per_gateway[g as usize];
        if parts.len() <= p as usize {
            parts.resize_with(p as usize + 1, Clock::default);
        }
        &mut parts[p as usize]
    }

    fn mark_dirty(&mut self, d: u32) {
        if !self.dirty[d as usize] {
            self.dirty[d as usize] = true;
            self.dirty_list.push(d);
        }
    }

    /// One reading, in log order.
    pub fn process(&mut self, partition: Partition, gateway: &str, ingest_ms: i64, r: &Reading) {
        let d = self.intern_device(&r.device, gateway, partition);
        let g = self.intern_gateway(gateway);
        let active = self.bump_arrival((g, partition), ingest_ms);
        let rules = std::mem::take(&mut self.rules);
        let mut values = std::mem::take(&mut self.values);
        values.clear();
        values.extend(self.metrics.iter().map(|m| r.metric(m)));
        {
            let (_, st) = &mut self.devices[d as usize];
            if st.gateway != gateway {
                st.gateway = gateway.to_string();
            }
            st.partition = partition;
        }
        self.homes[d as usize] = (g, partition);
        for (i, rule) in rules.iter().enumerate() {
            if !rule.filter.iter().all(|c| crate::views::operator::holds(c, r)) {
                continue;
            }
            let (_, st) = &mut self.devices[d as usize];
            let prev = (st.boot, st.seq, st.last_ts);
            let s = st.series[i].get_or_insert(Series { life: Life::Ok, mem: Memory::None });
            if let RuleKind::Silence { .. } = rule.kind {
                if let Life::Firing { started, .. } = s.life {
                    s.life = Life::Ok;
                    let msg = format!("reading again at {}", kappa_runtime::time::format_time(r.ts_ms));
                    self.resolve(rule, d, started, r.ts_ms, msg);
                }
                continue;
            }
            let x = self.slots[i].and_then(|k| values[k]);
            let Some(v) = judge(rule, &self.compiled[i], s, r, &values, x, prev) else { continue };
            self.step(rule, i, d, r.ts_ms, v);
        }
        self.rules = rules;
        self.values = values;
        {
            let (_, st) = &mut self.devices[d as usize];
            st.last_ts = st.last_ts.max(r.ts_ms);
            st.last_active = st.last_active.max(active);
            if r.boot != st.boot || r.seq > st.seq {
                st.boot = r.boot;
                st.seq = r.seq;
            }
        }
        self.mark_dirty(d);
        self.arm_silence(d);
        self.advance_clock((g, partition), r.ts_ms.saturating_sub(self.settings.gateway_lateness_ms));
        self.fire_postponed((g, partition));
    }

    /// A gateway's heartbeat as it appears in `partition`.
    pub fn heartbeat(&mut self, partition: Partition, gateway: &str, ts_ms: i64, ingest_ms: i64) {
        let g = self.intern_gateway(gateway);
        self.bump_arrival((g, partition), ingest_ms);
        self.advance_clock((g, partition), ts_ms);
        self.fire_postponed((g, partition));
    }

    /// A gateway's progress marker in `partition`: like a reading's time.
    pub fn progress(&mut self, partition: Partition, gateway: &str, ts_ms: i64, ingest_ms: i64) {
        let g = self.intern_gateway(gateway);
        self.bump_arrival((g, partition), ingest_ms);
        self.advance_clock((g, partition), ts_ms.saturating_sub(self.settings.gateway_lateness_ms));
        self.fire_postponed((g, partition));
    }

    /// The processor's global watermark (used only by the test-only clock).
    pub fn watermark(&mut self, watermark: i64) {
        if self.settings.silence_clock != SilenceClock::GlobalWatermarkForTests {
            return;
        }
        for g in 0..self.clocks.len() {
            for p in 0..self.clocks[g].len() {
                self.fire_due((g as u32, p as Partition), watermark);
            }
        }
    }

    /// Alert transitions or state are waiting to be committed.
    pub fn has_pending_output(&self) -> bool {
        !self.changes.alerts.is_empty()
    }

    /// Everything changed since the last call, for the checkpoint.
    pub fn take_changes(&mut self) -> AlertChanges {
        for d in std::mem::take(&mut self.dirty_list) {
            self.dirty[d as usize] = false;
            let (name, st) = &self.devices[d as usize];
            if let Ok(blob) = serde_cbor::ser::to_vec_packed(st) {
                self.changes.state_upserts.push((format!("d:{name}"), blob));
            }
        }
        for key in std::mem::take(&mut self.dirty_clocks) {
            let c = self.clock_mut(key);
            c.dirty = false;
            let value = (c.ts.unwrap_or(i64::MIN), c.arrival, c.active);
            let name = format!("c:{}:{}", self.gateways[key.0 as usize], key.1);
            self.changes.state_upserts.push((name, serde_cbor::to_vec(&value).unwrap_or_default()));
        }
        self.alert_slots.clear();
        std::mem::take(&mut self.changes)
    }

    /// Bytes of state one device's series take when stored, on average (for benchmarks).
    pub fn stored_bytes_per_series(&self) -> f64 {
        let series = self.series().max(1);
        let bytes: usize = self
            .devices
            .iter()
            .map(|(n, st)| n.len() + 2 + serde_cbor::ser::to_vec_packed(st).map_or(0, |b| b.len()))
            .sum();
        bytes as f64 / series as f64
    }

    /// Bytes of memory per series, counted from the structures (for benchmarks).
    pub fn memory_bytes_per_series(&self) -> f64 {
        let series = self.series().max(1);
        let per_device = std::mem::size_of::<(String, DeviceState)>()
            + std::mem::size_of::<(String, u32)>()
            + std::mem::size_of::<(i64, u32, u16)>() * 2;
        let bytes: usize = self
            .devices
            .iter()
            .map(|(n, st)| {
                per_device
                    + 2 * n.len()
                    + st.gateway.len()
                    + st.series.capacity() * std::mem::size_of::<Option<Series>>()
            })
            .sum();
        bytes as f64 / series as f64
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    const RULES: &str = r#"
[[rules]]
name = "hot"
kind = "threshold"
when = "temperature > 50"
for = "3s"
resolve_when = "temperature < 45"
severity = "critical"
[[rules]]
name = "z"
kind = "zscore"
metric = "temperature"
k = 6
warmup = 20
[[rules]]
name = "roc"
kind = "rate_of_change"
metric = "temperature"
max_per_second = 3
[[rules]]
name = "flat"
kind = "flatline"
metric = "temperature"
readings = 10
[[rules]]
name = "quiet"
kind = "silence"
after = "20s"
[[rules]]
name = "lost"
kind = "gap"
"#;

    fn op(clock: SilenceClock) -> AlertOperator {
        let doc: toml::Table = toml::from_str(RULES).unwrap();
        let tables: Vec<toml::Table> =
            doc["rules"].as_array().unwrap().iter().map(|v| v.as_table().unwrap().clone()).collect();
        let metrics = vec!["temperature".to_string()];
        let rules = super::super::spec::parse_rules(&tables, &metrics).unwrap();
        let routes = vec![Route { webhook: "ops".into(), min_severity: Severity::Critical, rules: vec![] }];
        let mut op = AlertOperator::new(
            rules,
            AlertSettings {
                gateway_lateness_ms: 2000,
                silence_quiet_ms: 5000,
                gateway_gap_ms: 5000,
                routes,
                silence_clock: clock,
            },
        );
        op.restore(Vec::new()).unwrap();
        op
    }

    fn reading(device: &str, seq: u64, ts: i64, t: f64) -> Reading {
        Reading {
            device: device.into(),
            boot: 1,
            seq,
            ts_ms: ts,
            schema: 2,
            metrics: [("temperature".to_string(), Some(t))].into(),
            tags: BTreeMap::new(),
        }
    }

    /// A gently varying signal: never anomalous by any rule above.
    fn normal(i: u64) -> f64 {
        20.0 + ((i * 7919) % 13) as f64 * 0.05
    }

    /// Readings arrive in real time: ingest time = event time.
    trait Put {
        fn put(&mut self, partition: Partition, gateway: &str, r: Reading);
    }

    impl Put for AlertOperator {
        fn put(&mut self, partition: Partition, gateway: &str, r: Reading) {
            self.process(partition, gateway, r.ts_ms, &r);
        }
    }

    fn feed(op: &mut AlertOperator, device: &str, gateway: &str, range: std::ops::Range<u64>, f: impl Fn(u64) -> f64) {
        for i in range {
            op.put(0, gateway, reading(device, i + 1, i as i64 * 1000, f(i)));
        }
    }

    fn fired(ch: &AlertChanges) -> Vec<(String, &str)> {
        ch.events.iter().map(|e| (e.alert_id.clone(), e.transition.as_str())).collect()
    }

    #[test]
    fn a_normal_signal_raises_nothing() {
        let mut op = op(SilenceClock::Gateway);
        feed(&mut op, "d1", "gw", 0..500, normal);
        assert!(op.take_changes().events.is_empty());
    }

    #[test]
    fn threshold_waits_for_its_duration_and_resolves_with_hysteresis() {
        let mut op = op(SilenceClock::Gateway);
        // 2 s above 50: too short. Then 5 s above: fires 3 s in, from when it began.
        let f = |i: u64| match i {
            30..=31 => 55.0,
            40..=44 => 55.0,
            45..=49 => 47.0, // between the thresholds: still firing
            _ => normal(i),
        };
        feed(&mut op, "d1", "gw", 0..60, f);
        let ch = op.take_changes();
        let hot: Vec<_> = ch.events.iter().filter(|e| e.alert_id.starts_with("hot:")).collect();
        assert_eq!(hot.len(), 2, "{hot:?}");
        assert_eq!(
            (hot[0].alert_id.as_str(), hot[0].transition.as_str(), hot[0].ts_ms),
            ("hot:d1:40000", "fired", 43_000)
        );
        assert_eq!((hot[1].transition.as_str(), hot[1].ts_ms), ("resolved", 50_000));
        let a = ch.alerts.iter().find(|a| a.id == "hot:d1:40000").unwrap();
        assert_eq!((a.state.as_str(), a.resolved_ms, a.severity), ("resolved", Some(50_000), Severity::Critical));
        // Critical goes to the webhook; both transitions, with the same payload id.
        let hooks: Vec<_> = ch.outbox.iter().map(|o| (o.alert_id.as_str(), o.transition.as_str())).collect();
        assert_eq!(hooks, [("hot:d1:40000", "fired"), ("hot:d1:40000", "resolved")]);
    }

    #[test]
    fn zscore_rate_flatline_and_gap_catch_their_anomalies() {
        let mut op = op(SilenceClock::Gateway);
        let f = |i: u64| match i {
            100 => 40.0,       // spike
            200..=229 => 21.0, // stuck
            _ => normal(i),
        };
        feed(&mut op, "d1", "gw", 0..300, f);
        // Four readings lost between seq 300 and 305.
        op.put(0, "gw", reading("d1", 305, 304_000, normal(304)));
        feed(&mut op, "d1", "gw", 305..320, normal);
        let ch = op.take_changes();
        let ids: Vec<_> = fired(&ch).into_iter().filter(|(_, t)| *t == "fired").map(|(id, _)| id).collect();
        assert!(ids.contains(&"z:d1:100000".to_string()), "{ids:?}");
        assert!(ids.contains(&"roc:d1:100000".to_string()), "{ids:?}");
        assert!(ids.contains(&"flat:d1:209000".to_string()), "{ids:?}");
        assert!(ids.contains(&"lost:d1:304000".to_string()), "{ids:?}");
        let gap = ch.alerts.iter().find(|a| a.id == "lost:d1:304000").unwrap();
        assert_eq!(gap.value, Some(4.0));
        assert_eq!(gap.state, "resolved", "the next contiguous reading resolves a gap");
    }

    #[test]
    fn silence_fires_on_the_gateway_clock_and_resolves_on_return() {
        let mut op = op(SilenceClock::Gateway);
        // d1 stops at t=9 s; d2 on the same gateway goes on.
        feed(&mut op, "d1", "gw", 0..10, normal);
        feed(&mut op, "d2", "gw", 0..40, normal);
        let ch = op.take_changes();
        // Deadline 9 + 20 = 29 s; the clock passes it when d2 reaches 31 s (2 s lateness).
        assert_eq!(fired(&ch), [("quiet:d1:29000".to_string(), "fired")]);
        // Back at 40 s with the next sequence number (it was off, not losing readings).
        op.put(0, "gw", reading("d1", 11, 40_000, normal(40)));
        let ch = op.take_changes();
        assert_eq!(fired(&ch), [("quiet:d1:29000".to_string(), "resolved")]);
    }

    #[test]
    fn an_offline_gateway_does_not_make_its_devices_silent() {
        let mut op = op(SilenceClock::Gateway);
        // gw-a goes offline at 10 s; gw-b goes on to 100 s (both in partition 0).
        for i in 0..100 {
            if i < 10 {
                op.put(0, "gw-a", reading("a1", i + 1, i as i64 * 1000, normal(i)));
            }
            op.put(0, "gw-b", reading("b1", i + 1, i as i64 * 1000, normal(i)));
        }
        assert!(fired(&op.take_changes()).is_empty());
        // gw-a returns with its backlog, oldest first: no false alert.
        feed(&mut op, "a1", "gw-a", 10..100, normal);
        assert!(fired(&op.take_changes()).is_empty());
        // The negative control: clocked by the global watermark, the same
        // data declares a1 silent while its gateway is away.
        let mut naive = super::tests::op(SilenceClock::GlobalWatermarkForTests);
        for i in 0..100 {
            if i < 10 {
                naive.put(0, "gw-a", reading("a1", i + 1, i as i64 * 1000, normal(i)));
            }
            naive.put(0, "gw-b", reading("b1", i + 1, i as i64 * 1000, normal(i)));
        }
        naive.watermark(90_000);
        assert_eq!(fired(&naive.take_changes()), [("quiet:a1:29000".to_string(), "fired")]);
    }

    /// After an outage two devices send their backlogs, one faster: the
    /// gateway's clock runs ahead of the slow one, which is still arriving,
    /// so it is not silent. Without the arrival check it would be.
    #[test]
    fn a_device_still_sending_its_backlog_is_not_silent() {
        fn run(quiet_ms: i64) -> Vec<(String, String)> {
            let mut op = op(SilenceClock::Gateway);
            op.settings.silence_quiet_ms = quiet_ms;
            for i in 0..10u64 {
                op.put(0, "gw", reading("fast", i + 1, i as i64 * 1000, normal(i)));
                op.put(0, "gw", reading("slow", i + 1, i as i64 * 1000, normal(i)));
            }
            // Back at 200 s (ingest), each backlog one record per ms; the slow
            // device gets one reading out for every three of the fast one's.
            let (mut slow, mut at) = (10u64, 200_000i64);
            for i in 10..100u64 {
                at += 1;
                let r = reading("fast", i + 1, i as i64 * 1000, normal(i));
                op.process(0, "gw", at, &r);
                if i % 3 == 0 {
                    at += 1;
                    let r = reading("slow", slow + 1, slow as i64 * 1000, normal(slow));
                    op.process(0, "gw", at, &r);
                    slow += 1;
                }
            }
            while slow < 100 {
                at += 1;
                let r = reading("slow", slow + 1, slow as i64 * 1000, normal(slow));
                op.process(0, "gw", at, &r);
                slow += 1;
            }
            op.take_changes().events.iter().map(|e| (e.alert_id.clone(), e.transition.clone())).collect()
        }
        assert!(run(5_000).is_empty(), "{:?}", run(5_000));
        // The negative control: without the arrival check the slow device is flagged.
        assert!(run(0).iter().any(|(id, t)| id.starts_with("quiet:slow:") && t == "fired"), "{:?}", run(0));
    }

    #[test]
    fn heartbeats_advance_the_clock_when_every_device_is_quiet() {
        let mut op = op(SilenceClock::Gateway);
        feed(&mut op, "d1", "gw", 0..10, normal);
        op.heartbeat(0, "gw", 28_000, 28_000);
        assert!(fired(&op.take_changes()).is_empty());
        // Another partition's heartbeat says nothing about partition 0.
        op.heartbeat(1, "gw", 60_000, 60_000);
        assert!(fired(&op.take_changes()).is_empty());
        op.heartbeat(0, "gw", 29_000, 29_000);
        assert_eq!(fired(&op.take_changes()), [("quiet:d1:29000".to_string(), "fired")]);
    }

    #[test]
    fn restored_state_continues_exactly() {
        let f = |i: u64| match i {
            50 => 45.0,
            120..=135 => 60.0,
            _ => normal(i),
        };
        let mut whole = op(SilenceClock::Gateway);
        feed(&mut whole, "d1", "gw", 0..200, f);
        let all = whole.take_changes();

        let mut first = op(SilenceClock::Gateway);
        feed(&mut first, "d1", "gw", 0..125, f);
        let part1 = first.take_changes();
        let mut second = op(SilenceClock::Gateway);
        second.restore(part1.state_upserts.clone()).unwrap();
        feed(&mut second, "d1", "gw", 125..200, f);
        let part2 = second.take_changes();
        let split: Vec<_> = part1.events.iter().chain(&part2.events).cloned().collect();
        assert_eq!(split, all.events);
        assert!(!all.events.is_empty());
    }

    #[test]
    fn state_per_series_is_small() {
        let mut op = op(SilenceClock::Gateway);
        for d in 0..100 {
            feed(&mut op, &format!("sim-{d:05}"), "gw", 0..50, normal);
        }
        assert_eq!(op.series(), 600);
        assert!(op.stored_bytes_per_series() <= 256.0, "{}", op.stored_bytes_per_series());
        assert!(op.memory_bytes_per_series() <= 256.0, "{}", op.memory_bytes_per_series());
    }
}
