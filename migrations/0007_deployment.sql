-- The prefix this database belongs to (issue "Isolation and authority"): one row, written by
-- the first daemon that starts on the database (under the migration lock); a daemon with
-- another prefix refuses to start. Created here, by `flowd migrate` / the schema's owner, so
-- a daemon role that may only read and write rows can still bind the database.

CREATE TABLE flowd_deployment (
    only_row boolean     PRIMARY KEY DEFAULT true CHECK (only_row),
    prefix   text        NOT NULL,
    bound_at timestamptz NOT NULL DEFAULT now()
);
