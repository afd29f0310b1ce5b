//! Timers are state: scheduled by one worker, persisted in the changelog, fired by the
//! next worker when the injected clock says they are due, exactly once per firing ID.
//! Runs the real runtime (`at_least_once`) on librdkafka's in-process mock cluster, with a
//! stage defined here, so it needs no external broker.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow::config::{Guarantee, Settings};
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{Event, Picking, derive_id};
use orderflow::metrics::Metrics;
use orderflow::runtime::clock::ManualClock;
use orderflow::runtime::{self, RuntimeError};
use orderflow::stages::{Ctx, Input, Stage, StageError, Timer};
use orderflow::topics;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const STAGE: &str = "timertest";
const DELAY_MS: i64 = 60_000;
const PARTITIONS: i32 = 2;

/// Orders whose ID starts with this schedule nothing: the test publishes one after
/// moving the clock, and its committed batch proves the worker has run its timers at the
/// new time (see [`Running::settle`]).
const PROBE: &str = "probe-";

/// Schedules one timer per order; when it fires, emits `Picking` for that order.
struct PickLater;

impl Stage for PickLater {
    type State = ();

    fn name(&self) -> &'static str {
        STAGE
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[topics::ORDER_CREATED]
    }

    fn process(&mut self, ctx: &mut Ctx<'_, ()>, input: Input<'_>) -> Result<(), StageError> {
        let Event::OrderCreated(o) = input.event else {
            return Ok(());
        };
        let order = o.envelope.order_id.clone().unwrap_or_default();
        if order.starts_with(PROBE) {
            return Ok(());
        }
        let due = ctx.now() + DELAY_MS;
        ctx.schedule(format!("pick/{order}"), due, serde_json::Value::Null);
        Ok(())
    }

    fn on_timer(&mut self, ctx: &mut Ctx<'_, ()>, _timer: &Timer) -> Result<(), StageError> {
        let envelope = ctx.next_envelope();
        ctx.emit(Picking { envelope });
        Ok(())
    }
}

struct Env {
    _mock: MockCluster<'static, DefaultProducerContext>,
    settings: Settings,
}

fn env() -> Env {
    let mock = MockCluster::new(1).expect("mock cluster");
    let settings = Settings {
        brokers: mock.bootstrap_servers(),
        guarantee: Guarantee::AtLeastOnce,
        topic_prefix: format!("t{}.", uuid::Uuid::new_v4().simple()),
        group_prefix: format!("g{}", uuid::Uuid::new_v4().simple()),
        batch_interval_ms: 50,
        http_addr: "127.0.0.1:0".into(),
        ..Settings::default()
    };
    let t = settings.topics();
    for name in [
        t.name(topics::ORDER_CREATED),
        t.name(topics::FULFILLMENT_UPDATED),
        t.name(topics::DLQ),
        t.changelog(STAGE),
    ] {
        mock.create_topic(&name, PARTITIONS, 1)
            .expect("create topic");
    }
    Env {
        _mock: mock,
        settings,
    }
}

struct Running {
    token: CancellationToken,
    handle: std::thread::JoinHandle<Result<(), RuntimeError>>,
    metrics: Metrics,
}

fn start(settings: &Settings, clock: &ManualClock, instance: &str) -> Running {
    let mut s = settings.clone();
    s.instance_id = instance.into();
    let token = CancellationToken::new();
    let metrics = Metrics::new();
    let handle = runtime::spawn(
        PickLater,
        s,
        metrics.clone(),
        Arc::new(clock.clone()),
        token.clone(),
    );
    Running {
        token,
        handle,
        metrics,
    }
}

impl Running {
    fn stop(self) {
        self.token.cancel();
        self.handle
            .join()
            .expect("worker thread")
            .expect("worker result");
    }

    fn records_in(&self) -> u64 {
        self.metrics.records_in.with_label_values(&[STAGE]).get()
    }

    /// Input records in committed batches.
    fn committed_records(&self) -> f64 {
        self.metrics
            .batch_records
            .with_label_values(&[STAGE])
            .get_sample_sum()
    }

    /// Events produced by committed batches.
    fn committed_picks(&self) -> u64 {
        self.metrics
            .records_out
            .with_label_values(&[STAGE, topics::FULFILLMENT_UPDATED])
            .get()
    }

    fn timers_fired(&self) -> u64 {
        self.metrics.timers_fired.with_label_values(&[STAGE]).get()
    }

    /// Waits until this worker owns every partition with its state (and timers)
    /// restored: the runtime sets the gauge only after restoring.
    fn wait_until_assigned(&self) {
        wait_for(
            "the worker to own and restore all partitions",
            Duration::from_secs(30),
            || {
                self.metrics
                    .assigned_partitions
                    .with_label_values(&[STAGE])
                    .get()
                    == i64::from(PARTITIONS)
            },
        );
    }

    /// A barrier for "nothing fired": publishes a probe order (which schedules nothing)
    /// and waits until a batch holding it has committed. That batch was polled after
    /// the probe was published, so after the clock last moved; it read the clock and
    /// ran every due timer before committing. Whatever was due at the current time has
    /// fired by the time this returns, and shows in the metrics and on the topic.
    fn settle(&self, settings: &Settings, probe: &str) {
        let before = self.committed_records();
        publish_probe(settings, probe);
        wait_for(
            &format!("the batch with probe {probe} to commit"),
            Duration::from_secs(30),
            || self.committed_records() > before,
        );
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn publish_orders(settings: &Settings, n: usize) -> BTreeMap<String, String> {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()
        .expect("producer");
    let topic = settings.topics().name(topics::ORDER_CREATED);
    let mut ids = BTreeMap::new();
    for i in 0..n {
        let store = format!("store-{}", i % 3);
        let order = format!("o-{i}");
        let json = format!(
            r#"{{"order_id":"{order}","store_id":"{store}","customer_id":"c-{i}","email":"c{i}@example.com","currency":"USD","shipping_country":"US","items":[{{"sku":"SKU-1","quantity":1,"unit_price_cents":500}}],"placed_at":1700000000000}}"#
        );
        producer
            .send(BaseRecord::to(&topic).key(&store).payload(&json))
            .expect("enqueue");
        ids.insert(
            order.clone(),
            orderflow::events::order_created_id(&store, &order).to_string(),
        );
    }
    producer.flush(Duration::from_secs(10)).expect("flush");
    ids
}

/// One order that [`PickLater`] ignores, on partition 0 (which the worker under test
/// owns, as it owns every partition).
fn publish_probe(settings: &Settings, name: &str) {
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()
        .expect("producer");
    let order = format!("{PROBE}{name}");
    let json = format!(
        r#"{{"order_id":"{order}","store_id":"store-probe","customer_id":"c-probe","email":"probe@example.com","currency":"USD","shipping_country":"US","items":[{{"sku":"SKU-1","quantity":1,"unit_price_cents":500}}],"placed_at":1700000000000}}"#
    );
    producer
        .send(
            BaseRecord::to(&settings.topics().name(topics::ORDER_CREATED))
                .partition(0)
                .key("store-probe")
                .payload(&json),
        )
        .expect("enqueue");
    producer.flush(Duration::from_secs(10)).expect("flush");
}

/// Every `Picking` on `fulfillment.updated`, decoded.
fn picks(settings: &Settings) -> Vec<Picking> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .set("group.id", "reader")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer");
    let topic = settings.topics().name(topics::FULFILLMENT_UPDATED);
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let codec = Codec::new();
    let mut out = Vec::new();
    let mut eof = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while eof.len() < PARTITIONS as usize && Instant::now() < deadline {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                match codec.decode(m.payload().expect("value"), DecodeHints::default()) {
                    Ok(Event::Picking(p)) => out.push(p),
                    other => panic!("unexpected record on fulfillment.updated: {other:?}"),
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                eof.insert(p);
            }
            Some(Err(e)) => panic!("reading fulfillment.updated: {e}"),
            None => {}
        }
    }
    out
}

#[test]
fn timers_survive_a_restart_and_fire_once_when_due() {
    let env = env();
    let clock = ManualClock::new(1_800_000_000_000);
    let orders = publish_orders(&env.settings, 12);

    let first = start(&env.settings, &clock, "w1");
    wait_for("12 orders committed", Duration::from_secs(30), || {
        first.committed_records() == 12.0
    });
    assert_eq!(first.records_in(), 12);
    first.stop();
    assert!(picks(&env.settings).is_empty(), "no timer is due yet");

    // A different worker restores the timers and fires them when the clock says so.
    // It must hold the timers before the clock moves, or "nothing fired" would only say
    // that no one owned them yet.
    let second = start(&env.settings, &clock, "w2");
    second.wait_until_assigned();
    clock.advance(DELAY_MS - 1);
    second.settle(&env.settings, "early");
    assert_eq!(second.timers_fired(), 0, "a timer fired before it was due");
    assert_eq!(second.committed_picks(), 0);
    let early = picks(&env.settings);
    assert!(
        early.is_empty(),
        "a timer fired before it was due: {early:?}"
    );
    clock.advance(1);
    wait_for(
        "12 timer outputs committed",
        Duration::from_secs(30),
        || second.committed_picks() == 12,
    );
    assert_eq!(second.timers_fired(), 12);
    second.stop();

    let fired = picks(&env.settings);
    assert_eq!(fired.len(), 12, "one Picking per order: {fired:?}");
    let due = 1_800_000_000_000 + DELAY_MS;
    for p in &fired {
        let order = p.envelope.order_id.clone().expect("order id");
        let cause = &orders[&order];
        assert_eq!(p.envelope.causation_id.as_deref(), Some(cause.as_str()));
        assert_eq!(p.envelope.correlation_id, order);
        let firing = format!("timer/pick/{order}/{due}");
        assert_eq!(
            p.envelope.event_id,
            derive_id(&firing, STAGE, 0).to_string()
        );
    }
    let distinct: BTreeSet<_> = fired.iter().map(|p| p.envelope.order_id.clone()).collect();
    assert_eq!(distinct.len(), 12);

    // Fired timers are gone from state: a third worker fires nothing.
    let third = start(&env.settings, &clock, "w3");
    third.wait_until_assigned();
    clock.advance(10 * DELAY_MS);
    third.settle(&env.settings, "late");
    assert_eq!(third.timers_fired(), 0, "a fired timer fired again");
    assert_eq!(third.committed_picks(), 0);
    third.stop();
    assert_eq!(picks(&env.settings).len(), 12);
}
