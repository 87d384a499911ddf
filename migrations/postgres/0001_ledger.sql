-- The ledger in PostgreSQL: the same tables as the SQLite ledger's migrations end with,
-- written for several instances on several hosts. Overlap and double holding are
-- excluded by constraints, not by a check-then-insert.
CREATE EXTENSION IF NOT EXISTS btree_gist;

CREATE TABLE chunks (
    id                  BIGINT  GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream              TEXT    NOT NULL,
    timestamp_source    TEXT    NOT NULL CHECK (timestamp_source IN ('server', 'producer')),
    -- GetClip range: starts of the first and last fragment (epoch ms, inclusive).
    start_ms            BIGINT  NOT NULL,
    end_ms              BIGINT  NOT NULL CHECK (end_ms >= start_ms),
    fragment_count      BIGINT  NOT NULL CHECK (fragment_count >= 0),
    planned_bytes       BIGINT  NOT NULL,
    planned_duration_ms BIGINT  NOT NULL,
    first_fragment      TEXT    NOT NULL,
    last_fragment       TEXT    NOT NULL,
    object_key          TEXT    NOT NULL,
    kind                TEXT    NOT NULL DEFAULT 'clip' CHECK (kind IN ('clip', 'late', 'mkv')),
    state               TEXT    NOT NULL DEFAULT 'planned'
                        CHECK (state IN ('planned', 'fetching', 'uploading', 'done', 'failed', 'expired')),
    attempts            BIGINT  NOT NULL DEFAULT 0,
    last_error          TEXT,
    error_kind          TEXT,
    next_attempt_ms     BIGINT,
    archived_bytes      BIGINT,
    archived_crc32c     TEXT,
    upload_id           TEXT,
    -- The process holding the claim (instance@host:pid:nonce).
    owner               TEXT,
    -- Fencing token: every claim increments it; a transition names the generation it holds.
    generation          BIGINT  NOT NULL DEFAULT 0,
    lease_until_ms      BIGINT,
    -- The process that archived the chunk (its owner at mark_done).
    archived_by         TEXT,
    fragments_known     BIGINT  NOT NULL DEFAULT 1,
    created_ms          BIGINT  NOT NULL,
    updated_ms          BIGINT  NOT NULL,
    -- Two clip chunks of a stream never share an instant of their GetClip ranges
    -- ([start, max(end, start + 1)], as GetClip selects): whoever plans, concurrently or
    -- not, the database refuses the second.
    CONSTRAINT clip_ranges_never_overlap EXCLUDE USING gist (
        stream WITH =,
        timestamp_source WITH =,
        int8range(start_ms, GREATEST(end_ms, start_ms + 1), '[]') WITH &&
    ) WHERE (kind = 'clip')
);
CREATE INDEX chunks_by_range ON chunks (stream, timestamp_source, end_ms);
CREATE INDEX chunks_by_start ON chunks (stream, timestamp_source, start_ms);
-- The claim's query: the next claimable chunk of a stream, by start.
CREATE INDEX chunks_claimable ON chunks (stream, timestamp_source, start_ms, id)
    WHERE state IN ('planned', 'failed');
CREATE INDEX chunks_in_flight ON chunks (lease_until_ms) WHERE state IN ('fetching', 'uploading');
CREATE INDEX chunks_by_owner ON chunks (owner) WHERE owner IS NOT NULL;
CREATE INDEX chunks_by_stream_state ON chunks (stream, state);

-- Which chunk holds which fragment: the primary key keeps every fragment in at most one
-- object, whoever plans.
CREATE TABLE chunk_fragments (
    stream           TEXT    NOT NULL,
    timestamp_source TEXT    NOT NULL,
    fragment_number  TEXT    NOT NULL,
    start_ms         BIGINT  NOT NULL,
    server_ms        BIGINT  NOT NULL,
    duration_ms      BIGINT  NOT NULL,
    size_bytes       BIGINT  NOT NULL,
    chunk_id         BIGINT  NOT NULL REFERENCES chunks (id) ON DELETE CASCADE,
    PRIMARY KEY (stream, timestamp_source, fragment_number)
);
CREATE INDEX chunk_fragments_by_start ON chunk_fragments (stream, timestamp_source, start_ms);
CREATE INDEX chunk_fragments_by_chunk ON chunk_fragments (chunk_id);

CREATE TABLE stream_progress (
    stream              TEXT    NOT NULL,
    timestamp_source    TEXT    NOT NULL,
    planned_through_ms  BIGINT,
    retention_ms        BIGINT,
    next_run_ms         BIGINT,
    last_run_ms         BIGINT,
    last_run_error      TEXT,
    PRIMARY KEY (stream, timestamp_source)
);

-- One row per working process; last_seen_ms is its heartbeat.
CREATE TABLE instances (
    owner        TEXT    PRIMARY KEY,
    instance     TEXT    NOT NULL,
    role         TEXT    NOT NULL,
    host         TEXT    NOT NULL,
    pid          BIGINT  NOT NULL,
    started_ms   BIGINT  NOT NULL,
    last_seen_ms BIGINT  NOT NULL
);
CREATE INDEX instances_by_instance ON instances (instance, last_seen_ms);

-- One process works a stream at a time: KVS's per-stream quotas hold across instances.
CREATE TABLE stream_leases (
    stream           TEXT    NOT NULL,
    timestamp_source TEXT    NOT NULL,
    owner            TEXT,
    instance         TEXT,
    role             TEXT,
    acquired_ms      BIGINT,
    lease_until_ms   BIGINT,
    generation       BIGINT  NOT NULL DEFAULT 0,
    PRIMARY KEY (stream, timestamp_source)
);
CREATE INDEX stream_leases_by_owner ON stream_leases (owner);
