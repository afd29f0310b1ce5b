//! `orderflow dlq`: list, inspect and redrive dead letters.
//!
//! A dead letter is named by its place in the DLQ topic, `PARTITION:OFFSET` (a bare
//! `OFFSET` when the topic has one partition). A redrive publishes the original key and
//! value (or, with `--edit`, a corrected value) back to the source topic and partition,
//! with the original record's own headers and `orderflow.redrive.count` one higher than
//! the dead letter's; the stage copies that header into a new dead letter if the record
//! fails again, so the count follows the record.
//!
//! Invariant: a dead letter redriven `--max-redrives` times is never sent again by this
//! command, and one whose value was cut to fit the DLQ is sent only with `--edit`.

use std::collections::BTreeMap;
use std::io::Read;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use rdkafka::consumer::Consumer;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, Headers, Message, OwnedHeaders, OwnedMessage};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};

use super::ops as ops_io;
use crate::config::Settings;
use crate::events::codec::{Codec, DecodeHints};
use crate::ops::{self, DeadLetterInfo, DlqFilter, REDRIVE_COUNT_HEADER};
use crate::runtime::{EVENT_TYPE_HEADER, dlq_headers};
use crate::topics;

#[derive(Debug, Subcommand)]
pub enum DlqCommand {
    /// List dead letters as a table: place, time, stage, error class, source, message.
    List(FilterArgs),
    /// Show one dead letter: headers, key, and the value decoded where possible (else hex).
    Show {
        /// `PARTITION:OFFSET` in the DLQ topic (a bare offset if it has one partition).
        at: At,
    },
    /// Send dead letters back to their source topic, with their original key.
    Redrive(RedriveArgs),
}

#[derive(Debug, Args, Clone)]
pub struct FilterArgs {
    /// Only dead letters of this stage (fraud, inventory, …, or a sink).
    #[arg(long)]
    pub stage: Option<String>,
    /// Only this error class (decode, schema, unexpected, …).
    #[arg(long)]
    pub error_class: Option<String>,
    /// Only records that came from this topic (with or without the prefix).
    #[arg(long)]
    pub source_topic: Option<String>,
    /// Only dead letters written at or after this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub since: Option<i64>,
    /// Only dead letters written before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub until: Option<i64>,
}

impl FilterArgs {
    fn filter(&self) -> DlqFilter {
        DlqFilter {
            stage: self.stage.clone(),
            error_class: self.error_class.clone(),
            source_topic: self.source_topic.clone(),
            since_ms: self.since,
            until_ms: self.until,
        }
    }

    fn is_empty(&self) -> bool {
        self.filter() == DlqFilter::default()
    }
}

#[derive(Debug, Args)]
pub struct RedriveArgs {
    /// Dead letters to redrive (`PARTITION:OFFSET`, comma-separated); without it, every
    /// dead letter matching the filters (at least one filter, or --all).
    #[arg(long, value_delimiter = ',')]
    pub offset: Vec<At>,
    #[command(flatten)]
    pub filter: FilterArgs,
    /// Every dead letter (when no --offset and no filter is given).
    #[arg(long)]
    pub all: bool,
    /// A dead letter already redriven this many times is refused.
    #[arg(long, default_value_t = 3)]
    pub max_redrives: u32,
    /// Print what would be sent, send nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Send this corrected JSON value instead of the original (one dead letter only):
    /// a file, or `-` for standard input.
    #[arg(long, value_name = "FILE")]
    pub edit: Option<String>,
}

/// A dead letter's place in the DLQ topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct At {
    pub partition: Option<i32>,
    pub offset: i64,
}

impl std::str::FromStr for At {
    type Err = String;
    fn from_str(s: &str) -> Result<At, String> {
        let bad = || format!("invalid dead letter {s:?}: write PARTITION:OFFSET, e.g. 0:42");
        match s.split_once(':') {
            Some((p, o)) => Ok(At {
                partition: Some(p.parse().map_err(|_| bad())?),
                offset: o.parse().map_err(|_| bad())?,
            }),
            None => Ok(At {
                partition: None,
                offset: s.parse().map_err(|_| bad())?,
            }),
        }
    }
}

fn parse_time(s: &str) -> Result<i64, String> {
    ops::parse_datetime(s).map_err(|e| e.to_string())
}

pub async fn run(settings: Settings, cmd: DlqCommand) -> anyhow::Result<()> {
    tokio::task::spawn_blocking(move || match cmd {
        DlqCommand::List(f) => list(&settings, &f),
        DlqCommand::Show { at } => show(&settings, at),
        DlqCommand::Redrive(args) => redrive(&settings, args),
    })
    .await?
}

/// Every record of the DLQ topic, by partition and offset.
fn read_dlq(settings: &Settings) -> anyhow::Result<BTreeMap<(i32, i64), OwnedMessage>> {
    let dlq = settings.topics().name(topics::DLQ);
    let marks = ops_io::watermarks(settings, std::slice::from_ref(&dlq))?;
    let c = ops_io::looker(settings)?;
    let mut tpl = TopicPartitionList::new();
    let mut reading: BTreeMap<i32, i64> = BTreeMap::new();
    for ((_, p), (low, high)) in &marks {
        if high > low {
            tpl.add_partition_offset(&dlq, *p, Offset::Offset(*low))?;
            reading.insert(*p, high - 1);
        }
    }
    let mut out = BTreeMap::new();
    if reading.is_empty() {
        return Ok(out);
    }
    c.assign(&tpl)?;
    let mut last_progress = Instant::now();
    while !reading.is_empty() {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let (p, o) = (m.partition(), m.offset());
                if reading.get(&p).is_some_and(|last| o >= *last) {
                    reading.remove(&p);
                }
                out.insert((p, o), m.detach());
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                reading.remove(&p);
            }
            Some(Err(e)) => return Err(e).context("reading the DLQ"),
            None if last_progress.elapsed() > Duration::from_secs(20) => {
                bail!("reading {dlq} made no progress for 20 s")
            }
            None => {}
        }
    }
    Ok(out)
}

fn info(m: &OwnedMessage) -> DeadLetterInfo {
    let headers: Vec<(&str, Option<&[u8]>)> = m
        .headers()
        .map(|h| h.iter().map(|h| (h.key, h.value)).collect())
        .unwrap_or_default();
    DeadLetterInfo::from_headers(
        m.partition(),
        m.offset(),
        m.timestamp().to_millis(),
        headers,
    )
}

fn list(settings: &Settings, f: &FilterArgs) -> anyhow::Result<()> {
    let filter = f.filter();
    let prefix = settings.topics().prefix().to_owned();
    let rows: Vec<Vec<String>> = read_dlq(settings)?
        .values()
        .map(info)
        .filter(|d| filter.matches(d, &prefix))
        .map(|d| {
            vec![
                format!("{}:{}", d.partition, d.offset),
                d.time_ms.map_or("-".into(), ops_io::time),
                d.stage.clone(),
                d.class.clone(),
                d.source_topic.clone(),
                d.source_partition.map_or("-".into(), |p| p.to_string()),
                d.source_offset.map_or("-".into(), |o| o.to_string()),
                d.redrives.to_string(),
                d.message.chars().take(120).collect(),
            ]
        })
        .collect();
    print!(
        "{}",
        ops::table(
            &[
                "AT",
                "TIME",
                "STAGE",
                "CLASS",
                "SOURCE_TOPIC",
                "SOURCE_PARTITION",
                "SOURCE_OFFSET",
                "REDRIVES",
                "MESSAGE"
            ],
            &rows
        )
    );
    println!("{} dead letters", rows.len());
    Ok(())
}

/// The dead letter at `at`, with a clear error if there is none (or `at` is ambiguous).
fn find(
    all: &BTreeMap<(i32, i64), OwnedMessage>,
    dlq: &str,
    at: At,
) -> anyhow::Result<OwnedMessage> {
    let found: Vec<&OwnedMessage> = all
        .iter()
        .filter(|((p, o), _)| *o == at.offset && at.partition.is_none_or(|ap| ap == *p))
        .map(|(_, m)| m)
        .collect();
    match found.as_slice() {
        [m] => Ok((*m).clone()),
        [] => bail!(
            "no dead letter at {} in {dlq}",
            at.partition
                .map_or(at.offset.to_string(), |p| format!("{p}:{}", at.offset))
        ),
        _ => bail!(
            "offset {} exists in several partitions of {dlq}: write PARTITION:OFFSET",
            at.offset
        ),
    }
}

fn show(settings: &Settings, at: At) -> anyhow::Result<()> {
    let dlq = settings.topics().name(topics::DLQ);
    let all = read_dlq(settings)?;
    let m = find(&all, &dlq, at)?;
    let d = info(&m);
    println!("dead letter {}:{} of {dlq}", d.partition, d.offset);
    if let Some(t) = d.time_ms {
        println!("time: {}", ops_io::time(t));
    }
    println!("headers:");
    if let Some(h) = m.headers() {
        for h in h.iter() {
            println!(
                "  {}: {}",
                h.key,
                h.value.map(String::from_utf8_lossy).unwrap_or_default()
            );
        }
    }
    println!(
        "key: {}",
        m.key().map(String::from_utf8_lossy).unwrap_or_default()
    );
    let payload = m.payload().unwrap_or_default();
    let topics = settings.topics();
    let base = topics.base(&d.source_topic).unwrap_or(&d.source_topic);
    let header_type = m.headers().and_then(|h| {
        h.iter()
            .find(|h| h.key == EVENT_TYPE_HEADER)
            .and_then(|h| h.value)
            .and_then(|v| std::str::from_utf8(v).ok())
    });
    let decoded = Codec::new().decode(
        payload,
        DecodeHints {
            header_type,
            topic_default: topics::default_event_type(base),
            origin: None,
        },
    );
    match decoded {
        Ok(event) => println!("value ({} bytes), decoded:\n{event:#?}", payload.len()),
        Err(e) => {
            println!("value ({} bytes) does not decode: {e}", payload.len());
            match std::str::from_utf8(payload) {
                Ok(text) => println!("as text:\n{text}"),
                Err(_) => println!("hex:\n{}", hex(payload)),
            }
        }
    }
    Ok(())
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .chunks(32)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect::<String>())
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether a header of a dead letter is the runtime's own (not the original record's).
fn runtime_header(key: &str) -> bool {
    use dlq_headers::*;
    [
        SOURCE_TOPIC,
        SOURCE_PARTITION,
        SOURCE_OFFSET,
        STAGE,
        ERROR_CLASS,
        ERROR_MESSAGE,
        TRUNCATED,
        TARGET_TOPIC,
        REDRIVE_COUNT_HEADER,
    ]
    .contains(&key)
}

fn redrive(settings: &Settings, args: RedriveArgs) -> anyhow::Result<()> {
    if args.offset.is_empty() && args.filter.is_empty() && !args.all {
        bail!(
            "say which dead letters to redrive: --offset PARTITION:OFFSET[,…], a filter \
             (--stage, --error-class, --source-topic, --since, --until), or --all"
        );
    }
    let dlq = settings.topics().name(topics::DLQ);
    let all = read_dlq(settings)?;
    let selected: Vec<OwnedMessage> = if args.offset.is_empty() {
        let filter = args.filter.filter();
        let prefix = settings.topics().prefix().to_owned();
        all.values()
            .filter(|m| filter.matches(&info(m), &prefix))
            .cloned()
            .collect()
    } else {
        args.offset
            .iter()
            .map(|at| find(&all, &dlq, *at))
            .collect::<anyhow::Result<_>>()?
    };
    let edited: Option<Vec<u8>> = match &args.edit {
        None => None,
        Some(_) if selected.len() != 1 => bail!(
            "--edit replaces one dead letter's value; {} are selected (name one with --offset)",
            selected.len()
        ),
        Some(path) => {
            let mut text = String::new();
            if path == "-" {
                std::io::stdin()
                    .read_to_string(&mut text)
                    .context("reading the corrected value from standard input")?;
            } else {
                text = std::fs::read_to_string(path)
                    .with_context(|| format!("reading the corrected value from {path}"))?;
            }
            let v: serde_json::Value = serde_json::from_str(&text)
                .with_context(|| format!("--edit {path}: the corrected value is not JSON"))?;
            Some(serde_json::to_vec(&v)?)
        }
    };
    let mut rows = Vec::new();
    let mut sendable = Vec::new();
    let mut refused = Vec::new();
    for m in &selected {
        let d = info(m);
        let truncated = m
            .headers()
            .is_some_and(|h| h.iter().any(|h| h.key == dlq_headers::TRUNCATED));
        let refusal = ops::redrive_refusal(&d, args.max_redrives).or_else(|| {
            (truncated && edited.is_none()).then(|| {
                format!(
                    "dead letter {}:{} holds a value cut to fit the DLQ; redrive it with --edit",
                    d.partition, d.offset
                )
            })
        });
        rows.push(vec![
            format!("{}:{}", d.partition, d.offset),
            d.source_topic.clone(),
            d.source_partition
                .map_or("by key".into(), |p| p.to_string()),
            (d.redrives + 1).to_string(),
            match &refusal {
                Some(_) => "refused".into(),
                None if edited.is_some() => "redrive (edited value)".into(),
                None => "redrive".into(),
            },
        ]);
        match refusal {
            Some(why) => refused.push(why),
            None => sendable.push((m.clone(), d)),
        }
    }
    print!(
        "{}",
        ops::table(
            &["AT", "TO_TOPIC", "TO_PARTITION", "REDRIVE_COUNT", "ACTION"],
            &rows
        )
    );
    for why in &refused {
        eprintln!("refused: {why}");
    }
    if args.dry_run {
        println!(
            "dry run: {} would be redriven, {} refused; nothing sent",
            sendable.len(),
            refused.len()
        );
        return Ok(());
    }
    let mut c = settings.client_config();
    c.set("enable.idempotence", "true").set("acks", "all");
    let producer: FutureProducer = c.create().context("creating a Kafka producer")?;
    let mut progress = ops_io::Progress::new("redrive", "records", sendable.len() as u64);
    for (n, (m, d)) in sendable.iter().enumerate() {
        let count = (d.redrives + 1).to_string();
        let mut headers = OwnedHeaders::new();
        if let Some(h) = m.headers() {
            for h in h.iter().filter(|h| !runtime_header(h.key)) {
                headers = headers.insert(Header {
                    key: h.key,
                    value: h.value,
                });
            }
        }
        headers = headers.insert(Header {
            key: REDRIVE_COUNT_HEADER,
            value: Some(count.as_bytes()),
        });
        let value: &[u8] = edited
            .as_deref()
            .unwrap_or_else(|| m.payload().unwrap_or_default());
        let mut record = FutureRecord::to(&d.source_topic)
            .payload(value)
            .headers(headers);
        if let Some(k) = m.key() {
            record = record.key(k);
        }
        if let Some(p) = d.source_partition {
            record = record.partition(p);
        }
        let sent = futures::executor::block_on(producer.send(record, Duration::from_secs(30)));
        if let Err((e, _)) = sent {
            bail!(
                "redriving dead letter {}:{} to {} failed: {e}; {n} were redriven before it",
                d.partition,
                d.offset,
                d.source_topic
            );
        }
        progress.set(n as u64 + 1);
    }
    progress.finish();
    println!(
        "redrove {} dead letters, refused {}",
        sendable.len(),
        refused.len()
    );
    if !refused.is_empty() {
        bail!(
            "{} dead letters were refused (see above); the others were redriven",
            refused.len()
        );
    }
    Ok(())
}
