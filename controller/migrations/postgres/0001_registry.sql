-- Registry, enrollment and API tokens. The same tables as migrations/sqlite, column for
-- column (a test compares them): TEXT ids as UUIDv7, BIGINT milliseconds and counts
-- (sqlx reads i64 from BIGINT only), JSON as TEXT.

CREATE TABLE agents (
    id                   TEXT PRIMARY KEY,
    hostname             TEXT NOT NULL,
    labels               TEXT NOT NULL,
    status               TEXT NOT NULL,
    cert_serial          TEXT NOT NULL,
    cert_not_after_ms    BIGINT NOT NULL,
    agent_version        TEXT NOT NULL,
    enrolled_at_ms       BIGINT NOT NULL,
    first_seen_ms        BIGINT,
    last_seen_ms         BIGINT,
    online_since_ms      BIGINT,
    online_total_ms      BIGINT NOT NULL DEFAULT 0,
    revoked_at_ms        BIGINT,
    inventory            TEXT,
    inventory_digest     TEXT,
    inventory_updated_ms BIGINT,
    join_token_id        TEXT NOT NULL
);

CREATE TABLE certificates (
    serial        TEXT PRIMARY KEY,
    agent_id      TEXT NOT NULL REFERENCES agents (id),
    issued_at_ms  BIGINT NOT NULL,
    not_after_ms  BIGINT NOT NULL
);
CREATE INDEX certificates_agent ON certificates (agent_id, issued_at_ms);

CREATE TABLE inventory_history (
    id              TEXT PRIMARY KEY,
    agent_id        TEXT NOT NULL REFERENCES agents (id),
    recorded_at_ms  BIGINT NOT NULL,
    digest          TEXT NOT NULL,
    inventory       TEXT NOT NULL
);
CREATE INDEX inventory_history_agent ON inventory_history (agent_id, recorded_at_ms);

CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL REFERENCES agents (id),
    remote_addr    TEXT NOT NULL,
    agent_version  TEXT NOT NULL,
    started_at_ms  BIGINT NOT NULL,
    ended_at_ms    BIGINT,
    end_reason     TEXT
);
CREATE INDEX sessions_agent ON sessions (agent_id, started_at_ms);

CREATE TABLE join_tokens (
    id              TEXT PRIMARY KEY,
    secret_hash     TEXT NOT NULL UNIQUE,
    labels          TEXT NOT NULL,
    created_at_ms   BIGINT NOT NULL,
    expires_at_ms   BIGINT NOT NULL,
    created_by      TEXT NOT NULL,
    used_at_ms      BIGINT,
    used_by_agent   TEXT
);

CREATE TABLE api_tokens (
    id             TEXT PRIMARY KEY,
    token_hash     TEXT NOT NULL UNIQUE,
    account        TEXT NOT NULL,
    role           TEXT NOT NULL,
    label          TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    revoked_at_ms  BIGINT
);
