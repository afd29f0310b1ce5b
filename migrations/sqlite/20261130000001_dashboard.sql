-- The dashboard: an index for its recent orders (newest first, read backwards), and a
-- change log of alerts, so that a live stream of a store's alerts
-- (`GET /alerts/events`) can resume after the last change a client saw (`Last-Event-ID`).
--
-- Every opening, status change and new occurrence of an alert appends a row, written by
-- triggers whoever changes the alert (the alerts sink, an operator through the API).
-- `seq` is the stream's event ID; SQLite has one writer at a time, so rows commit in
-- `seq` order and a reader moving forward through `seq` misses none.

CREATE TABLE alert_changes (
    seq        INTEGER PRIMARY KEY AUTOINCREMENT,
    store_id   TEXT    NOT NULL,
    alert_id   BIGINT  NOT NULL,
    -- opened, acknowledged, resolved, or occurred (one more occurrence of an active alert)
    change     TEXT    NOT NULL,
    changed_at BIGINT  NOT NULL
);
CREATE INDEX alert_changes_by_store ON alert_changes (store_id, seq);

CREATE TRIGGER alerts_record_opening AFTER INSERT ON alerts
BEGIN
    INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
    VALUES (NEW.store_id, NEW.id, 'opened', NEW.opened_at);
END;

CREATE TRIGGER alerts_record_status AFTER UPDATE ON alerts
WHEN NEW.status IS NOT OLD.status
BEGIN
    INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
    VALUES (NEW.store_id, NEW.id, NEW.status,
            COALESCE(CASE NEW.status WHEN 'acknowledged' THEN NEW.acknowledged_at
                                     WHEN 'resolved' THEN NEW.resolved_at END,
                     NEW.last_seen_at));
END;

CREATE TRIGGER alerts_record_occurrence AFTER UPDATE ON alerts
WHEN NEW.status IS OLD.status AND NEW.occurrences IS NOT OLD.occurrences
BEGIN
    INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
    VALUES (NEW.store_id, NEW.id, 'occurred', NEW.last_seen_at);
END;

-- Alerts that exist already: their opening, and their status if it moved on.
INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
SELECT store_id, id, 'opened', opened_at FROM alerts ORDER BY id;
INSERT INTO alert_changes (store_id, alert_id, change, changed_at)
SELECT store_id, id, status, COALESCE(resolved_at, acknowledged_at, last_seen_at)
FROM alerts WHERE status <> 'open' ORDER BY id;

-- Recent orders (`GET /orders?sort=recent`): the store's newest by creation time.
CREATE INDEX orders_recent ON orders (store_id, created_at, order_id);
