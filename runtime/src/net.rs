//! Accepting connections the same way in every server of the project.

use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A loopback port nobody listens on right now (the system picks it), for
/// a server that must be told its port before it binds (tests, demos).
pub fn free_port() -> std::io::Result<u16> {
    std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port())
}

/// The next connection, or `None` once `cancel` fires. An accept error (for
/// example out of file descriptors) is logged and retried after a short
/// pause instead of ending the server.
pub async fn accept(listener: &TcpListener, cancel: &CancellationToken) -> Option<TcpStream> {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => return Some(stream),
                Err(e) => {
                    tracing::warn!(error = %e, "Cannot accept a connection; retrying.");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// A loopback address with a port free right now, for a listener that
/// binds it itself a moment later.
pub fn free_loopback_port() -> Result<std::net::SocketAddr, String> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free loopback port: {e}"))
}
