//! The stage runtime: a consume-transform-produce loop generic over a [`Stage`].
//!
//! Each cycle polls a batch (up to `batch_max_records`, or `batch_interval_ms`), acts on
//! rebalances between polls, runs the stage over every record, due timer and recorded
//! outcome of an earlier external call ([`dispatch`]), performs the batch's new external
//! calls (recording their outcomes in state), then commits ([`commit`]):
//!
//! - `exactly_once`: outputs, changelog entries, DLQ records and the input offsets in one
//!   Kafka transaction (`send_offsets_to_transaction` with the consumer's group metadata);
//! - `at_least_once`: the changelog batch first — state, input positions, the dedup window
//!   and the batch's outputs (the outbox) — then, once it is durable and this worker is
//!   still the partition's only writer, the outputs; the group offsets last, as a hint.
//!
//! Either way the state records, per input partition, the offset of the first input it
//! does not reflect; a partition's consumer is positioned there when its state is
//! restored, so an input is never processed twice, and every output that becomes visible
//! was decided by a committed batch: a replay re-sends it, byte for byte, never decides
//! again (see [`changelog`]).
//!
//! State is restored on a thread of its own ([`restore`]) while the loop keeps polling;
//! records of partitions being restored are dropped, and read again from the restored
//! position.
//!
//! Invariant: in-memory state always equals the state of the last committed batch when a
//! poll happens; a batch that fails is rolled back (or its partitions restored from the
//! changelog) and its inputs read again from the state's positions.

pub mod changelog;
pub mod clock;
mod commit;
pub mod crash;
mod dispatch;
pub mod disposition;
pub mod effects;
pub mod kafka;
pub mod outbox;
pub mod restore;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use crate::config::{Guarantee, Settings};
use crate::events::codec::Codec;
use crate::metrics::Metrics;
use crate::stages::Stage;
use crate::topics::{self, Topics};
use changelog::PartitionState;
use clock::Clock;
use dispatch::PendingEffect;
use effects::EffectHandler;
use kafka::{RebalanceEvent, WorkerContext};
use restore::{RestoreError, Restored};

/// Header naming an event's type on every record OrderFlow produces.
pub const EVENT_TYPE_HEADER: &str = "event-type";
pub const CORRELATION_HEADER: &str = "correlation-id";
/// Headers of a dead letter; its key and value are the original record's.
pub mod dlq_headers {
    pub const SOURCE_TOPIC: &str = "orderflow.source.topic";
    pub const SOURCE_PARTITION: &str = "orderflow.source.partition";
    pub const SOURCE_OFFSET: &str = "orderflow.source.offset";
    pub const STAGE: &str = "orderflow.stage";
    pub const ERROR_CLASS: &str = "orderflow.error.class";
    pub const ERROR_MESSAGE: &str = "orderflow.error.message";
    /// Present when the value was cut to fit the broker's limit: the original's size.
    pub const TRUNCATED: &str = "orderflow.truncated.original-bytes";
    /// On a dead letter of an output the broker refused: the topic it was meant for.
    pub const TARGET_TOPIC: &str = "orderflow.target.topic";
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create a Kafka client: {0}")]
    Client(KafkaError),
    #[error(
        "the brokers at {brokers} refused transactions ({source}); the guarantee `exactly_once` needs a broker with transaction support (Apache Kafka, Redpanda). On other Kafka-protocol brokers set ORDERFLOW_GUARANTEE=at_least_once (settings key `guarantee`)"
    )]
    TransactionsUnsupported { brokers: String, source: KafkaError },
    #[error(
        "initializing the transactional producer {transactional_id} failed: {source}; if another worker runs with the same instance ID (ORDERFLOW_INSTANCE_ID), it fenced this one"
    )]
    ProducerInit {
        transactional_id: String,
        source: KafkaError,
    },
    #[error("subscribing to {topics:?} failed: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("cannot start the runtime for external calls: {0}")]
    EffectRuntime(std::io::Error),
    #[error("stage {0} stopped unexpectedly (thread panicked)")]
    Panicked(&'static str),
}

/// Runs `stage` on its own thread until `shutdown` is cancelled.
pub fn spawn<S: Stage>(
    stage: S,
    settings: Settings,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> std::thread::JoinHandle<Result<(), RuntimeError>> {
    spawn_with_effects(stage, settings, metrics, clock, None, shutdown)
}

/// Like [`spawn`], for a stage whose requests (see [`crate::stages::Ctx::request`])
/// `effects` performs.
pub fn spawn_with_effects<S: Stage>(
    stage: S,
    settings: Settings,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    effects: Option<Arc<dyn EffectHandler>>,
    shutdown: CancellationToken,
) -> std::thread::JoinHandle<Result<(), RuntimeError>> {
    let name = stage.name();
    std::thread::Builder::new()
        .name(format!("stage-{name}"))
        .spawn(move || {
            let span = tracing::info_span!("stage", stage = name);
            let _g = span.enter();
            let result = Worker::new(stage, settings, metrics, clock, effects)
                .and_then(|mut w| w.run(&shutdown));
            if let Err(e) = &result {
                tracing::error!(error = %e, "stage worker stopped");
            }
            result
        })
        .expect("spawning a thread")
}

struct Worker<S: Stage> {
    stage: S,
    name: &'static str,
    settings: Settings,
    topics: Topics,
    codec: Codec,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    consumer: BaseConsumer<WorkerContext>,
    producer: FutureProducer,
    /// State per assigned and restored partition number (shared by all co-partitioned
    /// input topics).
    parts: BTreeMap<i32, PartitionState<S::State>>,
    /// State of revoked partitions, kept until the next assignment says whether this
    /// worker gets them back; reused only if nobody wrote their changelog meanwhile.
    parked: BTreeMap<i32, PartitionState<S::State>>,
    /// Partitions whose state is being restored, with the restore job's number.
    restoring: BTreeMap<i32, u64>,
    /// Input topic-partitions of restored partitions not yet seen at their position: the
    /// offset to continue from, and the batch in which the consumer was moved there.
    unpositioned: HashMap<(String, i32), (i64, Option<u64>)>,
    /// Batches processed so far.
    batches: u64,
    /// Input topic-partitions whose records were dropped while their state was restored.
    fetched_ahead: HashSet<(String, i32)>,
    /// Partitions to restore again (a failed batch, a fenced write, a failed seek) after
    /// the next poll; their state is already dropped.
    to_restore: BTreeSet<i32>,
    next_job: u64,
    restored_tx: mpsc::Sender<Restored<S::State>>,
    restored_rx: mpsc::Receiver<Restored<S::State>>,
    /// Input topic-partitions currently assigned.
    assigned: HashSet<(String, i32)>,
    changelog: String,
    dlq: String,
    /// Consecutive failed batches, for backoff.
    failures: u32,
    effects: Option<Arc<dyn EffectHandler>>,
    /// Drives effect calls from this worker's thread.
    effect_runtime: tokio::runtime::Runtime,
    /// Requests made by the batch being processed.
    pending_effects: Vec<PendingEffect>,
}

impl<S: Stage> Worker<S> {
    fn new(
        stage: S,
        settings: Settings,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
        effects: Option<Arc<dyn EffectHandler>>,
    ) -> Result<Self, RuntimeError> {
        let name = stage.name();
        let topics = settings.topics();
        let consumer = kafka::consumer(&settings, name).map_err(RuntimeError::Client)?;
        let producer = kafka::producer(&settings, name).map_err(RuntimeError::Client)?;
        let (restored_tx, restored_rx) = mpsc::channel();
        let w = Worker {
            changelog: topics.changelog(name),
            dlq: topics.name(topics::DLQ),
            stage,
            name,
            settings,
            topics,
            codec: Codec::new(),
            metrics,
            clock,
            consumer,
            producer,
            parts: BTreeMap::new(),
            parked: BTreeMap::new(),
            restoring: BTreeMap::new(),
            unpositioned: HashMap::new(),
            batches: 0,
            fetched_ahead: HashSet::new(),
            to_restore: BTreeSet::new(),
            next_job: 0,
            restored_tx,
            restored_rx,
            assigned: HashSet::new(),
            failures: 0,
            effects,
            effect_runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(RuntimeError::EffectRuntime)?,
            pending_effects: Vec::new(),
        };
        if w.settings.guarantee == Guarantee::ExactlyOnce {
            w.init_transactions()?;
        }
        Ok(w)
    }

    fn run(&mut self, shutdown: &CancellationToken) -> Result<(), RuntimeError> {
        let inputs: Vec<String> = self
            .stage
            .inputs()
            .iter()
            .map(|t| self.topics.name(t))
            .collect();
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&refs)
            .map_err(|source| RuntimeError::Subscribe {
                topics: inputs.clone(),
                source,
            })?;
        tracing::info!(inputs = ?inputs, guarantee = %self.settings.guarantee, "stage started");
        while !shutdown.is_cancelled() {
            self.install_restored()?;
            if !self.send_outboxes() {
                // The outputs of committed batches go first; nothing new until they are out.
                // The consumer is polled to stay in the group; a record it hands over now
                // is read again once the partition is moved back to its position.
                if let Some(Ok(m)) = self.consumer.poll(Duration::ZERO) {
                    self.fetched_ahead
                        .insert((m.topic().to_owned(), m.partition()));
                }
                self.apply_rebalances(&mut Vec::new())?;
                continue;
            }
            self.move_back_fetched_ahead();
            let batch = self.poll_batch(shutdown)?;
            // After a poll, so that a worker the group has expelled learns it before it
            // claims anything again.
            self.restore_again();
            self.process_and_commit(batch)?;
        }
        tracing::info!("stage stopped");
        Ok(())
    }

    /// Collects up to a batch of records of restored partitions. Rebalances are acted on
    /// between polls: records of revoked partitions are dropped unprocessed, newly
    /// assigned partitions are paused until their state is restored.
    fn poll_batch(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OwnedMessage>, RuntimeError> {
        let deadline = Instant::now() + self.settings.batch_interval();
        let mut batch = Vec::new();
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if batch.len() >= self.settings.batch_max_records
                || remaining.is_zero()
                || shutdown.is_cancelled()
            {
                break;
            }
            match self
                .consumer
                .poll(remaining.min(Duration::from_millis(100)))
            {
                Some(Ok(m)) if self.parts.contains_key(&m.partition()) => batch.push(m.detach()),
                // A partition still restoring reads from its restored position later; the
                // consumer, now ahead of it, will be moved back.
                Some(Ok(m)) => {
                    tracing::debug!(
                        topic = m.topic(),
                        partition = m.partition(),
                        offset = m.offset(),
                        "dropped while restoring"
                    );
                    self.fetched_ahead
                        .insert((m.topic().to_owned(), m.partition()));
                }
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            self.apply_rebalances(&mut batch)?;
        }
        self.apply_rebalances(&mut batch)?;
        Ok(batch)
    }

    /// Input topic-partitions of the partition numbers `partitions`.
    fn input_tpl(&self, partitions: &[i32]) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &self.assigned {
            if partitions.contains(p) {
                tpl.add_partition(t, *p);
            }
        }
        tpl
    }

    fn apply_rebalances(&mut self, batch: &mut Vec<OwnedMessage>) -> Result<(), RuntimeError> {
        for event in self.consumer.context().take_events() {
            match event {
                RebalanceEvent::Revoked {
                    partitions: tps,
                    lost,
                } => {
                    self.metrics
                        .rebalances
                        .with_label_values(&[self.name, if lost { "lost" } else { "revoke" }])
                        .inc();
                    for tp in tps {
                        batch.retain(|m| !(m.topic() == tp.0 && m.partition() == tp.1));
                        self.unpositioned.remove(&tp);
                        self.fetched_ahead.remove(&tp);
                        self.assigned.remove(&tp);
                    }
                    let owned: HashSet<i32> = self.assigned.iter().map(|(_, p)| *p).collect();
                    self.restoring.retain(|p, _| owned.contains(p));
                    self.to_restore.retain(|p| owned.contains(p));
                    let revoked: Vec<i32> = self
                        .parts
                        .keys()
                        .filter(|p| !owned.contains(p))
                        .copied()
                        .collect();
                    for p in revoked {
                        let ps = self.parts.remove(&p).expect("listed above");
                        // Only a writer that knows where its log ends can tell later
                        // whether anybody wrote since.
                        if !lost && ps.log_end.is_some() {
                            self.parked.insert(p, ps);
                        }
                    }
                }
                RebalanceEvent::Assigned(tps) => {
                    self.metrics
                        .rebalances
                        .with_label_values(&[self.name, "assign"])
                        .inc();
                    self.assigned.extend(tps);
                    let owned: BTreeSet<i32> = self.assigned.iter().map(|(_, p)| *p).collect();
                    let mut parked = std::mem::take(&mut self.parked);
                    let mut missing: Vec<i32> = Vec::new();
                    for p in owned {
                        if self.parts.contains_key(&p) || self.restoring.contains_key(&p) {
                            continue;
                        }
                        match parked.remove(&p) {
                            Some(ps) if self.untouched_since(p, &ps) => {
                                self.parts.insert(p, ps);
                                self.position_inputs(p);
                            }
                            _ => missing.push(p),
                        }
                    }
                    self.start_restore(missing);
                    tracing::info!(
                        partitions = ?self.parts.keys().collect::<Vec<_>>(),
                        restoring = ?self.restoring.keys().collect::<Vec<_>>(),
                        "assignment"
                    );
                }
            }
        }
        self.metrics
            .assigned_partitions
            .with_label_values(&[self.name])
            .set(self.parts.len() as i64);
        Ok(())
    }

    /// Whether nobody wrote partition `p`'s changelog since this worker's last write.
    fn untouched_since(&self, p: i32, ps: &PartitionState<S::State>) -> bool {
        let Some(end) = ps.log_end else {
            return false;
        };
        match self
            .consumer
            .fetch_watermarks(&self.changelog, p, Duration::from_secs(10))
        {
            Ok((_, high)) => high == end + 1,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cannot read the changelog's end; restoring");
                false
            }
        }
    }

    /// Restores the state of `partitions` on another thread; their records are dropped
    /// meanwhile.
    fn start_restore(&mut self, partitions: Vec<i32>) {
        if partitions.is_empty() {
            return;
        }
        self.unpositioned
            .retain(|(_, p), _| !partitions.contains(p));
        self.next_job += 1;
        let job = self.next_job;
        for p in &partitions {
            self.parts.remove(p);
            self.restoring.insert(*p, job);
        }
        tracing::info!(?partitions, job, "restoring state");
        let inputs = restore::Inputs {
            group: self.settings.group_id(self.name),
            topics: self
                .stage
                .inputs()
                .iter()
                .map(|t| self.topics.name(t))
                .collect(),
        };
        restore::spawn(
            self.settings.clone(),
            self.changelog.clone(),
            partitions,
            Some(inputs),
            job,
            self.restored_tx.clone(),
        );
    }

    /// Restores the partitions queued by the last cycle. Their consumer has read past
    /// the state that will be restored, so it will be moved back.
    fn restore_again(&mut self) {
        let owned: HashSet<i32> = self.assigned.iter().map(|(_, p)| *p).collect();
        let again: Vec<i32> = std::mem::take(&mut self.to_restore)
            .into_iter()
            .filter(|p| owned.contains(p))
            .collect();
        let tps: Vec<(String, i32)> = self
            .assigned
            .iter()
            .filter(|(_, p)| again.contains(p))
            .cloned()
            .collect();
        self.fetched_ahead.extend(tps);
        self.start_restore(again);
    }

    /// Takes in every finished restore whose partitions are still this worker's.
    fn install_restored(&mut self) -> Result<(), RuntimeError> {
        while let Ok(done) = self.restored_rx.try_recv() {
            self.metrics
                .restore_seconds
                .with_label_values(&[self.name])
                .observe(done.elapsed.as_secs_f64());
            let wanted: Vec<i32> = done
                .partitions
                .iter()
                .copied()
                .filter(|p| self.restoring.get(p) == Some(&done.job))
                .collect();
            match done.result {
                Ok(states) => {
                    for (p, ps) in states {
                        if !wanted.contains(&p) {
                            continue;
                        }
                        tracing::info!(
                            partition = p,
                            keys = ps.state.len(),
                            seen = ps.seen.len(),
                            timers = ps.timers.len(),
                            pending_outcomes = ps.outcomes.len(),
                            unsent_batches = ps.outbox.len(),
                            elapsed_ms = done.elapsed.as_millis() as u64,
                            "state restored"
                        );
                        self.restoring.remove(&p);
                        self.parts.insert(p, ps);
                        self.position_inputs(p);
                    }
                }
                Err(e @ RestoreError::Corrupt { .. }) => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(error = %e, partitions = ?wanted, "restore failed; trying again");
                    std::thread::sleep(disposition::backoff(2, 100, 2_000));
                    for p in &wanted {
                        self.restoring.remove(p);
                    }
                    self.start_restore(wanted);
                }
            }
        }
        Ok(())
    }

    /// Records where partition `p`'s inputs must continue: the first offset its state
    /// does not reflect (else the group's committed offset, else the partition's start).
    /// The consumer is moved there only once it is seen ahead of it (see
    /// [`Worker::keep_in_place`]): seeking a partition before it has fetched anything is
    /// not reliable, and a consumer behind the target only re-reads inputs the state
    /// already reflects, which are skipped.
    fn position_inputs(&mut self, p: i32) {
        let tpl = self.input_tpl(&[p]);
        let committed = self
            .consumer
            .committed_offsets(tpl.clone(), Duration::from_secs(10))
            .ok();
        let mut targets = Vec::new();
        for e in tpl.elements() {
            let base = self.topics.base(e.topic()).unwrap_or(e.topic());
            let from_state = self
                .parts
                .get(&p)
                .and_then(|ps| ps.positions.peek(base).copied());
            let target = from_state
                .or_else(|| {
                    committed
                        .as_ref()
                        .and_then(|c| c.find_partition(e.topic(), p))
                        .and_then(|c| match c.offset() {
                            Offset::Offset(o) => Some(o),
                            _ => None,
                        })
                })
                .or_else(|| {
                    self.consumer
                        .fetch_watermarks(e.topic(), p, Duration::from_secs(10))
                        .ok()
                        .map(|(low, _)| low)
                });
            match target {
                Some(t) => targets.push((e.topic().to_owned(), t)),
                None => {
                    tracing::error!(
                        topic = e.topic(),
                        partition = p,
                        "cannot tell where the input starts; restoring the partition again"
                    );
                    self.parts.remove(&p);
                    self.to_restore.insert(p);
                    return;
                }
            }
        }
        for (t, target) in targets {
            let tp = (t, p);
            tracing::debug!(topic = %tp.0, partition = p, target, fetched_ahead = self.fetched_ahead.contains(&tp), "positioning input");
            // A consumer that has fetched this partition can be moved at once; one that has
            // not is moved when its first record shows it ahead.
            if self.fetched_ahead.contains(&tp) {
                if let Err(err) = self.seek(&tp.0, p, Offset::Offset(target)) {
                    tracing::error!(topic = %tp.0, partition = p, error = %err, "cannot position the input; restoring the partition again");
                    self.parts.remove(&p);
                    self.to_restore.insert(p);
                    return;
                }
                self.fetched_ahead.remove(&tp);
                self.unpositioned.insert(tp, (target, Some(self.batches)));
            } else {
                self.unpositioned.insert(tp, (target, None));
            }
        }
    }

    /// Moves restored partitions whose consumer handed over records that were not
    /// processed back to their position.
    fn move_back_fetched_ahead(&mut self) {
        if self.fetched_ahead.is_empty() {
            return;
        }
        let ahead: BTreeSet<i32> = self
            .fetched_ahead
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| self.parts.contains_key(p))
            .collect();
        for p in ahead {
            self.position_inputs(p);
        }
    }

    /// Whether record `m` may be processed. A consumer found ahead of where a restored
    /// partition must continue (it fetched while the state was being restored) is moved
    /// back, and the rest of the batch's records of that partition are dropped; the first
    /// record polled after the move is where the partition continues (offsets may skip:
    /// transaction markers, compaction). A partition that cannot be moved is restored
    /// again, never read on from elsewhere.
    fn keep_in_place(&mut self, m: &OwnedMessage) -> bool {
        let tp = (m.topic().to_owned(), m.partition());
        let Some((target, moved_in)) = self.unpositioned.get(&tp).copied() else {
            return true;
        };
        match moved_in {
            Some(batch) if batch == self.batches => return false,
            Some(_) => {
                self.unpositioned.remove(&tp);
                return true;
            }
            None if m.offset() <= target => {
                self.unpositioned.remove(&tp);
                return true;
            }
            None => {}
        }
        tracing::debug!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            target,
            "consumer ahead of the restored position; moving it back"
        );
        if let Err(err) = self.seek(m.topic(), m.partition(), Offset::Offset(target)) {
            tracing::error!(topic = m.topic(), partition = m.partition(), error = %err, "cannot position the input; restoring the partition again");
            self.parts.remove(&m.partition());
            self.to_restore.insert(m.partition());
            self.unpositioned.retain(|(_, p), _| *p != m.partition());
            return false;
        }
        self.unpositioned.insert(tp, (target, Some(self.batches)));
        false
    }

    fn seek(&self, topic: &str, partition: i32, offset: Offset) -> Result<(), KafkaError> {
        if crash::fail_seek() {
            return Err(KafkaError::Seek("injected seek failure".into()));
        }
        self.consumer
            .seek(topic, partition, offset, Duration::from_secs(10))
    }
}

fn header<'m>(m: &'m OwnedMessage, key: &str) -> Option<&'m [u8]> {
    use rdkafka::message::Headers;
    let h = m.headers()?;
    h.iter().find(|h| h.key == key).and_then(|h| h.value)
}

/// Orders a batch so that, per partition number, the records of co-partitioned input
/// topics interleave by timestamp (a stage with several inputs then sees, say, a restock
/// before a later order although the two came from different topics), while every
/// topic-partition keeps its own order.
fn in_time_order(batch: Vec<OwnedMessage>) -> Vec<OwnedMessage> {
    let single_topic = batch.windows(2).all(|w| w[0].topic() == w[1].topic());
    if single_topic {
        return batch;
    }
    let order = {
        let keys: Vec<(i32, &str, i64)> = batch
            .iter()
            .map(|m| {
                (
                    m.partition(),
                    m.topic(),
                    m.timestamp().to_millis().unwrap_or(0),
                )
            })
            .collect();
        merge_order(&keys)
    };
    let mut slots: Vec<Option<OwnedMessage>> = batch.into_iter().map(Some).collect();
    order
        .into_iter()
        .map(|i| slots[i].take().expect("each index once"))
        .collect()
}

/// The merge of [`in_time_order`] over (partition, topic, timestamp) in arrival order:
/// indexes into `records`. Per partition, repeatedly takes the head of the topic queue
/// with the earliest timestamp (ties: the earlier arrival).
fn merge_order(records: &[(i32, &str, i64)]) -> Vec<usize> {
    let mut queues: BTreeMap<i32, BTreeMap<&str, std::collections::VecDeque<usize>>> =
        BTreeMap::new();
    for (i, (p, t, _)) in records.iter().enumerate() {
        queues
            .entry(*p)
            .or_default()
            .entry(*t)
            .or_default()
            .push_back(i);
    }
    let mut out = Vec::with_capacity(records.len());
    for topics in queues.values_mut() {
        loop {
            let next = topics
                .values()
                .filter_map(|q| q.front().copied())
                .min_by_key(|&i| (records[i].2, i));
            let Some(i) = next else { break };
            topics.get_mut(records[i].1).and_then(|q| q.pop_front());
            out.push(i);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::merge_order;

    fn r(p: i32, t: &'static str, ts: i64) -> (i32, &'static str, i64) {
        (p, t, ts)
    }

    #[test]
    fn inputs_interleave_by_time_per_partition_and_keep_their_own_order() {
        let records = vec![
            r(0, "orders", 30),   // 0
            r(0, "orders", 10),   // 1: out of time order within its topic-partition
            r(0, "commands", 5),  // 2
            r(1, "orders", 1),    // 3
            r(0, "commands", 40), // 4
            r(0, "orders", 35),   // 5
        ];
        // Partition 0: commands@5, then orders in their own order (30 before 10, as they
        // arrived), orders@35, commands@40. Partition 1 alone.
        assert_eq!(merge_order(&records), vec![2, 0, 1, 5, 4, 3]);
    }

    #[test]
    fn equal_timestamps_keep_arrival_order() {
        let records = vec![r(0, "b", 7), r(0, "a", 7), r(0, "b", 7)];
        assert_eq!(merge_order(&records), vec![0, 1, 2]);
    }
}
