//! MQTT 3.1.1 and 5.0 on the device listener, through rumqttc's packet
//! codecs (`rumqttc::mqttbytes::v4`, `rumqttc::v5::mqttbytes::v5`).
//!
//! The listener speaks to publishing devices only, so this module reduces
//! both protocol versions to what such a session needs: a [`Connect`], the
//! [`Inbound`] packets a device may send after it, and the [`Outbound`]
//! replies the listener writes. The version is decided by the CONNECT's
//! protocol level, read here before either codec sees the packet (the 3.1.1
//! codec would read a 5.0 CONNECT without its properties).
//!
//! Every read is bounded: a packet whose fixed header announces more than
//! the limit is an error before its body is buffered.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as m4, QoS};
use rumqttc::v5::mqttbytes::v5 as m5;

/// The protocol version of a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.0 (protocol level 5).
    V5,
}

impl Version {
    /// The label used in metrics and logs.
    pub fn label(self) -> &'static str {
        match self {
            Self::V4 => "3.1.1",
            Self::V5 => "5.0",
        }
    }
}

/// Why bytes from a device are not a packet the listener can act on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    #[error("a packet of {0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("protocol {0:?} level {1} is neither MQTT 3.1.1 nor 5.0")]
    Protocol(String, u8),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

fn malformed(e: impl std::fmt::Display) -> CodecError {
    CodecError::Malformed(e.to_string())
}

/// A device's will: published (as if the device had sent it) when the
/// session ends without a DISCONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
}

/// A CONNECT, whichever the version.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    pub version: Version,
    pub client_id: String,
    /// 3.1.1 clean session / 5.0 clean start.
    pub clean: bool,
    /// Seconds; 0 turns the keep-alive off.
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<String>,
    pub will: Option<Will>,
    /// 5.0: how long the session outlives the connection, in seconds
    /// (`u32::MAX`: forever). 3.1.1: 0 with a clean session, forever without.
    pub session_expiry: u32,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("version", &self.version)
            .field("client_id", &self.client_id)
            .field("clean", &self.clean)
            .field("keep_alive", &self.keep_alive)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("will_topic", &self.will.as_ref().map(|w| &w.topic))
            .field("session_expiry", &self.session_expiry)
            .finish()
    }
}

/// What a device sent after its CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound {
    Publish(Publish),
    /// QoS 2, second step: the device releases a packet id it got a PUBREC for.
    PubRel {
        pkid: u16,
    },
    Subscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    Unsubscribe {
        pkid: u16,
        filters: usize,
    },
    PingReq,
    /// A clean end of the session; `will` asks for the will anyway (5.0).
    Disconnect {
        will: bool,
        session_expiry: Option<u32>,
    },
    /// A packet a publishing device never sends (CONNECT again, acks of
    /// publishes it never got, AUTH, ...), named for the log.
    Unexpected(&'static str),
}

/// A PUBLISH from a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub pkid: u16,
    pub dup: bool,
}

/// What the listener writes to a device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outbound {
    ConnAck(ConnAck),
    /// QoS 1: PUBACK; QoS 2: PUBREC. `code` is a 5.0 reason code (ignored in 3.1.1).
    Ack {
        pkid: u16,
        exactly_once: bool,
        code: u8,
    },
    PubComp {
        pkid: u16,
    },
    /// Every filter refused (devices have no read rights).
    SubAckRefused {
        pkid: u16,
        filters: usize,
    },
    UnsubAck {
        pkid: u16,
        filters: usize,
    },
    PingResp,
    /// 5.0 only: the server ends the session with this reason code.
    Disconnect {
        reason: u8,
    },
}

/// A CONNACK. `code` is a 5.0 reason code; 3.1.1 gets the nearest return code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnAck {
    pub session_present: bool,
    pub code: u8,
    /// 5.0 properties announcing the listener's limits.
    pub receive_maximum: u16,
    pub max_packet: u32,
    /// 5.0: the client id the listener chose for a client that sent none.
    pub assigned_client_id: Option<String>,
}

/// 5.0 reason codes the listener uses (MQTT 5.0, 2.4).
pub mod reason {
    pub const SUCCESS: u8 = 0x00;
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    pub const UNSPECIFIED: u8 = 0x80;
    pub const MALFORMED: u8 = 0x81;
    pub const PROTOCOL_ERROR: u8 = 0x82;
    pub const UNSUPPORTED_PROTOCOL: u8 = 0x84;
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    pub const BAD_LOGIN: u8 = 0x86;
    pub const NOT_AUTHORIZED: u8 = 0x87;
    pub const SERVER_UNAVAILABLE: u8 = 0x88;
    pub const SERVER_BUSY: u8 = 0x89;
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    pub const QUOTA_EXCEEDED: u8 = 0x97;
    pub const PAYLOAD_FORMAT_INVALID: u8 = 0x99;
}

/// The packet at the start of `buf` is complete (`Ok(true)`), not yet
/// (`Ok(false)`), or announces more than `max` bytes.
fn complete(buf: &[u8], max: usize) -> Result<bool, CodecError> {
    if buf.len() < 2 {
        return Ok(false);
    }
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(false) };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let len = 2 + i + remaining;
            if len > max {
                return Err(CodecError::TooLarge(len, max));
            }
            return Ok(buf.len() >= len);
        }
    }
    Err(CodecError::Malformed("remaining length over 4 bytes".into()))
}

/// The first byte of a CONNECT's variable header, after the fixed header.
fn variable_header(buf: &[u8]) -> usize {
    1 + buf[1..].iter().take(4).take_while(|b| *b & 0x80 != 0).count() + 1
}

/// Reads a CONNECT off the front of `buf`: `Ok(None)` until all of it is there.
pub fn read_connect(buf: &mut BytesMut, max: usize) -> Result<Option<Connect>, CodecError> {
    // Known from the first byte: no waiting for the rest of something else.
    if let Some(&first) = buf.first()
        && first != 0x10
    {
        return Err(CodecError::Malformed(format!("expected CONNECT, got first byte {first:#04x}")));
    }
    if !complete(buf, max)? {
        return Ok(None);
    }
    // Protocol name (2-byte length + "MQTT" or "MQIsdp"), level, flags.
    let at = variable_header(buf);
    let header = buf.get(at..).unwrap_or_default();
    let name_len = usize::from(u16::from_be_bytes([*header.first().unwrap_or(&0), *header.get(1).unwrap_or(&0)]));
    let name = header.get(2..2 + name_len).map(String::from_utf8_lossy).unwrap_or_default().into_owned();
    let (Some(&level), Some(&flags)) = (header.get(2 + name_len), header.get(3 + name_len)) else {
        return Err(CodecError::Malformed("CONNECT cut short".into()));
    };
    if flags & 0x01 != 0 {
        return Err(CodecError::Malformed("CONNECT reserved flag set".into()));
    }
    match (name.as_str(), level) {
        ("MQTT", 4) => match m4::v4::Packet::read(buf, max).map_err(malformed)? {
            m4::v4::Packet::Connect(c) => {
                let (username, password) = match c.login {
                    Some(l) => (Some(l.username).filter(|u| !u.is_empty()), Some(l.password).filter(|p| !p.is_empty())),
                    None => (None, None),
                };
                Ok(Some(Connect {
                    version: Version::V4,
                    session_expiry: if c.clean_session { 0 } else { u32::MAX },
                    client_id: c.client_id,
                    clean: c.clean_session,
                    keep_alive: c.keep_alive,
                    username,
                    password,
                    will: c.last_will.map(|w| Will { topic: w.topic, payload: w.message }),
                }))
            }
            _ => Err(CodecError::Malformed("not a CONNECT".into())),
        },
        ("MQTT", 5) => match m5::Packet::read(buf, Some(max as u32)).map_err(malformed)? {
            m5::Packet::Connect(c, will, login) => {
                let (username, password) = match login {
                    Some(l) => (Some(l.username).filter(|u| !u.is_empty()), Some(l.password).filter(|p| !p.is_empty())),
                    None => (None, None),
                };
                let will = match will {
                    Some(w) => Some(Will {
                        topic: String::from_utf8(w.topic.to_vec()).map_err(|_| malformed("will topic is not UTF-8"))?,
                        payload: w.message,
                    }),
                    None => None,
                };
                Ok(Some(Connect {
                    version: Version::V5,
                    session_expiry: c.properties.as_ref().and_then(|p| p.session_expiry_interval).unwrap_or(0),
                    client_id: c.client_id,
                    clean: c.clean_start,
                    keep_alive: c.keep_alive,
                    username,
                    password,
                    will,
                }))
            }
            _ => Err(CodecError::Malformed("not a CONNECT".into())),
        },
        _ => Err(CodecError::Protocol(name, level)),
    }
}

/// Reads the next packet off the front of `buf`: `Ok(None)` until all of it is there.
pub fn read(version: Version, buf: &mut BytesMut, max: usize) -> Result<Option<Inbound>, CodecError> {
    if !complete(buf, max)? {
        return Ok(None);
    }
    match version {
        Version::V4 => read_v4(buf, max).map(Some),
        Version::V5 => read_v5(buf, max).map(Some),
    }
}

fn read_v4(buf: &mut BytesMut, max: usize) -> Result<Inbound, CodecError> {
    use m4::v4::Packet as P;
    Ok(match P::read(buf, max).map_err(malformed)? {
        P::Publish(p) => {
            Inbound::Publish(Publish { topic: p.topic, payload: p.payload, qos: p.qos, pkid: p.pkid, dup: p.dup })
        }
        P::PubRel(r) => Inbound::PubRel { pkid: r.pkid },
        P::Subscribe(s) => {
            Inbound::Subscribe { pkid: s.pkid, filters: s.filters.into_iter().map(|f| f.path).collect() }
        }
        P::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.topics.len() },
        P::PingReq => Inbound::PingReq,
        P::Disconnect => Inbound::Disconnect { will: false, session_expiry: None },
        P::Connect(_) => Inbound::Unexpected("CONNECT"),
        P::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        P::PubAck(_) => Inbound::Unexpected("PUBACK"),
        P::PubRec(_) => Inbound::Unexpected("PUBREC"),
        P::PubComp(_) => Inbound::Unexpected("PUBCOMP"),
        P::SubAck(_) => Inbound::Unexpected("SUBACK"),
        P::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        P::PingResp => Inbound::Unexpected("PINGRESP"),
    })
}

fn read_v5(buf: &mut BytesMut, max: usize) -> Result<Inbound, CodecError> {
    use m5::Packet as P;
    // A DISCONNECT is read here: rumqttc's 5.0 codec wants a property length
    // in it, which the protocol lets a client leave out (remaining length 0 or 1).
    if buf[0] == 0xE0 && buf[1] < 2 {
        let packet = buf.split_to(2 + usize::from(buf[1]));
        let code = packet.get(2).copied().unwrap_or(reason::SUCCESS);
        return Ok(Inbound::Disconnect { will: code == reason::DISCONNECT_WITH_WILL, session_expiry: None });
    }
    Ok(match P::read(buf, Some(max as u32)).map_err(malformed)? {
        P::Publish(p) => {
            if p.properties.as_ref().is_some_and(|pr| pr.topic_alias.is_some()) {
                return Err(CodecError::Malformed("topic alias (the listener allows none)".into()));
            }
            let topic = String::from_utf8(p.topic.to_vec()).map_err(|_| malformed("topic is not UTF-8"))?;
            let qos = match p.qos {
                rumqttc::v5::mqttbytes::QoS::AtMostOnce => QoS::AtMostOnce,
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce => QoS::AtLeastOnce,
                rumqttc::v5::mqttbytes::QoS::ExactlyOnce => QoS::ExactlyOnce,
            };
            Inbound::Publish(Publish { topic, payload: p.payload, qos, pkid: p.pkid, dup: p.dup })
        }
        P::PubRel(r) => Inbound::PubRel { pkid: r.pkid },
        P::Subscribe(s) => {
            Inbound::Subscribe { pkid: s.pkid, filters: s.filters.into_iter().map(|f| f.path).collect() }
        }
        P::Unsubscribe(u) => Inbound::Unsubscribe { pkid: u.pkid, filters: u.filters.len() },
        P::PingReq(_) => Inbound::PingReq,
        P::Disconnect(d) => Inbound::Disconnect {
            will: d.reason_code == m5::DisconnectReasonCode::DisconnectWithWillMessage,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        P::Connect(..) => Inbound::Unexpected("CONNECT"),
        P::ConnAck(_) => Inbound::Unexpected("CONNACK"),
        P::PubAck(_) => Inbound::Unexpected("PUBACK"),
        P::PubRec(_) => Inbound::Unexpected("PUBREC"),
        P::PubComp(_) => Inbound::Unexpected("PUBCOMP"),
        P::SubAck(_) => Inbound::Unexpected("SUBACK"),
        P::UnsubAck(_) => Inbound::Unexpected("UNSUBACK"),
        P::PingResp(_) => Inbound::Unexpected("PINGRESP"),
        P::Auth(_) => Inbound::Unexpected("AUTH"),
    })
}

/// The 3.1.1 CONNACK return code nearest to a 5.0 reason code.
fn v4_return_code(code: u8) -> m4::v4::ConnectReturnCode {
    use m4::v4::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::UNSUPPORTED_PROTOCOL => C::RefusedProtocolVersion,
        reason::CLIENT_ID_NOT_VALID => C::BadClientId,
        reason::BAD_LOGIN => C::BadUserNamePassword,
        reason::NOT_AUTHORIZED => C::NotAuthorized,
        _ => C::ServiceUnavailable,
    }
}

fn v5_connect_code(code: u8) -> m5::ConnectReturnCode {
    use m5::ConnectReturnCode as C;
    match code {
        reason::SUCCESS => C::Success,
        reason::MALFORMED => C::MalformedPacket,
        reason::PROTOCOL_ERROR => C::ProtocolError,
        reason::UNSUPPORTED_PROTOCOL => C::UnsupportedProtocolVersion,
        reason::CLIENT_ID_NOT_VALID => C::ClientIdentifierNotValid,
        reason::BAD_LOGIN => C::BadUserNamePassword,
        reason::NOT_AUTHORIZED => C::NotAuthorized,
        reason::SERVER_BUSY => C::ServerBusy,
        reason::PACKET_TOO_LARGE => C::PacketTooLarge,
        reason::QUOTA_EXCEEDED => C::QuotaExceeded,
        reason::SERVER_UNAVAILABLE => C::ServerUnavailable,
        _ => C::UnspecifiedError,
    }
}

fn puback_reason(code: u8) -> m5::PubAckReason {
    use m5::PubAckReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn pubrec_reason(code: u8) -> m5::PubRecReason {
    use m5::PubRecReason as R;
    match code {
        reason::SUCCESS => R::Success,
        reason::NOT_AUTHORIZED => R::NotAuthorized,
        reason::TOPIC_NAME_INVALID => R::TopicNameInvalid,
        reason::QUOTA_EXCEEDED => R::QuotaExceeded,
        reason::PAYLOAD_FORMAT_INVALID => R::PayloadFormatInvalid,
        _ => R::UnspecifiedError,
    }
}

fn disconnect_reason(code: u8) -> m5::DisconnectReasonCode {
    use m5::DisconnectReasonCode as D;
    match code {
        reason::MALFORMED => D::MalformedPacket,
        reason::PROTOCOL_ERROR => D::ProtocolError,
        reason::NOT_AUTHORIZED => D::NotAuthorized,
        reason::SERVER_BUSY => D::ServerBusy,
        reason::SERVER_SHUTTING_DOWN => D::ServerShuttingDown,
        reason::KEEP_ALIVE_TIMEOUT => D::KeepAliveTimeout,
        reason::SESSION_TAKEN_OVER => D::SessionTakenOver,
        reason::TOPIC_NAME_INVALID => D::TopicNameInvalid,
        reason::RECEIVE_MAXIMUM_EXCEEDED => D::ReceiveMaximumExceeded,
        reason::TOPIC_ALIAS_INVALID => D::TopicAliasInvalid,
        reason::PACKET_TOO_LARGE => D::PacketTooLarge,
        _ => D::UnspecifiedError,
    }
}

/// Appends `packet` to `out`. Replies are small and built here; an encoding
/// error would be a bug in this module, so it is logged and the packet skipped.
pub fn write(version: Version, packet: &Outbound, out: &mut BytesMut) {
    let written = match version {
        Version::V4 => write_v4(packet, out).map_err(|e| e.to_string()),
        Version::V5 => write_v5(packet, out).map_err(|e| e.to_string()),
    };
    if let Err(e) = written {
        tracing::error!(error = %e, ?packet, "Cannot encode an MQTT reply; skipped it.");
    }
}

fn write_v4(packet: &Outbound, out: &mut BytesMut) -> Result<(), m4::Error> {
    use m4::v4 as v;
    match packet {
        Outbound::ConnAck(c) => v::ConnAck::new(v4_return_code(c.code), c.session_present).write(out)?,
        Outbound::Ack { pkid, exactly_once: false, .. } => v::PubAck::new(*pkid).write(out)?,
        Outbound::Ack { pkid, exactly_once: true, .. } => v::PubRec::new(*pkid).write(out)?,
        Outbound::PubComp { pkid } => v::PubComp::new(*pkid).write(out)?,
        Outbound::SubAckRefused { pkid, filters } => {
            v::SubAck::new(*pkid, vec![v::SubscribeReasonCode::Failure; *filters]).write(out)?
        }
        Outbound::UnsubAck { pkid, .. } => v::UnsubAck::new(*pkid).write(out)?,
        Outbound::PingResp => v::PingResp.write(out)?,
        // 3.1.1 has no server DISCONNECT: closing the connection is the refusal.
        Outbound::Disconnect { .. } => 0,
    };
    Ok(())
}

fn write_v5(packet: &Outbound, out: &mut BytesMut) -> Result<(), rumqttc::v5::mqttbytes::Error> {
    match packet {
        Outbound::ConnAck(c) => {
            let properties = (c.code == reason::SUCCESS).then(|| m5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(c.receive_maximum),
                max_qos: None,
                retain_available: None,
                max_packet_size: Some(c.max_packet),
                assigned_client_identifier: c.assigned_client_id.clone(),
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                // Devices only publish: no subscriptions of any kind.
                wildcard_subscription_available: Some(0),
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            m5::ConnAck { session_present: c.session_present, code: v5_connect_code(c.code), properties }.write(out)?
        }
        Outbound::Ack { pkid, exactly_once: false, code } => {
            m5::PubAck { pkid: *pkid, reason: puback_reason(*code), properties: None }.write(out)?
        }
        Outbound::Ack { pkid, exactly_once: true, code } => {
            m5::PubRec { pkid: *pkid, reason: pubrec_reason(*code), properties: None }.write(out)?
        }
        Outbound::PubComp { pkid } => m5::PubComp::new(*pkid, None).write(out)?,
        Outbound::SubAckRefused { pkid, filters } => m5::SubAck {
            pkid: *pkid,
            return_codes: vec![m5::SubscribeReasonCode::NotAuthorized; *filters],
            properties: None,
        }
        .write(out)?,
        Outbound::UnsubAck { pkid, filters } => m5::UnsubAck {
            pkid: *pkid,
            reasons: vec![m5::UnsubAckReason::NoSubscriptionExisted; *filters],
            properties: None,
        }
        .write(out)?,
        Outbound::PingResp => m5::PingResp::write(out)?,
        // Written here: rumqttc's 5.0 codec writes a property length its
        // remaining length does not count.
        Outbound::Disconnect { reason } => {
            out.extend_from_slice(&[0xE0, 1, disconnect_reason(*reason) as u8]);
            3
        }
    };
    Ok(())
}

#[cfg(test)]
mod tests {
    use rumqttc::v5::mqttbytes::QoS as Q5;

    use super::*;

    fn v4_connect(id: &str, clean: bool, login: Option<(&str, &str)>) -> BytesMut {
        let mut c = m4::v4::Connect::new(id);
        c.clean_session = clean;
        c.keep_alive = 30;
        if let Some((u, p)) = login {
            c.set_login(u, p);
        }
        let mut out = BytesMut::new();
        c.write(&mut out).unwrap();
        out
    }

    fn v5_connect(id: &str, expiry: Option<u32>) -> BytesMut {
        let c = m5::Connect {
            keep_alive: 20,
            client_id: id.into(),
            clean_start: false,
            properties: expiry
                .map(|e| m5::ConnectProperties { session_expiry_interval: Some(e), ..m5::ConnectProperties::new() }),
        };
        let will = m5::LastWill::new("devices/d/telemetry", "bye", Q5::AtLeastOnce, false, None);
        let mut out = BytesMut::new();
        c.write(&Some(will), &Some(m5::Login::new("d", "pw")), &mut out).unwrap();
        out
    }

    #[test]
    fn a_connect_of_either_version_is_read_whole() {
        let mut buf = v4_connect("dev-1", false, Some(("dev-1", "secret")));
        let c = read_connect(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((c.version, c.client_id.as_str(), c.clean, c.keep_alive), (Version::V4, "dev-1", false, 30));
        assert_eq!((c.username.as_deref(), c.password.as_deref()), (Some("dev-1"), Some("secret")));
        assert_eq!(c.session_expiry, u32::MAX, "a 3.1.1 session without clean session lasts");
        assert!(buf.is_empty(), "the CONNECT was consumed");
        assert!(!format!("{c:?}").contains("secret"), "the password stays out of Debug");

        let mut buf = v5_connect("d", Some(300));
        let c = read_connect(&mut buf, 1024).unwrap().unwrap();
        assert_eq!((c.version, c.client_id.as_str(), c.clean, c.session_expiry), (Version::V5, "d", false, 300));
        assert_eq!(c.will, Some(Will { topic: "devices/d/telemetry".into(), payload: Bytes::from_static(b"bye") }));
        let c = read_connect(&mut v5_connect("d", None), 1024).unwrap().unwrap();
        assert_eq!(c.session_expiry, 0, "5.0 without the property: the session ends with the connection");
    }

    #[test]
    fn a_connect_is_read_only_once_complete_and_refused_when_damaged() {
        let full = v4_connect("dev-1", true, None);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(read_connect(&mut part, 1024), Ok(None), "cut at {cut}");
        }
        let mut v3 = full.clone();
        v3[8] = 3;
        assert_eq!(read_connect(&mut v3, 1024), Err(CodecError::Protocol("MQTT".into(), 3)));
        let mut reserved = full.clone();
        reserved[9] |= 1;
        assert!(matches!(read_connect(&mut reserved, 1024), Err(CodecError::Malformed(_))));
        let mut publish = BytesMut::from(&[0x30u8, 0x03, 0, 1, b'a'][..]);
        assert!(matches!(read_connect(&mut publish, 1024), Err(CodecError::Malformed(_))));
        let mut http = BytesMut::from(&b"GET / HT"[..]);
        assert!(matches!(read_connect(&mut http, 1024), Err(CodecError::Malformed(_))), "refused from its first byte");
        assert_eq!(read_connect(&mut full.clone(), 10), Err(CodecError::TooLarge(full.len(), 10)));
    }

    #[test]
    fn an_oversized_packet_is_refused_from_its_header_alone() {
        // A PUBLISH announcing 200 MiB: five bytes are enough to refuse it.
        let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x80, 0x80, 0x64][..]);
        assert_eq!(read(Version::V4, &mut buf, 4096), Err(CodecError::TooLarge(5 + (100 << 21), 4096)));
        let mut buf = BytesMut::from(&[0x30u8, 0xFF, 0xFF, 0xFF, 0xFF, 0x01][..]);
        assert!(matches!(read(Version::V5, &mut buf, usize::MAX), Err(CodecError::Malformed(_))));
    }

    #[test]
    fn publishes_of_each_qos_and_version_are_read() {
        for (qos, q5) in [
            (QoS::AtMostOnce, Q5::AtMostOnce),
            (QoS::AtLeastOnce, Q5::AtLeastOnce),
            (QoS::ExactlyOnce, Q5::ExactlyOnce),
        ] {
            let mut buf = BytesMut::new();
            let mut p = m4::v4::Publish::new("devices/a/telemetry", qos, vec![1u8, 2, 3]);
            p.pkid = if qos == QoS::AtMostOnce { 0 } else { 7 };
            p.dup = qos != QoS::AtMostOnce;
            p.write(&mut buf).unwrap();
            let mut p5 = m5::Publish::new("devices/a/telemetry", q5, vec![1u8, 2, 3], None);
            p5.pkid = p.pkid;
            p5.dup = p.dup;
            p5.write(&mut buf).unwrap();
            let want = Inbound::Publish(Publish {
                topic: "devices/a/telemetry".into(),
                payload: Bytes::from_static(&[1, 2, 3]),
                qos,
                pkid: p.pkid,
                dup: p.dup,
            });
            assert_eq!(read(Version::V4, &mut buf, 1024).unwrap(), Some(want.clone()));
            assert_eq!(read(Version::V5, &mut buf, 1024).unwrap(), Some(want));
            assert!(buf.is_empty());
        }
    }

    #[test]
    fn a_bare_5_0_disconnect_is_a_normal_one() {
        let mut buf = BytesMut::from(&[0xE0u8, 0x00][..]);
        assert_eq!(
            read(Version::V5, &mut buf, 1024),
            Ok(Some(Inbound::Disconnect { will: false, session_expiry: None }))
        );
        let mut buf = BytesMut::from(&[0xE0u8, 0x01, reason::DISCONNECT_WITH_WILL][..]);
        assert_eq!(
            read(Version::V5, &mut buf, 1024),
            Ok(Some(Inbound::Disconnect { will: true, session_expiry: None }))
        );
        // With properties: a session expiry of 30 s.
        let mut buf = BytesMut::from(&[0xE0u8, 0x07, 0x00, 0x05, 0x11, 0, 0, 0, 30][..]);
        assert_eq!(
            read(Version::V5, &mut buf, 1024),
            Ok(Some(Inbound::Disconnect { will: false, session_expiry: Some(30) }))
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn replies_are_written_in_the_sessions_version() {
        let mut out = BytesMut::new();
        write(
            Version::V4,
            &Outbound::Ack { pkid: 9, exactly_once: false, code: reason::PAYLOAD_FORMAT_INVALID },
            &mut out,
        );
        assert_eq!(&out[..], [0x40, 2, 0, 9], "3.1.1 has no reason codes");
        out.clear();
        write(Version::V4, &Outbound::SubAckRefused { pkid: 7, filters: 2 }, &mut out);
        assert_eq!(&out[..], [0x90, 4, 0, 7, 0x80, 0x80]);
        out.clear();
        write(Version::V4, &Outbound::Disconnect { reason: reason::KEEP_ALIVE_TIMEOUT }, &mut out);
        assert!(out.is_empty(), "3.1.1 closes instead");

        write(Version::V5, &Outbound::Ack { pkid: 9, exactly_once: true, code: reason::QUOTA_EXCEEDED }, &mut out);
        match m5::Packet::read(&mut out, None).unwrap() {
            m5::Packet::PubRec(r) => assert_eq!((r.pkid, r.reason), (9, m5::PubRecReason::QuotaExceeded)),
            other => panic!("{other:?}"),
        }
        let connack = ConnAck {
            session_present: true,
            code: reason::SUCCESS,
            receive_maximum: 32,
            max_packet: 65_536,
            assigned_client_id: Some("auto-1".into()),
        };
        write(Version::V5, &Outbound::ConnAck(connack), &mut out);
        match m5::Packet::read(&mut out, None).unwrap() {
            m5::Packet::ConnAck(c) => {
                assert!(c.session_present);
                let p = c.properties.unwrap();
                assert_eq!((p.receive_max, p.max_packet_size), (Some(32), Some(65_536)));
                assert_eq!(p.assigned_client_identifier.as_deref(), Some("auto-1"));
            }
            other => panic!("{other:?}"),
        }
        write(
            Version::V5,
            &Outbound::Ack { pkid: 3, exactly_once: false, code: reason::PAYLOAD_FORMAT_INVALID },
            &mut out,
        );
        match m5::Packet::read(&mut out, None).unwrap() {
            m5::Packet::PubAck(a) => assert_eq!((a.pkid, a.reason), (3, m5::PubAckReason::PayloadFormatInvalid)),
            other => panic!("{other:?}"),
        }
        write(Version::V5, &Outbound::SubAckRefused { pkid: 4, filters: 1 }, &mut out);
        match m5::Packet::read(&mut out, None).unwrap() {
            m5::Packet::SubAck(a) => assert_eq!(a.return_codes, [m5::SubscribeReasonCode::NotAuthorized]),
            other => panic!("{other:?}"),
        }
        assert!(out.is_empty());
        write(Version::V5, &Outbound::Disconnect { reason: reason::SESSION_TAKEN_OVER }, &mut out);
        assert_eq!(&out[..], [0xE0, 1, 0x8E]);
    }
}
