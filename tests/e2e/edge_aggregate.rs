//! Pre-aggregation at the edge, end to end: the agent forwards one-minute
//! windows instead of raw readings, is killed mid-run, and the cloud's merged
//! aggregates still equal the ground truth per device, metric and minute.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use kappa_tests::harness::*;

/// Every aggregate the cloud holds for `window`, through the paginated API.
async fn fetch_aggregates(cloud_url: &str, window: &str) -> Vec<Value> {
    let client = reqwest::Client::new();
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let mut req = client.get(format!("{cloud_url}/v1/aggregates")).query(&[("window", window), ("limit", "1000")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let page: Value = req.send().await.unwrap().json().await.unwrap();
        out.extend(page["aggregates"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn aggregate_mode_survives_kills_and_the_cloud_merges_exactly_the_truth() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start(dir.path()).await;
    let mosquitto = Mosquitto::start(dir.path()).await;
    let mqtt = Mqtt::External { port: mosquitto.port, topic_prefix: String::new(), client_id: "kappa-edge-agg".into() };
    let extra = "mode = \"aggregate\"\n[aggregate]\nwindows = [\"1m\"]\nlateness = \"5s\"\nidle_close = \"2s\"\n";
    let mut edge = Edge::start_named(dir.path(), "edge", "gw-agg", mqtt, &cloud.url(), extra).await;

    let mut sim = Fleet::new(20, 600, 30.0).start(mosquitto.port, dir.path());
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_secs(4)).await;
        edge.proc.kill9().await;
        edge.restart(false).await;
    }
    let truth = Fleet::finish(&mut sim, dir.path()).await;
    assert_eq!(truth.acked, 20 * 600);

    // Every truth window's count arrives once the idle windows close and forward.
    let want: u64 = truth.rows.iter().flat_map(|t| t.metrics.values()).map(|m| m.count).sum();
    let got = wait_for("the aggregates to arrive", Duration::from_secs(60), || async {
        let aggs = fetch_aggregates(&cloud.url(), "1m").await;
        let n: u64 = aggs.iter().map(|a| a["n"].as_u64().unwrap_or(0)).sum();
        (n >= want).then_some(aggs)
    })
    .await;

    let by_key: BTreeMap<(String, i64, String), &Value> = got
        .iter()
        .map(|a| {
            ((a["d"].as_str().unwrap().to_string(), a["s"].as_i64().unwrap(), a["m"].as_str().unwrap().to_string()), a)
        })
        .collect();
    let mut problems = Vec::new();
    for t in &truth.rows {
        for (metric, m) in &t.metrics {
            let Some(a) = by_key.get(&(t.device.clone(), t.window_start_ms, metric.clone())) else {
                problems.push(format!("{} @ {} {metric}: missing", t.device, t.window_start_ms));
                continue;
            };
            // The API shows readings' values as their sensors measured them.
            let as_measured = kappa_common::reading::as_measured;
            let sum = a["sum"].as_f64().unwrap();
            let same = a["n"].as_u64() == Some(m.count)
                && a["lo"].as_f64() == Some(as_measured(m.min))
                && a["hi"].as_f64() == Some(as_measured(m.max))
                && (sum - m.sum).abs() <= 1e-9 * m.sum.abs().max(1.0);
            if !same {
                problems.push(format!("{} @ {} {metric}: cloud {a} != truth {m:?}", t.device, t.window_start_ms));
            }
        }
    }
    let windows: usize = truth.rows.iter().map(|t| t.metrics.len()).sum();
    assert_eq!(by_key.len(), windows, "a window the truth does not have");
    assert!(
        problems.is_empty(),
        "{} problems, first: {:?}\n{}",
        problems.len(),
        &problems[..problems.len().min(5)],
        edge.proc.tail()
    );

    // Raw readings stayed on the gateway.
    let raw = total(&fetch_rows(&cloud.url(), "device_totals").await);
    assert_eq!(raw, 0, "aggregate mode forwarded {raw} raw readings");
    let kept = kappa_edge::log::EdgeLog::open_read_only(&dir.path().join("edge-data/edge-log.sqlite"))
        .unwrap()
        .stats()
        .unwrap()
        .readings;
    assert_eq!(kept, truth.acked, "the raw readings are kept locally for backfill");

    // Backfill the first minute's raw readings: they reach the cloud, once.
    let backfill = |from: i64, to: i64| {
        let out = std::process::Command::new(bin())
            .args(["edge", "log", "backfill", "--config", edge.config.to_str().unwrap()])
            .args(["--from", &from.to_string(), "--to", &to.to_string()])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let asked = backfill(T0, T0 + 60_000);
    assert_eq!(asked["readings"], 20 * 60, "{asked}");
    wait_for_readings(&cloud.url(), 20 * 60, Duration::from_secs(30)).await;
    assert_eq!(backfill(T0, T0 + 60_000)["readings"], 0, "asking again sends nothing twice");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = fetch_rows(&cloud.url(), "device_totals").await;
    assert_eq!(total(&rows), 20 * 60, "the first minute, raw, exactly once");
}
