//! Wire types: one Rust struct per Avro schema in `schemas/`, the `Event` enum over all of
//! them, and deterministic event IDs.
//!
//! Invariant: every event starts with the shared [`Envelope`]; an output's ID is a UUIDv5
//! of its cause and the emitting stage, so reprocessing an input reproduces the same IDs.

pub mod codec;
pub mod registry;
#[cfg(test)]
mod registry_tests;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Namespace of every UUIDv5 that OrderFlow derives. Changing it would change every
/// derived ID and break deduplication across a deployment's history, so it is fixed.
pub const ID_NAMESPACE: Uuid = Uuid::from_u128(0x6f72_6465_7266_6c6f_7700_0000_0000_0001);

/// The fields every event begins with (`schemas/envelope.avsc`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: String,
    /// The producer's order ID; `None` for stock events that concern no order.
    #[serde(default)]
    pub order_id: Option<String>,
    pub store_id: String,
    /// Shared by every event of one order's flow, for tracing across stages.
    pub correlation_id: String,
    #[serde(default)]
    pub causation_id: Option<String>,
    /// Milliseconds since the Unix epoch; JSON input may also give an RFC 3339 string.
    #[serde(with = "timestamp")]
    pub occurred_at: i64,
    #[serde(default = "default_schema_version")]
    pub schema_version: i32,
}

fn default_schema_version() -> i32 {
    1
}

impl Envelope {
    /// The envelope of an event caused by `cause`, emitted by `stage`; `ordinal` tells apart
    /// several outputs of one cause. The ID depends on nothing else, so a replay of the
    /// same cause yields the same ID.
    pub fn caused_by(cause: &Envelope, stage: &str, ordinal: u32, occurred_at: i64) -> Self {
        Envelope {
            event_id: derive_id(&cause.event_id, stage, ordinal).to_string(),
            order_id: cause.order_id.clone(),
            store_id: cause.store_id.clone(),
            correlation_id: cause.correlation_id.clone(),
            causation_id: Some(cause.event_id.clone()),
            occurred_at,
            schema_version: 1,
        }
    }
}

/// UUIDv5 of a cause (an event ID, or a timer ID) and the stage that reacts to it.
pub fn derive_id(cause: &str, stage: &str, ordinal: u32) -> Uuid {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("{cause}/{stage}/{ordinal}").as_bytes(),
    )
}

/// The event ID of an order's `OrderCreated`: derived from store and order ID, so that a
/// producer publishing the same order twice creates one order.
pub fn order_created_id(store_id: &str, order_id: &str) -> Uuid {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("order.created/{store_id}/{order_id}").as_bytes(),
    )
}

/// The `causation_id` prefix that marks an `OrderCreated` as the `n`-th manual retry of
/// its order (`retry/1`, `retry/2`, …): the marker travels in the envelope, so every
/// encoding carries it and no schema changes.
pub const RETRY_CAUSATION_PREFIX: &str = "retry/";

/// The retry number of an `OrderCreated` envelope marked as a manual retry, if it is one.
pub fn retry_number(envelope: &Envelope) -> Option<u32> {
    envelope
        .causation_id
        .as_deref()?
        .strip_prefix(RETRY_CAUSATION_PREFIX)?
        .parse()
        .ok()
        .filter(|n| *n >= 1)
}

/// The event ID of the `n`-th manual retry of an order's `OrderCreated`: new to every
/// stage's deduplication (so the pipeline takes it), yet the same for the same retry
/// number (so a retry request repeated before it is seen publishes nothing new).
pub fn order_retry_id(store_id: &str, order_id: &str, n: u32) -> Uuid {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("order.created/{store_id}/{order_id}/retry/{n}").as_bytes(),
    )
}

/// The event ID of an order's customer cancellation: one per order, derived from store
/// and order ID, so a request repeated (by the API or a producer) is the same event and
/// every stage deduplicates it.
pub fn order_cancelled_id(store_id: &str, order_id: &str) -> Uuid {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("order.cancelled/{store_id}/{order_id}").as_bytes(),
    )
}

/// Timestamps are Avro `timestamp-millis`; JSON producers may send RFC 3339 strings.
pub mod timestamp {
    use serde::{Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(*v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = i64;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("milliseconds since the epoch or an RFC 3339 timestamp")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
                Ok(v)
            }
            fn visit_i32<E: de::Error>(self, v: i32) -> Result<i64, E> {
                Ok(v.into())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
                i64::try_from(v).map_err(|_| E::custom("timestamp out of range"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<i64, E> {
                chrono::DateTime::parse_from_rfc3339(v)
                    .map(|t| t.timestamp_millis())
                    .map_err(|e| E::custom(format!("invalid RFC 3339 timestamp {v:?}: {e}")))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderLine {
    pub sku: String,
    pub quantity: i32,
    /// Money is integer minor units (cents), never floating point.
    pub unit_price_cents: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScreeningDecision {
    Approved,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Shortage {
    pub sku: String,
    pub requested: i32,
    pub available: i32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LowStockTrigger {
    Crossing,
    Watchdog,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentFailureReason {
    Declined,
    GatewayUnavailable,
    /// The customer cancelled the order before it was charged (or while a charge's fate
    /// was unknown, which was then voided).
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScanKind {
    PickedUp,
    InTransit,
    OutForDelivery,
    Delivered,
    Failed,
}

/// Declares one event struct: the envelope (flattened, so the wire shape is flat as in
/// the producer contract) followed by the event's own fields.
macro_rules! event_struct {
    ($(#[$m:meta])* $name:ident { $($(#[$fm:meta])* $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            #[serde(flatten)]
            pub envelope: Envelope,
            $($(#[$fm])* pub $field: $ty,)*
        }
    };
}

event_struct!(OrderCreated { customer_id: String, email: String, currency: String, shipping_country: String, items: Vec<OrderLine>, #[serde(with = "timestamp")] placed_at: i64 });
event_struct!(OrderScreened { decision: ScreeningDecision, reasons: Vec<String>, customer_id: String, email: String, currency: String, total_cents: i64, items: Vec<OrderLine> });
event_struct!(StockRestocked { sku: String, quantity: i32, #[serde(default)] note: Option<String> });
event_struct!(StockAdjusted {
    sku: String,
    delta: i32,
    reason: String
});
event_struct!(ThresholdSet {
    sku: String,
    threshold: i32
});
event_struct!(StockReserved { customer_id: String, currency: String, total_cents: i64, items: Vec<OrderLine> });
event_struct!(StockRejected { short: Vec<Shortage>, reason: String });
event_struct!(StockReleased { items: Vec<OrderLine>, reason: String });
event_struct!(StockLevelChanged {
    sku: String,
    available: i32,
    delta: i32,
    reason: String
});
event_struct!(LowStock {
    sku: String,
    available: i32,
    threshold: i32,
    trigger: LowStockTrigger
});
event_struct!(StockRecovered {
    sku: String,
    available: i32,
    threshold: i32
});
event_struct!(PaymentAuthorized {
    amount_cents: i64,
    currency: String,
    attempt: i32,
    authorization_id: String
});
event_struct!(PaymentRetrying {
    amount_cents: i64,
    currency: String,
    attempt: i32,
    #[serde(with = "timestamp")]
    next_attempt_at: i64,
    error: String
});
event_struct!(PaymentFailed {
    amount_cents: i64,
    currency: String,
    attempts: i32,
    reason: PaymentFailureReason,
    message: String
});
event_struct!(PaymentRefunded {
    amount_cents: i64,
    currency: String,
    refund_id: String,
    reason: String
});
event_struct!(Picking {});
event_struct!(Packed {});
event_struct!(ReadyToShip {});
event_struct!(
    /// A customer's request to cancel an order, on `order.cancelled`. One per order: its
    /// ID is [`order_cancelled_id`], so a repeated request deduplicates.
    OrderCancelled {
        #[serde(default)]
        reason: Option<String>
    }
);
event_struct!(
    /// Fulfillment stopped the order before `ReadyToShip`: the order is cancelled, and
    /// inventory and payment give back its stock and charge.
    CancellationAccepted {
        #[serde(default)]
        reason: Option<String>
    }
);
event_struct!(
    /// A cancellation that came too late (the order is ready to ship or beyond); it
    /// changes nothing.
    CancellationRefused { reason: String }
);
event_struct!(CarrierScan { carrier: String, tracking_number: String, scan: ScanKind, #[serde(default)] location: Option<String>, #[serde(default)] detail: Option<String>, #[serde(with = "timestamp")] scanned_at: i64 });
event_struct!(Shipped {
    carrier: String,
    tracking_number: String
});
event_struct!(InTransit { #[serde(default)] location: Option<String> });
event_struct!(OutForDelivery {});
event_struct!(Delivered {});
event_struct!(DeliveryFailed { reason: String });
event_struct!(ReplenishmentRequested {
    sku: String,
    quantity: i32,
    available: i32,
    threshold: i32
});
event_struct!(DeliveryAnomaly {
    state: String,
    scan: String,
    message: String
});

/// Declares the closed set of events: the `Event` enum, `EventType`, and where each
/// type's schema file is.
macro_rules! events {
    ($($name:ident => $file:literal),* $(,)?) => {
        /// Any OrderFlow event.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Event { $($name($name)),* }

        /// The type of an event; its name is the Avro record name and the value of the
        /// `event-type` header.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum EventType { $($name),* }

        impl EventType {
            pub const ALL: &'static [EventType] = &[$(EventType::$name),*];

            pub fn name(self) -> &'static str {
                match self { $(EventType::$name => stringify!($name)),* }
            }

            pub fn from_name(name: &str) -> Option<Self> {
                match name { $(stringify!($name) => Some(EventType::$name),)* _ => None }
            }

            /// The Avro schema text, embedded from `schemas/`.
            pub fn schema_source(self) -> &'static str {
                match self { $(EventType::$name => include_str!(concat!("../../schemas/", $file))),* }
            }

            pub fn schema_file(self) -> &'static str {
                match self { $(EventType::$name => $file),* }
            }
        }

        impl Event {
            pub fn event_type(&self) -> EventType {
                match self { $(Event::$name(_) => EventType::$name),* }
            }

            pub fn envelope(&self) -> &Envelope {
                match self { $(Event::$name(e) => &e.envelope),* }
            }

            pub fn envelope_mut(&mut self) -> &mut Envelope {
                match self { $(Event::$name(e) => &mut e.envelope),* }
            }

            fn to_avro(&self) -> Result<apache_avro::types::Value, apache_avro::Error> {
                match self { $(Event::$name(e) => apache_avro::to_value(e)),* }
            }

            /// Serializes straight into Avro with `writer`'s schema, which must be this
            /// event's current one (no intermediate `Value`, no resolution).
            fn write_avro(&self, writer: &apache_avro::writer::datum::GenericDatumWriter<'_>, out: &mut Vec<u8>) -> Result<usize, apache_avro::Error> {
                match self { $(Event::$name(e) => writer.write_ser(out, e)),* }
            }

            /// Reads a datum written with the current schema of `t` straight into the event.
            fn read_avro(t: EventType, reader: &apache_avro::reader::datum::GenericDatumReader<'_>, datum: &mut &[u8]) -> Result<Event, apache_avro::Error> {
                Ok(match t { $(EventType::$name => Event::$name(reader.read_deser(datum)?)),* })
            }

            fn from_avro(t: EventType, v: &apache_avro::types::Value) -> Result<Event, apache_avro::Error> {
                Ok(match t { $(EventType::$name => Event::$name(apache_avro::from_value(v)?)),* })
            }

            fn from_json(t: EventType, v: serde_json::Value) -> Result<Event, serde_json::Error> {
                Ok(match t { $(EventType::$name => Event::$name(serde_json::from_value(v)?)),* })
            }

            /// Like `from_json`, naming the field at fault (`items[0].quantity`) if any.
            fn from_json_traced(t: EventType, v: serde_json::Value) -> Result<Event, (Option<String>, serde_json::Error)> {
                Ok(match t { $(EventType::$name => Event::$name(serde_path_to_error::deserialize(v).map_err(traced)?)),* })
            }

            /// The event as the flat JSON object of the producer contract (no type
            /// field): what a read model stores as an event's payload.
            pub fn to_json(&self) -> Result<serde_json::Value, serde_json::Error> {
                match self { $(Event::$name(e) => serde_json::to_value(e)),* }
            }

            /// The event of type `t` whose [`to_json`](Self::to_json) is `v`.
            pub fn from_json_value(t: EventType, v: serde_json::Value) -> Result<Event, serde_json::Error> {
                Event::from_json(t, v)
            }
        }

        $(impl From<$name> for Event {
            fn from(e: $name) -> Event { Event::$name(e) }
        })*
    };
}

events! {
    OrderCreated => "order_created.avsc",
    OrderScreened => "order_screened.avsc",
    StockRestocked => "stock_restocked.avsc",
    StockAdjusted => "stock_adjusted.avsc",
    ThresholdSet => "threshold_set.avsc",
    StockReserved => "stock_reserved.avsc",
    StockRejected => "stock_rejected.avsc",
    StockReleased => "stock_released.avsc",
    StockLevelChanged => "stock_level_changed.avsc",
    LowStock => "low_stock.avsc",
    StockRecovered => "stock_recovered.avsc",
    PaymentAuthorized => "payment_authorized.avsc",
    PaymentRetrying => "payment_retrying.avsc",
    PaymentFailed => "payment_failed.avsc",
    PaymentRefunded => "payment_refunded.avsc",
    Picking => "picking.avsc",
    Packed => "packed.avsc",
    ReadyToShip => "ready_to_ship.avsc",
    OrderCancelled => "order_cancelled.avsc",
    CancellationAccepted => "cancellation_accepted.avsc",
    CancellationRefused => "cancellation_refused.avsc",
    CarrierScan => "carrier_scan.avsc",
    Shipped => "shipped.avsc",
    InTransit => "in_transit.avsc",
    OutForDelivery => "out_for_delivery.avsc",
    Delivered => "delivered.avsc",
    DeliveryFailed => "delivery_failed.avsc",
    DeliveryAnomaly => "delivery_anomaly.avsc",
    ReplenishmentRequested => "replenishment_requested.avsc",
}

/// A JSON error and the path of the field it concerns: serde reports a missing field at
/// the path of the object that lacks it, so the field's name is appended.
fn traced(e: serde_path_to_error::Error<serde_json::Error>) -> (Option<String>, serde_json::Error) {
    let path = e.path().to_string();
    let inner = e.into_inner();
    let message = inner.to_string();
    let missing = message
        .strip_prefix("missing field `")
        .and_then(|rest| rest.split('`').next());
    let field = match (path.as_str(), missing) {
        (".", Some(m)) => Some(m.to_owned()),
        (p, Some(m)) => Some(format!("{p}.{m}")),
        (".", None) => None,
        (p, None) => Some(p.to_owned()),
    };
    (field, inner)
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl OrderCreated {
    /// Whether this is a manual retry of an order published before (see [`retry_number`]).
    pub fn is_retry(&self) -> bool {
        retry_number(&self.envelope).is_some()
    }

    /// Sum of the order's lines in minor units; `None` on overflow, which no real order
    /// reaches and validation rejects.
    pub fn total_cents(&self) -> Option<i64> {
        self.items.iter().try_fold(0i64, |acc, l| {
            acc.checked_add(l.unit_price_cents.checked_mul(i64::from(l.quantity))?)
        })
    }
}
