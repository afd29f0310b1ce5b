//! Confluent-framed records read through a schema registry: against a fake registry on
//! loopback (the part of the REST API the codec asks: `GET /schemas/ids/{id}`), records
//! written with evolved writer schemas decode by Avro resolution, an unknown ID is a
//! record that can never be read, a registry that is down is transient, and every ID is
//! asked once.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use apache_avro::Schema;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};

use super::codec::{Codec, DecodeError, DecodeHints};
use super::registry::SchemaRegistry;
use super::*;
use crate::topics;

type TestResult = Result<(), Box<dyn std::error::Error>>;

#[derive(Default)]
struct Fake {
    schemas: HashMap<u32, String>,
    lookups: HashMap<u32, u32>,
}

type Shared = Arc<Mutex<Fake>>;

/// Serves `fake` on `port` (0: any) until the returned sender is dropped or fired.
fn serve(fake: Shared, port: u16) -> (u16, tokio::sync::oneshot::Sender<()>) {
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        rt.block_on(async move {
            let socket = tokio::net::TcpSocket::new_v4().expect("a socket");
            socket.set_reuseaddr(true).expect("SO_REUSEADDR");
            socket.bind(([127, 0, 0, 1], port).into()).expect("binding");
            let listener = socket.listen(16).expect("listening");
            ready_tx
                .send(listener.local_addr().expect("an address").port())
                .expect("the test waits");
            let app = axum::Router::new()
                .route("/schemas/ids/{id}", axum::routing::get(by_id))
                .with_state(fake);
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = stop_rx.await;
                })
                .await;
        });
    });
    let port = ready_rx.recv().expect("the fake registry starts");
    (port, stop_tx)
}

async fn by_id(State(fake): State<Shared>, Path(id): Path<u32>) -> Response {
    let mut fake = fake.lock().expect("lock");
    *fake.lookups.entry(id).or_default() += 1;
    match fake.schemas.get(&id) {
        Some(s) => axum::Json(serde_json::json!({ "schema": s })).into_response(),
        None => (
            StatusCode::NOT_FOUND,
            axum::Json(serde_json::json!({"error_code": 40403, "message": "Schema not found"})),
        )
            .into_response(),
    }
}

fn order() -> OrderCreated {
    OrderCreated {
        envelope: Envelope {
            event_id: "00000000-0000-0000-0000-000000000000".into(),
            order_id: Some("o-77".into()),
            store_id: "store-3".into(),
            correlation_id: "o-77".into(),
            causation_id: Some("cause-1".into()),
            occurred_at: 1_795_000_000_000,
            schema_version: 1,
        },
        customer_id: "c-9".into(),
        email: "c9@example.com".into(),
        currency: "EUR".into(),
        shipping_country: "DE".into(),
        items: vec![OrderLine {
            sku: "SKU-4".into(),
            quantity: 3,
            unit_price_cents: 250,
        }],
        placed_at: 1_795_000_000_000,
    }
}

/// Our OrderCreated schema with `edit` applied to its JSON fields array.
fn evolved(
    edit: impl FnOnce(&mut Vec<serde_json::Value>),
) -> Result<String, Box<dyn std::error::Error>> {
    let mut schema: serde_json::Value =
        serde_json::from_str(EventType::OrderCreated.schema_source())?;
    edit(schema["fields"].as_array_mut().ok_or("no fields")?);
    Ok(schema.to_string())
}

/// `event` as a producer with writer schema `writer` frames it: magic 0, the ID, the
/// datum; `edit` turns our record's fields into the writer's.
fn framed(
    id: u32,
    writer: &str,
    event: &Event,
    edit: impl FnOnce(&mut Vec<(String, Value)>),
) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    let writer = Schema::parse_str(writer)?;
    let ours = Schema::parse_str(event.event_type().schema_source())?;
    let Value::Record(mut fields) = event.to_avro()?.resolve(&ours)? else {
        return Err("an event is a record".into());
    };
    edit(&mut fields);
    let value = Value::Record(fields).resolve(&writer)?;
    let datum = GenericDatumWriter::builder(&writer)
        .build()?
        .write_value_to_vec(value)?;
    Ok([&[0u8][..], &id.to_be_bytes(), &datum].concat())
}

fn no_hints() -> DecodeHints<'static> {
    DecodeHints::default()
}

/// The event the codec makes of `order()` (its canonical event ID).
fn decoded_order(codec: &Codec) -> Result<Event, Box<dyn std::error::Error>> {
    let bytes = codec.encode(&Event::OrderCreated(order()))?;
    Ok(codec.decode(&bytes, no_hints())?)
}

#[test]
fn evolved_writer_schemas_decode_by_resolution_and_each_id_is_asked_once() -> TestResult {
    let added = evolved(|f| {
        f.push(serde_json::json!({"name": "gift_note", "type": "string", "default": ""}))
    })?;
    let removed = evolved(|f| f.retain(|x| x["name"] != "causation_id"))?;
    let fake = Shared::default();
    {
        let mut f = fake.lock().expect("lock");
        f.schemas.insert(11, added.clone());
        f.schemas.insert(12, removed.clone());
        f.schemas
            .insert(13, EventType::OrderCreated.schema_source().to_owned());
    }
    let (port, _stop) = serve(fake.clone(), 0);
    let codec = Codec::with_registry(Some(SchemaRegistry::new(&format!(
        "http://127.0.0.1:{port}/"
    ))));
    let expected = decoded_order(&codec)?;
    let event = Event::OrderCreated(order());

    // An added field (with a default): the reader ignores what it does not know.
    let bytes = framed(11, &added, &event, |f| {
        f.push(("gift_note".into(), Value::String("happy birthday".into())))
    })?;
    // No topic or header hint: the type comes from the writer's record name.
    for _ in 0..50 {
        assert_eq!(codec.decode(&bytes, no_hints())?, expected);
    }

    // A removed optional field: the reader fills in its default.
    let bytes = framed(12, &removed, &event, |f| {
        f.retain(|(n, _)| n != "causation_id")
    })?;
    let Event::OrderCreated(got) = codec.decode(&bytes, no_hints())? else {
        return Err("not an order".into());
    };
    let Event::OrderCreated(mut want) = expected.clone() else {
        unreachable!()
    };
    want.envelope.causation_id = None;
    assert_eq!(got, want);

    // Our own schema, registered: the same event.
    let bytes = framed(13, EventType::OrderCreated.schema_source(), &event, |_| {})?;
    assert_eq!(codec.decode(&bytes, no_hints())?, expected);

    let f = fake.lock().expect("lock");
    assert_eq!(
        (f.lookups.get(&11), f.lookups.get(&12), f.lookups.get(&13)),
        (Some(&1), Some(&1), Some(&1)),
        "every ID asked exactly once"
    );
    Ok(())
}

#[test]
fn without_a_registry_the_id_is_ignored_as_before() -> TestResult {
    // The added-field writer's bytes misread without a registry: they are not ours.
    let added = evolved(|f| {
        f.push(serde_json::json!({"name": "gift_note", "type": "string", "default": ""}))
    })?;
    let event = Event::OrderCreated(order());
    let ours = framed(1, EventType::OrderCreated.schema_source(), &event, |_| {})?;
    let codec = Codec::new();
    assert_eq!(
        codec.decode(
            &ours,
            DecodeHints {
                topic_default: topics::default_event_type(topics::ORDER_CREATED),
                ..no_hints()
            }
        )?,
        decoded_order(&codec)?
    );
    let theirs = framed(1, &added, &event, |f| {
        f.push(("gift_note".into(), Value::String("x".into())))
    })?;
    let err = codec
        .decode(
            &theirs,
            DecodeHints {
                topic_default: topics::default_event_type(topics::ORDER_CREATED),
                ..no_hints()
            },
        )
        .expect_err("trailing bytes of the unknown field");
    assert_eq!(err.class(), "schema", "{err}");
    Ok(())
}

#[test]
fn an_unknown_id_can_never_be_read_and_is_asked_once() -> TestResult {
    let fake = Shared::default();
    let (port, _stop) = serve(fake.clone(), 0);
    let codec = Codec::with_registry(Some(SchemaRegistry::new(&format!(
        "http://127.0.0.1:{port}"
    ))));
    let bytes = framed(
        424242,
        EventType::OrderCreated.schema_source(),
        &Event::OrderCreated(order()),
        |_| {},
    )?;
    for _ in 0..3 {
        let err = codec.decode(&bytes, no_hints()).expect_err("unknown ID");
        assert!(matches!(err, DecodeError::SchemaId(_)), "{err:?}");
        assert!(!err.is_transient());
        assert_eq!(err.class(), "schema");
        let msg = err.to_string();
        assert!(
            msg.contains("schema ID 424242") && msg.contains("not in the schema registry"),
            "{msg}"
        );
    }
    assert_eq!(fake.lock().expect("lock").lookups.get(&424242), Some(&1));
    Ok(())
}

#[test]
fn a_registry_that_is_down_is_transient_until_it_answers() -> TestResult {
    // A port nobody listens on yet.
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let codec = Codec::with_registry(Some(SchemaRegistry::new(&format!(
        "http://127.0.0.1:{port}"
    ))));
    let bytes = framed(
        5,
        EventType::OrderCreated.schema_source(),
        &Event::OrderCreated(order()),
        |_| {},
    )?;
    let err = codec.decode(&bytes, no_hints()).expect_err("registry down");
    assert!(err.is_transient(), "{err:?}");
    assert_eq!(err.class(), "registry");
    assert!(codec.prefetch([bytes.as_slice()]).is_err());
    // Records that are not Confluent-framed need no registry.
    let own = codec.encode(&Event::OrderCreated(order()))?;
    assert!(codec.prefetch([own.as_slice()]).is_ok());

    let fake = Shared::default();
    fake.lock()
        .expect("lock")
        .schemas
        .insert(5, EventType::OrderCreated.schema_source().to_owned());
    let (_, _stop) = serve(fake.clone(), port);
    codec.prefetch([bytes.as_slice(), bytes.as_slice()])?;
    assert_eq!(codec.decode(&bytes, no_hints())?, decoded_order(&codec)?);
    assert_eq!(fake.lock().expect("lock").lookups.get(&5), Some(&1));
    Ok(())
}

#[test]
fn a_writer_schema_that_cannot_be_resolved_names_the_problem() -> TestResult {
    // A required field the writer does not have and our reader has no default for.
    let removed = evolved(|f| f.retain(|x| x["name"] != "customer_id"))?;
    let fake = Shared::default();
    fake.lock()
        .expect("lock")
        .schemas
        .insert(3, removed.clone());
    fake.lock()
        .expect("lock")
        .schemas
        .insert(4, r#"{"type": "string"}"#.to_owned());
    let (port, _stop) = serve(fake, 0);
    let codec = Codec::with_registry(Some(SchemaRegistry::new(&format!(
        "http://127.0.0.1:{port}"
    ))));
    let bytes = framed(3, &removed, &Event::OrderCreated(order()), |f| {
        f.retain(|(n, _)| n != "customer_id")
    })?;
    let err = codec.decode(&bytes, no_hints()).expect_err("no default");
    assert_eq!(err.class(), "schema", "{err}");
    assert!(err.to_string().contains("customer_id"), "{err}");
    assert!(err.to_string().contains("writer schema ID 3"), "{err}");
    let err = codec
        .decode(&[0, 0, 0, 0, 4, 2, b'x'], no_hints())
        .expect_err("not a record");
    assert!(matches!(err, DecodeError::SchemaId(_)), "{err:?}");
    assert!(err.to_string().contains("not a record schema"), "{err}");
    Ok(())
}
