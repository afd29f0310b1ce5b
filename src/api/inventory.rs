//! Stock commands (`POST /inventory/{sku}/restock`, `PUT /inventory/{sku}/threshold`),
//! published to `inventory.commands` keyed by store, and stock levels (`GET /inventory`)
//! from the alerts sink's `stock_levels`.
//!
//! Invariant: a command is checked by the codec's rules before it is published, so the
//! inventory stage never dead-letters what the API accepted. A restock is an increment:
//! with an `Idempotency-Key` its event ID is derived from (store, key), so a repeated
//! request is one restock; without one, every request is a new restock.

use axum::Json;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use super::orders::query_pairs;
use super::{
    ApiError, ApiState, QueryParam, RouteSpec, Store, fingerprint, idempotency_key,
    remember_idempotent, replay_idempotent, typed_body,
};
use crate::events::codec::validate;
use crate::events::{Envelope, Event, ID_NAMESPACE, StockRestocked, ThresholdSet};
use crate::sql::api::IdempotencyRecord;

pub const RESTOCK: RouteSpec = RouteSpec {
    method: "post",
    path: "/inventory/{sku}/restock",
    summary: "Add units of a SKU (StockRestocked to inventory.commands)",
    scoped: true,
    idempotent: true,
    query: &[],
    request: Some("RestockRequest"),
    responses: &[
        (202, "Published", Some("CommandAccepted")),
        (400, "Malformed header or body", Some("Error")),
        (
            422,
            "quantity is not positive, or the Idempotency-Key was used for another body",
            Some("Error"),
        ),
        (503, "The broker is unavailable", Some("Error")),
    ],
};

pub const THRESHOLD: RouteSpec = RouteSpec {
    method: "put",
    path: "/inventory/{sku}/threshold",
    summary: "Set a SKU's low-stock threshold (ThresholdSet to inventory.commands)",
    scoped: true,
    idempotent: false,
    query: &[],
    request: Some("ThresholdRequest"),
    responses: &[
        (202, "Published", Some("CommandAccepted")),
        (400, "Malformed header or body", Some("Error")),
        (422, "threshold is negative", Some("Error")),
        (503, "The broker is unavailable", Some("Error")),
    ],
};

pub const LEVELS: RouteSpec = RouteSpec {
    method: "get",
    path: "/inventory",
    summary: "The store's SKUs by last reported stock",
    scoped: true,
    idempotent: false,
    query: &[QueryParam {
        name: "below_threshold",
        schema: "boolean",
        description: "true: only SKUs at or below their threshold",
    }],
    request: None,
    responses: &[
        (200, "Stock levels", Some("StockLevels")),
        (400, "A malformed parameter", Some("Error")),
    ],
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestockRequest {
    pub quantity: i32,
    #[serde(default)]
    pub note: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ThresholdRequest {
    pub threshold: i32,
}

#[derive(Debug, Serialize)]
pub struct CommandAccepted {
    pub event_id: String,
    pub event_type: &'static str,
    pub sku: String,
}

fn check_sku(sku: &str) -> Result<(), ApiError> {
    if sku.trim().is_empty() || sku.len() > 256 {
        return Err(ApiError::bad_request("sku", "a SKU is 1 to 256 characters"));
    }
    Ok(())
}

fn envelope(store: &Store, event_id: uuid::Uuid) -> Envelope {
    Envelope {
        event_id: event_id.to_string(),
        order_id: None,
        store_id: store.0.clone(),
        correlation_id: event_id.to_string(),
        causation_id: None,
        occurred_at: crate::sql::now_ms(),
        schema_version: 1,
    }
}

/// Checks a command by the codec's rules, publishes it and answers 202.
async fn publish_command(
    state: &ApiState,
    event: Event,
    sku: &str,
) -> Result<CommandAccepted, ApiError> {
    validate(&event).map_err(ApiError::from)?;
    state.publish(&event).await?;
    Ok(CommandAccepted {
        event_id: event.envelope().event_id.clone(),
        event_type: event.event_type().name(),
        sku: sku.to_owned(),
    })
}

/// `POST /inventory/{sku}/restock`.
pub async fn restock(
    State(state): State<ApiState>,
    store: Store,
    Path(sku): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_sku(&sku)?;
    let key = idempotency_key(&headers)?;
    let request: RestockRequest = typed_body(&body)?;
    let print = fingerprint(
        &format!("POST /inventory/{sku}/restock"),
        &serde_json::json!({"quantity": request.quantity, "note": request.note}),
    );
    if let Some(r) = replay_idempotent(&state, &store, key.as_deref(), &print).await? {
        let status = StatusCode::from_u16(r.status).unwrap_or(StatusCode::ACCEPTED);
        return Ok((status, Json(r.response)).into_response());
    }
    let id = match &key {
        Some(k) => uuid::Uuid::new_v5(
            &ID_NAMESPACE,
            format!("api/restock/{}/{k}", store.0).as_bytes(),
        ),
        None => uuid::Uuid::new_v4(),
    };
    let event = Event::StockRestocked(StockRestocked {
        envelope: envelope(&store, id),
        sku: sku.clone(),
        quantity: request.quantity,
        note: request.note,
    });
    let accepted = publish_command(&state, event, &sku).await?;
    let record = IdempotencyRecord {
        fingerprint: print,
        status: StatusCode::ACCEPTED.as_u16(),
        response: serde_json::to_value(&accepted).expect("serializes"),
    };
    let r = remember_idempotent(&state, &store, key.as_deref(), record).await?;
    Ok((StatusCode::ACCEPTED, Json(r.response)).into_response())
}

/// `PUT /inventory/{sku}/threshold`: setting the same threshold twice has one effect.
pub async fn threshold(
    State(state): State<ApiState>,
    store: Store,
    Path(sku): Path<String>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    check_sku(&sku)?;
    let request: ThresholdRequest = typed_body(&body)?;
    let event = Event::ThresholdSet(ThresholdSet {
        envelope: envelope(&store, uuid::Uuid::new_v4()),
        sku: sku.clone(),
        threshold: request.threshold,
    });
    let accepted = publish_command(&state, event, &sku).await?;
    Ok((StatusCode::ACCEPTED, Json(accepted)).into_response())
}

#[derive(Debug, Serialize)]
pub struct StockLevels {
    pub items: Vec<crate::sql::read::StockLevel>,
}

/// `GET /inventory?below_threshold=true`.
pub async fn levels(
    State(state): State<ApiState>,
    store: Store,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let mut low_only = false;
    for (k, v) in query_pairs(raw.as_deref())? {
        match (k.as_str(), v.as_str()) {
            ("below_threshold", "true") => low_only = true,
            ("below_threshold", "false") => low_only = false,
            ("below_threshold", _) => {
                return Err(ApiError::bad_request(
                    "below_threshold",
                    "below_threshold must be true or false",
                ));
            }
            (other, _) => {
                return Err(ApiError::bad_request(
                    other,
                    format!("unknown query parameter {other:?}; this route takes below_threshold"),
                ));
            }
        }
    }
    let items = state.db().stock_levels(&store.0, low_only).await?;
    Ok(Json(StockLevels { items }).into_response())
}
