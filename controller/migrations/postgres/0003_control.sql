-- Instances and volumes run through the primary control interface: which agent hosts
-- each, which account owns it, and the last record the agent returned (JSON), so that
-- commands are routed and authorised here and descriptions survive an offline agent.
CREATE TABLE instances (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    account        TEXT NOT NULL,
    client_token   TEXT,
    request_hash   TEXT NOT NULL,
    state          TEXT NOT NULL,
    record         TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE UNIQUE INDEX instances_client_token ON instances (account, client_token) WHERE client_token IS NOT NULL;
CREATE INDEX instances_agent ON instances (agent_id);
CREATE INDEX instances_account ON instances (account);

CREATE TABLE volumes (
    id             TEXT PRIMARY KEY,
    agent_id       TEXT NOT NULL REFERENCES agents(id),
    account        TEXT NOT NULL,
    state          TEXT NOT NULL,
    record         TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE INDEX volumes_agent ON volumes (agent_id);

-- The latest compatibility kit results of each agent's driver.
CREATE TABLE compat_reports (
    agent_id       TEXT PRIMARY KEY REFERENCES agents(id),
    driver         TEXT NOT NULL,
    level          TEXT NOT NULL,
    report         TEXT NOT NULL,
    reported_at_ms BIGINT NOT NULL
);
