//! Building Kafka clients for a stage worker, and observing rebalances.
//!
//! Invariant: rebalance callbacks only record what happened; the worker loop acts on it
//! between polls, when no batch is half-processed.

use std::sync::Mutex;

use rdkafka::ClientContext;
use rdkafka::TopicPartitionList;
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

/// The longest a worker's fetch waits for records on the broker, in milliseconds
/// (`fetch.wait.max.ms`; `[kafka]` overrides it).
pub const FETCH_WAIT_MS: &str = "10";

/// The group consumer of one stage. Offsets are committed only by the loop (or inside
/// the transaction), never automatically; the range assignor keeps co-partitioned topics
/// together on one worker.
pub fn consumer(
    settings: &Settings,
    stage: &str,
) -> Result<BaseConsumer<WorkerContext>, KafkaError> {
    settings
        .kafka_client([
            ("group.id", settings.group_id(stage)),
            ("enable.auto.commit", "false".into()),
            ("enable.auto.offset.store", "false".into()),
            ("auto.offset.reset", "earliest".into()),
            ("isolation.level", "read_committed".into()),
            ("partition.assignment.strategy", "range".into()),
            ("session.timeout.ms", "10000".into()),
            ("heartbeat.interval.ms", "1000".into()),
            // Brokers that answer a fetch only when its wait is over (nisshi, the mock
            // cluster) would otherwise hold every hop of an order for librdkafka's 500 ms
            // and, since a connection's requests are served in order, every offset and
            // watermark request behind it. An idle worker fetches 100 times a second.
            ("fetch.wait.max.ms", FETCH_WAIT_MS.into()),
            (
                "client.id",
                format!("orderflow-{stage}-{}", settings.instance_id),
            ),
        ])
        .create_with_context(WorkerContext::default())
}

/// The producer of one worker: idempotent always, transactional when `transactional`
/// (a stage under `exactly_once`). Records carry explicit partitions, so the partitioner
/// matters only to keyed sends by other tools; murmur2 matches the Java client.
pub fn producer(
    settings: &Settings,
    stage: &str,
    transactional: bool,
) -> Result<FutureProducer, KafkaError> {
    let mut own = vec![
        ("enable.idempotence", "true".to_owned()),
        ("acks", "all".into()),
        ("partitioner", "murmur2_random".into()),
        ("linger.ms", "1".into()),
        (
            "client.id",
            format!("orderflow-{stage}-{}", settings.instance_id),
        ),
    ];
    if transactional {
        own.push(("transactional.id", transactional_id(settings, stage)));
    }
    settings.kafka_client(own).create()
}

/// Stable per worker instance: a restarted worker with the same instance ID fences the
/// producer of its previous incarnation.
pub fn transactional_id(settings: &Settings, stage: &str) -> String {
    format!("{}.{stage}.{}", settings.group_prefix, settings.instance_id)
}
