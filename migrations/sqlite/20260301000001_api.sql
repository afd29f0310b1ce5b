-- The HTTP API: durable idempotency records, and an arrival order for timelines.

-- One row per (store, Idempotency-Key) of a request the API accepted: the request's
-- fingerprint (SHA-256 of its route and canonical JSON body) and the answer it got, so
-- the same key with the same body gets the same answer, and with another body an error.
CREATE TABLE api_idempotency (
    store_id        TEXT   NOT NULL,
    idempotency_key TEXT   NOT NULL,
    fingerprint     TEXT   NOT NULL,
    status          BIGINT NOT NULL,
    response        TEXT   NOT NULL,
    created_at      BIGINT NOT NULL,
    PRIMARY KEY (store_id, idempotency_key)
);

-- The order in which timeline rows arrived, so that a live stream of an order's events
-- can resume after the last one a client saw (`Last-Event-ID`) even when a later row has
-- an earlier `occurred_at`. SQLite cannot add an auto-incrementing column, so `seq`
-- copies the row's rowid, which grows with every insert.
ALTER TABLE order_events ADD COLUMN seq BIGINT;
UPDATE order_events SET seq = rowid;
CREATE TRIGGER order_events_seq AFTER INSERT ON order_events
BEGIN
    UPDATE order_events SET seq = NEW.rowid WHERE rowid = NEW.rowid;
END;
CREATE INDEX order_events_arrival ON order_events (store_id, order_id, seq);
