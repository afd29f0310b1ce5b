//! The stats view: per-store, per-minute dashboard metrics — counters, revenue per
//! currency, rejections per reason, and durations between order milestones.
//!
//! Invariant: an event counts in the minute of its own occurrence time, never of its
//! arrival, so a rebuild from the topics yields the same rows as the live sink; and each
//! counter moves by exactly one per event (the sink's deduplication makes "per event"
//! mean per event ID). Durations are not computed here: a milestone is recorded, and the
//! SQL layer observes every span the milestone completes from the stored other end.

use crate::events::{Event, ScreeningDecision};

use super::{Counter, RowOp, StatsMilestone, minute};

/// The low-cardinality reason of a fraud rejection: the rule's name before the colon
/// (`velocity: 3 orders within 10s exceeds 2` → `velocity`).
pub fn reason_name(reason: &str) -> &str {
    reason.split(':').next().unwrap_or(reason).trim()
}

fn stats_milestone(event: &Event) -> Option<StatsMilestone> {
    Some(match event {
        Event::OrderCreated(o) if !o.is_retry() => StatsMilestone::Created,
        Event::PaymentAuthorized(_) => StatsMilestone::Paid,
        Event::Shipped(_) => StatsMilestone::Shipped,
        Event::Delivered(_) => StatsMilestone::Delivered,
        _ => return None,
    })
}

/// The stats operations for `event`.
pub fn ops(event: &Event) -> Vec<RowOp> {
    let env = event.envelope();
    let store_id = env.store_id.clone();
    let time = minute(env.occurred_at);
    let mut ops = Vec::new();
    if let Some(counter) = Counter::of(event) {
        ops.push(RowOp::AddToStat {
            store_id: store_id.clone(),
            time,
            counter,
            by: 1,
        });
    }
    match event {
        Event::PaymentAuthorized(p) => ops.push(RowOp::AddRevenue {
            store_id: store_id.clone(),
            time,
            currency: p.currency.clone(),
            authorized_cents: p.amount_cents,
            refunded_cents: 0,
        }),
        Event::PaymentRefunded(p) => ops.push(RowOp::AddRevenue {
            store_id: store_id.clone(),
            time,
            currency: p.currency.clone(),
            authorized_cents: 0,
            refunded_cents: p.amount_cents,
        }),
        Event::OrderScreened(s) if s.decision == ScreeningDecision::Rejected => {
            // A rejection without a reason still counts, under `unspecified`.
            let mut reasons: Vec<&str> = Vec::new();
            for r in &s.reasons {
                if !reasons.contains(&reason_name(r)) {
                    reasons.push(reason_name(r));
                }
            }
            if reasons.is_empty() {
                reasons.push("unspecified");
            }
            ops.extend(reasons.into_iter().map(|reason| RowOp::AddRejection {
                store_id: store_id.clone(),
                time,
                reason: reason.to_owned(),
            }));
        }
        Event::StockRejected(r) => ops.push(RowOp::AddRejection {
            store_id: store_id.clone(),
            time,
            reason: r.reason.clone(),
        }),
        _ => {}
    }
    if let (Some(milestone), Some(order_id)) = (stats_milestone(event), env.order_id.clone()) {
        ops.push(RowOp::Milestone {
            store_id,
            order_id,
            milestone,
            at: env.occurred_at,
        });
    }
    ops
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::PaymentFailureReason;
    use crate::views::testing::*;

    #[test]
    fn order_created_counts_and_records_its_milestone() {
        assert_eq!(
            ops(&created(T0 + 61_000)),
            vec![
                RowOp::AddToStat {
                    store_id: STORE.into(),
                    time: T0 + 60_000,
                    counter: Counter::OrdersCreated,
                    by: 1,
                },
                RowOp::Milestone {
                    store_id: STORE.into(),
                    order_id: ORDER.into(),
                    milestone: StatsMilestone::Created,
                    at: T0 + 61_000,
                },
            ]
        );
    }

    #[test]
    fn an_authorization_counts_revenue_and_the_paid_milestone() {
        assert_eq!(
            ops(&authorized(T0 + 5)),
            vec![
                RowOp::AddToStat {
                    store_id: STORE.into(),
                    time: T0,
                    counter: Counter::PaymentsAuthorized,
                    by: 1,
                },
                RowOp::AddRevenue {
                    store_id: STORE.into(),
                    time: T0,
                    currency: "EUR".into(),
                    authorized_cents: 3_000,
                    refunded_cents: 0,
                },
                RowOp::Milestone {
                    store_id: STORE.into(),
                    order_id: ORDER.into(),
                    milestone: StatsMilestone::Paid,
                    at: T0 + 5,
                },
            ]
        );
    }

    #[test]
    fn a_fraud_rejection_counts_once_per_rule() {
        let event = screened(
            ScreeningDecision::Rejected,
            &[
                "amount_limit: total 5 exceeds 1",
                "velocity: 3 orders within 10s exceeds 2",
            ],
            T0,
        );
        let rejection = |reason: &str| RowOp::AddRejection {
            store_id: STORE.into(),
            time: T0,
            reason: reason.into(),
        };
        assert_eq!(
            ops(&event),
            vec![
                RowOp::AddToStat {
                    store_id: STORE.into(),
                    time: T0,
                    counter: Counter::OrdersRejected,
                    by: 1,
                },
                rejection("amount_limit"),
                rejection("velocity"),
            ]
        );
        let approved = screened(ScreeningDecision::Approved, &[], T0);
        assert_eq!(ops(&approved), vec![]);
    }

    #[test]
    fn retries_and_failures_count_without_milestones() {
        assert_eq!(
            ops(&retrying("e-r", T0)),
            vec![RowOp::AddToStat {
                store_id: STORE.into(),
                time: T0,
                counter: Counter::PaymentsRetried,
                by: 1,
            }]
        );
        assert_eq!(
            ops(&failed(PaymentFailureReason::Declined, T0)),
            vec![RowOp::AddToStat {
                store_id: STORE.into(),
                time: T0,
                counter: Counter::PaymentsFailed,
                by: 1,
            }]
        );
        // A customer's cancellation is not a payment failure.
        assert_eq!(ops(&failed(PaymentFailureReason::Cancelled, T0)), vec![]);
        assert_eq!(ops(&low_stock("e-low", 0, 1, T0)), vec![]);
    }

    #[test]
    fn reason_names_are_the_rule() {
        assert_eq!(reason_name("velocity: 3 orders"), "velocity");
        assert_eq!(reason_name("blocked_email"), "blocked_email");
    }
}
