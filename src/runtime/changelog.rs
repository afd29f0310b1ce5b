//! A partition's state and its changelog: how state is written at commit and rebuilt on
//! assignment.
//!
//! Every batch that changes state writes its entries (tagged with the batch's sequence
//! number in the `orderflow.seq` header) and then one `commit` marker. A batch counts only
//! if its marker was written: without transactions (`at_least_once`) a crash can cut a
//! batch's entries short, and restoring half a batch would apply an input's effects
//! partially. The next owner writes an `abort/<seq>` record for every cut-off batch it
//! finds and rewrites the committed values of the keys that batch touched, so that the
//! newest record of every key is committed again before compaction can matter.
//!
//! Invariant: the restored state equals the state after the last committed batch.

use std::collections::{BTreeSet, HashSet};

use serde::{Serialize, de::DeserializeOwned};

use super::effects::RecordedOutcome;
use crate::stages::{Store, Timer};

pub const SEQ_HEADER: &str = "orderflow.seq";
const COMMIT_KEY: &str = "commit";
const ABORT_PREFIX: &str = "abort/";
const STATE_PREFIX: &str = "s/";
const SEEN_PREFIX: &str = "d/";
const TIMER_PREFIX: &str = "t/";
const OUTCOME_PREFIX: &str = "e/";

#[derive(Debug, thiserror::Error)]
pub enum ChangelogError {
    #[error("changelog record {key:?} has no valid `{SEQ_HEADER}` header")]
    MissingSeq { key: String },
    #[error("changelog record {key:?} cannot be read as this stage's state: {message}")]
    Value { key: String, message: String },
    #[error("changelog record key {0:?} is not an OrderFlow state key")]
    UnknownKey(String),
}

/// One record to write to (or read from) a changelog partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangelogRecord {
    pub key: String,
    /// `None` is a tombstone.
    pub value: Option<Vec<u8>>,
    pub seq: u64,
}

/// Everything a stage keeps per partition, plus what the runtime keeps beside it.
#[derive(Debug)]
pub struct PartitionState<V> {
    pub state: Store<V>,
    /// Input event IDs already processed, with the wall-clock time they were seen.
    pub seen: Store<i64>,
    pub timers: Store<Timer>,
    /// Outcomes of external calls the stage has not reacted to yet, by call ID.
    pub outcomes: Store<RecordedOutcome>,
    /// Sequence number of the next batch written to the changelog.
    pub next_seq: u64,
    /// Batches whose entries may be in the changelog without a commit marker; each gets
    /// an abort record before the next commit.
    pub pending_aborts: BTreeSet<u64>,
    /// When the dedup memory was last pruned.
    pub last_prune: i64,
}

impl<V> Default for PartitionState<V> {
    fn default() -> Self {
        PartitionState {
            state: Store::default(),
            seen: Store::default(),
            timers: Store::default(),
            outcomes: Store::default(),
            next_seq: 1,
            pending_aborts: BTreeSet::new(),
            last_prune: 0,
        }
    }
}

impl<V: Serialize + DeserializeOwned + Clone> PartitionState<V> {
    pub fn has_changes(&self) -> bool {
        self.state.has_changes()
            || self.seen.has_changes()
            || self.timers.has_changes()
            || self.outcomes.has_changes()
            || !self.pending_aborts.is_empty()
    }

    /// The records this batch must write, in order: aborts, entries, then the commit
    /// marker. Empty when nothing changed. Changes nothing: call [`Self::committed`] once
    /// the records are durable, or [`Self::failed`].
    pub fn pending_records(&self) -> Vec<ChangelogRecord> {
        if !self.has_changes() {
            return Vec::new();
        }
        let seq = self.next_seq;
        let mut out: Vec<ChangelogRecord> = self
            .pending_aborts
            .iter()
            .map(|s| ChangelogRecord {
                key: format!("{ABORT_PREFIX}{s}"),
                value: Some(Vec::new()),
                seq: *s,
            })
            .collect();
        let json = |v: &dyn erased::Json| v.to_json();
        for (k, v) in self.state.changes() {
            out.push(ChangelogRecord {
                key: format!("{STATE_PREFIX}{k}"),
                value: v.as_ref().map(|v| json(v)),
                seq,
            });
        }
        for (k, v) in self.seen.changes() {
            out.push(ChangelogRecord {
                key: format!("{SEEN_PREFIX}{k}"),
                value: v.as_ref().map(|v| json(v)),
                seq,
            });
        }
        for (k, v) in self.timers.changes() {
            out.push(ChangelogRecord {
                key: format!("{TIMER_PREFIX}{k}"),
                value: v.as_ref().map(|v| json(v)),
                seq,
            });
        }
        for (k, v) in self.outcomes.changes() {
            out.push(ChangelogRecord {
                key: format!("{OUTCOME_PREFIX}{k}"),
                value: v.as_ref().map(|v| json(v)),
                seq,
            });
        }
        out.push(ChangelogRecord {
            key: COMMIT_KEY.into(),
            value: Some(seq.to_string().into_bytes()),
            seq,
        });
        out
    }

    /// The records of the last `pending_records` are durable.
    pub fn committed(&mut self) {
        self.state.commit();
        self.seen.commit();
        self.timers.commit();
        self.outcomes.commit();
        self.pending_aborts.clear();
        self.next_seq += 1;
    }

    /// Writing `records` failed part-way (or its outcome is unknown): the batch is
    /// aborted. State rolls back to the last commit; the touched keys are rewritten at
    /// the next commit, after an abort record for this batch.
    pub fn failed(&mut self, records: &[ChangelogRecord]) {
        self.rollback();
        if records.is_empty() {
            return;
        }
        self.pending_aborts.insert(self.next_seq);
        self.next_seq += 1;
        for r in records {
            self.mark_repair(&r.key);
        }
    }

    /// Forgets every change since the last commit (a batch that was never written).
    pub fn rollback(&mut self) {
        self.state.rollback();
        self.seen.rollback();
        self.timers.rollback();
        self.outcomes.rollback();
    }

    fn mark_repair(&mut self, key: &str) {
        if let Some(k) = key.strip_prefix(STATE_PREFIX) {
            self.state.mark_dirty(k.to_owned());
        } else if let Some(k) = key.strip_prefix(SEEN_PREFIX) {
            self.seen.mark_dirty(k.to_owned());
        } else if let Some(k) = key.strip_prefix(TIMER_PREFIX) {
            self.timers.mark_dirty(k.to_owned());
        } else if let Some(k) = key.strip_prefix(OUTCOME_PREFIX) {
            self.outcomes.mark_dirty(k.to_owned());
        }
    }

    /// Drops dedup entries seen before `before` (wall-clock ms); returns how many.
    pub fn prune_seen(&mut self, before: i64) -> usize {
        let old: Vec<String> = self
            .seen
            .iter()
            .filter(|(_, at)| **at < before)
            .map(|(k, _)| k.clone())
            .collect();
        for k in &old {
            self.seen.remove(k);
        }
        old.len()
    }
}

/// Small helper so the three stores share one JSON encoder.
mod erased {
    pub trait Json {
        fn to_json(&self) -> Vec<u8>;
    }
    impl<T: serde::Serialize> Json for T {
        fn to_json(&self) -> Vec<u8> {
            serde_json::to_vec(self).expect("state values serialize to JSON")
        }
    }
}

/// A changelog value as the type its key's prefix says; a tombstone is `None`.
fn decode<T: DeserializeOwned>(r: &ChangelogRecord) -> Result<Option<T>, ChangelogError> {
    r.value
        .as_deref()
        .map(serde_json::from_slice)
        .transpose()
        .map_err(|e| ChangelogError::Value {
            key: r.key.clone(),
            message: e.to_string(),
        })
}

/// Rebuilds a partition's state from its changelog, read in log order.
#[derive(Debug, Default)]
pub struct Restorer {
    entries: Vec<ChangelogRecord>,
    max_commit: u64,
    aborted: HashSet<u64>,
    max_seq: u64,
}

impl Restorer {
    pub fn push(
        &mut self,
        key: &str,
        value: Option<&[u8]>,
        seq: Option<u64>,
    ) -> Result<(), ChangelogError> {
        let seq = seq.ok_or_else(|| ChangelogError::MissingSeq {
            key: key.to_owned(),
        })?;
        self.max_seq = self.max_seq.max(seq);
        if key == COMMIT_KEY {
            self.max_commit = self.max_commit.max(seq);
        } else if let Some(s) = key.strip_prefix(ABORT_PREFIX) {
            let s = s
                .parse()
                .map_err(|_| ChangelogError::UnknownKey(key.to_owned()))?;
            self.aborted.insert(s);
        } else {
            self.entries.push(ChangelogRecord {
                key: key.to_owned(),
                value: value.map(<[u8]>::to_vec),
                seq,
            });
        }
        Ok(())
    }

    /// The committed state. Entries of batches without a commit marker are left out; their
    /// batches are queued for abort and their keys for rewriting.
    pub fn finish<V: Serialize + DeserializeOwned + Clone>(
        self,
    ) -> Result<PartitionState<V>, ChangelogError> {
        let mut ps = PartitionState::<V>::default();
        let mut repair = Vec::new();
        for r in self.entries {
            if r.seq > self.max_commit || self.aborted.contains(&r.seq) {
                if !self.aborted.contains(&r.seq) {
                    ps.pending_aborts.insert(r.seq);
                }
                repair.push(r.key);
                continue;
            }
            if let Some(k) = r.key.strip_prefix(STATE_PREFIX) {
                ps.state.load(k.to_owned(), decode(&r)?);
            } else if let Some(k) = r.key.strip_prefix(SEEN_PREFIX) {
                ps.seen.load(k.to_owned(), decode(&r)?);
            } else if let Some(k) = r.key.strip_prefix(TIMER_PREFIX) {
                ps.timers.load(k.to_owned(), decode(&r)?);
            } else if let Some(k) = r.key.strip_prefix(OUTCOME_PREFIX) {
                ps.outcomes.load(k.to_owned(), decode(&r)?);
            } else {
                return Err(ChangelogError::UnknownKey(r.key));
            }
        }
        for key in repair {
            ps.mark_repair(&key);
        }
        ps.next_seq = self.max_seq.max(self.max_commit) + 1;
        Ok(ps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type Ps = PartitionState<i64>;

    fn replay(records: &[ChangelogRecord]) -> Result<Ps, ChangelogError> {
        let mut r = Restorer::default();
        for rec in records {
            r.push(&rec.key, rec.value.as_deref(), Some(rec.seq))?;
        }
        r.finish()
    }

    #[test]
    fn committed_batches_restore() -> Result<(), ChangelogError> {
        let mut ps = Ps::default();
        ps.state.insert("a", 1);
        ps.seen.insert("e1", 100);
        let mut log = ps.pending_records();
        ps.committed();
        ps.state.insert("a", 2);
        ps.state.remove("a");
        ps.state.insert("b", 3);
        log.extend(ps.pending_records());
        ps.committed();
        let back = replay(&log)?;
        assert_eq!(back.state.get("a"), None);
        assert_eq!(back.state.get("b"), Some(&3));
        assert_eq!(back.seen.get("e1"), Some(&100));
        assert_eq!(back.next_seq, 3);
        assert!(back.pending_aborts.is_empty());
        Ok(())
    }

    #[test]
    fn a_batch_cut_off_before_its_marker_is_discarded_then_repaired() -> Result<(), ChangelogError>
    {
        let mut ps = Ps::default();
        ps.state.insert("stock", 10);
        let mut log = ps.pending_records();
        ps.committed();
        ps.state.insert("stock", 7);
        ps.state.insert("reservation", 3);
        ps.seen.insert("e2", 5);
        let batch = ps.pending_records();
        // Crash after one entry of the second batch reached the log.
        let cut = batch.iter().find(|r| r.key == "s/stock").unwrap().clone();
        log.push(cut.clone());
        let mut back = replay(&log)?;
        assert_eq!(back.state.get("stock"), Some(&10));
        assert_eq!(back.state.get("reservation"), None);
        assert_eq!(back.pending_aborts, BTreeSet::from([2]));
        // The next batch aborts seq 2 and rewrites the cut-off key with its committed value.
        let repair = back.pending_records();
        assert_eq!(repair[0].key, "abort/2");
        assert!(
            repair
                .iter()
                .any(|r| r.key == cut.key && r.value == Some(b"10".to_vec()))
        );
        back.committed();
        log.extend(repair);
        let again = replay(&log)?;
        assert_eq!(again.state.get("stock"), Some(&10));
        assert!(again.pending_aborts.is_empty());
        assert_eq!(again.next_seq, 4);
        Ok(())
    }

    #[test]
    fn compaction_of_old_markers_keeps_committed_entries() -> Result<(), ChangelogError> {
        let mut ps = Ps::default();
        let mut log = Vec::new();
        for i in 0..5 {
            ps.state.insert(format!("k{i}"), i);
            log.extend(ps.pending_records());
            ps.committed();
        }
        // Compaction keeps only the newest `commit` record.
        let last_commit = log.iter().rposition(|r| r.key == COMMIT_KEY).unwrap();
        let compacted: Vec<_> = log
            .iter()
            .enumerate()
            .filter(|(i, r)| r.key != COMMIT_KEY || *i == last_commit)
            .map(|(_, r)| r.clone())
            .collect();
        let back = replay(&compacted)?;
        assert_eq!(back.state.len(), 5);
        Ok(())
    }

    #[test]
    fn failed_write_aborts_and_rewrites_on_the_next_commit() -> Result<(), ChangelogError> {
        let mut ps = Ps::default();
        ps.state.insert("a", 1);
        let mut log = ps.pending_records();
        ps.committed();
        ps.state.insert("a", 2);
        let attempt = ps.pending_records();
        log.extend(attempt.iter().cloned()); // written, but the outcome was an error
        ps.failed(&attempt);
        assert_eq!(ps.state.get("a"), Some(&1));
        let next = ps.pending_records();
        assert_eq!(next[0].key, "abort/2");
        ps.committed();
        log.extend(next);
        assert_eq!(replay(&log)?.state.get("a"), Some(&1));
        Ok(())
    }

    #[test]
    fn recorded_outcomes_survive_a_restore_until_reacted_to() -> Result<(), ChangelogError> {
        use crate::stages::{Effect, EffectOutcome};
        let mut ps = Ps::default();
        let effect = Effect::Authorize {
            idempotency_key: "k".into(),
            store_id: "s".into(),
            order_id: "o".into(),
            amount_cents: 1,
            currency: "USD".into(),
            attempt: 2,
        };
        let outcome = RecordedOutcome {
            order: 7,
            cause: None,
            effect: effect.clone(),
            outcome: EffectOutcome::Succeeded {
                reference: "a-1".into(),
            },
        };
        ps.outcomes.insert(effect.id(), outcome.clone());
        let mut log = ps.pending_records();
        ps.committed();
        assert_eq!(replay(&log)?.outcomes.get("k#2"), Some(&outcome));
        ps.outcomes.remove("k#2");
        log.extend(ps.pending_records());
        ps.committed();
        assert!(replay(&log)?.outcomes.is_empty());
        Ok(())
    }

    #[test]
    fn records_without_seq_are_rejected() {
        let mut r = Restorer::default();
        assert!(matches!(
            r.push("s/x", Some(b"1"), None),
            Err(ChangelogError::MissingSeq { .. })
        ));
    }
}
