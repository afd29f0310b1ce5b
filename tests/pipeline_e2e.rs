//! The whole order pipeline on the real broker: fraud, inventory, payment (against the
//! mock gateway with transient errors, declines and a 5-second outage), fulfillment and
//! delivery (with the simulated carrier), in two worker processes running every stage —
//! once undisturbed and once with a worker SIGKILLed and restarted mid-run.
//!
//! Asserted with exact numbers: every order ends in a terminal state consistent with its
//! events; an event ID never carries two different events; no order has two stock
//! decisions; per SKU, final stock = initial + restocks − reserved + released; every
//! charge in the gateway's ledger belongs to an order whose stock was reserved and is the
//! authorization the pipeline recorded, and every authorized order was charged exactly
//! once; orders hit by the outage retried, some then succeeded and the exhausted ones
//! failed and had their stock released; some SKUs ran out; nothing was dead-lettered.
//!
//! The SQL sinks (projector, stats, alerts) run beside the pipeline, once on PostgreSQL
//! and once on SQLite, each in a worker process of its own. In the run with the killed
//! worker the PostgreSQL sinks' worker is SIGKILLed too, and the SQLite one aborts right
//! after one of its SQL commits (a crash point); both are restarted. Afterwards, on both
//! databases: `order_events` holds every event of every order exactly once, `orders`
//! says what the status module says, the per-minute stats equal a recomputation
//! from `order_events`, and the low-stock alert episodes are the same on both.

mod common;

use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::pipeline::{Shop, rank, sku, store, worker_env};
use common::postgres::TestDatabase;
use common::{Collector, Outgoing, TestEnv, Worker, deadline};
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, EventType, PaymentFailureReason};
use orderflow::gateway::server::{Gateway, GatewayConfig, LedgerStatus, serve_gateway};
use orderflow::simulator::carrier::{CarrierConfig, play_carrier};
use orderflow::sql::Db;
use orderflow::status::{self, OrderStatus};
use orderflow::topics;
use tokio_util::sync::CancellationToken;

const ORDERS: usize = 2_000;
const STORES: usize = 20;
const SKUS: usize = 10;
/// SKU-0 starts with this little stock in every store, so it runs out.
const SCARCE_UNITS: i32 = 5;
const PLENTY_UNITS: i32 = 400;
/// Units of the scarce SKU delivered to every other store during the run.
const MIDRUN_UNITS: i32 = 4;
const ORDERS_PER_SECOND: f64 = 150.0;
const OUTAGE: Duration = Duration::from_secs(5);
/// One order in this many is far above the fraud amount limit.
const HUGE_EVERY: usize = 97;
const SHOP: Shop = Shop {
    stores: STORES,
    skus: SKUS,
    huge_every: HUGE_EVERY,
};

/// These tests start four worker processes each on a two-core machine: one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn every_order_reaches_a_consistent_end() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    run("e2e", false);
}

#[test]
fn a_worker_killed_mid_run_changes_nothing_for_the_orders() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    run("e2e-kill", true);
}

fn initial_units(sku_index: usize) -> i32 {
    if sku_index < 2 {
        SCARCE_UNITS
    } else {
        PLENTY_UNITS
    }
}

/// Every lifecycle event of the run, deduplicated by event ID, per (store, order).
///
/// Redelivery may repeat a record, never change it: a record whose event ID was seen
/// before must carry the same event, field for field, or the test fails.
struct Observed {
    collectors: Vec<Collector>,
    read: Vec<usize>,
    codec: Codec,
    /// The first record of each event ID: its canonical encoding (Avro single-object
    /// with the current schema, so the wire format a record happened to use does not
    /// matter) and where it was read, for the failure message.
    first: HashMap<String, (Vec<u8>, String)>,
    by_order: HashMap<(String, String), Vec<Event>>,
    /// Events about no order (stock levels, low stock).
    other: Vec<Event>,
    duplicates: usize,
}

const LIFECYCLE: &[&str] = &[
    topics::ORDER_SCREENED,
    topics::INVENTORY_UPDATED,
    topics::INVENTORY_THRESHOLD_REACHED,
    topics::PAYMENT_PROCESSED,
    topics::FULFILLMENT_UPDATED,
    topics::DELIVERY_UPDATED,
];

impl Observed {
    fn new(env: &TestEnv) -> Self {
        Observed {
            collectors: LIFECYCLE.iter().map(|t| env.collector(t)).collect(),
            read: vec![0; LIFECYCLE.len()],
            codec: Codec::new(),
            first: HashMap::new(),
            by_order: HashMap::new(),
            other: Vec::new(),
            duplicates: 0,
        }
    }

    fn poll(&mut self) {
        for (i, c) in self.collectors.iter_mut().enumerate() {
            c.poll(Duration::from_millis(50));
            for rec in &c.records[self.read[i]..] {
                let value = rec.value.as_deref().expect("lifecycle records have values");
                let event = self
                    .codec
                    .decode(value, DecodeHints::default())
                    .unwrap_or_else(|e| panic!("undecodable record on {}: {e}", c.topic));
                let canonical = self
                    .codec
                    .encode(&event)
                    .unwrap_or_else(|e| panic!("re-encoding {event:?} read from {}: {e}", c.topic));
                let at = format!("{}/{}@{}", c.topic, rec.partition, rec.offset);
                match self.first.entry(event.envelope().event_id.clone()) {
                    Entry::Occupied(o) => {
                        let (bytes, first_at) = o.get();
                        if *bytes != canonical {
                            let first = self
                                .codec
                                .decode(bytes, DecodeHints::default())
                                .expect("decodes: this codec encoded it");
                            panic!(
                                "event ID {} carries two different events:\n  first at {first_at}: {first:?}\n  again at {at}: {event:?}",
                                event.envelope().event_id
                            );
                        }
                        self.duplicates += 1;
                        continue;
                    }
                    Entry::Vacant(v) => {
                        v.insert((canonical, at));
                    }
                }
                match &event.envelope().order_id {
                    Some(order) => self
                        .by_order
                        .entry((event.envelope().store_id.clone(), order.clone()))
                        .or_default()
                        .push(event),
                    None => self.other.push(event),
                }
            }
            self.read[i] = c.records.len();
        }
    }

    /// The histories of up to `n` orders not yet in a terminal state.
    fn stuck(&self, created: &HashMap<(String, String), Event>, n: usize) -> String {
        created
            .keys()
            .filter(|k| {
                !self
                    .by_order
                    .get(*k)
                    .is_some_and(|evs| status::of(evs).is_some_and(|s| s.is_terminal()))
            })
            .take(n)
            .map(|k| {
                let evs: Vec<String> = self
                    .by_order
                    .get(k)
                    .map(|evs| evs.iter().map(|e| e.event_type().to_string()).collect())
                    .unwrap_or_default();
                format!("{k:?}: {}", evs.join(" "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn terminal(&self) -> usize {
        self.by_order
            .values()
            .filter(|evs| status::of(evs).is_some_and(|s| s.is_terminal()))
            .count()
    }
}

fn run(name: &str, kill: bool) {
    let env = TestEnv::new(name, 6);
    for base in [
        topics::INVENTORY_COMMANDS,
        topics::INVENTORY_UPDATED,
        topics::PAYMENT_PROCESSED,
        topics::FULFILLMENT_UPDATED,
        topics::CARRIER_UPDATES,
        topics::DELIVERY_UPDATED,
    ] {
        common::wait_for_partitions(&env.topic(base), 6);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime for the gateway and the carrier");
    let stop = CancellationToken::new();
    let gateway = Gateway::new(GatewayConfig {
        latency_ms: 2,
        jitter_ms: 5,
        decline_rate: 0.05,
        transient_error_rate: 0.2,
        seed: 11,
        ..GatewayConfig::default()
    })
    .expect("a valid gateway config");
    let (gateway_addr, _gateway_task) = rt
        .block_on(serve_gateway("127.0.0.1:0", gateway.clone(), stop.clone()))
        .expect("the gateway listens");
    let carrier_settings = env.settings.clone();
    let carrier_stop = stop.clone();
    let carrier = rt.spawn(async move {
        let config = CarrierConfig {
            delivery_failure_rate: 0.05,
            ..CarrierConfig::default()
        };
        play_carrier(&carrier_settings, config, carrier_stop).await
    });

    // Stock first, then the workers, then the orders.
    let producer = env.producer();
    let mut initial: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut commands = Vec::new();
    for s in 0..STORES {
        for k in 0..SKUS {
            let units = initial_units(k);
            initial.insert((store(s), sku(k)), i64::from(units));
            let json = serde_json::json!({
                "event_type": "StockRestocked", "store_id": store(s), "sku": sku(k), "quantity": units,
            });
            commands.push(Outgoing::new(
                store(s),
                serde_json::to_vec(&json).expect("JSON"),
            ));
        }
    }
    producer.send_all(&env.topic(topics::INVENTORY_COMMANDS), &commands);

    let wenv = worker_env(&gateway_addr.to_string());
    let mut workers: Vec<Worker> = vec![env.spawn_worker(&[], &wenv), env.spawn_worker(&[], &wenv)];
    let sinks = SinkDbs::new(name);
    let mut pg_sinks = sinks.spawn(&env, "postgres", None);
    let mut lite_sinks = sinks.spawn(&env, "sqlite", kill.then_some("after_sql_commit:30"));
    // The shelves are stocked before the shop opens: Kafka orders records within a
    // partition, not across the inventory's input topics, so orders published alongside
    // the restocks could be taken first.
    let mut seen = Observed::new(&env);
    let until = deadline(60);
    loop {
        seen.poll();
        let stocked = seen
            .other
            .iter()
            .filter(|e| matches!(e, Event::StockLevelChanged(c) if c.reason == "restock"))
            .count();
        if stocked == initial.len() {
            break;
        }
        assert!(
            Instant::now() < until,
            "[{name}] only {stocked} of {} restocks applied within 60 s",
            initial.len()
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    let codec = Codec::new();
    let mut created: HashMap<(String, String), Event> = HashMap::new();
    let mut orders = Vec::new();
    for i in 0..ORDERS {
        let (store_id, order_id, json) = SHOP.order_json(i);
        let hints = DecodeHints {
            topic_default: Some(EventType::OrderCreated),
            ..DecodeHints::default()
        };
        created.insert(
            (store_id.clone(), order_id),
            codec.decode(&json, hints).expect("a valid order"),
        );
        orders.push(Outgoing::new(store_id, json));
    }

    // Orders in three parts: the outage starts after the first, the kill (if any) comes
    // after the second.
    let order_topic = env.topic(topics::ORDER_CREATED);
    let (first, rest) = orders.split_at(ORDERS / 4);
    let (second, third) = rest.split_at(ORDERS / 4);
    producer.send_paced(&order_topic, first, Some(ORDERS_PER_SECOND));
    gateway.set_outage(true);
    let outage_started = Instant::now();
    producer.send_paced(&order_topic, second, Some(ORDERS_PER_SECOND));
    if kill {
        workers[0].kill9();
        pg_sinks.kill9();
        eprintln!("[{name}] killed worker 1 and the PostgreSQL sinks' worker");
    }
    if let Some(left) = OUTAGE.checked_sub(outage_started.elapsed()) {
        std::thread::sleep(left);
    }
    gateway.set_outage(false);
    eprintln!("[{name}] outage over after {:?}", outage_started.elapsed());
    if kill {
        workers.push(env.spawn_worker(&[], &wenv));
        pg_sinks = sinks.spawn(&env, "postgres", None);
        let until = deadline(60);
        while lite_sinks.exit_status().is_none() {
            assert!(
                Instant::now() < until,
                "[{name}] the SQLite sinks never reached their crash point; log:\n{}",
                lite_sinks.log_tail(40)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("[{name}] the SQLite sinks aborted after an SQL commit; restarting them");
        lite_sinks = sinks.spawn(&env, "sqlite", None);
    }
    // Mid-run deliveries of the scarce SKU to half the stores.
    let mut restocked: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut deliveries = Vec::new();
    for st in (0..STORES).step_by(2) {
        restocked.insert((store(st), sku(0)), i64::from(MIDRUN_UNITS));
        let json = serde_json::json!({
            "event_type": "StockRestocked", "store_id": store(st), "sku": sku(0), "quantity": MIDRUN_UNITS,
        });
        deliveries.push(Outgoing::new(
            store(st),
            serde_json::to_vec(&json).expect("JSON"),
        ));
    }
    producer.send_all(&env.topic(topics::INVENTORY_COMMANDS), &deliveries);
    producer.send_paced(&order_topic, third, Some(ORDERS_PER_SECOND));

    let until = deadline(120);
    loop {
        seen.poll();
        let done = seen.terminal();
        if done == ORDERS {
            break;
        }
        for w in &workers[usize::from(kill)..] {
            w.assert_alive();
        }
        assert!(
            Instant::now() < until,
            "[{name}] only {done} of {ORDERS} orders reached a terminal state within 120 s; some that did not:\n{}",
            seen.stuck(&created, 15)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!(
        "[{name}] all {ORDERS} orders terminal; {} duplicate records (same IDs)",
        seen.duplicates
    );

    // Read back every SKU's stock: an adjustment by 0 is a count that confirms the level.
    let probes: Vec<Outgoing> = initial
        .keys()
        .map(|(s, k)| {
            let json = serde_json::json!({
                "event_type": "StockAdjusted", "store_id": s, "sku": k, "delta": 0, "reason": "probe",
            });
            Outgoing::new(s.clone(), serde_json::to_vec(&json).expect("JSON"))
        })
        .collect();
    producer.send_all(&env.topic(topics::INVENTORY_COMMANDS), &probes);
    let mut level: BTreeMap<(String, String), i64> = BTreeMap::new();
    let until = deadline(60);
    while level.len() < initial.len() {
        assert!(
            Instant::now() < until,
            "[{name}] only {} stock probes answered",
            level.len()
        );
        seen.poll();
        for e in &seen.other {
            if let Event::StockLevelChanged(c) = e
                && c.reason == "probe"
            {
                level.insert(
                    (c.envelope.store_id.clone(), c.sku.clone()),
                    i64::from(c.available),
                );
            }
        }
    }
    stop.cancel();
    let report = rt
        .block_on(carrier)
        .expect("carrier task")
        .expect("carrier");
    eprintln!("[{name}] carrier: {report:?}");

    // 1. Every order ended, consistently with its own events.
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut reserved: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut released: BTreeMap<(String, String), i64> = BTreeMap::new();
    let (mut retried_then_paid, mut exhausted, mut declined, mut out_of_stock) = (0, 0, 0, 0);
    let mut outage_then_paid = 0;
    let mut authorized: BTreeMap<(String, String), String> = BTreeMap::new();
    let mut refunded = BTreeSet::new();
    // Orders whose one stock decision is a reservation: the only orders that may be charged.
    let mut stock_reserved = BTreeSet::new();
    let mut end_of: HashMap<(String, String), OrderStatus> = HashMap::new();
    for (key, order) in &created {
        let mut events = vec![order.clone()];
        events.extend(seen.by_order.get(key).cloned().unwrap_or_default());
        events.sort_by_key(|e| (rank(e.event_type()), e.envelope().occurred_at));
        // Events are distinct by ID here, so two decisions are two different answers
        // (reserved and rejected, or reserved twice under two IDs), not a redelivery.
        let decisions: Vec<&Event> = events
            .iter()
            .filter(|e| {
                matches!(
                    e.event_type(),
                    EventType::StockReserved | EventType::StockRejected
                )
            })
            .collect();
        assert!(
            decisions.len() <= 1,
            "[{name}] order {key:?} has {} stock decisions: {decisions:#?}",
            decisions.len()
        );
        if let [Event::StockReserved(_)] = decisions[..] {
            stock_reserved.insert(key.clone());
        }
        let end = status::check_complete(&events)
            .unwrap_or_else(|e| panic!("[{name}] order {key:?} is inconsistent: {e}\n{events:#?}"));
        *ends.entry(format!("{end:?}")).or_default() += 1;
        end_of.insert(key.clone(), end);
        let retried = events
            .iter()
            .any(|e| e.event_type() == EventType::PaymentRetrying);
        let hit_by_outage = events
            .iter()
            .any(|e| matches!(e, Event::PaymentRetrying(r) if r.error.contains("gateway outage")));
        for e in &events {
            match e {
                Event::StockReserved(r) => {
                    for l in &r.items {
                        *reserved.entry((key.0.clone(), l.sku.clone())).or_default() +=
                            i64::from(l.quantity);
                    }
                }
                Event::StockReleased(r) => {
                    for l in &r.items {
                        *released.entry((key.0.clone(), l.sku.clone())).or_default() +=
                            i64::from(l.quantity);
                    }
                }
                Event::StockRejected(_) => out_of_stock += 1,
                Event::PaymentAuthorized(a) => {
                    authorized.insert(key.clone(), a.authorization_id.clone());
                    if retried {
                        retried_then_paid += 1;
                    }
                    if hit_by_outage {
                        outage_then_paid += 1;
                    }
                }
                Event::PaymentFailed(f) => {
                    match f.reason {
                        PaymentFailureReason::GatewayUnavailable => exhausted += 1,
                        PaymentFailureReason::Declined => declined += 1,
                        // Nothing in this run cancels an order.
                        PaymentFailureReason::Cancelled => {
                            panic!("[{name}] order {key:?} failed as cancelled: {f:?}")
                        }
                    }
                    assert!(
                        events
                            .iter()
                            .any(|e| e.event_type() == EventType::StockReleased),
                        "[{name}] order {key:?} failed payment without releasing its stock"
                    );
                }
                Event::PaymentRefunded(_) => {
                    refunded.insert(key.clone());
                }
                _ => {}
            }
        }
        if end == OrderStatus::Cancelled {
            assert!(
                events
                    .iter()
                    .any(|e| e.event_type() == EventType::PaymentFailed)
            );
        }
    }
    eprintln!(
        "[{name}] ends {ends:?}; retried then paid {retried_then_paid} ({outage_then_paid} after outage errors), exhausted {exhausted}, declined {declined}, out of stock {out_of_stock}, refunded {}",
        refunded.len()
    );

    // 2. Stock balances per SKU, and nothing went negative.
    for (key, start) in &initial {
        let expected = start + restocked.get(key).copied().unwrap_or(0)
            - reserved.get(key).copied().unwrap_or(0)
            + released.get(key).copied().unwrap_or(0);
        assert_eq!(
            level[key],
            expected,
            "[{name}] stock of {key:?}: initial {start}, reserved {:?}, released {:?}",
            reserved.get(key),
            released.get(key)
        );
        assert!(level[key] >= 0);
    }

    // 3. Every charge in the gateway's ledger stands on the order's one stock decision, a
    //    reservation, and is the authorization the pipeline recorded (refunded exactly
    //    when the pipeline says so); every recorded authorization is charged once. (The
    //    gateway keeps one entry per idempotency key, so one entry per order says the
    //    payment stage uses one key per order.)
    let mut charged: BTreeMap<(String, String), String> = BTreeMap::new();
    for entry in gateway.ledger() {
        if !matches!(
            entry.status,
            LedgerStatus::Authorized | LedgerStatus::Refunded
        ) {
            continue;
        }
        let key = (entry.store_id.clone(), entry.order_id.clone());
        let decisions: Vec<EventType> = seen
            .by_order
            .get(&key)
            .into_iter()
            .flatten()
            .map(Event::event_type)
            .filter(|t| matches!(t, EventType::StockReserved | EventType::StockRejected))
            .collect();
        assert!(
            stock_reserved.contains(&key),
            "[{name}] the gateway charged order {key:?} ({:?}, {:?}), which has no standing stock reservation; its stock decisions: {decisions:?}",
            entry.authorization_id,
            entry.status
        );
        assert_eq!(
            authorized.get(&key),
            entry.authorization_id.as_ref(),
            "[{name}] order {key:?}: the charge is not the authorization the pipeline recorded"
        );
        assert_eq!(
            entry.status == LedgerStatus::Refunded,
            refunded.contains(&key),
            "[{name}] order {key:?}: ledger and events disagree about the refund"
        );
        let auth = entry.authorization_id.clone().unwrap_or_default();
        if let Some(earlier) = charged.insert(key.clone(), auth.clone()) {
            panic!("[{name}] order {key:?} was charged twice: {earlier} and {auth}");
        }
    }
    let uncharged: Vec<_> = authorized
        .iter()
        .filter(|(key, _)| !charged.contains_key(*key))
        .collect();
    assert!(
        uncharged.is_empty(),
        "[{name}] authorizations the gateway never charged: {uncharged:?}"
    );

    // 4. The run exercised what it claims to.
    assert!(
        retried_then_paid > 0,
        "[{name}] no order retried and then paid"
    );
    assert!(
        exhausted > 0,
        "[{name}] no order exhausted its attempts during the 5 s outage"
    );
    assert!(declined > 0, "[{name}] no order was declined");
    assert!(out_of_stock > 0, "[{name}] no SKU ran out");
    assert!(ends.get("Rejected(Fraud)").copied().unwrap_or(0) >= ORDERS / HUGE_EVERY);
    assert!(
        ends.get("Delivered").copied().unwrap_or(0) > ORDERS / 2,
        "[{name}] ends {ends:?}"
    );
    assert!(
        !refunded.is_empty(),
        "[{name}] no failed delivery was refunded"
    );

    // 5. The SQL sinks hold every order's timeline, status and stats, on both databases.
    for (label, url) in [
        ("postgres", sinks.pg.url.clone()),
        ("sqlite", sinks.sqlite_url()),
    ] {
        let db = rt
            .block_on(Db::connect(&url))
            .expect("the sinks' database opens");
        let until = deadline(120);
        let timelines = loop {
            match rt.block_on(read_back(&db, &seen, &end_of)) {
                Ok(t) => break t,
                Err(e) => assert!(
                    Instant::now() < until,
                    "[{name}] {label}: the sinks did not catch up within 120 s: {e}"
                ),
            }
            for w in [&pg_sinks, &lite_sinks] {
                w.assert_alive();
            }
            std::thread::sleep(Duration::from_millis(500));
        };
        let (counted, rows) = rt.block_on(compare_stats(&db, &timelines));
        eprintln!(
            "[{name}] {label}: {} orders with {} timeline events exactly once, statuses as the status module says; {counted} counted events in {rows} stats rows, equal to a recomputation",
            timelines.len(),
            timelines.values().map(Vec::len).sum::<usize>()
        );
        rt.block_on(db.close());
    }

    // 6. Both databases hold the same low-stock episodes (opened, resolved, occurrences),
    //    every opening published one ReplenishmentRequested, and every request published
    //    stands for an opening. Both databases' alerts sinks publish (under the same ID
    //    and content for the same opening); each opening is found by its store, SKU and
    //    time.
    let mut requested: BTreeMap<String, (String, String, i64)> = BTreeMap::new();
    for rec in common::read_topic(
        &env.settings.brokers,
        &env.topic(topics::PURCHASING_REPLENISHMENT),
    ) {
        let value = rec.value.expect("replenishment requests have values");
        let Event::ReplenishmentRequested(r) = codec
            .decode(&value, DecodeHints::default())
            .expect("a replenishment request decodes")
        else {
            panic!("[{name}] not a ReplenishmentRequested on the purchasing topic");
        };
        let what = (
            r.envelope.store_id.clone(),
            r.sku.clone(),
            r.envelope.occurred_at,
        );
        if let Some(earlier) = requested.insert(r.envelope.event_id.clone(), what.clone()) {
            assert_eq!(earlier, what, "[{name}] one replenishment ID, two requests");
        }
    }
    // Openings are counted per (store, SKU, time): a low spell can open, end and open
    // again within one batch of the inventory stage, whose events share a time.
    let mut published: BTreeMap<(String, String, i64), usize> = BTreeMap::new();
    for what in requested.values() {
        *published.entry(what.clone()).or_default() += 1;
    }
    // Each deployment's low-stock episodes: (store, SKU, opened, resolved, occurrences).
    type Episode = (String, String, i64, Option<i64>, i64);
    let mut episodes: Vec<Vec<Episode>> = Vec::new();
    for (label, url) in [
        ("postgres", sinks.pg.url.clone()),
        ("sqlite", sinks.sqlite_url()),
    ] {
        let db = rt
            .block_on(Db::connect(&url))
            .expect("the sinks' database opens");
        let mut opened: BTreeMap<(String, String, i64), usize> = BTreeMap::new();
        let mut spells: Vec<Episode> = Vec::new();
        for s in 0..STORES {
            for a in rt
                .block_on(db.alerts(&store(s), None, 10_000))
                .expect("alerts read back")
            {
                if a.kind == orderflow::views::AlertKind::LowStock {
                    *opened
                        .entry((a.store_id.clone(), a.subject.clone(), a.opened_at))
                        .or_default() += 1;
                    spells.push((
                        a.store_id,
                        a.subject,
                        a.opened_at,
                        a.resolved_at,
                        a.occurrences,
                    ));
                }
            }
        }
        spells.sort();
        assert!(
            !opened.is_empty(),
            "[{name}] {label}: no low-stock alert opened"
        );
        assert_eq!(
            opened, published,
            "[{name}] {label}: every low-stock opening published one replenishment request, and every request published stands for an opening"
        );
        eprintln!(
            "[{name}] {label}: {} low-stock alerts opened, each with its replenishment request",
            spells.len()
        );
        episodes.push(spells);
        rt.block_on(db.close());
    }
    // The two deployments read the same topics in their own time, yet find the same
    // episodes: a SKU's low spell is decided by the inventory stage and reported on one
    // topic, in order.
    assert_eq!(
        episodes[0], episodes[1],
        "[{name}] the low-stock episodes differ between PostgreSQL and SQLite"
    );

    // 7. Nothing was dead-lettered.
    let dlq = common::read_topic(&env.settings.brokers, &env.topic(topics::DLQ));
    assert!(
        dlq.is_empty(),
        "[{name}] {} dead letters: {:?}",
        dlq.len(),
        dlq.first()
    );
    drop(workers);
    drop((pg_sinks, lite_sinks));
}

/// The sinks' databases: one of their own on the test's PostgreSQL server, and an SQLite
/// file.
struct SinkDbs {
    pg: TestDatabase,
    dir: tempfile::TempDir,
}

impl SinkDbs {
    fn new(name: &str) -> Self {
        SinkDbs {
            pg: TestDatabase::create(&name.replace('-', "_")),
            dir: tempfile::tempdir().expect("a temporary directory"),
        }
    }

    fn sqlite_url(&self) -> String {
        format!(
            "sqlite://{}",
            self.dir.path().join("orderflow.db").display()
        )
    }

    /// A worker running the three sinks on `label`'s database, in consumer groups of
    /// their own (the two databases' sinks each read every record).
    fn spawn(&self, env: &TestEnv, label: &str, crash_at: Option<&str>) -> Worker {
        let url = match label {
            "postgres" => self.pg.url.clone(),
            _ => self.sqlite_url(),
        };
        let mut vars = vec![
            ("ORDERFLOW_DATABASE_URL", url),
            (
                "ORDERFLOW_GROUP_PREFIX",
                format!("{}-{label}", env.settings.group_prefix),
            ),
        ];
        if let Some(point) = crash_at {
            vars.push(("ORDERFLOW_CRASH_AT", point.to_owned()));
        }
        env.spawn_worker(&["projector", "stats", "alerts"], &vars)
    }
}

/// Every order's timeline as the projector stored it, once it holds exactly the order's
/// events (each once; `OrderCreated` once; carrier scans, which the test does not read,
/// aside) and `orders` gives the status the status module gives: `Err` says what is not
/// there yet, or what is wrong.
async fn read_back(
    db: &Db,
    seen: &Observed,
    end_of: &HashMap<(String, String), OrderStatus>,
) -> Result<BTreeMap<(String, String), Vec<orderflow::sql::read::TimelineEntry>>, String> {
    let mut out = BTreeMap::new();
    for (key, end) in end_of {
        let got = db
            .order(&key.0, &key.1)
            .await
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("order {key:?} is not in `orders`"))?;
        let mut ids: Vec<&str> = got
            .timeline
            .iter()
            .filter(|e| !matches!(e.event_type.as_str(), "OrderCreated" | "CarrierScan"))
            .map(|e| e.event_id.as_str())
            .collect();
        ids.sort_unstable();
        let mut expected: Vec<&str> = seen
            .by_order
            .get(key)
            .into_iter()
            .flatten()
            .map(|e| e.envelope().event_id.as_str())
            .collect();
        expected.sort_unstable();
        if ids != expected {
            return Err(format!(
                "order {key:?}: timeline {ids:?}, events on the topics {expected:?}"
            ));
        }
        let created = got
            .timeline
            .iter()
            .filter(|e| e.event_type == "OrderCreated")
            .count();
        if created != 1 {
            return Err(format!(
                "order {key:?}: {created} OrderCreated in its timeline"
            ));
        }
        if got.order.status != Some(*end) {
            return Err(format!(
                "order {key:?}: `orders` says {:?}, the status module {end:?}",
                got.order.status
            ));
        }
        out.insert(key.clone(), got.timeline);
    }
    Ok(out)
}

/// The per-minute counters recomputed from the timelines, against `stats_minute`:
/// (events counted, rows compared).
async fn compare_stats(
    db: &Db,
    timelines: &BTreeMap<(String, String), Vec<orderflow::sql::read::TimelineEntry>>,
) -> (i64, usize) {
    let minute = |t: i64| t - t.rem_euclid(60_000);
    let mut expected: BTreeMap<(String, i64, String), i64> = BTreeMap::new();
    let (mut from, mut to) = (i64::MAX, i64::MIN);
    for ((store_id, _), timeline) in timelines {
        for e in timeline {
            let column = match e.event_type.as_str() {
                "OrderCreated" => "orders_created",
                "OrderScreened" if e.payload["decision"] == "rejected" => "orders_rejected",
                "StockRejected" => "stock_rejections",
                "PaymentAuthorized" => "payments_authorized",
                "PaymentFailed" => "payments_failed",
                "PaymentRetrying" => "payments_retried",
                "PaymentRefunded" => "refunds",
                "Shipped" => "shipped",
                "Delivered" => "delivered",
                "DeliveryFailed" => "delivery_failures",
                _ => continue,
            };
            from = from.min(e.occurred_at);
            to = to.max(e.occurred_at);
            *expected
                .entry((store_id.clone(), minute(e.occurred_at), column.to_owned()))
                .or_default() += 1;
        }
    }
    let stores: BTreeSet<&String> = timelines.keys().map(|(s, _)| s).collect();
    let mut stored: BTreeMap<(String, i64, String), i64> = BTreeMap::new();
    let mut rows = 0;
    for s in stores {
        let minutes = db
            .stats(s, minute(from), to + 60_000)
            .await
            .expect("stats read back");
        rows += minutes.len();
        for m in minutes {
            for (c, v) in &m.counters {
                if *v != 0 {
                    stored.insert((s.clone(), m.time, c.column().to_owned()), *v);
                }
            }
        }
    }
    assert_eq!(
        stored, expected,
        "stats_minute against a recomputation from order_events"
    );
    (expected.values().sum(), rows)
}
