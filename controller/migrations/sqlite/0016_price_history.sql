-- Pricing history (issue 16, C5): every spot clearing price, auction sale and accepted
-- quote (`surplus_market::history::PricePoint`), kept once per id, with the columns a
-- question filters on.
CREATE TABLE price_history (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL,
    listing    TEXT NOT NULL,
    provider   TEXT NOT NULL,
    zone       TEXT NOT NULL,
    category   TEXT NOT NULL,
    currency   TEXT NOT NULL,
    price      BIGINT NOT NULL,
    at_ms      BIGINT NOT NULL
);
CREATE INDEX price_history_at ON price_history (currency, at_ms);
CREATE INDEX price_history_listing ON price_history (listing, at_ms);
