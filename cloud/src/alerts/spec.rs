//! Alert rules: parsed from the `[[rules]]` tables of the cloud config.
//!
//! ```toml
//! [[rules]]
//! name = "overheat"
//! kind = "threshold"
//! when = "temperature > 80 and humidity < 20"   # `and` binds tighter than `or`
//! for = "30s"                                   # must hold this long (event time)
//! resolve_when = "temperature < 75"             # hysteresis (default: `when` no longer holds)
//! clear_for = "1m"                              # must stay clear this long before resolving
//! severity = "critical"                         # info, warning (default), critical
//! filter = ["tags.class == boiler"]             # which devices the rule watches
//!
//! [[rules]]
//! name = "temperature_outlier"
//! kind = "zscore"
//! metric = "temperature"
//! k = 4.0            # sigmas
//! warmup = 30        # readings before it judges
//! alpha = 0.05       # EWMA weight of a new reading
//!
//! [[rules]]
//! kind = "rate_of_change"   metric = "temperature"  max_per_second = 0.5
//! [[rules]]
//! kind = "flatline"         metric = "temperature"  readings = 20   epsilon = 0.0   # or duration = "10m"
//! [[rules]]
//! kind = "silence"          after = "5m"
//! [[rules]]
//! kind = "gap"              min_missing = 1
//! ```
//!
//! Every mistake in every rule is reported at startup with its key path.

use serde::Serialize;
use toml::{Table, Value};

pub use crate::model::Severity;
use crate::views::spec::Condition;

/// A validated rule.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RuleSpec {
    pub name: String,
    pub kind: RuleKind,
    pub severity: Severity,
    pub filter: Vec<Condition>,
    /// How long a rule's condition must stay clear before the alert resolves.
    pub clear_for_ms: i64,
}

/// A boolean expression over a reading: conditions combined with `and`
/// (all of a group) and `or` (any group).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expr {
    pub any_of: Vec<Vec<Condition>>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum RuleKind {
    Threshold { when: Expr, resolve_when: Option<Expr>, for_ms: i64 },
    Zscore { metric: String, k: f64, warmup: u64, alpha: f64 },
    RateOfChange { metric: String, max_per_second: f64 },
    Flatline { metric: String, readings: Option<u64>, duration_ms: Option<i64>, epsilon: f64 },
    Silence { after_ms: i64 },
    Gap { min_missing: u64 },
}

impl RuleKind {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Threshold { .. } => "threshold",
            Self::Zscore { .. } => "zscore",
            Self::RateOfChange { .. } => "rate_of_change",
            Self::Flatline { .. } => "flatline",
            Self::Silence { .. } => "silence",
            Self::Gap { .. } => "gap",
        }
    }
}

struct P<'a> {
    out: &'a mut Vec<String>,
}

impl P<'_> {
    fn push(&mut self, path: &str, msg: impl std::fmt::Display) {
        self.out.push(format!("{path}: {msg}"));
    }
}

fn duration(t: &Table, key: &str, p: &mut P, path: &str) -> Option<i64> {
    let v = t.get(key)?;
    let parsed = v
        .as_str()
        .ok_or_else(|| "must be a duration string such as \"30s\"".to_string())
        .and_then(|s| humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}")));
    match parsed {
        Ok(d) => Some(d.as_millis() as i64),
        Err(e) => {
            p.push(&format!("{path}.{key}"), e);
            None
        }
    }
}

fn number(t: &Table, key: &str, p: &mut P, path: &str) -> Option<f64> {
    let v = t.get(key)?;
    match v.as_float().or_else(|| v.as_integer().map(|i| i as f64)) {
        Some(x) if x.is_finite() => Some(x),
        _ => {
            p.push(&format!("{path}.{key}"), "must be a number");
            None
        }
    }
}

fn metric(t: &Table, metrics: &[String], p: &mut P, path: &str) -> Option<String> {
    match t.get("metric").and_then(Value::as_str) {
        None => {
            p.push(&format!("{path}.metric"), "is required");
            None
        }
        Some(m) if metrics.iter().any(|x| x == m) => Some(m.to_string()),
        Some(m) => {
            p.push(&format!("{path}.metric"), format!("unknown metric {m:?} (schema.metrics: {})", metrics.join(", ")));
            None
        }
    }
}

/// Parses `a > 1 and b < 2 or c == x`.
pub fn parse_expr(s: &str, metrics: &[String]) -> Result<Expr, String> {
    let mut any_of = Vec::new();
    for group in s.split(" or ") {
        let mut all = Vec::new();
        for cond in group.split(" and ") {
            all.push(crate::views::spec::parse_condition(cond.trim(), metrics)?);
        }
        any_of.push(all);
    }
    if any_of.iter().any(Vec::is_empty) {
        return Err(format!("{s:?} has an empty condition"));
    }
    Ok(Expr { any_of })
}

/// Parses and validates every rule; returns all problems if any.
pub fn parse_rules(rules: &[Table], metrics: &[String]) -> Result<Vec<RuleSpec>, Vec<String>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut p = P { out: &mut problems };
    for (i, t) in rules.iter().enumerate() {
        let path = format!("rules[{i}]");
        if let Some(r) = parse_rule(t, metrics, &mut p, &path) {
            if out.iter().any(|o: &RuleSpec| o.name == r.name) {
                p.push(&format!("{path}.name"), format!("{:?} is used twice", r.name));
            }
            out.push(r);
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

fn parse_rule(t: &Table, metrics: &[String], p: &mut P, path: &str) -> Option<RuleSpec> {
    let before = p.out.len();
    let kind_name = t.get("kind").and_then(Value::as_str).unwrap_or("");
    let specific: &[&str] = match kind_name {
        "threshold" => &["when", "for", "resolve_when"],
        "zscore" => &["metric", "k", "warmup", "alpha"],
        "rate_of_change" => &["metric", "max_per_second"],
        "flatline" => &["metric", "readings", "duration", "epsilon"],
        "silence" => &["after"],
        "gap" => &["min_missing"],
        _ => {
            p.push(&format!("{path}.kind"), "must be threshold, zscore, rate_of_change, flatline, silence or gap");
            &[]
        }
    };
    for k in t.keys() {
        if !["name", "kind", "severity", "filter", "clear_for"].contains(&k.as_str()) && !specific.contains(&k.as_str())
        {
            p.push(&format!("{path}.{k}"), format!("unknown key for a {kind_name} rule"));
        }
    }
    let name = t.get("name").and_then(Value::as_str).map(str::to_string);
    match &name {
        None => p.push(&format!("{path}.name"), "is required"),
        Some(n)
            if n.is_empty()
                || n.len() > 64
                || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            p.push(&format!("{path}.name"), format!("{n:?} must be 1-64 of A-Z a-z 0-9 _ -"))
        }
        _ => {}
    }
    let severity = match t.get("severity").map(|v| v.as_str().and_then(Severity::parse)) {
        None => Severity::Warning,
        Some(Some(s)) => s,
        Some(None) => {
            p.push(&format!("{path}.severity"), "must be info, warning or critical");
            Severity::Warning
        }
    };
    let mut filter = Vec::new();
    if let Some(v) = t.get("filter") {
        for (j, item) in v.as_array().map(Vec::as_slice).unwrap_or_default().iter().enumerate() {
            match item.as_str().map(|s| crate::views::spec::parse_condition(s, metrics)) {
                Some(Ok(c)) => filter.push(c),
                Some(Err(e)) => p.push(&format!("{path}.filter[{j}]"), e),
                None => p.push(&format!("{path}.filter[{j}]"), "must be a string"),
            }
        }
        if v.as_array().is_none() {
            p.push(&format!("{path}.filter"), "must be a list of conditions");
        }
    }
    let clear_for_ms = duration(t, "clear_for", p, path).unwrap_or(0);
    let positive = |p: &mut P, key: &str, v: Option<f64>| -> Option<f64> {
        match v {
            Some(x) if x > 0.0 => Some(x),
            Some(_) => {
                p.push(&format!("{path}.{key}"), "must be positive");
                None
            }
            None => None,
        }
    };
    let kind = match kind_name {
        "threshold" => {
            let expr = |p: &mut P, key: &str| -> Option<Expr> {
                let s = t.get(key)?.as_str();
                match s.map(|s| parse_expr(s, metrics)) {
                    Some(Ok(e)) => Some(e),
                    Some(Err(e)) => {
                        p.push(&format!("{path}.{key}"), e);
                        None
                    }
                    None => {
                        p.push(&format!("{path}.{key}"), "must be a condition string");
                        None
                    }
                }
            };
            let when = expr(p, "when");
            if t.get("when").is_none() {
                p.push(&format!("{path}.when"), "is required, e.g. \"temperature > 80\"");
            }
            let resolve_when = expr(p, "resolve_when");
            let for_ms = duration(t, "for", p, path).unwrap_or(0);
            when.map(|when| RuleKind::Threshold { when, resolve_when, for_ms })
        }
        "zscore" => {
            let m = metric(t, metrics, p, path);
            let k = number(t, "k", p, path);
            let k = positive(p, "k", k).unwrap_or(3.0);
            let warmup = t.get("warmup").and_then(Value::as_integer).unwrap_or(30).max(2) as u64;
            let alpha = number(t, "alpha", p, path).unwrap_or(0.05);
            if !(0.0 < alpha && alpha < 1.0) {
                p.push(&format!("{path}.alpha"), "must be between 0 and 1");
            }
            m.map(|metric| RuleKind::Zscore { metric, k, warmup, alpha })
        }
        "rate_of_change" => {
            let m = metric(t, metrics, p, path);
            let max = number(t, "max_per_second", p, path);
            let max = positive(p, "max_per_second", max);
            if t.get("max_per_second").is_none() {
                p.push(&format!("{path}.max_per_second"), "is required");
            }
            m.zip(max).map(|(metric, max_per_second)| RuleKind::RateOfChange { metric, max_per_second })
        }
        "flatline" => {
            let m = metric(t, metrics, p, path);
            let readings = t.get("readings").and_then(Value::as_integer).map(|n| n.max(2) as u64);
            let duration_ms = duration(t, "duration", p, path);
            if readings.is_none() && duration_ms.is_none() {
                p.push(path, "a flatline rule needs readings or duration");
            }
            let epsilon = number(t, "epsilon", p, path).unwrap_or(0.0).abs();
            m.map(|metric| RuleKind::Flatline { metric, readings, duration_ms, epsilon })
        }
        "silence" => {
            let after = duration(t, "after", p, path);
            if t.get("after").is_none() {
                p.push(&format!("{path}.after"), "is required, e.g. \"5m\"");
            }
            after.map(|after_ms| RuleKind::Silence { after_ms })
        }
        "gap" => Some(RuleKind::Gap {
            min_missing: t.get("min_missing").and_then(Value::as_integer).unwrap_or(1).max(1) as u64,
        }),
        _ => None,
    };
    if p.out.len() > before {
        return None;
    }
    Some(RuleSpec { name: name?, kind: kind?, severity, filter, clear_for_ms })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Vec<String> {
        ["temperature", "humidity"].iter().map(|s| s.to_string()).collect()
    }

    fn parse(text: &str) -> Result<Vec<RuleSpec>, Vec<String>> {
        let doc: Table = toml::from_str(text).unwrap();
        let rules: Vec<Table> =
            doc["rules"].as_array().unwrap().iter().map(|v| v.as_table().unwrap().clone()).collect();
        parse_rules(&rules, &metrics())
    }

    #[test]
    fn every_kind_parses() {
        let r = parse(
            r#"
[[rules]]
name = "hot"
kind = "threshold"
when = "temperature > 80 and humidity < 20 or temperature > 95"
for = "30s"
resolve_when = "temperature < 75"
clear_for = "1m"
severity = "critical"
filter = ["tags.class == boiler"]
[[rules]]
name = "z"
kind = "zscore"
metric = "temperature"
k = 4
[[rules]]
name = "roc"
kind = "rate_of_change"
metric = "humidity"
max_per_second = 0.5
[[rules]]
name = "flat"
kind = "flatline"
metric = "temperature"
readings = 20
[[rules]]
name = "quiet"
kind = "silence"
after = "5m"
[[rules]]
name = "lost"
kind = "gap"
"#,
        )
        .unwrap();
        assert_eq!(r.len(), 6);
        let RuleKind::Threshold { when, for_ms, .. } = &r[0].kind else { panic!() };
        assert_eq!((when.any_of.len(), when.any_of[0].len(), *for_ms), (2, 2, 30_000));
        assert_eq!((r[0].severity, r[0].clear_for_ms), (Severity::Critical, 60_000));
    }

    #[test]
    fn every_mistake_is_reported_with_its_path() {
        let errs = parse(
            r#"
[[rules]]
name = "a"
kind = "threshold"
when = "temprature > 80"
[[rules]]
name = "b"
kind = "zscore"
metric = "pressure"
alpha = 2
[[rules]]
name = "c"
kind = "flatline"
metric = "temperature"
[[rules]]
name = "d"
kind = "sparkle"
[[rules]]
name = "e"
kind = "silence"
after = "soon"
window = "5m"
"#,
        )
        .unwrap_err();
        let paths: Vec<&str> = errs.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "rules[0].when",
                "rules[1].metric",
                "rules[1].alpha",
                "rules[2]",
                "rules[3].kind",
                "rules[4].window",
                "rules[4].after"
            ],
            "{errs:#?}"
        );
    }
}
