-- Auctions (issue 16): one lot of a listing's capacity (one host, for `term_ms` or
-- until released) sold by an English, Dutch or sealed auction
-- (`surplus_market::auction::Auction` as JSON, bids included). `due_at_ms` is its
-- timer (the end, or the moment a buy-now or a Dutch take ended it; NULL once
-- closed): a close reads and rewrites the row under the listing's lock only while
-- `closed_at_ms` is NULL, so an auction closes once however many replicas poll.
CREATE TABLE auctions (
    id             TEXT PRIMARY KEY,
    listing        TEXT NOT NULL,
    provider       TEXT NOT NULL,
    record         TEXT NOT NULL,
    term_ms        BIGINT,
    due_at_ms      BIGINT,
    closed_at_ms   BIGINT,
    reservation    TEXT,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX auctions_due ON auctions (due_at_ms);
CREATE INDEX auctions_listing ON auctions (listing, created_at_ms);
