//! Archive and replay: a view version added to a running system is rebuilt
//! from the archive and the log tail, runs beside the old one, compares,
//! promotes and rolls back; crashes and damaged segments are survived or
//! reported precisely.

use std::time::Duration;

use kappa_cloud::admin;

use kappa_tests::harness::*;

/// Settings that make segments small and frequent, plus `views`.
fn config(views: &str, archive: &str) -> String {
    format!(
        "[processor]\ncheckpoint_interval = \"200ms\"\nmax_out_of_orderness = \"2m\"\n\
         [api]\ndevices_view = \"device_metrics\"\nwindows_view = \"device_metrics\"\n\
         [archive]\nsegment_age = \"300ms\"\nsegment_bytes = 65536\n{archive}\n{views}"
    )
}

pub(crate) fn metrics_view(version: u32, window: &str) -> String {
    format!(
        r#"
[[views]]
name = "device_metrics"
version = {version}
window = {{ kind = "tumbling", size = "{window}" }}
allowed_lateness = "1m"
aggregates = [
  {{ name = "event_count", fn = "count" }},
  {{ name = "avg_temp", fn = "avg", of = "temperature" }},
  {{ name = "stddev_temp", fn = "stddev", of = "temperature" }},
  {{ name = "users", fn = "approx_distinct", of = "tags.user" }},
  {{ name = "types", fn = "set", of = "tags.type" }},
]
"#
    )
}

/// Waits until every view version is live and has processed the whole log.
async fn until_all_live(cloud: &Cloud, versions: usize) {
    let cfg = cloud.config();
    wait_for("every view version live and caught up", Duration::from_secs(180), || {
        let cfg = cfg.clone();
        async move {
            let views = admin::list(&cfg).ok()?;
            (views.len() == versions && views.iter().all(|v| v.info.state == "live" && v.lag == 0)).then_some(())
        }
    })
    .await;
}

/// Waits until the archive holds the whole log, in at least `segments` segments in some partition.
pub(crate) async fn wait_archived(cloud: &Cloud, segments: usize) {
    let cfg = cloud.config();
    wait_for("the archive to reach the log's end", Duration::from_secs(60), || {
        let cfg = cfg.clone();
        async move {
            let status = admin::archive_status(&cfg).ok()?;
            (status.iter().all(|p| p.lag == 0) && status.iter().any(|p| p.segments >= segments)).then_some(())
        }
    })
    .await;
}

/// A new version added while data flows is built from the archive and the
/// log tail and ends equal to the live version, row for row and byte for
/// byte; a second replay too. The batch audit agrees with all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_version_equals_the_live_one_and_a_second_replay_too() {
    let dir = tempfile::tempdir().unwrap();
    let batches = scenario(true);
    let (first, second) = batches.split_at(batches.len() / 2);
    let v1 = metrics_view(1, "5m");
    let mut cloud = Cloud::start_with(dir.path(), "replay", &config(&v1, ""), &[]).await;
    ingest(&cloud, first).await;
    wait_archived(&cloud, 2).await;

    // Add two more versions with the same definition; restart; keep publishing.
    let three = format!("{v1}{}{}", metrics_view(2, "5m"), metrics_view(3, "5m"));
    cloud.reconfigure(&config(&three, ""));
    assert!(cloud.proc.terminate().await.success());
    cloud.restart().await;
    ingest(&cloud, second).await;
    until_all_live(&cloud, 3).await;

    let cfg = cloud.config();
    for v in [2, 3] {
        let c = admin::compare(&cfg, "device_metrics", 1, v, 5).unwrap();
        assert!(c.equal(), "v1 vs v{v}: {c:#?}");
        assert!(c.rows_a > 100);
    }
    let store = kappa_cloud::store::ViewStore::open_read_only(&cloud.data_dir().join("views.sqlite")).unwrap();
    let dumps: Vec<String> = (1..=3).map(|v| store.dump_rows(Some(&format!("device_metrics@{v}"))).unwrap()).collect();
    assert_eq!(dumps[0], dumps[1], "live and replay are byte-identical");
    assert_eq!(dumps[1], dumps[2], "two replays are byte-identical");
    let problems = admin::verify(&cfg, "device_metrics").unwrap();
    assert!(problems.is_empty(), "the batch audit differs: {problems:#?}");

    // The CLI: compare exits 0 when equal, watch reports a live version.
    let cmd = |args: &[&str]| {
        std::process::Command::new(bin())
            .args(["cloud"])
            .args(args)
            .args(["--config", cloud.config.to_str().unwrap()])
            .output()
            .unwrap()
    };
    assert_eq!(cmd(&["views", "compare", "device_metrics", "1", "2"]).status.code(), Some(0));
    let watch = cmd(&["views", "watch", "device_metrics@3"]);
    assert_eq!(watch.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&watch.stdout).contains("device_metrics@3 live"));
}

/// Different logic shows up in compare; promote and rollback switch what the
/// API serves while readers page through it, and no page mixes versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_logic_is_reported_and_readers_never_see_a_mix_across_promote_and_rollback() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = metrics_view(1, "5m");
    let mut cloud = Cloud::start_with(dir.path(), "promote", &config(&v1, ""), &[]).await;
    ingest(&cloud, &scenario(false)).await;
    cloud.reconfigure(&config(&format!("{v1}{}", metrics_view(2, "10m")), ""));
    assert!(cloud.proc.terminate().await.success());
    cloud.restart().await;
    until_all_live(&cloud, 2).await;

    let cfg = cloud.config();
    let c = admin::compare(&cfg, "device_metrics", 1, 2, 5).unwrap();
    assert!(!c.equal());
    // 2,000 s of data per device: 7 five-minute windows, 4 ten-minute ones.
    assert_eq!((c.rows_a, c.rows_b), (30 * 7, 30 * 4), "{c:#?}");
    assert_eq!(c.totals["event_count"].0, c.totals["event_count"].1, "the same readings, counted once either way");
    let out = std::process::Command::new(bin())
        .args(["cloud", "views", "compare", "device_metrics", "1", "2", "--config", cloud.config.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "compare exits 1 when the versions differ");

    // Readers page through the served version while it is promoted and rolled back.
    let url = format!("{}/v1/views/device_metrics/rows", cloud.url());
    let reader = tokio::spawn(async move {
        let client = reqwest::Client::new();
        let mut seen = std::collections::BTreeMap::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(4);
        while std::time::Instant::now() < deadline {
            let mut after: Option<String> = None;
            let mut version: Option<String> = None;
            for _ in 0..3 {
                let mut req = client.get(&url).query(&[("limit", "40")]);
                if let Some(a) = &after {
                    req = req.query(&[("after", a)]);
                }
                let page: kappa_cloud::api::RowsPage = req.send().await.unwrap().json().await.unwrap();
                let width = if page.view == "device_metrics@1" { 300_000 } else { 600_000 };
                for r in &page.rows {
                    assert_eq!(
                        r.window_end_ms.unwrap() - r.window_start_ms,
                        width,
                        "a {} page holds another version's row",
                        page.view
                    );
                }
                assert!(version.as_ref().is_none_or(|v| *v == page.view), "a page sequence switched versions");
                version = Some(page.view.clone());
                *seen.entry(page.view).or_insert(0) += 1;
                match page.next {
                    Some(n) => after = Some(n),
                    None => break,
                }
            }
        }
        seen
    });
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        admin::promote(&cfg, "device_metrics", 2).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(admin::rollback(&cfg, "device_metrics").unwrap(), 1);
    }
    let seen = reader.await.unwrap();
    assert!(seen.len() == 2, "readers saw both versions over time: {seen:?}");
    // Dropping is for retired versions only.
    assert!(admin::drop_version(&cfg, "device_metrics", 2).is_err());
}

/// The node (archiver and replay inside) is killed with SIGKILL again and
/// again while it archives and replays: the archive has no gap and no
/// duplicate, and the replayed version still equals the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_archiver_and_a_replay_midway_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let batches = scenario(true);
    let v1 = metrics_view(1, "5m");
    let mut cloud = Cloud::start_with(dir.path(), "crash", &config(&v1, ""), &[]).await;
    let mut sent = 0u64;
    for chunk in batches.chunks(20) {
        sent += ingest(&cloud, chunk).await;
        tokio::time::sleep(Duration::from_millis(150)).await;
        cloud.proc.kill9().await;
        cloud.restart().await;
    }
    cloud.reconfigure(&config(&format!("{v1}{}", metrics_view(2, "5m")), ""));
    cloud.proc.kill9().await;
    for delay in [300u64, 150, 450, 200, 350, 100] {
        cloud.restart().await;
        tokio::time::sleep(Duration::from_millis(delay)).await;
        cloud.proc.kill9().await;
    }
    cloud.restart().await;
    until_all_live(&cloud, 2).await;
    wait_archived(&cloud, 2).await;

    let cfg = cloud.config();
    let status = admin::archive_status(&cfg).unwrap();
    let archived: u64 = status.iter().map(|p| p.records).sum();
    assert_eq!(archived, sent, "every record archived exactly once");
    for p in &status {
        assert_eq!(
            p.records, p.log_end,
            "partition {}: the archive holds offsets 0..{} without a gap",
            p.partition, p.log_end
        );
    }
    assert!(admin::archive_verify(&cfg).unwrap().is_empty());
    let c = admin::compare(&cfg, "device_metrics", 1, 2, 5).unwrap();
    if !c.equal() {
        let store = kappa_cloud::store::ViewStore::open_read_only(&cloud.data_dir().join("views.sqlite")).unwrap();
        let late = store.dump_late().unwrap();
        let by_view: Vec<(String, usize)> = ["device_metrics@1", "device_metrics@2"]
            .iter()
            .map(|v| (v.to_string(), late.lines().filter(|l| l.starts_with(v)).count()))
            .collect();
        let dev11: Vec<&str> = late.lines().filter(|l| l.contains("dev-11")).take(5).collect();
        panic!(
            "{c:#?}\nlate per view: {by_view:?}\ndev-11 late: {dev11:#?}\npositions: {:?}\n{}",
            store.pipeline_positions().unwrap(),
            cloud.proc.tail()
        );
    }
}

/// A damaged segment: the replay stops and says which file and offsets; the
/// live version is untouched. With archive.skip_damaged it skips the damaged
/// block and counts exactly what it skipped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_segment_stops_replay_with_its_location_or_is_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = metrics_view(1, "5m");
    let mut cloud = Cloud::start_with(dir.path(), "damage", &config(&v1, ""), &[]).await;
    let sent = ingest(&cloud, &scenario(false)).await;
    wait_archived(&cloud, 2).await;
    assert!(cloud.proc.terminate().await.success());

    // Flip a byte in the middle of the largest segment.
    let archive = cloud.data_dir().join("archive");
    let mut segments: Vec<std::path::PathBuf> = std::fs::read_dir(archive.join("p0000"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort_by_key(|p| std::fs::metadata(p).unwrap().len());
    let victim = segments.last().unwrap().clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    std::fs::write(&victim, bytes).unwrap();
    let cfg = cloud.config();
    let damage = admin::archive_verify(&cfg).unwrap();
    assert_eq!(damage.len(), 2, "file checksum and the block: {damage:?}");

    cloud.reconfigure(&config(&format!("{v1}{}", metrics_view(2, "5m")), ""));
    cloud.restart().await;
    let cfg = cloud.config();
    let failed = wait_for("the replay to stop at the damage", Duration::from_secs(60), || {
        let cfg = cfg.clone();
        async move {
            admin::list(&cfg).ok()?.into_iter().find(|v| v.info.id == "device_metrics@2" && v.info.state == "failed")
        }
    })
    .await;
    let name = victim.file_name().unwrap().to_string_lossy().to_string();
    assert!(failed.info.detail.contains(&name) && failed.info.detail.contains("offsets"), "{}", failed.info.detail);
    let live = admin::list(&cfg).unwrap().into_iter().find(|v| v.info.id == "device_metrics@1").unwrap();
    assert_eq!(live.info.state, "live", "the live version is untouched");

    // Skip the damage: the replay resumes, skips the block, and counts it.
    assert!(cloud.proc.terminate().await.success());
    cloud.reconfigure(&config(&format!("{v1}{}", metrics_view(2, "5m")), "skip_damaged = true"));
    cloud.restart().await;
    until_all_live(&cloud, 2).await;
    let v2 = admin::list(&cfg).unwrap().into_iter().find(|v| v.info.id == "device_metrics@2").unwrap();
    let skipped: u64 = v2
        .info
        .detail
        .strip_prefix("skipped ")
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no skip count in {:?}", v2.info.detail));
    let c = admin::compare(&cfg, "device_metrics", 1, 2, 3).unwrap();
    let (all, replayed) = c.totals["event_count"];
    assert_eq!(all as u64, sent);
    assert_eq!(all as u64 - replayed as u64, skipped, "exactly the skipped records are missing from the replay");
    assert!(skipped > 0);
}

/// With short log retention the log forgets what the archive holds; a new
/// version is still built from the archive and equals the live one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_short_log_retention_the_archive_is_the_history_replay_rebuilds_from() {
    let dir = tempfile::tempdir().unwrap();
    let v1 = metrics_view(1, "5m");
    let retention = "[log]\nretention = \"1s\"\n";
    let mut cloud = Cloud::start_with(dir.path(), "retention", &format!("{retention}{}", config(&v1, "")), &[]).await;
    let sent = ingest(&cloud, &scenario(false)).await;
    wait_archived(&cloud, 2).await;
    let log_path = cloud.data_dir().join("eventlog.sqlite");
    let held = wait_for("retention to shrink the log", Duration::from_secs(60), || {
        let log_path = log_path.clone();
        async move {
            let held = kappa_cloud::eventlog::sqlite::SqliteLog::held_at(&log_path).ok()?;
            let total: u64 = held.values().map(|(n, _)| n).sum();
            (total < sent / 10).then_some(held)
        }
    })
    .await;
    assert!(held.values().all(|(n, _)| *n >= 1), "each partition keeps its newest record: {held:?}");

    cloud.reconfigure(&format!("{retention}{}", config(&format!("{v1}{}", metrics_view(2, "5m")), "")));
    assert!(cloud.proc.terminate().await.success());
    cloud.restart().await;
    until_all_live(&cloud, 2).await;
    let c = admin::compare(&cloud.config(), "device_metrics", 1, 2, 5).unwrap();
    assert!(c.equal(), "{c:#?}");
    assert_eq!(c.totals["event_count"].1 as u64, sent, "the replay saw every reading, from the archive");
}

/// `archive export` writes a time range as Hive-partitioned Parquet that
/// DuckDB reads directly (pruning by date), and as CSV and JSON lines.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_archive_exports_a_time_range_as_hive_partitioned_parquet_csv_and_json_lines() {
    let python_has_duckdb =
        std::process::Command::new("python3").args(["-c", "import duckdb"]).status().is_ok_and(|s| s.success());
    assert!(python_has_duckdb, "this test reads the export with DuckDB: pip install duckdb (.ci/run does)");
    let dir = tempfile::tempdir().unwrap();
    let mut cloud = Cloud::start_with(dir.path(), "export", &config(&metrics_view(1, "5m"), ""), &[]).await;
    // Three devices, one reading a minute from 23:30 to 00:29 across New Year: two dates.
    let start = T0 - 30 * 60_000;
    let readings: Vec<kappa_common::Reading> = (0..60u64)
        .flat_map(|i| {
            (0..3).map(move |d| kappa_common::Reading {
                device: format!("dev-{d}"),
                boot: 1,
                seq: i + 1,
                ts_ms: start + i as i64 * 60_000,
                schema: 2,
                metrics: [("temperature".to_string(), (i % 10 != 0).then_some(20.0 + i as f64 / 10.0))].into(),
                tags: [("user".to_string(), format!("u,{d}"))].into(),
            })
        })
        .collect();
    ingest(&cloud, &[kappa_common::batch::EdgeBatch::new("gw-x", 1, readings)]).await;
    wait_archived(&cloud, 1).await;
    assert!(cloud.proc.terminate().await.success());

    let export = |format: &str, from: &str, to: &str| {
        let out = dir.path().join(format!("out-{format}"));
        let o = std::process::Command::new(bin())
            .args(["cloud", "archive", "export", "--format", format, "--from", from, "--to", to, "--out"])
            .arg(&out)
            .args(["--config", cloud.config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        out
    };
    // 23:40 to 00:10: 30 minutes x 3 devices, 20 before midnight, 10 after, per device.
    let parquet = export("parquet", "2025-12-31T23:40:00Z", "2026-01-01T00:10:00Z");
    let mut days: Vec<String> =
        std::fs::read_dir(&parquet).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    days.sort();
    assert_eq!(days, ["date=2025-12-31", "date=2026-01-01"]);
    let sql = format!(
        "import duckdb; c = duckdb.sql(\"SELECT CAST(date AS VARCHAR), count(*), count(temperature), \
         strftime(min(ts), '%Y-%m-%d %H:%M:%S'), max(device), min(tags) \
         FROM read_parquet('{}/**/*.parquet', hive_partitioning = true) GROUP BY date ORDER BY date\"); print(c.fetchall())",
        parquet.display()
    );
    let out = std::process::Command::new("python3").args(["-c", &sql]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("('2025-12-31', 60, 54,"), "{text}");
    assert!(text.contains("('2026-01-01', 30, 27,"), "{text}");
    assert!(text.contains("2025-12-31 23:40:00"), "timestamps are real timestamps: {text}");
    assert!(text.contains(r#"{"user":"u,0"}"#), "{text}");

    let csv = export("csv", "2025-12-31T23:40:00Z", "2026-01-01T00:10:00Z");
    let lines = std::fs::read_to_string(csv.join("date=2026-01-01/part-00000.csv")).unwrap();
    assert_eq!(lines.lines().count(), 31, "a header and 30 rows");
    assert!(
        lines
            .lines()
            .next()
            .unwrap()
            .starts_with("ts,ts_ms,device,boot,seq,schema_version,gateway,batch_id,partition,offset,temperature")
    );
    let jsonl = export("jsonl", "2025-12-31T23:40:00Z", "2026-01-01T00:10:00Z");
    let first = std::fs::read_to_string(jsonl.join("date=2025-12-31/part-00000.jsonl")).unwrap();
    let row: serde_json::Value = serde_json::from_str(first.lines().next().unwrap()).unwrap();
    assert_eq!(row["ts"], "2025-12-31T23:40:00.000Z");
}

/// The archive in an S3-compatible store (moto's S3 server, a real process
/// speaking the S3 protocol) with short log retention: a new version is
/// rebuilt from the objects in the bucket.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_s3_archive_is_written_and_replayed_from() {
    let dir = tempfile::tempdir().unwrap();
    let mut moto = Moto::start(dir.path()).await;
    moto.create_bucket("kappa-archive").await;
    let env = moto.env();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    archive_remotely_and_replay(dir.path(), "s3", "url = \"s3://kappa-archive/site-a\"", &env).await;
    moto.proc.kill9().await;
}

/// The same with Azure Blob storage (Azurite, Microsoft's storage emulator).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_azure_blob_archive_is_written_and_replayed_from() {
    let bin = std::env::var("KAPPA_AZURITE_BIN").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../target/tools/node_modules/.bin/azurite-blob").to_string()
    });
    assert!(
        std::path::Path::new(&bin).exists(),
        "Azurite is needed at {bin}: npm install --prefix target/tools azurite@3 (.ci/run does)"
    );
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let args = [
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        &port.to_string(),
        "--inMemoryPersistence",
        "--skipApiVersionCheck",
        "--silent",
    ];
    let mut azurite = Proc::spawn_cmd("azurite", &bin, &args, dir.path());
    wait_for_port(port).await;
    create_azure_container(port, "kappa").await;
    let url = format!("http://127.0.0.1:{port}");
    let env = [("AZURE_STORAGE_USE_EMULATOR", "true"), ("AZURITE_BLOB_STORAGE_URL", url.as_str())];
    archive_remotely_and_replay(dir.path(), "azure", "url = \"az://kappa/site-a\"", &env).await;
    azurite.kill9().await;
}

async fn archive_remotely_and_replay(dir: &std::path::Path, name: &str, archive: &str, env: &[(&str, &str)]) {
    let v1 = metrics_view(1, "5m");
    let retention = "[log]\nretention = \"1s\"\n";
    let mut cloud = Cloud::start_with(dir, name, &format!("{retention}{}", config(&v1, archive)), env).await;
    let sent = ingest(&cloud, &scenario(false)).await;
    let metrics = format!("{}/metrics", cloud.url());
    wait_for("segments in the object store and the log trimmed", Duration::from_secs(90), || {
        let metrics = metrics.clone();
        async move {
            let segments = metric(&metrics, "kappa_cloud_archive_segments_total").await.unwrap_or(0.0);
            let deleted = metric(&metrics, "kappa_cloud_log_records_deleted_total").await.unwrap_or(0.0);
            (segments > 8.0 && deleted > sent as f64 / 2.0).then_some(())
        }
    })
    .await;
    cloud.reconfigure(&format!("{retention}{}", config(&format!("{v1}{}", metrics_view(2, "5m")), archive)));
    assert!(cloud.proc.terminate().await.success());
    cloud.restart().await;
    until_all_live(&cloud, 2).await;
    let c = admin::compare(&cloud.config(), "device_metrics", 1, 2, 5).unwrap();
    assert!(c.equal(), "{c:#?}");
    assert_eq!(c.totals["event_count"].1 as u64, sent, "the replay saw every reading, from the object store");
    let verify = std::process::Command::new(bin())
        .args(["cloud", "archive", "verify", "--config", cloud.config.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    assert_eq!(verify.status.code(), Some(0), "{}", String::from_utf8_lossy(&verify.stderr));
}

/// Creates a blob container in Azurite with a SharedKey-signed request
/// (the emulator, like Azure, refuses anonymous writes).
async fn create_azure_container(port: u16, container: &str) {
    use base64::Engine;
    use hmac::{KeyInit, Mac};
    const ACCOUNT: &str = "devstoreaccount1";
    // The emulator's well-known development key.
    const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
    let date = httpdate();
    let version = "2021-08-06";
    let to_sign = format!(
        "PUT\n\n\n\n\n\n\n\n\n\n\n\nx-ms-date:{date}\nx-ms-version:{version}\n/{ACCOUNT}/{ACCOUNT}/{container}\nrestype:container"
    );
    let key = base64::engine::general_purpose::STANDARD.decode(KEY).unwrap();
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&key).unwrap();
    mac.update(to_sign.as_bytes());
    let signature = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    let resp = reqwest::Client::new()
        .put(format!("http://127.0.0.1:{port}/{ACCOUNT}/{container}?restype=container"))
        .header("x-ms-date", &date)
        .header("x-ms-version", version)
        .header("content-length", "0")
        .header("authorization", format!("SharedKey {ACCOUNT}:{signature}"))
        .send()
        .await
        .unwrap();
    assert!(
        resp.status().is_success(),
        "create container: {} {}",
        resp.status(),
        resp.text().await.unwrap_or_default()
    );
}

/// The current time as an HTTP date (RFC 7231).
fn httdate_parts(now: i64) -> String {
    let days = now.div_euclid(86_400);
    let secs = now.rem_euclid(86_400);
    let weekday = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"][days.rem_euclid(7) as usize];
    let date = kappa_cloud::archive::export::civil_date(days);
    let (y, m, d) = (&date[0..4], &date[5..7], &date[8..10]);
    let month = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
        [m.parse::<usize>().unwrap() - 1];
    format!("{weekday}, {d} {month} {y} {:02}:{:02}:{:02} GMT", secs / 3600, secs / 60 % 60, secs % 60)
}

fn httpdate() -> String {
    httdate_parts(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64)
}
