//! The serving store and checkpoint store of cluster workers, in PostgreSQL.
//!
//! Several worker processes share one schema. Each owns some partitions of
//! the event log for a pipeline (say `main`) and checkpoints what it computed
//! from them; the API reads the rows of every worker from the same tables.
//!
//! Layout (all tables in the schema named by [`PgSettings::schema`];
//! `store_meta.schema_version = 2`; a layout-1 store is migrated in place):
//!
//! | table | holds |
//! |---|---|
//! | `store_meta(key, value)` | `schema_version`, and `layout <fingerprint>` for each version of the tables this code creates that was created (a connection to a store that has its own skips the DDL) |
//! | `views(view_id, name, version, definition, created_ms, pipeline, retired)` | every view version a worker ran, with its canonical definition, the pipeline that computes it, and whether the last worker to start still ran it |
//! | `pipelines(pipeline, state, detail, created_ms)` | `main` (live) and one replay pipeline per version added later: `building` until every partition caught up with the log, then `live`; `failed` with the reason |
//! | `view_aliases(name, version)` | which version the API serves for a name |
//! | `alias_history(seq, name, version, at_ms)` | every change of an alias, for `views rollback` |
//! | `view_rows(view_id, key, window_start, window_end, row)` | output rows; `row` is JSON; `window_end` NULL for global windows |
//! | `view_state(view_id, part, key, window_start, state)` | open windows (CBOR) of each log partition, for restore |
//! | `view_partials(view_id, key, window_start, part, window_end, state)` | for views keyed by a tag: each partition's state of each window (CBOR), merged by readers into rows |
//! | `view_meta(view_id, part, closed_through)` | per partition, the watermark up to which windows are closed |
//! | `dedup(pipeline, part, device, boot, state)` | sequence numbers seen per device boot (CBOR); `part` is the device's partition |
//! | `partitions(pipeline, part, next_offset, max_ts, epoch, caught_up)` | where each partition resumes, its max event time, the epoch of its owner's claim, and whether a replay of it reached the log's end |
//! | `late_events(view_id, part, log_offset, window_start, device, boot, seq, ts_ms, watermark_ms, reason)` | readings too late for a window, with the reason |
//! | `members(id, grp, backend_pid, backend_start, lease_until)` | the workers of each group, with the PostgreSQL session that keeps each alive (see [`members`]) |
//! | `alerts`, `alert_events`, `alert_state`, `alert_outbox`, `alert_acks`, `edge_aggregates`, `edge_aggregate_parts`, `pipeline_meta` | see [`alerts`] |
//!
//! `part` is the log partition and `log_offset` a record's offset (`partition`
//! and `offset` are SQL keywords). Every integer is `int8`; a reading's `seq`
//! (a `u64` from the device) is stored bit for bit, as the embedded store does.
//! Text keys use the `"C"` collation, so rows come back in byte order, the
//! order of the embedded SQLite store: [`PgStore::dump_rows`] of a cluster and
//! [`super::ViewStore::dump_rows`] of an embedded node compare byte for byte.
//!
//! # Why state is kept per partition
//!
//! A partition moves from worker to worker when the cluster rebalances. Its
//! new owner must restore exactly that partition's open windows, closing
//! watermark, dedup state and log position, and nothing of the partitions it
//! does not own, which other workers keep changing. Windows close per
//! partition too: a worker's watermark covers only its own partitions. Rows
//! need no partition column: views are keyed by device and a device lives in
//! one partition, so two partitions never write the same row.
//!
//! # Fencing
//!
//! 1. [`PgStore::claim`] takes partitions in one transaction: it bumps each
//!    one's `partitions.epoch` and remembers the new epochs.
//! 2. A checkpoint first updates the `partitions` row of every partition it
//!    touches (its positions, its views' state, late events, the partitions of
//!    its dedup devices) `WHERE epoch = <the epoch this worker claimed>`. A row
//!    that does not match means another worker claimed the partition since:
//!    the transaction rolls back, nothing of the checkpoint is written, and the
//!    error says `fenced`.
//! 3. Those updates take the rows' locks before anything else is written. A
//!    claim that runs at the same time either waits for the checkpoint to
//!    commit (and the new owner then restores it), or the checkpoint waits for
//!    the claim and then finds the epoch moved on. No write of an earlier owner
//!    lands after a claim. Claims and checkpoints lock partitions in ascending
//!    order, so they do not deadlock each other.
//!
//! Once a worker has claimed, nobody else can commit for its partitions, so
//! what it restores (in several calls) is stable.
//!
//! # View versions
//!
//! As on one node (`super::ViewStore::plan_pipelines`): the views of a fresh
//! store form the `main` pipeline; a version added later gets a pipeline of
//! its own (`replay:NAME@VERSION`) that workers compute from offset 0 (the
//! archive, then the log) as a consumer group of its own, beside `main`.
//! Each share that reaches the log's end marks its partitions `caught_up`;
//! when every partition of the log is, the pipeline is `live` and can be
//! promoted. See [`versions`].
//!
//! Connections use TLS when [`PgSettings::ca_file`] (`cluster.postgres_ca`)
//! names the CA that signed the server's certificate: the chain and the host
//! name are verified, and there is no plain-text fallback. Without it they
//! are plain TCP: reach the server over a local socket or a private network.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use postgres::{Client, NoTls};

use super::{StoreError, StoredRow};
use crate::eventlog::{Offset, Partition};
use crate::model::LateEvent;
use crate::views::spec::ViewSpec;

/// Alerts, edge aggregates and global watermarks.
mod alerts;
mod checkpoint;
/// Workers registered in a group, for `cluster.assignment = "postgres"`.
pub mod members;
/// Pages, the view list and dumps, for the API and `views dump`.
mod read;
mod schema;
/// TLS connections, verified against a CA file.
mod tls;
/// Pipelines of view versions, promotion, rollback and dropping.
mod versions;

use checkpoint::keep_last;
pub use read::{FAULT_NO_READ_RETRY, PgOutbox, PgReader};
use schema::{DDL, MIGRATE_1_TO_2, SCHEMA_VERSION};

/// `(key, window_start, window_end, row)` as stored.
type RawRow = (String, i64, Option<i64>, String);

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Where the PostgreSQL store lives.
#[derive(Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgSettings {
    /// libpq-style `host=.. user=.. dbname=..` or a `postgresql://` URL.
    pub url: String,
    /// All tables live in this schema (ASCII letters, digits and `_`).
    pub schema: String,
    /// Connect over TLS, verifying the server against the CA in this PEM file.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

/// Not derived: the URL may hold a password.
impl fmt::Debug for PgSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgSettings")
            .field("url", &"<redacted>")
            .field("schema", &self.schema)
            .field("ca_file", &self.ca_file)
            .finish()
    }
}

/// The partitions this process took, and the epoch of each claim.
#[derive(Debug, Clone)]
struct Claim {
    pipeline: String,
    epochs: BTreeMap<Partition, i64>,
}

/// A connection to the PostgreSQL store, for one worker.
pub struct PgStore {
    /// In a cell because the read methods of [`ProcessorStore`] take `&self`.
    client: RefCell<Client>,
    /// The schema's name, quoted, to qualify tables with.
    s: String,
    schema: String,
    log_partitions: u32,
    claim: Option<Claim>,
    /// Views whose rows readers merge from partials, by view id, and how.
    merged_views: BTreeMap<String, ViewSpec>,
    merge: Option<crate::store::MergePartials>,
    /// Partials fetched from the server by readers (what a page cost).
    partials_fetched: std::cell::Cell<u64>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgStore")
            .field("schema", &self.schema)
            .field("log_partitions", &self.log_partitions)
            .field("claim", &self.claim)
            .finish_non_exhaustive()
    }
}

/// How to connect: the parsed connection string, and the TLS connector
/// when `cluster.postgres_ca` is set (then never plain text). Touches no
/// network: `config check` runs it too.
pub(crate) fn client_config(settings: &PgSettings) -> Result<(postgres::Config, Option<tls::Verified>), StoreError> {
    check_schema_name(&settings.schema)?;
    let mut config: postgres::Config = settings
        .url
        .parse()
        .map_err(|e: postgres::Error| StoreError(format!("the PostgreSQL url does not parse: {e}")))?;
    config.connect_timeout(CONNECT_TIMEOUT);
    // A server that vanished without a word (a node lost, a partition) is
    // noticed in about a minute, not after the kernel's two hours.
    config.keepalives(true);
    config.keepalives_idle(Duration::from_secs(30));
    config.keepalives_interval(Duration::from_secs(10));
    config.keepalives_retries(3);
    if config.get_application_name().is_none() {
        config.application_name("kappa-cloud");
    }
    let verified = match &settings.ca_file {
        Some(ca) => {
            config.ssl_mode(postgres::config::SslMode::Require);
            Some(tls::Verified::new(ca)?)
        }
        None if config.get_ssl_mode() == postgres::config::SslMode::Require => {
            return Err(StoreError(
                "the PostgreSQL connection string asks for sslmode=require: set cluster.postgres_ca to the \
                 PEM file of the CA that signed the server's certificate"
                    .into(),
            ));
        }
        None => None,
    };
    Ok((config, verified))
}

/// A connection to the store's server (TLS when `settings` name a CA),
/// without touching the schema.
pub(crate) fn open_client(settings: &PgSettings) -> Result<Client, StoreError> {
    let (config, verified) = client_config(settings)?;
    let connected = match verified {
        Some(tls) => config.connect(tls),
        None => config.connect(NoTls),
    };
    connected.map_err(|e| {
        let StoreError(msg) = e.into();
        StoreError(format!("cannot connect to PostgreSQL ({}): {msg}", describe_hosts(&config)))
    })
}

/// The `store_meta` key recording that the tables this code creates are
/// there: `layout <fingerprint of the DDL>` (one key per layout, so two
/// versions of the code running during an upgrade do not overwrite each other's).
fn layout_fingerprint() -> String {
    format!("layout {:016x}", fnv64([DDL, MIGRATE_1_TO_2, alerts::DDL].iter().flat_map(|t| t.bytes())))
}

/// Whether the schema holds this code's layout already.
fn layout_is(client: &mut Client, schema: &str, s: &str, layout: &str) -> Result<bool, StoreError> {
    // `check_schema_name` allowed letters, digits and `_` only.
    let meta = format!("\"{schema}\".store_meta");
    let exists: bool = client
        .query_one("SELECT to_regclass($1) IS NOT NULL", &[&meta])
        .and_then(|r| r.try_get(0))
        .context("looking for the schema")?;
    if !exists {
        return Ok(false);
    }
    has_layout(client, s, layout)
}

/// Whether `store_meta` (which exists) records this code's layout.
fn has_layout(client: &mut impl postgres::GenericClient, s: &str, layout: &str) -> Result<bool, StoreError> {
    let found: i64 = client
        .query_one(
            &format!(
                "SELECT count(*) FROM {s}.store_meta
                 WHERE (key = 'schema_version' AND value = $1) OR key = $2"
            ),
            &[&SCHEMA_VERSION, &layout],
        )
        .and_then(|r| r.try_get(0))
        .context("reading the schema version")?;
    Ok(found == 2)
}

/// Creates (or migrates to) this code's layout in one transaction, holding
/// an advisory lock derived from the schema name so that workers starting
/// together do not race on their `CREATE ... IF NOT EXISTS`.
fn create_layout(client: &mut Client, settings: &PgSettings, s: &str, layout: &str) -> Result<(), StoreError> {
    let mut tx = client.transaction().context("starting to create the schema")?;
    // Each CREATE ... IF NOT EXISTS of an existing table sends a notice.
    tx.batch_execute("SET LOCAL client_min_messages = warning").context("quieting notices")?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&settings.schema)])
        .context("waiting for the schema lock")?;
    tx.batch_execute(&format!(
        "CREATE SCHEMA IF NOT EXISTS {s};
             CREATE TABLE IF NOT EXISTS {s}.store_meta (key text COLLATE \"C\" PRIMARY KEY, value int8 NOT NULL);"
    ))
    .context("creating the schema")?;
    if has_layout(&mut tx, s, layout)? {
        // Another worker created it while this one waited for the lock.
        return tx.commit().context("creating the tables");
    }
    let version: Option<i64> = tx
        .query_opt(&format!("SELECT value FROM {s}.store_meta WHERE key = 'schema_version'"), &[])
        .context("reading the schema version")?
        .map(|r| r.try_get(0))
        .transpose()
        .context("reading the schema version")?;
    let migrate = version == Some(1);
    match version {
        Some(1) => {}
        Some(v) if v != SCHEMA_VERSION => {
            return Err(StoreError(format!(
                "the PostgreSQL schema {} has layout version {v}, this version needs {SCHEMA_VERSION}; \
                     use a new schema (every view is rebuilt from the event log)",
                settings.schema
            )));
        }
        Some(_) => {}
        None => {
            tx.execute(
                &format!("INSERT INTO {s}.store_meta (key, value) VALUES ('schema_version', $1)"),
                &[&SCHEMA_VERSION],
            )
            .context("recording the schema version")?;
        }
    }
    tx.batch_execute(&DDL.replace("{s}", s)).context("creating the tables")?;
    if migrate {
        tx.batch_execute(&MIGRATE_1_TO_2.replace("{s}", s)).context("migrating the layout from version 1 to 2")?;
        tracing::info!(schema = %settings.schema, "Migrated the PostgreSQL store's layout from version 1 to 2.");
    }
    tx.batch_execute(&alerts::DDL.replace("{s}", s)).context("creating the alert tables")?;
    tx.execute(
        &format!("INSERT INTO {s}.store_meta (key, value) VALUES ($1, 1) ON CONFLICT (key) DO NOTHING"),
        &[&layout],
    )
    .context("recording the layout")?;
    tx.commit().context("creating the tables")
}

impl PgStore {
    /// Connects and creates the schema and its tables if missing.
    ///
    /// Workers start together: the DDL runs in one transaction holding an
    /// advisory lock derived from the schema name, so their `CREATE ... IF NOT
    /// EXISTS` statements do not race.
    /// Bounds every later statement on this connection to `timeout` (the
    /// server cancels it: "canceling statement due to statement timeout").
    pub fn limit_statements(&self, timeout: Duration) -> Result<(), StoreError> {
        self.set_ms("statement_timeout", timeout)
    }

    /// Ends this connection's session when a transaction of it sits idle
    /// for `timeout` (a stopped process in the middle of a checkpoint):
    /// its row locks would otherwise hold every claim of those partitions.
    pub fn end_idle_transactions_after(&self, timeout: Duration) -> Result<(), StoreError> {
        self.set_ms("idle_in_transaction_session_timeout", timeout)
    }

    fn set_ms(&self, setting: &str, timeout: Duration) -> Result<(), StoreError> {
        let ms = timeout.as_millis().max(1);
        self.client
            .borrow_mut()
            .batch_execute(&format!("SET {setting} = {ms}"))
            .with_context(|| format!("setting {setting}"))
    }

    pub fn connect(settings: &PgSettings, log_partitions: u32) -> Result<Self, StoreError> {
        check_schema_name(&settings.schema)?;
        if log_partitions == 0 {
            return Err(StoreError("the event log needs at least one partition".into()));
        }
        let mut client = open_client(settings)?;
        let s = format!("\"{}\"", settings.schema);
        let layout = layout_fingerprint();
        // Every share a worker takes connects: when the tables are already
        // those of this code, skip the DDL, whose `CREATE INDEX IF NOT
        // EXISTS` locks tables against writers until it commits.
        if !layout_is(&mut client, &settings.schema, &s, &layout)? {
            create_layout(&mut client, settings, &s, &layout)?;
        }
        Ok(Self {
            client: RefCell::new(client),
            s,
            schema: settings.schema.clone(),
            log_partitions,
            claim: None,
            merged_views: BTreeMap::new(),
            merge: None,
            partials_fetched: std::cell::Cell::new(0),
        })
    }

    /// Takes `partitions` of `pipeline` for this process, replacing any
    /// earlier claim of this store. From the moment this commits, a
    /// checkpoint by any process that claimed one of them earlier fails.
    pub fn claim(&mut self, pipeline: &str, partitions: &[Partition]) -> Result<(), StoreError> {
        self.claim = None;
        let wanted: BTreeSet<Partition> = partitions.iter().copied().collect();
        if let Some(p) = wanted.iter().find(|p| **p >= self.log_partitions) {
            return Err(StoreError(format!("cannot claim partition {p}: the event log has {}", self.log_partitions)));
        }
        let s = &self.s;
        let mut tx = self.client.get_mut().transaction().context("starting a claim")?;
        let bump = tx
            .prepare(&format!(
                "INSERT INTO {s}.partitions AS t (pipeline, part, next_offset, max_ts, epoch) VALUES ($1, $2, 0, NULL, 1)
                 ON CONFLICT (pipeline, part) DO UPDATE SET epoch = t.epoch + 1
                 RETURNING epoch"
            ))
            .context("claiming partitions")?;
        let mut epochs = BTreeMap::new();
        // Ascending, like checkpoints: see the module docs.
        for p in wanted {
            let epoch: i64 = tx
                .query_one(&bump, &[&pipeline, &i64::from(p)])
                .and_then(|r| r.try_get(0))
                .with_context(|| format!("claiming partition {p} of pipeline {pipeline}"))?;
            epochs.insert(p, epoch);
        }
        tx.commit().with_context(|| format!("claiming partitions of pipeline {pipeline}"))?;
        self.claim = Some(Claim { pipeline: pipeline.to_string(), epochs });
        Ok(())
    }

    /// Tells a reader the views it serves: those keyed by something other
    /// than the device are merged from their partitions' partials by `merge`.
    pub fn reading_views(&mut self, specs: &[ViewSpec], merge: crate::store::MergePartials) {
        self.merged_views =
            specs.iter().filter(|s| s.key != crate::views::spec::Field::Device).map(|s| (s.id(), s.clone())).collect();
        self.merge = Some(merge);
    }

    /// Whether this store claimed every partition of the log for its pipeline.
    fn claims_every_partition(&self) -> bool {
        self.claim.as_ref().is_some_and(|c| c.epochs.len() == self.log_partitions as usize)
    }

    /// Whether the connection to PostgreSQL was lost.
    pub fn is_closed(&self) -> bool {
        self.client.borrow().is_closed()
    }

    /// The view id a name (through its alias) or `name@version` refers to.
    pub fn resolve_view(&self, name: &str) -> Result<Option<String>, StoreError> {
        let s = &self.s;
        let mut client = self.client.borrow_mut();
        if name.contains('@') {
            return client
                .query_opt(&format!("SELECT view_id FROM {s}.views WHERE view_id = $1"), &[&name])
                .and_then(|r| r.map(|r| r.try_get(0)).transpose())
                .with_context(|| format!("resolving view {name}"));
        }
        let version: Option<i64> = client
            .query_opt(&format!("SELECT version FROM {s}.view_aliases WHERE name = $1"), &[&name])
            .and_then(|r| r.map(|r| r.try_get(0)).transpose())
            .with_context(|| format!("resolving view {name}"))?;
        version.map(|v| Ok(format!("{name}@{}", to_u32(v, "view version")?))).transpose()
    }

    /// All rows of a view, ordered by key (byte order), then window start.
    pub fn all_rows(&self, view_id: &str) -> Result<Vec<StoredRow>, StoreError> {
        self.rows_page(&read::all_rows(view_id))
    }

    /// [`super::ViewCatalog::dump_views`].
    pub fn dump_views(&self, view_id: Option<&str>) -> Result<String, StoreError> {
        match view_id {
            Some(v) => self.dump_rows(v),
            None => self.dump(),
        }
    }

    /// A view's rows as text, in the format of [`super::ViewStore::dump_rows`]
    /// with one view: a cluster and an embedded node compare byte for byte.
    pub fn dump_rows(&self, view_id: &str) -> Result<String, StoreError> {
        let mut out = String::new();
        for (key, start, end, row) in self.raw_page(&read::all_rows(view_id))? {
            let end = end.map_or_else(|| "-".to_string(), |e| e.to_string());
            out.push_str(&format!("{key}\t{start}\t{end}\t{row}\n"));
        }
        Ok(out)
    }

    /// A view's late events, in the order of [`PgStore::late_page`].
    pub fn late_events(&self, view_id: &str) -> Result<Vec<LateEvent>, StoreError> {
        self.late_page(&super::LateQuery::everything(Some(view_id.to_string())))
    }

    /// Where each partition of `pipeline` resumes: its next offset.
    pub fn positions(&self, pipeline: &str) -> Result<BTreeMap<Partition, Offset>, StoreError> {
        let s = &self.s;
        let rows = self
            .client
            .borrow_mut()
            .query(&format!("SELECT part, next_offset FROM {s}.partitions WHERE pipeline = $1"), &[&pipeline])
            .with_context(|| format!("reading the positions of pipeline {pipeline}"))?;
        let mut out = BTreeMap::new();
        for r in &rows {
            let (p, o): (i64, i64) = (r.try_get(0)?, r.try_get(1)?);
            out.insert(to_u32(p, "partition")?, to_u64(o, "offset")?);
        }
        Ok(out)
    }

    /// This store's claim on `pipeline`.
    fn claimed(&self, pipeline: &str) -> Result<&Claim, StoreError> {
        match &self.claim {
            None => Err(StoreError(format!("pipeline {pipeline}: no partitions claimed yet; claim them first"))),
            Some(c) if c.pipeline != pipeline => Err(StoreError(format!(
                "pipeline {pipeline}: this worker claimed partitions of pipeline {} instead",
                c.pipeline
            ))),
            Some(c) => Ok(c),
        }
    }
}

/// The reasons [`crate::views::operator`] gives, back as `&'static str`.
fn late_reason(stored: &str) -> Result<&'static str, StoreError> {
    match stored {
        "late" => Ok("late"),
        "window_closed" => Ok("window_closed"),
        other => Err(StoreError(format!("a stored late event has the unknown reason {other:?}"))),
    }
}

fn check_schema_name(schema: &str) -> Result<(), StoreError> {
    let ok = !schema.is_empty() && schema.len() <= 63 && schema.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError(format!("PostgreSQL schema {schema:?}: use 1 to 63 ASCII letters, digits and underscores")))
    }
}

/// The advisory lock of a schema: FNV-1a of its name, so every worker
/// (whatever its build) derives the same key.
fn lock_key(schema: &str) -> i64 {
    fnv64("kappa-cloud schema ".bytes().chain(schema.bytes()))
}

/// FNV-1a over `bytes`, as an `int8`.
fn fnv64(bytes: impl Iterator<Item = u8>) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h as i64
}

fn describe_hosts(config: &postgres::Config) -> String {
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .map(|h| match h {
            postgres::config::Host::Tcp(name) => name.clone(),
            #[cfg(unix)]
            postgres::config::Host::Unix(path) => path.display().to_string(),
        })
        .collect();
    let db = config.get_dbname().unwrap_or("(default database)");
    format!("host {}, database {db}", if hosts.is_empty() { "(default)".to_string() } else { hosts.join(",") })
}

fn to_u32(v: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(|_| StoreError(format!("stored {what} {v} is out of range")))
}

fn to_u64(v: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError(format!("stored {what} {v} is out of range")))
}

fn to_i64(v: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(v).map_err(|_| StoreError(format!("{what} {v} does not fit in a PostgreSQL int8")))
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        if let Some(db) = e.as_db_error() {
            let mut msg = format!("PostgreSQL {} {}: {}", db.severity(), db.code().code(), db.message());
            if let Some(detail) = db.detail() {
                msg.push_str(&format!("; detail: {detail}"));
            }
            if let Some(hint) = db.hint() {
                msg.push_str(&format!("; hint: {hint}"));
            }
            return StoreError(msg);
        }
        let mut msg = format!("PostgreSQL: {e}");
        let mut source = std::error::Error::source(&e);
        while let Some(cause) = source {
            msg.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        StoreError(msg)
    }
}

/// Says what the store was doing when PostgreSQL failed.
trait Context<T> {
    fn context(self, what: &str) -> Result<T, StoreError>;
    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, StoreError>;
}

impl<T> Context<T> for Result<T, postgres::Error> {
    fn context(self, what: &str) -> Result<T, StoreError> {
        self.map_err(|e| StoreError(format!("{what}: {}", StoreError::from(e).0)))
    }

    fn with_context(self, what: impl FnOnce() -> String) -> Result<T, StoreError> {
        self.map_err(|e| StoreError(format!("{}: {}", what(), StoreError::from(e).0)))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Barrier};

    use kappa_common::partition::partition_for;

    use super::*;
    use crate::store::sqlite::tests::row;
    use crate::store::{Checkpoint, ProcessorStore, ViewChanges};
    use crate::views::operator::{Changes, Row, WinState, merge_encoded};

    pub(super) const LOG_PARTITIONS: u32 = 4;

    fn url() -> String {
        std::env::var("KAPPA_TEST_POSTGRES")
            .unwrap_or_else(|_| "host=127.0.0.1 port=5432 user=postgres dbname=test".to_string())
    }

    /// A schema of its own for one test, dropped before and after (also when
    /// the test fails).
    pub(super) struct TestSchema {
        pub(super) settings: PgSettings,
    }

    impl TestSchema {
        pub(super) fn new(test: &str) -> Self {
            let settings =
                PgSettings { url: url(), schema: format!("kappa_t_{}_{test}", std::process::id()), ca_file: None };
            drop_schema(&settings.schema).unwrap();
            Self { settings }
        }

        pub(super) fn connect(&self) -> PgStore {
            PgStore::connect(&self.settings, LOG_PARTITIONS).unwrap()
        }

        /// A plain connection, to look behind the store's back.
        pub(super) fn raw(&self) -> Client {
            Client::connect(&self.settings.url, NoTls).unwrap()
        }
    }

    impl Drop for TestSchema {
        fn drop(&mut self) {
            let _ = drop_schema(&self.settings.schema);
        }
    }

    fn drop_schema(schema: &str) -> Result<(), postgres::Error> {
        Client::connect(&url(), NoTls)?.batch_execute(&format!("DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"))
    }

    /// A device that lives in partition `p`.
    pub(super) fn device_in(p: Partition) -> String {
        (0..).map(|i| format!("dev-{i}")).find(|d| partition_for(d, LOG_PARTITIONS) == p).unwrap()
    }

    fn win(start: i64) -> WinState {
        WinState { start, last_ts: start + 5, aggs: vec![] }
    }

    fn cbor(w: &WinState) -> Vec<u8> {
        serde_cbor::to_vec(w).unwrap()
    }

    fn view_changes(p: Partition, changes: Changes, closed_through: Option<i64>) -> ViewChanges {
        ViewChanges { view: "v@1".into(), partition: Some(p), changes, closed_through, merged: false }
    }

    fn late_event(p: Partition, offset: Offset, device: &str) -> LateEvent {
        LateEvent {
            view: "v@1".into(),
            partition: p,
            offset,
            window_start: 0,
            device: device.into(),
            boot: 1,
            seq: u64::MAX - 1,
            ts_ms: 10,
            watermark_ms: 70_000,
            reason: "late",
        }
    }

    /// Rows as (key, start, n), in the store's order.
    fn rows_of(s: &PgStore) -> Vec<(String, i64, u64)> {
        s.all_rows("v@1")
            .unwrap()
            .into_iter()
            .map(|r| (r.key, r.window_start, r.values["n"].as_u64().unwrap()))
            .collect()
    }

    /// `v@1` (a global count per device) and `v@2` (the same per minute).
    pub(super) fn two_versions() -> Vec<ViewSpec> {
        views(
            r#"
[[views]]
name = "v"
key = "device"
window = { kind = "global" }
aggregates = [{ name = "n", fn = "count" }]
[[views]]
name = "v"
version = 2
key = "device"
window = { kind = "tumbling", size = "1m" }
aggregates = [{ name = "n", fn = "count" }]
"#,
        )
    }

    pub(super) fn views(toml_text: &str) -> Vec<ViewSpec> {
        let doc: toml::Table = toml::from_str(toml_text).unwrap();
        let tables: Vec<toml::Table> =
            doc["views"].as_array().unwrap().iter().map(|v| v.as_table().unwrap().clone()).collect();
        crate::views::spec::parse_views(&tables, &["temperature".to_string()]).unwrap()
    }

    #[test]
    fn schema_names_are_plain_identifiers() {
        let long = "a".repeat(64);
        for bad in ["", "a-b", "a;drop", "ä", "x\"y", long.as_str()] {
            let settings = PgSettings { url: url(), schema: bad.to_string(), ca_file: None };
            let err = PgStore::connect(&settings, 1).unwrap_err();
            assert!(err.0.contains("ASCII letters"), "{bad:?}: {err}");
        }
        assert!(check_schema_name("Kappa_1").is_ok());
    }

    #[test]
    fn an_upsert_batch_keeps_the_last_of_each_key() {
        let kept = keep_last(vec![("a", 1), ("b", 2), ("a", 3), ("c", 4), ("b", 5)], |(k, _)| *k);
        assert_eq!(kept, [("a", 3), ("c", 4), ("b", 5)]);
    }

    /// Whether the store's own connection is encrypted, as the server sees it.
    fn encrypted(s: &PgStore) -> bool {
        s.client.borrow_mut().query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[]).unwrap().get(0)
    }

    /// The machine's PostgreSQL serves TLS with Debian's snakeoil
    /// certificate (self-signed, for the name `localhost`).
    #[test]
    fn with_a_ca_the_connection_is_encrypted_and_the_server_verified() {
        let snakeoil = std::path::PathBuf::from("/etc/ssl/certs/ssl-cert-snakeoil.pem");
        let schema = format!("kappa_t_{}_tls", std::process::id());
        let settings = |host: &str, ca: Option<std::path::PathBuf>| PgSettings {
            url: format!("host={host} hostaddr=127.0.0.1 port=5432 user=postgres dbname=test"),
            schema: schema.clone(),
            ca_file: ca,
        };
        let s = PgStore::connect(&settings("localhost", Some(snakeoil.clone())), 1).unwrap();
        assert!(encrypted(&s), "TLS with the CA");
        drop(s);
        assert!(!encrypted(&PgStore::connect(&settings("localhost", None), 1).unwrap()), "plain TCP without one");

        // Negative controls: another CA; the right CA but a name the certificate does not carry.
        let dir = tempfile::tempdir().unwrap();
        let other_ca = crate::pki::init(dir.path()).unwrap();
        let err = PgStore::connect(&settings("localhost", Some(other_ca)), 1).unwrap_err();
        assert!(err.0.contains("invalid peer certificate: UnknownIssuer"), "{err}");
        let err = PgStore::connect(&settings("127.0.0.1", Some(snakeoil)), 1).unwrap_err();
        assert!(err.0.contains("certificate not valid for name \"127.0.0.1\""), "{err}");
        let err = PgStore::connect(&PgSettings { url: format!("{} sslmode=require", url()), ..settings("x", None) }, 1)
            .unwrap_err();
        assert!(err.0.contains("cluster.postgres_ca"), "{err}");
        drop_schema(&schema).unwrap();
    }

    #[test]
    fn settings_do_not_show_the_url() {
        let settings = PgSettings { url: "host=x password=secret".into(), schema: "k".into(), ca_file: None };
        assert!(!format!("{settings:?}").contains("secret"));
    }

    #[test]
    fn a_checkpoint_round_trips_per_partition() {
        let db = TestSchema::new("roundtrip");
        let mut a = db.connect();
        let mut b = db.connect();
        a.claim("main", &[0, 1]).unwrap();
        b.claim("main", &[2, 3]).unwrap();
        let (d0, d1, d2) = (device_in(0), device_in(1), device_in(2));
        let cp = Checkpoint {
            pipeline: "main".into(),
            views: vec![
                view_changes(
                    0,
                    Changes {
                        // The second (d0, 0) wins; "Z" < "a" < "dev-" in byte order.
                        row_upserts: vec![
                            row(&d0, 0, 1),
                            row(&d0, 60_000, 1),
                            row(&d0, 0, 2),
                            row("a", 0, 3),
                            row("Z", 0, 4),
                        ],
                        state_upserts: vec![(d0.clone(), 0, cbor(&win(1))), (d0.clone(), 0, cbor(&win(0)))],
                        ..Changes::default()
                    },
                    Some(5),
                ),
                view_changes(
                    1,
                    Changes {
                        row_upserts: vec![Row { window_end: None, ..row(&d1, 0, 7) }],
                        state_upserts: vec![(d1.clone(), 60_000, cbor(&win(60_000)))],
                        ..Changes::default()
                    },
                    None,
                ),
            ],
            dedup_upserts: vec![(d0.clone(), 1, vec![1]), (d1.clone(), 2, vec![9]), (d1.clone(), 2, vec![2])],
            partitions: vec![(0, 10, Some(100)), (1, 20, None)],
            late: vec![late_event(0, 3, &d0), late_event(0, 3, &d0)],
            // Not kept for a share of the partitions: windows close per partition.
            global_watermark: Some(90),
            caught_up: true,
            ..Checkpoint::default()
        };
        a.checkpoint(&cp).unwrap();
        b.checkpoint(&Checkpoint {
            pipeline: "main".into(),
            dedup_upserts: vec![(d2.clone(), 1, vec![7])],
            partitions: vec![(2, 5, Some(50))],
            ..Checkpoint::default()
        })
        .unwrap();

        let r = a.restore("main").unwrap();
        assert_eq!(r.partitions, BTreeMap::from([(0, (10, Some(100))), (1, (20, None))]));
        assert_eq!(r.global_watermark, None);
        let mut dedup = r.dedup;
        dedup.sort();
        let mut want = vec![(d0.clone(), 1, vec![1]), (d1.clone(), 2, vec![2])];
        want.sort();
        assert_eq!(dedup, want, "the dedup state of the claimed partitions only, the last upsert winning");
        assert_eq!(b.restore("main").unwrap().dedup, [(d2.clone(), 1, vec![7])]);

        assert_eq!(a.view_state("v@1", Some(0)).unwrap(), (Some(5), vec![(d0.clone(), cbor(&win(0)))]));
        assert_eq!(a.view_state("v@1", Some(1)).unwrap(), (None, vec![(d1.clone(), cbor(&win(60_000)))]));
        assert_eq!(a.view_state("v@1", Some(2)).unwrap(), (None, vec![]));
        assert!(a.view_state("v@1", None).is_err());
        assert!(a.alert_state().unwrap().is_empty());

        let mut want = vec![
            (d0.clone(), 0, 2),
            (d0.clone(), 60_000, 1),
            (d1.clone(), 0, 7),
            ("a".to_string(), 0, 3),
            ("Z".to_string(), 0, 4),
        ];
        want.sort();
        assert_eq!(rows_of(&a), want);
        let global = a.all_rows("v@1").unwrap().into_iter().find(|r| r.key == d1).unwrap();
        assert_eq!(global.window_end, None);
        let dump = a.dump_rows("v@1").unwrap();
        assert!(dump.starts_with("Z\t0\t60000\t{\"n\":4}\na\t0\t60000\t{\"n\":3}\n"), "{dump}");
        assert!(dump.contains(&format!("{d1}\t0\t-\t{{\"n\":7}}\n")), "{dump}");
        assert_eq!(dump.lines().count(), 5);

        let late = a.late_events("v@1").unwrap();
        assert_eq!(late, [late_event(0, 3, &d0)], "a late event is written once, its seq bit for bit");
        assert_eq!(a.positions("main").unwrap(), BTreeMap::from([(0, 10), (1, 20), (2, 5), (3, 0)]));

        // The same checkpoint again (a retry) changes nothing, not even the row versions.
        let versions = |c: &mut Client| -> Vec<String> {
            c.query(
                &format!("SELECT xmin::text FROM \"{}\".view_rows ORDER BY key, window_start", db.settings.schema),
                &[],
            )
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect()
        };
        let mut raw = db.raw();
        let before = versions(&mut raw);
        a.checkpoint(&cp).unwrap();
        assert_eq!(a.dump_rows("v@1").unwrap(), dump);
        assert_eq!(versions(&mut raw), before);
        assert_eq!(a.late_events("v@1").unwrap().len(), 1);

        // Deletes.
        a.checkpoint(&Checkpoint {
            pipeline: "main".into(),
            views: vec![view_changes(
                0,
                Changes {
                    row_deletes: vec![(d0.clone(), 60_000)],
                    state_deletes: vec![(d0.clone(), 0)],
                    ..Changes::default()
                },
                Some(6),
            )],
            dedup_deletes: vec![(d0.clone(), 1)],
            partitions: vec![(0, 11, Some(100))],
            ..Checkpoint::default()
        })
        .unwrap();
        assert_eq!(rows_of(&a).len(), 4);
        assert!(!rows_of(&a).contains(&(d0.clone(), 60_000, 1)));
        assert_eq!(a.view_state("v@1", Some(0)).unwrap(), (Some(6), vec![]));
        let r = a.restore("main").unwrap();
        assert_eq!(r.dedup, [(d1.clone(), 2, vec![2])]);
        assert_eq!(r.partitions[&0], (11, Some(100)));

        let err = a
            .checkpoint(&Checkpoint {
                pipeline: "main".into(),
                views: vec![ViewChanges { view: "v@1".into(), ..ViewChanges::default() }],
                ..Checkpoint::default()
            })
            .unwrap_err();
        assert!(err.0.contains("per partition"), "{err}");
        let err = a.checkpoint(&Checkpoint { pipeline: "other".into(), ..Checkpoint::default() }).unwrap_err();
        assert!(err.0.contains("claimed partitions of pipeline main"), "{err}");
    }

    #[test]
    fn a_worker_that_lost_a_partition_cannot_commit_for_it() {
        let db = TestSchema::new("fencing");
        let mut a = db.connect();
        let mut b = db.connect();
        let (d0, d1) = (device_in(0), device_in(1));
        let cp = |views: Vec<ViewChanges>, partitions: Vec<(Partition, Offset, Option<i64>)>| Checkpoint {
            pipeline: "main".into(),
            views,
            partitions,
            ..Checkpoint::default()
        };
        let rows = |rows: Vec<Row>| Changes { row_upserts: rows, ..Changes::default() };

        a.claim("main", &[0, 1]).unwrap();
        a.checkpoint(&cp(vec![view_changes(0, rows(vec![row(&d0, 0, 1)]), Some(1))], vec![(0, 5, Some(50))])).unwrap();
        b.claim("main", &[1]).unwrap();

        let both = cp(
            vec![
                view_changes(0, rows(vec![row(&d0, 0, 2)]), Some(2)),
                view_changes(1, rows(vec![row(&d1, 0, 2)]), Some(2)),
            ],
            vec![(0, 9, Some(90)), (1, 9, Some(90))],
        );
        let err = a.checkpoint(&both).unwrap_err();
        assert!(err.0.contains("fenced: partition 1 of pipeline main"), "{err}");
        assert_eq!(rows_of(&a), [(d0.clone(), 0, 1)], "nothing of the fenced checkpoint was written");
        assert_eq!(a.positions("main").unwrap(), BTreeMap::from([(0, 5), (1, 0)]));
        assert_eq!(a.view_state("v@1", Some(0)).unwrap().0, Some(1));

        // Fenced too when the checkpoint carries no position for the partition.
        let err = a.checkpoint(&cp(vec![view_changes(1, rows(vec![row(&d1, 0, 3)]), None)], vec![])).unwrap_err();
        assert!(err.0.contains("fenced"), "{err}");
        let mut dedup_only = cp(vec![], vec![]);
        dedup_only.dedup_upserts = vec![(d1.clone(), 1, vec![1])];
        assert!(a.checkpoint(&dedup_only).unwrap_err().0.contains("fenced"));
        assert!(a.restore("main").unwrap_err().0.contains("fenced"), "a restore notices too");
        let err = a.checkpoint(&cp(vec![view_changes(2, rows(vec![]), None)], vec![])).unwrap_err();
        assert!(err.0.contains("did not claim"), "{err}");

        b.checkpoint(&cp(vec![view_changes(1, rows(vec![row(&d1, 0, 4)]), Some(4))], vec![(1, 7, Some(70))])).unwrap();
        a.checkpoint(&cp(vec![view_changes(0, rows(vec![row(&d0, 0, 5)]), Some(5))], vec![(0, 12, Some(120))]))
            .unwrap();
        assert_eq!(a.positions("main").unwrap(), BTreeMap::from([(0, 12), (1, 7)]));
        let mut want = vec![(d0.clone(), 0, 5), (d1.clone(), 0, 4)];
        want.sort();
        assert_eq!(rows_of(&a), want);
        assert_eq!(b.restore("main").unwrap().partitions, BTreeMap::from([(1, (7, Some(70)))]));
    }

    /// A worker connects for every share it takes. On a store that already
    /// has this code's tables it runs no DDL: `CREATE INDEX IF NOT EXISTS`
    /// would wait for every open transaction writing to the table (another
    /// worker's checkpoint) and hold off the membership's lease renewals.
    #[test]
    fn connecting_to_a_store_of_this_layout_waits_for_no_writer() {
        let db = TestSchema::new("nowait");
        drop(db.connect());
        let mut writer = db.raw();
        let mut tx = writer.transaction().unwrap();
        tx.execute(
            &format!(
                "INSERT INTO \"{}\".dedup (pipeline, part, device, boot, state) VALUES ('main', 0, 'd', 1, '\\x00')",
                db.settings.schema
            ),
            &[],
        )
        .unwrap();
        let (settings, (done, connected)) = (db.settings.clone(), std::sync::mpsc::channel());
        std::thread::spawn(move || {
            let _ = done.send(PgStore::connect(&settings, LOG_PARTITIONS).map(|_| ()));
        });
        // Generous: the connect either returns at once or waits for the writer.
        let outcome = connected.recv_timeout(Duration::from_secs(60));
        tx.rollback().unwrap();
        assert!(matches!(outcome, Ok(Ok(()))), "connecting waited for another session's open write: {outcome:?}");
    }

    #[test]
    fn workers_starting_together_create_the_schema_once() {
        let db = TestSchema::new("ddlrace");
        let start = Arc::new(Barrier::new(3));
        let workers: Vec<_> = (0..3)
            .map(|_| {
                let (settings, start) = (db.settings.clone(), start.clone());
                std::thread::spawn(move || {
                    start.wait();
                    PgStore::connect(&settings, LOG_PARTITIONS).map(|_| ())
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap().unwrap();
        }
        let tables: i64 = db
            .raw()
            .query_one("SELECT count(*) FROM information_schema.tables WHERE table_schema = $1", &[&db.settings.schema])
            .unwrap()
            .get(0);
        assert_eq!(tables, 21, "store_meta and the twenty tables of the module docs");
    }

    #[test]
    fn a_changed_definition_needs_a_new_version() {
        let db = TestSchema::new("views");
        let mut s = db.connect();
        let v1 = two_versions()[..1].to_vec();
        s.plan_pipelines(&v1, 1, true).unwrap();
        s.plan_pipelines(&v1, 2, true).unwrap();
        db.connect().plan_pipelines(&v1, 3, true).unwrap();
        let mut changed = v1.clone();
        changed[0].window = crate::views::spec::WindowSpec::Tumbling { size_ms: 60_000 };
        let err = s.plan_pipelines(&changed, 4, true).unwrap_err();
        assert!(err.0.contains("different definition") && err.0.contains("version = 2"), "{err}");
        changed[0].version = 2;
        s.plan_pipelines(&[v1[0].clone(), changed[0].clone()], 5, true).unwrap();
        assert_eq!(s.resolve_view("v").unwrap().as_deref(), Some("v@1"), "the alias stays on the first version");
        assert_eq!(s.resolve_view("v@2").unwrap().as_deref(), Some("v@2"));
        assert_eq!(s.resolve_view("v@3").unwrap(), None);
        assert_eq!(s.resolve_view("w").unwrap(), None);
        db.raw().execute(&format!("UPDATE \"{}\".view_aliases SET version = 2", db.settings.schema), &[]).unwrap();
        assert_eq!(s.resolve_view("v").unwrap().as_deref(), Some("v@2"), "the alias decides");
    }

    #[test]
    fn a_checkpoint_of_ten_thousand_rows_is_written_whole() {
        let db = TestSchema::new("bulk");
        let mut s = db.connect();
        s.claim("main", &[0, 1]).unwrap();
        let changes = |p: Partition| Changes {
            row_upserts: (0..5_000).map(|i| row(&format!("p{p}-{i:05}"), i * 60_000, 1)).collect(),
            state_upserts: (0..5_000).map(|i| (format!("p{p}-{i:05}"), i * 60_000, cbor(&win(i)))).collect(),
            ..Changes::default()
        };
        let cp = Checkpoint {
            pipeline: "main".into(),
            views: vec![view_changes(0, changes(0), Some(1)), view_changes(1, changes(1), Some(1))],
            partitions: vec![(0, 5_000, Some(1)), (1, 5_000, Some(1))],
            ..Checkpoint::default()
        };
        let started = std::time::Instant::now();
        s.checkpoint(&cp).unwrap();
        eprintln!("10,000 rows and 10,000 states in {:?}", started.elapsed());
        let rows = s.all_rows("v@1").unwrap();
        assert_eq!(rows.len(), 10_000);
        assert_eq!((rows[0].key.as_str(), rows[9_999].key.as_str()), ("p0-00000", "p1-04999"));
        assert_eq!(s.view_state("v@1", Some(1)).unwrap().1.len(), 5_000);
        assert_eq!(s.positions("main").unwrap().values().sum::<u64>(), 10_000);
    }

    /// The API's reader survives PostgreSQL dropping its connection: the
    /// request that finds it gone fails, the next one connects again.
    #[test]
    fn the_api_reader_connects_again_after_its_connection_was_dropped() {
        use crate::store::ServingReader;
        let t = TestSchema::new("reader");
        let reader = PgReader::new(t.settings.clone(), LOG_PARTITIONS, t.connect(), vec![], Some(merge_encoded));
        assert_eq!(reader.list_views().unwrap(), vec![]);
        let mut raw = t.raw();
        // The reader's connection: its last query named this test's schema.
        let killed = raw
            .execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE pid <> pg_backend_pid() AND query LIKE '%' || $1 || '%view_aliases%'",
                &[&t.settings.schema],
            )
            .unwrap();
        assert!(killed >= 1, "the reader's connection was found and terminated");
        let attempts: Vec<bool> = (0..2).map(|_| reader.list_views().is_ok()).collect();
        assert_eq!(attempts.last(), Some(&true), "the reader connects again: {attempts:?}");
    }

    /// A view keyed by a tag: two partitions write partial sessions of one
    /// user, and the reader serves the merged rows, paged.
    #[test]
    fn partials_of_a_tag_keyed_view_are_merged_and_paged_by_the_reader() {
        use crate::views::operator::{Event, ViewOperator};
        let spec = counted_per_user("sessions", crate::views::spec::WindowSpec::Session { gap_ms: 1_000 });
        let db = TestSchema::new("partials");
        let mut store = db.connect();
        store.claim("main", &[0, 1]).unwrap();
        // User u: 0 and 500 in partition 0, 900 in partition 1 (one session);
        // 5,000 in partition 1 (a second one). User v: 100 in partition 0.
        let readings = [(0, "u", 0), (0, "u", 500), (1, "u", 900), (1, "u", 5_000), (0, "v", 100)];
        let mut views = Vec::new();
        for p in [0, 1] {
            let mut op = ViewOperator::new(spec.clone()).keeping_partials();
            for (i, (_, user, ts)) in readings.iter().enumerate().filter(|(_, r)| r.0 == p) {
                let r = kappa_common::reading::Reading {
                    device: device_in(p),
                    boot: 1,
                    seq: i as u64,
                    ts_ms: *ts,
                    schema: 2,
                    metrics: Default::default(),
                    tags: [("user".to_string(), user.to_string())].into(),
                };
                let ev =
                    Event { partition: p, offset: i as u64, gateway: "g", ingest_ms: 0, reading: &r, watermark: None };
                op.process(&ev, &mut Vec::new());
            }
            views.push(ViewChanges { merged: true, ..view_changes(p, op.take_changes(), None) });
        }
        views.iter_mut().for_each(|v| v.view = spec.id());
        let cp = Checkpoint { pipeline: "main".into(), views, ..Checkpoint::default() };
        store.checkpoint(&cp).unwrap();
        store.reading_views(std::slice::from_ref(&spec), crate::views::operator::merge_encoded);
        let page = |after: Option<(String, i64)>| {
            let q = page_query(&spec.id(), after, 2);
            store
                .rows_page(&q)
                .unwrap()
                .into_iter()
                .map(|r| (r.key, r.window_start, r.values["n"].as_u64().unwrap()))
                .collect::<Vec<_>>()
        };
        let first = page(None);
        assert_eq!(first, vec![("u".to_string(), 0, 3), ("u".to_string(), 5_000, 1)]);
        assert_eq!(page(Some(("u".into(), 5_000))), vec![("v".to_string(), 100, 1)]);
        assert_eq!(store.rows_page(&page_query(&spec.id(), None, 100)).unwrap().len(), 3);
    }

    /// Tumbling windows of a tag-keyed view, written as partials by two
    /// partitions: pages by `after`, the window range and a range in the
    /// future are served from SQL-side filters, and more partials than one
    /// fetch holds are read in chunks.
    #[test]
    fn a_merged_view_is_paged_and_ranged_in_sql() {
        use crate::views::operator::{Event, ViewOperator};
        let spec = counted_per_user("per_user", crate::views::spec::WindowSpec::Tumbling { size_ms: 1_000 });
        let db = TestSchema::new("mergedpages");
        let mut store = db.connect();
        store.claim("main", &[0, 1]).unwrap();
        // Users a and b, 700 windows each, a reading per window from each
        // partition (2,800 partials; a window counts 2).
        let mut views = Vec::new();
        for p in [0, 1] {
            let mut op = ViewOperator::new(spec.clone()).keeping_partials();
            let mut offset = 0;
            for user in ["a", "b"] {
                for w in 0..700i64 {
                    let r = kappa_common::reading::Reading {
                        device: device_in(p),
                        boot: 1,
                        seq: offset,
                        ts_ms: w * 1_000 + 10 * i64::from(p),
                        schema: 2,
                        metrics: Default::default(),
                        tags: [("user".to_string(), user.to_string())].into(),
                    };
                    let ev = Event { partition: p, offset, gateway: "g", ingest_ms: 0, reading: &r, watermark: None };
                    op.process(&ev, &mut Vec::new());
                    offset += 1;
                }
            }
            views.push(ViewChanges { merged: true, ..view_changes(p, op.take_changes(), None) });
        }
        views.iter_mut().for_each(|v| v.view = spec.id());
        store.checkpoint(&Checkpoint { pipeline: "main".into(), views, ..Checkpoint::default() }).unwrap();
        store.reading_views(std::slice::from_ref(&spec), crate::views::operator::merge_encoded);
        let rows = |q: &crate::store::RowQuery| {
            store
                .rows_page(q)
                .unwrap()
                .into_iter()
                .map(|r| (r.key, r.window_start, r.values["n"].as_u64().unwrap()))
                .collect::<Vec<_>>()
        };
        let all = rows(&page_query(&spec.id(), None, 10_000));
        assert_eq!(all.len(), 1_400, "every window of both users, across chunks");
        assert!(all.iter().all(|r| r.2 == 2), "each window merges its two partials");
        // Paged by `after`, 333 at a time, the same rows in the same order.
        let mut paged = Vec::new();
        let mut after = None;
        loop {
            let page = rows(&page_query(&spec.id(), after.clone(), 333));
            after = page.last().map(|r| (r.0.clone(), r.1));
            paged.extend(page.iter().cloned());
            if page.len() < 333 {
                break;
            }
        }
        assert_eq!(paged, all);
        // A window range, and one in the future.
        let ranged = crate::store::RowQuery { from: 5_000, to: 8_000, ..page_query(&spec.id(), None, 10_000) };
        let got: Vec<(String, i64)> = rows(&ranged).into_iter().map(|r| (r.0, r.1)).collect();
        let want: Vec<(String, i64)> =
            ["a", "b"].iter().flat_map(|u| (5..8).map(move |w| (u.to_string(), w * 1_000))).collect();
        assert_eq!(got, want);
        let future = crate::store::RowQuery { from: 4_102_444_800_000, ..page_query(&spec.id(), None, 10_000) };
        let fetched = store.partials_fetched.get();
        assert!(rows(&future).is_empty());
        assert_eq!(store.partials_fetched.get(), fetched, "a range in the future fetches no partial");
        rows(&page_query(&spec.id(), Some(("a".into(), 600_000)), 10));
        let cost = store.partials_fetched.get() - fetched;
        assert!(cost <= 1_024, "a page of 10 fetched {cost} partials, more than one chunk");
    }

    /// The API's connections are cut by the server past their statement
    /// timeout, and the error says so (the API answers it 503).
    #[test]
    fn an_api_readers_statement_is_cancelled_at_its_timeout() {
        use crate::store::ServingReader;
        let t = TestSchema::new("stmttimeout");
        let reader = PgReader::new(t.settings.clone(), LOG_PARTITIONS, t.connect(), vec![], Some(merge_encoded))
            .with_statement_timeout(std::time::Duration::from_millis(300))
            .unwrap();
        assert_eq!(reader.list_views().unwrap(), vec![]);
        // Another session holds a lock the reader's query must wait for.
        let mut raw = t.raw();
        let mut tx = raw.transaction().unwrap();
        tx.batch_execute(&format!("LOCK TABLE {}.views IN ACCESS EXCLUSIVE MODE", t.settings.schema)).unwrap();
        let started = std::time::Instant::now();
        let err = reader.list_views().unwrap_err();
        assert!(crate::api::readers::timed_out(&err.0), "{err}");
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "cancelled, not waited out");
        tx.rollback().unwrap();
        assert_eq!(reader.list_views().unwrap(), vec![], "the connection serves the next query");
    }

    /// A view counting readings per `user` tag in `window`s.
    fn counted_per_user(name: &str, window: crate::views::spec::WindowSpec) -> ViewSpec {
        use crate::views::spec::{AggFn, AggSpec, Field, OutputMode};
        ViewSpec {
            name: name.into(),
            version: 1,
            key: Field::Tag("user".into()),
            window,
            output: OutputMode::Update,
            allowed_lateness_ms: 0,
            filter: vec![],
            aggregates: vec![AggSpec { name: "n".into(), func: AggFn::Count, of: None, max: 10 }],
        }
    }

    /// A page of a view's rows, all windows.
    fn page_query(view: &str, after: Option<(String, i64)>, limit: usize) -> crate::store::RowQuery {
        crate::store::RowQuery { view_id: view.into(), key: None, from: i64::MIN, to: i64::MAX, after, limit }
    }
}
