-- Several processes on one ledger: who is alive, and who works which stream.

-- One row per process that opened the ledger to work (owner: instance@host:pid:nonce).
-- last_seen_ms is its heartbeat; a process that stopped cleanly removes its row.
CREATE TABLE instances (
    owner        TEXT    PRIMARY KEY,
    instance     TEXT    NOT NULL,
    -- daemon (run), once (run --once), backfill, verify
    role         TEXT    NOT NULL,
    host         TEXT    NOT NULL,
    pid          INTEGER NOT NULL,
    started_ms   INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL
);
CREATE INDEX instances_by_instance ON instances (instance, last_seen_ms);

-- One process works a stream at a time, so KVS's per-stream quotas hold across
-- processes. The lease is renewed by its holder's heartbeat and lapses when it dies.
CREATE TABLE stream_leases (
    stream           TEXT    NOT NULL,
    timestamp_source TEXT    NOT NULL,
    owner            TEXT,
    instance         TEXT,
    role             TEXT,
    acquired_ms      INTEGER,
    lease_until_ms   INTEGER,
    -- Every acquisition increments it.
    generation       INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (stream, timestamp_source)
);
CREATE INDEX stream_leases_by_owner ON stream_leases (owner);
CREATE INDEX chunks_by_owner ON chunks (owner) WHERE owner IS NOT NULL;

-- Which process archived a chunk (its owner at mark_done), for status per instance.
ALTER TABLE chunks ADD COLUMN archived_by TEXT;
