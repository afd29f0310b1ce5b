//! Throughput, CPU, memory and latency of OrderFlow's stages, from a plain Kafka copy up
//! to the whole pipeline, on one broker and the same orders.
//!
//! Five scenarios, each on topics of its own (a [`TestEnv`] prefix) and run alone (the
//! machine may have two cores), every worker with the shipped batch and fetch settings,
//! `at_least_once` on the nisshi broker except in (e):
//!
//! (a) copy: an rdkafka consume → produce loop in this process that copies every order to
//!     the same partition of another topic — no decoding, no state, no dedup;
//! (b) fraud: `orderflow run --stages fraud`, one process; the outcome is `OrderScreened`;
//! (c) fraud + inventory: `orderflow run --stages fraud` and `--stages inventory`, two
//!     processes; orders flow `order.created` → `order.screened` → `inventory.updated`,
//!     the outcome is `StockReserved` (or `StockRejected`);
//! (d) the pipeline: one `orderflow run` with all five stages, the mock payment gateway
//!     (`orderflow gateway`, no latency, no declines, no errors) and `orderflow load` as
//!     the carrier (scans every order that is ready to ship, none failing); the outcome is
//!     `Delivered` on `delivery.updated` (or `DeliveryFailed`). The warehouse's and the
//!     carrier's simulated delays (`fulfillment.pick_ms`, `fulfillment.pack_ms`,
//!     `--scan-interval-ms`) are zero, so latency is the pipeline's own. `orderflow load`
//!     has no carrier-only mode: it is started with two orders of its own at one order
//!     per million seconds, so it publishes one (to a store the bench never stocks: it
//!     ends `StockRejected` and is no bench order) and then plays the carrier until it
//!     is stopped;
//! (e) fraud + inventory under `exactly_once`, labelled (c′): the processes of (c), run
//!     with `ORDERFLOW_GUARANTEE=exactly_once` against the transactional broker (tansu,
//!     `ORDERFLOW_TEST_TXN_BROKERS`, see `tests/common/txn_broker.rs`), every step of (c)
//!     (stocking included) on that broker. That broker hands read_committed readers the
//!     records of aborted and still-open transactions — the inventory worker and this
//!     bench included — so (e) shows the cost of running transactions, not of waiting for
//!     them: the inventory worker may take an `OrderScreened` before the fraud worker
//!     commits it. Its check counts each order's outcome once by event ID and reports,
//!     rather than fails on, repeated records and second event IDs (leaked records);
//!     an order without its outcome, or with a rejection, still fails the run. After the
//!     run the outcome topic's log is read for its transaction markers
//!     ([`common::txn_log`]): how many outcome records a correct broker would have hidden
//!     (aborted or still open), and, per live order, the latency to the commit marker of
//!     its outcome (the marker's timestamp, as the broker wrote it, minus the order
//!     record's) — when a read_committed reader of a correct broker could first see it.
//!
//! Fraud's limits are raised so no bench order is rejected (velocity and amount, through
//! `ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS` and `ORDERFLOW_FRAUD_MAX_ORDER_TOTAL_CENTS`).
//! For (c) and (d) every (store, SKU) is restocked far beyond what the run sells first:
//! an inventory worker applies the `StockRestocked` commands and is stopped before the
//! orders are loaded, so the scenario's workers start with the stock in their state (as
//! a deployed system does) and no reservation races its restock.
//!
//! Each scenario runs in two phases:
//!
//! 1. backlog: N orders are pre-loaded, then the scenario's processes start. Orders/s is N
//!    over the span from the first output record's timestamp (the first copy, or the
//!    first `OrderScreened`) to the last outcome's; start-up (process start, group join,
//!    restore) is reported separately, from starting the first process to the first
//!    output. CPU per order is each process's utime + stime (`/proc/PID/stat`, sampled
//!    every 10 ms) from the first output to this bench having read the last outcome
//!    back (so the last acknowledgements and commits count), divided by N; for the copy,
//!    the threads the copy loop and its two clients started in this process
//!    (`/proc/self/task/TID/stat`).
//! 2. live: with the processes warm, M more orders are produced at a steady rate; latency
//!    is each order's outcome record timestamp minus the order record's timestamp (both
//!    the producing client's create time, on this machine's clock).
//!
//! Peak RSS is each process's `VmHWM` (`/proc/PID/status`) at the end of both phases.
//! Every order must end with exactly its outcome — one event ID, never a failure — or the
//! run fails (for (e), see above).
//!
//! `bash scripts/bench.sh` runs it (`cargo bench --bench pipeline`). Environment:
//! `ORDERFLOW_BENCH_ORDERS` (N, default 20,000), `ORDERFLOW_BENCH_PIPELINE_ORDERS` (N of
//! (d), default N), `ORDERFLOW_BENCH_RATE` (live orders/s, default 1,000),
//! `ORDERFLOW_BENCH_LIVE_ORDERS` (M, default 10 s at the rate), `ORDERFLOW_BENCH_SCENARIOS`
//! (which to run, default `a,b,c,d,e`); (e) needs `ORDERFLOW_TEST_TXN_BROKERS`, which
//! `scripts/bench.sh` exports. Under `cargo test --all-targets` (no `--bench` argument) it
//! runs once as a smoke test with a few hundred orders, (e) only when
//! `ORDERFLOW_TEST_TXN_BROKERS` is set (`scripts/test.sh` sets it) or
//! `ORDERFLOW_BENCH_SCENARIOS` names it.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::pipeline::{Lifecycle, restock};
use common::txn_broker::TXN_BROKERS_VAR;
use common::txn_log::{self, Fate};
use common::*;
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, EventType, ScreeningDecision};
use orderflow::topics;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

const PARTITIONS: i32 = 6;
const STORES: usize = 20;
/// A [`TestOrder`] has up to three lines, of `SKU-1`, `SKU-2` and `SKU-3`.
const SKUS: usize = 3;
/// Units restocked per (store, SKU): far beyond what any run sells.
const STOCK_UNITS: i32 = 1_000_000_000;
/// The stages of (d), in saga order.
const ALL_STAGES: &[&str] = &["fraud", "inventory", "payment", "fulfillment", "delivery"];
/// A scenario whose outcomes stop coming for this long has failed.
const STALL: Duration = Duration::from_secs(90);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Copy,
    Fraud,
    FraudInventory,
    Pipeline,
    /// (c) under `exactly_once`, on the transactional broker.
    FraudInventoryExactlyOnce,
}

impl Scenario {
    const ALL: [Scenario; 5] = [
        Scenario::Copy,
        Scenario::Fraud,
        Scenario::FraudInventory,
        Scenario::Pipeline,
        Scenario::FraudInventoryExactlyOnce,
    ];

    fn letter(self) -> char {
        match self {
            Scenario::Copy => 'a',
            Scenario::Fraud => 'b',
            Scenario::FraudInventory => 'c',
            Scenario::Pipeline => 'd',
            Scenario::FraudInventoryExactlyOnce => 'e',
        }
    }

    fn label(self) -> &'static str {
        match self {
            Scenario::Copy => "(a) plain copy (rdkafka consume → produce, in the bench)",
            Scenario::Fraud => "(b) fraud (`run --stages fraud`)",
            Scenario::FraudInventory => "(c) fraud + inventory (two `run` processes)",
            Scenario::Pipeline => "(d) all five stages (one `run`) + gateway + carrier",
            Scenario::FraudInventoryExactlyOnce => "(c′) fraud + inventory, exactly_once (tansu)",
        }
    }

    /// Where its orders end.
    fn outcome_topic(self) -> &'static str {
        match self {
            Scenario::Copy | Scenario::Fraud => topics::ORDER_SCREENED,
            Scenario::FraudInventory | Scenario::FraudInventoryExactlyOnce => {
                topics::INVENTORY_UPDATED
            }
            Scenario::Pipeline => topics::DELIVERY_UPDATED,
        }
    }

    /// The outcome every bench order must have, and the outcome that ends an order
    /// otherwise; `None` for the copy, whose outputs are the orders themselves.
    fn outcomes(self) -> Option<(EventType, EventType)> {
        match self {
            Scenario::Copy => None,
            // Approved or rejected: both are an `OrderScreened`, told apart by decision.
            Scenario::Fraud => Some((EventType::OrderScreened, EventType::OrderScreened)),
            Scenario::FraudInventory | Scenario::FraudInventoryExactlyOnce => {
                Some((EventType::StockReserved, EventType::StockRejected))
            }
            Scenario::Pipeline => Some((EventType::Delivered, EventType::DeliveryFailed)),
        }
    }

    fn stocked(self) -> bool {
        matches!(
            self,
            Scenario::FraudInventory | Scenario::Pipeline | Scenario::FraudInventoryExactlyOnce
        )
    }

    /// Its workers run `exactly_once` on the transactional broker.
    fn exactly_once(self) -> bool {
        self == Scenario::FraudInventoryExactlyOnce
    }
}

fn env_usize(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("{var}={v:?}: {e}")),
        Err(_) => default,
    }
}

fn percentile(sorted: &[i64], p: f64) -> i64 {
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx]
}

fn orders(tag: &str, n: usize) -> Vec<TestOrder> {
    let t0 = now_ms();
    (0..n)
        .map(|i| {
            TestOrder::new(
                format!("{tag}{i:06}"),
                format!("store-{:02}", i % STORES),
                format!("c-{tag}{i:06}"),
                t0 + i as i64,
            )
        })
        .collect()
}

/// Fraud settings under which no bench order is rejected: every customer is unique and
/// every total small, and the limits are raised anyway, as the side-by-side driver does.
fn fraud_env() -> Vec<(&'static str, String)> {
    vec![
        ("ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS", "1000000000".into()),
        (
            "ORDERFLOW_FRAUD_MAX_ORDER_TOTAL_CENTS",
            "1000000000000".into(),
        ),
    ]
}

// ---------------------------------------------------------------------------------------
// What /proc says.

/// Clock ticks per second of `/proc/*/stat` times (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok()?.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process or thread, in clock ticks, from its `stat` file.
fn stat_ticks(path: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name, in parentheses, may hold spaces: fields start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// `VmHWM` (peak resident set) of a process, in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The IDs of this process's threads.
fn own_threads() -> HashSet<u32> {
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "n/a".into())
}

// ---------------------------------------------------------------------------------------
// The scenario's processes.

/// The copy loop of (a), on a thread of this process.
struct Copier {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<usize>>,
    /// This process's threads before the copier started: every other one is the copy
    /// loop's or its clients' (the bench creates no client while it runs).
    before: HashSet<u32>,
}

impl Copier {
    fn start(brokers: &str, group: &str, input: &str, output: &str) -> Copier {
        let before = own_threads();
        let stop = Arc::new(AtomicBool::new(false));
        let (brokers, group, input, output, flag) = (
            brokers.to_owned(),
            group.to_owned(),
            input.to_owned(),
            output.to_owned(),
            stop.clone(),
        );
        let thread = std::thread::Builder::new()
            .name("copier".into())
            .spawn(move || copy_loop(&brokers, &group, &input, &output, &flag))
            .expect("spawning the copier thread");
        Copier {
            stop,
            thread: Some(thread),
            before,
        }
    }

    fn ticks(&self) -> Option<u64> {
        let threads = own_threads();
        Some(
            threads
                .difference(&self.before)
                .filter_map(|tid| stat_ticks(&format!("/proc/self/task/{tid}/stat")))
                .sum(),
        )
    }

    fn stop(&mut self) -> usize {
        let Some(thread) = self.thread.take() else {
            return 0;
        };
        let threads = own_threads().difference(&self.before).count();
        self.stop.store(true, Ordering::SeqCst);
        let copied = thread.join().expect("the copier thread");
        eprintln!("copier: {copied} records copied, {threads} threads measured");
        copied
    }
}

impl Drop for Copier {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One measured party of a scenario: a process, or the copier's threads.
enum Party {
    Process { label: &'static str, worker: Worker },
    Copier(Copier),
}

impl Party {
    fn label(&self) -> &'static str {
        match self {
            Party::Process { label, .. } => label,
            Party::Copier(_) => "copier threads",
        }
    }

    fn ticks(&self) -> Option<u64> {
        match self {
            Party::Process { worker, .. } => stat_ticks(&format!("/proc/{}/stat", worker.pid())),
            Party::Copier(c) => c.ticks(),
        }
    }

    fn peak_rss_kib(&self) -> Option<u64> {
        match self {
            Party::Process { worker, .. } => vm_hwm_kib(worker.pid()),
            // Shared with the bench's own readers: not the copier's to claim.
            Party::Copier(_) => None,
        }
    }
}

/// The scenario's parties, in start order; stopped in reverse order.
struct Running {
    parties: Vec<Party>,
}

impl Running {
    fn workers(&self) -> Vec<&Worker> {
        self.parties
            .iter()
            .filter_map(|p| match p {
                Party::Process { worker, .. } => Some(worker),
                Party::Copier(_) => None,
            })
            .collect()
    }

    fn ticks(&self) -> Vec<Option<u64>> {
        self.parties.iter().map(Party::ticks).collect()
    }

    /// Stops every party by its PID (SIGTERM, then SIGKILL after 30 s), the last started
    /// first: the workers before the gateway and the carrier they use.
    fn stop(mut self) {
        while let Some(p) = self.parties.pop() {
            match p {
                Party::Process { mut worker, .. } => {
                    worker.terminate(Duration::from_secs(30));
                }
                Party::Copier(mut c) => {
                    c.stop();
                }
            }
        }
    }
}

/// The mock payment gateway's address, from its log line.
fn gateway_address(gateway: &Worker) -> String {
    wait_for("the gateway's address", deadline(60), &[gateway], |_| {
        let log = std::fs::read_to_string(&gateway.log_path).unwrap_or_default();
        let addr = log
            .split_once("mock payment gateway on http://")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .map(str::to_owned);
        if addr.is_none() {
            std::thread::sleep(Duration::from_millis(20));
        }
        addr
    })
}

fn start(scenario: Scenario, env: &TestEnv) -> Running {
    let process = |label, worker| Party::Process { label, worker };
    let parties = match scenario {
        Scenario::Copy => vec![Party::Copier(Copier::start(
            &env.settings.brokers,
            &format!("{}.copy", env.settings.group_prefix),
            &env.topic(topics::ORDER_CREATED),
            &env.topic(topics::ORDER_SCREENED),
        ))],
        Scenario::Fraud => vec![process("fraud", env.spawn_worker(&["fraud"], &fraud_env()))],
        Scenario::FraudInventory | Scenario::FraudInventoryExactlyOnce => vec![
            process("fraud", env.spawn_worker(&["fraud"], &fraud_env())),
            process("inventory", env.spawn_worker(&["inventory"], &[])),
        ],
        Scenario::Pipeline => {
            let gateway = env.spawn_orderflow(
                "gateway",
                &[
                    "gateway",
                    "--addr",
                    "127.0.0.1:0",
                    "--latency-ms",
                    "0",
                    "--jitter-ms",
                    "0",
                    "--decline-rate",
                    "0",
                    "--transient-error-rate",
                    "0",
                ],
                &[],
            );
            let addr = gateway_address(&gateway);
            // Two orders of its own, the second due in a million seconds: it publishes one
            // and plays the carrier until stopped (see the module's documentation).
            let carrier = env.spawn_orderflow(
                "carrier",
                &[
                    "load",
                    "--orders",
                    "2",
                    "--rate",
                    "0.000001",
                    "--stores",
                    "1",
                    "--skus",
                    "1",
                    "--no-stock",
                    "--fraud-customers",
                    "0",
                    "--huge-orders",
                    "0",
                    "--delivery-failure-rate",
                    "0",
                    "--scan-interval-ms",
                    "0",
                    "--timeout",
                    "0",
                    "--run-id",
                    "bench-carrier",
                    "--quiet",
                ],
                &[],
            );
            let mut worker_env = fraud_env();
            worker_env.extend([
                ("ORDERFLOW_PAYMENT_GATEWAY_URL", format!("http://{addr}")),
                ("ORDERFLOW_FULFILLMENT_PICK_MS", "0".into()),
                ("ORDERFLOW_FULFILLMENT_PACK_MS", "0".into()),
            ]);
            let worker = env.spawn_worker(ALL_STAGES, &worker_env);
            vec![
                process("gateway", gateway),
                process("carrier", carrier),
                process("worker", worker),
            ]
        }
    };
    Running { parties }
}

/// Restocks every (store, SKU) of the bench's orders through an inventory worker of its
/// own, stopped once it has applied them all: the scenario's workers restore the stock.
fn stock(env: &TestEnv, producer: &TestProducer) {
    let commands: Vec<Outgoing> = (0..STORES)
        .flat_map(|s| {
            (1..=SKUS).map(move |k| {
                restock(
                    &format!("store-{s:02}"),
                    &format!("SKU-{k}"),
                    STOCK_UNITS,
                    "bench",
                )
            })
        })
        .collect();
    producer.send_all(&env.topic(topics::INVENTORY_COMMANDS), &commands);
    let mut inventory = env.spawn_worker(&["inventory"], &[]);
    let mut updates = env.collector(topics::INVENTORY_UPDATED);
    let codec = Codec::new();
    let mut levels = BTreeSet::new();
    wait_for(
        &format!("{} restocks applied", commands.len()),
        deadline(120),
        &[&inventory],
        |progress| {
            updates.poll(Duration::from_millis(50));
            for r in updates.records.drain(..) {
                let header = r.header_str("event-type");
                let hints = DecodeHints {
                    header_type: header.as_deref(),
                    topic_default: topics::default_event_type(topics::INVENTORY_UPDATED),
                    ..DecodeHints::default()
                };
                if let Ok(Event::StockLevelChanged(c)) =
                    codec.decode(r.value.as_deref().unwrap_or_default(), hints)
                {
                    levels.insert(c.envelope.event_id);
                }
            }
            *progress = format!("{} stock levels changed", levels.len());
            (levels.len() >= commands.len()).then_some(())
        },
    );
    assert!(
        inventory.terminate(Duration::from_secs(30)),
        "the stocking inventory worker did not stop on SIGTERM"
    );
}

// ---------------------------------------------------------------------------------------
// Following the outputs.

/// How one order ended, as read.
struct Ended {
    /// The earliest outcome record's timestamp.
    ts: i64,
    /// Distinct event IDs of its outcome (empty for copies, which have none).
    ids: BTreeSet<String>,
    /// Outcome records read, repeats included.
    records: usize,
    /// The outcome is a failure (a rejection, a failed delivery).
    failed: bool,
    /// Where its outcome records are: (partition, offset).
    at: Vec<(i32, i64)>,
}

/// Follows a scenario's first-output and outcome topics.
struct Outputs {
    scenario: Scenario,
    codec: Codec,
    /// `order.screened` when it is not the outcome topic: only its earliest timestamp
    /// counts (the first output).
    first: Option<Collector>,
    outcome: Collector,
    /// The earliest first-output timestamp read.
    first_ts: Option<i64>,
    /// When this reader first saw an output.
    first_seen: Option<Instant>,
    by_order: HashMap<String, Ended>,
    /// Orders that got their first outcome since [`wait_for_outcomes`] last looked.
    fresh: Vec<String>,
}

impl Outputs {
    fn new(scenario: Scenario, env: &TestEnv) -> Self {
        let first = (scenario.outcome_topic() != topics::ORDER_SCREENED)
            .then(|| env.collector(topics::ORDER_SCREENED));
        Outputs {
            scenario,
            codec: Codec::new(),
            first,
            outcome: env.collector(scenario.outcome_topic()),
            first_ts: None,
            first_seen: None,
            by_order: HashMap::new(),
            fresh: Vec::new(),
        }
    }

    /// Polls for about 10 ms, and files what arrived (the records are not kept).
    fn poll(&mut self) {
        if let Some(first) = &mut self.first {
            first.poll(Duration::from_millis(5));
            for r in first.records.drain(..) {
                self.first_seen.get_or_insert_with(Instant::now);
                if let Some(ts) = r.timestamp {
                    self.first_ts = Some(self.first_ts.map_or(ts, |t| t.min(ts)));
                }
            }
        }
        let wait = if self.first.is_some() { 5 } else { 10 };
        self.outcome.poll(Duration::from_millis(wait));
        let records = std::mem::take(&mut self.outcome.records);
        for r in &records {
            self.ingest(r);
        }
    }

    fn ingest(&mut self, r: &Rec) {
        let value = r.value.as_deref().expect("output value");
        let ts = r.timestamp.expect("output timestamp");
        if self.first.is_none() {
            self.first_seen.get_or_insert_with(Instant::now);
            self.first_ts = Some(self.first_ts.map_or(ts, |t| t.min(ts)));
        }
        let (order_id, event_id, failed) = match self.scenario.outcomes() {
            None => {
                let v: serde_json::Value = serde_json::from_slice(value).expect("copied JSON");
                let order_id = v["order_id"].as_str().expect("order_id").to_owned();
                (order_id, None, false)
            }
            Some((ok, failure)) => {
                let header = r.header_str("event-type");
                let named = header.as_deref().and_then(EventType::from_name);
                // Skip the topic's other events (stock levels, shipping scans) undecoded.
                if named.is_some_and(|t| t != ok && t != failure) {
                    return;
                }
                let hints = DecodeHints {
                    header_type: header.as_deref(),
                    topic_default: topics::default_event_type(self.scenario.outcome_topic()),
                    ..DecodeHints::default()
                };
                let event = self.codec.decode(value, hints).unwrap_or_else(|e| {
                    panic!(
                        "{} record at {}/{} does not decode: {e}",
                        self.scenario.outcome_topic(),
                        r.partition,
                        r.offset
                    )
                });
                let failed = match (&event, event.event_type()) {
                    (Event::OrderScreened(s), _) => s.decision == ScreeningDecision::Rejected,
                    (_, t) if t == ok => false,
                    (_, t) if t == failure => true,
                    _ => return,
                };
                let env = event.envelope();
                let Some(order_id) = env.order_id.clone() else {
                    return;
                };
                (order_id, Some(env.event_id.clone()), failed)
            }
        };
        let ended = self.by_order.entry(order_id).or_insert_with_key(|id| {
            self.fresh.push(id.clone());
            Ended {
                ts,
                ids: BTreeSet::new(),
                records: 0,
                failed,
                at: Vec::new(),
            }
        });
        ended.ts = ended.ts.min(ts);
        ended.records += 1;
        ended.at.push((r.partition, r.offset));
        ended.failed |= failed;
        ended.ids.extend(event_id);
    }
}

/// Samples of every party's CPU ticks, with when they were taken (ms since the epoch).
#[derive(Default)]
struct CpuSamples(Vec<(i64, Vec<Option<u64>>)>);

impl CpuSamples {
    fn take(&mut self, running: &Running) {
        self.0.push((now_ms(), running.ticks()));
    }

    /// Per party, the ticks from the last sample at or before `from` (the first sample
    /// when none is) to the last sample.
    fn since(&self, from: i64) -> Vec<Option<u64>> {
        let start = self
            .0
            .iter()
            .rev()
            .find(|(t, _)| *t <= from)
            .or(self.0.first())
            .expect("CPU samples");
        let end = self.0.last().expect("CPU samples");
        start
            .1
            .iter()
            .zip(&end.1)
            .map(|(a, b)| Some(b.as_ref()?.saturating_sub(*a.as_ref()?)))
            .collect()
    }
}

/// Waits until every order of `orders` has an outcome, sampling CPU as it goes (the last
/// sample is taken right after the last outcome is read), and returns when the last was
/// read; panics (with where the missing orders are, for the stages) if outcomes stop
/// coming for [`STALL`] or a process exits.
fn wait_for_outcomes(
    what: &str,
    env: &TestEnv,
    out: &mut Outputs,
    orders: &[TestOrder],
    running: &Running,
    cpu: &mut CpuSamples,
) -> Instant {
    let mut pending: HashSet<&str> = orders
        .iter()
        .map(|o| o.order_id.as_str())
        .filter(|id| !out.by_order.contains_key(*id))
        .collect();
    out.fresh.clear();
    let mut last = (0, Instant::now());
    wait_for(
        what,
        deadline(300 + orders.len() as u64 / 20),
        &running.workers(),
        |progress| {
            out.poll();
            cpu.take(running);
            for id in out.fresh.drain(..) {
                pending.remove(id.as_str());
            }
            let done = orders.len() - pending.len();
            *progress = format!("{done} of {}", orders.len());
            if pending.is_empty() {
                return Some(Instant::now());
            }
            if done > last.0 {
                last = (done, Instant::now());
            } else if last.1.elapsed() > STALL {
                panic!(
                    "{what}: no outcome for {} s at {done} of {}; {}",
                    STALL.as_secs(),
                    orders.len(),
                    stuck(out.scenario, env, orders, out)
                );
            }
            None
        },
    )
}

/// Where up to ten orders without an outcome are, from every lifecycle topic.
fn stuck(scenario: Scenario, env: &TestEnv, orders: &[TestOrder], out: &Outputs) -> String {
    if scenario == Scenario::Copy {
        return "(the copy has no lifecycle)".into();
    }
    let mut lifecycle = Lifecycle::new(env);
    lifecycle.drain();
    let missing: Vec<(String, String)> = orders
        .iter()
        .filter(|o| !out.by_order.contains_key(&o.order_id))
        .map(|o| (o.store_id.clone(), o.order_id.clone()))
        .collect();
    format!(
        "events of orders without an outcome:\n{}",
        lifecycle.stuck(&missing, 10)
    )
}

/// One scenario's figures.
struct Measured {
    scenario: Scenario,
    orders: usize,
    load_before: String,
    /// Backlog orders per second, first output to last outcome (record timestamps).
    backlog_rate: f64,
    /// Backlog orders per second as this bench reads them back: from seeing the first
    /// output to having read every outcome (about 10 ms resolution).
    backlog_read_rate: f64,
    /// From starting the first process to this bench seeing the first output.
    startup: Duration,
    /// Per party: label, CPU µs per backlog order, peak RSS in MiB.
    parties: Vec<(&'static str, Option<f64>, Option<f64>)>,
    /// CPU µs per order of one clock tick: what a party that used less shows as 0.
    cpu_resolution_us: f64,
    /// Live orders per second actually produced.
    live_rate: f64,
    p50_ms: i64,
    p99_ms: i64,
    max_ms: i64,
    /// Outcome records beyond one per order (at-least-once redelivery; for (e), records
    /// the transactional broker leaks too).
    extra_records: usize,
    /// Orders with more than one outcome event ID ((e) only: the run fails otherwise).
    several_ids: usize,
    /// What the outcome topic's transaction markers say ((e) only).
    txn: Option<TxnFigures>,
}

/// The outcome topic as a correct transactional broker would show it, from the log's
/// transaction markers ([`txn_log`]).
struct TxnFigures {
    /// Commit and abort markers on the outcome topic.
    commits: usize,
    aborts: usize,
    /// Outcome records read that a correct broker hides: of aborted transactions, and of
    /// transactions still open when the log was read (after the workers stopped).
    aborted: usize,
    open: usize,
    /// Live orders without a committed outcome record.
    uncommitted: usize,
    /// Live latency to the commit marker of the order's first committed outcome (marker
    /// timestamp - order record timestamp), p50 and p99; `None` when no marker carries a
    /// timestamp.
    committed_ms: Option<(i64, i64)>,
    /// Committed outcome records whose marker is stamped earlier than the record.
    marker_before_record: usize,
}

fn run(
    scenario: Scenario,
    backlog: &[TestOrder],
    live: &[TestOrder],
    rate: f64,
    ticks_per_second: f64,
) -> Measured {
    let load_before = load_average();
    println!("{}: load average before: {load_before}", scenario.label());
    let name = format!("bench-{}", scenario.letter());
    let mut env = if scenario.exactly_once() {
        TestEnv::exactly_once(&name, PARTITIONS)
    } else {
        TestEnv::new(&name, PARTITIONS)
    };
    for base in topics::PIPELINE {
        wait_for_partitions_on(&env.settings.brokers, &env.topic(base), PARTITIONS);
    }
    // Measure the shipped batching, not the tests' quick one.
    env.settings.batch_interval_ms = orderflow::config::Settings::default().batch_interval_ms;
    let producer = env.producer();
    if scenario.stocked() {
        let started = Instant::now();
        stock(&env, &producer);
        eprintln!("{name}: stocked in {:.1}s", started.elapsed().as_secs_f64());
    }
    let input = env.topic(topics::ORDER_CREATED);
    let started = Instant::now();
    let backlog_out: Vec<Outgoing> = backlog.iter().map(TestOrder::outgoing).collect();
    producer.send_all(&input, &backlog_out);
    eprintln!(
        "{name}: pre-loaded {} orders in {:.2}s",
        backlog.len(),
        started.elapsed().as_secs_f64()
    );

    // Every client of this process exists before the scenario starts (see `Copier`).
    let mut out = Outputs::new(scenario, &env);
    let mut cpu = CpuSamples::default();
    let started = Instant::now();
    let running = start(scenario, &env);
    let startup = wait_for(
        &format!("{name}: first output"),
        deadline(180),
        &running.workers(),
        |_| {
            out.poll();
            cpu.take(&running);
            out.first_seen.map(|seen| seen - started)
        },
    );
    let drained = wait_for_outcomes(
        &format!("{name}: {} backlog orders", backlog.len()),
        &env,
        &mut out,
        backlog,
        &running,
        &mut cpu,
    );
    let window_ticks = cpu.since(out.first_ts.expect("a first output"));
    let first_seen = out.first_seen.expect("a first output");
    let backlog_read_rate = backlog.len() as f64 / (drained - first_seen).as_secs_f64().max(0.001);
    let first_ts = out.first_ts.expect("a first output");
    let last_ts = backlog
        .iter()
        .map(|o| out.by_order[&o.order_id].ts)
        .max()
        .expect("outcomes");
    let span_ms = (last_ts - first_ts).max(1);
    let backlog_rate = backlog.len() as f64 * 1000.0 / span_ms as f64;

    let live_out: Vec<Outgoing> = live.iter().map(TestOrder::outgoing).collect();
    let live_started = Instant::now();
    let landed = producer.send_paced(&input, &live_out, Some(rate));
    let live_rate = live.len() as f64 / live_started.elapsed().as_secs_f64();
    wait_for_outcomes(
        &format!("{name}: {} live orders", live.len()),
        &env,
        &mut out,
        live,
        &running,
        &mut cpu,
    );
    let mut lat: Vec<i64> = live
        .iter()
        .zip(&landed)
        .map(|(o, l)| out.by_order[&o.order_id].ts - l.timestamp.expect("input timestamp"))
        .collect();
    lat.sort_unstable();

    let parties = running
        .parties
        .iter()
        .zip(&window_ticks)
        .map(|(p, ticks)| {
            let us = ticks.map(|t| t as f64 * 1e6 / ticks_per_second / backlog.len() as f64);
            let rss = p.peak_rss_kib().map(|k| k as f64 / 1024.0);
            (p.label(), us, rss)
        })
        .collect();
    running.stop();
    // Read what came after the last outcome too, so repeats are counted.
    for _ in 0..10 {
        out.poll();
    }
    let txn = scenario.exactly_once().then(|| {
        let landed_ts: Vec<i64> = landed
            .iter()
            .map(|l| l.timestamp.expect("input timestamp"))
            .collect();
        txn_figures(&env, scenario, &out, live, &landed_ts)
    });
    let Checked {
        extra_records,
        several_ids,
    } = assert_exact(scenario, &out, backlog, live);
    Measured {
        scenario,
        orders: backlog.len(),
        load_before,
        backlog_rate,
        backlog_read_rate,
        startup,
        parties,
        cpu_resolution_us: 1e6 / ticks_per_second / backlog.len() as f64,
        live_rate,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: *lat.last().expect("latencies"),
        extra_records,
        several_ids,
        txn,
    }
}

/// Reads the outcome topic's log for its transaction markers (the workers have stopped)
/// and tells the records read from it apart as a correct broker would.
fn txn_figures(
    env: &TestEnv,
    scenario: Scenario,
    out: &Outputs,
    live: &[TestOrder],
    live_ts: &[i64],
) -> TxnFigures {
    let topic = env.topic(scenario.outcome_topic());
    let log = txn_log::scan(&env.settings.brokers, &topic, PARTITIONS);
    let (mut aborted, mut open) = (0, 0);
    for ended in out.by_order.values() {
        for &(p, o) in &ended.at {
            match log.fate(p, o) {
                Some(Fate::Aborted) => aborted += 1,
                Some(Fate::Open) => open += 1,
                Some(Fate::Committed | Fate::Plain) => {}
                None => panic!("{topic}[{p}] offset {o} was read but is not in the log"),
            }
        }
    }
    let (mut uncommitted, mut marker_before_record, mut stamped) = (0, 0, true);
    let mut lat = Vec::with_capacity(live.len());
    for (o, order_ts) in live.iter().zip(live_ts) {
        let ended = &out.by_order[&o.order_id];
        let committed = ended
            .at
            .iter()
            .filter(|(p, o)| log.fate(*p, *o) == Some(Fate::Committed))
            .filter_map(|at| log.commit_ts.get(at).copied())
            .min();
        match committed {
            None => uncommitted += 1,
            Some(ts) if ts <= 0 => stamped = false,
            Some(ts) => {
                if ts < ended.ts {
                    marker_before_record += 1;
                }
                lat.push(ts - order_ts);
            }
        }
    }
    lat.sort_unstable();
    TxnFigures {
        commits: log.commits,
        aborts: log.aborts,
        aborted,
        open,
        uncommitted,
        committed_ms: (stamped && !lat.is_empty())
            .then(|| (percentile(&lat, 0.50), percentile(&lat, 0.99))),
        marker_before_record,
    }
}

/// What [`assert_exact`] counted without failing.
struct Checked {
    /// Outcome records beyond one per order.
    extra_records: usize,
    /// Orders with more than one outcome event ID (only (e) gets this far with any).
    several_ids: usize,
}

/// Every order ended with exactly its outcome: the expected one, under one event ID,
/// never a failure. Under `exactly_once` on the transactional broker, which leaks the
/// records of aborted transactions, an order's outcome counts once however many records
/// and event IDs it has: those are counted, not failed on; a missing outcome or a failure
/// still fails.
fn assert_exact(
    scenario: Scenario,
    out: &Outputs,
    backlog: &[TestOrder],
    live: &[TestOrder],
) -> Checked {
    let mut extra = 0;
    let (mut failed, mut several, mut missing) = (Vec::new(), Vec::new(), Vec::new());
    for o in backlog.iter().chain(live) {
        let Some(e) = out.by_order.get(&o.order_id) else {
            missing.push(o.order_id.clone());
            continue;
        };
        if e.failed {
            failed.push(o.order_id.clone());
        }
        if scenario != Scenario::Copy && e.ids.len() != 1 {
            several.push((o.order_id.clone(), e.ids.len()));
        }
        extra += e.records - 1;
    }
    let name = scenario.label();
    assert!(
        missing.is_empty(),
        "{name}: orders without an outcome: {missing:?}"
    );
    assert!(
        failed.is_empty(),
        "{name}: {} orders failed, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(10)]
    );
    if scenario.exactly_once() {
        if !several.is_empty() {
            eprintln!(
                "{name}: {} orders have more than one outcome event ID (counted once), e.g. {:?}",
                several.len(),
                &several[..several.len().min(10)]
            );
        }
    } else {
        assert!(
            several.is_empty(),
            "{name}: {} orders have more than one outcome event ID, e.g. {:?}",
            several.len(),
            &several[..several.len().min(10)]
        );
    }
    Checked {
        extra_records: extra,
        several_ids: several.len(),
    }
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let n = env_usize(
        "ORDERFLOW_BENCH_ORDERS",
        if bench_mode { 20_000 } else { 200 },
    );
    let n_pipeline = env_usize("ORDERFLOW_BENCH_PIPELINE_ORDERS", n);
    let rate = env_usize("ORDERFLOW_BENCH_RATE", if bench_mode { 1_000 } else { 200 });
    let live_n = env_usize(
        "ORDERFLOW_BENCH_LIVE_ORDERS",
        if bench_mode { rate * 10 } else { 100 },
    );
    // The smoke run under `cargo test` takes (e) only where the transactional broker is
    // running (`scripts/test.sh` starts it); the benchmark always does, and fails without
    // one.
    let txn_broker_set = std::env::var(TXN_BROKERS_VAR).is_ok_and(|v| !v.trim().is_empty());
    let default_scenarios = if bench_mode || txn_broker_set {
        "a,b,c,d,e"
    } else {
        "a,b,c,d"
    };
    let wanted =
        std::env::var("ORDERFLOW_BENCH_SCENARIOS").unwrap_or_else(|_| default_scenarios.into());
    let scenarios: Vec<Scenario> = Scenario::ALL
        .into_iter()
        .filter(|s| {
            wanted
                .split(',')
                .any(|w| w.trim() == s.letter().to_string())
        })
        .collect();
    assert!(
        n > 0 && n_pipeline > 0 && live_n > 0 && rate > 0,
        "need backlog orders, live orders and a rate"
    );
    assert!(
        !scenarios.is_empty(),
        "ORDERFLOW_BENCH_SCENARIOS={wanted:?} names none of a, b, c, d, e"
    );
    let rate = rate as f64;
    let ticks_per_second = clock_ticks_per_second();
    eprintln!(
        "bench: {n} backlog orders ({n_pipeline} for the pipeline), {live_n} live orders at {rate}/s, {PARTITIONS} partitions, broker {}{}",
        broker(),
        if scenarios.iter().any(|s| s.exactly_once()) {
            format!(
                ", transactional broker {}",
                common::txn_broker::txn_broker()
            )
        } else {
            String::new()
        }
    );
    let live = orders("l", live_n);
    let results: Vec<Measured> = scenarios
        .iter()
        .map(|&s| {
            let backlog = orders(
                "b",
                if s == Scenario::Pipeline {
                    n_pipeline
                } else {
                    n
                },
            );
            run(s, &backlog, &live, rate, ticks_per_second)
        })
        .collect();
    report(&results, live_n, rate);
    if !bench_mode {
        println!("(smoke run under `cargo test`: too few orders for meaningful figures)");
    }
}

fn report(results: &[Measured], live_n: usize, rate: f64) {
    let s = orderflow::config::Settings::default();
    println!();
    println!(
        "orders through OrderFlow: pre-loaded JSON orders (backlog), then {live_n} at {rate:.0}/s (live); {PARTITIONS} partitions, {STORES} stores, shipped batching (batch_max_records {}, batch_interval_ms {}) and librdkafka fetch settings; at_least_once on one nisshi broker, except (c′): exactly_once on one tansu broker",
        s.batch_max_records, s.batch_interval_ms
    );
    println!();
    println!(
        "| scenario | backlog orders/s | CPU µs/order per process | peak RSS MB per process | live p50 / p99 ms | startup s |"
    );
    println!("|---|---:|---|---|---:|---:|");
    for m in results {
        let mut cpu: Vec<String> = m
            .parties
            .iter()
            .map(|(label, us, _)| match us {
                // Less than one clock tick over the whole window.
                Some(us) if *us == 0.0 => format!("{label} < {:.1}", m.cpu_resolution_us),
                Some(us) if *us < 10.0 => format!("{label} {us:.1}"),
                Some(us) => format!("{label} {us:.0}"),
                None => format!("{label} n/a"),
            })
            .collect();
        if m.parties.len() > 1 {
            let total: f64 = m.parties.iter().filter_map(|(_, us, _)| *us).sum();
            cpu.push(format!("total {total:.0}"));
        }
        let rss: Vec<String> = m
            .parties
            .iter()
            .map(|(label, _, rss)| match rss {
                Some(mb) => format!("{label} {mb:.0}"),
                None => format!("{label} n/a (bench process)"),
            })
            .collect();
        println!(
            "| {} | {:.0} | {} | {} | {} / {} | {:.1} |",
            m.scenario.label(),
            m.backlog_rate,
            cpu.join(", "),
            rss.join(", "),
            m.p50_ms,
            m.p99_ms,
            m.startup.as_secs_f64()
        );
    }
    println!();
    for m in results {
        println!(
            "- ({}) {} backlog orders, {:.0} orders/s as read back; load average before: {}; live: {:.0} orders/s produced, max latency {} ms; outcome records beyond one per order: {}",
            m.scenario.letter(),
            m.orders,
            m.backlog_read_rate,
            m.load_before,
            m.live_rate,
            m.max_ms,
            m.extra_records
        );
        if let Some(t) = &m.txn {
            let committed = match t.committed_ms {
                Some((p50, p99)) => format!("{p50} / {p99} ms"),
                None => "n/a (markers carry no timestamp)".into(),
            };
            println!(
                "  - ({}) live p50 / p99 to the outcome's commit marker: {committed}; orders with more than one outcome event ID: {}; outcome records a correct broker hides: {} aborted, {} still open ({} commit and {} abort markers on {}); live orders without a committed outcome: {}{}",
                m.scenario.letter(),
                m.several_ids,
                t.aborted,
                t.open,
                t.commits,
                t.aborts,
                m.scenario.outcome_topic(),
                t.uncommitted,
                if t.marker_before_record > 0 {
                    format!(
                        "; commit markers stamped before their outcome record: {}",
                        t.marker_before_record
                    )
                } else {
                    String::new()
                }
            );
        }
    }
    println!();
    println!(
        "backlog orders/s: N pre-loaded orders over first output to last outcome (record timestamps; the first output is the first copy or OrderScreened; outcomes: the copy, OrderScreened, StockReserved, Delivered). CPU: utime + stime from the first output to having read the last outcome back, / N (for the copy: the threads its loop and clients started in the bench process). Peak RSS: VmHWM after both phases. Latency (live only): outcome record timestamp - order record timestamp. Startup: first process started to first output seen. (c′): the transactional broker hands read_committed readers records of open and aborted transactions (the inventory worker and this bench included), so its figures leave out waiting for commits; the commit-marker latency puts back the outcome's own."
    );
}

fn client(brokers: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", brokers);
    c
}

/// Copies every record of `input` to the same partition of `output` until `stop`;
/// returns how many it copied.
fn copy_loop(brokers: &str, group: &str, input: &str, output: &str, stop: &AtomicBool) -> usize {
    let consumer: BaseConsumer = client(brokers)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "true")
        // The same fetch wait as a worker's consumer.
        .set(
            "fetch.wait.max.ms",
            orderflow::runtime::kafka::FETCH_WAIT_MS,
        )
        .create()
        .expect("copy consumer");
    consumer.subscribe(&[input]).expect("subscribe");
    // The same delivery settings as the worker's producer.
    let producer: ThreadedProducer<DefaultProducerContext> = client(brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "5")
        .create()
        .expect("copy producer");
    let mut copied = 0;
    while !stop.load(Ordering::Relaxed) {
        let m = match consumer.poll(Duration::from_millis(50)) {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                eprintln!("copy consumer: {e}");
                continue;
            }
            None => continue,
        };
        let mut record = BaseRecord::<[u8], [u8]>::to(output).partition(m.partition());
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(v) = m.payload() {
            record = record.payload(v);
        }
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("copy produce: {e}"),
            }
        }
        copied += 1;
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("flush copies");
    copied
}
