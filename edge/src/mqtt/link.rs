//! What one device connection shares with the rest of the agent: the log
//! writer hands it the replies its committed messages earned, and the
//! session registry asks it to close (a takeover, the keep-alive or write
//! timeout, shutdown). The connection's task waits on one [`Notify`] for
//! all of it, so an idle connection holds no timer and no other future.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::Notify;

use super::close::End;
use crate::ingest::{Reply, ReplyTo};

/// A device connection's mailbox and activity.
#[derive(Debug)]
pub struct Link {
    queue: Mutex<Queue>,
    wake: Notify,
    /// 1.5 times the device's keep-alive, in ms (0: none).
    keep_alive_ms: u64,
    /// When the device was last heard (or last given a reply), listener clock in ms.
    heard_ms: AtomicU64,
    /// While a write waits on the device: since when (listener clock, ms + 1); 0: no write waits.
    writing_since_ms: AtomicU64,
}

#[derive(Debug, Default)]
struct Queue {
    replies: Vec<Reply>,
    close: Option<End>,
}

impl Link {
    pub fn new(keep_alive: Option<Duration>, now_ms: u64) -> Self {
        Self {
            queue: Mutex::default(),
            wake: Notify::new(),
            keep_alive_ms: keep_alive.map_or(0, |k| u64::try_from(k.as_millis()).unwrap_or(u64::MAX)),
            heard_ms: AtomicU64::new(now_ms),
            writing_since_ms: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks the connection to end its session (the first reason wins),
    /// wherever its task waits.
    pub fn close(&self, why: End) {
        self.lock().close.get_or_insert(why);
        self.wake.notify_waiters();
        self.wake.notify_one();
    }

    /// Completes when replies may have been queued, or a close asked, since
    /// the last wake.
    pub fn notified(&self) -> tokio::sync::futures::Notified<'_> {
        self.wake.notified()
    }

    /// Hands every queued reply, in commit order, to `each`: how many; or
    /// the reason to end the session instead, if one was asked.
    pub fn take(&self, mut each: impl FnMut(Reply)) -> Result<usize, End> {
        let mut q = self.lock();
        if let Some(end) = q.close {
            return Err(end);
        }
        let n = q.replies.len();
        q.replies.drain(..).for_each(&mut each);
        // A quiet connection (one reply at a time) keeps no buffer; a busy one keeps a small one.
        if n <= 1 || q.replies.capacity() > 64 {
            q.replies = Vec::new();
        }
        Ok(n)
    }

    /// The reason to end the session, if one was asked.
    pub fn closing(&self) -> Option<End> {
        self.lock().close
    }

    /// The device was heard from (or given replies) at `now_ms`.
    pub fn heard(&self, now_ms: u64) {
        self.heard_ms.store(now_ms, Ordering::Relaxed);
    }

    /// A write to the device starts (`Some(now_ms)`) or finished (`None`).
    pub fn writing(&self, since_ms: Option<u64>) {
        self.writing_since_ms.store(since_ms.map_or(0, |t| t + 1), Ordering::Relaxed);
    }

    /// Why the connection should end at `now_ms`, if it should: silent past
    /// its keep-alive, or a write waiting longer than `write_timeout`.
    pub fn overdue(&self, now_ms: u64, write_timeout: Duration) -> Option<End> {
        let writing = self.writing_since_ms.load(Ordering::Relaxed);
        if writing > 0 && now_ms.saturating_sub(writing - 1) > write_timeout.as_millis() as u64 {
            return Some(End::WriteTimeout);
        }
        let silent = now_ms.saturating_sub(self.heard_ms.load(Ordering::Relaxed));
        (writing == 0 && self.keep_alive_ms > 0 && silent > self.keep_alive_ms).then_some(End::KeepAlive)
    }
}

impl ReplyTo for Link {
    /// Queues `reply`; wakes the connection if it had nothing queued.
    fn reply(&self, reply: Reply) {
        let mut q = self.lock();
        q.replies.push(reply);
        let first = q.replies.len() == 1 && q.close.is_none();
        drop(q);
        if first {
            self.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRITE: Duration = Duration::from_secs(30);

    #[test]
    fn a_silent_device_is_overdue_after_its_keep_alive_and_only_then() {
        let link = Link::new(Some(Duration::from_secs(45)), 1_000);
        assert_eq!(link.overdue(46_000, WRITE), None);
        assert_eq!(link.overdue(46_001, WRITE), Some(End::KeepAlive));
        link.heard(40_000);
        assert_eq!(link.overdue(46_001, WRITE), None, "heard again");
        assert_eq!(Link::new(None, 0).overdue(u64::MAX / 2, WRITE), None, "no keep-alive, no limit");
    }

    #[test]
    fn a_write_the_device_does_not_take_is_overdue_after_the_write_timeout() {
        let link = Link::new(None, 0);
        link.writing(Some(0));
        assert_eq!(link.overdue(30_000, WRITE), None);
        assert_eq!(link.overdue(30_001, WRITE), Some(End::WriteTimeout));
        link.writing(None);
        assert_eq!(link.overdue(90_000, WRITE), None);
    }

    #[test]
    fn replies_wake_once_and_a_close_wins_over_them() {
        let link = Link::new(None, 0);
        let r = Reply { pkid: 1, exactly_once: false, code: 0 };
        link.reply(r);
        link.reply(Reply { pkid: 2, ..r });
        let mut taken = Vec::new();
        assert_eq!(link.take(|r| taken.push(r.pkid)), Ok(2));
        assert_eq!(taken, [1, 2], "in commit order");
        link.close(End::TakenOver);
        link.close(End::Shutdown);
        assert_eq!(link.take(|_| {}), Err(End::TakenOver), "the first reason wins");
    }
}
