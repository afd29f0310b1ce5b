//! Reading changelog partitions back into state, on a thread of its own so that the
//! worker keeps polling (and stays in its group) however long a restore takes.
//!
//! Under `at_least_once` the restore first appends a claim to each partition (see
//! [`super::changelog`]) and then reads up to it: everything before the claim is this
//! owner's history, anything a fenced writer appends after it is ignored. Under
//! `exactly_once` transactions fence other writers, and the restore reads to the end;
//! then it asks the stage's group which changelog batch its committed offsets were
//! committed with, so that a batch of an aborted transaction that the broker showed
//! anyway is not taken for committed (see [`Restorer::transactional`]).

use std::collections::HashMap;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Serialize, de::DeserializeOwned};

use super::changelog::{
    ChangelogError, Committed, GEN_HEADER, PartitionState, Restorer, SEQ_HEADER, claim_record,
};
use crate::config::{Guarantee, Settings};
use crate::stages::Disk;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("reading changelog {topic}[{partition}] failed: {source}")]
    Kafka {
        topic: String,
        partition: i32,
        source: KafkaError,
    },
    #[error("claiming changelog {topic}[{partition}] failed: {source}")]
    Claim {
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
    #[error(
        "creating the state file of {topic}[{partition}] in {dir} failed: {source} (set `state_dir` / ORDERFLOW_STATE_DIR)"
    )]
    StateFile {
        topic: String,
        partition: i32,
        dir: String,
        source: std::io::Error,
    },
    #[error("sink {sink} cannot claim partition {partition}: {source}")]
    SinkClaim {
        sink: &'static str,
        partition: i32,
        source: crate::sql::SqlError,
    },
    #[error("restoring {topic}[{partition}] made no progress for {0:?}", STALL)]
    Stalled { topic: String, partition: i32 },
}

const STALL: Duration = Duration::from_secs(60);
/// How long a restore waits for the group's committed offsets (a correct broker holds
/// the answer back while a transaction with offsets is still open).
const COMMITTED_TIMEOUT: Duration = Duration::from_secs(10);

/// Under `exactly_once`: the stage's consumer group and input topics, whose committed
/// offsets say which changelog batch committed last.
#[derive(Debug, Clone)]
pub struct Inputs {
    pub group: String,
    pub topics: Vec<String>,
}

/// The outcome of one restore job: the partitions it was asked for, and their state.
/// What a restore (or a sink's claim) reports: the parts of its partitions.
pub struct Restored<P> {
    pub job: u64,
    pub partitions: Vec<i32>,
    pub elapsed: Duration,
    pub result: Result<Vec<(i32, P)>, RestoreError>,
}

/// Starts restoring `partitions` of `topic`; the result arrives on `done`.
pub fn spawn<V>(
    settings: Settings,
    topic: String,
    partitions: Vec<i32>,
    inputs: Option<Inputs>,
    job: u64,
    done: mpsc::Sender<Restored<PartitionState<V>>>,
) where
    V: Serialize + DeserializeOwned + Clone + Send + 'static,
{
    let span = tracing::Span::current();
    std::thread::Builder::new()
        .name(format!("restore-{job}"))
        .spawn(move || {
            let _g = span.enter();
            let started = Instant::now();
            let result = restore::<V>(&settings, &topic, &partitions, inputs.as_ref());
            let _ = done.send(Restored {
                job,
                partitions,
                elapsed: started.elapsed(),
                result,
            });
        })
        .expect("spawning a restore thread");
}

/// Appends a claim of a fresh generation to each partition; returns the generation and
/// the claim's offset per partition.
fn claim(
    settings: &Settings,
    topic: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, (u64, i64)>, RestoreError> {
    let failed = |partition: i32| {
        move |source| RestoreError::Claim {
            topic: topic.to_owned(),
            partition,
            source,
        }
    };
    let first = partitions.first().copied().unwrap_or(0);
    let producer: FutureProducer = settings
        .kafka_client([
            ("enable.idempotence", "true"),
            ("acks", "all"),
            ("linger.ms", "0"),
        ])
        .create()
        .map_err(failed(first))?;
    let mut pending = Vec::with_capacity(partitions.len());
    for &p in partitions {
        // Non-zero: generation 0 is the transactional writer's.
        let generation = rand::random_range(1..u64::MAX);
        let record = claim_record(generation, &settings.instance_id);
        let g = generation.to_string();
        let headers = OwnedHeaders::new().insert(Header {
            key: GEN_HEADER,
            value: Some(g.as_str()),
        });
        let f = producer
            .send_result(
                FutureRecord::to(topic)
                    .partition(p)
                    .key(&record.key)
                    .payload(record.value.as_deref().unwrap_or_default())
                    .headers(headers),
            )
            .map_err(|(e, _)| failed(p)(e))?;
        pending.push((p, generation, f));
    }
    let mut claims = HashMap::new();
    for (p, generation, f) in pending {
        let delivery = futures::executor::block_on(f)
            .map_err(|_| failed(p)(KafkaError::Canceled))?
            .map_err(|(e, _)| failed(p)(e))?;
        claims.insert(p, (generation, delivery.offset));
    }
    Ok(claims)
}

/// Reads the changelog partitions `partitions` with one consumer and rebuilds each
/// partition's state: up to this owner's claim under `at_least_once`, to the end (the
/// last stable offset under `read_committed`) under `exactly_once`, where `inputs` (if
/// given) tell which batch committed last.
pub fn restore<V>(
    settings: &Settings,
    topic: &str,
    partitions: &[i32],
    inputs: Option<&Inputs>,
) -> Result<Vec<(i32, PartitionState<V>)>, RestoreError>
where
    V: Serialize + DeserializeOwned + Clone,
{
    let kafka = |partition: i32| {
        move |source| RestoreError::Kafka {
            topic: topic.to_owned(),
            partition,
            source,
        }
    };
    let corrupt = |partition: i32| {
        move |source| RestoreError::Corrupt {
            topic: topic.to_owned(),
            partition,
            source,
        }
    };
    let first = partitions.first().copied().unwrap_or(0);
    let claims = match settings.guarantee {
        Guarantee::AtLeastOnce => claim(settings, topic, partitions)?,
        Guarantee::ExactlyOnce => HashMap::new(),
    };
    let consumer: BaseConsumer<EofExpected> = settings
        .kafka_client([
            ("group.id", format!("{}.restore", settings.group_prefix)),
            ("enable.auto.commit", "false".into()),
            ("enable.partition.eof", "true".into()),
            ("isolation.level", "read_committed".into()),
            ("fetch.wait.max.ms", super::kafka::FETCH_WAIT_MS.into()),
        ])
        .create_with_context(EofExpected)
        .map_err(kafka(first))?;
    let mut restorers: HashMap<i32, Restorer> = HashMap::new();
    // The last offset to read, per partition that has anything to read.
    let mut reading: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in partitions {
        let disk = Disk::create(&settings.state_dir(), &format!("{topic}-{p}")).map_err(|e| {
            RestoreError::StateFile {
                topic: topic.to_owned(),
                partition: p,
                dir: settings.state_dir().display().to_string(),
                source: e,
            }
        })?;
        let restorer = Restorer::with_disk(disk);
        restorers.insert(
            p,
            match settings.guarantee {
                Guarantee::ExactlyOnce => restorer.transactional(),
                Guarantee::AtLeastOnce => restorer,
            },
        );
        let last = match claims.get(&p) {
            Some((_, offset)) => *offset,
            None => {
                let (low, high) = consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map_err(kafka(p))?;
                if high <= low {
                    continue;
                }
                high - 1
            }
        };
        reading.insert(p, last);
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .map_err(kafka(p))?;
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
                let Some(&last) = reading.get(&p) else {
                    continue;
                };
                if m.offset() > last {
                    reading.remove(&p);
                    continue;
                }
                let header = |name: &str| -> Option<u64> {
                    let h = m.headers()?;
                    let v = h.iter().find(|h| h.key == name)?.value?;
                    std::str::from_utf8(v).ok()?.parse().ok()
                };
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                if let Some(r) = restorers.get_mut(&p) {
                    r.push(
                        m.offset(),
                        &key,
                        m.payload(),
                        header(SEQ_HEADER),
                        header(GEN_HEADER),
                    )
                    .map_err(corrupt(p))?;
                }
                if m.offset() >= last {
                    reading.remove(&p);
                }
            }
            // Without a claim the end of the partition is the end of the restore; with
            // one, only the claim is (it is durable, so it will be read).
            Some(Err(KafkaError::PartitionEOF(p))) if !claims.contains_key(&p) => {
                reading.remove(&p);
            }
            Some(Err(KafkaError::PartitionEOF(_))) => {}
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
    // Asked only now: offsets committed with a batch read above are in (a correct broker
    // answers once that batch's transaction is complete).
    let vouched = match (settings.guarantee, inputs) {
        (Guarantee::ExactlyOnce, Some(inputs)) => committed(settings, inputs, topic, partitions),
        _ => None,
    };
    let mut restored: Vec<(i32, PartitionState<V>)> = Vec::with_capacity(partitions.len());
    for &p in partitions {
        let mut r = restorers
            .remove(&p)
            .expect("every partition has a restorer");
        if let Some(v) = &vouched {
            r.vouch(Some(v.get(&p).cloned().unwrap_or_default()));
        }
        let generation = claims.get(&p).map_or(0, |(g, _)| *g);
        let mut ps = r
            .finish(
                p,
                generation,
                settings.dedup_window_records,
                settings.state_cache_entries,
            )
            .map_err(corrupt(p))?;
        if let Some((_, offset)) = claims.get(&p) {
            ps.log_end = Some(*offset);
        }
        restored.push((p, ps));
    }
    Ok(restored)
}

/// Per partition, the offsets the group has committed for `inputs` and for the
/// partition of `changelog`. `None` when the group cannot be asked: the last batch read
/// then counts as committed, as it must on a broker that shows only committed records.
fn committed(
    settings: &Settings,
    inputs: &Inputs,
    changelog: &str,
    partitions: &[i32],
) -> Option<HashMap<i32, Committed>> {
    let c = settings.kafka_client([
        ("group.id", inputs.group.as_str()),
        ("enable.auto.commit", "false"),
        // Makes librdkafka ask for stable offsets: none pending in an open transaction.
        ("isolation.level", "read_committed"),
    ]);
    let asked = c.create::<BaseConsumer>().and_then(|consumer| {
        let mut tpl = TopicPartitionList::new();
        for t in inputs.topics.iter().map(String::as_str).chain([changelog]) {
            for &p in partitions {
                tpl.add_partition(t, p);
            }
        }
        consumer.committed_offsets(tpl, COMMITTED_TIMEOUT)
    });
    let tpl = match asked {
        Ok(tpl) => tpl,
        Err(e) => {
            tracing::warn!(group = %inputs.group, error = %e, "cannot read the group's committed offsets; taking the changelog's last batches for committed");
            return None;
        }
    };
    let topics = settings.topics();
    let mut out: HashMap<i32, Committed> = HashMap::new();
    for e in tpl.elements() {
        let entry = out.entry(e.partition()).or_default();
        let offset = match e.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        };
        let topic = e.topic();
        if topic == changelog {
            entry.batch = offset.and_then(|o| u64::try_from(o).ok());
        } else {
            entry
                .offsets
                .insert(topics.base(topic).unwrap_or(topic).to_owned(), offset);
        }
        tracing::debug!(
            topic,
            partition = e.partition(),
            ?offset,
            "committed offset"
        );
    }
    Some(out)
}

/// The restore consumer's context: reaching a partition's end is what a restore waits
/// for, not an error, even when librdkafka reports it without its partition.
struct EofExpected;

impl rdkafka::ClientContext for EofExpected {
    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(error, KafkaError::PartitionEOF(_)) || reason.contains("end of partition") {
            tracing::debug!(%reason, "restore reached a partition's end");
        } else {
            tracing::error!(error = %error, %reason, "librdkafka error while restoring");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for EofExpected {}
