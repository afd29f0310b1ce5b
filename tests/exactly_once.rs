//! The `exactly_once` guarantee end to end: the fraud stage in-process on librdkafka's mock
//! cluster (no broker here supports transactions), with errors injected into the
//! transactional protocol, plus the refusal of a real broker without transactions.
//!
//! What is asserted holds despite the mock's gaps (see `mock/mod.rs`): every order is
//! screened under exactly one distinct event ID — its derived one — and nothing else is
//! screened; the runtime's counters say which disposition each injected error got
//! (no abort for errors librdkafka retries itself, `aborts` for abortable ones,
//! `producer_rebuilds` for fencing); `records_out` counts each order exactly once, since
//! outputs of aborted batches are never counted.

mod mock;

use std::ops::RangeInclusive;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mock::{Deployment, Screenings, TestOrder, lenient_fraud};
use orderflow::config::{FraudSettings, Guarantee, Settings};
use orderflow::events::ScreeningDecision;
use orderflow::metrics::Metrics;
use orderflow::runtime::clock::SystemClock;
use orderflow::runtime::disposition::{Disposition, classify};
use orderflow::runtime::{self, RuntimeError};
use orderflow::stages::fraud::FraudStage;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::types::RDKafkaApiKey;
use rdkafka::types::RDKafkaRespErr::{self, *};
use rdkafka::{Offset, TopicPartitionList};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(60);
const STOP: Duration = Duration::from_secs(20);

fn assert_all_approved(s: &Screenings, orders: &[TestOrder]) {
    for o in orders {
        let sc = s.of(&o.order_id);
        assert!(
            sc.decision == ScreeningDecision::Approved && sc.reasons.is_empty(),
            "order {} should be approved without reasons, got {:?} {:?}",
            o.order_id,
            sc.decision,
            sc.reasons
        );
    }
}

/// No failures: 500 orders of 10 stores, each screened once, in exactly 500 records.
#[test]
fn every_order_is_screened_once_in_one_transactional_stream() {
    const ORDERS: usize = 500;
    let dep = Deployment::new("happy", lenient_fraud());
    let orders = TestOrder::batch("happy", ORDERS, 10);
    dep.produce(&orders);
    let mut w = dep.start("w1");
    let mut s = Screenings::new(&dep);
    s.wait_for(ORDERS, WAIT, &mut [&mut w], "happy path");
    w.stop(STOP).expect("the worker stops cleanly");
    s.drain();
    dep.assert_committed_to_the_end();

    let dups = s.assert_each_screened_once(&orders);
    assert_all_approved(&s, &orders);
    assert_eq!(
        dups,
        0,
        "no failure, so no record may be written twice; {}",
        w.summary()
    );
    assert_eq!(w.records_in(), ORDERS as u64, "{}", w.summary());
    assert_eq!(w.records_out(), ORDERS as u64, "{}", w.summary());
    assert_eq!(w.aborts(), 0, "{}", w.summary());
    assert_eq!(w.producer_rebuilds(), 0, "{}", w.summary());
    assert_eq!(w.dead_lettered(), 0, "{}", w.summary());
}

/// What an injected error must lead to.
#[derive(Debug, Clone)]
enum Expect {
    /// librdkafka retries inside the transactional API and the runtime never sees an error:
    /// no abort, no rebuild, and a commit visibly slowed (> 0.5 s) by the retries.
    RetriedInternally,
    /// The batch is aborted and redone on the same producer.
    AbortAndRewind { aborts: RangeInclusive<u64> },
    /// The producer is fenced (fatal): rebuilt once; its batch aborted and redone.
    RebuildProducer,
}

/// Screens 20 orders, injects `errors` for `api`, screens 480 more, and checks that every
/// order was screened once under its ID and that the counters show `expect`.
fn screen_through_injected_errors(
    name: &'static str,
    api: RDKafkaApiKey,
    errors: &[RDKafkaRespErr],
    expect: Expect,
) {
    const WARM_UP: usize = 20;
    const ORDERS: usize = 500;
    let dep = Deployment::new(name, lenient_fraud());
    let orders = TestOrder::batch(name, ORDERS, 10);
    dep.produce(&orders[..WARM_UP]);
    // A Produce error is injected only after the orders are produced (the order
    // producer must not be the one that receives it), so the worker keeps each batch
    // open for a second after its first record: its next batch is sent after the
    // injection, not before.
    let mut w = dep.start_with("w1", |s| {
        if api == RDKafkaApiKey::Produce {
            s.batch_interval_ms = 1_000;
            s.batch_linger_ms = 1_000;
        }
    });
    let mut s = Screenings::new(&dep);
    // The group is joined, partitions restored and a first transaction committed before
    // any error is injected, so the failure hits a batch in the middle of the stream.
    s.wait_for(WARM_UP, WAIT, &mut [&mut w], "warm-up");
    assert_eq!(w.aborts(), 0, "warm-up must be clean; {}", w.summary());
    let slow_before = w.commits_slower_than(0.5);
    if api == RDKafkaApiKey::Produce {
        // The order producer must not be the one that receives the injected error.
        dep.produce(&orders[WARM_UP..]);
        dep.mock.request_errors(api, errors);
    } else {
        dep.mock.request_errors(api, errors);
        dep.produce(&orders[WARM_UP..]);
    }
    s.wait_for(
        ORDERS,
        WAIT,
        &mut [&mut w],
        &format!("after injecting {errors:?} into {api:?}"),
    );
    w.wait_committed(ORDERS, WAIT);
    w.stop(STOP)
        .expect("the worker stops cleanly after the failure");
    s.drain();
    dep.assert_committed_to_the_end();

    let dups = s.assert_each_screened_once(&orders);
    assert_all_approved(&s, &orders);
    let summary = w.summary();
    eprintln!("[{name}] {api:?} {errors:?}: {summary}; {dups} duplicate output records (same ID)");
    assert_eq!(
        w.records_out(),
        ORDERS as u64,
        "every order's output is committed exactly once; {summary}"
    );
    assert_eq!(w.dead_lettered(), 0, "{summary}");
    match expect {
        Expect::RetriedInternally => {
            assert_eq!(
                w.aborts(),
                0,
                "a retriable error must not abort a batch; {summary}"
            );
            assert_eq!(w.producer_rebuilds(), 0, "{summary}");
            assert!(
                w.commits_slower_than(0.5) > slow_before,
                "no commit was slowed by the injected {errors:?}: was the error ever hit? {summary}"
            );
            assert_eq!(dups, 0, "nothing was aborted, so nothing is written twice");
        }
        Expect::AbortAndRewind { aborts } => {
            assert!(
                aborts.contains(&w.aborts()),
                "expected {aborts:?} aborted batches; {summary}"
            );
            assert_eq!(
                w.producer_rebuilds(),
                0,
                "an abortable error must not rebuild the producer; {summary}"
            );
        }
        Expect::RebuildProducer => {
            assert_eq!(
                w.producer_rebuilds(),
                1,
                "fencing must rebuild the producer once; {summary}"
            );
            assert_eq!(
                w.aborts(),
                1,
                "the fenced batch is abandoned and redone; {summary}"
            );
        }
    }
}

// Injected errors. Coordinator loss and concurrent transactions are retried inside
// librdkafka (the transactional API call just takes longer).

#[test]
fn coordinator_loss_on_end_txn_is_retried() {
    screen_through_injected_errors(
        "coord-endtxn",
        RDKafkaApiKey::EndTxn,
        &[RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 2],
        Expect::RetriedInternally,
    );
}

#[test]
fn coordinator_loss_on_add_partitions_is_retried() {
    screen_through_injected_errors(
        "coord-addparts",
        RDKafkaApiKey::AddPartitionsToTxn,
        &[RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE; 3],
        Expect::RetriedInternally,
    );
}

#[test]
fn coordinator_loss_on_txn_offset_commit_is_retried() {
    screen_through_injected_errors(
        "coord-offsets",
        RDKafkaApiKey::TxnOffsetCommit,
        &[RD_KAFKA_RESP_ERR_NOT_COORDINATOR; 2],
        Expect::RetriedInternally,
    );
}

#[test]
fn concurrent_transactions_are_retried() {
    screen_through_injected_errors(
        "concurrent",
        RDKafkaApiKey::AddPartitionsToTxn,
        &[RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 40],
        Expect::RetriedInternally,
    );
}

/// `send_offsets_to_transaction` fails with an abortable error (the group generation is
/// stale): one abort, the batch is redone.
#[test]
fn abortable_offset_commit_aborts_and_redoes_the_batch() {
    screen_through_injected_errors(
        "abort-offsets",
        RDKafkaApiKey::TxnOffsetCommit,
        &[RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION],
        Expect::AbortAndRewind { aborts: 1..=1 },
    );
}

/// A permanent Produce error fails the transaction (abortable). librdkafka then fails the
/// next transaction once more with an abortable "skipped sequence numbers" on that
/// partition before it recovers, hence up to two aborts.
#[test]
fn abortable_produce_error_aborts_and_redoes_the_batch() {
    screen_through_injected_errors(
        "abort-produce",
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
        Expect::AbortAndRewind { aborts: 1..=2 },
    );
}

/// EndTxn(commit) fails abortably after every record of the batch was written (the mock
/// keeps them visible): the redo must write the same IDs.
#[test]
fn abortable_end_txn_aborts_and_redoes_the_batch() {
    screen_through_injected_errors(
        "abort-endtxn",
        RDKafkaApiKey::EndTxn,
        &[RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
        Expect::AbortAndRewind { aborts: 1..=1 },
    );
}

#[test]
fn fencing_on_end_txn_rebuilds_the_producer() {
    screen_through_injected_errors(
        "fenced-endtxn",
        RDKafkaApiKey::EndTxn,
        &[RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
        Expect::RebuildProducer,
    );
}

#[test]
fn fencing_on_produce_rebuilds_the_producer() {
    screen_through_injected_errors(
        "fenced-produce",
        RDKafkaApiKey::Produce,
        &[RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH],
        Expect::RebuildProducer,
    );
}

/// One transactional producer on its own mock cluster: a transaction of three records and
/// an offset commit for a group.
struct TxnProbe {
    producer: ThreadedProducer<DefaultProducerContext>,
    consumer: BaseConsumer,
    mock: MockCluster<'static, DefaultProducerContext>,
}

impl TxnProbe {
    const TIMEOUT: Duration = Duration::from_secs(10);

    fn new() -> TxnProbe {
        let mock = MockCluster::new(mock::BROKERS).expect("a mock cluster");
        for t in ["probe.out", "probe.in"] {
            mock.create_topic(t, mock::PARTITIONS, 1)
                .expect("a mock topic");
        }
        let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("transactional.id", "probe")
            .set("enable.idempotence", "true")
            // A topic-level error (e.g. authorization) stays cached until the next
            // metadata refresh; refresh quickly so that recovery is observable in time.
            .set("topic.metadata.refresh.interval.ms", "200")
            .create()
            .expect("a transactional producer");
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", mock.bootstrap_servers())
            .set("group.id", "probe")
            .create()
            .expect("a consumer for group metadata");
        producer
            .init_transactions(Self::TIMEOUT)
            .expect("init_transactions on the mock");
        TxnProbe {
            producer,
            consumer,
            mock,
        }
    }

    /// The calls the runtime makes for one batch, with `commit_timeout` for the commit.
    fn transaction(&self, commit_timeout: Duration) -> Result<(), KafkaError> {
        self.producer.begin_transaction()?;
        for p in 0..mock::PARTITIONS {
            self.producer
                .send(
                    BaseRecord::to("probe.out")
                        .partition(p)
                        .key("k")
                        .payload("v"),
                )
                .map_err(|(e, _)| e)?;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset("probe.in", 0, Offset::Offset(1))?;
        let group = self
            .consumer
            .group_metadata()
            .expect("group metadata of a consumer with a group.id");
        self.producer
            .send_offsets_to_transaction(&tpl, &group, Self::TIMEOUT)?;
        self.producer.commit_transaction(commit_timeout)
    }
}

/// How a transactional error looked, for failure messages.
fn describe(e: &KafkaError) -> String {
    match e {
        KafkaError::Transaction(t) => format!(
            "{:?} (fatal={}, retriable={}, requires_abort={}): {}",
            t.code(),
            t.is_fatal(),
            t.is_retriable(),
            t.txn_requires_abort(),
            t.string()
        ),
        other => format!("{other:?}"),
    }
}

/// Injects `errors` into a probe's first transaction and checks the error it gets, its
/// disposition, and that the disposition's remedy works.
fn classify_case(
    api: RDKafkaApiKey,
    errors: &[RDKafkaRespErr],
    expected: Disposition,
) -> Result<String, String> {
    let probe = TxnProbe::new();
    probe.mock.request_errors(api, errors);
    let case = format!("{errors:?} on {api:?}");
    let error = match probe.transaction(TxnProbe::TIMEOUT) {
        Ok(()) => return Err(format!("{case}: the transaction succeeded")),
        Err(e) => e,
    };
    let got = classify(&error);
    if got != expected {
        return Err(format!(
            "{case}: {} classified {got:?}, expected {expected:?}",
            describe(&error)
        ));
    }
    let KafkaError::Transaction(t) = &error else {
        return Err(format!("{case}: not a transaction error: {error:?}"));
    };
    match expected {
        Disposition::AbortAndRewind => {
            // The remedy: abort, then the same producer commits again (librdkafka may
            // fail one more transaction after a failed Produce; the runtime redoes it too).
            probe
                .producer
                .abort_transaction(TxnProbe::TIMEOUT)
                .map_err(|e| format!("{case}: abort failed: {}", describe(&e)))?;
            let mut last = None;
            for _ in 0..10 {
                match probe.transaction(TxnProbe::TIMEOUT) {
                    Ok(()) => return Ok(format!("{case}: {} -> {got:?}", describe(&error))),
                    Err(e) if classify(&e) == Disposition::AbortAndRewind => {
                        probe
                            .producer
                            .abort_transaction(TxnProbe::TIMEOUT)
                            .map_err(|e| {
                                format!("{case}: second abort failed: {}", describe(&e))
                            })?;
                        last = Some(describe(&e));
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    Err(e) => return Err(format!("{case}: after abort: {}", describe(&e))),
                }
            }
            Err(format!(
                "{case}: no transaction commits after aborting; last {last:?}"
            ))
        }
        Disposition::RebuildProducer => {
            // The producer is unusable: aborting fails fatally as well.
            if !t.is_fatal() {
                return Err(format!("{case}: {} is not fatal", describe(&error)));
            }
            match probe.producer.abort_transaction(TxnProbe::TIMEOUT) {
                Err(e) if classify(&e) == Disposition::RebuildProducer => {
                    Ok(format!("{case}: {} -> {got:?}", describe(&error)))
                }
                other => Err(format!("{case}: abort after a fatal error gave {other:?}")),
            }
        }
        Disposition::Retry => Err(format!("{case}: use retry_case")),
        Disposition::Permanent => Err(format!(
            "{case}: a permanent record error is not a transaction error"
        )),
    }
}

/// A commit whose EndTxn keeps failing with CONCURRENT_TRANSACTIONS times out with a
/// retriable error; once the coordinator recovers, calling commit again succeeds — which
/// is what `Retry` (retry in place) does.
fn retry_case() -> Result<String, String> {
    let probe = TxnProbe::new();
    probe.mock.request_errors(
        RDKafkaApiKey::EndTxn,
        &[RD_KAFKA_RESP_ERR_CONCURRENT_TRANSACTIONS; 100],
    );
    let case = "CONCURRENT_TRANSACTIONS on EndTxn until the commit times out";
    let error = match probe.transaction(Duration::from_millis(300)) {
        Ok(()) => return Err(format!("{case}: the commit succeeded")),
        Err(e) => e,
    };
    if classify(&error) != Disposition::Retry {
        return Err(format!(
            "{case}: {} classified {:?}",
            describe(&error),
            classify(&error)
        ));
    }
    probe.mock.clear_request_errors(RDKafkaApiKey::EndTxn);
    probe
        .producer
        .commit_transaction(TxnProbe::TIMEOUT)
        .map_err(|e| format!("{case}: retried commit failed: {}", describe(&e)))?;
    Ok(format!(
        "{case}: {} -> Retry, retried commit ok",
        describe(&error)
    ))
}

/// The disposition of every error the mock produced above (and of the runtime's own
/// synthetic error), checked on the real `KafkaError` values librdkafka returned.
#[test]
fn classify_maps_mock_errors_to_their_dispositions() {
    use Disposition::*;
    use RDKafkaApiKey::*;
    let cases: Vec<(RDKafkaApiKey, Vec<RDKafkaRespErr>, Disposition)> = vec![
        // Fencing and other fatal producer errors.
        (
            EndTxn,
            vec![RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
            RebuildProducer,
        ),
        (
            EndTxn,
            vec![RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH],
            RebuildProducer,
        ),
        (
            EndTxn,
            vec![RD_KAFKA_RESP_ERR_INVALID_TXN_STATE],
            RebuildProducer,
        ),
        (
            AddPartitionsToTxn,
            vec![RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
            RebuildProducer,
        ),
        (
            TxnOffsetCommit,
            vec![RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH],
            RebuildProducer,
        ),
        (
            Produce,
            vec![RD_KAFKA_RESP_ERR_INVALID_PRODUCER_EPOCH],
            RebuildProducer,
        ),
        (
            Produce,
            vec![RD_KAFKA_RESP_ERR_OUT_OF_ORDER_SEQUENCE_NUMBER],
            RebuildProducer,
        ),
        // Abortable errors.
        (
            TxnOffsetCommit,
            vec![RD_KAFKA_RESP_ERR_ILLEGAL_GENERATION],
            AbortAndRewind,
        ),
        (
            TxnOffsetCommit,
            vec![RD_KAFKA_RESP_ERR_UNKNOWN_MEMBER_ID],
            AbortAndRewind,
        ),
        (
            TxnOffsetCommit,
            vec![RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
            AbortAndRewind,
        ),
        (
            AddOffsetsToTxn,
            vec![RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED],
            AbortAndRewind,
        ),
        (
            AddPartitionsToTxn,
            vec![RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
            AbortAndRewind,
        ),
        (
            EndTxn,
            vec![RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
            AbortAndRewind,
        ),
        (
            EndTxn,
            vec![RD_KAFKA_RESP_ERR_INVALID_RECORD],
            AbortAndRewind,
        ),
        (
            Produce,
            vec![RD_KAFKA_RESP_ERR_MSG_SIZE_TOO_LARGE],
            AbortAndRewind,
        ),
        (
            Produce,
            vec![RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED],
            AbortAndRewind,
        ),
        (
            Produce,
            vec![RD_KAFKA_RESP_ERR_UNKNOWN_PRODUCER_ID],
            AbortAndRewind,
        ),
        // librdkafka reports PRODUCER_FENCED on a Produce response as abortable, not
        // fatal (only INVALID_PRODUCER_EPOCH there means fencing to it).
        (
            Produce,
            vec![RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
            AbortAndRewind,
        ),
    ];
    let results: Vec<Result<String, String>> = std::thread::scope(|s| {
        let mut handles: Vec<_> = cases
            .iter()
            .map(|(api, errors, expected)| s.spawn(move || classify_case(*api, errors, *expected)))
            .collect();
        handles.push(s.spawn(retry_case));
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| Err("a probe panicked".into())))
            .collect()
    });
    for r in results.iter().flatten() {
        eprintln!("{r}");
    }
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failures.is_empty(),
        "misclassified or unrecoverable:\n{failures:#?}"
    );

    // The runtime's own error when it has no group metadata to commit offsets with.
    assert_eq!(
        classify(&KafkaError::MessageProduction(RDKafkaErrorCode::State)),
        AbortAndRewind
    );
}

/// Cancelling a worker mid-stream returns Ok after its last batch committed; a second
/// worker screens the rest, and no order is screened by both.
#[test]
fn graceful_shutdown_mid_stream_then_a_second_worker_finishes() {
    const ORDERS: usize = 1_000;
    let dep = Deployment::new("shutdown", lenient_fraud());
    let orders = TestOrder::batch("shutdown", ORDERS, 10);
    dep.produce(&orders);
    // Small batches so that the stream is still flowing when the token is cancelled.
    let mut w1 = dep.start_with("w1", |s| s.batch_max_records = 20);
    let mut s = Screenings::new(&dep);
    s.wait_for(100, WAIT, &mut [&mut w1], "first worker");
    let stopped = w1.stop(STOP);
    assert!(
        stopped.is_ok(),
        "a cancelled worker returns Ok, got {stopped:?}; {}",
        w1.summary()
    );
    s.drain();
    let by_first = s.distinct_orders();
    assert!(
        by_first < ORDERS,
        "the first worker finished all {ORDERS} orders before it was cancelled; the test did not stop it mid-stream"
    );
    assert_eq!(
        w1.records_out(),
        by_first as u64,
        "what the first worker committed is what is in the topic; {}",
        w1.summary()
    );

    let mut w2 = dep.start("w2");
    s.wait_for(ORDERS, WAIT, &mut [&mut w2], "second worker");
    w2.stop(STOP).expect("the second worker stops cleanly");
    s.drain();
    let dups = s.assert_each_screened_once(&orders);
    assert_all_approved(&s, &orders);
    eprintln!(
        "shutdown: first worker screened {by_first}, second {}; {dups} duplicate records; {}; {}",
        ORDERS - by_first,
        w1.summary(),
        w2.summary()
    );
    assert_eq!(
        w2.records_out(),
        (ORDERS - by_first) as u64,
        "the second worker screens exactly the orders the first did not commit; {}",
        w2.summary()
    );
    // Whatever the second worker re-read of the first one's input (all of it on the mock,
    // which keeps no transactional offsets) it skipped as already processed.
    assert_eq!(
        w2.records_in() - w2.duplicates(),
        (ORDERS - by_first) as u64,
        "{}",
        w2.summary()
    );
    assert_eq!(w1.aborts() + w2.aborts(), 0);
}

/// The velocity window survives a worker change through the changelog: one customer's
/// orders 3 and 4 are rejected by the second worker although orders 1 and 2 were seen by
/// the first.
#[test]
fn velocity_window_is_restored_from_the_changelog() {
    const ORDERS: usize = 200;
    const HALF: usize = ORDERS / 2;
    const BURSTY: &str = "c-bursty";
    let fraud = FraudSettings {
        velocity_max_orders: 2,
        velocity_window_secs: 3_600,
        ..FraudSettings::default()
    };
    let dep = Deployment::new("velocity", fraud);
    let mut orders = TestOrder::batch("velocity", ORDERS, 10);
    // One customer at one store, spread across the stream (all within the hour window).
    let bursty = [15, 65, 115, 165];
    for i in bursty {
        orders[i].customer_id = BURSTY.into();
        orders[i].store_id = "store-03".into();
    }

    dep.produce(&orders[..HALF]);
    let mut w1 = dep.start("w1");
    let mut s = Screenings::new(&dep);
    s.wait_for(HALF, WAIT, &mut [&mut w1], "first half");
    w1.stop(STOP).expect("the first worker stops cleanly");
    assert_eq!(w1.records_out(), HALF as u64, "{}", w1.summary());

    dep.produce(&orders[HALF..]);
    let mut w2 = dep.start("w2");
    s.wait_for(ORDERS, WAIT, &mut [&mut w2], "second half");
    w2.stop(STOP).expect("the second worker stops cleanly");
    s.drain();
    s.assert_each_screened_once(&orders);

    // The second worker processed only the second half afresh: the window it judged by
    // came from the changelog, not from replaying the first half.
    assert_eq!(
        w2.records_in() - w2.duplicates(),
        HALF as u64,
        "{}",
        w2.summary()
    );
    assert_eq!(w2.records_out(), HALF as u64, "{}", w2.summary());
    for (n, i) in bursty.iter().enumerate() {
        let sc = s.of(&orders[*i].order_id);
        if n < 2 {
            assert_eq!(
                (sc.decision, sc.reasons.as_slice()),
                (ScreeningDecision::Approved, &[][..]),
                "order {} of {BURSTY} is within the limit",
                n + 1
            );
        } else {
            let expected = format!("velocity: {} orders within 3600s exceeds 2", n + 1);
            assert_eq!(
                (sc.decision, sc.reasons.clone()),
                (ScreeningDecision::Rejected, vec![expected]),
                "order {} of {BURSTY} (screened by the second worker) must count the first worker's orders",
                n + 1
            );
        }
    }
    let others: Vec<TestOrder> = orders
        .iter()
        .filter(|o| o.customer_id != BURSTY)
        .cloned()
        .collect();
    assert_all_approved(&s, &others);
}

/// Runs a worker under `exactly_once` against `brokers` and returns how it ended.
fn run_exactly_once_against(brokers: &str, name: &str) -> Result<(), RuntimeError> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let settings = Settings {
        brokers: brokers.to_owned(),
        topic_prefix: format!("t{id}."),
        guarantee: Guarantee::ExactlyOnce,
        group_prefix: format!("g{id}"),
        instance_id: format!("{name}-w1"),
        http_addr: "127.0.0.1:0".into(),
        ..Settings::default()
    };
    let token = CancellationToken::new();
    let handle = runtime::spawn(
        FraudStage::new(settings.fraud.clone()),
        settings,
        Metrics::new(),
        Arc::new(SystemClock),
        token.clone(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !handle.is_finished() {
        if Instant::now() > deadline {
            token.cancel();
            panic!(
                "a worker with guarantee exactly_once against {brokers} (no transactions) neither failed nor stopped within 60 s"
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    handle.join().expect("the worker thread does not panic")
}

fn assert_refuses_transactions(result: Result<(), RuntimeError>, brokers: &str) {
    match result {
        Err(e @ RuntimeError::TransactionsUnsupported { .. }) => {
            let message = e.to_string();
            eprintln!("refused as expected: {message}");
            assert!(
                message.contains("ORDERFLOW_GUARANTEE=at_least_once"),
                "the error must say how to fix it: {message}"
            );
            assert!(
                message.contains(brokers),
                "the error must name the brokers: {message}"
            );
        }
        other => panic!("expected RuntimeError::TransactionsUnsupported, got {other:?}"),
    }
}

/// The real test broker (nisshi) refuses transactional producers: the worker stops
/// with an error that says to use `at_least_once`.
#[test]
fn exactly_once_refuses_a_broker_without_transactions() {
    let brokers = match std::env::var("ORDERFLOW_TEST_BROKERS") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "ORDERFLOW_TEST_BROKERS is not set: this test needs the real test broker (nisshi), \
             which refuses transactions. Run `bash scripts/test.sh`, which starts nisshi and \
             sets it, or start `nisshi broker --listener-url tcp://127.0.0.1:PORT \
             --advertised-listener-url tcp://127.0.0.1:PORT --storage-engine memory://tansu/` \
             and export ORDERFLOW_TEST_BROKERS=127.0.0.1:PORT."
        ),
    };
    assert_refuses_transactions(run_exactly_once_against(&brokers, "nisshi"), &brokers);
}

/// The same refusal on the mock with the transactional APIs switched off, so the check
/// also runs without the real broker's particular refusal.
#[test]
fn exactly_once_refuses_a_mock_broker_without_transaction_apis() {
    let dep = Deployment::new("no-txn", lenient_fraud());
    for api in [
        RDKafkaApiKey::InitProducerId,
        RDKafkaApiKey::AddPartitionsToTxn,
        RDKafkaApiKey::AddOffsetsToTxn,
        RDKafkaApiKey::EndTxn,
        RDKafkaApiKey::TxnOffsetCommit,
    ] {
        dep.mock
            .apiversion(api, None, None)
            .unwrap_or_else(|e| panic!("disabling {api:?} on the mock: {e}"));
    }
    let brokers = dep.settings.brokers.clone();
    let started = Instant::now();
    assert_refuses_transactions(run_exactly_once_against(&brokers, "no-txn"), &brokers);
    eprintln!("refused after {:?}", started.elapsed());
}

/// A worker fenced mid-stream whose new producer is fenced again (another incarnation with
/// the same instance ID holds the transactional ID) stops with an error that says so —
/// not with advice to give up transactions.
#[test]
fn a_rebuild_that_is_fenced_again_names_the_instance_id() {
    const WARM_UP: usize = 20;
    let dep = Deployment::new("fenced-twice", lenient_fraud());
    let orders = TestOrder::batch("fenced-twice", 40, 4);
    dep.produce(&orders[..WARM_UP]);
    let mut w = dep.start("w1");
    let mut s = Screenings::new(&dep);
    s.wait_for(WARM_UP, WAIT, &mut [&mut w], "warm-up");
    dep.mock.request_errors(
        RDKafkaApiKey::InitProducerId,
        &[RD_KAFKA_RESP_ERR_PRODUCER_FENCED],
    );
    dep.mock
        .request_errors(RDKafkaApiKey::EndTxn, &[RD_KAFKA_RESP_ERR_PRODUCER_FENCED]);
    dep.produce(&orders[WARM_UP..]);
    match w.join(WAIT) {
        Err(RuntimeError::ProducerInit {
            transactional_id,
            source,
        }) => {
            assert!(
                transactional_id.ends_with(".fraud.fenced-twice-w1"),
                "{transactional_id}"
            );
            let message = RuntimeError::ProducerInit {
                transactional_id,
                source,
            }
            .to_string();
            assert!(message.contains("ORDERFLOW_INSTANCE_ID"), "{message}");
            assert!(!message.contains("at_least_once"), "{message}");
        }
        other => panic!("expected ProducerInit after a fenced rebuild, got {other:?}"),
    }
    assert_eq!(w.producer_rebuilds(), 1, "{}", w.summary());
}
