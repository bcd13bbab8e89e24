//! Ingest into the event log on Kafka: HTTP batches through the ingest
//! handler into a topic on a real Kafka-protocol broker (tansu), side by side
//! in one run with rdkafka's own producer sending the same records (same
//! keys, same bytes, same idempotent `acks=all` settings) straight to the
//! broker, and with ingest into the embedded log for scale.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use kappa_cloud::eventlog::LogAppender;
use kappa_cloud::eventlog::kafka::{KafkaLog, KafkaLogConfig};
use kappa_cloud::eventlog::sqlite::SqliteLog;
use kappa_cloud::ingest::{self, IngestState};
use kappa_cloud::metrics::CloudMetrics;
use kappa_common::batch::{self, EdgeBatch};
use kappa_common::partition::partition_for;
use kappa_common::record::{self, LogEvent, LogRecord};
use rdkafka::ClientConfig;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{Value, json};

const PARTITIONS: u32 = 8;
const BATCH_READINGS: usize = 5000;
const IN_FLIGHT: usize = 4;

pub(super) fn log_config(brokers: &str, topic: &str) -> KafkaLogConfig {
    KafkaLogConfig {
        brokers: brokers.into(),
        topic: topic.into(),
        create_topic: true,
        replication_factor: 1,
        delivery_timeout: Duration::from_secs(30),
        properties: Default::default(),
    }
}

pub fn ingest(dir: &Path, scale: f64) -> Value {
    let Some(bin) = crate::tansu_binary() else {
        println!("kafka ingest: skipped (no tansu broker; .ci/run builds it, or set KAPPA_TANSU)");
        return json!({ "skipped": "no tansu broker" });
    };
    let port = super::free_port();
    let listener = format!("tcp://127.0.0.1:{port}");
    let mut broker = std::process::Command::new(bin)
        .args(["broker", "--listener-url", &listener, "--advertised-listener-url", &listener])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    super::wait_port(port);
    let brokers = format!("127.0.0.1:{port}");
    let readings = super::fleet_readings(1000, (200.0 * scale).max(10.0) as u64);
    let n = readings.len();
    let batches: Vec<EdgeBatch> = readings
        .chunks(BATCH_READINGS)
        .enumerate()
        .map(|(i, c)| EdgeBatch::new("gw-bench-01", i as u64 + 1, c.to_vec()).with_format(batch::COLUMNAR_FORMAT))
        .collect();
    let bodies: Vec<Vec<u8>> = batches.iter().map(|b| batch::encode(b, 3)).collect();
    // What ingest appends for each reading: the same keys and bytes go to the producer baseline.
    let records: Vec<(String, Vec<u8>)> = readings
        .iter()
        .map(|r| {
            let value = record::encode(&LogRecord {
                gateway: "gw-bench-01".into(),
                batch_id: 1,
                ingest_ms: 0,
                event: LogEvent::Reading(r.clone()),
            });
            (r.device.clone(), value)
        })
        .collect();
    let record_bytes = records.iter().map(|(_, v)| v.len()).sum::<usize>() as f64 / n as f64;

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // Alternating rounds, so neither side gets the cold broker; medians reported.
    let rounds = if scale < 1.0 { 1 } else { 3 };
    let (mut producer, mut kafka) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let log = KafkaLog::connect(log_config(&brokers, "bench-ingest"), PARTITIONS).await.unwrap();
        let appender = log.appender().unwrap();
        let baseline = baseline_producer(&brokers).await;
        // Warm-up, untimed: connections, metadata and the broker's first segments.
        produce_all(&baseline, "bench-producer", PARTITIONS, &records[..records.len().min(2000)]).await;
        http_ingest(appender.clone(), &bodies[..1], 1).await;
        for _ in 0..rounds {
            producer.push(produce_all(&baseline, "bench-producer", PARTITIONS, &records).await);
            kafka.push(http_ingest(appender.clone(), &bodies, n).await);
        }
    });
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (producer_per_s, kafka_per_s) = (median(&mut producer), median(&mut kafka));
    let sqlite_per_s = rt.block_on(async {
        let log = SqliteLog::open(
            &dir.join("kafka-bench-eventlog.sqlite"),
            PARTITIONS,
            kappa_cloud::config::Durability::Full,
        )
        .unwrap();
        http_ingest(log.start_writer(256).unwrap(), &bodies, n).await
    });
    let _ = broker.kill();
    let _ = broker.wait();
    println!(
        "kafka ingest ({n} readings, {record_bytes:.0}-byte records, {PARTITIONS} partitions, tansu in memory): HTTP ingest -> Kafka {kafka_per_s:.0} readings/s (median of {rounds}; runs {kafka:.0?}); rdkafka's producer alone {producer_per_s:.0} records/s (runs {producer:.0?}); ratio {:.2}; HTTP ingest -> embedded log {sqlite_per_s:.0} readings/s",
        kafka_per_s / producer_per_s
    );
    json!({
        "readings": n, "record_bytes": record_bytes, "partitions": PARTITIONS, "broker": "tansu 0.6.0, memory storage",
        "http_ingest_kafka_readings_per_s": kafka_per_s,
        "rdkafka_producer_records_per_s": producer_per_s,
        "runs": { "http_ingest_kafka": kafka, "rdkafka_producer": producer },
        "ratio_to_producer": kafka_per_s / producer_per_s,
        "http_ingest_embedded_log_readings_per_s": sqlite_per_s,
        "batch_readings": BATCH_READINGS, "requests_in_flight": IN_FLIGHT,
    })
}

/// rdkafka's producer, configured as the log's (idempotent, `acks=all`).
pub(super) async fn baseline_producer(brokers: &str) -> FutureProducer {
    baseline_producer_on(brokers, "bench-producer", PARTITIONS).await
}

/// [`baseline_producer`], creating `topic` with `partitions` first.
pub(super) async fn baseline_producer_on(brokers: &str, topic: &str, partitions: u32) -> FutureProducer {
    KafkaLog::connect(log_config(brokers, topic), partitions).await.unwrap();
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("message.timeout.ms", "30000")
        .create()
        .unwrap()
}

/// rdkafka's producer alone: every record queued, then every delivery awaited.
pub async fn produce_all(
    producer: &FutureProducer,
    topic: &str,
    partitions: u32,
    records: &[(String, Vec<u8>)],
) -> f64 {
    let t = Instant::now();
    let mut deliveries = Vec::with_capacity(records.len());
    for (key, value) in records {
        let p = partition_for(key, partitions) as i32;
        loop {
            match producer.send_result(FutureRecord::to(topic).key(key).payload(value).partition(p)) {
                Ok(d) => {
                    deliveries.push(d);
                    break;
                }
                // The local queue is full: let deliveries drain it.
                Err((_, _)) => tokio::time::sleep(Duration::from_millis(1)).await,
            }
        }
    }
    for d in deliveries {
        d.await.unwrap().unwrap();
    }
    records.len() as f64 / t.elapsed().as_secs_f64()
}

/// The ingest handler on a loopback port over `appender`; `bodies` POSTed
/// with `IN_FLIGHT` requests at a time. Returns readings per second.
async fn http_ingest<A: LogAppender + std::fmt::Debug>(appender: A, bodies: &[Vec<u8>], n: usize) -> f64 {
    let cfg = kappa_cloud::config::CloudConfig::from_toml("").unwrap();
    let metrics = Arc::new(CloudMetrics::new(&mut prometheus_client::registry::Registry::default()));
    let state =
        IngestState::new(appender, &cfg.ingest, PARTITIONS, cfg.http.body_read_timeout, metrics, Default::default());
    let app = Router::new().route("/v1/ingest", post(ingest::ingest::<A>)).with_state(Arc::new(state));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/v1/ingest", listener.local_addr().unwrap());
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let t = Instant::now();
    for group in bodies.chunks(IN_FLIGHT) {
        let posts: Vec<_> = group
            .iter()
            .map(|body| {
                let req = client.post(&url).header("content-encoding", "zstd").body(body.clone());
                tokio::spawn(async move {
                    let resp = req.send().await.unwrap();
                    assert_eq!(resp.status().as_u16(), 200, "{}", resp.text().await.unwrap_or_default());
                })
            })
            .collect();
        for post in posts {
            post.await.unwrap();
        }
    }
    let per_s = n as f64 / t.elapsed().as_secs_f64();
    server.abort();
    per_s
}
