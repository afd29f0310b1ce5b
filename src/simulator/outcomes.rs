//! What became of a run's orders, read from the lifecycle topics.
//!
//! Invariant: only records produced after [`OutcomeWatch::snapshot`] are read (the watch
//! starts at each partition's end offset as of then), and only orders of the run count,
//! so a long-lived deployment's history neither slows the watch nor skews its numbers.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use indicatif::ProgressBar;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

use super::SimError;
use crate::config::Settings;
use crate::events::Event;
use crate::events::codec::{Codec, DecodeHints};
use crate::runtime::EVENT_TYPE_HEADER;
use crate::status::{self, OrderStatus, RejectionReason};
use crate::topics;

/// The topics that tell how an order ends.
const LIFECYCLE: &[&str] = &[
    topics::ORDER_SCREENED,
    topics::INVENTORY_UPDATED,
    topics::PAYMENT_PROCESSED,
    // A customer's cancellation accepted before the order was reserved ends it here.
    topics::FULFILLMENT_UPDATED,
    topics::DELIVERY_UPDATED,
];

/// What the watch knows of one order.
#[derive(Debug, Clone, Copy, Default)]
struct Seen {
    /// As [`crate::status`] derives it: the one place that maps events to statuses.
    status: Option<OrderStatus>,
    /// `DeliveryFailed` seen: the order is `shipped` until its refund.
    delivery_failed: bool,
}

impl Seen {
    fn settled(&self) -> bool {
        self.status.is_some_and(|s| s.is_terminal())
    }
}

/// Counts of a run's orders by outcome.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcomes {
    /// Orders of the run (the published ones).
    pub orders: u64,
    pub delivered: u64,
    pub rejected_fraud: u64,
    pub rejected_stock: u64,
    pub cancelled: u64,
    pub refunded: u64,
    /// Delivery failed, the refund not seen yet.
    pub delivery_failed: u64,
    /// Orders with no outcome yet (the watch ended first).
    pub in_flight: u64,
    /// How long the watch ran.
    pub waited: Duration,
    /// Records that did not decode (they are skipped).
    pub undecodable: u64,
}

impl Outcomes {
    pub fn rejected(&self) -> u64 {
        self.rejected_fraud + self.rejected_stock
    }

    pub fn settled(&self) -> u64 {
        self.delivered + self.rejected() + self.cancelled + self.refunded
    }
}

/// End offsets of the lifecycle topics, taken before a run publishes.
#[derive(Debug, Clone)]
pub struct OutcomeWatch {
    settings: Settings,
    start: Vec<(String, i32, i64)>,
}

impl OutcomeWatch {
    pub async fn snapshot(settings: &Settings) -> Result<OutcomeWatch, SimError> {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || {
            let consumer = reader(&settings)?;
            let mut start = Vec::new();
            for base in LIFECYCLE {
                let topic = settings.topics().name(base);
                let consume = |source| SimError::Consume {
                    topic: topic.clone(),
                    source,
                };
                let md = consumer
                    .fetch_metadata(Some(&topic), Duration::from_secs(10))
                    .map_err(consume)?;
                let partitions = md.topics().first().map_or(0, |t| t.partitions().len());
                for p in 0..partitions as i32 {
                    let (_, high) = consumer
                        .fetch_watermarks(&topic, p, Duration::from_secs(10))
                        .map_err(consume)?;
                    start.push((topic.clone(), p, high));
                }
            }
            Ok(OutcomeWatch { settings, start })
        })
        .await
        .map_err(|e| SimError::Task(e.to_string()))?
    }

    /// Reads the lifecycle topics until all `orders` orders whose IDs start with
    /// `order_prefix` are settled, `timeout` passes, or `shutdown` is cancelled.
    pub async fn observe(
        self,
        order_prefix: String,
        orders: u64,
        timeout: Duration,
        shutdown: CancellationToken,
        progress: ProgressBar,
    ) -> Result<Outcomes, SimError> {
        tokio::task::spawn_blocking(move || {
            self.observe_blocking(&order_prefix, orders, timeout, &shutdown, &progress)
        })
        .await
        .map_err(|e| SimError::Task(e.to_string()))?
    }

    fn observe_blocking(
        &self,
        order_prefix: &str,
        orders: u64,
        timeout: Duration,
        shutdown: &CancellationToken,
        progress: &ProgressBar,
    ) -> Result<Outcomes, SimError> {
        let started = Instant::now();
        let consumer = reader(&self.settings)?;
        let mut tpl = TopicPartitionList::new();
        for (topic, p, offset) in &self.start {
            tpl.add_partition_offset(topic, *p, Offset::Offset(*offset))
                .map_err(|source| SimError::Consume {
                    topic: topic.clone(),
                    source,
                })?;
        }
        consumer.assign(&tpl).map_err(|source| SimError::Consume {
            topic: "lifecycle topics".into(),
            source,
        })?;
        let topics = self.settings.topics();
        let codec = Codec::new();
        let mut seen: HashMap<String, Seen> = HashMap::new();
        let mut undecodable = 0;
        let mut settled = 0u64;
        progress.set_length(orders);
        while settled < orders && started.elapsed() < timeout && !shutdown.is_cancelled() {
            let Some(m) = consumer.poll(Duration::from_millis(100)) else {
                continue;
            };
            let m = match m {
                Ok(m) => m,
                Err(e) => {
                    tracing::debug!(error = %e, "outcome watch consumer error");
                    continue;
                }
            };
            let Some(payload) = m.payload() else { continue };
            let header_type = m.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == EVENT_TYPE_HEADER)
                    .and_then(|h| std::str::from_utf8(h.value?).ok())
            });
            let base = topics.base(m.topic()).unwrap_or(m.topic());
            let hints = DecodeHints {
                header_type,
                topic_default: topics::default_event_type(base),
                origin: Some((m.topic(), m.partition(), m.offset())),
            };
            let event = match codec.decode(payload, hints) {
                Ok(e) => e,
                Err(_) => {
                    undecodable += 1;
                    continue;
                }
            };
            let Some(order) = event.envelope().order_id.as_deref() else {
                continue;
            };
            if !order.starts_with(order_prefix) {
                continue;
            }
            let s = seen.entry(order.to_owned()).or_default();
            let before = s.settled();
            s.status = status::next(s.status, &event);
            s.delivery_failed |= matches!(event, Event::DeliveryFailed(_));
            if !before && s.settled() {
                settled += 1;
                progress.set_position(settled);
            }
        }
        let mut out = Outcomes {
            orders,
            waited: started.elapsed(),
            undecodable,
            ..Outcomes::default()
        };
        for s in seen.values() {
            match s.status {
                Some(OrderStatus::Delivered) => out.delivered += 1,
                Some(OrderStatus::Rejected(RejectionReason::Fraud)) => out.rejected_fraud += 1,
                Some(OrderStatus::Rejected(RejectionReason::OutOfStock)) => out.rejected_stock += 1,
                Some(OrderStatus::Cancelled) => out.cancelled += 1,
                Some(OrderStatus::Refunded) => out.refunded += 1,
                _ if s.delivery_failed => out.delivery_failed += 1,
                _ => {}
            }
        }
        out.in_flight = orders.saturating_sub(out.settled() + out.delivery_failed);
        Ok(out)
    }
}

/// A consumer that only reads by assignment: it never joins its (unique) group and
/// never commits.
fn reader(settings: &Settings) -> Result<BaseConsumer, SimError> {
    settings
        .kafka_client([
            (
                "group.id",
                format!(
                    "{}.load-watch.{}",
                    settings.group_prefix,
                    uuid::Uuid::new_v4()
                ),
            ),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("isolation.level", "read_committed".into()),
            (
                "fetch.wait.max.ms",
                crate::runtime::kafka::FETCH_WAIT_MS.into(),
            ),
        ])
        .create()
        .map_err(SimError::Client)
}
