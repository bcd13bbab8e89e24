//! Ingest nodes of a fixed size behind the edge (docs/cluster.md): 1, 2 and
//! 4 `kappa-cloud run` processes (1 and 2 with `--quick`), each in a cgroup
//! of a quarter of a core, ingest-only (`[cluster]` with `primary = false`:
//! no views, alerts or aggregates of their own), appending to a 16-partition
//! topic on tansu. The fleet's readings arrive as the edge sends them
//! (columnar zstd batches of 5,000, 64 gateways), spread over the nodes the
//! way a load balancer would (round robin), four requests in flight per node.
//!
//! Accepted readings/s is readings / wall seconds from the first request to
//! the last 200 (each 200 means the batch's records are in Kafka). Beside
//! each count, in the same run and on a topic of its own, rdkafka's producer
//! sends the same records (same keys and bytes, idempotent, `acks=all`, as
//! the log's appender) straight to the broker from this process, without a
//! budget: the ceiling the nodes are measured against. The broker and
//! PostgreSQL run outside the budgets; their CPU is reported.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappa_common::batch::{self, EdgeBatch};
use kappa_common::record::{self, LogEvent, LogRecord};
use serde_json::{Value, json};

use super::cgroup::Cgroup;
use super::cluster_procs::{ClusterTarget, PARTITIONS, broker_and_postgres, pg_execute};
use super::kafka::{baseline_producer_on, produce_all};
use super::workers::machine_busy_seconds;
use super::{cpu_seconds, wait_port};

/// Each node's CPU budget: microseconds per 100 ms period (a quarter of a
/// core: four nodes use one of the machine's two cores).
const NODE_QUOTA_US: u64 = 25_000;
const BATCH_READINGS: usize = 5000;
const GATEWAYS: usize = 64;
const IN_FLIGHT_PER_NODE: usize = 4;

pub fn run(dir: &Path, scale: f64) -> Value {
    let (broker, brokers, url) = match broker_and_postgres("ingest nodes") {
        Ok(started) => started,
        Err(skipped) => return skipped,
    };

    // 1,000 devices × 1,000 readings (50 each with --quick).
    let readings = super::fleet_readings(1000, ((1000.0 * scale) as u64).max(10));
    let n = readings.len();
    let bodies: Vec<Vec<u8>> = readings
        .chunks(BATCH_READINGS)
        .enumerate()
        .map(|(i, c)| {
            let b = EdgeBatch::new(format!("gw-bench-{:02}", i % GATEWAYS), (i / GATEWAYS) as u64 + 1, c.to_vec());
            batch::encode(&b.with_format(batch::COLUMNAR_FORMAT), 3)
        })
        .collect();
    let records: Vec<(String, Vec<u8>)> = readings
        .iter()
        .map(|r| {
            let event = LogEvent::Reading(r.clone());
            (
                r.device.clone(),
                record::encode(&LogRecord { gateway: "gw-bench-00".into(), batch_id: 1, ingest_ms: 0, event }),
            )
        })
        .collect();
    drop(readings);
    let budget = match Cgroup::new(&format!("kappa-bench-probe-ingest-{}", std::process::id()), NODE_QUOTA_US, None) {
        Ok(_) => Some(NODE_QUOTA_US),
        Err(e) => {
            println!("  ingest nodes: no cgroup ({e}); the nodes run without a CPU budget (needs root)");
            None
        }
    };
    let counts: &[usize] = if scale >= 1.0 { &[1, 2, 4] } else { &[1, 2] };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut out = json!({
        "readings": n, "partitions": PARTITIONS, "broker": "tansu 0.6.0, memory storage",
        "node_cpu_budget_cores": budget.map(|q| q as f64 / 100_000.0),
        "batch_readings": BATCH_READINGS, "gateways": GATEWAYS, "requests_in_flight_per_node": IN_FLIGHT_PER_NODE,
    });
    println!(
        "ingest nodes ({n} readings in batches of {BATCH_READINGS}, {PARTITIONS} partitions on tansu in memory, each node \
         budgeted {}):",
        budget.map_or("nothing (no cgroups)".to_string(), |q| format!("{:.2} of a core", q as f64 / 100_000.0))
    );
    for &nodes in counts {
        let topic = format!("ingest-{nodes}");
        // The producer first, on its own topic: the ceiling in this run.
        let producer_per_s = rt.block_on(async {
            let producer = baseline_producer_on(&brokers, &format!("producer-{nodes}"), PARTITIONS).await;
            kappa_cloud::eventlog::kafka::KafkaLog::connect(super::kafka::log_config(&brokers, &topic), PARTITIONS)
                .await
                .unwrap();
            produce_all(&producer, &format!("producer-{nodes}"), PARTITIONS, &records).await
        });
        let v = measure(dir, &rt, &brokers, &url, &topic, nodes, budget, &bodies, n, broker.0.id());
        let per_s = v["accepted_readings_per_s"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {nodes} node(s): {per_s:.0} readings/s accepted ({:.0} per node CPU-second); rdkafka's producer alone \
             {producer_per_s:.0} records/s; ratio {:.2}; tansu {:.1} CPU-s; machine busy {:.2} cores",
            v["readings_per_node_cpu_second"].as_f64().unwrap_or(f64::NAN),
            per_s / producer_per_s,
            v["broker_cpu_seconds"].as_f64().unwrap_or(f64::NAN),
            v["machine_busy_cores"].as_f64().unwrap_or(f64::NAN),
        );
        out[format!("nodes_{nodes}")] = v;
        out[format!("nodes_{nodes}")]["rdkafka_producer_records_per_s"] = json!(producer_per_s);
        out[format!("nodes_{nodes}")]["ratio_to_producer"] = json!(per_s / producer_per_s);
    }
    drop(broker);
    out
}

/// `nodes` ingest nodes on `topic`; every body posted (round robin over
/// the nodes); their rate, CPU and the broker's.
#[allow(clippy::too_many_arguments)]
fn measure(
    dir: &Path,
    rt: &tokio::runtime::Runtime,
    brokers: &str,
    url: &str,
    topic: &str,
    nodes: usize,
    budget: Option<u64>,
    bodies: &[Vec<u8>],
    n: usize,
    broker_pid: u32,
) -> Value {
    let pid = std::process::id();
    let schema = format!("kappa_bench_ingest{nodes}_{pid}");
    pg_execute(url, &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).unwrap();
    let target = ClusterTarget { brokers, topic, url, schema: &schema };
    let procs: Vec<_> = (0..nodes)
        .map(|i| target.spawn(dir, &format!("ingest-{nodes}-{i}"), "run", "primary = false\n", "warn", budget))
        .collect();
    for (_, port, _) in &procs {
        wait_port(*port);
    }
    let urls: Vec<String> = procs.iter().map(|(_, port, _)| format!("http://127.0.0.1:{port}/v1/ingest")).collect();
    let (broker_cpu0, busy0) = (cpu_seconds(broker_pid), machine_busy_seconds());
    let t = Instant::now();
    let refused = rt.block_on(post_all(&urls, bodies));
    let seconds = t.elapsed().as_secs_f64();
    let cpu: f64 = procs.iter().map(|(c, _, _)| cpu_seconds(c.0.id())).sum();
    let broker_cpu = cpu_seconds(broker_pid) - broker_cpu0;
    let busy_cores = (machine_busy_seconds() - busy0) / seconds;
    drop(procs);
    pg_execute(url, &format!("DROP SCHEMA IF EXISTS {schema} CASCADE")).unwrap();
    if refused > 0 {
        println!("  ingest nodes: {refused} request(s) answered other than 200 (retried)");
    }
    json!({
        "accepted_readings_per_s": n as f64 / seconds,
        "seconds": seconds,
        "node_cpu_seconds": cpu,
        "readings_per_node_cpu_second": n as f64 / cpu.max(0.01),
        "broker_cpu_seconds": broker_cpu,
        "machine_busy_cores": busy_cores,
        // Answers other than 200 (503 while the broker pushed back), each retried until 200.
        "retried_requests": refused,
    })
}

/// Posts every body, round robin over `urls`, `IN_FLIGHT_PER_NODE` at a
/// time per node; a request answered other than 200 is sent again. Returns
/// how many answers were not 200.
async fn post_all(urls: &[String], bodies: &[Vec<u8>]) -> u64 {
    let client = reqwest::Client::new();
    let lanes = urls.len() * IN_FLIGHT_PER_NODE;
    let bodies: Arc<Vec<Vec<u8>>> = Arc::new(bodies.to_vec());
    let mut tasks = tokio::task::JoinSet::new();
    for lane in 0..lanes {
        let (client, url, bodies) = (client.clone(), urls[lane % urls.len()].clone(), bodies.clone());
        tasks.spawn(async move {
            let mut refused = 0;
            for body in bodies.iter().skip(lane).step_by(lanes) {
                loop {
                    let sent = client.post(&url).header("content-encoding", "zstd").body(body.clone()).send().await;
                    match sent {
                        Ok(r) if r.status().as_u16() == 200 => break,
                        _ => {
                            refused += 1;
                            assert!(refused < 1000, "{url} keeps refusing batches");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            }
            refused
        });
    }
    let mut refused = 0;
    while let Some(r) = tasks.join_next().await {
        refused += r.unwrap();
    }
    refused
}
