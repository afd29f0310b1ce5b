//! Fraud screening: every `OrderCreated` becomes exactly one `OrderScreened`, approved, or
//! rejected with one machine-readable reason per failed rule (amount limit, blocked
//! customer, blocked email, per-customer order velocity).
//!
//! Customer cancellation does not concern screening: a cancelled order is still screened
//! (its velocity counts — the customer did place it), and inventory, which remembers the
//! cancellation, does not reserve it.
//!
//! Invariant: a decision depends only on the order, the settings and the velocity window of
//! the order's (store, customer). The window is keyed by order ID and measured in event
//! time (`placed_at`), never wall-clock time, so a redelivered or replayed order is counted
//! once, leaves the state untouched, and is screened the same way; the window only ever
//! holds orders within `velocity_window_secs` of the newest order it has seen.

use std::collections::{BTreeMap, HashSet};

use serde::{Deserialize, Serialize};

use crate::config::FraudSettings;
use crate::events::{Event, OrderCreated, OrderScreened, ScreeningDecision};
use crate::stages::{Ctx, Input, Stage, StageError, StageName, Store, Timer};
use crate::topics;

/// The value of one key of the fraud stage's state.
///
/// An enum, although it has one variant, so that the changelog value names what it holds
/// and further per-key rules can share the store without a changelog migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FraudState {
    /// Recent orders of one customer at one store, under [`velocity_key`].
    Velocity(VelocityWindow),
    /// Under [`SWEEP_KEY`]: the partition's sweep timer is scheduled.
    Sweep,
}

/// State key (and timer ID) of the partition's periodic sweep, which drops the windows of
/// customers who stopped ordering so the state does not grow with every customer ever seen.
pub const SWEEP_KEY: &str = "sweep";

/// The orders of one (store, customer) that can still count towards a velocity decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VelocityWindow {
    /// Order ID → `placed_at` (ms since the epoch). Keyed by order ID so that an order
    /// delivered twice is recorded once; a `BTreeMap` so the serialized changelog value is
    /// the same for the same content.
    pub orders: BTreeMap<String, i64>,
}

/// What recording one order in a window found.
struct Observation {
    /// Orders within the window ending at the order's `placed_at`, the order included.
    count: usize,
    /// Whether the window changed, i.e. whether the key must be written.
    changed: bool,
}

impl VelocityWindow {
    /// Prunes the window, records the order and counts the orders in its window.
    ///
    /// Pruning is relative to the newest `placed_at` the window has seen: the current
    /// order's, unless it arrived late. Pruning relative to a late order instead would
    /// make the state depend on whether an old order was redelivered, and a late order
    /// older than the window of the newest one is not recorded, since it can no longer
    /// count for any order at or after the newest. Together these make a redelivered
    /// order a no-op on the window: its ID is either still present, or it was pruned and
    /// is now too old to be recorded again.
    fn observe(&mut self, order_id: &str, placed_at: i64, window_ms: i64) -> Observation {
        let newest = self.orders.values().copied().fold(placed_at, i64::max);
        let oldest_kept = newest.saturating_sub(window_ms);
        let before = self.orders.len();
        self.orders.retain(|_, t| *t >= oldest_kept);
        let mut changed = self.orders.len() != before;
        if placed_at >= oldest_kept && !self.orders.contains_key(order_id) {
            self.orders.insert(order_id.to_owned(), placed_at);
            changed = true;
        }
        // The window is inclusive at both ends: an order exactly `window_ms` earlier is
        // "within" the window. Only orders placed up to this one count, so a redelivery
        // after later orders does not see them. The order itself is counted separately,
        // whatever `placed_at` was recorded for its ID first.
        let from = placed_at.saturating_sub(window_ms);
        let others = self
            .orders
            .iter()
            .filter(|&(id, &t)| id != order_id && from <= t && t <= placed_at)
            .count();
        Observation {
            count: others + 1,
            changed,
        }
    }
}

/// The state key of the velocity window of one customer at one store:
/// `velocity/{store_id}/{customer_id}`.
///
/// `%` and `/` inside either ID are percent-escaped so that, say, store `a/b` with customer
/// `c` and store `a` with customer `b/c` never share a window; IDs without them appear
/// verbatim.
pub fn velocity_key(store_id: &str, customer_id: &str) -> String {
    format!(
        "velocity/{}/{}",
        super::key_part(store_id),
        super::key_part(customer_id)
    )
}

/// Screens orders against the rules of [`FraudSettings`].
pub struct FraudStage {
    settings: FraudSettings,
    /// `settings.blocked_customers` as a set, built once rather than scanned per order.
    blocked_customers: HashSet<String>,
    /// `settings.blocked_emails`, normalized by [`normalize_email`] once here so that each
    /// order costs one lookup.
    blocked_emails: HashSet<String>,
    /// `settings.velocity_window_secs` in milliseconds, saturated: a window too long for
    /// an `i64` simply never prunes.
    window_ms: i64,
}

/// Emails are matched case-insensitively and without surrounding whitespace, so that
/// `Fraud@Example.com ` in an order matches `fraud@example.com` in the settings.
fn normalize_email(email: &str) -> String {
    email.trim().to_lowercase()
}

impl FraudStage {
    pub fn new(settings: FraudSettings) -> Self {
        let blocked_customers = settings.blocked_customers.iter().cloned().collect();
        let blocked_emails = settings
            .blocked_emails
            .iter()
            .map(|e| normalize_email(e))
            .collect();
        let window_ms =
            i64::try_from(settings.velocity_window_secs.saturating_mul(1000)).unwrap_or(i64::MAX);
        FraudStage {
            settings,
            blocked_customers,
            blocked_emails,
            window_ms,
        }
    }

    /// Applies every rule to one order, recording it in its velocity window.
    fn screen(
        &self,
        ctx: &mut Ctx<'_, FraudState>,
        order: &OrderCreated,
    ) -> Result<OrderScreened, StageError> {
        let envelope = &order.envelope;
        // Both checks come before any state is touched, so a dead-lettered order leaves
        // no trace in the velocity window.
        let order_id = envelope.order_id.as_deref().ok_or_else(|| {
            StageError::Invalid(format!(
                "OrderCreated {} has no order_id",
                envelope.event_id
            ))
        })?;
        let total = order.total_cents().ok_or_else(|| {
            StageError::Invalid(format!(
                "order {order_id} of store {}: total overflows 64-bit minor units",
                envelope.store_id
            ))
        })?;

        // Every rule is evaluated, so a rejection lists every reason at once and an
        // operator never fixes one only to discover the next.
        let mut reasons = Vec::new();
        let max_total = self.settings.max_order_total_cents;
        if total > max_total {
            reasons.push(format!("amount_limit: total {total} exceeds {max_total}"));
        }
        if self.blocked_customers.contains(&order.customer_id) {
            reasons.push(format!("blocked_customer: {}", order.customer_id));
        }
        let email = normalize_email(&order.email);
        if self.blocked_emails.contains(&email) {
            reasons.push(format!("blocked_email: {email}"));
        }
        // Rejected orders count too: an attacker retrying a blocked card is exactly the
        // burst the velocity rule exists for.
        let count = self.record(
            ctx.state,
            &envelope.store_id,
            &order.customer_id,
            order_id,
            order.placed_at,
        );
        let max_orders = self.settings.velocity_max_orders;
        if count > usize::try_from(max_orders).unwrap_or(usize::MAX) {
            reasons.push(format!(
                "velocity: {count} orders within {}s exceeds {max_orders}",
                self.settings.velocity_window_secs
            ));
        }

        let decision = if reasons.is_empty() {
            ScreeningDecision::Approved
        } else {
            ScreeningDecision::Rejected
        };
        Ok(OrderScreened {
            envelope: ctx.next_envelope(),
            decision,
            reasons,
            customer_id: order.customer_id.clone(),
            email: order.email.clone(),
            currency: order.currency.clone(),
            total_cents: total,
            items: order.items.clone(),
        })
    }

    /// Records the order in its (store, customer) window and returns the window's count;
    /// writes the key only when the window changed, so a redelivery produces no
    /// changelog record.
    fn record(
        &self,
        state: &mut Store<FraudState>,
        store_id: &str,
        customer_id: &str,
        order_id: &str,
        placed_at: i64,
    ) -> usize {
        let key = velocity_key(store_id, customer_id);
        let mut window = match state.get(&key) {
            Some(FraudState::Velocity(w)) => w.clone(),
            _ => VelocityWindow::default(),
        };
        let seen = window.observe(order_id, placed_at, self.window_ms);
        if seen.changed {
            state.insert(key, FraudState::Velocity(window));
        }
        seen.count
    }
}

impl Stage for FraudStage {
    type State = FraudState;

    fn name(&self) -> &'static str {
        StageName::Fraud.as_str()
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[topics::ORDER_CREATED]
    }

    fn process(
        &mut self,
        ctx: &mut Ctx<'_, FraudState>,
        input: Input<'_>,
    ) -> Result<(), StageError> {
        let Event::OrderCreated(order) = input.event else {
            // `order.created` carries nothing else, so anything else is a producer bug
            // that no retry can fix.
            return Err(StageError::Unexpected {
                event_type: input.event.event_type().to_string(),
                topic: input.topic.to_owned(),
            });
        };
        let screened = self.screen(ctx, order)?;
        ctx.emit(screened);
        if !ctx.state.contains(SWEEP_KEY) {
            let due = ctx.now().saturating_add(self.sweep_interval_ms());
            ctx.state.insert(SWEEP_KEY, FraudState::Sweep);
            ctx.schedule(SWEEP_KEY, due, serde_json::Value::Null);
        }
        Ok(())
    }

    /// Drops every window whose newest order is more than a window older than the
    /// partition's newest order (event time): such a customer's past orders can no
    /// longer count for anything but an order that late. Then sweeps again later.
    fn on_timer(&mut self, ctx: &mut Ctx<'_, FraudState>, timer: &Timer) -> Result<(), StageError> {
        if timer.id != SWEEP_KEY {
            return Ok(());
        }
        let newest = |w: &VelocityWindow| w.orders.values().copied().max();
        // One read of every window: with a state file this is a scan of the file.
        let windows: Vec<(String, Option<i64>)> = ctx
            .state
            .scan("")
            .into_iter()
            .filter_map(|(k, v)| match v {
                FraudState::Velocity(w) => Some((k, newest(&w))),
                FraudState::Sweep => None,
            })
            .collect();
        let watermark = windows.iter().filter_map(|(_, t)| *t).max();
        if let Some(watermark) = watermark {
            let idle: Vec<String> = windows
                .into_iter()
                .filter(|(_, t)| t.is_none_or(|t| t < watermark.saturating_sub(self.window_ms)))
                .map(|(k, _)| k)
                .collect();
            for k in idle {
                ctx.state.remove(&k);
            }
        }
        let due = ctx.now().saturating_add(self.sweep_interval_ms());
        ctx.schedule(SWEEP_KEY, due, serde_json::Value::Null);
        Ok(())
    }
}

impl FraudStage {
    /// Sweeping once per window keeps at most about two windows of customers in state;
    /// never more often than once a minute.
    fn sweep_interval_ms(&self) -> i64 {
        self.window_ms.max(60_000)
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use proptest::prelude::*;

    use super::*;
    use crate::events::{Envelope, OrderLine, Picking, derive_id, order_created_id};
    use crate::stages::driver::Driver;

    type TestResult = Result<(), Box<dyn Error>>;

    /// The runtime's clock in these tests; deliberately unrelated to `placed_at`, so a
    /// test would notice the stage reading wall-clock time for the window.
    const NOW: i64 = 1_700_000_000_000;
    const HOUR_MS: i64 = 3_600_000;

    fn settings() -> FraudSettings {
        FraudSettings {
            max_order_total_cents: 1_000_000,
            blocked_customers: vec!["c-9".into()],
            blocked_emails: vec![" Fraud@Example.COM ".into()],
            velocity_max_orders: 5,
            velocity_window_secs: 3600,
        }
    }

    /// An order of 2 × 1 250 cents = 2 500 cents.
    fn order(store: &str, customer: &str, order_id: &str, placed_at: i64) -> OrderCreated {
        OrderCreated {
            envelope: Envelope {
                event_id: order_created_id(store, order_id).to_string(),
                order_id: Some(order_id.into()),
                store_id: store.into(),
                correlation_id: format!("corr-{store}-{order_id}"),
                causation_id: None,
                occurred_at: placed_at,
                schema_version: 1,
            },
            customer_id: customer.into(),
            email: format!("{customer}@shop.test"),
            currency: "EUR".into(),
            shipping_country: "DE".into(),
            items: vec![OrderLine {
                sku: "sku-1".into(),
                quantity: 2,
                unit_price_cents: 1_250,
            }],
            placed_at,
        }
    }

    /// The stage on the runtime's own calls, at `NOW`.
    type Harness = Driver<FraudStage>;

    fn harness(settings: FraudSettings) -> Harness {
        Driver::new(FraudStage::new(settings), NOW)
    }

    impl Driver<FraudStage> {
        /// Feeds one order and returns its single output.
        fn screen(&mut self, order: &OrderCreated) -> Result<OrderScreened, Box<dyn Error>> {
            match self
                .process(&Event::OrderCreated(order.clone()))?
                .as_slice()
            {
                [Event::OrderScreened(s)] => Ok(s.clone()),
                other => Err(format!("expected exactly one OrderScreened, got {other:?}").into()),
            }
        }

        fn window(&self, store: &str, customer: &str) -> Option<&BTreeMap<String, i64>> {
            match self.state.peek(&velocity_key(store, customer)) {
                Some(FraudState::Velocity(w)) => Some(&w.orders),
                _ => None,
            }
        }
    }

    fn window_of(entries: &[(&str, i64)]) -> BTreeMap<String, i64> {
        entries.iter().map(|&(id, t)| (id.to_owned(), t)).collect()
    }

    #[test]
    fn stage_identity() {
        let stage = FraudStage::new(settings());
        assert_eq!(stage.name(), "fraud");
        assert_eq!(stage.inputs(), &[topics::ORDER_CREATED]);
    }

    #[test]
    fn approves_an_order_that_passes_every_rule_and_carries_it_forward() -> TestResult {
        let mut h = harness(settings());
        let input = order("s-1", "c-1", "o-1", HOUR_MS);
        let screened = h.screen(&input)?;
        assert_eq!(screened.decision, ScreeningDecision::Approved);
        assert!(screened.reasons.is_empty(), "{:?}", screened.reasons);
        assert_eq!(screened.customer_id, "c-1");
        assert_eq!(screened.email, "c-1@shop.test");
        assert_eq!(screened.currency, "EUR");
        assert_eq!(screened.total_cents, 2_500);
        assert_eq!(screened.items, input.items);
        assert_eq!(
            h.window("s-1", "c-1"),
            Some(&window_of(&[("o-1", HOUR_MS)]))
        );
        // The window and the sweep marker.
        assert_eq!(h.state.len(), 2);
        Ok(())
    }

    #[test]
    fn rejects_a_total_above_the_limit_but_not_at_it() -> TestResult {
        let mut h = harness(settings());
        let mut at_limit = order("s-1", "c-1", "o-1", 0);
        at_limit.items = vec![OrderLine {
            sku: "tv".into(),
            quantity: 2,
            unit_price_cents: 500_000,
        }];
        assert_eq!(h.screen(&at_limit)?.decision, ScreeningDecision::Approved);

        let mut above = order("s-1", "c-1", "o-2", 0);
        above.items = vec![OrderLine {
            sku: "tv".into(),
            quantity: 3,
            unit_price_cents: 500_000,
        }];
        let screened = h.screen(&above)?;
        assert_eq!(screened.decision, ScreeningDecision::Rejected);
        assert_eq!(
            screened.reasons,
            ["amount_limit: total 1500000 exceeds 1000000"]
        );
        assert_eq!(screened.total_cents, 1_500_000);
        Ok(())
    }

    #[test]
    fn rejects_a_blocked_customer() -> TestResult {
        let mut h = harness(settings());
        let screened = h.screen(&order("s-1", "c-9", "o-1", 0))?;
        assert_eq!(screened.decision, ScreeningDecision::Rejected);
        assert_eq!(screened.reasons, ["blocked_customer: c-9"]);
        // Customer IDs are opaque: only the exact ID is blocked.
        assert_eq!(
            h.screen(&order("s-1", "C-9", "o-2", 0))?.decision,
            ScreeningDecision::Approved
        );
        Ok(())
    }

    #[test]
    fn rejects_a_blocked_email_ignoring_case_and_surrounding_space() -> TestResult {
        let mut h = harness(settings());
        let mut input = order("s-1", "c-1", "o-1", 0);
        input.email = "  fraud@EXAMPLE.com\t".into();
        let screened = h.screen(&input)?;
        assert_eq!(screened.decision, ScreeningDecision::Rejected);
        assert_eq!(screened.reasons, ["blocked_email: fraud@example.com"]);
        // The email travels on as the producer wrote it.
        assert_eq!(screened.email, "  fraud@EXAMPLE.com\t");
        Ok(())
    }

    #[test]
    fn rejects_the_order_that_exceeds_the_velocity_limit() -> TestResult {
        let mut h = harness(settings());
        for i in 0..5 {
            let screened = h.screen(&order("s-1", "c-1", &format!("o-{i}"), i * 60_000))?;
            assert_eq!(screened.decision, ScreeningDecision::Approved, "order {i}");
        }
        let screened = h.screen(&order("s-1", "c-1", "o-5", 5 * 60_000))?;
        assert_eq!(screened.decision, ScreeningDecision::Rejected);
        assert_eq!(
            screened.reasons,
            ["velocity: 6 orders within 3600s exceeds 5"]
        );
        // The rejected order counts as well.
        assert_eq!(h.window("s-1", "c-1").map(BTreeMap::len), Some(6));
        Ok(())
    }

    #[test]
    fn lists_every_failed_rule_in_a_stable_order() -> TestResult {
        let mut h = harness(FraudSettings {
            velocity_max_orders: 0,
            ..settings()
        });
        let mut input = order("s-1", "c-9", "o-1", 0);
        input.email = "fraud@example.com".into();
        input.items = vec![OrderLine {
            sku: "tv".into(),
            quantity: 3,
            unit_price_cents: 500_000,
        }];
        let screened = h.screen(&input)?;
        assert_eq!(screened.decision, ScreeningDecision::Rejected);
        assert_eq!(
            screened.reasons,
            [
                "amount_limit: total 1500000 exceeds 1000000",
                "blocked_customer: c-9",
                "blocked_email: fraud@example.com",
                "velocity: 1 orders within 3600s exceeds 0",
            ]
        );
        Ok(())
    }

    #[test]
    fn velocity_window_includes_its_boundary_and_prunes_older_orders() -> TestResult {
        let mut h = harness(FraudSettings {
            velocity_max_orders: 2,
            velocity_window_secs: 10,
            ..settings()
        });
        assert_eq!(
            h.screen(&order("s-1", "c-1", "a", 0))?.decision,
            ScreeningDecision::Approved
        );
        assert_eq!(
            h.screen(&order("s-1", "c-1", "b", 5_000))?.decision,
            ScreeningDecision::Approved
        );
        // `a` is exactly 10 s before `c`: still within the window.
        let c = h.screen(&order("s-1", "c-1", "c", 10_000))?;
        assert_eq!(c.reasons, ["velocity: 3 orders within 10s exceeds 2"]);
        assert_eq!(
            h.window("s-1", "c-1"),
            Some(&window_of(&[("a", 0), ("b", 5_000), ("c", 10_000)]))
        );

        // One millisecond later `a` has left the window and is pruned.
        let d = h.screen(&order("s-1", "c-1", "d", 10_001))?;
        assert_eq!(d.reasons, ["velocity: 3 orders within 10s exceeds 2"]);
        assert_eq!(
            h.window("s-1", "c-1"),
            Some(&window_of(&[("b", 5_000), ("c", 10_000), ("d", 10_001)]))
        );

        // At 20 001 `b` and `c` have left, `d` sits exactly on the boundary and still
        // counts: two orders, approved again.
        let e = h.screen(&order("s-1", "c-1", "e", 20_001))?;
        assert_eq!(e.decision, ScreeningDecision::Approved);
        assert_eq!(
            h.window("s-1", "c-1"),
            Some(&window_of(&[("d", 10_001), ("e", 20_001)]))
        );
        Ok(())
    }

    #[test]
    fn velocity_is_counted_per_customer_and_per_store() -> TestResult {
        let mut h = harness(FraudSettings {
            velocity_max_orders: 1,
            ..settings()
        });
        for (store, customer, id) in [
            ("s-1", "c-1", "o-1"),
            ("s-1", "c-2", "o-2"),
            ("s-2", "c-1", "o-3"),
        ] {
            let screened = h.screen(&order(store, customer, id, 0))?;
            assert_eq!(
                screened.decision,
                ScreeningDecision::Approved,
                "{store}/{customer}"
            );
        }
        let second = h.screen(&order("s-1", "c-1", "o-4", 1_000))?;
        assert_eq!(
            second.reasons,
            ["velocity: 2 orders within 3600s exceeds 1"]
        );

        // Three windows and the sweep marker.
        assert_eq!(h.state.len(), 4);
        assert_eq!(
            h.window("s-1", "c-1"),
            Some(&window_of(&[("o-1", 0), ("o-4", 1_000)]))
        );
        assert_eq!(h.window("s-1", "c-2"), Some(&window_of(&[("o-2", 0)])));
        assert_eq!(h.window("s-2", "c-1"), Some(&window_of(&[("o-3", 0)])));
        Ok(())
    }

    #[test]
    fn the_sweep_drops_idle_windows_and_keeps_active_ones() -> TestResult {
        let mut h = harness(settings());
        h.screen(&order("s-1", "idle", "o-1", 0))?;
        h.screen(&order("s-1", "active", "o-2", HOUR_MS + 1))?;
        h.screen(&order("s-1", "active", "o-3", 2 * HOUR_MS))?;
        let [(_, ref timer)] = h.timers.iter().collect::<Vec<_>>()[..] else {
            return Err("expected exactly one timer, the sweep".into());
        };
        let timer = timer.clone();
        assert_eq!(
            (timer.id.as_str(), timer.due_at),
            (SWEEP_KEY, NOW + HOUR_MS)
        );
        h.timers.remove(&timer.id);

        let mut out = Vec::new();
        let mut ctx = Ctx::new(
            "fraud",
            timer.due_at,
            timer.firing_id(),
            timer.cause.clone(),
            &mut h.state,
            &mut h.timers,
            &mut out,
        );
        h.stage.on_timer(&mut ctx, &timer)?;
        assert!(out.is_empty());
        // Newest order of the partition: 2 h. "idle" last ordered more than a window
        // before that; "active" did not.
        assert_eq!(h.window("s-1", "idle"), None);
        assert_eq!(
            h.window("s-1", "active"),
            Some(&window_of(&[("o-2", HOUR_MS + 1), ("o-3", 2 * HOUR_MS)]))
        );
        let next: Vec<i64> = h.timers.iter().map(|(_, t)| t.due_at).collect();
        assert_eq!(next, [NOW + 2 * HOUR_MS], "the sweep reschedules itself");
        Ok(())
    }

    #[test]
    fn the_same_order_twice_counts_once_and_writes_nothing() -> TestResult {
        let mut h = harness(FraudSettings {
            velocity_max_orders: 1,
            ..settings()
        });
        let first = order("s-1", "c-1", "o-1", 0);
        let once = h.screen(&first)?;
        // The window, and the sweep marker of the partition's first order.
        assert_eq!(h.state.changes().len(), 2);
        h.state.commit();

        let again = h.screen(&first)?;
        assert_eq!(
            again, once,
            "a redelivery is screened identically, down to the event ID"
        );
        assert!(
            !h.state.has_changes(),
            "a redelivery must not write the window"
        );

        let next = h.screen(&order("s-1", "c-1", "o-2", 1_000))?;
        assert_eq!(next.reasons, ["velocity: 2 orders within 3600s exceeds 1"]);
        Ok(())
    }

    #[test]
    fn a_late_order_older_than_the_window_is_screened_but_not_recorded() -> TestResult {
        let mut h = harness(FraudSettings {
            velocity_max_orders: 1,
            velocity_window_secs: 10,
            ..settings()
        });
        h.screen(&order("s-1", "c-1", "new", 100_000))?;
        h.state.commit();

        // Placed 90 s before the newest order: it is alone in its own window, and can
        // no longer count for any order at or after the newest one.
        let late = h.screen(&order("s-1", "c-1", "late", 10_000))?;
        assert_eq!(late.decision, ScreeningDecision::Approved);
        assert!(!h.state.has_changes());
        assert_eq!(
            h.window("s-1", "c-1"),
            Some(&window_of(&[("new", 100_000)]))
        );

        // A late order inside the newest order's window is recorded, and sees only the
        // orders placed up to itself.
        let recent = h.screen(&order("s-1", "c-1", "recent", 95_000))?;
        assert_eq!(recent.decision, ScreeningDecision::Approved);
        assert_eq!(
            h.window("s-1", "c-1"),
            Some(&window_of(&[("new", 100_000), ("recent", 95_000)]))
        );
        Ok(())
    }

    #[test]
    fn output_envelope_is_caused_by_the_input_and_deterministic() -> TestResult {
        let input = order("s-1", "c-1", "o-1", 0);
        let screened = harness(settings()).screen(&input)?;
        let env = &screened.envelope;
        assert_eq!(
            env.event_id,
            derive_id(&input.envelope.event_id, "fraud", 0).to_string()
        );
        assert_eq!(
            env.causation_id.as_deref(),
            Some(input.envelope.event_id.as_str())
        );
        assert_eq!(env.correlation_id, input.envelope.correlation_id);
        assert_eq!(env.order_id.as_deref(), Some("o-1"));
        assert_eq!(env.store_id, "s-1");
        assert_eq!(env.occurred_at, NOW);

        let replayed = harness(settings()).screen(&input)?;
        assert_eq!(replayed.envelope.event_id, env.event_id);
        Ok(())
    }

    #[test]
    fn another_event_type_is_unexpected_and_leaves_no_trace() {
        let mut h = harness(settings());
        let picking = Event::Picking(Picking {
            envelope: order("s-1", "c-1", "o-1", 0).envelope,
        });
        assert_eq!(
            h.process_on(topics::ORDER_CREATED, &picking),
            Err(StageError::Unexpected {
                event_type: "Picking".into(),
                topic: "order.created".into()
            })
        );
        assert!(h.state.is_empty() && !h.state.has_changes());
    }

    #[test]
    fn an_order_whose_total_overflows_is_invalid_and_leaves_no_trace() {
        let mut h = harness(settings());
        let mut input = order("s-1", "c-1", "o-1", 0);
        input.items = vec![OrderLine {
            sku: "x".into(),
            quantity: i32::MAX,
            unit_price_cents: i64::MAX,
        }];
        let err = h.process(&Event::OrderCreated(input));
        assert!(
            matches!(err, Err(StageError::Invalid(ref m)) if m.contains("o-1") && m.contains("overflows")),
            "{err:?}"
        );
        assert!(h.state.is_empty() && !h.state.has_changes());
    }

    #[test]
    fn an_order_without_an_order_id_is_invalid() {
        let mut h = harness(settings());
        let mut input = order("s-1", "c-1", "o-1", 0);
        input.envelope.order_id = None;
        assert!(matches!(
            h.process(&Event::OrderCreated(input)),
            Err(StageError::Invalid(_))
        ));
        assert!(h.state.is_empty());
    }

    #[test]
    fn velocity_keys_are_readable_and_unambiguous() {
        assert_eq!(velocity_key("s-1", "c-1"), "velocity/s-1/c-1");
        assert_ne!(velocity_key("a/b", "c"), velocity_key("a", "b/c"));
        assert_eq!(velocity_key("a/b", "c%"), "velocity/a%2Fb/c%25");
    }

    #[test]
    fn state_has_a_stable_changelog_shape() -> TestResult {
        let state = FraudState::Velocity(VelocityWindow {
            orders: window_of(&[("o-2", 2), ("o-1", 1)]),
        });
        let json = serde_json::to_string(&state)?;
        assert_eq!(json, r#"{"velocity":{"orders":{"o-1":1,"o-2":2}}}"#);
        assert_eq!(serde_json::from_str::<FraudState>(&json)?, state);
        Ok(())
    }

    // --- properties -------------------------------------------------------------------

    const PROP_WINDOW_SECS: u64 = 5;
    const PROP_WINDOW_MS: i64 = 5_000;
    const PROP_MAX_ORDERS: u32 = 2;

    fn prop_settings() -> FraudSettings {
        FraudSettings {
            max_order_total_cents: i64::MAX,
            blocked_customers: Vec::new(),
            blocked_emails: Vec::new(),
            velocity_max_orders: PROP_MAX_ORDERS,
            velocity_window_secs: PROP_WINDOW_SECS,
        }
    }

    /// Distinct orders over two stores and three customers, with `placed_at` in random
    /// order (late arrivals included) over a span of several windows.
    fn orders() -> impl Strategy<Value = Vec<OrderCreated>> {
        prop::collection::vec((0..2usize, 0..3usize, 0i64..12_000), 1..40).prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (s, c, t))| {
                    order(&format!("s-{s}"), &format!("c-{c}"), &format!("o-{i}"), t)
                })
                .collect()
        })
    }

    /// The delivery order: every order in turn, each followed by redeliveries of random
    /// orders already delivered (itself included).
    fn with_redeliveries(
        n: usize,
        dups: &[(prop::sample::Index, prop::sample::Index)],
    ) -> Vec<usize> {
        let mut after: Vec<Vec<usize>> = vec![Vec::new(); n];
        for (at, which) in dups {
            let at = at.index(n);
            after[at].push(which.index(at + 1));
        }
        (0..n)
            .flat_map(|i| std::iter::once(i).chain(after[i].iter().copied()))
            .collect()
    }

    fn fail(e: impl std::fmt::Display) -> TestCaseError {
        TestCaseError::fail(e.to_string())
    }

    fn snapshot(state: &Store<FraudState>) -> BTreeMap<String, FraudState> {
        state.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    proptest! {
        /// After every delivery each window holds exactly the delivered orders of its key
        /// within the window of the newest one, and every decision matches a brute-force
        /// count over everything delivered so far.
        #[test]
        fn windows_hold_only_orders_within_the_window(
            orders in orders(),
            dups in prop::collection::vec(any::<(prop::sample::Index, prop::sample::Index)>(), 0..20),
        ) {
            let mut h = harness(prop_settings());
            // The model: per key, every distinct order delivered and the newest placed_at.
            let mut seen: BTreeMap<String, (BTreeMap<String, i64>, i64)> = BTreeMap::new();
            for i in with_redeliveries(orders.len(), &dups) {
                let o = &orders[i];
                let id = o.envelope.order_id.clone().unwrap_or_default();
                let key = velocity_key(&o.envelope.store_id, &o.customer_id);
                let (prior, newest) = seen.entry(key.clone()).or_insert_with(|| (BTreeMap::new(), i64::MIN));
                *newest = (*newest).max(o.placed_at);
                let oldest_kept = *newest - PROP_WINDOW_MS;
                let expected = 1 + prior
                    .iter()
                    .filter(|&(p, &t)| *p != id && oldest_kept <= t && t <= o.placed_at)
                    .count();
                prior.entry(id).or_insert(o.placed_at);

                let screened = h.screen(o).map_err(fail)?;
                let expected_reasons: Vec<String> = if expected > PROP_MAX_ORDERS as usize {
                    vec![format!("velocity: {expected} orders within 5s exceeds 2")]
                } else {
                    Vec::new()
                };
                prop_assert_eq!(&screened.reasons, &expected_reasons);

                let Some(FraudState::Velocity(window)) = h.state.get(&key) else {
                    return Err(fail(format!("no window under {key}")));
                };
                let expected_window: BTreeMap<String, i64> =
                    prior.iter().filter(|&(_, &t)| t >= oldest_kept).map(|(p, &t)| (p.clone(), t)).collect();
                prop_assert_eq!(&window.orders, &expected_window);
                for (other, state) in h.state.iter() {
                    let FraudState::Velocity(w) = state else { continue };
                    let newest = seen[&other].1;
                    prop_assert!(w.orders.values().all(|&t| newest - PROP_WINDOW_MS <= t && t <= newest));
                }
            }
        }

        /// Redeliveries never write state, and the decisions and final state for the
        /// distinct orders are the same as if nothing had been redelivered.
        #[test]
        fn decisions_never_depend_on_duplicates(
            orders in orders(),
            dups in prop::collection::vec(any::<(prop::sample::Index, prop::sample::Index)>(), 1..20),
        ) {
            let mut clean = harness(prop_settings());
            let mut expected = Vec::new();
            for o in &orders {
                expected.push(clean.screen(o).map_err(fail)?);
            }

            let mut noisy = harness(prop_settings());
            let mut first = Vec::new();
            let mut delivered = vec![false; orders.len()];
            for i in with_redeliveries(orders.len(), &dups) {
                noisy.state.commit();
                let screened = noisy.screen(&orders[i]).map_err(fail)?;
                if delivered[i] {
                    prop_assert!(!noisy.state.has_changes(), "redelivery of order {} wrote state", i);
                } else {
                    delivered[i] = true;
                    first.push(screened);
                }
            }
            prop_assert_eq!(first, expected);
            prop_assert_eq!(snapshot(&noisy.state), snapshot(&clean.state));
        }
    }
}
