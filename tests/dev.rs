//! `orderflow dev` and `orderflow seed` as an operator runs them: the built binary.
//!
//! `orderflow dev` owns its embedded log (the mock cluster), so its test needs no broker:
//! it starts the process on a free port and a temporary data directory, waits for
//! `/readyz`, follows simulated and API-placed orders to `delivered` through the API,
//! checks the seeded stock, stops it with SIGINT (exit 0 within a bound) and starts it
//! again on the same directory, which must begin empty and work. `orderflow seed` runs
//! twice against the test broker (ORDERFLOW_TEST_BROKERS; it panics when unset), and the
//! topic must hold the same commands twice, under the same derived event IDs.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use orderflow::cli::dev;
use orderflow::events::ID_NAMESPACE;
use orderflow::stages::payment::authorization_key;
use serde_json::{Value, json};

/// How long a dev process may take to print its address, and then to answer `/readyz`.
const START_WITHIN: Duration = Duration::from_secs(60);
/// How long an order may take from placed to delivered through the API.
const DELIVER_WITHIN: Duration = Duration::from_secs(90);
/// How long the process may take to exit after SIGINT.
const STOP_WITHIN: Duration = Duration::from_secs(30);

/// A running `orderflow dev` process; killed if the test fails before stopping it.
struct DevProcess {
    child: Child,
    base: String,
    banner: Vec<String>,
    log: std::path::PathBuf,
    /// From spawning the process to the first `/readyz` 200.
    ready_after: Duration,
}

impl Drop for DevProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl DevProcess {
    fn start(data_dir: &Path, load: &str, tag: &str) -> DevProcess {
        std::fs::create_dir_all(common::test_log_dir()).expect("creating the test log directory");
        let log = common::test_log_dir().join(format!("dev-{tag}-{}.log", common::unique()));
        let stderr = std::fs::File::create(&log).expect("creating the dev log file");
        let started = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .args(["dev", "--port", "0", "--load", load, "--data-dir"])
            .arg(data_dir)
            // The process's own defaults, not the test environment's.
            .env_remove("ORDERFLOW_BROKERS")
            .env_remove("ORDERFLOW_DATABASE_URL")
            .env_remove("ORDERFLOW_TOPIC_PREFIX")
            .env("RUST_LOG", "info,rdkafka=warn,sqlx=warn")
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawning orderflow dev");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut banner = Vec::new();
        let deadline = started + START_WITHIN;
        // The banner ends with the "ready in" line; the address is on its first line.
        while !banner.iter().any(|l: &String| l.starts_with("ready in ")) {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => banner.push(line),
                Err(_) => panic!(
                    "orderflow dev printed no complete banner within {START_WITHIN:?} (got {banner:?}); log:\n{}",
                    common::tail_file(&log, 60)
                ),
            }
        }
        let base = banner
            .iter()
            .find_map(|l| l.strip_prefix("orderflow dev listening on "))
            .unwrap_or_else(|| panic!("no address in the banner {banner:?}"))
            .trim()
            .to_owned();
        let mut dev = DevProcess {
            child,
            base,
            banner,
            log,
            ready_after: Duration::ZERO,
        };
        dev.wait_until(deadline, "/readyz answers 200", || {
            (dev.get("/readyz", None).0 == 200).then_some(())
        });
        dev.ready_after = started.elapsed();
        eprintln!(
            "[dev {tag}] first /readyz 200 after {:.2}s",
            dev.ready_after.as_secs_f64()
        );
        dev
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        store: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let url = format!("{}{path}", self.base);
        common::block_on(async {
            let client = reqwest::Client::new();
            let mut req = client
                .request(method.parse().expect("a method"), &url)
                .timeout(Duration::from_secs(10));
            if let Some(s) = store {
                req = req.header("X-Store-ID", s);
            }
            if let Some(b) = body {
                req = req
                    .header("Content-Type", "application/json")
                    .body(b.to_string());
            }
            match req.send().await {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    (
                        status,
                        serde_json::from_str(&text).unwrap_or(Value::String(text)),
                    )
                }
                // Not listening (yet, or any more): not an HTTP status.
                Err(e) => (0, Value::String(e.to_string())),
            }
        })
    }

    fn get(&self, path: &str, store: Option<&str>) -> (u16, Value) {
        self.request("GET", path, store, None)
    }

    /// Polls `check` until it gives a value; panics at `deadline` with the process's log.
    fn wait_until<T>(
        &self,
        deadline: Instant,
        what: &str,
        mut check: impl FnMut() -> Option<T>,
    ) -> T {
        loop {
            if let Some(v) = check() {
                return v;
            }
            if Instant::now() > deadline {
                panic!(
                    "orderflow dev: {what}: not within the deadline; log:\n{}",
                    common::tail_file(&self.log, 80)
                );
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Sends SIGINT and waits (bounded) for the exit status.
    fn interrupt(&mut self) -> std::process::ExitStatus {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -INT failed: {status}");
        let deadline = Instant::now() + STOP_WITHIN;
        loop {
            if let Some(s) = self.child.try_wait().expect("waiting for orderflow dev") {
                return s;
            }
            if Instant::now() > deadline {
                panic!(
                    "orderflow dev did not exit within {STOP_WITHIN:?} of SIGINT; log:\n{}",
                    common::tail_file(&self.log, 80)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Places an order through the API.
    fn place(&self, store: &str, order_id: &str, sku: &str) {
        let body = json!({
            "order_id": order_id,
            "customer_id": format!("c-{order_id}"),
            "email": format!("{order_id}@example.com"),
            "currency": "USD",
            "shipping_country": "US",
            "items": [{"sku": sku, "quantity": 1, "unit_price_cents": 1999}],
            "placed_at": chrono::Utc::now().to_rfc3339(),
        });
        let (status, answer) = self.request("POST", "/orders", Some(store), Some(&body));
        assert_eq!(status, 202, "POST /orders answered {answer}");
        assert_eq!(answer["order_id"], order_id, "{answer}");
    }

    /// Waits until `order_id` is delivered; returns the order with its timeline.
    fn delivered(&self, store: &str, order_id: &str) -> Value {
        let deadline = Instant::now() + DELIVER_WITHIN;
        self.wait_until(deadline, &format!("order {order_id} delivered"), || {
            let (status, order) = self.get(&format!("/orders/{order_id}"), Some(store));
            (status == 200 && order["order"]["status"] == "delivered").then_some(order)
        })
    }
}

/// An order ID of this run that the dev gateway authorizes and the dev carrier delivers
/// (both decide by the key alone), so the test cannot meet a planned decline.
fn deliverable_order_id(store: &str, tag: &str) -> String {
    let (gateway, carrier) = (dev::gateway_config(), dev::carrier_config());
    (0..)
        .map(|i| format!("o-test-{tag}-{i}"))
        .find(|id| {
            gateway
                .decline_reason(&authorization_key(store, id))
                .is_none()
                && !carrier.delivery_fails(store, id)
        })
        .expect("some order ID is deliverable")
}

fn event_types(order: &Value) -> Vec<String> {
    order["timeline"]
        .as_array()
        .unwrap_or_else(|| panic!("no timeline in {order}"))
        .iter()
        .map(|e| e["event_type"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn dev_runs_the_whole_system_stops_on_sigint_and_starts_fresh() {
    let data = tempfile::tempdir().expect("a temporary data directory");
    let mut first = DevProcess::start(data.path(), "5", "first");
    assert!(
        first.banner.iter().any(|l| l.contains("/openapi.json"))
            && first.banner.iter().any(|l| l.contains("mock cluster")),
        "the banner names the API document and what is embedded: {:?}",
        first.banner
    );

    // The seeded stock: every demo SKU of a store has the threshold the seeding set
    // (a fifth of its stock; SKU-00001 is the thinly stocked best seller).
    let store = "store-003";
    let levels = first.wait_until(
        Instant::now() + DELIVER_WITHIN,
        "the seeded stock of store-003 in /inventory",
        || {
            let (status, body) = first.get("/inventory", Some(store));
            let items = body["items"].as_array()?.clone();
            // A threshold is a command the sinks read as it is; a level is the inventory
            // stage's answer to a restock, read later: wait for both.
            (status == 200
                && items.len() == 20
                && items
                    .iter()
                    .all(|i| i["threshold"].is_i64() && i["available"].is_i64()))
            .then_some(items)
        },
    );
    let thresholds: BTreeMap<String, i64> = levels
        .iter()
        .map(|i| {
            (
                i["sku"].as_str().unwrap_or_default().to_owned(),
                i["threshold"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    let expected: BTreeMap<String, i64> = (1..=20)
        .map(|k| (format!("SKU-{k:05}"), if k == 1 { 5 } else { 200 }))
        .collect();
    assert_eq!(thresholds, expected, "seeded thresholds of {store}");
    for i in &levels {
        let available = i["available"].as_i64();
        let cap = if i["sku"] == "SKU-00001" { 25 } else { 1_000 };
        assert!(
            available.is_some_and(|a| (0..=cap).contains(&a)),
            "{store} {}: available {available:?}, seeded {cap}",
            i["sku"]
        );
    }

    // Simulated orders reach delivered at the busiest demo store.
    let delivered = first.wait_until(
        Instant::now() + DELIVER_WITHIN,
        "simulated orders of store-001 delivered",
        || {
            let (status, page) = first.get("/orders?status=delivered&limit=500", Some("store-001"));
            let items = page["items"].as_array()?.clone();
            (status == 200 && !items.is_empty()).then_some(items)
        },
    );
    for o in &delivered {
        assert_eq!(o["status"], "delivered", "{o}");
        assert_eq!(o["store_id"], "store-001", "{o}");
        assert!(
            o["order_id"]
                .as_str()
                .is_some_and(|id| id.starts_with("o-dev")),
            "{o}"
        );
    }

    // An order placed through the API goes all the way, with its whole timeline.
    let order_id = deliverable_order_id("store-002", "first");
    first.place("store-002", &order_id, "SKU-00007");
    let order = first.delivered("store-002", &order_id);
    let types = event_types(&order);
    for t in [
        "OrderCreated",
        "OrderScreened",
        "StockReserved",
        "PaymentAuthorized",
        "Picking",
        "Packed",
        "ReadyToShip",
        "Shipped",
        "InTransit",
        "OutForDelivery",
        "Delivered",
    ] {
        assert!(
            types.iter().any(|x| x == t),
            "{order_id}'s timeline lacks {t}: {types:?}"
        );
    }
    for at in [
        "created_at",
        "screened_at",
        "reserved_at",
        "paid_at",
        "shipped_at",
        "delivered_at",
    ] {
        assert!(
            order["order"][at].is_i64(),
            "{order_id} has no {at}: {}",
            order["order"]
        );
    }

    let status = first.interrupt();
    assert_eq!(
        status.code(),
        Some(0),
        "orderflow dev's exit after SIGINT: {status}; log:\n{}",
        common::tail_file(&first.log, 40)
    );
    let log = std::fs::read_to_string(&first.log).unwrap_or_default();
    for line in [
        "traffic stopped",
        "stages stopped",
        "sinks stopped",
        "orderflow dev stopped",
    ] {
        assert!(
            log.contains(line),
            "the shutdown logs {line:?}:\n{}",
            common::tail_file(&first.log, 40)
        );
    }
    let previous = order_id;
    drop(first);

    // A second start on the same directory begins empty, and works.
    let second = DevProcess::start(data.path(), "0", "second");
    assert!(
        second
            .banner
            .iter()
            .any(|l| l.contains("deleted the previous run's") && l.contains("orderflow.db")),
        "the banner says the previous run's data was cleared: {:?}",
        second.banner
    );
    let (status, page) = second.get("/orders?limit=500", Some("store-001"));
    assert_eq!(
        (status, &page["items"]),
        (200, &json!([])),
        "no orders of the first run: {page}"
    );
    let (status, _) = second.get(&format!("/orders/{previous}"), Some("store-002"));
    assert_eq!(status, 404, "the first run's API order is gone");
    let order_id = deliverable_order_id("store-004", "second");
    second.place("store-004", &order_id, "SKU-00003");
    let order = second.delivered("store-004", &order_id);
    assert!(
        event_types(&order).iter().any(|t| t == "Delivered"),
        "{order}"
    );
    let (status, page) = second.get("/orders?limit=500", Some("store-004"));
    assert_eq!(status, 200);
    let ids: Vec<&str> = page["items"]
        .as_array()
        .expect("items")
        .iter()
        .filter_map(|o| o["order_id"].as_str())
        .collect();
    assert_eq!(
        ids,
        vec![order_id.as_str()],
        "with --load 0 the API's order is the only one"
    );
    let mut second = second;
    let status = second.interrupt();
    assert_eq!(status.code(), Some(0), "second exit: {status}");
}

/// `orderflow seed` publishes a restock and a threshold per (store, SKU), keyed by store,
/// with event IDs derived from the run ID: seeding twice publishes the same commands.
#[test]
fn seed_publishes_the_demo_stock_with_deterministic_ids() {
    let env = common::TestEnv::new("seed", 3);
    let seed = || {
        let out = Command::new(env!("CARGO_BIN_EXE_orderflow"))
            .args([
                "seed",
                "--stores",
                "2",
                "--skus",
                "3",
                "--low-stock-skus",
                "1",
                "--low-stock-units",
                "10",
            ])
            .env("ORDERFLOW_BROKERS", &env.settings.brokers)
            .env("ORDERFLOW_TOPIC_PREFIX", &env.settings.topic_prefix)
            .output()
            .expect("running orderflow seed");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "orderflow seed failed: {}\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            stdout.contains("published 12 inventory commands"),
            "{stdout}"
        );
    };
    seed();
    seed();
    let topic = env.topic(orderflow::topics::INVENTORY_COMMANDS);
    let records = common::read_all(&env.settings.brokers, &topic, 24, common::deadline(30));
    assert_eq!(
        records.len(),
        24,
        "two seedings of 2 stores × 3 SKUs × (restock, threshold)"
    );

    // Per event ID: how often, and the command without its timestamp.
    let mut by_id: BTreeMap<String, (usize, Value)> = BTreeMap::new();
    let mut partitions: BTreeMap<String, BTreeSet<i32>> = BTreeMap::new();
    for r in &records {
        let mut v: Value =
            serde_json::from_slice(r.value.as_deref().expect("a value")).expect("JSON");
        let store = v["store_id"].as_str().expect("store_id").to_owned();
        assert_eq!(
            r.key_str().as_deref(),
            Some(store.as_str()),
            "keyed by store: {v}"
        );
        partitions.entry(store).or_default().insert(r.partition);
        let id = v["event_id"].as_str().expect("event_id").to_owned();
        v.as_object_mut().expect("an object").remove("occurred_at");
        let entry = by_id.entry(id).or_insert((0, v.clone()));
        entry.0 += 1;
        assert_eq!(entry.1, v, "one event ID, one content");
    }
    for (store, ps) in &partitions {
        assert_eq!(
            ps.len(),
            1,
            "{store}'s commands share one partition: {ps:?}"
        );
    }
    let mut expected: BTreeMap<String, (usize, Value)> = BTreeMap::new();
    for s in 1..=2 {
        let store = format!("store-{s:03}");
        for k in 1..=3 {
            let sku = format!("SKU-{k:05}");
            let quantity = if k == 1 { 10 } else { 1_000 };
            let id = |kind: &str| {
                uuid::Uuid::new_v5(
                    &ID_NAMESPACE,
                    format!("load/seed/{store}/{sku}/{kind}").as_bytes(),
                )
                .to_string()
            };
            expected.insert(
                id("restock"),
                (2, json!({"event_type": "StockRestocked", "event_id": id("restock"), "store_id": store,
                    "sku": sku, "quantity": quantity, "note": "orderflow load seed: initial stock"})),
            );
            expected.insert(
                id("threshold"),
                (2, json!({"event_type": "ThresholdSet", "event_id": id("threshold"), "store_id": store,
                    "sku": sku, "threshold": quantity / 5})),
            );
        }
    }
    assert_eq!(by_id, expected);
}
