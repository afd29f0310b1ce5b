//! Harness for the `exactly_once` tests on librdkafka's in-process mock cluster: one
//! deployment (mock cluster, topics, settings) per test, stage workers run in-process with
//! `orderflow::runtime::spawn`, a producer that follows the producer contract, and a plain
//! assign-based reader of `order.screened`.
//!
//! Invariant: every test owns its mock cluster, topic prefix, group prefix and
//! transactional IDs, so tests run in parallel without seeing each other; every wait has a
//! deadline and panics with what it saw (screenings so far, each worker's counters).
//!
//! What the mock cannot do shapes what is asserted: it does not store transactional offset
//! commits (a new worker re-reads its inputs from the beginning and skips them through the
//! restored dedup memory), ignores `read_committed` (aborted outputs are visible, with the
//! same event IDs as their redone copies) and does not fence zombies. So the tests count
//! distinct event IDs per order, and read the runtime's counters to tell which disposition
//! an injected error got.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use orderflow::config::{FraudSettings, Guarantee, Settings};
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, EventType, OrderScreened, derive_id, order_created_id};
use orderflow::metrics::Metrics;
use orderflow::runtime::clock::SystemClock;
use orderflow::runtime::{self, EVENT_TYPE_HEADER, RuntimeError};
use orderflow::stages::fraud::FraudStage;
use orderflow::topics::{ORDER_CREATED, ORDER_SCREENED};
use prometheus::core::{Collector, Metric};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{DefaultProducerContext, FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

/// Partitions of every topic of a deployment (pipeline topics, DLQ, changelogs alike).
pub const PARTITIONS: i32 = 3;
/// Brokers of each mock cluster: partition leaders and coordinators spread over them.
pub const BROKERS: i32 = 3;
pub const STAGE: &str = "fraud";

/// Fraud settings under which no order of unique customers is ever rejected.
pub fn lenient_fraud() -> FraudSettings {
    FraudSettings {
        velocity_max_orders: 1_000,
        velocity_window_secs: 3_600,
        ..FraudSettings::default()
    }
}

/// Installs a log subscriber once, filtered by `ORDERFLOW_TEST_LOG` (e.g.
/// `orderflow=debug`); silent by default, since the error tests log expected warnings.
pub fn init_logging() {
    let filter = std::env::var("ORDERFLOW_TEST_LOG").unwrap_or_else(|_| "off".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_test_writer()
        .try_init();
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// One test's deployment: its own mock cluster with every topic created.
pub struct Deployment {
    pub name: &'static str,
    /// Settings shared by the workers of this deployment; each worker gets its own
    /// `instance_id` (and so its own transactional ID).
    pub settings: Settings,
    /// Declared last so it is dropped last, after anything still connected to it.
    pub mock: MockCluster<'static, DefaultProducerContext>,
}

impl Deployment {
    pub fn new(name: &'static str, fraud: FraudSettings) -> Deployment {
        init_logging();
        let mock = MockCluster::new(BROKERS)
            .unwrap_or_else(|e| panic!("[{name}] creating a mock cluster: {e}"));
        let id = uuid::Uuid::new_v4().simple().to_string();
        let settings = Settings {
            brokers: mock.bootstrap_servers(),
            topic_prefix: format!("t{id}."),
            guarantee: Guarantee::ExactlyOnce,
            group_prefix: format!("g{id}"),
            instance_id: format!("{name}-w0"),
            partitions: PARTITIONS,
            replication_factor: 1,
            // Small batches, so a stream spans many transactions and an injected error
            // hits one in the middle of it.
            batch_max_records: 50,
            batch_interval_ms: 50,
            http_addr: "127.0.0.1:0".into(),
            fraud,
            ..Settings::default()
        };
        // The mock does not implement CreateTopics (`admin::create_topics`); it creates
        // topics through its own API, with the same equal partition counts.
        for (topic, _compacted) in settings.topics().all() {
            mock.create_topic(&topic, PARTITIONS, 1)
                .unwrap_or_else(|e| panic!("[{name}] creating topic {topic} on the mock: {e}"));
        }
        Deployment {
            name,
            settings,
            mock,
        }
    }

    pub fn topic(&self, base: &str) -> String {
        self.settings.topics().name(base)
    }

    /// Starts a fraud worker in-process, as `orderflow run` does.
    pub fn start(&self, instance: &str) -> Worker {
        self.start_with(instance, |_| {})
    }

    pub fn start_with(&self, instance: &str, adjust: impl FnOnce(&mut Settings)) -> Worker {
        let mut settings = self.settings.clone();
        settings.instance_id = format!("{}-{instance}", self.name);
        adjust(&mut settings);
        let metrics = Metrics::new();
        let token = CancellationToken::new();
        let handle = runtime::spawn(
            FraudStage::new(settings.fraud.clone()),
            settings,
            metrics.clone(),
            Arc::new(SystemClock),
            token.clone(),
        );
        Worker {
            label: format!("{}/{instance}", self.name),
            metrics,
            token,
            handle: Some(handle),
        }
    }

    /// Asserts that the fraud stage's committed state has consumed `order.created` to its
    /// end: per partition, the input position its changelog restores to (written in the
    /// same transaction as the outputs and the group offsets) equals the partition's end.
    /// The mock does not store transactional group offsets, so the changelog is where a
    /// committed position can be read back.
    pub fn assert_committed_to_the_end(&self) {
        let topic = self.topic(ORDER_CREATED);
        let changelog = self.settings.topics().changelog("fraud");
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.brokers)
            .create()
            .expect("a metadata consumer");
        let partitions: Vec<i32> = (0..PARTITIONS).collect();
        let restored =
            orderflow::runtime::restore::restore::<orderflow::stages::fraud::FraudState>(
                &self.settings,
                &changelog,
                &partitions,
                Some(&orderflow::runtime::restore::Inputs {
                    group: self.settings.group_id("fraud"),
                    topics: vec![topic.clone()],
                }),
            )
            .unwrap_or_else(|e| panic!("[{}] reading the fraud changelog back: {e}", self.name));
        for (p, ps) in restored {
            let (_, end) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("[{}] watermarks of {topic}/{p}: {e}", self.name));
            let committed = ps.positions.peek(ORDER_CREATED).copied().unwrap_or(0);
            assert_eq!(
                committed, end,
                "[{}] partition {p}: committed position {committed}, input end {end}",
                self.name
            );
        }
    }

    /// Publishes `orders` to `order.created` (key = store ID, JSON value) and waits until
    /// every one is acknowledged.
    pub fn produce(&self, orders: &[TestOrder]) {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", &self.settings.brokers)
            .set("partitioner", "murmur2_random")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "30000")
            .create()
            .unwrap_or_else(|e| panic!("[{}] creating the order producer: {e}", self.name));
        let topic = self.topic(ORDER_CREATED);
        let mut pending = Vec::with_capacity(orders.len());
        for o in orders {
            let value = o.json();
            let mut record = FutureRecord::to(&topic).key(&o.store_id).payload(&value);
            loop {
                match producer.send_result(record) {
                    Ok(f) => {
                        pending.push((o.order_id.clone(), f));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                        record = r;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err((e, _)) => panic!("[{}] enqueueing order {}: {e}", self.name, o.order_id),
                }
            }
        }
        for (order_id, f) in pending {
            match futures::executor::block_on(f) {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => {
                    panic!("[{}] order {order_id} was not delivered: {e}", self.name)
                }
                Err(_) => panic!("[{}] order {order_id}: delivery report lost", self.name),
            }
        }
    }
}

/// An order as a producer publishes it (see the producer contract in ARCHITECTURE.md).
#[derive(Debug, Clone)]
pub struct TestOrder {
    pub order_id: String,
    pub store_id: String,
    pub customer_id: String,
    /// Event time, milliseconds since the epoch.
    pub placed_at: i64,
}

impl TestOrder {
    /// `n` orders of distinct customers, round-robin over `stores` stores, one second of
    /// event time apart.
    pub fn batch(tag: &str, n: usize, stores: usize) -> Vec<TestOrder> {
        let t0 = now_ms();
        (0..n)
            .map(|i| TestOrder {
                order_id: format!("{tag}-o{i:05}"),
                store_id: format!("store-{:02}", i % stores),
                customer_id: format!("{tag}-c{i:05}"),
                placed_at: t0 + 1_000 * i as i64,
            })
            .collect()
    }

    pub fn json(&self) -> Vec<u8> {
        let placed_at = chrono::DateTime::from_timestamp_millis(self.placed_at)
            .expect("placed_at within chrono's range")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        serde_json::to_vec(&serde_json::json!({
            "order_id": self.order_id,
            "store_id": self.store_id,
            "customer_id": self.customer_id,
            "email": format!("{}@shop.test", self.customer_id),
            "currency": "USD",
            "shipping_country": "US",
            "items": [{"sku": "SKU-1", "quantity": 2, "unit_price_cents": 1999}],
            "placed_at": placed_at,
        }))
        .expect("an order serializes")
    }

    /// The one event ID the fraud stage may give this order's `OrderScreened`: derived
    /// from the order's `OrderCreated` ID, whoever processes it and however often.
    pub fn screened_id(&self) -> String {
        let created = order_created_id(&self.store_id, &self.order_id).to_string();
        derive_id(&created, STAGE, 0).to_string()
    }
}

/// A fraud worker running on its own thread.
pub struct Worker {
    pub label: String,
    pub metrics: Metrics,
    token: CancellationToken,
    handle: Option<JoinHandle<Result<(), RuntimeError>>>,
}

impl Worker {
    /// Panics if the worker has stopped on its own.
    pub fn assert_running(&mut self) {
        if self.handle.as_ref().is_some_and(JoinHandle::is_finished) {
            let outcome = match self.handle.take().map(JoinHandle::join) {
                Some(Ok(Ok(()))) => "returned Ok without being cancelled".to_string(),
                Some(Ok(Err(e))) => format!("failed: {e}"),
                Some(Err(_)) => "panicked".to_string(),
                None => "was already joined".to_string(),
            };
            panic!(
                "worker {} stopped unexpectedly: it {outcome}; {}",
                self.label,
                self.summary()
            );
        }
    }

    /// Cancels the worker and waits (bounded) for its thread to return.
    pub fn stop(&mut self, within: Duration) -> Result<(), RuntimeError> {
        self.token.cancel();
        self.join(within)
    }

    /// Waits (bounded) for the worker to return on its own.
    pub fn join(&mut self, within: Duration) -> Result<(), RuntimeError> {
        let handle = self
            .handle
            .take()
            .unwrap_or_else(|| panic!("worker {} was already joined", self.label));
        let deadline = Instant::now() + within;
        while !handle.is_finished() {
            if Instant::now() > deadline {
                self.token.cancel();
                panic!(
                    "worker {} did not return within {within:?}; {}",
                    self.label,
                    self.summary()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        handle
            .join()
            .unwrap_or_else(|_| panic!("worker {} panicked", self.label))
    }

    /// Waits (bounded) until this worker has committed `orders` screenings. The mock keeps
    /// aborted outputs visible, so a reader may see every order before the redo of an
    /// aborted batch is committed; a worker stopped then leaves that batch to the next one.
    pub fn wait_committed(&mut self, orders: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.records_out() < orders as u64 {
            if Instant::now() > deadline {
                panic!(
                    "worker {}: only {} of {orders} screenings committed within {within:?}; {}",
                    self.label,
                    self.records_out(),
                    self.summary()
                );
            }
            self.assert_running();
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn records_in(&self) -> u64 {
        self.metrics.records_in.with_label_values(&[STAGE]).get()
    }

    /// Screenings committed by this worker (not counting aborted attempts).
    pub fn records_out(&self) -> u64 {
        self.metrics
            .records_out
            .with_label_values(&[STAGE, ORDER_SCREENED])
            .get()
    }

    pub fn duplicates(&self) -> u64 {
        self.metrics.duplicates.with_label_values(&[STAGE]).get()
    }

    pub fn aborts(&self) -> u64 {
        self.metrics.aborts.with_label_values(&[STAGE]).get()
    }

    pub fn producer_rebuilds(&self) -> u64 {
        self.metrics
            .producer_rebuilds
            .with_label_values(&[STAGE])
            .get()
    }

    /// Records this worker sent to the DLQ, whatever the error class.
    pub fn dead_lettered(&self) -> u64 {
        self.metrics
            .dead_lettered
            .collect()
            .iter()
            .flat_map(|family| family.metric.iter())
            .map(|m| m.counter.value() as u64)
            .sum()
    }

    /// Committed batches whose commit took longer than `secs` (a bucket bound of
    /// `orderflow_commit_seconds`): how an error that librdkafka retried internally shows.
    pub fn commits_slower_than(&self, secs: f64) -> u64 {
        let metric = self
            .metrics
            .commit_seconds
            .with_label_values(&[STAGE])
            .metric();
        let h = &metric.histogram;
        let within = h
            .bucket
            .iter()
            .find(|b| (b.upper_bound() - secs).abs() < 1e-9)
            .unwrap_or_else(|| panic!("orderflow_commit_seconds has no bucket at {secs}s"))
            .cumulative_count();
        h.sample_count() - within
    }

    pub fn summary(&self) -> String {
        format!(
            "counters of {}: records_in={} records_out={} duplicates={} aborts={} producer_rebuilds={} dead_lettered={} commits>0.5s={}",
            self.label,
            self.records_in(),
            self.records_out(),
            self.duplicates(),
            self.aborts(),
            self.producer_rebuilds(),
            self.dead_lettered(),
            self.commits_slower_than(0.5),
        )
    }
}

impl Drop for Worker {
    /// A test that panicked still stops its worker, bounded, before the mock goes away.
    fn drop(&mut self) {
        self.token.cancel();
        if let Some(handle) = &self.handle {
            let deadline = Instant::now() + Duration::from_secs(15);
            while !handle.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Everything read from `order.screened`, by order.
pub struct Screenings {
    consumer: BaseConsumer,
    topic: String,
    codec: Codec,
    /// Order ID → event ID → the screening (the same ID may arrive more than once).
    pub by_order: BTreeMap<String, BTreeMap<String, OrderScreened>>,
    /// Records read, duplicates included.
    pub records: usize,
    /// Next offset to read per partition.
    next: HashMap<i32, i64>,
    label: String,
}

impl Screenings {
    /// A reader of every partition of `order.screened` from the beginning, by assignment.
    pub fn new(dep: &Deployment) -> Screenings {
        let topic = dep.topic(ORDER_SCREENED);
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", &dep.settings.brokers)
            // librdkafka's assign() needs a group handle; this group never joins or commits.
            .set("group.id", format!("{}.reader", dep.settings.group_prefix))
            .set("enable.auto.commit", "false")
            // What a downstream consumer would set; the mock ignores it, which is why
            // the assertions count distinct event IDs rather than records.
            .set("isolation.level", "read_committed")
            .create()
            .unwrap_or_else(|e| panic!("[{}] creating the output reader: {e}", dep.name));
        let mut tpl = TopicPartitionList::new();
        for p in 0..PARTITIONS {
            tpl.add_partition_offset(&topic, p, Offset::Beginning)
                .expect("a valid partition");
        }
        consumer
            .assign(&tpl)
            .unwrap_or_else(|e| panic!("[{}] assigning {topic}: {e}", dep.name));
        Screenings {
            consumer,
            topic,
            codec: Codec::new(),
            by_order: BTreeMap::new(),
            records: 0,
            next: HashMap::new(),
            label: dep.name.to_owned(),
        }
    }

    fn poll(&mut self, timeout: Duration) {
        match self.consumer.poll(timeout) {
            None => {}
            Some(Err(e)) => eprintln!("[{}] output reader: {e}", self.label),
            Some(Ok(m)) => {
                self.next.insert(m.partition(), m.offset() + 1);
                self.records += 1;
                let header_type = m.headers().and_then(|h| {
                    h.iter()
                        .find(|h| h.key == EVENT_TYPE_HEADER)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                });
                let hints = DecodeHints {
                    header_type: header_type.as_deref(),
                    topic_default: Some(EventType::OrderScreened),
                    ..DecodeHints::default()
                };
                let payload = m.payload().unwrap_or_else(|| {
                    panic!(
                        "[{}] {}[{}]@{} has no value",
                        self.label,
                        self.topic,
                        m.partition(),
                        m.offset()
                    )
                });
                let event = self.codec.decode(payload, hints).unwrap_or_else(|e| {
                    panic!(
                        "[{}] {}[{}]@{} does not decode: {e}",
                        self.label,
                        self.topic,
                        m.partition(),
                        m.offset()
                    )
                });
                let Event::OrderScreened(s) = event else {
                    panic!(
                        "[{}] {} carries a {}",
                        self.label,
                        self.topic,
                        event.event_type()
                    );
                };
                let order_id = s.envelope.order_id.clone().unwrap_or_else(|| {
                    panic!(
                        "[{}] OrderScreened {} has no order ID",
                        self.label, s.envelope.event_id
                    )
                });
                self.by_order
                    .entry(order_id)
                    .or_default()
                    .insert(s.envelope.event_id.clone(), s);
            }
        }
    }

    pub fn distinct_orders(&self) -> usize {
        self.by_order.len()
    }

    /// Reads until `orders` distinct orders have been screened, checking on the workers.
    pub fn wait_for(
        &mut self,
        orders: usize,
        within: Duration,
        workers: &mut [&mut Worker],
        what: &str,
    ) {
        let deadline = Instant::now() + within;
        while self.distinct_orders() < orders {
            if Instant::now() > deadline {
                let counters: Vec<String> = workers.iter().map(|w| w.summary()).collect();
                panic!(
                    "[{}] {what}: only {} of {orders} orders screened ({} records) within {within:?}; {}",
                    self.label,
                    self.distinct_orders(),
                    self.records,
                    counters.join("; ")
                );
            }
            for w in workers.iter_mut() {
                w.assert_running();
            }
            self.poll(Duration::from_millis(100));
        }
    }

    /// Reads everything in the topic now (up to each partition's current end).
    pub fn drain(&mut self) {
        let mut ends = HashMap::new();
        for p in 0..PARTITIONS {
            let (_, high) = self
                .consumer
                .fetch_watermarks(&self.topic, p, Duration::from_secs(10))
                .unwrap_or_else(|e| {
                    panic!("[{}] watermarks of {}[{p}]: {e}", self.label, self.topic)
                });
            ends.insert(p, high);
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while ends
            .iter()
            .any(|(p, high)| self.next.get(p).copied().unwrap_or(0) < *high)
        {
            if Instant::now() > deadline {
                panic!(
                    "[{}] could not read {} to its end {ends:?}: at {:?}",
                    self.label, self.topic, self.next
                );
            }
            self.poll(Duration::from_millis(100));
        }
    }

    /// Every order screened under exactly its one derived event ID, and nothing else
    /// screened; returns how many records were duplicates (same ID more than once).
    pub fn assert_each_screened_once(&self, orders: &[TestOrder]) -> usize {
        for o in orders {
            let ids = self.by_order.get(&o.order_id).unwrap_or_else(|| {
                panic!(
                    "[{}] order {} (store {}) was never screened; {} of {} orders were",
                    self.label,
                    o.order_id,
                    o.store_id,
                    self.distinct_orders(),
                    orders.len()
                )
            });
            let found: Vec<&String> = ids.keys().collect();
            assert_eq!(
                found,
                vec![&o.screened_id()],
                "[{}] order {} must be screened under exactly one event ID, its derived one",
                self.label,
                o.order_id
            );
        }
        assert_eq!(
            self.distinct_orders(),
            orders.len(),
            "[{}] screenings of orders that were never placed",
            self.label
        );
        self.records - orders.len()
    }

    /// The one screening of `order_id` (call after `assert_each_screened_once`).
    pub fn of(&self, order_id: &str) -> &OrderScreened {
        self.by_order
            .get(order_id)
            .and_then(|ids| ids.values().next())
            .unwrap_or_else(|| panic!("[{}] order {order_id} was never screened", self.label))
    }
}
