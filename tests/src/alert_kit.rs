//! The reference alert rules and the alert API helpers, shared by the alert
//! tests here and the scoring tests in `tests/alone`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

/// What the test's webhook receiver saw.
#[derive(Debug, Default)]
pub struct Received {
    /// Idempotency key -> bodies received with it.
    pub by_key: BTreeMap<String, Vec<String>>,
    pub requests: usize,
}

/// A real HTTP server that fails the first `fail` requests with 500, lets
/// the next `hang` requests time out, then accepts.
pub async fn receiver(fail: usize, hang: usize) -> (u16, Arc<Mutex<Received>>) {
    use axum::extract::State;
    use axum::http::{HeaderMap, StatusCode};
    let seen = Arc::new(Mutex::new(Received::default()));
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(
                move |State(seen): State<Arc<Mutex<Received>>>, headers: HeaderMap, body: String| async move {
                    let n = {
                        let mut s = seen.lock().expect("the receiver");
                        s.requests += 1;
                        s.requests
                    };
                    if n <= fail {
                        return StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    if n <= fail + hang {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        return StatusCode::OK;
                    }
                    let key = headers.get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
                    seen.lock().expect("the receiver").by_key.entry(key).or_default().push(body);
                    StatusCode::OK
                },
            ),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("the receiver");
    let port = listener.local_addr().expect("the receiver").port();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (port, seen)
}
