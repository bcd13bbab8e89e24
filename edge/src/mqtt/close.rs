//! Why a device connection was refused or cut off, and how a session ended:
//! the `reason` labels of `kappa_edge_mqtt_connections_refused_total` and
//! `kappa_edge_mqtt_sessions_ended_total` (docs/metrics.md).

use super::codec::reason;

/// Why a device was refused at CONNECT or cut off for a protocol or policy
/// violation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Tls,
    Timeout,
    /// The connection closed before its CONNECT (a port check, a scan).
    Closed,
    Protocol,
    UnsupportedProtocol,
    PacketTooLarge,
    NoIdentity,
    ClientIdMismatch,
    BadClientId,
    UnknownDevice,
    BadPassword,
    Revoked,
    WillTopic,
    TooManyConnections,
    ServerBusy,
    /// A publish outside the device's rights (another device's topic).
    PublishTopic,
    /// 5.0: more unacknowledged publishes than the receive maximum announced.
    ReceiveMaximum,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Tls => "tls",
            Self::Timeout => "timeout",
            Self::Closed => "closed_before_connect",
            Self::Protocol => "protocol",
            Self::UnsupportedProtocol => "unsupported_protocol",
            Self::PacketTooLarge => "packet_too_large",
            Self::NoIdentity => "no_identity",
            Self::ClientIdMismatch => "client_id_mismatch",
            Self::BadClientId => "bad_client_id",
            Self::UnknownDevice => "unknown_device",
            Self::BadPassword => "bad_password",
            Self::Revoked => "revoked",
            Self::WillTopic => "will_topic",
            Self::TooManyConnections => "too_many_connections",
            Self::ServerBusy => "server_busy",
            Self::PublishTopic => "publish_topic",
            Self::ReceiveMaximum => "receive_maximum",
        }
    }

    /// The 5.0 reason code of the CONNACK or DISCONNECT that says so (3.1.1
    /// gets the nearest CONNACK return code, or a closed connection). An
    /// unknown device and a wrong password share one code.
    pub fn code(self) -> u8 {
        match self {
            Self::Protocol | Self::Tls | Self::Timeout | Self::Closed => reason::PROTOCOL_ERROR,
            Self::UnsupportedProtocol => reason::UNSUPPORTED_PROTOCOL,
            Self::PacketTooLarge => reason::PACKET_TOO_LARGE,
            Self::ClientIdMismatch | Self::BadClientId => reason::CLIENT_ID_NOT_VALID,
            Self::UnknownDevice | Self::BadPassword => reason::BAD_LOGIN,
            Self::NoIdentity | Self::Revoked | Self::WillTopic | Self::PublishTopic => reason::NOT_AUTHORIZED,
            Self::TooManyConnections | Self::ServerBusy => reason::SERVER_BUSY,
            Self::ReceiveMaximum => reason::RECEIVE_MAXIMUM_EXCEEDED,
        }
    }
}

/// How an established session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The device sent DISCONNECT.
    Disconnect,
    /// The connection dropped without a DISCONNECT.
    Network,
    /// Nothing heard for 1.5 times the keep-alive.
    KeepAlive,
    /// The device could not take the replies within the write timeout.
    WriteTimeout,
    /// Another connection with the same client id took the session over.
    TakenOver,
    /// The agent is stopping.
    Shutdown,
    /// Cut off for a protocol or policy violation (also counted as a refusal).
    Violation(Refusal),
}

impl End {
    pub fn reason(self) -> &'static str {
        match self {
            Self::Disconnect => "disconnect",
            Self::Network => "network",
            Self::KeepAlive => "keep_alive",
            Self::WriteTimeout => "write_timeout",
            Self::TakenOver => "taken_over",
            Self::Shutdown => "shutdown",
            Self::Violation(_) => "violation",
        }
    }

    /// Whether the device's will is published: every end but a clean DISCONNECT.
    pub fn publishes_will(self) -> bool {
        !matches!(self, Self::Disconnect)
    }

    /// The 5.0 DISCONNECT the listener sends first, if any.
    pub fn disconnect_code(self) -> Option<u8> {
        match self {
            Self::Disconnect | Self::Network | Self::WriteTimeout => None,
            Self::KeepAlive => Some(reason::KEEP_ALIVE_TIMEOUT),
            Self::TakenOver => Some(reason::SESSION_TAKEN_OVER),
            Self::Shutdown => Some(reason::SERVER_SHUTTING_DOWN),
            Self::Violation(r) => Some(r.code()),
        }
    }
}
