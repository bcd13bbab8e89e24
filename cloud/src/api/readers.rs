//! The API's readers: a few connections to the serving store (`api.readers`),
//! each query on one of them on the blocking pool, with a deadline
//! (`api.query_timeout`). One slow query holds one reader, not the API: the
//! others keep answering. A query that waits longer than the deadline for a
//! reader, or runs longer than it, is answered 503 (`kappa_cloud_api_refused_total`,
//! `readers_busy` / `query_timeout`); a running one is interrupted (SQLite)
//! or cancelled by the server (PostgreSQL's `statement_timeout`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::StatusCode;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ApiError;
use crate::metrics::CloudMetrics;
use crate::store::ServingReader;

/// How often a refused query may be logged.
static LOGGED: kappa_runtime::logging::Throttle = kappa_runtime::logging::Throttle::new(Duration::from_secs(10));

/// The serving store's connections, lent one query at a time.
#[derive(Debug)]
pub struct ReaderPool {
    free: Mutex<Vec<Box<dyn ServingReader>>>,
    permits: Arc<Semaphore>,
    timeout: Duration,
    metrics: Arc<CloudMetrics>,
}

/// A reader lent to one query; back in the pool when dropped, even if the
/// query panicked.
struct Lent {
    reader: Option<Box<dyn ServingReader>>,
    pool: Arc<ReaderPool>,
    /// Held while the query runs; an interrupt is sent only under it, so it
    /// never reaches the next query on this reader.
    running: Arc<Mutex<bool>>,
    _permit: OwnedSemaphorePermit,
}

impl Drop for Lent {
    fn drop(&mut self) {
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = false;
        if let Some(r) = self.reader.take() {
            self.pool.lock().push(r);
        }
    }
}

impl ReaderPool {
    /// A pool of `readers` (at least one).
    pub fn new(readers: Vec<Box<dyn ServingReader>>, timeout: Duration, metrics: Arc<CloudMetrics>) -> Arc<Self> {
        let permits = Arc::new(Semaphore::new(readers.len()));
        Arc::new(Self { free: Mutex::new(readers), permits, timeout, metrics })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Box<dyn ServingReader>>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn refuse(&self, reason: &'static str, msg: String) -> ApiError {
        self.metrics.api_refused.get_or_create(&[("reason", reason)]).inc();
        if LOGGED.ready() {
            tracing::warn!(
                reason,
                timeout = %humantime::format_duration(self.timeout),
                "API queries are answered 503: the readers are busy or the queries slow (at most one line per 10 s; every one is counted)."
            );
        }
        ApiError(StatusCode::SERVICE_UNAVAILABLE, msg)
    }

    /// Runs `f` on a free reader on a blocking thread, within the deadline.
    pub async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&dyn ServingReader) -> Result<T, ApiError> + Send + 'static,
    ) -> Result<T, ApiError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        let permit = match tokio::time::timeout_at(deadline, self.permits.clone().acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) | Err(_) => {
                return Err(self.refuse(
                    "readers_busy",
                    format!("every reader stayed busy for api.query_timeout ({:?}); retry", self.timeout),
                ));
            }
        };
        let Some(reader) = self.lock().pop() else {
            return Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no free reader behind a permit".into()));
        };
        let interrupt = reader.interrupter();
        let running = Arc::new(Mutex::new(true));
        let lent = Lent { reader: Some(reader), pool: self.clone(), running: running.clone(), _permit: permit };
        let mut job = tokio::task::spawn_blocking(move || {
            let out = match &lent.reader {
                Some(r) => f(&**r),
                None => Err(ApiError(StatusCode::INTERNAL_SERVER_ERROR, "no reader".into())),
            };
            drop(lent);
            out
        });
        tokio::select! {
            done = &mut job => done.map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?,
            _ = tokio::time::sleep_until(deadline) => {
                if let Some(interrupt) = interrupt {
                    let still = running.lock().unwrap_or_else(|p| p.into_inner());
                    if *still {
                        interrupt();
                    }
                }
                Err(self.refuse(
                    "query_timeout",
                    format!("the query ran longer than api.query_timeout ({:?}); narrow it or retry", self.timeout),
                ))
            }
        }
    }
}

/// Whether a store error says the server cancelled the statement for its
/// time (PostgreSQL's `statement_timeout`) or SQLite was interrupted.
pub fn timed_out(error: &str) -> bool {
    error.contains("statement timeout") || error.contains("interrupted")
}

#[cfg(test)]
mod tests {
    use std::sync::Condvar;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    use super::*;
    use crate::store::{LateQuery, RowQuery, StoreError, StoredRow, ViewInfo};

    /// What a slow query waits on: opened by the test, or by an interrupt
    /// when the reader obeys them (SQLite does; a server may not at once).
    #[derive(Debug, Default)]
    struct Gate {
        open: Mutex<bool>,
        cv: Condvar,
        obeys: AtomicBool,
    }

    impl Gate {
        fn set(&self, open: bool) {
            *self.open.lock().unwrap() = open;
            self.cv.notify_all();
        }
    }

    /// A reader whose `rows` waits on its gate; its interrupter is counted.
    #[derive(Debug)]
    struct Gated {
        gate: Arc<Gate>,
        interrupts: Arc<AtomicUsize>,
    }

    impl ServingReader for Gated {
        fn resolve_view(&self, name: &str) -> Result<Option<String>, StoreError> {
            Ok(Some(name.to_string()))
        }
        fn rows(&self, _: &RowQuery) -> Result<Vec<StoredRow>, StoreError> {
            let mut open = self.gate.open.lock().unwrap();
            while !*open {
                open = self.gate.cv.wait(open).unwrap();
            }
            Ok(Vec::new())
        }
        fn list_views(&self) -> Result<Vec<ViewInfo>, StoreError> {
            Ok(Vec::new())
        }
        fn late_events(&self, _: &LateQuery) -> Result<Vec<crate::model::LateEvent>, StoreError> {
            Ok(Vec::new())
        }
        fn alerts(
            &self,
            _: &crate::store::alerts::AlertQuery,
        ) -> Result<Vec<crate::store::alerts::AlertView>, StoreError> {
            Ok(Vec::new())
        }
        fn alert(&self, _: &str) -> Result<Option<crate::store::alerts::AlertDetail>, StoreError> {
            Ok(None)
        }
        fn aggregates(
            &self,
            _: &crate::store::aggregates::AggregateQuery,
        ) -> Result<Vec<crate::store::aggregates::AggregateRow>, StoreError> {
            Ok(Vec::new())
        }
        fn interrupter(&self) -> Option<crate::store::Interrupter> {
            let (gate, n) = (self.gate.clone(), self.interrupts.clone());
            Some(Box::new(move || {
                n.fetch_add(1, Ordering::SeqCst);
                if gate.obeys.load(Ordering::SeqCst) {
                    gate.set(true);
                }
            }))
        }
    }

    fn slow_query(r: &dyn ServingReader) -> Result<usize, ApiError> {
        let q = RowQuery { view_id: "v".into(), key: None, from: i64::MIN, to: i64::MAX, after: None, limit: 1 };
        r.rows(&q).map(|rows| rows.len()).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.0))
    }

    fn quick_query(r: &dyn ServingReader) -> Result<usize, ApiError> {
        r.list_views().map(|v| v.len()).map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.0))
    }

    fn refused(m: &CloudMetrics, reason: &'static str) -> u64 {
        m.api_refused.get_or_create(&[("reason", reason)]).get()
    }

    async fn until_free(pool: &ReaderPool, n: usize) {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while pool.lock().len() != n {
            assert!(std::time::Instant::now() < deadline, "{} readers free, waiting for {n}", pool.lock().len());
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Issue 22: one slow query holds one reader while the others answer; a
    /// query past the deadline is interrupted and answered 503, and its
    /// reader comes back; with every reader held, a query waits no longer
    /// than the deadline for one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_slow_query_holds_one_reader_and_is_cut_at_its_deadline() {
        let metrics = Arc::new(CloudMetrics::new(&mut prometheus_client::registry::Registry::default()));
        let interrupts = Arc::new(AtomicUsize::new(0));
        let gates: Vec<Arc<Gate>> = (0..2).map(|_| Arc::new(Gate::default())).collect();
        for g in &gates {
            g.obeys.store(true, Ordering::SeqCst);
        }
        let readers: Vec<Box<dyn ServingReader>> = gates
            .iter()
            .map(|gate| {
                Box::new(Gated { gate: gate.clone(), interrupts: interrupts.clone() }) as Box<dyn ServingReader>
            })
            .collect();
        let pool = ReaderPool::new(readers, Duration::from_secs(2), metrics.clone());
        let stuck = tokio::spawn({
            let pool = pool.clone();
            async move { pool.run(slow_query).await }
        });
        until_free(&pool, 1).await;
        for _ in 0..20 {
            assert_eq!(pool.run(quick_query).await.map_err(|e| e.1), Ok(0), "the other reader answers");
        }
        let err = stuck.await.unwrap().unwrap_err();
        assert_eq!(err.0, StatusCode::SERVICE_UNAVAILABLE, "{}", err.1);
        assert_eq!(interrupts.load(Ordering::SeqCst), 1, "the slow query was interrupted");
        assert_eq!(refused(&metrics, "query_timeout"), 1);
        until_free(&pool, 2).await;

        // Both readers held by queries that ignore interrupts: a third
        // query gets 503 once it waited the deadline for a reader.
        for g in &gates {
            g.obeys.store(false, Ordering::SeqCst);
            g.set(false);
        }
        let held: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                tokio::spawn(async move { pool.run(slow_query).await })
            })
            .collect();
        until_free(&pool, 0).await;
        let err = pool.run(quick_query).await.unwrap_err();
        assert_eq!(err.0, StatusCode::SERVICE_UNAVAILABLE, "{}", err.1);
        assert_eq!(refused(&metrics, "readers_busy"), 1);
        for h in held {
            assert!(h.await.unwrap().is_err(), "cut at the deadline");
        }
        assert_eq!(refused(&metrics, "query_timeout"), 3);
        // The queries finish when the store lets them; the readers return.
        for g in &gates {
            g.set(true);
        }
        until_free(&pool, 2).await;
        assert_eq!(pool.run(quick_query).await.map_err(|e| e.1), Ok(0));
    }
}
