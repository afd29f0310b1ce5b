//! Every topic name, in one place, behind one configurable prefix so that several
//! deployments (or test runs) can share a broker.
//!
//! Invariant: all pipeline topics and changelogs have the same partition count, so a
//! store's records land on the same partition number everywhere (co-partitioning).

use crate::events::EventType;

pub const ORDER_CREATED: &str = "order.created";
pub const ORDER_SCREENED: &str = "order.screened";
/// Customer cancellation requests (`OrderCancelled`), from producers and the HTTP API.
pub const ORDER_CANCELLED: &str = "order.cancelled";
pub const INVENTORY_COMMANDS: &str = "inventory.commands";
pub const INVENTORY_UPDATED: &str = "inventory.updated";
pub const INVENTORY_THRESHOLD_REACHED: &str = "inventory.threshold_reached";
pub const PAYMENT_PROCESSED: &str = "payment.processed";
pub const FULFILLMENT_UPDATED: &str = "fulfillment.updated";
pub const CARRIER_UPDATES: &str = "carrier.updates";
pub const DELIVERY_UPDATED: &str = "delivery.updated";
pub const PURCHASING_REPLENISHMENT: &str = "purchasing.replenishment";
pub const DLQ: &str = "orderflow.dlq";

/// Topics that carry events through the pipeline (not changelogs, not the DLQ).
pub const PIPELINE: &[&str] = &[
    ORDER_CREATED,
    ORDER_SCREENED,
    ORDER_CANCELLED,
    INVENTORY_COMMANDS,
    INVENTORY_UPDATED,
    INVENTORY_THRESHOLD_REACHED,
    PAYMENT_PROCESSED,
    FULFILLMENT_UPDATED,
    CARRIER_UPDATES,
    DELIVERY_UPDATED,
];

/// Topics the SQL sinks publish to, for systems outside the pipeline (purchasing).
pub const SINK_OUTPUTS: &[&str] = &[PURCHASING_REPLENISHMENT];

/// Stages that keep state, each with a compacted `<stage>.changelog` topic.
pub const STATEFUL_STAGES: &[&str] = &["fraud", "inventory", "payment", "fulfillment", "delivery"];

/// Prefixed topic names for one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Self {
        Topics {
            prefix: prefix.into(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The deployment's name of a topic constant from this module.
    pub fn name(&self, base: &str) -> String {
        format!("{}{base}", self.prefix)
    }

    pub fn changelog(&self, stage: &str) -> String {
        self.name(&format!("{stage}.changelog"))
    }

    /// The prefix-free name of one of this deployment's topics, if it is one.
    pub fn base<'a>(&self, name: &'a str) -> Option<&'a str> {
        name.strip_prefix(self.prefix.as_str())
    }

    /// Every topic `orderflow topics create` provisions: (name, compacted).
    pub fn all(&self) -> Vec<(String, bool)> {
        let mut all: Vec<(String, bool)> = PIPELINE.iter().map(|t| (self.name(t), false)).collect();
        all.extend(SINK_OUTPUTS.iter().map(|t| (self.name(t), false)));
        all.push((self.name(DLQ), false));
        all.extend(STATEFUL_STAGES.iter().map(|s| (self.changelog(s), true)));
        all
    }
}

/// The event type a record on `base` topic is assumed to be when neither the value nor a
/// header names one: topics with a single producer-facing type.
pub fn default_event_type(base: &str) -> Option<EventType> {
    match base {
        ORDER_CREATED => Some(EventType::OrderCreated),
        ORDER_SCREENED => Some(EventType::OrderScreened),
        ORDER_CANCELLED => Some(EventType::OrderCancelled),
        CARRIER_UPDATES => Some(EventType::CarrierScan),
        INVENTORY_THRESHOLD_REACHED => Some(EventType::LowStock),
        _ => None,
    }
}

/// The topic each event type is published to.
pub fn topic_of(t: EventType) -> &'static str {
    use EventType::*;
    match t {
        OrderCreated => ORDER_CREATED,
        OrderScreened => ORDER_SCREENED,
        StockRestocked | StockAdjusted | ThresholdSet => INVENTORY_COMMANDS,
        StockReserved | StockRejected | StockReleased | StockLevelChanged => INVENTORY_UPDATED,
        LowStock | StockRecovered => INVENTORY_THRESHOLD_REACHED,
        PaymentAuthorized | PaymentRetrying | PaymentFailed | PaymentRefunded => PAYMENT_PROCESSED,
        OrderCancelled => ORDER_CANCELLED,
        Picking | Packed | ReadyToShip | CancellationAccepted | CancellationRefused => {
            FULFILLMENT_UPDATED
        }
        CarrierScan => CARRIER_UPDATES,
        Shipped | InTransit | OutForDelivery | Delivered | DeliveryFailed | DeliveryAnomaly => {
            DELIVERY_UPDATED
        }
        ReplenishmentRequested => PURCHASING_REPLENISHMENT,
    }
}
