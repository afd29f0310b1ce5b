//! Producing like an ordinary client, without waiting for each acknowledgement.
//!
//! Invariant: every record handed to [`Publisher::send`] is acknowledged or reported as
//! an error by [`Publisher::flush`]; records of one key keep their order (idempotent
//! producer), and keys go to partitions by `murmur2_random`, as with the Java client.

use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};

use super::SimError;
use crate::config::Settings;

/// A producer configured as a shop front end would be: keyed by store ID, Java's key
/// partitioner, idempotent, acknowledged by all replicas.
pub fn producer(settings: &Settings, role: &str) -> Result<FutureProducer, SimError> {
    settings
        .kafka_client([
            ("partitioner", "murmur2_random".to_owned()),
            ("enable.idempotence", "true".into()),
            ("acks", "all".into()),
            ("linger.ms", "5".into()),
            (
                "client.id",
                format!("orderflow-{role}-{}", settings.instance_id),
            ),
        ])
        .create()
        .map_err(SimError::Client)
}

/// Sends records and collects their acknowledgements in the background of later sends.
pub struct Publisher {
    producer: FutureProducer,
    inflight: FuturesUnordered<DeliveryFuture>,
    acked: u64,
}

impl Publisher {
    pub fn new(producer: FutureProducer) -> Self {
        Publisher {
            producer,
            inflight: FuturesUnordered::new(),
            acked: 0,
        }
    }

    /// Records acknowledged so far.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Hands one record to the client; waits only while its queue is full.
    pub async fn send(
        &mut self,
        topic: &str,
        key: &str,
        value: &[u8],
        headers: &[(&str, &str)],
    ) -> Result<(), SimError> {
        let mut hs = OwnedHeaders::new_with_capacity(headers.len());
        for (k, v) in headers {
            hs = hs.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut record = FutureRecord::to(topic).key(key).payload(value).headers(hs);
        loop {
            match self.producer.send_result(record) {
                Ok(f) => {
                    self.inflight.push(f);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    // Wait for an acknowledgement (room in the queue), or a moment.
                    if self.inflight.is_empty() {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    } else {
                        self.reap_one().await?;
                    }
                }
                Err((e, _)) => {
                    return Err(SimError::Produce {
                        topic: topic.to_owned(),
                        source: e,
                    });
                }
            }
        }
        self.reap_ready(topic)
    }

    /// Counts acknowledgements that have already arrived, without waiting.
    fn reap_ready(&mut self, topic: &str) -> Result<(), SimError> {
        use futures::FutureExt;
        while let Some(Some(r)) = self.inflight.next().now_or_never() {
            self.count(r, topic)?;
        }
        Ok(())
    }

    async fn reap_one(&mut self) -> Result<(), SimError> {
        if let Some(r) = self.inflight.next().await {
            self.count(r, "")?;
        }
        Ok(())
    }

    fn count(
        &mut self,
        r: <DeliveryFuture as std::future::Future>::Output,
        topic: &str,
    ) -> Result<(), SimError> {
        match r {
            Ok(Ok(_)) => {
                self.acked += 1;
                Ok(())
            }
            Ok(Err((source, m))) => Err(SimError::Produce {
                topic: rdkafka::Message::topic(&m).to_owned(),
                source,
            }),
            Err(_) => Err(SimError::Produce {
                topic: topic.to_owned(),
                source: KafkaError::Canceled,
            }),
        }
    }

    /// Waits for every outstanding acknowledgement.
    pub async fn flush(&mut self) -> Result<(), SimError> {
        while !self.inflight.is_empty() {
            self.reap_one().await?;
        }
        Ok(())
    }
}
