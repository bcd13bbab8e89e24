//! View definitions: parsed from the `[[views]]` tables of the cloud config.
//!
//! ```toml
//! [[views]]
//! name = "device_metrics"
//! version = 1                                  # default 1
//! key = "device"                               # or "tags.<name>"
//! window = { kind = "tumbling", size = "5m" }  # hopping: size + slide; session: gap; global
//! output = "update"                            # or "final"
//! allowed_lateness = "10m"                     # default 0s
//! filter = ["tags.type != heartbeat"]          # all must hold; default none
//! aggregates = [
//!   { name = "event_count", fn = "count" },
//!   { name = "avg_temp", fn = "avg", of = "temperature" },
//!   { name = "event_types", fn = "set", of = "tags.type", max = 32 },
//! ]
//! ```
//!
//! Views are read from raw TOML so that every mistake in every view is
//! reported at once, each with its key path (`views[1].window.gap: ...`).

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::{Table, Value};

/// A validated view.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ViewSpec {
    pub name: String,
    pub version: u32,
    pub key: Field,
    pub window: WindowSpec,
    pub output: OutputMode,
    pub allowed_lateness_ms: i64,
    pub filter: Vec<Condition>,
    pub aggregates: Vec<AggSpec>,
}

impl ViewSpec {
    /// `name@version`: how stores, logs and the API name this version.
    pub fn id(&self) -> String {
        format!("{}@{}", self.name, self.version)
    }

    /// A canonical description, stored with the view so a changed definition
    /// under the same version is caught.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Something a reading carries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Field {
    /// The device id.
    Device,
    /// The event time, Unix ms.
    EventTime,
    /// A named metric (number or null).
    Metric(String),
    /// A tag (`tags.<name>`); missing counts as null.
    Tag(String),
}

impl Field {
    fn parse(s: &str, metrics: &[String]) -> Result<Field, String> {
        match s {
            "device" => Ok(Field::Device),
            "event_time" => Ok(Field::EventTime),
            _ => {
                if let Some(tag) = s.strip_prefix("tags.") {
                    if tag.is_empty() {
                        return Err("tags. needs a tag name".into());
                    }
                    Ok(Field::Tag(tag.to_string()))
                } else if metrics.iter().any(|m| m == s) {
                    Ok(Field::Metric(s.to_string()))
                } else {
                    Err(format!(
                        "unknown field {s:?}: expected device, event_time, tags.<name> or a metric in schema.metrics ({})",
                        metrics.join(", ")
                    ))
                }
            }
        }
    }

    /// Numeric fields: metrics and event time.
    pub fn is_numeric(&self) -> bool {
        matches!(self, Field::Metric(_) | Field::EventTime)
    }
}

/// How readings are grouped in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum WindowSpec {
    Tumbling { size_ms: i64 },
    Hopping { size_ms: i64, slide_ms: i64 },
    Session { gap_ms: i64 },
    Global,
}

/// When rows are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputMode {
    /// The row is replaced as the window changes.
    Update,
    /// The row is written once, when the watermark passes the window's end plus the allowed lateness.
    Final,
}

/// A filter condition: `field op value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Condition {
    pub field: Field,
    pub op: Op,
    pub value: Literal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    /// `x OP y` on numbers.
    pub fn num(self, x: f64, y: f64) -> bool {
        match self {
            Op::Eq => x == y,
            Op::Ne => x != y,
            Op::Lt => x < y,
            Op::Le => x <= y,
            Op::Gt => x > y,
            Op::Ge => x >= y,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Literal {
    Num(f64),
    Str(String),
}

/// One output column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AggSpec {
    pub name: String,
    pub func: AggFn,
    /// `None` only for `count` of events.
    pub of: Option<Field>,
    /// Bound for `set` and `list`.
    pub max: usize,
}

/// Aggregate functions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AggFn {
    Count,
    Sum,
    Min,
    Max,
    Avg,
    Variance,
    Stddev,
    First,
    Last,
    ApproxDistinct,
    Set,
    List,
}

/// Each function's name in a config (`fn = "count"`).
pub const AGG_FNS: [(&str, AggFn); 12] = [
    ("count", AggFn::Count),
    ("sum", AggFn::Sum),
    ("min", AggFn::Min),
    ("max", AggFn::Max),
    ("avg", AggFn::Avg),
    ("variance", AggFn::Variance),
    ("stddev", AggFn::Stddev),
    ("first", AggFn::First),
    ("last", AggFn::Last),
    ("approx_distinct", AggFn::ApproxDistinct),
    ("set", AggFn::Set),
    ("list", AggFn::List),
];

/// Each comparison as a condition writes it (`temperature > 30`); the
/// two-character ones first, so `<=` is not read as `<`.
pub const OPS: [(&str, Op); 6] =
    [("==", Op::Eq), ("!=", Op::Ne), ("<=", Op::Le), (">=", Op::Ge), ("<", Op::Lt), (">", Op::Gt)];

impl AggFn {
    fn parse(s: &str) -> Option<AggFn> {
        AGG_FNS.iter().find(|(name, _)| *name == s).map(|(_, f)| *f)
    }

    fn numeric_only(self) -> bool {
        matches!(self, AggFn::Sum | AggFn::Min | AggFn::Max | AggFn::Avg | AggFn::Variance | AggFn::Stddev)
    }
}

/// Default bound of `set` and `list`.
pub const DEFAULT_COLLECTION_MAX: usize = 100;
/// Largest bound of `set` and `list`.
pub const MAX_COLLECTION_MAX: usize = 10_000;

/// Collects problems with their key paths.
struct Problems<'a> {
    out: &'a mut Vec<String>,
}

impl Problems<'_> {
    fn push(&mut self, path: &str, msg: impl std::fmt::Display) {
        self.out.push(format!("{path}: {msg}"));
    }
}

fn duration(v: &Value) -> Result<i64, String> {
    let s = v.as_str().ok_or("must be a duration string such as \"5m\" or \"30s\"")?;
    let d: Duration = humantime::parse_duration(s).map_err(|e| format!("{s:?} is not a duration: {e}"))?;
    Ok(d.as_millis() as i64)
}

fn string<'v>(v: &'v Value, p: &mut Problems, path: &str) -> Option<&'v str> {
    let s = v.as_str();
    if s.is_none() {
        p.push(path, "must be a string");
    }
    s
}

fn check_keys(t: &Table, allowed: &[&str], p: &mut Problems, path: &str) {
    for k in t.keys() {
        if !allowed.contains(&k.as_str()) {
            p.push(&format!("{path}.{k}"), format!("unknown key (expected one of: {})", allowed.join(", ")));
        }
    }
}

/// Parses and validates every view; returns all problems if any.
pub fn parse_views(views: &[Table], metrics: &[String]) -> Result<Vec<ViewSpec>, Vec<String>> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut p = Problems { out: &mut problems };
    for (i, t) in views.iter().enumerate() {
        if let Some(v) = parse_view(t, metrics, &mut p, &format!("views[{i}]")) {
            out.push(v);
        }
    }
    for (i, a) in out.iter().enumerate() {
        if out[..i].iter().any(|b| b.name == a.name && b.version == a.version) {
            p.push(&format!("views[{i}]"), format!("{} is defined twice", a.id()));
        }
    }
    if problems.is_empty() { Ok(out) } else { Err(problems) }
}

fn parse_view(t: &Table, metrics: &[String], p: &mut Problems, path: &str) -> Option<ViewSpec> {
    let before = p.out.len();
    check_keys(t, &["name", "version", "key", "window", "output", "allowed_lateness", "filter", "aggregates"], p, path);
    let name = match t.get("name") {
        Some(v) => string(v, p, &format!("{path}.name")).map(str::to_string),
        None => {
            p.push(&format!("{path}.name"), "is required");
            None
        }
    };
    if let Some(n) = &name
        && (n.is_empty() || n.len() > 64 || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_'))
    {
        p.push(&format!("{path}.name"), format!("{n:?} must be 1-64 characters of A-Z a-z 0-9 _"));
    }
    let version = match t.get("version") {
        None => 1,
        Some(v) => match v.as_integer() {
            Some(n) if (1..=1_000_000).contains(&n) => n as u32,
            _ => {
                p.push(&format!("{path}.version"), "must be an integer from 1");
                1
            }
        },
    };
    let key = match t.get("key") {
        None => Some(Field::Device),
        Some(v) => string(v, p, &format!("{path}.key")).and_then(|s| match Field::parse(s, metrics) {
            Ok(f @ (Field::Device | Field::Tag(_))) => Some(f),
            Ok(_) => {
                p.push(&format!("{path}.key"), "must be device or tags.<name>");
                None
            }
            Err(e) => {
                p.push(&format!("{path}.key"), e);
                None
            }
        }),
    };
    let window = match t.get("window") {
        None => {
            p.push(&format!("{path}.window"), "is required (kind = tumbling, hopping, session or global)");
            None
        }
        Some(v) => parse_window(v, p, &format!("{path}.window")),
    };
    let output = match t.get("output").map(|v| (v, v.as_str())) {
        None => OutputMode::Update,
        Some((_, Some("update"))) => OutputMode::Update,
        Some((_, Some("final"))) => OutputMode::Final,
        Some((v, _)) => {
            p.push(&format!("{path}.output"), format!("{v} must be \"update\" or \"final\""));
            OutputMode::Update
        }
    };
    if output == OutputMode::Final && window == Some(WindowSpec::Global) {
        p.push(&format!("{path}.output"), "a global window never closes, so it cannot have final output");
    }
    let allowed_lateness_ms = match t.get("allowed_lateness") {
        None => 0,
        Some(v) => duration(v).unwrap_or_else(|e| {
            p.push(&format!("{path}.allowed_lateness"), e);
            0
        }),
    };
    let mut filter = Vec::new();
    if let Some(v) = t.get("filter") {
        match v.as_array() {
            None => p.push(&format!("{path}.filter"), "must be a list of conditions such as \"tags.type == alarm\""),
            Some(items) => {
                for (j, item) in items.iter().enumerate() {
                    let cpath = format!("{path}.filter[{j}]");
                    if let Some(s) = string(item, p, &cpath) {
                        match parse_condition(s, metrics) {
                            Ok(c) => filter.push(c),
                            Err(e) => p.push(&cpath, e),
                        }
                    }
                }
            }
        }
    }
    let mut aggregates: Vec<AggSpec> = Vec::new();
    match t.get("aggregates").and_then(Value::as_array) {
        None => p.push(&format!("{path}.aggregates"), "is required: a list of { name, fn, of }"),
        Some(items) if items.is_empty() => p.push(&format!("{path}.aggregates"), "must name at least one aggregate"),
        Some(items) => {
            for (j, item) in items.iter().enumerate() {
                let apath = format!("{path}.aggregates[{j}]");
                if let Some(a) = parse_agg(item, metrics, p, &apath) {
                    if aggregates.iter().any(|b| b.name == a.name) {
                        p.push(&format!("{apath}.name"), format!("{:?} is used twice", a.name));
                    }
                    aggregates.push(a);
                }
            }
        }
    }
    if p.out.len() > before {
        return None;
    }
    Some(ViewSpec { name: name?, version, key: key?, window: window?, output, allowed_lateness_ms, filter, aggregates })
}

fn parse_window(v: &Value, p: &mut Problems, path: &str) -> Option<WindowSpec> {
    let Some(t) = v.as_table() else {
        p.push(path, "must be a table such as { kind = \"tumbling\", size = \"5m\" }");
        return None;
    };
    let kind = t.get("kind").and_then(Value::as_str);
    let mut get = |key: &str| -> Option<i64> {
        match t.get(key).map(duration) {
            None => {
                p.push(&format!("{path}.{key}"), "is required");
                None
            }
            Some(Err(e)) => {
                p.push(&format!("{path}.{key}"), e);
                None
            }
            Some(Ok(ms)) if ms <= 0 => {
                p.push(&format!("{path}.{key}"), "must be positive");
                None
            }
            Some(Ok(ms)) => Some(ms),
        }
    };
    let (spec, keys): (Option<WindowSpec>, &[&str]) = match kind {
        Some("tumbling") => (get("size").map(|size_ms| WindowSpec::Tumbling { size_ms }), &["kind", "size"]),
        Some("hopping") => {
            let (size, slide) = (get("size"), get("slide"));
            let spec = match (size, slide) {
                (Some(size_ms), Some(slide_ms)) if slide_ms > size_ms => {
                    p.push(&format!("{path}.slide"), "must not exceed size");
                    None
                }
                (Some(size_ms), Some(slide_ms)) if size_ms / slide_ms > 100 => {
                    p.push(&format!("{path}.slide"), "puts a reading in more than 100 windows; use a larger slide");
                    None
                }
                (Some(size_ms), Some(slide_ms)) => Some(WindowSpec::Hopping { size_ms, slide_ms }),
                _ => None,
            };
            (spec, &["kind", "size", "slide"])
        }
        Some("session") => (get("gap").map(|gap_ms| WindowSpec::Session { gap_ms }), &["kind", "gap"]),
        Some("global") => (Some(WindowSpec::Global), &["kind"]),
        _ => {
            p.push(&format!("{path}.kind"), "must be tumbling, hopping, session or global");
            return None;
        }
    };
    check_keys(t, keys, p, path);
    spec
}

fn parse_agg(v: &Value, metrics: &[String], p: &mut Problems, path: &str) -> Option<AggSpec> {
    let Some(t) = v.as_table() else {
        p.push(path, "must be a table such as { name = \"avg_temp\", fn = \"avg\", of = \"temperature\" }");
        return None;
    };
    let before = p.out.len();
    check_keys(t, &["name", "fn", "of", "max"], p, path);
    let name = t.get("name").and_then(Value::as_str).map(str::to_string);
    match &name {
        None => p.push(&format!("{path}.name"), "is required"),
        Some(n) if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') => {
            p.push(&format!("{path}.name"), format!("{n:?} must be letters, digits and _"))
        }
        _ => {}
    }
    let func = match t.get("fn").and_then(Value::as_str) {
        None => {
            p.push(&format!("{path}.fn"), "is required");
            None
        }
        Some(f) => {
            let parsed = AggFn::parse(f);
            if parsed.is_none() {
                p.push(
                    &format!("{path}.fn"),
                    format!("unknown function {f:?}: expected count, sum, min, max, avg, variance, stddev, first, last, approx_distinct, set or list"),
                );
            }
            parsed
        }
    };
    let of = match t.get("of") {
        None => None,
        Some(v) => match v.as_str() {
            Some("*") => None,
            Some(s) => match Field::parse(s, metrics) {
                Ok(f) => Some(f),
                Err(e) => {
                    p.push(&format!("{path}.of"), e);
                    None
                }
            },
            None => {
                p.push(&format!("{path}.of"), "must be a string");
                None
            }
        },
    };
    if let Some(f) = func {
        if f != AggFn::Count && of.is_none() && t.get("of").is_none() {
            p.push(&format!("{path}.of"), "is required for this function");
        }
        if f.numeric_only()
            && let Some(field) = &of
            && !field.is_numeric()
        {
            p.push(&format!("{path}.of"), "this function needs a metric or event_time");
        }
    }
    let max = match t.get("max") {
        None => DEFAULT_COLLECTION_MAX,
        Some(v) => match v.as_integer() {
            Some(n) if (1..=MAX_COLLECTION_MAX as i64).contains(&n) => n as usize,
            _ => {
                p.push(&format!("{path}.max"), format!("must be an integer from 1 to {MAX_COLLECTION_MAX}"));
                DEFAULT_COLLECTION_MAX
            }
        },
    };
    if p.out.len() > before {
        return None;
    }
    Some(AggSpec { name: name?, func: func?, of, max })
}

/// Parses one `FIELD OP VALUE` condition (views' filters and alert rules).
pub fn parse_condition(s: &str, metrics: &[String]) -> Result<Condition, String> {
    let (field, op, value) = OPS
        .iter()
        .find_map(|(tok, op)| s.split_once(tok).map(|(l, r)| (l.trim(), *op, r.trim())))
        .ok_or_else(|| format!("{s:?} must be FIELD OP VALUE with OP one of == != < <= > >="))?;
    let field = Field::parse(field, metrics)?;
    let value = value.trim_matches('"');
    let value = match value.parse::<f64>() {
        Ok(n) if field.is_numeric() => Literal::Num(n),
        _ if field.is_numeric() => return Err(format!("{value:?} is not a number")),
        _ => {
            if !matches!(op, Op::Eq | Op::Ne) {
                return Err("text fields compare only with == and !=".into());
            }
            Literal::Str(value.to_string())
        }
    };
    Ok(Condition { field, op, value })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics() -> Vec<String> {
        ["temperature", "humidity"].iter().map(|s| s.to_string()).collect()
    }

    fn parse(text: &str) -> Result<Vec<ViewSpec>, Vec<String>> {
        let doc: Table = toml::from_str(text).unwrap();
        let views: Vec<Table> =
            doc["views"].as_array().unwrap().iter().map(|v| v.as_table().unwrap().clone()).collect();
        parse_views(&views, &metrics())
    }

    #[test]
    fn a_complete_view_parses() {
        let v = parse(
            r#"
[[views]]
name = "device_metrics"
key = "device"
window = { kind = "hopping", size = "5m", slide = "1m" }
output = "final"
allowed_lateness = "10m"
filter = ["tags.type != heartbeat", "temperature > -40"]
aggregates = [
  { name = "n", fn = "count" },
  { name = "avg_t", fn = "avg", of = "temperature" },
  { name = "types", fn = "set", of = "tags.type", max = 8 },
]
"#,
        )
        .unwrap();
        assert_eq!(v[0].id(), "device_metrics@1");
        assert_eq!(v[0].window, WindowSpec::Hopping { size_ms: 300_000, slide_ms: 60_000 });
        assert_eq!(v[0].allowed_lateness_ms, 600_000);
        assert_eq!(
            v[0].filter[1],
            Condition { field: Field::Metric("temperature".into()), op: Op::Gt, value: Literal::Num(-40.0) }
        );
        assert_eq!(v[0].aggregates[2].max, 8);
    }

    #[test]
    fn every_mistake_in_every_view_is_reported_with_its_path() {
        let errors = parse(
            r#"
[[views]]
name = "a"
window = { kind = "tumbling", size = "five minutes" }
aggregates = [{ name = "x", fn = "avg", of = "temprature" }]

[[views]]
name = "b"
key = "temperature"
window = { kind = "session" }
output = "eventually"
aggregates = [{ name = "x", fn = "median", of = "humidity" }, { name = "y", fn = "sum", of = "tags.type" }]
colour = "blue"

[[views]]
name = "c"
window = { kind = "global" }
output = "final"
aggregates = []
"#,
        )
        .unwrap_err();
        let paths: Vec<&str> = errors.iter().map(|e| e.split(':').next().unwrap()).collect();
        assert_eq!(
            paths,
            [
                "views[0].window.size",
                "views[0].aggregates[0].of",
                "views[1].colour",
                "views[1].key",
                "views[1].window.gap",
                "views[1].output",
                "views[1].aggregates[0].fn",
                "views[1].aggregates[1].of",
                "views[2].output",
                "views[2].aggregates",
            ],
            "{errors:#?}"
        );
    }

    #[test]
    fn the_same_version_twice_is_refused() {
        let err = parse(
            r#"
[[views]]
name = "a"
window = { kind = "global" }
aggregates = [{ name = "n", fn = "count" }]
[[views]]
name = "a"
window = { kind = "global" }
aggregates = [{ name = "n", fn = "count" }]
"#,
        )
        .unwrap_err();
        assert!(err[0].contains("a@1 is defined twice"), "{err:?}");
    }

    #[test]
    fn text_fields_cannot_be_ordered() {
        assert!(parse_condition("tags.user < b", &metrics()).is_err());
        assert!(parse_condition("temperature == warm", &metrics()).is_err());
        assert!(parse_condition("device == \"dev-1\"", &metrics()).is_ok());
    }
}
