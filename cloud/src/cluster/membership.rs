//! `cluster.assignment = "postgres"`: the workers of a group share the
//! partitions through PostgreSQL instead of Kafka's group protocol
//! (docs/cluster.md, "Assignment").
//!
//! Each group source has a thread of its own with a PostgreSQL session of its
//! own ([`Members`]). Every 100 ms it renews its lease, reads the group's
//! live members and computes its share with [`share_of`], which every member
//! computes alike from the same list; when the share changes it hands it to
//! the source ([`GroupState::hand`]), and the pipeline checkpoints and
//! takes it exactly as it takes a share Kafka assigned. Members never
//! coordinate a handover: for a moment two members may both believe they
//! hold a partition, and the store's claims and epochs (see
//! `crate::store::pg`) make sure only the later claimant's checkpoints
//! commit.

use std::sync::Weak;
use std::time::{Duration, Instant};

use crate::eventlog::Partition;
use crate::eventlog::kafka::GroupState;
use crate::store::StoreError;
use crate::store::pg::PgSettings;
use crate::store::pg::members::{Members, Renewed};

/// How often a member looks at the group.
const POLL: Duration = Duration::from_millis(100);
/// How often a member deletes the rows of members whose session is gone.
const CLEANUP: Duration = Duration::from_secs(5);
/// The pause before connecting again after PostgreSQL failed.
const RETRY: Duration = Duration::from_secs(1);

/// The partitions of a log of `partitions` that member `me` holds when the
/// live members are `members` (sorted): each partition goes to the member
/// ranking it highest (a hash of member and partition) that still has room,
/// and every member has room for the same number, give or take one. Adding
/// or removing a member moves few of the partitions the others keep.
pub fn share_of(members: &[i64], me: i64, partitions: u32) -> Vec<Partition> {
    let n = members.len();
    if n == 0 {
        return Vec::new();
    }
    let (base, extra) = (partitions as usize / n, partitions as usize % n);
    // The `extra` oldest members take one partition more.
    let room: Vec<usize> = (0..n).map(|i| base + usize::from(i < extra)).collect();
    let mut load = vec![0usize; n];
    let mut mine = Vec::new();
    for p in 0..partitions {
        let taker = (0..n)
            .filter(|&i| load[i] < room[i])
            .max_by_key(|&i| (rank(members[i], p), std::cmp::Reverse(i)))
            .unwrap_or(0);
        load[taker] += 1;
        if members[taker] == me {
            mine.push(p);
        }
    }
    mine
}

/// A well-mixed 64-bit hash of a member and a partition (splitmix64).
fn rank(member: i64, partition: Partition) -> u64 {
    let mut z = (member as u64).rotate_left(32) ^ u64::from(partition);
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Where the membership thread of one group source is.
#[derive(Debug)]
pub struct Membership {
    pub settings: PgSettings,
    pub log_partitions: u32,
    pub group: String,
    /// How long a member that stopped renewing (but whose session stays
    /// open) counts as live: `cluster.session_timeout`.
    pub lease: Duration,
}

impl Membership {
    /// Starts the thread that keeps the sources over `source` a member of
    /// the group and hands them their shares; it leaves the group once
    /// nothing holds `source` any more.
    pub fn spawn(self, source: Weak<GroupState>) -> std::io::Result<()> {
        let name = format!("members:{}", self.group);
        std::thread::Builder::new().name(name).spawn(move || self.run(&source)).map(|_| ())
    }

    fn run(self, source: &Weak<GroupState>) {
        // What this member last handed its source: `None` holds nothing.
        let mut handed: Option<Vec<Partition>> = None;
        let mut failing = false;
        while source.strong_count() > 0 {
            match self.session(source, &mut handed, &mut failing) {
                Ok(()) => return,
                Err(e) => {
                    // The others see this session gone and take its
                    // partitions: stop reading them (checkpoints would be
                    // fenced anyway).
                    if handed.take().is_some()
                        && let Some(ctx) = source.upgrade()
                    {
                        ctx.hand(None);
                    }
                    if !failing {
                        tracing::warn!(group = %self.group, error = %e, "Lost the group's membership in PostgreSQL; joining again.");
                        failing = true;
                    }
                }
            }
            let until = Instant::now() + RETRY;
            while Instant::now() < until && source.strong_count() > 0 {
                std::thread::sleep(POLL);
            }
        }
    }

    /// One PostgreSQL session as a member, until the source is dropped
    /// (`Ok`) or PostgreSQL fails.
    fn session(
        &self,
        source: &Weak<GroupState>,
        handed: &mut Option<Vec<Partition>>,
        failing: &mut bool,
    ) -> Result<(), StoreError> {
        let mut members = Members::connect(&self.settings, self.log_partitions, &self.group, self.lease)?;
        let mut me = members.register()?;
        *failing = false;
        tracing::info!(group = %self.group, member = me, "Joined the group in PostgreSQL.");
        let mut cleaned = Instant::now();
        loop {
            let Some(ctx) = source.upgrade() else {
                members.leave();
                return Ok(());
            };
            // Whether to hand the share even if it did not change.
            let again = match members.renew()? {
                Renewed::Held => false,
                Renewed::Lapsed => {
                    // The others counted this member gone (it was stopped,
                    // or could not renew) and claimed its partitions: hand
                    // its share again, to be claimed and restored afresh.
                    tracing::warn!(group = %self.group, member = me, "This worker's lease had run out; it takes its share again.");
                    true
                }
                Renewed::Gone => {
                    me = members.register()?;
                    tracing::warn!(group = %self.group, member = me, "This worker's membership was removed; joined the group again.");
                    true
                }
            };
            let live = members.live()?;
            let share = if live.contains(&me) { share_of(&live, me, self.log_partitions) } else { Vec::new() };
            if again || handed.as_ref() != Some(&share) {
                tracing::info!(group = %self.group, members = live.len(), "The group's members changed.");
                ctx.hand(Some(share.clone()));
                *handed = Some(share);
            }
            ctx.looked();
            drop(ctx);
            if cleaned.elapsed() >= CLEANUP {
                members.forget_dead()?;
                cleaned = Instant::now();
            }
            std::thread::sleep(POLL);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    fn shares(members: &[i64], partitions: u32) -> Vec<Vec<Partition>> {
        members.iter().map(|m| share_of(members, *m, partitions)).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_member_and_the_loads_differ_by_at_most_one() {
        for n in 1..=12i64 {
            for partitions in [1u32, 6, 16, 64] {
                // Ids as a database hands them out: increasing, with gaps.
                let members: Vec<i64> = (0..n).map(|i| 3 + i * 7 + i * i).collect();
                let all = shares(&members, partitions);
                let mut seen = BTreeSet::new();
                for share in &all {
                    for p in share {
                        assert!(seen.insert(*p), "partition {p} held twice ({n} members, {partitions} partitions)");
                    }
                }
                assert_eq!(seen, (0..partitions).collect::<BTreeSet<_>>(), "{n} members over {partitions}");
                let loads: Vec<usize> = all.iter().map(Vec::len).collect();
                let (lo, hi) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
                assert!(hi - lo <= 1, "{n} members over {partitions}: loads {loads:?}");
            }
        }
        assert!(share_of(&[], 1, 16).is_empty(), "no members, no shares");
        assert!(share_of(&[1, 2], 3, 16).is_empty(), "a member not in the list holds nothing");
    }

    #[test]
    fn a_member_joining_or_leaving_moves_few_partitions_of_the_others() {
        // Over 16 partitions, the ideal is 16/(n+1) moved on a join; a
        // range assignment (Kafka's default) moves far more.
        for n in 2..=7i64 {
            let before: Vec<i64> = (1..=n).collect();
            let after: Vec<i64> = (1..=n + 1).collect();
            let (b, a) = (shares(&before, 16), shares(&after, 16));
            let moved: usize = (0..n as usize).map(|i| b[i].iter().filter(|p| !a[i].contains(p)).count()).sum();
            assert!(moved <= 2 * 16 / (n as usize + 1) + 1, "{n} → {} members moved {moved} of 16", n + 1);
        }
    }
}
