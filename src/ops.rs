//! The operators' verbs, their pure half: replay plans (where each input partition of a
//! stage or sink goes, for each strategy of `kafka-consumer-groups --reset-offsets`),
//! dead-letter filters and redrive rules,
//! and lag. The `orderflow replay`, `dlq` and `lag` commands (in `cli/`) do the I/O.
//!
//! Invariant: a plan never targets an offset outside what the partition retains
//! (`low..=high`).

use std::collections::BTreeMap;
use std::time::Duration;

/// Header counting how often a dead letter was sent back to its source topic.
pub const REDRIVE_COUNT_HEADER: &str = "orderflow.redrive.count";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum OpsError {
    #[error("invalid {what} {value:?}: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: String,
    },
}

fn invalid(what: &'static str, value: &str, why: impl Into<String>) -> OpsError {
    OpsError::Invalid {
        what,
        value: value.to_owned(),
        why: why.into(),
    }
}

/// Where a replay moves each partition, as `kafka-consumer-groups --reset-offsets` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    Earliest,
    Latest,
    Offset(i64),
    ShiftBy(i64),
    /// The first record at or after this time (epoch milliseconds).
    Datetime(i64),
    /// The first record at or after `now - duration`.
    Duration(Duration),
}

impl Strategy {
    /// Whether the target depends on record times (the caller looks up offsets by time).
    pub fn by_time(&self, now_ms: i64) -> Option<i64> {
        match self {
            Strategy::Datetime(t) => Some(*t),
            Strategy::Duration(d) => Some(now_ms - d.as_millis() as i64),
            _ => None,
        }
    }

    /// The offset partition `low..high` goes to from `current` (where it continues now;
    /// `None`: nothing processed yet, so the start). `by_time` is the offset of the first
    /// record at or after the strategy's time (`None`: no such record, so the end).
    /// Clamped to what the partition retains.
    pub fn target(&self, current: Option<i64>, low: i64, high: i64, by_time: Option<i64>) -> i64 {
        let t = match self {
            Strategy::Earliest => low,
            Strategy::Latest => high,
            Strategy::Offset(o) => *o,
            Strategy::ShiftBy(n) => current.unwrap_or(low).saturating_add(*n),
            Strategy::Datetime(_) | Strategy::Duration(_) => by_time.unwrap_or(high),
        };
        t.clamp(low, high.max(low))
    }
}

/// `30m`, `2h`, `45s`, `1d`, `1h30m`: a duration as `--by-duration` takes it.
pub fn parse_duration(s: &str) -> Result<Duration, OpsError> {
    let bad = |why: &str| invalid("duration", s, why);
    if s.is_empty() {
        return Err(bad("empty; write e.g. 30m, 2h, 1d, 1h30m"));
    }
    let mut total: u64 = 0;
    let mut digits = String::new();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3_600,
            'd' => 86_400,
            _ => return Err(bad("units are s, m, h, d (e.g. 30m, 1h30m)")),
        };
        let n: u64 = digits
            .parse()
            .map_err(|_| bad("a number must precede each unit"))?;
        digits.clear();
        total = total.saturating_add(n.saturating_mul(unit));
    }
    if !digits.is_empty() {
        return Err(bad("the last number has no unit (s, m, h, d)"));
    }
    Ok(Duration::from_secs(total))
}

/// `--shift-by` takes `-100`, `+100` or `100`.
pub fn parse_shift(s: &str) -> Result<i64, OpsError> {
    s.trim_start_matches('+')
        .parse()
        .map_err(|_| invalid("shift", s, "a whole number of records, e.g. -100 or +50"))
}

/// RFC 3339 time to epoch milliseconds.
pub fn parse_datetime(s: &str) -> Result<i64, OpsError> {
    chrono::DateTime::parse_from_rfc3339(s)
        .map(|t| t.timestamp_millis())
        .map_err(|e| {
            invalid(
                "datetime",
                s,
                format!("{e}; write e.g. 2026-11-30T12:00:00Z"),
            )
        })
}

/// `--topic t` or `--topic t:0,2`: a topic and optionally some of its partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub topic: String,
    /// Empty: every partition.
    pub partitions: Vec<i32>,
}

impl std::str::FromStr for TopicSpec {
    type Err = OpsError;
    fn from_str(s: &str) -> Result<Self, OpsError> {
        let (topic, parts) = match s.split_once(':') {
            Some((t, p)) => (t, Some(p)),
            None => (s, None),
        };
        if topic.is_empty() {
            return Err(invalid("topic", s, "no topic name before ':'"));
        }
        let partitions = match parts {
            None => Vec::new(),
            Some(p) => p
                .split(',')
                .map(|n| {
                    n.trim()
                        .parse::<i32>()
                        .ok()
                        .filter(|n| *n >= 0)
                        .ok_or_else(|| {
                            invalid("topic", s, format!("partition {n:?} is not a number ≥ 0"))
                        })
                })
                .collect::<Result<_, _>>()?,
        };
        Ok(TopicSpec {
            topic: topic.to_owned(),
            partitions,
        })
    }
}

/// One input partition of a replay plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRow {
    pub topic: String,
    pub partition: i32,
    /// Where the partition continues now (`None`: nothing processed yet).
    pub current: Option<i64>,
    pub target: i64,
    pub low: i64,
    pub high: i64,
}

impl PlanRow {
    /// Records that will be read again (negative: skipped without processing).
    pub fn to_reprocess(&self) -> i64 {
        self.current.unwrap_or(self.low) - self.target
    }
}

/// A table of plain columns, left-aligned, for a terminal or a file.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if i < widths.len() {
                widths[i] = widths[i].max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                s.push_str(c);
            } else {
                s.push_str(&format!("{c:<w$}  ", w = widths[i]));
            }
        }
        s.trim_end().to_owned() + "\n"
    };
    let mut out = line(header.to_vec());
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// What a dead letter says about itself, from its headers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeadLetterInfo {
    pub offset: i64,
    pub partition: i32,
    /// Record timestamp, epoch milliseconds.
    pub time_ms: Option<i64>,
    pub stage: String,
    pub class: String,
    pub source_topic: String,
    pub source_partition: Option<i32>,
    pub source_offset: Option<i64>,
    pub message: String,
    pub redrives: u32,
}

impl DeadLetterInfo {
    /// Reads the dead-letter headers (`crate::runtime::dlq_headers`) from `headers`.
    pub fn from_headers<'a>(
        partition: i32,
        offset: i64,
        time_ms: Option<i64>,
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> DeadLetterInfo {
        use crate::runtime::dlq_headers as h;
        let mut d = DeadLetterInfo {
            offset,
            partition,
            time_ms,
            ..DeadLetterInfo::default()
        };
        // The runtime's headers come first; an original record's copied after them
        // cannot override them.
        let mut seen = std::collections::HashSet::new();
        for (k, v) in headers {
            if !seen.insert(k) {
                continue;
            }
            let v = v.map(String::from_utf8_lossy).unwrap_or_default();
            match k {
                h::STAGE => d.stage = v.into_owned(),
                h::ERROR_CLASS => d.class = v.into_owned(),
                h::SOURCE_TOPIC => d.source_topic = v.into_owned(),
                h::SOURCE_PARTITION => d.source_partition = v.parse().ok(),
                h::SOURCE_OFFSET => d.source_offset = v.parse().ok(),
                h::ERROR_MESSAGE => d.message = v.into_owned(),
                REDRIVE_COUNT_HEADER => d.redrives = v.parse().unwrap_or(0),
                _ => {}
            }
        }
        d
    }
}

/// Which dead letters `dlq list` and `dlq redrive` select.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DlqFilter {
    pub stage: Option<String>,
    pub error_class: Option<String>,
    /// The source topic, with or without the deployment's prefix.
    pub source_topic: Option<String>,
    /// Epoch milliseconds, inclusive.
    pub since_ms: Option<i64>,
    /// Epoch milliseconds, exclusive.
    pub until_ms: Option<i64>,
}

impl DlqFilter {
    /// Whether `d` is selected; `prefix` is the deployment's topic prefix.
    pub fn matches(&self, d: &DeadLetterInfo, prefix: &str) -> bool {
        let topic_ok = self
            .source_topic
            .as_deref()
            .is_none_or(|t| d.source_topic == t || d.source_topic.strip_prefix(prefix) == Some(t));
        let time = d.time_ms.unwrap_or(0);
        self.stage.as_deref().is_none_or(|s| d.stage == s)
            && self.error_class.as_deref().is_none_or(|c| d.class == c)
            && topic_ok
            && self.since_ms.is_none_or(|s| time >= s)
            && self.until_ms.is_none_or(|u| time < u)
    }
}

/// Why a dead letter cannot be redriven, if it cannot.
pub fn redrive_refusal(d: &DeadLetterInfo, max_redrives: u32) -> Option<String> {
    if d.source_topic.is_empty() {
        return Some(format!(
            "dead letter at offset {} names no source topic (header {})",
            d.offset,
            crate::runtime::dlq_headers::SOURCE_TOPIC
        ));
    }
    if d.redrives >= max_redrives {
        return Some(format!(
            "dead letter at offset {} was redriven {} times already (--max-redrives {max_redrives}); fix it at the source, or raise --max-redrives",
            d.offset, d.redrives
        ));
    }
    None
}

/// One partition's lag: `committed` is where the consumer continues (`None`: nothing
/// processed, so the partition's start).
pub fn lag(committed: Option<i64>, low: i64, high: i64) -> i64 {
    (high - committed.unwrap_or(low).max(low)).max(0)
}

/// Groups `(topic, partition)` keys by topic, for display.
pub fn by_topic<V: Clone>(m: &BTreeMap<(String, i32), V>) -> BTreeMap<String, Vec<(i32, V)>> {
    let mut out: BTreeMap<String, Vec<(i32, V)>> = BTreeMap::new();
    for ((t, p), v) in m {
        out.entry(t.clone()).or_default().push((*p, v.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_target_within_the_retained_range() {
        let (low, high) = (10, 100);
        let cur = Some(60);
        assert_eq!(Strategy::Earliest.target(cur, low, high, None), 10);
        assert_eq!(Strategy::Latest.target(cur, low, high, None), 100);
        assert_eq!(Strategy::Offset(42).target(cur, low, high, None), 42);
        assert_eq!(Strategy::Offset(5).target(cur, low, high, None), 10);
        assert_eq!(Strategy::Offset(500).target(cur, low, high, None), 100);
        assert_eq!(Strategy::ShiftBy(-20).target(cur, low, high, None), 40);
        assert_eq!(Strategy::ShiftBy(-200).target(cur, low, high, None), 10);
        assert_eq!(Strategy::ShiftBy(15).target(cur, low, high, None), 75);
        assert_eq!(Strategy::ShiftBy(5).target(None, low, high, None), 15);
        assert_eq!(Strategy::Datetime(0).target(cur, low, high, Some(33)), 33);
        // No record at or after the time: the end.
        assert_eq!(Strategy::Datetime(0).target(cur, low, high, None), 100);
        let d = Strategy::Duration(Duration::from_secs(60));
        assert_eq!(d.by_time(100_000), Some(40_000));
        assert_eq!(Strategy::Earliest.by_time(1), None);
        // An empty partition.
        assert_eq!(Strategy::Latest.target(None, 7, 7, None), 7);
    }

    #[test]
    fn plan_rows_count_records_to_reprocess() {
        let row = |current, target| PlanRow {
            topic: "t".into(),
            partition: 0,
            current,
            target,
            low: 0,
            high: 50,
        };
        assert_eq!(row(Some(50), 0).to_reprocess(), 50);
        assert_eq!(row(Some(10), 30).to_reprocess(), -20);
        assert_eq!(row(None, 0).to_reprocess(), 0);
    }

    #[test]
    fn durations_shifts_and_datetimes_parse() -> Result<(), OpsError> {
        assert_eq!(parse_duration("30m")?, Duration::from_secs(1_800));
        assert_eq!(parse_duration("1h30m")?, Duration::from_secs(5_400));
        assert_eq!(parse_duration("2d")?, Duration::from_secs(172_800));
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("m").is_err());
        assert!(parse_duration("3w").is_err());
        assert_eq!(parse_shift("-100")?, -100);
        assert_eq!(parse_shift("+7")?, 7);
        assert!(parse_shift("x").is_err());
        assert_eq!(parse_datetime("1970-01-01T00:00:01Z")?, 1_000);
        assert!(parse_datetime("yesterday").is_err());
        Ok(())
    }

    #[test]
    fn topic_specs_parse() -> Result<(), OpsError> {
        let t: TopicSpec = "order.created".parse()?;
        assert_eq!(t.partitions, Vec::<i32>::new());
        let t: TopicSpec = "order.created:0,2".parse()?;
        assert_eq!(
            (t.topic.as_str(), t.partitions),
            ("order.created", vec![0, 2])
        );
        assert!("order.created:a".parse::<TopicSpec>().is_err());
        assert!(":1".parse::<TopicSpec>().is_err());
        Ok(())
    }

    fn letter() -> DeadLetterInfo {
        DeadLetterInfo::from_headers(
            0,
            7,
            Some(5_000),
            [
                ("orderflow.stage", Some(&b"fraud"[..])),
                ("orderflow.error.class", Some(&b"schema"[..])),
                ("orderflow.source.topic", Some(&b"p.order.created"[..])),
                ("orderflow.source.partition", Some(&b"2"[..])),
                ("orderflow.source.offset", Some(&b"11"[..])),
                ("orderflow.error.message", Some(&b"missing field"[..])),
                (REDRIVE_COUNT_HEADER, Some(&b"2"[..])),
            ],
        )
    }

    #[test]
    fn dead_letter_headers_are_read() {
        let d = letter();
        assert_eq!(d.stage, "fraud");
        assert_eq!(d.class, "schema");
        assert_eq!(d.source_partition, Some(2));
        assert_eq!(d.source_offset, Some(11));
        assert_eq!(d.redrives, 2);
    }

    #[test]
    fn filters_select_by_every_field() {
        let d = letter();
        let all = DlqFilter::default();
        assert!(all.matches(&d, "p."));
        let f = |f: DlqFilter| f.matches(&d, "p.");
        assert!(f(DlqFilter {
            stage: Some("fraud".into()),
            ..all.clone()
        }));
        assert!(!f(DlqFilter {
            stage: Some("payment".into()),
            ..all.clone()
        }));
        assert!(f(DlqFilter {
            error_class: Some("schema".into()),
            ..all.clone()
        }));
        assert!(!f(DlqFilter {
            error_class: Some("decode".into()),
            ..all.clone()
        }));
        assert!(f(DlqFilter {
            source_topic: Some("order.created".into()),
            ..all.clone()
        }));
        assert!(f(DlqFilter {
            source_topic: Some("p.order.created".into()),
            ..all.clone()
        }));
        assert!(!f(DlqFilter {
            source_topic: Some("order.screened".into()),
            ..all.clone()
        }));
        assert!(f(DlqFilter {
            since_ms: Some(5_000),
            ..all.clone()
        }));
        assert!(!f(DlqFilter {
            since_ms: Some(5_001),
            ..all.clone()
        }));
        assert!(!f(DlqFilter {
            until_ms: Some(5_000),
            ..all.clone()
        }));
        assert!(f(DlqFilter {
            until_ms: Some(5_001),
            ..all.clone()
        }));
    }

    #[test]
    fn redrives_beyond_the_maximum_are_refused() {
        let mut d = letter();
        assert_eq!(redrive_refusal(&d, 3), None);
        d.redrives = 3;
        assert!(redrive_refusal(&d, 3).is_some_and(|m| m.contains("3 times")));
        d.redrives = 0;
        d.source_topic.clear();
        assert!(redrive_refusal(&d, 3).is_some());
    }

    #[test]
    fn lag_counts_from_the_committed_offset() {
        assert_eq!(lag(Some(40), 0, 100), 60);
        assert_eq!(lag(None, 10, 100), 90);
        assert_eq!(lag(Some(5), 10, 100), 90);
        assert_eq!(lag(Some(100), 0, 100), 0);
    }

    #[test]
    fn tables_align_columns() {
        let t = table(&["a", "bb"], &[vec!["xxx".into(), "1".into()]]);
        assert_eq!(t, "a    bb\nxxx  1\n");
    }
}
