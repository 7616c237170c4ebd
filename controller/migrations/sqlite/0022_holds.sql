-- Ledger holds (issue 16): the funds a prepaid client's bid that may win holds
-- (`surplus_market::ledger::hold_posting`, from `client:X` to `hold:X`), placed once
-- per key and given back once (`release_posting`): a spot bid's when it wins hosts
-- (billed as used) or is cancelled, an auction bid's when it is outbid or replaced
-- or the auction closes; both postings go through the ledger's rule in the step's
-- own transaction.
CREATE TABLE holds (
    key             TEXT PRIMARY KEY,
    client          TEXT NOT NULL,
    currency        TEXT NOT NULL,
    amount          BIGINT NOT NULL,
    held_at_ms      BIGINT NOT NULL,
    released_at_ms  BIGINT
);
