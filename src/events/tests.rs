//! Codec and wire-type tests.
//!
//! What they hold the code to: every schema file is the envelope followed by its event's own
//! fields and matches its Rust struct field for field; every event type survives the Avro and
//! JSON round trips; schema evolution follows Avro's resolution rules; bytes another Avro
//! producer writes are bytes we read; every malformed record gets the `DecodeError` that names
//! what is wrong; and derived IDs never change by accident.

use std::collections::BTreeSet;

use apache_avro::rabin::Rabin;
use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::schema::RecordSchema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{GenericSingleObjectReader, GenericSingleObjectWriter, Schema};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::json;

use super::codec::{Codec, DecodeError, DecodeHints, validate};
use super::*;
use crate::topics;

type TestResult = Result<(), Box<dyn std::error::Error>>;

const ENVELOPE_SCHEMA: &str = include_str!("../../schemas/envelope.avsc");

/// The producer contract's example order, exactly as documented for producers.
const CONTRACT_JSON: &str = r#"{"order_id": "o-1001", "store_id": "store-7", "customer_id": "c-42", "email": "ada@example.com", "currency": "USD", "shipping_country": "US", "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1999}], "placed_at": "2026-11-21T10:00:00Z"}"#;

/// `2026-11-21T10:00:00Z` in milliseconds since the epoch.
const PLACED_AT_MS: i64 = 1_795_255_200_000;

/// `order_created_id("store-7", "o-1001")`, computed independently (Python `uuid.uuid5`).
const CONTRACT_EVENT_ID: &str = "f0777b02-c7df-5e3c-adae-4c5166631c41";

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

/// Runs `$body` with `$e` bound to the event's inner struct. The match is exhaustive, so a
/// new event type does not compile here until these tests know about it.
macro_rules! with_inner {
    ($event:expr, $e:ident => $body:expr) => {
        match $event {
            Event::OrderCreated($e) => $body,
            Event::OrderScreened($e) => $body,
            Event::StockRestocked($e) => $body,
            Event::StockAdjusted($e) => $body,
            Event::ThresholdSet($e) => $body,
            Event::StockReserved($e) => $body,
            Event::StockRejected($e) => $body,
            Event::StockReleased($e) => $body,
            Event::StockLevelChanged($e) => $body,
            Event::LowStock($e) => $body,
            Event::StockRecovered($e) => $body,
            Event::PaymentAuthorized($e) => $body,
            Event::PaymentRetrying($e) => $body,
            Event::PaymentFailed($e) => $body,
            Event::PaymentRefunded($e) => $body,
            Event::Picking($e) => $body,
            Event::Packed($e) => $body,
            Event::ReadyToShip($e) => $body,
            Event::OrderCancelled($e) => $body,
            Event::CancellationAccepted($e) => $body,
            Event::CancellationRefused($e) => $body,
            Event::CarrierScan($e) => $body,
            Event::Shipped($e) => $body,
            Event::InTransit($e) => $body,
            Event::OutForDelivery($e) => $body,
            Event::Delivered($e) => $body,
            Event::DeliveryFailed($e) => $body,
            Event::DeliveryAnomaly($e) => $body,
            Event::ReplenishmentRequested($e) => $body,
        }
    };
}

/// The flat JSON object a producer would send for `event` (no `event_type` field).
fn inner_json(event: &Event) -> serde_json::Result<serde_json::Value> {
    with_inner!(event, e => serde_json::to_value(e))
}

fn header(t: EventType) -> DecodeHints<'static> {
    DecodeHints {
        header_type: Some(t.name()),
        topic_default: None,
        origin: None,
    }
}

fn topic(base: &str) -> DecodeHints<'static> {
    DecodeHints {
        header_type: None,
        topic_default: topics::default_event_type(base),
        origin: None,
    }
}

fn record(schema: &Schema) -> &RecordSchema {
    match schema {
        Schema::Record(r) => r,
        other => panic!("expected a record schema, got {other:?}"),
    }
}

fn fingerprint(schema: &Schema) -> Vec<u8> {
    schema.fingerprint::<Rabin>().bytes
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The event the contract example describes, envelope defaults filled in as documented.
fn contract_order() -> OrderCreated {
    OrderCreated {
        envelope: Envelope {
            event_id: CONTRACT_EVENT_ID.into(),
            order_id: Some("o-1001".into()),
            store_id: "store-7".into(),
            correlation_id: "o-1001".into(),
            causation_id: None,
            occurred_at: PLACED_AT_MS,
            schema_version: 1,
        },
        customer_id: "c-42".into(),
        email: "ada@example.com".into(),
        currency: "USD".into(),
        shipping_country: "US".into(),
        items: vec![OrderLine {
            sku: "SKU-1".into(),
            quantity: 2,
            unit_price_cents: 1999,
        }],
        placed_at: PLACED_AT_MS,
    }
}

/// The envelope of a stock command: no order.
fn stock_envelope() -> Envelope {
    Envelope {
        event_id: derive_id("admin-cmd-1", "admin", 0).to_string(),
        order_id: None,
        store_id: "store-7".into(),
        correlation_id: "admin-cmd-1".into(),
        causation_id: None,
        occurred_at: PLACED_AT_MS,
        schema_version: 1,
    }
}

fn restock(quantity: i32) -> Event {
    Event::StockRestocked(StockRestocked {
        envelope: stock_envelope(),
        sku: "SKU-1".into(),
        quantity,
        note: Some("pallet 12".into()),
    })
}

fn threshold_set(threshold: i32) -> Event {
    Event::ThresholdSet(ThresholdSet {
        envelope: stock_envelope(),
        sku: "SKU-1".into(),
        threshold,
    })
}

/// The current OrderCreated schema with one more optional field, `gift_note`, defaulting to
/// null: the kind of change a producer team makes without coordinating with us.
fn order_created_with_gift_note() -> Result<String, Box<dyn std::error::Error>> {
    let mut schema: serde_json::Value =
        serde_json::from_str(EventType::OrderCreated.schema_source())?;
    schema["fields"]
        .as_array_mut()
        .ok_or("OrderCreated schema has no fields array")?
        .push(json!({"name": "gift_note", "type": ["null", "string"], "default": null}));
    Ok(serde_json::to_string(&schema)?)
}

fn avro_datum(schema: &Schema, value: Value) -> Result<Vec<u8>, apache_avro::Error> {
    GenericDatumWriter::builder(schema)
        .build()?
        .write_value_to_vec(value)
}

fn read_datum(
    writer: &Schema,
    reader: &Schema,
    mut datum: &[u8],
) -> Result<Value, apache_avro::Error> {
    GenericDatumReader::builder(writer)
        .reader_schema(reader)
        .build()?
        .read_value(&mut datum)
}

fn field<'v>(value: &'v Value, name: &str) -> Option<&'v Value> {
    match value {
        Value::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, v)| v),
        _ => None,
    }
}

fn field_names(value: &Value) -> Vec<&str> {
    match value {
        Value::Record(fields) => fields.iter().map(|(n, _)| n.as_str()).collect(),
        _ => Vec::new(),
    }
}

/// CRC-64-AVRO written from the Avro specification, independent of apache-avro's `Rabin`.
fn crc64_avro(data: &[u8]) -> u64 {
    const EMPTY: u64 = 0xc15d_213a_a4d7_a795;
    data.iter().fold(EMPTY, |fp, &b| {
        let mut x = (fp ^ u64::from(b)) & 0xff;
        for _ in 0..8 {
            x = (x >> 1) ^ (EMPTY & (x & 1).wrapping_neg());
        }
        (fp >> 8) ^ x
    })
}

// ---------------------------------------------------------------------------------------
// Generators: a valid random event of any type, driven by the type's Avro schema
// ---------------------------------------------------------------------------------------

/// Any Avro value of `schema`. Fields named in [`valid_field`] get narrower strategies so
/// that the event passes `validate`; everything else ranges over its whole Avro type
/// (any UTF-8 string, any int, any long), so new fields are covered without touching this.
fn arb_value(t: EventType, schema: &Schema) -> BoxedStrategy<Value> {
    match schema {
        Schema::Null => Just(Value::Null).boxed(),
        Schema::Boolean => any::<bool>().prop_map(Value::Boolean).boxed(),
        Schema::Int => any::<i32>().prop_map(Value::Int).boxed(),
        Schema::Long => any::<i64>().prop_map(Value::Long).boxed(),
        Schema::String => any::<String>().prop_map(Value::String).boxed(),
        Schema::TimestampMillis => any::<i64>().prop_map(Value::TimestampMillis).boxed(),
        Schema::Enum(e) => {
            let symbols: Vec<(u32, String)> = (0u32..).zip(e.symbols.iter().cloned()).collect();
            proptest::sample::select(symbols)
                .prop_map(|(i, s)| Value::Enum(i, s))
                .boxed()
        }
        Schema::Array(a) => proptest::collection::vec(arb_value(t, &a.items), 0..4)
            .prop_map(Value::Array)
            .boxed(),
        Schema::Union(u) => {
            let variants: Vec<BoxedStrategy<Value>> = (0u32..)
                .zip(u.variants())
                .map(|(i, v)| {
                    arb_value(t, v)
                        .prop_map(move |v| Value::Union(i, Box::new(v)))
                        .boxed()
                })
                .collect();
            proptest::strategy::Union::new(variants).boxed()
        }
        Schema::Record(r) => {
            let fields: Vec<BoxedStrategy<(String, Value)>> = r
                .fields
                .iter()
                .map(|f| {
                    let name = f.name.clone();
                    valid_field(t, &f.name, &f.schema)
                        .unwrap_or_else(|| arb_value(t, &f.schema))
                        .prop_map(move |v| (name.clone(), v))
                        .boxed()
                })
                .collect();
            fields.prop_map(Value::Record).boxed()
        }
        other => panic!("{t}: no generator for schema {other:?}; extend arb_value"),
    }
}

/// Narrower strategies for the fields `validate` constrains (field names are unique within
/// each event, nested records included, so a name identifies the field).
fn valid_field(t: EventType, name: &str, schema: &Schema) -> Option<BoxedStrategy<Value>> {
    use EventType::{OrderCreated, StockRestocked, ThresholdSet};
    let non_empty = || any::<String>().prop_map(|s| Value::String(format!("x{s}")));
    Some(match (t, name) {
        (_, "event_id") => any::<u128>()
            .prop_map(|n| Value::String(uuid::Uuid::from_u128(n).to_string()))
            .boxed(),
        (_, "store_id") => any::<String>()
            .prop_map(|s| Value::String(format!("store-{s}")))
            .boxed(),
        (OrderCreated, "order_id") => non_empty()
            .prop_map(|v| Value::Union(1, Box::new(v)))
            .boxed(),
        (OrderCreated, "customer_id" | "sku") => non_empty().boxed(),
        (OrderCreated, "currency") => "[A-Z]{3}".prop_map(Value::String).boxed(),
        (OrderCreated, "items") => {
            let Schema::Array(a) = schema else {
                panic!("OrderCreated.items is not an array")
            };
            proptest::collection::vec(arb_value(t, &a.items), 1..4)
                .prop_map(Value::Array)
                .boxed()
        }
        // At most 3 lines of at most 1e6 × 1e12: the total stays far below i64::MAX.
        (OrderCreated, "quantity") => (1..=1_000_000i32).prop_map(Value::Int).boxed(),
        (OrderCreated, "unit_price_cents") => {
            (0..=1_000_000_000_000i64).prop_map(Value::Long).boxed()
        }
        (StockRestocked, "quantity") => (1..=i32::MAX).prop_map(Value::Int).boxed(),
        (ThresholdSet, "threshold") => (0..=i32::MAX).prop_map(Value::Int).boxed(),
        _ => return None,
    })
}

fn arb_event_value(t: EventType) -> BoxedStrategy<Value> {
    let schema = Schema::parse_str(t.schema_source()).expect("embedded schema parses");
    arb_value(t, &schema)
}

fn fail(e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(e.to_string())
}

/// What decoding `event` must give: an OrderCreated's ID is always re-derived from store and
/// order, whatever the producer sent.
fn normalized(event: &Event) -> Event {
    let mut expected = event.clone();
    if let Event::OrderCreated(o) = &mut expected {
        let order_id = o
            .envelope
            .order_id
            .as_deref()
            .expect("generated orders have an order_id");
        o.envelope.event_id = order_created_id(&o.envelope.store_id, order_id).to_string();
    }
    if let Event::OrderCancelled(c) = &mut expected
        && let Some(order_id) = c.envelope.order_id.as_deref()
    {
        c.envelope.event_id = order_cancelled_id(&c.envelope.store_id, order_id).to_string();
    }
    expected
}

#[test]
fn an_order_cancelled_is_identified_by_store_and_order() -> TestResult {
    let codec = Codec::new();
    let hints = DecodeHints {
        topic_default: topics::default_event_type(topics::ORDER_CANCELLED),
        ..DecodeHints::default()
    };
    let mut ids = BTreeSet::new();
    for (event_id, reason) in [
        ("", "once"),
        (
            r#""event_id": "00000000-0000-0000-0000-000000000001","#,
            "twice",
        ),
    ] {
        let json =
            format!(r#"{{{event_id} "order_id": "o-1", "store_id": "s-1", "reason": "{reason}"}}"#);
        let Event::OrderCancelled(c) = codec.decode(json.as_bytes(), hints)? else {
            return Err("not an OrderCancelled".into());
        };
        assert_eq!(c.reason.as_deref(), Some(reason));
        assert_eq!(c.envelope.correlation_id, "o-1");
        ids.insert(c.envelope.event_id);
    }
    assert_eq!(
        ids.into_iter().collect::<Vec<_>>(),
        [order_cancelled_id("s-1", "o-1").to_string()]
    );
    Ok(())
}

fn check_round_trip(codec: &Codec, t: EventType, value: &Value) -> Result<(), TestCaseError> {
    let event = Event::from_avro(t, value).map_err(fail)?;
    prop_assert_eq!(event.event_type(), t);
    // Otherwise the property would only exercise the rejection path.
    validate(&event).map_err(fail)?;
    let expected = normalized(&event);
    let schema = codec.schema(t);

    // The Rust struct names exactly the schema's fields.
    let json = inner_json(&event).map_err(fail)?;
    let json_keys: BTreeSet<&str> = json
        .as_object()
        .ok_or_else(|| fail("inner struct is not a JSON object"))?
        .keys()
        .map(String::as_str)
        .collect();
    let schema_fields: BTreeSet<&str> = record(schema)
        .fields
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    prop_assert_eq!(json_keys, schema_fields);

    // Avro: header, then exactly the datum the generic value has (so no field is lost or
    // defaulted on the way through the Rust type), and back.
    let bytes = codec.encode(&event).map_err(fail)?;
    prop_assert_eq!(&bytes[..2], &[0xC3, 0x01][..]);
    let spec_fp = crc64_avro(spec_canonical_form(schema).as_bytes()).to_le_bytes();
    prop_assert_eq!(&bytes[2..10], &spec_fp[..]);
    let datum = avro_datum(schema, value.clone()).map_err(fail)?;
    prop_assert_eq!(&bytes[10..], &datum[..]);
    let decoded = codec.decode(&bytes, DecodeHints::default()).map_err(fail)?;
    prop_assert_eq!(&decoded, &expected);

    // JSON of the same struct, typed by the `event-type` header…
    let json_bytes = serde_json::to_vec(&json).map_err(fail)?;
    let from_header = codec.decode(&json_bytes, header(t)).map_err(fail)?;
    prop_assert_eq!(&from_header, &expected);
    // …or by an `event_type` field in the value itself.
    let mut typed = json;
    typed
        .as_object_mut()
        .ok_or_else(|| fail("not an object"))?
        .insert("event_type".into(), json!(t.name()));
    let from_field = codec
        .decode(
            &serde_json::to_vec(&typed).map_err(fail)?,
            DecodeHints::default(),
        )
        .map_err(fail)?;
    prop_assert_eq!(&from_field, &expected);
    // Confluent framing (unmapped schema ID), typed by the header.
    let mut framed = vec![0x00, 0x00, 0x00, 0x00, 0x2a];
    framed.extend_from_slice(&datum);
    let confluent = codec.decode(&framed, header(t)).map_err(fail)?;
    prop_assert_eq!(&confluent, &expected);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 1. Schema files
// ---------------------------------------------------------------------------------------

#[test]
fn every_schema_parses_and_its_record_is_named_after_its_event_type() -> TestResult {
    assert_eq!(EventType::ALL.len(), 29);
    let codec = Codec::new();
    for &t in EventType::ALL {
        let schema = Schema::parse_str(t.schema_source())?;
        let r = record(&schema);
        assert_eq!(r.name.name(), t.name(), "{}", t.schema_file());
        assert_eq!(r.name.namespace(), Some("io.orderflow.events"), "{t}");
        assert_eq!(t.to_string(), t.name());
        assert_eq!(EventType::from_name(t.name()), Some(t));
        // The file is the snake_case of the record name.
        let snake: String = t
            .name()
            .chars()
            .enumerate()
            .flat_map(|(i, c)| {
                let sep = (i > 0 && c.is_ascii_uppercase()).then_some('_');
                sep.into_iter()
                    .chain(std::iter::once(c.to_ascii_lowercase()))
            })
            .collect();
        assert_eq!(t.schema_file(), format!("{snake}.avsc"));
        assert_eq!(
            codec.schema(t).canonical_form(),
            schema.canonical_form(),
            "{t}"
        );
    }
    assert_eq!(EventType::from_name("orderCreated"), None);
    assert_eq!(EventType::from_name("Envelope"), None);
    Ok(())
}

#[test]
fn every_schema_file_belongs_to_exactly_one_event_type() -> TestResult {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
    let mut on_disk = BTreeSet::new();
    for entry in std::fs::read_dir(&dir)? {
        let name = entry?
            .file_name()
            .into_string()
            .map_err(|n| format!("{n:?}"))?;
        if name.ends_with(".avsc") {
            on_disk.insert(name);
        }
    }
    let mut declared: BTreeSet<String> = EventType::ALL
        .iter()
        .map(|t| t.schema_file().to_owned())
        .collect();
    assert_eq!(
        declared.len(),
        EventType::ALL.len(),
        "two event types share a schema file"
    );
    declared.insert("envelope.avsc".into());
    assert_eq!(on_disk, declared);
    for &t in EventType::ALL {
        assert_eq!(
            std::fs::read_to_string(dir.join(t.schema_file()))?,
            t.schema_source()
        );
    }
    Ok(())
}

#[test]
fn every_schema_begins_with_exactly_the_envelope_fields() -> TestResult {
    let envelope: serde_json::Value = serde_json::from_str(ENVELOPE_SCHEMA)?;
    let envelope_fields = envelope["fields"]
        .as_array()
        .ok_or("envelope has no fields")?;
    let names: Vec<&str> = envelope_fields
        .iter()
        .filter_map(|f| f["name"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "event_id",
            "order_id",
            "store_id",
            "correlation_id",
            "causation_id",
            "occurred_at",
            "schema_version"
        ]
    );
    // The Rust envelope carries the same fields.
    let rust_keys: BTreeSet<String> = serde_json::to_value(stock_envelope())?
        .as_object()
        .ok_or("envelope is not an object")?
        .keys()
        .cloned()
        .collect();
    assert_eq!(rust_keys, names.iter().map(|n| n.to_string()).collect());
    let parsed_envelope = Schema::parse_str(ENVELOPE_SCHEMA)?;
    let parsed_envelope = record(&parsed_envelope);

    for &t in EventType::ALL {
        let schema: serde_json::Value = serde_json::from_str(t.schema_source())?;
        let fields = schema["fields"].as_array().ok_or("no fields")?;
        assert!(
            fields.len() >= envelope_fields.len(),
            "{t} is shorter than the envelope"
        );
        for (i, (f, e)) in fields.iter().zip(envelope_fields).enumerate() {
            assert_eq!(f["name"], e["name"], "{t} field {i}: name");
            assert_eq!(f["type"], e["type"], "{t} field {i}: type");
            assert_eq!(f.get("default"), e.get("default"), "{t} field {i}: default");
        }
        // No event field repeats an envelope field further down.
        let all: Vec<&str> = fields.iter().filter_map(|f| f["name"].as_str()).collect();
        let unique: BTreeSet<&str> = all.iter().copied().collect();
        assert_eq!(unique.len(), all.len(), "{t} repeats a field name");

        // And as Avro sees them after parsing (the type's canonical form, the default).
        let parsed = Schema::parse_str(t.schema_source())?;
        for (f, e) in record(&parsed).fields.iter().zip(&parsed_envelope.fields) {
            assert_eq!(f.name, e.name, "{t}");
            assert_eq!(
                f.schema.canonical_form(),
                e.schema.canonical_form(),
                "{t}.{}",
                f.name
            );
            assert_eq!(f.default, e.default, "{t}.{}", f.name);
        }
    }
    Ok(())
}

#[test]
fn every_event_type_has_its_own_fingerprint() {
    let codec = Codec::new();
    let fingerprints: BTreeSet<Vec<u8>> = EventType::ALL
        .iter()
        .map(|&t| fingerprint(codec.schema(t)))
        .collect();
    // Several events (Picking, Packed, …) have the same fields; only the record name tells
    // them apart, and it must, or the codec would decode one as the other.
    assert_eq!(fingerprints.len(), EventType::ALL.len());
}

// ---------------------------------------------------------------------------------------
// 2. Round trips
// ---------------------------------------------------------------------------------------

/// Runs the property per event type, rather than over one union of all types, so that every
/// type is guaranteed its share of cases.
#[test]
fn avro_json_and_confluent_round_trip_every_event_type() -> TestResult {
    let codec = Codec::new();
    for &t in EventType::ALL {
        let mut runner = TestRunner::new(ProptestConfig::with_cases(48));
        runner
            .run(&arb_event_value(t), |value| {
                check_round_trip(&codec, t, &value)
            })
            .map_err(|e| format!("{t}: {e}"))?;
    }
    Ok(())
}

#[test]
fn event_type_field_wins_over_header_and_topic_default() -> TestResult {
    let codec = Codec::new();
    let mut json = inner_json(&restock(5))?;
    json["event_type"] = json!("StockRestocked");
    let hints = DecodeHints {
        header_type: Some("ThresholdSet"),
        topic_default: Some(EventType::OrderCreated),
        origin: None,
    };
    assert_eq!(
        codec.decode(&serde_json::to_vec(&json)?, hints)?,
        restock(5)
    );
    // And the header wins over the topic default.
    json.as_object_mut()
        .ok_or("not an object")?
        .remove("event_type");
    let hints = DecodeHints {
        header_type: Some("StockRestocked"),
        topic_default: Some(EventType::OrderCreated),
        origin: None,
    };
    assert_eq!(
        codec.decode(&serde_json::to_vec(&json)?, hints)?,
        restock(5)
    );
    Ok(())
}

proptest! {
    /// The codec's invariant: no input panics, and whatever it accepts is valid.
    #[test]
    fn decode_never_panics_and_accepts_only_valid_events(
        t in proptest::sample::select(EventType::ALL),
        prefix_kind in 0..4u8,
        tail in proptest::collection::vec(any::<u8>(), 0..48),
    ) {
        let codec = Codec::new();
        let mut bytes = match prefix_kind {
            0 => vec![0xC3, 0x01],
            1 => [&[0xC3, 0x01][..], &fingerprint(codec.schema(t))].concat(),
            2 => vec![0x00, 0x00, 0x00, 0x00, 0x01],
            _ => b"{".to_vec(),
        };
        bytes.extend_from_slice(&tail);
        for hints in [DecodeHints::default(), header(t), topic(topics::ORDER_CREATED)] {
            if let Ok(event) = codec.decode(&bytes, hints) {
                prop_assert!(validate(&event).is_ok());
            }
        }
    }

    /// Outputs are written and read straight between bytes and events; that must give
    /// exactly the bytes, and the events, of Avro's generic path (a `Value` tree resolved
    /// against the schema), which other Avro libraries agree with.
    #[test]
    fn direct_encoding_equals_the_generic_avro_path(
        (t, value) in proptest::sample::select(EventType::ALL)
            .prop_flat_map(|t| arb_event_value(t).prop_map(move |v| (t, v))),
    ) {
        let codec = Codec::new();
        let event = Event::from_avro(t, &value).map_err(fail)?;
        let schema = codec.schema(t);
        let direct = codec.encode(&event).map_err(fail)?;
        let generic = avro_datum(schema, event.to_avro().and_then(|v| v.resolve(schema)).map_err(fail)?)
            .map_err(fail)?;
        prop_assert_eq!(&direct[10..], &generic[..]);
        let read_back = Event::from_avro(t, &read_datum(schema, schema, &generic).map_err(fail)?)
            .map_err(fail)?;
        prop_assert_eq!(codec.decode(&direct, DecodeHints::default()).map_err(fail)?, normalized(&read_back));
    }

    /// Damaged valid records (a byte changed, or cut short) are rejected or still valid.
    #[test]
    fn damaged_records_never_panic(
        value in arb_event_value(EventType::OrderCreated),
        at in any::<proptest::sample::Index>(),
        byte in any::<u8>(),
        cut in any::<bool>(),
    ) {
        let codec = Codec::new();
        let event = Event::from_avro(EventType::OrderCreated, &value).map_err(fail)?;
        let mut bytes = codec.encode(&event).map_err(fail)?;
        let i = at.index(bytes.len());
        if cut {
            bytes.truncate(i);
        } else {
            bytes[i] = byte;
        }
        if let Ok(event) = codec.decode(&bytes, DecodeHints::default()) {
            prop_assert!(validate(&event).is_ok());
        }
    }
}

// ---------------------------------------------------------------------------------------
// 3. Schema evolution
// ---------------------------------------------------------------------------------------

#[test]
fn avro_resolution_fills_an_added_optional_field_and_drops_it_for_old_readers() -> TestResult {
    let current = Schema::parse_str(EventType::OrderCreated.schema_source())?;
    let newer = Schema::parse_str(&order_created_with_gift_note()?)?;
    SchemaCompatibility::can_read(&current, &newer)?;
    SchemaCompatibility::can_read(&newer, &current)?;
    let order = Event::OrderCreated(contract_order());

    // Old writer, new reader: the added field takes its default.
    let old_datum = avro_datum(&current, order.to_avro()?.resolve(&current)?)?;
    let read = read_datum(&current, &newer, &old_datum)?;
    assert_eq!(field_names(&read).last(), Some(&"gift_note"));
    assert_eq!(
        field(&read, "gift_note"),
        Some(&Value::Union(0, Box::new(Value::Null)))
    );
    assert_eq!(Event::from_avro(EventType::OrderCreated, &read)?, order);

    // New writer with the field set, old reader: the field is skipped, the rest is intact.
    let Value::Record(mut fields) = order.to_avro()?.resolve(&newer)? else {
        return Err("resolved value is not a record".into());
    };
    let gift = fields
        .iter_mut()
        .find(|(n, _)| n == "gift_note")
        .ok_or("no gift_note")?;
    gift.1 = Value::Union(1, Box::new(Value::String("leave at the door".into())));
    let new_datum = avro_datum(&newer, Value::Record(fields))?;
    assert!(new_datum.len() > old_datum.len());
    let read = read_datum(&newer, &current, &new_datum)?;
    let names: Vec<&str> = record(&current)
        .fields
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert_eq!(field_names(&read), names);
    assert_eq!(Event::from_avro(EventType::OrderCreated, &read)?, order);
    Ok(())
}

#[test]
fn avro_resolution_rejects_an_added_field_without_default() -> TestResult {
    let mut schema: serde_json::Value =
        serde_json::from_str(EventType::OrderCreated.schema_source())?;
    schema["fields"]
        .as_array_mut()
        .ok_or("no fields")?
        .push(json!({"name": "channel", "type": "string"}));
    let current = Schema::parse_str(EventType::OrderCreated.schema_source())?;
    let strict = Schema::parse_str(&serde_json::to_string(&schema)?)?;
    assert!(SchemaCompatibility::can_read(&current, &strict).is_err());
    let datum = avro_datum(
        &current,
        Event::OrderCreated(contract_order())
            .to_avro()?
            .resolve(&current)?,
    )?;
    let err = read_datum(&current, &strict, &datum)
        .err()
        .ok_or("resolution should fail")?;
    assert!(err.to_string().contains("channel"), "{err}");
    Ok(())
}

#[test]
fn codec_reads_records_from_a_registered_newer_writer_schema() -> TestResult {
    let newer_json = order_created_with_gift_note()?;
    let newer = Schema::parse_str(&newer_json)?;
    let newer_fp = fingerprint(&newer);
    let order = Event::OrderCreated(contract_order());
    let mut codec = Codec::new();
    assert_ne!(newer_fp, fingerprint(codec.schema(EventType::OrderCreated)));

    let bytes = codec.encode_with(&order, &newer, &newer_fp)?;
    assert_eq!(&bytes[2..10], &newer_fp[..]);
    // Unknown until registered…
    match codec.decode(&bytes, DecodeHints::default()) {
        Err(DecodeError::UnknownFingerprint(fp)) => assert_eq!(fp, hex(&newer_fp)),
        other => panic!("expected UnknownFingerprint, got {other:?}"),
    }
    // …then read into the same event as the current schema gives.
    codec.register_writer_schema(EventType::OrderCreated, &newer_json)?;
    assert_eq!(codec.decode(&bytes, DecodeHints::default())?, order);
    assert_eq!(
        codec.decode(&codec.encode(&order)?, DecodeHints::default())?,
        order
    );

    // A record another producer wrote with the new field set (GenericSingleObjectWriter,
    // not our encoder) reads the same: the unknown field is skipped.
    let Value::Record(mut fields) = order.to_avro()?.resolve(&newer)? else {
        return Err("resolved value is not a record".into());
    };
    let gift = fields
        .iter_mut()
        .find(|(n, _)| n == "gift_note")
        .ok_or("no gift_note")?;
    gift.1 = Value::Union(1, Box::new(Value::String("happy birthday".into())));
    let mut foreign = Vec::new();
    GenericSingleObjectWriter::new_with_capacity(&newer, 256)?
        .write_value(Value::Record(fields), &mut foreign)?;
    assert_eq!(codec.decode(&foreign, DecodeHints::default())?, order);
    Ok(())
}

#[test]
fn codec_reads_records_from_a_registered_older_writer_schema() -> TestResult {
    // StockRestocked as it was before `note` existed.
    let mut schema: serde_json::Value =
        serde_json::from_str(EventType::StockRestocked.schema_source())?;
    let fields = schema["fields"].as_array_mut().ok_or("no fields")?;
    let before = fields.len();
    fields.retain(|f| f["name"] != "note");
    assert_eq!(fields.len(), before - 1);
    let older_json = serde_json::to_string(&schema)?;
    let older = Schema::parse_str(&older_json)?;

    let mut codec = Codec::new();
    codec.register_writer_schema(EventType::StockRestocked, &older_json)?;
    // An old producer cannot say anything about the note: it reads as none.
    let bytes = codec.encode_with(&restock(5), &older, &fingerprint(&older))?;
    let Event::StockRestocked(mut expected) = restock(5) else {
        unreachable!()
    };
    expected.note = None;
    assert_eq!(
        codec.decode(&bytes, DecodeHints::default())?,
        Event::StockRestocked(expected)
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 4. Framing and decode errors
// ---------------------------------------------------------------------------------------

fn order_datum(codec: &Codec) -> Result<Vec<u8>, apache_avro::Error> {
    Ok(codec.encode(&Event::OrderCreated(contract_order()))?[10..].to_vec())
}

fn confluent(id: u32, datum: &[u8]) -> Vec<u8> {
    [&[0x00][..], &id.to_be_bytes(), datum].concat()
}

#[test]
fn confluent_framing_takes_its_type_from_the_topic_default() -> TestResult {
    let codec = Codec::new();
    let bytes = confluent(101, &order_datum(&codec)?);
    let event = codec.decode(&bytes, topic(topics::ORDER_CREATED))?;
    assert_eq!(event, Event::OrderCreated(contract_order()));
    // Without anything that names the type, it cannot be read.
    let err = codec
        .decode(&bytes, topic(topics::INVENTORY_COMMANDS))
        .unwrap_err();
    assert!(matches!(err, DecodeError::MissingEventType), "{err:?}");
    Ok(())
}

#[test]
fn confluent_framing_takes_its_type_from_a_mapped_schema_id() -> TestResult {
    let mut codec = Codec::new();
    codec.map_confluent_id(7, EventType::StockRestocked);
    codec.map_confluent_id(8, EventType::OrderCreated);
    let restock_datum = codec.encode(&restock(5))?[10..].to_vec();
    assert_eq!(
        codec.decode(&confluent(7, &restock_datum), DecodeHints::default())?,
        restock(5)
    );
    // The mapping is more specific than the topic's default, so it wins.
    assert_eq!(
        codec.decode(&confluent(7, &restock_datum), topic(topics::ORDER_CREATED))?,
        restock(5)
    );
    assert_eq!(
        codec.decode(&confluent(8, &order_datum(&codec)?), DecodeHints::default())?,
        Event::OrderCreated(contract_order())
    );
    // An unmapped ID with a header naming no known type.
    let err = codec
        .decode(
            &confluent(9, &restock_datum),
            DecodeHints {
                header_type: Some("StockRestock"),
                topic_default: None,
                origin: None,
            },
        )
        .unwrap_err();
    assert!(
        matches!(&err, DecodeError::UnknownEventType(n) if n == "StockRestock"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), r#"unknown event type "StockRestock""#);
    Ok(())
}

#[test]
fn a_single_object_record_with_an_unknown_fingerprint_is_a_schema_error() -> TestResult {
    let codec = Codec::new();
    let mut bytes = codec.encode(&Event::OrderCreated(contract_order()))?;
    bytes[2..10].copy_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0x00, 0x01, 0x02, 0x03]);
    let err = codec
        .decode(&bytes, header(EventType::OrderCreated))
        .unwrap_err();
    assert!(
        matches!(&err, DecodeError::UnknownFingerprint(fp) if fp == "deadbeef00010203"),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "Avro single-object record with unknown schema fingerprint deadbeef00010203"
    );
    assert_eq!(err.class(), "schema");
    Ok(())
}

#[test]
fn truncated_headers_are_reported_as_such() {
    let codec = Codec::new();
    for (bytes, what) in [
        (&[0xC3, 0x01][..], "single-object"),
        (
            &[0xC3, 0x01, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77][..],
            "single-object",
        ),
        (&[0x00][..], "Confluent"),
        (&[0x00, 0x00, 0x00, 0x01][..], "Confluent"),
    ] {
        let err = codec
            .decode(bytes, topic(topics::ORDER_CREATED))
            .unwrap_err();
        assert!(
            matches!(err, DecodeError::Truncated(w) if w == what),
            "{bytes:x?}: {err:?}"
        );
        assert_eq!(err.to_string(), format!("truncated {what} header"));
        assert_eq!(err.class(), "decode");
    }
}

#[test]
fn a_header_without_a_datum_or_a_cut_datum_is_malformed_avro() -> TestResult {
    let codec = Codec::new();
    let full = codec.encode(&Event::OrderCreated(contract_order()))?;
    for len in [10, 11, full.len() - 1] {
        let err = codec
            .decode(&full[..len], DecodeHints::default())
            .unwrap_err();
        match &err {
            DecodeError::Avro {
                event_type,
                message,
            } => {
                assert_eq!(*event_type, EventType::OrderCreated);
                assert!(!message.is_empty());
            }
            other => panic!("cut at {len}: expected Avro, got {other:?}"),
        }
        assert!(
            err.to_string()
                .starts_with("malformed Avro for OrderCreated: "),
            "{err}"
        );
        assert_eq!(err.class(), "schema");
    }
    Ok(())
}

#[test]
fn trailing_bytes_after_the_datum_are_rejected() -> TestResult {
    let codec = Codec::new();
    let mut bytes = codec.encode(&restock(3))?;
    bytes.extend_from_slice(&[0x00, 0x02]);
    let err = codec.decode(&bytes, DecodeHints::default()).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Avro {
                event_type: EventType::StockRestocked,
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "malformed Avro for StockRestocked: 2 trailing bytes after the datum"
    );
    // Same for Confluent framing.
    let mut framed = confluent(1, &codec.encode(&restock(3))?[10..]);
    framed.push(0x00);
    let err = codec
        .decode(&framed, header(EventType::StockRestocked))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "malformed Avro for StockRestocked: 1 trailing bytes after the datum"
    );
    Ok(())
}

#[test]
fn garbage_and_empty_values_are_not_any_known_encoding() {
    let codec = Codec::new();
    let err = codec
        .decode(b"\x07\x08garbage", topic(topics::ORDER_CREATED))
        .unwrap_err();
    assert!(matches!(err, DecodeError::UnknownFormat(0x07)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "unrecognized encoding: first byte 0x07 is neither Avro single-object (0xc3 0x01), Confluent framing (0x00) nor a JSON object ('{')"
    );
    assert_eq!(err.class(), "decode");

    // 0xC3 alone is not the single-object magic.
    let err = codec
        .decode(b"\xc3\x02abcdefgh", DecodeHints::default())
        .unwrap_err();
    assert!(matches!(err, DecodeError::UnknownFormat(0xc3)), "{err:?}");

    let err = codec.decode(b"", topic(topics::ORDER_CREATED)).unwrap_err();
    assert!(matches!(err, DecodeError::Empty), "{err:?}");
    assert_eq!(err.to_string(), "empty record value");
    assert_eq!(err.class(), "decode");
}

#[test]
fn json_that_is_not_an_object_is_rejected() {
    let codec = Codec::new();
    // Arrays and strings are JSON, but not an event.
    for bytes in [&b"[1, 2]"[..], b"  \"OrderCreated\""] {
        let err = codec
            .decode(bytes, topic(topics::ORDER_CREATED))
            .unwrap_err();
        assert!(matches!(err, DecodeError::JsonNotObject), "{err:?}");
        assert_eq!(err.to_string(), "JSON value is not an object");
    }
    // A bare number is not taken for JSON: it names its first byte.
    let err = codec
        .decode(b"42", topic(topics::ORDER_CREATED))
        .unwrap_err();
    assert!(matches!(err, DecodeError::UnknownFormat(b'4')), "{err:?}");
    assert!(err.to_string().contains("nor a JSON object"), "{err}");
    // Something that starts like an object but is not valid JSON.
    for bytes in [&b"{\"order_id\": "[..], b"{} {}", b"{'order_id': 1}"] {
        let err = codec
            .decode(bytes, topic(topics::ORDER_CREATED))
            .unwrap_err();
        match &err {
            DecodeError::Json(message) => assert!(!message.is_empty()),
            other => panic!(
                "{}: expected Json, got {other:?}",
                String::from_utf8_lossy(bytes)
            ),
        }
        assert!(err.to_string().starts_with("invalid JSON: "), "{err}");
        assert_eq!(err.class(), "decode");
    }
    let err = codec
        .decode(b"{} {}", topic(topics::ORDER_CREATED))
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid JSON: trailing characters at line 1 column 4"
    );
}

#[test]
fn json_missing_a_required_field_names_it() -> TestResult {
    let codec = Codec::new();
    let mut json: serde_json::Value = serde_json::from_str(CONTRACT_JSON)?;
    json.as_object_mut().ok_or("not an object")?.remove("items");
    let err = codec
        .decode(&serde_json::to_vec(&json)?, topic(topics::ORDER_CREATED))
        .unwrap_err();
    match &err {
        DecodeError::Invalid {
            event_type,
            field,
            reason,
        } => {
            assert_eq!(*event_type, EventType::OrderCreated);
            assert_eq!(field.as_deref(), Some("items"));
            assert_eq!(reason, "missing field `items`");
        }
        other => panic!("expected Invalid, got {other:?}"),
    }
    assert_eq!(
        err.to_string(),
        "invalid OrderCreated: missing field `items`"
    );
    assert_eq!(err.class(), "invalid");

    // A field of the wrong type is named too.
    json["items"] = json!("SKU-1");
    let err = codec
        .decode(&serde_json::to_vec(&json)?, topic(topics::ORDER_CREATED))
        .unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Invalid {
                event_type: EventType::OrderCreated,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains("invalid type: string \"SKU-1\", expected a sequence"),
        "{err}"
    );
    Ok(())
}

#[test]
fn json_event_type_must_name_a_known_type_as_a_string() -> TestResult {
    let codec = Codec::new();
    let mut json = inner_json(&restock(5))?;
    json["event_type"] = json!("StockRefilled");
    let err = codec
        .decode(
            &serde_json::to_vec(&json)?,
            topic(topics::INVENTORY_COMMANDS),
        )
        .unwrap_err();
    assert!(
        matches!(&err, DecodeError::UnknownEventType(n) if n == "StockRefilled"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), r#"unknown event type "StockRefilled""#);
    assert_eq!(err.class(), "decode");

    json["event_type"] = json!(3);
    let err = codec
        .decode(
            &serde_json::to_vec(&json)?,
            header(EventType::StockRestocked),
        )
        .unwrap_err();
    assert!(matches!(err, DecodeError::Json(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "invalid JSON: `event_type` must be a string, got 3"
    );
    Ok(())
}

#[test]
fn json_without_a_type_on_a_multi_type_topic_is_rejected() -> TestResult {
    let codec = Codec::new();
    assert_eq!(topics::default_event_type(topics::INVENTORY_COMMANDS), None);
    let bytes = serde_json::to_vec(&inner_json(&restock(5))?)?;
    let err = codec
        .decode(&bytes, topic(topics::INVENTORY_COMMANDS))
        .unwrap_err();
    assert!(matches!(err, DecodeError::MissingEventType), "{err:?}");
    assert_eq!(
        err.to_string(),
        "cannot tell the event type: no `event_type` field, no `event-type` header, and the topic carries several types"
    );
    assert_eq!(err.class(), "decode");
    // The same record with the header is fine.
    assert_eq!(
        codec.decode(&bytes, header(EventType::StockRestocked))?,
        restock(5)
    );
    Ok(())
}

#[test]
fn an_avro_record_that_decodes_but_is_invalid_is_rejected_after_decoding() -> TestResult {
    let codec = Codec::new();
    let err = codec
        .decode(&codec.encode(&restock(0))?, DecodeHints::default())
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "invalid StockRestocked: restock quantity 0 is not positive"
    );
    assert_eq!(err.class(), "invalid");
    Ok(())
}

#[test]
fn every_decode_error_has_its_class_and_message() {
    let cases = [
        (DecodeError::Empty, "decode", "empty record value"),
        (
            DecodeError::UnknownFormat(0xff),
            "decode",
            "unrecognized encoding: first byte 0xff is neither Avro single-object (0xc3 0x01), Confluent framing (0x00) nor a JSON object ('{')",
        ),
        (
            DecodeError::UnknownFingerprint("00ff".into()),
            "schema",
            "Avro single-object record with unknown schema fingerprint 00ff",
        ),
        (
            DecodeError::Truncated("Confluent"),
            "decode",
            "truncated Confluent header",
        ),
        (
            DecodeError::Avro {
                event_type: EventType::Shipped,
                message: "boom".into(),
            },
            "schema",
            "malformed Avro for Shipped: boom",
        ),
        (
            DecodeError::Json("EOF".into()),
            "decode",
            "invalid JSON: EOF",
        ),
        (
            DecodeError::JsonNotObject,
            "decode",
            "JSON value is not an object",
        ),
        (
            DecodeError::UnknownEventType("X".into()),
            "decode",
            r#"unknown event type "X""#,
        ),
        (
            DecodeError::MissingEventType,
            "decode",
            "cannot tell the event type: no `event_type` field, no `event-type` header, and the topic carries several types",
        ),
        (
            DecodeError::Invalid {
                event_type: EventType::ThresholdSet,
                field: Some("threshold".into()),
                reason: "threshold -1 is negative".into(),
            },
            "invalid",
            "invalid ThresholdSet: threshold -1 is negative",
        ),
    ];
    for (err, class, message) in cases {
        assert_eq!(err.class(), class, "{err:?}");
        assert_eq!(err.to_string(), message);
    }
}

// ---------------------------------------------------------------------------------------
// 5. Validation
// ---------------------------------------------------------------------------------------

fn invalid_reason(event: &Event) -> String {
    match validate(event) {
        Err(DecodeError::Invalid {
            event_type, reason, ..
        }) => {
            assert_eq!(event_type, event.event_type());
            reason
        }
        other => panic!("expected Invalid for {event:?}, got {other:?}"),
    }
}

fn order_with(change: impl FnOnce(&mut OrderCreated)) -> Event {
    let mut o = contract_order();
    change(&mut o);
    Event::OrderCreated(o)
}

#[test]
fn validate_accepts_the_boundaries() -> TestResult {
    validate(&Event::OrderCreated(contract_order()))?;
    validate(&order_with(|o| {
        o.items = vec![OrderLine {
            sku: "FREE".into(),
            quantity: 1,
            unit_price_cents: 0,
        }]
    }))?;
    validate(&order_with(|o| {
        o.items = vec![OrderLine {
            sku: "MAX".into(),
            quantity: 1,
            unit_price_cents: i64::MAX,
        }]
    }))?;
    validate(&restock(1))?;
    validate(&threshold_set(0))?;
    // Stock events need no order, and other types have no rules beyond the envelope.
    validate(&Event::StockAdjusted(StockAdjusted {
        envelope: stock_envelope(),
        sku: "SKU-1".into(),
        delta: -5,
        reason: "shrinkage".into(),
    }))?;
    Ok(())
}

#[test]
fn validate_rejects_a_bad_envelope() {
    let adjusted = |envelope: Envelope| {
        Event::StockAdjusted(StockAdjusted {
            envelope,
            sku: "SKU-1".into(),
            delta: 1,
            reason: "count".into(),
        })
    };
    for store in ["", "   ", "\t\n"] {
        let mut env = stock_envelope();
        env.store_id = store.into();
        assert_eq!(invalid_reason(&adjusted(env)), "store_id is empty");
    }
    for id in ["", "not-a-uuid", "f0777b02-c7df-5e3c-adae-4c5166631c4"] {
        let mut env = stock_envelope();
        env.event_id = id.into();
        assert_eq!(
            invalid_reason(&adjusted(env)),
            format!("event_id {id:?} is not a UUID")
        );
    }
    // The store is checked first.
    let mut env = stock_envelope();
    env.store_id = String::new();
    env.event_id = "nope".into();
    assert_eq!(invalid_reason(&adjusted(env)), "store_id is empty");
    assert_eq!(
        invalid_reason(&order_with(|o| o.envelope.event_id = "o-1001".into())),
        r#"event_id "o-1001" is not a UUID"#
    );
}

#[test]
fn validate_rejects_impossible_orders() {
    let line = |sku: &str, quantity: i32, unit_price_cents: i64| OrderLine {
        sku: sku.into(),
        quantity,
        unit_price_cents,
    };
    let cases: Vec<(Event, &str)> = vec![
        (
            order_with(|o| o.envelope.order_id = None),
            "order_id is missing",
        ),
        (
            order_with(|o| o.envelope.order_id = Some(String::new())),
            "order_id is missing",
        ),
        (
            order_with(|o| o.customer_id = String::new()),
            "customer_id is empty",
        ),
        (
            order_with(|o| o.currency = "usd".into()),
            r#"currency "usd" is not an ISO 4217 code"#,
        ),
        (
            order_with(|o| o.currency = "US".into()),
            r#"currency "US" is not an ISO 4217 code"#,
        ),
        (
            order_with(|o| o.currency = "USDX".into()),
            r#"currency "USDX" is not an ISO 4217 code"#,
        ),
        (
            order_with(|o| o.currency = "U$D".into()),
            r#"currency "U$D" is not an ISO 4217 code"#,
        ),
        (
            order_with(|o| o.currency = String::new()),
            r#"currency "" is not an ISO 4217 code"#,
        ),
        (order_with(|o| o.items.clear()), "order has no items"),
        (
            order_with(|o| o.items.push(line("", 1, 100))),
            "an item has an empty sku",
        ),
        (
            order_with(|o| o.items[0].quantity = 0),
            "item SKU-1 has quantity 0",
        ),
        (
            order_with(|o| o.items[0].quantity = -2),
            "item SKU-1 has quantity -2",
        ),
        (
            order_with(|o| o.items[0].unit_price_cents = -1),
            "item SKU-1 has a negative price",
        ),
        (
            order_with(|o| o.items = vec![line("BIG", i32::MAX, i64::MAX / 2)]),
            "order total overflows",
        ),
        // Each line fits; their sum does not.
        (
            order_with(|o| o.items = vec![line("A", 1, i64::MAX), line("B", 1, 1)]),
            "order total overflows",
        ),
    ];
    for (event, reason) in cases {
        assert_eq!(invalid_reason(&event), reason);
    }
}

#[test]
fn validate_rejects_impossible_stock_commands() {
    assert_eq!(
        invalid_reason(&restock(0)),
        "restock quantity 0 is not positive"
    );
    assert_eq!(
        invalid_reason(&restock(-4)),
        "restock quantity -4 is not positive"
    );
    assert_eq!(
        invalid_reason(&restock(i32::MIN)),
        format!("restock quantity {} is not positive", i32::MIN)
    );
    assert_eq!(
        invalid_reason(&threshold_set(-1)),
        "threshold -1 is negative"
    );
}

// ---------------------------------------------------------------------------------------
// 6. The producer contract
// ---------------------------------------------------------------------------------------

#[test]
fn the_producer_contract_example_decodes_with_the_topic_default() -> TestResult {
    let codec = Codec::new();
    assert_eq!(
        topics::default_event_type(topics::ORDER_CREATED),
        Some(EventType::OrderCreated)
    );
    let event = codec.decode(CONTRACT_JSON.as_bytes(), topic(topics::ORDER_CREATED))?;
    assert_eq!(event, Event::OrderCreated(contract_order()));
    let env = event.envelope();
    assert_eq!(env.event_id, CONTRACT_EVENT_ID);
    assert_eq!(env.correlation_id, "o-1001");
    assert_eq!(env.occurred_at, PLACED_AT_MS);
    assert_eq!(env.causation_id, None);
    assert_eq!(env.schema_version, 1);
    // And it travels on as Avro unchanged.
    assert_eq!(
        codec.decode(&codec.encode(&event)?, DecodeHints::default())?,
        event
    );
    Ok(())
}

#[test]
fn republishing_the_contract_example_yields_the_same_event() -> TestResult {
    let codec = Codec::new();
    let hints = topic(topics::ORDER_CREATED);
    let first = codec.decode(CONTRACT_JSON.as_bytes(), hints)?;
    let reordered = r#"
        {
          "placed_at": "2026-11-21T10:00:00Z",
          "items": [ { "unit_price_cents": 1999, "quantity": 2, "sku": "SKU-1" } ],
          "shipping_country": "US",   "currency": "USD",
          "email": "ada@example.com", "customer_id": "c-42",
          "store_id": "store-7", "order_id": "o-1001"
        }"#;
    let variants = [
        CONTRACT_JSON.to_owned(),
        reordered.to_owned(),
        serde_json::to_string_pretty(&serde_json::from_str::<serde_json::Value>(CONTRACT_JSON)?)?,
        // A producer that fills in its own (random) event ID still gets the derived one.
        CONTRACT_JSON.replacen(
            '{',
            r#"{"event_id": "5b0b7f5e-2f4a-4b8e-9a57-1c1f0e0b9a11", "#,
            1,
        ),
    ];
    for json in &variants {
        let again = codec.decode(json.as_bytes(), hints)?;
        assert_eq!(again, first, "{json}");
        assert_eq!(again.envelope().event_id, CONTRACT_EVENT_ID);
    }
    // Another order, or the same order ID in another store, is another event.
    let other_order = codec.decode(CONTRACT_JSON.replace("o-1001", "o-1002").as_bytes(), hints)?;
    assert_eq!(
        other_order.envelope().event_id,
        order_created_id("store-7", "o-1002").to_string()
    );
    let other_store = codec.decode(
        CONTRACT_JSON.replace("store-7", "store-8").as_bytes(),
        hints,
    )?;
    assert_eq!(
        other_store.envelope().event_id,
        order_created_id("store-8", "o-1001").to_string()
    );
    let ids: BTreeSet<&str> = [&first, &other_order, &other_store]
        .iter()
        .map(|e| e.envelope().event_id.as_str())
        .collect();
    assert_eq!(ids.len(), 3);
    Ok(())
}

#[test]
fn placed_at_may_be_rfc3339_or_milliseconds() -> TestResult {
    let codec = Codec::new();
    let hints = topic(topics::ORDER_CREATED);
    let expected = Event::OrderCreated(contract_order());
    for placed_at in [
        r#""2026-11-21T10:00:00Z""#,
        r#""2026-11-21T11:00:00+01:00""#,
        r#""2026-11-21T10:00:00.000Z""#,
        "1795255200000",
    ] {
        let json = CONTRACT_JSON.replace(r#""2026-11-21T10:00:00Z""#, placed_at);
        assert_eq!(
            codec.decode(json.as_bytes(), hints)?,
            expected,
            "{placed_at}"
        );
    }
    // Milliseconds survive, and a producer's own envelope fields are kept.
    let json = CONTRACT_JSON.replace(
        r#""placed_at": "2026-11-21T10:00:00Z""#,
        r#""placed_at": "2026-11-21T10:00:00.123Z", "occurred_at": 5, "correlation_id": "checkout-9""#,
    );
    let Event::OrderCreated(o) = codec.decode(json.as_bytes(), hints)? else {
        return Err("not an OrderCreated".into());
    };
    assert_eq!(o.placed_at, PLACED_AT_MS + 123);
    assert_eq!(o.envelope.occurred_at, 5);
    assert_eq!(o.envelope.correlation_id, "checkout-9");

    let json = CONTRACT_JSON.replace("2026-11-21T10:00:00Z", "yesterday");
    let err = codec.decode(json.as_bytes(), hints).unwrap_err();
    assert!(
        matches!(
            err,
            DecodeError::Invalid {
                event_type: EventType::OrderCreated,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string()
            .contains(r#"invalid RFC 3339 timestamp "yesterday""#),
        "{err}"
    );
    Ok(())
}

#[test]
fn an_avro_orders_event_id_is_ignored_too() -> TestResult {
    // The contract: `event_id` is ignored for orders, whatever the encoding.
    let codec = Codec::new();
    let sent = order_with(|o| o.envelope.event_id = "producer-row-17".into());
    let decoded = codec.decode(&codec.encode(&sent)?, DecodeHints::default())?;
    assert_eq!(decoded, Event::OrderCreated(contract_order()));
    assert_eq!(decoded.envelope().event_id, CONTRACT_EVENT_ID);
    Ok(())
}

#[test]
fn json_without_an_order_id_is_rejected_not_given_an_order() {
    let codec = Codec::new();
    let json = CONTRACT_JSON.replace(r#""order_id": "o-1001", "#, "");
    let err = codec
        .decode(json.as_bytes(), topic(topics::ORDER_CREATED))
        .unwrap_err();
    assert_eq!(err.to_string(), "invalid OrderCreated: order_id is missing");
}

#[test]
fn json_commands_get_a_content_derived_id_and_now_as_time() -> TestResult {
    let codec = Codec::new();
    let hints = header(EventType::StockRestocked);
    let before = chrono::Utc::now().timestamp_millis();
    let event = codec.decode(
        br#"{"store_id": "store-7", "sku": "SKU-1", "quantity": 5}"#,
        hints,
    )?;
    let after = chrono::Utc::now().timestamp_millis();
    // The ID is a UUIDv5 of the type and the record's canonical (sorted, compact) JSON.
    let expected_id = uuid::Uuid::new_v5(
        &ID_NAMESPACE,
        br#"StockRestocked/{"quantity":5,"sku":"SKU-1","store_id":"store-7"}"#,
    )
    .to_string();
    let Event::StockRestocked(c) = &event else {
        return Err(format!("expected StockRestocked, got {event:?}").into());
    };
    assert_eq!(c.envelope.event_id, expected_id);
    assert_eq!(c.envelope.correlation_id, expected_id);
    assert_eq!(c.envelope.order_id, None);
    assert_eq!(c.envelope.causation_id, None);
    assert_eq!(c.envelope.schema_version, 1);
    assert!((before..=after).contains(&c.envelope.occurred_at));
    assert_eq!(
        (c.sku.as_str(), c.quantity, c.note.as_deref()),
        ("SKU-1", 5, None)
    );

    // Key order, whitespace and where the type comes from do not change the ID…
    let same = codec.decode(
        br#"{ "quantity" : 5 , "event_type": "StockRestocked", "sku" : "SKU-1", "store_id" : "store-7" }"#,
        DecodeHints::default(),
    )?;
    assert_eq!(same.envelope().event_id, expected_id);
    // …the content does.
    let more = codec.decode(
        br#"{"store_id": "store-7", "sku": "SKU-1", "quantity": 6}"#,
        hints,
    )?;
    assert_ne!(more.envelope().event_id, expected_id);
    Ok(())
}

#[test]
fn json_carrier_scans_take_their_time_from_the_scan() -> TestResult {
    let codec = Codec::new();
    let json = br#"{"order_id": "o-1001", "store_id": "store-7", "carrier": "DHL", "tracking_number": "JD01",
                   "scan": "out_for_delivery", "scanned_at": "2026-11-23T08:30:00Z"}"#;
    let event = codec.decode(json, topic(topics::CARRIER_UPDATES))?;
    let Event::CarrierScan(s) = &event else {
        return Err(format!("expected CarrierScan, got {event:?}").into());
    };
    assert_eq!(s.scan, ScanKind::OutForDelivery);
    assert_eq!(s.scanned_at, PLACED_AT_MS + 2 * 86_400_000 - 90 * 60_000);
    assert_eq!(s.envelope.occurred_at, s.scanned_at);
    assert_eq!(s.envelope.correlation_id, "o-1001");
    assert_eq!((s.location.as_deref(), s.detail.as_deref()), (None, None));
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 7. Deterministic IDs
// ---------------------------------------------------------------------------------------

#[test]
fn derived_ids_are_pinned() {
    // Values computed independently (Python `uuid.uuid5`); a change to the namespace or to
    // the name format changes them, and with them every ID a deployment has ever derived.
    assert_eq!(
        ID_NAMESPACE.to_string(),
        "6f726465-7266-6c6f-7700-000000000001"
    );
    assert_eq!(
        derive_id("evt-1", "fraud", 0).to_string(),
        "cbe0228e-24f1-54ba-b4c8-c6f0b25f3bd7"
    );
    assert_eq!(
        order_created_id("store-7", "o-1001").to_string(),
        CONTRACT_EVENT_ID
    );
    assert_eq!(derive_id("evt-1", "fraud", 0).get_version_num(), 5);
}

#[test]
fn caused_by_is_stable_and_carries_the_flow_forward() {
    let cause = contract_order().envelope;
    let screened = Envelope::caused_by(&cause, "fraud", 0, PLACED_AT_MS + 50);
    assert_eq!(
        screened,
        Envelope {
            event_id: "0baac85e-6052-50e5-8742-f3e90dac7a9e".into(),
            order_id: Some("o-1001".into()),
            store_id: "store-7".into(),
            correlation_id: "o-1001".into(),
            causation_id: Some(CONTRACT_EVENT_ID.into()),
            occurred_at: PLACED_AT_MS + 50,
            schema_version: 1,
        }
    );
    assert_eq!(
        screened.event_id,
        derive_id(CONTRACT_EVENT_ID, "fraud", 0).to_string()
    );
    // A replay at another time reproduces the ID.
    assert_eq!(
        Envelope::caused_by(&cause, "fraud", 0, 1).event_id,
        screened.event_id
    );
    // Only the cause's ID matters, not its other fields.
    let mut relabelled = cause.clone();
    relabelled.correlation_id = "other".into();
    relabelled.occurred_at = 0;
    assert_eq!(
        Envelope::caused_by(&relabelled, "fraud", 0, 1).event_id,
        screened.event_id
    );
}

#[test]
fn derived_ids_differ_by_cause_stage_and_ordinal() {
    let ids = [
        derive_id("evt-1", "fraud", 0),
        derive_id("evt-1", "fraud", 1),
        derive_id("evt-1", "inventory", 0),
        derive_id("evt-2", "fraud", 0),
        derive_id("evt-1", "fraud", u32::MAX),
        order_created_id("evt-1", "fraud"),
    ];
    let unique: BTreeSet<uuid::Uuid> = ids.iter().copied().collect();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");
    let cause = stock_envelope();
    let a = Envelope::caused_by(&cause, "inventory", 0, 0);
    let b = Envelope::caused_by(&cause, "inventory", 1, 0);
    let c = Envelope::caused_by(&cause, "payment", 0, 0);
    assert_ne!(a.event_id, b.event_id);
    assert_ne!(a.event_id, c.event_id);
    assert_ne!(b.event_id, c.event_id);
    assert_eq!(a.order_id, None);
}

// ---------------------------------------------------------------------------------------
// 8. Interoperability with other Avro producers and consumers
// ---------------------------------------------------------------------------------------

#[test]
fn crc64_avro_matches_the_specification_test_vectors() {
    // From apache/avro share/test/data/schema-tests.txt.
    assert_eq!(crc64_avro(br#""null""#) as i64, 7_195_948_357_588_979_594);
    assert_eq!(
        crc64_avro(br#""boolean""#) as i64,
        -6_970_731_678_124_411_036
    );
    assert_eq!(
        crc64_avro(br#"{"name":"foo","type":"fixed","size":15}"#) as i64,
        1_756_455_273_707_447_556
    );
}

/// Parsing Canonical Form of `Delivered`, written by hand from the Avro specification (full
/// names; no namespace, doc, default or logicalType; primitives in simple form; attributes in
/// the order name, type, fields). It is what Java's `SchemaNormalization.toParsingForm`
/// produces, so it is the fingerprint basis of `BinaryMessageEncoder`, the most common
/// single-object producer.
const DELIVERED_SPEC_PCF: &str = concat!(
    r#"{"name":"io.orderflow.events.Delivered","type":"record","fields":["#,
    r#"{"name":"event_id","type":"string"},{"name":"order_id","type":["null","string"]},"#,
    r#"{"name":"store_id","type":"string"},{"name":"correlation_id","type":"string"},"#,
    r#"{"name":"causation_id","type":["null","string"]},{"name":"occurred_at","type":"long"},"#,
    r#"{"name":"schema_version","type":"int"}]}"#
);

/// The specification's canonical form, from apache-avro's: apache-avro 0.22 strips
/// `logicalType` but leaves the primitive it annotated as `{"type":"long"}` instead of the
/// simple form `"long"`. The replacement is safe on a canonical form, where `{` only ever
/// opens a schema and names cannot contain braces or quotes.
fn spec_canonical_form(schema: &Schema) -> String {
    [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ]
    .iter()
    .fold(schema.canonical_form(), |pcf, p| {
        pcf.replace(&format!(r#"{{"type":"{p}"}}"#), &format!(r#""{p}""#))
    })
}

#[test]
fn the_header_is_the_little_endian_crc64_of_the_specifications_canonical_form() -> TestResult {
    let codec = Codec::new();
    for &t in EventType::ALL {
        let canonical = spec_canonical_form(codec.schema(t));
        assert!(
            !canonical.contains("logicalType") && !canonical.contains("doc"),
            "{t}: {canonical}"
        );
        assert!(canonical.starts_with(&format!(
            r#"{{"name":"io.orderflow.events.{t}","type":"record""#
        )));
        let event = Event::from_avro(
            t,
            &arb_event_value(t)
                .new_tree(&mut TestRunner::deterministic())
                .map_err(|r| r.to_string())?
                .current(),
        )?;
        let bytes = codec.encode(&event)?;
        assert_eq!(&bytes[..2], &[0xC3, 0x01]);
        assert_eq!(
            &bytes[2..10],
            &crc64_avro(canonical.as_bytes()).to_le_bytes(),
            "{t}"
        );
    }
    // Checked against a canonical form written out by hand, not derived by the same code.
    assert_eq!(
        spec_canonical_form(codec.schema(EventType::Delivered)),
        DELIVERED_SPEC_PCF
    );
    Ok(())
}

/// apache-avro 0.22 fingerprints a non-conforming canonical form whenever a schema has a
/// logical type (all of ours do): records carrying either fingerprint must decode, so Rust
/// producers using apache-avro's own writer and Java (or any conforming) producers both work.
#[test]
fn single_object_records_with_either_fingerprint_decode() -> TestResult {
    let codec = Codec::new();
    for event in [Event::OrderCreated(contract_order()), restock(5)] {
        let t = event.event_type();
        let ours = codec.encode(&event)?;
        let spec_fp = crc64_avro(spec_canonical_form(codec.schema(t)).as_bytes()).to_le_bytes();
        let library_fp = fingerprint(codec.schema(t));
        assert_ne!(
            &library_fp[..],
            &spec_fp[..],
            "{t}: the fingerprints agree, the premise is gone"
        );
        for fp in [&spec_fp[..], &library_fp[..]] {
            let record = [&[0xC3, 0x01][..], fp, &ours[10..]].concat();
            assert_eq!(codec.decode(&record, DecodeHints::default())?, event, "{t}");
        }
    }
    Ok(())
}

#[test]
fn encoding_matches_apache_avros_single_object_writer_byte_for_byte() -> TestResult {
    let codec = Codec::new();
    let mut runner = TestRunner::deterministic();
    for &t in EventType::ALL {
        for _ in 0..8 {
            let value = arb_event_value(t)
                .new_tree(&mut runner)
                .map_err(|r| r.to_string())?
                .current();
            let schema = codec.schema(t);
            let mut theirs = Vec::new();
            GenericSingleObjectWriter::new_with_capacity(schema, 256)?
                .write_value(value.clone(), &mut theirs)?;
            let event = Event::from_avro(t, &value)?;
            let ours = codec.encode(&event)?;
            // Same datum; only the fingerprint differs (ours is the specification's).
            assert_eq!(ours[..2], theirs[..2], "{t}");
            assert_eq!(ours[10..], theirs[10..], "{t}");
            assert_eq!(theirs[2..10], fingerprint(schema)[..], "{t}");
            // apache-avro's single-object reader reads its own records back, as a check
            // that `theirs` is what that library really writes.
            let reader = GenericSingleObjectReader::builder()
                .schema(schema.clone())
                .build()?;
            let read = reader.read_value(&mut &theirs[..])?;
            assert_eq!(Event::from_avro(t, &read)?, event, "{t}");
            // What they wrote, we read.
            assert_eq!(
                codec.decode(&theirs, DecodeHints::default())?,
                normalized(&event),
                "{t}"
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Field names in errors, and retry markers
// ---------------------------------------------------------------------------------------

/// The field an invalid JSON order is rejected for, after `edit`.
fn field_at_fault(edit: impl FnOnce(&mut serde_json::Value)) -> Result<Option<String>, String> {
    let mut json: serde_json::Value =
        serde_json::from_str(CONTRACT_JSON).map_err(|e| e.to_string())?;
    edit(&mut json);
    let bytes = serde_json::to_vec(&json).map_err(|e| e.to_string())?;
    match Codec::new().decode(&bytes, topic(topics::ORDER_CREATED)) {
        Err(DecodeError::Invalid { field, .. }) => Ok(field),
        other => Err(format!("expected Invalid, got {other:?}")),
    }
}

#[test]
fn errors_name_the_field_at_fault() -> TestResult {
    type Edit = Box<dyn FnOnce(&mut serde_json::Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "email",
            Box::new(|j| drop(j.as_object_mut().map(|o| o.remove("email")))),
        ),
        (
            "store_id",
            Box::new(|j| drop(j.as_object_mut().map(|o| o.remove("store_id")))),
        ),
        (
            "items[0].sku",
            Box::new(|j| drop(j["items"][0].as_object_mut().map(|o| o.remove("sku")))),
        ),
        (
            "items[0].quantity",
            Box::new(|j| j["items"][0]["quantity"] = json!("two")),
        ),
        (
            "items[0].quantity",
            Box::new(|j| j["items"][0]["quantity"] = json!(0)),
        ),
        (
            "items[0].unit_price_cents",
            Box::new(|j| j["items"][0]["unit_price_cents"] = json!(-1)),
        ),
        (
            "items[0].sku",
            Box::new(|j| j["items"][0]["sku"] = json!("")),
        ),
        ("items", Box::new(|j| j["items"] = json!([]))),
        ("currency", Box::new(|j| j["currency"] = json!("usd"))),
        ("customer_id", Box::new(|j| j["customer_id"] = json!(""))),
        ("order_id", Box::new(|j| j["order_id"] = json!(""))),
        (
            "placed_at",
            Box::new(|j| j["placed_at"] = json!("yesterday")),
        ),
    ];
    for (expected, edit) in cases {
        assert_eq!(field_at_fault(edit)?.as_deref(), Some(expected));
    }
    Ok(())
}

#[test]
fn a_retry_marker_gives_the_order_a_new_deterministic_id() -> TestResult {
    let codec = Codec::new();
    let decode = |causation: Option<&str>| -> Result<Event, Box<dyn std::error::Error>> {
        let mut json: serde_json::Value = serde_json::from_str(CONTRACT_JSON)?;
        if let Some(c) = causation {
            json["causation_id"] = json!(c);
        }
        // A producer-chosen event ID never survives, marker or not.
        json["event_id"] = json!(uuid::Uuid::new_v4().to_string());
        Ok(codec.decode(&serde_json::to_vec(&json)?, topic(topics::ORDER_CREATED))?)
    };
    assert_eq!(decode(None)?.envelope().event_id, CONTRACT_EVENT_ID);
    let first = decode(Some("retry/1"))?;
    assert_eq!(
        first.envelope().event_id,
        order_retry_id("store-7", "o-1001", 1).to_string()
    );
    assert_ne!(first.envelope().event_id, CONTRACT_EVENT_ID);
    assert_eq!(
        decode(Some("retry/1"))?.envelope().event_id,
        first.envelope().event_id
    );
    assert_ne!(
        decode(Some("retry/2"))?.envelope().event_id,
        first.envelope().event_id
    );
    let Event::OrderCreated(o) = &first else {
        return Err("not an order".into());
    };
    assert!(o.is_retry());
    // Not markers: no number, zero, another causation.
    for c in ["retry/", "retry/0", "retry/x", "checkout-9"] {
        assert_eq!(
            decode(Some(c))?.envelope().event_id,
            CONTRACT_EVENT_ID,
            "{c}"
        );
    }
    // The marker survives Avro.
    let bytes = codec.encode(&first)?;
    let back = codec.decode(&bytes, topic(topics::ORDER_CREATED))?;
    assert_eq!(back, first);
    Ok(())
}
