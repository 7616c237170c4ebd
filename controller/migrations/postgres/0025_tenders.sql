-- Tenders (issue 18, C10): the bundles this controller placed with marketplace clouds
-- as their broker, and every tender it sent or answered.
-- `contributors`: JSON, each contributor (a subscription's user) to the account its
-- share is paid to. `settled_at_ms`: when the accepted tenders were paid out (a timer
-- as a row: due once `until_ms` has passed).
CREATE TABLE bundles (
    id             TEXT PRIMARY KEY,
    resource       TEXT NOT NULL,
    amount         BIGINT NOT NULL,
    from_ms        BIGINT NOT NULL,
    until_ms       BIGINT NOT NULL,
    price          BIGINT NOT NULL,
    currency       TEXT NOT NULL,
    arrangement    TEXT NOT NULL,
    contributors   TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    settled_at_ms  BIGINT
);
CREATE INDEX bundles_due ON bundles (until_ms) WHERE settled_at_ms IS NULL;

-- `direction`: `out` (this controller tendered, as broker) or `in` (it answered, as
-- marketplace cloud). `state`: `sent` until answered, then `accepted`, `part`,
-- `rejected`, or `unanswered` (the link was down or the answer did not come) or
-- `invalid` (the answer broke the tender's terms; `reason` says how).
CREATE TABLE tenders (
    id               TEXT PRIMARY KEY,
    direction        TEXT NOT NULL,
    bundle           TEXT,
    peer             TEXT NOT NULL,
    offer            TEXT NOT NULL,
    state            TEXT NOT NULL,
    accepted_amount  BIGINT NOT NULL,
    price            BIGINT NOT NULL,
    reason           TEXT,
    created_at_ms    BIGINT NOT NULL,
    answered_at_ms   BIGINT
);
CREATE INDEX tenders_bundle ON tenders (bundle);
CREATE INDEX tenders_created ON tenders (created_at_ms);
