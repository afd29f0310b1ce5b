-- The dashboard: an index for its recent orders (newest first, read backwards), and a
-- change log of alerts, so that a live stream of a store's alerts
-- (`GET /alerts/events`) can resume after the last change a client saw (`Last-Event-ID`).
--
-- Every opening, status change and new occurrence of an alert appends a row, written by
-- triggers whoever changes the alert (the alerts sink, an operator through the API).
-- `seq` is the stream's event ID. A reader only ever moves forward through `seq`, so a
-- row must never become visible after a row with a higher `seq`: every statement that
-- writes `alerts` first takes one transaction-scoped advisory lock, held until commit,
-- so writers of alerts commit one after the other, in `seq` order. The lock is taken
-- before the statement locks any alert row, so it adds no deadlock between writers.

CREATE TABLE alert_changes (
    seq        BIGSERIAL PRIMARY KEY,
    store_id   TEXT   NOT NULL,
    alert_id   BIGINT NOT NULL,
    -- opened, acknowledged, resolved, or occurred (one more occurrence of an active alert)
    change     TEXT   NOT NULL,
    changed_at BIGINT NOT NULL
);
CREATE INDEX alert_changes_by_store ON alert_changes (store_id, seq);

CREATE FUNCTION alert_changes_serialize() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- 0x6f666163 ("ofac"): the key of this lock, used nowhere else.
    PERFORM pg_advisory_xact_lock(1868980579);
    RETURN NULL;
END
$$;

CREATE TRIGGER alerts_serialize_changes BEFORE INSERT OR UPDATE ON alerts
    FOR EACH STATEMENT EXECUTE FUNCTION alert_changes_serialize();

CREATE FUNCTION alert_changes_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' THEN
        INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
        VALUES (NEW.store_id, NEW.id, 'opened', NEW.opened_at);
    ELSIF NEW.status IS DISTINCT FROM OLD.status THEN
        INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
        VALUES (NEW.store_id, NEW.id, NEW.status,
                COALESCE(CASE NEW.status WHEN 'acknowledged' THEN NEW.acknowledged_at
                                         WHEN 'resolved' THEN NEW.resolved_at END,
                         NEW.last_seen_at));
    ELSIF NEW.occurrences IS DISTINCT FROM OLD.occurrences THEN
        INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
        VALUES (NEW.store_id, NEW.id, 'occurred', NEW.last_seen_at);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER alerts_record_changes AFTER INSERT OR UPDATE ON alerts
    FOR EACH ROW EXECUTE FUNCTION alert_changes_record();

-- Alerts that exist already: their opening, and their status if it moved on.
INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
SELECT store_id, id, 'opened', opened_at FROM alerts ORDER BY id;
INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
SELECT store_id, id, status, COALESCE(resolved_at, acknowledged_at, last_seen_at)
FROM alerts WHERE status <> 'open' ORDER BY id;

-- Recent orders (`GET /orders?sort=recent`): the store's newest by creation time.
CREATE INDEX orders_recent ON orders (store_id, created_at, order_id);
