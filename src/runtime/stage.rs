//! The stage backend: what the loop does with a batch when a [`Stage`] runs in it, and
//! where its effects become durable — the partition's changelog, and under
//! `exactly_once` a Kafka transaction, under `at_least_once` the outbox (see
//! [`super::changelog`], [`super::dispatch`], [`super::commit`]).
//!
//! Invariant: a partition's part is its [`PartitionState`], restored from the changelog,
//! and equal to the state of the last committed batch whenever the loop polls.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedMessage;
use serde::{Serialize, de::DeserializeOwned};

use super::changelog::PartitionState;
use super::dispatch::PendingEffect;
use super::effects::EffectHandler;
use super::{Backend, Part, RuntimeError, Worker, restore};
use crate::config::{Guarantee, Settings};
use crate::stages::Stage;

pub(crate) struct StageBackend<S: Stage> {
    pub(super) stage: S,
    /// The stage's changelog topic.
    pub(super) changelog: String,
    pub(super) effects: Option<Arc<dyn EffectHandler>>,
    /// Drives effect calls from this worker's thread.
    pub(super) effect_runtime: tokio::runtime::Runtime,
    /// Requests made by the batch being processed.
    pub(super) pending_effects: Vec<PendingEffect>,
    /// Under `exactly_once`: outputs (by `Worker::output_key`) that the broker refused for good
    /// in a transaction that then aborted, with the error. A broker checks its size limit
    /// on whole batches, so the next attempt sends each of them alone first, to tell a
    /// record too large by itself from one that was batched with it.
    pub(super) suspect_outputs: HashMap<u64, String>,
    /// Outputs refused when sent alone: the next attempt dead-letters them in their place.
    pub(super) refused_outputs: HashMap<u64, String>,
    /// Under `at_least_once`: when the group offsets were last committed (a hint), and
    /// whether a batch committed since.
    pub(super) offsets_hinted: Option<std::time::Instant>,
    pub(super) offsets_owed: bool,
}

impl<S: Stage> StageBackend<S> {
    pub(super) fn new(
        stage: S,
        settings: &Settings,
        effects: Option<Arc<dyn EffectHandler>>,
    ) -> Result<Self, RuntimeError> {
        Ok(StageBackend {
            changelog: settings.topics().changelog(stage.name()),
            stage,
            effects,
            effect_runtime: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(RuntimeError::EffectRuntime)?,
            pending_effects: Vec::new(),
            suspect_outputs: HashMap::new(),
            refused_outputs: HashMap::new(),
            offsets_hinted: None,
            offsets_owed: false,
        })
    }
}

impl<S: Stage> Backend for StageBackend<S> {
    type Part = PartitionState<S::State>;

    fn name(&self) -> &'static str {
        self.stage.name()
    }

    fn inputs(&self) -> &'static [&'static str] {
        self.stage.inputs()
    }

    fn transactional(settings: &Settings) -> bool {
        settings.guarantee == Guarantee::ExactlyOnce
    }

    fn restore(w: &Worker<Self>, partitions: Vec<i32>, job: u64) {
        let inputs = restore::Inputs {
            group: w.settings.group_id(w.name),
            topics: w
                .b
                .stage
                .inputs()
                .iter()
                .map(|t| w.topics.name(t))
                .collect(),
        };
        restore::spawn(
            w.settings.clone(),
            w.b.changelog.clone(),
            partitions,
            Some(inputs),
            job,
            w.restored_tx.clone(),
        );
    }

    /// Whether nobody wrote partition `p`'s changelog since this worker's last write.
    fn reusable(w: &Worker<Self>, p: i32, ps: &Self::Part) -> bool {
        let Some(end) = ps.log_end else {
            return false;
        };
        match w
            .consumer
            .fetch_watermarks(&w.b.changelog, p, Duration::from_secs(10))
        {
            Ok((_, high)) => high == end + 1,
            Err(e) => {
                tracing::warn!(partition = p, error = %e, "cannot read the changelog's end; restoring");
                false
            }
        }
    }

    fn before_poll(w: &mut Worker<Self>) -> bool {
        if !w.send_outboxes() {
            return false;
        }
        w.hint_offsets();
        true
    }

    /// A batch's external calls are reacted to in the next batch: without delay, not
    /// after a poll that waits for input.
    fn work_waiting(w: &Worker<Self>) -> bool {
        w.parts.values().any(|ps| !ps.outcomes.is_empty())
    }

    fn process_and_commit(
        w: &mut Worker<Self>,
        batch: Vec<OwnedMessage>,
    ) -> Result<(), RuntimeError> {
        w.process_and_commit(batch)
    }
}

impl<V: Serialize + DeserializeOwned + Clone> Part for PartitionState<V> {
    fn position(&self, base: &str) -> Option<i64> {
        self.positions.peek(base).copied()
    }

    /// Only a writer that knows where its log ends can tell later whether anybody wrote
    /// since.
    fn parkable(&self) -> bool {
        self.log_end.is_some()
    }

    fn log_restored(&self, partition: i32, elapsed: Duration) {
        tracing::info!(
            partition,
            keys = self.state.len(),
            seen = self.seen.len(),
            timers = self.timers.len(),
            pending_outcomes = self.outcomes.len(),
            unsent_batches = self.outbox.len(),
            elapsed_ms = elapsed.as_millis() as u64,
            "state restored"
        );
    }
}
