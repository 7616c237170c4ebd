-- Availability (issue 18, [0063]): the daily windows (UTC) in which a subscriber's
-- unused capacity may be contributed, JSON; empty: at any time.
ALTER TABLE subscriptions ADD COLUMN availability TEXT NOT NULL DEFAULT '[]';
