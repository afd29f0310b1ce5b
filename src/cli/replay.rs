//! `orderflow replay`: process again what the topics retain. One mode so far:
//! `--rebuild SINK` empties an SQL sink's tables and reads its topics again from the
//! earliest retained offset, in this process, until it has caught up with the end the
//! topics had right after the reset; then it stops.
//!
//! Invariant: the rebuilt tables equal what the sink would have written had it read the
//! retained records once from the start. The reset is one SQL transaction and fences
//! every worker holding a claim (see [`Db::reset`]), so sink workers left running are
//! not a problem: they fail their next commit, claim again and start over from the
//! beginning too; this process joins the sink's consumer group and takes its share.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Settings;
use crate::metrics::Metrics;
use crate::runtime::{self, clock::SystemClock};
use crate::sql::Db;
use crate::views::Sink;

#[derive(Debug, Args)]
pub struct ReplayArgs {
    /// Rebuild the tables of an SQL sink (projector, stats or alerts) from the records
    /// the topics retain: deletes its rows, offsets and applied-event ledger in one
    /// transaction, then runs the sink here until it has caught up. Running workers of
    /// that sink are fenced and start over too. Rebuilding `alerts` loses operators'
    /// acknowledgements and resolutions, which are not events.
    #[arg(long, value_name = "SINK", value_parser = parse_sink)]
    pub rebuild: Option<Sink>,
    /// Database URL (default: the `database_url` setting).
    #[arg(long, env = "ORDERFLOW_DATABASE_URL")]
    pub database_url: Option<String>,
}

fn parse_sink(s: &str) -> Result<Sink, String> {
    Sink::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Sink::ALL.iter().map(|s| s.name()).collect();
        format!("unknown sink {s:?}; SQL sinks: {}", names.join(", "))
    })
}

pub async fn run(mut settings: Settings, args: ReplayArgs) -> anyhow::Result<()> {
    if let Some(url) = args.database_url {
        settings.database_url = url;
    }
    match args.rebuild {
        Some(sink) => rebuild(settings, sink).await,
        None => bail!(
            "say what to replay: `orderflow replay --rebuild SINK` rebuilds an SQL sink \
             (projector, stats, alerts) from its topics; replaying topics through the \
             pipeline stages is not supported yet"
        ),
    }
}

/// One input partition of the rebuild: its offsets when the reset was done.
#[derive(Debug, Clone, Copy)]
struct Span {
    low: i64,
    high: i64,
}

async fn rebuild(settings: Settings, sink: Sink) -> anyhow::Result<()> {
    let db = Db::connect(&settings.database_url).await?;
    db.migrate().await?;
    let deleted = db
        .reset(sink)
        .await
        .with_context(|| format!("resetting the tables of sink {sink}"))?;
    tracing::info!(%sink, deleted, "sink reset; reading its topics again from the start");
    let ends = {
        let settings = settings.clone();
        tokio::task::spawn_blocking(move || input_spans(&settings, sink))
            .await
            .context("reading the topics' offsets")??
    };
    let total: i64 = ends.values().map(|s| s.high - s.low).sum();
    let shutdown = super::shutdown_on_signal();
    let worker = runtime::sink::spawn(
        sink,
        settings.clone(),
        Metrics::new(),
        Arc::new(SystemClock),
        shutdown.clone(),
    );
    let progress = Progress::new(sink, total.max(0) as u64);
    let started = Instant::now();
    let mut probe = Probe::new(&settings)?;
    let mut last: BTreeMap<(String, i32), Option<i64>> = BTreeMap::new();
    let result = loop {
        // Interrupted first: a signal stops the sink too.
        if shutdown.is_cancelled() {
            break Err(anyhow::anyhow!(
                "interrupted: the tables of {sink} are partly rebuilt; run the rebuild again \
                 (or let a running {sink} worker finish it)"
            ));
        }
        if worker.is_finished() {
            break Err(anyhow::anyhow!(
                "the {sink} sink stopped before catching up"
            ));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let stored = match db.offsets(sink).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the sink's offsets; trying again");
                continue;
            }
        };
        let stored: BTreeMap<(String, i32), Option<i64>> = stored
            .into_iter()
            .map(|o| ((o.topic, o.partition), o.next_offset))
            .collect();
        let mut done = 0;
        let mut behind = Vec::new();
        for (tp, span) in &ends {
            let at = stored.get(tp).copied().flatten();
            let caught_up = match at {
                _ if span.high <= span.low => true,
                Some(next) if next >= span.high => true,
                // Short of the end and not moving: the rest may be transaction markers,
                // which no record reaches.
                Some(next) if last.get(tp) == Some(&at) => {
                    probe.nothing_from(&tp.0, tp.1, next, span.high)?
                }
                _ => false,
            };
            done += if caught_up {
                span.high - span.low
            } else {
                at.unwrap_or(span.low).clamp(span.low, span.high) - span.low
            };
            if !caught_up {
                behind.push(tp.clone());
            }
        }
        last = stored;
        progress.set(done.max(0) as u64);
        if behind.is_empty() {
            break Ok(());
        }
    };
    shutdown.cancel();
    let joined = tokio::task::spawn_blocking(move || worker.join())
        .await
        .context("joining the sink")?;
    progress.finish();
    db.close().await;
    result?;
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(_) => bail!("the {sink} sink panicked"),
    }
    println!(
        "rebuilt {sink} from {total} offsets of {} partitions in {:.1}s",
        ends.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Every input partition of `sink` with its low and high watermarks.
fn input_spans(settings: &Settings, sink: Sink) -> anyhow::Result<BTreeMap<(String, i32), Span>> {
    let topics = settings.topics();
    let names: Vec<String> = sink.topics().iter().map(|t| topics.name(t)).collect();
    let consumer: BaseConsumer = settings.client_config().create()?;
    let mut out = BTreeMap::new();
    for (topic, partitions) in crate::admin::partition_counts(settings, &names)? {
        if partitions == 0 {
            bail!(
                "topic {topic} does not exist; create the topics first (orderflow topics create)"
            );
        }
        for p in 0..partitions {
            let (low, high) = consumer
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .with_context(|| format!("offsets of {topic}[{p}]"))?;
            out.insert((topic.clone(), p), Span { low, high });
        }
    }
    Ok(out)
}

/// Tells whether a partition holds any record between two offsets, reading as the sink
/// does (committed records only).
struct Probe {
    consumer: BaseConsumer,
}

impl Probe {
    fn new(settings: &Settings) -> anyhow::Result<Probe> {
        let mut c = settings.client_config();
        c.set("group.id", settings.group_id("replay-probe"))
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "true")
            .set("isolation.level", "read_committed");
        Ok(Probe {
            consumer: c.create().context("creating a Kafka consumer")?,
        })
    }

    /// Whether `topic`[`partition`] has no record in `from..until`.
    fn nothing_from(
        &mut self,
        topic: &str,
        partition: i32,
        from: i64,
        until: i64,
    ) -> anyhow::Result<bool> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(from))?;
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => return Ok(m.offset() >= until),
                Some(Err(KafkaError::PartitionEOF(_))) => return Ok(true),
                Some(Err(e)) => tracing::debug!(error = %e, "probe"),
                None => {}
            }
        }
        Ok(false)
    }
}

/// A progress bar on a terminal, a line every few seconds otherwise.
struct Progress {
    bar: Option<ProgressBar>,
    sink: Sink,
    total: u64,
    last_line: std::cell::Cell<Instant>,
}

impl Progress {
    fn new(sink: Sink, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(
                "rebuilding {msg} [{bar:40}] {pos}/{len} offsets ({percent}%) {elapsed}",
            ) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(sink.name());
            bar
        });
        Progress {
            bar,
            sink,
            total,
            last_line: std::cell::Cell::new(Instant::now()),
        }
    }

    fn set(&self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.get().elapsed() >= Duration::from_secs(2) => {
                self.last_line.set(Instant::now());
                eprintln!(
                    "rebuilding {}: {done}/{} offsets ({}%)",
                    self.sink,
                    self.total,
                    (done * 100).checked_div(self.total).unwrap_or(100)
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
    }
}
