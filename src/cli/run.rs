//! `orderflow run`: stage workers in this process, plus `/metrics` and `/health`.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::config::Settings;
use crate::gateway::client::GatewayClient;
use crate::metrics::{self, Health, Metrics};
use crate::runtime::{self, RuntimeError, clock::SystemClock};
use crate::sql::Db;
use crate::stages::StageName;
use crate::stages::delivery::DeliveryStage;
use crate::stages::fraud::FraudStage;
use crate::stages::fulfillment::FulfillmentStage;
use crate::stages::inventory::InventoryStage;
use crate::stages::payment::PaymentStage;
use crate::views::Sink;

/// What one worker thread runs: a pipeline stage or an SQL sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Stage(StageName),
    Sink(Sink),
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Stage(s) => s.as_str(),
            Role::Sink(s) => s.name(),
        }
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(sink) = Sink::from_name(s) {
            return Ok(Role::Sink(sink));
        }
        s.parse::<StageName>().map(Role::Stage).map_err(|_| {
            let stages: Vec<_> = StageName::ALL.iter().map(|n| n.as_str()).collect();
            let sinks: Vec<_> = Sink::ALL.iter().map(|n| n.name()).collect();
            format!(
                "unknown stage {s:?}; stages: {}; SQL sinks: {}",
                stages.join(", "),
                sinks.join(", ")
            )
        })
    }
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Stages to run, comma-separated: fraud, inventory, payment, fulfillment, delivery,
    /// and the SQL sinks projector, stats, alerts (default: the five pipeline stages).
    /// Sinks write to ORDERFLOW_DATABASE_URL, whose migrations are applied at start-up.
    #[arg(long, value_delimiter = ',')]
    pub stages: Vec<Role>,
}

pub async fn run(settings: Settings, args: RunArgs) -> anyhow::Result<()> {
    let stages = if args.stages.is_empty() {
        StageName::ALL.iter().copied().map(Role::Stage).collect()
    } else {
        args.stages
    };
    if stages.iter().any(|r| matches!(r, Role::Sink(_))) {
        let db = Db::connect(&settings.database_url).await?;
        db.migrate().await?;
        db.close().await;
    }
    let shutdown = super::shutdown_on_signal();
    let metrics = Metrics::new();
    let health = Health::default();
    let (addr, http) = metrics::serve(
        &settings.http_addr,
        metrics.clone(),
        health.clone(),
        shutdown.clone(),
    )
    .await
    .with_context(|| format!("binding the HTTP endpoint {}", settings.http_addr))?;
    tracing::info!(%addr, "metrics on http://{addr}/metrics, health on http://{addr}/health/ready");
    let handles = stages
        .iter()
        .map(|name| spawn_stage(*name, &settings, &metrics, shutdown.clone()))
        .collect::<anyhow::Result<Vec<_>>>()?;
    health.set_ready(true);
    let mut first_error: Option<RuntimeError> = None;
    for (name, handle) in stages.iter().zip(handles) {
        let result = tokio::task::spawn_blocking(move || handle.join())
            .await
            .expect("joining a stage thread")
            .unwrap_or(Err(RuntimeError::Panicked(name.as_str())));
        if let Err(e) = result {
            // One stage failing stops the worker: a half-running process hides problems.
            health.set_ready(false);
            shutdown.cancel();
            first_error.get_or_insert(e);
        }
    }
    shutdown.cancel();
    let _ = http.await;
    match first_error {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// The one place a stage or sink name becomes a running worker.
fn spawn_stage(
    role: Role,
    settings: &Settings,
    metrics: &Metrics,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<Result<(), RuntimeError>>> {
    let clock = Arc::new(SystemClock);
    let (s, m) = (settings.clone(), metrics.clone());
    let name = match role {
        Role::Sink(sink) => return Ok(runtime::sink::spawn(sink, s, m, clock, shutdown)),
        Role::Stage(name) => name,
    };
    Ok(match name {
        StageName::Fraud => runtime::spawn(FraudStage::new(s.fraud.clone()), s, m, clock, shutdown),
        StageName::Inventory => runtime::spawn(
            InventoryStage::new(s.inventory.clone()),
            s,
            m,
            clock,
            shutdown,
        ),
        StageName::Payment => {
            let gateway =
                GatewayClient::new(&s.payment).context("building the payment gateway client")?;
            let stage = PaymentStage::new(s.payment.clone());
            runtime::spawn_with_effects(stage, s, m, clock, Some(Arc::new(gateway)), shutdown)
        }
        StageName::Fulfillment => runtime::spawn(
            FulfillmentStage::new(s.fulfillment.clone()),
            s,
            m,
            clock,
            shutdown,
        ),
        StageName::Delivery => runtime::spawn(DeliveryStage::new(), s, m, clock, shutdown),
    })
}
