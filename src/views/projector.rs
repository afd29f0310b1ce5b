//! The projector's view: every event of an order becomes a row of its `order_events`
//! timeline and is folded into its `orders` row.
//!
//! Invariant: only events with an order ID are projected (stock commands, levels and
//! `LowStock` concern SKUs, not orders); the status comes from [`crate::status`] and
//! nowhere else; an order's row never depends on the order its events arrive in, because
//! every field is either set once (customer, total: every event that carries them says
//! the same), the earliest occurrence time (milestones: PaymentFailed and StockReleased
//! both mark `cancelled_at`), advanced by the status rule that never moves backwards, or
//! taken from the latest event by occurrence time.

use crate::events::{Event, EventType};
use crate::status;

use super::{OrderMilestone, RowOp};

/// The stage (or outside party) that produces events of type `t`, for the timeline.
pub fn producer_of(t: EventType) -> &'static str {
    use EventType::*;
    match t {
        OrderCreated | OrderCancelled => "producer",
        OrderScreened => "fraud",
        StockRestocked | StockAdjusted | ThresholdSet => "operator",
        StockReserved | StockRejected | StockReleased | StockLevelChanged | LowStock
        | StockRecovered => "inventory",
        PaymentAuthorized | PaymentRetrying | PaymentFailed | PaymentRefunded => "payment",
        Picking | Packed | ReadyToShip | CancellationAccepted | CancellationRefused => {
            "fulfillment"
        }
        CarrierScan => "carrier",
        Shipped | InTransit | OutForDelivery | Delivered | DeliveryFailed | DeliveryAnomaly => {
            "delivery"
        }
        ReplenishmentRequested => "alerts",
    }
}

/// The `orders` timestamp an event sets.
fn milestone(event: &Event) -> Option<OrderMilestone> {
    use crate::events::ScreeningDecision;
    use OrderMilestone as M;
    Some(match event {
        Event::OrderCreated(_) => M::Created,
        Event::OrderScreened(s) => match s.decision {
            ScreeningDecision::Approved => M::Screened,
            ScreeningDecision::Rejected => M::Rejected,
        },
        Event::StockReserved(_) => M::Reserved,
        Event::StockRejected(_) => M::Rejected,
        Event::PaymentAuthorized(_) => M::Paid,
        Event::PaymentFailed(_) | Event::StockReleased(_) | Event::CancellationAccepted(_) => {
            M::Cancelled
        }
        Event::Shipped(_) => M::Shipped,
        Event::Delivered(_) => M::Delivered,
        Event::DeliveryFailed(_) => M::DeliveryFailed,
        Event::PaymentRefunded(_) => M::Refunded,
        _ => return None,
    })
}

/// (customer, total, currency) as far as the event tells.
fn order_facts(event: &Event) -> (Option<String>, Option<i64>, Option<String>) {
    match event {
        Event::OrderCreated(c) => (
            Some(c.customer_id.clone()),
            c.total_cents(),
            Some(c.currency.clone()),
        ),
        Event::OrderScreened(s) => (
            Some(s.customer_id.clone()),
            Some(s.total_cents),
            Some(s.currency.clone()),
        ),
        Event::StockReserved(r) => (
            Some(r.customer_id.clone()),
            Some(r.total_cents),
            Some(r.currency.clone()),
        ),
        Event::PaymentAuthorized(p) => (None, None, Some(p.currency.clone())),
        _ => (None, None, None),
    }
}

/// The projector's operations for `event`, read from `topic` (prefix-free).
pub fn ops(topic: &str, event: &Event) -> Vec<RowOp> {
    let env = event.envelope();
    let Some(order_id) = env.order_id.clone() else {
        return Vec::new();
    };
    let t = event.event_type();
    let payload = match event.to_json() {
        Ok(v) => v,
        // Serializing a decoded event cannot fail (its fields are strings, numbers and
        // lists); should it ever, the timeline keeps the row without a body.
        Err(e) => serde_json::json!({ "error": e.to_string() }),
    };
    let (customer_id, total_cents, currency) = order_facts(event);
    vec![
        RowOp::InsertEvent {
            event_id: env.event_id.clone(),
            store_id: env.store_id.clone(),
            order_id: order_id.clone(),
            event_type: t,
            stage: producer_of(t),
            topic: topic.to_owned(),
            occurred_at: env.occurred_at,
            payload,
        },
        RowOp::UpsertOrder {
            store_id: env.store_id.clone(),
            order_id,
            event_id: env.event_id.clone(),
            event_type: t,
            occurred_at: env.occurred_at,
            status: status::implied(event),
            milestone: milestone(event),
            customer_id,
            total_cents,
            currency,
        },
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::ScreeningDecision;
    use crate::status::{OrderStatus, RejectionReason};
    use crate::topics;
    use crate::views::testing::*;

    #[test]
    fn an_order_created_becomes_a_timeline_row_and_an_order() -> Result<(), serde_json::Error> {
        let event = created(T0);
        let ops = ops(topics::ORDER_CREATED, &event);
        assert_eq!(
            ops,
            vec![
                RowOp::InsertEvent {
                    event_id: "e-created".into(),
                    store_id: STORE.into(),
                    order_id: ORDER.into(),
                    event_type: EventType::OrderCreated,
                    stage: "producer",
                    topic: "order.created".into(),
                    occurred_at: T0,
                    payload: event.to_json()?,
                },
                RowOp::UpsertOrder {
                    store_id: STORE.into(),
                    order_id: ORDER.into(),
                    event_id: "e-created".into(),
                    event_type: EventType::OrderCreated,
                    occurred_at: T0,
                    status: Some(OrderStatus::Created),
                    milestone: Some(OrderMilestone::Created),
                    customer_id: Some("c-1".into()),
                    total_cents: Some(3_000),
                    currency: Some("EUR".into()),
                },
            ]
        );
        Ok(())
    }

    #[test]
    fn the_payload_is_the_flat_event() -> Result<(), Box<dyn std::error::Error>> {
        let event = authorized(T0);
        let ops = ops(topics::PAYMENT_PROCESSED, &event);
        let Some(RowOp::InsertEvent { payload, .. }) = ops.first().cloned() else {
            return Err(format!("no InsertEvent first: {ops:?}").into());
        };
        assert_eq!(ops.len(), 2);
        assert_eq!(payload["amount_cents"], 3_000);
        assert_eq!(payload["event_id"], "e-paid");
        let back = Event::from_json_value(EventType::PaymentAuthorized, payload)?;
        assert_eq!(back, event);
        Ok(())
    }

    #[test]
    fn a_fraud_rejection_sets_status_and_the_rejected_milestone() {
        let event = screened(ScreeningDecision::Rejected, &["amount_limit: x"], T0);
        let ops = ops(topics::ORDER_SCREENED, &event);
        let upsert = ops.get(1);
        assert!(
            matches!(
                upsert,
                Some(RowOp::UpsertOrder {
                    status: Some(OrderStatus::Rejected(RejectionReason::Fraud)),
                    milestone: Some(OrderMilestone::Rejected),
                    total_cents: Some(3_000),
                    ..
                })
            ),
            "{upsert:?}"
        );
        assert_eq!(ops.len(), 2);
    }

    #[test]
    fn side_events_join_the_timeline_without_status() {
        let event = retrying("e-retry", T0);
        let ops = ops(topics::PAYMENT_PROCESSED, &event);
        assert!(
            matches!(
                ops.get(1),
                Some(RowOp::UpsertOrder {
                    status: Some(OrderStatus::Reserved),
                    milestone: None,
                    customer_id: None,
                    ..
                })
            ),
            "{ops:?}"
        );
    }

    #[test]
    fn events_without_an_order_are_not_projected() {
        assert_eq!(
            ops(
                topics::INVENTORY_THRESHOLD_REACHED,
                &low_stock("e-low", 1, 2, T0)
            ),
            vec![]
        );
        assert_eq!(
            ops(topics::INVENTORY_UPDATED, &level("e-level", 1, T0)),
            vec![]
        );
    }

    #[test]
    fn every_event_type_has_a_producer_matching_its_topic() {
        for &t in EventType::ALL {
            let topic = topics::topic_of(t);
            let p = producer_of(t);
            let expected: &[&str] = match topic {
                topics::ORDER_CREATED | topics::ORDER_CANCELLED => &["producer"],
                topics::ORDER_SCREENED => &["fraud"],
                topics::INVENTORY_COMMANDS => &["operator"],
                topics::INVENTORY_UPDATED | topics::INVENTORY_THRESHOLD_REACHED => &["inventory"],
                topics::PAYMENT_PROCESSED => &["payment"],
                topics::FULFILLMENT_UPDATED => &["fulfillment"],
                topics::CARRIER_UPDATES => &["carrier"],
                topics::DELIVERY_UPDATED => &["delivery"],
                topics::PURCHASING_REPLENISHMENT => &["alerts"],
                other => panic!("unexpected topic {other}"),
            };
            assert!(expected.contains(&p), "{t}: {p}");
        }
    }
}
