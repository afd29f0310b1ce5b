//! `orderflow schemas`: OrderFlow's Avro schemas in a Confluent-compatible schema
//! registry, for producers whose serializers look them up there.

use anyhow::Context;
use clap::{Args, Subcommand};

use crate::config::Settings;
use crate::events::registry::{self, SchemaRegistry};

#[derive(Debug, Subcommand)]
pub enum SchemasCommand {
    /// Register every event schema under its conventional subject and print the IDs.
    ///
    /// A topic with one event type: `<topic>-value` (TopicNameStrategy). A topic with
    /// several: `<topic>-<record full name>` (TopicRecordNameStrategy), one subject per
    /// type. Topic names carry the topic prefix. Registering again changes nothing: the
    /// registry answers with the IDs it already gave.
    Register(RegisterArgs),
}

#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The registry's base URL (default: the settings key `schema_registry_url`,
    /// ORDERFLOW_SCHEMA_REGISTRY_URL).
    #[arg(long)]
    pub url: Option<String>,
}

pub async fn run(settings: Settings, cmd: SchemasCommand) -> anyhow::Result<()> {
    match cmd {
        SchemasCommand::Register(args) => {
            let url = args.url.unwrap_or(settings.schema_registry_url.clone());
            anyhow::ensure!(
                !url.trim().is_empty(),
                "no schema registry: pass --url or set ORDERFLOW_SCHEMA_REGISTRY_URL (settings key `schema_registry_url`)"
            );
            let registry = SchemaRegistry::new(&url);
            println!("{:<72} {:>6}  event type", "subject", "id");
            for (subject, t) in registry::subjects(&settings.topics()) {
                let id = registry
                    .register(&subject, t.schema_source())
                    .await
                    .with_context(|| format!("registering {} under {subject}", t.name()))?;
                println!("{subject:<72} {id:>6}  {}", t.name());
            }
            Ok(())
        }
    }
}
