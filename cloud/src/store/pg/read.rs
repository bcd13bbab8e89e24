//! What the API and `views dump` read from the cluster store: pages of rows
//! and late events in the orders the embedded store serves them, the view
//! list, and canonical dumps that compare byte for byte with an embedded
//! node's.

use std::cell::RefCell;

use postgres::Row;
use serde_json::Value as Json;

use super::{Context, PgSettings, PgStore, RawRow, late_reason, to_u32, to_u64};
use crate::model::LateEvent;
use crate::store::aggregates::{AggregateQuery, AggregateRow};
use crate::store::alerts::{AlertDetail, AlertQuery, AlertView, Attempt, Delivery, Outbox};
use crate::store::{AlertAcks, LateQuery, RowQuery, ServingReader, StoreError, StoredRow, ViewInfo, late_dump_line};
use crate::views::spec::{ViewSpec, WindowSpec};

impl PgStore {
    /// A page of one view's rows, as [`crate::store::ViewStore::rows`] pages them.
    pub fn rows_page(&self, q: &RowQuery) -> Result<Vec<StoredRow>, StoreError> {
        self.raw_page(q)?
            .into_iter()
            .map(|(key, window_start, window_end, json)| {
                let values = serde_json::from_str(&json)
                    .map_err(|e| StoreError(format!("stored row {key:?} of {} does not parse: {e}", q.view_id)))?;
                Ok(StoredRow { key, window_start, window_end, values })
            })
            .collect()
    }

    /// A page of rows with their JSON as stored (or as merged from partials).
    pub(super) fn raw_page(&self, q: &RowQuery) -> Result<Vec<RawRow>, StoreError> {
        if let Some(spec) = self.merged_views.get(&q.view_id) {
            return self.merged_page(spec, q);
        }
        let s = &self.s;
        let (after_key, after_start) = q.after.clone().unwrap_or((String::new(), i64::MIN));
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let rows = self
            .client
            .borrow_mut()
            .query(
                &format!(
                    "SELECT key, window_start, window_end, row FROM {s}.view_rows
                     WHERE view_id = $1 AND ($2::text IS NULL OR key = $2) AND window_start >= $3 AND window_start < $4
                       AND (key > $5 OR (key = $5 AND window_start > $6))
                     ORDER BY key, window_start LIMIT $7"
                ),
                &[&q.view_id, &q.key, &q.from, &q.to, &after_key, &after_start, &limit],
            )
            .with_context(|| format!("reading the rows of {}", q.view_id))?;
        rows.iter()
            .map(|r| Ok((r.try_get(0)?, r.try_get(1)?, r.try_get(2)?, r.try_get(3)?)))
            .collect::<Result<_, postgres::Error>>()
            .with_context(|| format!("reading the rows of {}", q.view_id))
    }

    /// A page of a merged view's rows: each window's partials from every
    /// partition, merged ([`merge_partials`]), paged like stored rows. The
    /// window range and the page token go into the SQL, and partials are
    /// fetched a chunk at a time until the page is full, so a page reads
    /// about as many partials as it serves. Session windows are the
    /// exception: partials of different starts merge, so a key's partials
    /// from the page's first key on are read whole and the range applied
    /// after merging.
    fn merged_page(&self, spec: &ViewSpec, q: &RowQuery) -> Result<Vec<RawRow>, StoreError> {
        const CHUNK: i32 = 1024;
        let s = &self.s;
        let session = matches!(spec.window, WindowSpec::Session { .. });
        let (after_key, after_start) = q.after.clone().unwrap_or((String::new(), i64::MIN));
        let (lo, hi, skip_to) = if session { (i64::MIN, i64::MAX, i64::MIN) } else { (q.from, q.to, after_start) };
        let what = || format!("reading the partials of {}", q.view_id);
        let mut client = self.client.borrow_mut();
        let mut tx = client.transaction().with_context(what)?;
        let portal = tx
            .bind(
                &format!(
                    "SELECT key, window_start, state FROM {s}.view_partials
                     WHERE view_id = $1 AND ($2::text IS NULL OR key = $2)
                       AND window_start >= $3 AND window_start < $4
                       AND (key > $5 OR (key = $5 AND window_start > $6))
                     ORDER BY key, window_start, part"
                ),
                &[&q.view_id, &q.key, &lo, &hi, &after_key, &skip_to],
            )
            .with_context(what)?;
        let merge = self.merge.ok_or_else(|| StoreError(format!("{} is merged, but no merge was given", q.view_id)))?;
        let mut out: Vec<RawRow> = Vec::new();
        // The partials of the window (or, for sessions, the key) being read.
        let mut group: Option<(String, i64)> = None;
        let mut wins: Vec<Vec<u8>> = Vec::new();
        let flush = |key: &str, wins: Vec<Vec<u8>>, out: &mut Vec<RawRow>| -> Result<(), StoreError> {
            for row in merge(spec, key, &wins).map_err(StoreError)? {
                let after = key > after_key.as_str() || row.window_start > after_start;
                if after && row.window_start >= q.from && row.window_start < q.to && out.len() < q.limit {
                    out.push((row.key, row.window_start, row.window_end, row.values));
                }
            }
            Ok(())
        };
        loop {
            let chunk = tx.query_portal(&portal, CHUNK).with_context(what)?;
            self.partials_fetched.set(self.partials_fetched.get() + chunk.len() as u64);
            let last_chunk = chunk.len() < CHUNK as usize;
            for r in chunk {
                let k: String = r.try_get(0).with_context(what)?;
                let start: i64 = r.try_get(1).with_context(what)?;
                let win: Vec<u8> = r.try_get(2).with_context(what)?;
                let this = (k, if session { i64::MIN } else { start });
                if group.as_ref() != Some(&this) {
                    if let Some((done, _)) = group.take() {
                        flush(&done, std::mem::take(&mut wins), &mut out)?;
                        if out.len() >= q.limit {
                            return Ok(out);
                        }
                    }
                    group = Some(this);
                }
                wins.push(win);
            }
            if last_chunk {
                break;
            }
        }
        if let Some((done, _)) = group {
            flush(&done, wins, &mut out)?;
        }
        Ok(out)
    }

    /// Every view version the workers registered, with its pipeline's state
    /// (`retired` for a version the last worker to start did not run) and
    /// its rows counted.
    pub fn list_views(&self) -> Result<Vec<ViewInfo>, StoreError> {
        self.views(true)
    }

    /// [`Self::list_views`]; `counted`: with the rows counted (which reads
    /// every row and partial of every view).
    pub fn views(&self, counted: bool) -> Result<Vec<ViewInfo>, StoreError> {
        let s = &self.s;
        let count = if counted {
            format!(
                "(SELECT count(*) FROM {s}.view_rows r WHERE r.view_id = v.view_id)
                 + (SELECT count(*) FROM (SELECT DISTINCT key, window_start FROM {s}.view_partials p
                                          WHERE p.view_id = v.view_id) d)"
            )
        } else {
            "NULL::bigint".to_string()
        };
        let rows = self
            .client
            .borrow_mut()
            .query(
                &format!(
                    "SELECT v.name, v.version, v.view_id, v.definition, a.version IS NOT NULL, v.retired,
                            coalesce(p.state, ''), coalesce(p.detail, ''), v.pipeline, {count}
                     FROM {s}.views v
                     LEFT JOIN {s}.view_aliases a ON a.name = v.name AND a.version = v.version
                     LEFT JOIN {s}.pipelines p ON p.pipeline = v.pipeline
                     ORDER BY v.name, v.version"
                ),
                &[],
            )
            .context("listing the views")?;
        rows.iter()
            .map(|r| {
                let definition: String = r.try_get(3).context("listing the views")?;
                let retired: bool = r.try_get(5).context("listing the views")?;
                let state: String = r.try_get(6).context("listing the views")?;
                Ok(ViewInfo {
                    name: r.try_get(0).context("listing the views")?,
                    version: to_u32(r.try_get(1).context("listing the views")?, "view version")?,
                    id: r.try_get(2).context("listing the views")?,
                    current: r.try_get(4).context("listing the views")?,
                    state: if retired { "retired".to_string() } else { state },
                    detail: r.try_get(7).context("listing the views")?,
                    pipeline: r.try_get(8).context("listing the views")?,
                    rows: r
                        .try_get::<_, Option<i64>>(9)
                        .context("listing the views")?
                        .map(|n| to_u64(n, "row count"))
                        .transpose()?,
                    definition: serde_json::from_str(&definition).unwrap_or(Json::Null),
                })
            })
            .collect()
    }

    /// A page of late events, as [`crate::store::ViewStore::late_events`] pages them.
    pub fn late_page(&self, q: &LateQuery) -> Result<Vec<LateEvent>, StoreError> {
        let s = &self.s;
        let (a_ts, a_view, a_p, a_o, a_w) = q.after.clone().unwrap_or((i64::MIN, String::new(), 0, 0, i64::MIN));
        let (a_p, a_o) = (i64::from(a_p), i64::try_from(a_o).unwrap_or(i64::MAX));
        let limit = i64::try_from(q.limit).unwrap_or(i64::MAX);
        let rows = self
            .client
            .borrow_mut()
            .query(
                &format!(
                    "SELECT view_id, part, log_offset, window_start, device, boot, seq, ts_ms, watermark_ms, reason
                     FROM {s}.late_events
                     WHERE ($1::text IS NULL OR view_id = $1) AND ($2::text IS NULL OR device = $2)
                       AND ts_ms >= $3 AND ts_ms < $4
                       AND (ts_ms, view_id, part, log_offset, window_start) > ($5, $6, $7, $8, $9)
                     ORDER BY ts_ms, view_id, part, log_offset, window_start LIMIT $10"
                ),
                &[&q.view_id, &q.device, &q.from, &q.to, &a_ts, &a_view, &a_p, &a_o, &a_w, &limit],
            )
            .context("reading the late events")?;
        rows.iter().map(late_event).collect()
    }

    /// Every view's rows and the late log, in the format of the embedded
    /// store's `views dump`.
    pub fn dump(&self) -> Result<String, StoreError> {
        let mut out = String::new();
        let mut ids: Vec<String> = self.list_views()?.into_iter().map(|v| v.id).collect();
        ids.sort();
        for id in ids {
            for line in self.dump_rows(&id)?.lines() {
                out.push_str(&format!("{id}\t{line}\n"));
            }
        }
        out.push_str("# late\n");
        for l in self.late_page(&LateQuery::everything(None))? {
            out.push_str(&late_dump_line(&l));
        }
        Ok(out)
    }
}

/// The API's connection to the cluster store. It connects again after
/// PostgreSQL was away (a request meanwhile fails with the store's error).
/// A blocking client owns a runtime of its own, which must not be dropped on
/// an async thread: it is dropped on a thread of its own.
#[derive(Debug)]
pub struct PgReader {
    settings: PgSettings,
    log_partitions: u32,
    specs: Vec<ViewSpec>,
    merge: Option<crate::store::MergePartials>,
    store: RefCell<Option<PgStore>>,
    /// Every statement's limit (the API's `api.query_timeout`).
    statement_timeout: Option<std::time::Duration>,
    /// Off only in the negative control of the PostgreSQL restart test.
    retry: bool,
}

/// Test switch (`fault-injection` builds only): a read that meets a broken
/// connection fails instead of connecting again and retrying (the negative
/// control of `the_first_api_read_after_a_postgresql_restart_is_answered`).
pub const FAULT_NO_READ_RETRY: &str = "KAPPA_TEST_NO_READ_RETRY";

impl PgReader {
    /// A reader over `store` of `specs`, views merged from partials by
    /// `merge` among them (`None`: a reader of no view, for alerts and the
    /// outbox).
    pub fn new(
        settings: PgSettings,
        log_partitions: u32,
        mut store: PgStore,
        specs: Vec<ViewSpec>,
        merge: Option<crate::store::MergePartials>,
    ) -> Self {
        if let Some(m) = merge {
            store.reading_views(&specs, m);
        }
        let retry =
            !kappa_runtime::fault::on(FAULT_NO_READ_RETRY, "the first API read after a PostgreSQL restart fails");
        Self {
            settings,
            log_partitions,
            specs,
            merge,
            store: RefCell::new(Some(store)),
            statement_timeout: None,
            retry,
        }
    }

    /// This reader's statements are cancelled by the server after `timeout`
    /// (on this connection and every one it makes again).
    pub fn with_statement_timeout(mut self, timeout: std::time::Duration) -> Result<Self, StoreError> {
        if let Some(store) = self.store.get_mut() {
            store.limit_statements(timeout)?;
        }
        self.statement_timeout = Some(timeout);
        Ok(self)
    }

    /// Calls `f` with the connection. A connection that broke under the call
    /// (PostgreSQL restarted since the last one) is made again and `f`
    /// called once more, so the first request after a restart is answered.
    fn with<T>(&self, f: impl Fn(&PgStore) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut was_fresh = false;
        let first = self.with_connection(|s, fresh| {
            was_fresh = fresh;
            f(s)
        });
        let broke = || self.store.borrow().as_ref().is_some_and(PgStore::is_closed);
        match first {
            Err(_) if self.retry && !was_fresh && broke() => self.with_connection(|s, _| f(s)),
            other => other,
        }
    }

    /// Calls `f` with the connection and whether it is new (made by this call).
    fn with_connection<T>(&self, f: impl FnOnce(&PgStore, bool) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let mut slot = self.store.borrow_mut();
        let fresh = slot.as_ref().is_none_or(PgStore::is_closed);
        if fresh {
            if let Some(old) = slot.take() {
                std::thread::spawn(move || drop(old));
            }
            let mut store = PgStore::connect(&self.settings, self.log_partitions)?;
            if let Some(m) = self.merge {
                store.reading_views(&self.specs, m);
            }
            if let Some(t) = self.statement_timeout {
                store.limit_statements(t)?;
            }
            *slot = Some(store);
        }
        match slot.as_ref() {
            Some(store) => f(store, fresh),
            None => Err(StoreError("no PostgreSQL connection".into())),
        }
    }
}

impl Drop for PgReader {
    fn drop(&mut self) {
        if let Some(store) = self.store.get_mut().take() {
            std::thread::spawn(move || drop(store));
        }
    }
}

impl ServingReader for PgReader {
    fn resolve_view(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.with(|s| s.resolve_view(name))
    }

    fn rows(&self, q: &RowQuery) -> Result<Vec<StoredRow>, StoreError> {
        self.with(|s| s.rows_page(q))
    }

    fn list_views(&self) -> Result<Vec<ViewInfo>, StoreError> {
        self.with(|s| s.views(false))
    }

    fn late_events(&self, q: &LateQuery) -> Result<Vec<LateEvent>, StoreError> {
        self.with(|s| s.late_page(q))
    }

    fn alerts(&self, q: &AlertQuery) -> Result<Vec<AlertView>, StoreError> {
        self.with(|s| s.alerts(q))
    }

    fn alert(&self, id: &str) -> Result<Option<AlertDetail>, StoreError> {
        self.with(|s| s.alert(id))
    }

    fn aggregates(&self, q: &AggregateQuery) -> Result<Vec<AggregateRow>, StoreError> {
        self.with(|s| s.aggregates(q))
    }
}

impl AlertAcks for PgReader {
    fn ack_alert(&mut self, id: &str, by: &str, note: &str, at_ms: i64) -> Result<bool, StoreError> {
        self.with(|s| s.ack_alert(id, by, note, at_ms))
    }
}

/// The deliverers' outbox on a cluster. A target's rows are handed out only
/// while this connection holds the target's delivery lock (taken again after
/// a reconnect), so however many nodes run deliverers, one at a time sends
/// for a target, in order.
#[derive(Debug)]
pub struct PgOutbox {
    reader: PgReader,
    locked: bool,
}

impl PgOutbox {
    pub fn connect(settings: &PgSettings, log_partitions: u32) -> Result<Self, StoreError> {
        let store = PgStore::connect(settings, log_partitions)?;
        Ok(Self { reader: PgReader::new(settings.clone(), log_partitions, store, Vec::new(), None), locked: false })
    }
}

impl Outbox for PgOutbox {
    fn next_delivery(&mut self, target: &str) -> Result<Option<Delivery>, StoreError> {
        let locked = &mut self.locked;
        self.reader.with_connection(|s, fresh| {
            if fresh || !*locked {
                *locked = s.try_lock_deliveries(target)?;
                if !*locked {
                    return Ok(None);
                }
            }
            s.next_delivery(target)
        })
    }

    fn record_attempt(&mut self, a: &Attempt) -> Result<(), StoreError> {
        self.reader.with(|s| s.record_attempt(a))
    }

    fn delivery_counts(&mut self) -> Result<Vec<(String, String, u64)>, StoreError> {
        self.reader.with(PgStore::delivery_counts)
    }
}

/// Every row of a view, in one page.
pub(super) fn all_rows(view_id: &str) -> RowQuery {
    RowQuery {
        view_id: view_id.to_string(),
        key: None,
        from: i64::MIN,
        to: i64::MAX,
        after: None,
        limit: usize::MAX >> 1,
    }
}

/// One row of `late_events` (columns in table order).
pub(super) fn late_event(r: &Row) -> Result<LateEvent, StoreError> {
    let what = "reading a late event";
    let reason: String = r.try_get(9).context(what)?;
    Ok(LateEvent {
        view: r.try_get(0).context(what)?,
        partition: to_u32(r.try_get(1).context(what)?, "partition")?,
        offset: to_u64(r.try_get(2).context(what)?, "offset")?,
        window_start: r.try_get(3).context(what)?,
        device: r.try_get(4).context(what)?,
        boot: to_u32(r.try_get(5).context(what)?, "boot")?,
        // Stored bit for bit (see the module docs).
        seq: r.try_get::<_, i64>(6).context(what)? as u64,
        ts_ms: r.try_get(7).context(what)?,
        watermark_ms: r.try_get(8).context(what)?,
        reason: late_reason(&reason)?,
    })
}
