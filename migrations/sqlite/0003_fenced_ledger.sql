-- The fenced ledger: typed chunk kinds, a lease generation (fencing token) per claim,
-- failures retried across passes at a stored time, and the fragments each chunk holds.
-- SQLite cannot drop the old UNIQUE (stream, timestamp_source, start_ms), which a late
-- fragment inside an archived range must be free of: the table is rebuilt.
CREATE TABLE chunks_v3 (
    -- AUTOINCREMENT: an id is never reused, so a split chunk's parts never take the id of
    -- the chunk they replace.
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    stream              TEXT    NOT NULL,
    timestamp_source    TEXT    NOT NULL CHECK (timestamp_source IN ('server', 'producer')),
    -- GetClip range: starts of the first and last fragment (epoch ms, inclusive).
    start_ms            INTEGER NOT NULL,
    end_ms              INTEGER NOT NULL CHECK (end_ms >= start_ms),
    fragment_count      INTEGER NOT NULL CHECK (fragment_count >= 0),
    planned_bytes       INTEGER NOT NULL,
    planned_duration_ms INTEGER NOT NULL,
    first_fragment      TEXT    NOT NULL,
    last_fragment       TEXT    NOT NULL,
    object_key          TEXT    NOT NULL,
    -- clip: a GetClip range of its own; late: one GetClip-selectable fragment listed after
    -- its range was archived; mkv: fragments fetched by number (GetMediaForFragmentList).
    kind                TEXT    NOT NULL DEFAULT 'clip' CHECK (kind IN ('clip', 'late', 'mkv')),
    state               TEXT    NOT NULL DEFAULT 'planned'
                        CHECK (state IN ('planned', 'fetching', 'uploading', 'done', 'failed', 'expired')),
    attempts            INTEGER NOT NULL DEFAULT 0,
    last_error          TEXT,
    error_kind          TEXT,
    -- A failed chunk is claimed again from this time on (backoff across passes).
    next_attempt_ms     INTEGER,
    archived_bytes      INTEGER,
    -- CRC32C of the whole object as written (hex), for verify.
    archived_crc32c     TEXT,
    upload_id           TEXT,
    owner               TEXT,
    -- Fencing token: every claim increments it; a transition names the generation it holds.
    generation          INTEGER NOT NULL DEFAULT 0,
    lease_until_ms      INTEGER,
    -- 1 once chunk_fragments lists this chunk's fragments (chunks planned before this
    -- migration are known by their range only).
    fragments_known     INTEGER NOT NULL DEFAULT 0,
    created_ms          INTEGER NOT NULL,
    updated_ms          INTEGER NOT NULL
);

INSERT INTO chunks_v3 (id, stream, timestamp_source, start_ms, end_ms, fragment_count,
    planned_bytes, planned_duration_ms, first_fragment, last_fragment, object_key, state,
    attempts, last_error, error_kind, archived_bytes, upload_id, owner, lease_until_ms,
    created_ms, updated_ms)
SELECT id, stream, timestamp_source, start_ms, end_ms, fragment_count, planned_bytes,
    planned_duration_ms, first_fragment, last_fragment, object_key, state, attempts,
    last_error, error_kind, archived_bytes, upload_id, owner, lease_until_ms, created_ms,
    updated_ms
FROM chunks;

DROP TABLE chunks;
ALTER TABLE chunks_v3 RENAME TO chunks;
CREATE INDEX chunks_by_range ON chunks (stream, timestamp_source, end_ms);
CREATE INDEX chunks_by_start ON chunks (stream, timestamp_source, start_ms);
CREATE INDEX chunks_by_state ON chunks (state, stream);

-- Which chunk holds which fragment. The primary key makes "every fragment in at most one
-- object" a property of the database, whoever plans.
CREATE TABLE chunk_fragments (
    stream           TEXT    NOT NULL,
    timestamp_source TEXT    NOT NULL,
    fragment_number  TEXT    NOT NULL,
    start_ms         INTEGER NOT NULL,
    server_ms        INTEGER NOT NULL,
    duration_ms      INTEGER NOT NULL,
    size_bytes       INTEGER NOT NULL,
    chunk_id         INTEGER NOT NULL REFERENCES chunks (id) ON DELETE CASCADE,
    PRIMARY KEY (stream, timestamp_source, fragment_number)
);
CREATE INDEX chunk_fragments_by_start ON chunk_fragments (stream, timestamp_source, start_ms);
CREATE INDEX chunk_fragments_by_chunk ON chunk_fragments (chunk_id);
