//! The views a node runs when its config declares none: per-device one-minute
//! windows with count, sum, min, max and avg of every metric, and per-device
//! running totals. They are written as the same TOML a user would write, and
//! go through the same parser.

/// The default `[[views]]` for the given metrics.
pub fn default_views_toml(metrics: &[String]) -> String {
    let mut aggs = vec![r#"{ name = "count", fn = "count" }"#.to_string()];
    for m in metrics {
        for f in ["count", "sum", "min", "max", "avg"] {
            aggs.push(format!(r#"{{ name = "{m}_{f}", fn = "{f}", of = "{m}" }}"#));
        }
    }
    format!(
        r#"
[[views]]
name = "device_windows"
key = "device"
window = {{ kind = "tumbling", size = "1m" }}
output = "update"
aggregates = [
  {}
]

[[views]]
name = "device_totals"
key = "device"
window = {{ kind = "global" }}
aggregates = [
  {{ name = "count", fn = "count" }},
  {{ name = "first_ts", fn = "min", of = "event_time" }},
  {{ name = "last_ts", fn = "max", of = "event_time" }},
]
"#,
        aggs.join(",\n  ")
    )
}
