//! The runtime's `at_least_once` protocol under crashes at chosen moments, a fenced
//! writer, reassigned partitions, records too large for the broker, outputs too large to
//! produce, failed seeks and a restore longer than `max.poll.interval.ms` — each against
//! the real broker, with worker processes, checked by exact outcomes:
//!
//! - one content per event ID on every output topic (a replay re-sends, never decides
//!   again);
//! - one stock decision per order, and stock that balances;
//! - every input dead-lettered once at most, nothing stuck behind a bad record;
//! - a timer's round (the inventory watchdog) decided once, whatever the clock says when
//!   a crashed batch is taken up again.
//!
//! The crash tests run under `exactly_once` too, on the transactional broker (see
//! [`common::txn_broker`]), with the worker restarted under its instance ID as a
//! deployment would: crashed with only the transaction's outputs sent, with everything
//! sent but not committed, after the commit, and SIGKILLed as its first output appears.
//! That broker hands aborted records to read_committed readers; the tests tell them apart
//! by the log's transaction markers ([`common::txn_log`]), count them, and check the same
//! outcomes (one content per event ID included) on the records a correct broker would
//! show a read_committed reader.
//!
//! Crash points (`ORDERFLOW_CRASH_AT`), stalls and seek failures are injected through the
//! environment of the worker process, never set in production.

mod common;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use common::*;
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, EventType};
use orderflow::topics;
use serde_json::json;

const STORE: &str = "store-1";

/// A fixed event ID per name.
fn id(name: &str) -> String {
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

fn rec(store: &str, v: serde_json::Value) -> Outgoing {
    Outgoing::new(store, serde_json::to_vec(&v).expect("JSON"))
}

fn restock(store: &str, sku: &str, quantity: i32) -> Outgoing {
    rec(
        store,
        json!({"event_type": "StockRestocked", "store_id": store, "sku": sku, "quantity": quantity}),
    )
}

fn probe(store: &str, sku: &str, tag: &str) -> Outgoing {
    rec(
        store,
        json!({"event_type": "StockAdjusted", "store_id": store, "sku": sku, "delta": 0, "reason": tag}),
    )
}

fn screened(store: &str, order: &str, items: &[(&str, i32)]) -> Outgoing {
    let items: Vec<serde_json::Value> = items
        .iter()
        .map(|(sku, q)| json!({"sku": sku, "quantity": q, "unit_price_cents": 100}))
        .collect();
    rec(
        store,
        json!({
            "event_type": "OrderScreened", "event_id": id(&format!("screened-{store}-{order}")),
            "order_id": order, "store_id": store, "correlation_id": order,
            "occurred_at": now_ms(), "decision": "approved", "reasons": [],
            "customer_id": "c-1", "email": "c@example.com", "currency": "USD",
            "total_cents": 100, "items": items,
        }),
    )
}

fn payment_failed(store: &str, order: &str) -> Outgoing {
    rec(
        store,
        json!({
            "event_type": "PaymentFailed", "event_id": id(&format!("failed-{store}-{order}")),
            "order_id": order, "store_id": store, "correlation_id": order,
            "occurred_at": now_ms(), "amount_cents": 100, "currency": "USD",
            "attempts": 1, "reason": "declined", "message": "card declined",
        }),
    )
}

/// Every event read from one topic, checked for one content per event ID.
struct Outputs {
    collector: Collector,
    read: usize,
    codec: Codec,
    /// The first record's value per event ID.
    first: HashMap<String, Vec<u8>>,
    events: Vec<Event>,
    duplicates: usize,
    /// Records whose event ID came before with another content: (the first, this one).
    /// Kept only by [`Outputs::collecting`]; otherwise the first one fails the test.
    conflicts: Option<Vec<(Event, Event)>>,
    /// Records left out: those a correct broker hides from read_committed readers (see
    /// [`Outputs::as_committed`]).
    hidden: HashSet<(i32, i64)>,
}

impl Outputs {
    fn new(env: &TestEnv, base: &str) -> Self {
        Outputs {
            collector: env.collector(base),
            read: 0,
            codec: Codec::new(),
            first: HashMap::new(),
            events: Vec::new(),
            duplicates: 0,
            conflicts: None,
            hidden: HashSet::new(),
        }
    }

    /// Like [`Outputs::new`], but keeps going past a second content under one event ID,
    /// so that [`Outputs::assert_one_content`] can report every one.
    fn collecting(env: &TestEnv, base: &str) -> Self {
        Outputs {
            conflicts: Some(Vec::new()),
            ..Outputs::new(env, base)
        }
    }

    /// Fails listing every event ID read with two contents, telling those that differ
    /// only in `occurred_at` (a batch decided again at another time) from those that
    /// decided differently.
    fn assert_one_content(&self, context: &str) {
        let conflicts = self.conflicts.as_deref().unwrap_or_default();
        if conflicts.is_empty() {
            return;
        }
        let time_only = conflicts
            .iter()
            .filter(|(first, other)| {
                let mut retimed = other.clone();
                retimed.envelope_mut().occurred_at = first.envelope().occurred_at;
                &retimed == first
            })
            .count();
        let listed: Vec<String> = conflicts
            .iter()
            .map(|(first, other)| format!("  first {first:?}\n  then  {other:?}"))
            .collect();
        panic!(
            "[{context}] {} event IDs on {} carry two contents, {time_only} of them differing only in occurred_at:\n{}",
            conflicts.len(),
            self.collector.topic,
            listed.join("\n")
        );
    }

    fn poll(&mut self) {
        self.collector.poll(Duration::from_millis(100));
        self.take();
    }

    fn drain(&mut self) {
        self.collector.drain();
        self.take();
    }

    /// Reads everything again, leaving out the records of aborted and still-open
    /// transactions as the log's own markers decide them ([`txn_log`]): what a correct
    /// broker shows a read_committed reader. Returns how many records were left out as
    /// aborted, and as open.
    fn as_committed(&mut self, brokers: &str, partitions: i32) -> (usize, usize) {
        let log = txn_log::scan(brokers, &self.collector.topic, partitions);
        let mut aborted = 0;
        let mut open = 0;
        for r in &self.collector.records {
            match log.fate(r.partition, r.offset) {
                Some(txn_log::Fate::Aborted) => aborted += 1,
                Some(txn_log::Fate::Open) => open += 1,
                Some(_) => {}
                None => panic!(
                    "{}[{}] offset {} was read but is not in the log",
                    self.collector.topic, r.partition, r.offset
                ),
            }
        }
        self.hidden = log.hidden();
        self.read = 0;
        self.first.clear();
        self.events.clear();
        self.duplicates = 0;
        if let Some(c) = self.conflicts.as_mut() {
            c.clear();
        }
        self.take();
        (aborted, open)
    }

    fn take(&mut self) {
        for r in &self.collector.records[self.read..] {
            if self.hidden.contains(&(r.partition, r.offset)) {
                continue;
            }
            let value = r.value.clone().expect("outputs have values");
            let event = self
                .codec
                .decode(&value, DecodeHints::default())
                .unwrap_or_else(|e| panic!("undecodable output on {}: {e}", self.collector.topic));
            let id = event.envelope().event_id.clone();
            match self.first.get(&id) {
                Some(earlier) if earlier != &value && self.conflicts.is_some() => {
                    let earlier = self
                        .codec
                        .decode(earlier, DecodeHints::default())
                        .expect("decoded before");
                    if let Some(c) = self.conflicts.as_mut() {
                        c.push((earlier, event));
                    }
                }
                Some(earlier) => {
                    assert_eq!(
                        earlier,
                        &value,
                        "event ID {id} on {} carries two contents: {:?} and then {event:?}",
                        self.collector.topic,
                        self.codec.decode(earlier, DecodeHints::default())
                    );
                    self.duplicates += 1;
                }
                None => {
                    self.first.insert(id, value);
                    self.events.push(event);
                }
            }
        }
        self.read = self.collector.records.len();
    }

    fn of_order(&self, order: &str) -> Vec<EventType> {
        self.events
            .iter()
            .filter(|e| e.envelope().order_id.as_deref() == Some(order))
            .map(Event::event_type)
            .collect()
    }

    /// The level a probe tagged `tag` reported for `sku`.
    fn probed(&self, sku: &str, tag: &str) -> Option<i32> {
        self.events.iter().find_map(|e| match e {
            Event::StockLevelChanged(c) if c.sku == sku && c.reason == tag => Some(c.available),
            _ => None,
        })
    }
}

fn wait_until_exited(w: &mut Worker, within: Duration) {
    let until = Instant::now() + within;
    loop {
        if w.exit_status().is_some() {
            return;
        }
        assert!(
            Instant::now() < until,
            "worker {} did not reach its crash point within {within:?}; log:\n{}",
            w.instance,
            w.log_tail(40)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How the worker that takes the batch below dies.
#[derive(Debug, Clone, Copy)]
enum Crash {
    /// At the crash point of this name (`ORDERFLOW_CRASH_AT`), the first time it is reached.
    At(&'static str),
    /// SIGKILLed by the test as soon as the batch's first output can be read: wherever the
    /// worker happens to be, mid-transaction or just past the commit.
    KillAtFirstOutput,
    /// Not a crash: the batch's changelog write fails after its first half reached the log
    /// (`ORDERFLOW_FAIL_CHANGELOG_WRITE`), and the worker carries on.
    FailedChangelogWrite,
}

impl Crash {
    fn name(self) -> &'static str {
        match self {
            Crash::At(point) => point,
            Crash::KillAtFirstOutput => "sigkill_at_first_output",
            Crash::FailedChangelogWrite => "failed_changelog_write",
        }
    }
}

/// A batch holding a failed payment that releases the only unit and an order for it is
/// cut at `point`: whatever the next owner reads again, in whatever order its fetches
/// bring the two topics, the decisions already visible stand, and those not yet visible
/// come out once — one content per event ID, one decision per order, stock balanced.
///
/// `env` says the guarantee. Under `at_least_once` every worker is a new instance; under
/// `exactly_once` each is the previous one restarted under its instance ID (and so its
/// transactional ID), which fences the dead producer and aborts its open transaction.
fn crash_between_decision_and_state(env: TestEnv, crash: Crash) {
    let point = crash.name();
    let exactly_once = env.settings.guarantee == orderflow::config::Guarantee::ExactlyOnce;
    let producer = env.producer();
    let commands = env.topic(topics::INVENTORY_COMMANDS);
    let screened_topic = env.topic(topics::ORDER_SCREENED);
    let payments = env.topic(topics::PAYMENT_PROCESSED);
    let mut out = Outputs::collecting(&env, topics::INVENTORY_UPDATED);
    let dlq = env.collector(topics::DLQ);

    producer.send(&commands, &restock(STORE, "SKU-A", 1));
    producer.send(&commands, &restock(STORE, "SKU-B", 5));
    producer.send(&screened_topic, &screened(STORE, "o-1", &[("SKU-A", 1)]));
    let mut first = env.spawn_worker(&["inventory"], &[]);
    wait_for("o-1 reserved", deadline(60), &[&first], |_| {
        out.poll();
        out.of_order("o-1")
            .contains(&EventType::StockReserved)
            .then_some(())
    });
    // Let the first worker commit the retirement of its sent outbox, so that the next
    // worker's first commit is the batch below.
    std::thread::sleep(Duration::from_millis(500));
    first.kill9();
    let outputs_before = out.events.len();

    // In one go: o-1's payment fails (releasing SKU-A), o-2 wants SKU-A, and o-3..o-6
    // take SKU-B.
    producer.send(&payments, &payment_failed(STORE, "o-1"));
    producer.send(&screened_topic, &screened(STORE, "o-2", &[("SKU-A", 1)]));
    for i in 3..=6 {
        producer.send(
            &screened_topic,
            &screened(STORE, &format!("o-{i}"), &[("SKU-B", 1)]),
        );
    }
    let crash_env = match crash {
        Crash::At(point) => vec![("ORDERFLOW_CRASH_AT", format!("{point}:1"))],
        Crash::KillAtFirstOutput => Vec::new(),
        Crash::FailedChangelogWrite => {
            vec![("ORDERFLOW_FAIL_CHANGELOG_WRITE", "1".to_owned())]
        }
    };
    let mut crashing = if exactly_once {
        env.restart_worker(&mut first, &["inventory"], &crash_env);
        first
    } else {
        env.spawn_worker(&["inventory"], &crash_env)
    };
    match crash {
        Crash::At(point) => {
            wait_until_exited(&mut crashing, Duration::from_secs(60));
            assert!(
                crashing
                    .log_tail(40)
                    .contains(&format!("crash point {point} reached")),
                "[{point}] worker {} exited, but not at its crash point; log:\n{}",
                crashing.instance,
                crashing.log_tail(40)
            );
        }
        Crash::KillAtFirstOutput => {
            wait_for(
                "the batch's first output",
                deadline(60),
                &[&crashing],
                |_| {
                    out.poll();
                    (out.events.len() > outputs_before).then_some(())
                },
            );
            crashing.kill9();
        }
        Crash::FailedChangelogWrite => {
            wait_for(
                "the failed changelog write",
                deadline(60),
                &[&crashing],
                |_| {
                    crashing
                        .log_tail(400)
                        .contains("changelog write failed; restoring")
                        .then_some(())
                },
            );
        }
    }
    let mut after = if matches!(crash, Crash::FailedChangelogWrite) {
        // The same worker restores the partition and goes on.
        crashing
    } else if exactly_once {
        env.restart_worker(&mut crashing, &["inventory"], &[]);
        crashing
    } else {
        env.spawn_worker(&["inventory"], &[])
    };
    let orders: Vec<String> = (1..=6).map(|i| format!("o-{i}")).collect();
    wait_for(
        "a decision for every order",
        deadline(60),
        &[&after],
        |progress| {
            out.poll();
            let decided = orders
                .iter()
                .filter(|o| {
                    out.of_order(o)
                        .iter()
                        .any(|t| matches!(t, EventType::StockReserved | EventType::StockRejected))
                })
                .count();
            *progress = format!("{decided} of {} decided", orders.len());
            (decided == orders.len() && out.of_order("o-1").contains(&EventType::StockReleased))
                .then_some(())
        },
    );
    producer.send(&commands, &probe(STORE, "SKU-A", "probe-a"));
    producer.send(&commands, &probe(STORE, "SKU-B", "probe-b"));
    let (a, b) = wait_for("both probes", deadline(60), &[&after], |_| {
        out.poll();
        Some((
            out.probed("SKU-A", "probe-a")?,
            out.probed("SKU-B", "probe-b")?,
        ))
    });
    out.drain();
    // Under `exactly_once` the assertions below hold for what a read_committed reader of
    // a correct broker sees. This broker hands over aborted records too (see
    // `common::txn_broker`); they are told apart by the log's transaction markers,
    // counted, and left out — and every transaction must be decided by now.
    let mut hidden = (0, 0);
    if exactly_once {
        hidden = out.as_committed(&env.settings.brokers, env.partitions);
        assert_eq!(
            hidden.1, 0,
            "[{point}] records of transactions still open after the restart"
        );
    }
    let (a, b) = if exactly_once {
        (
            out.probed("SKU-A", "probe-a")
                .expect("probe-a among committed records"),
            out.probed("SKU-B", "probe-b")
                .expect("probe-b among committed records"),
        )
    } else {
        (a, b)
    };
    out.assert_one_content(point);

    for o in &orders {
        let decisions: Vec<EventType> = out
            .of_order(o)
            .into_iter()
            .filter(|t| matches!(t, EventType::StockReserved | EventType::StockRejected))
            .collect();
        assert_eq!(decisions.len(), 1, "[{point}] {o}: decisions {decisions:?}");
    }
    let o2_reserved = out.of_order("o-2").contains(&EventType::StockReserved);
    assert_eq!(
        a,
        if o2_reserved { 0 } else { 1 },
        "[{point}] SKU-A: 1 unit, o-1 reserved and released it, o-2 reserved={o2_reserved}"
    );
    assert_eq!(b, 1, "[{point}] SKU-B: 5 units, 4 reserved");
    if matches!(crash, Crash::FailedChangelogWrite) {
        // What the worker went on with is what its changelog holds: a new owner restores
        // the same levels.
        after.kill9();
        let fresh = env.spawn_worker(&["inventory"], &[]);
        producer.send(&commands, &probe(STORE, "SKU-A", "probe-a2"));
        producer.send(&commands, &probe(STORE, "SKU-B", "probe-b2"));
        let restored = wait_for(
            "both probes after a restore",
            deadline(60),
            &[&fresh],
            |_| {
                out.poll();
                Some((
                    out.probed("SKU-A", "probe-a2")?,
                    out.probed("SKU-B", "probe-b2")?,
                ))
            },
        );
        assert_eq!(restored, (a, b), "[{point}] levels after a restore");
        out.drain();
        out.assert_one_content(point);
        after = fresh;
    }
    let mut dlq = dlq;
    dlq.drain();
    assert!(
        dlq.records.is_empty(),
        "[{point}] dead letters: {:?}",
        dlq.records
    );
    let guarantee = format!("guarantee={}", env.settings.guarantee);
    assert!(
        after.log_tail(400).contains(&guarantee),
        "[{point}] the worker did not run with {guarantee}; log:\n{}",
        after.log_tail(40)
    );
    eprintln!(
        "[{point}, {}] crashed; o-2 {}; {} identical re-sends; {} aborted records read and left out",
        env.settings.guarantee,
        if o2_reserved { "reserved" } else { "rejected" },
        out.duplicates,
        hidden.0
    );
}

fn at_least_once(point: &'static str) {
    let env = TestEnv::new(&format!("crash-{point}"), 2);
    crash_between_decision_and_state(env, Crash::At(point));
}

fn exactly_once(crash: Crash) {
    let env = TestEnv::exactly_once(&format!("txn-crash-{}", crash.name()), 2);
    crash_between_decision_and_state(env, crash);
}

#[test]
fn a_crash_mid_changelog_changes_no_decision() {
    at_least_once("mid_changelog");
}

#[test]
fn a_crash_after_the_changelog_sends_the_outbox_once_restored() {
    at_least_once("after_changelog");
}

#[test]
fn a_changelog_write_that_fails_half_way_is_restored_and_changes_no_decision() {
    let env = TestEnv::new("failed-changelog-write", 2);
    crash_between_decision_and_state(env, Crash::FailedChangelogWrite);
}

#[test]
fn a_crash_after_the_outputs_re_sends_them_unchanged() {
    at_least_once("after_outputs");
}

#[test]
fn a_crash_after_the_offsets_changes_nothing() {
    at_least_once("after_offsets");
}

/// The aborted outputs stay readable on this broker; the batch is decided again, and must
/// come out under the same IDs with the same contents.
#[test]
fn exactly_once_a_crash_with_only_the_outputs_sent_changes_no_decision() {
    exactly_once(Crash::At("txn_outputs_sent"));
}

#[test]
fn exactly_once_a_crash_before_the_commit_changes_no_decision() {
    exactly_once(Crash::At("txn_before_commit"));
}

#[test]
fn exactly_once_a_crash_after_the_commit_changes_nothing() {
    exactly_once(Crash::At("txn_after_commit"));
}

#[test]
fn exactly_once_a_sigkill_at_the_first_output_changes_no_decision() {
    exactly_once(Crash::KillAtFirstOutput);
}

/// A watchdog round is decided once. Its alerts are emitted in a batch like any other
/// outputs, so a worker killed around that batch (after its changelog, or after its
/// outputs) leaves the next owner nothing to decide again: it re-sends the round's alerts
/// unchanged, with the round's own IDs, and no round is fired twice or early because the
/// restarted worker's clock differs.
fn crash_around_watchdog_rounds(point: &str) {
    const INTERVAL_MS: i64 = 1_000;
    let env = TestEnv::new(&format!("watchdog-{point}"), 2);
    let producer = env.producer();
    let commands = env.topic(topics::INVENTORY_COMMANDS);
    let mut alerts = Outputs::new(&env, topics::INVENTORY_THRESHOLD_REACHED);
    // Two SKUs at 0 units, at or below the default threshold (0): both low.
    producer.send(&commands, &probe(STORE, "SKU-A", "init"));
    producer.send(&commands, &probe(STORE, "SKU-B", "init"));
    let interval = (
        "ORDERFLOW_INVENTORY_WATCHDOG_INTERVAL_SECS",
        "1".to_string(),
    );
    // Commit 1 takes the stock commands and schedules the watchdog, commit 2 retires its
    // sent outbox, commit 3 is the first watchdog round: the crash cuts that round.
    let mut crashing = env.spawn_worker(
        &["inventory"],
        &[
            interval.clone(),
            ("ORDERFLOW_CRASH_AT", format!("{point}:3")),
        ],
    );
    wait_until_exited(&mut crashing, Duration::from_secs(60));
    // The round the crash cut was due before this: it must be out in the end, re-sent
    // from the outbox or sent for the first time by the next owner.
    let exited_at = now_ms();
    let after = env.spawn_worker(&["inventory"], &[interval]);
    let rounds = |alerts: &Outputs| -> BTreeMap<String, Vec<(String, String)>> {
        let mut by_round: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for e in &alerts.events {
            if let Event::LowStock(l) = e
                && l.trigger == orderflow::events::LowStockTrigger::Watchdog
            {
                by_round
                    .entry(l.envelope.correlation_id.clone())
                    .or_default()
                    .push((l.sku.clone(), l.envelope.event_id.clone()));
            }
        }
        by_round
    };
    wait_for(
        "three watchdog rounds by the restarted worker",
        deadline(60),
        &[&after],
        |progress| {
            alerts.poll();
            let n = rounds(&alerts).len();
            *progress = format!("{n} rounds");
            (n >= 5).then_some(())
        },
    );
    alerts.drain();
    let by_round = rounds(&alerts);
    // A round's firing ID is `timer/watchdog/<store>/<due_at>`.
    let mut due: Vec<i64> = Vec::new();
    for (round, skus) in &by_round {
        let mut names: Vec<&str> = skus.iter().map(|(s, _)| s.as_str()).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["SKU-A", "SKU-B"],
            "[{point}] round {round}: each low SKU once"
        );
        let at = round
            .rsplit('/')
            .next()
            .and_then(|t| t.parse::<i64>().ok())
            .unwrap_or_else(|| panic!("[{point}] round ID {round:?} names no due time"));
        due.push(at);
    }
    due.sort_unstable();
    assert!(
        due.first().is_some_and(|first| *first <= exited_at),
        "[{point}] the round the crash cut (due before the worker died, at {exited_at}) is missing: rounds due at {due:?}"
    );
    for pair in due.windows(2) {
        assert!(
            pair[1] - pair[0] >= INTERVAL_MS,
            "[{point}] rounds due at {} and {} are closer than the interval: a round was \
             fired again under a new ID ({due:?})",
            pair[0],
            pair[1]
        );
    }
    // After its outputs the round was out, and the next owner re-sent it from the outbox
    // (both alerts, byte for byte); after its changelog it was not out yet, and the next
    // owner sent it for the first time.
    let resent = if point == "after_outputs" { 2 } else { 0 };
    assert_eq!(alerts.duplicates, resent, "[{point}] re-sent alerts");
    eprintln!(
        "[{point}] {} watchdog rounds, due times {due:?}; {} identical re-sends",
        by_round.len(),
        alerts.duplicates
    );
}

#[test]
fn a_crash_after_a_watchdog_rounds_changelog_re_sends_the_round_unchanged() {
    crash_around_watchdog_rounds("after_changelog");
}

#[test]
fn a_crash_after_a_watchdog_rounds_outputs_fires_no_round_again() {
    crash_around_watchdog_rounds("after_outputs");
}

/// Orders of `customers` customers, `per` each, in stores spread over the partitions.
fn customer_orders(tag: &str, customers: usize, per: usize, from: usize) -> Vec<TestOrder> {
    let stores: Vec<String> = (0..customers).map(|c| format!("store-{c}")).collect();
    customer_orders_at(tag, &stores, per, from)
}

/// Like [`customer_orders`], customer `c` shopping at `stores[c]`.
fn customer_orders_at(tag: &str, stores: &[String], per: usize, from: usize) -> Vec<TestOrder> {
    let mut orders = Vec::new();
    for (c, store) in stores.iter().enumerate() {
        for i in from..from + per {
            let mut o = TestOrder::new(
                format!("{tag}-c{c}-{i}"),
                store.clone(),
                format!("{tag}-customer-{c}"),
                now_ms() + i as i64,
            );
            o.lines = 1;
            orders.push(o);
        }
    }
    orders
}

/// A worker whose batch stalls past `max.poll.interval.ms` is expelled; another takes its
/// partitions and claims them. When the stalled batch finally writes, its changelog
/// records land after the claim: it must see that and withhold its outputs, or two
/// screenings with one ID and different contents would be out.
#[test]
fn a_writer_expelled_mid_batch_is_fenced_by_the_new_owners_claim() {
    let env = TestEnv::new("zombie", 2);
    let producer = env.producer();
    let created = env.topic(topics::ORDER_CREATED);
    let mut out = Outputs::new(&env, topics::ORDER_SCREENED);
    let lenient = ("ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS", "1000".to_string());
    let kafka_low = "session.timeout.ms=6000,max.poll.interval.ms=6000";
    // The orders are there before the first worker starts, so its first commit holds
    // some of them — and stalls for 20 s, well past max.poll.interval.ms.
    let orders = customer_orders("late", 4, 3, 0);
    let sent: Vec<Outgoing> = orders.iter().map(TestOrder::outgoing).collect();
    producer.send_all(&created, &sent);
    let zombie = env.spawn_worker_with_kafka(
        &["fraud"],
        &[
            lenient.clone(),
            ("ORDERFLOW_STALL_BEFORE_COMMIT", "1:20000".to_string()),
        ],
        kafka_low,
    );
    wait_for(
        "the first commit to stall",
        deadline(60),
        &[&zombie],
        |_| {
            std::thread::sleep(Duration::from_millis(100));
            zombie.log_tail(50).contains("stall injected").then_some(())
        },
    );
    let owner = env.spawn_worker_with_kafka(&["fraud"], std::slice::from_ref(&lenient), kafka_low);
    let expected = orders.len();
    wait_for(
        "every order screened",
        deadline(90),
        &[&owner],
        |progress| {
            out.poll();
            *progress = format!("{} of {expected}", out.events.len());
            (out.events.len() >= expected).then_some(())
        },
    );
    // Wait out the stall, then give the expelled worker time to write (and be fenced).
    wait_for(
        "the stalled batch to be fenced",
        deadline(60),
        &[&owner],
        |_| {
            zombie
                .log_tail(400)
                .contains("another writer appended to the changelog")
                .then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    out.drain();
    assert_eq!(out.events.len(), expected, "one screening per order");
    drop(zombie);
}

/// How many partitions the worker's last "restoring state" line names.
fn b_partitions(log: &str) -> usize {
    log.lines()
        .rev()
        .find_map(|l| {
            let list = l.split("restoring state partitions=[").nth(1)?;
            let list = list.split(']').next()?;
            Some(list.split(',').filter(|p| !p.trim().is_empty()).count())
        })
        .unwrap_or(usize::MAX)
}

/// Partitions move away and come back: the state parked when they left must not be
/// reused once somebody else wrote their changelog, or velocity counts would miss the
/// other owner's orders.
#[test]
fn parked_state_is_dropped_when_another_owner_wrote_meanwhile() {
    let env = TestEnv::new("parked", 4);
    let producer = env.producer();
    let created = env.topic(topics::ORDER_CREATED);
    let mut out = Outputs::new(&env, topics::ORDER_SCREENED);
    let fraud = [
        ("ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS", "3".to_string()),
        ("ORDERFLOW_FRAUD_VELOCITY_WINDOW_SECS", "3600".to_string()),
    ];
    // Three customers' stores on each partition, so that both workers have some.
    let stores = stores_on_every_partition(3, env.partitions);
    let customers = stores.len();
    let mut sent_orders = 0;
    let mut send = |from: usize, per: usize, out: &mut Outputs, workers: &[&Worker]| {
        let orders = customer_orders_at("v", &stores, per, from);
        let recs: Vec<Outgoing> = orders.iter().map(TestOrder::outgoing).collect();
        producer.send_all(&created, &recs);
        sent_orders += orders.len();
        let want = sent_orders;
        wait_for(&format!("{want} screened"), deadline(60), workers, |_| {
            out.poll();
            (out.events.len() >= want).then_some(())
        });
    };
    let a = env.spawn_worker(&["fraud"], &fraud);
    send(0, 2, &mut out, &[&a]); // orders 0, 1 of every customer: all on A
    let mut b = env.spawn_worker(&["fraud"], &fraud);
    wait_for_group_members(&env, "fraud", 2, deadline(60));
    // Only once B runs its half (restored, in the group's new generation) may order 2
    // go out, or A could screen all of it before the group moves anything.
    wait_for("B restored its partitions", deadline(60), &[&a, &b], |_| {
        let log = b.log_tail(400);
        let restored = log.matches("state restored").count();
        let a_moved = a
            .log_tail(400)
            .lines()
            .filter(|l| l.contains("assignment partitions="))
            .count()
            >= 2;
        (restored > 0 && a_moved && restored >= b_partitions(&log)).then_some(())
    });
    send(2, 1, &mut out, &[&a, &b]); // order 2: half the partitions on B
    b.kill9();
    // The group gives B's partitions back to A after B's session times out.
    wait_for_group_members(&env, "fraud", 1, deadline(60));
    send(3, 2, &mut out, &[&a]); // orders 3, 4: over the limit of 3 for everyone
    out.drain();
    let mut approved: BTreeMap<String, usize> = BTreeMap::new();
    for e in &out.events {
        if let Event::OrderScreened(s) = e {
            *approved.entry(s.customer_id.clone()).or_default() +=
                usize::from(s.decision == orderflow::events::ScreeningDecision::Approved);
        }
    }
    assert_eq!(approved.len(), customers);
    for (customer, n) in &approved {
        assert_eq!(*n, 3, "{customer}: exactly the first 3 orders are approved");
    }
    // B wrote the changelog of the partitions it held, so A restored them rather than
    // reuse what it had parked: no batch of A's was built on stale state (the commit's
    // own check would withhold such a batch and restore then).
    let log = a.log_tail(100_000);
    assert!(
        !log.contains("another writer appended to the changelog"),
        "A built a batch on parked state that B's writes had made stale; log:\n{}",
        a.log_tail(60)
    );
    assert!(log.contains("restoring state"), "A restored B's partitions");
}

/// Two fraud workers, good orders mixed with garbage and four JSON orders of 0.9–0.99 MB
/// missing a field: each bad record is dead-lettered exactly once (the big ones cut to
/// fit, saying so), and every good order is screened, none stuck behind them.
#[test]
fn records_too_large_to_dead_letter_as_they_are_are_cut_and_block_nothing() {
    let env = TestEnv::new("oversize", 4);
    let producer = env.producer_with_max_bytes(2_000_000);
    let created = env.topic(topics::ORDER_CREATED);
    let mut out = Outputs::new(&env, topics::ORDER_SCREENED);
    let good = customer_orders("good", 200, 10, 0);
    let mut recs: Vec<Outgoing> = Vec::new();
    let mut bad = 0;
    for (i, o) in good.iter().enumerate() {
        recs.push(o.outgoing());
        if i % 2 == 0 {
            recs.push(Outgoing::new(o.store_id.clone(), format!("garbage {i}")));
            bad += 1;
        }
        if i % 500 == 250 {
            let mut v = o.json_value();
            v.as_object_mut().expect("object").remove("items");
            let size = 900_000 + (i / 500) * 30_000;
            v["padding"] = json!("x".repeat(size));
            recs.push(Outgoing::new(
                o.store_id.clone(),
                serde_json::to_vec(&v).expect("JSON"),
            ));
            bad += 1;
        }
    }
    assert_eq!(bad, 1_004);
    let w1 = env.spawn_fraud_worker(&FraudOpts::default());
    let w2 = env.spawn_fraud_worker(&FraudOpts::default());
    producer.send_all(&created, &recs);
    let mut dlq = env.collector(topics::DLQ);
    wait_for(
        "every good order and every dead letter",
        deadline(120),
        &[&w1, &w2],
        |p| {
            out.poll();
            dlq.poll(Duration::from_millis(50));
            *p = format!(
                "{} of {} screened, {} of {bad} dead letters",
                out.events.len(),
                good.len(),
                dlq.records.len()
            );
            (out.events.len() >= good.len() && dlq.records.len() >= bad).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    out.drain();
    dlq.drain();
    assert_eq!(out.events.len(), good.len());
    let sources: HashSet<(String, String)> = dlq
        .records
        .iter()
        .map(|r| {
            (
                r.header_str("orderflow.source.partition")
                    .unwrap_or_default(),
                r.header_str("orderflow.source.offset").unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(dlq.records.len(), bad, "each bad record dead-lettered once");
    assert_eq!(sources.len(), bad);
    let cut: Vec<&Rec> = dlq
        .records
        .iter()
        .filter(|r| r.header("orderflow.truncated.original-bytes").is_some())
        .collect();
    assert_eq!(cut.len(), 4, "the four large records are cut to fit");
    for r in cut {
        let original: usize = r
            .header_str("orderflow.truncated.original-bytes")
            .and_then(|v| v.parse().ok())
            .expect("original size");
        assert!(original > 900_000);
        assert!(r.value.as_ref().map_or(0, Vec::len) < original);
        assert_eq!(
            r.header_str("orderflow.error.class").as_deref(),
            Some("invalid")
        );
    }
}

/// Gives a topic a `max.message.bytes` of its own: deletes it and creates it again with
/// the limit (the broker takes topic configs at creation).
fn limit_topic(env: &TestEnv, topic: &str, partitions: i32, bytes: usize) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.settings.brokers)
        .create()
        .expect("an admin client");
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    for r in futures::executor::block_on(admin.delete_topics(&[topic], &opts))
        .expect("delete topics answered")
    {
        r.unwrap_or_else(|(t, code)| panic!("deleting {t}: {code}"));
    }
    let limit = bytes.to_string();
    let new = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("max.message.bytes", &limit);
    let until = Instant::now() + Duration::from_secs(30);
    loop {
        let r = futures::executor::block_on(admin.create_topics([&new], &opts))
            .expect("create topics answered");
        match r.into_iter().next().expect("one result") {
            Ok(_) => return,
            Err((_, rdkafka::types::RDKafkaErrorCode::TopicAlreadyExists))
                if Instant::now() < until =>
            {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err((t, code)) => panic!("creating {t} with max.message.bytes {bytes}: {code}"),
        }
    }
}

/// An output the broker refuses for good — it fits `max_record_bytes`, but its topic
/// takes smaller records — is dead-lettered in its place, once, cut to fit and saying
/// where it was going; the changelog and every other output go on, nothing is stuck.
/// The broker checks its limit on whole batches, so the small outputs batched with a
/// large one are refused with it: they must still arrive, not be dead-lettered.
#[test]
fn an_output_the_broker_refuses_is_dead_lettered_once_and_blocks_nothing() {
    refused_outputs(TestEnv::new("refused", 4));
}

/// The same under `exactly_once`: a refused output aborts the transaction; the next
/// attempt sends it alone, and the one after dead-letters it within the transaction.
/// The transactional test broker ignores topic size limits, so here the worker's own
/// producer refuses (`message.max.bytes` of 40 kB): the refusal comes at once instead
/// of with the batch, and the path from refusal to dead letter is the same.
#[test]
fn exactly_once_an_output_refused_for_good_is_dead_lettered_once_and_blocks_nothing() {
    refused_outputs(TestEnv::exactly_once("txn-refused", 4));
}

fn refused_outputs(env: TestEnv) {
    let exactly_once = env.settings.guarantee == orderflow::config::Guarantee::ExactlyOnce;
    let screened = env.topic(topics::ORDER_SCREENED);
    let worker_env = [("ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS", "1000".to_owned())];
    let producer_limit = if exactly_once {
        "message.max.bytes=40000"
    } else {
        limit_topic(&env, &screened, env.partitions, 40_000);
        ""
    };
    let producer = env.producer();
    let created = env.topic(topics::ORDER_CREATED);
    // The transactional test broker shows aborted records too (a refusal aborts a
    // transaction whose other outputs may be out already): contents are judged on what a
    // read_committed reader of a correct broker sees, after `as_committed`.
    let mut out = if exactly_once {
        Outputs::collecting(&env, topics::ORDER_SCREENED)
    } else {
        Outputs::new(&env, topics::ORDER_SCREENED)
    };
    let mut dlq = env.collector(topics::DLQ);
    let good = customer_orders("fine", 40, 5, 0);
    let mut recs: Vec<Outgoing> = good.iter().map(TestOrder::outgoing).collect();
    // Three valid orders whose screening (with every line) takes about 60 kB.
    let big: Vec<String> = (0..3).map(|i| format!("big-{i}")).collect();
    for (i, id) in big.iter().enumerate() {
        let o = TestOrder::new(
            id.clone(),
            good[i * 7].store_id.clone(),
            format!("c-big-{i}"),
            now_ms(),
        );
        let mut v = o.json_value();
        v["items"] = json!(
            (0..1_000)
                .map(|n| json!({"sku": format!("SKU-{n:04}-{}", "x".repeat(40)), "quantity": 1, "unit_price_cents": 1}))
                .collect::<Vec<_>>()
        );
        recs.insert(
            i * 60 + 10,
            Outgoing::new(o.store_id.clone(), serde_json::to_vec(&v).expect("JSON")),
        );
    }
    let w = env.spawn_worker_with_kafka(&["fraud"], &worker_env, producer_limit);
    producer.send_all(&created, &recs);
    wait_for(
        "every good order and every refused output",
        deadline(120),
        &[&w],
        |p| {
            out.poll();
            dlq.poll(Duration::from_millis(50));
            *p = format!(
                "{} of {} screened, {} of {} dead letters",
                out.events.len(),
                good.len(),
                dlq.records.len(),
                big.len()
            );
            (out.events.len() >= good.len() && dlq.records.len() >= big.len()).then_some(())
        },
    );
    std::thread::sleep(Duration::from_secs(2));
    out.drain();
    dlq.drain();
    if exactly_once {
        // What a read_committed reader of a correct broker sees (see `common::txn_broker`).
        let (_aborted, open) = out.as_committed(&env.settings.brokers, env.partitions);
        assert_eq!(open, 0, "transactions still open");
    }
    out.assert_one_content("refused outputs");
    assert_eq!(
        out.events.len(),
        good.len(),
        "every good order screened once"
    );
    assert_eq!(
        dlq.records.len(),
        big.len(),
        "each refused output dead-lettered once"
    );
    let codec = Codec::new();
    let mut refused: Vec<String> = Vec::new();
    for r in &dlq.records {
        assert_eq!(
            r.header_str("orderflow.error.class").as_deref(),
            Some("refused")
        );
        assert_eq!(
            r.header_str("orderflow.target.topic").as_deref(),
            Some(screened.as_str())
        );
        let value = r.value.clone().expect("a dead letter has a value");
        assert!(value.len() < 64 * 1024, "cut to fit: {} bytes", value.len());
        match codec.decode(&value, DecodeHints::default()) {
            Ok(Event::OrderScreened(s)) => {
                refused.push(s.envelope.order_id.clone().unwrap_or_default())
            }
            // Cut: the event no longer decodes; the header says how large it was.
            _ => {
                let original: usize = r
                    .header_str("orderflow.truncated.original-bytes")
                    .and_then(|v| v.parse().ok())
                    .expect("a dead letter that does not decode was cut, and says so");
                assert!(original > 40_000, "{original}");
                // The output's own headers come along: its flow names the order.
                refused.push(r.header_str("correlation-id").unwrap_or_default());
            }
        }
    }
    assert!(
        w.log_tail(400)
            .contains("the broker refused an output for good"),
        "the worker's log:\n{}",
        w.log_tail(40)
    );
    refused.sort();
    assert_eq!(
        refused, big,
        "exactly the large orders' screenings are refused"
    );
    eprintln!("refused outputs dead-lettered: {refused:?}");
}

/// An input whose output cannot be produced (here: larger than `max_record_bytes`) is
/// dead-lettered, and its state change goes with it: the stock it would have reserved is
/// still there.
#[test]
fn an_unproducible_output_takes_its_inputs_state_change_with_it() {
    let env = TestEnv::new("unproducible", 2);
    let producer = env.producer();
    let commands = env.topic(topics::INVENTORY_COMMANDS);
    let screened_topic = env.topic(topics::ORDER_SCREENED);
    let mut out = Outputs::new(&env, topics::INVENTORY_UPDATED);
    producer.send(&commands, &restock(STORE, "SKU-A", 100));
    let lines: Vec<(String, i32)> = (0..60).map(|i| (format!("SKU-A-{i:02}"), 1)).collect();
    for (sku, _) in &lines {
        producer.send(&commands, &restock(STORE, sku, 10));
    }
    let items: Vec<(&str, i32)> = lines.iter().map(|(s, q)| (s.as_str(), *q)).collect();
    producer.send(&screened_topic, &screened(STORE, "o-big", &items));
    producer.send(
        &screened_topic,
        &screened(STORE, "o-small", &[("SKU-A", 2)]),
    );
    let w = env.spawn_worker(
        &["inventory"],
        &[("ORDERFLOW_MAX_RECORD_BYTES", "600".into())],
    );
    let mut dlq = env.collector(topics::DLQ);
    wait_for(
        "o-small decided and o-big dead-lettered",
        deadline(60),
        &[&w],
        |_| {
            out.poll();
            dlq.poll(Duration::from_millis(50));
            (out.of_order("o-small").contains(&EventType::StockReserved) && !dlq.records.is_empty())
                .then_some(())
        },
    );
    producer.send(&commands, &probe(STORE, "SKU-A-00", "probe"));
    let level = wait_for("probe", deadline(60), &[&w], |_| {
        out.poll();
        out.probed("SKU-A-00", "probe")
    });
    assert_eq!(level, 10, "o-big's reservation was undone with its output");
    assert!(
        out.of_order("o-big").is_empty(),
        "{:?}",
        out.of_order("o-big")
    );
    dlq.drain();
    assert_eq!(dlq.records.len(), 1);
    assert_eq!(
        dlq.records[0]
            .header_str("orderflow.error.class")
            .as_deref(),
        Some("too_large")
    );
}

/// A partition whose input cannot be positioned after its restore is restored again,
/// never read on from wherever the consumer happened to be: no order is skipped.
#[test]
fn a_failed_seek_restores_the_partition_again_and_skips_nothing() {
    let env = TestEnv::new("seek", 2);
    let producer = env.producer();
    let created = env.topic(topics::ORDER_CREATED);
    let mut out = Outputs::new(&env, topics::ORDER_SCREENED);
    let orders = customer_orders("seek", 20, 5, 0);
    let recs: Vec<Outgoing> = orders.iter().map(TestOrder::outgoing).collect();
    producer.send_all(&created, &recs);
    let mut first = env.spawn_fraud_worker(&FraudOpts::default());
    wait_for("some orders screened", deadline(60), &[&first], |_| {
        out.poll();
        (out.events.len() >= 20).then_some(())
    });
    first.kill9();
    // Input waiting when the next worker restores: its consumer fetches some while the
    // state is read, so it has to be moved back — and the first moves fail.
    let more = customer_orders("seek-more", 20, 5, 0);
    let recs: Vec<Outgoing> = more.iter().map(TestOrder::outgoing).collect();
    producer.send_all(&created, &recs);
    let orders: Vec<TestOrder> = orders.into_iter().chain(more).collect();
    let w = env.spawn_worker(
        &["fraud"],
        &[
            ("ORDERFLOW_FAIL_SEEKS", "3".into()),
            ("ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS", "1000".into()),
        ],
    );
    wait_for("every order screened", deadline(60), &[&w], |p| {
        out.poll();
        *p = format!("{} of {}", out.events.len(), orders.len());
        (out.events.len() >= orders.len()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(1));
    out.drain();
    assert_eq!(out.events.len(), orders.len());
    assert!(
        w.log_tail(400).contains("cannot position the input"),
        "the injected seek failures were hit"
    );
}

/// A restore that takes longer than `max.poll.interval.ms` runs beside the loop, which
/// keeps polling: the worker never leaves its group, and once the state is in, the input
/// flows. (A restore inside the poll loop would be expelled, rejoin, restore again: a
/// livelock.)
#[test]
fn a_restore_longer_than_the_poll_interval_keeps_the_worker_in_its_group() {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    let env = TestEnv::new("slow-restore", 1);
    let changelog = env.topics().changelog("fraud");
    wait_for_partitions(&changelog, 1);
    // A long changelog: 300,000 dedup-window records of an earlier writer, committed.
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.settings.brokers)
        .set("linger.ms", "20")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer");
    const RECORDS: usize = 300_000;
    let headers = || {
        OwnedHeaders::new()
            .insert(Header {
                key: "orderflow.seq",
                value: Some("1"),
            })
            .insert(Header {
                key: "orderflow.gen",
                value: Some("7"),
            })
    };
    let started = Instant::now();
    let mut pending = Vec::with_capacity(RECORDS + 1);
    for i in 0..RECORDS {
        let key = format!("d/{}", 1_000_000 + i);
        pending.push(
            producer
                .send_result(
                    FutureRecord::to(&changelog)
                        .partition(0)
                        .key(&key)
                        .payload(&[] as &[u8])
                        .headers(headers()),
                )
                .map_err(|(e, _)| e)
                .expect("enqueue"),
        );
    }
    let marker = format!("1:{RECORDS}");
    pending.push(
        producer
            .send_result(
                FutureRecord::to(&changelog)
                    .partition(0)
                    .key("commit/7")
                    .payload(marker.as_bytes())
                    .headers(headers()),
            )
            .map_err(|(e, _)| e)
            .expect("enqueue"),
    );
    for f in pending {
        block_on(f).expect("delivery").expect("delivered");
    }
    eprintln!(
        "wrote {} changelog records in {:.1}s",
        RECORDS + 1,
        started.elapsed().as_secs_f64()
    );

    let orders = customer_orders("after-restore", 5, 4, 0);
    let recs: Vec<Outgoing> = orders.iter().map(TestOrder::outgoing).collect();
    env.producer()
        .send_all(&env.topic(topics::ORDER_CREATED), &recs);
    let poll_ms = 2_000;
    let w = env.spawn_worker_with_kafka(
        &["fraud"],
        &[("ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS", "1000".into())],
        &format!(
            "session.timeout.ms=1000,heartbeat.interval.ms=300,max.poll.interval.ms={poll_ms}"
        ),
    );
    let mut out = Outputs::new(&env, topics::ORDER_SCREENED);
    wait_for("every order screened", deadline(180), &[&w], |p| {
        out.poll();
        *p = format!("{} of {}", out.events.len(), orders.len());
        (out.events.len() >= orders.len()).then_some(())
    });
    let log = std::fs::read_to_string(&w.log_path).expect("worker log");
    let restore_ms: u64 = log
        .lines()
        .filter(|l| l.contains("state restored"))
        .filter_map(|l| {
            l.split("elapsed_ms=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse()
                .ok()
        })
        .max()
        .expect("a restore was logged");
    eprintln!("restore took {restore_ms} ms; max.poll.interval.ms = {poll_ms}");
    assert!(
        restore_ms > poll_ms,
        "the restore ({restore_ms} ms) must outlast max.poll.interval.ms ({poll_ms}) for this test to mean anything"
    );
    assert!(
        !log.contains("MAXPOLL") && !log.contains("leaving group"),
        "the worker left its group during the restore:\n{}",
        w.log_tail(40)
    );
    assert_eq!(
        log.lines()
            .filter(|l| l.contains("restoring state"))
            .count(),
        1,
        "one restore, never started over"
    );
    out.drain();
    assert_eq!(out.events.len(), orders.len());
}
