//! `orderflow topics`: provisioning.

use clap::Subcommand;

use crate::admin::{self, TopicOutcome};
use crate::config::Settings;

#[derive(Debug, Subcommand)]
pub enum TopicsCommand {
    /// Create every topic of the deployment (idempotent): pipeline topics, the DLQ and
    /// compacted changelogs, all with the same partition count.
    Create {
        /// Partitions per topic (default: the `partitions` setting).
        #[arg(long)]
        partitions: Option<i32>,
    },
    /// List the deployment's topic names.
    List,
}

pub async fn run(settings: Settings, cmd: TopicsCommand) -> anyhow::Result<()> {
    match cmd {
        TopicsCommand::Create { partitions } => {
            let n = partitions.unwrap_or(settings.partitions);
            for (topic, outcome) in admin::create_topics(&settings, n).await? {
                let what = match outcome {
                    TopicOutcome::Created => "created",
                    TopicOutcome::Existed => "exists",
                };
                println!("{what:8} {topic}");
            }
        }
        TopicsCommand::List => {
            for (topic, compacted) in settings.topics().all() {
                println!("{topic}{}", if compacted { "  (compacted)" } else { "" });
            }
        }
    }
    Ok(())
}
