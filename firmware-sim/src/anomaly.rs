//! Labelled anomalies: what a scenario injects, where, and the record of it.
//!
//! With `--anomaly-every N`, each device gets one anomaly in every slot of N
//! readings after a warm-up, at a seeded offset, of a kind chosen from the
//! enabled kinds by a seeded hash (so the same seed gives the same plan).
//! Anomalies act on the temperature sensor or on delivery:
//!
//! | kind | what the device does | span |
//! |---|---|---|
//! | `spike` | one reading off by ±15 °C | that reading |
//! | `step` | ±10 °C for 30 readings | those readings, to the first normal one |
//! | `drift` | +0.5 °C more every reading for 120 readings | the ramp |
//! | `stuck` | the same temperature for 40 readings | those readings |
//! | `dropout` | 5 readings sampled and lost (sequence gap) | the lost readings |
//! | `offline` | no readings for 60 reading intervals (no sequence gap) | the quiet interval |
//!
//! `--gateway-offline AT+FOR` makes every device keep its readings (in its
//! outbox) instead of publishing from reading AT for FOR readings, then send
//! the backlog: what devices see when their gateway is down. It is recorded
//! with device `*`.
//!
//! A span is `[start_ms, end_ms)` in event time: from the first affected
//! reading to the first unaffected one.

use serde::{Deserialize, Serialize};

use crate::signal::Rng;

/// A kind of injected anomaly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    Spike,
    Step,
    Drift,
    Stuck,
    Dropout,
    Offline,
    GatewayOffline,
}

impl Kind {
    /// The device kinds, in the order `--anomaly-kinds` lists them.
    pub const DEVICE: [Kind; 6] = [Kind::Spike, Kind::Step, Kind::Drift, Kind::Stuck, Kind::Dropout, Kind::Offline];

    pub fn parse(s: &str) -> Option<Self> {
        Self::DEVICE.into_iter().find(|k| k.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Spike => "spike",
            Self::Step => "step",
            Self::Drift => "drift",
            Self::Stuck => "stuck",
            Self::Dropout => "dropout",
            Self::Offline => "offline",
            Self::GatewayOffline => "gateway_offline",
        }
    }

    /// Readings (reading intervals) the anomaly lasts.
    pub fn readings(self) -> u64 {
        match self {
            Self::Spike => 1,
            Self::Step => 30,
            Self::Drift => 120,
            Self::Stuck => 40,
            Self::Dropout => 5,
            Self::Offline => 60,
            Self::GatewayOffline => 0,
        }
    }
}

/// What the firmware does with one sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Fault {
    None,
    /// Add this to the temperature.
    Offset(f32),
    /// Report the temperature the sensor last reported.
    Hold,
    /// Sample (the sequence number advances) but lose it.
    Lose,
    /// Do not sample at all (the device is off).
    Off,
}

/// One planned anomaly of one device, in reading indexes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    pub kind: Kind,
    pub start: u64,
    pub sign: f32,
}

/// The anomaly scenario of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Scenario {
    /// One anomaly per this many readings per device (0: none).
    pub every: u64,
    /// Readings before the first slot (detectors warm up).
    pub warmup: u64,
    pub kinds: Vec<Kind>,
    /// All devices hold their readings from reading `.0` for `.1` readings.
    pub gateway_offline: Option<(u64, u64)>,
}

impl Scenario {
    /// Device `index`'s anomaly in slot `slot` (slot `k` covers readings
    /// `warmup + k * every ..`), if any. Each device rotates through the
    /// kinds from a seeded starting point, so every kind gets the same share
    /// of the fleet; the offset within the slot leaves a quiet margin of a
    /// third of the slot before the next one.
    pub fn planned(&self, seed: u64, index: u32, slot: u64) -> Option<Planned> {
        if self.every == 0 || self.kinds.is_empty() {
            return None;
        }
        let device_seed = seed ^ 0x5EED_A110_u64.wrapping_mul(u64::from(index) + 1);
        let first = Rng::new(device_seed).next_u64() % self.kinds.len() as u64;
        let kind = self.kinds[((first + slot) % self.kinds.len() as u64) as usize];
        let mut rng = Rng::new(device_seed ^ slot.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1));
        let room = self.every.saturating_sub(kind.readings() + self.every / 3).max(1);
        let start = self.warmup + slot * self.every + rng.next_u64() % room;
        let sign = if rng.unit() < 0.5 { -1.0 } else { 1.0 };
        let overlaps_outage =
            self.gateway_offline.is_some_and(|(at, len)| start < at + len + 30 && at < start + kind.readings() + 30);
        (!overlaps_outage).then_some(Planned { kind, start, sign })
    }

    /// Device `index`'s anomalies in the slots that fit in `readings` readings.
    pub fn plan(&self, seed: u64, index: u32, readings: u64) -> Vec<Planned> {
        if self.every == 0 {
            return Vec::new();
        }
        (0..self.slots_within(readings)).filter_map(|k| self.planned(seed, index, k)).collect()
    }

    /// Slots that end within `readings` readings.
    fn slots_within(&self, readings: u64) -> u64 {
        readings.saturating_sub(self.warmup) / self.every.max(1)
    }

    /// The slot reading `i` falls in.
    fn slot(&self, i: u64) -> Option<u64> {
        (self.every > 0 && i >= self.warmup).then(|| (i - self.warmup) / self.every)
    }

    /// Whether reading `i` is held back because the gateway is down.
    pub fn gateway_down(&self, i: u64) -> bool {
        self.gateway_offline.is_some_and(|(at, len)| (at..at + len).contains(&i))
    }
}

/// A device's plan, applied reading by reading (computed a slot at a time,
/// so a run may be endless).
#[derive(Debug, Clone)]
pub struct DevicePlan {
    scenario: Scenario,
    seed: u64,
    index: u32,
    /// The run's length in readings, if it has one: no anomaly is started
    /// that the run would cut short.
    limit: Option<u64>,
    current: Option<(u64, Option<Planned>)>,
}

impl DevicePlan {
    pub fn new(scenario: Scenario, seed: u64, index: u32, limit: Option<u64>) -> Self {
        Self { scenario, seed, index, limit, current: None }
    }

    /// The anomalies injected in the first `readings` readings (one in
    /// progress when an endless run stops is included).
    pub fn started_before(&self, readings: u64) -> Vec<Planned> {
        let slots = self
            .scenario
            .slots_within(self.limit.unwrap_or(u64::MAX))
            .min(readings.saturating_sub(self.scenario.warmup).div_ceil(self.scenario.every.max(1)));
        (0..slots)
            .filter_map(|k| self.scenario.planned(self.seed, self.index, k))
            .filter(|p| p.start < readings)
            .collect()
    }

    /// The fault on reading `i`.
    pub fn fault(&mut self, i: u64) -> Fault {
        let Some(slot) = self.scenario.slot(i) else { return Fault::None };
        if self.limit.is_some_and(|l| slot >= self.scenario.slots_within(l)) {
            return Fault::None;
        }
        let planned = match self.current {
            Some((s, p)) if s == slot => p,
            _ => {
                let p = self.scenario.planned(self.seed, self.index, slot);
                self.current = Some((slot, p));
                p
            }
        };
        let Some(p) = planned.filter(|p| (p.start..p.start + p.kind.readings()).contains(&i)) else {
            return Fault::None;
        };
        let k = (i - p.start) as f32;
        match p.kind {
            Kind::Spike => Fault::Offset(15.0 * p.sign),
            Kind::Step => Fault::Offset(10.0 * p.sign),
            Kind::Drift => Fault::Offset(0.5 * (k + 1.0)),
            Kind::Stuck => Fault::Hold,
            Kind::Dropout => Fault::Lose,
            Kind::Offline => Fault::Off,
            Kind::GatewayOffline => Fault::None,
        }
    }
}

/// One injected anomaly, as the ground-truth file records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AnomalyTruth {
    /// The device, or `*` for every device (gateway offline).
    pub device: String,
    pub kind: Kind,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl AnomalyTruth {
    /// The record of `p` for a device whose reading `i` has event time `start_ms + i * interval_ms`.
    pub fn of(device: &str, p: &Planned, start_ms: i64, interval_ms: i64) -> Self {
        Self {
            device: device.to_string(),
            kind: p.kind,
            start_ms: start_ms + p.start as i64 * interval_ms,
            end_ms: start_ms + (p.start + p.kind.readings()) as i64 * interval_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario() -> Scenario {
        Scenario { every: 300, warmup: 60, kinds: Kind::DEVICE.to_vec(), gateway_offline: None }
    }

    #[test]
    fn plans_are_seeded_separated_and_cover_every_kind() {
        let s = scenario();
        assert_eq!(s.plan(7, 3, 1500), s.plan(7, 3, 1500));
        assert_ne!(s.plan(7, 3, 1500), s.plan(8, 3, 1500));
        let mut seen = std::collections::HashSet::new();
        for d in 0..20 {
            let plan = s.plan(7, d, 1500);
            assert_eq!(plan.len(), 4);
            for w in plan.windows(2) {
                assert!(w[0].start + w[0].kind.readings() + 100 <= w[1].start, "{w:?}");
            }
            seen.extend(plan.iter().map(|p| p.kind));
        }
        assert_eq!(seen.len(), 6);
    }

    #[test]
    fn faults_follow_the_plan() {
        let s = scenario();
        for d in 0..10 {
            let mut plan = DevicePlan::new(s.clone(), 7, d, Some(1500));
            for p in s.plan(7, d, 1500) {
                assert_eq!(plan.fault(p.start.saturating_sub(1)), Fault::None);
                let f = plan.fault(p.start);
                match p.kind {
                    Kind::Spike => assert_eq!(f, Fault::Offset(15.0 * p.sign)),
                    Kind::Step => assert_eq!(f, Fault::Offset(10.0 * p.sign)),
                    Kind::Drift => {
                        assert_eq!(f, Fault::Offset(0.5));
                        assert_eq!(plan.fault(p.start + 119), Fault::Offset(60.0));
                    }
                    Kind::Stuck => assert_eq!(f, Fault::Hold),
                    Kind::Dropout => assert_eq!(plan.fault(p.start + 4), Fault::Lose),
                    Kind::Offline => assert_eq!(f, Fault::Off),
                    Kind::GatewayOffline => unreachable!(),
                }
                assert_eq!(plan.fault(p.start + p.kind.readings()), Fault::None);
            }
        }
    }

    #[test]
    fn an_endless_run_has_a_plan_without_holding_it() {
        let mut plan = DevicePlan::new(scenario(), 3, 0, None);
        let faulty = (0..3_000_000u64).filter(|i| plan.fault(*i) != Fault::None).count();
        assert!(faulty > 10_000, "{faulty}");
    }

    #[test]
    fn no_device_anomaly_overlaps_a_gateway_outage() {
        let s = Scenario { gateway_offline: Some((600, 60)), ..scenario() };
        for d in 0..50 {
            for p in s.plan(1, d, 1500) {
                assert!(p.start + p.kind.readings() + 30 <= 600 || p.start >= 690, "{p:?}");
            }
        }
        assert!(s.gateway_down(600) && s.gateway_down(659) && !s.gateway_down(660));
    }
}
