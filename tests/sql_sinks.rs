//! The SQL sinks below the runtime: views turn events into row operations and
//! `orderflow::sql` commits them with their offsets — against both backends, every test
//! once on SQLite (a file in a temporary directory) and once on the PostgreSQL server of
//! `scripts/test.sh` (a database of its own, so tests run in parallel).
//!
//! Asserted with exact rows and counts: migrations apply twice; a whole order lifecycle
//! projects to its row and timeline; a replayed batch changes nothing; a fenced epoch's
//! commit changes nothing; stats equal a recomputation from the projected events for
//! generated orders delivered in shuffled order; the low-stock alert opens once, counts
//! repeats, is acknowledged, resolves on the SKU's StockRecovered (stock levels alone
//! resolve nothing) and publishes one replenishment request per opening; the other alert
//! rules open and resolve as documented.
//!
//! Without `ORDERFLOW_TEST_POSTGRES_URL` every test fails (it never skips).

mod common;

use std::collections::BTreeMap;

use common::lifecycle::{level, lifecycle, low_stock, recovered};
use common::postgres::TestDatabase;
use orderflow::config::AlertSettings;
use orderflow::events::*;
use orderflow::sql::read::AlertStatus;
use orderflow::sql::{Backend, Db, Disposition, Position, SqlError};
use orderflow::status::OrderStatus;
use orderflow::topics;
use orderflow::views::{AlertKind, DeadLetter, Effects, Input, Sink, Span, View, minute};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;

/// A migrated database and what keeps it alive.
struct TestDb {
    db: Db,
    label: &'static str,
    _sqlite_dir: Option<tempfile::TempDir>,
    _postgres: Option<TestDatabase>,
}

/// One database per backend, migrated.
async fn databases(prefix: &str) -> Result<Vec<TestDb>, Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("orderflow.db").display());
    let sqlite = Db::connect(&url).await?;
    sqlite.migrate().await?;
    let pg = TestDatabase::create(prefix);
    let postgres = Db::connect(&pg.url).await?;
    postgres.migrate().await?;
    assert_eq!(sqlite.backend(), Backend::Sqlite);
    assert_eq!(postgres.backend(), Backend::Postgres);
    Ok(vec![
        TestDb {
            db: sqlite,
            label: "sqlite",
            _sqlite_dir: Some(dir),
            _postgres: None,
        },
        TestDb {
            db: postgres,
            label: "postgres",
            _sqlite_dir: None,
            _postgres: Some(pg),
        },
    ])
}

fn effects(view: &View, events: &[(&str, Event)]) -> Vec<Effects> {
    events
        .iter()
        .filter_map(|(topic, event)| view.effects(Input::Event { topic, event }))
        .collect()
}

fn view(sink: Sink) -> View {
    View::new(sink, AlertSettings::default())
}

/// Claims one partition of `sink`, returning a position factory at that epoch.
async fn claim(db: &Db, sink: Sink, topic: &str) -> Result<i64, SqlError> {
    Ok(db.claim(sink, topic, 0).await?.epoch)
}

fn at(topic: &str, epoch: i64, next_offset: i64) -> Vec<Position> {
    vec![Position {
        topic: topic.into(),
        partition: 0,
        epoch,
        next_offset,
    }]
}

// ---------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn migrations_apply_twice() -> TestResult {
    for t in databases("sinks_migrate").await? {
        // `databases` migrated once already.
        t.db.migrate().await?;
        t.db.migrate().await?;
        let claim = t.db.claim(Sink::Stats, "order.created", 3).await?;
        assert_eq!((claim.epoch, claim.next_offset), (1, None), "{}", t.label);
        t.db.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_whole_lifecycle_projects_to_its_order_and_timeline() -> TestResult {
    for t in databases("sinks_lifecycle").await? {
        let db = &t.db;
        let events = lifecycle("s-1", "o-1", 0, T0, 1_000);
        let epoch = claim(db, Sink::Projector, "all").await?;
        // Two batches, the second with the delivery before the carrier scan that preceded
        // it (topics are not ordered with each other).
        let mut late = events[8..].to_vec();
        late.reverse();
        let first = db
            .commit(
                Sink::Projector,
                &at("all", epoch, 8),
                &effects(&view(Sink::Projector), &events[..8]),
            )
            .await?;
        let second = db
            .commit(
                Sink::Projector,
                &at("all", epoch, 12),
                &effects(&view(Sink::Projector), &late),
            )
            .await?;
        assert_eq!(
            (first.applied, second.applied, first.duplicates),
            (8, 2, 0),
            "{}",
            t.label
        );
        let got = db.order("s-1", "o-1").await?.ok_or("no order")?;
        let o = &got.order;
        assert_eq!(o.status, Some(OrderStatus::Delivered), "{}", t.label);
        assert_eq!(o.customer_id.as_deref(), Some("c-o-1"));
        assert_eq!(
            (o.total_cents, o.currency.as_deref()),
            (Some(2_500), Some("EUR"))
        );
        assert_eq!(
            (
                o.created_at,
                o.screened_at,
                o.reserved_at,
                o.paid_at,
                o.shipped_at,
                o.delivered_at
            ),
            (
                Some(T0),
                Some(T0 + 1_000),
                Some(T0 + 2_000),
                Some(T0 + 3_000),
                Some(T0 + 7_000),
                Some(T0 + 9_000)
            ),
            "{}",
            t.label
        );
        assert_eq!(
            (o.rejected_at, o.cancelled_at, o.refunded_at),
            (None, None, None)
        );
        // The latest by occurrence, although it was applied first in its batch.
        assert_eq!(
            (o.last_event_type.as_str(), o.last_event_at),
            ("Delivered", T0 + 9_000)
        );
        let types: Vec<&str> = got.timeline.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(
            types,
            [
                "OrderCreated",
                "OrderScreened",
                "StockReserved",
                "PaymentAuthorized",
                "Picking",
                "Packed",
                "ReadyToShip",
                "Shipped",
                "CarrierScan",
                "Delivered"
            ],
            "{}",
            t.label
        );
        let stages: Vec<&str> = got.timeline.iter().map(|e| e.stage.as_str()).collect();
        assert_eq!(
            stages,
            [
                "producer",
                "fraud",
                "inventory",
                "payment",
                "fulfillment",
                "fulfillment",
                "fulfillment",
                "delivery",
                "carrier",
                "delivery"
            ]
        );
        let payload = &got.timeline[3].payload;
        assert_eq!(
            Event::from_json_value(EventType::PaymentAuthorized, payload.clone())?,
            events[3].1
        );
        assert_eq!(got.timeline[3].topic, "payment.processed");
        // Another store sees nothing of it.
        assert_eq!(db.order("s-2", "o-1").await?, None);
        let page = db.orders("s-1", Some("delivered"), None, 10).await?;
        assert_eq!(page.items.len(), 1);
        assert_eq!(
            db.orders("s-1", Some("paid"), None, 10).await?.items,
            vec![]
        );
        assert_eq!(
            db.orders_per_status("s-1").await?,
            vec![("delivered".to_owned(), 1)]
        );
        db.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn orders_page_by_key() -> TestResult {
    for t in databases("sinks_pages").await? {
        let db = &t.db;
        let epoch = claim(db, Sink::Projector, "all").await?;
        let mut events = Vec::new();
        for n in 0..5 {
            events.extend(lifecycle("s-1", &format!("o-{n}"), 1, T0, 10));
        }
        events.extend(lifecycle("s-2", "o-9", 1, T0, 10));
        db.commit(
            Sink::Projector,
            &at("all", epoch, 1),
            &effects(&view(Sink::Projector), &events),
        )
        .await?;
        let first = db.orders("s-1", Some("rejected"), None, 2).await?;
        let ids: Vec<&str> = first.items.iter().map(|o| o.order_id.as_str()).collect();
        assert_eq!(
            (ids, first.next.as_deref()),
            (vec!["o-0", "o-1"], Some("o-1"))
        );
        let second = db.orders("s-1", None, first.next.as_deref(), 2).await?;
        let third = db.orders("s-1", None, second.next.as_deref(), 2).await?;
        let ids: Vec<&str> = third.items.iter().map(|o| o.order_id.as_str()).collect();
        assert_eq!((ids, third.next), (vec!["o-4"], None), "{}", t.label);
        assert_eq!(
            first.items[0].status,
            Some(OrderStatus::Rejected(
                orderflow::status::RejectionReason::Fraud
            ))
        );
        db.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_replayed_batch_changes_nothing() -> TestResult {
    for t in databases("sinks_replay").await? {
        let db = &t.db;
        let events = lifecycle("s-1", "o-1", 4, T0, 20_000);
        for sink in [Sink::Projector, Sink::Stats] {
            let epoch = claim(db, sink, "all").await?;
            let batch = effects(&view(sink), &events);
            let n = batch.len();
            let first = db.commit(sink, &at("all", epoch, 10), &batch).await?;
            assert_eq!((first.applied, first.duplicates), (n, 0), "{sink}");
            let order = db.order("s-1", "o-1").await?;
            let stats = db.stats("s-1", T0, T0 + 3_600_000).await?;
            let durations = db
                .durations("s-1", Span::PaidToShipped, T0, T0 + 3_600_000)
                .await?;
            // The same events again, as a replay or an upstream re-send would bring them.
            let again = db.commit(sink, &at("all", epoch, 20), &batch).await?;
            assert_eq!(
                (again.applied, again.duplicates),
                (0, n),
                "{sink} {}",
                t.label
            );
            assert_eq!(db.order("s-1", "o-1").await?, order);
            assert_eq!(db.stats("s-1", T0, T0 + 3_600_000).await?, stats);
            assert_eq!(
                db.durations("s-1", Span::PaidToShipped, T0, T0 + 3_600_000)
                    .await?,
                durations
            );
        }
        let order = db.order("s-1", "o-1").await?.ok_or("no order")?;
        assert_eq!(order.order.status, Some(OrderStatus::Refunded));
        assert_eq!(order.timeline.len(), events.len());
        let stats = db.stats("s-1", T0, T0 + 3_600_000).await?;
        let total = |c| stats.iter().map(|m| m.get(c)).sum::<i64>();
        use orderflow::views::Counter as C;
        assert_eq!(
            (
                total(C::OrdersCreated),
                total(C::Refunds),
                total(C::Shipped),
                total(C::DeliveryFailures),
                total(C::Delivered)
            ),
            (1, 1, 1, 1, 0),
            "{}",
            t.label
        );
        db.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_fenced_epoch_commits_nothing() -> TestResult {
    for t in databases("sinks_fenced").await? {
        let db = &t.db;
        let events = lifecycle("s-1", "o-1", 0, T0, 1_000);
        let old = claim(db, Sink::Projector, "order.created").await?;
        let new = db.claim(Sink::Projector, "order.created", 0).await?;
        assert_eq!(
            (old, new.epoch, new.next_offset),
            (1, 2, None),
            "{}",
            t.label
        );
        let batch = effects(&view(Sink::Projector), &events);
        let err = db
            .commit(Sink::Projector, &at("order.created", old, 5), &batch)
            .await
            .err()
            .ok_or("a stale epoch committed")?;
        assert!(
            matches!(
                &err,
                SqlError::Fenced {
                    epoch: 1,
                    partition: 0,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(err.disposition(), Disposition::Fenced);
        assert_eq!(db.order("s-1", "o-1").await?, None, "{}", t.label);
        // Its position did not move either: the next claim resumes where the holder did.
        let ok = db
            .commit(Sink::Projector, &at("order.created", new.epoch, 7), &batch)
            .await?;
        assert_eq!(ok.applied, events.len());
        let after = db.claim(Sink::Projector, "order.created", 0).await?;
        assert_eq!((after.epoch, after.next_offset), (3, Some(7)));
        // A fenced commit of several partitions rolls back the ones it had advanced.
        let p1 = db.claim(Sink::Projector, "order.screened", 0).await?;
        let both = vec![
            Position {
                topic: "order.screened".into(),
                partition: 0,
                epoch: p1.epoch,
                next_offset: 50,
            },
            Position {
                topic: "order.created".into(),
                partition: 0,
                epoch: new.epoch,
                next_offset: 60,
            },
        ];
        let err = db.commit(Sink::Projector, &both, &[]).await.err();
        assert!(matches!(err, Some(SqlError::Fenced { .. })), "{err:?}");
        let p1_again = db.claim(Sink::Projector, "order.screened", 0).await?;
        assert_eq!(p1_again.next_offset, None, "{}", t.label);
        db.close().await;
    }
    Ok(())
}

/// A small deterministic generator (xorshift), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[tokio::test]
async fn stats_equal_a_recomputation_from_the_projected_events() -> TestResult {
    for t in databases("sinks_stats").await? {
        let db = &t.db;
        let mut rng = Rng(0x5eed_1234_abcd_0001);
        let mut events = Vec::new();
        let mut orders = Vec::new();
        for n in 0..60 {
            let store = if n % 3 == 0 { "s-a" } else { "s-b" };
            let order = format!("o-{n}");
            let start = T0 + rng.below(10 * 60_000) as i64;
            let step = 1 + rng.below(40_000) as i64;
            let outcome = rng.below(5) as u8;
            events.extend(lifecycle(store, &order, outcome, start, step));
            orders.push((store, order));
        }
        // Shuffled: the sinks read several topics that are not ordered with each other.
        for i in (1..events.len()).rev() {
            let j = rng.below(i as u64 + 1) as usize;
            events.swap(i, j);
        }
        for sink in [Sink::Projector, Sink::Stats] {
            let epoch = claim(db, sink, "all").await?;
            for (k, chunk) in events.chunks(37).enumerate() {
                db.commit(
                    sink,
                    &at("all", epoch, k as i64),
                    &effects(&view(sink), chunk),
                )
                .await?;
            }
        }

        // Recompute from the timeline rows (order_events) and the orders rows.
        type Key = (String, i64, &'static str);
        let mut counters: BTreeMap<Key, i64> = BTreeMap::new();
        let mut revenue: BTreeMap<(String, i64), i64> = BTreeMap::new();
        let mut spans: BTreeMap<(String, i64, &'static str), (i64, i64)> = BTreeMap::new();
        for (store, order) in &orders {
            let got = db.order(store, order).await?.ok_or("order missing")?;
            for e in &got.timeline {
                let bucket = minute(e.occurred_at);
                let column = match e.event_type.as_str() {
                    "OrderCreated" => Some("orders_created"),
                    "OrderScreened" if e.payload["decision"] == "rejected" => {
                        Some("orders_rejected")
                    }
                    "StockRejected" => Some("stock_rejections"),
                    "PaymentAuthorized" => Some("payments_authorized"),
                    "PaymentFailed" => Some("payments_failed"),
                    "PaymentRetrying" => Some("payments_retried"),
                    "PaymentRefunded" => Some("refunds"),
                    "Shipped" => Some("shipped"),
                    "Delivered" => Some("delivered"),
                    "DeliveryFailed" => Some("delivery_failures"),
                    _ => None,
                };
                if let Some(c) = column {
                    *counters.entry((store.to_string(), bucket, c)).or_default() += 1;
                }
                if e.event_type == "PaymentAuthorized" {
                    *revenue.entry((store.to_string(), bucket)).or_default() +=
                        e.payload["amount_cents"].as_i64().ok_or("amount")?;
                }
            }
            let o = &got.order;
            for (name, from, to) in [
                ("created_to_paid", o.created_at, o.paid_at),
                ("paid_to_shipped", o.paid_at, o.shipped_at),
                ("created_to_delivered", o.created_at, o.delivered_at),
            ] {
                if let (Some(from), Some(to)) = (from, to) {
                    let s = spans
                        .entry((store.to_string(), minute(to), name))
                        .or_default();
                    s.0 += 1;
                    s.1 += to - from;
                }
            }
        }
        assert_eq!(
            counters.values().sum::<i64>(),
            events
                .iter()
                .filter(|(_, e)| orderflow::views::Counter::of(e).is_some())
                .count() as i64,
            "{}",
            t.label
        );

        let mut stored: BTreeMap<Key, i64> = BTreeMap::new();
        let mut stored_revenue: BTreeMap<(String, i64), i64> = BTreeMap::new();
        let mut stored_spans: BTreeMap<(String, i64, &'static str), (i64, i64)> = BTreeMap::new();
        for store in ["s-a", "s-b"] {
            for m in db.stats(store, T0 - 60_000, T0 + 3_600_000).await? {
                for (c, v) in &m.counters {
                    if *v != 0 {
                        stored.insert((store.to_string(), m.time, c.column()), *v);
                    }
                }
                for (currency, cents, refunded) in
                    db.revenue(store, m.time, m.time + 60_000).await?
                {
                    assert_eq!((currency.as_str(), refunded >= 0), ("EUR", true));
                    if cents != 0 {
                        stored_revenue.insert((store.to_string(), m.time), cents);
                    }
                }
            }
            let mut bucket = T0;
            while bucket < T0 + 3_600_000 {
                for &span in Span::ALL {
                    let d = db.durations(store, span, bucket, bucket + 60_000).await?;
                    let in_buckets: i64 = d.buckets.iter().map(|(_, n)| n).sum();
                    assert_eq!(in_buckets, d.count);
                    if d.count > 0 {
                        stored_spans.insert(
                            (store.to_string(), bucket, span.name()),
                            (d.count, d.sum_ms),
                        );
                    }
                }
                bucket += 60_000;
            }
        }
        assert_eq!(stored, counters, "{}", t.label);
        assert_eq!(stored_revenue, revenue, "{}", t.label);
        assert_eq!(stored_spans, spans, "{}", t.label);
        assert!(!spans.is_empty());
        db.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn a_low_stock_alert_opens_once_and_resolves_when_the_stock_recovers() -> TestResult {
    for t in databases("sinks_low_stock").await? {
        let db = &t.db;
        let sink = Sink::Alerts;
        let v = view(sink);
        let epoch = claim(db, sink, "inventory").await?;
        let commit = |events: Vec<Event>, offset: i64| {
            let batch: Vec<Effects> = events
                .iter()
                .filter_map(|event| {
                    v.effects(Input::Event {
                        topic: topics::topic_of(event.event_type()),
                        event,
                    })
                })
                .collect();
            async move {
                db.commit(sink, &at("inventory", epoch, offset), &batch)
                    .await
            }
        };

        let first = commit(vec![low_stock("low-1", "s-1", 2, 5, T0)], 1).await?;
        assert_eq!(first.publish.len(), 1, "{}", t.label);
        let Event::ReplenishmentRequested(r) = &first.publish[0] else {
            return Err(format!("published {:?}", first.publish).into());
        };
        assert_eq!(
            (r.sku.as_str(), r.quantity, r.available, r.threshold),
            ("sku-1", 100, 2, 5)
        );
        assert_eq!(r.envelope.causation_id.as_deref(), Some("low-1"));
        assert_eq!(db.outbox(sink).await?, first.publish);

        // A second crossing (and a watchdog report) while it is open: counted, no new
        // alert, nothing published.
        let repeat = commit(
            vec![
                low_stock("low-2", "s-1", 1, 5, T0 + 1_000),
                low_stock("low-3", "s-1", 1, 5, T0 + 2_000),
            ],
            3,
        )
        .await?;
        assert_eq!((repeat.applied, repeat.publish.len()), (2, 0));
        let alerts = db.alerts("s-1", None, 10).await?;
        assert_eq!(alerts.len(), 1, "{}", t.label);
        let a = &alerts[0];
        assert_eq!(
            (
                a.kind,
                a.subject.as_str(),
                a.status,
                a.occurrences,
                a.opened_at,
                a.last_seen_at
            ),
            (
                AlertKind::LowStock,
                "sku-1",
                AlertStatus::Open,
                3,
                T0,
                T0 + 2_000
            )
        );
        assert_eq!(a.detail["available"], 1);
        let low = db.stock_levels("s-1", true).await?;
        assert_eq!(
            low.iter()
                .map(|l| (l.sku.as_str(), l.available, l.threshold))
                .collect::<Vec<_>>(),
            vec![("sku-1", Some(1), Some(5))]
        );

        // Acknowledged: still active, a repeat still counts into it.
        let acked = db.acknowledge("s-1", a.id).await?;
        assert_eq!(acked.status, AlertStatus::Acknowledged);
        assert!(acked.acknowledged_at.is_some());
        assert_eq!(
            db.acknowledge("s-1", a.id).await?.status,
            AlertStatus::Acknowledged
        );
        let unknown = db.acknowledge("s-2", a.id).await.err();
        assert!(
            matches!(unknown, Some(SqlError::UnknownAlert { id, .. }) if id == a.id),
            "{unknown:?}"
        );
        let missing = db.resolve("s-1", a.id + 1_000).await.err();
        assert!(
            matches!(missing, Some(SqlError::UnknownAlert { .. })),
            "{missing:?}"
        );
        let repeat = commit(vec![low_stock("low-4", "s-1", 0, 5, T0 + 3_000)], 4).await?;
        assert_eq!(repeat.publish.len(), 0);

        // Stock reports fill the stock table and leave the alert alone: the inventory
        // stage says when the spell is over, and its report resolves the alert.
        commit(vec![level("lvl-1", "s-1", 30, T0 + 4_000)], 5).await?;
        assert_eq!(
            db.alerts("s-1", Some(AlertStatus::Acknowledged), 10)
                .await?
                .len(),
            1
        );
        assert_eq!(db.stock_levels("s-1", true).await?, vec![]);
        commit(vec![recovered("rec-1", "s-1", 30, 5, T0 + 4_000)], 6).await?;
        let resolved = db.alerts("s-1", Some(AlertStatus::Resolved), 10).await?;
        assert_eq!(resolved.len(), 1, "{}", t.label);
        assert_eq!(
            (
                resolved[0].id,
                resolved[0].occurrences,
                resolved[0].resolved_at
            ),
            (a.id, 4, Some(T0 + 4_000))
        );
        let again = db.resolve("s-1", a.id).await.err();
        assert!(
            matches!(again, Some(SqlError::AlreadyResolved { id }) if id == a.id),
            "{again:?}"
        );
        assert_eq!(
            db.acknowledge("s-1", a.id)
                .await
                .err()
                .map(|e| e.to_string()),
            Some(format!("alert {} is already resolved", a.id))
        );

        // A new low spell opens a new alert and publishes again, once — whatever time it
        // carries: the order of the SKU's reports on their topic decides, so every reader
        // finds the same episodes. The replayed first report does nothing.
        let reopened = commit(
            vec![
                low_stock("low-5", "s-1", 4, 5, T0 + 3_500),
                low_stock("low-1", "s-1", 2, 5, T0),
            ],
            8,
        )
        .await?;
        assert_eq!((reopened.applied, reopened.duplicates), (1, 1));
        assert_eq!(reopened.publish.len(), 1, "{}", t.label);
        let all = db.alerts("s-1", None, 10).await?;
        assert_eq!(
            all.iter().map(|a| a.status).collect::<Vec<_>>(),
            vec![AlertStatus::Open, AlertStatus::Resolved]
        );
        assert_ne!(all[0].id, a.id);

        // The outbox holds both requests until they are produced.
        let pending = db.outbox(sink).await?;
        assert_eq!(pending.len(), 2);
        let ids: Vec<&str> = pending
            .iter()
            .map(|e| e.envelope().event_id.as_str())
            .collect();
        assert_eq!(db.outbox_done(sink, &ids).await?, 2);
        assert_eq!(db.outbox(sink).await?, vec![]);

        // A recovery carrying an earlier time than the spell's last report still ends
        // it (never resolved before it was last seen).
        commit(vec![recovered("rec-2", "s-1", 9, 5, T0 + 3_000)], 9).await?;
        let all = db.alerts("s-1", None, 10).await?;
        assert_eq!(
            all.iter()
                .map(|a| (a.status, a.resolved_at))
                .collect::<Vec<_>>(),
            vec![
                (AlertStatus::Resolved, Some(T0 + 3_500)),
                (AlertStatus::Resolved, Some(T0 + 4_000))
            ]
        );
        let open = commit(vec![low_stock("low-6", "s-1", 1, 5, T0 + 20_000)], 10).await?;
        assert_eq!(open.publish.len(), 1);
        let all = db.alerts("s-1", Some(AlertStatus::Open), 10).await?;
        assert_eq!(all.len(), 1);

        // Operator resolution of the open one.
        let r = db.resolve("s-1", all[0].id).await?;
        assert_eq!(r.status, AlertStatus::Resolved);
        db.close().await;
    }
    Ok(())
}

#[tokio::test]
async fn payment_outage_and_dead_letter_alerts() -> TestResult {
    for t in databases("sinks_alerts").await? {
        let db = &t.db;
        let sink = Sink::Alerts;
        let settings = AlertSettings {
            gateway_outage_retries_per_minute: 3,
            ..AlertSettings::default()
        };
        let v = View::new(sink, settings);
        let epoch = claim(db, sink, "payment").await?;

        // Three orders retrying within one minute open the outage; an authorization after
        // the last retry resolves it. Their exhausted payments open one alert.
        let mut events = Vec::new();
        for n in 0..3 {
            events.extend(lifecycle("s-1", &format!("o-{n}"), 3, T0 + n * 1_000, 100));
        }
        events.extend(lifecycle("s-2", "o-x", 0, T0, 100));
        let batch = effects(&v, &events);
        db.commit(sink, &at("payment", epoch, 1), &batch).await?;
        let alerts = db.alerts("s-1", None, 10).await?;
        let mut kinds: Vec<(AlertKind, AlertStatus, i64)> = alerts
            .iter()
            .map(|a| (a.kind, a.status, a.occurrences))
            .collect();
        kinds.sort_by_key(|k| k.0.as_str());
        // Six retries in the minute: the third opens the alert, three more count into it.
        assert_eq!(
            kinds,
            vec![
                (AlertKind::GatewayOutage, AlertStatus::Open, 4),
                (AlertKind::PaymentExhausted, AlertStatus::Open, 3),
            ],
            "{}",
            t.label
        );
        // Another store's retries and payments touch nothing of s-1.
        assert_eq!(db.alerts("s-2", None, 10).await?, vec![]);
        let paid = lifecycle("s-1", "o-ok", 0, T0 + 30_000, 100);
        db.commit(sink, &at("payment", epoch, 2), &effects(&v, &paid))
            .await?;
        let outage: Vec<_> = db
            .alerts("s-1", None, 10)
            .await?
            .into_iter()
            .filter(|a| a.kind == AlertKind::GatewayOutage)
            .collect();
        assert_eq!(outage.len(), 1);
        assert_eq!(
            (outage[0].status, outage[0].resolved_at),
            (AlertStatus::Resolved, Some(T0 + 30_000 + 3 * 100)),
            "{}",
            t.label
        );

        // Dead letters: one alert per stage and error class; the same dead letter twice
        // counts once.
        let dl = |offset: i64, class: &str| DeadLetter {
            store_id: "s-1".into(),
            source_topic: "order.created".into(),
            source_partition: 0,
            source_offset: offset,
            stage: "fraud".into(),
            error_class: class.into(),
            error_message: "bad".into(),
            at: T0 + offset,
        };
        let letters = [
            dl(1, "decode"),
            dl(2, "decode"),
            dl(2, "decode"),
            dl(3, "invalid"),
        ];
        let batch: Vec<Effects> = letters
            .iter()
            .filter_map(|d| v.effects(Input::DeadLetter(d)))
            .collect();
        let done = db.commit(sink, &at("payment", epoch, 3), &batch).await?;
        assert_eq!((done.applied, done.duplicates), (3, 1));
        let mut dead: Vec<(String, i64)> = db
            .alerts("s-1", Some(AlertStatus::Open), 10)
            .await?
            .into_iter()
            .filter(|a| a.kind == AlertKind::DeadLetters)
            .map(|a| (a.subject, a.occurrences))
            .collect();
        dead.sort();
        assert_eq!(
            dead,
            vec![
                ("fraud/decode".to_owned(), 2),
                ("fraud/invalid".to_owned(), 1)
            ],
            "{}",
            t.label
        );
        db.close().await;
    }
    Ok(())
}
