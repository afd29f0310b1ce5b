//! One call of a stage: the single way an input, a due timer or a recorded outcome of
//! an external call reaches a stage — what the outputs inherit (the cause's envelope),
//! the cause ID their event IDs derive from, and the savepoint that lets the call be
//! undone whole. The runtime's dispatch and the stages' test driver
//! ([`crate::stages::driver`]) both call it, so tests see exactly what production does.
//!
//! Invariant: a call either keeps all its state writes (its outputs then go out) or none
//! ([`undo`]); the cause ID of a call depends only on what triggered it.

use crate::events::{Envelope, Event};
use crate::stages::{Ctx, Effect, EffectOutcome, Input, Stage, StageError, Store, Timer};

/// What makes the stage act.
#[derive(Debug, Clone, Copy)]
pub enum Trigger<'a> {
    /// An input record, decoded, with its prefix-free topic.
    Input { topic: &'a str, event: &'a Event },
    /// A timer that is due, already removed from state.
    Timer(&'a Timer),
    /// The outcome of a call the stage requested, with the envelope of the input (or
    /// timer) that requested it.
    Outcome {
        effect: &'a Effect,
        outcome: &'a EffectOutcome,
        cause: Option<&'a Envelope>,
    },
}

impl Trigger<'_> {
    /// The ID the outputs' IDs derive from, and the envelope they inherit.
    fn cause(&self) -> (String, Option<Envelope>) {
        match self {
            Trigger::Input { event, .. } => {
                let env = event.envelope();
                (env.event_id.clone(), Some(env.clone()))
            }
            Trigger::Timer(timer) => (timer.firing_id(), timer.cause.clone()),
            Trigger::Outcome {
                effect,
                outcome,
                cause,
            } => (
                format!("effect/{}/{}", effect.id(), outcome.class()),
                cause.cloned(),
            ),
        }
    }
}

/// What one call did: the stage's answer, its outputs and the calls it requested. Its
/// state writes stay under a savepoint until [`keep`] or [`undo`].
#[derive(Debug)]
pub struct Called {
    pub result: Result<(), StageError>,
    pub produced: Vec<Event>,
    pub requested: Vec<Effect>,
}

/// Runs `stage` for `trigger` at `now` against a partition's stores.
pub fn call<S: Stage>(
    stage: &mut S,
    now: i64,
    state: &mut Store<S::State>,
    timers: &mut Store<Timer>,
    trigger: Trigger<'_>,
) -> Called {
    state.savepoint();
    timers.savepoint();
    let (cause_id, cause) = trigger.cause();
    let mut produced = Vec::new();
    let mut ctx = Ctx::new(
        stage.name(),
        now,
        cause_id,
        cause,
        state,
        timers,
        &mut produced,
    );
    let result = match trigger {
        Trigger::Input { topic, event } => stage.process(&mut ctx, Input { topic, event }),
        Trigger::Timer(timer) => stage.on_timer(&mut ctx, timer),
        Trigger::Outcome {
            effect, outcome, ..
        } => stage.on_effect(&mut ctx, effect, outcome),
    };
    let requested = ctx.take_effects();
    Called {
        result,
        produced,
        requested,
    }
}

/// The call's writes stand.
pub fn keep<V: Clone + serde::Serialize + serde::de::DeserializeOwned>(
    state: &mut Store<V>,
    timers: &mut Store<Timer>,
) {
    state.release_savepoint();
    timers.release_savepoint();
}

/// The call takes no effect: its writes go with its outputs.
pub fn undo<V: Clone + serde::Serialize + serde::de::DeserializeOwned>(
    state: &mut Store<V>,
    timers: &mut Store<Timer>,
) {
    state.undo_savepoint();
    timers.undo_savepoint();
}

/// The timers of `timers` due at `now`, in the order they fire: by due time, then ID.
pub fn due(timers: &Store<Timer>, now: i64) -> Vec<Timer> {
    timers.due(now, |t| t.due_at)
}
