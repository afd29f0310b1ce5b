//! The fraud stage end to end, on the real broker, through `orderflow run` worker
//! processes: every order screened under exactly one event ID with nothing missing —
//! across two workers, across SIGKILLs, past poison records, and for duplicated input.
//!
//! Counts are exact. Under `at_least_once` the same output record may be delivered
//! twice (same event ID; consumers dedupe by it), so duplicates are reported, not failed;
//! a second *distinct* event ID for one order, a missing order, or a wrong decision fails.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;
use orderflow::events::codec::Codec;
use orderflow::events::{Envelope, Event, StockRestocked};
use orderflow::topics::{DLQ, ORDER_CREATED};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

/// Orders of distinct customers across `stores` stores; velocity never triggers.
fn unique_customer_orders(tag: &str, n: usize, stores: usize) -> Vec<TestOrder> {
    let t0 = now_ms();
    (0..n)
        .map(|i| {
            TestOrder::new(
                format!("{tag}-o{i:05}"),
                format!("store-{:02}", i % stores),
                format!("{tag}-c{i:05}"),
                t0 + i as i64,
            )
        })
        .collect()
}

fn input_partitions(orders: &[TestOrder], landed: &[Landed]) -> HashMap<String, i32> {
    orders
        .iter()
        .zip(landed)
        .map(|(o, l)| (o.order_id.clone(), l.partition))
        .collect()
}

/// For each input partition a test wrote to, one store whose key landed there.
fn partition_stores<'a>(
    keys: impl IntoIterator<Item = &'a str>,
    landed: &[Landed],
) -> BTreeMap<i32, String> {
    let mut stores = BTreeMap::new();
    for (key, l) in keys.into_iter().zip(landed) {
        stores.entry(l.partition).or_insert_with(|| key.to_owned());
    }
    stores
}

/// The barrier before "nothing more arrives": one order per input partition the test
/// wrote to, published after all of the test's records.
///
/// A partition is processed in order, so once a sentinel is done, every record before
/// it on its partition is done too, and so is any redelivery of them. "Done" is the
/// group's committed offset passing the sentinel: a worker commits a batch's offsets only
/// after all its outputs, on every topic, are acknowledged, so that also covers dead
/// letters, which are not ordered with the screenings. Counting after [`Sentinels::wait`]
/// is exact; [`Sentinels::exclude`] takes the sentinels' own screenings out of the count.
struct Sentinels {
    orders: Vec<TestOrder>,
    landed: Vec<Landed>,
}

impl Sentinels {
    /// Publishes one sentinel per entry of `stores` (partition → a store keyed there),
    /// each of its own customer so that no velocity count changes.
    fn publish(env: &TestEnv, tag: &str, stores: &BTreeMap<i32, String>) -> Sentinels {
        let t0 = now_ms();
        let orders: Vec<TestOrder> = stores
            .iter()
            .map(|(p, store)| {
                TestOrder::new(
                    format!("{tag}-sentinel-p{p}"),
                    store.clone(),
                    format!("{tag}-sentinel-c{p}"),
                    t0,
                )
            })
            .collect();
        let outgoing: Vec<Outgoing> = orders.iter().map(TestOrder::outgoing).collect();
        let landed = env
            .producer()
            .send_all(&env.topic(ORDER_CREATED), &outgoing);
        for ((p, store), l) in stores.iter().zip(&landed) {
            assert_eq!(
                l.partition, *p,
                "sentinel keyed {store} landed on partition {}, not {p}",
                l.partition
            );
        }
        eprintln!("published sentinels at {landed:?}");
        Sentinels { orders, landed }
    }

    /// Waits until every sentinel is screened and the fraud group's committed offset has
    /// passed it, then reads `tail` to its end.
    fn wait(&self, env: &TestEnv, tail: &mut ScreenedTail, deadline: Instant, workers: &[&Worker]) {
        wait_for(
            &format!("{} sentinels screened", self.orders.len()),
            deadline,
            workers,
            |progress| {
                tail.poll(Duration::from_millis(50));
                let missing: Vec<&str> = self
                    .orders
                    .iter()
                    .map(|o| o.order_id.as_str())
                    .filter(|o| !tail.screenings.by_order.contains_key(*o))
                    .collect();
                *progress = format!("not yet screened: {missing:?}");
                missing.is_empty().then_some(())
            },
        );
        let offsets = GroupOffsets::new(env, "fraud");
        wait_for(
            &format!("group {} to commit past the sentinels", offsets.group),
            deadline,
            workers,
            |progress| {
                let committed = offsets.committed(&self.landed);
                *progress =
                    format!("(partition, sentinel offset, committed offset): {committed:?}");
                let passed = committed.is_ok_and(|c| {
                    c.iter()
                        .all(|&(_, sentinel, at)| at.is_some_and(|o| o > sentinel))
                });
                if !passed {
                    std::thread::sleep(Duration::from_millis(100));
                }
                passed.then_some(())
            },
        );
        tail.drain();
    }

    /// Takes the sentinels' screenings out of `s`, after checking them like any order's:
    /// what is left is the test's own output.
    fn exclude(&self, s: &mut Screenings) {
        let mut mine = Screenings::default();
        for o in &self.orders {
            let v = s
                .by_order
                .remove(&o.order_id)
                .unwrap_or_else(|| panic!("sentinel {} was not screened", o.order_id));
            s.records -= v.len();
            mine.records += v.len();
            mine.by_order.insert(o.order_id.clone(), v);
        }
        let partitions = input_partitions(&self.orders, &self.landed);
        assert_screened_exactly(&mine, &self.orders, &partitions);
    }
}

/// Reads a stage group's committed offsets on `order.created` (without joining it).
struct GroupOffsets {
    group: String,
    topic: String,
    consumer: BaseConsumer,
}

impl GroupOffsets {
    fn new(env: &TestEnv, stage: &str) -> Self {
        let group = env.settings.group_id(stage);
        let consumer = ClientConfig::new()
            .set("bootstrap.servers", &env.settings.brokers)
            .set("group.id", &group)
            .create()
            .expect("a client to read the group's offsets");
        GroupOffsets {
            group,
            topic: env.topic(ORDER_CREATED),
            consumer,
        }
    }

    /// (partition, offset of the record, committed offset) for each record in `at`.
    fn committed(&self, at: &[Landed]) -> Result<Vec<(i32, i64, Option<i64>)>, String> {
        let mut tpl = TopicPartitionList::new();
        for l in at {
            tpl.add_partition(&self.topic, l.partition);
        }
        let c = self
            .consumer
            .committed_offsets(tpl, Duration::from_secs(5))
            .map_err(|e| e.to_string())?;
        Ok(at
            .iter()
            .map(|l| {
                let committed = match c.find_partition(&self.topic, l.partition) {
                    Some(e) => match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    },
                    None => None,
                };
                (l.partition, l.offset, committed)
            })
            .collect())
    }
}

fn assert_all_approved(s: &Screenings, orders: &[TestOrder]) {
    for o in orders {
        for sc in &s.by_order[&o.order_id] {
            assert!(
                sc.approved() && sc.event.reasons.is_empty(),
                "order {} should be approved without reasons, got {:?} {:?}",
                o.order_id,
                sc.event.decision,
                sc.event.reasons
            );
        }
    }
}

/// a. Two workers in one group share 20 stores' 10,000 orders.
#[test]
fn two_workers_screen_every_order_exactly_once() {
    const ORDERS: usize = 10_000;
    let env = TestEnv::new("two-workers", 6);
    let w1 = env.spawn_fraud_worker(&FraudOpts::default());
    let w2 = env.spawn_fraud_worker(&FraudOpts::default());
    // Both in the group and holding partitions before the first order arrives.
    wait_for_group(&env, deadline(60), &[&w1, &w2]);
    let orders = unique_customer_orders("a", ORDERS, 20);
    let outgoing: Vec<Outgoing> = orders.iter().map(TestOrder::outgoing).collect();
    let started = std::time::Instant::now();
    let landed = env
        .producer()
        .send_all(&env.topic(ORDER_CREATED), &outgoing);
    eprintln!(
        "produced {ORDERS} orders in {:.1}s",
        started.elapsed().as_secs_f64()
    );

    let mut tail = ScreenedTail::new(&env);
    tail.wait_for_orders(ORDERS, deadline(240), &[&w1, &w2]);
    eprintln!(
        "{ORDERS} orders screened {:.1}s after the first was produced",
        started.elapsed().as_secs_f64()
    );
    // Everything before the sentinels, duplicates included, has landed; then count.
    let sentinels = Sentinels::publish(
        &env,
        "a",
        &partition_stores(outgoing.iter().map(|o| o.key.as_str()), &landed),
    );
    sentinels.wait(&env, &mut tail, deadline(60), &[&w1, &w2]);
    sentinels.exclude(&mut tail.screenings);

    let dups = assert_screened_exactly(
        &tail.screenings,
        &orders,
        &input_partitions(&orders, &landed),
    );
    assert_all_approved(&tail.screenings, &orders);
    assert_eq!(tail.screenings.distinct_orders(), ORDERS);
    let mut per_partition: BTreeMap<i32, usize> = BTreeMap::new();
    for v in tail.screenings.by_order.values() {
        *per_partition.entry(v[0].partition).or_default() += 1;
    }
    eprintln!(
        "two workers: {ORDERS} orders, {} output records, {dups} duplicate records (same event ID), per partition {per_partition:?}",
        tail.screenings.records
    );
    w1.assert_alive();
    w2.assert_alive();
}

/// Customers whose orders run through the whole stream of the kill test.
const VELOCITY_CUSTOMERS: usize = 4;
const ORDERS_PER_VELOCITY_CUSTOMER: usize = 9;
const VELOCITY_MAX: u32 = 3;

/// b. SIGKILL a worker mid-stream three times (at most two alive): nothing lost, no
/// second event ID, and velocity state survives every takeover.
#[test]
fn sigkilled_workers_lose_nothing_and_keep_velocity_state() {
    const SEGMENTS: usize = 4;
    const SEGMENT: usize = 2_000;
    let env = TestEnv::new("sigkill", 6);
    let fraud = FraudOpts {
        velocity_max_orders: VELOCITY_MAX,
        velocity_window_secs: 3600,
    };

    // Regular orders of unique customers, with the velocity customers' orders spread
    // evenly over the whole stream, so some precede and some follow every kill.
    let mut orders = unique_customer_orders("b", SEGMENTS * SEGMENT, 20);
    let spacing = orders.len() / ORDERS_PER_VELOCITY_CUSTOMER;
    let t0 = now_ms();
    let mut velocity: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for nth in 0..ORDERS_PER_VELOCITY_CUSTOMER {
        for k in 0..VELOCITY_CUSTOMERS {
            let at = nth * spacing + k * 7 + 3;
            let customer = format!("b-vel{k}");
            let order_id = format!("b-vel{k}-o{nth}");
            // Each velocity customer buys in one store, so all its orders meet on one
            // partition (velocity state is per partition).
            let store = format!("store-{:02}", 2 * k + 1);
            orders[at] = TestOrder::new(order_id.clone(), store, customer.clone(), t0 + at as i64);
            velocity.entry(customer).or_default().push(order_id);
        }
    }
    let total = orders.len();

    let topic = env.topic(ORDER_CREATED);
    let producer = env.producer();
    let mut landed: Vec<Landed> = Vec::with_capacity(total);
    let produce_segment = |s: usize, landed: &mut Vec<Landed>| {
        let seg: Vec<Outgoing> = orders[s * SEGMENT..(s + 1) * SEGMENT]
            .iter()
            .map(TestOrder::outgoing)
            .collect();
        landed.extend(producer.send_all(&topic, &seg));
    };

    let mut workers = [
        env.spawn_fraud_worker(&fraud),
        env.spawn_fraud_worker(&fraud),
    ];
    let mut tail = ScreenedTail::new(&env);
    wait_for_group(&env, deadline(60), &[&workers[0], &workers[1]]);
    let mut kills = Vec::new();
    for round in 0..SEGMENTS - 1 {
        produce_segment(round, &mut landed);
        // Kill once the workers are a quarter into this segment: the victim has
        // uncommitted work, and the rest of the segment is still to come.
        let target = round * SEGMENT + SEGMENT / 4;
        tail.wait_for_orders(target, deadline(120), &[&workers[0], &workers[1]]);
        let victim = round % 2;
        let screened_before = tail.distinct_orders();
        workers[victim].kill9();
        kills.push((
            round,
            workers[victim].instance.clone(),
            screened_before,
            landed.len(),
        ));
        eprintln!(
            "kill {}: SIGKILLed {} with {screened_before} of {} produced orders screened",
            round + 1,
            workers[victim].instance,
            landed.len()
        );
        // Restart (the dead worker's guard is dropped): two workers alive again. Wait
        // until the replacement has joined and holds partitions (the killed member's
        // session expires first); the next round then waits for output again.
        workers[victim] = env.spawn_fraud_worker(&fraud);
        wait_for_group(&env, deadline(90), &[&workers[0], &workers[1]]);
    }
    produce_segment(SEGMENTS - 1, &mut landed);
    assert_eq!(landed.len(), total);
    tail.wait_for_orders(total, deadline(180), &[&workers[0], &workers[1]]);
    let sentinels = Sentinels::publish(
        &env,
        "b",
        &partition_stores(orders.iter().map(|o| o.store_id.as_str()), &landed),
    );
    sentinels.wait(&env, &mut tail, deadline(60), &[&workers[0], &workers[1]]);
    sentinels.exclude(&mut tail.screenings);

    let dups = assert_screened_exactly(
        &tail.screenings,
        &orders,
        &input_partitions(&orders, &landed),
    );
    let in_flight_kills = kills
        .iter()
        .filter(|(_, _, screened, produced)| screened < produced)
        .count();
    eprintln!(
        "sigkill: {total} orders, {} output records, {dups} duplicate records; {in_flight_kills} of {} kills left orders unscreened: {kills:?}",
        tail.screenings.records,
        kills.len()
    );

    // Every screening of an order (duplicates included) carries the same decision.
    for (order, v) in &tail.screenings.by_order {
        let first = (&v[0].event.decision, &v[0].event.reasons);
        for sc in v {
            assert_eq!(
                (&sc.event.decision, &sc.event.reasons),
                first,
                "order {order}: duplicates disagree"
            );
        }
    }
    // Velocity: exactly the (max+1)-th and later orders of each such customer are rejected.
    let velocity_orders: std::collections::BTreeSet<&String> =
        velocity.values().flatten().collect();
    for (customer, ids) in &velocity {
        for (i, order_id) in ids.iter().enumerate() {
            let sc = tail.screenings.get(order_id).expect("screened");
            if i < VELOCITY_MAX as usize {
                assert!(
                    sc.approved(),
                    "{customer}'s order #{} ({order_id}) must be approved, got {:?} {:?}",
                    i + 1,
                    sc.event.decision,
                    sc.event.reasons
                );
            } else {
                assert!(
                    !sc.approved() && sc.event.reasons.iter().any(|r| r.starts_with("velocity:")),
                    "{customer}'s order #{} ({order_id}) must be rejected for velocity (max {VELOCITY_MAX}), got {:?} {:?}",
                    i + 1,
                    sc.event.decision,
                    sc.event.reasons
                );
            }
        }
    }
    let others: Vec<TestOrder> = orders
        .iter()
        .filter(|o| !velocity_orders.contains(&o.order_id))
        .cloned()
        .collect();
    assert_all_approved(&tail.screenings, &others);
}

/// c. Garbage, another event type's Avro and an order without `items`, interleaved with
/// good orders on the same stores: each bad record is dead-lettered once, with its
/// origin, and the good orders around it pass.
#[test]
fn bad_records_are_dead_lettered_once_and_do_not_block_their_store() {
    let env = TestEnv::new("dlq", 3);
    let worker = env.spawn_fraud_worker(&FraudOpts::default());
    let codec = Codec::new();
    let t0 = now_ms();

    let garbage = b"\x07\xffnot an order at all\x00\x01".to_vec();
    let restock = Event::from(StockRestocked {
        envelope: Envelope {
            event_id: uuid::Uuid::new_v4().to_string(),
            order_id: None,
            store_id: "store-1".into(),
            correlation_id: "restock-1".into(),
            causation_id: None,
            occurred_at: t0,
            schema_version: 1,
        },
        sku: "SKU-1".into(),
        quantity: 5,
        note: None,
    });
    let wrong_schema = codec.encode(&restock).expect("encode StockRestocked");
    let missing_items = |order_id: &str, store: &str| {
        let mut v = TestOrder::new(order_id, store, format!("{order_id}-c"), t0).json_value();
        v.as_object_mut().expect("object").remove("items");
        serde_json::to_vec(&v).expect("JSON")
    };

    /// A bad record and what its dead letter should say.
    struct Bad {
        what: &'static str,
        bytes: Vec<u8>,
        class: &'static str,
        message_contains: &'static str,
    }
    let garbage = Bad {
        what: "garbage",
        bytes: garbage,
        class: "decode",
        message_contains: "0x07",
    };
    // A well-formed event of the wrong type for order.created: the codec reads it, the
    // stage cannot use it.
    let wrong = Bad {
        what: "StockRestocked Avro",
        bytes: wrong_schema,
        class: "unexpected",
        message_contains: "StockRestocked",
    };
    let no_items = Bad {
        what: "order without items",
        bytes: missing_items("c-bad", "store-2"),
        class: "invalid",
        message_contains: "items",
    };

    enum Planned<'a> {
        Good(TestOrder),
        Bad(&'a Bad, Outgoing),
    }
    let mut plan = Vec::new();
    let mut good = Vec::new();
    let mut n = 0;
    let mut next_good = |store: &str, plan: &mut Vec<Planned>| {
        n += 1;
        let o = TestOrder::new(format!("c-o{n:03}"), store, format!("c-c{n:03}"), t0 + n);
        good.push(o.clone());
        plan.push(Planned::Good(o));
    };
    let bad = |b: &Bad, store: &str| Outgoing::new(store, b.bytes.clone());
    // store-0..2: five good, one bad, five good. store-3: all three, between good ones.
    for (s, b) in [&garbage, &wrong, &no_items].into_iter().enumerate() {
        let store = format!("store-{s}");
        for _ in 0..5 {
            next_good(&store, &mut plan);
        }
        plan.push(Planned::Bad(b, bad(b, &store)));
        for _ in 0..5 {
            next_good(&store, &mut plan);
        }
    }
    next_good("store-3", &mut plan);
    plan.push(Planned::Bad(&garbage, bad(&garbage, "store-3")));
    next_good("store-3", &mut plan);
    // With a header of its own, which the dead letter keeps.
    plan.push(Planned::Bad(
        &wrong,
        bad(&wrong, "store-3").header("x-origin", "test"),
    ));
    next_good("store-3", &mut plan);
    plan.push(Planned::Bad(&no_items, bad(&no_items, "store-3")));
    next_good("store-3", &mut plan);
    let good = good;

    let outgoing: Vec<Outgoing> = plan
        .iter()
        .map(|r| match r {
            Planned::Good(o) => o.outgoing(),
            Planned::Bad(_, out) => out.clone(),
        })
        .collect();
    let topic = env.topic(ORDER_CREATED);
    let landed = env.producer().send_all(&topic, &outgoing);
    let mut bad_at: HashMap<(i32, i64), (&Bad, &Outgoing)> = HashMap::new();
    let mut good_partition = HashMap::new();
    for (r, l) in plan.iter().zip(&landed) {
        match r {
            Planned::Good(o) => {
                good_partition.insert(o.order_id.clone(), l.partition);
            }
            Planned::Bad(b, out) => {
                bad_at.insert((l.partition, l.offset), (*b, out));
            }
        }
    }
    assert_eq!(bad_at.len(), 6);

    let mut tail = ScreenedTail::new(&env);
    tail.wait_for_orders(good.len(), deadline(90), &[&worker]);
    let mut dlq = env.collector(DLQ);
    wait_for("6 dead letters", deadline(30), &[&worker], |progress| {
        dlq.poll(Duration::from_millis(100));
        *progress = format!("{} dead letters", dlq.records.len());
        (dlq.records.len() >= bad_at.len()).then_some(())
    });
    // Nothing more may arrive: once the sentinels are done, so is every record before
    // them, with its dead letter or screening; read both topics to their ends.
    let sentinels = Sentinels::publish(
        &env,
        "c",
        &partition_stores(outgoing.iter().map(|o| o.key.as_str()), &landed),
    );
    sentinels.wait(&env, &mut tail, deadline(60), &[&worker]);
    sentinels.exclude(&mut tail.screenings);
    dlq.drain();

    let dups = assert_screened_exactly(&tail.screenings, &good, &good_partition);
    assert_eq!(dups, 0, "no worker crashed, so no output should repeat");
    assert_all_approved(&tail.screenings, &good);

    assert_eq!(
        dlq.records.len(),
        bad_at.len(),
        "each bad record must be dead-lettered exactly once; DLQ holds {:?}",
        dlq.records
            .iter()
            .map(|r| (
                r.header_str("orderflow.source.partition"),
                r.header_str("orderflow.source.offset")
            ))
            .collect::<Vec<_>>()
    );
    let mut seen = std::collections::BTreeSet::new();
    for r in &dlq.records {
        let h = |name: &str| {
            r.header_str(name).unwrap_or_else(|| {
                panic!(
                    "DLQ record {}/{} lacks header {name}; headers: {:?}",
                    r.partition, r.offset, r.headers
                )
            })
        };
        assert_eq!(h("orderflow.source.topic"), topic, "source topic header");
        let partition: i32 = h("orderflow.source.partition")
            .parse()
            .expect("partition header is a number");
        let offset: i64 = h("orderflow.source.offset")
            .parse()
            .expect("offset header is a number");
        let (bad, original) = bad_at.get(&(partition, offset)).unwrap_or_else(|| {
            panic!("DLQ record names {partition}/{offset}, which is not a bad record")
        });
        assert!(
            seen.insert((partition, offset)),
            "{} at {partition}/{offset} dead-lettered twice",
            bad.what
        );
        assert_eq!(h("orderflow.stage"), "fraud", "{}: stage header", bad.what);
        let class = h("orderflow.error.class");
        assert_eq!(class, bad.class, "{}: error class", bad.what);
        let message = h("orderflow.error.message");
        assert!(
            !message.trim().is_empty() && message.contains(bad.message_contains),
            "{}: error message {message:?} should mention {:?}",
            bad.what,
            bad.message_contains
        );
        assert_eq!(
            r.value.as_deref(),
            Some(original.value.as_slice()),
            "{}: DLQ value must be the original bytes",
            bad.what
        );
        assert_eq!(
            r.key_str().as_deref(),
            Some(original.key.as_str()),
            "{}: DLQ key must be the original key",
            bad.what
        );
        for (k, v) in &original.headers {
            assert_eq!(
                r.header(k),
                Some(v.as_slice()),
                "{}: original header {k}",
                bad.what
            );
        }
        eprintln!(
            "dead letter of {} at {partition}/{offset}: class {class}, message {message:?}",
            bad.what
        );
    }

    worker.assert_alive();
}

/// d. The same order published twice (identical bytes, and re-serialized) yields one
/// screening, and counts once towards the customer's velocity.
#[test]
fn an_order_published_twice_is_screened_once() {
    let env = TestEnv::new("dup", 3);
    let worker = env.spawn_fraud_worker(&FraudOpts {
        velocity_max_orders: 2,
        velocity_window_secs: 3600,
    });
    let t0 = now_ms();
    let a = TestOrder::new("d-o1", "store-d", "d-c1", t0);
    let b = TestOrder::new("d-o2", "store-d", "d-c1", t0 + 1);
    let c = TestOrder::new("d-o3", "store-d", "d-c1", t0 + 2);
    let b_pretty = serde_json::to_vec_pretty(&b.json_value()).expect("JSON");
    assert_ne!(b_pretty, b.json());
    let outgoing = vec![
        a.outgoing(),
        a.outgoing(),
        b.outgoing(),
        Outgoing::new("store-d", b_pretty),
        c.outgoing(),
    ];
    let landed = env
        .producer()
        .send_all(&env.topic(ORDER_CREATED), &outgoing);
    assert!(
        landed.iter().all(|l| l.partition == landed[0].partition),
        "one store, one partition"
    );

    let mut tail = ScreenedTail::new(&env);
    tail.wait_for_orders(3, deadline(60), &[&worker]);
    // The duplicates' screenings, if any, come before the sentinel's.
    let sentinels = Sentinels::publish(
        &env,
        "d",
        &partition_stores(outgoing.iter().map(|o| o.key.as_str()), &landed),
    );
    sentinels.wait(&env, &mut tail, deadline(60), &[&worker]);
    sentinels.exclude(&mut tail.screenings);

    let orders = [a.clone(), b.clone(), c.clone()];
    let partitions: HashMap<String, i32> = orders
        .iter()
        .map(|o| (o.order_id.clone(), landed[0].partition))
        .collect();
    assert_screened_exactly(&tail.screenings, &orders, &partitions);
    for o in &orders {
        assert_eq!(
            tail.screenings.by_order[&o.order_id].len(),
            1,
            "order {} published twice must be screened once (the duplicate input is skipped)",
            o.order_id
        );
    }
    // With velocity max 2, the duplicates must not count: A and B pass, C is the third.
    let screened = |o: &TestOrder| tail.screenings.get(&o.order_id).expect("screened");
    for o in [&a, &b] {
        assert!(
            screened(o).approved() && screened(o).event.reasons.is_empty(),
            "{} must be approved (its customer's duplicates count once): {:?}",
            o.order_id,
            screened(o).event.reasons
        );
    }
    assert!(
        !screened(&c).approved()
            && screened(&c)
                .event
                .reasons
                .iter()
                .any(|r| r.starts_with("velocity:")),
        "{} is the customer's third order, over max 2: {:?} {:?}",
        c.order_id,
        screened(&c).event.decision,
        screened(&c).event.reasons
    );
    assert_eq!(tail.screenings.records, 3);
    worker.assert_alive();
}
