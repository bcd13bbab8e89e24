//! The embedded MQTT broker (rumqttd) and the in-process link that feeds the log.

use std::collections::HashMap;
use std::net::SocketAddr;

use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::{Broker, Config, ConnectionSettings, Notification, RouterConfig, ServerSettings};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::packet::Connect;
use crate::ingest::{Ack, Decoder, Incoming};
use crate::now_ms;

/// Payloads up to this many times the configured limit reach the agent (and
/// are quarantined with a reason); bigger ones make rumqttd drop the client.
pub(crate) const OVERSIZE_FACTOR: usize = 16;

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

/// The login every client of rumqttd must present when devices reach it
/// only through the device gate (`mqtt::gate`).
#[derive(Clone)]
pub struct InternalLogin {
    pub username: String,
    pub password: String,
}

impl InternalLogin {
    /// A login with a random password, new at every start.
    pub fn random() -> Result<Self, String> {
        let mut bytes = [0u8; 24];
        aws_lc_rs::rand::fill(&mut bytes).map_err(|_| "no randomness from the system".to_string())?;
        let password = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Ok(Self { username: "kappa-device-gate".into(), password })
    }
}

impl std::fmt::Debug for InternalLogin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalLogin").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Starts rumqttd listening on `listen` and subscribes the agent's link to
/// `filter`. With `login`, rumqttd refuses every client that does not
/// present it.
pub fn start(
    listen: SocketAddr,
    filter: &str,
    max_payload: usize,
    max_connections: usize,
    login: Option<&InternalLogin>,
) -> Result<EmbeddedBroker, String> {
    // rumqttd reports a bind failure only in its log; find out first, clearly.
    std::net::TcpListener::bind(listen).map_err(|e| format!("embedded MQTT broker cannot listen on {listen}: {e}"))?;
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: max_payload.saturating_mul(OVERSIZE_FACTOR),
        max_inflight_count: 100,
        auth: login.map(|l| HashMap::from([(l.username.clone(), l.password.clone())])),
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
    wait_until_listening(listen, login)?;
    tracing::info!(%listen, filter, "Embedded MQTT broker listening.");
    Ok(EmbeddedBroker { link_tx, link_rx })
}

/// rumqttd binds on its own thread; the agent is ready only once a device
/// can connect. The probe is a real MQTT 3.1.1 session: CONNECT, CONNACK,
/// DISCONNECT.
fn wait_until_listening(listen: SocketAddr, login: Option<&InternalLogin>) -> Result<(), String> {
    let target = if listen.ip().is_unspecified() {
        SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), listen.port())
    } else {
        listen
    };
    let mut connect = Connect::new("kappa-edge-readiness", 10);
    if let Some(l) = login {
        connect = connect.with_login(&l.username, l.password.as_bytes());
    }
    let connect = connect.encode();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match probe(target, &connect) {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(format!("embedded MQTT broker is not accepting connections on {listen}: {e}"));
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

fn probe(target: SocketAddr, connect: &[u8]) -> std::io::Result<()> {
    use std::io::{Read, Write};
    let timeout = std::time::Duration::from_millis(500);
    let mut s = std::net::TcpStream::connect_timeout(&target, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(connect)?;
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack)?;
    if connack[0] != 0x20 || connack[3] != 0 {
        return Err(std::io::Error::other(format!("unexpected CONNACK {connack:?}")));
    }
    s.write_all(&[0xE0, 0])
}

/// Feeds broker messages to the writer until `cancel` fires.
pub async fn run(broker: EmbeddedBroker, tx: mpsc::Sender<Incoming>, decoder: Decoder, cancel: CancellationToken) {
    let EmbeddedBroker { link_tx: _link_tx, mut link_rx } = broker;
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => break,
            n = link_rx.next() => n,
        };
        match next {
            Ok(Some(Notification::Forward(f))) => {
                let received = std::time::Instant::now();
                let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                let entry = decoder.decode(&topic, f.publish.payload, now_ms());
                tokio::select! {
                    sent = tx.send(Incoming { entry, ack: Ack::None, received }) => if sent.is_err() { break },
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
