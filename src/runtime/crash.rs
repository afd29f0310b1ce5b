//! Crash points: places in the commit protocol where a test can make a worker die on
//! purpose, as abruptly as SIGKILL, to prove what a crash there leaves behind. The first
//! four are in the `at_least_once` commit, the `Txn*` ones in the `exactly_once`
//! transaction.
//!
//! Armed only by the environment variable `ORDERFLOW_CRASH_AT=<point>[:<n>]` (die the
//! `n`-th time the point is reached, default the first), which production never sets;
//! unset, a crash point costs one load of a `OnceLock`.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

pub const VAR: &str = "ORDERFLOW_CRASH_AT";

/// Where in a batch's commit a worker can be made to die.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Point {
    /// Part of the batch's changelog records are durable, the rest never will be.
    MidChangelog,
    /// The changelog batch (state, positions, outbox) is durable; no output is sent.
    AfterChangelog,
    /// The outputs are acknowledged; the input offsets are not committed.
    AfterOutputs,
    /// The input offsets are committed too.
    AfterOffsets,
    /// A sink's SQL transaction (rows and offsets) committed, nothing after it done.
    AfterSqlCommit,
    /// The transaction's outputs are at the broker; its changelog records and offsets
    /// were never sent, and it is never committed.
    TxnOutputsSent,
    /// Every record of the transaction and its offsets are at the broker; it is never
    /// committed.
    TxnBeforeCommit,
    /// The transaction is committed.
    TxnAfterCommit,
}

impl Point {
    const ALL: [Point; 8] = [
        Point::MidChangelog,
        Point::AfterChangelog,
        Point::AfterOutputs,
        Point::AfterOffsets,
        Point::AfterSqlCommit,
        Point::TxnOutputsSent,
        Point::TxnBeforeCommit,
        Point::TxnAfterCommit,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Point::MidChangelog => "mid_changelog",
            Point::AfterChangelog => "after_changelog",
            Point::AfterOutputs => "after_outputs",
            Point::AfterOffsets => "after_offsets",
            Point::AfterSqlCommit => "after_sql_commit",
            Point::TxnOutputsSent => "txn_outputs_sent",
            Point::TxnBeforeCommit => "txn_before_commit",
            Point::TxnAfterCommit => "txn_after_commit",
        }
    }
}

struct Armed {
    point: Point,
    at: u64,
    reached: AtomicU64,
}

fn armed() -> Option<&'static Armed> {
    static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
    ARMED
        .get_or_init(|| {
            let spec = std::env::var(VAR).ok()?;
            let (name, at) = match spec.split_once(':') {
                Some((n, at)) => (n, at.parse().unwrap_or(1)),
                None => (spec.as_str(), 1),
            };
            let Some(point) = Point::ALL.into_iter().find(|p| p.name() == name) else {
                tracing::error!(spec, "unknown crash point; ignored");
                return None;
            };
            tracing::warn!(point = point.name(), at, "crash point armed");
            Some(Armed {
                point,
                at,
                reached: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Whether `point` is armed (a caller may then arrange the state the point describes).
pub fn is_armed(point: Point) -> bool {
    armed().is_some_and(|a| a.point == point)
}

/// Dies here if this is the armed point's `n`-th arrival.
pub fn reached(point: Point) {
    if let Some(a) = armed()
        && a.point == point
        && a.reached.fetch_add(1, Ordering::SeqCst) + 1 == a.at
    {
        eprintln!("crash point {} reached: aborting", point.name());
        std::process::abort();
    }
}

/// Fault injection for the consumer's seek: `ORDERFLOW_FAIL_SEEKS=<n>` makes the first `n`
/// seeks of the process fail (never set in production).
pub fn fail_seek() -> bool {
    static LEFT: OnceLock<AtomicU64> = OnceLock::new();
    let left = LEFT.get_or_init(|| {
        AtomicU64::new(
            std::env::var("ORDERFLOW_FAIL_SEEKS")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0),
        )
    });
    left.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

/// Fault injection for the `at_least_once` changelog write:
/// `ORDERFLOW_FAIL_CHANGELOG_WRITE=<n>` cuts the process's `n`-th write of two or more
/// changelog records: the first half reaches the log, then the write fails as a timed-out
/// produce would — the worker lives on (never set in production). Returns whether this
/// write of `records` records is the one to cut.
pub fn fail_changelog_write(records: usize) -> bool {
    static AT: OnceLock<Option<(u64, AtomicU64)>> = OnceLock::new();
    let at = AT.get_or_init(|| {
        let n = std::env::var("ORDERFLOW_FAIL_CHANGELOG_WRITE")
            .ok()?
            .parse()
            .ok()?;
        tracing::warn!(n, "changelog write failure armed");
        Some((n, AtomicU64::new(0)))
    });
    match at {
        Some((n, count)) if records >= 2 => count.fetch_add(1, Ordering::SeqCst) + 1 == *n,
        _ => false,
    }
}

/// Stall injection: `ORDERFLOW_STALL_BEFORE_COMMIT=<n>:<ms>` makes the worker sleep `ms`
/// before its `n`-th commit — a batch blocked past `max.poll.interval.ms`, after which the
/// group has moved on without it (never set in production).
pub fn stall_before_commit() {
    static STALL: OnceLock<Option<(u64, u64, AtomicU64)>> = OnceLock::new();
    let stall = STALL.get_or_init(|| {
        let spec = std::env::var("ORDERFLOW_STALL_BEFORE_COMMIT").ok()?;
        let (n, ms) = spec.split_once(':')?;
        Some((n.parse().ok()?, ms.parse().ok()?, AtomicU64::new(0)))
    });
    if let Some((n, ms, count)) = stall
        && count.fetch_add(1, Ordering::SeqCst) + 1 == *n
    {
        tracing::warn!(ms, "stall injected before this commit");
        std::thread::sleep(std::time::Duration::from_millis(*ms));
    }
}
