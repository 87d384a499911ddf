-- What the daemon knows per stream between runs.
CREATE TABLE stream_progress (
    stream              TEXT    NOT NULL,
    timestamp_source    TEXT    NOT NULL,
    -- Fragments starting up to here (epoch ms) have been planned into chunks: the next
    -- run lists only what came after.
    planned_through_ms  INTEGER,
    -- The stream's retention as last described, for status and the at-risk check.
    retention_ms        INTEGER,
    next_run_ms         INTEGER,
    last_run_ms         INTEGER,
    last_run_error      TEXT,
    PRIMARY KEY (stream, timestamp_source)
);
