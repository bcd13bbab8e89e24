//! The serving and checkpoint stores: the types and traits both backends
//! share. [`sqlite`] is the embedded store ([`ViewStore`], one file beside
//! the embedded event log); [`pg`] the cluster store in PostgreSQL.
//!
//! Both write everything a checkpoint holds (rows, state, dedup, late
//! events, log positions) in one transaction, so they always agree.

use std::collections::BTreeMap;

use serde_json::Value as Json;

pub mod aggregates;
pub mod alerts;
mod at;
pub mod pg;
pub mod sqlite;
pub mod versions;

pub use self::at::StoreAt;
pub use self::sqlite::{StateBytes, ViewStore};

use crate::eventlog::{Offset, Partition};
use crate::model::AlertChanges;
use crate::model::{Changes, LateEvent};
use crate::views::spec::ViewSpec;

/// The pipeline of the views present when the store was created.
pub const MAIN_PIPELINE: &str = "main";

/// One row as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredRow {
    pub key: String,
    pub window_start: i64,
    pub window_end: Option<i64>,
    pub values: Json,
}

/// A view version known to the store.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ViewInfo {
    pub name: String,
    pub version: u32,
    pub id: String,
    /// The version the API serves for this name.
    pub current: bool,
    /// `building`, `live`, `failed` or `retired` (not in the running config).
    pub state: String,
    /// Why a pipeline failed.
    pub detail: String,
    pub pipeline: String,
    /// Rows stored; counted for `kappa-cloud views list`, not for the API
    /// (a count reads the whole view).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    pub definition: Json,
}

/// Which views each pipeline computes.
#[derive(Debug, Clone)]
pub struct PipelinePlan {
    pub pipeline: String,
    pub views: Vec<ViewSpec>,
    /// Replaying history: read the archive, then the log.
    pub building: bool,
}

/// Everything one checkpoint writes.
#[derive(Debug, Default)]
pub struct Checkpoint {
    pub pipeline: String,
    /// The pipeline caught up with the log: mark it live.
    pub caught_up: bool,
    /// Records the pipeline's source skipped as damaged, so far.
    pub skipped: u64,
    pub views: Vec<ViewChanges>,
    pub dedup_upserts: Vec<(String, u32, Vec<u8>)>,
    pub dedup_deletes: Vec<(String, u32)>,
    pub partitions: Vec<(Partition, Offset, Option<i64>)>,
    pub global_watermark: Option<i64>,
    pub late: Vec<LateEvent>,
    /// The alert operator's part, in the alert pipeline.
    pub alerts: Option<AlertChanges>,
    /// Edge aggregate partials to merge, in the aggregates pipeline.
    pub aggregates: Vec<aggregates::AggregatePart>,
}

impl Checkpoint {
    pub fn rows_written(&self) -> usize {
        self.views.iter().map(|v| v.changes.row_upserts.len()).sum()
    }
}

/// What one view (or, on a cluster worker, one view's share of one
/// partition) changed since the last checkpoint.
#[derive(Debug, Default)]
pub struct ViewChanges {
    pub view: String,
    /// `Some` when the state is kept per partition (cluster workers).
    pub partition: Option<Partition>,
    pub changes: Changes,
    /// The watermark up to which windows are closed.
    pub closed_through: Option<i64>,
    /// The changes are partials ([`Changes::partial_upserts`], and row
    /// deletes meaning partials) that a reader merges across partitions.
    pub merged: bool,
}

/// What the processor needs from a store: its last checkpoint back, and a
/// place to write the next one atomically. The embedded store is
/// [`ViewStore`] (SQLite); cluster workers use [`pg::PgStore`].
pub trait ProcessorStore: Send + 'static {
    /// A pipeline's positions, watermarks and dedup state.
    fn restore(&self, pipeline: &str) -> Result<Restored, StoreError>;
    /// One view's open windows and closing watermark; per partition when
    /// `partition` is given.
    fn view_state(&self, view_id: &str, partition: Option<Partition>) -> Result<ViewState, StoreError>;
    /// The alert operator's state.
    fn alert_state(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Writes everything in `cp` in one transaction, or nothing.
    fn checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError>;
}

/// What the API reads: the embedded store, or PostgreSQL on a cluster.
pub trait ServingReader: Send + std::fmt::Debug {
    /// The view id a name (through its alias) or `name@version` refers to.
    fn resolve_view(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// A page of one view's rows.
    fn rows(&self, q: &RowQuery) -> Result<Vec<StoredRow>, StoreError>;
    /// Every view version the store knows.
    fn list_views(&self) -> Result<Vec<ViewInfo>, StoreError>;
    /// A page of late events.
    fn late_events(&self, q: &LateQuery) -> Result<Vec<LateEvent>, StoreError>;
    /// A page of alerts, newest first.
    fn alerts(&self, q: &alerts::AlertQuery) -> Result<Vec<alerts::AlertView>, StoreError>;
    /// One alert with its history and deliveries.
    fn alert(&self, id: &str) -> Result<Option<alerts::AlertDetail>, StoreError>;
    /// A page of merged edge aggregates.
    fn aggregates(&self, q: &aggregates::AggregateQuery) -> Result<Vec<aggregates::AggregateRow>, StoreError>;
    /// Stops the query running on this reader, from another thread (`None`:
    /// the store bounds its queries itself, as PostgreSQL's `statement_timeout` does).
    fn interrupter(&self) -> Option<Interrupter> {
        None
    }
}

/// Interrupts the query a reader runs (see [`ServingReader::interrupter`]).
pub type Interrupter = Box<dyn Fn() + Send>;

/// View versions as `kappa-cloud views` operates them: the embedded store,
/// or PostgreSQL on a cluster.
pub trait ViewCatalog {
    /// Every view version the store knows.
    fn list_views(&self) -> Result<Vec<ViewInfo>, StoreError>;
    /// Every pipeline's positions: the next offset of each partition.
    fn pipeline_positions(&self) -> Result<BTreeMap<String, BTreeMap<Partition, Offset>>, StoreError>;
    /// A view's rows and its pipeline's positions, read so they agree.
    fn snapshot(&mut self, view_id: &str) -> Result<(Vec<StoredRow>, BTreeMap<Partition, Offset>), StoreError>;
    /// The view id a name (through its alias) or `name@version` refers to.
    fn resolve_view(&self, name: &str) -> Result<Option<String>, StoreError>;
    /// Serves `version` for `name` from now on, atomically for readers.
    fn promote(&mut self, name: &str, version: u32, now_ms: i64) -> Result<(), StoreError>;
    /// Serves the version `name` served before its last promotion; returns it.
    fn rollback(&mut self, name: &str, now_ms: i64) -> Result<u32, StoreError>;
    /// Removes a retired version that is not served; returns its rows removed.
    fn drop_view(&mut self, name: &str, version: u32) -> Result<u64, StoreError>;
    /// `views dump`: one version's rows, or (`None`) every version's rows
    /// and the late events, in one canonical text format, so a cluster and
    /// an embedded node compare byte for byte.
    fn dump_views(&self, view_id: Option<&str>) -> Result<String, StoreError>;
    /// `views dump --alerts`: the alerts, then the edge aggregates.
    fn dump_outputs(&self) -> Result<String, StoreError>;
}

/// Implements [`ViewCatalog`] with a store's own methods of the same names.
macro_rules! view_catalog {
    ($store:ty) => {
        impl $crate::store::ViewCatalog for $store {
            fn list_views(&self) -> Result<Vec<$crate::store::ViewInfo>, $crate::store::StoreError> {
                <$store>::list_views(self)
            }
            fn pipeline_positions(
                &self,
            ) -> Result<
                std::collections::BTreeMap<
                    String,
                    std::collections::BTreeMap<$crate::eventlog::Partition, $crate::eventlog::Offset>,
                >,
                $crate::store::StoreError,
            > {
                <$store>::pipeline_positions(self)
            }
            fn snapshot(
                &mut self,
                view_id: &str,
            ) -> Result<
                (
                    Vec<$crate::store::StoredRow>,
                    std::collections::BTreeMap<$crate::eventlog::Partition, $crate::eventlog::Offset>,
                ),
                $crate::store::StoreError,
            > {
                <$store>::snapshot(self, view_id)
            }
            fn resolve_view(&self, name: &str) -> Result<Option<String>, $crate::store::StoreError> {
                <$store>::resolve_view(self, name)
            }
            fn promote(&mut self, name: &str, version: u32, now_ms: i64) -> Result<(), $crate::store::StoreError> {
                <$store>::promote(self, name, version, now_ms)
            }
            fn rollback(&mut self, name: &str, now_ms: i64) -> Result<u32, $crate::store::StoreError> {
                <$store>::rollback(self, name, now_ms)
            }
            fn drop_view(&mut self, name: &str, version: u32) -> Result<u64, $crate::store::StoreError> {
                <$store>::drop_view(self, name, version)
            }
            fn dump_views(&self, view_id: Option<&str>) -> Result<String, $crate::store::StoreError> {
                <$store>::dump_views(self, view_id)
            }
            fn dump_outputs(&self) -> Result<String, $crate::store::StoreError> {
                Ok(format!("# alerts\n{}# aggregates\n{}", self.dump_alerts()?, self.dump_aggregates()?))
            }
        }
    };
}
pub(crate) use view_catalog;

/// Where the API writes acknowledgements of alerts.
pub trait AlertAcks: Send + std::fmt::Debug {
    /// Acknowledges an alert; false if there is no such alert.
    fn ack_alert(&mut self, id: &str, by: &str, note: &str, at_ms: i64) -> Result<bool, StoreError>;
}

/// What the processor restores.
#[derive(Debug, Default)]
pub struct Restored {
    pub partitions: BTreeMap<Partition, (Offset, Option<i64>)>,
    pub global_watermark: Option<i64>,
    pub dedup: Vec<(String, u32, Vec<u8>)>,
}

/// A view's restored state: the watermark it closed through, and its open
/// windows, each as the view's operator encoded it (the store keeps window
/// state without reading it).
pub type ViewState = (Option<i64>, Vec<(String, Vec<u8>)>);

/// Merges one key's partial window states (as the view's operator encoded
/// them, one per partition and window) into the rows readers serve. The
/// views layer gives it (`views::operator::merge_encoded`) to a store that
/// serves views merged from partials, so the store never decodes window
/// state and does not depend on the operators.
pub type MergePartials = fn(&ViewSpec, &str, &[Vec<u8>]) -> Result<Vec<crate::model::Row>, String>;

/// One late event as `views dump` prints it.
pub fn late_dump_line(l: &LateEvent) -> String {
    format!("{}\t{}\t{}\t{}\t{}\t{}\n", l.view, l.device, l.seq, l.ts_ms, l.window_start, l.reason)
}

/// A page of rows to read.
#[derive(Debug, Clone)]
pub struct RowQuery {
    pub view_id: String,
    pub key: Option<String>,
    pub from: i64,
    pub to: i64,
    pub after: Option<(String, i64)>,
    pub limit: usize,
}

/// A page of late events to read.
#[derive(Debug, Clone)]
pub struct LateQuery {
    pub view_id: Option<String>,
    pub device: Option<String>,
    pub from: i64,
    pub to: i64,
    /// `(ts_ms, view_id, partition, offset, window_start)` of the last event of the previous page.
    pub after: Option<(i64, String, Partition, Offset, i64)>,
    pub limit: usize,
}

impl LateQuery {
    /// Every late event (of one view, or of all), in one page.
    pub fn everything(view_id: Option<String>) -> Self {
        Self { view_id, device: None, from: i64::MIN, to: i64::MAX, after: None, limit: usize::MAX >> 1 }
    }
}

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
#[error("serving store: {0}")]
pub struct StoreError(pub String);

/// A result row of either store, SQLite or PostgreSQL, read by column, so
/// the alert, delivery and aggregate rows are built by one function each.
pub(crate) trait Columns {
    type Error;
    fn col<T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>>(
        &self,
        i: usize,
    ) -> Result<T, Self::Error>;
}

impl Columns for postgres::Row {
    type Error = postgres::Error;
    fn col<T: rusqlite::types::FromSql + for<'a> postgres::types::FromSql<'a>>(
        &self,
        i: usize,
    ) -> Result<T, postgres::Error> {
        self.try_get(i)
    }
}
