//! The SQL sinks as operators run them — `orderflow run --stages projector,stats,alerts`
//! and `orderflow replay --rebuild` as processes, on the test broker — against both
//! databases:
//!
//! - **Fencing.** Two sink workers in one group, the first expelled mid-batch by a stall
//!   past `max.poll.interval.ms`: its batch is rolled back as fenced, and every order and
//!   event is in the tables exactly once, the stats counts exact.
//! - **Rebuild.** `orderflow replay --rebuild SINK`, with a worker of the sink still
//!   running, leaves every table of the sink identical, row by row, to what the sinks
//!   built the first time (processing-time columns aside: see [`EXCLUDED`]).
//! - **Reset.** [`Db::reset`] fences the holder of a claim, and a claim after it starts
//!   from the beginning.
//! - **A PostgreSQL restart mid-run** (a private cluster, stopped for seconds while
//!   records keep coming) ends in the same rows as an undisturbed run.
//!
//! Without the test broker or `ORDERFLOW_TEST_POSTGRES_URL` every test fails (it never
//! skips).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::lifecycle::{env, lifecycle, low_stock};
use common::postgres::{PrivateCluster, TestDatabase};
use common::{Outgoing, TestEnv, TestOrder, Worker, deadline, tail_file, test_log_dir, wait_for};
use orderflow::events::codec::Codec;
use orderflow::events::{Event, StockLevelChanged};
use orderflow::runtime::{EVENT_TYPE_HEADER, dlq_headers};
use orderflow::sql::{Db, Disposition, Position};
use orderflow::topics;
use orderflow::views::Sink;
use sqlx::Row as _;

/// One runtime for every database call of this file: a pool's connections belong to the
/// runtime they were opened on.
static RT: std::sync::LazyLock<tokio::runtime::Runtime> = std::sync::LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
});

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    RT.block_on(f)
}

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;

/// Columns a rebuild may change, and why: they record when or by which claim a row was
/// written, not what the events say.
///
/// - `orders.updated_at`: the wall-clock time of the row's last write.
/// - `alerts.id`: a surrogate key from a sequence; PostgreSQL does not reuse the values
///   of deleted rows. (Alerts are compared by every other column.)
/// - `order_events.seq`: the order in which the projector inserted the rows (the API's
///   event streams resume by it), which follows how the records fell into batches.
/// - `alert_changes.seq` and `alert_changes.alert_id`: the change log's position (the
///   alert stream resumes by it, and a rebuild continues it rather than reusing it) and
///   the alert's surrogate key, both from sequences.
/// - `sink_offsets.epoch`: raised by every claim, and by the reset itself.
/// - `sink_applied_events.applied_at`, `sink_outbox.created_at`: wall-clock times of
///   the sink's bookkeeping.
///
/// `stock_levels.updated_at` is not here: it is the time of the newest stock report the
/// row reflects (event time), so a rebuild reproduces it.
const EXCLUDED: &[(&str, &str)] = &[
    ("orders", "updated_at"),
    ("alerts", "id"),
    ("order_events", "seq"),
    ("alert_changes", "seq"),
    ("alert_changes", "alert_id"),
    ("sink_offsets", "epoch"),
    ("sink_applied_events", "applied_at"),
    ("sink_outbox", "created_at"),
];

// ---------------------------------------------------------------------------------------
// Databases
// ---------------------------------------------------------------------------------------

/// The sinks' database for one test: a database of its own on the test server, or an
/// SQLite file in a temporary directory.
struct SinkDb {
    url: String,
    _pg: Option<TestDatabase>,
    _dir: Option<tempfile::TempDir>,
}

impl SinkDb {
    fn new(label: &str, name: &str) -> SinkDb {
        match label {
            "postgres" => {
                let pg = TestDatabase::create(&name.replace('-', "_"));
                SinkDb {
                    url: pg.url.clone(),
                    _pg: Some(pg),
                    _dir: None,
                }
            }
            "sqlite" => {
                let dir = tempfile::tempdir().expect("a temporary directory");
                SinkDb {
                    url: format!("sqlite://{}", dir.path().join("orderflow.db").display()),
                    _pg: None,
                    _dir: Some(dir),
                }
            }
            other => panic!("unknown database {other}"),
        }
    }

    fn connect(&self) -> Db {
        connect(&self.url)
    }
}

fn connect(url: &str) -> Db {
    block_on(async {
        let db = Db::connect(url).await.expect("connecting");
        db.migrate().await.expect("migrating");
        db
    })
}

/// One row, every column as text (`None`: NULL).
type Rows = Vec<Vec<Option<String>>>;

/// Runs `sql` (whose columns are all text) on `url` with one text parameter.
async fn query(url: &str, sql: &str, param: Option<&str>) -> Rows {
    let sql = sqlx::AssertSqlSafe(sql.to_owned());
    let mut out = Vec::new();
    if url.starts_with("sqlite:") {
        let pool = sqlx::SqlitePool::connect(url).await.expect("connecting");
        let mut q = sqlx::query(sql);
        if let Some(p) = param {
            q = q.bind(p.to_owned());
        }
        for row in q.fetch_all(&pool).await.expect("querying") {
            out.push(
                (0..row.len())
                    .map(|i| row.try_get::<Option<String>, _>(i).expect("a text column"))
                    .collect(),
            );
        }
        pool.close().await;
    } else {
        let pool = sqlx::PgPool::connect(url).await.expect("connecting");
        let mut q = sqlx::query(sql);
        if let Some(p) = param {
            q = q.bind(p.to_owned());
        }
        for row in q.fetch_all(&pool).await.expect("querying") {
            out.push(
                (0..row.len())
                    .map(|i| row.try_get::<Option<String>, _>(i).expect("a text column"))
                    .collect(),
            );
        }
        pool.close().await;
    }
    out
}

fn count(url: &str, sql: &str) -> i64 {
    let rows = block_on(query(url, sql, None));
    rows[0][0]
        .as_deref()
        .unwrap_or("0")
        .parse()
        .expect("a number")
}

/// Every row of every table of `sink`, and its rows of the bookkeeping tables, as text,
/// sorted; the [`EXCLUDED`] columns left out.
fn snapshot(url: &str, sink: Sink) -> BTreeMap<String, Rows> {
    block_on(async {
        let mut out = BTreeMap::new();
        let tables = orderflow::sql::tables(sink)
            .iter()
            .map(|t| (*t, false))
            .chain(
                ["sink_offsets", "sink_applied_events", "sink_outbox"]
                    .into_iter()
                    .map(|t| (t, true)),
            );
        for (table, per_sink) in tables {
            let columns_sql = if url.starts_with("sqlite:") {
                "SELECT name FROM pragma_table_info($1) ORDER BY cid"
            } else {
                "SELECT CAST(column_name AS TEXT) FROM information_schema.columns \
                 WHERE table_name = $1 AND table_schema = current_schema() \
                 ORDER BY ordinal_position"
            };
            let columns: Vec<String> = query(url, columns_sql, Some(table))
                .await
                .into_iter()
                .filter_map(|r| r.into_iter().next().flatten())
                .filter(|c| !EXCLUDED.contains(&(table, c.as_str())))
                .collect();
            assert!(!columns.is_empty(), "table {table} has no columns");
            let select: Vec<String> = columns
                .iter()
                .map(|c| format!("CAST(\"{c}\" AS TEXT)"))
                .collect();
            let mut sql = format!("SELECT {} FROM {table}", select.join(", "));
            if per_sink {
                sql.push_str(" WHERE sink = $1");
            }
            let mut rows = query(url, &sql, per_sink.then_some(sink.name())).await;
            rows.sort();
            out.insert(table.to_owned(), rows);
        }
        out
    })
}

/// Panics with the first differences, table by table.
fn assert_same(what: &str, before: &BTreeMap<String, Rows>, after: &BTreeMap<String, Rows>) {
    let mut problems = Vec::new();
    for (table, rows) in before {
        let other = &after[table];
        if rows == other {
            continue;
        }
        let a: BTreeSet<&Vec<Option<String>>> = rows.iter().collect();
        let b: BTreeSet<&Vec<Option<String>>> = other.iter().collect();
        let gone: Vec<_> = a.difference(&b).take(3).collect();
        let new: Vec<_> = b.difference(&a).take(3).collect();
        problems.push(format!(
            "{table}: {} rows before, {} after; only before (first 3): {gone:?}; only after: {new:?}",
            rows.len(),
            other.len()
        ));
    }
    assert!(problems.is_empty(), "{what}:\n{}", problems.join("\n"));
}

// ---------------------------------------------------------------------------------------
// Events on the topics
// ---------------------------------------------------------------------------------------

/// Orders of every path (delivered, fraud-rejected, out of stock, payment failed after
/// retries, delivery failed and refunded) over `stores` stores, low-stock reports and
/// stock levels, as the stages would have published them.
fn story(prefix: &str, orders: usize, stores: usize) -> Vec<(&'static str, Event)> {
    let mut out = Vec::new();
    for i in 0..orders {
        let store = format!("store-{}", i % stores);
        let order = format!("{prefix}-{i}");
        // Spread over a few minutes so that stats have several buckets.
        let start = T0 + i as i64 * 3_000;
        out.extend(lifecycle(&store, &order, (i % 5) as u8, start, 700));
    }
    for s in 0..stores {
        let store = format!("store-{s}");
        for n in 0..3 {
            out.push((
                topics::INVENTORY_THRESHOLD_REACHED,
                low_stock(
                    &format!("{prefix}/{store}/low-{n}"),
                    &store,
                    2 - n,
                    5,
                    T0 + 10_000 * i64::from(n),
                ),
            ));
        }
        out.push((
            topics::INVENTORY_UPDATED,
            StockLevelChanged {
                envelope: env(&format!("{prefix}/{store}/level"), &store, None, T0),
                sku: "sku-9".into(),
                available: 40,
                delta: 40,
                reason: "restock".into(),
            }
            .into(),
        ));
    }
    // Event IDs are UUIDs on the wire (the codec dead-letters anything else).
    for (_, e) in &mut out {
        let env = e.envelope_mut();
        env.event_id =
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, env.event_id.as_bytes()).to_string();
    }
    out
}

/// Publishes `events` keyed by store (the pipeline's topics first, in their order), and
/// `dead_letters` dead letters; returns how many records each topic got.
fn publish(
    env: &TestEnv,
    events: &[(&'static str, Event)],
    dead_letters: usize,
) -> BTreeMap<&'static str, i64> {
    let codec = Codec::new();
    let producer = env.producer();
    let mut by_topic: BTreeMap<&'static str, Vec<Outgoing>> = BTreeMap::new();
    for (topic, e) in events {
        let bytes = codec.encode(e).expect("encoding an event");
        by_topic.entry(topic).or_default().push(
            Outgoing::new(e.envelope().store_id.clone(), bytes)
                .header(EVENT_TYPE_HEADER, e.event_type().name()),
        );
    }
    for i in 0..dead_letters {
        let rec = Outgoing::new(format!("store-{}", i % 2), format!("not an order {i}"))
            .header(dlq_headers::SOURCE_TOPIC, env.topic(topics::ORDER_CREATED))
            .header(dlq_headers::SOURCE_PARTITION, "0")
            .header(dlq_headers::SOURCE_OFFSET, i.to_string())
            .header(dlq_headers::STAGE, "fraud")
            .header(dlq_headers::ERROR_CLASS, "decode")
            .header(dlq_headers::ERROR_MESSAGE, "not JSON");
        by_topic.entry(topics::DLQ).or_default().push(rec);
    }
    let mut counts = BTreeMap::new();
    let order: Vec<&'static str> = topics::PIPELINE
        .iter()
        .copied()
        .chain([
            topics::INVENTORY_COMMANDS,
            topics::INVENTORY_THRESHOLD_REACHED,
            topics::DLQ,
        ])
        .collect();
    for topic in order {
        if let Some(recs) = by_topic.remove(topic) {
            producer.send_all(&env.topic(topic), &recs);
            *counts.entry(topic).or_default() += recs.len() as i64;
        }
    }
    assert!(
        by_topic.is_empty(),
        "topics not published: {:?}",
        by_topic.keys()
    );
    counts
}

/// How many records `sink` reads of those `counts` says were published.
fn records_for(sink: Sink, counts: &BTreeMap<&'static str, i64>) -> i64 {
    sink.topics()
        .iter()
        .map(|t| counts.get(t).copied().unwrap_or(0))
        .sum()
}

/// The sum of `sink`'s stored offsets (all topics start at 0: the sum is how many
/// records it has applied).
fn applied(db: &Db, sink: Sink) -> i64 {
    block_on(db.offsets(sink))
        .map(|o| o.iter().filter_map(|o| o.next_offset).sum())
        .unwrap_or(-1)
}

fn wait_applied(db: &Db, sink: Sink, expected: i64, workers: &[&Worker], secs: u64) {
    wait_for(
        &format!("{sink} to apply {expected} records"),
        deadline(secs),
        workers,
        |progress| {
            let n = applied(db, sink);
            *progress = format!("{n} of {expected}");
            if n > expected {
                panic!("{sink}: stored offsets add up to {n}, more than the {expected} records");
            }
            (n == expected).then(|| std::thread::sleep(Duration::from_millis(200)))
        },
    );
}

/// The environment of a sink worker (or a rebuild) on `url`, in `group_prefix`'s groups.
fn sink_vars(url: &str) -> Vec<(&'static str, String)> {
    vec![("ORDERFLOW_DATABASE_URL", url.to_owned())]
}

// ---------------------------------------------------------------------------------------
// Fencing
// ---------------------------------------------------------------------------------------

#[test]
fn a_sink_worker_expelled_mid_batch_commits_nothing_on_postgres() {
    expelled_mid_batch("postgres");
}

#[test]
fn a_sink_worker_expelled_mid_batch_commits_nothing_on_sqlite() {
    expelled_mid_batch("sqlite");
}

/// Worker A's first commit stalls for 20 s, past `max.poll.interval.ms`; the group
/// expels it and gives its partitions to B, whose claims raise the epochs. When A's
/// commit finally runs it is fenced and rolled back: the tables hold every order and
/// event exactly once, and the stored offsets are B's, at the end of the topics.
fn expelled_mid_batch(label: &str) {
    let name = format!("sink-fence-{label}");
    let env = TestEnv::new(&name, 2);
    let sdb = SinkDb::new(label, &name);
    let db = sdb.connect();
    let orders: Vec<TestOrder> = (0..200)
        .map(|i| {
            TestOrder::new(
                format!("fence-{i}"),
                format!("store-{}", i % 4),
                format!("c-{i}"),
                T0 + i * 1_000,
            )
        })
        .collect();
    let sent: Vec<Outgoing> = orders.iter().map(TestOrder::outgoing).collect();
    env.producer()
        .send_all(&env.topic(topics::ORDER_CREATED), &sent);
    let kafka_low = "session.timeout.ms=6000,max.poll.interval.ms=6000";
    let mut stall = sink_vars(&sdb.url);
    stall.push(("ORDERFLOW_STALL_BEFORE_COMMIT", "1:20000".to_owned()));
    let a = env.spawn_worker_with_kafka(&["projector", "stats"], &stall, kafka_low);
    wait_for("A's first commit to stall", deadline(60), &[&a], |_| {
        std::thread::sleep(Duration::from_millis(100));
        a.log_tail(200).contains("stall injected").then_some(())
    });
    let stalled_at = Instant::now();
    let b = env.spawn_worker_with_kafka(&["projector", "stats"], &sink_vars(&sdb.url), kafka_low);
    let n = orders.len() as i64;
    wait_applied(&db, Sink::Projector, n, &[&a, &b], 120);
    wait_applied(&db, Sink::Stats, n, &[&a, &b], 120);
    // B took over while A stalled: all of it was applied before A's stall ended.
    assert!(
        stalled_at.elapsed() < Duration::from_secs(20),
        "B applied everything only after A's stall ended ({:?}): the takeover was not tested",
        stalled_at.elapsed()
    );
    wait_for(
        "A's stalled batch to be fenced",
        deadline(60),
        &[&a, &b],
        |_| {
            std::thread::sleep(Duration::from_millis(200));
            a.log_tail(2000)
                .contains("fenced by a newer claim: the batch was rolled back")
                .then_some(())
        },
    );
    // Room for anything A might still (wrongly) write.
    std::thread::sleep(Duration::from_secs(3));

    let url = &sdb.url;
    assert_eq!(count(url, "SELECT CAST(COUNT(*) AS TEXT) FROM orders"), n);
    let ids: BTreeSet<String> = block_on(query(url, "SELECT event_id FROM order_events", None))
        .into_iter()
        .filter_map(|r| r.into_iter().next().flatten())
        .collect();
    let expected: BTreeSet<String> = orders.iter().map(TestOrder::created_id).collect();
    assert_eq!(ids, expected, "each OrderCreated once in order_events");
    assert_eq!(
        count(url, "SELECT CAST(COUNT(*) AS TEXT) FROM order_events"),
        n
    );
    // orders_created per store and minute, against the orders published.
    let mut want: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for o in &orders {
        let minute = o.placed_at_ms - o.placed_at_ms.rem_euclid(60_000);
        *want.entry((o.store_id.clone(), minute)).or_default() += 1;
    }
    let got: BTreeMap<(String, i64), i64> = block_on(query(
        url,
        "SELECT store_id, CAST(bucket_ms AS TEXT), CAST(orders_created AS TEXT) FROM stats_minute",
        None,
    ))
    .into_iter()
    .map(|r| {
        let num = |i: usize| {
            r[i].as_deref()
                .unwrap_or("0")
                .parse::<i64>()
                .expect("a number")
        };
        ((r[0].clone().expect("a store"), num(1)), num(2))
    })
    .collect();
    assert_eq!(
        got, want,
        "stats_minute.orders_created, per store and minute"
    );
    assert_eq!(
        count(
            url,
            "SELECT CAST(COUNT(*) AS TEXT) FROM sink_applied_events WHERE sink = 'stats'"
        ),
        n
    );
    // The stored offsets are at the end of the topic: A's stalled batch, had it
    // committed, would have moved them back to where its batch ended.
    assert_eq!(applied(&db, Sink::Projector), n);
    assert_eq!(applied(&db, Sink::Stats), n);
    a.assert_alive();
    b.assert_alive();
}

// ---------------------------------------------------------------------------------------
// Reset
// ---------------------------------------------------------------------------------------

#[test]
fn a_reset_fences_the_holder_and_a_new_claim_starts_from_the_beginning() {
    for label in ["sqlite", "postgres"] {
        let sdb = SinkDb::new(label, "sink_reset");
        let db = sdb.connect();
        block_on(async {
            let topic = "t.order.created";
            for (i, sink) in Sink::ALL.iter().enumerate() {
                let claim = db.claim(*sink, topic, 0).await.expect("claim");
                let at = |epoch, next_offset| {
                    vec![Position {
                        topic: topic.into(),
                        partition: 0,
                        epoch,
                        next_offset,
                    }]
                };
                db.commit(*sink, &at(claim.epoch, 10 + i as i64), &[])
                    .await
                    .expect("commit");
            }
            let before = db.offsets(Sink::Stats).await.expect("offsets");
            db.reset(Sink::Projector).await.expect("reset");
            // The holder's next commit is fenced.
            let err = db
                .commit(
                    Sink::Projector,
                    &[Position {
                        topic: topic.into(),
                        partition: 0,
                        epoch: 1,
                        next_offset: 11,
                    }],
                    &[],
                )
                .await
                .expect_err("a commit of the old epoch after a reset");
            assert_eq!(err.disposition(), Disposition::Fenced, "{label}: {err}");
            // A new claim starts from the beginning, with an epoch nobody held before.
            let claim = db.claim(Sink::Projector, topic, 0).await.expect("claim");
            assert_eq!(claim.next_offset, None, "{label}");
            assert!(claim.epoch > 1, "{label}: epoch {}", claim.epoch);
            // Other sinks keep their positions.
            assert_eq!(
                db.offsets(Sink::Stats).await.expect("offsets"),
                before,
                "{label}"
            );
            assert_eq!(
                db.offsets(Sink::Alerts).await.expect("offsets")[0].next_offset,
                Some(12),
                "{label}"
            );
            db.close().await;
        });
    }
}

// ---------------------------------------------------------------------------------------
// Rebuild
// ---------------------------------------------------------------------------------------

#[test]
fn a_rebuild_reproduces_every_table_row_by_row_on_postgres() {
    rebuild("postgres");
}

#[test]
fn a_rebuild_reproduces_every_table_row_by_row_on_sqlite() {
    rebuild("sqlite");
}

/// Runs `orderflow replay --rebuild SINK` as a process, in `env`'s groups, on `url`;
/// returns its output once it exits.
fn run_rebuild(env: &TestEnv, sink: Sink, url: &str, secs: u64) -> String {
    let log_path = test_log_dir().join(format!(
        "{}-rebuild-{sink}.log",
        env.settings.topic_prefix.trim_end_matches('.')
    ));
    std::fs::create_dir_all(test_log_dir()).expect("the log directory");
    let log = std::fs::File::create(&log_path).expect("a log file");
    let kafka: Vec<String> = env
        .settings
        .kafka
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    cmd.args(["replay", "--rebuild", sink.name()]);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ORDERFLOW_") {
            cmd.env_remove(k);
        }
    }
    let mut child = cmd
        .env("ORDERFLOW_BROKERS", &env.settings.brokers)
        .env("ORDERFLOW_TOPIC_PREFIX", &env.settings.topic_prefix)
        .env("ORDERFLOW_GROUP_PREFIX", &env.settings.group_prefix)
        .env("ORDERFLOW_GUARANTEE", "at_least_once")
        .env("ORDERFLOW_INSTANCE_ID", format!("{}-rebuild", env.name))
        .env(
            "ORDERFLOW_BATCH_INTERVAL_MS",
            env.settings.batch_interval_ms.to_string(),
        )
        .env("ORDERFLOW_DATABASE_URL", url)
        .env("ORDERFLOW_KAFKA", kafka.join(","))
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log handle"))
        .stderr(log)
        .spawn()
        .expect("spawning orderflow replay");
    let until = deadline(secs);
    let status = loop {
        if let Some(status) = child.try_wait().expect("waiting for the rebuild") {
            break status;
        }
        if Instant::now() >= until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "orderflow replay --rebuild {sink} did not finish in {secs}s; log {}:\n{}",
                log_path.display(),
                tail_file(&log_path, 40)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = tail_file(&log_path, 200);
    assert!(
        status.success(),
        "orderflow replay --rebuild {sink} exited with {status}:\n{output}"
    );
    output
}

/// The sinks build their tables from a story of orders and stock; then each sink is
/// rebuilt while a worker of it keeps running, and every table is as before, row by row.
fn rebuild(label: &str) {
    let name = format!("sink-rebuild-{label}");
    let env = TestEnv::new(&name, 2);
    let sdb = SinkDb::new(label, &name);
    let db = sdb.connect();
    let events = story("rb", 60, 3);
    let counts = publish(&env, &events, 3);
    let w = env.spawn_worker(&["projector", "stats", "alerts"], &sink_vars(&sdb.url));
    for sink in Sink::ALL {
        wait_applied(&db, *sink, records_for(*sink, &counts), &[&w], 120);
    }
    let with_order: usize = events
        .iter()
        .filter(|(_, e)| e.envelope().order_id.is_some())
        .count();
    assert_eq!(
        count(&sdb.url, "SELECT CAST(COUNT(*) AS TEXT) FROM order_events"),
        with_order as i64
    );
    assert_eq!(
        count(&sdb.url, "SELECT CAST(COUNT(*) AS TEXT) FROM orders"),
        60
    );
    // Every sink has rows to lose in each of its tables but the transient ones.
    for sink in Sink::ALL {
        let before = snapshot(&sdb.url, *sink);
        for table in orderflow::sql::tables(*sink) {
            if !matches!(*table, "stats_milestones" | "alert_retry_counts") {
                assert!(
                    !before[*table].is_empty(),
                    "{table} is empty before the rebuild"
                );
            }
        }
        let output = run_rebuild(&env, *sink, &sdb.url, 180);
        assert!(
            output.contains(&format!("rebuilt {sink} from")),
            "the rebuild of {sink} did not report its end:\n{output}"
        );
        let after = snapshot(&sdb.url, *sink);
        assert_same(&format!("{label}: {sink} rebuilt"), &before, &after);
        w.assert_alive();
    }
}

// ---------------------------------------------------------------------------------------
// A PostgreSQL restart
// ---------------------------------------------------------------------------------------

/// Sinks on a private PostgreSQL cluster that is stopped for 12 s mid-run
/// (records keep coming meanwhile) and started again end with the same rows, row by row,
/// as sinks on an undisturbed database reading the same records. SQLite, a file, has no
/// server to lose.
#[test]
fn the_sinks_ride_out_a_postgres_restart_with_the_same_rows() {
    let env = TestEnv::new("sink-pg-restart", 2);
    let mut cluster = PrivateCluster::start();
    let url = cluster.url();
    let db = connect(&url);
    let reference = SinkDb::new("postgres", "sink_pg_reference");
    let ref_db = reference.connect();
    let events = story("pr", 80, 4);
    let (first, second) = events.split_at(events.len() / 2);
    let mut counts = publish(&env, first, 0);
    let w = env.spawn_worker(&["projector", "stats", "alerts"], &sink_vars(&url));
    let mut ref_vars = sink_vars(&reference.url);
    ref_vars.push((
        "ORDERFLOW_GROUP_PREFIX",
        format!("{}-reference", env.settings.group_prefix),
    ));
    let r = env.spawn_worker(&["projector", "stats", "alerts"], &ref_vars);
    wait_for(
        "the projector to apply something",
        deadline(60),
        &[&w],
        |_| {
            std::thread::sleep(Duration::from_millis(100));
            (applied(&db, Sink::Projector) > 0).then_some(())
        },
    );
    db.close_blocking();
    cluster.stop();
    for (topic, n) in publish(&env, second, 0) {
        *counts.entry(topic).or_default() += n;
    }
    // Longer than the pool's 10 s acquire timeout: the sinks' commits fail (rather than
    // wait for a connection), roll back and are retried.
    std::thread::sleep(Duration::from_secs(12));
    w.assert_alive();
    cluster.resume();
    let db = connect(&url);
    for sink in Sink::ALL {
        let n = records_for(*sink, &counts);
        wait_applied(&db, *sink, n, &[&w], 120);
        wait_applied(&ref_db, *sink, n, &[&r], 120);
    }
    let log = w.log_tail(5000);
    assert!(
        log.contains("sink commit failed; rolled back, reading the batch again")
            || log.contains("restore failed; trying again"),
        "the worker never noticed the database was gone:\n{}",
        w.log_tail(60)
    );
    for sink in Sink::ALL {
        let got = snapshot(&url, *sink);
        let want = snapshot(&reference.url, *sink);
        assert_same(
            &format!("{sink}: after the restart against undisturbed"),
            &want,
            &got,
        );
    }
    w.assert_alive();
    drop(w);
    drop(r);
}

trait CloseBlocking {
    fn close_blocking(&self);
}

impl CloseBlocking for Db {
    fn close_blocking(&self) {
        block_on(self.close());
    }
}
