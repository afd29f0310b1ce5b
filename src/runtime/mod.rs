//! The stage runtime: a consume-transform-produce loop generic over a [`Stage`].
//!
//! Each cycle polls a batch (up to `batch_max_records`, or `batch_interval_ms`), acts on
//! rebalances between polls, runs the stage over every record, due timer and recorded
//! outcome of an earlier external call ([`dispatch`]), performs the batch's new external
//! calls (recording their outcomes in state), then commits ([`commit`]):
//!
//! - `exactly_once`: outputs, changelog entries, DLQ records and the input offsets in one
//!   Kafka transaction (`send_offsets_to_transaction` with the consumer's group metadata);
//! - `at_least_once`: the changelog batch first — state, input positions, the dedup window
//!   and the batch's outputs (the outbox) — then, once it is durable and this worker is
//!   still the partition's only writer, the outputs; the group offsets last, as a hint.
//!
//! Either way the state records, per input partition, the offset of the first input it
//! does not reflect; a partition's consumer is positioned there when its state is
//! restored, so an input is never processed twice, and every output that becomes visible
//! was decided by a committed batch: a replay re-sends it, byte for byte, never decides
//! again (see [`changelog`]).
//!
//! State is restored on a thread of its own ([`restore`]) while the loop keeps polling;
//! records of partitions being restored are dropped, and read again from the restored
//! position.
//!
//! Invariant: in-memory state always equals the state of the last committed batch when a
//! poll happens; a batch that fails is rolled back (or its partitions restored from the
//! changelog) and its inputs read again from the state's positions.
//!
//! # Layout
//!
//! - this module: the loop (`Worker::run`) and the `Backend` / `Part` seam;
//! - `consume`: polling, rebalances, restores off the thread, input positioning;
//! - `stage`, `dispatch`, `commit`: the stage backend — running the stage over a
//!   batch, and committing it (changelog, transactions or the outbox);
//! - `sink`: the SQL sink backend;
//! - `invoke`: one call of a stage, shared with the stages' test driver;
//! - `dead_letter`: the DLQ record of a record that can never be processed;
//! - `lag`: the `orderflow_consumer_lag` gauge of the partitions a worker owns;
//! - `changelog`, `restore`, `outbox`, `effects`, `disposition`, `crash`,
//!   `kafka`, `clock`: what those build on.

pub mod changelog;
pub mod clock;
mod commit;
mod consume;
pub mod crash;
mod dead_letter;
mod dispatch;
pub mod disposition;
pub mod effects;
pub mod invoke;
pub mod kafka;
mod lag;
pub mod outbox;
pub mod restore;
pub mod sink;
mod stage;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, mpsc};
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Message, OwnedMessage};
use rdkafka::producer::FutureProducer;
use tokio_util::sync::CancellationToken;

use crate::config::{Guarantee, Settings};
use crate::events::codec::Codec;
use crate::metrics::Metrics;
use crate::stages::Stage;
use crate::topics::{self, Topics};
use clock::Clock;
use effects::EffectHandler;
use kafka::WorkerContext;
use restore::{RestoreError, Restored};

/// Header naming an event's type on every record OrderFlow produces.
pub const EVENT_TYPE_HEADER: &str = "event-type";
pub const CORRELATION_HEADER: &str = "correlation-id";
/// Headers of a dead letter; its key and value are the original record's.
pub mod dlq_headers {
    pub const SOURCE_TOPIC: &str = "orderflow.source.topic";
    pub const SOURCE_PARTITION: &str = "orderflow.source.partition";
    pub const SOURCE_OFFSET: &str = "orderflow.source.offset";
    pub const STAGE: &str = "orderflow.stage";
    pub const ERROR_CLASS: &str = "orderflow.error.class";
    pub const ERROR_MESSAGE: &str = "orderflow.error.message";
    /// Present when the value was cut to fit the broker's limit: the original's size.
    pub const TRUNCATED: &str = "orderflow.truncated.original-bytes";
    /// On a dead letter of an output the broker refused: the topic it was meant for.
    pub const TARGET_TOPIC: &str = "orderflow.target.topic";
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("cannot create a Kafka client: {0}")]
    Client(KafkaError),
    #[error(
        "the brokers at {brokers} refused transactions ({source}); the guarantee `exactly_once` needs a broker with transaction support (Apache Kafka, Redpanda). On other Kafka-protocol brokers set ORDERFLOW_GUARANTEE=at_least_once (settings key `guarantee`)"
    )]
    TransactionsUnsupported { brokers: String, source: KafkaError },
    #[error(
        "initializing the transactional producer {transactional_id} failed: {source}; if another worker runs with the same instance ID (ORDERFLOW_INSTANCE_ID), it fenced this one"
    )]
    ProducerInit {
        transactional_id: String,
        source: KafkaError,
    },
    #[error("subscribing to {topics:?} failed: {source}")]
    Subscribe {
        topics: Vec<String>,
        source: KafkaError,
    },
    #[error(transparent)]
    Restore(#[from] RestoreError),
    #[error("cannot start the runtime for external calls: {0}")]
    EffectRuntime(std::io::Error),
    #[error(transparent)]
    Database(crate::sql::SqlError),
    #[error("stage {0} stopped unexpectedly (thread panicked)")]
    Panicked(&'static str),
}

/// Runs `stage` on its own thread until `shutdown` is cancelled.
pub fn spawn<S: Stage>(
    stage: S,
    settings: Settings,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    shutdown: CancellationToken,
) -> std::thread::JoinHandle<Result<(), RuntimeError>> {
    spawn_with_effects(stage, settings, metrics, clock, None, shutdown)
}

/// Like [`spawn`], for a stage whose requests (see [`crate::stages::Ctx::request`])
/// `effects` performs.
pub fn spawn_with_effects<S: Stage>(
    stage: S,
    settings: Settings,
    metrics: Metrics,
    clock: Arc<dyn Clock>,
    effects: Option<Arc<dyn EffectHandler>>,
    shutdown: CancellationToken,
) -> std::thread::JoinHandle<Result<(), RuntimeError>> {
    let name = stage.name();
    std::thread::Builder::new()
        .name(format!("stage-{name}"))
        .spawn(move || {
            let span = tracing::info_span!("stage", stage = name);
            let _g = span.enter();
            let result = stage::StageBackend::new(stage, &settings, effects)
                .and_then(|b| Worker::new(b, settings, metrics, clock))
                .and_then(|mut w| {
                    if w.settings.guarantee == Guarantee::ExactlyOnce {
                        w.init_transactions()?;
                    }
                    w.run(&shutdown)
                });
            if let Err(e) = &result {
                tracing::error!(error = %e, "stage worker stopped");
            }
            result
        })
        .expect("spawning a thread")
}

/// Where a worker's effects and input offsets become durable, and what it does with a
/// batch: a stage ([`stage::StageBackend`]: its changelog, and Kafka transactions or the
/// outbox) or an SQL sink ([`sink::SinkBackend`]: one SQL transaction). The loop —
/// polling, rebalances, restores off the loop's thread, positioning inputs where the
/// partition's durable state says they continue — is the same for both.
pub(crate) trait Backend: Sized + 'static {
    /// What the worker keeps per owned partition.
    type Part: Part + Send + 'static;

    fn name(&self) -> &'static str;

    /// Prefix-free names of the input topics.
    fn inputs(&self) -> &'static [&'static str];

    /// Whether the worker's producer is transactional.
    fn transactional(settings: &Settings) -> bool;

    /// Builds `partitions`' parts off the loop's thread, reporting on
    /// [`Worker::restored_tx`] under `job`.
    fn restore(w: &Worker<Self>, partitions: Vec<i32>, job: u64);

    /// Whether parked part `part` of partition `p` may be used again (nobody wrote for the
    /// partition since this worker did).
    fn reusable(w: &Worker<Self>, p: i32, part: &Self::Part) -> bool;

    /// Work owed before the next poll; `false` while some remains.
    fn before_poll(w: &mut Worker<Self>) -> bool;

    /// Whether the next batch has work even without input (outcomes of external calls
    /// to react to), so polling must not wait for a record.
    fn work_waiting(_w: &Worker<Self>) -> bool {
        false
    }

    /// Processes a batch and commits it (or rolls it back and rewinds).
    fn process_and_commit(
        w: &mut Worker<Self>,
        batch: Vec<OwnedMessage>,
    ) -> Result<(), RuntimeError>;
}

/// What the loop needs to know of a partition's part.
pub(crate) trait Part {
    /// The offset of the first input of `base` (prefix-free topic) the part does not
    /// reflect.
    fn position(&self, base: &str) -> Option<i64>;

    /// Whether the part may be parked at a revocation, for reuse if the partition comes
    /// back.
    fn parkable(&self) -> bool;

    /// Logs what a restored part holds.
    fn log_restored(&self, partition: i32, elapsed: Duration);
}

pub(crate) struct Worker<B: Backend> {
    b: B,
    name: &'static str,
    settings: Settings,
    topics: Topics,
    codec: Codec,
    metrics: Metrics,
    /// This stage's per-record metric handles.
    hot: crate::metrics::StageMetrics,
    clock: Arc<dyn Clock>,
    consumer: BaseConsumer<WorkerContext>,
    producer: FutureProducer,
    /// State per assigned and restored partition number (shared by all co-partitioned
    /// input topics).
    parts: BTreeMap<i32, B::Part>,
    /// State of revoked partitions, kept until the next assignment says whether this
    /// worker gets them back; reused only if nobody wrote their changelog meanwhile.
    parked: BTreeMap<i32, B::Part>,
    /// Partitions whose state is being restored, with the restore job's number.
    restoring: BTreeMap<i32, u64>,
    /// Input topic-partitions of restored partitions not yet seen at their position: the
    /// offset to continue from, and the batch in which the consumer was moved there.
    unpositioned: HashMap<(String, i32), (i64, Option<u64>)>,
    /// Batches processed so far.
    batches: u64,
    /// Input topic-partitions whose records were dropped while their state was restored.
    fetched_ahead: HashSet<(String, i32)>,
    /// Partitions to restore again (a failed batch, a fenced write, a failed seek) after
    /// the next poll; their state is already dropped.
    to_restore: BTreeSet<i32>,
    next_job: u64,
    restored_tx: mpsc::Sender<Restored<B::Part>>,
    restored_rx: mpsc::Receiver<Restored<B::Part>>,
    /// Input topic-partitions currently assigned.
    assigned: HashSet<(String, i32)>,
    dlq: String,
    /// Consecutive failed batches, for backoff.
    failures: u32,
}

impl<B: Backend> Worker<B> {
    fn new(
        b: B,
        settings: Settings,
        metrics: Metrics,
        clock: Arc<dyn Clock>,
    ) -> Result<Self, RuntimeError> {
        let name = b.name();
        let topics = settings.topics();
        let codec = Codec::with_registry(settings.schema_registry());
        let consumer = kafka::consumer(&settings, name).map_err(RuntimeError::Client)?;
        let producer = kafka::producer(&settings, name, B::transactional(&settings))
            .map_err(RuntimeError::Client)?;
        let (restored_tx, restored_rx) = mpsc::channel();
        Ok(Worker {
            dlq: topics.name(topics::DLQ),
            b,
            name,
            settings,
            topics,
            codec,
            hot: metrics.for_stage(name),
            metrics,
            clock,
            consumer,
            producer,
            parts: BTreeMap::new(),
            parked: BTreeMap::new(),
            restoring: BTreeMap::new(),
            unpositioned: HashMap::new(),
            batches: 0,
            fetched_ahead: HashSet::new(),
            to_restore: BTreeSet::new(),
            next_job: 0,
            restored_tx,
            restored_rx,
            assigned: HashSet::new(),
            failures: 0,
        })
    }

    fn run(&mut self, shutdown: &CancellationToken) -> Result<(), RuntimeError> {
        let inputs: Vec<String> = self
            .b
            .inputs()
            .iter()
            .map(|t| self.topics.name(t))
            .collect();
        let refs: Vec<&str> = inputs.iter().map(String::as_str).collect();
        self.consumer
            .subscribe(&refs)
            .map_err(|source| RuntimeError::Subscribe {
                topics: inputs.clone(),
                source,
            })?;
        tracing::info!(
            inputs = ?inputs,
            guarantee = %self.settings.guarantee,
            schema_registry = self.codec.registry().map(|r| r.url()).unwrap_or("none"),
            "stage started"
        );
        let stop_lag = shutdown.child_token();
        let mut lag = lag::LagExporter::start(
            &self.settings,
            self.name,
            self.metrics.clone(),
            stop_lag.clone(),
        );
        let _stop_lag = stop_lag.drop_guard();
        while !shutdown.is_cancelled() {
            self.install_restored()?;
            if lag.due(self.assigned.len()) {
                lag.set(self.positions_now());
            }
            if !B::before_poll(self) {
                // The outputs of committed batches go first; nothing new until they are out.
                // The consumer is polled to stay in the group; a record it hands over now
                // is read again once the partition is moved back to its position.
                if let Some(Ok(m)) = self.consumer.poll(Duration::ZERO) {
                    self.fetched_ahead
                        .insert((m.topic().to_owned(), m.partition()));
                }
                self.apply_rebalances(&mut Vec::new())?;
                continue;
            }
            self.move_back_fetched_ahead();
            let batch = self.poll_batch(shutdown)?;
            // After a poll, so that a worker the group has expelled learns it before it
            // claims anything again.
            self.restore_again();
            B::process_and_commit(self, batch)?;
        }
        tracing::info!("stage stopped");
        Ok(())
    }
}

impl<B: Backend> Worker<B> {
    /// Whether the schema registry has answered for every Confluent schema ID among
    /// `records` (true without a registry), so that decoding them needs no network.
    /// When it cannot be asked, the batch must not be processed — its records are not
    /// bad, the registry is away — so the caller rewinds it, and this waits a backoff:
    /// the batch is read again until the registry answers.
    fn schemas_known(&mut self, records: &[&OwnedMessage]) -> bool {
        let Err(e) = self
            .codec
            .prefetch(records.iter().filter_map(|m| m.payload()))
        else {
            return true;
        };
        // `prefetch` keeps the registry's final answers for decoding to dead-letter by;
        // what it returns is only ever "could not ask".
        debug_assert_eq!(
            disposition::of_registry(&e),
            disposition::Disposition::AbortAndRewind
        );
        self.failures += 1;
        self.metrics.retries.with_label_values(&[self.name]).inc();
        tracing::warn!(error = %e, failures = self.failures, "cannot look up schema IDs; reading the batch again after a pause");
        std::thread::sleep(disposition::backoff(self.failures.min(10), 100, 5_000));
        false
    }

    /// Where each owned input partition continues, by its installed part.
    fn positions_now(&self) -> BTreeMap<(String, i32), i64> {
        self.assigned
            .iter()
            .filter_map(|(t, p)| {
                let base = self.topics.base(t).unwrap_or(t);
                let at = self.parts.get(p)?.position(base)?;
                Some(((t.clone(), *p), at))
            })
            .collect()
    }
}

fn header<'m>(m: &'m OwnedMessage, key: &str) -> Option<&'m [u8]> {
    use rdkafka::message::Headers;
    let h = m.headers()?;
    h.iter().find(|h| h.key == key).and_then(|h| h.value)
}
