//! View versions in the embedded store: which pipeline computes which
//! view, what the API serves for each name (promote, roll back), and
//! dropping retired versions. The rules are [`crate::store::versions`], the
//! same the cluster store applies; this module reads and writes the tables.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, params};
use serde_json::Value as Json;

use super::ViewStore;
use crate::store::versions::{self, ConfigOf};
use crate::store::{PipelinePlan, StoreError, ViewInfo};

const RUNNING: ConfigOf = ConfigOf("the running config");
use crate::views::spec::ViewSpec;

impl ViewStore {
    /// Records the views about to run and decides which pipeline computes
    /// each. A view already known keeps its pipeline. On a fresh store every
    /// view joins the main pipeline; a view added later gets a pipeline of its
    /// own that replays history (archive, then log) and then stays live
    /// beside the others. Known views missing from `specs` are marked
    /// retired. A view whose definition changed under the same version is
    /// refused: its rows and state would mean something else. A name without
    /// an alias gets this version as its alias.
    pub fn plan_pipelines(&mut self, specs: &[ViewSpec], now_ms: i64) -> Result<Vec<PipelinePlan>, StoreError> {
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let fresh: bool = tx.query_row("SELECT count(*) = 0 FROM pipelines", [], |r| r.get(0))?;
        let mut plans: BTreeMap<String, PipelinePlan> = BTreeMap::new();
        for spec in specs {
            let id = spec.id();
            let def = spec.fingerprint();
            let stored: Option<(String, String)> = tx
                .query_row("SELECT definition, pipeline FROM views WHERE view_id = ?1", [&id], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()?;
            let pipeline = match stored {
                Some((old, pipeline)) => {
                    versions::same_definition(spec, &old)?;
                    pipeline
                }
                None => {
                    let (pipeline, state) = versions::new_view_pipeline(&id, fresh);
                    tx.execute(
                        "INSERT INTO views (view_id, name, version, definition, pipeline, created_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                        params![id, spec.name, spec.version, def, pipeline, now_ms],
                    )?;
                    tx.execute(
                        "INSERT OR IGNORE INTO pipelines (pipeline, state, created_ms) VALUES (?1, ?2, ?3)",
                        params![pipeline, state, now_ms],
                    )?;
                    pipeline
                }
            };
            tx.execute("UPDATE views SET retired = 0 WHERE view_id = ?1", [&id])?;
            if tx.execute(
                "INSERT OR IGNORE INTO view_aliases (name, version) VALUES (?1, ?2)",
                params![spec.name, spec.version],
            )? > 0
            {
                tx.execute(
                    "INSERT INTO alias_history (name, version, at_ms) VALUES (?1, ?2, ?3)",
                    params![spec.name, spec.version, now_ms],
                )?;
            }
            let stored_state: String = tx
                .query_row("SELECT state FROM pipelines WHERE pipeline = ?1", [&pipeline], |r| r.get(0))
                .optional()?
                .unwrap_or_default();
            let state = versions::replanned(&stored_state).to_string();
            if state != stored_state {
                tx.execute("UPDATE pipelines SET state = ?2 WHERE pipeline = ?1", params![pipeline, state])?;
            }
            plans
                .entry(pipeline.clone())
                .or_insert_with(|| PipelinePlan { pipeline, views: Vec::new(), building: state == "building" })
                .views
                .push(spec.clone());
        }
        let ids: Vec<String> = specs.iter().map(ViewSpec::id).collect();
        let known: Vec<String> =
            tx.prepare("SELECT view_id FROM views")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        for id in known.iter().filter(|k| !ids.contains(k)) {
            tx.execute("UPDATE views SET retired = 1 WHERE view_id = ?1", [id])?;
        }
        tx.commit()?;
        Ok(plans.into_values().collect())
    }

    /// The view id a name (through its alias) or `name@version` refers to.
    pub fn resolve_view(&self, name: &str) -> Result<Option<String>, StoreError> {
        if name.contains('@') {
            return Ok(self
                .conn
                .query_row("SELECT view_id FROM views WHERE view_id = ?1", [name], |r| r.get(0))
                .optional()?);
        }
        Ok(self
            .conn
            .query_row("SELECT version FROM view_aliases WHERE name = ?1", [name], |r| r.get::<_, u32>(0))
            .optional()?
            .map(|v| format!("{name}@{v}")))
    }

    /// Every view version the store knows, with its rows counted.
    pub fn list_views(&self) -> Result<Vec<ViewInfo>, StoreError> {
        self.views(true)
    }

    /// Every view version the store knows; `counted`: with its rows counted
    /// (which reads every row).
    pub fn views(&self, counted: bool) -> Result<Vec<ViewInfo>, StoreError> {
        let count = if counted { "(SELECT count(*) FROM view_rows r WHERE r.view_id = v.view_id)" } else { "NULL" };
        let mut stmt = self.conn.prepare(&format!(
            "SELECT v.name, v.version, v.view_id, v.definition, a.version IS NOT NULL, v.retired,
                    coalesce(p.state, ''), coalesce(p.detail, ''), v.pipeline, {count}
             FROM views v
             LEFT JOIN view_aliases a ON a.name = v.name AND a.version = v.version
             LEFT JOIN pipelines p ON p.pipeline = v.pipeline
             ORDER BY v.name, v.version"
        ))?;
        let rows = stmt.query_map([], |r| {
            let retired: bool = r.get(5)?;
            let state: String = r.get(6)?;
            Ok(ViewInfo {
                name: r.get(0)?,
                version: r.get(1)?,
                id: r.get(2)?,
                definition: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or(Json::Null),
                current: r.get(4)?,
                state: if retired { "retired".to_string() } else { state },
                detail: r.get(7)?,
                pipeline: r.get(8)?,
                rows: r.get::<_, Option<i64>>(9)?.map(|n| n.max(0) as u64),
            })
        })?;
        Ok(rows.collect::<Result<_, _>>()?)
    }

    /// Serves `version` for `name` from now on (one statement: atomic for readers).
    pub fn promote(&mut self, name: &str, version: u32, now_ms: i64) -> Result<(), StoreError> {
        let id = format!("{name}@{version}");
        let state: Option<(bool, String)> = self
            .conn
            .query_row(
                "SELECT v.retired, coalesce(p.state, '') FROM views v LEFT JOIN pipelines p ON p.pipeline = v.pipeline WHERE v.view_id = ?1",
                [&id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        versions::may_promote(&id, state.as_ref().map(|(r, s)| (*r, s.as_str())), RUNNING)?;
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute(
            "INSERT INTO view_aliases (name, version) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET version = excluded.version",
            params![name, version],
        )?;
        tx.execute(
            "INSERT INTO alias_history (name, version, at_ms) VALUES (?1, ?2, ?3)",
            params![name, version, now_ms],
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Serves the version `name` served before its last promotion; returns it.
    pub fn rollback(&mut self, name: &str, now_ms: i64) -> Result<u32, StoreError> {
        let history: Vec<u32> = self
            .conn
            .prepare("SELECT version FROM alias_history WHERE name = ?1 ORDER BY seq DESC")?
            .query_map([name], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let previous = versions::rollback_target(name, &history)?;
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        tx.execute("UPDATE view_aliases SET version = ?2 WHERE name = ?1", params![name, previous])?;
        tx.execute(
            "INSERT INTO alias_history (name, version, at_ms) VALUES (?1, ?2, ?3)",
            params![name, previous, now_ms],
        )?;
        tx.commit()?;
        Ok(previous)
    }

    /// Removes a retired version's rows, state, late events and registration.
    pub fn drop_view(&mut self, name: &str, version: u32) -> Result<u64, StoreError> {
        let id = format!("{name}@{version}");
        let row: Option<(bool, String)> = self
            .conn
            .query_row("SELECT retired, pipeline FROM views WHERE view_id = ?1", [&id], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()?;
        let Some((retired, pipeline)) = row else { return Err(StoreError(format!("no view {id}"))) };
        let serving: bool = self.conn.query_row(
            "SELECT count(*) > 0 FROM view_aliases WHERE name = ?1 AND version = ?2",
            params![name, version],
            |r| r.get(0),
        )?;
        versions::may_drop(name, version, retired, serving, RUNNING)?;
        let tx = self.conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let rows = tx.execute("DELETE FROM view_rows WHERE view_id = ?1", [&id])? as u64;
        for table in ["view_state", "view_meta", "late_events", "views"] {
            tx.execute(&format!("DELETE FROM {table} WHERE view_id = ?1"), [&id])?;
        }
        let left: i64 = tx.query_row("SELECT count(*) FROM views WHERE pipeline = ?1", [&pipeline], |r| r.get(0))?;
        if versions::forget_pipeline(&pipeline, left, false) {
            for table in ["pipelines", "partitions", "dedup", "processor_meta"] {
                tx.execute(&format!("DELETE FROM {table} WHERE pipeline = ?1"), [&pipeline])?;
            }
        }
        tx.commit()?;
        Ok(rows)
    }
}
