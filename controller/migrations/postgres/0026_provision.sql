-- Failover (issue 18): how far a broker has judged and reported a bundle's provision
-- (a timer as a row), and the shortfalls a marketplace cloud was told of, each once.
ALTER TABLE bundles ADD COLUMN reported_through_ms BIGINT;

CREATE TABLE tender_shortfalls (
    tender       TEXT NOT NULL,
    from_ms      BIGINT NOT NULL,
    until_ms     BIGINT NOT NULL,
    missing      BIGINT NOT NULL,
    reported_at_ms BIGINT NOT NULL,
    PRIMARY KEY (tender, from_ms, until_ms, missing)
);
