-- How each host isolates client instances, as its agent announced with its last hello
-- (JSON of `surplus_protocol::control::Isolation`; NULL before the first session).
ALTER TABLE agents ADD COLUMN isolation TEXT;
