-- The instance as the client asked for it is the authority for its spec and price; a
-- host's answer that contradicts it is kept here for people (and never billed).
-- `started_at_ms`: when a host first reported it running (no upfront fee without it).
ALTER TABLE instances ADD COLUMN started_at_ms BIGINT;
ALTER TABLE instances ADD COLUMN contradiction TEXT;
UPDATE instances SET started_at_ms = created_at_ms WHERE state <> 'terminated' AND state <> 'pending';

-- The limits in force over time: each part of a billed period is rated with its own.
CREATE TABLE instance_limits (
    instance_id TEXT NOT NULL REFERENCES instances(id),
    from_ms     BIGINT NOT NULL,
    limits      TEXT NOT NULL,
    PRIMARY KEY (instance_id, from_ms)
);
INSERT INTO instance_limits (instance_id, from_ms, limits)
    SELECT id, created_at_ms, (record::json -> 'spec' -> 'limits')::text FROM instances;

-- When a billed period's usage was last rated: records received after it are late
-- usage, rated again (as adjustments) by the next run.
ALTER TABLE billing_runs ADD COLUMN checked_at_ms BIGINT;
UPDATE billing_runs SET checked_at_ms = ran_at_ms;

-- `charge` lines of a period's first posting, `adjustment` lines of late usage.
ALTER TABLE invoice_lines ADD COLUMN kind TEXT NOT NULL DEFAULT 'charge';
CREATE INDEX invoice_lines_instance ON invoice_lines (instance_id, from_ms, to_ms);
-- Late usage is found by when it was received: one range scan per billing run.
CREATE INDEX usage_received ON usage_records (received_at_ms, end_ms);
