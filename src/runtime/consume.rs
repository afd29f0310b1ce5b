//! Consuming: polling a batch, acting on rebalances between polls, restoring (or
//! claiming) assigned partitions off the loop's thread, and positioning each input where
//! the partition's durable state says it continues; the time-ordered merge of a batch's
//! input topics.
//!
//! Invariant: a record is handed to the backend only if its partition's part is
//! installed and the consumer was at the part's position when it fetched it; anything
//! else is dropped and read again from that position.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::{Duration, Instant};

use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::kafka::RebalanceEvent;
use super::restore::RestoreError;
use super::{Backend, Part, RuntimeError, Worker, crash, disposition};

/// Per input topic-partition of a batch: the first offset taken and the next one.
pub(super) type BatchOffsets = HashMap<(String, i32), (i64, i64)>;

impl<B: Backend> Worker<B> {
    /// Whether record `m` of a batch may be processed (its partition's part is installed
    /// and the consumer was where the part says it continues), noting its offset in
    /// `offsets` if so.
    pub(super) fn admit(&mut self, m: &OwnedMessage, offsets: &mut BatchOffsets) -> bool {
        if !self.parts.contains_key(&m.partition()) || !self.keep_in_place(m) {
            return false;
        }
        offsets
            .entry((m.topic().to_owned(), m.partition()))
            .and_modify(|(_, next)| *next = m.offset() + 1)
            .or_insert((m.offset(), m.offset() + 1));
        true
    }

    /// Collects up to a batch of records of restored partitions. Rebalances are acted on
    /// between polls: records of revoked partitions are dropped unprocessed, newly
    /// assigned partitions are paused until their state is restored.
    pub(super) fn poll_batch(
        &mut self,
        shutdown: &CancellationToken,
    ) -> Result<Vec<OwnedMessage>, RuntimeError> {
        let deadline = Instant::now() + self.settings.batch_interval();
        let mut batch = Vec::new();
        let waiting = B::work_waiting(self);
        let linger = Duration::from_millis(self.settings.batch_linger_ms);
        // When the batch's first record came.
        let mut first: Option<Instant> = None;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            if batch.len() >= self.settings.batch_max_records
                || remaining.is_zero()
                || shutdown.is_cancelled()
            {
                break;
            }
            // Waiting only for the first record: once the batch holds some, it takes what
            // the consumer has already fetched and closes when that runs out. A batch is
            // then as large as what arrived while the previous one committed — small, and
            // committed at once, at a low rate; up to `batch_max_records` under a backlog.
            let lingering = first
                .map(|at: Instant| linger.saturating_sub(at.elapsed()))
                .unwrap_or_default();
            let wait = if batch.is_empty() && !waiting {
                remaining.min(Duration::from_millis(100))
            } else {
                lingering.min(remaining)
            };
            match self.consumer.poll(wait) {
                Some(Ok(m)) if self.parts.contains_key(&m.partition()) => {
                    first.get_or_insert_with(Instant::now);
                    batch.push(m.detach());
                }
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
                None if (!batch.is_empty() || waiting) && lingering.is_zero() => break,
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

    pub(super) fn apply_rebalances(
        &mut self,
        batch: &mut Vec<OwnedMessage>,
    ) -> Result<(), RuntimeError> {
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
                        if !lost && ps.parkable() {
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
                            Some(ps) if B::reusable(self, p, &ps) => {
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
        B::restore(self, partitions, job);
    }

    /// Restores the partitions queued by the last cycle. Their consumer has read past
    /// the state that will be restored, so it will be moved back.
    pub(super) fn restore_again(&mut self) {
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
    pub(super) fn install_restored(&mut self) -> Result<(), RuntimeError> {
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
                        ps.log_restored(p, done.elapsed);
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
            let from_state = self.parts.get(&p).and_then(|ps| ps.position(base));
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
    pub(super) fn move_back_fetched_ahead(&mut self) {
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
    pub(super) fn keep_in_place(&mut self, m: &OwnedMessage) -> bool {
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

    pub(super) fn seek(
        &self,
        topic: &str,
        partition: i32,
        offset: Offset,
    ) -> Result<(), KafkaError> {
        if crash::fail_seek() {
            return Err(KafkaError::Seek("injected seek failure".into()));
        }
        self.consumer
            .seek(topic, partition, offset, Duration::from_secs(10))
    }
}

/// Orders a batch so that, per partition number, the records of co-partitioned input
/// topics interleave by timestamp (a stage with several inputs then sees, say, a restock
/// before a later order although the two came from different topics), while every
/// topic-partition keeps its own order.
pub(super) fn in_time_order(batch: Vec<OwnedMessage>) -> Vec<OwnedMessage> {
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
