//! Payment: authorizes each reserved order at the payment gateway, retries transient
//! failures on a timer with exponential backoff and jitter, fails declined or exhausted
//! orders (which drives the release of their stock), and refunds orders whose delivery
//! failed.
//!
//! Customer cancellation arrives as fulfillment's `CancellationAccepted` (fulfillment
//! alone decides, before `ReadyToShip`, so nothing accepted here has shipped):
//!
//! | payment status       | on `CancellationAccepted`                                   |
//! |----------------------|-------------------------------------------------------------|
//! | (no record)          | remembered (`cancelled`): a later `StockReserved` emits `PaymentFailed(cancelled)` without charging |
//! | `authorizing` (attempt in flight or retry due) | retry timer stopped, the key voided, then `PaymentFailed(cancelled)` |
//! | `authorized`         | refunded (`PaymentRefunded`, reason `cancelled`)            |
//! | anything else        | nothing: failed, voiding after exhaustion, refunding or refunded already |
//!
//! Voiding the authorization key covers an attempt whose answer is still on its way: a
//! void cancels what the key charged and refuses it from then on.
//!
//! Invariants: an order is authorized at most once — every attempt carries the same
//! idempotency key, so the gateway answers a repeated or replayed call instead of
//! charging again — and an authorized order is refunded at most once. While an order
//! waits for its retry, the partition keeps flowing: the wait is a timer, not a sleep.

use serde::{Deserialize, Serialize};

use super::{Ctx, Effect, EffectOutcome, Input, Stage, StageError, Timer};
use crate::config::PaymentSettings;
use crate::events::{
    CancellationAccepted, Event, EventType, PaymentAuthorized, PaymentFailed, PaymentFailureReason,
    PaymentRefunded, PaymentRetrying, derive_id,
};
use crate::status::CANCELLED_REFUND_REASON;
use crate::topics;

/// How long a settled order's record is kept: long enough to refund a delivery that fails
/// weeks later, and to recognize replays.
const RETAIN_AUTHORIZED_MS: i64 = 30 * 24 * 3600 * 1000;
const RETAIN_CLOSED_MS: i64 = 7 * 24 * 3600 * 1000;

pub struct PaymentStage {
    settings: PaymentSettings,
}

impl PaymentStage {
    pub fn new(settings: PaymentSettings) -> Self {
        PaymentStage { settings }
    }

    /// Delay before attempt `next` (2-based: the first retry is attempt 2):
    /// min(cap, base · factor^(next−2)), jittered down by up to half. The jitter is a
    /// hash of order and attempt, so a replay schedules the same instant.
    pub fn retry_delay_ms(&self, order_key: &str, next: u32) -> i64 {
        let s = &self.settings;
        let exp = f64::from(next.saturating_sub(2));
        let ceiling = (s.retry_base_ms as f64 * s.retry_factor.max(1.0).powf(exp))
            .min(s.retry_cap_ms as f64)
            .max(1.0) as i64;
        let h = derive_id(order_key, "payment-jitter", next).as_u128();
        let half = ceiling / 2;
        half + (h % (ceiling - half + 1) as u128) as i64
    }
}

/// Where an order's payment stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// Attempt `attempt` is in flight or scheduled.
    Authorizing,
    Authorized {
        authorization_id: String,
    },
    Refunding {
        authorization_id: String,
        attempt: u32,
        /// The refund compensates a customer cancellation (else a failed delivery).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cancelled: bool,
    },
    Refunded {
        refund_id: String,
    },
    /// Attempts exhausted, or the order cancelled while authorizing: any charge an
    /// attempt may have made is being voided before the order is failed (void attempt
    /// `attempt`; `error` is the last attempt's, or the cancellation's).
    Voiding {
        attempt: u32,
        error: String,
        /// The void compensates a customer cancellation: the failure says so.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        cancelled: bool,
    },
    /// Cancelled before the reservation reached payment: the order is never charged,
    /// and its `StockReserved`, when it comes, fails it at once.
    Cancelled,
    /// Declined, or attempts exhausted and voided: the order is cancelled.
    Failed,
    /// The gateway refused the refund for good; an operator must look at it.
    RefundRefused {
        reason: String,
    },
}

/// One order's payment, kept under `order/<store>/<order>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderPayment {
    pub amount_cents: i64,
    pub currency: String,
    /// The attempt in flight or scheduled (1-based).
    pub attempt: u32,
    pub status: Status,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentState {
    Order(OrderPayment),
}

/// Timer payloads.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Due {
    /// Make authorization attempt `attempt`.
    Authorize { attempt: u32 },
    /// Make refund attempt `attempt`.
    Refund { attempt: u32 },
    /// Make void attempt `attempt`.
    Void { attempt: u32 },
    /// Forget the order.
    Retire,
}

/// State key of an order.
pub fn order_key(store_id: &str, order_id: &str) -> String {
    format!(
        "order/{}/{}",
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

/// The idempotency key of an order's authorization: one per order, on every attempt.
pub fn authorization_key(store_id: &str, order_id: &str) -> String {
    format!(
        "orderflow/authorize/{}/{}",
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

pub fn refund_key(store_id: &str, order_id: &str) -> String {
    format!(
        "orderflow/refund/{}/{}",
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

fn order_of(ctx: &Ctx<'_, PaymentState>) -> Option<(String, String)> {
    let cause = ctx.cause()?;
    Some((cause.store_id.clone(), cause.order_id.clone()?))
}

impl PaymentStage {
    fn authorize(
        &self,
        ctx: &mut Ctx<'_, PaymentState>,
        p: &OrderPayment,
        store: &str,
        order: &str,
    ) {
        ctx.request(Effect::Authorize {
            idempotency_key: authorization_key(store, order),
            store_id: store.to_owned(),
            order_id: order.to_owned(),
            amount_cents: p.amount_cents,
            currency: p.currency.clone(),
            attempt: p.attempt,
        });
    }

    fn void(&self, ctx: &mut Ctx<'_, PaymentState>, store: &str, order: &str, attempt: u32) {
        ctx.request(Effect::Void {
            idempotency_key: authorization_key(store, order),
            store_id: store.to_owned(),
            order_id: order.to_owned(),
            attempt,
        });
    }

    fn refund(
        &self,
        ctx: &mut Ctx<'_, PaymentState>,
        p: &OrderPayment,
        store: &str,
        order: &str,
        authorization_id: &str,
        attempt: u32,
    ) {
        ctx.request(Effect::Refund {
            idempotency_key: refund_key(store, order),
            store_id: store.to_owned(),
            order_id: order.to_owned(),
            authorization_id: authorization_id.to_owned(),
            amount_cents: p.amount_cents,
            currency: p.currency.clone(),
            attempt,
        });
    }

    fn schedule(ctx: &mut Ctx<'_, PaymentState>, key: &str, due_at: i64, due: &Due) {
        let payload = serde_json::to_value(due).expect("timer payloads serialize");
        ctx.schedule(format!("{key}/next"), due_at, payload);
    }

    fn on_authorization(
        &self,
        ctx: &mut Ctx<'_, PaymentState>,
        key: &str,
        mut p: OrderPayment,
        attempt: u32,
        outcome: &EffectOutcome,
    ) {
        let now = ctx.now();
        match outcome {
            EffectOutcome::Succeeded { reference } => {
                let envelope = ctx.next_envelope();
                ctx.emit(PaymentAuthorized {
                    envelope,
                    amount_cents: p.amount_cents,
                    currency: p.currency.clone(),
                    attempt: attempt as i32,
                    authorization_id: reference.clone(),
                });
                p.status = Status::Authorized {
                    authorization_id: reference.clone(),
                };
                Self::schedule(ctx, key, now + RETAIN_AUTHORIZED_MS, &Due::Retire);
            }
            EffectOutcome::Rejected { reason } => {
                self.fail(
                    ctx,
                    key,
                    &mut p,
                    PaymentFailureReason::Declined,
                    reason.clone(),
                );
            }
            EffectOutcome::Transient { error } if attempt < self.settings.max_attempts => {
                let next = attempt + 1;
                let next_at = now + self.retry_delay_ms(key, next);
                let envelope = ctx.next_envelope();
                ctx.emit(PaymentRetrying {
                    envelope,
                    amount_cents: p.amount_cents,
                    currency: p.currency.clone(),
                    attempt: attempt as i32,
                    next_attempt_at: next_at,
                    error: error.clone(),
                });
                p.attempt = next;
                Self::schedule(ctx, key, next_at, &Due::Authorize { attempt: next });
            }
            // Given up — but an attempt whose answer was lost may have charged (it timed
            // out, or a crash lost it and its replay met an outage): void the key first,
            // and fail the order once nothing can stand charged.
            EffectOutcome::Transient { error } => {
                let Some((store, order)) = order_of(ctx) else {
                    return;
                };
                p.status = Status::Voiding {
                    attempt: 1,
                    error: error.clone(),
                    cancelled: false,
                };
                self.void(ctx, &store, &order, 1);
            }
        }
        ctx.state.insert(key, PaymentState::Order(p));
    }

    fn on_void(
        &self,
        ctx: &mut Ctx<'_, PaymentState>,
        key: &str,
        mut p: OrderPayment,
        attempt: u32,
        error: String,
        outcome: &EffectOutcome,
    ) {
        let cancelled = matches!(
            p.status,
            Status::Voiding {
                cancelled: true,
                ..
            }
        );
        let attempts = p.attempt;
        let void = match outcome {
            EffectOutcome::Succeeded { reference } => Some(format!("void: {reference}")),
            EffectOutcome::Rejected { reason } => {
                tracing::error!(order_key = key, %reason, "the gateway refused a void");
                Some(format!("void refused: {reason}"))
            }
            EffectOutcome::Transient { .. } => None,
        };
        match void {
            Some(void) if cancelled => {
                let message = format!("{error} ({void})");
                self.fail(ctx, key, &mut p, PaymentFailureReason::Cancelled, message);
            }
            Some(void) => {
                let message =
                    format!("gateway unavailable after {attempts} attempts: {error} ({void})");
                self.fail(
                    ctx,
                    key,
                    &mut p,
                    PaymentFailureReason::GatewayUnavailable,
                    message,
                );
            }
            // Until the gateway answers, the order can be neither paid nor failed.
            None => {
                let next = attempt + 1;
                let next_at = ctx.now() + self.retry_delay_ms(key, next.min(64));
                p.status = Status::Voiding {
                    attempt: next,
                    error,
                    cancelled,
                };
                Self::schedule(ctx, key, next_at, &Due::Void { attempt: next });
            }
        }
        ctx.state.insert(key, PaymentState::Order(p));
    }

    fn fail(
        &self,
        ctx: &mut Ctx<'_, PaymentState>,
        key: &str,
        p: &mut OrderPayment,
        reason: PaymentFailureReason,
        message: String,
    ) {
        let envelope = ctx.next_envelope();
        ctx.emit(PaymentFailed {
            envelope,
            amount_cents: p.amount_cents,
            currency: p.currency.clone(),
            attempts: p.attempt as i32,
            reason,
            message,
        });
        p.status = Status::Failed;
        let now = ctx.now();
        Self::schedule(ctx, key, now + RETAIN_CLOSED_MS, &Due::Retire);
    }

    fn on_refund(
        &self,
        ctx: &mut Ctx<'_, PaymentState>,
        key: &str,
        mut p: OrderPayment,
        authorization_id: String,
        attempt: u32,
        outcome: &EffectOutcome,
    ) {
        let cancelled = matches!(
            p.status,
            Status::Refunding {
                cancelled: true,
                ..
            }
        );
        let now = ctx.now();
        match outcome {
            EffectOutcome::Succeeded { reference } => {
                let envelope = ctx.next_envelope();
                ctx.emit(PaymentRefunded {
                    envelope,
                    amount_cents: p.amount_cents,
                    currency: p.currency.clone(),
                    refund_id: reference.clone(),
                    reason: if cancelled {
                        CANCELLED_REFUND_REASON.into()
                    } else {
                        "delivery_failed".into()
                    },
                });
                p.status = Status::Refunded {
                    refund_id: reference.clone(),
                };
                Self::schedule(ctx, key, now + RETAIN_CLOSED_MS, &Due::Retire);
            }
            EffectOutcome::Rejected { reason } => {
                tracing::error!(order_key = key, %reason, "the gateway refused a refund");
                p.status = Status::RefundRefused {
                    reason: reason.clone(),
                };
                Self::schedule(ctx, key, now + RETAIN_CLOSED_MS, &Due::Retire);
            }
            // A refund is owed: keep trying, at the cap once the backoff reaches it.
            EffectOutcome::Transient { .. } => {
                let next = attempt + 1;
                let next_at = now + self.retry_delay_ms(key, next.min(64));
                p.status = Status::Refunding {
                    authorization_id,
                    attempt: next,
                    cancelled,
                };
                Self::schedule(ctx, key, next_at, &Due::Refund { attempt: next });
            }
        }
        ctx.state.insert(key, PaymentState::Order(p));
    }
}

impl PaymentStage {
    /// A customer cancellation fulfillment accepted; see the module documentation.
    fn cancel(
        &self,
        ctx: &mut Ctx<'_, PaymentState>,
        accepted: &CancellationAccepted,
    ) -> Result<(), StageError> {
        let order = accepted.envelope.order_id.as_deref().ok_or_else(|| {
            StageError::Invalid(format!(
                "CancellationAccepted {} has no order_id",
                accepted.envelope.event_id
            ))
        })?;
        let store = accepted.envelope.store_id.as_str();
        let key = order_key(store, order);
        let now = ctx.now();
        let Some(PaymentState::Order(p)) = ctx.state.get(&key).cloned() else {
            let p = OrderPayment {
                amount_cents: 0,
                currency: String::new(),
                attempt: 0,
                status: Status::Cancelled,
            };
            ctx.state.insert(key.clone(), PaymentState::Order(p));
            Self::schedule(ctx, &key, now + RETAIN_CLOSED_MS, &Due::Retire);
            return Ok(());
        };
        let status = match &p.status {
            Status::Authorizing => {
                // Whether an attempt is in flight or its retry is due, the void settles
                // it: the key charges nothing once voided, and this replaces the retry.
                ctx.cancel(&format!("{key}/next"));
                self.void(ctx, store, order, 1);
                Status::Voiding {
                    attempt: 1,
                    error: "cancelled by the customer".into(),
                    cancelled: true,
                }
            }
            Status::Authorized { authorization_id } => {
                let authorization_id = authorization_id.clone();
                self.refund(ctx, &p, store, order, &authorization_id, 1);
                Status::Refunding {
                    authorization_id,
                    attempt: 1,
                    cancelled: true,
                }
            }
            // Failed, voiding after exhaustion (it fails anyway), refunding, refunded,
            // refused, or cancelled already: nothing is or will be charged by this order
            // that another path does not give back.
            _ => return Ok(()),
        };
        ctx.state
            .insert(key, PaymentState::Order(OrderPayment { status, ..p }));
        Ok(())
    }
}

impl Stage for PaymentStage {
    type State = PaymentState;

    fn name(&self) -> &'static str {
        "payment"
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[
            topics::INVENTORY_UPDATED,
            topics::DELIVERY_UPDATED,
            topics::FULFILLMENT_UPDATED,
        ]
    }

    /// Of its three topics, payment acts on reservations, failed deliveries and
    /// accepted cancellations; the rest of what they carry is someone else's business.
    fn ignores(&self, topic: &str, t: EventType) -> bool {
        use EventType::*;
        matches!(
            topic,
            topics::INVENTORY_UPDATED | topics::DELIVERY_UPDATED | topics::FULFILLMENT_UPDATED
        ) && !matches!(t, StockReserved | DeliveryFailed)
            && !(topic == topics::FULFILLMENT_UPDATED && t == CancellationAccepted)
    }

    fn process(
        &mut self,
        ctx: &mut Ctx<'_, PaymentState>,
        input: Input<'_>,
    ) -> Result<(), StageError> {
        if self.ignores(input.topic, input.event.event_type()) {
            return Ok(());
        }
        match input.event {
            Event::StockReserved(r) => {
                let order = r.envelope.order_id.as_deref().ok_or_else(|| {
                    StageError::Invalid("StockReserved without an order_id".into())
                })?;
                if r.total_cents < 0 {
                    return Err(StageError::Invalid(format!(
                        "negative amount {}",
                        r.total_cents
                    )));
                }
                let store = r.envelope.store_id.as_str();
                let key = order_key(store, order);
                if let Some(PaymentState::Order(OrderPayment {
                    status: Status::Cancelled,
                    ..
                })) = ctx.state.get(&key)
                {
                    // Cancelled before it reached payment: fail it without charging;
                    // inventory, which released or never reserved its stock, ignores it.
                    let mut p = OrderPayment {
                        amount_cents: r.total_cents,
                        currency: r.currency.clone(),
                        attempt: 0,
                        status: Status::Cancelled,
                    };
                    let message = "cancelled by the customer before payment".to_owned();
                    self.fail(ctx, &key, &mut p, PaymentFailureReason::Cancelled, message);
                    ctx.state.insert(key, PaymentState::Order(p));
                    return Ok(());
                }
                if ctx.state.contains(&key) {
                    // The same reservation again (a replay with other event IDs): the
                    // order is already being paid for.
                    return Ok(());
                }
                let p = OrderPayment {
                    amount_cents: r.total_cents,
                    currency: r.currency.clone(),
                    attempt: 1,
                    status: Status::Authorizing,
                };
                self.authorize(ctx, &p, store, order);
                ctx.state.insert(key, PaymentState::Order(p));
                Ok(())
            }
            Event::DeliveryFailed(d) => {
                let Some(order) = d.envelope.order_id.as_deref() else {
                    return Err(StageError::Invalid(
                        "DeliveryFailed without an order_id".into(),
                    ));
                };
                let store = d.envelope.store_id.as_str();
                let key = order_key(store, order);
                let Some(PaymentState::Order(p)) = ctx.state.get(&key).cloned() else {
                    return Ok(());
                };
                let Status::Authorized { authorization_id } = &p.status else {
                    // Not charged, or already refunding or refunded.
                    return Ok(());
                };
                let authorization_id = authorization_id.clone();
                self.refund(ctx, &p, store, order, &authorization_id, 1);
                let p = OrderPayment {
                    status: Status::Refunding {
                        authorization_id,
                        attempt: 1,
                        cancelled: false,
                    },
                    ..p
                };
                ctx.state.insert(key, PaymentState::Order(p));
                Ok(())
            }
            Event::CancellationAccepted(c) if input.topic == topics::FULFILLMENT_UPDATED => {
                self.cancel(ctx, c)
            }
            // Every other event on these topics is someone else's business.
            _ if input.topic == topics::INVENTORY_UPDATED
                || input.topic == topics::DELIVERY_UPDATED
                || input.topic == topics::FULFILLMENT_UPDATED =>
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
        ctx: &mut Ctx<'_, PaymentState>,
        timer: &Timer,
    ) -> Result<(), StageError> {
        let Some((store, order)) = order_of(ctx) else {
            return Ok(());
        };
        let key = order_key(&store, &order);
        let Ok(due) = serde_json::from_value::<Due>(timer.payload.clone()) else {
            return Ok(());
        };
        let Some(PaymentState::Order(p)) = ctx.state.get(&key).cloned() else {
            return Ok(());
        };
        match (due, &p.status) {
            (Due::Authorize { attempt }, Status::Authorizing) if attempt == p.attempt => {
                self.authorize(ctx, &p, &store, &order);
            }
            (
                Due::Refund { attempt },
                Status::Refunding {
                    authorization_id,
                    attempt: current,
                    ..
                },
            ) if attempt == *current => {
                let authorization_id = authorization_id.clone();
                self.refund(ctx, &p, &store, &order, &authorization_id, attempt);
            }
            (
                Due::Void { attempt },
                Status::Voiding {
                    attempt: current, ..
                },
            ) if attempt == *current => {
                self.void(ctx, &store, &order, attempt);
            }
            (Due::Retire, _) => {
                ctx.state.remove(&key);
            }
            _ => {}
        }
        Ok(())
    }

    fn on_effect(
        &mut self,
        ctx: &mut Ctx<'_, PaymentState>,
        effect: &Effect,
        outcome: &EffectOutcome,
    ) -> Result<(), StageError> {
        match effect {
            Effect::Authorize {
                store_id,
                order_id,
                attempt,
                ..
            } => {
                let key = order_key(store_id, order_id);
                if let Some(PaymentState::Order(p)) = ctx.state.get(&key).cloned()
                    && p.status == Status::Authorizing
                    && p.attempt == *attempt
                {
                    self.on_authorization(ctx, &key, p, *attempt, outcome);
                }
            }
            Effect::Void {
                store_id,
                order_id,
                attempt: requested,
                ..
            } => {
                let key = order_key(store_id, order_id);
                if let Some(PaymentState::Order(p)) = ctx.state.get(&key).cloned()
                    && let Status::Voiding { attempt, error, .. } = p.status.clone()
                    && attempt == *requested
                {
                    self.on_void(ctx, &key, p, attempt, error, outcome);
                }
            }
            Effect::Refund {
                store_id,
                order_id,
                attempt: requested,
                ..
            } => {
                let key = order_key(store_id, order_id);
                if let Some(PaymentState::Order(p)) = ctx.state.get(&key).cloned()
                    && let Status::Refunding {
                        authorization_id,
                        attempt,
                        ..
                    } = p.status.clone()
                    && attempt == *requested
                {
                    self.on_refund(ctx, &key, p, authorization_id, attempt, outcome);
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::{
        DeliveryFailed, Envelope, OrderLine, StockRejected, StockReserved, order_created_id,
    };
    use crate::runtime::invoke;
    use crate::stages::driver::Driver;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    const T0: i64 = 1_800_000_000_000;

    fn settings() -> PaymentSettings {
        PaymentSettings {
            retry_base_ms: 1_000,
            retry_factor: 2.0,
            retry_cap_ms: 8_000,
            max_attempts: 4,
            ..PaymentSettings::default()
        }
    }

    fn envelope(order: &str, cause: &str) -> Envelope {
        Envelope {
            event_id: derive_id(cause, "test", 0).to_string(),
            order_id: Some(order.into()),
            store_id: "s-1".into(),
            correlation_id: order.into(),
            causation_id: Some(order_created_id("s-1", order).to_string()),
            occurred_at: T0,
            schema_version: 1,
        }
    }

    fn reserved(order: &str) -> Event {
        Event::StockReserved(StockReserved {
            envelope: envelope(order, &format!("reserved/{order}")),
            customer_id: "c-1".into(),
            currency: "USD".into(),
            total_cents: 4_998,
            items: vec![OrderLine {
                sku: "SKU-1".into(),
                quantity: 2,
                unit_price_cents: 2_499,
            }],
        })
    }

    fn delivery_failed(order: &str) -> Event {
        Event::DeliveryFailed(DeliveryFailed {
            envelope: envelope(order, &format!("failed/{order}")),
            reason: "address unknown".into(),
        })
    }

    /// The stage on the runtime's own calls, from `T0`.
    type Harness = Driver<PaymentStage>;

    fn harness() -> Harness {
        Driver::new(PaymentStage::new(settings()), T0)
    }

    /// What one call produced.
    #[derive(Debug, Default)]
    struct Step {
        out: Vec<Event>,
        effects: Vec<Effect>,
    }

    impl Driver<PaymentStage> {
        fn step(&mut self, out: Vec<Event>) -> Step {
            let effects = self.requested.drain(..).map(|(e, _)| e).collect();
            Step { out, effects }
        }

        fn input(&mut self, topic: &'static str, event: &Event) -> Result<Step, StageError> {
            let out = self.process_on(topic, event)?;
            Ok(self.step(out))
        }

        fn reserve(&mut self, order: &str) -> Result<Step, StageError> {
            self.input(topics::INVENTORY_UPDATED, &reserved(order))
        }

        /// Hands the outcome of `effect` back, with the cause the runtime would give it.
        fn outcome(&mut self, order: &str, effect: &Effect, outcome: EffectOutcome) -> Step {
            let cause = envelope(order, &format!("reserved/{order}"));
            let out = self
                .react(effect, &outcome, Some(&cause))
                .expect("reactions never fail");
            self.step(out)
        }

        /// Advances the clock to the next due timer and fires it.
        fn fire_next(&mut self) -> Option<(Timer, Step)> {
            let timer = invoke::due(&self.timers, i64::MAX).into_iter().next()?;
            self.timers.remove(&timer.id);
            self.now = self.now.max(timer.due_at);
            let out = self.fire_timer(&timer).expect("timers never fail");
            Some((timer, self.step(out)))
        }

        fn status(&self, order: &str) -> Option<Status> {
            let PaymentState::Order(p) = self.state.peek(&order_key("s-1", order))?;
            Some(p.status.clone())
        }
    }

    fn ok(reference: &str) -> EffectOutcome {
        EffectOutcome::Succeeded {
            reference: reference.into(),
        }
    }

    fn transient() -> EffectOutcome {
        EffectOutcome::Transient {
            error: "503 Service Unavailable".into(),
        }
    }

    #[test]
    fn a_reservation_requests_one_authorization_with_the_orders_key() -> TestResult {
        let mut h = harness();
        let step = h.reserve("o-1")?;
        assert!(step.out.is_empty());
        assert_eq!(
            step.effects,
            vec![Effect::Authorize {
                idempotency_key: "orderflow/authorize/s-1/o-1".into(),
                store_id: "s-1".into(),
                order_id: "o-1".into(),
                amount_cents: 4_998,
                currency: "USD".into(),
                attempt: 1,
            }]
        );
        assert_eq!(h.status("o-1"), Some(Status::Authorizing));
        Ok(())
    }

    #[test]
    fn success_emits_payment_authorized() -> TestResult {
        let mut h = harness();
        let effect = h.reserve("o-1")?.effects.remove(0);
        let step = h.outcome("o-1", &effect, ok("auth-9"));
        let [Event::PaymentAuthorized(a)] = step.out.as_slice() else {
            panic!("expected PaymentAuthorized, got {:?}", step.out);
        };
        assert_eq!(
            (
                a.amount_cents,
                a.currency.as_str(),
                a.attempt,
                a.authorization_id.as_str()
            ),
            (4_998, "USD", 1, "auth-9")
        );
        assert_eq!(a.envelope.order_id.as_deref(), Some("o-1"));
        assert_eq!(
            h.status("o-1"),
            Some(Status::Authorized {
                authorization_id: "auth-9".into()
            })
        );
        Ok(())
    }

    #[test]
    fn a_decline_fails_at_once_without_retrying() -> TestResult {
        let mut h = harness();
        let effect = h.reserve("o-1")?.effects.remove(0);
        let step = h.outcome(
            "o-1",
            &effect,
            EffectOutcome::Rejected {
                reason: "insufficient funds".into(),
            },
        );
        let [Event::PaymentFailed(f)] = step.out.as_slice() else {
            panic!("expected PaymentFailed, got {:?}", step.out);
        };
        assert_eq!(
            (f.reason, f.attempts, f.message.as_str()),
            (PaymentFailureReason::Declined, 1, "insufficient funds")
        );
        assert!(step.effects.is_empty());
        assert_eq!(h.status("o-1"), Some(Status::Failed));
        // Only the retirement timer is left.
        let (timer, fired) = h.fire_next().expect("a retirement timer");
        assert_eq!(timer.due_at, T0 + RETAIN_CLOSED_MS);
        assert!(fired.effects.is_empty() && fired.out.is_empty());
        assert_eq!(h.status("o-1"), None);
        Ok(())
    }

    #[test]
    fn transient_failures_retry_with_backoff_then_succeed() -> TestResult {
        let mut h = harness();
        let mut effect = h.reserve("o-1")?.effects.remove(0);
        let key = order_key("s-1", "o-1");
        let mut expected_due = T0;
        for attempt in 1..=2u32 {
            let step = h.outcome("o-1", &effect, transient());
            let [Event::PaymentRetrying(r)] = step.out.as_slice() else {
                panic!("expected PaymentRetrying, got {:?}", step.out);
            };
            assert_eq!(r.attempt, attempt as i32);
            assert_eq!(r.error, "503 Service Unavailable");
            expected_due = h.now + h.stage.retry_delay_ms(&key, attempt + 1);
            assert_eq!(r.next_attempt_at, expected_due);
            assert!(
                step.effects.is_empty(),
                "nothing is called until the timer fires"
            );
            let (timer, fired) = h.fire_next().expect("a retry timer");
            assert_eq!(timer.due_at, expected_due);
            let [
                next @ Effect::Authorize {
                    attempt: a,
                    idempotency_key,
                    ..
                },
            ] = fired.effects.as_slice()
            else {
                panic!("expected one authorization, got {:?}", fired.effects);
            };
            assert_eq!(*a, attempt + 1);
            assert_eq!(
                idempotency_key, "orderflow/authorize/s-1/o-1",
                "the key is the same on every attempt"
            );
            effect = next.clone();
        }
        assert_eq!(h.now, expected_due);
        let step = h.outcome("o-1", &effect, ok("auth-1"));
        let [Event::PaymentAuthorized(a)] = step.out.as_slice() else {
            panic!("expected PaymentAuthorized, got {:?}", step.out);
        };
        assert_eq!(a.attempt, 3);
        Ok(())
    }

    #[test]
    fn exhausted_attempts_fail_as_gateway_unavailable() -> TestResult {
        let mut h = harness();
        let mut effect = h.reserve("o-1")?.effects.remove(0);
        for _ in 1..settings().max_attempts {
            h.outcome("o-1", &effect, transient());
            effect = h.fire_next().expect("a retry").1.effects.remove(0);
        }
        // The last attempt fails too: before giving up, the key is voided, since an
        // attempt whose answer was lost may have charged.
        let mut step = h.outcome("o-1", &effect, transient());
        assert!(step.out.is_empty(), "{:?}", step.out);
        let void = step.effects.remove(0);
        assert_eq!(
            void,
            Effect::Void {
                idempotency_key: authorization_key("s-1", "o-1"),
                store_id: "s-1".into(),
                order_id: "o-1".into(),
                attempt: 1,
            }
        );
        assert!(matches!(
            h.status("o-1"),
            Some(Status::Voiding { attempt: 1, .. })
        ));
        // The gateway is still down: the void is retried, the order stays undecided.
        let step = h.outcome("o-1", &void, transient());
        assert!(step.out.is_empty() && step.effects.is_empty());
        let (_, mut retry) = h.fire_next().expect("a void retry");
        let void = retry.effects.remove(0);
        assert!(matches!(void, Effect::Void { attempt: 2, .. }));
        // Voided: now the order fails.
        let step = h.outcome("o-1", &void, ok("voided"));
        let [Event::PaymentFailed(f)] = step.out.as_slice() else {
            panic!("expected PaymentFailed, got {:?}", step.out);
        };
        assert_eq!(f.reason, PaymentFailureReason::GatewayUnavailable);
        assert_eq!(f.attempts, 4);
        assert!(
            f.message
                .starts_with("gateway unavailable after 4 attempts")
                && f.message.ends_with("(void: voided)"),
            "{}",
            f.message
        );
        assert_eq!(h.status("o-1"), Some(Status::Failed));
        Ok(())
    }

    #[test]
    fn backoff_grows_by_the_factor_is_capped_and_jitter_is_deterministic() {
        let stage = PaymentStage::new(settings());
        for next in 2..=10u32 {
            let ceiling = (1_000i64 << (next - 2)).min(8_000);
            let d = stage.retry_delay_ms("order/s/o", next);
            assert!(
                d >= ceiling / 2 && d <= ceiling,
                "attempt {next}: {d} not in [{}, {ceiling}]",
                ceiling / 2
            );
            assert_eq!(
                d,
                stage.retry_delay_ms("order/s/o", next),
                "same order and attempt, same delay"
            );
        }
        let spread: std::collections::BTreeSet<i64> = (0..50)
            .map(|i| stage.retry_delay_ms(&format!("order/s/o-{i}"), 4))
            .collect();
        assert!(spread.len() > 10, "jitter spreads orders apart: {spread:?}");
    }

    #[test]
    fn a_replayed_reservation_does_not_authorize_again() -> TestResult {
        let mut h = harness();
        let effect = h.reserve("o-1")?.effects.remove(0);
        h.outcome("o-1", &effect, ok("auth-1"));
        let again = h.reserve("o-1")?;
        assert!(again.effects.is_empty() && again.out.is_empty());
        Ok(())
    }

    fn accepted(order: &str, cause: &str) -> Event {
        Event::CancellationAccepted(CancellationAccepted {
            envelope: envelope(order, cause),
            reason: Some("changed my mind".into()),
        })
    }

    /// Where an order's payment can be when its cancellation is accepted.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Position {
        NoRecord,
        AttemptInFlight,
        Retrying,
        Authorized,
        VoidingAfterExhaustion,
        Declined,
        CancelledAlready,
        RefundedAfterDeliveryFailed,
    }

    /// Brings order o-1 of a fresh driver to `position`; returns the authorization
    /// request still in flight there, if any.
    fn reach(h: &mut Harness, position: Position) -> Result<Option<Effect>, StageError> {
        use Position as P;
        if position == P::NoRecord {
            return Ok(None);
        }
        if position == P::CancelledAlready {
            h.input(topics::FULFILLMENT_UPDATED, &accepted("o-1", "accepted-0"))?;
            return Ok(None);
        }
        let mut effect = h.reserve("o-1")?.effects.remove(0);
        match position {
            P::AttemptInFlight => return Ok(Some(effect)),
            P::Retrying => {
                h.outcome("o-1", &effect, transient());
            }
            P::Authorized => {
                h.outcome("o-1", &effect, ok("auth-1"));
            }
            P::VoidingAfterExhaustion => {
                for _ in 1..settings().max_attempts {
                    h.outcome("o-1", &effect, transient());
                    effect = h.fire_next().expect("a retry").1.effects.remove(0);
                }
                h.outcome("o-1", &effect, transient());
            }
            P::Declined => {
                h.outcome(
                    "o-1",
                    &effect,
                    EffectOutcome::Rejected {
                        reason: "insufficient funds".into(),
                    },
                );
            }
            P::RefundedAfterDeliveryFailed => {
                h.outcome("o-1", &effect, ok("auth-1"));
                let refund = h
                    .input(topics::DELIVERY_UPDATED, &delivery_failed("o-1"))?
                    .effects
                    .remove(0);
                h.outcome("o-1", &refund, ok("refund-1"));
            }
            P::NoRecord | P::CancelledAlready => unreachable!(),
        }
        Ok(None)
    }

    /// A cancellation in every position the order's payment can be in: the call it makes
    /// (if any), and what the order ends as once that call succeeds — never charged, or
    /// refunded once.
    #[test]
    fn a_cancellation_in_every_position() -> TestResult {
        use Position as P;
        let void = Effect::Void {
            idempotency_key: authorization_key("s-1", "o-1"),
            store_id: "s-1".into(),
            order_id: "o-1".into(),
            attempt: 1,
        };
        let refund = Effect::Refund {
            idempotency_key: refund_key("s-1", "o-1"),
            store_id: "s-1".into(),
            order_id: "o-1".into(),
            authorization_id: "auth-1".into(),
            amount_cents: 4_998,
            currency: "USD".into(),
            attempt: 1,
        };
        // (position, requested on the acceptance, its outcome's output, status at the end)
        let cases: Vec<(P, Option<&Effect>, &str, Status)> = vec![
            (P::NoRecord, None, "", Status::Cancelled),
            (
                P::AttemptInFlight,
                Some(&void),
                "failed cancelled",
                Status::Failed,
            ),
            (P::Retrying, Some(&void), "failed cancelled", Status::Failed),
            (
                P::Authorized,
                Some(&refund),
                "refunded cancelled",
                Status::Refunded {
                    refund_id: "r-9".into(),
                },
            ),
            (
                P::VoidingAfterExhaustion,
                None,
                "",
                Status::Voiding {
                    attempt: 1,
                    error: "503 Service Unavailable".into(),
                    cancelled: false,
                },
            ),
            (P::Declined, None, "", Status::Failed),
            (P::CancelledAlready, None, "", Status::Cancelled),
            (
                P::RefundedAfterDeliveryFailed,
                None,
                "",
                Status::Refunded {
                    refund_id: "refund-1".into(),
                },
            ),
        ];
        let brief = |out: &[Event]| -> String {
            match out {
                [] => String::new(),
                [Event::PaymentFailed(f)] => format!("failed {:?}", f.reason).to_lowercase(),
                [Event::PaymentRefunded(r)] => format!("refunded {}", r.reason),
                other => format!("{other:?}"),
            }
        };
        for (position, call, reaction, end) in cases {
            let mut h = harness();
            let in_flight = reach(&mut h, position)?;
            h.commit();
            let step = h.input(topics::FULFILLMENT_UPDATED, &accepted("o-1", "accepted-1"))?;
            assert!(step.out.is_empty(), "{position:?}: {:?}", step.out);
            assert_eq!(step.effects.first(), call, "{position:?}: call");
            assert!(step.effects.len() <= 1, "{position:?}: {:?}", step.effects);
            // A retry timer no longer authorizes: the only timer left is a retirement.
            if call == Some(&void) {
                assert!(
                    h.timers.iter().next().is_none(),
                    "{position:?}: the retry timer is stopped"
                );
            }
            // An attempt that was in flight answers now: too late, it changes nothing
            // (the void cancels whatever it charged).
            if let Some(attempt) = in_flight {
                let late = h.outcome("o-1", &attempt, ok("auth-late"));
                assert!(
                    late.out.is_empty() && late.effects.is_empty(),
                    "{position:?}"
                );
            }
            if let Some(call) = call {
                let reference = if call == &refund { "r-9" } else { "v-9" };
                let reacted = h.outcome("o-1", call, ok(reference));
                assert_eq!(brief(&reacted.out), reaction, "{position:?}: reaction");
                assert!(reacted.effects.is_empty(), "{position:?}");
            }
            // A repeated acceptance, and a replayed reservation, change nothing more.
            h.commit();
            let again = h.input(topics::FULFILLMENT_UPDATED, &accepted("o-1", "accepted-2"))?;
            assert!(
                again.out.is_empty() && again.effects.is_empty(),
                "{position:?}"
            );
            // (Where the order was never reserved, the reservation is not a replay: see
            // `a_cancellation_before_the_reservation_never_charges`.)
            if !matches!(position, P::NoRecord | P::CancelledAlready) {
                let replay = h.reserve("o-1")?;
                assert!(
                    replay.out.is_empty() && replay.effects.is_empty(),
                    "{position:?}"
                );
            }
            assert_eq!(h.status("o-1"), Some(end), "{position:?}: status");
        }
        Ok(())
    }

    /// The acceptance before the reservation: the reservation, when it comes, fails the
    /// order as cancelled without asking the gateway anything, once.
    #[test]
    fn a_cancellation_before_the_reservation_never_charges() -> TestResult {
        let mut h = harness();
        let step = h.input(topics::FULFILLMENT_UPDATED, &accepted("o-1", "accepted-1"))?;
        assert!(step.out.is_empty() && step.effects.is_empty());
        let step = h.reserve("o-1")?;
        assert!(step.effects.is_empty(), "{:?}", step.effects);
        let [Event::PaymentFailed(f)] = step.out.as_slice() else {
            panic!("expected PaymentFailed, got {:?}", step.out);
        };
        assert_eq!(f.reason, PaymentFailureReason::Cancelled);
        assert_eq!(
            (f.amount_cents, f.currency.as_str(), f.attempts),
            (4_998, "USD", 0)
        );
        assert_eq!(f.envelope.order_id.as_deref(), Some("o-1"));
        assert_eq!(h.status("o-1"), Some(Status::Failed));
        // Replayed reservation: nothing more.
        let replay = h.reserve("o-1")?;
        assert!(replay.out.is_empty() && replay.effects.is_empty());
        // The record retires like any closed order.
        while h.fire_next().is_some() {}
        assert_eq!(h.status("o-1"), None);
        Ok(())
    }

    /// A void that the gateway cannot answer yet is retried; the order fails as
    /// cancelled only once it answers.
    #[test]
    fn a_cancellation_void_is_retried_until_the_gateway_answers() -> TestResult {
        let mut h = harness();
        h.reserve("o-1")?;
        let void = h
            .input(topics::FULFILLMENT_UPDATED, &accepted("o-1", "accepted-1"))?
            .effects
            .remove(0);
        let step = h.outcome("o-1", &void, transient());
        assert!(step.out.is_empty() && step.effects.is_empty());
        assert!(matches!(
            h.status("o-1"),
            Some(Status::Voiding {
                attempt: 2,
                cancelled: true,
                ..
            })
        ));
        let (_, mut fired) = h.fire_next().expect("a void retry");
        let again = fired.effects.remove(0);
        assert!(matches!(again, Effect::Void { attempt: 2, .. }));
        let step = h.outcome("o-1", &again, ok("v-1"));
        let [Event::PaymentFailed(f)] = step.out.as_slice() else {
            panic!("expected PaymentFailed, got {:?}", step.out);
        };
        assert_eq!(f.reason, PaymentFailureReason::Cancelled);
        Ok(())
    }

    #[test]
    fn stale_outcomes_and_timers_change_nothing() -> TestResult {
        let mut h = harness();
        let first = h.reserve("o-1")?.effects.remove(0);
        h.outcome("o-1", &first, transient());
        // The outcome of attempt 1 arrives again (a replayed batch): attempt 2 is pending.
        let stale = h.outcome("o-1", &first, ok("auth-late"));
        assert!(stale.out.is_empty() && stale.effects.is_empty());
        assert_eq!(h.status("o-1"), Some(Status::Authorizing));
        Ok(())
    }

    #[test]
    fn a_failed_delivery_refunds_an_authorized_order_once() -> TestResult {
        let mut h = harness();
        let effect = h.reserve("o-1")?.effects.remove(0);
        h.outcome("o-1", &effect, ok("auth-1"));
        let step = h.input(topics::DELIVERY_UPDATED, &delivery_failed("o-1"))?;
        let [
            refund @ Effect::Refund {
                idempotency_key,
                authorization_id,
                amount_cents,
                ..
            },
        ] = step.effects.as_slice()
        else {
            panic!("expected one refund, got {:?}", step.effects);
        };
        assert_eq!(
            (
                idempotency_key.as_str(),
                authorization_id.as_str(),
                *amount_cents
            ),
            ("orderflow/refund/s-1/o-1", "auth-1", 4_998)
        );
        let refund = refund.clone();
        // The failure again: no second refund.
        assert!(
            h.input(topics::DELIVERY_UPDATED, &delivery_failed("o-1"))?
                .effects
                .is_empty()
        );
        // A transient failure of the refund retries it; success emits PaymentRefunded.
        let retry = h.outcome("o-1", &refund, transient());
        assert!(retry.out.is_empty());
        let (_, fired) = h.fire_next().expect("a refund retry");
        let again = fired.effects.into_iter().next().expect("the refund again");
        assert_eq!(again.idempotency_key(), "orderflow/refund/s-1/o-1");
        let done = h.outcome("o-1", &again, ok("ref-7"));
        let [Event::PaymentRefunded(r)] = done.out.as_slice() else {
            panic!("expected PaymentRefunded, got {:?}", done.out);
        };
        assert_eq!(
            (r.refund_id.as_str(), r.amount_cents, r.reason.as_str()),
            ("ref-7", 4_998, "delivery_failed")
        );
        assert_eq!(
            h.status("o-1"),
            Some(Status::Refunded {
                refund_id: "ref-7".into()
            })
        );
        assert!(
            h.input(topics::DELIVERY_UPDATED, &delivery_failed("o-1"))?
                .effects
                .is_empty()
        );
        Ok(())
    }

    #[test]
    fn a_failed_delivery_of_an_unpaid_order_refunds_nothing() -> TestResult {
        let mut h = harness();
        assert!(
            h.input(topics::DELIVERY_UPDATED, &delivery_failed("o-9"))?
                .effects
                .is_empty()
        );
        let effect = h.reserve("o-1")?.effects.remove(0);
        h.outcome(
            "o-1",
            &effect,
            EffectOutcome::Rejected {
                reason: "declined".into(),
            },
        );
        assert!(
            h.input(topics::DELIVERY_UPDATED, &delivery_failed("o-1"))?
                .effects
                .is_empty()
        );
        Ok(())
    }

    #[test]
    fn other_inventory_events_are_ignored_and_foreign_ones_unexpected() -> TestResult {
        let mut h = harness();
        let rejected = Event::StockRejected(StockRejected {
            envelope: envelope("o-2", "rej"),
            short: vec![],
            reason: "out_of_stock".into(),
        });
        let step = h.input(topics::INVENTORY_UPDATED, &rejected)?;
        assert!(step.out.is_empty() && step.effects.is_empty());
        let err = h.input(topics::ORDER_CREATED, &rejected).unwrap_err();
        assert_eq!(err.class(), "unexpected");
        assert!(h.status("o-2").is_none());
        Ok(())
    }

    #[test]
    fn every_attempts_reaction_has_its_own_id() -> TestResult {
        // Retry notices of successive attempts and the final failure all react to the same
        // idempotency key with the same outcome class; consumers that deduplicate by event
        // ID must still see each of them.
        let mut h = harness();
        let mut effect = h.reserve("o-1")?.effects.remove(0);
        let mut ids = Vec::new();
        for _ in 1..settings().max_attempts {
            ids.extend(
                h.outcome("o-1", &effect, transient())
                    .out
                    .iter()
                    .map(|e| e.envelope().event_id.clone()),
            );
            effect = h.fire_next().expect("a retry").1.effects.remove(0);
        }
        let mut step = h.outcome("o-1", &effect, transient());
        assert!(step.out.is_empty());
        let void = step.effects.remove(0);
        let last = h.outcome("o-1", &void, ok("not_charged")).out;
        assert!(matches!(last.as_slice(), [Event::PaymentFailed(_)]));
        ids.push(last[0].envelope().event_id.clone());
        let distinct: std::collections::BTreeSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len(), "{ids:?}");
        assert_eq!(ids.len(), settings().max_attempts as usize);
        Ok(())
    }

    #[test]
    fn outputs_of_different_outcomes_have_different_ids() -> TestResult {
        // A replay whose call fails transiently where the first call succeeded (or the
        // reverse) must not reuse the first outputs' IDs for different events.
        let mut a = harness();
        let mut b = harness();
        let effect = a.reserve("o-1")?.effects.remove(0);
        b.reserve("o-1")?;
        let authorized = a.outcome("o-1", &effect, ok("auth-1")).out;
        let retrying = b.outcome("o-1", &effect, transient()).out;
        assert_ne!(
            authorized[0].envelope().event_id,
            retrying[0].envelope().event_id
        );
        // The same outcome twice gives the same ID.
        let mut c = harness();
        c.reserve("o-1")?;
        assert_eq!(
            c.outcome("o-1", &effect, ok("auth-1")).out[0]
                .envelope()
                .event_id,
            authorized[0].envelope().event_id
        );
        Ok(())
    }
}
