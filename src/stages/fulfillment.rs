//! Fulfillment: every authorized order is picked, packed and made ready to ship, once —
//! and the one place that decides whether a customer's cancellation comes in time.
//!
//! `PaymentAuthorized` emits `Picking` at once and starts the order's progress; a timer
//! (`pick_ms`) then emits `Packed`, and another (`pack_ms`) `ReadyToShip`. Other payment
//! events are not this stage's business and are ignored.
//!
//! `ReadyToShip` is the point of no return, and this stage emits it, so this stage alone
//! decides a cancellation (`OrderCancelled` on `order.cancelled`): before `ReadyToShip`
//! it stops the order and emits `CancellationAccepted`, which inventory and payment
//! compensate; from `ReadyToShip` on it emits `CancellationRefused` and changes nothing.
//! Deciding in one place is what keeps payment from refunding an order delivery already
//! shipped.
//!
//! | phase in state   | on                          | emits         | then                  |
//! |------------------|-----------------------------|---------------|-----------------------|
//! | (no record)      | `PaymentAuthorized`         | `Picking`     | `picking`, pack timer |
//! | `picking`        | pack timer                  | `Packed`      | `packed`, ready timer |
//! | `packed`         | ready timer                 | `ReadyToShip` | `ready_to_ship`, retire timer |
//! | `ready_to_ship`  | retire timer                | —             | record removed        |
//! | (no record), `picking`, `packed` | `OrderCancelled` | `CancellationAccepted` | `cancelled`, step timers cancelled, retire timer |
//! | `cancelled`      | `OrderCancelled` again      | —             | unchanged             |
//! | `cancelled`      | `PaymentAuthorized`         | —             | unchanged (never picked) |
//! | `cancelled`      | retire timer                | —             | record removed        |
//! | `ready_to_ship`  | `OrderCancelled` (first)    | `CancellationRefused` | refusal recorded |
//! | `ready_to_ship`  | `OrderCancelled` again      | —             | unchanged             |
//! | any              | `PaymentAuthorized` again   | —             | unchanged             |
//! | any              | a timer of another phase    | —             | unchanged             |
//!
//! Invariant: an order is fulfilled at most once while its record lives. The record is
//! keyed by (store, order), not by the triggering event, so a redelivered or replayed
//! `PaymentAuthorized` — even one with another event ID, as a retried payment could
//! produce — finds it and changes nothing. The record is retired [`RETAIN_MS`] after
//! `ReadyToShip` or a cancellation: as long as payment keeps an authorized order, so a
//! cancellation arriving late can never find the record gone and be accepted for an
//! order already shipped. Timer-caused outputs
//! inherit the envelope of the order's `PaymentAuthorized` (the timers' cause) and derive
//! their IDs from the firing, so a replayed firing emits the same IDs.

use serde::{Deserialize, Serialize};

use crate::config::FulfillmentSettings;
use crate::events::{
    CancellationAccepted, CancellationRefused, Event, EventType, OrderCancelled, Packed,
    PaymentAuthorized, Picking, ReadyToShip,
};
use crate::stages::{Ctx, Input, Stage, StageError, StageName, Timer};
use crate::topics;

/// How long a finished order's record is kept after `ReadyToShip` (or a cancelled one
/// after its cancellation), so that a `PaymentAuthorized` published again within that
/// time (under a new event ID, which the runtime's dedup window cannot recognize) is
/// still recognized, and a late `OrderCancelled` is refused rather than accepted: 30
/// days, the time payment keeps an authorized order it could still refund.
pub const RETAIN_MS: i64 = 30 * 24 * 3_600_000;

/// `CancellationRefused.reason`: the order reached the point of no return.
pub const TOO_LATE: &str = "already ready_to_ship: the order can no longer be cancelled";

/// The value of one key of the fulfillment stage's state.
///
/// An enum, although it has one variant, so that the changelog value names what it holds
/// (the same convention as the other stages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FulfillmentState {
    /// One order's progress, under [`order_key`].
    Order(Progress),
}

/// Where one order is in fulfillment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Phase,
    /// Wall-clock ms at which the order entered `phase`; for operators reading state.
    pub since: i64,
    /// Whether a cancellation was refused already, so a repeated request is answered
    /// once. Absent from the changelog while false.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cancellation_refused: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Picking,
    Packed,
    ReadyToShip,
    /// Stopped by a customer's cancellation before `ReadyToShip`; never picked again.
    Cancelled,
}

/// The step a timer performs. Each step has its own timer ID, so two steps that happen
/// to be due at the same millisecond (`pick_ms` = `pack_ms` = 0) still have distinct
/// firing IDs, and so distinct output IDs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// `picking` → `packed`.
    Pack,
    /// `packed` → `ready_to_ship`.
    Ready,
    /// Removes a finished record.
    Retire,
}

impl Step {
    fn as_str(self) -> &'static str {
        match self {
            Step::Pack => "pack",
            Step::Ready => "ready",
            Step::Retire => "retire",
        }
    }

    /// Whether this step applies to an order in `phase`; a timer finding anything else
    /// is stale and does nothing.
    fn applies_in(self, phase: Phase) -> bool {
        match self {
            Step::Pack => phase == Phase::Picking,
            Step::Ready => phase == Phase::Packed,
            Step::Retire => matches!(phase, Phase::ReadyToShip | Phase::Cancelled),
        }
    }
}

/// A timer's payload: which record, and what to do to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct TimerPayload {
    key: String,
    step: Step,
}

/// The state key of one order: `order/{store_id}/{order_id}`, with `%` and `/` inside
/// either ID percent-escaped so that two different pairs never share a key.
pub fn order_key(store_id: &str, order_id: &str) -> String {
    format!(
        "order/{}/{}",
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

/// The ID of an order's timer for one step: `{step}/{store_id}/{order_id}` (escaped as in
/// [`order_key`]). Timer IDs are unique per stage and partition, which holds many orders.
pub fn timer_id(step: Step, store_id: &str, order_id: &str) -> String {
    format!(
        "{}/{}/{}",
        step.as_str(),
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

/// Picks, packs and readies authorized orders on timers.
pub struct FulfillmentStage {
    /// `settings.pick_ms`, saturated to `i64`.
    pick_ms: i64,
    /// `settings.pack_ms`, saturated to `i64`.
    pack_ms: i64,
}

impl FulfillmentStage {
    pub fn new(settings: FulfillmentSettings) -> Self {
        FulfillmentStage {
            pick_ms: i64::try_from(settings.pick_ms).unwrap_or(i64::MAX),
            pack_ms: i64::try_from(settings.pack_ms).unwrap_or(i64::MAX),
        }
    }

    fn start(
        &self,
        ctx: &mut Ctx<'_, FulfillmentState>,
        auth: &PaymentAuthorized,
    ) -> Result<(), StageError> {
        let env = &auth.envelope;
        // Checked before any state is written: the record is dead-lettered untouched.
        let order_id = env.order_id.as_deref().ok_or_else(|| {
            StageError::Invalid(format!(
                "PaymentAuthorized {} has no order_id",
                env.event_id
            ))
        })?;
        let key = order_key(&env.store_id, order_id);
        if ctx.state.contains(&key) {
            // A duplicate or replay: the order is already being (or was) fulfilled.
            return Ok(());
        }
        let now = ctx.now();
        ctx.state.insert(
            key.clone(),
            FulfillmentState::Order(Progress {
                phase: Phase::Picking,
                since: now,
                cancellation_refused: false,
            }),
        );
        let picking = Picking {
            envelope: ctx.next_envelope(),
        };
        ctx.emit(picking);
        schedule(
            ctx,
            Step::Pack,
            &env.store_id,
            order_id,
            key,
            now.saturating_add(self.pick_ms),
        );
        Ok(())
    }

    /// A customer's cancellation: accepted before `ReadyToShip`, refused from then on;
    /// each answered once per record.
    fn cancel(
        &self,
        ctx: &mut Ctx<'_, FulfillmentState>,
        request: &OrderCancelled,
    ) -> Result<(), StageError> {
        let env = &request.envelope;
        let order_id = env.order_id.as_deref().ok_or_else(|| {
            StageError::Invalid(format!("OrderCancelled {} has no order_id", env.event_id))
        })?;
        let store_id = env.store_id.as_str();
        let key = order_key(store_id, order_id);
        let now = ctx.now();
        let progress = ctx
            .state
            .get(&key)
            .map(|FulfillmentState::Order(p)| p.clone());
        match progress.as_ref().map(|p| p.phase) {
            None | Some(Phase::Picking) | Some(Phase::Packed) => {
                ctx.cancel(&timer_id(Step::Pack, store_id, order_id));
                ctx.cancel(&timer_id(Step::Ready, store_id, order_id));
                ctx.state.insert(
                    key.clone(),
                    FulfillmentState::Order(Progress {
                        phase: Phase::Cancelled,
                        since: now,
                        cancellation_refused: false,
                    }),
                );
                let accepted = CancellationAccepted {
                    envelope: ctx.next_envelope(),
                    reason: request.reason.clone(),
                };
                ctx.emit(accepted);
                let due = now.saturating_add(RETAIN_MS);
                schedule(ctx, Step::Retire, store_id, order_id, key, due);
            }
            Some(Phase::ReadyToShip) => {
                let mut progress = progress.expect("a phase comes from a record");
                if progress.cancellation_refused {
                    return Ok(());
                }
                progress.cancellation_refused = true;
                ctx.state.insert(key, FulfillmentState::Order(progress));
                let refused = CancellationRefused {
                    envelope: ctx.next_envelope(),
                    reason: TOO_LATE.to_owned(),
                };
                ctx.emit(refused);
            }
            // Cancelled already: the same answer was given once.
            Some(Phase::Cancelled) => {}
        }
        Ok(())
    }
}

fn schedule(
    ctx: &mut Ctx<'_, FulfillmentState>,
    step: Step,
    store_id: &str,
    order_id: &str,
    key: String,
    due_at: i64,
) {
    let payload = serde_json::to_value(TimerPayload { key, step })
        .expect("a timer payload of strings serializes");
    ctx.schedule(timer_id(step, store_id, order_id), due_at, payload);
}

impl Stage for FulfillmentStage {
    type State = FulfillmentState;

    fn name(&self) -> &'static str {
        StageName::Fulfillment.as_str()
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[topics::PAYMENT_PROCESSED, topics::ORDER_CANCELLED]
    }

    /// Retries, failures and refunds: the order either is not paid yet or is compensated
    /// by other stages.
    fn ignores(&self, topic: &str, t: EventType) -> bool {
        use EventType::*;
        topic == topics::PAYMENT_PROCESSED
            && matches!(t, PaymentRetrying | PaymentFailed | PaymentRefunded)
    }

    fn process(
        &mut self,
        ctx: &mut Ctx<'_, FulfillmentState>,
        input: Input<'_>,
    ) -> Result<(), StageError> {
        if self.ignores(input.topic, input.event.event_type()) {
            return Ok(());
        }
        match input.event {
            Event::PaymentAuthorized(auth) if input.topic == topics::PAYMENT_PROCESSED => {
                self.start(ctx, auth)
            }
            Event::OrderCancelled(request) if input.topic == topics::ORDER_CANCELLED => {
                self.cancel(ctx, request)
            }
            // Retries, failures and refunds: the order either is not paid yet or is
            // compensated by other stages; fulfillment has nothing to do.
            Event::PaymentRetrying(_) | Event::PaymentFailed(_) | Event::PaymentRefunded(_)
                if input.topic == topics::PAYMENT_PROCESSED =>
            {
                Ok(())
            }
            other => Err(StageError::Unexpected {
                event_type: other.event_type().to_string(),
                topic: input.topic.to_owned(),
            }),
        }
    }

    fn on_timer(
        &mut self,
        ctx: &mut Ctx<'_, FulfillmentState>,
        timer: &Timer,
    ) -> Result<(), StageError> {
        let TimerPayload { key, step } =
            serde_json::from_value(timer.payload.clone()).map_err(|e| {
                StageError::Invalid(format!("timer {} has an invalid payload: {e}", timer.id))
            })?;
        let Some(FulfillmentState::Order(progress)) = ctx.state.get(&key) else {
            // The record was retired; nothing left to do.
            return Ok(());
        };
        if !step.applies_in(progress.phase) {
            return Ok(());
        }
        // The next step is due relative to when this one was due, not to when it fired:
        // a worker that fell behind keeps the order's schedule, and a firing replayed
        // after a crash schedules the same next timer, so its outputs keep their IDs.
        let now = ctx.now();
        let (store_id, order_id) = match ctx.cause() {
            Some(cause) => (
                cause.store_id.clone(),
                cause.order_id.clone().unwrap_or_default(),
            ),
            None => {
                return Err(StageError::Invalid(format!(
                    "timer {} has no cause envelope",
                    timer.id
                )));
            }
        };
        match step {
            Step::Pack => {
                set_phase(ctx, &key, Phase::Packed, now);
                let packed = Packed {
                    envelope: ctx.next_envelope(),
                };
                ctx.emit(packed);
                let due = timer.due_at.saturating_add(self.pack_ms);
                schedule(ctx, Step::Ready, &store_id, &order_id, key, due);
            }
            Step::Ready => {
                set_phase(ctx, &key, Phase::ReadyToShip, now);
                let ready = ReadyToShip {
                    envelope: ctx.next_envelope(),
                };
                ctx.emit(ready);
                let due = timer.due_at.saturating_add(RETAIN_MS);
                schedule(ctx, Step::Retire, &store_id, &order_id, key, due);
            }
            Step::Retire => {
                ctx.state.remove(&key);
            }
        }
        Ok(())
    }
}

fn set_phase(ctx: &mut Ctx<'_, FulfillmentState>, key: &str, phase: Phase, now: i64) {
    ctx.state.insert(
        key.to_owned(),
        FulfillmentState::Order(Progress {
            phase,
            since: now,
            cancellation_refused: false,
        }),
    );
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;
    use crate::events::{
        Envelope, EventType, PaymentFailed, PaymentFailureReason, PaymentRefunded, PaymentRetrying,
        derive_id,
    };
    use crate::stages::driver::Driver;

    type TestResult = Result<(), Box<dyn Error>>;

    const T0: i64 = 1_700_000_000_000;
    const PICK: i64 = 1_000;
    const PACK: i64 = 2_000;

    fn settings() -> FulfillmentSettings {
        FulfillmentSettings {
            pick_ms: PICK as u64,
            pack_ms: PACK as u64,
        }
    }

    fn envelope(event_id: &str, store: &str, order: &str) -> Envelope {
        Envelope {
            event_id: event_id.into(),
            order_id: Some(order.into()),
            store_id: store.into(),
            correlation_id: format!("corr-{store}-{order}"),
            causation_id: Some("stock-reserved".into()),
            occurred_at: T0 - 10,
            schema_version: 1,
        }
    }

    fn authorized(event_id: &str, store: &str, order: &str) -> Event {
        Event::PaymentAuthorized(PaymentAuthorized {
            envelope: envelope(event_id, store, order),
            amount_cents: 2_500,
            currency: "EUR".into(),
            attempt: 1,
            authorization_id: "auth-1".into(),
        })
    }

    /// The stage on the runtime's own calls, from `T0`.
    type Harness = Driver<FulfillmentStage>;

    fn harness() -> Harness {
        Driver::new(FulfillmentStage::new(settings()), T0)
    }

    impl Driver<FulfillmentStage> {
        fn phase(&self, store: &str, order: &str) -> Option<Phase> {
            self.state
                .peek(&order_key(store, order))
                .map(|FulfillmentState::Order(p)| p.phase)
        }

        fn timer_ids(&self) -> Vec<String> {
            let mut ids: Vec<String> = self.timers.iter().map(|(k, _)| k.clone()).collect();
            ids.sort();
            ids
        }
    }

    fn types(events: &[Event]) -> Vec<EventType> {
        events.iter().map(Event::event_type).collect()
    }

    #[test]
    fn stage_identity() {
        let stage = FulfillmentStage::new(settings());
        assert_eq!(stage.name(), "fulfillment");
        assert_eq!(
            stage.inputs(),
            &[topics::PAYMENT_PROCESSED, topics::ORDER_CANCELLED]
        );
    }

    fn cancelled(event_id: &str, store: &str, order: &str) -> Event {
        Event::OrderCancelled(OrderCancelled {
            envelope: envelope(event_id, store, order),
            reason: Some("changed my mind".into()),
        })
    }

    /// Where an order can be when its cancellation arrives.
    #[derive(Debug, Clone, Copy)]
    enum Position {
        NoRecord,
        Picking,
        Packed,
        ReadyToShip,
        AlreadyRefused,
        AlreadyCancelled,
    }

    /// Brings a fresh driver's order s-1/o-1 to `position`.
    fn reach(h: &mut Harness, position: Position) -> TestResult {
        let auth = authorized("pa-1", "s-1", "o-1");
        match position {
            Position::NoRecord => {}
            Position::Picking => {
                h.process(&auth)?;
            }
            Position::Packed => {
                h.process(&auth)?;
                h.advance_until_idle(T0 + PICK)?;
            }
            Position::ReadyToShip | Position::AlreadyRefused => {
                h.process(&auth)?;
                h.advance_until_idle(T0 + PICK + PACK)?;
                if let Position::AlreadyRefused = position {
                    h.process(&cancelled("oc-0", "s-1", "o-1"))?;
                }
            }
            Position::AlreadyCancelled => {
                h.process(&auth)?;
                h.process(&cancelled("oc-0", "s-1", "o-1"))?;
            }
        }
        h.commit();
        Ok(())
    }

    /// A cancellation in every position an order can be in: what it emits, the phase
    /// after, the timers left — and that nothing more happens afterwards (an accepted
    /// order is never packed nor made ready, even when its old timers' times come).
    #[test]
    fn a_cancellation_in_every_position() -> TestResult {
        use EventType as E;
        let retire = timer_id(Step::Retire, "s-1", "o-1");
        let at = T0 + PICK + PACK;
        // (position, outputs, phase after, timers after (id, due))
        type Row = (Position, Vec<E>, Phase, Vec<(String, i64)>);
        let rows: Vec<Row> = vec![
            (
                Position::NoRecord,
                vec![E::CancellationAccepted],
                Phase::Cancelled,
                vec![(retire.clone(), at + RETAIN_MS)],
            ),
            (
                Position::Picking,
                vec![E::CancellationAccepted],
                Phase::Cancelled,
                vec![(retire.clone(), at + RETAIN_MS)],
            ),
            (
                Position::Packed,
                vec![E::CancellationAccepted],
                Phase::Cancelled,
                vec![(retire.clone(), at + RETAIN_MS)],
            ),
            (
                Position::ReadyToShip,
                vec![E::CancellationRefused],
                Phase::ReadyToShip,
                vec![(retire.clone(), at + RETAIN_MS)],
            ),
            // Answered once: a repeated request (another event ID) changes nothing.
            (
                Position::AlreadyRefused,
                vec![],
                Phase::ReadyToShip,
                vec![(retire.clone(), at + RETAIN_MS)],
            ),
            (
                Position::AlreadyCancelled,
                vec![],
                Phase::Cancelled,
                vec![(retire.clone(), T0 + RETAIN_MS)],
            ),
        ];
        for (position, outputs, phase, timers) in rows {
            let mut h = harness();
            reach(&mut h, position)?;
            // Every request arrives at the same instant, after the order would be ready.
            h.now = at;
            if let Position::Picking | Position::Packed | Position::AlreadyCancelled = position {
                // Keep the order where it is: the request arrives before its next step.
                h.now = match position {
                    Position::Picking | Position::AlreadyCancelled => T0 + PICK - 1,
                    _ => T0 + PICK + PACK - 1,
                };
            }
            let now = h.now;
            let out = h.process(&cancelled("oc-1", "s-1", "o-1"))?;
            assert_eq!(types(&out), outputs, "{position:?}: outputs");
            assert_eq!(h.phase("s-1", "o-1"), Some(phase), "{position:?}: phase");
            let timers: Vec<(String, i64)> = timers
                .into_iter()
                .map(|(id, due)| {
                    // An acceptance retires `RETAIN_MS` after it happened.
                    let due = if outputs == [E::CancellationAccepted] {
                        now + RETAIN_MS
                    } else {
                        due
                    };
                    (id, due)
                })
                .collect();
            let got: Vec<(String, i64)> = h
                .timer_ids()
                .into_iter()
                .map(|id| {
                    let due = h.timers.get(&id).map(|t| t.due_at).unwrap_or_default();
                    (id, due)
                })
                .collect();
            assert_eq!(got, timers, "{position:?}: timers");
            if let [answer] = out.as_slice() {
                let env = answer.envelope();
                assert_eq!(
                    env.event_id,
                    derive_id("oc-1", "fulfillment", 0).to_string()
                );
                assert_eq!(env.causation_id.as_deref(), Some("oc-1"));
                assert_eq!(env.order_id.as_deref(), Some("o-1"));
                assert_eq!(env.store_id, "s-1");
                match answer {
                    Event::CancellationAccepted(a) => {
                        assert_eq!(a.reason.as_deref(), Some("changed my mind"))
                    }
                    Event::CancellationRefused(r) => assert_eq!(r.reason, TOO_LATE),
                    other => return Err(format!("{other:?}").into()),
                }
            }
            // Nothing further happens until the record retires, and then it goes.
            let later = h.advance_until_idle(now + RETAIN_MS - 1)?;
            assert_eq!(types(&later), vec![], "{position:?}: later outputs");
            h.advance_until_idle(now + 2 * RETAIN_MS)?;
            assert!(h.state.is_empty(), "{position:?}: retired");
            assert!(h.timers.is_empty(), "{position:?}: timers left");
        }
        Ok(())
    }

    /// Both arrival orders of the request and the order's authorization: the order is
    /// cancelled either way, and never picked once cancelled.
    #[test]
    fn a_request_before_the_authorization_means_the_order_is_never_picked() -> TestResult {
        let mut h = harness();
        let out = h.process(&cancelled("oc-1", "s-1", "o-1"))?;
        assert_eq!(types(&out), [EventType::CancellationAccepted]);
        h.commit();
        let out = h.process(&authorized("pa-1", "s-1", "o-1"))?;
        assert_eq!(out, vec![]);
        assert!(!h.state.has_changes() && !h.timers.has_changes());
        assert_eq!(h.advance_until_idle(T0 + PICK + PACK)?, vec![]);
        assert_eq!(h.phase("s-1", "o-1"), Some(Phase::Cancelled));

        // The other order: authorized first, then the request.
        let mut h = harness();
        let mut out = h.process(&authorized("pa-1", "s-1", "o-1"))?;
        out.extend(h.process(&cancelled("oc-1", "s-1", "o-1"))?);
        out.extend(h.advance_until_idle(T0 + PICK + PACK)?);
        assert_eq!(
            types(&out),
            [EventType::Picking, EventType::CancellationAccepted]
        );
        Ok(())
    }

    #[test]
    fn a_cancellation_only_concerns_its_own_order() -> TestResult {
        let mut h = harness();
        h.process(&authorized("pa-1", "s-1", "o-1"))?;
        h.process(&authorized("pa-2", "s-2", "o-1"))?;
        h.process(&cancelled("oc-1", "s-2", "o-1"))?;
        let out = h.advance_until_idle(T0 + PICK + PACK)?;
        assert_eq!(types(&out), [EventType::Packed, EventType::ReadyToShip]);
        assert_eq!(out[0].envelope().store_id, "s-1");
        assert_eq!(h.phase("s-2", "o-1"), Some(Phase::Cancelled));
        Ok(())
    }

    #[test]
    fn a_cancellation_without_an_order_id_is_invalid_and_leaves_no_trace() {
        let mut h = harness();
        let mut request = cancelled("oc-1", "s-1", "o-1");
        request.envelope_mut().order_id = None;
        assert!(matches!(
            h.process(&request),
            Err(StageError::Invalid(ref m)) if m.contains("oc-1")
        ));
        assert!(h.state.is_empty() && !h.state.has_changes());
        assert!(h.timers.is_empty());
    }

    /// Every transition of the table in the module docs, in order, with the state,
    /// timers and outputs after each.
    #[test]
    fn every_transition_from_authorized_to_retired() -> TestResult {
        let mut h = harness();
        let auth = authorized("pa-1", "s-1", "o-1");
        let pack = timer_id(Step::Pack, "s-1", "o-1");
        let ready = timer_id(Step::Ready, "s-1", "o-1");
        let retire = timer_id(Step::Retire, "s-1", "o-1");

        // (clock, action, outputs, phase after, timers after (id, due_at))
        type Row = (i64, bool, Vec<EventType>, Option<Phase>, Vec<(String, i64)>);
        let rows: Vec<Row> = vec![
            // PaymentAuthorized → Picking at once, pack timer.
            (
                T0,
                true,
                vec![EventType::Picking],
                Some(Phase::Picking),
                vec![(pack.clone(), T0 + PICK)],
            ),
            // Nothing is due one ms early.
            (
                T0 + PICK - 1,
                false,
                vec![],
                Some(Phase::Picking),
                vec![(pack.clone(), T0 + PICK)],
            ),
            // Pack timer → Packed, ready timer.
            (
                T0 + PICK,
                false,
                vec![EventType::Packed],
                Some(Phase::Packed),
                vec![(ready.clone(), T0 + PICK + PACK)],
            ),
            // Ready timer → ReadyToShip, retire timer.
            (
                T0 + PICK + PACK,
                false,
                vec![EventType::ReadyToShip],
                Some(Phase::ReadyToShip),
                vec![(retire.clone(), T0 + PICK + PACK + RETAIN_MS)],
            ),
            // One ms before retirement the record is still there.
            (
                T0 + PICK + PACK + RETAIN_MS - 1,
                false,
                vec![],
                Some(Phase::ReadyToShip),
                vec![(retire.clone(), T0 + PICK + PACK + RETAIN_MS)],
            ),
            // Retire timer → record removed, nothing emitted.
            (T0 + PICK + PACK + RETAIN_MS, false, vec![], None, vec![]),
        ];
        for (i, (clock, input, outputs, phase, timers)) in rows.into_iter().enumerate() {
            let out = if input {
                h.now = clock;
                h.process(&auth)?
            } else {
                h.advance_until_idle(clock)?
            };
            assert_eq!(types(&out), outputs, "row {i}: outputs");
            assert_eq!(h.phase("s-1", "o-1"), phase, "row {i}: phase");
            let got: Vec<(String, i64)> = h
                .timer_ids()
                .into_iter()
                .map(|id| {
                    let due = h.timers.get(&id).map(|t| t.due_at).unwrap_or_default();
                    (id, due)
                })
                .collect();
            assert_eq!(got, timers, "row {i}: timers");
        }
        assert!(h.state.is_empty());
        Ok(())
    }

    #[test]
    fn outputs_inherit_the_orders_envelope_with_deterministic_ids() -> TestResult {
        let mut h = harness();
        let auth = authorized("pa-1", "s-1", "o-1");
        let picking = h.process(&auth)?;
        let pack_timer = h
            .timers
            .get(&timer_id(Step::Pack, "s-1", "o-1"))
            .cloned()
            .ok_or("no pack timer")?;
        let packed = h.advance_until_idle(T0 + PICK)?;
        let ready_timer = h
            .timers
            .get(&timer_id(Step::Ready, "s-1", "o-1"))
            .cloned()
            .ok_or("no ready timer")?;
        let ready = h.advance_until_idle(T0 + PICK + PACK)?;

        let expected = [
            (&picking, derive_id("pa-1", "fulfillment", 0), T0),
            (
                &packed,
                derive_id(&pack_timer.firing_id(), "fulfillment", 0),
                T0 + PICK,
            ),
            (
                &ready,
                derive_id(&ready_timer.firing_id(), "fulfillment", 0),
                T0 + PICK + PACK,
            ),
        ];
        for (out, id, at) in expected {
            let [event] = out.as_slice() else {
                return Err(format!("expected one output, got {out:?}").into());
            };
            let env = event.envelope();
            assert_eq!(env.event_id, id.to_string());
            assert_eq!(env.order_id.as_deref(), Some("o-1"));
            assert_eq!(env.store_id, "s-1");
            assert_eq!(env.correlation_id, "corr-s-1-o-1");
            assert_eq!(env.causation_id.as_deref(), Some("pa-1"));
            assert_eq!(env.occurred_at, at);
        }
        assert_eq!(pack_timer.cause.as_ref(), Some(auth.envelope()));
        assert_eq!(ready_timer.cause.as_ref(), Some(auth.envelope()));
        Ok(())
    }

    #[test]
    fn a_replayed_firing_emits_the_same_ids() -> TestResult {
        let run = || -> Result<Vec<Event>, Box<dyn Error>> {
            let mut h = harness();
            let mut out = h.process(&authorized("pa-1", "s-1", "o-1"))?;
            out.extend(h.advance_until_idle(T0 + PICK)?);
            out.extend(h.advance_until_idle(T0 + PICK + PACK)?);
            Ok(out)
        };
        assert_eq!(run()?, run()?);
        Ok(())
    }

    /// A duplicate (same ID) or replayed (new ID) PaymentAuthorized in every phase, and
    /// after retirement.
    #[test]
    fn duplicates_and_replays_never_restart_fulfillment() -> TestResult {
        // (clock to reach before the duplicate, phase then)
        let cases = [
            (T0, Phase::Picking),
            (T0 + PICK, Phase::Packed),
            (T0 + PICK + PACK, Phase::ReadyToShip),
            (T0 + PICK + PACK + RETAIN_MS - 1, Phase::ReadyToShip),
        ];
        for (clock, phase) in cases {
            for dup_id in ["pa-1", "pa-replayed"] {
                let mut h = harness();
                h.process(&authorized("pa-1", "s-1", "o-1"))?;
                h.advance_until_idle(clock)?;
                let timers_before = h.timer_ids();
                let dues_before: Vec<i64> = timers_before
                    .iter()
                    .filter_map(|id| h.timers.get(id).map(|t| t.due_at))
                    .collect();
                h.state.commit();
                h.timers.commit();

                let mut dup = authorized(dup_id, "s-1", "o-1");
                if let Event::PaymentAuthorized(a) = &mut dup {
                    a.attempt = 2;
                    a.authorization_id = "auth-2".into();
                }
                let out = h.process(&dup)?;
                assert!(out.is_empty(), "{phase:?}/{dup_id}: {out:?}");
                assert_eq!(h.phase("s-1", "o-1"), Some(phase));
                assert!(!h.state.has_changes(), "{phase:?}/{dup_id}: state written");
                assert!(
                    !h.timers.has_changes(),
                    "{phase:?}/{dup_id}: timers written"
                );
                let dues_after: Vec<i64> = h
                    .timer_ids()
                    .iter()
                    .filter_map(|id| h.timers.get(id).map(|t| t.due_at))
                    .collect();
                assert_eq!(h.timer_ids(), timers_before);
                assert_eq!(dues_after, dues_before);
            }
        }
        Ok(())
    }

    #[test]
    fn after_retirement_a_replay_starts_again() -> TestResult {
        // The dedup memory is bounded: past `RETAIN_MS` the order is forgotten, as the
        // runtime's seen-set forgets event IDs after its retention.
        let mut h = harness();
        h.process(&authorized("pa-1", "s-1", "o-1"))?;
        h.advance_until_idle(T0 + PICK + PACK + RETAIN_MS)?;
        assert!(h.state.is_empty());
        let out = h.process(&authorized("pa-late", "s-1", "o-1"))?;
        assert_eq!(types(&out), [EventType::Picking]);
        Ok(())
    }

    #[test]
    fn orders_progress_independently_per_store_and_order() -> TestResult {
        let mut h = harness();
        h.process(&authorized("a", "s-1", "o-1"))?;
        h.now = T0 + 500;
        h.process(&authorized("b", "s-2", "o-1"))?;
        h.process(&authorized("c", "s-1", "o-2"))?;
        let out = h.advance_until_idle(T0 + PICK)?;
        assert_eq!(types(&out), [EventType::Packed]);
        assert_eq!(out[0].envelope().store_id, "s-1");
        assert_eq!(out[0].envelope().order_id.as_deref(), Some("o-1"));
        assert_eq!(h.phase("s-1", "o-1"), Some(Phase::Packed));
        assert_eq!(h.phase("s-2", "o-1"), Some(Phase::Picking));
        assert_eq!(h.phase("s-1", "o-2"), Some(Phase::Picking));
        let out = h.advance_until_idle(T0 + 500 + PICK)?;
        assert_eq!(types(&out), [EventType::Packed, EventType::Packed]);
        Ok(())
    }

    #[test]
    fn a_late_firing_keeps_the_orders_schedule() -> TestResult {
        // The worker was down: the pack timer fires 10 s late, and the ready timer is
        // due `pack_ms` after the pack timer was due, not after it fired.
        let mut h = harness();
        h.process(&authorized("pa-1", "s-1", "o-1"))?;
        h.now = T0 + PICK + 10_000;
        let pack = h
            .timers
            .get(&timer_id(Step::Pack, "s-1", "o-1"))
            .cloned()
            .ok_or("no pack timer")?;
        h.timers.remove(&pack.id);
        let out = h.fire_timer(&pack)?;
        assert_eq!(types(&out), [EventType::Packed]);
        assert_eq!(out[0].envelope().occurred_at, T0 + PICK + 10_000);
        let ready = h
            .timers
            .get(&timer_id(Step::Ready, "s-1", "o-1"))
            .ok_or("no ready timer")?;
        assert_eq!(ready.due_at, T0 + PICK + PACK);
        let out = h.advance_until_idle(T0 + PICK + 10_000)?;
        assert_eq!(types(&out), [EventType::ReadyToShip]);
        assert_eq!(
            h.timers
                .get(&timer_id(Step::Retire, "s-1", "o-1"))
                .map(|t| t.due_at),
            Some(T0 + PICK + PACK + RETAIN_MS)
        );
        Ok(())
    }

    #[test]
    fn zero_delays_still_give_distinct_ids() -> TestResult {
        let mut h = harness();
        h.stage = FulfillmentStage::new(FulfillmentSettings {
            pick_ms: 0,
            pack_ms: 0,
        });
        let mut out = h.process(&authorized("pa-1", "s-1", "o-1"))?;
        out.extend(h.advance_until_idle(T0)?);
        assert_eq!(
            types(&out),
            [
                EventType::Picking,
                EventType::Packed,
                EventType::ReadyToShip
            ]
        );
        let mut ids: Vec<&str> = out.iter().map(|e| e.envelope().event_id.as_str()).collect();
        ids.sort();
        ids.dedup();
        assert_eq!(ids.len(), 3);
        Ok(())
    }

    #[test]
    fn other_payment_events_are_ignored() -> TestResult {
        let env = envelope("x", "s-1", "o-1");
        let others = [
            Event::PaymentRetrying(PaymentRetrying {
                envelope: env.clone(),
                amount_cents: 1,
                currency: "EUR".into(),
                attempt: 1,
                next_attempt_at: T0,
                error: "timeout".into(),
            }),
            Event::PaymentFailed(PaymentFailed {
                envelope: env.clone(),
                amount_cents: 1,
                currency: "EUR".into(),
                attempts: 3,
                reason: PaymentFailureReason::Declined,
                message: "declined".into(),
            }),
            Event::PaymentRefunded(PaymentRefunded {
                envelope: env,
                amount_cents: 1,
                currency: "EUR".into(),
                refund_id: "r-1".into(),
                reason: "delivery failed".into(),
            }),
        ];
        for event in &others {
            let mut h = harness();
            assert_eq!(h.process(event)?, vec![], "{}", event.event_type());
            assert!(h.state.is_empty() && !h.state.has_changes());
            assert!(h.timers.is_empty());
        }
        Ok(())
    }

    #[test]
    fn another_event_type_or_topic_is_unexpected_and_leaves_no_trace() {
        let mut h = harness();
        let picking = Event::Picking(Picking {
            envelope: envelope("x", "s-1", "o-1"),
        });
        assert_eq!(
            h.process_on(topics::PAYMENT_PROCESSED, &picking),
            Err(StageError::Unexpected {
                event_type: "Picking".into(),
                topic: "payment.processed".into()
            })
        );
        assert_eq!(
            h.process_on(topics::ORDER_CREATED, &authorized("pa-1", "s-1", "o-1")),
            Err(StageError::Unexpected {
                event_type: "PaymentAuthorized".into(),
                topic: "order.created".into()
            })
        );
        assert!(h.state.is_empty() && !h.state.has_changes());
        assert!(h.timers.is_empty());
    }

    #[test]
    fn an_authorization_without_an_order_id_is_invalid_and_leaves_no_trace() {
        let mut h = harness();
        let mut auth = authorized("pa-1", "s-1", "o-1");
        auth.envelope_mut().order_id = None;
        assert!(matches!(
            h.process(&auth),
            Err(StageError::Invalid(ref m)) if m.contains("pa-1")
        ));
        assert!(h.state.is_empty() && !h.state.has_changes());
        assert!(h.timers.is_empty());
    }

    #[test]
    fn stale_timers_do_nothing() -> TestResult {
        // A timer whose step does not match the phase (or whose record is gone) is
        // ignored: e.g. a pack timer restored from an older changelog than the state.
        let mut h = harness();
        let auth = authorized("pa-1", "s-1", "o-1");
        h.process(&auth)?;
        h.advance_until_idle(T0 + PICK)?;
        h.state.commit();
        let key = order_key("s-1", "o-1");
        for step in [Step::Pack, Step::Retire] {
            let stale = Timer {
                id: timer_id(step, "s-1", "o-1"),
                due_at: T0,
                cause: Some(auth.envelope().clone()),
                payload: serde_json::to_value(TimerPayload {
                    key: key.clone(),
                    step,
                })?,
            };
            let out = h.fire_timer(&stale)?;
            assert!(out.is_empty(), "{step:?}");
            assert_eq!(h.phase("s-1", "o-1"), Some(Phase::Packed));
            assert!(!h.state.has_changes(), "{step:?}");
        }
        let gone = Timer {
            id: timer_id(Step::Ready, "s-9", "o-9"),
            due_at: T0,
            cause: Some(auth.envelope().clone()),
            payload: serde_json::to_value(TimerPayload {
                key: order_key("s-9", "o-9"),
                step: Step::Ready,
            })?,
        };
        let out = h.fire_timer(&gone)?;
        assert!(out.is_empty() && !h.state.has_changes());
        Ok(())
    }

    #[test]
    fn a_timer_with_a_bad_payload_is_an_error_not_a_panic() {
        let mut h = harness();
        let bad = Timer {
            id: "pack/s-1/o-1".into(),
            due_at: T0,
            cause: None,
            payload: serde_json::json!({"nope": 1}),
        };
        assert!(matches!(
            h.fire_timer(&bad),
            Err(StageError::Invalid(ref m)) if m.contains("pack/s-1/o-1")
        ));
    }

    #[test]
    fn keys_are_readable_and_unambiguous() {
        assert_eq!(order_key("s-1", "o-1"), "order/s-1/o-1");
        assert_ne!(order_key("a/b", "c"), order_key("a", "b/c"));
        assert_eq!(order_key("a/b", "c%"), "order/a%2Fb/c%25");
        assert_eq!(timer_id(Step::Pack, "s-1", "o-1"), "pack/s-1/o-1");
        assert_eq!(timer_id(Step::Ready, "s/1", "o-1"), "ready/s%2F1/o-1");
        assert_eq!(timer_id(Step::Retire, "s-1", "o-1"), "retire/s-1/o-1");
    }

    #[test]
    fn state_and_timer_payload_have_a_stable_changelog_shape() -> TestResult {
        let state = FulfillmentState::Order(Progress {
            phase: Phase::ReadyToShip,
            since: 5,
            cancellation_refused: false,
        });
        let json = serde_json::to_string(&state)?;
        assert_eq!(json, r#"{"order":{"phase":"ready_to_ship","since":5}}"#);
        assert_eq!(serde_json::from_str::<FulfillmentState>(&json)?, state);
        let refused = FulfillmentState::Order(Progress {
            phase: Phase::ReadyToShip,
            since: 5,
            cancellation_refused: true,
        });
        let json = serde_json::to_string(&refused)?;
        assert_eq!(
            json,
            r#"{"order":{"phase":"ready_to_ship","since":5,"cancellation_refused":true}}"#
        );
        assert_eq!(serde_json::from_str::<FulfillmentState>(&json)?, refused);

        let mut h = harness();
        h.process(&authorized("pa-1", "s-1", "o-1"))?;
        let timer = h.timers.get("pack/s-1/o-1").ok_or("no pack timer")?;
        assert_eq!(
            timer.payload,
            serde_json::json!({"key": "order/s-1/o-1", "step": "pack"})
        );
        Ok(())
    }
}
