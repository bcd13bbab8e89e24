//! The sections that measure the product's own path: the edge log's
//! commits, the processor (default views, 100k keys, emit latency), archive
//! and replay, bytes on the wire, and the binaries' footprint.

use super::*;

/// The edge log alone: group commits of 1,000 readings with full durability.
pub(super) fn edge_log_commit(dir: &Path, scale: f64) -> Value {
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

/// The processor over a pre-filled embedded log: decode, window, checkpoint.
pub(super) fn cloud_processor(dir: &Path, scale: f64) -> Value {
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

pub(super) fn example_views(names: &[&str]) -> Vec<kappa_cloud::views::spec::ViewSpec> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/cloud/single-node.toml");
    let cfg = kappa_cloud::config::CloudConfig::load(Path::new(path)).unwrap();
    cfg.view_specs().unwrap().into_iter().filter(|v| names.contains(&v.name.as_str())).collect()
}

pub(super) fn encoded(device: &str, user: &str, seq: u64, ts_ms: i64) -> Vec<u8> {
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
pub(super) fn processor_views(dir: &Path, scale: f64) -> Value {
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
pub(super) fn window_emit_latency(dir: &Path, scale: f64) -> Value {
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
pub(super) fn archive_and_replay(dir: &Path, scale: f64) -> Value {
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
    // Decoded as the processor decodes: into the buffers of the last record.
    let mut scratch =
        LogRecord { gateway: String::new(), batch_id: 0, ingest_ms: 0, event: LogEvent::Reading(Reading::default()) };
    loop {
        let recs = read.poll(10_000, Duration::ZERO).unwrap();
        if recs.is_empty() {
            break;
        }
        for r in &recs {
            record::decode_into(&r.value, &mut scratch).unwrap();
            got += usize::from(scratch.reading().unwrap().seq > 0);
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

/// Batches as the forwarder builds them (default 5,000 readings, zstd level
/// 3), POSTed by the agent's own HTTP client to a socket that counts every
/// byte it receives, request line and headers included.
pub(super) fn wire_bytes(scale: f64) -> Value {
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
pub(super) fn reading_batches(readings: &[Reading], format: u16) -> Vec<EdgeBatch> {
    readings
        .chunks(5000)
        .enumerate()
        .map(|(i, chunk)| EdgeBatch::new("gw-bench-01", i as u64 + 1, chunk.to_vec()).with_format(format))
        .collect()
}

/// POSTs `batches` with the agent's client to a server that counts every
/// byte: (wire bytes, body bytes, bytes before zstd).
pub(super) fn post_batches(all: Vec<EdgeBatch>) -> (usize, usize, usize) {
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

pub(super) fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Sizes of the product binaries built beside this one (as built, and
/// stripped of symbols when `strip` is on the PATH). The agent's RSS with
/// 10,000 devices is in `edge_ingest_mqtt`.
pub(super) fn footprint(dir: &Path, _scale: f64) -> Value {
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
