//! A chaos run of the whole order pipeline on a broker of its own: 20,000 orders over 20
//! stores through fraud, inventory, payment (against the mock gateway with declines,
//! transient errors and a 5-second outage), fulfillment and delivery (with the simulated
//! carrier), in three worker processes under `at_least_once` — while workers are
//! SIGKILLed at random moments and restarted, and the broker itself is SIGKILLed and
//! started again on the same port with the same PostgreSQL storage.
//!
//! The same run under `exactly_once`, on the transactional broker (see
//! [`common::txn_broker`]), with 10,000 orders: workers are SIGKILLed and restarted under
//! their instance IDs (fencing the dead producer and aborting its transaction), seven
//! times, as the broker cannot be restarted (its memory storage keeps nothing). That
//! broker hands aborted records to read_committed readers: once the run is over, the
//! log's own transaction markers decide which records were aborted ([`common::txn_log`]),
//! they are counted and left out, no transaction may still be open, and every check
//! below is on the records a correct broker would show a read_committed reader.
//!
//! Asserted with exact counts, once the pipeline is idle: every order ends in a terminal
//! state consistent with its events; one content per event ID on every topic; no order
//! has two stock decisions; per SKU, stock = initial + restocks − reserved + released and
//! never negative; every gateway charge stands on a reservation and is the authorization
//! the pipeline recorded; every failed payment released its stock; nothing was
//! dead-lettered; every stage consumed every input partition to its end.
//!
//! Every invariant is checked and the test then fails once, listing each violated one, so
//! a single run tells everything that broke. The chaos schedule comes from a seed that
//! the test prints; `ORDERFLOW_CHAOS_SEED=<seed>` replays the same schedule.
//!
//! The `at_least_once` run needs `ORDERFLOW_TEST_POSTGRES_URL` (set by `scripts/test.sh`)
//! and `nisshi` on `PATH`; the broker's storage is a fresh database there. The
//! `exactly_once` run needs `ORDERFLOW_TEST_TXN_BROKERS`. The two runs take turns (2
//! cores): about three minutes, and two for `exactly_once` (three and a half when it
//! waits out its drain); progress every 5 s with `-- --nocapture`, worker and
//! broker logs in `target/test-logs/`.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::nisshi::OwnedBroker;
use common::pipeline::{self, Conflict, Lifecycle, Shop, rank, sku, store};
use common::postgres::TestDatabase;
use common::{Outgoing, TestEnv, TestProducer, Worker};
use orderflow::config::Guarantee;
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, EventType, OrderLine, PaymentFailureReason};
use orderflow::gateway::server::{Gateway, GatewayConfig, LedgerStatus, serve_gateway};
use orderflow::simulator::carrier::{CarrierConfig, CarrierReport, play_carrier};
use orderflow::status;
use orderflow::topics;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Orders of the `at_least_once` run.
const ORDERS: usize = 20_000;
/// Orders of the `exactly_once` run, which must stay within four minutes, failing or not.
const TXN_ORDERS: usize = 10_000;
const SHOP: Shop = Shop {
    stores: 20,
    skus: 10,
    huge_every: 97,
};
const PARTITIONS: i32 = 6;
const WORKERS: usize = 3;
/// SIGKILLs of a worker (each restarted at once), at random moments of the run.
const KILLS: usize = 6;
/// SKU-0 and SKU-1 start with this much in every store, about a quarter of what a
/// store's orders ask for: they run out.
const SCARCE_UNITS: i32 = 60;
/// About twice what a store's orders ask for.
const PLENTY_UNITS: i32 = 500;
/// Units of SKU-0 delivered mid-run to every other store.
const MIDRUN_UNITS: i32 = 40;
/// The pace of the order stream; about what the pipeline sustains on a 2-core machine,
/// so that the chaos hits a pipeline in full flow rather than one draining a backlog.
const ORDERS_PER_SECOND: f64 = 150.0;
const OUTAGE: Duration = Duration::from_secs(5);
/// How long the broker stays down before it is started again.
const BROKER_DOWN: Duration = Duration::from_secs(2);
/// Two kills (or a kill and the broker restart) are at least this far apart, so that
/// each hits a pipeline that has started to move again.
const CHAOS_GAP: Duration = Duration::from_secs(4);
/// How long the pipeline has, beyond the time the stream takes at its pace, to finish
/// every order.
const DRAIN: Duration = Duration::from_secs(150);
/// The same for the `exactly_once` run: it finishes within about 15 s of the last order.
const TXN_DRAIN: Duration = Duration::from_secs(120);

fn initial_units(sku_index: usize) -> i32 {
    if sku_index < 2 {
        SCARCE_UNITS
    } else {
        PLENTY_UNITS
    }
}

/// One thing the chaos schedule does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    /// SIGKILL worker slot `n` and start a new worker in its place.
    KillWorker(usize),
    /// SIGKILL the broker, wait [`BROKER_DOWN`], start it again.
    RestartBroker,
    /// The gateway answers every request with an outage error for [`OUTAGE`].
    Outage,
    /// Deliver [`MIDRUN_UNITS`] of SKU-0 to every other store.
    Restock,
}

/// When each act happens, as the share of orders that have reached a terminal state —
/// progress of the pipeline rather than time, so that the chaos spreads over the run
/// however fast the machine is. Kills and the broker restart each come at a random
/// point of a slot of their own between 5% and 90% (the broker in the middle slot; one
/// more kill there when the broker cannot restart).
fn schedule(seed: u64, broker_restart: bool) -> Vec<(f64, Act)> {
    let slots = KILLS + 1;
    let width = 0.85 / slots as f64;
    let mut plan = Vec::new();
    for s in 0..slots {
        let r = pipeline::mix(seed ^ (s as u64 + 1));
        // Somewhere in the middle 60% of the slot.
        let at = 0.05 + width * (s as f64 + 0.2 + 0.6 * (r % 1000) as f64 / 1000.0);
        let act = if s == slots / 2 && broker_restart {
            Act::RestartBroker
        } else {
            Act::KillWorker((pipeline::mix(r) % WORKERS as u64) as usize)
        };
        plan.push((at, act));
    }
    plan.push((0.2, Act::Outage));
    plan.push((0.6, Act::Restock));
    plan.sort_by(|a, b| a.0.total_cmp(&b.0));
    plan
}

/// `e` with the times a replay re-stamps (when it happened, and for a retry when the next
/// attempt is due) taken from `like`.
fn retimed(e: &Event, like: &Event) -> Event {
    let mut e = e.clone();
    e.envelope_mut().occurred_at = like.envelope().occurred_at;
    if let (Event::PaymentRetrying(r), Event::PaymentRetrying(l)) = (&mut e, like) {
        r.next_attempt_at = l.next_attempt_at;
    }
    e
}

fn seed() -> u64 {
    match std::env::var("ORDERFLOW_CHAOS_SEED") {
        Ok(s) => s
            .parse()
            .unwrap_or_else(|e| panic!("ORDERFLOW_CHAOS_SEED={s:?} is not a number: {e}")),
        Err(_) => pipeline::mix(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .expect("clock after 1970")
                .as_nanos() as u64,
        ),
    }
}

/// The carrier simulator, restarted if the broker restart ends it (it resumes at its
/// group's committed offsets, so no order is lost or scanned twice).
struct Carrier {
    settings: orderflow::config::Settings,
    stop: CancellationToken,
    task: JoinHandle<Result<CarrierReport, orderflow::simulator::SimError>>,
    restarts: Vec<String>,
    /// The run's name in log lines.
    label: &'static str,
}

impl Carrier {
    fn start(
        rt: &tokio::runtime::Runtime,
        settings: &orderflow::config::Settings,
        stop: &CancellationToken,
        label: &'static str,
    ) -> Carrier {
        Carrier {
            settings: settings.clone(),
            stop: stop.clone(),
            task: Self::spawn(rt, settings, stop),
            restarts: Vec::new(),
            label,
        }
    }

    fn spawn(
        rt: &tokio::runtime::Runtime,
        settings: &orderflow::config::Settings,
        stop: &CancellationToken,
    ) -> JoinHandle<Result<CarrierReport, orderflow::simulator::SimError>> {
        let settings = settings.clone();
        let stop = stop.clone();
        rt.spawn(async move {
            let config = CarrierConfig {
                delivery_failure_rate: 0.05,
                ..CarrierConfig::default()
            };
            play_carrier(&settings, config, stop).await
        })
    }

    fn keep_alive(&mut self, rt: &tokio::runtime::Runtime) {
        if self.task.is_finished() && !self.stop.is_cancelled() {
            let old =
                std::mem::replace(&mut self.task, Self::spawn(rt, &self.settings, &self.stop));
            let outcome = format!("{:?}", rt.block_on(old));
            eprintln!(
                "[{}] the carrier ended ({outcome}); restarted it",
                self.label
            );
            self.restarts.push(outcome);
        }
    }
}

/// The runs take turns: each needs both cores.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

#[test]
fn orders_survive_killed_workers_and_a_broker_restart() {
    chaos(Guarantee::AtLeastOnce);
}

#[test]
fn orders_survive_killed_workers_under_exactly_once() {
    chaos(Guarantee::ExactlyOnce);
}

/// One chaos run: `at_least_once` on a nisshi broker the test owns (and restarts), or
/// `exactly_once` on the shared transactional broker.
fn chaos(guarantee: Guarantee) {
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let exactly_once = guarantee == Guarantee::ExactlyOnce;
    let label = if exactly_once { "chaos-txn" } else { "chaos" };
    let orders_total = if exactly_once { TXN_ORDERS } else { ORDERS };
    let test_started = Instant::now();
    let seed = seed();
    eprintln!("[{label}] seed {seed} (ORDERFLOW_CHAOS_SEED={seed} replays this schedule)");

    // Declared in this order so that they are dropped in reverse: workers, then the
    // broker, then its database.
    let db = (!exactly_once).then(|| TestDatabase::create("chaos"));
    let mut broker = db
        .as_ref()
        .map(|db| OwnedBroker::start(&format!("chaos-{}", db.name), &db.url));
    let env = match &broker {
        Some(b) => {
            let mut env = TestEnv::on("chaos", PARTITIONS, &b.brokers());
            // This broker keeps every record in PostgreSQL (so that it survives its
            // restart) and serves each request as SQL: a commit per few records and a
            // fetch every 10 ms from each of a dozen consumers swamp it. Batches and
            // fetches as a deployment on such a broker would set them.
            env.settings.batch_linger_ms = 100;
            env.settings
                .kafka
                .insert("fetch.wait.max.ms".to_owned(), "500".to_owned());
            env
        }
        None => TestEnv::exactly_once("chaos-txn", PARTITIONS),
    };
    for base in topics::PIPELINE {
        common::wait_for_partitions_on(&env.settings.brokers, &env.topic(base), PARTITIONS);
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
        seed,
        ..GatewayConfig::default()
    })
    .expect("a valid gateway config");
    let (gateway_addr, _gateway_task) = rt
        .block_on(serve_gateway("127.0.0.1:0", gateway.clone(), stop.clone()))
        .expect("the gateway listens");
    let mut carrier = Carrier::start(&rt, &env.settings, &stop, label);

    // Stock first, then the workers, then the orders.
    let producer = env.producer();
    let commands_topic = env.topic(topics::INVENTORY_COMMANDS);
    let mut initial: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut commands = Vec::new();
    for s in 0..SHOP.stores {
        for k in 0..SHOP.skus {
            initial.insert((store(s), sku(k)), i64::from(initial_units(k)));
            commands.push(pipeline::restock(
                &store(s),
                &sku(k),
                initial_units(k),
                "initial",
            ));
        }
    }
    producer.send_all(&commands_topic, &commands);

    let wenv = pipeline::worker_env(&gateway_addr.to_string());
    let mut workers: Vec<Worker> = (0..WORKERS).map(|_| env.spawn_worker(&[], &wenv)).collect();
    // Under `exactly_once` a worker comes back under its instance ID, as a deployment
    // restarts it: its producer fences the dead one's and aborts the transaction it left
    // open (which the transactional broker would otherwise keep open for good).
    let replace = |w: &mut Worker| {
        if exactly_once {
            env.restart_worker(w, &[], &wenv);
        } else {
            w.kill9();
            *w = env.spawn_worker(&[], &wenv);
        }
    };
    // The shelves are stocked before the shop opens: orders published alongside the
    // restocks could be taken first (no order across the inventory's input topics).
    let mut seen = Lifecycle::new(&env);
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        seen.poll(Duration::from_millis(50));
        let stocked = seen
            .other
            .iter()
            .filter(|e| matches!(e, Event::StockLevelChanged(c) if c.reason == "restock"))
            .count();
        if stocked == initial.len() {
            break;
        }
        for w in &workers {
            w.assert_alive();
        }
        assert!(
            Instant::now() < until,
            "[{label}] only {stocked} of {} restocks applied within 60 s",
            initial.len()
        );
    }
    eprintln!(
        "[{label}] {} workers running, shelves stocked after {:.1}s",
        WORKERS,
        test_started.elapsed().as_secs_f64()
    );

    let codec = Codec::new();
    let mut created: HashMap<(String, String), Event> = HashMap::new();
    let mut orders = Vec::with_capacity(orders_total);
    for i in 0..orders_total {
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
    let order_keys: Vec<(String, String)> = {
        let mut k: Vec<_> = created.keys().cloned().collect();
        k.sort();
        k
    };

    // The orders go out from a thread of their own, at a steady pace, while this thread
    // plays the schedule and follows the topics.
    let publishing = Duration::from_secs_f64(orders_total as f64 / ORDERS_PER_SECOND);
    let plan = schedule(seed, broker.is_some());
    eprintln!(
        "[{label}] publishing {orders_total} orders ({guarantee}) at {ORDERS_PER_SECOND}/s; schedule by share of orders terminal: {plan:?}"
    );
    let published = Arc::new(AtomicUsize::new(0));
    let mut publisher = Some({
        let brokers = env.settings.brokers.clone();
        let topic = env.topic(topics::ORDER_CREATED);
        let published = published.clone();
        std::thread::spawn(move || {
            TestProducer::new(&brokers).send_paced_counted(
                &topic,
                &orders,
                Some(ORDERS_PER_SECOND),
                &published,
            );
        })
    });

    let mut failures: Vec<String> = Vec::new();
    let mut kills = 0;
    let mut broker_restarts = 0;
    let mut restocked: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut exited: Vec<String> = Vec::new();
    let t0 = Instant::now();
    let mut next = 0;
    let mut last_chaos = t0;
    let mut outage_until: Option<Instant> = None;
    let mut progress_at = t0;
    let drain = if exactly_once { TXN_DRAIN } else { DRAIN };
    let deadline = t0 + publishing + drain;
    loop {
        seen.poll(Duration::from_millis(20));
        let terminal = seen.terminal(&order_keys);
        let share = terminal as f64 / orders_total as f64;
        while next < plan.len() && share >= plan[next].0 {
            let (at, act) = plan[next];
            let violent = matches!(act, Act::KillWorker(_) | Act::RestartBroker);
            if violent && last_chaos.elapsed() < CHAOS_GAP {
                break;
            }
            next += 1;
            eprintln!(
                "[{label}] t={:.1}s, {terminal} orders terminal (planned at {:.0}%): {act:?}",
                t0.elapsed().as_secs_f64(),
                at * 100.0
            );
            match act {
                Act::KillWorker(n) => {
                    replace(&mut workers[n]);
                    kills += 1;
                }
                Act::RestartBroker => {
                    let broker = broker
                        .as_mut()
                        .expect("a restart is planned only for a broker the test owns");
                    broker.kill9();
                    std::thread::sleep(BROKER_DOWN);
                    broker.restart();
                    broker_restarts += 1;
                }
                Act::Outage => {
                    gateway.set_outage(true);
                    outage_until = Some(Instant::now() + OUTAGE);
                }
                Act::Restock => {
                    let mut deliveries = Vec::new();
                    for st in (0..SHOP.stores).step_by(2) {
                        restocked.insert((store(st), sku(0)), i64::from(MIDRUN_UNITS));
                        deliveries.push(pipeline::restock(
                            &store(st),
                            &sku(0),
                            MIDRUN_UNITS,
                            "midrun",
                        ));
                    }
                    producer.send_all(&commands_topic, &deliveries);
                }
            }
            if violent {
                last_chaos = Instant::now();
            }
        }
        if outage_until.is_some_and(|t| Instant::now() >= t) {
            gateway.set_outage(false);
            outage_until = None;
            eprintln!(
                "[{label}] t={:.1}s: outage over",
                t0.elapsed().as_secs_f64()
            );
        }
        // A worker that exits on its own is a finding; a new one takes its place so
        // that the run goes on and reports everything else.
        for w in workers.iter_mut() {
            if let Some(status) = w.exit_status() {
                let msg = format!(
                    "worker {} exited with {status}; log {}:\n{}",
                    w.instance,
                    w.log_path.display(),
                    w.log_tail(30)
                );
                eprintln!("[{label}] {msg}");
                exited.push(msg);
                replace(w);
            }
        }
        if let Some(broker) = broker.as_mut() {
            broker.assert_alive();
        }
        carrier.keep_alive(&rt);
        if publisher.as_ref().is_some_and(|p| p.is_finished()) {
            if let Err(e) = publisher.take().expect("publisher").join() {
                std::panic::resume_unwind(e);
            }
            eprintln!(
                "[{label}] t={:.1}s: all {orders_total} orders published and acknowledged",
                t0.elapsed().as_secs_f64()
            );
        }
        if progress_at.elapsed() >= Duration::from_secs(5) {
            progress_at = Instant::now();
            eprintln!(
                "[{label}] t={:.0}s: published {}, terminal {terminal}; {} records read ({} redelivered, {} conflicting), per topic {:?}",
                t0.elapsed().as_secs_f64(),
                published.load(Ordering::Relaxed),
                seen.records,
                seen.duplicates,
                seen.conflicts.len(),
                seen.per_topic
            );
        }
        if next == plan.len() && publisher.is_none() && terminal == orders_total {
            eprintln!(
                "[{label}] t={:.1}s: all {orders_total} orders terminal",
                t0.elapsed().as_secs_f64()
            );
            break;
        }
        if Instant::now() >= deadline {
            // The transactional broker can keep records of an open or aborted transaction
            // from read_committed readers: say whether the missing events are there.
            let hidden = if exactly_once {
                let hidden = seen.hidden_events(&env.settings, &seen.unfinished(&order_keys));
                format!(
                    "\n{} events about them only a read_uncommitted reader finds{}",
                    hidden.len(),
                    if hidden.is_empty() {
                        String::new()
                    } else {
                        format!(", e.g.\n{}", hidden[..hidden.len().min(15)].join("\n"))
                    }
                )
            } else {
                String::new()
            };
            failures.push(format!(
                "every order reaches a terminal state: only {terminal} of {orders_total} did within {:.0}s of the first order ({} published, {next} of {} chaos acts done); some that did not:\n{}{hidden}",
                (publishing + drain).as_secs_f64(),
                published.load(Ordering::Relaxed),
                plan.len(),
                seen.stuck(&order_keys, 15)
            ));
            break;
        }
    }
    gateway.set_outage(false);
    if let Some(p) = publisher.take()
        && let Err(e) = p.join()
    {
        std::panic::resume_unwind(e);
    }

    // Read back every SKU's stock: an adjustment by 0 is a count that confirms the level.
    let probes: Vec<Outgoing> = initial
        .keys()
        .map(|(s, k)| pipeline::probe(s, k, "probe"))
        .collect();
    producer.send_all(&commands_topic, &probes);
    let mut level: BTreeMap<(String, String), i64> = BTreeMap::new();
    let until = Instant::now() + Duration::from_secs(60);
    while level.len() < initial.len() && Instant::now() < until {
        seen.poll(Duration::from_millis(50));
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
    if level.len() < initial.len() {
        failures.push(format!(
            "stock levels can be read: only {} of {} stock probes answered within 60 s",
            level.len(),
            initial.len()
        ));
    }

    // No partition stalled: every stage commits every input partition to its end. Under
    // transactions a partition's end is past its last record, not its high watermark
    // (see `stage_lag_to_records`).
    let until = Instant::now() + Duration::from_secs(60);
    let lag = loop {
        let lag = if exactly_once {
            seen.poll(Duration::from_millis(100));
            pipeline::stage_lag_to_records(&env.settings, PARTITIONS, &seen.ends())
        } else {
            pipeline::stage_lag(&env.settings, PARTITIONS)
        };
        match &lag {
            Ok(l) if l.is_empty() => break lag,
            _ if Instant::now() >= until => break lag,
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    };
    match lag {
        Ok(l) if l.is_empty() => {
            eprintln!("[{label}] every stage consumed every input partition to its end")
        }
        Ok(l) => {
            // What the stage missed, and where its state (which decides under either
            // guarantee) says it continues.
            let detail: Vec<String> = l
                .iter()
                .map(|lag| {
                    format!(
                        "{lag:?}: state position {:?}; records {:?}",
                        pipeline::state_position(
                            &env.settings,
                            lag.stage,
                            lag.topic,
                            lag.partition
                        ),
                        seen.describe(
                            lag.topic,
                            lag.partition,
                            lag.committed.unwrap_or(0),
                            lag.end
                        )
                    )
                })
                .collect();
            failures.push(format!(
                "no partition stalled: {} stage input partitions still behind their end 60 s after the last order ended:\n{}",
                l.len(),
                detail.join("\n")
            ));
        }
        Err(e) => failures.push(format!(
            "no partition stalled: could not read the groups' offsets: {e}"
        )),
    }
    seen.drain();
    if exactly_once {
        // The transactional broker's high watermark can fall short of a batch's end, so
        // reading up to it may not be everything: read on until nothing more arrives.
        let until = Instant::now() + Duration::from_secs(30);
        let mut quiet = 0;
        while quiet < 3 && Instant::now() < until {
            let before = seen.records;
            seen.poll(Duration::from_millis(300));
            quiet = if seen.records == before { quiet + 1 } else { 0 };
        }
        // Every check below is on what a read_committed reader of a correct broker sees.
        // This broker also hands over the records of aborted transactions; the log's own
        // transaction markers tell them apart (`common::txn_log`), and they are left out
        // and counted. Every killed worker was restarted under its instance ID, so no
        // transaction may still be open.
        let hidden = seen.as_committed(&env.settings.brokers, PARTITIONS);
        let aborted: usize = hidden.values().map(|((a, _), _)| a).sum();
        let open: usize = hidden.values().map(|((_, o), _)| o).sum();
        let markers: (usize, usize) = hidden
            .values()
            .fold((0, 0), |(c, a), (_, (mc, ma))| (c + mc, a + ma));
        eprintln!(
            "[{label}] transactions: {} commit and {} abort markers on the pipeline topics; {aborted} records of aborted transactions read and left out, {open} of open ones; per topic (aborted, open), (commits, aborts): {hidden:?}",
            markers.0, markers.1
        );
        if open > 0 {
            failures.push(format!(
                "every transaction is decided once every killed worker is back: {open} records of open transactions ({hidden:?})"
            ));
        }
        level.clear();
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
    let carrier_report = rt.block_on(carrier.task);
    eprintln!(
        "[{label}] carrier: {carrier_report:?}; restarted {} times",
        carrier.restarts.len()
    );
    if let Some(n) = exited.first() {
        failures.push(format!(
            "workers survive the chaos they are not killed by: {} exited on their own, the first: {n}",
            exited.len()
        ));
    }

    // 1. Every order ended, consistently with its own events.
    let mut ends: BTreeMap<String, usize> = BTreeMap::new();
    let mut inconsistent = Vec::new();
    let mut reserved: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut released: BTreeMap<(String, String), i64> = BTreeMap::new();
    let mut authorized: BTreeMap<(String, String), (String, i64)> = BTreeMap::new();
    let mut refunded = BTreeSet::new();
    let (mut retried, mut exhausted, mut declined, mut out_of_stock) = (0, 0, 0, 0);
    let mut failed_without_release = Vec::new();
    let mut history: HashMap<(String, String), Vec<Event>> = HashMap::new();
    for key in &order_keys {
        let mut events = seen.by_order.get(key).cloned().unwrap_or_default();
        if !events
            .iter()
            .any(|e| e.event_type() == EventType::OrderCreated)
        {
            events.push(created[key].clone());
        }
        events.sort_by_key(|e| (rank(e.event_type()), e.envelope().occurred_at));
        match status::check_complete(&events) {
            Ok(end) => *ends.entry(format!("{end:?}")).or_default() += 1,
            // See the gateway ledger below: under exactly_once on this broker, an order
            // an aborted transaction's record was about may have been acted on by a
            // stage that read that record; reported, not failed.
            Err(_) if exactly_once && seen.leaked.contains(key) => {
                *ends
                    .entry("inconsistent after an aborted record leaked".into())
                    .or_default() += 1;
            }
            Err(e) => {
                *ends.entry("inconsistent or unfinished".into()).or_default() += 1;
                inconsistent.push(format!("{key:?}: {e}"));
            }
        }
        if events
            .iter()
            .any(|e| e.event_type() == EventType::PaymentRetrying)
        {
            retried += 1;
        }
        let reservation: Option<&Vec<OrderLine>> = events.iter().find_map(|e| match e {
            Event::StockReserved(r) => Some(&r.items),
            _ => None,
        });
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
                    authorized.insert(key.clone(), (a.authorization_id.clone(), a.amount_cents));
                }
                Event::PaymentFailed(f) => {
                    match f.reason {
                        PaymentFailureReason::GatewayUnavailable => exhausted += 1,
                        PaymentFailureReason::Declined => declined += 1,
                        // Nothing in this run cancels an order.
                        PaymentFailureReason::Cancelled => {
                            panic!("order {key:?} failed as cancelled: {f:?}")
                        }
                    }
                    // 6. Every failed payment released exactly what was reserved.
                    let releases: Vec<&Vec<OrderLine>> = events
                        .iter()
                        .filter_map(|e| match e {
                            Event::StockReleased(r) => Some(&r.items),
                            _ => None,
                        })
                        .collect();
                    if releases.len() != 1 || Some(releases[0]) != reservation {
                        failed_without_release.push(format!(
                            "{key:?}: reserved {reservation:?}, released {releases:?}"
                        ));
                    }
                }
                Event::PaymentRefunded(_) => {
                    refunded.insert(key.clone());
                }
                _ => {}
            }
        }
        history.insert(key.clone(), events);
    }
    eprintln!(
        "[{label}] ends {ends:?}; retried {retried}, exhausted {exhausted}, declined {declined}, out of stock {out_of_stock}, authorized {}, refunded {}",
        authorized.len(),
        refunded.len()
    );
    if !inconsistent.is_empty() {
        failures.push(format!(
            "every order reaches a terminal state consistent with its events: {} of {orders_total} do not, e.g.\n{}",
            inconsistent.len(),
            inconsistent[..inconsistent.len().min(10)].join("\n")
        ));
    }

    // 2. One content per event ID, on every topic.
    eprintln!(
        "[{label}] {} records on the pipeline topics, {} redelivered with the same content, {} with the ID of another content",
        seen.records,
        seen.duplicates,
        seen.conflicts.len()
    );
    if !seen.conflicts.is_empty() {
        let mut by_type: BTreeMap<(&str, String), usize> = BTreeMap::new();
        for c in &seen.conflicts {
            *by_type
                .entry((c.other.topic, c.other.event.event_type().to_string()))
                .or_default() += 1;
        }
        // A replay that only re-stamped the time, and one that decided differently, are
        // both violations; telling them apart says where to look.
        let (time_only, decided): (Vec<&Conflict>, Vec<&Conflict>) = seen
            .conflicts
            .iter()
            .partition(|c| retimed(&c.other.event, &c.first.event) == c.first.event);
        let show = |c: &Conflict| {
            format!(
                "event ID {}:\n  first {}/{}@{}: {:?}\n  then  {}/{}@{}: {:?}",
                c.first.event.envelope().event_id,
                c.first.topic,
                c.first.partition,
                c.first.offset,
                c.first.event,
                c.other.topic,
                c.other.partition,
                c.other.offset,
                c.other.event
            )
        };
        let examples: Vec<String> = decided
            .iter()
            .take(3)
            .chain(time_only.iter().take(2))
            .map(|c| show(c))
            .collect();
        failures.push(format!(
            "one content per event ID: {} records repeat an event ID with different content — {} differ only in their times (occurred_at, next_attempt_at), {} in more (per topic and type: {by_type:?}), e.g.\n{}",
            seen.conflicts.len(),
            time_only.len(),
            decided.len(),
            examples.join("\n")
        ));
    }

    // 3. No order has two stock decisions: neither reserved and rejected, nor reserved
    // twice differently — counting every content seen, also one under a reused ID.
    let mut decisions: HashMap<(String, String), BTreeSet<String>> = HashMap::new();
    let all_seen = seen
        .by_order
        .values()
        .flatten()
        .chain(seen.conflicts.iter().map(|c| &c.other.event));
    for e in all_seen {
        let env = e.envelope();
        // The decision and its ID, not the time: a replay that decides the same under
        // the same ID is one decision (its new time is the content check's business).
        let decision = match e {
            Event::StockReserved(r) => format!("{} reserved {:?}", env.event_id, r.items),
            Event::StockRejected(r) => format!("{} rejected {:?}", env.event_id, r.short),
            _ => continue,
        };
        if let Some(order) = &env.order_id {
            decisions
                .entry((env.store_id.clone(), order.clone()))
                .or_default()
                .insert(decision);
        }
    }
    let twice: Vec<String> = decisions
        .iter()
        .filter(|(_, d)| d.len() > 1)
        .map(|(k, d)| format!("{k:?}: {d:?}"))
        .collect();
    eprintln!(
        "[{label}] {} orders with a stock decision, {} with more than one",
        decisions.len(),
        twice.len()
    );
    if !twice.is_empty() {
        failures.push(format!(
            "no order with two stock decisions: {} orders have more than one, e.g.\n{}",
            twice.len(),
            twice[..twice.len().min(5)].join("\n")
        ));
    }

    // 4. Stock balances per SKU, and never went negative.
    let mut unbalanced = Vec::new();
    for (key, start) in &initial {
        let expected = start + restocked.get(key).copied().unwrap_or(0)
            - reserved.get(key).copied().unwrap_or(0)
            + released.get(key).copied().unwrap_or(0);
        match level.get(key) {
            Some(l) if *l == expected && *l >= 0 => {}
            l => unbalanced.push(format!(
                "{key:?}: level {l:?}, expected {expected} = initial {start} + restocked {} - reserved {} + released {}",
                restocked.get(key).copied().unwrap_or(0),
                reserved.get(key).copied().unwrap_or(0),
                released.get(key).copied().unwrap_or(0)
            )),
        }
    }
    let negative: Vec<String> = seen
        .other
        .iter()
        .chain(seen.conflicts.iter().map(|c| &c.other.event))
        .filter_map(|e| match e {
            Event::StockLevelChanged(c) if c.available < 0 => Some(format!("{c:?}")),
            Event::LowStock(c) if c.available < 0 => Some(format!("{c:?}")),
            _ => None,
        })
        .collect();
    eprintln!(
        "[{label}] stock of {} SKUs read back: {} unbalanced, {} negative levels reported; {} units reserved, {} released",
        level.len(),
        unbalanced.len(),
        negative.len(),
        reserved.values().sum::<i64>(),
        released.values().sum::<i64>()
    );
    if !unbalanced.is_empty() {
        failures.push(format!(
            "stock = initial + restocks - reserved + released: {} of {} SKUs differ, e.g.\n{}",
            unbalanced.len(),
            initial.len(),
            unbalanced[..unbalanced.len().min(10)].join("\n")
        ));
    }
    if !negative.is_empty() {
        failures.push(format!(
            "stock never negative: {} levels below zero, e.g. {}",
            negative.len(),
            negative[0]
        ));
    }

    // 5. Every charge stands on a reservation and is the authorization the pipeline
    // recorded; no order charged twice; every recorded authorization was charged.
    let mut charges: BTreeMap<(String, String), Vec<_>> = BTreeMap::new();
    for entry in gateway.ledger() {
        if matches!(
            entry.status,
            LedgerStatus::Authorized | LedgerStatus::Refunded
        ) {
            charges
                .entry((entry.store_id.clone(), entry.order_id.clone()))
                .or_default()
                .push(entry);
        }
    }
    let mut bad_charges = Vec::new();
    for (key, entries) in &charges {
        let events = history.get(key).map(Vec::as_slice).unwrap_or_default();
        let has = |t: EventType| events.iter().any(|e| e.event_type() == t);
        if !has(EventType::StockReserved)
            || has(EventType::StockRejected)
            || has(EventType::StockReleased)
        {
            // What the gateway answered and when, next to what the pipeline recorded,
            // tells a charge after a timeout from one after a replay.
            let payments: Vec<String> = events
                .iter()
                .filter_map(|e| match e {
                    Event::PaymentRetrying(r) => Some(format!(
                        "PaymentRetrying attempt {} at {} ({})",
                        r.attempt,
                        common::rfc3339(r.envelope.occurred_at),
                        r.error
                    )),
                    Event::PaymentFailed(f) => Some(format!(
                        "PaymentFailed after {} attempts at {} ({:?}: {})",
                        f.attempts,
                        common::rfc3339(f.envelope.occurred_at),
                        f.reason,
                        f.message
                    )),
                    Event::StockReleased(r) => Some(format!(
                        "StockReleased at {}",
                        common::rfc3339(r.envelope.occurred_at)
                    )),
                    _ => None,
                })
                .collect();
            bad_charges.push((key.clone(), format!(
                "{key:?}: charged without a standing reservation: the gateway authorized {:?} at {} on attempt {} (answered {} times); the pipeline recorded {:?}; payment events: {payments:?}",
                entries[0].authorization_id,
                entries[0].created_at,
                entries[0].first_attempt,
                entries[0].attempts_seen,
                events.iter().map(Event::event_type).collect::<Vec<_>>()
            )));
        }
        if entries.len() != 1 {
            bad_charges.push((
                key.clone(),
                format!("{key:?}: charged {} times", entries.len()),
            ));
        }
        let recorded = authorized.get(key);
        if recorded.map(|(id, amount)| (Some(id), *amount))
            != Some((
                entries[0].authorization_id.as_ref(),
                entries[0].amount_cents,
            ))
        {
            bad_charges.push((key.clone(), format!(
                "{key:?}: the ledger's charge ({:?}, {} cents) is not the PaymentAuthorized recorded ({recorded:?})",
                entries[0].authorization_id, entries[0].amount_cents
            )));
        }
        if (entries[0].status == LedgerStatus::Refunded) != refunded.contains(key) {
            bad_charges.push((
                key.clone(),
                format!(
                    "{key:?}: ledger says {:?}, the events {} a refund",
                    entries[0].status,
                    if refunded.contains(key) {
                        "record"
                    } else {
                        "do not record"
                    }
                ),
            ));
        }
    }
    for key in authorized.keys() {
        if !charges.contains_key(key) {
            bad_charges.push((
                key.clone(),
                format!("{key:?}: PaymentAuthorized recorded but the gateway charged nothing"),
            ));
        }
    }
    // Under exactly_once on the transactional broker, stages read the records of
    // aborted transactions too (it leaks them to read_committed readers): a payment
    // stage may charge for a reservation that was aborted and decided otherwise when
    // the batch was redone. A correct broker never shows a stage such a record, so
    // problems of orders an aborted record was about are reported, not failed.
    let (leaked_charges, bad_charges): (Vec<_>, Vec<_>) = bad_charges
        .into_iter()
        .partition(|(key, _)| exactly_once && seen.leaked.contains(key));
    let bad_charges: Vec<String> = bad_charges.into_iter().map(|(_, m)| m).collect();
    if !leaked_charges.is_empty() {
        eprintln!(
            "[{label}] gateway ledger problems of orders an aborted transaction's record was about (a broker isolation leak, not failed): {}\n{}",
            leaked_charges.len(),
            leaked_charges
                .iter()
                .take(10)
                .map(|(_, m)| m.as_str())
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    eprintln!(
        "[{label}] gateway ledger: {} orders charged, {} PaymentAuthorized recorded, {} problems",
        charges.len(),
        authorized.len(),
        bad_charges.len()
    );
    if !bad_charges.is_empty() {
        failures.push(format!(
            "every charge stands on a reservation and equals the recorded PaymentAuthorized: {} problems, e.g.\n{}",
            bad_charges.len(),
            bad_charges[..bad_charges.len().min(10)].join("\n")
        ));
    }

    // 6. Every failed payment released its stock (checked per order above).
    eprintln!(
        "[{label}] {} failed payments, {} without exactly the reserved stock released",
        exhausted + declined,
        failed_without_release.len()
    );
    if !failed_without_release.is_empty() {
        failures.push(format!(
            "every PaymentFailed has its StockReleased: {} orders do not, e.g.\n{}",
            failed_without_release.len(),
            failed_without_release[..failed_without_release.len().min(10)].join("\n")
        ));
    }

    // 7. Nothing was dead-lettered.
    let dlq = common::read_topic(&env.settings.brokers, &env.topic(topics::DLQ));
    eprintln!("[{label}] {} dead letters", dlq.len());
    if !dlq.is_empty() {
        failures.push(format!(
            "the DLQ topic is empty: it holds {} records, the first: {:?} {:?}",
            dlq.len(),
            dlq[0]
                .headers
                .iter()
                .map(|(k, v)| (k, v.as_deref().map(String::from_utf8_lossy)))
                .collect::<Vec<_>>(),
            dlq[0].value.as_deref().map(String::from_utf8_lossy)
        ));
    }

    // 8. The run did what it claims to.
    eprintln!(
        "[{label}] {kills} workers SIGKILLed, broker restarted {broker_restarts} times (started {} times), carrier restarted {} times, whole test {:.1}s",
        broker.as_ref().map_or(0, |b| b.starts),
        carrier.restarts.len(),
        test_started.elapsed().as_secs_f64()
    );
    let exercised = [
        (
            kills >= 5,
            format!("at least 5 workers SIGKILLed ({kills})"),
        ),
        (
            broker_restarts == usize::from(broker.is_some()),
            format!(
                "the broker restarted {} ({broker_restarts})",
                if broker.is_some() { "once" } else { "never" }
            ),
        ),
        (out_of_stock > 0, "some SKU ran out".to_owned()),
        (declined > 0, "some payment was declined".to_owned()),
        (retried > 0, "some payment was retried".to_owned()),
        (
            ends.get("Delivered").copied().unwrap_or(0) > orders_total / 2,
            "most orders were delivered".to_owned(),
        ),
    ];
    for (ok, what) in exercised {
        if !ok {
            failures.push(format!(
                "the run exercised what it claims: not so that {what}"
            ));
        }
    }

    assert!(
        failures.is_empty(),
        "{} invariants of the chaos run (seed {seed}) failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
    drop(workers);
}
