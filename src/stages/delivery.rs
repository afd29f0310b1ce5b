//! Delivery: one state machine per order, driven by `ReadyToShip` from fulfillment and by
//! the carrier's scans, emitting `Shipped`, `InTransit`, `OutForDelivery`, `Delivered` or
//! `DeliveryFailed` — or `DeliveryAnomaly` for a scan the machine cannot accept.
//!
//! The allowed transitions are [`TRANSITIONS`], and only those:
//!
//! | state \ scan        | picked_up | in_transit       | out_for_delivery | delivered   | failed           |
//! |---------------------|-----------|------------------|------------------|-------------|------------------|
//! | `awaiting_pickup`   | `shipped` | anomaly          | anomaly          | anomaly     | anomaly          |
//! | `shipped`           | dup       | `in_transit`     | `out_for_delivery` | `delivered` | `failed`       |
//! | `in_transit`        | anomaly   | `in_transit` at a new location, else dup | `out_for_delivery` | `delivered` | `failed` |
//! | `out_for_delivery`  | anomaly   | anomaly          | dup              | `delivered` | `failed`         |
//! | `delivered`         | anomaly   | anomaly          | anomaly          | dup         | anomaly          |
//! | `failed`            | anomaly   | anomaly          | anomaly          | anomaly     | dup              |
//!
//! - **dup** (ignored silently): a scan of the kind that led to the current state, or a
//!   re-sent scan already applied (same kind, `scanned_at` and location, whatever its
//!   event ID). `in_transit` may repeat, because a parcel passes several hubs: a scan at
//!   a location other than the last one moves again and emits another `InTransit`; one
//!   without a location, or at the same location, is a duplicate.
//! - Scans may skip ahead once the parcel is picked up (a local courier scans
//!   `picked_up` then `delivered`), but nothing happens before pickup, nothing goes back
//!   (a late `in_transit` after `out_for_delivery` is an anomaly), and nothing follows a
//!   terminal state (`delivered`, `failed`). A `failed` before pickup is an anomaly, not a
//!   delivery failure: the parcel never left, and no refund is owed for it.
//! - **anomaly**: emits `DeliveryAnomaly { state, scan, message }` and changes nothing.
//!   An impossible scan is a fact about the carrier, not a broken record: it is never an
//!   error and never dead-lettered. Since nothing changes, nothing remembers it either:
//!   the same impossible scan re-sent under a new event ID is reported again (a
//!   redelivery under the same ID is dropped by the runtime's dedup).
//!
//! `carrier.updates` and `fulfillment.updated` are not ordered relative to each other, so
//! a scan may arrive before its order's `ReadyToShip`. Such scans are kept in the order's
//! record (state `awaiting_ready_to_ship`, at most [`MAX_BUFFERED`]) and applied in
//! `scanned_at` order when `ReadyToShip` arrives, with the same output IDs they would
//! have had if they had arrived after it. If no `ReadyToShip` comes within [`RETAIN_MS`]
//! (a scan for an unknown order), each buffered scan is reported as an anomaly and the
//! record dropped: nothing is lost silently, and state stays bounded.
//!
//! Customer cancellation needs no change here: fulfillment decides it, and accepts it
//! only before `ReadyToShip`, so a cancelled order never reaches this stage; its answers
//! (`CancellationAccepted`, `CancellationRefused`) on `fulfillment.updated` are ignored.
//!
//! Invariant: every record either is waiting for `ReadyToShip` with a retirement timer,
//! is active, or is terminal with a retirement timer; a terminal record lives
//! [`RETAIN_MS`] (the runtime's default dedup window), so a duplicate within that time is
//! recognized and no order is delivered twice.

use serde::{Deserialize, Serialize};

use crate::events::{
    CarrierScan, Delivered, DeliveryAnomaly, DeliveryFailed, Envelope, Event, EventType, InTransit,
    OutForDelivery, ReadyToShip, ScanKind, Shipped,
};
use crate::stages::{Ctx, Input, Stage, StageError, StageName, Timer};
use crate::topics;

/// How long a record is kept after its order reached a terminal state (to recognize
/// scans sent again), and how long scans wait for their order's `ReadyToShip`: 7 days.
pub const RETAIN_MS: i64 = 7 * 24 * 3_600_000;

/// Scans kept per order while waiting for `ReadyToShip`. A real parcel has a handful of
/// scans before the warehouse even reports it ready — if any — so more is a carrier
/// feed gone wrong, and the excess is reported as anomalies rather than grown without
/// bound.
pub const MAX_BUFFERED: usize = 32;

/// Applied scans remembered per order, to recognize re-sent ones. Forgetting the oldest
/// only turns a re-send of a very old scan into an anomaly instead of a silent duplicate.
pub const MAX_APPLIED: usize = 64;

const STAGE: &str = "delivery";

/// An order's delivery state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Scans arrived, but fulfillment has not reported the order ready yet.
    AwaitingReadyToShip,
    AwaitingPickup,
    Shipped,
    InTransit,
    OutForDelivery,
    Delivered,
    Failed,
}

impl Phase {
    pub const ALL: [Phase; 7] = [
        Phase::AwaitingReadyToShip,
        Phase::AwaitingPickup,
        Phase::Shipped,
        Phase::InTransit,
        Phase::OutForDelivery,
        Phase::Delivered,
        Phase::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::AwaitingReadyToShip => "awaiting_ready_to_ship",
            Phase::AwaitingPickup => "awaiting_pickup",
            Phase::Shipped => "shipped",
            Phase::InTransit => "in_transit",
            Phase::OutForDelivery => "out_for_delivery",
            Phase::Delivered => "delivered",
            Phase::Failed => "failed",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Delivered | Phase::Failed)
    }

    /// The scan that leads into this state: seeing it again is a duplicate.
    fn entered_by(self) -> Option<ScanKind> {
        match self {
            Phase::AwaitingReadyToShip | Phase::AwaitingPickup => None,
            Phase::Shipped => Some(ScanKind::PickedUp),
            Phase::InTransit => Some(ScanKind::InTransit),
            Phase::OutForDelivery => Some(ScanKind::OutForDelivery),
            Phase::Delivered => Some(ScanKind::Delivered),
            Phase::Failed => Some(ScanKind::Failed),
        }
    }
}

/// Every allowed transition: (state, scan, next state). Anything else that is not a
/// duplicate is an anomaly.
pub const TRANSITIONS: &[(Phase, ScanKind, Phase)] = &[
    (Phase::AwaitingPickup, ScanKind::PickedUp, Phase::Shipped),
    (Phase::Shipped, ScanKind::InTransit, Phase::InTransit),
    (
        Phase::Shipped,
        ScanKind::OutForDelivery,
        Phase::OutForDelivery,
    ),
    (Phase::Shipped, ScanKind::Delivered, Phase::Delivered),
    (Phase::Shipped, ScanKind::Failed, Phase::Failed),
    // Only at a new location; see the module docs.
    (Phase::InTransit, ScanKind::InTransit, Phase::InTransit),
    (
        Phase::InTransit,
        ScanKind::OutForDelivery,
        Phase::OutForDelivery,
    ),
    (Phase::InTransit, ScanKind::Delivered, Phase::Delivered),
    (Phase::InTransit, ScanKind::Failed, Phase::Failed),
    (Phase::OutForDelivery, ScanKind::Delivered, Phase::Delivered),
    (Phase::OutForDelivery, ScanKind::Failed, Phase::Failed),
];

/// The wire name of a scan kind (as in `schemas/carrier_scan.avsc`).
pub fn scan_name(kind: ScanKind) -> &'static str {
    match kind {
        ScanKind::PickedUp => "picked_up",
        ScanKind::InTransit => "in_transit",
        ScanKind::OutForDelivery => "out_for_delivery",
        ScanKind::Delivered => "delivered",
        ScanKind::Failed => "failed",
    }
}

/// The value of one key of the delivery stage's state.
///
/// An enum, although it has one variant, so that the changelog value names what it holds
/// (the same convention as the other stages).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryState {
    /// One order's delivery, under [`order_key`].
    Order(Tracking),
}

/// One order's delivery state machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tracking {
    pub phase: Phase,
    /// The order's correlation ID, from `ReadyToShip`: carriers do not know it, and the
    /// outputs belong to the order's flow, not the carrier feed's.
    #[serde(default)]
    pub correlation_id: Option<String>,
    /// The last `in_transit` location, to tell a new hub from a repeated scan.
    #[serde(default)]
    pub location: Option<String>,
    /// Scans applied so far (the newest [`MAX_APPLIED`]), to recognize a re-sent one after
    /// the state moved on.
    #[serde(default)]
    pub applied: Vec<ScanMark>,
    /// Scans that arrived before `ReadyToShip`, in `scanned_at` order (arrival order
    /// among equal times).
    #[serde(default)]
    pub buffered: Vec<CarrierScan>,
}

/// What makes two scans the same scan, whatever their event IDs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScanMark {
    pub scan: ScanKind,
    pub scanned_at: i64,
    #[serde(default)]
    pub location: Option<String>,
}

impl ScanMark {
    fn of(scan: &CarrierScan) -> Self {
        ScanMark {
            scan: scan.scan,
            scanned_at: scan.scanned_at,
            location: scan.location.clone(),
        }
    }
}

/// What a scan does to an active record.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Move(Phase),
    Duplicate,
    Anomaly,
}

impl Tracking {
    fn waiting(correlation_id: Option<String>) -> Self {
        Tracking {
            phase: Phase::AwaitingReadyToShip,
            correlation_id,
            location: None,
            applied: Vec::new(),
            buffered: Vec::new(),
        }
    }

    fn judge(&self, scan: &CarrierScan) -> Verdict {
        if self.applied.contains(&ScanMark::of(scan)) {
            return Verdict::Duplicate;
        }
        if self.phase.entered_by() == Some(scan.scan) {
            let new_hub = self.phase == Phase::InTransit
                && scan.location.is_some()
                && scan.location != self.location;
            if !new_hub {
                return Verdict::Duplicate;
            }
        }
        TRANSITIONS
            .iter()
            .find(|(from, kind, _)| *from == self.phase && *kind == scan.scan)
            .map_or(Verdict::Anomaly, |&(_, _, to)| Verdict::Move(to))
    }

    fn record(&mut self, scan: &CarrierScan, to: Phase) {
        self.phase = to;
        if to == Phase::InTransit {
            self.location = scan.location.clone();
        }
        self.applied.push(ScanMark::of(scan));
        if self.applied.len() > MAX_APPLIED {
            let excess = self.applied.len() - MAX_APPLIED;
            self.applied.drain(..excess);
        }
    }

    /// Keeps a scan until `ReadyToShip`; false if it is already kept.
    fn buffer(&mut self, scan: &CarrierScan) -> bool {
        let mark = ScanMark::of(scan);
        if self.buffered.iter().any(|s| ScanMark::of(s) == mark) {
            return false;
        }
        let at = self
            .buffered
            .partition_point(|s| s.scanned_at <= scan.scanned_at);
        self.buffered.insert(at, scan.clone());
        true
    }
}

/// The state key of one order: `order/{store_id}/{order_id}`, with `%` and `/` inside
/// either ID percent-escaped so that two different pairs never share a key.
pub fn order_key(store_id: &str, order_id: &str) -> String {
    format!(
        "order/{}/{}",
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

/// The ID of an order's retirement timer: `retire/{store_id}/{order_id}` (escaped as in
/// [`order_key`]).
pub fn retire_timer_id(store_id: &str, order_id: &str) -> String {
    format!(
        "retire/{}/{}",
        super::key_part(store_id),
        super::key_part(order_id)
    )
}

/// A retirement timer's payload: the record it retires.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct RetirePayload {
    key: String,
}

/// Tracks every shipped order through the carrier's scans.
pub struct DeliveryStage;

impl DeliveryStage {
    pub fn new() -> Self {
        DeliveryStage
    }
}

impl Default for DeliveryStage {
    fn default() -> Self {
        Self::new()
    }
}

/// The order an event concerns, or why it cannot be processed. Checked before any state
/// is written, so a dead-lettered record leaves no trace.
fn order_of<'e>(env: &'e Envelope, event_type: &str) -> Result<&'e str, StageError> {
    env.order_id.as_deref().ok_or_else(|| {
        StageError::Invalid(format!("{event_type} {} has no order_id", env.event_id))
    })
}

fn schedule_retirement(ctx: &mut Ctx<'_, DeliveryState>, env: &Envelope, order_id: &str) {
    let key = order_key(&env.store_id, order_id);
    let payload =
        serde_json::to_value(RetirePayload { key }).expect("a timer payload of strings serializes");
    let due = ctx.now().saturating_add(RETAIN_MS);
    ctx.schedule(retire_timer_id(&env.store_id, order_id), due, payload);
}

/// The event a transition into `to` emits.
fn transition_event(to: Phase, scan: &CarrierScan, envelope: Envelope) -> Option<Event> {
    Some(match to {
        Phase::Shipped => Shipped {
            envelope,
            carrier: scan.carrier.clone(),
            tracking_number: scan.tracking_number.clone(),
        }
        .into(),
        Phase::InTransit => InTransit {
            envelope,
            location: scan.location.clone(),
        }
        .into(),
        Phase::OutForDelivery => OutForDelivery { envelope }.into(),
        Phase::Delivered => Delivered { envelope }.into(),
        Phase::Failed => DeliveryFailed {
            envelope,
            reason: scan
                .detail
                .as_deref()
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .unwrap_or("carrier reported failure")
                .to_owned(),
        }
        .into(),
        Phase::AwaitingReadyToShip | Phase::AwaitingPickup => return None,
    })
}

fn anomaly(phase: Phase, scan: &CarrierScan, envelope: Envelope, why: &str) -> Event {
    DeliveryAnomaly {
        envelope,
        state: phase.as_str().to_owned(),
        scan: scan_name(scan.scan).to_owned(),
        message: format!(
            "{why} (carrier {}, tracking {}, scanned at {})",
            scan.carrier, scan.tracking_number, scan.scanned_at
        ),
    }
    .into()
}

fn not_allowed(phase: Phase, scan: ScanKind) -> String {
    if phase.is_terminal() {
        format!(
            "a {} scan after the order was already {}; ignored",
            scan_name(scan),
            phase.as_str()
        )
    } else {
        format!(
            "a {} scan cannot follow {}; ignored",
            scan_name(scan),
            phase.as_str()
        )
    }
}

/// Applies one scan to an active record: its output (transition or anomaly), or `None`
/// for a duplicate. `envelope` is called only when there is an output, so a duplicate
/// consumes no output ordinal.
fn apply(
    tracking: &mut Tracking,
    scan: &CarrierScan,
    envelope: impl FnOnce() -> Envelope,
) -> Option<Event> {
    match tracking.judge(scan) {
        Verdict::Duplicate => None,
        Verdict::Anomaly => {
            let why = not_allowed(tracking.phase, scan.scan);
            Some(anomaly(tracking.phase, scan, envelope(), &why))
        }
        Verdict::Move(to) => {
            tracking.record(scan, to);
            transition_event(to, scan, envelope())
        }
    }
}

/// An output envelope in the order's flow: `env` with the order's correlation ID, when
/// known.
fn in_flow(mut env: Envelope, correlation_id: Option<&str>) -> Envelope {
    if let Some(c) = correlation_id {
        env.correlation_id = c.to_owned();
    }
    env
}

impl DeliveryStage {
    fn ready(
        &self,
        ctx: &mut Ctx<'_, DeliveryState>,
        ready: &ReadyToShip,
    ) -> Result<(), StageError> {
        let env = &ready.envelope;
        let order_id = order_of(env, "ReadyToShip")?;
        let key = order_key(&env.store_id, order_id);
        let mut tracking = match ctx.state.get(&key) {
            None => Tracking::waiting(None),
            Some(DeliveryState::Order(t)) if t.phase == Phase::AwaitingReadyToShip => t.clone(),
            // A duplicate or replay: the order is already under way (or done).
            Some(DeliveryState::Order(_)) => return Ok(()),
        };
        tracking.phase = Phase::AwaitingPickup;
        tracking.correlation_id = Some(env.correlation_id.clone());
        // The scans waited for this; the record is active now, and retired only once
        // terminal.
        ctx.cancel(&retire_timer_id(&env.store_id, order_id));
        let now = ctx.now();
        for scan in std::mem::take(&mut tracking.buffered) {
            // The same envelope the scan's output would have had, had it arrived after
            // `ReadyToShip`: caused by the scan, in the order's flow.
            let correlation = tracking.correlation_id.clone();
            let make = || {
                in_flow(
                    Envelope::caused_by(&scan.envelope, STAGE, 0, now),
                    correlation.as_deref(),
                )
            };
            if let Some(out) = apply(&mut tracking, &scan, make) {
                ctx.emit(out);
            }
        }
        let terminal = tracking.phase.is_terminal();
        ctx.state.insert(key, DeliveryState::Order(tracking));
        if terminal {
            schedule_retirement(ctx, env, order_id);
        }
        Ok(())
    }

    fn scan(&self, ctx: &mut Ctx<'_, DeliveryState>, scan: &CarrierScan) -> Result<(), StageError> {
        let env = &scan.envelope;
        let order_id = order_of(env, "CarrierScan")?;
        let key = order_key(&env.store_id, order_id);
        let Some(DeliveryState::Order(current)) = ctx.state.get(&key) else {
            // The first news of this order: wait for its `ReadyToShip`, but not forever.
            let mut tracking = Tracking::waiting(None);
            tracking.buffer(scan);
            ctx.state.insert(key, DeliveryState::Order(tracking));
            schedule_retirement(ctx, env, order_id);
            return Ok(());
        };
        let mut tracking = current.clone();
        if tracking.phase == Phase::AwaitingReadyToShip {
            let kept = tracking
                .buffered
                .iter()
                .any(|s| ScanMark::of(s) == ScanMark::of(scan));
            if kept {
                return Ok(());
            }
            if tracking.buffered.len() >= MAX_BUFFERED {
                let why = format!(
                    "{MAX_BUFFERED} scans already wait for this order's ReadyToShip; scan dropped"
                );
                let out = anomaly(tracking.phase, scan, ctx.next_envelope(), &why);
                ctx.emit(out);
                return Ok(());
            }
            tracking.buffer(scan);
            ctx.state.insert(key, DeliveryState::Order(tracking));
            return Ok(());
        }
        let correlation = tracking.correlation_id.clone();
        let was_terminal = tracking.phase.is_terminal();
        let Some(out) = apply(&mut tracking, scan, || {
            in_flow(ctx.next_envelope(), correlation.as_deref())
        }) else {
            return Ok(());
        };
        // Only a transition changes the record; an anomaly leaves it as it was.
        if !matches!(out, Event::DeliveryAnomaly(_)) {
            let terminal = tracking.phase.is_terminal();
            ctx.state.insert(key, DeliveryState::Order(tracking));
            if terminal && !was_terminal {
                schedule_retirement(ctx, env, order_id);
            }
        }
        ctx.emit(out);
        Ok(())
    }
}

impl Stage for DeliveryStage {
    type State = DeliveryState;

    fn name(&self) -> &'static str {
        StageName::Delivery.as_str()
    }

    fn inputs(&self) -> &'static [&'static str] {
        &[topics::FULFILLMENT_UPDATED, topics::CARRIER_UPDATES]
    }

    /// Progress inside the warehouse, and a cancellation's answer: an accepted one comes
    /// before `ReadyToShip`, which then never comes, and a refused one changes nothing.
    fn ignores(&self, topic: &str, t: EventType) -> bool {
        use EventType::*;
        topic == topics::FULFILLMENT_UPDATED
            && matches!(
                t,
                Picking | Packed | CancellationAccepted | CancellationRefused
            )
    }

    fn process(
        &mut self,
        ctx: &mut Ctx<'_, DeliveryState>,
        input: Input<'_>,
    ) -> Result<(), StageError> {
        if self.ignores(input.topic, input.event.event_type()) {
            return Ok(());
        }
        match (input.topic, input.event) {
            (topics::FULFILLMENT_UPDATED, Event::ReadyToShip(ready)) => self.ready(ctx, ready),
            // Progress inside the warehouse: nothing for delivery to track yet. A
            // cancellation's answer needs nothing either: an accepted one comes before
            // `ReadyToShip`, which then never comes, and a refused one changes nothing.
            (
                topics::FULFILLMENT_UPDATED,
                Event::Picking(_)
                | Event::Packed(_)
                | Event::CancellationAccepted(_)
                | Event::CancellationRefused(_),
            ) => Ok(()),
            (topics::CARRIER_UPDATES, Event::CarrierScan(scan)) => self.scan(ctx, scan),
            (topic, other) => Err(StageError::Unexpected {
                event_type: other.event_type().to_string(),
                topic: topic.to_owned(),
            }),
        }
    }

    fn on_timer(
        &mut self,
        ctx: &mut Ctx<'_, DeliveryState>,
        timer: &Timer,
    ) -> Result<(), StageError> {
        let RetirePayload { key } = serde_json::from_value(timer.payload.clone()).map_err(|e| {
            StageError::Invalid(format!("timer {} has an invalid payload: {e}", timer.id))
        })?;
        let Some(DeliveryState::Order(tracking)) = ctx.state.get(&key) else {
            return Ok(());
        };
        let (phase, dropped) = (tracking.phase, tracking.buffered.clone());
        match phase {
            phase if phase.is_terminal() => {
                ctx.state.remove(&key);
            }
            Phase::AwaitingReadyToShip => {
                // No order ever came for these scans: report each, then forget them.
                let why = format!(
                    "no ReadyToShip for this order within {} days; scan dropped",
                    RETAIN_MS / (24 * 3_600_000)
                );
                for scan in &dropped {
                    let out = anomaly(Phase::AwaitingReadyToShip, scan, ctx.next_envelope(), &why);
                    ctx.emit(out);
                }
                ctx.state.remove(&key);
            }
            // Active: the order is still moving, and is retired once terminal. (Only a
            // timer from an older state could find this.)
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::error::Error;

    use super::*;
    use crate::events::{EventType, Packed, Picking, derive_id};
    use crate::stages::driver::Driver;

    type TestResult = Result<(), Box<dyn Error>>;

    const T0: i64 = 1_700_000_000_000;

    fn envelope(event_id: &str, order: &str, correlation: &str) -> Envelope {
        Envelope {
            event_id: event_id.into(),
            order_id: Some(order.into()),
            store_id: "s-1".into(),
            correlation_id: correlation.into(),
            causation_id: None,
            occurred_at: T0 - 1,
            schema_version: 1,
        }
    }

    fn ready(event_id: &str) -> Event {
        Event::ReadyToShip(ReadyToShip {
            envelope: envelope(event_id, "o-1", "corr-order"),
        })
    }

    /// A scan of order `o-1`; its event ID names kind, time and location so that two
    /// scans differ in ID exactly when they differ in content.
    fn scan(kind: ScanKind, scanned_at: i64, location: Option<&str>) -> CarrierScan {
        CarrierScan {
            envelope: envelope(
                &format!(
                    "scan-{}-{scanned_at}-{}",
                    scan_name(kind),
                    location.unwrap_or("")
                ),
                "o-1",
                "corr-carrier",
            ),
            carrier: "DHL".into(),
            tracking_number: "TN-1".into(),
            scan: kind,
            location: location.map(str::to_owned),
            detail: None,
            scanned_at,
        }
    }

    /// The same scan re-sent by the carrier under a new event ID.
    fn resent(s: &CarrierScan) -> CarrierScan {
        let mut s = s.clone();
        s.envelope.event_id = format!("{}-resent", s.envelope.event_id);
        s
    }

    /// The stage on the runtime's own calls, from `T0`.
    type Harness = Driver<DeliveryStage>;

    fn harness() -> Harness {
        Driver::new(DeliveryStage::new(), T0)
    }

    impl Driver<DeliveryStage> {
        fn ready(&mut self, event_id: &str) -> Result<Vec<Event>, StageError> {
            self.process_on(topics::FULFILLMENT_UPDATED, &ready(event_id))
        }

        fn scan(&mut self, s: &CarrierScan) -> Result<Vec<Event>, StageError> {
            self.process_on(topics::CARRIER_UPDATES, &Event::CarrierScan(s.clone()))
        }

        fn tracking(&self) -> Option<&Tracking> {
            match self.state.peek(&order_key("s-1", "o-1")) {
                Some(DeliveryState::Order(t)) => Some(t),
                None => None,
            }
        }

        fn phase(&self) -> Option<Phase> {
            self.tracking().map(|t| t.phase)
        }

        fn retire_due(&self) -> Option<i64> {
            self.timers
                .peek(&retire_timer_id("s-1", "o-1"))
                .map(|t| t.due_at)
        }

        fn untouched(&self) -> bool {
            !self.state.has_changes() && !self.timers.has_changes()
        }
    }

    fn types(events: &[Event]) -> Vec<EventType> {
        events.iter().map(Event::event_type).collect()
    }

    /// Scans that drive an order from `awaiting_pickup` into `phase`, at times 1, 2, …
    fn path_to(phase: Phase) -> Vec<CarrierScan> {
        let up = scan(ScanKind::PickedUp, 1, None);
        match phase {
            Phase::AwaitingReadyToShip | Phase::AwaitingPickup => vec![],
            Phase::Shipped => vec![up],
            Phase::InTransit => vec![up, scan(ScanKind::InTransit, 2, Some("hub-a"))],
            Phase::OutForDelivery => vec![
                up,
                scan(ScanKind::InTransit, 2, Some("hub-a")),
                scan(ScanKind::OutForDelivery, 3, None),
            ],
            Phase::Delivered => vec![up, scan(ScanKind::Delivered, 2, None)],
            Phase::Failed => vec![up, scan(ScanKind::Failed, 2, None)],
        }
    }

    /// A harness with order `o-1` in `phase` (never `awaiting_ready_to_ship`), committed.
    fn at(phase: Phase) -> Result<Harness, Box<dyn Error>> {
        let mut h = harness();
        h.ready("rts-1")?;
        for s in path_to(phase) {
            h.scan(&s)?;
        }
        if h.phase() != Some(phase) {
            return Err(format!("could not reach {phase:?}: at {:?}", h.phase()).into());
        }
        h.commit();
        Ok(h)
    }

    /// Expected reaction of each active state to a fresh scan of each kind, written out
    /// independently of [`TRANSITIONS`]: `Some(t)` emits `t` and moves; `None` with
    /// `dup` is silent; otherwise an anomaly.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Want {
        Move(Phase, EventType),
        Dup,
        Anomaly,
    }

    fn expected(from: Phase, kind: ScanKind) -> Want {
        use Phase::*;
        use ScanKind as K;
        use Want::*;
        match (from, kind) {
            (AwaitingPickup, K::PickedUp) => Move(Shipped, EventType::Shipped),
            (AwaitingPickup, _) => Anomaly,
            (Shipped, K::PickedUp) => Dup,
            (Shipped | InTransit, K::InTransit) => Move(InTransit, EventType::InTransit),
            (Shipped | InTransit, K::OutForDelivery) => {
                Move(OutForDelivery, EventType::OutForDelivery)
            }
            (Shipped | InTransit | OutForDelivery, K::Delivered) => {
                Move(Delivered, EventType::Delivered)
            }
            (Shipped | InTransit | OutForDelivery, K::Failed) => {
                Move(Failed, EventType::DeliveryFailed)
            }
            (InTransit, K::PickedUp) => Anomaly,
            (OutForDelivery, K::OutForDelivery) => Dup,
            (OutForDelivery, _) => Anomaly,
            (Delivered, K::Delivered) | (Failed, K::Failed) => Dup,
            (Delivered | Failed, _) => Anomaly,
            (AwaitingReadyToShip, _) => unreachable!("not an active state"),
        }
    }

    const KINDS: [ScanKind; 5] = [
        ScanKind::PickedUp,
        ScanKind::InTransit,
        ScanKind::OutForDelivery,
        ScanKind::Delivered,
        ScanKind::Failed,
    ];

    #[test]
    fn stage_identity() {
        let stage = DeliveryStage::new();
        assert_eq!(stage.name(), "delivery");
        assert_eq!(
            stage.inputs(),
            &[topics::FULFILLMENT_UPDATED, topics::CARRIER_UPDATES]
        );
    }

    #[test]
    fn ready_to_ship_awaits_pickup_and_emits_nothing() -> TestResult {
        let mut h = harness();
        assert_eq!(h.ready("rts-1")?, vec![]);
        let t = h.tracking().ok_or("no record")?;
        assert_eq!(t.phase, Phase::AwaitingPickup);
        assert_eq!(t.correlation_id.as_deref(), Some("corr-order"));
        assert!(
            h.timers.is_empty(),
            "an active record has no retirement timer"
        );
        Ok(())
    }

    /// Every (active state, scan kind) pair with a fresh scan (new time, new location):
    /// the table of the module docs, cell by cell.
    #[test]
    fn every_state_and_scan_pair_follows_the_table() -> TestResult {
        let states = [
            Phase::AwaitingPickup,
            Phase::Shipped,
            Phase::InTransit,
            Phase::OutForDelivery,
            Phase::Delivered,
            Phase::Failed,
        ];
        let mut moves = 0;
        for from in states {
            for kind in KINDS {
                let mut h = at(from)?;
                let before = h.tracking().cloned().ok_or("no record")?;
                let timers_before = h.retire_due();
                let fresh = scan(kind, 100, Some("hub-new"));
                let out = h.scan(&fresh)?;
                let cell = format!("{} × {}", from.as_str(), scan_name(kind));
                match expected(from, kind) {
                    Want::Move(to, event) => {
                        moves += 1;
                        assert!(
                            TRANSITIONS.contains(&(from, kind, to)),
                            "{cell}: not in TRANSITIONS"
                        );
                        assert_eq!(types(&out), [event], "{cell}");
                        assert_eq!(h.phase(), Some(to), "{cell}");
                        let applied = &h.tracking().ok_or("no record")?.applied;
                        assert_eq!(applied.last(), Some(&ScanMark::of(&fresh)), "{cell}");
                        if to.is_terminal() {
                            assert_eq!(h.retire_due(), Some(T0 + RETAIN_MS), "{cell}");
                        } else {
                            assert_eq!(h.retire_due(), None, "{cell}");
                        }
                    }
                    Want::Dup => {
                        assert_eq!(out, vec![], "{cell}");
                        assert!(h.untouched(), "{cell}: state written");
                    }
                    Want::Anomaly => {
                        let [Event::DeliveryAnomaly(a)] = out.as_slice() else {
                            return Err(format!("{cell}: expected an anomaly, got {out:?}").into());
                        };
                        assert_eq!(a.state, from.as_str(), "{cell}");
                        assert_eq!(a.scan, scan_name(kind), "{cell}");
                        assert!(
                            a.message.contains(scan_name(kind))
                                && a.message.contains(from.as_str())
                                && a.message.contains("TN-1"),
                            "{cell}: {}",
                            a.message
                        );
                        assert!(h.untouched(), "{cell}: an anomaly changed state");
                        assert_eq!(h.tracking(), Some(&before), "{cell}");
                        assert_eq!(h.retire_due(), timers_before, "{cell}");
                    }
                }
            }
        }
        assert_eq!(
            moves,
            TRANSITIONS.len(),
            "every listed transition was exercised"
        );
        Ok(())
    }

    #[test]
    fn in_transit_repeats_only_at_a_new_location() -> TestResult {
        // (location of the second in_transit scan, moves again?)
        let cases = [(Some("hub-b"), true), (Some("hub-a"), false), (None, false)];
        for (location, moves) in cases {
            let mut h = at(Phase::InTransit)?;
            let out = h.scan(&scan(ScanKind::InTransit, 50, location))?;
            if moves {
                let [Event::InTransit(t)] = out.as_slice() else {
                    return Err(format!("{location:?}: {out:?}").into());
                };
                assert_eq!(t.location.as_deref(), location);
                assert_eq!(
                    h.tracking().ok_or("no record")?.location.as_deref(),
                    location
                );
            } else {
                assert_eq!(out, vec![], "{location:?}");
                assert!(h.untouched(), "{location:?}");
            }
        }
        // Back to an earlier hub (a new scan, not a re-send) is a move too.
        let mut h = at(Phase::InTransit)?;
        h.scan(&scan(ScanKind::InTransit, 50, Some("hub-b")))?;
        let out = h.scan(&scan(ScanKind::InTransit, 60, Some("hub-a")))?;
        assert_eq!(types(&out), [EventType::InTransit]);
        Ok(())
    }

    /// A re-sent scan (same content, new event ID) is silent in every later state, where
    /// a fresh scan of the same kind would be an anomaly.
    #[test]
    fn a_resent_scan_already_applied_is_ignored_silently() -> TestResult {
        let picked = scan(ScanKind::PickedUp, 1, None);
        let hub_a = scan(ScanKind::InTransit, 2, Some("hub-a"));
        let ofd = scan(ScanKind::OutForDelivery, 3, None);
        let cases = [
            (Phase::InTransit, &picked),
            (Phase::OutForDelivery, &picked),
            (Phase::OutForDelivery, &hub_a),
            (Phase::OutForDelivery, &ofd),
            (Phase::Delivered, &picked),
            (Phase::Failed, &picked),
        ];
        for (phase, old) in cases {
            let mut h = at(phase)?;
            for again in [old.clone(), resent(old)] {
                assert_eq!(h.scan(&again)?, vec![], "{phase:?} {:?}", old.scan);
                assert!(h.untouched());
            }
        }
        // After moving on to hub-b, a re-send of the hub-a scan is not a move back.
        let mut h = at(Phase::InTransit)?;
        h.scan(&scan(ScanKind::InTransit, 5, Some("hub-b")))?;
        h.commit();
        assert_eq!(h.scan(&resent(&hub_a))?, vec![]);
        assert!(h.untouched());
        assert_eq!(
            h.tracking().ok_or("no record")?.location.as_deref(),
            Some("hub-b")
        );
        Ok(())
    }

    #[test]
    fn a_full_journey_emits_each_event_with_its_fields() -> TestResult {
        let mut h = harness();
        h.ready("rts-1")?;
        let mut out = Vec::new();
        out.extend(h.scan(&scan(ScanKind::PickedUp, 1, Some("warehouse")))?);
        out.extend(h.scan(&scan(ScanKind::InTransit, 2, Some("hub-a")))?);
        out.extend(h.scan(&scan(ScanKind::InTransit, 3, Some("hub-b")))?);
        out.extend(h.scan(&scan(ScanKind::OutForDelivery, 4, None))?);
        out.extend(h.scan(&scan(ScanKind::Delivered, 5, None))?);
        let [
            Event::Shipped(s),
            Event::InTransit(a),
            Event::InTransit(b),
            Event::OutForDelivery(_),
            Event::Delivered(_),
        ] = out.as_slice()
        else {
            return Err(format!("{:?}", types(&out)).into());
        };
        assert_eq!(
            (s.carrier.as_str(), s.tracking_number.as_str()),
            ("DHL", "TN-1")
        );
        assert_eq!(a.location.as_deref(), Some("hub-a"));
        assert_eq!(b.location.as_deref(), Some("hub-b"));
        assert_eq!(h.phase(), Some(Phase::Delivered));
        Ok(())
    }

    #[test]
    fn a_failed_scan_gives_its_detail_or_a_default_reason() -> TestResult {
        let cases = [
            (Some("recipient not at home"), "recipient not at home"),
            (Some("  address unknown "), "address unknown"),
            (Some("   "), "carrier reported failure"),
            (None, "carrier reported failure"),
        ];
        for (detail, reason) in cases {
            let mut h = at(Phase::Shipped)?;
            let mut failed = scan(ScanKind::Failed, 10, None);
            failed.detail = detail.map(str::to_owned);
            let out = h.scan(&failed)?;
            let [Event::DeliveryFailed(f)] = out.as_slice() else {
                return Err(format!("{out:?}").into());
            };
            assert_eq!(f.reason, reason, "{detail:?}");
        }
        Ok(())
    }

    #[test]
    fn live_outputs_are_caused_by_the_scan_in_the_orders_flow() -> TestResult {
        let mut h = at(Phase::AwaitingPickup)?;
        let up = scan(ScanKind::PickedUp, 1, None);
        let out = h.scan(&up)?;
        let [event] = out.as_slice() else {
            return Err(format!("{out:?}").into());
        };
        let env = event.envelope();
        assert_eq!(
            env.event_id,
            derive_id(&up.envelope.event_id, STAGE, 0).to_string()
        );
        assert_eq!(
            env.causation_id.as_deref(),
            Some(up.envelope.event_id.as_str())
        );
        assert_eq!(env.correlation_id, "corr-order");
        assert_eq!(env.order_id.as_deref(), Some("o-1"));
        assert_eq!(env.store_id, "s-1");
        assert_eq!(env.occurred_at, T0);

        // Anomalies too.
        let out = h.scan(&scan(ScanKind::PickedUp, 7, None))?;
        assert_eq!(out, vec![], "picked_up again is a duplicate");
        let late = scan(ScanKind::PickedUp, 7, None);
        let mut h = at(Phase::InTransit)?;
        let out = h.scan(&late)?;
        assert_eq!(types(&out), [EventType::DeliveryAnomaly]);
        assert_eq!(out[0].envelope().correlation_id, "corr-order");
        assert_eq!(
            out[0].envelope().event_id,
            derive_id(&late.envelope.event_id, STAGE, 0).to_string()
        );
        Ok(())
    }

    #[test]
    fn duplicate_or_replayed_ready_to_ship_changes_nothing() -> TestResult {
        let states = [
            Phase::AwaitingPickup,
            Phase::Shipped,
            Phase::InTransit,
            Phase::OutForDelivery,
            Phase::Delivered,
            Phase::Failed,
        ];
        for phase in states {
            for id in ["rts-1", "rts-replayed"] {
                let mut h = at(phase)?;
                let due = h.retire_due();
                assert_eq!(h.ready(id)?, vec![], "{phase:?}/{id}");
                assert!(h.untouched(), "{phase:?}/{id}");
                assert_eq!(h.phase(), Some(phase));
                assert_eq!(h.retire_due(), due);
            }
        }
        Ok(())
    }

    #[test]
    fn picking_packed_and_cancellation_answers_are_ignored() -> TestResult {
        let env = envelope("x", "o-1", "corr-order");
        for event in [
            Event::Picking(Picking {
                envelope: env.clone(),
            }),
            Event::Packed(Packed {
                envelope: env.clone(),
            }),
            Event::CancellationAccepted(crate::events::CancellationAccepted {
                envelope: env.clone(),
                reason: None,
            }),
            Event::CancellationRefused(crate::events::CancellationRefused {
                envelope: env,
                reason: "too late".into(),
            }),
        ] {
            let mut h = harness();
            assert_eq!(h.process_on(topics::FULFILLMENT_UPDATED, &event)?, vec![]);
            assert!(h.state.is_empty() && h.untouched());
        }
        Ok(())
    }

    #[test]
    fn early_scans_are_buffered_then_applied_in_scan_order() -> TestResult {
        let mut h = harness();
        let up = scan(ScanKind::PickedUp, 10, None);
        let hub = scan(ScanKind::InTransit, 20, Some("hub-a"));
        let ofd = scan(ScanKind::OutForDelivery, 30, None);
        // Arrive out of order, one of them twice (re-sent under a new ID).
        for s in [&ofd, &up, &resent(&ofd), &hub] {
            assert_eq!(h.scan(s)?, vec![]);
        }
        let t = h.tracking().ok_or("no record")?;
        assert_eq!(t.phase, Phase::AwaitingReadyToShip);
        let order: Vec<i64> = t.buffered.iter().map(|s| s.scanned_at).collect();
        assert_eq!(order, [10, 20, 30]);
        assert_eq!(h.retire_due(), Some(T0 + RETAIN_MS));

        h.now = T0 + 5_000;
        let out = h.ready("rts-1")?;
        assert_eq!(
            types(&out),
            [
                EventType::Shipped,
                EventType::InTransit,
                EventType::OutForDelivery
            ]
        );
        // Each output is what the scan would have produced live after ReadyToShip.
        for (event, s) in out.iter().zip([&up, &hub, &ofd]) {
            let env = event.envelope();
            assert_eq!(
                env.event_id,
                derive_id(&s.envelope.event_id, STAGE, 0).to_string()
            );
            assert_eq!(
                env.causation_id.as_deref(),
                Some(s.envelope.event_id.as_str())
            );
            assert_eq!(env.correlation_id, "corr-order");
            assert_eq!(env.occurred_at, T0 + 5_000);
        }
        let t = h.tracking().ok_or("no record")?;
        assert_eq!(t.phase, Phase::OutForDelivery);
        assert!(t.buffered.is_empty());
        assert_eq!(t.location.as_deref(), Some("hub-a"));
        assert_eq!(h.retire_due(), None, "the waiting timer is cancelled");

        // Live scans continue from there, and the applied early scans are remembered.
        assert_eq!(h.scan(&resent(&up))?, vec![]);
        assert_eq!(
            types(&h.scan(&scan(ScanKind::Delivered, 40, None))?),
            [EventType::Delivered]
        );
        Ok(())
    }

    #[test]
    fn early_scans_reaching_a_terminal_state_schedule_retirement() -> TestResult {
        let mut h = harness();
        h.scan(&scan(ScanKind::Delivered, 20, None))?;
        h.scan(&scan(ScanKind::PickedUp, 10, None))?;
        h.now = T0 + 1_000;
        let out = h.ready("rts-1")?;
        assert_eq!(types(&out), [EventType::Shipped, EventType::Delivered]);
        assert_eq!(h.phase(), Some(Phase::Delivered));
        assert_eq!(h.retire_due(), Some(T0 + 1_000 + RETAIN_MS));
        Ok(())
    }

    #[test]
    fn impossible_early_scans_become_anomalies_when_applied() -> TestResult {
        let mut h = harness();
        // Delivered before picked up, by scan time: delivered is an anomaly in
        // awaiting_pickup; the later pickup then ships the order.
        h.scan(&scan(ScanKind::PickedUp, 20, None))?;
        h.scan(&scan(ScanKind::Delivered, 10, None))?;
        let out = h.ready("rts-1")?;
        let [Event::DeliveryAnomaly(a), Event::Shipped(_)] = out.as_slice() else {
            return Err(format!("{:?}", types(&out)).into());
        };
        assert_eq!(
            (a.state.as_str(), a.scan.as_str()),
            ("awaiting_pickup", "delivered")
        );
        assert_eq!(h.phase(), Some(Phase::Shipped));
        Ok(())
    }

    #[test]
    fn equal_scan_times_keep_arrival_order() -> TestResult {
        let mut h = harness();
        h.scan(&scan(ScanKind::PickedUp, 10, None))?;
        h.scan(&scan(ScanKind::InTransit, 10, Some("hub-a")))?;
        let out = h.ready("rts-1")?;
        assert_eq!(types(&out), [EventType::Shipped, EventType::InTransit]);
        Ok(())
    }

    #[test]
    fn a_full_buffer_reports_further_scans_as_anomalies() -> TestResult {
        let mut h = harness();
        for i in 0..MAX_BUFFERED {
            h.scan(&scan(
                ScanKind::InTransit,
                i as i64,
                Some(&format!("hub-{i}")),
            ))?;
        }
        h.commit();
        let extra = scan(ScanKind::PickedUp, 1_000, None);
        let out = h.scan(&extra)?;
        let [Event::DeliveryAnomaly(a)] = out.as_slice() else {
            return Err(format!("{out:?}").into());
        };
        assert_eq!(a.state, "awaiting_ready_to_ship");
        assert_eq!(a.scan, "picked_up");
        assert!(a.message.contains("scan dropped"), "{}", a.message);
        assert!(h.untouched());
        assert_eq!(
            h.tracking().ok_or("no record")?.buffered.len(),
            MAX_BUFFERED
        );
        Ok(())
    }

    #[test]
    fn scans_without_a_ready_to_ship_are_reported_and_dropped_after_retention() -> TestResult {
        let mut h = harness();
        let first = scan(ScanKind::PickedUp, 10, None);
        h.scan(&first)?;
        h.now = T0 + 60_000;
        // A later scan does not push the deadline back.
        h.scan(&scan(ScanKind::InTransit, 20, Some("hub-a")))?;
        assert_eq!(h.retire_due(), Some(T0 + RETAIN_MS));

        assert_eq!(h.advance_to(T0 + RETAIN_MS - 1)?, vec![]);
        assert!(h.tracking().is_some());
        let out = h.advance_to(T0 + RETAIN_MS)?;
        let [Event::DeliveryAnomaly(a), Event::DeliveryAnomaly(b)] = out.as_slice() else {
            return Err(format!("{out:?}").into());
        };
        assert_eq!(
            (a.scan.as_str(), b.scan.as_str()),
            ("picked_up", "in_transit")
        );
        assert_eq!(a.state, "awaiting_ready_to_ship");
        assert!(a.message.contains("no ReadyToShip"), "{}", a.message);
        // Caused by the first scan (the timer's cause), with IDs from the firing.
        assert_eq!(
            a.envelope.causation_id.as_deref(),
            Some(first.envelope.event_id.as_str())
        );
        let firing = format!("timer/{}/{}", retire_timer_id("s-1", "o-1"), T0 + RETAIN_MS);
        assert_eq!(
            a.envelope.event_id,
            derive_id(&firing, STAGE, 0).to_string()
        );
        assert_eq!(
            b.envelope.event_id,
            derive_id(&firing, STAGE, 1).to_string()
        );
        assert!(h.state.is_empty() && h.timers.is_empty());
        Ok(())
    }

    #[test]
    fn terminal_records_are_retired_after_retention_and_recognize_duplicates_until_then()
    -> TestResult {
        for terminal in [Phase::Delivered, Phase::Failed] {
            let mut h = at(terminal)?;
            let last = path_to(terminal).pop().ok_or("empty path")?;
            assert_eq!(h.retire_due(), Some(T0 + RETAIN_MS));

            h.now = T0 + RETAIN_MS - 1;
            assert_eq!(h.scan(&resent(&last))?, vec![], "{terminal:?}");
            assert_eq!(h.advance_to(T0 + RETAIN_MS - 1)?, vec![]);
            assert_eq!(h.phase(), Some(terminal));

            assert_eq!(h.advance_to(T0 + RETAIN_MS)?, vec![]);
            assert!(h.state.is_empty() && h.timers.is_empty(), "{terminal:?}");
            // Forgotten: a re-send now counts as an early scan of an unknown order.
            assert_eq!(h.scan(&resent(&last))?, vec![]);
            assert_eq!(h.phase(), Some(Phase::AwaitingReadyToShip));
        }
        Ok(())
    }

    #[test]
    fn a_retirement_timer_finding_an_active_record_does_nothing() -> TestResult {
        let mut h = at(Phase::InTransit)?;
        let key = order_key("s-1", "o-1");
        let timer = Timer {
            id: retire_timer_id("s-1", "o-1"),
            due_at: T0,
            cause: None,
            payload: serde_json::to_value(RetirePayload { key })?,
        };
        h.timers.insert(timer.id.clone(), timer);
        h.commit();
        assert_eq!(h.advance_to(T0)?, vec![]);
        assert_eq!(h.phase(), Some(Phase::InTransit));
        assert!(!h.state.has_changes());
        Ok(())
    }

    #[test]
    fn orders_are_tracked_independently() -> TestResult {
        let mut h = at(Phase::Shipped)?;
        let mut other = scan(ScanKind::Delivered, 5, None);
        other.envelope.order_id = Some("o-2".into());
        other.envelope.event_id = "o-2-delivered".into();
        assert_eq!(
            h.scan(&other)?,
            vec![],
            "o-2 has no ReadyToShip yet: buffered"
        );
        assert_eq!(h.phase(), Some(Phase::Shipped));
        match h.state.get(&order_key("s-1", "o-2")) {
            Some(DeliveryState::Order(t)) => assert_eq!(t.phase, Phase::AwaitingReadyToShip),
            None => return Err("no record for o-2".into()),
        }
        Ok(())
    }

    #[test]
    fn wrong_types_topics_and_missing_order_ids_are_errors_leaving_no_trace() {
        let up = Event::CarrierScan(scan(ScanKind::PickedUp, 1, None));
        let cases: Vec<(&str, Event, &str)> = vec![
            (topics::FULFILLMENT_UPDATED, up.clone(), "unexpected"),
            (topics::CARRIER_UPDATES, ready("r"), "unexpected"),
            (topics::PAYMENT_PROCESSED, up.clone(), "unexpected"),
            (
                topics::FULFILLMENT_UPDATED,
                Event::Delivered(Delivered {
                    envelope: envelope("d", "o-1", "c"),
                }),
                "unexpected",
            ),
            (
                topics::CARRIER_UPDATES,
                {
                    let mut e = up.clone();
                    e.envelope_mut().order_id = None;
                    e
                },
                "invalid",
            ),
            (
                topics::FULFILLMENT_UPDATED,
                {
                    let mut e = ready("r");
                    e.envelope_mut().order_id = None;
                    e
                },
                "invalid",
            ),
        ];
        for (topic, event, class) in cases {
            let mut h = harness();
            let result = h.process_on(topic, &event);
            assert_eq!(
                result.as_ref().map_err(StageError::class),
                Err(class),
                "{topic} {}",
                event.event_type()
            );
            assert!(h.state.is_empty() && h.timers.is_empty() && h.untouched());
        }
    }

    #[test]
    fn applied_scans_are_bounded() -> TestResult {
        let mut h = at(Phase::Shipped)?;
        for i in 0..(MAX_APPLIED + 10) {
            h.scan(&scan(
                ScanKind::InTransit,
                100 + i as i64,
                Some(&format!("hub-{i}")),
            ))?;
        }
        let t = h.tracking().ok_or("no record")?;
        assert_eq!(t.applied.len(), MAX_APPLIED);
        assert_eq!(
            t.applied.last().map(|m| m.scanned_at),
            Some(100 + (MAX_APPLIED + 9) as i64)
        );
        Ok(())
    }

    #[test]
    fn keys_are_readable_and_unambiguous() {
        assert_eq!(order_key("s-1", "o-1"), "order/s-1/o-1");
        assert_ne!(order_key("a/b", "c"), order_key("a", "b/c"));
        assert_eq!(retire_timer_id("s/1", "o%1"), "retire/s%2F1/o%251");
    }

    #[test]
    fn state_has_a_stable_changelog_shape_and_round_trips() -> TestResult {
        let mut h = harness();
        h.scan(&scan(ScanKind::PickedUp, 10, Some("dock")))?;
        let waiting = h
            .state
            .get(&order_key("s-1", "o-1"))
            .cloned()
            .ok_or("no record")?;
        let json = serde_json::to_value(&waiting)?;
        assert_eq!(json["order"]["phase"], "awaiting_ready_to_ship");
        assert_eq!(json["order"]["buffered"][0]["scan"], "picked_up");
        assert_eq!(json["order"]["buffered"][0]["scanned_at"], 10);
        assert_eq!(json["order"]["buffered"][0]["order_id"], "o-1");
        let back: DeliveryState = serde_json::from_slice(&serde_json::to_vec(&waiting)?)?;
        assert_eq!(back, waiting);

        let active = DeliveryState::Order(Tracking {
            phase: Phase::InTransit,
            correlation_id: Some("c".into()),
            location: Some("hub".into()),
            applied: vec![ScanMark {
                scan: ScanKind::InTransit,
                scanned_at: 2,
                location: Some("hub".into()),
            }],
            buffered: vec![],
        });
        let json = serde_json::to_string(&active)?;
        assert_eq!(
            json,
            r#"{"order":{"phase":"in_transit","correlation_id":"c","location":"hub","applied":[{"scan":"in_transit","scanned_at":2,"location":"hub"}],"buffered":[]}}"#
        );
        assert_eq!(serde_json::from_str::<DeliveryState>(&json)?, active);
        Ok(())
    }

    #[test]
    fn phase_names_match_serde() -> TestResult {
        for phase in Phase::ALL {
            assert_eq!(serde_json::to_value(phase)?, phase.as_str());
        }
        for kind in KINDS {
            assert_eq!(serde_json::to_value(kind)?, scan_name(kind));
        }
        Ok(())
    }
}
