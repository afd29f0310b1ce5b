//! The built-in dashboard: the page at `/` (HTML, CSS and JavaScript in one file embedded
//! in the binary: no build step, nothing fetched from elsewhere), and the routes only it
//! needed — the stores for its picker (`GET /stores`), the order workflow with each hop's
//! throughput and latency (`GET /workflow`), and a live stream of the store's alert
//! changes (`GET /alerts/events`).
//!
//! Invariant: the page holds no data of its own; everything it shows comes from the API's
//! store-scoped routes with the picked store's `X-Store-ID`. The alert stream follows the
//! order stream's conventions: each event's id is a position in the store's change log,
//! and `Last-Event-ID` resumes after it.

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;

use super::orders::query_pairs;
use super::{ApiError, ApiState, QueryParam, RouteSpec, Store};
use crate::sql::dashboard::{HOPS, HopFigures};

/// The page: markup, style and script in one file.
pub const PAGE: &str = include_str!("index.html");

pub const INDEX: RouteSpec = RouteSpec {
    method: "get",
    path: "/",
    summary: "The dashboard page (HTML): metrics, the order workflow, recent orders and live alerts of a picked store",
    scoped: false,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[(200, "The page", Some("text/html"))],
};

pub const STORES: RouteSpec = RouteSpec {
    method: "get",
    path: "/stores",
    summary: "The stores the read side knows (for a store picker), by ID",
    scoped: false,
    idempotent: false,
    query: &[QueryParam {
        name: "limit",
        schema: "integer",
        description: "1 to 1000, default 200",
    }],
    request: None,
    responses: &[
        (200, "Store IDs", Some("StoreList")),
        (400, "A malformed parameter", Some("Error")),
    ],
};

pub const WORKFLOW: RouteSpec = RouteSpec {
    method: "get",
    path: "/workflow",
    summary: "The order workflow: orders now at each status, and each hop's throughput and p50/p95 latency over a window",
    scoped: true,
    idempotent: false,
    query: &[QueryParam {
        name: "window",
        schema: "string",
        description: "how far back hops count: seconds, or a number with s, m, h or d (10s to 30d); default 1h",
    }],
    request: None,
    responses: &[
        (200, "The workflow", Some("Workflow")),
        (400, "A malformed window", Some("Error")),
    ],
};

pub const ALERT_EVENTS: RouteSpec = RouteSpec {
    method: "get",
    path: "/alerts/events",
    summary: "Server-Sent Events of the store's alert openings, status changes and new occurrences; resumable with Last-Event-ID",
    scoped: true,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[
        (
            200,
            "An event stream: each event's id is the change's position, its type the change (opened, acknowledged, resolved, occurred), its data the change with the alert as it is now",
            Some("text/event-stream"),
        ),
        (400, "A malformed Last-Event-ID", Some("Error")),
    ],
};

/// `GET /`.
pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        PAGE,
    )
        .into_response()
}

#[derive(Debug, Serialize)]
pub struct StoreList {
    pub items: Vec<String>,
}

/// `GET /stores?limit=`.
pub async fn stores(
    State(state): State<ApiState>,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut limit = 200u32;
    for (k, v) in query_pairs(raw.as_deref())? {
        match k.as_str() {
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=1000).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request("limit", "limit must be an integer from 1 to 1000")
                    })?;
            }
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!("unknown query parameter {other:?}; this route takes limit"),
                ));
            }
        }
    }
    let items = state.db().stores(limit).await?;
    Ok(Json(StoreList { items }).into_response())
}

/// A window length: `90` (seconds), `90s`, `15m`, `1h`, `7d`; from 10 s to 30 days.
pub fn parse_window(v: &str) -> Result<i64, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "window",
            "window must be seconds, or a number followed by s, m, h or d, from 10s to 30d",
        )
    };
    let (digits, unit_ms) = match v.char_indices().last() {
        Some((i, 's')) => (&v[..i], 1_000),
        Some((i, 'm')) => (&v[..i], 60_000),
        Some((i, 'h')) => (&v[..i], 3_600_000),
        Some((i, 'd')) => (&v[..i], 86_400_000),
        _ => (v, 1_000),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: i64 = digits.parse().map_err(|_| bad())?;
    let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
    if !(10_000..=30 * 86_400_000).contains(&ms) {
        return Err(bad());
    }
    Ok(ms)
}

/// One hop of the workflow over the window.
#[derive(Debug, Serialize)]
pub struct Hop {
    pub from: &'static str,
    pub to: &'static str,
    pub stage: &'static str,
    /// For the two ways to `rejected`: which rejection.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Orders that completed the hop in the window.
    pub count: i64,
    /// `count` per minute of the window.
    pub per_minute: f64,
    pub p50_ms: Option<i64>,
    pub p95_ms: Option<i64>,
}

#[derive(Debug, Serialize)]
pub struct Workflow {
    pub from: i64,
    pub to: i64,
    pub window_ms: i64,
    /// Orders now at each status (all of the store's orders, not only the window's).
    pub statuses: BTreeMap<&'static str, i64>,
    pub hops: Vec<Hop>,
}

/// Every status an order can be in: the nodes of the workflow.
const STATUSES: &[&str] = &[
    "created",
    "screened",
    "reserved",
    "paid",
    "fulfilling",
    "shipped",
    "delivered",
    "rejected",
    "cancelled",
    "refunded",
];

/// `GET /workflow?window=`.
pub async fn workflow(
    State(state): State<ApiState>,
    store: Store,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut window_ms = 3_600_000;
    for (k, v) in query_pairs(raw.as_deref())? {
        match k.as_str() {
            "window" => window_ms = parse_window(&v)?,
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!("unknown query parameter {other:?}; this route takes window"),
                ));
            }
        }
    }
    let to = crate::sql::now_ms();
    let from = to - window_ms;
    let db = state.db();
    let mut statuses: BTreeMap<&'static str, i64> = STATUSES.iter().map(|s| (*s, 0)).collect();
    for (status, n) in db.orders_per_status(&store.0).await? {
        if let Some(known) = STATUSES.iter().find(|s| **s == status) {
            statuses.insert(known, n);
        }
    }
    let figures = db.workflow_hops(&store.0, from, to).await?;
    let minutes = window_ms as f64 / 60_000.0;
    let hops = HOPS
        .iter()
        .zip(figures)
        .map(|(h, f): (_, HopFigures)| Hop {
            from: h.from,
            to: h.to,
            stage: h.stage,
            reason: h.reason,
            count: f.count,
            per_minute: (f.count as f64 / minutes * 100.0).round() / 100.0,
            p50_ms: f.p50_ms,
            p95_ms: f.p95_ms,
        })
        .collect();
    Ok(Json(Workflow {
        from,
        to,
        window_ms,
        statuses,
        hops,
    })
    .into_response())
}

/// How many changes one read of the change log takes.
const CHANGES_PER_READ: u32 = 200;

/// `GET /alerts/events`: the store's alert changes in order — after the one named by
/// `Last-Event-ID` when resuming, all of them otherwise — then each new one as it
/// happens, until the client goes or the server stops.
pub async fn alert_events(
    State(state): State<ApiState>,
    store: Store,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    let start = match headers.get("last-event-id") {
        None => -1,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "Last-Event-ID",
                    "Last-Event-ID must be the id of an event of this stream (a non-negative integer)",
                )
            })?,
    };
    // Fail now, as a JSON error, if the database cannot answer at all.
    state.db().ping().await?;
    Ok(super::stream::follow(
        state,
        start,
        Some(CHANGES_PER_READ as usize),
        "alert changes",
        move |state, after| {
            let store = store.0.clone();
            async move {
                let rows = state
                    .db()
                    .alert_changes_after(&store, after, CHANGES_PER_READ)
                    .await?;
                Ok(rows
                    .into_iter()
                    .map(|change| {
                        let event = SseEvent::default()
                            .id(change.seq.to_string())
                            .event(change.change.clone())
                            .json_data(&change)
                            .unwrap_or_else(|_| {
                                SseEvent::default().comment("unserializable change")
                            });
                        (change.seq, event)
                    })
                    .collect())
            }
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_with_units_and_bounds() {
        assert_eq!(parse_window("90").ok(), Some(90_000));
        assert_eq!(parse_window("90s").ok(), Some(90_000));
        assert_eq!(parse_window("15m").ok(), Some(900_000));
        assert_eq!(parse_window("1h").ok(), Some(3_600_000));
        assert_eq!(parse_window("30d").ok(), Some(30 * 86_400_000));
        for bad in [
            "",
            "m",
            "5",
            "31d",
            "-5m",
            "1.5h",
            "1w",
            "99999999999999999999d",
        ] {
            let e = parse_window(bad).expect_err(bad);
            assert_eq!(e.field.as_deref(), Some("window"), "{bad}");
        }
    }

    #[test]
    fn the_page_is_self_contained() {
        assert!(PAGE.starts_with("<!doctype html>"));
        // Nothing is loaded from elsewhere: no external scripts, styles or fonts.
        for external in [
            "src=\"http",
            "href=\"http",
            "src=\"//",
            "@import",
            "url(http",
        ] {
            assert!(!PAGE.contains(external), "the page refers to {external}");
        }
        for id in [
            "store-picker",
            "metrics",
            "workflow",
            "recent-orders",
            "alerts",
            "order-form",
        ] {
            assert!(PAGE.contains(&format!("id=\"{id}\"")), "no #{id}");
        }
    }
}
