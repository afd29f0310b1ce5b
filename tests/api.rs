//! The HTTP API against the real broker and both databases: every endpoint's success and
//! error paths, idempotency keys, tenant isolation, the legacy shape, live event streams
//! resumed with `Last-Event-ID`, manual retry, the dashboard's page, store list, workflow
//! and live alert stream, and the OpenAPI document against the served routes (through
//! the `orderflow api` binary).
//!
//! The API runs in the test process on a free loopback port; the SQL sinks run as an
//! `orderflow run --stages projector,stats,alerts` worker on the test's own database.

mod common;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::postgres::TestDatabase;
use common::{Collector, TestEnv, Worker, deadline};
use orderflow::api::{self, ApiOptions, ApiState};
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, order_retry_id};
use orderflow::sql::Db;
use orderflow::topics;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// The grace a retry waits for in these tests (30 s in production).
const RETRY_GRACE: Duration = Duration::from_secs(3);

struct Backend {
    url: String,
    _pg: Option<TestDatabase>,
    _dir: Option<tempfile::TempDir>,
}

fn backend(kind: &str, name: &str) -> Backend {
    match kind {
        "postgres" => {
            let pg = TestDatabase::create(name);
            Backend {
                url: pg.url.clone(),
                _pg: Some(pg),
                _dir: None,
            }
        }
        _ => {
            let dir = tempfile::tempdir().expect("a temporary directory");
            Backend {
                url: format!("sqlite://{}", dir.path().join("orderflow.db").display()),
                _pg: None,
                _dir: Some(dir),
            }
        }
    }
}

/// A client of the API under test.
struct Client {
    http: reqwest::Client,
    base: String,
}

struct Answer {
    status: u16,
    body: Value,
    location: Option<String>,
}

impl Client {
    async fn send(
        &self,
        method: &str,
        path: &str,
        store: Option<&str>,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("a method");
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(s) = store {
            req = req.header("X-Store-ID", s);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let r = req.send().await.expect("the API answers");
        let status = r.status().as_u16();
        let location = r
            .headers()
            .get("location")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let text = r.text().await.expect("a body");
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Answer {
            status,
            body,
            location,
        }
    }

    async fn get(&self, path: &str, store: Option<&str>) -> Answer {
        self.send("GET", path, store, &[], None).await
    }

    async fn post(&self, path: &str, store: &str, body: &Value) -> Answer {
        self.send(
            "POST",
            path,
            Some(store),
            &[],
            Some(body.to_string().into_bytes()),
        )
        .await
    }
}

/// Asserts an error answer of the one shape: status, code and (if given) field.
fn assert_error(a: &Answer, status: u16, code: &str, field: Option<&str>) {
    assert_eq!(a.status, status, "{}", a.body);
    assert_eq!(a.body["error"]["code"], code, "{}", a.body);
    assert!(a.body["error"]["message"].is_string(), "{}", a.body);
    match field {
        Some(f) => assert_eq!(a.body["error"]["field"], f, "{}", a.body),
        None => assert!(a.body["error"].get("field").is_none(), "{}", a.body),
    }
}

fn order(order_id: &str, store: &str) -> Value {
    json!({"order_id": order_id, "customer_id": "c-42", "email": "ada@example.com",
           "currency": "USD", "shipping_country": "US",
           "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1999}],
           "placed_at": "2026-11-21T10:00:00Z", "store_id": store})
}

/// Records of `base` decoded, once there are `n` of them (exactly `n` after a moment).
fn decoded(env: &TestEnv, base: &str, n: usize) -> Vec<(String, Event)> {
    let mut c: Collector = env.collector(base);
    let until = deadline(30);
    while c.records.len() < n && Instant::now() < until {
        c.poll(Duration::from_millis(500));
    }
    c.poll(Duration::from_millis(500));
    let codec = Codec::new();
    let hints = DecodeHints {
        topic_default: topics::default_event_type(base),
        ..DecodeHints::default()
    };
    let out: Vec<(String, Event)> = c
        .records
        .iter()
        .map(|r| {
            let event = codec
                .decode(r.value.as_deref().unwrap_or_default(), hints)
                .expect("the API publishes valid events");
            (r.key_str().unwrap_or_default(), event)
        })
        .collect();
    assert_eq!(out.len(), n, "records on {base}: {out:?}");
    out
}

/// Polls `path` until `done` accepts the answer.
async fn eventually(
    client: &Client,
    what: &str,
    path: &str,
    store: &str,
    worker: &Worker,
    done: impl Fn(&Answer) -> bool,
) -> Answer {
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        let a = client.get(path, Some(store)).await;
        if done(&a) {
            return a;
        }
        worker.assert_alive();
        assert!(
            Instant::now() < until,
            "{what}: last answer {} {}\n{}",
            a.status,
            a.body,
            worker.log_tail(30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads server-sent events from `path` until `n` have arrived: (id, type, data).
async fn read_events(
    client: &Client,
    path: &str,
    store: &str,
    last_event_id: Option<&str>,
    n: usize,
) -> Vec<(String, String, Value)> {
    let mut req = client
        .http
        .get(format!("{}{path}", client.base))
        .header("X-Store-ID", store);
    if let Some(id) = last_event_id {
        req = req.header("Last-Event-ID", id);
    }
    let mut r = req.send().await.expect("a stream");
    if r.status().as_u16() != 200 {
        let status = r.status();
        panic!("{path}: {status} {}", r.text().await.unwrap_or_default());
    }
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let mut buf = String::new();
    let mut out = Vec::new();
    let until = Instant::now() + Duration::from_secs(60);
    while out.len() < n {
        let chunk = tokio::time::timeout_at(until.into(), r.chunk())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} events within 60 s: {out:?}", out.len()))
            .expect("the stream reads")
            .expect("the stream stays open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let (mut id, mut kind, mut data) = (String::new(), String::new(), String::new());
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("id:") {
                    id = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("event:") {
                    kind = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push_str(v.trim());
                }
            }
            if !id.is_empty() {
                out.push((id, kind, serde_json::from_str(&data).expect("JSON data")));
            }
        }
    }
    out
}

/// The API in this process on a free port, with the sinks in a worker process.
struct Running {
    env: TestEnv,
    worker: Worker,
    client: Client,
    shutdown: CancellationToken,
    _backend: Backend,
}

async fn start(env: TestEnv, backend: Backend, label: &str) -> Running {
    let db = Db::connect(&backend.url).await.expect("the database");
    db.migrate().await.expect("migrations");
    let worker = env.spawn_worker(
        &["projector", "stats", "alerts"],
        &[
            ("ORDERFLOW_DATABASE_URL", backend.url.clone()),
            (
                "ORDERFLOW_GROUP_PREFIX",
                format!("{}-{label}", env.settings.group_prefix),
            ),
        ],
    );
    let shutdown = CancellationToken::new();
    let options = ApiOptions {
        stream_poll: Duration::from_millis(100),
        retry_grace: RETRY_GRACE,
        ..ApiOptions::default()
    };
    let state = ApiState::new(&env.settings, db, options, shutdown.clone()).expect("a producer");
    let (addr, _) = api::serve("127.0.0.1:0", state, shutdown.clone())
        .await
        .expect("binding a loopback port");
    Running {
        env,
        worker,
        client: Client {
            http: reqwest::Client::new(),
            base: format!("http://{addr}"),
        },
        shutdown,
        _backend: backend,
    }
}

fn scenario(kind: &str) {
    let name = format!("api-{kind}");
    let env = TestEnv::new(&name, 3);
    let backend = backend(kind, "api");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    rt.block_on(async move {
        let run = start(env, backend, kind).await;
        orders_and_streams(&run).await;
        stats_alerts_inventory(&run).await;
        dashboard(&run).await;
        if kind == "postgres" {
            alert_changes_become_visible_in_order(&run._backend.url).await;
        }
        run.shutdown.cancel();
    });
}

#[test]
fn api_on_sqlite() {
    scenario("sqlite");
}

#[test]
fn api_on_postgres() {
    scenario("postgres");
}

async fn orders_and_streams(run: &Running) {
    let c = &run.client;
    let (a, b) = ("store-a", "store-b");

    // The store header: missing, malformed.
    let r = c.get("/orders", None).await;
    assert_error(&r, 400, "missing_store_id", Some("X-Store-ID"));
    let r = c.get("/orders", Some("bad store")).await;
    assert_error(&r, 400, "invalid_store_id", Some("X-Store-ID"));

    // Placing an order, and the contract's rules naming their field.
    let o1 = order("o-1", a);
    let r = c.post("/orders", a, &o1).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["order_id"], "o-1");
    assert_eq!(r.body["tracking_url"], "/orders/o-1");
    assert_eq!(r.location.as_deref(), Some("/orders/o-1"));
    let o1_created = r.body["event_id"].as_str().expect("an event ID").to_owned();

    let mut bad = order("o-x", a);
    bad["items"][0]["quantity"] = json!(0);
    assert_error(
        &c.post("/orders", a, &bad).await,
        422,
        "invalid_field",
        Some("items[0].quantity"),
    );
    let mut bad = order("o-x", a);
    bad.as_object_mut().expect("object").remove("email");
    assert_error(
        &c.post("/orders", a, &bad).await,
        422,
        "invalid_field",
        Some("email"),
    );
    let mut bad = order("o-x", a);
    bad["currency"] = json!("usd");
    assert_error(
        &c.post("/orders", a, &bad).await,
        422,
        "invalid_field",
        Some("currency"),
    );
    assert_error(
        &c.post("/orders", b, &order("o-x", a)).await,
        422,
        "invalid_field",
        Some("store_id"),
    );
    let r = c
        .send("POST", "/orders", Some(a), &[], Some(b"{not json".to_vec()))
        .await;
    assert_error(&r, 400, "invalid_body", None);

    // Idempotency: the same key and body get the same answer without a second record;
    // the same key with another body is refused.
    let key = [("Idempotency-Key", "k-1")];
    let o2 = order("o-2", a);
    let first = c
        .send(
            "POST",
            "/orders",
            Some(a),
            &key,
            Some(o2.to_string().into_bytes()),
        )
        .await;
    assert_eq!(first.status, 202, "{}", first.body);
    let again = c
        .send(
            "POST",
            "/orders",
            Some(a),
            &key,
            Some(o2.to_string().into_bytes()),
        )
        .await;
    assert_eq!((again.status, &again.body), (202, &first.body));
    let other = c
        .send(
            "POST",
            "/orders",
            Some(a),
            &key,
            Some(order("o-3", a).to_string().into_bytes()),
        )
        .await;
    assert_error(
        &other,
        422,
        "idempotency_key_reused",
        Some("Idempotency-Key"),
    );
    // The key is the store's own: another store may use it for its own order.
    let r = c
        .send(
            "POST",
            "/orders",
            Some(b),
            &key,
            Some(order("o-b1", b).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);

    // The legacy shape: translated, checked, errors under the legacy names.
    let legacy = json!({"orderId": "L-1",
        "customer": {"id": "c-7", "email": "grace@example.com", "shippingCountry": "GB"},
        "currency": "GBP", "items": [{"sku": "SKU-9", "quantity": 3, "unitPrice": "12.50"}],
        "placedAt": "2026-11-21T11:00:00Z"});
    let r = c.post("/legacy/orders", a, &legacy).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["tracking_url"], "/orders/L-1");
    let mut bad = legacy.clone();
    bad["items"][0]["unitPrice"] = json!("12.505");
    assert_error(
        &c.post("/legacy/orders", a, &bad).await,
        422,
        "invalid_field",
        Some("items[0].unitPrice"),
    );
    let mut bad = legacy.clone();
    bad["customer"]
        .as_object_mut()
        .expect("object")
        .remove("email");
    assert_error(
        &c.post("/legacy/orders", a, &bad).await,
        422,
        "invalid_field",
        Some("customer.email"),
    );
    let mut bad = legacy.clone();
    bad["items"][0]["quantity"] = json!(-1);
    assert_error(
        &c.post("/legacy/orders", a, &bad).await,
        422,
        "invalid_field",
        Some("items[0].quantity"),
    );

    // Exactly four orders reached the topic, keyed by their store, as the contract says.
    let env = &run.env;
    let published = tokio::task::block_in_place(|| decoded(env, topics::ORDER_CREATED, 4));
    let mut ids: Vec<(String, String)> = published
        .iter()
        .map(|(k, e)| (k.clone(), e.envelope().order_id.clone().unwrap_or_default()))
        .collect();
    ids.sort();
    assert_eq!(
        ids,
        [
            ("store-a", "L-1"),
            ("store-a", "o-1"),
            ("store-a", "o-2"),
            ("store-b", "o-b1")
        ]
        .map(|(s, o)| (s.to_owned(), o.to_owned()))
    );
    let Some((_, Event::OrderCreated(l1))) = published
        .iter()
        .find(|(_, e)| e.envelope().order_id.as_deref() == Some("L-1"))
    else {
        panic!("no L-1 order");
    };
    assert_eq!(
        (
            l1.items[0].unit_price_cents,
            l1.customer_id.as_str(),
            l1.shipping_country.as_str()
        ),
        (1250, "c-7", "GB")
    );

    // Reading orders back once the projector has them; another store sees nothing.
    let r = eventually(c, "o-1 projected", "/orders/o-1", a, &run.worker, |r| {
        r.status == 200
    })
    .await;
    assert_eq!(r.body["order"]["status"], "created");
    assert_eq!(r.body["timeline"][0]["event_id"], o1_created.as_str());
    assert_error(
        &c.get("/orders/o-1", Some(b)).await,
        404,
        "order_not_found",
        None,
    );
    assert_error(
        &c.get("/orders/nope", Some(a)).await,
        404,
        "order_not_found",
        None,
    );
    eventually(
        c,
        "L-1 and o-2 projected",
        "/orders?status=created",
        a,
        &run.worker,
        |r| r.body["items"].as_array().is_some_and(|i| i.len() == 3),
    )
    .await;
    let page1 = c.get("/orders?limit=2", Some(a)).await;
    assert_eq!(page1.status, 200);
    let ids1: Vec<&str> = page1.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["order_id"].as_str())
        .collect();
    assert_eq!(ids1, ["L-1", "o-1"]);
    let cursor = page1.body["next_cursor"].as_str().expect("a next page");
    let page2 = c
        .get(&format!("/orders?limit=2&cursor={cursor}"), Some(a))
        .await;
    let ids2: Vec<&str> = page2.body["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["order_id"].as_str())
        .collect();
    assert_eq!(
        (ids2, &page2.body["next_cursor"]),
        (vec!["o-2"], &Value::Null)
    );
    let r = c.get("/orders?status=paid", Some(a)).await;
    assert_eq!(r.body["items"], json!([]));
    let r = eventually(c, "store b's order", "/orders", b, &run.worker, |r| {
        r.body["items"].as_array().is_some_and(|i| i.len() == 1)
    })
    .await;
    assert_eq!(r.body["items"][0]["order_id"], "o-b1");
    assert_error(
        &c.get("/orders?status=lost", Some(a)).await,
        400,
        "invalid_parameter",
        Some("status"),
    );
    assert_error(
        &c.get("/orders?limit=0", Some(a)).await,
        400,
        "invalid_parameter",
        Some("limit"),
    );

    // Streams: another store's order is a 404; the stream opens with the timeline.
    assert_error(
        &c.get("/orders/o-1/events", Some(b)).await,
        404,
        "order_not_found",
        None,
    );
    let first = read_events(c, "/orders/o-1/events", a, None, 1).await;
    assert_eq!(
        (first[0].0.as_str(), first[0].1.as_str()),
        (o1_created.as_str(), "OrderCreated")
    );
    assert_eq!(first[0].2["payload"]["order_id"], "o-1");

    // Retry: another store's order is a 404; a young order may be in flight (409).
    assert_error(
        &c.post("/orders/o-1/retry", b, &json!({})).await,
        404,
        "order_not_found",
        None,
    );
    let r = c.post("/orders/o-1/retry", a, &json!({})).await;
    if r.status == 409 {
        assert_error(&r, 409, "not_retryable", None);
    }
    // A live stream sees the retry's OrderCreated arrive.
    let live = {
        let client = Client {
            http: reqwest::Client::new(),
            base: c.base.clone(),
        };
        tokio::spawn(
            async move { read_events(&client, "/orders/o-1/events", "store-a", None, 2).await },
        )
    };
    tokio::time::sleep(RETRY_GRACE + Duration::from_millis(500)).await;
    let r = c.post("/orders/o-1/retry", a, &json!({})).await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["retry"], 1);
    let retry_id = order_retry_id(a, "o-1", 1).to_string();
    assert_eq!(r.body["event_id"], retry_id.as_str());
    let live = live.await.expect("the stream task");
    assert_eq!(live[0].0, o1_created);
    assert_eq!(
        (live[1].0.as_str(), live[1].1.as_str()),
        (retry_id.as_str(), "OrderCreated")
    );
    assert_eq!(live[1].2["payload"]["causation_id"], "retry/1");
    // Resuming after the first entry gives the retry, not the first again.
    let resumed = read_events(c, "/orders/o-1/events", a, Some(&o1_created), 1).await;
    assert_eq!(resumed[0].0, retry_id);
    // A retry of the order that the read side has not seen the retry of yet publishes
    // the same event ID again (deduplicated downstream); once seen, the next is retry 2.
    let r = eventually(
        c,
        "the retry projected",
        "/orders/o-1",
        a,
        &run.worker,
        |r| r.body["timeline"].as_array().is_some_and(|t| t.len() == 2),
    )
    .await;
    assert_eq!(r.body["order"]["status"], "created");
}

async fn stats_alerts_inventory(run: &Running) {
    let c = &run.client;
    let (a, b) = ("store-a", "store-b");

    // Stats: three orders of store a, the retry not counted as a fourth.
    let r = eventually(
        c,
        "stats of store a",
        "/stats?from=0",
        a,
        &run.worker,
        |r| r.body["totals"]["orders_created"] == 3,
    )
    .await;
    assert_eq!(r.body["from"], 0);
    assert!(
        r.body["durations"]["created_to_paid"]["count"] == 0,
        "{}",
        r.body
    );
    let r = c.get("/stats?from=0", Some(b)).await;
    assert_eq!(r.body["totals"]["orders_created"], 1);
    assert_error(
        &c.get("/stats?from=10&to=5", Some(a)).await,
        400,
        "invalid_parameter",
        Some("from"),
    );
    assert_error(
        &c.get("/stats?from=yesterday", Some(a)).await,
        400,
        "invalid_parameter",
        Some("from"),
    );

    // Inventory commands reach the topic keyed by store; bad ones name their field.
    let r = c
        .post("/inventory/SKU-1/restock", a, &json!({"quantity": 5}))
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let key = [("Idempotency-Key", "restock-1")];
    let body = json!({"quantity": 2, "note": "pallet"})
        .to_string()
        .into_bytes();
    let r1 = c
        .send(
            "POST",
            "/inventory/SKU-2/restock",
            Some(a),
            &key,
            Some(body.clone()),
        )
        .await;
    let r2 = c
        .send(
            "POST",
            "/inventory/SKU-2/restock",
            Some(a),
            &key,
            Some(body),
        )
        .await;
    assert_eq!((r1.status, &r1.body), (r2.status, &r2.body));
    assert_error(
        &c.post("/inventory/SKU-1/restock", a, &json!({"quantity": 0}))
            .await,
        422,
        "invalid_field",
        Some("quantity"),
    );
    assert_error(
        &c.post("/inventory/SKU-1/restock", a, &json!({})).await,
        422,
        "invalid_field",
        Some("quantity"),
    );
    let r = c
        .send(
            "PUT",
            "/inventory/SKU-1/threshold",
            Some(a),
            &[],
            Some(json!({"threshold": 3}).to_string().into_bytes()),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(r.body["event_type"], "ThresholdSet");
    let r = c
        .send(
            "PUT",
            "/inventory/SKU-1/threshold",
            Some(a),
            &[],
            Some(json!({"threshold": -1}).to_string().into_bytes()),
        )
        .await;
    assert_error(&r, 422, "invalid_field", Some("threshold"));
    let env = &run.env;
    let commands = tokio::task::block_in_place(|| decoded(env, topics::INVENTORY_COMMANDS, 3));
    let mut seen: Vec<String> = commands
        .iter()
        .map(|(k, e)| match e {
            Event::StockRestocked(r) => format!("{k} restock {} {}", r.sku, r.quantity),
            Event::ThresholdSet(t) => format!("{k} threshold {} {}", t.sku, t.threshold),
            other => format!("{k} {other:?}"),
        })
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        [
            "store-a restock SKU-1 5",
            "store-a restock SKU-2 2",
            "store-a threshold SKU-1 3"
        ]
    );

    // A low-stock report (as the inventory stage writes it) opens an alert and a level.
    let low = json!({"event_type": "LowStock", "store_id": a, "sku": "SKU-1", "available": 1,
                     "threshold": 3, "trigger": "crossing", "occurred_at": common::now_ms()});
    let producer = run.env.producer();
    let topic = run.env.topic(topics::INVENTORY_THRESHOLD_REACHED);
    tokio::task::block_in_place(|| {
        producer.send(&topic, &common::Outgoing::new(a, low.to_string()))
    });
    let r = eventually(c, "a low-stock alert", "/alerts", a, &run.worker, |r| {
        r.body["items"].as_array().is_some_and(|i| !i.is_empty())
    })
    .await;
    let alert = &r.body["items"][0];
    assert_eq!(
        (alert["kind"].as_str(), alert["status"].as_str()),
        (Some("low_stock"), Some("open"))
    );
    let id = alert["id"].as_i64().expect("an alert ID");
    assert_eq!(c.get("/alerts", Some(b)).await.body["items"], json!([]));
    let r = c.get("/inventory?below_threshold=true", Some(a)).await;
    assert_eq!(r.body["items"][0]["sku"], "SKU-1", "{}", r.body);
    assert_eq!(c.get("/inventory", Some(b)).await.body["items"], json!([]));
    assert_error(
        &c.get("/inventory?below_threshold=maybe", Some(a)).await,
        400,
        "invalid_parameter",
        Some("below_threshold"),
    );

    assert_error(
        &c.post(&format!("/alerts/{id}/acknowledge"), b, &json!({}))
            .await,
        404,
        "alert_not_found",
        None,
    );
    let r = c
        .post(&format!("/alerts/{id}/acknowledge"), a, &json!({}))
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("acknowledged")),
        "{}",
        r.body
    );
    let r = c.get("/alerts?status=acknowledged", Some(a)).await;
    assert_eq!(r.body["items"][0]["id"], id);
    let r = c
        .post(&format!("/alerts/{id}/resolve"), a, &json!({}))
        .await;
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("resolved")),
        "{}",
        r.body
    );
    assert_error(
        &c.post(&format!("/alerts/{id}/resolve"), a, &json!({}))
            .await,
        409,
        "alert_already_resolved",
        None,
    );
    assert_error(
        &c.post(&format!("/alerts/{id}/acknowledge"), a, &json!({}))
            .await,
        409,
        "alert_already_resolved",
        None,
    );
    assert_error(
        &c.post("/alerts/999999/resolve", a, &json!({})).await,
        404,
        "alert_not_found",
        None,
    );
    assert_error(
        &c.post("/alerts/x/resolve", a, &json!({})).await,
        400,
        "invalid_parameter",
        Some("id"),
    );
    assert_error(
        &c.get("/alerts?status=new", Some(a)).await,
        400,
        "invalid_parameter",
        Some("status"),
    );

    // The API's own metrics count what it answered.
    let r = c.get("/metrics", None).await;
    let text = r.body.as_str().expect("text");
    assert!(
        text.contains(
            r#"orderflow_api_requests_total{method="POST",route="/orders",status="202"}"#
        ),
        "{text}"
    );
    assert!(
        text.contains(r#"orderflow_api_published_total{topic="order.created"} 5"#),
        "{text}"
    );
}

/// A lifecycle event of `store`'s `order` as a stage would publish it, at `at`.
fn lifecycle(store: &str, order: &str, event_type: &str, at: i64, extra: Value) -> String {
    let mut v = json!({"event_type": event_type, "order_id": order, "store_id": store,
        "correlation_id": order, "occurred_at": at,
        "event_id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID,
            format!("{store}/{order}/{event_type}").as_bytes()).to_string()});
    for (k, x) in extra.as_object().expect("an object") {
        v[k] = x.clone();
    }
    v.to_string()
}

async fn dashboard(run: &Running) {
    let c = &run.client;
    let (a, b) = ("store-a", "store-b");

    // The page: HTML, self-contained, no store needed.
    let r = c
        .http
        .get(format!("{}/", c.base))
        .send()
        .await
        .expect("the page");
    assert_eq!(r.status().as_u16(), 200);
    assert!(
        r.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/html"),
        "{:?}",
        r.headers()
    );
    let page = r.text().await.expect("the page's text");
    assert!(page.contains(r#"id="store-picker""#) && page.contains(r#"id="workflow-svg""#));

    // The stores the read side knows, by ID, across stores (what the picker offers).
    let r = c.get("/stores", None).await;
    assert_eq!(
        (r.status, &r.body),
        (200, &json!({"items": ["store-a", "store-b"]}))
    );
    let r = c.get("/stores?limit=1", None).await;
    assert_eq!(r.body, json!({"items": ["store-a"]}));
    assert_error(
        &c.get("/stores?limit=0", None).await,
        400,
        "invalid_parameter",
        Some("limit"),
    );
    assert_error(
        &c.get("/stores?store=a", None).await,
        400,
        "invalid_parameter",
        Some("store"),
    );

    // The workflow: orders moved through known milestones, at known times.
    let t0 = common::now_ms() - 120_000;
    let producer = run.env.producer();
    let screened_extra = |decision: &str| {
        json!({"decision": decision, "reasons": [], "customer_id": "c-1",
               "email": "c@example.com", "currency": "USD", "total_cents": 100,
               "items": [{"sku": "SKU-7", "quantity": 1, "unit_price_cents": 100}]})
    };
    let mut records = Vec::new();
    for (order, screened_after) in [("w-1", 100), ("w-2", 200), ("w-3", 300), ("w-4", 1000)] {
        let created = order_at(order, a, t0);
        records.push((topics::ORDER_CREATED, created));
        records.push((
            topics::ORDER_SCREENED,
            lifecycle(
                a,
                order,
                "OrderScreened",
                t0 + screened_after,
                screened_extra("approved"),
            ),
        ));
    }
    records.push((
        topics::INVENTORY_UPDATED,
        lifecycle(
            a,
            "w-1",
            "StockReserved",
            t0 + 150,
            json!({"customer_id": "c-1", "currency": "USD", "total_cents": 100,
                   "items": [{"sku": "SKU-7", "quantity": 1, "unit_price_cents": 100}]}),
        ),
    ));
    records.push((topics::ORDER_CREATED, order_at("w-5", a, t0)));
    records.push((
        topics::ORDER_SCREENED,
        lifecycle(a, "w-5", "OrderScreened", t0 + 40, {
            let mut v = screened_extra("rejected");
            v["reasons"] = json!(["velocity"]);
            v
        }),
    ));
    tokio::task::block_in_place(|| {
        for (base, value) in &records {
            producer.send(
                &run.env.topic(base),
                &common::Outgoing::new(a, value.clone()),
            );
        }
    });
    let r = eventually(
        c,
        "the workflow of store a",
        "/workflow",
        a,
        &run.worker,
        |r| {
            r.body["statuses"]["screened"] == 3
                && r.body["statuses"]["reserved"] == 1
                && r.body["statuses"]["rejected"] == 1
        },
    )
    .await;
    let w = &r.body;
    assert_eq!(w["window_ms"], 3_600_000);
    assert_eq!(
        w["statuses"],
        json!({"created": 3, "screened": 3, "reserved": 1, "paid": 0, "fulfilling": 0,
               "shipped": 0, "delivered": 0, "rejected": 1, "cancelled": 0, "refunded": 0})
    );
    let hop = |from: &str, to: &str, reason: Option<&str>| -> Value {
        w["hops"]
            .as_array()
            .expect("hops")
            .iter()
            .find(|h| h["from"] == from && h["to"] == to && h["reason"].as_str() == reason)
            .unwrap_or_else(|| panic!("no hop {from} -> {to}: {w}"))
            .clone()
    };
    // Four screenings after 100, 200, 300 and 1000 ms: nearest-rank median 200, p95 1000.
    assert_eq!(
        hop("created", "screened", None),
        json!({"from": "created", "to": "screened", "stage": "fraud", "count": 4,
               "per_minute": 0.07, "p50_ms": 200, "p95_ms": 1000})
    );
    assert_eq!(
        hop("screened", "reserved", None),
        json!({"from": "screened", "to": "reserved", "stage": "inventory", "count": 1,
               "per_minute": 0.02, "p50_ms": 50, "p95_ms": 50})
    );
    assert_eq!(hop("created", "rejected", Some("fraud"))["p50_ms"], 40);
    assert_eq!(hop("created", "rejected", Some("fraud"))["count"], 1);
    assert_eq!(
        hop("screened", "rejected", Some("out_of_stock"))["count"],
        0
    );
    assert_eq!(hop("reserved", "paid", None)["p95_ms"], Value::Null);
    assert_eq!(w["hops"].as_array().map(Vec::len), Some(9));
    // A window that ends before the hops: none counted, statuses the same.
    let r = c.get("/workflow?window=10s", Some(a)).await;
    assert_eq!(r.body["window_ms"], 10_000);
    assert_eq!(r.body["hops"][0]["count"], 0, "{}", r.body);
    assert_eq!(r.body["hops"][0]["p50_ms"], Value::Null);
    assert_eq!(r.body["statuses"]["screened"], 3);
    // Store b sees only its own order, and no hop of store a's.
    let r = c.get("/workflow?window=2h", Some(b)).await;
    assert_eq!(r.body["statuses"]["created"], 1, "{}", r.body);
    assert_eq!(r.body["statuses"]["screened"], 0);
    assert!(
        r.body["hops"]
            .as_array()
            .expect("hops")
            .iter()
            .all(|h| h["count"] == 0),
        "{}",
        r.body
    );
    for bad in ["1w", "5", "0m", "31d", "soon"] {
        assert_error(
            &c.get(&format!("/workflow?window={bad}"), Some(a)).await,
            400,
            "invalid_parameter",
            Some("window"),
        );
    }
    assert_error(
        &c.get("/workflow?from=0", Some(a)).await,
        400,
        "invalid_parameter",
        Some("from"),
    );
    assert_error(
        &c.get("/workflow", None).await,
        400,
        "missing_store_id",
        Some("X-Store-ID"),
    );

    // Recent orders: newest created first, one page, the store's own.
    let r = c.get("/orders?sort=recent&limit=500", Some(a)).await;
    let items = r.body["items"].as_array().expect("items");
    assert_eq!(items.len(), 8, "{}", r.body);
    assert!(items.iter().all(|o| o["store_id"] == a));
    let created: Vec<i64> = items
        .iter()
        .map(|o| o["created_at"].as_i64().expect("a creation time"))
        .collect();
    assert!(
        created.windows(2).all(|p| p[0] >= p[1]),
        "not newest first: {created:?}"
    );
    assert_eq!(r.body["next_cursor"], Value::Null);
    let r2 = c.get("/orders?sort=recent&limit=2", Some(a)).await;
    assert_eq!(r2.body["items"].as_array().map(Vec::len), Some(2));
    assert_eq!(r2.body["items"][0], items[0]);
    let r = c.get("/orders?sort=recent", Some(b)).await;
    assert_eq!(r.body["items"][0]["order_id"], "o-b1");
    assert_eq!(r.body["items"].as_array().map(Vec::len), Some(1));
    assert_error(
        &c.get("/orders?sort=newest", Some(a)).await,
        400,
        "invalid_parameter",
        Some("sort"),
    );
    assert_error(
        &c.get("/orders?sort=recent&cursor=o-1", Some(a)).await,
        400,
        "invalid_parameter",
        Some("cursor"),
    );
    assert_error(
        &c.get("/orders?sort=recent&status=created", Some(a)).await,
        400,
        "invalid_parameter",
        Some("status"),
    );

    // The alert stream: store a's one alert was opened, acknowledged and resolved.
    let changes = read_events(c, "/alerts/events", a, None, 3).await;
    let kinds: Vec<&str> = changes.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["opened", "acknowledged", "resolved"]);
    let seqs: Vec<i64> = changes
        .iter()
        .map(|(id, _, d)| {
            assert_eq!(
                d["seq"].as_i64().map(|s| s.to_string()).as_deref(),
                Some(id.as_str())
            );
            id.parse().expect("a numeric event id")
        })
        .collect();
    assert!(seqs.windows(2).all(|p| p[0] < p[1]), "{seqs:?}");
    let alert_id = &changes[0].2["alert"]["id"];
    for (_, _, d) in &changes {
        assert_eq!(&d["alert"]["id"], alert_id);
        assert_eq!(d["alert"]["store_id"], a);
        // The alert as it is now.
        assert_eq!(d["alert"]["status"], "resolved");
    }
    assert_eq!(changes[0].2["alert"]["kind"], "low_stock");
    // Resuming after the opening gives the two later changes.
    let resumed = read_events(c, "/alerts/events", a, Some(&changes[0].0), 2).await;
    assert_eq!(
        resumed
            .iter()
            .map(|(id, _, _)| id.as_str())
            .collect::<Vec<_>>(),
        [changes[1].0.as_str(), changes[2].0.as_str()]
    );
    // Live: a stream resumed after the last change sees the next opening as it happens,
    // and store b's stream starts with its own alert, never store a's.
    let live = {
        let client = Client {
            http: reqwest::Client::new(),
            base: c.base.clone(),
        };
        let last = changes[2].0.clone();
        tokio::spawn(async move {
            read_events(&client, "/alerts/events", "store-a", Some(&last), 1).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let low = |store: &str, sku: &str| {
        json!({"event_type": "LowStock", "store_id": store, "sku": sku, "available": 0,
               "threshold": 2, "trigger": "crossing", "occurred_at": common::now_ms()})
        .to_string()
    };
    let topic = run.env.topic(topics::INVENTORY_THRESHOLD_REACHED);
    tokio::task::block_in_place(|| {
        producer.send(&topic, &common::Outgoing::new(a, low(a, "SKU-3")));
        producer.send(&topic, &common::Outgoing::new(b, low(b, "SKU-B")));
    });
    let live = tokio::time::timeout(Duration::from_secs(60), live)
        .await
        .expect("the live change within a minute")
        .expect("the stream task");
    assert_eq!(live[0].1, "opened");
    assert_eq!(
        (
            live[0].2["alert"]["subject"].as_str(),
            live[0].2["alert"]["store_id"].as_str()
        ),
        (Some("SKU-3"), Some(a))
    );
    let of_b = read_events(c, "/alerts/events", b, None, 1).await;
    assert_eq!(
        (
            of_b[0].1.as_str(),
            of_b[0].2["alert"]["subject"].as_str(),
            of_b[0].2["alert"]["store_id"].as_str()
        ),
        ("opened", Some("SKU-B"), Some(b))
    );
    // An acknowledgement through the API is a change of the stream too.
    let id = live[0].2["alert"]["id"].as_i64().expect("an alert ID");
    let r = c
        .post(&format!("/alerts/{id}/acknowledge"), a, &json!({}))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let next = read_events(c, "/alerts/events", a, Some(&live[0].0), 1).await;
    assert_eq!(
        (next[0].1.as_str(), next[0].2["alert"]["id"].as_i64()),
        ("acknowledged", Some(id))
    );
    // Errors: no store, and a resume point that is not one of the stream's.
    assert_error(
        &c.get("/alerts/events", None).await,
        400,
        "missing_store_id",
        Some("X-Store-ID"),
    );
    assert_error(
        &c.send(
            "GET",
            "/alerts/events",
            Some(a),
            &[("Last-Event-ID", "abc")],
            None,
        )
        .await,
        400,
        "invalid_parameter",
        Some("Last-Event-ID"),
    );
}

/// On PostgreSQL, writers of alerts commit one after the other: while one transaction
/// that opened an alert is open, another that acknowledges an alert of the same store
/// waits, so the stream (which only moves forward through the change log) never sees a
/// later change before an earlier one.
async fn alert_changes_become_visible_in_order(url: &str) {
    use sqlx::Connection as _;
    let store = "store-lock";
    let db = Db::connect(url).await.expect("the database");
    let mut first = sqlx::PgConnection::connect(url).await.expect("connecting");
    let mut second = sqlx::PgConnection::connect(url).await.expect("connecting");
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO alerts (store_id, kind, subject, status, opened_at, last_seen_at, occurrences, detail) \
         VALUES ($1, 'dead_letters', 'fraud/decode', 'open', 1, 1, 1, '{}') RETURNING id",
    )
    .bind(store)
    .fetch_one(&mut second)
    .await
    .expect("an alert");
    let before = db
        .alert_changes_after(store, -1, 100)
        .await
        .expect("changes");
    assert_eq!(before.len(), 1);

    // The first writer opens an alert and keeps its transaction open...
    let mut tx = first.begin().await.expect("a transaction");
    sqlx::query(
        "INSERT INTO alerts (store_id, kind, subject, status, opened_at, last_seen_at, occurrences, detail) \
         VALUES ($1, 'low_stock', 'SKU-L', 'open', 2, 2, 1, '{}')",
    )
    .bind(store)
    .execute(&mut *tx)
    .await
    .expect("opening an alert");
    // ...the second one's acknowledgement waits for it...
    let acknowledge = tokio::spawn(async move {
        sqlx::query("UPDATE alerts SET status = 'acknowledged', acknowledged_at = 3 WHERE id = $1")
            .bind(id)
            .execute(&mut second)
            .await
            .expect("acknowledging")
            .rows_affected()
    });
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(!acknowledge.is_finished(), "a second writer did not wait");
    assert_eq!(
        db.alert_changes_after(store, -1, 100)
            .await
            .expect("changes")
            .len(),
        1
    );
    // ...and commits after it, with the later position.
    tx.commit().await.expect("commit");
    assert_eq!(acknowledge.await.expect("the task"), 1);
    let changes: Vec<(String, String)> = db
        .alert_changes_after(store, before[0].seq, 100)
        .await
        .expect("changes")
        .into_iter()
        .map(|c| (c.change, c.alert.subject))
        .collect();
    assert_eq!(
        changes,
        [
            ("opened".to_owned(), "SKU-L".to_owned()),
            ("acknowledged".to_owned(), "fraud/decode".to_owned())
        ]
    );
}

/// An `OrderCreated` of the contract's JSON for `store`, occurred at `at`.
fn order_at(order_id: &str, store: &str, at: i64) -> String {
    let mut v = order(order_id, store);
    v["occurred_at"] = json!(at);
    v["event_type"] = json!("OrderCreated");
    v.to_string()
}

/// `orderflow api` as a process: it serves health, readiness, metrics and a document that
/// lists exactly the routes it serves.
#[test]
fn the_binary_serves_its_openapi_document_and_health() {
    let env = TestEnv::new("api-binary", 1);
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}", dir.path().join("api.db").display());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ORDERFLOW_") {
            cmd.env_remove(k);
        }
    }
    let mut child: Child = cmd
        .arg("api")
        .env("ORDERFLOW_BROKERS", &env.settings.brokers)
        .env("ORDERFLOW_TOPIC_PREFIX", &env.settings.topic_prefix)
        .env("ORDERFLOW_API_ADDR", "127.0.0.1:0")
        .env("ORDERFLOW_DATABASE_URL", &url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawning orderflow api");
    let pid = child.id();
    let stdout = child.stdout.take().expect("stdout");
    let line = {
        use std::io::BufRead;
        let mut line = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut line)
            .expect("a line");
        line
    };
    let base = line
        .trim()
        .strip_prefix("orderflow api listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    let result = std::panic::catch_unwind(|| {
        common::block_on(async {
            let c = Client {
                http: reqwest::Client::new(),
                base: base.clone(),
            };
            assert_eq!(c.get("/healthz", None).await.body, json!({"status": "ok"}));
            let r = c.get("/readyz", None).await;
            assert_eq!((r.status, &r.body), (200, &json!({"status": "ready"})));
            let doc = c.get("/openapi.json", None).await.body;
            assert_eq!(doc["openapi"], "3.0.3");
            let paths = doc["paths"].as_object().expect("paths");
            let mut operations = 0;
            for (path, item) in paths {
                for method in item.as_object().expect("an item").keys() {
                    operations += 1;
                    // Every documented operation is served: the router answers it with
                    // anything but "no such route" or "method not allowed". (A stream
                    // of an unknown order is a 404 of its own.)
                    let concrete = path.replace("{id}", "no-such-id").replace("{sku}", "SKU-0");
                    // (The store's alert stream never ends: a malformed resume point
                    // makes it answer at once.)
                    let headers: &[(&str, &str)] = if concrete == "/alerts/events" {
                        &[("Last-Event-ID", "not-a-position")]
                    } else {
                        &[]
                    };
                    let r = c
                        .send(
                            &method.to_uppercase(),
                            &concrete,
                            Some("store-doc"),
                            headers,
                            Some(b"{}".to_vec()),
                        )
                        .await;
                    assert_ne!(r.status, 405, "{method} {path}: {}", r.body);
                    assert_ne!(
                        r.body["error"]["code"], "route_not_found",
                        "{method} {path}"
                    );
                }
            }
            // ...and exactly those: the table behind both has 22 operations, and what
            // is not documented is not served.
            assert_eq!(operations, api::ROUTES.len());
            assert_eq!(operations, 22);
            assert_error(
                &c.get("/orders/o/nothing", Some("s")).await,
                404,
                "route_not_found",
                None,
            );
            assert_error(
                &c.send("DELETE", "/orders", Some("s"), &[], None).await,
                405,
                "method_not_allowed",
                None,
            );
            let metrics = c.get("/metrics", None).await.body;
            assert!(
                metrics
                    .as_str()
                    .is_some_and(|m| m.contains("orderflow_api_requests_total"))
            );
        })
    });
    // Stop the process this test started, by its PID, whatever happened.
    let _ = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let until = Instant::now() + Duration::from_secs(10);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(100));
    }
    if child.try_wait().ok().flatten().is_none() {
        let _ = child.kill();
    }
    let status = child.wait().expect("the API process ends");
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
    assert!(
        status.success(),
        "orderflow api exited with {status} on SIGTERM"
    );
}
