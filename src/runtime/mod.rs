//! The stage runtime: a consume-transform-produce loop generic over a [`Stage`].
//!
//! Each cycle polls a batch (up to `batch_max_records`, or `batch_interval_ms`), acts on
//! rebalances between polls, runs the stage over every record, due timer and recorded
//! outcome of an earlier external call, performs the batch's new external calls (recording
//! their outcomes in state), then commits outputs, state and input offsets together:
//!
//! - `exactly_once`: in one Kafka transaction (outputs, changelog entries, DLQ records and
//!   `send_offsets_to_transaction` with the consumer's group metadata);
//! - `at_least_once`: outputs acknowledged, then the changelog batch and its commit marker,
//!   then the input offsets. A crash anywhere replays inputs whose effects are either
//!   absent (redone with the same deterministic IDs) or recorded in state (skipped as
//!   duplicates).
//!
//! Invariant: in-memory state always equals the state of the last committed batch when a
//! poll happens; a failed batch is rolled back and its inputs rewound before the next.

pub mod changelog;
pub mod clock;
pub mod disposition;
pub mod effects;
pub mod kafka;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::Offset;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use crate::config::{Guarantee, Settings};
use crate::events::Envelope;
use crate::events::codec::{Codec, DecodeHints};
use crate::events::{Event, EventType};
use crate::metrics::Metrics;
use crate::stages::{Ctx, Effect, EffectOutcome, Input, Stage, Timer};
use crate::topics::{self, Topics};
use changelog::{ChangelogRecord, PartitionState};
use clock::Clock;
use disposition::{Disposition, backoff, classify};
use effects::{EffectHandler, RecordedOutcome};
use kafka::{RebalanceEvent, RestoreError, WorkerContext};

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
}

const TXN_TIMEOUT: Duration = Duration::from_secs(30);
const PRUNE_EVERY_MS: i64 = 60_000;
/// How often a failing commit is retried in place before the batch is abandoned.
const MAX_IN_PLACE_RETRIES: u32 = 5;

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

/// One record to produce.
struct Out {
    topic: String,
    partition: i32,
    key: Vec<u8>,
    payload: Option<Vec<u8>>,
    headers: OwnedHeaders,
}

/// A request made while handling one input or timer, with what its outcome's outputs
/// inherit.
struct PendingEffect {
    partition: i32,
    cause: Option<Envelope>,
    effect: Effect,
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

/// Like [`spawn`], for a stage whose requests (see [`Ctx::request`]) `effects` performs.
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
    /// State per assigned partition number (shared by all co-partitioned input topics).
    parts: BTreeMap<i32, PartitionState<S::State>>,
    /// State of revoked partitions, kept until the next assignment says whether this
    /// worker gets them back (no one else can own them in between); never processed.
    parked: BTreeMap<i32, PartitionState<S::State>>,
    assigned: HashSet<(String, i32)>,
    /// Offset to rewind to (the first not yet committed) per input topic-partition.
    positions: HashMap<(String, i32), i64>,
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
            assigned: HashSet::new(),
            positions: HashMap::new(),
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
            let batch = self.poll_batch(shutdown)?;
            self.process_and_commit(batch)?;
        }
        tracing::info!("stage stopped");
        Ok(())
    }

    /// Collects up to a batch of records. Rebalances are acted on between polls: records
    /// of revoked partitions are dropped unprocessed (their new owner reads them from the
    /// committed offsets), newly assigned partitions are restored before any processing.
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
                Some(Ok(m)) => batch.push(m.detach()),
                Some(Err(e)) => tracing::warn!(error = %e, "consumer error"),
                None => {}
            }
            self.apply_rebalances(&mut batch)?;
        }
        self.apply_rebalances(&mut batch)?;
        Ok(batch)
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
                        self.positions.remove(&tp);
                        self.assigned.remove(&tp);
                    }
                    let owned: HashSet<i32> = self.assigned.iter().map(|(_, p)| *p).collect();
                    let revoked: Vec<i32> = self
                        .parts
                        .keys()
                        .filter(|p| !owned.contains(p))
                        .copied()
                        .collect();
                    for p in revoked {
                        let ps = self.parts.remove(&p).expect("listed above");
                        if !lost {
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
                    let owned: HashSet<i32> = self.assigned.iter().map(|(_, p)| *p).collect();
                    let mut parked = std::mem::take(&mut self.parked);
                    let mut missing: Vec<i32> = Vec::new();
                    for p in owned {
                        if self.parts.contains_key(&p) {
                            continue;
                        }
                        match parked.remove(&p) {
                            Some(ps) => {
                                self.parts.insert(p, ps);
                            }
                            None => missing.push(p),
                        }
                    }
                    missing.sort_unstable();
                    self.restore(&missing)?;
                    tracing::info!(partitions = ?self.parts.keys().collect::<Vec<_>>(), "assignment");
                }
            }
        }
        self.metrics
            .assigned_partitions
            .with_label_values(&[self.name])
            .set(self.parts.len() as i64);
        Ok(())
    }

    /// Restores the state of `partitions` (one read of the changelog for all of them).
    fn restore(&mut self, partitions: &[i32]) -> Result<(), RuntimeError> {
        if partitions.is_empty() {
            return Ok(());
        }
        let started = Instant::now();
        let restored = kafka::restore::<S::State>(&self.settings, &self.changelog, partitions)?;
        self.metrics
            .restore_seconds
            .with_label_values(&[self.name])
            .observe(started.elapsed().as_secs_f64());
        for (partition, ps) in restored {
            tracing::info!(
                partition,
                keys = ps.state.len(),
                seen = ps.seen.len(),
                timers = ps.timers.len(),
                pending_outcomes = ps.outcomes.len(),
                cut_off_batches = ps.pending_aborts.len(),
                "state restored"
            );
            self.parts.insert(partition, ps);
        }
        tracing::info!(
            partitions = partitions.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "restore finished"
        );
        Ok(())
    }

    fn process_and_commit(&mut self, batch: Vec<OwnedMessage>) -> Result<(), RuntimeError> {
        let batch = in_time_order(batch);
        let now = self.clock.now_ms();
        let mut outs = Vec::new();
        let mut offsets: HashMap<(String, i32), i64> = HashMap::new();
        for m in &batch {
            let tp = (m.topic().to_owned(), m.partition());
            self.positions.entry(tp.clone()).or_insert(m.offset());
            offsets.insert(tp, m.offset() + 1);
            self.process_record(m, now, &mut outs)?;
        }
        self.fire_timers(now, &mut outs);
        self.react_to_outcomes(now, &mut outs);
        self.perform_effects(now);
        self.prune_seen(now);
        let dirty = self.parts.values().any(PartitionState::has_changes);
        if batch.is_empty() && outs.is_empty() && !dirty {
            return Ok(());
        }
        self.commit(outs, offsets, batch.len())
    }

    fn process_record(
        &mut self,
        m: &OwnedMessage,
        now: i64,
        outs: &mut Vec<Out>,
    ) -> Result<(), RuntimeError> {
        self.metrics
            .records_in
            .with_label_values(&[self.name])
            .inc();
        let base = self.topics.base(m.topic()).unwrap_or(m.topic());
        let Some(payload) = m.payload() else {
            self.dead_letter(m, "decode", "record has no value", outs);
            return Ok(());
        };
        let header_type = header(m, EVENT_TYPE_HEADER);
        let hints = DecodeHints {
            header_type: header_type.as_deref(),
            topic_default: topics::default_event_type(base),
            origin: Some((m.topic(), m.partition(), m.offset())),
        };
        let event = match self.codec.decode(payload, hints) {
            Ok(e) => e,
            Err(e) => {
                self.dead_letter(m, e.class(), &e.to_string(), outs);
                return Ok(());
            }
        };
        let env = event.envelope().clone();
        let span = tracing::debug_span!(
            "record",
            partition = m.partition(),
            order_id = env.order_id.as_deref().unwrap_or(""),
            store_id = %env.store_id,
            correlation_id = %env.correlation_id,
        );
        let _g = span.enter();
        let p = m.partition();
        if !self.parts.contains_key(&p) {
            // Assignment callbacks precede records, so this is a safety net only.
            self.restore(&[p])?;
        }
        let ps = self.parts.get_mut(&p).expect("restored above");
        if ps.seen.contains(&env.event_id) {
            self.metrics
                .duplicates
                .with_label_values(&[self.name])
                .inc();
            return Ok(());
        }
        self.metrics
            .event_latency_seconds
            .with_label_values(&[self.name])
            .observe(((now - env.occurred_at).max(0) as f64) / 1000.0);
        let mut produced = Vec::new();
        let (result, requested) = {
            let mut ctx = Ctx::new(
                self.name,
                now,
                env.event_id.clone(),
                Some(env.clone()),
                &mut ps.state,
                &mut ps.timers,
                &mut produced,
            );
            let input = Input {
                topic: base,
                event: &event,
            };
            let r = self.stage.process(&mut ctx, input);
            (r, ctx.take_effects())
        };
        match result
            .map_err(|e| (e.class(), e.to_string()))
            .and_then(|()| self.encode_all(&produced, p))
        {
            Ok(encoded) => {
                ps_mark_seen(&mut self.parts, p, &env.event_id, now);
                outs.extend(encoded);
                self.queue_effects(p, Some(&env), requested);
            }
            Err((class, message)) => self.dead_letter(m, class, &message, outs),
        }
        Ok(())
    }

    fn encode_all(
        &self,
        events: &[Event],
        partition: i32,
    ) -> Result<Vec<Out>, (&'static str, String)> {
        events
            .iter()
            .map(|e| {
                let payload = self.codec.encode(e).map_err(|err| {
                    (
                        "encode",
                        format!("cannot encode output {}: {err}", e.event_type()),
                    )
                })?;
                Ok(self.output(e.event_type(), e, partition, payload))
            })
            .collect()
    }

    fn output(&self, t: EventType, e: &Event, partition: i32, payload: Vec<u8>) -> Out {
        let env = e.envelope();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: EVENT_TYPE_HEADER,
                value: Some(t.name()),
            })
            .insert(Header {
                key: CORRELATION_HEADER,
                value: Some(env.correlation_id.as_str()),
            });
        Out {
            topic: self.topics.name(topics::topic_of(t)),
            partition,
            key: env.store_id.clone().into_bytes(),
            payload: Some(payload),
            headers,
        }
    }

    fn dead_letter(&self, m: &OwnedMessage, class: &str, message: &str, outs: &mut Vec<Out>) {
        use dlq_headers::*;
        self.metrics
            .dead_lettered
            .with_label_values(&[self.name, class])
            .inc();
        tracing::warn!(
            topic = m.topic(),
            partition = m.partition(),
            offset = m.offset(),
            error_class = class,
            error = message,
            "dead-lettering record"
        );
        let (partition, offset) = (m.partition().to_string(), m.offset().to_string());
        let mut headers = OwnedHeaders::new()
            .insert(Header {
                key: SOURCE_TOPIC,
                value: Some(m.topic()),
            })
            .insert(Header {
                key: SOURCE_PARTITION,
                value: Some(partition.as_str()),
            })
            .insert(Header {
                key: SOURCE_OFFSET,
                value: Some(offset.as_str()),
            })
            .insert(Header {
                key: STAGE,
                value: Some(self.name),
            })
            .insert(Header {
                key: ERROR_CLASS,
                value: Some(class),
            })
            .insert(Header {
                key: ERROR_MESSAGE,
                value: Some(message),
            });
        if let Some(original) = m.headers() {
            for h in original.iter() {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        outs.push(Out {
            topic: self.dlq.clone(),
            partition: m.partition(),
            key: m.key().unwrap_or_default().to_vec(),
            payload: Some(m.payload().unwrap_or_default().to_vec()),
            headers,
        });
    }

    fn fire_timers(&mut self, now: i64, outs: &mut Vec<Out>) {
        let partitions: Vec<i32> = self.parts.keys().copied().collect();
        for p in partitions {
            let ps = self.parts.get_mut(&p).expect("listed above");
            let mut due: Vec<Timer> = ps
                .timers
                .iter()
                .filter(|(_, t)| t.due_at <= now)
                .map(|(_, t)| t.clone())
                .collect();
            if due.is_empty() {
                continue;
            }
            due.sort_by(|a, b| (a.due_at, &a.id).cmp(&(b.due_at, &b.id)));
            for timer in due {
                let ps = self.parts.get_mut(&p).expect("listed above");
                ps.timers.remove(&timer.id);
                let mut produced = Vec::new();
                let (result, requested) = {
                    let mut ctx = Ctx::new(
                        self.name,
                        now,
                        timer.firing_id(),
                        timer.cause.clone(),
                        &mut ps.state,
                        &mut ps.timers,
                        &mut produced,
                    );
                    let r = self.stage.on_timer(&mut ctx, &timer);
                    (r, ctx.take_effects())
                };
                self.metrics
                    .timers_fired
                    .with_label_values(&[self.name])
                    .inc();
                match result
                    .map_err(|e| (e.class(), e.to_string()))
                    .and_then(|()| self.encode_all(&produced, p))
                {
                    Ok(encoded) => {
                        outs.extend(encoded);
                        self.queue_effects(p, timer.cause.as_ref(), requested);
                    }
                    Err((class, message)) => {
                        tracing::error!(timer = %timer.id, error_class = class, error = %message, "timer failed; dropped");
                    }
                }
            }
        }
    }

    fn queue_effects(&mut self, partition: i32, cause: Option<&Envelope>, requested: Vec<Effect>) {
        self.pending_effects
            .extend(requested.into_iter().map(|effect| PendingEffect {
                partition,
                cause: cause.cloned(),
                effect,
            }));
    }

    /// Lets the stage react to the outcomes recorded by earlier batches, in the order the
    /// calls were made, and forgets them (in the same commit as the reaction's outputs).
    fn react_to_outcomes(&mut self, now: i64, outs: &mut Vec<Out>) {
        let partitions: Vec<i32> = self.parts.keys().copied().collect();
        for p in partitions {
            let ps = self.parts.get_mut(&p).expect("listed above");
            if ps.outcomes.is_empty() {
                continue;
            }
            let mut recorded: Vec<(String, RecordedOutcome)> = ps
                .outcomes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            recorded.sort_by(|a, b| (a.1.order, &a.0).cmp(&(b.1.order, &b.0)));
            for (id, r) in recorded {
                let ps = self.parts.get_mut(&p).expect("listed above");
                ps.outcomes.remove(&id);
                let cause_id = format!("effect/{id}/{}", r.outcome.class());
                let mut produced = Vec::new();
                let (result, requested) = {
                    let mut ctx = Ctx::new(
                        self.name,
                        now,
                        cause_id,
                        r.cause.clone(),
                        &mut ps.state,
                        &mut ps.timers,
                        &mut produced,
                    );
                    let result = self.stage.on_effect(&mut ctx, &r.effect, &r.outcome);
                    (result, ctx.take_effects())
                };
                match result
                    .map_err(|e| (e.class(), e.to_string()))
                    .and_then(|()| self.encode_all(&produced, p))
                {
                    Ok(encoded) => {
                        outs.extend(encoded);
                        self.queue_effects(p, r.cause.as_ref(), requested);
                    }
                    Err((class, message)) => {
                        tracing::error!(call = %id, error_class = class, error = %message, "reaction to an external call failed; dropped");
                    }
                }
            }
        }
    }

    /// Performs the batch's requests concurrently and records each outcome in its
    /// partition's state; the stage reacts in the next batch (see [`RecordedOutcome`]).
    fn perform_effects(&mut self, now: i64) {
        let pending = std::mem::take(&mut self.pending_effects);
        if pending.is_empty() {
            return;
        }
        let outcomes: Vec<EffectOutcome> = match &self.effects {
            Some(handler) => {
                let effects = pending.iter().map(|p| p.effect.clone()).collect();
                let concurrency = self.settings.payment.concurrency;
                self.effect_runtime.block_on(effects::perform_all(
                    handler.clone(),
                    effects,
                    concurrency,
                ))
            }
            None => {
                tracing::error!(
                    count = pending.len(),
                    "stage requested external calls but none can be made"
                );
                let error = "no handler for external calls is configured".to_owned();
                pending
                    .iter()
                    .map(|_| EffectOutcome::Transient {
                        error: error.clone(),
                    })
                    .collect()
            }
        };
        // Wall-clock milliseconds and the position in the batch order the reactions.
        let base = u64::try_from(now).unwrap_or(0).saturating_mul(1_000);
        for (i, (p, outcome)) in pending.into_iter().zip(outcomes).enumerate() {
            let Some(ps) = self.parts.get_mut(&p.partition) else {
                continue;
            };
            let recorded = RecordedOutcome {
                order: base + i as u64,
                cause: p.cause,
                effect: p.effect,
                outcome,
            };
            ps.outcomes.insert(recorded.effect.id(), recorded);
        }
    }

    fn prune_seen(&mut self, now: i64) {
        let retention = (self.settings.dedup_retention_secs as i64).saturating_mul(1000);
        for ps in self.parts.values_mut() {
            if now - ps.last_prune >= PRUNE_EVERY_MS {
                ps.last_prune = now;
                ps.prune_seen(now - retention);
            }
        }
    }

    fn commit(
        &mut self,
        outs: Vec<Out>,
        offsets: HashMap<(String, i32), i64>,
        records: usize,
    ) -> Result<(), RuntimeError> {
        let started = Instant::now();
        let changes: Vec<(i32, Vec<ChangelogRecord>)> = self
            .parts
            .iter_mut()
            .map(|(p, ps)| (*p, ps.pending_records()))
            .filter(|(_, c)| !c.is_empty())
            .collect();
        let mut log: Vec<Out> = Vec::new();
        for (p, records) in &changes {
            for r in records {
                let seq = r.seq.to_string();
                log.push(Out {
                    topic: self.changelog.clone(),
                    partition: *p,
                    key: r.key.clone().into_bytes(),
                    payload: r.value.clone(),
                    headers: OwnedHeaders::new().insert(Header {
                        key: changelog::SEQ_HEADER,
                        value: Some(seq.as_str()),
                    }),
                });
            }
        }
        // Offsets of every partition seen so far, so a commit that failed earlier catches up.
        let mut commit_offsets = self.positions.clone();
        commit_offsets.extend(offsets.iter().map(|(k, v)| (k.clone(), *v)));
        let result = match self.settings.guarantee {
            Guarantee::AtLeastOnce => self.commit_at_least_once(&outs, &log, &commit_offsets),
            Guarantee::ExactlyOnce => self.commit_transaction(&outs, &log, &commit_offsets),
        };
        match result {
            Ok(()) => {
                for (p, _) in &changes {
                    if let Some(ps) = self.parts.get_mut(p) {
                        ps.committed();
                    }
                }
                self.positions.extend(offsets);
                self.failures = 0;
                for o in &outs {
                    let base = self.topics.base(&o.topic).unwrap_or(&o.topic);
                    self.metrics
                        .records_out
                        .with_label_values(&[self.name, base])
                        .inc();
                }
                self.metrics
                    .batch_records
                    .with_label_values(&[self.name])
                    .observe(records as f64);
                self.metrics
                    .commit_seconds
                    .with_label_values(&[self.name])
                    .observe(started.elapsed().as_secs_f64());
                Ok(())
            }
            Err(e) => {
                let disposition = classify(&e);
                tracing::warn!(error = %e, ?disposition, records, "batch failed; rolling back and rewinding");
                self.metrics.aborts.with_label_values(&[self.name]).inc();
                for (p, records) in &changes {
                    if let Some(ps) = self.parts.get_mut(p) {
                        ps.failed(records);
                    }
                }
                for ps in self.parts.values_mut() {
                    ps.rollback();
                }
                let mut rebuild = disposition == Disposition::RebuildProducer;
                if self.settings.guarantee == Guarantee::ExactlyOnce
                    && !rebuild
                    && let Err(abort) = self.producer.abort_transaction(TXN_TIMEOUT)
                {
                    tracing::warn!(error = %abort, "abort failed; rebuilding the producer");
                    rebuild = true;
                }
                if rebuild {
                    self.rebuild_producer()?;
                }
                self.rewind();
                self.failures += 1;
                std::thread::sleep(backoff(self.failures.min(10), 100, 5_000));
                Ok(())
            }
        }
    }

    /// Outputs, then state, then offsets — each durable before the next starts.
    fn commit_at_least_once(
        &self,
        outs: &[Out],
        log: &[Out],
        offsets: &HashMap<(String, i32), i64>,
    ) -> Result<(), KafkaError> {
        self.send_all(outs, true)?;
        self.send_all(log, true)?;
        let tpl = self.offsets_tpl(offsets)?;
        if let Err(e) = self.consumer.commit(&tpl, CommitMode::Sync) {
            // State already records these inputs as processed: if they are delivered
            // again they are skipped, so this is not a failed batch.
            tracing::warn!(error = %e, "offset commit failed; inputs will be deduplicated if redelivered");
        }
        Ok(())
    }

    fn commit_transaction(
        &self,
        outs: &[Out],
        log: &[Out],
        offsets: &HashMap<(String, i32), i64>,
    ) -> Result<(), KafkaError> {
        self.retry_in_place(|| self.producer.begin_transaction())?;
        self.send_all(outs, false)?;
        self.send_all(log, false)?;
        let tpl = self.offsets_tpl(offsets)?;
        // Without group metadata (not in a group yet) offsets cannot join the transaction.
        let group = self
            .consumer
            .group_metadata()
            .ok_or(KafkaError::MessageProduction(RDKafkaErrorCode::State))?;
        self.retry_in_place(|| {
            self.producer
                .send_offsets_to_transaction(&tpl, &group, TXN_TIMEOUT)
        })?;
        self.retry_in_place(|| self.producer.commit_transaction(TXN_TIMEOUT))
    }

    fn offsets_tpl(
        &self,
        offsets: &HashMap<(String, i32), i64>,
    ) -> Result<TopicPartitionList, KafkaError> {
        let mut tpl = TopicPartitionList::new();
        for ((t, p), o) in offsets {
            if self.assigned.contains(&(t.clone(), *p)) {
                tpl.add_partition_offset(t, *p, Offset::Offset(*o))?;
            }
        }
        Ok(tpl)
    }

    /// Enqueues every record; with `await_acks`, waits until each is acknowledged and
    /// returns the first failure. (In a transaction, the commit reports failures.)
    fn send_all(&self, outs: &[Out], await_acks: bool) -> Result<(), KafkaError> {
        let mut pending = Vec::with_capacity(outs.len());
        for o in outs {
            let mut record = FutureRecord::to(&o.topic)
                .key(&o.key)
                .partition(o.partition)
                .headers(o.headers.clone());
            if let Some(p) = &o.payload {
                record = record.payload(p);
            }
            loop {
                match self.producer.send_result(record) {
                    Ok(f) => {
                        pending.push(f);
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => return Err(e),
                }
            }
        }
        if await_acks {
            for f in pending {
                match futures::executor::block_on(f) {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, _))) => return Err(e),
                    Err(_) => return Err(KafkaError::Canceled),
                }
            }
        }
        Ok(())
    }

    /// Seeks every assigned input partition back to its first uncommitted offset.
    fn rewind(&mut self) {
        for ((t, p), o) in &self.positions {
            if self.assigned.contains(&(t.clone(), *p))
                && let Err(e) =
                    self.consumer
                        .seek(t, *p, Offset::Offset(*o), Duration::from_secs(10))
            {
                tracing::warn!(topic = %t, partition = p, error = %e, "seek failed");
            }
        }
    }

    fn rebuild_producer(&mut self) -> Result<(), RuntimeError> {
        self.metrics
            .producer_rebuilds
            .with_label_values(&[self.name])
            .inc();
        tracing::warn!("rebuilding the producer");
        self.producer = kafka::producer(&self.settings, self.name).map_err(RuntimeError::Client)?;
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
    fn init_transactions(&self) -> Result<(), RuntimeError> {
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

fn ps_mark_seen<V: serde::Serialize + serde::de::DeserializeOwned + Clone>(
    parts: &mut BTreeMap<i32, PartitionState<V>>,
    p: i32,
    event_id: &str,
    now: i64,
) {
    if let Some(ps) = parts.get_mut(&p) {
        ps.seen.insert(event_id.to_owned(), now);
    }
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

fn header(m: &OwnedMessage, key: &str) -> Option<String> {
    let h = m.headers()?;
    h.iter()
        .find(|h| h.key == key)
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
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
