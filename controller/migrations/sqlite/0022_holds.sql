-- Ledger holds (issue 16): the funds a prepaid client's bid that may win holds
-- (`surplus_market::ledger::hold_posting`, from `client:X` to `hold:X`), placed once
-- per key and given back once (`release_posting`) when the bid loses, is
-- cancelled, or its auction closes; both postings go through the ledger's rule in
-- the step's own transaction.
CREATE TABLE holds (
    key             TEXT PRIMARY KEY,
    client          TEXT NOT NULL,
    currency        TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    held_at_ms      BIGINT NOT NULL,
    released_at_ms  BIGINT
);
