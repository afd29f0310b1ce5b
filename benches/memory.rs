//! Memory of long-running workers: a worker's resident set after N orders through fraud
//! and inventory, against its resident set after N/10 (the project's figure: RSS after
//! 1,000,000 orders within 1.5× of RSS after 100,000). Printed, not asserted: it is a
//! measurement of the shipped settings, and where memory goes is for the reader to judge.
//!
//! Two worker processes, `orderflow run --stages fraud` and `orderflow run --stages
//! inventory`, `at_least_once`, the shipped batch and stage settings, 6 partitions:
//!
//! 1. 50 stores × 200 SKUs are stocked through `inventory.commands` (`StockRestocked`,
//!    far more units than the run can sell, so every order is reserved);
//! 2. N JSON orders (producer contract; every customer unique, so fraud's velocity rule
//!    never rejects) are produced by a background thread in chunks, never more than
//!    `ORDERFLOW_BENCH_MEMORY_LAG` ahead of the slower worker: both consume a steady
//!    stream with a bounded backlog, as in production, so the consumers' prefetch buffers
//!    weigh the same at every sample;
//! 3. every 50 ms this process reads each worker's `VmRSS` and `VmHWM`
//!    (`/proc/<pid>/status`) and the inputs it processed (`orderflow_records_in_total` on
//!    its `/metrics`; for inventory minus the restocks), and keeps the first sample at or
//!    past each tenth of N;
//! 4. both workers are stopped (SIGTERM) and started again, and their "state restored"
//!    log lines give what each holds in memory after N orders: state keys, dedup-window
//!    event IDs and timers, with the RSS of a fresh process holding exactly that.
//!
//! `bash scripts/bench.sh memory` runs it (`cargo bench --bench memory`). Environment:
//! `ORDERFLOW_BENCH_MEMORY_ORDERS` (N, default 1,000,000), `ORDERFLOW_BENCH_MEMORY_LAG`
//! (orders produced ahead of the slower worker, default 20,000). Under
//! `cargo test --all-targets` (no `--bench` argument) it runs once as a smoke test with
//! 2,000 orders.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::pipeline::{mix, restock, sku, store};
use common::*;
use orderflow::topics;

const PARTITIONS: i32 = 6;
const STORES: usize = 50;
const SKUS: usize = 200;
/// Units per (store, SKU). A million orders take about 300 of one SKU at one store (20,000
/// orders per store, 2 lines of 1.5 units on average, over 200 SKUs): no order is ever
/// short, so inventory's state holds one kind of order record, not a mix of outcomes.
const STOCK_UNITS: i32 = 1_000_000;
/// Orders generated and produced at a time; each chunk is acknowledged before the next.
const CHUNK: usize = 5_000;
/// How often the workers are sampled.
const SAMPLE_EVERY: Duration = Duration::from_millis(50);

fn env_usize(var: &str, default: usize) -> usize {
    match std::env::var(var) {
        Ok(v) => v.parse().unwrap_or_else(|e| panic!("{var}={v:?}: {e}")),
        Err(_) => default,
    }
}

/// Order `i` as its producer publishes it: JSON, keyed by store; a customer of its own;
/// 1–3 lines of distinct SKUs, 1–2 units each, far below the fraud amount limit.
fn order(i: usize, placed_at_ms: i64) -> Outgoing {
    let store_id = store(i % STORES);
    let r = mix(i as u64);
    let lines = 1 + (r % 3) as usize;
    let first = (r >> 8) as usize % SKUS;
    let mut items = String::new();
    for l in 0..lines {
        let q = mix(r ^ l as u64);
        if l > 0 {
            items.push(',');
        }
        // 67 is prime to 200, so the 3 lines never name the same SKU.
        write!(
            items,
            r#"{{"sku":"{}","quantity":{},"unit_price_cents":{}}}"#,
            sku((first + 67 * l) % SKUS),
            1 + q % 2,
            500 + q % 4_500
        )
        .expect("writing to a String");
    }
    let value = format!(
        r#"{{"order_id":"m-{i:07}","store_id":"{store_id}","customer_id":"mc-{i:07}","email":"mc-{i:07}@example.com","currency":"USD","shipping_country":"US","items":[{items}],"placed_at":{placed_at_ms}}}"#
    );
    Outgoing::new(store_id, value)
}

/// `VmRSS` and `VmHWM` of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {path}: {e}"));
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {path}"))
    };
    (field("VmRSS:"), field("VmHWM:"))
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The sum of every series of metric `name` labelled `stage="{stage}"` in a Prometheus
/// text exposition (0 when there is none yet: a counter appears with its first event).
fn metric_sum(text: &str, name: &str, stage: &str) -> f64 {
    let label = format!("stage=\"{stage}\"");
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{') && rest.contains(&label))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// One worker process under observation.
struct Observed {
    stage: &'static str,
    worker: Worker,
    /// `http://ADDR/metrics`, from the worker's log.
    metrics_url: String,
    /// Inputs that are not orders (inventory's restocks), subtracted from `records_in`.
    not_orders: usize,
}

/// A worker at one moment.
#[derive(Debug, Clone, Copy)]
struct Sample {
    orders: usize,
    rss_kib: u64,
    hwm_kib: u64,
    at: Duration,
}

/// The HTTP side of sampling: one client and a runtime to drive it from this thread.
struct Http {
    rt: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Http {
    fn new() -> Self {
        Http {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("tokio runtime"),
            client: reqwest::Client::new(),
        }
    }

    fn get(&self, url: &str) -> String {
        self.rt
            .block_on(async {
                self.client
                    .get(url)
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await?
                    .error_for_status()?
                    .text()
                    .await
            })
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
    }
}

impl Observed {
    /// Waits for `worker`'s metrics address in its log.
    fn new(stage: &'static str, worker: Worker, not_orders: usize) -> Self {
        let metrics_url = wait_for(
            &format!("{stage} worker's metrics address"),
            deadline(60),
            &[&worker],
            |_| {
                let log = std::fs::read_to_string(&worker.log_path).unwrap_or_default();
                let addr = log
                    .split_once("metrics on http://")
                    .and_then(|(_, rest)| rest.split_once("/metrics"))
                    .map(|(addr, _)| format!("http://{addr}/metrics"));
                if addr.is_none() {
                    std::thread::sleep(Duration::from_millis(20));
                }
                addr
            },
        );
        Observed {
            stage,
            worker,
            metrics_url,
            not_orders,
        }
    }

    fn metrics(&self, http: &Http) -> String {
        http.get(&self.metrics_url)
    }

    fn records_in(&self, http: &Http) -> usize {
        metric_sum(
            &self.metrics(http),
            "orderflow_records_in_total",
            self.stage,
        ) as usize
    }

    fn sample(&self, http: &Http, started: Instant) -> Sample {
        let orders = self.records_in(http).saturating_sub(self.not_orders);
        let (rss_kib, hwm_kib) = memory_kib(self.worker.pid());
        Sample {
            orders,
            rss_kib,
            hwm_kib,
            at: started.elapsed(),
        }
    }

    /// Stops the worker as an operator would (SIGTERM: it finishes its batch, commits and
    /// leaves the group), or with SIGKILL if it has not exited within 30 s.
    fn stop(mut self) {
        let pid = self.worker.pid().to_string();
        let status = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap_or_else(|e| panic!("running kill -TERM {pid}: {e}"));
        assert!(status.success(), "kill -TERM {pid}: {status}");
        let until = deadline(30);
        while self.worker.exit_status().is_none() {
            if Instant::now() >= until {
                eprintln!("{} worker ignored SIGTERM for 30 s", self.stage);
                self.worker.kill9();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// What one partition's "state restored" log line says.
#[derive(Debug, Clone, Copy, Default)]
struct Restored {
    keys: usize,
    seen: usize,
    timers: usize,
}

/// The newest "state restored" line of each partition in a worker's log.
fn restored(log: &str) -> BTreeMap<i32, Restored> {
    let field = |line: &str, name: &str| -> Option<usize> {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))?
            .parse()
            .ok()
    };
    let mut out = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains("state restored")) {
        if let Some(p) = field(line, "partition") {
            let r = Restored {
                keys: field(line, "keys").unwrap_or(0),
                seen: field(line, "seen").unwrap_or(0),
                timers: field(line, "timers").unwrap_or(0),
            };
            out.insert(p as i32, r);
        }
    }
    out
}

/// A restarted worker once every partition is restored.
struct AfterRestart {
    keys: usize,
    seen: usize,
    timers: usize,
    /// From start to the last partition restored.
    restore: Duration,
    rss_kib: u64,
    hwm_kib: u64,
}

fn main() {
    let bench_mode = std::env::args().any(|a| a == "--bench");
    let n = env_usize(
        "ORDERFLOW_BENCH_MEMORY_ORDERS",
        if bench_mode { 1_000_000 } else { 2_000 },
    );
    let lag = env_usize("ORDERFLOW_BENCH_MEMORY_LAG", 20_000).max(CHUNK);
    assert!(n >= 10, "need at least 10 orders (one per tenth)");
    let idle = Duration::from_secs(if bench_mode { 5 } else { 1 });
    let checkpoints: Vec<usize> = (1..=10).map(|k| n * k / 10).collect();
    eprintln!(
        "memory bench: {n} orders, at most {lag} ahead, {PARTITIONS} partitions, {STORES} stores × {SKUS} SKUs, broker {}",
        broker()
    );

    let mut env = TestEnv::new("bench-memory", PARTITIONS);
    for base in [
        topics::INVENTORY_COMMANDS,
        topics::INVENTORY_UPDATED,
        topics::PAYMENT_PROCESSED,
    ] {
        wait_for_partitions(&env.topic(base), PARTITIONS);
    }
    // Measure the shipped batching, not the tests' quick one.
    env.settings.batch_interval_ms = orderflow::config::Settings::default().batch_interval_ms;
    let http = Http::new();
    let producer = env.producer();

    // Stock first, then the orders: Kafka orders records within a partition, not across
    // the inventory's input topics.
    let commands: Vec<Outgoing> = (0..STORES)
        .flat_map(|s| (0..SKUS).map(move |k| restock(&store(s), &sku(k), STOCK_UNITS, "memory")))
        .collect();
    producer.send_all(&env.topic(topics::INVENTORY_COMMANDS), &commands);
    let started = Instant::now();
    let fraud = Observed::new("fraud", env.spawn_worker(&["fraud"], &[]), 0);
    let inventory = Observed::new(
        "inventory",
        env.spawn_worker(&["inventory"], &[]),
        commands.len(),
    );
    wait_for(
        &format!("{} restocks applied", commands.len()),
        deadline(120),
        &[&fraud.worker, &inventory.worker],
        |progress| {
            let got = inventory.records_in(&http);
            *progress = format!("{got} inventory inputs");
            std::thread::sleep(Duration::from_millis(100));
            (got >= commands.len()).then_some(())
        },
    );
    let at_start = [
        fraud.sample(&http, started),
        inventory.sample(&http, started),
    ];
    eprintln!(
        "stocked after {:.1}s; fraud {:.0} MiB, inventory {:.0} MiB",
        started.elapsed().as_secs_f64(),
        mib(at_start[0].rss_kib),
        mib(at_start[1].rss_kib)
    );

    // Orders, produced in the background at most `lag` ahead of the slower worker.
    let done = Arc::new(AtomicUsize::new(0));
    let orders_started = Instant::now();
    let producing = {
        let (done, topic) = (done.clone(), env.topic(topics::ORDER_CREATED));
        std::thread::spawn(move || {
            let mut i = 0;
            while i < n {
                while i + CHUNK > done.load(Ordering::Relaxed) + lag {
                    std::thread::sleep(Duration::from_millis(5));
                }
                let end = (i + CHUNK).min(n);
                let now = now_ms();
                let chunk: Vec<Outgoing> = (i..end).map(|j| order(j, now)).collect();
                producer.send_all(&topic, &chunk);
                i = end;
            }
        })
    };

    let observed = [&fraud, &inventory];
    let mut at: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    let mut peak_hwm = [0u64; 2];
    let workers = [&fraud.worker, &inventory.worker];
    wait_for(
        &format!("{n} orders through fraud and inventory"),
        deadline(600 + (n / 1_000) as u64),
        &workers,
        |progress| {
            let now: Vec<Sample> = observed
                .iter()
                .map(|o| o.sample(&http, orders_started))
                .collect();
            for (w, s) in now.iter().enumerate() {
                peak_hwm[w] = peak_hwm[w].max(s.hwm_kib);
                // One sample may pass several checkpoints (in a smoke run).
                let before = at[w].len();
                while at[w].len() < checkpoints.len() && s.orders >= checkpoints[at[w].len()] {
                    at[w].push(*s);
                }
                if at[w].len() > before {
                    eprintln!(
                        "{}: {} orders, VmRSS {:.1} MiB, VmHWM {:.1} MiB, at {:.1}s",
                        observed[w].stage,
                        s.orders,
                        mib(s.rss_kib),
                        mib(s.hwm_kib),
                        s.at.as_secs_f64()
                    );
                }
            }
            done.store(now[0].orders.min(now[1].orders), Ordering::Relaxed);
            *progress = format!(
                "fraud {} orders, inventory {} orders",
                now[0].orders, now[1].orders
            );
            if at.iter().all(|a| a.len() == checkpoints.len()) {
                return Some(());
            }
            std::thread::sleep(SAMPLE_EVERY);
            None
        },
    );
    let elapsed = orders_started.elapsed();
    producing.join().expect("the producing thread");

    // Nothing dead-lettered and nothing counted twice: every order was one input of each
    // worker, so the figures are those of the run described.
    for o in observed {
        let text = o.metrics(&http);
        let dead = metric_sum(&text, "orderflow_records_dead_lettered_total", o.stage);
        let total = metric_sum(&text, "orderflow_records_in_total", o.stage) as usize;
        assert_eq!(dead, 0.0, "{} dead-lettered records", o.stage);
        assert_eq!(
            total,
            n + o.not_orders,
            "{} processed {total} inputs; {n} orders and {} commands were sent",
            o.stage,
            o.not_orders
        );
    }
    // The same processes a few seconds later, idle.
    std::thread::sleep(idle);
    let settled = [
        fraud.sample(&http, orders_started),
        inventory.sample(&http, orders_started),
    ];

    // What they hold: stop both and let fresh processes restore it.
    fraud.stop();
    inventory.stop();
    let after: Vec<AfterRestart> = ["fraud", "inventory"]
        .into_iter()
        .map(|stage| {
            let started = Instant::now();
            let worker = env.spawn_worker(&[stage], &[]);
            let all = wait_for(
                &format!("restarted {stage} worker restores {PARTITIONS} partitions"),
                deadline(600),
                &[&worker],
                |progress| {
                    let log = std::fs::read_to_string(&worker.log_path).unwrap_or_default();
                    let r = restored(&log);
                    *progress = format!("{} partitions restored", r.len());
                    if r.len() == PARTITIONS as usize {
                        return Some((r, started.elapsed()));
                    }
                    std::thread::sleep(Duration::from_millis(100));
                    None
                },
            );
            // Let it re-send its outbox and settle before sampling.
            std::thread::sleep(Duration::from_secs(3));
            let (rss_kib, hwm_kib) = memory_kib(worker.pid());
            let (r, restore) = all;
            AfterRestart {
                keys: r.values().map(|r| r.keys).sum(),
                seen: r.values().map(|r| r.seen).sum(),
                timers: r.values().map(|r| r.timers).sum(),
                restore,
                rss_kib,
                hwm_kib,
            }
        })
        .collect();

    for (peak, s) in peak_hwm.iter_mut().zip(&settled) {
        *peak = (*peak).max(s.hwm_kib);
    }
    let samples = Samples {
        at_start,
        at,
        settled,
        peak_hwm,
        idle,
    };
    report(n, &checkpoints, &samples, &after, elapsed);
    if !bench_mode {
        println!("(smoke run under `cargo test`: too few orders for meaningful figures)");
    }
}

/// Every sample of the run, both workers side by side (fraud first).
struct Samples {
    /// Once stocked, before the first order.
    at_start: [Sample; 2],
    /// The first sample at or past each checkpoint.
    at: [Vec<Sample>; 2],
    /// `idle` after the last order.
    settled: [Sample; 2],
    /// The highest `VmHWM` seen.
    peak_hwm: [u64; 2],
    idle: Duration,
}

fn report(
    n: usize,
    checkpoints: &[usize],
    samples: &Samples,
    after: &[AfterRestart],
    elapsed: Duration,
) {
    let Samples {
        at_start,
        at,
        settled,
        peak_hwm,
        idle,
    } = samples;
    println!();
    println!(
        "worker memory over {n} JSON orders: `orderflow run --stages fraud` and `--stages inventory`, at_least_once, shipped settings; {PARTITIONS} partitions, {STORES} stores × {SKUS} SKUs, unique customers"
    );
    println!();
    println!(
        "| orders | fraud: orders at sample | fraud VmRSS (MiB) | fraud VmHWM (MiB) | fraud at (s) | inventory: orders at sample | inventory VmRSS (MiB) | inventory VmHWM (MiB) | inventory at (s) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let row = |label: &str, f: &Sample, i: &Sample| {
        println!(
            "| {label} | {} | {:.1} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {:.1} |",
            f.orders,
            mib(f.rss_kib),
            mib(f.hwm_kib),
            f.at.as_secs_f64(),
            i.orders,
            mib(i.rss_kib),
            mib(i.hwm_kib),
            i.at.as_secs_f64()
        );
    };
    let before = |s: &Sample| Sample {
        at: Duration::ZERO,
        ..*s
    };
    row("0 (stocked)", &before(&at_start[0]), &before(&at_start[1]));
    for (k, c) in checkpoints.iter().enumerate() {
        row(&c.to_string(), &at[0][k], &at[1][k]);
    }
    row(
        &format!("idle {} s later", idle.as_secs()),
        &settled[0],
        &settled[1],
    );
    let tenth = n / 10;
    let ratio = |w: usize| mib(at[w][9].rss_kib) / mib(at[w][0].rss_kib);
    let per_order = |w: usize| {
        (at[w][9].rss_kib as f64 - at[w][0].rss_kib as f64) * 1024.0
            / (at[w][9].orders - at[w][0].orders).max(1) as f64
    };
    println!(
        "| **RSS({n}) / RSS({tenth})** | | **{:.2}** | | | | **{:.2}** | | |",
        ratio(0),
        ratio(1)
    );
    println!(
        "| RSS growth per order, {tenth} → {n} (bytes) | | {:.0} | | | | {:.0} | | |",
        per_order(0),
        per_order(1)
    );
    println!(
        "| peak VmHWM (MiB) | | | {:.1} | | | | {:.1} | |",
        mib(peak_hwm[0]),
        mib(peak_hwm[1])
    );
    println!();
    let secs = elapsed.as_secs_f64();
    println!(
        "elapsed: {secs:.1} s from the first order produced to {n} orders through both workers ({:.0} orders/s end to end)",
        n as f64 / secs
    );
    println!();
    println!(
        "what each holds after {n} orders, as a restarted worker restores it (sums over {PARTITIONS} partitions):"
    );
    println!();
    println!(
        "| worker | state keys | dedup-window event IDs | timers | start to restored (s) | VmRSS restored (MiB) | VmHWM restored (MiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    for (stage, a) in ["fraud", "inventory"].iter().zip(after) {
        println!(
            "| {stage} | {} | {} | {} | {:.1} | {:.1} | {:.1} |",
            a.keys,
            a.seen,
            a.timers,
            a.restore.as_secs_f64(),
            mib(a.rss_kib),
            mib(a.hwm_kib)
        );
    }
    println!();
    println!(
        "orders at sample: the first 50 ms sample at or past the row's count (`orderflow_records_in_total`, inventory's minus its {} restocks). The figure to hold is RSS({n}) / RSS({tenth}) <= 1.5 per worker.",
        STORES * SKUS
    );
}
