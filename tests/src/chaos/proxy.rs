//! A TCP proxy that misbehaves on command, between the edge and the cloud:
//! it delays every chunk, resets every open connection, black-holes traffic
//! (holds connections, forwards nothing), or drops the cloud's responses
//! after the cloud has read the request (so the cloud committed a batch the
//! edge never hears about, and must take it again as a duplicate).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the proxy does now; every field can change at any time.
#[derive(Debug, Default)]
pub struct Faults {
    /// Milliseconds each chunk waits before it is forwarded.
    pub delay_ms: AtomicU64,
    /// Forward nothing (connections stay open, silent).
    pub blackhole: AtomicBool,
    /// Close the edge's connection instead of passing the cloud's response.
    pub drop_responses: AtomicBool,
    /// Bumped to reset every connection open now.
    pub resets: AtomicU64,
    /// Responses dropped so far.
    pub dropped: AtomicU64,
}

impl Faults {
    /// Back to a well-behaved proxy.
    pub fn clear(&self) {
        self.delay_ms.store(0, Ordering::SeqCst);
        self.blackhole.store(false, Ordering::SeqCst);
        self.drop_responses.store(false, Ordering::SeqCst);
    }
}

/// Starts the proxy on a free loopback port, forwarding to `upstream`.
pub async fn start(upstream: SocketAddr) -> std::io::Result<(SocketAddr, Arc<Faults>)> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let faults = Arc::new(Faults::default());
    let f = faults.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let f = f.clone();
            tokio::spawn(async move {
                let epoch = f.resets.load(Ordering::SeqCst);
                // A black hole accepts and then forwards nothing.
                while f.blackhole.load(Ordering::SeqCst) {
                    if f.resets.load(Ordering::SeqCst) != epoch {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                let Ok(server) = TcpStream::connect(upstream).await else { return };
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                let up = pump(cr, sw, f.clone(), epoch, false);
                let down = pump(sr, cw, f.clone(), epoch, true);
                // Either side ending (or a fault) ends the connection.
                tokio::select! {
                    _ = up => {}
                    _ = down => {}
                }
            });
        }
    });
    Ok((addr, faults))
}

/// Copies one direction until EOF, an error, a reset, or (the response
/// direction) a dropped response.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    f: Arc<Faults>,
    epoch: u64,
    response: bool,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            n = from.read(&mut buf) => match n {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            },
            _ = until_reset(&f, epoch) => return,
        };
        if response && f.drop_responses.load(Ordering::SeqCst) {
            f.dropped.fetch_add(1, Ordering::SeqCst);
            return;
        }
        while f.blackhole.load(Ordering::SeqCst) {
            if f.resets.load(Ordering::SeqCst) != epoch {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let delay = f.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

async fn until_reset(f: &Faults, epoch: u64) {
    while f.resets.load(Ordering::SeqCst) == epoch {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
