-- Resell requests (issue 15): the provider's document as submitted and its pipeline
-- (`surplus_market::pipeline::Pipeline`) as a row, rewritten in the transaction of
-- every step together with what the step makes (listings, outbox notices). `open`
-- marks the requests the pipeline still drives; `wake_at_ms` is the pipeline's next
-- deadline (a timer as a row); `version` makes each step a compare-and-set.
CREATE TABLE resell_requests (
    id             TEXT PRIMARY KEY,
    provider       TEXT NOT NULL,
    document       TEXT NOT NULL,
    pipeline       TEXT NOT NULL,
    stage          TEXT NOT NULL,
    open           BIGINT NOT NULL,
    wake_at_ms     BIGINT,
    version        BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE INDEX resell_requests_provider ON resell_requests (provider, created_at_ms);
CREATE INDEX resell_requests_open ON resell_requests (open);
-- What accepted hosts are offered as: one listing per request, resource set and
-- measured size category (`surplus_market::listings::Listing` as JSON). Re-tests
-- (C3) are timers as rows: `next_retest_at_ms` by the schedule, `retesting` while
-- one is under way, `retest_requested_at_ms` when one was asked for on demand.
CREATE TABLE listings (
    id             TEXT PRIMARY KEY,
    request        TEXT NOT NULL REFERENCES resell_requests(id),
    set_index      BIGINT NOT NULL,
    category       TEXT NOT NULL,
    provider       TEXT NOT NULL,
    record         TEXT NOT NULL,
    listed         BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL,
    next_retest_at_ms      BIGINT,
    retesting              BIGINT NOT NULL DEFAULT 0,
    retest_requested_at_ms BIGINT,
    UNIQUE (request, set_index, category)
);
CREATE INDEX listings_provider ON listings (provider);
CREATE INDEX listings_retest ON listings (next_retest_at_ms);
-- Clients' satisfaction ratings of providers (C3): one per client and instance it
-- ran on the provider's capacity.
CREATE TABLE ratings (
    client         TEXT NOT NULL,
    instance       TEXT NOT NULL,
    provider       TEXT NOT NULL,
    score          BIGINT NOT NULL,
    comment        TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (client, instance)
);
CREATE INDEX ratings_provider ON ratings (provider, created_at_ms);
-- Delivery of the outbox to the accounts' webhooks: each attempt is recorded, and a
-- failed one is tried again at `next_attempt_at_ms` (with backoff) until it is
-- delivered or given up.
CREATE TABLE webhooks (
    recipient      TEXT PRIMARY KEY,
    url            TEXT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
ALTER TABLE outbox ADD COLUMN next_attempt_at_ms BIGINT;
ALTER TABLE outbox ADD COLUMN last_error TEXT;
CREATE TABLE outbox_attempts (
    key            TEXT NOT NULL REFERENCES outbox(key),
    attempt        BIGINT NOT NULL,
    at_ms          BIGINT NOT NULL,
    outcome        TEXT NOT NULL,
    PRIMARY KEY (key, attempt)
);
