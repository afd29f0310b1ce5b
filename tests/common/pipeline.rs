//! The whole order pipeline as end-to-end tests drive it: a deterministic shop (stores,
//! SKUs, orders), the stock commands that fill and probe it, the workers' settings, and
//! an observer of every lifecycle topic that checks "one event ID, one content".
//!
//! Invariant: everything the test writes carries its own event ID and time, so the same
//! record decodes to the same event however often it is read (the codec would otherwise
//! fill in the decoding time), and any two records with one event ID that differ are a
//! finding of the pipeline, never of the harness.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Duration;

use orderflow::config::Settings;
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, EventType, ID_NAMESPACE};
use orderflow::status;
use orderflow::topics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{Offset, TopicPartitionList};

use super::{Collector, Outgoing, TestEnv, now_ms, plain_config};

pub fn store(i: usize) -> String {
    format!("store-{i:02}")
}

pub fn sku(i: usize) -> String {
    format!("SKU-{i}")
}

/// A small deterministic generator, so a failure can be reproduced exactly.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A deterministic shop: which store and SKUs order `i` has.
#[derive(Debug, Clone, Copy)]
pub struct Shop {
    pub stores: usize,
    pub skus: usize,
    /// One order in this many is far above the fraud amount limit.
    pub huge_every: usize,
}

impl Shop {
    /// Order `i` as its producer publishes it (JSON, the producer contract): (store ID,
    /// order ID, value). One or two lines of one or two units each.
    pub fn order_json(&self, i: usize) -> (String, String, Vec<u8>) {
        let store_id = store(i % self.stores);
        let order_id = format!("o-{i:05}");
        let lines = 1 + (mix(i as u64) % 2) as usize;
        let items: Vec<serde_json::Value> = (0..lines)
            .map(|l| {
                let r = mix((i * 10 + l) as u64);
                let price = if i.is_multiple_of(self.huge_every) {
                    2_000_000
                } else {
                    500 + (r % 4_500) as i64
                };
                serde_json::json!({
                    "sku": sku((r as usize / 7 + l) % self.skus),
                    "quantity": 1 + (r % 2),
                    "unit_price_cents": price,
                })
            })
            .collect();
        let json = serde_json::json!({
            "order_id": order_id,
            "store_id": store_id,
            "customer_id": format!("c-{i}"),
            "email": format!("c{i}@example.com"),
            "currency": "USD",
            "shipping_country": "US",
            "items": items,
            "placed_at": now_ms(),
        });
        (store_id, order_id, serde_json::to_vec(&json).expect("JSON"))
    }
}

/// An inventory command with its own event ID (from `tag`, store and SKU) and time.
fn stock_command(
    event_type: &str,
    store_id: &str,
    sku: &str,
    tag: &str,
    fields: serde_json::Value,
) -> Outgoing {
    let id = uuid::Uuid::new_v5(
        &ID_NAMESPACE,
        format!("test/{tag}/{store_id}/{sku}").as_bytes(),
    );
    let mut json = serde_json::json!({
        "event_type": event_type,
        "event_id": id.to_string(),
        "store_id": store_id,
        "sku": sku,
        "occurred_at": now_ms(),
    });
    if let (Some(map), serde_json::Value::Object(extra)) = (json.as_object_mut(), fields) {
        map.extend(extra);
    }
    Outgoing::new(store_id, serde_json::to_vec(&json).expect("JSON"))
}

/// `quantity` units of `sku` delivered to `store_id`; `tag` tells deliveries apart.
pub fn restock(store_id: &str, sku: &str, quantity: i32, tag: &str) -> Outgoing {
    stock_command(
        "StockRestocked",
        store_id,
        sku,
        tag,
        serde_json::json!({ "quantity": quantity }),
    )
}

/// A stock count that changes nothing: the inventory answers with a `StockLevelChanged`
/// whose reason is `reason` and whose `available` is the current level.
pub fn probe(store_id: &str, sku: &str, reason: &str) -> Outgoing {
    stock_command(
        "StockAdjusted",
        store_id,
        sku,
        reason,
        serde_json::json!({ "delta": 0, "reason": reason }),
    )
}

/// The environment of a worker running every stage against the mock gateway at
/// `gateway`: quick payment retries (5 attempts span at most about 2.4 s of backoff) and
/// a quick warehouse.
pub fn worker_env(gateway: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ORDERFLOW_GATEWAY_URL", format!("http://{gateway}")),
        ("ORDERFLOW_PAYMENT_TIMEOUT_MS", "1000".into()),
        ("ORDERFLOW_PAYMENT_RETRY_BASE_MS", "200".into()),
        ("ORDERFLOW_PAYMENT_RETRY_CAP_MS", "1000".into()),
        ("ORDERFLOW_PAYMENT_MAX_ATTEMPTS", "5".into()),
        ("ORDERFLOW_FULFILLMENT_PICK_MS", "50".into()),
        ("ORDERFLOW_FULFILLMENT_PACK_MS", "50".into()),
        ("ORDERFLOW_FRAUD_VELOCITY_MAX_ORDERS", "1000".into()),
    ]
}

/// Saga order of event types, for sorting one order's events read from several topics.
pub fn rank(t: EventType) -> u8 {
    use EventType::*;
    match t {
        OrderCreated => 0,
        OrderScreened => 1,
        StockReserved | StockRejected => 2,
        PaymentRetrying => 3,
        PaymentAuthorized | PaymentFailed => 4,
        StockReleased => 5,
        Picking => 6,
        Packed => 7,
        ReadyToShip => 8,
        Shipped => 9,
        InTransit => 10,
        OutForDelivery => 11,
        Delivered | DeliveryFailed => 12,
        PaymentRefunded => 13,
        // A cancellation's request and answer may come at any step; after the order's
        // own steps, in causal order.
        OrderCancelled => 14,
        CancellationAccepted | CancellationRefused => 15,
        _ => 16,
    }
}

/// The input topics of every stage, as the stages' `inputs()` declare them.
pub const STAGE_INPUTS: &[(&str, &[&str])] = &[
    ("fraud", &[topics::ORDER_CREATED]),
    (
        "inventory",
        &[
            topics::ORDER_SCREENED,
            topics::INVENTORY_COMMANDS,
            topics::PAYMENT_PROCESSED,
            topics::FULFILLMENT_UPDATED,
        ],
    ),
    (
        "payment",
        &[
            topics::INVENTORY_UPDATED,
            topics::DELIVERY_UPDATED,
            topics::FULFILLMENT_UPDATED,
        ],
    ),
    (
        "fulfillment",
        &[topics::PAYMENT_PROCESSED, topics::ORDER_CANCELLED],
    ),
    (
        "delivery",
        &[topics::FULFILLMENT_UPDATED, topics::CARRIER_UPDATES],
    ),
];

/// One input partition of one stage that its group has not consumed to the end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lag {
    pub stage: &'static str,
    pub topic: &'static str,
    pub partition: i32,
    /// The group's committed offset, `None` when it committed none.
    pub committed: Option<i64>,
    /// Where the partition ends: its high watermark, or past its last record.
    pub end: i64,
}

/// Every input partition of every stage whose committed offset is behind the partition's
/// end (its high watermark); empty when every stage has consumed (and committed)
/// everything.
pub fn stage_lag(settings: &Settings, partitions: i32) -> Result<Vec<Lag>, String> {
    stage_lag_against(settings, partitions, |consumer, name, p| {
        consumer
            .fetch_watermarks(name, p, Duration::from_secs(10))
            .map(|(_, high)| high)
            .map_err(|e| format!("watermarks of {name}/{p}: {e}"))
    })
}

/// Like [`stage_lag`], with each input partition ending past the last record a reader
/// found there (`ends`, by prefix-free topic and partition; see [`Lifecycle::ends`]), not
/// at its high watermark. Under transactions a partition ends with a commit marker that
/// no consumer is handed, so a stage that consumed everything stays one short of the high
/// watermark; and the transactional test broker's high watermark can fall short of the
/// end of a batch.
pub fn stage_lag_to_records(
    settings: &Settings,
    partitions: i32,
    ends: &HashMap<(&'static str, i32), i64>,
) -> Result<Vec<Lag>, String> {
    let topics = settings.topics();
    stage_lag_against(settings, partitions, |_, name, p| {
        let base = topics.base(name).unwrap_or(name);
        Ok(ends
            .iter()
            .find(|((t, q), _)| *t == base && *q == p)
            .map_or(0, |(_, end)| *end))
    })
}

fn stage_lag_against(
    settings: &Settings,
    partitions: i32,
    end_of: impl Fn(&BaseConsumer, &str, i32) -> Result<i64, String>,
) -> Result<Vec<Lag>, String> {
    let mut lag = Vec::new();
    for (stage, inputs) in STAGE_INPUTS {
        let group = settings.group_id(stage);
        // Reads the group's offsets without joining it (no subscribe, no commit).
        let consumer: BaseConsumer = plain_config(&settings.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .create()
            .map_err(|e| format!("a client for group {group}: {e}"))?;
        let mut tpl = TopicPartitionList::new();
        for topic in *inputs {
            for p in 0..partitions {
                tpl.add_partition(&settings.topics().name(topic), p);
            }
        }
        let committed = consumer
            .committed_offsets(tpl, Duration::from_secs(10))
            .map_err(|e| format!("committed offsets of group {group}: {e}"))?;
        for topic in *inputs {
            let name = settings.topics().name(topic);
            for p in 0..partitions {
                let end = end_of(&consumer, &name, p)?;
                let at = committed
                    .find_partition(&name, p)
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                if at.unwrap_or(0) < end {
                    lag.push(Lag {
                        stage,
                        topic,
                        partition: p,
                        committed: at,
                        end,
                    });
                }
            }
        }
    }
    Ok(lag)
}

/// The input position that `stage`'s state records for partition `partition` of `base`
/// (the newest `p/<base>` entry of its changelog partition): where the stage continues,
/// whatever its group's committed offset says.
pub fn state_position(settings: &Settings, stage: &str, base: &str, partition: i32) -> Option<i64> {
    let key = format!("p/{base}");
    super::read_topic(&settings.brokers, &settings.topics().changelog(stage))
        .iter()
        .filter(|r| r.partition == partition && r.key_str().as_deref() == Some(key.as_str()))
        .filter_map(|r| serde_json::from_slice(r.value.as_deref()?).ok())
        .next_back()
}

/// One record of a lifecycle topic, decoded.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: &'static str,
    pub partition: i32,
    pub offset: i64,
    pub event: Event,
}

/// Two records under one event ID that are not the same event (or not on the same topic).
#[derive(Debug, Clone)]
pub struct Conflict {
    pub first: Seen,
    pub other: Seen,
}

/// Every event on the pipeline topics (inputs and outputs), read as they arrive, by
/// event ID and by order.
pub struct Lifecycle {
    collectors: Vec<(&'static str, Collector)>,
    read: Vec<usize>,
    codec: Codec,
    /// The first record of every event ID.
    first: HashMap<String, Seen>,
    /// Records whose event ID was seen before with other content.
    pub conflicts: Vec<Conflict>,
    /// Records read, duplicates included.
    pub records: usize,
    /// Records that repeat an event ID with the same content (the redelivery that
    /// at-least-once allows; consumers drop them by ID).
    pub duplicates: usize,
    /// The first content of every event ID about an order, per (store, order), in the
    /// order read.
    pub by_order: HashMap<(String, String), Vec<Event>>,
    /// Events about no order (stock levels, low stock, stock commands).
    pub other: Vec<Event>,
    /// Records per topic.
    pub per_topic: BTreeMap<&'static str, usize>,
    /// Records left out, by (topic, partition, offset): those a correct broker hides from
    /// read_committed readers (see [`Lifecycle::as_committed`]).
    hidden: HashSet<(&'static str, i32, i64)>,
    /// The (store, order) of every record left out: orders a stage may have acted on
    /// from a record a correct broker would have hidden from it.
    pub leaked: BTreeSet<(String, String)>,
}

/// What [`Lifecycle::as_committed`] left out, per topic: (aborted, open) records read,
/// and the transaction markers (commits, aborts) in the log.
pub type Hidden = BTreeMap<&'static str, ((usize, usize), (usize, usize))>;

impl Lifecycle {
    /// Reads every pipeline topic of `env` from the beginning.
    pub fn new(env: &TestEnv) -> Self {
        let collectors: Vec<(&'static str, Collector)> = topics::PIPELINE
            .iter()
            .map(|t| (*t, env.collector(t)))
            .collect();
        Lifecycle {
            read: vec![0; collectors.len()],
            collectors,
            codec: Codec::new(),
            first: HashMap::new(),
            conflicts: Vec::new(),
            records: 0,
            duplicates: 0,
            by_order: HashMap::new(),
            other: Vec::new(),
            per_topic: BTreeMap::new(),
            hidden: HashSet::new(),
            leaked: BTreeSet::new(),
        }
    }

    /// Takes everything read so far again, leaving out the records of aborted and
    /// still-open transactions as the log's own markers decide them
    /// ([`super::txn_log`]): from then on, what a read_committed reader of a correct
    /// broker sees. Returns what it left out, per topic.
    pub fn as_committed(&mut self, brokers: &str, partitions: i32) -> Hidden {
        let mut out = Hidden::new();
        self.hidden.clear();
        self.leaked.clear();
        for (topic, collector) in &self.collectors {
            let log = super::txn_log::scan(brokers, &collector.topic, partitions);
            let (mut aborted, mut open) = (0, 0);
            for r in &collector.records {
                match log.fate(r.partition, r.offset) {
                    Some(super::txn_log::Fate::Aborted) => aborted += 1,
                    Some(super::txn_log::Fate::Open) => open += 1,
                    Some(_) => continue,
                    None => panic!(
                        "{}[{}] offset {} was read but is not in the log",
                        collector.topic, r.partition, r.offset
                    ),
                }
                self.hidden.insert((*topic, r.partition, r.offset));
                let header = r.header_str("event-type");
                let hints = DecodeHints {
                    header_type: header.as_deref(),
                    topic_default: topics::default_event_type(topic),
                    ..DecodeHints::default()
                };
                if let Some(e) = r
                    .value
                    .as_deref()
                    .and_then(|v| self.codec.decode(v, hints).ok())
                    && let Some(order) = &e.envelope().order_id
                {
                    self.leaked
                        .insert((e.envelope().store_id.clone(), order.clone()));
                }
            }
            out.insert(*topic, ((aborted, open), (log.commits, log.aborts)));
        }
        self.read = vec![0; self.collectors.len()];
        self.first.clear();
        self.conflicts.clear();
        self.records = 0;
        self.duplicates = 0;
        self.by_order.clear();
        self.other.clear();
        self.per_topic.clear();
        for i in 0..self.collectors.len() {
            self.ingest(i);
        }
        out
    }

    /// Takes what arrived on every topic (up to `max_wait` per topic).
    pub fn poll(&mut self, max_wait: Duration) {
        for i in 0..self.collectors.len() {
            self.collectors[i].1.poll(max_wait);
            self.ingest(i);
        }
    }

    /// Reads every topic up to its current end.
    pub fn drain(&mut self) {
        for i in 0..self.collectors.len() {
            self.collectors[i].1.drain();
            self.ingest(i);
        }
    }

    fn ingest(&mut self, i: usize) {
        let (topic, collector) = &self.collectors[i];
        let topic = *topic;
        for rec in &collector.records[self.read[i]..] {
            if self.hidden.contains(&(topic, rec.partition, rec.offset)) {
                continue;
            }
            let value = rec.value.as_deref().unwrap_or_else(|| {
                panic!(
                    "record {topic}/{}@{} has no value",
                    rec.partition, rec.offset
                )
            });
            let header = rec.header_str("event-type");
            let hints = DecodeHints {
                header_type: header.as_deref(),
                topic_default: topics::default_event_type(topic),
                ..DecodeHints::default()
            };
            let event = self.codec.decode(value, hints).unwrap_or_else(|e| {
                panic!(
                    "record {topic}/{}@{} does not decode: {e}",
                    rec.partition, rec.offset
                )
            });
            let seen = Seen {
                topic,
                partition: rec.partition,
                offset: rec.offset,
                event,
            };
            self.records += 1;
            *self.per_topic.entry(topic).or_default() += 1;
            let id = seen.event.envelope().event_id.clone();
            if let Some(first) = self.first.get(&id) {
                if first.topic == seen.topic && first.event == seen.event {
                    self.duplicates += 1;
                } else {
                    self.conflicts.push(Conflict {
                        first: first.clone(),
                        other: seen,
                    });
                }
                continue;
            }
            match &seen.event.envelope().order_id {
                Some(order) => self
                    .by_order
                    .entry((seen.event.envelope().store_id.clone(), order.clone()))
                    .or_default()
                    .push(seen.event.clone()),
                None => self.other.push(seen.event.clone()),
            }
            self.first.insert(id, seen);
        }
        self.read[i] = collector.records.len();
    }

    /// Per topic (prefix-free) and partition, the offset after the last record read.
    pub fn ends(&self) -> HashMap<(&'static str, i32), i64> {
        let mut ends = HashMap::new();
        for (topic, collector) in &self.collectors {
            for r in &collector.records {
                let end = ends.entry((*topic, r.partition)).or_insert(0);
                *end = (*end).max(r.offset + 1);
            }
        }
        ends
    }

    /// The records read from partition `partition` of `base` at offsets `from..to`, one
    /// line each: offset, event type, event ID, order.
    pub fn describe(&self, base: &str, partition: i32, from: i64, to: i64) -> Vec<String> {
        let Some((_, collector)) = self.collectors.iter().find(|(t, _)| *t == base) else {
            return Vec::new();
        };
        collector
            .records
            .iter()
            .filter(|r| r.partition == partition && (from..to).contains(&r.offset))
            .map(|r| {
                let header = r.header_str("event-type");
                let hints = DecodeHints {
                    header_type: header.as_deref(),
                    topic_default: topics::default_event_type(base),
                    ..DecodeHints::default()
                };
                match self
                    .codec
                    .decode(r.value.as_deref().unwrap_or_default(), hints)
                {
                    Ok(e) => format!(
                        "@{} {} {} {:?}",
                        r.offset,
                        e.event_type(),
                        e.envelope().event_id,
                        e.envelope().order_id
                    ),
                    Err(e) => format!("@{} undecodable: {e}", r.offset),
                }
            })
            .collect()
    }

    /// The status of an order from its events so far.
    pub fn status(&self, key: &(String, String)) -> Option<status::OrderStatus> {
        self.by_order.get(key).and_then(|evs| status::of(evs))
    }

    /// How many of `orders` are in a terminal state.
    pub fn terminal<'a>(&self, orders: impl IntoIterator<Item = &'a (String, String)>) -> usize {
        orders
            .into_iter()
            .filter(|k| self.status(k).is_some_and(|s| s.is_terminal()))
            .count()
    }

    /// Events about `orders` that a read_uncommitted reader finds on the pipeline topics
    /// under event IDs this (read_committed) observer never read: records of open or
    /// aborted transactions the broker kept from read_committed readers. One line each.
    pub fn hidden_events(&self, settings: &Settings, orders: &[(String, String)]) -> Vec<String> {
        let mut found = Vec::new();
        for base in topics::PIPELINE {
            let mut c =
                Collector::read_uncommitted(&settings.brokers, &settings.topics().name(base));
            c.drain();
            while c.poll(Duration::from_millis(300)) > 0 {}
            for r in &c.records {
                let header = r.header_str("event-type");
                let hints = DecodeHints {
                    header_type: header.as_deref(),
                    topic_default: topics::default_event_type(base),
                    ..DecodeHints::default()
                };
                let Ok(e) = self
                    .codec
                    .decode(r.value.as_deref().unwrap_or_default(), hints)
                else {
                    continue;
                };
                let env = e.envelope();
                let about = env
                    .order_id
                    .as_ref()
                    .map(|o| (env.store_id.clone(), o.clone()));
                if about.is_some_and(|k| orders.contains(&k))
                    && !self.first.contains_key(&env.event_id)
                {
                    found.push(format!(
                        "{base}/{}@{}: {} {} of {:?}",
                        r.partition,
                        r.offset,
                        e.event_type(),
                        env.event_id,
                        env.order_id
                    ));
                }
            }
        }
        found
    }

    /// The keys of `orders` not yet in a terminal state.
    pub fn unfinished<'a>(
        &self,
        orders: impl IntoIterator<Item = &'a (String, String)>,
    ) -> Vec<(String, String)> {
        orders
            .into_iter()
            .filter(|k| !self.status(k).is_some_and(|s| s.is_terminal()))
            .cloned()
            .collect()
    }

    /// The event types of up to `n` of `orders` not yet in a terminal state.
    pub fn stuck<'a>(
        &self,
        orders: impl IntoIterator<Item = &'a (String, String)>,
        n: usize,
    ) -> String {
        orders
            .into_iter()
            .filter(|k| !self.status(k).is_some_and(|s| s.is_terminal()))
            .take(n)
            .map(|k| {
                let evs: Vec<String> = self
                    .by_order
                    .get(k)
                    .map(|evs| evs.iter().map(|e| e.event_type().to_string()).collect())
                    .unwrap_or_default();
                format!("{k:?}: {}", evs.join(" "))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}
