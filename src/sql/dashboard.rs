//! Read queries of the dashboard: the stores the read side knows, the order workflow
//! (orders waiting at each step, and each hop's throughput and latency) computed from the
//! `orders` table's milestone timestamps, and the alert change log behind the live alert
//! stream.
//!
//! Invariant: like every read query, each takes a store ID and filters by it first; only
//! [`Db::stores`], the list a store picker offers, spans stores, and it returns IDs only.
//! Percentiles are exact (nearest rank over the hop's durations, with window functions
//! both PostgreSQL and SQLite have), not histogram bounds.

use serde::Serialize;

use super::read::{
    ALERT_COLUMNS, ALERT_KINDS, Alert, ORDER_COLUMNS, ORDER_KINDS, Order, alert_at, order,
};
use super::{Arg, Db, Kind, SqlError};

/// One hop of the workflow: an order moving from one milestone to the next, done by one
/// stage (or ending the order early).
#[derive(Debug, Clone, Copy)]
pub struct HopSpec {
    /// The status the order leaves.
    pub from: &'static str,
    /// The status the order reaches.
    pub to: &'static str,
    /// Who moves it: a stage, or `saga` for a cancellation and its compensation.
    pub stage: &'static str,
    /// The `orders` columns of the two milestones.
    pub start: &'static str,
    pub end: &'static str,
    /// The rejection reason this hop is about, for the two ways to `rejected`.
    pub reason: Option<&'static str>,
}

/// Every hop the dashboard draws: the happy path first, then the exits.
pub const HOPS: &[HopSpec] = &[
    hop("created", "screened", "fraud", "created_at", "screened_at"),
    hop(
        "screened",
        "reserved",
        "inventory",
        "screened_at",
        "reserved_at",
    ),
    hop("reserved", "paid", "payment", "reserved_at", "paid_at"),
    hop("paid", "shipped", "fulfillment", "paid_at", "shipped_at"),
    hop(
        "shipped",
        "delivered",
        "delivery",
        "shipped_at",
        "delivered_at",
    ),
    HopSpec {
        reason: Some("fraud"),
        ..hop("created", "rejected", "fraud", "created_at", "rejected_at")
    },
    HopSpec {
        reason: Some("out_of_stock"),
        ..hop(
            "screened",
            "rejected",
            "inventory",
            "screened_at",
            "rejected_at",
        )
    },
    // A failed payment or a customer's cancellation, whenever it happens: measured from
    // the order's creation.
    hop("created", "cancelled", "saga", "created_at", "cancelled_at"),
    hop("paid", "refunded", "saga", "paid_at", "refunded_at"),
];

const fn hop(
    from: &'static str,
    to: &'static str,
    stage: &'static str,
    start: &'static str,
    end: &'static str,
) -> HopSpec {
    HopSpec {
        from,
        to,
        stage,
        start,
        end,
        reason: None,
    }
}

/// What the orders of one hop did in a window.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HopFigures {
    /// Orders that completed the hop in the window (its end milestone inside it).
    pub count: i64,
    /// Median duration of those, milliseconds; `None` without any.
    pub p50_ms: Option<i64>,
    /// 95th percentile (nearest rank), milliseconds; `None` without any.
    pub p95_ms: Option<i64>,
}

/// One change of an alert, with the alert as it is now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertChange {
    pub seq: i64,
    /// `opened`, `acknowledged`, `resolved`, or `occurred`.
    pub change: String,
    pub changed_at: i64,
    pub alert: Alert,
}

impl Db {
    /// Every store the read side has seen (orders, stock levels, alerts or stats), by ID,
    /// at most `limit`.
    pub async fn stores(&self, limit: u32) -> Result<Vec<String>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                "SELECT store_id FROM (SELECT DISTINCT store_id FROM orders \
                 UNION SELECT DISTINCT store_id FROM stock_levels \
                 UNION SELECT DISTINCT store_id FROM alerts \
                 UNION SELECT DISTINCT store_id FROM stats_minute) AS known \
                 ORDER BY store_id LIMIT $1",
                &[Arg::int(limit.into())],
                &[Kind::Text],
            )
            .await?;
        tx.commit().await?;
        rows.iter().map(|r| r.text(0)).collect()
    }

    /// The store's `limit` most recently created orders, newest first (an order known only
    /// from side events, without a creation time, is not listed).
    pub async fn recent_orders(&self, store_id: &str, limit: u32) -> Result<Vec<Order>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                &format!(
                    "SELECT {ORDER_COLUMNS} FROM orders \
                     WHERE store_id = $1 AND created_at IS NOT NULL \
                     ORDER BY created_at DESC, order_id DESC LIMIT $2"
                ),
                &[Arg::text(store_id), Arg::int(limit.into())],
                ORDER_KINDS,
            )
            .await?;
        tx.commit().await?;
        rows.iter().map(order).collect()
    }

    /// The figures of each of [`HOPS`] (same order) over orders whose hop ended in
    /// `[from_ms, to_ms)`.
    pub async fn workflow_hops(
        &self,
        store_id: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<HopFigures>, SqlError> {
        let mut tx = self.begin_read().await?;
        let mut out = Vec::with_capacity(HOPS.len());
        for h in HOPS {
            // Nearest rank: the ceil(q * n)-th smallest, as integer arithmetic.
            let reason = if h.reason.is_some() {
                " AND rejection_reason = $4"
            } else {
                " AND $4 IS NULL"
            };
            let sql = format!(
                "WITH d AS (SELECT {end} - {start} AS ms FROM orders \
                 WHERE store_id = $1 AND {start} IS NOT NULL \
                 AND {end} >= $2 AND {end} < $3{reason}), \
                 r AS (SELECT ms, ROW_NUMBER() OVER (ORDER BY ms) AS rn, COUNT(*) OVER () AS n FROM d) \
                 SELECT CAST(COUNT(*) AS BIGINT), \
                 MAX(CASE WHEN rn = (50 * n + 99) / 100 THEN ms END), \
                 MAX(CASE WHEN rn = (95 * n + 99) / 100 THEN ms END) FROM r",
                start = h.start,
                end = h.end,
            );
            let row = tx
                .fetch_one(
                    &sql,
                    &[
                        Arg::text(store_id),
                        Arg::int(from_ms),
                        Arg::int(to_ms),
                        Arg::Text(h.reason.map(str::to_owned)),
                    ],
                    &[Kind::I64, Kind::I64, Kind::I64],
                )
                .await?;
            out.push(HopFigures {
                count: row.i64(0)?,
                p50_ms: row.opt_i64(1)?,
                p95_ms: row.opt_i64(2)?,
            });
        }
        tx.commit().await?;
        Ok(out)
    }

    /// The store's alert changes after `after_seq` (`-1`: all), oldest first, at most
    /// `limit`.
    pub async fn alert_changes_after(
        &self,
        store_id: &str,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<AlertChange>, SqlError> {
        let columns: Vec<String> = ALERT_COLUMNS
            .split(", ")
            .map(|c| format!("a.{}", c.trim()))
            .collect();
        let mut kinds = vec![Kind::I64, Kind::Text, Kind::I64];
        kinds.extend_from_slice(ALERT_KINDS);
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                &format!(
                    "SELECT c.seq, c.change, c.changed_at, {} FROM alert_changes c \
                     JOIN alerts a ON a.id = c.alert_id AND a.store_id = c.store_id \
                     WHERE c.store_id = $1 AND c.seq > $2 ORDER BY c.seq LIMIT $3",
                    columns.join(", ")
                ),
                &[
                    Arg::text(store_id),
                    Arg::int(after_seq),
                    Arg::int(limit.into()),
                ],
                &kinds,
            )
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                Ok(AlertChange {
                    seq: r.i64(0)?,
                    change: r.text(1)?,
                    changed_at: r.i64(2)?,
                    alert: alert_at(r, 3)?,
                })
            })
            .collect()
    }
}
