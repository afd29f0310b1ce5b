//! The stages' test driver: one partition's state and timers, a controllable clock, and
//! the runtime's own calls ([`crate::runtime::invoke`]) — what Kafka Streams'
//! TopologyTestDriver is to a topology, without a broker.
//!
//! It does what the runtime's dispatch does for one partition: an input or a reaction
//! whose stage call fails takes no effect (its writes are undone); timers fire in the
//! runtime's order (due time, then ID), each removed from state before its call, those
//! due when the clock moves firing once in that pass; outputs derive their IDs from the
//! same cause IDs. What it leaves out is Kafka: encoding, dead letters, commits.

use crate::events::{Envelope, Event};
use crate::runtime::invoke::{self, Trigger};
use crate::stages::{Effect, EffectOutcome, Stage, StageError, Store, Timer};
use crate::topics;

pub struct Driver<S: Stage> {
    pub stage: S,
    pub state: Store<S::State>,
    pub timers: Store<Timer>,
    /// The clock: wall-clock milliseconds every call sees.
    pub now: i64,
    /// Calls to the outside world requested by the last call, with the envelope their
    /// outcome's reaction will inherit.
    pub requested: Vec<(Effect, Option<Envelope>)>,
}

impl<S: Stage> Driver<S> {
    pub fn new(stage: S, now: i64) -> Self {
        Driver {
            stage,
            state: Store::default(),
            timers: Store::default(),
            now,
            requested: Vec::new(),
        }
    }

    fn call(
        &mut self,
        trigger: Trigger<'_>,
        cause: Option<Envelope>,
    ) -> Result<Vec<Event>, StageError> {
        let called = invoke::call(
            &mut self.stage,
            self.now,
            &mut self.state,
            &mut self.timers,
            trigger,
        );
        match called.result {
            Ok(()) => {
                invoke::keep(&mut self.state, &mut self.timers);
                self.requested = called
                    .requested
                    .into_iter()
                    .map(|e| (e, cause.clone()))
                    .collect();
                Ok(called.produced)
            }
            Err(e) => {
                invoke::undo(&mut self.state, &mut self.timers);
                self.requested.clear();
                Err(e)
            }
        }
    }

    /// Feeds one event read from `topic` (prefix-free).
    pub fn process_on(&mut self, topic: &str, event: &Event) -> Result<Vec<Event>, StageError> {
        let cause = Some(event.envelope().clone());
        self.call(Trigger::Input { topic, event }, cause)
    }

    /// Feeds one event on the topic its type is published to.
    pub fn process(&mut self, event: &Event) -> Result<Vec<Event>, StageError> {
        self.process_on(topics::topic_of(event.event_type()), event)
    }

    /// Hands the stage the outcome of a call it requested (with `cause`, the envelope of
    /// what requested it).
    pub fn react(
        &mut self,
        effect: &Effect,
        outcome: &EffectOutcome,
        cause: Option<&Envelope>,
    ) -> Result<Vec<Event>, StageError> {
        let trigger = Trigger::Outcome {
            effect,
            outcome,
            cause,
        };
        self.call(trigger, cause.cloned())
    }

    /// Fires one timer as the runtime does: removed from state, then handed over. `None`
    /// when there is no such timer.
    pub fn fire(&mut self, id: &str) -> Option<Result<Vec<Event>, StageError>> {
        let timer = self.timers.remove(id)?;
        Some(self.fire_timer(&timer))
    }

    /// Hands over a timer already removed from state.
    pub fn fire_timer(&mut self, timer: &Timer) -> Result<Vec<Event>, StageError> {
        let cause = timer.cause.clone();
        self.call(Trigger::Timer(timer), cause)
    }

    /// The timers due at the clock, in firing order.
    pub fn due(&self) -> Vec<Timer> {
        invoke::due(&self.timers, self.now)
    }

    /// Moves the clock to `now` and fires the timers due then, in the runtime's order, as
    /// one batch does (a timer they schedule at or before `now` fires on the next call).
    /// Stops at the first failing timer.
    pub fn advance_to(&mut self, now: i64) -> Result<Vec<Event>, StageError> {
        self.now = now;
        let mut out = Vec::new();
        for timer in self.due() {
            self.timers.remove(&timer.id);
            out.extend(self.fire_timer(&timer)?);
        }
        Ok(out)
    }

    /// Moves the clock to `now` and runs batches (see [`Driver::advance_to`]) until no
    /// timer is due at it.
    pub fn advance_until_idle(&mut self, now: i64) -> Result<Vec<Event>, StageError> {
        let mut out = self.advance_to(now)?;
        while !self.due().is_empty() {
            out.extend(self.advance_to(now)?);
        }
        Ok(out)
    }

    /// Commits the state, as a batch that is durable does.
    pub fn commit(&mut self) {
        self.state.commit();
        self.timers.commit();
    }
}
