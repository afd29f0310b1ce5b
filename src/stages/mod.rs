//! Stages: pure business logic, one file per stage, dispatched by one `match` on
//! [`StageName`].
//!
//! Invariant: a stage never touches Kafka or SQL. It sees one decoded input (or a due
//! timer), reads and writes its keyed state through [`Ctx`], and emits events; the
//! runtime persists the state, produces the outputs and commits, together.

pub mod delivery;
#[cfg(test)]
pub mod driver;
pub mod fraud;
pub mod fulfillment;
pub mod inventory;
pub mod payment;
mod store;

pub use store::{Disk, Store};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::events::{Envelope, Event, EventType, derive_id};

/// One part of a state key or timer ID (a store, order, customer or SKU ID) with `%` and
/// `/` escaped, so that keys built by joining parts with `/` can never collide.
pub fn key_part(id: &str) -> String {
    id.replace('%', "%25").replace('/', "%2F")
}

/// The closed set of stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageName {
    Fraud,
    Inventory,
    Payment,
    Fulfillment,
    Delivery,
}

impl StageName {
    pub const ALL: &'static [StageName] = &[
        StageName::Fraud,
        StageName::Inventory,
        StageName::Payment,
        StageName::Fulfillment,
        StageName::Delivery,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StageName::Fraud => "fraud",
            StageName::Inventory => "inventory",
            StageName::Payment => "payment",
            StageName::Fulfillment => "fulfillment",
            StageName::Delivery => "delivery",
        }
    }
}

impl std::str::FromStr for StageName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        StageName::ALL
            .iter()
            .copied()
            .find(|n| n.as_str() == s)
            .ok_or_else(|| {
                let known: Vec<_> = StageName::ALL.iter().map(|n| n.as_str()).collect();
                format!("unknown stage {s:?}; known stages: {}", known.join(", "))
            })
    }
}

/// A record the stage cannot ever process: the runtime dead-letters it and moves on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StageError {
    #[error("unexpected event type {event_type} on topic {topic}")]
    Unexpected { event_type: String, topic: String },
    #[error("{0}")]
    Invalid(String),
}

impl StageError {
    pub fn class(&self) -> &'static str {
        match self {
            StageError::Unexpected { .. } => "unexpected",
            StageError::Invalid(_) => "invalid",
        }
    }
}

/// A request to the outside world. A stage only asks; the runtime performs every request
/// of a batch concurrently (bounded) after the stage has seen the batch, records each
/// outcome in the partition's state with that batch, and hands it back to
/// [`Stage::on_effect`] in the next batch — so a replay after a crash reacts to the same
/// outcome instead of asking again. Requests carry an idempotency key, so performing one
/// again (a crash before the outcome was recorded) cannot act twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Effect {
    /// Authorize a charge at the payment gateway.
    Authorize {
        /// The same on every attempt for one order: a timed-out attempt that did charge
        /// is answered by the gateway, not charged again.
        idempotency_key: String,
        store_id: String,
        order_id: String,
        amount_cents: i64,
        currency: String,
        attempt: u32,
    },
    /// Cancel whatever an authorization key may have charged, and refuse the key from
    /// now on: the compensation of a payment given up while a charge's fate is unknown
    /// (an attempt that timed out may have charged; a crash may have lost its answer).
    Void {
        /// The authorization's idempotency key.
        idempotency_key: String,
        store_id: String,
        order_id: String,
        attempt: u32,
    },
    /// Refund an authorized charge.
    Refund {
        idempotency_key: String,
        store_id: String,
        order_id: String,
        authorization_id: String,
        amount_cents: i64,
        currency: String,
        attempt: u32,
    },
}

impl Effect {
    /// Identifies one attempt of one request. Outputs reacting to its outcome derive
    /// their IDs from it: the idempotency key alone is the same on every attempt, and
    /// two attempts' reactions (a retry notice, then a failure) must not share IDs.
    pub fn id(&self) -> String {
        match self {
            Effect::Authorize {
                idempotency_key,
                attempt,
                ..
            }
            | Effect::Refund {
                idempotency_key,
                attempt,
                ..
            } => {
                format!("{idempotency_key}#{attempt}")
            }
            // The authorization's key: its attempts must not share IDs with the void's.
            Effect::Void {
                idempotency_key,
                attempt,
                ..
            } => format!("{idempotency_key}/void#{attempt}"),
        }
    }

    pub fn idempotency_key(&self) -> &str {
        match self {
            Effect::Authorize {
                idempotency_key, ..
            }
            | Effect::Refund {
                idempotency_key, ..
            }
            | Effect::Void {
                idempotency_key, ..
            } => idempotency_key,
        }
    }
}

/// How a request to the outside world ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EffectOutcome {
    /// Done; `reference` is the other side's ID for it (authorization or refund ID).
    Succeeded { reference: String },
    /// Refused for good (a decline): asking again cannot help.
    Rejected { reason: String },
    /// Failed in a way that may pass (timeout, 5xx, connection refused).
    Transient { error: String },
}

impl EffectOutcome {
    /// Short class used in derived event IDs: a replay whose outcome differs (a transient
    /// failure the first time, success the second) must not reuse the first one's IDs.
    pub fn class(&self) -> &'static str {
        match self {
            EffectOutcome::Succeeded { .. } => "succeeded",
            EffectOutcome::Rejected { .. } => "rejected",
            EffectOutcome::Transient { .. } => "transient",
        }
    }
}

/// One decoded input record.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// Prefix-free topic name (a constant of [`crate::topics`]).
    pub topic: &'a str,
    pub event: &'a Event,
}

/// A timer kept in state: it survives restarts and rebalances with the partition.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Timer {
    /// Unique within the stage and partition; scheduling the same ID again replaces it.
    pub id: String,
    /// Wall-clock milliseconds at which it fires.
    pub due_at: i64,
    /// The event that scheduled it, so the outputs it causes carry the same order,
    /// store and correlation.
    pub cause: Option<Envelope>,
    pub payload: serde_json::Value,
}

impl Timer {
    /// The identity of one firing: outputs derive their IDs from it, so a firing that is
    /// replayed after a crash emits the same IDs.
    pub fn firing_id(&self) -> String {
        format!("timer/{}/{}", self.id, self.due_at)
    }
}

pub trait Stage: Send + 'static {
    /// The value type of this stage's keyed state.
    type State: Serialize + DeserializeOwned + Clone + Send + 'static;

    fn name(&self) -> &'static str;

    /// Prefix-free names of the topics this stage consumes.
    fn inputs(&self) -> &'static [&'static str];

    /// Whether events of type `t` on input topic `topic` (prefix-free) are none of this
    /// stage's business. The runtime skips such a record by its `event-type` header,
    /// without decoding it (a stage reads every event type of its topics, and acts on a
    /// few), so `process` must ignore them too: each stage's begins by asking. An event
    /// type a topic should not carry at all is not ignored, so that it is dead-lettered.
    fn ignores(&self, _topic: &str, _t: EventType) -> bool {
        false
    }

    /// Reacts to one input. `Err` means the record can never succeed: it is
    /// dead-lettered, and the stage must decide so before writing any state. An input
    /// that is simply irrelevant is `Ok` with no output.
    fn process(
        &mut self,
        ctx: &mut Ctx<'_, Self::State>,
        input: Input<'_>,
    ) -> Result<(), StageError>;

    /// Reacts to a due timer; the timer is already removed from state.
    fn on_timer(
        &mut self,
        _ctx: &mut Ctx<'_, Self::State>,
        _timer: &Timer,
    ) -> Result<(), StageError> {
        Ok(())
    }

    /// Reacts to the outcome of a request this stage made with [`Ctx::request`]. The
    /// context's cause is the input (or timer) that made the request.
    fn on_effect(
        &mut self,
        _ctx: &mut Ctx<'_, Self::State>,
        _effect: &Effect,
        _outcome: &EffectOutcome,
    ) -> Result<(), StageError> {
        Ok(())
    }
}

/// What a stage may touch while it handles one input or timer.
pub struct Ctx<'a, V> {
    pub state: &'a mut Store<V>,
    timers: &'a mut Store<Timer>,
    out: &'a mut Vec<Event>,
    stage: &'static str,
    now: i64,
    cause_id: String,
    cause: Option<Envelope>,
    ordinal: u32,
    effects: Vec<Effect>,
}

impl<'a, V: Clone> Ctx<'a, V> {
    /// `cause_id` is the input's event ID or a timer's firing ID; `cause` the envelope
    /// the outputs inherit.
    pub fn new(
        stage: &'static str,
        now: i64,
        cause_id: String,
        cause: Option<Envelope>,
        state: &'a mut Store<V>,
        timers: &'a mut Store<Timer>,
        out: &'a mut Vec<Event>,
    ) -> Self {
        Ctx {
            state,
            timers,
            out,
            stage,
            now,
            cause_id,
            cause,
            ordinal: 0,
            effects: Vec::new(),
        }
    }

    /// Asks the runtime to perform `effect` before this batch commits; its outcome comes
    /// back through [`Stage::on_effect`].
    pub fn request(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    /// The requests made through this context (the runtime performs them).
    pub fn take_effects(&mut self) -> Vec<Effect> {
        std::mem::take(&mut self.effects)
    }

    /// The envelope the outputs inherit, if any (a partition-wide timer has none).
    pub fn cause(&self) -> Option<&Envelope> {
        self.cause.as_ref()
    }

    /// Wall-clock milliseconds, from the runtime's clock (controllable in tests).
    pub fn now(&self) -> i64 {
        self.now
    }

    /// The envelope for the next output: a fresh deterministic ID, inheriting order,
    /// store and correlation from the cause.
    pub fn next_envelope(&mut self) -> Envelope {
        let ordinal = self.ordinal;
        self.ordinal += 1;
        match &self.cause {
            Some(cause) => {
                let mut e = Envelope::caused_by(cause, self.stage, ordinal, self.now);
                e.event_id = derive_id(&self.cause_id, self.stage, ordinal).to_string();
                e
            }
            None => Envelope {
                event_id: derive_id(&self.cause_id, self.stage, ordinal).to_string(),
                order_id: None,
                store_id: String::new(),
                correlation_id: self.cause_id.clone(),
                causation_id: None,
                occurred_at: self.now,
                schema_version: 1,
            },
        }
    }

    pub fn emit(&mut self, event: impl Into<Event>) {
        self.out.push(event.into());
    }

    /// Schedules (or reschedules) a timer caused by the current input.
    pub fn schedule(&mut self, id: impl Into<String>, due_at: i64, payload: serde_json::Value) {
        let id = id.into();
        let timer = Timer {
            id: id.clone(),
            due_at,
            cause: self.cause.clone(),
            payload,
        };
        self.timers.insert(id, timer);
    }

    pub fn cancel(&mut self, id: &str) {
        self.timers.remove(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stage_names_parse() {
        assert_eq!("fraud".parse::<StageName>(), Ok(StageName::Fraud));
        assert!("nope".parse::<StageName>().unwrap_err().contains("fraud"));
    }
}
