-- Buying capacity (issue 16).
--
-- The hosts each listing sells, so that the control path tells a host of the market
-- (only the holder of its reservation may control it) in one indexed read; kept in
-- step with the listing's record by the store.
CREATE TABLE listing_hosts (
    listing  TEXT NOT NULL,
    host     TEXT NOT NULL,
    PRIMARY KEY (listing, host)
);
CREATE INDEX listing_hosts_host ON listing_hosts (host);
INSERT INTO listing_hosts (listing, host)
SELECT l.id, h.value FROM listings l, jsonb_array_elements_text(l.record::jsonb -> 'hosts') AS h(value)
ON CONFLICT DO NOTHING;

-- Immediate quotes (`surplus_market::quote::Quote`): a price held for one client for
-- a short time, honoured once if accepted before `valid_until_ms`.
CREATE TABLE quotes (
    id             TEXT PRIMARY KEY,
    listing        TEXT NOT NULL,
    holder         TEXT NOT NULL,
    record         TEXT NOT NULL,
    valid_until_ms BIGINT NOT NULL,
    accepted_at_ms BIGINT
);
CREATE INDEX quotes_holder ON quotes (holder, valid_until_ms);

-- Whether a reservation's end is recorded (its record says so): the expiry job looks
-- for terms that passed and are not yet recorded as ended.
ALTER TABLE reservations ADD COLUMN ended BIGINT NOT NULL DEFAULT 0;
CREATE INDEX reservations_due ON reservations (ended, until_ms);
CREATE INDEX reservations_host_holder ON reservations (host, holder, until_ms);
UPDATE reservations SET ended = 1 WHERE (record::jsonb -> 'state' ->> 'state') = 'ended';
