//! Schema registry interop on the real broker: a fraud worker (`orderflow run` process)
//! reads Confluent-framed orders whose writer schemas it resolves through the test
//! suite's own registry (`common::registry`, the Confluent REST API on loopback).
//!
//! - `orderflow schemas register` registers every schema under its conventional subject,
//!   and a second run changes nothing;
//! - orders written with our schema, with an evolved one (an added field with a default)
//!   and with one that lacks an optional field are all screened, once each, and each
//!   schema ID is looked up once;
//! - an order framed with an ID the registry never issued is dead-lettered with a message
//!   naming the ID;
//! - while the registry is down, nothing is screened and nothing dead-lettered; once it
//!   is back, every order is screened; an SQL sink (the projector) likewise.

mod common;

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use apache_avro::Schema;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use common::registry::TestRegistry;
use common::*;
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{EventType, registry::subjects};
use orderflow::runtime::dlq_headers;
use orderflow::topics::{DLQ, ORDER_CREATED};

/// Our OrderCreated schema with `edit` applied to its fields.
fn evolved(edit: impl FnOnce(&mut Vec<serde_json::Value>)) -> String {
    let mut schema: serde_json::Value =
        serde_json::from_str(EventType::OrderCreated.schema_source()).expect("our schema");
    edit(schema["fields"].as_array_mut().expect("fields"));
    schema.to_string()
}

/// `order` as a producer with writer schema `writer` frames it (magic 0, `id`, datum);
/// `edit` turns our record's fields into the writer's.
fn framed(
    order: &TestOrder,
    id: u32,
    writer: &str,
    edit: impl FnOnce(&mut Vec<(String, Value)>),
) -> Vec<u8> {
    let codec = Codec::new();
    let hints = DecodeHints {
        topic_default: Some(EventType::OrderCreated),
        ..DecodeHints::default()
    };
    let event = codec.decode(&order.json(), hints).expect("a valid order");
    let ours = codec.encode(&event).expect("encodes");
    let schema = codec.schema(EventType::OrderCreated);
    let Value::Record(mut fields) = GenericDatumReader::builder(schema)
        .build()
        .and_then(|r| r.read_value(&mut &ours[10..]))
        .expect("our datum reads")
    else {
        panic!("an order is a record");
    };
    edit(&mut fields);
    let writer = Schema::parse_str(writer).expect("writer schema");
    let value = Value::Record(fields)
        .resolve(&writer)
        .expect("the writer's shape");
    let datum = GenericDatumWriter::builder(&writer)
        .build()
        .and_then(|w| w.write_value_to_vec(value))
        .expect("writes");
    [&[0u8][..], &id.to_be_bytes(), &datum].concat()
}

fn orders(tag: &str, n: usize) -> Vec<TestOrder> {
    let t0 = now_ms();
    (0..n)
        .map(|i| {
            TestOrder::new(
                format!("{tag}-o{i:03}"),
                format!("store-{}", i % 5),
                format!("{tag}-c{i:03}"),
                t0 + i as i64,
            )
        })
        .collect()
}

/// Runs `orderflow schemas register` against `url` for `env`'s topics; its table as
/// subject → (ID, event type).
fn schemas_register(env: &TestEnv, url: &str) -> BTreeMap<String, (u32, String)> {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_orderflow"));
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ORDERFLOW_") {
            cmd.env_remove(k);
        }
    }
    let out = cmd
        .args(["schemas", "register", "--url", url])
        .env("ORDERFLOW_TOPIC_PREFIX", &env.settings.topic_prefix)
        .output()
        .expect("running orderflow schemas register");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "schemas register failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .skip(1)
        .map(|l| {
            let cols: Vec<&str> = l.split_whitespace().collect();
            assert_eq!(cols.len(), 3, "row {l:?}");
            (
                cols[0].to_owned(),
                (cols[1].parse().expect("an ID"), cols[2].to_owned()),
            )
        })
        .collect()
}

/// Waits until every order of `expected` is screened; then checks each has exactly one
/// distinct screening, the one its ID says, approved.
fn expect_screened(tail: &mut ScreenedTail, expected: &[&TestOrder], workers: &[&Worker]) {
    wait_for(
        &format!("{} orders screened", expected.len()),
        deadline(90),
        workers,
        |progress| {
            tail.poll(Duration::from_millis(100));
            let missing = expected
                .iter()
                .filter(|o| !tail.screenings.by_order.contains_key(&o.order_id))
                .count();
            *progress = format!("{missing} not yet screened");
            (missing == 0).then_some(())
        },
    );
    tail.drain();
    for o in expected {
        let got = &tail.screenings.by_order[&o.order_id];
        let ids: std::collections::BTreeSet<&str> = got.iter().map(|s| s.event_id()).collect();
        assert_eq!(
            ids.into_iter().collect::<Vec<_>>(),
            vec![o.expected_screened_id().as_str()],
            "order {}",
            o.order_id
        );
        assert!(got.iter().all(|s| s.approved()), "order {}", o.order_id);
    }
    assert_eq!(
        tail.screenings.by_order.len(),
        expected.len(),
        "screenings of orders never published"
    );
}

#[test]
fn evolved_writer_schemas_resolve_and_an_unknown_id_is_dead_lettered() {
    let env = TestEnv::new("registry", 2);
    let registry = TestRegistry::start_new();

    // Registering: every schema under its subject; again, the same IDs and no new version.
    let first = schemas_register(&env, &registry.url());
    let expected_subjects: BTreeMap<String, String> = subjects(&env.topics())
        .into_iter()
        .map(|(s, t)| (s, t.name().to_owned()))
        .collect();
    assert_eq!(
        first
            .iter()
            .map(|(s, (_, t))| (s.clone(), t.clone()))
            .collect::<BTreeMap<_, _>>(),
        expected_subjects
    );
    let order_subject = env.topic(ORDER_CREATED) + "-value";
    assert!(first.contains_key(&order_subject), "{first:?}");
    assert!(
        first.contains_key(&format!(
            "{}-io.orderflow.events.StockRestocked",
            env.topic(orderflow::topics::INVENTORY_COMMANDS)
        )),
        "{first:?}"
    );
    let again = schemas_register(&env, &registry.url());
    assert_eq!(again, first, "registering twice gives the same IDs");
    let held = registry.subjects();
    assert_eq!(held.len(), EventType::ALL.len());
    assert!(
        held.values().all(|versions| versions.len() == 1),
        "{held:?}"
    );

    // The producer's schema evolved twice.
    let ours_id = first[&order_subject].0;
    let added = evolved(|f| {
        f.push(serde_json::json!({"name": "gift_note", "type": "string", "default": ""}))
    });
    let added_id = registry.register(&order_subject, &added);
    let removed = evolved(|f| f.retain(|x| x["name"] != "causation_id"));
    let removed_id = registry.register(&order_subject, &removed);
    assert!(ours_id != added_id && added_id != removed_id && ours_id != removed_id);

    let plain = orders("ours", 10);
    let with_note = orders("added", 10);
    let without_cause = orders("removed", 10);
    let unknown = orders("unknown", 1);
    let mut records: Vec<Outgoing> = Vec::new();
    for o in &plain {
        let v = framed(o, ours_id, EventType::OrderCreated.schema_source(), |_| {});
        records.push(Outgoing::new(o.store_id.clone(), v));
    }
    for o in &with_note {
        let v = framed(o, added_id, &added, |f| {
            f.push(("gift_note".into(), Value::String("with love".into())))
        });
        records.push(Outgoing::new(o.store_id.clone(), v));
    }
    for o in &without_cause {
        let v = framed(o, removed_id, &removed, |f| {
            f.retain(|(n, _)| n != "causation_id")
        });
        records.push(Outgoing::new(o.store_id.clone(), v));
    }
    const UNKNOWN_ID: u32 = 999_999;
    let unknown_value = framed(
        &unknown[0],
        UNKNOWN_ID,
        EventType::OrderCreated.schema_source(),
        |_| {},
    );
    records.push(Outgoing::new(
        unknown[0].store_id.clone(),
        unknown_value.clone(),
    ));
    env.producer().send_all(&env.topic(ORDER_CREATED), &records);

    let worker = env.spawn_worker(
        &["fraud"],
        &[("ORDERFLOW_SCHEMA_REGISTRY_URL", registry.url())],
    );
    let mut tail = ScreenedTail::new(&env);
    let expected: Vec<&TestOrder> = plain
        .iter()
        .chain(&with_note)
        .chain(&without_cause)
        .collect();
    expect_screened(&mut tail, &expected, &[&worker]);

    let dead = read_all(&env.settings.brokers, &env.topic(DLQ), 1, deadline(60));
    assert_eq!(dead.len(), 1, "exactly the unknown-ID record: {dead:?}");
    let d = &dead[0];
    assert_eq!(
        d.value.as_deref(),
        Some(unknown_value.as_slice()),
        "original bytes"
    );
    assert_eq!(
        d.header_str(dlq_headers::ERROR_CLASS).as_deref(),
        Some("schema")
    );
    let message = d.header_str(dlq_headers::ERROR_MESSAGE).unwrap_or_default();
    assert!(
        message.contains("schema ID 999999") && message.contains("not in the schema registry"),
        "{message}"
    );
    assert!(
        !tail.screenings.by_order.contains_key(&unknown[0].order_id),
        "the unknown-ID order was screened"
    );
    // One lookup per ID for the whole process, unknown ID included.
    for id in [ours_id, added_id, removed_id, UNKNOWN_ID] {
        assert_eq!(registry.lookups(id), 1, "lookups of schema ID {id}");
    }
    worker.assert_alive();
}

#[test]
fn a_registry_that_is_down_holds_records_back_until_it_answers() {
    let env = TestEnv::new("registry-down", 2);
    let mut registry = TestRegistry::start_new();
    let subject = env.topic(ORDER_CREATED) + "-value";
    let id = registry.register(&subject, EventType::OrderCreated.schema_source());
    registry.stop();

    let batch = orders("down", 20);
    let records: Vec<Outgoing> = batch
        .iter()
        .map(|o| {
            Outgoing::new(
                o.store_id.clone(),
                framed(o, id, EventType::OrderCreated.schema_source(), |_| {}),
            )
        })
        .collect();
    env.producer().send_all(&env.topic(ORDER_CREATED), &records);
    let worker = env.spawn_worker(
        &["fraud"],
        &[("ORDERFLOW_SCHEMA_REGISTRY_URL", registry.url())],
    );
    // The worker reaches the records and cannot look their schema up, more than once.
    wait_for(
        "the worker retrying the registry",
        deadline(60),
        &[&worker],
        |progress| {
            let log = worker.log_tail(400);
            let n = log.matches("cannot look up schema IDs").count();
            *progress = format!("{n} retries logged");
            std::thread::sleep(Duration::from_millis(200));
            (n >= 3).then_some(())
        },
    );
    let mut tail = ScreenedTail::new(&env);
    tail.poll(Duration::from_secs(2));
    assert_eq!(tail.screenings.records, 0, "screened without its schema");
    assert!(
        read_topic(&env.settings.brokers, &env.topic(DLQ)).is_empty(),
        "a record was dead-lettered while the registry was down"
    );
    assert_eq!(registry.lookups(id), 0);

    registry.start();
    let expected: Vec<&TestOrder> = batch.iter().collect();
    expect_screened(&mut tail, &expected, &[&worker]);
    assert!(
        read_topic(&env.settings.brokers, &env.topic(DLQ)).is_empty(),
        "nothing is dead-lettered"
    );
    assert_eq!(registry.lookups(id), 1, "looked up once it answered");
}

/// The SQL sinks decode in the same loop: the projector (on SQLite) holds evolved-schema
/// records back while the registry is down — nothing applied, nothing dead-lettered —
/// and projects every order once it answers.
#[test]
fn a_sink_waits_for_the_registry_too_and_projects_evolved_records() {
    use orderflow::sql::Db;
    use orderflow::views::Sink;

    let env = TestEnv::new("registry-sink", 2);
    let mut registry = TestRegistry::start_new();
    let subject = env.topic(ORDER_CREATED) + "-value";
    let added = evolved(|f| {
        f.push(serde_json::json!({"name": "gift_note", "type": "string", "default": ""}))
    });
    let id = registry.register(&subject, &added);
    registry.stop();

    let batch = orders("sink", 12);
    let records: Vec<Outgoing> = batch
        .iter()
        .map(|o| {
            Outgoing::new(
                o.store_id.clone(),
                framed(o, id, &added, |f| {
                    f.push(("gift_note".into(), Value::String("ribbon".into())))
                }),
            )
        })
        .collect();
    env.producer().send_all(&env.topic(ORDER_CREATED), &records);

    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite://{}", dir.path().join("orderflow.db").display());
    let db = block_on(async {
        let db = Db::connect(&url).await.expect("connecting");
        db.migrate().await.expect("migrating");
        db
    });
    let applied = || -> i64 {
        block_on(db.offsets(Sink::Projector))
            .map(|o| o.iter().filter_map(|o| o.next_offset).sum())
            .unwrap_or(-1)
    };
    let worker = env.spawn_worker(
        &["projector"],
        &[
            ("ORDERFLOW_SCHEMA_REGISTRY_URL", registry.url()),
            ("ORDERFLOW_DATABASE_URL", url.clone()),
        ],
    );
    wait_for(
        "the sink retrying the registry",
        deadline(60),
        &[&worker],
        |progress| {
            let n = worker
                .log_tail(400)
                .matches("cannot look up schema IDs")
                .count();
            *progress = format!("{n} retries logged");
            std::thread::sleep(Duration::from_millis(200));
            (n >= 3).then_some(())
        },
    );
    assert!(applied() <= 0, "records applied without their schema");
    assert!(
        read_topic(&env.settings.brokers, &env.topic(DLQ)).is_empty(),
        "a record was dead-lettered while the registry was down"
    );

    registry.start();
    let n = batch.len() as i64;
    wait_for(
        &format!("the projector to apply {n} records"),
        deadline(90),
        &[&worker],
        |progress| {
            let got = applied();
            *progress = format!("{got} of {n}");
            std::thread::sleep(Duration::from_millis(200));
            (got == n).then_some(())
        },
    );
    assert!(
        read_topic(&env.settings.brokers, &env.topic(DLQ)).is_empty(),
        "nothing is dead-lettered"
    );
    for o in &batch {
        let got = block_on(db.order(&o.store_id, &o.order_id))
            .expect("reading an order")
            .unwrap_or_else(|| panic!("order {} not projected", o.order_id));
        assert_eq!(got.timeline.len(), 1, "order {}", o.order_id);
        assert_eq!(
            got.timeline[0].event_id,
            o.created_id(),
            "order {}",
            o.order_id
        );
    }
    assert_eq!(registry.lookups(id), 1);
}
