-- Private pools (issue 17): a pool owner's own market over capacity it holds.
-- `record` is the pool's settings (`PoolSettings` as JSON: policy, bidding method,
-- currency, cycle and notice periods, burst policy); `asking` is the Dutch clock's
-- price; `next_cycle_at_ms` and `requested_at_ms` are the cycle's timers, claimed by
-- a conditional update under the pool's lock so a cycle runs once however many
-- controllers poll.
CREATE TABLE pools (
    id                TEXT PRIMARY KEY,
    owner             TEXT NOT NULL,
    name              TEXT NOT NULL,
    record            TEXT NOT NULL,
    asking            BIGINT NOT NULL,
    next_cycle_at_ms  BIGINT NOT NULL,
    requested_at_ms   BIGINT,
    cycled_at_ms      BIGINT,
    created_at_ms     BIGINT NOT NULL,
    dissolved_at_ms   BIGINT
);
CREATE INDEX pools_due ON pools (next_cycle_at_ms);
CREATE INDEX pools_owner ON pools (owner);
-- The client accounts whose capacity a pool owner may put in its pools: granted by
-- the client account itself.
CREATE TABLE pool_accounts (
    owner          TEXT NOT NULL,
    account        TEXT NOT NULL,
    granted_at_ms  BIGINT NOT NULL,
    PRIMARY KEY (owner, account)
);
-- A pool's slots: a reservation (on-demand, long-term, spot) or an enrolled host of
-- one of the owner's accounts. The slot is the primary key: in one pool at a time.
-- `entity` is the pool owner whose slot it is (in a merged pool, each keeps its own).
-- `record` is what the slot is (`PoolSlot` as JSON: kind, size, platform, zone, term).
CREATE TABLE pool_slots (
    slot           TEXT PRIMARY KEY,
    pool           TEXT NOT NULL,
    entity         TEXT NOT NULL,
    host           TEXT NOT NULL,
    account        TEXT NOT NULL,
    record         TEXT NOT NULL,
    burst          BIGINT NOT NULL DEFAULT 0,
    added_at_ms    BIGINT NOT NULL,
    leaving_at_ms  BIGINT
);
CREATE INDEX pool_slots_pool ON pool_slots (pool);
CREATE INDEX pool_slots_host ON pool_slots (host);
-- Who may take part in a pool, and (in a merged pool) which entity's user each is.
CREATE TABLE pool_members (
    pool           TEXT NOT NULL,
    member         TEXT NOT NULL,
    entity         TEXT NOT NULL,
    name           TEXT NOT NULL,
    organisation   TEXT NOT NULL,
    added_at_ms    BIGINT NOT NULL,
    PRIMARY KEY (pool, member)
);
-- The entities of a merged pool (FIG. 14): each a pool owner, with the rights it
-- was given at the merge (`surplus_market::cohort::Right`s as JSON), how much of its
-- capacity its users lend and may borrow, when it joined (NULL: invited, not yet
-- joined) and when it leaves.
CREATE TABLE pool_entities (
    pool             TEXT NOT NULL,
    entity           TEXT NOT NULL,
    rights           TEXT NOT NULL,
    lending_limit    BIGINT,
    borrowing_limit  BIGINT,
    invited_at_ms    BIGINT NOT NULL,
    joined_at_ms     BIGINT,
    leaving_at_ms    BIGINT,
    PRIMARY KEY (pool, entity)
);
-- Members' requests (`surplus_market::pool::Request` as JSON); `why` is what the
-- last cycle decided of it (`pool::Why`, and the burst's reason, as JSON).
CREATE TABLE pool_requests (
    id               TEXT PRIMARY KEY,
    pool             TEXT NOT NULL,
    member           TEXT NOT NULL,
    record           TEXT NOT NULL,
    placed_at_ms     BIGINT NOT NULL,
    cancelled_at_ms  BIGINT,
    why              TEXT
);
CREATE INDEX pool_requests_pool ON pool_requests (pool, cancelled_at_ms);
-- Slots given to requests (`pool::Allocation`): a member holds the slot's host from
-- `from_ms` until `until_ms` (its notice's deadline or the slot's term end).
CREATE TABLE pool_allocations (
    id             TEXT PRIMARY KEY,
    pool           TEXT NOT NULL,
    request        TEXT NOT NULL,
    member         TEXT NOT NULL,
    slot           TEXT NOT NULL,
    host           TEXT NOT NULL,
    price          BIGINT NOT NULL,
    from_ms        BIGINT NOT NULL,
    until_ms       BIGINT,
    noticed        BIGINT NOT NULL DEFAULT 0,
    charged_to_ms  BIGINT NOT NULL,
    done           BIGINT NOT NULL DEFAULT 0
);
CREATE INDEX pool_allocations_pool ON pool_allocations (pool, done);
CREATE INDEX pool_allocations_host ON pool_allocations (host, member);
-- The billing records per user: each stretch of an allocation charged, with the
-- ledger posting (key `pool-charge:{allocation}:{to_ms}`) made in the same
-- transaction.
CREATE TABLE pool_charges (
    key        TEXT PRIMARY KEY,
    pool       TEXT NOT NULL,
    member     TEXT NOT NULL,
    request    TEXT NOT NULL,
    slot       TEXT NOT NULL,
    from_ms    BIGINT NOT NULL,
    to_ms      BIGINT NOT NULL,
    price      BIGINT NOT NULL,
    amount     BIGINT NOT NULL,
    currency   TEXT NOT NULL
);
CREATE INDEX pool_charges_pool ON pool_charges (pool, member);
-- Capacity a pool burst into: a reservation made on the owner's behalf (or one of
-- its own slots outside any pool), what it costs per hour, and what it was charged
-- to the burst budget.
CREATE TABLE pool_bursts (
    slot           TEXT PRIMARY KEY,
    pool           TEXT NOT NULL,
    request        TEXT NOT NULL,
    source         TEXT NOT NULL,
    price          BIGINT NOT NULL,
    started_at_ms  BIGINT NOT NULL,
    ended_at_ms    BIGINT
);
CREATE INDEX pool_bursts_pool ON pool_bursts (pool, started_at_ms);
