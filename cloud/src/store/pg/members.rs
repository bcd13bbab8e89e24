//! The workers of a group, registered in PostgreSQL for
//! `cluster.assignment = "postgres"` (docs/cluster.md, "Assignment").
//!
//! A member is a row of `members` naming the PostgreSQL session it keeps
//! open for as long as it runs (backend pid and start time) and a lease it
//! renews. It is *live* while that session exists and its lease has not run
//! out. A worker that dies by any means closes its TCP connection, the server
//! ends the session at once, and the others see it gone at their next look:
//! there is no timeout to wait out. A worker that stops without its
//! connection closing (SIGSTOP, a host cut off the network) stays live until
//! its lease runs out (`cluster.session_timeout`).
//!
//! `pg_stat_activity` shows a session's start time only to the same role (or
//! one with `pg_read_all_stats`); where it is hidden, the pid alone names the
//! session.

use std::time::Duration;

use postgres::Client;

use super::{Context, PgSettings, PgStore};
use crate::store::StoreError;

/// Live members of a group, oldest registration first: the same list for
/// every member that asks at the same moment.
const LIVE: &str = "SELECT m.id FROM {s}.members m
    WHERE m.grp = $1 AND m.lease_until > clock_timestamp()
      AND EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = m.backend_pid
                  AND (a.backend_start IS NULL OR a.backend_start = m.backend_start))
    ORDER BY m.id";

/// TEST ONLY: with this environment variable set (in a build with fault
/// injection), members count as live by their lease alone. It exists to
/// show that the cluster tests catch a killed worker whose partitions wait
/// for its lease to run out.
pub const FAULT_LEASE_ONLY: &str = "KAPPA_TEST_MEMBERS_BY_LEASE_ONLY";

/// [`LIVE`] without looking at the sessions.
const LIVE_BY_LEASE: &str = "SELECT m.id FROM {s}.members m
    WHERE m.grp = $1 AND m.lease_until > clock_timestamp() ORDER BY m.id";

/// Rows of a group whose session is gone.
const FORGET_DEAD: &str = "DELETE FROM {s}.members m
    WHERE m.grp = $1 AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = m.backend_pid
                  AND (a.backend_start IS NULL OR a.backend_start = m.backend_start))";

/// What renewing a member's lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Renewed {
    /// Renewed in time.
    Held,
    /// Renewed, but it had run out: the others may have taken its partitions.
    Lapsed,
    /// Its row is gone: it must register again.
    Gone,
}

/// One member's connection: the session that keeps it alive.
pub struct Members {
    client: Client,
    s: String,
    group: String,
    lease: Duration,
    id: Option<i64>,
    /// [`FAULT_LEASE_ONLY`] is on.
    lease_only: bool,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Members").field("group", &self.group).field("id", &self.id).finish()
    }
}

impl Members {
    /// Connects (creating the store's tables if missing); not registered yet.
    pub fn connect(
        settings: &PgSettings,
        log_partitions: u32,
        group: &str,
        lease: Duration,
    ) -> Result<Self, StoreError> {
        let store = PgStore::connect(settings, log_partitions)?;
        let s = store.s.clone();
        let mut client = store.client.into_inner();
        // A look that cannot finish within half a lease is a failed one: the
        // member connects again rather than being counted gone while waiting.
        let ms = (lease.as_millis() / 2).max(1);
        client.batch_execute(&format!("SET statement_timeout = {ms}")).context("setting statement_timeout")?;
        let lease_only =
            kappa_runtime::fault::on(FAULT_LEASE_ONLY, "a killed worker keeps its partitions for its lease");
        Ok(Self { client, s, group: group.to_string(), lease, id: None, lease_only })
    }

    fn sql(&self, text: &str) -> String {
        text.replace("{s}", &self.s)
    }

    fn lease_ms(&self) -> f64 {
        self.lease.as_secs_f64() * 1000.0
    }

    /// Adds this session to the group as a new member; its id.
    pub fn register(&mut self) -> Result<i64, StoreError> {
        let sql = self.sql(
            "INSERT INTO {s}.members (grp, backend_pid, backend_start, lease_until)
             SELECT $1, pg_backend_pid(), a.backend_start, clock_timestamp() + $2::float8 * interval '1 millisecond'
             FROM pg_stat_activity a WHERE a.pid = pg_backend_pid()
             RETURNING id",
        );
        let lease = self.lease_ms();
        let id: i64 = self
            .client
            .query_one(&sql, &[&self.group, &lease])
            .and_then(|r| r.try_get(0))
            .with_context(|| format!("joining group {}", self.group))?;
        self.id = Some(id);
        Ok(id)
    }

    /// This member's id, once registered.
    pub fn id(&self) -> Option<i64> {
        self.id
    }

    /// Extends this member's lease.
    pub fn renew(&mut self) -> Result<Renewed, StoreError> {
        let Some(id) = self.id else { return Ok(Renewed::Gone) };
        let sql = self.sql(
            "UPDATE {s}.members m SET lease_until = clock_timestamp() + $2::float8 * interval '1 millisecond'
             FROM (SELECT lease_until AS was FROM {s}.members WHERE id = $1) o
             WHERE m.id = $1 RETURNING o.was < clock_timestamp()",
        );
        let lease = self.lease_ms();
        let row = self.client.query_opt(&sql, &[&id, &lease]).context("renewing the group lease")?;
        match row.map(|r| r.try_get::<_, bool>(0)).transpose().context("renewing the group lease")? {
            None => Ok(Renewed::Gone),
            Some(true) => Ok(Renewed::Lapsed),
            Some(false) => Ok(Renewed::Held),
        }
    }

    /// The live members of the group, oldest first.
    pub fn live(&mut self) -> Result<Vec<i64>, StoreError> {
        let sql = self.sql(if self.lease_only { LIVE_BY_LEASE } else { LIVE });
        let rows = self.client.query(&sql, &[&self.group]).context("reading the group's members")?;
        rows.iter().map(|r| r.try_get(0)).collect::<Result<_, _>>().context("reading the group's members")
    }

    /// Deletes the rows of members whose session is gone; how many.
    pub fn forget_dead(&mut self) -> Result<u64, StoreError> {
        if self.lease_only {
            return Ok(0); // sessions are not looked at
        }
        let sql = self.sql(FORGET_DEAD);
        self.client.execute(&sql, &[&self.group]).context("forgetting departed members")
    }

    /// Leaves the group at once (closing the connection has the same effect,
    /// seen by the others through `pg_stat_activity`).
    pub fn leave(mut self) {
        if let Some(id) = self.id.take() {
            let sql = self.sql("DELETE FROM {s}.members WHERE id = $1");
            let _ = self.client.execute(&sql, &[&id]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Instant;

    use super::super::tests::{LOG_PARTITIONS, TestSchema};
    use super::*;
    use crate::cluster::membership::Membership;
    use crate::eventlog::Partition;
    use crate::eventlog::kafka::GroupState;

    const GROUP: &str = "g";
    /// Far longer than any wait below: what these tests see of a member
    /// leaving is its session closing, not its lease running out.
    const HOUR: Duration = Duration::from_secs(3600);

    fn member(schema: &TestSchema, ctx: &Arc<GroupState>) {
        let m = Membership {
            settings: schema.settings.clone(),
            log_partitions: LOG_PARTITIONS,
            group: GROUP.into(),
            lease: HOUR,
        };
        m.spawn(Arc::downgrade(ctx)).unwrap();
    }

    /// Waits (up to a minute: a loaded machine) until `ctx` holds `want` partitions.
    fn holds(ctx: &GroupState, want: usize) -> Vec<Partition> {
        let t0 = Instant::now();
        loop {
            let share = ctx.share().unwrap_or_default();
            if share.len() == want {
                return share;
            }
            assert!(t0.elapsed() < Duration::from_secs(60), "holds {share:?}, expected {want} partitions");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    #[test]
    fn members_split_the_partitions_and_take_over_when_a_session_closes_or_a_lease_runs_out() {
        let schema = TestSchema::new("members");
        let (a, b) = (Arc::new(GroupState::default()), Arc::new(GroupState::default()));
        member(&schema, &a);
        assert_eq!(holds(&a, 4), vec![0, 1, 2, 3], "alone, a member holds every partition");
        member(&schema, &b);
        let (sa, sb) = (holds(&a, 2), holds(&b, 2));
        assert!(sa.iter().all(|p| !sb.contains(p)), "disjoint shares: {sa:?} {sb:?}");

        // A source dropped (a worker stopping) leaves the group.
        drop(b);
        holds(&a, 4);

        // A member whose process dies: its connection closes without a word.
        let mut gone = Members::connect(&schema.settings, LOG_PARTITIONS, GROUP, HOUR).unwrap();
        gone.register().unwrap();
        assert_eq!(gone.renew().unwrap(), Renewed::Held, "renewed within its lease");
        holds(&a, 2);
        drop(gone);
        holds(&a, 4);

        // A member that stops renewing while its session stays open (SIGSTOP)
        // is live until its lease runs out.
        let mut stopped = Members::connect(&schema.settings, LOG_PARTITIONS, GROUP, Duration::from_secs(3)).unwrap();
        stopped.register().unwrap();
        assert_eq!(stopped.live().unwrap().len(), 2, "live while its lease runs");
        let t0 = Instant::now();
        while stopped.live().unwrap().len() != 1 {
            assert!(t0.elapsed() < Duration::from_secs(60), "a member whose lease ran out still counts");
            std::thread::sleep(Duration::from_millis(50));
        }
        holds(&a, 4);
        // Renewing again (SIGCONT), it learns its lease had lapsed, and it is back.
        assert_eq!(stopped.renew().unwrap(), Renewed::Lapsed);
        let t0 = Instant::now();
        while a.share().unwrap_or_default().len() != 2 {
            assert!(t0.elapsed() < Duration::from_secs(60), "the renewed member never counted again");
            stopped.renew().unwrap();
            std::thread::sleep(Duration::from_millis(50));
        }
        stopped.leave();
        holds(&a, 4);
    }

    #[test]
    fn rows_of_members_whose_session_closed_are_forgotten() {
        let schema = TestSchema::new("members_forget");
        let mut stays = Members::connect(&schema.settings, LOG_PARTITIONS, GROUP, HOUR).unwrap();
        stays.register().unwrap();
        let mut gone = Members::connect(&schema.settings, LOG_PARTITIONS, GROUP, HOUR).unwrap();
        let gone_id = gone.register().unwrap();
        assert_eq!(stays.live().unwrap().len(), 2);
        drop(gone);
        let t0 = Instant::now();
        while stays.live().unwrap().len() != 1 {
            assert!(t0.elapsed() < Duration::from_secs(60), "the closed session still counts");
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(stays.forget_dead().unwrap(), 1);
        let left: Vec<i64> = schema
            .raw()
            .query(&format!("SELECT id FROM \"{}\".members", schema.settings.schema), &[])
            .unwrap()
            .iter()
            .map(|r| r.get(0))
            .collect();
        assert_eq!(left, vec![stays.id().unwrap()], "member {gone_id} forgotten");
    }
}
