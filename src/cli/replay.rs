//! `orderflow replay`: process again what the topics retain. Two modes:
//!
//! - `--stage NAME` and a strategy (`--to-earliest`, `--to-latest`, `--to-offset`,
//!   `--shift-by`, `--to-datetime`, `--by-duration`) moves where a stage's or sink's
//!   inputs continue, as `kafka-consumer-groups --reset-offsets` moves a group: a plan
//!   without `--execute`, refused while the group has live members. A stage continues
//!   where its *state* says (its changelog's positions), not where the group's offsets
//!   say, so a replay request per input partition goes to the stage's changelog
//!   ([`crate::runtime::changelog::replay_request`]): the next owner's restore moves the
//!   state's position there, commits it with its first batch, and retires the request.
//!   The group's offsets move too, so that the consumers start fetching there (a
//!   restore that finds a request no batch follows does not judge the last batch by
//!   them). A sink's positions are its offsets in SQL, moved there directly.
//! - `--rebuild SINK` empties an SQL sink's tables and reads its topics again from the
//!   earliest retained offset, in this process, until it has caught up with the end the
//!   topics had right after the reset; then it stops.
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

use rdkafka::consumer::CommitMode;
use rdkafka::producer::{FutureProducer, FutureRecord};

use super::ops as ops_io;
use super::run::Role;
use crate::config::Settings;
use crate::metrics::Metrics;
use crate::ops::{self, PlanRow, Strategy, TopicSpec};
use crate::runtime::{self, changelog, clock::SystemClock};
use crate::sql::Db;
use crate::views::Sink;

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("strategy").args(["to_earliest", "to_latest", "to_offset", "shift_by", "to_datetime", "by_duration"])))]
pub struct ReplayArgs {
    /// The stage or SQL sink whose consumer group moves: fraud, inventory, payment,
    /// fulfillment, delivery, projector, stats, alerts (its group is
    /// `<group_prefix>.<name>`). Needs one strategy; stop its workers first.
    #[arg(
        long,
        value_name = "NAME",
        conflicts_with = "rebuild",
        requires = "strategy"
    )]
    pub stage: Option<Role>,
    /// Only this input topic (prefix-free or full name), optionally only some partitions:
    /// `order.created` or `order.created:0,2`. Repeatable; default: every input topic.
    #[arg(long, value_name = "TOPIC[:P,P]", requires = "stage")]
    pub topic: Vec<TopicSpec>,
    /// Every partition to the oldest retained record.
    #[arg(long)]
    pub to_earliest: bool,
    /// Every partition to its end (skips what is unprocessed).
    #[arg(long)]
    pub to_latest: bool,
    /// Every partition to this offset (clamped to what the partition retains).
    #[arg(long, value_name = "N")]
    pub to_offset: Option<i64>,
    /// Every partition by N records from where it continues now (-N: read N again).
    #[arg(long, value_name = "±N", allow_hyphen_values = true, value_parser = parse_shift_arg)]
    pub shift_by: Option<i64>,
    /// Every partition to its first record at or after this time (RFC 3339).
    #[arg(long, value_name = "RFC3339", value_parser = parse_datetime_arg)]
    pub to_datetime: Option<i64>,
    /// Every partition to its first record of the last DURATION (30m, 2h, 1d, 1h30m).
    #[arg(long, value_name = "DURATION", value_parser = parse_duration_arg)]
    pub by_duration: Option<Duration>,
    /// Move the group (default: print the plan only).
    #[arg(long, requires = "stage")]
    pub execute: bool,
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

fn parse_shift_arg(s: &str) -> Result<i64, String> {
    ops::parse_shift(s).map_err(|e| e.to_string())
}

fn parse_datetime_arg(s: &str) -> Result<i64, String> {
    ops::parse_datetime(s).map_err(|e| e.to_string())
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    ops::parse_duration(s).map_err(|e| e.to_string())
}

impl ReplayArgs {
    fn strategy(&self) -> Option<Strategy> {
        if self.to_earliest {
            Some(Strategy::Earliest)
        } else if self.to_latest {
            Some(Strategy::Latest)
        } else if let Some(o) = self.to_offset {
            Some(Strategy::Offset(o))
        } else if let Some(n) = self.shift_by {
            Some(Strategy::ShiftBy(n))
        } else if let Some(t) = self.to_datetime {
            Some(Strategy::Datetime(t))
        } else {
            self.by_duration.map(Strategy::Duration)
        }
    }
}

fn parse_sink(s: &str) -> Result<Sink, String> {
    Sink::from_name(s).ok_or_else(|| {
        let names: Vec<&str> = Sink::ALL.iter().map(|s| s.name()).collect();
        format!("unknown sink {s:?}; SQL sinks: {}", names.join(", "))
    })
}

pub async fn run(mut settings: Settings, args: ReplayArgs) -> anyhow::Result<()> {
    if let Some(url) = args.database_url.clone() {
        settings.database_url = url;
    }
    if let Some(sink) = args.rebuild {
        return rebuild(settings, sink).await;
    }
    match (args.stage, args.strategy()) {
        (Some(role), Some(strategy)) => {
            move_group(settings, role, &args.topic, strategy, args.execute).await
        }
        _ => bail!(
            "say what to replay: `orderflow replay --stage NAME --to-earliest` (or another \
             strategy) moves a stage's or sink's inputs; `orderflow replay --rebuild SINK` \
             rebuilds an SQL sink's tables from its topics"
        ),
    }
}

/// The plan of moving `role`'s inputs by `strategy`, and with `execute` the move.
async fn move_group(
    settings: Settings,
    role: Role,
    only: &[TopicSpec],
    strategy: Strategy,
    execute: bool,
) -> anyhow::Result<()> {
    let topics = settings.topics();
    let group = settings.group_id(role.as_str());
    let inputs: Vec<String> = ops_io::inputs(role, &settings)
        .iter()
        .map(|t| topics.name(t))
        .collect();
    // Which topic-partitions: every input, or those named.
    let mut wanted: Vec<(String, Vec<i32>)> = Vec::new();
    for spec in only {
        let full = if inputs.contains(&spec.topic) {
            spec.topic.clone()
        } else {
            topics.name(&spec.topic)
        };
        if !inputs.contains(&full) {
            let bases: Vec<&str> = ops_io::inputs(role, &settings).to_vec();
            bail!(
                "--topic {}: not an input of {}; its inputs: {}",
                spec.topic,
                role.as_str(),
                bases.join(", ")
            );
        }
        wanted.push((full, spec.partitions.clone()));
    }
    if wanted.is_empty() {
        wanted = inputs.iter().map(|t| (t.clone(), Vec::new())).collect();
    }
    let names: Vec<String> = wanted.iter().map(|(t, _)| t.clone()).collect();
    let (marks, members) = {
        let s = settings.clone();
        let g = group.clone();
        tokio::task::spawn_blocking(move || {
            anyhow::Ok((
                ops_io::watermarks(&s, &names)?,
                ops_io::live_members(&s, &g)?,
            ))
        })
        .await??
    };
    let mut tps: Vec<(String, i32)> = Vec::new();
    for (t, parts) in &wanted {
        for p in parts {
            if !marks.contains_key(&(t.clone(), *p)) {
                bail!("--topic {t}: partition {p} does not exist");
            }
        }
        tps.extend(
            marks
                .keys()
                .filter(|(mt, mp)| mt == t && (parts.is_empty() || parts.contains(mp)))
                .cloned(),
        );
    }
    let current = ops_io::continues_at(&settings, role, &tps).await?;
    let by_time = match strategy.by_time(crate::sql::now_ms()) {
        Some(ms) => {
            let s = settings.clone();
            let t = tps.clone();
            tokio::task::spawn_blocking(move || offsets_for_time(&s, &t, ms)).await??
        }
        None => BTreeMap::new(),
    };
    let plan: Vec<PlanRow> = tps
        .iter()
        .map(|tp| {
            let (low, high) = marks[tp];
            let cur = current.get(tp).map(|(o, _)| *o);
            PlanRow {
                topic: tp.0.clone(),
                partition: tp.1,
                current: cur,
                target: strategy.target(cur, low, high, by_time.get(tp).copied().flatten()),
                low,
                high,
            }
        })
        .collect();
    let rows: Vec<Vec<String>> = plan
        .iter()
        .map(|r| {
            let source = current
                .get(&(r.topic.clone(), r.partition))
                .map(|(_, s)| *s);
            vec![
                r.topic.clone(),
                r.partition.to_string(),
                r.current.map_or("-".into(), |c| c.to_string()),
                source.unwrap_or("start").to_owned(),
                r.target.to_string(),
                r.to_reprocess().to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        ops::table(
            &[
                "TOPIC",
                "PARTITION",
                "CURRENT",
                "FROM",
                "TARGET",
                "TO_REPROCESS"
            ],
            &rows
        )
    );
    let total: i64 = plan.iter().map(|r| r.to_reprocess().max(0)).sum();
    if !members.is_empty() {
        bail!(
            "consumer group {group} has {} live member(s) ({}): stop every {} worker before \
             replaying; the plan above is what a replay would do now",
            members.len(),
            members.join(", "),
            role.as_str()
        );
    }
    if !execute {
        println!(
            "plan only: {total} records to process again for {} (group {group}); add --execute to apply it",
            role.as_str()
        );
        return Ok(());
    }
    let mut progress = ops_io::Progress::new(
        &format!("replay {}", role.as_str()),
        "partitions",
        plan.len() as u64,
    );
    match role {
        Role::Sink(sink) => {
            let db = Db::connect(&settings.database_url).await?;
            db.migrate().await?;
            let offsets: Vec<(String, i32, i64)> = plan
                .iter()
                .map(|r| (r.topic.clone(), r.partition, r.target))
                .collect();
            db.set_offsets(sink, &offsets)
                .await
                .with_context(|| format!("moving the offsets of sink {sink}"))?;
            db.close().await;
            progress.set(plan.len() as u64);
        }
        Role::Stage(stage) => {
            let s = settings.clone();
            let p = plan.clone();
            let g = group.clone();
            tokio::task::spawn_blocking(move || {
                request_replay(&s, stage.as_str(), &p)?;
                commit_group(&s, &g, &p)
            })
            .await??;
            progress.set(plan.len() as u64);
        }
    }
    progress.finish();
    println!(
        "replay of {} requested: {total} records to process again over {} partitions; \
         start its workers to process them",
        role.as_str(),
        plan.len()
    );
    Ok(())
}

/// Per partition, the offset of its first record at or after `ms` (`None`: none).
fn offsets_for_time(
    settings: &Settings,
    tps: &[(String, i32)],
    ms: i64,
) -> anyhow::Result<BTreeMap<(String, i32), Option<i64>>> {
    let c = ops_io::looker(settings)?;
    let mut tpl = TopicPartitionList::new();
    for (t, p) in tps {
        tpl.add_partition_offset(t, *p, Offset::Offset(ms))?;
    }
    let found = c
        .offsets_for_times(tpl, Duration::from_secs(10))
        .context("looking up offsets by time")?;
    Ok(found
        .elements()
        .iter()
        .map(|e| {
            let o = match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(o),
                _ => None,
            };
            ((e.topic().to_owned(), e.partition()), o)
        })
        .collect())
}

/// Commits the plan's targets as the group's offsets, so that the workers' consumers
/// start fetching there (the state's position decides what is processed).
fn commit_group(settings: &Settings, group: &str, plan: &[PlanRow]) -> anyhow::Result<()> {
    let mut c = settings.client_config();
    c.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().context("creating a Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for r in plan {
        tpl.add_partition_offset(&r.topic, r.partition, Offset::Offset(r.target))?;
    }
    consumer
        .commit(&tpl, CommitMode::Sync)
        .with_context(|| format!("committing the offsets of group {group}"))
}

/// Writes a replay request for every row of the plan to the stage's changelog, in the
/// row's partition, and waits until the broker has every one.
fn request_replay(settings: &Settings, stage: &str, plan: &[PlanRow]) -> anyhow::Result<()> {
    let topics = settings.topics();
    let changelog = topics.changelog(stage);
    let mut c = settings.client_config();
    c.set("enable.idempotence", "true").set("acks", "all");
    let producer: FutureProducer = c.create().context("creating a Kafka producer")?;
    let mut pending = Vec::new();
    for r in plan {
        let base = topics.base(&r.topic).unwrap_or(&r.topic);
        let rec = changelog::replay_request(base, r.target);
        let f = producer
            .send_result(
                FutureRecord::to(&changelog)
                    .partition(r.partition)
                    .key(&rec.key)
                    .payload(rec.value.as_deref().unwrap_or_default()),
            )
            .map_err(|(e, _)| e)
            .with_context(|| {
                format!("writing the replay request to {changelog}[{}]", r.partition)
            })?;
        pending.push((r.partition, f));
    }
    for (p, f) in pending {
        futures::executor::block_on(f)
            .context("the producer went away")?
            .map_err(|(e, _)| e)
            .with_context(|| format!("writing the replay request to {changelog}[{p}]"))?;
    }
    Ok(())
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
