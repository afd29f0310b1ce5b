//! Topic provisioning: creates every topic of a deployment, idempotently.
//!
//! Invariant: pipeline topics, changelogs and the DLQ share one partition count, so
//! co-partitioning holds; an existing topic with another count is reported, not altered.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use crate::config::Settings;

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the brokers at {brokers}: {source}")]
    Connect {
        brokers: String,
        source: rdkafka::error::KafkaError,
    },
    #[error("creating topic {topic} failed: {code}")]
    Create {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error(
        "topic {topic} exists with {actual} partitions but this deployment uses {expected}; co-partitioning needs equal counts"
    )]
    PartitionMismatch {
        topic: String,
        expected: i32,
        actual: i32,
    },
    #[error("Kafka admin request failed: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
}

/// What `create_topics` did to each topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicOutcome {
    Created,
    Existed,
}

/// Creates every topic of the deployment with `partitions` partitions; topics that
/// already exist are checked, not changed.
pub async fn create_topics(
    settings: &Settings,
    partitions: i32,
) -> Result<Vec<(String, TopicOutcome)>, AdminError> {
    let admin: AdminClient<DefaultClientContext> =
        settings
            .client_config()
            .create()
            .map_err(|source| AdminError::Connect {
                brokers: settings.brokers.clone(),
                source,
            })?;
    let topics = settings.topics().all();
    let new: Vec<NewTopic<'_>> = topics
        .iter()
        .map(|(name, compacted)| {
            let t = NewTopic::new(
                name,
                partitions,
                TopicReplication::Fixed(settings.replication_factor),
            );
            if *compacted {
                t.set("cleanup.policy", "compact")
            } else {
                t
            }
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin.create_topics(new.iter(), &opts).await?;
    let mut outcomes = Vec::new();
    let mut existing = Vec::new();
    for r in results {
        match r {
            Ok(name) => outcomes.push((name, TopicOutcome::Created)),
            Err((name, RDKafkaErrorCode::TopicAlreadyExists)) => {
                existing.push(name.clone());
                outcomes.push((name, TopicOutcome::Existed));
            }
            Err((topic, code)) => return Err(AdminError::Create { topic, code }),
        }
    }
    if !existing.is_empty() {
        let counts = partition_counts(settings, &existing)?;
        for (topic, actual) in counts {
            if actual != partitions {
                return Err(AdminError::PartitionMismatch {
                    topic,
                    expected: partitions,
                    actual,
                });
            }
        }
    }
    Ok(outcomes)
}

/// Partition counts of the named topics, from the cluster metadata.
pub fn partition_counts(
    settings: &Settings,
    topics: &[String],
) -> Result<Vec<(String, i32)>, AdminError> {
    let consumer: BaseConsumer = settings.client_config().create()?;
    let mut out = Vec::new();
    for t in topics {
        let md = consumer.fetch_metadata(Some(t), Duration::from_secs(10))?;
        let n = md
            .topics()
            .first()
            .map_or(0, |m| m.partitions().len() as i32);
        out.push((t.clone(), n));
    }
    Ok(out)
}
