//! The carrier player: picks up every order that is ready to ship and scans it to the
//! door, as a parcel carrier's integration would.
//!
//! It consumes `fulfillment.updated` in its own consumer group (`<group_prefix>.carrier`
//! unless configured), from the earliest offset when the group is new, and commits an
//! offset only once every `ReadyToShip` before it has had all its scans acknowledged.
//! So a restarted carrier (or test worker) neither loses an order nor re-scans finished
//! ones: it resumes at the first order it had not finished, and replays that order's
//! scans from the start. A replayed scan carries the same event ID (derived from store,
//! order and scan), so the delivery stage drops it as a duplicate.
//!
//! Invariant: every order gets `picked_up`, `in_transit`, `out_for_delivery`, then
//! `delivered` or — with probability `delivery_failure_rate`, decided by the seed and the
//! order alone — `failed`; scans of one order are published one after another.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::SimError;
use super::generate::seeded_hash;
use crate::config::Settings;
use crate::events::codec::{Codec, DecodeHints};
use crate::events::{CarrierScan, Envelope, Event, ID_NAMESPACE, ScanKind};
use crate::runtime::{CORRELATION_HEADER, EVENT_TYPE_HEADER};
use crate::topics;

#[derive(Debug, Clone, PartialEq)]
pub struct CarrierConfig {
    /// Consumer group; `None` is `<group_prefix>.carrier`. Committed offsets are where a
    /// restarted carrier resumes.
    pub group_id: Option<String>,
    /// The carrier's name on every scan.
    pub carrier: String,
    /// Pause between two scans of one order.
    pub scan_interval: Duration,
    /// Share of orders whose last scan is `failed` instead of `delivered`.
    pub delivery_failure_rate: f64,
    /// With the order, decides which deliveries fail and the tracking numbers.
    pub seed: u64,
}

impl Default for CarrierConfig {
    fn default() -> Self {
        CarrierConfig {
            group_id: None,
            carrier: "simpost".into(),
            scan_interval: Duration::from_millis(30),
            delivery_failure_rate: 0.05,
            seed: 42,
        }
    }
}

impl CarrierConfig {
    /// Whether this carrier fails to deliver the order (a pure function of the seed, the
    /// store and the order).
    pub fn delivery_fails(&self, store_id: &str, order_id: &str) -> bool {
        let h = seeded_hash(self.seed, &format!("deliver/{store_id}/{order_id}"));
        let u = (h >> 11) as f64 / (1u64 << 53) as f64;
        u < self.delivery_failure_rate
    }

    /// The scans this carrier publishes for an order, in order.
    pub fn scans_for(&self, store_id: &str, order_id: &str) -> [ScanKind; 4] {
        let last = if self.delivery_fails(store_id, order_id) {
            ScanKind::Failed
        } else {
            ScanKind::Delivered
        };
        [
            ScanKind::PickedUp,
            ScanKind::InTransit,
            ScanKind::OutForDelivery,
            last,
        ]
    }

    pub fn tracking_number(&self, store_id: &str, order_id: &str) -> String {
        let h = seeded_hash(self.seed, &format!("track/{store_id}/{order_id}"));
        format!("SP{:012}", h % 1_000_000_000_000)
    }
}

/// The event ID of a scan: the same for every replay of the order's scans.
pub fn scan_event_id(store_id: &str, order_id: &str, scan: ScanKind) -> Uuid {
    Uuid::new_v5(
        &ID_NAMESPACE,
        format!("carrier/{store_id}/{order_id}/{}", scan_name(scan)).as_bytes(),
    )
}

fn scan_name(scan: ScanKind) -> &'static str {
    match scan {
        ScanKind::PickedUp => "picked_up",
        ScanKind::InTransit => "in_transit",
        ScanKind::OutForDelivery => "out_for_delivery",
        ScanKind::Delivered => "delivered",
        ScanKind::Failed => "failed",
    }
}

/// What a carrier did until it was stopped.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CarrierReport {
    /// Orders whose scans were all published (`delivered + failed`).
    pub orders_scanned: u64,
    /// Scans acknowledged, those of orders left unfinished at shutdown included.
    pub scans_published: u64,
    pub delivered: u64,
    pub failed: u64,
    /// `ReadyToShip` of an order this carrier had already taken (redelivered input).
    pub duplicates_skipped: u64,
    /// Records of `fulfillment.updated` that did not decode (they are skipped).
    pub undecodable: u64,
}

/// Plays the carrier until `shutdown` is cancelled; then abandons the orders it is
/// scanning (their offsets are not committed, so the next carrier redoes them), commits
/// what it finished and returns what it did.
pub async fn play_carrier(
    settings: &Settings,
    config: CarrierConfig,
    shutdown: CancellationToken,
) -> Result<CarrierReport, SimError> {
    let source = settings.topics().name(topics::FULFILLMENT_UPDATED);
    let sink = settings.topics().name(topics::CARRIER_UPDATES);
    let group = config
        .group_id
        .clone()
        .unwrap_or_else(|| settings.group_id("carrier"));
    let consumer = consumer(settings, &group)?;
    consumer
        .subscribe(&[&source])
        .map_err(|e| SimError::Consume {
            topic: source.clone(),
            source: e,
        })?;
    let producer = super::publish::producer(settings, "carrier")?;
    let codec = Arc::new(Codec::new());
    let config = Arc::new(config);

    let mut report = CarrierReport::default();
    let mut offsets = OffsetTracker::default();
    let mut taken: HashSet<(String, String)> = HashSet::new();
    // Scan jobs stop at their next pause once this is cancelled.
    let stop = shutdown.child_token();
    let mut tasks: JoinSet<JobResult> = JoinSet::new();
    let published = Arc::new(AtomicU64::new(0));
    let mut commit_tick = tokio::time::interval(Duration::from_millis(200));
    commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);

    let mut result = loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            Some(joined) = tasks.join_next() => {
                if let Err(e) = finished(joined, &mut report, &mut offsets) {
                    break Err(e);
                }
            }
            m = consumer.recv() => {
                let m = match m {
                    Ok(m) => m,
                    Err(e) => {
                        // librdkafka retries broker errors itself; keep polling.
                        tracing::warn!(error = %e, topic = %source, "carrier consumer error");
                        continue;
                    }
                };
                let (partition, offset) = (m.partition(), m.offset());
                offsets.seen(partition, offset);
                let Some(ready) = ready_to_ship(&codec, &m, &mut report) else {
                    continue;
                };
                let Some(order_id) = ready.order_id.clone() else {
                    report.undecodable += 1;
                    continue;
                };
                if !taken.insert((ready.store_id.clone(), order_id)) {
                    report.duplicates_skipped += 1;
                    continue;
                }
                offsets.start(partition, offset);
                let job = ScanJob {
                    producer: producer.clone(),
                    codec: codec.clone(),
                    config: config.clone(),
                    topic: sink.clone(),
                    ready,
                    stop: stop.clone(),
                    published: published.clone(),
                };
                tasks.spawn(async move { (partition, offset, job.run().await) });
            }
            _ = commit_tick.tick() => offsets.commit(&consumer, &source, CommitMode::Async),
        }
    };
    // Jobs finish the scan they are publishing, so an order whose last scan went out
    // counts as scanned (and its offset is committed); the others are left to the next
    // carrier.
    stop.cancel();
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = finished(joined, &mut report, &mut offsets)
            && result.is_ok()
        {
            result = Err(e);
        }
    }
    offsets.commit(&consumer, &source, CommitMode::Sync);
    report.scans_published = published.load(Ordering::Relaxed);
    result.map(|()| report)
}

/// (partition, offset of the ReadyToShip, the last scan published, `None` if stopped
/// before the end).
type JobResult = (i32, i64, Result<Option<ScanKind>, SimError>);

/// Accounts for a job that ended.
fn finished(
    joined: Result<JobResult, tokio::task::JoinError>,
    report: &mut CarrierReport,
    offsets: &mut OffsetTracker,
) -> Result<(), SimError> {
    let (partition, offset, outcome) = joined.map_err(|e| SimError::Task(e.to_string()))?;
    if let Some(last) = outcome? {
        offsets.done(partition, offset);
        report.orders_scanned += 1;
        if last == ScanKind::Failed {
            report.failed += 1;
        } else {
            report.delivered += 1;
        }
    }
    Ok(())
}

fn consumer(settings: &Settings, group: &str) -> Result<StreamConsumer, SimError> {
    settings
        .kafka_client([
            ("group.id", group.to_owned()),
            ("enable.auto.commit", "false".into()),
            ("auto.offset.reset", "earliest".into()),
            // Fulfillment writes in transactions under `exactly_once`: ship only what committed.
            ("isolation.level", "read_committed".into()),
            // A parcel is picked up as soon as it is ready, not after a long poll.
            (
                "fetch.wait.max.ms",
                crate::runtime::kafka::FETCH_WAIT_MS.into(),
            ),
            (
                "client.id",
                format!("orderflow-carrier-{}", settings.instance_id),
            ),
        ])
        .create()
        .map_err(SimError::Client)
}

/// The envelope of a `ReadyToShip`, or `None` for other events and undecodable records.
fn ready_to_ship(
    codec: &Codec,
    m: &BorrowedMessage<'_>,
    report: &mut CarrierReport,
) -> Option<Envelope> {
    let payload = m.payload()?;
    let header_type = m.headers().and_then(|hs| {
        hs.iter()
            .find(|h| h.key == EVENT_TYPE_HEADER)
            .and_then(|h| std::str::from_utf8(h.value?).ok())
    });
    let hints = DecodeHints {
        header_type,
        topic_default: None,
        origin: Some((m.topic(), m.partition(), m.offset())),
    };
    match codec.decode(payload, hints) {
        Ok(Event::ReadyToShip(r)) => Some(r.envelope),
        Ok(_) => None,
        Err(e) => {
            report.undecodable += 1;
            tracing::warn!(
                error = %e, partition = m.partition(), offset = m.offset(),
                "carrier skips an undecodable record"
            );
            None
        }
    }
}

/// One order's trip from the dock to the door.
struct ScanJob {
    producer: FutureProducer,
    codec: Arc<Codec>,
    config: Arc<CarrierConfig>,
    topic: String,
    ready: Envelope,
    stop: CancellationToken,
    /// Scans acknowledged, across jobs.
    published: Arc<AtomicU64>,
}

impl ScanJob {
    /// Publishes the order's scans one after another; returns the last scan's kind, or
    /// `None` when stopped in a pause (never in the middle of publishing a scan).
    async fn run(self) -> Result<Option<ScanKind>, SimError> {
        let ready = &self.ready;
        let store = ready.store_id.as_str();
        let order = ready.order_id.as_deref().unwrap_or_default();
        let kinds = self.config.scans_for(store, order);
        let tracking = self.config.tracking_number(store, order);
        for (i, &scan) in kinds.iter().enumerate() {
            let pause = if i == 0 {
                Duration::ZERO
            } else {
                self.config.scan_interval
            };
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => return Ok(None),
                _ = tokio::time::sleep(pause) => {}
            }
            let now = chrono::Utc::now().timestamp_millis();
            let (location, detail) = match scan {
                ScanKind::PickedUp => (Some(format!("{store} dock")), None),
                ScanKind::InTransit => (
                    Some(format!(
                        "hub-{}",
                        seeded_hash(self.config.seed, order) % 8 + 1
                    )),
                    None,
                ),
                ScanKind::OutForDelivery => (Some("local depot".to_owned()), None),
                ScanKind::Delivered => (None, Some("left with recipient".to_owned())),
                ScanKind::Failed => (None, Some("recipient not available".to_owned())),
            };
            let event = Event::CarrierScan(CarrierScan {
                envelope: Envelope {
                    event_id: scan_event_id(store, order, scan).to_string(),
                    order_id: ready.order_id.clone(),
                    store_id: ready.store_id.clone(),
                    correlation_id: ready.correlation_id.clone(),
                    causation_id: Some(ready.event_id.clone()),
                    occurred_at: now,
                    schema_version: 1,
                },
                carrier: self.config.carrier.clone(),
                tracking_number: tracking.clone(),
                scan,
                location,
                detail,
                scanned_at: now,
            });
            let payload = self.codec.encode(&event).map_err(|e| SimError::Encode {
                event_type: "CarrierScan",
                message: e.to_string(),
            })?;
            let headers = OwnedHeaders::new()
                .insert(Header {
                    key: EVENT_TYPE_HEADER,
                    value: Some("CarrierScan"),
                })
                .insert(Header {
                    key: CORRELATION_HEADER,
                    value: Some(ready.correlation_id.as_str()),
                });
            let record = FutureRecord::to(&self.topic)
                .key(store)
                .payload(&payload)
                .headers(headers);
            self.producer
                .send(record, Duration::from_secs(30))
                .await
                .map_err(|(source, _)| SimError::Produce {
                    topic: self.topic.clone(),
                    source,
                })?;
            self.published.fetch_add(1, Ordering::Relaxed);
        }
        Ok(Some(kinds[3]))
    }
}

/// Per partition: the offsets of orders being scanned, and the next offset to read.
/// The committable offset is the first unfinished one, so nothing unfinished is skipped.
#[derive(Debug, Default)]
struct OffsetTracker {
    parts: BTreeMap<i32, PartOffsets>,
}

#[derive(Debug, Default)]
struct PartOffsets {
    inflight: BTreeSet<i64>,
    next: i64,
    committed: i64,
}

impl OffsetTracker {
    fn seen(&mut self, partition: i32, offset: i64) {
        let p = self.parts.entry(partition).or_default();
        p.next = p.next.max(offset + 1);
    }

    fn start(&mut self, partition: i32, offset: i64) {
        self.parts
            .entry(partition)
            .or_default()
            .inflight
            .insert(offset);
    }

    fn done(&mut self, partition: i32, offset: i64) {
        if let Some(p) = self.parts.get_mut(&partition) {
            p.inflight.remove(&offset);
        }
    }

    /// (partition, offset) pairs that moved since the last commit.
    fn committable(&self) -> Vec<(i32, i64)> {
        self.parts
            .iter()
            .filter_map(|(&partition, p)| {
                let at = p.inflight.first().copied().unwrap_or(p.next);
                (at > p.committed).then_some((partition, at))
            })
            .collect()
    }

    fn commit(&mut self, consumer: &StreamConsumer, topic: &str, mode: CommitMode) {
        let moved = self.committable();
        if moved.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for &(partition, at) in &moved {
            if tpl
                .add_partition_offset(topic, partition, Offset::Offset(at))
                .is_err()
            {
                return;
            }
        }
        match consumer.commit(&tpl, mode) {
            Ok(()) => {
                for (partition, at) in moved {
                    if let Some(p) = self.parts.get_mut(&partition) {
                        p.committed = at;
                    }
                }
            }
            // After a rebalance another carrier owns the partition and will redo
            // whatever is uncommitted (same scan IDs): nothing is lost.
            Err(e) => tracing::debug!(error = %e, "carrier offset commit failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_stop_at_the_first_unfinished_order() {
        let mut t = OffsetTracker::default();
        for o in 0..5 {
            t.seen(0, o);
        }
        t.start(0, 1);
        t.start(0, 3);
        assert_eq!(t.committable(), vec![(0, 1)]);
        t.done(0, 3);
        assert_eq!(t.committable(), vec![(0, 1)]);
        t.done(0, 1);
        assert_eq!(t.committable(), vec![(0, 5)]);
    }

    #[test]
    fn failures_follow_the_rate_and_the_seed() {
        let c = CarrierConfig {
            delivery_failure_rate: 0.2,
            ..CarrierConfig::default()
        };
        let fails = (0..10_000)
            .filter(|i| c.delivery_fails("store-001", &format!("o-{i}")))
            .count();
        assert!((1_800..2_200).contains(&fails), "{fails}");
        let never = CarrierConfig {
            delivery_failure_rate: 0.0,
            ..c.clone()
        };
        let always = CarrierConfig {
            delivery_failure_rate: 1.0,
            ..c.clone()
        };
        assert!(!never.delivery_fails("s", "o"));
        assert!(always.delivery_fails("s", "o"));
        assert_eq!(c.scans_for("s", "o-7"), c.clone().scans_for("s", "o-7"));
    }
}
