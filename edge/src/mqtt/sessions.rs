//! Sessions by client id: one connection per client id (a second CONNECT
//! takes the session over and ends the first connection), and whether a
//! returning client still has a session (CONNACK's session-present flag).
//!
//! A publishing device's session holds no messages on the server side: the
//! listener acknowledges a message only once it is in the log, and sends
//! devices nothing to keep. So a session is only its existence and expiry,
//! kept in memory. After an agent restart every session is new (like
//! Mosquitto without persistence); nothing acknowledged depends on it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::close::End;
use super::link::Link;

/// Every session by client id.
#[derive(Debug)]
pub struct Sessions {
    inner: Mutex<Inner>,
    /// Most sessions remembered after their connection ended.
    max_idle: usize,
}

#[derive(Debug, Default)]
struct Inner {
    next_connection: u64,
    by_client: HashMap<Box<str>, Slot>,
    idle: usize,
}

#[derive(Debug)]
struct Slot {
    /// The connection holding the session, and where to ask it to close.
    connection: Option<(u64, Arc<Link>)>,
    /// While idle: when the session expires (`None`: never).
    expires: Option<Instant>,
}

/// A connection's hold on its session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opened {
    pub connection: u64,
    pub session_present: bool,
}

impl Sessions {
    pub fn new(max_idle: usize) -> Self {
        Self { inner: Mutex::default(), max_idle }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A connection for `client_id` starts: it ends any other connection of
    /// that client id (asking it to close) and learns whether a session was
    /// there to resume. `clean` starts a new session either way.
    pub fn open(&self, client_id: &str, clean: bool, link: Arc<Link>, now: Instant) -> Opened {
        let mut inner = self.lock();
        inner.next_connection += 1;
        let connection = inner.next_connection;
        let previous = inner.by_client.remove(client_id);
        let present = match &previous {
            None => false,
            Some(slot) => {
                if let Some((_, other)) = &slot.connection {
                    other.close(End::TakenOver);
                } else {
                    inner.idle -= 1;
                }
                slot.connection.is_some() || slot.expires.is_none_or(|e| e > now)
            }
        };
        inner.by_client.insert(client_id.into(), Slot { connection: Some((connection, link)), expires: None });
        Opened { connection, session_present: present && !clean }
    }

    /// `connection` of `client_id` ended; its session lives on for `expiry`
    /// seconds (`u32::MAX`: until a clean start). A connection already
    /// taken over changes nothing.
    pub fn close(&self, client_id: &str, connection: u64, expiry: u32, now: Instant) {
        let mut inner = self.lock();
        let Some(slot) = inner.by_client.get_mut(client_id) else { return };
        if slot.connection.as_ref().is_none_or(|(c, _)| *c != connection) {
            return;
        }
        if expiry == 0 {
            inner.by_client.remove(client_id);
            return;
        }
        slot.connection = None;
        slot.expires = (expiry != u32::MAX).then(|| now + Duration::from_secs(u64::from(expiry)));
        inner.idle += 1;
        if inner.idle > self.max_idle {
            forget_idle(&mut inner, now, self.max_idle);
        }
    }

    /// Asks every connection past its keep-alive or write timeout at
    /// `now_ms` (listener clock) to close; how many were.
    pub fn sweep(&self, now_ms: u64, write_timeout: Duration) -> usize {
        let inner = self.lock();
        let mut closed = 0;
        for (link, why) in inner
            .by_client
            .values()
            .filter_map(|s| s.connection.as_ref())
            .filter_map(|(_, link)| Some((link, link.overdue(now_ms, write_timeout)?)))
        {
            link.close(why);
            closed += 1;
        }
        closed
    }

    /// Asks every connection to close (the agent is stopping).
    pub fn close_all(&self) {
        for (_, link) in self.lock().by_client.values().filter_map(|s| s.connection.as_ref()) {
            link.close(End::Shutdown);
        }
    }

    /// Connections holding a session now.
    #[cfg(test)]
    fn connected(&self) -> usize {
        let inner = self.lock();
        inner.by_client.len() - inner.idle
    }
}

/// Drops expired idle sessions, then (if still over `max`) any idle ones.
fn forget_idle(inner: &mut Inner, now: Instant, max: usize) {
    let before = inner.by_client.len();
    inner.by_client.retain(|_, s| s.connection.is_some() || s.expires.is_none_or(|e| e > now));
    inner.idle -= before - inner.by_client.len();
    if inner.idle > max {
        let mut excess = inner.idle - max / 2;
        tracing::warn!(idle = inner.idle, forgotten = excess, "Too many idle MQTT sessions; forgetting some.");
        inner.by_client.retain(|_, s| {
            let forget = excess > 0 && s.connection.is_none();
            excess -= usize::from(forget);
            !forget
        });
        inner.idle = inner.by_client.values().filter(|s| s.connection.is_none()).count();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> Arc<Link> {
        Arc::new(Link::new(Some(Duration::from_secs(1)), 0))
    }

    #[test]
    fn the_sweep_closes_silent_connections_and_shutdown_closes_all() {
        let s = Sessions::new(10);
        let now = Instant::now();
        let (quiet, busy) = (link(), link());
        s.open("quiet", true, quiet.clone(), now);
        s.open("busy", true, busy.clone(), now);
        busy.heard(900);
        assert_eq!(s.sweep(1_500, Duration::from_secs(30)), 1);
        assert_eq!((quiet.closing(), busy.closing()), (Some(End::KeepAlive), None));
        s.close_all();
        assert_eq!(busy.closing(), Some(End::Shutdown));
    }

    #[test]
    fn a_second_connect_with_the_same_client_id_ends_the_first() {
        let s = Sessions::new(10);
        let now = Instant::now();
        let (first, second) = (link(), link());
        let a = s.open("dev-1", true, first.clone(), now);
        let b = s.open("dev-1", true, second.clone(), now);
        assert_eq!((first.closing(), second.closing()), (Some(End::TakenOver), None), "the first was asked to close");
        assert_ne!(a.connection, b.connection);
        // The first connection's end does not end the second's session.
        s.close("dev-1", a.connection, u32::MAX, now);
        assert_eq!(s.connected(), 1);
        assert!(s.open("dev-1", false, link(), now).session_present);
    }

    #[test]
    fn session_present_follows_clean_start_and_expiry() {
        let s = Sessions::new(10);
        let now = Instant::now();
        let first = s.open("dev-1", false, link(), now);
        assert!(!first.session_present, "nothing to resume the first time");
        s.close("dev-1", first.connection, 60, now);
        let again = s.open("dev-1", false, link(), now + Duration::from_secs(59));
        assert!(again.session_present, "within its expiry");
        s.close("dev-1", again.connection, 60, now);
        assert!(!s.open("dev-1", false, link(), now + Duration::from_secs(61)).session_present);
        let clean = s.open("dev-1", true, link(), now);
        assert!(!clean.session_present, "a clean start never resumes");
        s.close("dev-1", clean.connection, 0, now);
        assert!(!s.open("dev-1", false, link(), now).session_present, "expiry 0 ends it");
    }

    #[test]
    fn idle_sessions_are_bounded() {
        let s = Sessions::new(100);
        let now = Instant::now();
        for i in 0..1000 {
            let id = format!("dev-{i}");
            let o = s.open(&id, false, link(), now);
            s.close(&id, o.connection, u32::MAX, now);
        }
        let inner = s.lock();
        assert!(inner.by_client.len() <= 100 && inner.idle == inner.by_client.len(), "{}", inner.by_client.len());
    }
}
