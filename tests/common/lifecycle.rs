//! Events of whole orders and of stock, built in code, with the topics they are read
//! from: what the SQL sink tests feed the sinks, directly or through the topics.

use orderflow::events::*;
use orderflow::topics;

pub fn env(id: &str, store: &str, order: Option<&str>, at: i64) -> Envelope {
    Envelope {
        event_id: id.into(),
        order_id: order.map(str::to_owned),
        store_id: store.into(),
        correlation_id: order.unwrap_or("stock").into(),
        causation_id: None,
        occurred_at: at,
        schema_version: 1,
    }
}

pub fn items() -> Vec<OrderLine> {
    vec![OrderLine {
        sku: "sku-1".into(),
        quantity: 2,
        unit_price_cents: 1_250,
    }]
}

/// The events of one order, with the topics they are read from. `outcome` picks the path:
/// 0 delivered, 1 fraud-rejected, 2 out of stock, 3 payment failed (after retries),
/// 4 delivery failed and refunded. Step `i` occurs at `start + i * step_ms`.
pub fn lifecycle(
    store: &str,
    order: &str,
    outcome: u8,
    start: i64,
    step_ms: i64,
) -> Vec<(&'static str, Event)> {
    let mut i = 0;
    let mut at = || {
        i += 1;
        start + (i - 1) * step_ms
    };
    let id = |what: &str| format!("{store}/{order}/{what}");
    let e = |what: &str, at: i64| env(&id(what), store, Some(order), at);
    let mut out: Vec<(&'static str, Event)> = vec![(
        topics::ORDER_CREATED,
        OrderCreated {
            envelope: e("created", at()),
            customer_id: format!("c-{order}"),
            email: "c@example.com".into(),
            currency: "EUR".into(),
            shipping_country: "DE".into(),
            items: items(),
            placed_at: start,
        }
        .into(),
    )];
    let decision = if outcome == 1 {
        ScreeningDecision::Rejected
    } else {
        ScreeningDecision::Approved
    };
    out.push((
        topics::ORDER_SCREENED,
        OrderScreened {
            envelope: e("screened", at()),
            decision,
            reasons: if outcome == 1 {
                vec!["velocity: too many".into(), "amount_limit: 1".into()]
            } else {
                vec![]
            },
            customer_id: format!("c-{order}"),
            email: "c@example.com".into(),
            currency: "EUR".into(),
            total_cents: 2_500,
            items: items(),
        }
        .into(),
    ));
    if outcome == 1 {
        return out;
    }
    if outcome == 2 {
        out.push((
            topics::INVENTORY_UPDATED,
            StockRejected {
                envelope: e("stock-rejected", at()),
                short: vec![],
                reason: "out_of_stock".into(),
            }
            .into(),
        ));
        return out;
    }
    out.push((
        topics::INVENTORY_UPDATED,
        StockReserved {
            envelope: e("reserved", at()),
            customer_id: format!("c-{order}"),
            currency: "EUR".into(),
            total_cents: 2_500,
            items: items(),
        }
        .into(),
    ));
    if outcome == 3 {
        for n in 1..=2 {
            out.push((
                topics::PAYMENT_PROCESSED,
                PaymentRetrying {
                    envelope: e(&format!("retry-{n}"), at()),
                    amount_cents: 2_500,
                    currency: "EUR".into(),
                    attempt: n,
                    next_attempt_at: start,
                    error: "timeout".into(),
                }
                .into(),
            ));
        }
        out.push((
            topics::PAYMENT_PROCESSED,
            PaymentFailed {
                envelope: e("payment-failed", at()),
                amount_cents: 2_500,
                currency: "EUR".into(),
                attempts: 3,
                reason: PaymentFailureReason::GatewayUnavailable,
                message: "unavailable".into(),
            }
            .into(),
        ));
        out.push((
            topics::INVENTORY_UPDATED,
            StockReleased {
                envelope: e("released", at()),
                items: items(),
                reason: "payment_failed".into(),
            }
            .into(),
        ));
        return out;
    }
    out.push((
        topics::PAYMENT_PROCESSED,
        PaymentAuthorized {
            envelope: e("authorized", at()),
            amount_cents: 2_500,
            currency: "EUR".into(),
            attempt: 1,
            authorization_id: id("auth"),
        }
        .into(),
    ));
    out.push((
        topics::FULFILLMENT_UPDATED,
        Picking {
            envelope: e("picking", at()),
        }
        .into(),
    ));
    out.push((
        topics::FULFILLMENT_UPDATED,
        Packed {
            envelope: e("packed", at()),
        }
        .into(),
    ));
    out.push((
        topics::FULFILLMENT_UPDATED,
        ReadyToShip {
            envelope: e("ready", at()),
        }
        .into(),
    ));
    out.push((
        topics::DELIVERY_UPDATED,
        Shipped {
            envelope: e("shipped", at()),
            carrier: "dhl".into(),
            tracking_number: id("track"),
        }
        .into(),
    ));
    out.push((
        topics::CARRIER_UPDATES,
        CarrierScan {
            envelope: e("scan", at()),
            carrier: "dhl".into(),
            tracking_number: id("track"),
            scan: ScanKind::InTransit,
            location: Some("hub".into()),
            detail: None,
            scanned_at: start,
        }
        .into(),
    ));
    if outcome == 4 {
        out.push((
            topics::DELIVERY_UPDATED,
            DeliveryFailed {
                envelope: e("delivery-failed", at()),
                reason: "address".into(),
            }
            .into(),
        ));
        out.push((
            topics::PAYMENT_PROCESSED,
            PaymentRefunded {
                envelope: e("refunded", at()),
                amount_cents: 2_500,
                currency: "EUR".into(),
                refund_id: id("refund"),
                reason: "delivery failed".into(),
            }
            .into(),
        ));
        return out;
    }
    out.push((
        topics::DELIVERY_UPDATED,
        Delivered {
            envelope: e("delivered", at()),
        }
        .into(),
    ));
    out
}

pub fn low_stock(id: &str, store: &str, available: i32, threshold: i32, at: i64) -> Event {
    LowStock {
        envelope: env(id, store, None, at),
        sku: "sku-1".into(),
        available,
        threshold,
        trigger: LowStockTrigger::Crossing,
    }
    .into()
}

pub fn recovered(id: &str, store: &str, available: i32, threshold: i32, at: i64) -> Event {
    StockRecovered {
        envelope: env(id, store, None, at),
        sku: "sku-1".into(),
        available,
        threshold,
    }
    .into()
}

pub fn level(id: &str, store: &str, available: i32, at: i64) -> Event {
    StockLevelChanged {
        envelope: env(id, store, None, at),
        sku: "sku-1".into(),
        available,
        delta: 1,
        reason: "restock".into(),
    }
    .into()
}
