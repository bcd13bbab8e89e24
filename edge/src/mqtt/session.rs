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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::close::{End, Refusal};
use super::codec::{self, CodecError, ConnAck, Connect, Inbound, Outbound, Publish, Version, Will, reason};
use super::listener::Listener;
use crate::ingest::{Ack, Incoming, Replies, Reply};
use crate::log::Entry;
use crate::now_ms;

/// Bytes asked of the socket per read.
const READ_CHUNK: usize = 2048;

/// A device that takes no replies for this long is cut off.
const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// Serves one connection until its session ends.
pub(super) async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    l: &Listener,
    mut stream: S,
    cert_name: Option<String>,
    deadline: Instant,
    peer: Option<SocketAddr>,
) {
    let mut rbuf = BytesMut::new();
    let connect = match tokio::time::timeout_at(deadline, read_connect(&mut stream, &mut rbuf, l)).await {
        Ok(Ok(c)) => c,
        Ok(Err(why)) => {
            if why == Refusal::UnsupportedProtocol {
                // Answered in 3.1.1's format, which every version of the protocol can read.
                let _ = reply(&mut stream, Version::V4, connack(why.code(), false, l, None)).await;
            }
            return l.refused(why, "", peer);
        }
        Err(_) => return l.refused(Refusal::Timeout, "", peer),
    };
    let version = connect.version;
    let (device, client_id, assigned) = match admit(l, &connect, cert_name.as_deref()).await {
        Ok(admitted) => admitted,
        Err(why) => {
            let _ = reply(&mut stream, version, connack(why.code(), false, l, None)).await;
            return l.refused(why, &connect.client_id, peer);
        }
    };
    let end = l.stop.child_token();
    let opened = l.sessions.open(&client_id, connect.clean, end.clone(), std::time::Instant::now());
    if reply(&mut stream, version, connack(reason::SUCCESS, opened.session_present, l, assigned)).await.is_err() {
        l.sessions.close(&client_id, opened.connection, connect.session_expiry, std::time::Instant::now());
        return;
    }
    tracing::debug!(client_id, device, version = version.label(), ?peer, "A device connected.");
    let own_topic = device.as_ref().map(|d| format!("{}devices/{d}/telemetry", l.settings.topic_prefix));
    let mut session = Session {
        l,
        version,
        device: device.unwrap_or_default(),
        own_topic,
        replies: Arc::new(Replies::default()),
        end,
        inflight: 0,
        will_requested: false,
        session_expiry: connect.session_expiry,
        out: BytesMut::new(),
    };
    let keep_alive = (connect.keep_alive > 0).then(|| Duration::from_millis(u64::from(connect.keep_alive) * 1500));
    let ended = session.run(&mut stream, rbuf, keep_alive).await;

    if let (Some(code), Version::V5) = (ended.disconnect_code(), version) {
        let _ = tokio::time::timeout(
            Duration::from_secs(1),
            reply(&mut stream, version, Outbound::Disconnect { reason: code }),
        )
        .await;
    }
    if let End::Violation(why) = ended {
        l.refused(why, &session.device, peer);
    }
    l.metrics.mqtt_sessions_ended.get_or_create(&[("reason", ended.reason())]).inc();
    if let Some(will) =
        connect.will.filter(|_| session.will_requested || (ended.publishes_will() && ended != End::Shutdown))
    {
        session.publish_will(will).await;
    }
    l.sessions.close(&client_id, opened.connection, session.session_expiry, std::time::Instant::now());
    tracing::debug!(client_id, reason = ended.reason(), "A device session ended.");
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
        buf.reserve(READ_CHUNK);
        match stream.read_buf(buf).await {
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

/// An established session's state.
struct Session<'a> {
    l: &'a Listener,
    version: Version,
    /// The device id on a locked-down listener, else empty.
    device: String,
    /// The only topic the device may publish to (`None`: open listener).
    own_topic: Option<String>,
    replies: Arc<Replies>,
    /// Fires on takeover and on agent shutdown.
    end: CancellationToken,
    /// QoS 1 and 2 publishes handed to the log and not yet replied to.
    inflight: usize,
    /// 5.0: the device's DISCONNECT asked for its will.
    will_requested: bool,
    session_expiry: u32,
    /// Replies not yet written.
    out: BytesMut,
}

impl Session<'_> {
    async fn run<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        stream: &mut S,
        mut rbuf: BytesMut,
        keep_alive: Option<Duration>,
    ) -> End {
        let max_packet = self.l.settings.max_packet;
        // 3.1.1 clients are not told the limit: past it, reading waits for replies.
        // 5.0 clients are told, and one that goes past it is cut off (`publish`).
        let limit = match self.version {
            Version::V4 => usize::from(self.l.settings.receive_maximum),
            Version::V5 => usize::MAX,
        };
        let mut taken = Vec::new();
        let mut heard = Instant::now();
        let mut silence = Box::pin(tokio::time::sleep(keep_alive.unwrap_or(Duration::from_secs(86_400))));
        loop {
            // Act on every complete packet while the device has room in flight.
            while self.inflight < limit {
                match codec::read(self.version, &mut rbuf, max_packet) {
                    Ok(Some(packet)) => {
                        if let Some(end) = self.handle(packet).await {
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(CodecError::TooLarge(..)) => return End::Violation(Refusal::PacketTooLarge),
                    Err(e) => {
                        tracing::debug!(device = self.device, error = %e, "A device sent a malformed packet.");
                        return End::Violation(Refusal::Protocol);
                    }
                }
            }
            if rbuf.is_empty() && rbuf.capacity() > 0 {
                // Idle connections hold no read buffer.
                rbuf = BytesMut::new();
            }
            if !self.out.is_empty() {
                let write = async {
                    stream.write_all(&self.out).await?;
                    stream.flush().await
                };
                match tokio::time::timeout(WRITE_TIMEOUT, write).await {
                    Ok(Ok(())) => {}
                    Ok(Err(_)) => return End::Network,
                    Err(_) => return End::WriteTimeout,
                }
                self.out.clear();
                if self.out.capacity() > 1024 {
                    self.out = BytesMut::new();
                }
            }
            let reading = self.inflight < limit;
            tokio::select! {
                biased;
                _ = self.end.cancelled() => {
                    return if self.l.stop.is_cancelled() { End::Shutdown } else { End::TakenOver };
                }
                _ = self.replies.wait() => {
                    self.replies.take(&mut taken);
                    self.inflight -= taken.len();
                    for r in taken.drain(..) {
                        codec::write(self.version, &Outbound::Ack { pkid: r.pkid, exactly_once: r.exactly_once, code: r.code }, &mut self.out);
                    }
                    // Replies are traffic too: a device waiting for them is not silent.
                    heard = Instant::now();
                }
                read = async {
                    rbuf.reserve(READ_CHUNK);
                    stream.read_buf(&mut rbuf).await
                }, if reading => match read {
                    Ok(0) | Err(_) => return End::Network,
                    Ok(_) => heard = Instant::now(),
                },
                _ = &mut silence, if keep_alive.is_some() && reading => {
                    let Some(keep_alive) = keep_alive else { continue };
                    if heard.elapsed() >= keep_alive {
                        return End::KeepAlive;
                    }
                    silence.as_mut().reset(heard + keep_alive);
                }
            }
        }
    }

    /// Acts on one packet; `Some` ends the session.
    async fn handle(&mut self, packet: Inbound) -> Option<End> {
        match packet {
            Inbound::Publish(p) => return self.publish(p).await,
            Inbound::PubRel { pkid } => {
                // The PUBREC went out after the commit, so the message is in the log.
                codec::write(self.version, &Outbound::PubComp { pkid }, &mut self.out);
            }
            Inbound::PingReq => codec::write(self.version, &Outbound::PingResp, &mut self.out),
            Inbound::Subscribe { pkid, filters } => {
                self.l.denied("subscribe", &self.device, &filters.join(" "));
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
                return Some(End::Disconnect);
            }
            Inbound::Unexpected(kind) => {
                tracing::debug!(device = self.device, kind, "A device sent a packet a publishing client never sends.");
                return Some(End::Violation(Refusal::Protocol));
            }
        }
        None
    }

    async fn publish(&mut self, p: Publish) -> Option<End> {
        let received = std::time::Instant::now();
        if p.dup {
            self.l.metrics.mqtt_republished.inc();
        }
        if p.qos != QoS::AtMostOnce
            && self.version == Version::V5
            && self.inflight >= usize::from(self.l.settings.receive_maximum)
        {
            return Some(End::Violation(Refusal::ReceiveMaximum));
        }
        if let Some(own) = &self.own_topic
            && p.topic != *own
        {
            self.l.denied("publish_topic", &self.device, &p.topic);
            return Some(End::Violation(Refusal::PublishTopic));
        }
        let entry = self.decode(&p.topic, p.payload);
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
                Ack::Device(self.replies.clone(), Reply { pkid: p.pkid, exactly_once: qos == QoS::ExactlyOnce, code })
            }
        };
        self.to_log(Incoming { entry, ack, received }).await
    }

    /// Decodes a payload; a quarantined one keeps a copy of its bytes, not
    /// the read buffer they arrived in.
    fn decode(&self, topic: &str, payload: Bytes) -> Entry {
        let mut entry = self.l.decoder.decode(topic, payload, now_ms());
        if let Entry::Rejected(r) = &mut entry {
            r.payload = Bytes::copy_from_slice(&r.payload);
        }
        entry
    }

    /// Hands a message to the log writer, waiting while its queue is full.
    async fn to_log(&self, incoming: Incoming) -> Option<End> {
        tokio::select! {
            sent = self.l.to_log.send(incoming) => sent.err().map(|_| End::Shutdown),
            _ = self.end.cancelled() => Some(if self.l.stop.is_cancelled() { End::Shutdown } else { End::TakenOver }),
        }
    }

    /// The device went away without saying goodbye: its will becomes a message.
    async fn publish_will(&mut self, will: Will) {
        let entry = self.decode(&will.topic, Bytes::copy_from_slice(&will.payload));
        let incoming = Incoming { entry, ack: Ack::None, received: std::time::Instant::now() };
        tokio::select! {
            _ = self.l.to_log.send(incoming) => {}
            _ = self.l.stop.cancelled() => {}
        }
    }
}
