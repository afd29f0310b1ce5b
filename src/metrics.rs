//! Every metric OrderFlow exports, in one place, and the HTTP server for `/metrics` and
//! `/health`.
//!
//! Invariant: labels are low-cardinality only (stage, topic, error class) — never an
//! order ID, store ID or offset.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub records_in: IntCounterVec,
    pub records_out: IntCounterVec,
    pub dead_lettered: IntCounterVec,
    pub duplicates: IntCounterVec,
    pub ignored: IntCounterVec,
    pub timers_fired: IntCounterVec,
    pub batch_records: HistogramVec,
    pub commit_seconds: HistogramVec,
    pub aborts: IntCounterVec,
    pub fenced: IntCounterVec,
    pub producer_rebuilds: IntCounterVec,
    pub retries: IntCounterVec,
    pub rebalances: IntCounterVec,
    pub restore_seconds: HistogramVec,
    pub event_latency_seconds: HistogramVec,
    pub assigned_partitions: IntGaugeVec,
    /// Per owned input partition: records between where the durable state continues and
    /// the partition's end. Partition is a label: the count is fixed and small.
    pub consumer_lag: IntGaugeVec,
}

/// The handles a worker touches for every record, resolved once for its stage: a label
/// lookup is a hash and a lock, too much to pay per record.
#[derive(Clone)]
pub struct StageMetrics {
    pub records_in: prometheus::IntCounter,
    pub duplicates: prometheus::IntCounter,
    /// Inputs of a type the stage takes no notice of, skipped undecoded.
    pub ignored: prometheus::IntCounter,
    pub timers_fired: prometheus::IntCounter,
    pub event_latency_seconds: prometheus::Histogram,
}

impl Metrics {
    pub fn for_stage(&self, stage: &str) -> StageMetrics {
        StageMetrics {
            records_in: self.records_in.with_label_values(&[stage]),
            duplicates: self.duplicates.with_label_values(&[stage]),
            ignored: self.ignored.with_label_values(&[stage]),
            timers_fired: self.timers_fired.with_label_values(&[stage]),
            event_latency_seconds: self.event_latency_seconds.with_label_values(&[stage]),
        }
    }
}

fn counter(r: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    r.register(Box::new(c.clone())).expect("unique metric");
    c
}

fn histogram(
    r: &Registry,
    name: &str,
    help: &str,
    labels: &[&str],
    buckets: Vec<f64>,
) -> HistogramVec {
    let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)
        .expect("valid metric");
    r.register(Box::new(h.clone())).expect("unique metric");
    h
}

const SECONDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    pub fn new() -> Self {
        let r = Registry::new();
        let s = || SECONDS.to_vec();
        let assigned = IntGaugeVec::new(
            Opts::new(
                "orderflow_assigned_partitions",
                "Input partitions currently assigned",
            ),
            &["stage"],
        )
        .expect("valid metric");
        r.register(Box::new(assigned.clone()))
            .expect("unique metric");
        let lag = IntGaugeVec::new(
            Opts::new(
                "orderflow_consumer_lag",
                "Records of an owned input partition not yet processed (from the state's position to the end)",
            ),
            &["stage", "topic", "partition"],
        )
        .expect("valid metric");
        r.register(Box::new(lag.clone())).expect("unique metric");
        Metrics {
            records_in: counter(
                &r,
                "orderflow_records_in_total",
                "Input records consumed",
                &["stage"],
            ),
            records_out: counter(
                &r,
                "orderflow_records_out_total",
                "Events produced",
                &["stage", "topic"],
            ),
            dead_lettered: counter(
                &r,
                "orderflow_records_dead_lettered_total",
                "Records sent to the DLQ",
                &["stage", "error_class"],
            ),
            duplicates: counter(
                &r,
                "orderflow_duplicates_skipped_total",
                "Inputs skipped because their event ID was already processed",
                &["stage"],
            ),
            ignored: counter(
                &r,
                "orderflow_inputs_ignored_total",
                "Inputs skipped undecoded: their type is none of the stage's business",
                &["stage"],
            ),
            timers_fired: counter(
                &r,
                "orderflow_timers_fired_total",
                "Timers fired",
                &["stage"],
            ),
            batch_records: histogram(
                &r,
                "orderflow_batch_records",
                "Input records per committed batch",
                &["stage"],
                vec![1.0, 10.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 5000.0],
            ),
            commit_seconds: histogram(
                &r,
                "orderflow_commit_seconds",
                "Time to commit a batch (outputs, state, offsets)",
                &["stage"],
                s(),
            ),
            aborts: counter(
                &r,
                "orderflow_batch_aborts_total",
                "Batches aborted and rewound",
                &["stage"],
            ),
            fenced: counter(
                &r,
                "orderflow_changelog_fenced_total",
                "Batches withheld because another writer appended to the partition's changelog",
                &["stage"],
            ),
            producer_rebuilds: counter(
                &r,
                "orderflow_producer_rebuilds_total",
                "Producers rebuilt after fencing or fatal errors",
                &["stage"],
            ),
            retries: counter(
                &r,
                "orderflow_infrastructure_retries_total",
                "Retries of infrastructure errors",
                &["stage"],
            ),
            rebalances: counter(
                &r,
                "orderflow_rebalances_total",
                "Partition assignment changes",
                &["stage", "kind"],
            ),
            restore_seconds: histogram(
                &r,
                "orderflow_state_restore_seconds",
                "Time to restore the state of newly assigned partitions from the changelog",
                &["stage"],
                s(),
            ),
            event_latency_seconds: histogram(
                &r,
                "orderflow_event_latency_seconds",
                "From an input's event time to its processing",
                &["stage"],
                s(),
            ),
            assigned_partitions: assigned,
            consumer_lag: lag,
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("metrics are UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// The HTTP API's metrics (`orderflow api`), in a registry of its own so that its
/// `/metrics` shows what the API process does. Labels are the route template
/// (`/orders/{id}`), never a concrete path, and the status code.
#[derive(Clone)]
pub struct ApiMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub published: IntCounterVec,
}

impl ApiMetrics {
    pub fn new() -> Self {
        let r = Registry::new();
        ApiMetrics {
            requests: counter(
                &r,
                "orderflow_api_requests_total",
                "HTTP API requests answered, by route template, method and status code",
                &["route", "method", "status"],
            ),
            request_seconds: histogram(
                &r,
                "orderflow_api_request_seconds",
                "Time to answer an HTTP API request (to its first byte for a stream)",
                &["route", "method"],
                SECONDS.to_vec(),
            ),
            published: counter(
                &r,
                "orderflow_api_published_total",
                "Events the HTTP API published, by topic",
                &["topic"],
            ),
            registry: r,
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding cannot fail");
        String::from_utf8(buf).expect("metrics are UTF-8")
    }
}

impl Default for ApiMetrics {
    fn default() -> Self {
        ApiMetrics::new()
    }
}

/// Readiness: set once every worker has joined and restored; cleared when one stops.
#[derive(Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
}

impl Health {
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::SeqCst);
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst)
    }
}

/// Binds `addr` (port 0 picks a free one) and serves until `shutdown`; returns the bound
/// address so several workers on one machine can each report theirs.
pub async fn serve(
    addr: &str,
    metrics: Metrics,
    health: Health,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route(
            "/metrics",
            get(|State((m, _)): State<(Metrics, Health)>| async move { m.render() }),
        )
        .route("/health/live", get(|| async { "ok" }))
        .route(
            "/health/ready",
            get(|State((_, h)): State<(Metrics, Health)>| async move {
                if h.is_ready() {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not ready")
                }
            }),
        )
        .with_state((metrics, health));
    let handle = tokio::spawn(async move {
        let _ = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok((bound, handle))
}
