//! The ledger in PostgreSQL: several instances on several hosts share one fleet. The
//! only module with SQL for it.
//!
//! Correctness rests on the database alone, never on a host: claims are conditional
//! updates (`FOR UPDATE SKIP LOCKED` for the next chunk) that increment the fencing
//! generation; clip ranges are kept apart by an exclusion constraint and fragments by a
//! primary key; a process that dies loses its leases when they lapse.

use super::{
    Archived, Chunk, ChunkState, Failure, FailureView, HeldChunk, Identity, InstanceView, Lease,
    Ledger, RangeSummary, Registration, Role, StreamClaim, StreamHolder, StreamProgress,
    StreamStatus,
};
use crate::domain::{ChunkKind, ChunkPlan, EpochMs, Fragment, TimestampSource};
use crate::error::{Error, Result};
use crate::plan::Holdings;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgRow};
use sqlx::{PgPool, Row};
use std::str::FromStr;
use std::time::Duration;

/// A request waits this long for a connection: a database that is away fails the
/// request (and the pass) quickly with a clear error instead of hanging.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);

const CHUNK_COLUMNS: &str = "id, stream, timestamp_source, start_ms, end_ms, fragment_count,
    planned_bytes, planned_duration_ms, first_fragment, last_fragment, object_key, kind, state,
    attempts, last_error, error_kind, next_attempt_ms, archived_bytes, archived_crc32c,
    upload_id, owner, generation, lease_until_ms";

/// The condition every fenced transition carries: `$1` id, `$2` owner, `$3` generation.
const HELD: &str =
    "id = $1 AND owner = $2 AND generation = $3 AND state IN ('fetching', 'uploading')";

type Update<'q> = sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>;

pub struct PgLedger {
    pool: PgPool,
    identity: Identity,
}

fn now_ms() -> EpochMs {
    chrono::Utc::now().timestamp_millis()
}

super::row_decoders!(PgRow);

/// The claim of the next chunk: `$1` owner, `$2` lease end, `$3` now, `$4` stream, `$5`
/// timestamp source, `$6`..`$7` range, `$8` ids to skip.
fn claim_next_sql() -> String {
    // SKIP LOCKED: a row another claimer is taking is passed over, not waited for;
    // FOR UPDATE re-checks the condition on the row it locks.
    format!(
        "UPDATE chunks SET state = 'fetching', attempts = attempts + 1, owner = $1,
             generation = generation + 1, lease_until_ms = $2, updated_ms = $3
         WHERE id = (
             SELECT id FROM chunks
             WHERE stream = $4 AND timestamp_source = $5 AND end_ms >= $6 AND start_ms <= $7
               AND (state = 'planned' OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= $3))
               AND id <> ALL($8)
             ORDER BY start_ms, id LIMIT 1
             FOR UPDATE SKIP LOCKED)
         RETURNING {CHUNK_COLUMNS}"
    )
}

/// The planner's reads: fragments held, then clip ranges, in `[$3, $4]` of `$1`/`$2`.
const HELD_FRAGMENTS_SQL: &str = "SELECT fragment_number FROM chunk_fragments
     WHERE stream = $1 AND timestamp_source = $2 AND start_ms >= $3 AND start_ms <= $4";
const CLIP_RANGES_SQL: &str = "SELECT start_ms, GREATEST(end_ms, start_ms + 1) AS clip_end, state
     FROM chunks WHERE stream = $1 AND timestamp_source = $2 AND kind = 'clip'
       AND end_ms >= $3 - 1 AND start_ms <= $4 ORDER BY start_ms";

fn fenced(done: sqlx::postgres::PgQueryResult, lease: &Lease) -> Result<()> {
    if done.rows_affected() == 1 {
        Ok(())
    } else {
        Err(Error::LeaseLost {
            chunk: lease.chunk,
            generation: lease.generation,
        })
    }
}

/// A second clip chunk over the same instants (the exclusion constraint) or a fragment
/// another chunk holds (the primary key).
fn is_overlap(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(db)
        if db.is_unique_violation() || db.code().as_deref() == Some("23P01"))
}

impl PgLedger {
    /// Connects and applies the migrations (sqlx serializes concurrent migrators with an
    /// advisory lock, so instances may start together).
    pub async fn open(database_url: &str, identity: Identity) -> Result<PgLedger> {
        let unreachable = |source| Error::LedgerUnreachable {
            url: crate::config::redact_url(database_url),
            source,
        };
        let options = PgConnectOptions::from_str(database_url)
            .map_err(|e| {
                Error::Usage(format!(
                    "state.database_url {}: not a PostgreSQL URL ({e}); write it like postgres://archiver:PASSWORD@db.example:5432/kvs_archiver",
                    crate::config::redact_url(database_url)
                ))
            })?
            .application_name("kvs-archiver");
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(ACQUIRE_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(unreachable)?;
        super::migrations::postgres().await?.run(&pool).await?;
        Ok(PgLedger { pool, identity })
    }

    /// Inserts fragments of a chunk in one statement.
    async fn insert_fragments(
        tx: &mut sqlx::PgConnection,
        stream: &str,
        source: &str,
        chunk: i64,
        fragments: &[Fragment],
        or_skip: bool,
    ) -> Result<u64, sqlx::Error> {
        if fragments.is_empty() {
            return Ok(0);
        }
        let sql = format!(
            "INSERT INTO chunk_fragments (stream, timestamp_source, fragment_number, start_ms,
                 server_ms, duration_ms, size_bytes, chunk_id)
             SELECT $1, $2, f.number, f.start_ms, f.server_ms, f.duration_ms, f.size_bytes, $8
             FROM UNNEST($3::TEXT[], $4::BIGINT[], $5::BIGINT[], $6::BIGINT[], $7::BIGINT[])
                 AS f (number, start_ms, server_ms, duration_ms, size_bytes)
             {}",
            if or_skip {
                "ON CONFLICT DO NOTHING"
            } else {
                ""
            }
        );
        let done = sqlx::query(&sql)
            .bind(stream)
            .bind(source)
            .bind(
                fragments
                    .iter()
                    .map(|f| f.number.clone())
                    .collect::<Vec<_>>(),
            )
            .bind(fragments.iter().map(|f| f.start_ms).collect::<Vec<_>>())
            .bind(fragments.iter().map(|f| f.server_ms).collect::<Vec<_>>())
            .bind(
                fragments
                    .iter()
                    .map(|f| f.duration_ms as i64)
                    .collect::<Vec<_>>(),
            )
            .bind(
                fragments
                    .iter()
                    .map(|f| f.size_bytes as i64)
                    .collect::<Vec<_>>(),
            )
            .bind(chunk)
            .execute(&mut *tx)
            .await?;
        Ok(done.rows_affected())
    }

    /// Inserts a chunk row (and its fragments) inside `tx`; `Ok(None)` if the database
    /// refuses it as overlapping a clip chunk or holding a held fragment. The transaction
    /// is then unusable: the caller rolls it back.
    async fn insert_chunk(
        tx: &mut sqlx::PgConnection,
        stream: &str,
        source: &str,
        plan: &ChunkPlan,
        object_key: &str,
        expired: Option<&str>,
    ) -> Result<Option<i64>, sqlx::Error> {
        let now = now_ms();
        let inserted = sqlx::query_scalar(
            "INSERT INTO chunks (stream, timestamp_source, start_ms, end_ms, fragment_count,
                 planned_bytes, planned_duration_ms, first_fragment, last_fragment, object_key,
                 kind, state, last_error, error_kind, fragments_known, created_ms, updated_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,
                 CASE WHEN $13::TEXT IS NULL THEN 'planned' ELSE 'expired' END,
                 $13, CASE WHEN $13::TEXT IS NULL THEN NULL ELSE 'expired' END, $14, $12, $12)
             RETURNING id",
        )
        .bind(stream)
        .bind(source)
        .bind(plan.start_ms)
        .bind(plan.end_ms)
        .bind(i64::from(plan.fragment_count))
        .bind(plan.bytes as i64)
        .bind(plan.duration_ms as i64)
        .bind(&plan.first_fragment)
        .bind(&plan.last_fragment)
        .bind(object_key)
        .bind(plan.kind.as_str())
        .bind(now)
        .bind(expired)
        .bind(i64::from(!plan.fragments.is_empty()))
        .fetch_one(&mut *tx)
        .await;
        let id: i64 = match inserted {
            Ok(id) => id,
            Err(e) if is_overlap(&e) => return Ok(None),
            Err(e) => return Err(e),
        };
        match Self::insert_fragments(tx, stream, source, id, &plan.fragments, false).await {
            Ok(_) => Ok(Some(id)),
            Err(e) if is_overlap(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// One fenced transition: `UPDATE chunks SET {set}, updated_ms = $4 WHERE` the lease
    /// holds; `bind` adds the parameters from `$5` on.
    async fn transition(
        &self,
        op: &'static str,
        set: &str,
        lease: &Lease,
        bind: impl for<'q> FnOnce(Update<'q>) -> Update<'q>,
    ) -> Result<()> {
        let sql = format!("UPDATE chunks SET {set}, updated_ms = $4 WHERE {HELD}");
        let query = sqlx::query(&sql)
            .bind(lease.chunk)
            .bind(self.identity.owner.as_str())
            .bind(lease.generation)
            .bind(now_ms());
        let done = bind(query)
            .execute(&self.pool)
            .await
            .map_err(Error::store(op))?;
        fenced(done, lease)
    }

    /// Inside `tx`: checks the lease holds, locking the row until the transaction ends,
    /// and returns the chunk's stream and timestamp source.
    async fn hold_in(
        &self,
        tx: &mut sqlx::PgConnection,
        op: &'static str,
        lease: &Lease,
    ) -> Result<(String, String)> {
        let row = sqlx::query(&format!(
            "UPDATE chunks SET updated_ms = $4 WHERE {HELD} RETURNING stream, timestamp_source"
        ))
        .bind(lease.chunk)
        .bind(&self.identity.owner)
        .bind(lease.generation)
        .bind(now_ms())
        .fetch_optional(&mut *tx)
        .await
        .map_err(Error::store(op))?;
        match row {
            Some(row) => Ok((row.get("stream"), row.get("timestamp_source"))),
            None => Err(Error::LeaseLost {
                chunk: lease.chunk,
                generation: lease.generation,
            }),
        }
    }

    /// Chunks of `stream`/`source` reaching into `[$3, $4]` that meet `condition`.
    async fn chunks_in(
        &self,
        op: &'static str,
        condition: &str,
        stream: &str,
        source: TimestampSource,
        (from, to): (EpochMs, EpochMs),
        now: Option<EpochMs>,
    ) -> Result<Vec<Chunk>> {
        let sql = format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks
             WHERE stream = $1 AND timestamp_source = $2 AND end_ms >= $3 AND start_ms <= $4
               AND {condition}
             ORDER BY start_ms, id"
        );
        let mut query = sqlx::query(&sql)
            .bind(stream)
            .bind(source.as_str())
            .bind(from)
            .bind(to);
        if let Some(now) = now {
            query = query.bind(now);
        }
        let rows = query
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
        Ok(rows.iter().map(row_to_chunk).collect())
    }

    /// `EXPLAIN ANALYZE` of the hot queries (the next claim, the planner's two reads)
    /// for one stream and range, rolled back: what the benchmark records.
    pub async fn explain_hot_queries(
        &self,
        stream: &str,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<Vec<(&'static str, String)>> {
        let op = "explain";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let mut out = Vec::new();
        let claim = format!(
            "EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {}",
            claim_next_sql()
        );
        let rows = sqlx::query(&claim)
            .bind(&self.identity.owner)
            .bind(now_ms() + 60_000)
            .bind(now_ms())
            .bind(stream)
            .bind("server")
            .bind(from)
            .bind(to)
            .bind(Vec::<i64>::new())
            .fetch_all(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        out.push((
            "claim next",
            rows.iter()
                .map(|r| r.get::<String, _>(0))
                .collect::<Vec<_>>()
                .join("\n"),
        ));
        for (name, sql) in [
            ("planning: held fragments", HELD_FRAGMENTS_SQL),
            ("planning: clip ranges", CLIP_RANGES_SQL),
        ] {
            let rows = sqlx::query(&format!("EXPLAIN (ANALYZE, COSTS OFF, TIMING OFF) {sql}"))
                .bind(stream)
                .bind("server")
                .bind(from)
                .bind(to)
                .fetch_all(&mut *tx)
                .await
                .map_err(Error::store(op))?;
            out.push((
                name,
                rows.iter()
                    .map(|r| r.get::<String, _>(0))
                    .collect::<Vec<_>>()
                    .join("\n"),
            ));
        }
        tx.rollback().await.map_err(Error::store(op))?;
        Ok(out)
    }

    /// The pool, for benchmarks that load rows in bulk.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    async fn upsert_instance(&self, now: EpochMs, executor: &mut sqlx::PgConnection) -> Result<()> {
        let me = &self.identity;
        sqlx::query(
            "INSERT INTO instances (owner, instance, role, host, pid, started_ms, last_seen_ms)
             VALUES ($1, $2, $3, $4, $5, $6, $6)
             ON CONFLICT (owner) DO UPDATE SET last_seen_ms = $6",
        )
        .bind(&me.owner)
        .bind(&me.instance)
        .bind(me.role.as_str())
        .bind(&me.host)
        .bind(i64::from(me.pid))
        .bind(now)
        .execute(executor)
        .await
        .map_err(Error::store("register instance"))?;
        Ok(())
    }
}

#[async_trait::async_trait]
impl Ledger for PgLedger {
    fn identity(&self) -> &Identity {
        &self.identity
    }

    async fn register(&self, now: EpochMs, lease_ms: i64) -> Result<Registration> {
        let op = "register instance";
        let me = &self.identity;
        let mut conn = self.pool.acquire().await.map_err(Error::store(op))?;
        if me.role == Role::Daemon {
            let other = sqlx::query(
                "SELECT * FROM instances WHERE instance = $1 AND role = 'daemon' AND owner <> $2
                   AND last_seen_ms >= $3 ORDER BY last_seen_ms DESC LIMIT 1",
            )
            .bind(&me.instance)
            .bind(&me.owner)
            .bind(now - lease_ms)
            .fetch_optional(&mut *conn)
            .await
            .map_err(Error::store(op))?;
            if let Some(other) = other {
                return Ok(Registration::InstanceInUse(row_to_instance(&other)));
            }
        }
        sqlx::query("DELETE FROM instances WHERE last_seen_ms < $1")
            .bind(now - 86_400_000)
            .execute(&mut *conn)
            .await
            .map_err(Error::store(op))?;
        self.upsert_instance(now, &mut conn).await?;
        Ok(Registration::Registered)
    }

    async fn heartbeat(&self, now: EpochMs, lease_ms: i64, active: &[i64]) -> Result<()> {
        let op = "heartbeat";
        let owner = &self.identity.owner;
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        self.upsert_instance(now, &mut tx).await?;
        sqlx::query("UPDATE stream_leases SET lease_until_ms = $2 WHERE owner = $1")
            .bind(owner)
            .bind(now + lease_ms)
            .execute(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        sqlx::query(
            "UPDATE chunks SET lease_until_ms = GREATEST(COALESCE(lease_until_ms, 0), $2)
             WHERE owner = $1 AND state IN ('fetching', 'uploading') AND id = ANY($3)",
        )
        .bind(owner)
        .bind(now + lease_ms)
        .bind(active)
        .execute(&mut *tx)
        .await
        .map_err(Error::store(op))?;
        tx.commit().await.map_err(Error::store(op))
    }

    async fn unregister(&self) -> Result<()> {
        let op = "unregister";
        let owner = &self.identity.owner;
        sqlx::query(
            "UPDATE stream_leases SET owner = NULL, instance = NULL, role = NULL,
                 lease_until_ms = NULL WHERE owner = $1",
        )
        .bind(owner)
        .execute(&self.pool)
        .await
        .map_err(Error::store(op))?;
        sqlx::query("DELETE FROM instances WHERE owner = $1")
            .bind(owner)
            .execute(&self.pool)
            .await
            .map_err(Error::store(op))?;
        Ok(())
    }

    async fn instances(&self) -> Result<Vec<InstanceView>> {
        let rows = sqlx::query("SELECT * FROM instances ORDER BY last_seen_ms DESC, owner")
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list instances"))?;
        Ok(rows.iter().map(row_to_instance).collect())
    }

    async fn acquire_stream(
        &self,
        stream: &str,
        source: TimestampSource,
        now: EpochMs,
        lease_ms: i64,
    ) -> Result<StreamClaim> {
        let op = "acquire stream";
        let me = &self.identity;
        // One statement: the row lock makes concurrent acquirers queue, and each sees the
        // other's lease once it commits.
        let acquired: Option<i64> = sqlx::query_scalar(
            "INSERT INTO stream_leases AS l (stream, timestamp_source, owner, instance, role,
                 acquired_ms, lease_until_ms, generation)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 1)
             ON CONFLICT (stream, timestamp_source) DO UPDATE SET
                 owner = excluded.owner, instance = excluded.instance, role = excluded.role,
                 acquired_ms = CASE WHEN l.owner IS NOT DISTINCT FROM excluded.owner
                     THEN l.acquired_ms ELSE excluded.acquired_ms END,
                 lease_until_ms = excluded.lease_until_ms,
                 generation = l.generation + 1
             WHERE l.owner IS NULL OR l.owner = excluded.owner
                OR l.lease_until_ms IS NULL OR l.lease_until_ms < $6
             RETURNING generation",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(&me.owner)
        .bind(&me.instance)
        .bind(me.role.as_str())
        .bind(now)
        .bind(now + lease_ms)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store(op))?;
        if acquired.is_some() {
            return Ok(StreamClaim::Acquired);
        }
        let holder =
            sqlx::query("SELECT * FROM stream_leases WHERE stream = $1 AND timestamp_source = $2")
                .bind(stream)
                .bind(source.as_str())
                .fetch_optional(&self.pool)
                .await
                .map_err(Error::store(op))?
                .map(|row| row_to_holder(&row));
        Ok(StreamClaim::HeldBy(holder.unwrap_or_else(|| {
            StreamHolder::released(stream, source, now)
        })))
    }

    async fn release_stream(&self, stream: &str, source: TimestampSource) -> Result<()> {
        sqlx::query(
            "UPDATE stream_leases SET owner = NULL, instance = NULL, role = NULL,
                 lease_until_ms = NULL
             WHERE stream = $1 AND timestamp_source = $2 AND owner = $3",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(&self.identity.owner)
        .execute(&self.pool)
        .await
        .map_err(Error::store("release stream"))?;
        Ok(())
    }

    async fn stream_holders(&self, now: EpochMs) -> Result<Vec<StreamHolder>> {
        let rows = sqlx::query(
            "SELECT * FROM stream_leases WHERE owner IS NOT NULL AND lease_until_ms >= $1
             ORDER BY stream, timestamp_source",
        )
        .bind(now)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("list stream leases"))?;
        Ok(rows.iter().map(row_to_holder).collect())
    }

    async fn claim_next(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
        now: EpochMs,
        lease_ms: i64,
        skip: &[i64],
    ) -> Result<Option<(Chunk, Lease)>> {
        let row = sqlx::query(&claim_next_sql())
            .bind(&self.identity.owner)
            .bind(now + lease_ms)
            .bind(now)
            .bind(stream)
            .bind(source.as_str())
            .bind(from)
            .bind(to)
            .bind(skip)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store("claim next chunk"))?;
        Ok(row.map(|row| {
            let chunk = row_to_chunk(&row);
            let lease = Lease {
                chunk: chunk.id,
                generation: chunk.generation,
            };
            (chunk, lease)
        }))
    }

    async fn insert_planned(
        &self,
        stream: &str,
        source: TimestampSource,
        plan: &ChunkPlan,
        object_key: &str,
    ) -> Result<bool> {
        let op = "insert chunk";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let id = Self::insert_chunk(&mut tx, stream, source.as_str(), plan, object_key, None)
            .await
            .map_err(Error::store(op))?;
        if id.is_none() {
            tx.rollback().await.map_err(Error::store(op))?;
            return Ok(false);
        }
        tx.commit().await.map_err(Error::store(op))?;
        Ok(true)
    }

    async fn insert_archived(
        &self,
        stream: &str,
        source: TimestampSource,
        plan: &ChunkPlan,
        object_key: &str,
        bytes: u64,
    ) -> Result<bool> {
        let op = "insert archived chunk";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let id = Self::insert_chunk(&mut tx, stream, source.as_str(), plan, object_key, None)
            .await
            .map_err(Error::store(op))?;
        let Some(id) = id else {
            tx.rollback().await.map_err(Error::store(op))?;
            return Ok(false);
        };
        sqlx::query("UPDATE chunks SET state = 'done', archived_bytes = $1 WHERE id = $2")
            .bind(bytes as i64)
            .bind(id)
            .execute(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        tx.commit().await.map_err(Error::store(op))?;
        Ok(true)
    }

    async fn holdings(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<Holdings> {
        let op = "read holdings";
        let numbers: Vec<String> = sqlx::query_scalar(HELD_FRAGMENTS_SQL)
            .bind(stream)
            .bind(source.as_str())
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
        let rows = sqlx::query(CLIP_RANGES_SQL)
            .bind(stream)
            .bind(source.as_str())
            .bind(from)
            .bind(to)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
        let mut holdings = Holdings {
            held: numbers.into_iter().collect(),
            ..Holdings::default()
        };
        // Every PostgreSQL chunk records its fragments: there are no legacy ranges.
        for row in &rows {
            let state = row.get::<String, _>("state");
            // An expired range is fetched no more: what is listed inside it now is late.
            let done = state == "done" || state == "expired";
            holdings.ranges.push((
                row.get::<i64, _>("start_ms"),
                row.get::<i64, _>("clip_end"),
                done,
            ));
        }
        Ok(holdings)
    }

    async fn fragments_of(&self, chunk: i64) -> Result<Vec<Fragment>> {
        let rows = sqlx::query(
            "SELECT fragment_number, start_ms, server_ms, duration_ms, size_bytes
             FROM chunk_fragments WHERE chunk_id = $1",
        )
        .bind(chunk)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("read fragments"))?;
        let mut fragments: Vec<Fragment> = rows.iter().map(row_to_fragment).collect();
        fragments.sort_by(Fragment::order);
        Ok(fragments)
    }

    async fn claimable(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
        now: EpochMs,
    ) -> Result<Vec<Chunk>> {
        self.chunks_in(
            "list claimable chunks",
            "(state = 'planned' OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= $5))",
            stream,
            source,
            (from, to),
            Some(now),
        )
        .await
    }

    async fn range_summary(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<RangeSummary> {
        let op = "summarize range";
        let rows = sqlx::query(
            "SELECT state, COUNT(*) AS n, COALESCE(SUM(archived_bytes), 0)::BIGINT AS bytes
             FROM chunks
             WHERE stream = $1 AND timestamp_source = $2 AND end_ms >= $3 AND start_ms <= $4
             GROUP BY state",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store(op))?;
        let mut summary = RangeSummary::default();
        for row in &rows {
            let n = row.get::<i64, _>("n") as usize;
            summary.chunks += n;
            match ChunkState::parse(&row.get::<String, _>("state")) {
                Some(ChunkState::Done) => {
                    summary.done = n;
                    summary.archived_bytes = row.get::<i64, _>("bytes") as u64;
                }
                Some(ChunkState::Planned) => summary.pending += n,
                Some(ChunkState::Fetching | ChunkState::Uploading) => summary.in_flight += n,
                _ => {}
            }
        }
        let unfinished = self
            .chunks_in(
                op,
                "state IN ('failed', 'expired')",
                stream,
                source,
                (from, to),
                None,
            )
            .await?;
        for chunk in unfinished {
            match chunk.state {
                ChunkState::Failed => summary.failed.push(chunk),
                _ => summary.expired.push(chunk),
            }
        }
        Ok(summary)
    }

    async fn claim(&self, id: i64, now: EpochMs, lease_ms: i64) -> Result<Option<Lease>> {
        let generation: Option<i64> = sqlx::query_scalar(
            "UPDATE chunks SET state = 'fetching', attempts = attempts + 1, owner = $1,
                 generation = generation + 1, lease_until_ms = $2, updated_ms = $3
             WHERE id = $4 AND (state = 'planned'
                 OR (state = 'failed' AND COALESCE(next_attempt_ms, 0) <= $3))
             RETURNING generation",
        )
        .bind(&self.identity.owner)
        .bind(now + lease_ms)
        .bind(now)
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store("claim chunk"))?;
        Ok(generation.map(|generation| Lease {
            chunk: id,
            generation,
        }))
    }

    async fn abandoned(&self, now: EpochMs, active: &[i64]) -> Result<Vec<Chunk>> {
        // Leases alone: a holder on another host cannot be looked at, only outlived.
        let rows = sqlx::query(&format!(
            "SELECT {CHUNK_COLUMNS} FROM chunks
             WHERE state IN ('fetching', 'uploading')
               AND (lease_until_ms IS NULL OR lease_until_ms < $1 OR owner IS NULL
                    OR (owner = $2 AND id <> ALL($3)))
             ORDER BY start_ms, id"
        ))
        .bind(now)
        .bind(&self.identity.owner)
        .bind(active)
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("find abandoned chunks"))?;
        Ok(rows.iter().map(row_to_chunk).collect())
    }

    async fn take_over(&self, chunk: &Chunk, now: EpochMs, lease_ms: i64) -> Result<Option<Lease>> {
        let generation: Option<i64> = sqlx::query_scalar(
            "UPDATE chunks SET owner = $1, generation = generation + 1, lease_until_ms = $2,
                 updated_ms = $3
             WHERE id = $4 AND generation = $5 AND lease_until_ms IS NOT DISTINCT FROM $6
               AND state IN ('fetching', 'uploading')
             RETURNING generation",
        )
        .bind(&self.identity.owner)
        .bind(now + lease_ms)
        .bind(now)
        .bind(chunk.id)
        .bind(chunk.generation)
        // A holder that renewed since it was seen as dead keeps its chunk.
        .bind(chunk.lease_until_ms)
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store("take over chunk"))?;
        Ok(generation.map(|generation| Lease {
            chunk: chunk.id,
            generation,
        }))
    }

    async fn mark_uploading(&self, lease: &Lease, upload_id: Option<&str>) -> Result<()> {
        let upload_id = upload_id.map(str::to_string);
        self.transition(
            "mark uploading",
            "state = 'uploading', upload_id = COALESCE($5, upload_id)",
            lease,
            |q| q.bind(upload_id),
        )
        .await
    }

    async fn renew(&self, lease: &Lease, until: EpochMs) -> Result<()> {
        self.transition(
            "renew claim",
            "lease_until_ms = GREATEST(COALESCE(lease_until_ms, 0), $5)",
            lease,
            |q| q.bind(until),
        )
        .await
    }

    async fn attach_fragments(
        &self,
        lease: &Lease,
        fragments: &[Fragment],
    ) -> Result<Vec<Fragment>> {
        let op = "attach fragments";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let (stream, source) = self.hold_in(&mut tx, op, lease).await?;
        let added = Self::insert_fragments(&mut tx, &stream, &source, lease.chunk, fragments, true)
            .await
            .map_err(Error::store(op))?;
        let rows = sqlx::query(
            "SELECT fragment_number, start_ms, server_ms, duration_ms, size_bytes
             FROM chunk_fragments WHERE chunk_id = $1",
        )
        .bind(lease.chunk)
        .fetch_all(&mut *tx)
        .await
        .map_err(Error::store(op))?;
        let mut held: Vec<Fragment> = rows.iter().map(row_to_fragment).collect();
        held.sort_by(Fragment::order);
        if added > 0 {
            let plan = ChunkPlan::of(ChunkKind::Clip, held.clone());
            sqlx::query(
                "UPDATE chunks SET fragment_count = $1, planned_bytes = $2, planned_duration_ms = $3,
                     first_fragment = $4, last_fragment = $5, fragments_known = 1 WHERE id = $6",
            )
            .bind(i64::from(plan.fragment_count))
            .bind(plan.bytes as i64)
            .bind(plan.duration_ms as i64)
            .bind(&plan.first_fragment)
            .bind(&plan.last_fragment)
            .bind(lease.chunk)
            .execute(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        }
        tx.commit().await.map_err(Error::store(op))?;
        Ok(held)
    }

    async fn mark_done(&self, lease: &Lease, archived: &Archived) -> Result<()> {
        let (bytes, crc) = (archived.bytes as i64, archived.crc32c.clone());
        self.transition(
            "mark done",
            "state = 'done', archived_bytes = $5, archived_crc32c = $6, upload_id = NULL,
             archived_by = owner, owner = NULL, lease_until_ms = NULL, last_error = NULL, error_kind = NULL,
             next_attempt_ms = NULL",
            lease,
            |q| q.bind(bytes).bind(crc),
        )
        .await
    }

    async fn mark_failed(&self, lease: &Lease, failure: &Failure) -> Result<()> {
        let f = failure.clone();
        self.transition(
            "mark failed",
            "state = 'failed', last_error = $5, error_kind = $6, next_attempt_ms = $7,
             owner = NULL, lease_until_ms = NULL",
            lease,
            |q| q.bind(f.message).bind(f.kind).bind(f.next_attempt_ms),
        )
        .await
    }

    async fn mark_expired(&self, lease: &Lease, reason: &str) -> Result<()> {
        let reason = reason.to_string();
        self.transition(
            "mark expired",
            "state = 'expired', last_error = $5, error_kind = 'expired', next_attempt_ms = NULL,
             upload_id = NULL, owner = NULL, lease_until_ms = NULL",
            lease,
            |q| q.bind(reason),
        )
        .await
    }

    async fn release(&self, lease: &Lease) -> Result<()> {
        self.transition(
            "release chunk",
            "state = 'planned', owner = NULL, lease_until_ms = NULL",
            lease,
            |q| q,
        )
        .await
    }

    async fn split(
        &self,
        lease: &Lease,
        parts: &[(ChunkPlan, String)],
        expired: Option<(&ChunkPlan, &str)>,
    ) -> Result<()> {
        let op = "split chunk";
        let mut tx = self.pool.begin().await.map_err(Error::store(op))?;
        let (stream, source) = self.hold_in(&mut tx, op, lease).await?;
        sqlx::query("DELETE FROM chunks WHERE id = $1")
            .bind(lease.chunk)
            .execute(&mut *tx)
            .await
            .map_err(Error::store(op))?;
        let mut inserted = true;
        if let Some((plan, reason)) = expired {
            inserted = Self::insert_chunk(&mut tx, &stream, &source, plan, "", Some(reason))
                .await
                .map_err(Error::store(op))?
                .is_some();
        }
        for (plan, key) in parts {
            if !inserted {
                break;
            }
            inserted = Self::insert_chunk(&mut tx, &stream, &source, plan, key, None)
                .await
                .map_err(Error::store(op))?
                .is_some();
        }
        if !inserted {
            // A part overlapping something else would lose or double media: keep the
            // chunk as it was.
            tx.rollback().await.map_err(Error::store(op))?;
            return Err(Error::Usage(format!(
                "ledger split chunk {}: a part overlaps another chunk; left as it was",
                lease.chunk
            )));
        }
        tx.commit().await.map_err(Error::store(op))?;
        Ok(())
    }

    async fn convert(&self, lease: &Lease, kind: ChunkKind, object_key: &str) -> Result<()> {
        let key = object_key.to_string();
        self.transition(
            "convert chunk",
            "kind = $5, object_key = $6, state = 'planned', upload_id = NULL, owner = NULL,
             lease_until_ms = NULL",
            lease,
            |q| q.bind(kind.as_str()).bind(key),
        )
        .await
    }

    async fn requeue_failed(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<u64> {
        let done = sqlx::query(
            "UPDATE chunks SET next_attempt_ms = NULL, updated_ms = $5
             WHERE stream = $1 AND timestamp_source = $2 AND end_ms >= $3 AND start_ms <= $4
               AND state = 'failed'",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(from)
        .bind(to)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(Error::store("requeue failed chunks"))?;
        Ok(done.rows_affected())
    }

    async fn requeue_chunk(&self, id: i64) -> Result<bool> {
        let done = sqlx::query(
            "UPDATE chunks SET state = 'planned', next_attempt_ms = NULL, archived_bytes = NULL,
                 archived_crc32c = NULL, updated_ms = $2
             WHERE id = $1 AND state IN ('done', 'failed')",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.pool)
        .await
        .map_err(Error::store("requeue chunk"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn live_upload_ids(&self) -> Result<Vec<String>> {
        sqlx::query_scalar(
            "SELECT upload_id FROM chunks WHERE state IN ('fetching', 'uploading')
               AND upload_id IS NOT NULL",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store("list live uploads"))
    }

    async fn done_in(
        &self,
        stream: &str,
        source: TimestampSource,
        from: EpochMs,
        to: EpochMs,
    ) -> Result<Vec<Chunk>> {
        self.chunks_in(
            "list done chunks",
            "state = 'done'",
            stream,
            source,
            (from, to),
            None,
        )
        .await
    }

    async fn object_keys(&self, stream: &str) -> Result<Vec<String>> {
        sqlx::query_scalar("SELECT object_key FROM chunks WHERE stream = $1 AND object_key <> ''")
            .bind(stream)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store("list object keys"))
    }

    async fn chunk(&self, id: i64) -> Result<Option<Chunk>> {
        let row = sqlx::query(&format!("SELECT {CHUNK_COLUMNS} FROM chunks WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store("read chunk"))?;
        Ok(row.as_ref().map(row_to_chunk))
    }

    async fn status(&self) -> Result<Vec<StreamStatus>> {
        let op = "status";
        let rows = sqlx::query(
            "SELECT stream, state, COUNT(*) AS n,
                    COALESCE(SUM(archived_bytes), 0)::BIGINT AS bytes,
                    COALESCE(SUM(fragment_count), 0)::BIGINT AS fragments,
                    MAX(end_ms) AS through,
                    COALESCE(SUM(CASE WHEN kind = 'late' THEN fragment_count END), 0)::BIGINT AS late,
                    COALESCE(SUM(CASE WHEN kind = 'mkv' THEN fragment_count END), 0)::BIGINT AS mkv
             FROM chunks GROUP BY stream, state ORDER BY stream",
        )
        .fetch_all(&self.pool)
        .await
        .map_err(Error::store(op))?;
        let holders = self.stream_holders(now_ms()).await?;
        let mut out: Vec<StreamStatus> = Vec::new();
        for row in &rows {
            let stream: String = row.get("stream");
            if out.last().is_none_or(|s| s.stream != stream) {
                out.push(StreamStatus {
                    stream: stream.clone(),
                    ..StreamStatus::default()
                });
            }
            let Some(s) = out.last_mut() else { continue };
            let n = row.get::<i64, _>("n") as u64;
            match ChunkState::parse(&row.get::<String, _>("state")) {
                Some(ChunkState::Done) => {
                    s.done = n;
                    s.archived_bytes = row.get::<i64, _>("bytes") as u64;
                    s.archived_fragments = row.get::<i64, _>("fragments") as u64;
                    s.archived_through_ms = row.get("through");
                    s.late_fragments = row.get::<i64, _>("late") as u64;
                    s.mkv_fragments = row.get::<i64, _>("mkv") as u64;
                }
                Some(ChunkState::Planned) => s.pending += n,
                Some(ChunkState::Fetching | ChunkState::Uploading) => s.in_flight += n,
                Some(ChunkState::Failed) => s.failed = n,
                Some(ChunkState::Expired) => s.expired = n,
                None => {}
            }
        }
        for s in &mut out {
            s.oldest_unarchived_ms = sqlx::query_scalar(
                "SELECT MIN(start_ms) FROM chunks WHERE stream = $1
                   AND state NOT IN ('done', 'expired')",
            )
            .bind(&s.stream)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store(op))?;
            if let Some(row) = sqlx::query(
                "SELECT retention_ms, next_run_ms, last_run_ms, last_run_error FROM stream_progress
                 WHERE stream = $1 ORDER BY last_run_ms DESC NULLS LAST LIMIT 1",
            )
            .bind(&s.stream)
            .fetch_optional(&self.pool)
            .await
            .map_err(Error::store(op))?
            {
                s.retention_ms = row.get("retention_ms");
                s.next_run_ms = row.get("next_run_ms");
                s.last_run_ms = row.get("last_run_ms");
                s.last_run_error = row.get("last_run_error");
            }
            let failed = sqlx::query(
                "SELECT object_key, start_ms, error_kind, last_error, attempts, next_attempt_ms
                 FROM chunks WHERE stream = $1 AND state IN ('failed', 'expired')
                 ORDER BY updated_ms DESC LIMIT 20",
            )
            .bind(&s.stream)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
            s.failures = failed.iter().map(row_to_failure).collect();
            s.last_error = s.failures.first().map(|f| f.reason.clone());
            s.held_by = holders.iter().find(|h| h.stream == s.stream).cloned();
            let by = sqlx::query(
                "SELECT archived_by, COUNT(*) AS n FROM chunks
                 WHERE stream = $1 AND state = 'done' AND archived_by IS NOT NULL
                 GROUP BY archived_by",
            )
            .bind(&s.stream)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
            for row in &by {
                let owner: String = row.get("archived_by");
                *s.archived_by_instance
                    .entry(Identity::instance_of(&owner).to_string())
                    .or_default() += row.get::<i64, _>("n") as u64;
            }
            let held = sqlx::query(
                "SELECT object_key, state, owner, lease_until_ms FROM chunks
                 WHERE stream = $1 AND state IN ('fetching', 'uploading') AND owner IS NOT NULL
                 ORDER BY start_ms LIMIT 50",
            )
            .bind(&s.stream)
            .fetch_all(&self.pool)
            .await
            .map_err(Error::store(op))?;
            s.in_flight_chunks = held.iter().map(row_to_held_chunk).collect();
        }
        Ok(out)
    }

    async fn oldest_unarchived(
        &self,
        stream: &str,
        source: TimestampSource,
    ) -> Result<Option<EpochMs>> {
        sqlx::query_scalar(
            "SELECT MIN(start_ms) FROM chunks WHERE stream = $1 AND timestamp_source = $2
               AND state NOT IN ('done', 'expired')",
        )
        .bind(stream)
        .bind(source.as_str())
        .fetch_one(&self.pool)
        .await
        .map_err(Error::store("oldest unarchived"))
    }

    async fn archived_through(&self, stream: &str) -> Result<Option<EpochMs>> {
        sqlx::query_scalar("SELECT MAX(end_ms) FROM chunks WHERE stream = $1 AND state = 'done'")
            .bind(stream)
            .fetch_one(&self.pool)
            .await
            .map_err(Error::store("archived through"))
    }

    async fn counts(&self, stream: &str) -> Result<Vec<(String, i64)>> {
        let rows =
            sqlx::query("SELECT state, COUNT(*) AS n FROM chunks WHERE stream = $1 GROUP BY state")
                .bind(stream)
                .fetch_all(&self.pool)
                .await
                .map_err(Error::store("count chunks"))?;
        Ok(rows.iter().map(|r| (r.get("state"), r.get("n"))).collect())
    }

    async fn progress(&self, stream: &str, source: TimestampSource) -> Result<StreamProgress> {
        let row = sqlx::query(
            "SELECT * FROM stream_progress WHERE stream = $1 AND timestamp_source = $2",
        )
        .bind(stream)
        .bind(source.as_str())
        .fetch_optional(&self.pool)
        .await
        .map_err(Error::store("read progress"))?;
        Ok(
            row.map_or_else(StreamProgress::default, |r| StreamProgress {
                planned_through_ms: r.get("planned_through_ms"),
                retention_ms: r.get("retention_ms"),
                next_run_ms: r.get("next_run_ms"),
                last_run_ms: r.get("last_run_ms"),
                last_run_error: r.get("last_run_error"),
            }),
        )
    }

    async fn update_progress(
        &self,
        stream: &str,
        source: TimestampSource,
        update: &StreamProgress,
    ) -> Result<()> {
        // planned_through_ms only moves forward: two instances that planned a stream one
        // after the other never move it back.
        sqlx::query(
            "INSERT INTO stream_progress AS p (stream, timestamp_source, planned_through_ms,
                 retention_ms, next_run_ms, last_run_ms, last_run_error)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             ON CONFLICT (stream, timestamp_source) DO UPDATE SET
                 planned_through_ms = GREATEST($3, p.planned_through_ms),
                 retention_ms = COALESCE($4, p.retention_ms),
                 next_run_ms = COALESCE($5, p.next_run_ms),
                 last_run_ms = COALESCE($6, p.last_run_ms),
                 last_run_error = CASE WHEN $6::BIGINT IS NOT NULL THEN $7 ELSE p.last_run_error END",
        )
        .bind(stream)
        .bind(source.as_str())
        .bind(update.planned_through_ms)
        .bind(update.retention_ms)
        .bind(update.next_run_ms)
        .bind(update.last_run_ms)
        .bind(&update.last_run_error)
        .execute(&self.pool)
        .await
        .map_err(Error::store("update progress"))?;
        Ok(())
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}
