//! The changelog protocol against an in-memory log: batches, crashes that cut them off,
//! claims, stale writers, compaction and the bounded dedup window.

use super::*;

type Ps = PartitionState<i64>;

/// Key, value, sequence number and generation of one record.
type Record = (String, Option<Vec<u8>>, u64, Option<u64>);

/// One changelog partition: records in log order.
#[derive(Default, Clone)]
struct Log {
    records: Vec<Record>,
}

impl Log {
    fn append(&mut self, records: &[ChangelogRecord], generation: u64) {
        for r in records {
            self.records
                .push((r.key.clone(), r.value.clone(), r.seq, Some(generation)));
        }
    }

    /// Appends a claim; returns its generation.
    fn claim(&mut self, generation: u64) -> u64 {
        let c = claim_record(generation, "w");
        self.records.push((c.key, c.value, 0, Some(generation)));
        generation
    }

    /// Restores into memory and into a state file whose cache keeps nothing; both must
    /// agree. Returns the one on a file, so that later batches go through the file too.
    fn restore(&self, generation: u64) -> Result<Ps, ChangelogError> {
        let dir = std::env::temp_dir().join("orderflow-changelog-tests");
        let disk = Disk::create(&dir, "restore").expect("creating a state file");
        let mut in_memory = Restorer::default();
        let mut on_disk = Restorer::with_disk(disk);
        for (offset, (k, v, seq, g)) in self.records.iter().enumerate() {
            in_memory.push(offset as i64, k, v.as_deref(), Some(*seq), *g)?;
            on_disk.push(offset as i64, k, v.as_deref(), Some(*seq), *g)?;
        }
        let memory: Ps = in_memory.finish(0, generation, 1_000, 0)?;
        let file: Ps = on_disk.finish(0, generation, 1_000, 0)?;
        assert_eq!(memory.state.scan(""), file.state.scan(""));
        assert_eq!(memory.timers.scan(""), file.timers.scan(""));
        assert_eq!(memory.state.len(), file.state.len());
        assert_eq!(memory.timers.len(), file.timers.len());
        assert_eq!(memory.repairs, file.repairs);
        assert_eq!(memory.retired, file.retired);
        assert_eq!(memory.next_seq, file.next_seq);
        Ok(file)
    }

    /// What compaction may leave: the newest record of every key, in log order.
    fn compacted(&self) -> Log {
        let mut last: HashMap<&str, usize> = HashMap::new();
        for (i, (k, ..)) in self.records.iter().enumerate() {
            last.insert(k, i);
        }
        Log {
            records: self
                .records
                .iter()
                .enumerate()
                .filter(|(i, (k, ..))| last[k.as_str()] == *i)
                .map(|(_, r)| r.clone())
                .collect(),
        }
    }
}

/// Writes one batch of `ps` whole and marks it committed.
fn commit(ps: &mut Ps, log: &mut Log) {
    let batch = ps.pending_records(&[]);
    log.append(&batch.records, ps.generation);
    ps.committed(&batch, Vec::new());
}

fn out(n: u8) -> Out {
    Out {
        topic: "order.screened".into(),
        partition: 0,
        key: b"store-1".to_vec(),
        payload: Some(vec![n; 3]),
        headers: vec![("event-type".into(), b"OrderScreened".to_vec())],
    }
}

#[test]
fn committed_batches_restore() -> Result<(), ChangelogError> {
    let mut log = Log::default();
    let g = log.claim(7);
    let mut ps = log.restore(g)?;
    ps.state.insert("a", 1);
    ps.positions.insert("order.created".to_string(), 10);
    ps.seen.insert(id_bits("e1"));
    commit(&mut ps, &mut log);
    ps.state.insert("a", 2);
    ps.state.remove("a");
    ps.state.insert("b", 3);
    ps.positions.insert("order.created".to_string(), 12);
    commit(&mut ps, &mut log);
    let mut back = log.restore(g)?;
    assert_eq!(back.state.get("a"), None);
    assert_eq!(back.state.get("b"), Some(&3));
    assert_eq!(back.positions.get("order.created"), Some(&12));
    assert!(back.seen.contains(id_bits("e1")));
    assert_eq!(back.next_seq, 3);
    assert!(back.repairs.is_empty());
    Ok(())
}

#[test]
fn a_batch_cut_off_before_its_marker_is_left_out_then_rewritten() -> Result<(), ChangelogError> {
    let mut log = Log::default();
    let g1 = log.claim(1);
    let mut ps = log.restore(g1)?;
    ps.state.insert("stock", 10);
    commit(&mut ps, &mut log);
    ps.state.insert("stock", 7);
    ps.state.insert("reservation", 3);
    let batch = ps.pending_records(&[out(1)]);
    // A crash after two records of the second batch reached the log.
    log.append(&batch.records[..2], g1);
    let g2 = log.claim(2);
    let mut back = log.restore(g2)?;
    assert_eq!(back.state.get("stock"), Some(&10));
    assert_eq!(back.state.get("reservation"), None);
    assert!(
        back.outbox.is_empty(),
        "a cut-off batch's outputs never show"
    );
    // The next batch rewrites the cut-off keys with their committed values, and no abort
    // record is needed: the rewrite supersedes them, before and after compaction.
    let repair = back.pending_records(&[]);
    for r in &batch.records[..2] {
        let rewritten = repair
            .records
            .iter()
            .find(|x| x.key == r.key)
            .expect("rewritten");
        let committed = if r.key == "s/stock" {
            Some(b"10".to_vec())
        } else {
            None
        };
        assert_eq!(rewritten.value, committed, "{}", r.key);
    }
    assert!(repair.records.iter().all(|r| !r.key.starts_with("abort/")));
    log.append(&repair.records, g2);
    back.committed(&repair, Vec::new());
    for view in [log.clone(), log.compacted()] {
        let mut again = view.restore(g2)?;
        assert_eq!(again.state.get("stock"), Some(&10));
        assert_eq!(again.state.get("reservation"), None);
        assert!(again.repairs.is_empty());
    }
    Ok(())
}

#[test]
fn a_failed_write_restored_from_the_log_keeps_the_committed_values() -> Result<(), ChangelogError> {
    // The batch's records all reached the log but the worker saw an error: it restores
    // (with a new claim) instead of trusting its rollback, and the keys are rewritten.
    let mut log = Log::default();
    let g1 = log.claim(1);
    let mut ps = log.restore(g1)?;
    ps.state.insert("a", 1);
    commit(&mut ps, &mut log);
    ps.state.insert("a", 2);
    let attempt = ps.pending_records(&[]);
    log.append(&attempt.records[..attempt.records.len() - 1], g1);
    let g2 = log.claim(2);
    let mut back = log.restore(g2)?;
    assert_eq!(back.state.get("a"), Some(&1));
    let next = back.pending_records(&[]);
    assert!(
        next.records
            .iter()
            .any(|r| r.key == "s/a" && r.value == Some(b"1".to_vec()))
    );
    log.append(&next.records, g2);
    back.committed(&next, Vec::new());
    assert_eq!(log.compacted().restore(g2)?.state.get("a"), Some(&1));
    Ok(())
}

#[test]
fn a_fenced_writers_records_after_a_claim_are_ignored_and_rewritten() -> Result<(), ChangelogError>
{
    let mut log = Log::default();
    let old = log.claim(1);
    let mut zombie = log.restore(old)?;
    zombie.state.insert("stock", 10);
    commit(&mut zombie, &mut log);
    // A new owner claims; the old one, expelled but unaware, commits a whole batch after.
    let new = log.claim(2);
    zombie.state.insert("stock", 3);
    let stale = zombie.pending_records(&[out(9)]);
    log.append(&stale.records, old);
    let mut owner = log.restore(new)?;
    assert_eq!(owner.state.get("stock"), Some(&10));
    assert!(
        owner.outbox.is_empty(),
        "a stale batch's outputs are never re-sent"
    );
    let first = owner.pending_records(&[]);
    log.append(&first.records, new);
    owner.committed(&first, Vec::new());
    for view in [log.clone(), log.compacted()] {
        let mut again = view.restore(new)?;
        assert_eq!(again.state.get("stock"), Some(&10));
        assert!(again.outbox.is_empty());
    }
    Ok(())
}

#[test]
fn earlier_claims_and_markers_are_retired_after_the_first_commit() -> Result<(), ChangelogError> {
    let mut log = Log::default();
    let mut generation = 0;
    for g in 1..=5 {
        generation = log.claim(g);
        let mut ps = log.restore(generation)?;
        ps.state.insert(format!("k{g}"), g as i64);
        commit(&mut ps, &mut log);
        ps.state.insert(format!("k{g}"), g as i64 + 100);
        commit(&mut ps, &mut log);
    }
    let compacted = log.compacted();
    let live: Vec<&str> = compacted
        .records
        .iter()
        .filter(|(_, v, ..)| v.is_some())
        .map(|(k, ..)| k.as_str())
        .filter(|k| k.starts_with("claim/") || k.starts_with("commit/"))
        .collect();
    assert_eq!(live, vec!["claim/5", "commit/5"]);
    let mut back = compacted.restore(generation)?;
    assert_eq!(back.state.len(), 5);
    assert_eq!(back.state.get("k1"), Some(&101));
    Ok(())
}

#[test]
fn the_outbox_survives_a_restore_until_it_is_sent() -> Result<(), ChangelogError> {
    let mut log = Log::default();
    let g = log.claim(1);
    let mut ps = log.restore(g)?;
    ps.state.insert("a", 1);
    let batch = ps.pending_records(&[out(1), out(2)]);
    log.append(&batch.records, g);
    ps.committed(&batch, vec![out(1), out(2)]);
    // A crash before the outputs were acknowledged: the next owner has them, byte for byte.
    let g2 = log.claim(2);
    let mut back = log.restore(g2)?;
    assert_eq!(
        back.outbox.values().next().map(|(o, _)| o.clone()),
        Some(vec![out(1), out(2)])
    );
    back.outbox_sent();
    let next = back.pending_records(&[]);
    log.append(&next.records, g2);
    back.committed(&next, Vec::new());
    assert!(log.restore(3)?.outbox.is_empty());
    Ok(())
}

#[test]
fn the_dedup_window_is_bounded_in_memory_and_in_the_log() -> Result<(), ChangelogError> {
    let mut log = Log::default();
    let g = log.claim(1);
    let mut ps = log.restore(g)?;
    for batch in 0..50 {
        for i in 0..100 {
            ps.seen.insert(id_bits(&format!("e-{batch}-{i}")));
        }
        commit(&mut ps, &mut log);
    }
    // Capacity 1,000 (see Log::restore): the newest ten batches stay.
    assert_eq!(ps.seen.len(), 1_000);
    assert!(ps.seen.contains(id_bits("e-49-0")));
    assert!(ps.seen.contains(id_bits("e-40-99")));
    assert!(!ps.seen.contains(id_bits("e-39-99")));
    let back = log.compacted().restore(g)?;
    assert_eq!(back.seen.len(), 1_000);
    let live_windows = log
        .compacted()
        .records
        .iter()
        .filter(|(k, v, ..)| k.starts_with("d/") && v.is_some())
        .count();
    assert_eq!(live_windows, 10);
    Ok(())
}

#[test]
fn records_without_seq_are_rejected() {
    let mut r = Restorer::default();
    assert!(matches!(
        r.push(0, "s/x", Some(b"1"), None, Some(1)),
        Err(ChangelogError::MissingSeq { .. })
    ));
}

#[test]
fn recorded_outcomes_survive_a_restore_until_reacted_to() -> Result<(), ChangelogError> {
    use crate::stages::{Effect, EffectOutcome};
    let mut log = Log::default();
    let g = log.claim(1);
    let mut ps = log.restore(g)?;
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
    commit(&mut ps, &mut log);
    assert_eq!(log.restore(g)?.outcomes.get("k#2"), Some(&outcome));
    ps.outcomes.remove("k#2");
    commit(&mut ps, &mut log);
    assert!(log.restore(g)?.outcomes.is_empty());
    Ok(())
}

#[test]
fn a_marker_whose_batch_lost_a_record_commits_nothing() -> Result<(), ChangelogError> {
    let mut log = Log::default();
    let g = log.claim(1);
    let mut ps = log.restore(g)?;
    ps.state.insert("a", 1);
    commit(&mut ps, &mut log);
    ps.state.insert("a", 2);
    ps.state.insert("b", 2);
    let batch = ps.pending_records(&[out(1)]);
    // The broker refused one record (too large) and took the rest, marker included.
    let mut landed = batch.records.clone();
    landed.remove(1);
    log.append(&landed, g);
    let mut back = log.restore(log.clone().claim(2))?;
    assert_eq!(back.state.get("a"), Some(&1));
    assert_eq!(back.state.get("b"), None);
    assert!(back.outbox.is_empty());
    Ok(())
}

/// A transactional writer's batch whose transaction is aborted: written whole (a broker
/// that leaks aborted records shows it), then forgotten by the writer.
fn abort(ps: &mut Ps, log: &mut Log) {
    let batch = ps.pending_records(&[]);
    log.append(&batch.records, 0);
    ps.aborted(&batch);
}

/// Restores `log` as the transactional writer does, with what the group committed.
fn restore_transactional(log: &Log, committed: Option<Committed>) -> Result<Ps, ChangelogError> {
    let mut r = Restorer::default().transactional();
    for (offset, (k, v, seq, g)) in log.records.iter().enumerate() {
        r.push(offset as i64, k, v.as_deref(), Some(*seq), *g)?;
    }
    r.vouch(committed);
    r.finish(0, 0, 1_000, 0)
}

fn offsets(position: i64) -> Committed {
    Committed {
        offsets: [("order.created".to_string(), Some(position))].into(),
        batch: None,
    }
}

#[test]
fn aborted_transactions_batches_are_left_out_on_restore() -> Result<(), ChangelogError> {
    const IN: &str = "order.created";
    let mut log = Log::default();
    let mut ps = Ps::new(1_000);
    ps.state.insert("stock", 10);
    ps.positions.insert(IN.to_string(), 5);
    commit(&mut ps, &mut log); // 1, committed
    ps.state.insert("stock", 9);
    ps.state.insert("reservation", 1);
    ps.positions.insert(IN.to_string(), 6);
    abort(&mut ps, &mut log); // 2, aborted
    ps.state.insert("stock", 8);
    ps.positions.insert(IN.to_string(), 6);
    commit(&mut ps, &mut log); // 3, the same inputs done again, follows 1
    ps.state.insert("stock", 7);
    ps.positions.insert(IN.to_string(), 7);
    abort(&mut ps, &mut log); // 4, aborted, the last batch

    // The group's offsets are where batch 3 left them: batch 4 did not commit either.
    let mut back = restore_transactional(&log, Some(offsets(6)))?;
    assert_eq!(back.state.get("stock"), Some(&8));
    assert_eq!(back.state.get("reservation"), None);
    assert_eq!(back.positions.get(IN), Some(&6));
    assert_eq!((back.last_seq, back.next_seq), (3, 5));
    // What the aborted batches wrote is rewritten by the next commit.
    assert_eq!(back.repairs.get("s/reservation"), Some(&None));
    assert_eq!(
        back.repairs.get("s/stock").map(|v| v.as_deref()),
        Some(Some(&b"8"[..]))
    );
    assert!(!back.repairs.keys().any(|k| k.starts_with(COMMIT_PREFIX)));

    // Offsets committed with batch 4, or offsets that cannot be read: batch 4 counts.
    // Batch 2 stays out: batch 3 does not follow it.
    for committed in [Some(offsets(7)), None] {
        let mut back = restore_transactional(&log, committed.clone())?;
        assert_eq!(back.state.get("stock"), Some(&7), "{committed:?}");
        assert_eq!(back.state.get("reservation"), None, "{committed:?}");
        assert_eq!(back.last_seq, 4, "{committed:?}");
    }
    // A broker that keeps no transactional offsets says nothing about batch 4.
    let none = Committed {
        offsets: [(IN.to_string(), None)].into(),
        batch: None,
    };
    assert_eq!(
        restore_transactional(&log, Some(none))?.state.get("stock"),
        Some(&7)
    );
    Ok(())
}

/// A last batch that moved no input (a reaction to a recorded call, a timer's) cannot be
/// judged by the positions; the sequence number the group committed decides it.
#[test]
fn the_committed_batch_number_decides_a_last_batch_that_moved_no_input()
-> Result<(), ChangelogError> {
    const IN: &str = "order.created";
    let mut log = Log::default();
    let mut ps = Ps::new(1_000);
    ps.state.insert("payment", 1);
    ps.positions.insert(IN.to_string(), 5);
    commit(&mut ps, &mut log); // 1, committed
    ps.state.insert("payment", 2);
    abort(&mut ps, &mut log); // 2, aborted, moved no input

    // By the positions alone, batch 2 is taken for committed.
    let mut back = restore_transactional(&log, Some(offsets(5)))?;
    assert_eq!(back.state.get("payment"), Some(&2));

    // The group committed batch 1 last: batch 2 is left out and its key rewritten.
    let mut committed = offsets(5);
    committed.batch = Some(1);
    let mut back = restore_transactional(&log, Some(committed.clone()))?;
    assert_eq!(back.state.get("payment"), Some(&1));
    assert_eq!((back.last_seq, back.next_seq), (1, 3));
    assert_eq!(
        back.repairs.get("s/payment").map(|v| v.as_deref()),
        Some(Some(&b"1"[..]))
    );

    // Committed with batch 2.
    committed.batch = Some(2);
    let mut back = restore_transactional(&log, Some(committed))?;
    assert_eq!(back.state.get("payment"), Some(&2));
    assert_eq!(back.last_seq, 2);
    Ok(())
}

#[test]
fn a_replay_request_is_taken_once_by_the_next_owner_and_retired() -> Result<(), ChangelogError> {
    let mut log = Log::default();
    let g = log.claim(1);
    let mut ps = log.restore(g)?;
    ps.positions.insert("order.created".to_string(), 10);
    commit(&mut ps, &mut log);
    // The stage is stopped; an operator asks for offset 2.
    let r = replay_request("order.created", 2);
    log.records.push((r.key, r.value, 0, None));
    let g = log.claim(2);
    let mut ps = log.restore(g)?;
    assert_eq!(ps.positions.get("order.created"), Some(&2));
    // Its first batch commits the moved position (inputs 2..4 done again).
    ps.positions.insert("order.created".to_string(), 4);
    commit(&mut ps, &mut log);
    // A restore now continues from the state, not from the request again.
    let mut other = log.clone();
    let g3 = other.claim(3);
    assert_eq!(other.restore(g3)?.positions.get("order.created"), Some(&4));
    // Owner 2's second batch retires the request.
    ps.state.insert("k", 1);
    commit(&mut ps, &mut log);
    let mut compacted = log.compacted();
    assert!(
        compacted
            .records
            .iter()
            .any(|(k, v, ..)| k == "replay/order.created" && v.is_none())
    );
    let g4 = compacted.claim(4);
    let back = compacted.restore(g4)?;
    assert_eq!(back.positions.peek("order.created"), Some(&4));
    assert!(back.retired.iter().all(|k| !k.starts_with("replay/")));
    Ok(())
}

#[test]
fn a_replay_request_written_before_any_batch_is_taken() -> Result<(), ChangelogError> {
    let mut log = Log::default();
    let r = replay_request("order.created", 3);
    log.records.push((r.key, r.value, 0, None));
    let g = log.claim(1);
    let mut ps = log.restore(g)?;
    assert_eq!(ps.positions.get("order.created"), Some(&3));
    Ok(())
}
