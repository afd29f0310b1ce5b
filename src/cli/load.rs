//! `orderflow load`: the traffic simulator (being written).

use clap::Args;

use crate::config::Settings;

#[derive(Debug, Args)]
pub struct LoadArgs {}

pub async fn run(_settings: Settings, _args: LoadArgs) -> anyhow::Result<()> {
    anyhow::bail!("the traffic simulator is not written yet")
}
