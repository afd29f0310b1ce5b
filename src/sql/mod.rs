//! The SQL sinks' database half: a pool on PostgreSQL (production) or SQLite (embedded),
//! the migrations in `migrations/`, fenced commits of [`RowOp`]s together with the
//! offsets they consumed, the operator's alert actions, and the read queries.
//!
//! Invariants:
//!
//! - **Effects and offsets commit together.** [`Db::commit`] advances every consumed
//!   partition's offset and applies the batch's operations in one transaction, or
//!   nothing at all.
//! - **A stale holder changes nothing.** [`Db::claim`] bumps a partition's epoch; a commit
//!   updates each offset only `WHERE epoch = <its own>`, first thing in its transaction,
//!   so a holder fenced by a newer claim gets [`SqlError::Fenced`] and its transaction is
//!   rolled back. (On PostgreSQL that first update also locks the offset row, which
//!   serializes a commit with a concurrent claim.)
//! - **One event ID, one effect.** A record whose key was applied before (the projector:
//!   its `order_events` row; the other sinks: `sink_applied_events`) is skipped whole.
//!
//! Both backends run the same SQL text, with `$n` placeholders (which SQLite accepts too)
//! and only portable syntax (`ON CONFLICT … DO UPDATE`, `RETURNING`, partial indexes). SQL
//! strings are built from fixed fragments and enum column names only; every value is a
//! bound parameter.

pub mod api;
mod apply;
pub mod dashboard;
pub mod read;

use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use sqlx::{AssertSqlSafe, Postgres, Row as _, Sqlite, Transaction};

use crate::events::{Event, EventType};
use crate::views::{Effects, RowOp, Sink};

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("migrations/sqlite");

/// What the caller should do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Transient (connection lost, pool exhausted, lock conflict): retry with backoff.
    Retry,
    /// Another holder claimed the partition: stop processing it, commit nothing more.
    Fenced,
    /// Retrying cannot help: a bad URL, a schema problem, a corrupt row.
    Permanent,
}

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    #[error(
        "unsupported database URL {url:?}: ORDERFLOW_DATABASE_URL (settings key `database_url`) must start with postgres:// or sqlite:"
    )]
    UnsupportedUrl { url: String },
    #[error("cannot open the database {url}: {source}")]
    Connect {
        url: String,
        source: Box<sqlx::Error>,
    },
    #[error("applying the migrations failed: {0}")]
    Migrate(Box<sqlx::migrate::MigrateError>),
    #[error("database error: {0}")]
    Database(Box<sqlx::Error>),
    #[error(
        "sink {sink} no longer holds {topic}[{partition}] (epoch {epoch} was superseded by a newer claim); the batch was rolled back"
    )]
    Fenced {
        sink: Sink,
        topic: String,
        partition: i32,
        epoch: i64,
    },
    #[error("store {store_id} has no alert {id}")]
    UnknownAlert { store_id: String, id: i64 },
    #[error("alert {id} is already resolved")]
    AlreadyResolved { id: i64 },
    #[error("unexpected data in the database: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for SqlError {
    fn from(e: sqlx::Error) -> Self {
        SqlError::Database(Box::new(e))
    }
}

impl SqlError {
    /// The one place that decides what each error means for the caller.
    pub fn disposition(&self) -> Disposition {
        match self {
            SqlError::Fenced { .. } => Disposition::Fenced,
            SqlError::Connect { source, .. } => transient(source),
            SqlError::Database(e) => transient(e),
            SqlError::UnsupportedUrl { .. }
            | SqlError::Migrate(_)
            | SqlError::UnknownAlert { .. }
            | SqlError::AlreadyResolved { .. }
            | SqlError::Corrupt(_) => Disposition::Permanent,
        }
    }
}

fn transient(e: &sqlx::Error) -> Disposition {
    match e {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_) => Disposition::Retry,
        sqlx::Error::Database(db) => {
            let code = db.code().unwrap_or_default();
            // PostgreSQL: connection exceptions (08…), serialization failure, deadlock,
            // shutdown in progress (57P…); SQLite: SQLITE_BUSY (5), SQLITE_LOCKED (6).
            if code.starts_with("08")
                || code == "40001"
                || code == "40P01"
                || code.starts_with("57P")
                || code == "5"
                || code == "6"
            {
                Disposition::Retry
            } else {
                Disposition::Permanent
            }
        }
        _ => Disposition::Permanent,
    }
}

/// Which database a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The backend a URL names.
    pub fn of_url(url: &str) -> Result<Backend, SqlError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Backend::Postgres)
        } else if url.starts_with("sqlite:") {
            Ok(Backend::Sqlite)
        } else {
            Err(SqlError::UnsupportedUrl { url: url.into() })
        }
    }
}

#[derive(Debug, Clone)]
enum Pool {
    Pg(PgPool),
    Lite(SqlitePool),
}

/// A connection pool to the read side's database.
#[derive(Debug, Clone)]
pub struct Db {
    pool: Pool,
}

/// A partition claimed by a sink: its fencing epoch and where to resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Claim {
    pub epoch: i64,
    /// The first offset not yet applied; `None` for a partition never committed.
    pub next_offset: Option<i64>,
}

/// One consumed partition of a batch: the epoch it was claimed with and the offset the
/// next batch starts at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub epoch: i64,
    pub next_offset: i64,
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Committed {
    /// Records whose operations were applied.
    pub applied: usize,
    /// Records skipped because their key was applied before.
    pub duplicates: usize,
    /// Events to produce (`ReplenishmentRequested`), also kept in the outbox until
    /// [`Db::outbox_done`].
    pub publish: Vec<Event>,
}

/// The tables each sink writes, besides its rows in the bookkeeping tables
/// (`sink_offsets`, `sink_applied_events`, `sink_outbox`): what [`Db::reset`] empties.
/// A table a sink starts writing must be listed here, or a rebuild would keep old rows.
pub fn tables(sink: Sink) -> &'static [&'static str] {
    match sink {
        Sink::Projector => &["orders", "order_events"],
        Sink::Stats => &[
            "stats_minute",
            "stats_revenue_minute",
            "stats_rejections_minute",
            "stats_durations_minute",
            "stats_duration_totals_minute",
            "stats_milestones",
        ],
        Sink::Alerts => &[
            "alerts",
            "alert_changes",
            "stock_levels",
            "alert_retry_counts",
        ],
    }
}

/// A sink's stored position in one input partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredOffset {
    pub topic: String,
    pub partition: i32,
    /// The first offset not applied; `None` until the partition's first commit.
    pub next_offset: Option<i64>,
}

/// Current time, milliseconds since the epoch.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Db {
    /// Opens a pool on `url` (`postgres://…`, or `sqlite:…`; an SQLite file is created when
    /// missing). Does not migrate: see [`Db::migrate`].
    pub async fn connect(url: &str) -> Result<Db, SqlError> {
        let connect_err = |source| SqlError::Connect {
            url: url.into(),
            source: Box::new(source),
        };
        let pool = match Backend::of_url(url)? {
            Backend::Postgres => Pool::Pg(
                PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(10))
                    .connect(url)
                    .await
                    .map_err(connect_err)?,
            ),
            Backend::Sqlite => {
                let options = SqliteConnectOptions::from_str(url)
                    .map_err(connect_err)?
                    .create_if_missing(true)
                    .busy_timeout(Duration::from_secs(10));
                // Every connection to `sqlite::memory:` is a database of its own: keep one.
                let memory = url.contains(":memory:") || url.contains("mode=memory");
                let options = if memory {
                    options
                } else {
                    options.journal_mode(SqliteJournalMode::Wal)
                };
                let pool = SqlitePoolOptions::new()
                    .max_connections(if memory { 1 } else { 4 })
                    .idle_timeout(None)
                    .max_lifetime(None)
                    .connect_with(options)
                    .await
                    .map_err(connect_err)?;
                Pool::Lite(pool)
            }
        };
        Ok(Db { pool })
    }

    pub fn backend(&self) -> Backend {
        match self.pool {
            Pool::Pg(_) => Backend::Postgres,
            Pool::Lite(_) => Backend::Sqlite,
        }
    }

    /// Applies the migrations not applied yet; running it again changes nothing.
    pub async fn migrate(&self) -> Result<(), SqlError> {
        let r = match &self.pool {
            Pool::Pg(p) => POSTGRES_MIGRATIONS.run(p).await,
            Pool::Lite(p) => SQLITE_MIGRATIONS.run(p).await,
        };
        r.map_err(|e| SqlError::Migrate(Box::new(e)))
    }

    pub async fn close(&self) {
        match &self.pool {
            Pool::Pg(p) => p.close().await,
            Pool::Lite(p) => p.close().await,
        }
    }

    /// A write transaction (on SQLite, one that takes the write lock at once, so two
    /// writers queue instead of failing to upgrade a read lock).
    async fn begin(&self) -> Result<Tx, SqlError> {
        Ok(match &self.pool {
            Pool::Pg(p) => Tx::Pg(p.begin().await?),
            Pool::Lite(p) => Tx::Lite(p.begin_with("BEGIN IMMEDIATE").await?),
        })
    }

    /// A transaction for reading only.
    async fn begin_read(&self) -> Result<Tx, SqlError> {
        Ok(match &self.pool {
            Pool::Pg(p) => Tx::Pg(p.begin().await?),
            Pool::Lite(p) => Tx::Lite(p.begin().await?),
        })
    }

    /// Claims `topic`[`partition`] for `sink`: bumps its epoch, which fences whoever held
    /// it before, and returns the new epoch with the offset to resume from.
    pub async fn claim(&self, sink: Sink, topic: &str, partition: i32) -> Result<Claim, SqlError> {
        let mut tx = self.begin().await?;
        let row = tx
            .fetch_one(
                "INSERT INTO sink_offsets (sink, topic, partition, next_offset, epoch) \
                 VALUES ($1, $2, $3, NULL, 1) \
                 ON CONFLICT (sink, topic, partition) DO UPDATE SET epoch = sink_offsets.epoch + 1 \
                 RETURNING epoch, next_offset",
                &[
                    Arg::text(sink.name()),
                    Arg::text(topic),
                    Arg::int(partition.into()),
                ],
                &[Kind::I64, Kind::I64],
            )
            .await?;
        tx.commit().await?;
        Ok(Claim {
            epoch: row.i64(0)?,
            next_offset: row.opt_i64(1)?,
        })
    }

    /// Commits one batch of `sink`: advances every position (fenced → nothing changes,
    /// [`SqlError::Fenced`]), skips records applied before, applies the others'
    /// operations, and returns the events to publish — all in one transaction.
    pub async fn commit(
        &self,
        sink: Sink,
        positions: &[Position],
        effects: &[Effects],
    ) -> Result<Committed, SqlError> {
        let mut tx = self.begin().await?;
        for p in positions {
            let updated = tx
                .execute(
                    "UPDATE sink_offsets SET next_offset = $1 \
                     WHERE sink = $2 AND topic = $3 AND partition = $4 AND epoch = $5",
                    &[
                        Arg::int(p.next_offset),
                        Arg::text(sink.name()),
                        Arg::text(&p.topic),
                        Arg::int(p.partition.into()),
                        Arg::int(p.epoch),
                    ],
                )
                .await?;
            if updated == 0 {
                tx.rollback().await?;
                return Err(SqlError::Fenced {
                    sink,
                    topic: p.topic.clone(),
                    partition: p.partition,
                    epoch: p.epoch,
                });
            }
        }
        let now = now_ms();
        let mut out = Committed::default();
        for effect in effects {
            // The projector's timeline row is its own ledger; the other sinks keep one.
            let (claimed, rest) = match (sink, effect.ops.split_first()) {
                (Sink::Projector, Some((first @ RowOp::InsertEvent { .. }, rest))) => {
                    (apply::insert_event(&mut tx, first).await?, rest)
                }
                _ => (
                    tx.execute(
                        "INSERT INTO sink_applied_events (sink, event_id, applied_at) \
                         VALUES ($1, $2, $3) ON CONFLICT (sink, event_id) DO NOTHING",
                        &[
                            Arg::text(sink.name()),
                            Arg::text(&effect.key),
                            Arg::int(now),
                        ],
                    )
                    .await?
                        == 1,
                    effect.ops.as_slice(),
                ),
            };
            if !claimed {
                out.duplicates += 1;
                continue;
            }
            for op in rest {
                if let Some(event) = apply::apply(&mut tx, op, now).await? {
                    apply::to_outbox(&mut tx, sink, &event, now).await?;
                    out.publish.push(event);
                }
            }
            out.applied += 1;
        }
        tx.commit().await?;
        Ok(out)
    }

    /// Empties `sink`'s tables and forgets what it applied and still meant to publish, so
    /// that it reads its topics again from the earliest retained offset — in one
    /// transaction, so a reader sees the old rows or none.
    ///
    /// The offset rows are kept, with their position cleared and their epoch raised,
    /// rather than deleted: a worker holding a claim then fails its next commit as fenced
    /// and claims again (from the start). Deleting them would restart epochs at 1, and a
    /// worker still holding epoch 1 could commit its old position over the reset.
    /// On PostgreSQL the offsets table is locked first (blocking commits and claims of
    /// every sink until the reset commits), so that no commit lands between clearing the
    /// positions and emptying the tables; on SQLite the write transaction already
    /// excludes every other writer. Returns the number of rows deleted.
    pub async fn reset(&self, sink: Sink) -> Result<u64, SqlError> {
        let mut tx = self.begin().await?;
        if self.backend() == Backend::Postgres {
            tx.execute("LOCK TABLE sink_offsets IN EXCLUSIVE MODE", &[])
                .await?;
        }
        tx.execute(
            "UPDATE sink_offsets SET next_offset = NULL, epoch = epoch + 1 WHERE sink = $1",
            &[Arg::text(sink.name())],
        )
        .await?;
        let mut deleted = 0;
        for table in tables(sink) {
            deleted += tx.execute(&format!("DELETE FROM {table}"), &[]).await?;
        }
        for table in ["sink_applied_events", "sink_outbox"] {
            deleted += tx
                .execute(
                    &format!("DELETE FROM {table} WHERE sink = $1"),
                    &[Arg::text(sink.name())],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(deleted)
    }

    /// Moves `sink`'s stored positions (`orderflow replay`): each `(topic, partition,
    /// next_offset)` is where the sink continues. The epoch is bumped as a claim does, so
    /// a worker still holding the partition fails its next commit and claims it again
    /// from the new position. Records read again that were applied before are skipped by
    /// the applied-event ledger, so the rows come out the same.
    pub async fn set_offsets(
        &self,
        sink: Sink,
        offsets: &[(String, i32, i64)],
    ) -> Result<(), SqlError> {
        let mut tx = self.begin().await?;
        for (topic, partition, next) in offsets {
            tx.execute(
                "INSERT INTO sink_offsets (sink, topic, partition, next_offset, epoch) \
                 VALUES ($1, $2, $3, $4, 1) \
                 ON CONFLICT (sink, topic, partition) DO UPDATE \
                 SET next_offset = excluded.next_offset, epoch = sink_offsets.epoch + 1",
                &[
                    Arg::text(sink.name()),
                    Arg::text(topic),
                    Arg::int((*partition).into()),
                    Arg::int(*next),
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// `sink`'s stored positions, by topic and partition.
    pub async fn offsets(&self, sink: Sink) -> Result<Vec<StoredOffset>, SqlError> {
        let mut tx = self.begin_read().await?;
        let rows = tx
            .fetch_all(
                "SELECT topic, CAST(partition AS BIGINT), next_offset FROM sink_offsets \
                 WHERE sink = $1 ORDER BY topic, partition",
                &[Arg::text(sink.name())],
                &[Kind::Text, Kind::I64, Kind::I64],
            )
            .await?;
        tx.commit().await?;
        rows.into_iter()
            .map(|r| {
                Ok(StoredOffset {
                    topic: r.text(0)?,
                    partition: i32::try_from(r.i64(1)?)
                        .map_err(|e| SqlError::Corrupt(format!("partition: {e}")))?,
                    next_offset: r.opt_i64(2)?,
                })
            })
            .collect()
    }

    /// Events committed for publishing and not yet marked done, oldest first: what a
    /// restarted sink produces before anything else.
    pub async fn outbox(&self, sink: Sink) -> Result<Vec<Event>, SqlError> {
        let mut tx = self.begin().await?;
        let rows = tx
            .fetch_all(
                "SELECT event_type, payload FROM sink_outbox WHERE sink = $1 \
                 ORDER BY created_at, event_id",
                &[Arg::text(sink.name())],
                &[Kind::Text, Kind::Json],
            )
            .await?;
        tx.commit().await?;
        rows.into_iter()
            .map(|r| {
                let name = r.text(0)?;
                let t = EventType::from_name(&name)
                    .ok_or_else(|| SqlError::Corrupt(format!("outbox event type {name:?}")))?;
                Event::from_json_value(t, r.json(1)?)
                    .map_err(|e| SqlError::Corrupt(format!("outbox {name}: {e}")))
            })
            .collect()
    }

    /// Forgets outbox events once they are produced.
    pub async fn outbox_done(&self, sink: Sink, event_ids: &[&str]) -> Result<u64, SqlError> {
        let mut tx = self.begin().await?;
        let mut n = 0;
        for id in event_ids {
            n += tx
                .execute(
                    "DELETE FROM sink_outbox WHERE sink = $1 AND event_id = $2",
                    &[Arg::text(sink.name()), Arg::text(id)],
                )
                .await?;
        }
        tx.commit().await?;
        Ok(n)
    }

    /// Forgets applied keys of `sink` older than `before_ms` (by when they were applied),
    /// bounding the ledger: an event arriving again after that is applied again, so keep
    /// this well beyond how late a duplicate can come (a replay of the topics should
    /// rebuild the tables from scratch instead).
    pub async fn prune_applied(&self, sink: Sink, before_ms: i64) -> Result<u64, SqlError> {
        let mut tx = self.begin().await?;
        let n = tx
            .execute(
                "DELETE FROM sink_applied_events WHERE sink = $1 AND applied_at < $2",
                &[Arg::text(sink.name()), Arg::int(before_ms)],
            )
            .await?;
        tx.commit().await?;
        Ok(n)
    }

    /// An operator acknowledges an open alert of their store; acknowledging an
    /// acknowledged alert changes nothing.
    pub async fn acknowledge(&self, store_id: &str, id: i64) -> Result<read::Alert, SqlError> {
        self.operator_action(
            store_id,
            id,
            "UPDATE alerts SET status = 'acknowledged', acknowledged_at = $3 \
             WHERE store_id = $1 AND id = $2 AND status = 'open'",
        )
        .await
    }

    /// An operator resolves an active alert of their store.
    pub async fn resolve(&self, store_id: &str, id: i64) -> Result<read::Alert, SqlError> {
        self.operator_action(
            store_id,
            id,
            "UPDATE alerts SET status = 'resolved', resolved_at = $3 \
             WHERE store_id = $1 AND id = $2 AND status <> 'resolved'",
        )
        .await
    }

    async fn operator_action(
        &self,
        store_id: &str,
        id: i64,
        update: &str,
    ) -> Result<read::Alert, SqlError> {
        let mut tx = self.begin().await?;
        let before = read::alert_in(&mut tx, store_id, id).await?;
        match before {
            None => {
                return Err(SqlError::UnknownAlert {
                    store_id: store_id.into(),
                    id,
                });
            }
            Some(a) if a.status == read::AlertStatus::Resolved => {
                return Err(SqlError::AlreadyResolved { id });
            }
            Some(_) => {}
        }
        tx.execute(
            update,
            &[Arg::text(store_id), Arg::int(id), Arg::int(now_ms())],
        )
        .await?;
        let after = read::alert_in(&mut tx, store_id, id).await?;
        tx.commit().await?;
        after.ok_or_else(|| SqlError::UnknownAlert {
            store_id: store_id.into(),
            id,
        })
    }
}

// ---------------------------------------------------------------------------------------
// The thin layer both backends share: bound arguments, decoded values, one transaction.
// ---------------------------------------------------------------------------------------

/// A bound parameter.
#[derive(Debug, Clone)]
enum Arg {
    I64(Option<i64>),
    Text(Option<String>),
    Json(serde_json::Value),
}

impl Arg {
    fn int(v: i64) -> Arg {
        Arg::I64(Some(v))
    }
    fn text(v: &str) -> Arg {
        Arg::Text(Some(v.to_owned()))
    }
}

/// The type a result column is decoded as.
#[derive(Debug, Clone, Copy)]
enum Kind {
    I64,
    Text,
    Json,
}

#[derive(Debug, Clone)]
enum Val {
    Null,
    I64(i64),
    Text(String),
    Json(serde_json::Value),
}

/// A decoded result row.
#[derive(Debug, Clone)]
struct Row(Vec<Val>);

impl Row {
    fn val(&self, i: usize) -> Result<&Val, SqlError> {
        self.0
            .get(i)
            .ok_or_else(|| SqlError::Corrupt(format!("no column {i}")))
    }
    fn opt_i64(&self, i: usize) -> Result<Option<i64>, SqlError> {
        match self.val(i)? {
            Val::Null => Ok(None),
            Val::I64(v) => Ok(Some(*v)),
            other => Err(SqlError::Corrupt(format!(
                "column {i}: {other:?} is not a number"
            ))),
        }
    }
    fn i64(&self, i: usize) -> Result<i64, SqlError> {
        self.opt_i64(i)?
            .ok_or_else(|| SqlError::Corrupt(format!("column {i} is NULL")))
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, SqlError> {
        match self.val(i)? {
            Val::Null => Ok(None),
            Val::Text(v) => Ok(Some(v.clone())),
            other => Err(SqlError::Corrupt(format!(
                "column {i}: {other:?} is not text"
            ))),
        }
    }
    fn text(&self, i: usize) -> Result<String, SqlError> {
        self.opt_text(i)?
            .ok_or_else(|| SqlError::Corrupt(format!("column {i} is NULL")))
    }
    fn json(&self, i: usize) -> Result<serde_json::Value, SqlError> {
        match self.val(i)? {
            Val::Json(v) => Ok(v.clone()),
            other => Err(SqlError::Corrupt(format!(
                "column {i}: {other:?} is not JSON"
            ))),
        }
    }
}

/// One transaction on either backend.
enum Tx {
    Pg(Transaction<'static, Postgres>),
    Lite(Transaction<'static, Sqlite>),
}

/// Binds `args` to a query of either backend (the code is the same, the types differ).
macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut q = $query;
        for a in $args {
            q = match a {
                Arg::I64(v) => q.bind(*v),
                Arg::Text(v) => q.bind(v.clone()),
                Arg::Json(v) => q.bind(sqlx::types::Json(v.clone())),
            };
        }
        q
    }};
}

/// Decodes the columns of a row of either backend as `kinds`.
macro_rules! decode_row {
    ($row:expr, $kinds:expr) => {{
        let mut vals = Vec::with_capacity($kinds.len());
        for (i, k) in $kinds.iter().enumerate() {
            vals.push(match k {
                Kind::I64 => $row
                    .try_get::<Option<i64>, _>(i)?
                    .map_or(Val::Null, Val::I64),
                Kind::Text => $row
                    .try_get::<Option<String>, _>(i)?
                    .map_or(Val::Null, Val::Text),
                Kind::Json => $row
                    .try_get::<Option<sqlx::types::Json<serde_json::Value>>, _>(i)?
                    .map_or(Val::Null, |j| Val::Json(j.0)),
            });
        }
        Row(vals)
    }};
}

impl Tx {
    async fn execute(&mut self, sql: &str, args: &[Arg]) -> Result<u64, sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_owned());
        Ok(match self {
            Tx::Pg(tx) => bind_all!(sqlx::query(sql), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
            Tx::Lite(tx) => bind_all!(sqlx::query(sql), args)
                .execute(&mut **tx)
                .await?
                .rows_affected(),
        })
    }

    async fn fetch_all(
        &mut self,
        sql: &str,
        args: &[Arg],
        kinds: &[Kind],
    ) -> Result<Vec<Row>, sqlx::Error> {
        let sql = AssertSqlSafe(sql.to_owned());
        let mut out = Vec::new();
        match self {
            Tx::Pg(tx) => {
                for row in bind_all!(sqlx::query(sql), args)
                    .fetch_all(&mut **tx)
                    .await?
                {
                    out.push(decode_row!(row, kinds));
                }
            }
            Tx::Lite(tx) => {
                for row in bind_all!(sqlx::query(sql), args)
                    .fetch_all(&mut **tx)
                    .await?
                {
                    out.push(decode_row!(row, kinds));
                }
            }
        }
        Ok(out)
    }

    async fn fetch_optional(
        &mut self,
        sql: &str,
        args: &[Arg],
        kinds: &[Kind],
    ) -> Result<Option<Row>, sqlx::Error> {
        Ok(self.fetch_all(sql, args, kinds).await?.into_iter().next())
    }

    async fn fetch_one(
        &mut self,
        sql: &str,
        args: &[Arg],
        kinds: &[Kind],
    ) -> Result<Row, sqlx::Error> {
        self.fetch_optional(sql, args, kinds)
            .await?
            .ok_or(sqlx::Error::RowNotFound)
    }

    async fn commit(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Pg(tx) => tx.commit().await,
            Tx::Lite(tx) => tx.commit().await,
        }
    }

    async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Pg(tx) => tx.rollback().await,
            Tx::Lite(tx) => tx.rollback().await,
        }
    }
}
