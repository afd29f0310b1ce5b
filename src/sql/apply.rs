//! Applies one [`RowOp`] inside a sink's commit transaction.
//!
//! Invariant: every read-modify-write here reads the rows it depends on in the same
//! transaction that writes them, and decides with the same rules as the views
//! ([`crate::status::advance`] for statuses, [`crate::views::duration_bucket`] for
//! histograms), so the result depends on the events applied, not on when or in which
//! process they were applied.

use serde_json::Value;

use crate::events::Event;
use crate::status::{self, OrderStatus};
use crate::views::alerts::GATEWAY_SUBJECT;
use crate::views::{AlertKind, RowOp, Sink, Span, StatsMilestone, duration_bucket, minute};

use super::{Arg, Kind, SqlError, Tx};

/// How long per-minute retry counts are kept for the gateway-outage rule.
const RETRY_COUNT_RETENTION_MS: i64 = 3_600_000;

/// Inserts a timeline row; `true` when it is new (the projector's deduplication).
pub(super) async fn insert_event(tx: &mut Tx, op: &RowOp) -> Result<bool, SqlError> {
    let RowOp::InsertEvent {
        event_id,
        store_id,
        order_id,
        event_type,
        stage,
        topic,
        occurred_at,
        payload,
    } = op
    else {
        return Err(SqlError::Corrupt(format!("not an InsertEvent: {op:?}")));
    };
    let n = tx
        .execute(
            "INSERT INTO order_events \
             (event_id, store_id, order_id, event_type, stage, topic, occurred_at, payload) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (event_id) DO NOTHING",
            &[
                Arg::text(event_id),
                Arg::text(store_id),
                Arg::text(order_id),
                Arg::text(event_type.name()),
                Arg::text(stage),
                Arg::text(topic),
                Arg::int(*occurred_at),
                Arg::Json(payload.clone()),
            ],
        )
        .await?;
    Ok(n == 1)
}

/// Keeps an event to publish until the caller has produced it.
pub(super) async fn to_outbox(
    tx: &mut Tx,
    sink: Sink,
    event: &Event,
    now: i64,
) -> Result<(), SqlError> {
    let payload = event
        .to_json()
        .map_err(|e| SqlError::Corrupt(format!("cannot serialize {event:?}: {e}")))?;
    tx.execute(
        "INSERT INTO sink_outbox (event_id, sink, event_type, payload, created_at) \
         VALUES ($1, $2, $3, $4, $5) ON CONFLICT (event_id) DO NOTHING",
        &[
            Arg::text(&event.envelope().event_id),
            Arg::text(sink.name()),
            Arg::text(event.event_type().name()),
            Arg::Json(payload),
            Arg::int(now),
        ],
    )
    .await?;
    Ok(())
}

/// Applies `op`; returns an event to publish, if the op decided to publish one.
pub(super) async fn apply(tx: &mut Tx, op: &RowOp, now: i64) -> Result<Option<Event>, SqlError> {
    match op {
        RowOp::InsertEvent { .. } => {
            insert_event(tx, op).await?;
        }
        RowOp::UpsertOrder {
            store_id,
            order_id,
            event_id,
            event_type,
            occurred_at,
            status,
            milestone,
            customer_id,
            total_cents,
            currency,
        } => {
            let stored = tx
                .fetch_optional(
                    "SELECT status, rejection_reason FROM orders \
                     WHERE store_id = $1 AND order_id = $2",
                    &[Arg::text(store_id), Arg::text(order_id)],
                    &[Kind::Text, Kind::Text],
                )
                .await?;
            let current = match stored {
                Some(row) => match row.opt_text(0)? {
                    Some(s) => {
                        let reason = row.opt_text(1)?;
                        Some(
                            OrderStatus::from_parts(&s, reason.as_deref()).ok_or_else(|| {
                                SqlError::Corrupt(format!(
                                    "order {store_id}/{order_id} has status {s:?} ({reason:?})"
                                ))
                            })?,
                        )
                    }
                    None => None,
                },
                None => None,
            };
            let new = match status {
                Some(target) => Some(status::advance(current, *target)),
                None => current,
            };
            let (ms_col, ms_val) = match milestone {
                Some(m) => (format!(", {}", m.column()), ", $12".to_owned()),
                None => (String::new(), String::new()),
            };
            // The earliest time wins, whichever event comes first: two events can mark the
            // same milestone (PaymentFailed and StockReleased both cancel) and arrive from
            // different topics in either order, and a rebuild must reproduce the row.
            let ms_set = milestone
                .map(|m| {
                    format!(
                        ", {c} = CASE WHEN orders.{c} IS NULL OR excluded.{c} < orders.{c} \
                         THEN excluded.{c} ELSE orders.{c} END",
                        c = m.column()
                    )
                })
                .unwrap_or_default();
            let sql = format!(
                "INSERT INTO orders (store_id, order_id, customer_id, status, rejection_reason, \
                 total_cents, currency, last_event_id, last_event_type, last_event_at, updated_at{ms_col}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11{ms_val}) \
                 ON CONFLICT (store_id, order_id) DO UPDATE SET \
                 customer_id = COALESCE(orders.customer_id, excluded.customer_id), \
                 status = excluded.status, \
                 rejection_reason = excluded.rejection_reason, \
                 total_cents = COALESCE(orders.total_cents, excluded.total_cents), \
                 currency = COALESCE(orders.currency, excluded.currency), \
                 last_event_id = CASE WHEN excluded.last_event_at >= orders.last_event_at \
                   THEN excluded.last_event_id ELSE orders.last_event_id END, \
                 last_event_type = CASE WHEN excluded.last_event_at >= orders.last_event_at \
                   THEN excluded.last_event_type ELSE orders.last_event_type END, \
                 last_event_at = CASE WHEN excluded.last_event_at >= orders.last_event_at \
                   THEN excluded.last_event_at ELSE orders.last_event_at END, \
                 updated_at = excluded.updated_at{ms_set}"
            );
            let mut args = vec![
                Arg::text(store_id),
                Arg::text(order_id),
                Arg::Text(customer_id.clone()),
                Arg::Text(new.map(|s| s.as_str().to_owned())),
                Arg::Text(
                    new.and_then(|s| s.rejection_reason())
                        .map(|r| r.as_str().to_owned()),
                ),
                Arg::I64(*total_cents),
                Arg::Text(currency.clone()),
                Arg::text(event_id),
                Arg::text(event_type.name()),
                Arg::int(*occurred_at),
                Arg::int(now),
            ];
            if milestone.is_some() {
                args.push(Arg::int(*occurred_at));
            }
            tx.execute(&sql, &args).await?;
        }
        RowOp::AddToStat {
            store_id,
            time,
            counter,
            by,
        } => {
            let c = counter.column();
            tx.execute(
                &format!(
                    "INSERT INTO stats_minute (store_id, bucket_ms, {c}) VALUES ($1, $2, $3) \
                     ON CONFLICT (store_id, bucket_ms) DO UPDATE SET {c} = stats_minute.{c} + excluded.{c}"
                ),
                &[Arg::text(store_id), Arg::int(*time), Arg::int(*by)],
            )
            .await?;
        }
        RowOp::AddRevenue {
            store_id,
            time,
            currency,
            authorized_cents,
            refunded_cents,
        } => {
            tx.execute(
                "INSERT INTO stats_revenue_minute \
                 (store_id, bucket_ms, currency, revenue_authorized_cents, refunded_cents) \
                 VALUES ($1, $2, $3, $4, $5) \
                 ON CONFLICT (store_id, bucket_ms, currency) DO UPDATE SET \
                 revenue_authorized_cents = stats_revenue_minute.revenue_authorized_cents + excluded.revenue_authorized_cents, \
                 refunded_cents = stats_revenue_minute.refunded_cents + excluded.refunded_cents",
                &[
                    Arg::text(store_id),
                    Arg::int(*time),
                    Arg::text(currency),
                    Arg::int(*authorized_cents),
                    Arg::int(*refunded_cents),
                ],
            )
            .await?;
        }
        RowOp::AddRejection {
            store_id,
            time,
            reason,
        } => {
            tx.execute(
                "INSERT INTO stats_rejections_minute (store_id, bucket_ms, reason, count) \
                 VALUES ($1, $2, $3, 1) ON CONFLICT (store_id, bucket_ms, reason) DO UPDATE SET \
                 count = stats_rejections_minute.count + 1",
                &[Arg::text(store_id), Arg::int(*time), Arg::text(reason)],
            )
            .await?;
        }
        RowOp::Milestone {
            store_id,
            order_id,
            milestone,
            at,
        } => milestone_reached(tx, store_id, order_id, *milestone, *at).await?,
        RowOp::ObserveStock {
            store_id,
            sku,
            available,
            threshold,
            at,
        } => {
            observe_stock(tx, store_id, sku, *available, *threshold, *at).await?;
        }
        RowOp::LowStock {
            store_id,
            sku,
            available,
            threshold,
            at,
            detail,
            replenish,
        } => {
            observe_stock(tx, store_id, sku, Some(*available), Some(*threshold), *at).await?;
            if open_or_count(tx, store_id, AlertKind::LowStock, sku, *at, detail).await? {
                return Ok(replenish.as_deref().cloned());
            }
        }
        RowOp::StockRecovered {
            store_id,
            sku,
            available,
            threshold,
            at,
        } => {
            observe_stock(tx, store_id, sku, Some(*available), Some(*threshold), *at).await?;
            tx.execute(
                "UPDATE alerts SET status = 'resolved', \
                 resolved_at = CASE WHEN $4 > last_seen_at THEN $4 ELSE last_seen_at END \
                 WHERE store_id = $1 AND kind = $2 AND subject = $3 AND status <> 'resolved'",
                &[
                    Arg::text(store_id),
                    Arg::text(AlertKind::LowStock.as_str()),
                    Arg::text(sku),
                    Arg::int(*at),
                ],
            )
            .await?;
        }
        RowOp::OpenAlert {
            store_id,
            kind,
            subject,
            at,
            detail,
        } => {
            open_or_count(tx, store_id, *kind, subject, *at, detail).await?;
        }
        RowOp::CountRetry {
            store_id,
            at,
            threshold,
            detail,
        } => {
            let bucket = minute(*at);
            let count = tx
                .fetch_one(
                    "INSERT INTO alert_retry_counts (store_id, bucket_ms, count) VALUES ($1, $2, 1) \
                     ON CONFLICT (store_id, bucket_ms) DO UPDATE SET count = alert_retry_counts.count + 1 \
                     RETURNING count",
                    &[Arg::text(store_id), Arg::int(bucket)],
                    &[Kind::I64],
                )
                .await?
                .i64(0)?;
            tx.execute(
                "DELETE FROM alert_retry_counts WHERE store_id = $1 AND bucket_ms < $2",
                &[
                    Arg::text(store_id),
                    Arg::int(bucket - RETRY_COUNT_RETENTION_MS),
                ],
            )
            .await?;
            if count >= *threshold {
                let mut detail = detail.clone();
                if let Value::Object(m) = &mut detail {
                    m.insert("retries_in_minute".into(), count.into());
                }
                open_or_count(
                    tx,
                    store_id,
                    AlertKind::GatewayOutage,
                    GATEWAY_SUBJECT,
                    *at,
                    &detail,
                )
                .await?;
            }
        }
        RowOp::ResolveAlert {
            store_id,
            kind,
            subject,
            at,
        } => {
            resolve_active(tx, store_id, *kind, subject, *at).await?;
        }
    }
    Ok(None)
}

/// Records a milestone (the first report wins) and observes every span it completes.
async fn milestone_reached(
    tx: &mut Tx,
    store_id: &str,
    order_id: &str,
    milestone: StatsMilestone,
    at: i64,
) -> Result<(), SqlError> {
    const ALL: [StatsMilestone; 4] = [
        StatsMilestone::Created,
        StatsMilestone::Paid,
        StatsMilestone::Shipped,
        StatsMilestone::Delivered,
    ];
    let row = tx
        .fetch_optional(
            "SELECT created_at, paid_at, shipped_at, delivered_at FROM stats_milestones \
             WHERE store_id = $1 AND order_id = $2",
            &[Arg::text(store_id), Arg::text(order_id)],
            &[Kind::I64, Kind::I64, Kind::I64, Kind::I64],
        )
        .await?;
    let mut known: [Option<i64>; 4] = [None; 4];
    if let Some(row) = &row {
        for (i, k) in known.iter_mut().enumerate() {
            *k = row.opt_i64(i)?;
        }
    }
    let idx = |m: StatsMilestone| ALL.iter().position(|x| *x == m).unwrap_or(0);
    if known[idx(milestone)].is_some() {
        return Ok(());
    }
    known[idx(milestone)] = Some(at);
    for &span in Span::ALL {
        let (start, end) = span.ends();
        if start != milestone && end != milestone {
            continue;
        }
        if let (Some(s), Some(e)) = (known[idx(start)], known[idx(end)]) {
            observe_duration(tx, store_id, span, e, e - s).await?;
        }
    }
    if known.iter().all(Option::is_some) {
        tx.execute(
            "DELETE FROM stats_milestones WHERE store_id = $1 AND order_id = $2",
            &[Arg::text(store_id), Arg::text(order_id)],
        )
        .await?;
    } else {
        let c = milestone.column();
        tx.execute(
            &format!(
                "INSERT INTO stats_milestones (store_id, order_id, {c}) VALUES ($1, $2, $3) \
                 ON CONFLICT (store_id, order_id) DO UPDATE SET {c} = excluded.{c}"
            ),
            &[Arg::text(store_id), Arg::text(order_id), Arg::int(at)],
        )
        .await?;
    }
    Ok(())
}

/// Counts one duration of `span` into the histogram and totals of the minute of `end`.
async fn observe_duration(
    tx: &mut Tx,
    store_id: &str,
    span: Span,
    end: i64,
    duration_ms: i64,
) -> Result<(), SqlError> {
    let bucket = minute(end);
    let d = duration_ms.max(0);
    tx.execute(
        "INSERT INTO stats_durations_minute (store_id, bucket_ms, span, bucket_le_ms, count) \
         VALUES ($1, $2, $3, $4, 1) \
         ON CONFLICT (store_id, bucket_ms, span, bucket_le_ms) DO UPDATE SET \
         count = stats_durations_minute.count + 1",
        &[
            Arg::text(store_id),
            Arg::int(bucket),
            Arg::text(span.name()),
            Arg::int(duration_bucket(d)),
        ],
    )
    .await?;
    tx.execute(
        "INSERT INTO stats_duration_totals_minute (store_id, bucket_ms, span, count, sum_ms, max_ms) \
         VALUES ($1, $2, $3, 1, $4, $4) \
         ON CONFLICT (store_id, bucket_ms, span) DO UPDATE SET \
         count = stats_duration_totals_minute.count + 1, \
         sum_ms = stats_duration_totals_minute.sum_ms + excluded.sum_ms, \
         max_ms = CASE WHEN excluded.max_ms > stats_duration_totals_minute.max_ms \
           THEN excluded.max_ms ELSE stats_duration_totals_minute.max_ms END",
        &[
            Arg::text(store_id),
            Arg::int(bucket),
            Arg::text(span.name()),
            Arg::int(d),
        ],
    )
    .await?;
    Ok(())
}

/// Records a SKU's reported level and/or threshold in the stock table, each only if no
/// newer report of it is stored.
async fn observe_stock(
    tx: &mut Tx,
    store_id: &str,
    sku: &str,
    available: Option<i32>,
    threshold: Option<i32>,
    at: i64,
) -> Result<(), SqlError> {
    let row = tx
        .fetch_optional(
            "SELECT available, available_at, threshold, threshold_at, updated_at \
             FROM stock_levels WHERE store_id = $1 AND sku = $2",
            &[Arg::text(store_id), Arg::text(sku)],
            &[Kind::I64, Kind::I64, Kind::I64, Kind::I64, Kind::I64],
        )
        .await?;
    let (mut avail, mut avail_at, mut thr, mut thr_at, mut updated) = (None, None, None, None, at);
    if let Some(r) = &row {
        (avail, avail_at, thr, thr_at) =
            (r.opt_i64(0)?, r.opt_i64(1)?, r.opt_i64(2)?, r.opt_i64(3)?);
        updated = updated.max(r.i64(4)?);
    }
    if let Some(a) = available
        && avail_at.is_none_or(|t| at >= t)
    {
        (avail, avail_at) = (Some(a.into()), Some(at));
    }
    if let Some(t) = threshold
        && thr_at.is_none_or(|x| at >= x)
    {
        (thr, thr_at) = (Some(t.into()), Some(at));
    }
    tx.execute(
        "INSERT INTO stock_levels (store_id, sku, available, available_at, threshold, threshold_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (store_id, sku) DO UPDATE SET available = excluded.available, \
         available_at = excluded.available_at, threshold = excluded.threshold, \
         threshold_at = excluded.threshold_at, updated_at = excluded.updated_at",
        &[
            Arg::text(store_id),
            Arg::text(sku),
            Arg::I64(avail),
            Arg::I64(avail_at),
            Arg::I64(thr),
            Arg::I64(thr_at),
            Arg::int(updated),
        ],
    )
    .await?;
    Ok(())
}

/// Opens an alert, or counts one more occurrence of the active one; `true` if it opened.
async fn open_or_count(
    tx: &mut Tx,
    store_id: &str,
    kind: AlertKind,
    subject: &str,
    at: i64,
    detail: &Value,
) -> Result<bool, SqlError> {
    let counted = tx
        .execute(
            "UPDATE alerts SET occurrences = occurrences + 1, detail = $4, \
             last_seen_at = CASE WHEN $5 > last_seen_at THEN $5 ELSE last_seen_at END \
             WHERE store_id = $1 AND kind = $2 AND subject = $3 AND status <> 'resolved'",
            &[
                Arg::text(store_id),
                Arg::text(kind.as_str()),
                Arg::text(subject),
                Arg::Json(detail.clone()),
                Arg::int(at),
            ],
        )
        .await?;
    if counted > 0 {
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO alerts (store_id, kind, subject, status, opened_at, last_seen_at, occurrences, detail) \
         VALUES ($1, $2, $3, 'open', $4, $4, 1, $5)",
        &[
            Arg::text(store_id),
            Arg::text(kind.as_str()),
            Arg::text(subject),
            Arg::int(at),
            Arg::Json(detail.clone()),
        ],
    )
    .await?;
    Ok(true)
}

/// Resolves the active alert of (store, kind, subject) last seen at or before `at`.
async fn resolve_active(
    tx: &mut Tx,
    store_id: &str,
    kind: AlertKind,
    subject: &str,
    at: i64,
) -> Result<u64, SqlError> {
    Ok(tx
        .execute(
            "UPDATE alerts SET status = 'resolved', resolved_at = $4 \
             WHERE store_id = $1 AND kind = $2 AND subject = $3 AND status <> 'resolved' \
             AND last_seen_at <= $4",
            &[
                Arg::text(store_id),
                Arg::text(kind.as_str()),
                Arg::text(subject),
                Arg::int(at),
            ],
        )
        .await?)
}
