//! The benchmark harness behind `kappa-bench`: baseline throughput and wire-cost figures. It measures and
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
//! into PostgreSQL by 1, 2, 4 and 8 workers of a fixed CPU budget
//! (and how long a join and a kill take to hand partitions over, with each
//! `cluster.assignment`), and 1, 2 and
//! 4 ingest nodes of a fixed budget appending to Kafka; beside the
//! peers, in the same run, Spark Structured Streaming on the same tumbling
//! view (rows compared) and a Mosquitto bridge's bytes per reading; the highest end-to-end rate whose
//! p99 event-to-view latency stays within 1 s; the criterion
//! micro-benchmarks; binary sizes. It first measures the machine's
//! limits (fsync, memory bandwidth, loopback TCP) and writes, next to the
//! JSON, a Markdown summary with each figure bounded by one of them as a
//! ratio to it, and an SVG chart of throughput and p99 latency per stage
//! (and the workers' scaling curve, `.scaling.svg`).
//! JSON goes to `target/bench/baseline.json` (or `--out`); `--render
//! REPORT.json` writes a report's summary and charts again.

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

mod alerts;
mod bridge;
mod cgroup;
mod chart;
mod cluster_procs;
mod e2e;
mod edge_ingest;
mod ingest_nodes;
mod kafka;
mod micro;
mod pipeline;
mod rebalance;
mod spark;
mod summary;
mod workers;

use self::pipeline::*;
pub use crate::harness::free_port;

/// Runs the benchmark with the command line's arguments (after the program name).
pub fn run(args: Vec<String>) -> ExitCode {
    // `--render REPORT.json`: only write the summary and charts of a report again.
    if let Some(path) = args.iter().position(|a| a == "--render").and_then(|i| args.get(i + 1)) {
        let report = std::fs::read_to_string(path).ok().and_then(|t| serde_json::from_str::<Value>(&t).ok());
        let Some(report) = report else {
            eprintln!("--render: {path} is not a kappa-bench report");
            return ExitCode::FAILURE;
        };
        write_summaries(Path::new(path), &report);
        return ExitCode::SUCCESS;
    }
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
    let sections: [(&str, Section); 18] = [
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
        ("cluster_rebalance", rebalance::run),
        ("cluster_ingest_nodes", ingest_nodes::run),
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
    write_summaries(&out, &serde_json::to_value(&report).unwrap());
    ExitCode::SUCCESS
}

/// The report's summary (`.md`) and charts (`.svg`, and `.scaling.svg`
/// when the cluster's workers were measured) next to its JSON at `out`.
fn write_summaries(out: &Path, report: &Value) {
    let md = out.with_extension("md");
    std::fs::write(&md, summary::markdown(report)).unwrap();
    let svg = out.with_extension("svg");
    std::fs::write(&svg, chart::svg(report)).unwrap();
    println!("\nwrote {}, {} and {}", out.display(), md.display(), svg.display());
    if let Some(curve) = chart::scaling_svg(report) {
        let path = out.with_extension("scaling.svg");
        std::fs::write(&path, curve).unwrap();
        println!("wrote {}", path.display());
    }
}

/// A fleet's readings as a gateway receives them: every device at t, then at t+1 s, ...
pub(crate) fn fleet_readings(devices: u32, per_device: u64) -> Vec<Reading> {
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

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

pub(crate) fn machine(dir: &Path) -> Value {
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

pub(crate) fn cpu_seconds(pid: u32) -> f64 {
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
pub(crate) fn scrape_buckets(port: u16, name: &str, labels: &str) -> Vec<(f64, f64)> {
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
pub(crate) fn bucket_quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> f64 {
    let diff: Vec<(f64, f64)> = after.iter().zip(before).map(|((le, a), (_, b))| (*le, a - b)).collect();
    let total = diff.last().map_or(0.0, |d| d.1);
    diff.iter().find(|(_, c)| *c >= q * total).map_or(f64::NAN, |d| d.0)
}

pub(crate) fn scrape(port: u16, name: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nhost: x\r\n\r\n").unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

pub(crate) fn wait_port(port: u16) {
    let t = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "port {port} never opened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// CPU time of the calling thread.
pub(crate) fn thread_cpu_seconds() -> f64 {
    cpu_clock_seconds(libc::CLOCK_THREAD_CPUTIME_ID)
}

/// CPU time of this process, all threads.
pub(crate) fn process_cpu_seconds() -> f64 {
    cpu_clock_seconds(libc::CLOCK_PROCESS_CPUTIME_ID)
}

pub(crate) fn cpu_clock_seconds(clock: libc::clockid_t) -> f64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    #[allow(unsafe_code)]
    // SAFETY: clock_gettime writes only the timespec we pass.
    unsafe {
        libc::clock_gettime(clock, &mut ts);
    }
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

pub(crate) fn prometheus_client_registry() -> prometheus_client::registry::Registry {
    prometheus_client::registry::Registry::default()
}
