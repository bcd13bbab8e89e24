//! Consumer group members: the share of the log's partitions a worker reads,
//! assigned by Kafka's group protocol or handed by the workers' PostgreSQL
//! membership (the cluster module's `membership`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;

use super::{KafkaLog, KafkaSource, SourceContext, log_client_error};
use crate::eventlog::{EventLogError, Partition};

impl KafkaLog {
    /// A source that joins consumer group `group` on the topic: Kafka
    /// decides which partitions it reads ([`GroupSource::next_assignment`]).
    /// `session_timeout` is how long the group waits for a silent member
    /// (a killed worker) before moving its partitions.
    pub fn group_source(&self, group: &str, session_timeout: Duration) -> Result<GroupSource, EventLogError> {
        let ms = session_timeout.as_millis().max(1000);
        let consumer = self.group_consumer(group, Arc::default(), |c| {
            c.set("session.timeout.ms", ms.to_string())
                // A member learns that the group is rebalancing (another joined
                // or left) from its next heartbeat: every 0.5 s at most, rather
                // than librdkafka's third of the session (3.3 s by default),
                // which a join otherwise waits on (docs/cluster.md, "Rebalances").
                .set("heartbeat.interval.ms", (ms / 3).min(500).to_string());
        })?;
        consumer
            .subscribe(&[&self.cfg.topic])
            .map_err(|e| EventLogError::Unavailable(format!("log.kafka: cannot join group {group}: {e}")))?;
        Ok(KafkaSource::over(consumer, &self.cfg.topic, &[]))
    }

    /// A source whose share something else hands it through `state`
    /// ([`GroupState::hand`]; the workers' PostgreSQL membership): it never
    /// joins a Kafka group; `group` only names it to the broker. A source
    /// made again over the same state takes the share it holds at once.
    pub fn handed_source(&self, group: &str, state: Arc<GroupState>) -> Result<GroupSource, EventLogError> {
        let consumer = self.group_consumer(group, state.clone(), |_| {})?;
        state.moved.store(true, Ordering::SeqCst);
        Ok(KafkaSource::over(consumer, &self.cfg.topic, &[]))
    }

    fn group_consumer(
        &self,
        group: &str,
        state: Arc<GroupState>,
        settings: impl FnOnce(&mut ClientConfig),
    ) -> Result<BaseConsumer<GroupContext>, EventLogError> {
        let mut client = self.cfg.client();
        client
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest")
            .set("fetch.wait.max.ms", "50");
        settings(&mut client);
        client
            .create_with_context(GroupContext { state })
            .map_err(|e| EventLogError::Unavailable(format!("log.kafka: cannot create a group consumer: {e}")))
    }
}

/// A group source's librdkafka context: Kafka's rebalance callbacks write
/// its [`GroupState`].
#[derive(Debug)]
pub struct GroupContext {
    state: Arc<GroupState>,
}

/// What the group told this member: from Kafka's rebalance callbacks, or
/// handed by the PostgreSQL membership (which keeps it across the sources
/// a pipeline makes, so that making one again is not a new member).
#[derive(Debug, Default)]
pub struct GroupState {
    /// The partitions assigned last; `None` after a revocation.
    assignment: Mutex<Option<Vec<Partition>>>,
    /// The assignment changed since the source last took it.
    moved: AtomicBool,
    /// How many times the PostgreSQL membership has looked at the group.
    looks: AtomicU64,
}

impl ClientContext for GroupContext {
    fn error(&self, error: KafkaError, reason: &str) {
        log_client_error(error, reason);
    }
}

impl ConsumerContext for GroupContext {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.state.hand(Some(tpl.elements().iter().map(|e| e.partition() as Partition).collect()))
            }
            Rebalance::Revoke(_) => self.state.hand(None),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "The consumer group failed to rebalance; librdkafka retries.");
            }
        }
    }
}

impl GroupState {
    /// The membership looked at the group (and handed any change).
    pub fn looked(&self) {
        self.looks.fetch_add(1, Ordering::SeqCst);
    }

    /// How many times the membership has looked at the group.
    pub fn looks(&self) -> u64 {
        self.looks.load(Ordering::SeqCst)
    }

    /// The share last handed (`None` before the first or after a revocation).
    pub fn share(&self) -> Option<Vec<Partition>> {
        self.assignment.lock().ok().and_then(|a| a.clone())
    }

    /// Gives the member a new share (`None`: it holds nothing until the
    /// next): the source stops reading its partitions at once, and the next
    /// [`GroupSource::next_assignment`] takes the share.
    pub fn hand(&self, share: Option<Vec<Partition>>) {
        let partitions =
            share.as_ref().map(|a: &Vec<Partition>| tracing::field::display(kappa_runtime::logging::listed(a)));
        tracing::info!(partitions, "The consumer group moved partitions.");
        if let Ok(mut a) = self.assignment.lock() {
            *a = share;
        }
        self.moved.store(true, Ordering::SeqCst);
    }
}

/// A member of a consumer group, reading the share Kafka assigns it.
pub type GroupSource = KafkaSource<GroupContext>;

impl GroupSource {
    /// Where shares are handed ([`GroupState::hand`]), held weakly.
    pub fn state(&self) -> Weak<GroupState> {
        Arc::downgrade(&self.consumer.context().state)
    }

    /// Whether the group moved partitions since [`GroupSource::next_assignment`]:
    /// the worker must checkpoint and take its new share.
    pub fn moved(&self) -> bool {
        self.consumer.context().state.moved.load(Ordering::SeqCst)
    }

    /// Whether the group moved partitions and the share it gave next is
    /// known and lacks one this source reads: another member takes it (and
    /// claims it) now. Unknown after Kafka's revocation: false.
    pub fn loses_partitions(&self) -> bool {
        self.moved()
            && self
                .consumer
                .context()
                .state
                .share()
                .is_some_and(|next| self.positions.keys().any(|p| !next.contains(p)))
    }

    /// Makes the next [`GroupSource::next_assignment`] take the current
    /// share again (after a failure that did not move partitions).
    pub fn retake(&self) {
        self.consumer.context().state.moved.store(true, Ordering::SeqCst);
    }

    /// Waits (serving the group protocol) until Kafka assigns this member
    /// its share, and reads exactly that share from offset 0 until seeked.
    /// `None` if `stop` returned true first. An empty share is possible
    /// (more members than partitions).
    pub fn next_assignment(&mut self, stop: impl Fn() -> bool) -> Option<Vec<Partition>> {
        let ctx = self.consumer.context().state.clone();
        while self.wait_for_move(&stop) {
            if !ctx.moved.swap(false, Ordering::SeqCst) {
                continue;
            }
            // After a revocation there is no share yet: wait for the assignment.
            let share = ctx.assignment.lock().ok().and_then(|a| a.clone());
            if let Some(share) = share {
                self.positions = share.iter().map(|p| (*p, 0)).collect();
                self.ends = share.iter().map(|p| (*p, 0)).collect();
                self.at_end.clear();
                self.reassign = !share.is_empty();
                return Some(share);
            }
        }
        None
    }

    /// Serves the group protocol once, without waiting. A share that reads
    /// the archive first calls it with every batch: a member that does not
    /// poll for `max.poll.interval.ms` is dropped from the group. Records
    /// fetched meanwhile are dropped: the log is positioned again when the
    /// share reaches it.
    pub fn serve_group(&mut self) {
        if let Some(Err(e)) = self.consumer.poll(Duration::ZERO)
            && !matches!(e, KafkaError::PartitionEOF(_))
        {
            self.warn(&e);
        }
    }

    /// Serves the group protocol until the group moves partitions (true) or
    /// `stop` returns true (false). Records fetched meanwhile are dropped:
    /// they are read again after the seek to the checkpoint.
    pub fn wait_for_move(&mut self, stop: impl Fn() -> bool) -> bool {
        while !stop() {
            if self.moved() {
                return true;
            }
            // Short: a share handed by the PostgreSQL membership is taken
            // within this, not at the next 100 ms.
            if let Some(Err(e)) = self.consumer.poll(Duration::from_millis(20))
                && !matches!(e, KafkaError::PartitionEOF(_))
            {
                self.warn(&e);
            }
        }
        false
    }
}

impl SourceContext for GroupContext {
    fn stale(&self) -> bool {
        self.state.moved.load(Ordering::SeqCst)
    }
}
