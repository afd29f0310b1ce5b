//! An order's status, derived from its events: the one place that says which event puts
//! an order in which status, and which sequences of events are a legal saga.
//!
//! | event                                   | status                   |
//! |-----------------------------------------|--------------------------|
//! | `OrderCreated`                          | `created`                |
//! | `OrderScreened` approved / rejected     | `screened` / `rejected` (fraud) |
//! | `StockReserved` / `StockRejected`       | `reserved` / `rejected` (out of stock) |
//! | `PaymentRetrying`                       | `reserved` (still)       |
//! | `PaymentAuthorized`                     | `paid`                   |
//! | `PaymentFailed`, `StockReleased`        | `cancelled`              |
//! | `CancellationAccepted` (customer cancellation), `PaymentRefunded` with reason `cancelled` | `cancelled` |
//! | `Picking`, `Packed`, `ReadyToShip`      | `fulfilling`             |
//! | `Shipped`, `InTransit`, `OutForDelivery`| `shipped`                |
//! | `DeliveryFailed`                        | `shipped` (until the refund) |
//! | `Delivered`                             | `delivered`              |
//! | `PaymentRefunded`                       | `refunded`               |
//! | `OrderCancelled` (a request), `CancellationRefused` | unchanged (timeline only) |
//! | anything else (`CarrierScan`, `DeliveryAnomaly`, stock commands and levels, `LowStock`, `ReplenishmentRequested`) | unchanged |
//!
//! A customer cancellation is decided by fulfillment alone: `CancellationAccepted` ends
//! the order as `cancelled` from any status before `ReadyToShip`; its refund (when the
//! order was paid) keeps it `cancelled` rather than `refunded`, whichever a read model
//! sees first.
//!
//! [`next`] is forgiving, because read models see an order's events from several topics
//! that are not ordered relative to each other: a status never moves backwards (a late
//! `PaymentAuthorized` after `Picking` leaves `fulfilling`), a terminal status
//! (`delivered`, `rejected`, `cancelled`, `refunded`) never changes, and a terminal event
//! ends the order from any non-terminal status. [`check_history`] is strict: it verifies
//! that a sequence, in causal order, is one the pipeline can legally produce.
//!
//! Invariant: folding the same events with [`next`] is idempotent — a duplicated event
//! (at-least-once delivery, a replay) never changes the result.

use std::collections::{BTreeSet, HashSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::events::{Event, EventType, ScreeningDecision};

/// Why an order was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectionReason {
    /// Fraud screening rejected it.
    Fraud,
    /// Some item could not be reserved.
    OutOfStock,
}

impl RejectionReason {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectionReason::Fraud => "fraud",
            RejectionReason::OutOfStock => "out_of_stock",
        }
    }
}

impl fmt::Display for RejectionReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where an order is. Serialized externally tagged (`"paid"`, `{"rejected":"fraud"}`), so
/// the reason survives a round trip; displayed as the bare snake_case status
/// (`rejected`), the value a status column or a dashboard groups by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    Created,
    Screened,
    Reserved,
    Paid,
    Fulfilling,
    Shipped,
    Delivered,
    Rejected(RejectionReason),
    /// The payment failed, or the customer cancelled before the order was ready to
    /// ship; stock and charge are given back.
    Cancelled,
    /// The delivery failed; the payment is refunded.
    Refunded,
}

impl OrderStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            OrderStatus::Created => "created",
            OrderStatus::Screened => "screened",
            OrderStatus::Reserved => "reserved",
            OrderStatus::Paid => "paid",
            OrderStatus::Fulfilling => "fulfilling",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Delivered => "delivered",
            OrderStatus::Rejected(_) => "rejected",
            OrderStatus::Cancelled => "cancelled",
            OrderStatus::Refunded => "refunded",
        }
    }

    /// The rejection reason of a `rejected` status, which [`as_str`](Self::as_str) leaves
    /// out; a read model stores it beside the status.
    pub fn rejection_reason(&self) -> Option<RejectionReason> {
        match self {
            OrderStatus::Rejected(r) => Some(*r),
            _ => None,
        }
    }

    /// The status stored as [`as_str`](Self::as_str) and
    /// [`rejection_reason`](Self::rejection_reason); `None` for text no status displays
    /// as, or `rejected` without a known reason.
    pub fn from_parts(status: &str, reason: Option<&str>) -> Option<OrderStatus> {
        Some(match status {
            "created" => OrderStatus::Created,
            "screened" => OrderStatus::Screened,
            "reserved" => OrderStatus::Reserved,
            "paid" => OrderStatus::Paid,
            "fulfilling" => OrderStatus::Fulfilling,
            "shipped" => OrderStatus::Shipped,
            "delivered" => OrderStatus::Delivered,
            "cancelled" => OrderStatus::Cancelled,
            "refunded" => OrderStatus::Refunded,
            "rejected" => OrderStatus::Rejected(match reason? {
                "fraud" => RejectionReason::Fraud,
                "out_of_stock" => RejectionReason::OutOfStock,
                _ => return None,
            }),
            _ => return None,
        })
    }

    /// Whether the order is over: no later event changes its status.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            OrderStatus::Delivered
                | OrderStatus::Rejected(_)
                | OrderStatus::Cancelled
                | OrderStatus::Refunded
        )
    }

    /// Progress along the saga, for "never backwards"; only compared between
    /// non-terminal statuses.
    fn rank(&self) -> u8 {
        match self {
            OrderStatus::Created => 0,
            OrderStatus::Screened => 1,
            OrderStatus::Reserved => 2,
            OrderStatus::Paid => 3,
            OrderStatus::Fulfilling => 4,
            OrderStatus::Shipped => 5,
            OrderStatus::Delivered
            | OrderStatus::Rejected(_)
            | OrderStatus::Cancelled
            | OrderStatus::Refunded => 6,
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The status an event puts its order in, per the table of the module docs; `None` for
/// events that say nothing about the order's status.
pub fn implied(event: &Event) -> Option<OrderStatus> {
    use OrderStatus as S;
    Some(match event {
        Event::OrderCreated(_) => S::Created,
        Event::OrderScreened(s) => match s.decision {
            ScreeningDecision::Approved => S::Screened,
            ScreeningDecision::Rejected => S::Rejected(RejectionReason::Fraud),
        },
        Event::StockReserved(_) | Event::PaymentRetrying(_) => S::Reserved,
        Event::StockRejected(_) => S::Rejected(RejectionReason::OutOfStock),
        Event::PaymentAuthorized(_) => S::Paid,
        // A release only ever compensates a failed payment, so it means cancelled even
        // when a read model sees it before the failure.
        Event::PaymentFailed(_) | Event::StockReleased(_) => S::Cancelled,
        Event::Picking(_) | Event::Packed(_) | Event::ReadyToShip(_) => S::Fulfilling,
        // A failed delivery stays shipped until its refund ends the order.
        Event::Shipped(_)
        | Event::InTransit(_)
        | Event::OutForDelivery(_)
        | Event::DeliveryFailed(_) => S::Shipped,
        Event::Delivered(_) => S::Delivered,
        // A cancelled order's refund is part of its cancellation.
        Event::PaymentRefunded(r) if r.reason == CANCELLED_REFUND_REASON => S::Cancelled,
        Event::PaymentRefunded(_) => S::Refunded,
        Event::CancellationAccepted(_) => S::Cancelled,
        // A request decides nothing by itself; a refusal leaves the order where it is.
        Event::OrderCancelled(_)
        | Event::CancellationRefused(_)
        | Event::CarrierScan(_)
        | Event::DeliveryAnomaly(_)
        | Event::StockRestocked(_)
        | Event::StockAdjusted(_)
        | Event::ThresholdSet(_)
        | Event::StockLevelChanged(_)
        | Event::LowStock(_)
        | Event::StockRecovered(_)
        | Event::ReplenishmentRequested(_) => return None,
    })
}

/// `PaymentRefunded.reason` of the refund of a customer cancellation.
pub const CANCELLED_REFUND_REASON: &str = "cancelled";

/// The status after `event`, given the status before it.
pub fn next(current: Option<OrderStatus>, event: &Event) -> Option<OrderStatus> {
    match implied(event) {
        Some(target) => Some(advance(current, target)),
        None => current,
    }
}

/// The status after an event that implies `target`, given the status before it: the
/// rule of [`next`] for a caller that keeps only the implied status of an event (a read
/// model that stores the status and folds one event into it at a time).
pub fn advance(current: Option<OrderStatus>, target: OrderStatus) -> OrderStatus {
    match current {
        None => target,
        Some(c) if c.is_terminal() => c,
        Some(_) if target.is_terminal() => target,
        Some(c) if target.rank() > c.rank() => target,
        Some(c) => c,
    }
}

/// The status after `events`, folded in the given order; `None` if none of them says
/// anything about status.
pub fn of(events: &[Event]) -> Option<OrderStatus> {
    events.iter().fold(None, next)
}

/// A step of the saga, as [`check_history`] tracks it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fact {
    Created,
    Approved,
    FraudRejected,
    Reserved,
    OutOfStock,
    Retrying,
    Authorized,
    PaymentFailed,
    Released,
    Picking,
    Packed,
    Ready,
    Shipped,
    InTransit,
    OutForDelivery,
    Delivered,
    DeliveryFailed,
    Refunded,
    CancelRequested,
    CancelAccepted,
    CancelRefused,
}

impl Fact {
    fn of(event: &Event) -> Option<Fact> {
        Some(match event {
            Event::OrderCreated(_) => Fact::Created,
            Event::OrderScreened(s) => match s.decision {
                ScreeningDecision::Approved => Fact::Approved,
                ScreeningDecision::Rejected => Fact::FraudRejected,
            },
            Event::StockReserved(_) => Fact::Reserved,
            Event::StockRejected(_) => Fact::OutOfStock,
            Event::PaymentRetrying(_) => Fact::Retrying,
            Event::PaymentAuthorized(_) => Fact::Authorized,
            Event::PaymentFailed(_) => Fact::PaymentFailed,
            Event::StockReleased(_) => Fact::Released,
            Event::Picking(_) => Fact::Picking,
            Event::Packed(_) => Fact::Packed,
            Event::ReadyToShip(_) => Fact::Ready,
            Event::Shipped(_) => Fact::Shipped,
            Event::InTransit(_) => Fact::InTransit,
            Event::OutForDelivery(_) => Fact::OutForDelivery,
            Event::Delivered(_) => Fact::Delivered,
            Event::DeliveryFailed(_) => Fact::DeliveryFailed,
            Event::PaymentRefunded(_) => Fact::Refunded,
            Event::OrderCancelled(_) => Fact::CancelRequested,
            Event::CancellationAccepted(_) => Fact::CancelAccepted,
            Event::CancellationRefused(_) => Fact::CancelRefused,
            // Inputs and side reports, not steps of the saga.
            Event::CarrierScan(_)
            | Event::DeliveryAnomaly(_)
            | Event::StockRestocked(_)
            | Event::StockAdjusted(_)
            | Event::ThresholdSet(_)
            | Event::StockLevelChanged(_)
            | Event::LowStock(_)
            | Event::StockRecovered(_)
            | Event::ReplenishmentRequested(_) => return None,
        })
    }

    /// (must have happened before, must not have happened before, may happen again).
    fn rule(self) -> (&'static [Fact], &'static [Fact], bool) {
        use Fact::*;
        match self {
            Created => (&[], &[], false),
            Approved => (&[Created], &[FraudRejected], false),
            FraudRejected => (&[Created], &[Approved], false),
            Reserved => (&[Approved], &[OutOfStock], false),
            OutOfStock => (&[Approved], &[Reserved], false),
            // Retries are scheduled until the payment has an outcome.
            Retrying => (&[Reserved], &[Authorized, PaymentFailed], true),
            Authorized => (&[Reserved], &[PaymentFailed], false),
            PaymentFailed => (&[Reserved], &[Authorized], false),
            // Released after a failed payment or a cancellation (see `requires_any`).
            Released => (&[Reserved], &[], false),
            // Fulfillment never starts or goes on once it accepted a cancellation.
            Picking => (&[Authorized], &[CancelAccepted], false),
            Packed => (&[Picking], &[CancelAccepted], false),
            Ready => (&[Packed], &[CancelAccepted], false),
            Shipped => (&[Ready], &[], false),
            // A parcel passes several hubs, but never after it is out for delivery.
            InTransit => (
                &[Shipped],
                &[OutForDelivery, Delivered, DeliveryFailed],
                true,
            ),
            OutForDelivery => (&[Shipped], &[Delivered, DeliveryFailed], false),
            Delivered => (&[Shipped], &[DeliveryFailed], false),
            DeliveryFailed => (&[Shipped], &[Delivered], false),
            // After a failed delivery or a cancellation (see `requires_any`).
            Refunded => (&[Authorized], &[], false),
            // A request may arrive at any time, even before the order, and again.
            CancelRequested => (&[], &[], true),
            CancelAccepted => (&[CancelRequested], &[Ready, CancelRefused], false),
            CancelRefused => (&[CancelRequested, Ready], &[CancelAccepted], false),
        }
    }

    /// Steps of which at least one must have happened before (on top of [`rule`]'s).
    fn requires_any(self) -> &'static [Fact] {
        use Fact::*;
        match self {
            Released => &[PaymentFailed, CancelAccepted],
            Refunded => &[DeliveryFailed, CancelAccepted],
            _ => &[],
        }
    }
}

/// Verifies that `events`, in causal order, are a legal saga of one order, and returns
/// its status.
///
/// - Every saga event concerns the same store and order; events that are not saga steps
///   (`CarrierScan`, `DeliveryAnomaly`, stock commands and levels, `LowStock`) are
///   skipped.
/// - An event ID seen before is a duplicate delivery and skipped, as every consumer
///   skips it; a second event of a step that happens once, under another ID, is a
///   double effect and an error.
/// - Each step requires its predecessors (the order created first; stock reserved only
///   after an approved screening; `PaymentAuthorized` only after `StockReserved`;
///   `StockReleased` only after `PaymentFailed` or `CancellationAccepted`; `Picking`
///   only after `PaymentAuthorized`; `Shipped` only after `ReadyToShip`; `Delivered`
///   only after `Shipped`; `PaymentRefunded` only after `DeliveryFailed` or
///   `CancellationAccepted`; `CancellationAccepted` / `CancellationRefused` only after
///   `OrderCancelled`, the refusal only after `ReadyToShip`, …) and excludes its
///   alternatives (not both approved and rejected, reserved and out of stock, authorized
///   and failed, delivered and failed, a cancellation accepted and refused, and no
///   fulfillment step after an accepted cancellation).
///
/// The error names the offending event by position, type and ID.
pub fn check_history(events: &[Event]) -> Result<OrderStatus, String> {
    let mut ids: HashSet<&str> = HashSet::new();
    let mut seen: BTreeSet<Fact> = BTreeSet::new();
    let mut order: Option<(&str, &str)> = None;
    let mut status = None;
    for (i, event) in events.iter().enumerate() {
        let Some(fact) = Fact::of(event) else {
            continue;
        };
        let env = event.envelope();
        let what = || format!("event #{i} ({} {})", event.event_type(), env.event_id);
        let Some(order_id) = env.order_id.as_deref() else {
            return Err(format!("{} has no order_id", what()));
        };
        match order {
            None => order = Some((env.store_id.as_str(), order_id)),
            Some((store, id)) if (store, id) != (env.store_id.as_str(), order_id) => {
                return Err(format!(
                    "{} is of order {}/{order_id}, not {store}/{id}",
                    what(),
                    env.store_id
                ));
            }
            Some(_) => {}
        }
        if !ids.insert(env.event_id.as_str()) {
            continue;
        }
        let (requires, excludes, repeatable) = fact.rule();
        if let Some(missing) = requires.iter().find(|f| !seen.contains(f)) {
            return Err(format!("{} requires a prior {missing:?}", what()));
        }
        let any = fact.requires_any();
        if !any.is_empty() && !any.iter().any(|f| seen.contains(f)) {
            return Err(format!("{} requires a prior one of {any:?}", what()));
        }
        if let Some(conflict) = excludes.iter().find(|f| seen.contains(f)) {
            return Err(format!("{} cannot follow {conflict:?}", what()));
        }
        if !repeatable && seen.contains(&fact) {
            return Err(format!(
                "{} repeats {fact:?} under another event ID: a double effect",
                what()
            ));
        }
        seen.insert(fact);
        status = next(status, event);
    }
    status.ok_or_else(|| "no saga events in the history".to_owned())
}

/// Like [`check_history`], and also that the order is over with every compensation done:
/// a terminal status; a cancelled order's stock released if it was ever reserved, and its
/// charge refunded if it was ever authorized. An end-to-end test asserts this of every
/// order once the pipeline is idle.
pub fn check_complete(events: &[Event]) -> Result<OrderStatus, String> {
    let status = check_history(events)?;
    if !status.is_terminal() {
        return Err(format!("the order is still {status}, not finished"));
    }
    let has = |t: EventType| events.iter().any(|e| e.event_type() == t);
    if status == OrderStatus::Cancelled {
        // A failed payment always follows a reservation; a cancellation may come first.
        let reserved = has(EventType::StockReserved) || has(EventType::PaymentFailed);
        if reserved && !has(EventType::StockReleased) {
            return Err("the order is cancelled but its stock was never released".to_owned());
        }
        if has(EventType::PaymentAuthorized) && !has(EventType::PaymentRefunded) {
            return Err("the order is cancelled but its charge was never refunded".to_owned());
        }
    }
    Ok(status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;

    type S = OrderStatus;
    const FRAUD: S = S::Rejected(RejectionReason::Fraud);
    const OUT_OF_STOCK: S = S::Rejected(RejectionReason::OutOfStock);

    fn env(id: &str) -> Envelope {
        Envelope {
            event_id: id.into(),
            order_id: Some("o-1".into()),
            store_id: "s-1".into(),
            correlation_id: "corr".into(),
            causation_id: None,
            occurred_at: 0,
            schema_version: 1,
        }
    }

    fn line() -> Vec<OrderLine> {
        vec![OrderLine {
            sku: "sku-1".into(),
            quantity: 1,
            unit_price_cents: 100,
        }]
    }

    fn screened(decision: ScreeningDecision) -> Event {
        Event::OrderScreened(OrderScreened {
            envelope: env("screened"),
            decision,
            reasons: vec![],
            customer_id: "c".into(),
            email: "c@x".into(),
            currency: "EUR".into(),
            total_cents: 100,
            items: line(),
        })
    }

    /// One event of each type (screenings approved), with event ID = the type's name, so
    /// that a test can ask for an event by type. The match is exhaustive: a new event
    /// type does not compile until it is given a status here and in [`implied`].
    fn sample(t: EventType) -> Event {
        let e = env(t.name());
        match t {
            EventType::OrderCreated => OrderCreated {
                envelope: e,
                customer_id: "c".into(),
                email: "c@x".into(),
                currency: "EUR".into(),
                shipping_country: "DE".into(),
                items: line(),
                placed_at: 0,
            }
            .into(),
            EventType::OrderScreened => {
                let mut s = screened(ScreeningDecision::Approved);
                *s.envelope_mut() = e;
                s
            }
            EventType::StockRestocked => StockRestocked {
                envelope: e,
                sku: "sku-1".into(),
                quantity: 1,
                note: None,
            }
            .into(),
            EventType::StockAdjusted => StockAdjusted {
                envelope: e,
                sku: "sku-1".into(),
                delta: -1,
                reason: "count".into(),
            }
            .into(),
            EventType::ThresholdSet => ThresholdSet {
                envelope: e,
                sku: "sku-1".into(),
                threshold: 1,
            }
            .into(),
            EventType::StockReserved => StockReserved {
                envelope: e,
                customer_id: "c".into(),
                currency: "EUR".into(),
                total_cents: 100,
                items: line(),
            }
            .into(),
            EventType::StockRejected => StockRejected {
                envelope: e,
                short: vec![],
                reason: "short".into(),
            }
            .into(),
            EventType::StockReleased => StockReleased {
                envelope: e,
                items: line(),
                reason: "payment failed".into(),
            }
            .into(),
            EventType::StockLevelChanged => StockLevelChanged {
                envelope: e,
                sku: "sku-1".into(),
                available: 1,
                delta: -1,
                reason: "reserved".into(),
            }
            .into(),
            EventType::LowStock => LowStock {
                envelope: e,
                sku: "sku-1".into(),
                available: 0,
                threshold: 1,
                trigger: LowStockTrigger::Crossing,
            }
            .into(),
            EventType::StockRecovered => StockRecovered {
                envelope: e,
                sku: "sku-1".into(),
                available: 2,
                threshold: 1,
            }
            .into(),
            EventType::PaymentAuthorized => PaymentAuthorized {
                envelope: e,
                amount_cents: 100,
                currency: "EUR".into(),
                attempt: 1,
                authorization_id: "a".into(),
            }
            .into(),
            EventType::PaymentRetrying => PaymentRetrying {
                envelope: e,
                amount_cents: 100,
                currency: "EUR".into(),
                attempt: 1,
                next_attempt_at: 0,
                error: "timeout".into(),
            }
            .into(),
            EventType::PaymentFailed => PaymentFailed {
                envelope: e,
                amount_cents: 100,
                currency: "EUR".into(),
                attempts: 3,
                reason: PaymentFailureReason::Declined,
                message: "declined".into(),
            }
            .into(),
            EventType::PaymentRefunded => PaymentRefunded {
                envelope: e,
                amount_cents: 100,
                currency: "EUR".into(),
                refund_id: "r".into(),
                reason: "delivery failed".into(),
            }
            .into(),
            EventType::Picking => Picking { envelope: e }.into(),
            EventType::Packed => Packed { envelope: e }.into(),
            EventType::ReadyToShip => ReadyToShip { envelope: e }.into(),
            EventType::OrderCancelled => OrderCancelled {
                envelope: e,
                reason: Some("changed my mind".into()),
            }
            .into(),
            EventType::CancellationAccepted => CancellationAccepted {
                envelope: e,
                reason: Some("changed my mind".into()),
            }
            .into(),
            EventType::CancellationRefused => CancellationRefused {
                envelope: e,
                reason: "already ready_to_ship".into(),
            }
            .into(),
            EventType::CarrierScan => CarrierScan {
                envelope: e,
                carrier: "DHL".into(),
                tracking_number: "TN".into(),
                scan: ScanKind::PickedUp,
                location: None,
                detail: None,
                scanned_at: 0,
            }
            .into(),
            EventType::Shipped => Shipped {
                envelope: e,
                carrier: "DHL".into(),
                tracking_number: "TN".into(),
            }
            .into(),
            EventType::InTransit => InTransit {
                envelope: e,
                location: Some("hub".into()),
            }
            .into(),
            EventType::OutForDelivery => OutForDelivery { envelope: e }.into(),
            EventType::Delivered => Delivered { envelope: e }.into(),
            EventType::DeliveryFailed => DeliveryFailed {
                envelope: e,
                reason: "not home".into(),
            }
            .into(),
            EventType::DeliveryAnomaly => DeliveryAnomaly {
                envelope: e,
                state: "delivered".into(),
                scan: "failed".into(),
                message: "m".into(),
            }
            .into(),
            EventType::ReplenishmentRequested => ReplenishmentRequested {
                envelope: e,
                sku: "sku-1".into(),
                quantity: 10,
                available: 0,
                threshold: 1,
            }
            .into(),
        }
    }

    /// Events of the given types, in order; a type may appear twice as `(type, n)` with
    /// distinct IDs via [`again`].
    fn history(types: &[EventType]) -> Vec<Event> {
        types.iter().map(|&t| sample(t)).collect()
    }

    /// The same event type under another event ID (a second, distinct event).
    fn again(t: EventType, n: u32) -> Event {
        let mut e = sample(t);
        e.envelope_mut().event_id = format!("{}-{n}", t.name());
        e
    }

    use EventType as E;

    const HAPPY: &[EventType] = &[
        E::OrderCreated,
        E::OrderScreened,
        E::StockReserved,
        E::PaymentAuthorized,
        E::Picking,
        E::Packed,
        E::ReadyToShip,
        E::Shipped,
        E::InTransit,
        E::OutForDelivery,
        E::Delivered,
    ];

    #[test]
    fn every_event_type_implies_its_status() {
        for &t in EventType::ALL {
            let want = match t {
                E::OrderCreated => Some(S::Created),
                E::OrderScreened => Some(S::Screened),
                E::StockReserved | E::PaymentRetrying => Some(S::Reserved),
                E::StockRejected => Some(OUT_OF_STOCK),
                E::PaymentAuthorized => Some(S::Paid),
                E::PaymentFailed | E::StockReleased | E::CancellationAccepted => Some(S::Cancelled),
                E::Picking | E::Packed | E::ReadyToShip => Some(S::Fulfilling),
                E::Shipped | E::InTransit | E::OutForDelivery | E::DeliveryFailed => {
                    Some(S::Shipped)
                }
                E::Delivered => Some(S::Delivered),
                E::PaymentRefunded => Some(S::Refunded),
                E::OrderCancelled
                | E::CancellationRefused
                | E::CarrierScan
                | E::DeliveryAnomaly
                | E::StockRestocked
                | E::StockAdjusted
                | E::ThresholdSet
                | E::StockLevelChanged
                | E::LowStock
                | E::StockRecovered
                | E::ReplenishmentRequested => None,
            };
            assert_eq!(implied(&sample(t)), want, "{t}");
        }
        assert_eq!(implied(&screened(ScreeningDecision::Rejected)), Some(FRAUD));
    }

    /// `next` from every status, for every event type: unchanged by events without a
    /// status, terminal statuses absorb, terminal events end, otherwise only forwards.
    #[test]
    fn next_from_every_status_for_every_event() {
        let statuses = [
            S::Created,
            S::Screened,
            S::Reserved,
            S::Paid,
            S::Fulfilling,
            S::Shipped,
            S::Delivered,
            FRAUD,
            OUT_OF_STOCK,
            S::Cancelled,
            S::Refunded,
        ];
        let order = [
            S::Created,
            S::Screened,
            S::Reserved,
            S::Paid,
            S::Fulfilling,
            S::Shipped,
        ];
        let pos = |s: S| order.iter().position(|o| *o == s);
        for &t in EventType::ALL {
            let event = sample(t);
            assert_eq!(next(None, &event), implied(&event), "None × {t}");
            for current in statuses {
                let got = next(Some(current), &event);
                let want = match implied(&event) {
                    None => current,
                    Some(_) if current.is_terminal() => current,
                    Some(target) if target.is_terminal() => target,
                    Some(target) if pos(target) > pos(current) => target,
                    Some(_) => current,
                };
                assert_eq!(got, Some(want), "{current} × {t}");
            }
        }
    }

    #[test]
    fn named_cases_from_the_saga() {
        let cases: &[(Option<S>, Event, Option<S>)] = &[
            (
                Some(S::Reserved),
                sample(E::PaymentRetrying),
                Some(S::Reserved),
            ),
            (
                Some(S::Shipped),
                sample(E::DeliveryAnomaly),
                Some(S::Shipped),
            ),
            (
                Some(S::Delivered),
                sample(E::DeliveryAnomaly),
                Some(S::Delivered),
            ),
            (
                Some(S::Cancelled),
                sample(E::StockReleased),
                Some(S::Cancelled),
            ),
            (
                Some(S::Shipped),
                sample(E::DeliveryFailed),
                Some(S::Shipped),
            ),
            (
                Some(S::Shipped),
                sample(E::PaymentRefunded),
                Some(S::Refunded),
            ),
            (
                Some(S::Fulfilling),
                sample(E::PaymentAuthorized),
                Some(S::Fulfilling),
            ),
            (Some(S::Paid), sample(E::Shipped), Some(S::Shipped)),
            (
                Some(S::Created),
                screened(ScreeningDecision::Rejected),
                Some(FRAUD),
            ),
            (
                Some(S::Screened),
                sample(E::StockRejected),
                Some(OUT_OF_STOCK),
            ),
            (
                Some(S::Reserved),
                sample(E::PaymentFailed),
                Some(S::Cancelled),
            ),
            (Some(FRAUD), sample(E::StockReserved), Some(FRAUD)),
            (
                Some(S::Delivered),
                sample(E::PaymentRefunded),
                Some(S::Delivered),
            ),
            (None, sample(E::LowStock), None),
            (None, sample(E::CarrierScan), None),
        ];
        for (current, event, want) in cases {
            assert_eq!(
                next(*current, event),
                *want,
                "{current:?} × {}",
                event.event_type()
            );
        }
    }

    /// Every way an order can end, with its status after each event.
    fn terminal_paths() -> Vec<(&'static str, Vec<Event>, Vec<S>)> {
        let created = || sample(E::OrderCreated);
        vec![
            (
                "delivered",
                history(HAPPY),
                vec![
                    S::Created,
                    S::Screened,
                    S::Reserved,
                    S::Paid,
                    S::Fulfilling,
                    S::Fulfilling,
                    S::Fulfilling,
                    S::Shipped,
                    S::Shipped,
                    S::Shipped,
                    S::Delivered,
                ],
            ),
            (
                "rejected for fraud",
                vec![created(), screened(ScreeningDecision::Rejected)],
                vec![S::Created, FRAUD],
            ),
            (
                "rejected out of stock",
                history(&[E::OrderCreated, E::OrderScreened, E::StockRejected]),
                vec![S::Created, S::Screened, OUT_OF_STOCK],
            ),
            (
                "cancelled after retries",
                vec![
                    created(),
                    sample(E::OrderScreened),
                    sample(E::StockReserved),
                    again(E::PaymentRetrying, 1),
                    again(E::PaymentRetrying, 2),
                    sample(E::PaymentFailed),
                    sample(E::StockReleased),
                ],
                vec![
                    S::Created,
                    S::Screened,
                    S::Reserved,
                    S::Reserved,
                    S::Reserved,
                    S::Cancelled,
                    S::Cancelled,
                ],
            ),
            (
                "refunded after a failed delivery",
                history(&[
                    E::OrderCreated,
                    E::OrderScreened,
                    E::StockReserved,
                    E::PaymentAuthorized,
                    E::Picking,
                    E::Packed,
                    E::ReadyToShip,
                    E::Shipped,
                    E::DeliveryFailed,
                    E::PaymentRefunded,
                ]),
                vec![
                    S::Created,
                    S::Screened,
                    S::Reserved,
                    S::Paid,
                    S::Fulfilling,
                    S::Fulfilling,
                    S::Fulfilling,
                    S::Shipped,
                    S::Shipped,
                    S::Refunded,
                ],
            ),
        ]
    }

    #[test]
    fn every_terminal_path_folds_and_checks() -> Result<(), String> {
        for (name, events, statuses) in terminal_paths() {
            for n in 1..=events.len() {
                assert_eq!(
                    of(&events[..n]),
                    Some(statuses[n - 1]),
                    "{name}, {n} events"
                );
            }
            let last = *statuses.last().ok_or("empty path")?;
            assert!(last.is_terminal(), "{name}");
            assert_eq!(check_history(&events), Ok(last), "{name}");
            assert_eq!(check_complete(&events), Ok(last), "{name}");
            // Folding is idempotent: every event delivered twice changes nothing.
            let doubled: Vec<Event> = events.iter().flat_map(|e| [e.clone(), e.clone()]).collect();
            assert_eq!(of(&doubled), Some(last), "{name} doubled");
            assert_eq!(check_history(&doubled), Ok(last), "{name} doubled");
        }
        Ok(())
    }

    #[test]
    fn side_events_are_skipped_by_the_fold_and_the_check() {
        let mut events = history(HAPPY);
        events.insert(8, sample(E::CarrierScan));
        events.insert(9, sample(E::DeliveryAnomaly));
        events.insert(3, sample(E::StockLevelChanged));
        let mut low = sample(E::LowStock);
        low.envelope_mut().order_id = None;
        events.push(low);
        assert_eq!(of(&events), Some(S::Delivered));
        assert_eq!(check_history(&events), Ok(S::Delivered));
    }

    #[test]
    fn out_of_order_views_never_move_backwards() {
        // A read model that sees fulfillment before payment, and delivery before both.
        let events = history(&[
            E::OrderCreated,
            E::Picking,
            E::OrderScreened,
            E::PaymentAuthorized,
            E::StockReserved,
        ]);
        assert_eq!(of(&events), Some(S::Fulfilling));
        let events = history(&[E::StockReleased, E::PaymentFailed, E::StockReserved]);
        assert_eq!(of(&events), Some(S::Cancelled));
        assert_eq!(of(&[]), None);
    }

    /// Illegal histories, each with the fragment its error must contain.
    fn cancelled_failure() -> Event {
        let mut e = sample(E::PaymentFailed);
        if let Event::PaymentFailed(f) = &mut e {
            f.reason = PaymentFailureReason::Cancelled;
        }
        e
    }

    fn cancelled_refund() -> Event {
        let mut e = sample(E::PaymentRefunded);
        if let Event::PaymentRefunded(r) = &mut e {
            r.reason = CANCELLED_REFUND_REASON.into();
        }
        e
    }

    /// A customer cancellation in every position an order can be in, with the events the
    /// pipeline then produces: before `ReadyToShip` the order ends `cancelled` with its
    /// stock and charge given back (a legal, complete saga); from `ReadyToShip` on the
    /// refusal leaves the status where it was.
    #[test]
    fn a_customer_cancellation_in_every_position() -> Result<(), String> {
        let request = || sample(E::OrderCancelled);
        let accepted = || sample(E::CancellationAccepted);
        let refused = || sample(E::CancellationRefused);
        let released = || sample(E::StockReleased);
        // (position, the order's events so far, what the cancellation adds, final status)
        let cases: Vec<(&str, &[EventType], Vec<Event>, S)> = vec![
            (
                "before anything",
                &[],
                vec![request(), accepted()],
                S::Cancelled,
            ),
            (
                "created",
                &[E::OrderCreated],
                vec![request(), accepted()],
                S::Cancelled,
            ),
            (
                "screened",
                &[E::OrderCreated, E::OrderScreened],
                vec![request(), accepted()],
                S::Cancelled,
            ),
            (
                "reserved",
                &[E::OrderCreated, E::OrderScreened, E::StockReserved],
                vec![request(), accepted(), released(), cancelled_failure()],
                S::Cancelled,
            ),
            (
                "payment retrying",
                &[
                    E::OrderCreated,
                    E::OrderScreened,
                    E::StockReserved,
                    E::PaymentRetrying,
                ],
                vec![request(), accepted(), released(), cancelled_failure()],
                S::Cancelled,
            ),
            (
                "paid",
                &[
                    E::OrderCreated,
                    E::OrderScreened,
                    E::StockReserved,
                    E::PaymentAuthorized,
                ],
                vec![request(), accepted(), released(), cancelled_refund()],
                S::Cancelled,
            ),
            (
                "picking",
                &[
                    E::OrderCreated,
                    E::OrderScreened,
                    E::StockReserved,
                    E::PaymentAuthorized,
                    E::Picking,
                ],
                vec![request(), accepted(), cancelled_refund(), released()],
                S::Cancelled,
            ),
            (
                "packed",
                &[
                    E::OrderCreated,
                    E::OrderScreened,
                    E::StockReserved,
                    E::PaymentAuthorized,
                    E::Picking,
                    E::Packed,
                ],
                vec![request(), accepted(), released(), cancelled_refund()],
                S::Cancelled,
            ),
            (
                "ready to ship",
                &HAPPY[..7],
                vec![request(), refused()],
                S::Fulfilling,
            ),
            (
                "shipped",
                &HAPPY[..8],
                vec![request(), refused()],
                S::Shipped,
            ),
            ("delivered", HAPPY, vec![request(), refused()], S::Delivered),
        ];
        for (position, before, cancellation, status) in cases {
            let mut events = history(before);
            events.extend(cancellation);
            assert_eq!(of(&events), Some(status), "{position}: fold");
            assert_eq!(check_history(&events), Ok(status), "{position}: history");
            if status.is_terminal() {
                assert_eq!(check_complete(&events), Ok(status), "{position}: complete");
            }
            // The read side folds events in whatever order its topics deliver them;
            // reversed, the status comes out the same for a cancelled order.
            if status == S::Cancelled {
                let reversed: Vec<Event> = events.iter().rev().cloned().collect();
                assert_eq!(of(&reversed), Some(S::Cancelled), "{position}: reversed");
            }
        }
        Ok(())
    }

    #[test]
    fn cancellation_events_and_the_cancellation_refund_imply_their_status() {
        assert_eq!(implied(&sample(E::OrderCancelled)), None);
        assert_eq!(implied(&sample(E::CancellationRefused)), None);
        assert_eq!(
            implied(&sample(E::CancellationAccepted)),
            Some(S::Cancelled)
        );
        assert_eq!(implied(&cancelled_refund()), Some(S::Cancelled));
        assert_eq!(implied(&sample(E::PaymentRefunded)), Some(S::Refunded));
        assert_eq!(implied(&cancelled_failure()), Some(S::Cancelled));
        // A request never moves an order, a refusal never either.
        for current in [S::Reserved, S::Fulfilling, S::Shipped, S::Delivered] {
            assert_eq!(
                next(Some(current), &sample(E::OrderCancelled)),
                Some(current)
            );
            assert_eq!(
                next(Some(current), &sample(E::CancellationRefused)),
                Some(current)
            );
        }
        // An acceptance ends a live order; it cannot reopen a finished one.
        assert_eq!(
            next(Some(S::Fulfilling), &sample(E::CancellationAccepted)),
            Some(S::Cancelled)
        );
        assert_eq!(
            next(Some(S::Delivered), &sample(E::CancellationAccepted)),
            Some(S::Delivered)
        );
    }

    #[test]
    fn check_history_rejects_illegal_cancellations() {
        let with = |types: &[EventType], extra: Vec<Event>| -> Vec<Event> {
            let mut v = history(types);
            v.extend(extra);
            v
        };
        let to_paid = &HAPPY[..4];
        let cases: Vec<(&str, Vec<Event>, &str)> = vec![
            (
                "accepted without a request",
                with(to_paid, vec![sample(E::CancellationAccepted)]),
                "requires a prior CancelRequested",
            ),
            (
                "refused before ready to ship",
                with(
                    to_paid,
                    vec![sample(E::OrderCancelled), sample(E::CancellationRefused)],
                ),
                "requires a prior Ready",
            ),
            (
                "accepted after ready to ship",
                with(
                    &HAPPY[..7],
                    vec![sample(E::OrderCancelled), sample(E::CancellationAccepted)],
                ),
                "cannot follow Ready",
            ),
            (
                "picked after the acceptance",
                with(
                    to_paid,
                    vec![
                        sample(E::OrderCancelled),
                        sample(E::CancellationAccepted),
                        sample(E::Picking),
                    ],
                ),
                "cannot follow CancelAccepted",
            ),
            (
                "released without failure or cancellation",
                with(&HAPPY[..3], vec![sample(E::StockReleased)]),
                "requires a prior one of [PaymentFailed, CancelAccepted]",
            ),
            (
                "released twice",
                with(
                    &HAPPY[..3],
                    vec![
                        sample(E::OrderCancelled),
                        sample(E::CancellationAccepted),
                        sample(E::StockReleased),
                        again(E::StockReleased, 2),
                    ],
                ),
                "double effect",
            ),
            (
                "refunded without a charge",
                with(
                    &HAPPY[..3],
                    vec![
                        sample(E::OrderCancelled),
                        sample(E::CancellationAccepted),
                        cancelled_refund(),
                    ],
                ),
                "requires a prior Authorized",
            ),
        ];
        for (case, events, message) in cases {
            let err = check_history(&events).expect_err(case);
            assert!(err.contains(message), "{case}: {err}");
        }
    }

    #[test]
    fn check_complete_requires_a_cancelled_orders_stock_and_charge_back() {
        let paid_then_cancelled = {
            let mut v = history(&HAPPY[..4]);
            v.extend([sample(E::OrderCancelled), sample(E::CancellationAccepted)]);
            v
        };
        let mut released = paid_then_cancelled.clone();
        released.push(sample(E::StockReleased));
        let err = check_complete(&released).expect_err("charge kept");
        assert!(err.contains("never refunded"), "{err}");
        let mut refunded = paid_then_cancelled.clone();
        refunded.push(cancelled_refund());
        let err = check_complete(&refunded).expect_err("stock kept");
        assert!(err.contains("never released"), "{err}");
        refunded.push(sample(E::StockReleased));
        assert_eq!(check_complete(&refunded), Ok(S::Cancelled));
    }

    #[test]
    fn check_history_rejects_illegal_sagas() {
        let prefix = |types: &[EventType], extra: Vec<Event>| -> Vec<Event> {
            let mut v = history(types);
            v.extend(extra);
            v
        };
        const TO_RESERVED: &[EventType] = &[E::OrderCreated, E::OrderScreened, E::StockReserved];
        const TO_READY: &[EventType] = &[
            E::OrderCreated,
            E::OrderScreened,
            E::StockReserved,
            E::PaymentAuthorized,
            E::Picking,
            E::Packed,
            E::ReadyToShip,
        ];
        const TO_SHIPPED: &[EventType] = &[
            E::OrderCreated,
            E::OrderScreened,
            E::StockReserved,
            E::PaymentAuthorized,
            E::Picking,
            E::Packed,
            E::ReadyToShip,
            E::Shipped,
        ];
        let mut other_order = sample(E::StockReserved);
        other_order.envelope_mut().order_id = Some("o-2".into());
        let mut other_store = sample(E::StockReserved);
        other_store.envelope_mut().store_id = "s-2".into();
        let mut no_order = sample(E::OrderScreened);
        no_order.envelope_mut().order_id = None;

        let cases: Vec<(&str, Vec<Event>, &str)> = vec![
            ("empty", vec![], "no saga events"),
            (
                "only side events",
                history(&[E::CarrierScan]),
                "no saga events",
            ),
            (
                "not created first",
                history(&[E::OrderScreened]),
                "prior Created",
            ),
            (
                "reserved after fraud rejection",
                vec![
                    sample(E::OrderCreated),
                    screened(ScreeningDecision::Rejected),
                    sample(E::StockReserved),
                ],
                "prior Approved",
            ),
            (
                "screened twice, both ways",
                vec![sample(E::OrderCreated), sample(E::OrderScreened), {
                    let mut r = screened(ScreeningDecision::Rejected);
                    r.envelope_mut().event_id = "rejected".into();
                    r
                }],
                "cannot follow Approved",
            ),
            (
                "authorized without reservation",
                history(&[E::OrderCreated, E::OrderScreened, E::PaymentAuthorized]),
                "prior Reserved",
            ),
            (
                "reserved and out of stock",
                prefix(TO_RESERVED, vec![sample(E::StockRejected)]),
                "cannot follow Reserved",
            ),
            (
                "paid after out of stock",
                history(&[
                    E::OrderCreated,
                    E::OrderScreened,
                    E::StockRejected,
                    E::PaymentAuthorized,
                ]),
                "prior Reserved",
            ),
            (
                "released without a failed payment",
                prefix(TO_RESERVED, vec![sample(E::StockReleased)]),
                "prior one of [PaymentFailed, CancelAccepted]",
            ),
            (
                "authorized and failed",
                prefix(
                    TO_RESERVED,
                    vec![sample(E::PaymentAuthorized), sample(E::PaymentFailed)],
                ),
                "cannot follow Authorized",
            ),
            (
                "retrying after authorized",
                prefix(
                    TO_RESERVED,
                    vec![sample(E::PaymentAuthorized), sample(E::PaymentRetrying)],
                ),
                "cannot follow Authorized",
            ),
            (
                "authorized twice",
                prefix(
                    TO_RESERVED,
                    vec![sample(E::PaymentAuthorized), again(E::PaymentAuthorized, 2)],
                ),
                "double effect",
            ),
            (
                "picking after a failed payment",
                prefix(
                    TO_RESERVED,
                    vec![sample(E::PaymentFailed), sample(E::Picking)],
                ),
                "prior Authorized",
            ),
            (
                "packed before picking",
                prefix(
                    TO_RESERVED,
                    vec![sample(E::PaymentAuthorized), sample(E::Packed)],
                ),
                "prior Picking",
            ),
            (
                "shipped before ready",
                prefix(
                    TO_RESERVED,
                    vec![
                        sample(E::PaymentAuthorized),
                        sample(E::Picking),
                        sample(E::Packed),
                        sample(E::Shipped),
                    ],
                ),
                "prior Ready",
            ),
            (
                "delivered without shipping",
                prefix(TO_READY, vec![sample(E::Delivered)]),
                "prior Shipped",
            ),
            (
                "shipped twice",
                prefix(TO_SHIPPED, vec![again(E::Shipped, 2)]),
                "double effect",
            ),
            (
                "in transit after out for delivery",
                prefix(
                    TO_SHIPPED,
                    vec![sample(E::OutForDelivery), sample(E::InTransit)],
                ),
                "cannot follow OutForDelivery",
            ),
            (
                "delivered and failed",
                prefix(
                    TO_SHIPPED,
                    vec![sample(E::Delivered), sample(E::DeliveryFailed)],
                ),
                "cannot follow Delivered",
            ),
            (
                "delivered twice",
                prefix(
                    TO_SHIPPED,
                    vec![sample(E::Delivered), again(E::Delivered, 2)],
                ),
                "double effect",
            ),
            (
                "refunded without a failed delivery",
                prefix(TO_SHIPPED, vec![sample(E::PaymentRefunded)]),
                "prior one of [DeliveryFailed, CancelAccepted]",
            ),
            (
                "refunded after delivery",
                prefix(
                    TO_SHIPPED,
                    vec![sample(E::Delivered), sample(E::PaymentRefunded)],
                ),
                "prior one of [DeliveryFailed, CancelAccepted]",
            ),
            (
                "refunded twice",
                prefix(
                    TO_SHIPPED,
                    vec![
                        sample(E::DeliveryFailed),
                        sample(E::PaymentRefunded),
                        again(E::PaymentRefunded, 2),
                    ],
                ),
                "double effect",
            ),
            (
                "another order's event",
                vec![
                    sample(E::OrderCreated),
                    sample(E::OrderScreened),
                    other_order,
                ],
                "s-1/o-2, not s-1/o-1",
            ),
            (
                "another store's event",
                vec![
                    sample(E::OrderCreated),
                    sample(E::OrderScreened),
                    other_store,
                ],
                "s-2/o-1, not s-1/o-1",
            ),
            (
                "a saga event without an order",
                vec![sample(E::OrderCreated), no_order],
                "has no order_id",
            ),
        ];
        for (name, events, fragment) in cases {
            match check_history(&events) {
                Ok(s) => panic!("{name}: accepted as {s}"),
                Err(e) => assert!(e.contains(fragment), "{name}: {e}"),
            }
        }
    }

    #[test]
    fn check_history_names_the_offending_event() {
        let events = history(&[E::OrderCreated, E::PaymentAuthorized]);
        assert_eq!(
            check_history(&events),
            Err(
                "event #1 (PaymentAuthorized PaymentAuthorized) requires a prior Reserved"
                    .to_owned()
            )
        );
    }

    #[test]
    fn check_history_accepts_prefixes_but_check_complete_does_not() {
        for n in 1..HAPPY.len() {
            let events = history(&HAPPY[..n]);
            let status = check_history(&events);
            assert!(status.is_ok(), "{n}: {status:?}");
            let complete = check_complete(&events);
            assert!(
                matches!(complete, Err(ref e) if e.contains("not finished")),
                "{n}: {complete:?}"
            );
        }
        let failed_delivery = history(&[
            E::OrderCreated,
            E::OrderScreened,
            E::StockReserved,
            E::PaymentAuthorized,
            E::Picking,
            E::Packed,
            E::ReadyToShip,
            E::Shipped,
            E::DeliveryFailed,
        ]);
        assert_eq!(check_history(&failed_delivery), Ok(S::Shipped));
        assert!(check_complete(&failed_delivery).is_err());
        let unreleased = history(&[
            E::OrderCreated,
            E::OrderScreened,
            E::StockReserved,
            E::PaymentFailed,
        ]);
        assert_eq!(check_history(&unreleased), Ok(S::Cancelled));
        assert_eq!(
            check_complete(&unreleased),
            Err("the order is cancelled but its stock was never released".to_owned())
        );
    }

    #[test]
    fn terminal_statuses() {
        let terminal = [S::Delivered, FRAUD, OUT_OF_STOCK, S::Cancelled, S::Refunded];
        let open = [
            S::Created,
            S::Screened,
            S::Reserved,
            S::Paid,
            S::Fulfilling,
            S::Shipped,
        ];
        assert!(terminal.iter().all(S::is_terminal));
        assert!(!open.iter().any(S::is_terminal));
    }

    #[test]
    fn display_and_serde_are_snake_case() -> Result<(), serde_json::Error> {
        let cases = [
            (S::Created, "created", r#""created""#),
            (S::Screened, "screened", r#""screened""#),
            (S::Reserved, "reserved", r#""reserved""#),
            (S::Paid, "paid", r#""paid""#),
            (S::Fulfilling, "fulfilling", r#""fulfilling""#),
            (S::Shipped, "shipped", r#""shipped""#),
            (S::Delivered, "delivered", r#""delivered""#),
            (FRAUD, "rejected", r#"{"rejected":"fraud"}"#),
            (OUT_OF_STOCK, "rejected", r#"{"rejected":"out_of_stock"}"#),
            (S::Cancelled, "cancelled", r#""cancelled""#),
            (S::Refunded, "refunded", r#""refunded""#),
        ];
        for (status, display, json) in cases {
            assert_eq!(status.to_string(), display);
            assert_eq!(serde_json::to_string(&status)?, json);
            assert_eq!(serde_json::from_str::<S>(json)?, status);
        }
        assert_eq!(RejectionReason::OutOfStock.to_string(), "out_of_stock");
        Ok(())
    }

    #[test]
    fn stored_parts_round_trip() {
        let all = [
            S::Created,
            S::Screened,
            S::Reserved,
            S::Paid,
            S::Fulfilling,
            S::Shipped,
            S::Delivered,
            FRAUD,
            OUT_OF_STOCK,
            S::Cancelled,
            S::Refunded,
        ];
        for status in all {
            let reason = status.rejection_reason().map(RejectionReason::as_str);
            assert_eq!(S::from_parts(status.as_str(), reason), Some(status));
        }
        assert_eq!(S::from_parts("rejected", None), None);
        assert_eq!(S::from_parts("rejected", Some("tired")), None);
        assert_eq!(S::from_parts("lost", None), None);
    }
}
