//! Realistic traffic for `orderflow load`, and a carrier that scans shipped orders.
//!
//! A run publishes, in order: stock for every (store, SKU) to `inventory.commands`
//! (`StockRestocked`, and `ThresholdSet`), then orders to `order.created` per the producer
//! contract, paced at a target rate. Stores and SKUs are Zipf-popular, the hottest SKUs
//! are stocked thinly so they run out, a few fraudulent customers place bursts beyond the
//! velocity limit and a few orders exceed the amount limit; a configurable share of
//! orders is cancelled by its customer (`OrderCancelled` to `order.cancelled`, a seeded
//! number of orders after the order, so requests meet orders at every step). Meanwhile a carrier
//! ([`carrier::play_carrier`]) scans every order that becomes ready to ship, and a watch
//! ([`outcomes::OutcomeWatch`]) reads how the run's orders end.
//!
//! Invariant: what is published is a pure function of the seed and the run ID
//! ([`generate::Plan`]); only timestamps are taken from the clock. Every record is keyed
//! by its store ID.
//!
//! - [`generate`]: the plan — catalog, stores, customers, orders, stock commands.
//! - [`pacer`]: the token bucket that holds the rate without drift.
//! - [`publish`]: a producer that keeps many records in flight.
//! - [`carrier`]: the carrier player.
//! - [`outcomes`]: the run's orders by outcome, from the lifecycle topics.

pub mod carrier;
pub mod generate;
pub mod outcomes;
pub mod pacer;
pub mod publish;

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::error::KafkaError;
use tokio_util::sync::CancellationToken;

pub use carrier::{CarrierConfig, CarrierReport, play_carrier, scan_event_id};
pub use generate::{OrderDraft, OrderKind, Plan, PlanConfig, StockCommand};
pub use outcomes::{OutcomeWatch, Outcomes};
pub use pacer::Pacer;

use crate::config::Settings;
use crate::topics;

#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("invalid load settings: {0}")]
    Config(String),
    #[error("cannot create a Kafka client: {0}")]
    Client(KafkaError),
    #[error("producing to {topic} failed: {source}")]
    Produce { topic: String, source: KafkaError },
    #[error("reading {topic} failed: {source}")]
    Consume { topic: String, source: KafkaError },
    #[error("cannot encode a {event_type}: {message}")]
    Encode {
        event_type: &'static str,
        message: String,
    },
    #[error("a simulator task stopped unexpectedly: {0}")]
    Task(String),
}

/// What to publish, and how fast.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadConfig {
    pub plan: PlanConfig,
    /// Orders per second; 0 publishes as fast as the broker takes them.
    pub rate: f64,
    /// Publish the stock commands before the orders.
    pub stock: bool,
    /// Share of orders, in 0..=1, whose customer asks to cancel them (decided per order
    /// by the seed).
    pub cancel_rate: f64,
}

/// How many orders after its order a cancellation is published, at most: at 100 orders/s
/// up to about two seconds, so requests meet orders from before screening to shipped.
const MAX_CANCEL_DELAY_ORDERS: u64 = 200;

/// Whether the customer of `order_id` cancels it, and how many orders later (by the seed).
fn cancellation_of(seed: u64, rate: f64, order_id: &str) -> Option<u64> {
    let draw = generate::seeded_hash(seed, &format!("cancel/{order_id}"));
    ((draw as f64 / u64::MAX as f64) < rate).then(|| {
        generate::seeded_hash(seed, &format!("cancel-delay/{order_id}"))
            % (MAX_CANCEL_DELAY_ORDERS + 1)
    })
}

/// A customer's `OrderCancelled` as JSON per the producer contract (its event ID is
/// derived from store and order by every reader).
fn cancellation_json(store_id: &str, order_id: &str, now_ms: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "event_type": "OrderCancelled",
        "order_id": order_id,
        "store_id": store_id,
        "occurred_at": now_ms,
        "reason": "changed my mind",
    }))
    .expect("JSON")
}

impl Default for LoadConfig {
    fn default() -> Self {
        LoadConfig {
            plan: PlanConfig::default(),
            rate: 100.0,
            stock: true,
            cancel_rate: 0.0,
        }
    }
}

impl LoadConfig {
    pub fn validate(&self) -> Result<(), SimError> {
        let p = &self.plan;
        let bad = |m: &str| Err(SimError::Config(m.to_owned()));
        if p.stores == 0 {
            return bad("--stores must be at least 1");
        }
        if p.skus == 0 {
            return bad("--skus must be at least 1");
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return bad("--rate must be a non-negative number");
        }
        if p.initial_stock <= 0 {
            return bad("--initial-stock must be positive");
        }
        if p.low_stock_units < 0 {
            return bad("low-stock units must not be negative");
        }
        if p.run_id.is_empty() || p.run_id.contains(char::is_whitespace) {
            return bad("the run ID must be a non-empty word");
        }
        if !(p.skew >= 0.0 && p.skew.is_finite()) {
            return bad("--skew must be a non-negative number");
        }
        if !(0.0..=1.0).contains(&self.cancel_rate) {
            return bad("--cancel-rate must be between 0 and 1");
        }
        Ok(())
    }

    /// What every order ID of this run starts with.
    pub fn order_prefix(&self) -> String {
        format!("o-{}-", self.plan.run_id)
    }
}

/// What a load run published.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LoadReport {
    pub orders: u64,
    pub commands: u64,
    /// Fraudulent and huge orders among `orders`.
    pub fraud_orders: u64,
    pub huge_orders: u64,
    /// Cancellation requests published (see [`LoadConfig::cancel_rate`]).
    pub cancellations: u64,
    /// From the first order handed to the client to the last one acknowledged.
    pub elapsed: Duration,
    /// Publishing the stock commands (acknowledged) took this long.
    pub stock_elapsed: Duration,
    /// Stopped by the shutdown token before every order was published.
    pub interrupted: bool,
}

impl LoadReport {
    /// Orders per second achieved.
    pub fn achieved_rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.orders as f64 / secs
        } else {
            0.0
        }
    }
}

/// A progress bar on a terminal; when stderr is not one (a log file, a pipe), a plain
/// line every 2 s and one at the end instead, so that a long run still shows progress.
fn bar(len: u64, visible: bool, template: &str) -> ProgressBar {
    use std::io::IsTerminal;
    let terminal = std::io::stderr().is_terminal();
    let target = if visible && terminal {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    };
    let bar = ProgressBar::with_draw_target(Some(len), target);
    if let Ok(style) = ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    if visible && !terminal {
        let label = template.split('[').next().unwrap_or("").trim().to_owned();
        // Weak: a bar dropped unfinished (an error) ends the lines too.
        let watched = bar.downgrade();
        let _ = std::thread::Builder::new()
            .name(format!("progress-{label}"))
            .spawn(move || plain_lines(&watched, &label));
    }
    bar
}

fn plain_lines(bar: &indicatif::WeakProgressBar, label: &str) {
    let line = |bar: &ProgressBar| {
        let len = bar.length().unwrap_or(0);
        let pos = bar.position();
        eprintln!(
            "{label}: {pos}/{len} ({}%) {:.0}s",
            (pos * 100).checked_div(len).unwrap_or(100),
            bar.elapsed().as_secs_f64()
        );
    };
    let mut last = Instant::now();
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let Some(bar) = bar.upgrade() else {
            return;
        };
        if bar.is_finished() {
            line(&bar);
            return;
        }
        if last.elapsed() >= Duration::from_secs(2) {
            last = Instant::now();
            line(&bar);
        }
    }
}

/// Publishes the stock commands, then the orders at `config.rate`; stops early (with
/// what it published acknowledged) when `shutdown` is cancelled.
pub async fn run_load(
    settings: &Settings,
    config: &LoadConfig,
    show_progress: bool,
    shutdown: &CancellationToken,
) -> Result<LoadReport, SimError> {
    config.validate()?;
    let plan = Plan::new(config.plan.clone());
    let t = settings.topics();
    let mut publisher = publish::Publisher::new(publish::producer(settings, "load")?);
    let mut report = LoadReport::default();

    if config.stock {
        let started = Instant::now();
        report.commands =
            publish_stock(settings, &mut publisher, &plan, show_progress, shutdown).await?;
        report.stock_elapsed = started.elapsed();
    }

    let pb = bar(
        config.plan.orders,
        show_progress,
        "orders   [{bar:40}] {pos}/{len} {per_sec} {elapsed}/{eta} left",
    );
    let topic = t.name(topics::ORDER_CREATED);
    let cancel_topic = t.name(topics::ORDER_CANCELLED);
    // Cancellations waiting for their turn: (due after order seq, store, order).
    let mut cancels: std::collections::VecDeque<(u64, String, String)> = Default::default();
    let mut pacer = Pacer::for_rate(config.rate);
    let before = publisher.acked();
    let started = Instant::now();
    for o in plan.orders() {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                report.interrupted = true;
                break;
            }
            _ = pacer.acquire() => {}
        }
        let now = chrono::Utc::now().timestamp_millis();
        publisher
            .send(&topic, &o.store_id, &o.to_json(now), &[])
            .await?;
        match o.kind {
            OrderKind::Normal => {}
            OrderKind::FraudBurst => report.fraud_orders += 1,
            OrderKind::Huge => report.huge_orders += 1,
        }
        if let Some(delay) = cancellation_of(config.plan.seed, config.cancel_rate, &o.order_id) {
            let due = o.seq + delay;
            let at = cancels.partition_point(|(d, _, _)| *d <= due);
            cancels.insert(at, (due, o.store_id.clone(), o.order_id.clone()));
        }
        while cancels.front().is_some_and(|(due, _, _)| *due <= o.seq) {
            let (_, store_id, order_id) = cancels.pop_front().expect("a front");
            publisher
                .send(
                    &cancel_topic,
                    &store_id,
                    &cancellation_json(&store_id, &order_id, now),
                    &[],
                )
                .await?;
            report.cancellations += 1;
        }
        pb.inc(1);
        if o.seq % 256 == 255 {
            // Unpaced, nothing above need ever wait: let other tasks (the carrier) run.
            tokio::task::yield_now().await;
        }
    }
    // The rest of the requests, unless stopped: their orders are all out.
    if !report.interrupted {
        let now = chrono::Utc::now().timestamp_millis();
        for (_, store_id, order_id) in cancels {
            publisher
                .send(
                    &cancel_topic,
                    &store_id,
                    &cancellation_json(&store_id, &order_id, now),
                    &[],
                )
                .await?;
            report.cancellations += 1;
        }
    }
    publisher.flush().await?;
    report.elapsed = started.elapsed();
    report.orders = publisher.acked() - before - report.cancellations;
    pb.finish();
    Ok(report)
}

/// Publishes the plan's stock commands (restocks, then thresholds, store by store) to
/// `inventory.commands` and waits until every one is acknowledged; returns how many were.
/// Stops early, with what it handed over acknowledged, when `shutdown` is cancelled.
///
/// The commands' event IDs derive from the plan's run ID, store, SKU and action, so
/// publishing one plan twice is one restock per SKU: the inventory stage drops the
/// repeat as a duplicate.
pub async fn publish_stock(
    settings: &Settings,
    publisher: &mut publish::Publisher,
    plan: &Plan,
    show_progress: bool,
    shutdown: &CancellationToken,
) -> Result<u64, SimError> {
    let commands = plan.stock_commands();
    let pb = bar(
        commands.len() as u64,
        show_progress,
        "stock    [{bar:40}] {pos}/{len} commands {elapsed}",
    );
    let topic = settings.topics().name(topics::INVENTORY_COMMANDS);
    let before = publisher.acked();
    let now = chrono::Utc::now().timestamp_millis();
    for c in &commands {
        if shutdown.is_cancelled() {
            break;
        }
        publisher
            .send(&topic, &c.store_id, &c.to_json(now), &[])
            .await?;
        pb.inc(1);
    }
    // Stock first, acknowledged, then orders: so the first orders find it.
    publisher.flush().await?;
    pb.finish();
    Ok(publisher.acked() - before)
}

/// A whole `orderflow load`: traffic, the carrier, and the watch on outcomes.
#[derive(Debug, Clone)]
pub struct SimulationConfig {
    pub load: LoadConfig,
    /// Play the carrier while the run lasts.
    pub carrier: Option<CarrierConfig>,
    /// After publishing, wait up to this long for the orders to settle (0: do not watch).
    pub observe: Duration,
    pub show_progress: bool,
}

/// The closing summary of a run.
#[derive(Debug, Clone)]
pub struct Summary {
    pub load: LoadReport,
    pub carrier: Option<CarrierReport>,
    pub outcomes: Option<Outcomes>,
}

/// Runs a simulation: starts the carrier, publishes, watches outcomes, stops the carrier.
pub async fn simulate(
    settings: &Settings,
    config: &SimulationConfig,
    shutdown: &CancellationToken,
) -> Result<Summary, SimError> {
    config.load.validate()?;
    if let Some(c) = &config.carrier
        && !(0.0..=1.0).contains(&c.delivery_failure_rate)
    {
        return Err(SimError::Config(
            "--delivery-failure-rate must be between 0 and 1".into(),
        ));
    }
    let watch = if config.observe > Duration::ZERO {
        Some(OutcomeWatch::snapshot(settings).await?)
    } else {
        None
    };
    let carrier_stop = shutdown.child_token();
    let carrier = config.carrier.clone().map(|c| {
        let settings = settings.clone();
        let stop = carrier_stop.clone();
        tokio::spawn(async move { play_carrier(&settings, c, stop).await })
    });

    let result = async {
        let load = run_load(settings, &config.load, config.show_progress, shutdown).await?;
        let outcomes = match watch {
            Some(w) if !shutdown.is_cancelled() => {
                let pb = bar(
                    load.orders,
                    config.show_progress,
                    "outcomes [{bar:40}] {pos}/{len} orders settled {elapsed}",
                );
                let o = w
                    .observe(
                        config.load.order_prefix(),
                        load.orders,
                        config.observe,
                        shutdown.clone(),
                        pb.clone(),
                    )
                    .await?;
                pb.finish();
                Some(o)
            }
            _ => None,
        };
        Ok::<_, SimError>((load, outcomes))
    }
    .await;

    carrier_stop.cancel();
    let carrier = match carrier {
        Some(handle) => Some(handle.await.map_err(|e| SimError::Task(e.to_string()))??),
        None => None,
    };
    let (load, outcomes) = result?;
    Ok(Summary {
        load,
        carrier,
        outcomes,
    })
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let l = &self.load;
        writeln!(
            f,
            "published {} orders ({} in fraud bursts, {} huge) and {} cancellation requests in {:.1}s: {:.1} orders/s{}",
            l.orders,
            l.fraud_orders,
            l.huge_orders,
            l.cancellations,
            l.elapsed.as_secs_f64(),
            l.achieved_rate(),
            if l.interrupted { " (interrupted)" } else { "" }
        )?;
        writeln!(
            f,
            "published {} inventory commands in {:.1}s",
            l.commands,
            l.stock_elapsed.as_secs_f64()
        )?;
        match &self.carrier {
            Some(c) => writeln!(
                f,
                "carrier: {} scans for {} orders ({} delivered, {} failed)",
                c.scans_published, c.orders_scanned, c.delivered, c.failed
            )?,
            None => writeln!(f, "carrier: not played")?,
        }
        if let Some(o) = &self.outcomes {
            writeln!(
                f,
                "outcomes after {:.1}s: {} delivered, {} rejected ({} fraud, {} out of stock), {} cancelled, {} refunded, {} delivery failed awaiting refund, {} in flight",
                o.waited.as_secs_f64(),
                o.delivered,
                o.rejected(),
                o.rejected_fraud,
                o.rejected_stock,
                o.cancelled,
                o.refunded,
                o.delivery_failed,
                o.in_flight
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancellations_follow_the_rate_and_the_seed() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("o-r-{i:05}")).collect();
        let drawn = |seed: u64, rate: f64| -> Vec<Option<u64>> {
            ids.iter()
                .map(|id| cancellation_of(seed, rate, id))
                .collect()
        };
        assert!(drawn(7, 0.0).iter().all(Option::is_none));
        let all = drawn(7, 1.0);
        assert!(
            all.iter()
                .all(|d| d.is_some_and(|d| d <= MAX_CANCEL_DELAY_ORDERS))
        );
        let tenth = drawn(7, 0.1);
        let n = tenth.iter().filter(|d| d.is_some()).count();
        assert!((800..=1_200).contains(&n), "{n} of 10,000 at 0.1");
        // The same seed draws the same orders and delays; a rate only adds orders.
        assert_eq!(tenth, drawn(7, 0.1));
        assert_ne!(tenth, drawn(8, 0.1));
        let fifth = drawn(7, 0.2);
        assert!(tenth.iter().zip(&fifth).all(|(a, b)| a.is_none() || a == b));
    }

    #[test]
    fn a_cancel_rate_outside_zero_to_one_is_refused() {
        for rate in [-0.1, 1.5, f64::NAN] {
            let config = LoadConfig {
                cancel_rate: rate,
                ..LoadConfig::default()
            };
            assert!(
                matches!(config.validate(), Err(SimError::Config(m)) if m.contains("--cancel-rate")),
                "{rate}"
            );
        }
    }

    #[test]
    fn a_cancellation_is_a_producer_contract_order_cancelled() {
        let codec = crate::events::codec::Codec::new();
        let hints = crate::events::codec::DecodeHints {
            topic_default: topics::default_event_type(topics::ORDER_CANCELLED),
            ..Default::default()
        };
        let event = codec
            .decode(&cancellation_json("store-001", "o-1", 5), hints)
            .expect("decodes");
        let crate::events::Event::OrderCancelled(c) = event else {
            panic!("not an OrderCancelled: {event:?}");
        };
        assert_eq!(
            c.envelope.event_id,
            crate::events::order_cancelled_id("store-001", "o-1").to_string()
        );
        assert_eq!(c.envelope.occurred_at, 5);
        assert_eq!(c.reason.as_deref(), Some("changed my mind"));
    }
}
