-- Snapshots of volumes as their agents reported them when they were taken, so that a
-- volume's snapshots can be listed beside it.
CREATE TABLE snapshots (
    id             TEXT PRIMARY KEY,
    volume_id      TEXT NOT NULL,
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    record         TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL
);
CREATE INDEX snapshots_volume ON snapshots (volume_id);
