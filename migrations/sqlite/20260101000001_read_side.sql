-- The read side: the projector's orders and timeline, the stats aggregator's per-minute
-- tables, alerts, and the sinks' bookkeeping (offsets with fencing epochs, applied
-- event IDs, the outbox of events to publish).
--
-- Times are milliseconds since the Unix epoch in BIGINT columns named *_at or *_ms.
-- Stats tables also carry `time`, the bucket start as RFC 3339 text (UTC), generated from
-- `bucket_ms`, for Grafana (SQLite has no timestamp type).

-- Projector ------------------------------------------------------------------------------

CREATE TABLE orders (
    store_id           TEXT    NOT NULL,
    order_id           TEXT    NOT NULL,
    customer_id        TEXT,
    -- src/status.rs: created, screened, reserved, paid, fulfilling, shipped, delivered,
    -- rejected, cancelled, refunded; NULL while only side events (scans) are known.
    status             TEXT,
    -- fraud or out_of_stock when status = 'rejected'.
    rejection_reason   TEXT,
    total_cents        BIGINT,
    currency           TEXT,
    created_at         BIGINT,
    screened_at        BIGINT,
    reserved_at        BIGINT,
    paid_at            BIGINT,
    shipped_at         BIGINT,
    delivered_at       BIGINT,
    rejected_at        BIGINT,
    cancelled_at       BIGINT,
    delivery_failed_at BIGINT,
    refunded_at        BIGINT,
    last_event_id      TEXT    NOT NULL,
    last_event_type    TEXT    NOT NULL,
    last_event_at      BIGINT  NOT NULL,
    -- Wall-clock time of the last write.
    updated_at         BIGINT  NOT NULL,
    PRIMARY KEY (store_id, order_id)
);
CREATE INDEX orders_by_status ON orders (store_id, status, order_id);

CREATE TABLE order_events (
    event_id    TEXT   PRIMARY KEY,
    store_id    TEXT   NOT NULL,
    order_id    TEXT   NOT NULL,
    event_type  TEXT   NOT NULL,
    stage       TEXT   NOT NULL,
    topic       TEXT   NOT NULL,
    occurred_at BIGINT NOT NULL,
    payload     TEXT   NOT NULL
);
CREATE INDEX order_events_timeline ON order_events (store_id, order_id, occurred_at);

-- Stats ----------------------------------------------------------------------------------

CREATE TABLE stats_minute (
    store_id            TEXT   NOT NULL,
    bucket_ms           BIGINT NOT NULL,
    time                TEXT GENERATED ALWAYS AS (strftime('%Y-%m-%dT%H:%M:%SZ', bucket_ms / 1000, 'unixepoch')) STORED,
    orders_created      BIGINT NOT NULL DEFAULT 0,
    orders_rejected     BIGINT NOT NULL DEFAULT 0,
    stock_rejections    BIGINT NOT NULL DEFAULT 0,
    payments_authorized BIGINT NOT NULL DEFAULT 0,
    payments_failed     BIGINT NOT NULL DEFAULT 0,
    payments_retried    BIGINT NOT NULL DEFAULT 0,
    refunds             BIGINT NOT NULL DEFAULT 0,
    shipped             BIGINT NOT NULL DEFAULT 0,
    delivered           BIGINT NOT NULL DEFAULT 0,
    delivery_failures   BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, bucket_ms)
);
CREATE INDEX stats_minute_time ON stats_minute (store_id, time);

CREATE TABLE stats_revenue_minute (
    store_id                 TEXT   NOT NULL,
    bucket_ms                BIGINT NOT NULL,
    time                     TEXT GENERATED ALWAYS AS (strftime('%Y-%m-%dT%H:%M:%SZ', bucket_ms / 1000, 'unixepoch')) STORED,
    currency                 TEXT   NOT NULL,
    revenue_authorized_cents BIGINT NOT NULL DEFAULT 0,
    refunded_cents           BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, bucket_ms, currency)
);
CREATE INDEX stats_revenue_minute_time ON stats_revenue_minute (store_id, time);

CREATE TABLE stats_rejections_minute (
    store_id  TEXT   NOT NULL,
    bucket_ms BIGINT NOT NULL,
    time      TEXT GENERATED ALWAYS AS (strftime('%Y-%m-%dT%H:%M:%SZ', bucket_ms / 1000, 'unixepoch')) STORED,
    reason    TEXT   NOT NULL,
    count     BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, bucket_ms, reason)
);
CREATE INDEX stats_rejections_minute_time ON stats_rejections_minute (store_id, time);

-- Histogram of span durations: observations with previous bound < duration <= bucket_le_ms
-- (not cumulative); bucket_le_ms = 9223372036854775807 is +Inf. The bounds are fixed
-- (src/views/mod.rs DURATION_BUCKETS_MS). A span counts in the minute of its end.
CREATE TABLE stats_durations_minute (
    store_id     TEXT   NOT NULL,
    bucket_ms    BIGINT NOT NULL,
    time         TEXT GENERATED ALWAYS AS (strftime('%Y-%m-%dT%H:%M:%SZ', bucket_ms / 1000, 'unixepoch')) STORED,
    span         TEXT   NOT NULL,
    bucket_le_ms BIGINT NOT NULL,
    count        BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, bucket_ms, span, bucket_le_ms)
);
CREATE INDEX stats_durations_minute_time ON stats_durations_minute (store_id, time);

-- Count, sum and maximum of the same observations, for averages.
CREATE TABLE stats_duration_totals_minute (
    store_id  TEXT   NOT NULL,
    bucket_ms BIGINT NOT NULL,
    time      TEXT GENERATED ALWAYS AS (strftime('%Y-%m-%dT%H:%M:%SZ', bucket_ms / 1000, 'unixepoch')) STORED,
    span      TEXT   NOT NULL,
    count     BIGINT NOT NULL DEFAULT 0,
    sum_ms    BIGINT NOT NULL DEFAULT 0,
    max_ms    BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (store_id, bucket_ms, span)
);
CREATE INDEX stats_duration_totals_minute_time ON stats_duration_totals_minute (store_id, time);

-- The milestones of orders whose spans are not all observed yet; a row goes once all
-- four are known.
CREATE TABLE stats_milestones (
    store_id     TEXT NOT NULL,
    order_id     TEXT NOT NULL,
    created_at   BIGINT,
    paid_at      BIGINT,
    shipped_at   BIGINT,
    delivered_at BIGINT,
    PRIMARY KEY (store_id, order_id)
);

-- Alerts ---------------------------------------------------------------------------------

CREATE TABLE alerts (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    store_id        TEXT   NOT NULL,
    -- low_stock, payment_exhausted, gateway_outage, dead_letters
    kind            TEXT   NOT NULL,
    subject         TEXT   NOT NULL,
    status          TEXT   NOT NULL CHECK (status IN ('open', 'acknowledged', 'resolved')),
    opened_at       BIGINT NOT NULL,
    acknowledged_at BIGINT,
    resolved_at     BIGINT,
    last_seen_at    BIGINT NOT NULL,
    occurrences     BIGINT NOT NULL,
    detail          TEXT   NOT NULL
);
-- At most one active (not resolved) alert per store, kind and subject.
CREATE UNIQUE INDEX alerts_one_active ON alerts (store_id, kind, subject) WHERE status <> 'resolved';
CREATE INDEX alerts_by_store ON alerts (store_id, status, opened_at);

-- The last reported level and threshold of each SKU (reservations report no level, so
-- `available` is as of the last StockLevelChanged or LowStock).
CREATE TABLE stock_levels (
    store_id     TEXT   NOT NULL,
    sku          TEXT   NOT NULL,
    available    BIGINT,
    available_at BIGINT,
    threshold    BIGINT,
    threshold_at BIGINT,
    updated_at   BIGINT NOT NULL,
    PRIMARY KEY (store_id, sku)
);

-- PaymentRetrying events per store and minute, for the gateway-outage rule; rows older
-- than an hour are deleted as new ones come.
CREATE TABLE alert_retry_counts (
    store_id  TEXT   NOT NULL,
    bucket_ms BIGINT NOT NULL,
    count     BIGINT NOT NULL,
    PRIMARY KEY (store_id, bucket_ms)
);

-- Sink bookkeeping -----------------------------------------------------------------------

-- Next offset to read per sink and topic partition, and the epoch of its current holder:
-- a commit updates only WHERE epoch = its own, so a fenced holder changes nothing.
CREATE TABLE sink_offsets (
    sink        TEXT    NOT NULL,
    topic       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset BIGINT,
    epoch       BIGINT  NOT NULL,
    PRIMARY KEY (sink, topic, partition)
);

-- Event IDs (or dead-letter keys) a sink has applied; the projector uses order_events.
CREATE TABLE sink_applied_events (
    sink       TEXT   NOT NULL,
    event_id   TEXT   NOT NULL,
    applied_at BIGINT NOT NULL,
    PRIMARY KEY (sink, event_id)
);
CREATE INDEX sink_applied_events_age ON sink_applied_events (sink, applied_at);

-- Events a sink's commit decided to publish, until the caller has produced them.
CREATE TABLE sink_outbox (
    event_id   TEXT   PRIMARY KEY,
    sink       TEXT   NOT NULL,
    event_type TEXT   NOT NULL,
    payload    TEXT   NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX sink_outbox_by_sink ON sink_outbox (sink, created_at);
