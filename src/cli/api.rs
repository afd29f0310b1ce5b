//! `orderflow api`: the HTTP API — orders, inventory commands, stats and alerts, one
//! store per request — publishing to the brokers and reading the read side's database.
//!
//! Invariant: the API serves only once the database is migrated, and stops (ending live
//! streams) when told to, never in the middle of answering a request.

use anyhow::Context;
use clap::Args;

use crate::api::{self, ApiOptions, ApiState};
use crate::config::Settings;
use crate::sql::Db;

#[derive(Debug, Args)]
pub struct ApiArgs {
    /// Address to listen on (default: the `api_addr` setting, 127.0.0.1:8080); port 0
    /// picks a free port.
    #[arg(long, env = "ORDERFLOW_API_ADDR")]
    pub addr: Option<String>,
    /// The read side's database: `postgres://…` or `sqlite://…` (default: the
    /// `database_url` setting). Its migrations are applied at start-up.
    #[arg(long, env = "ORDERFLOW_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Seconds an order must have made no progress before `POST /orders/{id}/retry`
    /// republishes it.
    #[arg(long, default_value_t = 30)]
    pub retry_grace_secs: u64,
}

pub async fn run(mut settings: Settings, args: ApiArgs) -> anyhow::Result<()> {
    if let Some(addr) = args.addr {
        settings.api_addr = addr;
    }
    if let Some(url) = args.database_url {
        settings.database_url = url;
    }
    let db = Db::connect(&settings.database_url).await?;
    db.migrate().await?;
    let shutdown = super::shutdown_on_signal();
    let options = ApiOptions {
        retry_grace: std::time::Duration::from_secs(args.retry_grace_secs),
        ..ApiOptions::default()
    };
    let state = ApiState::new(&settings, db.clone(), options, shutdown.clone())
        .context("creating the Kafka producer")?;
    let (bound, server) = api::serve(&settings.api_addr, state, shutdown)
        .await
        .with_context(|| format!("binding {} (settings key `api_addr`)", settings.api_addr))?;
    // Tests and scripts read the bound address (port 0) from this line.
    println!("orderflow api listening on http://{bound}");
    tracing::info!(%bound, brokers = %settings.brokers, "the API is serving");
    server.await.context("the API server task")?;
    db.close().await;
    Ok(())
}
