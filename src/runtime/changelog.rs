//! A partition's state and its changelog: how state is written at commit and rebuilt on
//! assignment.
//!
//! A batch writes, to the changelog partition of its input partition, every changed key
//! (`s/` stage state, `t/` timers, `e/` recorded call outcomes, `p/` input positions), the
//! event IDs it processed (`d/<seq>`, the dedup window), under `at_least_once` its outputs
//! (`x/<seq>/<n>`, the outbox), and last a commit marker `commit/<gen>` whose value is
//! `<seq>:<records before it>`. Every record carries the batch's sequence number and the
//! writer's generation in headers.
//!
//! - **Cut-off batches.** Without transactions a crash can cut a batch short, and a broker
//!   can refuse one record of a batch and take the rest. Records after the last complete
//!   marker (one preceded by all the records it counts) are left out on restore, and the
//!   next owner rewrites those keys with their committed values in its first batch, so
//!   that the newest record of every key is a committed one again (compaction stays safe).
//!   No abort record is needed: once the rewrite is durable the cut-off records are
//!   superseded, and a later marker commits them together with their rewrite.
//! - **One writer.** Under `at_least_once` a new owner appends a claim `claim/<gen>` (a
//!   fresh random generation) before it reads the partition, and reads up to its claim.
//!   Records after a claim whose generation is not that claim's were written by a fenced
//!   writer (a member expelled from the group, late records of an old producer): restore
//!   ignores them and the owner rewrites their keys. The owner knows the offset of every
//!   record it writes, so a batch whose records do not directly follow its previous write
//!   reveals a foreign writer: the batch's outputs are withheld and the partition is
//!   restored again.
//! - **Outbox.** Under `at_least_once` a batch's outputs are in the changelog batch, and
//!   are sent only once the batch is durable; a new owner re-sends the outbox of committed
//!   batches before anything else. So every output visible downstream was decided by a
//!   committed batch, and a replay can only re-send it, never decide again.
//!
//! Invariant: the restored state equals the state after the last committed batch of the
//! current writer's history, and every record that disagrees with it is rewritten before
//! the next commit.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;

use serde::{Serialize, de::DeserializeOwned};

use super::effects::RecordedOutcome;
use super::outbox::{self, Out};
use crate::stages::{Disk, Store, Timer};

pub const SEQ_HEADER: &str = "orderflow.seq";
pub const GEN_HEADER: &str = "orderflow.gen";
const COMMIT_PREFIX: &str = "commit/";
const CLAIM_PREFIX: &str = "claim/";
const STATE_PREFIX: &str = "s/";
const TIMER_PREFIX: &str = "t/";
const OUTCOME_PREFIX: &str = "e/";
const POSITION_PREFIX: &str = "p/";
const SEEN_PREFIX: &str = "d/";
const OUTBOX_PREFIX: &str = "x/";
/// An operator's replay request (`orderflow replay`), outside any batch.
const REPLAY_PREFIX: &str = "replay/";

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

/// The claim record a new owner appends before reading a partition.
pub fn claim_record(generation: u64, writer: &str) -> ChangelogRecord {
    ChangelogRecord {
        key: format!("{CLAIM_PREFIX}{generation}"),
        value: Some(writer.as_bytes().to_vec()),
        seq: 0,
    }
}

/// The record by which an operator asks a stopped stage to continue input `base` (a
/// prefix-free topic) of this partition from `offset`: written to the changelog while no
/// worker owns the partition, outside any batch. The next owner's restore takes it if
/// no committed batch follows it (moving the position there, committed with its first
/// batch) and retires it; a request some committed batch follows was taken already.
pub fn replay_request(base: &str, offset: i64) -> ChangelogRecord {
    ChangelogRecord {
        key: format!("{REPLAY_PREFIX}{base}"),
        value: Some(offset.to_string().into_bytes()),
        seq: 0,
    }
}

/// Event IDs as 128-bit values: UUIDs as they are, any other string by its UUIDv5.
pub fn id_bits(event_id: &str) -> u128 {
    match uuid::Uuid::parse_str(event_id) {
        Ok(u) => u.as_u128(),
        Err(_) => uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, event_id.as_bytes()).as_u128(),
    }
}

/// The input event IDs a partition processed most recently, at most `capacity` of them
/// (plus one batch). Replays of input are recognized by position (see
/// [`PartitionState::positions`]); this window catches the same event arriving again at
/// another offset — an upstream worker re-sending its outbox after a crash, a producer
/// retrying — which happens within a few batches of the original.
#[derive(Debug)]
pub struct SeenWindow {
    /// Event IDs are UUIDs (v5, derived): a fast hasher spreads them as well as SipHash.
    set: foldhash::HashSet<u128>,
    /// Committed batches' IDs, oldest first.
    batches: VecDeque<(u64, Vec<u128>)>,
    total: usize,
    /// IDs of the batch being processed.
    pending: Vec<u128>,
    capacity: usize,
}

/// Room for the batch in progress beyond a full window.
const SEEN_SLACK: usize = 4_096;

impl SeenWindow {
    pub fn new(capacity: usize) -> Self {
        SeenWindow {
            // Sized for a full window (plus a batch) from the start: its memory is what a
            // partition costs, not something that grows with the traffic seen so far.
            set: foldhash::HashSet::with_capacity_and_hasher(
                capacity.saturating_add(SEEN_SLACK),
                Default::default(),
            ),
            batches: VecDeque::new(),
            total: 0,
            pending: Vec::new(),
            capacity,
        }
    }

    pub fn contains(&self, id: u128) -> bool {
        self.set.contains(&id)
    }

    pub fn insert(&mut self, id: u128) {
        if self.set.insert(id) {
            self.pending.push(id);
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }

    fn has_changes(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Sequence numbers of the committed batches that drop out when the pending one is
    /// added.
    fn evicted(&self) -> Vec<u64> {
        let mut total = self.total + self.pending.len();
        let mut out = Vec::new();
        for (seq, ids) in &self.batches {
            if total <= self.capacity {
                break;
            }
            total -= ids.len();
            out.push(*seq);
        }
        out
    }

    fn commit(&mut self, seq: u64) {
        for _ in self.evicted() {
            let (_, ids) = self.batches.pop_front().expect("evicted batches exist");
            self.total -= ids.len();
            for id in ids {
                self.set.remove(&id);
            }
        }
        if !self.pending.is_empty() {
            let ids = std::mem::take(&mut self.pending);
            self.total += ids.len();
            self.batches.push_back((seq, ids));
        }
    }

    fn rollback(&mut self) {
        for id in self.pending.drain(..) {
            self.set.remove(&id);
        }
    }

    fn load(&mut self, seq: u64, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let ids: Vec<u128> = bytes
            .chunks_exact(16)
            .map(|c| u128::from_be_bytes(c.try_into().expect("16 bytes")))
            .collect();
        self.total += ids.len();
        self.set.extend(ids.iter().copied());
        self.batches.push_back((seq, ids));
    }
}

fn encode_ids(ids: &[u128]) -> Vec<u8> {
    ids.iter().flat_map(|id| id.to_be_bytes()).collect()
}

/// Everything a stage keeps per partition, plus what the runtime keeps beside it.
#[derive(Debug)]
pub struct PartitionState<V> {
    pub state: Store<V>,
    pub timers: Store<Timer>,
    /// Outcomes of external calls the stage has not reacted to yet, by call ID.
    pub outcomes: Store<RecordedOutcome>,
    /// Per input topic (prefix-free name), the offset of the first input this state does
    /// not reflect: inputs below it were processed, whatever the group's committed offset
    /// says, and are never processed again.
    pub positions: Store<i64>,
    pub seen: SeenWindow,
    /// Outputs of committed batches not yet acknowledged by the broker, by batch, with
    /// the number of changelog records they take.
    pub outbox: BTreeMap<u64, (Vec<Out>, usize)>,
    /// Outbox keys whose outputs were acknowledged: tombstoned at the next commit.
    sent: Vec<String>,
    /// Keys to rewrite with these values at the next commit (a cut-off batch's or a
    /// fenced writer's records).
    repairs: BTreeMap<String, Option<Vec<u8>>>,
    /// Claims and commit markers of earlier writers: tombstoned once this writer has
    /// committed a batch of its own.
    retired: Vec<String>,
    /// Sequence number of the next batch. Never reused, not even by a batch redone after
    /// an aborted transaction (see [`Self::aborted`]).
    pub next_seq: u64,
    /// Sequence number of the last batch this state includes (0: none). Under
    /// `exactly_once` a batch's marker names it, so that a restore can tell a batch some
    /// writer built on from one that was aborted (see [`Restorer::transactional`]).
    pub last_seq: u64,
    /// This writer's generation (0 under `exactly_once`, where transactions fence).
    pub generation: u64,
    /// Whether this writer has committed a batch since its claim.
    committed_once: bool,
    /// The local file holding `state` and `timers` (none: everything in memory).
    disk: Option<Arc<Disk>>,
    /// Offset of the last changelog record known to be in the partition; this writer's
    /// next record must directly follow it (`at_least_once`).
    pub log_end: Option<i64>,
}

impl<V> PartitionState<V> {
    pub fn new(dedup_window: usize) -> Self {
        PartitionState {
            state: Store::default(),
            timers: Store::default(),
            outcomes: Store::default(),
            positions: Store::default(),
            seen: SeenWindow::new(dedup_window),
            outbox: BTreeMap::new(),
            sent: Vec::new(),
            repairs: BTreeMap::new(),
            retired: Vec::new(),
            next_seq: 1,
            last_seq: 0,
            generation: 0,
            committed_once: false,
            disk: None,
            log_end: None,
        }
    }
}

/// The records of one batch for one partition, and what the batch must remember once
/// they are durable.
#[derive(Debug, Default)]
pub struct BatchRecords {
    pub records: Vec<ChangelogRecord>,
    pub seq: u64,
    /// How many outbox records the batch writes.
    chunks: usize,
}

impl<V: Serialize + DeserializeOwned + Clone> PartitionState<V> {
    pub fn has_changes(&self) -> bool {
        self.state.has_changes()
            || self.timers.has_changes()
            || self.outcomes.has_changes()
            || self.positions.has_changes()
            || self.seen.has_changes()
            || !self.sent.is_empty()
            || !self.repairs.is_empty()
            || (self.committed_once && !self.retired.is_empty())
    }

    /// The records this batch must write, in order — repairs, entries, the outbox (the
    /// batch's `outputs`, under `at_least_once`), the commit marker — or nothing when
    /// nothing changed. Changes nothing: call [`Self::committed`] once they are durable,
    /// or [`Self::rollback`].
    pub fn pending_records(&self, outputs: &[Out]) -> BatchRecords {
        let seq = self.next_seq;
        if !self.has_changes() && outputs.is_empty() {
            return BatchRecords {
                records: Vec::new(),
                seq,
                chunks: 0,
            };
        }
        let rec = |key: String, value: Option<Vec<u8>>| ChangelogRecord { key, value, seq };
        let mut out: Vec<ChangelogRecord> = self
            .repairs
            .iter()
            .map(|(k, v)| rec(k.clone(), v.clone()))
            .collect();
        push_changes(&mut out, STATE_PREFIX, &self.state, seq);
        push_changes(&mut out, TIMER_PREFIX, &self.timers, seq);
        push_changes(&mut out, OUTCOME_PREFIX, &self.outcomes, seq);
        push_changes(&mut out, POSITION_PREFIX, &self.positions, seq);
        if self.seen.has_changes() {
            out.push(rec(
                format!("{SEEN_PREFIX}{seq}"),
                Some(encode_ids(&self.seen.pending)),
            ));
        }
        for old in self.seen.evicted() {
            out.push(rec(format!("{SEEN_PREFIX}{old}"), None));
        }
        for key in &self.sent {
            out.push(rec(key.clone(), None));
        }
        let chunks = outbox::chunks(outputs);
        let chunk_count = chunks.len();
        for (n, chunk) in chunks.into_iter().enumerate() {
            out.push(rec(format!("{OUTBOX_PREFIX}{seq}/{n}"), Some(chunk)));
        }
        if self.committed_once {
            for key in &self.retired {
                out.push(rec(key.clone(), None));
            }
        }
        // The marker names how many records precede it: a batch one of whose records
        // was refused while the marker got through is not taken for a committed one.
        // The transactional writer's (generation 0) also names the batch it follows.
        let count = out.len();
        let marker = if self.generation == 0 {
            format!("{seq}:{count}:{}", self.last_seq)
        } else {
            format!("{seq}:{count}")
        };
        out.push(rec(
            format!("{COMMIT_PREFIX}{}", self.generation),
            Some(marker.into_bytes()),
        ));
        BatchRecords {
            records: out,
            seq,
            chunks: chunk_count,
        }
    }

    /// The records of the last `pending_records` are durable; `outputs` (under
    /// `at_least_once`) wait in the outbox until they are acknowledged.
    pub fn committed(&mut self, batch: &BatchRecords, outputs: Vec<Out>) {
        self.state.commit();
        self.timers.commit();
        if let Some(disk) = &self.disk {
            disk.flush();
        }
        self.outcomes.commit();
        self.positions.commit();
        self.seen.commit(batch.seq);
        self.sent.clear();
        self.repairs.clear();
        if self.committed_once {
            self.retired.clear();
        }
        self.committed_once = true;
        if !outputs.is_empty() {
            self.outbox.insert(batch.seq, (outputs, batch.chunks));
        }
        self.next_seq = batch.seq + 1;
        self.last_seq = batch.seq;
    }

    /// The transaction that carried `batch` was aborted: forgets every change since the
    /// last commit, and leaves the batch's sequence number behind. A broker that shows
    /// aborted records may show this batch's, and the batch that does its work again must
    /// not be counted together with them.
    pub fn aborted(&mut self, batch: &BatchRecords) {
        self.rollback();
        if !batch.records.is_empty() {
            self.next_seq = self.next_seq.max(batch.seq + 1);
        }
    }

    /// Forgets every change since the last commit.
    pub fn rollback(&mut self) {
        self.state.rollback();
        self.timers.rollback();
        self.outcomes.rollback();
        self.positions.rollback();
        self.seen.rollback();
    }

    /// The outbox's outputs were acknowledged: their records go at the next commit.
    pub fn outbox_sent(&mut self) {
        for (seq, (_, chunks)) in std::mem::take(&mut self.outbox) {
            for n in 0..chunks {
                self.sent.push(format!("{OUTBOX_PREFIX}{seq}/{n}"));
            }
        }
    }
}

fn push_changes<T: Serialize + DeserializeOwned + Clone>(
    out: &mut Vec<ChangelogRecord>,
    prefix: &str,
    store: &Store<T>,
    seq: u64,
) {
    for (k, v) in store.changes() {
        out.push(ChangelogRecord {
            key: format!("{prefix}{k}"),
            value: v
                .as_ref()
                .map(|v| serde_json::to_vec(v).expect("state values serialize to JSON")),
            seq,
        });
    }
}

fn decode<T: DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, ChangelogError> {
    serde_json::from_slice(value).map_err(|e| ChangelogError::Value {
        key: key.to_owned(),
        message: e.to_string(),
    })
}

/// A record as read back: its key, value, and the batch and writer it belongs to.
struct Entry {
    key: String,
    value: Option<Vec<u8>>,
}

/// Rebuilds a partition's state from its changelog, read in log order, keeping only the
/// newest committed value of each key and the records since the last commit marker.
#[derive(Debug, Default)]
pub struct Restorer {
    /// Committed values, but those of stage state and timers when they go to a file.
    committed: HashMap<String, Vec<u8>>,
    disk: Option<Arc<Disk>>,
    /// Records of the current writer since its last commit marker, with their batch.
    tail: Vec<(String, Option<Vec<u8>>, u64)>,
    /// Records of fenced writers, by key.
    stale: HashSet<String>,
    /// The generation of the newest claim read so far.
    current: Option<u64>,
    max_seq: u64,
    /// Offset of the last record read.
    pub last_offset: Option<i64>,
    /// Under `exactly_once`: judge batches by the batch each marker says it follows.
    transactional: bool,
    /// The last complete batch, held back until what follows it shows whether it was
    /// built on (see [`Restorer::transactional`]).
    held: Option<Held>,
    /// What the group's committed offsets say, when they could be read.
    vouched: Option<Committed>,
    /// Sequence number of the newest batch applied.
    applied_seq: u64,
    /// Offset of the newest applied batch's marker.
    applied_marker: Option<i64>,
    /// Operators' replay requests by input topic: the request's offset in the log and
    /// the input offset asked for.
    requests: BTreeMap<String, (i64, i64)>,
    /// Keys of every replay request read, taken or not: retired by the next writer.
    request_keys: HashSet<String>,
}

/// What a stage's group has committed for one partition under `exactly_once`: the
/// offsets commit in the same transaction as the changelog batch that moves the state's
/// positions to them.
#[derive(Debug, Clone, Default)]
pub struct Committed {
    /// Per input topic (prefix-free), the committed offset; `None`: none committed.
    pub offsets: HashMap<String, Option<i64>>,
    /// The sequence number of the last batch committed: every transaction that writes
    /// a batch commits its sequence number as the group's offset on the changelog
    /// partition (a number the group owns there, not a position in that log), so a
    /// batch numbered above it did not commit. `None`: none committed (a broker that
    /// keeps no transactional offsets, or a log written before this was kept).
    pub batch: Option<u64>,
}

/// A complete batch not applied yet: its records, marker last.
#[derive(Debug)]
struct Held {
    seq: u64,
    /// Offset of its marker.
    marker: i64,
    records: Vec<(String, Option<Vec<u8>>)>,
}

impl Restorer {
    /// A restorer that writes stage state and timers to `disk` instead of memory.
    pub fn with_disk(disk: Arc<Disk>) -> Self {
        Restorer {
            disk: Some(disk),
            ..Restorer::default()
        }
    }

    /// Under `exactly_once` a read_committed reader should only ever see committed
    /// batches, but a broker that leaks the records of aborted transactions shows their
    /// batches too, markers included. Each transactional marker names the batch it
    /// follows (the last one its writer had committed or restored), so a batch that the
    /// next batch does not follow was aborted: it is left out, and its keys are rewritten
    /// with their committed values by the next owner. The last batch has no successor;
    /// [`Restorer::vouch`] says whether the group's committed offsets, which commit in
    /// the same transaction, include it:
    ///
    /// - by the sequence number of the last batch committed, which the group keeps as its
    ///   offset on the changelog partition (see [`Committed::batch`]) — exact for every
    ///   batch, a timer's or a reaction's that moved no input as well;
    /// - where there is none (a log written without it), by the positions: a last batch
    ///   that moved inputs while the group's committed offset of every input it moved is
    ///   still where the state's position was before it did not commit, and a last batch
    ///   that moved no position is taken for committed.
    ///
    /// On a correct broker every batch read is committed, the next one follows it and the
    /// offsets include the last: nothing changes (an operator who resets the group's
    /// offsets, the changelog's among them, to before the last batch would have that
    /// batch done again).
    pub fn transactional(mut self) -> Self {
        self.transactional = true;
        self
    }

    /// What the group has committed for this partition (`None`: it could not be read,
    /// and the last batch read counts as committed).
    pub fn vouch(&mut self, committed: Option<Committed>) {
        self.vouched = committed;
    }

    /// Whether the group's committed offsets include `held`, the last complete batch.
    fn vouched_for(&self, held: &Held) -> bool {
        let Some(c) = &self.vouched else {
            return true;
        };
        if let Some(last) = c.batch {
            return held.seq <= last;
        }
        let position = |v: Option<&[u8]>| v.and_then(|v| serde_json::from_slice::<i64>(v).ok());
        let moved: Vec<(&str, Option<i64>, i64)> = held
            .records
            .iter()
            .filter_map(|(k, v)| {
                let topic = k.strip_prefix(POSITION_PREFIX)?;
                let before = position(self.committed.get(k).map(Vec::as_slice));
                Some((topic, before, position(v.as_deref())?))
            })
            .filter(|(_, before, after)| *before != Some(*after))
            .collect();
        let still = |topic: &str, before: &Option<i64>| {
            c.offsets
                .get(topic)
                .is_some_and(|committed| committed == before)
        };
        // Every moved input is still where it was, and at least one of them by an offset
        // the group did commit: a broker that keeps no transactional offsets at all
        // (librdkafka's mock cluster) says nothing.
        let behind = moved.iter().all(|(topic, before, _)| still(topic, before))
            && moved.iter().any(|(_, before, _)| before.is_some());
        !behind
    }

    fn on_disk(&self, key: &str) -> Option<&Disk> {
        self.disk
            .as_deref()
            .filter(|_| key.starts_with(STATE_PREFIX) || key.starts_with(TIMER_PREFIX))
    }

    /// Takes the next record of the partition, in log order.
    pub fn push(
        &mut self,
        offset: i64,
        key: &str,
        value: Option<&[u8]>,
        seq: Option<u64>,
        generation: Option<u64>,
    ) -> Result<(), ChangelogError> {
        self.last_offset = Some(offset);
        // An operator's request stands outside any batch; its retirement (a tombstone)
        // is a record of the batch that writes it, counted by its marker.
        if let Some(topic) = key.strip_prefix(REPLAY_PREFIX) {
            match value {
                Some(v) => {
                    let target = std::str::from_utf8(v)
                        .ok()
                        .and_then(|v| v.parse::<i64>().ok())
                        .ok_or_else(|| ChangelogError::Value {
                            key: key.to_owned(),
                            message: "a replay request is an input offset".into(),
                        })?;
                    self.requests.insert(topic.to_owned(), (offset, target));
                    self.request_keys.insert(key.to_owned());
                    return Ok(());
                }
                None => {
                    self.requests.remove(topic);
                    self.request_keys.remove(key);
                }
            }
        }
        // A claim starts a writer's history; what its predecessors left uncommitted stays
        // in the tail, to be rewritten by the first batch the new writer commits.
        if let (Some(g), Some(v)) = (key.strip_prefix(CLAIM_PREFIX), value) {
            let g: u64 = g
                .parse()
                .map_err(|_| ChangelogError::UnknownKey(key.to_owned()))?;
            self.current = Some(g);
            self.apply(Entry {
                key: key.to_owned(),
                value: Some(v.to_vec()),
            });
            return Ok(());
        }
        let seq = seq.ok_or_else(|| ChangelogError::MissingSeq {
            key: key.to_owned(),
        })?;
        self.max_seq = self.max_seq.max(seq);
        if let (Some(current), Some(g)) = (self.current, generation)
            && g != current
        {
            self.stale.insert(key.to_owned());
            return Ok(());
        }
        // A writer's marker is `commit/<its generation>`; anything else under the prefix
        // (an earlier writer's marker retired or rewritten) is a plain write.
        let marker = value.filter(|_| {
            key.strip_prefix(COMMIT_PREFIX)
                .and_then(|g| g.parse::<u64>().ok())
                .is_some_and(|g| generation.is_none_or(|own| own == g))
        });
        let Some(marker) = marker else {
            self.tail
                .push((key.to_owned(), value.map(<[u8]>::to_vec), seq));
            return Ok(());
        };
        let (expected, follows) = std::str::from_utf8(marker)
            .ok()
            .and_then(|v| {
                let mut parts = v.split(':').skip(1);
                let count = parts.next()?.parse::<usize>().ok()?;
                let follows = match parts.next() {
                    Some(f) => Some(f.parse::<u64>().ok()?),
                    None => None,
                };
                Some((count, follows))
            })
            .ok_or_else(|| ChangelogError::Value {
                key: key.to_owned(),
                message: "a commit marker is `<seq>:<records>[:<batch it follows>]`".into(),
            })?;
        let written = self.tail.iter().filter(|(_, _, s)| *s == seq).count();
        if written != expected {
            // Part of the batch never made it: the marker commits nothing.
            return Ok(());
        }
        // Everything before a committed batch counts: a cut-off batch of an earlier
        // writer was rewritten by the batch that follows it (its first), and records
        // whose own marker compaction removed were committed.
        let mut records: Vec<(String, Option<Vec<u8>>)> = std::mem::take(&mut self.tail)
            .into_iter()
            .map(|(k, v, _)| (k, v))
            .collect();
        records.push((key.to_owned(), Some(marker.to_vec())));
        let batch = Held {
            seq,
            marker: offset,
            records,
        };
        if !self.transactional {
            self.apply_batch(batch);
            return Ok(());
        }
        if let Some(held) = self.held.take() {
            match follows {
                Some(f) if held.seq > f => self.leave_out(held),
                _ => self.apply_batch(held),
            }
        }
        self.held = Some(batch);
        Ok(())
    }

    fn apply_batch(&mut self, batch: Held) {
        self.applied_seq = self.applied_seq.max(batch.seq);
        self.applied_marker = self.applied_marker.max(Some(batch.marker));
        for (key, value) in batch.records {
            self.apply(Entry { key, value });
        }
    }

    /// A batch of an aborted transaction: its keys are rewritten with their committed
    /// values, but for its marker, which the next marker supersedes.
    fn leave_out(&mut self, batch: Held) {
        tracing::info!(
            seq = batch.seq,
            records = batch.records.len(),
            "leaving out a changelog batch of an aborted transaction"
        );
        for (key, _) in batch.records {
            if !key.starts_with(COMMIT_PREFIX) {
                self.stale.insert(key);
            }
        }
    }

    fn apply(&mut self, e: Entry) {
        // A committed record supersedes whatever a cut-off batch or a fenced writer left.
        self.stale.remove(&e.key);
        if let Some(disk) = self.on_disk(&e.key) {
            disk.put(&e.key, e.value.as_deref());
            return;
        }
        match e.value {
            Some(v) => {
                self.committed.insert(e.key, v);
            }
            None => {
                self.committed.remove(&e.key);
            }
        }
    }

    /// The committed state, for a writer of generation `generation` (0: no claims). Keys
    /// of cut-off batches and fenced writers are queued for rewriting; earlier writers'
    /// claims and markers for retirement.
    pub fn finish<V: Serialize + DeserializeOwned + Clone>(
        mut self,
        partition: i32,
        generation: u64,
        dedup_window: usize,
        cache_entries: usize,
    ) -> Result<PartitionState<V>, ChangelogError> {
        // A replay request that no batch follows came with the group's offsets moved by
        // the operator: they no longer tell which batch committed last.
        let newest = self
            .held
            .as_ref()
            .map(|h| h.marker)
            .max(self.applied_marker);
        if self
            .requests
            .values()
            .any(|(at, _)| newest.is_none_or(|m| m < *at))
        {
            self.vouched = None;
        }
        if let Some(held) = self.held.take() {
            if self.vouched_for(&held) {
                self.apply_batch(held);
            } else {
                self.leave_out(held);
            }
        }
        let mut ps = PartitionState::<V>::new(dedup_window);
        if let Some(disk) = &self.disk {
            let state = disk.check_each(STATE_PREFIX, |k, v| decode::<V>(k, v).map(drop))?;
            let timers =
                disk.index_timers(TIMER_PREFIX, |k, v| decode::<Timer>(k, v).map(|t| t.due_at))?;
            ps.state = Store::on_disk(disk.clone(), STATE_PREFIX, None, state, cache_entries);
            ps.timers = Store::on_disk(
                disk.clone(),
                TIMER_PREFIX,
                Some(|t: &Timer| t.due_at),
                timers,
                cache_entries,
            );
            ps.disk = Some(disk.clone());
        }
        let mut repair: HashSet<String> = std::mem::take(&mut self.stale);
        repair.extend(
            std::mem::take(&mut self.tail)
                .into_iter()
                .map(|(k, _, _)| k),
        );
        let mut seen: BTreeMap<u64, &[u8]> = BTreeMap::new();
        let mut outbox: BTreeMap<(u64, u64), &[u8]> = BTreeMap::new();
        for (key, value) in &self.committed {
            if let Some(k) = key.strip_prefix(STATE_PREFIX) {
                ps.state
                    .load_committed(k.to_owned(), Some(decode(key, value)?));
            } else if let Some(k) = key.strip_prefix(TIMER_PREFIX) {
                ps.timers
                    .load_committed(k.to_owned(), Some(decode(key, value)?));
            } else if let Some(k) = key.strip_prefix(OUTCOME_PREFIX) {
                ps.outcomes
                    .load_committed(k.to_owned(), Some(decode(key, value)?));
            } else if let Some(k) = key.strip_prefix(POSITION_PREFIX) {
                ps.positions
                    .load_committed(k.to_owned(), Some(decode(key, value)?));
            } else if let Some(s) = key.strip_prefix(SEEN_PREFIX) {
                seen.insert(parse_u64(key, s)?, value);
            } else if let Some(rest) = key.strip_prefix(OUTBOX_PREFIX) {
                let (s, n) = rest
                    .split_once('/')
                    .ok_or_else(|| ChangelogError::UnknownKey(key.clone()))?;
                outbox.insert((parse_u64(key, s)?, parse_u64(key, n)?), value);
            } else if let Some(g) = key.strip_prefix(COMMIT_PREFIX) {
                if parse_u64(key, g)? != generation {
                    ps.retired.push(key.clone());
                }
            } else if let Some(g) = key.strip_prefix(CLAIM_PREFIX) {
                if parse_u64(key, g)? != generation {
                    ps.retired.push(key.clone());
                }
            } else {
                return Err(ChangelogError::UnknownKey(key.clone()));
            }
        }
        // A request no committed batch follows is taken now: the position moves, and
        // the first batch commits it. Every request read is retired.
        for (topic, (at, target)) in std::mem::take(&mut self.requests) {
            if self.applied_marker.is_none_or(|m| m < at) {
                tracing::info!(
                    partition,
                    topic,
                    target,
                    "taking an operator's replay request"
                );
                ps.positions.insert(topic, target);
            }
        }
        ps.retired.extend(std::mem::take(&mut self.request_keys));
        ps.retired.sort();
        for (seq, ids) in seen {
            ps.seen.load(seq, ids);
        }
        for ((seq, n), chunk) in outbox {
            let outs =
                outbox::decode(chunk, partition).map_err(|message| ChangelogError::Value {
                    key: format!("{OUTBOX_PREFIX}{seq}"),
                    message,
                })?;
            let entry = ps.outbox.entry(seq).or_default();
            entry.0.extend(outs);
            entry.1 = entry.1.max(n as usize + 1);
        }
        for key in repair {
            let value = match self.on_disk(&key) {
                Some(disk) => disk.committed(&key),
                None => self.committed.get(&key).cloned(),
            };
            ps.repairs.insert(key, value);
        }
        ps.generation = generation;
        ps.next_seq = self.max_seq + 1;
        ps.last_seq = self.applied_seq;
        ps.log_end = self.last_offset;
        Ok(ps)
    }
}

fn parse_u64(key: &str, s: &str) -> Result<u64, ChangelogError> {
    s.parse()
        .map_err(|_| ChangelogError::UnknownKey(key.to_owned()))
}

#[cfg(test)]
mod tests;
