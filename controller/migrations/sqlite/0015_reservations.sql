-- Reservations (issue 16): one row per reserved host, the market crate's
-- `surplus_market::reservations::Reservation` as JSON, with the columns queries select
-- on. `until_ms` is the instant it stops holding its host (its end once ended, else
-- its term's end; NULL while it lasts until released), so the hosts held at an
-- instant are those with `until_ms` NULL or later. Every change of a listing's
-- reservations is one transaction that reads them all, asks the book, and writes
-- what it decided (on PostgreSQL under a per-listing advisory lock).
CREATE TABLE reservations (
    id             TEXT PRIMARY KEY,
    listing        TEXT NOT NULL,
    host           TEXT NOT NULL,
    holder         TEXT NOT NULL,
    record         TEXT NOT NULL,
    starts_at_ms   BIGINT NOT NULL,
    until_ms       BIGINT,
    updated_at_ms  BIGINT NOT NULL
);
CREATE INDEX reservations_listing ON reservations (listing, until_ms);
CREATE INDEX reservations_host ON reservations (host, until_ms);
CREATE INDEX reservations_holder ON reservations (holder, starts_at_ms);
