//! View versions on a cluster: which pipeline computes each version, when a
//! replay is live, and which version each name serves. The rules are
//! [`crate::store::versions`], the same the embedded store applies; this
//! module reads and writes the tables every worker and node share.

use std::collections::BTreeMap;

use postgres::Transaction;

use super::{Context, PgStore, lock_key, to_u32, to_u64};
use crate::eventlog::{Offset, Partition};
use crate::store::versions::{self, ConfigOf};
use crate::store::{PipelinePlan, StoreError, StoredRow};
use crate::views::spec::ViewSpec;

crate::store::view_catalog!(PgStore);

const WORKERS: ConfigOf = ConfigOf("the workers' config");

impl PgStore {
    /// Which pipeline computes each of `specs`, recording the views.
    ///
    /// On a store without views every view joins `main`. A view added later
    /// gets a pipeline of its own, `replay:ID`, built from offset 0; with
    /// `replay_new` false it joins `main` instead and starts where `main`
    /// is, missing everything before (TEST ONLY: the negative control of the
    /// cluster replay test). A view stored with a different definition is
    /// refused: its rows and state would mean something else. A name without
    /// an alias gets this version as its alias. Registered views missing
    /// from `specs` are marked retired; a failed pipeline is tried again.
    /// Idempotent, and safe while other workers do the same.
    pub fn plan_pipelines(
        &mut self,
        specs: &[ViewSpec],
        now_ms: i64,
        replay_new: bool,
    ) -> Result<Vec<PipelinePlan>, StoreError> {
        let s = self.s.clone();
        let schema = self.schema.clone();
        let mut tx = self.client.get_mut().transaction().context("starting to plan the pipelines")?;
        // Serialised: workers with different view lists would otherwise take
        // the rows' locks in different orders.
        tx.execute("SELECT pg_advisory_xact_lock($1)", &[&lock_key(&schema)]).context("waiting for the schema lock")?;
        let fresh: bool = tx
            .query_one(&format!("SELECT count(*) = 0 FROM {s}.views"), &[])
            .and_then(|r| r.try_get(0))
            .context("planning the pipelines")?;
        let mut plans: BTreeMap<String, PipelinePlan> = BTreeMap::new();
        for spec in specs {
            let pipeline = register(&mut tx, &s, spec, fresh || !replay_new, now_ms)?;
            let state = pipeline_state(&mut tx, &s, &pipeline)?;
            plans
                .entry(pipeline.clone())
                .or_insert_with(|| PipelinePlan { pipeline, views: Vec::new(), building: state != "live" })
                .views
                .push(spec.clone());
        }
        let ids: Vec<String> = specs.iter().map(ViewSpec::id).collect();
        tx.execute(&format!("UPDATE {s}.views SET retired = NOT (view_id = ANY($1))"), &[&ids])
            .context("marking retired views")?;
        tx.commit().context("planning the pipelines")?;
        Ok(plans.into_values().collect())
    }

    /// Records that a replay failed, and why (`views list` shows it). The
    /// next worker to start tries it again from its checkpoint. A pipeline
    /// that is already live stays live (a worker that started while it was
    /// building may still report).
    pub fn fail_pipeline(&mut self, pipeline: &str, detail: &str) -> Result<(), StoreError> {
        let s = &self.s;
        self.client
            .get_mut()
            .execute(
                &format!(
                    "UPDATE {s}.pipelines SET state = 'failed', detail = $2 WHERE pipeline = $1 AND state = 'building'"
                ),
                &[&pipeline, &detail],
            )
            .with_context(|| format!("recording that pipeline {pipeline} failed"))?;
        Ok(())
    }

    /// Every pipeline's positions: the next offset of each partition.
    pub fn pipeline_positions(&self) -> Result<BTreeMap<String, BTreeMap<Partition, Offset>>, StoreError> {
        let s = &self.s;
        let rows = self
            .client
            .borrow_mut()
            .query(&format!("SELECT pipeline, part, next_offset FROM {s}.partitions"), &[])
            .context("reading the pipelines' positions")?;
        let mut out: BTreeMap<String, BTreeMap<Partition, Offset>> = BTreeMap::new();
        for r in &rows {
            let (pipeline, p, o): (String, i64, i64) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
            out.entry(pipeline).or_default().insert(to_u32(p, "partition")?, to_u64(o, "offset")?);
        }
        Ok(out)
    }

    /// A view's rows and its pipeline's positions, read in one snapshot of
    /// the database (a repeatable-read transaction), so they agree: workers
    /// commit both in one checkpoint.
    pub fn snapshot(&mut self, view_id: &str) -> Result<(Vec<StoredRow>, BTreeMap<Partition, Offset>), StoreError> {
        let s = self.s.clone();
        // A transaction on the client itself (not a `Transaction`), so the
        // row readers, which take the client, run inside it.
        self.client
            .get_mut()
            .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .context("starting a snapshot")?;
        let read = (|| -> Result<(Vec<StoredRow>, BTreeMap<Partition, Offset>), StoreError> {
            let pipeline: String = self
                .client
                .borrow_mut()
                .query_opt(&format!("SELECT pipeline FROM {s}.views WHERE view_id = $1"), &[&view_id])
                .with_context(|| format!("reading view {view_id}"))?
                .ok_or_else(|| StoreError(format!("no view {view_id}; see views list")))?
                .try_get(0)?;
            let positions = self.positions(&pipeline)?;
            Ok((self.all_rows(view_id)?, positions))
        })();
        let end = if read.is_ok() { "COMMIT" } else { "ROLLBACK" };
        self.client.get_mut().batch_execute(end).context("finishing a snapshot")?;
        read
    }

    /// Serves `version` for `name` from now on: one transaction, so an API
    /// reader sees one version or the other. Only a live version that the
    /// workers still run can be promoted.
    pub fn promote(&mut self, name: &str, version: u32, now_ms: i64) -> Result<(), StoreError> {
        let id = format!("{name}@{version}");
        let s = self.s.clone();
        let mut tx = self.client.get_mut().transaction().context("starting a promotion")?;
        let found = tx
            .query_opt(
                &format!(
                    "SELECT v.retired, coalesce(p.state, '') FROM {s}.views v
                     LEFT JOIN {s}.pipelines p ON p.pipeline = v.pipeline WHERE v.view_id = $1"
                ),
                &[&id],
            )
            .with_context(|| format!("reading view {id}"))?;
        let found: Option<(bool, String)> = match found {
            None => None,
            Some(r) => Some((r.try_get(0)?, r.try_get(1)?)),
        };
        versions::may_promote(&id, found.as_ref().map(|(r, s)| (*r, s.as_str())), WORKERS)?;
        set_alias(&mut tx, &s, name, version, now_ms)?;
        tx.commit().with_context(|| format!("promoting {id}"))?;
        Ok(())
    }

    /// Serves the version `name` served before its last promotion; returns it.
    pub fn rollback(&mut self, name: &str, now_ms: i64) -> Result<u32, StoreError> {
        let s = self.s.clone();
        let mut tx = self.client.get_mut().transaction().context("starting a rollback")?;
        let rows = tx
            .query(
                &format!("SELECT version FROM {s}.alias_history WHERE name = $1 ORDER BY seq DESC FOR UPDATE"),
                &[&name],
            )
            .with_context(|| format!("reading the aliases of {name}"))?;
        let history: Vec<u32> = rows
            .iter()
            .map(|r| r.try_get::<_, i64>(0).map_err(StoreError::from).and_then(|v| to_u32(v, "view version")))
            .collect::<Result<_, _>>()?;
        let previous = versions::rollback_target(name, &history)?;
        set_alias(&mut tx, &s, name, previous, now_ms)?;
        tx.commit().with_context(|| format!("rolling {name} back"))?;
        Ok(previous)
    }

    /// Removes a retired version that is not served: its rows, state, late
    /// events and registration, and its pipeline's once no view is left in it.
    pub fn drop_view(&mut self, name: &str, version: u32) -> Result<u64, StoreError> {
        let id = format!("{name}@{version}");
        let s = self.s.clone();
        let mut tx = self.client.get_mut().transaction().context("starting to drop a view")?;
        let found = tx
            .query_opt(
                &format!(
                    "SELECT v.retired, v.pipeline, a.version IS NOT NULL FROM {s}.views v
                     LEFT JOIN {s}.view_aliases a ON a.name = v.name AND a.version = v.version
                     WHERE v.view_id = $1 FOR UPDATE OF v"
                ),
                &[&id],
            )
            .with_context(|| format!("reading view {id}"))?;
        let Some(r) = found else { return Err(StoreError(format!("no view {id}"))) };
        let (retired, pipeline, serving): (bool, String, bool) = (r.try_get(0)?, r.try_get(1)?, r.try_get(2)?);
        versions::may_drop(name, version, retired, serving, WORKERS)?;
        let what = || format!("dropping {id}");
        let mut rows = 0;
        for table in ["view_rows", "view_partials", "view_state", "view_meta", "late_events", "views"] {
            let n = tx.execute(&format!("DELETE FROM {s}.{table} WHERE view_id = $1"), &[&id]).with_context(what)?;
            if table == "view_rows" {
                rows = n;
            }
        }
        let left: i64 = tx
            .query_one(&format!("SELECT count(*) FROM {s}.views WHERE pipeline = $1"), &[&pipeline])
            .and_then(|r| r.try_get(0))
            .with_context(what)?;
        if versions::forget_pipeline(&pipeline, left, true) {
            for table in ["pipelines", "partitions", "dedup", "pipeline_meta"] {
                tx.execute(&format!("DELETE FROM {s}.{table} WHERE pipeline = $1"), &[&pipeline]).with_context(what)?;
            }
        }
        tx.commit().with_context(what)?;
        Ok(rows)
    }
}

/// Registers one view (idempotent) and returns its pipeline: `main` for the
/// views of a fresh store (or all of them, with `into_main`), else a replay
/// pipeline of its own.
fn register(
    tx: &mut Transaction<'_>,
    s: &str,
    spec: &ViewSpec,
    into_main: bool,
    now_ms: i64,
) -> Result<String, StoreError> {
    let id = spec.id();
    let def = spec.fingerprint();
    let version = i64::from(spec.version);
    let (pipeline, state) = versions::new_view_pipeline(&id, into_main);
    let what = || format!("registering view {id}");
    tx.execute(
        &format!(
            "INSERT INTO {s}.views (view_id, name, version, definition, created_ms, pipeline) VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (view_id) DO NOTHING"
        ),
        &[&id, &spec.name, &version, &def, &now_ms, &pipeline],
    )
    .with_context(what)?;
    let stored = tx
        .query_one(&format!("SELECT definition, pipeline FROM {s}.views WHERE view_id = $1"), &[&id])
        .with_context(what)?;
    let (old, pipeline): (String, String) = (stored.try_get(0)?, stored.try_get(1)?);
    versions::same_definition(spec, &old)?;
    tx.execute(
        &format!(
            "INSERT INTO {s}.pipelines (pipeline, state, created_ms) VALUES ($1, $2, $3) ON CONFLICT (pipeline) DO NOTHING"
        ),
        &[&pipeline, &state, &now_ms],
    )
    .with_context(what)?;
    let aliased = tx
        .execute(
            &format!("INSERT INTO {s}.view_aliases (name, version) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING"),
            &[&spec.name, &version],
        )
        .with_context(what)?;
    if aliased > 0 {
        tx.execute(
            &format!("INSERT INTO {s}.alias_history (name, version, at_ms) VALUES ($1, $2, $3)"),
            &[&spec.name, &version, &now_ms],
        )
        .with_context(what)?;
    }
    Ok(pipeline)
}

/// A pipeline's state; a failed one is set back to building (tried again).
fn pipeline_state(tx: &mut Transaction<'_>, s: &str, pipeline: &str) -> Result<String, StoreError> {
    let what = || format!("reading the state of pipeline {pipeline}");
    let state: String = tx
        .query_one(&format!("SELECT state FROM {s}.pipelines WHERE pipeline = $1"), &[&pipeline])
        .and_then(|r| r.try_get(0))
        .with_context(what)?;
    let planned = versions::replanned(&state);
    if planned != state {
        tx.execute(
            &format!("UPDATE {s}.pipelines SET state = $2, detail = '' WHERE pipeline = $1"),
            &[&pipeline, &planned],
        )
        .with_context(what)?;
    }
    Ok(planned.to_string())
}

/// Points `name` at `version` and records the change for rollbacks.
fn set_alias(tx: &mut Transaction<'_>, s: &str, name: &str, version: u32, now_ms: i64) -> Result<(), StoreError> {
    let version = i64::from(version);
    let what = || format!("pointing {name} at version {version}");
    tx.execute(
        &format!(
            "INSERT INTO {s}.view_aliases (name, version) VALUES ($1, $2)
             ON CONFLICT (name) DO UPDATE SET version = excluded.version"
        ),
        &[&name, &version],
    )
    .with_context(what)?;
    tx.execute(
        &format!("INSERT INTO {s}.alias_history (name, version, at_ms) VALUES ($1, $2, $3)"),
        &[&name, &version, &now_ms],
    )
    .with_context(what)?;
    Ok(())
}

/// Marks the partitions of a share that caught up with the log, and the
/// pipeline live once every partition of the log has (in the checkpoint's
/// transaction, after its fence).
pub(super) fn mark_caught_up(
    tx: &mut Transaction<'_>,
    s: &str,
    pipeline: &str,
    parts: &[i64],
    log_partitions: u32,
) -> Result<(), StoreError> {
    let what = || format!("marking pipeline {pipeline} caught up");
    tx.execute(
        &format!("UPDATE {s}.partitions SET caught_up = true WHERE pipeline = $1 AND part = ANY($2)"),
        &[&pipeline, &parts],
    )
    .with_context(what)?;
    let live = tx
        .execute(
            &format!(
                "UPDATE {s}.pipelines SET state = 'live', detail = '' WHERE pipeline = $1 AND state = 'building'
                 AND (SELECT count(*) FROM {s}.partitions WHERE pipeline = $1 AND caught_up) >= $2"
            ),
            &[&pipeline, &i64::from(log_partitions)],
        )
        .with_context(what)?;
    if live > 0 {
        tracing::info!(pipeline, "Every partition of the replay caught up with the log; the pipeline is live.");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{TestSchema, two_versions};
    use super::*;
    use crate::store::MAIN_PIPELINE;
    use crate::store::{Checkpoint, ProcessorStore};

    fn states(s: &PgStore) -> Vec<(String, String, bool)> {
        s.list_views().unwrap().into_iter().map(|v| (v.id, v.state, v.current)).collect()
    }

    /// A share of the replay that reached the log's end.
    fn caught_up(s: &mut PgStore, parts: &[Partition]) {
        s.claim("replay:v@2", parts).unwrap();
        let cp = Checkpoint {
            pipeline: "replay:v@2".into(),
            caught_up: true,
            partitions: parts.iter().map(|p| (*p, 3, None)).collect(),
            ..Checkpoint::default()
        };
        s.checkpoint(&cp).unwrap();
    }

    #[test]
    fn a_version_added_later_replays_and_is_promoted_once_every_partition_caught_up() {
        let db = TestSchema::new("versions");
        let specs = two_versions();
        let mut s = db.connect();
        let plans = s.plan_pipelines(&specs[..1], 1, true).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!((plans[0].pipeline.as_str(), plans[0].building), (MAIN_PIPELINE, false));

        let plans = s.plan_pipelines(&specs, 2, true).unwrap();
        let planned: Vec<(&str, bool, usize)> =
            plans.iter().map(|p| (p.pipeline.as_str(), p.building, p.views.len())).collect();
        assert_eq!(planned, [(MAIN_PIPELINE, false, 1), ("replay:v@2", true, 1)]);
        assert_eq!(states(&s), [("v@1".into(), "live".into(), true), ("v@2".into(), "building".into(), false)]);
        let err = s.promote("v", 2, 3).unwrap_err();
        assert!(err.0.contains("is building"), "{err}");

        // Two workers' shares: live only when both caught up.
        caught_up(&mut s, &[0, 1]);
        assert_eq!(states(&s)[1].1, "building", "half the partitions caught up");
        let mut other = db.connect();
        caught_up(&mut other, &[2, 3]);
        assert_eq!(states(&s)[1].1, "live");
        let positions = s.pipeline_positions().unwrap();
        assert_eq!(positions["replay:v@2"], (0..4).map(|p| (p, 3)).collect());

        s.promote("v", 2, 4).unwrap();
        assert_eq!(s.resolve_view("v").unwrap().as_deref(), Some("v@2"));
        assert_eq!(s.rollback("v", 5).unwrap(), 1);
        assert_eq!(s.resolve_view("v").unwrap().as_deref(), Some("v@1"));
        assert_eq!(s.rollback("v", 6).unwrap(), 2, "a rollback of a rollback goes forward again");

        // Dropping: only a retired version that is not served.
        let err = s.drop_view("v", 1).unwrap_err();
        assert!(err.0.contains("is running"), "{err}");
        s.plan_pipelines(&specs[1..], 7, true).unwrap();
        assert_eq!(states(&s)[0], ("v@1".into(), "retired".into(), false));
        let err = s.promote("v", 1, 8).unwrap_err();
        assert!(err.0.contains("retired"), "{err}");
        assert_eq!(s.drop_view("v", 1).unwrap(), 0);
        assert_eq!(states(&s), [("v@2".into(), "live".into(), true)]);
        let err = s.drop_view("v", 1).unwrap_err();
        assert!(err.0.contains("no view v@1"), "{err}");
    }

    #[test]
    fn a_failed_replay_is_shown_and_tried_again_by_the_next_plan() {
        let db = TestSchema::new("failed");
        let specs = two_versions();
        let mut s = db.connect();
        s.plan_pipelines(&specs[..1], 1, true).unwrap();
        s.plan_pipelines(&specs, 2, true).unwrap();
        s.fail_pipeline("replay:v@2", "archive segment x: bad block").unwrap();
        let v2 = s.list_views().unwrap().remove(1);
        assert_eq!((v2.state.as_str(), v2.detail.as_str()), ("failed", "archive segment x: bad block"));
        let plans = s.plan_pipelines(&specs, 3, true).unwrap();
        assert!(plans[1].building);
        assert_eq!(states(&s)[1].1, "building");
        caught_up(&mut s, &[0, 1, 2, 3]);
        s.fail_pipeline("replay:v@2", "a late report").unwrap();
        assert_eq!(states(&s)[1].1, "live", "a live pipeline is not failed");
    }

    /// The negative control's switch: without replays a new version joins
    /// `main` (and so starts where `main` is).
    #[test]
    fn without_replays_a_new_version_joins_the_live_pipeline() {
        let db = TestSchema::new("noreplay");
        let specs = two_versions();
        let mut s = db.connect();
        s.plan_pipelines(&specs[..1], 1, true).unwrap();
        let plans = s.plan_pipelines(&specs, 2, false).unwrap();
        assert_eq!(plans.len(), 1);
        assert_eq!(plans[0].views.len(), 2);
    }

    #[test]
    fn a_snapshot_holds_rows_and_positions_of_one_checkpoint() {
        let db = TestSchema::new("snapshot");
        let specs = two_versions();
        let mut s = db.connect();
        s.plan_pipelines(&specs[..1], 1, true).unwrap();
        s.claim(MAIN_PIPELINE, &[0]).unwrap();
        let device = super::super::tests::device_in(0);
        let cp = Checkpoint {
            pipeline: MAIN_PIPELINE.into(),
            partitions: vec![(0, 7, Some(100))],
            views: vec![crate::store::ViewChanges {
                view: "v@1".into(),
                partition: Some(0),
                changes: crate::views::operator::Changes {
                    row_upserts: vec![crate::store::sqlite::tests::row(&device, 0, 2)],
                    ..Default::default()
                },
                closed_through: None,
                merged: false,
            }],
            ..Checkpoint::default()
        };
        s.checkpoint(&cp).unwrap();
        let (rows, positions) = s.snapshot("v@1").unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].key, device);
        assert_eq!(positions, [(0, 7)].into());
        let err = s.snapshot("v@9").unwrap_err();
        assert!(err.0.contains("no view v@9"), "{err}");
        // The connection is usable after a failed snapshot (it rolled back).
        assert_eq!(s.snapshot("v@1").unwrap().0.len(), 1);
    }

    #[test]
    fn a_layout_1_store_is_migrated_in_place() {
        let db = TestSchema::new("migrate");
        let specs = two_versions();
        db.connect().plan_pipelines(&specs[..1], 1, true).unwrap();
        let sch = format!("\"{}\"", db.settings.schema);
        db.raw()
            .batch_execute(&format!(
                "ALTER TABLE {sch}.views DROP COLUMN pipeline, DROP COLUMN retired;
                 ALTER TABLE {sch}.partitions DROP COLUMN caught_up;
                 DROP TABLE {sch}.pipelines, {sch}.alias_history;
                 UPDATE {sch}.store_meta SET value = 1 WHERE key = 'schema_version';"
            ))
            .unwrap();
        let mut s = db.connect();
        assert_eq!(states(&s), [("v@1".into(), "live".into(), true)], "layout-1 views ran live in main");
        let version: i64 = db
            .raw()
            .query_one(&format!("SELECT value FROM {sch}.store_meta WHERE key = 'schema_version'"), &[])
            .unwrap()
            .get(0);
        assert_eq!(version, 2);
        let plans = s.plan_pipelines(&specs, 2, true).unwrap();
        assert_eq!(plans[1].pipeline, "replay:v@2", "a version added after the migration replays");
        caught_up(&mut s, &[0, 1, 2, 3]);
        s.promote("v", 2, 3).unwrap();
        assert_eq!(s.rollback("v", 4).unwrap(), 1, "the alias from before the migration is in the history");
    }
}
