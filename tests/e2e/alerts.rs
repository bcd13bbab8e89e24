//! Alerts end to end: heartbeats and silence in real time, webhook delivery
//! through failures and a crash, the alert API, alerts to Kafka. (The
//! scoring against a fleet's ground truth runs alone: `tests/alone`.)

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use kappa_common::Reading;
use kappa_common::batch::EdgeBatch;
use serde_json::Value;

use kappa_tests::alert_kit::*;
use kappa_tests::harness::*;

/// A secret in a webhook's address, as receivers often take it.
const SECRET: &str = "whk-7f2c9a1e-do-not-log";

/// Heartbeats from an idle edge keep its gateway's clock going, so devices
/// that stop are declared silent although nothing else arrives; in real time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_edges_heartbeats_let_silence_fire() {
    let dir = tempfile::tempdir().unwrap();
    let rules = "[alerts]\ngateway_lateness = \"1s\"\nsilence_arrival_quiet = \"1s\"\n[[rules]]\nname = \"quiet\"\nkind = \"silence\"\nafter = \"3s\"\n";
    let cloud = Cloud::start_with(dir.path(), "cloud", rules, &[]).await;
    let port = free_port();
    let edge = Edge::start_named(
        dir.path(),
        "edge",
        "gw-hb",
        Mqtt::Embedded(port),
        &cloud.url(),
        "heartbeat_interval = \"500ms\"",
    )
    .await;
    let mut fleet = Fleet::new(5, 20, 5.0);
    fleet.start_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    fleet.event_interval = "200ms".into();
    let mut sim = fleet.start(port, dir.path());
    Fleet::finish(&mut sim, dir.path()).await;
    let alerts = wait_for("every stopped device declared silent", Duration::from_secs(30), || async {
        let a = fetch_alerts(&cloud.url(), &[("rule", "quiet")]).await;
        (a.len() == 5).then_some(a)
    })
    .await;
    assert!(alerts.iter().all(|a| a["state"] == "firing" && a["gateway"] == "gw-hb"), "{alerts:#?}");
    assert!(edge.metric("kappa_edge_heartbeats_total").await.unwrap_or(0.0) > 0.0);
}

/// Readings for `devices` devices, one per second for `n` seconds, where
/// devices overheat (> 50) from second 20 to 40.
pub(crate) fn overheating(devices: u32, n: u64, gateway: &str) -> Vec<EdgeBatch> {
    let mut readings = Vec::new();
    for i in 0..n {
        for d in 0..devices {
            let t = if (20..40).contains(&i) { 60.0 } else { 20.0 };
            readings.push(Reading {
                device: format!("hot-{d:03}"),
                boot: 1,
                seq: i + 1,
                ts_ms: T0 + i as i64 * 1000,
                schema: 2,
                metrics: [("temperature".to_string(), Some(t))].into(),
                tags: BTreeMap::new(),
            });
        }
    }
    readings.chunks(200).enumerate().map(|(i, c)| EdgeBatch::new(gateway, i as u64 + 1, c.to_vec())).collect()
}

/// A webhook receiver that fails, then times out, then recovers, while the
/// cloud is killed with SIGKILL mid-delivery: every transition arrives, any
/// repeat carries the same idempotency key and body. A second webhook that
/// never answers ends in the dead-letter state after its attempts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_deliver_every_alert_through_failures_timeouts_and_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let (port, seen) = receiver(25, 3).await;
    let nobody = free_port();
    let config = format!(
        r#"
[processor]
checkpoint_interval = "200ms"
[[rules]]
name = "overheat"
kind = "threshold"
when = "temperature > 50"
resolve_when = "temperature < 45"
severity = "critical"
[[webhooks]]
name = "ops"
url = "http://127.0.0.1:{port}/hook"
timeout = "300ms"
backoff_initial = "50ms"
backoff_max = "300ms"
max_attempts = 1000
[[webhooks]]
name = "gone"
url = "http://127.0.0.1:{nobody}/hook/{SECRET}?key={SECRET}"
timeout = "200ms"
backoff_initial = "20ms"
backoff_max = "50ms"
max_attempts = 3
"#
    );
    let mut cloud = Cloud::start_with(dir.path(), "cloud", &config, &[]).await;
    let devices = 20;
    ingest(&cloud, &overheating(devices, 60, "gw-hot")).await;
    // Kill the cloud while the receiver is still failing.
    wait_for("delivery attempts", Duration::from_secs(30), || async {
        (seen.lock().unwrap().requests >= 10).then_some(())
    })
    .await;
    cloud.proc.kill9().await;
    let during_crash = seen.lock().unwrap().requests;
    cloud.restart().await;

    let expected: BTreeSet<String> = (0..devices)
        .flat_map(|d| {
            let id = format!("overheat:hot-{d:03}:{}", T0 + 20_000);
            [format!("{id}:fired"), format!("{id}:resolved")]
        })
        .collect();
    wait_for("every transition delivered", Duration::from_secs(60), || async {
        let s = seen.lock().unwrap();
        (s.by_key.keys().cloned().collect::<BTreeSet<_>>() == expected).then_some(())
    })
    .await;
    {
        let s = seen.lock().unwrap();
        assert!(s.requests > during_crash, "deliveries went on after the restart");
        for (key, bodies) in &s.by_key {
            assert!(bodies.iter().all(|b| b == &bodies[0]), "{key} was delivered with different bodies: {bodies:?}");
            let v: Value = serde_json::from_str(&bodies[0]).unwrap();
            assert_eq!(format!("{}:{}", v["id"].as_str().unwrap(), v["transition"].as_str().unwrap()), *key);
        }
    }

    // The unreachable webhook: every row dead-lettered with its error.
    let id = format!("overheat:hot-000:{}", T0 + 20_000);
    let detail = wait_for("the unreachable webhook's rows to be dead-lettered", Duration::from_secs(30), || async {
        let v: Value = reqwest::get(format!("{}/v1/alerts/{id}", cloud.url())).await.ok()?.json().await.ok()?;
        let gone: Vec<&Value> = v["deliveries"].as_array()?.iter().filter(|d| d["webhook"] == "gone").collect();
        (gone.len() == 2 && gone.iter().all(|d| d["state"] == "dead")).then(|| v.clone())
    })
    .await;
    let gone = detail["deliveries"].as_array().unwrap().iter().find(|d| d["webhook"] == "gone").unwrap();
    assert_eq!(gone["attempts"], 3);
    assert!(gone["last_error"].as_str().unwrap().contains("connect"), "{gone}");
    // The webhook's address holds its secret: it is in no stored error the
    // API serves, and in no log line.
    assert!(!detail.to_string().contains(SECRET), "the webhook's secret is served: {detail}");
    let log = std::fs::read_to_string(&cloud.proc.log).unwrap();
    assert!(!log.contains(SECRET), "the webhook's secret is in the log");
    assert!(log.contains("Webhook delivery started"), "{log}");
    assert_eq!(detail["history"].as_array().unwrap().len(), 2, "fired and resolved: {detail}");
}

/// The alert API: filters, one alert with its history, acknowledgement.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_alert_api_filters_pages_and_acknowledges() {
    let dir = tempfile::tempdir().unwrap();
    let config = "[processor]\ncheckpoint_interval = \"200ms\"\n[[rules]]\nname = \"overheat\"\nkind = \"threshold\"\nwhen = \"temperature > 50\"\nseverity = \"critical\"\n[[rules]]\nname = \"warm\"\nkind = \"threshold\"\nwhen = \"temperature > 30\"\nseverity = \"info\"\n";
    let cloud = Cloud::start_with(dir.path(), "cloud", config, &[]).await;
    // 5 devices overheat from 20 s to 40 s: both rules fire, and resolve at 40 s.
    ingest(&cloud, &overheating(5, 41, "gw-api")).await;
    let all = wait_for("ten resolved alerts", Duration::from_secs(30), || async {
        let a = fetch_alerts(&cloud.url(), &[("state", "resolved")]).await;
        (a.len() == 10).then_some(a)
    })
    .await;
    assert!(all.iter().all(|a| a["resolved_ms"] == T0 + 40_000));
    assert_eq!(fetch_alerts(&cloud.url(), &[("severity", "critical")]).await.len(), 5);
    assert_eq!(fetch_alerts(&cloud.url(), &[("device", "hot-003")]).await.len(), 2);
    assert_eq!(fetch_alerts(&cloud.url(), &[("rule", "warm"), ("state", "firing")]).await.len(), 0);
    assert_eq!(fetch_alerts(&cloud.url(), &[("from", &(T0 + 20_001).to_string())]).await.len(), 0);
    // Pages of 3 cover all 10 without repeats.
    let client = reqwest::Client::new();
    let (mut ids, mut after) = (BTreeSet::new(), None::<String>);
    loop {
        let mut req = client.get(format!("{}/v1/alerts", cloud.url())).query(&[("limit", "3")]);
        if let Some(a) = &after {
            req = req.query(&[("after", a)]);
        }
        let page: Value = req.send().await.unwrap().json().await.unwrap();
        for a in page["alerts"].as_array().unwrap() {
            assert!(ids.insert(a["id"].as_str().unwrap().to_string()), "repeated {a}");
        }
        match page["next"].as_str() {
            Some(n) => after = Some(n.to_string()),
            None => break,
        }
    }
    assert_eq!(ids.len(), 10);
    let id = format!("overheat:hot-001:{}", T0 + 20_000);
    let resp = client
        .post(format!("{}/v1/alerts/{id}/ack", cloud.url()))
        .json(&serde_json::json!({ "by": "alice", "note": "replacing the fan" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = client.get(format!("{}/v1/alerts/{id}", cloud.url())).send().await.unwrap().json().await.unwrap();
    assert_eq!((v["acked"]["by"].as_str(), v["history"].as_array().map(Vec::len)), (Some("alice"), Some(2)));
    // Bad input: clear errors, not crashes.
    let bad = client.get(format!("{}/v1/alerts?severity=loud", cloud.url())).send().await.unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    let missing = client
        .post(format!("{}/v1/alerts/nope/ack", cloud.url()))
        .json(&serde_json::json!({"by": "a"}))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let empty = client
        .post(format!("{}/v1/alerts/{id}/ack", cloud.url()))
        .body("{")
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(empty.status().as_u16(), 400);
}

/// Alerts produced to a Kafka topic on a real Kafka-protocol broker (tansu),
/// through a 5 s pause of the broker (SIGSTOP): every transition arrives,
/// keyed by alert id, and any repeat carries the same idempotency key and body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_reach_a_kafka_topic_through_a_broker_pause() {
    use rdkafka::Message;
    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::message::Headers;

    let dir = tempfile::tempdir().unwrap();
    let broker = Tansu::start(dir.path()).await;
    let port = broker.port;
    let config = format!(
        "[processor]\ncheckpoint_interval = \"200ms\"\n[alerts.kafka]\nbrokers = \"127.0.0.1:{port}\"\ntopic = \"alerts\"\npartitions = 3\ntimeout = \"3s\"\n\
         [[rules]]\nname = \"overheat\"\nkind = \"threshold\"\nwhen = \"temperature > 50\"\nresolve_when = \"temperature < 45\"\nseverity = \"critical\"\n"
    );
    let cloud = Cloud::start_with(dir.path(), "cloud", &config, &[]).await;
    let log = cloud.proc.log.clone();
    wait_for("the cloud's Kafka producer", Duration::from_secs(30), || {
        let log = log.clone();
        async move { std::fs::read_to_string(&log).ok()?.contains("Alerts go to Kafka.").then_some(()) }
    })
    .await;
    // The broker stops answering before the alerts are raised and stays
    // paused for 5 s: the first produce times out (3 s) and is retried.
    broker.proc.signal(libc::SIGSTOP);
    let devices = 10;
    ingest(&cloud, &overheating(devices, 30, "gw-kafka")).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    broker.proc.signal(libc::SIGCONT);
    ingest(&cloud, &overheating(devices, 60, "gw-kafka").split_off(2)).await;

    let expected: BTreeSet<String> = (0..devices)
        .flat_map(|d| {
            let id = format!("overheat:hot-{d:03}:{}", T0 + 20_000);
            [format!("{id}:fired"), format!("{id}:resolved")]
        })
        .collect();
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", format!("127.0.0.1:{port}"))
        .set("group.id", format!("kappa-test-{port}"))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    consumer.subscribe(&["alerts"]).unwrap();
    let mut by_key: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while by_key.keys().cloned().collect::<BTreeSet<_>>() != expected {
        assert!(
            std::time::Instant::now() < deadline,
            "not every transition reached the topic: got {:?}\n{}\n{}",
            by_key.keys().collect::<Vec<_>>(),
            cloud.proc.tail(),
            broker.proc.tail()
        );
        let polled = tokio::task::block_in_place(|| consumer.poll(Duration::from_millis(500)));
        let Some(Ok(m)) = polled else { continue };
        let key = String::from_utf8_lossy(m.key().unwrap_or_default()).to_string();
        let body = String::from_utf8_lossy(m.payload().unwrap_or_default()).to_string();
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.map(|v| String::from_utf8_lossy(v).to_string())))
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        let idem =
            headers.iter().find(|(k, _)| k == "idempotency-key").and_then(|(_, v)| v.clone()).unwrap_or_default();
        assert!(idem.starts_with(&key), "the message key is the alert id: {key} vs {idem}");
        by_key.entry(idem).or_default().push((key, body));
    }
    for (idem, copies) in &by_key {
        assert!(copies.iter().all(|c| c == &copies[0]), "{idem} was produced with different contents: {copies:?}");
        let v: Value = serde_json::from_str(&copies[0].1).unwrap();
        assert_eq!(format!("{}:{}", v["id"].as_str().unwrap(), v["transition"].as_str().unwrap()), *idem);
    }
    let id = format!("overheat:hot-000:{}", T0 + 20_000);
    let v: Value = reqwest::get(format!("{}/v1/alerts/{id}", cloud.url())).await.unwrap().json().await.unwrap();
    let kafka: Vec<&Value> = v["deliveries"].as_array().unwrap().iter().filter(|d| d["webhook"] == "#kafka").collect();
    assert!(kafka.len() == 2 && kafka.iter().all(|d| d["state"] == "delivered"), "{v}");
    let text = reqwest::get(format!("{}/metrics", cloud.url())).await.unwrap().text().await.unwrap();
    let failed = text
        .lines()
        .find(|l| l.starts_with("kappa_cloud_webhook_deliveries_total") && l.contains("#kafka") && l.contains("failed"))
        .and_then(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .unwrap_or(0.0);
    assert!(failed >= 1.0, "the pause should have failed at least one produce:\n{text}");
}
