//! Judging one reading against one rule: compiled filter expressions, the
//! per-kind statistics (threshold, z-score, rate of change, flatline, gap),
//! and the words of an alert's message.

use super::*;

/// The verdict of one reading for one rule. The message is only written
/// when the alert changes state.
pub(super) struct Verdict {
    pub(super) active: bool,
    pub(super) clear: bool,
    pub(super) value: Option<f64>,
    pub(super) detail: Detail,
}

/// What a message says, kept as numbers until it is needed.
#[derive(Debug, Clone, Copy)]
pub(super) enum Detail {
    Holds(Option<f64>),
    Sigma { x: f64, z: f64, mean: f64 },
    Rate(f64),
    Stuck { v: f64, n: u32, ms: i64 },
    Missing { missing: u64, from: u64, to: u64, boot: u32 },
}

pub(super) fn describe(rule: &RuleSpec, d: Detail) -> String {
    let metric = match &rule.kind {
        RuleKind::Zscore { metric, .. } | RuleKind::RateOfChange { metric, .. } | RuleKind::Flatline { metric, .. } => {
            metric.as_str()
        }
        _ => "",
    };
    let shown = kappa_common::reading::as_measured;
    match d {
        Detail::Holds(Some(v)) => format!("condition holds (value {})", shown(v)),
        Detail::Holds(None) => "condition holds".into(),
        Detail::Sigma { x, z, mean } => {
            format!("{metric} {} is {z:.1} sigma from its running mean {mean:.3}", shown(x))
        }
        Detail::Rate(rate) => match &rule.kind {
            RuleKind::RateOfChange { max_per_second, .. } => {
                format!("{metric} changed {rate:.3}/s (limit {max_per_second}/s)")
            }
            _ => format!("{metric} changed {rate:.3}/s"),
        },
        Detail::Stuck { v, n, ms } => {
            format!("{metric} stuck at {} for {n} readings ({})", shown(v), kappa_runtime::time::format_span(ms))
        }
        Detail::Missing { missing, from, to, boot } => {
            format!("{missing} readings missing between seq {from} and {to} (boot {boot})")
        }
    }
}

/// Per condition of an expression (same shape as `Expr::any_of`): the slot
/// of its metric among the values read once per reading, if it is a metric.
pub(super) type ExprSlots = Vec<Vec<Option<usize>>>;

/// A threshold rule's expressions with their metric slots.
#[derive(Debug, Clone, Default)]
pub(super) struct Compiled {
    pub(super) when: ExprSlots,
    pub(super) resolve_when: ExprSlots,
}

pub(super) fn slot_of(metrics: &mut Vec<String>, m: &str) -> usize {
    match metrics.iter().position(|x| x == m) {
        Some(i) => i,
        None => {
            metrics.push(m.to_string());
            metrics.len() - 1
        }
    }
}

pub(super) fn compile(e: &Expr, metrics: &mut Vec<String>) -> ExprSlots {
    e.any_of
        .iter()
        .map(|all| {
            all.iter()
                .map(|c| match &c.field {
                    Field::Metric(m) => Some(slot_of(metrics, m)),
                    _ => None,
                })
                .collect()
        })
        .collect()
}

/// Evaluates an expression: (whether the reading carries any metric it reads,
/// whether it holds, the first metric value it reads). A missing value never matches.
pub(super) fn eval(e: &Expr, slots: &ExprSlots, values: &[Option<f64>], r: &Reading) -> (bool, bool, Option<f64>) {
    let (mut mentioned, mut first) = (false, None);
    let mut any = false;
    for (all, all_slots) in e.any_of.iter().zip(slots) {
        let mut every = true;
        for (c, slot) in all.iter().zip(all_slots) {
            let ok = match (slot, &c.value) {
                (Some(k), Literal::Num(y)) => match values.get(*k).copied().flatten() {
                    Some(x) => {
                        mentioned = true;
                        first.get_or_insert(x);
                        c.op.num(x, *y)
                    }
                    None => false,
                },
                _ => {
                    mentioned = true;
                    crate::views::operator::holds(c, r)
                }
            };
            every &= ok;
        }
        any |= every;
    }
    (mentioned, any, first)
}

/// Judges one reading for one rule, updating the detector's memory. `x` is
/// the rule's metric in the reading (for the metric rules); `prev` is the
/// device's (boot, seq, last event time) before this reading.
pub(super) fn judge(
    rule: &RuleSpec,
    compiled: &Compiled,
    s: &mut Series,
    r: &Reading,
    values: &[Option<f64>],
    x: Option<f64>,
    prev: (u32, u64, i64),
) -> Option<Verdict> {
    match &rule.kind {
        RuleKind::Threshold { when, resolve_when, .. } => {
            let (mentioned, active, value) = eval(when, &compiled.when, values, r);
            if !mentioned {
                return None;
            }
            let clear = match resolve_when {
                Some(e) => eval(e, &compiled.resolve_when, values, r).1,
                None => !active,
            };
            Some(Verdict { active, clear, value, detail: Detail::Holds(value) })
        }
        RuleKind::Zscore { k, warmup, alpha, .. } => {
            let x = x?;
            let (n, mean, var) = match s.mem {
                Memory::Ewma { n, mean, var } => (n, mean, var),
                _ => (0, x, 0.0),
            };
            let sd = var.sqrt().max(1e-9);
            let z = (x - mean) / sd;
            let judged = u64::from(n) >= *warmup;
            let active = judged && z.abs() > *k;
            // Learn from the reading, clipped to k sigma once judging, so an
            // outlier does not blow up the variance it is judged against.
            let xc = if judged { x.clamp(mean - k * sd, mean + k * sd) } else { x };
            let diff = xc - mean;
            let incr = alpha * diff;
            let (mean2, var2) = if n == 0 { (x, 0.0) } else { (mean + incr, (1.0 - alpha) * (var + diff * incr)) };
            s.mem = Memory::Ewma { n: n.saturating_add(1), mean: mean2, var: var2 };
            Some(Verdict { active, clear: !active, value: Some(x), detail: Detail::Sigma { x, z, mean } })
        }
        RuleKind::RateOfChange { max_per_second, .. } => {
            let x = x?;
            let verdict = match s.mem {
                Memory::Last { ts, v } if r.ts_ms > ts => {
                    let rate = (x - v) / ((r.ts_ms - ts) as f64 / 1000.0);
                    let active = rate.abs() > *max_per_second;
                    Some(Verdict { active, clear: !active, value: Some(x), detail: Detail::Rate(rate) })
                }
                // Out of order: neither judged nor remembered.
                Memory::Last { .. } => return None,
                _ => None,
            };
            s.mem = Memory::Last { ts: r.ts_ms, v: x };
            verdict
        }
        RuleKind::Flatline { readings, duration_ms, epsilon, .. } => {
            let x = x?;
            let (v, since, n) = match s.mem {
                Memory::Run { v, since, n } if (x - v).abs() <= *epsilon => (v, since, n.saturating_add(1)),
                _ => (x, r.ts_ms, 1),
            };
            s.mem = Memory::Run { v, since, n };
            let active =
                readings.is_some_and(|m| u64::from(n) >= m) || duration_ms.is_some_and(|m| r.ts_ms - since >= m);
            Some(Verdict {
                active,
                clear: !active,
                value: Some(x),
                detail: Detail::Stuck { v, n, ms: r.ts_ms - since },
            })
        }
        RuleKind::Gap { min_missing } => {
            let (boot, seq, last_ts) = prev;
            if last_ts == i64::MIN || r.boot != boot || r.seq <= seq {
                // First reading, a new boot, or a late one filling in: no verdict.
                return None;
            }
            let missing = r.seq - seq - 1;
            let active = missing >= *min_missing;
            let detail = Detail::Missing { missing, from: seq, to: r.seq, boot };
            Some(Verdict { active, clear: !active, value: Some(missing as f64), detail })
        }
        RuleKind::Silence { .. } => None,
    }
}
