//! `orderflow lag`: per stage and sink, per input partition, where it continues, the
//! partition's end, the lag between them, and the time of the oldest record not yet
//! processed.
//!
//! "Where it continues" is what the workers themselves honour (see `cli/ops.rs`): a
//! stage's state position (`FROM` = `state`), a sink's offset in SQL (`sql`), else the
//! group's committed offset (`group`), else the partition's start (`start`). Under
//! `at_least_once` a stage's group offsets are only a hint that trails the state, so
//! the state is read (from the changelog), not the group.

use std::time::Duration;

use anyhow::Context;
use clap::Args;
use rdkafka::consumer::Consumer;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use super::ops as ops_io;
use super::run::Role;
use crate::config::Settings;
use crate::ops;
use crate::stages::StageName;
use crate::views::Sink;

#[derive(Debug, Args)]
pub struct LagArgs {
    /// Stages and sinks to report, comma-separated (default: the five pipeline stages,
    /// and the SQL sinks too when --database-url is given).
    #[arg(long, value_delimiter = ',')]
    pub stages: Vec<Role>,
    /// Database of the SQL sinks, whose offsets live there (default: the
    /// `database_url` setting).
    #[arg(long)]
    pub database_url: Option<String>,
}

pub async fn run(mut settings: Settings, args: LagArgs) -> anyhow::Result<()> {
    let mut roles = args.stages;
    if roles.is_empty() {
        roles = StageName::ALL.iter().copied().map(Role::Stage).collect();
        if args.database_url.is_some() {
            roles.extend(Sink::ALL.iter().copied().map(Role::Sink));
        }
    }
    if let Some(url) = args.database_url {
        settings.database_url = url;
    }
    let topics = settings.topics();
    let mut rows = Vec::new();
    let mut total = 0;
    for role in roles {
        let inputs: Vec<String> = ops_io::inputs(role, &settings)
            .iter()
            .map(|t| topics.name(t))
            .collect();
        let marks = {
            let s = settings.clone();
            tokio::task::spawn_blocking(move || ops_io::watermarks(&s, &inputs)).await??
        };
        let tps: Vec<(String, i32)> = marks.keys().cloned().collect();
        let at = ops_io::continues_at(&settings, role, &tps)
            .await
            .with_context(|| format!("reading where {} continues", role.as_str()))?;
        let mut lagging = Vec::new();
        for (tp, (low, high)) in &marks {
            let committed = at.get(tp).map(|(o, _)| *o);
            let lag = ops::lag(committed, *low, *high);
            if lag > 0 {
                lagging.push((tp.clone(), committed.unwrap_or(*low).max(*low)));
            }
        }
        let oldest = {
            let s = settings.clone();
            tokio::task::spawn_blocking(move || oldest_times(&s, &lagging)).await??
        };
        for (tp, (low, high)) in &marks {
            let committed = at.get(tp).map(|(o, _)| *o);
            let lag = ops::lag(committed, *low, *high);
            total += lag;
            rows.push(vec![
                role.as_str().to_owned(),
                tp.0.clone(),
                tp.1.to_string(),
                committed.map_or("-".into(), |c| c.to_string()),
                at.get(tp).map_or("start", |(_, s)| *s).to_owned(),
                high.to_string(),
                lag.to_string(),
                oldest
                    .get(tp)
                    .copied()
                    .flatten()
                    .map_or("-".into(), ops_io::time),
            ]);
        }
    }
    print!(
        "{}",
        ops::table(
            &[
                "STAGE",
                "TOPIC",
                "PARTITION",
                "COMMITTED",
                "FROM",
                "END",
                "LAG",
                "OLDEST_UNPROCESSED"
            ],
            &rows
        )
    );
    println!("total lag: {total} records");
    Ok(())
}

/// The timestamp of the record at each given offset (the first one unprocessed).
fn oldest_times(
    settings: &Settings,
    at: &[((String, i32), i64)],
) -> anyhow::Result<std::collections::BTreeMap<(String, i32), Option<i64>>> {
    let mut out = std::collections::BTreeMap::new();
    if at.is_empty() {
        return Ok(out);
    }
    let c = ops_io::looker(settings)?;
    for ((t, p), offset) in at {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(t, *p, Offset::Offset(*offset))?;
        c.assign(&tpl)?;
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut found = None;
        while std::time::Instant::now() < deadline {
            match c.poll(Duration::from_millis(200)) {
                Some(Ok(m)) if m.topic() == t && m.partition() == *p => {
                    found = m.timestamp().to_millis();
                    break;
                }
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => break,
                _ => {}
            }
        }
        out.insert((t.clone(), *p), found);
    }
    Ok(out)
}
