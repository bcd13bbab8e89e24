//! The embedded MQTT broker (rumqttd) and the in-process link that feeds the log.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use kappa_common::device;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::ingest::{Ack, Incoming, decode_message};
use crate::metrics::EdgeMetrics;

/// Payloads up to this many times the configured limit reach the agent (and
/// are quarantined with a reason); bigger ones make rumqttd drop the client.
const OVERSIZE_FACTOR: usize = 16;

/// A running embedded broker's link into the agent.
pub struct EmbeddedBroker {
    link_tx: LinkTx,
    link_rx: LinkRx,
}

impl std::fmt::Debug for EmbeddedBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedBroker").field("link", &self.link_rx.id()).finish()
    }
}

/// Starts rumqttd listening on `listen` and subscribes the agent's link to `filter`.
pub fn start(
    listen: SocketAddr,
    filter: &str,
    max_payload: usize,
    max_connections: usize,
) -> Result<EmbeddedBroker, String> {
    // rumqttd reports a bind failure only in its log; find out first, clearly.
    std::net::TcpListener::bind(listen).map_err(|e| format!("embedded MQTT broker cannot listen on {listen}: {e}"))?;
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload.saturating_mul(OVERSIZE_FACTOR),
        max_inflight_count: 100,
        auth: None,
        external_auth: None,
        dynamic_filters: true,
    };
    let server = ServerSettings { name: "devices".into(), listen, tls: None, next_connection_delay_ms: 0, connections };
    let config = Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 1000,
            // Each device topic keeps a small in-memory log; the agent's link
            // drains it within milliseconds.
            max_segment_size: 64 * 1024,
            max_segment_count: 4,
            ..RouterConfig::default()
        },
        v4: Some(HashMap::from([("devices".to_string(), server)])),
        ..Config::default()
    };
    let mut broker = Broker::new(config);
    let (mut link_tx, link_rx) = broker.link("kappa-edge-ingest").map_err(|e| format!("embedded broker link: {e}"))?;
    link_tx.subscribe(filter).map_err(|e| format!("embedded broker subscription: {e}"))?;
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "The embedded MQTT broker stopped.");
            }
        })
        .map_err(|e| format!("cannot start the embedded broker thread: {e}"))?;
    wait_until_listening(listen)?;
    tracing::info!(%listen, filter, "Embedded MQTT broker listening.");
    Ok(EmbeddedBroker { link_tx, link_rx })
}

/// rumqttd binds on its own thread; the agent is ready only once a device
/// can connect. The probe is a real MQTT 3.1.1 session: CONNECT, CONNACK,
/// DISCONNECT.
fn wait_until_listening(listen: SocketAddr) -> Result<(), String> {
    let target = if listen.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match probe(target) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(format!("embedded MQTT broker is not accepting connections on {listen}: {e}"));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

fn probe(target: SocketAddr) -> std::io::Result<()> {
    use std::io::{Read, Write};
    const CLIENT_ID: &[u8] = b"kappa-edge-readiness";
    let timeout = std::time::Duration::from_millis(500);
    let mut s = std::net::TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    // CONNECT: protocol "MQTT" level 4, clean session, keep-alive 10 s.
    let mut connect = vec![0x10, (12 + CLIENT_ID.len()) as u8, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 10, 0];
    connect.push(CLIENT_ID.len() as u8);
    connect.extend_from_slice(CLIENT_ID);
    s.write_all(&connect)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other(format!("unexpected CONNACK {connack:?}")));
    }
    s.write_all(&[0xE0, 0])
}

/// Feeds broker messages to the writer until `cancel` fires.
pub async fn run(
    broker: EmbeddedBroker,
    tx: mpsc::Sender<Incoming>,
    prefix: String,
    limits: device::Limits,
    metrics: Arc<EdgeMetrics>,
    cancel: CancellationToken,
) {
    let EmbeddedBroker { link_tx: _link_tx, mut link_rx } = broker;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            n = link_rx.next() => n,
        };
        match next {
            Ok(Some(Notification::Forward(f))) => {
                let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                let entry = decode_message(&topic, f.publish.payload, &prefix, &limits, &metrics);
                tokio::select! {
                    sent = tx.send(Incoming { entry, ack: Ack::None }) => if sent.is_err() { break },
                    _ = cancel.cancelled() => break,
                }
            }
            Ok(Some(Notification::Unschedule)) => {
                if let Err(e) = link_rx.wake().await {
                    tracing::error!(error = %e, "Embedded broker link failed.");
                    break;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::error!(error = %e, "Embedded broker link failed.");
                break;
            }
        }
    }
}
