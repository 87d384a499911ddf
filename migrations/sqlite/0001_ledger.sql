-- The ledger of archived media: one row per chunk (one GetClip, one object).
-- Append-only migrations: change the schema in a new file, never here.
CREATE TABLE chunks (
    id                  INTEGER PRIMARY KEY,
    stream              TEXT    NOT NULL,
    timestamp_source    TEXT    NOT NULL CHECK (timestamp_source IN ('server', 'producer')),
    -- GetClip range: starts of the first and last fragment (epoch ms, inclusive).
    start_ms            INTEGER NOT NULL,
    end_ms              INTEGER NOT NULL CHECK (end_ms >= start_ms),
    fragment_count      INTEGER NOT NULL CHECK (fragment_count > 0),
    planned_bytes       INTEGER NOT NULL,
    planned_duration_ms INTEGER NOT NULL,
    -- Fragment numbers are up to 128 decimal digits: text.
    first_fragment      TEXT    NOT NULL,
    last_fragment       TEXT    NOT NULL,
    object_key          TEXT    NOT NULL,
    state               TEXT    NOT NULL DEFAULT 'planned'
                        CHECK (state IN ('planned', 'fetching', 'uploading', 'done', 'failed', 'expired')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    error_kind          TEXT,
    -- Permanent failures are not retried until the operator asks (status shows them).
    retryable           INTEGER NOT NULL DEFAULT 1,
    archived_bytes      INTEGER,
    -- The multipart upload in progress, so a restart can abort it.
    upload_id           TEXT,
    -- Who works on the chunk: host:pid, and until when the claim holds.
    owner               TEXT,
    lease_until_ms      INTEGER,
    created_ms          INTEGER NOT NULL,
    updated_ms          INTEGER NOT NULL,
    UNIQUE (stream, timestamp_source, start_ms)
);

CREATE INDEX chunks_by_range ON chunks (stream, timestamp_source, end_ms);
CREATE INDEX chunks_by_state ON chunks (state, stream);
