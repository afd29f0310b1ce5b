//! The alerts view: which events open, count and resolve alerts, and the replenishment
//! request a low-stock alert publishes when it opens.
//!
//! The rules, one sentence each:
//!
//! - **low_stock** (subject: SKU): a `LowStock` opens it; the SKU's `StockRecovered`
//!   resolves it. Both come from the inventory stage on one topic, in the order it decided
//!   them, so every reader (another deployment, a rebuild) finds the same episodes; stock
//!   levels from other topics only fill the stock table. Opening publishes one
//!   `ReplenishmentRequested` when the store replenishes automatically (`[alerts]`
//!   settings); another `LowStock` while it is active publishes nothing.
//! - **payment_exhausted** (subject: `gateway_unavailable`): a `PaymentFailed` because
//!   every attempt found the gateway unavailable opens it; an operator resolves it.
//! - **gateway_outage** (subject: `payment_gateway`): it opens when a store's
//!   `PaymentRetrying` events within one clock minute (by occurrence time) reach
//!   `gateway_outage_retries_per_minute`, and resolves at the store's first
//!   `PaymentAuthorized` that occurred after its last counted retry.
//! - **dead_letters** (subject: `<stage>/<error class>`): every dead letter opens or counts
//!   into it; an operator resolves it (after a redrive, say).
//!
//! Invariant: at most one active (open or acknowledged) alert per (store, kind, subject) —
//! a repeat counts an occurrence of the active one — and the view keeps no state: every
//! decision that depends on the past (is one active? how many retries this minute? is the
//! stock report newer?) is made by the SQL layer from rows, in the commit transaction.

use serde_json::json;

use crate::config::AlertSettings;
use crate::events::{Envelope, Event, PaymentFailureReason, ReplenishmentRequested};

use super::{AlertKind, DeadLetter, RowOp};

/// Subject of the gateway-outage alert: one per store.
pub const GATEWAY_SUBJECT: &str = "payment_gateway";
/// Subject of the payment-exhausted alert.
pub const EXHAUSTED_SUBJECT: &str = "gateway_unavailable";
/// The stage name in the IDs of events the alerts sink derives.
pub const STAGE: &str = "alerts";

/// The alerts operations for `event`.
pub fn ops(event: &Event, settings: &AlertSettings) -> Vec<RowOp> {
    let env = event.envelope();
    let store_id = env.store_id.clone();
    let at = env.occurred_at;
    match event {
        Event::LowStock(low) => {
            let replenish = settings.replenishment_quantity(&store_id).map(|quantity| {
                Box::new(Event::from(ReplenishmentRequested {
                    envelope: Envelope::caused_by(env, STAGE, 0, at),
                    sku: low.sku.clone(),
                    quantity,
                    available: low.available,
                    threshold: low.threshold,
                }))
            });
            vec![RowOp::LowStock {
                store_id,
                sku: low.sku.clone(),
                available: low.available,
                threshold: low.threshold,
                at,
                detail: json!({
                    "available": low.available,
                    "threshold": low.threshold,
                    "event_id": env.event_id,
                }),
                replenish,
            }]
        }
        Event::StockRecovered(r) => vec![RowOp::StockRecovered {
            store_id,
            sku: r.sku.clone(),
            available: r.available,
            threshold: r.threshold,
            at,
        }],
        Event::StockLevelChanged(level) => vec![RowOp::ObserveStock {
            store_id,
            sku: level.sku.clone(),
            available: Some(level.available),
            threshold: None,
            at,
        }],
        Event::ThresholdSet(t) => vec![RowOp::ObserveStock {
            store_id,
            sku: t.sku.clone(),
            available: None,
            threshold: Some(t.threshold),
            at,
        }],
        Event::PaymentFailed(f) if f.reason == PaymentFailureReason::GatewayUnavailable => {
            vec![RowOp::OpenAlert {
                store_id,
                kind: AlertKind::PaymentExhausted,
                subject: EXHAUSTED_SUBJECT.into(),
                at,
                detail: json!({
                    "order_id": env.order_id,
                    "attempts": f.attempts,
                    "amount_cents": f.amount_cents,
                    "currency": f.currency,
                    "message": f.message,
                }),
            }]
        }
        Event::PaymentRetrying(r) => vec![RowOp::CountRetry {
            store_id,
            at,
            threshold: settings.gateway_outage_retries_per_minute,
            detail: json!({ "order_id": env.order_id, "error": r.error }),
        }],
        Event::PaymentAuthorized(_) => vec![RowOp::ResolveAlert {
            store_id,
            kind: AlertKind::GatewayOutage,
            subject: GATEWAY_SUBJECT.into(),
            at,
        }],
        _ => Vec::new(),
    }
}

/// The alerts operations for a dead letter.
pub fn dead_letter_ops(dl: &DeadLetter) -> Vec<RowOp> {
    vec![RowOp::OpenAlert {
        store_id: dl.store_id.clone(),
        kind: AlertKind::DeadLetters,
        subject: format!("{}/{}", dl.stage, dl.error_class),
        at: dl.at,
        detail: json!({
            "source_topic": dl.source_topic,
            "source_partition": dl.source_partition,
            "source_offset": dl.source_offset,
            "message": dl.error_message,
        }),
    }]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::StoreAlertSettings;
    use crate::events::derive_id;
    use crate::views::testing::*;

    #[test]
    fn low_stock_opens_with_a_replenishment_request_derived_from_it() {
        let event = low_stock("e-low", 1, 3, T0);
        let ops = ops(&event, &AlertSettings::default());
        let mut envelope = env(&derive_id("e-low", "alerts", 0).to_string(), T0);
        envelope.order_id = None;
        envelope.causation_id = Some("e-low".into());
        assert_eq!(
            ops,
            vec![RowOp::LowStock {
                store_id: STORE.into(),
                sku: "sku-1".into(),
                available: 1,
                threshold: 3,
                at: T0,
                detail: json!({"available": 1, "threshold": 3, "event_id": "e-low"}),
                replenish: Some(Box::new(
                    ReplenishmentRequested {
                        envelope,
                        sku: "sku-1".into(),
                        quantity: 100,
                        available: 1,
                        threshold: 3,
                    }
                    .into()
                )),
            }]
        );
    }

    #[test]
    fn a_store_without_replenishment_opens_the_alert_only() {
        let mut settings = AlertSettings::default();
        settings.stores.insert(
            STORE.into(),
            StoreAlertSettings {
                replenishment_enabled: Some(false),
                replenishment_quantity: None,
            },
        );
        let ops = ops(&low_stock("e-low", 1, 3, T0), &settings);
        assert!(
            matches!(
                ops.as_slice(),
                [RowOp::LowStock {
                    replenish: None,
                    ..
                }]
            ),
            "{ops:?}"
        );
    }

    #[test]
    fn stock_reports_observe_levels_and_thresholds() {
        let settings = AlertSettings::default();
        assert_eq!(
            ops(&level("e-level", 12, T0), &settings),
            vec![RowOp::ObserveStock {
                store_id: STORE.into(),
                sku: "sku-1".into(),
                available: Some(12),
                threshold: None,
                at: T0,
            }]
        );
    }

    #[test]
    fn a_recovery_resolves_the_skus_low_stock_alert() {
        let mut envelope = env("e-rec", T0);
        envelope.order_id = None;
        let event: Event = crate::events::StockRecovered {
            envelope,
            sku: "sku-1".into(),
            available: 9,
            threshold: 3,
        }
        .into();
        assert_eq!(
            ops(&event, &AlertSettings::default()),
            vec![RowOp::StockRecovered {
                store_id: STORE.into(),
                sku: "sku-1".into(),
                available: 9,
                threshold: 3,
                at: T0,
            }]
        );
    }

    #[test]
    fn only_an_exhausted_payment_alerts() {
        let settings = AlertSettings::default();
        assert_eq!(
            ops(
                &failed(PaymentFailureReason::Declined, T0),
                &AlertSettings::default()
            ),
            vec![]
        );
        assert_eq!(
            ops(
                &failed(PaymentFailureReason::GatewayUnavailable, T0),
                &settings
            ),
            vec![RowOp::OpenAlert {
                store_id: STORE.into(),
                kind: AlertKind::PaymentExhausted,
                subject: "gateway_unavailable".into(),
                at: T0,
                detail: json!({
                    "order_id": ORDER,
                    "attempts": 6,
                    "amount_cents": 3_000,
                    "currency": "EUR",
                    "message": "gateway unavailable",
                }),
            }]
        );
    }

    #[test]
    fn retries_count_towards_an_outage_that_an_authorization_ends() {
        let settings = AlertSettings {
            gateway_outage_retries_per_minute: 7,
            ..AlertSettings::default()
        };
        assert_eq!(
            ops(&retrying("e-r", T0), &settings),
            vec![RowOp::CountRetry {
                store_id: STORE.into(),
                at: T0,
                threshold: 7,
                detail: json!({"order_id": ORDER, "error": "timeout"}),
            }]
        );
        assert_eq!(
            ops(&authorized(T0 + 1), &settings),
            vec![RowOp::ResolveAlert {
                store_id: STORE.into(),
                kind: AlertKind::GatewayOutage,
                subject: "payment_gateway".into(),
                at: T0 + 1,
            }]
        );
        assert_eq!(ops(&created(T0), &settings), vec![]);
    }

    #[test]
    fn a_dead_letter_alerts_per_stage_and_error_class() {
        let dl = DeadLetter {
            store_id: STORE.into(),
            source_topic: "order.created".into(),
            source_partition: 2,
            source_offset: 9,
            stage: "fraud".into(),
            error_class: "decode".into(),
            error_message: "not Avro".into(),
            at: T0,
        };
        assert_eq!(
            dead_letter_ops(&dl),
            vec![RowOp::OpenAlert {
                store_id: STORE.into(),
                kind: AlertKind::DeadLetters,
                subject: "fraud/decode".into(),
                at: T0,
                detail: json!({
                    "source_topic": "order.created",
                    "source_partition": 2,
                    "source_offset": 9,
                    "message": "not Avro",
                }),
            }]
        );
    }
}
