//! `orderflow run`: stage workers in this process, plus `/metrics` and `/health`.

use std::sync::Arc;

use anyhow::Context;
use clap::Args;

use crate::config::Settings;
use crate::gateway::client::GatewayClient;
use crate::metrics::{self, Health, Metrics};
use crate::runtime::{self, RuntimeError, clock::SystemClock};
use crate::stages::StageName;
use crate::stages::delivery::DeliveryStage;
use crate::stages::fraud::FraudStage;
use crate::stages::fulfillment::FulfillmentStage;
use crate::stages::inventory::InventoryStage;
use crate::stages::payment::PaymentStage;

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Stages to run, comma-separated (default: every stage).
    #[arg(long, value_delimiter = ',')]
    pub stages: Vec<StageName>,
}

pub async fn run(settings: Settings, args: RunArgs) -> anyhow::Result<()> {
    let stages = if args.stages.is_empty() {
        StageName::ALL.to_vec()
    } else {
        args.stages
    };
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

/// The one place a stage name becomes a running stage.
fn spawn_stage(
    name: StageName,
    settings: &Settings,
    metrics: &Metrics,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<Result<(), RuntimeError>>> {
    let clock = Arc::new(SystemClock);
    let (s, m) = (settings.clone(), metrics.clone());
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
