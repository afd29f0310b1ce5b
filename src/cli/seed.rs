//! `orderflow seed`: stocks a set of demo stores — a restock and a low-stock threshold
//! per (store, SKU) on `inventory.commands` — from the simulator's catalogue, for any
//! deployment. `orderflow dev` runs the same seeding in-process before its traffic.
//!
//! Invariant: the commands' event IDs derive from the run ID, store, SKU and action, so
//! seeding twice with the same run ID is one restock per SKU (the inventory stage drops
//! the repeat); another run ID restocks again.

use clap::Args;
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::simulator::{self, Plan, PlanConfig, SimError, publish};

/// The demo catalogue: which stores and SKUs, and how much of each. The same stores
/// (`store-001`…) and SKUs (`SKU-00001`…) as `orderflow load` with the same counts.
#[derive(Debug, Clone, Args)]
pub struct Catalogue {
    /// Demo stores: store-001, store-002, …
    #[arg(long, default_value_t = 5)]
    pub stores: u32,
    /// SKUs each store stocks: SKU-00001, SKU-00002, … (SKU-00001 sells best).
    #[arg(long, default_value_t = 20)]
    pub skus: u32,
    /// Units restocked per store and SKU; each SKU's low-stock threshold is a fifth of
    /// its stock (at least 1).
    #[arg(long, default_value_t = 1_000)]
    pub initial_stock: i32,
    /// The best-selling SKUs get only --low-stock-units per store, so that they run low
    /// (low-stock alerts, out-of-stock rejections).
    #[arg(long, default_value_t = 1)]
    pub low_stock_skus: u32,
    /// Units of each of those per store.
    #[arg(long, default_value_t = 25)]
    pub low_stock_units: i32,
}

impl Catalogue {
    /// A plan of this catalogue under `run_id`, with no orders: the traffic of
    /// `orderflow dev` and the seeding share it.
    pub fn plan(&self, settings: &Settings, run_id: &str) -> PlanConfig {
        let fraud = &settings.fraud;
        PlanConfig {
            orders: 0,
            stores: self.stores,
            skus: self.skus,
            run_id: run_id.to_owned(),
            initial_stock: self.initial_stock,
            low_stock_skus: self.low_stock_skus,
            low_stock_units: self.low_stock_units,
            set_thresholds: true,
            fraud_burst: fraud.velocity_max_orders.saturating_add(3),
            huge_order_cents: fraud.max_order_total_cents,
            max_orders_per_customer: fraud.velocity_max_orders.clamp(1, 3),
            ..PlanConfig::default()
        }
    }

    fn validate(&self) -> Result<(), SimError> {
        simulator::LoadConfig {
            plan: self.plan(&Settings::default(), DEFAULT_RUN_ID),
            rate: 0.0,
            stock: true,
            cancel_rate: 0.0,
        }
        .validate()
    }
}

/// The run ID of seeding unless one is given: every default seeding publishes the same
/// commands.
pub const DEFAULT_RUN_ID: &str = "seed";

#[derive(Debug, Args)]
pub struct SeedArgs {
    #[command(flatten)]
    pub catalogue: Catalogue,
    /// Tags the commands' event IDs. Seeding again with the same run ID publishes the
    /// same commands, which the inventory stage applies once; another run ID restocks
    /// again.
    #[arg(long, default_value = DEFAULT_RUN_ID)]
    pub run_id: String,
}

/// Publishes the catalogue's stock commands and waits for every acknowledgement;
/// returns how many were published.
pub async fn seed(
    settings: &Settings,
    catalogue: &Catalogue,
    run_id: &str,
    shutdown: &CancellationToken,
) -> Result<u64, SimError> {
    catalogue.validate()?;
    if run_id.is_empty() || run_id.contains(char::is_whitespace) {
        return Err(SimError::Config("--run-id must be a non-empty word".into()));
    }
    let plan = Plan::new(catalogue.plan(settings, run_id));
    let mut publisher = publish::Publisher::new(publish::producer(settings, "seed")?);
    simulator::publish_stock(settings, &mut publisher, &plan, false, shutdown).await
}

pub async fn run(settings: Settings, args: SeedArgs) -> anyhow::Result<()> {
    let shutdown = super::shutdown_on_signal();
    let c = &args.catalogue;
    let n = seed(&settings, c, &args.run_id, &shutdown).await?;
    let topic = settings.topics().name(crate::topics::INVENTORY_COMMANDS);
    println!(
        "published {n} inventory commands to {topic}: {} stores (store-001…) × {} SKUs (SKU-00001…), run ID {:?}",
        c.stores, c.skus, args.run_id
    );
    if shutdown.is_cancelled() {
        anyhow::bail!("interrupted before every command was published");
    }
    Ok(())
}
