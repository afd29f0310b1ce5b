//! Inventory: reserves stock for approved orders (all lines or none), applies stock
//! commands (restock, adjust, set threshold), releases a reservation when its payment
//! fails or its order is cancelled, and raises low-stock alerts on a crossing and from a
//! periodic watchdog.
//!
//! A customer cancellation reaches this stage as fulfillment's `CancellationAccepted`
//! (fulfillment alone decides, before `ReadyToShip`): stock held for the order — reserved,
//! or sold to it but not shipped — goes back once (`StockReleased`, reason
//! [`CANCELLED`]); an order not reserved yet is remembered as cancelled, so its screening,
//! arriving later, reserves nothing (and emits nothing: the order's status is already
//! `cancelled`, from the acceptance).
//!
//! Invariants, per (store, SKU):
//!
//! - stock never goes negative: a reservation that does not fit is rejected whole, and an
//!   adjustment below zero is dead-lettered before anything is written;
//! - available = restocked + adjusted − reserved + released, and, once every reservation
//!   is settled, reserved − released = sold (units of orders whose payment was
//!   authorized);
//! - an order is reserved at most once and released at most once: its record under
//!   [`order_key`] goes `Reserved` → `Closed` (or straight to `Closed` when out of stock),
//!   and a closed order ignores every later screening or payment outcome, even replayed
//!   ones with new event IDs; a `Sold` one is released once more only by a cancellation,
//!   which closes it as `Cancelled`. Closed records are retired [`SETTLED_RETENTION_MS`] after
//!   closing, which bounds the state; a reservation is kept until its payment settles.
//!
//! Low-stock alerts: threshold `t` (per SKU, else `default_low_stock_threshold`) means a
//! SKU is low at `available <= t`. A decrease that makes an armed SKU low emits one
//! `LowStock { trigger: Crossing }` and disarms it; it re-arms once its stock is above the
//! threshold again. Independently, a partition-wide watchdog timer lists every low SKU
//! every `watchdog_interval_secs`.
//!
//! A low spell that was reported (by a crossing or the watchdog) ends with one
//! `StockRecovered` as soon as the SKU is above its threshold again (a restock, an
//! adjustment, a release, a lower threshold; or, at the next watchdog round, a lower
//! default threshold). Both go to `inventory.threshold_reached`, in the order this stage
//! decided them, so that whoever follows a SKU's low spells (the alerts sink) reads them
//! in one order on every read, and every rebuild agrees with the first.

use serde::{Deserialize, Serialize};

use crate::config::InventorySettings;
use crate::events::{
    CancellationAccepted, Envelope, Event, EventType, LowStock, LowStockTrigger, OrderLine,
    OrderScreened, PaymentAuthorized, PaymentFailed, ScreeningDecision, Shortage, StockAdjusted,
    StockLevelChanged, StockRecovered, StockRejected, StockReleased, StockReserved, StockRestocked,
    ThresholdSet,
};
use crate::stages::{Ctx, Input, Stage, StageError, StageName, Store, Timer};
use crate::topics;

/// `StockRejected.reason` when at least one SKU is short.
pub const OUT_OF_STOCK: &str = "out_of_stock";
/// `StockReleased.reason` when the order's payment failed.
pub const PAYMENT_FAILED: &str = "payment_failed";
/// `StockReleased.reason` when the customer cancelled the order.
pub const CANCELLED: &str = "cancelled";
/// `StockLevelChanged.reason` of a restock (an adjustment carries its own reason).
pub const RESTOCK: &str = "restock";
/// How long a closed order is remembered: long enough that a replayed screening or
/// payment outcome of the order (with new event IDs) still finds it, short enough that the
/// state does not grow with the order history.
pub const SETTLED_RETENTION_MS: i64 = 7 * 24 * 60 * 60 * 1000;
/// The state key recording when the partition's watchdog is due.
pub const WATCHDOG_KEY: &str = "watchdog";

const RETIRE_TIMER_PREFIX: &str = "retire/";
const WATCHDOG_TIMER_PREFIX: &str = "watchdog/";

/// The value of one key of the inventory stage's state; the key says which variant it
/// holds (see [`stock_key`], [`order_key`], [`WATCHDOG_KEY`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InventoryState {
    /// One SKU of one store, under [`stock_key`].
    Stock(StockLevel),
    /// An order whose stock is held until its payment settles, under [`order_key`].
    Reserved(Reservation),
    /// An order that holds no stock any more and must not be reserved or released again,
    /// under [`order_key`]; deleted by its retirement timer.
    Closed(ClosedOrder),
    /// When the partition's watchdog fires, under [`WATCHDOG_KEY`]. [`Ctx`] can schedule
    /// a timer but not look one up, so this records that one is scheduled.
    Watchdog(WatchdogSchedule),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StockLevel {
    /// Units that can still be reserved; never negative.
    pub available: i32,
    /// Set by `ThresholdSet`; `None` follows `default_low_stock_threshold`, so changing
    /// the default applies to every SKU that never had its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<i32>,
    /// Whether the next decrease to or below the threshold raises a crossing alert:
    /// false from that alert until the stock is above the threshold again, so one low
    /// spell alerts once however many sales follow.
    pub armed: bool,
    /// Whether a `LowStock` reported this low spell and no `StockRecovered` has ended it.
    /// A level written before this field existed reads as reported: at worst one
    /// `StockRecovered` too many, which ends nothing.
    #[serde(default = "reported_by_default")]
    pub reported_low: bool,
}

fn reported_by_default() -> bool {
    true
}

/// What a new level means for the SKU's low spell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spell {
    Unchanged,
    /// A decrease made an armed SKU low: a crossing alert.
    Crossed,
    /// A reported low spell is over: the SKU is above its threshold.
    Recovered,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reservation {
    /// The order's lines as screened (repeated SKUs included): exactly what a release
    /// gives back and what `StockReleased` reports.
    pub items: Vec<OrderLine>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedOrder {
    pub outcome: OrderOutcome,
    /// When the retirement timer deletes this record (ms since the epoch).
    pub retire_at: i64,
    /// The lines of a `Sold` order, which a cancellation before shipping gives back;
    /// empty (and absent from the changelog) for every other outcome.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub items: Vec<OrderLine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderOutcome {
    /// Rejected for lack of stock; nothing was ever reserved.
    OutOfStock,
    /// Payment authorized: the reserved units are sold.
    Sold,
    /// Payment failed: the reserved units went back to stock.
    Released,
    /// The customer cancelled: whatever the order held went back to stock (or it was
    /// cancelled before it was reserved, and will not be).
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchdogSchedule {
    /// The scheduled timer's ID, `watchdog/{store}` after the store of the input that
    /// first scheduled it. Output IDs derive from the timer's ID and due time, and a
    /// store lives on one partition only, so two partitions whose watchdogs fire at the
    /// same instant still emit distinct event IDs.
    pub timer_id: String,
    pub due_at: i64,
}

fn unescape(part: &str) -> String {
    // Every `%` of an escaped part starts `%25` or `%2F`, so replacing `%2F` first can
    // only match a whole escaped `/`.
    part.replace("%2F", "/").replace("%25", "%")
}

/// The state key of one SKU's stock: `stock/{store_id}/{sku}`.
pub fn stock_key(store_id: &str, sku: &str) -> String {
    format!(
        "stock/{}/{}",
        super::key_part(store_id),
        super::key_part(sku)
    )
}

/// The (store, SKU) of a [`stock_key`].
fn parse_stock_key(key: &str) -> Option<(String, String)> {
    let (store, sku) = key.strip_prefix("stock/")?.split_once('/')?;
    Some((unescape(store), unescape(sku)))
}

/// The state key of one order's reservation or closed marker: `order/{store_id}/{order_id}`.
pub fn order_key(store_id: &str, order_id: &str) -> String {
    format!(
        "order/{}/{}",
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

/// The timer retiring an order's closed marker: `retire/{store_id}/{order_id}`, the order
/// key's parts under another prefix.
fn retire_timer_id(store_id: &str, order_id: &str) -> String {
    format!(
        "{RETIRE_TIMER_PREFIX}{}/{}",
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

fn watchdog_timer_id(store_id: &str) -> String {
    format!("{WATCHDOG_TIMER_PREFIX}{}", super::key_part(store_id))
}

/// Reserves, replenishes and releases stock; see the module documentation.
pub struct InventoryStage {
    settings: InventorySettings,
    /// `settings.watchdog_interval_secs` in milliseconds; `None` (an interval of 0)
    /// disables the watchdog rather than firing it on every batch.
    watchdog_ms: Option<i64>,
}

impl InventoryStage {
    pub fn new(settings: InventorySettings) -> Self {
        let watchdog_ms = match settings.watchdog_interval_secs {
            0 => None,
            secs => Some(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
        };
        InventoryStage {
            settings,
            watchdog_ms,
        }
    }

    fn threshold(&self, level: &StockLevel) -> i32 {
        level
            .threshold
            .unwrap_or(self.settings.default_low_stock_threshold)
    }

    /// The stock of a SKU; one never seen has none.
    fn stock(&self, state: &mut Store<InventoryState>, key: &str) -> StockLevel {
        match state.get(key) {
            Some(InventoryState::Stock(level)) => level.clone(),
            _ => {
                let mut level = StockLevel {
                    available: 0,
                    threshold: None,
                    armed: false,
                    reported_low: false,
                };
                level.armed = level.available > self.threshold(&level);
                level
            }
        }
    }

    /// Sets a level's available units and returns what that does to its low spell.
    ///
    /// Only a decrease can cross. `before > threshold` counts as armed too, so that a SKU
    /// whose threshold came from a default that has since been lowered still alerts.
    fn set_available(&self, level: &mut StockLevel, available: i32) -> Spell {
        let threshold = self.threshold(level);
        let before = level.available;
        level.available = available;
        if available > threshold {
            level.armed = true;
            if level.reported_low {
                level.reported_low = false;
                return Spell::Recovered;
            }
            return Spell::Unchanged;
        }
        if available < before && (level.armed || before > threshold) {
            level.armed = false;
            level.reported_low = true;
            return Spell::Crossed;
        }
        Spell::Unchanged
    }

    /// Emits the output that `spell` calls for, if any.
    fn spell_event(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        store_id: &str,
        sku: &str,
        level: &StockLevel,
        spell: Spell,
    ) {
        if let Some(event) = self.spell_output(ctx, store_id, sku, level, spell) {
            ctx.emit(event);
        }
    }

    fn spell_output(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        store_id: &str,
        sku: &str,
        level: &StockLevel,
        spell: Spell,
    ) -> Option<Event> {
        match spell {
            Spell::Unchanged => None,
            Spell::Crossed => Some(
                self.low_stock(ctx, store_id, sku, level, LowStockTrigger::Crossing)
                    .into(),
            ),
            Spell::Recovered => {
                let envelope = self.sku_envelope(ctx, store_id);
                Some(
                    StockRecovered {
                        envelope,
                        sku: sku.to_owned(),
                        available: level.available,
                        threshold: self.threshold(level),
                    }
                    .into(),
                )
            }
        }
    }

    /// The envelope of an event about a SKU rather than an order: it must not land in the
    /// timeline of the order whose input happened to cause it. Correlation and causation
    /// still lead back to the input for tracing.
    fn sku_envelope(&self, ctx: &mut Ctx<'_, InventoryState>, store_id: &str) -> Envelope {
        let mut envelope = ctx.next_envelope();
        envelope.order_id = None;
        envelope.store_id = store_id.to_owned();
        envelope
    }

    fn low_stock(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        store_id: &str,
        sku: &str,
        level: &StockLevel,
        trigger: LowStockTrigger,
    ) -> LowStock {
        let envelope = self.sku_envelope(ctx, store_id);
        LowStock {
            envelope,
            sku: sku.to_owned(),
            available: level.available,
            threshold: self.threshold(level),
            trigger,
        }
    }

    /// Closes an order's record and schedules its retirement.
    fn close(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        store_id: &str,
        order_id: &str,
        outcome: OrderOutcome,
        items: Vec<OrderLine>,
    ) {
        let retire_at = ctx.now().saturating_add(SETTLED_RETENTION_MS);
        ctx.state.insert(
            order_key(store_id, order_id),
            InventoryState::Closed(ClosedOrder {
                outcome,
                retire_at,
                items,
            }),
        );
        ctx.schedule(
            retire_timer_id(store_id, order_id),
            retire_at,
            serde_json::Value::Null,
        );
    }

    /// An approved order: reserve every line, or reject naming every short SKU.
    fn reserve(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        screened: &OrderScreened,
    ) -> Result<(), StageError> {
        if screened.decision != ScreeningDecision::Approved {
            return Ok(());
        }
        let store = screened.envelope.store_id.as_str();
        let order_id = required_order_id(&screened.envelope, "OrderScreened")?;
        let wanted = units_per_sku(store, order_id, &screened.items)?;
        let key = order_key(store, order_id);
        if ctx.state.contains(&key) {
            // Reserved, rejected or settled already: a replay with new event IDs.
            return Ok(());
        }

        let mut short = Vec::new();
        let mut plan = Vec::new();
        for (sku, requested) in wanted {
            let stock_key = stock_key(store, &sku);
            let level = self.stock(ctx.state, &stock_key);
            if level.available < requested {
                short.push(Shortage {
                    sku,
                    requested,
                    available: level.available,
                });
            } else {
                plan.push((stock_key, sku, level, requested));
            }
        }
        if !short.is_empty() {
            let envelope = ctx.next_envelope();
            ctx.emit(StockRejected {
                envelope,
                short,
                reason: OUT_OF_STOCK.to_owned(),
            });
            self.close(ctx, store, order_id, OrderOutcome::OutOfStock, Vec::new());
            return Ok(());
        }

        let envelope = ctx.next_envelope();
        ctx.emit(StockReserved {
            envelope,
            customer_id: screened.customer_id.clone(),
            currency: screened.currency.clone(),
            total_cents: screened.total_cents,
            items: screened.items.clone(),
        });
        for (stock_key, sku, mut level, requested) in plan {
            // `requested <= available` was checked above: no underflow, never negative.
            let available = level.available - requested;
            let spell = self.set_available(&mut level, available);
            self.spell_event(ctx, store, &sku, &level, spell);
            ctx.state.insert(stock_key, InventoryState::Stock(level));
        }
        ctx.state.insert(
            key,
            InventoryState::Reserved(Reservation {
                items: screened.items.clone(),
            }),
        );
        Ok(())
    }

    fn restock(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        restocked: &StockRestocked,
    ) -> Result<(), StageError> {
        let store = restocked.envelope.store_id.as_str();
        let sku = required_sku(store, &restocked.sku, "StockRestocked")?;
        if restocked.quantity <= 0 {
            return Err(StageError::Invalid(format!(
                "StockRestocked of sku {sku} in store {store}: quantity {} is not positive; use StockAdjusted to remove stock",
                restocked.quantity
            )));
        }
        let key = stock_key(store, sku);
        let mut level = self.stock(ctx.state, &key);
        let available = level
            .available
            .checked_add(restocked.quantity)
            .ok_or_else(|| {
                StageError::Invalid(format!(
                    "StockRestocked of sku {sku} in store {store}: {} + {} units exceeds {}",
                    level.available,
                    restocked.quantity,
                    i32::MAX
                ))
            })?;
        let spell = self.set_available(&mut level, available);
        let envelope = ctx.next_envelope();
        ctx.emit(StockLevelChanged {
            envelope,
            sku: sku.to_owned(),
            available,
            delta: restocked.quantity,
            reason: RESTOCK.to_owned(),
        });
        self.spell_event(ctx, store, sku, &level, spell);
        ctx.state.insert(key, InventoryState::Stock(level));
        Ok(())
    }

    fn adjust(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        adjusted: &StockAdjusted,
    ) -> Result<(), StageError> {
        let store = adjusted.envelope.store_id.as_str();
        let sku = required_sku(store, &adjusted.sku, "StockAdjusted")?;
        let key = stock_key(store, sku);
        let mut level = self.stock(ctx.state, &key);
        let available = match level.available.checked_add(adjusted.delta) {
            Some(a) if a >= 0 => a,
            Some(a) => {
                return Err(StageError::Invalid(format!(
                    "StockAdjusted of sku {sku} in store {store} by {} would leave {a} units available ({} now); stock never goes negative",
                    adjusted.delta, level.available
                )));
            }
            None => {
                return Err(StageError::Invalid(format!(
                    "StockAdjusted of sku {sku} in store {store}: {} + {} units exceeds {}",
                    level.available,
                    adjusted.delta,
                    i32::MAX
                )));
            }
        };
        let spell = self.set_available(&mut level, available);
        let envelope = ctx.next_envelope();
        ctx.emit(StockLevelChanged {
            envelope,
            sku: sku.to_owned(),
            available,
            delta: adjusted.delta,
            reason: adjusted.reason.clone(),
        });
        self.spell_event(ctx, store, sku, &level, spell);
        ctx.state.insert(key, InventoryState::Stock(level));
        Ok(())
    }

    /// Records a SKU's threshold. No alert: the watchdog reports a SKU that the new
    /// threshold makes low, and the SKU's next decrease alerts unless this low spell has
    /// alerted already. A threshold that puts a reported SKU above it ends the spell
    /// (`StockRecovered`).
    fn set_threshold(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        set: &ThresholdSet,
    ) -> Result<(), StageError> {
        let store = set.envelope.store_id.as_str();
        let sku = required_sku(store, &set.sku, "ThresholdSet")?;
        if set.threshold < 0 {
            return Err(StageError::Invalid(format!(
                "ThresholdSet of sku {sku} in store {store}: threshold {} is negative",
                set.threshold
            )));
        }
        let key = stock_key(store, sku);
        let mut level = self.stock(ctx.state, &key);
        level.threshold = Some(set.threshold);
        // Re-arms when the stock is above the new threshold; cannot cross (no decrease).
        let available = level.available;
        let spell = self.set_available(&mut level, available);
        self.spell_event(ctx, store, sku, &level, spell);
        ctx.state.insert(key, InventoryState::Stock(level));
        Ok(())
    }

    /// Compensation: a failed payment gives the order's reserved units back, once.
    fn release(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        failed: &PaymentFailed,
    ) -> Result<(), StageError> {
        let store = failed.envelope.store_id.as_str();
        let order_id = required_order_id(&failed.envelope, "PaymentFailed")?;
        let Some(InventoryState::Reserved(reservation)) =
            ctx.state.get(&order_key(store, order_id))
        else {
            // Sold, released, rejected, retired or never reserved: nothing is held.
            return Ok(());
        };
        let items = reservation.items.clone();
        self.give_back(
            ctx,
            store,
            order_id,
            items,
            PAYMENT_FAILED,
            OrderOutcome::Released,
        )
    }

    /// A customer cancellation that fulfillment accepted (so nothing has shipped): what
    /// the order holds, reserved or sold, goes back once; an order not reserved yet is
    /// closed so that it never will be.
    fn cancel(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        accepted: &CancellationAccepted,
    ) -> Result<(), StageError> {
        let store = accepted.envelope.store_id.as_str();
        let order_id = required_order_id(&accepted.envelope, "CancellationAccepted")?;
        let items = match ctx.state.get(&order_key(store, order_id)) {
            Some(InventoryState::Reserved(r)) => r.items.clone(),
            Some(InventoryState::Closed(ClosedOrder {
                outcome: OrderOutcome::Sold,
                items,
                ..
            })) if !items.is_empty() => items.clone(),
            // Sold before sold records kept their lines: what to give back is unknown.
            Some(InventoryState::Closed(ClosedOrder {
                outcome: OrderOutcome::Sold,
                ..
            })) => {
                tracing::warn!(
                    store_id = store,
                    order_id,
                    "a cancelled order's sold record has no lines; its stock is not given back"
                );
                self.close(ctx, store, order_id, OrderOutcome::Cancelled, Vec::new());
                return Ok(());
            }
            // Released, rejected or cancelled already: nothing is held, and nothing will be.
            Some(_) => return Ok(()),
            None => {
                self.close(ctx, store, order_id, OrderOutcome::Cancelled, Vec::new());
                return Ok(());
            }
        };
        self.give_back(
            ctx,
            store,
            order_id,
            items,
            CANCELLED,
            OrderOutcome::Cancelled,
        )
    }

    /// Puts an order's lines back on the shelf, reports it, and closes the order.
    fn give_back(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        store: &str,
        order_id: &str,
        items: Vec<OrderLine>,
        reason: &str,
        outcome: OrderOutcome,
    ) -> Result<(), StageError> {
        // Every new level is computed before anything is written. A SKU on several lines
        // recovers at most once: the step that takes it above its threshold says so.
        let mut plan: Vec<(String, &str, StockLevel, Spell)> = Vec::new();
        for line in &items {
            let key = stock_key(store, &line.sku);
            let at = match plan.iter().position(|(k, _, _, _)| *k == key) {
                Some(at) => at,
                None => {
                    let level = self.stock(ctx.state, &key);
                    plan.push((key, &line.sku, level, Spell::Unchanged));
                    plan.len() - 1
                }
            };
            let (_, _, level, spell) = &mut plan[at];
            let available = level.available.checked_add(line.quantity).ok_or_else(|| {
                StageError::Invalid(format!(
                    "releasing order {order_id} of store {store}: sku {} would exceed {} units",
                    line.sku,
                    i32::MAX
                ))
            })?;
            if self.set_available(level, available) == Spell::Recovered {
                *spell = Spell::Recovered;
            }
        }
        let envelope = ctx.next_envelope();
        ctx.emit(StockReleased {
            envelope,
            items: items.clone(),
            reason: reason.to_owned(),
        });
        for (key, sku, level, spell) in plan {
            self.spell_event(ctx, store, sku, &level, spell);
            ctx.state.insert(key, InventoryState::Stock(level));
        }
        self.close(ctx, store, order_id, outcome, Vec::new());
        Ok(())
    }

    /// An authorized payment: the reserved units are sold and the reservation goes.
    fn sell(
        &self,
        ctx: &mut Ctx<'_, InventoryState>,
        authorized: &PaymentAuthorized,
    ) -> Result<(), StageError> {
        let store = authorized.envelope.store_id.as_str();
        let order_id = required_order_id(&authorized.envelope, "PaymentAuthorized")?;
        if let Some(InventoryState::Reserved(r)) = ctx.state.get(&order_key(store, order_id)) {
            // The lines are kept: a cancellation before shipping gives them back.
            let items = r.items.clone();
            self.close(ctx, store, order_id, OrderOutcome::Sold, items);
        }
        Ok(())
    }

    /// Makes sure the partition's watchdog is scheduled (or, when disabled, is not).
    ///
    /// A marker overdue by more than a whole interval means its timer was lost (the
    /// runtime fires due timers at the end of every batch), so it is scheduled again, to
    /// fire at once.
    fn ensure_watchdog(&self, ctx: &mut Ctx<'_, InventoryState>, store_id: &str) {
        let marker = match ctx.state.get(WATCHDOG_KEY) {
            Some(InventoryState::Watchdog(w)) => Some(w.clone()),
            _ => None,
        };
        let now = ctx.now();
        let (timer_id, due_at) = match (self.watchdog_ms, marker) {
            (None, None) => return,
            (None, Some(w)) => {
                ctx.cancel(&w.timer_id);
                ctx.state.remove(WATCHDOG_KEY);
                return;
            }
            (Some(interval), Some(w)) if w.due_at.saturating_add(interval) >= now => return,
            (Some(_), Some(w)) => (w.timer_id, now),
            (Some(interval), None) => (watchdog_timer_id(store_id), now.saturating_add(interval)),
        };
        ctx.schedule(timer_id.clone(), due_at, serde_json::Value::Null);
        ctx.state.insert(
            WATCHDOG_KEY,
            InventoryState::Watchdog(WatchdogSchedule { timer_id, due_at }),
        );
    }

    /// Lists every low SKU of the partition, then schedules the next round.
    fn watchdog(&self, ctx: &mut Ctx<'_, InventoryState>, timer: &Timer) {
        let Some(interval) = self.watchdog_ms else {
            ctx.state.remove(WATCHDOG_KEY);
            return;
        };
        // Every low SKU, and every reported one that is not low any more (its default
        // threshold went down: no input told this stage).
        let mut swept: Vec<(String, String, String, StockLevel)> = ctx
            .state
            .scan("stock/")
            .into_iter()
            .filter_map(|(key, value)| match value {
                InventoryState::Stock(level)
                    if level.available <= self.threshold(&level) || level.reported_low =>
                {
                    let (store, sku) = parse_stock_key(&key)?;
                    Some((key, store, sku, level))
                }
                _ => None,
            })
            .collect();
        // Output IDs follow the emission order, which must not follow the hash map's.
        swept.sort_by(|a, b| (&a.1, &a.2).cmp(&(&b.1, &b.2)));
        for (key, store, sku, mut level) in swept {
            if level.available > self.threshold(&level) {
                let available = level.available;
                let spell = self.set_available(&mut level, available);
                if let Some(mut event) = self.spell_output(ctx, &store, &sku, &level, spell) {
                    let envelope = event.envelope_mut();
                    envelope.correlation_id = timer.firing_id();
                    envelope.causation_id = None;
                    ctx.emit(event);
                }
                ctx.state.insert(key, InventoryState::Stock(level));
                continue;
            }
            let mut alert = self.low_stock(ctx, &store, &sku, &level, LowStockTrigger::Watchdog);
            // The timer's cause is whichever input first scheduled the watchdog: the
            // alert belongs to no flow but this firing.
            alert.envelope.correlation_id = timer.firing_id();
            alert.envelope.causation_id = None;
            ctx.emit(alert);
            if !level.reported_low {
                level.reported_low = true;
                ctx.state.insert(key, InventoryState::Stock(level));
            }
        }
        // Keep the cadence, but skip rounds missed while no worker ran the partition
        // instead of firing them back to back.
        let next = timer.due_at.saturating_add(interval);
        let due_at = if next > ctx.now() {
            next
        } else {
            ctx.now().saturating_add(interval)
        };
        ctx.schedule(timer.id.clone(), due_at, serde_json::Value::Null);
        ctx.state.insert(
            WATCHDOG_KEY,
            InventoryState::Watchdog(WatchdogSchedule {
                timer_id: timer.id.clone(),
                due_at,
            }),
        );
    }
}

fn required_order_id<'e>(envelope: &'e Envelope, event: &str) -> Result<&'e str, StageError> {
    envelope.order_id.as_deref().ok_or_else(|| {
        StageError::Invalid(format!(
            "{event} {} of store {} has no order_id",
            envelope.event_id, envelope.store_id
        ))
    })
}

fn required_sku<'s>(store_id: &str, sku: &'s str, event: &str) -> Result<&'s str, StageError> {
    if sku.is_empty() {
        return Err(StageError::Invalid(format!(
            "{event} in store {store_id} has an empty sku"
        )));
    }
    Ok(sku)
}

/// Units requested per SKU, repeated SKUs summed, in order of first appearance (the order
/// in which shortages are listed and alerts emitted).
fn units_per_sku(
    store_id: &str,
    order_id: &str,
    items: &[OrderLine],
) -> Result<Vec<(String, i32)>, StageError> {
    let mut units: Vec<(String, i32)> = Vec::new();
    for line in items {
        required_sku(store_id, &line.sku, "OrderScreened")?;
        if line.quantity <= 0 {
            return Err(StageError::Invalid(format!(
                "order {order_id} of store {store_id}: sku {} has quantity {}; quantities must be positive",
                line.sku, line.quantity
            )));
        }
        match units.iter_mut().find(|(sku, _)| *sku == line.sku) {
            Some((_, n)) => {
                *n = n.checked_add(line.quantity).ok_or_else(|| {
                    StageError::Invalid(format!(
                        "order {order_id} of store {store_id}: quantities of sku {} add up beyond {}",
                        line.sku,
                        i32::MAX
                    ))
                })?;
            }
            None => units.push((line.sku.clone(), line.quantity)),
        }
    }
    Ok(units)
}

impl Stage for InventoryStage {
    type State = InventoryState;

    fn name(&self) -> &'static str {
        StageName::Inventory.as_str()
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[
            topics::ORDER_SCREENED,
            topics::INVENTORY_COMMANDS,
            topics::PAYMENT_PROCESSED,
            topics::FULFILLMENT_UPDATED,
        ]
    }

    /// A payment retry holds the reservation and a refund follows an authorization whose
    /// units left the shelf; fulfillment's progress and a refused cancellation hold
    /// nothing for stock.
    fn ignores(&self, topic: &str, t: EventType) -> bool {
        use EventType::*;
        match topic {
            topics::PAYMENT_PROCESSED => matches!(t, PaymentRetrying | PaymentRefunded),
            topics::FULFILLMENT_UPDATED => {
                matches!(t, Picking | Packed | ReadyToShip | CancellationRefused)
            }
            _ => false,
        }
    }

    fn process(
        &mut self,
        ctx: &mut Ctx<'_, InventoryState>,
        input: Input<'_>,
    ) -> Result<(), StageError> {
        if self.ignores(input.topic, input.event.event_type()) {
            return Ok(());
        }
        // Each handler returns its error before writing anything, and the watchdog is
        // only scheduled after a success, so a dead-lettered record leaves no trace.
        match (input.topic, input.event) {
            (topics::ORDER_SCREENED, Event::OrderScreened(s)) => self.reserve(ctx, s)?,
            (topics::INVENTORY_COMMANDS, Event::StockRestocked(c)) => self.restock(ctx, c)?,
            (topics::INVENTORY_COMMANDS, Event::StockAdjusted(c)) => self.adjust(ctx, c)?,
            (topics::INVENTORY_COMMANDS, Event::ThresholdSet(c)) => self.set_threshold(ctx, c)?,
            (topics::PAYMENT_PROCESSED, Event::PaymentFailed(p)) => self.release(ctx, p)?,
            (topics::PAYMENT_PROCESSED, Event::PaymentAuthorized(p)) => self.sell(ctx, p)?,
            // A retry holds the reservation; a refund follows an authorization, whose
            // units left the shelf (returned goods come back by command).
            (topics::PAYMENT_PROCESSED, Event::PaymentRetrying(_) | Event::PaymentRefunded(_)) => {}
            (topics::FULFILLMENT_UPDATED, Event::CancellationAccepted(c)) => self.cancel(ctx, c)?,
            // Fulfillment's progress, and a refused cancellation, hold nothing for stock.
            (
                topics::FULFILLMENT_UPDATED,
                Event::Picking(_)
                | Event::Packed(_)
                | Event::ReadyToShip(_)
                | Event::CancellationRefused(_),
            ) => {}
            _ => {
                return Err(StageError::Unexpected {
                    event_type: input.event.event_type().to_string(),
                    topic: input.topic.to_owned(),
                });
            }
        }
        self.ensure_watchdog(ctx, &input.event.envelope().store_id);
        Ok(())
    }

    fn on_timer(
        &mut self,
        ctx: &mut Ctx<'_, InventoryState>,
        timer: &Timer,
    ) -> Result<(), StageError> {
        if let Some(order) = timer.id.strip_prefix(RETIRE_TIMER_PREFIX) {
            // The timer ID holds the order key's escaped parts.
            let key = format!("order/{order}");
            // Only a closed marker retires; a reservation is held until its payment
            // settles, whatever timer a past life of the order left.
            if let Some(InventoryState::Closed(_)) = ctx.state.get(&key) {
                ctx.state.remove(&key);
            }
            Ok(())
        } else if timer.id.starts_with(WATCHDOG_TIMER_PREFIX) {
            self.watchdog(ctx, timer);
            Ok(())
        } else {
            Err(StageError::Invalid(format!(
                "inventory has no timer like {:?}",
                timer.id
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};
    use std::error::Error;
    use std::sync::atomic::{AtomicU64, Ordering};

    use proptest::prelude::*;

    use super::*;
    use crate::events::{PaymentFailureReason, PaymentRefunded, PaymentRetrying, derive_id};
    use crate::stages::driver::Driver;

    type TestResult = Result<(), Box<dyn Error>>;

    const NOW: i64 = 1_700_000_000_000;
    const WATCHDOG_MS: i64 = 60_000;

    fn settings() -> InventorySettings {
        InventorySettings {
            watchdog_interval_secs: 60,
            default_low_stock_threshold: 0,
        }
    }

    /// Every constructed input gets a fresh event ID, as a replayed topic would: the
    /// runtime's dedup by ID cannot help, only the stage's own records can.
    fn envelope(store: &str, order: Option<&str>) -> Envelope {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        Envelope {
            event_id: format!("in-{n}"),
            order_id: order.map(str::to_owned),
            store_id: store.to_owned(),
            correlation_id: format!("corr-{store}-{}", order.unwrap_or("cmd")),
            causation_id: None,
            occurred_at: 0,
            schema_version: 1,
        }
    }

    fn lines(lines: &[(&str, i32)]) -> Vec<OrderLine> {
        lines
            .iter()
            .map(|&(sku, quantity)| OrderLine {
                sku: sku.to_owned(),
                quantity,
                unit_price_cents: 100,
            })
            .collect()
    }

    fn screening(
        store: &str,
        order: &str,
        items: &[(&str, i32)],
        decision: ScreeningDecision,
    ) -> Event {
        let items = lines(items);
        Event::OrderScreened(OrderScreened {
            envelope: envelope(store, Some(order)),
            decision,
            reasons: Vec::new(),
            customer_id: "c-1".into(),
            email: "c-1@shop.test".into(),
            currency: "EUR".into(),
            total_cents: items.iter().map(|l| 100 * i64::from(l.quantity)).sum(),
            items,
        })
    }

    fn approved(store: &str, order: &str, items: &[(&str, i32)]) -> Event {
        screening(store, order, items, ScreeningDecision::Approved)
    }

    fn restock(store: &str, sku: &str, quantity: i32) -> Event {
        Event::StockRestocked(StockRestocked {
            envelope: envelope(store, None),
            sku: sku.into(),
            quantity,
            note: None,
        })
    }

    fn adjust(store: &str, sku: &str, delta: i32) -> Event {
        Event::StockAdjusted(StockAdjusted {
            envelope: envelope(store, None),
            sku: sku.into(),
            delta,
            reason: "count".into(),
        })
    }

    fn threshold(store: &str, sku: &str, threshold: i32) -> Event {
        Event::ThresholdSet(ThresholdSet {
            envelope: envelope(store, None),
            sku: sku.into(),
            threshold,
        })
    }

    fn failed(store: &str, order: &str) -> Event {
        Event::PaymentFailed(PaymentFailed {
            envelope: envelope(store, Some(order)),
            amount_cents: 100,
            currency: "EUR".into(),
            attempts: 3,
            reason: PaymentFailureReason::Declined,
            message: "declined".into(),
        })
    }

    fn authorized(store: &str, order: &str) -> Event {
        Event::PaymentAuthorized(PaymentAuthorized {
            envelope: envelope(store, Some(order)),
            amount_cents: 100,
            currency: "EUR".into(),
            attempt: 1,
            authorization_id: format!("auth-{order}"),
        })
    }

    fn retrying(store: &str, order: &str) -> Event {
        Event::PaymentRetrying(PaymentRetrying {
            envelope: envelope(store, Some(order)),
            amount_cents: 100,
            currency: "EUR".into(),
            attempt: 1,
            next_attempt_at: NOW,
            error: "timeout".into(),
        })
    }

    fn refunded(store: &str, order: &str) -> Event {
        Event::PaymentRefunded(PaymentRefunded {
            envelope: envelope(store, Some(order)),
            amount_cents: 100,
            currency: "EUR".into(),
            refund_id: "r-1".into(),
            reason: "returned".into(),
        })
    }

    fn accepted(store: &str, order: &str) -> Event {
        Event::CancellationAccepted(CancellationAccepted {
            envelope: envelope(store, Some(order)),
            reason: Some("changed my mind".into()),
        })
    }

    fn lines_brief(items: &[OrderLine]) -> String {
        let parts: Vec<String> = items
            .iter()
            .map(|l| format!("{}:{}", l.sku, l.quantity))
            .collect();
        parts.join(",")
    }

    /// One line per output, for table assertions that read like the event stream.
    fn brief(e: &Event) -> String {
        match e {
            Event::StockReserved(r) => format!("reserved {}", lines_brief(&r.items)),
            Event::StockRejected(r) => {
                let short: Vec<String> = r
                    .short
                    .iter()
                    .map(|s| format!("{}:{}/{}", s.sku, s.requested, s.available))
                    .collect();
                format!("rejected {} {}", r.reason, short.join(","))
            }
            Event::StockReleased(r) => format!("released {} {}", lines_brief(&r.items), r.reason),
            Event::StockLevelChanged(c) => {
                format!("level {} {} {:+} {}", c.sku, c.available, c.delta, c.reason)
            }
            Event::LowStock(l) => {
                let trigger = match l.trigger {
                    LowStockTrigger::Crossing => "crossing",
                    LowStockTrigger::Watchdog => "watchdog",
                };
                format!(
                    "low {}/{} {}<={} {trigger}",
                    l.envelope.store_id, l.sku, l.available, l.threshold
                )
            }
            Event::StockRecovered(r) => format!(
                "recovered {}/{} {}>{}",
                r.envelope.store_id, r.sku, r.available, r.threshold
            ),
            other => format!("{other:?}"),
        }
    }

    fn briefs(events: &[Event]) -> Vec<String> {
        events.iter().map(brief).collect()
    }

    /// The stage on the runtime's own calls, at `NOW`.
    type Harness = Driver<InventoryStage>;

    fn harness(settings: InventorySettings) -> Harness {
        Driver::new(InventoryStage::new(settings), NOW)
    }

    impl Driver<InventoryStage> {
        /// Feeds events that must all succeed; returns their outputs, concatenated.
        fn run(&mut self, events: &[Event]) -> Result<Vec<Event>, StageError> {
            let mut out = Vec::new();
            for e in events {
                out.extend(self.process(e)?);
            }
            Ok(out)
        }

        /// Fires timer `id`, which must exist.
        fn fire_id(&mut self, id: &str) -> Result<Vec<Event>, Box<dyn Error>> {
            Ok(self.fire(id).ok_or_else(|| format!("no timer {id}"))??)
        }

        fn stock(&self, store: &str, sku: &str) -> Option<StockLevel> {
            match self.state.peek(&stock_key(store, sku)) {
                Some(InventoryState::Stock(level)) => Some(level.clone()),
                _ => None,
            }
        }

        fn available(&self, store: &str, sku: &str) -> Option<i32> {
            self.stock(store, sku).map(|l| l.available)
        }

        fn order(&self, store: &str, order: &str) -> Option<&InventoryState> {
            self.state.peek(&order_key(store, order))
        }

        fn timer(&self, id: &str) -> Option<&Timer> {
            self.timers.peek(id)
        }

        fn untouched(&self) -> bool {
            !self.state.has_changes() && !self.timers.has_changes()
        }
    }

    fn closed(outcome: OrderOutcome, closed_at: i64) -> InventoryState {
        InventoryState::Closed(ClosedOrder {
            outcome,
            retire_at: closed_at + SETTLED_RETENTION_MS,
            items: Vec::new(),
        })
    }

    /// A sold order's record, which keeps its lines for a cancellation.
    fn sold(items: &[(&str, i32)], closed_at: i64) -> InventoryState {
        InventoryState::Closed(ClosedOrder {
            outcome: OrderOutcome::Sold,
            retire_at: closed_at + SETTLED_RETENTION_MS,
            items: lines(items),
        })
    }

    fn reserved(items: &[(&str, i32)]) -> InventoryState {
        InventoryState::Reserved(Reservation {
            items: lines(items),
        })
    }

    #[test]
    fn stage_identity() {
        let stage = InventoryStage::new(settings());
        assert_eq!(stage.name(), "inventory");
        assert_eq!(
            stage.inputs(),
            &[
                "order.screened",
                "inventory.commands",
                "payment.processed",
                "fulfillment.updated"
            ]
        );
    }

    #[test]
    fn a_reservation_is_all_lines_or_none() -> TestResult {
        type Case<'a> = (
            &'a str,
            &'a [(&'a str, i32)],
            &'a [(&'a str, i32)],
            &'a [&'a str],
            &'a [(&'a str, Option<i32>)],
        );
        // (case, stock before, order lines, outputs, stock after)
        let cases: &[Case] = &[
            (
                "every line fits",
                &[("a", 5), ("b", 3)],
                &[("a", 2), ("b", 1)],
                &["reserved a:2,b:1"],
                &[("a", Some(3)), ("b", Some(2))],
            ),
            (
                "the last units",
                &[("a", 2)],
                &[("a", 2)],
                &["reserved a:2", "low s-1/a 0<=0 crossing"],
                &[("a", Some(0))],
            ),
            (
                "one short line rejects the whole order",
                &[("a", 5), ("b", 1)],
                &[("a", 2), ("b", 2)],
                &["rejected out_of_stock b:2/1"],
                &[("a", Some(5)), ("b", Some(1))],
            ),
            (
                "a repeated sku is summed and rejected",
                &[("a", 3)],
                &[("a", 2), ("a", 2)],
                &["rejected out_of_stock a:4/3"],
                &[("a", Some(3))],
            ),
            (
                "a repeated sku is summed and fits",
                &[("a", 4), ("b", 1)],
                &[("a", 2), ("b", 1), ("a", 2)],
                &[
                    "reserved a:2,b:1,a:2",
                    "low s-1/a 0<=0 crossing",
                    "low s-1/b 0<=0 crossing",
                ],
                &[("a", Some(0)), ("b", Some(0))],
            ),
            (
                "an unknown sku has nothing available",
                &[("a", 5)],
                &[("a", 1), ("z", 1)],
                &["rejected out_of_stock z:1/0"],
                &[("a", Some(5)), ("z", None)],
            ),
            (
                "every short sku is named, in order",
                &[("a", 1), ("b", 9)],
                &[("z", 2), ("a", 3), ("b", 9), ("y", 1)],
                &["rejected out_of_stock z:2/0,a:3/1,y:1/0"],
                &[("a", Some(1)), ("b", Some(9)), ("y", None), ("z", None)],
            ),
            (
                "an order without lines holds nothing",
                &[],
                &[],
                &["reserved "],
                &[],
            ),
        ];
        for &(case, before, items, outputs, after) in cases {
            let mut h = harness(settings());
            for &(sku, n) in before {
                h.process(&restock("s-1", sku, n))?;
            }
            let out = h.process(&approved("s-1", "o-1", items))?;
            assert_eq!(briefs(&out), outputs, "{case}");
            for &(sku, n) in after {
                assert_eq!(h.available("s-1", sku), n, "{case}: {sku}");
            }
            let expected = if outputs[0].starts_with("reserved") {
                reserved(items)
            } else {
                closed(OrderOutcome::OutOfStock, NOW)
            };
            assert_eq!(h.order("s-1", "o-1"), Some(&expected), "{case}");
        }
        Ok(())
    }

    #[test]
    fn a_reservation_carries_the_order_forward() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 5))?;
        let input = approved("s-1", "o-1", &[("a", 2)]);
        let Event::OrderScreened(screened) = &input else {
            return Err("not a screening".into());
        };
        let out = h.process(&input)?;
        let [Event::StockReserved(r)] = out.as_slice() else {
            return Err(format!("expected one StockReserved, got {out:?}").into());
        };
        assert_eq!(r.customer_id, "c-1");
        assert_eq!(r.currency, "EUR");
        assert_eq!(r.total_cents, 200);
        assert_eq!(r.items, screened.items);
        let cause = &screened.envelope;
        assert_eq!(
            r.envelope.event_id,
            derive_id(&cause.event_id, "inventory", 0).to_string()
        );
        assert_eq!(
            r.envelope.causation_id.as_deref(),
            Some(cause.event_id.as_str())
        );
        assert_eq!(r.envelope.correlation_id, cause.correlation_id);
        assert_eq!(r.envelope.order_id.as_deref(), Some("o-1"));
        assert_eq!(r.envelope.store_id, "s-1");
        assert_eq!(r.envelope.occurred_at, NOW);

        // The same input again (a fresh partition replaying it) yields the same IDs.
        let mut again = harness(settings());
        again.process(&restock("s-1", "a", 5))?;
        assert_eq!(again.process(&input)?, out);
        Ok(())
    }

    #[test]
    fn rejected_screenings_are_ignored() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 5))?;
        h.commit();
        let rejected = screening("s-1", "o-1", &[("a", 2)], ScreeningDecision::Rejected);
        assert_eq!(h.process(&rejected)?, []);
        assert!(h.untouched());
        assert_eq!(h.available("s-1", "a"), Some(5));
        assert_eq!(h.order("s-1", "o-1"), None);
        Ok(())
    }

    #[test]
    fn an_order_is_never_reserved_twice() -> TestResult {
        // (case, history of the order, its record afterwards)
        let cases: &[(&str, Vec<Event>, InventoryState)] = &[
            (
                "reserved",
                vec![approved("s-1", "o-1", &[("a", 2)])],
                reserved(&[("a", 2)]),
            ),
            (
                "rejected for stock",
                vec![approved("s-1", "o-1", &[("a", 99)])],
                closed(OrderOutcome::OutOfStock, NOW),
            ),
            (
                "sold",
                vec![
                    approved("s-1", "o-1", &[("a", 2)]),
                    authorized("s-1", "o-1"),
                ],
                sold(&[("a", 2)], NOW),
            ),
            (
                "released",
                vec![approved("s-1", "o-1", &[("a", 2)]), failed("s-1", "o-1")],
                closed(OrderOutcome::Released, NOW),
            ),
        ];
        for (case, history, record) in cases {
            let mut h = harness(settings());
            h.process(&restock("s-1", "a", 5))?;
            h.run(history)?;
            // Plenty of stock now, so only the order's record can prevent a reservation.
            h.process(&restock("s-1", "a", 100))?;
            let available = h.available("s-1", "a");
            h.commit();
            let replay = approved("s-1", "o-1", &[("a", 2)]);
            assert_eq!(h.process(&replay)?, [], "{case}");
            assert!(h.untouched(), "{case}");
            assert_eq!(h.available("s-1", "a"), available, "{case}");
            assert_eq!(h.order("s-1", "o-1"), Some(record), "{case}");
        }
        Ok(())
    }

    #[test]
    fn commands_change_stock_and_report_the_level() -> TestResult {
        /// (case, earlier commands, command, outputs, available after)
        type Case<'a> = (&'a str, Vec<Event>, Event, &'a [&'a str], i32);
        let cases: &[Case] = &[
            (
                "restock of a new sku",
                vec![],
                restock("s-1", "a", 5),
                &["level a 5 +5 restock"],
                5,
            ),
            (
                "restock adds",
                vec![restock("s-1", "a", 5)],
                restock("s-1", "a", 3),
                &["level a 8 +3 restock"],
                8,
            ),
            (
                "adjust up",
                vec![restock("s-1", "a", 5)],
                adjust("s-1", "a", 2),
                &["level a 7 +2 count"],
                7,
            ),
            (
                "adjust up a new sku",
                vec![],
                adjust("s-1", "a", 4),
                &["level a 4 +4 count"],
                4,
            ),
            (
                "adjust down",
                vec![restock("s-1", "a", 5)],
                adjust("s-1", "a", -2),
                &["level a 3 -2 count"],
                3,
            ),
            (
                "adjust down to zero",
                vec![restock("s-1", "a", 5)],
                adjust("s-1", "a", -5),
                &["level a 0 -5 count", "low s-1/a 0<=0 crossing"],
                0,
            ),
            (
                "adjust by nothing (a confirmed count)",
                vec![restock("s-1", "a", 5)],
                adjust("s-1", "a", 0),
                &["level a 5 +0 count"],
                5,
            ),
        ];
        for (case, before, command, outputs, available) in cases {
            let mut h = harness(settings());
            h.run(before)?;
            let out = h.process(command)?;
            assert_eq!(briefs(&out), *outputs, "{case}");
            assert_eq!(h.available("s-1", "a"), Some(*available), "{case}");
            // A command concerns no order; its outputs inherit its store and flow.
            let cause = command.envelope();
            for (i, e) in out.iter().enumerate() {
                let env = e.envelope();
                assert_eq!(env.order_id, None, "{case}");
                assert_eq!(env.store_id, "s-1", "{case}");
                assert_eq!(env.correlation_id, cause.correlation_id, "{case}");
                let ordinal = u32::try_from(i)?;
                assert_eq!(
                    env.event_id,
                    derive_id(&cause.event_id, "inventory", ordinal).to_string(),
                    "{case}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn an_adjustment_below_zero_is_invalid_and_leaves_no_trace() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 3))?;
        let before = h.stock("s-1", "a");
        h.commit();
        let err = h.process(&adjust("s-1", "a", -4));
        assert_eq!(
            err,
            Err(StageError::Invalid(
                "StockAdjusted of sku a in store s-1 by -4 would leave -1 units available (3 now); stock never goes negative".into()
            ))
        );
        assert!(h.untouched());
        assert_eq!(h.stock("s-1", "a"), before);

        // On a partition that never saw an input, not even the watchdog is scheduled.
        let mut fresh = harness(settings());
        assert!(matches!(
            fresh.process(&adjust("s-1", "a", -1)),
            Err(StageError::Invalid(_))
        ));
        assert!(fresh.state.is_empty() && fresh.timers.is_empty());
        Ok(())
    }

    #[test]
    fn impossible_inputs_are_invalid_and_leave_no_trace() -> TestResult {
        let mut no_order = approved("s-1", "o-1", &[("a", 1)]);
        no_order.envelope_mut().order_id = None;
        let mut failed_no_order = failed("s-1", "o-1");
        failed_no_order.envelope_mut().order_id = None;
        let mut authorized_no_order = authorized("s-1", "o-1");
        authorized_no_order.envelope_mut().order_id = None;
        // (case, earlier inputs, input, part of the message)
        let cases: Vec<(&str, Vec<Event>, Event, &str)> = vec![
            (
                "restock of nothing",
                vec![],
                restock("s-1", "a", 0),
                "not positive",
            ),
            (
                "negative restock",
                vec![],
                restock("s-1", "a", -3),
                "not positive",
            ),
            (
                "restock beyond i32",
                vec![restock("s-1", "a", i32::MAX)],
                restock("s-1", "a", 1),
                "exceeds 2147483647",
            ),
            (
                "adjustment beyond i32",
                vec![restock("s-1", "a", i32::MAX)],
                adjust("s-1", "a", 1),
                "exceeds 2147483647",
            ),
            (
                "negative threshold",
                vec![],
                threshold("s-1", "a", -1),
                "negative",
            ),
            (
                "restock of an empty sku",
                vec![],
                restock("s-1", "", 1),
                "empty sku",
            ),
            (
                "threshold of an empty sku",
                vec![],
                threshold("s-1", "", 1),
                "empty sku",
            ),
            (
                "screening without an order",
                vec![],
                no_order,
                "has no order_id",
            ),
            (
                "a line of no units",
                vec![restock("s-1", "a", 5)],
                approved("s-1", "o-1", &[("a", 1), ("b", 0)]),
                "quantity 0",
            ),
            (
                "a negative line",
                vec![restock("s-1", "a", 5)],
                approved("s-1", "o-1", &[("a", -1)]),
                "quantity -1",
            ),
            (
                "a line of an empty sku",
                vec![],
                approved("s-1", "o-1", &[("", 1)]),
                "empty sku",
            ),
            (
                "repeated lines beyond i32",
                vec![],
                approved("s-1", "o-1", &[("a", i32::MAX), ("a", 1)]),
                "add up beyond",
            ),
            (
                "a failed payment without an order",
                vec![],
                failed_no_order,
                "has no order_id",
            ),
            (
                "an authorization without an order",
                vec![],
                authorized_no_order,
                "has no order_id",
            ),
            (
                "a release beyond i32",
                vec![
                    restock("s-1", "a", 5),
                    approved("s-1", "o-1", &[("a", 5)]),
                    restock("s-1", "a", i32::MAX),
                ],
                failed("s-1", "o-1"),
                "would exceed",
            ),
        ];
        for (case, before, input, message) in cases {
            let mut h = harness(settings());
            h.run(&before)?;
            h.commit();
            let snapshot: BTreeMap<String, InventoryState> = h
                .state
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            match h.process(&input) {
                Err(StageError::Invalid(m)) => assert!(m.contains(message), "{case}: {m}"),
                other => panic!("{case}: expected Invalid, got {other:?}"),
            }
            assert!(h.untouched(), "{case}");
            let after: BTreeMap<String, InventoryState> = h
                .state
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            assert_eq!(after, snapshot, "{case}");
        }
        Ok(())
    }

    #[test]
    fn events_of_the_wrong_kind_are_unexpected() {
        let cases: Vec<(&str, Event)> = vec![
            (topics::ORDER_SCREENED, restock("s-1", "a", 1)),
            (topics::INVENTORY_COMMANDS, approved("s-1", "o-1", &[])),
            (topics::INVENTORY_COMMANDS, failed("s-1", "o-1")),
            (topics::PAYMENT_PROCESSED, restock("s-1", "a", 1)),
            (topics::PAYMENT_PROCESSED, approved("s-1", "o-1", &[])),
            (topics::ORDER_CREATED, approved("s-1", "o-1", &[])),
        ];
        for (topic, event) in cases {
            let mut h = harness(settings());
            assert_eq!(
                h.process_on(topic, &event),
                Err(StageError::Unexpected {
                    event_type: event.event_type().to_string(),
                    topic: topic.to_owned(),
                }),
                "{} on {topic}",
                event.event_type()
            );
            assert!(h.state.is_empty() && h.timers.is_empty());
        }
    }

    #[test]
    fn a_threshold_is_recorded_without_output() -> TestResult {
        let mut h = harness(settings());
        assert_eq!(h.process(&threshold("s-1", "a", 3))?, []);
        assert_eq!(
            h.stock("s-1", "a"),
            Some(StockLevel {
                available: 0,
                threshold: Some(3),
                armed: false,
                reported_low: false,
            })
        );
        h.process(&restock("s-1", "a", 5))?;
        assert_eq!(h.process(&threshold("s-1", "a", 4))?, []);
        assert_eq!(
            h.stock("s-1", "a"),
            Some(StockLevel {
                available: 5,
                threshold: Some(4),
                armed: true,
                reported_low: false,
            })
        );
        // Another store's SKU of the same name is another SKU.
        assert_eq!(h.stock("s-2", "a"), None);
        Ok(())
    }

    #[test]
    fn a_crossing_alerts_once_per_low_spell_and_rearms_above_the_threshold() -> TestResult {
        let mut h = harness(settings());
        // (step, outputs, available after, armed after)
        let steps: Vec<(Event, &[&str], i32, bool)> = vec![
            (threshold("s-1", "a", 3), &[], 0, false),
            (
                restock("s-1", "a", 10),
                &["level a 10 +10 restock"],
                10,
                true,
            ),
            (
                approved("s-1", "o-1", &[("a", 6)]),
                &["reserved a:6"],
                4,
                true,
            ),
            (
                approved("s-1", "o-2", &[("a", 1)]),
                &["reserved a:1", "low s-1/a 3<=3 crossing"],
                3,
                false,
            ),
            (
                approved("s-1", "o-3", &[("a", 1)]),
                &["reserved a:1"],
                2,
                false,
            ),
            (adjust("s-1", "a", -1), &["level a 1 -1 count"], 1, false),
            (restock("s-1", "a", 1), &["level a 2 +1 restock"], 2, false),
            (adjust("s-1", "a", -1), &["level a 1 -1 count"], 1, false),
            (
                restock("s-1", "a", 3),
                &["level a 4 +3 restock", "recovered s-1/a 4>3"],
                4,
                true,
            ),
            (
                adjust("s-1", "a", -1),
                &["level a 3 -1 count", "low s-1/a 3<=3 crossing"],
                3,
                false,
            ),
        ];
        for (i, (event, outputs, available, armed)) in steps.iter().enumerate() {
            let out = h.process(event)?;
            assert_eq!(briefs(&out), *outputs, "step {i}");
            let level = h.stock("s-1", "a").ok_or("no stock")?;
            assert_eq!(
                (level.available, level.armed),
                (*available, *armed),
                "step {i}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_crossing_alert_names_the_sku_not_the_order() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 1))?;
        let input = approved("s-1", "o-1", &[("a", 1)]);
        let out = h.process(&input)?;
        let [Event::StockReserved(_), Event::LowStock(low)] = out.as_slice() else {
            return Err(format!("expected StockReserved and LowStock, got {out:?}").into());
        };
        let cause = input.envelope();
        assert_eq!(low.envelope.order_id, None);
        assert_eq!(low.envelope.store_id, "s-1");
        assert_eq!(low.envelope.correlation_id, cause.correlation_id);
        assert_eq!(
            low.envelope.causation_id.as_deref(),
            Some(cause.event_id.as_str())
        );
        assert_eq!(
            low.envelope.event_id,
            derive_id(&cause.event_id, "inventory", 1).to_string()
        );
        Ok(())
    }

    #[test]
    fn the_default_threshold_applies_to_skus_without_their_own() -> TestResult {
        // (default threshold, restocked, reserved, outputs)
        let cases: &[(i32, i32, i32, &[&str])] = &[
            (0, 2, 1, &["reserved a:1"]),
            (0, 2, 2, &["reserved a:2", "low s-1/a 0<=0 crossing"]),
            (5, 6, 1, &["reserved a:1", "low s-1/a 5<=5 crossing"]),
            (5, 7, 1, &["reserved a:1"]),
        ];
        for &(default, stock, reserve, outputs) in cases {
            let mut h = harness(InventorySettings {
                default_low_stock_threshold: default,
                ..settings()
            });
            h.process(&restock("s-1", "a", stock))?;
            let out = h.process(&approved("s-1", "o-1", &[("a", reserve)]))?;
            assert_eq!(
                briefs(&out),
                outputs,
                "default {default}, {stock} - {reserve}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_new_threshold_does_not_alert_by_itself() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 5))?;
        // Raised above the stock: no alert now (the watchdog reports it), but the next
        // decrease alerts, once, because this low spell has not alerted yet.
        assert_eq!(h.process(&threshold("s-1", "a", 10))?, []);
        assert_eq!(
            briefs(&h.process(&approved("s-1", "o-1", &[("a", 1)]))?),
            ["reserved a:1", "low s-1/a 4<=10 crossing"]
        );
        assert_eq!(
            briefs(&h.process(&approved("s-1", "o-2", &[("a", 1)]))?),
            ["reserved a:1"]
        );
        // Lowered below the stock: the reported spell is over, and armed again, the next
        // crossing alerts.
        assert_eq!(
            briefs(&h.process(&threshold("s-1", "a", 2))?),
            ["recovered s-1/a 3>2"]
        );
        assert_eq!(h.stock("s-1", "a").map(|l| l.armed), Some(true));
        assert_eq!(
            briefs(&h.process(&adjust("s-1", "a", -1))?),
            ["level a 2 -1 count", "low s-1/a 2<=2 crossing"]
        );
        Ok(())
    }

    #[test]
    fn a_failed_payment_releases_the_reservation_exactly_once() -> TestResult {
        let mut h = harness(settings());
        h.run(&[restock("s-1", "a", 5), restock("s-1", "b", 2)])?;
        h.process(&approved("s-1", "o-1", &[("a", 2), ("b", 1), ("a", 1)]))?;
        assert_eq!(
            (h.available("s-1", "a"), h.available("s-1", "b")),
            (Some(2), Some(1))
        );

        let payment = failed("s-1", "o-1");
        let out = h.process(&payment)?;
        assert_eq!(briefs(&out), ["released a:2,b:1,a:1 payment_failed"]);
        let env = out[0].envelope();
        assert_eq!(env.order_id.as_deref(), Some("o-1"));
        assert_eq!(env.store_id, "s-1");
        assert_eq!(
            env.causation_id.as_deref(),
            Some(payment.envelope().event_id.as_str())
        );
        assert_eq!(
            (h.available("s-1", "a"), h.available("s-1", "b")),
            (Some(5), Some(2))
        );
        assert_eq!(
            h.order("s-1", "o-1"),
            Some(&closed(OrderOutcome::Released, NOW))
        );
        assert_eq!(
            h.timer("retire/s-1/o-1").map(|t| t.due_at),
            Some(NOW + SETTLED_RETENTION_MS)
        );

        // A duplicate (new ID, as on a replayed topic) and a late authorization: nothing.
        h.commit();
        assert_eq!(h.process(&failed("s-1", "o-1"))?, []);
        assert_eq!(h.process(&authorized("s-1", "o-1"))?, []);
        assert!(h.untouched());
        assert_eq!(
            (h.available("s-1", "a"), h.available("s-1", "b")),
            (Some(5), Some(2))
        );
        Ok(())
    }

    #[test]
    fn a_release_rearms_the_alert() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 1))?;
        assert_eq!(
            briefs(&h.process(&approved("s-1", "o-1", &[("a", 1)]))?),
            ["reserved a:1", "low s-1/a 0<=0 crossing"]
        );
        h.process(&failed("s-1", "o-1"))?;
        assert_eq!(
            h.stock("s-1", "a").map(|l| (l.available, l.armed)),
            Some((1, true))
        );
        assert_eq!(
            briefs(&h.process(&approved("s-1", "o-2", &[("a", 1)]))?),
            ["reserved a:1", "low s-1/a 0<=0 crossing"]
        );
        Ok(())
    }

    #[test]
    fn an_authorized_payment_sells_the_reservation_and_nothing_is_released_after() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 5))?;
        h.process(&approved("s-1", "o-1", &[("a", 2)]))?;
        assert_eq!(h.process(&authorized("s-1", "o-1"))?, []);
        assert_eq!(h.order("s-1", "o-1"), Some(&sold(&[("a", 2)], NOW)));
        assert_eq!(
            h.timer("retire/s-1/o-1").map(|t| t.due_at),
            Some(NOW + SETTLED_RETENTION_MS)
        );
        assert_eq!(h.available("s-1", "a"), Some(3));

        h.commit();
        assert_eq!(h.process(&failed("s-1", "o-1"))?, []);
        assert_eq!(h.process(&authorized("s-1", "o-1"))?, []);
        assert!(h.untouched());
        assert_eq!(h.available("s-1", "a"), Some(3));
        Ok(())
    }

    #[test]
    fn other_payment_events_and_unknown_orders_change_nothing() -> TestResult {
        let cases: Vec<(&str, Event)> = vec![
            ("a retry holds the reservation", retrying("s-1", "o-1")),
            ("a refund", refunded("s-1", "o-1")),
            ("failure of an unknown order", failed("s-1", "o-9")),
            (
                "authorization of an unknown order",
                authorized("s-1", "o-9"),
            ),
            ("same order ID, other store", failed("s-2", "o-1")),
        ];
        for (case, event) in cases {
            let mut h = harness(settings());
            h.run(&[restock("s-1", "a", 5), approved("s-1", "o-1", &[("a", 2)])])?;
            h.run(&[restock("s-2", "a", 5)])?;
            h.commit();
            assert_eq!(h.process(&event)?, [], "{case}");
            assert!(h.untouched(), "{case}");
            assert_eq!(
                h.order("s-1", "o-1"),
                Some(&reserved(&[("a", 2)])),
                "{case}"
            );
            assert_eq!(h.available("s-1", "a"), Some(3), "{case}");
        }
        Ok(())
    }

    #[test]
    fn the_watchdog_is_scheduled_once_by_the_first_input() -> TestResult {
        let mut h = harness(settings());
        // Even an input that is otherwise ignored.
        let first = screening("s/1", "o-1", &[], ScreeningDecision::Rejected);
        h.process(&first)?;
        let timer = h.timer("watchdog/s%2F1").ok_or("no watchdog")?;
        assert_eq!(timer.due_at, NOW + WATCHDOG_MS);
        assert_eq!(
            h.state.get(WATCHDOG_KEY),
            Some(&InventoryState::Watchdog(WatchdogSchedule {
                timer_id: "watchdog/s%2F1".into(),
                due_at: NOW + WATCHDOG_MS,
            }))
        );
        assert_eq!(h.timers.len(), 1);

        h.commit();
        h.now += WATCHDOG_MS / 2;
        h.process(&restock("s-2", "a", 1))?;
        assert!(!h.timers.has_changes());
        assert_eq!(h.timers.len(), 1);
        assert_eq!(
            h.timer("watchdog/s%2F1").map(|t| t.due_at),
            Some(NOW + WATCHDOG_MS)
        );
        Ok(())
    }

    #[test]
    fn a_reported_low_spell_ends_with_one_recovery_on_the_same_topic() -> TestResult {
        let mut h = harness(settings());
        // An increase to a low level reports nothing, so there is nothing to end.
        h.process(&threshold("s-1", "a", 5))?;
        assert_eq!(
            briefs(&h.process(&restock("s-1", "a", 3))?),
            ["level a 3 +3 restock"]
        );
        // Reported by the watchdog; a restock that leaves it low ends nothing, the one
        // that lifts it above the threshold ends the spell, once.
        assert_eq!(
            briefs(&h.advance_to(NOW + WATCHDOG_MS)?),
            ["low s-1/a 3<=5 watchdog"]
        );
        assert_eq!(
            briefs(&h.process(&restock("s-1", "a", 2))?),
            ["level a 5 +2 restock"]
        );
        let out = h.process(&restock("s-1", "a", 1))?;
        assert_eq!(
            briefs(&out),
            ["level a 6 +1 restock", "recovered s-1/a 6>5"]
        );
        let Event::StockRecovered(r) = &out[1] else {
            return Err("not a recovery".into());
        };
        assert_eq!(
            (r.envelope.order_id.as_deref(), r.envelope.store_id.as_str()),
            (None, "s-1")
        );
        assert_eq!(
            topics::topic_of(out[1].event_type()),
            topics::INVENTORY_THRESHOLD_REACHED
        );
        assert_eq!(
            briefs(&h.process(&restock("s-1", "a", 1))?),
            ["level a 7 +1 restock"]
        );
        // A crossing reports; the failed payment's release ends the spell after the release.
        assert_eq!(
            briefs(&h.process(&approved("s-1", "o-1", &[("a", 1), ("a", 1)]))?),
            ["reserved a:1,a:1", "low s-1/a 5<=5 crossing"]
        );
        assert_eq!(
            briefs(&h.process(&failed("s-1", "o-1"))?),
            ["released a:1,a:1 payment_failed", "recovered s-1/a 7>5"]
        );
        // An adjustment down and up again.
        assert_eq!(
            briefs(&h.process(&adjust("s-1", "a", -3))?),
            ["level a 4 -3 count", "low s-1/a 4<=5 crossing"]
        );
        assert_eq!(
            briefs(&h.process(&adjust("s-1", "a", 2))?),
            ["level a 6 +2 count", "recovered s-1/a 6>5"]
        );
        // A SKU on the default threshold, reported low, recovers at the watchdog's next
        // round once the default is lowered (no input says so).
        h.process(&restock("s-1", "b", 1))?;
        h.stage = InventoryStage::new(InventorySettings {
            default_low_stock_threshold: 2,
            ..settings()
        });
        assert_eq!(
            briefs(&h.advance_to(NOW + 2 * WATCHDOG_MS)?),
            ["low s-1/b 1<=2 watchdog"]
        );
        h.stage = InventoryStage::new(settings());
        let out = h.advance_to(NOW + 3 * WATCHDOG_MS)?;
        assert_eq!(briefs(&out), ["recovered s-1/b 1>0"]);
        let firing = format!("timer/watchdog/s-1/{}", NOW + 3 * WATCHDOG_MS);
        assert_eq!(out[0].envelope().correlation_id, firing);
        assert_eq!(
            briefs(&h.advance_to(NOW + 4 * WATCHDOG_MS)?),
            Vec::<String>::new()
        );
        Ok(())
    }

    #[test]
    fn the_watchdog_lists_exactly_the_low_skus_and_reschedules() -> TestResult {
        let mut h = harness(settings());
        h.run(&[
            restock("s-1", "b", 5),
            restock("s-1", "a", 1),
            approved("s-1", "o-1", &[("a", 1)]),
            threshold("s-1", "c", 3),
            restock("s-1", "c", 2),
            threshold("s-2", "a", 1),
            restock("s-2", "d", 4),
        ])?;
        let out = h.advance_to(NOW + WATCHDOG_MS)?;
        assert_eq!(
            briefs(&out),
            [
                "low s-1/a 0<=0 watchdog",
                "low s-1/c 2<=3 watchdog",
                "low s-2/a 0<=1 watchdog",
            ]
        );
        let firing = format!("timer/watchdog/s-1/{}", NOW + WATCHDOG_MS);
        for (i, e) in out.iter().enumerate() {
            let env = e.envelope();
            assert_eq!(env.order_id, None);
            assert_eq!(env.correlation_id, firing);
            assert_eq!(env.causation_id, None);
            assert_eq!(env.occurred_at, NOW + WATCHDOG_MS);
            assert_eq!(
                env.event_id,
                derive_id(&firing, "inventory", u32::try_from(i)?).to_string()
            );
        }
        assert_eq!(out[2].envelope().store_id, "s-2");
        let next = NOW + 2 * WATCHDOG_MS;
        assert_eq!(h.timer("watchdog/s-1").map(|t| t.due_at), Some(next));
        assert_eq!(
            h.state.get(WATCHDOG_KEY),
            Some(&InventoryState::Watchdog(WatchdogSchedule {
                timer_id: "watchdog/s-1".into(),
                due_at: next,
            }))
        );

        // Nothing low: nothing to say, and the next round is still scheduled.
        h.run(&[
            restock("s-1", "a", 1),
            restock("s-1", "c", 5),
            restock("s-2", "a", 2),
        ])?;
        assert_eq!(h.advance_to(next)?, []);
        assert_eq!(
            h.timer("watchdog/s-1").map(|t| t.due_at),
            Some(next + WATCHDOG_MS)
        );
        Ok(())
    }

    #[test]
    fn the_watchdog_skips_rounds_missed_while_nobody_ran_it() -> TestResult {
        let mut h = harness(settings());
        h.process(&threshold("s-1", "a", 1))?;
        let late = NOW + WATCHDOG_MS * 4 + WATCHDOG_MS / 2;
        let out = h.advance_to(late)?;
        assert_eq!(briefs(&out), ["low s-1/a 0<=1 watchdog"]);
        // The round is the one due at NOW + WATCHDOG_MS, fired late: its outputs' IDs
        // come from the round (its due time), never from the clock that fired it.
        let round = format!("timer/watchdog/s-1/{}", NOW + WATCHDOG_MS);
        assert_eq!(out[0].envelope().correlation_id, round);
        assert_eq!(
            out[0].envelope().event_id,
            derive_id(&round, "inventory", 0).to_string()
        );
        assert_eq!(
            h.timer("watchdog/s-1").map(|t| t.due_at),
            Some(late + WATCHDOG_MS)
        );
        Ok(())
    }

    #[test]
    fn a_lost_watchdog_timer_is_scheduled_again() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 1))?;
        h.timers.remove("watchdog/s-1");
        // Overdue, but by less than an interval: the runtime fires it at the batch's end.
        h.now = NOW + 2 * WATCHDOG_MS;
        h.process(&restock("s-1", "a", 1))?;
        assert_eq!(h.timer("watchdog/s-1"), None);
        // Overdue by more than an interval: it was lost, fire it at once.
        h.now += 1;
        h.process(&restock("s-1", "a", 1))?;
        assert_eq!(h.timer("watchdog/s-1").map(|t| t.due_at), Some(h.now));
        Ok(())
    }

    #[test]
    fn an_interval_of_zero_disables_the_watchdog() -> TestResult {
        let off = InventorySettings {
            watchdog_interval_secs: 0,
            ..settings()
        };
        let mut h = harness(off.clone());
        h.process(&threshold("s-1", "a", 1))?;
        assert!(h.timers.is_empty());
        assert_eq!(h.state.get(WATCHDOG_KEY), None);

        // Turned off after it was scheduled: the next input cancels it...
        let mut h = harness(settings());
        h.process(&threshold("s-1", "a", 1))?;
        h.stage = InventoryStage::new(off.clone());
        h.process(&restock("s-1", "a", 1))?;
        assert!(h.timers.is_empty());
        assert_eq!(h.state.get(WATCHDOG_KEY), None);

        // ... or, if it fires first, it says nothing and is not scheduled again.
        let mut h = harness(settings());
        h.process(&threshold("s-1", "a", 1))?;
        h.stage = InventoryStage::new(off);
        assert_eq!(h.advance_to(NOW + WATCHDOG_MS)?, []);
        assert!(h.timers.is_empty());
        assert_eq!(h.state.get(WATCHDOG_KEY), None);
        Ok(())
    }

    /// A cancellation accepted by fulfillment, in every position the order can be in
    /// here: what it emits, the order's record after, the stock after — and that a second
    /// acceptance (a replay under a new event ID) and every later event of the order
    /// change nothing.
    #[test]
    fn a_cancellation_in_every_position() -> TestResult {
        let order = || approved("s-1", "o-1", &[("a", 2), ("b", 1), ("a", 1)]);
        let released = "released a:2,b:1,a:1 cancelled";
        // (position, history, outputs of the acceptance, record after, a and b after)
        type Case = (
            &'static str,
            Vec<Event>,
            Vec<&'static str>,
            InventoryState,
            (i32, i32),
        );
        let cases: Vec<Case> = vec![
            (
                "no record",
                vec![],
                vec![],
                closed(OrderOutcome::Cancelled, NOW),
                (5, 5),
            ),
            (
                "reserved",
                vec![order()],
                vec![released],
                closed(OrderOutcome::Cancelled, NOW),
                (5, 5),
            ),
            (
                "payment retrying",
                vec![order(), retrying("s-1", "o-1")],
                vec![released],
                closed(OrderOutcome::Cancelled, NOW),
                (5, 5),
            ),
            (
                "sold (authorized, not shipped)",
                vec![order(), authorized("s-1", "o-1")],
                vec![released],
                closed(OrderOutcome::Cancelled, NOW),
                (5, 5),
            ),
            (
                "released after a failed payment",
                vec![order(), failed("s-1", "o-1")],
                vec![],
                closed(OrderOutcome::Released, NOW),
                (5, 5),
            ),
            (
                "out of stock",
                vec![approved("s-1", "o-1", &[("a", 99)])],
                vec![],
                closed(OrderOutcome::OutOfStock, NOW),
                (5, 5),
            ),
            (
                "cancelled already",
                vec![order(), accepted("s-1", "o-1")],
                vec![],
                closed(OrderOutcome::Cancelled, NOW),
                (5, 5),
            ),
        ];
        for (case, history, outputs, record, (a, b)) in cases {
            let mut h = harness(settings());
            h.run(&[restock("s-1", "a", 5), restock("s-1", "b", 5)])?;
            h.run(&history)?;
            h.commit();
            let out = h.process(&accepted("s-1", "o-1"))?;
            assert_eq!(briefs(&out), outputs, "{case}: outputs");
            assert_eq!(h.order("s-1", "o-1"), Some(&record), "{case}: record");
            assert_eq!(h.available("s-1", "a"), Some(a), "{case}: a");
            assert_eq!(h.available("s-1", "b"), Some(b), "{case}: b");
            if let [release] = out.as_slice() {
                assert_eq!(release.envelope().order_id.as_deref(), Some("o-1"));
            }
            // Nothing the order can still meet changes anything any more.
            h.commit();
            for later in [
                accepted("s-1", "o-1"),
                order(),
                authorized("s-1", "o-1"),
                failed("s-1", "o-1"),
                refunded("s-1", "o-1"),
            ] {
                let what = later.event_type();
                assert_eq!(h.process(&later)?, [], "{case}: {what}");
                assert!(!h.state.has_changes(), "{case}: {what} wrote state");
            }
            assert_eq!(h.available("s-1", "a"), Some(a), "{case}: a at the end");
            assert_eq!(h.available("s-1", "b"), Some(b), "{case}: b at the end");
        }
        Ok(())
    }

    /// Every arrival order of the acceptance against the order's own events here: stock
    /// is given back exactly once and comes out whole.
    #[test]
    fn every_arrival_order_of_a_cancellation_releases_once() -> TestResult {
        let saga_variants: Vec<(&str, Vec<Event>)> = vec![
            ("authorized", vec![authorized("s-1", "o-1")]),
            ("failed", vec![failed("s-1", "o-1")]),
            (
                "retrying then failed",
                vec![retrying("s-1", "o-1"), failed("s-1", "o-1")],
            ),
        ];
        for (variant, payment) in saga_variants {
            let mut events = vec![approved("s-1", "o-1", &[("a", 2)])];
            events.extend(payment);
            // The acceptance at each position of the order's events.
            for at in 0..=events.len() {
                let mut seq = events.clone();
                seq.insert(at, accepted("s-1", "o-1"));
                let mut h = harness(settings());
                h.process(&restock("s-1", "a", 5))?;
                let out = h.run(&seq)?;
                let releases = out
                    .iter()
                    .filter(|e| e.event_type() == crate::events::EventType::StockReleased)
                    .count();
                let reserved = out
                    .iter()
                    .any(|e| e.event_type() == crate::events::EventType::StockReserved);
                // Released once if it was ever reserved, never otherwise.
                assert_eq!(releases, usize::from(reserved), "{variant} at {at}");
                assert_eq!(h.available("s-1", "a"), Some(5), "{variant} at {at}");
            }
        }
        Ok(())
    }

    /// A sold record written before sold records kept their lines: nothing is known to
    /// give back, so nothing is released (rather than an empty release), and the order
    /// is closed as cancelled all the same.
    #[test]
    fn a_sold_record_without_lines_is_cancelled_without_a_release() -> TestResult {
        let mut h = harness(settings());
        h.process(&restock("s-1", "a", 5))?;
        h.state
            .insert(order_key("s-1", "o-1"), closed(OrderOutcome::Sold, NOW));
        h.commit();
        assert_eq!(h.process(&accepted("s-1", "o-1"))?, []);
        assert_eq!(
            h.order("s-1", "o-1"),
            Some(&closed(OrderOutcome::Cancelled, NOW))
        );
        assert_eq!(h.available("s-1", "a"), Some(5));
        Ok(())
    }

    #[test]
    fn fulfillment_progress_and_a_refusal_change_nothing() -> TestResult {
        let env = || envelope("s-1", Some("o-1"));
        for event in [
            Event::Picking(crate::events::Picking { envelope: env() }),
            Event::Packed(crate::events::Packed { envelope: env() }),
            Event::ReadyToShip(crate::events::ReadyToShip { envelope: env() }),
            Event::CancellationRefused(crate::events::CancellationRefused {
                envelope: env(),
                reason: "too late".into(),
            }),
        ] {
            let mut h = harness(settings());
            h.process(&restock("s-1", "a", 5))?;
            h.process(&approved("s-1", "o-1", &[("a", 2)]))?;
            h.process(&authorized("s-1", "o-1"))?;
            h.commit();
            assert_eq!(h.process(&event)?, [], "{}", event.event_type());
            assert!(!h.state.has_changes(), "{}", event.event_type());
        }
        Ok(())
    }

    #[test]
    fn closed_orders_are_retired_by_their_timer() -> TestResult {
        let cases: Vec<(&str, Vec<Event>, OrderOutcome)> = vec![
            (
                "out of stock",
                vec![approved("s-1", "o-1", &[("a", 99)])],
                OrderOutcome::OutOfStock,
            ),
            (
                "sold",
                vec![
                    approved("s-1", "o-1", &[("a", 2)]),
                    authorized("s-1", "o-1"),
                ],
                OrderOutcome::Sold,
            ),
            (
                "released",
                vec![approved("s-1", "o-1", &[("a", 2)]), failed("s-1", "o-1")],
                OrderOutcome::Released,
            ),
            (
                "cancelled",
                vec![approved("s-1", "o-1", &[("a", 2)]), accepted("s-1", "o-1")],
                OrderOutcome::Cancelled,
            ),
            (
                "cancelled before reserved",
                vec![accepted("s-1", "o-1")],
                OrderOutcome::Cancelled,
            ),
        ];
        for (case, history, outcome) in cases {
            let mut h = harness(InventorySettings {
                watchdog_interval_secs: 0,
                ..settings()
            });
            h.process(&restock("s-1", "a", 5))?;
            h.run(&history)?;
            assert!(
                matches!(
                    h.order("s-1", "o-1"),
                    Some(InventoryState::Closed(c))
                        if c.outcome == outcome && c.retire_at == NOW + SETTLED_RETENTION_MS
                ),
                "{case}"
            );
            h.commit();
            assert_eq!(h.advance_to(NOW + SETTLED_RETENTION_MS - 1)?, [], "{case}");
            assert!(h.order("s-1", "o-1").is_some(), "{case}");
            assert_eq!(h.advance_to(NOW + SETTLED_RETENTION_MS)?, [], "{case}");
            assert_eq!(h.order("s-1", "o-1"), None, "{case}");
            assert_eq!(
                h.state.changes(),
                [(order_key("s-1", "o-1"), None)],
                "{case}: only the marker goes"
            );
            assert!(h.timers.is_empty(), "{case}");
        }
        Ok(())
    }

    #[test]
    fn a_retirement_timer_never_drops_a_live_reservation() -> TestResult {
        let mut h = harness(settings());
        h.run(&[restock("s-1", "a", 5), approved("s-1", "o-1", &[("a", 2)])])?;
        h.commit();
        let stray = Timer {
            id: "retire/s-1/o-1".into(),
            due_at: NOW,
            cause: None,
            payload: serde_json::Value::Null,
        };
        assert_eq!(h.fire_timer(&stray)?, []);
        assert!(h.untouched());
        assert_eq!(h.order("s-1", "o-1"), Some(&reserved(&[("a", 2)])));
        Ok(())
    }

    #[test]
    fn an_unknown_timer_is_invalid() {
        let mut h = harness(settings());
        let timer = Timer {
            id: "pick/o-1".into(),
            due_at: NOW,
            cause: None,
            payload: serde_json::Value::Null,
        };
        assert!(matches!(h.fire_timer(&timer), Err(e) if e.to_string().contains("pick/o-1")));
        assert!(h.state.is_empty());
    }

    #[test]
    fn keys_are_readable_and_unambiguous() {
        assert_eq!(stock_key("s-1", "sku-1"), "stock/s-1/sku-1");
        assert_eq!(order_key("s-1", "o-1"), "order/s-1/o-1");
        assert_ne!(stock_key("a/b", "c"), stock_key("a", "b/c"));
        assert_ne!(order_key("a/b", "c"), order_key("a", "b/c"));
        assert_eq!(stock_key("a/b", "c%"), "stock/a%2Fb/c%25");
        assert_eq!(retire_timer_id("a/b", "o%"), "retire/a%2Fb/o%25");
        assert_eq!(
            format!("order/{}", &retire_timer_id("a/b", "o%")["retire/".len()..]),
            order_key("a/b", "o%")
        );
        assert_eq!(watchdog_timer_id("a/b"), "watchdog/a%2Fb");
        for (store, sku) in [("s-1", "a"), ("a/b", "c%"), ("%2F", "/%25/"), ("", "")] {
            assert_eq!(
                parse_stock_key(&stock_key(store, sku)),
                Some((store.to_owned(), sku.to_owned()))
            );
        }
        assert_eq!(parse_stock_key(&order_key("s", "o")), None);
    }

    #[test]
    fn state_has_a_stable_changelog_shape() -> TestResult {
        let cases = [
            (
                InventoryState::Stock(StockLevel {
                    available: 3,
                    threshold: None,
                    armed: true,
                    reported_low: false,
                }),
                r#"{"stock":{"available":3,"armed":true,"reported_low":false}}"#,
            ),
            (
                InventoryState::Stock(StockLevel {
                    available: 0,
                    threshold: Some(2),
                    armed: false,
                    reported_low: true,
                }),
                r#"{"stock":{"available":0,"threshold":2,"armed":false,"reported_low":true}}"#,
            ),
            (
                reserved(&[("a", 2)]),
                r#"{"reserved":{"items":[{"sku":"a","quantity":2,"unit_price_cents":100}]}}"#,
            ),
            (
                InventoryState::Closed(ClosedOrder {
                    outcome: OrderOutcome::OutOfStock,
                    retire_at: 7,
                    items: Vec::new(),
                }),
                r#"{"closed":{"outcome":"out_of_stock","retire_at":7}}"#,
            ),
            (
                InventoryState::Watchdog(WatchdogSchedule {
                    timer_id: "watchdog/s-1".into(),
                    due_at: 9,
                }),
                r#"{"watchdog":{"timer_id":"watchdog/s-1","due_at":9}}"#,
            ),
        ];
        for (state, json) in cases {
            assert_eq!(serde_json::to_string(&state)?, json);
            assert_eq!(serde_json::from_str::<InventoryState>(json)?, state);
        }
        // A level written before low spells were tracked reads as reported, so that its
        // spell, if any, still ends with a `StockRecovered`.
        assert_eq!(
            serde_json::from_str::<InventoryState>(r#"{"stock":{"available":0,"armed":false}}"#)?,
            InventoryState::Stock(StockLevel {
                available: 0,
                threshold: None,
                armed: false,
                reported_low: true,
            })
        );
        Ok(())
    }

    // --- properties -------------------------------------------------------------------

    const STORES: [&str; 2] = ["s-0", "s/1%"];
    const SKUS: [&str; 3] = ["a", "b/c", "d%2F"];
    const PROP_DEFAULT_THRESHOLD: i32 = 1;

    #[derive(Debug, Clone, Copy)]
    enum Outcome {
        Authorized,
        Failed,
        Retrying,
    }

    #[derive(Debug, Clone)]
    enum Op {
        Restock(usize, usize, i32),
        Adjust(usize, usize, i32),
        Threshold(usize, usize, i32),
        Screen {
            store: usize,
            order: usize,
            approved: bool,
            lines: Vec<(usize, i32)>,
        },
        Pay(usize, usize, Outcome),
        /// The watchdog fires.
        Watchdog,
        /// Every retirement timer fires (a week passes).
        Retire,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (0..2usize, 0..3usize, 1..6i32).prop_map(|(s, k, n)| Op::Restock(s, k, n)),
            2 => (0..2usize, 0..3usize, -6..6i32).prop_map(|(s, k, d)| Op::Adjust(s, k, d)),
            1 => (0..2usize, 0..3usize, 0..4i32).prop_map(|(s, k, t)| Op::Threshold(s, k, t)),
            5 => (
                0..2usize,
                0..5usize,
                prop::bool::weighted(0.85),
                prop::collection::vec((0..3usize, 1..4i32), 0..4),
            )
                .prop_map(|(store, order, approved, lines)| Op::Screen {
                    store,
                    order,
                    approved,
                    lines
                }),
            4 => (
                0..2usize,
                0..5usize,
                prop_oneof![
                    Just(Outcome::Authorized),
                    Just(Outcome::Failed),
                    Just(Outcome::Retrying)
                ],
            )
                .prop_map(|(s, o, outcome)| Op::Pay(s, o, outcome)),
            1 => Just(Op::Watchdog),
            1 => Just(Op::Retire),
        ]
    }

    type SkuId = (String, String);
    type OrderId = (String, String);

    /// What the test knows about one SKU, from the inputs and the outputs it checked.
    #[derive(Debug, Default)]
    struct Ledger {
        restocked: i64,
        adjusted: i64,
        reserved: i64,
        released: i64,
        sold: i64,
        threshold: Option<i32>,
        /// A record exists: some command named the SKU.
        known: bool,
        /// A crossing alert was seen since the SKU was last above its threshold.
        alerted: bool,
        /// A `LowStock` (crossing or watchdog) was seen and no `StockRecovered` since.
        reported: bool,
    }

    impl Ledger {
        fn available(&self) -> i64 {
            self.restocked + self.adjusted - self.reserved + self.released
        }

        fn threshold(&self) -> i64 {
            i64::from(self.threshold.unwrap_or(PROP_DEFAULT_THRESHOLD))
        }
    }

    fn fail(e: impl std::fmt::Display) -> TestCaseError {
        TestCaseError::fail(e.to_string())
    }

    fn sku_id(store: &str, sku: &str) -> SkuId {
        (store.to_owned(), sku.to_owned())
    }

    /// Units per SKU of some lines.
    fn units(store: &str, items: &[OrderLine]) -> BTreeMap<SkuId, i64> {
        let mut units = BTreeMap::new();
        for l in items {
            *units.entry(sku_id(store, &l.sku)).or_insert(0) += i64::from(l.quantity);
        }
        units
    }

    /// The input an operation feeds, if it feeds one (the others fire timers).
    fn input(op: &Op) -> Option<Event> {
        Some(match op {
            Op::Restock(s, k, n) => restock(STORES[*s], SKUS[*k], *n),
            Op::Adjust(s, k, d) => adjust(STORES[*s], SKUS[*k], *d),
            Op::Threshold(s, k, t) => threshold(STORES[*s], SKUS[*k], *t),
            Op::Screen {
                store,
                order,
                approved: ok,
                lines: spec,
            } => {
                let items: Vec<(&str, i32)> = spec.iter().map(|&(k, n)| (SKUS[k], n)).collect();
                let decision = if *ok {
                    ScreeningDecision::Approved
                } else {
                    ScreeningDecision::Rejected
                };
                screening(STORES[*store], &format!("o-{order}"), &items, decision)
            }
            Op::Pay(s, o, outcome) => {
                let order = format!("o-{o}");
                match outcome {
                    Outcome::Authorized => authorized(STORES[*s], &order),
                    Outcome::Failed => failed(STORES[*s], &order),
                    Outcome::Retrying => retrying(STORES[*s], &order),
                }
            }
            Op::Watchdog | Op::Retire => return None,
        })
    }

    /// The same event under a new event ID, as a replayed topic delivers it.
    fn replayed(event: &Event) -> Event {
        let mut again = event.clone();
        let fresh = envelope("", None).event_id;
        again.envelope_mut().event_id = fresh;
        again
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Random commands, orders (replays included) and payment outcomes: stock never goes
        /// negative; every decision matches the ledger; per SKU available = restocked +
        /// adjusted − reserved + released, and reserved − released = sold once every
        /// reservation is settled; crossing alerts come once per low spell; the watchdog
        /// lists exactly the low SKUs.
        #[test]
        fn stock_balances_and_never_goes_negative(ops in prop::collection::vec(op(), 1..80)) {
            let mut h = harness(InventorySettings {
                watchdog_interval_secs: 60,
                default_low_stock_threshold: PROP_DEFAULT_THRESHOLD,
            });
            let mut ledger: BTreeMap<SkuId, Ledger> = BTreeMap::new();
            for store in STORES {
                for sku in SKUS {
                    ledger.insert(sku_id(store, sku), Ledger::default());
                }
            }
            let mut pending: BTreeMap<OrderId, Vec<OrderLine>> = BTreeMap::new();
            let mut closed: BTreeSet<OrderId> = BTreeSet::new();

            for op in ops {
                h.commit();
                let before: BTreeMap<SkuId, i64> =
                    ledger.iter().map(|(k, l)| (k.clone(), l.available())).collect();
                // The outputs other than crossing alerts that the step must produce.
                let mut expected: Vec<String> = Vec::new();
                let mut decreased: BTreeSet<SkuId> = BTreeSet::new();
                let out = match &op {
                    Op::Restock(s, k, n) => {
                        let l = ledger.get_mut(&sku_id(STORES[*s], SKUS[*k])).ok_or_else(|| fail("sku"))?;
                        l.restocked += i64::from(*n);
                        l.known = true;
                        expected.push(format!("level {} {} {:+} restock", SKUS[*k], l.available(), n));
                        h.process(&restock(STORES[*s], SKUS[*k], *n)).map_err(fail)?
                    }
                    Op::Adjust(s, k, d) => {
                        let id = sku_id(STORES[*s], SKUS[*k]);
                        let l = ledger.get_mut(&id).ok_or_else(|| fail("sku"))?;
                        let result = h.process(&adjust(STORES[*s], SKUS[*k], *d));
                        if l.available() + i64::from(*d) < 0 {
                            prop_assert!(matches!(result, Err(StageError::Invalid(_))), "{:?}", result);
                            prop_assert!(h.untouched(), "a refused adjustment wrote state");
                            Vec::new()
                        } else {
                            l.adjusted += i64::from(*d);
                            l.known = true;
                            if *d < 0 {
                                decreased.insert(id);
                            }
                            expected.push(format!("level {} {} {:+} count", SKUS[*k], l.available(), d));
                            result.map_err(fail)?
                        }
                    }
                    Op::Threshold(s, k, t) => {
                        let l = ledger.get_mut(&sku_id(STORES[*s], SKUS[*k])).ok_or_else(|| fail("sku"))?;
                        l.threshold = Some(*t);
                        l.known = true;
                        h.process(&threshold(STORES[*s], SKUS[*k], *t)).map_err(fail)?
                    }
                    Op::Screen { store, order, approved: ok, lines: spec } => {
                        let store = STORES[*store];
                        let order = format!("o-{order}");
                        let items: Vec<(&str, i32)> = spec.iter().map(|&(k, n)| (SKUS[k], n)).collect();
                        let decision = if *ok { ScreeningDecision::Approved } else { ScreeningDecision::Rejected };
                        let input = screening(store, &order, &items, decision);
                        let id = (store.to_owned(), order.clone());
                        if *ok && !pending.contains_key(&id) && !closed.contains(&id) {
                            let Event::OrderScreened(s) = &input else { return Err(fail("screening")) };
                            let wanted = units(store, &s.items);
                            // Shortages in order of first appearance.
                            let mut short = Vec::new();
                            let mut seen = BTreeSet::new();
                            for l in &s.items {
                                let sku = sku_id(store, &l.sku);
                                if !seen.insert(sku.clone()) {
                                    continue;
                                }
                                let have = before[&sku];
                                if wanted[&sku] > have {
                                    short.push(format!("{}:{}/{}", l.sku, wanted[&sku], have));
                                }
                            }
                            if short.is_empty() {
                                for (sku, n) in &wanted {
                                    ledger.get_mut(sku).ok_or_else(|| fail("sku"))?.reserved += n;
                                    decreased.insert(sku.clone());
                                }
                                expected.push(format!("reserved {}", lines_brief(&s.items)));
                                pending.insert(id, s.items.clone());
                            } else {
                                expected.push(format!("rejected out_of_stock {}", short.join(",")));
                                closed.insert(id);
                            }
                        }
                        h.process(&input).map_err(fail)?
                    }
                    Op::Pay(store, order, outcome) => {
                        let store = STORES[*store];
                        let order = format!("o-{order}");
                        let id = (store.to_owned(), order.clone());
                        let input = match outcome {
                            Outcome::Authorized => authorized(store, &order),
                            Outcome::Failed => failed(store, &order),
                            Outcome::Retrying => retrying(store, &order),
                        };
                        match outcome {
                            Outcome::Retrying => {}
                            Outcome::Authorized | Outcome::Failed => {
                                if let Some(items) = pending.remove(&id) {
                                    for (sku, n) in units(store, &items) {
                                        let l = ledger.get_mut(&sku).ok_or_else(|| fail("sku"))?;
                                        if matches!(outcome, Outcome::Authorized) {
                                            l.sold += n;
                                        } else {
                                            l.released += n;
                                        }
                                    }
                                    if matches!(outcome, Outcome::Failed) {
                                        expected.push(format!("released {} payment_failed", lines_brief(&items)));
                                    }
                                    closed.insert(id);
                                }
                            }
                        }
                        h.process(&input).map_err(fail)?
                    }
                    Op::Watchdog => {
                        let id = h.timers.iter().map(|(id, _)| id.clone()).find(|id| id.starts_with("watchdog/"));
                        match id {
                            // Nothing processed yet.
                            None => {
                                prop_assert!(h.state.is_empty());
                                Vec::new()
                            }
                            Some(id) => {
                                let out = h.fire_id(&id).map_err(fail)?;
                                prop_assert!(h.timer(&id).is_some(), "watchdog not rescheduled");
                                for ((store, sku), l) in &ledger {
                                    if l.known && l.available() <= l.threshold() {
                                        expected.push(format!("low {store}/{sku} {}<={} watchdog", l.available(), l.threshold()));
                                    }
                                }
                                out
                            }
                        }
                    }
                    Op::Retire => {
                        let ids: Vec<String> = h.timers.iter().map(|(id, _)| id.clone()).filter(|id| id.starts_with("retire/")).collect();
                        let mut out = Vec::new();
                        for id in ids {
                            out.extend(h.fire_id(&id).map_err(fail)?);
                        }
                        closed.clear();
                        out
                    }
                };

                // Outputs: exactly the expected ones, plus crossing alerts and recoveries
                // checked below.
                let (crossings, others): (Vec<&Event>, Vec<&Event>) = out.iter().partition(|e| {
                    matches!(e, Event::LowStock(l) if l.trigger == LowStockTrigger::Crossing)
                });
                let (recoveries, others): (Vec<&Event>, Vec<&Event>) =
                    others.into_iter().partition(|e| matches!(e, Event::StockRecovered(_)));
                let others: Vec<String> = others.into_iter().map(brief).collect();
                prop_assert_eq!(&others, &expected, "after {:?}", op);

                // Recoveries: exactly the reported SKUs now above their threshold, once, with
                // their level; a SKU reported by this step's watchdog round is reported now.
                let mut recovered: BTreeSet<SkuId> = BTreeSet::new();
                for e in recoveries {
                    let Event::StockRecovered(r) = e else { return Err(fail("not StockRecovered")) };
                    let id = sku_id(&r.envelope.store_id, &r.sku);
                    let l = &ledger[&id];
                    prop_assert!(l.reported, "{:?} recovered without a report", id);
                    prop_assert!(l.available() > l.threshold(), "{:?} recovered while low", id);
                    prop_assert_eq!(i64::from(r.available), l.available());
                    prop_assert_eq!(i64::from(r.threshold), l.threshold());
                    prop_assert!(recovered.insert(id), "two recoveries in one step");
                }
                for (id, l) in ledger.iter_mut() {
                    if l.reported && l.available() > l.threshold() {
                        prop_assert!(recovered.contains(id), "{:?} recovered without StockRecovered", id);
                        l.reported = false;
                    }
                }
                for e in &out {
                    if let Event::LowStock(low) = e {
                        let id = sku_id(&low.envelope.store_id, &low.sku);
                        ledger.get_mut(&id).ok_or_else(|| fail("sku"))?.reported = true;
                    }
                }

                // Crossing alerts: only on a decrease to or below the threshold, at most once
                // per low spell, and on every decrease from above the threshold.
                let mut alerted: BTreeSet<SkuId> = BTreeSet::new();
                for e in crossings {
                    let Event::LowStock(low) = e else { return Err(fail("not LowStock")) };
                    let id = sku_id(&low.envelope.store_id, &low.sku);
                    let l = &ledger[&id];
                    prop_assert!(decreased.contains(&id), "{:?} alerted without a decrease", id);
                    prop_assert!(l.available() <= l.threshold());
                    prop_assert_eq!(i64::from(low.available), l.available());
                    prop_assert_eq!(i64::from(low.threshold), l.threshold());
                    prop_assert!(!l.alerted, "{:?} alerted twice in one low spell", id);
                    prop_assert!(alerted.insert(id), "two alerts in one step");
                }
                for (id, l) in ledger.iter_mut() {
                    let crossed = before[id] > l.threshold() && l.available() <= l.threshold();
                    if decreased.contains(id) && crossed {
                        prop_assert!(alerted.contains(id), "{:?} crossed without an alert", id);
                    }
                    if alerted.contains(id) {
                        l.alerted = true;
                    }
                    if l.available() > l.threshold() {
                        l.alerted = false;
                    }
                }

                // State: never negative, equal to the ledger, reservations as recorded.
                for (key, value) in h.state.iter() {
                    if let InventoryState::Stock(level) = value {
                        prop_assert!(level.available >= 0, "{} went negative: {:?}", key, level);
                    }
                }
                for ((store, sku), l) in &ledger {
                    let level = h.stock(store, sku);
                    if l.known {
                        prop_assert_eq!(level.map(|s| i64::from(s.available)), Some(l.available()), "{}/{}", store, sku);
                    } else {
                        prop_assert_eq!(level, None);
                    }
                }
                let held: BTreeMap<String, InventoryState> = h
                    .state
                    .iter()
                    .filter(|(_, v)| matches!(v, InventoryState::Reserved(_)))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                let expected_held: BTreeMap<String, InventoryState> = pending
                    .iter()
                    .map(|((s, o), items)| (order_key(s, o), InventoryState::Reserved(Reservation { items: items.clone() })))
                    .collect();
                prop_assert_eq!(held, expected_held);
            }

            // reserved − released = sold + still held; and = sold once all are settled.
            let mut outstanding: BTreeMap<SkuId, i64> = BTreeMap::new();
            for ((store, _), items) in &pending {
                for (sku, n) in units(store, items) {
                    *outstanding.entry(sku).or_insert(0) += n;
                }
            }
            for (id, l) in &ledger {
                prop_assert_eq!(l.reserved - l.released, l.sold + outstanding.get(id).copied().unwrap_or(0));
            }
            for ((store, order), items) in std::mem::take(&mut pending) {
                prop_assert_eq!(h.process(&authorized(&store, &order)).map_err(fail)?, Vec::<Event>::new());
                for (sku, n) in units(&store, &items) {
                    ledger.get_mut(&sku).ok_or_else(|| fail("sku"))?.sold += n;
                }
            }
            for ((store, sku), l) in &ledger {
                prop_assert_eq!(l.reserved - l.released, l.sold, "{}/{}", store, sku);
                if l.known {
                    prop_assert_eq!(h.available(store, sku).map(i64::from), Some(l.restocked + l.adjusted - l.sold));
                }
            }
            prop_assert!(h.state.iter().all(|(_, v)| !matches!(v, InventoryState::Reserved(_))));
        }
        /// A screening or payment outcome delivered again under a new event ID (which the
        /// runtime's dedup cannot recognise) produces nothing and writes nothing, whatever
        /// happened before: no order is reserved or released twice.
        #[test]
        fn replays_with_new_ids_change_nothing(ops in prop::collection::vec(op(), 1..80)) {
            let mut h = harness(InventorySettings {
                watchdog_interval_secs: 60,
                default_low_stock_threshold: PROP_DEFAULT_THRESHOLD,
            });
            for op in &ops {
                let Some(event) = input(op) else {
                    let prefix = if matches!(op, Op::Watchdog) { "watchdog/" } else { "retire/" };
                    let ids: Vec<String> = h.timers.iter().map(|(id, _)| id.clone()).filter(|id| id.starts_with(prefix)).collect();
                    for id in ids {
                        h.fire_id(&id).map_err(fail)?;
                    }
                    continue;
                };
                // An adjustment below zero is refused; that is tested above.
                let _ = h.process(&event);
                if matches!(op, Op::Screen { .. } | Op::Pay(..)) {
                    h.commit();
                    prop_assert_eq!(h.process(&replayed(&event)).map_err(fail)?, Vec::<Event>::new(), "replay of {:?}", op);
                    prop_assert!(h.untouched(), "replay of {:?} wrote state", op);
                }
            }
        }
    }
}
