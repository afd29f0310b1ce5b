//! The operators' commands against the real broker, run as an operator would: the
//! `orderflow` binary with the deployment's environment.
//!
//! - `replay` of the fraud stage's whole input, with its workers stopped, makes the
//!   stage read it all again (a record dead-lettered before is dead-lettered again: the
//!   input really was re-read) and yields no new effect (the same screenings, same IDs,
//!   same bytes); the command refuses while the group has a live member.
//! - `dlq redrive`: an order missing a field, dead-lettered by a running fraud worker,
//!   redriven as it is comes back with `orderflow.redrive.count` 1; redriven with
//!   `--edit` (fixed) it is screened once; a redrive beyond `--max-redrives` is refused.
//! - `lag`: a stopped worker and a known backlog show as exactly that lag, with the
//!   oldest unprocessed record's time.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};
use std::time::Duration;

use common::*;
use orderflow::topics;

/// Runs `orderflow ARGS` in `env`'s deployment.
fn orderflow(env: &TestEnv, args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ORDERFLOW_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(args)
        .env("ORDERFLOW_BROKERS", &env.settings.brokers)
        .env("ORDERFLOW_TOPIC_PREFIX", &env.settings.topic_prefix)
        .env("ORDERFLOW_GROUP_PREFIX", &env.settings.group_prefix)
        .env("ORDERFLOW_GUARANTEE", env.settings.guarantee.to_string())
        .env("RUST_LOG", "warn")
        .output()
        .expect("running orderflow");
    eprintln!(
        "$ orderflow {}\n{}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Waits until the stage's group has no member (a killed worker's session expired).
fn wait_for_empty_group(env: &TestEnv, stage: &str) {
    wait_for(
        &format!("the {stage} group to have no member"),
        deadline(60),
        &[],
        |progress| {
            let g = stage_group(env, stage);
            *progress = format!("{g:?}");
            match g {
                Some((_, members)) if !members.is_empty() => None,
                _ => Some(()),
            }
        },
    );
}

/// The total lag line of `orderflow lag`.
fn total_lag(env: &TestEnv, stage: &str) -> i64 {
    let out = orderflow(env, &["lag", "--stages", stage]);
    assert!(out.status.success(), "lag failed: {}", stderr(&out));
    stdout(&out)
        .lines()
        .find_map(|l| l.strip_prefix("total lag: "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no total lag in {}", stdout(&out)))
}

/// A record's key and value.
type KeyValue = (Option<Vec<u8>>, Option<Vec<u8>>);

/// Screenings by event ID: their key and value bytes.
fn screenings(env: &TestEnv) -> BTreeMap<String, BTreeSet<KeyValue>> {
    let mut tail = ScreenedTail::new(env);
    tail.drain();
    let mut out: BTreeMap<String, BTreeSet<_>> = BTreeMap::new();
    let by_offset: BTreeMap<(i32, i64), &Rec> = tail
        .collector
        .records
        .iter()
        .map(|r| ((r.partition, r.offset), r))
        .collect();
    for list in tail.screenings.by_order.values() {
        for s in list {
            let r = by_offset[&(s.partition, s.offset)];
            out.entry(s.event_id().to_owned())
                .or_default()
                .insert((r.key.clone(), r.value.clone()));
        }
    }
    out
}

#[test]
fn replaying_a_stages_whole_input_reads_it_again_without_new_effects() {
    replay_fraud(TestEnv::new("ops-replay", 2));
}

/// The same on the transactional broker under `exactly_once`: the restore that takes the
/// request does not judge the last batch by the group's offsets the replay moved.
#[test]
fn exactly_once_replaying_a_stages_whole_input_reads_it_again_without_new_effects() {
    replay_fraud(TestEnv::exactly_once("ops-replay-eos", 2));
}

/// Stops `worker` with SIGTERM (it finishes its batch and leaves its group) and waits.
fn stop(worker: &Worker) {
    let status = Command::new("kill")
        .arg(worker.pid().to_string())
        .status()
        .expect("kill");
    assert!(status.success());
    wait_for("the worker to exit", deadline(30), &[], |_| {
        std::thread::sleep(Duration::from_millis(100));
        worker.exit_status()
    });
}

fn replay_fraud(env: TestEnv) {
    let producer = env.producer();
    let t0 = now_ms();
    let orders: Vec<TestOrder> = (0..20)
        .map(|i| {
            TestOrder::new(
                format!("o-{i}"),
                format!("store-{}", i % 4),
                format!("c-{i}"),
                t0,
            )
        })
        .collect();
    let created = env.topic(topics::ORDER_CREATED);
    for o in &orders[..10] {
        producer.send(&created, &o.outgoing());
    }
    // A record that can never be processed: dead-lettered at every reading.
    producer.send(
        &created,
        &Outgoing::new("store-0", b"not an order".to_vec()),
    );
    for o in &orders[10..] {
        producer.send(&created, &o.outgoing());
    }
    let worker = env.spawn_fraud_worker(&FraudOpts::default());
    let mut tail = ScreenedTail::new(&env);
    tail.wait_for_orders(20, deadline(60), &[&worker]);
    let dlq = env.topic(topics::DLQ);
    read_all(&env.settings.brokers, &dlq, 1, deadline(30));
    wait_for(
        "the fraud stage to catch up",
        deadline(30),
        &[&worker],
        |p| {
            let lag = total_lag(&env, "fraud");
            *p = format!("lag {lag}");
            (lag == 0).then_some(())
        },
    );
    let before = screenings(&env);
    assert_eq!(before.len(), 20);

    // Refused while a worker is in the group.
    wait_for_group_members(&env, "fraud", 1, deadline(30));
    let refused = orderflow(
        &env,
        &["replay", "--stage", "fraud", "--to-earliest", "--execute"],
    );
    assert!(!refused.status.success());
    assert!(
        stderr(&refused).contains("live member"),
        "{}",
        stderr(&refused)
    );

    stop(&worker);
    wait_for_empty_group(&env, "fraud");

    // The plan: every partition from the state's position back to the start, 21 records.
    let plan = orderflow(&env, &["replay", "--stage", "fraud", "--to-earliest"]);
    assert!(plan.status.success(), "{}", stderr(&plan));
    let text = stdout(&plan);
    assert!(
        text.contains("state"),
        "positions come from the state: {text}"
    );
    assert!(text.contains("plan only: 21 records"), "{text}");
    // One partition only, shifted back by one record.
    let one = orderflow(
        &env,
        &[
            "replay",
            "--stage",
            "fraud",
            "--topic",
            "order.created:1",
            "--shift-by",
            "-1",
        ],
    );
    assert!(
        stdout(&one).contains("plan only: 1 records"),
        "{}",
        stdout(&one)
    );
    // Nothing was moved by a plan.
    assert_eq!(total_lag(&env, "fraud"), 0);

    let exec = orderflow(
        &env,
        &["replay", "--stage", "fraud", "--to-earliest", "--execute"],
    );
    assert!(exec.status.success(), "{}", stderr(&exec));

    let worker = env.spawn_fraud_worker(&FraudOpts::default());
    // The bad record was read again: a second dead letter for the same source offset.
    let letters = read_all(&env.settings.brokers, &dlq, 2, deadline(60));
    assert_eq!(letters.len(), 2);
    assert_eq!(
        letters[0].header_str("orderflow.source.offset"),
        letters[1].header_str("orderflow.source.offset")
    );
    wait_for(
        "the fraud stage to catch up again",
        deadline(30),
        &[&worker],
        |p| {
            let lag = total_lag(&env, "fraud");
            *p = format!("lag {lag}");
            (lag == 0).then_some(())
        },
    );
    std::thread::sleep(Duration::from_millis(500));
    // No new effect: the same screenings, same IDs, one content each.
    let after = screenings(&env);
    assert_eq!(after, before);
    assert!(after.values().all(|contents| contents.len() == 1));
    assert_eq!(read_topic(&env.settings.brokers, &dlq).len(), 2);
    worker.assert_alive();
}

fn rec(store: &str, v: serde_json::Value) -> Outgoing {
    Outgoing::new(store, serde_json::to_vec(&v).expect("JSON"))
}

/// Every record of an output topic by event ID: its event type and value bytes.
fn events_by_id(env: &TestEnv, base: &str) -> BTreeMap<String, BTreeSet<(String, Vec<u8>)>> {
    let codec = orderflow::events::codec::Codec::new();
    let mut out: BTreeMap<String, BTreeSet<(String, Vec<u8>)>> = BTreeMap::new();
    for r in read_topic(&env.settings.brokers, &env.topic(base)) {
        let value = r.value.clone().unwrap_or_default();
        let ty = r.header_str("event-type");
        let e = codec
            .decode(
                &value,
                orderflow::events::codec::DecodeHints {
                    header_type: ty.as_deref(),
                    topic_default: None,
                    origin: None,
                },
            )
            .expect("an output decodes");
        out.entry(e.envelope().event_id.clone())
            .or_default()
            .insert((format!("{:?}", e.event_type()), value));
    }
    out
}

/// The level the probe tagged `tag` reported for `sku` (a zero adjustment answers with
/// the current level).
fn probed(env: &TestEnv, sku: &str, tag: &str) -> Option<i32> {
    let codec = orderflow::events::codec::Codec::new();
    read_topic(&env.settings.brokers, &env.topic(topics::INVENTORY_UPDATED))
        .iter()
        .find_map(|r| {
            let ty = r.header_str("event-type");
            let e = codec
                .decode(
                    r.value.as_deref().unwrap_or_default(),
                    orderflow::events::codec::DecodeHints {
                        header_type: ty.as_deref(),
                        topic_default: None,
                        origin: None,
                    },
                )
                .ok()?;
            match e {
                orderflow::events::Event::StockLevelChanged(c)
                    if c.sku == sku && c.reason == tag =>
                {
                    Some(c.available)
                }
                _ => None,
            }
        })
}

#[test]
fn replaying_inventory_leaves_stock_and_decisions_unchanged() {
    let env = TestEnv::new("ops-replay-inv", 1);
    let producer = env.producer();
    let commands = env.topic(topics::INVENTORY_COMMANDS);
    let screened = env.topic(topics::ORDER_SCREENED);
    let store = "store-1";
    let probe = |tag: &str| {
        rec(
            store,
            serde_json::json!({"event_type": "StockAdjusted", "store_id": store, "sku": "SKU-A", "delta": 0, "reason": tag}),
        )
    };
    // Inputs of two topics are processed in the order they are fetched, which need not be
    // the order they were written in: each step waits for the one before.
    producer.send(
        &commands,
        &rec(store, serde_json::json!({"event_type": "StockRestocked", "store_id": store, "sku": "SKU-A", "quantity": 10})),
    );
    producer.send(&commands, &probe("stocked"));
    let mut worker = env.spawn_worker(&["inventory"], &[]);
    wait_for("the restock", deadline(60), &[&worker], |_| {
        probed(&env, "SKU-A", "stocked")
    });
    assert_eq!(probed(&env, "SKU-A", "stocked"), Some(10));
    for i in 1..=3 {
        let order = format!("o-{i}");
        producer.send(
            &screened,
            &rec(store, serde_json::json!({
                "event_type": "OrderScreened",
                "event_id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, order.as_bytes()).to_string(),
                "order_id": order, "store_id": store, "correlation_id": order,
                "occurred_at": now_ms(), "decision": "approved", "reasons": [],
                "customer_id": "c-1", "email": "c@example.com", "currency": "USD",
                "total_cents": 300, "items": [{"sku": "SKU-A", "quantity": 3, "unit_price_cents": 100}],
            })),
        );
    }
    wait_for("three reservations", deadline(60), &[&worker], |p| {
        let reserved = read_topic(&env.settings.brokers, &env.topic(topics::INVENTORY_UPDATED))
            .iter()
            .filter(|r| r.header_str("event-type").as_deref() == Some("StockReserved"))
            .count();
        *p = format!("{reserved} reserved");
        (reserved == 3).then_some(())
    });
    producer.send(&commands, &Outgoing::new(store, b"{not json".to_vec()));
    producer.send(&commands, &probe("before"));
    wait_for(
        "the probe before the replay",
        deadline(60),
        &[&worker],
        |_| probed(&env, "SKU-A", "before"),
    );
    assert_eq!(probed(&env, "SKU-A", "before"), Some(1));
    wait_for("inventory to catch up", deadline(30), &[&worker], |p| {
        let lag = total_lag(&env, "inventory");
        *p = format!("lag {lag}");
        (lag == 0).then_some(())
    });
    std::thread::sleep(Duration::from_millis(500));
    let before = events_by_id(&env, topics::INVENTORY_UPDATED);
    let dlq = env.topic(topics::DLQ);
    assert_eq!(read_topic(&env.settings.brokers, &dlq).len(), 1);
    worker.kill9();
    wait_for_empty_group(&env, "inventory");

    let exec = orderflow(
        &env,
        &[
            "replay",
            "--stage",
            "inventory",
            "--to-earliest",
            "--execute",
        ],
    );
    assert!(exec.status.success(), "{}", stderr(&exec));
    // Every input from the start: the restock and its probe, three orders, the bad
    // record, the probe.
    assert!(
        stdout(&exec).contains("7 records to process again"),
        "{}",
        stdout(&exec)
    );
    let worker = env.spawn_worker(&["inventory"], &[]);
    read_all(&env.settings.brokers, &dlq, 2, deadline(60));
    producer.send(&commands, &probe("after"));
    wait_for(
        "the probe after the replay",
        deadline(60),
        &[&worker],
        |_| probed(&env, "SKU-A", "after"),
    );
    // Stock unchanged: no second restock, no second reservation.
    assert_eq!(probed(&env, "SKU-A", "after"), Some(1));
    std::thread::sleep(Duration::from_millis(500));
    let after = events_by_id(&env, topics::INVENTORY_UPDATED);
    // The same decisions, same IDs, same bytes; the only new event answers the new probe.
    assert!(after.values().all(|c| c.len() == 1), "{after:?}");
    let new: Vec<_> = after.keys().filter(|k| !before.contains_key(*k)).collect();
    assert_eq!(new.len(), 1, "{new:?}");
    for (id, contents) in &before {
        assert_eq!(after.get(id), Some(contents), "event {id}");
    }
    worker.assert_alive();
}

#[test]
fn dead_letters_are_listed_shown_and_redriven_at_most_max_redrives_times() {
    let env = TestEnv::new("ops-dlq", 1);
    let worker = env.spawn_fraud_worker(&FraudOpts::default());
    let order = TestOrder::new("o-broken", "store-1", "c-1", now_ms());
    let mut broken = order.json_value();
    broken
        .as_object_mut()
        .expect("object")
        .remove("customer_id");
    let created = env.topic(topics::ORDER_CREATED);
    let dlq = env.topic(topics::DLQ);
    env.producer().send(
        &created,
        &Outgoing::new("store-1", serde_json::to_vec(&broken).expect("json")),
    );
    let letters = read_all(&env.settings.brokers, &dlq, 1, deadline(60));
    assert_eq!(
        letters[0].header_str("orderflow.stage").as_deref(),
        Some("fraud")
    );

    let list = orderflow(&env, &["dlq", "list", "--stage", "fraud"]);
    assert!(list.status.success());
    assert!(
        stdout(&list).contains("1 dead letters"),
        "{}",
        stdout(&list)
    );
    let none = orderflow(&env, &["dlq", "list", "--stage", "payment"]);
    assert!(stdout(&none).contains("0 dead letters"));
    let show = orderflow(&env, &["dlq", "show", "0:0"]);
    assert!(show.status.success());
    assert!(stdout(&show).contains("key: store-1"), "{}", stdout(&show));
    assert!(stdout(&show).contains("o-broken"), "{}", stdout(&show));

    // A dry run sends nothing.
    let dry = orderflow(&env, &["dlq", "redrive", "--offset", "0:0", "--dry-run"]);
    assert!(dry.status.success());
    assert!(stdout(&dry).contains("dry run: 1 would be redriven"));
    // As it is: dead-lettered again, with the count.
    for n in 1..=3 {
        let at = format!("0:{}", n - 1);
        let r = orderflow(&env, &["dlq", "redrive", "--offset", &at]);
        assert!(r.status.success(), "{}", stderr(&r));
        let letters = read_all(&env.settings.brokers, &dlq, n + 1, deadline(60));
        assert_eq!(letters.len(), n + 1);
        assert_eq!(
            letters[n].header_str("orderflow.redrive.count"),
            Some(n.to_string()),
            "dead letter {n}"
        );
        assert_eq!(letters[n].key_str().as_deref(), Some("store-1"));
    }
    // A fourth redrive of the record redriven three times is refused.
    let fourth = orderflow(&env, &["dlq", "redrive", "--offset", "0:3"]);
    assert!(!fourth.status.success());
    assert!(
        stderr(&fourth).contains("redriven 3 times"),
        "{}",
        stderr(&fourth)
    );

    // Fixed: screened once.
    let file = tempfile::NamedTempFile::new().expect("temp file");
    std::fs::write(file.path(), order.json()).expect("writing the fix");
    let path = file.path().to_string_lossy().into_owned();
    let fixed = orderflow(
        &env,
        &["dlq", "redrive", "--offset", "0:1", "--edit", &path],
    );
    assert!(fixed.status.success(), "{}", stderr(&fixed));
    let mut tail = ScreenedTail::new(&env);
    tail.wait_for_orders(1, deadline(60), &[&worker]);
    std::thread::sleep(Duration::from_secs(1));
    tail.drain();
    assert_eq!(tail.screenings.records, 1);
    assert_eq!(
        tail.screenings
            .get("o-broken")
            .map(|s| s.event_id().to_owned()),
        Some(order.expected_screened_id())
    );
    assert_eq!(read_topic(&env.settings.brokers, &dlq).len(), 4);
    worker.assert_alive();
}

#[test]
fn lag_shows_a_stopped_workers_backlog() {
    let env = TestEnv::new("ops-lag", 2);
    let producer = env.producer();
    let created = env.topic(topics::ORDER_CREATED);
    let t0 = now_ms();
    for i in 0..5 {
        producer.send(
            &created,
            &TestOrder::new(format!("o-{i}"), format!("s-{i}"), "c", t0).outgoing(),
        );
    }
    let mut worker = env.spawn_fraud_worker(&FraudOpts::default());
    let mut tail = ScreenedTail::new(&env);
    tail.wait_for_orders(5, deadline(60), &[&worker]);
    wait_for(
        "the fraud stage to catch up",
        deadline(30),
        &[&worker],
        |p| {
            let lag = total_lag(&env, "fraud");
            *p = format!("lag {lag}");
            (lag == 0).then_some(())
        },
    );
    worker.kill9();
    for i in 5..12 {
        producer.send(
            &created,
            &TestOrder::new(format!("o-{i}"), format!("s-{i}"), "c", t0).outgoing(),
        );
    }
    assert_eq!(total_lag(&env, "fraud"), 7);
    let out = orderflow(&env, &["lag", "--stages", "fraud"]);
    let text = stdout(&out);
    let lagging: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("fraud") && l.split_whitespace().nth(6).is_some_and(|n| n != "0"))
        .collect();
    assert!(!lagging.is_empty(), "{text}");
    for l in lagging {
        // The oldest unprocessed record's time is shown.
        assert!(
            l.split_whitespace()
                .nth(7)
                .is_some_and(|t| t.ends_with('Z')),
            "{l}"
        );
    }

    // The metric: a worker whose first commit stalls reports the backlog it owns.
    let stalled = env.spawn_worker(
        &["fraud"],
        &[("ORDERFLOW_STALL_BEFORE_COMMIT", "1:30000".to_owned())],
    );
    let addr = wait_for(
        "the worker's metrics address",
        deadline(30),
        &[&stalled],
        |_| {
            stalled.log_tail(200).lines().find_map(|l| {
                let rest = &l[l.find("metrics on http://")? + "metrics on http://".len()..];
                Some(rest[..rest.find('/')?].to_owned())
            })
        },
    );
    wait_for(
        "orderflow_consumer_lag to show the backlog",
        deadline(25),
        &[&stalled],
        |p| {
            let text = scrape(&addr);
            let series: Vec<(String, i64)> = text
                .lines()
                .filter(|l| l.starts_with("orderflow_consumer_lag{"))
                .filter_map(|l| {
                    let (labels, v) = l.rsplit_once(' ')?;
                    Some((labels.to_owned(), v.parse().ok()?))
                })
                .collect();
            *p = format!("{series:?}");
            let total: i64 = series.iter().map(|(_, v)| v).sum();
            (series.len() == 2
                && series
                    .iter()
                    .all(|(l, _)| l.contains("stage=\"fraud\"") && l.contains(&created))
                && total == 7)
                .then_some(())
        },
    );
}

/// The text of `GET /metrics` at `addr`.
fn scrape(addr: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// `orders` and `order_events` as text, but for the time of a row's last write.
fn projection(url: &str) -> String {
    let orders = common::postgres::execute(
        url,
        "SELECT store_id, order_id, customer_id, status, rejection_reason, total_cents, \
         currency, created_at, screened_at FROM orders ORDER BY store_id, order_id",
    )
    .expect("reading orders");
    let events = common::postgres::execute(
        url,
        "SELECT event_id, store_id, order_id, event_type, stage, topic, occurred_at, \
         payload::text FROM order_events ORDER BY event_id",
    )
    .expect("reading order_events");
    format!("{orders}\n--\n{events}")
}

#[test]
fn replaying_a_sink_reads_its_topics_again_and_reproduces_the_same_rows() {
    let env = TestEnv::new("ops-replay-sink", 2);
    let db = common::postgres::TestDatabase::create("ops_replay_sink");
    let producer = env.producer();
    let created = env.topic(topics::ORDER_CREATED);
    let t0 = now_ms();
    for i in 0..12 {
        producer.send(
            &created,
            &TestOrder::new(
                format!("o-{i}"),
                format!("s-{}", i % 3),
                format!("c-{i}"),
                t0,
            )
            .outgoing(),
        );
    }
    let vars = [("ORDERFLOW_DATABASE_URL", db.url.clone())];
    let mut worker = env.spawn_worker(&["projector"], &vars);
    let sink_lag = |env: &TestEnv| -> i64 {
        let out = orderflow(
            env,
            &["lag", "--stages", "projector", "--database-url", &db.url],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
            .lines()
            .find_map(|l| l.strip_prefix("total lag: "))
            .and_then(|l| l.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .expect("total lag")
    };
    wait_for("the projector to catch up", deadline(60), &[&worker], |p| {
        let n = common::postgres::execute(&db.url, "SELECT COUNT(*) FROM orders")
            .ok()
            .and_then(|n| n.parse::<i64>().ok())
            .unwrap_or(0);
        *p = format!("{n} orders");
        (n == 12 && sink_lag(&env) == 0).then_some(())
    });
    let before = projection(&db.url);
    worker.kill9();
    wait_for_empty_group(&env, "projector");

    let exec = orderflow(
        &env,
        &[
            "replay",
            "--stage",
            "projector",
            "--to-earliest",
            "--execute",
            "--database-url",
            &db.url,
        ],
    );
    assert!(exec.status.success(), "{}", stderr(&exec));
    assert!(
        stdout(&exec).contains("sql"),
        "positions come from SQL: {}",
        stdout(&exec)
    );
    assert!(
        stdout(&exec).contains("12 records to process again"),
        "{}",
        stdout(&exec)
    );
    // Moved in SQL: the whole input is unprocessed again.
    assert_eq!(sink_lag(&env), 12);

    let worker = env.spawn_worker(&["projector"], &vars);
    wait_for(
        "the projector to read it all again",
        deadline(60),
        &[&worker],
        |p| {
            let lag = sink_lag(&env);
            *p = format!("lag {lag}");
            (lag == 0).then_some(())
        },
    );
    assert_eq!(projection(&db.url), before);
    worker.assert_alive();
}
