-- A reservation step reads the part of a listing's book not recorded as ended
-- (`read_live_book`): indexed, so the step's cost does not grow with history.
CREATE INDEX reservations_live ON reservations (listing, ended);
