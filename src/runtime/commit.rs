//! Where a batch becomes durable: the two commit protocols, sending, and what a failure
//! does.
//!
//! - `at_least_once`: the changelog batch (state, positions, dedup window, outbox, marker)
//!   is sent and acknowledged; a partition whose records do not directly follow its
//!   previous write has another writer and is restored instead; then the outboxes are
//!   sent; then the group offsets are committed, as a hint only (the state's positions
//!   decide where a partition resumes). A failed changelog write restores the batch's
//!   partitions from the changelog, which is what a crash at that moment would do too.
//! - `exactly_once`: one transaction; on failure it is aborted (or the producer rebuilt),
//!   the state rolled back and the inputs rewound.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::consumer::{CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureRecord, Producer, PurgeConfig};
use rdkafka::{Offset, TopicPartitionList};

use super::changelog::{BatchRecords, ChangelogRecord, GEN_HEADER, SEQ_HEADER};
use super::crash::{self, Point};
use super::dead_letter::fit;
use super::dispatch::Outputs;
use super::disposition::{Disposition, backoff, classify};
use super::outbox::Out;
use super::stage::StageBackend;
use super::{Backend, EVENT_TYPE_HEADER, RuntimeError, Worker, dlq_headers, kafka};
use crate::config::Guarantee;
use crate::events::codec::DecodeHints;
use crate::stages::Stage;

const TXN_TIMEOUT: Duration = Duration::from_secs(30);
/// How often a failing transactional call is retried in place before the batch is
/// abandoned.
const MAX_IN_PLACE_RETRIES: u32 = 5;
/// Size to which an output the broker refused for good is cut, as a dead letter.
const REFUSED_OUTPUT_BYTES: usize = 64 * 1024;
/// Under `at_least_once`: how often the group offsets are committed, as a hint.
const OFFSET_HINT_EVERY: Duration = Duration::from_secs(1);

impl<S: Stage> Worker<StageBackend<S>> {
    pub(super) fn commit(
        &mut self,
        outs: Outputs,
        offsets: &HashMap<(String, i32), (i64, i64)>,
        records: usize,
    ) -> Result<(), RuntimeError> {
        crash::stall_before_commit();
        let started = Instant::now();
        let committed = match self.settings.guarantee {
            Guarantee::AtLeastOnce => self.commit_at_least_once(outs),
            Guarantee::ExactlyOnce => self.commit_transaction(outs, offsets)?,
        };
        if committed {
            self.failures = 0;
            self.metrics
                .batch_records
                .with_label_values(&[self.name])
                .observe(records as f64);
            self.metrics
                .commit_seconds
                .with_label_values(&[self.name])
                .observe(started.elapsed().as_secs_f64());
        } else {
            self.metrics.aborts.with_label_values(&[self.name]).inc();
            self.failures += 1;
            std::thread::sleep(backoff(self.failures.min(10), 100, 5_000));
        }
        Ok(())
    }

    /// The changelog records of every partition with something to write, and the outputs
    /// they carry (under `at_least_once`, in their outbox).
    fn batch_records(&self, mut outs: Outputs, outbox: bool) -> Vec<(i32, BatchRecords, Vec<Out>)> {
        let mut batches = Vec::new();
        for (p, ps) in &self.parts {
            let o = outs.remove(p).unwrap_or_default();
            let br = ps.pending_records(if outbox { &o } else { &[] });
            if !br.records.is_empty() || !o.is_empty() {
                batches.push((*p, br, o));
            }
        }
        batches
    }

    fn changelog_out(&self, partition: i32, generation: u64, r: &ChangelogRecord) -> Out {
        Out {
            topic: self.b.changelog.clone(),
            partition,
            key: r.key.clone().into_bytes(),
            payload: r.value.clone(),
            headers: vec![
                (SEQ_HEADER.to_owned(), r.seq.to_string().into_bytes()),
                (GEN_HEADER.to_owned(), generation.to_string().into_bytes()),
            ],
        }
    }

    /// Returns whether the batch committed (possibly with some partitions fenced and
    /// queued for restoring).
    fn commit_at_least_once(&mut self, outs: Outputs) -> bool {
        let batches = self.batch_records(outs, true);
        let mut log: Vec<Out> = Vec::new();
        for (p, br, _) in &batches {
            let generation = self.parts[p].generation;
            log.extend(
                br.records
                    .iter()
                    .map(|r| self.changelog_out(*p, generation, r)),
            );
        }
        if crash::is_armed(Point::MidChangelog) && log.len() > 1 {
            let _ = self.send_all(&log[..log.len() / 2]);
            crash::reached(Point::MidChangelog);
        }
        let sent = if crash::fail_changelog_write(log.len()) {
            let half = self.send_all(&log[..log.len() / 2]);
            tracing::warn!(sent = ?half.as_ref().map(Vec::len), "changelog write cut after its first half (injected)");
            Err(KafkaError::MessageProduction(
                RDKafkaErrorCode::MessageTimedOut,
            ))
        } else {
            self.send_all(&log)
        };
        let delivered = match sent {
            Ok(d) => d,
            Err(e) => {
                // Some of the records may be in the log, some may still arrive: what the
                // log holds is found out the way a new owner would, by restoring.
                tracing::warn!(error = %e, partitions = batches.len(), "changelog write failed; restoring the batch's partitions");
                self.producer
                    .purge(PurgeConfig::default().queue().inflight());
                for (p, _, _) in &batches {
                    self.parts.remove(p);
                    self.to_restore.insert(*p);
                }
                return false;
            }
        };
        let mut at = 0;
        for (p, br, o) in batches {
            let offsets = &delivered[at..at + br.records.len()];
            at += br.records.len();
            let ps = self
                .parts
                .get_mut(&p)
                .expect("batched partitions are present");
            let follows = match ps.log_end {
                Some(end) => offsets
                    .iter()
                    .enumerate()
                    .all(|(i, (_, o))| *o == end + 1 + i as i64),
                None => true,
            };
            if !follows {
                // Somebody else appended to this partition since this worker's last
                // write: its claim has made this batch stale, so nothing of it may show.
                tracing::warn!(
                    partition = p,
                    expected = ?ps.log_end.map(|e| e + 1),
                    got = ?offsets.first().map(|(_, o)| *o),
                    "another writer appended to the changelog; withholding the batch and restoring"
                );
                self.metrics.fenced.with_label_values(&[self.name]).inc();
                self.parts.remove(&p);
                self.to_restore.insert(p);
                continue;
            }
            ps.log_end = offsets.last().map(|(_, o)| *o).or(ps.log_end);
            ps.committed(&br, o);
        }
        crash::reached(Point::AfterChangelog);
        if !self.send_outboxes() {
            return true;
        }
        crash::reached(Point::AfterOutputs);
        self.b.offsets_owed = true;
        self.hint_offsets();
        crash::reached(Point::AfterOffsets);
        true
    }

    /// Under `at_least_once`: commits the group offsets of the committed batches, a hint
    /// for tools that read them (the state's positions decide where a partition
    /// continues). At most once a second — at a low rate batches are small and many, and
    /// each commit is a request the broker serves — and, since the loop calls this
    /// before every poll, within about a second of the last batch.
    pub(super) fn hint_offsets(&mut self) {
        if !self.b.offsets_owed
            || self
                .b
                .offsets_hinted
                .is_some_and(|at| at.elapsed() < OFFSET_HINT_EVERY)
        {
            return;
        }
        self.b.offsets_owed = false;
        let positions = self.positions_tpl();
        if positions.count() == 0 {
            return;
        }
        self.b.offsets_hinted = Some(Instant::now());
        if let Err(e) = self.consumer.commit(&positions, CommitMode::Async) {
            tracing::debug!(error = %e, "offset commit failed; the state's positions decide anyway");
        }
    }

    /// Sends the outputs of every committed batch not yet acknowledged. Returns whether
    /// none is left. An output the broker refuses for good (too large for it) is
    /// dead-lettered in its place, cut to a size any broker takes, so that it cannot hold
    /// the partition up.
    pub(super) fn send_outboxes(&mut self) -> bool {
        if self.settings.guarantee != Guarantee::AtLeastOnce {
            return true;
        }
        let pending: Vec<&Out> = self
            .parts
            .values()
            .flat_map(|ps| ps.outbox.values().flat_map(|(o, _)| o.iter()))
            .collect();
        if pending.is_empty() {
            return true;
        }
        let results = self.send_each(pending.iter().copied());
        let mut suspects = Vec::new();
        let mut failed = None;
        for (o, r) in pending.iter().zip(results) {
            match r {
                Ok(_) => {}
                Err(e) if classify(&e) == Disposition::Permanent => suspects.push(*o),
                Err(e) => {
                    failed.get_or_insert(e);
                }
            }
        }
        // A broker checks its size limit on a whole batch of records, and refuses every
        // record of a batch that one large record pushed over it. Only a record refused
        // on its own, alone in its batch, is refused for good; the others go through now
        // (after records of their partition that were accepted: a refused batch cannot
        // keep its place).
        let mut refused = Vec::new();
        if failed.is_none() {
            for o in suspects {
                match self.send_all(std::slice::from_ref(o)) {
                    Ok(_) => {}
                    Err(e) if classify(&e) == Disposition::Permanent => {
                        refused.push(self.refused_output(o, &e.to_string()));
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        let count = pending.len();
        let mut per_topic: BTreeMap<String, u64> = BTreeMap::new();
        for o in &pending {
            *per_topic.entry(o.topic.clone()).or_default() += 1;
        }
        if failed.is_none()
            && !refused.is_empty()
            && let Err(e) = self.send_all(&refused)
        {
            failed = Some(e);
        }
        if let Some(e) = failed {
            tracing::warn!(error = %e, outputs = count, "sending outputs failed; sending them again");
            self.failures += 1;
            std::thread::sleep(backoff(self.failures.min(10), 100, 5_000));
            return false;
        }
        for (topic, n) in per_topic {
            let base = self.topics.base(&topic).unwrap_or(&topic).to_owned();
            self.metrics
                .records_out
                .with_label_values(&[self.name, &base])
                .inc_by(n);
        }
        for ps in self.parts.values_mut() {
            ps.outbox_sent();
        }
        true
    }

    /// What identifies an output across attempts of the same batch: a batch done again
    /// after an abort is decided again, at another time, so the bytes may differ but the
    /// event ID does not.
    fn output_key(&self, o: &Out) -> u64 {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        (&o.topic, o.partition, &o.key).hash(&mut h);
        let header_type = o
            .headers
            .iter()
            .find(|(k, _)| k == EVENT_TYPE_HEADER)
            .and_then(|(_, v)| std::str::from_utf8(v).ok());
        let hints = DecodeHints {
            header_type,
            ..DecodeHints::default()
        };
        let event = o
            .payload
            .as_deref()
            .and_then(|p| self.codec.decode(p, hints).ok());
        match event {
            Some(e) => e.envelope().event_id.hash(&mut h),
            None => o.payload.hash(&mut h),
        }
        h.finish()
    }

    fn refused_output(&self, o: &Out, error: &str) -> Out {
        use dlq_headers::*;
        self.metrics
            .dead_lettered
            .with_label_values(&[self.name, "refused"])
            .inc();
        tracing::error!(topic = %o.topic, partition = o.partition, error, "the broker refused an output for good; dead-lettering it");
        let mut headers = vec![
            (TARGET_TOPIC.to_owned(), o.topic.as_bytes().to_vec()),
            (STAGE.to_owned(), self.name.as_bytes().to_vec()),
            (ERROR_CLASS.to_owned(), b"refused".to_vec()),
            (ERROR_MESSAGE.to_owned(), error.as_bytes().to_vec()),
        ];
        headers.extend(o.headers.iter().cloned());
        fit(
            Out {
                topic: self.dlq.clone(),
                partition: o.partition,
                key: o.key.clone(),
                payload: o.payload.clone(),
                headers,
            },
            self.refused_output_bytes(),
        )
    }

    /// Size to which a refused output is cut: [`REFUSED_OUTPUT_BYTES`], or less if this
    /// producer's own `message.max.bytes` is lower.
    fn refused_output_bytes(&self) -> usize {
        self.settings
            .kafka
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse::<usize>().ok())
            .map_or(REFUSED_OUTPUT_BYTES, |max| {
                REFUSED_OUTPUT_BYTES.min(max.saturating_sub(1024).max(1024))
            })
    }

    /// Under `exactly_once`: returns whether the transaction committed; `Err` only when
    /// the producer cannot be rebuilt.
    fn commit_transaction(
        &mut self,
        outs: Outputs,
        offsets: &HashMap<(String, i32), (i64, i64)>,
    ) -> Result<bool, RuntimeError> {
        let batches = self.batch_records(outs, false);
        let log: Vec<Out> = batches
            .iter()
            .flat_map(|(p, br, _)| br.records.iter().map(|r| self.changelog_out(*p, 0, r)))
            .collect();
        let outputs: Vec<&Out> = batches.iter().flat_map(|(_, _, o)| o.iter()).collect();
        // Outputs refused in an earlier attempt: each suspect is sent alone, and awaited,
        // before anything else; one refused alone is dead-lettered in its place.
        let mut alone: Vec<&Out> = Vec::new();
        let mut batched: Vec<&Out> = Vec::new();
        let mut dead: Vec<Out> = Vec::new();
        let none_refused = self.b.suspect_outputs.is_empty() && self.b.refused_outputs.is_empty();
        for o in &outputs {
            if none_refused {
                batched.push(o);
                continue;
            }
            let key = self.output_key(o);
            if let Some(error) = self.b.refused_outputs.get(&key) {
                dead.push(self.refused_output(o, error));
            } else if self.b.suspect_outputs.contains_key(&key) {
                alone.push(o);
            } else {
                batched.push(o);
            }
        }
        let mut in_flight: Vec<(&Out, DeliveryFuture)> = Vec::new();
        let mut refused_alone: Option<(&Out, String)> = None;
        let mut refused_at_once: Option<(&Out, String)> = None;
        let result = (|| {
            self.retry_in_place(|| self.producer.begin_transaction())?;
            for o in &alone {
                // Refused at once (by this producer) or with its batch of one (by the
                // broker): either way, by itself.
                let delivered = match self.send_one(o) {
                    Ok(f) => match futures::executor::block_on(f) {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err((e, _))) => Err(e),
                        Err(_) => Err(KafkaError::Canceled),
                    },
                    Err(e) => Err(e),
                };
                if let Err(e) = delivered {
                    if classify(&e) == Disposition::Permanent {
                        refused_alone = Some((o, e.to_string()));
                    }
                    return Err(e);
                }
            }
            for o in &batched {
                match self.send_one(o) {
                    Ok(f) => in_flight.push((o, f)),
                    Err(e) => {
                        if classify(&e) == Disposition::Permanent {
                            refused_at_once = Some((o, e.to_string()));
                        }
                        return Err(e);
                    }
                }
            }
            self.enqueue(dead.iter())?;
            self.crash_in_transaction(Point::TxnOutputsSent);
            self.enqueue(log.iter())?;
            let mut tpl = self.positions_tpl();
            // With the inputs' offsets, the group commits each written batch's sequence
            // number as its offset on the batch's changelog partition: how a restore
            // tells, on a broker that shows aborted records, whether the last batch it
            // read committed (see `Committed::batch`).
            for (p, br, _) in &batches {
                if !br.records.is_empty() {
                    let seq = i64::try_from(br.seq).unwrap_or(i64::MAX);
                    tpl.add_partition_offset(&self.b.changelog, *p, Offset::Offset(seq))?;
                }
            }
            // Without group metadata (not in a group yet) offsets cannot join the
            // transaction.
            let group = self
                .consumer
                .group_metadata()
                .ok_or(KafkaError::MessageProduction(RDKafkaErrorCode::State))?;
            self.retry_in_place(|| {
                self.producer
                    .send_offsets_to_transaction(&tpl, &group, TXN_TIMEOUT)
            })?;
            self.crash_in_transaction(Point::TxnBeforeCommit);
            self.retry_in_place(|| self.producer.commit_transaction(TXN_TIMEOUT))
        })();
        match result {
            Ok(()) => {
                crash::reached(Point::TxnAfterCommit);
                self.b.suspect_outputs.clear();
                self.b.refused_outputs.clear();
                let mut per_topic: BTreeMap<&str, u64> = BTreeMap::new();
                for o in &outputs {
                    *per_topic.entry(o.topic.as_str()).or_default() += 1;
                }
                for (topic, n) in per_topic {
                    let base = self.topics.base(topic).unwrap_or(topic);
                    self.metrics
                        .records_out
                        .with_label_values(&[self.name, base])
                        .inc_by(n);
                }
                for (p, br, _) in &batches {
                    if let Some(ps) = self.parts.get_mut(p) {
                        ps.committed(br, Vec::new());
                    }
                }
                Ok(true)
            }
            Err(e) => {
                let disposition = classify(&e);
                tracing::warn!(error = %e, ?disposition, "transaction failed; rolling back and rewinding");
                let mut rebuild = disposition == Disposition::RebuildProducer;
                if !rebuild && let Err(abort) = self.producer.abort_transaction(TXN_TIMEOUT) {
                    tracing::warn!(error = %abort, "abort failed; rebuilding the producer");
                    rebuild = true;
                }
                if rebuild {
                    self.rebuild_producer()?;
                }
                // Aborted or not, every delivery has an outcome now.
                for (o, f) in in_flight {
                    if let Ok(Err((e, _))) = futures::executor::block_on(f)
                        && classify(&e) == Disposition::Permanent
                    {
                        let key = self.output_key(o);
                        self.b.suspect_outputs.insert(key, e.to_string());
                    }
                }
                if let Some((o, error)) = refused_at_once {
                    let key = self.output_key(o);
                    self.b.suspect_outputs.insert(key, error);
                }
                if let Some((o, error)) = refused_alone {
                    let key = self.output_key(o);
                    self.b.suspect_outputs.remove(&key);
                    self.b.refused_outputs.insert(key, error);
                }
                for (p, ps) in self.parts.iter_mut() {
                    match batches.iter().find(|(bp, _, _)| bp == p) {
                        Some((_, br, _)) => ps.aborted(br),
                        None => ps.rollback(),
                    }
                }
                self.rewind(offsets);
                Ok(false)
            }
        }
    }

    /// Dies at `point` if it is armed, once every record enqueued so far is at the broker
    /// (inside the open transaction), so that the crash leaves them there.
    fn crash_in_transaction(&self, point: Point) {
        if crash::is_armed(point) {
            let _ = self.producer.flush(TXN_TIMEOUT);
            crash::reached(point);
        }
    }

    /// The state's positions of every assigned input partition.
    fn positions_tpl(&self) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (t, p) in &self.assigned {
            let base = self.topics.base(t).unwrap_or(t);
            if let Some(o) = self.parts.get(p).and_then(|ps| ps.positions.peek(base))
                && let Err(e) = tpl.add_partition_offset(t, *p, Offset::Offset(*o))
            {
                tracing::warn!(topic = %t, partition = p, error = %e, "invalid position");
            }
        }
        tpl
    }

    /// Seeks the inputs of a rolled-back batch back to the state's positions (or, where
    /// the state has none yet, the batch's first offset). A partition that cannot be
    /// positioned is restored again, never read on from where it was.
    pub(super) fn rewind(&mut self, offsets: &HashMap<(String, i32), (i64, i64)>) {
        for ((t, p), (first, _)) in offsets {
            if !self.assigned.contains(&(t.clone(), *p)) {
                continue;
            }
            let base = self.topics.base(t).unwrap_or(t);
            let target = self
                .parts
                .get(p)
                .and_then(|ps| ps.positions.peek(base).copied())
                .unwrap_or(*first);
            if let Err(e) = self.seek(t, *p, Offset::Offset(target)) {
                tracing::error!(topic = %t, partition = p, error = %e, "seek failed; restoring the partition");
                self.parts.remove(p);
                self.to_restore.insert(*p);
            }
        }
    }

    fn rebuild_producer(&mut self) -> Result<(), RuntimeError> {
        self.metrics
            .producer_rebuilds
            .with_label_values(&[self.name])
            .inc();
        tracing::warn!("rebuilding the producer");
        self.producer = kafka::producer(
            &self.settings,
            self.name,
            StageBackend::<S>::transactional(&self.settings),
        )
        .map_err(RuntimeError::Client)?;
        if self.settings.guarantee == Guarantee::ExactlyOnce {
            self.init_transactions()?;
        }
        Ok(())
    }

    /// Calls `op` again while its error is retriable, with backoff, a bounded number of
    /// times.
    fn retry_in_place(
        &self,
        mut op: impl FnMut() -> Result<(), KafkaError>,
    ) -> Result<(), KafkaError> {
        let mut attempt = 0;
        loop {
            match op() {
                Err(e) if classify(&e) == Disposition::Retry && attempt < MAX_IN_PLACE_RETRIES => {
                    tracing::debug!(error = %e, attempt, "retrying");
                    self.metrics.retries.with_label_values(&[self.name]).inc();
                    std::thread::sleep(backoff(attempt, 50, 2_000));
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// Registers the transactional ID (fencing any previous producer with it). A broker
    /// that does not do transactions gets an error naming the setting to change; any
    /// other failure is reported as what it is.
    pub(super) fn init_transactions(&self) -> Result<(), RuntimeError> {
        self.retry_in_place(|| self.producer.init_transactions(TXN_TIMEOUT))
            .map_err(|source| {
                if refuses_transactions(&source) {
                    RuntimeError::TransactionsUnsupported {
                        brokers: self.settings.brokers.clone(),
                        source,
                    }
                } else {
                    RuntimeError::ProducerInit {
                        transactional_id: kafka::transactional_id(&self.settings, self.name),
                        source,
                    }
                }
            })
    }
}

/// Producing, for every backend: records carry explicit partitions, and a full local
/// queue is waited out rather than reported.
impl<B: Backend> Worker<B> {
    /// `o` as a record; a negative partition leaves the choice to the partitioner.
    fn record<'a>(o: &'a Out, headers: OwnedHeaders) -> FutureRecord<'a, Vec<u8>, Vec<u8>> {
        let mut record = FutureRecord::to(&o.topic)
            .key(&o.key)
            .partition(o.partition)
            .headers(headers);
        if let Some(p) = &o.payload {
            record = record.payload(p);
        }
        record
    }

    /// Enqueues every record (inside a transaction, whose commit reports failures).
    pub(super) fn enqueue<'a>(
        &self,
        outs: impl Iterator<Item = &'a Out>,
    ) -> Result<(), KafkaError> {
        for o in outs {
            let f = self.send_one(o)?;
            drop(f);
        }
        Ok(())
    }

    pub(super) fn send_one(
        &self,
        o: &Out,
    ) -> Result<rdkafka::producer::DeliveryFuture, KafkaError> {
        let mut headers = OwnedHeaders::new_with_capacity(o.headers.len());
        for (k, v) in &o.headers {
            headers = headers.insert(Header {
                key: k,
                value: Some(v),
            });
        }
        let mut record = Self::record(o, headers);
        loop {
            match self.producer.send_result(record) {
                Ok(f) => return Ok(f),
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    self.producer.poll(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(e),
            }
        }
    }

    /// Sends every record and waits for each acknowledgement: their (partition, offset)
    /// in order, or the first failure.
    pub(super) fn send_all(&self, outs: &[Out]) -> Result<Vec<(i32, i64)>, KafkaError> {
        self.send_each(outs.iter()).into_iter().collect()
    }

    /// Sends every record and waits for each acknowledgement, reporting each.
    pub(super) fn send_each<'a>(
        &self,
        outs: impl Iterator<Item = &'a Out>,
    ) -> Vec<Result<(i32, i64), KafkaError>> {
        let pending: Vec<Result<rdkafka::producer::DeliveryFuture, KafkaError>> =
            outs.map(|o| self.send_one(o)).collect();
        pending
            .into_iter()
            .map(|f| match futures::executor::block_on(f?) {
                Ok(Ok(d)) => Ok((d.partition, d.offset)),
                Ok(Err((e, _))) => Err(e),
                Err(_) => Err(KafkaError::Canceled),
            })
            .collect()
    }
}

/// Error codes with which brokers refuse transactional producers: the API is missing, or
/// (as some brokers without transactions answer) no transactional ID is authorized.
fn refuses_transactions(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnsupportedFeature
                | RDKafkaErrorCode::UnsupportedVersion
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        )
    )
}
