-- Owners are principals, (role, account), as everywhere else: a provider or pool
-- owner token named like a client must not act on that client's instances or volumes.
-- Rows made before this migration were made by clients (or admins, who may act on
-- everything anyway).
ALTER TABLE instances ADD COLUMN owner_role TEXT NOT NULL DEFAULT 'client';
ALTER TABLE volumes ADD COLUMN owner_role TEXT NOT NULL DEFAULT 'client';

-- A client token is unique per owner, not per account name.
DROP INDEX instances_client_token;
CREATE UNIQUE INDEX instances_client_token ON instances (owner_role, account, client_token) WHERE client_token IS NOT NULL;
DROP INDEX instances_account;
CREATE INDEX instances_owner ON instances (owner_role, account);
CREATE INDEX volumes_owner ON volumes (owner_role, account);
