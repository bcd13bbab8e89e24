//! The agent's own device-facing MQTT listener (`mqtt.mode = "embedded"`).
//!
//! Devices on a gateway publish telemetry; they do not subscribe. So this is
//! a server for publishing clients, not a general broker: MQTT 3.1.1 and 5.0
//! over TCP and TLS, identities and topic rights checked at CONNECT and on
//! every PUBLISH (`access`), and each QoS 1 PUBACK (QoS 2 PUBREC) written
//! only after the log transaction holding that message committed. Each
//! connection is one task (`session`); the listener accepts, enforces the
//! connection limit and finishes TLS handshakes, and every session ends
//! when the agent stops.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::access::{Access, AccessSettings};
use super::close::Refusal;
use super::session::Hello;
use super::sessions::Sessions;
use crate::ingest::{Decoder, Incoming};
use crate::metrics::EdgeMetrics;

/// A device that takes no replies for this long is cut off.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// What the listener enforces.
#[derive(Debug, Clone)]
pub struct ListenerSettings {
    /// Plain-text listener, if any.
    pub plain: Option<SocketAddr>,
    /// TLS listener and its configuration, if any.
    pub tls: Option<(SocketAddr, Arc<rustls::ServerConfig>)>,
    /// Identities and rights; `None`: an open listener (any client, any device topic).
    pub access: Option<AccessSettings>,
    /// Topic prefix before `devices/{id}/telemetry`.
    pub topic_prefix: String,
    /// Largest packet a device may send.
    pub max_packet: usize,
    /// Largest CONNECT (its will included): a connection that has not yet
    /// said who it is holds no more than this.
    pub max_connect_packet: usize,
    pub max_connections: usize,
    /// The TLS handshake and the CONNECT must both arrive within this.
    pub connect_timeout: Duration,
    /// Unacknowledged QoS 1 and 2 publishes per connection. MQTT 5.0
    /// clients are told (receive maximum); from 3.1.1 clients the listener
    /// stops reading until replies catch up.
    pub receive_maximum: u16,
    /// Each connection's own token bucket, `(per second, burst)`
    /// (`mqtt.max_device_rate`); the excess is quarantined as `rate_limited`.
    pub device_rate: Option<(f64, f64)>,
    /// Fault injection for tests (`KAPPA_EDGE_FAULT_ACK_ON_RECEIPT=1`):
    /// acknowledge each publish as it arrives, before its commit, which
    /// breaks the agent's promise on purpose so the kill and disk tests can
    /// show they would notice. Never set it on a gateway.
    pub ack_on_receipt: bool,
}

/// The bound sockets (bound before the agent reports ready).
pub struct Sockets {
    plain: Option<TcpListener>,
    tls: Option<(TcpListener, tokio_rustls::TlsAcceptor)>,
}

impl std::fmt::Debug for Sockets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let addr = |l: &TcpListener| l.local_addr().ok();
        f.debug_struct("Sockets")
            .field("plain", &self.plain.as_ref().map(addr))
            .field("tls", &self.tls.as_ref().map(|(l, _)| addr(l)))
            .finish()
    }
}

/// Binds the device-facing sockets.
pub async fn bind(settings: &ListenerSettings) -> Result<Sockets, String> {
    let plain = match settings.plain {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|e| format!("MQTT listener cannot listen on {addr} (mqtt.listen): {e}"))?,
        ),
        None => None,
    };
    let tls = match &settings.tls {
        Some((addr, config)) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|e| format!("MQTT TLS listener cannot listen on {addr} (mqtt.tls.listen): {e}"))?;
            Some((l, tokio_rustls::TlsAcceptor::from(config.clone())))
        }
        None => None,
    };
    Ok(Sockets { plain, tls })
}

/// One open connection's share of the listener, counted until it drops.
pub(super) struct Open(Arc<Listener>);

impl std::ops::Deref for Open {
    type Target = Listener;
    fn deref(&self) -> &Listener {
        &self.0
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::AcqRel);
        self.0.metrics.mqtt_connections.dec();
    }
}

/// A running listener's shared state, borrowed by every session.
#[derive(Debug)]
pub struct Listener {
    pub(super) settings: ListenerSettings,
    pub(super) access: Option<Arc<Access>>,
    pub(super) sessions: Sessions,
    pub(super) decoder: Decoder,
    pub(super) to_log: mpsc::Sender<Incoming>,
    pub(super) metrics: Arc<EdgeMetrics>,
    pub(super) stop: CancellationToken,
    open: AtomicUsize,
    client_ids: AtomicU64,
    /// The listener clock's zero (see [`Listener::clock_ms`]).
    started: std::time::Instant,
}

impl Listener {
    /// A listener that hands decoded messages to the writer through `to_log`.
    pub fn new(
        settings: ListenerSettings,
        decoder: Decoder,
        to_log: mpsc::Sender<Incoming>,
        metrics: Arc<EdgeMetrics>,
        stop: CancellationToken,
    ) -> Result<Arc<Self>, String> {
        let access = settings.access.clone().map(Access::new).transpose()?;
        let sessions = Sessions::new(settings.max_connections.saturating_mul(2));
        Ok(Arc::new(Self {
            settings,
            access,
            sessions,
            decoder,
            to_log,
            metrics,
            stop,
            open: AtomicUsize::new(0),
            client_ids: AtomicU64::new(0),
            started: std::time::Instant::now(),
        }))
    }

    /// Accepts devices until the stop token fires, then waits for every
    /// session to end (each with the agent's DISCONNECT in 5.0).
    pub async fn run(self: Arc<Self>, sockets: Sockets) {
        let Sockets { plain, tls } = sockets;
        let tracker = TaskTracker::new();
        let mut loops = tokio::task::JoinSet::new();
        if let Some(l) = plain {
            loops.spawn(self.clone().accept_loop(l, None, tracker.clone()));
        }
        if let Some((l, acceptor)) = tls {
            loops.spawn(self.clone().accept_loop(l, Some(acceptor), tracker.clone()));
        }
        self.metrics.mqtt_connected.set(1);
        // Keep-alives and write timeouts are enforced by one sweep a second
        // over the registry, not by a timer per connection.
        let mut sweep = tokio::time::interval(Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = sweep.tick() => {
                    self.sessions.sweep(self.clock_ms(), WRITE_TIMEOUT);
                }
                _ = loops.join_next() => {
                    if loops.is_empty() {
                        break;
                    }
                }
            }
        }
        self.metrics.mqtt_connected.set(0);
        self.sessions.close_all();
        tracker.close();
        tracker.wait().await;
    }

    /// Milliseconds since the listener started (monotonic).
    pub(super) fn clock_ms(&self) -> u64 {
        u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    async fn accept_loop(
        self: Arc<Self>,
        listener: TcpListener,
        tls: Option<tokio_rustls::TlsAcceptor>,
        tracker: TaskTracker,
    ) {
        while let Some(stream) = kappa_runtime::net::accept(&listener, &self.stop).await {
            if self.open.fetch_add(1, Ordering::AcqRel) >= self.settings.max_connections {
                self.open.fetch_sub(1, Ordering::AcqRel);
                self.refused(Refusal::TooManyConnections, "", stream.peer_addr().ok());
                continue;
            }
            self.metrics.mqtt_connections.inc();
            let _ = stream.set_nodelay(true);
            let open = Open(self.clone());
            match &tls {
                // The session is the task itself: nothing boxed, nothing
                // held but what the session needs (a wrapping future would
                // hold the stream twice).
                None => {
                    let hello = Box::new(Hello {
                        cert_name: None,
                        deadline: tokio::time::Instant::now() + self.settings.connect_timeout,
                        peer: stream.peer_addr().ok(),
                    });
                    tracker.spawn(super::session::serve(open, stream, hello))
                }
                Some(acceptor) => {
                    let acceptor = acceptor.clone();
                    tracker.spawn(async move { open.0.tls_connection(stream, acceptor).await })
                }
            };
        }
    }

    /// A TLS connection: the handshake, then the session. Both are boxed,
    /// each dropped before the next starts (a TLS stream is large).
    async fn tls_connection(&self, stream: TcpStream, acceptor: tokio_rustls::TlsAcceptor) {
        let peer = stream.peer_addr().ok();
        let deadline = tokio::time::Instant::now() + self.settings.connect_timeout;
        let session = match Box::pin(self.handshake(acceptor, stream, deadline, peer)).await {
            Some((stream, cert_name)) => {
                Box::pin(super::session::serve(self, stream, Box::new(Hello { cert_name, deadline, peer })))
            }
            None => return,
        };
        session.await
    }

    /// The TLS handshake and the device's certificate name, or `None` (refused).
    async fn handshake(
        &self,
        acceptor: tokio_rustls::TlsAcceptor,
        stream: TcpStream,
        deadline: tokio::time::Instant,
        peer: Option<SocketAddr>,
    ) -> Option<(tokio_rustls::server::TlsStream<TcpStream>, Option<String>)> {
        match tokio::time::timeout_at(deadline, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => {
                let cert = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
                let name = match cert {
                    None => None,
                    Some(der) => match kappa_runtime::tls::common_name(&der) {
                        Some(name) => Some(name),
                        None => {
                            self.refused(Refusal::NoIdentity, "", peer);
                            return None;
                        }
                    },
                };
                Some((stream, name))
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = peer.map(tracing::field::display), error = %e, "A device's TLS handshake failed.");
                self.refused(Refusal::Tls, "", peer);
                None
            }
            Err(_) => {
                self.refused(Refusal::Timeout, "", peer);
                None
            }
        }
    }

    /// A client id for a client that sent none.
    pub(super) fn next_client_id(&self) -> String {
        format!("kappa-auto-{}", self.client_ids.fetch_add(1, Ordering::Relaxed) + 1)
    }

    /// Counts and logs a refusal (at CONNECT, or a violation that ends a session).
    pub(super) fn refused(&self, why: Refusal, device: &str, peer: Option<SocketAddr>) {
        self.metrics.mqtt_refused.get_or_create(&[("reason", why.reason())]).inc();
        match why {
            // Floods of these are the attack the counter is for: one line each would be a second flood.
            Refusal::TooManyConnections | Refusal::Timeout | Refusal::Tls | Refusal::Closed => {
                tracing::debug!(
                    reason = why.reason(),
                    device,
                    peer = peer.map(tracing::field::display),
                    "Refused a device connection."
                )
            }
            _ => tracing::warn!(
                reason = why.reason(),
                device,
                peer = peer.map(tracing::field::display),
                "Refused a device connection."
            ),
        }
    }

    /// Counts and logs a request outside the device's rights.
    pub(super) fn denied(&self, reason: &'static str, device: &str, topic: &str) {
        self.metrics.mqtt_denied.get_or_create(&[("reason", reason)]).inc();
        tracing::warn!(reason, device, topic, "Denied a device's request outside its rights.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingest::Decoder;

    /// An open listener on nothing, for tests of what it spawns.
    fn listener() -> Arc<Listener> {
        let settings = ListenerSettings {
            plain: None,
            tls: None,
            access: None,
            topic_prefix: String::new(),
            max_packet: 65_536,
            max_connect_packet: 8_192,
            max_connections: 10,
            connect_timeout: Duration::from_secs(1),
            receive_maximum: 10,
            device_rate: None,
            ack_on_receipt: false,
        };
        let metrics = Arc::new(EdgeMetrics::new(&mut prometheus_client::registry::Registry::default()));
        let decoder = Decoder {
            topic_prefix: String::new(),
            limits: Default::default(),
            clock: crate::ingest::config::ClockConfig::default(),
            metrics: metrics.clone(),
            rate: None,
        };
        let (tx, _rx) = mpsc::channel(10);
        Listener::new(settings, decoder, tx, metrics, CancellationToken::new()).unwrap()
    }

    /// The allocator of this crate's unit tests: the system's, noting on
    /// each thread the size of the last allocation aligned to 128 bytes
    /// (tokio's tasks, on x86-64).
    struct NoteAligned;

    thread_local! {
        static LAST_ALIGNED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    }

    // SAFETY: every call is passed on to the system allocator unchanged.
    #[allow(unsafe_code)]
    unsafe impl std::alloc::GlobalAlloc for NoteAligned {
        unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
            if layout.align() == 128 {
                // `try_with`: a thread's locals may be gone while it exits.
                let _ = LAST_ALIGNED.try_with(|c| c.set(layout.size()));
            }
            // SAFETY: the caller's contract for `alloc`, passed on.
            unsafe { std::alloc::System.alloc(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
            // SAFETY: the caller's contract for `dealloc`, passed on.
            unsafe { std::alloc::System.dealloc(ptr, layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: std::alloc::Layout) -> *mut u8 {
            // SAFETY: the caller's contract for `alloc_zeroed`, passed on.
            unsafe { std::alloc::System.alloc_zeroed(layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new_size: usize) -> *mut u8 {
            // SAFETY: the caller's contract for `realloc`, passed on.
            unsafe { std::alloc::System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static ALLOCATOR: NoteAligned = NoteAligned;

    /// Each connection is one task whose future is the session: the task's
    /// allocation is most of what an idle connection costs (10,000 of them
    /// should fit a gateway's 32 MiB with the rest of the agent). Tokio keeps
    /// a task in one allocation aligned to 128 bytes: a session future of
    /// 656 bytes makes one of 768 in a release build; 24 bytes more made it
    /// 896 (1.25 MiB more for 10,000 connections).
    #[tokio::test(flavor = "current_thread")]
    #[cfg(target_arch = "x86_64")]
    async fn a_plain_connections_task_stays_small() {
        let l = listener();
        l.open.fetch_add(1, Ordering::AcqRel);
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(socket.local_addr().unwrap()).await.unwrap();
        let (stream, _) = socket.accept().await.unwrap();
        let hello = Box::new(Hello { cert_name: None, deadline: tokio::time::Instant::now(), peer: None });
        // What `accept_loop` spawns for a plain connection.
        let task = super::super::session::serve(Open(l.clone()), stream, hello);
        let future = std::mem::size_of_val(&task);
        LAST_ALIGNED.with(|c| c.set(0));
        let handle = tokio::spawn(task);
        let allocated = LAST_ALIGNED.with(|c| c.get());
        handle.abort();
        assert!(allocated > 0, "spawning allocated the task with 128-byte alignment");
        if cfg!(debug_assertions) {
            // An unoptimised build lays futures out larger: 672 bytes here
            // when the release build's is 656. Hold that line (the release
            // build's task is checked below when tests run with --release).
            assert!(future <= 672, "a session's future is {future} bytes in a debug build (its task {allocated})");
            assert!(
                allocated <= 896,
                "a session's task takes {allocated} bytes in a debug build (its future {future})"
            );
        } else {
            assert!(allocated <= 768, "a session's task takes {allocated} bytes (its future {future})");
        }
    }
}
