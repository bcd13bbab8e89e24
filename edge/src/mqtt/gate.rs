//! The device gate: TLS, device identity and per-device topic rights in
//! front of the embedded broker (docs/security.md, "Devices").
//!
//! rumqttd knows neither per-device passwords nor topic rights, so with
//! `[mqtt.tls]` or `[mqtt.access]` devices do not reach it directly. The
//! gate owns the device-facing listeners (plain `mqtt.listen` unless
//! `mqtt.plain = false`, TLS on `mqtt.tls.listen`) and, per connection:
//!
//! 1. finishes the TLS handshake within the connect timeout; a client
//!    certificate, when presented, must be signed by `client_ca_file`, and
//!    its subject common name is the device's identity;
//! 2. reads the CONNECT (MQTT 3.1.1) and decides who the device is: the
//!    certificate's name (the client id must be the same), or username =
//!    client id with a password from `access.password_file` (Mosquitto's
//!    `$7$` format, re-read when the file changes), or, only with
//!    `access.anonymous = true`, the client id. Refusals get the CONNACK
//!    return code that says why and are counted by reason;
//! 3. passes the session to rumqttd on a loopback port, logging in with a
//!    random per-start password rumqttd demands of every client, so the
//!    loopback port is no way around the gate;
//! 4. reads every packet the device sends: a PUBLISH anywhere but the
//!    device's own telemetry topic closes the connection (MQTT 3.1.1 has no
//!    server DISCONNECT; closing is how a 3.1.1 broker refuses), a SUBSCRIBE
//!    is answered with failure codes (devices have no read rights), a packet
//!    over the size limit closes the connection; each is logged and counted.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use super::embedded::InternalLogin;
use super::packet::{self, Connect, Frame, PacketError};
use crate::metrics::EdgeMetrics;

/// What the gate enforces.
#[derive(Debug, Clone)]
pub struct GateSettings {
    /// Plain-text listener, if any.
    pub plain: Option<SocketAddr>,
    /// TLS listener and its configuration, if any.
    pub tls: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
    /// Clients without certificate or login connect as their client id.
    pub anonymous: bool,
    /// Mosquitto-format password file: device id → `$7$` hash.
    pub password_file: Option<PathBuf>,
    /// Device ids refused whatever credential they present.
    pub revoked: HashSet<String>,
    /// Topic prefix before `devices/{id}/telemetry`.
    pub topic_prefix: String,
    /// Largest packet a device may send.
    pub max_packet: usize,
    pub max_connections: usize,
    /// TLS handshake and CONNECT must both arrive within this.
    pub connect_timeout: Duration,
}

/// A running gate's shared state.
#[derive(Debug)]
pub struct Gate {
    settings: GateSettings,
    broker: SocketAddr,
    login: InternalLogin,
    passwords: Mutex<Passwords>,
    metrics: Arc<EdgeMetrics>,
    open: AtomicUsize,
}

/// The password file as last read, and the modification time it had then.
#[derive(Debug, Default)]
struct Passwords {
    modified: Option<SystemTime>,
    logins: BTreeMap<String, String>,
}

/// The gate's bound listeners (bound before the agent reports ready).
pub struct Listeners {
    plain: Option<TcpListener>,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl std::fmt::Debug for Listeners {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = |l: &TcpListener| l.local_addr().ok();
        f.debug_struct("Listeners")
            .field("plain", &self.plain.as_ref().map(addr))
            .field("tls", &self.tls.as_ref().map(|(l, _)| addr(l)))
            .finish()
    }
}

/// Why a device was refused or cut off; the `reason` label of the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    Tls,
    Timeout,
    Protocol,
    PacketTooLarge,
    NoIdentity,
    ClientIdMismatch,
    BadClientId,
    UnknownDevice,
    BadPassword,
    Revoked,
    WillTopic,
    TooManyConnections,
    BrokerUnavailable,
}

impl Refusal {
    fn reason(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::PacketTooLarge => "packet_too_large",
            Self::NoIdentity => "no_identity",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::BadClientId => "bad_client_id",
            Self::UnknownDevice => "unknown_device",
            Self::BadPassword => "bad_password",
            Self::Revoked => "revoked",
            Self::WillTopic => "will_topic",
            Self::TooManyConnections => "too_many_connections",
            Self::BrokerUnavailable => "broker_unavailable",
        }
    }

    /// The CONNACK return code, for refusals decided at CONNECT.
    fn connack(self) -> Option<u8> {
        match self {
            Self::Protocol => Some(packet::UNACCEPTABLE_PROTOCOL),
            Self::ClientIdMismatch | Self::BadClientId => Some(packet::IDENTIFIER_REJECTED),
            Self::UnknownDevice | Self::BadPassword => Some(packet::BAD_LOGIN),
            Self::NoIdentity | Self::Revoked | Self::WillTopic => Some(packet::NOT_AUTHORIZED),
            Self::BrokerUnavailable => Some(3), // server unavailable
            Self::Tls | Self::Timeout | Self::PacketTooLarge | Self::TooManyConnections => None,
        }
    }
}

/// Binds the device-facing listeners.
pub async fn bind(settings: &GateSettings) -> Result<Listeners, String> {
    let plain = match settings.plain {
        Some(addr) => {
            Some(TcpListener::bind(addr).await.map_err(|e| format!("mqtt.listen {addr}: cannot listen: {e}"))?)
        }
        None => None,
    };
    let tls = match &settings.tls {
        Some((addr, config)) => {
            let l = TcpListener::bind(addr).await.map_err(|e| format!("mqtt.tls.listen {addr}: cannot listen: {e}"))?;
            Some((l, tokio_rustls::TlsAcceptor::from(config.clone())))
        }
        None => None,
    };
    Ok(Listeners { plain, tls })
}

impl Gate {
    /// A gate in front of rumqttd at `broker`, which demands `login`.
    pub fn new(
        settings: GateSettings,
        broker: SocketAddr,
        login: InternalLogin,
        metrics: Arc<EdgeMetrics>,
    ) -> Result<Arc<Self>, String> {
        let gate = Self { settings, broker, login, passwords: Mutex::default(), metrics, open: AtomicUsize::new(0) };
        if let Some(path) = &gate.settings.password_file {
            let logins =
                crate::mosquitto::read_password_file(path).map_err(|e| format!("mqtt.access.password_file {e}"))?;
            let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
            *gate.passwords.lock().unwrap_or_else(|p| p.into_inner()) = Passwords { modified, logins };
        }
        Ok(Arc::new(gate))
    }

    /// Accepts devices until `cancel` fires; open sessions end with it.
    pub async fn run(self: Arc<Self>, listeners: Listeners, cancel: CancellationToken) {
        let Listeners { plain, tls } = listeners;
        let mut tasks = tokio::task::JoinSet::new();
        if let Some(l) = plain {
            let (gate, cancel) = (self.clone(), cancel.clone());
            tasks.spawn(async move { gate.accept_loop(l, None, cancel).await });
        }
        if let Some((l, acceptor)) = tls {
            let (gate, cancel) = (self.clone(), cancel.clone());
            tasks.spawn(async move { gate.accept_loop(l, Some(acceptor), cancel).await });
        }
        while tasks.join_next().await.is_some() {}
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        cancel: CancellationToken,
    ) {
        while let Some(stream) = kappa_runtime::net::accept(&listener, &cancel).await {
            let peer = stream.peer_addr().ok();
            if self.open.fetch_add(1, Ordering::AcqRel) >= self.settings.max_connections {
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.refused(Refusal::TooManyConnections, "", peer);
                continue;
            }
            self.metrics.mqtt_gate_connections.inc();
            let (gate, tls, cancel) = (self.clone(), tls.clone(), cancel.clone());
            tokio::spawn(async move {
                gate.connection(stream, tls, peer, cancel).await;
                gate.open.fetch_sub(1, Ordering::AcqRel);
                gate.metrics.mqtt_gate_connections.dec();
            });
        }
    }

    async fn connection(
        &self,
        stream: TcpStream,
        tls: Option<tokio_rustls::TlsAcceptor>,
        peer: Option<SocketAddr>,
        cancel: CancellationToken,
    ) {
        let _ = stream.set_nodelay(true);
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        match tls {
            None => self.session(stream, None, deadline, peer, cancel).await,
            Some(acceptor) => match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
                Ok(Ok(stream)) => {
                    let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                    let name = match cert {
                        None => None,
                        Some(der) => match kappa_runtime::tls::common_name(&der) {
                            Some(name) => Some(name),
                            None => return self.refused(Refusal::NoIdentity, "", peer),
                        },
                    };
                    self.session(stream, name, deadline, peer, cancel).await
                }
                Ok(Err(e)) => {
                    tracing::debug!(?peer, error = %e, "A device's TLS handshake failed.");
                    self.refused(Refusal::Tls, "", peer)
                }
                Err(_) => self.refused(Refusal::Timeout, "", peer),
            },
        }
    }

    fn refused(&self, why: Refusal, device: &str, peer: Option<SocketAddr>) {
        self.metrics.mqtt_refused.get_or_create(&[("reason", why.reason())]).inc();
        tracing::warn!(reason = why.reason(), device, ?peer, "Refused a device connection.");
    }

    fn denied(&self, reason: &'static str, device: &str, topic: &str) {
        self.metrics.mqtt_denied.get_or_create(&[("reason", reason)]).inc();
        tracing::warn!(reason, device, topic, "Denied a device's request outside its rights.");
    }

    /// One device session: CONNECT, identity, then packets both ways.
    async fn session<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        device: S,
        cert_name: Option<String>,
        deadline: tokio::time::Instant,
        peer: Option<SocketAddr>,
        cancel: CancellationToken,
    ) {
        let (mut rx, mut tx) = tokio::io::split(device);
        let max = self.settings.max_packet;
        let mut buf = Vec::with_capacity(1024);
        // The CONNECT, within the deadline.
        let first = tokio::time::timeout_at(deadline, async {
            loop {
                match packet::frame(&buf, max) {
                    Ok(Some(f)) => return Ok(f),
                    Ok(None) => {}
                    Err(PacketError::TooLarge(..)) => return Err(Refusal::PacketTooLarge),
                    Err(_) => return Err(Refusal::Protocol),
                }
                match rx.read_buf(&mut buf).await {
                    Ok(0) | Err(_) => return Err(Refusal::Protocol),
                    Ok(_) => {}
                }
            }
        })
        .await;
        let frame = match first {
            Ok(Ok(f)) if f.kind == packet::CONNECT => f,
            Ok(Ok(_)) => return self.refused(Refusal::Protocol, "", peer),
            Ok(Err(why)) => return self.refused(why, "", peer),
            Err(_) => return self.refused(Refusal::Timeout, "", peer),
        };
        let connect = match Connect::parse(frame.body(&buf)) {
            Ok(c) => c,
            Err(_) => {
                let _ = tx.write_all(&packet::connack(packet::UNACCEPTABLE_PROTOCOL)).await;
                return self.refused(Refusal::Protocol, "", peer);
            }
        };
        let device = match self.identify(&connect, cert_name.as_deref()) {
            Ok(d) => d,
            Err(why) => {
                if let Some(code) = why.connack() {
                    let _ = tx.write_all(&packet::connack(code)).await;
                }
                return self.refused(why, &connect.client_id, peer);
            }
        };
        let mut broker = match TcpStream::connect(self.broker).await {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "The device gate cannot reach the embedded broker.");
                let _ = tx.write_all(&packet::connack(3)).await;
                return self.refused(Refusal::BrokerUnavailable, &device, peer);
            }
        };
        let _ = broker.set_nodelay(true);
        let login = connect.with_login(&self.login.username, self.login.password.as_bytes()).encode();
        if broker.write_all(&login).await.is_err() {
            return self.refused(Refusal::BrokerUnavailable, &device, peer);
        }
        buf.drain(..frame.len);
        tracing::debug!(device, ?peer, "A device connected through the gate.");
        let topic = format!("{}devices/{device}/telemetry", self.settings.topic_prefix);
        let (mut brx, mut btx) = broker.into_split();
        let mut from_broker = vec![0u8; 16 * 1024];
        loop {
            // Every complete packet from the device: pass on, answer or refuse.
            let mut out = Vec::new();
            loop {
                let f = match packet::frame(&buf, max) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(PacketError::TooLarge(..)) => return self.refused(Refusal::PacketTooLarge, &device, peer),
                    Err(_) => return self.refused(Refusal::Protocol, &device, peer),
                };
                match self.check(&f, &buf, &device, &topic) {
                    Verdict::Pass => out.extend_from_slice(&buf[..f.len]),
                    Verdict::Answer(reply) => {
                        if tx.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                    Verdict::Close => {
                        let _ = btx.write_all(&out).await;
                        return;
                    }
                }
                buf.drain(..f.len);
            }
            if !out.is_empty() && btx.write_all(&out).await.is_err() {
                return;
            }
            tokio::select! {
                _ = cancel.cancelled() => return,
                n = rx.read_buf(&mut buf) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                },
                n = brx.read(&mut from_broker) => match n {
                    Ok(0) | Err(_) => return,
                    Ok(n) => if tx.write_all(&from_broker[..n]).await.is_err() { return },
                },
            }
        }
    }

    /// Who the device is, or why it is refused.
    fn identify(&self, c: &Connect, cert_name: Option<&str>) -> Result<String, Refusal> {
        let id = match (cert_name, &c.username) {
            (Some(name), _) => {
                if c.client_id != name {
                    return Err(Refusal::ClientIdMismatch);
                }
                name.to_string()
            }
            (None, Some(user)) if self.settings.password_file.is_some() => {
                if c.client_id != *user {
                    return Err(Refusal::ClientIdMismatch);
                }
                let hash = self.password_hash(user).ok_or(Refusal::UnknownDevice)?;
                let password = c.password.as_deref().unwrap_or_default();
                if !crate::mosquitto::verify_password(&hash, password) {
                    return Err(Refusal::BadPassword);
                }
                user.clone()
            }
            (None, _) if self.settings.anonymous => c.client_id.clone(),
            (None, Some(_)) => return Err(Refusal::UnknownDevice),
            (None, None) => return Err(Refusal::NoIdentity),
        };
        if kappa_common::reading::validate_device_id(&id).is_err() {
            return Err(Refusal::BadClientId);
        }
        if self.settings.revoked.contains(&id) {
            return Err(Refusal::Revoked);
        }
        let own = format!("{}devices/{id}/telemetry", self.settings.topic_prefix);
        if c.will.as_ref().is_some_and(|(topic, _)| *topic != own) {
            return Err(Refusal::WillTopic);
        }
        Ok(id)
    }

    /// The device's hash from the password file, re-read if it changed.
    fn password_hash(&self, user: &str) -> Option<String> {
        let path = self.settings.password_file.as_ref()?;
        let mut p = self.passwords.lock().unwrap_or_else(|p| p.into_inner());
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified != p.modified {
            match crate::mosquitto::read_password_file(path) {
                Ok(logins) => {
                    tracing::info!(file = %path.display(), logins = logins.len(), "Re-read the device password file.");
                    *p = Passwords { modified, logins };
                }
                Err(e) => tracing::error!(error = %e, "Cannot re-read the device password file; keeping the last one."),
            }
        }
        p.logins.get(user).cloned()
    }

    fn check(&self, f: &Frame, buf: &[u8], device: &str, topic: &str) -> Verdict {
        let body = f.body(buf);
        match f.kind {
            packet::PUBLISH => match packet::publish_topic(body) {
                Ok(t) if t == topic => Verdict::Pass,
                Ok(t) => {
                    self.denied("publish_topic", device, t);
                    Verdict::Close
                }
                Err(_) => {
                    self.refused(Refusal::Protocol, device, None);
                    Verdict::Close
                }
            },
            packet::SUBSCRIBE | packet::UNSUBSCRIBE => match packet::filters(body, f.kind == packet::SUBSCRIBE) {
                Ok((id, filters)) if f.kind == packet::SUBSCRIBE => {
                    self.denied("subscribe", device, &filters.join(" "));
                    Verdict::Answer(packet::suback_refused(id, filters.len()))
                }
                // Nothing was ever subscribed: acknowledge without the broker.
                Ok((id, _)) => Verdict::Answer(packet::unsuback(id).to_vec()),
                Err(_) => {
                    self.refused(Refusal::Protocol, device, None);
                    Verdict::Close
                }
            },
            packet::CONNECT => {
                self.refused(Refusal::Protocol, device, None);
                Verdict::Close
            }
            _ => Verdict::Pass,
        }
    }
}

/// What to do with one packet from a device.
enum Verdict {
    /// Pass it to the broker.
    Pass,
    /// Answer the device with these bytes instead.
    Answer(Vec<u8>),
    /// End the session.
    Close,
}
