//! The HTTP API (`orderflow api`): a producer of orders and inventory commands, and a
//! reader of the SQL read side, for shop front ends and operators.
//!
//! - [`orders`]: placing orders (and the legacy shape, [`legacy`]), reading them, their
//!   live event stream, manual retry.
//! - [`stats`]: dashboard metrics and the alert lifecycle.
//! - [`inventory`]: stock commands and stock levels.
//! - [`dashboard`]: the built-in dashboard page, and the store list, workflow and live
//!   alert stream it shows.
//! - [`health`]: liveness, readiness, Prometheus metrics and the OpenAPI document.
//! - [`error`]: the one error shape.
//!
//! Invariants: every resource route is scoped by the `X-Store-ID` header — a query, a
//! stream, a retry, an idempotency key only ever meets that store's data, and another
//! store's order is answered exactly as a missing one (404). The router and the OpenAPI
//! document are both built from [`ROUTES`], so what is served is what is documented.

pub mod dashboard;
pub mod error;
pub mod health;
pub mod inventory;
pub mod legacy;
pub mod orders;
pub mod stats;
mod stream;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::MethodRouter;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::events::Event;
use crate::events::codec::Codec;
use crate::metrics::ApiMetrics;
use crate::sql::Db;
use crate::sql::api::IdempotencyRecord;
use crate::topics::{self, Topics};

pub use error::ApiError;

/// The header that scopes every request to one store (tenant).
pub const STORE_HEADER: &str = "x-store-id";
/// The header that makes a `POST` safe to repeat.
pub const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Knobs of the API that are not settings of the deployment.
#[derive(Debug, Clone)]
pub struct ApiOptions {
    /// How often a live event stream looks for new timeline rows.
    pub stream_poll: Duration,
    /// How long an order must have made no progress before a manual retry may republish
    /// it: a younger order may simply be in flight (see [`orders`]'s retry).
    pub retry_grace: Duration,
    /// How long publishing waits for the broker's acknowledgement.
    pub publish_timeout: Duration,
}

impl Default for ApiOptions {
    fn default() -> Self {
        ApiOptions {
            stream_poll: Duration::from_millis(250),
            retry_grace: Duration::from_secs(30),
            publish_timeout: Duration::from_secs(10),
        }
    }
}

/// What every handler shares.
#[derive(Clone)]
pub struct ApiState {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    producer: FutureProducer,
    topics: Topics,
    codec: Codec,
    metrics: ApiMetrics,
    options: ApiOptions,
    /// Ends live streams when the server shuts down (they would hold it open).
    shutdown: CancellationToken,
}

impl ApiState {
    pub fn new(
        settings: &Settings,
        db: Db,
        options: ApiOptions,
        shutdown: CancellationToken,
    ) -> Result<ApiState, rdkafka::error::KafkaError> {
        let producer =
            crate::simulator::publish::producer(settings, "api").map_err(|e| match e {
                crate::simulator::SimError::Client(k) => k,
                other => rdkafka::error::KafkaError::ClientCreation(other.to_string()),
            })?;
        Ok(ApiState {
            inner: Arc::new(Inner {
                db,
                producer,
                topics: settings.topics(),
                codec: Codec::new(),
                metrics: ApiMetrics::new(),
                options,
                shutdown,
            }),
        })
    }

    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    pub fn metrics(&self) -> &ApiMetrics {
        &self.inner.metrics
    }

    fn codec(&self) -> &Codec {
        &self.inner.codec
    }

    fn options(&self) -> &ApiOptions {
        &self.inner.options
    }

    /// Publishes `event` Avro-encoded to its topic, keyed by its store, and waits for the
    /// broker's acknowledgement (the producer is idempotent: its own retries never
    /// duplicate a record).
    async fn publish(&self, event: &Event) -> Result<(), ApiError> {
        let base = topics::topic_of(event.event_type());
        let topic = self.inner.topics.name(base);
        let value = self.codec().encode(event).map_err(|e| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "encode_failed",
                format!("cannot encode {}: {e}", event.event_type()),
            )
        })?;
        let env = event.envelope();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "event-type",
                value: Some(event.event_type().name()),
            })
            .insert(Header {
                key: "correlation-id",
                value: Some(env.correlation_id.as_str()),
            });
        let record = FutureRecord::to(&topic)
            .key(env.store_id.as_str())
            .payload(&value)
            .headers(headers);
        self.inner
            .producer
            .send(record, self.options().publish_timeout)
            .await
            .map_err(|(e, _)| {
                ApiError::unavailable(
                    "broker_unavailable",
                    format!("publishing to {topic} failed: {e}"),
                )
            })?;
        self.inner
            .metrics
            .published
            .with_label_values(&[base])
            .inc();
        Ok(())
    }
}

/// The store a request is scoped to, from `X-Store-ID`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Store(pub String);

impl Store {
    /// A store ID: 1 to 128 characters of letters, digits, `-`, `_`, `.` and `:`.
    pub fn parse(value: Option<&str>) -> Result<Store, ApiError> {
        let Some(v) = value else {
            return Err(ApiError::bad_request(
                "X-Store-ID",
                "the X-Store-ID header is required: every request is scoped to one store",
            )
            .with_code("missing_store_id"));
        };
        let ok = !v.is_empty()
            && v.len() <= 128
            && v.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
        if !ok {
            return Err(ApiError::bad_request(
                "X-Store-ID",
                "the X-Store-ID header must be 1 to 128 letters, digits, '-', '_', '.' or ':'",
            )
            .with_code("invalid_store_id"));
        }
        Ok(Store(v.to_owned()))
    }
}

impl ApiError {
    fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
}

impl<S: Send + Sync> FromRequestParts<S> for Store {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        let value = match parts.headers.get(STORE_HEADER) {
            None => None,
            Some(v) => Some(v.to_str().map_err(|_| {
                ApiError::bad_request("X-Store-ID", "the X-Store-ID header is not text")
                    .with_code("invalid_store_id")
            })?),
        };
        Store::parse(value)
    }
}

/// The `Idempotency-Key` header, if any: 1 to 255 visible ASCII characters.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get(IDEMPOTENCY_HEADER) else {
        return Ok(None);
    };
    let bad = || {
        ApiError::bad_request(
            "Idempotency-Key",
            "the Idempotency-Key header must be 1 to 255 visible ASCII characters",
        )
    };
    let s = v.to_str().map_err(|_| bad())?;
    if s.is_empty() || s.len() > 255 || !s.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad());
    }
    Ok(Some(s.to_owned()))
}

/// What identifies a request for idempotency: its route and its JSON body, canonical
/// (keys sorted, no whitespace), so formatting differences are the same request.
pub fn fingerprint(route: &str, body: &serde_json::Value) -> String {
    let mut h = Sha256::new();
    h.update(route.as_bytes());
    h.update(b"\n");
    h.update(body.to_string().as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Answers a request with an `Idempotency-Key` the way the key's first request was
/// answered: `Ok(Some(answer))` for a repeat, an error for the key reused with another
/// request, `Ok(None)` for a key not seen before.
async fn replay_idempotent(
    state: &ApiState,
    store: &Store,
    key: Option<&str>,
    fingerprint: &str,
) -> Result<Option<IdempotencyRecord>, ApiError> {
    let Some(key) = key else { return Ok(None) };
    match state.db().idempotency_record(&store.0, key).await? {
        None => Ok(None),
        Some(r) if r.fingerprint == fingerprint => Ok(Some(r)),
        Some(_) => Err(key_reused()),
    }
}

fn key_reused() -> ApiError {
    ApiError::invalid_field(
        Some("Idempotency-Key".into()),
        "this Idempotency-Key was used for another request; use a new key for a new request",
    )
    .with_code("idempotency_key_reused")
}

/// Records the answer to a request with an `Idempotency-Key`; a concurrent first request
/// with the same key that recorded first wins, and a different one is an error.
async fn remember_idempotent(
    state: &ApiState,
    store: &Store,
    key: Option<&str>,
    record: IdempotencyRecord,
) -> Result<IdempotencyRecord, ApiError> {
    let Some(key) = key else { return Ok(record) };
    let kept = state
        .db()
        .record_idempotency(&store.0, key, &record)
        .await?;
    if kept.fingerprint != record.fingerprint {
        return Err(key_reused());
    }
    Ok(kept)
}

/// Parses a JSON object body, naming what is wrong with one that is not.
pub fn json_object(body: &[u8]) -> Result<serde_json::Map<String, serde_json::Value>, ApiError> {
    match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(serde_json::Value::Object(m)) => Ok(m),
        Ok(_) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            "the body must be a JSON object",
        )),
        Err(e) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_body",
            format!("the body is not valid JSON: {e}"),
        )),
    }
}

/// Deserializes a JSON body into `T`, naming the field at fault.
pub fn typed_body<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let value = serde_json::Value::Object(json_object(body)?);
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
            .map(str::to_owned);
        let field = match (path.as_str(), missing) {
            (".", m) => m,
            (p, Some(m)) => Some(format!("{p}.{m}")),
            (p, None) => Some(p.to_owned()),
        };
        ApiError::invalid_field(field, message)
    })
}

/// `/orders/{id}` for an order ID, percent-encoding what a path segment cannot hold.
pub fn order_path(order_id: &str) -> String {
    let mut out = String::from("/orders/");
    for b in order_id.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------
// The route table: the router and the OpenAPI document are both built from it.
// ---------------------------------------------------------------------------------------

/// A query parameter of a route, for the document.
#[derive(Debug, Clone, Copy)]
pub struct QueryParam {
    pub name: &'static str,
    pub schema: &'static str,
    pub description: &'static str,
}

/// One served operation.
#[derive(Debug, Clone, Copy)]
pub struct RouteSpec {
    pub method: &'static str,
    /// axum's path syntax, which is OpenAPI's (`/orders/{id}`).
    pub path: &'static str,
    pub summary: &'static str,
    /// Scoped by `X-Store-ID`.
    pub scoped: bool,
    /// Accepts `Idempotency-Key`.
    pub idempotent: bool,
    pub query: &'static [QueryParam],
    /// The name of the request body's schema in the document's components.
    pub request: Option<&'static str>,
    /// (status, description, schema name or media type) of each answer.
    pub responses: &'static [(u16, &'static str, Option<&'static str>)],
}

/// Every operation of the API.
pub const ROUTES: &[RouteSpec] = &[
    orders::PLACE,
    legacy::PLACE_LEGACY,
    orders::LIST,
    orders::GET,
    orders::EVENTS,
    orders::RETRY,
    orders::CANCEL,
    stats::STATS,
    stats::ALERTS,
    stats::ACKNOWLEDGE,
    stats::RESOLVE,
    dashboard::ALERT_EVENTS,
    dashboard::WORKFLOW,
    dashboard::STORES,
    dashboard::INDEX,
    inventory::RESTOCK,
    inventory::THRESHOLD,
    inventory::LEVELS,
    health::HEALTHZ,
    health::READYZ,
    health::METRICS,
    health::OPENAPI,
];

/// The handler of each operation of [`ROUTES`], by method and path.
fn handler(spec: &RouteSpec) -> MethodRouter<ApiState> {
    use axum::routing::{get, post, put};
    match (spec.method, spec.path) {
        ("post", "/orders") => post(orders::place),
        ("post", "/legacy/orders") => post(legacy::place_legacy),
        ("get", "/orders") => get(orders::list),
        ("get", "/orders/{id}") => get(orders::get),
        ("get", "/orders/{id}/events") => get(orders::events),
        ("post", "/orders/{id}/retry") => post(orders::retry),
        ("post", "/orders/{id}/cancel") => post(orders::cancel),
        ("get", "/stats") => get(stats::stats),
        ("get", "/alerts") => get(stats::alerts),
        ("post", "/alerts/{id}/acknowledge") => post(stats::acknowledge),
        ("post", "/alerts/{id}/resolve") => post(stats::resolve),
        ("get", "/alerts/events") => get(dashboard::alert_events),
        ("get", "/workflow") => get(dashboard::workflow),
        ("get", "/stores") => get(dashboard::stores),
        ("get", "/") => get(dashboard::index),
        ("post", "/inventory/{sku}/restock") => post(inventory::restock),
        ("put", "/inventory/{sku}/threshold") => put(inventory::threshold),
        ("get", "/inventory") => get(inventory::levels),
        ("get", "/healthz") => get(health::healthz),
        ("get", "/readyz") => get(health::readyz),
        ("get", "/metrics") => get(health::metrics),
        ("get", "/openapi.json") => get(health::openapi),
        (m, p) => unreachable!("no handler for {m} {p} in the route table"),
    }
}

/// The API's router over [`ROUTES`]; anything else is a JSON 404 (or 405).
pub fn router(state: ApiState) -> Router {
    let mut router = Router::new();
    for spec in ROUTES {
        router = router.route(spec.path, handler(spec));
    }
    router
        .fallback(|| async {
            ApiError::not_found("route_not_found", "no such route; see /openapi.json")
        })
        .method_not_allowed_fallback(|method: Method| async move {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                format!("{method} is not served on this route; see /openapi.json"),
            )
        })
        .layer(middleware::from_fn_with_state(state.clone(), observe))
        .with_state(state)
}

/// Counts and times every request by route template.
async fn observe(State(state): State<ApiState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().as_str().to_owned();
    let start = Instant::now();
    let response = next.run(req).await;
    let m = state.metrics();
    m.request_seconds
        .with_label_values(&[route.as_str(), method.as_str()])
        .observe(start.elapsed().as_secs_f64());
    m.requests
        .with_label_values(&[route.as_str(), method.as_str(), response.status().as_str()])
        .inc();
    response
}

/// Binds `addr` (port 0 picks a free one) and serves the API until `shutdown`; returns
/// the bound address.
pub async fn serve(
    addr: &str,
    state: ApiState,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(state);
    let handle = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "the API server stopped");
        }
    });
    Ok((bound, handle))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_ids_are_checked() {
        assert_eq!(Store::parse(Some("store-7")), Ok(Store("store-7".into())));
        let missing = Store::parse(None).unwrap_err();
        assert_eq!(
            (missing.status, missing.code, missing.field.as_deref()),
            (
                StatusCode::BAD_REQUEST,
                "missing_store_id",
                Some("X-Store-ID")
            )
        );
        for bad in ["", "a b", "ä", &"x".repeat(129), "s/1"] {
            let e = Store::parse(Some(bad)).unwrap_err();
            assert_eq!(e.code, "invalid_store_id", "{bad:?}");
        }
    }

    #[test]
    fn fingerprints_ignore_formatting_not_content() -> Result<(), serde_json::Error> {
        let a: serde_json::Value = serde_json::from_str(r#"{"a": 1, "b": [1, 2]}"#)?;
        let b: serde_json::Value = serde_json::from_str(r#"{"b":[1,2],"a":1}"#)?;
        let c: serde_json::Value = serde_json::from_str(r#"{"b":[2,1],"a":1}"#)?;
        assert_eq!(fingerprint("/orders", &a), fingerprint("/orders", &b));
        assert_ne!(fingerprint("/orders", &a), fingerprint("/orders", &c));
        assert_ne!(
            fingerprint("/orders", &a),
            fingerprint("/legacy/orders", &a)
        );
        Ok(())
    }

    #[test]
    fn order_paths_are_encoded() {
        assert_eq!(order_path("o-1001"), "/orders/o-1001");
        assert_eq!(order_path("a/b c"), "/orders/a%2Fb%20c");
    }

    #[test]
    fn every_route_has_a_handler_and_one_entry() {
        let mut seen = std::collections::BTreeSet::new();
        for spec in ROUTES {
            let _ = handler(spec);
            assert!(seen.insert((spec.method, spec.path)), "{spec:?} twice");
        }
    }
}
