//! The payment stage under `exactly_once`, on librdkafka's in-process mock cluster, against
//! the mock gateway in this process: external calls whose outcomes are recorded in state
//! and reacted to in the next transaction, through an injected abortable error.
//!
//! Exact: every reserved order ends authorized or failed, never both; the declined orders
//! are exactly those the gateway declines by key; the gateway charged each authorized
//! order once, with the authorization the pipeline recorded, and no other order.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use orderflow::config::{Guarantee, PaymentSettings, Settings};
use orderflow::events::codec::{Codec, DecodeHints};
use orderflow::events::{
    Envelope, Event, OrderLine, PaymentFailureReason, StockReserved, derive_id,
};
use orderflow::gateway::client::GatewayClient;
use orderflow::gateway::server::{Gateway, GatewayConfig, LedgerStatus, serve_gateway};
use orderflow::metrics::Metrics;
use orderflow::runtime::clock::SystemClock;
use orderflow::runtime::{self, RuntimeError};
use orderflow::stages::payment::{PaymentStage, authorization_key};
use orderflow::topics;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};
use rdkafka::{ClientConfig, Message, Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const PARTITIONS: i32 = 3;
const ORDERS: usize = 200;
const STORES: usize = 5;

fn reserved(i: usize) -> StockReserved {
    let store = format!("store-{}", i % STORES);
    let order = format!("o-{i:04}");
    StockReserved {
        envelope: Envelope {
            event_id: derive_id(&format!("{store}/{order}"), "inventory", 0).to_string(),
            order_id: Some(order.clone()),
            store_id: store,
            correlation_id: order,
            causation_id: None,
            occurred_at: 1_800_000_000_000,
            schema_version: 1,
        },
        customer_id: format!("c-{i}"),
        currency: "USD".into(),
        total_cents: 1_000 + i as i64,
        items: vec![OrderLine {
            sku: "SKU-1".into(),
            quantity: 1,
            unit_price_cents: 1_000 + i as i64,
        }],
    }
}

/// Every event on `payment.processed` so far, decoded; `expected` distinct IDs or a panic
/// after `timeout`.
fn read_payments(brokers: &str, topic: &str, expected: usize, timeout: Duration) -> Vec<Event> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", "reader")
        .create()
        .expect("consumer");
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition_offset(topic, p, Offset::Beginning)
            .expect("tpl");
    }
    consumer.assign(&tpl).expect("assign");
    let codec = Codec::new();
    let mut seen = BTreeSet::new();
    let mut events = Vec::new();
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
            let e = codec
                .decode(m.payload().expect("value"), DecodeHints::default())
                .expect("payment events decode");
            if seen.insert(e.envelope().event_id.clone()) {
                events.push(e);
            }
        }
        let ended: BTreeSet<_> = events
            .iter()
            .filter(|e| matches!(e, Event::PaymentAuthorized(_) | Event::PaymentFailed(_)))
            .filter_map(|e| e.envelope().order_id.clone())
            .collect();
        if ended.len() >= expected {
            // Whatever else is already there (a contradicting second end would be too).
            while let Some(Ok(m)) = consumer.poll(Duration::from_millis(300)) {
                let e = codec
                    .decode(m.payload().expect("value"), DecodeHints::default())
                    .expect("decode");
                if seen.insert(e.envelope().event_id.clone()) {
                    events.push(e);
                }
            }
            return events;
        }
    }
    panic!("timed out: payment events so far {}", events.len());
}

#[test]
fn every_order_is_paid_or_failed_once_through_an_aborted_transaction() {
    let mock = MockCluster::new(1).expect("mock cluster");
    let id = uuid::Uuid::new_v4().simple().to_string();
    let settings = Settings {
        brokers: mock.bootstrap_servers(),
        topic_prefix: format!("t{id}."),
        group_prefix: format!("g{id}"),
        guarantee: Guarantee::ExactlyOnce,
        instance_id: "pay-w1".into(),
        batch_max_records: 40,
        batch_interval_ms: 50,
        http_addr: "127.0.0.1:0".into(),
        ..Settings::default()
    };
    for (topic, _) in settings.topics().all() {
        mock.create_topic(&topic, PARTITIONS, 1)
            .expect("create topic");
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let stop = CancellationToken::new();
    let gateway = Gateway::new(GatewayConfig {
        decline_rate: 0.1,
        transient_error_rate: 0.3,
        seed: 5,
        ..GatewayConfig::default()
    })
    .expect("gateway config");
    let (addr, _task) = rt
        .block_on(serve_gateway("127.0.0.1:0", gateway.clone(), stop.clone()))
        .expect("gateway listens");
    let payment = PaymentSettings {
        gateway_url: format!("http://{addr}"),
        retry_base_ms: 20,
        retry_cap_ms: 100,
        max_attempts: 12,
        ..PaymentSettings::default()
    };
    let settings = Settings {
        payment: payment.clone(),
        ..settings
    };

    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &settings.brokers)
        .create()
        .expect("producer");
    let codec = Codec::new();
    let input = settings.topics().name(topics::INVENTORY_UPDATED);
    let publish = |range: std::ops::Range<usize>| {
        for i in range {
            let r = reserved(i);
            let bytes = codec
                .encode(&Event::StockReserved(r.clone()))
                .expect("encode");
            let partition = (i % STORES) as i32 % PARTITIONS;
            producer
                .send(
                    BaseRecord::to(&input)
                        .key(&r.envelope.store_id)
                        .payload(&bytes)
                        .partition(partition),
                )
                .expect("enqueue");
        }
        producer.flush(Duration::from_secs(10)).expect("flush");
    };

    let metrics = Metrics::new();
    let token = CancellationToken::new();
    let handle = runtime::spawn_with_effects(
        PaymentStage::new(payment.clone()),
        settings.clone(),
        metrics.clone(),
        Arc::new(SystemClock),
        Some(Arc::new(GatewayClient::new(&payment).expect("client"))),
        token.clone(),
    );
    publish(0..ORDERS / 2);
    // Once transactions are flowing, one commit fails abortably: the batch (with recorded
    // outcomes and reactions) is rolled back and redone.
    let until = Instant::now() + Duration::from_secs(30);
    while metrics
        .records_out
        .with_label_values(&["payment", topics::PAYMENT_PROCESSED])
        .get()
        == 0
    {
        assert!(Instant::now() < until, "no payment output within 30 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
    );
    publish(ORDERS / 2..ORDERS);

    let events = read_payments(
        &settings.brokers,
        &settings.topics().name(topics::PAYMENT_PROCESSED),
        ORDERS,
        Duration::from_secs(90),
    );
    token.cancel();
    let result: Result<(), RuntimeError> = handle.join().expect("worker thread");
    result.expect("the worker stops cleanly");
    let aborts = metrics.aborts.with_label_values(&["payment"]).get();
    assert!(aborts >= 1, "the injected error aborted no transaction");

    // Each order: one end, never both.
    let mut ends: BTreeMap<(String, String), Vec<&Event>> = BTreeMap::new();
    for e in &events {
        if matches!(e, Event::PaymentAuthorized(_) | Event::PaymentFailed(_)) {
            let env = e.envelope();
            ends.entry((env.store_id.clone(), env.order_id.clone().expect("order")))
                .or_default()
                .push(e);
        }
    }
    assert_eq!(ends.len(), ORDERS);
    let config = gateway.config();
    let mut authorized = BTreeMap::new();
    for ((store, order), evs) in &ends {
        assert_eq!(
            evs.len(),
            1,
            "order {store}/{order} ended {} times: {evs:?}",
            evs.len()
        );
        let declined_by_gateway = config
            .decline_reason(&authorization_key(store, order))
            .is_some();
        match evs[0] {
            Event::PaymentAuthorized(a) => {
                assert!(
                    !declined_by_gateway,
                    "{store}/{order} authorized although the gateway declines it"
                );
                authorized.insert((store.clone(), order.clone()), a.authorization_id.clone());
            }
            Event::PaymentFailed(f) => {
                assert_eq!(
                    f.reason,
                    PaymentFailureReason::Declined,
                    "{store}/{order}: {}",
                    f.message
                );
                assert!(
                    declined_by_gateway,
                    "{store}/{order} declined but the gateway would authorize it"
                );
            }
            _ => unreachable!(),
        }
    }
    // The gateway's ledger: one charge per authorized order, the same authorization.
    let mut charges: BTreeMap<(String, String), Vec<String>> = BTreeMap::new();
    for entry in gateway.ledger() {
        if entry.status == LedgerStatus::Authorized {
            charges
                .entry((entry.store_id.clone(), entry.order_id.clone()))
                .or_default()
                .push(entry.authorization_id.clone().expect("an authorization ID"));
        }
    }
    let charged: BTreeMap<_, _> = charges
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(v.len(), 1, "{k:?} charged {} times", v.len());
            (k, v[0].clone())
        })
        .collect();
    assert_eq!(charged, authorized);
    eprintln!(
        "{} authorized, {} declined, {aborts} aborted transaction(s), {} retry notices",
        authorized.len(),
        ORDERS - authorized.len(),
        events
            .iter()
            .filter(|e| matches!(e, Event::PaymentRetrying(_)))
            .count()
    );
    stop.cancel();
}
