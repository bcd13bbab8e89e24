//! Slow and silent HTTP clients cannot hold the cloud's connections: a
//! connection that sends no request, or only part of its headers, is closed
//! after `http.header_read_timeout`; a body that trickles in gets 408 after
//! `http.body_read_timeout` (counted), and the node keeps serving others.
//! Decompression bombs, oversized bodies and publishes, and deeply nested
//! payloads are refused at their limits with the processes' peak memory
//! measured and bounded.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use kappa_tests::harness::*;

/// Reads until the server closes the connection; what it sent, and when it closed.
async fn until_closed(mut s: TcpStream, limit: Duration) -> (String, Duration) {
    let t = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(limit, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept the connection open for {limit:?}"),
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), t.elapsed())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_silent_clients_are_cut_off_at_their_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("KAPPA_CLOUD__HTTP__HEADER_READ_TIMEOUT", "1s"), ("KAPPA_CLOUD__HTTP__BODY_READ_TIMEOUT", "1s")];
    let cloud = Cloud::start_with(dir.path(), "cloud", "", &env).await;
    let addr = ("127.0.0.1", cloud.port);

    // Silent: connects and sends nothing.
    let silent = TcpStream::connect(addr).await.unwrap();
    // Slow headers: half a request line and one header, then nothing.
    let mut slow = TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"POST /v1/ingest HTTP/1.1\r\nhost: x\r\n").await.unwrap();
    // Slow body: complete headers announcing 1,000 bytes, then 3.
    let mut trickle = TcpStream::connect(addr).await.unwrap();
    trickle
        .write_all(b"POST /v1/ingest HTTP/1.1\r\nhost: x\r\ncontent-encoding: zstd\r\ncontent-length: 1000\r\n\r\nabc")
        .await
        .unwrap();

    // A heartbeat whose body trickles in the same way.
    let mut heartbeat = TcpStream::connect(addr).await.unwrap();
    heartbeat
        .write_all(b"POST /v1/heartbeat HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n{")
        .await
        .unwrap();

    let limit = Duration::from_secs(8);
    let ((_, silent_after), (_, slow_after), (answer, trickle_after), (hb_answer, hb_after)) = tokio::join!(
        until_closed(silent, limit),
        until_closed(slow, limit),
        until_closed(trickle, limit),
        until_closed(heartbeat, limit)
    );
    for (what, after) in [
        ("silent", silent_after),
        ("slow headers", slow_after),
        ("slow body", trickle_after),
        ("slow heartbeat", hb_after),
    ] {
        assert!(after < Duration::from_secs(4), "{what}: closed after {after:?} (timeout 1 s)");
    }
    assert!(answer.starts_with("HTTP/1.1 408"), "a trickling body gets 408: {answer:?}");
    assert!(hb_answer.starts_with("HTTP/1.1 408"), "a trickling heartbeat gets 408: {hb_answer:?}");
    let url = format!("{}/metrics", cloud.url());
    let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
    assert!(text.contains("kappa_cloud_ingest_rejected_total{reason=\"body_timeout\"} 2"), "{text}");

    // Everyone else is served as before.
    assert_eq!(ingest(&cloud, &scenario(false)[..2]).await, 1000);
}

/// Issue 22: a heartbeat appends a record to every partition, so one
/// gateway's heartbeats are limited (`ingest.max_gateway_heartbeats_per_second`,
/// a bucket of 10 s of them) and their bodies are small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_flood_is_limited_per_gateway_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("KAPPA_CLOUD__INGEST__MAX_GATEWAY_HEARTBEATS_PER_SECOND", "1")];
    let cloud = Cloud::start_with(dir.path(), "cloud", "", &env).await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/heartbeat", cloud.url());
    let beat = |gateway: &str, ts_ms: i64| {
        let req = client.post(&url).json(&serde_json::json!({ "gateway": gateway, "ts_ms": ts_ms }));
        async move { req.send().await.expect("heartbeat").status().as_u16() }
    };
    let base = 1_800_000_000_000i64;
    let (mut passed, mut limited) = (0u32, 0u32);
    let started = Instant::now();
    for i in 0..60 {
        match beat("gw-flood", base + i).await {
            200 => passed += 1,
            429 => limited += 1,
            other => panic!("heartbeat {i}: {other}"),
        }
    }
    // The bucket holds 10; it refills 1 a second of however long the flood took.
    let allowed = 10 + started.elapsed().as_secs() as u32 + 1;
    assert!(
        passed <= allowed && limited >= 60 - allowed,
        "{passed} passed, {limited} limited, at most {allowed} may pass"
    );
    assert!(limited > 0, "the flood was not limited at all");
    assert_eq!(beat("gw-calm", base).await, 200, "another gateway is not limited by the flood");
    let big = client
        .post(&url)
        .header("content-type", "application/json")
        .body(format!("{{\"gateway\": \"gw-calm\", \"ts_ms\": {base}, \"pad\": \"{}\"}}", "x".repeat(8192)))
        .send()
        .await
        .expect("a large heartbeat")
        .status()
        .as_u16();
    assert_eq!(big, 413, "a heartbeat is a few bytes");
    let rejected = |reason: &str| format!("kappa_cloud_ingest_rejected_total{{reason=\"{reason}\"}}");
    assert_eq!(series(&cloud.url(), &rejected("heartbeat_rate_limited")).await, f64::from(limited));
    assert_eq!(series(&cloud.url(), &rejected("body_too_large")).await, 1.0);
    assert_eq!(series(&cloud.url(), "kappa_cloud_heartbeats_total").await, f64::from(passed + 1));
}

/// Posts `body` as a zstd batch; the status, or 0 when the server closed
/// the connection before answering (it may, while a refused body still flows).
async fn post_zstd(url: &str, body: Vec<u8>) -> u16 {
    let resp = reqwest::Client::new()
        .post(format!("{url}/v1/ingest"))
        .header("content-encoding", "zstd")
        .body(body)
        .send()
        .await;
    resp.map_or(0, |r| r.status().as_u16())
}

/// A zstd frame of 256 MiB of zeros (about 8 KiB), made once.
fn bomb() -> &'static [u8] {
    static BOMB: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    // calloc'd zeros: the test itself barely touches the memory.
    BOMB.get_or_init(|| kappa_common::frame::compress(&vec![0u8; 256 << 20], 1))
}

/// `copies` 256 MiB zstd bombs and as many 64 MiB bodies at once: their
/// statuses and how far the node's peak memory rose (MiB).
async fn hostile_bodies(cloud: &Cloud, copies: usize) -> (Vec<u16>, f64) {
    let bomb = bomb().to_vec();
    // The size limit is on the bytes received, whatever they are.
    let oversized = vec![7u8; 64 << 20];
    let before = cloud.proc.peak_rss_mib();
    let url = cloud.url();
    let mut sends = tokio::task::JoinSet::new();
    for body in [&bomb, &oversized].repeat(copies) {
        let (url, body) = (url.clone(), body.clone());
        sends.spawn(async move { post_zstd(&url, body).await });
    }
    let statuses = sends.join_all().await;
    (statuses, cloud.proc.peak_rss_mib() - before)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bombs_and_oversized_bodies_are_refused_with_the_nodes_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = Cloud::start_with(dir.path(), "cloud", "", &[]).await;
    assert_eq!(ingest(&cloud, &scenario(false)[..2]).await, 1000, "warm up with good batches");
    let (statuses, grew) = hostile_bodies(&cloud, 4).await;
    eprintln!("limits on: statuses {statuses:?}, peak memory rose {grew:.1} MiB");
    assert!(statuses.iter().all(|s| *s == 413 || *s == 0), "{statuses:?}");
    let url = cloud.url();
    assert_eq!(series(&url, "kappa_cloud_ingest_rejected_total{reason=\"decompression_bomb\"}").await, 4.0);
    assert_eq!(series(&url, "kappa_cloud_ingest_rejected_total{reason=\"body_too_large\"}").await, 4.0);
    // 1 GiB of bombs and 256 MiB of bodies; the limits (4 MiB compressed,
    // 32 MiB and 100:1 decompressed) allow a few tens of MiB.
    assert!(grew < 96.0, "the node's peak memory rose {grew:.1} MiB");
    assert_eq!(ingest(&cloud, &scenario(false)[2..4]).await, 1000, "and it still serves");

    // Negative control: with the limits lifted, the same measurement sees
    // a bomb go off.
    let lifted = [
        ("KAPPA_CLOUD__INGEST__MAX_BODY_BYTES", "1073741824"),
        ("KAPPA_CLOUD__INGEST__MAX_DECOMPRESSED_BYTES", "1073741824"),
        ("KAPPA_CLOUD__INGEST__MAX_RATIO", "1000000000"),
    ];
    let open = Cloud::start_with(dir.path(), "open", "", &lifted).await;
    let (statuses, grew) = hostile_bodies(&open, 1).await;
    eprintln!("limits lifted: statuses {statuses:?}, peak memory rose {grew:.1} MiB");
    assert!(grew > 200.0, "without limits a bomb should cost its 256 MiB; the measurement saw {grew:.1} MiB");
}

/// An MQTT session on the agent's own listener, as device `id`.
async fn device_session(port: u16, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.expect("connect to the agent's listener");
    s.write_all(&connect_packet(id, None)).await.unwrap();
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).await.expect("CONNACK");
    assert_eq!((connack[0], connack[3]), (0x20, 0), "the broker accepted {id}");
    s
}

/// A QoS 0 PUBLISH fixed and variable header for a payload of `len` bytes.
fn publish_header(topic: &str, len: usize) -> Vec<u8> {
    let mut remaining = 2 + topic.len() + len;
    let mut out = vec![0x30];
    loop {
        let byte = (remaining % 128) as u8;
        remaining /= 128;
        out.push(if remaining > 0 { byte | 0x80 } else { byte });
        if remaining == 0 {
            break;
        }
    }
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out
}

/// Four devices each stream one 64 MiB publish at the agent; it ends each
/// session at the limit. Returns the MiB the agent's peak memory rose.
async fn oversized_publishes(edge: &Edge) -> f64 {
    let before = edge.proc.peak_rss_mib();
    let len = 64 << 20;
    let chunk = vec![b'x'; 1 << 20];
    for d in 0..4 {
        let id = format!("huge-{d}");
        let mut s = device_session(edge.mqtt_port, &id).await;
        let mut sent = 0usize;
        let stream = async {
            s.write_all(&publish_header(&format!("devices/{id}/telemetry"), len)).await?;
            while sent < len {
                s.write_all(&chunk).await?;
                sent += chunk.len();
            }
            s.flush().await
        };
        // Cut off: the write fails. Accepted: it completes (and the broker
        // holds the packet, which the memory measurement sees).
        let _ = tokio::time::timeout(Duration::from_secs(30), stream).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    edge.proc.peak_rss_mib() - before
}

/// Devices publish oversized packets (64 MiB, streamed) and deeply nested
/// JSON (a quarter of a million levels, within the payload limit) at the
/// agent's own MQTT listener: the oversized sessions end at the limit, the
/// nested payloads are quarantined as `malformed_json` and counted, other
/// devices' readings still commit, and the agent's peak memory stays within
/// a few MiB. Negative control: with the payload limit lifted, the same
/// measurement sees the agent hold a 64 MiB publish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_deeply_nested_publishes_are_refused_with_the_agents_memory_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let no_cloud = "http://127.0.0.1:9";
    let limit = [("KAPPA_EDGE__MQTT__MAX_PAYLOAD_BYTES", "1048576")];
    let edge =
        Edge::start_env(dir.path(), "edge", "gw-limits", Mqtt::Embedded(free_port()), no_cloud, "", &limit).await;

    let depth = 250_000;
    let nest = format!("{}{}", "[".repeat(depth), "]".repeat(depth));
    let payload = format!(r#"{{"v":2,"boot":1,"seq":1,"ts":1767225600000,"data":{{"t":{nest}}}}}"#);
    let mut s = device_session(edge.mqtt_port, "nested").await;
    for _ in 0..4 {
        s.write_all(&publish_header("devices/nested/telemetry", payload.len())).await.unwrap();
        s.write_all(payload.as_bytes()).await.unwrap();
    }
    s.flush().await.unwrap();
    let url = format!("http://127.0.0.1:{}", edge.http_port);
    let malformed = "kappa_edge_readings_rejected_total{reason=\"malformed_json\"}";
    wait_for("four nested payloads quarantined", Duration::from_secs(30), || async {
        (series(&url, malformed).await >= 4.0).then_some(())
    })
    .await;

    let grew = oversized_publishes(&edge).await;
    eprintln!("limit 1 MiB: four 64 MiB publishes raised the agent's peak memory {grew:.1} MiB");
    assert!(grew < 24.0, "the agent's peak memory rose {grew:.1} MiB");
    assert_eq!(series(&url, malformed).await, 4.0, "exactly the four nested payloads");

    // A well-behaved device still gets its reading committed.
    let committed = edge.metric("kappa_edge_readings_committed_total").await.unwrap_or(0.0);
    let mut ok = device_session(edge.mqtt_port, "fine").await;
    let reading = br#"{"v":2,"boot":1,"seq":1,"ts":1767225600000,"data":{"t":21.5}}"#;
    ok.write_all(&publish_header("devices/fine/telemetry", reading.len())).await.unwrap();
    ok.write_all(reading).await.unwrap();
    wait_for("the good reading committed", Duration::from_secs(30), || async {
        (edge.metric("kappa_edge_readings_committed_total").await.unwrap_or(0.0) > committed).then_some(())
    })
    .await;

    // Negative control: the payload limit lifted to 64 MiB.
    let lifted = [("KAPPA_EDGE__MQTT__MAX_PAYLOAD_BYTES", "67108864")];
    let open = Edge::start_env(dir.path(), "open", "gw-open", Mqtt::Embedded(free_port()), no_cloud, "", &lifted).await;
    let grew = oversized_publishes(&open).await;
    eprintln!("limit lifted: four 64 MiB publishes raised the agent's peak memory {grew:.1} MiB");
    assert!(grew > 60.0, "without the limit a 64 MiB publish should cost its size; the measurement saw {grew:.1} MiB");
}
