-- Interruptions (issue 16, C6 and A8): a reservation's notice of interruption, its
-- cause and grace (`surplus_market::interrupt::Notice`), due at `deadline_ms`, when
-- the market's tick ends the reservation, once (`done`, set by a conditional update
-- under the listing's lock).
CREATE TABLE interruptions (
    reservation  TEXT PRIMARY KEY,
    listing      TEXT NOT NULL,
    host         TEXT NOT NULL,
    record       TEXT NOT NULL,
    deadline_ms  BIGINT NOT NULL,
    done         BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX interruptions_due ON interruptions (done, deadline_ms);
