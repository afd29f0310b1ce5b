//! The traffic simulator and the carrier player.
//!
//! The plan's tests need no broker: determinism, the producer contract (through the
//! codec), skew, and the planted fraud — screened by the real fraud stage with its
//! default settings. The rest run against the real broker (`ORDERFLOW_TEST_BROKERS`):
//! pacing of a real run, and the carrier's exact scans, across restarts.

mod common;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use common::*;
use orderflow::config::{FraudSettings, Settings};
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{
    Envelope, Event, EventType, Packed, Picking, ReadyToShip, ScanKind, ScreeningDecision,
};
use orderflow::simulator::generate::{StockAction, sku_id, store_id};
use orderflow::simulator::{
    CarrierConfig, CarrierReport, LoadConfig, OrderKind, Plan, PlanConfig, SimError, play_carrier,
    run_load, scan_event_id,
};
use orderflow::stages::fraud::FraudStage;
use orderflow::stages::{Ctx, Input, Stage, Store};
use orderflow::topics::{self, CARRIER_UPDATES, FULFILLMENT_UPDATED, INVENTORY_COMMANDS};
use tokio_util::sync::CancellationToken;

fn plan(seed: u64, orders: u64) -> Plan {
    Plan::new(PlanConfig {
        orders,
        seed,
        run_id: "t1".into(),
        ..PlanConfig::default()
    })
}

fn decode_order(codec: &Codec, json: &[u8]) -> Event {
    codec
        .decode(
            json,
            DecodeHints {
                topic_default: Some(EventType::OrderCreated),
                ..Default::default()
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "order does not decode: {e}\n{}",
                String::from_utf8_lossy(json)
            )
        })
}

#[test]
fn the_plan_is_deterministic_per_seed() {
    let a: Vec<_> = plan(7, 2_000).orders().collect();
    let b: Vec<_> = plan(7, 2_000).orders().collect();
    let c: Vec<_> = plan(8, 2_000).orders().collect();
    assert_eq!(a.len(), 2_000);
    assert_eq!(a, b, "the same seed must give the same orders");
    assert_eq!(plan(7, 10).stock_commands(), plan(7, 10).stock_commands());
    let differing = a.iter().zip(&c).filter(|(x, y)| x != y).count();
    assert!(
        differing > 1_900,
        "another seed should give other orders; only {differing} of 2000 differ"
    );
    // The stamped JSON differs only by the timestamp.
    assert_eq!(a[5].to_json(1_000), b[5].to_json(1_000));
}

#[test]
fn every_order_and_command_passes_the_codec() {
    let codec = Codec::new();
    let p = plan(11, 3_000);
    let placed_at = 1_790_000_000_123;
    for o in p.orders() {
        let Event::OrderCreated(e) = decode_order(&codec, &o.to_json(placed_at)) else {
            panic!("order {} decoded to another type", o.order_id);
        };
        assert_eq!(e, o.to_event(placed_at), "order {}", o.order_id);
        assert_eq!(e.envelope.store_id, o.store_id);
        assert_eq!(e.placed_at, placed_at);
        assert!(
            (1..=3).contains(&e.items.len()),
            "{}: {} lines",
            o.order_id,
            e.items.len()
        );
        assert!(e.items.iter().all(|l| l.unit_price_cents >= 199
            && l.unit_price_cents % 100 == 99
            && l.quantity > 0));
        assert!(["USD", "EUR", "GBP", "CAD", "AUD", "SEK"].contains(&e.currency.as_str()));
        assert!(o.order_id.starts_with("o-t1-"));
    }
    // Stock: a restock and a threshold per (store, SKU), the hottest SKUs thin.
    let c = p.config();
    let commands = p.stock_commands();
    assert_eq!(commands.len(), (c.stores * c.skus * 2) as usize);
    for cmd in &commands {
        let e = codec
            .decode(&cmd.to_json(placed_at), DecodeHints::default())
            .unwrap_or_else(|e| panic!("command does not decode: {e}"));
        assert_eq!(e.envelope().store_id, cmd.store_id);
        assert_eq!(e.envelope().event_id, cmd.event_id);
        assert_eq!(e.envelope().order_id, None);
        match (&e, cmd.action) {
            (Event::StockRestocked(r), StockAction::Restock { quantity }) => {
                assert_eq!((r.sku.as_str(), r.quantity), (cmd.sku.as_str(), quantity));
                let hot = r.sku == sku_id(0) || r.sku == sku_id(1);
                assert_eq!(
                    r.quantity,
                    if hot {
                        c.low_stock_units
                    } else {
                        c.initial_stock
                    }
                );
            }
            (Event::ThresholdSet(t), StockAction::Threshold { threshold }) => {
                assert_eq!((t.sku.as_str(), t.threshold), (cmd.sku.as_str(), threshold));
            }
            other => panic!("unexpected command {other:?}"),
        }
    }
}

#[test]
fn hot_stores_and_skus_get_clearly_more_orders() {
    let p = Plan::new(PlanConfig {
        orders: 5_000,
        stores: 10,
        skus: 30,
        fraud_customers: 0,
        huge_orders: 0,
        ..PlanConfig::default()
    });
    let mut stores: BTreeMap<String, u64> = BTreeMap::new();
    let mut skus: BTreeMap<String, u64> = BTreeMap::new();
    for o in p.orders() {
        *stores.entry(o.store_id.clone()).or_default() += 1;
        for l in &o.items {
            *skus.entry(l.sku.clone()).or_default() += 1;
        }
    }
    assert_eq!(stores.len(), 10, "every store gets orders: {stores:?}");
    let hottest = stores[&store_id(0)];
    let coldest = stores[&store_id(9)];
    assert_eq!(Some(&hottest), stores.values().max(), "{stores:?}");
    assert!(
        hottest > 5 * coldest,
        "store-001 should get far more orders than store-010: {stores:?}"
    );
    // Roughly the Zipf share (1.1): store-001 about a third of all orders.
    let share = hottest as f64 / 5_000.0;
    assert!(
        (share - p.store_share(0)).abs() < 0.03,
        "{share} vs {}",
        p.store_share(0)
    );
    assert_eq!(Some(&skus[&sku_id(0)]), skus.values().max(), "{skus:?}");
    assert!(skus[&sku_id(0)] > 10 * skus[&sku_id(29)].max(1), "{skus:?}");
}

/// Screens the plan's orders, placed 10 ms apart, with the real fraud stage and its
/// default settings: exactly the orders of a burst beyond the velocity limit and the
/// huge ones are rejected, for the right reason; every ordinary order is approved.
#[test]
fn planted_fraud_trips_the_default_fraud_rules_and_nothing_else_does() {
    let defaults = FraudSettings::default();
    let p = plan(3, 4_000);
    let (bursts, huge) = p.planted();
    assert_eq!((bursts, huge), (2, 2));
    let mut stage = FraudStage::new(defaults.clone());
    let mut state = Store::default();
    let mut timers = Store::default();
    let codec = Codec::new();
    let t0 = 1_790_000_000_000;
    let mut burst_index: HashMap<(String, String), u32> = HashMap::new();
    let mut rejected = HashMap::<OrderKind, u32>::new();
    for o in p.orders() {
        let placed_at = t0 + 10 * o.seq as i64;
        let event = decode_order(&codec, &o.to_json(placed_at));
        let mut out = Vec::new();
        let cause = event.envelope().clone();
        let mut ctx = Ctx::new(
            "fraud",
            placed_at,
            cause.event_id.clone(),
            Some(cause),
            &mut state,
            &mut timers,
            &mut out,
        );
        stage
            .process(
                &mut ctx,
                Input {
                    topic: topics::ORDER_CREATED,
                    event: &event,
                },
            )
            .unwrap_or_else(|e| panic!("{}: {e}", o.order_id));
        let [Event::OrderScreened(s)] = out.as_slice() else {
            panic!("{}: expected one OrderScreened, got {out:?}", o.order_id);
        };
        let expect_rejected = match o.kind {
            OrderKind::Normal => false,
            OrderKind::Huge => {
                assert!(o.total_cents() > defaults.max_order_total_cents);
                assert_eq!(s.reasons.len(), 1, "{:?}", s.reasons);
                assert!(s.reasons[0].starts_with("amount_limit:"), "{:?}", s.reasons);
                true
            }
            OrderKind::FraudBurst => {
                let n = burst_index
                    .entry((o.store_id.clone(), o.customer_id.clone()))
                    .or_default();
                *n += 1;
                let over = *n > defaults.velocity_max_orders;
                if over {
                    assert_eq!(
                        s.reasons,
                        [format!(
                            "velocity: {n} orders within {}s exceeds {}",
                            defaults.velocity_window_secs, defaults.velocity_max_orders
                        )]
                    );
                }
                over
            }
        };
        assert_eq!(
            s.decision,
            if expect_rejected {
                ScreeningDecision::Rejected
            } else {
                ScreeningDecision::Approved
            },
            "{} ({:?}): {:?}",
            o.order_id,
            o.kind,
            s.reasons
        );
        if expect_rejected {
            *rejected.entry(o.kind).or_default() += 1;
        }
        state.commit();
    }
    // Each burst is velocity_max_orders + 3 orders of one customer at one store.
    assert_eq!(burst_index.len(), bursts as usize);
    assert!(
        burst_index
            .values()
            .all(|n| *n == defaults.velocity_max_orders + 3)
    );
    assert_eq!(rejected.get(&OrderKind::FraudBurst), Some(&(3 * bursts)));
    assert_eq!(rejected.get(&OrderKind::Huge), Some(&huge));
    assert_eq!(rejected.get(&OrderKind::Normal), None);
}

// ---------------------------------------------------------------------------------------
// Against the broker.

/// A fresh deployment (own prefix and groups) with the simulator's topics ready.
fn env(name: &str, partitions: i32) -> TestEnv {
    let env = TestEnv::new(name, partitions);
    for base in [INVENTORY_COMMANDS, FULFILLMENT_UPDATED, CARRIER_UPDATES] {
        wait_for_partitions(&env.topic(base), partitions);
    }
    env
}

#[test]
fn a_load_run_holds_the_target_rate_and_keys_by_store() {
    const ORDERS: u64 = 300;
    const RATE: f64 = 150.0;
    let env = env("sim-rate", 3);
    let config = LoadConfig {
        plan: PlanConfig {
            orders: ORDERS,
            stores: 4,
            skus: 5,
            run_id: "rate".into(),
            ..PlanConfig::default()
        },
        rate: RATE,
        stock: true,
        cancel_rate: 0.1,
    };
    let report = block_on(run_load(
        &env.settings,
        &config,
        false,
        &CancellationToken::new(),
    ))
    .expect("load run");
    assert_eq!(report.orders, ORDERS);
    assert_eq!(report.commands, 4 * 5 * 2);
    assert!(!report.interrupted);
    let achieved = report.achieved_rate();
    assert!(
        achieved > 0.9 * RATE && achieved < 1.01 * RATE,
        "achieved {achieved:.1}/s for a target of {RATE}/s in {:?}",
        report.elapsed
    );

    let codec = Codec::new();
    let orders = read_all(
        &env.settings.brokers,
        &env.topic(topics::ORDER_CREATED),
        ORDERS as usize,
        deadline(30),
    );
    assert_eq!(orders.len(), ORDERS as usize);
    let mut partition_of_store: HashMap<String, i32> = HashMap::new();
    let mut ids = std::collections::BTreeSet::new();
    for r in &orders {
        let Event::OrderCreated(o) = decode_order(&codec, r.value.as_deref().unwrap_or_default())
        else {
            panic!("not an order");
        };
        assert_eq!(r.key_str().as_deref(), Some(o.envelope.store_id.as_str()));
        let p = *partition_of_store
            .entry(o.envelope.store_id.clone())
            .or_insert(r.partition);
        assert_eq!(p, r.partition, "one store's orders share one partition");
        ids.insert(o.envelope.order_id.clone().unwrap_or_default());
    }
    assert_eq!(ids.len(), ORDERS as usize, "order IDs are distinct");
    // About a tenth of the orders are cancelled, each once, keyed like its order.
    assert!(
        (10..=60).contains(&report.cancellations),
        "{} cancellations of {ORDERS} orders at 0.1",
        report.cancellations
    );
    let cancels = read_all(
        &env.settings.brokers,
        &env.topic(topics::ORDER_CANCELLED),
        report.cancellations as usize,
        deadline(30),
    );
    assert_eq!(cancels.len() as u64, report.cancellations);
    let hints = DecodeHints {
        topic_default: topics::default_event_type(topics::ORDER_CANCELLED),
        ..DecodeHints::default()
    };
    let mut cancelled = std::collections::BTreeSet::new();
    for r in &cancels {
        let Ok(Event::OrderCancelled(c)) =
            codec.decode(r.value.as_deref().unwrap_or_default(), hints)
        else {
            panic!("not an OrderCancelled");
        };
        assert_eq!(r.key_str().as_deref(), Some(c.envelope.store_id.as_str()));
        assert_eq!(
            partition_of_store.get(&c.envelope.store_id),
            Some(&r.partition)
        );
        let order_id = c.envelope.order_id.clone().unwrap_or_default();
        assert!(ids.contains(&order_id), "{order_id}");
        cancelled.insert(order_id);
    }
    assert_eq!(
        cancelled.len(),
        cancels.len(),
        "one request per cancelled order"
    );
    // The records' create times span the schedule: (N - 1) / rate.
    let ts: Vec<i64> = orders.iter().filter_map(|r| r.timestamp).collect();
    let span = ts.iter().max().unwrap() - ts.iter().min().unwrap();
    let expected = ((ORDERS - 1) as f64 / RATE * 1000.0) as i64;
    assert!(
        (span - expected).abs() < 150,
        "orders span {span} ms, expected about {expected} ms"
    );

    let commands = read_all(
        &env.settings.brokers,
        &env.topic(INVENTORY_COMMANDS),
        40,
        deadline(30),
    );
    assert_eq!(commands.len(), 40);
    for r in &commands {
        let e = codec
            .decode(
                r.value.as_deref().unwrap_or_default(),
                DecodeHints::default(),
            )
            .expect("command decodes");
        assert_eq!(r.key_str().as_deref(), Some(e.envelope().store_id.as_str()));
    }
}

/// A carrier on its own thread and runtime, as an end-to-end test would run it.
struct RunningCarrier {
    stop: CancellationToken,
    handle: std::thread::JoinHandle<Result<CarrierReport, SimError>>,
}

impl RunningCarrier {
    fn start(settings: &Settings, config: CarrierConfig) -> Self {
        let stop = CancellationToken::new();
        let (settings, token) = (settings.clone(), stop.clone());
        let handle = std::thread::spawn(move || {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime")
                .block_on(play_carrier(&settings, config, token))
        });
        RunningCarrier { stop, handle }
    }

    fn assert_running(&self) {
        assert!(!self.handle.is_finished(), "the carrier stopped on its own");
    }

    fn stop(self) -> CarrierReport {
        self.stop.cancel();
        self.handle
            .join()
            .expect("carrier thread")
            .expect("carrier report")
    }
}

/// An event as a stage publishes it (a `ReadyToShip` by fulfillment): Avro single-object, with the
/// event-type and correlation-id headers, keyed by store.
fn avro_record(codec: &Codec, event: Event) -> Outgoing {
    let env = event.envelope().clone();
    Outgoing::new(env.store_id.clone(), codec.encode(&event).expect("encode"))
        .header("event-type", event.event_type().name())
        .header("correlation-id", env.correlation_id)
}

fn envelope(store: &str, order: &str, step: &str) -> Envelope {
    Envelope {
        event_id: uuid::Uuid::new_v4().to_string(),
        order_id: Some(order.to_owned()),
        store_id: store.to_owned(),
        correlation_id: format!("corr-{order}"),
        causation_id: Some(format!("cause-{step}")),
        occurred_at: now_ms(),
        schema_version: 1,
    }
}

/// Publishes Picking, Packed and ReadyToShip of each order; returns each order's
/// ReadyToShip envelope and the partition it landed on.
fn ship(env: &TestEnv, orders: &[(&str, &str)]) -> BTreeMap<String, (Envelope, i32)> {
    let codec = Codec::new();
    let mut recs = Vec::new();
    let mut ready = Vec::new();
    for (store, order) in orders {
        recs.push(avro_record(
            &codec,
            Picking {
                envelope: envelope(store, order, "picking"),
            }
            .into(),
        ));
        recs.push(avro_record(
            &codec,
            Packed {
                envelope: envelope(store, order, "packed"),
            }
            .into(),
        ));
        let e = envelope(store, order, "ready");
        ready.push((recs.len(), e.clone()));
        recs.push(avro_record(&codec, ReadyToShip { envelope: e }.into()));
    }
    let landed = env
        .producer()
        .send_all(&env.topic(FULFILLMENT_UPDATED), &recs);
    ready
        .into_iter()
        .map(|(i, e)| {
            (
                e.order_id.clone().unwrap_or_default(),
                (e, landed[i].partition),
            )
        })
        .collect()
}

/// Scans as read back from `carrier.updates`, per order in publication order.
#[derive(Debug)]
struct ReadScan {
    event: orderflow::events::CarrierScan,
    key: Option<String>,
    partition: i32,
    event_type_header: Option<String>,
}

fn read_scans(env: &TestEnv, at_least: usize) -> BTreeMap<String, Vec<ReadScan>> {
    let codec = Codec::new();
    let recs = read_all(
        &env.settings.brokers,
        &env.topic(CARRIER_UPDATES),
        at_least,
        deadline(60),
    );
    let mut by_order: BTreeMap<String, Vec<(i64, ReadScan)>> = BTreeMap::new();
    for r in recs {
        let header = r.header_str("event-type");
        let event = codec
            .decode(
                r.value.as_deref().unwrap_or_default(),
                DecodeHints {
                    header_type: header.as_deref(),
                    topic_default: topics::default_event_type(CARRIER_UPDATES),
                    origin: None,
                },
            )
            .expect("scan decodes");
        let Event::CarrierScan(scan) = event else {
            panic!("not a scan: {event:?}");
        };
        by_order
            .entry(scan.envelope.order_id.clone().unwrap_or_default())
            .or_default()
            .push((
                r.offset,
                ReadScan {
                    event: scan,
                    key: r.key_str(),
                    partition: r.partition,
                    event_type_header: header,
                },
            ));
    }
    by_order
        .into_iter()
        .map(|(o, mut v)| {
            v.sort_by_key(|(offset, _)| *offset);
            (o, v.into_iter().map(|(_, s)| s).collect())
        })
        .collect()
}

/// Every scan of an order as the carrier promises: the expected kinds in order, under
/// the derived IDs, with the ReadyToShip's envelope, one tracking number, keyed by store
/// on the ReadyToShip's partition.
fn assert_scans(config: &CarrierConfig, order: &str, ready: &(Envelope, i32), scans: &[ReadScan]) {
    let (r, partition) = ready;
    let kinds: Vec<ScanKind> = scans.iter().map(|s| s.event.scan).collect();
    assert_eq!(
        kinds,
        config.scans_for(&r.store_id, order),
        "order {order}: scans"
    );
    for s in scans {
        let e = &s.event.envelope;
        assert_eq!(
            e.event_id,
            scan_event_id(&r.store_id, order, s.event.scan).to_string()
        );
        assert_eq!(e.order_id.as_deref(), Some(order));
        assert_eq!(e.store_id, r.store_id);
        assert_eq!(e.correlation_id, r.correlation_id);
        assert_eq!(e.causation_id.as_deref(), Some(r.event_id.as_str()));
        assert_eq!(s.key.as_deref(), Some(r.store_id.as_str()));
        assert_eq!(s.partition, *partition, "order {order}: co-partitioned");
        assert_eq!(s.event_type_header.as_deref(), Some("CarrierScan"));
        assert_eq!(s.event.carrier, config.carrier);
        assert_eq!(
            s.event.tracking_number,
            config.tracking_number(&r.store_id, order)
        );
    }
}

fn wait_for_scans(env: &TestEnv, carrier: &RunningCarrier, n: usize) {
    let mut c = env.collector(CARRIER_UPDATES);
    wait_for(
        &format!("{n} carrier scans"),
        deadline(60),
        &[],
        |progress| {
            carrier.assert_running();
            c.poll(Duration::from_millis(100));
            *progress = format!("{} scans", c.records.len());
            (c.records.len() >= n).then_some(())
        },
    );
}

/// The carrier, started after the orders were ready, scans each exactly once: skips
/// Picking, Packed, a redelivered ReadyToShip and an undecodable record.
#[test]
fn the_carrier_scans_every_ready_order_exactly() {
    let env = env("sim-carrier", 3);
    let config = CarrierConfig {
        delivery_failure_rate: 0.4,
        seed: 5,
        scan_interval: Duration::from_millis(20),
        ..CarrierConfig::default()
    };
    let orders: Vec<(String, String)> = (0..8)
        .map(|i| (format!("store-{}", i % 3), format!("o-{i}")))
        .collect();
    let refs: Vec<(&str, &str)> = orders
        .iter()
        .map(|(s, o)| (s.as_str(), o.as_str()))
        .collect();
    let failing = orders
        .iter()
        .filter(|(s, o)| config.delivery_fails(s, o))
        .count();
    assert!(
        failing > 0 && failing < orders.len(),
        "the seed should fail some deliveries, not all ({failing})"
    );
    let ready = ship(&env, &refs);
    // A redelivered ReadyToShip (same bytes), and garbage.
    let codec = Codec::new();
    let (again, _) = &ready["o-3"];
    let producer = env.producer();
    producer.send_all(
        &env.topic(FULFILLMENT_UPDATED),
        &[
            avro_record(
                &codec,
                ReadyToShip {
                    envelope: again.clone(),
                }
                .into(),
            ),
            Outgoing::new("store-0", b"not an event".to_vec()),
        ],
    );

    let started = Instant::now();
    let carrier = RunningCarrier::start(&env.settings, config.clone());
    wait_for_scans(&env, &carrier, 4 * orders.len());
    eprintln!("scanned in {:.1}s", started.elapsed().as_secs_f64());
    let report = carrier.stop();
    assert_eq!(
        report,
        CarrierReport {
            orders_scanned: 8,
            scans_published: 32,
            delivered: (8 - failing) as u64,
            failed: failing as u64,
            duplicates_skipped: 1,
            undecodable: 1,
        }
    );
    let scans = read_scans(&env, 32);
    assert_eq!(scans.len(), 8, "{:?}", scans.keys());
    for (order, r) in &ready {
        assert_scans(&config, order, r, &scans[order]);
    }
}

/// Restarting the carrier neither loses an order nor re-scans a finished one; an order
/// cut off mid-way is finished by the next carrier under the same scan IDs.
#[test]
fn a_restarted_carrier_resumes_where_it_stopped() {
    let env = env("sim-carrier-restart", 2);
    let config = CarrierConfig {
        delivery_failure_rate: 0.0,
        scan_interval: Duration::from_millis(10),
        ..CarrierConfig::default()
    };
    // 1. Three orders, scanned; the carrier stops.
    let mut ready = ship(&env, &[("s-a", "o-1"), ("s-b", "o-2"), ("s-a", "o-3")]);
    let first = RunningCarrier::start(&env.settings, config.clone());
    wait_for_scans(&env, &first, 12);
    assert_eq!(first.stop().orders_scanned, 3);

    // 2. Two orders ready while no carrier runs: the next one takes exactly those.
    ready.extend(ship(&env, &[("s-b", "o-4"), ("s-c", "o-5")]));
    let second = RunningCarrier::start(&env.settings, config.clone());
    wait_for_scans(&env, &second, 20);
    let report = second.stop();
    assert_eq!((report.orders_scanned, report.scans_published), (2, 8));

    // 3. A slow carrier stopped after the first scan of an order; the next finishes it.
    let slow = CarrierConfig {
        scan_interval: Duration::from_secs(5),
        ..config.clone()
    };
    ready.extend(ship(&env, &[("s-a", "o-6")]));
    let third = RunningCarrier::start(&env.settings, slow);
    wait_for_scans(&env, &third, 21);
    let report = third.stop();
    assert_eq!((report.orders_scanned, report.scans_published), (0, 1));
    let fourth = RunningCarrier::start(&env.settings, config.clone());
    wait_for_scans(&env, &fourth, 25);
    let report = fourth.stop();
    assert_eq!((report.orders_scanned, report.scans_published), (1, 4));

    let scans = read_scans(&env, 25);
    assert_eq!(scans.len(), 6);
    for (order, r) in &ready {
        let s = &scans[order];
        if order == "o-6" {
            // picked_up twice, under one ID; then the rest once.
            assert_eq!(s.len(), 5, "{s:?}");
            assert_eq!(s[0].event.envelope.event_id, s[1].event.envelope.event_id);
            assert_scans(&config, order, r, &s[1..]);
        } else {
            assert_scans(&config, order, r, s);
        }
    }
}

/// The watch counts each of the run's orders once, by its final status, from the
/// lifecycle topics: only records after its snapshot, only the run's orders.
#[test]
fn the_outcome_watch_counts_the_runs_orders_by_outcome() {
    use orderflow::events::{
        Delivered, DeliveryFailed, OrderScreened, PaymentFailed, PaymentFailureReason,
        PaymentRefunded, StockRejected,
    };
    use orderflow::simulator::OutcomeWatch;
    use orderflow::topics::{DELIVERY_UPDATED, ORDER_SCREENED, PAYMENT_PROCESSED};

    let env = env("sim-outcomes", 2);
    for base in [
        ORDER_SCREENED,
        topics::INVENTORY_UPDATED,
        PAYMENT_PROCESSED,
        DELIVERY_UPDATED,
    ] {
        wait_for_partitions(&env.topic(base), 2);
    }
    let codec = Codec::new();
    let screened = |order: &str, decision| -> Event {
        OrderScreened {
            envelope: envelope("s-1", order, "screen"),
            decision,
            reasons: Vec::new(),
            customer_id: "c".into(),
            email: "c@example.com".into(),
            currency: "USD".into(),
            total_cents: 100,
            items: Vec::new(),
        }
        .into()
    };
    let payment_failed = |order: &str| -> Event {
        PaymentFailed {
            envelope: envelope("s-1", order, "pay"),
            amount_cents: 100,
            currency: "USD".into(),
            attempts: 1,
            reason: PaymentFailureReason::Declined,
            message: "declined".into(),
        }
        .into()
    };
    let delivered = |order: &str| -> Event {
        Delivered {
            envelope: envelope("s-1", order, "delivered"),
        }
        .into()
    };
    let delivery_failed = |order: &str| -> Event {
        DeliveryFailed {
            envelope: envelope("s-1", order, "failed"),
            reason: "not home".into(),
        }
        .into()
    };
    let publish = |events: Vec<Event>| {
        let producer = env.producer();
        for e in events {
            let topic = env.topic(topics::topic_of(e.event_type()));
            producer.send(&topic, &avro_record(&codec, e));
        }
    };
    // Before the snapshot: not counted.
    publish(vec![delivered("o-w-1")]);
    let watch = block_on(OutcomeWatch::snapshot(&env.settings)).expect("snapshot");
    publish(vec![
        screened("o-w-1", ScreeningDecision::Approved),
        screened("o-w-2", ScreeningDecision::Rejected),
        screened("o-w-3", ScreeningDecision::Approved),
        StockRejected {
            envelope: envelope("s-1", "o-w-3", "stock"),
            short: Vec::new(),
            reason: "out of stock".into(),
        }
        .into(),
        payment_failed("o-w-4"),
        delivered("o-w-5"),
        delivered("o-w-5"), // redelivered
        delivery_failed("o-w-6"),
        PaymentRefunded {
            envelope: envelope("s-1", "o-w-6", "refund"),
            amount_cents: 100,
            currency: "USD".into(),
            refund_id: "r-1".into(),
            reason: "delivery failed".into(),
        }
        .into(),
        delivery_failed("o-w-7"),
        delivered("o-other-1"), // another run's order
    ]);
    // Eight orders in the run: o-w-1 is still in flight, o-w-7 awaits its refund, o-w-8
    // was never seen; the watch gives up after its timeout.
    let outcomes = block_on(watch.observe(
        "o-w-".into(),
        8,
        Duration::from_secs(3),
        CancellationToken::new(),
        indicatif::ProgressBar::hidden(),
    ))
    .expect("observe");
    assert_eq!(
        (
            outcomes.delivered,
            outcomes.rejected_fraud,
            outcomes.rejected_stock,
            outcomes.cancelled,
            outcomes.refunded,
            outcomes.delivery_failed,
            outcomes.in_flight,
        ),
        (1, 1, 1, 1, 1, 1, 2),
        "{outcomes:?}"
    );
    assert!(outcomes.waited >= Duration::from_secs(3));
}
