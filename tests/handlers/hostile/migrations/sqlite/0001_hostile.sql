-- The only table of the hostile handler (end-to-end tests only): every run
-- inserts its event id here first, so a test can prove that nothing of a
-- hostile event committed.
CREATE TABLE hostile_notes (
    k TEXT NOT NULL PRIMARY KEY
);
