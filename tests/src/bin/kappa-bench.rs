//! `kappa-bench`: baseline throughput and wire-cost figures. It measures and
//! reports; it asserts nothing about speed.
//!
//!   cargo run --release -p kappa-tests --bin kappa-bench            # full run: every section 3 times (medians, min-max)
//!   cargo run --release -p kappa-tests --bin kappa-bench -- --quick # seconds, proves the harness runs
//!
//! Figures: the machine (CPU, cores, memory, fsync latency of the data
//! directory), edge log commit throughput, edge ingest through MQTT per agent
//! CPU-second, cloud processor throughput, bytes per reading on the
//! edge-to-cloud link including HTTP framing, and ingest into the log on
//! Kafka beside rdkafka's own producer, and the views computed from Kafka
//! into PostgreSQL by 1 and then 2 workers in a consumer group; beside the
//! peers, in the same run, Spark Structured Streaming on the same tumbling
//! view (rows compared) and a Mosquitto bridge's bytes per reading; the highest end-to-end rate whose
//! p99 event-to-view latency stays within 1 s; the criterion
//! micro-benchmarks; binary sizes. It first measures the machine's
//! limits (fsync, memory bandwidth, loopback TCP) and writes, next to the
//! JSON, a Markdown summary with each figure bounded by one of them as a
//! ratio to it, and an SVG chart of throughput and p99 latency per stage.
//! JSON goes to `target/bench/baseline.json` (or `--out`).

#![allow(clippy::unwrap_used, clippy::expect_used)] // a measuring tool: any failure aborts the run loudly

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappa_cloud::eventlog::sqlite::SqliteLog;
use kappa_cloud::eventlog::{AppendBatch, AppendRecord, LogAppender};
use kappa_cloud::metrics::CloudMetrics;
use kappa_cloud::processor::{Processor, ProcessorSettings};
use kappa_cloud::store::ViewStore;
use kappa_common::batch::{self, EdgeBatch};
use kappa_common::record::{self, LogEvent, LogRecord};
use kappa_common::{Reading, device};
use kappa_edge::config::Durability;
use kappa_edge::forward::client::{CloudClient, PostOutcome};
use kappa_edge::log::{EdgeLog, Entry};
use kappa_sim::firmware::{Encoding, Firmware, Schema};
use kappa_sim::signal::device_seed;
use serde_json::{Value, json};

#[path = "../bench/alerts.rs"]
mod alerts;
#[path = "../bench/bridge.rs"]
mod bridge;
#[path = "../bench/chart.rs"]
mod chart;
#[path = "../bench/e2e.rs"]
mod e2e;
#[path = "../bench/edge_ingest.rs"]
mod edge_ingest;
#[path = "../bench/kafka.rs"]
mod kafka;
#[path = "../bench/micro.rs"]
mod micro;
#[path = "../bench/spark.rs"]
mod spark;
#[path = "../bench/summary.rs"]
mod summary;
#[path = "../bench/workers.rs"]
mod workers;

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1).peekable();
    if let Some(role) = args.peek().map(|a| a.to_string_lossy().into_owned())
        && matches!(role.as_str(), "edge" | "cloud" | "sim")
    {
        args.next();
        return kappa_tests::run_role(&role, args).unwrap_or(ExitCode::FAILURE);
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let out = args
        .iter()
        .position(|a| a == "--out")
        .and_then(|i| args.get(i + 1))
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("target/bench/baseline.json"));
    let scale = if quick { 0.05 } else { 1.0 };
    let dir = tempfile::Builder::new().prefix("kappa-bench-").tempdir_in(std::env::temp_dir()).unwrap();

    // `--only a,b` runs just those sections (names as in the JSON report).
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.split(',').map(str::to_string).collect());
    let wanted = |name: &str| only.as_ref().is_none_or(|o| o.iter().any(|x| x == name));
    let mut report = BTreeMap::new();
    let mut machine = machine(dir.path());
    machine["limits"] = summary::limits(scale);
    report.insert("machine", machine);
    type Section = fn(&Path, f64) -> Value;
    let sections: [(&str, Section); 16] = [
        ("edge_log_commit", edge_log_commit),
        ("edge_ingest_mqtt", edge_ingest::run),
        ("cloud_processor", cloud_processor),
        ("processor_views_100k_keys", processor_views),
        ("window_emit_latency", window_emit_latency),
        ("archive_and_replay", archive_and_replay),
        ("wire_bytes", |_, scale| wire_bytes(scale)),
        ("alert_scoring", |_, scale| alerts::scoring(scale)),
        ("alert_latency", alerts::latency),
        ("kafka_ingest", kafka::ingest),
        ("cluster_workers", workers::run),
        ("spark_tumbling", spark::run),
        ("mqtt_bridge_bytes", |_, scale| bridge::run(scale)),
        ("end_to_end", e2e::run),
        ("micro", |_, scale| micro::run(scale)),
        ("footprint", footprint),
    ];
    // `--runs N`: each section N times, every figure the median with its range (default 3; 1 with --quick).
    let runs: usize = args
        .iter()
        .position(|a| a == "--runs")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(if quick { 1 } else { 3 })
        .max(1);
    for (name, run) in sections {
        if wanted(name) {
            // Criterion samples each micro-benchmark many times itself: one run.
            let runs = if name == "micro" { 1 } else { runs };
            // Each run in a directory of its own: a run must not find the
            // previous one's log or store (it would find nothing left to do).
            let results = (0..runs)
                .map(|i| {
                    let run_dir = dir.path().join(format!("{name}-{i}"));
                    std::fs::create_dir_all(&run_dir).unwrap();
                    run(&run_dir, scale)
                })
                .collect();
            report.insert(name, summary::combine(results));
        }
    }
    let json = serde_json::to_string_pretty(&report).unwrap();
    if let Some(parent) = out.parent() {
        std::fs::create_dir_all(parent).unwrap();
    }
    std::fs::write(&out, format!("{json}\n")).unwrap();
    let md = out.with_extension("md");
    let value = serde_json::to_value(&report).unwrap();
    std::fs::write(&md, summary::markdown(&value)).unwrap();
    let svg = out.with_extension("svg");
    std::fs::write(&svg, chart::svg(&value)).unwrap();
    println!("\nwrote {}, {} and {}", out.display(), md.display(), svg.display());
    ExitCode::SUCCESS
}

/// A fleet's readings as a gateway receives them: every device at t, then at t+1 s, ...
fn fleet_readings(devices: u32, per_device: u64) -> Vec<Reading> {
    let mut fws: Vec<Firmware> = (0..devices)
        .map(|i| {
            let id = format!("sim-{i:05}");
            Firmware::new(&id, &format!("u-{:05}", i / 4), 1, device_seed(7, i), Schema::V2, Encoding::Cbor).unwrap()
        })
        .collect();
    let limits = device::Limits::default();
    let mut out = Vec::with_capacity((devices as u64 * per_device) as usize);
    for n in 0..per_device {
        for fw in &mut fws {
            fw.sample(1_767_225_600_000 + n as i64 * 1000);
            let id = fw.id().to_string();
            let (seq, bytes) = fw.next_to_send().unwrap().unwrap();
            let reading = device::decode(&id, bytes, &limits).unwrap();
            fw.acknowledge(seq);
            out.push(reading);
        }
    }
    out
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn machine(dir: &Path) -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu =
        cpuinfo.lines().find(|l| l.starts_with("model name")).and_then(|l| l.split(':').nth(1)).unwrap_or("?").trim();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kb: u64 = meminfo
        .lines()
        .find(|l| l.starts_with("MemTotal"))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // fsync latency of the data directory's filesystem: 4 KiB append + fdatasync.
    let mut f = std::fs::File::create(dir.join("fsync-probe")).unwrap();
    let mut lat = Vec::new();
    for _ in 0..200 {
        let t = Instant::now();
        f.write_all(&[0u8; 4096]).unwrap();
        f.sync_data().unwrap();
        lat.push(t.elapsed().as_secs_f64() * 1e3);
    }
    lat.sort_by(f64::total_cmp);
    let v = json!({
        "cpu": cpu, "cores": cores, "memory_gib": (mem_kb as f64 / 1048576.0 * 10.0).round() / 10.0,
        "fsync_p50_ms": percentile(&lat, 0.5), "fsync_p99_ms": percentile(&lat, 0.99),
    });
    println!(
        "machine: {cpu}, {cores} cores, {:.1} GiB; fsync p50 {:.3} ms, p99 {:.3} ms",
        mem_kb as f64 / 1048576.0,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99)
    );
    v
}

/// The edge log alone: group commits of 1,000 readings with full durability.
fn edge_log_commit(dir: &Path, scale: f64) -> Value {
    let readings = fleet_readings(100, (2000.0 * scale).max(20.0) as u64);
    let mut log = EdgeLog::open(&dir.join("edge-log.sqlite"), Durability::Full).unwrap();
    let entries: Vec<Entry> = readings.into_iter().map(Entry::Reading).collect();
    let t = Instant::now();
    for chunk in entries.chunks(1000) {
        log.append(chunk, 0).unwrap();
    }
    let per_s = entries.len() as f64 / t.elapsed().as_secs_f64();
    // The same with one reading per commit: what group commit saves.
    let t = Instant::now();
    let single = entries.len().min(500);
    let mut log1 = EdgeLog::open(&dir.join("edge-log-1.sqlite"), Durability::Full).unwrap();
    for e in &entries[..single] {
        log1.append(std::slice::from_ref(e), 0).unwrap();
    }
    let per_s_single = single as f64 / t.elapsed().as_secs_f64();
    println!(
        "edge log, durability=full: {per_s:.0} readings/s in commits of 1,000; {per_s_single:.0} readings/s at one per commit"
    );
    json!({ "readings": entries.len(), "readings_per_s_commit_1000": per_s, "readings_per_s_commit_1": per_s_single })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = after.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    // Fields 14 and 15 (utime, stime) are at 11 and 12 after the ")".
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0)) as f64 / tck
}

/// Cumulative `(le, count)` buckets of a histogram on `/metrics`, of the
/// series whose labels include `labels` (e.g. `pipeline="main"`; "" for any).
fn scrape_buckets(port: u16, name: &str, labels: &str) -> Vec<(f64, f64)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter(|l| l.contains(labels))
        .filter_map(|l| l.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (le, rest) = rest.split_once('"')?;
            let (_, count) = rest.split_once("} ")?;
            let le = if le == "+Inf" { f64::INFINITY } else { le.parse().ok()? };
            Some((le, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound at quantile `q` of the observations between two scrapes.
fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let diff: Vec<(f64, f64)> = after.iter().zip(before).map(|((le, a), (_, b))| (*le, a - b)).collect();
    let total = diff.last().map_or(0.0, |d| d.1);
    diff.iter().find(|(_, c)| *c >= q * total).map_or(f64::NAN, |d| d.0)
}

fn scrape(port: u16, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

fn wait_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "port {port} never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The processor over a pre-filled embedded log: decode, window, checkpoint.
fn cloud_processor(dir: &Path, scale: f64) -> Value {
    let readings = fleet_readings(1000, (300.0 * scale).max(10.0) as u64);
    let n = readings.len();
    let log = SqliteLog::open(&dir.join("eventlog.sqlite"), 8, kappa_cloud::config::Durability::Full).unwrap();
    let appender = log.start_writer(64).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let t = Instant::now();
    for (i, chunk) in readings.chunks(2000).enumerate() {
        let records = chunk
            .iter()
            .map(|r| AppendRecord {
                key: r.device.clone(),
                partition: None,
                value: record::encode(&LogRecord {
                    gateway: "bench".into(),
                    batch_id: i as u64,
                    ingest_ms: 0,
                    event: LogEvent::Reading(r.clone()),
                }),
            })
            .collect();
        rt.block_on(appender.append(AppendBatch { gateway: "bench".into(), batch_id: i as u64, records })).unwrap();
    }
    let append_per_s = n as f64 / t.elapsed().as_secs_f64();
    let mut registry = prometheus_client_registry();
    let metrics = Arc::new(CloudMetrics::new(&mut registry));
    let store = ViewStore::open(&dir.join("views.sqlite")).unwrap();
    let specs = kappa_cloud::config::CloudConfig::from_toml("").unwrap().view_specs().unwrap();
    let settings = ProcessorSettings::default();
    let mut p = Processor::single(log.source().unwrap(), store, specs, settings, metrics).unwrap();
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        done += p.step(Duration::from_millis(10)).unwrap();
    }
    p.checkpoint().unwrap();
    p.sync().unwrap();
    let per_s = n as f64 / t.elapsed().as_secs_f64();
    println!(
        "cloud: embedded log append {append_per_s:.0} readings/s (batches of 2,000, durability=full); processor {per_s:.0} readings/s on one thread (1,000 devices, the default views: 1-minute windows with 21 aggregates + totals)"
    );
    json!({ "readings": n, "log_append_readings_per_s": append_per_s, "processor_readings_per_s": per_s })
}

fn example_views(names: &[&str]) -> Vec<kappa_cloud::views::spec::ViewSpec> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cloud/single-node.toml");
    let cfg = kappa_cloud::config::CloudConfig::load(Path::new(path)).unwrap();
    cfg.view_specs().unwrap().into_iter().filter(|v| names.contains(&v.name.as_str())).collect()
}

fn encoded(device: &str, user: &str, seq: u64, ts_ms: i64) -> Vec<u8> {
    let r = Reading {
        device: device.to_string(),
        boot: 1,
        seq,
        ts_ms,
        schema: 2,
        metrics: [
            ("temperature".to_string(), Some(20.0 + (seq % 13) as f64 * 0.25)),
            ("humidity".to_string(), Some(45.0 + (seq % 7) as f64)),
            ("pressure".to_string(), Some(1000.0 + (seq % 5) as f64)),
        ]
        .into(),
        tags: [
            ("user".to_string(), user.to_string()),
            ("type".to_string(), ["telemetry", "status"][(seq % 2) as usize].to_string()),
        ]
        .into(),
    };
    record::encode(&LogRecord { gateway: "bench".into(), batch_id: 0, ingest_ms: 0, event: LogEvent::Reading(r) })
}

/// The reference tumbling (`device_metrics`, 5 minutes, 8 aggregates) and
/// session (`user_sessions`, 30-minute gap, 5 aggregates) views over 100,000
/// devices and 100,000 users, from encoded log records in memory to updated
/// state on one thread; then one checkpoint of all that state.
fn processor_views(dir: &Path, scale: f64) -> Value {
    use kappa_cloud::eventlog::memory::MemorySource;
    let keys = ((100_000.0 * scale) as u64).max(1000);
    let per_key = 10u64;
    let mut src = MemorySource::default();
    for i in 0..per_key {
        for d in 0..keys {
            let (device, user) = (format!("dev-{d:06}"), format!("u-{d:06}"));
            let ts = 1_767_225_600_000 + i as i64 * 60_000 + (d % 60) as i64 * 1000;
            src.push(kappa_common::partition::partition_for(&device, 8), encoded(&device, &user, i + 1, ts));
        }
    }
    let n = src.len();
    let specs = example_views(&["device_metrics", "user_sessions"]);
    let mut registry = prometheus_client_registry();
    let settings = ProcessorSettings { checkpoint_interval: Duration::from_secs(3600), ..ProcessorSettings::default() };
    let store = ViewStore::open(&dir.join("views-100k.sqlite")).unwrap();
    let mut p = Processor::single(src, store, specs, settings, Arc::new(CloudMetrics::new(&mut registry))).unwrap();
    let cpu0 = thread_cpu_seconds();
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        done += p.step(Duration::ZERO).unwrap();
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = thread_cpu_seconds() - cpu0;
    // One checkpoint with every key dirty: what the processing thread pays
    // (preparing it), and how long the committer thread then takes.
    let t = Instant::now();
    p.checkpoint().unwrap();
    let prepare_s = t.elapsed().as_secs_f64();
    p.sync().unwrap();
    let commit_s = t.elapsed().as_secs_f64() - prepare_s;
    let per_s = n as f64 / secs;
    let overhead = prepare_s / 10.0;
    println!(
        "processor, tumbling + session views over {keys} keys: {per_s:.0} events/s on one thread ({:.0} per CPU-second); \
         a checkpoint with every key dirty costs the processing thread {prepare_s:.2} s ({:.1}% of a 10 s interval), \
         then commits in {commit_s:.2} s on the committer thread",
        n as f64 / cpu.max(1e-9),
        overhead * 100.0
    );
    json!({
        "keys": keys, "events": n, "events_per_s": per_s, "events_per_cpu_second": n as f64 / cpu.max(1e-9),
        "checkpoint_prepare_seconds": prepare_s, "checkpoint_commit_seconds": commit_s, "checkpoint_overhead_at_10s": overhead,
    })
}

/// A final-mode one-minute view over 1,000 devices, fed in time order: the
/// time from a step's records arriving (whose watermark closes windows) to
/// the closed windows' rows being committed.
fn window_emit_latency(dir: &Path, scale: f64) -> Value {
    use kappa_cloud::eventlog::memory::MemorySource;
    let minutes = ((30.0 * scale) as i64).max(3);
    let mut src = MemorySource::default();
    for s in 0..minutes * 6 {
        for d in 0..1000u64 {
            let device = format!("dev-{d:04}");
            src.push(
                kappa_common::partition::partition_for(&device, 8),
                encoded(&device, "u", s as u64 + 1, 1_767_225_600_000 + s * 10_000),
            );
        }
    }
    let n = src.len();
    let cfg = kappa_cloud::config::CloudConfig::from_toml(
        "[api]\ndevices_view = \"m\"\nwindows_view = \"m\"\n[[views]]\nname = \"m\"\nwindow = { kind = \"tumbling\", size = \"1m\" }\noutput = \"final\"\naggregates = [{ name = \"n\", fn = \"count\" }, { name = \"t\", fn = \"avg\", of = \"temperature\" }]\n",
    )
    .unwrap();
    let mut registry = prometheus_client_registry();
    let settings = ProcessorSettings { max_out_of_orderness_ms: 0, poll_records: 1000, ..ProcessorSettings::default() };
    let store = ViewStore::open(&dir.join("views-emit.sqlite")).unwrap();
    let mut p =
        Processor::single(src, store, cfg.view_specs().unwrap(), settings, Arc::new(CloudMetrics::new(&mut registry)))
            .unwrap();
    let mut done = 0;
    while done < n {
        done += p.step(Duration::ZERO).unwrap();
    }
    p.sync().unwrap();
    let mut lat: Vec<f64> = p.take_emit_latencies().iter().map(|d| d.as_secs_f64() * 1e3).collect();
    lat.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&lat, 0.5), percentile(&lat, 0.99));
    println!(
        "window emit: watermark passes a window end -> final row committed: p50 {p50:.2} ms, p99 {p99:.2} ms ({} flushes, 1,000 rows each)",
        lat.len()
    );
    json!({ "flushes": lat.len(), "rows_per_flush": 1000, "p50_ms": p50, "p99_ms": p99 })
}

/// The archiver writing 1,000,000 records (1,000 devices) from memory into
/// local segments; then a replay of the archive: reading and decoding alone,
/// and through the processor with the default views (one thread each).
fn archive_and_replay(dir: &Path, scale: f64) -> Value {
    use kappa_cloud::archive::archiver::{Archiver, ArchiverSettings};
    use kappa_cloud::archive::source::ArchiveSource;
    use kappa_cloud::archive::store::{ArchiveStore, LocalStore};
    use kappa_cloud::eventlog::LogSource;
    use kappa_cloud::eventlog::memory::MemorySource;
    let per_device = ((1000.0 * scale) as u64).max(20);
    let mut src = MemorySource::default();
    for i in 0..per_device {
        for d in 0..1000u64 {
            let device = format!("dev-{d:04}");
            src.push(
                kappa_common::partition::partition_for(&device, 8),
                encoded(&device, "u", i + 1, 1_767_225_600_000 + i as i64 * 1000),
            );
        }
    }
    let n = src.len();
    let store: Arc<dyn ArchiveStore> = Arc::new(LocalStore::open(&dir.join("archive-bench")).unwrap());
    let mut registry = prometheus_client_registry();
    let metrics = Arc::new(CloudMetrics::new(&mut registry));
    let mut archiver = Archiver::new(src, store.clone(), ArchiverSettings::default(), metrics.clone()).unwrap();
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        done += archiver.step(Duration::ZERO).unwrap();
    }
    archiver.flush().unwrap();
    let write_s = t.elapsed().as_secs_f64();
    let bytes: u64 = std::fs::read_dir(dir.join("archive-bench"))
        .unwrap()
        .flat_map(|p| std::fs::read_dir(p.unwrap().path()).unwrap())
        .map(|f| f.unwrap().metadata().unwrap().len())
        .sum();

    let mut read = ArchiveSource::open(store.clone(), false).unwrap();
    let t = Instant::now();
    let mut got = 0usize;
    loop {
        let recs = read.poll(10_000, Duration::ZERO).unwrap();
        if recs.is_empty() {
            break;
        }
        for r in &recs {
            let reading = record::decode(&r.value).unwrap().into_reading().unwrap();
            got += usize::from(reading.seq > 0);
        }
    }
    assert_eq!(got, n);
    let read_s = t.elapsed().as_secs_f64();

    let specs = kappa_cloud::config::CloudConfig::from_toml("").unwrap().view_specs().unwrap();
    let vstore = ViewStore::open(&dir.join("views-replay.sqlite")).unwrap();
    let settings = ProcessorSettings { checkpoint_interval: Duration::from_secs(3600), ..ProcessorSettings::default() };
    let mut p =
        Processor::single(ArchiveSource::open(store, false).unwrap(), vstore, specs, settings, metrics).unwrap();
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        done += p.step(Duration::ZERO).unwrap();
    }
    let replay_s = t.elapsed().as_secs_f64();
    println!(
        "archive: writes {:.0} records/s ({:.1} MB/s, {:.1} bytes/record on disk); replay reads and decodes {:.0} records/s; \
         replays into the default views at {:.0} events/s (one thread)",
        n as f64 / write_s,
        bytes as f64 / write_s / 1e6,
        bytes as f64 / n as f64,
        n as f64 / read_s,
        n as f64 / replay_s
    );
    json!({
        "records": n, "archive_write_records_per_s": n as f64 / write_s, "archive_bytes_per_record": bytes as f64 / n as f64,
        "archive_read_decode_records_per_s": n as f64 / read_s, "replay_default_views_events_per_s": n as f64 / replay_s,
    })
}

/// CPU time of the calling thread.
fn thread_cpu_seconds() -> f64 {
    cpu_clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of this process, all threads.
fn process_cpu_seconds() -> f64 {
    cpu_clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

fn cpu_clock_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    #[allow(unsafe_code)]
    // SAFETY: clock_gettime writes only the timespec we pass.
    unsafe {
        libc::clock_gettime(clock, &mut ts);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

fn prometheus_client_registry() -> prometheus_client::registry::Registry {
    prometheus_client::registry::Registry::default()
}

/// Batches as the forwarder builds them (default 5,000 readings, zstd level
/// 3), POSTed by the agent's own HTTP client to a socket that counts every
/// byte it receives, request line and headers included.
fn wire_bytes(scale: f64) -> Value {
    let readings = fleet_readings(100, (600.0 * scale).max(50.0) as u64);
    let n = readings.len() as f64;
    let device_cbor: usize = readings.iter().map(|r| device::encode_cbor(r).len()).sum();
    let device_json: usize = readings.iter().map(|r| device::encode_json(r).len()).sum();
    let mut out = json!({
        "readings": readings.len(), "batch_readings": 5000, "zstd_level": 3,
        "device_cbor_bytes_per_reading": device_cbor as f64 / n, "device_json_bytes_per_reading": device_json as f64 / n,
    });
    // Aggregate mode: the same readings as one-minute windows (4 metrics per reading), columnar batches.
    let aggregates = kappa_common::aggregate::aggregate(&readings, 60_000);
    let aggregate_batches: Vec<EdgeBatch> = aggregates
        .chunks(5000)
        .enumerate()
        .map(|(i, chunk)| {
            EdgeBatch::new("gw-bench-01", i as u64 + 1, Vec::new())
                .with_aggregates(chunk.to_vec())
                .with_format(batch::COLUMNAR_FORMAT)
        })
        .collect();
    let modes = [
        ("cbor", reading_batches(&readings, batch::BATCH_FORMAT)),
        ("columnar", reading_batches(&readings, batch::COLUMNAR_FORMAT)),
        ("aggregate_1m", aggregate_batches),
    ];
    for (name, batches) in modes {
        let (wire, body, raw) = post_batches(batches);
        println!(
            "edge->cloud wire, {name} batches: {:.2} bytes/reading including HTTP framing ({:.2} body only; {:.1} before zstd)",
            wire as f64 / n,
            body as f64 / n,
            raw as f64 / n,
        );
        out[name] = json!({
            "wire_bytes_per_reading": wire as f64 / n, "body_bytes_per_reading": body as f64 / n,
            "uncompressed_bytes_per_reading": raw as f64 / n,
        });
    }
    println!(
        "device payloads: {:.1} bytes CBOR, {:.1} JSON per reading",
        device_cbor as f64 / n,
        device_json as f64 / n
    );
    out
}

/// `readings` as the forwarder cuts them: batches of 5,000 in `format`.
fn reading_batches(readings: &[Reading], format: u16) -> Vec<EdgeBatch> {
    readings
        .chunks(5000)
        .enumerate()
        .map(|(i, chunk)| EdgeBatch::new("gw-bench-01", i as u64 + 1, chunk.to_vec()).with_format(format))
        .collect()
}

/// POSTs `batches` with the agent's client to a server that counts every
/// byte: (wire bytes, body bytes, bytes before zstd).
fn post_batches(all: Vec<EdgeBatch>) -> (usize, usize, usize) {
    let batches = all.len();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let counter = std::thread::spawn(move || {
        let (mut total, mut requests) = (0usize, 0usize);
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let mut buf = vec![0u8; 1 << 20];
            let mut req = Vec::new();
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 {
                    break;
                }
                req.extend_from_slice(&buf[..n]);
                let Some(end) = find(&req, b"\r\n\r\n") else { continue };
                let head = String::from_utf8_lossy(&req[..end]).to_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
                    .unwrap_or(0);
                if req.len() >= end + 4 + len {
                    total += req.len();
                    requests += 1;
                    req.clear();
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}");
                    if requests == batches {
                        return total;
                    }
                }
            }
        }
        total
    });
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let client = CloudClient::new(
        &format!("http://127.0.0.1:{port}"),
        "gw-bench-01",
        Duration::from_secs(10),
        &Default::default(),
    )
    .unwrap();
    let (mut body_bytes, mut raw_bytes) = (0usize, 0usize);
    for b in &all {
        raw_bytes += if b.format == batch::COLUMNAR_FORMAT {
            kappa_common::columnar::encode(b).len()
        } else {
            batch::to_cbor(b).len()
        };
        let body = batch::encode(b, 3);
        body_bytes += body.len();
        let status = kappa_edge::forward::client::GatewayStatus::default();
        assert_eq!(rt.block_on(client.post(b.batch_id, body.into(), status)), PostOutcome::Accepted);
    }
    (counter.join().unwrap(), body_bytes, raw_bytes)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sizes of the product binaries built beside this one (as built, and
/// stripped of symbols when `strip` is on the PATH). The agent's RSS with
/// 10,000 devices is in `edge_ingest_mqtt`.
fn footprint(dir: &Path, _scale: f64) -> Value {
    let exe = std::env::current_exe().unwrap();
    let mut out = serde_json::Map::new();
    for name in ["kappa-edge", "kappa-cloud", "kappa-sim"] {
        let path = exe.with_file_name(name);
        let Ok(meta) = std::fs::metadata(&path) else {
            println!("footprint: {name} is not built beside kappa-bench (cargo build --release --bin {name})");
            out.insert(name.into(), json!({ "built": false }));
            continue;
        };
        let copy = dir.join(format!("{name}.stripped"));
        let stripped = std::fs::copy(&path, &copy)
            .ok()
            .and_then(|_| std::process::Command::new("strip").arg(&copy).status().ok())
            .filter(|s| s.success())
            .and_then(|_| std::fs::metadata(&copy).ok())
            .map(|m| m.len() as f64 / 1e6);
        let mb = meta.len() as f64 / 1e6;
        println!(
            "footprint: {name} {mb:.1} MB as built, {} stripped",
            stripped.map_or("?".into(), |s| format!("{s:.1} MB"))
        );
        out.insert(name.into(), json!({ "built": true, "mb": mb, "stripped_mb": stripped }));
    }
    Value::Object(out)
}
