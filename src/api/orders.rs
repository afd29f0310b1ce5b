//! Orders: placing one (`POST /orders`, the producer contract), reading one with its
//! timeline, listing a store's orders, streaming an order's new events (SSE), a manual
//! retry, and a customer's cancellation.
//!
//! Invariant: an order is read, streamed or retried only through `(X-Store-ID, order
//! ID)`; another store's order is indistinguishable from a missing one.
//!
//! # Manual retry
//!
//! The pipeline deduplicates by event ID, so a retry republishes the order's
//! `OrderCreated` with a retry marker (`causation_id = "retry/<n>"`, n = the number of
//! `OrderCreated` rows already in the timeline), which the codec turns into a new event ID
//! derived from (store, order, n): a repeated retry request before the first is seen
//! publishes the same ID again, which the stages drop. Which orders a retry can move is
//! decided by the stages' own per-order records, so only these are retried:
//!
//! - `created` (no screening projected: fraud dead-lettered the order) and `screened`
//!   (no stock decision: inventory dead-lettered the screening). Fraud screens the retry
//!   afresh, and inventory, which keeps no record of an order whose screening it
//!   dead-lettered, reserves it; if the first screening is still on its way after all,
//!   inventory reserves at most once per order, so stock and payment are never doubled.
//! - Only after the order made no progress for `retry_grace`: a younger order may simply
//!   be in flight, and its pending screening could disagree with the retry's.
//!
//! Everything else is a 409 naming the reason: a rejected or cancelled order is closed
//! in inventory (it ignores every later screening of the order, on purpose, so replays
//! never reserve twice) and its payment key at the gateway is spent; an order past its
//! stock decision is retried by the payment stage on its own. Retrying those would need
//! an attempt number in the stages' per-order records and in the gateway key.
//!
//! # Cancellation
//!
//! `POST /orders/{id}/cancel` publishes the order's `OrderCancelled` (its event ID derived
//! from store and order, so repeated requests are one event to the pipeline) unless the
//! read side already shows the order past the point of no return — `ReadyToShip` in its
//! timeline, or shipped, delivered, rejected, cancelled or refunded — which is a 409
//! naming why. The read side may lag: the API's check is a courtesy, and fulfillment,
//! which alone emits `ReadyToShip`, decides; a request that raced past the check is
//! answered in the timeline by `CancellationRefused`.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event as SseEvent, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::{Deserialize, Serialize};

use super::{
    ApiError, ApiState, QueryParam, RouteSpec, Store, fingerprint, idempotency_key, json_object,
    order_path, remember_idempotent, replay_idempotent, typed_body,
};
use crate::events::codec::DecodeHints;
use crate::events::{
    Envelope, Event, EventType, OrderCancelled, RETRY_CAUSATION_PREFIX, order_cancelled_id,
    order_created_id, retry_number,
};
use crate::sql::api::IdempotencyRecord;
use crate::sql::read::TimelineEntry;

pub const PLACE: RouteSpec = RouteSpec {
    method: "post",
    path: "/orders",
    summary: "Place an order (the producer contract's JSON); answers 202 with its tracking URL",
    scoped: true,
    idempotent: true,
    query: &[],
    request: Some("OrderRequest"),
    responses: &[
        (
            202,
            "Accepted: published to order.created",
            Some("Accepted"),
        ),
        (400, "Malformed header or body", Some("Error")),
        (
            422,
            "A rule of the contract is broken, or the Idempotency-Key was used for another body",
            Some("Error"),
        ),
        (
            503,
            "The broker or the database is unavailable",
            Some("Error"),
        ),
    ],
};

pub const LIST: RouteSpec = RouteSpec {
    method: "get",
    path: "/orders",
    summary: "List the store's orders by order ID, optionally by status (keyset pagination)",
    scoped: true,
    idempotent: false,
    query: &[
        QueryParam {
            name: "status",
            schema: "string",
            description: "created, screened, reserved, paid, fulfilling, shipped, delivered, rejected, cancelled or refunded",
        },
        QueryParam {
            name: "limit",
            schema: "integer",
            description: "1 to 500, default 50",
        },
        QueryParam {
            name: "cursor",
            schema: "string",
            description: "next_cursor of the previous page",
        },
        QueryParam {
            name: "sort",
            schema: "string",
            description: "order_id (default, paged) or recent: the newest first, one page of `limit`, no status filter or cursor",
        },
    ],
    request: None,
    responses: &[
        (200, "A page of orders", Some("OrderPage")),
        (400, "A malformed parameter", Some("Error")),
    ],
};

pub const GET: RouteSpec = RouteSpec {
    method: "get",
    path: "/orders/{id}",
    summary: "An order's status and full timeline",
    scoped: true,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[
        (200, "The order and its timeline", Some("OrderWithTimeline")),
        (404, "No such order in this store", Some("Error")),
    ],
};

pub const EVENTS: RouteSpec = RouteSpec {
    method: "get",
    path: "/orders/{id}/events",
    summary: "Server-Sent Events of the order's timeline as it grows; resumable with Last-Event-ID",
    scoped: true,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[
        (
            200,
            "An event stream: each event's id is the timeline entry's event ID, its type the event type, its data the entry",
            Some("text/event-stream"),
        ),
        (404, "No such order in this store", Some("Error")),
    ],
};

pub const CANCEL: RouteSpec = RouteSpec {
    method: "post",
    path: "/orders/{id}/cancel",
    summary: "Ask to cancel an order before it is ready to ship (body {} or {\"reason\": \"...\"}); fulfillment decides, the timeline shows the answer",
    scoped: true,
    idempotent: true,
    query: &[],
    request: Some("CancelRequest"),
    responses: &[
        (
            202,
            "Requested: OrderCancelled published to order.cancelled",
            Some("CancellationRequested"),
        ),
        (400, "Malformed header or body", Some("Error")),
        (404, "No such order in this store", Some("Error")),
        (
            409,
            "Too late (ready to ship or beyond) or the order is over; the message says why",
            Some("Error"),
        ),
        (
            422,
            "A bad reason, or the Idempotency-Key was used for another request",
            Some("Error"),
        ),
        (
            503,
            "The broker or the database is unavailable",
            Some("Error"),
        ),
    ],
};

pub const RETRY: RouteSpec = RouteSpec {
    method: "post",
    path: "/orders/{id}/retry",
    summary: "Republish a stuck order's OrderCreated with a retry marker (see the README for which orders)",
    scoped: true,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[
        (202, "Republished", Some("Retried")),
        (404, "No such order in this store", Some("Error")),
        (
            409,
            "The order is not in a retryable state; the message says why",
            Some("Error"),
        ),
    ],
};

/// The answer to an accepted order.
#[derive(Debug, Clone, Serialize)]
pub struct Accepted {
    pub order_id: String,
    pub event_id: String,
    pub status: &'static str,
    pub tracking_url: String,
}

/// `POST /orders`.
pub async fn place(
    State(state): State<ApiState>,
    store: Store,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let body = json_object(&body)?;
    accept_order(
        &state,
        &store,
        key.as_deref(),
        "POST /orders",
        body,
        str::to_owned,
    )
    .await
}

/// The common path of both order shapes: idempotency, the contract's checks (the
/// codec's, the same the stages apply), publishing, and the 202. `field_name` maps a
/// contract field to the name the client used.
pub(super) async fn accept_order(
    state: &ApiState,
    store: &Store,
    key: Option<&str>,
    route: &str,
    mut order: serde_json::Map<String, serde_json::Value>,
    field_name: fn(&str) -> String,
) -> Result<Response, ApiError> {
    use serde_json::Value as J;
    let print = fingerprint(route, &J::Object(order.clone()));
    if let Some(r) = replay_idempotent(state, store, key, &print).await? {
        return Ok(answer(r));
    }
    // The order belongs to the header's store: the body may repeat it, never change it.
    match order.get("store_id") {
        None => {
            order.insert("store_id".into(), J::String(store.0.clone()));
        }
        Some(J::String(s)) if *s == store.0 => {}
        Some(_) => {
            return Err(ApiError::invalid_field(
                Some(field_name("store_id")),
                "store_id must equal the X-Store-ID header",
            ));
        }
    }
    match order.get("event_type") {
        None => {}
        Some(J::String(t)) if t == EventType::OrderCreated.name() => {}
        Some(_) => {
            return Err(ApiError::invalid_field(
                Some(field_name("event_type")),
                "event_type must be OrderCreated (or left out)",
            ));
        }
    }
    if let Some(J::String(c)) = order.get("causation_id")
        && c.starts_with(RETRY_CAUSATION_PREFIX)
    {
        return Err(ApiError::invalid_field(
            Some(field_name("causation_id")),
            "causation_id values starting with retry/ are reserved for POST /orders/{id}/retry",
        ));
    }
    let bytes = serde_json::to_vec(&order).expect("a JSON map serializes");
    let hints = DecodeHints {
        topic_default: Some(EventType::OrderCreated),
        ..DecodeHints::default()
    };
    let event = state.codec().decode(&bytes, hints).map_err(|e| {
        let mut e = ApiError::from(e);
        e.field = e.field.as_deref().map(field_name);
        e
    })?;
    let Event::OrderCreated(created) = &event else {
        unreachable!("an order.created body decodes as OrderCreated, or fails");
    };
    state.publish(&event).await?;
    let order_id = created.envelope.order_id.clone().unwrap_or_default();
    let accepted = Accepted {
        tracking_url: order_path(&order_id),
        event_id: created.envelope.event_id.clone(),
        order_id,
        status: "accepted",
    };
    let record = IdempotencyRecord {
        fingerprint: print,
        status: StatusCode::ACCEPTED.as_u16(),
        response: serde_json::to_value(&accepted).expect("serializes"),
    };
    Ok(answer(
        remember_idempotent(state, store, key, record).await?,
    ))
}

/// An accepted order's answer (first time or repeated): the status and body recorded,
/// and a `Location` of its tracking URL.
fn answer(r: IdempotencyRecord) -> Response {
    let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::ACCEPTED);
    let location = r
        .response
        .get("tracking_url")
        .and_then(|v| v.as_str())
        .and_then(|s| HeaderValue::from_str(s).ok());
    let mut response = (status, Json(r.response)).into_response();
    if let Some(l) = location {
        response.headers_mut().insert(header::LOCATION, l);
    }
    response
}

/// `GET /orders/{id}`.
pub async fn get(
    State(state): State<ApiState>,
    store: Store,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order = state
        .db()
        .order(&store.0, &id)
        .await?
        .ok_or_else(|| order_not_found(&id))?;
    Ok(Json(order).into_response())
}

fn order_not_found(id: &str) -> ApiError {
    ApiError::not_found(
        "order_not_found",
        format!(
            "this store has no order {id:?} (yet: orders appear once the read side has seen them)"
        ),
    )
}

/// Statuses an order listing can filter by: the stored text of `src/status.rs`.
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

/// Query parameters as (name, value) pairs; a malformed query string is an error of the
/// API's shape.
pub(super) fn query_pairs(raw: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str(raw.unwrap_or_default()).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_parameter",
            format!("malformed query string: {e}"),
        )
    })
}

/// A page of orders.
#[derive(Debug, Serialize)]
pub struct OrderPage {
    pub items: Vec<crate::sql::read::Order>,
    pub next_cursor: Option<String>,
}

/// `GET /orders?status=&limit=&cursor=`.
pub async fn list(
    State(state): State<ApiState>,
    store: Store,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut status = None;
    let mut limit = 50u32;
    let mut cursor = None;
    let mut recent = false;
    for (k, v) in query_pairs(raw.as_deref())? {
        match k.as_str() {
            "status" => {
                if !STATUSES.contains(&v.as_str()) {
                    return Err(ApiError::bad_request(
                        "status",
                        format!("status must be one of {}", STATUSES.join(", ")),
                    ));
                }
                status = Some(v);
            }
            "limit" => {
                limit = v
                    .parse()
                    .ok()
                    .filter(|n| (1..=500).contains(n))
                    .ok_or_else(|| {
                        ApiError::bad_request("limit", "limit must be an integer from 1 to 500")
                    })?;
            }
            "cursor" => {
                if v.is_empty() {
                    return Err(ApiError::bad_request("cursor", "cursor must not be empty"));
                }
                cursor = Some(v);
            }
            "sort" => {
                recent = match v.as_str() {
                    "order_id" => false,
                    "recent" => true,
                    _ => {
                        return Err(ApiError::bad_request(
                            "sort",
                            "sort must be order_id or recent",
                        ));
                    }
                }
            }
            other => {
                return Err(ApiError::bad_request(
                    other,
                    format!(
                        "unknown query parameter {other:?}; this route takes status, limit, cursor, sort"
                    ),
                ));
            }
        }
    }
    if recent {
        // The newest orders are one page: a keyset over a moving "newest" has no stable
        // next page.
        for (name, given) in [("cursor", cursor.is_some()), ("status", status.is_some())] {
            if given {
                return Err(ApiError::bad_request(
                    name,
                    format!("{name} cannot be combined with sort=recent"),
                ));
            }
        }
        let items = state.db().recent_orders(&store.0, limit).await?;
        return Ok(Json(OrderPage {
            items,
            next_cursor: None,
        })
        .into_response());
    }
    let page = state
        .db()
        .orders(&store.0, status.as_deref(), cursor.as_deref(), limit)
        .await?;
    Ok(Json(OrderPage {
        items: page.items,
        next_cursor: page.next,
    })
    .into_response())
}

/// `GET /orders/{id}/events`: the order's timeline rows in arrival order — after the one
/// named by `Last-Event-ID` when resuming, all of them otherwise — then each new row as
/// it arrives, until the client goes or the server stops.
pub async fn events(
    State(state): State<ApiState>,
    store: Store,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Sse<impl Stream<Item = Result<SseEvent, std::convert::Infallible>>>, ApiError> {
    if state.db().order(&store.0, &id).await?.is_none() {
        return Err(order_not_found(&id));
    }
    let last = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let start = match last {
        Some(event_id) => state
            .db()
            .arrival_seq(&store.0, &id, &event_id)
            .await?
            .unwrap_or(-1),
        None => -1,
    };
    let order = id;
    Ok(super::stream::follow(
        state,
        start,
        None,
        "a timeline",
        move |state, after| {
            let (store, order) = (store.0.clone(), order.clone());
            async move {
                let rows = state.db().timeline_after_seq(&store, &order, after).await?;
                Ok(rows
                    .into_iter()
                    .map(|r| {
                        let event = SseEvent::default()
                            .id(r.entry.event_id.clone())
                            .event(r.entry.event_type.clone())
                            .json_data(&r.entry)
                            .unwrap_or_else(|_| {
                                SseEvent::default().comment("unserializable entry")
                            });
                        (r.seq, event)
                    })
                    .collect())
            }
        },
    ))
}

/// The longest cancellation reason accepted, in characters.
pub const MAX_CANCEL_REASON: usize = 500;

/// The body of `POST /orders/{id}/cancel`; empty is `{}`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct CancelRequest {
    #[serde(default)]
    reason: Option<String>,
}

/// The answer to a cancellation request.
#[derive(Debug, Serialize)]
pub struct CancellationRequested {
    pub order_id: String,
    pub event_id: String,
    pub status: &'static str,
    pub tracking_url: String,
}

/// `POST /orders/{id}/cancel` (see the module documentation).
pub async fn cancel(
    State(state): State<ApiState>,
    store: Store,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let request: CancelRequest = if body.iter().all(u8::is_ascii_whitespace) {
        CancelRequest::default()
    } else {
        typed_body(&body)?
    };
    let reason = match request.reason {
        Some(r) if r.chars().count() > MAX_CANCEL_REASON => {
            return Err(ApiError::invalid_field(
                Some("reason".into()),
                format!("reason must be at most {MAX_CANCEL_REASON} characters"),
            ));
        }
        Some(r) if r.trim().is_empty() => None,
        r => r,
    };
    let route = format!("POST {}/cancel", order_path(&id));
    let print = fingerprint(&route, &serde_json::json!({ "reason": reason }));
    if let Some(r) = replay_idempotent(&state, &store, key.as_deref(), &print).await? {
        return Ok(answer(r));
    }
    let order = state
        .db()
        .order(&store.0, &id)
        .await?
        .ok_or_else(|| order_not_found(&id))?;
    let too_late = |why: &str| ApiError::conflict("not_cancellable", why.to_owned());
    let seen = |t: EventType| order.timeline.iter().any(|e| e.event_type == t.name());
    let status = order.order.status.map(|s| s.as_str()).unwrap_or("unknown");
    match status {
        "shipped" => return Err(too_late("the order has already shipped")),
        "delivered" => return Err(too_late("the order has already been delivered")),
        "cancelled" => return Err(too_late("the order is already cancelled")),
        "rejected" => {
            return Err(too_late(
                "the order was rejected; there is nothing to cancel",
            ));
        }
        "refunded" => return Err(too_late("the order was already refunded")),
        _ if seen(EventType::ReadyToShip) || seen(EventType::CancellationRefused) => {
            return Err(too_late(
                "the order is already ready to ship (as good as shipped) and can no longer be cancelled",
            ));
        }
        _ => {}
    }
    // The order's own flow, so the request traces with it.
    let correlation_id = order
        .timeline
        .iter()
        .find_map(|e| e.payload.get("correlation_id")?.as_str().map(str::to_owned))
        .unwrap_or_else(|| id.clone());
    let event = Event::OrderCancelled(OrderCancelled {
        envelope: Envelope {
            event_id: order_cancelled_id(&store.0, &id).to_string(),
            order_id: Some(id.clone()),
            store_id: store.0.clone(),
            correlation_id,
            causation_id: None,
            occurred_at: crate::sql::now_ms(),
            schema_version: 1,
        },
        reason,
    });
    // A request already in the timeline is not published again: the pipeline would drop
    // it by its ID anyway, and its content (the reason) must stay the first one's.
    if !seen(EventType::OrderCancelled) {
        state.publish(&event).await?;
    }
    let requested = CancellationRequested {
        order_id: id.clone(),
        event_id: event.envelope().event_id.clone(),
        status: "cancellation_requested",
        tracking_url: order_path(&id),
    };
    let record = IdempotencyRecord {
        fingerprint: print,
        status: StatusCode::ACCEPTED.as_u16(),
        response: serde_json::to_value(&requested).expect("serializes"),
    };
    Ok(answer(
        remember_idempotent(&state, &store, key.as_deref(), record).await?,
    ))
}

/// The answer to a retry.
#[derive(Debug, Serialize)]
pub struct Retried {
    pub order_id: String,
    pub retry: u32,
    pub event_id: String,
    pub tracking_url: String,
}

/// `POST /orders/{id}/retry` (see the module documentation for which orders).
pub async fn retry(
    State(state): State<ApiState>,
    store: Store,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let order = state
        .db()
        .order(&store.0, &id)
        .await?
        .ok_or_else(|| order_not_found(&id))?;
    let not_retryable = |why: String| ApiError::conflict("not_retryable", why);
    let created: Vec<&TimelineEntry> = order
        .timeline
        .iter()
        .filter(|e| e.event_type == EventType::OrderCreated.name())
        .collect();
    let original_id = order_created_id(&store.0, &id).to_string();
    let Some(original) = created.iter().find(|e| e.event_id == original_id) else {
        return Err(not_retryable(
            "the order's OrderCreated is not in its timeline, so there is nothing to republish"
                .into(),
        ));
    };
    let status = order.order.status.map(|s| s.as_str()).unwrap_or("unknown");
    match status {
        "created" | "screened" => {}
        "rejected" | "cancelled" => {
            return Err(not_retryable(format!(
                "the order is {status}: inventory has closed it and ignores any later screening of it, \
                 so a retry would change nothing; place a new order instead"
            )));
        }
        "reserved" => {
            return Err(not_retryable(
                "the order has its stock reserved: the payment stage retries it on its own".into(),
            ));
        }
        other => {
            return Err(not_retryable(format!(
                "the order is {other}: it is past the steps a retry repeats"
            )));
        }
    }
    let idle_ms = crate::sql::now_ms().saturating_sub(order.order.updated_at);
    let grace_ms = i64::try_from(state.options().retry_grace.as_millis()).unwrap_or(i64::MAX);
    if idle_ms < grace_ms {
        return Err(not_retryable(format!(
            "the order is {status} and changed {}s ago; it may still be in flight, retry after {}s without progress",
            idle_ms / 1000,
            grace_ms / 1000
        )));
    }
    let mut event = Event::from_json_value(EventType::OrderCreated, original.payload.clone())
        .map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "corrupt_timeline",
                format!("the stored OrderCreated does not decode: {e}"),
            )
        })?;
    // Retries already made, as far as the read side has seen: the next one's number.
    let n = u32::try_from(created.len()).unwrap_or(u32::MAX);
    let env = event.envelope_mut();
    env.causation_id = Some(format!("{RETRY_CAUSATION_PREFIX}{n}"));
    // Through the codec's own normalization, so the ID is the one every stage derives.
    let bytes = state.codec().encode(&event).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "encode_failed",
            e.to_string(),
        )
    })?;
    event = state
        .codec()
        .decode(&bytes, DecodeHints::default())
        .map_err(ApiError::from)?;
    debug_assert_eq!(retry_number(event.envelope()), Some(n));
    state.publish(&event).await?;
    Ok((
        StatusCode::ACCEPTED,
        Json(Retried {
            order_id: id.clone(),
            retry: n,
            event_id: event.envelope().event_id.clone(),
            tracking_url: order_path(&id),
        }),
    )
        .into_response())
}
