//! `orderflow gateway`: the mock payment gateway (being written).

use clap::Args;

#[derive(Debug, Args)]
pub struct GatewayArgs {}

pub async fn run(_args: GatewayArgs) -> anyhow::Result<()> {
    anyhow::bail!("the mock gateway is not written yet")
}
