//! Customer cancellation end to end: the real pipeline (every stage in a worker process)
//! against the mock payment gateway, the SQL sinks on SQLite, and the HTTP API in this
//! process, on the test broker.
//!
//! One order per position an order can be cancelled in, each on its own SKU so its stock
//! is read on its own:
//!
//! - before payment: the request (published straight to `order.cancelled`) comes before
//!   the order itself — never charged, no stock kept;
//! - payment retrying (the gateway in an outage): voided, stock released, failed as
//!   cancelled once the gateway answers;
//! - authorized and picking: refunded at the gateway, stock released, never ready to ship;
//! - ready to ship, then shipped: the API answers 409, and a request published straight
//!   to the topic gets `CancellationRefused` and changes nothing;
//! - another store's order and an unknown order: 404, as for `GET`.
//!
//! Each asserts the order's timeline and status through the API, and the gateway's ledger
//! entry of the order's charge.
//!
//! Then the same at scale, with chance deciding the interleavings: a simulated shop whose
//! customers cancel a third of their orders at seeded delays, against a gateway that
//! declines and fails transiently. Every order must end as a legal, complete saga
//! ([`status::check_complete`]), no cancelled order may stay charged, and every SKU's stock
//! must come out as restocked minus what orders kept.

mod common;

use std::time::{Duration, Instant};

use std::collections::{BTreeMap, HashMap};

use common::pipeline::{Lifecycle, probe, rank, restock, worker_env};
use common::{Collector, Outgoing, TestEnv, Worker, deadline, now_ms};
use orderflow::api::{self, ApiOptions, ApiState};
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, EventType, order_cancelled_id};
use orderflow::gateway::server::{Gateway, GatewayConfig, LedgerStatus, serve_gateway};
use orderflow::simulator::generate::StockAction;
use orderflow::simulator::{
    CarrierConfig, LoadConfig, Plan, PlanConfig, SimulationConfig, simulate,
};
use orderflow::sql::Db;
use orderflow::status::{self, OrderStatus};
use orderflow::topics;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

const STORE: &str = "store-c";
const OTHER_STORE: &str = "store-x";
/// Units of each SKU on the shelf before the orders.
const STOCK: i32 = 10;
/// Units of its SKU each order takes.
const UNITS: i32 = 2;
/// Fulfillment's pick and pack times: long enough to cancel an order while it is picked.
const PICK_MS: u64 = 6_000;
const PACK_MS: u64 = 3_000;

struct Api {
    http: reqwest::Client,
    base: String,
}

struct Answer {
    status: u16,
    body: Value,
}

impl Api {
    async fn send(
        &self,
        method: &str,
        path: &str,
        store: &str,
        headers: &[(&str, &str)],
        body: Option<&str>,
    ) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.base))
            .header("X-Store-ID", store);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req
                .header("content-type", "application/json")
                .body(b.to_owned());
        }
        let r = req.send().await.expect("the API answers");
        let status = r.status().as_u16();
        let text = r.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer { status, body }
    }

    async fn cancel(&self, order: &str, store: &str, body: Option<&str>) -> Answer {
        self.send("POST", &format!("/orders/{order}/cancel"), store, &[], body)
            .await
    }

    async fn order(&self, order: &str) -> Answer {
        self.send("GET", &format!("/orders/{order}"), STORE, &[], None)
            .await
    }

    /// Places order `order` of `sku` (UNITS units) through the API.
    async fn place(&self, order: &str, sku: &str) {
        let body = json!({"order_id": order, "customer_id": format!("c-{order}"),
            "email": "ada@example.com", "currency": "USD", "shipping_country": "US",
            "items": [{"sku": sku, "quantity": UNITS, "unit_price_cents": 1_250}],
            "placed_at": now_ms()});
        let a = self
            .send("POST", "/orders", STORE, &[], Some(&body.to_string()))
            .await;
        assert_eq!(a.status, 202, "placing {order}: {}", a.body);
    }

    /// The order's timeline event types, oldest first (empty while the read side has not
    /// seen the order).
    async fn timeline(&self, order: &str) -> (Option<String>, Vec<String>) {
        let a = self.order(order).await;
        if a.status != 200 {
            return (None, Vec::new());
        }
        let types = a.body["timeline"]
            .as_array()
            .map(|t| {
                t.iter()
                    .filter_map(|e| e["event_type"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        (a.body["order"]["status"].as_str().map(str::to_owned), types)
    }

    /// Waits until the order's timeline holds every one of `types`; returns its status
    /// and timeline then.
    async fn until(
        &self,
        order: &str,
        types: &[&str],
        workers: &[&Worker],
    ) -> (Option<String>, Vec<String>) {
        let until = Instant::now() + Duration::from_secs(90);
        loop {
            let (status, timeline) = self.timeline(order).await;
            if types.iter().all(|t| timeline.iter().any(|s| s == t)) {
                return (status, timeline);
            }
            for w in workers {
                w.assert_alive();
            }
            assert!(
                Instant::now() < until,
                "order {order}: waited 90 s for {types:?}; status {status:?}, timeline {timeline:?}\n{}",
                workers
                    .iter()
                    .map(|w| w.log_tail(20))
                    .collect::<Vec<_>>()
                    .join("\n")
            );
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }

    /// The payload of the order's first timeline entry of `event_type`.
    async fn payload(&self, order: &str, event_type: &str) -> Value {
        let a = self.order(order).await;
        a.body["timeline"]
            .as_array()
            .and_then(|t| t.iter().find(|e| e["event_type"] == event_type))
            .map(|e| e["payload"].clone())
            .unwrap_or_else(|| panic!("order {order} has no {event_type}: {}", a.body))
    }
}

/// An event published straight to a topic by a producer (JSON), keyed by the store.
fn raw(fields: Value) -> Outgoing {
    Outgoing::new(STORE, serde_json::to_vec(&fields).expect("JSON"))
}

/// The order's `OrderCancelled` as a producer other than the API publishes it.
fn cancellation(order: &str) -> Outgoing {
    raw(json!({"event_type": "OrderCancelled",
        "event_id": order_cancelled_id(STORE, order).to_string(),
        "order_id": order, "store_id": STORE, "correlation_id": format!("corr-{order}"),
        "occurred_at": now_ms(), "reason": "asked by phone"}))
}

/// The carrier taking the order's parcel.
fn picked_up(order: &str) -> Outgoing {
    raw(json!({"event_type": "CarrierScan",
        "order_id": order, "store_id": STORE, "correlation_id": format!("corr-{order}"),
        "occurred_at": now_ms(), "carrier": "DHL", "tracking_number": format!("TN-{order}"),
        "scan": "picked_up", "scanned_at": now_ms()}))
}

/// The gateway's ledger entry of the order's authorization key.
fn ledger_status(gateway: &Gateway, order: &str) -> Option<(LedgerStatus, bool)> {
    gateway
        .ledger()
        .into_iter()
        .find(|e| e.order_id == order && e.store_id == STORE)
        .map(|e| (e.status, e.refund.is_some()))
}

/// The units of `sku` available now, read with a stock count that changes nothing.
fn available(env: &TestEnv, levels: &mut Collector, sku: &str, tag: &str) -> i32 {
    env.producer().send_all(
        &env.topic(topics::INVENTORY_COMMANDS),
        &[probe(STORE, sku, tag)],
    );
    let codec = Codec::new();
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        levels.poll(Duration::from_millis(300));
        for r in &levels.records {
            let Ok(Event::StockLevelChanged(c)) = codec.decode(
                r.value.as_deref().unwrap_or_default(),
                DecodeHints::default(),
            ) else {
                continue;
            };
            if c.reason == tag && c.sku == sku {
                return c.available;
            }
        }
        assert!(Instant::now() < until, "no answer to the stock count {tag}");
    }
}

#[test]
fn cancellation_at_every_position() {
    let env = TestEnv::new("cancellation", 2);
    for base in [
        topics::ORDER_CANCELLED,
        topics::INVENTORY_COMMANDS,
        topics::INVENTORY_UPDATED,
        topics::PAYMENT_PROCESSED,
        topics::FULFILLMENT_UPDATED,
        topics::CARRIER_UPDATES,
        topics::DELIVERY_UPDATED,
    ] {
        common::wait_for_partitions(&env.topic(base), 2);
    }
    let dir = tempfile::tempdir().expect("a temporary directory");
    let db_url = format!("sqlite://{}", dir.path().join("orderflow.db").display());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let stop = CancellationToken::new();
    let gateway = Gateway::new(GatewayConfig::default()).expect("a gateway config");
    let (gateway_addr, _task) = rt
        .block_on(serve_gateway("127.0.0.1:0", gateway.clone(), stop.clone()))
        .expect("the gateway listens");

    // Stock for every SKU, then the workers.
    let skus = ["SKU-A", "SKU-B", "SKU-C", "SKU-D"];
    let stock: Vec<Outgoing> = skus
        .iter()
        .map(|s| restock(STORE, s, STOCK, "initial"))
        .collect();
    env.producer()
        .send_all(&env.topic(topics::INVENTORY_COMMANDS), &stock);
    let mut wenv = worker_env(&gateway_addr.to_string());
    wenv.retain(|(k, _)| !k.contains("FULFILLMENT") && !k.contains("MAX_ATTEMPTS"));
    wenv.extend([
        ("ORDERFLOW_FULFILLMENT_PICK_MS", PICK_MS.to_string()),
        ("ORDERFLOW_FULFILLMENT_PACK_MS", PACK_MS.to_string()),
        // The outage lasts as long as the test needs: payment must not give up first.
        ("ORDERFLOW_PAYMENT_MAX_ATTEMPTS", "1000".to_string()),
    ]);
    // The tables exist before the sinks start (both would create them otherwise).
    let db = rt.block_on(async {
        let db = Db::connect(&db_url).await.expect("the database");
        db.migrate().await.expect("migrations");
        db
    });
    let pipeline = env.spawn_worker(&[], &wenv);
    let sinks = env.spawn_worker(
        &["projector", "stats", "alerts"],
        &[("ORDERFLOW_DATABASE_URL", db_url.clone())],
    );
    let mut levels = env.collector(topics::INVENTORY_UPDATED);

    rt.block_on(async {
        let options = ApiOptions {
            stream_poll: Duration::from_millis(100),
            ..ApiOptions::default()
        };
        let state = ApiState::new(&env.settings, db, options, stop.clone()).expect("a producer");
        let (addr, _) = api::serve("127.0.0.1:0", state, stop.clone())
            .await
            .expect("binding a loopback port");
        let api = Api {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        };
        let workers = [&pipeline, &sinks];
        let producer = env.producer();
        let cancelled_topic = env.topic(topics::ORDER_CANCELLED);

        // --- Unknown order, another store's order, and bad bodies --------------------
        let a = api.cancel("o-nobody", STORE, None).await;
        assert_eq!(a.status, 404, "{}", a.body);
        assert_eq!(a.body["error"]["code"], "order_not_found", "{}", a.body);

        // --- 1. Before payment: the request comes before the order --------------------
        producer.send_all(&cancelled_topic, &[cancellation("o-before")]);
        api.until(
            "o-before",
            &["OrderCancelled", "CancellationAccepted"],
            &workers,
        )
        .await;
        api.place("o-before", "SKU-A").await;
        let (status, timeline) = api.until("o-before", &["OrderScreened"], &workers).await;
        // Inventory remembered the cancellation: nothing is reserved, paid or picked.
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        let (status_later, timeline_later) = api.timeline("o-before").await;
        assert_eq!(status.as_deref(), Some("cancelled"), "{timeline:?}");
        assert_eq!(status_later.as_deref(), Some("cancelled"));
        for never in [
            "StockReserved",
            "PaymentAuthorized",
            "Picking",
            "ReadyToShip",
        ] {
            assert!(
                !timeline_later.iter().any(|t| t == never),
                "o-before: {never} in {timeline_later:?}"
            );
        }
        assert_eq!(ledger_status(&gateway, "o-before"), None, "never charged");

        // The same order as seen from another store: unknown there.
        let a = api.cancel("o-before", OTHER_STORE, None).await;
        assert_eq!(a.status, 404, "{}", a.body);
        assert_eq!(a.body["error"]["code"], "order_not_found", "{}", a.body);
        // Already cancelled: 409, saying so.
        let a = api.cancel("o-before", STORE, None).await;
        assert_eq!(a.status, 409, "{}", a.body);
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("already cancelled")),
            "{}",
            a.body
        );

        // --- 2. Payment retrying: the gateway is down --------------------------------
        gateway.set_outage(true);
        api.place("o-retrying", "SKU-B").await;
        api.until("o-retrying", &["PaymentRetrying"], &workers)
            .await;
        // Bad bodies first: a reason of the wrong type, too long, an unknown field.
        let a = api
            .cancel("o-retrying", STORE, Some(r#"{"reason": 7}"#))
            .await;
        assert_eq!(a.status, 422, "{}", a.body);
        assert_eq!(a.body["error"]["field"], "reason", "{}", a.body);
        let long = json!({"reason": "x".repeat(501)}).to_string();
        let a = api.cancel("o-retrying", STORE, Some(&long)).await;
        assert_eq!(a.status, 422, "{}", a.body);
        assert_eq!(a.body["error"]["field"], "reason", "{}", a.body);
        let a = api.cancel("o-retrying", STORE, Some("[1]")).await;
        assert_eq!(a.status, 400, "{}", a.body);
        // The request, with an idempotency key, twice: one answer.
        let key = [("Idempotency-Key", "cancel-retrying-1")];
        let body = r#"{"reason": "found it cheaper"}"#;
        let first = api
            .send("POST", "/orders/o-retrying/cancel", STORE, &key, Some(body))
            .await;
        assert_eq!(first.status, 202, "{}", first.body);
        assert_eq!(first.body["status"], "cancellation_requested");
        assert_eq!(first.body["order_id"], "o-retrying");
        assert_eq!(first.body["tracking_url"], "/orders/o-retrying");
        assert_eq!(
            first.body["event_id"],
            order_cancelled_id(STORE, "o-retrying").to_string()
        );
        let again = api
            .send("POST", "/orders/o-retrying/cancel", STORE, &key, Some(body))
            .await;
        assert_eq!((again.status, &again.body), (202, &first.body));
        let reused = api
            .send("POST", "/orders/o-retrying/cancel", STORE, &key, Some("{}"))
            .await;
        assert_eq!(reused.status, 422, "{}", reused.body);
        assert_eq!(reused.body["error"]["code"], "idempotency_key_reused");
        let (status, _) = api
            .until(
                "o-retrying",
                &["OrderCancelled", "CancellationAccepted", "StockReleased"],
                &workers,
            )
            .await;
        assert_eq!(status.as_deref(), Some("cancelled"));
        // The void waits for the gateway; once it answers, the payment fails, cancelled.
        gateway.set_outage(false);
        let (status, timeline) = api.until("o-retrying", &["PaymentFailed"], &workers).await;
        assert_eq!(status.as_deref(), Some("cancelled"));
        let failed = api.payload("o-retrying", "PaymentFailed").await;
        assert_eq!(failed["reason"], "cancelled", "{failed}");
        let released = api.payload("o-retrying", "StockReleased").await;
        assert_eq!(released["reason"], "cancelled", "{released}");
        let request = api.payload("o-retrying", "OrderCancelled").await;
        assert_eq!(request["reason"], "found it cheaper", "{request}");
        assert!(
            !timeline
                .iter()
                .any(|t| t == "PaymentAuthorized" || t == "Picking"),
            "{timeline:?}"
        );
        assert_eq!(
            ledger_status(&gateway, "o-retrying"),
            Some((LedgerStatus::Voided, false)),
            "nothing stands charged"
        );

        // --- 3. Authorized, being picked ----------------------------------------------
        api.place("o-picking", "SKU-C").await;
        api.until("o-picking", &["Picking"], &workers).await;
        assert_eq!(
            ledger_status(&gateway, "o-picking"),
            Some((LedgerStatus::Authorized, false))
        );
        let a = api.cancel("o-picking", STORE, None).await;
        assert_eq!(a.status, 202, "{}", a.body);
        let (status, _) = api
            .until(
                "o-picking",
                &["CancellationAccepted", "StockReleased", "PaymentRefunded"],
                &workers,
            )
            .await;
        assert_eq!(status.as_deref(), Some("cancelled"));
        let refund = api.payload("o-picking", "PaymentRefunded").await;
        assert_eq!(refund["reason"], "cancelled", "{refund}");
        assert_eq!(
            ledger_status(&gateway, "o-picking"),
            Some((LedgerStatus::Refunded, true)),
            "refunded at the gateway"
        );
        // Past the time it would have been ready to ship, it still is not.
        tokio::time::sleep(Duration::from_millis(PICK_MS + PACK_MS)).await;
        let (status, timeline) = api.timeline("o-picking").await;
        assert_eq!(status.as_deref(), Some("cancelled"));
        assert!(
            !timeline.iter().any(|t| t == "Packed" || t == "ReadyToShip"),
            "{timeline:?}"
        );

        // --- 4. Ready to ship, then shipped -------------------------------------------
        api.place("o-ready", "SKU-D").await;
        let (status, _) = api.until("o-ready", &["ReadyToShip"], &workers).await;
        assert_eq!(status.as_deref(), Some("fulfilling"));
        let a = api.cancel("o-ready", STORE, None).await;
        assert_eq!(a.status, 409, "{}", a.body);
        assert_eq!(a.body["error"]["code"], "not_cancellable", "{}", a.body);
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("ready to ship")),
            "{}",
            a.body
        );
        // A request that raced past the API's check: fulfillment refuses it.
        producer.send_all(&cancelled_topic, &[cancellation("o-ready")]);
        let (status, timeline) = api
            .until(
                "o-ready",
                &["OrderCancelled", "CancellationRefused"],
                &workers,
            )
            .await;
        assert_eq!(status.as_deref(), Some("fulfilling"), "{timeline:?}");
        let refused = api.payload("o-ready", "CancellationRefused").await;
        assert!(
            refused["reason"]
                .as_str()
                .is_some_and(|r| r.contains("ready_to_ship")),
            "{refused}"
        );
        // Shipped: the API says so.
        producer.send_all(&env.topic(topics::CARRIER_UPDATES), &[picked_up("o-ready")]);
        let (status, timeline) = api.until("o-ready", &["Shipped"], &workers).await;
        assert_eq!(status.as_deref(), Some("shipped"));
        let a = api.cancel("o-ready", STORE, None).await;
        assert_eq!(a.status, 409, "{}", a.body);
        assert!(
            a.body["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("already shipped")),
            "{}",
            a.body
        );
        for never in ["CancellationAccepted", "StockReleased", "PaymentRefunded"] {
            assert!(!timeline.iter().any(|t| t == never), "{timeline:?}");
        }
        assert_eq!(
            ledger_status(&gateway, "o-ready"),
            Some((LedgerStatus::Authorized, false)),
            "the shipped order stays charged"
        );
    });

    // --- Stock: every cancelled order's units are back, the shipped one's are sold ----
    for (sku, want) in [
        ("SKU-A", STOCK),
        ("SKU-B", STOCK),
        ("SKU-C", STOCK),
        ("SKU-D", STOCK - UNITS),
    ] {
        let got = available(&env, &mut levels, sku, &format!("count-{sku}"));
        assert_eq!(got, want, "{sku} available");
    }
    pipeline.assert_alive();
    sinks.assert_alive();
    stop.cancel();
}

/// One order's events in causal order: every event after its cause (by causation ID) and
/// after the events before it on its own topic (`events` holds each topic's events in
/// offset order, as they were read); otherwise by occurrence time, then saga order. Two
/// events one stage emits in one batch share a millisecond, so time alone cannot say
/// which came first.
fn causal(events: &[Event]) -> Vec<Event> {
    let n = events.len();
    let index: HashMap<&str, usize> = events
        .iter()
        .enumerate()
        .map(|(i, e)| (e.envelope().event_id.as_str(), i))
        .collect();
    let mut before: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (i, e) in events.iter().enumerate() {
        if let Some(&c) = e
            .envelope()
            .causation_id
            .as_deref()
            .and_then(|c| index.get(c))
        {
            before[i].push(c);
        }
        let topic = topics::topic_of(e.event_type());
        if let Some(p) = (0..i)
            .rev()
            .find(|&j| topics::topic_of(events[j].event_type()) == topic)
        {
            before[i].push(p);
        }
    }
    let mut placed = vec![false; n];
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let next = (0..n)
            .filter(|&i| !placed[i] && before[i].iter().all(|&j| placed[j]))
            .min_by_key(|&i| {
                (
                    events[i].envelope().occurred_at,
                    rank(events[i].event_type()),
                )
            })
            .expect("causation has no cycles");
        placed[next] = true;
        out.push(events[next].clone());
    }
    out
}

/// The step after which order `order_id`'s customer asks to cancel it, if they do: a
/// fixed hash of the ID, so a run is reproducible as far as the pipeline's timing allows.
fn cancel_after(order_id: &str) -> Option<EventType> {
    use std::hash::{Hash, Hasher};
    const STEPS: [EventType; 10] = [
        EventType::OrderCreated,
        EventType::OrderScreened,
        EventType::StockReserved,
        EventType::PaymentRetrying,
        EventType::PaymentAuthorized,
        EventType::Picking,
        EventType::Packed,
        EventType::ReadyToShip,
        EventType::Shipped,
        EventType::Delivered,
    ];
    let mut h = std::collections::hash_map::DefaultHasher::new();
    order_id.hash(&mut h);
    let n = h.finish() % 20;
    STEPS.get(n as usize).copied()
}

#[test]
fn random_cancellations_end_consistent() {
    const ORDERS: u64 = 300;
    let env = TestEnv::new("cancellation-load", 3);
    for base in [
        topics::ORDER_CANCELLED,
        topics::INVENTORY_COMMANDS,
        topics::INVENTORY_UPDATED,
        topics::PAYMENT_PROCESSED,
        topics::FULFILLMENT_UPDATED,
        topics::CARRIER_UPDATES,
        topics::DELIVERY_UPDATED,
    ] {
        common::wait_for_partitions(&env.topic(base), 3);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let stop = CancellationToken::new();
    // A bank that answers in about a third of a second, so that a request sent once an
    // order is created, screened or reserved usually comes while its payment is still
    // being authorized (the pipeline itself takes a few tens of milliseconds a step).
    let gateway = Gateway::new(GatewayConfig {
        decline_rate: 0.05,
        transient_error_rate: 0.2,
        latency_ms: 300,
        jitter_ms: 100,
        seed: 5,
        ..GatewayConfig::default()
    })
    .expect("a gateway config");
    let (gateway_addr, _task) = rt
        .block_on(serve_gateway("127.0.0.1:0", gateway.clone(), stop.clone()))
        .expect("the gateway listens");
    // Warehouse steps long enough that a request sent once an order is paid, picked or
    // packed usually comes in time, and one sent once it is ready usually does not.
    let mut wenv = worker_env(&gateway_addr.to_string());
    wenv.retain(|(k, _)| !k.contains("FULFILLMENT"));
    wenv.extend([
        ("ORDERFLOW_FULFILLMENT_PICK_MS", "1500".to_string()),
        ("ORDERFLOW_FULFILLMENT_PACK_MS", "1500".to_string()),
    ]);
    let worker = env.spawn_worker(&[], &wenv);
    let mut seen = Lifecycle::new(&env);

    // The shop's traffic and its carrier in the background; the customers' cancellations
    // from here, each as soon as its order has taken its chosen step.
    let plan = PlanConfig {
        orders: ORDERS,
        stores: 4,
        skus: 10,
        run_id: "cx".into(),
        ..PlanConfig::default()
    };
    let config = SimulationConfig {
        load: LoadConfig {
            plan: plan.clone(),
            rate: 50.0,
            stock: true,
            cancel_rate: 0.0,
        },
        carrier: Some(CarrierConfig::default()),
        observe: Duration::from_secs(120),
        show_progress: false,
    };
    let prefix = config.load.order_prefix();
    let run = {
        let (settings, config, stop) = (env.settings.clone(), config.clone(), stop.clone());
        rt.spawn(async move { simulate(&settings, &config, &stop).await })
    };
    let producer = env.producer();
    let cancelled_topic = env.topic(topics::ORDER_CANCELLED);
    let mut requested: BTreeMap<(String, String), EventType> = BTreeMap::new();
    let has = |events: &[Event], t: EventType| events.iter().any(|e| e.event_type() == t);
    let until = deadline(360);
    let checked: BTreeMap<(String, String), (OrderStatus, Vec<Event>)> = loop {
        seen.poll(Duration::from_millis(100));
        let mut due = Vec::new();
        let mut done = BTreeMap::new();
        let mut failures = Vec::new();
        for (key, events) in &seen.by_order {
            if !key.1.starts_with(&prefix) {
                continue;
            }
            if let Some(step) = cancel_after(&key.1)
                && !requested.contains_key(key)
                && has(events, step)
            {
                due.push((key.clone(), step));
            }
            let events = causal(events);
            let answered = !requested.contains_key(key)
                || has(&events, EventType::CancellationAccepted)
                || has(&events, EventType::CancellationRefused);
            match status::check_complete(&events) {
                Ok(s) if answered => {
                    done.insert(key.clone(), (s, events));
                }
                Ok(_) => failures.push(format!("{key:?}: no answer to its cancellation yet")),
                Err(e) => {
                    let types: Vec<EventType> = events.iter().map(Event::event_type).collect();
                    failures.push(format!("{key:?}: {e}; {types:?}"));
                }
            }
        }
        let records: Vec<Outgoing> = due
            .iter()
            .map(|((store, order), step)| {
                Outgoing::new(
                    store.clone(),
                    serde_json::to_vec(&json!({"order_id": order, "store_id": store,
                        "occurred_at": now_ms(), "reason": format!("after {step}")}))
                    .expect("JSON"),
                )
            })
            .collect();
        if !records.is_empty() {
            producer.send_all(&cancelled_topic, &records);
            requested.extend(due);
        }
        if run.is_finished()
            && records.is_empty()
            && failures.is_empty()
            && done.len() as u64 == ORDERS
        {
            break done;
        }
        worker.assert_alive();
        assert!(
            Instant::now() < until,
            "{} of {ORDERS} orders complete; first problems:\n{}\n{}",
            done.len(),
            failures[..failures.len().min(5)].join("\n"),
            worker.log_tail(20)
        );
    };
    let summary = rt
        .block_on(run)
        .expect("the run's task")
        .expect("a simulated run");
    assert_eq!(summary.load.orders, ORDERS, "{summary}");
    assert!(seen.conflicts.is_empty(), "{:?}", seen.conflicts.first());

    // The requests met orders at every step, and were answered both ways.
    let count = |f: &dyn Fn(&OrderStatus, &[Event]) -> bool| {
        checked.values().filter(|(s, e)| f(s, e)).count()
    };
    let accepted = count(&|_, e| has(e, EventType::CancellationAccepted));
    let refused = count(&|_, e| has(e, EventType::CancellationRefused));
    let refunded = count(&|s, e| {
        *s == OrderStatus::Cancelled
            && has(e, EventType::CancellationAccepted)
            && has(e, EventType::PaymentRefunded)
    });
    let before_payment = count(&|s, e| {
        *s == OrderStatus::Cancelled
            && has(e, EventType::CancellationAccepted)
            && has(e, EventType::StockReleased)
            && !has(e, EventType::PaymentAuthorized)
    });
    eprintln!(
        "{} cancellation requests: {accepted} accepted ({refunded} refunded, {before_payment} released before payment), {refused} refused",
        requested.len()
    );
    assert_eq!(accepted + refused, requested.len());
    assert!(
        accepted > 0 && refused > 0 && refunded > 0 && before_payment > 0,
        "{accepted} accepted ({refunded} refunded, {before_payment} before payment), {refused} refused"
    );

    // No cancelled order stays charged or ships; no order is charged twice.
    let ledger = gateway.ledger();
    for ((store, order), (status, events)) in &checked {
        let entries: Vec<_> = ledger
            .iter()
            .filter(|e| &e.store_id == store && &e.order_id == order)
            .collect();
        assert!(entries.len() <= 1, "{order}: {entries:?}");
        let charge = entries.first().map(|e| e.status);
        if has(events, EventType::CancellationAccepted) {
            assert!(
                matches!(
                    charge,
                    None | Some(
                        LedgerStatus::Voided | LedgerStatus::Refunded | LedgerStatus::Declined
                    )
                ),
                "{order}: cancelled but charged {charge:?}: {:?}",
                events.iter().map(Event::event_type).collect::<Vec<_>>()
            );
            assert!(!has(events, EventType::ReadyToShip), "{order} shipped");
        }
        if *status == OrderStatus::Delivered {
            assert_eq!(charge, Some(LedgerStatus::Authorized), "{order}");
        }
    }

    // Stock: restocked, minus what the orders reserved and did not get back.
    let mut expected: BTreeMap<(String, String), i64> = BTreeMap::new();
    for c in Plan::new(plan).stock_commands() {
        if let StockAction::Restock { quantity } = c.action {
            *expected.entry((c.store_id, c.sku)).or_default() += i64::from(quantity);
        }
    }
    for ((store, _), (_, events)) in &checked {
        for e in events {
            let (items, sign) = match e {
                Event::StockReserved(r) => (&r.items, -1),
                Event::StockReleased(r) => (&r.items, 1),
                _ => continue,
            };
            for l in items {
                *expected.entry((store.clone(), l.sku.clone())).or_default() +=
                    sign * i64::from(l.quantity);
            }
        }
    }
    let probes: Vec<Outgoing> = expected
        .keys()
        .map(|(store, sku)| probe(store, sku, "final-count"))
        .collect();
    env.producer()
        .send_all(&env.topic(topics::INVENTORY_COMMANDS), &probes);
    let until = deadline(60);
    let counted: BTreeMap<(String, String), i64> = loop {
        seen.poll(Duration::from_millis(300));
        let counted: BTreeMap<(String, String), i64> = seen
            .other
            .iter()
            .filter_map(|e| match e {
                Event::StockLevelChanged(c) if c.reason == "final-count" => Some((
                    (c.envelope.store_id.clone(), c.sku.clone()),
                    i64::from(c.available),
                )),
                _ => None,
            })
            .collect();
        if counted.len() == expected.len() {
            break counted;
        }
        assert!(
            Instant::now() < until,
            "{} of {} stock counts answered",
            counted.len(),
            expected.len()
        );
    };
    assert_eq!(counted, expected);
    worker.assert_alive();
    stop.cancel();
}
