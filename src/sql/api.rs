//! What the HTTP API keeps and reads beyond the sinks' tables: its idempotency records,
//! an order's timeline in arrival order (for live streams), and a readiness probe.
//!
//! Invariant: like every read query, each of these takes a store ID and filters by it
//! first, so one store's key or stream can never meet another store's rows.

use super::read::TimelineEntry;
use super::{Arg, Db, Kind, SqlError, now_ms};

/// The answer the API gave to the first request with an idempotency key.
#[derive(Debug, Clone, PartialEq)]
pub struct IdempotencyRecord {
    /// What identifies the request (route and body), to tell a repeat from a reuse.
    pub fingerprint: String,
    pub status: u16,
    pub response: serde_json::Value,
}

/// A timeline row with its arrival sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrivedEntry {
    pub seq: i64,
    pub entry: TimelineEntry,
}

impl Db {
    /// The record of `key` for the store, if a request with it was answered before.
    pub async fn idempotency_record(
        &self,
        store_id: &str,
        key: &str,
    ) -> Result<Option<IdempotencyRecord>, SqlError> {
        let mut tx = self.begin_read().await?;
        let row = tx
            .fetch_optional(
                "SELECT fingerprint, status, response FROM api_idempotency \
                 WHERE store_id = $1 AND idempotency_key = $2",
                &[Arg::text(store_id), Arg::text(key)],
                &[Kind::Text, Kind::I64, Kind::Json],
            )
            .await?;
        tx.commit().await?;
        row.map(|r| {
            Ok(IdempotencyRecord {
                fingerprint: r.text(0)?,
                status: u16::try_from(r.i64(1)?)
                    .map_err(|_| SqlError::Corrupt("idempotency status".into()))?,
                response: r.json(2)?,
            })
        })
        .transpose()
    }

    /// Records the answer to the first request with `key`; if another request recorded
    /// one first (a concurrent repeat), keeps that one and returns it.
    pub async fn record_idempotency(
        &self,
        store_id: &str,
        key: &str,
        record: &IdempotencyRecord,
    ) -> Result<IdempotencyRecord, SqlError> {
        let mut tx = self.begin().await?;
        tx.execute(
            "INSERT INTO api_idempotency \
             (store_id, idempotency_key, fingerprint, status, response, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (store_id, idempotency_key) DO NOTHING",
            &[
                Arg::text(store_id),
                Arg::text(key),
                Arg::text(&record.fingerprint),
                Arg::int(i64::from(record.status)),
                Arg::Json(record.response.clone()),
                Arg::int(now_ms()),
            ],
        )
        .await?;
        tx.commit().await?;
        self.idempotency_record(store_id, key)
            .await?
            .ok_or_else(|| SqlError::Corrupt("idempotency record vanished".into()))
    }

    /// The arrival sequence of the store's order's timeline row `event_id`, if it has one:
    /// where a stream resumed with `Last-Event-ID` continues.
    pub async fn arrival_seq(
        &self,
        store_id: &str,
        order_id: &str,
        event_id: &str,
    ) -> Result<Option<i64>, SqlError> {
        let mut tx = self.begin_read().await?;
        let row = tx
            .fetch_optional(
                "SELECT seq FROM order_events                  WHERE store_id = $1 AND order_id = $2 AND event_id = $3",
                &[Arg::text(store_id), Arg::text(order_id), Arg::text(event_id)],
                &[Kind::I64],
            )
            .await?;
        tx.commit().await?;
        row.map(|r| r.i64(0)).transpose()
    }

    /// The order's timeline rows that arrived after sequence `after_seq` (`-1`: all), in
    /// arrival order.
    pub async fn timeline_after_seq(
        &self,
        store_id: &str,
        order_id: &str,
        after_seq: i64,
    ) -> Result<Vec<ArrivedEntry>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                "SELECT seq, event_id, event_type, stage, topic, occurred_at, payload \
                 FROM order_events WHERE store_id = $1 AND order_id = $2 AND seq > $3 \
                 ORDER BY seq",
                &[
                    Arg::text(store_id),
                    Arg::text(order_id),
                    Arg::int(after_seq),
                ],
                &[
                    Kind::I64,
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                    Kind::Text,
                    Kind::I64,
                    Kind::Json,
                ],
            )
            .await?;
        tx.commit().await?;
        rows.iter()
            .map(|r| {
                Ok(ArrivedEntry {
                    seq: r.i64(0)?,
                    entry: TimelineEntry {
                        event_id: r.text(1)?,
                        event_type: r.text(2)?,
                        stage: r.text(3)?,
                        topic: r.text(4)?,
                        occurred_at: r.i64(5)?,
                        payload: r.json(6)?,
                    },
                })
            })
            .collect()
    }

    /// A round trip to the database: what readiness checks.
    pub async fn ping(&self) -> Result<(), SqlError> {
        let mut tx = self.begin_read().await?;
        // (A bare `1` is an INT4 on PostgreSQL.)
        tx.fetch_one("SELECT CAST(1 AS BIGINT)", &[], &[Kind::I64])
            .await?;
        tx.commit().await?;
        Ok(())
    }
}
