-- The marketplace's settings that admins change at run time (issue 15: the supported
-- platforms, the size categories), each a JSON document under its key.
CREATE TABLE settings (
    key            TEXT PRIMARY KEY,
    value          TEXT NOT NULL,
    updated_at_ms  BIGINT NOT NULL
);
