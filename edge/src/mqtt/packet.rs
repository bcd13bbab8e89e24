//! Just enough MQTT 3.1.1 (the embedded broker's protocol) for the device
//! gate: framing, the CONNECT packet (read, and written again with another
//! login), the topic of a PUBLISH, the filters of a SUBSCRIBE, and the
//! replies the gate sends itself. Every read checks its bounds: the bytes
//! come from devices.

/// Packet types (the high nibble of the first byte).
pub const CONNECT: u8 = 1;
pub const PUBLISH: u8 = 3;
pub const SUBSCRIBE: u8 = 8;
pub const UNSUBSCRIBE: u8 = 10;
pub const DISCONNECT: u8 = 14;

/// CONNACK return codes (MQTT 3.1.1, 3.2.2.3).
pub const UNACCEPTABLE_PROTOCOL: u8 = 1;
pub const IDENTIFIER_REJECTED: u8 = 2;
pub const BAD_LOGIN: u8 = 4;
pub const NOT_AUTHORIZED: u8 = 5;

/// Why bytes are not a packet the gate can pass on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PacketError {
    #[error("malformed remaining length")]
    Length,
    #[error("a packet of {0} bytes is over the limit of {1}")]
    TooLarge(usize, usize),
    #[error("malformed {0} packet")]
    Malformed(&'static str),
    #[error("protocol {0:?} level {1} is not MQTT 3.1.1")]
    Protocol(String, u8),
}

/// Where a complete packet lies at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    /// Bytes of the fixed header (type byte and remaining length).
    pub header: usize,
    /// Bytes of the whole packet.
    pub len: usize,
}

impl Frame {
    /// The variable header and payload of the packet at the start of `buf`.
    pub fn body<'a>(&self, buf: &'a [u8]) -> &'a [u8] {
        &buf[self.header..self.len]
    }
}

/// The packet at the start of `buf`: `None` until all of it is there. A
/// packet longer than `max` bytes is an error as soon as its header says so,
/// before its body is buffered.
pub fn frame(buf: &[u8], max: usize) -> Result<Option<Frame>, PacketError> {
    let Some(&first) = buf.first() else { return Ok(None) };
    let mut remaining = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else { return Ok(None) };
        remaining |= usize::from(b & 0x7F) << (7 * i);
        if b & 0x80 == 0 {
            let header = 2 + i;
            let len = header + remaining;
            if len > max {
                return Err(PacketError::TooLarge(len, max));
            }
            return Ok((buf.len() >= len).then_some(Frame { kind: first >> 4, flags: first & 0x0F, header, len }));
        }
    }
    Err(PacketError::Length)
}

/// A reader over a packet body.
struct Cursor<'a> {
    buf: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn err(&self) -> PacketError {
        PacketError::Malformed(self.what)
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        if self.buf.len() < n {
            return Err(self.err());
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PacketError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn binary(&mut self) -> Result<&'a [u8], PacketError> {
        let n = self.u16()?;
        self.take(usize::from(n))
    }
    fn string(&mut self) -> Result<&'a str, PacketError> {
        let b = self.binary()?;
        std::str::from_utf8(b).map_err(|_| self.err())
    }
}

/// A CONNECT packet's fields.
#[derive(Clone, PartialEq, Eq)]
pub struct Connect {
    /// Connect flags without the login bits.
    flags: u8,
    pub keep_alive: u16,
    pub client_id: String,
    /// Topic and message of the will.
    pub will: Option<(String, Vec<u8>)>,
    pub username: Option<String>,
    pub password: Option<Vec<u8>>,
}

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connect")
            .field("client_id", &self.client_id)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("will_topic", &self.will.as_ref().map(|w| &w.0))
            .finish()
    }
}

const USERNAME_FLAG: u8 = 0x80;
const PASSWORD_FLAG: u8 = 0x40;
const WILL_FLAG: u8 = 0x04;

impl Connect {
    /// Reads a CONNECT body (MQTT 3.1.1 only).
    pub fn parse(body: &[u8]) -> Result<Self, PacketError> {
        let mut c = Cursor { buf: body, what: "CONNECT" };
        let name = c.string()?;
        let level = c.u8()?;
        if name != "MQTT" || level != 4 {
            return Err(PacketError::Protocol(name.to_string(), level));
        }
        let flags = c.u8()?;
        if flags & 0x01 != 0 || (flags & WILL_FLAG == 0 && flags & 0x38 != 0) {
            return Err(c.err());
        }
        let keep_alive = c.u16()?;
        let client_id = c.string()?.to_string();
        let will = if flags & WILL_FLAG != 0 {
            let topic = c.string()?.to_string();
            Some((topic, c.binary()?.to_vec()))
        } else {
            None
        };
        let username = if flags & USERNAME_FLAG != 0 { Some(c.string()?.to_string()) } else { None };
        let password = if flags & PASSWORD_FLAG != 0 { Some(c.binary()?.to_vec()) } else { None };
        if !c.buf.is_empty() {
            return Err(c.err());
        }
        Ok(Self { flags: flags & !(USERNAME_FLAG | PASSWORD_FLAG), keep_alive, client_id, will, username, password })
    }

    /// A clean-session CONNECT without will or login.
    pub fn new(client_id: &str, keep_alive: u16) -> Self {
        Self { flags: 0x02, keep_alive, client_id: client_id.into(), will: None, username: None, password: None }
    }

    /// The same CONNECT logging in as `username` with `password`.
    pub fn with_login(mut self, username: &str, password: &[u8]) -> Self {
        self.username = Some(username.into());
        self.password = Some(password.to_vec());
        self
    }

    /// The whole packet.
    pub fn encode(&self) -> Vec<u8> {
        let mut flags = self.flags;
        if self.username.is_some() {
            flags |= USERNAME_FLAG;
        }
        if self.password.is_some() {
            flags |= PASSWORD_FLAG;
        }
        let mut body = Vec::with_capacity(64);
        put_binary(&mut body, b"MQTT");
        body.push(4);
        body.push(flags);
        body.extend_from_slice(&self.keep_alive.to_be_bytes());
        put_binary(&mut body, self.client_id.as_bytes());
        if let Some((topic, message)) = &self.will {
            put_binary(&mut body, topic.as_bytes());
            put_binary(&mut body, message);
        }
        for field in [self.username.as_ref().map(String::as_bytes), self.password.as_deref()].into_iter().flatten() {
            put_binary(&mut body, field);
        }
        packet(CONNECT << 4, &body)
    }
}

fn put_binary(out: &mut Vec<u8>, b: &[u8]) {
    // Fields come from a parsed packet (each under 64 KiB) or from the gate.
    let n = u16::try_from(b.len()).unwrap_or(u16::MAX);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(&b[..usize::from(n)]);
}

/// A packet with first byte `first` and `body`.
fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(first);
    let mut n = body.len();
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(body);
    out
}

/// The topic of a PUBLISH body.
pub fn publish_topic(body: &[u8]) -> Result<&str, PacketError> {
    Cursor { buf: body, what: "PUBLISH" }.string()
}

/// The packet id and the filters of a SUBSCRIBE (`subscribe`) or
/// UNSUBSCRIBE body.
pub fn filters(body: &[u8], subscribe: bool) -> Result<(u16, Vec<&str>), PacketError> {
    let mut c = Cursor { buf: body, what: if subscribe { "SUBSCRIBE" } else { "UNSUBSCRIBE" } };
    let id = c.u16()?;
    let mut out = Vec::new();
    while !c.buf.is_empty() {
        out.push(c.string()?);
        if subscribe {
            c.u8()?;
        }
    }
    if out.is_empty() {
        return Err(c.err());
    }
    Ok((id, out))
}

/// CONNACK with `code` (no session present).
pub fn connack(code: u8) -> [u8; 4] {
    [0x20, 2, 0, code]
}

/// SUBACK refusing each of `n` filters (return code 0x80).
pub fn suback_refused(id: u16, n: usize) -> Vec<u8> {
    let mut body = id.to_be_bytes().to_vec();
    body.resize(2 + n, 0x80);
    packet(0x90, &body)
}

/// UNSUBACK for packet `id`.
pub fn unsuback(id: u16) -> [u8; 4] {
    let [hi, lo] = id.to_be_bytes();
    [0xB0, 2, hi, lo]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_body(flags: u8, fields: &[&[u8]]) -> Vec<u8> {
        let mut b = Vec::new();
        put_binary(&mut b, b"MQTT");
        b.push(4);
        b.push(flags);
        b.extend_from_slice(&30u16.to_be_bytes());
        for f in fields {
            put_binary(&mut b, f);
        }
        b
    }

    #[test]
    fn a_connect_is_read_and_written_back_with_another_login() {
        let body = connect_body(
            0x02 | WILL_FLAG | USERNAME_FLAG | PASSWORD_FLAG,
            &[b"dev-1", b"devices/dev-1/telemetry", b"bye", b"dev-1", b"secret"],
        );
        let c = Connect::parse(&body).unwrap();
        assert_eq!(c.client_id, "dev-1");
        assert_eq!(c.username.as_deref(), Some("dev-1"));
        assert_eq!(c.password.as_deref(), Some(&b"secret"[..]));
        assert_eq!(c.will, Some(("devices/dev-1/telemetry".into(), b"bye".to_vec())));
        assert!(!format!("{c:?}").contains("secret"));

        assert_eq!(Connect::parse(&c.encode()[2..]).unwrap(), c);
        let again = c.clone().with_login("gate", b"inside").encode();
        let f = frame(&again, 1 << 20).unwrap().unwrap();
        assert_eq!((f.kind, f.len), (CONNECT, again.len()));
        let d = Connect::parse(f.body(&again)).unwrap();
        assert_eq!((d.client_id.as_str(), d.keep_alive, &d.will), ("dev-1", 30, &c.will));
        assert_eq!((d.username.as_deref(), d.password.as_deref()), (Some("gate"), Some(&b"inside"[..])));

        // Without a login: the flags gain both bits.
        let plain = Connect::parse(&connect_body(0x02, &[b"dev-2"])).unwrap();
        assert_eq!(Connect::parse(&plain.encode()[2..]).unwrap(), plain);
        assert_eq!(plain, Connect::new("dev-2", 30));
        let d = Connect::parse(&plain.with_login("gate", b"x").encode()[2..]).unwrap();
        assert_eq!((d.username.as_deref(), d.will), (Some("gate"), None));
    }

    #[test]
    fn other_protocols_and_damaged_connects_are_refused() {
        let mut v5 = connect_body(0x02, &[b"d"]);
        v5[6] = 5;
        assert_eq!(Connect::parse(&v5), Err(PacketError::Protocol("MQTT".into(), 5)));
        assert!(Connect::parse(&connect_body(0x03, &[b"d"])).is_err(), "reserved flag");
        assert!(Connect::parse(&connect_body(0x82, &[b"d"])).is_err(), "username flag without a username");
        let full = connect_body(0x02, &[b"device"]);
        for cut in 0..full.len() {
            assert!(Connect::parse(&full[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn frames_are_found_only_when_complete_and_oversized_ones_early() {
        let p = packet(PUBLISH << 4, &[0u8; 300]);
        assert_eq!(p[1..3], [0xAC, 0x02]);
        assert_eq!(frame(&p[..2], 1000), Ok(None));
        assert_eq!(frame(&p[..100], 1000), Ok(None));
        assert_eq!(frame(&p, 1000), Ok(Some(Frame { kind: PUBLISH, flags: 0, header: 3, len: 303 })));
        assert_eq!(frame(&p[..3], 100), Err(PacketError::TooLarge(303, 100)));
        assert_eq!(frame(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF], usize::MAX), Err(PacketError::Length));
    }

    #[test]
    fn subscriptions_are_read_and_refused() {
        let mut body = 7u16.to_be_bytes().to_vec();
        for f in ["#", "devices/+/telemetry"] {
            put_binary(&mut body, f.as_bytes());
            body.push(1);
        }
        assert_eq!(filters(&body, true), Ok((7, vec!["#", "devices/+/telemetry"])));
        assert!(filters(&body[..body.len() - 1], true).is_err());
        assert_eq!(suback_refused(7, 2), [0x90, 4, 0, 7, 0x80, 0x80]);
        assert_eq!(unsuback(7), [0xB0, 2, 0, 7]);
        let mut publish = Vec::new();
        put_binary(&mut publish, b"devices/a/telemetry");
        assert_eq!(publish_topic(&publish), Ok("devices/a/telemetry"));
    }
}
