//! The machine's own limits, and the Markdown summary of a run: every figure
//! as measured and, where a limit of this machine bounds it, as a ratio to
//! that limit, so a slower machine does not read as a regression.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::time::Instant;

use serde_json::{Value, json};

/// Single-thread memory copy bandwidth, GB/s (a 64 MiB buffer copied 8 times).
pub fn memory_bandwidth_gbps(scale: f64) -> f64 {
    let size = 64 << 20;
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size];
    dst.copy_from_slice(&src); // fault the pages in
    let rounds = if scale < 1.0 { 2 } else { 8 };
    let t = Instant::now();
    for _ in 0..rounds {
        dst.copy_from_slice(std::hint::black_box(&src));
        std::hint::black_box(&mut dst);
    }
    (rounds * size) as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Loopback TCP, one connection: `writes` writes of `size` bytes each.
/// Returns (MB/s, writes/s).
pub fn loopback(size: usize, writes: usize) -> (f64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0usize;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n;
        }
        total
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_nodelay(true).unwrap();
    let chunk = vec![7u8; size];
    let t = Instant::now();
    for _ in 0..writes {
        s.write_all(&chunk).unwrap();
    }
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let total = reader.join().unwrap();
    let secs = t.elapsed().as_secs_f64();
    assert_eq!(total, size * writes);
    (total as f64 / secs / 1e6, writes as f64 / secs)
}

/// The limits measured at the start of a run (added to the machine section).
pub fn limits(scale: f64) -> Value {
    let bandwidth = memory_bandwidth_gbps(scale);
    let small_writes = if scale < 1.0 { 20_000 } else { 200_000 };
    let large_writes = if scale < 1.0 { 64 } else { 512 };
    let (small_mbps, small_per_s) = loopback(64, small_writes);
    let (large_mbps, _) = loopback(1 << 20, large_writes);
    println!(
        "machine limits: memory copy {bandwidth:.1} GB/s (one thread); loopback TCP {small_per_s:.0} writes/s of 64 B ({small_mbps:.1} MB/s), {large_mbps:.0} MB/s in 1 MiB writes"
    );
    json!({
        "memory_copy_gb_per_s": bandwidth,
        "loopback_64b_writes_per_s": small_per_s, "loopback_64b_mb_per_s": small_mbps,
        "loopback_1mib_mb_per_s": large_mbps,
    })
}

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64()
}

/// Every numeric leaf of `v` as (`a.b.c`, value).
fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, f64)>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                leaves(&if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, v, out);
            }
        }
        Value::Number(n) => out.extend(n.as_f64().map(|x| (prefix.to_string(), x))),
        _ => {}
    }
}

/// One section's runs as one result: every numeric figure the median of its
/// runs, and `runs: {n, min_max: {figure: [min, max]}}` beside them. One run
/// is returned as it is.
pub fn combine(mut runs: Vec<Value>) -> Value {
    if runs.len() < 2 {
        return runs.pop().unwrap_or(Value::Null);
    }
    let per_run: Vec<Vec<(String, f64)>> = runs
        .iter()
        .map(|r| {
            let mut out = Vec::new();
            leaves("", r, &mut out);
            out
        })
        .collect();
    let mut merged = runs[0].clone();
    let mut spread = serde_json::Map::new();
    for (path, _) in &per_run[0] {
        let mut xs: Vec<f64> =
            per_run.iter().filter_map(|r| r.iter().find(|(p, _)| p == path).map(|(_, x)| *x)).collect();
        xs.sort_by(f64::total_cmp);
        let median = xs[xs.len() / 2];
        if let Some(slot) = path.split('.').try_fold(&mut merged, |v, k| v.get_mut(k)) {
            *slot = json!(median);
        }
        spread.insert(path.clone(), json!([xs[0], xs[xs.len() - 1]]));
    }
    if let Value::Object(m) = &mut merged {
        m.insert("runs".into(), json!({ "n": runs.len(), "min_max": spread }));
    }
    merged
}

fn fmt(x: f64) -> String {
    if x.abs() >= 1000.0 {
        let s = format!("{:.0}", x);
        let (sign, digits) = s.strip_prefix('-').map_or(("", s.as_str()), |d| ("-", d));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if x.fract() == 0.0 {
        format!("{x:.0}")
    } else if x.abs() >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// The Markdown summary of a run's report.
pub fn markdown(report: &Value) -> String {
    let m = &report["machine"];
    let mut s = String::from("# kappa-bench results\n\n");
    s.push_str(&format!(
        "Machine: {}, {} cores, {} GiB; fsync p50 {} ms, p99 {} ms; memory copy {} GB/s (one thread); loopback TCP {} writes/s of 64 B, {} MB/s in 1 MiB writes.\n\n",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"],
        num(m, &["fsync_p50_ms"]).map_or("?".into(), fmt),
        num(m, &["fsync_p99_ms"]).map_or("?".into(), fmt),
        num(m, &["limits", "memory_copy_gb_per_s"]).map_or("?".into(), fmt),
        num(m, &["limits", "loopback_64b_writes_per_s"]).map_or("?".into(), fmt),
        num(m, &["limits", "loopback_1mib_mb_per_s"]).map_or("?".into(), fmt),
    ));
    // Figures bounded by a limit of this machine, as ratios to it.
    let fsync_p50_s = num(m, &["fsync_p50_ms"]).map(|x| x / 1e3);
    let fsync_p99_ms = num(m, &["fsync_p99_ms"]);
    let mut ratios: Vec<(String, String, String)> = Vec::new();
    if let (Some(per_s), Some(f)) = (num(report, &["edge_log_commit", "readings_per_s_commit_1"]), fsync_p50_s) {
        ratios.push((
            "edge log, one reading per commit".into(),
            format!("{} readings/s", fmt(per_s)),
            format!("{:.2} of the fsync rate (1 / fsync p50)", per_s * f),
        ));
    }
    if let (Some(per_s), Some(f)) = (num(report, &["edge_log_commit", "readings_per_s_commit_1000"]), fsync_p50_s) {
        ratios.push((
            "edge log, commits of 1,000".into(),
            format!("{} readings/s", fmt(per_s)),
            format!("{} readings per fsync time", fmt(per_s * f)),
        ));
    }
    for run in ["default", "external", "default_10k_devices", "default_low_load", "gateway_profile"] {
        if let (Some(p99), Some(f)) =
            (num(report, &["edge_ingest_mqtt", run, "arrival_to_durable_ms", "p99_at_most"]), fsync_p99_ms)
        {
            ratios.push((
                format!("edge arrival → durable p99, {run}"),
                format!("{} ms", fmt(p99)),
                format!("{:.1} × fsync p99 (goal ≤ 2.5)", p99 / f),
            ));
        }
    }
    if let (Some(wire), Some(device)) = (
        num(report, &["wire_bytes", "columnar", "wire_bytes_per_reading"]),
        num(report, &["wire_bytes", "device_cbor_bytes_per_reading"]),
    ) {
        ratios.push((
            "edge → cloud wire, columnar".into(),
            format!("{} bytes/reading", fmt(wire)),
            format!("{:.3} of the device's CBOR payload", wire / device),
        ));
    }
    if let Some(r) = num(report, &["kafka_ingest", "ratio_to_producer"]) {
        let per_s = num(report, &["kafka_ingest", "http_ingest_kafka_readings_per_s"]).unwrap_or(0.0);
        ratios.push((
            "HTTP ingest → Kafka".into(),
            format!("{} readings/s", fmt(per_s)),
            format!("{r:.2} of rdkafka's own producer (goal ≥ 0.5)"),
        ));
    }
    if let Some(one) = num(report, &["cluster_workers", "workers_1", "readings_per_second_after_last_assignment"]) {
        let speedups: Vec<String> = ["2", "4", "8"]
            .iter()
            .filter_map(|n| {
                let s = num(report, &["cluster_workers", "speedups_after_last_assignment", n])?;
                Some(format!("{s:.2} at {n}"))
            })
            .collect();
        let budget = report["cluster_workers"]["worker_cpu_budget_cores"]
            .as_f64()
            .map_or("unbudgeted".to_string(), |c| format!("{c} core each"));
        ratios.push((
            "processor workers, Kafka → PostgreSQL".into(),
            format!("{} readings/s with 1 worker ({budget})", fmt(one)),
            format!("speedup {} (goal 1.8 / 3.4 / 6), once every worker held its share", speedups.join(", ")),
        ));
    }
    let ingest: Vec<String> = ["1", "2", "4"]
        .iter()
        .filter_map(|n| {
            let per_s = num(report, &["cluster_ingest_nodes", &format!("nodes_{n}"), "accepted_readings_per_s"])?;
            Some(format!("{} readings/s with {n}", fmt(per_s)))
        })
        .collect();
    if !ingest.is_empty() {
        ratios.push((
            "ingest nodes → Kafka".into(),
            ingest.join(", "),
            "nodes of a quarter core each, beside rdkafka's producer in the same run".into(),
        ));
    }
    table(&mut s, "Against this machine's limits", "ratio", ratios);
    table(&mut s, "Against the peers and the goals, same run", "against", peers(report));
    s.push_str("## Every figure\n\nA section run several times shows the median and, in brackets, the lowest and highest run.\n\n| section | figure | value |\n|---|---|---|\n");
    if let Value::Object(sections) = report {
        for (name, v) in sections.iter().filter(|(k, _)| k.as_str() != "machine") {
            let mut out = Vec::new();
            leaves("", v, &mut out);
            let spread = &v["runs"]["min_max"];
            for (k, x) in out.into_iter().filter(|(k, _)| !k.starts_with("runs.")) {
                let range = match (spread[&k][0].as_f64(), spread[&k][1].as_f64()) {
                    (Some(lo), Some(hi)) => format!(" ({} – {}, {} runs)", fmt(lo), fmt(hi), v["runs"]["n"]),
                    _ => String::new(),
                };
                s.push_str(&format!("| {name} | {k} | {}{range} |\n", fmt(x)));
            }
        }
    }
    s
}

/// A three-column Markdown table under a heading, if it has rows.
fn table(s: &mut String, title: &str, third: &str, rows: Vec<(String, String, String)>) {
    if rows.is_empty() {
        return;
    }
    s.push_str(&format!("## {title}\n\n| figure | measured | {third} |\n|---|---|---|\n"));
    for (a, b, c) in rows {
        s.push_str(&format!("| {a} | {b} | {c} |\n"));
    }
    s.push('\n');
}

/// The peers measured in the same run (Spark, a Mosquitto bridge) and the
/// end-to-end goal, as `(figure, measured, against)`.
fn peers(report: &Value) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    let spark = &report["spark_tumbling"];
    if let (Some(ours), Some(theirs), Some(r)) = (
        num(spark, &["ours", "events_per_cpu_second"]),
        num(spark, &["spark", "events_per_cpu_second"]),
        num(spark, &["ratio", "per_cpu_second"]),
    ) {
        let agree = if spark["rows_agree"].as_bool() == Some(true) { "rows agree" } else { "ROWS DISAGREE" };
        out.push((
            "5-minute tumbling view, events per CPU-second".into(),
            format!("{} (Spark: {})", fmt(ours), fmt(theirs)),
            format!("{r:.2} × Spark Structured Streaming, warm ({agree})"),
        ));
    }
    if let (Some(ours), Some(duck), Some(r)) = (
        num(spark, &["ours", "events_per_s"]),
        num(spark, &["duckdb", "events_per_s"]),
        num(spark, &["duckdb", "ours_over_duckdb", "wall_throughput"]),
    ) {
        let agree = if spark["duckdb"]["rows_agree"].as_bool() == Some(true) { "rows agree" } else { "ROWS DISAGREE" };
        out.push((
            "5-minute tumbling view, events/s (a batch engine's ceiling)".into(),
            format!("{} (DuckDB batch GROUP BY, warm: {})", fmt(ours), fmt(duck)),
            format!("{r:.2} of DuckDB's batch rate ({agree})"),
        ));
    }
    if let (Some(bridge), Some(ours)) = (
        num(report, &["mqtt_bridge_bytes", "both_directions_bytes_per_reading"]),
        num(report, &["wire_bytes", "columnar", "wire_bytes_per_reading"]),
    ) {
        out.push((
            "edge → cloud bytes per reading".into(),
            format!("{} (Mosquitto bridge, JSON: {})", fmt(ours), fmt(bridge)),
            format!("{:.3} of the bridge's", ours / bridge),
        ));
    }
    if let Some(max) = num(report, &["end_to_end", "max_sustained_per_s"]) {
        let p99 = num(report, &["end_to_end", "at_max", "p99_le_s"]).map_or("?".into(), fmt);
        out.push((
            "end to end, highest sustained rate".into(),
            format!("{} readings/s, p99 event → view ≤ {p99} s", fmt(max)),
            "goal: p99 ≤ 1 s".into(),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_combine_into_medians_with_their_range() {
        let runs = vec![
            json!({"rate": 10.0, "lat": {"p99": 5.0}, "name": "x"}),
            json!({"rate": 30.0, "lat": {"p99": 4.0}, "name": "x"}),
            json!({"rate": 20.0, "lat": {"p99": 6.0}, "name": "x"}),
        ];
        let c = combine(runs);
        assert_eq!(c["rate"], 20.0);
        assert_eq!(c["lat"]["p99"], 5.0);
        assert_eq!(c["name"], "x");
        assert_eq!(c["runs"]["n"], 3);
        assert_eq!(c["runs"]["min_max"]["rate"], json!([10.0, 30.0]));
        let md = markdown(&json!({"machine": {}, "s": c}));
        assert!(md.contains("| s | rate | 20 (10 – 30, 3 runs) |"), "{md}");
        assert!(!md.contains("runs.n"));
        assert_eq!(combine(vec![json!({"a": 1})]), json!({"a": 1}));
    }
}
