//! One device connection: the CONNECT, then publishes in and replies out.
//!
//! A PUBLISH is decoded here and handed to the log writer with the reply it
//! earns (QoS 1: PUBACK, QoS 2: PUBREC, QoS 0: none). The writer queues the
//! reply on this connection's [`Replies`] only after the transaction holding
//! the message committed, and the session writes it then: a device is never
//! told a message is safe before it is. When the writer's queue is full, or
//! commits fail, handing over waits, this task stops reading, and TCP pushes
//! back on the device; nothing is dropped and nothing is acknowledged early.
//! The same happens per connection when a device has `receive_maximum`
//! messages waiting for their replies.
//!
//! Memory per connection is the task and two small buffers, released while
//! the connection is idle. A session ends when the device disconnects or
//! goes silent past 1.5 times its keep-alive, when another connection takes
//! its client id over, when the agent stops, or for a violation (a packet
//! over the size limit, a malformed packet, a publish outside its rights).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::close::{End, Refusal};
use super::codec::{self, CodecError, ConnAck, Connect, Inbound, Outbound, Publish, Version, Will, reason};
use super::listener::Listener;
use kappa_runtime::rate::{Bucket, Refused};

use super::link::Link;
use crate::ingest::{Ack, Incoming, Reply};
use crate::log::Entry;
use crate::now_ms;

/// Bytes asked of the socket per read (on the stack, see `poll_read_into`).
const READ_CHUNK: usize = 8192;

/// What is known of a connection before its CONNECT.
#[derive(Debug)]
pub(super) struct Hello {
    /// The subject common name of a TLS client certificate.
    pub cert_name: Option<String>,
    /// The TLS handshake and the CONNECT must both be done by then.
    pub deadline: Instant,
    pub peer: Option<SocketAddr>,
}

/// Serves one connection until its session ends. The CONNECT phase and the
/// end are boxed futures: they are large and short-lived, and inline they
/// would size every idle session's task (as would `hello` unboxed: an async
/// fn keeps its arguments for its whole life).
pub(super) async fn serve<L, S>(listener: L, mut stream: S, hello: Box<Hello>)
where
    L: std::ops::Deref<Target = Listener>,
    S: AsyncRead + AsyncWrite + Unpin,
{
    let l = &*listener;
    // Out of its box at once: moving out of a box frees it only where the
    // box goes out of scope, which for `hello` would be the session's end.
    let hello = {
        let boxed = hello;
        *boxed
    };
    let Some(mut session) = Box::pin(establish(l, &mut stream, hello)).await else { return };
    let ended = session.run(&mut stream).await;
    Box::pin(session.finish(&mut stream, ended)).await;
}

/// The CONNECT, the device's identity and the CONNACK: a session, or `None`
/// (refused, counted and logged).
async fn establish<'l, S: AsyncRead + AsyncWrite + Unpin>(
    l: &'l Listener,
    stream: &mut S,
    hello: Hello,
) -> Option<Session<'l>> {
    let Hello { cert_name, deadline, peer } = hello;
    let mut rbuf = BytesMut::new();
    let connected = tokio::select! {
        c = tokio::time::timeout_at(deadline, read_connect(stream, &mut rbuf, l)) => c,
        _ = l.stop.cancelled() => return None,
    };
    let mut connect = match connected {
        Ok(Ok(c)) => c,
        Ok(Err(why)) => {
            if why == Refusal::UnsupportedProtocol {
                // Answered in 3.1.1's format, which every version of the protocol can read.
                let _ = reply(stream, Version::V4, connack(why.code(), false, l, None)).await;
            }
            l.refused(why, "", peer);
            return None;
        }
        Err(_) => {
            l.refused(Refusal::Timeout, "", peer);
            return None;
        }
    };
    let version = connect.version;
    let (device, client_id, assigned) = match admit(l, &connect, cert_name.as_deref()).await {
        Ok(admitted) => admitted,
        Err(why) => {
            let _ = reply(stream, version, connack(why.code(), false, l, None)).await;
            l.refused(why, &connect.client_id, peer);
            return None;
        }
    };
    let keep_alive = (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let link = Arc::new(Link::new(keep_alive, l.clock_ms()));
    let opened = l.sessions.open(&client_id, connect.clean, link.clone(), std::time::Instant::now());
    // On a locked-down listener the device id is the client id (`admit`).
    debug_assert!(device.as_ref().is_none_or(|d| *d == client_id));
    let session = Session {
        l,
        version,
        locked: device.is_some(),
        client_id: client_id.into(),
        peer,
        connection: opened.connection,
        link,
        inflight: 0,
        rate: l.settings.device_rate.map(|(_, burst)| Box::new(Bucket::full(burst, std::time::Instant::now()))),
        will: connect.will.take().map(Box::new),
        will_requested: false,
        session_expiry: connect.session_expiry,
        rbuf,
        out: BytesMut::new(),
    };
    if reply(stream, version, connack(reason::SUCCESS, opened.session_present, l, assigned)).await.is_err() {
        l.sessions.close(&session.client_id, session.connection, session.session_expiry, std::time::Instant::now());
        return None;
    }
    tracing::debug!(client_id = %session.client_id, locked = session.locked, version = version.label(), peer = peer.map(tracing::field::display), "A device connected.");
    Some(session)
}

/// Reads the CONNECT, with whatever arrives behind it left in `buf`.
async fn read_connect<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    l: &Listener,
) -> Result<Connect, Refusal> {
    loop {
        match codec::read_connect(buf, l.settings.max_connect_packet) {
            Ok(Some(c)) => return Ok(c),
            Ok(None) => {}
            Err(CodecError::TooLarge(..)) => return Err(Refusal::PacketTooLarge),
            Err(CodecError::Protocol(..)) => return Err(Refusal::UnsupportedProtocol),
            Err(_) => return Err(Refusal::Protocol),
        }
        // Through the stack: a flood of connections that never send a
        // CONNECT holds no buffers.
        match std::future::poll_fn(|cx| poll_read_into(stream, buf, cx)).await {
            Ok(0) | Err(_) if buf.is_empty() => return Err(Refusal::Closed),
            Ok(0) | Err(_) => return Err(Refusal::Protocol),
            Ok(_) => {}
        }
    }
}

/// Who the device is (`None` on an open listener), its client id, and the
/// client id the listener chose for it if it sent none.
async fn admit(
    l: &Listener,
    c: &Connect,
    cert_name: Option<&str>,
) -> Result<(Option<String>, String, Option<String>), Refusal> {
    let device = match &l.access {
        None => None,
        Some(access) => {
            let id = access.identify(c, cert_name).await?;
            let own = format!("{}devices/{id}/telemetry", l.settings.topic_prefix);
            if c.will.as_ref().is_some_and(|w| w.topic != own) {
                return Err(Refusal::WillTopic);
            }
            Some(id)
        }
    };
    if !c.client_id.is_empty() {
        return Ok((device, c.client_id.clone(), None));
    }
    // MQTT lets a client without an id have one chosen, for a clean session only.
    if !c.clean && c.version == Version::V4 {
        return Err(Refusal::BadClientId);
    }
    let id = l.next_client_id();
    Ok((device, id.clone(), (c.version == Version::V5).then_some(id)))
}

fn connack(code: u8, session_present: bool, l: &Listener, assigned_client_id: Option<String>) -> Outbound {
    Outbound::ConnAck(ConnAck {
        session_present,
        code,
        receive_maximum: l.settings.receive_maximum,
        max_packet: u32::try_from(l.settings.max_packet).unwrap_or(u32::MAX),
        assigned_client_id,
    })
}

/// Writes one packet and flushes it (TLS buffers writes).
async fn reply<S: AsyncWrite + Unpin>(stream: &mut S, version: Version, packet: Outbound) -> std::io::Result<()> {
    let mut out = BytesMut::with_capacity(16);
    codec::write(version, &packet, &mut out);
    stream.write_all(&out).await?;
    stream.flush().await
}

/// The 5.0 reason code a quarantined payload is acknowledged with.
fn rejected_code(reason: &str) -> u8 {
    match reason {
        "rate_limited" => reason::QUOTA_EXCEEDED,
        "bad_topic" => reason::TOPIC_NAME_INVALID,
        _ => reason::PAYLOAD_FORMAT_INVALID,
    }
}

/// Reads what the device sent onto `rbuf` through a scratch buffer on the
/// stack, which lives only while this poll runs: a connection waiting for
/// data holds no buffer of its own.
fn poll_read_into<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<usize>> {
    let mut scratch = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
    let mut buf = tokio::io::ReadBuf::uninit(&mut scratch);
    std::task::ready!(std::pin::Pin::new(stream).poll_read(cx, &mut buf))?;
    rbuf.extend_from_slice(buf.filled());
    std::task::Poll::Ready(Ok(buf.filled().len()))
}

/// What [`Session::handle`] leaves to do.
enum Step {
    Next,
    End(End),
    /// The writer's queue is full: hand this over once there is room.
    Wait(Incoming),
}

/// An established session's state.
struct Session<'l> {
    l: &'l Listener,
    version: Version,
    /// A locked-down listener: the client id is the device id, and the
    /// device may publish only to its own topic.
    locked: bool,
    client_id: Box<str>,
    peer: Option<SocketAddr>,
    /// This connection's number in the session registry.
    connection: u64,
    /// Replies the writer hands over after their commits, and asks to close.
    link: Arc<Link>,
    /// QoS 1 and 2 publishes handed to the log and not yet replied to.
    inflight: usize,
    /// The connection's own rate limit (`mqtt.max_device_rate`); boxed:
    /// off by default, and inline it would size every session's task.
    rate: Option<Box<Bucket>>,
    /// Boxed: few devices have one.
    will: Option<Box<Will>>,
    /// 5.0: the device's DISCONNECT asked for its will.
    will_requested: bool,
    session_expiry: u32,
    /// Bytes read and not yet a whole packet.
    rbuf: BytesMut,
    /// Replies not yet written.
    out: BytesMut,
}

impl Session<'_> {
    /// Reads and acts on packets and writes the replies the writer hands
    /// over, until the session ends. The task waits on two things only: the
    /// socket and the link (replies, or a request to close from the registry,
    /// whose sweep enforces the keep-alive and the write timeout).
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(&mut self, stream: &mut S) -> End {
        let max_packet = self.l.settings.max_packet;
        // 3.1.1 clients are not told the limit: past it, reading waits for replies.
        // 5.0 clients are told, and one that goes past it is cut off (`publish`).
        let limit = match self.version {
            Version::V4 => usize::from(self.l.settings.receive_maximum),
            Version::V5 => usize::MAX,
        };
        let mut replies_waiting = false;
        let link = self.link.clone();
        // Lives across iterations: made again each time, it would take a
        // lock and register a waiter per packet.
        let mut woken = std::pin::pin!(link.notified());
        loop {
            // Act on every complete packet while the device has room in flight.
            while self.inflight < limit {
                match codec::read(self.version, &mut self.rbuf, max_packet) {
                    Ok(Some(packet)) => match self.handle(packet) {
                        Step::Next => {}
                        Step::End(end) => return end,
                        // Boxed: the wait is rare, and its future would size every session.
                        Step::Wait(incoming) => {
                            if let Some(end) = Box::pin(self.wait_to_log(incoming)).await {
                                return end;
                            }
                        }
                    },
                    Ok(None) => break,
                    Err(CodecError::TooLarge(..)) => return End::Violation(Refusal::PacketTooLarge),
                    Err(e) => {
                        tracing::debug!(client_id = %self.client_id, error = %e, "A device sent a malformed packet.");
                        return End::Violation(Refusal::Protocol);
                    }
                }
            }
            if self.rbuf.is_empty() && self.rbuf.capacity() > 0 {
                // Idle connections hold no read buffer.
                self.rbuf = BytesMut::new();
            }
            if !self.out.is_empty() {
                link.writing(Some(self.l.clock_ms()));
                let write = async {
                    stream.write_all(&self.out).await?;
                    stream.flush().await
                };
                let mut write = std::pin::pin!(write);
                loop {
                    tokio::select! {
                        written = &mut write => match written {
                            Ok(()) => break,
                            Err(_) => return End::Network,
                        },
                        _ = &mut woken => {
                            woken.set(link.notified());
                            if let Some(end) = link.closing() {
                                return end;
                            }
                            // Replies arrived meanwhile: take them after this write.
                            replies_waiting = true;
                        }
                    }
                }
                link.writing(None);
                // Idle connections hold no write buffer either.
                self.out = BytesMut::new();
            }
            if std::mem::take(&mut replies_waiting) {
                if let Some(end) = self.take_replies() {
                    return end;
                }
                continue;
            }
            let reading = self.inflight < limit;
            tokio::select! {
                biased;
                _ = &mut woken => {
                    woken.set(link.notified());
                    if let Some(end) = self.take_replies() {
                        return end;
                    }
                }
                read = std::future::poll_fn(|cx| poll_read_into(stream, &mut self.rbuf, cx)), if reading => match read {
                    Ok(0) | Err(_) => return End::Network,
                    Ok(_) => link.heard(self.l.clock_ms()),
                },
            }
        }
    }

    /// After the session: the 5.0 DISCONNECT that says why, the counters,
    /// the will if it is due, and the session's end in the registry.
    async fn finish<S: AsyncWrite + Unpin>(mut self, stream: &mut S, ended: End) {
        let l = self.l;
        if let (Some(code), Version::V5) = (ended.disconnect_code(), self.version) {
            let goodbye = reply(stream, self.version, Outbound::Disconnect { reason: code });
            let _ = tokio::time::timeout(Duration::from_secs(1), goodbye).await;
        }
        if let End::Violation(why) = ended {
            l.refused(why, &self.client_id, self.peer);
        }
        l.metrics.mqtt_sessions_ended.get_or_create(&[("reason", ended.reason())]).inc();
        let due = self.will_requested || (ended.publishes_will() && ended != End::Shutdown);
        if let Some(will) = self.will.take().filter(|_| due) {
            self.publish_will(will).await;
        }
        l.sessions.close(&self.client_id, self.connection, self.session_expiry, std::time::Instant::now());
        tracing::debug!(client_id = %self.client_id, reason = ended.reason(), "A device session ended.");
    }

    /// Takes the replies the writer handed over and queues them for the
    /// device; the reason to end the session instead, if one was asked.
    fn take_replies(&mut self) -> Option<End> {
        let (version, out) = (self.version, &mut self.out);
        let taken = self.link.take(|r| {
            let ack = Outbound::Ack { pkid: r.pkid, exactly_once: r.exactly_once, code: r.code };
            codec::write(version, &ack, out);
        });
        self.inflight -= taken.ok()?;
        // Replies are traffic too: a device waiting for them is not silent.
        self.link.heard(self.l.clock_ms());
        None
    }

    /// Acts on one packet. Not async: the session's task stays small; the
    /// rare wait for room in the writer's queue is the caller's.
    fn handle(&mut self, packet: Inbound) -> Step {
        match packet {
            Inbound::Publish(p) => return self.publish(p),
            Inbound::PubRel { pkid } => {
                // The PUBREC went out after the commit, so the message is in the log.
                codec::write(self.version, &Outbound::PubComp { pkid }, &mut self.out);
            }
            Inbound::PingReq => codec::write(self.version, &Outbound::PingResp, &mut self.out),
            Inbound::Subscribe { pkid, filters } => {
                self.l.denied("subscribe", &self.client_id, &filters.join(" "));
                codec::write(self.version, &Outbound::SubAckRefused { pkid, filters: filters.len() }, &mut self.out);
            }
            Inbound::Unsubscribe { pkid, filters } => {
                // Nothing was ever subscribed.
                codec::write(self.version, &Outbound::UnsubAck { pkid, filters }, &mut self.out);
            }
            Inbound::Disconnect { will, session_expiry } => {
                self.will_requested = will;
                if let Some(expiry) = session_expiry {
                    self.session_expiry = expiry;
                }
                return Step::End(End::Disconnect);
            }
            Inbound::Unexpected(kind) => {
                tracing::debug!(client_id = %self.client_id, kind, "A device sent a packet a publishing client never sends.");
                return Step::End(End::Violation(Refusal::Protocol));
            }
        }
        Step::Next
    }

    fn publish(&mut self, p: Publish) -> Step {
        let received = std::time::Instant::now();
        if p.dup {
            self.l.metrics.mqtt_republished.inc();
        }
        if p.qos != QoS::AtMostOnce
            && self.version == Version::V5
            && self.inflight >= usize::from(self.l.settings.receive_maximum)
        {
            return Step::End(End::Violation(Refusal::ReceiveMaximum));
        }
        if self.locked && !self.own_topic(&p.topic) {
            self.l.denied("publish_topic", &self.client_id, &p.topic);
            return Step::End(End::Violation(Refusal::PublishTopic));
        }
        let admitted = match (&mut self.rate, self.l.settings.device_rate) {
            (Some(bucket), Some((per_second, burst))) => bucket.admit(per_second, burst, 1.0, received),
            _ => Ok(()),
        };
        let entry = self.decode(&p.topic, p.payload, admitted);
        let ack = match p.qos {
            QoS::AtMostOnce => Ack::None,
            qos if self.l.settings.ack_on_receipt => {
                // Fault injection only: the reply no longer waits for the commit.
                let reply =
                    Outbound::Ack { pkid: p.pkid, exactly_once: qos == QoS::ExactlyOnce, code: reason::SUCCESS };
                codec::write(self.version, &reply, &mut self.out);
                Ack::None
            }
            qos => {
                let code = match &entry {
                    Entry::Rejected(r) => rejected_code(r.reason),
                    _ => reason::SUCCESS,
                };
                self.inflight += 1;
                Ack::Device(self.link.clone(), Reply { pkid: p.pkid, exactly_once: qos == QoS::ExactlyOnce, code })
            }
        };
        match self.l.to_log.try_send(Incoming { entry, ack, received }) {
            Ok(()) => Step::Next,
            Err(mpsc::error::TrySendError::Closed(_)) => Step::End(End::Shutdown),
            Err(mpsc::error::TrySendError::Full(incoming)) => Step::Wait(incoming),
        }
    }

    /// Whether `topic` is `{prefix}devices/{this device}/telemetry`.
    fn own_topic(&self, topic: &str) -> bool {
        topic
            .strip_prefix(self.l.settings.topic_prefix.as_str())
            .and_then(|t| t.strip_prefix("devices/"))
            .and_then(|t| t.strip_prefix(&*self.client_id))
            .is_some_and(|t| t == "/telemetry")
    }

    /// Decodes a payload; a quarantined one keeps a copy of its bytes, not
    /// the read buffer they arrived in.
    fn decode(&self, topic: &str, payload: Bytes, admitted: Result<(), Refused>) -> Entry {
        let mut entry = self.l.decoder.decode_admitted(topic, payload, now_ms(), admitted);
        if let Entry::Rejected(r) = &mut entry {
            r.payload = Bytes::copy_from_slice(&r.payload);
        }
        entry
    }

    /// Waits for room in the writer's queue (it was full), reading nothing
    /// from the device meanwhile: TCP pushes back on it.
    async fn wait_to_log(&self, incoming: Incoming) -> Option<End> {
        let mut send = std::pin::pin!(self.l.to_log.send(incoming));
        loop {
            // Made before the check, so a close asked in between still wakes it.
            let woken = self.link.notified();
            if let Some(end) = self.link.closing() {
                return Some(end);
            }
            tokio::select! {
                sent = &mut send => return sent.err().map(|_| End::Shutdown),
                _ = woken => {}
            }
        }
    }

    /// The device went away without saying goodbye: its will becomes a message.
    async fn publish_will(&mut self, will: Box<Will>) {
        let entry = self.decode(&will.topic, Bytes::copy_from_slice(&will.payload), Ok(()));
        let incoming = Incoming { entry, ack: Ack::None, received: std::time::Instant::now() };
        tokio::select! {
            _ = self.l.to_log.send(incoming) => {}
            _ = self.l.stop.cancelled() => {}
        }
    }
}
