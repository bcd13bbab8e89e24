//! An alert's lifecycle: a `(rule, device)` series moves ok → pending →
//! firing → resolved, and every transition is recorded once, with its
//! outbox deliveries.

use super::*;

impl AlertOperator {
    /// Moves a series through its lifecycle after a verdict.
    pub(super) fn step(&mut self, rule: &RuleSpec, i: usize, d: u32, ts: i64, v: Verdict) {
        let for_ms = match &rule.kind {
            RuleKind::Threshold { for_ms, .. } => *for_ms,
            _ => 0,
        };
        let (_, st) = &mut self.devices[d as usize];
        let Some(s) = st.series[i].as_mut() else { return };
        match s.life {
            Life::Ok | Life::Pending { .. } if !v.active => s.life = Life::Ok,
            Life::Ok | Life::Pending { .. } => {
                let since = match s.life {
                    Life::Pending { since } => since,
                    _ => ts,
                };
                if ts - since >= for_ms {
                    s.life = Life::Firing { started: since, clear_since: None };
                    self.fire(rule, d, since, ts, v.value, describe(rule, v.detail));
                } else {
                    s.life = Life::Pending { since };
                }
            }
            Life::Firing { started, clear_since } => {
                if v.clear {
                    let cs = clear_since.unwrap_or(ts);
                    if ts - cs >= rule.clear_for_ms {
                        s.life = Life::Ok;
                        self.resolve(rule, d, started, ts, describe(rule, v.detail));
                    } else {
                        s.life = Life::Firing { started, clear_since: Some(cs) };
                    }
                } else {
                    s.life = Life::Firing { started, clear_since: None };
                }
            }
        }
    }

    pub(super) fn fire(&mut self, rule: &RuleSpec, d: u32, started: i64, ts: i64, value: Option<f64>, message: String) {
        let (device, st) = &self.devices[d as usize];
        let rec = AlertRecord {
            id: format!("{}:{}:{}", rule.name, device, started),
            rule: rule.name.clone(),
            kind: rule.kind.name().to_string(),
            severity: rule.severity,
            device: device.clone(),
            gateway: st.gateway.clone(),
            state: "firing".into(),
            started_ms: started,
            resolved_ms: None,
            value,
            message,
        };
        self.open += 1;
        self.record(rec, "fired", ts);
    }

    pub(super) fn resolve(&mut self, rule: &RuleSpec, d: u32, started: i64, ts: i64, message: String) {
        let device = &self.devices[d as usize].0;
        let id = format!("{}:{}:{}", rule.name, device, started);
        // The firing version is either in this checkpoint's changes or stored;
        // the store keeps what resolving does not change.
        let mut rec = match self.alert_slots.get(&id) {
            Some(&slot) => self.changes.alerts[slot].clone(),
            None => AlertRecord {
                id: id.clone(),
                rule: rule.name.clone(),
                kind: rule.kind.name().to_string(),
                severity: rule.severity,
                device: device.clone(),
                gateway: self.devices[d as usize].1.gateway.clone(),
                state: "firing".into(),
                started_ms: started,
                resolved_ms: None,
                value: None,
                message: String::new(),
            },
        };
        rec.state = "resolved".into();
        rec.resolved_ms = Some(ts);
        self.open -= 1;
        let mut rec_msg = rec.clone();
        rec_msg.message = message;
        self.record_transition(&rec_msg, "resolved", ts);
        self.upsert(rec);
    }

    pub(super) fn record(&mut self, rec: AlertRecord, transition: &'static str, ts: i64) {
        self.record_transition(&rec, transition, ts);
        self.upsert(rec);
    }

    pub(super) fn upsert(&mut self, rec: AlertRecord) {
        match self.alert_slots.get(&rec.id) {
            Some(&slot) => self.changes.alerts[slot] = rec,
            None => {
                self.alert_slots.insert(rec.id.clone(), self.changes.alerts.len());
                self.changes.alerts.push(rec);
            }
        }
    }

    pub(super) fn record_transition(&mut self, rec: &AlertRecord, transition: &'static str, ts: i64) {
        *self.transitions.entry((rec.rule.clone(), transition)).or_default() += 1;
        self.changes.events.push(AlertEvent {
            alert_id: rec.id.clone(),
            transition: transition.into(),
            ts_ms: ts,
            message: rec.message.clone(),
        });
        let payload = serde_json::json!({
            "id": rec.id,
            "transition": transition,
            "at_ms": ts,
            "rule": rec.rule,
            "kind": rec.kind,
            "severity": rec.severity,
            "device": rec.device,
            "gateway": rec.gateway,
            "started_ms": rec.started_ms,
            "resolved_ms": rec.resolved_ms,
            "value": rec.value,
            "message": rec.message,
        })
        .to_string();
        for route in &self.settings.routes {
            if rec.severity >= route.min_severity && (route.rules.is_empty() || route.rules.contains(&rec.rule)) {
                self.changes.outbox.push(OutboxItem {
                    webhook: route.webhook.clone(),
                    alert_id: rec.id.clone(),
                    transition: transition.into(),
                    payload: payload.clone(),
                });
            }
        }
    }
}
