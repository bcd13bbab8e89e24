//! The agent's own MQTT listener under abuse: 100,000 connection attempts,
//! slow-loris CONNECTs past the connection limit, malformed and oversized
//! packets. Each is refused and counted by reason, the agent's memory stays
//! bounded, and a well-behaved device still gets its PUBACK afterwards.
//! Negative control: with the CONNECT timeout stretched beyond the test,
//! the slow clients are never cut off and the timeout counter stays at 0.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use kappa_tests::harness::*;

/// How many slow-loris connections; the listener allows `LIMIT`.
const SLOW: usize = 600;
const LIMIT: usize = 500;

/// An agent with a small connection limit and a 2 s CONNECT timeout (or `connect_timeout`).
async fn agent(dir: &std::path::Path, name: &str, connect_timeout: &str) -> Edge {
    let env = [
        ("KAPPA_EDGE__MQTT__MAX_CONNECTIONS", LIMIT.to_string()),
        ("KAPPA_EDGE__MQTT__CONNECT_TIMEOUT", connect_timeout.to_string()),
    ];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Edge::start_env(dir, name, "gw-abuse", Mqtt::Embedded(free_port()), "http://127.0.0.1:9", "", &env).await
}

/// Opens `n` connections that send half a CONNECT and then nothing; they
/// stay open on the client side until dropped.
async fn slow_loris(port: u16, n: usize) -> Vec<TcpStream> {
    let half = connect_packet("slow", None);
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)).await {
            let _ = s.write_all(&half[..half.len() / 2]).await;
            held.push(s);
        }
    }
    held
}

/// Whether the agent closed the connection (read returns EOF or an error) within `within`.
async fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(tokio::time::timeout(within, s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

/// A device that connects properly and publishes one QoS 1 reading: whether its PUBACK came.
async fn a_good_device_is_served(port: u16) -> bool {
    let (client, code, mut rx) = crate::mqtt_auth::session(port, "good-device", None).await;
    assert_eq!(code, rumqttc::ConnectReturnCode::Success);
    let payload = crate::mqtt_auth::reading("good-device", 1);
    client.publish("devices/good-device/telemetry", rumqttc::QoS::AtLeastOnce, false, payload).await.unwrap();
    tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match rx.recv().await {
                Some(rumqttc::Packet::PubAck(_)) => return true,
                Some(_) => {}
                None => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floods_slow_clients_and_bad_packets_are_refused_counted_and_the_agents_memory_stays_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let edge = agent(dir.path(), "edge", "2s").await;
    let (port, metrics) = (edge.mqtt_port, format!("http://127.0.0.1:{}", edge.http_port));
    let refused = |reason: &str| format!("kappa_edge_mqtt_connections_refused_total{{reason=\"{reason}\"}}");
    let peak_before = edge.proc.peak_rss_mib();

    // The readiness probe that found the port open counts already.
    let base = series(&metrics, &refused("closed_before_connect")).await;
    // 100,000 connection attempts, 50 at a time, each closed at once.
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..50 {
        tasks.spawn(async move {
            let mut made = 0u32;
            for _ in 0..2_000 {
                if TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
                    made += 1;
                }
            }
            made
        });
    }
    let started = std::time::Instant::now();
    let mut attempts = 0;
    while let Some(made) = tasks.join_next().await {
        attempts += made.unwrap();
    }
    eprintln!("100,000 connection attempts took {:?}", started.elapsed());
    assert_eq!(attempts, 100_000, "every connection attempt was accepted by the kernel");
    // Each is counted: closed before its CONNECT, or (while the agent was
    // behind the attempts) over the connection limit.
    let counted = || async {
        series(&metrics, &refused("closed_before_connect")).await
            + series(&metrics, &refused("too_many_connections")).await
    };
    wait_for("every attempt counted", Duration::from_secs(120), || async {
        (counted().await >= base + 100_000.0).then_some(())
    })
    .await;
    assert_eq!(counted().await, base + 100_000.0);
    wait_for("every attempt's connection closed", Duration::from_secs(30), || async {
        (edge.metric("kappa_edge_mqtt_connections").await == Some(0.0)).then_some(())
    })
    .await;

    // Slow loris past the limit: the first LIMIT wait for their CONNECT
    // timeout, the rest are refused on arrival.
    let over_before = series(&metrics, &refused("too_many_connections")).await;
    let mut slow = slow_loris(port, SLOW).await;
    wait_for("the connections over the limit refused", Duration::from_secs(30), || async {
        (series(&metrics, &refused("too_many_connections")).await - over_before >= (SLOW - LIMIT) as f64).then_some(())
    })
    .await;
    let mut cut = 0;
    for s in &mut slow {
        if closed_within(s, Duration::from_secs(30)).await {
            cut += 1;
        }
    }
    assert_eq!(cut, SLOW, "every slow connection was closed: over the limit at once, the rest at the CONNECT timeout");
    assert_eq!(series(&metrics, &refused("timeout")).await, LIMIT as f64);
    drop(slow);

    // Malformed packets (a CONNECT that is not MQTT) and an oversized one
    // after a good CONNECT (its fixed header announces 200 MiB).
    for i in 0..200 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n").await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(10)).await, "garbage {i} was not cut off");
    }
    for i in 0..200 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        s.write_all(&connect_packet(&format!("big-{i}"), None)).await.unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).await.unwrap();
        s.write_all(&[0x30, 0x80, 0x80, 0x80, 0x64]).await.unwrap();
        assert!(closed_within(&mut s, Duration::from_secs(10)).await, "oversized publish {i} was not cut off");
    }
    wait_for("the bad packets counted", Duration::from_secs(30), || async {
        let protocol = series(&metrics, &refused("protocol")).await;
        let large = series(&metrics, &refused("packet_too_large")).await;
        (protocol >= 200.0 && large >= 200.0).then_some(())
    })
    .await;
    assert_eq!(series(&metrics, &refused("protocol")).await, 200.0);
    assert_eq!(series(&metrics, &refused("packet_too_large")).await, 200.0);

    assert!(a_good_device_is_served(port).await, "after all that, a good device's reading was acknowledged");
    let grew = edge.proc.peak_rss_mib() - peak_before;
    eprintln!("100,000 attempts, {SLOW} slow clients, 400 bad packets: the agent's peak memory rose {grew:.1} MiB");
    assert!(grew < 16.0, "the agent's peak memory rose {grew:.1} MiB");
}

/// Negative control: a CONNECT timeout longer than the test leaves the slow
/// clients connected, and the check above would see it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn negative_control_without_a_connect_timeout_slow_clients_hold_their_connections() {
    let dir = tempfile::tempdir().unwrap();
    let edge = agent(dir.path(), "edge", "1h").await;
    let metrics = format!("http://127.0.0.1:{}", edge.http_port);
    let mut slow = slow_loris(edge.mqtt_port, 20).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let mut cut = 0;
    for s in &mut slow {
        if closed_within(s, Duration::from_millis(100)).await {
            cut += 1;
        }
    }
    assert_eq!(cut, 0, "with no timeout to speak of, no slow client is cut off");
    assert_eq!(series(&metrics, "kappa_edge_mqtt_connections_refused_total{reason=\"timeout\"}").await, 0.0);
}
