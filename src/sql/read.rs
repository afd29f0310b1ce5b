//! Read queries over the sinks' tables, for the HTTP API and operators.
//!
//! Invariant: every query takes a store ID and filters by it first — no query of one
//! store can return another store's rows — and listings page by key (keyset
//! pagination), never by offset, so a page is as cheap as the first.

use serde::Serialize;

use crate::status::OrderStatus;
use crate::views::{AlertKind, Counter, DURATION_BUCKETS_MS, OVERFLOW_LE_MS, Span};

use super::{Arg, Db, Kind, Row, SqlError, Tx};

/// An `orders` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Order {
    pub store_id: String,
    pub order_id: String,
    pub customer_id: Option<String>,
    pub status: Option<OrderStatus>,
    pub total_cents: Option<i64>,
    pub currency: Option<String>,
    pub created_at: Option<i64>,
    pub screened_at: Option<i64>,
    pub reserved_at: Option<i64>,
    pub paid_at: Option<i64>,
    pub shipped_at: Option<i64>,
    pub delivered_at: Option<i64>,
    pub rejected_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub delivery_failed_at: Option<i64>,
    pub refunded_at: Option<i64>,
    pub last_event_id: String,
    pub last_event_type: String,
    pub last_event_at: i64,
    pub updated_at: i64,
}

pub(super) const ORDER_COLUMNS: &str = "store_id, order_id, customer_id, status, rejection_reason, \
    total_cents, currency, created_at, screened_at, reserved_at, paid_at, shipped_at, \
    delivered_at, rejected_at, cancelled_at, delivery_failed_at, refunded_at, \
    last_event_id, last_event_type, last_event_at, updated_at";

pub(super) const ORDER_KINDS: &[Kind] = &[
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::I64,
    Kind::Text,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::Text,
    Kind::Text,
    Kind::I64,
    Kind::I64,
];

pub(super) fn order(r: &Row) -> Result<Order, SqlError> {
    let status = match r.opt_text(3)? {
        Some(s) => {
            let reason = r.opt_text(4)?;
            Some(
                OrderStatus::from_parts(&s, reason.as_deref())
                    .ok_or_else(|| SqlError::Corrupt(format!("order status {s:?}")))?,
            )
        }
        None => None,
    };
    Ok(Order {
        store_id: r.text(0)?,
        order_id: r.text(1)?,
        customer_id: r.opt_text(2)?,
        status,
        total_cents: r.opt_i64(5)?,
        currency: r.opt_text(6)?,
        created_at: r.opt_i64(7)?,
        screened_at: r.opt_i64(8)?,
        reserved_at: r.opt_i64(9)?,
        paid_at: r.opt_i64(10)?,
        shipped_at: r.opt_i64(11)?,
        delivered_at: r.opt_i64(12)?,
        rejected_at: r.opt_i64(13)?,
        cancelled_at: r.opt_i64(14)?,
        delivery_failed_at: r.opt_i64(15)?,
        refunded_at: r.opt_i64(16)?,
        last_event_id: r.text(17)?,
        last_event_type: r.text(18)?,
        last_event_at: r.i64(19)?,
        updated_at: r.i64(20)?,
    })
}

/// A row of an order's timeline.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TimelineEntry {
    pub event_id: String,
    pub event_type: String,
    pub stage: String,
    pub topic: String,
    pub occurred_at: i64,
    pub payload: serde_json::Value,
}

/// An order with its events, oldest first.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OrderWithTimeline {
    pub order: Order,
    pub timeline: Vec<TimelineEntry>,
}

/// One page of a listing, and the cursor of the next page if there may be one.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// A `stats_minute` row.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StatsMinute {
    pub time: i64,
    /// Counter values, in the order of [`Counter::ALL`].
    pub counters: Vec<(Counter, i64)>,
}

impl StatsMinute {
    pub fn get(&self, c: Counter) -> i64 {
        self.counters
            .iter()
            .find(|(k, _)| *k == c)
            .map_or(0, |(_, v)| *v)
    }
}

/// Durations of one span over a time range, read back from the histogram.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DurationSummary {
    pub count: i64,
    pub sum_ms: i64,
    pub max_ms: i64,
    /// `sum_ms / count`; `None` without observations.
    pub avg_ms: Option<f64>,
    /// Upper bound of the histogram bucket holding the 95th percentile (`i64::MAX`: above
    /// every bound); `None` without observations.
    pub p95_le_ms: Option<i64>,
    /// (bucket upper bound, observations) for every bound, overflow last.
    pub buckets: Vec<(i64, i64)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertStatus {
    Open,
    Acknowledged,
    Resolved,
}

impl AlertStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertStatus::Open => "open",
            AlertStatus::Acknowledged => "acknowledged",
            AlertStatus::Resolved => "resolved",
        }
    }

    fn parse(s: &str) -> Result<AlertStatus, SqlError> {
        Ok(match s {
            "open" => AlertStatus::Open,
            "acknowledged" => AlertStatus::Acknowledged,
            "resolved" => AlertStatus::Resolved,
            other => return Err(SqlError::Corrupt(format!("alert status {other:?}"))),
        })
    }
}

/// An `alerts` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    pub id: i64,
    pub store_id: String,
    pub kind: AlertKind,
    pub subject: String,
    pub status: AlertStatus,
    pub opened_at: i64,
    pub acknowledged_at: Option<i64>,
    pub resolved_at: Option<i64>,
    pub last_seen_at: i64,
    pub occurrences: i64,
    pub detail: serde_json::Value,
}

pub(super) const ALERT_COLUMNS: &str = "id, store_id, kind, subject, status, opened_at, acknowledged_at, \
    resolved_at, last_seen_at, occurrences, detail";
pub(super) const ALERT_KINDS: &[Kind] = &[
    Kind::I64,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::Text,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::I64,
    Kind::Json,
];

fn alert(r: &Row) -> Result<Alert, SqlError> {
    alert_at(r, 0)
}

/// The alert whose [`ALERT_COLUMNS`] start at column `base` of `r`.
pub(super) fn alert_at(r: &Row, base: usize) -> Result<Alert, SqlError> {
    let kind = r.text(base + 2)?;
    Ok(Alert {
        id: r.i64(base)?,
        store_id: r.text(base + 1)?,
        kind: AlertKind::from_name(&kind)
            .ok_or_else(|| SqlError::Corrupt(format!("alert kind {kind:?}")))?,
        subject: r.text(base + 3)?,
        status: AlertStatus::parse(&r.text(base + 4)?)?,
        opened_at: r.i64(base + 5)?,
        acknowledged_at: r.opt_i64(base + 6)?,
        resolved_at: r.opt_i64(base + 7)?,
        last_seen_at: r.i64(base + 8)?,
        occurrences: r.i64(base + 9)?,
        detail: r.json(base + 10)?,
    })
}

pub(super) async fn alert_in(
    tx: &mut Tx,
    store_id: &str,
    id: i64,
) -> Result<Option<Alert>, SqlError> {
    tx.fetch_optional(
        &format!("SELECT {ALERT_COLUMNS} FROM alerts WHERE store_id = $1 AND id = $2"),
        &[Arg::text(store_id), Arg::int(id)],
        ALERT_KINDS,
    )
    .await?
    .map(|r| alert(&r))
    .transpose()
}

/// A SKU's last reported stock.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StockLevel {
    pub sku: String,
    pub available: Option<i64>,
    pub threshold: Option<i64>,
    pub updated_at: i64,
}

impl Db {
    /// One order of a store with its timeline; `None` if the store has no such order.
    pub async fn order(
        &self,
        store_id: &str,
        order_id: &str,
    ) -> Result<Option<OrderWithTimeline>, SqlError> {
        let mut tx = self.begin_read().await?;
        let Some(row) = tx
            .fetch_optional(
                &format!(
                    "SELECT {ORDER_COLUMNS} FROM orders WHERE store_id = $1 AND order_id = $2"
                ),
                &[Arg::text(store_id), Arg::text(order_id)],
                ORDER_KINDS,
            )
            .await?
        else {
            tx.commit().await?;
            return Ok(None);
        };
        let timeline = tx
            .fetch_all(
                "SELECT event_id, event_type, stage, topic, occurred_at, payload FROM order_events \
                 WHERE store_id = $1 AND order_id = $2 ORDER BY occurred_at, event_id",
                &[Arg::text(store_id), Arg::text(order_id)],
                &[
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                    Kind::I64,
                    Kind::Json,
                ],
            )
            .await?
            .iter()
            .map(|r| {
                Ok(TimelineEntry {
                    event_id: r.text(0)?,
                    event_type: r.text(1)?,
                    stage: r.text(2)?,
                    topic: r.text(3)?,
                    occurred_at: r.i64(4)?,
                    payload: r.json(5)?,
                })
            })
            .collect::<Result<Vec<_>, SqlError>>()?;
        tx.commit().await?;
        Ok(Some(OrderWithTimeline {
            order: order(&row)?,
            timeline,
        }))
    }

    /// A store's orders, by order ID, optionally only those in `status` (the stored text:
    /// `paid`, `rejected`, …), `limit` at a time starting after the cursor `after`.
    pub async fn orders(
        &self,
        store_id: &str,
        status: Option<&str>,
        after: Option<&str>,
        limit: u32,
    ) -> Result<Page<Order>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                &format!(
                    "SELECT {ORDER_COLUMNS} FROM orders WHERE store_id = $1 \
                     AND ($2 IS NULL OR status = $2) AND ($3 IS NULL OR order_id > $3) \
                     ORDER BY order_id LIMIT $4"
                ),
                &[
                    Arg::text(store_id),
                    Arg::Text(status.map(str::to_owned)),
                    Arg::Text(after.map(str::to_owned)),
                    Arg::int(limit.into()),
                ],
                ORDER_KINDS,
            )
            .await?;
        tx.commit().await?;
        let items = rows.iter().map(order).collect::<Result<Vec<_>, _>>()?;
        let next = (items.len() == limit as usize && limit > 0)
            .then(|| items.last().map(|o| o.order_id.clone()))
            .flatten();
        Ok(Page { items, next })
    }

    /// The store's orders per status (the gauge): (status, count), by status.
    pub async fn orders_per_status(&self, store_id: &str) -> Result<Vec<(String, i64)>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                "SELECT status, COUNT(*) FROM orders WHERE store_id = $1 AND status IS NOT NULL \
                 GROUP BY status ORDER BY status",
                &[Arg::text(store_id)],
                &[Kind::Text, Kind::I64],
            )
            .await?;
        tx.commit().await?;
        rows.iter().map(|r| Ok((r.text(0)?, r.i64(1)?))).collect()
    }

    /// The store's `stats_minute` rows with `from_ms <= time < to_ms`, oldest first.
    pub async fn stats(
        &self,
        store_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<StatsMinute>, SqlError> {
        let columns: Vec<&str> = Counter::ALL.iter().map(|c| c.column()).collect();
        let mut kinds = vec![Kind::I64];
        kinds.extend(Counter::ALL.iter().map(|_| Kind::I64));
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                &format!(
                    "SELECT bucket_ms, {} FROM stats_minute WHERE store_id = $1 \
                     AND bucket_ms >= $2 AND bucket_ms < $3 ORDER BY bucket_ms",
                    columns.join(", ")
                ),
                &[Arg::text(store_id), Arg::int(from_ms), Arg::int(to_ms)],
                &kinds,
            )
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                Ok(StatsMinute {
                    time: r.i64(0)?,
                    counters: Counter::ALL
                        .iter()
                        .enumerate()
                        .map(|(i, c)| Ok((*c, r.i64(i + 1)?)))
                        .collect::<Result<_, SqlError>>()?,
                })
            })
            .collect()
    }

    /// Revenue per currency of the store with `from_ms <= time < to_ms`:
    /// (currency, authorized cents, refunded cents).
    pub async fn revenue(
        &self,
        store_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<(String, i64, i64)>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                "SELECT currency, CAST(SUM(revenue_authorized_cents) AS BIGINT), \
                 CAST(SUM(refunded_cents) AS BIGINT) FROM stats_revenue_minute \
                 WHERE store_id = $1 AND bucket_ms >= $2 AND bucket_ms < $3 \
                 GROUP BY currency ORDER BY currency",
                &[Arg::text(store_id), Arg::int(from_ms), Arg::int(to_ms)],
                &[Kind::Text, Kind::I64, Kind::I64],
            )
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| Ok((r.text(0)?, r.i64(1)?, r.i64(2)?)))
            .collect()
    }

    /// Count, average and 95th-percentile bucket of `span` durations that ended in
    /// `from_ms <= time < to_ms`.
    pub async fn durations(
        &self,
        store_id: &str,
        span: Span,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<DurationSummary, SqlError> {
        let args = [
            Arg::text(store_id),
            Arg::text(span.name()),
            Arg::int(from_ms),
            Arg::int(to_ms),
        ];
        let mut tx = self.begin_read().await?;
        let totals = tx
            .fetch_one(
                "SELECT CAST(COALESCE(SUM(count), 0) AS BIGINT), \
                 CAST(COALESCE(SUM(sum_ms), 0) AS BIGINT), COALESCE(MAX(max_ms), 0) \
                 FROM stats_duration_totals_minute \
                 WHERE store_id = $1 AND span = $2 AND bucket_ms >= $3 AND bucket_ms < $4",
                &args,
                &[Kind::I64, Kind::I64, Kind::I64],
            )
            .await?;
        let rows = tx
            .fetch_all(
                "SELECT bucket_le_ms, CAST(SUM(count) AS BIGINT) FROM stats_durations_minute \
                 WHERE store_id = $1 AND span = $2 AND bucket_ms >= $3 AND bucket_ms < $4 \
                 GROUP BY bucket_le_ms",
                &args,
                &[Kind::I64, Kind::I64],
            )
            .await?;
        tx.commit().await?;
        let mut buckets: Vec<(i64, i64)> = DURATION_BUCKETS_MS
            .iter()
            .chain(std::iter::once(&OVERFLOW_LE_MS))
            .map(|&le| (le, 0))
            .collect();
        for r in &rows {
            let le = r.i64(0)?;
            let slot = buckets
                .iter_mut()
                .find(|(b, _)| *b == le)
                .ok_or_else(|| SqlError::Corrupt(format!("histogram bound {le}")))?;
            slot.1 += r.i64(1)?;
        }
        let (count, sum_ms, max_ms) = (totals.i64(0)?, totals.i64(1)?, totals.i64(2)?);
        Ok(DurationSummary {
            count,
            sum_ms,
            max_ms,
            avg_ms: (count > 0).then(|| sum_ms as f64 / count as f64),
            p95_le_ms: percentile_bucket(&buckets, 0.95),
            buckets,
        })
    }

    /// The store's alerts, newest first; only those in `status` if given.
    pub async fn alerts(
        &self,
        store_id: &str,
        status: Option<AlertStatus>,
        limit: u32,
    ) -> Result<Vec<Alert>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                &format!(
                    "SELECT {ALERT_COLUMNS} FROM alerts WHERE store_id = $1 \
                     AND ($2 IS NULL OR status = $2) ORDER BY opened_at DESC, id DESC LIMIT $3"
                ),
                &[
                    Arg::text(store_id),
                    Arg::Text(status.map(|s| s.as_str().to_owned())),
                    Arg::int(limit.into()),
                ],
                ALERT_KINDS,
            )
            .await?;
        tx.commit().await?;
        rows.iter().map(alert).collect()
    }

    /// The store's SKUs by last reported stock; only those at or below their threshold
    /// when `low_only`.
    pub async fn stock_levels(
        &self,
        store_id: &str,
        low_only: bool,
    ) -> Result<Vec<StockLevel>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                "SELECT sku, available, threshold, updated_at FROM stock_levels \
                 WHERE store_id = $1 AND ($2 = 0 OR available <= threshold) ORDER BY sku",
                &[Arg::text(store_id), Arg::int(i64::from(low_only))],
                &[Kind::Text, Kind::I64, Kind::I64, Kind::I64],
            )
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                Ok(StockLevel {
                    sku: r.text(0)?,
                    available: r.opt_i64(1)?,
                    threshold: r.opt_i64(2)?,
                    updated_at: r.i64(3)?,
                })
            })
            .collect()
    }
}

/// The upper bound of the bucket holding quantile `q` of a (non-cumulative) histogram.
pub fn percentile_bucket(buckets: &[(i64, i64)], q: f64) -> Option<i64> {
    let total: i64 = buckets.iter().map(|(_, n)| n).sum();
    if total == 0 {
        return None;
    }
    // The rank of the quantile's observation, 1-based: ceil(q * total).
    let rank = (q * total as f64).ceil().max(1.0) as i64;
    let mut seen = 0;
    buckets.iter().find_map(|&(le, n)| {
        seen += n;
        (seen >= rank).then_some(le)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_buckets() {
        assert_eq!(percentile_bucket(&[(100, 0), (250, 0)], 0.95), None);
        let h = [(100, 90), (250, 5), (500, 5)];
        assert_eq!(percentile_bucket(&h, 0.95), Some(250));
        assert_eq!(percentile_bucket(&h, 0.96), Some(500));
        assert_eq!(percentile_bucket(&h, 0.5), Some(100));
        assert_eq!(percentile_bucket(&[(100, 1)], 0.95), Some(100));
    }
}
