//! The `orderflow_consumer_lag` gauge: per input partition a worker owns, how many
//! records lie between where its durable state continues (a stage's position, a sink's
//! offset in SQL) and the partition's end.
//!
//! The loop hands over its positions (a small map, when they change); a thread of the
//! worker's own asks the broker for the partitions' ends every few seconds, so a slow
//! broker never holds up the loop. Partitions the worker no longer owns are removed from
//! the gauge, so that lag is reported once per partition across the group.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;
use crate::metrics::Metrics;

const EVERY: Duration = Duration::from_secs(5);
/// How often the loop hands its positions over: the gauge is read every [`EVERY`], so
/// the loop need not build the map on every cycle.
const HAND_OVER_EVERY: Duration = Duration::from_secs(1);

/// Input topic-partition → where the state continues.
type Positions = BTreeMap<(String, i32), i64>;

pub(super) struct LagExporter {
    positions: Arc<Mutex<Positions>>,
    /// What was handed over last.
    last: Positions,
    /// When it was.
    handed_at: Option<Instant>,
}

impl LagExporter {
    pub(super) fn start(
        settings: &Settings,
        stage: &'static str,
        metrics: Metrics,
        shutdown: CancellationToken,
    ) -> LagExporter {
        let positions: Arc<Mutex<Positions>> = Arc::default();
        let shared = positions.clone();
        let mut c = settings.client_config();
        c.set("group.id", settings.group_id("lag"))
            .set("enable.auto.commit", "false");
        match c.create::<BaseConsumer>() {
            Ok(consumer) => {
                let spawned = std::thread::Builder::new()
                    .name(format!("lag-{stage}"))
                    .spawn(move || export(consumer, stage, metrics, shared, shutdown));
                if let Err(e) = spawned {
                    tracing::warn!(error = %e, "cannot start the lag exporter; no lag metric");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot start the lag exporter; no lag metric"),
        }
        LagExporter {
            positions,
            last: Positions::new(),
            handed_at: None,
        }
    }

    /// Whether the loop, which owns `owned` input partitions, should hand its positions
    /// over now: at once while some owned partition has none yet (it is being restored),
    /// else at most once a second.
    pub(super) fn due(&self, owned: usize) -> bool {
        self.last.len() != owned
            || self
                .handed_at
                .is_none_or(|at| at.elapsed() >= HAND_OVER_EVERY)
    }

    /// Hands over the loop's current positions (a small map, at most once a second; the lock
    /// is taken only when they changed).
    pub(super) fn set(&mut self, positions: Positions) {
        self.handed_at = Some(Instant::now());
        if positions != self.last {
            *self.positions.lock().expect("lag positions poisoned") = positions.clone();
            self.last = positions;
        }
    }
}

fn export(
    consumer: BaseConsumer,
    stage: &'static str,
    metrics: Metrics,
    positions: Arc<Mutex<Positions>>,
    shutdown: CancellationToken,
) {
    let mut shown: Vec<(String, i32)> = Vec::new();
    while !shutdown.is_cancelled() {
        let now: Positions = positions.lock().expect("lag positions poisoned").clone();
        for tp in &shown {
            if !now.contains_key(tp) {
                let _ =
                    metrics
                        .consumer_lag
                        .remove_label_values(&[stage, &tp.0, &tp.1.to_string()]);
            }
        }
        shown.clear();
        for ((topic, p), at) in &now {
            match consumer.fetch_watermarks(topic, *p, Duration::from_secs(5)) {
                Ok((low, high)) => {
                    metrics
                        .consumer_lag
                        .with_label_values(&[stage, topic, &p.to_string()])
                        .set(crate::ops::lag(Some(*at), low, high));
                    shown.push((topic.clone(), *p));
                }
                Err(e) => tracing::debug!(topic, partition = p, error = %e, "lag: no watermarks"),
            }
        }
        let until = Instant::now() + EVERY;
        while Instant::now() < until && !shutdown.is_cancelled() {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}
