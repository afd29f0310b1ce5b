//! Dashboard metrics (`GET /stats`) and the alert lifecycle (`GET /alerts`, acknowledge,
//! resolve), from the stats and alerts sinks' tables.
//!
//! Invariant: every read and every action is the store's own; an alert of another store
//! is a 404, like a missing one.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use super::orders::query_pairs;
use super::{ApiError, ApiState, QueryParam, RouteSpec, Store};
use crate::sql::read::{AlertStatus, DurationSummary};
use crate::views::{Counter, Span};

pub const STATS: RouteSpec = RouteSpec {
    method: "get",
    path: "/stats",
    summary: "The store's per-minute counters, revenue per currency and durations over [from, to)",
    scoped: true,
    idempotent: false,
    query: &[
        QueryParam {
            name: "from",
            schema: "string",
            description: "start (RFC 3339 or ms since the epoch); default: an hour before `to`",
        },
        QueryParam {
            name: "to",
            schema: "string",
            description: "end, exclusive (RFC 3339 or ms since the epoch); default: now",
        },
    ],
    request: None,
    responses: &[
        (200, "The metrics", Some("Stats")),
        (400, "A malformed or empty range", Some("Error")),
    ],
};

pub const ALERTS: RouteSpec = RouteSpec {
    method: "get",
    path: "/alerts",
    summary: "The store's alerts, newest first",
    scoped: true,
    idempotent: false,
    query: &[
        QueryParam {
            name: "status",
            schema: "string",
            description: "open, acknowledged or resolved",
        },
        QueryParam {
            name: "limit",
            schema: "integer",
            description: "1 to 500, default 100",
        },
    ],
    request: None,
    responses: &[
        (200, "Alerts", Some("AlertList")),
        (400, "A malformed parameter", Some("Error")),
    ],
};

pub const ACKNOWLEDGE: RouteSpec = RouteSpec {
    method: "post",
    path: "/alerts/{id}/acknowledge",
    summary: "Acknowledge an open alert (acknowledging again changes nothing)",
    scoped: true,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[
        (200, "The alert after the action", Some("Alert")),
        (404, "No such alert in this store", Some("Error")),
        (409, "The alert is resolved", Some("Error")),
    ],
};

pub const RESOLVE: RouteSpec = RouteSpec {
    method: "post",
    path: "/alerts/{id}/resolve",
    summary: "Resolve an active alert",
    scoped: true,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[
        (200, "The alert after the action", Some("Alert")),
        (404, "No such alert in this store", Some("Error")),
        (409, "The alert is already resolved", Some("Error")),
    ],
};

/// A time given as milliseconds since the epoch or an RFC 3339 timestamp.
fn parse_time(field: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(ms) = v.parse::<i64>() {
        return Ok(ms);
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .map(|t| t.timestamp_millis())
        .map_err(|_| {
            ApiError::bad_request(
                field,
                format!("{field} must be an RFC 3339 timestamp or milliseconds since the epoch"),
            )
        })
}

#[derive(Debug, Serialize)]
pub struct Minute {
    pub time: i64,
    pub counters: BTreeMap<&'static str, i64>,
}

#[derive(Debug, Serialize)]
pub struct Revenue {
    pub currency: String,
    pub authorized_cents: i64,
    pub refunded_cents: i64,
}

#[derive(Debug, Serialize)]
pub struct Stats {
    pub from: i64,
    pub to: i64,
    /// Every counter summed over the range.
    pub totals: BTreeMap<&'static str, i64>,
    pub minutes: Vec<Minute>,
    pub revenue: Vec<Revenue>,
    pub durations: BTreeMap<&'static str, DurationSummary>,
}

/// `GET /stats?from=&to=`.
pub async fn stats(
    State(state): State<ApiState>,
    store: Store,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut from, mut to) = (None, None);
    for (k, v) in query_pairs(raw.as_deref())? {
        match k.as_str() {
            "from" => from = Some(parse_time("from", &v)?),
            "to" => to = Some(parse_time("to", &v)?),
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!("unknown query parameter {other:?}; this route takes from, to"),
                ));
            }
        }
    }
    let to = to.unwrap_or_else(crate::sql::now_ms);
    let from = from.unwrap_or(to.saturating_sub(3_600_000));
    if from >= to {
        return Err(ApiError::bad_request("from", "from must be before to"));
    }
    let db = state.db();
    let rows = db.stats(&store.0, from, to).await?;
    let mut totals: BTreeMap<&'static str, i64> =
        Counter::ALL.iter().map(|c| (c.column(), 0)).collect();
    let minutes = rows
        .iter()
        .map(|m| Minute {
            time: m.time,
            counters: m
                .counters
                .iter()
                .map(|(c, v)| {
                    *totals.entry(c.column()).or_default() += v;
                    (c.column(), *v)
                })
                .collect(),
        })
        .collect();
    let revenue = db
        .revenue(&store.0, from, to)
        .await?
        .into_iter()
        .map(|(currency, authorized_cents, refunded_cents)| Revenue {
            currency,
            authorized_cents,
            refunded_cents,
        })
        .collect();
    let mut durations = BTreeMap::new();
    for span in Span::ALL {
        durations.insert(span.name(), db.durations(&store.0, *span, from, to).await?);
    }
    Ok(Json(Stats {
        from,
        to,
        totals,
        minutes,
        revenue,
        durations,
    })
    .into_response())
}

#[derive(Debug, Serialize)]
pub struct AlertList {
    pub items: Vec<crate::sql::read::Alert>,
}

/// `GET /alerts?status=&limit=`.
pub async fn alerts(
    State(state): State<ApiState>,
    store: Store,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut status = None;
    let mut limit = 100u32;
    for (k, v) in query_pairs(raw.as_deref())? {
        match k.as_str() {
            "status" => {
                status = Some(match v.as_str() {
                    "open" => AlertStatus::Open,
                    "acknowledged" => AlertStatus::Acknowledged,
                    "resolved" => AlertStatus::Resolved,
                    _ => {
                        return Err(ApiError::bad_request(
                            "status",
                            "status must be open, acknowledged or resolved",
                        ));
                    }
                })
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=500).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request("limit", "limit must be an integer from 1 to 500")
                    })?
            }
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!("unknown query parameter {other:?}; this route takes status, limit"),
                ));
            }
        }
    }
    let items = state.db().alerts(&store.0, status, limit).await?;
    Ok(Json(AlertList { items }).into_response())
}

fn alert_id(raw: &str) -> Result<i64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad_request("id", "an alert ID is an integer"))
}

/// `POST /alerts/{id}/acknowledge`.
pub async fn acknowledge(
    State(state): State<ApiState>,
    store: Store,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let alert = state.db().acknowledge(&store.0, alert_id(&id)?).await?;
    Ok(Json(alert).into_response())
}

/// `POST /alerts/{id}/resolve`.
pub async fn resolve(
    State(state): State<ApiState>,
    store: Store,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let alert = state.db().resolve(&store.0, alert_id(&id)?).await?;
    Ok(Json(alert).into_response())
}
