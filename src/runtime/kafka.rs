//! Building Kafka clients for a stage worker, observing rebalances, and reading a
//! changelog partition back.
//!
//! Invariant: rebalance callbacks only record what happened; the worker loop acts on it
//! between polls, when no batch is half-processed.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::{Offset, TopicPartitionList};

use super::changelog::{ChangelogError, PartitionState, Restorer, SEQ_HEADER};
use crate::config::{Guarantee, Settings};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    Assigned(Vec<(String, i32)>),
    /// `lost`: the group moved on without this worker (session timeout), so others may
    /// have processed these partitions since.
    Revoked {
        partitions: Vec<(String, i32)>,
        lost: bool,
    },
}

/// Records assignment changes for the loop to act on after `poll` returns.
#[derive(Default)]
pub struct WorkerContext {
    events: Mutex<Vec<RebalanceEvent>>,
}

impl WorkerContext {
    pub fn take_events(&self) -> Vec<RebalanceEvent> {
        std::mem::take(&mut *self.events.lock().expect("rebalance log poisoned"))
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for WorkerContext {}

impl ConsumerContext for WorkerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let event = RebalanceEvent::Revoked {
                partitions: partitions(tpl),
                lost: consumer.assignment_lost(),
            };
            self.events
                .lock()
                .expect("rebalance log poisoned")
                .push(event);
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.events
                    .lock()
                    .expect("rebalance log poisoned")
                    .push(RebalanceEvent::Assigned(partitions(tpl)));
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// The group consumer of one stage. Offsets are committed only by the loop (or inside
/// the transaction), never automatically; the range assignor keeps co-partitioned topics
/// together on one worker.
pub fn consumer(
    settings: &Settings,
    stage: &str,
) -> Result<BaseConsumer<WorkerContext>, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("group.id", settings.group_id(stage))
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "range")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        .set(
            "client.id",
            format!("orderflow-{stage}-{}", settings.instance_id),
        );
    apply_pass_through(&mut c, settings);
    c.create_with_context(WorkerContext::default())
}

/// The producer of one stage worker: idempotent always, transactional under
/// `exactly_once`. Records carry explicit partitions, so the partitioner matters only to
/// keyed sends by other tools; murmur2 matches the Java client.
pub fn producer(settings: &Settings, stage: &str) -> Result<FutureProducer, KafkaError> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("partitioner", "murmur2_random")
        .set("linger.ms", "1")
        .set(
            "client.id",
            format!("orderflow-{stage}-{}", settings.instance_id),
        );
    if settings.guarantee == Guarantee::ExactlyOnce {
        c.set("transactional.id", transactional_id(settings, stage));
    }
    apply_pass_through(&mut c, settings);
    c.create()
}

/// Stable per worker instance: a restarted worker with the same instance ID fences the
/// producer of its previous incarnation.
pub fn transactional_id(settings: &Settings, stage: &str) -> String {
    format!("{}.{stage}.{}", settings.group_prefix, settings.instance_id)
}

fn apply_pass_through(c: &mut ClientConfig, settings: &Settings) {
    for (k, v) in &settings.kafka {
        c.set(k, v);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading changelog {topic}[{partition}] failed: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("changelog {topic}[{partition}] is corrupt: {source}")]
    Corrupt {
        topic: String,
        partition: i32,
        source: ChangelogError,
    },
    #[error("restoring {topic}[{partition}] made no progress for {0:?}", STALL)]
    Stalled { topic: String, partition: i32 },
}

const STALL: Duration = Duration::from_secs(60);

/// Reads the changelog partitions `partitions` from their beginning to their end (the
/// last stable offset under `read_committed`) with one consumer, and rebuilds each
/// partition's state.
pub fn restore<V>(
    settings: &Settings,
    topic: &str,
    partitions: &[i32],
) -> Result<Vec<(i32, PartitionState<V>)>, RestoreError>
where
    V: serde::Serialize + serde::de::DeserializeOwned + Clone,
{
    let kafka = |partition: i32| {
        move |source| RestoreError::Kafka {
            topic: topic.to_owned(),
            partition,
            source,
        }
    };
    let first = partitions.first().copied().unwrap_or(0);
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &settings.brokers)
        .set("group.id", format!("{}.restore", settings.group_prefix))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    apply_pass_through(&mut c, settings);
    let consumer: BaseConsumer = c.create().map_err(kafka(first))?;
    let mut restorers: HashMap<i32, Restorer> = HashMap::new();
    // End offset of each partition that has anything to read.
    let mut reading: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        restorers.insert(p, Restorer::default());
        let (low, high) = consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(kafka(p))?;
        if high > low {
            reading.insert(p, high);
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .map_err(kafka(p))?;
        }
    }
    if !reading.is_empty() {
        consumer.assign(&tpl).map_err(kafka(first))?;
    }
    let mut last_progress = Instant::now();
    while !reading.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let p = m.partition();
                let seq = m
                    .headers()
                    .and_then(|h| h.iter().find(|h| h.key == SEQ_HEADER).and_then(|h| h.value))
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok());
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                if let Some(r) = restorers.get_mut(&p) {
                    r.push(&key, m.payload(), seq)
                        .map_err(|source| RestoreError::Corrupt {
                            topic: topic.to_owned(),
                            partition: p,
                            source,
                        })?;
                }
                if reading.get(&p).is_some_and(|high| m.offset() + 1 >= *high) {
                    reading.remove(&p);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                reading.remove(&p);
            }
            Some(Err(e)) => return Err(kafka(first)(e)),
            None if last_progress.elapsed() > STALL => {
                let partition = reading.keys().copied().min().unwrap_or(first);
                return Err(RestoreError::Stalled {
                    topic: topic.to_owned(),
                    partition,
                });
            }
            None => {}
        }
    }
    let mut restored: Vec<(i32, PartitionState<V>)> = Vec::with_capacity(partitions.len());
    for &p in partitions {
        let r = restorers.remove(&p).unwrap_or_default();
        let ps = r.finish().map_err(|source| RestoreError::Corrupt {
            topic: topic.to_owned(),
            partition: p,
            source,
        })?;
        restored.push((p, ps));
    }
    Ok(restored)
}
