//! Performing the requests stages make of the outside world.
//!
//! Invariant: every request of a batch is performed before the batch commits and its
//! outcome is committed with it; requests run concurrently up to a bound, and the stage
//! reacts to the outcomes in the next batch, in request order, so
//! the stage's reaction (and its output IDs) does not depend on which call finished first.

use std::sync::Arc;

use futures::StreamExt;
use futures::future::BoxFuture;

use serde::{Deserialize, Serialize};

use crate::events::Envelope;
use crate::stages::{Effect, EffectOutcome};

/// An external call's outcome, kept in the partition's state until the stage has reacted
/// to it. Under `at_least_once` the reaction's outputs become visible before the state
/// that records them; were the call made again after a crash, it could answer otherwise
/// (a transient failure, then a success) and the two reactions would contradict each
/// other. So the outcome is committed with the batch that made the call, and the stage
/// reacts in the next batch, to the recorded outcome, as often as a replay needs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordedOutcome {
    /// Reactions happen in the order the calls were made.
    pub order: u64,
    pub cause: Option<Envelope>,
    pub effect: Effect,
    pub outcome: EffectOutcome,
}

/// Performs effects; the payment gateway client is one.
pub trait EffectHandler: Send + Sync + 'static {
    fn perform(&self, effect: Effect) -> BoxFuture<'static, EffectOutcome>;
}

/// Runs `effects` with at most `concurrency` in flight; outcomes in request order.
pub async fn perform_all(
    handler: Arc<dyn EffectHandler>,
    effects: Vec<Effect>,
    concurrency: usize,
) -> Vec<EffectOutcome> {
    futures::stream::iter(effects.into_iter().map(|e| handler.perform(e)))
        .buffered(concurrency.max(1))
        .collect()
        .await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Answers after a delay that is longest for the first request, and records the most
    /// calls it saw in flight at once.
    struct Slow {
        in_flight: AtomicUsize,
        max_in_flight: Arc<AtomicUsize>,
    }

    impl EffectHandler for Arc<Slow> {
        fn perform(&self, effect: Effect) -> BoxFuture<'static, EffectOutcome> {
            let me = self.clone();
            Box::pin(async move {
                let now = me.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
                me.max_in_flight.fetch_max(now, Ordering::SeqCst);
                let Effect::Authorize {
                    attempt,
                    idempotency_key,
                    ..
                } = effect
                else {
                    unreachable!("only authorizations here")
                };
                tokio::time::sleep(Duration::from_millis(50 / u64::from(attempt))).await;
                me.in_flight.fetch_sub(1, Ordering::SeqCst);
                EffectOutcome::Succeeded {
                    reference: idempotency_key,
                }
            })
        }
    }

    fn authorize(n: u32) -> Effect {
        Effect::Authorize {
            idempotency_key: format!("k{n}"),
            store_id: "s".into(),
            order_id: format!("o{n}"),
            amount_cents: 100,
            currency: "USD".into(),
            attempt: n,
        }
    }

    #[tokio::test]
    async fn outcomes_keep_request_order_and_concurrency_is_bounded() {
        let max = Arc::new(AtomicUsize::new(0));
        let handler: Arc<dyn EffectHandler> = Arc::new(Arc::new(Slow {
            in_flight: AtomicUsize::new(0),
            max_in_flight: max.clone(),
        }));
        let outcomes = perform_all(handler, (1..=10).map(authorize).collect(), 4).await;
        let refs: Vec<_> = outcomes
            .iter()
            .map(|o| match o {
                EffectOutcome::Succeeded { reference } => reference.clone(),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(refs, (1..=10).map(|n| format!("k{n}")).collect::<Vec<_>>());
        assert_eq!(max.load(Ordering::SeqCst), 4);
    }
}
