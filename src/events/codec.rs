//! One codec for every topic: outputs are Avro single-object encoded; inputs may be Avro
//! (single-object encoding or Confluent framing) or JSON of the same shape.
//!
//! A Confluent-framed record (magic byte 0, then a 4-byte schema ID) is read with the
//! writer schema the ID names in the schema registry (`schema_registry_url`), resolved by
//! Avro's rules against our schema of the same record name; without a registry it is read
//! with our current schema, its type from an ID mapping, its `event-type` header or its
//! topic.
//!
//! Invariant: `decode` either returns an event that passed [`validate`] or a
//! [`DecodeError`] whose message says what was wrong; it never panics on any bytes. A
//! registry that cannot be asked is [`DecodeError::is_transient`], never a bad record.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::{Schema, rabin::Rabin};

use super::registry::{RegistryError, SchemaRegistry};
use super::{Event, EventType, order_created_id};

/// First two bytes of Avro single-object encoding.
const SINGLE_OBJECT_MAGIC: [u8; 2] = [0xC3, 0x01];
/// First byte of Confluent Schema Registry framing (then a big-endian 4-byte schema ID).
const CONFLUENT_MAGIC: u8 = 0x00;

#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("empty record value")]
    Empty,
    #[error(
        "unrecognized encoding: first byte 0x{0:02x} is neither Avro single-object (0xc3 0x01), Confluent framing (0x00) nor a JSON object ('{{')"
    )]
    UnknownFormat(u8),
    #[error("Avro single-object record with unknown schema fingerprint {0}")]
    UnknownFingerprint(String),
    #[error("truncated {0} header")]
    Truncated(&'static str),
    #[error("malformed Avro for {event_type}: {message}")]
    Avro {
        event_type: EventType,
        message: String,
    },
    /// The registry said the schema ID is unknown or unusable: the record can never be
    /// read.
    #[error("Confluent-framed record: {0}")]
    SchemaId(RegistryError),
    /// The registry could not be asked: the record may well be fine, later.
    #[error("Confluent-framed record: {0}")]
    RegistryUnavailable(RegistryError),
    #[error("invalid JSON: {0}")]
    Json(String),
    #[error("JSON value is not an object")]
    JsonNotObject,
    #[error("unknown event type {0:?}")]
    UnknownEventType(String),
    #[error(
        "cannot tell the event type: no `event_type` field, no `event-type` header, and the topic carries several types"
    )]
    MissingEventType,
    #[error("invalid {event_type}: {reason}")]
    Invalid {
        event_type: EventType,
        /// The offending field as a path (`items[1].quantity`), when one is to blame:
        /// what an API names in its error so a client can point at the input.
        field: Option<String>,
        reason: String,
    },
}

impl DecodeError {
    /// Short, stable class for the DLQ `error-class` header and metric labels.
    pub fn class(&self) -> &'static str {
        match self {
            DecodeError::Invalid { .. } => "invalid",
            DecodeError::Avro { .. }
            | DecodeError::UnknownFingerprint(_)
            | DecodeError::SchemaId(_) => "schema",
            DecodeError::RegistryUnavailable(_) => "registry",
            _ => "decode",
        }
    }

    /// Whether decoding the same bytes again later may succeed: the schema registry could
    /// not be asked. Such a record must be retried, never dead-lettered.
    pub fn is_transient(&self) -> bool {
        matches!(self, DecodeError::RegistryUnavailable(_))
    }
}

/// Where a record came from, as far as decoding needs to know.
#[derive(Debug, Clone, Copy, Default)]
pub struct DecodeHints<'a> {
    /// The `event-type` header, if the producer set one.
    pub header_type: Option<&'a str>,
    /// The type to assume when nothing else says (a topic with one producer-facing type).
    pub topic_default: Option<EventType>,
    /// The record's (topic, partition, offset): a JSON record without an `event_id` gets
    /// one derived from it, so redelivery and replay keep the ID while two separate
    /// records with equal content stay two events.
    pub origin: Option<(&'a str, i32, i64)>,
}

/// The current schema of every event type, parsed once per process, with a writer and a
/// reader built on it: records in the current schema — every output, and every input
/// written by a worker of the same version — are encoded and decoded straight between
/// bytes and the event, without an Avro `Value` tree or schema resolution per record.
struct Current {
    schema: &'static Schema,
    /// The specification's fingerprint (what outputs carry) and apache-avro's.
    fingerprints: [Vec<u8>; 2],
    writer: GenericDatumWriter<'static>,
    reader: GenericDatumReader<'static>,
}

static CURRENT: LazyLock<HashMap<EventType, Current>> = LazyLock::new(|| {
    EventType::ALL
        .iter()
        .map(|&t| {
            let schema: &'static Schema = Box::leak(Box::new(
                Schema::parse_str(t.schema_source()).unwrap_or_else(|e| {
                    panic!("embedded schema {} is invalid: {e}", t.schema_file())
                }),
            ));
            let current = Current {
                schema,
                fingerprints: fingerprints(schema),
                writer: GenericDatumWriter::builder(schema)
                    .human_readable(false)
                    .build()
                    .expect("an embedded schema resolves"),
                reader: GenericDatumReader::builder(schema)
                    .human_readable(false)
                    .build()
                    .expect("an embedded schema resolves"),
            };
            (t, current)
        })
        .collect()
});

pub struct Codec {
    /// Every writer schema this codec can read, by its CRC-64-AVRO fingerprint: the
    /// current ones plus older versions registered for schema evolution.
    writers: HashMap<Vec<u8>, (EventType, Schema)>,
    /// Confluent framing carries a registry schema ID; without a registry, operators map
    /// IDs to event types in settings and the writer schema is taken to be the current one.
    confluent_ids: HashMap<u32, EventType>,
    /// Where the writer schemas of Confluent-framed records are looked up, if anywhere.
    registry: Option<Arc<SchemaRegistry>>,
}

impl Codec {
    pub fn new() -> Self {
        let mut codec = Codec {
            writers: HashMap::new(),
            confluent_ids: HashMap::new(),
            registry: None,
        };
        for (&t, c) in CURRENT.iter() {
            let [spec, library] = c.fingerprints.clone();
            codec.writers.insert(library, (t, c.schema.clone()));
            codec.writers.insert(spec, (t, c.schema.clone()));
        }
        codec
    }

    /// Accept records written with an older (or newer) schema of `t`, resolved by Avro's
    /// rules against the current one.
    pub fn register_writer_schema(
        &mut self,
        t: EventType,
        schema_json: &str,
    ) -> Result<(), apache_avro::Error> {
        let schema = Schema::parse_str(schema_json)?;
        for fp in fingerprints(&schema) {
            self.writers.insert(fp, (t, schema.clone()));
        }
        Ok(())
    }

    /// A codec that resolves Confluent schema IDs through `registry` (when there is one).
    pub fn with_registry(registry: Option<Arc<SchemaRegistry>>) -> Self {
        Codec {
            registry,
            ..Codec::new()
        }
    }

    pub fn registry(&self) -> Option<&Arc<SchemaRegistry>> {
        self.registry.as_ref()
    }

    /// The schema ID of a Confluent-framed value, if `bytes` is one.
    pub fn confluent_id(bytes: &[u8]) -> Option<u32> {
        match bytes {
            [CONFLUENT_MAGIC, a, b, c, d, ..] => Some(u32::from_be_bytes([*a, *b, *c, *d])),
            _ => None,
        }
    }

    /// Asks the registry (blocking) about every schema ID among `values` it has not
    /// answered yet, so that decoding them needs no network. `Err` only when the
    /// registry could not be asked; unknown IDs are remembered and dead-letter their
    /// records. Without a registry, nothing to do.
    pub fn prefetch<'a>(
        &self,
        values: impl IntoIterator<Item = &'a [u8]>,
    ) -> Result<(), RegistryError> {
        let Some(registry) = &self.registry else {
            return Ok(());
        };
        let mut ids: Vec<u32> = values
            .into_iter()
            .filter_map(Codec::confluent_id)
            .filter(|id| registry.cached(*id).is_none())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        registry.prefetch_blocking(ids)
    }

    pub fn map_confluent_id(&mut self, id: u32, t: EventType) {
        self.confluent_ids.insert(id, t);
    }

    pub fn schema(&self, t: EventType) -> &Schema {
        CURRENT[&t].schema
    }

    /// Avro single-object encoding with the current schema, carrying the specification's
    /// fingerprint (what Java's `BinaryMessageDecoder` and other conforming readers expect).
    pub fn encode(&self, event: &Event) -> Result<Vec<u8>, apache_avro::Error> {
        let current = &CURRENT[&event.event_type()];
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(&current.fingerprints[0]);
        event.write_avro(&current.writer, &mut out)?;
        Ok(out)
    }

    /// Encodes with an explicit writer schema (tests of schema evolution use an old one).
    pub fn encode_with(
        &self,
        event: &Event,
        schema: &Schema,
        fp: &[u8],
    ) -> Result<Vec<u8>, apache_avro::Error> {
        let value = event.to_avro()?.resolve(schema)?;
        let mut out = Vec::with_capacity(128);
        out.extend_from_slice(&SINGLE_OBJECT_MAGIC);
        out.extend_from_slice(fp);
        GenericDatumWriter::builder(schema)
            .build()?
            .write_value(&mut out, value)?;
        Ok(out)
    }

    /// Decodes any accepted encoding and validates the result.
    pub fn decode(&self, bytes: &[u8], hints: DecodeHints<'_>) -> Result<Event, DecodeError> {
        let first = *bytes.first().ok_or(DecodeError::Empty)?;
        let mut event = if bytes.starts_with(&SINGLE_OBJECT_MAGIC) {
            self.decode_single_object(bytes)?
        } else if first == CONFLUENT_MAGIC {
            self.decode_confluent(bytes, hints)?
        } else if matches!(first_non_space(bytes), Some(b'{' | b'[' | b'"')) {
            self.decode_json(bytes, hints)?
        } else {
            return Err(DecodeError::UnknownFormat(first));
        };
        normalize(&mut event);
        validate(&event)?;
        Ok(event)
    }

    fn decode_single_object(&self, bytes: &[u8]) -> Result<Event, DecodeError> {
        let fp = bytes
            .get(2..10)
            .ok_or(DecodeError::Truncated("single-object"))?;
        let (t, writer) = self
            .writers
            .get(fp)
            .ok_or_else(|| DecodeError::UnknownFingerprint(hex(fp)))?;
        let current = &CURRENT[t];
        if current.fingerprints.iter().any(|c| c == fp) {
            return read_current(*t, current, &bytes[10..]);
        }
        self.read_datum(*t, writer, &bytes[10..])
    }

    fn decode_confluent(&self, bytes: &[u8], hints: DecodeHints<'_>) -> Result<Event, DecodeError> {
        let id = bytes.get(1..5).ok_or(DecodeError::Truncated("Confluent"))?;
        let id = u32::from_be_bytes(id.try_into().expect("four bytes"));
        if let Some(registry) = &self.registry {
            // A cache hit is a read lock and a map lookup; a miss (a caller that did not
            // prefetch) asks the registry once for the whole process.
            let writer = match registry.cached(id) {
                Some(known) => known,
                None => registry.resolve_blocking(id),
            }
            .map_err(|e| {
                if e.is_transient() {
                    DecodeError::RegistryUnavailable(e)
                } else {
                    DecodeError::SchemaId(e)
                }
            })?;
            let t = match writer.event_type {
                Some(t) => t,
                None => resolve_type(None, hints)?,
            };
            return self
                .read_datum(t, &writer.schema, &bytes[5..])
                .map_err(|e| match e {
                    DecodeError::Avro {
                        event_type,
                        message,
                    } => DecodeError::Avro {
                        event_type,
                        message: format!("with writer schema ID {id}: {message}"),
                    },
                    other => other,
                });
        }
        let t = match self.confluent_ids.get(&id) {
            Some(t) => *t,
            None => resolve_type(None, hints)?,
        };
        read_current(t, &CURRENT[&t], &bytes[5..])
    }

    fn read_datum(
        &self,
        t: EventType,
        writer: &Schema,
        mut datum: &[u8],
    ) -> Result<Event, DecodeError> {
        let avro_err = |e: apache_avro::Error| DecodeError::Avro {
            event_type: t,
            message: e.to_string(),
        };
        let reader_schema = CURRENT[&t].schema;
        let value: Value = GenericDatumReader::builder(writer)
            .reader_schema(reader_schema)
            .build()
            .and_then(|r| r.read_value(&mut datum))
            .map_err(avro_err)?;
        if !datum.is_empty() {
            return Err(DecodeError::Avro {
                event_type: t,
                message: format!("{} trailing bytes after the datum", datum.len()),
            });
        }
        Event::from_avro(t, &value).map_err(avro_err)
    }

    fn decode_json(&self, bytes: &[u8], hints: DecodeHints<'_>) -> Result<Event, DecodeError> {
        let (t, map) = json_object(bytes, hints)?;
        Event::from_json(t, serde_json::Value::Object(map)).or_else(|_| {
            // Rare (bad input), so only then is the path to the field at fault tracked:
            // the bytes are read again.
            let (t, map) = json_object(bytes, hints)?;
            Event::from_json_traced(t, serde_json::Value::Object(map)).map_err(|(field, e)| {
                DecodeError::Invalid {
                    event_type: t,
                    field,
                    reason: e.to_string(),
                }
            })
        })
    }
}

/// A JSON record's event type and its object, the envelope's defaults filled in.
fn json_object(
    bytes: &[u8],
    hints: DecodeHints<'_>,
) -> Result<(EventType, serde_json::Map<String, serde_json::Value>), DecodeError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| DecodeError::Json(e.to_string()))?;
    let serde_json::Value::Object(mut map) = value else {
        return Err(DecodeError::JsonNotObject);
    };
    let named = match map.remove("event_type") {
        Some(serde_json::Value::String(s)) => Some(s),
        Some(other) => {
            return Err(DecodeError::Json(format!(
                "`event_type` must be a string, got {other}"
            )));
        }
        None => None,
    };
    let t = resolve_type(named.as_deref(), hints)?;
    fill_envelope_defaults(t, &mut map, hints.origin);
    Ok((t, map))
}

/// Reads a datum written with the current schema of `t`.
fn read_current(t: EventType, current: &Current, mut datum: &[u8]) -> Result<Event, DecodeError> {
    let event =
        Event::read_avro(t, &current.reader, &mut datum).map_err(|e| DecodeError::Avro {
            event_type: t,
            message: e.to_string(),
        })?;
    if !datum.is_empty() {
        return Err(DecodeError::Avro {
            event_type: t,
            message: format!("{} trailing bytes after the datum", datum.len()),
        });
    }
    Ok(event)
}

impl Default for Codec {
    fn default() -> Self {
        Codec::new()
    }
}

fn resolve_type(named: Option<&str>, hints: DecodeHints<'_>) -> Result<EventType, DecodeError> {
    match named.or(hints.header_type) {
        Some(name) => {
            EventType::from_name(name).ok_or_else(|| DecodeError::UnknownEventType(name.to_owned()))
        }
        None => hints.topic_default.ok_or(DecodeError::MissingEventType),
    }
}

/// JSON producers need not fill the envelope: the event ID is derived (from the record's
/// position when known, else from its content), the correlation ID defaults to the order
/// ID (else the event ID), and the time to the order's `placed_at` (or the scan time).
fn fill_envelope_defaults(
    t: EventType,
    map: &mut serde_json::Map<String, serde_json::Value>,
    origin: Option<(&str, i32, i64)>,
) {
    use serde_json::Value as J;
    if !map.contains_key("event_id") {
        let basis = match origin {
            Some((topic, partition, offset)) => format!("record/{topic}/{partition}/{offset}"),
            None => format!(
                "{}/{}",
                t.name(),
                serde_json::to_string(&*map).unwrap_or_default()
            ),
        };
        let id = uuid::Uuid::new_v5(&super::ID_NAMESPACE, basis.as_bytes());
        map.insert("event_id".into(), J::String(id.to_string()));
    }
    if !map.contains_key("correlation_id") {
        let c = match map.get("order_id") {
            Some(J::String(o)) => o.clone(),
            _ => map["event_id"].as_str().unwrap_or_default().to_owned(),
        };
        map.insert("correlation_id".into(), J::String(c));
    }
    if !map.contains_key("occurred_at") {
        let at = map
            .get("placed_at")
            .or_else(|| map.get("scanned_at"))
            .cloned()
            .unwrap_or_else(|| J::from(chrono::Utc::now().timestamp_millis()));
        map.insert("occurred_at".into(), at);
    }
}

/// Canonical IDs that do not depend on how a producer encoded the record: an order's
/// `OrderCreated` is identified by store and order ID, and a manual retry of it (see
/// [`retry_number`](super::retry_number)) by store, order ID and the retry's number — never
/// by an ID the producer chose. So is an order's `OrderCancelled`: one request per order,
/// however many times and by whom it is sent.
fn normalize(event: &mut Event) {
    if let Event::OrderCancelled(c) = event
        && let Some(order_id) = &c.envelope.order_id
    {
        c.envelope.event_id = super::order_cancelled_id(&c.envelope.store_id, order_id).to_string();
    }
    if let Event::OrderCreated(o) = event
        && let Some(order_id) = &o.envelope.order_id
    {
        let store_id = &o.envelope.store_id;
        let id = match super::retry_number(&o.envelope) {
            Some(n) => super::order_retry_id(store_id, order_id, n),
            None => order_created_id(store_id, order_id),
        };
        o.envelope.event_id = id.to_string();
    }
}

/// Checks that decoding cannot express: what makes an event semantically impossible.
/// The error names the offending field (`items[0].quantity`), so that an API can point at
/// it; the stages dead-letter with the same words.
pub fn validate(event: &Event) -> Result<(), DecodeError> {
    let t = event.event_type();
    let bad = |field: String, reason: String| {
        Err(DecodeError::Invalid {
            event_type: t,
            field: Some(field),
            reason,
        })
    };
    let env = event.envelope();
    if env.store_id.trim().is_empty() {
        return bad("store_id".into(), "store_id is empty".into());
    }
    if uuid::Uuid::parse_str(&env.event_id).is_err() {
        return bad(
            "event_id".into(),
            format!("event_id {:?} is not a UUID", env.event_id),
        );
    }
    match event {
        Event::OrderCreated(o) => {
            match o.envelope.order_id.as_deref() {
                None | Some("") => return bad("order_id".into(), "order_id is missing".into()),
                Some(_) => {}
            }
            if o.customer_id.is_empty() {
                return bad("customer_id".into(), "customer_id is empty".into());
            }
            if o.currency.len() != 3 || !o.currency.bytes().all(|b| b.is_ascii_uppercase()) {
                return bad(
                    "currency".into(),
                    format!("currency {:?} is not an ISO 4217 code", o.currency),
                );
            }
            if o.items.is_empty() {
                return bad("items".into(), "order has no items".into());
            }
            for (i, l) in o.items.iter().enumerate() {
                if l.sku.is_empty() {
                    return bad(format!("items[{i}].sku"), "an item has an empty sku".into());
                }
                if l.quantity <= 0 {
                    return bad(
                        format!("items[{i}].quantity"),
                        format!("item {} has quantity {}", l.sku, l.quantity),
                    );
                }
                if l.unit_price_cents < 0 {
                    return bad(
                        format!("items[{i}].unit_price_cents"),
                        format!("item {} has a negative price", l.sku),
                    );
                }
            }
            if o.total_cents().is_none() {
                return bad("items".into(), "order total overflows".into());
            }
        }
        Event::StockRestocked(c) if c.quantity <= 0 => {
            return bad(
                "quantity".into(),
                format!("restock quantity {} is not positive", c.quantity),
            );
        }
        Event::ThresholdSet(c) if c.threshold < 0 => {
            return bad(
                "threshold".into(),
                format!("threshold {} is negative", c.threshold),
            );
        }
        _ => {}
    }
    Ok(())
}

/// The fingerprints a single-object record of `schema` may carry: the specification's
/// (first) and apache-avro's. They differ for any schema with a logical type, because
/// apache-avro 0.22 keeps `{"type":"long"}` in its canonical form where the
/// specification's Parsing Canonical Form has `"long"`.
fn fingerprints(schema: &Schema) -> [Vec<u8>; 2] {
    let spec_form = [
        "null", "boolean", "int", "long", "float", "double", "bytes", "string",
    ]
    .iter()
    .fold(schema.canonical_form(), |pcf, p| {
        pcf.replace(&format!(r#"{{"type":"{p}"}}"#), &format!(r#""{p}""#))
    });
    // Reparsed, the form has no logical types left, so apache-avro fingerprints exactly
    // the specification's text. (`{` only ever opens a schema in a canonical form.)
    let spec = Schema::parse_str(&spec_form)
        .expect("a canonical form parses")
        .fingerprint::<Rabin>()
        .bytes;
    [spec, schema.fingerprint::<Rabin>().bytes]
}

fn first_non_space(bytes: &[u8]) -> Option<u8> {
    bytes.iter().copied().find(|b| !b.is_ascii_whitespace())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
