//! The stream processor against fixed and random scenarios, in-process over
//! the real embedded log and store:
//!
//! * golden files: fixed scenarios (in order, shuffled within the
//!   out-of-orderness bound, with duplicates, with late data inside and
//!   beyond the allowed lateness) give exactly the committed rows of the
//!   reference design's three views (`UPDATE_GOLDEN=1` rewrites them);
//! * stream == batch: random scenarios give the same rows and late events as
//!   the independent batch computation;
//! * an idle partition does not stall the others' final windows.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests may unwrap

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kappa_cloud::config::{CloudConfig, Durability};
use kappa_cloud::eventlog::sqlite::SqliteLog;
use kappa_cloud::eventlog::{AppendBatch, AppendRecord, LogAppender, LogSource};
use kappa_cloud::metrics::CloudMetrics;
use kappa_cloud::processor::{Processor, ProcessorSettings};
use kappa_cloud::store::{RowQuery, ViewStore};
use kappa_cloud::views::reference::{self, LogEntry};
use kappa_cloud::views::spec::ViewSpec;
use kappa_common::Reading;
use kappa_common::record::{self, LogEvent, LogRecord};
use proptest::prelude::*;

mod common;

const T0: i64 = 1_767_225_600_000; // 2026-01-01T00:00:00Z
const MIN: i64 = 60_000;

fn reference_views() -> (Vec<ViewSpec>, i64) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cloud/single-node.toml");
    let cfg = CloudConfig::load(&path).unwrap();
    (cfg.view_specs().unwrap(), cfg.processor.max_out_of_orderness.as_millis() as i64)
}

fn reading(device: &str, user: &str, seq: u64, ts_ms: i64, kind: &str, t: Option<f64>) -> Reading {
    Reading {
        device: device.into(),
        boot: 1,
        seq,
        ts_ms,
        schema: 2,
        metrics: [
            ("temperature".to_string(), t),
            ("humidity".to_string(), Some(40.0 + (seq % 7) as f64)),
            ("pressure".to_string(), Some(1000.0 + (seq % 5) as f64 * 0.5)),
        ]
        .into(),
        tags: [("user".to_string(), user.to_string()), ("type".to_string(), kind.to_string())].into(),
    }
}

/// What a run of the processor produced.
struct Outcome {
    dump: String,
    late: String,
    rows: BTreeMap<String, reference::Rows>,
    late_keys: BTreeMap<String, Vec<(u32, u64, i64)>>,
    log: Vec<LogEntry>,
}

/// Appends `readings` (in this order, 50 per batch) to a fresh embedded log
/// with `partitions` partitions, runs the processor over all of it and
/// returns the views, the late log and the log as the batch path sees it.
fn run(specs: &[ViewSpec], bound_ms: i64, partitions: u32, readings: &[Reading]) -> Outcome {
    let dir = tempfile::tempdir().unwrap();
    let log = SqliteLog::open(&dir.path().join("log.sqlite"), partitions, Durability::Normal).unwrap();
    let appender = log.start_writer(16).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for (i, chunk) in readings.chunks(50).enumerate() {
        rt.block_on(appender.append(common::reading_batch(i as u64, chunk))).unwrap();
    }
    let store_path = dir.path().join("views.sqlite");
    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(CloudMetrics::new(&mut registry));
    let settings = ProcessorSettings {
        max_out_of_orderness_ms: bound_ms,
        idle_timeout: Duration::from_secs(3600),
        poll_records: 7, // small polls interleave partitions in many ways
        ..ProcessorSettings::default()
    };
    let mut p = Processor::single(
        log.source().unwrap(),
        ViewStore::open(&store_path).unwrap(),
        specs.to_vec(),
        settings,
        metrics,
    )
    .unwrap();
    let mut done = 0;
    while done < readings.len() {
        done += p.step(Duration::from_millis(1)).unwrap();
    }
    p.checkpoint().unwrap();
    drop(p);

    let store = ViewStore::open_read_only(&store_path).unwrap();
    let mut rows = BTreeMap::new();
    for spec in specs {
        let q = RowQuery { view_id: spec.id(), key: None, from: i64::MIN, to: i64::MAX, after: None, limit: 1 << 30 };
        let view_rows = store
            .rows(&q)
            .unwrap()
            .into_iter()
            .map(|r| ((r.key, r.window_start), (r.window_end, r.values.as_object().cloned().unwrap_or_default())))
            .collect();
        rows.insert(spec.id(), view_rows);
    }
    let q = kappa_cloud::store::LateQuery {
        view_id: None,
        device: None,
        from: i64::MIN,
        to: i64::MAX,
        after: None,
        limit: 1 << 30,
    };
    let mut late_keys: BTreeMap<String, Vec<(u32, u64, i64)>> = BTreeMap::new();
    for l in store.late_events(&q).unwrap() {
        late_keys.entry(l.view.clone()).or_default().push((l.partition, l.offset, l.window_start));
    }
    let mut src = log.source().unwrap();
    let mut entries = Vec::new();
    loop {
        let recs = src.poll(10_000, Duration::ZERO).unwrap();
        if recs.is_empty() {
            break;
        }
        for rec in recs {
            let reading = record::decode(&rec.value).unwrap().into_reading().unwrap();
            entries.push(LogEntry { partition: rec.partition, offset: rec.offset, reading });
        }
    }
    Outcome { dump: store.dump().unwrap(), late: store.dump_late().unwrap(), rows, late_keys, log: entries }
}

/// Three devices, two users, a reading every 30 s for 50 minutes, with a
/// 35-minute pause of user u-b's only device in the middle (two sessions
/// with the 30-minute gap).
fn in_order() -> Vec<Reading> {
    let kinds = ["telemetry", "telemetry", "status", "telemetry", "alarm"];
    let mut out = Vec::new();
    for i in 0..100u64 {
        for (d, dev, user) in [(0, "dev-a", "u-a"), (1, "dev-b", "u-a"), (2, "dev-c", "u-b")] {
            let ts = T0 + i as i64 * 30_000 + d * 1000;
            if dev == "dev-c" && (20..90).contains(&i) {
                continue;
            }
            let t = if i % 17 == 3 { None } else { Some(20.0 + ((i * 7 + d as u64) % 13) as f64 * 0.25) };
            out.push(reading(dev, user, i + 1, ts, kinds[(i as usize + d as usize) % 5], t));
        }
    }
    out
}

/// The same readings, each block of 8 reversed: out of order by at most 4 minutes.
fn shuffled() -> Vec<Reading> {
    in_order().chunks(8).flat_map(|c| c.iter().rev().cloned().collect::<Vec<_>>()).collect()
}

/// Every fifth reading sent again a few readings later.
fn with_duplicates() -> Vec<Reading> {
    let src = in_order();
    let mut out = Vec::new();
    for (i, r) in src.iter().enumerate() {
        out.push(r.clone());
        if i % 5 == 0 && i >= 3 {
            out.push(src[i - 3].clone());
        }
    }
    out
}

/// In order, plus late readings of dev-a: some within the allowed lateness,
/// some beyond it.
fn with_late() -> Vec<Reading> {
    let mut out = in_order();
    // dev-a has reached T0 + ~49.5 min; its partition watermark is then ~39.5 min (10 min bound).
    // 5-minute windows with 10 minutes of lateness: [20, 25) stopped taking data at minute 35:
    // late. [30, 35) takes data until minute 45: on time.
    for (seq, minute) in [(1001u64, 21i64), (1002, 22), (1003, 31), (1004, 33)] {
        out.push(reading("dev-a", "u-a", seq, T0 + minute * MIN, "telemetry", Some(99.0)));
    }
    out
}

fn check_golden(name: &str, out: &Outcome) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(format!("{name}.txt"));
    let actual = format!("# views\n{}# late\n{}", out.dump, out.late);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &actual).unwrap();
        return;
    }
    let expected =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e} (run with UPDATE_GOLDEN=1)", path.display()));
    if expected != actual {
        let first = expected.lines().zip(actual.lines()).find(|(e, a)| e != a);
        panic!("{name}: rows differ from {}\nfirst difference:\n  expected {first:?}", path.display());
    }
}

#[test]
fn golden_reference_views_in_order() {
    let (specs, bound) = reference_views();
    let out = run(&specs, bound, 4, &in_order());
    check_golden("in_order", &out);
    assert!(out.late.is_empty(), "nothing is late in order: {}", out.late);
}

#[test]
fn golden_shuffled_within_the_bound_and_duplicated_give_the_same_rows_as_in_order() {
    let (specs, bound) = reference_views();
    let clean = run(&specs, bound, 4, &in_order());
    let shuffled = run(&specs, bound, 4, &shuffled());
    let duplicated = run(&specs, bound, 4, &with_duplicates());
    check_golden("shuffled", &shuffled);
    check_golden("duplicates", &duplicated);
    assert_eq!(shuffled.dump, clean.dump, "out of order within the bound changes nothing, to the bit");
    assert_eq!(duplicated.dump, clean.dump, "duplicates change nothing");
    assert!(shuffled.late.is_empty() && duplicated.late.is_empty());
}

#[test]
fn golden_late_data_inside_the_allowed_lateness_updates_rows_beyond_it_goes_to_the_late_log() {
    let (specs, bound) = reference_views();
    let out = run(&specs, bound, 4, &with_late());
    check_golden("late", &out);
    let late: Vec<&str> = out.late.lines().filter(|l| l.starts_with("device_metrics@1")).collect();
    assert_eq!(late.len(), 2, "{}", out.late);
    assert!(late.iter().all(|l| l.contains("\tdev-a\t100") && l.ends_with("\tlate")), "{late:?}");
    // The global view never refuses a reading; the on-time late readings are in device_metrics.
    assert!(!out.late.contains("device_lifetime"));
    let rows = &out.rows["device_metrics@1"];
    let w30 = &rows[&("dev-a".to_string(), T0 + 30 * MIN)].1;
    let clean = run(&specs, bound, 4, &in_order());
    let w30_clean = &clean.rows["device_metrics@1"][&("dev-a".to_string(), T0 + 30 * MIN)].1;
    assert_eq!(w30["event_count"].as_u64().unwrap(), w30_clean["event_count"].as_u64().unwrap() + 2);
    assert_eq!(w30["max_temp"], 99.0);
}

fn extra_views() -> Vec<ViewSpec> {
    let text = r#"
[[views]]
name = "hopping_final"
key = "device"
window = { kind = "hopping", size = "4m", slide = "1m" }
output = "final"
allowed_lateness = "1m"
aggregates = [
  { name = "n", fn = "count" },
  { name = "sum_t", fn = "sum", of = "temperature" },
  { name = "var_t", fn = "variance", of = "temperature" },
  { name = "first_t", fn = "first", of = "temperature" },
  { name = "last_type", fn = "last", of = "tags.type" },
]
[[views]]
name = "alarms_by_user"
key = "tags.user"
window = { kind = "session", gap = "2m" }
output = "final"
filter = ["tags.type != telemetry", "temperature >= 20"]
aggregates = [
  { name = "n", fn = "count" },
  { name = "devices", fn = "set", of = "device", max = 2 },
  { name = "temps", fn = "list", of = "temperature", max = 3 },
]
"#;
    let cfg = CloudConfig::from_toml(&format!(
        "[api]\ndevices_view = \"hopping_final\"\nwindows_view = \"hopping_final\"\n{text}"
    ))
    .unwrap();
    cfg.view_specs().unwrap()
}

prop_compose! {
    fn scenario()(
        devices in 1usize..6,
        steps in prop::collection::vec((0usize..6, 0i64..90_000, any::<bool>(), 0u8..10, prop::option::weighted(0.9, 15.0f64..30.0)), 1..160),
    ) -> Vec<Reading> {
        let kinds = ["telemetry", "status", "alarm"];
        let mut clock = vec![T0; devices];
        let mut seq = vec![0u64; devices];
        let mut out: Vec<Reading> = Vec::new();
        for (d, jump, user_b, k, t) in steps {
            let d = d % devices;
            seq[d] += 1;
            // Mostly forward; sometimes a step back (out of order or late); sometimes a long pause.
            let ts = match k {
                0 => clock[d] - jump * 10,
                1 => { clock[d] += 40 * 60_000; clock[d] }
                _ => { clock[d] += jump; clock[d] }
            };
            let user = if user_b { "u-b" } else { "u-a" };
            let r = reading(&format!("dev-{d}"), user, seq[d], ts, kinds[usize::from(k) % 3], t);
            if k == 9 && !out.is_empty() {
                let again = out[out.len() / 2].clone();
                out.push(again);
            }
            out.push(r);
        }
        out
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|c| c.parse().ok()).unwrap_or(256),
        ..ProptestConfig::default()
    })]

    #[test]
    fn the_stream_equals_the_batch_computation(readings in scenario(), partitions in 1u32..5) {
        let (mut specs, _) = reference_views();
        specs.extend(extra_views());
        let bound = 2 * MIN;
        let out = run(&specs, bound, partitions, &readings);
        for spec in &specs {
            let b = reference::compute(spec, &out.log, bound);
            let problems = reference::diff(spec, &out.rows[&spec.id()], &b);
            prop_assert!(problems.is_empty(), "{}", problems.join("\n"));
            let mut stream_late: Vec<(u32, u64, i64)> = out.late_keys.get(&spec.id()).cloned().unwrap_or_default();
            stream_late.sort_unstable();
            let batch_late: Vec<(u32, u64, i64)> = b.late.iter().copied().collect();
            prop_assert_eq!(stream_late, batch_late, "late events of {}", spec.id());
        }
    }
}

#[test]
fn an_idle_partition_does_not_stall_the_final_windows_of_the_others() {
    let final_view = CloudConfig::from_toml(
        r#"
[api]
devices_view = "per_minute"
windows_view = "per_minute"
[[views]]
name = "per_minute"
window = { kind = "tumbling", size = "1m" }
output = "final"
aggregates = [{ name = "n", fn = "count" }]
"#,
    )
    .unwrap()
    .view_specs()
    .unwrap();
    // Two devices on different partitions of a 2-partition log.
    let (busy, quiet) = {
        let mut ids = (0..100).map(|i| format!("dev-{i}"));
        let first = ids.next().unwrap();
        let p = kappa_common::partition::partition_for(&first, 2);
        let other = ids.find(|d| kappa_common::partition::partition_for(d, 2) != p).unwrap();
        (first, other)
    };
    let rows_after = |idle_timeout: Duration| -> usize {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(&dir.path().join("log.sqlite"), 2, Durability::Normal).unwrap();
        let appender = log.start_writer(16).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let append = |id: u64, rs: Vec<Reading>| {
            let records = rs
                .into_iter()
                .map(|r| AppendRecord {
                    key: r.device.clone(),
                    partition: None,
                    value: record::encode(&LogRecord {
                        gateway: "gw".into(),
                        batch_id: id,
                        ingest_ms: 0,
                        event: LogEvent::Reading(r),
                    }),
                })
                .collect();
            rt.block_on(appender.append(AppendBatch { gateway: "gw".into(), batch_id: id, records })).unwrap();
        };
        append(
            0,
            vec![
                reading(&quiet, "u", 1, T0, "telemetry", Some(1.0)),
                reading(&busy, "u", 1, T0, "telemetry", Some(1.0)),
            ],
        );
        let mut registry = prometheus_client::registry::Registry::default();
        let settings = ProcessorSettings { max_out_of_orderness_ms: 0, idle_timeout, ..ProcessorSettings::default() };
        let store_path = dir.path().join("v.sqlite");
        let mut p = Processor::single(
            log.source().unwrap(),
            ViewStore::open(&store_path).unwrap(),
            final_view.clone(),
            settings,
            Arc::new(CloudMetrics::new(&mut registry)),
        )
        .unwrap();
        p.step(Duration::from_millis(10)).unwrap();
        // Only the busy device keeps sending, for ten minutes of event time.
        for i in 1..=20u64 {
            std::thread::sleep(Duration::from_millis(20));
            append(i, vec![reading(&busy, "u", i + 1, T0 + i as i64 * 30_000, "telemetry", Some(1.0))]);
            p.step(Duration::from_millis(10)).unwrap();
        }
        p.checkpoint().unwrap();
        p.sync().unwrap();
        let store = ViewStore::open_read_only(&store_path).unwrap();
        let q = RowQuery {
            view_id: "per_minute@1".into(),
            key: None,
            from: i64::MIN,
            to: i64::MAX,
            after: None,
            limit: 1000,
        };
        store.rows(&q).unwrap().len()
    };
    assert!(rows_after(Duration::from_millis(100)) >= 8, "the busy partition's minutes closed");
    assert_eq!(
        rows_after(Duration::from_secs(3600)),
        0,
        "without idleness the quiet partition holds every window open"
    );
}

/// Every pipeline (live views, alerts, edge aggregates, a version being
/// rebuilt) runs its own processor over the same log with the node's one
/// set of metrics: each reports its own lag and processed readings, not
/// whichever wrote last or the sum of both.
#[test]
fn each_pipeline_reports_its_own_lag() {
    let dir = tempfile::tempdir().unwrap();
    let log = SqliteLog::open(&dir.path().join("log.sqlite"), 1, Durability::Normal).unwrap();
    let appender = log.start_writer(16).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let records = (0..20u64)
        .map(|i| AppendRecord {
            key: "dev-1".into(),
            partition: None,
            value: record::encode(&LogRecord {
                gateway: "gw".into(),
                batch_id: 0,
                ingest_ms: 0,
                event: LogEvent::Reading(reading("dev-1", "u", i + 1, T0 + i as i64 * 1000, "telemetry", Some(1.0))),
            }),
        })
        .collect();
    rt.block_on(appender.append(AppendBatch { gateway: "gw".into(), batch_id: 0, records })).unwrap();

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(CloudMetrics::new(&mut registry));
    let settings = ProcessorSettings { poll_records: 5, ..ProcessorSettings::default() };
    let processor = |name: &str| {
        let store = ViewStore::open(&dir.path().join(format!("{name}.sqlite"))).unwrap();
        Processor::with_operators(
            log.source().unwrap(),
            store,
            name.into(),
            Vec::new(),
            false,
            settings,
            metrics.clone(),
        )
        .unwrap()
    };
    let (mut ahead, mut behind) = (processor("main"), processor("alerts"));
    while ahead.step(Duration::from_millis(10)).unwrap() > 0 {}
    behind.step(Duration::from_millis(10)).unwrap();
    // Lag is reported every 2 s: one more step each after that.
    std::thread::sleep(Duration::from_millis(2100));
    ahead.step(Duration::from_millis(10)).unwrap();
    behind.step(Duration::from_millis(10)).unwrap();

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let value = |series: &str| {
        text.lines().find(|l| l.starts_with(series)).and_then(|l| l.rsplit_once(' ')).map(|(_, v)| v.to_string())
    };
    let lag = |pipeline: &str| {
        value(&format!("kappa_cloud_processor_lag_records{{pipeline=\"{pipeline}\",partition=\"0\"}}"))
    };
    assert_eq!(lag("main").as_deref(), Some("0"), "{text}");
    assert_eq!(lag("alerts").as_deref(), Some("10"), "{text}");
    // Each pipeline counts the readings it processed, not the sum of both.
    let processed = |pipeline: &str| value(&format!("kappa_cloud_readings_processed_total{{pipeline=\"{pipeline}\"}}"));
    assert_eq!(processed("main").as_deref(), Some("20"), "{text}");
    assert_eq!(processed("alerts").as_deref(), Some("10"), "{text}");
}

/// Freshness: each reading is observed once, from its event time to the
/// commit of the checkpoint that makes it visible; a duplicate is not.
#[test]
fn freshness_is_measured_from_each_readings_event_time_to_its_commit() {
    let dir = tempfile::tempdir().unwrap();
    let log = SqliteLog::open(&dir.path().join("log.sqlite"), 1, Durability::Normal).unwrap();
    let appender = log.start_writer(16).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64;
    // Ten readings 2.5 s old and ten 0.7 s old, then the first one again.
    let mut readings: Vec<Reading> = (0..20u64)
        .map(|i| reading("dev-1", "u", i + 1, now - if i < 10 { 2500 } else { 700 }, "telemetry", Some(1.0)))
        .collect();
    readings.push(readings[0].clone());
    let records = readings
        .into_iter()
        .map(|r| AppendRecord {
            key: "dev-1".into(),
            partition: None,
            value: record::encode(&LogRecord {
                gateway: "gw".into(),
                batch_id: 0,
                ingest_ms: now,
                event: LogEvent::Reading(r),
            }),
        })
        .collect();
    rt.block_on(appender.append(AppendBatch { gateway: "gw".into(), batch_id: 0, records })).unwrap();

    let mut registry = prometheus_client::registry::Registry::default();
    let metrics = Arc::new(CloudMetrics::new(&mut registry));
    let store = ViewStore::open(&dir.path().join("views.sqlite")).unwrap();
    let mut p = Processor::with_operators(
        log.source().unwrap(),
        store,
        "main".into(),
        Vec::new(),
        false,
        ProcessorSettings::default(),
        metrics,
    )
    .unwrap();
    while p.step(Duration::from_millis(10)).unwrap() > 0 {}
    p.checkpoint().unwrap();
    p.sync().unwrap();

    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
    let bucket = |le: &str| {
        let le = format!("le=\"{le}\"");
        text.lines()
            .filter(|l| l.starts_with("kappa_cloud_event_to_view_seconds_bucket{") && l.contains("pipeline=\"main\""))
            .find(|l| l.contains(&le))
            .and_then(|l| l.rsplit_once(' '))
            .map(|(_, v)| v.to_string())
    };
    assert_eq!(bucket("0.5").as_deref(), Some("0"), "nothing is fresher than it was when appended: {text}");
    assert_eq!(bucket("2.0").as_deref(), Some("10"), "the ten 0.7 s old readings: {text}");
    assert_eq!(bucket("+Inf").as_deref(), Some("20"), "every reading once, the duplicate not: {text}");
}
