//! The SQL sink backend: the loop's batches applied to the read side's tables, with the
//! consumed offsets, in one SQL transaction.
//!
//! - **Assignment.** A partition (number) is claimed for every input topic
//!   ([`Db::claim`]) off the loop's thread: the claim raises the partition's epoch, which
//!   fences whichever worker held it before, and says where to continue. The loop moves the
//!   consumer there as it does for a restored stage partition.
//! - **A batch.** Each record is decoded and turned into row operations by the sink's
//!   [`View`] (a pure function); records the sink cannot read are dead-lettered. The dead
//!   letters are produced and acknowledged first; then one SQL transaction checks every
//!   partition's epoch, skips event IDs applied before, applies the operations and moves
//!   the offsets. A fenced partition is dropped (and claimed again only if the group still
//!   gives it to this worker); any other failure rolls the transaction back and rewinds
//!   the inputs to the offsets the database holds.
//! - **Publishing.** Events a commit asks to publish (`ReplenishmentRequested`) are kept in
//!   the database's outbox in the same transaction, produced after the commit and then
//!   forgotten; a worker that starts sends whatever the outbox still holds.
//!
//! Invariant: the rows reflect exactly the records below the stored offsets, each once;
//! a replay, a crash at any point or a stale worker changes nothing.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::message::{Headers, Message, OwnedMessage};

use super::crash::{self, Point};
use super::disposition::backoff;
use super::outbox::Out;
use super::restore::{RestoreError, Restored};
use super::{Backend, Part, RuntimeError, Worker, header};
use crate::config::Settings;
use crate::events::Event;
use crate::events::codec::DecodeHints;
use crate::sql::{Db, Disposition, Position, SqlError};
use crate::topics;
use crate::views::{DeadLetter, Effects, Input, Sink, View};

pub(crate) struct SinkBackend {
    sink: Sink,
    view: View,
    db: Db,
    /// Drives the database calls: the loop's thread blocks on it, claims made on other
    /// threads use its handle. Multi-threaded (one worker) so that its I/O is driven
    /// whichever thread waits.
    rt: tokio::runtime::Runtime,
    /// Whether the outbox left by an earlier worker was sent.
    outbox_sent: bool,
}

impl SinkBackend {
    /// Connects to `settings.database_url` (whose migrations must be applied).
    pub(super) fn new(sink: Sink, settings: &Settings) -> Result<Self, RuntimeError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(format!("sink-{}-sql", sink.name()))
            .enable_all()
            .build()
            .map_err(RuntimeError::EffectRuntime)?;
        let db = rt
            .block_on(Db::connect(&settings.database_url))
            .map_err(RuntimeError::Database)?;
        Ok(SinkBackend {
            sink,
            view: View::new(sink, settings.alerts.clone()),
            db,
            rt,
            outbox_sent: false,
        })
    }
}

/// A claimed partition number: per input topic (prefix-free), the epoch it was claimed
/// with and the first offset not applied (`None`: nothing applied yet).
#[derive(Debug)]
pub(crate) struct SinkPart {
    claims: BTreeMap<String, (i64, Option<i64>)>,
}

impl Part for SinkPart {
    fn position(&self, base: &str) -> Option<i64> {
        self.claims.get(base).and_then(|(_, next)| *next)
    }

    /// A partition that comes back is claimed again: another worker may have held it
    /// meanwhile, and only a new claim says where its rows end.
    fn parkable(&self) -> bool {
        false
    }

    fn log_restored(&self, partition: i32, elapsed: Duration) {
        tracing::info!(
            partition,
            claims = ?self.claims,
            elapsed_ms = elapsed.as_millis() as u64,
            "partition claimed"
        );
    }
}

impl Backend for SinkBackend {
    type Part = SinkPart;

    fn name(&self) -> &'static str {
        self.sink.name()
    }

    fn inputs(&self) -> &'static [&'static str] {
        self.sink.topics()
    }

    fn transactional(_: &Settings) -> bool {
        false
    }

    fn restore(w: &Worker<Self>, partitions: Vec<i32>, job: u64) {
        let (db, sink, handle) = (w.b.db.clone(), w.b.sink, w.b.rt.handle().clone());
        let topics: Vec<(String, String)> = sink
            .topics()
            .iter()
            .map(|t| ((*t).to_owned(), w.topics.name(t)))
            .collect();
        let done = w.restored_tx.clone();
        std::thread::Builder::new()
            .name(format!("claim-{job}"))
            .spawn(move || {
                let started = Instant::now();
                let result = handle.block_on(async {
                    let mut parts = Vec::with_capacity(partitions.len());
                    for &p in &partitions {
                        let mut claims = BTreeMap::new();
                        for (base, name) in &topics {
                            let c = db.claim(sink, name, p).await.map_err(|source| {
                                RestoreError::SinkClaim {
                                    sink: sink.name(),
                                    partition: p,
                                    source,
                                }
                            })?;
                            claims.insert(base.clone(), (c.epoch, c.next_offset));
                        }
                        parts.push((p, SinkPart { claims }));
                    }
                    Ok(parts)
                });
                let _ = done.send(Restored {
                    job,
                    partitions,
                    elapsed: started.elapsed(),
                    result,
                });
            })
            .expect("spawning a claim thread");
    }

    fn reusable(_: &Worker<Self>, _: i32, _: &SinkPart) -> bool {
        false
    }

    fn before_poll(w: &mut Worker<Self>) -> bool {
        if !w.b.outbox_sent {
            match w.b.rt.block_on(w.b.db.outbox(w.b.sink)) {
                Ok(events) => w.b.outbox_sent = w.publish(&events),
                Err(e) => tracing::warn!(error = %e, "cannot read the sink's outbox; trying again"),
            }
        }
        true
    }

    fn process_and_commit(
        w: &mut Worker<Self>,
        batch: Vec<OwnedMessage>,
    ) -> Result<(), RuntimeError> {
        w.apply_batch(batch);
        Ok(())
    }
}

impl Worker<SinkBackend> {
    fn apply_batch(&mut self, batch: Vec<OwnedMessage>) {
        let batch = super::consume::in_time_order(batch);
        self.batches += 1;
        let mut effects: Vec<Effects> = Vec::new();
        let mut dead = super::dispatch::Outputs::new();
        // Per input topic-partition: the first offset of the batch and the next one.
        let mut offsets: HashMap<(String, i32), (i64, i64)> = HashMap::new();
        let mut admitted = Vec::with_capacity(batch.len());
        for m in &batch {
            if self.admit(m, &mut offsets) {
                admitted.push(m);
            }
        }
        if !self.schemas_known(&admitted) {
            self.rewind_sink(&offsets);
            return;
        }
        for m in admitted {
            self.hot.records_in.inc();
            let base = self.topics.base(m.topic()).unwrap_or(m.topic()).to_owned();
            let applied = self.parts[&m.partition()].position(&base);
            if applied.is_some_and(|next| m.offset() < next) {
                self.hot.duplicates.inc();
                continue;
            }
            if let Some(e) = self.effects_of(m, &base, &mut dead) {
                effects.push(e);
            }
        }
        if offsets.is_empty() {
            return;
        }
        let started = Instant::now();
        let dead: Vec<Out> = dead.into_values().flatten().collect();
        if let Err(e) = self.send_all(&dead) {
            tracing::warn!(error = %e, "cannot write the batch's dead letters; reading the batch again");
            self.rewind_sink(&offsets);
            return;
        }
        self.metrics
            .records_out
            .with_label_values(&[self.name, topics::DLQ])
            .inc_by(dead.len() as u64);
        let mut positions = Vec::with_capacity(offsets.len());
        for ((t, p), (_, next)) in &offsets {
            let base = self.topics.base(t).unwrap_or(t);
            let (epoch, _) = self.parts[p].claims[base];
            positions.push(Position {
                topic: t.clone(),
                partition: *p,
                epoch,
                next_offset: *next,
            });
        }
        positions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        crash::stall_before_commit();
        let result = self
            .b
            .rt
            .block_on(self.b.db.commit(self.b.sink, &positions, &effects));
        match result {
            Ok(committed) => {
                crash::reached(Point::AfterSqlCommit);
                self.failures = 0;
                for pos in &positions {
                    let base = self
                        .topics
                        .base(&pos.topic)
                        .unwrap_or(&pos.topic)
                        .to_owned();
                    if let Some(part) = self.parts.get_mut(&pos.partition)
                        && let Some(claim) = part.claims.get_mut(&base)
                    {
                        claim.1 = Some(pos.next_offset);
                    }
                }
                self.metrics
                    .batch_records
                    .with_label_values(&[self.name])
                    .observe(batch.len() as f64);
                self.metrics
                    .commit_seconds
                    .with_label_values(&[self.name])
                    .observe(started.elapsed().as_secs_f64());
                self.metrics
                    .duplicates
                    .with_label_values(&[self.name])
                    .inc_by(committed.duplicates as u64);
                if !committed.publish.is_empty() && !self.publish(&committed.publish) {
                    // Still in the outbox: sent again before the next batch.
                    self.b.outbox_sent = false;
                }
            }
            Err(e) => self.commit_failed(&e, &offsets),
        }
    }

    /// The row operations of record `m` of topic `base`, or a dead letter for it.
    fn effects_of(
        &mut self,
        m: &OwnedMessage,
        base: &str,
        dead: &mut super::dispatch::Outputs,
    ) -> Option<Effects> {
        let at = m.timestamp().to_millis().unwrap_or(0);
        if base == topics::DLQ {
            let headers: Vec<(&str, &[u8])> = m
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|h| (h.key, h.value.unwrap_or_default()))
                        .collect()
                })
                .unwrap_or_default();
            return match DeadLetter::from_record(m.key(), headers, at) {
                Ok(dl) => self.b.view.effects(Input::DeadLetter(&dl)),
                // A record of the DLQ the sink cannot read is not dead-lettered again:
                // that would feed the DLQ with itself.
                Err(message) => {
                    tracing::warn!(offset = m.offset(), partition = m.partition(), error = %message, "unreadable dead letter skipped");
                    None
                }
            };
        }
        let Some(payload) = m.payload() else {
            self.dead_letter(m, "decode", "record has no value", dead);
            return None;
        };
        let header_type =
            header(m, super::EVENT_TYPE_HEADER).and_then(|v| std::str::from_utf8(v).ok());
        let hints = DecodeHints {
            header_type,
            topic_default: topics::default_event_type(base),
            origin: Some((m.topic(), m.partition(), m.offset())),
        };
        match self.codec.decode(payload, hints) {
            Ok(event) => self.b.view.effects(Input::Event {
                topic: base,
                event: &event,
            }),
            Err(e) => {
                self.dead_letter(m, e.class(), &e.to_string(), dead);
                None
            }
        }
    }

    fn commit_failed(&mut self, e: &SqlError, offsets: &HashMap<(String, i32), (i64, i64)>) {
        match e.disposition() {
            Disposition::Fenced => {
                self.metrics.fenced.with_label_values(&[self.name]).inc();
                tracing::warn!(error = %e, "fenced by a newer claim: the batch was rolled back; dropping its partitions");
                let partitions: Vec<i32> = offsets.keys().map(|(_, p)| *p).collect();
                for p in partitions {
                    self.parts.remove(&p);
                    self.unpositioned.retain(|(_, q), _| *q != p);
                    // Claimed again after the next poll if the group still says it is
                    // this worker's (a revocation not seen yet drops it first).
                    self.to_restore.insert(p);
                }
            }
            Disposition::Retry | Disposition::Permanent => {
                self.metrics.aborts.with_label_values(&[self.name]).inc();
                self.failures += 1;
                tracing::warn!(error = %e, failures = self.failures, "sink commit failed; rolled back, reading the batch again");
                self.rewind_sink(offsets);
                std::thread::sleep(backoff(self.failures.min(10), 100, 5_000));
            }
        }
    }

    /// Moves every input of a batch that did not commit back to where the database says
    /// it continues (or to the batch's first record).
    fn rewind_sink(&mut self, offsets: &HashMap<(String, i32), (i64, i64)>) {
        for ((t, p), (first, _)) in offsets {
            let base = self.topics.base(t).unwrap_or(t);
            let Some(part) = self.parts.get(p) else {
                continue;
            };
            let target = part.position(base).unwrap_or(*first);
            if let Err(err) = self.seek(t, *p, Offset::Offset(target)) {
                tracing::error!(topic = %t, partition = p, error = %err, "cannot rewind; claiming the partition again");
                self.parts.remove(p);
                self.to_restore.insert(*p);
            }
        }
    }

    /// Produces `events` (keyed by store, partitioned as producers do) and forgets them
    /// in the outbox; whether all went out.
    fn publish(&mut self, events: &[Event]) -> bool {
        let mut outs = Vec::with_capacity(events.len());
        for e in events {
            match self.codec.encode(e) {
                // Partition -1: the producer's partitioner picks it from the key.
                Ok(payload) => outs.push(self.output(e.event_type(), e, -1, payload)),
                Err(err) => {
                    tracing::error!(event_type = %e.event_type(), error = %err, "cannot encode an outbox event");
                    return false;
                }
            }
        }
        let mut sent = Vec::with_capacity(events.len());
        for (e, acked) in events.iter().zip(self.send_each(outs.iter())) {
            match acked {
                Ok(_) => sent.push(e.envelope().event_id.clone()),
                Err(err) => {
                    tracing::warn!(event_id = %e.envelope().event_id, error = %err, "an outbox event was not acknowledged; trying again later")
                }
            }
        }
        let ids: Vec<&str> = sent.iter().map(String::as_str).collect();
        let all = sent.len() == events.len();
        if let Err(e) = self.b.rt.block_on(self.b.db.outbox_done(self.b.sink, &ids)) {
            tracing::warn!(error = %e, "cannot clear the sink's outbox; its events will be sent again");
            return false;
        }
        self.metrics
            .records_out
            .with_label_values(&[self.name, topics::PURCHASING_REPLENISHMENT])
            .inc_by(sent.len() as u64);
        all
    }
}

/// Runs `sink` on its own thread until `shutdown` is cancelled, on the database of
/// `settings.database_url` (its migrations applied: see [`crate::sql::Db::migrate`]).
pub fn spawn(
    sink: Sink,
    settings: Settings,
    metrics: crate::metrics::Metrics,
    clock: std::sync::Arc<dyn super::clock::Clock>,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::thread::JoinHandle<Result<(), RuntimeError>> {
    let name = sink.name();
    std::thread::Builder::new()
        .name(format!("sink-{name}"))
        .spawn(move || {
            let span = tracing::info_span!("stage", stage = name);
            let _g = span.enter();
            let result = SinkBackend::new(sink, &settings)
                .and_then(|b| Worker::new(b, settings, metrics, clock))
                .and_then(|mut w| w.run(&shutdown));
            if let Err(e) = &result {
                tracing::error!(error = %e, "sink worker stopped");
            }
            result
        })
        .expect("spawning a thread")
}
