//! The event log on a real Kafka-protocol broker (tansu): the same views as
//! the embedded log, and a broker outage that never gets a 2xx from ingest
//! and loses nothing. The negative control answers before Kafka confirms
//! and shows that the outage test catches it.

use std::time::Duration;

use kappa_tests::harness::*;

/// A node's config for the Kafka log on `broker`, with `extra` after it.
fn kafka_config(broker: &Tansu, topic: &str, extra: &str) -> String {
    format!(
        "[log]\nbackend = \"kafka\"\npartitions = 6\n[log.kafka]\nbrokers = \"{}\"\ntopic = \"{topic}\"\n\
         delivery_timeout = \"3s\"\n{extra}",
        broker.brokers()
    )
}

/// The reference scenario (late data, duplicates inside batches) into a node
/// on the embedded log and a node on Kafka: the views are identical, also
/// when batches reach the Kafka node twice (Kafka does not recognise resent
/// batches; the processor drops the repeated readings and partials).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kafka_log_gives_the_same_views_as_the_embedded_log() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Tansu::start(dir.path()).await;
    let batches = scenario(true);
    let views = crate::processor::config(5000, 500);
    // Aggregate partials ride along: a resent batch must not merge them twice.
    let partials: Vec<kappa_common::batch::EdgeBatch> = (0..3u64)
        .map(|i| {
            let a = kappa_common::aggregate::Aggregate {
                device: format!("dev-{i:02}"),
                metric: "temperature".into(),
                window_ms: 60_000,
                start_ms: T0,
                count: 10,
                min: 1.0,
                max: 3.0,
                sum: 20.0,
                sum_sq: 44.0,
                first_ts: T0,
                first: 1.0,
                last_ts: T0 + 9_000,
                last: 3.0,
            };
            kappa_common::batch::EdgeBatch::new("gw-agg", 100 + i, Vec::new()).with_aggregates(vec![a])
        })
        .collect();

    let mut embedded = Cloud::start_with(dir.path(), "embedded", &format!("[log]\npartitions = 6\n{views}"), &[]).await;
    let records = ingest(&embedded, &batches).await;
    ingest(&embedded, &partials).await;
    crate::processor::until_processed(&embedded, records).await;

    let mut kafka = Cloud::start_with(dir.path(), "kafka", &kafka_config(&broker, "events", &views), &[]).await;
    ingest(&kafka, &batches[..10]).await;
    ingest(&kafka, &batches).await; // the first ten again, then the rest
    ingest(&kafka, &partials).await;
    ingest(&kafka, &partials[..1]).await;
    crate::processor::until_processed(&kafka, records + 10 * 500).await;

    let aggregates = |c: &Cloud| {
        let url = format!("{}/v1/aggregates?limit=100", c.url());
        async move { reqwest::get(url).await.unwrap().text().await.unwrap() }
    };
    wait_for("the partials to be stored", Duration::from_secs(30), || async {
        aggregates(&kafka).await.contains("dev-02").then_some(())
    })
    .await;
    assert_eq!(aggregates(&embedded).await, aggregates(&kafka).await, "edge aggregates differ between the logs");
    let stored = aggregates(&kafka).await;
    assert_eq!(stored.matches("\"n\":10,").count(), 3, "each partial merged once: {stored}");
    let duplicates = series(&kafka.url(), "kappa_cloud_readings_duplicate_total").await;
    assert!(duplicates >= 10.0 * 500.0, "the resent readings were dropped as duplicates: {duplicates}");

    assert!(embedded.proc.terminate().await.success());
    assert!(kafka.proc.terminate().await.success());
    let (a, b) = (embedded.dump().await, kafka.dump().await);
    assert!(a.lines().count() > 100 && a.contains("\tlate\n"), "the scenario fills the views and has late data");
    assert!(a == b, "the views differ between the embedded log and Kafka:\n{}", first_difference(&a, &b));
    // The node starts again on the same topic and goes on from its checkpoint.
    kafka.restart().await;
    ingest(&kafka, &partials[1..2]).await;
    assert!(kafka.proc.terminate().await.success());
    assert_eq!(kafka.dump().await, b, "a restart and a resent batch change nothing");
}

/// Runs a fleet through edge and a Kafka-log cloud and pauses the broker
/// (SIGSTOP) for `pause` mid-stream. Returns the ground truth, the rows, and
/// how many ingest requests were answered 2xx and 503 while it was paused.
async fn broker_outage(dir: &std::path::Path, pause: Duration, env: &[(&str, &str)]) -> Outage {
    let broker = Tansu::start(dir).await;
    let config = kafka_config(&broker, "events", FLEET_PROCESSOR);
    let cloud = Cloud::start_with(dir, "cloud", &config, env).await;
    let mqtt_port = free_port();
    let edge = Edge::start(dir, Mqtt::Embedded(mqtt_port), &cloud.url()).await;
    let readings = 10 * (pause.as_secs() + 30);
    let mut sim = Fleet::new(20, readings, 10.0).start(mqtt_port, dir);
    wait_for_readings(&cloud.url(), 2_000, Duration::from_secs(60)).await;

    broker.proc.signal(libc::SIGSTOP);
    // Every append in flight at the pause has its answer within the
    // delivery timeout (3 s): 2xx if Kafka confirmed it before the stop, 503
    // if not. On a busy machine a confirmed one can take a while to answer,
    // so the count starts once that timeout has passed. The broker stays
    // paused for `pause` in all (longer would pass the processor's 30 s idle
    // timeout, a different scenario).
    let grace = Duration::from_secs(4);
    tokio::time::sleep(grace).await;
    let accepted = r#"kappa_cloud_ingest_requests_total{result="accepted"}"#;
    let unavailable = r#"kappa_cloud_ingest_requests_total{result="unavailable"}"#;
    let (ok0, no0) = (series(&cloud.url(), accepted).await, series(&cloud.url(), unavailable).await);
    let backlog0 = edge.metric("kappa_edge_backlog_readings").await.unwrap_or(0.0);
    tokio::time::sleep(pause.saturating_sub(grace)).await;
    let (ok1, no1) = (series(&cloud.url(), accepted).await, series(&cloud.url(), unavailable).await);
    let backlog1 = edge.metric("kappa_edge_backlog_readings").await.unwrap_or(0.0);
    let ready_while_paused = ready(&cloud.url()).await;
    broker.proc.signal(libc::SIGCONT);

    let truth = Fleet::finish(&mut sim, dir).await;
    wait_for_readings(&cloud.url(), truth.acked, Duration::from_secs(120)).await;
    let rows = fetch_rows(&cloud.url(), "device_windows").await;
    let ready_after = ready(&cloud.url()).await;
    Outage {
        truth,
        rows,
        accepted_while_paused: ok1 - ok0,
        refused_while_paused: no1 - no0,
        backlog: (backlog0, backlog1),
        ready: (ready_while_paused, ready_after),
        logs: format!("{}\n{}\n{}", cloud.proc.tail(), edge.proc.tail(), broker.proc.tail()),
    }
}

struct Outage {
    truth: kappa_sim::truth::GroundTruth,
    rows: Vec<kappa_cloud::api::RowOut>,
    accepted_while_paused: f64,
    refused_while_paused: f64,
    backlog: (f64, f64),
    /// `/readyz` status while the broker was paused, and after the drain.
    ready: (u16, u16),
    logs: String,
}

async fn ready(url: &str) -> u16 {
    status(&format!("{url}/readyz")).await
}

/// 30 s without a reachable broker: ingest answers 503 and never 2xx, the
/// edge backlog grows, and afterwards everything drains: 0 lost, 0 twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_outage_gets_503s_grows_the_edge_backlog_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let o = broker_outage(dir.path(), Duration::from_secs(30), &[]).await;
    assert_eq!(o.accepted_while_paused, 0.0, "ingest answered 2xx while the broker was unreachable\n{}", o.logs);
    assert!(o.refused_while_paused > 0.0, "ingest should have answered 503 while the broker was away");
    assert!(o.backlog.1 > o.backlog.0 + 3_000.0, "the edge backlog grows through the outage: {:?}", o.backlog);
    assert_eq!(o.ready, (503, 200), "not ready while the log refuses appends, ready after");
    assert_eq!(o.truth.acked, o.truth.sampled, "every reading was acknowledged to its device");
    let problems = diff_against_truth(&o.truth, &o.rows);
    assert!(problems.is_empty(), "lost or double-counted readings: {problems:?}\n{}", o.logs);
}

/// Negative control: an ingest that answers before Kafka confirms
/// (`KAPPA_TEST_KAFKA_ACK_BEFORE_DELIVERY`) says 2xx during the outage and
/// loses the records whose delivery then times out; the checks above fail.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_answering_before_delivery_loses_readings_in_a_broker_outage() {
    let dir = tempfile::tempdir().unwrap();
    let env = [(kappa_cloud::eventlog::kafka::FAULT_ACK_BEFORE_DELIVERY, "1")];
    let o = broker_outage(dir.path(), Duration::from_secs(12), &env).await;
    assert!(o.accepted_while_paused > 0.0, "the faulty ingest answers 2xx while the broker is unreachable");
    let problems = diff_against_truth(&o.truth, &o.rows);
    assert!(!problems.is_empty(), "answering before delivery should lose readings when deliveries time out");
}
