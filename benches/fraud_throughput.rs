//! Throughput and latency of the fraud stage against a plain Kafka copy, on the same
//! broker and the same orders.
//!
//! (A) `orderflow run --stages fraud` (one worker process, `at_least_once`, the shipped
//!     batch settings): decode, dedup, velocity state, changelog, Avro output, commits —
//!     the real runtime.
//! (B) an rdkafka consume → produce loop in this process that copies the same records to
//!     the same partition of another topic: no decoding, no state, no dedup.
//!
//! Each path gets its own topics and runs alone (2 cores), in two phases:
//!
//! 1. backlog: N orders are pre-loaded, then the path starts; records/s is measured from
//!    its first output record's timestamp to its last, so start-up (process start, group
//!    join, restore) is reported separately, not averaged in;
//! 2. live: with the path warm, M more orders are produced at a steady rate below either
//!    path's capacity; latency is each output record's timestamp minus its input record's
//!    timestamp (both the producing client's create time, on this machine's clock).
//!
//! `bash scripts/bench.sh` runs it (`cargo bench --bench fraud_throughput`). Environment:
//! `ORDERFLOW_BENCH_ORDERS` (N, default 20,000), `ORDERFLOW_BENCH_LIVE_ORDERS` (M, default
//! min(N, 10,000)), `ORDERFLOW_BENCH_RATE` (live orders/s, default 2,000). Under
//! `cargo test --all-targets` (no `--bench` argument) it runs once as a smoke test with a
//! few hundred orders.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::*;
use orderflow::events::Event;
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::topics::{ORDER_CREATED, ORDER_SCREENED};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};

const PARTITIONS: i32 = 6;
const STORES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Fraud,
    Copy,
}

impl Path {
    fn label(self) -> &'static str {
        match self {
            Path::Fraud => "A: fraud stage (`orderflow run`, at_least_once)",
            Path::Copy => "B: plain copy (rdkafka consume -> produce)",
        }
    }
}

/// One path's measurement.
struct Measured {
    path: Path,
    /// Backlog records per second, first to last output timestamp (the producing
    /// client's create time: when the path handed the record over).
    backlog_rate: f64,
    /// Backlog records per second as this bench reads them back from the broker, i.e.
    /// once written; first to last arrival.
    backlog_read_rate: f64,
    /// From starting the path to seeing its first output.
    startup: Duration,
    /// Live orders per second actually produced.
    live_rate: f64,
    p50_ms: i64,
    p99_ms: i64,
    max_ms: i64,
    /// Output records beyond one per order (at-least-once redelivery).
    extra_records: usize,
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

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let n = env_usize(
        "ORDERFLOW_BENCH_ORDERS",
        if bench_mode { 20_000 } else { 300 },
    );
    let live_n = env_usize(
        "ORDERFLOW_BENCH_LIVE_ORDERS",
        if bench_mode { n.min(10_000) } else { 200 },
    );
    let rate = env_usize("ORDERFLOW_BENCH_RATE", if bench_mode { 2_000 } else { 500 }) as f64;
    assert!(
        n > 1 && live_n > 0 && rate > 0.0,
        "need at least two backlog orders, one live order and a rate"
    );
    eprintln!(
        "bench: {n} backlog orders, {live_n} live orders at {rate}/s, {PARTITIONS} partitions, broker {}",
        broker()
    );
    let backlog = orders("b", n);
    let live = orders("l", live_n);

    let a = run(Path::Fraud, &backlog, &live, rate);
    let b = run(Path::Copy, &backlog, &live, rate);

    println!();
    println!(
        "fraud stage vs plain copy: {n} pre-loaded JSON orders, then {live_n} at {rate:.0}/s; {PARTITIONS} partitions, {STORES} stores, one process each"
    );
    println!();
    println!(
        "| path | backlog records/s (output timestamps) | backlog records/s (read back) | start-up to first output (s) | live orders/s | p50 latency (ms) | p99 latency (ms) | max latency (ms) | extra records |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|");
    for m in [&a, &b] {
        println!(
            "| {} | {:.0} | {:.0} | {:.2} | {:.0} | {} | {} | {} | {} |",
            m.path.label(),
            m.backlog_rate,
            m.backlog_read_rate,
            m.startup.as_secs_f64(),
            m.live_rate,
            m.p50_ms,
            m.p99_ms,
            m.max_ms,
            m.extra_records
        );
    }
    let ratio = |x: f64, y: f64| {
        if y > 0.0 {
            format!("{:.2}", x / y)
        } else {
            "n/a".into()
        }
    };
    println!(
        "| ratio A/B | {} | {} | {} | | {} | {} | {} | |",
        ratio(a.backlog_rate, b.backlog_rate),
        ratio(a.backlog_read_rate, b.backlog_read_rate),
        ratio(a.startup.as_secs_f64(), b.startup.as_secs_f64()),
        ratio(a.p50_ms as f64, b.p50_ms as f64),
        ratio(a.p99_ms as f64, b.p99_ms as f64),
        ratio(a.max_ms as f64, b.max_ms as f64)
    );
    println!();
    println!(
        "backlog records/s: the pre-loaded orders, first to last output; by the output records' timestamps (when the path handed each to its producer), and by when this bench read them back from the broker (durable; about 10 ms resolution)."
    );
    println!(
        "latency (live phase only): output record timestamp - input record timestamp, both the producing clients' create time."
    );
    if !bench_mode {
        println!("(smoke run under `cargo test`: too few orders for meaningful rates)");
    }
}

/// What keeps a path running; dropping it stops the path.
enum Running {
    Worker(Worker),
    Copy {
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<usize>>,
    },
}

impl Running {
    fn worker(&self) -> Vec<&Worker> {
        match self {
            Running::Worker(w) => vec![w],
            Running::Copy { .. } => Vec::new(),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Running::Copy { stop, thread } = self {
            stop.store(true, Ordering::SeqCst);
            if let Some(t) = thread.take() {
                let _ = t.join();
            }
        }
    }
}

/// Follows a path's output topic: order ID → first output timestamp.
struct Outputs {
    collector: Collector,
    codec: Codec,
    path: Path,
    read: usize,
    first_ts: HashMap<String, i64>,
    /// Order ID → when this reader first received an output for it.
    first_seen: HashMap<String, Instant>,
}

impl Outputs {
    fn poll(&mut self) {
        // Short polls, so arrival times are precise to about 10 ms.
        self.collector.poll(Duration::from_millis(10));
        let now = Instant::now();
        for r in &self.collector.records[self.read..] {
            let value = r.value.as_deref().expect("output value");
            let order_id = match self.path {
                Path::Fraud => {
                    let hints = DecodeHints {
                        topic_default: Some(orderflow::events::EventType::OrderScreened),
                        ..DecodeHints::default()
                    };
                    match self.codec.decode(value, hints) {
                        Ok(Event::OrderScreened(e)) => e.envelope.order_id.expect("order ID"),
                        other => panic!("unexpected fraud output: {other:?}"),
                    }
                }
                Path::Copy => {
                    let v: serde_json::Value = serde_json::from_slice(value).expect("copied JSON");
                    v["order_id"].as_str().expect("order_id").to_owned()
                }
            };
            self.first_seen.entry(order_id.clone()).or_insert(now);
            self.first_ts
                .entry(order_id)
                .or_insert(r.timestamp.expect("output timestamp"));
        }
        self.read = self.collector.records.len();
    }

    fn wait_for(&mut self, ids: &[TestOrder], what: &str, running: &Running) {
        let workers = running.worker();
        wait_for(what, deadline(900), &workers, |progress| {
            self.poll();
            let done = ids
                .iter()
                .filter(|o| self.first_ts.contains_key(&o.order_id))
                .count();
            *progress = format!("{done} of {}", ids.len());
            (done == ids.len()).then_some(())
        });
    }
}

fn run(path: Path, backlog: &[TestOrder], live: &[TestOrder], rate: f64) -> Measured {
    let mut env = TestEnv::new(
        if path == Path::Fraud {
            "bench-fraud"
        } else {
            "bench-copy"
        },
        PARTITIONS,
    );
    // Measure the shipped batching, not the tests' quick one.
    env.settings.batch_interval_ms = orderflow::config::Settings::default().batch_interval_ms;
    let input = env.topic(ORDER_CREATED);
    let producer = env.producer();
    let started = Instant::now();
    let backlog_out: Vec<Outgoing> = backlog.iter().map(TestOrder::outgoing).collect();
    producer.send_all(&input, &backlog_out);
    eprintln!(
        "{path:?}: pre-loaded {} orders in {:.2}s",
        backlog.len(),
        started.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    let running = match path {
        Path::Fraud => Running::Worker(env.spawn_fraud_worker(&FraudOpts::default())),
        Path::Copy => {
            let stop = Arc::new(AtomicBool::new(false));
            let (brokers, output) = (env.settings.brokers.clone(), env.topic(ORDER_SCREENED));
            let group = format!("{}.copy", env.settings.group_prefix);
            let (input, flag) = (input.clone(), stop.clone());
            let thread =
                std::thread::spawn(move || copy_loop(&brokers, &group, &input, &output, &flag));
            Running::Copy {
                stop,
                thread: Some(thread),
            }
        }
    };
    let mut out = Outputs {
        collector: env.collector(ORDER_SCREENED),
        codec: Codec::new(),
        path,
        read: 0,
        first_ts: HashMap::new(),
        first_seen: HashMap::new(),
    };
    let workers = running.worker();
    let startup = wait_for(
        &format!("{path:?}: first output"),
        deadline(120),
        &workers,
        |_| {
            out.poll();
            (!out.first_ts.is_empty()).then(|| started.elapsed())
        },
    );
    out.wait_for(
        backlog,
        &format!("{path:?}: {} backlog orders", backlog.len()),
        &running,
    );
    let ts: Vec<i64> = backlog.iter().map(|o| out.first_ts[&o.order_id]).collect();
    let span_ms = (ts.iter().max().expect("outputs") - ts.iter().min().expect("outputs")).max(1);
    let backlog_rate = (backlog.len() - 1) as f64 * 1000.0 / span_ms as f64;
    let seen: Vec<Instant> = backlog
        .iter()
        .map(|o| out.first_seen[&o.order_id])
        .collect();
    let seen_span = *seen.iter().max().expect("outputs") - *seen.iter().min().expect("outputs");
    let backlog_read_rate = (backlog.len() - 1) as f64 / seen_span.as_secs_f64().max(0.001);

    let live_out: Vec<Outgoing> = live.iter().map(TestOrder::outgoing).collect();
    let started = Instant::now();
    let landed = producer.send_paced(&input, &live_out, Some(rate));
    let live_rate = live.len() as f64 / started.elapsed().as_secs_f64();
    out.wait_for(
        live,
        &format!("{path:?}: {} live orders", live.len()),
        &running,
    );
    let mut lat: Vec<i64> = live
        .iter()
        .zip(&landed)
        .map(|(o, l)| out.first_ts[&o.order_id] - l.timestamp.expect("input timestamp"))
        .collect();
    lat.sort_unstable();
    drop(running);
    let extra_records = out.collector.records.len() - backlog.len() - live.len();
    Measured {
        path,
        backlog_rate,
        backlog_read_rate,
        startup,
        live_rate,
        p50_ms: percentile(&lat, 0.50),
        p99_ms: percentile(&lat, 0.99),
        max_ms: *lat.last().expect("latencies"),
        extra_records,
    }
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
