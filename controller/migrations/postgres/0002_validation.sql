-- Validation runs (benchmarks and security checks) ordered on agents, kept as history.

CREATE TABLE validation_runs (
    id               TEXT PRIMARY KEY,
    agent_id         TEXT NOT NULL REFERENCES agents (id),
    requested_by     TEXT NOT NULL,
    requested_at_ms  BIGINT NOT NULL,
    request          TEXT NOT NULL,
    status           TEXT NOT NULL,
    finished_at_ms   BIGINT,
    agent_version    TEXT,
    bench            TEXT,
    security         TEXT,
    error            TEXT
);
CREATE INDEX validation_runs_agent ON validation_runs (agent_id, requested_at_ms);
