//! The processor beside Apache Spark Structured Streaming (pyspark, local
//! mode) on the same events and the same view: `device_metrics`, per device,
//! 5-minute tumbling windows, 8 aggregates. Both engines' rows are compared
//! row for row; a disagreement is reported in the JSON and printed.
//!
//! The events: about 1,000,000 at full scale (10,000 devices, one reading
//! every 30 s of event time each, up to 20 s of jitter, so arrival is out of
//! event-time order within and across devices, well inside the 10-minute
//! watermark). The processor reads them as encoded log records from memory
//! on one thread; Spark reads them from Parquet converted, untimed, from a
//! CSV of the same readings (`tests/bench/spark_tumbling.py`).
//!
//! What is timed: for the processor, every record from the source into view
//! state, then the checkpoint that writes all rows to the SQLite view store
//! (process CPU, so the committer thread is counted); for Spark, the query
//! from `start()` to `awaitTermination()` (JVM CPU, all threads), warm (the
//! second run in the session) as the headline, cold beside it.
//!
//! Beside them, DuckDB (`tests/bench/duckdb_tumbling.py`) computes the same
//! rows as one in-process batch GROUP BY over the events in memory: not a
//! peer but a ceiling, reported as our streaming rate over its batch rate.
//! Each of Spark and DuckDB runs when it is installed; the section is
//! skipped only when neither is.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kappa_cloud::eventlog::memory::MemorySource;
use kappa_cloud::metrics::CloudMetrics;
use kappa_cloud::processor::{Processor, ProcessorSettings};
use kappa_cloud::store::{RowQuery, ViewStore};
use kappa_common::partition::partition_for;
use kappa_common::record;
use serde_json::{Value, json};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/spark_tumbling.py");
const DUCKDB_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/bench/duckdb_tumbling.py");
/// 2026-01-01T00:00:00Z, on a 5-minute boundary.
const BASE_MS: i64 = 1_767_225_600_000;
/// One reading per device every 30 s of event time.
const INTERVAL_MS: i64 = 30_000;
/// Event times move up to this far either way from the arrival order.
const JITTER_MS: i64 = 20_000;
/// The reference design's watermark: max event time - 10 minutes (Spark's `withWatermark` too).
const MAX_OUT_OF_ORDERNESS_MS: i64 = 600_000;
/// Relative tolerance for averages and standard deviations (summation order differs).
const TOLERANCE: f64 = 1e-9;

pub fn run(dir: &Path, scale: f64) -> Value {
    let (spark_ok, duckdb_ok) = (spark_available(), duckdb_available());
    if let (Err(spark), Err(duckdb)) = (&spark_ok, &duckdb_ok) {
        let why = format!("{spark}; {duckdb}");
        println!("spark tumbling: skipped ({why})");
        return json!({ "skipped": why });
    }
    let work = tempfile::Builder::new().prefix("spark-").tempdir_in(dir).unwrap();
    let devices = ((10_000.0 * scale) as u64).max(1000);
    let per_device = ((1_000_000.0 * scale) as u64 / devices).max(10);
    let (src, n) = events(devices, per_device, &work.path().join("events.csv"));

    let (ours_rows, ours) = run_ours(src, n, &work.path().join("views.sqlite"));
    let mut out = json!({
        "events": n, "devices": devices, "windows": ours_rows.len(),
        "ours": {
            "threads": 1, "seconds": ours.secs, "cpu_seconds": ours.cpu,
            "events_per_s": ours.per_s, "events_per_cpu_second": ours.per_cpu,
            "processing_only": { "events_per_s": ours.processing_per_s, "events_per_cpu_second": ours.processing_per_cpu },
        },
    });
    match spark_ok {
        Ok(()) => spark_beside(&mut out, work.path(), n, devices, &ours_rows, &ours),
        Err(why) => {
            println!("spark tumbling: Spark skipped ({why})");
            out["spark"] = json!({ "skipped": why });
        }
    }
    match duckdb_ok {
        Ok(()) => duckdb_beside(&mut out, work.path(), n, &ours_rows, &ours),
        Err(why) => {
            println!("spark tumbling: DuckDB skipped ({why})");
            out["duckdb"] = json!({ "skipped": why });
        }
    }
    out
}

/// Spark Structured Streaming on the same events: its figures, the ratios
/// and the row comparison go into `out`.
fn spark_beside(out: &mut Value, work: &Path, n: usize, devices: u64, ours_rows: &Rows, ours: &Ours) {
    let spark = run_python(SCRIPT, work, "spark");
    let spark_rows = result_rows(&spark, "spark_tumbling.py");
    let cmp = compare(ours_rows, &spark_rows);

    let warm = &spark["warm"];
    let spark_wall = warm["wall_seconds"].as_f64().unwrap();
    let spark_cpu = warm["cpu_seconds"].as_f64().unwrap();
    let spark_input = warm["input_rows"].as_u64().unwrap();
    assert_eq!(spark_input, n as u64, "Spark read {spark_input} of {n} events");
    let spark_per_s = n as f64 / spark_wall;
    let spark_per_cpu = n as f64 / spark_cpu.max(1e-9);
    let cold_wall = spark["cold"]["wall_seconds"].as_f64().unwrap();
    let ratio_cpu = ours.per_cpu / spark_per_cpu;
    let ratio_wall = ours.per_s / spark_per_s;
    let version = spark["version"].as_str().unwrap_or("?");
    let cores = spark["cores"].as_u64().unwrap_or(0);

    println!(
        "spark tumbling, device_metrics over {n} events ({devices} devices, {} windows): ours {:.0} events/s on one thread \
         ({:.0} per CPU-second, checkpoint included); Spark {version} local[{cores}] {spark_per_s:.0} events/s warm \
         ({spark_per_cpu:.0} per CPU-second; cold run {cold_wall:.1} s, warm {spark_wall:.1} s); \
         ours/Spark {ratio_cpu:.1}x per CPU-second, {ratio_wall:.1}x wall",
        ours_rows.len(),
        ours.per_s,
        ours.per_cpu,
    );
    report_comparison("Spark", &cmp, ours_rows.len(), spark_rows.len());
    out["spark"] = json!({
        "version": version, "cores": cores, "shuffle_partitions": spark["shuffle_partitions"],
        "cold": spark["cold"], "warm": spark["warm"],
        "events_per_s": spark_per_s, "events_per_cpu_second": spark_per_cpu,
    });
    out["ratio"] = json!({ "per_cpu_second": ratio_cpu, "wall_throughput": ratio_wall });
    out["rows_agree"] = json!(cmp.mismatches == 0);
    out["mismatches"] = json!(cmp.mismatches);
    out["max_rel_diff"] = json!(cmp.max_rel);
}

/// DuckDB's batch GROUP BY over the same events, a ceiling: our streaming
/// rate as a ratio to its batch rate, and the row comparison, go into `out`.
fn duckdb_beside(out: &mut Value, work: &Path, n: usize, ours_rows: &Rows, ours: &Ours) {
    let duck = run_python(DUCKDB_SCRIPT, work, "duckdb");
    let duck_rows = result_rows(&duck, "duckdb_tumbling.py");
    let cmp = compare(ours_rows, &duck_rows);
    let warm = &duck["warm"];
    let input = warm["input_rows"].as_u64().unwrap();
    assert_eq!(input, n as u64, "DuckDB read {input} of {n} events");
    let per_s = n as f64 / warm["wall_seconds"].as_f64().unwrap();
    let per_cpu = n as f64 / warm["cpu_seconds"].as_f64().unwrap().max(1e-9);
    let version = duck["version"].as_str().unwrap_or("?");
    let threads = duck["threads"].as_u64().unwrap_or(0);
    println!(
        "spark tumbling: DuckDB {version} batch GROUP BY ({threads} threads) {per_s:.0} events/s warm ({per_cpu:.0} per CPU-second); \
         our streaming rate is {:.2} of its batch rate, {:.2} per CPU-second",
        ours.per_s / per_s,
        ours.per_cpu / per_cpu,
    );
    report_comparison("DuckDB", &cmp, ours_rows.len(), duck_rows.len());
    out["duckdb"] = json!({
        "version": version, "threads": threads, "cold": duck["cold"], "warm": duck["warm"],
        "events_per_s": per_s, "events_per_cpu_second": per_cpu,
        "ours_over_duckdb": { "wall_throughput": ours.per_s / per_s, "per_cpu_second": ours.per_cpu / per_cpu },
        "rows_agree": cmp.mismatches == 0, "mismatches": cmp.mismatches, "max_rel_diff": cmp.max_rel,
    });
}

fn report_comparison(peer: &str, cmp: &Comparison, ours: usize, theirs: usize) {
    if cmp.mismatches == 0 {
        println!(
            "spark tumbling: all {ours} rows agree with {peer}'s (largest relative difference {:.1e})",
            cmp.max_rel
        );
    } else {
        println!(
            "spark tumbling: ROWS DISAGREE with {peer}: {} mismatches (ours {ours} rows, {peer} {theirs}); first ones:",
            cmp.mismatches
        );
        for m in &cmp.first {
            println!("  {m}");
        }
    }
}

/// `Ok` when `python3` imports duckdb; else why not.
fn duckdb_available() -> Result<(), String> {
    let ok = Command::new("python3")
        .args(["-c", "import duckdb"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok { Ok(()) } else { Err("duckdb is not installed (python3 -m pip install duckdb)".into()) }
}

/// `Ok` when `python3` imports pyspark and `java` runs; else why not.
fn spark_available() -> Result<(), String> {
    let ok = |cmd: &mut Command| cmd.stdout(Stdio::null()).stderr(Stdio::null()).status().is_ok_and(|s| s.success());
    if !ok(Command::new("python3").args(["-c", "import pyspark"])) {
        return Err("pyspark is not installed (python3 -m pip install pyspark)".into());
    }
    if !ok(Command::new("java").arg("-version")) {
        return Err("java is not on PATH (pyspark needs a JDK 17 or later)".into());
    }
    Ok(())
}

/// Deterministic jitter in `[-JITTER_MS, JITTER_MS]` (splitmix64 of the reading's place).
fn jitter(device: u64, i: u64) -> i64 {
    let mut z = (device << 32 | i).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % (2 * JITTER_MS as u64 + 1)) as i64 - JITTER_MS
}

/// The events, in arrival order, as log records for the processor and as
/// CSV for Spark. The CSV is written from the decoded records, so both
/// engines get the same readings by construction.
fn events(devices: u64, per_device: u64, csv: &Path) -> (MemorySource, usize) {
    let mut src = MemorySource::default();
    let mut out = BufWriter::new(std::fs::File::create(csv).unwrap());
    writeln!(out, "device,user,type,ts_ms,temperature,humidity,pressure").unwrap();
    let num = |x: Option<f64>| x.map_or_else(String::new, |v| v.to_string());
    for i in 0..per_device {
        for d in 0..devices {
            let (device, user) = (format!("dev-{d:05}"), format!("u-{:05}", d / 4));
            let ts = BASE_MS + i as i64 * INTERVAL_MS + (d % 30) as i64 * 1000 + jitter(d, i);
            let bytes = super::encoded(&device, &user, i + 1, ts);
            let r = record::decode(&bytes).unwrap().into_reading().unwrap();
            writeln!(
                out,
                "{},{},{},{},{},{},{}",
                r.device,
                user,
                r.tags.get("type").map_or("", String::as_str),
                r.ts_ms,
                num(r.metric("temperature")),
                num(r.metric("humidity")),
                num(r.metric("pressure")),
            )
            .unwrap();
            src.push(partition_for(&device, 8), bytes);
        }
    }
    out.flush().unwrap();
    let n = src.len();
    (src, n)
}

/// One window's aggregates, as either engine gives them.
#[derive(Debug, Clone, PartialEq)]
struct Row {
    count: u64,
    avg_temp: Option<f64>,
    max_temp: Option<f64>,
    min_temp: Option<f64>,
    stddev_temp: Option<f64>,
    avg_humidity: Option<f64>,
    avg_pressure: Option<f64>,
    event_types: Vec<String>,
}

type Rows = BTreeMap<(String, i64), Row>;

struct Ours {
    secs: f64,
    cpu: f64,
    per_s: f64,
    per_cpu: f64,
    processing_per_s: f64,
    processing_per_cpu: f64,
}

/// The processor on this thread over `src`, then a checkpoint of every row; its rows read back from the store.
fn run_ours(src: MemorySource, n: usize, store_path: &Path) -> (Rows, Ours) {
    let specs = super::example_views(&["device_metrics"]);
    assert_eq!(specs.len(), 1, "device_metrics is not in deploy/cloud/single-node.toml");
    let view_id = specs[0].id();
    let mut registry = super::prometheus_client_registry();
    let settings = ProcessorSettings {
        checkpoint_interval: Duration::from_secs(3600),
        max_out_of_orderness_ms: MAX_OUT_OF_ORDERNESS_MS,
        ..ProcessorSettings::default()
    };
    let store = ViewStore::open(store_path).unwrap();
    let mut p = Processor::single(src, store, specs, settings, Arc::new(CloudMetrics::new(&mut registry))).unwrap();
    let (cpu0, thread0) = (super::process_cpu_seconds(), super::thread_cpu_seconds());
    let t = Instant::now();
    let mut done = 0;
    while done < n {
        done += p.step(Duration::ZERO).unwrap();
    }
    let processing_secs = t.elapsed().as_secs_f64();
    let processing_cpu = super::thread_cpu_seconds() - thread0;
    p.checkpoint().unwrap();
    p.sync().unwrap();
    let secs = t.elapsed().as_secs_f64();
    let cpu = super::process_cpu_seconds() - cpu0;
    drop(p);

    let store = ViewStore::open_read_only(store_path).unwrap();
    let q = RowQuery { view_id, key: None, from: i64::MIN, to: i64::MAX, after: None, limit: i64::MAX as usize };
    let rows = store
        .rows(&q)
        .unwrap()
        .into_iter()
        .map(|r| {
            let v = &r.values;
            let row = Row {
                count: v["event_count"].as_u64().unwrap(),
                avg_temp: v["avg_temp"].as_f64(),
                max_temp: v["max_temp"].as_f64(),
                min_temp: v["min_temp"].as_f64(),
                stddev_temp: v["stddev_temp"].as_f64(),
                avg_humidity: v["avg_humidity"].as_f64(),
                avg_pressure: v["avg_pressure"].as_f64(),
                event_types: strings(&v["event_types"]),
            };
            ((r.key, r.window_start), row)
        })
        .collect();
    let ours = Ours {
        secs,
        cpu,
        per_s: n as f64 / secs,
        per_cpu: n as f64 / cpu.max(1e-9),
        processing_per_s: n as f64 / processing_secs,
        processing_per_cpu: n as f64 / processing_cpu.max(1e-9),
    };
    (rows, ours)
}

/// Sorted strings of a JSON array.
fn strings(v: &Value) -> Vec<String> {
    let mut out: Vec<String> =
        v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect()).unwrap_or_default();
    out.sort();
    out
}

/// Runs `script` over `work/events.csv`; its result JSON.
fn run_python(script: &str, work: &Path, name: &str) -> Value {
    let csv = work.join("events.csv");
    let (result, log) = (work.join(format!("{name}-result.json")), work.join(format!("{name}.log")));
    let log_file = std::fs::File::create(&log).unwrap();
    let status = Command::new("python3")
        .arg(script)
        .arg(&csv)
        .arg(&result)
        .arg(work)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().unwrap())
        .stderr(log_file)
        .status()
        .expect("python3 runs");
    if !status.success() {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(40).collect::<Vec<_>>().into_iter().rev().collect();
        panic!("{script} failed ({status}); the end of its output:\n{}", tail.join("\n"));
    }
    serde_json::from_slice(&std::fs::read(&result).unwrap()).unwrap()
}

/// The rows a script wrote (`spark_tumbling.py`'s layout, which both share).
fn result_rows(result: &Value, script: &str) -> Rows {
    let columns: Vec<&str> = result["columns"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert_eq!(
        columns,
        [
            "device",
            "window_start_ms",
            "event_count",
            "avg_temp",
            "max_temp",
            "min_temp",
            "stddev_temp",
            "avg_humidity",
            "avg_pressure",
            "event_types"
        ],
        "{script}'s columns changed"
    );
    result["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            let key = (r[0].as_str().unwrap().to_string(), r[1].as_i64().unwrap());
            let row = Row {
                count: r[2].as_u64().unwrap(),
                avg_temp: r[3].as_f64(),
                max_temp: r[4].as_f64(),
                min_temp: r[5].as_f64(),
                stddev_temp: r[6].as_f64(),
                avg_humidity: r[7].as_f64(),
                avg_pressure: r[8].as_f64(),
                event_types: strings(&r[9]),
            };
            (key, row)
        })
        .collect()
}

struct Comparison {
    mismatches: usize,
    /// Up to five, described.
    first: Vec<String>,
    /// Largest relative difference of an average or standard deviation.
    max_rel: f64,
}

/// Row for row: the same keys; counts, minima, maxima and sets equal;
/// averages and standard deviations within [`TOLERANCE`].
fn compare(ours: &Rows, spark: &Rows) -> Comparison {
    let mut c = Comparison { mismatches: 0, first: Vec::new(), max_rel: 0.0 };
    let report = |c: &mut Comparison, what: String| {
        c.mismatches += 1;
        if c.first.len() < 5 {
            c.first.push(what);
        }
    };
    let keys: BTreeSet<&(String, i64)> = ours.keys().chain(spark.keys()).collect();
    for key in keys {
        let (a, b) = match (ours.get(key), spark.get(key)) {
            (Some(a), Some(b)) => (a, b),
            (a, _) => {
                let only = if a.is_some() { "ours" } else { "Spark's" };
                report(&mut c, format!("{} window {}: only in {only} rows", key.0, key.1));
                continue;
            }
        };
        let exact = a.count == b.count
            && a.max_temp == b.max_temp
            && a.min_temp == b.min_temp
            && a.event_types == b.event_types;
        let mut close = true;
        for (x, y) in [
            (a.avg_temp, b.avg_temp),
            (a.stddev_temp, b.stddev_temp),
            (a.avg_humidity, b.avg_humidity),
            (a.avg_pressure, b.avg_pressure),
        ] {
            match (x, y) {
                (Some(x), Some(y)) => {
                    let rel = if x == y { 0.0 } else { (x - y).abs() / x.abs().max(y.abs()) };
                    c.max_rel = c.max_rel.max(rel);
                    close &= rel <= TOLERANCE;
                }
                (None, None) => {}
                _ => close = false,
            }
        }
        if !(exact && close) {
            report(&mut c, format!("{} window {}: ours {a:?}, Spark {b:?}", key.0, key.1));
        }
    }
    c
}
