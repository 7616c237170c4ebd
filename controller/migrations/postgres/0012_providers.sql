-- Providers of capacity (their profile, zones and place on the accepted list) and
-- their business agreements with the marketplace (issue 15). The records are the
-- market crate's types as JSON; the columns beside them are what queries select on.
CREATE TABLE providers (
    account        TEXT PRIMARY KEY,
    record         TEXT NOT NULL,
    accepted       BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE TABLE agreements (
    id             TEXT PRIMARY KEY,
    provider       TEXT NOT NULL REFERENCES providers(account),
    record         TEXT NOT NULL,
    valid_from_ms  BIGINT NOT NULL,
    valid_until_ms BIGINT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX agreements_provider ON agreements (provider, valid_until_ms);
