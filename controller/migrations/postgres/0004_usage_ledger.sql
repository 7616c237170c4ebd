-- Usage records from the agents' spools. The primary key is the record's idempotency
-- key: a record sent again is recognised and not counted twice. `delta` is what the
-- record adds to its counter (computed at ingest from the cursor below); gauges keep
-- last/peak/mean.
CREATE TABLE usage_records (
    agent_id       TEXT NOT NULL,
    epoch          BIGINT NOT NULL,
    seq            BIGINT NOT NULL,
    subject        TEXT NOT NULL,
    account        TEXT,
    meter          TEXT NOT NULL,
    start_ms       BIGINT NOT NULL,
    end_ms         BIGINT NOT NULL,
    kind           TEXT NOT NULL,
    generation     BIGINT,
    total          BIGINT,
    delta          BIGINT NOT NULL,
    last           BIGINT,
    peak           BIGINT,
    mean           BIGINT,
    samples        BIGINT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
);
CREATE INDEX usage_subject ON usage_records (subject, end_ms);
CREATE INDEX usage_agent ON usage_records (agent_id, end_ms);
CREATE INDEX usage_account ON usage_records (account, end_ms);

-- The last counter reading per agent, subject and meter: where the next delta starts.
CREATE TABLE usage_cursors (
    agent_id   TEXT NOT NULL,
    subject    TEXT NOT NULL,
    meter      TEXT NOT NULL,
    generation BIGINT NOT NULL,
    total      BIGINT NOT NULL,
    PRIMARY KEY (agent_id, subject, meter)
);

-- Records refused at ingest, kept with the reason (acknowledged, never counted).
CREATE TABLE usage_rejected (
    agent_id       TEXT NOT NULL,
    epoch          BIGINT NOT NULL,
    seq            BIGINT NOT NULL,
    reason         TEXT NOT NULL,
    record         TEXT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    PRIMARY KEY (agent_id, epoch, seq)
);

-- Per agent: sampling periods set through the API, and the spool as last reported.
CREATE TABLE metering (
    agent_id        TEXT PRIMARY KEY REFERENCES agents(id),
    periods         TEXT,
    spool           TEXT,
    updated_at_ms   BIGINT NOT NULL
);

-- Rate cards: the one a provider set for an agent, copied to each instance run there.
CREATE TABLE agent_price_plans (
    agent_id      TEXT PRIMARY KEY REFERENCES agents(id),
    plan          TEXT NOT NULL,
    updated_at_ms BIGINT NOT NULL
);
CREATE TABLE instance_price_plans (
    instance_id   TEXT PRIMARY KEY REFERENCES instances(id),
    plan          TEXT NOT NULL,
    attached_at_ms BIGINT NOT NULL
);

-- The double-entry ledger.
CREATE TABLE ledger_accounts (
    account        TEXT PRIMARY KEY,
    allow_negative BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
CREATE TABLE ledger_postings (
    key           TEXT PRIMARY KEY,
    digest        TEXT NOT NULL,
    kind          TEXT NOT NULL,
    memo          TEXT NOT NULL,
    posted_at_ms  BIGINT NOT NULL
);
CREATE TABLE ledger_entries (
    posting_key TEXT NOT NULL REFERENCES ledger_postings(key),
    account     TEXT NOT NULL,
    currency    TEXT NOT NULL,
    amount      BIGINT NOT NULL
);
CREATE INDEX ledger_entries_account ON ledger_entries (account, currency);
CREATE TABLE ledger_balances (
    account  TEXT NOT NULL,
    currency TEXT NOT NULL,
    balance  BIGINT NOT NULL,
    PRIMARY KEY (account, currency)
);

-- Invoice lines written with their posting in one transaction; an invoice is one
-- client's lines of one period.
CREATE TABLE invoice_lines (
    invoice_id   TEXT NOT NULL,
    client       TEXT NOT NULL,
    provider     TEXT NOT NULL,
    from_ms      BIGINT NOT NULL,
    to_ms        BIGINT NOT NULL,
    instance_id  TEXT NOT NULL,
    meter        TEXT NOT NULL,
    quantity     DOUBLE PRECISION NOT NULL,
    unit         TEXT NOT NULL,
    rate         BIGINT NOT NULL,
    amount       BIGINT NOT NULL,
    commission   BIGINT NOT NULL,
    currency     TEXT NOT NULL,
    posting_key  TEXT NOT NULL REFERENCES ledger_postings(key)
);
CREATE INDEX invoice_lines_invoice ON invoice_lines (invoice_id);
CREATE INDEX invoice_lines_provider ON invoice_lines (provider, from_ms);

-- Billing runs: a period is billed on one grid; overlapping periods are refused.
CREATE TABLE billing_runs (
    from_ms  BIGINT NOT NULL,
    to_ms    BIGINT NOT NULL,
    ran_at_ms BIGINT NOT NULL,
    PRIMARY KEY (from_ms, to_ms)
);
