//! The rules of view versions, once for both stores: which pipeline a new
//! view joins, when a stored view may run again, which versions may be
//! promoted, rolled back to or dropped. The SQLite and PostgreSQL stores
//! read their rows, ask these functions, and write what they decide; the
//! rules themselves touch no database.

use super::{MAIN_PIPELINE, StoreError};
use crate::views::spec::ViewSpec;

/// Where a store's running views are configured, for messages: "the
/// running config" (a node) or "the workers' config" (a cluster).
#[derive(Debug, Clone, Copy)]
pub struct ConfigOf(pub &'static str);

/// The pipeline a view the store has not seen joins, and that pipeline's
/// first state: on a fresh store (or where new views do not replay)
/// the main pipeline, live; later a pipeline of its own that replays
/// history first.
pub fn new_view_pipeline(view_id: &str, into_main: bool) -> (String, &'static str) {
    if into_main { (MAIN_PIPELINE.to_string(), "live") } else { (format!("replay:{view_id}"), "building") }
}

/// A view runs again only with the definition it was built with: a changed
/// definition under the same version would give its rows and state another
/// meaning.
pub fn same_definition(spec: &ViewSpec, stored: &str) -> Result<(), StoreError> {
    if stored == spec.fingerprint() {
        return Ok(());
    }
    Err(StoreError(format!(
        "view {} was built with a different definition; give the changed view a new version \
         (version = {}) so both can be compared",
        spec.id(),
        spec.version + 1
    )))
}

/// The state a pipeline is planned in: a failed one is tried again from
/// its checkpoint (say, after `archive.skip_damaged` was set).
pub fn replanned(state: &str) -> &str {
    if state == "failed" { "building" } else { state }
}

/// Whether `id` may be promoted, given `(retired, pipeline state)` if the
/// store knows it: only a live version that still runs.
pub fn may_promote(id: &str, found: Option<(bool, &str)>, config: ConfigOf) -> Result<(), StoreError> {
    match found {
        None => Err(StoreError(format!("no view {id}; see views list"))),
        Some((true, _)) => Err(StoreError(format!("{id} is retired (not in {})", config.0))),
        Some((_, state)) if state != "live" => Err(StoreError(format!("{id} is {state}; promote it once it is live"))),
        Some(_) => Ok(()),
    }
}

/// The version a rollback of `name` serves: the newest in its alias
/// history (newest first) that differs from the current one.
pub fn rollback_target(name: &str, history: &[u32]) -> Result<u32, StoreError> {
    history
        .first()
        .and_then(|current| history.iter().find(|v| *v != current))
        .copied()
        .ok_or_else(|| StoreError(format!("{name} has no earlier version to roll back to")))
}

/// Whether `name@version` may be dropped: only a retired version that the
/// API does not serve.
pub fn may_drop(name: &str, version: u32, retired: bool, serving: bool, config: ConfigOf) -> Result<(), StoreError> {
    let id = format!("{name}@{version}");
    if !retired {
        return Err(StoreError(format!(
            "{id} is running; remove it from {} and restart first (only retired versions are dropped)",
            config.0
        )));
    }
    if serving {
        return Err(StoreError(format!("{id} is what {name} serves; promote another version first")));
    }
    Ok(())
}

/// Whether a pipeline that a drop left without views is forgotten (its
/// positions, dedup state and meta deleted), so it holds back no log
/// retention. Where workers claim `main`'s partitions whether or not it
/// computes a view (`main_is_claimed`: a cluster, whose claims fence its
/// workers), `main` is kept.
pub fn forget_pipeline(pipeline: &str, views_left: i64, main_is_claimed: bool) -> bool {
    views_left == 0 && !(main_is_claimed && pipeline == MAIN_PIPELINE)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NODE: ConfigOf = ConfigOf("the running config");

    #[test]
    fn a_new_view_joins_main_on_a_fresh_store_and_replays_in_its_own_pipeline_later() {
        assert_eq!(new_view_pipeline("v@1", true), ("main".to_string(), "live"));
        assert_eq!(new_view_pipeline("v@2", false), ("replay:v@2".to_string(), "building"));
    }

    #[test]
    fn only_a_live_running_version_is_promoted_and_only_a_retired_unserved_one_dropped() {
        assert!(may_promote("v@2", Some((false, "live")), NODE).is_ok());
        for (found, says) in
            [(None, "no view"), (Some((true, "live")), "retired"), (Some((false, "building")), "once it is live")]
        {
            let err = may_promote("v@2", found, NODE).unwrap_err();
            assert!(err.0.contains(says), "{err}");
        }
        assert!(may_drop("v", 1, true, false, NODE).is_ok());
        assert!(may_drop("v", 1, false, false, NODE).unwrap_err().0.contains("running"));
        assert!(may_drop("v", 1, true, true, NODE).unwrap_err().0.contains("serves"));
    }

    #[test]
    fn a_rollback_goes_to_the_newest_other_version_in_the_history() {
        assert_eq!(rollback_target("v", &[2, 2, 1, 3]).unwrap(), 1);
        assert!(rollback_target("v", &[2, 2]).is_err());
        assert!(rollback_target("v", &[]).is_err());
        assert_eq!(replanned("failed"), "building");
        assert_eq!(replanned("live"), "live");
    }

    #[test]
    fn a_pipeline_left_without_views_is_forgotten_except_a_claimed_main() {
        assert!(forget_pipeline("replay:v@2", 0, true));
        assert!(!forget_pipeline("replay:v@2", 1, false));
        assert!(forget_pipeline(MAIN_PIPELINE, 0, false));
        assert!(!forget_pipeline(MAIN_PIPELINE, 0, true));
    }
}
