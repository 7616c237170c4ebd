-- Federation (issue 18, C12): invitations this controller printed, its peers (each
-- with the CA pinned at peering), what it shares with a broker, and the usage rows
-- exchanged, numbered per peer so that each counts exactly once.
CREATE TABLE peer_invites (
    secret_hash    TEXT PRIMARY KEY,
    role           TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    expires_at_ms  BIGINT NOT NULL,
    used_at_ms     BIGINT,
    peer_id        TEXT
);

-- `role`: what the peer is to this controller; `our_role`: what this controller is to
-- it (a joiner is the inviter's host cloud or marketplace cloud; the inviter is its
-- broker). `dials`: this side keeps the link up. A removed peer stays removed: it
-- cannot join again under its id.
-- `out_seq`/`acked_seq`: the last usage row made for the peer and the last it
-- acknowledged; `in_seq`: the last row received from it.
CREATE TABLE peers (
    id             TEXT PRIMARY KEY,
    name           TEXT NOT NULL,
    role           TEXT NOT NULL,
    our_role       TEXT NOT NULL,
    ca_pem         TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    addresses      TEXT NOT NULL,
    server_name    TEXT NOT NULL,
    dials          BIGINT NOT NULL,
    joined_at_ms   BIGINT NOT NULL,
    removed_at_ms  BIGINT,
    last_seen_ms   BIGINT,
    out_seq        BIGINT NOT NULL DEFAULT 0,
    acked_seq      BIGINT NOT NULL DEFAULT 0,
    in_seq         BIGINT NOT NULL DEFAULT 0
);

-- An account of this controller whose usage goes to a broker peer, known there as
-- `user_name`; minutes before `through_ms` are exported.
CREATE TABLE peer_shares (
    peer_id        TEXT NOT NULL,
    account        TEXT NOT NULL,
    user_name      TEXT NOT NULL,
    through_ms     BIGINT NOT NULL,
    PRIMARY KEY (peer_id, account)
);

CREATE TABLE peer_usage_out (
    peer_id        TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    user_name      TEXT NOT NULL,
    resource       TEXT NOT NULL,
    minute_ms      BIGINT NOT NULL,
    unit_ms        BIGINT NOT NULL,
    PRIMARY KEY (peer_id, seq)
);

CREATE TABLE peer_usage_in (
    peer_id        TEXT NOT NULL,
    seq            BIGINT NOT NULL,
    user_name      TEXT NOT NULL,
    resource       TEXT NOT NULL,
    minute_ms      BIGINT NOT NULL,
    unit_ms        BIGINT NOT NULL,
    received_at_ms BIGINT NOT NULL,
    PRIMARY KEY (peer_id, seq)
);
CREATE INDEX peer_usage_in_minute ON peer_usage_in (minute_ms);

-- Usage by the start of its sampling period: a window of the margins, and a share's
-- export, read only what they need.
CREATE INDEX usage_start ON usage_records (start_ms);

-- Brokerage (issue 18): subscribers' short-term limits per user, resource and period,
-- with the overage rate, and who is billed for the netted over-consumption.
CREATE TABLE subscriptions (
    user_name      TEXT NOT NULL,
    resource       TEXT NOT NULL,
    period_ms      BIGINT NOT NULL,
    limit_units    BIGINT NOT NULL,
    overage_rate   BIGINT NOT NULL,
    administrator  TEXT NOT NULL,
    currency       TEXT NOT NULL,
    created_at_ms  BIGINT NOT NULL,
    updated_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (user_name, resource)
);
