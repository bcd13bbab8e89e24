//! Where the serving and checkpoint store lives, and the one place that
//! turns that into a backend: the embedded SQLite file or the cluster's
//! PostgreSQL. Everything above the store asks a [`StoreAt`] for the side
//! it needs (serving reads, acknowledgements, the view catalog, the outbox,
//! a pipeline's checkpoints) and never names a backend itself.

use std::path::PathBuf;
use std::time::Duration;

use super::ViewStore;
use super::alerts::Outbox;
use super::pg::{PgOutbox, PgReader, PgSettings, PgStore};
use super::{
    AlertAcks, Checkpoint, MergePartials, ProcessorStore, Restored, ServingReader, StoreError, ViewCatalog, ViewState,
};
use crate::eventlog::Partition;
use crate::views::spec::ViewSpec;

/// The API's side of a store: its readers, and where it writes alert acknowledgements.
pub type Serving = (Vec<Box<dyn ServingReader>>, Box<dyn AlertAcks>);

/// A store's address. Every method blocks (the stores' clients do): call
/// them off the async threads.
#[derive(Debug, Clone)]
pub enum StoreAt {
    /// The embedded store: one SQLite file beside the embedded event log.
    Embedded(PathBuf),
    /// The cluster store in PostgreSQL, over an event log of `log_partitions`.
    Cluster { settings: PgSettings, log_partitions: u32 },
}

impl StoreAt {
    /// `readers` connections the API reads through (views, late events,
    /// alerts, aggregates; `specs` names the views a reader merges from
    /// partials with `merge`), PostgreSQL's with every statement limited to
    /// `query_timeout`, and where it writes alert acknowledgements.
    pub fn serving(
        &self,
        specs: &[ViewSpec],
        merge: MergePartials,
        readers: usize,
        query_timeout: Duration,
    ) -> Result<Serving, StoreError> {
        let mut out: Vec<Box<dyn ServingReader>> = Vec::with_capacity(readers);
        for _ in 0..readers.max(1) {
            out.push(match self {
                Self::Embedded(path) => Box::new(ViewStore::open_read_only(path)?),
                Self::Cluster { settings, log_partitions } => {
                    let store = PgStore::connect(settings, *log_partitions)?;
                    let reader = PgReader::new(settings.clone(), *log_partitions, store, specs.to_vec(), Some(merge));
                    Box::new(reader.with_statement_timeout(query_timeout)?)
                }
            });
        }
        let acks: Box<dyn AlertAcks> = match self {
            Self::Embedded(path) => Box::new(ViewStore::open(path)?),
            Self::Cluster { settings, log_partitions } => {
                let p = *log_partitions;
                Box::new(PgReader::new(settings.clone(), p, PgStore::connect(settings, p)?, Vec::new(), None))
            }
        };
        Ok((out, acks))
    }

    /// View versions as `kappa-cloud views` operates them (`specs` names the
    /// views read merged from partials with `merge`).
    pub fn catalog(&self, specs: &[ViewSpec], merge: MergePartials) -> Result<Box<dyn ViewCatalog>, StoreError> {
        Ok(match self {
            Self::Embedded(path) => Box::new(ViewStore::open(path)?),
            Self::Cluster { settings, log_partitions } => {
                let mut pg = PgStore::connect(settings, *log_partitions)?;
                pg.reading_views(specs, merge);
                Box::new(pg)
            }
        })
    }

    /// View versions for reading only (`views dump`): the embedded file is
    /// opened read-only, beside a running node.
    pub fn dump_reader(&self, specs: &[ViewSpec], merge: MergePartials) -> Result<Box<dyn ViewCatalog>, StoreError> {
        match self {
            Self::Embedded(path) => Ok(Box::new(ViewStore::open_read_only(path)?)),
            Self::Cluster { .. } => self.catalog(specs, merge),
        }
    }

    /// The alert outbox, as a deliverer uses it.
    pub fn outbox(&self) -> Result<Box<dyn Outbox>, StoreError> {
        Ok(match self {
            Self::Embedded(path) => Box::new(ViewStore::open(path)?),
            Self::Cluster { settings, log_partitions } => Box::new(PgOutbox::connect(settings, *log_partitions)?),
        })
    }

    /// The checkpoint store of a pipeline that reads every partition of the
    /// log (a node's alert and edge-aggregate pipelines). On a cluster the
    /// pipeline claims every partition: a node that starts it later fences
    /// this one out (its next checkpoint fails with "fenced:").
    pub fn whole_log_pipeline(&self, pipeline: &str) -> Result<Box<dyn ProcessorStore>, StoreError> {
        Ok(match self {
            Self::Embedded(path) => Box::new(ViewStore::open(path)?),
            Self::Cluster { settings, log_partitions } => {
                let mut store = PgStore::connect(settings, *log_partitions)?;
                store.claim(pipeline, &(0..*log_partitions).collect::<Vec<_>>())?;
                Box::new(store)
            }
        })
    }

    /// Whether a pipeline whose store failed should restore its last
    /// checkpoint and go on: a server can come back (PostgreSQL restarting);
    /// an embedded file that fails will fail again.
    pub fn outlives_failures(&self) -> bool {
        matches!(self, Self::Cluster { .. })
    }
}

impl ProcessorStore for Box<dyn ProcessorStore> {
    fn restore(&self, pipeline: &str) -> Result<Restored, StoreError> {
        (**self).restore(pipeline)
    }

    fn view_state(&self, view_id: &str, partition: Option<Partition>) -> Result<ViewState, StoreError> {
        (**self).view_state(view_id, partition)
    }

    fn alert_state(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        (**self).alert_state()
    }

    fn checkpoint(&mut self, cp: &Checkpoint) -> Result<(), StoreError> {
        (**self).checkpoint(cp)
    }
}
