//! What `orderflow replay`, `dlq` and `lag` share: a stage's or sink's inputs and
//! consumer group, who is in the group, where each input partition continues (for a
//! stage: the state's own positions, read from its changelog; for a sink: its offsets
//! in SQL), and a progress display.
//!
//! Invariant: "where a partition continues" is what the workers themselves would
//! position the input at — the state's position, else the group's committed offset,
//! else the partition's start — never the group's offset alone when the state says
//! otherwise.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use super::run::Role;
use crate::config::{Guarantee, Settings};
use crate::runtime::changelog::{GEN_HEADER, Restorer, SEQ_HEADER};
use crate::sql::Db;
use crate::stages::{Stage, StageName};

const TIMEOUT: Duration = Duration::from_secs(10);

/// Prefix-free input topics of a stage or sink.
pub(super) fn inputs(role: Role, settings: &Settings) -> &'static [&'static str] {
    use crate::stages::{
        delivery::DeliveryStage, fraud::FraudStage, fulfillment::FulfillmentStage,
        inventory::InventoryStage, payment::PaymentStage,
    };
    match role {
        Role::Sink(sink) => sink.topics(),
        Role::Stage(StageName::Fraud) => FraudStage::new(settings.fraud.clone()).inputs(),
        Role::Stage(StageName::Inventory) => {
            InventoryStage::new(settings.inventory.clone()).inputs()
        }
        Role::Stage(StageName::Payment) => PaymentStage::new(settings.payment.clone()).inputs(),
        Role::Stage(StageName::Fulfillment) => {
            FulfillmentStage::new(settings.fulfillment.clone()).inputs()
        }
        Role::Stage(StageName::Delivery) => DeliveryStage::new().inputs(),
    }
}

/// A consumer for looking only (no group membership).
pub(super) fn looker(settings: &Settings) -> anyhow::Result<BaseConsumer> {
    let mut c = settings.client_config();
    c.set("group.id", settings.group_id("ops"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", "read_committed");
    c.create().context("creating a Kafka consumer")
}

/// The live members of `group` (their client IDs).
pub(super) fn live_members(settings: &Settings, group: &str) -> anyhow::Result<Vec<String>> {
    let c = looker(settings)?;
    let list = c
        .fetch_group_list(Some(group), TIMEOUT)
        .with_context(|| format!("describing consumer group {group}"))?;
    Ok(list
        .groups()
        .iter()
        .filter(|g| g.name() == group)
        .flat_map(|g| {
            g.members().iter().map(|m| {
                if m.client_id().is_empty() {
                    m.id().to_owned()
                } else {
                    m.client_id().to_owned()
                }
            })
        })
        .collect())
}

/// Every partition of the named topics with its low and high watermarks.
pub(super) fn watermarks(
    settings: &Settings,
    topics: &[String],
) -> anyhow::Result<BTreeMap<(String, i32), (i64, i64)>> {
    let c = looker(settings)?;
    let mut out = BTreeMap::new();
    for (topic, n) in crate::admin::partition_counts(settings, topics)? {
        if n == 0 {
            bail!(
                "topic {topic} does not exist; create the topics first (orderflow topics create)"
            );
        }
        for p in 0..n {
            let w = c
                .fetch_watermarks(&topic, p, TIMEOUT)
                .with_context(|| format!("offsets of {topic}[{p}]"))?;
            out.insert((topic.clone(), p), w);
        }
    }
    Ok(out)
}

/// The group's committed offsets (with their metadata) of `tps`.
pub(super) fn committed(
    settings: &Settings,
    group: &str,
    tps: &[(String, i32)],
) -> anyhow::Result<BTreeMap<(String, i32), (i64, String)>> {
    let mut c = settings.client_config();
    c.set("group.id", group).set("enable.auto.commit", "false");
    let consumer: BaseConsumer = c.create().context("creating a Kafka consumer")?;
    let mut tpl = TopicPartitionList::new();
    for (t, p) in tps {
        tpl.add_partition(t, *p);
    }
    let got = consumer
        .committed_offsets(tpl, TIMEOUT)
        .with_context(|| format!("reading the committed offsets of group {group}"))?;
    Ok(got
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((
                (e.topic().to_owned(), e.partition()),
                (o, e.metadata().to_owned()),
            )),
            _ => None,
        })
        .collect())
}

/// Per input partition (`tps`, prefixed names) of stage `stage`: the offset of the first
/// input its state does not reflect, from the `p/` records of its changelog, read as a
/// restore reads them (committed batches of the current writer only). Partitions
/// without a position are left out.
pub(super) fn stage_positions(
    settings: &Settings,
    stage: StageName,
    tps: &[(String, i32)],
) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
    let topics = settings.topics();
    let changelog = topics.changelog(stage.as_str());
    let mut partitions: Vec<i32> = tps.iter().map(|(_, p)| *p).collect();
    partitions.sort_unstable();
    partitions.dedup();
    let c = looker(settings)?;
    let mut restorers: BTreeMap<i32, (Restorer, i64)> = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for &p in &partitions {
        let (low, high) = c
            .fetch_watermarks(&changelog, p, TIMEOUT)
            .with_context(|| format!("offsets of changelog {changelog}[{p}]"))?;
        if high <= low {
            continue;
        }
        let r = match settings.guarantee {
            Guarantee::ExactlyOnce => Restorer::default().transactional(),
            Guarantee::AtLeastOnce => Restorer::default(),
        };
        restorers.insert(p, (r, high - 1));
        tpl.add_partition_offset(&changelog, p, Offset::Beginning)?;
    }
    let mut reading: BTreeMap<i32, i64> = restorers.iter().map(|(p, (_, l))| (*p, *l)).collect();
    if !reading.is_empty() {
        c.assign(&tpl)?;
    }
    let mut last_progress = Instant::now();
    while !reading.is_empty() {
        match c.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                last_progress = Instant::now();
                let p = m.partition();
                let Some(&last) = reading.get(&p) else {
                    continue;
                };
                let header = |name: &str| -> Option<u64> {
                    let h = m.headers()?;
                    let v = h.iter().find(|h| h.key == name)?.value?;
                    std::str::from_utf8(v).ok()?.parse().ok()
                };
                let key = String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned();
                if m.offset() <= last
                    && let Some((r, _)) = restorers.get_mut(&p)
                {
                    r.push(
                        m.offset(),
                        &key,
                        m.payload(),
                        header(SEQ_HEADER),
                        header(GEN_HEADER),
                    )
                    .with_context(|| format!("reading changelog {changelog}[{p}]"))?;
                }
                if m.offset() >= last {
                    reading.remove(&p);
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                reading.remove(&p);
            }
            Some(Err(e)) => return Err(e).context("reading the changelog"),
            None if last_progress.elapsed() > Duration::from_secs(30) => {
                bail!("reading changelog {changelog} made no progress for 30 s")
            }
            None => {}
        }
    }
    let mut out = BTreeMap::new();
    for (p, (r, _)) in restorers {
        let ps = r
            .finish::<serde_json::Value>(p, 0, 1, 16)
            .with_context(|| format!("reading changelog {changelog}[{p}]"))?;
        for (t, tp) in tps {
            if *tp != p {
                continue;
            }
            let base = topics.base(t).unwrap_or(t);
            if let Some(o) = ps.positions.peek(base) {
                out.insert((t.clone(), p), *o);
            }
        }
    }
    Ok(out)
}

/// Where each of `tps` continues for `role`, and what that offset is: the state's
/// position (stages), the offset in SQL (sinks), else the group's committed offset.
pub(super) async fn continues_at(
    settings: &Settings,
    role: Role,
    tps: &[(String, i32)],
) -> anyhow::Result<BTreeMap<(String, i32), (i64, &'static str)>> {
    let group = settings.group_id(role.as_str());
    let mut out: BTreeMap<(String, i32), (i64, &'static str)> = BTreeMap::new();
    let owned: Vec<(String, i32)> = tps.to_vec();
    let s = settings.clone();
    let g = group.clone();
    let committed = tokio::task::spawn_blocking(move || committed(&s, &g, &owned)).await??;
    for (tp, (o, _)) in &committed {
        out.insert(tp.clone(), (*o, "group"));
    }
    match role {
        Role::Stage(stage) => {
            let s = settings.clone();
            let owned: Vec<(String, i32)> = tps.to_vec();
            let positions =
                tokio::task::spawn_blocking(move || stage_positions(&s, stage, &owned)).await??;
            for (tp, o) in positions {
                out.insert(tp, (o, "state"));
            }
        }
        Role::Sink(sink) => {
            let db = Db::connect(&settings.database_url)
                .await
                .with_context(|| format!("connecting to {}", settings.database_url))?;
            db.migrate().await?;
            for o in db.offsets(sink).await? {
                let tp = (o.topic, o.partition);
                // None (never committed, or reset): the sink falls back to the group's
                // offset, as the workers do.
                if let Some(n) = o.next_offset {
                    out.insert(tp, (n, "sql"));
                }
            }
            db.close().await;
        }
    }
    Ok(out)
}

/// A progress bar on a terminal, a line every few seconds otherwise.
pub(super) struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    total: u64,
    last_line: Instant,
}

impl Progress {
    pub(super) fn new(what: &str, unit: &str, total: u64) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            if let Ok(style) = ProgressStyle::with_template(&format!(
                "{{msg}} [{{bar:40}}] {{pos}}/{{len}} {unit} ({{percent}}%) {{elapsed}}"
            )) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_owned());
            bar
        });
        Progress {
            bar,
            what: what.to_owned(),
            total,
            last_line: Instant::now() - Duration::from_secs(60),
        }
    }

    pub(super) fn set(&mut self, done: u64) {
        match &self.bar {
            Some(bar) => bar.set_position(done),
            None if self.last_line.elapsed() >= Duration::from_secs(2) || done == self.total => {
                self.last_line = Instant::now();
                eprintln!(
                    "{}: {done}/{} ({}%)",
                    self.what,
                    self.total,
                    (done * 100).checked_div(self.total).unwrap_or(100)
                );
            }
            None => {}
        }
    }

    pub(super) fn finish(&mut self) {
        match &self.bar {
            Some(bar) => bar.finish(),
            None => {
                self.last_line = Instant::now() - Duration::from_secs(60);
                self.set(self.total);
            }
        }
    }
}

/// RFC 3339 (UTC, milliseconds) of epoch milliseconds.
pub(super) fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}
