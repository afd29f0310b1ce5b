//! Liveness (`/healthz`), readiness (`/readyz`: the broker and the database answer),
//! Prometheus metrics (`/metrics`) and the OpenAPI 3 document (`/openapi.json`), which
//! is generated from [`ROUTES`](super::ROUTES) — the same table the router is built
//! from — and the schemas below.
//!
//! Invariant: the document lists exactly the served operations; a test requests every
//! documented operation and checks that the router serves it.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{ApiError, ApiState, ROUTES, RouteSpec};

pub const HEALTHZ: RouteSpec = RouteSpec {
    method: "get",
    path: "/healthz",
    summary: "Liveness: the process answers",
    scoped: false,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[(200, "Alive", Some("Health"))],
};

pub const READYZ: RouteSpec = RouteSpec {
    method: "get",
    path: "/readyz",
    summary: "Readiness: the broker and the database answer",
    scoped: false,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[
        (200, "Ready", Some("Health")),
        (
            503,
            "The broker or the database does not answer",
            Some("Error"),
        ),
    ],
};

pub const METRICS: RouteSpec = RouteSpec {
    method: "get",
    path: "/metrics",
    summary: "Prometheus metrics of the API process",
    scoped: false,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[(200, "Prometheus text format", Some("text/plain"))],
};

pub const OPENAPI: RouteSpec = RouteSpec {
    method: "get",
    path: "/openapi.json",
    summary: "This document",
    scoped: false,
    idempotent: false,
    query: &[],
    request: None,
    responses: &[(200, "The OpenAPI 3 document", Some("application/json"))],
};

/// `GET /healthz`.
pub async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

/// `GET /readyz`.
pub async fn readyz(State(state): State<ApiState>) -> Result<Json<Value>, ApiError> {
    state.db().ping().await.map_err(|e| {
        ApiError::unavailable(
            "database_unavailable",
            format!("the database does not answer: {e}"),
        )
    })?;
    let producer = state.inner.producer.clone();
    tokio::task::spawn_blocking(move || {
        use rdkafka::producer::Producer;
        producer
            .client()
            .fetch_metadata(None, Duration::from_secs(3))
            .map(|_| ())
    })
    .await
    .map_err(|e| ApiError::unavailable("broker_unavailable", e.to_string()))?
    .map_err(|e| {
        ApiError::unavailable(
            "broker_unavailable",
            format!("the broker does not answer: {e}"),
        )
    })?;
    Ok(Json(json!({"status": "ready"})))
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics().render(),
    )
        .into_response()
}

/// `GET /openapi.json`.
pub async fn openapi() -> Json<Value> {
    Json(document())
}

/// The OpenAPI 3.0 document of [`ROUTES`].
pub fn document() -> Value {
    let mut paths = serde_json::Map::new();
    for spec in ROUTES {
        let item = paths
            .entry(spec.path.to_owned())
            .or_insert_with(|| json!({}));
        item[spec.method] = operation(spec);
    }
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "OrderFlow API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Orders, inventory commands, stats and alerts of one store per request (X-Store-ID). Errors: {\"error\": {\"code\", \"message\", \"field\"}}."
        },
        "paths": paths,
        "components": {"schemas": schemas()},
    })
}

fn operation(spec: &RouteSpec) -> Value {
    let mut parameters = Vec::new();
    for segment in spec.path.split('/') {
        if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            parameters.push(
                json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}),
            );
        }
    }
    if spec.scoped {
        parameters.push(json!({"name": "X-Store-ID", "in": "header", "required": true,
            "description": "The store (tenant) the request is scoped to", "schema": {"type": "string"}}));
    }
    if spec.idempotent {
        parameters.push(json!({"name": "Idempotency-Key", "in": "header", "required": false,
            "description": "The same key with the same body gets the same answer; with another body, a 422", "schema": {"type": "string"}}));
    }
    if spec.path.ends_with("/events") {
        let description = if spec.path.starts_with("/alerts") {
            "Resume after this alert change (an event's id)"
        } else {
            "Resume after this timeline event ID"
        };
        parameters.push(
            json!({"name": "Last-Event-ID", "in": "header", "required": false,
            "description": description, "schema": {"type": "string"}}),
        );
    }
    for q in spec.query {
        parameters.push(json!({"name": q.name, "in": "query", "required": false,
            "description": q.description, "schema": {"type": q.schema}}));
    }
    let mut responses = serde_json::Map::new();
    for (status, description, schema) in spec.responses {
        let content = match schema {
            None => None,
            Some(media) if media.contains('/') => {
                Some(json!({(*media): {"schema": {"type": "string"}}}))
            }
            Some(name) => Some(
                json!({"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}),
            ),
        };
        let mut r = json!({"description": description});
        if let Some(c) = content {
            r["content"] = c;
        }
        responses.insert(status.to_string(), r);
    }
    let mut op = json!({
        "summary": spec.summary,
        "operationId": operation_id(spec),
        "parameters": parameters,
        "responses": responses,
    });
    if let Some(name) = spec.request {
        op["requestBody"] = json!({"required": true, "content": {"application/json": {"schema": {"$ref": format!("#/components/schemas/{name}")}}}});
    }
    op
}

/// `post /orders/{id}/retry` → `post_orders_id_retry`.
fn operation_id(spec: &RouteSpec) -> String {
    let mut id = spec.method.to_owned();
    for part in spec.path.split(|c: char| !c.is_ascii_alphanumeric()) {
        if !part.is_empty() {
            id.push('_');
            id.push_str(part);
        }
    }
    id
}

fn string() -> Value {
    json!({"type": "string"})
}
fn integer() -> Value {
    json!({"type": "integer", "format": "int64"})
}
fn nullable(mut v: Value) -> Value {
    v["nullable"] = json!(true);
    v
}
fn object(required: &[&str], properties: Value) -> Value {
    json!({"type": "object", "required": required, "properties": properties})
}

/// The schemas of the request and response bodies, one per type the handlers read or
/// answer with.
fn schemas() -> Value {
    let timestamp =
        json!({"oneOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}]});
    let order_line = object(
        &["sku", "quantity", "unit_price_cents"],
        json!({"sku": string(), "quantity": {"type": "integer", "minimum": 1},
               "unit_price_cents": {"type": "integer", "minimum": 0}}),
    );
    let order = object(
        &[
            "store_id",
            "order_id",
            "last_event_id",
            "last_event_type",
            "last_event_at",
            "updated_at",
        ],
        json!({
            "store_id": string(), "order_id": string(), "customer_id": nullable(string()),
            "status": {"nullable": true, "description": "\"paid\", or {\"rejected\": \"fraud\" | \"out_of_stock\"}"},
            "total_cents": nullable(integer()), "currency": nullable(string()),
            "created_at": nullable(integer()), "screened_at": nullable(integer()),
            "reserved_at": nullable(integer()), "paid_at": nullable(integer()),
            "shipped_at": nullable(integer()), "delivered_at": nullable(integer()),
            "rejected_at": nullable(integer()), "cancelled_at": nullable(integer()),
            "delivery_failed_at": nullable(integer()), "refunded_at": nullable(integer()),
            "last_event_id": string(), "last_event_type": string(),
            "last_event_at": integer(), "updated_at": integer()
        }),
    );
    let timeline_entry = object(
        &[
            "event_id",
            "event_type",
            "stage",
            "topic",
            "occurred_at",
            "payload",
        ],
        json!({"event_id": string(), "event_type": string(), "stage": string(), "topic": string(),
               "occurred_at": integer(), "payload": {"type": "object"}}),
    );
    let alert = object(
        &[
            "id",
            "store_id",
            "kind",
            "subject",
            "status",
            "opened_at",
            "last_seen_at",
            "occurrences",
            "detail",
        ],
        json!({"id": integer(), "store_id": string(),
               "kind": {"type": "string", "enum": ["low_stock", "payment_exhausted", "gateway_outage", "dead_letters"]},
               "subject": string(), "status": {"type": "string", "enum": ["open", "acknowledged", "resolved"]},
               "opened_at": integer(), "acknowledged_at": nullable(integer()), "resolved_at": nullable(integer()),
               "last_seen_at": integer(), "occurrences": integer(), "detail": {"type": "object"}}),
    );
    let duration = object(
        &["count", "sum_ms", "max_ms", "buckets"],
        json!({"count": integer(), "sum_ms": integer(), "max_ms": integer(),
               "avg_ms": {"type": "number", "nullable": true}, "p95_le_ms": nullable(integer()),
               "buckets": {"type": "array", "items": {"type": "array", "items": integer()}}}),
    );
    json!({
        "Error": object(&["error"], json!({"error": object(&["code", "message"],
            json!({"code": string(), "message": string(), "field": string()}))})),
        "OrderLine": order_line,
        "OrderRequest": object(
            &["order_id", "customer_id", "email", "currency", "shipping_country", "items", "placed_at"],
            json!({"order_id": string(), "store_id": {"type": "string", "description": "optional; must equal X-Store-ID"},
                   "customer_id": string(), "email": string(),
                   "currency": {"type": "string", "pattern": "^[A-Z]{3}$"}, "shipping_country": string(),
                   "items": {"type": "array", "minItems": 1, "items": {"$ref": "#/components/schemas/OrderLine"}},
                   "placed_at": timestamp, "correlation_id": string(), "occurred_at": timestamp})),
        "LegacyOrderRequest": object(
            &["orderId", "customer", "currency", "items", "placedAt"],
            json!({"orderId": string(), "storeId": string(),
                   "customer": object(&["id", "email", "shippingCountry"],
                       json!({"id": string(), "email": string(), "shippingCountry": string()})),
                   "currency": string(),
                   "items": {"type": "array", "minItems": 1, "items": object(&["sku", "quantity", "unitPrice"],
                       json!({"sku": string(), "quantity": {"type": "integer", "minimum": 1},
                              "unitPrice": {"type": "string", "pattern": "^[0-9]+(\\.[0-9]{1,2})?$"}}))},
                   "placedAt": timestamp, "correlationId": string()})),
        "Accepted": object(&["order_id", "event_id", "status", "tracking_url"],
            json!({"order_id": string(), "event_id": string(), "status": {"type": "string", "enum": ["accepted"]},
                   "tracking_url": string()})),
        "Retried": object(&["order_id", "retry", "event_id", "tracking_url"],
            json!({"order_id": string(), "retry": integer(), "event_id": string(), "tracking_url": string()})),
        "CancelRequest": object(&[], json!({"reason": {"type": "string", "maxLength": 500}})),
        "CancellationRequested": object(&["order_id", "event_id", "status", "tracking_url"],
            json!({"order_id": string(), "event_id": string(),
                   "status": {"type": "string", "enum": ["cancellation_requested"]},
                   "tracking_url": string()})),
        "Order": order,
        "TimelineEntry": timeline_entry,
        "OrderWithTimeline": object(&["order", "timeline"],
            json!({"order": {"$ref": "#/components/schemas/Order"},
                   "timeline": {"type": "array", "items": {"$ref": "#/components/schemas/TimelineEntry"}}})),
        "OrderPage": object(&["items"],
            json!({"items": {"type": "array", "items": {"$ref": "#/components/schemas/Order"}},
                   "next_cursor": nullable(string())})),
        "DurationSummary": duration,
        "Stats": object(&["from", "to", "totals", "minutes", "revenue", "durations"],
            json!({"from": integer(), "to": integer(),
                   "totals": {"type": "object", "additionalProperties": integer()},
                   "minutes": {"type": "array", "items": object(&["time", "counters"],
                       json!({"time": integer(), "counters": {"type": "object", "additionalProperties": integer()}}))},
                   "revenue": {"type": "array", "items": object(&["currency", "authorized_cents", "refunded_cents"],
                       json!({"currency": string(), "authorized_cents": integer(), "refunded_cents": integer()}))},
                   "durations": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/DurationSummary"}}})),
        "Alert": alert,
        "AlertList": object(&["items"], json!({"items": {"type": "array", "items": {"$ref": "#/components/schemas/Alert"}}})),
        "RestockRequest": object(&["quantity"], json!({"quantity": {"type": "integer", "minimum": 1}, "note": string()})),
        "ThresholdRequest": object(&["threshold"], json!({"threshold": {"type": "integer", "minimum": 0}})),
        "CommandAccepted": object(&["event_id", "event_type", "sku"],
            json!({"event_id": string(), "event_type": string(), "sku": string()})),
        "StockLevels": object(&["items"], json!({"items": {"type": "array", "items": object(&["sku", "updated_at"],
            json!({"sku": string(), "available": nullable(integer()), "threshold": nullable(integer()), "updated_at": integer()}))}})),
        "Health": object(&["status"], json!({"status": string()})),
        "StoreList": object(&["items"], json!({"items": {"type": "array", "items": string()}})),
        "Workflow": object(&["from", "to", "window_ms", "statuses", "hops"],
            json!({"from": integer(), "to": integer(), "window_ms": integer(),
                   "statuses": {"type": "object", "additionalProperties": integer(),
                                "description": "orders now at each status"},
                   "hops": {"type": "array", "items": object(
                       &["from", "to", "stage", "count", "per_minute"],
                       json!({"from": string(), "to": string(), "stage": string(),
                              "reason": {"type": "string", "enum": ["fraud", "out_of_stock"]},
                              "count": integer(), "per_minute": {"type": "number"},
                              "p50_ms": nullable(integer()), "p95_ms": nullable(integer())}))}})),
    })
}

/// Every `$ref` in `v`, for the test that each names a defined schema.
pub fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, x) in m {
                if k == "$ref"
                    && let Value::String(s) = x
                {
                    out.push(s.clone());
                }
                refs(x, out);
            }
        }
        Value::Array(a) => a.iter().for_each(|x| refs(x, out)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route_once_and_every_ref_resolves() {
        let doc = document();
        let mut listed = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in item.as_object().expect("a path item").keys() {
                listed.push((method.clone(), path.clone()));
            }
        }
        listed.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|r| (r.method.to_owned(), r.path.to_owned()))
            .collect();
        routes.sort();
        assert_eq!(listed, routes);
        let mut all = Vec::new();
        refs(&doc, &mut all);
        assert!(!all.is_empty());
        for r in all {
            let name = r
                .strip_prefix("#/components/schemas/")
                .expect("a schema ref");
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "{r} is not defined"
            );
        }
        // The store header is documented on every scoped route.
        let retry = &doc["paths"]["/orders/{id}/retry"]["post"]["parameters"];
        assert!(
            retry
                .as_array()
                .expect("parameters")
                .iter()
                .any(|p| p["name"] == "X-Store-ID")
        );
    }
}
