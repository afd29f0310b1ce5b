//! Building Kafka clients for a stage worker, and observing rebalances.
//!
//! Invariant: rebalance callbacks only record what happened; the worker loop acts on it
//! between polls, when no batch is half-processed.

use std::sync::Mutex;

use rdkafka::ClientContext;
use rdkafka::TopicPartitionList;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;

use crate::config::Settings;

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

/// The producer of one worker: idempotent always, transactional when `transactional`
/// (a stage under `exactly_once`). Records carry explicit partitions, so the partitioner
/// matters only to keyed sends by other tools; murmur2 matches the Java client.
pub fn producer(
    settings: &Settings,
    stage: &str,
    transactional: bool,
) -> Result<FutureProducer, KafkaError> {
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
    if transactional {
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

pub fn apply_pass_through(c: &mut ClientConfig, settings: &Settings) {
    for (k, v) in &settings.kafka {
        c.set(k, v);
    }
}
