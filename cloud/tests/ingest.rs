//! The cloud node in-process over real HTTP: every kind of bad request is
//! refused with its status and counted by reason, and good batches around
//! them are appended once and reach the views.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::time::Duration;

use kappa_cloud::config::CloudConfig;
use kappa_cloud::node::Node;
use kappa_common::batch::{self, EdgeBatch};
use kappa_common::{Reading, frame};

fn reading(device: &str, seq: u64) -> Reading {
    Reading {
        device: device.into(),
        boot: 1,
        seq,
        ts_ms: 1_767_225_600_000 + seq as i64 * 1000,
        schema: 2,
        metrics: [("temperature".to_string(), Some(20.0 + seq as f64))].into(),
        tags: Default::default(),
    }
}

async fn start(dir: &std::path::Path) -> Node {
    let cfg = CloudConfig::from_toml(&format!(
        "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[ingest]\nmax_body_bytes = 65536\n[processor]\ncheckpoint_interval = \"100ms\"\n",
        dir.join("data")
    ))
    .unwrap();
    Node::start(cfg).await.unwrap()
}

async fn post(node: &Node, body: Vec<u8>, encoding: &str) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(format!("http://{}/v1/ingest", node.http_addr()))
        .header("content-encoding", encoding)
        .header("x-kappa-gateway", "gw-1")
        .body(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

async fn get(node: &Node, path: &str) -> String {
    reqwest::get(format!("http://{}{path}", node.http_addr())).await.unwrap().text().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_batches_are_refused_by_reason_and_good_ones_still_land_once() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;

    let good = batch::encode(&EdgeBatch::new("gw-1", 1, (1..=10).map(|s| reading("dev-a", s)).collect()), 3);
    let mut invalid_inside = (11..=14).map(|s| reading("dev-a", s)).collect::<Vec<_>>();
    invalid_inside[1].device = "bad/device".into();
    let invalid_inside = batch::encode(&EdgeBatch::new("gw-1", 2, invalid_inside), 3);
    let mut future_format = EdgeBatch::new("gw-1", 3, vec![reading("dev-a", 20)]);
    future_format.format = 99;
    let bomb = frame::compress(&vec![0u8; 64 << 20], 19);
    let oversized: Vec<u8> = (0..200_000u32).flat_map(|i| i.wrapping_mul(2_654_435_761).to_le_bytes()).collect();
    // A CBOR map nested 5,000 levels deep (random keys, so it does not
    // compress like a bomb): refused at the parser's recursion limit.
    let mut deep = Vec::new();
    let mut x = 0x9e37_79b9_u32;
    for _ in 0..5_000 {
        deep.extend_from_slice(&[0xa1, 0x68]);
        for _ in 0..8 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            deep.push(b'a' + (x % 26) as u8);
        }
    }
    deep.push(0x00);
    let nested = frame::compress(&deep, 3);

    let cases: Vec<(&str, Vec<u8>, &str, u16, &str)> = vec![
        ("good batch", good.clone(), "zstd", 200, "\"accepted\":10"),
        ("the same batch again", good.clone(), "zstd", 200, "\"duplicate\":true"),
        ("one invalid reading inside", invalid_inside, "zstd", 200, "\"rejected\":1"),
        ("not zstd at all", b"hello".to_vec(), "zstd", 400, "corrupt_frame"),
        ("zstd of garbage", frame::compress(b"\xff\xfe not cbor", 1), "zstd", 400, "malformed_batch"),
        ("unknown batch format", batch::encode(&future_format, 3), "zstd", 400, "unknown_batch_format"),
        ("a zstd bomb", bomb, "zstd", 413, "decompression_bomb"),
        ("5,000 levels of nesting", nested, "zstd", 400, "malformed_batch"),
        ("an oversized body", oversized, "zstd", 413, "body_too_large"),
        ("wrong content encoding", good, "gzip", 415, "unsupported_encoding"),
    ];
    for (what, body, encoding, status, needle) in cases {
        let (got, text) = post(&node, body, encoding).await;
        assert_eq!(got, status, "{what}: {text}");
        assert!(text.contains(needle), "{what}: expected {needle:?} in {text}");
    }

    let metrics = get(&node, "/metrics").await;
    for (reason, n) in [
        ("corrupt_frame", 1),
        ("malformed_batch", 2),
        ("unknown_batch_format", 1),
        ("decompression_bomb", 1),
        ("body_too_large", 1),
        ("unsupported_encoding", 1),
    ] {
        assert!(
            metrics.contains(&format!("kappa_cloud_ingest_rejected_total{{reason=\"{reason}\"}} {n}")),
            "{reason}:\n{metrics}"
        );
    }
    assert!(metrics.contains("kappa_cloud_readings_rejected_total{reason=\"bad_device_id\"} 1"), "{metrics}");
    assert!(metrics.contains("kappa_cloud_readings_ingested_total 13"), "{metrics}");

    // Exactly the 13 valid readings reach the views, once.
    let totals = devices_count(&node, 13).await;
    assert!(totals.contains("\"key\":\"dev-a\""), "{totals}");
    node.shutdown();
    node.wait().await.unwrap();
}

/// Waits (generously) until `/v1/devices` shows `count` readings.
async fn devices_count(node: &Node, count: u64) -> String {
    let needle = format!("\"count\":{count}");
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            let body = get(node, "/v1/devices").await;
            if body.contains(&needle) {
                return body;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{count} readings in the views"))
}

/// The log loses its last commit after the views checkpointed past it (a
/// power cut under `durability = "normal"`; the same rows deleted by hand
/// here). The node restarts, records the hole, and appends new readings
/// after it, so they reach the views instead of landing at offsets the
/// views have passed. (The negative control, without the hole, is
/// `eventlog::sqlite::tests::records_appended_after_the_log_lost_commits_its_readers_saw_reach_those_readers`.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readings_after_the_log_lost_commits_the_views_had_read_still_reach_the_views() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    let first = batch::encode(&EdgeBatch::new("gw-1", 1, (1..=10).map(|s| reading("dev-a", s)).collect()), 3);
    assert_eq!(post(&node, first, "zstd").await.0, 200);
    devices_count(&node, 10).await;
    node.shutdown();
    node.wait().await.unwrap();

    let log = rusqlite::Connection::open(dir.path().join("data/eventlog.sqlite")).unwrap();
    // Every record the node appended (the readings and the batch's markers), all read by the views.
    let lost: i64 = log.query_row("SELECT count(*) FROM log", [], |r| r.get(0)).unwrap();
    log.execute_batch("DELETE FROM log; DELETE FROM batches;").unwrap();
    drop(log);

    let node = start(dir.path()).await;
    let second = batch::encode(&EdgeBatch::new("gw-1", 2, (11..=20).map(|s| reading("dev-a", s)).collect()), 3);
    assert_eq!(post(&node, second, "zstd").await.0, 200);
    devices_count(&node, 20).await;
    let metrics = get(&node, "/metrics").await;
    assert!(metrics.contains(&format!("kappa_cloud_log_hole_offsets_total {lost}\n")), "{lost}: {metrics}");
    node.shutdown();
    node.wait().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_query_api_pages_windows_and_refuses_bad_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(dir.path()).await;
    // 5 minutes of one reading per second: 5 one-minute windows.
    let b = batch::encode(&EdgeBatch::new("gw-1", 1, (0..300).map(|s| reading("dev-b", s)).collect()), 3);
    assert_eq!(post(&node, b, "zstd").await.0, 200);

    let page: serde_json::Value = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let body = get(&node, "/v1/devices/dev-b/windows?limit=2").await;
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if v["rows"].as_array().is_some_and(|r| r.len() == 2) && v["rows"][0]["values"]["count"] == 60 {
                return v;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("windows appear");
    assert_eq!(page["rows"][0]["window_start_ms"], 1_767_225_600_000i64);
    assert_eq!(page["rows"][0]["values"]["temperature_min"], 20.0);
    assert_eq!(page["rows"][0]["values"]["temperature_max"], 79.0);
    assert_eq!(page["view"], "device_windows@1");
    let next = page["next"].as_str().unwrap();
    let rest: serde_json::Value =
        serde_json::from_str(&get(&node, &format!("/v1/devices/dev-b/windows?after={next}")).await).unwrap();
    assert_eq!(rest["rows"].as_array().unwrap().len(), 3);
    assert!(rest["next"].is_null());

    let ranged: serde_json::Value = serde_json::from_str(
        &get(&node, "/v1/devices/dev-b/windows?from=2026-01-01T00:01:00Z&to=2026-01-01T00:03:00Z").await,
    )
    .unwrap();
    assert_eq!(ranged["rows"].as_array().unwrap().len(), 2);

    let bad =
        reqwest::get(format!("http://{}/v1/devices/dev-b/windows?from=yesterday", node.http_addr())).await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let missing = reqwest::get(format!("http://{}/v1/views/nope/rows", node.http_addr())).await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);

    // Definitions read as a config writes them, not as Rust types.
    let views: serde_json::Value = serde_json::from_str(&get(&node, "/v1/views").await).unwrap();
    let windows = views["views"].as_array().unwrap().iter().find(|v| v["id"] == "device_windows@1").unwrap();
    let definition = &windows["definition"];
    assert_eq!((definition["key"].as_str(), definition["window"]["kind"].as_str()), (Some("device"), Some("tumbling")));
    assert!(definition["aggregates"].as_array().unwrap().iter().any(|a| a["fn"] == "count"), "{definition}");
    assert!(!definition.to_string().contains("Count") && !definition.to_string().contains("Tumbling"), "{definition}");

    // Every refusal is JSON with a sentence: a query string that does not
    // read, a route that does not exist, a method a route does not take.
    let client = reqwest::Client::new();
    for (method, path, status, says) in [
        ("GET", "/v1/devices/dev-b/windows?limit=many", 400, "limit"),
        ("GET", "/v1/nope", 404, "/v1/nope"),
        ("GET", "/nope", 404, "docs/api.md"),
        ("DELETE", "/v1/views", 405, "DELETE"),
    ] {
        let url = format!("http://{}{path}", node.http_addr());
        let resp = client.request(method.parse().unwrap(), url).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{method} {path}");
        assert_eq!(resp.headers()["content-type"], "application/json", "{method} {path}");
        let body: serde_json::Value = serde_json::from_str(&resp.text().await.unwrap()).unwrap();
        let error = body["error"].as_str().unwrap_or_default();
        assert!(error.contains(says), "{method} {path}: {body}");
    }
}

/// Over `ingest.max_gateway_readings_per_second` a gateway gets 429 with
/// Retry-After (counted as rate_limited); other gateways are not slowed, and
/// the same batch passes once the wait is over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_over_its_rate_gets_429_with_retry_after_and_others_pass() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = CloudConfig::from_toml(&format!(
        "data_dir = {:?}\n[http]\nlisten = \"127.0.0.1:0\"\n[ingest]\nmax_gateway_readings_per_second = 100\n",
        dir.path().join("data")
    ))
    .unwrap();
    let node = Node::start(cfg).await.unwrap();
    let send = |gateway: &'static str, id: u64, n: u64| {
        let url = format!("http://{}/v1/ingest", node.http_addr());
        let body = batch::encode(
            &EdgeBatch::new(gateway, id, (1..=n).map(|s| reading(gateway, id * 10_000 + s)).collect()),
            3,
        );
        async move {
            let resp =
                reqwest::Client::new().post(url).header("content-encoding", "zstd").body(body).send().await.unwrap();
            let retry = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
            (resp.status().as_u16(), retry, resp.text().await.unwrap())
        }
    };
    // The bucket holds 10 s (1,000 readings): a batch of 1,500 passes from a
    // full bucket and leaves 500 in debt, so the next one waits ~5 s.
    assert_eq!(send("gw-1", 1, 1500).await.0, 200);
    let (status, retry, body) = send("gw-1", 2, 10).await;
    assert_eq!(status, 429, "{body}");
    assert!(body.contains("\"reason\":\"rate_limited\""), "{body}");
    assert!(matches!(retry, Some(5..=6)), "Retry-After {retry:?}");
    assert_eq!(send("gw-2", 3, 10).await.0, 200, "another gateway has its own bucket");
    let metrics = get(&node, "/metrics").await;
    assert!(metrics.contains("kappa_cloud_ingest_rejected_total{reason=\"rate_limited\"} 1"), "{metrics}");
    tokio::time::sleep(Duration::from_secs(retry.unwrap_or(6))).await;
    assert_eq!(send("gw-1", 2, 10).await.0, 200, "after the wait the batch passes");
}
