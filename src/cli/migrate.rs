//! `orderflow migrate`: creates or upgrades the read side's tables (orders, timeline,
//! stats, alerts, sink offsets) in the database of `ORDERFLOW_DATABASE_URL`.
//!
//! Invariant: idempotent — the migrations applied are recorded in the database itself, so
//! running it again (at every deploy, say) applies only what is new.

use clap::Args;

use crate::config::Settings;
use crate::sql::{Backend, Db};

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// Database URL: `postgres://user@host:5432/db` or `sqlite://path/to/file.db`
    /// (default: the `database_url` setting, an SQLite file `orderflow.db` here).
    #[arg(long, env = "ORDERFLOW_DATABASE_URL")]
    pub database_url: Option<String>,
}

pub async fn run(settings: Settings, args: MigrateArgs) -> anyhow::Result<()> {
    let url = args.database_url.unwrap_or(settings.database_url);
    let db = Db::connect(&url).await?;
    db.migrate().await?;
    let backend = match db.backend() {
        Backend::Postgres => "PostgreSQL",
        Backend::Sqlite => "SQLite",
    };
    db.close().await;
    println!("the {backend} database is up to date");
    Ok(())
}
