//! Running the stage over one batch: decoding, deduplication, the stage's calls for
//! records, due timers and recorded outcomes, encoding its outputs, dead letters.
//!
//! Invariant: an input either takes effect whole — its state writes and its outputs — or
//! not at all (a dead letter instead); what a record does never depends on anything but
//! the partition's state, the record and the batch's clock.

use std::collections::{BTreeMap, HashMap};

use rdkafka::message::{Message, OwnedMessage};

use super::changelog::{PartitionState, id_bits};
use super::effects::{self, RecordedOutcome};
use super::invoke::{self, Called, Trigger};
use super::outbox::Out;
use super::stage::StageBackend;
use super::{Backend, CORRELATION_HEADER, EVENT_TYPE_HEADER, RuntimeError, Worker, header};
use crate::events::codec::DecodeHints;
use crate::events::{Envelope, Event, EventType};
use crate::stages::{Effect, EffectOutcome, Stage, StageError};
use crate::topics;

/// Outputs of a batch, per partition number.
pub(super) type Outputs = BTreeMap<i32, Vec<Out>>;

/// A request made while handling one input or timer, with what its outcome's outputs
/// inherit.
pub(super) struct PendingEffect {
    partition: i32,
    cause: Option<Envelope>,
    effect: Effect,
}

/// Why one input's (or timer's) outputs cannot be produced.
type Failure = (&'static str, String);

impl<S: Stage> Worker<StageBackend<S>> {
    pub(super) fn process_and_commit(
        &mut self,
        batch: Vec<OwnedMessage>,
    ) -> Result<(), RuntimeError> {
        let batch = super::consume::in_time_order(batch);
        self.batches += 1;
        let now = self.clock.now_ms();
        let mut outs = Outputs::new();
        // Per input topic-partition: the first offset of the batch and the next one.
        let mut offsets: HashMap<(String, i32), (i64, i64)> = HashMap::new();
        let mut admitted = Vec::with_capacity(batch.len());
        for m in &batch {
            if self.admit(m, &mut offsets) {
                admitted.push(m);
            }
        }
        if !self.schemas_known(&admitted) {
            self.rewind(&offsets);
            return Ok(());
        }
        for m in admitted {
            self.process_record(m, now, &mut outs);
        }
        for ((t, p), (_, next)) in &offsets {
            let base = self.topics.base(t).unwrap_or(t).to_owned();
            if let Some(ps) = self.parts.get_mut(p) {
                ps.positions.insert(base, *next);
            }
        }
        self.fire_timers(now, &mut outs);
        self.react_to_outcomes(now, &mut outs);
        self.perform_effects(now);
        let dirty = self.parts.values().any(PartitionState::has_changes);
        if outs.is_empty() && !dirty {
            return Ok(());
        }
        self.commit(outs, &offsets, batch.len())
    }

    fn process_record(&mut self, m: &OwnedMessage, now: i64, outs: &mut Outputs) {
        let p = m.partition();
        let base = self.topics.base(m.topic()).unwrap_or(m.topic());
        let Some(ps) = self.parts.get_mut(&p) else {
            return;
        };
        self.hot.records_in.inc();
        // Already reflected in the state: a replay of input this partition processed.
        if ps
            .positions
            .get(base)
            .is_some_and(|next| m.offset() < *next)
        {
            self.hot.duplicates.inc();
            return;
        }
        let Some(payload) = m.payload() else {
            self.dead_letter(m, "decode", "record has no value", outs);
            return;
        };
        let header_type = header(m, EVENT_TYPE_HEADER).and_then(|v| std::str::from_utf8(v).ok());
        // Another stage's business, by its type: not even decoded.
        if header_type
            .and_then(EventType::from_name)
            .is_some_and(|t| self.b.stage.ignores(base, t))
        {
            self.hot.ignored.inc();
            return;
        }
        let hints = DecodeHints {
            header_type,
            topic_default: topics::default_event_type(base),
            origin: Some((m.topic(), m.partition(), m.offset())),
        };
        let event = match self.codec.decode(payload, hints) {
            Ok(e) => e,
            Err(e) => {
                self.dead_letter(m, e.class(), &e.to_string(), outs);
                return;
            }
        };
        let env = event.envelope();
        let span = tracing::debug_span!(
            "record",
            partition = m.partition(),
            order_id = env.order_id.as_deref().unwrap_or(""),
            store_id = %env.store_id,
            correlation_id = %env.correlation_id,
        );
        let _g = span.enter();
        let id = id_bits(&env.event_id);
        let ps = self.parts.get_mut(&p).expect("checked above");
        if ps.seen.contains(id) {
            self.hot.duplicates.inc();
            return;
        }
        self.hot
            .event_latency_seconds
            .observe(((now - env.occurred_at).max(0) as f64) / 1000.0);
        let input = Trigger::Input {
            topic: base,
            event: &event,
        };
        let Called {
            result,
            produced,
            requested,
        } = invoke::call(&mut self.b.stage, now, &mut ps.state, &mut ps.timers, input);
        let encoded = result
            .map_err(|e| (e.class(), e.to_string()))
            .and_then(|()| self.encode_all(&produced, p));
        let ps = self.parts.get_mut(&p).expect("checked above");
        match encoded {
            Ok(encoded) => {
                invoke::keep(&mut ps.state, &mut ps.timers);
                ps.seen.insert(id);
                outs.entry(p).or_default().extend(encoded);
                self.queue_effects(p, Some(env), requested);
            }
            Err((class, message)) => {
                // The input takes no effect at all: its state writes go with its outputs.
                invoke::undo(&mut ps.state, &mut ps.timers);
                self.dead_letter(m, class, &message, outs);
            }
        }
    }

    fn encode_all(&self, events: &[Event], partition: i32) -> Result<Vec<Out>, Failure> {
        events
            .iter()
            .map(|e| {
                let payload = self.codec.encode(e).map_err(|err| {
                    (
                        "encode",
                        format!("cannot encode output {}: {err}", e.event_type()),
                    )
                })?;
                let out = self.output(e.event_type(), e, partition, payload);
                if out.size() > self.settings.max_record_bytes {
                    return Err((
                        "too_large",
                        format!(
                            "output {} would take {} bytes, over max_record_bytes ({})",
                            e.event_type(),
                            out.size(),
                            self.settings.max_record_bytes
                        ),
                    ));
                }
                Ok(out)
            })
            .collect()
    }

    fn fire_timers(&mut self, now: i64, outs: &mut Outputs) {
        let partitions: Vec<i32> = self.parts.keys().copied().collect();
        for p in partitions {
            let ps = self.parts.get_mut(&p).expect("listed above");
            for timer in invoke::due(&ps.timers, now) {
                let ps = self.parts.get_mut(&p).expect("listed above");
                ps.timers.remove(&timer.id);
                let Called {
                    result,
                    produced,
                    requested,
                } = invoke::call(
                    &mut self.b.stage,
                    now,
                    &mut ps.state,
                    &mut ps.timers,
                    Trigger::Timer(&timer),
                );
                self.hot.timers_fired.inc();
                let id = timer.id.clone();
                self.settle(
                    p,
                    result,
                    &produced,
                    requested,
                    timer.cause.as_ref(),
                    outs,
                    || format!("timer {id}"),
                );
            }
        }
    }

    /// Keeps a timer's or reaction's writes and outputs, or — when they cannot be
    /// produced — undoes its writes and drops it (it has no record to dead-letter).
    #[allow(clippy::too_many_arguments)]
    fn settle(
        &mut self,
        p: i32,
        result: Result<(), StageError>,
        produced: &[Event],
        requested: Vec<Effect>,
        cause: Option<&Envelope>,
        outs: &mut Outputs,
        what: impl FnOnce() -> String,
    ) {
        let encoded = result
            .map_err(|e| (e.class(), e.to_string()))
            .and_then(|()| self.encode_all(produced, p));
        let ps = self.parts.get_mut(&p).expect("partition is present");
        match encoded {
            Ok(encoded) => {
                invoke::keep(&mut ps.state, &mut ps.timers);
                outs.entry(p).or_default().extend(encoded);
                self.queue_effects(p, cause, requested);
            }
            Err((class, message)) => {
                invoke::undo(&mut ps.state, &mut ps.timers);
                tracing::error!(what = %what(), error_class = class, error = %message, "dropped: its outputs cannot be produced");
            }
        }
    }

    fn queue_effects(&mut self, partition: i32, cause: Option<&Envelope>, requested: Vec<Effect>) {
        self.b
            .pending_effects
            .extend(requested.into_iter().map(|effect| PendingEffect {
                partition,
                cause: cause.cloned(),
                effect,
            }));
    }

    /// Lets the stage react to the outcomes recorded by earlier batches, in the order the
    /// calls were made, and forgets them (in the same commit as the reaction's outputs).
    fn react_to_outcomes(&mut self, now: i64, outs: &mut Outputs) {
        let partitions: Vec<i32> = self.parts.keys().copied().collect();
        for p in partitions {
            let ps = self.parts.get_mut(&p).expect("listed above");
            if ps.outcomes.is_empty() {
                continue;
            }
            let mut recorded: Vec<(String, RecordedOutcome)> = ps.outcomes.scan("");
            recorded.sort_by(|a, b| (a.1.order, &a.0).cmp(&(b.1.order, &b.0)));
            for (id, r) in recorded {
                let ps = self.parts.get_mut(&p).expect("listed above");
                ps.outcomes.remove(&id);
                let Called {
                    result,
                    produced,
                    requested,
                } = invoke::call(
                    &mut self.b.stage,
                    now,
                    &mut ps.state,
                    &mut ps.timers,
                    Trigger::Outcome {
                        effect: &r.effect,
                        outcome: &r.outcome,
                        cause: r.cause.as_ref(),
                    },
                );
                self.settle(
                    p,
                    result,
                    &produced,
                    requested,
                    r.cause.as_ref(),
                    outs,
                    || format!("reaction to call {id}"),
                );
            }
        }
    }

    /// Performs the batch's requests concurrently and records each outcome in its
    /// partition's state; the stage reacts in the next batch (see [`RecordedOutcome`]).
    fn perform_effects(&mut self, now: i64) {
        let pending = std::mem::take(&mut self.b.pending_effects);
        if pending.is_empty() {
            return;
        }
        let outcomes: Vec<EffectOutcome> = match &self.b.effects {
            Some(handler) => {
                let effects = pending.iter().map(|p| p.effect.clone()).collect();
                let concurrency = self.settings.payment.concurrency;
                self.b.effect_runtime.block_on(effects::perform_all(
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
}

impl<B: Backend> Worker<B> {
    pub(super) fn output(&self, t: EventType, e: &Event, partition: i32, payload: Vec<u8>) -> Out {
        let env = e.envelope();
        Out {
            topic: self.topics.name(topics::topic_of(t)),
            partition,
            key: env.store_id.clone().into_bytes(),
            payload: Some(payload),
            headers: vec![
                (EVENT_TYPE_HEADER.to_owned(), t.name().as_bytes().to_vec()),
                (
                    CORRELATION_HEADER.to_owned(),
                    env.correlation_id.as_bytes().to_vec(),
                ),
            ],
        }
    }
}
