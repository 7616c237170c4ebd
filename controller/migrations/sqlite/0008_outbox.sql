-- Things the controller must tell someone, queued in the transaction of the step that
-- decided them (`LedgerStore::apply_changes`) and delivered from here; a key is
-- queued once.
CREATE TABLE outbox (
    key             TEXT PRIMARY KEY,
    recipient       TEXT NOT NULL,
    kind            TEXT NOT NULL,
    body            TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    delivered_at_ms BIGINT,
    attempts        BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX outbox_recipient ON outbox (recipient, created_at_ms);
