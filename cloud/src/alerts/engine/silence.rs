//! Silence on the gateway clock: per gateway and partition, the clock that
//! only the gateway's own records and heartbeats move, and the deadline
//! timers that fire when it passes a device's last reading plus `after`.

use super::*;

/// A gateway's clock in one partition, its silence timers, and whether it
/// changed since the last checkpoint.
#[derive(Debug)]
pub(super) struct Clock {
    pub(super) ts: Option<i64>,
    /// The newest ingest time of the gateway's records in this partition.
    pub(super) arrival: i64,
    /// How long (cloud clock) the gateway has been sending in this
    /// partition: ingest time that advances only while its records flow;
    /// a gap longer than `gateway_gap_ms` counts as that much.
    pub(super) active: i64,
    pub(super) dirty: bool,
    /// The earliest deadline in `timers` (MAX when none).
    pub(super) next: i64,
    /// Devices past their deadline that arrived too recently to be called
    /// silent: (active time at which to look again, device, rule).
    pub(super) postponed: BTreeSet<(i64, u32, u16)>,
    /// Silence deadlines: (deadline, device, rule). At most one entry per
    /// device and silence rule; an entry may be stale (the device read since)
    /// and is moved to the current deadline when it comes up.
    pub(super) timers: BTreeSet<(i64, u32, u16)>,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            ts: None,
            arrival: i64::MIN,
            active: 0,
            dirty: false,
            next: i64::MAX,
            postponed: BTreeSet::new(),
            timers: BTreeSet::new(),
        }
    }
}

impl AlertOperator {
    pub(super) fn advance_clock(&mut self, key: ClockKey, ts: i64) {
        let c = self.clock_mut(key);
        if c.ts.is_some_and(|t| ts <= t) {
            return;
        }
        c.ts = Some(ts);
        if !c.dirty {
            c.dirty = true;
            self.dirty_clocks.push(key);
        }
        if self.settings.silence_clock == SilenceClock::Gateway {
            self.fire_due(key, ts);
        }
    }

    /// Fires every silence whose deadline `clock` has passed, moving stale
    /// timer entries to their device's current deadline first.
    pub(super) fn fire_due(&mut self, key: ClockKey, clock: i64) {
        if self.clock_mut(key).next > clock {
            return;
        }
        loop {
            let c = self.clock_mut(key);
            let Some(&(deadline, d, i)) = c.timers.first() else {
                c.next = i64::MAX;
                return;
            };
            if deadline > clock {
                c.next = deadline;
                return;
            }
            c.timers.pop_first();
            self.armed[d as usize] &= !(1u64 << i);
            let Some(current) = self.deadline(d, i as usize) else { continue };
            let home = self.home(d);
            if current != deadline || home != key {
                // The device read since (or moved): its timer goes where it belongs now.
                self.armed[d as usize] |= 1u64 << i;
                self.add_timer(home, (current, d, i));
                continue;
            }
            let quiet_since = self.devices[d as usize].1.last_active.saturating_add(self.settings.silence_quiet_ms);
            if self.settings.silence_clock == SilenceClock::Gateway && quiet_since > self.clock_mut(key).active {
                // It arrived too recently: probably still sending a backlog.
                self.armed[d as usize] |= 1u64 << i;
                self.postpone(key, (quiet_since, d, i));
                continue;
            }
            self.fire_silence(d, i, deadline);
        }
    }

    pub(super) fn fire_silence(&mut self, d: u32, i: u16, deadline: i64) {
        let rule = self.rules[i as usize].clone();
        let last = self.devices[d as usize].1.last_ts;
        if let Some(s) = self.devices[d as usize].1.series[i as usize].as_mut() {
            s.life = Life::Firing { started: deadline, clear_since: None };
        }
        self.mark_dirty(d);
        let msg = format!(
            "no reading since {} ({} of event time)",
            kappa_runtime::time::format_time(last),
            kappa_runtime::time::format_span(deadline - last)
        );
        self.fire(&rule, d, deadline, deadline, None, msg);
    }

    pub(super) fn postpone(&mut self, key: ClockKey, entry: (i64, u32, u16)) {
        self.clock_mut(key).postponed.insert(entry);
    }

    /// A record of the gateway appended at `ingest_ms` in this partition:
    /// moves its arrival and active times. Returns the active time.
    pub(super) fn bump_arrival(&mut self, key: ClockKey, ingest_ms: i64) -> i64 {
        let gap = self.settings.gateway_gap_ms;
        let c = self.clock_mut(key);
        if ingest_ms > c.arrival {
            if c.arrival != i64::MIN {
                c.active = c.active.saturating_add((ingest_ms - c.arrival).min(gap));
            }
            c.arrival = ingest_ms;
            if !c.dirty {
                c.dirty = true;
                self.dirty_clocks.push(key);
            }
        }
        self.clock_mut(key).active
    }

    /// Postponed devices that stayed quiet long enough are silent now.
    pub(super) fn fire_postponed(&mut self, key: ClockKey) {
        loop {
            let c = self.clock_mut(key);
            let active = c.active;
            let Some(&(due, d, i)) = c.postponed.first() else { return };
            if due > active {
                return;
            }
            c.postponed.pop_first();
            let clock = c.ts.unwrap_or(i64::MIN);
            self.armed[d as usize] &= !(1u64 << i);
            let Some(current) = self.deadline(d, i as usize) else { continue };
            let home = self.home(d);
            let quiet_since = self.devices[d as usize].1.last_active.saturating_add(self.settings.silence_quiet_ms);
            if home != key || current > clock {
                // It read since (its deadline moved) or moved: back to a timer.
                self.armed[d as usize] |= 1u64 << i;
                self.add_timer(home, (current, d, i));
            } else if quiet_since > active {
                self.armed[d as usize] |= 1u64 << i;
                self.postpone(key, (quiet_since, d, i));
            } else {
                self.fire_silence(d, i, current);
            }
        }
    }

    /// The clock device `d` is judged by: its gateway's, in its partition.
    pub(super) fn home(&self, d: u32) -> ClockKey {
        self.homes[d as usize]
    }

    /// Device `d`'s silence deadline for rule `i`, if the rule applies and is not firing.
    pub(super) fn deadline(&self, d: u32, i: usize) -> Option<i64> {
        let RuleKind::Silence { after_ms } = self.rules.get(i)?.kind else { return None };
        let (_, st) = &self.devices[d as usize];
        let s = st.series[i].as_ref()?;
        (s.life == Life::Ok && st.last_ts != i64::MIN).then(|| st.last_ts.saturating_add(after_ms))
    }

    /// Gives each of device `d`'s silence rules a timer entry if it has none.
    pub(super) fn arm_silence(&mut self, d: u32) {
        for i in 0..self.rules.len().min(64) {
            if self.armed[d as usize] & (1u64 << i) != 0 {
                continue;
            }
            let Some(deadline) = self.deadline(d, i) else { continue };
            let key = self.home(d);
            self.armed[d as usize] |= 1u64 << i;
            self.add_timer(key, (deadline, d, i as u16));
        }
    }

    pub(super) fn add_timer(&mut self, key: ClockKey, entry: (i64, u32, u16)) {
        let c = self.clock_mut(key);
        c.next = c.next.min(entry.0);
        c.timers.insert(entry);
    }
}
