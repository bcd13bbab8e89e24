//! The run's chart: throughput per stage and p99 latency per stage, as two
//! panels of horizontal bars on log scales, written as SVG next to the JSON.
//! Stages a run did not measure are left out.

use serde_json::Value;

/// `(label, JSON path)` of each stage's throughput, in records per second.
const THROUGHPUT: &[(&str, &[&str])] = &[
    ("edge log commit (full durability)", &["edge_log_commit", "readings_per_s_commit_1000"]),
    ("edge ingest via MQTT (agent's listener)", &["edge_ingest_mqtt", "default", "readings_per_s"]),
    ("edge ingest via MQTT (Mosquitto)", &["edge_ingest_mqtt", "external", "readings_per_s"]),
    ("ingest HTTP -> embedded log", &["kafka_ingest", "http_ingest_embedded_log_readings_per_s"]),
    ("ingest HTTP -> Kafka (tansu)", &["kafka_ingest", "http_ingest_kafka_readings_per_s"]),
    ("processor, default views", &["cloud_processor", "processor_readings_per_s"]),
    ("processor, reference views, 100k keys", &["processor_views_100k_keys", "events_per_s"]),
    ("5-min tumbling: this project", &["spark_tumbling", "ours", "events_per_s"]),
    ("5-min tumbling: Spark (warm)", &["spark_tumbling", "spark", "events_per_s"]),
    ("archive read + decode", &["archive_and_replay", "archive_read_decode_records_per_s"]),
    ("replay into default views", &["archive_and_replay", "replay_default_views_events_per_s"]),
    ("end to end, sustained (p99 <= 1 s)", &["end_to_end", "max_sustained_per_s"]),
];

/// `(label, JSON path, factor to milliseconds)` of each stage's p99 latency.
const LATENCY: &[(&str, &[&str], f64)] = &[
    (
        "edge arrival -> durable (agent's listener)",
        &["edge_ingest_mqtt", "default", "arrival_to_durable_ms", "p99_at_most"],
        1.0,
    ),
    ("window emit (watermark -> row)", &["window_emit_latency", "p99_ms"], 1.0),
    ("alert: ingest -> alert in the API", &["alert_latency", "p99_ms"], 1.0),
    ("end to end: event -> view row", &["end_to_end", "at_max", "p99_le_s"], 1000.0),
];

fn num(v: &Value, path: &[&str]) -> Option<f64> {
    path.iter().try_fold(v, |v, k| v.get(k))?.as_f64().filter(|x| x.is_finite() && *x > 0.0)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

fn human(x: f64) -> String {
    if x >= 1e6 {
        format!("{:.2}M", x / 1e6)
    } else if x >= 1e4 {
        format!("{:.0}k", x / 1e3)
    } else if x >= 1e3 {
        format!("{:.1}k", x / 1e3)
    } else if x >= 10.0 {
        format!("{x:.0}")
    } else {
        format!("{x:.2}")
    }
}

/// One panel of bars; returns the SVG and its height.
fn panel(title: &str, unit: &str, bars: &[(String, f64)], top: f64) -> (String, f64) {
    const LEFT: f64 = 300.0;
    const WIDTH: f64 = 460.0;
    const ROW: f64 = 22.0;
    let mut svg =
        format!("<text x=\"10\" y=\"{}\" font-size=\"15\" font-weight=\"bold\">{}</text>\n", top + 18.0, escape(title));
    if bars.is_empty() {
        return (svg + &format!("<text x=\"10\" y=\"{}\">not measured in this run</text>\n", top + 40.0), 60.0);
    }
    // Log scale over whole decades around the values.
    let lo = bars.iter().map(|b| b.1).fold(f64::INFINITY, f64::min).log10().floor();
    let hi = bars.iter().map(|b| b.1).fold(0.0, f64::max).log10().ceil().max(lo + 1.0);
    let x = |v: f64| LEFT + (v.log10() - lo) / (hi - lo) * WIDTH;
    let body_top = top + 30.0;
    for d in lo as i32..=hi as i32 {
        let px = x(10f64.powi(d));
        svg += &format!(
            "<line x1=\"{px:.1}\" y1=\"{body_top}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#ddd\"/>\n<text x=\"{px:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"middle\" fill=\"#666\">{}</text>\n",
            body_top + ROW * bars.len() as f64,
            body_top + ROW * bars.len() as f64 + 12.0,
            human(10f64.powi(d))
        );
    }
    for (i, (label, v)) in bars.iter().enumerate() {
        let y = body_top + ROW * i as f64;
        let w = (x(*v) - LEFT).max(1.0);
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" text-anchor=\"end\">{}</text>\n<rect x=\"{LEFT}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" fill=\"#4a7ab5\"/>\n<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\">{} {unit}</text>\n",
            LEFT - 8.0,
            y + 15.0,
            escape(label),
            y + 3.0,
            ROW - 6.0,
            LEFT + w + 4.0,
            y + 15.0,
            human(*v)
        );
    }
    (svg, 30.0 + ROW * bars.len() as f64 + 24.0)
}

/// The chart of a report (the JSON `kappa-bench` writes).
pub fn svg(report: &Value) -> String {
    let through: Vec<(String, f64)> =
        THROUGHPUT.iter().filter_map(|(l, p)| Some((l.to_string(), num(report, p)?))).collect();
    let latency: Vec<(String, f64)> =
        LATENCY.iter().filter_map(|(l, p, f)| Some((l.to_string(), num(report, p)? * f))).collect();
    let m = &report["machine"];
    let title = format!(
        "kappa-bench: {}, {} cores, {} GiB (medians of the run's repetitions)",
        m["cpu"].as_str().unwrap_or("?"),
        m["cores"],
        m["memory_gib"]
    );
    let (a, ha) = panel("Throughput per stage (records/s, log scale)", "/s", &through, 30.0);
    let (b, hb) = panel("p99 latency per stage (ms, log scale)", "ms", &latency, 30.0 + ha);
    let height = 30.0 + ha + hb;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"{height:.0}\" font-family=\"sans-serif\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n<text x=\"10\" y=\"18\" font-size=\"13\" fill=\"#333\">{}</text>\n{a}{b}</svg>\n",
        escape(&title)
    )
}

/// The cluster's scaling curve (`cluster_workers`): readings/s against the
/// number of workers, measured from start and once every worker held its
/// share, each beside its ideal line (one worker's rate times the count),
/// on linear axes. `None` when the run did not measure two counts or more.
pub fn scaling_svg(report: &Value) -> Option<String> {
    const SERIES: [(&str, &str, &str); 2] = [
        ("once every worker held its share", "readings_per_second_after_last_assignment", "#4a7ab5"),
        ("from process start", "readings_per_second", "#d08a2e"),
    ];
    let section = &report["cluster_workers"];
    let counts: Vec<u32> =
        (1..=64).filter(|n| section.get(format!("workers_{n}")).is_some_and(|v| v.is_object())).collect();
    if counts.len() < 2 {
        return None;
    }
    let rate = |n: u32, key: &str| num(&section[format!("workers_{n}")], &[key]);
    let max_n = f64::from(*counts.last()?);
    let one = SERIES.iter().filter_map(|(_, k, _)| rate(1, k)).fold(0.0, f64::max);
    let top = (one * max_n)
        .max(SERIES.iter().flat_map(|(_, k, _)| counts.iter().filter_map(|&n| rate(n, k))).fold(0.0, f64::max));
    let (left, bottom, w, h) = (70.0, 330.0, 560.0, 280.0);
    let x = |n: f64| left + n / max_n * w;
    let y = |v: f64| bottom - v / top * h;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"860\" height=\"380\" font-family=\"sans-serif\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"10\" y=\"20\" font-size=\"15\" font-weight=\"bold\">Processor workers of {} core each: readings/s against workers (dashed: ideal)</text>\n\
         <line x1=\"{left}\" y1=\"{bottom}\" x2=\"{:.1}\" y2=\"{bottom}\" stroke=\"#333\"/>\n\
         <line x1=\"{left}\" y1=\"{bottom}\" x2=\"{left}\" y2=\"{:.1}\" stroke=\"#333\"/>\n",
        section["worker_cpu_budget_cores"].as_f64().map_or("unbudgeted".to_string(), |c| format!("{c}")),
        left + w,
        bottom - h
    );
    svg += &format!(
        "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">workers</text>\n\
         <text x=\"{left}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">readings/s</text>\n",
        left + w / 2.0,
        bottom + 32.0,
        bottom - h - 8.0
    );
    for &n in &counts {
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"middle\">{n}</text>\n",
            x(f64::from(n)),
            bottom + 16.0
        );
    }
    for i in 0..=4 {
        let v = top * f64::from(i) / 4.0;
        svg += &format!(
            "<text x=\"{:.1}\" y=\"{:.1}\" font-size=\"10\" text-anchor=\"end\" fill=\"#666\">{}</text>\n",
            left - 6.0,
            y(v) + 4.0,
            human(v)
        );
    }
    for (i, (label, key, colour)) in SERIES.iter().enumerate() {
        let Some(base) = rate(1, key) else { continue };
        let points: Vec<String> =
            counts.iter().filter_map(|&n| Some(format!("{:.1},{:.1}", x(f64::from(n)), y(rate(n, key)?)))).collect();
        svg += &format!(
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-dasharray=\"5,4\"/>\n\
             <polyline points=\"{}\" fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" font-size=\"12\" fill=\"{colour}\">{}</text>\n",
            x(1.0),
            y(base),
            x(max_n),
            y(base * max_n),
            points.join(" "),
            left + w + 12.0,
            bottom - h + 16.0 * i as f64,
            escape(label)
        );
    }
    Some(svg + "</svg>\n")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn measured_stages_are_drawn_and_missing_ones_left_out() {
        let report = json!({
            "machine": { "cpu": "X", "cores": 2, "memory_gib": 1.0 },
            "edge_log_commit": { "readings_per_s_commit_1000": 250000.0 },
            "window_emit_latency": { "p99_ms": 12.4 },
        });
        let svg = super::svg(&report);
        assert!(svg.contains("edge log commit") && svg.contains("250k /s"), "{svg}");
        assert!(svg.contains("window emit") && svg.contains("12 ms"), "{svg}");
        assert!(!svg.contains("Spark"), "{svg}");
    }

    #[test]
    fn the_scaling_curve_needs_two_worker_counts() {
        let one = json!({ "readings_per_second": 100.0, "readings_per_second_after_last_assignment": 110.0 });
        let two = json!({ "readings_per_second": 180.0, "readings_per_second_after_last_assignment": 210.0 });
        assert!(super::scaling_svg(&json!({ "cluster_workers": { "workers_1": one.clone() } })).is_none());
        let svg = super::scaling_svg(&json!({ "cluster_workers": { "workers_1": one, "workers_2": two } })).unwrap();
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert!(svg.contains("from process start") && svg.contains("unbudgeted"), "{svg}");
    }
}
