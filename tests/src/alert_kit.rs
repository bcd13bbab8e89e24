//! The reference alert rules and the alert API helpers, shared by the alert
//! tests here and the scoring tests in `tests/alone`.

use serde_json::Value;

/// The reference rule set (also in deploy/cloud/single-node.toml), tuned
/// for readings one second apart.
pub const RULES: &str = r#"
[alerts]
gateway_lateness = "10s"
# The scoring fleet runs at 25x: a second of the cloud's clock is 25 s of
# event time (the defaults' 30 s quiet would be 1.2 s). The gap stays well
# below the quiet, so a gateway that is away never makes its devices silent,
# and after it returns its devices have quiet - gap (1.2 s) to resume: the
# simulated devices end a gateway outage on their own schedules, up to a
# second apart (with 1 s and 500 ms, 7 of gateway A's devices were flagged
# once, 1 run in 4).
silence_arrival_quiet = "1500ms"
gateway_offline_gap = "300ms"

[[rules]]
name = "overheat"
kind = "threshold"
when = "temperature > 50"
for = "5s"
resolve_when = "temperature < 45"
severity = "critical"

[[rules]]
name = "temperature_outlier"
kind = "zscore"
metric = "temperature"
k = 6
warmup = 30
alpha = 0.1

[[rules]]
name = "temperature_jump"
kind = "rate_of_change"
metric = "temperature"
max_per_second = 3

[[rules]]
name = "stuck_sensor"
kind = "flatline"
metric = "temperature"
readings = 15

[[rules]]
name = "device_silent"
kind = "silence"
after = "20s"

[[rules]]
name = "readings_lost"
kind = "gap"
"#;

/// Every alert, through the paginated API.
pub async fn fetch_alerts(cloud_url: &str, query: &[(&str, &str)]) -> Vec<Value> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = client.get(format!("{cloud_url}/v1/alerts")).query(&[("limit", "1000")]).query(query);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let page: Value = req.send().await.expect("alerts API").json().await.expect("alerts page");
        out.extend(page["alerts"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return out,
        }
    }
}
