-- The spot market (issue 16): one market per listing that sells spot capacity (its
-- class: one provider's size category in one zone, at one minimum), kept as rows so
-- that any controller replica clears it. `next_clearing_at_ms` and
-- `requested_at_ms` are its timers: a clearing reads and rewrites the row under the
-- listing's lock and only while it is due, so a clearing happens once however many
-- replicas poll. `last` is the previous clearing (`surplus_market::spot::Clearing`
-- as JSON), against which the next finds its interruptions.
CREATE TABLE spot_markets (
    listing              TEXT PRIMARY KEY,
    period_ms            BIGINT NOT NULL,
    next_clearing_at_ms  BIGINT NOT NULL,
    requested_at_ms      BIGINT,
    last                 TEXT,
    price                BIGINT,
    cleared_at_ms        BIGINT
);
CREATE INDEX spot_markets_due ON spot_markets (next_clearing_at_ms);
-- Bids (`surplus_market::spot::Bid` as JSON), live until cancelled; `allocated` is
-- what the last clearing gave the bid.
CREATE TABLE spot_bids (
    id               TEXT PRIMARY KEY,
    listing          TEXT NOT NULL,
    bidder           TEXT NOT NULL,
    record           TEXT NOT NULL,
    placed_at_ms     BIGINT NOT NULL,
    cancelled_at_ms  BIGINT,
    allocated        BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX spot_bids_live ON spot_bids (listing, cancelled_at_ms);
CREATE INDEX spot_bids_bidder ON spot_bids (bidder, placed_at_ms);
-- Which bid each spot reservation's host was given to.
CREATE TABLE spot_allocations (
    reservation  TEXT PRIMARY KEY,
    bid          TEXT NOT NULL,
    listing      TEXT NOT NULL
);
CREATE INDEX spot_allocations_bid ON spot_allocations (bid);
CREATE INDEX spot_allocations_listing ON spot_allocations (listing);
