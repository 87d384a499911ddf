-- The claim's query: the next claimable chunk of a stream, by start. Without it the
-- claim walks every done chunk of the stream before the first planned one (4 ms with
-- 10,000 chunks a stream; benches/ledger_claims.rs).
CREATE INDEX chunks_claimable ON chunks (stream, timestamp_source, start_ms, id)
    WHERE state IN ('planned', 'failed');
