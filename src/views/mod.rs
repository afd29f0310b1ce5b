//! Read-side views: what each SQL sink (projector, stats, alerts) does with one decoded
//! record, as backend-neutral row operations ([`RowOp`]) that [`crate::sql`] applies to
//! PostgreSQL or SQLite.
//!
//! Invariant: a view is a pure function of one record (and settings). It keeps no memory
//! between records — whatever a later record needs from an earlier one (the status an
//! order is in, when it was created, whether an alert is open) is read back from the
//! database by the operation that needs it, inside the sink's commit transaction, so a
//! restarted sink loses nothing and a replay decides the same. Every record's operations
//! carry one deduplication key ([`Effects::key`]): the event ID, or for a dead letter its
//! source position, so an event that arrives again is applied at most once.

pub mod alerts;
pub mod projector;
pub mod stats;

use serde::{Deserialize, Serialize};

use crate::config::AlertSettings;
use crate::events::{Event, EventType};
use crate::status::OrderStatus;
use crate::topics;

/// The three SQL sinks. A closed set, dispatched by one `match` in [`View::effects`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Sink {
    /// `orders` and the `order_events` timeline.
    Projector,
    /// Per-store, per-minute dashboard metrics.
    Stats,
    /// The alert lifecycle, stock levels, and replenishment requests.
    Alerts,
}

impl Sink {
    pub const ALL: &'static [Sink] = &[Sink::Projector, Sink::Stats, Sink::Alerts];

    /// The sink's name in `sink_offsets`, `sink_applied_events` and `--stages`.
    pub fn name(self) -> &'static str {
        match self {
            Sink::Projector => "projector",
            Sink::Stats => "stats",
            Sink::Alerts => "alerts",
        }
    }

    pub fn from_name(name: &str) -> Option<Sink> {
        Sink::ALL.iter().copied().find(|s| s.name() == name)
    }

    /// The topics (prefix-free) the sink consumes.
    pub fn topics(self) -> &'static [&'static str] {
        match self {
            Sink::Projector | Sink::Stats => topics::PIPELINE,
            Sink::Alerts => &[
                topics::INVENTORY_COMMANDS,
                topics::INVENTORY_UPDATED,
                topics::INVENTORY_THRESHOLD_REACHED,
                topics::PAYMENT_PROCESSED,
                topics::DLQ,
            ],
        }
    }
}

impl std::fmt::Display for Sink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One record as a sink sees it.
#[derive(Debug, Clone, Copy)]
pub enum Input<'a> {
    /// A decoded event, with the prefix-free topic it was read from.
    Event { topic: &'a str, event: &'a Event },
    /// A record of the dead-letter topic, described by its headers.
    DeadLetter(&'a DeadLetter),
}

/// A record of `orderflow.dlq`, as its headers describe it (see
/// [`crate::runtime::dlq_headers`]); its value, the original bytes, is not needed here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The record key, which is the store ID on every topic; empty when the original
    /// record had none.
    pub store_id: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    pub stage: String,
    pub error_class: String,
    pub error_message: String,
    /// The dead letter's record timestamp, milliseconds since the epoch.
    pub at: i64,
}

impl DeadLetter {
    /// Reads a dead letter from its key, headers and timestamp; `Err` names the header that
    /// is missing or malformed.
    pub fn from_record<'h>(
        key: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'h str, &'h [u8])>,
        at: i64,
    ) -> Result<DeadLetter, String> {
        use crate::runtime::dlq_headers as h;
        let headers: Vec<(&str, &[u8])> = headers.into_iter().collect();
        let get = |name: &str| -> Result<String, String> {
            let (_, v) = headers
                .iter()
                .find(|(k, _)| *k == name)
                .ok_or_else(|| format!("dead letter without the {name} header"))?;
            String::from_utf8(v.to_vec()).map_err(|_| format!("header {name} is not UTF-8"))
        };
        let number = |name: &str| -> Result<i64, String> {
            get(name)?
                .parse()
                .map_err(|e| format!("header {name} is not a number: {e}"))
        };
        Ok(DeadLetter {
            store_id: String::from_utf8_lossy(key.unwrap_or_default()).into_owned(),
            source_topic: get(h::SOURCE_TOPIC)?,
            source_partition: i32::try_from(number(h::SOURCE_PARTITION)?)
                .map_err(|e| format!("header {} out of range: {e}", h::SOURCE_PARTITION))?,
            source_offset: number(h::SOURCE_OFFSET)?,
            stage: get(h::STAGE)?,
            error_class: get(h::ERROR_CLASS)?,
            error_message: get(h::ERROR_MESSAGE).unwrap_or_default(),
            at,
        })
    }

    /// The deduplication key: a stage dead-letters one source record at most once, so the
    /// same dead letter written twice (a re-sent batch) counts once.
    pub fn key(&self) -> String {
        format!(
            "dlq/{}/{}/{}/{}",
            self.stage, self.source_topic, self.source_partition, self.source_offset
        )
    }
}

/// The row operations of one record: applied together, or (when [`key`](Self::key) was
/// applied before) not at all.
#[derive(Debug, Clone, PartialEq)]
pub struct Effects {
    /// The event ID, or [`DeadLetter::key`].
    pub key: String,
    pub ops: Vec<RowOp>,
}

/// Start of the minute `at` falls in (milliseconds since the epoch): the stats bucket.
pub fn minute(at: i64) -> i64 {
    at - at.rem_euclid(60_000)
}

/// Which `orders` timestamp column an event sets (the first time only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OrderMilestone {
    Created,
    Screened,
    Reserved,
    Paid,
    Shipped,
    Delivered,
    Rejected,
    Cancelled,
    DeliveryFailed,
    Refunded,
}

impl OrderMilestone {
    pub fn column(self) -> &'static str {
        match self {
            OrderMilestone::Created => "created_at",
            OrderMilestone::Screened => "screened_at",
            OrderMilestone::Reserved => "reserved_at",
            OrderMilestone::Paid => "paid_at",
            OrderMilestone::Shipped => "shipped_at",
            OrderMilestone::Delivered => "delivered_at",
            OrderMilestone::Rejected => "rejected_at",
            OrderMilestone::Cancelled => "cancelled_at",
            OrderMilestone::DeliveryFailed => "delivery_failed_at",
            OrderMilestone::Refunded => "refunded_at",
        }
    }
}

/// A counter column of `stats_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Counter {
    OrdersCreated,
    /// Rejected by fraud screening.
    OrdersRejected,
    /// Rejected for want of stock.
    StockRejections,
    PaymentsAuthorized,
    PaymentsFailed,
    PaymentsRetried,
    Refunds,
    Shipped,
    Delivered,
    DeliveryFailures,
}

impl Counter {
    pub const ALL: &'static [Counter] = &[
        Counter::OrdersCreated,
        Counter::OrdersRejected,
        Counter::StockRejections,
        Counter::PaymentsAuthorized,
        Counter::PaymentsFailed,
        Counter::PaymentsRetried,
        Counter::Refunds,
        Counter::Shipped,
        Counter::Delivered,
        Counter::DeliveryFailures,
    ];

    pub fn column(self) -> &'static str {
        match self {
            Counter::OrdersCreated => "orders_created",
            Counter::OrdersRejected => "orders_rejected",
            Counter::StockRejections => "stock_rejections",
            Counter::PaymentsAuthorized => "payments_authorized",
            Counter::PaymentsFailed => "payments_failed",
            Counter::PaymentsRetried => "payments_retried",
            Counter::Refunds => "refunds",
            Counter::Shipped => "shipped",
            Counter::Delivered => "delivered",
            Counter::DeliveryFailures => "delivery_failures",
        }
    }

    /// The counter an event type adds one to, if any: the one mapping that the stats view
    /// and its recomputation in tests share.
    pub fn of(event: &Event) -> Option<Counter> {
        use crate::events::{PaymentFailureReason, ScreeningDecision};
        Some(match event {
            // A manual retry re-publishes an order already counted.
            Event::OrderCreated(o) if !o.is_retry() => Counter::OrdersCreated,
            Event::OrderScreened(s) if s.decision == ScreeningDecision::Rejected => {
                Counter::OrdersRejected
            }
            Event::StockRejected(_) => Counter::StockRejections,
            Event::PaymentAuthorized(_) => Counter::PaymentsAuthorized,
            // A payment failed because its order was cancelled is no payment failure.
            Event::PaymentFailed(f) if f.reason != PaymentFailureReason::Cancelled => {
                Counter::PaymentsFailed
            }
            Event::PaymentRetrying(_) => Counter::PaymentsRetried,
            Event::PaymentRefunded(_) => Counter::Refunds,
            Event::Shipped(_) => Counter::Shipped,
            Event::Delivered(_) => Counter::Delivered,
            Event::DeliveryFailed(_) => Counter::DeliveryFailures,
            _ => return None,
        })
    }
}

/// An order milestone the stats sink times spans between (`stats_milestones`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatsMilestone {
    Created,
    Paid,
    Shipped,
    Delivered,
}

impl StatsMilestone {
    pub fn column(self) -> &'static str {
        match self {
            StatsMilestone::Created => "created_at",
            StatsMilestone::Paid => "paid_at",
            StatsMilestone::Shipped => "shipped_at",
            StatsMilestone::Delivered => "delivered_at",
        }
    }
}

/// A duration the stats sink measures, from one milestone to a later one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Span {
    CreatedToPaid,
    PaidToShipped,
    CreatedToDelivered,
}

impl Span {
    pub const ALL: &'static [Span] = &[
        Span::CreatedToPaid,
        Span::PaidToShipped,
        Span::CreatedToDelivered,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Span::CreatedToPaid => "created_to_paid",
            Span::PaidToShipped => "paid_to_shipped",
            Span::CreatedToDelivered => "created_to_delivered",
        }
    }

    pub fn from_name(name: &str) -> Option<Span> {
        Span::ALL.iter().copied().find(|s| s.name() == name)
    }

    /// (start, end) milestones.
    pub fn ends(self) -> (StatsMilestone, StatsMilestone) {
        match self {
            Span::CreatedToPaid => (StatsMilestone::Created, StatsMilestone::Paid),
            Span::PaidToShipped => (StatsMilestone::Paid, StatsMilestone::Shipped),
            Span::CreatedToDelivered => (StatsMilestone::Created, StatsMilestone::Delivered),
        }
    }
}

/// Upper bounds (inclusive, milliseconds) of the duration histogram's buckets; a duration
/// above the last lands in the overflow bucket [`OVERFLOW_LE_MS`]. Fixed, because rows of
/// different minutes are only comparable with the same bounds: from 100 ms (a test
/// pipeline) to a week (a parcel).
pub const DURATION_BUCKETS_MS: &[i64] = &[
    100,
    250,
    500,
    1_000,
    2_500,
    5_000,
    10_000,
    30_000,
    60_000,
    300_000,
    900_000,
    3_600_000,
    21_600_000,
    86_400_000,
    259_200_000,
    604_800_000,
];

/// `bucket_le_ms` of durations above every bound (`+Inf`).
pub const OVERFLOW_LE_MS: i64 = i64::MAX;

/// The histogram bucket of a duration (a negative one — clocks of two stages disagreeing
/// — counts as zero).
pub fn duration_bucket(ms: i64) -> i64 {
    DURATION_BUCKETS_MS
        .iter()
        .copied()
        .find(|&le| ms.max(0) <= le)
        .unwrap_or(OVERFLOW_LE_MS)
}

/// Kinds of alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A SKU at or below its threshold; subject: the SKU.
    LowStock,
    /// Payments given up after every attempt failed for want of the gateway; subject:
    /// the failure reason.
    PaymentExhausted,
    /// Many payment retries in a store within a minute; subject: `payment_gateway`.
    GatewayOutage,
    /// Records a stage dead-lettered; subject: `<stage>/<error class>`.
    DeadLetters,
}

impl AlertKind {
    pub const ALL: &'static [AlertKind] = &[
        AlertKind::LowStock,
        AlertKind::PaymentExhausted,
        AlertKind::GatewayOutage,
        AlertKind::DeadLetters,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::LowStock => "low_stock",
            AlertKind::PaymentExhausted => "payment_exhausted",
            AlertKind::GatewayOutage => "gateway_outage",
            AlertKind::DeadLetters => "dead_letters",
        }
    }

    pub fn from_name(name: &str) -> Option<AlertKind> {
        AlertKind::ALL.iter().copied().find(|k| k.as_str() == name)
    }
}

impl std::fmt::Display for AlertKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One change to the read side, independent of the database.
#[derive(Debug, Clone, PartialEq)]
pub enum RowOp {
    // --- projector ---
    /// A row of the `order_events` timeline. Applied first among a record's projector
    /// operations: its primary key (the event ID) is the projector's deduplication.
    InsertEvent {
        event_id: String,
        store_id: String,
        order_id: String,
        event_type: EventType,
        /// The stage (or outside party) that produced the event.
        stage: &'static str,
        /// Prefix-free topic the event was read from.
        topic: String,
        occurred_at: i64,
        payload: serde_json::Value,
    },
    /// Folds one event into its order's `orders` row, creating the row if needed. The
    /// status is computed from the stored one with [`crate::status::advance`]; fields set
    /// by the earliest events (customer, total, currency, milestones) are kept once set;
    /// `last_event_*` follow the latest event by occurrence time.
    UpsertOrder {
        store_id: String,
        order_id: String,
        event_id: String,
        event_type: EventType,
        occurred_at: i64,
        /// The status this event implies ([`crate::status::implied`]).
        status: Option<OrderStatus>,
        milestone: Option<OrderMilestone>,
        customer_id: Option<String>,
        total_cents: Option<i64>,
        currency: Option<String>,
    },

    // --- stats ---
    /// Adds `by` to a counter of the store's minute.
    AddToStat {
        store_id: String,
        time: i64,
        counter: Counter,
        by: i64,
    },
    /// Adds to the store's revenue of one currency in a minute.
    AddRevenue {
        store_id: String,
        time: i64,
        currency: String,
        authorized_cents: i64,
        refunded_cents: i64,
    },
    /// Counts one rejection under its reason in a minute.
    AddRejection {
        store_id: String,
        time: i64,
        reason: String,
    },
    /// Records an order milestone's time (the first one wins). Every span that this
    /// milestone completes — its other end already recorded — is then observed into
    /// the duration histogram of the minute of the span's end, whichever order the two
    /// events arrived in.
    Milestone {
        store_id: String,
        order_id: String,
        milestone: StatsMilestone,
        at: i64,
    },

    // --- alerts ---
    /// A stock level (and/or threshold) reported at `at`, for the stock table: older
    /// reports than the stored one are ignored. Alerts are not its business: the SKU's
    /// low spell is decided by the inventory stage, in `LowStock` and `StockRecovered`.
    ObserveStock {
        store_id: String,
        sku: String,
        available: Option<i32>,
        threshold: Option<i32>,
        at: i64,
    },
    /// A `LowStock` report: records the level and threshold like [`RowOp::ObserveStock`]
    /// and opens the SKU's low-stock alert or counts one more occurrence of the active one.
    /// `replenish` is published only when the alert opens.
    LowStock {
        store_id: String,
        sku: String,
        available: i32,
        threshold: i32,
        at: i64,
        detail: serde_json::Value,
        replenish: Option<Box<Event>>,
    },
    /// A `StockRecovered` report: records the level and threshold like
    /// [`RowOp::ObserveStock`] and resolves the SKU's active low-stock alert. The report
    /// follows the spell's `LowStock` reports on their topic, so the order read decides,
    /// not the times carried.
    StockRecovered {
        store_id: String,
        sku: String,
        available: i32,
        threshold: i32,
        at: i64,
    },
    /// Opens an alert, or counts one more occurrence of the active one of the same
    /// (store, kind, subject).
    OpenAlert {
        store_id: String,
        kind: AlertKind,
        subject: String,
        at: i64,
        detail: serde_json::Value,
    },
    /// Counts one payment retry of the store in the minute of `at`; when the minute's count
    /// reaches `threshold`, opens (or counts one more occurrence of) the store's
    /// gateway-outage alert.
    CountRetry {
        store_id: String,
        at: i64,
        threshold: i64,
        detail: serde_json::Value,
    },
    /// Resolves the active alert of (store, kind, subject) if it was last seen at or
    /// before `at`.
    ResolveAlert {
        store_id: String,
        kind: AlertKind,
        subject: String,
        at: i64,
    },
}

/// A sink's view: turns records into [`Effects`].
#[derive(Debug, Clone)]
pub struct View {
    pub sink: Sink,
    pub alerts: AlertSettings,
}

impl View {
    pub fn new(sink: Sink, alerts: AlertSettings) -> View {
        View { sink, alerts }
    }

    /// The record's operations; `None` when the sink has nothing to do with it.
    pub fn effects(&self, input: Input<'_>) -> Option<Effects> {
        let (key, ops) = match (self.sink, input) {
            (Sink::Projector, Input::Event { topic, event }) => (
                event.envelope().event_id.clone(),
                projector::ops(topic, event),
            ),
            (Sink::Stats, Input::Event { event, .. }) => {
                (event.envelope().event_id.clone(), stats::ops(event))
            }
            (Sink::Alerts, Input::Event { event, .. }) => (
                event.envelope().event_id.clone(),
                alerts::ops(event, &self.alerts),
            ),
            (Sink::Alerts, Input::DeadLetter(dl)) => (dl.key(), alerts::dead_letter_ops(dl)),
            (Sink::Projector | Sink::Stats, Input::DeadLetter(_)) => return None,
        };
        (!ops.is_empty()).then_some(Effects { key, ops })
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Sample events for the views' tests.
    use crate::events::*;

    pub const STORE: &str = "s-1";
    pub const ORDER: &str = "o-1";
    /// 2026-01-01T00:00:00Z.
    pub const T0: i64 = 1_767_225_600_000;

    pub fn env(id: &str, at: i64) -> Envelope {
        Envelope {
            event_id: id.into(),
            order_id: Some(ORDER.into()),
            store_id: STORE.into(),
            correlation_id: ORDER.into(),
            causation_id: None,
            occurred_at: at,
            schema_version: 1,
        }
    }

    pub fn lines() -> Vec<OrderLine> {
        vec![OrderLine {
            sku: "sku-1".into(),
            quantity: 2,
            unit_price_cents: 1_500,
        }]
    }

    pub fn created(at: i64) -> Event {
        OrderCreated {
            envelope: env("e-created", at),
            customer_id: "c-1".into(),
            email: "c@example.com".into(),
            currency: "EUR".into(),
            shipping_country: "DE".into(),
            items: lines(),
            placed_at: at,
        }
        .into()
    }

    pub fn screened(decision: ScreeningDecision, reasons: &[&str], at: i64) -> Event {
        OrderScreened {
            envelope: env("e-screened", at),
            decision,
            reasons: reasons.iter().map(|r| (*r).to_owned()).collect(),
            customer_id: "c-1".into(),
            email: "c@example.com".into(),
            currency: "EUR".into(),
            total_cents: 3_000,
            items: lines(),
        }
        .into()
    }

    pub fn authorized(at: i64) -> Event {
        PaymentAuthorized {
            envelope: env("e-paid", at),
            amount_cents: 3_000,
            currency: "EUR".into(),
            attempt: 1,
            authorization_id: "auth-1".into(),
        }
        .into()
    }

    pub fn retrying(id: &str, at: i64) -> Event {
        PaymentRetrying {
            envelope: env(id, at),
            amount_cents: 3_000,
            currency: "EUR".into(),
            attempt: 1,
            next_attempt_at: at + 500,
            error: "timeout".into(),
        }
        .into()
    }

    pub fn failed(reason: PaymentFailureReason, at: i64) -> Event {
        PaymentFailed {
            envelope: env("e-failed", at),
            amount_cents: 3_000,
            currency: "EUR".into(),
            attempts: 6,
            reason,
            message: "gateway unavailable".into(),
        }
        .into()
    }

    pub fn low_stock(id: &str, available: i32, threshold: i32, at: i64) -> Event {
        let mut envelope = env(id, at);
        envelope.order_id = None;
        LowStock {
            envelope,
            sku: "sku-1".into(),
            available,
            threshold,
            trigger: LowStockTrigger::Crossing,
        }
        .into()
    }

    pub fn level(id: &str, available: i32, at: i64) -> Event {
        let mut envelope = env(id, at);
        envelope.order_id = None;
        StockLevelChanged {
            envelope,
            sku: "sku-1".into(),
            available,
            delta: 10,
            reason: "restock".into(),
        }
        .into()
    }
}

#[cfg(test)]
mod tests {
    use super::testing::*;
    use super::*;

    #[test]
    fn minutes_and_duration_buckets() {
        assert_eq!(minute(T0 + 59_999), T0);
        assert_eq!(minute(T0 + 60_000), T0 + 60_000);
        assert_eq!(minute(-1), -60_000);
        assert_eq!(duration_bucket(-5), 100);
        assert_eq!(duration_bucket(100), 100);
        assert_eq!(duration_bucket(101), 250);
        assert_eq!(duration_bucket(604_800_000), 604_800_000);
        assert_eq!(duration_bucket(604_800_001), OVERFLOW_LE_MS);
        assert!(DURATION_BUCKETS_MS.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn names_round_trip() {
        for &s in Sink::ALL {
            assert_eq!(Sink::from_name(s.name()), Some(s));
        }
        for &s in Span::ALL {
            assert_eq!(Span::from_name(s.name()), Some(s));
        }
        for &k in AlertKind::ALL {
            assert_eq!(AlertKind::from_name(k.as_str()), Some(k));
        }
        assert_eq!(Sink::from_name("fraud"), None);
    }

    #[test]
    fn dead_letters_are_read_from_their_headers() -> Result<(), String> {
        use crate::runtime::dlq_headers as h;
        let headers: Vec<(&str, &[u8])> = vec![
            (h::SOURCE_TOPIC, b"order.created"),
            (h::SOURCE_PARTITION, b"3"),
            (h::SOURCE_OFFSET, b"42"),
            (h::STAGE, b"fraud"),
            (h::ERROR_CLASS, b"decode"),
            (h::ERROR_MESSAGE, b"not JSON"),
            ("event-type", b"OrderCreated"),
        ];
        let dl = DeadLetter::from_record(Some(b"s-1"), headers.clone(), T0)?;
        assert_eq!(
            dl,
            DeadLetter {
                store_id: "s-1".into(),
                source_topic: "order.created".into(),
                source_partition: 3,
                source_offset: 42,
                stage: "fraud".into(),
                error_class: "decode".into(),
                error_message: "not JSON".into(),
                at: T0,
            }
        );
        assert_eq!(dl.key(), "dlq/fraud/order.created/3/42");
        let missing = DeadLetter::from_record(None, headers[1..].to_vec(), T0);
        assert_eq!(
            missing,
            Err("dead letter without the orderflow.source.topic header".to_owned())
        );
        Ok(())
    }

    #[test]
    fn each_sink_takes_only_its_records() {
        let view = |sink| View::new(sink, AlertSettings::default());
        let created = created(T0);
        let input = Input::Event {
            topic: topics::ORDER_CREATED,
            event: &created,
        };
        let projector = view(Sink::Projector).effects(input);
        assert_eq!(
            projector.as_ref().map(|e| e.key.as_str()),
            Some("e-created")
        );
        assert_eq!(projector.map(|e| e.ops.len()), Some(2));
        assert_eq!(
            view(Sink::Stats).effects(input).map(|e| e.ops.len()),
            Some(2)
        );
        assert_eq!(view(Sink::Alerts).effects(input), None);
        let dl = DeadLetter {
            store_id: "s-1".into(),
            source_topic: "order.created".into(),
            source_partition: 0,
            source_offset: 7,
            stage: "fraud".into(),
            error_class: "decode".into(),
            error_message: "bad".into(),
            at: T0,
        };
        assert_eq!(view(Sink::Projector).effects(Input::DeadLetter(&dl)), None);
        assert_eq!(view(Sink::Stats).effects(Input::DeadLetter(&dl)), None);
        let alerts = view(Sink::Alerts).effects(Input::DeadLetter(&dl));
        assert_eq!(
            alerts.map(|e| e.key),
            Some("dlq/fraud/order.created/0/7".to_owned())
        );
    }
}
