//! `orderflow load`: publishes realistic traffic — stock, then orders at a steady rate —
//! plays the carrier for orders that become ready to ship, and reports how the orders
//! ended. Ctrl-C stops it early, with a summary of what was done.

use std::time::Duration;

use clap::Args;

use crate::config::Settings;
use crate::simulator::{self, CarrierConfig, LoadConfig, PlanConfig, SimulationConfig};

#[derive(Debug, Args)]
pub struct LoadArgs {
    /// Orders to publish, the fraudulent ones included.
    #[arg(long, default_value_t = 1_000)]
    pub orders: u64,
    /// Stores; popularity is Zipf-like, store-001 the busiest.
    #[arg(long, default_value_t = 20)]
    pub stores: u32,
    /// Orders per second (0: as fast as the broker takes them).
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// SKUs in the catalog, each stocked by every store; SKU-00001 sells best.
    #[arg(long, default_value_t = 50)]
    pub skus: u32,
    /// Seed of everything drawn: the same seed publishes the same traffic.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Tags the run's order, customer and command IDs (default: the start time). Orders
    /// are deduplicated by ID, so re-using a run ID re-publishes the same orders.
    #[arg(long)]
    pub run_id: Option<String>,
    /// Units restocked per store and SKU before the orders.
    #[arg(long, default_value_t = 1_000)]
    pub initial_stock: i32,
    /// The hottest SKUs get only --low-stock-units per store, so they run out.
    #[arg(long, default_value_t = 2)]
    pub low_stock_skus: u32,
    #[arg(long, default_value_t = 5)]
    pub low_stock_units: i32,
    /// Do not publish stock commands (the stores are stocked already).
    #[arg(long)]
    pub no_stock: bool,
    /// Customers who each place a burst of orders at one store, beyond the fraud
    /// velocity limit (`fraud.velocity_max_orders` + 3 orders).
    #[arg(long, default_value_t = 2)]
    pub fraud_customers: u32,
    /// Orders whose total exceeds `fraud.max_order_total_cents`.
    #[arg(long, default_value_t = 2)]
    pub huge_orders: u32,
    /// Zipf exponent of store and SKU popularity (0: uniform).
    #[arg(long, default_value_t = 1.1)]
    pub skew: f64,
    /// Play the carrier: scan every order that is ready to ship (default).
    #[arg(long, overrides_with = "no_carrier")]
    pub carrier: bool,
    /// Do not play the carrier (another one does, or deliveries are not wanted).
    #[arg(long, overrides_with = "carrier")]
    pub no_carrier: bool,
    /// Share of shipped orders the carrier fails to deliver (decided per order by the seed).
    #[arg(long, default_value_t = 0.05)]
    pub delivery_failure_rate: f64,
    /// Share of orders, in 0..=1, whose customer asks to cancel them (decided per order
    /// by the seed), up to 200 orders after placing them.
    #[arg(long, default_value_t = 0.0)]
    pub cancel_rate: f64,
    /// Pause between two scans of one order, in milliseconds.
    #[arg(long, default_value_t = 30)]
    pub scan_interval_ms: u64,
    /// After publishing, watch the lifecycle topics up to this many seconds for the
    /// orders to settle (delivered, rejected, cancelled or refunded); the carrier plays
    /// until then. 0: stop when the orders are published.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// No progress bars.
    #[arg(long)]
    pub quiet: bool,
}

impl LoadArgs {
    fn simulation(&self, settings: &Settings) -> SimulationConfig {
        let fraud = &settings.fraud;
        let run_id = self
            .run_id
            .clone()
            .unwrap_or_else(|| format!("r{}", chrono::Utc::now().format("%Y%m%d%H%M%S%3f")));
        let plan = PlanConfig {
            orders: self.orders,
            stores: self.stores,
            skus: self.skus,
            seed: self.seed,
            run_id,
            initial_stock: self.initial_stock,
            low_stock_skus: self.low_stock_skus,
            low_stock_units: self.low_stock_units,
            set_thresholds: true,
            fraud_customers: self.fraud_customers,
            fraud_burst: fraud.velocity_max_orders.saturating_add(3),
            huge_orders: self.huge_orders,
            huge_order_cents: fraud.max_order_total_cents,
            max_orders_per_customer: fraud.velocity_max_orders.clamp(1, 3),
            skew: self.skew,
        };
        SimulationConfig {
            load: LoadConfig {
                plan,
                rate: self.rate,
                stock: !self.no_stock,
                cancel_rate: self.cancel_rate,
            },
            carrier: (!self.no_carrier).then(|| CarrierConfig {
                group_id: None,
                scan_interval: Duration::from_millis(self.scan_interval_ms),
                delivery_failure_rate: self.delivery_failure_rate,
                seed: self.seed,
                ..CarrierConfig::default()
            }),
            observe: Duration::from_secs(self.timeout),
            show_progress: !self.quiet,
        }
    }
}

pub async fn run(settings: Settings, args: LoadArgs) -> anyhow::Result<()> {
    let config = args.simulation(&settings);
    let shutdown = super::shutdown_on_signal();
    eprintln!(
        "run {}: {} orders to {} stores at {}/s, seed {}",
        config.load.plan.run_id,
        config.load.plan.orders,
        config.load.plan.stores,
        config.load.rate,
        config.load.plan.seed
    );
    let summary = simulator::simulate(&settings, &config, &shutdown).await?;
    print!("{summary}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        load: LoadArgs,
    }

    #[test]
    fn carrier_flags_and_fraud_limits() {
        let settings = Settings::default();
        let c = Cmd::parse_from(["load", "--orders", "10", "--run-id", "x"])
            .load
            .simulation(&settings);
        assert!(c.carrier.is_some());
        assert_eq!(c.load.plan.run_id, "x");
        assert_eq!(c.load.cancel_rate, 0.0);
        let c = Cmd::parse_from(["load", "--cancel-rate", "0.1"])
            .load
            .simulation(&settings);
        assert_eq!(c.load.cancel_rate, 0.1);
        assert!(c.load.plan.fraud_burst > settings.fraud.velocity_max_orders);
        let c = Cmd::parse_from(["load", "--carrier", "--no-carrier"])
            .load
            .simulation(&settings);
        assert!(c.carrier.is_none());
        let c = Cmd::parse_from(["load", "--no-carrier", "--carrier"])
            .load
            .simulation(&settings);
        assert!(c.carrier.is_some());
    }
}
